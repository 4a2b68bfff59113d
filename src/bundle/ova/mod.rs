//! OVA and OVF packages: read in place (a disk inside an OVA is a window of the archive, never
//! extracted), checked against their `.mf` manifest, imported as bundles.

pub mod export;
pub mod ovf;
pub mod tar_index;

use super::{DiskInput, NewBundle, NewDisk, Role};
use crate::progress::Progress;
use crate::snapshot::SnapshotStore;
use diskkit_formats::backing::{BackingOpener, Role as NamedRole};
use diskkit_formats::registry::driver;
use diskkit_formats::{Error, Format, HostFile, Image, Result, detect};
use sha2::Digest;
use std::path::{Path, PathBuf};
use tar_index::Member;

/// Bytes a `.mf` manifest may have.
const MAX_MF: u64 = 1 << 20;
/// Backing files followed inside a package (an image naming a member naming a member...).
const MAX_NESTING: usize = 16;

/// Where a package's files are: members of an OVA, or files beside an OVF.
enum Files {
    Archive {
        file: HostFile,
        members: Vec<Member>,
    },
    Directory(PathBuf),
}

/// An OVA, or an OVF with its files beside it.
pub struct Package {
    /// The OVA or OVF file.
    path: PathBuf,
    files: Files,
    /// The descriptor's file name.
    ovf_name: String,
    pub descriptor: ovf::Descriptor,
}

/// True when the file at `path` is a tar archive with an `.ovf` member: an OVA, whatever its
/// name says.
pub fn is_ova(path: &Path) -> bool {
    let Ok(file) = HostFile::open(path) else {
        return false;
    };
    let mut head = [0u8; 512];
    file.len() >= 1024
        && file.read_exact_at(&mut head, 0, "tar header").is_ok()
        && tar_index::is_tar(&head)
        && std::fs::File::open(path)
            .ok()
            .and_then(|f| tar_index::index(path, f, file.len()).ok())
            .is_some_and(|m| m.iter().any(|m| m.name.ends_with(".ovf")))
}

impl Package {
    /// Opens an OVA (detected by content) or an OVF descriptor and parses its descriptor.
    pub fn open(path: &Path) -> Result<Package> {
        let file = HostFile::open(path)?;
        let mut head = [0u8; 512];
        let n = file.len().min(512) as usize;
        file.read_exact_at(&mut head[..n], 0, "package header")?;
        if tar_index::is_tar(&head[..n]) {
            let reader = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
            let members = tar_index::index(path, reader, file.len())?;
            let ovf = members
                .iter()
                .find(|m| m.name.ends_with(".ovf"))
                .ok_or_else(|| {
                    Error::corrupt(path, "OVA", 0, "no .ovf descriptor among the members")
                })?
                .clone();
            let text = read_text(&file, path, &ovf.name, ovf.offset, ovf.size, ovf::MAX_OVF)?;
            let descriptor = ovf::parse(&member_path(path, &ovf.name), &text)?;
            let package = Package {
                path: path.to_path_buf(),
                ovf_name: ovf.name,
                files: Files::Archive { file, members },
                descriptor,
            };
            package.check_references()?;
            return Ok(package);
        }
        let text = read_text(&file, path, "", 0, file.len(), ovf::MAX_OVF)?;
        let descriptor = ovf::parse(path, &text)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let package = Package {
            path: path.to_path_buf(),
            ovf_name: file_name(path),
            files: Files::Directory(dir),
            descriptor,
        };
        package.check_references()?;
        Ok(package)
    }

    /// Every referenced file exists, with the size the descriptor gives.
    fn check_references(&self) -> Result<()> {
        for f in &self.descriptor.files {
            let (name, size) = self.locate(&f.href)?;
            if let Some(expected) = f.size
                && expected != size
            {
                return Err(Error::corrupt(
                    &name,
                    "OVF file reference",
                    0,
                    format!("the descriptor says {expected} bytes, the file has {size}"),
                ));
            }
        }
        Ok(())
    }

    /// The name (for messages) and size of the package file `href`.
    fn locate(&self, href: &str) -> Result<(PathBuf, u64)> {
        match &self.files {
            Files::Archive { members, .. } => {
                let m = members.iter().find(|m| m.name == href).ok_or_else(|| {
                    Error::corrupt(
                        &self.path,
                        "OVA",
                        0,
                        format!("the descriptor references '{href}', not in the archive"),
                    )
                })?;
                Ok((member_path(&self.path, href), m.size))
            }
            Files::Directory(dir) => {
                let p = dir.join(href);
                let meta = std::fs::metadata(&p).map_err(|e| Error::io(&p, "stat", e))?;
                if !meta.is_file() {
                    return Err(Error::invalid(format!(
                        "{}: not a regular file",
                        p.display()
                    )));
                }
                Ok((p, meta.len()))
            }
        }
    }

    /// The package file `href` as a file of its own (a window of the OVA).
    fn open_file(&self, href: &str) -> Result<HostFile> {
        match &self.files {
            Files::Archive { file, members } => {
                let m = members.iter().find(|m| m.name == href).ok_or_else(|| {
                    self.locate(href)
                        .err()
                        .unwrap_or_else(|| Error::invalid(href))
                })?;
                window(file, &member_path(&self.path, href), m.offset, m.size)
            }
            Files::Directory(dir) => HostFile::open(&dir.join(href)),
        }
    }

    /// The disk in package file `href` as an image (format detected from its content); files it
    /// names must be files of the package.
    pub fn open_disk(&self, href: &str) -> Result<Box<dyn Image>> {
        let file = self.open_file(href)?;
        let mut opener = PackageOpener {
            package: self,
            depth: 0,
        };
        opener.open_image(file, None)
    }

    /// The `href` of the machine's first disk, or of the disk file named `member`.
    pub fn disk_href(&self, member: Option<&str>) -> Result<String> {
        match member {
            Some(m) => {
                self.locate(m)?;
                Ok(m.to_string())
            }
            None => self
                .descriptor
                .disks
                .first()
                .map(|d| d.href.clone())
                .ok_or_else(|| {
                    Error::invalid(format!("{}: the OVF has no disk", self.path.display()))
                }),
        }
    }

    /// Checks every file the `.mf` manifest lists against its SHA-1, SHA-256 or SHA-512 digest;
    /// returns how many were checked (0 without a manifest).
    pub fn verify_manifest(&self) -> Result<usize> {
        let stem = self.ovf_name.strip_suffix(".ovf").unwrap_or(&self.ovf_name);
        let mf_name = format!("{stem}.mf");
        let Ok((mf_path, _)) = self.locate(&mf_name) else {
            return Ok(0);
        };
        let mf = self.open_file(&mf_name)?;
        let text = read_text(&mf, &mf_path, "", 0, mf.len(), MAX_MF)?;
        let entries = parse_mf(&mf_path, &text)?;
        for (alg, name, expected) in &entries {
            if *name != self.ovf_name {
                ovf::check_href(&mf_path, name)?;
            }
            let file = self.open_file(name)?;
            let actual = digest_file(&file, *alg)?;
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(Error::corrupt(
                    file.path(),
                    ".mf digest",
                    0,
                    format!("{} is {actual}, the manifest says {expected}", alg.name()),
                ));
            }
        }
        Ok(entries.len())
    }

    /// A bundle name from the descriptor (the virtual system's id) or the file name.
    pub fn default_name(&self) -> String {
        let raw = self
            .descriptor
            .name
            .clone()
            .unwrap_or_else(|| file_name(&self.path));
        let cleaned: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .take(128)
            .collect();
        let cleaned = cleaned.trim_start_matches(['.', '-']).to_string();
        if cleaned.is_empty() {
            "imported".into()
        } else {
            cleaned
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A member of an archive as a file of its own, read in place: every read stays inside it.
struct Window {
    file: std::fs::File,
    base: u64,
    len: u64,
    name: PathBuf,
}

impl diskkit_formats::host::RemoteFile for Window {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file
            .read_exact_at(buf, self.base + offset)
            .map_err(|e| Error::io(&self.name, format!("read {what} at {offset:#x}"), e))
    }
}

/// The `len` bytes at `offset` of the archive `file` as a file named `name`.
fn window(file: &HostFile, name: &Path, offset: u64, len: u64) -> Result<HostFile> {
    file.check_range(offset, len, "archive member")?;
    let clone = file
        .file()?
        .try_clone()
        .map_err(|e| Error::io(file.path(), "open again", e))?;
    Ok(HostFile::from_remote(
        name,
        Box::new(Window {
            file: clone,
            base: offset,
            len,
            name: name.to_path_buf(),
        }),
    ))
}

/// `x.ova#member`, the name of a member in messages.
fn member_path(ova: &Path, member: &str) -> PathBuf {
    PathBuf::from(format!("{}#{member}", ova.display()))
}

/// The UTF-8 text of `len` bytes at `offset` of `file`, at most `max`.
fn read_text(
    file: &HostFile,
    path: &Path,
    member: &str,
    offset: u64,
    len: u64,
    max: u64,
) -> Result<String> {
    let name = if member.is_empty() {
        path.to_path_buf()
    } else {
        member_path(path, member)
    };
    if len > max {
        return Err(Error::corrupt(
            &name,
            "descriptor",
            0,
            format!("{len} bytes, more than {max}"),
        ));
    }
    let bytes = file.read_vec_at(offset, len, "descriptor")?;
    String::from_utf8(bytes).map_err(|e| {
        Error::corrupt(
            &name,
            "descriptor",
            e.utf8_error().valid_up_to() as u64,
            "not UTF-8",
        )
    })
}

/// A digest algorithm of `.mf` files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestAlg {
    Sha1,
    Sha256,
    Sha512,
}

impl ManifestAlg {
    pub fn name(self) -> &'static str {
        match self {
            ManifestAlg::Sha1 => "SHA1",
            ManifestAlg::Sha256 => "SHA256",
            ManifestAlg::Sha512 => "SHA512",
        }
    }
}

impl std::str::FromStr for ManifestAlg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "sha1" => Ok(ManifestAlg::Sha1),
            "sha256" => Ok(ManifestAlg::Sha256),
            "sha512" => Ok(ManifestAlg::Sha512),
            _ => Err(format!("'{s}': sha1, sha256 or sha512")),
        }
    }
}

/// The entries of a `.mf` manifest: `ALG(name)= hex` lines (spaces around `=` and before `(`
/// tolerated on reading; diskkit writes the exact form importers require).
pub fn parse_mf(name: &Path, text: &str) -> Result<Vec<(ManifestAlg, String, String)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = || {
            Error::corrupt(
                name,
                ".mf manifest",
                i as u64 + 1,
                format!("line {}: not ALG(name)= digest", i + 1),
            )
        };
        let (alg, rest) = line.split_once('(').ok_or_else(bad)?;
        let (file, digest) = rest.rsplit_once(')').ok_or_else(bad)?;
        let digest = digest
            .trim_start()
            .strip_prefix('=')
            .ok_or_else(bad)?
            .trim();
        let alg: ManifestAlg = alg.trim().parse().map_err(|_| bad())?;
        let len = match alg {
            ManifestAlg::Sha1 => 40,
            ManifestAlg::Sha256 => 64,
            ManifestAlg::Sha512 => 128,
        };
        if digest.len() != len || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        if out.len() >= tar_index::MAX_MEMBERS {
            return Err(bad());
        }
        out.push((alg, file.to_string(), digest.to_ascii_lowercase()));
    }
    Ok(out)
}

/// The hex digest of a whole file, read in 1 MiB pieces.
pub fn digest_file(file: &HostFile, alg: ManifestAlg) -> Result<String> {
    let mut hasher = Hasher::new(alg);
    let mut buf = vec![0u8; (1 << 20).min(file.len().max(1)) as usize];
    let mut at = 0;
    while at < file.len() {
        let n = (buf.len() as u64).min(file.len() - at) as usize;
        file.read_exact_at(&mut buf[..n], at, "member data")?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher.finish())
}

/// One of the `.mf` algorithms, fed in pieces.
pub enum Hasher {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(alg: ManifestAlg) -> Hasher {
        match alg {
            ManifestAlg::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            ManifestAlg::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            ManifestAlg::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> String {
        use diskkit_formats::digest::hex;
        match self {
            Hasher::Sha1(h) => hex(&h.finalize()),
            Hasher::Sha256(h) => hex(&h.finalize()),
            Hasher::Sha512(h) => hex(&h.finalize()),
        }
    }
}

/// Opens the files a package's image names as other files of the package (a VMDK descriptor's
/// extents, a backing file), never files outside it.
struct PackageOpener<'a> {
    package: &'a Package,
    depth: usize,
}

impl BackingOpener for PackageOpener<'_> {
    fn open_file(
        &mut self,
        referrer: &Path,
        named: &Path,
        role: NamedRole,
        _warnings: &mut Vec<String>,
    ) -> Result<HostFile> {
        let leaf = named
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let in_package =
            ovf::check_href(referrer, &leaf).is_ok() && self.package.locate(&leaf).is_ok();
        if !in_package {
            return Err(Error::invalid(format!(
                "{}: {} {} not opened: an image inside a package may only name files of the \
                 package",
                referrer.display(),
                role.name(),
                named.display()
            )));
        }
        self.package.open_file(&leaf)
    }

    fn open_image(&mut self, file: HostFile, format: Option<Format>) -> Result<Box<dyn Image>> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(Error::invalid(format!(
                "{}: images naming images deeper than {MAX_NESTING}",
                file.path().display()
            )));
        }
        let format = match format {
            Some(f) => f,
            None => detect(&file)?,
        };
        (driver(format).open)(file, self)
    }
}

/// What an import did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    pub name: String,
    pub digests_checked: usize,
    pub manifest: super::Manifest,
}

/// Imports the OVA or OVF at `path` into `store` as bundle `name` (default: the virtual
/// system's name): the `.mf` digests checked first, then the disks snapshotted in place, the
/// first (the boot disk in the descriptor's hardware order) as the system disk, the others as
/// data disks `vdb`, `vdc`...
pub fn import(
    path: &Path,
    store: &SnapshotStore,
    name: Option<&str>,
    progress: &dyn Progress,
) -> Result<ImportReport> {
    let package = Package::open(path)?;
    let name = name
        .map(str::to_string)
        .unwrap_or_else(|| package.default_name());
    super::check_name(&name)?;
    let checked = package.verify_manifest()?;
    let images: Vec<Box<dyn Image>> = package
        .descriptor
        .disks
        .iter()
        .map(|d| {
            let image = package.open_disk(&d.href)?;
            if image.virtual_size() > d.capacity {
                return Err(Error::corrupt(
                    &member_path(path, &d.href),
                    "OVF disk",
                    0,
                    format!(
                        "the image holds {} bytes, the descriptor's capacity is {}",
                        image.virtual_size(),
                        d.capacity
                    ),
                ));
            }
            Ok(image)
        })
        .collect::<Result<_>>()?;
    if images.is_empty() {
        return Err(Error::invalid(format!(
            "{}: the OVF has no disk",
            path.display()
        )));
    }
    let disks: Vec<NewDisk<'_>> = images
        .iter()
        .enumerate()
        .map(|(i, image)| NewDisk {
            role: if i == 0 { Role::System } else { Role::Data },
            device: device_name(i),
            input: DiskInput::Image(image.as_ref(), path),
        })
        .collect();
    let meta = NewBundle {
        firmware: package.descriptor.firmware,
        os: package.descriptor.os.clone(),
        tags: [("imported-from".to_string(), file_name(path))].into(),
    };
    let (manifest, _) = super::create(store, &name, &disks, &meta, progress)?;
    Ok(ImportReport {
        name,
        digests_checked: checked,
        manifest,
    })
}

/// The Linux name of the `i`th virtio disk: vda ... vdz, vdaa ...
fn device_name(i: usize) -> String {
    let (mut n, mut letters) = (i, Vec::new());
    loop {
        letters.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    format!("vd{}", String::from_utf8_lossy(&letters))
}

/// A disk of an OVA as an image: the first disk of the machine, or the member `member`.
pub fn open_disk(path: &Path, member: Option<&str>) -> Result<Box<dyn Image>> {
    let package = Package::open(path)?;
    let href = package.disk_href(member)?;
    package.open_disk(&href)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_named_as_linux_does() {
        assert_eq!(device_name(0), "vda");
        assert_eq!(device_name(25), "vdz");
        assert_eq!(device_name(26), "vdaa");
        assert_eq!(device_name(64), "vdbm");
    }

    #[test]
    fn manifest_lines_parse_and_lie_detected() {
        let name = Path::new("x.mf");
        let sha = "a".repeat(64);
        let text = format!(
            "SHA256(x.ovf)= {sha}\nSHA1 (disk.vmdk) = {}\n",
            "b".repeat(40)
        );
        let e = parse_mf(name, &text).unwrap();
        assert_eq!(e[0], (ManifestAlg::Sha256, "x.ovf".into(), sha));
        assert_eq!(e[1].0, ManifestAlg::Sha1);
        assert!(parse_mf(name, "SHA256(x)= 12").is_err());
        assert!(parse_mf(name, "MD5(x)= 1234").is_err());
        assert!(parse_mf(name, "garbage").is_err());
    }
}

//! `pull` and `verify`: images in a bucket read back through ranged reads, checked against
//! their manifests (or, for objects diskkit did not push, the store's ETag). The pieces live
//! beside it: [`super::remote`] (an object as an image), [`super::download`] (streamed ranged
//! downloads), [`super::etag`], and [`super::catalog`] (`ls`, `rm`).

use super::download::{InFlightDigest, PIECE, download, fetch};
use super::etag::EtagCheck;
use super::push::ObjectManifest;
use super::remote::RemoteImage;
use super::{Location, ObjectMeta, Store, manifest_key};
use crate::convert::{ConvertOptions, convert_to_path};
use crate::hash::hash_image;
use crate::progress::{NoProgress, Progress};
use diskkit_formats::digest::hex;
use diskkit_formats::error::ErrorKind;
use diskkit_formats::write::CreateOptions;
use diskkit_formats::{Error, Format, Image, Result};
use std::path::Path;

/// How [`pull`] writes and checks.
pub struct PullOptions<'a> {
    /// Output format; `None`: the object as it is, byte for byte.
    pub format: Option<Format>,
    /// Output format options.
    pub create: &'a mut CreateOptions,
    /// Ranged reads in flight at once.
    pub threads: usize,
    /// Check an object without a manifest against the store's MD5 ETag (and refuse one that
    /// has none); objects with a manifest are always checked.
    pub verify: bool,
}

/// The check a pull or verify made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// The guest digest (hex, of the manifest's definition) matched the object's diskkit
    /// manifest.
    Manifest {
        definition: &'static str,
        digest: String,
    },
    /// The store's ETag matched the object's MD5 (hex; a multipart upload's `MD5-N`, the MD5
    /// of its N parts' MD5s): an object diskkit did not push.
    Md5(String),
    /// Nothing was checked (`--no-verify` on an object without a manifest).
    Unchecked,
}

/// The object at `location` and its diskkit manifest, checked against each other; `None` for
/// an object diskkit did not push (no manifest next to it).
fn open_manifest(
    store: &dyn Store,
    location: &Location,
) -> Result<(ObjectMeta, Option<ObjectManifest>)> {
    if location.is_prefix() {
        return Err(Error::invalid(format!(
            "{}: name an object, not a prefix",
            location.url()
        )));
    }
    let Some(meta) = store.stat(&location.key)? else {
        return Err(store.no_such_object(&location.key));
    };
    let manifest_key = manifest_key(&location.key);
    let Some(bytes) = store.read_small(&manifest_key)? else {
        return Ok((meta, None));
    };
    // The manifest came from the server: its errors name it.
    let manifest = ObjectManifest::from_json(&bytes).map_err(|e| {
        Error::storage(
            e.kind(),
            store.url(&manifest_key),
            "read manifest",
            e.to_string(),
        )
    })?;
    if let Some(container) = &manifest.container {
        return Err(Error::storage(
            ErrorKind::Unsupported,
            location.url(),
            "verify",
            format!(
                "the object is a {container} holding the image (push --target gce): pull and \
                 verify read bare images; download it and extract it (tar -xSzf)"
            ),
        ));
    }
    if manifest.object_size != meta.size {
        return Err(Error::storage(
            ErrorKind::DigestMismatch,
            location.url(),
            "verify",
            format!(
                "object has {} bytes, its manifest says {}",
                meta.size, manifest.object_size
            ),
        ));
    }
    Ok((meta, Some(manifest)))
}

/// Downloads an object diskkit did not push into `dst`: byte for byte, or converted to
/// `format` (its own format detected from its bytes), checked against its MD5 ETag.
fn pull_foreign(
    store: &dyn Store,
    location: &Location,
    meta: &ObjectMeta,
    (dst, dir): (&Path, &Path),
    opts: &mut PullOptions,
    downloading: &dyn Progress,
) -> Result<Verified> {
    let threads = opts.threads;
    let check = EtagCheck::new(meta, location, opts.verify)?;
    let local = download(store, location, dir, meta.size, threads, None, downloading)?;
    let verified = match check {
        Some(check) => check.check_file(local.path(), location)?,
        None => Verified::Unchecked,
    };
    match opts.format {
        None => local.keep_as(dst)?,
        Some(format) => {
            let image = diskkit_formats::open_with(
                local.path(),
                &Default::default(),
                diskkit_formats::ImplicitOpens::Refuse,
            )?;
            let convert = ConvertOptions {
                threads: Some(threads),
                ..ConvertOptions::default()
            };
            convert_to_path(
                image.as_ref(),
                format,
                dst,
                opts.create,
                &convert,
                &NoProgress,
            )?;
        }
    }
    Ok(verified)
}

/// Downloads the image at `location` into `dst` (sparse where the guest has zeros): byte for
/// byte when `format` is `None`, else converted to `format`. An object pushed by diskkit is
/// checked against its manifest's guest digest: raw and fixed VHD objects are converted
/// straight from ranged reads; others (dynamic VHD, qcow2) are first downloaded next to `dst`
/// and converted from there. Other objects are checked against the store's MD5 ETag, or not at
/// all when `verify` is off.
pub fn pull(
    store: &dyn Store,
    location: &Location,
    dst: &Path,
    opts: &mut PullOptions,
    downloading: &dyn Progress,
) -> Result<Verified> {
    // Devices and directories are refused before anything is downloaded (a rename would
    // replace a device node); a symlink's target is replaced.
    let dst = &crate::output::final_target(dst)?;
    let (meta, manifest) = open_manifest(store, location)?;
    let dir = dst.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let size = meta.size;
    let Some(manifest) = manifest else {
        return pull_foreign(store, location, &meta, (dst, dir), opts, downloading)
            .map_err(|e| explain_full_disk(e, dst, dir, size));
    };
    let (create, threads) = (&mut *opts.create, opts.threads);
    let format = opts.format.unwrap_or(manifest.format()?);
    let opts = ConvertOptions {
        threads: Some(threads),
        ..ConvertOptions::default()
    };
    let as_is = manifest.format()? == format && create.options.is_empty();
    let remote = RemoteImage::new(store, location, &manifest)?;
    // Space the pull takes at most: the object as is, or the converted guest (plus the object
    // downloaded first when it cannot be read in place).
    let guest = manifest.guest.virtual_size;
    let needed = match (&remote, as_is) {
        (_, true) => size,
        (Some(_), false) => guest,
        (None, false) => size.saturating_add(guest),
    };
    let written = (|| match remote {
        // Same format, no options: the object's bytes are the image (larger reads than the
        // convert engine's, holes where zeros were).
        Some(_) | None if as_is => {
            create.reject_unknown(format)?;
            // When the object starts with the guest (raw, fixed VHD), its digest is computed
            // from the downloaded bytes as they arrive, instead of reading the file again.
            let in_flight = remote
                .as_ref()
                .and_then(|_| InFlightDigest::of_manifest(&manifest.guest));
            let local = download(
                store,
                location,
                dir,
                size,
                threads,
                in_flight.as_ref(),
                downloading,
            )?;
            let verified = in_flight
                .map(|d| d.check(&manifest, location))
                .transpose()?;
            local.keep_as(dst)?;
            Ok(verified)
        }
        Some(remote) => {
            convert_to_path(&remote, format, dst, create, &opts, downloading).map(|_| None)
        }
        None => {
            let local = download(store, location, dir, size, threads, None, downloading)?;
            let image = open_as(local.path(), manifest.format()?)?;
            convert_to_path(image.as_ref(), format, dst, create, &opts, &NoProgress).map(|_| None)
        }
    })();
    if let Some(digest) = written.map_err(|e| explain_full_disk(e, dst, dir, needed))? {
        return Ok(Verified::of_manifest(&manifest, digest));
    }
    let written = open_as(dst, format)?;
    let digest = check_digest(written.as_ref(), &manifest, location).map_err(|e| match e {
        Error::Storage {
            kind,
            url,
            op,
            message,
        } => Error::storage(
            kind,
            url,
            op,
            format!("{message} (the pulled image is left at {})", dst.display()),
        ),
        e => e,
    })?;
    Ok(Verified::of_manifest(&manifest, digest))
}

impl Verified {
    /// `digest`, checked against `manifest`'s guest digest.
    fn of_manifest(manifest: &ObjectManifest, digest: String) -> Verified {
        Verified::Manifest {
            definition: manifest.guest.definition(),
            digest,
        }
    }
}

/// A clear message when `e` says the filesystem of `dst` (in `dir`) is full: what the pull
/// needs and what is free (temporary files are gone by now); other errors as they are.
fn explain_full_disk(e: Error, dst: &Path, dir: &Path, needed: u64) -> Error {
    if e.kind() != ErrorKind::NoSpace {
        return e;
    }
    let free = free_space(dir)
        .map(|n| format!(", {n} are free there"))
        .unwrap_or_default();
    Error::storage(
        ErrorKind::NoSpace,
        dst.display().to_string(),
        "write",
        format!(
            "no space left on device: the pulled image needs up to {needed} bytes{free}; \
             nothing was written ({e})"
        ),
    )
}

/// Bytes an unprivileged user may still write on the filesystem holding `dir`.
fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid C string and `st` a writable statvfs for the call to fill.
    if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u32 or u64).
    #[allow(clippy::unnecessary_cast)]
    (st.f_bavail as u64).checked_mul(st.f_frsize as u64)
}

/// Opens a downloaded image: it came from a bucket, so it may name no other file.
fn open_as(path: &Path, format: Format) -> Result<Box<dyn Image>> {
    diskkit_formats::open_with(
        path,
        &diskkit_formats::OpenOptions {
            format: Some(format),
            snapshot: None,
        },
        diskkit_formats::ImplicitOpens::Refuse,
    )
}

/// Checks the guest digest of `image` against the manifest; returns it.
fn check_digest(
    image: &dyn Image,
    manifest: &ObjectManifest,
    location: &Location,
) -> Result<String> {
    check_digest_with(image, manifest, location, &NoProgress)
}

fn check_digest_with(
    image: &dyn Image,
    manifest: &ObjectManifest,
    location: &Location,
    progress: &dyn Progress,
) -> Result<String> {
    let guest = &manifest.guest;
    let digest = hash_image(image, guest.algorithm, guest.chunk_size, progress, None)?;
    same_digest(digest.digest, image.virtual_size(), manifest, location)
}

/// Checks a guest digest of `size` bytes against the manifest's; returns it.
pub(super) fn same_digest(
    digest: [u8; 32],
    size: u64,
    manifest: &ObjectManifest,
    location: &Location,
) -> Result<String> {
    if size != manifest.guest.virtual_size || digest != manifest.guest.digest {
        return Err(Error::storage(
            ErrorKind::DigestMismatch,
            location.url(),
            "verify",
            format!(
                "content digest {} ({size} bytes) differs from the manifest's {} ({} bytes)",
                hex(&digest),
                manifest.guest.digest_hex(),
                manifest.guest.virtual_size
            ),
        ));
    }
    Ok(manifest.guest.digest_hex())
}

/// Reads the object at `location` and checks its guest digest against its manifest; returns
/// the digest. Objects that cannot be read in place (dynamic VHD) are downloaded to a
/// temporary file first. An object diskkit did not push is checked against the store's MD5
/// ETag, read in one ordered stream.
pub fn verify(
    store: &dyn Store,
    location: &Location,
    threads: usize,
    reading: &dyn Progress,
) -> Result<Verified> {
    let (meta, manifest) = open_manifest(store, location)?;
    let size = meta.size;
    let Some(manifest) = manifest else {
        let Some(mut check) = EtagCheck::new(&meta, location, true)? else {
            return Ok(Verified::Unchecked);
        };
        let mut piece = vec![0; PIECE];
        if size > 0 {
            store.read_pieces(&location.key, 0, size, &mut piece, &mut |_, bytes| {
                check.feed(bytes);
                reading.advance(bytes.len() as u64);
                Ok(())
            })?;
        }
        return check.check(location);
    };
    let digest = match RemoteImage::new(store, location, &manifest)? {
        Some(remote) => {
            let guest = manifest.guest.virtual_size;
            let digest = match InFlightDigest::of_manifest(&manifest.guest) {
                Some(d) => {
                    fetch(
                        store,
                        location,
                        guest,
                        threads,
                        Some(&d),
                        reading,
                        &|_, _| Ok(()),
                    )?;
                    d.check(&manifest, location)?
                }
                None => check_digest_with(&remote, &manifest, location, reading)?,
            };
            if remote.format == Format::Vhd {
                check_vhd_footer(store, location, guest)?;
            }
            Ok(digest)
        }
        None => {
            let temp = std::env::temp_dir();
            let local = download(store, location, &temp, size, threads, None, reading)?;
            let image = open_as(local.path(), manifest.format()?)?;
            check_digest(image.as_ref(), &manifest, location)
        }
    }?;
    Ok(Verified::of_manifest(&manifest, digest))
}

/// A fixed VHD object ends with a valid footer that gives the guest size.
fn check_vhd_footer(store: &dyn Store, location: &Location, guest: u64) -> Result<()> {
    use diskkit_formats::vhd::{layout::FOOTER_SIZE, trailing_footer_size};
    let mut bytes = [0u8; FOOTER_SIZE as usize];
    store.read_at(&location.key, &mut bytes, guest)?;
    let Some(size) = trailing_footer_size(&bytes) else {
        return Err(Error::storage(
            ErrorKind::CorruptImage,
            location.url(),
            "verify",
            format!("no valid VHD footer at offset {guest}"),
        ));
    };
    if size != guest {
        return Err(Error::storage(
            ErrorKind::DigestMismatch,
            location.url(),
            "verify",
            format!("VHD footer says {size} guest bytes, the manifest {guest}"),
        ));
    }
    Ok(())
}

//! `diskkit iso`: list and extract the files of an ISO 9660 image.

use super::info::format_date;
use super::util::{Out, printable, warn};
use super::{EXIT_ERROR, EXIT_OK};
use diskkit::Error;
use diskkit::formats::Result;
use diskkit::formats::iso::{Entry, EntryKind, IsoFs, NameMode, Visit};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// List or extract the files of an ISO 9660 image (Rock Ridge, Joliet, plain ISO names)
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: IsoCommand,
}

#[derive(clap::Subcommand)]
enum IsoCommand {
    Ls(LsArgs),
    Extract(ExtractArgs),
}

/// Which names to read; by default Rock Ridge, else Joliet, else ISO 9660
#[derive(Clone, Copy, clap::ValueEnum)]
enum Names {
    Iso,
    Joliet,
    Rr,
}

fn name_mode(names: Option<Names>) -> NameMode {
    match names {
        None => NameMode::Auto,
        Some(Names::Iso) => NameMode::Iso,
        Some(Names::Joliet) => NameMode::Joliet,
        Some(Names::Rr) => NameMode::RockRidge,
    }
}

/// List a directory (or one file) of an ISO image
#[derive(clap::Args)]
struct LsArgs {
    /// Long listing: mode, size, modification time (UTC), name, symbolic link target
    #[arg(short = 'l')]
    long: bool,
    /// List subdirectories recursively, one path per line
    #[arg(short = 'R')]
    recursive: bool,
    /// Names to read: iso (ISO 9660), joliet, rr (Rock Ridge)
    #[arg(long, value_enum)]
    names: Option<Names>,
    /// The ISO image file
    iso: PathBuf,
    /// Path inside the image (default: the root directory)
    path: Option<String>,
}

/// Extract files, directories and symbolic links of an ISO image into a directory
#[derive(clap::Args)]
struct ExtractArgs {
    /// Names to read: iso (ISO 9660), joliet, rr (Rock Ridge)
    #[arg(long, value_enum)]
    names: Option<Names>,
    /// Directory to extract into (created when missing)
    #[arg(short = 'C', long = "directory", default_value = ".")]
    dir: PathBuf,
    /// Also create symbolic links whose target lies outside DIR (absolute, or climbing out with
    /// ..). They are refused by default; either way diskkit never writes through a link.
    #[arg(long)]
    keep_outside_links: bool,
    /// The ISO image file
    iso: PathBuf,
    /// Paths inside the image to extract (default: everything)
    paths: Vec<String>,
}

pub fn run(args: Args) -> Result<i32> {
    match args.command {
        IsoCommand::Ls(a) => ls(a),
        IsoCommand::Extract(a) => extract(a),
    }
}

fn ls(args: LsArgs) -> Result<i32> {
    let fs = IsoFs::open(&args.iso)?;
    let (_, entry) = fs.lookup(name_mode(args.names), args.path.as_deref().unwrap_or(""))?;
    let mut out = Out::new();
    let mut print = |name: &str, e: &Entry| -> Result<()> {
        let line = if args.long {
            long_line(name, e)
        } else {
            printable(name).into_owned()
        };
        writeln!(out, "{line}")
    };
    if !entry.is_dir() {
        print(&entry.name, &entry)?;
    } else if args.recursive {
        fs.walk(&entry, &mut |visit| match visit {
            Visit::Entry { path, entry } => print(&path.join("/"), entry),
            Visit::Warning(w) => {
                warn(&w);
                Ok(())
            }
        })?;
    } else {
        let listing = fs.read_dir(&entry)?;
        for w in &listing.warnings {
            warn(w);
        }
        for e in &listing.entries {
            print(&e.name, e)?;
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn long_line(name: &str, e: &Entry) -> String {
    let date = e.mtime.map_or_else(
        || "-".repeat(19),
        |t| format_date(u64::try_from(t).unwrap_or(0)),
    );
    let link = match &e.kind {
        EntryKind::Symlink(target) => format!(" -> {}", printable(target)),
        _ => String::new(),
    };
    format!(
        "{} {:>12} {date} {}{link}",
        mode_string(e.display_mode()),
        e.size,
        printable(name)
    )
}

/// `drwxr-xr-x` from st_mode.
fn mode_string(mode: u32) -> String {
    let kind = match mode & 0o170000 {
        0o040000 => 'd',
        0o120000 => 'l',
        0o020000 => 'c',
        0o060000 => 'b',
        0o010000 => 'p',
        0o140000 => 's',
        _ => '-',
    };
    let mut s = String::from(kind);
    for (shift, special, set, unset) in [
        (6, 0o4000, 's', 'S'),
        (3, 0o2000, 's', 'S'),
        (0, 0o1000, 't', 'T'),
    ] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, mode & special != 0) {
            (true, true) => set,
            (false, true) => unset,
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// Permission bits applied to extracted files: set-user-ID and set-group-ID bits from an image
/// are dropped.
const PERMISSION_MASK: u32 = 0o1777;

fn extract(args: ExtractArgs) -> Result<i32> {
    let fs = IsoFs::open(&args.iso)?;
    let mode = name_mode(args.names);
    fs::create_dir_all(&args.dir).map_err(|e| Error::io(&args.dir, "create directory", e))?;
    let mut ex = Extractor {
        fs: &fs,
        root: args.dir.clone(),
        dirs: Vec::new(),
        failures: 0,
        temp_counter: 0,
        keep_outside_links: args.keep_outside_links,
    };
    let paths = if args.paths.is_empty() {
        vec![String::new()]
    } else {
        args.paths
    };
    for path in &paths {
        let (prefix, entry) = fs.lookup(mode, path)?;
        if !prefix.is_empty() {
            ex.extract_entry(&prefix, &entry);
        }
        if entry.is_dir() {
            fs.walk(&entry, &mut |visit| {
                match visit {
                    Visit::Entry { path, entry } => {
                        let full: Vec<String> = prefix.iter().chain(path).cloned().collect();
                        ex.extract_entry(&full, entry);
                    }
                    Visit::Warning(w) => ex.fail(&w),
                }
                Ok(())
            })?;
        }
    }
    ex.finish_dirs();
    if ex.failures > 0 {
        eprintln!(
            "diskkit: {} problem(s): some entries of {} were not extracted",
            ex.failures,
            printable(&args.iso.display().to_string())
        );
        return Ok(EXIT_ERROR);
    }
    Ok(EXIT_OK)
}

/// True when a link at directory depth `depth` below the output root, with target `target`,
/// resolves (lexically) outside the root: an absolute target, or more `..` than levels above it.
fn link_escapes(depth: usize, target: &str) -> bool {
    if target.starts_with('/') {
        return true;
    }
    let mut level = depth;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => match level.checked_sub(1) {
                Some(l) => level = l,
                None => return true,
            },
            _ => level += 1,
        }
    }
    false
}

/// Writes entries under `root` without ever following a symbolic link: parents must be real
/// directories (checked with `symlink_metadata`, created one level at a time), files are written
/// to a new temporary name (`O_CREAT|O_EXCL|O_NOFOLLOW`) and renamed into place, and links are
/// created the same way. A link in the image, whatever its target, therefore cannot redirect a
/// write outside `root`. Entry names are single safe components (`IsoFs` skips any other).
struct Extractor<'a> {
    fs: &'a IsoFs,
    root: PathBuf,
    /// Directories created, with the mode and time to apply once their content is written.
    dirs: Vec<(PathBuf, usize, Option<u32>, Option<i64>)>,
    failures: u64,
    temp_counter: u64,
    keep_outside_links: bool,
}

impl Extractor<'_> {
    fn fail(&mut self, message: &str) {
        warn(message);
        self.failures += 1;
    }

    fn extract_entry(&mut self, path: &[String], entry: &Entry) {
        if let Err(e) = self.try_extract(path, entry) {
            self.fail(&format!("{}: {e}", path.join("/")));
        }
    }

    fn try_extract(&mut self, path: &[String], entry: &Entry) -> Result<()> {
        let Some((name, parents)) = path.split_last() else {
            return Ok(());
        };
        match &entry.kind {
            EntryKind::Dir => {
                let dir = self.real_dir(path)?;
                self.dirs.push((dir, path.len(), entry.mode, entry.mtime));
                Ok(())
            }
            EntryKind::File => {
                let dir = self.real_dir(parents)?;
                self.write_file(&dir, name, entry)
            }
            EntryKind::Symlink(target) => {
                if !self.keep_outside_links && link_escapes(parents.len(), target) {
                    return Err(Error::invalid(format!(
                        "symbolic link to {target} points outside the output directory: not \
                         extracted (--keep-outside-links creates it)"
                    )));
                }
                let dir = self.real_dir(parents)?;
                let tmp = self.temp_name(&dir);
                std::os::unix::fs::symlink(target, &tmp)
                    .map_err(|e| Error::io(&tmp, "create symbolic link", e))?;
                rename(&tmp, &dir.join(name)).inspect_err(|_| {
                    fs::remove_file(&tmp).ok();
                })
            }
            EntryKind::Special => Err(Error::invalid(
                "device, FIFO or socket: not extracted".to_string(),
            )),
        }
    }

    /// `root/names...` as a chain of real directories, creating missing ones.
    fn real_dir(&self, names: &[String]) -> Result<PathBuf> {
        let mut dir = self.root.clone();
        for name in names {
            dir.push(name);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::invalid(format!(
                        "{} exists and is not a directory (links are never followed)",
                        dir.display()
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    fs::create_dir(&dir).map_err(|e| Error::io(&dir, "create directory", e))?
                }
                Err(e) => return Err(Error::io(&dir, "stat", e)),
            }
        }
        Ok(dir)
    }

    fn temp_name(&mut self, dir: &Path) -> PathBuf {
        self.temp_counter += 1;
        dir.join(format!(
            ".diskkit-extract-{}-{}.tmp",
            std::process::id(),
            self.temp_counter
        ))
    }

    fn write_file(&mut self, dir: &Path, name: &str, entry: &Entry) -> Result<()> {
        let tmp = self.temp_name(dir);
        let result = self.write_temp(&tmp, entry);
        match result.and_then(|()| rename(&tmp, &dir.join(name))) {
            Ok(()) => Ok(()),
            Err(e) => {
                fs::remove_file(&tmp).ok();
                Err(e)
            }
        }
    }

    fn write_temp(&self, tmp: &Path, entry: &Entry) -> Result<()> {
        let io = |op: &str| {
            let op = op.to_string();
            move |e| Error::io(tmp, op, e)
        };
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(tmp)
            .map_err(io("create"))?;
        let mut reader = self.fs.open_file(entry)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| Error::io(self.fs.host().path(), "read", e))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(io("write"))?;
        }
        let perm = entry.mode.map_or(0o644, |m| m & PERMISSION_MASK);
        out.set_permissions(fs::Permissions::from_mode(perm))
            .map_err(io("chmod"))?;
        if let Some(t) = entry.mtime.and_then(system_time) {
            out.set_modified(t).map_err(io("set time"))?;
        }
        Ok(())
    }

    /// Applies directory modes and times, deepest first, once nothing more is written inside.
    fn finish_dirs(&mut self) {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.1));
        for (dir, _, mode, mtime) in dirs {
            let result = (|| -> Result<()> {
                if let Some(t) = mtime.and_then(system_time) {
                    fs::File::open(&dir)
                        .and_then(|f| f.set_modified(t))
                        .map_err(|e| Error::io(&dir, "set time", e))?;
                }
                if let Some(m) = mode {
                    fs::set_permissions(&dir, fs::Permissions::from_mode(m & PERMISSION_MASK))
                        .map_err(|e| Error::io(&dir, "chmod", e))?;
                }
                Ok(())
            })();
            if let Err(e) = result {
                self.fail(&e.to_string());
            }
        }
    }
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(|e| Error::io(to, "rename into place", e))
}

fn system_time(secs: i64) -> Option<SystemTime> {
    if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(mode_string(0o040755), "drwxr-xr-x");
        assert_eq!(mode_string(0o100600), "-rw-------");
        assert_eq!(mode_string(0o120777), "lrwxrwxrwx");
        assert_eq!(mode_string(0o104755), "-rwsr-xr-x");
        assert_eq!(mode_string(0o041644), "drw-r--r-T");
    }

    #[test]
    fn links_that_leave_the_root() {
        assert!(link_escapes(0, "/etc/passwd"));
        assert!(link_escapes(0, "../x"));
        assert!(link_escapes(1, "a/../../../x"));
        assert!(!link_escapes(2, "../../docs/big.bin"));
        assert!(!link_escapes(0, "docs/./one"));
        assert!(!link_escapes(1, "a/b/../../.."));
        assert!(link_escapes(1, "a/b/../../../.."));
    }
}

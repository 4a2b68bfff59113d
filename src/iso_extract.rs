//! Safe extraction of an ISO 9660 image's files into a directory: nothing in the image, whatever
//! its names or links, can make a write land outside the directory.

use diskkit_formats::iso::{Entry, EntryKind, IsoFs, NameMode, Visit};
use diskkit_formats::{Error, Result};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Permission bits applied to extracted files: set-user-ID and set-group-ID bits from an image
/// are dropped.
const PERMISSION_MASK: u32 = 0o1777;

/// Extracts the entries at `paths` of `fs` (with their content, for directories; the whole image
/// when `paths` is empty) into `root`, created when missing. Entries that cannot be extracted
/// (a link leaving `root` without `keep_outside_links`, a device, a write error, a damaged
/// directory) are passed to `problem` and skipped; returns how many there were. A path that does
/// not exist in the image is an error.
pub fn extract(
    fs: &IsoFs,
    names: NameMode,
    paths: &[String],
    root: &Path,
    keep_outside_links: bool,
    problem: &mut dyn FnMut(&str),
) -> Result<u64> {
    fs::create_dir_all(root).map_err(|e| Error::io(root, "create directory", e))?;
    let mut ex = Extractor {
        fs,
        root: root.to_path_buf(),
        dirs: Vec::new(),
        failures: 0,
        temp_counter: 0,
        keep_outside_links,
        problem,
    };
    let whole_image = [String::new()];
    let paths = if paths.is_empty() {
        &whole_image
    } else {
        paths
    };
    for path in paths {
        let (prefix, entry) = fs.lookup(names, path)?;
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
    Ok(ex.failures)
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
    /// Told about every entry that is not extracted.
    problem: &'a mut dyn FnMut(&str),
    root: PathBuf,
    /// Directories created, with the mode and time to apply once their content is written.
    dirs: Vec<(PathBuf, usize, Option<u32>, Option<i64>)>,
    failures: u64,
    temp_counter: u64,
    keep_outside_links: bool,
}

impl Extractor<'_> {
    fn fail(&mut self, message: &str) {
        (self.problem)(message);
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
        let _removed_on_signals = crate::output::TempRegistration::new(&tmp);
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

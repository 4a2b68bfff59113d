//! The local-directory bucket: uploads written at their offsets into a hidden temporary file
//! (resumable), zero runs punched as holes, create-if-absent by a hard link that never replaces.

use super::objects::Objects;
use super::store::*;
use bytes::Bytes;
use diskkit_formats::error::ErrorKind;
use diskkit_formats::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// A local directory: uploads go to a hidden temporary file next to the object, linked into
/// place when complete.
pub(super) struct Local {
    pub(super) root: PathBuf,
}

impl Local {
    /// Path of `key` under the bucket; keys that would leave it are refused.
    fn path(&self, objects: &Objects, key: &str) -> Result<PathBuf> {
        let rel = Path::new(key);
        if key.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(Error::storage(
                ErrorKind::InvalidArgument,
                objects.url(key),
                "resolve",
                format!("'{key}': not a plain object name inside the bucket directory"),
            ));
        }
        Ok(self.root.join(rel))
    }

    /// The temporary file of upload `id` of `key`, and the object's path.
    fn upload_path(&self, objects: &Objects, key: &str, id: &str) -> Result<(PathBuf, PathBuf)> {
        let path = self.path(objects, key)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok((
            path.with_file_name(format!(".{name}.diskkit-upload-{id}")),
            path,
        ))
    }

    /// Opens the temporary file of an upload; says what to do when it is gone.
    fn open_upload(&self, objects: &Objects, key: &str, tmp: &Path) -> Result<File> {
        OpenOptions::new().write(true).open(tmp).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::storage(
                    ErrorKind::NotFound,
                    objects.url(key),
                    "open upload",
                    format!(
                        "the unfinished upload {} is gone: run diskkit push --abort URL, then \
                         push again",
                        tmp.display()
                    ),
                )
            } else {
                Error::io(tmp, "open", e)
            }
        })
    }

    /// Creates an empty temporary file next to `key`'s path; returns its id and path.
    fn new_temp(&self, objects: &Objects, key: &str) -> Result<(String, PathBuf, PathBuf)> {
        let path = self.path(objects, key)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create", e))?;
        }
        let nanos = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!("{}-{nanos:x}", std::process::id());
        let (tmp, path) = self.upload_path(objects, key, &id)?;
        remove_dead_uploads(&tmp, &id);
        File::create_new(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        Ok((id, tmp, path))
    }
}

impl Local {
    /// `data` in a new synced file `.NAME.N.diskkit-tmp-PID` next to `key`'s path (N: unique
    /// in this process), removed on signals until the registration is dropped (unlike an
    /// upload's file, it is never resumed); returns it and the object's path. The first write
    /// of this process into a folder removes such files that dead processes left there (once:
    /// a folder of a batch state holds an object per item).
    fn write_temp(
        &self,
        objects: &Objects,
        key: &str,
        data: &[u8],
    ) -> Result<(PathBuf, PathBuf, crate::output::TempRegistration)> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = self.path(objects, key)?;
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(Error::invalid(format!(
                "{}: not a file name",
                path.display()
            )));
        };
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create", e))?;
        crate::output::remove_dead_temps_once(dir);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(
            ".{}.{n}.diskkit-tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let registered = crate::output::TempRegistration::new(&tmp);
        let written = (|| {
            let f = File::create_new(&tmp)?;
            f.write_all_at(data, 0)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            // Best effort: the write failed, and that error is the one to report.
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&tmp, "write", e));
        }
        Ok((tmp, path, registered))
    }
}

/// Removes the temporary files of uploads of the same object by processes that are gone,
/// before a new upload of it starts: what a SIGKILLed push or lock left. A new upload means
/// no checkpoint resumes them (a push resumes through its checkpoint, without a new upload);
/// one that still tried would be told the upload is gone.
fn remove_dead_uploads(tmp: &Path, id: &str) {
    let (Some(dir), Some(name)) = (tmp.parent(), tmp.file_name()) else {
        return;
    };
    let name = name.to_string_lossy();
    let Some(prefix) = name.strip_suffix(id) else {
        return;
    };
    crate::output::remove_dead_files(dir, std::ffi::OsStr::new(prefix), |n| {
        n[prefix.len()..].split_once('-')?.0.parse().ok()
    });
}

/// Makes the synced file `tmp` the object at `path` without replacing an existing one, then
/// removes the temporary name and syncs the directory.
fn link_into_place(objects: &Objects, key: &str, tmp: &Path, path: &Path) -> Result<()> {
    let linked = std::fs::hard_link(tmp, path);
    let removed = std::fs::remove_file(tmp);
    match linked {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::storage(
                ErrorKind::AlreadyExists,
                objects.url(key),
                "create if absent",
                "the object exists",
            ));
        }
        Err(e) => return Err(Error::io(path, "link into place", e)),
        Ok(()) => {}
    }
    removed.map_err(|e| Error::io(tmp, "remove", e))?;
    sync_parent(path)
}

/// Syncs the directory of `path`, so that what was renamed or linked there survives a crash.
fn sync_parent(path: &Path) -> Result<()> {
    path.parent().map_or(Ok(()), crate::output::sync_dir)
}

/// Bytes of zeros a local part leaves as a hole instead of writing them.
const HOLE_GRAIN: usize = 64 << 10;

impl Backend for Local {
    fn resumable(&self) -> bool {
        true
    }

    /// Under a temporary name, renamed into place once synced: a kill or a full disk never
    /// leaves part of an object (a manifest, an index, a store's config) under its key.
    fn write(&self, objects: &Objects, key: &str, data: Vec<u8>) -> Result<()> {
        let (tmp, path, _removed_on_signals) = self.write_temp(objects, key, &data)?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, "rename into place", e))?;
        sync_parent(&path)
    }

    fn create_if_absent(&self, objects: &Objects, key: &str, data: Vec<u8>) -> Result<()> {
        let (tmp, path, _removed_on_signals) = self.write_temp(objects, key, &data)?;
        link_into_place(objects, key, &tmp, &path)
    }

    fn create_upload(&self, objects: &Objects, key: &str) -> Result<String> {
        self.new_temp(objects, key).map(|(id, _, _)| id)
    }

    /// Writes the part's non-zero runs only: zeros stay holes, so a sparse image takes no
    /// more space in the bucket than its data (the file's length is set on completion).
    fn upload_part(
        &self,
        objects: &Objects,
        key: &str,
        upload_id: &str,
        number: u32,
        offset: u64,
        data: Bytes,
    ) -> Result<String> {
        let (tmp, _) = self.upload_path(objects, key, upload_id)?;
        let f = self.open_upload(objects, key, &tmp)?;
        super::zero_runs(&data, HOLE_GRAIN, &mut |start, end, zero| {
            let at = offset + start as u64;
            let done = if zero {
                // A hole where an earlier, interrupted run may have written this part.
                punch_hole(&f, at, (end - start) as u64)
            } else {
                f.write_all_at(&data[start..end], at)
            };
            done.map_err(|e| Error::io(&tmp, format!("write part {number}"), e))
        })?;
        f.sync_data()
            .map_err(|e| Error::io(&tmp, format!("sync part {number}"), e))?;
        Ok(String::new())
    }

    fn list_parts(&self, objects: &Objects, key: &str, upload_id: &str) -> Result<UploadParts> {
        let (tmp, _) = self.upload_path(objects, key, upload_id)?;
        Ok(if tmp.exists() {
            UploadParts::Unlisted
        } else {
            UploadParts::Gone
        })
    }

    fn complete_upload(
        &self,
        objects: &Objects,
        key: &str,
        upload_id: &str,
        _parts: &[(u32, String)],
        size: u64,
    ) -> Result<()> {
        let (tmp, path) = self.upload_path(objects, key, upload_id)?;
        let f = self.open_upload(objects, key, &tmp)?;
        f.set_len(size)
            .map_err(|e| Error::io(&tmp, "set length", e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, "sync", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, "rename into place", e))?;
        sync_parent(&path)
    }

    fn abort_upload(&self, objects: &Objects, key: &str, upload_id: &str) -> Result<()> {
        let (tmp, _) = self.upload_path(objects, key, upload_id)?;
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&tmp, "remove", e)),
            _ => Ok(()),
        }
    }
}

/// Deallocates `len` bytes at `offset` of `f` (reads return zeros); a filesystem without hole
/// punching gets the zeros written.
fn punch_hole(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on an open descriptor with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return f.write_all_at(&vec![0; len as usize], offset);
    }
    Err(e)
}

/// True for the temporary files of unfinished local uploads, which listings skip.
pub fn is_upload_temp(key: &str) -> bool {
    key.contains(".diskkit-upload-")
}

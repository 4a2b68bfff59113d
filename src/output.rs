//! Outputs that appear only complete: every file diskkit creates (images, manifests, checkpoints,
//! downloads, extracted files) is written under a temporary name in its final directory, synced,
//! renamed into place, and the directory synced, so a crash or a kill never leaves a partial file
//! under the final name and any previous file there stays untouched until the new one is whole.
//!
//! Temporary names carry the writer's PID (`.NAME.diskkit-tmp-PID`). While a temporary file
//! exists it is registered in a process-wide table that the handler of SIGINT, SIGTERM and
//! SIGHUP empties ([`remove_temps_on_signals`]): any number of outputs may be in progress at once
//! (a batch worker writes many). Only SIGKILL or a machine crash can leave one behind; the next
//! output of the same name in that directory removes the leftovers of processes that are gone.

use diskkit_formats::write::{self, CacheMode, CreateOptions, ImageWriter};
use diskkit_formats::{Error, Format, Result};
use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};

/// Marks diskkit's temporary outputs; the PID follows it.
const TEMP_MARK: &str = ".diskkit-tmp-";

/// A new file being written under a temporary name, moved to its final name by
/// [`PendingOutput::commit`]. Dropped without a commit (an error, a panic), the temporary file is
/// removed.
pub struct PendingOutput {
    path: PathBuf,
    dir: PathBuf,
    temp: PathBuf,
    _registered: TempRegistration,
    committed: bool,
}

impl PendingOutput {
    /// Prepares a new output at `path`: resolves it ([`final_target`]), checks that its
    /// directory exists, removes leftovers of earlier diskkit processes that died writing the
    /// same name there, and registers the temporary name for removal on signals. Nothing is
    /// created yet: the caller creates [`PendingOutput::temp_path`].
    pub fn new(path: &Path) -> Result<PendingOutput> {
        let path = final_target(path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "{}: the output's directory does not exist",
                dir.display()
            )));
        }
        let Some(name) = path.file_name() else {
            return Err(Error::invalid(format!(
                "{}: not a file name",
                path.display()
            )));
        };
        let prefix = temp_prefix(name);
        remove_dead_leftovers(&dir, &prefix);
        let mut temp_name = prefix;
        temp_name.push(std::process::id().to_string());
        let temp = dir.join(temp_name);
        unlink_planted(&temp)?;
        Ok(PendingOutput {
            _registered: TempRegistration::new(&temp),
            path,
            dir,
            temp,
            committed: false,
        })
    }

    /// The final name (a symlink the user named resolved to its target).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where to write until the commit.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Moves the (complete, and synced unless `cache` is `Unsafe`) temporary file into place and
    /// syncs the directory so that the rename itself survives a crash.
    pub fn commit(mut self, cache: CacheMode) -> Result<PathBuf> {
        std::fs::rename(&self.temp, &self.path)
            .map_err(|e| Error::io(&self.path, "rename into place", e))?;
        self.committed = true;
        if cache.syncs() {
            sync_dir(&self.dir)?;
        }
        Ok(std::mem::take(&mut self.path))
    }

    /// An error about the temporary file, told about the user's file instead: the temporary
    /// name means nothing to the user.
    pub fn name_output(&self, e: Error) -> Error {
        let rename = |p: PathBuf| if p == self.temp { self.path.clone() } else { p };
        match e {
            Error::Io { path, op, source } => Error::Io {
                path: rename(path),
                op,
                source,
            },
            Error::Corrupt {
                path,
                structure,
                offset,
                reason,
            } => Error::Corrupt {
                path: rename(path),
                structure,
                offset,
                reason,
            },
            Error::Unsupported { path, what } => Error::Unsupported {
                path: rename(path),
                what,
            },
            other => other,
        }
    }
}

impl Drop for PendingOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// A scratch file for intermediate data (a download converted after it arrives), made in `dir`
/// as `.diskkit-scratch-N.diskkit-tmp-PID`: removed when dropped and on SIGINT, SIGTERM and
/// SIGHUP; leftovers of dead processes in `dir` are removed when the next one is made there.
pub struct Scratch {
    path: PathBuf,
    _registered: TempRegistration,
}

impl Scratch {
    pub fn new(dir: &Path) -> Result<Scratch> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        remove_dead_leftovers(dir, OsStr::new(SCRATCH_PREFIX));
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            "{SCRATCH_PREFIX}{n}{TEMP_MARK}{}",
            std::process::id()
        ));
        let registered = TempRegistration::new(&path);
        std::fs::File::create_new(&path).map_err(|e| Error::io(&path, "create", e))?;
        Ok(Scratch {
            path,
            _registered: registered,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the scratch file, complete and synced by its writer, to `dst` (already resolved
    /// by [`final_target`], in the same directory) and syncs the directory: for a download
    /// that is itself the output.
    pub fn keep_as(self, dst: &Path) -> Result<()> {
        std::fs::rename(&self.path, dst).map_err(|e| Error::io(dst, "rename into place", e))?;
        let dir = match dst.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        sync_dir(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

const SCRATCH_PREFIX: &str = ".diskkit-scratch-";

/// Writes `bytes` as the whole new content of `path`, safely (manifests, checkpoints).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let out = PendingOutput::new(path)?;
    std::fs::write(out.temp_path(), bytes)
        .and_then(|()| std::fs::File::open(out.temp_path())?.sync_all())
        .map_err(|e| out.name_output(Error::io(out.temp_path(), "write", e)))?;
    out.commit(CacheMode::Writeback).map(drop)
}

/// Creates a new image at `path`, lets `fill` write its content, and moves it into place only
/// when complete (and synced, unless `create.cache` is `Unsafe`). On failure nothing is left
/// behind and any previous file at `path` is untouched; errors name `path`, not the temporary.
pub fn write_new_image<T>(
    format: Format,
    path: &Path,
    virtual_size: u64,
    create: &mut CreateOptions,
    fill: impl FnOnce(&dyn ImageWriter) -> Result<T>,
) -> Result<T> {
    let out = PendingOutput::new(path)?;
    let cache = create.cache;
    let written = (|| {
        let writer = write::create(format, out.temp_path(), virtual_size, create)?;
        let value = fill(writer.as_ref())?;
        writer.finish()?;
        Ok(value)
    })();
    let value = written.map_err(|e| out.name_output(e))?;
    out.commit(cache)?;
    Ok(value)
}

/// `path` back, unless it is a symlink: for the files a command names itself in a folder the
/// user gave (`bundle restore`), where a link was not the user's choice and writing through it
/// would land anywhere.
pub fn not_a_symlink(path: &Path) -> Result<PathBuf> {
    if path.is_symlink() {
        return Err(Error::invalid(format!(
            "{}: is a symlink: this output's name is diskkit's, not yours, so it is not \
             written through a link (remove the link, or choose another folder)",
            path.display()
        )));
    }
    Ok(path.to_path_buf())
}

/// The file a new output (image, manifest) replaces: a symlink's target; devices, FIFOs and
/// directories are refused (a rename would replace the node; `convert -n` writes into devices).
pub fn final_target(path: &Path) -> Result<PathBuf> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if path.is_symlink() {
                return Err(Error::invalid(format!(
                    "{}: dangling symlink",
                    path.display()
                )));
            }
            Ok(path.to_path_buf())
        }
        Err(e) => Err(Error::io(path, "stat", e)),
        Ok(m) if m.is_file() => {
            if path.is_symlink() {
                std::fs::canonicalize(path).map_err(|e| Error::io(path, "resolve symlink", e))
            } else {
                Ok(path.to_path_buf())
            }
        }
        Ok(m) if m.is_dir() => Err(Error::invalid(format!(
            "{}: is a directory, not an image file",
            path.display()
        ))),
        Ok(_) => Err(Error::invalid(format!(
            "{}: exists and is not a regular file: outputs replace regular files only \
             (convert -n writes into a device)",
            path.display()
        ))),
    }
}

/// Syncs a directory, so that renames and creations in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "sync directory", e))
}

/// `.NAME.diskkit-tmp-`: the temporary names of outputs named NAME, without the PID.
fn temp_prefix(name: &OsStr) -> OsString {
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(TEMP_MARK);
    prefix
}

/// Removes whatever is at `temp`, our own temporary name, before it is created: nobody else
/// writes under our PID, so an entry there was planted (a symlink that would send the output
/// elsewhere) or left by a dead process that had our PID. The link is removed, never followed.
fn unlink_planted(temp: &Path) -> Result<()> {
    match std::fs::symlink_metadata(temp) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => Err(Error::invalid(format!(
            "{}: a directory is in the way of the temporary output",
            temp.display()
        ))),
        Ok(_) => std::fs::remove_file(temp).map_err(|e| Error::io(temp, "remove", e)),
    }
}

/// Removes the files of `dir` whose names start with `prefix` and end in `.diskkit-tmp-PID`
/// for a process that no longer exists: what a SIGKILLed or crashed diskkit left. A file whose
/// PID is alive (another diskkit writing the same name, or an unrelated process that reused the
/// PID) is kept. Best effort: a leftover that cannot be removed costs space, not correctness.
pub fn remove_dead_leftovers(dir: &Path, prefix: &OsStr) {
    remove_dead_files(dir, prefix, |name| {
        name.rsplit_once(TEMP_MARK)
            .and_then(|(_, pid)| pid.parse().ok())
    });
}

/// Removes the temporary files (`.NAME.diskkit-tmp-PID`, any NAME) that dead processes left in
/// `dir`, the first time this process asks for `dir`: for folders of objects with names of
/// their own (leases, batch records), where no later output has the same name.
pub fn remove_dead_temps_once(dir: &Path) {
    static CLEANED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut cleaned = CLEANED.lock().unwrap_or_else(|p| p.into_inner());
    if !cleaned.iter().any(|d| d == dir) {
        cleaned.push(dir.to_path_buf());
        remove_dead_leftovers(dir, OsStr::new("."));
    }
}

/// Removes the regular files of `dir` whose names start with `prefix` and whose writer's PID
/// (`pid_of` the name) is no longer alive.
pub fn remove_dead_files(dir: &Path, prefix: &OsStr, pid_of: impl Fn(&str) -> Option<i32>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = std::str::from_utf8(name.as_bytes())
            .ok()
            .filter(|n| n.as_bytes().starts_with(prefix.as_bytes()))
            .and_then(&pid_of)
        else {
            continue;
        };
        if pid > 0 && !process_alive(pid) && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether process `pid` exists (it may belong to another user: EPERM still means it exists).
pub fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Temporary files that SIGINT, SIGTERM and SIGHUP remove: C strings owned by their slot (null
/// when free), read by the signal handler without locks or allocation. Outputs beyond this many
/// at once are still removed on errors and drops, not on signals.
const MAX_REGISTERED: usize = 256;
static REGISTERED: [AtomicPtr<libc::c_char>; MAX_REGISTERED] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_REGISTERED];

/// A temporary path's place in the table of files that SIGINT, SIGTERM and SIGHUP remove, for
/// as long as it lives. For temporary files made outside [`PendingOutput`] and [`Scratch`]
/// (extraction writes its own, with `O_NOFOLLOW`).
pub struct TempRegistration(Option<usize>);

impl TempRegistration {
    pub fn new(path: &Path) -> TempRegistration {
        let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
            return TempRegistration(None);
        };
        let ptr = c.into_raw();
        for (i, slot) in REGISTERED.iter().enumerate() {
            if slot
                .compare_exchange(
                    std::ptr::null_mut(),
                    ptr,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
            {
                return TempRegistration(Some(i));
            }
        }
        // SAFETY: `ptr` came from CString::into_raw just above and was stored nowhere.
        drop(unsafe { CString::from_raw(ptr) });
        TempRegistration(None)
    }
}

impl Drop for TempRegistration {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            let ptr = REGISTERED[i].swap(std::ptr::null_mut(), Ordering::SeqCst);
            if !ptr.is_null() {
                // SAFETY: every non-null pointer in a slot came from CString::into_raw, and
                // swapping it out made this the only owner.
                drop(unsafe { CString::from_raw(ptr) });
            }
        }
    }
}

/// Makes SIGINT, SIGTERM and SIGHUP remove every registered temporary file before the process
/// dies of the signal, so an interrupted run leaves no partial file. For programs; call once at
/// start (again is harmless).
pub fn remove_temps_on_signals() {
    extern "C" fn on_signal(sig: libc::c_int) {
        for slot in &REGISTERED {
            let ptr = slot.swap(std::ptr::null_mut(), Ordering::SeqCst);
            // SAFETY: only async-signal-safe calls; `ptr` is a valid C string owned by us now
            // (it is leaked: the process is about to die).
            unsafe {
                if !ptr.is_null() {
                    libc::unlink(ptr);
                }
            }
        }
        // SAFETY: restores the default action and re-raises, so the process dies of the signal
        // as it would have without the handler.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installs a handler that only makes async-signal-safe calls.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered_paths() -> Vec<String> {
        REGISTERED
            .iter()
            .filter_map(|s| {
                let p = s.load(Ordering::SeqCst);
                // SAFETY: test-only read of a registered C string while its owner is alive.
                (!p.is_null())
                    .then(|| unsafe { std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned() })
            })
            .collect()
    }

    #[test]
    fn many_outputs_are_registered_at_once_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let outs: Vec<PendingOutput> = (0..10)
            .map(|i| PendingOutput::new(&dir.path().join(format!("out{i}"))).unwrap())
            .collect();
        let registered = registered_paths();
        for out in &outs {
            let temp = out.temp_path().to_string_lossy().into_owned();
            assert!(registered.contains(&temp), "{temp} not registered");
            assert!(temp.ends_with(&format!(".diskkit-tmp-{}", std::process::id())));
        }
        let first = outs[0].temp_path().to_string_lossy().into_owned();
        drop(outs);
        assert!(!registered_paths().contains(&first));
    }

    #[test]
    fn commit_moves_into_place_and_drop_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.raw");
        std::fs::write(&path, b"old").unwrap();
        let out = PendingOutput::new(&path).unwrap();
        std::fs::write(out.temp_path(), b"partial").unwrap();
        drop(out);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        write_file(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn leftovers_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let dead_leftover = dir.path().join(format!(".x.qcow2.diskkit-tmp-{dead}"));
        // PID 1 always exists.
        let live_leftover = dir.path().join(".x.qcow2.diskkit-tmp-1");
        let other_name = dir.path().join(format!(".y.qcow2.diskkit-tmp-{dead}"));
        for p in [&dead_leftover, &live_leftover, &other_name] {
            std::fs::write(p, b"leftover").unwrap();
        }
        let _out = PendingOutput::new(&dir.path().join("x.qcow2")).unwrap();
        assert!(!dead_leftover.exists());
        assert!(live_leftover.exists());
        assert!(other_name.exists(), "only leftovers of the same name go");
    }

    #[test]
    fn scratch_files_go_when_dropped_and_dead_ones_on_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let leftover = dir
            .path()
            .join(format!(".diskkit-scratch-7.diskkit-tmp-{dead}"));
        std::fs::write(&leftover, b"x").unwrap();
        let scratch = Scratch::new(dir.path()).unwrap();
        assert!(!leftover.exists());
        assert!(scratch.path().exists());
        let path = scratch.path().to_path_buf();
        assert!(registered_paths().contains(&path.to_string_lossy().into_owned()));
        drop(scratch);
        assert!(!path.exists());
    }

    #[test]
    fn errors_name_the_users_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.vhd");
        let out = PendingOutput::new(&path).unwrap();
        let e = Error::io(out.temp_path(), "write", std::io::Error::other("boom"));
        let text = out.name_output(e).to_string();
        assert!(text.starts_with(&path.display().to_string()), "{text}");
        assert!(!text.contains("diskkit-tmp"), "{text}");
    }

    #[test]
    fn outputs_are_refused_where_a_rename_would_replace_something_else() {
        let dir = tempfile::tempdir().unwrap();
        assert!(PendingOutput::new(dir.path()).is_err());
        assert!(PendingOutput::new(Path::new("/dev/null")).is_err());
        assert!(PendingOutput::new(&dir.path().join("missing/x")).is_err());
    }
}

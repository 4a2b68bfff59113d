//! Opening an image with its backing chain, and the gate every file its metadata names passes.

use crate::backing::{BackingOpener, ImplicitOpens, Role};
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::{Format, Image};
use crate::registry::driver;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use crate::registry::detect;

/// The deepest backing chain diskkit follows; deeper chains are refused as probably cyclic or
/// hostile.
pub const MAX_CHAIN_DEPTH: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The format the user named (`-f`); `None` detects it from magic bytes.
    pub format: Option<Format>,
    /// View an internal snapshot (qcow2) instead of the current state.
    pub snapshot: Option<String>,
}

/// Opens an image and, recursively, its backing chain, warning about named files outside an
/// image's directory ([`ImplicitOpens::WarnOutsideDir`]).
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn Image>> {
    open_with(path, opts, ImplicitOpens::default())
}

/// [`open`] with the policy for the files that image metadata names.
pub fn open_with(path: &Path, opts: &OpenOptions, policy: ImplicitOpens) -> Result<Box<dyn Image>> {
    let file = HostFile::open(path)?;
    let mut chain = ChainOpener::for_image(file.path(), policy)?;
    open_file(file, opts, &mut chain)
}

/// Opens the image in `file` (local or remote) as `opts` say (format named or detected, an
/// internal snapshot), the files its metadata names through `backing`.
pub fn open_file(
    file: HostFile,
    opts: &OpenOptions,
    backing: &mut dyn BackingOpener,
) -> Result<Box<dyn Image>> {
    let format = match opts.format {
        Some(f) => f,
        None => detect(&file)?,
    };
    let Some(snapshot) = opts.snapshot.as_deref() else {
        return (driver(format).open)(file, backing);
    };
    let Some(open_snapshot) = driver(format).open_snapshot else {
        return Err(Error::invalid(format!(
            "{}: --snapshot needs a qcow2 image, this is {format}",
            file.path().display()
        )));
    };
    open_snapshot(file, backing, snapshot)
}

/// The opener of one chain: the policy, and the images already open (to refuse cycles).
pub(crate) struct ChainOpener {
    policy: ImplicitOpens,
    visited: Vec<PathBuf>,
}

impl ChainOpener {
    /// The opener for the chain of the image at `top`.
    pub(crate) fn for_image(top: &Path, policy: ImplicitOpens) -> Result<ChainOpener> {
        let mut opener = ChainOpener {
            policy,
            visited: Vec::new(),
        };
        opener.enter(top)?;
        Ok(opener)
    }

    /// Records that the image at `path` is being opened; refuses loops and endless chains.
    fn enter(&mut self, path: &Path) -> Result<()> {
        let canonical = path
            .canonicalize()
            .map_err(|e| Error::io(path, "open", e))?;
        if self.visited.contains(&canonical) {
            return Err(Error::invalid(format!(
                "{}: backing chain loops back to this file",
                path.display()
            )));
        }
        if self.visited.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::invalid(format!(
                "{}: backing chain deeper than {MAX_CHAIN_DEPTH} images",
                path.display()
            )));
        }
        self.visited.push(canonical);
        Ok(())
    }
}

impl BackingOpener for ChainOpener {
    fn open_file(
        &mut self,
        referrer: &Path,
        named: &Path,
        role: Role,
        warnings: &mut Vec<String>,
    ) -> Result<HostFile> {
        let refused = |why: &str| {
            Error::invalid(format!(
                "{}: {} {} not opened: {why}",
                referrer.display(),
                role.name(),
                named.display()
            ))
        };
        if self.policy == ImplicitOpens::Refuse {
            return Err(refused("this image must not name other files"));
        }
        if self.policy != ImplicitOpens::Allow && !inside_dir_of(referrer, named)? {
            if self.policy == ImplicitOpens::RefuseOutsideDir {
                return Err(refused("it lies outside the image's directory"));
            }
            warnings.push(format!(
                "{} {} lies outside the image's directory",
                role.name(),
                named.display()
            ));
        }
        let kind = |meta: &std::fs::Metadata| {
            let t = meta.file_type();
            if t.is_file() || t.is_block_device() {
                Ok(())
            } else {
                Err(refused(&format!(
                    "it is {}, not a regular file or block device",
                    describe(t)
                )))
            }
        };
        kind(&std::fs::metadata(named).map_err(|e| Error::io(named, "stat", e))?)?;
        // Non-blocking, so that a FIFO swapped in since the check cannot block the open; the
        // type is checked again on what was opened.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(named)
            .map_err(|e| Error::io(named, "open", e))?;
        kind(&file.metadata().map_err(|e| Error::io(named, "stat", e))?)?;
        if role.is_image() {
            self.enter(named)?;
        }
        HostFile::from_file(named, file)
    }

    fn open_image(&mut self, file: HostFile, format: Option<Format>) -> Result<Box<dyn Image>> {
        let format = match format {
            Some(f) => f,
            None => detect(&file)?,
        };
        (driver(format).open)(file, self)
    }
}

/// True when `named` lies in the directory of the image `referrer`, or below it, once symbolic
/// links are resolved.
fn inside_dir_of(referrer: &Path, named: &Path) -> Result<bool> {
    let referrer = referrer
        .canonicalize()
        .map_err(|e| Error::io(referrer, "open", e))?;
    let named = named
        .canonicalize()
        .map_err(|e| Error::io(named, "open", e))?;
    Ok(referrer.parent().is_some_and(|dir| named.starts_with(dir)))
}

fn describe(t: std::fs::FileType) -> &'static str {
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else {
        "a special file"
    }
}

//! Errors of the format layer. Every error about image bytes names the file, the structure and the
//! byte offset at which the problem was found, so a user can see what is wrong with which file.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused an operation on a file.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// The image bytes violate the format: the file is damaged or hostile.
    #[error("{}: {structure} at offset {offset:#x}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        structure: String,
        offset: u64,
        reason: String,
    },
    /// A valid image that uses something diskkit does not implement.
    #[error("{}: unsupported: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },
    /// The request itself is wrong (bad option, out-of-range offset, unknown snapshot).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn io(path: &Path, op: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            op: op.into(),
            source,
        }
    }

    pub fn corrupt(
        path: &Path,
        structure: impl Into<String>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            path: path.to_path_buf(),
            structure: structure.into(),
            offset,
            reason: reason.into(),
        }
    }

    pub fn unsupported(path: &Path, what: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

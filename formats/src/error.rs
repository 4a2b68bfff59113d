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
    /// An object store (or the local bucket directory) refused or failed an operation on `url`.
    /// The message says what happened and what to do; `kind` is what a program acts on.
    #[error("{url}: {message}")]
    Storage {
        kind: ErrorKind,
        /// The object or bucket URL.
        url: String,
        /// What was being done (`stat`, `upload part 3`, `list`...).
        op: String,
        message: String,
    },
}

/// What went wrong, as a program acts on it (retry, create the bucket, fix the credentials...),
/// whatever the message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No such object or file.
    NotFound,
    NoSuchBucket,
    /// The credentials are wrong or lack the permission.
    AccessDenied,
    /// The request was signed for another region than the bucket's.
    WrongRegion,
    /// The endpoint could not be reached or the connection broke.
    Network,
    Timeout,
    /// The server asks to slow down (429, SlowDown).
    Throttled,
    /// The server failed (5xx).
    ServerError,
    /// The target exists: the loser of a create-if-absent race.
    AlreadyExists,
    /// Image bytes that violate their format.
    CorruptImage,
    /// Content whose digest differs from the one recorded for it.
    DigestMismatch,
    /// The filesystem or quota is full.
    NoSpace,
    /// The request itself is wrong.
    InvalidArgument,
    /// Stopped by a signal or a vanished resource (an upload aborted elsewhere).
    Interrupted,
    /// Something diskkit or the server does not implement.
    Unsupported,
    /// Any other operating-system error.
    OtherIo,
}

impl ErrorKind {
    /// True when the same request may succeed if tried again later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Network | ErrorKind::Timeout | ErrorKind::Throttled | ErrorKind::ServerError
        )
    }

    /// The kind of an operating-system error.
    pub fn of_io(e: &std::io::Error) -> ErrorKind {
        use std::io::ErrorKind as Io;
        match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => return ErrorKind::NoSpace,
            Some(libc::EEXIST) => return ErrorKind::AlreadyExists,
            _ => {}
        }
        match e.kind() {
            Io::NotFound => ErrorKind::NotFound,
            Io::PermissionDenied => ErrorKind::AccessDenied,
            Io::AlreadyExists => ErrorKind::AlreadyExists,
            Io::StorageFull | Io::QuotaExceeded => ErrorKind::NoSpace,
            Io::TimedOut => ErrorKind::Timeout,
            Io::Interrupted => ErrorKind::Interrupted,
            Io::ConnectionRefused
            | Io::ConnectionReset
            | Io::ConnectionAborted
            | Io::NotConnected
            | Io::BrokenPipe
            | Io::HostUnreachable
            | Io::NetworkUnreachable
            | Io::NetworkDown
            | Io::AddrNotAvailable
            | Io::UnexpectedEof => ErrorKind::Network,
            Io::InvalidInput | Io::InvalidFilename => ErrorKind::InvalidArgument,
            Io::InvalidData => ErrorKind::CorruptImage,
            Io::Unsupported => ErrorKind::Unsupported,
            _ => ErrorKind::OtherIo,
        }
    }
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

    pub fn storage(
        kind: ErrorKind,
        url: impl Into<String>,
        op: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Storage {
            kind,
            url: url.into(),
            op: op.into(),
            message: message.into(),
        }
    }

    /// What went wrong, for a program to act on.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } => ErrorKind::of_io(source),
            Error::Corrupt { .. } => ErrorKind::CorruptImage,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Invalid(_) => ErrorKind::InvalidArgument,
            Error::Storage { kind, .. } => *kind,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_kinds() {
        let io = |e: std::io::Error| Error::io(Path::new("f"), "write", e).kind();
        let os = |n| io(std::io::Error::from_raw_os_error(n));
        assert_eq!(os(libc::ENOSPC), ErrorKind::NoSpace);
        assert_eq!(os(libc::EDQUOT), ErrorKind::NoSpace);
        assert_eq!(os(libc::EEXIST), ErrorKind::AlreadyExists);
        assert_eq!(os(libc::ENOENT), ErrorKind::NotFound);
        assert_eq!(os(libc::EACCES), ErrorKind::AccessDenied);
        assert_eq!(os(libc::ECONNREFUSED), ErrorKind::Network);
        assert_eq!(os(libc::ETIMEDOUT), ErrorKind::Timeout);
        assert_eq!(os(libc::EINTR), ErrorKind::Interrupted);
        assert_eq!(os(libc::EIO), ErrorKind::OtherIo);
        assert_eq!(Error::invalid("x").kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            Error::corrupt(Path::new("f"), "header", 0, "bad").kind(),
            ErrorKind::CorruptImage
        );
        let e = Error::storage(ErrorKind::Throttled, "s3://b/k", "stat", "SlowDown");
        assert_eq!(e.to_string(), "s3://b/k: SlowDown");
        assert!(e.kind().is_retryable());
        assert!(!ErrorKind::AlreadyExists.is_retryable());
    }
}

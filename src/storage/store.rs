//! [`Store`]: one bucket (a local directory, S3, OSS or OBS) behind one object-safe interface of
//! blocking calls on the process's one tokio runtime ([`io_runtime`]); every call blocks the calling thread until
//! done, and may be made from several threads at once.
//!
//! What the backends guarantee:
//! - Reads, listings, small writes and deletes: all four, through OpenDAL (retried with jittered
//!   backoff, with connect and stall timeouts).
//! - [`Store::create_if_absent`]: exactly one of several racing writers of a key wins, the others
//!   fail with [`ErrorKind::AlreadyExists`]. Local: the object is written under a temporary name
//!   and hard-linked into place (`link` never replaces). S3 sends `If-None-Match: *`, OSS
//!   `x-oss-forbid-overwrite: true`; a server that ignores the condition would let every writer
//!   win, so the first use of a store writes a probe object twice and refuses (unsupported) when
//!   the second write is not refused. OBS has no such condition: unsupported.
//! - Multipart uploads that resume ([`Store::resumable`]): S3 (our own calls: the upload id and
//!   part numbers must outlive the process) and local (a temporary file renamed into place on
//!   completion; zeros in parts are left as holes). OSS and OBS upload through OpenDAL's multipart writer, which does not resume.
use super::local::Local;
use super::objects::Objects;

use super::location::{Location, Scheme, Settings};
use super::s3::{self, S3Client};
use bytes::Bytes;
use diskkit_formats::error::ErrorKind;
use diskkit_formats::{Error, Result};
use opendal::{Operator, services};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::SystemTime;

/// Largest object read whole into memory (manifests).
const MAX_SMALL_OBJECT: u64 = 256 << 20;

/// An object found by [`Store::list`].
#[derive(Debug, Clone)]
pub struct ObjectEntry {
    pub key: String,
    pub size: u64,
    pub modified: Option<SystemTime>,
}

/// What [`Store::stat`] knows of an object.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    pub size: u64,
    pub modified: Option<SystemTime>,
    /// The store's entity tag, quotes removed (S3: the MD5 of the content for a single-part
    /// upload without server-side encryption by KMS; `MD5-N` for multipart uploads).
    pub etag: Option<String>,
}

/// What a store holds of an unfinished upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadParts {
    /// The upload is gone (expired, aborted or completed).
    Gone,
    /// The parts it holds: number → ETag.
    Listed(BTreeMap<u32, String>),
    /// It exists but keeps no record of its parts (local): the uploader's record stands.
    Unlisted,
}

/// One bucket. See the module documentation for what each backend guarantees.
pub trait Store: Send + Sync {
    /// The URL of `key` in this bucket, for messages.
    fn url(&self, key: &str) -> String;

    /// The object `key`, or `None` when it does not exist.
    fn stat(&self, key: &str) -> Result<Option<ObjectMeta>>;

    /// Reads `len` bytes of object `key` at `offset` with one request and hands them to `f` in
    /// order as they arrive, as `(offset, bytes)` pieces staged in `piece` (the last may be
    /// shorter): each piece is still in the CPU cache while `f` works on it, and memory stays
    /// one piece per reader whatever `len` is.
    fn read_pieces(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        piece: &mut [u8],
        f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()>;

    /// Writes a small object in one request, replacing any object of that name.
    fn write(&self, key: &str, data: Vec<u8>) -> Result<()>;

    /// Writes a small object only if no object `key` exists; the loser of a race (or any later
    /// writer) gets [`ErrorKind::AlreadyExists`].
    fn create_if_absent(&self, key: &str, data: Vec<u8>) -> Result<()>;

    /// Objects under `prefix` (a key ending in `/`, or empty for the whole bucket),
    /// recursively, in key order (all pages of the listing).
    fn list(&self, prefix: &str) -> Result<Vec<ObjectEntry>>;

    /// Deletes the objects `keys` (in batches where the store offers them); missing ones are
    /// not an error.
    fn delete(&self, keys: &[String]) -> Result<()>;

    /// The error for object `key` not existing; says the bucket is missing when it is.
    fn no_such_object(&self, key: &str) -> Error;

    /// True when an interrupted upload can be resumed (the multipart calls below work).
    fn resumable(&self) -> bool;

    /// Starts a resumable upload of `key`; returns its upload id.
    fn create_upload(&self, key: &str) -> Result<String>;

    /// Sends part `number` (from 1), which starts at `offset` in the object; returns its ETag.
    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        offset: u64,
        data: Bytes,
    ) -> Result<String>;

    /// What the store holds of an unfinished upload.
    fn list_parts(&self, key: &str, upload_id: &str) -> Result<UploadParts>;

    /// Makes the uploaded parts (number, ETag; all of them, ascending) the object `key` of
    /// `size` bytes.
    fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
        size: u64,
    ) -> Result<()>;

    /// Abandons an unfinished upload and frees what it stored; one already gone is no error.
    fn abort_upload(&self, key: &str, upload_id: &str) -> Result<()>;

    /// Uploads `size` bytes to `key` in one go (stores without resumable uploads):
    /// `next_part` fills each part in order; `parallel` parts are in flight at once.
    fn upload_stream(
        &self,
        key: &str,
        size: u64,
        part_size: u64,
        parallel: usize,
        next_part: &mut dyn FnMut(u64, &mut Vec<u8>) -> Result<()>,
    ) -> Result<()>;

    /// Fills `buf` from object `key` at `offset`.
    fn read_at(&self, key: &str, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len() as u64;
        // One piece as large as the buffer: the bytes land in `buf` itself.
        self.read_pieces(key, offset, len, buf, &mut |_, _| Ok(()))
    }

    /// The whole of a small object (at most 256 MiB), or `None` when it does not exist.
    fn read_small(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let Some(meta) = self.stat(key)? else {
            return Ok(None);
        };
        if meta.size > MAX_SMALL_OBJECT {
            return Err(Error::storage(
                ErrorKind::InvalidArgument,
                self.url(key),
                "read",
                format!("{} bytes is too large for a manifest", meta.size),
            ));
        }
        let mut buf = vec![0; meta.size as usize];
        self.read_at(key, &mut buf, 0)?;
        Ok(Some(buf))
    }
}

/// The process's one async runtime, shared by every store (and any other HTTP client at the
/// storage edge, like share links): its two threads only drive requests (the engine's work stays on the read pool and the callers' threads), and a batch
/// worker with a store per bucket would otherwise start two threads per bucket. Started on first
/// use, never dropped (a runtime dropped inside another's context panics).
pub fn io_runtime() -> std::io::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("diskkit-io")
        .enable_all()
        .build()?;
    // One started meanwhile by another thread wins; this one is dropped (outside any runtime).
    Ok(RUNTIME.get_or_init(|| runtime))
}

/// Connects to the bucket of `location` (no request is made yet).
pub fn open(location: &Location, settings: &Settings) -> Result<Box<dyn Store>> {
    // OpenDAL's HTTP transport is process-wide; installing it again is a no-op.
    opendal::install_default();
    let url = location.with_key("").url();
    let runtime = io_runtime().map_err(|e| {
        Error::storage(
            ErrorKind::of_io(&e),
            &url,
            "start the I/O runtime",
            e.to_string(),
        )
    })?;
    let config = |e: opendal::Error| {
        Error::storage(
            ErrorKind::InvalidArgument,
            &url,
            "connect",
            s3::error_chain(&e),
        )
    };
    let scheme = location.scheme;
    let remote = |what: &str| -> Result<(String, String, String)> {
        let missing = |m: &str| Error::storage(ErrorKind::InvalidArgument, &url, "connect", m);
        let env = match scheme {
            Scheme::Oss => ("OSS_ENDPOINT", "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET"),
            _ => ("OBS_ENDPOINT", "OBS_ACCESS_KEY_ID", "OBS_SECRET_ACCESS_KEY"),
        };
        let endpoint = settings.endpoint.clone().ok_or_else(|| {
            missing(&format!(
                "no endpoint: set {}, --endpoint or \"endpoint\" in the profile (e.g. {what})",
                env.0
            ))
        })?;
        let (Some(key), Some(secret)) = (&settings.access_key_id, &settings.secret_access_key)
        else {
            return Err(Error::storage(
                ErrorKind::AccessDenied,
                &url,
                "sign in",
                format!(
                    "no credentials: set {} and {}, or \"access_key_id\" and \
                     \"secret_access_key\" in the profile (see diskkit push --help)",
                    env.1, env.2
                ),
            ));
        };
        Ok((endpoint, key.clone(), secret.clone()))
    };
    let (op, endpoint, client) = match scheme {
        Scheme::Local => {
            let dir = Path::new(&location.bucket);
            if !dir.is_dir() {
                return Err(Error::storage(
                    ErrorKind::NoSuchBucket,
                    &url,
                    "open",
                    format!(
                        "{}: no such directory (the local bucket must exist)",
                        dir.display()
                    ),
                ));
            }
            let root = std::path::absolute(dir).map_err(|e| Error::io(dir, "resolve", e))?;
            let op = Operator::new(services::Fs::default().root(&root.to_string_lossy()))
                .map_err(config)?;
            let objects = Objects::new(runtime, op, location, String::new());
            return Ok(Box::new(Bucket {
                objects,
                backend: Local { root },
            }));
        }
        Scheme::S3 => {
            let client = S3Client::new(settings, &location.bucket)?;
            let mut b = services::S3::default()
                .bucket(&location.bucket)
                .region(client.region())
                .endpoint(client.endpoint())
                .disable_config_load()
                .disable_ec2_metadata();
            if let Some(k) = &settings.access_key_id {
                b = b.access_key_id(k);
            }
            if let Some(s) = &settings.secret_access_key {
                b = b.secret_access_key(s);
            }
            if let Some(t) = &settings.session_token {
                b = b.session_token(t);
            }
            if settings.virtual_host {
                b = b.enable_virtual_host_style();
            }
            let endpoint = client.endpoint().to_string();
            (Operator::new(b).map_err(config)?, endpoint, Some(client))
        }
        Scheme::Oss => {
            let (endpoint, key, secret) = remote("https://oss-cn-hangzhou.aliyuncs.com")?;
            let b = services::Oss::default()
                .bucket(&location.bucket)
                .endpoint(&endpoint)
                .access_key_id(&key)
                .access_key_secret(&secret);
            (Operator::new(b).map_err(config)?, endpoint, None)
        }
        Scheme::Obs => {
            let (endpoint, key, secret) = remote("https://obs.cn-north-4.myhuaweicloud.com")?;
            let b = services::Obs::default()
                .bucket(&location.bucket)
                .endpoint(&endpoint)
                .access_key_id(&key)
                .secret_access_key(&secret);
            (Operator::new(b).map_err(config)?, endpoint, None)
        }
    };
    let objects = Objects::new(runtime, op, location, endpoint);
    Ok(match client {
        Some(client) => Box::new(Bucket {
            objects,
            backend: S3Uploads(client),
        }),
        None => Box::new(Bucket {
            objects,
            backend: Native,
        }),
    })
}

/// A bucket: objects through OpenDAL, uploads (and what differs between stores) through `B`.
struct Bucket<B> {
    objects: Objects,
    backend: B,
}

/// What differs between stores: uploads, create-if-absent, and explaining failures.
pub(super) trait Backend: Send + Sync {
    fn resumable(&self) -> bool;

    /// A clearer error for `e`, a failure of `key` (the server may say more when asked).
    fn explain(&self, _objects: &Objects, _key: &str, e: Error) -> Error {
        e
    }

    fn no_such_object(&self, objects: &Objects, key: &str) -> Error {
        Error::storage(
            ErrorKind::NotFound,
            objects.url(key),
            "stat",
            "no such object",
        )
    }

    /// Writes `data` as the whole object `key`, replacing it.
    fn write(&self, objects: &Objects, key: &str, data: Vec<u8>) -> Result<()> {
        objects.write(key, data)
    }

    fn create_if_absent(&self, objects: &Objects, key: &str, data: Vec<u8>) -> Result<()> {
        objects.create_if_absent(key, data)
    }

    fn create_upload(&self, objects: &Objects, key: &str) -> Result<String>;
    fn upload_part(
        &self,
        objects: &Objects,
        key: &str,
        upload_id: &str,
        number: u32,
        offset: u64,
        data: Bytes,
    ) -> Result<String>;
    fn list_parts(&self, objects: &Objects, key: &str, upload_id: &str) -> Result<UploadParts>;
    fn complete_upload(
        &self,
        objects: &Objects,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
        size: u64,
    ) -> Result<()>;
    fn abort_upload(&self, objects: &Objects, key: &str, upload_id: &str) -> Result<()>;
}

impl<B: Backend> Bucket<B> {
    /// `result` with its error explained by the backend (what to do about it, for `key`).
    fn explained<T>(&self, key: &str, result: Result<T>) -> Result<T> {
        result.map_err(|e| self.backend.explain(&self.objects, key, e))
    }
}

impl<B: Backend> Store for Bucket<B> {
    fn url(&self, key: &str) -> String {
        self.objects.url(key)
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.explained(key, self.objects.stat(key))
    }

    fn read_pieces(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        piece: &mut [u8],
        f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let read = self.objects.read_pieces(key, offset, len, piece, f);
        self.explained(key, read)
    }

    fn write(&self, key: &str, data: Vec<u8>) -> Result<()> {
        self.explained(key, self.backend.write(&self.objects, key, data))
    }

    fn create_if_absent(&self, key: &str, data: Vec<u8>) -> Result<()> {
        let created = self.backend.create_if_absent(&self.objects, key, data);
        self.explained(key, created)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectEntry>> {
        self.explained(prefix, self.objects.list(prefix))
    }

    fn delete(&self, keys: &[String]) -> Result<()> {
        let first = keys.first().map_or("", String::as_str);
        self.explained(first, self.objects.delete(keys))
    }

    fn no_such_object(&self, key: &str) -> Error {
        self.backend.no_such_object(&self.objects, key)
    }

    fn resumable(&self) -> bool {
        self.backend.resumable()
    }

    fn create_upload(&self, key: &str) -> Result<String> {
        self.backend.create_upload(&self.objects, key)
    }

    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        offset: u64,
        data: Bytes,
    ) -> Result<String> {
        self.backend
            .upload_part(&self.objects, key, upload_id, number, offset, data)
    }

    fn list_parts(&self, key: &str, upload_id: &str) -> Result<UploadParts> {
        self.backend.list_parts(&self.objects, key, upload_id)
    }

    fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
        size: u64,
    ) -> Result<()> {
        self.backend
            .complete_upload(&self.objects, key, upload_id, parts, size)?;
        self.objects.check_completed(key, size)
    }

    fn abort_upload(&self, key: &str, upload_id: &str) -> Result<()> {
        self.backend.abort_upload(&self.objects, key, upload_id)
    }

    fn upload_stream(
        &self,
        key: &str,
        size: u64,
        part_size: u64,
        parallel: usize,
        next_part: &mut dyn FnMut(u64, &mut Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let uploaded = self
            .objects
            .upload_stream(key, size, part_size, parallel, next_part);
        self.explained(key, uploaded)
    }
}

/// S3: multipart uploads through our own calls; failures OpenDAL reports without the server's
/// reason are explained by asking the server about the bucket.
struct S3Uploads(S3Client);

impl Backend for S3Uploads {
    fn resumable(&self) -> bool {
        true
    }

    fn explain(&self, objects: &Objects, key: &str, e: Error) -> Error {
        // The server answered but OpenDAL keeps the reply's status and headers to itself: the
        // bucket check gets the server's own reason (no bucket, wrong key or region).
        // Only the kinds OpenDAL gives a refusal it cannot name (no bucket: invalid
        // configuration; wrong region: other) are worth the extra request.
        if !matches!(
            e.kind(),
            ErrorKind::AccessDenied | ErrorKind::InvalidArgument | ErrorKind::OtherIo
        ) {
            return e;
        }
        match objects.runtime.block_on(self.0.check_bucket(key)) {
            Err(diagnosed) if !diagnosed.kind().is_retryable() => diagnosed,
            _ => e,
        }
    }

    fn no_such_object(&self, objects: &Objects, key: &str) -> Error {
        match objects.runtime.block_on(self.0.check_bucket(key)) {
            Err(e) if e.kind() == ErrorKind::NoSuchBucket => e,
            _ => Error::storage(
                ErrorKind::NotFound,
                objects.url(key),
                "stat",
                "no such object",
            ),
        }
    }

    fn create_upload(&self, objects: &Objects, key: &str) -> Result<String> {
        objects.runtime.block_on(self.0.create_upload(key))
    }

    fn upload_part(
        &self,
        objects: &Objects,
        key: &str,
        upload_id: &str,
        number: u32,
        _offset: u64,
        data: Bytes,
    ) -> Result<String> {
        objects
            .runtime
            .block_on(self.0.upload_part(key, upload_id, number, data))
    }

    fn list_parts(&self, objects: &Objects, key: &str, upload_id: &str) -> Result<UploadParts> {
        let parts = objects
            .runtime
            .block_on(self.0.list_parts(key, upload_id))?;
        Ok(parts.map_or(UploadParts::Gone, UploadParts::Listed))
    }

    fn complete_upload(
        &self,
        objects: &Objects,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
        _size: u64,
    ) -> Result<()> {
        objects
            .runtime
            .block_on(self.0.complete(key, upload_id, parts))
    }

    fn abort_upload(&self, objects: &Objects, key: &str, upload_id: &str) -> Result<()> {
        objects.runtime.block_on(self.0.abort(key, upload_id))
    }
}

/// OSS and OBS: OpenDAL's own multipart writer, not resumable.
struct Native;

impl Backend for Native {
    fn resumable(&self) -> bool {
        false
    }

    fn create_upload(&self, objects: &Objects, key: &str) -> Result<String> {
        Err(objects.not_resumable(key))
    }

    fn upload_part(
        &self,
        objects: &Objects,
        key: &str,
        _upload_id: &str,
        _number: u32,
        _offset: u64,
        _data: Bytes,
    ) -> Result<String> {
        Err(objects.not_resumable(key))
    }

    fn list_parts(&self, objects: &Objects, key: &str, _upload_id: &str) -> Result<UploadParts> {
        Err(objects.not_resumable(key))
    }

    fn complete_upload(
        &self,
        objects: &Objects,
        key: &str,
        _upload_id: &str,
        _parts: &[(u32, String)],
        _size: u64,
    ) -> Result<()> {
        Err(objects.not_resumable(key))
    }

    fn abort_upload(&self, objects: &Objects, key: &str, _upload_id: &str) -> Result<()> {
        Err(objects.not_resumable(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_range_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(dir.path().join("obj"), &content).unwrap();
        let url = format!("{}/obj", dir.path().display());
        let location = Location::parse(&url).unwrap();
        let store = open(&location, &Settings::default()).unwrap();
        let (mut seen, mut piece) = (Vec::new(), vec![0; 4096]);
        store
            .read_pieces(&location.key, 100, 9000, &mut piece, &mut |at, piece| {
                assert_eq!(at, 100 + seen.len() as u64);
                assert!(
                    piece.len() == 4096 || seen.len() == 8192,
                    "piece of {}",
                    piece.len()
                );
                seen.extend_from_slice(piece);
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, content[100..9100]);
        assert!(
            store
                .read_pieces(&location.key, 0, 10, &mut [], &mut |_, _| Ok(()))
                .is_err()
        );
        let mut short = |_: u64, _: &[u8]| Ok(());
        assert!(
            store
                .read_pieces(&location.key, 9000, 2000, &mut piece, &mut short)
                .is_err()
        );
    }

    #[test]
    fn opendal_errors_have_kinds() {
        let runtime = io_runtime().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let op =
            Operator::new(services::Fs::default().root(&dir.path().to_string_lossy())).unwrap();
        let location = Location::parse("s3://b/").unwrap();
        let o = Objects::new(runtime, op, &location, "http://127.0.0.1:9".into());
        let e = o.error(
            "k",
            "stat",
            opendal::Error::new(opendal::ErrorKind::NotFound, "gone"),
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().ends_with("(no such object or bucket)"), "{e}");
        let denied = opendal::Error::new(opendal::ErrorKind::PermissionDenied, "no");
        assert_eq!(o.error("k", "stat", denied).kind(), ErrorKind::AccessDenied);
        let slow = opendal::Error::new(opendal::ErrorKind::RateLimited, "slow");
        assert!(o.error("k", "stat", slow).kind().is_retryable());
        let full = opendal::Error::new(opendal::ErrorKind::Unexpected, "write")
            .set_source(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(o.error("k", "write", full).kind(), ErrorKind::NoSpace);
        let refused = opendal::Error::new(opendal::ErrorKind::Unexpected, "send")
            .set_source(std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
        let e = o.error("k", "list", refused);
        assert_eq!(e.kind(), ErrorKind::Network);
        assert!(
            e.to_string()
                .starts_with("s3://b/k: cannot reach the endpoint http://127.0.0.1:9 after 4"),
            "{e}"
        );
    }
}

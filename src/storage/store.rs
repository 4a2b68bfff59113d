//! [`Store`]: one bucket (a local directory, S3, OSS or OBS) behind one object-safe interface of
//! blocking calls. A store owns its tokio runtime; every call blocks the calling thread until
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

use super::location::{Location, Scheme, Settings};
use super::s3::{self, S3Client};
use bytes::Bytes;
use diskkit_formats::error::ErrorKind;
use diskkit_formats::{Error, Result};
use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::{Operator, services};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

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

/// Connects to the bucket of `location` (no request is made yet).
pub fn open(location: &Location, settings: &Settings) -> Result<Box<dyn Store>> {
    // OpenDAL's HTTP transport is process-wide; installing it again is a no-op.
    opendal::install_default();
    let url = location.with_key("").url();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
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

/// The OpenDAL half of a store: reads, listings, writes, deletes.
struct Objects {
    runtime: tokio::runtime::Runtime,
    op: Operator,
    location: Location,
    /// The server, for messages (empty for a local bucket).
    endpoint: String,
    /// Whether the server honours create-if-absent (probed on first use).
    condition_honoured: OnceLock<bool>,
}

impl Objects {
    fn new(
        runtime: tokio::runtime::Runtime,
        op: Operator,
        location: &Location,
        endpoint: String,
    ) -> Objects {
        let op = op
            .layer(
                TimeoutLayer::new()
                    .with_timeout(Duration::from_secs(120))
                    .with_io_timeout(s3::READ_TIMEOUT),
            )
            .layer(
                RetryLayer::new()
                    .with_max_times(s3::ATTEMPTS as usize - 1)
                    .with_min_delay(s3::FIRST_BACKOFF)
                    .with_jitter(),
            );
        Objects {
            runtime,
            op,
            location: location.clone(),
            endpoint,
            condition_honoured: OnceLock::new(),
        }
    }

    fn url(&self, key: &str) -> String {
        self.location.with_key(key).url()
    }

    /// The error for OpenDAL's `e` during `op` on `key`: its kind from OpenDAL's kind and the
    /// I/O or HTTP error under it; the message with what to do.
    fn error(&self, key: &str, op: &str, e: opendal::Error) -> Error {
        let url = self.url(key);
        if let Some((kind, cause)) = transport_failure(&e) {
            if self.endpoint.is_empty() {
                return Error::storage(kind, url, op, s3::error_chain(&e));
            }
            return s3::unreachable(kind, &url, op, &self.endpoint, s3::ATTEMPTS, cause);
        }
        use opendal::ErrorKind as Dal;
        let (kind, hint) = match e.kind() {
            Dal::NotFound => (ErrorKind::NotFound, " (no such object or bucket)"),
            Dal::PermissionDenied => (
                ErrorKind::AccessDenied,
                " (check the credentials: the access key and secret, or the profile)",
            ),
            Dal::AlreadyExists | Dal::ConditionNotMatch => (ErrorKind::AlreadyExists, ""),
            Dal::RateLimited => (ErrorKind::Throttled, ""),
            Dal::Unsupported => (ErrorKind::Unsupported, ""),
            Dal::ConfigInvalid => (ErrorKind::InvalidArgument, ""),
            _ if e.is_temporary() => (ErrorKind::ServerError, ""),
            _ => (ErrorKind::OtherIo, ""),
        };
        Error::storage(kind, url, op, format!("{}{hint}", s3::error_chain(&e)))
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectMeta>> {
        match self.runtime.block_on(self.op.stat(key)) {
            Ok(m) => Ok(Some(ObjectMeta {
                size: m.content_length(),
                modified: m.last_modified().map(SystemTime::from),
                etag: m.etag().map(|t| t.trim_matches('"').to_string()),
            })),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.error(key, "stat", e)),
        }
    }

    fn read_pieces(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        piece: &mut [u8],
        f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        if piece.is_empty() {
            return Err(Error::invalid("read_pieces needs a buffer"));
        }
        let mut body = self.body(key, offset, len)?;
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let want = (piece.len() as u64).min(end - at) as usize;
            body.fill(self, &mut piece[..want])?;
            f(at, &piece[..want])?;
            at += want as u64;
        }
        Ok(())
    }

    /// The response to a request for `len` bytes of object `key` at `offset`, not yet read.
    fn body(&self, key: &str, offset: u64, len: u64) -> Result<Body> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::invalid("read range overflows"))?;
        let stream = self
            .runtime
            .block_on(async {
                self.op
                    .reader_with(key)
                    .await?
                    .into_stream(offset..end)
                    .await
            })
            .map_err(|e| self.error(key, "read", e))?;
        Ok(Body {
            key: key.to_owned(),
            stream,
            rest: opendal::Buffer::new(),
            start: offset,
            len,
            received: 0,
        })
    }

    fn write(&self, key: &str, data: Vec<u8>) -> Result<()> {
        self.runtime
            .block_on(self.op.write(key, data))
            .map(|_| ())
            .map_err(|e| self.error(key, "write", e))
    }

    /// A conditional write, after checking once that the server honours the condition.
    fn create_if_absent(&self, key: &str, data: Vec<u8>) -> Result<()> {
        if !*self
            .condition_honoured
            .get_or_init(|| self.probe_condition())
        {
            return Err(Error::storage(
                ErrorKind::Unsupported,
                self.url(key),
                "create if absent",
                format!(
                    "the server at {} ignores conditional writes (If-None-Match): it cannot \
                     guarantee that only one writer creates an object",
                    self.endpoint
                ),
            ));
        }
        self.conditional_write(key, data)
    }

    fn conditional_write(&self, key: &str, data: Vec<u8>) -> Result<()> {
        self.runtime
            .block_on(async { self.op.write_with(key, data).if_not_exists(true).await })
            .map(|_| ())
            .map_err(|e| self.error(key, "create if absent", e))
    }

    /// Writes a probe object twice with the condition: true when the second write is refused.
    /// Other failures (no permission, unsupported) are left for the real write to report.
    fn probe_condition(&self) -> bool {
        let nanos = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let key = format!(".diskkit-condition-probe-{}-{nanos:x}", std::process::id());
        if self.conditional_write(&key, b"1".to_vec()).is_err() {
            return true;
        }
        let second = self.conditional_write(&key, b"2".to_vec());
        // Best effort: a leftover probe is a few bytes.
        let _ = self.delete(&[key]);
        second.is_err()
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectEntry>> {
        let entries = self
            .runtime
            .block_on(async { self.op.list_with(prefix).recursive(true).await })
            .map_err(|e| self.error(prefix, "list", e))?;
        let mut out = Vec::new();
        for e in entries {
            if !e.metadata().is_file() {
                continue;
            }
            let (size, modified) = match e.metadata().content_length() {
                // Some listings (local directories) carry no size: ask for it.
                0 => self
                    .stat(e.path())?
                    .map_or((0, None), |m| (m.size, m.modified)),
                n => (n, e.metadata().last_modified().map(SystemTime::from)),
            };
            out.push(ObjectEntry {
                key: e.path().to_string(),
                size,
                modified,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, keys: &[String]) -> Result<()> {
        let first = keys.first().map_or("", String::as_str);
        self.runtime
            .block_on(self.op.delete_iter(keys.iter().map(String::as_str)))
            .map_err(|e| self.error(first, "delete", e))
    }

    /// Uploads with OpenDAL's multipart writer.
    fn upload_stream(
        &self,
        key: &str,
        size: u64,
        part_size: u64,
        parallel: usize,
        next_part: &mut dyn FnMut(u64, &mut Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let mut writer = self
            .runtime
            .block_on(async {
                self.op
                    .writer_with(key)
                    .chunk(part_size as usize)
                    .concurrent(parallel)
                    .await
            })
            .map_err(|e| self.error(key, "upload", e))?;
        let result = (|| {
            let mut offset = 0;
            while offset < size {
                let mut buf = Vec::new();
                next_part(offset, &mut buf)?;
                offset += buf.len() as u64;
                self.runtime
                    .block_on(writer.write(buf))
                    .map_err(|e| self.error(key, "upload", e))?;
            }
            self.runtime
                .block_on(writer.close())
                .map_err(|e| self.error(key, "complete upload", e))
        })();
        if result.is_err() {
            // Best effort: the write already failed, and that error is the one to report.
            let _ = self.runtime.block_on(writer.abort());
        }
        result.map(|_| ())
    }

    /// Checks that the completed object has `size` bytes.
    fn check_completed(&self, key: &str, size: u64) -> Result<()> {
        match self.stat(key)? {
            Some(m) if m.size == size => Ok(()),
            found => Err(Error::storage(
                ErrorKind::ServerError,
                self.url(key),
                "complete upload",
                format!(
                    "after completing the upload the object has {:?} bytes, expected {size}",
                    found.map(|m| m.size)
                ),
            )),
        }
    }

    fn not_resumable(&self, key: &str) -> Error {
        Error::storage(
            ErrorKind::Unsupported,
            self.url(key),
            "upload",
            "resumable uploads need an s3:// or local bucket",
        )
    }
}

/// A failure to talk to the server at all (refused, reset, timed out) or of the local
/// filesystem, found in the causes of `e`: its kind and that cause (what the user needs to
/// read, without OpenDAL's context); `None` when the server answered.
fn transport_failure(
    e: &opendal::Error,
) -> Option<(ErrorKind, &(dyn std::error::Error + 'static))> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<reqwest::Error>() {
            if r.is_timeout() {
                return Some((ErrorKind::Timeout, c));
            }
            if r.is_connect() || r.is_request() || r.is_body() {
                return Some((ErrorKind::Network, c));
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some((ErrorKind::of_io(io), c));
        }
        cause = c.source();
    }
    None
}

/// What differs between stores: uploads, create-if-absent, and explaining failures.
trait Backend: Send + Sync {
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

impl<B: Backend> Store for Bucket<B> {
    fn url(&self, key: &str) -> String {
        self.objects.url(key)
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let o = &self.objects;
        o.stat(key).map_err(|e| self.backend.explain(o, key, e))
    }

    fn read_pieces(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        piece: &mut [u8],
        f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let o = &self.objects;
        o.read_pieces(key, offset, len, piece, f)
            .map_err(|e| self.backend.explain(o, key, e))
    }

    fn write(&self, key: &str, data: Vec<u8>) -> Result<()> {
        let o = &self.objects;
        o.write(key, data)
            .map_err(|e| self.backend.explain(o, key, e))
    }

    fn create_if_absent(&self, key: &str, data: Vec<u8>) -> Result<()> {
        let o = &self.objects;
        self.backend
            .create_if_absent(o, key, data)
            .map_err(|e| self.backend.explain(o, key, e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectEntry>> {
        let o = &self.objects;
        o.list(prefix)
            .map_err(|e| self.backend.explain(o, prefix, e))
    }

    fn delete(&self, keys: &[String]) -> Result<()> {
        let o = &self.objects;
        let first = keys.first().map_or("", String::as_str);
        o.delete(keys)
            .map_err(|e| self.backend.explain(o, first, e))
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
        let o = &self.objects;
        o.upload_stream(key, size, part_size, parallel, next_part)
            .map_err(|e| self.backend.explain(o, key, e))
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

/// A local directory: uploads go to a hidden temporary file next to the object, linked into
/// place when complete.
struct Local {
    root: PathBuf,
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
        File::create_new(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        Ok((id, tmp, path))
    }
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
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, "sync", e))?;
    }
    Ok(())
}

/// Bytes of zeros a local part leaves as a hole instead of writing them.
const HOLE_GRAIN: usize = 64 << 10;

impl Backend for Local {
    fn resumable(&self) -> bool {
        true
    }

    fn create_if_absent(&self, objects: &Objects, key: &str, data: Vec<u8>) -> Result<()> {
        let (_, tmp, path) = self.new_temp(objects, key)?;
        let written = (|| {
            let f = OpenOptions::new().write(true).open(&tmp)?;
            f.write_all_at(&data, 0)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            // Best effort: the write failed, and that error is the one to report.
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&tmp, "write", e));
        }
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
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(dir, "sync", e))?;
        }
        Ok(())
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

/// A ranged read's response, consumed in order. A body cut short by the network is resumed
/// where it stopped (OpenDAL's retry layer); one that ends early is an error.
struct Body {
    key: String,
    stream: opendal::BufferStream,
    /// Received bytes not handed out yet.
    rest: opendal::Buffer,
    start: u64,
    len: u64,
    /// Bytes handed out so far.
    received: u64,
}

impl Body {
    /// Fills `buf` with the next bytes of the body (callers ask for `len` bytes in all).
    fn fill(&mut self, objects: &Objects, buf: &mut [u8]) -> Result<()> {
        use bytes::Buf;
        use futures::TryStreamExt;
        let mut filled = 0;
        objects
            .runtime
            .block_on(async {
                while filled < buf.len() {
                    if !self.rest.has_remaining() {
                        match self.stream.try_next().await? {
                            Some(b) => self.rest = b,
                            None => break,
                        }
                    }
                    let received = self.rest.chunk();
                    let n = (buf.len() - filled).min(received.len());
                    buf[filled..filled + n].copy_from_slice(&received[..n]);
                    self.rest.advance(n);
                    filled += n;
                }
                Ok(())
            })
            .map_err(|e| objects.error(&self.key, "read", e))?;
        self.received += filled as u64;
        if filled < buf.len() {
            return Err(Error::storage(
                ErrorKind::CorruptImage,
                objects.url(&self.key),
                "read",
                format!(
                    "short read at {}: {} of {} bytes (object changed?)",
                    self.start, self.received, self.len,
                ),
            ));
        }
        Ok(())
    }
}

/// True for the temporary files of unfinished local uploads, which listings skip.
pub fn is_upload_temp(key: &str) -> bool {
    key.contains(".diskkit-upload-")
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
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
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

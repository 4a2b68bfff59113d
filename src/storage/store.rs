//! [`Store`]: the blocking facade over one bucket. It owns the tokio runtime; every call blocks
//! the calling thread until done, and may be made from several threads at once.

use super::location::{Location, Scheme, Settings};
use super::s3::{self, S3Client};
use bytes::Bytes;
use diskkit_formats::{Error, Result};
use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::{ErrorKind, Operator, services};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// Largest object read whole into memory (manifests).
const MAX_SMALL_OBJECT: u64 = 256 << 20;

/// An object found by [`Store::list`].
#[derive(Debug, Clone)]
pub struct ObjectEntry {
    pub key: String,
    pub size: u64,
}

/// How multipart uploads are made.
enum Uploads {
    /// S3 multipart calls of our own: resumable.
    S3(S3Client),
    /// A temporary file in the bucket directory, renamed into place: resumable.
    Local(PathBuf),
    /// OpenDAL's multipart writer (OSS, OBS): parallel but not resumable.
    Native,
}

pub struct Store {
    runtime: tokio::runtime::Runtime,
    op: Operator,
    uploads: Uploads,
    location: Location,
}

impl Store {
    /// Connects to the bucket of `location` (no request is made yet).
    pub fn open(location: &Location, settings: &Settings) -> Result<Store> {
        // OpenDAL's HTTP transport is process-wide; installing it again is a no-op.
        opendal::install_default();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::invalid(format!("cannot start the I/O runtime: {e}")))?;
        let config = |e: opendal::Error| Error::invalid(format!("{}: {e}", location.url()));
        let (op, uploads) = match location.scheme {
            Scheme::Local => {
                let dir = Path::new(&location.bucket);
                if !dir.is_dir() {
                    return Err(Error::invalid(format!(
                        "{}: no such directory (the local bucket must exist)",
                        dir.display()
                    )));
                }
                let root = std::path::absolute(dir).map_err(|e| Error::io(dir, "resolve", e))?;
                let op = Operator::new(services::Fs::default().root(&root.to_string_lossy()))
                    .map_err(config)?;
                (op, Uploads::Local(root))
            }
            Scheme::S3 => {
                let client = S3Client::new(settings, &location.bucket)?;
                let mut b = services::S3::default()
                    .bucket(&location.bucket)
                    .region(settings.region.as_deref().unwrap_or("us-east-1"))
                    .disable_config_load()
                    .disable_ec2_metadata();
                if let Some(e) = &settings.endpoint {
                    b = b.endpoint(e);
                }
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
                (Operator::new(b).map_err(config)?, Uploads::S3(client))
            }
            Scheme::Oss => {
                let mut b = services::Oss::default().bucket(&location.bucket);
                if let Some(e) = &settings.endpoint {
                    b = b.endpoint(e);
                }
                if let Some(k) = &settings.access_key_id {
                    b = b.access_key_id(k);
                }
                if let Some(s) = &settings.secret_access_key {
                    b = b.access_key_secret(s);
                }
                (Operator::new(b).map_err(config)?, Uploads::Native)
            }
            Scheme::Obs => {
                let mut b = services::Obs::default().bucket(&location.bucket);
                if let Some(e) = &settings.endpoint {
                    b = b.endpoint(e);
                }
                if let Some(k) = &settings.access_key_id {
                    b = b.access_key_id(k);
                }
                if let Some(s) = &settings.secret_access_key {
                    b = b.secret_access_key(s);
                }
                (Operator::new(b).map_err(config)?, Uploads::Native)
            }
        };
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
        Ok(Store {
            runtime,
            op,
            uploads,
            location: location.clone(),
        })
    }

    /// True when an interrupted upload can be resumed.
    pub fn resumable(&self) -> bool {
        !matches!(self.uploads, Uploads::Native)
    }

    fn url(&self, key: &str) -> String {
        self.location.with_key(key).url()
    }

    /// A clear message for an OpenDAL error on `key`.
    fn error(&self, key: &str, e: opendal::Error) -> Error {
        let signed_for = match &self.uploads {
            Uploads::S3(c) => c.region(),
            _ => "",
        };
        Error::invalid(format!("{}: {}", self.url(key), explain(&e, signed_for)))
    }

    /// The error for object `key` not existing; says the bucket is missing when it is.
    pub fn no_such_object(&self, key: &str) -> Error {
        if let Uploads::S3(c) = &self.uploads
            && let Ok(false) = self.runtime.block_on(c.bucket_exists())
        {
            let what = s3::explain(
                reqwest::StatusCode::NOT_FOUND,
                Some("NoSuchBucket"),
                &format!("bucket '{}' does not exist", self.location.bucket),
                None,
                c.region(),
            );
            return Error::invalid(format!("{}: {what}", self.url(key)));
        }
        Error::invalid(format!("{}: no such object", self.url(key)))
    }

    /// Size of object `key`, or `None` when it does not exist.
    pub fn stat(&self, key: &str) -> Result<Option<u64>> {
        match self.runtime.block_on(self.op.stat(key)) {
            Ok(m) => Ok(Some(m.content_length())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.error(key, e)),
        }
    }

    /// Fills `buf` from object `key` at `offset`, streamed straight into it.
    pub fn read_at(&self, key: &str, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut body = self.body(key, offset, buf.len() as u64)?;
        body.fill(self, buf)
    }

    /// Reads `len` bytes of object `key` at `offset` with one request and hands them to `f` in
    /// order as they arrive, as `(offset, bytes)` pieces staged in `piece` (the last may be
    /// shorter): each piece is still in the CPU cache while `f` works on it, and memory stays
    /// one piece per reader whatever `len` is.
    pub fn read_pieces(
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
            .map_err(|e| self.error(key, e))?;
        Ok(Body {
            key: key.to_owned(),
            stream,
            rest: opendal::Buffer::new(),
            start: offset,
            len,
            received: 0,
        })
    }

    /// The whole of a small object (at most 256 MiB), or `None` when it does not exist.
    pub fn read_small(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let Some(size) = self.stat(key)? else {
            return Ok(None);
        };
        if size > MAX_SMALL_OBJECT {
            return Err(Error::invalid(format!(
                "{}: {size} bytes is too large for a manifest",
                self.url(key)
            )));
        }
        let mut buf = vec![0; size as usize];
        self.read_at(key, &mut buf, 0)?;
        Ok(Some(buf))
    }

    /// Writes a small object in one request.
    pub fn write_small(&self, key: &str, data: Vec<u8>) -> Result<()> {
        self.runtime
            .block_on(self.op.write(key, data))
            .map(|_| ())
            .map_err(|e| self.error(key, e))
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        self.runtime
            .block_on(self.op.delete(key))
            .map_err(|e| self.error(key, e))
    }

    /// Objects under `prefix` (a key ending in `/`, or empty for the whole bucket), recursively.
    pub fn list(&self, prefix: &str) -> Result<Vec<ObjectEntry>> {
        let entries = self
            .runtime
            .block_on(async { self.op.list_with(prefix).recursive(true).await })
            .map_err(|e| self.error(prefix, e))?;
        let mut out = Vec::new();
        for e in entries {
            if !e.metadata().is_file() {
                continue;
            }
            let size = match e.metadata().content_length() {
                0 => self.stat(e.path())?.unwrap_or(0),
                n => n,
            };
            out.push(ObjectEntry {
                key: e.path().to_string(),
                size,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Starts a resumable upload of `key`; returns its upload id.
    pub fn create_upload(&self, key: &str) -> Result<String> {
        match &self.uploads {
            Uploads::S3(c) => self.runtime.block_on(c.create_upload(key)),
            Uploads::Local(root) => {
                let path = local_path(root, key)?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create", e))?;
                }
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                let id = format!("{}-{nanos:x}", std::process::id());
                let tmp = local_upload_path(&path, &id);
                File::create_new(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
                Ok(id)
            }
            Uploads::Native => Err(self.not_resumable(key)),
        }
    }

    /// Sends part `number` (from 1), which starts at `offset` in the object; returns its ETag.
    pub fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        offset: u64,
        data: Bytes,
    ) -> Result<String> {
        match &self.uploads {
            Uploads::S3(c) => self
                .runtime
                .block_on(c.upload_part(key, upload_id, number, data)),
            Uploads::Local(root) => {
                let tmp = local_upload_path(&local_path(root, key)?, upload_id);
                let f = OpenOptions::new()
                    .write(true)
                    .open(&tmp)
                    .map_err(|e| self.gone_upload(key, &tmp, e))?;
                f.write_all_at(&data, offset)
                    .map_err(|e| Error::io(&tmp, format!("write part {number}"), e))?;
                f.sync_data()
                    .map_err(|e| Error::io(&tmp, format!("sync part {number}"), e))?;
                Ok(String::new())
            }
            Uploads::Native => Err(self.not_resumable(key)),
        }
    }

    fn not_resumable(&self, key: &str) -> Error {
        Error::invalid(format!(
            "{}: resumable uploads need an s3:// or local bucket",
            self.url(key)
        ))
    }

    fn gone_upload(&self, key: &str, tmp: &Path, e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::invalid(format!(
                "{}: the unfinished upload {} is gone: run diskkit push --abort URL, then push again",
                self.url(key),
                tmp.display()
            ))
        } else {
            Error::io(tmp, "open", e)
        }
    }

    /// Makes the uploaded parts (number, ETag; all of them, ascending) the object `key` of
    /// `size` bytes.
    pub fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
        size: u64,
    ) -> Result<()> {
        match &self.uploads {
            Uploads::S3(c) => self.runtime.block_on(c.complete(key, upload_id, parts))?,
            Uploads::Local(root) => {
                let path = local_path(root, key)?;
                let tmp = local_upload_path(&path, upload_id);
                let f = OpenOptions::new()
                    .write(true)
                    .open(&tmp)
                    .map_err(|e| self.gone_upload(key, &tmp, e))?;
                f.set_len(size)
                    .map_err(|e| Error::io(&tmp, "set length", e))?;
                f.sync_all().map_err(|e| Error::io(&tmp, "sync", e))?;
                std::fs::rename(&tmp, &path)
                    .map_err(|e| Error::io(&path, "rename into place", e))?;
                if let Some(dir) = path.parent() {
                    File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| Error::io(dir, "sync", e))?;
                }
            }
            Uploads::Native => return Err(self.not_resumable(key)),
        }
        match self.stat(key)? {
            Some(n) if n == size => Ok(()),
            found => Err(Error::invalid(format!(
                "{}: after completing the upload the object has {found:?} bytes, expected {size}",
                self.url(key)
            ))),
        }
    }

    /// Whether an unfinished upload can still be resumed: it may have expired or been aborted
    /// on the server (or its local temporary file removed) since the checkpoint was written.
    pub fn upload_exists(&self, key: &str, upload_id: &str) -> Result<bool> {
        match &self.uploads {
            Uploads::S3(c) => self.runtime.block_on(c.upload_exists(key, upload_id)),
            Uploads::Local(root) => {
                Ok(local_upload_path(&local_path(root, key)?, upload_id).exists())
            }
            Uploads::Native => Err(self.not_resumable(key)),
        }
    }

    /// Abandons an unfinished upload and frees what it stored.
    pub fn abort_upload(&self, key: &str, upload_id: &str) -> Result<()> {
        match &self.uploads {
            Uploads::S3(c) => self.runtime.block_on(c.abort(key, upload_id)),
            Uploads::Local(root) => {
                let tmp = local_upload_path(&local_path(root, key)?, upload_id);
                match std::fs::remove_file(&tmp) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(Error::io(&tmp, "remove", e))
                    }
                    _ => Ok(()),
                }
            }
            Uploads::Native => Err(self.not_resumable(key)),
        }
    }

    /// Uploads `size` bytes to `key` with OpenDAL's multipart writer (stores without resumable
    /// uploads): `next_part` fills each part in order; `parallel` parts are in flight at once.
    pub fn upload_stream(
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
            .map_err(|e| self.error(key, e))?;
        let result = (|| {
            let mut offset = 0;
            while offset < size {
                let mut buf = Vec::new();
                next_part(offset, &mut buf)?;
                offset += buf.len() as u64;
                self.runtime
                    .block_on(writer.write(buf))
                    .map_err(|e| self.error(key, e))?;
            }
            self.runtime
                .block_on(writer.close())
                .map_err(|e| self.error(key, e))
        })();
        if result.is_err() {
            // Best effort: the write already failed, and that error is the one to report.
            let _ = self.runtime.block_on(writer.abort());
        }
        result.map(|_| ())
    }
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
    fn fill(&mut self, store: &Store, buf: &mut [u8]) -> Result<()> {
        use bytes::Buf;
        use futures::TryStreamExt;
        let mut filled = 0;
        store
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
            .map_err(|e| store.error(&self.key, e))?;
        self.received += filled as u64;
        if filled < buf.len() {
            return Err(Error::invalid(format!(
                "{}: short read at {}: {} of {} bytes (object changed?)",
                store.url(&self.key),
                self.start,
                self.received,
                self.len,
            )));
        }
        Ok(())
    }
}

/// What an OpenDAL error says: for an S3 error reply, the server's code and message with what to
/// do (`signed_for`: the region the request was signed for); else the whole chain of causes.
fn explain(e: &opendal::Error, signed_for: &str) -> String {
    // OpenDAL's message carries the whole HTTP context (the parsed reply, the response status
    // and headers); the server's code and message are what says what went wrong.
    let text = e.to_string();
    let quoted = |field: &str| {
        let start = text.find(&format!("{field}: \""))? + field.len() + 3;
        text[start..].split('"').next().map(str::to_string)
    };
    let status = text
        .find("status: ")
        .and_then(|i| text.get(i + 8..i + 11))
        .and_then(|s| s.parse().ok())
        .and_then(|s| reqwest::StatusCode::from_u16(s).ok());
    if let Some(status) = status {
        return s3::explain(
            status,
            quoted("code").as_deref(),
            &quoted("message").unwrap_or_default(),
            quoted(&format!("\"{}\"", s3::BUCKET_REGION_HEADER)).as_deref(),
            signed_for,
        );
    }
    let hint = match e.kind() {
        ErrorKind::PermissionDenied => {
            " (check the credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile)"
        }
        ErrorKind::NotFound => " (no such object or bucket)",
        _ => "",
    };
    format!("{}{hint}", s3::error_chain(e))
}

/// Path of `key` under the local bucket `root`; keys that would leave it are refused.
fn local_path(root: &Path, key: &str) -> Result<PathBuf> {
    let rel = Path::new(key);
    if key.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(Error::invalid(format!(
            "'{key}': not a plain object name inside the bucket directory"
        )));
    }
    Ok(root.join(rel))
}

/// The temporary file of upload `id` of the object at `path`: hidden, next to it.
fn local_upload_path(path: &Path, id: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.diskkit-upload-{id}"))
}

/// True for the temporary files of unfinished local uploads, which listings skip.
pub fn is_upload_temp(key: &str) -> bool {
    key.contains(".diskkit-upload-")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error as OpenDAL's S3 backend reports a reply: the parsed body, then the response.
    fn reply(body: &str, response: &str) -> opendal::Error {
        opendal::Error::new(ErrorKind::Unexpected, body).with_context("response", response)
    }

    #[test]
    fn reads_a_range_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(dir.path().join("obj"), &content).unwrap();
        let url = format!("{}/obj", dir.path().display());
        let location = Location::parse(&url).unwrap();
        let store = Store::open(&location, &Settings::default()).unwrap();
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
    fn explains_s3_replies() {
        // A HEAD signed for the wrong region: AWS answers 400 with no body, naming the
        // bucket's region in a header.
        let e = reply(
            "",
            r#"Parts { status: 400, version: HTTP/1.1, headers: {"x-amz-bucket-region": "eu-west-1", "content-type": "application/xml"} }"#,
        );
        let text = explain(&e, "us-east-1");
        assert!(
            text.starts_with("400 Bad Request (the bucket is in region 'eu-west-1'"),
            "{text}"
        );
        assert!(
            text.contains("AWS_REGION=eu-west-1") && text.contains("--region eu-west-1"),
            "{text}"
        );
        let e = reply(
            r#"S3Error { code: "NoSuchBucket", message: "The specified bucket does not exist", resource: "/b", request_id: "1" }"#,
            r#"Parts { status: 404, version: HTTP/1.1, headers: {} }"#,
        );
        let text = explain(&e, "us-east-1");
        assert!(
            text.starts_with(
                "NoSuchBucket: The specified bucket does not exist (create the bucket"
            ),
            "{text}"
        );
        // No reply at all: the causes, with what the kind suggests.
        let e = opendal::Error::new(ErrorKind::NotFound, "gone");
        assert!(explain(&e, "us-east-1").ends_with("(no such object or bucket)"));
    }
}

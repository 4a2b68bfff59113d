//! The part of every store that goes through OpenDAL: reads (streamed ranges), listings,
//! writes, conditional writes, deletes, with one retry and timeout policy and errors given a
//! kind.

use super::location::Location;
use super::s3::{self};
use super::store::*;
use diskkit_formats::error::ErrorKind;
use diskkit_formats::{Error, Result};
use opendal::Operator;
use opendal::layers::{RetryLayer, TimeoutLayer};
use std::sync::OnceLock;
use std::time::SystemTime;

/// The OpenDAL half of a store: reads, listings, writes, deletes.
pub(super) struct Objects {
    pub(super) runtime: &'static tokio::runtime::Runtime,
    pub(super) op: Operator,
    pub(super) location: Location,
    /// The server, for messages (empty for a local bucket).
    pub(super) endpoint: String,
    /// Whether the server honours create-if-absent (probed on first use).
    pub(super) condition_honoured: OnceLock<bool>,
}

impl Objects {
    pub(super) fn new(
        runtime: &'static tokio::runtime::Runtime,
        op: Operator,
        location: &Location,
        endpoint: String,
    ) -> Objects {
        let op = op
            .layer(
                // A whole request (stat, small write) gets two read timeouts.
                TimeoutLayer::new()
                    .with_timeout(2 * s3::read_timeout())
                    .with_io_timeout(s3::read_timeout()),
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

    pub(super) fn url(&self, key: &str) -> String {
        self.location.with_key(key).url()
    }

    /// The error for OpenDAL's `e` during `op` on `key`: its kind from OpenDAL's kind and the
    /// I/O or HTTP error under it; the message with what to do.
    pub(super) fn error(&self, key: &str, op: &str, e: opendal::Error) -> Error {
        let url = self.url(key);
        if let Some((kind, cause)) = transport_failure(&e) {
            if self.endpoint.is_empty() {
                return Error::storage(kind, url, op, s3::error_chain(&e));
            }
            return s3::unreachable(kind, &url, op, &self.endpoint, s3::ATTEMPTS, cause);
        }
        let (kind, hint) = kind_of(&e);
        Error::storage(kind, url, op, format!("{}{hint}", s3::error_chain(&e)))
    }

    pub(super) fn stat(&self, key: &str) -> Result<Option<ObjectMeta>> {
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

    pub(super) fn read_pieces(
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
    pub(super) fn body(&self, key: &str, offset: u64, len: u64) -> Result<Body> {
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

    pub(super) fn write(&self, key: &str, data: Vec<u8>) -> Result<()> {
        self.runtime
            .block_on(self.op.write(key, data))
            .map(|_| ())
            .map_err(|e| self.error(key, "write", e))
    }

    /// A conditional write, after checking once that the server honours the condition.
    pub(super) fn create_if_absent(&self, key: &str, data: Vec<u8>) -> Result<()> {
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

    pub(super) fn conditional_write(&self, key: &str, data: Vec<u8>) -> Result<()> {
        self.runtime
            .block_on(async { self.op.write_with(key, data).if_not_exists(true).await })
            .map(|_| ())
            .map_err(|e| self.error(key, "create if absent", e))
    }

    /// Writes a probe object twice with the condition: true when the second write is refused.
    /// Other failures (no permission, unsupported) are left for the real write to report.
    pub(super) fn probe_condition(&self) -> bool {
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

    pub(super) fn list(&self, prefix: &str) -> Result<Vec<ObjectEntry>> {
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

    pub(super) fn delete(&self, keys: &[String]) -> Result<()> {
        let first = keys.first().map_or("", String::as_str);
        self.runtime
            .block_on(self.op.delete_iter(keys.iter().map(String::as_str)))
            .map_err(|e| self.error(first, "delete", e))
    }

    /// Uploads with OpenDAL's multipart writer.
    pub(super) fn upload_stream(
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
    pub(super) fn check_completed(&self, key: &str, size: u64) -> Result<()> {
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

    pub(super) fn not_resumable(&self, key: &str) -> Error {
        Error::storage(
            ErrorKind::Unsupported,
            self.url(key),
            "upload",
            "resumable uploads need an s3:// or local bucket",
        )
    }
}

/// Our kind of OpenDAL's error `e` (one that is not a transport failure), and a hint for the
/// user. OpenDAL's retry layer marks every error it returns "persistent", so whether a failure
/// was temporary before the retries ran out is lost; the timeout layer's own errors still say
/// what they are, and a stall is worth retrying later (a batch item, the batch state).
fn kind_of(e: &opendal::Error) -> (ErrorKind, &'static str) {
    use opendal::ErrorKind as Dal;
    match e.kind() {
        Dal::NotFound => (ErrorKind::NotFound, " (no such object or bucket)"),
        Dal::PermissionDenied => (
            ErrorKind::AccessDenied,
            " (check the credentials: the access key and secret, or the profile)",
        ),
        Dal::AlreadyExists | Dal::ConditionNotMatch => (ErrorKind::AlreadyExists, ""),
        Dal::RateLimited => (ErrorKind::Throttled, ""),
        Dal::Unsupported => (ErrorKind::Unsupported, ""),
        Dal::ConfigInvalid => (ErrorKind::InvalidArgument, ""),
        Dal::Unexpected if e.message().ends_with("operation timeout reached") => {
            (ErrorKind::Timeout, "")
        }
        _ if e.is_temporary() => (ErrorKind::ServerError, ""),
        _ => (ErrorKind::OtherIo, ""),
    }
}

/// A failure to talk to the server at all (refused, reset, timed out) or of the local
/// filesystem, found in the causes of `e`: its kind and that cause (what the user needs to
/// read, without OpenDAL's context); `None` when the server answered.
pub(super) fn transport_failure(
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

/// A ranged read's response, consumed in order. A body cut short by the network is resumed
/// where it stopped (OpenDAL's retry layer); one that ends early is an error.
pub(super) struct Body {
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
    pub(super) fn fill(&mut self, objects: &Objects, buf: &mut [u8]) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_stay_retryable_after_the_retry_layer_other_failures_do_not() {
        use opendal::ErrorKind as Dal;
        // What the retry layer returns after the timeout layer's errors ran out of attempts.
        for message in ["operation timeout reached", "io operation timeout reached"] {
            let e = opendal::Error::new(Dal::Unexpected, message).set_persistent();
            assert_eq!(kind_of(&e).0, ErrorKind::Timeout);
            assert!(kind_of(&e).0.is_retryable());
        }
        // A request refused outright comes back marked persistent too: not retried.
        let refused = opendal::Error::new(Dal::Unexpected, "Bad Request").set_persistent();
        assert_eq!(kind_of(&refused).0, ErrorKind::OtherIo);
        let denied = opendal::Error::new(Dal::PermissionDenied, "no").set_persistent();
        assert_eq!(kind_of(&denied).0, ErrorKind::AccessDenied);
    }
}

//! The S3 multipart upload calls (create, upload part, list parts, complete, abort) and the
//! bucket check, signed by reqsign (SigV4). OpenDAL uploads multipart too, but keeps the upload
//! id and part numbers to itself; resuming an interrupted push needs both.

use super::location::Settings;
use bytes::Bytes;
use diskkit_formats::error::ErrorKind;
use diskkit_formats::{Error, Result};
use reqwest::{Method, StatusCode};
use std::collections::BTreeMap;
use std::time::Duration;

/// Attempts per request when the failure may be passing (connection refused or reset, timeout,
/// 5xx, throttling), with doubling pauses from [`FIRST_BACKOFF`].
pub const ATTEMPTS: u32 = 4;
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// A connection that cannot be opened in this time counts as a failed attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A response that stalls this long between reads counts as a failed attempt: a minute, or the
/// whole seconds in `DISKKIT_S3_READ_TIMEOUT` (for links where a minute is wrong either way).
pub fn read_timeout() -> Duration {
    std::env::var("DISKKIT_S3_READ_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(Duration::from_secs(60), Duration::from_secs)
}

/// The pauses between attempts of one request, for our calls and OpenDAL's alike: doubling from
/// [`FIRST_BACKOFF`] with jitter (so that parallel parts do not retry in step).
pub fn retry_policy() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(FIRST_BACKOFF)
        .with_max_times(ATTEMPTS as usize - 1)
        .with_jitter()
}

/// Bytes of a reply kept at most (a page of 1,000 listed parts is about 250 KiB).
const MAX_REPLY: usize = 4 << 20;

/// A reply: status, body, headers.
type Reply = (StatusCode, String, reqwest::header::HeaderMap);

/// Characters S3 leaves unescaped in canonical URIs and query strings.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub struct S3Client {
    http: reqwest::Client,
    /// `http(s)://host[:port]`, no trailing `/`.
    scheme_host: String,
    bucket: String,
    region: String,
    credential: reqsign_aws_v4::Credential,
    virtual_host: bool,
}

/// The region of `settings` (`us-east-1` when not set) and its endpoint (AWS's for the region
/// when not set).
pub fn region_and_endpoint(settings: &Settings) -> (String, String) {
    let region = settings
        .region
        .clone()
        .unwrap_or_else(|| "us-east-1".into());
    let endpoint = settings
        .endpoint
        .clone()
        .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    (region, endpoint)
}

impl S3Client {
    pub fn new(settings: &Settings, bucket: &str) -> Result<S3Client> {
        let (region, endpoint) = region_and_endpoint(settings);
        let scheme_host = endpoint.trim_end_matches('/').to_string();
        if !(scheme_host.starts_with("http://") || scheme_host.starts_with("https://"))
            || scheme_host
                .split("://")
                .nth(1)
                .is_some_and(|h| h.contains('/'))
        {
            return Err(Error::storage(
                ErrorKind::InvalidArgument,
                format!("s3://{bucket}/"),
                "connect",
                format!("endpoint '{endpoint}' is not http(s)://HOST[:PORT]"),
            ));
        }
        let (Some(access_key), Some(secret_key)) = (
            settings.access_key_id.clone(),
            settings.secret_access_key.clone(),
        ) else {
            return Err(Error::storage(
                ErrorKind::AccessDenied,
                format!("s3://{bucket}/"),
                "sign in",
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile \
                 (see diskkit push --help)",
            ));
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(read_timeout())
            .build()
            .map_err(|e| {
                Error::storage(
                    ErrorKind::Unsupported,
                    format!("s3://{bucket}/"),
                    "connect",
                    format!("cannot set up HTTP client: {}", error_chain(&e)),
                )
            })?;
        Ok(S3Client {
            http,
            scheme_host,
            bucket: bucket.to_string(),
            region,
            credential: reqsign_aws_v4::Credential {
                access_key_id: access_key,
                secret_access_key: secret_key,
                session_token: settings.session_token.clone(),
                expires_in: None,
            },
            virtual_host: settings.virtual_host,
        })
    }

    /// Starts a multipart upload of `key`, typed by its name (see [`disk_media_type`]); returns
    /// its upload id.
    pub async fn create_upload(&self, key: &str) -> Result<String> {
        const OP: &str = "create upload";
        let query = [("uploads", "")];
        let (body, _) = self
            .send_raw(
                OP,
                Method::POST,
                key,
                &query,
                Bytes::new(),
                disk_media_type(key),
            )
            .await?;
        parse::<Initiated>(&body)
            .map(|r| r.upload_id)
            .ok_or_else(|| self.bad_reply(key, OP, "no UploadId"))
    }

    /// Sends part `number` (from 1); returns its ETag. The payload hash is signed, so the server
    /// checks the part's SHA-256 on arrival.
    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        data: Bytes,
    ) -> Result<String> {
        let n = number.to_string();
        let query = [("partNumber", n.as_str()), ("uploadId", upload_id)];
        let op = format!("upload part {number}");
        // The part's body is labelled too: SeaweedFS gzips an untyped body whose first bytes
        // compress (most qcow2 and VHD data) on its way to its volume server and gunzips it
        // there, which cost a third of its CPU time on qcow2 parts (16.6 against 11.7 CPU-s
        // per GiB, measured with and without the type).
        let media_type = disk_media_type(key);
        let (_, headers) = self
            .send_raw(&op, Method::PUT, key, &query, data, media_type)
            .await?;
        headers
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| self.bad_reply(key, &op, &format!("part {number}: no ETag")))
    }

    /// Assembles the object from `parts` (number, ETag), in ascending number order.
    pub async fn complete(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<()> {
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (n, etag) in parts {
            xml.push_str(&format!(
                "<Part><PartNumber>{n}</PartNumber><ETag>{}</ETag></Part>",
                etag.replace('&', "&amp;").replace('<', "&lt;")
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        const OP: &str = "complete upload";
        let body = self
            .send(
                OP,
                Method::POST,
                key,
                &[("uploadId", upload_id)],
                Bytes::from(xml),
            )
            .await?;
        // S3 may answer 200 and report the failure in the body.
        if parse::<ErrorReply>(&body).is_some_and(|e| e.code.is_some()) {
            return Err(self.error(key, OP, StatusCode::OK, &body, &Default::default()));
        }
        Ok(())
    }

    /// The parts (number → ETag) the server holds for the unfinished upload, all pages of
    /// them; `None` when the upload is gone (servers expire or abort old uploads).
    pub async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<Option<BTreeMap<u32, String>>> {
        const OP: &str = "list parts";
        let mut parts = BTreeMap::new();
        let mut marker = 0u32;
        // An upload has at most 10,000 parts, 1,000 a page: a server that keeps saying "more"
        // without moving on is not followed forever.
        for _ in 0..=11 {
            let m = marker.to_string();
            let query = [("part-number-marker", m.as_str()), ("uploadId", upload_id)];
            let body = match self.send(OP, Method::GET, key, &query, Bytes::new()).await {
                Ok(body) => body,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let page = parse::<PartsPage>(&body)
                .ok_or_else(|| self.bad_reply(key, OP, "no part listing"))?;
            parts.extend(page.parts.into_iter().map(|p| (p.part_number, p.etag)));
            match (page.is_truncated, page.next_part_number_marker) {
                (true, Some(n)) if n > marker => marker = n,
                (true, _) => break,
                _ => return Ok(Some(parts)),
            }
        }
        Err(self.bad_reply(key, OP, "a part listing that does not end"))
    }

    /// Abandons the upload and frees its parts. An upload that is already gone is not an error.
    pub async fn abort(&self, key: &str, upload_id: &str) -> Result<()> {
        match self
            .send(
                "abort upload",
                Method::DELETE,
                key,
                &[("uploadId", upload_id)],
                Bytes::new(),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn send(
        &self,
        op: &str,
        method: Method,
        key: &str,
        query: &[(&str, &str)],
        body: Bytes,
    ) -> Result<String> {
        self.send_raw(op, method, key, query, body, None)
            .await
            .map(|r| r.0)
    }

    /// A success reply that lacks what it must carry.
    fn bad_reply(&self, key: &str, op: &str, what: &str) -> Error {
        Error::storage(
            ErrorKind::ServerError,
            self.url(key),
            op,
            format!("{what} in the reply"),
        )
    }

    /// Sends a signed request, retrying passing failures; returns the body and headers of a
    /// success.
    async fn send_raw(
        &self,
        op: &str,
        method: Method,
        key: &str,
        query: &[(&str, &str)],
        body: Bytes,
        content_type: Option<&str>,
    ) -> Result<(String, reqwest::header::HeaderMap)> {
        match self
            .request(op, method, key, query, body, content_type)
            .await?
        {
            (status, text, headers) if status.is_success() => Ok((text, headers)),
            (status, text, headers) => Err(self.error(key, op, status, &text, &headers)),
        }
    }

    /// Sends a signed request, retrying passing failures (connection errors, timeouts, 5xx,
    /// throttling; never another 4xx, which would only fail again); returns the last reply.
    async fn request(
        &self,
        op: &str,
        method: Method,
        key: &str,
        query: &[(&str, &str)],
        body: Bytes,
        content_type: Option<&str>,
    ) -> Result<Reply> {
        use backon::Retryable;
        use std::sync::atomic::{AtomicU32, Ordering};
        /// Why an attempt is tried again: no reply, or a reply that may pass.
        enum Failed {
            Unreachable(reqwest::Error),
            Passing(Reply),
        }
        let (url, headers) = self
            .signed(&method, key, query, &body, content_type)
            .await?;
        let attempts = AtomicU32::new(0);
        let outcome = (|| async {
            attempts.fetch_add(1, Ordering::Relaxed);
            match self
                .attempt(method.clone(), &url, &headers, body.clone())
                .await
            {
                Ok(reply) if is_passing(reply.0) => Err(Failed::Passing(reply)),
                Ok(reply) => Ok(reply),
                Err(e) => Err(Failed::Unreachable(e)),
            }
        })
        .retry(retry_policy())
        .await;
        match outcome {
            Ok(reply) | Err(Failed::Passing(reply)) => Ok(reply),
            Err(Failed::Unreachable(e)) => {
                let kind = if e.is_timeout() {
                    ErrorKind::Timeout
                } else {
                    ErrorKind::Network
                };
                let n = attempts.load(Ordering::Relaxed);
                Err(unreachable(
                    kind,
                    &self.url(key),
                    op,
                    &self.scheme_host,
                    n,
                    &e,
                ))
            }
        }
    }

    /// Lists at most one key of the bucket: fails with the server's own explanation (no such
    /// bucket, wrong credentials or region), reported against `key`, when the bucket cannot be
    /// used. Replies through other clients (OpenDAL) carry less: this says why they failed.
    pub async fn check_bucket(&self, key: &str) -> Result<()> {
        let query = [("list-type", "2"), ("max-keys", "1")];
        match self
            .request("check bucket", Method::GET, "", &query, Bytes::new(), None)
            .await?
        {
            (status, _, _) if status.is_success() => Ok(()),
            (status, text, headers) => {
                Err(self.error(key, "check bucket", status, &text, &headers))
            }
        }
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// `http(s)://host[:port]` of the server.
    pub fn endpoint(&self) -> &str {
        &self.scheme_host
    }

    /// The URL of a request for `key` with `query`, and the headers that sign it (SigV4 by
    /// reqsign, the payload's SHA-256 included: the server checks the body on arrival).
    async fn signed(
        &self,
        method: &Method,
        key: &str,
        query: &[(&str, &str)],
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<(String, reqwest::header::HeaderMap)> {
        let (host_url, path) = self.address(key);
        let query_string = query
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let url = match query_string.is_empty() {
            true => format!("{host_url}{path}"),
            false => format!("{host_url}{path}?{query_string}"),
        };
        let failed = |e: &dyn std::fmt::Display| {
            Error::storage(
                ErrorKind::InvalidArgument,
                self.url(key),
                "sign",
                format!("cannot sign the request: {e}"),
            )
        };
        let mut request = http::Request::builder()
            .method(method.clone())
            .uri(&url)
            .header("x-amz-content-sha256", hex(&payload_sha256(body)));
        if let Some(t) = content_type {
            request = request.header(http::header::CONTENT_TYPE, t);
        }
        let request = request.body(()).map_err(|e| failed(&e))?;
        let (mut parts, ()) = request.into_parts();
        let signer = reqsign_aws_v4::RequestSigner::new("s3", &self.region);
        let context = reqsign_core::Context::new();
        reqsign_core::SignRequest::sign_request(
            &signer,
            &context,
            &mut parts,
            Some(&self.credential),
            None,
        )
        .await
        .map_err(|e| failed(&e))?;
        Ok((url, parts.headers))
    }

    /// One attempt of a signed request.
    async fn attempt(
        &self,
        method: Method,
        url: &str,
        headers: &reqwest::header::HeaderMap,
        body: Bytes,
    ) -> std::result::Result<Reply, reqwest::Error> {
        let mut response = self
            .http
            .request(method, url)
            .headers(headers.clone())
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let headers = response.headers().clone();
        // A reply is a small XML document: a server that sends more is cut off rather than
        // buffered (what is kept then fails to parse, or lacks what the call needs).
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            let room = MAX_REPLY - body.len();
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if chunk.len() >= room {
                break;
            }
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned(), headers))
    }

    /// Base URL and path of `key`, path-style or virtual-hosted.
    fn address(&self, key: &str) -> (String, String) {
        let (scheme, host) = self
            .scheme_host
            .split_once("://")
            .unwrap_or(("https", &self.scheme_host));
        let key_path: String = key.split('/').map(encode).collect::<Vec<_>>().join("/");
        if self.virtual_host {
            (
                format!("{scheme}://{}.{host}", self.bucket),
                format!("/{key_path}"),
            )
        } else {
            (
                self.scheme_host.clone(),
                format!("/{}/{key_path}", encode(&self.bucket)),
            )
        }
    }

    fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// A clear message for an S3 error reply.
    fn error(
        &self,
        key: &str,
        op: &str,
        status: StatusCode,
        body: &str,
        headers: &reqwest::header::HeaderMap,
    ) -> Error {
        let reply = parse::<ErrorReply>(body).unwrap_or_default();
        let server_region = reply.region.or_else(|| {
            headers
                .get(BUCKET_REGION_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
        let (kind, what) = explain(
            status,
            reply.code.as_deref(),
            &reply.message.unwrap_or_default(),
            server_region.as_deref(),
            &self.region,
        );
        Error::storage(kind, self.url(key), op, what)
    }
}

/// The header in which S3 names the region a bucket is in.
pub const BUCKET_REGION_HEADER: &str = "x-amz-bucket-region";

/// True for replies worth retrying: the server is failing or throttling, which may pass.
fn is_passing(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// The error for an endpoint that did not answer after `attempts` tries.
pub fn unreachable(
    kind: ErrorKind,
    url: &str,
    op: &str,
    endpoint: &str,
    attempts: u32,
    e: &dyn std::error::Error,
) -> Error {
    Error::storage(
        kind,
        url,
        op,
        format!(
            "cannot reach the endpoint {endpoint} after {attempts} attempts: {}",
            error_chain(e)
        ),
    )
}

/// What an S3 error reply means: its kind, and `CODE: message (what to do)`. `server_region` is
/// the region the reply names for the bucket (XML `<Region>` or the `x-amz-bucket-region`
/// header), `signed_for` the region the request was signed for.
pub fn explain(
    status: StatusCode,
    code: Option<&str>,
    message: &str,
    server_region: Option<&str>,
    signed_for: &str,
) -> (ErrorKind, String) {
    const CREDENTIALS: &str = " (check the access key and secret: AWS_ACCESS_KEY_ID, \
                               AWS_SECRET_ACCESS_KEY or the profile)";
    let region_code = matches!(
        code,
        Some(
            "AuthorizationHeaderMalformed"
                | "PermanentRedirect"
                | "IllegalLocationConstraintException"
        )
    );
    // AWS answers a request signed for the wrong region with 400 (or 301 when addressed to
    // the wrong regional endpoint), naming the bucket's region.
    let wrong_region = server_region
        .filter(|r| *r != signed_for && (region_code || matches!(status.as_u16(), 301 | 400)));
    let hint = match (code, wrong_region) {
        (_, Some(r)) => format!(
            " (the bucket is in region '{r}', the request was signed for '{signed_for}': set \
             AWS_REGION={r}, --region {r} or \"region\" in the profile)"
        ),
        _ if region_code => format!(
            " (wrong region? the request was signed for '{signed_for}': set AWS_REGION, \
             --region or \"region\" in the profile)"
        ),
        (Some("InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied"), _) => {
            CREDENTIALS.to_string()
        }
        (None, _) if status == StatusCode::FORBIDDEN => CREDENTIALS.to_string(),
        (Some("NoSuchBucket"), _) => {
            " (create the bucket first, or check its name and the endpoint)".to_string()
        }
        (Some("NoSuchUpload"), _) => " (the unfinished upload is gone on the server: run diskkit \
             push --abort URL, then push again)"
            .to_string(),
        _ => String::new(),
    };
    let kind = match code {
        _ if wrong_region.is_some() || region_code => ErrorKind::WrongRegion,
        Some("NoSuchBucket") => ErrorKind::NoSuchBucket,
        Some("NoSuchKey" | "NoSuchUpload") => ErrorKind::NotFound,
        Some("InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied") => {
            ErrorKind::AccessDenied
        }
        Some("PreconditionFailed" | "ConditionalRequestConflict") => ErrorKind::AlreadyExists,
        Some("SlowDown") => ErrorKind::Throttled,
        _ => match status.as_u16() {
            403 => ErrorKind::AccessDenied,
            404 => ErrorKind::NotFound,
            412 => ErrorKind::AlreadyExists,
            429 => ErrorKind::Throttled,
            500.. => ErrorKind::ServerError,
            _ => ErrorKind::InvalidArgument,
        },
    };
    let code = code.map_or_else(|| status.to_string(), str::to_string);
    let text = if message.is_empty() {
        format!("{code}{hint}")
    } else {
        format!("{code}: {message}{hint}")
    };
    (kind, text)
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

fn hex(bytes: &[u8]) -> String {
    diskkit_formats::digest::hex(bytes)
}

/// An S3 error reply (`<Error>`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorReply {
    code: Option<String>,
    message: Option<String>,
    /// The bucket's region (AWS, Garage), when the request was signed for another.
    region: Option<String>,
}

/// The reply to CreateMultipartUpload.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Initiated {
    upload_id: String,
}

/// A page of ListParts.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PartsPage {
    #[serde(default)]
    is_truncated: bool,
    next_part_number_marker: Option<u32>,
    #[serde(default, rename = "Part")]
    parts: Vec<ListedPart>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListedPart {
    part_number: u32,
    #[serde(rename = "ETag")]
    etag: String,
}

/// `xml` as a `T`, or `None` when it is not one (any root element name).
fn parse<T: serde::de::DeserializeOwned>(xml: &str) -> Option<T> {
    quick_xml::de::from_str(xml).ok()
}

/// All causes of an error, outermost first: reqwest's own message is often just "error sending
/// request" while the cause says "connection refused".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// The media type of a disk image object, from its name's extension: the types and globs of the
/// freedesktop.org shared MIME database (`shared-mime-info`).
pub fn disk_media_type(key: &str) -> Option<&'static str> {
    let (_, ext) = key.rsplit_once('.')?;
    Some(match ext.to_ascii_lowercase().as_str() {
        "qcow2" | "qcow" => "application/x-qemu-disk",
        "vhd" | "vpc" => "application/x-vhd-disk",
        "vhdx" => "application/x-vhdx-disk",
        "vmdk" => "application/x-vmdk-disk",
        "raw" | "img" => "application/x-raw-disk-image",
        "iso" => "application/x-cd-image",
        "ova" => "application/ovf",
        "gz" => "application/gzip",
        _ => return None,
    })
}

/// The SHA-256 of a request body, for its signature. Parts made only of zeros (the holes of a
/// sparse raw image pushed as is) are common and would each cost a full hash: their digest is
/// computed once per size.
fn payload_sha256(body: &[u8]) -> [u8; 32] {
    use diskkit_formats::digest::sha256;
    use std::sync::Mutex;
    static ZERO_PARTS: Mutex<Vec<(usize, [u8; 32])>> = Mutex::new(Vec::new());
    if diskkit_formats::image::first_nonzero_byte(body).is_some() {
        return sha256(body);
    }
    let lock = || ZERO_PARTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, d)) = lock().iter().find(|(len, _)| *len == body.len()) {
        return d;
    }
    // Hashed outside the lock: other parts' requests go on meanwhile.
    let d = sha256(body);
    let mut known = lock();
    // Part sizes are few (the part size and the last part's): a handful is plenty.
    if known.len() < 8 && !known.iter().any(|(len, _)| *len == body.len()) {
        known.push((body.len(), d));
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_objects_are_typed_by_extension() {
        assert_eq!(
            disk_media_type("a/b/disk.QCOW2"),
            Some("application/x-qemu-disk")
        );
        assert_eq!(disk_media_type("x.vhd"), Some("application/x-vhd-disk"));
        assert_eq!(
            disk_media_type("x.img"),
            Some("application/x-raw-disk-image")
        );
        assert_eq!(disk_media_type("manifest.json"), None);
        assert_eq!(disk_media_type("no-extension"), None);
    }

    #[test]
    fn payload_digests_of_zero_parts_are_remembered_per_size() {
        use sha2::Digest;
        let of = |b: &[u8]| -> [u8; 32] { sha2::Sha256::digest(b).into() };
        let mut part = vec![0u8; 100_000];
        for _ in 0..2 {
            assert_eq!(payload_sha256(&part), of(&part));
            assert_eq!(payload_sha256(&part[1..]), of(&part[1..]));
        }
        part[99_999] = 1;
        assert_eq!(payload_sha256(&part), of(&part));
    }

    #[test]
    fn xml_and_encoding() {
        let initiated = parse::<Initiated>("<a><UploadId>x&amp;y</UploadId></a>");
        assert_eq!(initiated.map(|r| r.upload_id).as_deref(), Some("x&y"));
        assert!(parse::<Initiated>("<a>").is_none());
        // SeaweedFS quotes ETags with numeric entities.
        let page = parse::<PartsPage>(
            "<ListPartsResult><IsTruncated>true</IsTruncated><NextPartNumberMarker>2\
             </NextPartNumberMarker><Part><ETag>&#34;e&#x22;</ETag><PartNumber>2</PartNumber>\
             <Size>5</Size></Part><Part><PartNumber>1</PartNumber><ETag>\"d\"</ETag></Part>\
             </ListPartsResult>",
        )
        .unwrap();
        assert!(page.is_truncated);
        assert_eq!(page.next_part_number_marker, Some(2));
        let parts: Vec<_> = page
            .parts
            .iter()
            .map(|p| (p.part_number, p.etag.as_str()))
            .collect();
        assert_eq!(parts, [(2, "\"e\""), (1, "\"d\"")]);
        let empty = parse::<PartsPage>("<ListPartsResult></ListPartsResult>").unwrap();
        assert!(!empty.is_truncated && empty.parts.is_empty());
        assert_eq!(encode("a b/c~"), "a%20b%2Fc~");
    }

    /// [`S3Client::error`] on an error reply, as the user sees it.
    fn reply(status: u16, body: &str, headers: &[(&'static str, &str)]) -> String {
        reply_error(status, body, headers).to_string()
    }

    fn reply_error(status: u16, body: &str, headers: &[(&'static str, &str)]) -> Error {
        let settings = Settings {
            endpoint: Some("http://127.0.0.1:9".into()),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            ..Settings::default()
        };
        let client = S3Client::new(&settings, "b").unwrap();
        let mut map = reqwest::header::HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, v.parse().unwrap());
        }
        let status = StatusCode::from_u16(status).unwrap();
        client.error("k", "test", status, body, &map)
    }

    #[test]
    fn wrong_region_names_the_right_one() {
        // AWS: a request signed for us-east-1 to a bucket in eu-west-1.
        let aws = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AuthorizationHeaderMalformed</Code>\
            <Message>The authorization header is malformed; the region 'us-east-1' is wrong; \
            expecting 'eu-west-1'</Message><Region>eu-west-1</Region><RequestId>1</RequestId>\
            <HostId>2</HostId></Error>";
        let text = reply(400, aws, &[]);
        assert!(
            text.starts_with("s3://b/k: AuthorizationHeaderMalformed: The authorization"),
            "{text}"
        );
        assert!(
            text.contains(
                "the bucket is in region 'eu-west-1', the request was signed for 'us-east-1'"
            ) && text.contains("AWS_REGION=eu-west-1")
                && text.contains("--region eu-west-1")
                && text.contains("profile"),
            "{text}"
        );
        // AWS, through the wrong regional endpoint: 301 with the region in a header.
        let redirect = "<Error><Code>PermanentRedirect</Code><Message>The bucket you are attempting \
            to access must be addressed using the specified endpoint.</Message>\
            <Endpoint>b.s3.ap-south-1.amazonaws.com</Endpoint><Bucket>b</Bucket></Error>";
        let text = reply(301, redirect, &[("x-amz-bucket-region", "ap-south-1")]);
        assert!(
            text.contains("PermanentRedirect") && text.contains("AWS_REGION=ap-south-1"),
            "{text}"
        );
        // Garage names its region in the body of the 400.
        let garage = "<Error><Code>AuthorizationHeaderMalformed</Code><Message>Authorization \
            header malformed, unexpected scope: 20250101/us-east-1/s3/aws4_request</Message>\
            <Region>garage</Region><Path>/b/k</Path></Error>";
        let text = reply(400, garage, &[]);
        assert!(
            text.contains("region 'garage'") && text.contains("AWS_REGION=garage"),
            "{text}"
        );
        // The code without a region: still a hint.
        let text = reply(
            400,
            "<Error><Code>AuthorizationHeaderMalformed</Code></Error>",
            &[],
        );
        assert!(
            text.contains("wrong region?") && text.contains("AWS_REGION"),
            "{text}"
        );
        // A region header on other errors is not taken for a region problem.
        let text = reply(
            404,
            "<Error><Code>NoSuchKey</Code></Error>",
            &[("x-amz-bucket-region", "eu-west-1")],
        );
        assert_eq!(text, "s3://b/k: NoSuchKey");
        let text = reply(
            403,
            "<Error><Code>AccessDenied</Code><Message>no</Message></Error>",
            &[],
        );
        assert!(
            text.contains("AccessDenied: no (check the access key"),
            "{text}"
        );
    }

    /// Recorded replies of AWS and SeaweedFS, classified by kind whatever their text.
    #[test]
    fn replies_have_kinds() {
        let kind = |status, body: &str, headers: &[(&'static str, &str)]| {
            reply_error(status, body, headers).kind()
        };
        let code = |c: &str| format!("<Error><Code>{c}</Code><Message>m</Message></Error>");
        // A HEAD signed for the wrong region: AWS answers 400 with no body, naming the
        // bucket's region in a header.
        let headers = [("x-amz-bucket-region", "eu-west-1")];
        assert_eq!(kind(400, "", &headers), ErrorKind::WrongRegion);
        let text = reply(400, "", &headers);
        assert!(
            text.starts_with("s3://b/k: 400 Bad Request (the bucket is in region 'eu-west-1'")
                && text.contains("AWS_REGION=eu-west-1")
                && text.contains("--region eu-west-1"),
            "{text}"
        );
        let no_bucket = "<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not \
            exist</Message></Error>";
        assert_eq!(kind(404, no_bucket, &[]), ErrorKind::NoSuchBucket);
        let text = reply(404, no_bucket, &[]);
        assert!(
            text.starts_with(
                "s3://b/k: NoSuchBucket: The specified bucket does not exist (create the bucket"
            ),
            "{text}"
        );
        for (status, c, expected) in [
            (404, "NoSuchKey", ErrorKind::NotFound),
            (404, "NoSuchUpload", ErrorKind::NotFound),
            (403, "SignatureDoesNotMatch", ErrorKind::AccessDenied),
            (403, "InvalidAccessKeyId", ErrorKind::AccessDenied),
            (400, "AuthorizationHeaderMalformed", ErrorKind::WrongRegion),
            (412, "PreconditionFailed", ErrorKind::AlreadyExists),
            (503, "SlowDown", ErrorKind::Throttled),
            (500, "InternalError", ErrorKind::ServerError),
            (400, "EntityTooSmall", ErrorKind::InvalidArgument),
        ] {
            assert_eq!(kind(status, &code(c), &[]), expected, "{c}");
        }
        assert_eq!(kind(429, "", &[]), ErrorKind::Throttled);
        assert_eq!(kind(502, "", &[]), ErrorKind::ServerError);
        assert!(kind(503, "", &[]).is_retryable());
        assert!(!kind(403, "", &[]).is_retryable());
    }

    #[test]
    fn only_passing_failures_are_retried() {
        for s in [500, 502, 503, 504, 429] {
            assert!(is_passing(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [301, 400, 403, 404, 409] {
            assert!(!is_passing(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }
}

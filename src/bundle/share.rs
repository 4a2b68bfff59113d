//! `bundle share`: a read-only link to a bundle in an S3, OSS or OBS store, made of presigned
//! URLs (each provider's documented query signature: SigV4, OSS's and OBS's `Expires` and
//! `Signature` parameters), that
//! `bundle restore`, `info` and `copy` accept as a store without credentials until it expires.
//!
//! The link is a presigned URL of a share document written to `shares/<NAME>-<nanos>.json` in
//! the store: for every object the bundle needs (the store's config, the manifest, its
//! snapshots' indexes, their chunks) its size and the signature of a presigned GET. Signatures
//! made in the same second share everything else in the query, which the document keeps once
//! (`queries`), so a chunk costs about 150 bytes of it. Every URL expires when the link does.
//! An encrypted store's bundles cannot be shared (clouds refuse to share encrypted images, and
//! the link would need the key), nor can a local directory's (no server to sign for).

use super::load;
use crate::snapshot::SnapshotStore;
use crate::storage::{Location, ObjectEntry, ObjectMeta, Scheme, Settings, Store, UploadParts};
use bytes::Bytes;
use diskkit_formats::chunk_store::HOLE;
use diskkit_formats::error::ErrorKind;
use diskkit_formats::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

const SHARE_FORMAT: &str = "diskkit-bundle-share";
const SHARE_VERSION: u32 = 1;
/// The longest a SigV4 presigned URL may live (kept for OSS and OBS links too).
pub const MAX_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Bytes a share document may have.
const MAX_DOCUMENT: u64 = 256 << 20;

/// Characters S3 leaves unescaped in a path segment.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The share document.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareDocument {
    format: String,
    version: u32,
    bundle: String,
    /// When every URL expires, seconds since 1970 UTC.
    expires: u64,
    /// The bucket and prefix of the store (`s3://BUCKET/PREFIX`), for messages.
    store: String,
    /// URL of the bucket: object `KEY` is at `base` + `KEY`.
    base: String,
    /// Query strings without their signature.
    queries: Vec<String>,
    /// Object key → (index into `queries`, signature, size).
    objects: BTreeMap<String, (usize, String, u64)>,
}

/// A link made by [`share`].
#[derive(Debug, Clone, Serialize)]
pub struct ShareLink {
    pub url: String,
    pub expires: u64,
    pub objects: usize,
}

/// Makes a read-only link to bundle `name` of `store` that expires after `expires`.
/// `settings` are the store's connection settings (endpoint, region, credentials).
pub fn share(
    store: &SnapshotStore,
    name: &str,
    settings: &Settings,
    expires: Duration,
) -> Result<ShareLink> {
    let location = store.location();
    match location.scheme {
        Scheme::S3 | Scheme::Oss | Scheme::Obs => {}
        Scheme::Local => {
            return Err(Error::invalid(format!(
                "{}: a local-directory store cannot be shared: a link needs a server to serve \
                 it (bundle copy it to an s3:// store, then share it there)",
                store.url()
            )));
        }
    }
    if store.encrypted() {
        return Err(Error::invalid(format!(
            "{}: bundle {name} is in an encrypted store: encrypted images cannot be shared",
            store.url()
        )));
    }
    if expires.is_zero() || expires > MAX_EXPIRY {
        return Err(Error::invalid(format!(
            "--expires {}s: a link lives from 1 second to 7 days",
            expires.as_secs()
        )));
    }
    let m = load(store, name)?;
    let bucket = store.bucket();
    let mut keys = vec![
        store.key_of("config"),
        store.key_of(&format!("bundles/{name}")),
    ];
    let mut chunks = std::collections::BTreeSet::new();
    for d in &m.disks {
        keys.push(store.index_key(&d.snapshot));
        let index = store.index(&d.snapshot)?;
        chunks.extend(index.chunks.into_iter().filter(|c| *c != HOLE));
    }
    keys.extend(chunks.iter().map(|c| store.chunk_key(c)));
    // Sizes from listings (one request a page) rather than one request per object.
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    for dir in ["chunks/", "snapshots/", "bundles/"] {
        for o in bucket.list(&store.key_of(dir))? {
            sizes.insert(o.key, o.size);
        }
    }
    let config_key = store.key_of("config");
    if let Some(meta) = bucket.stat(&config_key)? {
        sizes.insert(config_key, meta.size);
    }
    let signer = Presigner::new(
        (location.scheme, &store.url()),
        settings,
        &location.bucket,
        expires,
    )?;
    let expires_at = now_secs() + expires.as_secs();
    let mut doc = ShareDocument {
        format: SHARE_FORMAT.into(),
        version: SHARE_VERSION,
        bundle: name.to_string(),
        expires: expires_at,
        store: store.url(),
        base: signer.base.clone(),
        queries: Vec::new(),
        objects: BTreeMap::new(),
    };
    for key in keys {
        let size = *sizes.get(&key).ok_or_else(|| bucket.no_such_object(&key))?;
        let url = signer.presign(&key)?;
        let (query, signature) = split_signature(&url, location.scheme).ok_or_else(|| {
            Error::invalid(format!(
                "{}: a presigned URL without a signature",
                bucket.url(&key)
            ))
        })?;
        let q = match doc.queries.iter().position(|q| *q == query) {
            Some(q) => q,
            None => {
                doc.queries.push(query);
                doc.queries.len() - 1
            }
        };
        doc.objects.insert(key, (q, signature, size));
    }
    let doc_key = store.key_of(&format!("shares/{name}-{}.json", now_nanos()));
    let bytes = serde_json::to_vec(&doc).map_err(|e| Error::invalid(e.to_string()))?;
    bucket.write(&doc_key, bytes)?;
    Ok(ShareLink {
        url: signer.presign(&doc_key)?,
        expires: expires_at,
        objects: doc.objects.len(),
    })
}

/// True when `store` names a share link rather than a store.
pub fn is_link(store: &str) -> bool {
    store.starts_with("https://") || store.starts_with("http://")
}

/// Opens the store behind a share link, read-only; refuses a link that has expired.
pub fn open(link: &str) -> Result<(SnapshotStore, String)> {
    if let Some(expiry) = link_expiry(link)
        && now_secs() > expiry
    {
        return Err(expired(link, expiry));
    }
    let client = Client::new(link)?;
    let bytes = client.get(link, None, MAX_DOCUMENT)?;
    let doc: ShareDocument = serde_json::from_slice(&bytes).map_err(|e| {
        Error::corrupt(
            std::path::Path::new(&redact(link)),
            "share document",
            0,
            e.to_string(),
        )
    })?;
    if doc.format != SHARE_FORMAT || doc.version != SHARE_VERSION {
        return Err(Error::unsupported(
            std::path::Path::new(&redact(link)),
            format!("share format {} version {}", doc.format, doc.version),
        ));
    }
    if now_secs() > doc.expires {
        return Err(expired(link, doc.expires));
    }
    let location = Location::parse(&doc.store)?;
    let bundle = doc.bundle.clone();
    super::check_name(&bundle)?;
    let store = SharedStore { client, doc };
    let url = location.url();
    Ok((
        SnapshotStore::with_store(Box::new(store), location, &url, None, None)?,
        bundle,
    ))
}

fn expired(link: &str, at: u64) -> Error {
    Error::storage(
        ErrorKind::AccessDenied,
        redact(link),
        "open share link",
        format!("the link expired at {} (ask for a new one)", utc(at)),
    )
}

fn utc(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| secs.to_string(), |t| t.to_string())
}

/// A link without its query (the signature is a credential for as long as it lives).
fn redact(link: &str) -> String {
    link.split('?').next().unwrap_or(link).to_string()
}

/// When a presigned URL expires: its `X-Amz-Date` plus `X-Amz-Expires` (S3), or its
/// `Expires` (OSS, OBS: seconds since 1970).
fn link_expiry(link: &str) -> Option<u64> {
    let query = link.split_once('?')?.1;
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    if let Some(at) = param("Expires") {
        return at.parse().ok();
    }
    let date = jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", param("X-Amz-Date")?).ok()?;
    let start = date.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp();
    let secs: u64 = param("X-Amz-Expires")?.parse().ok()?;
    u64::try_from(start.as_second()).ok()?.checked_add(secs)
}

/// The query parameter that holds a presigned URL's signature, by provider.
fn signature_param(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::Oss | Scheme::Obs => "Signature",
        Scheme::S3 | Scheme::Local => "X-Amz-Signature",
    }
}

/// The query of a presigned URL without its signature, and the signature.
fn split_signature(url: &str, scheme: Scheme) -> Option<(String, String)> {
    let query = url.split_once('?')?.1;
    let name = signature_param(scheme);
    let mut signature = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(
            |kv| match kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')) {
                Some(v) => {
                    signature = Some(v.to_string());
                    false
                }
                None => true,
            },
        )
        .collect();
    Some((rest.join("&"), signature?))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A provider's query signer and credential, from reqsign.
enum Signer {
    S3(reqsign_aws_v4::RequestSigner, reqsign_aws_v4::Credential),
    Oss(
        reqsign_aliyun_oss::RequestSigner,
        reqsign_aliyun_oss::Credential,
    ),
    Obs(
        reqsign_huaweicloud_obs::RequestSigner,
        reqsign_huaweicloud_obs::Credential,
    ),
}

/// Presigns GETs of one bucket's objects (each provider's query signing, by reqsign).
struct Presigner {
    runtime: &'static tokio::runtime::Runtime,
    signer: Signer,
    /// `http(s)://host[:port]/BUCKET/` or, virtual-hosted (always for OSS and OBS),
    /// `http(s)://BUCKET.host[:port]/`.
    base: String,
    expires: Duration,
}

impl Presigner {
    /// `url`: the store's, for messages.
    fn new(
        (scheme, url): (Scheme, &str),
        settings: &Settings,
        bucket: &str,
        expires: Duration,
    ) -> Result<Presigner> {
        let (region, endpoint) = match scheme {
            Scheme::Oss | Scheme::Obs => {
                let endpoint = settings.endpoint.clone().ok_or_else(|| {
                    Error::storage(
                        ErrorKind::InvalidArgument,
                        url,
                        "sign",
                        "no endpoint: a share link names the bucket's endpoint (--endpoint, \
                         OSS_ENDPOINT or OBS_ENDPOINT)",
                    )
                })?;
                (String::new(), endpoint)
            }
            Scheme::S3 | Scheme::Local => crate::storage::region_and_endpoint(settings),
        };
        let endpoint = endpoint.trim_end_matches('/');
        let (web, host) = endpoint.split_once("://").ok_or_else(|| {
            Error::invalid(format!(
                "endpoint '{endpoint}' is not http(s)://HOST[:PORT]"
            ))
        })?;
        let bucket_segment = percent_encoding::utf8_percent_encode(bucket, UNRESERVED);
        let base = if settings.virtual_host || matches!(scheme, Scheme::Oss | Scheme::Obs) {
            format!("{web}://{bucket}.{host}/")
        } else {
            format!("{endpoint}/{bucket_segment}/")
        };
        let (Some(key), Some(secret)) = (&settings.access_key_id, &settings.secret_access_key)
        else {
            return Err(Error::storage(
                ErrorKind::AccessDenied,
                url,
                "sign",
                "a share link is signed with the store's credentials: set the access key and \
                 secret (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, OSS_ACCESS_KEY_ID and \
                 OSS_ACCESS_KEY_SECRET, OBS_ACCESS_KEY_ID and OBS_SECRET_ACCESS_KEY), or a profile",
            ));
        };
        let token = settings.session_token.clone();
        let signer = match scheme {
            Scheme::Oss => Signer::Oss(
                reqsign_aliyun_oss::RequestSigner::new(bucket),
                reqsign_aliyun_oss::Credential {
                    access_key_id: key.clone(),
                    access_key_secret: secret.clone(),
                    security_token: token,
                    expires_in: None,
                },
            ),
            Scheme::Obs => Signer::Obs(
                reqsign_huaweicloud_obs::RequestSigner::new(bucket),
                reqsign_huaweicloud_obs::Credential::new(key.clone(), secret.clone(), token),
            ),
            Scheme::S3 | Scheme::Local => Signer::S3(
                reqsign_aws_v4::RequestSigner::new("s3", &region),
                reqsign_aws_v4::Credential {
                    access_key_id: key.clone(),
                    secret_access_key: secret.clone(),
                    session_token: token,
                    expires_in: None,
                },
            ),
        };
        let runtime = crate::storage::io_runtime()
            .map_err(|e| Error::invalid(format!("cannot start the signer: {e}")))?;
        Ok(Presigner {
            runtime,
            signer,
            base,
            expires,
        })
    }

    /// A presigned GET URL of `key`.
    fn presign(&self, key: &str) -> Result<String> {
        use reqsign_core::SignRequest;
        let url = format!("{}{}", self.base, encode_key(key));
        let failed =
            |e: &dyn std::fmt::Display| Error::invalid(format!("{url}: cannot presign: {e}"));
        let request = http::Request::builder()
            .method(http::Method::GET)
            .uri(&url)
            .body(())
            .map_err(|e| failed(&e))?;
        let (mut parts, ()) = request.into_parts();
        let context = reqsign_core::Context::new();
        let expires = Some(self.expires);
        let signed = self.runtime.block_on(async {
            match &self.signer {
                Signer::S3(s, c) => s.sign_request(&context, &mut parts, Some(c), expires).await,
                Signer::Oss(s, c) => s.sign_request(&context, &mut parts, Some(c), expires).await,
                Signer::Obs(s, c) => s.sign_request(&context, &mut parts, Some(c), expires).await,
            }
        });
        signed.map_err(|e| failed(&e))?;
        Ok(parts.uri.to_string())
    }
}

fn encode_key(key: &str) -> String {
    key.split('/')
        .map(|s| percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// Plain HTTP GETs of presigned URLs.
struct Client {
    runtime: &'static tokio::runtime::Runtime,
    http: reqwest::Client,
}

impl Client {
    fn new(link: &str) -> Result<Client> {
        let failed = |e: &dyn std::fmt::Display| {
            Error::storage(
                ErrorKind::Unsupported,
                redact(link),
                "connect",
                format!("cannot set up HTTP client: {e}"),
            )
        };
        let runtime = crate::storage::io_runtime().map_err(|e| failed(&e))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| failed(&e))?;
        Ok(Client { runtime, http })
    }

    /// The body of a GET of `url` (bytes `range` of it), at most `max` bytes.
    fn get(&self, url: &str, range: Option<(u64, u64)>, max: u64) -> Result<Vec<u8>> {
        let name = redact(url);
        self.runtime.block_on(async {
            let mut request = self.http.get(url);
            if let Some((start, len)) = range {
                request = request.header(
                    reqwest::header::RANGE,
                    format!("bytes={start}-{}", start + len - 1),
                );
            }
            let net =
                |e: reqwest::Error| Error::storage(ErrorKind::Network, &name, "GET", e.to_string());
            let mut response = request.send().await.map_err(net)?;
            let status = response.status();
            if !status.is_success() {
                let mut body = Vec::new();
                while let Some(c) = response.chunk().await.map_err(net)? {
                    body.extend_from_slice(&c[..c.len().min(4096 - body.len().min(4096))]);
                    if body.len() >= 4096 {
                        break;
                    }
                }
                let text = String::from_utf8_lossy(&body);
                let (kind, why) = if text.contains("expired") || text.contains("Expired") {
                    (
                        ErrorKind::AccessDenied,
                        "the share link has expired".to_string(),
                    )
                } else if status.as_u16() == 403 {
                    (
                        ErrorKind::AccessDenied,
                        "the server refused the link".to_string(),
                    )
                } else if status.as_u16() == 404 {
                    (
                        ErrorKind::NotFound,
                        "no such object (removed since it was shared)".to_string(),
                    )
                } else {
                    (ErrorKind::ServerError, format!("HTTP {status}"))
                };
                return Err(Error::storage(kind, &name, "GET", why));
            }
            let mut body = Vec::new();
            while let Some(c) = response.chunk().await.map_err(net)? {
                if (body.len() + c.len()) as u64 > max {
                    return Err(Error::storage(
                        ErrorKind::InvalidArgument,
                        &name,
                        "GET",
                        format!("more than the {max} bytes expected"),
                    ));
                }
                body.extend_from_slice(&c);
            }
            Ok(body)
        })
    }
}

/// The objects of a share document as a read-only [`Store`].
struct SharedStore {
    client: Client,
    doc: ShareDocument,
}

impl SharedStore {
    fn signed_url(&self, key: &str) -> Option<(String, u64)> {
        let (q, signature, size) = self.doc.objects.get(key)?;
        let query = self.doc.queries.get(*q)?;
        let name = signature_param(Location::parse(&self.doc.store).ok()?.scheme);
        Some((
            format!(
                "{}{}?{query}&{name}={signature}",
                self.doc.base,
                encode_key(key)
            ),
            *size,
        ))
    }

    fn read_only(&self, key: &str) -> Error {
        Error::storage(
            ErrorKind::AccessDenied,
            self.url(key),
            "write",
            "a share link is read-only",
        )
    }
}

impl Store for SharedStore {
    fn url(&self, key: &str) -> String {
        match Location::parse(&self.doc.store) {
            Ok(l) => l.with_key(key).url(),
            Err(_) => key.to_string(),
        }
    }

    fn stat(&self, key: &str) -> Result<Option<ObjectMeta>> {
        Ok(self.doc.objects.get(key).map(|(_, _, size)| ObjectMeta {
            size: *size,
            modified: None,
            etag: None,
        }))
    }

    fn read_pieces(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        piece: &mut [u8],
        f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let (url, size) = self
            .signed_url(key)
            .ok_or_else(|| self.no_such_object(key))?;
        if piece.is_empty() || offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::storage(
                ErrorKind::InvalidArgument,
                self.url(key),
                "read",
                format!("{len} bytes at {offset} of an object of {size}"),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let body = self.client.get(&url, Some((offset, len)), len)?;
        if body.len() as u64 != len {
            return Err(Error::storage(
                ErrorKind::ServerError,
                self.url(key),
                "read",
                format!("{} bytes received, {len} asked for", body.len()),
            ));
        }
        let mut at = 0;
        while at < body.len() {
            let n = piece.len().min(body.len() - at);
            piece[..n].copy_from_slice(&body[at..at + n]);
            f(offset + at as u64, &piece[..n])?;
            at += n;
        }
        Ok(())
    }

    fn write(&self, key: &str, _data: Vec<u8>) -> Result<()> {
        Err(self.read_only(key))
    }

    fn create_if_absent(&self, key: &str, _data: Vec<u8>) -> Result<()> {
        Err(self.read_only(key))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectEntry>> {
        Ok(self
            .doc
            .objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (_, _, size))| ObjectEntry {
                key: k.clone(),
                size: *size,
                modified: None,
            })
            .collect())
    }

    fn delete(&self, keys: &[String]) -> Result<()> {
        Err(self.read_only(keys.first().map_or("", String::as_str)))
    }

    fn no_such_object(&self, key: &str) -> Error {
        Error::storage(
            ErrorKind::NotFound,
            self.url(key),
            "stat",
            "not part of the shared bundle",
        )
    }

    fn resumable(&self) -> bool {
        false
    }

    fn create_upload(&self, key: &str) -> Result<String> {
        Err(self.read_only(key))
    }

    fn upload_part(&self, key: &str, _: &str, _: u32, _: u64, _: Bytes) -> Result<String> {
        Err(self.read_only(key))
    }

    fn list_parts(&self, key: &str, _: &str) -> Result<UploadParts> {
        Err(self.read_only(key))
    }

    fn complete_upload(&self, key: &str, _: &str, _: &[(u32, String)], _: u64) -> Result<()> {
        Err(self.read_only(key))
    }

    fn abort_upload(&self, key: &str, _: &str) -> Result<()> {
        Err(self.read_only(key))
    }

    fn upload_stream(
        &self,
        key: &str,
        _: u64,
        _: u64,
        _: usize,
        _: &mut dyn FnMut(u64, &mut Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        Err(self.read_only(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presigned_urls_split_and_expire() {
        let url = "http://h:1/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20261206T050000Z\
                   &X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=abc";
        let (q, s) = split_signature(url, Scheme::S3).unwrap();
        assert_eq!(s, "abc");
        assert!(q.ends_with("SignedHeaders=host"));
        let start = jiff::civil::date(2026, 12, 6)
            .at(5, 0, 0, 0)
            .to_zoned(jiff::tz::TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_second() as u64;
        assert_eq!(link_expiry(url), Some(start + 60));
        assert_eq!(link_expiry("http://h/b/k"), None);
        assert_eq!(redact(url), "http://h:1/b/k");
    }

    /// HMAC-SHA1 then base64, written here from RFC 2104 and RFC 4648 (independent of the
    /// signer's code).
    fn base64_hmac_sha1(key: &[u8], message: &[u8]) -> String {
        use sha1::Digest;
        let mut k = [0u8; 64];
        k[..key.len()].copy_from_slice(key);
        let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
        let inner = sha1::Sha1::new()
            .chain_update(pad(0x36))
            .chain_update(message)
            .finalize();
        let mac = sha1::Sha1::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize();
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in mac.chunks(3) {
            let n = c
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..=c.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        while !out.len().is_multiple_of(4) {
            out.push('=');
        }
        out
    }

    fn query_param<'u>(url: &'u str, name: &str) -> &'u str {
        let query = url.split_once('?').unwrap().1;
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {url}"))
    }

    /// OSS (V1 query signature) and OBS sign a GET as their documentation says: Signature =
    /// base64(HMAC-SHA1(secret, "GET\n\n\n" + Expires + "\n/" + bucket + "/" + key)), with
    /// `Expires` (seconds since 1970) and the key id in the query; the link's expiry is read back.
    #[test]
    fn oss_and_obs_links_carry_the_documented_query_signature() {
        for (scheme, endpoint, id_param) in [
            (
                Scheme::Oss,
                "https://oss-cn-hangzhou.aliyuncs.com",
                "OSSAccessKeyId",
            ),
            (
                Scheme::Obs,
                "https://obs.cn-north-4.myhuaweicloud.com",
                "AccessKeyId",
            ),
        ] {
            let settings = Settings {
                endpoint: Some(endpoint.into()),
                access_key_id: Some("AKIDEXAMPLE".into()),
                secret_access_key: Some("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
                ..Settings::default()
            };
            let before = now_secs();
            let signer = Presigner::new(
                (scheme, "test://"),
                &settings,
                "images",
                Duration::from_secs(3600),
            )
            .unwrap();
            let url = signer.presign("store/chunks/ab.cd").unwrap();
            let host = endpoint.strip_prefix("https://").unwrap();
            assert!(
                url.starts_with(&format!("https://images.{host}/store/chunks/ab.cd?")),
                "{url}"
            );
            assert_eq!(query_param(&url, id_param), "AKIDEXAMPLE", "{url}");
            let expires: u64 = query_param(&url, "Expires").parse().unwrap();
            assert!(
                (before + 3600..=now_secs() + 3600).contains(&expires),
                "{url}"
            );
            assert_eq!(link_expiry(&url), Some(expires));
            let signature = percent_encoding::percent_decode_str(query_param(&url, "Signature"))
                .decode_utf8()
                .unwrap()
                .into_owned();
            let string_to_sign = format!("GET\n\n\n{expires}\n/images/store/chunks/ab.cd");
            let want = base64_hmac_sha1(
                settings.secret_access_key.as_deref().unwrap().as_bytes(),
                string_to_sign.as_bytes(),
            );
            assert_eq!(signature, want, "{url}");
            // The share document keeps the query without the signature, and puts it back.
            let (query, sig) = split_signature(&url, scheme).unwrap();
            assert!(!query.contains("Signature="), "{query}");
            assert_eq!(
                percent_encoding::percent_decode_str(&sig)
                    .decode_utf8()
                    .unwrap(),
                want
            );
        }
    }
}

//! `push`: an image into a bucket as a multipart upload, converted on the fly, with a sidecar
//! manifest and a checkpoint that lets a rerun send only the missing parts.
//!
//! The object is a pure function of the source: [`ImageStream::read_at`] produces any byte range
//! of it on demand, so parts can be produced in parallel, in any order, and again after a crash,
//! without a local copy. Memory is one part buffer per parallel upload.

use super::checkpoint::{self, Checkpoint};
use super::{Location, Store, UploadParts, manifest_key};
use crate::hash::hash_image;
use crate::progress::Progress;
use bytes::Bytes;
use diskkit_formats::digest::{Algorithm, DEFAULT_CHUNK_SIZE, Manifest};
use diskkit_formats::image::{GuestRange, allocated_ranges};
use diskkit_formats::write::CreateOptions;
use diskkit_formats::{Error, ErrorKind, Format, Image, ImageStream, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

/// The smallest part S3 accepts (except for the last part of an object).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// The largest part S3 accepts.
pub const MAX_PART_SIZE: u64 = 5 << 30;
/// Parts per multipart upload at most.
pub const MAX_PARTS: u64 = 10_000;
/// Part size when the object is small enough: 8 parallel parts of 16 MiB stay far below the
/// 256 MiB memory goal while keeping requests large.
pub const DEFAULT_PART_SIZE: u64 = 16 << 20;
pub const DEFAULT_PARALLEL: usize = 8;

/// The one part size of an object of `object_size` bytes: `requested` when given and valid,
/// else the default, grown (in whole MiB) until the object fits in [`MAX_PARTS`] parts. Never
/// below [`MIN_PART_SIZE`], even on servers that accept smaller parts.
pub fn part_size(object_size: u64, requested: Option<u64>) -> Result<u64> {
    let fitting = object_size.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
    let size = match requested {
        Some(r) if r < MIN_PART_SIZE => {
            return Err(Error::invalid(format!(
                "--part-size {r}: parts are at least {MIN_PART_SIZE} bytes (5 MiB)"
            )));
        }
        Some(r) if r < fitting => {
            return Err(Error::invalid(format!(
                "--part-size {r}: {object_size} bytes need more than {MAX_PARTS} parts of that \
                 size; use at least {fitting}"
            )));
        }
        Some(r) => r,
        None => DEFAULT_PART_SIZE.max(fitting),
    };
    if size > MAX_PART_SIZE {
        return Err(Error::invalid(format!(
            "{object_size} bytes need parts over {MAX_PART_SIZE} bytes: too large for one object"
        )));
    }
    Ok(size)
}

/// The sidecar object `KEY.diskkit.json`: what the image object holds, and the guest digest
/// with its chunk manifest (as `diskkit hash` computes it) to check it against.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObjectManifest {
    /// Format of the object (`raw`, `vpc`).
    pub format: String,
    /// Bytes of the object.
    pub object_size: u64,
    /// Name of the pushed source.
    pub source: String,
    /// When the push completed, in seconds since 1970-01-01 UTC.
    pub created: u64,
    /// Guest content of the object (its virtual size may exceed the source's where the
    /// format rounds sizes up; the extra bytes are zeros).
    pub guest: Manifest,
    /// The container the image is wrapped in (`tar.gz` for GCE's tarball); absent for a bare
    /// image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

impl ObjectManifest {
    /// Reads an object manifest; its guest manifest is checked as it is read (see [`Manifest`]).
    pub fn from_json(bytes: &[u8]) -> Result<ObjectManifest> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid(format!("not a diskkit object manifest: {e}")))
    }

    pub fn format(&self) -> Result<Format> {
        Format::parse(&self.format)
    }
}

/// The export of `src` as `format` with the `-o`/`-c` options in `create`: the object's bytes
/// as a function of the source. A compressed qcow2 export compresses the whole source once
/// here, reporting guest bytes to `compressing`.
pub fn plan<'a>(
    src: &'a dyn Image,
    format: Format,
    create: &mut CreateOptions,
    compressing: &dyn Progress,
) -> Result<Box<dyn ImageStream + 'a>> {
    // The layouts of VHD and qcow2 follow from the guest ranges with data.
    let mut allocated = allocated_ranges(src, GuestRange::new(0, src.virtual_size()));
    diskkit_formats::stream(src, format, create, &mut allocated, &|n| {
        compressing.advance(n)
    })
}

/// The [`PushOptions::identity`] of a push of the local file `source` as the object `export`
/// (of `format`, written with `create`'s options as planning left them, `compress` as asked):
/// the file (absolute path, size, modification time) and everything that shapes the object. A
/// rerun of another identity starts anew.
pub fn local_push_identity(
    source: &Path,
    format: Format,
    create: &CreateOptions,
    compress: bool,
    export: &dyn ImageStream,
) -> Result<String> {
    let meta = std::fs::metadata(source).map_err(|e| Error::io(source, "stat", e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let path = std::path::absolute(source).unwrap_or_else(|_| source.to_path_buf());
    Ok(format!(
        "{} size={} mtime={mtime} format={} options={:?} compress={} layout={}",
        path.display(),
        meta.len(),
        format.name(),
        create.options,
        compress,
        export.layout_fingerprint()
    ))
}

pub struct PushOptions {
    /// Part size asked for (`--part-size`); chosen by [`part_size`] when `None`.
    pub part_size: Option<u64>,
    /// Parts in flight at once.
    pub parallel: usize,
    /// Name of the source, recorded in the manifest.
    pub source_name: String,
    /// What identifies this push's input (source path, size, mtime, format, options): a rerun
    /// resumes only the same input.
    pub identity: String,
    /// Bytes per second at most, over all parts (`--rate-limit`, qemu-img's `-r`).
    pub rate_limit: Option<u64>,
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushReport {
    pub object_size: u64,
    pub part_size: u64,
    pub parts: u32,
    /// Parts sent by this run.
    pub sent: u32,
    /// Parts a previous run had completed (found in the checkpoint).
    pub resumed: u32,
    /// A previous run's upload was recorded but gone on the server: this run started anew.
    pub restarted: bool,
}

/// Keeps an upload under a rate: after each part, a thread waits until the bytes sent so far
/// are not ahead of `rate` bytes per second since the start.
pub(crate) struct RateLimit {
    rate: u64,
    start: std::time::Instant,
    sent: std::sync::atomic::AtomicU64,
}

impl RateLimit {
    pub(crate) fn new(rate: Option<u64>) -> Option<RateLimit> {
        rate.filter(|&r| r > 0).map(|rate| RateLimit {
            rate,
            start: std::time::Instant::now(),
            sent: Default::default(),
        })
    }

    pub(crate) fn sent(&self, len: u64) {
        let total = self
            .sent
            .fetch_add(len, std::sync::atomic::Ordering::Relaxed)
            + len;
        let due = std::time::Duration::from_secs_f64(total as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// Pushes `export` to `location`: hashes its guest, uploads the parts the checkpoint does not
/// already list, writes the manifest and completes the upload.
pub fn push(
    store: &dyn Store,
    location: &Location,
    export: &dyn ImageStream,
    opts: &PushOptions,
    hashing: &dyn Progress,
    uploading: &dyn Progress,
) -> Result<PushReport> {
    let key = &location.key;
    if location.is_prefix() || key.ends_with(super::MANIFEST_SUFFIX) {
        return Err(Error::invalid(format!(
            "{}: name an object to push to, not a prefix or a manifest",
            location.url()
        )));
    }
    let object_size = export.size();
    let url = location.url();
    let cp_path = checkpoint::path_for(&url)?;
    let mut previous = Checkpoint::load(&cp_path)?;
    if let Some(c) = &previous
        && (c.identity != opts.identity || c.object_size != object_size)
    {
        // An unfinished upload already exists for this URL: this push cannot resume it.
        return Err(Error::storage(
            ErrorKind::AlreadyExists,
            &url,
            "resume upload",
            format!(
                "an unfinished upload of a different source or format is recorded in {}: run \
                 diskkit push --abort {url}, then this push again",
                cp_path.display()
            ),
        ));
    }
    // Resume only what the store still holds: a recorded upload the server no longer has
    // (expired or aborted) leaves nothing to resume, and a recorded part it does not list
    // (a server that lost it) is sent again, rather than failing at completion.
    let mut restarted = false;
    if let Some(c) = &mut previous
        && store.resumable()
    {
        match store.list_parts(key, &c.upload_id)? {
            UploadParts::Gone => restarted = true,
            UploadParts::Listed(held) => c
                .parts
                .retain(|n, etag| held.get(n).is_some_and(|h| same_etag(h, etag))),
            UploadParts::Unlisted => {}
        }
    }
    if restarted {
        previous = None;
    }
    let part = match &previous {
        Some(c) => c.part_size,
        None => part_size(object_size, opts.part_size)?,
    };
    let parts = u32::try_from(object_size.div_ceil(part).max(1))
        .map_err(|_| Error::invalid("too many parts"))?;
    let object = ObjectManifest {
        format: export.format().name().to_string(),
        container: export.container().map(str::to_string),
        object_size,
        source: opts.source_name.clone(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        guest: guest_manifest(export, &opts.source_name, hashing)?,
    };
    let json =
        serde_json::to_vec_pretty(&object).map_err(|e| Error::invalid(format!("manifest: {e}")))?;
    // The manifest goes before the object completes: a kill in between leaves no object (the
    // rerun completes it), never an object without the manifest that verifies it.
    let write_manifest = || store.write(&manifest_key(key), json.clone());
    let (sent, resumed) = if store.resumable() {
        let upload = Upload {
            store,
            key,
            url: &url,
            cp_path: &cp_path,
            identity: &opts.identity,
            object_size,
            part,
            parts,
        };
        let cp = match previous {
            Some(c) => c,
            None => upload.start()?,
        };
        let resumed = cp.parts.len() as u32;
        uploading.advance(u64::from(resumed) * part);
        let fill = |n| fill_part(export, n, part, object_size);
        let send = (opts.parallel, opts.rate_limit);
        match upload.finish(cp, send, &fill, &write_manifest, uploading) {
            // The server dropped the upload after it listed it (expired, or aborted by
            // another process): one fresh upload, so that a rerun always completes.
            Err(e @ Error::Storage { .. }) if e.kind() == ErrorKind::NotFound => {
                restarted = true;
                let started = upload.start()?;
                let sent = upload.finish(started, send, &fill, &write_manifest, uploading)?;
                (sent, 0)
            }
            sent => (sent?, resumed),
        }
    } else {
        write_manifest()?;
        store.upload_stream(key, object_size, part, opts.parallel, &mut |offset, buf| {
            let len = part.min(object_size - offset);
            buf.resize(len as usize, 0);
            export.read_at(buf, offset)?;
            uploading.advance(len);
            Ok(())
        })?;
        (parts, 0)
    };
    Checkpoint::remove(&cp_path)?;
    Ok(PushReport {
        object_size,
        part_size: part,
        parts,
        sent,
        resumed,
        restarted,
    })
}

/// True when two ETags name the same part (servers differ in quoting them).
fn same_etag(a: &str, b: &str) -> bool {
    a.trim_matches('"') == b.trim_matches('"')
}

/// A resumable upload of one object, recorded in a checkpoint.
struct Upload<'a> {
    store: &'a dyn Store,
    key: &'a str,
    url: &'a str,
    cp_path: &'a std::path::Path,
    identity: &'a str,
    object_size: u64,
    part: u64,
    parts: u32,
}

impl Upload<'_> {
    /// Starts a new upload and records it.
    fn start(&self) -> Result<Checkpoint> {
        let c = Checkpoint {
            url: self.url.to_string(),
            identity: self.identity.to_string(),
            upload_id: self.store.create_upload(self.key)?,
            object_size: self.object_size,
            part_size: self.part,
            parts: BTreeMap::new(),
        };
        c.save(self.cp_path)?;
        Ok(c)
    }

    /// Sends the parts `cp` does not list (made by `fill`), recording each, calls
    /// `before_complete`, and completes the upload; returns how many parts were sent.
    fn finish(
        &self,
        cp: Checkpoint,
        (parallel, rate_limit): (usize, Option<u64>),
        fill: &(dyn Fn(u32) -> Result<Vec<u8>> + Sync),
        before_complete: &dyn Fn() -> Result<()>,
        uploading: &dyn Progress,
    ) -> Result<u32> {
        let missing: Vec<u32> = (1..=self.parts)
            .filter(|n| !cp.parts.contains_key(n))
            .collect();
        let upload_id = cp.upload_id.clone();
        let cp = Mutex::new(cp);
        upload_parts(
            self.store,
            self.key,
            &upload_id,
            &missing,
            self.part,
            (parallel, rate_limit),
            fill,
            |n, etag, len| {
                uploading.advance(len);
                let mut c = cp.lock().unwrap_or_else(|p| p.into_inner());
                c.parts.insert(n, etag);
                c.save(self.cp_path)
            },
        )?;
        let cp = cp.into_inner().unwrap_or_else(|p| p.into_inner());
        let list: Vec<(u32, String)> = cp.parts.into_iter().collect();
        before_complete()?;
        self.store
            .complete_upload(self.key, &upload_id, &list, self.object_size)?;
        Ok(missing.len() as u32)
    }
}

/// The guest digest and chunk manifest of the object `export`.
fn guest_manifest(
    export: &dyn ImageStream,
    source_name: &str,
    hashing: &dyn Progress,
) -> Result<Manifest> {
    let mut chunks = Vec::new();
    // SHA-256: the definition every reader of an object manifest knows.
    let digest = hash_image(
        export.guest(),
        Algorithm::Sha256,
        DEFAULT_CHUNK_SIZE,
        hashing,
        Some(&mut |c| chunks.push(c)),
    )?;
    let mut manifest = Manifest::new(digest.algorithm, digest.chunk_size, chunks)?;
    manifest.format = Some(export.format().name().to_string());
    manifest.source = Some(source_name.to_string());
    Ok(manifest)
}

/// True when an unfinished upload to `location` is recorded (so the push can be resumed).
pub fn has_checkpoint(location: &Location) -> bool {
    checkpoint::path_for(&location.url()).is_ok_and(|p| p.exists())
}

/// Abandons the unfinished upload to `location` recorded in the checkpoint, and forgets it.
pub fn abort(store: &dyn Store, location: &Location) -> Result<()> {
    let url = location.url();
    let cp_path = checkpoint::path_for(&url)?;
    let Some(cp) = Checkpoint::load(&cp_path)? else {
        return Err(Error::invalid(format!(
            "{url}: no unfinished upload recorded"
        )));
    };
    store.abort_upload(&location.key, &cp.upload_id)?;
    Checkpoint::remove(&cp_path)
}

/// The bytes of part `number` (from 1).
fn fill_part(export: &dyn ImageStream, number: u32, part: u64, size: u64) -> Result<Vec<u8>> {
    let offset = u64::from(number - 1) * part;
    let len = part.min(size - offset) as usize;
    let mut buf = vec![0; len];
    export.read_at(&mut buf, offset)?;
    Ok(buf)
}

/// Uploads parts `numbers` from `parallel` threads; `produce` makes a part's bytes, `done`
/// records a sent part (number, ETag, length). Stops at the first error and returns it.
#[allow(clippy::too_many_arguments)]
fn upload_parts(
    store: &dyn Store,
    key: &str,
    upload_id: &str,
    numbers: &[u32],
    part: u64,
    (parallel, rate_limit): (usize, Option<u64>),
    produce: &(dyn Fn(u32) -> Result<Vec<u8>> + Sync),
    done: impl Fn(u32, String, u64) -> Result<()> + Sync,
) -> Result<()> {
    let limit = RateLimit::new(rate_limit);
    crate::parallel::run_indexed(parallel, numbers.len(), |i| {
        let n = numbers[i];
        let data = produce(n)?;
        let len = data.len() as u64;
        let offset = u64::from(n - 1) * part;
        let etag = store.upload_part(key, upload_id, n, offset, Bytes::from(data))?;
        done(n, etag, len)?;
        if let Some(limit) = &limit {
            limit.sent(len);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_size_rule() {
        const MIB: u64 = 1 << 20;
        // Small objects: the default; never below the S3 minimum.
        assert_eq!(part_size(1, None).unwrap(), DEFAULT_PART_SIZE);
        assert_eq!(part_size(0, None).unwrap(), DEFAULT_PART_SIZE);
        assert!(part_size(100 * MIB, Some(MIB)).is_err());
        assert_eq!(part_size(64 * MIB, Some(5 * MIB)).unwrap(), 5 * MIB);
        // Every size fits in 10,000 parts of at least 5 MiB, in whole MiB.
        for size in [
            10_000 * DEFAULT_PART_SIZE,
            10_000 * DEFAULT_PART_SIZE + 1,
            1 << 40,
            (1 << 40) + 12345,
            5 << 40,
        ] {
            let p = part_size(size, None).unwrap();
            assert!(p >= MIN_PART_SIZE && p.is_multiple_of(MIB), "{size}: {p}");
            assert!(size.div_ceil(p) <= MAX_PARTS, "{size}: {p}");
            assert!(size.div_ceil(p - MIB) > MAX_PARTS || p == DEFAULT_PART_SIZE);
        }
        // A requested size that needs too many parts is refused.
        assert!(part_size(1 << 40, Some(5 * MIB)).is_err());
        assert!(part_size(u64::MAX / 2, None).is_err());
    }
}

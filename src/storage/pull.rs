//! `pull`, `verify`, `ls`, `rm`: images in a bucket read back through ranged reads.
//!
//! [`RemoteImage`] makes a raw or fixed-VHD object an [`Image`] whose reads are ranged GETs, so
//! the convert engine pulls it (parallel reads, zero detection for sparse output, any output
//! format) and the hash engine verifies it, unchanged.

use super::push::ObjectManifest;
use super::store::is_upload_temp;
use super::{Location, MANIFEST_SUFFIX, ObjectMeta, Store, manifest_key};
use crate::convert::{ConvertOptions, convert_to_path};
use crate::hash::hash_image;
use crate::progress::{NoProgress, Progress};
use diskkit_formats::digest::{ChunkDigest, ChunkHasher, DigestBuilder, PiecewiseChunk, hex};
use diskkit_formats::error::ErrorKind;
use diskkit_formats::image::check_guest_range;
use diskkit_formats::write::{CreateOptions, Writeback};
use diskkit_formats::{Error, Extent, ExtentKind, Format, Image, ImageInfo, Result};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The guest content of an object, read with ranged requests.
pub struct RemoteImage<'a> {
    store: &'a dyn Store,
    location: Location,
    format: Format,
    virtual_size: u64,
}

/// How [`pull`] writes and checks.
pub struct PullOptions<'a> {
    /// Output format; `None`: the object as it is, byte for byte.
    pub format: Option<Format>,
    /// Output format options.
    pub create: &'a mut CreateOptions,
    /// Ranged reads in flight at once.
    pub threads: usize,
    /// Check an object without a manifest against the store's MD5 ETag (and refuse one that
    /// has none); objects with a manifest are always checked.
    pub verify: bool,
}

/// The check a pull or verify made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// The guest digest (hex) matched the object's diskkit manifest.
    Manifest(String),
    /// The store's ETag matched the object's MD5 (hex; a multipart upload's `MD5-N`, the MD5
    /// of its N parts' MD5s): an object diskkit did not push.
    Md5(String),
    /// Nothing was checked (`--no-verify` on an object without a manifest).
    Unchecked,
}

/// The object at `location` and its diskkit manifest, checked against each other; `None` for
/// an object diskkit did not push (no manifest next to it).
fn open_manifest(
    store: &dyn Store,
    location: &Location,
) -> Result<(ObjectMeta, Option<ObjectManifest>)> {
    if location.is_prefix() {
        return Err(Error::invalid(format!(
            "{}: name an object, not a prefix",
            location.url()
        )));
    }
    let Some(meta) = store.stat(&location.key)? else {
        return Err(store.no_such_object(&location.key));
    };
    let Some(bytes) = store.read_small(&manifest_key(&location.key))? else {
        return Ok((meta, None));
    };
    let manifest = ObjectManifest::from_json(&bytes)?;
    if manifest.object_size != meta.size {
        return Err(Error::storage(
            ErrorKind::DigestMismatch,
            location.url(),
            "verify",
            format!(
                "object has {} bytes, its manifest says {}",
                meta.size, manifest.object_size
            ),
        ));
    }
    Ok((meta, Some(manifest)))
}

/// Part sizes upload tools commonly use (aws cli 8 MiB, diskkit 16 MiB, the S3 minimum...):
/// candidates, besides the even split, for the part size of a multipart object.
const COMMON_PART_SIZES_MIB: [u64; 9] = [5, 8, 15, 16, 32, 64, 100, 128, 256];

/// Checks an object without a manifest against the store's ETag as its bytes go by in order:
/// a single-part upload's ETag is the content's MD5; a multipart one (`MD5-N`) the MD5 of its
/// N parts' MD5s, computed for each plausible part size (the store does not say which).
struct EtagCheck {
    expected: String,
    whole: md5::Md5,
    /// Multipart candidates: (part size, its hasher).
    parts: Vec<(u64, PartMd5s)>,
}

/// The MD5 of each part of one size, folded into the MD5 of the MD5s.
#[derive(Default)]
struct PartMd5s {
    filled: u64,
    part: md5::Md5,
    of_parts: md5::Md5,
    count: u64,
}

impl EtagCheck {
    /// `None` when `verify` is off; an error when the ETag is no MD5 (or none) to check against.
    fn new(meta: &ObjectMeta, location: &Location, verify: bool) -> Result<Option<EtagCheck>> {
        if !verify {
            return Ok(None);
        }
        let etag = meta.etag.as_deref().unwrap_or("").to_ascii_lowercase();
        let (md5, count) = match etag.split_once('-') {
            Some((md5, n)) => (
                md5,
                n.parse::<u64>().ok().filter(|n| (1..=10_000).contains(n)),
            ),
            None => (etag.as_str(), Some(0)),
        };
        let size = meta.size;
        let parts: Vec<(u64, PartMd5s)> = match count {
            Some(n) if n > 0 => {
                let even = size.div_ceil(n).next_multiple_of(1 << 20);
                let mut sizes: Vec<u64> = COMMON_PART_SIZES_MIB.iter().map(|m| m << 20).collect();
                sizes.extend([even, size.div_ceil(n)]);
                sizes.sort_unstable();
                sizes.dedup();
                sizes
                    .into_iter()
                    .filter(|&p| p > 0 && size.div_ceil(p).max(1) == n)
                    .map(|p| (p, PartMd5s::default()))
                    .collect()
            }
            _ => Vec::new(),
        };
        let plain = md5.len() == 32 && md5.bytes().all(|b| b.is_ascii_hexdigit());
        if !plain || count.is_none() || (count != Some(0) && parts.is_empty()) {
            return Err(Error::storage(
                ErrorKind::Unsupported,
                location.url(),
                "verify",
                format!(
                    "no diskkit manifest ({}) and no MD5 ETag (the store gives {}) to check the \
                     object against (diskkit pull --no-verify takes it unchecked)",
                    manifest_key(&location.key),
                    meta.etag
                        .as_deref()
                        .map_or("none".to_string(), |t| format!("'{t}'"))
                ),
            ));
        }
        Ok(Some(EtagCheck {
            expected: etag,
            whole: Default::default(),
            parts,
        }))
    }

    /// Feeds the object's next bytes.
    fn feed(&mut self, mut bytes: &[u8]) {
        use md5::Digest;
        if self.parts.is_empty() {
            self.whole.update(bytes);
            return;
        }
        let all = bytes;
        for (size, p) in &mut self.parts {
            bytes = all;
            while !bytes.is_empty() {
                let n = ((*size - p.filled) as usize).min(bytes.len());
                p.part.update(&bytes[..n]);
                p.filled += n as u64;
                bytes = &bytes[n..];
                if p.filled == *size {
                    p.end_part();
                }
            }
        }
    }

    /// Compares what was fed with the ETag.
    fn check(self, location: &Location) -> Result<Verified> {
        use md5::Digest;
        let found = if self.parts.is_empty() {
            vec![hex(&self.whole.finalize())]
        } else {
            self.parts
                .into_iter()
                .map(|(_, mut p)| {
                    if p.filled > 0 {
                        p.end_part();
                    }
                    format!("{}-{}", hex(&p.of_parts.finalize()), p.count)
                })
                .collect()
        };
        if !found.contains(&self.expected) {
            return Err(Error::storage(
                ErrorKind::DigestMismatch,
                location.url(),
                "verify",
                format!(
                    "content MD5 {} differs from the store's ETag {}",
                    found.join(" or "),
                    self.expected
                ),
            ));
        }
        Ok(Verified::Md5(self.expected))
    }

    /// Feeds the file at `path`, then checks.
    fn check_file(mut self, path: &Path, location: &Location) -> Result<Verified> {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
        let mut buf = vec![0; PIECE];
        loop {
            match f.read(&mut buf) {
                Ok(0) => return self.check(location),
                Ok(n) => self.feed(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(path, "read", e)),
            }
        }
    }
}

impl PartMd5s {
    fn end_part(&mut self) {
        use md5::Digest;
        let part = std::mem::take(&mut self.part).finalize();
        self.of_parts.update(part);
        self.filled = 0;
        self.count += 1;
    }
}

/// Downloads an object diskkit did not push into `dst`: byte for byte, or converted to
/// `format` (its own format detected from its bytes), checked against its MD5 ETag.
fn pull_foreign(
    store: &dyn Store,
    location: &Location,
    meta: &ObjectMeta,
    (dst, dir): (&Path, &Path),
    opts: &mut PullOptions,
    downloading: &dyn Progress,
) -> Result<Verified> {
    let threads = opts.threads;
    let check = EtagCheck::new(meta, location, opts.verify)?;
    let local = crate::output::Scratch::new(dir)?;
    download(
        store,
        location,
        local.path(),
        meta.size,
        threads,
        None,
        downloading,
    )?;
    let verified = match check {
        Some(check) => check.check_file(local.path(), location)?,
        None => Verified::Unchecked,
    };
    match opts.format {
        None => local.keep_as(dst)?,
        Some(format) => {
            let image = diskkit_formats::open_with(
                local.path(),
                &Default::default(),
                diskkit_formats::ImplicitOpens::Refuse,
            )?;
            let convert = ConvertOptions {
                threads: Some(threads),
                ..ConvertOptions::default()
            };
            convert_to_path(
                image.as_ref(),
                format,
                dst,
                opts.create,
                &convert,
                &NoProgress,
            )?;
        }
    }
    Ok(verified)
}

impl<'a> RemoteImage<'a> {
    /// The object as an image when its guest bytes are stored first and whole (raw, fixed
    /// VHD); `None` for formats that must be read locally.
    pub fn new(
        store: &'a dyn Store,
        location: &Location,
        manifest: &ObjectManifest,
    ) -> Result<Option<RemoteImage<'a>>> {
        let format = manifest.format()?;
        let guest = manifest.guest.virtual_size;
        let direct = match format {
            Format::Raw => manifest.object_size == guest,
            Format::Vhd => {
                manifest.object_size == guest + diskkit_formats::vhd::layout::FOOTER_SIZE
            }
            _ => false,
        };
        Ok(direct.then(|| RemoteImage {
            store,
            location: location.clone(),
            format,
            virtual_size: guest,
        }))
    }
}

impl Image for RemoteImage<'_> {
    fn format(&self) -> Format {
        self.format
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Everything is data: the guest bytes lie at the start of the object.
    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_guest_range(self.virtual_size, offset, max_len)?;
        Ok(Extent {
            start: offset,
            length: max_len,
            kind: ExtentKind::Data { offset },
            depth: 0,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.virtual_size, offset, buf.len() as u64)?;
        self.store.read_at(&self.location.key, buf, offset)
    }

    /// Each read is a request: fewer, larger ones cost the server less and pay the request
    /// latency less often (pulling 2 GiB as qcow2 from SeaweedFS: 8.3 s with 2 MiB reads, 4.3 s
    /// with 16 MiB ones, which the convert engine buffers: 16 MiB per thread).
    fn optimal_transfer(&self) -> u64 {
        16 << 20
    }

    fn info(&self) -> ImageInfo {
        ImageInfo::basic(
            PathBuf::from(self.location.url()),
            self.format,
            self.virtual_size,
            0,
        )
    }
}

/// Downloads the image at `location` into `dst` (sparse where the guest has zeros): byte for
/// byte when `format` is `None`, else converted to `format`. An object pushed by diskkit is
/// checked against its manifest's guest digest: raw and fixed VHD objects are converted
/// straight from ranged reads; others (dynamic VHD, qcow2) are first downloaded next to `dst`
/// and converted from there. Other objects are checked against the store's MD5 ETag, or not at
/// all when `verify` is off.
pub fn pull(
    store: &dyn Store,
    location: &Location,
    dst: &Path,
    opts: &mut PullOptions,
    downloading: &dyn Progress,
) -> Result<Verified> {
    // Devices and directories are refused before anything is downloaded (a rename would
    // replace a device node); a symlink's target is replaced.
    let dst = &crate::output::final_target(dst)?;
    let (meta, manifest) = open_manifest(store, location)?;
    let dir = dst.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let size = meta.size;
    let Some(manifest) = manifest else {
        return pull_foreign(store, location, &meta, (dst, dir), opts, downloading)
            .map_err(|e| explain_full_disk(e, dst, dir, size));
    };
    let (create, threads) = (&mut *opts.create, opts.threads);
    let format = opts.format.unwrap_or(manifest.format()?);
    let opts = ConvertOptions {
        threads: Some(threads),
        ..ConvertOptions::default()
    };
    let as_is = manifest.format()? == format && create.options.is_empty();
    let remote = RemoteImage::new(store, location, &manifest)?;
    // Space the pull takes at most: the object as is, or the converted guest (plus the object
    // downloaded first when it cannot be read in place).
    let guest = manifest.guest.virtual_size;
    let needed = match (&remote, as_is) {
        (_, true) => size,
        (Some(_), false) => guest,
        (None, false) => size.saturating_add(guest),
    };
    let written = (|| match remote {
        // Same format, no options: the object's bytes are the image (larger reads than the
        // convert engine's, holes where zeros were).
        Some(_) | None if as_is => {
            create.reject_unknown(format)?;
            let local = crate::output::Scratch::new(dir)?;
            // When the object starts with the guest (raw, fixed VHD), its digest is computed
            // from the downloaded bytes as they arrive, instead of reading the file again.
            let in_flight = remote.as_ref().and_then(|_| {
                InFlightDigest::new(manifest.guest.chunk_size, manifest.guest.virtual_size)
            });
            download(
                store,
                location,
                local.path(),
                size,
                threads,
                in_flight.as_ref(),
                downloading,
            )?;
            let verified = in_flight
                .map(|d| d.check(&manifest, location))
                .transpose()?;
            local.keep_as(dst)?;
            Ok(verified)
        }
        Some(remote) => {
            convert_to_path(&remote, format, dst, create, &opts, downloading).map(|_| None)
        }
        None => {
            let local = crate::output::Scratch::new(dir)?;
            download(
                store,
                location,
                local.path(),
                size,
                threads,
                None,
                downloading,
            )?;
            let image = open_as(local.path(), manifest.format()?)?;
            convert_to_path(image.as_ref(), format, dst, create, &opts, &NoProgress).map(|_| None)
        }
    })();
    if let Some(digest) = written.map_err(|e| explain_full_disk(e, dst, dir, needed))? {
        return Ok(Verified::Manifest(digest));
    }
    let written = open_as(dst, format)?;
    let digest = check_digest(written.as_ref(), &manifest, location).map_err(|e| match e {
        Error::Storage {
            kind,
            url,
            op,
            message,
        } => Error::storage(
            kind,
            url,
            op,
            format!("{message} (the pulled image is left at {})", dst.display()),
        ),
        e => e,
    })?;
    Ok(Verified::Manifest(digest))
}

/// A clear message when `e` says the filesystem of `dst` (in `dir`) is full: what the pull
/// needs and what is free (temporary files are gone by now); other errors as they are.
fn explain_full_disk(e: Error, dst: &Path, dir: &Path, needed: u64) -> Error {
    if e.kind() != ErrorKind::NoSpace {
        return e;
    }
    let free = free_space(dir)
        .map(|n| format!(", {n} are free there"))
        .unwrap_or_default();
    Error::storage(
        ErrorKind::NoSpace,
        dst.display().to_string(),
        "write",
        format!(
            "no space left on device: the pulled image needs up to {needed} bytes{free}; \
             nothing was written ({e})"
        ),
    )
}

/// Bytes an unprivileged user may still write on the filesystem holding `dir`.
fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid C string and `st` a writable statvfs for the call to fill.
    if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u32 or u64).
    #[allow(clippy::unnecessary_cast)]
    (st.f_bavail as u64).checked_mul(st.f_frsize as u64)
}

/// Opens a downloaded image: it came from a bucket, so it may name no other file.
fn open_as(path: &Path, format: Format) -> Result<Box<dyn Image>> {
    diskkit_formats::open_with(
        path,
        &diskkit_formats::OpenOptions {
            format: Some(format),
            snapshot: None,
        },
        diskkit_formats::ImplicitOpens::Refuse,
    )
}

/// Checks the guest digest of `image` against the manifest; returns it.
fn check_digest(
    image: &dyn Image,
    manifest: &ObjectManifest,
    location: &Location,
) -> Result<String> {
    check_digest_with(image, manifest, location, &NoProgress)
}

fn check_digest_with(
    image: &dyn Image,
    manifest: &ObjectManifest,
    location: &Location,
    progress: &dyn Progress,
) -> Result<String> {
    let digest = hash_image(image, manifest.guest.chunk_size, progress, None)?;
    same_digest(digest.digest, image.virtual_size(), manifest, location)
}

/// Checks a guest digest of `size` bytes against the manifest's; returns it.
fn same_digest(
    digest: [u8; 32],
    size: u64,
    manifest: &ObjectManifest,
    location: &Location,
) -> Result<String> {
    if size != manifest.guest.virtual_size || digest != manifest.guest.digest {
        return Err(Error::storage(
            ErrorKind::DigestMismatch,
            location.url(),
            "verify",
            format!(
                "content digest {} ({size} bytes) differs from the manifest's {} ({} bytes)",
                hex(&digest),
                manifest.guest.digest_hex(),
                manifest.guest.virtual_size
            ),
        ));
    }
    Ok(manifest.guest.digest_hex())
}

/// Most chunk digests an [`InFlightDigest`] holds (about 60 MiB of them): a manifest's chunk
/// size may be as small as 4 KiB, which for a large object would be more chunks than memory
/// should hold; such objects are hashed in guest order instead.
const MAX_IN_FLIGHT_CHUNKS: u64 = 1 << 20;

/// The guest digest of an object whose first bytes are the guest (raw, fixed VHD), computed
/// chunk by chunk from the downloaded bytes in any order and folded in order at the end.
struct InFlightDigest {
    hasher: ChunkHasher,
    chunk_size: u64,
    /// Guest bytes: the object's bytes past them (a VHD footer) are not hashed.
    size: u64,
    chunks: Mutex<Vec<Option<ChunkDigest>>>,
}

impl InFlightDigest {
    /// `None` when the manifest's chunk size is not one `hash` makes (hashing in guest order
    /// then reports it) or would make too many chunks. [`download_range`] keeps every range a
    /// whole number of chunks.
    fn new(chunk_size: u64, size: u64) -> Option<InFlightDigest> {
        let count = size.div_ceil(chunk_size.max(1));
        if count > MAX_IN_FLIGHT_CHUNKS {
            return None;
        }
        Some(InFlightDigest {
            hasher: ChunkHasher::without_crc(chunk_size).ok()?,
            chunk_size,
            size,
            chunks: Mutex::new(vec![None; count as usize]),
        })
    }

    /// Hashes the object's bytes from `at` (a multiple of the chunk size) on, fed in order.
    fn hasher_at(&self, at: u64) -> RangeHasher<'_> {
        RangeHasher {
            digest: self,
            pos: at,
            chunk: None,
        }
    }

    fn finish(self) -> Result<[u8; 32]> {
        let mut builder = DigestBuilder::new(self.chunk_size)?;
        let chunks = self.chunks.into_inner().unwrap_or_else(|p| p.into_inner());
        for d in chunks {
            builder.push(&d.ok_or_else(|| Error::invalid("a downloaded chunk was not hashed"))?)?;
        }
        Ok(builder.finish())
    }

    /// Checks the digest of everything fed against the manifest; returns it.
    fn check(self, manifest: &ObjectManifest, location: &Location) -> Result<String> {
        let size = self.size;
        same_digest(self.finish()?, size, manifest, location)
    }
}

/// Feeds consecutive object bytes into the chunk digests of an [`InFlightDigest`]; each chunk's
/// digest is stored once its last byte is fed.
struct RangeHasher<'a> {
    digest: &'a InFlightDigest,
    /// Object offset of the next byte fed.
    pos: u64,
    chunk: Option<PiecewiseChunk<'a>>,
}

impl RangeHasher<'_> {
    fn feed(&mut self, mut data: &[u8]) {
        let size = self.digest.chunk_size;
        while !data.is_empty() && self.pos < self.digest.size {
            let start = self.pos / size * size;
            let end = (start + size).min(self.digest.size);
            let n = ((end - self.pos) as usize).min(data.len());
            let hasher = &self.digest.hasher;
            self.chunk
                .get_or_insert_with(|| hasher.start(start))
                .feed(&data[..n]);
            self.pos += n as u64;
            data = &data[n..];
            if self.pos == end
                && let Some(chunk) = self.chunk.take()
            {
                let mut chunks = self.digest.chunks.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(slot) = chunks.get_mut((start / size) as usize) {
                    *slot = Some(chunk.finish());
                }
            }
        }
    }
}

/// Reads the object at `location` and checks its guest digest against its manifest; returns
/// the digest. Objects that cannot be read in place (dynamic VHD) are downloaded to a
/// temporary file first. An object diskkit did not push is checked against the store's MD5
/// ETag, read in one ordered stream.
pub fn verify(
    store: &dyn Store,
    location: &Location,
    threads: usize,
    reading: &dyn Progress,
) -> Result<Verified> {
    let (meta, manifest) = open_manifest(store, location)?;
    let size = meta.size;
    let Some(manifest) = manifest else {
        let Some(mut check) = EtagCheck::new(&meta, location, true)? else {
            return Ok(Verified::Unchecked);
        };
        let mut piece = vec![0; PIECE];
        if size > 0 {
            store.read_pieces(&location.key, 0, size, &mut piece, &mut |_, bytes| {
                check.feed(bytes);
                reading.advance(bytes.len() as u64);
                Ok(())
            })?;
        }
        return check.check(location);
    };
    let digest = match RemoteImage::new(store, location, &manifest)? {
        Some(remote) => {
            let guest = manifest.guest.virtual_size;
            let digest = match InFlightDigest::new(manifest.guest.chunk_size, guest) {
                Some(d) => {
                    fetch(
                        store,
                        location,
                        guest,
                        threads,
                        Some(&d),
                        reading,
                        &|_, _| Ok(()),
                    )?;
                    d.check(&manifest, location)?
                }
                None => check_digest_with(&remote, &manifest, location, reading)?,
            };
            if remote.format == Format::Vhd {
                check_vhd_footer(store, location, guest)?;
            }
            Ok(digest)
        }
        None => {
            let local = crate::output::Scratch::new(&std::env::temp_dir())?;
            download(store, location, local.path(), size, threads, None, reading)?;
            let image = open_as(local.path(), manifest.format()?)?;
            check_digest(image.as_ref(), &manifest, location)
        }
    }?;
    Ok(Verified::Manifest(digest))
}

/// Zero detection grain of [`download`]: aligned runs of this many zero bytes become holes.
const WRITE_GRAIN: usize = 64 << 10;

/// Bytes per ranged read of [`download`] for an object of `size` bytes read by `threads`
/// readers: a power of two from 8 to 64 MiB, enough for every reader to get a few ranges, and
/// never less than the digest's `chunk_size` (a power of two) so that each range is hashed
/// whole chunks at a time. A range is streamed, so its size costs no memory; fewer, longer
/// requests cost the server less (SeaweedFS spent 4.9 s of CPU serving 2 GiB as 8 MiB ranges,
/// 3.4 s as 64 MiB ones).
fn download_range(size: u64, threads: usize, chunk_size: u64) -> u64 {
    let share = size.div_ceil(threads.max(1) as u64 * 4);
    share
        .checked_next_power_of_two()
        .unwrap_or(u64::MAX)
        .clamp(8 << 20, 64 << 20)
        .max(chunk_size)
}

/// Bytes [`download`] hashes and writes at a time (a multiple of [`WRITE_GRAIN`]): small enough
/// to stay in the CPU cache from the copy out of the received data to the write (8 MiB at once
/// made the kernel's copy into the page cache take twice as long).
const PIECE: usize = 1 << 20;

/// Alignment of the staging buffers and of the writes [`download`] makes with `O_DIRECT`: the
/// largest logical block size disks ask for.
const DIRECT_ALIGN: usize = 4096;

/// Copies the object at `location` (`size` bytes) into the file `path` with `threads` ranged
/// reads at once; blocks of zeros are left as holes. `digest` hashes the bytes on the way; then
/// nothing reads the file right after, and it is written with direct I/O where the filesystem
/// allows: it neither evicts what the machine had cached nor pays for finding fresh pages (on
/// this VM, 1-2 s of system time per 2 GiB, varying from run to run). Without `digest` the file
/// is about to be read (hashed or converted), so it goes through the page cache.
fn download(
    store: &dyn Store,
    location: &Location,
    path: &Path,
    size: u64,
    threads: usize,
    digest: Option<&InFlightDigest>,
    progress: &dyn Progress,
) -> Result<()> {
    let out = Output::open(path, size, digest.is_some())?;
    fetch(
        store,
        location,
        size,
        threads,
        digest,
        progress,
        &|at, piece| {
            // Runs of non-zero grains are written; zero grains stay holes.
            super::zero_runs(piece, WRITE_GRAIN, &mut |start, end, zeros| match zeros {
                true => Ok(()),
                false => out.write_at(&piece[start..end], at + start as u64),
            })
        },
    )?;
    out.file.sync_all().map_err(|e| Error::io(path, "sync", e))
}

/// The file [`download`] writes: through the page cache, or with direct I/O where asked and
/// the filesystem allows.
struct Output<'a> {
    path: &'a Path,
    file: std::fs::File,
    /// The same file opened with `O_DIRECT`; aligned writes go through it while it works.
    direct: Option<std::fs::File>,
    direct_works: AtomicBool,
    writeback: Writeback,
}

impl<'a> Output<'a> {
    /// Opens `path` and sets its length to `size`.
    fn open(path: &'a Path, size: u64, direct: bool) -> Result<Output<'a>> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        file.set_len(size)
            .map_err(|e| Error::io(path, "set length", e))?;
        let direct = direct
            .then(|| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .ok()
            })
            .flatten();
        Ok(Output {
            path,
            file,
            direct_works: AtomicBool::new(direct.is_some()),
            direct,
            writeback: Writeback::default(),
        })
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let failed = |e| Error::io(self.path, format!("write at {offset}"), e);
        let aligned = [offset, data.len() as u64, data.as_ptr() as u64]
            .iter()
            .all(|n| n.is_multiple_of(DIRECT_ALIGN as u64));
        if let Some(direct) = &self.direct
            && aligned
            && self.direct_works.load(Ordering::Relaxed)
        {
            match direct.write_all_at(data, offset) {
                Ok(()) => return Ok(()),
                // The filesystem wants another alignment: write through the cache from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_works.store(false, Ordering::Relaxed)
                }
                Err(e) => return Err(failed(e)),
            }
        }
        self.file.write_all_at(data, offset).map_err(failed)?;
        self.writeback
            .wrote(&self.file, self.path, data.len() as u64)
    }
}

/// Streams the first `len` bytes of the object at `location` in ranges, `threads` at once,
/// handing each piece to `sink` and to `digest`.
fn fetch(
    store: &dyn Store,
    location: &Location,
    len: u64,
    threads: usize,
    digest: Option<&InFlightDigest>,
    progress: &dyn Progress,
    sink: &(dyn Fn(u64, &[u8]) -> Result<()> + Sync),
) -> Result<()> {
    let range = download_range(len, threads, digest.map_or(0, |d| d.chunk_size));
    let count =
        usize::try_from(len.div_ceil(range)).map_err(|_| Error::invalid("object too large"))?;
    super::run_parallel(threads, count, |i| {
        // One staging buffer per download thread, reused: a fresh one per range would fault its
        // pages in every time.
        thread_local! {
            static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let at = i as u64 * range;
        let mut hashing = digest.map(|d| d.hasher_at(at));
        BUF.with_borrow_mut(|buf| {
            buf.resize(PIECE + DIRECT_ALIGN, 0);
            let skip = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
            let len = range.min(len - at);
            let piece = &mut buf[skip..skip + PIECE];
            store.read_pieces(&location.key, at, len, piece, &mut |at, piece| {
                if let Some(h) = &mut hashing {
                    h.feed(piece);
                }
                sink(at, piece)?;
                progress.advance(piece.len() as u64);
                Ok(())
            })
        })
    })
}

/// A fixed VHD object ends with a valid footer that gives the guest size.
fn check_vhd_footer(store: &dyn Store, location: &Location, guest: u64) -> Result<()> {
    use diskkit_formats::vhd::layout::{FOOTER_SIZE, Footer};
    let mut bytes = [0u8; FOOTER_SIZE as usize];
    store.read_at(&location.key, &mut bytes, guest)?;
    if !Footer::has_cookie(&bytes) || !Footer::checksum_ok(&bytes) {
        return Err(Error::storage(
            ErrorKind::CorruptImage,
            location.url(),
            "verify",
            format!("no valid VHD footer at offset {guest}"),
        ));
    }
    let footer = Footer::parse(&bytes);
    if footer.current_size != guest {
        return Err(Error::storage(
            ErrorKind::DigestMismatch,
            location.url(),
            "verify",
            format!(
                "VHD footer says {} guest bytes, the manifest {guest}",
                footer.current_size
            ),
        ));
    }
    Ok(())
}

/// One object found by [`list`]: its key and what its manifest says (`None`: no or unreadable
/// manifest).
pub struct Listed {
    /// The key relative to the listed prefix.
    pub key: String,
    /// The whole key in the bucket.
    pub full_key: String,
    pub size: u64,
    pub modified: Option<std::time::SystemTime>,
    pub manifest: Option<ObjectManifest>,
}

/// The images under the prefix of `location`: every object except manifests and unfinished
/// local uploads.
pub fn list(store: &dyn Store, location: &Location) -> Result<Vec<Listed>> {
    let prefix = if location.is_prefix() {
        location.key.clone()
    } else {
        format!("{}/", location.key)
    };
    let mut out = Vec::new();
    for o in store.list(&prefix)? {
        let name = o.key.rsplit('/').next().unwrap_or(&o.key);
        if o.key.ends_with(MANIFEST_SUFFIX) || is_upload_temp(name) {
            continue;
        }
        let manifest = store
            .read_small(&manifest_key(&o.key))?
            .and_then(|b| ObjectManifest::from_json(&b).ok());
        out.push(Listed {
            key: o.key.strip_prefix(&prefix).unwrap_or(&o.key).to_string(),
            full_key: o.key,
            size: o.size,
            modified: o.modified,
            manifest,
        });
    }
    Ok(out)
}

/// Removes the image at `location` and its manifest.
pub fn remove(store: &dyn Store, location: &Location) -> Result<()> {
    if location.is_prefix() {
        return Err(Error::invalid(format!(
            "{}: name an object, not a prefix",
            location.url()
        )));
    }
    if store.stat(&location.key)?.is_none() {
        return Err(store.no_such_object(&location.key));
    }
    store.delete(&[location.key.clone(), manifest_key(&location.key)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_hashed_in_pieces_give_the_image_digest() {
        let chunk_size = 4096;
        // Data, a chunk of zeros, more data, a short last chunk; two download ranges fed in
        // odd-sized pieces, out of order.
        let mut object: Vec<u8> = (0..5 * chunk_size + 1000)
            .map(|i| (i % 251) as u8)
            .collect();
        object[chunk_size..2 * chunk_size].fill(0);
        let digest = InFlightDigest::new(chunk_size as u64, object.len() as u64).unwrap();
        let split = 2 * chunk_size;
        let mut second = digest.hasher_at(split as u64);
        // The object's bytes past the guest (a VHD footer) are not hashed.
        let stored = [&object[..], &[0xee; 512]].concat();
        for piece in stored[split..].chunks(3000) {
            second.feed(piece);
        }
        let mut first = digest.hasher_at(0);
        for piece in object[..split].chunks(777) {
            first.feed(piece);
        }
        let hasher = ChunkHasher::without_crc(chunk_size as u64).unwrap();
        let mut expected = DigestBuilder::new(chunk_size as u64).unwrap();
        for (i, chunk) in object.chunks(chunk_size).enumerate() {
            expected
                .push(&hasher.hash((i * chunk_size) as u64, chunk))
                .unwrap();
        }
        assert_eq!(digest.finish().unwrap(), expected.finish());
    }

    #[test]
    fn download_ranges_are_whole_chunks_and_bounded() {
        const MIB: u64 = 1 << 20;
        // Small objects: 8 MiB; large ones: 64 MiB; between: a few ranges per reader.
        assert_eq!(download_range(MIB, 8, 4 * MIB), 8 * MIB);
        assert_eq!(download_range(300 * MIB, 8, 4 * MIB), 16 * MIB);
        assert_eq!(download_range(2048 * MIB, 8, 4 * MIB), 64 * MIB);
        assert_eq!(download_range(u64::MAX, 0, 4 * MIB), 64 * MIB);
        // Never less than a digest chunk, so each range hashes whole chunks.
        assert_eq!(download_range(MIB, 8, 256 * MIB), 256 * MIB);
        assert_eq!(download_range(MIB, 8, 0), 8 * MIB);
    }

    #[test]
    fn manifests_with_odd_or_tiny_chunks_are_not_hashed_in_flight() {
        // 4 KiB chunks of 4 TiB would be 2^30 digests in memory; 3 is no chunk size.
        assert!(InFlightDigest::new(4096, 1 << 42).is_none());
        assert!(InFlightDigest::new(3, 100).is_none());
        assert!(InFlightDigest::new(0, 100).is_none());
        assert!(InFlightDigest::new(4 << 20, 1 << 42).is_some());
    }

    #[test]
    fn etags_of_single_and_multipart_uploads() {
        use md5::Digest;
        let data: Vec<u8> = (0..(11u32 << 20)).map(|i| (i % 251) as u8).collect();
        let location = Location::parse("s3://b/k").unwrap();
        let meta = |etag: &str| ObjectMeta {
            size: data.len() as u64,
            modified: None,
            etag: Some(etag.to_string()),
        };
        let whole = hex(&md5::Md5::digest(&data));
        // aws cli's 8 MiB parts.
        let part_md5s: Vec<u8> = data
            .chunks(8 << 20)
            .flat_map(|c| md5::Md5::digest(c).to_vec())
            .collect();
        let multipart = format!("{}-2", hex(&md5::Md5::digest(&part_md5s)));
        for etag in [&whole, &multipart] {
            let mut check = EtagCheck::new(&meta(etag), &location, true)
                .unwrap()
                .unwrap();
            for piece in data.chunks(777_777) {
                check.feed(piece);
            }
            assert_eq!(check.check(&location).unwrap(), Verified::Md5(etag.clone()));
        }
        let mut check = EtagCheck::new(&meta(&multipart), &location, true)
            .unwrap()
            .unwrap();
        check.feed(&data[1..]);
        let e = check.check(&location).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DigestMismatch, "{e}");
        // ETags that are no MD5 (or a part count no size fits) cannot check anything.
        for etag in [
            "abc",
            &format!("{whole}-0"),
            &format!("{whole}-x"),
            &format!("{whole}-9999"),
        ] {
            let e = EtagCheck::new(&meta(etag), &location, true).err().unwrap();
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{etag}: {e}");
        }
        assert!(
            EtagCheck::new(&meta("abc"), &location, false)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_range_not_fed_to_its_end_is_an_error() {
        let digest = InFlightDigest::new(4096, 8192).unwrap();
        digest.hasher_at(0).feed(&[1; 5000]);
        assert!(digest.finish().is_err());
    }
}

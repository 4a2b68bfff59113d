//! `snapshot create`: an image into the store, storing only chunks the store lacks.

use super::{SnapshotStore, now_secs};
use crate::output::PendingOutput;
use crate::progress::Progress;
use diskkit_formats::chunk_store::{
    self, ChunkEncoder, EncodedChunk, HOLE, SnapshotIndex, SnapshotMeta, SourceIdentity,
};
use diskkit_formats::digest::{Algorithm, ChunkDigest, DigestBuilder, hex};
use diskkit_formats::image::first_nonzero_byte;
use diskkit_formats::write::CacheMode;
use diskkit_formats::{Error, Extents, Image, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// What `snapshot create` records besides the content.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// The disk's name (default: the source's file name).
    pub name: Option<String>,
    /// Id (or unique prefix) of the snapshot this one is incremental to.
    pub parent: Option<String>,
    /// A qcow2 persistent dirty bitmap of the source that records what changed since the
    /// parent was taken: only chunks it marks are read.
    pub bitmap: Option<String>,
    pub tags: BTreeMap<String, String>,
}

/// How an incremental snapshot found what changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IncrementalPath {
    /// Every data chunk read and hashed; only new chunks stored.
    Full,
    /// The source is a qcow2 overlay on the parent's source: only chunks the overlay itself
    /// allocates were read; the others are the parent's.
    Overlay,
    /// A persistent dirty bitmap said which chunks changed since the parent: only those were
    /// read; the others are the parent's.
    Bitmap,
}

/// What a `snapshot create` did.
#[derive(Debug, Clone, Serialize)]
pub struct CreateReport {
    pub id: String,
    pub digest: String,
    pub path: IncrementalPath,
    /// Guest bytes read from the source.
    pub bytes_read: u64,
    /// Guest bytes of chunks that were new to the store, and what storing them took.
    pub bytes_new: u64,
    pub bytes_stored: u64,
    /// Guest bytes of data chunks the store already had (not sent again).
    pub bytes_reused: u64,
    /// Guest bytes taken from the parent without reading (overlay path).
    pub bytes_from_parent: u64,
    /// Chunks of zeros (never stored).
    pub zero_chunks: u64,
}

/// Chunks per parallel window, per thread. A window's digests are folded in order once all its
/// chunks are done, so its slowest chunk leaves the other threads idle at its end: 4 per thread
/// cost a tenth of an initial snapshot's time. Memory does not grow with it (buffers and
/// encoders are per thread; a window holds only its digests).
const CHUNKS_PER_THREAD: usize = 64;

/// Snapshots `image` (whose file is `source`, for its identity) into `store`.
pub fn create(
    store: &SnapshotStore,
    image: &dyn Image,
    source: &Path,
    opts: &CreateOptions,
    progress: &dyn Progress,
) -> Result<CreateReport> {
    let _lease = store.take_lease()?;
    let (index, mut report) =
        chunk_disk(store, image, source, opts, progress, &SentChunks::default())?;
    // Every chunk durable before the index that lists it.
    store.sync_chunks()?;
    report.id = store.write_index(&index)?;
    Ok(report)
}

/// Chunks stored or found by a run, shared by the disks of one run: a disk often repeats a
/// chunk, and disks of one machine share many.
#[derive(Default)]
pub struct SentChunks(Mutex<HashSet<[u8; 32]>>);

/// One disk of [`create_set`].
pub struct DiskSource<'a> {
    pub image: &'a dyn Image,
    pub source: &'a Path,
    pub opts: CreateOptions,
}

/// Snapshots several disks at once (one thread per disk, their chunks on the read pool),
/// deduplicated together; the indexes are written only when every disk's chunks are stored and
/// synced, so none lists a chunk another disk was still sending.
pub fn create_set(
    store: &SnapshotStore,
    disks: &[DiskSource<'_>],
    progress: &dyn Progress,
) -> Result<Vec<CreateReport>> {
    let _lease = store.take_lease()?;
    let sent = SentChunks::default();
    let built: Vec<Result<(SnapshotIndex, CreateReport)>> = std::thread::scope(|s| {
        let jobs: Vec<_> = disks
            .iter()
            .map(|d| {
                let sent = &sent;
                s.spawn(move || chunk_disk(store, d.image, d.source, &d.opts, progress, sent))
            })
            .collect();
        jobs.into_iter()
            .map(|j| {
                j.join().unwrap_or_else(|_| {
                    Err(Error::invalid("snapshot create: a disk's thread panicked"))
                })
            })
            .collect()
    });
    let built: Vec<(SnapshotIndex, CreateReport)> = built.into_iter().collect::<Result<_>>()?;
    store.sync_chunks()?;
    built
        .into_iter()
        .map(|(index, mut report)| {
            report.id = store.write_index(&index)?;
            Ok(report)
        })
        .collect()
}

/// Stores the chunks of one disk that the store lacks and returns its index, not yet written
/// (its report's id is empty).
fn chunk_disk(
    store: &SnapshotStore,
    image: &dyn Image,
    source: &Path,
    opts: &CreateOptions,
    progress: &dyn Progress,
    sent: &SentChunks,
) -> Result<(SnapshotIndex, CreateReport)> {
    let cs = store.chunk_size;
    let size = image.virtual_size();
    let parent = match &opts.parent {
        Some(p) => {
            let id = store.resolve(p)?;
            let index = store.index(&id)?;
            Some((id, index))
        }
        None => None,
    };
    let dirty = match (&opts.bitmap, &parent) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(Error::invalid(
                "--bitmap says what changed since a parent snapshot: give --parent too",
            ));
        }
        (Some(name), Some(_)) => Some(diskkit_formats::qcow2::bitmap::load(source, name)?),
    };
    // The overlay path needs the image's backing file to be the parent's source, unchanged.
    let overlay_parent = parent.as_ref().and_then(|(_, p)| {
        let backing = image.backing()?;
        let recorded = p.meta.source.as_ref()?;
        (identity(&backing.info().filename).as_ref() == Some(recorded)).then_some(p)
    });
    let path = match (&dirty, overlay_parent) {
        (Some(_), _) => IncrementalPath::Bitmap,
        (None, Some(_)) => IncrementalPath::Overlay,
        (None, None) => IncrementalPath::Full,
    };
    let count = SnapshotIndex::chunk_count(size, cs);
    let work = Work {
        store,
        image,
        cs,
        size,
        parent: if dirty.is_some() {
            parent.as_ref().map(|(_, p)| p)
        } else {
            overlay_parent
        },
        dirty,
        sent,
        read: AtomicU64::new(0),
        new: AtomicU64::new(0),
        stored: AtomicU64::new(0),
        reused: AtomicU64::new(0),
        from_parent: AtomicU64::new(0),
        zeros: AtomicU64::new(0),
        progress,
    };
    let pool = crate::parallel::read_pool()?;
    let window = CHUNKS_PER_THREAD * pool.current_num_threads();
    let mut chunks: Vec<[u8; 32]> = Vec::with_capacity(count.min(1 << 24) as usize);
    // Snapshots record the SHA-256 guest digest, as `diskkit hash` gives it by default.
    let mut builder = DigestBuilder::new(Algorithm::Sha256, cs)?;
    let zero_digest = diskkit_formats::digest::ChunkHasher::without_crc(Algorithm::Sha256, cs)?;
    let mut first = 0u64;
    while first < count {
        let last = (first + window as u64).min(count);
        let digests: Vec<[u8; 32]> = pool.install(|| {
            (first..last)
                .into_par_iter()
                .map(|i| work.chunk(i))
                .collect::<Result<_>>()
        })?;
        for (i, d) in (first..last).zip(digests) {
            let offset = i * cs;
            let length = cs.min(size - offset);
            let hash = if d == HOLE {
                zero_digest.zero(offset, length).hash
            } else {
                d
            };
            builder.push(&ChunkDigest {
                offset,
                length,
                hash,
                crc32: 0,
            })?;
            chunks.push(d);
        }
        first = last;
    }
    let digest = hex(&builder.finish());
    let name = opts.name.clone().unwrap_or_else(|| {
        source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into())
    });
    let index = SnapshotIndex {
        meta: SnapshotMeta {
            name,
            source_format: image.format().name().to_string(),
            virtual_size: size,
            chunk_size: cs,
            parent: parent.as_ref().map(|(id, _)| id.clone()),
            created: now_secs(),
            tags: opts.tags.clone(),
            digest: digest.clone(),
            source: identity(source),
        },
        chunks,
    };
    let report = CreateReport {
        id: String::new(),
        digest,
        path,
        bytes_read: work.read.into_inner(),
        bytes_new: work.new.into_inner(),
        bytes_stored: work.stored.into_inner(),
        bytes_reused: work.reused.into_inner(),
        bytes_from_parent: work.from_parent.into_inner(),
        zero_chunks: work.zeros.into_inner(),
    };
    Ok((index, report))
}

/// The identity of a source file: canonical path, size, modification time.
fn identity(path: &Path) -> Option<SourceIdentity> {
    use std::os::unix::fs::MetadataExt;
    let canonical = path.canonicalize().ok()?;
    let m = std::fs::metadata(&canonical).ok()?;
    Some(SourceIdentity {
        path: canonical.to_string_lossy().into_owned(),
        size: m.len(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
    })
}

/// One create's shared state, used by the parallel chunk jobs.
struct Work<'a> {
    store: &'a SnapshotStore,
    image: &'a dyn Image,
    cs: u64,
    size: u64,
    /// The parent whose chunks stand for the chunks that did not change.
    parent: Option<&'a SnapshotIndex>,
    /// With a bitmap: what changed since the parent (else an overlay's own clusters did).
    dirty: Option<diskkit_formats::qcow2::bitmap::DirtyBitmap>,
    sent: &'a SentChunks,
    read: AtomicU64,
    new: AtomicU64,
    stored: AtomicU64,
    reused: AtomicU64,
    from_parent: AtomicU64,
    zeros: AtomicU64,
    progress: &'a dyn Progress,
}

impl Work<'_> {
    /// The index entry of chunk `i`, storing the chunk when the store lacks it.
    fn chunk(&self, i: u64) -> Result<[u8; 32]> {
        let offset = i * self.cs;
        let length = self.cs.min(self.size - offset);
        let entry = self.chunk_entry(i, offset, length)?;
        self.progress.advance(length);
        Ok(entry)
    }

    fn chunk_entry(&self, i: u64, offset: u64, length: u64) -> Result<[u8; 32]> {
        let mut all_zero = true;
        let mut own_data = false;
        for e in Extents::new(self.image, offset, offset + length) {
            let e = e?;
            all_zero &= e.is_zero();
            own_data |= e.depth == 0;
        }
        if all_zero {
            self.zeros.fetch_add(1, Ordering::Relaxed);
            return Ok(HOLE);
        }
        let unchanged = match &self.dirty {
            Some(bitmap) => !bitmap.any_dirty(offset, offset + length),
            None => !own_data,
        };
        if let Some(parent) = self.parent
            && unchanged
            && (offset + length <= parent.meta.virtual_size)
            && (length == self.cs || offset + length == parent.meta.virtual_size)
            && let Some(d) = parent.chunks.get(i as usize)
        {
            self.from_parent.fetch_add(length, Ordering::Relaxed);
            return Ok(*d);
        }
        // Data the image has mapped in memory is hashed and compressed where it lies; other
        // formats read into this thread's buffer.
        let mut entry = None;
        let mapped = self.image.with_mapped(offset, length, &mut |data| {
            entry = Some(self.store_data(data));
        })?;
        match entry {
            Some(entry) if mapped => entry,
            _ => READ_BUFFER.with_borrow_mut(|data| {
                data.resize(length as usize, 0);
                self.image.read_at(data, offset)?;
                self.store_data(data)
            }),
        }
    }

    /// The index entry for the guest bytes `data` of one chunk, storing them when the store
    /// lacks them.
    fn store_data(&self, data: &[u8]) -> Result<[u8; 32]> {
        let length = data.len() as u64;
        self.read.fetch_add(length, Ordering::Relaxed);
        if first_nonzero_byte(data).is_none() {
            self.zeros.fetch_add(1, Ordering::Relaxed);
            return Ok(HOLE);
        }
        let digest = diskkit_formats::digest::sha256(data);
        let first_time = self
            .sent
            .0
            .lock()
            .map_err(|_| Error::invalid("snapshot create: lock poisoned"))?
            .insert(digest);
        if !first_time || self.store.has_chunk(&digest)? {
            self.reused.fetch_add(length, Ordering::Relaxed);
            return Ok(digest);
        }
        ENCODER.with_borrow_mut(|encoder| {
            let encoder = match encoder {
                Some(e) => e,
                None => encoder.insert(ChunkEncoder::new()?),
            };
            let encoded = encoder.encode(data)?;
            self.stored
                .fetch_add(encoded.size() as u64, Ordering::Relaxed);
            self.new.fetch_add(length, Ordering::Relaxed);
            self.store.put_chunk(&digest, &encoded)
        })?;
        Ok(digest)
    }
}

thread_local! {
    /// Per pool thread, reused from chunk to chunk: allocating, faulting in and zeroing 4 MiB
    /// buffers for every chunk showed up as a tenth of `create`'s time.
    static READ_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static ENCODER: RefCell<Option<ChunkEncoder>> = const { RefCell::new(None) };
}

impl SnapshotStore {
    /// Writes `index` whole under its id (the hash of its bytes) and returns the id.
    pub(crate) fn write_index(&self, index: &SnapshotIndex) -> Result<String> {
        let encoded = index.encode()?;
        let id = SnapshotIndex::id_of(&encoded);
        let key = self.index_key(&id);
        self.put(&key, self.seal(&key, &encoded)?.into_owned())?;
        Ok(id)
    }

    /// Whether the store has chunk `digest` whole: present with at least its header. A chunk
    /// cut short by a crash of an earlier run (local stores rename complete chunks into place,
    /// so only a damaged store has one) is caught by `verify --read-data` and restore.
    pub(crate) fn has_chunk(&self, digest: &[u8; 32]) -> Result<bool> {
        let key = self.chunk_key(digest);
        let size = match self.local_path(&key) {
            // A local store's chunk is a file: asked directly, not through the object layer.
            Some(path) => match std::fs::metadata(&path) {
                Ok(m) => Some(m.len()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(Error::io(&path, "stat", e)),
            },
            None => self.store.stat(&key)?.map(|m| m.size),
        };
        Ok(size.is_some_and(|n| n >= chunk_store::CHUNK_HEADER as u64))
    }

    /// Stores a chunk. Local stores write it under a temporary name renamed into place (not
    /// synced one by one: [`SnapshotStore::sync_chunks`] syncs them all before the index);
    /// object stores never show a partial object.
    pub(crate) fn put_chunk(&self, digest: &[u8; 32], encoded: &EncodedChunk) -> Result<()> {
        self.put_chunk_parts(digest, &[&encoded.header, encoded.stored])
    }

    /// Stores the chunk object made of `parts` (an encoded chunk's bytes, in order).
    pub(crate) fn put_chunk_parts(&self, digest: &[u8; 32], parts: &[&[u8]]) -> Result<()> {
        let key = self.chunk_key(digest);
        match (self.local_path(&key), &self.crypto) {
            (Some(path), None) => write_chunk_file(&path, parts),
            (local, _) => {
                let sealed = self.seal(&key, &parts.concat())?.into_owned();
                match local {
                    Some(path) => write_chunk_file(&path, &[&sealed]),
                    None => self.store.write(&key, sealed),
                }
            }
        }
    }

    /// Makes every chunk written so far durable (local stores: one `syncfs` of the store's
    /// filesystem instead of one fsync per chunk). Object stores acknowledge durable writes.
    pub(crate) fn sync_chunks(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        let Some(dir) = self.local_path(&self.prefix) else {
            return Ok(());
        };
        let f = std::fs::File::open(&dir).map_err(|e| Error::io(&dir, "open", e))?;
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(Error::io(&dir, "sync", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Writes a chunk object made of `parts` under a temporary name, starts its writeback at once
/// (so that the disk works while the next chunks are hashed and compressed, and the one
/// `syncfs` before the index has little left to wait for) and renames it into place.
fn write_chunk_file(path: &Path, parts: &[&[u8]]) -> Result<()> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create", e))?;
    }
    let out = PendingOutput::new(path)?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(out.temp_path())?;
        for part in parts {
            f.write_all(part)?;
        }
        // SAFETY: sync_file_range on a descriptor we own (offset 0, length 0: the whole
        // file). It only starts writeback; durability comes from `sync_chunks`.
        unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        Ok(())
    };
    write().map_err(|e| out.name_output(Error::io(out.temp_path(), "write", e)))?;
    out.commit(CacheMode::Unsafe).map(drop)
}

//! Downloads: parallel ranged reads streamed in pieces, hashed on the way ([`InFlightDigest`]),
//! written with direct I/O where the filesystem allows, zero runs left as holes.

use super::pull::same_digest;
use super::push::ObjectManifest;
use super::{Location, Store};
use crate::output::Scratch;
use crate::progress::Progress;
use diskkit_formats::digest::{
    Algorithm, ChunkDigest, ChunkHasher, DigestBuilder, Manifest, PiecewiseChunk,
};
use diskkit_formats::write::{CacheMode, DIRECT_ALIGN, Writeback};
use diskkit_formats::{Error, Result};
use std::cell::RefCell;
use std::path::Path;
use std::sync::Mutex;

/// Most chunk digests an [`InFlightDigest`] holds (about 60 MiB of them): a manifest's chunk
/// size may be as small as 4 KiB, which for a large object would be more chunks than memory
/// should hold; such objects are hashed in guest order instead.
const MAX_IN_FLIGHT_CHUNKS: u64 = 1 << 20;

/// The guest digest of an object whose first bytes are the guest (raw, fixed VHD), computed
/// chunk by chunk from the downloaded bytes in any order and folded in order at the end.
pub(super) struct InFlightDigest {
    hasher: ChunkHasher,
    /// Guest bytes: the object's bytes past them (a VHD footer) are not hashed.
    size: u64,
    chunks: Mutex<Vec<Option<ChunkDigest>>>,
}

impl InFlightDigest {
    /// The digest `guest` (an object manifest's) records; `None` as for [`InFlightDigest::new`].
    pub(super) fn of_manifest(guest: &Manifest) -> Option<InFlightDigest> {
        InFlightDigest::new(guest.algorithm, guest.chunk_size, guest.virtual_size)
    }

    /// `None` when the manifest's chunk size is not one `hash` makes (hashing in guest order
    /// then reports it) or would make too many chunks. [`download_range`] keeps every range a
    /// whole number of chunks.
    pub(super) fn new(algorithm: Algorithm, chunk_size: u64, size: u64) -> Option<InFlightDigest> {
        let count = size.div_ceil(chunk_size.max(1));
        if count > MAX_IN_FLIGHT_CHUNKS {
            return None;
        }
        Some(InFlightDigest {
            hasher: ChunkHasher::without_crc(algorithm, chunk_size).ok()?,
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

    pub(super) fn finish(self) -> Result<[u8; 32]> {
        let mut builder = DigestBuilder::new(self.hasher.algorithm(), self.hasher.chunk_size())?;
        let chunks = self.chunks.into_inner().unwrap_or_else(|p| p.into_inner());
        for d in chunks {
            builder.push(&d.ok_or_else(|| Error::invalid("a downloaded chunk was not hashed"))?)?;
        }
        Ok(builder.finish())
    }

    /// Checks the digest of everything fed against the manifest; returns it.
    pub(super) fn check(self, manifest: &ObjectManifest, location: &Location) -> Result<String> {
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
    pub(super) fn feed(&mut self, mut data: &[u8]) {
        let size = self.digest.hasher.chunk_size();
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
pub(super) const PIECE: usize = 1 << 20;

/// Copies the object at `location` (`size` bytes) into a new scratch file in `dir` with
/// `threads` ranged reads at once; blocks of zeros are left as holes. `digest` hashes the bytes on the way; then
/// nothing reads the file right after, and it is written with direct I/O where the filesystem
/// allows: it neither evicts what the machine had cached nor pays for finding fresh pages (on
/// this VM, 1-2 s of system time per 2 GiB, varying from run to run). Without `digest` the file
/// is about to be read (hashed or converted), so it goes through the page cache.
pub(super) fn download(
    store: &dyn Store,
    location: &Location,
    dir: &Path,
    size: u64,
    threads: usize,
    digest: Option<&InFlightDigest>,
    progress: &dyn Progress,
) -> Result<Scratch> {
    let scratch = Scratch::new(dir)?;
    let path = scratch.path();
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
    out.file
        .sync_all()
        .map_err(|e| Error::io(path, "sync", e))?;
    Ok(scratch)
}

/// The file [`download`] writes: through the page cache, or with direct I/O where asked and
/// the filesystem allows (the direct cache mode of the image writers).
struct Output<'a> {
    path: &'a Path,
    file: std::fs::File,
    writeback: Writeback,
}

impl<'a> Output<'a> {
    /// Opens `path` and sets its length to `size`.
    pub(super) fn open(path: &'a Path, size: u64, direct: bool) -> Result<Output<'a>> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        file.set_len(size)
            .map_err(|e| Error::io(path, "set length", e))?;
        let mode = if direct {
            CacheMode::None
        } else {
            CacheMode::Writeback
        };
        Ok(Output {
            path,
            file,
            writeback: Writeback::for_file(mode, path),
        })
    }

    pub(super) fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.writeback
            .write_at(&self.file, self.path, data, offset, "data")
    }
}

/// Streams the first `len` bytes of the object at `location` in ranges, `threads` at once,
/// handing each piece to `sink` and to `digest`.
pub(super) fn fetch(
    store: &dyn Store,
    location: &Location,
    len: u64,
    threads: usize,
    digest: Option<&InFlightDigest>,
    progress: &dyn Progress,
    sink: &(dyn Fn(u64, &[u8]) -> Result<()> + Sync),
) -> Result<()> {
    let range = download_range(len, threads, digest.map_or(0, |d| d.hasher.chunk_size()));
    let count =
        usize::try_from(len.div_ceil(range)).map_err(|_| Error::invalid("object too large"))?;
    crate::parallel::run_indexed(threads, count, |i| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_hashed_in_pieces_give_the_image_digest() {
        for algorithm in Algorithm::ALL {
            ranges_hashed_in_pieces_give_the_image_digest_by(algorithm);
        }
    }

    fn ranges_hashed_in_pieces_give_the_image_digest_by(algorithm: Algorithm) {
        let chunk_size = 4096;
        // Data, a chunk of zeros, more data, a short last chunk; two download ranges fed in
        // odd-sized pieces, out of order.
        let mut object: Vec<u8> = (0..5 * chunk_size + 1000)
            .map(|i| (i % 251) as u8)
            .collect();
        object[chunk_size..2 * chunk_size].fill(0);
        let digest =
            InFlightDigest::new(algorithm, chunk_size as u64, object.len() as u64).unwrap();
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
        let hasher = ChunkHasher::without_crc(algorithm, chunk_size as u64).unwrap();
        let mut expected = DigestBuilder::new(algorithm, chunk_size as u64).unwrap();
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
        assert!(InFlightDigest::new(Algorithm::Sha256, 4096, 1 << 42).is_none());
        assert!(InFlightDigest::new(Algorithm::Sha256, 3, 100).is_none());
        assert!(InFlightDigest::new(Algorithm::Sha256, 0, 100).is_none());
        assert!(InFlightDigest::new(Algorithm::Sha256, 4 << 20, 1 << 42).is_some());
    }

    #[test]
    fn a_range_not_fed_to_its_end_is_an_error() {
        let digest = InFlightDigest::new(Algorithm::Sha256, 4096, 8192).unwrap();
        digest.hasher_at(0).feed(&[1; 5000]);
        assert!(digest.finish().is_err());
    }
}

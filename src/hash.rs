//! Parallel computation of the diskkit guest digest (defined in `diskkit_formats::digest`) of an
//! image in any format, or of a raw stream.
//!
//! Images: one thread walks the extent map in guest order ([`Walk`]) and cuts it into chunk jobs;
//! chunks the map calls zero take the precomputed zero digest without a read, the others are read
//! (in place where the image is mapped; their zero parts filled in, not read) and hashed by twice
//! as many threads as cores (see `parallel`), so that reads overlap with hashing. Jobs go in
//! windows whose results are folded in order, so memory stays bounded whatever the image size.
//!
//! Streams: chunks are read sequentially while the previous batch is hashed in parallel.

use crate::parallel::{cores, read_pool};
use crate::progress::Progress;
use diskkit_formats::digest::{Algorithm, ChunkDigest, ChunkHasher, DigestBuilder};
use diskkit_formats::image::{GuestRange, Step, Walk, for_each_piece};
use diskkit_formats::{Error, Image, Result};
use rayon::prelude::*;
use std::io::{ErrorKind, Read};
use std::sync::Mutex;

/// The digest of a whole image or stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHash {
    pub algorithm: Algorithm,
    pub digest: [u8; 32],
    pub chunk_size: u64,
    pub virtual_size: u64,
}

/// Guest bytes read into memory at once per hashing thread, in the stream driver: enough chunks
/// to keep every core busy, few enough to bound memory for large chunk sizes.
const STREAM_BATCH_BYTES: u64 = 64 << 20;

/// Data chunks per window of the image driver, per thread: enough that the idle tail at the end
/// of a window is small.
const DATA_CHUNKS_PER_THREAD: usize = 8;

/// Bytes read at once by a hashing thread: small enough to stay in the CPU cache until hashed.
const READ_PIECE: u64 = 256 << 10;

/// Zero chunks per window cost 48 bytes each: this bounds a window of a huge sparse image.
const MAX_WINDOW_CHUNKS: usize = 1 << 16;

/// What to do for one chunk.
enum Job {
    /// The map says every byte reads as zero.
    Zero(GuestRange),
    /// Read the `data` ranges; the rest of the chunk is zeros.
    Read {
        chunk: GuestRange,
        data: Vec<GuestRange>,
    },
}

/// Hashes the guest content of `image` with `algorithm` and chunks of `chunk_size` bytes.
/// `on_chunk`, when given, receives every chunk digest (hash and CRC-32) in guest order, e.g. to
/// make a manifest; without it no CRC is computed.
pub fn hash_image(
    image: &dyn Image,
    algorithm: Algorithm,
    chunk_size: u64,
    progress: &dyn Progress,
    mut on_chunk: Option<&mut dyn FnMut(ChunkDigest)>,
) -> Result<ImageHash> {
    let hasher = chunk_hasher(algorithm, chunk_size, on_chunk.is_some())?;
    let mut builder = DigestBuilder::new(algorithm, chunk_size)?;
    let size = image.virtual_size();
    let buffers = BufferPool::default();
    let pool = read_pool()?;
    let max_data_jobs = DATA_CHUNKS_PER_THREAD * pool.current_num_threads();
    let mut cutter = ChunkCutter::new(image, chunk_size)?;
    let mut window = Vec::new();
    loop {
        window.clear();
        let mut data_jobs = 0;
        while data_jobs < max_data_jobs && window.len() < MAX_WINDOW_CHUNKS {
            match cutter.next_job()? {
                Some(job) => {
                    data_jobs += usize::from(matches!(job, Job::Read { .. }));
                    window.push(job);
                }
                None => break,
            }
        }
        if window.is_empty() {
            break;
        }
        let digests = pool.install(|| {
            window
                .par_iter()
                .map(|job| {
                    let d = match job {
                        Job::Zero(chunk) => hasher.zero(chunk.start, chunk.len()),
                        Job::Read { chunk, data } => {
                            let d = buffers
                                .with(|buf| hash_chunk(&hasher, image, *chunk, data, buf))?;
                            progress.data_read(data.iter().map(GuestRange::len).sum());
                            d
                        }
                    };
                    progress.advance(d.length);
                    Ok(d)
                })
                .collect::<Result<Vec<_>>>()
        })?;
        for d in digests {
            builder.push(&d)?;
            if let Some(f) = on_chunk.as_mut() {
                f(d);
            }
        }
    }
    if builder.covered() != size {
        return Err(Error::invalid(format!(
            "{} driver mapped {} of {size} bytes",
            image.format(),
            builder.covered()
        )));
    }
    Ok(ImageHash {
        algorithm,
        digest: builder.finish(),
        chunk_size,
        virtual_size: size,
    })
}

/// CRCs are only wanted with the chunk records.
fn chunk_hasher(algorithm: Algorithm, chunk_size: u64, with_crc: bool) -> Result<ChunkHasher> {
    if with_crc {
        ChunkHasher::new(algorithm, chunk_size)
    } else {
        ChunkHasher::without_crc(algorithm, chunk_size)
    }
}

/// Digests of `chunk`, whose data lies in `data` (the rest is zero), read through `buf` a piece
/// at a time: pieces stay in the CPU cache between the copy and the hashing, where a whole chunk
/// would go out to memory and back.
fn hash_chunk(
    hasher: &ChunkHasher,
    image: &dyn Image,
    chunk: GuestRange,
    data: &[GuestRange],
    buf: &mut Vec<u8>,
) -> Result<ChunkDigest> {
    let mut digest = hasher.start(chunk.start);
    let mut pos = chunk.start;
    for &r in data {
        digest.feed_zeros(r.start - pos);
        for_each_piece(image, r, READ_PIECE, buf, &mut |bytes| digest.feed(bytes))?;
        pos = r.end;
    }
    digest.feed_zeros(chunk.end - pos);
    Ok(digest.finish())
}

/// Cuts the guest walk into chunk jobs, one per chunk: runs of zeros one chunk at a time.
struct ChunkCutter<'a> {
    walk: Walk<'a>,
    /// What is left of the last run of zeros of the walk.
    zeros: GuestRange,
    chunk_size: u64,
}

impl<'a> ChunkCutter<'a> {
    fn new(image: &'a dyn Image, chunk_size: u64) -> Result<Self> {
        let all = GuestRange::new(0, image.virtual_size());
        Ok(ChunkCutter {
            walk: Walk::new(&[image], all, chunk_size)?,
            zeros: GuestRange::new(0, 0),
            chunk_size,
        })
    }

    fn next_job(&mut self) -> Result<Option<Job>> {
        loop {
            if let Some(chunk) = self.zeros.cells(self.chunk_size).next() {
                self.zeros.start = chunk.end;
                return Ok(Some(Job::Zero(chunk)));
            }
            match self.walk.next().transpose()? {
                None => return Ok(None),
                Some(Step::Zeros(zeros)) => self.zeros = zeros,
                Some(Step::Cell { range, mut data }) => {
                    return Ok(Some(Job::Read {
                        chunk: range,
                        data: data.pop().unwrap_or_default(),
                    }));
                }
            }
        }
    }
}

/// Read buffers reused across chunks: as many exist as chunks are read at once, and they are
/// freed when the hash is done.
#[derive(Default)]
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// Runs `f` on a buffer with unspecified content.
    fn with<T>(&self, f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
        let taken = self.free.lock().ok().and_then(|mut v| v.pop());
        let mut buf = taken.unwrap_or_default();
        let out = f(&mut buf);
        if let Ok(mut v) = self.free.lock() {
            v.push(buf);
        }
        out
    }
}

/// Hashes a raw stream (stdin) chunk by chunk until its end; the stream length is the virtual
/// size. Reading overlaps with hashing of the previous batch of chunks. `on_chunk` as for
/// [`hash_image`].
pub fn hash_stream(
    reader: &mut (dyn Read + Send),
    algorithm: Algorithm,
    chunk_size: u64,
    progress: &dyn Progress,
    mut on_chunk: Option<&mut dyn FnMut(ChunkDigest)>,
) -> Result<ImageHash> {
    let hasher = chunk_hasher(algorithm, chunk_size, on_chunk.is_some())?;
    let mut builder = DigestBuilder::new(algorithm, chunk_size)?;
    let batch = (STREAM_BATCH_BYTES / chunk_size).clamp(1, 2 * cores() as u64) as usize;
    let pool = read_pool()?;
    let mut spare = Vec::new();
    let mut current = read_batch(reader, chunk_size as usize, batch, &mut spare)?;
    while !current.is_empty() {
        let base = builder.covered();
        let (digests, next) = pool.join(
            || {
                let offsets = current.iter().scan(base, |next_offset, c| {
                    let o = *next_offset;
                    *next_offset += c.len() as u64;
                    Some(o)
                });
                let jobs: Vec<(u64, &Vec<u8>)> = offsets.zip(&current).collect();
                jobs.into_par_iter()
                    .map(|(o, c)| {
                        progress.advance(c.len() as u64);
                        hasher.hash(o, c)
                    })
                    .collect::<Vec<_>>()
            },
            || read_batch(reader, chunk_size as usize, batch, &mut spare),
        );
        for d in digests {
            builder.push(&d)?;
            if let Some(f) = on_chunk.as_mut() {
                f(d);
            }
        }
        // The batch just hashed lends its buffers to the read after next.
        spare = std::mem::replace(&mut current, next?);
    }
    Ok(ImageHash {
        algorithm,
        chunk_size,
        virtual_size: builder.covered(),
        digest: builder.finish(),
    })
}

/// Reads up to `count` chunks; only the last one read may be short (the end of the stream).
/// Buffers come from `spare` when it has some.
fn read_batch(
    reader: &mut (dyn Read + Send),
    chunk_size: usize,
    count: usize,
    spare: &mut Vec<Vec<u8>>,
) -> Result<Vec<Vec<u8>>> {
    let mut chunks = Vec::with_capacity(count);
    while chunks.len() < count {
        let mut buf = spare.pop().unwrap_or_default();
        buf.resize(chunk_size, 0);
        let mut filled = 0;
        while filled < chunk_size {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("<stdin>".as_ref(), "read", e)),
            }
        }
        if filled == 0 {
            break;
        }
        // A raw disk is whole 512-byte sectors, as qemu sees a file of odd length: a stream's
        // missing tail reads as zeros, the same rule as a raw file's (chunk sizes are multiples
        // of 512, so the padding stays inside the chunk).
        let padded = filled.next_multiple_of(512).min(chunk_size);
        buf[filled..padded].fill(0);
        buf.truncate(padded);
        chunks.push(buf);
        if filled < chunk_size {
            break;
        }
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Counted;
    use crate::test_image::MemImage;

    #[test]
    fn progress_counts_the_data_read_apart() {
        let data = vec![7u8; 3 << 20];
        for image in [
            MemImage::new(64 << 20, &[(1000, &data), (40 << 20, &[1; 10])]),
            MemImage::new(64 << 20, &[(1000, &data), (40 << 20, &[1; 10])]).mapped(),
        ] {
            let counted = Counted::default();
            hash_image(&image, Algorithm::Sha256, 1 << 20, &counted, None).unwrap();
            assert_eq!(counted.totals(), (64 << 20, (3 << 20) + 10));
        }
    }
}

//! The byte formats of diskkit's snapshot store: chunk objects and snapshot indexes. Pure
//! encoding and decoding with every field of the input checked, so that the store's bytes (as
//! hostile as an image's) can be fuzzed without a store. Where the objects live and how they
//! are named is the engine's business (`diskkit::snapshot`).
//!
//! # Chunk object (`DKCHUNK1`), little-endian
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `DKCHUNK1` |
//! | 8 | 1 | encoding: 0 stored as is, 1 zstd |
//! | 9 | 3 | reserved, zero |
//! | 12 | 4 | guest bytes the chunk holds (at most [`MAX_CHUNK_SIZE`]) |
//! | 16 | 4 | stored bytes that follow the header |
//! | 20 | 4 | CRC-32C of the stored bytes |
//! | 24 | n | stored bytes |
//!
//! A chunk is named by the SHA-256 of its guest bytes, so a reader checks the content against
//! the name after decoding; the CRC catches damage without decompressing.
//!
//! # Snapshot index (`DKSNAPI1`), little-endian
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `DKSNAPI1` |
//! | 8 | 4 | length M of the metadata (at most [`MAX_META`]) |
//! | 12 | 8 | number N of chunks |
//! | 20 | M | metadata, JSON ([`SnapshotMeta`]) |
//! | 20+M | 32·N | chunk digests in guest order; 32 zero bytes mark a chunk of zeros, never stored |
//! | 20+M+32N | 32 | SHA-256 of every byte before it |
//!
//! A fixed-size binary table rather than JSON: a 2 TiB disk in 4 MiB chunks is 512 Ki entries,
//! 16 MiB here against about 40 MiB of hex strings in JSON, and entry `i` sits at a known offset,
//! as in Proxmox Backup Server's fixed index. The total length follows from M and N and must
//! match the object exactly, so nothing is allocated beyond what the object's size justifies.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

pub const CHUNK_MAGIC: &[u8; 8] = b"DKCHUNK1";
pub const INDEX_MAGIC: &[u8; 8] = b"DKSNAPI1";
pub const CHUNK_HEADER: usize = 24;
const INDEX_HEADER: usize = 20;
/// The largest and smallest chunk sizes a store may use.
pub const MAX_CHUNK_SIZE: u64 = 8 << 20;
pub const MIN_CHUNK_SIZE: u64 = 512 << 10;
/// Metadata larger than this is refused (tags are for labels, not payloads).
pub const MAX_META: usize = 1 << 20;
/// An index entry that means "zeros".
pub const HOLE: [u8; 32] = [0; 32];

/// How a chunk's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkEncoding {
    Plain = 0,
    Zstd = 1,
}

/// zstd level for chunks: level 1 costs a quarter of level 3's CPU for a fraction of a percent
/// more output on disk images (measured for `convert -c`).
const ZSTD_LEVEL: i32 = 1;

/// Checks a store's chunk size: a power of two from 512 KiB to 8 MiB.
pub fn check_chunk_size(size: u64) -> Result<()> {
    if size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "chunk size {size}: must be a power of two from 512K to 8M"
        )))
    }
}

/// The stored object for guest bytes `data`: compressed with zstd when that saves space, as is
/// otherwise.
pub fn encode_chunk(data: &[u8]) -> Result<Vec<u8>> {
    Ok(ChunkEncoder::new()?.encode(data)?.to_vec())
}

/// Encodes chunk after chunk with one zstd context and one output buffer. A fresh context and
/// fresh buffers for every 4 MiB chunk (allocated, faulted in and zeroed each time) cost a
/// sixth of `snapshot create`'s CPU time, as much as the compression of text.
pub struct ChunkEncoder {
    zstd: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
}

/// One encoded chunk object: its header, then its stored bytes (borrowed from the guest bytes
/// when they are stored as is, so they are not copied).
pub struct EncodedChunk<'a> {
    pub header: [u8; CHUNK_HEADER],
    pub stored: &'a [u8],
}

impl EncodedChunk<'_> {
    /// Bytes of the whole object.
    pub fn size(&self) -> usize {
        CHUNK_HEADER + self.stored.len()
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.size());
        v.extend_from_slice(&self.header);
        v.extend_from_slice(self.stored);
        v
    }
}

impl ChunkEncoder {
    pub fn new() -> Result<ChunkEncoder> {
        let zstd = zstd::bulk::Compressor::new(ZSTD_LEVEL)
            .map_err(|e| Error::invalid(format!("zstd: {e}")))?;
        Ok(ChunkEncoder {
            zstd,
            out: Vec::new(),
        })
    }

    /// The stored object for guest bytes `data` (see [`encode_chunk`]).
    pub fn encode<'a>(&'a mut self, data: &'a [u8]) -> Result<EncodedChunk<'a>> {
        if data.len() as u64 > MAX_CHUNK_SIZE {
            return Err(Error::invalid(format!(
                "chunk of {} bytes is larger than {MAX_CHUNK_SIZE}",
                data.len()
            )));
        }
        let room = zstd::compress_bound(data.len());
        if self.out.len() < room {
            self.out.resize(room, 0);
        }
        // Random bytes are judged from samples and stored as is: zstd level 1 passes over them
        // at about 2.4 GB/s and then copies them into raw blocks, a fifth of `snapshot
        // create`'s CPU time on the benchmark's image.
        if crate::entropy::looks_incompressible_sampled(data, 8) {
            return Ok(EncodedChunk {
                header: chunk_header(ChunkEncoding::Plain, data.len(), data),
                stored: data,
            });
        }
        let n = self
            .zstd
            .compress_to_buffer(data, &mut self.out[..])
            .map_err(|e| Error::invalid(format!("zstd: {e}")))?;
        let (encoding, stored) = if n < data.len() {
            (ChunkEncoding::Zstd, &self.out[..n])
        } else {
            (ChunkEncoding::Plain, data)
        };
        Ok(EncodedChunk {
            header: chunk_header(encoding, data.len(), stored),
            stored,
        })
    }
}

/// The header of a chunk object holding `raw_len` guest bytes as `stored`.
fn chunk_header(encoding: ChunkEncoding, raw_len: usize, stored: &[u8]) -> [u8; CHUNK_HEADER] {
    let mut header = [0; CHUNK_HEADER];
    header[..8].copy_from_slice(CHUNK_MAGIC);
    header[8] = encoding as u8;
    header[12..16].copy_from_slice(&(raw_len as u32).to_le_bytes());
    header[16..20].copy_from_slice(&(stored.len() as u32).to_le_bytes());
    header[20..24].copy_from_slice(&crc32c::crc32c(stored).to_le_bytes());
    header
}

/// Guest bytes of a decoded chunk, starting at a page boundary: a restore hands them to a
/// direct-I/O write as they are, without the copy through an aligned buffer (a sixteenth of a
/// restore's CPU time). The buffer goes back to a small pool when the chunk is dropped.
pub struct ChunkData {
    /// Initialized whole; the guest bytes are `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Buffers of dropped chunks, for the next chunks to reuse: a fresh 4 MiB buffer for every chunk
/// (faulted in page by page, zeroed, unmapped again) cost a tenth of a restore's CPU time.
static SPARE_BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// At most this many spare buffers are kept, and at most this many bytes in all: 16 buffers of
/// the default 4 MiB chunks, fewer of larger ones (a store of 256 MiB chunks keeps none, where
/// 16 would hold 4 GiB).
const MAX_SPARE_BUFFERS: usize = 16;
const MAX_SPARE_BYTES: usize = 80 << 20;
const ALIGN: usize = 4096;

/// An initialized buffer of at least `len` bytes, a spare one when one is large enough.
fn take_buffer(len: usize) -> Vec<u8> {
    let spare = SPARE_BUFFERS.lock().ok().and_then(|mut spare| {
        let fits = spare.iter().position(|b| b.len() >= len)?;
        Some(spare.swap_remove(fits))
    });
    // A fresh zeroed allocation this large comes straight from the kernel, already zero.
    spare.unwrap_or_else(|| vec![0u8; len])
}

fn give_back(buf: Vec<u8>) {
    if let Ok(mut spare) = SPARE_BUFFERS.lock()
        && spare.len() < MAX_SPARE_BUFFERS
        && spare.iter().map(Vec::len).sum::<usize>() + buf.len() <= MAX_SPARE_BYTES
    {
        spare.push(buf);
    }
}

/// Where in `buf` bytes that must end up page-aligned go, with at least `before` bytes in front
/// of them. Where the pointer cannot be aligned they simply follow those bytes (writers copy
/// unaligned data).
fn aligned_start(buf: &[u8], before: usize) -> usize {
    match buf.as_ptr().align_offset(ALIGN) {
        a if a >= ALIGN => before,
        a if a >= before => a,
        a => a + ALIGN,
    }
}

impl std::ops::Deref for ChunkData {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

impl Drop for ChunkData {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.buf));
    }
}

impl std::fmt::Debug for ChunkData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkData({} bytes)", self.len())
    }
}

thread_local! {
    /// One zstd decompression context per thread, reused chunk after chunk.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Checks a whole chunk object (header and stored bytes): magic, lengths, CRC and encoding.
/// Returns the encoding and the guest length.
fn check_object(name: &Path, object: &[u8]) -> Result<(ChunkEncoding, usize)> {
    let corrupt =
        |offset: u64, reason: String| Error::corrupt(name, "chunk header", offset, reason);
    if object.len() < CHUNK_HEADER {
        return Err(corrupt(0, format!("{} bytes is too short", object.len())));
    }
    if &object[..8] != CHUNK_MAGIC {
        return Err(corrupt(0, "bad magic (not a diskkit chunk)".into()));
    }
    let word = |at: usize| {
        u32::from_le_bytes([object[at], object[at + 1], object[at + 2], object[at + 3]])
    };
    let raw_len = word(12) as u64;
    let stored_len = word(16) as usize;
    if raw_len > MAX_CHUNK_SIZE {
        return Err(corrupt(
            12,
            format!("guest length {raw_len} is over {MAX_CHUNK_SIZE}"),
        ));
    }
    let stored = &object[CHUNK_HEADER..];
    if stored.len() != stored_len {
        return Err(corrupt(
            16,
            format!(
                "says {stored_len} stored bytes, the object has {}",
                stored.len()
            ),
        ));
    }
    if crc32c::crc32c(stored) != word(20) {
        return Err(corrupt(
            20,
            "CRC-32C of the stored bytes does not match".into(),
        ));
    }
    match object[8] {
        0 if stored.len() as u64 != raw_len => Err(corrupt(
            16,
            format!("stores {} bytes as is for {raw_len}", stored.len()),
        )),
        0 => Ok((ChunkEncoding::Plain, raw_len as usize)),
        1 => Ok((ChunkEncoding::Zstd, raw_len as usize)),
        other => Err(corrupt(8, format!("unknown encoding {other}"))),
    }
}

/// The `raw_len` guest bytes of zstd-compressed `stored` bytes.
fn decompress(name: &Path, stored: &[u8], raw_len: usize) -> Result<ChunkData> {
    let failed = |reason: String| Error::corrupt(name, "chunk data", CHUNK_HEADER as u64, reason);
    // Room for the header's length (at most MAX_CHUNK_SIZE) and a page more: a frame that holds
    // more fails to decompress rather than growing the buffer, and one that fills the slack
    // fails the length check below.
    let mut buf = take_buffer(raw_len + 2 * ALIGN);
    let start = aligned_start(&buf, 0);
    let room = &mut buf[start..start + raw_len + ALIGN];
    let n = DECOMPRESSOR.with_borrow_mut(|d| {
        let d = match d {
            Some(d) => d,
            None => d.insert(zstd::bulk::Decompressor::new()?),
        };
        d.decompress_to_buffer(stored, room)
    });
    // Owned by a chunk from here on, so that the buffer goes back to the pool on every path.
    let mut data = ChunkData {
        buf,
        start,
        end: start,
    };
    let n = n.map_err(|e| failed(format!("zstd: {e}")))?;
    if n != raw_len {
        return Err(failed(format!(
            "holds {n} bytes, the header says {raw_len}"
        )));
    }
    data.end = start + n;
    Ok(data)
}

/// The guest bytes of a stored chunk object (`name` says which, in errors). Checks the header,
/// the lengths, the CRC and the decompressed length; the caller checks the content's digest
/// against the chunk's name.
pub fn decode_chunk(name: &Path, object: &[u8]) -> Result<ChunkData> {
    let (encoding, raw_len) = check_object(name, object)?;
    let stored = &object[CHUNK_HEADER..];
    match encoding {
        ChunkEncoding::Plain => {
            let mut buf = take_buffer(raw_len + 2 * ALIGN);
            let start = aligned_start(&buf, 0);
            buf[start..start + raw_len].copy_from_slice(stored);
            Ok(ChunkData {
                buf,
                start,
                end: start + raw_len,
            })
        }
        ChunkEncoding::Zstd => decompress(name, stored, raw_len),
    }
}

/// [`decode_chunk`] of the `len`-byte object `from` reads (a chunk file), read into a buffer laid
/// out so that its stored bytes start at a page boundary: a chunk stored as is becomes its
/// guest bytes where it was read, without a copy. `from` must hold at least `len` bytes; a
/// `len` too large for any chunk object is refused before anything is read.
pub fn read_chunk(name: &Path, from: &mut dyn std::io::Read, len: usize) -> Result<ChunkData> {
    if len as u64 > CHUNK_HEADER as u64 + MAX_CHUNK_SIZE {
        return Err(Error::corrupt(
            name,
            "chunk",
            0,
            format!("{len} bytes is larger than any chunk object"),
        ));
    }
    let mut buf = take_buffer(len + 2 * ALIGN);
    let start = aligned_start(&buf, CHUNK_HEADER);
    let object = start - CHUNK_HEADER;
    let read = from.read_exact(&mut buf[object..object + len]);
    let mut data = ChunkData {
        buf,
        start,
        end: start,
    };
    read.map_err(|e| Error::io(name, "read chunk", e))?;
    let (encoding, raw_len) = check_object(name, &data.buf[object..object + len])?;
    match encoding {
        ChunkEncoding::Plain => {
            data.end = start + raw_len;
            Ok(data)
        }
        ChunkEncoding::Zstd => decompress(name, &data.buf[start..object + len], raw_len),
    }
}

/// What an index says about its snapshot, besides the chunk table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    /// The disk this is a snapshot of (`--name`, default the source's file name).
    pub name: String,
    /// Format of the image the snapshot was made from.
    pub source_format: String,
    pub virtual_size: u64,
    pub chunk_size: u64,
    /// Id of the snapshot this one was made against, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// The guest digest (`diskkit-guest-sha256-v1` at `chunk_size`), lowercase hex.
    pub digest: String,
    /// Identity of the source file (path, size, modification time), which lets a later
    /// snapshot of an overlay recognise its backing file as this snapshot's source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceIdentity>,
}

/// A source file as it was when it was snapshotted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceIdentity {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i128,
}

/// A snapshot index: its metadata and one digest (or [`HOLE`]) per chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotIndex {
    pub meta: SnapshotMeta,
    pub chunks: Vec<[u8; 32]>,
}

impl SnapshotIndex {
    /// Chunks a guest of `virtual_size` bytes has at `chunk_size`.
    pub fn chunk_count(virtual_size: u64, chunk_size: u64) -> u64 {
        virtual_size.div_ceil(chunk_size)
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let meta = serde_json::to_vec(&self.meta)
            .map_err(|e| Error::invalid(format!("snapshot metadata: {e}")))?;
        if meta.len() > MAX_META {
            return Err(Error::invalid(format!(
                "snapshot metadata of {} bytes is over {MAX_META} (too many or too long tags)",
                meta.len()
            )));
        }
        let mut out = Vec::with_capacity(INDEX_HEADER + meta.len() + 32 * self.chunks.len() + 32);
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        out.extend_from_slice(&meta);
        for c in &self.chunks {
            out.extend_from_slice(c);
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        Ok(out)
    }

    /// Parses an index object (`name` in errors), checking its length, checksum and the
    /// agreement of its chunk count with the sizes it records.
    pub fn decode(name: &Path, bytes: &[u8]) -> Result<SnapshotIndex> {
        let corrupt =
            |offset: u64, reason: String| Error::corrupt(name, "snapshot index", offset, reason);
        if bytes.len() < INDEX_HEADER + 32 {
            return Err(corrupt(0, format!("{} bytes is too short", bytes.len())));
        }
        if &bytes[..8] != INDEX_MAGIC {
            return Err(corrupt(
                0,
                "bad magic (not a diskkit snapshot index)".into(),
            ));
        }
        let meta_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        let mut count = [0u8; 8];
        count.copy_from_slice(&bytes[12..20]);
        let count = u64::from_le_bytes(count);
        if meta_len > MAX_META {
            return Err(corrupt(
                8,
                format!("metadata length {meta_len} is over {MAX_META}"),
            ));
        }
        let expected = count
            .checked_mul(32)
            .and_then(|t| t.checked_add((INDEX_HEADER + meta_len + 32) as u64));
        if expected != Some(bytes.len() as u64) {
            return Err(corrupt(
                12,
                format!(
                    "{count} chunks and {meta_len} bytes of metadata do not make the {} bytes of \
                     the object (truncated or damaged)",
                    bytes.len()
                ),
            ));
        }
        let body = bytes.len() - 32;
        if Sha256::digest(&bytes[..body]).as_slice() != &bytes[body..] {
            return Err(corrupt(
                body as u64,
                "checksum does not match the content".into(),
            ));
        }
        let meta_end = INDEX_HEADER + meta_len;
        let meta: SnapshotMeta = serde_json::from_slice(&bytes[INDEX_HEADER..meta_end])
            .map_err(|e| corrupt(INDEX_HEADER as u64, format!("metadata: {e}")))?;
        check_chunk_size(meta.chunk_size)
            .map_err(|e| corrupt(INDEX_HEADER as u64, e.to_string()))?;
        if Self::chunk_count(meta.virtual_size, meta.chunk_size) != count {
            return Err(corrupt(
                12,
                format!(
                    "{count} chunks for a guest of {} bytes in chunks of {}",
                    meta.virtual_size, meta.chunk_size
                ),
            ));
        }
        let chunks = bytes[meta_end..body]
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                d
            })
            .collect();
        Ok(SnapshotIndex { meta, chunks })
    }

    /// The snapshot's id: the hex of the first 16 bytes of the index's checksum (the index
    /// includes its creation time, so two snapshots of one disk differ).
    pub fn id_of(encoded: &[u8]) -> String {
        let tail = &encoded[encoded.len().saturating_sub(32)..];
        crate::digest::hex(&tail[..tail.len().min(16)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotIndex {
        SnapshotIndex {
            meta: SnapshotMeta {
                name: "data1".into(),
                source_format: "qcow2".into(),
                virtual_size: (10 << 20) + 5,
                chunk_size: 4 << 20,
                parent: None,
                created: 1_700_000_000,
                tags: [("env".to_string(), "prod".to_string())].into(),
                digest: "ab".repeat(32),
                source: None,
            },
            chunks: vec![[7; 32], HOLE, [9; 32]],
        }
    }

    #[test]
    fn index_round_trips_and_damage_is_named() {
        let idx = sample();
        let bytes = idx.encode().unwrap();
        let name = Path::new("store/snapshots/x");
        assert_eq!(SnapshotIndex::decode(name, &bytes).unwrap(), idx);
        assert_eq!(SnapshotIndex::id_of(&bytes).len(), 32);
        let truncated = SnapshotIndex::decode(name, &bytes[..bytes.len() - 1]).unwrap_err();
        assert!(truncated.to_string().contains("truncated"), "{truncated}");
        let mut flipped = bytes.clone();
        let at = flipped.len() - 40;
        flipped[at] ^= 1;
        let e = SnapshotIndex::decode(name, &flipped)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("checksum") && e.contains("store/snapshots/x"),
            "{e}"
        );
        // A count that would need a huge allocation is refused from the length alone.
        let mut huge = bytes.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(SnapshotIndex::decode(name, &huge).is_err());
    }

    #[test]
    fn chunks_round_trip_compressed_or_not() {
        let name = Path::new("c");
        let text = b"log line\n".repeat(10_000);
        let random: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for data in [&text[..], &random[..], &[][..]] {
            let enc = encode_chunk(data).unwrap();
            let decoded = decode_chunk(name, &enc).unwrap();
            assert_eq!(&*decoded, data);
            // Page-aligned, for direct-I/O writes straight from the chunk.
            assert_eq!(decoded.as_ptr() as usize % 4096, 0);
        }
        assert!(encode_chunk(&text).unwrap().len() < text.len() / 10);
        let mut enc = encode_chunk(&text).unwrap();
        let last = enc.len() - 1;
        enc[last] ^= 0xff;
        assert!(
            decode_chunk(name, &enc)
                .unwrap_err()
                .to_string()
                .contains("CRC")
        );
        let mut lying = encode_chunk(&text).unwrap();
        lying[12..16].copy_from_slice(&(MAX_CHUNK_SIZE as u32 + 1).to_le_bytes());
        assert!(decode_chunk(name, &lying).is_err());
    }

    #[test]
    fn chunk_sizes_are_powers_of_two_in_range() {
        assert!(check_chunk_size(4 << 20).is_ok());
        assert!(check_chunk_size(512 << 10).is_ok());
        assert!(check_chunk_size(256 << 10).is_err());
        assert!(check_chunk_size(16 << 20).is_err());
        assert!(check_chunk_size(3 << 20).is_err());
    }

    #[test]
    fn incompressible_chunks_are_stored_as_is() {
        let noise = crate::entropy::tests::noise(4 << 20, 7);
        let mut encoder = ChunkEncoder::new().unwrap();
        let name = Path::new("x");
        let plain = encoder.encode(&noise).unwrap();
        assert_eq!(plain.header[8], ChunkEncoding::Plain as u8);
        assert_eq!(&*decode_chunk(name, &plain.to_vec()).unwrap(), &noise[..]);
        // Partly compressible chunks are compressed.
        for start in [0usize, 1 << 20, (4 << 20) - (512 << 10)] {
            let mut mixed = noise.clone();
            mixed[start..start + (512 << 10)].fill(0);
            let encoded = encoder.encode(&mixed).unwrap();
            assert_eq!(
                encoded.header[8],
                ChunkEncoding::Zstd as u8,
                "zeros at {start}"
            );
            assert_eq!(&*decode_chunk(name, &encoded.to_vec()).unwrap(), &mixed[..]);
        }
    }
}

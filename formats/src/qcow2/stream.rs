//! qcow2 images as a stream of bytes computed on demand, so an image can be sent into object
//! storage in parts, in any order, without a file on disk.
//!
//! The whole layout follows from the source's allocated clusters, known before the first byte
//! is sent: the header (cluster 0), the L1 table, one L2 table per L1 entry that covers data,
//! the data region in guest order, then the refcount blocks and table. Tables are generated
//! when their bytes are asked for: memory grows with the number of allocated runs (plain) or
//! clusters (2 bytes each, compressed), not with the image size.
//!
//! Plain images store each allocated cluster that holds a non-zero byte (found by a read pass
//! before planning) in a host cluster of its own, so every refcount is 1 and every table entry
//! carries COPIED. Compressed images (`-c`) pack the compressed clusters
//! back to back, as qemu does; where the packing puts each cluster depends on the compressed size
//! of every cluster before it, and the tables in front of the data depend on the packing. So a
//! first pass compresses every cluster once and keeps only its compressed length; with those
//! lengths every byte of the image is again a function of the source, and the data region is
//! produced by compressing each cluster again when its bytes are asked for. Compression is
//! deterministic; a cluster whose second compression differs from the first is an error, never
//! a corrupt image. The cost is a second compression of every cluster, the price of needing no
//! local spool and of uploading parts in parallel and in any order (and resuming them).

use super::compress::compress;
use super::header::{CompressionType, Header};
use super::l2::{COPIED, Geometry, MAX_L1_BYTES};
use super::refcount::RefcountLayout;
use super::write::take_compression_type;
use crate::error::{Error, Result};
use crate::image::{Format, GuestRange, Image, check_guest_range, first_nonzero_byte};
use crate::nonzero::nonzero_granules;
use crate::stream::{
    ClusterRuns, ImageStream, PaddedStream, ReadGuest, StreamLayout, ZeroPadded, per_rank,
};
use crate::write::CreateOptions;

const CLUSTER_BITS: u32 = 16;
/// Cluster size of streamed images.
pub const CLUSTER_SIZE: u64 = 1 << CLUSTER_BITS;
/// 16-bit refcounts, qemu's default: a host cluster is shared by at most a few thousand
/// compressed clusters, far below the limit.
const REFCOUNT_ORDER: u32 = 4;
const REFCOUNT_LAYOUT: RefcountLayout = RefcountLayout {
    cluster_bits: CLUSTER_BITS,
    order: REFCOUNT_ORDER,
};
const GEOMETRY: Geometry = Geometry {
    cluster_bits: CLUSTER_BITS,
    extended_l2: false,
    has_data_file: false,
};

/// How the allocated clusters, by rank, lie in the data region.
enum DataLayout {
    /// One host cluster each, in rank order.
    Plain,
    Packed(Packed),
}

/// Code of a cluster that is all zeros: not stored, its L2 entry stays 0 (reads as zeros).
const ZERO_CODE: u16 = 0;
/// Code of a cluster stored uncompressed, at the next host cluster boundary: its compressed form
/// would not save a sector. Other codes are compressed lengths (at most 65024 bytes).
const PLAIN_CODE: u16 = u16::MAX;
/// Ranks placed from one recorded start: bounds the work of locating a cluster.
const GROUP: u64 = 256;

/// Compressed clusters packed back to back.
struct Packed {
    compression: CompressionType,
    /// One per allocated cluster, by rank: [`ZERO_CODE`], [`PLAIN_CODE`] or a compressed length.
    codes: Vec<u16>,
    /// Position in the data region where rank `g * GROUP` is placed from.
    group_starts: Vec<u64>,
}

/// Where a cluster lies in the data region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    rank: u64,
    start: u64,
    len: u64,
    code: u16,
}

impl Span {
    /// Host clusters (relative to the data region) the cluster's L2 entry references: qemu
    /// counts compressed data in whole 512-byte sectors.
    fn clusters(&self) -> std::ops::RangeInclusive<u64> {
        let end = (self.start + self.len).next_multiple_of(512);
        self.start / CLUSTER_SIZE..=(end - 1) / CLUSTER_SIZE
    }
}

/// Where the cluster of `code` goes when the data region is filled up to `pos`: its span
/// (start, length), if stored, and the fill position after it.
fn place(code: u16, pos: u64) -> (Option<(u64, u64)>, u64) {
    match code {
        ZERO_CODE => (None, pos),
        PLAIN_CODE => {
            let start = pos.next_multiple_of(CLUSTER_SIZE);
            (Some((start, CLUSTER_SIZE)), start + CLUSTER_SIZE)
        }
        len => (Some((pos, u64::from(len))), pos + u64::from(len)),
    }
}

impl Packed {
    /// Compresses every allocated cluster (by rank; `guest_of` gives its guest cluster) on all
    /// cores and keeps the codes. `compressed(n)` reports guest bytes done.
    fn plan(
        compression: CompressionType,
        ranks: u64,
        guest_of: &(dyn Fn(u64) -> Option<u64> + Sync),
        virtual_size: u64,
        read_guest: ReadGuest,
        compressed: &(dyn Fn(u64) + Sync),
    ) -> Result<Packed> {
        let codes = per_rank(ranks, GROUP, &|rank| {
            let mut cluster = vec![0u8; CLUSTER_SIZE as usize];
            let guest = guest_cluster(guest_of, rank)?;
            read_cluster(&mut cluster, guest, virtual_size, read_guest)?;
            compressed(CLUSTER_SIZE);
            Ok(code_of(compression, &cluster))
        })?;
        let mut group_starts = Vec::with_capacity(codes.len().div_ceil(GROUP as usize));
        let mut pos = 0;
        for (rank, &code) in codes.iter().enumerate() {
            if (rank as u64).is_multiple_of(GROUP) {
                group_starts.push(pos);
            }
            pos = place(code, pos).1;
        }
        Ok(Packed {
            compression,
            codes,
            group_starts,
        })
    }

    /// Bytes of the data region, up to the end of the last stored cluster.
    fn end(&self) -> u64 {
        let mut pos = self.group_starts.last().copied().unwrap_or(0);
        let from = self.group_starts.len().saturating_sub(1) * GROUP as usize;
        for &code in self.codes.get(from..).unwrap_or_default() {
            pos = place(code, pos).1;
        }
        pos
    }

    /// Stored clusters in rank order, from the group that holds position `at` on.
    fn spans_from(&self, at: u64) -> impl Iterator<Item = Span> + '_ {
        let g = self
            .group_starts
            .partition_point(|&s| s <= at)
            .saturating_sub(1);
        let first = g as u64 * GROUP;
        let mut pos = self.group_starts.get(g).copied().unwrap_or(0);
        (first..self.codes.len() as u64).filter_map(move |rank| {
            let code = self.codes[rank as usize];
            let (span, next) = place(code, pos);
            pos = next;
            span.map(|(start, len)| Span {
                rank,
                start,
                len,
                code,
            })
        })
    }

    /// The span of rank `rank`, if stored.
    fn span(&self, rank: u64) -> Option<Span> {
        let g = (rank / GROUP) as usize;
        let mut pos = *self.group_starts.get(g)?;
        for r in g as u64 * GROUP..rank {
            pos = place(*self.codes.get(r as usize)?, pos).1;
        }
        let code = *self.codes.get(rank as usize)?;
        place(code, pos).0.map(|(start, len)| Span {
            rank,
            start,
            len,
            code,
        })
    }
}

/// The guest cluster of rank `rank`.
fn guest_cluster(guest_of: &(dyn Fn(u64) -> Option<u64> + Sync), rank: u64) -> Result<u64> {
    guest_of(rank).ok_or_else(|| Error::invalid("qcow2 stream: data cluster out of range"))
}

/// Reads guest cluster `guest` whole into `buf`, zeros past the virtual size.
fn read_cluster(
    buf: &mut [u8],
    guest: u64,
    virtual_size: u64,
    read_guest: ReadGuest,
) -> Result<()> {
    let at = guest * CLUSTER_SIZE;
    let n = virtual_size.saturating_sub(at).min(CLUSTER_SIZE) as usize;
    read_guest(&mut buf[..n], at)?;
    buf[n..].fill(0);
    Ok(())
}

/// The code of a cluster with content `cluster`.
fn code_of(compression: CompressionType, cluster: &[u8]) -> u16 {
    if first_nonzero_byte(cluster).is_none() {
        return ZERO_CODE;
    }
    match compress(compression, cluster) {
        Some(z) if z.len() as u64 + 512 <= CLUSTER_SIZE => z.len() as u16,
        _ => PLAIN_CODE,
    }
}

/// The byte layout of a qcow2 v3 image with 64 KiB clusters, plain or compressed.
pub struct Qcow2Stream {
    virtual_size: u64,
    header: Vec<u8>,
    /// L1 entries, in memory (at most 32 MiB by the format's limit).
    l1: Vec<u64>,
    /// L1 indices that have an L2 table, ascending: table `k` is the `k`-th cluster of L2s.
    tables: Vec<u64>,
    runs: ClusterRuns,
    data: DataLayout,
    /// Host clusters of the data region.
    data_clusters: u64,
    l1_clusters: u64,
    refcount_blocks: u64,
    refcount_table_clusters: u64,
}

impl Qcow2Stream {
    /// Plans the image for a guest of `virtual_size` bytes whose data lies in `allocated`
    /// (guest ranges, ascending). Options: `-c` (`opts.compress`) with
    /// `compression_type=zlib|zstd` (zlib by default, as qemu); compressing reads every allocated
    /// cluster through `read_guest` once now, reporting guest bytes done to `compressed`.
    pub fn plan(
        virtual_size: u64,
        opts: &mut CreateOptions,
        allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
        read_guest: ReadGuest,
        compressed: &(dyn Fn(u64) + Sync),
    ) -> Result<Qcow2Stream> {
        let compression = take_compression_type(opts)?;
        opts.reject_unknown(crate::image::Format::Qcow2)?;
        if opts.backing_file.is_some() {
            return Err(Error::invalid(
                "streamed qcow2 output stands alone: no backing file",
            ));
        }
        // Whole sectors, as qemu sizes qcow2 guests; the caller supplies zeros past its end.
        let virtual_size = super::sectors_up(virtual_size)?;
        let cs = CLUSTER_SIZE;
        let l1_entries = GEOMETRY.l1_entries_for(virtual_size);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(format!(
                "qcow2: {virtual_size} bytes needs an L1 table above 32 MiB"
            )));
        }
        let runs = ClusterRuns::new(virtual_size, CLUSTER_SIZE, allocated)?;
        let ranks = runs.count();
        let per_l2 = GEOMETRY.l2_entries();
        let mut tables: Vec<u64> = Vec::new();
        for (first, count) in runs.iter() {
            let from = (first / per_l2).max(tables.last().map_or(0, |&t| t + 1));
            tables.extend(from..=(first + count - 1) / per_l2);
        }
        let (data, data_clusters) = if opts.compress {
            let guest_of = |rank| runs.cluster_of(rank);
            let packed = Packed::plan(
                compression,
                ranks,
                &guest_of,
                virtual_size,
                read_guest,
                compressed,
            )?;
            let clusters = packed.end().div_ceil(cs);
            (DataLayout::Packed(packed), clusters)
        } else {
            (DataLayout::Plain, ranks)
        };
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let before_refcounts = 1 + l1_clusters + tables.len() as u64 + data_clusters;
        let (refcount_blocks, refcount_table_clusters) =
            REFCOUNT_LAYOUT.structure_clusters(before_refcounts);
        let mut l1 = vec![0u64; l1_entries as usize];
        let l2_start = (1 + l1_clusters) * cs;
        for (k, &t) in tables.iter().enumerate() {
            if let Some(e) = l1.get_mut(t as usize) {
                *e = (l2_start + k as u64 * cs) | COPIED;
            }
        }
        let mut h = Header::new(3, CLUSTER_BITS, virtual_size, REFCOUNT_ORDER);
        h.l1_size = l1_entries as u32;
        h.l1_table_offset = cs;
        h.refcount_table_offset = (before_refcounts + refcount_blocks) * cs;
        h.refcount_table_clusters = u32::try_from(refcount_table_clusters)
            .map_err(|_| Error::invalid("qcow2: refcount table too large"))?;
        // Recorded even without -c, as qemu-img create does.
        h.compression = compression;
        Ok(Qcow2Stream {
            virtual_size,
            header: h.encode()?,
            l1,
            tables,
            runs,
            data,
            data_clusters,
            l1_clusters,
            refcount_blocks,
            refcount_table_clusters,
        })
    }

    /// Index of the first data cluster.
    fn data_start(&self) -> u64 {
        1 + self.l1_clusters + self.tables.len() as u64
    }

    fn total_clusters(&self) -> u64 {
        self.data_start() + self.data_clusters + self.refcount_blocks + self.refcount_table_clusters
    }

    pub fn object_size(&self) -> u64 {
        self.total_clusters() * CLUSTER_SIZE
    }

    /// Guest size of the image: the source's, rounded up to whole 512-byte sectors.
    pub fn guest_size(&self) -> u64 {
        self.virtual_size
    }

    /// What the layout depends on beyond the source and options: the compressed size of every
    /// cluster (hashed), or nothing for a plain image. A resumed upload must continue the same
    /// layout; another compressor build could pack the clusters differently.
    pub fn layout_fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        match &self.data {
            DataLayout::Plain => "plain".to_string(),
            DataLayout::Packed(p) => {
                let mut sha = Sha256::new();
                for code in &p.codes {
                    sha.update(code.to_le_bytes());
                }
                let digest: [u8; 32] = sha.finalize().into();
                format!("packed-{}", crate::digest::hex(&digest[..16]))
            }
        }
    }

    /// Rank of guest cluster `c` among the allocated ones, if allocated.
    fn rank_of(&self, c: u64) -> Option<u64> {
        self.runs.rank_of(c)
    }

    /// The L2 entry of guest cluster `c`.
    fn l2_entry(&self, c: u64) -> u64 {
        let Some(rank) = self.rank_of(c) else {
            return 0;
        };
        let data = self.data_start() * CLUSTER_SIZE;
        match &self.data {
            DataLayout::Plain => (data + rank * CLUSTER_SIZE) | COPIED,
            DataLayout::Packed(p) => match p.span(rank) {
                None => 0,
                Some(s) if s.code == PLAIN_CODE => (data + s.start) | COPIED,
                Some(s) => GEOMETRY.compressed_entry(data + s.start, s.len),
            },
        }
    }

    /// Fills `buf` with the image's bytes at `offset`; guest data comes from `read_guest`.
    pub fn fill(&self, buf: &mut [u8], offset: u64, read_guest: ReadGuest) -> Result<()> {
        let size = self.object_size();
        // The stream's bytes play the guest's part here: same bounds rule.
        check_guest_range(size, offset, buf.len() as u64)?;
        let cs = CLUSTER_SIZE;
        let (data_from, data_to) = (
            self.data_start() * cs,
            (self.data_start() + self.data_clusters) * cs,
        );
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            if (data_from..data_to).contains(&pos) {
                // The data region in one go: packed clusters straddle host clusters.
                let n = (buf.len() - done).min((data_to - pos) as usize);
                self.fill_data(&mut buf[done..done + n], pos - data_from, read_guest)?;
                done += n;
                continue;
            }
            let (cluster, within) = (pos / cs, pos % cs);
            let n = (buf.len() - done).min((cs - within) as usize);
            self.fill_metadata(&mut buf[done..done + n], cluster, within)?;
            done += n;
        }
        Ok(())
    }

    /// Fills `out` with the data region's bytes from `at` (relative to its start).
    fn fill_data(&self, out: &mut [u8], at: u64, read_guest: ReadGuest) -> Result<()> {
        let cs = CLUSTER_SIZE;
        let guest_of = |rank| guest_cluster(&|r| self.runs.cluster_of(r), rank);
        let packed = match &self.data {
            DataLayout::Plain => {
                let mut done = 0;
                while done < out.len() {
                    let pos = at + done as u64;
                    let (rank, within) = (pos / cs, pos % cs);
                    let n = (out.len() - done).min((cs - within) as usize);
                    let guest = guest_of(rank)? * cs + within;
                    let piece = &mut out[done..done + n];
                    let from_guest = self.virtual_size.saturating_sub(guest).min(n as u64);
                    // A piece wholly past the guest's end (the tail of its last cluster) reads
                    // nothing: asking the source for bytes there would be out of range.
                    if from_guest > 0 {
                        read_guest(&mut piece[..from_guest as usize], guest)?;
                    }
                    piece[from_guest as usize..].fill(0);
                    done += n;
                }
                return Ok(());
            }
            DataLayout::Packed(p) => p,
        };
        out.fill(0);
        let end = at + out.len() as u64;
        let mut cluster = vec![0u8; cs as usize];
        for span in packed.spans_from(at) {
            if span.start >= end {
                break;
            }
            if span.start + span.len <= at {
                continue;
            }
            read_cluster(
                &mut cluster,
                guest_of(span.rank)?,
                self.virtual_size,
                read_guest,
            )?;
            let stored = if span.code == PLAIN_CODE {
                cluster.clone()
            } else {
                compress(packed.compression, &cluster)
                    .filter(|z| z.len() as u64 == span.len)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "guest cluster at {:#x} compressed differently on the second pass \
                             (the source changed during the push?)",
                            guest_of(span.rank).unwrap_or(0) * cs
                        ))
                    })?
            };
            let from = span.start.max(at);
            let to = (span.start + span.len).min(end);
            out[(from - at) as usize..(to - at) as usize]
                .copy_from_slice(&stored[(from - span.start) as usize..(to - span.start) as usize]);
        }
        Ok(())
    }

    /// Refcount of host cluster `cluster` of the file.
    fn refcount(&self, cluster: u64, packed_counts: &mut Option<(u64, Vec<u16>)>) -> u64 {
        let data = self.data_start();
        if cluster >= self.total_clusters() {
            return 0;
        }
        let DataLayout::Packed(p) = &self.data else {
            return 1;
        };
        if !(data..data + self.data_clusters).contains(&cluster) {
            return 1;
        }
        // Counts of the data clusters one refcount block covers, computed once per block.
        let per_block = REFCOUNT_LAYOUT.per_block();
        let rel = cluster - data;
        let window = rel / per_block * per_block;
        if packed_counts.as_ref().is_none_or(|(w, _)| *w != window) {
            let mut counts = vec![0u16; per_block as usize];
            let window_end = window + per_block;
            for span in p.spans_from(window * CLUSTER_SIZE) {
                if span.start >= window_end * CLUSTER_SIZE {
                    break;
                }
                for c in span.clusters() {
                    if (window..window_end).contains(&c) {
                        let n = &mut counts[(c - window) as usize];
                        *n = n.saturating_add(1);
                    }
                }
            }
            *packed_counts = Some((window, counts));
        }
        packed_counts
            .as_ref()
            .map_or(0, |(_, counts)| u64::from(counts[(rel - window) as usize]))
    }

    /// Fills `out` with metadata cluster `cluster`'s bytes from `within` on.
    fn fill_metadata(&self, out: &mut [u8], cluster: u64, within: u64) -> Result<()> {
        let cs = CLUSTER_SIZE;
        let data = self.data_start();
        let refcounts = data + self.data_clusters;
        let table = refcounts + self.refcount_blocks;
        // 8-byte big-endian words of a generated cluster: word `i` is `word(i)`.
        let words = |out: &mut [u8], word: &mut dyn FnMut(u64) -> u64| {
            for (i, b) in out.iter_mut().enumerate() {
                let at = within + i as u64;
                *b = word(at / 8).to_be_bytes()[(at % 8) as usize];
            }
        };
        if cluster == 0 {
            out.fill(0);
            let from = (within as usize).min(self.header.len());
            let n = out.len().min(self.header.len() - from);
            out[..n].copy_from_slice(&self.header[from..from + n]);
        } else if cluster < 1 + self.l1_clusters {
            let base = (cluster - 1) * cs / 8;
            words(out, &mut |i| {
                self.l1.get((base + i) as usize).copied().unwrap_or(0)
            });
        } else if cluster < data {
            let l1_index = self.tables[(cluster - 1 - self.l1_clusters) as usize];
            let first = l1_index * (cs / 8);
            // Each entry is asked for 8 times (once per byte): remember the last one.
            let mut last: Option<(u64, u64)> = None;
            words(out, &mut |i| {
                let c = first + i;
                match last {
                    Some((at, e)) if at == c => e,
                    _ => {
                        let e = if c * cs < self.virtual_size {
                            self.l2_entry(c)
                        } else {
                            0
                        };
                        last = Some((c, e));
                        e
                    }
                }
            });
        } else if cluster < refcounts {
            return Err(Error::invalid(
                "qcow2 stream: data cluster filled as metadata",
            ));
        } else if cluster < table {
            // 16-bit big-endian refcounts.
            let first = (cluster - refcounts) * cs / 2;
            let mut counts = None;
            for (i, b) in out.iter_mut().enumerate() {
                let at = within + i as u64;
                let n = self.refcount(first + at / 2, &mut counts);
                *b = (n as u16).to_be_bytes()[(at % 2) as usize];
            }
        } else {
            let base = (cluster - table) * cs / 8;
            words(out, &mut |i| {
                let b = base + i;
                if b < self.refcount_blocks {
                    (refcounts + b) * cs
                } else {
                    0
                }
            });
        }
        Ok(())
    }
}

/// `src` laid out as a plain or compressed (`-c`) qcow2 image (see [`crate::stream`]).
pub(crate) fn stream<'a>(
    src: &'a dyn Image,
    opts: &mut CreateOptions,
    allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
    compressing: &(dyn Fn(u64) + Sync),
) -> Result<Box<dyn ImageStream + 'a>> {
    // The guest is rounded up to whole sectors: zeros past the source's end.
    let guest = ZeroPadded::new(src, super::sectors_up(src.virtual_size())?);
    // Clusters that hold only zeros are not stored: a plain image finds them in a read pass
    // first (a compressed one finds them while compressing).
    let layout = {
        let mut nonzero;
        let allocated: &mut dyn Iterator<Item = Result<GuestRange>> = if opts.compress {
            allocated
        } else {
            nonzero = nonzero_granules(&guest, allocated, CLUSTER_SIZE);
            &mut nonzero
        };
        Qcow2Stream::plan(
            src.virtual_size(),
            opts,
            allocated,
            &|buf, at| guest.read_at(buf, at),
            compressing,
        )?
    };
    Ok(Box::new(PaddedStream { layout, guest }))
}

impl StreamLayout for Qcow2Stream {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn size(&self) -> u64 {
        self.object_size()
    }

    fn layout_fingerprint(&self) -> String {
        Qcow2Stream::layout_fingerprint(self)
    }

    fn fill(&self, buf: &mut [u8], offset: u64, read_guest: ReadGuest) -> Result<()> {
        Qcow2Stream::fill(self, buf, offset, read_guest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::open::{OpenOptions, open};

    /// Guest content: a byte pattern, some of it compressible, some clusters all zero.
    fn pattern(b: &mut [u8], at: u64) -> Result<()> {
        for (i, x) in b.iter_mut().enumerate() {
            let p = at + i as u64;
            *x = match (p >> 16) % 4 {
                0 => (p % 251) as u8,
                1 => 0,
                2 => {
                    // splitmix64: incompressible.
                    let mut z = p.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    (z ^ (z >> 31)) as u8
                }
                _ => b"text "[(p % 5) as usize],
            };
        }
        Ok(())
    }

    /// The stream's bytes in one piece, and again in odd pieces: they must agree.
    fn bytes_of(s: &Qcow2Stream) -> Vec<u8> {
        let mut all = vec![0u8; s.object_size() as usize];
        let mut pieces = vec![0u8; all.len()];
        s.fill(&mut all, 0, &pattern).unwrap();
        for (i, chunk) in pieces.chunks_mut(100_003).enumerate() {
            s.fill(chunk, i as u64 * 100_003, &pattern).unwrap();
        }
        assert!(all == pieces);
        all
    }

    fn plan(size: u64, ranges: Vec<(u64, u64)>, opts: &mut CreateOptions) -> Qcow2Stream {
        let mut ranges = ranges
            .into_iter()
            .map(|(start, len)| Ok(GuestRange::new(start, start + len)));
        Qcow2Stream::plan(size, opts, &mut ranges, &pattern, &|_| {}).unwrap()
    }

    /// Writes `bytes` to a file and checks that it passes our check and reads as the pattern in
    /// `ranges` (zeros elsewhere).
    fn assert_image(bytes: &[u8], size: u64, ranges: &[(u64, u64)]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.qcow2");
        std::fs::write(&path, bytes).unwrap();
        let report = crate::check::check(crate::image::Format::Qcow2, &path, None)
            .unwrap()
            .unwrap();
        assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
        let image = open(&path, &OpenOptions::default()).unwrap();
        let mut guest = vec![0u8; size as usize];
        image.read_at(&mut guest, 0).unwrap();
        let mut want = vec![0u8; size as usize];
        for &(start, len) in ranges {
            let r = start as usize..(start + len) as usize;
            pattern(&mut want[r.clone()], start).unwrap();
            // Allocation is per cluster: the rest of a touched cluster is the pattern too.
            let c = (start / CLUSTER_SIZE * CLUSTER_SIZE) as usize
                ..((start + len).next_multiple_of(CLUSTER_SIZE).min(size)) as usize;
            pattern(&mut want[c.clone()], c.start as u64).unwrap();
        }
        assert!(guest == want);
    }

    #[test]
    fn plain_layout_of_two_runs() {
        let ranges = vec![(100, 10), (3 << 16, 2 << 16), (600 << 20, 1)];
        let s = plan(1 << 30, ranges.clone(), &mut CreateOptions::default());
        assert_eq!(s.data_clusters, 4);
        assert_eq!(s.tables, vec![0, 1]);
        assert_eq!(s.l2_entry(3), ((s.data_start() + 1) << 16) | COPIED);
        assert_eq!(s.l2_entry(2), 0);
        assert_eq!(s.runs.cluster_of(3), Some((600 << 20) >> 16));
        let all = bytes_of(&s);
        assert_eq!(&all[..4], b"QFI\xfb");
        assert_image(&all, 1 << 30, &ranges);
    }

    #[test]
    fn compressed_layout_packs_clusters() {
        for kind in ["zlib", "zstd"] {
            let mut opts = CreateOptions {
                compress: true,
                ..Default::default()
            };
            opts.parse_options(&format!("compression_type={kind}"))
                .unwrap();
            // 40 clusters of all four kinds, an odd tail, and a run in a second L2 table.
            let size = (600 << 20) + 1000;
            let ranges = vec![(0, 40 << 16), (600 << 20, 1000)];
            let s = plan(size, ranges.clone(), &mut opts);
            let DataLayout::Packed(p) = &s.data else {
                panic!("not packed");
            };
            assert_eq!(p.codes.len(), 41);
            assert!(p.codes.contains(&ZERO_CODE) && p.codes.contains(&PLAIN_CODE));
            // Compressible clusters share host clusters: fewer data clusters than stored ones.
            assert!(s.data_clusters < 30, "{}", s.data_clusters);
            assert_image(&bytes_of(&s), size, &ranges);
        }
    }
}

//! Stream-optimized VMDKs as a stream of bytes computed on demand, so a disk can be sent into
//! object storage in parts, in any order, or put in a tar (OVA) whose member sizes come first,
//! without a file on disk.
//!
//! The layout: header and descriptor ([`STREAM_DATA_START`] sectors), then for each grain table
//! span (32 MiB of guest) that stores a grain: its grains in guest order, each a grain marker
//! and a zlib stream padded to whole sectors, then the grain table behind its marker; then the
//! grain directory behind its marker, the footer behind its marker and the end-of-stream
//! marker. All-zero grains are not stored.
//!
//! Where each grain lies depends on the compressed size of every grain before it, as in the
//! compressed qcow2 stream (`qcow2/stream.rs`), and the same approach applies: a first pass
//! compresses every allocated grain once on all cores and keeps one byte per grain, its size in
//! sectors; from those every byte of the file is a function of the source, and a grain's bytes
//! are produced by compressing it again when they are asked for. Compression is deterministic;
//! a grain that compresses to another size the second time is an error, never a corrupt disk.
//! Memory: one byte per allocated grain (16 KiB per GiB of data) and one entry per grain table.

use super::layout::{
    ContentId, GRAIN_BYTES, GRAIN_MARKER_BYTES, GRAIN_SECTORS, GT_BLOCK_SECTORS, GTES_PER_GT,
    SECTOR, STREAM_DATA_START, Subformat, VmdkOptions, grain_record, gt_block,
};
use crate::error::{Error, Result};
use crate::image::{Format, GuestRange, Image, check_guest_range};
use crate::stream::{ClusterRuns, ImageStream, PaddedStream, ReadGuest, StreamLayout, ZeroPadded};
use crate::write::CreateOptions;

/// A grain table span that stores at least one grain.
struct Span {
    /// Grain table number (guest byte `table * GT_SPAN` on).
    table: u64,
    /// Rank of the span's first allocated grain.
    first_rank: u64,
    /// Sector of its first grain; the grain table's marker follows the last one at `end`.
    start: u64,
    end: u64,
}

/// Grains compressed together in the planning pass (8 MiB of guest): memory is two windows of
/// compressed grains.
const WINDOW_GRAINS: u64 = 128;

/// Where a planning pass sends the file's bytes, in order, as it lays them out: so one
/// compression pass writes (or hashes) the whole file. The header comes first, so its CID is
/// the caller's (a function of what the caller knows beforehand), not the stored grains'.
pub struct Emit<'e> {
    pub cid: u32,
    pub bytes: &'e mut (dyn FnMut(&[u8]) -> Result<()> + Send),
}

/// The planning pass's state: grains placed in guest order, grain tables closed as their span
/// ends.
struct Placer<'e> {
    sectors: Vec<u8>,
    spans: Vec<Span>,
    id: ContentId,
    /// Sector where the next grain or grain table goes.
    pos: u64,
    /// The span being filled and its grain table entries.
    open: Option<(Span, Vec<u32>)>,
    emit: Option<Emit<'e>>,
}

impl Placer<'_> {
    fn emit(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.emit {
            Some(e) => (e.bytes)(bytes),
            None => Ok(()),
        }
    }

    /// Places guest grain `grain` of rank `rank`, stored as `record` (`None`: all zeros).
    fn grain(&mut self, rank: u64, grain: u64, record: Option<Vec<u8>>) -> Result<()> {
        let table = grain / GTES_PER_GT;
        if self.open.as_ref().is_none_or(|(s, _)| s.table != table) {
            self.close_span()?;
            let span = Span {
                table,
                first_rank: rank,
                start: self.pos,
                end: self.pos,
            };
            self.open = Some((span, vec![0; GTES_PER_GT as usize]));
        }
        // A grain record is at most 2 grains (grain_record): one byte each in practice.
        let n = u8::try_from(record.as_ref().map_or(0, |r| r.len() as u64 / SECTOR))
            .map_err(|_| Error::invalid("vmdk stream: a grain stored in over 255 sectors"))?;
        self.sectors.push(n);
        if let Some(r) = record {
            self.id.add(grain * GRAIN_SECTORS, u64::from(n));
            if let Some((_, entries)) = &mut self.open {
                // Past 2 TiB the plan fails at its end: the truncated entry is never used.
                entries[(grain % GTES_PER_GT) as usize] = self.pos as u32;
            }
            self.emit(&r)?;
            self.pos += u64::from(n);
        }
        Ok(())
    }

    /// Ends the open span: its grain table follows its grains if it stores any.
    fn close_span(&mut self) -> Result<()> {
        if let Some((mut span, entries)) = self.open.take()
            && self.pos > span.start
        {
            span.end = self.pos;
            self.emit(&gt_block(&entries))?;
            self.spans.push(span);
            self.pos += GT_BLOCK_SECTORS;
        }
        Ok(())
    }
}

/// The byte layout of a stream-optimized VMDK of a guest whose allocated grains are known.
pub struct StreamOptimizedLayout {
    opts: VmdkOptions,
    head: Vec<u8>,
    runs: ClusterRuns,
    /// Sectors each allocated grain (by rank) takes stored; 0: all zeros, not stored.
    sectors: Vec<u8>,
    spans: Vec<Span>,
    /// Sector of the grain directory's marker: everything from here on is [`Self::tail`].
    tail_at: u64,
    tail: Vec<u8>,
    fingerprint: String,
}

impl StreamOptimizedLayout {
    /// Plans the disk for a guest of `virtual_size` bytes (rounded up to whole sectors) whose
    /// data lies in `allocated` (guest ranges, ascending), with the VMDK `-o` options in
    /// `opts` (`subformat` must be streamOptimized or absent). Reads and compresses every
    /// allocated grain through `read_guest` once, on all cores, reporting guest bytes done to
    /// `compressed`. `name` is the file name the embedded descriptor records.
    pub fn plan(
        virtual_size: u64,
        opts: &mut CreateOptions,
        allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
        name: &str,
        read_guest: ReadGuest,
        compressed: &(dyn Fn(u64) + Sync),
        emit: Option<Emit<'_>>,
    ) -> Result<StreamOptimizedLayout> {
        opts.options
            .entry("subformat".into())
            .or_insert_with(|| "streamOptimized".into());
        // The option is implied: -c adds nothing (and stream() refuses it for non-qcow2).
        opts.compress = false;
        let vmdk = VmdkOptions::take(virtual_size, opts)?;
        if vmdk.subformat != Subformat::StreamOptimized {
            return Err(Error::invalid(
                "streamed VMDKs are subformat=streamOptimized (monolithicSparse needs a file)",
            ));
        }
        let guest_size = vmdk.guest_size();
        let runs = ClusterRuns::new(guest_size, GRAIN_BYTES, allocated)?;
        let given_cid = emit.as_ref().map(|e| e.cid);
        let mut placer = Placer {
            sectors: Vec::with_capacity(runs.count() as usize),
            spans: Vec::new(),
            id: ContentId::default(),
            pos: STREAM_DATA_START,
            open: None,
            emit,
        };
        if let Some(cid) = given_cid {
            placer.emit(&vmdk.stream_head(name, cid)?)?;
        }
        // Windows of grains compressed on all cores while the previous window is placed (and
        // its bytes emitted) on this thread.
        let compress = |w: u64| -> Result<Vec<Option<Vec<u8>>>> {
            use rayon::prelude::*;
            (w * WINDOW_GRAINS..((w + 1) * WINDOW_GRAINS).min(runs.count()))
                .into_par_iter()
                .map(|rank| {
                    let record = record_of(cluster(&runs, rank)?, guest_size, read_guest)?;
                    compressed(GRAIN_BYTES);
                    Ok(record)
                })
                .collect()
        };
        let windows = runs.count().div_ceil(WINDOW_GRAINS);
        let mut ready = if windows > 0 {
            compress(0)?
        } else {
            Vec::new()
        };
        for w in 0..windows {
            let records = std::mem::take(&mut ready);
            let (placed, next) = rayon::join(
                || -> Result<()> {
                    for (rank, record) in (w * WINDOW_GRAINS..).zip(records) {
                        placer.grain(rank, cluster(&runs, rank)?, record)?;
                    }
                    Ok(())
                },
                || {
                    if w + 1 < windows {
                        compress(w + 1)
                    } else {
                        Ok(Vec::new())
                    }
                },
            );
            placed?;
            ready = next?;
        }
        placer.close_span()?;
        let pos = placer.pos;
        // Grain table entries and the directory hold 32-bit sector numbers.
        if pos + vmdk.stream_tail_sectors() > u64::from(u32::MAX) {
            return Err(Error::invalid(
                "this disk's stream-optimized VMDK would pass 2 TiB, the format's limit",
            ));
        }
        let mut gd = vec![0u32; vmdk.gd_entries() as usize];
        for s in &placer.spans {
            if let Some(e) = gd.get_mut(s.table as usize) {
                *e = (s.end + 1) as u32;
            }
        }
        let tail = vmdk.stream_tail(&gd, pos);
        placer.emit(&tail)?;
        let (digest, content_cid) = placer.id.finish(vmdk.capacity);
        let mut fingerprint = format!("stream-optimized-{}", crate::digest::hex(&digest[..16]));
        if let Some(cid) = given_cid {
            fingerprint += &format!("-cid-{cid:08x}");
        }
        let cid = given_cid.unwrap_or(content_cid);
        Ok(StreamOptimizedLayout {
            head: vmdk.stream_head(name, cid)?,
            tail,
            opts: vmdk,
            runs,
            sectors: placer.sectors,
            spans: placer.spans,
            tail_at: pos,
            fingerprint,
        })
    }

    /// Guest size of the disk: the source's, rounded up to whole sectors.
    pub fn guest_size(&self) -> u64 {
        self.opts.guest_size()
    }

    /// Fills the start of `out` (file offset `pos`, inside `span`'s grains) up to the end of
    /// `out` or of the grains; returns the file offset reached.
    fn fill_grains(
        &self,
        span: &Span,
        out: &mut [u8],
        pos: u64,
        read_guest: ReadGuest,
    ) -> Result<u64> {
        let stop = (pos + out.len() as u64).min(span.end * SECTOR);
        let mut at = span.start * SECTOR;
        let mut rank = span.first_rank;
        while at < stop {
            let n = u64::from(
                *self
                    .sectors
                    .get(rank as usize)
                    .ok_or_else(|| Error::invalid("vmdk stream: grain past the planned ones"))?,
            ) * SECTOR;
            let grain = cluster(&self.runs, rank)?;
            rank += 1;
            if n == 0 || at + n <= pos {
                at += n;
                continue;
            }
            let record = record_of(grain, self.guest_size(), read_guest)?
                .filter(|r| r.len() as u64 == n)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "guest grain at {:#x} compressed differently on the second pass (the \
                         source changed during the upload?)",
                        grain * GRAIN_BYTES
                    ))
                })?;
            let from = pos.max(at);
            let to = stop.min(at + n);
            out[(from - pos) as usize..(to - pos) as usize]
                .copy_from_slice(&record[(from - at) as usize..(to - at) as usize]);
            at += n;
        }
        Ok(stop)
    }

    /// The grain table of `span`: the sector of each stored grain.
    fn table(&self, span: &Span) -> Result<Vec<u32>> {
        let mut entries = vec![0u32; GTES_PER_GT as usize];
        let mut at = span.start;
        let mut rank = span.first_rank;
        while at < span.end {
            let grain = cluster(&self.runs, rank)?;
            let n = u64::from(self.sectors[rank as usize]);
            if n > 0 {
                entries[(grain % GTES_PER_GT) as usize] = at as u32;
            }
            at += n;
            rank += 1;
        }
        Ok(entries)
    }
}

impl StreamLayout for StreamOptimizedLayout {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    /// Bytes of the whole file.
    fn size(&self) -> u64 {
        self.tail_at * SECTOR + self.tail.len() as u64
    }

    /// Identifies the compressed size of every grain: a resumed upload must continue the same
    /// layout.
    fn layout_fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    fn fill(&self, buf: &mut [u8], offset: u64, read_guest: ReadGuest) -> Result<()> {
        // The stream's bytes play the guest's part here: same bounds rule.
        check_guest_range(self.size(), offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let out = &mut buf[(pos - offset) as usize..];
            let next = if pos < STREAM_DATA_START * SECTOR {
                pos + copy_from(out, &self.head, pos)
            } else if pos >= self.tail_at * SECTOR {
                pos + copy_from(out, &self.tail, pos - self.tail_at * SECTOR)
            } else {
                let i = self
                    .spans
                    .partition_point(|s| s.start * SECTOR <= pos)
                    .checked_sub(1)
                    .ok_or_else(|| Error::invalid("vmdk stream: offset before the grains"))?;
                let span = &self.spans[i];
                if pos < span.end * SECTOR {
                    self.fill_grains(span, out, pos, read_guest)?
                } else {
                    let block = gt_block(&self.table(span)?);
                    pos + copy_from(out, &block, pos - span.end * SECTOR)
                }
            };
            pos = next;
        }
        Ok(())
    }
}

fn cluster(runs: &ClusterRuns, rank: u64) -> Result<u64> {
    runs.cluster_of(rank)
        .ok_or_else(|| Error::invalid("vmdk stream: grain rank out of range"))
}

/// The stored form of guest grain `grain` (see [`grain_record`]), read through `read_guest`;
/// bytes past the guest's end are zeros.
fn record_of(grain: u64, guest_size: u64, read_guest: ReadGuest) -> Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; GRAIN_BYTES as usize];
    let at = grain * GRAIN_BYTES;
    let n = guest_size.saturating_sub(at).min(GRAIN_BYTES) as usize;
    read_guest(&mut buf[..n], at)?;
    stored_grain(&buf, grain * GRAIN_SECTORS)
}

thread_local! {
    // A level-0 (stored blocks) zlib compressor per thread, reset for each grain.
    static STORED: std::cell::RefCell<Option<flate2::Compress>> = const { std::cell::RefCell::new(None) };
}

/// A grain's record as both streamOptimized writers store it: [`grain_record`] (deflate), or for
/// a grain that looks incompressible ([`crate::entropy`]: deflating it costs about 300 times
/// storing it and saves nothing) the same record holding a zlib stream of stored blocks, which
/// every inflater reads. `None`: all zeros.
pub(super) fn stored_grain(grain: &[u8], lba: u64) -> Result<Option<Vec<u8>>> {
    if !crate::entropy::looks_incompressible(grain) {
        return grain_record(grain, lba);
    }
    STORED.with(|cell| {
        let mut slot = cell.borrow_mut();
        let z =
            slot.get_or_insert_with(|| flate2::Compress::new(flate2::Compression::none(), true));
        z.reset();
        // Stored blocks: 5 bytes per 64 KiB block, 6 of zlib wrapper.
        let mut out =
            Vec::with_capacity(GRAIN_MARKER_BYTES + grain.len() + grain.len() / 1024 + 64);
        out.resize(GRAIN_MARKER_BYTES, 0);
        match z.compress_vec(grain, &mut out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => {}
            other => {
                return Err(Error::invalid(format!(
                    "zlib stored blocks of the grain at sector {lba}: {other:?}"
                )));
            }
        }
        let size = (out.len() - GRAIN_MARKER_BYTES) as u32;
        out[..8].copy_from_slice(&lba.to_le_bytes());
        out[8..GRAIN_MARKER_BYTES].copy_from_slice(&size.to_le_bytes());
        out.resize((out.len() as u64).next_multiple_of(SECTOR) as usize, 0);
        Ok(Some(out))
    })
}

/// Copies `src[from..]` into the start of `dst`; returns the number of bytes copied.
fn copy_from(dst: &mut [u8], src: &[u8], from: u64) -> u64 {
    let src = src.get(from as usize..).unwrap_or_default();
    let n = dst.len().min(src.len());
    dst[..n].copy_from_slice(&src[..n]);
    n as u64
}

/// `src` laid out as a stream-optimized VMDK whose embedded descriptor names the file `name`:
/// the API for callers that know the file's name (an OVA's disk). `opts` takes the VMDK `-o`
/// options (`adapter_type`, `hwversion`); `allocated` yields the guest ranges of `src` that
/// hold data, ascending; planning compresses every allocated grain once, reporting guest bytes
/// done to `compressing`, and hands the file's bytes in order to `emit` if given.
pub fn stream_optimized<'a>(
    src: &'a dyn Image,
    name: &str,
    opts: &mut CreateOptions,
    allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
    compressing: &(dyn Fn(u64) + Sync),
    emit: Option<Emit<'_>>,
) -> Result<Box<dyn ImageStream + 'a>> {
    let guest = ZeroPadded::new(src, src.virtual_size().next_multiple_of(SECTOR));
    let layout = StreamOptimizedLayout::plan(
        src.virtual_size(),
        opts,
        allocated,
        name,
        &|buf, at| guest.read_at(buf, at),
        compressing,
        emit,
    )?;
    Ok(Box::new(PaddedStream { layout, guest }))
}

/// The format table's stream: the descriptor names the source's file name with `.vmdk`.
pub(crate) fn stream<'a>(
    src: &'a dyn Image,
    opts: &mut CreateOptions,
    allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
    compressing: &(dyn Fn(u64) + Sync),
) -> Result<Box<dyn ImageStream + 'a>> {
    let name = src
        .info()
        .filename
        .file_stem()
        .map(|s| format!("{}.vmdk", s.to_string_lossy()))
        .unwrap_or_else(|| "disk.vmdk".into());
    stream_optimized(src, &name, opts, allocated, compressing, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::open::{OpenOptions, open};

    /// Guest content: compressible, zero and incompressible grains.
    fn pattern(b: &mut [u8], at: u64) -> Result<()> {
        for (i, x) in b.iter_mut().enumerate() {
            let p = at + i as u64;
            *x = match (p >> 16) % 3 {
                0 => (p % 251) as u8,
                1 => 0,
                _ => (p.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ (p >> 8) as u8,
            };
        }
        Ok(())
    }

    #[test]
    fn stream_reads_back_as_the_guest_in_any_pieces() {
        // Two grain table spans with data, one with only a zero grain, an odd tail.
        let size = (100 << 20) + 1000;
        let ranges = [
            (0, 40 << 16),
            ((40 << 20) + (1 << 16), 100),
            (100 << 20, 1000),
        ];
        let plan = |emit| {
            let mut allocated = ranges.iter().map(|&(s, n)| Ok(GuestRange::new(s, s + n)));
            let mut opts = CreateOptions::default();
            opts.parse_options("adapter_type=lsilogic").unwrap();
            StreamOptimizedLayout::plan(
                size,
                &mut opts,
                &mut allocated,
                "t.vmdk",
                &pattern,
                &|_| {},
                emit,
            )
            .unwrap()
        };
        let s = plan(None);
        assert_eq!(s.spans.len(), 2);
        let mut all = vec![0u8; s.size() as usize];
        s.fill(&mut all, 0, &pattern).unwrap();
        let mut pieces = vec![0u8; all.len()];
        for (i, chunk) in pieces.chunks_mut(70_001).enumerate().rev() {
            s.fill(chunk, i as u64 * 70_001, &pattern).unwrap();
        }
        assert!(all == pieces);
        assert_eq!(&all[..4], b"KDMV");
        // Planned with an emitter: the same file, handed over in order during the plan.
        let mut emitted = Vec::new();
        let cid = 0x1234_5678;
        let e = plan(Some(Emit {
            cid,
            bytes: &mut |b| {
                emitted.extend_from_slice(b);
                Ok(())
            },
        }));
        let mut refilled = vec![0u8; e.size() as usize];
        e.fill(&mut refilled, 0, &pattern).unwrap();
        assert!(emitted == refilled);
        assert_eq!(emitted.len(), all.len());
        assert!(String::from_utf8_lossy(&emitted[512..1024]).contains("CID=12345678"));
        assert!(
            emitted[STREAM_DATA_START as usize * 512..] == all[STREAM_DATA_START as usize * 512..]
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.vmdk");
        std::fs::write(&path, &all).unwrap();
        let image = open(&path, &OpenOptions::default()).unwrap();
        assert_eq!(image.virtual_size(), size.next_multiple_of(512));
        let mut guest = vec![0u8; size as usize];
        image.read_at(&mut guest, 0).unwrap();
        let mut want = vec![0u8; size as usize];
        for &(start, len) in &ranges {
            // Allocation is per grain: the whole grain is the pattern.
            let g = start / GRAIN_BYTES * GRAIN_BYTES;
            let e = (start + len).next_multiple_of(GRAIN_BYTES).min(size);
            pattern(&mut want[g as usize..e as usize], g).unwrap();
        }
        assert!(guest == want);
    }

    #[test]
    fn random_grains_are_stored_and_inflate_back() {
        let random = crate::entropy::tests::noise(GRAIN_BYTES as usize, 11);
        let text: Vec<u8> = (0..GRAIN_BYTES)
            .map(|i| b"disk image "[i as usize % 11])
            .collect();
        assert!(crate::entropy::looks_incompressible(&random));
        assert!(!crate::entropy::looks_incompressible(&text));
        for grain in [&random, &text] {
            let r = stored_grain(grain, 128).unwrap().unwrap();
            assert!(r.len().is_multiple_of(SECTOR as usize));
            assert_eq!(u64::from_le_bytes(r[..8].try_into().unwrap()), 128);
            let size = u32::from_le_bytes(r[8..12].try_into().unwrap()) as usize;
            let mut out = vec![0u8; grain.len()];
            let mut z = flate2::Decompress::new(true);
            let status = z
                .decompress(&r[12..12 + size], &mut out, flate2::FlushDecompress::Finish)
                .unwrap();
            assert_eq!(status, flate2::Status::StreamEnd);
            assert!(&out == grain);
        }
        assert!(
            stored_grain(&[0; GRAIN_BYTES as usize], 0)
                .unwrap()
                .is_none()
        );
    }
}

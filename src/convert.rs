//! Conversion of an image into a writer of any format, driven by the source's extent map.
//!
//! Ranges the source maps as zero are never read. The rest is cut into chunks aligned to the
//! destination's cluster size and handled in parallel: each worker takes one chunk, finds the
//! blocks of zeros inside it (`-S`), and writes the non-zero runs, straight from the source's
//! memory map where the source stores the bytes uncompressed in a local file, else through a
//! buffer. Memory stays at a few chunk buffers per worker whatever the image size.
//!
//! Output safety: [`convert_to_path`] writes a new image through [`crate::output`] (temporary
//! name, synced, renamed into place), so an interrupted conversion never leaves a partial image
//! under the final name; the source is only read.

use crate::hash::ImageHash;
use crate::parallel::{pool_of, read_pool};
use crate::progress::Progress;
use crate::storage::push::RateLimit;
use diskkit_formats::digest::{ChunkDigest, ChunkHasher, DigestBuilder, PiecewiseChunk};
use diskkit_formats::host::HostFile;
use diskkit_formats::image::{
    GuestRange, Step, Walk, allocated_ranges, first_nonzero_byte, read_filled,
};
use diskkit_formats::write::{self, CreateOptions, ImageWriter};
use diskkit_formats::{Error, Format, Image, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Guest bytes handled per parallel task (rounded up to the zero-detection unit). Small enough
/// that a chunk read into a buffer is still in the CPU cache when it is written out (8 MiB
/// doubled the kernel's copy time), large enough to keep system calls few.
const CHUNK: u64 = 2 << 20;
/// Largest chunk a source's optimal transfer size may ask for: per-thread buffers are this big.
const MAX_CHUNK: u64 = 16 << 20;
/// qemu-img's default `-S`: runs of zeros this long (and aligned) become holes.
pub const DEFAULT_SPARSE_SIZE: u64 = 4096;
/// Upper bound on `-S` and on a writer's alignment, which size the per-thread buffers.
const MAX_UNIT: u64 = 64 << 20;

#[derive(Clone, Copy)]
pub struct ConvertOptions<'a> {
    /// Zero detection granularity (`-S`): aligned blocks of this many zero bytes inside data are
    /// not written. 0 writes all data the source maps as allocated.
    pub sparse_size: u64,
    /// Overlay mode (`-B`): the output's backing image. Only ranges whose content differs from
    /// it are written; the rest stays unallocated and reads through to the backing image.
    pub backing: Option<&'a dyn Image>,
    /// Worker threads (`-m`); `None` uses the engine's read pool (four per CPU, so that reads
    /// and direct writes overlap computation).
    pub threads: Option<usize>,
    /// The output reads as zeros already (`--target-is-zero`, with `-n`): zero ranges are not
    /// written.
    pub target_is_zero: bool,
    /// Guest bytes per second at most (`-r`), over all workers.
    pub rate_limit: Option<u64>,
    /// Read errors become zeros (`--salvage`), reported per range in [`ConvertStats`], instead
    /// of ending the conversion.
    pub salvage: bool,
}

impl Default for ConvertOptions<'_> {
    fn default() -> Self {
        ConvertOptions {
            sparse_size: DEFAULT_SPARSE_SIZE,
            backing: None,
            threads: None,
            target_is_zero: false,
            rate_limit: None,
            salvage: false,
        }
    }
}

/// What a conversion did, in guest bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Read from the source (and from the backing image in overlay mode).
    pub read: u64,
    /// Written as data.
    pub written: u64,
    /// Recorded as zeros with `write_zeroes` (ranges skipped on a zero-initialized output are
    /// not counted).
    pub zeroed: u64,
    /// `--salvage`: guest ranges that could not be read and were written as zeros, in guest
    /// order, adjacent ones merged, each with the first error met in it.
    pub salvaged: Vec<(GuestRange, String)>,
}

/// Copies the guest content of `src` into `dst`, which must be at least as large.
pub fn convert(
    src: &dyn Image,
    dst: &dyn ImageWriter,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertStats> {
    convert_reporting(src, dst, opts, progress, false, None)
}

/// [`convert`]; `report_zeros` also records zero ranges on a zero-initialized output, so that
/// every guest range reaches the writer once (a compressed qcow2 writer places clusters in
/// guest order as soon as everything before them is known).
fn convert_reporting(
    src: &dyn Image,
    dst: &dyn ImageWriter,
    opts: &ConvertOptions,
    progress: &dyn Progress,
    report_zeros: bool,
    digest: Option<&GuestDigest>,
) -> Result<ConvertStats> {
    let size = src.virtual_size();
    if dst.virtual_size() < size {
        return Err(Error::invalid(format!(
            "the output ({} bytes) is smaller than the source ({size} bytes)",
            dst.virtual_size()
        )));
    }
    let align = dst.write_alignment();
    if !align.is_power_of_two() || align > MAX_UNIT {
        return Err(Error::invalid(format!(
            "output write alignment {align} is not a power of two up to {MAX_UNIT}"
        )));
    }
    if !opts.sparse_size.is_multiple_of(512) || opts.sparse_size > MAX_UNIT {
        return Err(Error::invalid(format!(
            "-S {}: must be a multiple of 512 up to {MAX_UNIT}, or 0",
            opts.sparse_size
        )));
    }
    let detect = if opts.sparse_size > 0 {
        opts.sparse_size
    } else {
        DEFAULT_SPARSE_SIZE
    };
    let unit = detect.max(align).next_multiple_of(align);
    if digest.is_some() && !unit.is_power_of_two() {
        return Err(Error::invalid(format!(
            "-S {}: a guest digest taken during the conversion needs a power of two",
            opts.sparse_size
        )));
    }
    let engine = Engine {
        src,
        dst,
        backing: opts.backing,
        detect_zeros: opts.sparse_size > 0,
        unit,
        zero_needed: opts.backing.is_some()
            || !(dst.zero_initialized() || opts.target_is_zero)
            || report_zeros,
        progress,
        limit: RateLimit::new(opts.rate_limit),
        salvage: opts.salvage.then(Mutex::default),
        digest,
        read: AtomicU64::new(0),
        written: AtomicU64::new(0),
        zeroed: AtomicU64::new(0),
    };
    // A digest chunk is hashed whole by the worker of the one cell it lies in. Both are powers
    // of two then, so the larger is a multiple of the smaller.
    let grid = digest.map_or(unit, |d| unit.max(d.hasher.chunk_size()));
    let chunk = CHUNK
        .max(src.optimal_transfer().min(MAX_CHUNK))
        .max(grid)
        .next_multiple_of(grid);
    if opts.backing.is_none() {
        dst.reserve(&mut allocated_ranges(src, GuestRange::new(0, size)));
    }
    let mut layers = vec![src];
    layers.extend(opts.backing);
    let walk = Walk::new(&layers, GuestRange::new(0, size), chunk)?;
    let run = || {
        walk.par_bridge()
            .try_for_each_init(Buffers::default, |bufs, step| engine.run(step?, bufs))
    };
    match opts.threads {
        None => read_pool()?.install(run)?,
        Some(n) => pool_of(n)?.install(run)?,
    }
    let mut failed = engine
        .salvage
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .unwrap_or_default();
    failed.sort_by_key(|(r, _)| r.start);
    let mut salvaged: Vec<(GuestRange, String)> = Vec::new();
    for (range, why) in failed {
        match salvaged.last_mut() {
            Some((last, _)) if last.end == range.start => last.end = range.end,
            _ => salvaged.push((range, why)),
        }
    }
    Ok(ConvertStats {
        read: engine.read.into_inner(),
        written: engine.written.into_inner(),
        zeroed: engine.zeroed.into_inner(),
        salvaged,
    })
}

/// Converts `src` into a new image of `format` at `path`, safely: see the module notes. `create`
/// carries the output's `-o` options, compression and backing file.
pub fn convert_to_path(
    src: &dyn Image,
    format: Format,
    path: &Path,
    create: &mut CreateOptions,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertStats> {
    refuse_input_as_output(src, opts.backing, path)?;
    let report_zeros = create.compress;
    crate::output::write_new_image(format, path, src.virtual_size(), create, |w| {
        convert_reporting(src, w, opts, progress, report_zeros, None)
    })
}

/// [`convert_to_path`], also returning the guest digest of what was written, by `hasher`'s
/// algorithm and chunk size (make it with [`ChunkHasher::without_crc`]: CRCs would be computed
/// for nothing). It is taken from the bytes handed to the writer in the conversion's own walk:
/// the output is not read back. Hashing needs whole digest chunks per worker, so the
/// conversion's cells are at least a chunk.
pub fn convert_to_path_with_digest(
    src: &dyn Image,
    format: Format,
    path: &Path,
    create: &mut CreateOptions,
    opts: &ConvertOptions,
    hasher: ChunkHasher,
    progress: &dyn Progress,
) -> Result<(ConvertStats, ImageHash)> {
    refuse_input_as_output(src, opts.backing, path)?;
    let report_zeros = create.compress;
    let digest = GuestDigest::new(hasher)?;
    crate::output::write_new_image(format, path, src.virtual_size(), create, |w| {
        let stats = convert_reporting(src, w, opts, progress, report_zeros, Some(&digest))?;
        Ok((stats, digest.finish(src.virtual_size())?))
    })
}

/// The guest digest of a conversion's output, folded in guest order from the cells' results,
/// which workers finish in any order.
struct GuestDigest {
    hasher: ChunkHasher,
    fold: Mutex<DigestFold>,
}

struct DigestFold {
    builder: DigestBuilder,
    /// Results that came before those of the guest bytes below them, by guest offset.
    pending: BTreeMap<u64, Hashed>,
}

/// The digests of one step of the walk.
enum Hashed {
    /// The chunks of one cell, in order.
    Chunks(Vec<ChunkDigest>),
    /// Zeros up to this guest offset.
    ZerosTo(u64),
}

impl GuestDigest {
    fn new(hasher: ChunkHasher) -> Result<Self> {
        let chunk_size = hasher.chunk_size();
        Ok(GuestDigest {
            fold: Mutex::new(DigestFold {
                builder: DigestBuilder::new(hasher.algorithm(), chunk_size)?,
                pending: BTreeMap::new(),
            }),
            hasher,
        })
    }

    /// Starts hashing the cell at guest offset `start`, fed in guest order.
    fn cell(&self, start: u64) -> CellDigest<'_> {
        CellDigest {
            digest: self,
            pos: start,
            start,
            current: None,
            done: Vec::new(),
        }
    }

    /// Records the digests of the step at guest offset `start`, and folds what is now in order.
    fn add(&self, start: u64, hashed: Hashed) -> Result<()> {
        let mut fold = self.fold.lock().unwrap_or_else(|e| e.into_inner());
        fold.pending.insert(start, hashed);
        loop {
            let at = fold.builder.covered();
            let Some(next) = fold.pending.remove(&at) else {
                return Ok(());
            };
            match next {
                Hashed::Chunks(chunks) => {
                    for c in &chunks {
                        fold.builder.push(c)?;
                    }
                }
                Hashed::ZerosTo(end) => {
                    for c in GuestRange::new(at, end).cells(self.hasher.chunk_size()) {
                        fold.builder.push(&self.hasher.zero(c.start, c.len()))?;
                    }
                }
            }
        }
    }

    /// The image digest, once every step of a walk over `virtual_size` bytes was added.
    fn finish(self, virtual_size: u64) -> Result<ImageHash> {
        let fold = self.fold.into_inner().unwrap_or_else(|e| e.into_inner());
        if fold.builder.covered() != virtual_size || !fold.pending.is_empty() {
            return Err(Error::invalid(format!(
                "the conversion's digest covers {} of {virtual_size} bytes",
                fold.builder.covered()
            )));
        }
        Ok(ImageHash {
            algorithm: self.hasher.algorithm(),
            digest: fold.builder.finish(),
            chunk_size: self.hasher.chunk_size(),
            virtual_size,
        })
    }
}

/// The digest chunks of one cell, fed its guest bytes in order.
struct CellDigest<'a> {
    digest: &'a GuestDigest,
    start: u64,
    /// Guest offset of the next byte fed.
    pos: u64,
    current: Option<PiecewiseChunk<'a>>,
    done: Vec<ChunkDigest>,
}

impl CellDigest<'_> {
    fn feed(&mut self, mut data: &[u8]) {
        let size = self.digest.hasher.chunk_size();
        while !data.is_empty() {
            let pos = self.pos;
            let chunk = self
                .current
                .get_or_insert_with(|| self.digest.hasher.start(pos));
            let n = data.len().min((size - pos % size) as usize);
            chunk.feed(&data[..n]);
            data = &data[n..];
            self.pos += n as u64;
            if self.pos.is_multiple_of(size) {
                self.done
                    .extend(self.current.take().map(PiecewiseChunk::finish));
            }
        }
    }

    fn finish(mut self) -> Result<()> {
        self.done
            .extend(self.current.take().map(PiecewiseChunk::finish));
        self.digest.add(self.start, Hashed::Chunks(self.done))
    }
}

/// Converts `src` into the existing image at `path` (`convert -n`): the target is written in
/// place, so an interrupted conversion leaves it partly overwritten. Its size must be at least
/// the source's; bytes past the source's end are left as they are. Without `format`, the
/// target is written as the format it has (qemu-img would take it for raw and overwrite a
/// qcow2 or VHD target's metadata with guest bytes).
pub fn convert_into_existing(
    src: &dyn Image,
    format: Option<Format>,
    path: &Path,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertStats> {
    refuse_input_as_output(src, opts.backing, path)?;
    let format = match format {
        Some(f) => f,
        None => diskkit_formats::open::detect(&HostFile::open(path)?)?,
    };
    let writer = write::open_existing(format, path)?;
    if writer.virtual_size() < src.virtual_size() {
        return Err(Error::invalid(format!(
            "{}: the target ({} bytes) is smaller than the source ({} bytes)",
            path.display(),
            writer.virtual_size(),
            src.virtual_size()
        )));
    }
    let stats = convert(src, writer.as_ref(), opts, progress)?;
    writer.finish()?;
    Ok(stats)
}

/// Refuses an output that is one of the files being read (the source chain or the backing).
fn refuse_input_as_output(src: &dyn Image, backing: Option<&dyn Image>, out: &Path) -> Result<()> {
    let Ok(out) = std::fs::canonicalize(out) else {
        return Ok(()); // does not exist yet
    };
    for top in [Some(src), backing].into_iter().flatten() {
        let mut layer = Some(top);
        while let Some(l) = layer {
            if std::fs::canonicalize(l.info().filename).is_ok_and(|p| p == out) {
                return Err(Error::invalid(format!(
                    "{}: the output is also an input of this conversion",
                    out.display()
                )));
            }
            layer = l.backing();
        }
    }
    Ok(())
}

/// What to do with one zero-detection unit of a chunk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Write,
    Zero,
    /// Overlay mode: same content as the backing image, leave unallocated.
    Skip,
}

/// Per-worker buffers, reused from chunk to chunk.
#[derive(Default)]
struct Buffers<'a> {
    src: Vec<u8>,
    /// The source's data ranges inside the part being copied through `src`.
    ranges: Vec<GuestRange>,
    backing: Vec<u8>,
    actions: Vec<Action>,
    /// The digest of the cell being copied, when the conversion takes one.
    digest: Option<CellDigest<'a>>,
}

struct Engine<'a> {
    src: &'a dyn Image,
    dst: &'a dyn ImageWriter,
    backing: Option<&'a dyn Image>,
    detect_zeros: bool,
    /// Granularity of zero detection and of the write/zero/skip decision: a multiple of the
    /// output's alignment.
    unit: u64,
    /// Zero ranges must be recorded (output not zero-initialized, or overlay over a backing).
    zero_needed: bool,
    progress: &'a dyn Progress,
    limit: Option<RateLimit>,
    /// `--salvage`: the ranges that could not be read.
    salvage: Option<Mutex<Vec<(GuestRange, String)>>>,
    digest: Option<&'a GuestDigest>,
    read: AtomicU64,
    written: AtomicU64,
    zeroed: AtomicU64,
}

impl<'a> Engine<'a> {
    fn run(&self, step: Step, bufs: &mut Buffers<'a>) -> Result<()> {
        let range = step.range();
        match step {
            Step::Zeros(_) => {
                // Zeros on both sides in overlay mode: nothing differs from the backing image.
                if self.backing.is_none() && self.zero_needed {
                    self.zero(range.start, range.len())?;
                }
                if let Some(d) = self.digest {
                    d.add(range.start, Hashed::ZerosTo(range.end))?;
                }
            }
            Step::Cell { range, data } => {
                bufs.digest = self.digest.map(|d| d.cell(range.start));
                self.chunk(range, &data, bufs)?;
                if let Some(cell) = bufs.digest.take() {
                    cell.finish()?;
                }
            }
        }
        self.progress.advance(range.len());
        Ok(())
    }

    fn chunk(
        &self,
        range: GuestRange,
        layers: &[Vec<GuestRange>],
        bufs: &mut Buffers<'a>,
    ) -> Result<()> {
        let no_ranges = Vec::new();
        let src_ranges = layers.first().unwrap_or(&no_ranges);
        match self.backing {
            Some(backing) => {
                let back_ranges = layers.get(1).unwrap_or(&no_ranges);
                self.write_differences(range, src_ranges, backing, back_ranges, bufs)
            }
            None => self.copy(range, src_ranges, bufs),
        }
    }

    /// Copies guest bytes `range`, where the source maps `ranges` as data. Runs of whole units
    /// inside one range are written straight from the source's memory map when it has one (one
    /// copy less, and the kernel's copy out of the source's page cache is the largest cost of an
    /// uncompressed conversion after the copy into the output's); the rest goes through a buffer.
    fn copy(&self, range: GuestRange, ranges: &[GuestRange], bufs: &mut Buffers<'a>) -> Result<()> {
        let size = self.src.virtual_size();
        let mut pos = range.start;
        for r in ranges {
            let lo = r.start.next_multiple_of(self.unit);
            let hi = if r.end == size {
                r.end
            } else {
                r.end / self.unit * self.unit
            };
            if lo >= hi {
                continue;
            }
            let mut written = Ok(());
            // The bytes before the mapped run first: a digest is fed in guest order.
            let mapped = self.src.with_mapped(lo, hi - lo, &mut |bytes| {
                written = self
                    .copy_buffered(GuestRange::new(pos, lo), ranges, bufs)
                    .and_then(|()| {
                        self.write_units(bytes, lo, None, &mut bufs.actions, &mut bufs.digest)
                    });
            })?;
            if mapped {
                written?;
                self.note_read(hi - lo);
                pos = hi;
            }
        }
        self.copy_buffered(GuestRange::new(pos, range.end), ranges, bufs)
    }

    /// Copies guest bytes `range` (unit-aligned, or ending at the image's end) through a buffer:
    /// `ranges` (clipped to it) read from the source, zeros elsewhere.
    fn copy_buffered(
        &self,
        range: GuestRange,
        ranges: &[GuestRange],
        bufs: &mut Buffers<'a>,
    ) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        bufs.ranges.clear();
        bufs.ranges.extend(
            ranges
                .iter()
                .filter(|r| r.end > range.start && r.start < range.end)
                .map(|r| GuestRange::new(r.start.max(range.start), r.end.min(range.end))),
        );
        self.fill(self.src, range, &bufs.ranges, &mut bufs.src)?;
        let has_data = units_with_data(&bufs.ranges, range, self.unit);
        self.write_units(
            &bufs.src,
            range.start,
            Some(&has_data),
            &mut bufs.actions,
            &mut bufs.digest,
        )
    }

    /// Writes `data`, the guest bytes at `offset` (unit-aligned): units the source maps as zero
    /// (`has_data`, one flag per unit; `None`: all are data) or found to be zeros are recorded
    /// as zeros, the rest as data.
    fn write_units(
        &self,
        data: &[u8],
        offset: u64,
        has_data: Option<&[bool]>,
        actions: &mut Vec<Action>,
        digest: &mut Option<CellDigest>,
    ) -> Result<()> {
        if let Some(d) = digest {
            d.feed(data);
        }
        actions.clear();
        for (i, piece) in data.chunks(self.unit as usize).enumerate() {
            let zero = has_data.is_some_and(|d| !d[i])
                || (self.detect_zeros && first_nonzero_byte(piece).is_none());
            actions.push(if zero { Action::Zero } else { Action::Write });
        }
        self.apply(data, offset, actions)
    }

    /// Overlay mode: writes the units of `range` whose content differs from the backing image's.
    fn write_differences(
        &self,
        range: GuestRange,
        src_ranges: &[GuestRange],
        backing: &dyn Image,
        back_ranges: &[GuestRange],
        bufs: &mut Buffers<'a>,
    ) -> Result<()> {
        let unit = self.unit as usize;
        self.fill(self.src, range, src_ranges, &mut bufs.src)?;
        self.fill(backing, range, back_ranges, &mut bufs.backing)?;
        let src_data = units_with_data(src_ranges, range, self.unit);
        let back_data = units_with_data(back_ranges, range, self.unit);
        if let Some(d) = &mut bufs.digest {
            d.feed(&bufs.src);
        }
        bufs.actions.clear();
        for (i, piece) in bufs.src.chunks(unit).enumerate() {
            let same = (!src_data[i] && !back_data[i])
                || bufs.backing.get(i * unit..i * unit + piece.len()) == Some(piece);
            let src_zero =
                !src_data[i] || (self.detect_zeros && first_nonzero_byte(piece).is_none());
            bufs.actions.push(if same {
                Action::Skip
            } else if src_zero {
                Action::Zero
            } else {
                Action::Write
            });
        }
        self.apply(&bufs.src, range.start, &bufs.actions)
    }

    /// Carries out one action per unit of `data` (the guest bytes at `offset`), a run of equal
    /// actions at a time.
    fn apply(&self, data: &[u8], offset: u64, actions: &[Action]) -> Result<()> {
        let unit = self.unit as usize;
        let mut i = 0;
        while i < actions.len() {
            let action = actions[i];
            let run = actions[i..].iter().take_while(|&&a| a == action).count();
            let (lo, hi) = (i * unit, ((i + run) * unit).min(data.len()));
            let at = offset + lo as u64;
            match action {
                Action::Write => {
                    self.dst.write_at(&data[lo..hi], at)?;
                    self.written.fetch_add((hi - lo) as u64, Ordering::Relaxed);
                }
                Action::Zero if self.zero_needed => self.zero(at, (hi - lo) as u64)?,
                Action::Zero | Action::Skip => {}
            }
            i += run;
        }
        Ok(())
    }

    /// Fills `buf` with the guest bytes of `range`: `ranges` read from `image`, zeros elsewhere.
    fn fill(
        &self,
        image: &dyn Image,
        range: GuestRange,
        ranges: &[GuestRange],
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        buf.resize(range.len() as usize, 0);
        let read = match read_filled(image, range.start, buf, ranges.iter().copied().map(Ok)) {
            Ok(n) => n,
            Err(e) if self.salvage.is_some() && is_read_error(&e) => {
                self.salvage_fill(image, range, ranges, buf)?
            }
            Err(e) => return Err(e),
        };
        self.note_read(read);
        Ok(())
    }

    /// `--salvage`: fills `buf` as [`Engine::fill`] does, reading each data range in sectors
    /// of [`SALVAGE_UNIT`] so that only what fails becomes zeros (and is recorded).
    fn salvage_fill(
        &self,
        image: &dyn Image,
        range: GuestRange,
        ranges: &[GuestRange],
        buf: &mut [u8],
    ) -> Result<u64> {
        buf.fill(0);
        let mut read = 0;
        for r in ranges {
            let mut at = r.start;
            while at < r.end {
                let end = (at / SALVAGE_UNIT + 1) * SALVAGE_UNIT;
                let end = end.min(r.end);
                let part = &mut buf[(at - range.start) as usize..(end - range.start) as usize];
                match image.read_at(part, at) {
                    Ok(()) => read += end - at,
                    Err(e) if is_read_error(&e) => {
                        part.fill(0);
                        if let Some(failed) = &self.salvage {
                            failed
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((GuestRange::new(at, end), e.to_string()));
                        }
                    }
                    Err(e) => return Err(e),
                }
                at = end;
            }
        }
        Ok(read)
    }

    /// Counts bytes read from an image, for the totals, the progress bar and `-r`.
    fn note_read(&self, n: u64) {
        self.read.fetch_add(n, Ordering::Relaxed);
        self.progress.data_read(n);
        if let Some(limit) = &self.limit {
            limit.sent(n);
        }
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.dst.write_zeroes(offset, len)?;
        self.zeroed.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

/// `--salvage` retries a failed read in pieces of this many guest bytes.
const SALVAGE_UNIT: u64 = 4096;

/// Errors `--salvage` turns into zeros: the source could not be read or its data is damaged
/// (an I/O error, a compressed cluster that does not decompress), not a bad argument.
fn is_read_error(e: &Error) -> bool {
    matches!(e, Error::Io { .. } | Error::Corrupt { .. })
}

/// For each unit-sized piece of `range`, whether any of `ranges` (inside it) touches it.
fn units_with_data(ranges: &[GuestRange], range: GuestRange, unit: u64) -> Vec<bool> {
    let mut has = vec![false; range.len().div_ceil(unit) as usize];
    for r in ranges {
        let inside = GuestRange::new(
            r.start.saturating_sub(range.start),
            r.end.saturating_sub(range.start),
        );
        let units = inside.clusters(unit);
        if let Some(flags) = has.get_mut(units.start as usize..units.end as usize) {
            flags.fill(true);
        }
    }
    has
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::{Counted, NoProgress};
    use crate::test_image::MemImage;
    use diskkit_formats::digest::Algorithm;
    use std::sync::Mutex;

    /// A writer that checks alignment and records what it was asked to do.
    struct RecordingWriter {
        size: u64,
        align: u64,
        zero_initialized: bool,
        writes: Mutex<Vec<(u64, Vec<u8>)>>,
        zeroes: Mutex<Vec<(u64, u64)>>,
    }

    impl RecordingWriter {
        fn new(size: u64, align: u64, zero_initialized: bool) -> Self {
            RecordingWriter {
                size,
                align,
                zero_initialized,
                writes: Mutex::default(),
                zeroes: Mutex::default(),
            }
        }

        fn check_aligned(&self, offset: u64, len: u64) {
            assert_eq!(offset % self.align, 0, "unaligned start {offset:#x}");
            let end = offset + len;
            assert!(
                end.is_multiple_of(self.align) || end == self.size,
                "unaligned end {end:#x}"
            );
        }

        /// Guest content as written; `None` bytes were never written nor zeroed.
        fn content(&self) -> Vec<Option<u8>> {
            let mut out = vec![None; self.size as usize];
            for (off, buf) in self.writes.lock().unwrap().iter() {
                for (i, b) in buf.iter().enumerate() {
                    out[*off as usize + i] = Some(*b);
                }
            }
            for &(off, len) in self.zeroes.lock().unwrap().iter() {
                out[off as usize..(off + len) as usize].fill(Some(0));
            }
            out
        }

        fn written_bytes(&self) -> u64 {
            let w = self.writes.lock().unwrap();
            w.iter().map(|(_, b)| b.len() as u64).sum()
        }
    }

    impl ImageWriter for RecordingWriter {
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.check_aligned(offset, buf.len() as u64);
            self.writes.lock().unwrap().push((offset, buf.to_vec()));
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
            self.check_aligned(offset, len);
            self.zeroes.lock().unwrap().push((offset, len));
            Ok(())
        }
        fn zero_initialized(&self) -> bool {
            self.zero_initialized
        }
        fn write_alignment(&self) -> u64 {
            self.align
        }
        fn finish(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }

    const MIB: usize = 1 << 20;

    fn sample() -> MemImage {
        // Unaligned data, zeros written as data, a run across a chunk boundary, an odd size.
        MemImage::new(
            5 * MIB + 1000,
            &[
                (100, &[0x11; 3000]),
                (70_000, &[0; 200_000]),
                (2 * MIB as u64 - 5000, &[0x22; 10_000]),
                (5 * MIB as u64, &[0x33; 1000]),
            ],
        )
    }

    #[test]
    fn writes_aligned_runs_and_skips_zeros() {
        for src in [sample(), sample().mapped()] {
            writes_aligned_runs_and_skips_zeros_from(src);
        }
    }

    fn writes_aligned_runs_and_skips_zeros_from(src: MemImage) {
        for align in [1, 512, 65536, 2 << 20] {
            let dst = RecordingWriter::new(src.virtual_size(), align, true);
            let counted = Counted::default();
            let stats = convert(&src, &dst, &ConvertOptions::default(), &counted).unwrap();
            let content = dst.content();
            for (i, b) in content.iter().enumerate() {
                assert_eq!(b.unwrap_or(0), src.bytes[i], "align {align} byte {i}");
            }
            // The 200 KB of zeros written as data are detected and not written.
            assert!(dst.written_bytes() < 100_000 + 4 * align, "align {align}");
            assert_eq!(stats.written, dst.written_bytes());
            assert_eq!(stats.read, 3000 + 200_000 + 10_000 + 1000);
            // Progress counts every guest byte, and the bytes read apart.
            assert_eq!(counted.totals(), (src.virtual_size(), stats.read));
        }
    }

    #[test]
    fn sources_with_costly_reads_are_read_in_their_transfer_size() {
        let data = vec![0x5a; 40 * MIB];
        for (transfer, reads) in [(0, 20), (16 << 20, 3), (1 << 30, 3)] {
            let src = MemImage {
                transfer,
                ..MemImage::new(40 * MIB, &[(0, &data)])
            };
            let dst = RecordingWriter::new(src.virtual_size(), 512, true);
            convert(&src, &dst, &ConvertOptions::default(), &NoProgress).unwrap();
            assert_eq!(src.reads.into_inner(), reads, "transfer {transfer}");
            assert_eq!(dst.written_bytes(), 40 * MIB as u64);
        }
    }

    #[test]
    fn sparse_size_zero_writes_all_data_and_existing_targets_get_zeroes() {
        for src in [sample(), sample().mapped()] {
            sparse_size_zero_writes_all_data_from(src);
        }
    }

    fn sparse_size_zero_writes_all_data_from(src: MemImage) {
        let dst = RecordingWriter::new(src.virtual_size() + 4096, 1, false);
        let opts = ConvertOptions {
            sparse_size: 0,
            threads: Some(2),
            ..Default::default()
        };
        convert(&src, &dst, &opts, &NoProgress).unwrap();
        assert!(dst.written_bytes() >= 200_000);
        let content = dst.content();
        // Every source byte is written or zeroed; the target's extra tail is left alone.
        for (i, b) in content.iter().enumerate().take(src.bytes.len()) {
            assert_eq!(*b, Some(src.bytes[i]), "byte {i}");
        }
        assert!(content[src.bytes.len()..].iter().all(Option::is_none));
    }

    #[test]
    fn overlay_writes_only_differences() {
        let backing = MemImage::new(4 * MIB, &[(0, &[0x44; 3 * MIB])]);
        let mut changed = vec![0x44; 3 * MIB];
        changed[MIB..MIB + 10].fill(0x55);
        changed[2 * MIB..2 * MIB + 65536].fill(0);
        let src = MemImage::new(5 * MIB, &[(0, &changed), (4 * MIB as u64 + 7, &[9; 5])]);
        let dst = RecordingWriter::new(src.virtual_size(), 65536, false);
        let opts = ConvertOptions {
            backing: Some(&backing),
            ..Default::default()
        };
        convert(&src, &dst, &opts, &NoProgress).unwrap();
        let mut writes = dst.writes.lock().unwrap().clone();
        writes.sort();
        let written: Vec<(u64, usize)> = writes.iter().map(|(o, b)| (*o, b.len())).collect();
        assert_eq!(written, [(MIB as u64, 65536), (4 * MIB as u64, 65536)]);
        assert_eq!(*dst.zeroes.lock().unwrap(), [(2 * MIB as u64, 65536)]);
        let content = dst.content();
        assert_eq!(content[MIB], Some(0x55));
        assert_eq!(content[4 * MIB + 7], Some(9));
    }

    #[test]
    fn digest_taken_while_converting_is_the_guest_digest() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![0x5a; 20 * MIB];
        let large = MemImage {
            transfer: 16 << 20,
            ..MemImage::new(41 * MIB + 512, &[(MIB as u64, &big)])
        };
        for (n, src) in [sample(), sample().mapped(), large].into_iter().enumerate() {
            for (chunk_size, algorithm) in [
                (4096, Algorithm::Sha256),
                (1 << 20, Algorithm::Blake3),
                (4 << 20, Algorithm::Sha256),
                (4 << 20, Algorithm::Blake3),
                (32 << 20, Algorithm::Sha256),
            ] {
                let want = crate::hash::hash_image(&src, algorithm, chunk_size, &NoProgress, None)
                    .unwrap();
                let path = dir
                    .path()
                    .join(format!("{n}-{chunk_size}-{algorithm}.qcow2"));
                let (stats, got) = convert_to_path_with_digest(
                    &src,
                    Format::Qcow2,
                    &path,
                    &mut Default::default(),
                    &ConvertOptions::default(),
                    ChunkHasher::without_crc(algorithm, chunk_size).unwrap(),
                    &NoProgress,
                )
                .unwrap();
                assert_eq!(
                    got, want,
                    "source {n}, chunk size {chunk_size}, {algorithm}"
                );
                assert!(stats.written > 0);
            }
        }
    }

    #[test]
    fn refuses_bad_sparse_size_and_small_output() {
        let src = sample();
        let dst = RecordingWriter::new(src.virtual_size(), 1, true);
        let opts = ConvertOptions {
            sparse_size: 1000,
            ..Default::default()
        };
        assert!(convert(&src, &dst, &opts, &NoProgress).is_err());
        let small = RecordingWriter::new(src.virtual_size() - 1, 1, true);
        assert!(convert(&src, &small, &ConvertOptions::default(), &NoProgress).is_err());
    }
}

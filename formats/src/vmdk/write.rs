//! Creating VMDK images: monolithicSparse (qemu-img's default) and streamOptimized, each one
//! file with its descriptor embedded.
//!
//! monolithicSparse: header, descriptor, redundant and primary grain directories and tables
//! (all tables allocated up front, as VMware and qemu do), then the grains, allocated on first
//! write and stored uncompressed. Grain table entries are written as grains are allocated.
//!
//! streamOptimized: the layout of [`super::stream`], written in one pass. Readers that stream
//! the file want grains in guest order, and the engine writes from several threads in any
//! order: each `write_at` compresses its grains on the calling thread (so compression uses
//! every worker), then hands them to a reorder buffer that appends grains to the file in guest
//! order as soon as every byte before them has been written or zeroed (the writer says it is
//! not zero-initialized, so the engine reports zero ranges too). A write far ahead of that
//! point waits while the buffer is full, so memory stays bounded. The header and descriptor
//! (whose CID depends on the stored grains) and the directory and footer are written by
//! `finish`.

use super::layout::{
    ContentId, DESCRIPTOR_SECTORS, GRAIN_BYTES, GRAIN_SECTORS, GT_BLOCK_SECTORS, GT_SECTORS,
    GT_SPAN, GTES_PER_GT, SECTOR, STREAM_DATA_START, Subformat, VmdkOptions, gt_block, table_bytes,
};
use crate::error::{Error, Result};
use crate::image::{GuestRange, check_guest_range, first_nonzero_byte, touched_clusters};
use crate::write::{CreateOptions, ImageWriter, Measure, Writeback};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Creates a new VMDK at `path` for a guest of `virtual_size` bytes (rounded up to whole
/// sectors) with the options of [`VmdkOptions::take`].
pub fn create(
    path: &Path,
    virtual_size: u64,
    opts: &mut CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    let vmdk = VmdkOptions::take(virtual_size, opts)?;
    let out = Output::create(path, opts)?;
    Ok(match vmdk.subformat {
        Subformat::MonolithicSparse => Box::new(MonolithicSparseWriter::create(out, vmdk)?),
        Subformat::StreamOptimized => Box::new(StreamOptimizedWriter::new(out, vmdk)),
    })
}

/// The name the embedded descriptor records: the output's final file name. The engine writes
/// new images under a temporary name (`.NAME.diskkit-tmp-PID`, see the root crate's
/// `output.rs`); NAME is what the file is renamed to.
fn recorded_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.rsplit_once(".diskkit-tmp-") {
        Some((stem, pid)) if pid.bytes().all(|b| b.is_ascii_digit()) => {
            stem.strip_prefix('.').unwrap_or(stem).to_string()
        }
        _ => name,
    }
}

/// The file being written.
struct Output {
    file: File,
    path: PathBuf,
    writeback: Writeback,
}

impl Output {
    fn create(path: &Path, opts: &CreateOptions) -> Result<Output> {
        Ok(Output {
            file: crate::write::create_image_file(path)?,
            path: path.to_path_buf(),
            writeback: Writeback::for_file(opts.cache, path),
        })
    }

    fn write(&self, buf: &[u8], sector: u64, what: &str) -> Result<()> {
        self.writeback
            .write_at(&self.file, &self.path, buf, sector * SECTOR, what)
    }

    /// Sets the file's length to `sectors` and makes it durable.
    fn finish(&self, sectors: u64) -> Result<()> {
        self.file
            .set_len(sectors * SECTOR)
            .map_err(|e| Error::io(&self.path, "set length", e))?;
        self.writeback.sync_all(&self.file, &self.path)
    }
}

/// A 32-bit sector number (what grain tables and directories hold), or the 2 TiB error.
fn sector32(sector: u64) -> Result<u32> {
    u32::try_from(sector)
        .map_err(|_| Error::invalid("the VMDK file would pass 2 TiB, the format's limit"))
}

/// The grains `[offset, offset + len)` covers, checked against the writer's alignment: whole
/// grains, except a write that ends at the guest's end.
fn grains_of(vmdk: &VmdkOptions, offset: u64, len: u64) -> Result<std::ops::Range<u64>> {
    check_guest_range(vmdk.guest_size(), offset, len)?;
    let end = offset + len;
    // Only the last grain may be written in part (the source may end inside it).
    let last = end.div_ceil(GRAIN_BYTES) == vmdk.guest_size().div_ceil(GRAIN_BYTES);
    if !offset.is_multiple_of(GRAIN_BYTES) || !(end.is_multiple_of(GRAIN_BYTES) || last) {
        return Err(Error::invalid(format!(
            "vmdk write {offset:#x}+{len:#x} is not aligned to whole grains"
        )));
    }
    Ok(offset / GRAIN_BYTES..end.div_ceil(GRAIN_BYTES))
}

/// Where the metadata of a monolithicSparse extent lies, in sectors.
struct SparseLayout {
    rgd: u64,
    rgts: u64,
    gd: u64,
    gts: u64,
    /// First grain: the metadata rounded up to a whole grain.
    overhead: u64,
}

impl SparseLayout {
    fn of(vmdk: &VmdkOptions) -> SparseLayout {
        let tables = vmdk.gd_entries();
        let gd_sectors = (tables * 4).div_ceil(SECTOR);
        let rgd = 1 + DESCRIPTOR_SECTORS;
        let rgts = rgd + gd_sectors;
        let gd = rgts + tables * GT_SECTORS;
        let gts = gd + gd_sectors;
        let overhead = (gts + tables * GT_SECTORS).next_multiple_of(GRAIN_SECTORS);
        SparseLayout {
            rgd,
            rgts,
            gd,
            gts,
            overhead,
        }
    }

    /// The directory pointing to grain tables laid out from `tables` on.
    fn directory(tables_at: u64, count: u64) -> Result<Vec<u8>> {
        let entries = (0..count)
            .map(|t| sector32(tables_at + t * GT_SECTORS))
            .collect::<Result<Vec<u32>>>()?;
        Ok(table_bytes(&entries))
    }
}

/// A new monolithicSparse VMDK.
pub struct MonolithicSparseWriter {
    out: Output,
    vmdk: VmdkOptions,
    layout: SparseLayout,
    /// Next free sector for grains.
    next_free: Mutex<u64>,
}

impl MonolithicSparseWriter {
    fn create(out: Output, vmdk: VmdkOptions) -> Result<MonolithicSparseWriter> {
        let layout = SparseLayout::of(&vmdk);
        let tables = vmdk.gd_entries();
        let cid = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), &out.path);
        out.write(
            &vmdk.header(Some(layout.gd), layout.rgd, layout.overhead),
            0,
            "vmdk header",
        )?;
        out.write(
            &vmdk.descriptor(&recorded_name(&out.path), cid as u32)?,
            1,
            "vmdk descriptor",
        )?;
        // Both directories point to their tables, which stay zero (holes) until a grain of
        // theirs is allocated.
        out.write(
            &SparseLayout::directory(layout.rgts, tables)?,
            layout.rgd,
            "vmdk redundant grain directory",
        )?;
        out.write(
            &SparseLayout::directory(layout.gts, tables)?,
            layout.gd,
            "vmdk grain directory",
        )?;
        Ok(MonolithicSparseWriter {
            next_free: Mutex::new(layout.overhead),
            out,
            vmdk,
            layout,
        })
    }

    /// Stores grains `first..first + n` (their data: `data`) in newly allocated, consecutive
    /// grains, and points both grain tables at them.
    fn store(&self, first: u64, n: u64, data: &[u8]) -> Result<()> {
        let at = {
            let mut next = lock(&self.next_free);
            let at = *next;
            sector32(at + n * GRAIN_SECTORS)?;
            *next += n * GRAIN_SECTORS;
            at
        };
        self.out.write(data, at, "vmdk grains")?;
        let mut g = first;
        while g < first + n {
            let in_table = (GTES_PER_GT - g % GTES_PER_GT).min(first + n - g);
            let entries: Vec<u8> = (g..g + in_table)
                .flat_map(|k| ((at + (k - first) * GRAIN_SECTORS) as u32).to_le_bytes())
                .collect();
            let table = g / GTES_PER_GT;
            let within = (g % GTES_PER_GT) * 4;
            for tables in [self.layout.gts, self.layout.rgts] {
                let byte = (tables + table * GT_SECTORS) * SECTOR + within;
                self.out.file.write_all_at(&entries, byte).map_err(|e| {
                    Error::io(
                        &self.out.path,
                        format!("write vmdk grain table at {byte:#x}"),
                        e,
                    )
                })?;
            }
            g += in_table;
        }
        Ok(())
    }
}

impl ImageWriter for MonolithicSparseWriter {
    fn virtual_size(&self) -> u64 {
        self.vmdk.guest_size()
    }

    /// Runs of non-zero grains are allocated together and written in one call; all-zero
    /// grains stay unallocated (they read as zeros).
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let grains = grains_of(&self.vmdk, offset, buf.len() as u64)?;
        let piece = |g: u64| {
            let from = ((g - grains.start) * GRAIN_BYTES) as usize;
            from..(from + GRAIN_BYTES as usize).min(buf.len())
        };
        let mut g = grains.start;
        while g < grains.end {
            if first_nonzero_byte(&buf[piece(g)]).is_none() {
                g += 1;
                continue;
            }
            let run_end = (g + 1..grains.end)
                .find(|&k| first_nonzero_byte(&buf[piece(k)]).is_none())
                .unwrap_or(grains.end);
            let data = &buf[piece(g).start..piece(run_end - 1).end];
            self.store(g, run_end - g, data)?;
            g = run_end;
        }
        Ok(())
    }

    /// A new image reads as zeros everywhere: nothing to record.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_guest_range(self.vmdk.guest_size(), offset, len)
    }

    fn zero_initialized(&self) -> bool {
        true
    }

    fn write_alignment(&self) -> u64 {
        GRAIN_BYTES
    }

    fn finish(self: Box<Self>) -> Result<()> {
        // The file reaches the end of the last grain (a partial last grain reads as zeros).
        let end = (*lock(&self.next_free)).max(self.layout.overhead);
        self.out.finish(end)
    }
}

/// Compressed grains the reorder buffer holds at most before writes far ahead of the
/// contiguous written part wait (a soft limit: see [`StreamOptimizedWriter::write_at`]).
const MAX_PENDING_BYTES: usize = 64 << 20;
/// Longest a write waits for the buffer to drain: if the write at the contiguous point never
/// comes (another worker failed), the conversion ends with that error instead of hanging.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// A new streamOptimized VMDK, written in one pass (see the module notes).
pub struct StreamOptimizedWriter {
    out: Output,
    vmdk: VmdkOptions,
    state: Mutex<Reorder>,
    drained: Condvar,
}

struct Reorder {
    /// Every guest byte below this one has been written or zeroed.
    contiguous: u64,
    /// Written or zeroed ranges above `contiguous`: start → end.
    done: BTreeMap<u64, u64>,
    /// Compressed grains not yet placed in the file, by grain number.
    pending: BTreeMap<u64, Vec<u8>>,
    pending_bytes: usize,
    /// Sector where the next grain or grain table goes.
    next: u64,
    /// The grain table being filled: its number and entries.
    open: Option<(u64, Vec<u32>)>,
    /// Sector of each grain table (0: none).
    gd: Vec<u32>,
    id: ContentId,
}

/// Bytes to write at a sector, decided under the lock and written after it.
type Placed = Vec<(u64, Vec<u8>)>;

impl Reorder {
    /// Records `[start, end)` as done and moves `contiguous` on.
    fn mark_done(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        self.done.insert(start, end);
        while let Some(end) = self.done.remove(&self.contiguous) {
            self.contiguous = end;
        }
    }

    /// Places the pending grains below grain `limit` in guest order, closing grain tables as
    /// their span ends.
    fn place(&mut self, limit: u64, placed: &mut Placed) -> Result<()> {
        while let Some(entry) = self.pending.first_entry() {
            let grain = *entry.key();
            if grain >= limit {
                break;
            }
            let record = entry.remove();
            self.pending_bytes -= record.len();
            let table = grain / GTES_PER_GT;
            if self.open.as_ref().is_some_and(|(t, _)| *t != table) {
                self.close_table(placed)?;
            }
            let sectors = record.len() as u64 / SECTOR;
            let at = sector32(self.next + sectors)?;
            let (_, entries) = self
                .open
                .get_or_insert_with(|| (table, vec![0; GTES_PER_GT as usize]));
            entries[(grain % GTES_PER_GT) as usize] = at - sectors as u32;
            self.id.add(grain * GRAIN_SECTORS, sectors);
            placed.push((self.next, record));
            self.next += sectors;
        }
        Ok(())
    }

    /// Places the grain table being filled after its grains.
    fn close_table(&mut self, placed: &mut Placed) -> Result<()> {
        if let Some((table, entries)) = self.open.take() {
            let gd = self
                .gd
                .get_mut(table as usize)
                .ok_or_else(|| Error::invalid("vmdk grain table past the directory"))?;
            *gd = sector32(self.next + GT_BLOCK_SECTORS)? - GT_SECTORS as u32;
            placed.push((self.next, gt_block(&entries)));
            self.next += GT_BLOCK_SECTORS;
        }
        Ok(())
    }
}

impl StreamOptimizedWriter {
    fn new(out: Output, vmdk: VmdkOptions) -> StreamOptimizedWriter {
        StreamOptimizedWriter {
            state: Mutex::new(Reorder {
                contiguous: 0,
                done: BTreeMap::new(),
                pending: BTreeMap::new(),
                pending_bytes: 0,
                next: STREAM_DATA_START,
                open: None,
                gd: vec![0; vmdk.gd_entries() as usize],
                id: ContentId::default(),
            }),
            drained: Condvar::new(),
            out,
            vmdk,
        }
    }

    /// Adds `grains` (compressed) and the done range, places what became contiguous, and
    /// writes it. A range that starts past the contiguous point waits while the buffer is full:
    /// the worker holding the contiguous point never waits, so it always drains.
    fn add(&self, range: GuestRange, grains: Vec<(u64, Vec<u8>)>) -> Result<()> {
        let mut placed = Placed::new();
        {
            let mut st = lock(&self.state);
            let deadline = Instant::now() + MAX_WAIT;
            while range.start > st.contiguous
                && st.pending_bytes > MAX_PENDING_BYTES
                && Instant::now() < deadline
            {
                st = self
                    .drained
                    .wait_timeout(st, Duration::from_millis(100))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            for (grain, record) in grains {
                st.pending_bytes += record.len();
                st.pending.insert(grain, record);
            }
            let before = st.contiguous;
            st.mark_done(range.start, range.end);
            if st.contiguous > before {
                let limit = st.contiguous.div_ceil(GRAIN_BYTES);
                st.place(limit, &mut placed)?;
                self.drained.notify_all();
            }
        }
        for (sector, bytes) in placed {
            self.out.write(&bytes, sector, "vmdk grain")?;
        }
        Ok(())
    }
}

impl ImageWriter for StreamOptimizedWriter {
    fn virtual_size(&self) -> u64 {
        self.vmdk.guest_size()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let grains = grains_of(&self.vmdk, offset, buf.len() as u64)?;
        let mut whole = Vec::new();
        let mut records = Vec::new();
        for (g, piece) in grains.zip(buf.chunks(GRAIN_BYTES as usize)) {
            let grain = if piece.len() as u64 == GRAIN_BYTES {
                piece
            } else {
                // The last grain, past the guest's end: zero-padded.
                whole.clear();
                whole.extend_from_slice(piece);
                whole.resize(GRAIN_BYTES as usize, 0);
                &whole
            };
            if let Some(r) = super::stream::stored_grain(grain, g * GRAIN_SECTORS)? {
                records.push((g, r));
            }
        }
        self.add(GuestRange::new(offset, offset + buf.len() as u64), records)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_guest_range(self.vmdk.guest_size(), offset, len)?;
        self.add(GuestRange::new(offset, offset + len), Vec::new())
    }

    /// Not zero-initialized in the engine's sense: the engine then reports every zero range,
    /// which moves the contiguous point on.
    fn zero_initialized(&self) -> bool {
        false
    }

    fn write_alignment(&self) -> u64 {
        GRAIN_BYTES
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let mut placed = Placed::new();
        let mut st = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        st.place(u64::MAX, &mut placed)?;
        st.close_table(&mut placed)?;
        for (sector, bytes) in placed {
            self.out.write(&bytes, sector, "vmdk grain")?;
        }
        let tail = self.vmdk.stream_tail(&st.gd, st.next);
        let end = st.next + tail.len() as u64 / SECTOR;
        sector32(end)?;
        self.out
            .write(&tail, st.next, "vmdk grain directory and footer")?;
        let (_, cid) = st.id.finish(self.vmdk.capacity);
        let head = self.vmdk.stream_head(&recorded_name(&self.out.path), cid)?;
        self.out.write(&head, 0, "vmdk header and descriptor")?;
        self.out.finish(end)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bytes a new VMDK needs for a guest of `virtual_size` bytes whose data lies in `allocated`
/// (ascending). monolithicSparse: exact. streamOptimized: an upper bound (each grain stored as
/// if it did not compress), since compressed sizes are only known by compressing.
pub fn measure(
    virtual_size: u64,
    opts: &mut CreateOptions,
    allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
) -> Result<Measure> {
    let vmdk = VmdkOptions::take(virtual_size, opts)?;
    let inside =
        allocated.map(|r| r.map(|r| GuestRange::new(r.start, r.end.min(vmdk.guest_size()))));
    let mut grains = 0u64;
    let mut tables = std::collections::BTreeSet::new();
    for run in touched_clusters(inside, GRAIN_BYTES) {
        let run = run?;
        grains += run.end - run.start;
        if tables.len() < vmdk.gd_entries() as usize {
            tables.extend(run.start / GTES_PER_GT..=(run.end - 1) / GTES_PER_GT);
        }
    }
    let all_grains = vmdk.guest_size().div_ceil(GRAIN_BYTES);
    let size = |grains: u64, tables: u64| match vmdk.subformat {
        Subformat::MonolithicSparse => {
            (SparseLayout::of(&vmdk).overhead + grains * GRAIN_SECTORS) * SECTOR
        }
        Subformat::StreamOptimized => {
            // zlib stores incompressible data in blocks: 5 bytes per block plus its wrapper.
            let record = (12 + GRAIN_BYTES + 64).next_multiple_of(SECTOR);
            (STREAM_DATA_START + vmdk.stream_tail_sectors() + tables * GT_BLOCK_SECTORS) * SECTOR
                + grains * record
        }
    };
    Ok(Measure {
        required: size(grains, tables.len() as u64),
        fully_allocated: size(all_grains, vmdk.guest_size().div_ceil(GT_SPAN)),
    })
}

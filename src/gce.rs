//! GCE's image file: the disk as `disk.raw`, grown to a whole GiB, alone in a gzip'ed tar in
//! GNU (oldgnu) sparse format. When the disk has a GPT and grows, its backup header and
//! partition array move to the new end and both headers' CRCs are fixed, in the bytes produced
//! ([`GceDisk`]): the source is never modified.
//!
//! The sparse map comes from the disk's allocation map, so cost follows allocated data: holes
//! are neither read nor stored. The tar stream is cut into [`MEMBER`]-byte pieces, each
//! compressed on its own as one gzip member: members compress in parallel, and a file of
//! several members is one valid gzip stream (RFC 1952, 2.2; `gzip -d`, GNU tar and GCE's
//! importer read them all). Written to a file ([`write_file`]) in one pass, or as an
//! [`ImageStream`] ([`GceStream`]) that push uploads in parallel parts: its size is learnt by
//! compressing once first, as a compressed qcow2 push does.

use crate::output::PendingOutput;
use crate::progress::Progress;
use diskkit_formats::image::{GuestRange, allocated_ranges, check_guest_range};
use diskkit_formats::partition::{self, Patch};
use diskkit_formats::write::CacheMode;
use diskkit_formats::{Error, Extent, ExtentKind, Format, Image, ImageInfo, ImageStream, Result};
use flate2::Compression;
use flate2::write::GzEncoder;
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The one member GCE takes.
pub const DISK_NAME: &str = "disk.raw";
/// disk.raw is a whole number of GiB.
pub const ALIGNMENT: u64 = 1 << 30;
/// Tar bytes per gzip member. Each member restarts deflate's 32 KiB window: at 1 MiB that costs
/// about 0.1% of output size, and one member is the unit of parallel work and memory.
pub const MEMBER: u64 = 1 << 20;
/// Holes shorter than this between data runs are stored as zeros: the sparse map has at most
/// one entry per MiB of disk however fragmented the allocation map is.
const MIN_HOLE: u64 = 1 << 20;
/// Deflate level: gzip's and `tar -z`'s default.
const LEVEL: u32 = 6;
const BLOCK: u64 = 512;
/// Sparse entries in the tar header, and in each extension block after it.
const HEADER_ENTRIES: usize = 4;
const EXT_ENTRIES: usize = 21;

/// The size disk.raw has for a disk of `size` bytes: the next whole GiB (at least one).
pub fn grown_size(size: u64) -> Result<u64> {
    size.max(1)
        .checked_next_multiple_of(ALIGNMENT)
        .ok_or_else(|| Error::invalid(format!("{size} bytes cannot be rounded to a whole GiB")))
}

/// The disk as GCE gets it: `inner` grown to a whole GiB (the extra bytes read as zeros), with
/// a GPT's backup moved to the new end. Reads only what `inner`'s map calls data, and the
/// rewritten sectors.
pub struct GceDisk<'a> {
    inner: &'a dyn Image,
    size: u64,
    /// Sectors rewritten over `inner`, ascending and disjoint.
    patches: Vec<Patch>,
}

impl<'a> GceDisk<'a> {
    /// `path` names the source in errors about its partition table; a GPT that is damaged is
    /// refused (GCE's import would fail on it).
    pub fn new(inner: &'a dyn Image, path: &Path) -> Result<GceDisk<'a>> {
        let size = grown_size(inner.virtual_size())?;
        let table = partition::read(inner, path)?;
        let patches = table.grown_gpt(size)?;
        Ok(GceDisk {
            inner,
            size,
            patches,
        })
    }

    /// True when the disk has a GPT, rewritten to end at the new end.
    pub fn moves_gpt(&self) -> bool {
        !self.patches.is_empty()
    }

    fn patch_range(p: &Patch) -> GuestRange {
        GuestRange::new(p.0, p.0 + p.1.len() as u64)
    }
}

impl Image for GceDisk<'_> {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_guest_range(self.size, offset, 1)?;
        let mut len = max_len.min(self.size - offset);
        for p in &self.patches {
            let r = Self::patch_range(p);
            if r.start <= offset && offset < r.end {
                // Computed bytes, not stored anywhere: data without a host offset.
                return Ok(Extent {
                    start: offset,
                    length: len.min(r.end - offset),
                    kind: ExtentKind::Compressed,
                    depth: 0,
                });
            }
            if r.start > offset {
                len = len.min(r.start - offset);
                break;
            }
        }
        let inner_size = self.inner.virtual_size();
        if offset < inner_size {
            return self.inner.map(offset, len.min(inner_size - offset));
        }
        Ok(Extent {
            start: offset,
            length: len,
            kind: ExtentKind::Zero,
            depth: 0,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.size, offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let inner_end = end.min(self.inner.virtual_size());
        let split = inner_end.saturating_sub(offset) as usize;
        if split > 0 {
            self.inner.read_at(&mut buf[..split], offset)?;
        }
        buf[split..].fill(0);
        for p in &self.patches {
            let r = Self::patch_range(p);
            let (s, e) = (r.start.max(offset), r.end.min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&p.1[(s - r.start) as usize..(e - r.start) as usize]);
            }
        }
        Ok(())
    }

    fn with_mapped(&self, offset: u64, len: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool> {
        let r = GuestRange::new(offset, offset.saturating_add(len));
        let patched = self.patches.iter().any(|p| {
            let q = Self::patch_range(p);
            q.start < r.end && r.start < q.end
        });
        if patched || r.end > self.inner.virtual_size() {
            return Ok(false);
        }
        self.inner.with_mapped(offset, len, f)
    }

    fn info(&self) -> ImageInfo {
        ImageInfo::basic(PathBuf::from(DISK_NAME), Format::Raw, self.size, 0)
    }
}

/// The uncompressed tar: a GNU sparse header for disk.raw, its extension blocks, the data runs
/// one after the other, padding, and the two zero blocks that end an archive. Any byte range
/// is computed on demand.
pub struct Tarball<'a> {
    disk: GceDisk<'a>,
    /// The sparse map: data runs `(start, len)` of the disk, ascending; the last is
    /// `(size, 0)` when the disk ends in a hole, as GNU tar writes it.
    runs: Vec<(u64, u64)>,
    /// Offset of each run in the data region.
    run_at: Vec<u64>,
    data: u64,
    ext_blocks: u64,
}

impl<'a> Tarball<'a> {
    /// The tarball of `src` (`path` names it in errors).
    pub fn of(src: &'a dyn Image, path: &Path) -> Result<Tarball<'a>> {
        Tarball::new(GceDisk::new(src, path)?)
    }

    pub fn new(disk: GceDisk<'a>) -> Result<Tarball<'a>> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for r in allocated_ranges(&disk, GuestRange::new(0, disk.size)) {
            let r = r?;
            match runs.last_mut() {
                Some((start, len)) if r.start - (*start + *len) < MIN_HOLE => {
                    *len = r.end - *start;
                }
                _ => runs.push((r.start, r.len())),
            }
        }
        if runs.last().is_none_or(|&(s, l)| s + l < disk.size) {
            runs.push((disk.size, 0));
        }
        let mut run_at = Vec::with_capacity(runs.len());
        let mut data = 0;
        for &(_, len) in &runs {
            run_at.push(data);
            data += len;
        }
        let ext_blocks = runs
            .len()
            .saturating_sub(HEADER_ENTRIES)
            .div_ceil(EXT_ENTRIES) as u64;
        Ok(Tarball {
            disk,
            runs,
            run_at,
            data,
            ext_blocks,
        })
    }

    pub fn disk(&self) -> &GceDisk<'a> {
        &self.disk
    }

    /// Bytes of disk.raw stored in the tar (its sparse map's data): what progress counts.
    pub fn data_len(&self) -> u64 {
        self.data
    }

    /// Where the data region starts.
    fn data_at(&self) -> u64 {
        (1 + self.ext_blocks) * BLOCK
    }

    /// Bytes of the whole tar.
    pub fn len(&self) -> u64 {
        self.data_at() + self.data.next_multiple_of(BLOCK) + 2 * BLOCK
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Gzip members of the compressed file.
    pub fn members(&self) -> u64 {
        self.len().div_ceil(MEMBER)
    }

    fn header(&self) -> Result<[u8; 512]> {
        let mut h = tar::Header::new_gnu();
        h.set_path(DISK_NAME)
            .map_err(|e| Error::invalid(format!("tar header: {e}")))?;
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        // A fixed time: the file is a function of the disk alone (a resumed push sends the same
        // bytes).
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_size(self.data);
        let gnu = h
            .as_gnu_mut()
            .ok_or_else(|| Error::invalid("tar header: not GNU"))?;
        number(&mut gnu.realsize, self.disk.size);
        for (slot, &(start, len)) in gnu.sparse.iter_mut().zip(&self.runs) {
            number(&mut slot.offset, start);
            number(&mut slot.numbytes, len);
        }
        gnu.isextended[0] = u8::from(self.runs.len() > HEADER_ENTRIES);
        h.set_cksum();
        Ok(*h.as_bytes())
    }

    /// Extension block `k` (from 0): the next 21 entries of the map.
    fn ext_block(&self, k: u64) -> [u8; 512] {
        let mut b = tar::GnuExtSparseHeader::new();
        let first = HEADER_ENTRIES + k as usize * EXT_ENTRIES;
        let runs = &self.runs[first.min(self.runs.len())..];
        for (slot, &(start, len)) in b.sparse.iter_mut().zip(runs) {
            number(&mut slot.offset, start);
            number(&mut slot.numbytes, len);
        }
        b.isextended[0] = u8::from(runs.len() > EXT_ENTRIES);
        *b.as_bytes()
    }

    /// Fills `buf` with the tar's bytes at `offset` (inside [`Self::len`]).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.len() {
            return Err(Error::invalid(format!(
                "tar range {offset}..{end} past its end {}",
                self.len()
            )));
        }
        buf.fill(0);
        let data_at = self.data_at();
        // Header and extension blocks.
        let mut block = offset / BLOCK;
        while block * BLOCK < end.min(data_at) {
            let bytes = if block == 0 {
                self.header()?
            } else {
                self.ext_block(block - 1)
            };
            copy_overlap(buf, offset, &bytes, block * BLOCK);
            block += 1;
        }
        // Data runs.
        let (from, to) = (offset.max(data_at), end.min(data_at + self.data));
        if from < to {
            let (from, to) = (from - data_at, to - data_at);
            let mut i = self.run_at.partition_point(|&at| at <= from) - 1;
            let mut pos = from;
            while pos < to {
                let (start, len) = self.runs[i];
                let run_end = (self.run_at[i] + len).min(to);
                if run_end > pos {
                    let at = (pos + data_at - offset) as usize;
                    let n = (run_end - pos) as usize;
                    self.disk
                        .read_at(&mut buf[at..at + n], start + (pos - self.run_at[i]))?;
                    pos = run_end;
                }
                i += 1;
            }
        }
        Ok(())
    }

    /// Member `i` compressed, with `scratch` (at least [`MEMBER`] bytes) for the tar bytes.
    pub fn compress_member(&self, i: u64, scratch: &mut Vec<u8>) -> Result<Vec<u8>> {
        let start = i * MEMBER;
        let len = MEMBER.min(self.len() - start) as usize;
        scratch.resize(len, 0);
        self.read_at(scratch, start)?;
        // Header fields fixed (no name, time 0): the same disk always gives the same bytes.
        let mut gz = GzEncoder::new(Vec::with_capacity(len / 2), Compression::new(LEVEL));
        gz.write_all(scratch)
            .and_then(|()| gz.finish())
            .map_err(|e| Error::invalid(format!("gzip: {e}")))
    }

    /// Data bytes of member `i`'s tar range: what progress counts.
    fn member_data(&self, i: u64) -> u64 {
        let data_at = self.data_at();
        let (s, e) = (i * MEMBER, ((i + 1) * MEMBER).min(self.len()));
        e.min(data_at + self.data).saturating_sub(s.max(data_at))
    }
}

/// Writes `v` in a 12-byte tar number field: octal while it fits, else GNU's base-256 (first
/// byte 0x80, big-endian), which GNU tar reads in sparse maps too.
fn number(field: &mut [u8; 12], v: u64) {
    if v < 8u64.pow(11) {
        let text = format!("{v:011o}\0");
        field.copy_from_slice(text.as_bytes());
    } else {
        field.fill(0);
        field[0] = 0x80;
        field[4..].copy_from_slice(&v.to_be_bytes());
    }
}

/// Copies the part of `src` (at `src_at` in the tar) that overlaps `buf` (at `buf_at`).
fn copy_overlap(buf: &mut [u8], buf_at: u64, src: &[u8], src_at: u64) {
    let s = buf_at.max(src_at);
    let e = (buf_at + buf.len() as u64).min(src_at + src.len() as u64);
    if s < e {
        buf[(s - buf_at) as usize..(e - buf_at) as usize]
            .copy_from_slice(&src[(s - src_at) as usize..(e - src_at) as usize]);
    }
}

/// Members compressed at once per thread: enough to keep every thread busy between writes.
const WINDOW_PER_THREAD: usize = 2;

/// Compresses the members of `tar` in order on `pool`, a window at a time, handing each to
/// `sink` in order; `progress` counts the disk's data bytes.
fn compress_in_order(
    tar: &Tarball,
    pool: &rayon::ThreadPool,
    progress: &dyn Progress,
    sink: &mut dyn FnMut(u64, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let window = (pool.current_num_threads() * WINDOW_PER_THREAD).max(1) as u64;
    let members = tar.members();
    let mut first = 0;
    while first < members {
        let last = (first + window).min(members);
        let compressed: Vec<Result<Vec<u8>>> = pool.install(|| {
            (first..last)
                .into_par_iter()
                .map_init(Vec::new, |scratch, i| {
                    let m = tar.compress_member(i, scratch)?;
                    let data = tar.member_data(i);
                    progress.data_read(data);
                    progress.advance(data);
                    Ok(m)
                })
                .collect()
        });
        for (i, m) in (first..last).zip(compressed) {
            sink(i, m?)?;
        }
        first = last;
    }
    Ok(())
}

/// Writes `tar` gzip'ed to `dst` (temporary name, renamed into place when complete and synced
/// per `cache`) with `threads` threads (default: the read pool); `progress` counts
/// [`Tarball::data_len`].
pub fn write_file(
    tar: &Tarball,
    dst: &Path,
    threads: Option<usize>,
    cache: CacheMode,
    progress: &dyn Progress,
) -> Result<()> {
    let own_pool;
    let pool = match threads {
        Some(n) => {
            own_pool = crate::parallel::pool_of(n)?;
            &own_pool
        }
        None => crate::parallel::read_pool()?,
    };
    let out = PendingOutput::new(dst)?;
    let temp = out.temp_path().to_path_buf();
    let written = (|| {
        let file = std::fs::File::create_new(&temp).map_err(|e| Error::io(&temp, "create", e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        compress_in_order(tar, pool, progress, &mut |_, m| {
            w.write_all(&m).map_err(|e| Error::io(&temp, "write", e))
        })?;
        let file = w
            .into_inner()
            .map_err(|e| Error::io(&temp, "write", e.into_error()))?;
        if cache.syncs() {
            file.sync_all().map_err(|e| Error::io(&temp, "sync", e))?;
        }
        Ok(())
    })();
    written.map_err(|e| out.name_output(e))?;
    out.commit(cache).map(drop)
}

/// The GCE tarball as an [`ImageStream`] for push: laid out by compressing every member once
/// (to learn its size), then each byte range produced on demand by compressing its members
/// again. The guest is disk.raw.
pub struct GceStream<'a> {
    tar: Tarball<'a>,
    /// Where each member starts in the file, and the file's size last.
    member_at: Vec<u64>,
}

impl<'a> GceStream<'a> {
    /// Compresses `tar` once, reporting [`Tarball::data_len`] bytes to `compressing`.
    pub fn plan(tar: Tarball<'a>, compressing: &dyn Progress) -> Result<GceStream<'a>> {
        let mut member_at = Vec::new();
        let mut at = 0;
        compress_in_order(
            &tar,
            crate::parallel::read_pool()?,
            compressing,
            &mut |_, m| {
                member_at.push(at);
                at += m.len() as u64;
                Ok(())
            },
        )?;
        member_at.push(at);
        Ok(GceStream { tar, member_at })
    }
}

impl ImageStream for GceStream<'_> {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn size(&self) -> u64 {
        self.member_at[self.member_at.len() - 1]
    }

    fn guest(&self) -> &dyn Image {
        self.tar.disk()
    }

    fn container(&self) -> Option<&'static str> {
        Some("tar.gz")
    }

    fn layout_fingerprint(&self) -> String {
        format!("gce-tar-gz members={}", self.member_at.len() - 1)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.size() {
            return Err(Error::invalid(format!(
                "range {offset}..{end} past the tarball's end {}",
                self.size()
            )));
        }
        let mut i = self.member_at.partition_point(|&at| at <= offset) - 1;
        let mut scratch = Vec::new();
        let mut pos = offset;
        while pos < end {
            let m = self.tar.compress_member(i as u64, &mut scratch)?;
            let at = self.member_at[i];
            if at + m.len() as u64 != self.member_at[i + 1] {
                return Err(Error::invalid(format!(
                    "gzip member {i} compressed to another size than when planned: the source \
                     changed during the push"
                )));
            }
            copy_overlap(&mut buf[(pos - offset) as usize..], pos, &m, at);
            pos = self.member_at[i + 1].min(end);
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_image::MemImage;

    #[test]
    fn numbers_switch_to_base_256() {
        let mut f = [0u8; 12];
        number(&mut f, 0o777);
        assert_eq!(&f, b"00000000777\0");
        number(&mut f, 10 << 30);
        assert_eq!(f[0], 0x80);
        assert_eq!(u64::from_be_bytes(f[4..].try_into().unwrap()), 10 << 30);
    }

    #[test]
    fn the_tar_lists_the_data_runs_and_reads_back() {
        let a = vec![7u8; 5000];
        let b = vec![9u8; 100];
        let src = MemImage::new(8 << 20, &[(0, &a), (6 << 20, &b)]);
        let tar = Tarball::new(GceDisk::new(&src, Path::new("s")).unwrap()).unwrap();
        assert_eq!(tar.runs, vec![(0, 5000), (6 << 20, 100), (1 << 30, 0)]);
        let mut all = vec![0u8; tar.len() as usize];
        tar.read_at(&mut all, 0).unwrap();
        assert_eq!(&all[257..263], b"ustar ");
        assert_eq!(all[156], b'S');
        assert_eq!(&all[512..5512], &a[..]);
        assert_eq!(&all[5512..5612], &b[..]);
        // Any range reads what the whole does.
        let mut piece = vec![0u8; 777];
        tar.read_at(&mut piece, 5000).unwrap();
        assert_eq!(&piece[..], &all[5000..5777]);
    }
}

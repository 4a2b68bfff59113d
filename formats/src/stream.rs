//! Image files computed on demand from a source image: every byte range of the file is a
//! function of the source, so a file can be sent in parts, in any order and in parallel (into
//! object storage), without being written anywhere first.

use crate::error::{Error, Result};
use crate::image::{
    Extent, ExtentKind, Extents, Format, GuestRange, Image, ImageInfo, check_guest_range,
    touched_clusters,
};
use crate::registry::driver;
use crate::write::CreateOptions;
use std::path::PathBuf;

/// An image file of a known size that produces any byte range on demand.
pub trait ImageStream: Send + Sync {
    fn format(&self) -> Format;

    /// Bytes of the whole file.
    fn size(&self) -> u64;

    /// The guest the file holds: the source, seen larger where the format rounds its size up
    /// (the extra bytes read as zeros). Hash this to describe the file's guest.
    fn guest(&self) -> &dyn Image;

    /// Identifies the file's layout beyond format and size, where options or data choose it
    /// (compressed qcow2 packing); empty where format and size determine it.
    fn layout_fingerprint(&self) -> String {
        String::new()
    }

    /// The container the image file is wrapped in (`"tar.gz"`: GCE's tarball of disk.raw);
    /// `None` for a bare image file. Pull and verify read bare image files only.
    fn container(&self) -> Option<&'static str> {
        None
    }

    /// Fills `buf` with the file's bytes at `offset`; the range must lie inside [`Self::size`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// Lays out `src` as an image file of `format` with the `-o`/`-c` options in `opts`.
/// `allocated` yields the guest ranges of `src` that hold data, ascending; the
/// rest is not read. A compressed qcow2 compresses the whole source once here, reporting guest
/// bytes done to `compressing`.
pub fn stream<'a>(
    src: &'a dyn Image,
    format: Format,
    opts: &mut CreateOptions,
    allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
    compressing: &(dyn Fn(u64) + Sync),
) -> Result<Box<dyn ImageStream + 'a>> {
    let plan = driver(format)
        .stream
        .ok_or_else(|| Error::invalid(format!("{format} images cannot be streamed")))?;
    if opts.compress && format != Format::Qcow2 {
        return Err(Error::invalid(format!(
            "-c: {format} has no compressed form; use -O qcow2"
        )));
    }
    plan(src, opts, allocated, compressing)
}

/// How a format lays out a source as a stream: the source, the options, the allocated guest
/// ranges and the compression progress.
pub type StreamFn = for<'a> fn(
    src: &'a dyn Image,
    opts: &mut CreateOptions,
    allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
    compressing: &(dyn Fn(u64) + Sync),
) -> Result<Box<dyn ImageStream + 'a>>;

/// The raw stream: the guest bytes themselves.
pub(crate) fn raw<'a>(
    src: &'a dyn Image,
    opts: &mut CreateOptions,
    _allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
    _compressing: &(dyn Fn(u64) + Sync),
) -> Result<Box<dyn ImageStream + 'a>> {
    opts.reject_unknown(Format::Raw)?;
    Ok(Box::new(RawStream(ZeroPadded::new(
        src,
        src.virtual_size(),
    ))))
}

struct RawStream<'a>(ZeroPadded<'a>);

impl ImageStream for RawStream<'_> {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn size(&self) -> u64 {
        self.0.size
    }

    fn guest(&self) -> &dyn Image {
        &self.0
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_at(buf, offset)
    }
}

/// `ranges`, refused where they reach past a guest of `size` bytes: a layout planned from them
/// must stay inside the guest.
pub(crate) fn inside_guest(
    size: u64,
    ranges: &mut dyn Iterator<Item = Result<GuestRange>>,
) -> impl Iterator<Item = Result<GuestRange>> + '_ {
    ranges.map(move |r| {
        let r = r?;
        if r.end > size {
            return Err(Error::invalid(format!(
                "allocated range {}..{} past the guest's end {size}",
                r.start, r.end
            )));
        }
        Ok(r)
    })
}

/// A source seen with a virtual size of at least its own: bytes past its end read as zeros.
/// Reads only what the source's map calls data.
pub(crate) struct ZeroPadded<'a> {
    inner: &'a dyn Image,
    size: u64,
}

impl<'a> ZeroPadded<'a> {
    pub(crate) fn new(inner: &'a dyn Image, size: u64) -> Self {
        ZeroPadded {
            inner,
            size: size.max(inner.virtual_size()),
        }
    }
}

impl Image for ZeroPadded<'_> {
    fn format(&self) -> Format {
        self.inner.format()
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let inner_size = self.inner.virtual_size();
        if offset < inner_size {
            return self.inner.map(offset, max_len.min(inner_size - offset));
        }
        check_guest_range(self.size, offset, 1)?;
        Ok(Extent {
            start: offset,
            length: max_len.min(self.size - offset),
            kind: ExtentKind::Zero,
            depth: 0,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.size, offset, buf.len() as u64)?;
        for e in Extents::new(self, offset, offset + buf.len() as u64) {
            let e = e?;
            let at = (e.start - offset) as usize;
            let part = &mut buf[at..at + e.length as usize];
            if e.is_zero() {
                part.fill(0);
            } else {
                self.inner.read_at(part, e.start)?;
            }
        }
        Ok(())
    }

    fn with_mapped(&self, offset: u64, len: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.virtual_size() => self.inner.with_mapped(offset, len, f),
            _ => Ok(false),
        }
    }

    fn info(&self) -> ImageInfo {
        ImageInfo::basic(PathBuf::new(), self.format(), self.size, 0)
    }
}

/// The allocated clusters of a guest as runs, each cluster numbered by its rank among all
/// allocated ones: stream layouts store the allocated clusters back to back in rank order.
pub(crate) struct ClusterRuns {
    /// `(first cluster, count, rank of the first)`, ascending.
    runs: Vec<(u64, u64, u64)>,
    count: u64,
}

impl ClusterRuns {
    /// The runs of clusters of `cluster_size` bytes that `allocated` (guest ranges, ascending,
    /// inside a guest of `virtual_size` bytes) touch.
    pub(crate) fn new(
        virtual_size: u64,
        cluster_size: u64,
        allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
    ) -> Result<ClusterRuns> {
        let mut runs = Vec::new();
        let mut count = 0;
        for run in touched_clusters(inside_guest(virtual_size, allocated), cluster_size) {
            let run = run?;
            runs.push((run.start, run.end - run.start, count));
            count += run.end - run.start;
        }
        Ok(ClusterRuns { runs, count })
    }

    /// Allocated clusters in all.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// The runs: `(first cluster, count)`, ascending.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|&(first, n, _)| (first, n))
    }

    /// The rank of guest cluster `cluster`, if allocated.
    pub(crate) fn rank_of(&self, cluster: u64) -> Option<u64> {
        let i = self
            .runs
            .partition_point(|&(first, n, _)| first + n <= cluster);
        let &(first, _, r) = self
            .runs
            .get(i)
            .filter(|&&(first, _, _)| first <= cluster)?;
        Some(r + (cluster - first))
    }

    /// The guest cluster of rank `rank`.
    pub(crate) fn cluster_of(&self, rank: u64) -> Option<u64> {
        let i = self.runs.partition_point(|&(_, n, r)| r + n <= rank);
        let &(first, _, r) = self.runs.get(i)?;
        Some(first + (rank - r))
    }
}

/// `f(rank)` for every rank below `count`, on all cores in groups of `group` ranks, in rank
/// order: the first pass of layouts whose positions depend on each cluster's compressed size.
pub(crate) fn per_rank<T: Send>(
    count: u64,
    group: u64,
    f: &(dyn Fn(u64) -> Result<T> + Sync),
) -> Result<Vec<T>> {
    use rayon::prelude::*;
    let groups: Vec<Vec<T>> = (0..count.div_ceil(group))
        .into_par_iter()
        .map(|g| (g * group..((g + 1) * group).min(count)).map(f).collect())
        .collect::<Result<_>>()?;
    Ok(groups.into_iter().flatten().collect())
}

/// Reads guest bytes: `read(buf, guest_offset)`, for ranges inside the guest size.
pub type ReadGuest<'a> = &'a (dyn Fn(&mut [u8], u64) -> Result<()> + Sync);

/// A format's stream layout: every byte of the file as a function of guest reads.
pub(crate) trait StreamLayout: Send + Sync {
    fn format(&self) -> Format;
    fn size(&self) -> u64;
    fn layout_fingerprint(&self) -> String;
    /// Fills `buf` with the file's bytes at `offset`; guest data comes from `read_guest`.
    fn fill(&self, buf: &mut [u8], offset: u64, read_guest: ReadGuest) -> Result<()>;
}

/// A layout over its source, seen with the guest size the format rounds it up to.
pub(crate) struct PaddedStream<'a, L> {
    pub(crate) layout: L,
    pub(crate) guest: ZeroPadded<'a>,
}

impl<L: StreamLayout> ImageStream for PaddedStream<'_, L> {
    fn format(&self) -> Format {
        self.layout.format()
    }

    fn size(&self) -> u64 {
        self.layout.size()
    }

    fn guest(&self) -> &dyn Image {
        &self.guest
    }

    fn layout_fingerprint(&self) -> String {
        self.layout.layout_fingerprint()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.layout
            .fill(buf, offset, &|b, at| self.guest.read_at(b, at))
    }
}

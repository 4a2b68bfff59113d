//! The one walk over guest content that every pass reading an image goes through (convert,
//! compare, hash): the extent maps of one or more images walked in step and cut to the caller's
//! grid, into runs where no image has data (nothing to read) and grid cells with each image's
//! data ranges; and the reads of those ranges, in place where the image has them mapped.

use super::{Extents, Image};
use crate::error::{Error, Result};
use std::fmt;
use std::ops::Range;

/// Guest bytes `[start, end)`. One type for every guest range, so that an end cannot be taken
/// for a length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestRange {
    pub start: u64,
    pub end: u64,
}

impl GuestRange {
    pub fn new(start: u64, end: u64) -> Self {
        GuestRange { start, end }
    }

    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Indexes of the clusters of `cluster_size` bytes (not 0) that the range touches.
    pub fn clusters(&self, cluster_size: u64) -> Range<u64> {
        if self.is_empty() {
            return 0..0;
        }
        self.start / cluster_size..self.end.div_ceil(cluster_size)
    }

    /// The pieces of the range cut at the multiples of `grid` (not 0).
    pub fn cells(self, grid: u64) -> impl Iterator<Item = GuestRange> {
        let mut pos = self.start;
        std::iter::from_fn(move || {
            if pos >= self.end {
                return None;
            }
            let end = next_boundary(pos, grid).min(self.end);
            let cell = GuestRange::new(pos, end);
            pos = end;
            Some(cell)
        })
    }
}

impl fmt::Display for GuestRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.start, self.end)
    }
}

/// The first multiple of `grid` above `pos`, or `u64::MAX` past the last one.
fn next_boundary(pos: u64, grid: u64) -> u64 {
    (pos / grid)
        .checked_add(1)
        .and_then(|n| n.checked_mul(grid))
        .unwrap_or(u64::MAX)
}

/// The ranges of `image` inside `range` that its map does not call zero: what a copy must read.
/// Ascending, inside the virtual size; reads metadata only.
pub fn allocated_ranges(image: &dyn Image, range: GuestRange) -> DataRanges<'_> {
    DataRanges {
        extents: Extents::new(image, range.start, range.end),
        mapped_to: range.start,
    }
}

pub struct DataRanges<'a> {
    extents: Extents<'a>,
    /// The map is known up to here: where an error returned lies.
    mapped_to: u64,
}

impl Iterator for DataRanges<'_> {
    type Item = Result<GuestRange>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let e = match self.extents.next()? {
                Ok(e) => e,
                Err(err) => return Some(Err(err)),
            };
            self.mapped_to = e.end();
            if !e.is_zero() {
                return Some(Ok(e.range()));
            }
        }
    }
}

/// The clusters of `cluster_size` bytes (not 0) that `ranges` (ascending) touch, as ascending
/// runs of cluster indexes, each cluster once: a range that reaches back into clusters already
/// counted adds only the new ones. What an image format stores for a guest's data.
pub fn touched_clusters<I>(ranges: I, cluster_size: u64) -> TouchedClusters<I::IntoIter>
where
    I: IntoIterator<Item = Result<GuestRange>>,
{
    TouchedClusters {
        ranges: ranges.into_iter(),
        cluster_size,
        counted: 0,
        pending: None,
    }
}

pub struct TouchedClusters<I> {
    ranges: I,
    cluster_size: u64,
    /// Clusters below this one are counted.
    counted: u64,
    /// The run being extended.
    pending: Option<Range<u64>>,
}

impl<I: Iterator<Item = Result<GuestRange>>> Iterator for TouchedClusters<I> {
    type Item = Result<Range<u64>>;

    fn next(&mut self) -> Option<Result<Range<u64>>> {
        loop {
            let range = match self.ranges.next() {
                None => return self.pending.take().map(Ok),
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok(r)) => r,
            };
            let clusters = range.clusters(self.cluster_size);
            let first = clusters.start.max(self.counted);
            if first >= clusters.end {
                continue;
            }
            self.counted = clusters.end;
            match self.pending.as_mut() {
                Some(run) if run.end == first => run.end = clusters.end,
                Some(_) => return self.pending.replace(first..clusters.end).map(Ok),
                None => self.pending = Some(first..clusters.end),
            }
        }
    }
}

/// One step of a [`Walk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Guest bytes where no image has data: whole grid cells (the first and last ones cut to the
    /// walked range). Nothing to read.
    Zeros(GuestRange),
    /// One grid cell (cut to the walked range) and, per image in the order given, its data
    /// ranges inside the cell; the rest of the cell reads as zeros.
    Cell {
        range: GuestRange,
        data: Vec<Vec<GuestRange>>,
    },
}

impl Step {
    pub fn range(&self) -> GuestRange {
        match self {
            Step::Zeros(r) | Step::Cell { range: r, .. } => *r,
        }
    }
}

/// Walks the extent maps of several images over one guest range in step, in guest order, and
/// cuts it at the multiples of a grid: see [`Step`]. Sequential and metadata-only; consumers
/// that read in parallel pull steps as workers become free, so few are ever pending. A map error
/// is returned when the walk reaches the cell it lies in: the steps below it come first, as a
/// walk of each cell on its own would give them.
pub struct Walk<'a> {
    layers: Vec<Layer<'a>>,
    /// Start of the next step.
    pos: u64,
    end: u64,
    grid: u64,
}

/// One image of a walk, looking one data range ahead.
struct Layer<'a> {
    ranges: DataRanges<'a>,
    ahead: Ahead,
}

enum Ahead {
    /// Not looked at yet.
    Unknown,
    Range(GuestRange),
    /// A map error, and the offset it lies at.
    Error(u64, Error),
    Done,
}

impl Layer<'_> {
    /// Where this layer next needs the walk: the start of its next data range or its error.
    fn next_at(&mut self) -> Option<u64> {
        if matches!(self.ahead, Ahead::Unknown) {
            self.ahead = match self.ranges.next() {
                Some(Ok(r)) => Ahead::Range(r),
                Some(Err(e)) => Ahead::Error(self.ranges.mapped_to, e),
                None => Ahead::Done,
            };
        }
        match &self.ahead {
            Ahead::Range(r) => Some(r.start),
            Ahead::Error(at, _) => Some(*at),
            Ahead::Unknown | Ahead::Done => None,
        }
    }

    /// Takes the data ranges inside `cell` (the next one starts there or later).
    fn take_in(&mut self, cell: GuestRange) -> Result<Vec<GuestRange>> {
        let mut inside = Vec::new();
        while self.next_at().is_some_and(|at| at < cell.end) {
            match std::mem::replace(&mut self.ahead, Ahead::Unknown) {
                Ahead::Range(r) => {
                    inside.push(GuestRange::new(
                        r.start.max(cell.start),
                        r.end.min(cell.end),
                    ));
                    if r.end > cell.end {
                        self.ahead = Ahead::Range(GuestRange::new(cell.end, r.end));
                    }
                }
                Ahead::Error(_, e) => return Err(e),
                Ahead::Unknown | Ahead::Done => {}
            }
        }
        Ok(inside)
    }
}

impl<'a> Walk<'a> {
    /// Walks `range` of `images` (each walked up to its own virtual size: zeros past it), cut
    /// at the multiples of `grid`.
    pub fn new(images: &[&'a dyn Image], range: GuestRange, grid: u64) -> Result<Self> {
        if grid == 0 {
            return Err(Error::invalid("guest walk with a grid of 0 bytes"));
        }
        Ok(Walk {
            layers: images
                .iter()
                .map(|&image| Layer {
                    ranges: allocated_ranges(image, range),
                    ahead: Ahead::Unknown,
                })
                .collect(),
            pos: range.start,
            end: range.end,
            grid,
        })
    }

    /// Where the next step starts: every step returned so far lies below it.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn next_step(&mut self) -> Result<Option<Step>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let next = self.layers.iter_mut().filter_map(Layer::next_at).min();
        // Ranges below `pos` were consumed by earlier steps, so `next >= pos`.
        let cell_start = match next {
            Some(at) if at < self.end => at / self.grid * self.grid,
            _ => self.end,
        };
        if cell_start > self.pos {
            let zeros = GuestRange::new(self.pos, cell_start);
            self.pos = cell_start;
            return Ok(Some(Step::Zeros(zeros)));
        }
        let range = GuestRange::new(self.pos, next_boundary(self.pos, self.grid).min(self.end));
        let data = self
            .layers
            .iter_mut()
            .map(|layer| layer.take_in(range))
            .collect::<Result<_>>()?;
        self.pos = range.end;
        Ok(Some(Step::Cell { range, data }))
    }
}

impl Iterator for Walk<'_> {
    type Item = Result<Step>;

    fn next(&mut self) -> Option<Result<Step>> {
        match self.next_step() {
            Ok(step) => step.map(Ok),
            Err(e) => {
                self.pos = self.end;
                Some(Err(e))
            }
        }
    }
}

/// Calls `f` on the guest bytes of `range` of `image`: in place where the image has them
/// mapped in memory, else read into `buf` (grown to fit, never shrunk: a buffer that shrank for
/// a short read would be filled again to grow back).
pub fn with_bytes<T>(
    image: &dyn Image,
    range: GuestRange,
    buf: &mut Vec<u8>,
    mut f: impl FnMut(&[u8]) -> T,
) -> Result<T> {
    let mut out = None;
    image.with_mapped(range.start, range.len(), &mut |bytes| out = Some(f(bytes)))?;
    if let Some(out) = out {
        return Ok(out);
    }
    let len = usize::try_from(range.len())
        .map_err(|_| Error::invalid(format!("guest range {range} is too long to read at once")))?;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let bytes = &mut buf[..len];
    image.read_at(bytes, range.start)?;
    Ok(f(bytes))
}

/// Calls `f` on the guest bytes of `range` of `image`, in order: all at once where the image
/// has them mapped in one piece, else in pieces of at most `piece` bytes (each in place where it
/// can be, else read into `buf`): pieces stay in the CPU cache between the read and `f`.
pub fn for_each_piece(
    image: &dyn Image,
    range: GuestRange,
    piece: u64,
    buf: &mut Vec<u8>,
    f: &mut dyn FnMut(&[u8]),
) -> Result<()> {
    // Trying the whole range first, once: trying the rest again per piece could rescan the map.
    if image.with_mapped(range.start, range.len(), f)? {
        return Ok(());
    }
    let mut pos = range.start;
    while pos < range.end {
        let part = GuestRange::new(pos, pos.saturating_add(piece.max(1)).min(range.end));
        with_bytes(image, part, buf, &mut *f)?;
        pos = part.end;
    }
    Ok(())
}

/// Fills `buf` with the guest bytes of `image` at `offset`: the `data` ranges (ascending, inside
/// the buffer's span) read, zeros elsewhere without reading. Returns the bytes read.
pub fn read_filled(
    image: &dyn Image,
    offset: u64,
    buf: &mut [u8],
    data: impl IntoIterator<Item = Result<GuestRange>>,
) -> Result<u64> {
    let mut pos = 0;
    let mut read = 0;
    for range in data {
        let range = range?;
        let span = |at: u64| {
            at.checked_sub(offset)
                .and_then(|i| usize::try_from(i).ok())
                .filter(|&i| i <= buf.len())
        };
        let (lo, hi) = match (span(range.start), span(range.end)) {
            (Some(lo), Some(hi)) if pos <= lo && lo <= hi => (lo, hi),
            _ => {
                return Err(Error::invalid(format!(
                    "data range {range} is not inside {offset:#x}+{:#x} after {:#x}",
                    buf.len(),
                    offset + pos as u64
                )));
            }
        };
        buf[pos..lo].fill(0);
        image.read_at(&mut buf[lo..hi], range.start)?;
        read += range.len();
        pos = hi;
    }
    buf[pos..].fill(0);
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{Extent, ExtentKind, Format, ImageInfo};
    use std::path::PathBuf;

    /// A guest of `size` bytes whose data ranges are `data` (content: the offset modulo 251,
    /// plus one), zeros elsewhere; `mapped` serves data in place; its map fails from `fail_from`.
    struct Mem {
        size: u64,
        data: Vec<GuestRange>,
        mapped: bool,
        fail_from: u64,
    }

    fn byte_at(offset: u64) -> u8 {
        (offset % 251) as u8 + 1
    }

    impl Image for Mem {
        fn format(&self) -> Format {
            Format::Raw
        }
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
            if offset >= self.fail_from {
                return Err(Error::invalid(format!("bad map at {offset:#x}")));
            }
            let max_len = max_len.min(self.fail_from - offset);
            let next = self.data[self.data.partition_point(|r| r.end <= offset)..].first();
            let inside = next.is_some_and(|r| r.start <= offset);
            let until = next.map_or(u64::MAX, |r| if inside { r.end } else { r.start });
            let kind = if inside {
                ExtentKind::Data { offset }
            } else {
                ExtentKind::Zero
            };
            let length = until.min(offset + max_len) - offset;
            Ok(Extent {
                start: offset,
                length,
                kind,
                depth: 0,
            })
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                let at = offset + i as u64;
                let data = self.data.iter().any(|r| r.start <= at && at < r.end);
                *b = if data { byte_at(at) } else { 0 };
            }
            Ok(())
        }
        fn with_mapped(&self, offset: u64, len: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool> {
            if !self.mapped {
                return Ok(false);
            }
            let mut buf = vec![0; len as usize];
            self.read_at(&mut buf, offset)?;
            f(&buf);
            Ok(true)
        }
        fn info(&self) -> ImageInfo {
            ImageInfo::basic(PathBuf::from("mem"), Format::Raw, self.size, 0)
        }
    }

    fn r(start: u64, end: u64) -> GuestRange {
        GuestRange::new(start, end)
    }

    #[test]
    fn walk_cuts_layers_in_step_and_skips_shared_zeros() {
        let a = Mem {
            size: 100,
            data: vec![r(5, 12), r(45, 47)],
            mapped: false,
            fail_from: u64::MAX,
        };
        // Shorter than the walk: zeros past its end.
        let b = Mem {
            size: 50,
            data: vec![r(8, 25)],
            mapped: false,
            fail_from: u64::MAX,
        };
        let steps: Vec<Step> = Walk::new(&[&a, &b], r(0, 100), 10)
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        let cell = |range, data| Step::Cell { range, data };
        assert_eq!(
            steps,
            [
                cell(r(0, 10), vec![vec![r(5, 10)], vec![r(8, 10)]]),
                cell(r(10, 20), vec![vec![r(10, 12)], vec![r(10, 20)]]),
                cell(r(20, 30), vec![vec![], vec![r(20, 25)]]),
                Step::Zeros(r(30, 40)),
                cell(r(40, 50), vec![vec![r(45, 47)], vec![]]),
                Step::Zeros(r(50, 100)),
            ]
        );
        // An unaligned start begins with a partial cell.
        let steps: Vec<GuestRange> = Walk::new(&[&a], r(7, 33), 10)
            .unwrap()
            .map(|s| s.unwrap().range())
            .collect();
        assert_eq!(steps, [r(7, 10), r(10, 20), r(20, 33)]);
        assert!(Walk::new(&[&a], r(0, 100), 0).is_err());
    }

    #[test]
    fn walk_returns_a_map_error_at_the_cell_it_lies_in() {
        let image = Mem {
            size: 100,
            data: vec![r(5, 12)],
            mapped: false,
            fail_from: 45,
        };
        let mut walk = Walk::new(&[&image], r(0, 100), 10).unwrap();
        let cell = Step::Cell {
            range: r(0, 10),
            data: vec![vec![r(5, 10)]],
        };
        assert_eq!(walk.next().unwrap().unwrap(), cell);
        assert_eq!(walk.next().unwrap().unwrap().range(), r(10, 20));
        assert_eq!(walk.next().unwrap().unwrap(), Step::Zeros(r(20, 40)));
        assert_eq!(walk.position(), 40);
        let err = walk.next().unwrap().unwrap_err();
        assert!(err.to_string().contains("bad map at 0x2d"), "{err}");
        assert!(walk.next().is_none());
        // The extent being merged when the map failed comes before the error.
        let extents: Vec<_> = Extents::new(&image, 0, 100).collect();
        assert_eq!(extents.len(), 4);
        assert_eq!(extents[2].as_ref().unwrap().range(), r(12, 45));
        assert!(extents[3].is_err());
    }

    #[test]
    fn touched_clusters_counts_each_cluster_once() {
        let ranges = [
            r(0, 1),
            r(15, 17),
            r(0, 8),
            r(16, 40),
            r(41, 42),
            r(50, 50),
            r(60, 70),
        ];
        let runs: Vec<Range<u64>> = touched_clusters(ranges.map(Ok), 8)
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(runs, [0..6, 7..9]);
        assert_eq!(r(9, 9).clusters(8), 0..0);
        assert_eq!(r(8, 17).clusters(8), 1..3);
    }

    #[test]
    fn reads_give_data_and_zeros_mapped_or_not() {
        for mapped in [false, true] {
            let image = Mem {
                size: 64,
                data: vec![r(3, 9), r(20, 30)],
                mapped,
                fail_from: u64::MAX,
            };
            let mut expected = vec![0u8; 64];
            image.read_at(&mut expected, 0).unwrap();

            let mut buf = vec![0xff; 40];
            let data = allocated_ranges(&image, r(10, 50));
            assert_eq!(read_filled(&image, 10, &mut buf, data).unwrap(), 10);
            assert_eq!(buf, expected[10..50]);
            let outside = [Ok(r(5, 12))];
            assert!(read_filled(&image, 10, &mut buf, outside).is_err());

            let mut got = Vec::new();
            let mut scratch = Vec::new();
            let mut collect = |b: &[u8]| got.extend_from_slice(b);
            for_each_piece(&image, r(1, 33), 7, &mut scratch, &mut collect).unwrap();
            assert_eq!(got, expected[1..33]);
            let sum = with_bytes(&image, r(20, 22), &mut scratch, |b| b.to_vec()).unwrap();
            assert_eq!(sum, expected[20..22]);
        }
        assert_eq!(
            r(5, 25).cells(10).collect::<Vec<_>>(),
            [r(5, 10), r(10, 20), r(20, 25)]
        );
    }
}

//! Guest-visible comparison of two images in any formats, driven by their extent maps walked in
//! step ([`Walk`]): ranges that both maps call zero are never read, and the rest is compared in
//! parallel chunks, in place where an image is mapped in memory.

use crate::parallel::read_pool;
use crate::progress::Progress;
use diskkit_formats::image::{
    GuestRange, Step, Walk, allocated_ranges, first_nonzero_byte, with_bytes,
};
use diskkit_formats::{Error, Image, Result};
use rayon::prelude::*;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes compared per parallel task: large enough to amortise the map lookups and reads, small
/// enough that memory stays bounded (two buffers per worker thread).
const CHUNK: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareResult {
    Identical,
    /// The images differ from this guest offset on.
    ContentDiffers {
        offset: u64,
    },
    /// Sizes differ (only reported in strict mode, or when the extra part of the larger image
    /// is not all zeros; then `ContentDiffers` names the first non-zero byte).
    SizeDiffers {
        a: u64,
        b: u64,
    },
}

/// Compares the guest content of `a` and `b`. Outside strict mode, images of different sizes are
/// identical when the larger one holds only zeros past the end of the smaller, as with
/// `qemu-img compare`.
pub fn compare(
    a: &dyn Image,
    b: &dyn Image,
    strict: bool,
    progress: &dyn Progress,
) -> Result<CompareResult> {
    let (size_a, size_b) = (a.virtual_size(), b.virtual_size());
    if strict && size_a != size_b {
        return Ok(CompareResult::SizeDiffers {
            a: size_a,
            b: size_b,
        });
    }
    let common = size_a.min(size_b);
    if let Some(offset) = first_difference_in(a, b, common, progress)? {
        return Ok(CompareResult::ContentDiffers { offset });
    }
    let longer = if size_a > size_b { a } else { b };
    if let Some(offset) = first_nonzero(longer, common, longer.virtual_size())? {
        return Ok(CompareResult::ContentDiffers { offset });
    }
    Ok(CompareResult::Identical)
}

/// The first offset below `end` at which `a` and `b` differ. Cells are compared in parallel; the
/// outcome (difference or error) at the lowest offset wins, and cells above an outcome found
/// are skipped.
fn first_difference_in(
    a: &dyn Image,
    b: &dyn Image,
    end: u64,
    progress: &dyn Progress,
) -> Result<Option<u64>> {
    let mut walk = Walk::new(&[a, b], GuestRange::new(0, end), CHUNK)?;
    let first = Mutex::new(None::<(u64, Result<u64>)>);
    let limit = AtomicU64::new(u64::MAX);
    let found = |at: u64, outcome: Result<u64>| {
        limit.fetch_min(at, Ordering::Relaxed);
        if let Ok(mut first) = first.lock()
            && first.as_ref().is_none_or(|(f, _)| at < *f)
        {
            *first = Some((at, outcome));
        }
    };
    // A failing walk stops at its position: every step before it lies below.
    let steps = std::iter::from_fn(|| {
        let at = walk.position();
        walk.next().map(|step| step.map_err(|e| (at, e)))
    });
    read_pool()?.install(|| {
        steps
            .take_while(|_| limit.load(Ordering::Relaxed) == u64::MAX)
            .par_bridge()
            .for_each_init(CellBuffers::default, |bufs, step| match step {
                Err((at, e)) => found(at, Err(e)),
                Ok(step) => {
                    let range = step.range();
                    if range.start >= limit.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Step::Cell { data, .. } = &step {
                        // Each image's data in the cell is read (up to a difference found).
                        progress.data_read(data.iter().flatten().map(GuestRange::len).sum());
                        match compare_cell(a, b, range, data, bufs) {
                            Ok(None) => {}
                            Ok(Some(offset)) => found(offset, Ok(offset)),
                            Err(e) => found(range.start, Err(e)),
                        }
                    }
                    progress.advance(range.len());
                }
            })
    });
    match first.into_inner() {
        Ok(first) => first.map(|(_, outcome)| outcome).transpose(),
        Err(_) => Err(Error::invalid("compare: a worker panicked")),
    }
}

/// Per-worker read buffers, reused from cell to cell.
#[derive(Default)]
struct CellBuffers {
    a: Vec<u8>,
    b: Vec<u8>,
}

/// The first offset in `cell` at which `a` and `b` differ; `data` holds the data ranges of each
/// image inside the cell.
fn compare_cell(
    a: &dyn Image,
    b: &dyn Image,
    cell: GuestRange,
    data: &[Vec<GuestRange>],
    bufs: &mut CellBuffers,
) -> Result<Option<u64>> {
    let (no_data, mut pos) = (Vec::new(), cell.start);
    let (mut data_a, mut data_b) = (
        data.first().unwrap_or(&no_data).iter().peekable(),
        data.get(1).unwrap_or(&no_data).iter().peekable(),
    );
    while pos < cell.end {
        // Whether each image has data at `pos`, and up to where that holds.
        let state = |ranges: &mut std::iter::Peekable<std::slice::Iter<GuestRange>>| {
            while ranges.next_if(|r| r.end <= pos).is_some() {}
            match ranges.peek() {
                Some(r) if r.start <= pos => (true, r.end),
                Some(r) => (false, r.start),
                None => (false, cell.end),
            }
        };
        let (in_a, until_a) = state(&mut data_a);
        let (in_b, until_b) = state(&mut data_b);
        let part = GuestRange::new(pos, until_a.min(until_b).min(cell.end));
        let diff = match (in_a, in_b) {
            (false, false) => None,
            (true, false) => nonzero_in(a, part, &mut bufs.a)?,
            (false, true) => nonzero_in(b, part, &mut bufs.b)?,
            (true, true) => with_bytes(a, part, &mut bufs.a, |x| {
                with_bytes(b, part, &mut bufs.b, |y| first_difference(x, y))
            })??
            .map(|i| part.start + i as u64),
        };
        if diff.is_some() {
            return Ok(diff);
        }
        pos = part.end;
    }
    Ok(None)
}

/// The first non-zero guest byte of `image` in [start, end), reading only its data ranges.
pub fn first_nonzero(image: &dyn Image, start: u64, end: u64) -> Result<Option<u64>> {
    let mut buf = Vec::new();
    for range in allocated_ranges(image, GuestRange::new(start, end)) {
        for part in range?.cells(CHUNK) {
            if let Some(o) = nonzero_in(image, part, &mut buf)? {
                return Ok(Some(o));
            }
        }
    }
    Ok(None)
}

fn nonzero_in(image: &dyn Image, range: GuestRange, buf: &mut Vec<u8>) -> Result<Option<u64>> {
    let at = with_bytes(image, range, buf, first_nonzero_byte)?;
    Ok(at.map(|i| range.start + i as u64))
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    // Compare in large blocks first: slice equality is vectorised, byte search is not.
    const BLOCK: usize = 4096;
    let mut off = 0;
    for (ca, cb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        if ca != cb {
            return ca.iter().zip(cb).position(|(x, y)| x != y).map(|i| off + i);
        }
        off += ca.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::{Counted, NoProgress};
    use crate::test_image::MemImage;

    const MIB: usize = 1 << 20;

    fn pair(mapped: (bool, bool), a: MemImage, b: MemImage) -> (MemImage, MemImage) {
        let a = if mapped.0 { a.mapped() } else { a };
        let b = if mapped.1 { b.mapped() } else { b };
        (a, b)
    }

    #[test]
    fn reports_the_lowest_difference_whatever_the_layout() {
        let data = vec![0x5a; 6 * MIB];
        let mut changed = data.clone();
        changed[5 * MIB + 3] = 0;
        for mapped in [(false, false), (true, false), (false, true), (true, true)] {
            // Same content, laid out differently: zeros stored as data against a hole.
            let (a, b) = pair(
                mapped,
                MemImage::new(20 * MIB, &[(MIB as u64, &data), (12 << 20, &[0; 100])]),
                MemImage::new(20 * MIB, &[(MIB as u64, &data)]),
            );
            let counted = Counted::default();
            let r = compare(&a, &b, false, &counted).unwrap();
            assert_eq!(r, CompareResult::Identical, "{mapped:?}");
            // Every guest byte advanced; the data of both images read, the holes not.
            let read = 2 * data.len() as u64 + 100;
            assert_eq!(counted.totals(), (20 * MIB as u64, read), "{mapped:?}");
            // Differences in several cells: data against data, data against a hole.
            let (a, b) = pair(
                mapped,
                MemImage::new(20 * MIB, &[(MIB as u64, &data), (13 << 20, &[1; 10])]),
                MemImage::new(20 * MIB, &[(MIB as u64, &changed), (17 << 20, &[2; 10])]),
            );
            let r = compare(&a, &b, false, &NoProgress).unwrap();
            let offset = 6 * MIB as u64 + 3;
            assert_eq!(r, CompareResult::ContentDiffers { offset }, "{mapped:?}");
            let (a, b) = pair(
                mapped,
                MemImage::new(20 * MIB, &[(13 << 20, &[0, 1])]),
                MemImage::new(20 * MIB, &[(17 << 20, &[2; 10])]),
            );
            let r = compare(&a, &b, false, &NoProgress).unwrap();
            let offset = (13 << 20) + 1;
            assert_eq!(r, CompareResult::ContentDiffers { offset }, "{mapped:?}");
        }
    }

    /// An image whose map fails from `from` on.
    struct BadMap {
        inner: MemImage,
        from: u64,
    }

    impl Image for BadMap {
        fn format(&self) -> diskkit_formats::Format {
            self.inner.format()
        }
        fn virtual_size(&self) -> u64 {
            self.inner.virtual_size()
        }
        fn map(&self, offset: u64, max_len: u64) -> Result<diskkit_formats::Extent> {
            if offset >= self.from {
                return Err(Error::invalid(format!("bad map at {offset:#x}")));
            }
            self.inner.map(offset, max_len.min(self.from - offset))
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn info(&self) -> diskkit_formats::ImageInfo {
            self.inner.info()
        }
    }

    #[test]
    fn a_difference_below_a_map_error_wins_over_it() {
        let bad = |from| BadMap {
            inner: MemImage::new(20 * MIB, &[(MIB as u64, &[1; 10])]),
            from,
        };
        let other = MemImage::new(20 * MIB, &[(MIB as u64, &[1; 10]), (5 << 20, &[2; 10])]);
        let r = compare(&bad(9 << 20), &other, false, &NoProgress).unwrap();
        let offset = 5 << 20;
        assert_eq!(r, CompareResult::ContentDiffers { offset });
        let err = compare(&bad(3 << 20), &other, false, &NoProgress).unwrap_err();
        assert!(err.to_string().contains("bad map at 0x300000"), "{err}");
    }

    #[test]
    fn sizes_differ_only_by_a_non_zero_tail_or_in_strict_mode() {
        let short = MemImage::new(5 * MIB, &[(100, &[7; 100])]);
        let zero_tail = MemImage::new(9 * MIB, &[(100, &[7; 100]), (7 << 20, &[0; 10])]);
        let tail = MemImage::new(9 * MIB, &[(100, &[7; 100]), (7 << 20, &[0, 3])]);
        let r = compare(&short, &zero_tail, false, &NoProgress).unwrap();
        assert_eq!(r, CompareResult::Identical);
        let r = compare(&tail, &short, false, &NoProgress).unwrap();
        let offset = (7 << 20) + 1;
        assert_eq!(r, CompareResult::ContentDiffers { offset });
        let r = compare(&short, &zero_tail, true, &NoProgress).unwrap();
        let (a, b) = (5 * MIB as u64, 9 * MIB as u64);
        assert_eq!(r, CompareResult::SizeDiffers { a, b });
    }
}

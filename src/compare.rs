//! Guest-visible comparison of two images in any formats, driven by their extent maps: ranges that
//! both maps call zero are never read, and the rest is read in parallel chunks.

use crate::parallel::read_pool;
use crate::progress::Progress;
use diskkit_formats::image::first_nonzero_byte;
use diskkit_formats::{Error, Extents, Image, Result};
use rayon::prelude::*;

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
    let chunks = common.div_ceil(CHUNK);
    let first = read_pool()?.install(|| {
        (0..chunks)
            .into_par_iter()
            .map(|i| {
                let start = i * CHUNK;
                let end = (start + CHUNK).min(common);
                let r = compare_range(a, b, start, end);
                progress.advance(end - start);
                r
            })
            .find_map_first(|r| match r {
                Ok(None) => None,
                other => Some(other),
            })
    });
    if let Some(r) = first
        && let Some(offset) = r?
    {
        return Ok(CompareResult::ContentDiffers { offset });
    }
    let longer = if size_a > size_b { a } else { b };
    if let Some(offset) = first_nonzero(longer, common, longer.virtual_size())? {
        return Ok(CompareResult::ContentDiffers { offset });
    }
    Ok(CompareResult::Identical)
}

/// The first guest offset in [start, end) at which the two images differ.
fn compare_range(a: &dyn Image, b: &dyn Image, start: u64, end: u64) -> Result<Option<u64>> {
    let mut buf_a = Vec::new();
    let mut buf_b = Vec::new();
    let mut ext_b = Extents::new(b, start, end).peekable();
    for ea in Extents::new(a, start, end) {
        let ea = ea?;
        let mut pos = ea.start;
        while pos < ea.end() {
            let eb = match ext_b.peek() {
                Some(Ok(eb)) if eb.end() <= pos => {
                    ext_b.next();
                    continue;
                }
                Some(Ok(eb)) => *eb,
                Some(Err(_)) => {
                    return Err(match ext_b.next() {
                        Some(Err(e)) => e,
                        _ => Error::invalid("extent walk lost its error"),
                    });
                }
                None => {
                    return Err(Error::invalid(format!(
                        "extent map of the second image ends before {pos:#x}"
                    )));
                }
            };
            let seg_end = ea.end().min(eb.end());
            let len = (seg_end - pos) as usize;
            match (ea.is_zero(), eb.is_zero()) {
                (true, true) => {}
                (true, false) => {
                    if let Some(o) = nonzero_in(b, pos, len, &mut buf_b)? {
                        return Ok(Some(o));
                    }
                }
                (false, true) => {
                    if let Some(o) = nonzero_in(a, pos, len, &mut buf_a)? {
                        return Ok(Some(o));
                    }
                }
                (false, false) => {
                    buf_a.resize(len, 0);
                    buf_b.resize(len, 0);
                    a.read_at(&mut buf_a, pos)?;
                    b.read_at(&mut buf_b, pos)?;
                    if let Some(i) = first_difference(&buf_a, &buf_b) {
                        return Ok(Some(pos + i as u64));
                    }
                }
            }
            pos = seg_end;
        }
    }
    Ok(None)
}

/// The first non-zero guest byte of `image` in [start, end), reading only non-zero extents.
pub fn first_nonzero(image: &dyn Image, start: u64, end: u64) -> Result<Option<u64>> {
    let mut buf = Vec::new();
    for e in Extents::new(image, start, end) {
        let e = e?;
        if e.is_zero() {
            continue;
        }
        let mut pos = e.start;
        while pos < e.end() {
            let len = (e.end() - pos).min(CHUNK) as usize;
            if let Some(o) = nonzero_in(image, pos, len, &mut buf)? {
                return Ok(Some(o));
            }
            pos += len as u64;
        }
    }
    Ok(None)
}

fn nonzero_in(image: &dyn Image, pos: u64, len: usize, buf: &mut Vec<u8>) -> Result<Option<u64>> {
    buf.resize(len, 0);
    image.read_at(buf, pos)?;
    Ok(first_nonzero_byte(buf).map(|i| pos + i as u64))
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

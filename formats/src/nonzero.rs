//! Allocated ranges refined by reading them: the clusters (or blocks) of a layout that hold only
//! zeros are left out, as `convert -S` leaves them out of a file. Streamed layouts (VHD, qcow2)
//! decide allocation before the first byte is produced, so this costs one read pass over the
//! allocated data; the result is still a function of the source alone, so a resumed upload
//! plans the same layout.

use crate::error::Result;
use crate::image::{GuestRange, Image, first_nonzero_byte, touched_clusters};
use rayon::prelude::*;
use std::collections::VecDeque;

/// Granules read at once, in parallel: bounds memory to this many granules in flight at most.
const BATCH: usize = 64;

/// The granules of `granule` bytes that `ranges` (ascending, inside `src`) touch and that hold
/// a non-zero byte, as ascending guest ranges (cut at the source's end). Lazy: nothing is read
/// until the first item is asked for.
pub fn nonzero_granules<'a>(
    src: &'a dyn Image,
    ranges: impl Iterator<Item = Result<GuestRange>> + 'a,
    granule: u64,
) -> impl Iterator<Item = Result<GuestRange>> + 'a {
    NonZero {
        src,
        granule,
        touched: Box::new(touched_clusters(ranges, granule).flat_map(|run| {
            let (ok, err) = match run {
                Ok(r) => (Some(r), None),
                Err(e) => (None, Some(Err(e))),
            };
            ok.into_iter().flatten().map(Ok).chain(err)
        })),
        ready: VecDeque::new(),
    }
}

struct NonZero<'a> {
    src: &'a dyn Image,
    granule: u64,
    /// Touched granule indexes, ascending.
    touched: Box<dyn Iterator<Item = Result<u64>> + 'a>,
    /// Ranges found and not yet handed out.
    ready: VecDeque<GuestRange>,
}

/// Guest range of granule `index` of `src`.
fn granule_range(src: &dyn Image, granule: u64, index: u64) -> GuestRange {
    let start = index * granule;
    GuestRange::new(start, (start + granule).min(src.virtual_size()))
}

/// Whether granule `index` of `src` holds a non-zero byte.
fn holds_data(src: &dyn Image, granule: u64, index: u64, buf: &mut Vec<u8>) -> Result<bool> {
    let range = granule_range(src, granule, index);
    let mut data = false;
    if src.with_mapped(range.start, range.len(), &mut |b| {
        data = first_nonzero_byte(b).is_some()
    })? {
        return Ok(data);
    }
    buf.resize(range.len() as usize, 0);
    src.read_at(buf, range.start)?;
    Ok(first_nonzero_byte(buf).is_some())
}

impl Iterator for NonZero<'_> {
    type Item = Result<GuestRange>;

    fn next(&mut self) -> Option<Result<GuestRange>> {
        while self.ready.is_empty() {
            let batch: Vec<u64> = match self.touched.by_ref().take(BATCH).collect() {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            };
            if batch.is_empty() {
                return None;
            }
            let (src, granule) = (self.src, self.granule);
            let data: Vec<bool> = match batch
                .par_iter()
                .map_init(Vec::new, |buf, &g| holds_data(src, granule, g, buf))
                .collect()
            {
                Ok(d) => d,
                Err(e) => return Some(Err(e)),
            };
            for (&g, _) in batch.iter().zip(data).filter(|(_, d)| *d) {
                let r = granule_range(self.src, self.granule, g);
                match self.ready.back_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => self.ready.push_back(r),
                }
            }
        }
        self.ready.pop_front().map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostFile;
    use crate::raw::RawImage;

    #[test]
    fn zero_granules_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let mut content = vec![0u8; 10 * 4096 + 100];
        content[4096 + 7] = 1; // granule 1
        content[3 * 4096] = 2; // granule 3
        content[4 * 4096 + 5] = 3; // granule 4
        content[10 * 4096 + 99] = 4; // the short last granule
        std::fs::write(&path, &content).unwrap();
        let image = RawImage::open(HostFile::open(&path).unwrap());
        let all = std::iter::once(Ok(GuestRange::new(0, image.virtual_size())));
        let found: Vec<GuestRange> = nonzero_granules(&image, all, 4096)
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(
            found,
            [
                GuestRange::new(4096, 2 * 4096),
                GuestRange::new(3 * 4096, 5 * 4096),
                GuestRange::new(10 * 4096, 10 * 4096 + 512),
            ]
        );
        // Only touched granules are read: data outside the ranges given is not seen.
        let some = [
            GuestRange::new(0, 4000),
            GuestRange::new(3 * 4096 + 1, 3 * 4096 + 2),
        ];
        let found: Vec<GuestRange> = nonzero_granules(&image, some.into_iter().map(Ok), 4096)
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(found, [GuestRange::new(3 * 4096, 4 * 4096)]);
    }
}

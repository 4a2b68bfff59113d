//! qcow2 images as a stream of bytes computed on demand, so an image can be sent into object
//! storage in parts, in any order, without a file on disk.
//!
//! The whole layout follows from the source's allocated clusters, known before the first byte
//! is sent: the header (cluster 0), the L1 table, one L2 table per L1 entry that covers data,
//! the data clusters in guest order, then the refcount blocks and table. Every cluster of the
//! file is used exactly once, so every refcount is 1 and every table entry carries COPIED.
//! Tables are generated when their bytes are asked for: memory grows with the number of
//! allocated runs, not with the image size.

use super::header::Header;
use super::l2::{COPIED, Geometry, MAX_L1_BYTES};
use super::refcount::RefcountLayout;
use crate::error::{Error, Result};
use crate::image::check_guest_range;
use crate::write::CreateOptions;

const CLUSTER_BITS: u32 = 16;
/// 16-bit refcounts, qemu's default.
const REFCOUNT_ORDER: u32 = 4;

/// A run of allocated guest clusters and the rank of its first one among all allocated ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first: u64,
    count: u64,
    rank: u64,
}

/// The byte layout of a plain (uncompressed) qcow2 v3 image with 64 KiB clusters.
pub struct Qcow2Stream {
    virtual_size: u64,
    header: Vec<u8>,
    /// L1 entries, in memory (at most 32 MiB by the format's limit).
    l1: Vec<u64>,
    /// L1 indices that have an L2 table, ascending: table `k` is the `k`-th cluster of L2s.
    tables: Vec<u64>,
    runs: Vec<Run>,
    data_clusters: u64,
    l1_clusters: u64,
    refcount_blocks: u64,
    refcount_table_clusters: u64,
}

impl Qcow2Stream {
    /// Plans the image for a guest of `virtual_size` bytes whose data lies in `allocated`
    /// (guest ranges `(start, length)`, ascending). Takes no `-o` options.
    pub fn plan(
        virtual_size: u64,
        opts: &mut CreateOptions,
        allocated: &mut dyn Iterator<Item = Result<(u64, u64)>>,
    ) -> Result<Qcow2Stream> {
        opts.reject_unknown(crate::image::Format::Qcow2)?;
        if opts.compress || opts.backing_file.is_some() {
            return Err(Error::invalid(
                "streamed qcow2 output is plain: no -c, no backing file",
            ));
        }
        let geo = Geometry {
            cluster_bits: CLUSTER_BITS,
            extended_l2: false,
            has_data_file: false,
        };
        let cs = geo.cluster_size();
        let l1_entries = geo.l1_entries_for(virtual_size);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(format!(
                "qcow2: {virtual_size} bytes needs an L1 table above 32 MiB"
            )));
        }
        let mut runs: Vec<Run> = Vec::new();
        let mut rank = 0;
        for range in allocated {
            let (start, len) = range?;
            let end = start
                .checked_add(len)
                .filter(|&e| e <= virtual_size)
                .ok_or_else(|| {
                    Error::invalid(format!("allocated range {start}+{len} out of range"))
                })?;
            if len == 0 {
                continue;
            }
            let mut first = start >> CLUSTER_BITS;
            let last = end.div_ceil(cs);
            if let Some(r) = runs.last_mut() {
                first = first.max(r.first + r.count);
                if first == r.first + r.count && first < last {
                    r.count += last - first;
                    rank += last - first;
                    continue;
                }
            }
            if first < last {
                runs.push(Run {
                    first,
                    count: last - first,
                    rank,
                });
                rank += last - first;
            }
        }
        let per_l2 = geo.l2_entries();
        let mut tables: Vec<u64> = Vec::new();
        for r in &runs {
            let from = (r.first / per_l2).max(tables.last().map_or(0, |&t| t + 1));
            tables.extend(from..=(r.first + r.count - 1) / per_l2);
        }
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let before_refcounts = 1 + l1_clusters + tables.len() as u64 + rank;
        let layout = RefcountLayout {
            cluster_bits: CLUSTER_BITS,
            order: REFCOUNT_ORDER,
        };
        let (refcount_blocks, refcount_table_clusters) =
            layout.structure_clusters(before_refcounts);
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
        Ok(Qcow2Stream {
            virtual_size,
            header: h.encode()?,
            l1,
            tables,
            runs,
            data_clusters: rank,
            l1_clusters,
            refcount_blocks,
            refcount_table_clusters,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << CLUSTER_BITS
    }

    /// Index of the first data cluster.
    fn data_start(&self) -> u64 {
        1 + self.l1_clusters + self.tables.len() as u64
    }

    fn total_clusters(&self) -> u64 {
        self.data_start() + self.data_clusters + self.refcount_blocks + self.refcount_table_clusters
    }

    pub fn object_size(&self) -> u64 {
        self.total_clusters() * self.cluster_size()
    }

    /// Host offset of guest cluster `c`, if allocated.
    fn host_of(&self, c: u64) -> Option<u64> {
        let i = self.runs.partition_point(|r| r.first + r.count <= c);
        let r = self.runs.get(i).filter(|r| r.first <= c)?;
        Some((self.data_start() + r.rank + (c - r.first)) * self.cluster_size())
    }

    /// Guest cluster stored at data rank `rank`.
    fn guest_of(&self, rank: u64) -> Option<u64> {
        let i = self.runs.partition_point(|r| r.rank + r.count <= rank);
        let r = self.runs.get(i)?;
        Some(r.first + (rank - r.rank))
    }

    /// Fills `buf` with the image's bytes at `offset`; guest data comes from `read_guest(buf,
    /// guest_offset)`, called only for ranges inside the virtual size.
    pub fn fill(
        &self,
        buf: &mut [u8],
        offset: u64,
        read_guest: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let size = self.object_size();
        // The stream's bytes play the guest's part here: same bounds rule.
        check_guest_range(size, offset, buf.len() as u64)?;
        let cs = self.cluster_size();
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (cluster, within) = (pos / cs, pos % cs);
            let n = (buf.len() - done).min((cs - within) as usize);
            self.fill_cluster(&mut buf[done..done + n], cluster, within, read_guest)?;
            done += n;
        }
        Ok(())
    }

    /// Fills `out` with cluster `cluster`'s bytes from `within` on.
    fn fill_cluster(
        &self,
        out: &mut [u8],
        cluster: u64,
        within: u64,
        read_guest: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let data = self.data_start();
        let refcounts = data + self.data_clusters;
        let table = refcounts + self.refcount_blocks;
        // 8-byte big-endian words of a generated cluster: word `i` is `word(i)`.
        let words = |out: &mut [u8], word: &dyn Fn(u64) -> u64| {
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
            words(out, &|i| {
                self.l1.get((base + i) as usize).copied().unwrap_or(0)
            });
        } else if cluster < data {
            let l1_index = self.tables[(cluster - 1 - self.l1_clusters) as usize];
            let first = l1_index * (cs / 8);
            words(out, &|i| {
                let c = first + i;
                if c * cs < self.virtual_size {
                    self.host_of(c).map_or(0, |h| h | COPIED)
                } else {
                    0
                }
            });
        } else if cluster < refcounts {
            let guest_cluster = self
                .guest_of(cluster - data)
                .ok_or_else(|| Error::invalid("qcow2 stream: data cluster out of range"))?;
            let at = guest_cluster * cs + within;
            let from_guest = self.virtual_size.saturating_sub(at).min(out.len() as u64) as usize;
            read_guest(&mut out[..from_guest], at)?;
            out[from_guest..].fill(0);
        } else if cluster < table {
            // 16-bit refcounts: 1 for every cluster of the file, 0 past its end.
            let first = (cluster - refcounts) * cs / 2;
            let total = self.total_clusters();
            for (i, b) in out.iter_mut().enumerate() {
                let at = within + i as u64;
                *b = u8::from(at % 2 == 1 && first + at / 2 < total);
            }
        } else {
            let base = (cluster - table) * cs / 8;
            words(out, &|i| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_two_runs() {
        let mut ranges =
            vec![Ok((100, 10)), Ok((3 << 16, 2 << 16)), Ok((600 << 20, 1))].into_iter();
        let s = Qcow2Stream::plan(1 << 30, &mut CreateOptions::default(), &mut ranges).unwrap();
        assert_eq!(s.data_clusters, 4);
        assert_eq!(s.tables, vec![0, 1]);
        assert_eq!(s.host_of(3), Some((s.data_start() + 1) << 16));
        assert_eq!(s.host_of(2), None);
        assert_eq!(s.guest_of(3), Some((600 << 20) >> 16));
        let mut all = vec![0u8; s.object_size() as usize];
        let mut pieces = vec![0u8; all.len()];
        let mut guest = |b: &mut [u8], at: u64| {
            b.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = ((at + i as u64) % 251) as u8);
            Ok(())
        };
        s.fill(&mut all, 0, &mut guest).unwrap();
        for (i, chunk) in pieces.chunks_mut(100_003).enumerate() {
            s.fill(chunk, i as u64 * 100_003, &mut guest).unwrap();
        }
        assert_eq!(all, pieces);
        assert_eq!(&all[..4], b"QFI\xfb");
    }
}

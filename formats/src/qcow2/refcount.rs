//! Reference counts: counting what references each host cluster, and writing a complete refcount
//! table with its blocks. The writer, check's repair and resize all lay refcounts out the same way:
//! a fresh structure appended after everything else, counting itself.

use super::l2::{Cluster, Geometry};
use crate::error::{Error, Result};
use crate::host::HostFile;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Refcount width and cluster size: how entries pack into blocks.
#[derive(Debug, Clone, Copy)]
pub struct RefcountLayout {
    pub cluster_bits: u32,
    pub order: u32,
}

impl RefcountLayout {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn bits(&self) -> u32 {
        1 << self.order
    }

    /// Refcounts per refcount block.
    pub fn per_block(&self) -> u64 {
        self.cluster_size() * 8 / u64::from(self.bits())
    }

    pub fn max_count(&self) -> u64 {
        if self.bits() == 64 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }

    /// Refcount `i` of a block (entries are big-endian; sub-byte widths start at the low bit).
    pub fn get(&self, block: &[u8], i: u64) -> u64 {
        let bits = u64::from(self.bits());
        let bit = i * bits;
        let byte = (bit / 8) as usize;
        if bits >= 8 {
            let n = (bits / 8) as usize;
            block
                .get(byte..byte + n)
                .map(|b| b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
                .unwrap_or(0)
        } else {
            let shift = bit % 8;
            block
                .get(byte)
                .map(|&b| (u64::from(b) >> shift) & ((1 << bits) - 1))
                .unwrap_or(0)
        }
    }

    fn set(&self, block: &mut [u8], i: u64, value: u64) {
        let bits = u64::from(self.bits());
        let bit = i * bits;
        let byte = (bit / 8) as usize;
        if bits >= 8 {
            let n = (bits / 8) as usize;
            let be = value.to_be_bytes();
            block[byte..byte + n].copy_from_slice(&be[8 - n..]);
        } else {
            let shift = bit % 8;
            let mask = (((1u64 << bits) - 1) << shift) as u8;
            block[byte] = (block[byte] & !mask) | (((value << shift) as u8) & mask);
        }
    }

    /// Refcount blocks and table clusters needed to count `clusters` clusters plus themselves
    /// (the fixed point qemu computes too).
    pub fn structure_clusters(&self, clusters: u64) -> (u64, u64) {
        let per_table_cluster = self.cluster_size() / 8;
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let b = (clusters + blocks + table).div_ceil(self.per_block());
            let t = b.div_ceil(per_table_cluster);
            if (b, t) == (blocks, table) {
                return (blocks, table);
            }
            (blocks, table) = (b, t);
        }
    }
}

/// References to each host cluster, counted while walking the metadata.
pub struct Counts {
    pub counts: Vec<u64>,
}

impl Counts {
    /// Room for `clusters` clusters; the caller has bounded it by the file size.
    pub fn new(clusters: u64) -> Self {
        Counts {
            counts: vec![0; clusters as usize],
        }
    }

    /// Counts one reference to every cluster of `[offset, offset + len)`. Ranges past the counted
    /// area are the caller's business (check reports them; the writer never makes them).
    pub fn add_range(&mut self, offset: u64, len: u64, cluster_bits: u32) -> bool {
        if len == 0 {
            return true;
        }
        let first = offset >> cluster_bits;
        let Some(last) = offset.checked_add(len - 1).map(|e| e >> cluster_bits) else {
            return false;
        };
        if last >= self.counts.len() as u64 {
            return false;
        }
        for c in first..=last {
            self.counts[c as usize] = self.counts[c as usize].saturating_add(1);
        }
        true
    }

    /// Counts the host clusters an L2 entry references: a data cluster or the sectors of a
    /// compressed one. External data files are not refcounted.
    pub fn add_cluster(&mut self, geo: &Geometry, cluster: Cluster) -> bool {
        match cluster {
            Cluster::Data { host, .. } | Cluster::Zero { host }
                if !geo.has_data_file && host != 0 =>
            {
                self.add_range(host, geo.cluster_size(), geo.cluster_bits)
            }
            Cluster::Compressed(d) => {
                let start = d.host & !511;
                self.add_range(start, (d.host - start) + d.size, geo.cluster_bits)
            }
            _ => true,
        }
    }
}

/// Appends a complete refcount structure at cluster index `counts.len()` of `file` that records
/// `counts` and itself. Returns (table offset, table clusters, end of file).
pub fn write_structure(
    file: &File,
    path: &Path,
    layout: RefcountLayout,
    mut counts: Vec<u64>,
) -> Result<(u64, u32, u64)> {
    let cs = layout.cluster_size();
    let base = counts.len() as u64;
    let (blocks, table_clusters) = layout.structure_clusters(base);
    counts.resize((base + blocks + table_clusters) as usize, 1);
    if let Some(&too_big) = counts.iter().find(|&&c| c > layout.max_count()) {
        return Err(Error::invalid(format!(
            "{}: a cluster has {too_big} references, more than {}-bit refcounts hold",
            path.display(),
            layout.bits()
        )));
    }
    let write = |buf: &[u8], at: u64| {
        file.write_all_at(buf, at)
            .map_err(|e| Error::io(path, format!("write refcounts at {at:#x}"), e))
    };
    let mut table = vec![0u8; (table_clusters * cs) as usize];
    let mut block = vec![0u8; cs as usize];
    for (b, chunk) in counts.chunks(layout.per_block() as usize).enumerate() {
        block.fill(0);
        for (i, &c) in chunk.iter().enumerate() {
            layout.set(&mut block, i as u64, c);
        }
        let at = (base + b as u64) * cs;
        write(&block, at)?;
        table[b * 8..b * 8 + 8].copy_from_slice(&at.to_be_bytes());
    }
    let table_offset = (base + blocks) * cs;
    write(&table, table_offset)?;
    let table_clusters = u32::try_from(table_clusters)
        .map_err(|_| Error::invalid(format!("{}: refcount table too large", path.display())))?;
    Ok((
        table_offset,
        table_clusters,
        table_offset + u64::from(table_clusters) * cs,
    ))
}

/// The refcount of every cluster as the image records it, block by block: calls `f(cluster,
/// refcount)` for each cluster below `clusters`. Unallocated blocks count as zeros.
pub fn for_each_disk_refcount(
    file: &HostFile,
    layout: RefcountLayout,
    table: &[u64],
    clusters: u64,
    mut f: impl FnMut(u64, u64),
    mut bad: impl FnMut(String),
) {
    let per_block = layout.per_block();
    let cs = layout.cluster_size();
    for (b, &entry) in table.iter().enumerate() {
        let first = b as u64 * per_block;
        if first >= clusters {
            break;
        }
        let off = entry & super::l2::OFFSET_MASK;
        let block = if off == 0 {
            None
        } else if !off.is_multiple_of(cs) {
            bad(format!(
                "refcount block {b} at {off:#x} is not cluster aligned"
            ));
            None
        } else {
            match file.read_vec_at(off, cs, "qcow2 refcount block") {
                Ok(v) => Some(v),
                Err(e) => {
                    bad(e.to_string());
                    None
                }
            }
        };
        for i in 0..per_block.min(clusters - first) {
            f(
                first + i,
                block.as_ref().map_or(0, |blk| layout.get(blk, i)),
            );
        }
    }
    let covered = table.len() as u64 * per_block;
    for c in covered..clusters {
        f(c, 0);
    }
}

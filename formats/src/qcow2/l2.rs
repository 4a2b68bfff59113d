//! L1/L2 entries: what a guest cluster (or subcluster) maps to, and a bounded cache of L2 tables.

use crate::error::{Error, Result};
use crate::host::HostFile;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Bits 9..=55 of L1 and standard L2 entries: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: refcount is exactly one (only meaningful for the active table).
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry (version 3, no extended L2): reads as zeros.
pub const ZERO: u64 = 1;
pub const SUBCLUSTERS: u64 = 32;
/// Upper bound of any L1 table (qemu's limit): bounds memory whatever the header says.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Memory the L2 cache may hold.
const L2_CACHE_BYTES: u64 = 32 << 20;

/// What one guest cluster is according to its L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    Unallocated,
    /// Reads as zeros; `host` (0 if none) is a cluster kept allocated for it.
    Zero {
        host: u64,
    },
    /// Standard cluster at this host offset (in the data file when there is one). With extended
    /// L2 entries `alloc`/`zero` hold the subcluster bitmaps; otherwise every subcluster is
    /// allocated.
    Data {
        host: u64,
        alloc: u32,
        zero: u32,
    },
    /// Subclusters of a cluster without host storage: zero or unallocated (extended L2 only).
    Subclusters {
        zero: u32,
    },
    Compressed(CompressedDesc),
}

/// Location of a compressed cluster: byte offset and the number of bytes that may hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDesc {
    pub host: u64,
    pub size: u64,
}

/// Geometry derived from the header: sizes of clusters and tables.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub extended_l2: bool,
    pub has_data_file: bool,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry: 8, or 16 with extended entries.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2 { 16 } else { 8 }
    }

    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }

    /// Guest bytes one L1 entry (one L2 table) covers.
    pub fn l1_coverage(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / SUBCLUSTERS
        } else {
            self.cluster_size()
        }
    }

    /// L1 entries needed to map `size` guest bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l1_coverage())
    }

    /// Shift of the sector count field in a compressed descriptor.
    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Encodes a compressed cluster descriptor: `len` bytes of compressed data at `host`.
    pub fn compressed_entry(&self, host: u64, len: u64) -> u64 {
        let sectors = (host + len - 1) / 512 - host / 512;
        COMPRESSED | (sectors << self.csize_shift()) | host
    }

    /// Decodes an L2 entry (and its bitmap for extended L2). `at` is the entry's file offset,
    /// for errors.
    pub fn decode(&self, path: &Path, entry: u64, bitmap: u64, at: u64) -> Result<Cluster> {
        let bad = |why: String| Err(Error::corrupt(path, "qcow2 L2 entry", at, why));
        if entry & COMPRESSED != 0 {
            if self.has_data_file {
                return bad("compressed cluster in an image with an external data file".into());
            }
            if self.extended_l2 && bitmap != 0 {
                return bad("compressed cluster with a subcluster bitmap".into());
            }
            let shift = self.csize_shift();
            let host = entry & ((1u64 << shift) - 1);
            let sectors = ((entry & !(COPIED | COMPRESSED)) >> shift) + 1;
            let size = sectors * 512 - (host & 511);
            return Ok(Cluster::Compressed(CompressedDesc { host, size }));
        }
        let host = entry & OFFSET_MASK;
        if !host.is_multiple_of(self.cluster_size()) {
            return bad(format!(
                "data cluster offset {host:#x} is not cluster aligned"
            ));
        }
        let allocated = host != 0 || (self.has_data_file && entry & COPIED != 0);
        if !self.extended_l2 {
            return Ok(if entry & ZERO != 0 {
                Cluster::Zero { host }
            } else if allocated {
                Cluster::Data {
                    host,
                    alloc: u32::MAX,
                    zero: 0,
                }
            } else {
                Cluster::Unallocated
            });
        }
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return bad("subcluster both allocated and zero".into());
        }
        Ok(if allocated {
            Cluster::Data { host, alloc, zero }
        } else if alloc != 0 {
            return bad("allocated subclusters without a host cluster".into());
        } else if zero == 0 {
            Cluster::Unallocated
        } else {
            Cluster::Subclusters { zero }
        })
    }
}

/// L2 tables by host offset, least recently used evicted first, bounded in bytes.
pub struct L2Cache {
    inner: Mutex<CacheInner>,
    capacity: usize,
}

#[derive(Default)]
struct CacheInner {
    tables: HashMap<u64, (Arc<Vec<u64>>, u64)>,
    by_age: BTreeMap<u64, u64>,
    tick: u64,
}

impl L2Cache {
    pub fn new(cluster_size: u64) -> Self {
        L2Cache {
            inner: Mutex::new(CacheInner::default()),
            capacity: (L2_CACHE_BYTES / cluster_size).max(16) as usize,
        }
    }

    /// The L2 table at `offset` as big-endian-decoded words, read on a miss.
    pub fn get(&self, file: &HostFile, offset: u64, cluster_size: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(t) = self.lookup(offset) {
            return Ok(t);
        }
        let raw = file.read_vec_at(offset, cluster_size, "qcow2 L2 table")?;
        let table = Arc::new(be_words(&raw));
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.tick += 1;
        let tick = c.tick;
        if let Some((_, old)) = c.tables.insert(offset, (table.clone(), tick)) {
            c.by_age.remove(&old);
        }
        c.by_age.insert(tick, offset);
        while c.tables.len() > self.capacity {
            let Some((_, victim)) = c.by_age.pop_first() else {
                break;
            };
            c.tables.remove(&victim);
        }
        Ok(table)
    }

    fn lookup(&self, offset: u64) -> Option<Arc<Vec<u64>>> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let c = &mut *guard;
        c.tick += 1;
        let tick = c.tick;
        let (table, age) = c.tables.get_mut(&offset)?;
        c.by_age.remove(age);
        *age = tick;
        c.by_age.insert(tick, offset);
        Some(table.clone())
    }
}

/// Decodes a buffer of big-endian 64-bit words (a trailing partial word is ignored).
pub fn be_words(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_be_bytes(w)
        })
        .collect()
}

/// Reads a table of `entries` 64-bit words (L1 or refcount table), bounded by the file size and
/// [`MAX_L1_BYTES`].
pub fn read_table(file: &HostFile, offset: u64, entries: u64, structure: &str) -> Result<Vec<u64>> {
    let bytes = entries
        .checked_mul(8)
        .filter(|&b| b <= MAX_L1_BYTES)
        .ok_or_else(|| {
            Error::corrupt(
                file.path(),
                structure,
                offset,
                format!("{entries} entries is more than any image needs"),
            )
        })?;
    Ok(be_words(&file.read_vec_at(offset, bytes, structure)?))
}

//! Changing the virtual size of a qcow2 image in place.
//!
//! Growing may need a larger L1 table: it is written after the end of the file, then refcounts
//! are rebuilt into a fresh structure after it, and one header write switches size, L1 table and
//! refcount table together. Shrinking unmaps the clusters past the new end first (their space
//! becomes free, the file is not truncated).

use super::check::{append_refcounts, counts_for, open_rw, patch};
use super::header::{Header, OFF_SIZE};
use super::l2::{Cluster, Geometry, MAX_L1_BYTES, OFFSET_MASK, be_words, read_table};
use crate::error::{Error, Result};
use crate::host::HostFile;
use std::path::Path;

/// Resizes the qcow2 image at `path` to `new_size` bytes. Shrinking drops the guest data past
/// the new end: callers confirm that with the user first.
pub fn resize(path: &Path, new_size: u64) -> Result<()> {
    let file = HostFile::open(path)?;
    let h = Header::read(&file)?;
    let refuse = |why: &str| Err(Error::unsupported(path, format!("resizing {why}")));
    if h.nb_snapshots > 0 {
        return refuse("an image with internal snapshots (as qemu-img)");
    }
    super::edit::refuse_unfit(path, &h, "resizing")?;
    let geo = h.geometry();
    let cs = geo.cluster_size();
    let old_size = h.size;
    let new_size = super::sectors_up(new_size)?;
    let l1 = read_table(
        &file,
        h.l1_table_offset,
        u64::from(h.l1_size),
        "qcow2 L1 table",
    )?;
    let rw = open_rw(path)?;
    let mut new_h = h.clone();
    new_h.size = new_size;
    if new_size < old_size {
        unmap_past(&file, &rw, &geo, &l1, h.l1_table_offset, new_size)?;
    } else if new_size > old_size {
        let needed = geo.l1_entries_for(new_size);
        if needed * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(format!(
                "{}: {new_size} bytes needs an L1 table above 32 MiB",
                path.display()
            )));
        }
        if needed > u64::from(h.l1_size) {
            let mut bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            bytes.resize((needed * 8).next_multiple_of(cs) as usize, 0);
            let at = file.len().next_multiple_of(cs);
            patch(&rw, path, &bytes, at)?;
            new_h.l1_table_offset = at;
            new_h.l1_size = needed as u32;
        }
    } else {
        return Ok(());
    }

    rw.sync_data().map_err(|e| Error::io(path, "sync", e))?;
    let counts = counts_for(&HostFile::open(path)?, &new_h)?;
    let (rt_offset, rt_clusters) = append_refcounts(&rw, path, h.refcount_layout(), counts)?;
    new_h.refcount_table_offset = rt_offset;
    new_h.refcount_table_clusters = rt_clusters;
    // Bytes 24..60 (size, L1 size and offset, refcount table) in one write.
    let encoded = new_h.encode()?;
    let fields = encoded.get(OFF_SIZE as usize..60).unwrap_or_default();
    patch(&rw, path, fields, OFF_SIZE)?;
    rw.sync_all().map_err(|e| Error::io(path, "sync", e))
}

/// Calls `f(guest cluster index, cluster, file offset of its entry)` for every mapped cluster of
/// the L2 tables `l1` references at or after guest cluster `first`.
fn for_each_cluster_from(
    file: &HostFile,
    geo: &Geometry,
    l1: &[u64],
    first: u64,
    mut f: impl FnMut(u64, Cluster, u64) -> Result<()>,
) -> Result<()> {
    let per_table = geo.l2_entries();
    let words = (geo.l2_entry_bytes() / 8) as usize;
    for (t, &l1e) in l1.iter().enumerate().skip((first / per_table) as usize) {
        let off = l1e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        let table = be_words(&file.read_vec_at(off, geo.cluster_size(), "qcow2 L2 table")?);
        for (i, e) in table.chunks(words).enumerate() {
            let c = t as u64 * per_table + i as u64;
            if c < first {
                continue;
            }
            let at = off + (i * words * 8) as u64;
            let cluster = geo.decode(file.path(), e[0], e.get(1).copied().unwrap_or(0), at)?;
            if cluster != Cluster::Unallocated {
                f(c, cluster, at)?;
            }
        }
    }
    Ok(())
}

/// Unmaps every guest cluster that starts at or after `new_size`, drops L2 tables wholly past
/// it, and zeroes the tail of a data cluster that the new end cuts (so growing later shows
/// zeros there).
fn unmap_past(
    file: &HostFile,
    rw: &std::fs::File,
    geo: &Geometry,
    l1: &[u64],
    l1_offset: u64,
    new_size: u64,
) -> Result<()> {
    let path = file.path();
    let cs = geo.cluster_size();
    let first_gone = new_size.div_ceil(cs);
    let entry_zeros = vec![0u8; geo.l2_entry_bytes() as usize];
    if !new_size.is_multiple_of(cs) {
        for_each_cluster_from(file, geo, l1, new_size / cs, |c, cluster, _| {
            if c == new_size / cs
                && let Cluster::Data { host, .. } = cluster
            {
                let keep = new_size % cs;
                patch(rw, path, &vec![0u8; (cs - keep) as usize], host + keep)?;
            }
            Ok(())
        })?;
    }
    for_each_cluster_from(file, geo, l1, first_gone, |_, _, at| {
        patch(rw, path, &entry_zeros, at)
    })?;
    let keep_tables = geo.l1_entries_for(new_size) as usize;
    for (i, &e) in l1.iter().enumerate().skip(keep_tables) {
        if e != 0 {
            patch(rw, path, &[0u8; 8], l1_offset + i as u64 * 8)?;
        }
    }
    Ok(())
}

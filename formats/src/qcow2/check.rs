//! `check`: rebuilds every cluster's reference count from the metadata (header, L1/L2 tables of
//! the active state and of each snapshot, snapshot table, refcount structures) and compares it
//! with the refcounts the image records. Repair writes a fresh refcount structure at the end of
//! the file and points the header at it; the old one becomes free space.

use super::header::{Header, INCOMPAT_DIRTY, OFF_INCOMPATIBLE_FEATURES, OFF_REFCOUNT_TABLE_OFFSET};
use super::l2::{COPIED, Cluster, Geometry, OFFSET_MASK, be_words, read_table};
use super::read::check_l1_size;
use super::refcount::{Counts, RefcountLayout, for_each_disk_refcount, write_structure};
use super::snapshot;
use crate::check::{CheckReport, Repair};
use crate::error::{Error, Result};
use crate::host::HostFile;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Above this many host clusters the in-memory count (8 bytes each) is refused.
const MAX_CHECKED_CLUSTERS: u64 = 1 << 26;

/// References counted from the metadata: all of them, and those without the refcount structure
/// itself (what a rebuilt structure must record besides itself).
struct Tally {
    all: Counts,
    without_refcounts: Counts,
    /// Active L1/L2 entries with their host cluster and COPIED flag, which must be set exactly
    /// when the cluster's refcount is 1: (cluster index, flag, entry offset).
    copied: Vec<(u64, bool, u64)>,
    report: CheckReport,
}

impl Tally {
    fn problem(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.report.messages.push(msg);
    }

    /// Counts a metadata range; a range outside the file is a corruption.
    fn metadata(&mut self, what: &str, offset: u64, len: u64, cluster_bits: u32, refcounts: bool) {
        let inside = self.all.add_range(offset, len, cluster_bits);
        if inside && !refcounts {
            self.without_refcounts.add_range(offset, len, cluster_bits);
        }
        if !inside {
            self.problem(format!(
                "{what} at {offset:#x} ({len} bytes) lies outside the file"
            ));
        }
    }
}

/// Walks one L1 table (active or a snapshot's) and everything it references.
fn walk_l1(
    file: &HostFile,
    geo: &Geometry,
    l1: &[u64],
    l1_offset: u64,
    active: bool,
    t: &mut Tally,
) {
    let cs = geo.cluster_size();
    let words = (geo.l2_entry_bytes() / 8) as usize;
    for (l1_index, &l1e) in l1.iter().enumerate() {
        let off = l1e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) {
            t.problem(format!("L2 table offset {off:#x} is not cluster aligned"));
            continue;
        }
        t.metadata("L2 table", off, cs, geo.cluster_bits, false);
        if active {
            t.copied
                .push((off / cs, l1e & COPIED != 0, l1_offset + l1_index as u64 * 8));
        }
        let Ok(raw) = file.read_vec_at(off, cs, "qcow2 L2 table") else {
            continue;
        };
        let table = be_words(&raw);
        // Fragmentation is judged within each L2 table, as qemu-img check does.
        let mut last_host = None;
        for (i, e) in table.chunks(words).enumerate() {
            let at = off + (i * words * 8) as u64;
            let bitmap = e.get(1).copied().unwrap_or(0);
            let cluster = match geo.decode(file.path(), e[0], bitmap, at) {
                Ok(c) => c,
                Err(err) => {
                    t.problem(err.to_string());
                    continue;
                }
            };
            let in_file = t.all.add_cluster(geo, cluster);
            if in_file {
                t.without_refcounts.add_cluster(geo, cluster);
            } else {
                t.problem(format!("L2 entry at {at:#x} points outside the file"));
            }
            if !active {
                continue;
            }
            if let Cluster::Data { host, .. } | Cluster::Zero { host } = cluster
                && host != 0
                && !geo.has_data_file
            {
                t.copied.push((host / cs, e[0] & COPIED != 0, at));
            }
            let r = &mut t.report;
            let bump = |n: &mut Option<u64>| *n = Some(n.unwrap_or(0) + 1);
            match cluster {
                Cluster::Data { host, .. } | Cluster::Zero { host } if host != 0 => {
                    bump(&mut r.allocated_clusters);
                    if last_host.is_some_and(|h: u64| h + cs != host) {
                        bump(&mut r.fragmented_clusters);
                    }
                    last_host = Some(host);
                }
                Cluster::Compressed(_) => {
                    // Compressed clusters count as fragmented, as qemu-img check counts them.
                    bump(&mut r.allocated_clusters);
                    bump(&mut r.compressed_clusters);
                    bump(&mut r.fragmented_clusters);
                }
                _ => {}
            }
        }
    }
}

/// Counts an L1 table (active or a snapshot's) and everything it references.
fn walk_table(
    file: &HostFile,
    geo: &Geometry,
    t: &mut Tally,
    what: &str,
    offset: u64,
    entries: u32,
    active: bool,
) -> Result<()> {
    let l1 = read_table(file, offset, u64::from(entries), what)?;
    t.metadata(
        what,
        offset,
        u64::from(entries) * 8,
        geo.cluster_bits,
        false,
    );
    walk_l1(file, geo, &l1, offset, active, t);
    Ok(())
}

/// Counts every reference the metadata of `h` makes (`h` may describe a layout not yet in the
/// header: resize counts its new L1 table this way).
fn tally(file: &HostFile, h: &Header) -> Result<Tally> {
    let path = file.path();
    let geo = h.geometry();
    let cs = geo.cluster_size();
    let cb = geo.cluster_bits;
    let clusters = file.len().div_ceil(cs);
    if clusters > MAX_CHECKED_CLUSTERS {
        return Err(Error::unsupported(
            path,
            format!("checking images of more than {MAX_CHECKED_CLUSTERS} clusters"),
        ));
    }
    let mut t = Tally {
        all: Counts::new(clusters),
        without_refcounts: Counts::new(clusters),
        copied: Vec::new(),
        report: CheckReport {
            filename: path.to_path_buf(),
            format: "qcow2".into(),
            total_clusters: Some(h.size.div_ceil(cs)),
            allocated_clusters: Some(0),
            fragmented_clusters: Some(0),
            compressed_clusters: Some(0),
            ..Default::default()
        },
    };
    t.metadata("header", 0, cs, cb, false);

    walk_table(
        file,
        &geo,
        &mut t,
        "L1 table",
        h.l1_table_offset,
        h.l1_size,
        true,
    )?;
    let (snapshots, table_len) = snapshot::read_table(file, h)?;
    t.metadata("snapshot table", h.snapshots_offset, table_len, cb, false);
    for s in &snapshots {
        let what = "qcow2 snapshot L1 table";
        walk_table(
            file,
            &geo,
            &mut t,
            what,
            s.l1_table_offset,
            s.l1_size,
            false,
        )?;
    }

    for (what, offset, len) in super::bitmap::structures(file, h)? {
        t.metadata(what, offset, len, cb, false);
    }

    let rt = refcount_table(file, h)?;
    t.metadata(
        "refcount table",
        h.refcount_table_offset,
        rt.len() as u64 * 8,
        cb,
        true,
    );
    for &e in &rt {
        let off = e & OFFSET_MASK;
        if off != 0 {
            t.metadata("refcount block", off, cs, cb, true);
        }
    }
    Ok(t)
}

fn refcount_table(file: &HostFile, h: &Header) -> Result<Vec<u64>> {
    let entries = u64::from(h.refcount_table_clusters) * h.cluster_size() / 8;
    read_table(
        file,
        h.refcount_table_offset,
        entries,
        "qcow2 refcount table",
    )
}

/// Checks the qcow2 image at `path`; with `repair`, fixes leaks (and with [`Repair::All`] also
/// refcounts that are too low) and reports the result after the repair.
pub fn check(path: &Path, repair: Option<Repair>) -> Result<CheckReport> {
    check_file(HostFile::open(path)?, repair)
}

/// [`check`] of an opened file: a local file, or an object read in place (repairs need a local
/// file).
pub fn check_file(file: HostFile, repair: Option<Repair>) -> Result<CheckReport> {
    let path = &file.path().to_path_buf();
    let h = Header::read(&file)?;
    // What open refuses, check refuses too: the rest of the check trusts the L1 size.
    check_l1_size(
        path,
        &h.geometry(),
        h.l1_size,
        super::sectors_down(h.size),
        "qcow2 L1 table",
        h.l1_table_offset,
    )?;
    let mut t = tally(&file, &h)?;
    let rt = refcount_table(&file, &h)?;
    let cs = h.cluster_size();
    let clusters = t.all.counts.len() as u64;
    let layout = h.refcount_layout();
    let mut disk = vec![0u64; clusters as usize];
    let mut errors = Vec::new();
    for_each_disk_refcount(
        &file,
        layout,
        &rt,
        clusters,
        |c, r| disk[c as usize] = r,
        |m| errors.push(m),
    );
    for m in errors {
        t.problem(m);
    }
    let mut end = 0;
    for (c, &d) in disk.iter().enumerate() {
        let r = t.all.counts[c];
        if r > 0 {
            end = (c as u64 + 1) * cs;
        }
        if d < r {
            t.problem(format!("ERROR cluster {c} refcount={d} reference={r}"));
        } else if d > r {
            t.report.leaks += 1;
            t.report
                .messages
                .push(format!("Leaked cluster {c} refcount={d} reference={r}"));
        }
        if r > layout.max_count() {
            t.problem(format!(
                "cluster {c} has {r} references, above the refcount width"
            ));
        }
    }
    t.report.image_end_offset = Some(end);
    for (c, flag, at) in std::mem::take(&mut t.copied) {
        // A cluster past the end of the file was reported as such already (once, as qemu does).
        let Some(&refcount) = disk.get(c as usize) else {
            continue;
        };
        if (refcount == 1) != flag {
            t.problem(format!(
                "ERROR OFLAG_COPIED: table entry at {at:#x} has COPIED={flag} but cluster {c} \
                 has refcount {refcount}"
            ));
        }
    }

    let report = t.report;
    let wanted = match repair {
        Some(Repair::All) => report.leaks + report.corruptions > 0,
        Some(Repair::Leaks) => report.leaks > 0,
        None => false,
    };
    if !wanted {
        return Ok(report);
    }
    // Keep recorded values that this repair mode does not fix; the old refcount structure
    // itself is no longer referenced once the new one is in place.
    let fix_low = repair == Some(Repair::All);
    let counts: Vec<u64> = disk
        .iter()
        .zip(&t.all.counts)
        .zip(&t.without_refcounts.counts)
        .map(|((&d, &r), &wanted)| {
            if d > r || (d < r && fix_low) || r != wanted {
                wanted
            } else {
                d
            }
        })
        .collect();
    let rw = open_rw(path)?;
    let (rt_offset, rt_clusters) = append_refcounts(&rw, path, layout, counts)?;
    let mut fields = [0u8; 12];
    fields[..8].copy_from_slice(&rt_offset.to_be_bytes());
    fields[8..].copy_from_slice(&rt_clusters.to_be_bytes());
    patch(&rw, path, &fields, OFF_REFCOUNT_TABLE_OFFSET)?;
    if h.version >= 3 && h.dirty() {
        // Refcounts are exact again.
        let features = h.incompatible_features & !INCOMPAT_DIRTY;
        patch(
            &rw,
            path,
            &features.to_be_bytes(),
            OFF_INCOMPATIBLE_FEATURES,
        )?;
    }
    rw.sync_all().map_err(|e| Error::io(path, "sync", e))?;
    let mut after = check(path, None)?;
    after.leaks_fixed = report.leaks.saturating_sub(after.leaks);
    after.corruptions_fixed = report.corruptions.saturating_sub(after.corruptions);
    after.leaks = report.leaks;
    after.corruptions = report.corruptions;
    Ok(after)
}

pub(super) fn open_rw(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, "open for writing", e))
}

pub(super) fn patch(file: &std::fs::File, path: &Path, bytes: &[u8], at: u64) -> Result<()> {
    file.write_all_at(bytes, at)
        .map_err(|e| Error::io(path, format!("write at {at:#x}"), e))
}

/// Appends a refcount structure recording `counts` (one per cluster of the file) after the end
/// of the file and syncs it; the caller then points the header at it. Returns the table offset
/// and size in clusters.
pub(super) fn append_refcounts(
    file: &std::fs::File,
    path: &Path,
    layout: RefcountLayout,
    counts: Vec<u64>,
) -> Result<(u64, u32)> {
    let (rt_offset, rt_clusters, _) = write_structure(file, path, layout, counts)?;
    file.sync_data().map_err(|e| Error::io(path, "sync", e))?;
    Ok((rt_offset, rt_clusters))
}

/// References of the metadata `h` describes, for a rebuilt refcount structure: what resize
/// needs after it changed the tables. Refuses images with problems.
pub(super) fn counts_for(file: &HostFile, h: &Header) -> Result<Vec<u64>> {
    let t = tally(file, h)?;
    if let Some(m) = t.report.messages.first() {
        return Err(Error::corrupt(file.path(), "qcow2 metadata", 0, m.clone()));
    }
    Ok(t.without_refcounts.counts)
}

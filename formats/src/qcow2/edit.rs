//! In-place changes to a qcow2 image that a crash at any point cannot corrupt: the one layer
//! every verb that rewrites an existing image goes through (snapshot create/apply/delete, amend,
//! bitmaps, rebase, commit).
//!
//! Why not update refcounts one by one, as qemu does: the COPIED flag of every active L1/L2
//! entry must equal "refcount is 1", and it lives in another cluster than the refcount, so a
//! change that alters a shared count (a new or deleted snapshot) cannot be written in place
//! without a window that `qemu-img check` reports as corruption. Instead an [`Edit`]:
//!
//! 1. allocates new clusters only where the image on disk has none in use (refcount 0 in the
//!    recorded refcounts, or past the end of the file) and writes new structures only there:
//!    nothing the current header reaches is ever overwritten;
//! 2. on [`Edit::commit`] syncs, counts every reference of the new state, copies any active L2
//!    table or L1 table whose COPIED flags must change (fixed point), appends a complete refcount
//!    structure for the new state (growing the table is free: it is sized afresh) and syncs;
//! 3. switches to the new state with one write of the header cluster, and syncs.
//!
//! A crash before step 3 leaves the old image untouched (the new clusters are unreferenced, or
//! leaks); after it, the new image is complete. What the old state alone used (old tables, the
//! old refcount structure) is free space afterwards, reused by later allocations.

use super::check::{append_refcounts, check, counts_for, open_rw, patch};
use super::header::Header;
use super::l2::{COPIED, Cluster, OFFSET_MASK, be_words, read_table};
use super::refcount::{RefcountLayout, for_each_disk_refcount};
use crate::error::{Error, Result};
use crate::host::HostFile;
use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Called with the name of each commit step as it completes ("written", "refcounts",
/// "header"): crash tests stop the process there.
static STEP_HOOK: OnceLock<fn(&str)> = OnceLock::new();

/// Installs the step hook (once per process).
pub fn set_step_hook(hook: fn(&str)) {
    let _ = STEP_HOOK.set(hook);
}

fn step(name: &str) {
    if let Some(hook) = STEP_HOOK.get() {
        hook(name);
    }
}

/// Fixed-point rounds of COPIED settling; two suffice (copy, then patch the copies).
const MAX_SETTLE_ROUNDS: usize = 8;

/// Refuses to `verb` in place an image qemu would repair first (dirty, corrupt, or with errors
/// `check` finds) or one with an external data file.
pub(super) fn refuse_unfit(path: &Path, h: &Header, verb: &str) -> Result<()> {
    let refuse = |why: &str| Err(Error::unsupported(path, format!("{verb} {why}")));
    if h.has_data_file() {
        return refuse("an image with an external data file");
    }
    if h.dirty() || h.corrupt() {
        return refuse("an image marked dirty or corrupt: run check -r all first");
    }
    let report = check(path, None)?;
    if report.corruptions > 0 {
        return Err(Error::corrupt(
            path,
            "qcow2 metadata",
            0,
            format!("{} corruptions: run check -r all first", report.corruptions),
        ));
    }
    Ok(())
}

/// A pending change to one qcow2 image.
pub struct Edit {
    path: PathBuf,
    rw: File,
    /// The header on disk.
    current: Header,
    /// The header [`Edit::commit`] writes: callers change its fields.
    pub header: Header,
    /// Refcounts the image records, per cluster of the file as it was opened.
    recorded: Vec<u64>,
    /// Clusters this edit allocated: the only ones it writes before the switch.
    fresh: BTreeSet<u64>,
    /// First cluster past the file and past every allocation.
    end: u64,
    /// Where the search for free clusters resumes.
    cursor: u64,
}

impl Edit {
    /// Opens the image for a change. Images qemu would repair first (dirty, corrupt, or with
    /// errors `check` finds) and images with an external data file are refused.
    pub fn open(path: &Path) -> Result<Edit> {
        let file = HostFile::open(path)?;
        let h = Header::read(&file)?;
        refuse_unfit(path, &h, "changing")?;
        let cs = h.cluster_size();
        let clusters = file.len().div_ceil(cs);
        let table = read_table(
            &file,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs / 8,
            "qcow2 refcount table",
        )?;
        let mut recorded = vec![0u64; clusters as usize];
        let mut problems = Vec::new();
        for_each_disk_refcount(
            &file,
            h.refcount_layout(),
            &table,
            clusters,
            |c, r| recorded[c as usize] = r,
            |m| problems.push(m),
        );
        if let Some(m) = problems.first() {
            return Err(Error::corrupt(
                path,
                "qcow2 refcount block",
                h.refcount_table_offset,
                m.clone(),
            ));
        }
        Ok(Edit {
            path: path.to_path_buf(),
            rw: open_rw(path)?,
            header: h.clone(),
            current: h,
            recorded,
            fresh: BTreeSet::new(),
            end: clusters,
            cursor: 1,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header on disk (before this edit).
    pub fn current(&self) -> &Header {
        &self.current
    }

    pub fn cluster_size(&self) -> u64 {
        self.current.cluster_size()
    }

    /// The image as it is now on disk, new clusters included, for reading.
    pub fn reader(&self) -> Result<HostFile> {
        HostFile::open(&self.path)
    }

    /// Allocates `len` bytes of whole contiguous clusters nothing uses: a free run the recorded
    /// refcounts show, else the end of the file. Returns the offset.
    pub fn alloc(&mut self, len: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let n = len.div_ceil(cs).max(1);
        let free = |c: u64| self.recorded[c as usize] == 0 && !self.fresh.contains(&c);
        let limit = self.recorded.len() as u64;
        let mut start = self.cursor;
        let mut found = None;
        while start + n <= limit {
            match (start..start + n).find(|&c| !free(c)) {
                Some(used) => start = used + 1,
                None => {
                    found = Some(start);
                    break;
                }
            }
        }
        let first = match found {
            Some(s) => {
                self.cursor = s + n;
                s
            }
            None => {
                self.cursor = limit;
                let s = self.end;
                self.end += n;
                s
            }
        };
        self.fresh.extend(first..first + n);
        Ok(first * cs)
    }

    /// Allocates clusters for `bytes` and writes them there (zero-padded to whole clusters).
    pub fn write_new(&mut self, bytes: &[u8]) -> Result<u64> {
        let at = self.alloc(bytes.len() as u64)?;
        let cs = self.cluster_size();
        let mut padded = bytes.to_vec();
        padded.resize(
            (bytes.len() as u64).div_ceil(cs).max(1) as usize * cs as usize,
            0,
        );
        self.write_fresh(at, &padded)?;
        Ok(at)
    }

    /// Writes into clusters this edit allocated (never into what the current image uses).
    pub fn write_fresh(&self, at: u64, bytes: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let last = (at + bytes.len().max(1) as u64 - 1) / cs;
        if let Some(c) = (at / cs..=last).find(|c| !self.fresh.contains(c)) {
            return Err(Error::invalid(format!(
                "{}: internal error: an in-place edit would overwrite cluster {c}, which the \
                 image uses",
                self.path.display()
            )));
        }
        patch(&self.rw, &self.path, bytes, at)
    }

    fn is_fresh(&self, offset: u64, len: u64) -> bool {
        let cs = self.cluster_size();
        (offset / cs..(offset + len).div_ceil(cs)).all(|c| self.fresh.contains(&c))
    }

    fn sync(&self) -> Result<()> {
        self.rw
            .sync_all()
            .map_err(|e| Error::io(&self.path, "sync", e))
    }

    /// Makes the new state the image's: COPIED flags settled, refcounts written, header
    /// switched, each step synced before the next.
    pub fn commit(mut self) -> Result<()> {
        self.sync()?;
        step("written");
        let counts = self.settle_copied()?;
        let layout = RefcountLayout {
            cluster_bits: self.header.cluster_bits,
            order: self.header.refcount_order,
        };
        let (offset, clusters) = append_refcounts(&self.rw, &self.path, layout, counts)?;
        step("refcounts");
        self.header.refcount_table_offset = offset;
        self.header.refcount_table_clusters = clusters;
        // The whole header cluster in one write: fields and extensions change together.
        let encoded = self.header.encode()?;
        patch(&self.rw, &self.path, &encoded, 0)?;
        self.sync()?;
        step("header");
        Ok(())
    }

    /// Counts the references of the new state and makes every active COPIED flag say whether
    /// its cluster's refcount is 1. An L1 or L2 table the current image uses is never patched:
    /// it is copied to new clusters and the copy linked instead (which changes counts, hence
    /// the fixed point). Returns the final counts (without any refcount structure).
    fn settle_copied(&mut self) -> Result<Vec<u64>> {
        let geo = self.header.geometry();
        let cs = geo.cluster_size();
        let words = (geo.l2_entry_bytes() / 8) as usize;
        for _ in 0..MAX_SETTLE_ROUNDS {
            let file = self.reader()?;
            let counts = counts_for(&file, &self.header)?;
            let single = |offset: u64| counts.get((offset / cs) as usize) == Some(&1);
            let l1_offset = self.header.l1_table_offset;
            let l1 = read_table(
                &file,
                l1_offset,
                u64::from(self.header.l1_size),
                "qcow2 L1 table",
            )?;
            let mut new_l1 = l1.clone();
            for (i, &l1e) in l1.iter().enumerate() {
                let l2 = l1e & OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                let mut table = be_words(&file.read_vec_at(l2, cs, "qcow2 L2 table")?);
                let mut changed = false;
                for (j, e) in table.chunks_mut(words).enumerate() {
                    let at = l2 + (j * words * 8) as u64;
                    let bitmap = e.get(1).copied().unwrap_or(0);
                    let host = match geo.decode(&self.path, e[0], bitmap, at)? {
                        Cluster::Data { host, .. } | Cluster::Zero { host } if host != 0 => host,
                        _ => continue,
                    };
                    let want = if single(host) { COPIED } else { 0 };
                    if e[0] & COPIED != want {
                        e[0] = (e[0] & !COPIED) | want;
                        changed = true;
                    }
                }
                let mut target = l2;
                if changed {
                    let bytes: Vec<u8> = table.iter().flat_map(|w| w.to_be_bytes()).collect();
                    if self.is_fresh(l2, cs) {
                        self.write_fresh(l2, &bytes)?;
                    } else {
                        target = self.write_new(&bytes)?;
                    }
                }
                // A new copy has one reference: this L1 entry.
                let want = if target != l2 || single(l2) {
                    COPIED
                } else {
                    0
                };
                new_l1[i] = (l1e & !(OFFSET_MASK | COPIED)) | target | want;
            }
            if new_l1 == l1 {
                return Ok(counts);
            }
            let bytes: Vec<u8> = new_l1.iter().flat_map(|w| w.to_be_bytes()).collect();
            if self.is_fresh(l1_offset, bytes.len() as u64) {
                self.write_fresh(l1_offset, &bytes)?;
            } else {
                self.header.l1_table_offset = self.write_new(&bytes)?;
            }
            self.sync()?;
        }
        Err(Error::invalid(format!(
            "{}: internal error: COPIED flags did not settle",
            self.path.display()
        )))
    }
}

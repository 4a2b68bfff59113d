//! Whole guest clusters written into the active state of an existing qcow2 image, through an
//! [`Edit`]: each cluster goes to new space, the L2 tables that change are copied (held in
//! memory until commit) and a new L1 table is linked by the commit's header switch. Rebase and
//! commit write guest data this way.

use super::edit::Edit;
use super::l2::{Geometry, OFFSET_MASK, be_words, read_table};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

pub struct ClusterWriter {
    edit: Edit,
    geo: Geometry,
    l1: Vec<u64>,
    /// Changed L2 tables by L1 index.
    tables: BTreeMap<usize, Vec<u64>>,
}

impl ClusterWriter {
    /// Opens the image at `path` (refused with extended L2 entries, whose subclusters this
    /// writer does not keep).
    pub fn open(path: &Path) -> Result<ClusterWriter> {
        let edit = Edit::open(path)?;
        let h = edit.current();
        if h.extended_l2() {
            return Err(Error::unsupported(
                path,
                "writing guest data into an image with extended L2 entries",
            ));
        }
        let l1 = read_table(
            &edit.reader()?,
            h.l1_table_offset,
            u64::from(h.l1_size),
            "qcow2 L1 table",
        )?;
        Ok(ClusterWriter {
            geo: h.geometry(),
            edit,
            l1,
            tables: BTreeMap::new(),
        })
    }

    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// The pending edit (for header changes that go with the data).
    pub fn edit(&mut self) -> &mut Edit {
        &mut self.edit
    }

    /// Writes guest cluster `index` with `data` (at most one cluster; zero-padded).
    pub fn write_cluster(&mut self, index: u64, data: &[u8]) -> Result<()> {
        let per_table = self.geo.l2_entries();
        let t = (index / per_table) as usize;
        if t >= self.l1.len() || data.len() as u64 > self.cluster_size() {
            return Err(Error::invalid(format!(
                "{}: guest cluster {index} is outside the image",
                self.edit.path().display()
            )));
        }
        let host = self.edit.write_new(data)?;
        let table = match self.tables.entry(t) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let old = self.l1[t] & OFFSET_MASK;
                let words = if old == 0 {
                    vec![0; per_table as usize]
                } else {
                    let cs = self.geo.cluster_size();
                    be_words(&self.edit.reader()?.read_vec_at(old, cs, "qcow2 L2 table")?)
                };
                v.insert(words)
            }
        };
        table[(index % per_table) as usize] = host;
        Ok(())
    }

    /// Links the written clusters (new L2 tables, new L1 table) and commits the edit.
    pub fn commit(mut self) -> Result<()> {
        if !self.tables.is_empty() {
            for (t, table) in std::mem::take(&mut self.tables) {
                let bytes: Vec<u8> = table.iter().flat_map(|w| w.to_be_bytes()).collect();
                self.l1[t] = self.edit.write_new(&bytes)?;
            }
            let bytes: Vec<u8> = self.l1.iter().flat_map(|w| w.to_be_bytes()).collect();
            self.edit.header.l1_table_offset = self.edit.write_new(&bytes)?;
        }
        self.edit.commit()
    }
}

/// Drops every guest cluster of the active state of the qcow2 image at `path` (what `commit`
/// does to the top image): an empty L1 table is linked; clusters only it held are freed.
pub fn discard_all(path: &Path) -> Result<()> {
    let mut edit = Edit::open(path)?;
    let entries = u64::from(edit.current().l1_size);
    edit.header.l1_table_offset = edit.write_new(&vec![0u8; (entries * 8).max(8) as usize])?;
    edit.commit()
}

//! Internal snapshots written in place, as `qemu-img snapshot -c|-a|-d` does: create (a copy of
//! the active L1 table recorded in the snapshot table), apply (the snapshot's L1 table copied to
//! the active state) and delete (the entry dropped). The shared clusters' refcounts and COPIED
//! flags follow from [`Edit::commit`], which also makes each change atomic.

use super::edit::Edit;
use super::l2::{COPIED, read_table};
use super::snapshot::{self, Snapshot};
use crate::error::{Error, Result};
use crate::image::SnapshotInfo;

/// qemu's limits on the table and on a name.
const MAX_SNAPSHOTS: usize = 65536;
const MAX_NAME_LEN: usize = 65535;
/// The extra data qemu writes: large vm-state size, virtual size, icount.
const EXTRA_LEN: u32 = 24;

/// The current table: its snapshots and each one's encoded entry (kept verbatim when the table
/// is rewritten).
pub(super) fn entries(edit: &Edit) -> Result<(Vec<Snapshot>, Vec<Vec<u8>>)> {
    let h = edit.current();
    let file = edit.reader()?;
    let (list, len) = snapshot::read_table(&file, h)?;
    // The last entry's padding may lie past the end of the file (qemu does not write it).
    let stored = len.min(file.len().saturating_sub(h.snapshots_offset));
    let mut raw = file.read_vec_at(h.snapshots_offset, stored, "qcow2 snapshot table")?;
    raw.resize(len as usize, 0);
    let starts = list.iter().map(|s| s.entry_offset - h.snapshots_offset);
    let ends = starts.clone().skip(1).chain([len]);
    let bytes = starts
        .zip(ends)
        .map(|(a, b)| raw[a as usize..b as usize].to_vec())
        .collect();
    Ok((list, bytes))
}

/// Writes `table` (encoded entries) as the new snapshot table of `edit`.
pub(super) fn set_table(edit: &mut Edit, table: &[Vec<u8>]) -> Result<()> {
    edit.header.nb_snapshots = table.len() as u32;
    edit.header.snapshots_offset = if table.is_empty() {
        0
    } else {
        edit.write_new(&table.concat())?
    };
    Ok(())
}

/// The index of snapshot `key` (ID first, then name, as qemu-img).
fn position(edit: &Edit, list: &[Snapshot], key: &str) -> Result<usize> {
    snapshot::find(list, key)
        .and_then(|s| list.iter().position(|x| x.entry_offset == s.entry_offset))
        .ok_or_else(|| {
            Error::invalid(format!(
                "{}: no snapshot with ID or name '{key}'",
                edit.path().display()
            ))
        })
}

/// One snapshot table entry as qemu writes it (vm-state size 0, icount off).
fn encode_entry(l1_offset: u64, l1_size: u32, info: &SnapshotInfo) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&l1_offset.to_be_bytes());
    b.extend_from_slice(&l1_size.to_be_bytes());
    b.extend_from_slice(&(info.id.len() as u16).to_be_bytes());
    b.extend_from_slice(&(info.name.len() as u16).to_be_bytes());
    b.extend_from_slice(&(info.date_sec as u32).to_be_bytes());
    b.extend_from_slice(&info.date_nsec.to_be_bytes());
    let vm_clock = info.vm_clock_sec * 1_000_000_000 + u64::from(info.vm_clock_nsec);
    b.extend_from_slice(&vm_clock.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes()); // vm-state size (32-bit field)
    b.extend_from_slice(&EXTRA_LEN.to_be_bytes());
    b.extend_from_slice(&0u64.to_be_bytes()); // vm-state size (64-bit field)
    b.extend_from_slice(&info.virtual_size.unwrap_or(0).to_be_bytes());
    b.extend_from_slice(&u64::MAX.to_be_bytes()); // icount off
    b.extend_from_slice(info.id.as_bytes());
    b.extend_from_slice(info.name.as_bytes());
    b.resize(b.len().next_multiple_of(8), 0);
    b
}

/// The active L1 table with COPIED flags dropped (they mean nothing outside the active table;
/// commit sets the active ones).
fn l1_copy(edit: &Edit, offset: u64, entries: u32, wanted: u64) -> Result<Vec<u8>> {
    let file = edit.reader()?;
    let mut l1 = read_table(&file, offset, u64::from(entries), "qcow2 L1 table")?;
    l1.resize(wanted.max(u64::from(entries)) as usize, 0);
    Ok(l1
        .iter()
        .flat_map(|e| (e & !COPIED).to_be_bytes())
        .collect())
}

/// Creates internal snapshot `name` of the image at `path`, taken at `date` (seconds and
/// nanoseconds since the epoch). Returns what the table records for it.
pub fn create(path: &std::path::Path, name: &str, date: (u64, u32)) -> Result<SnapshotInfo> {
    let mut edit = Edit::open(path)?;
    let (list, mut table) = entries(&edit)?;
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "a snapshot name has 1 to {MAX_NAME_LEN} bytes"
        )));
    }
    if list.iter().any(|s| s.info.name == name) {
        return Err(Error::invalid(format!(
            "{}: a snapshot named '{name}' exists already",
            path.display()
        )));
    }
    if list.len() >= MAX_SNAPSHOTS {
        return Err(Error::invalid(format!(
            "{}: {MAX_SNAPSHOTS} snapshots is qemu's limit",
            path.display()
        )));
    }
    // qemu numbers snapshots one past the highest numeric ID.
    let id = list
        .iter()
        .filter_map(|s| s.info.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let h = edit.current().clone();
    let l1 = l1_copy(&edit, h.l1_table_offset, h.l1_size, 0)?;
    let l1_offset = edit.write_new(&l1)?;
    let info = SnapshotInfo {
        id: id.to_string(),
        name: name.to_string(),
        date_sec: date.0,
        date_nsec: date.1,
        vm_clock_sec: 0,
        vm_clock_nsec: 0,
        vm_state_size: 0,
        virtual_size: Some(h.size),
        icount: None,
    };
    table.push(encode_entry(l1_offset, h.l1_size, &info));
    set_table(&mut edit, &table)?;
    edit.commit()?;
    Ok(info)
}

/// Makes snapshot `key` (ID or name) the active state of the image at `path`; what was active
/// and is in no snapshot is freed.
pub fn apply(path: &std::path::Path, key: &str) -> Result<()> {
    let mut edit = Edit::open(path)?;
    let (list, _) = entries(&edit)?;
    let s = &list[position(&edit, &list, key)?];
    let h = edit.current().clone();
    let size = s.info.virtual_size.unwrap_or(h.size);
    let wanted = h.geometry().l1_entries_for(size);
    let l1 = l1_copy(&edit, s.l1_table_offset, s.l1_size, wanted)?;
    edit.header.l1_table_offset = edit.write_new(&l1)?;
    edit.header.l1_size = (l1.len() / 8) as u32;
    edit.header.size = size;
    edit.commit()
}

/// Deletes snapshot `key` (ID or name) of the image at `path`; clusters only it used are freed.
pub fn delete(path: &std::path::Path, key: &str) -> Result<()> {
    let mut edit = Edit::open(path)?;
    let (list, mut table) = entries(&edit)?;
    table.remove(position(&edit, &list, key)?);
    set_table(&mut edit, &table)?;
    edit.commit()
}

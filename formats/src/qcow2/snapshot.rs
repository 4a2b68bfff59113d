//! The internal snapshot table: one variable-length entry per snapshot.

use super::header::{Header, be32, be64};
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::SnapshotInfo;

/// qemu's limits: at most 65536 snapshots, extra data of at most 1 KiB each, 64 MiB of table.
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_EXTRA_DATA: u32 = 1024;
const MAX_TABLE_BYTES: u64 = 64 << 20;
const FIXED_LEN: u64 = 40;

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    /// Offset of this entry in the file (for errors).
    pub entry_offset: u64,
    pub info: SnapshotInfo,
}

/// Reads the snapshot table the header points to. Returns the snapshots and the table's length
/// in bytes (check needs it).
pub fn read_table(file: &HostFile, h: &Header) -> Result<(Vec<Snapshot>, u64)> {
    let path = file.path();
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(Error::corrupt(
            path,
            "qcow2 snapshot table",
            h.snapshots_offset,
            format!("{} snapshots, more than {MAX_SNAPSHOTS}", h.nb_snapshots),
        ));
    }
    let mut list = Vec::new();
    let mut pos = h.snapshots_offset;
    for _ in 0..h.nb_snapshots {
        let entry_offset = pos;
        let bad =
            |why: String| Error::corrupt(path, "qcow2 snapshot table entry", entry_offset, why);
        if pos - h.snapshots_offset > MAX_TABLE_BYTES {
            return Err(bad("snapshot table larger than 64 MiB".into()));
        }
        let fixed = file.read_vec_at(pos, FIXED_LEN, "qcow2 snapshot table entry")?;
        let l1_table_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(bad(format!("{extra_len} bytes of extra data")));
        }
        if !l1_table_offset.is_multiple_of(h.cluster_size()) {
            return Err(bad(format!(
                "L1 table offset {l1_table_offset:#x} is not cluster aligned"
            )));
        }
        let var_len = u64::from(extra_len) + id_len + name_len;
        let var = file.read_vec_at(pos + FIXED_LEN, var_len, "qcow2 snapshot table entry")?;
        let (extra, strings) = var.split_at(extra_len as usize);
        let (id, name) = strings.split_at(id_len as usize);
        let extra_u64 = |at: usize| (extra.len() >= at + 8).then(|| be64(extra, at));
        let vm_state_size = extra_u64(0).unwrap_or(u64::from(be32(&fixed, 32)));
        let vm_clock = be64(&fixed, 24);
        list.push(Snapshot {
            l1_table_offset,
            l1_size,
            entry_offset,
            info: SnapshotInfo {
                id: String::from_utf8_lossy(id).into_owned(),
                name: String::from_utf8_lossy(name).into_owned(),
                date_sec: u64::from(be32(&fixed, 16)),
                date_nsec: be32(&fixed, 20),
                vm_clock_sec: vm_clock / 1_000_000_000,
                vm_clock_nsec: (vm_clock % 1_000_000_000) as u32,
                vm_state_size,
                virtual_size: extra_u64(8),
                // -1 means icount was off; qemu then omits the field.
                icount: extra_u64(16).filter(|&c| c != u64::MAX),
            },
        });
        pos = (pos + FIXED_LEN + var_len).next_multiple_of(8);
    }
    Ok((list, pos - h.snapshots_offset))
}

/// Finds a snapshot by ID first, then by name, as qemu-img does for `-l`.
pub fn find<'a>(list: &'a [Snapshot], key: &str) -> Option<&'a Snapshot> {
    list.iter()
        .find(|s| s.info.id == key)
        .or_else(|| list.iter().find(|s| s.info.name == key))
}

//! Persistent dirty bitmaps changed in place, as `qemu-img bitmap` does: add (an empty bitmap),
//! remove, clear, enable and disable (the `auto` flag: whether qemu records writes in it). The
//! directory and any new bitmap table are written to free space and switched with the header
//! by [`Edit::commit`].

use super::bitmap::{
    self, Bitmap, BitmapsExtension, ENTRY_FIXED, FLAG_AUTO, FLAG_IN_USE, MAX_BITMAPS,
    MAX_DIRECTORY_SIZE, MAX_GRANULARITY_BITS, MAX_NAME, MIN_GRANULARITY_BITS, TYPE_DIRTY_TRACKING,
};
use super::edit::Edit;
use super::header::{AUTOCLEAR_BITMAPS, Header};
use crate::error::{Error, Result};
use std::path::Path;

/// A change to an existing bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapChange {
    Remove,
    Clear,
    Enable,
    Disable,
}

/// Entries of a bitmap table for a guest of `size` bytes: one per cluster of bits.
fn table_entries(h: &Header, granularity: u64) -> u64 {
    h.size.div_ceil(granularity).div_ceil(h.cluster_size() * 8)
}

fn invalid<T>(path: &Path, why: String) -> Result<T> {
    Err(Error::invalid(format!("{}: {why}", path.display())))
}

/// An open edit with the image's bitmaps and their encoded directory entries.
struct Directory {
    edit: Edit,
    list: Vec<Bitmap>,
    entries: Vec<Vec<u8>>,
}

impl Directory {
    fn open(path: &Path) -> Result<Directory> {
        let edit = Edit::open(path)?;
        let h = edit.current();
        if h.version < 3 {
            return invalid(
                path,
                "persistent bitmaps need compat=1.1 (diskkit amend -o compat=1.1)".into(),
            );
        }
        if h.bitmaps.is_some() && h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return invalid(
                path,
                "the image's bitmaps are marked inconsistent (a program that does not keep \
                 them wrote the image): qemu drops them when it next opens the image read-write"
                    .into(),
            );
        }
        let file = edit.reader()?;
        let list = bitmap::list(&file, h)?;
        let dir = match h.bitmaps {
            Some(ext) => file.read_vec_at(
                ext.directory_offset,
                ext.directory_size,
                "qcow2 bitmap directory",
            )?,
            None => Vec::new(),
        };
        let mut entries = Vec::with_capacity(list.len());
        let mut pos = 0;
        for b in &list {
            entries.push(dir[pos..pos + b.entry_len].to_vec());
            pos += b.entry_len;
        }
        Ok(Directory {
            edit,
            list,
            entries,
        })
    }

    /// A zeroed bitmap table for `granularity`, in new clusters: its offset.
    fn new_table(&mut self, granularity: u64) -> Result<u64> {
        let entries = table_entries(self.edit.current(), granularity);
        self.edit.write_new(&vec![0u8; (entries * 8) as usize])
    }

    /// Writes the directory and switches the image to it.
    fn commit(mut self) -> Result<()> {
        let directory = self.entries.concat();
        if directory.len() as u64 > MAX_DIRECTORY_SIZE {
            return invalid(
                self.edit.path(),
                "the bitmap directory would exceed qemu's 64 MiB".into(),
            );
        }
        if self.entries.is_empty() {
            self.edit.header.bitmaps = None;
            self.edit.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
        } else {
            self.edit.header.bitmaps = Some(BitmapsExtension {
                nb_bitmaps: self.entries.len() as u32,
                directory_size: directory.len() as u64,
                directory_offset: self.edit.write_new(&directory)?,
            });
            self.edit.header.autoclear_features |= AUTOCLEAR_BITMAPS;
        }
        self.edit.commit()
    }
}

/// Adds an empty bitmap `name` to the qcow2 image at `path`: `granularity` bytes per bit
/// (`None`: qemu's default, the cluster size within 4 KiB..64 KiB), recording writes in qemu
/// unless `disabled`.
pub fn add(path: &Path, name: &str, granularity: Option<u64>, disabled: bool) -> Result<()> {
    let mut d = Directory::open(path)?;
    if d.list.iter().any(|b| b.name == name) {
        return invalid(path, format!("a bitmap named '{name}' exists already"));
    }
    if name.is_empty() || name.len() > MAX_NAME {
        return invalid(path, format!("a bitmap name has 1 to {MAX_NAME} bytes"));
    }
    if d.entries.len() >= MAX_BITMAPS as usize {
        return invalid(path, format!("{MAX_BITMAPS} bitmaps is qemu's limit"));
    }
    let h = d.edit.current();
    let granularity = granularity.unwrap_or(h.cluster_size().clamp(4096, 65536));
    let bits = granularity.trailing_zeros();
    if !granularity.is_power_of_two()
        || !(u32::from(MIN_GRANULARITY_BITS)..=u32::from(MAX_GRANULARITY_BITS)).contains(&bits)
    {
        return invalid(
            path,
            format!("granularity {granularity}: a power of two from 512 bytes to 2 GiB"),
        );
    }
    let size = table_entries(h, granularity) as u32;
    let table = d.new_table(granularity)?;
    let mut e = Vec::with_capacity(ENTRY_FIXED + name.len() + 7);
    e.extend_from_slice(&table.to_be_bytes());
    e.extend_from_slice(&size.to_be_bytes());
    e.extend_from_slice(&(if disabled { 0 } else { FLAG_AUTO }).to_be_bytes());
    e.push(TYPE_DIRTY_TRACKING);
    e.push(bits as u8);
    e.extend_from_slice(&(name.len() as u16).to_be_bytes());
    e.extend_from_slice(&0u32.to_be_bytes()); // no extra data
    e.extend_from_slice(name.as_bytes());
    e.resize(e.len().next_multiple_of(8), 0);
    d.entries.push(e);
    d.commit()
}

/// Applies `change` to bitmap `name` of the qcow2 image at `path`. A bitmap in use (by a qemu
/// that has the image open, or crashed) can only be removed.
pub fn change(path: &Path, name: &str, change: BitmapChange) -> Result<()> {
    let mut d = Directory::open(path)?;
    let Some(i) = d.list.iter().position(|b| b.name == name) else {
        let names: Vec<&str> = d.list.iter().map(|b| b.name.as_str()).collect();
        return invalid(
            path,
            format!(
                "no persistent bitmap '{name}' (the image has: {})",
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            ),
        );
    };
    let flags = u32::from_be_bytes([
        d.entries[i][12],
        d.entries[i][13],
        d.entries[i][14],
        d.entries[i][15],
    ]);
    if flags & FLAG_IN_USE != 0 && change != BitmapChange::Remove {
        return invalid(
            path,
            format!(
                "bitmap '{name}' is in use (open in qemu, or qemu stopped without closing \
                 it): only --remove applies to it"
            ),
        );
    }
    let new_flags = match change {
        BitmapChange::Remove => {
            d.entries.remove(i);
            return d.commit();
        }
        BitmapChange::Clear => {
            let table = d.new_table(d.list[i].granularity)?;
            d.entries[i][..8].copy_from_slice(&table.to_be_bytes());
            flags
        }
        BitmapChange::Enable => flags | FLAG_AUTO,
        BitmapChange::Disable => flags & !FLAG_AUTO,
    };
    d.entries[i][12..16].copy_from_slice(&new_flags.to_be_bytes());
    d.commit()
}

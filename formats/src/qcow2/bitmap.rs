//! Persistent dirty bitmaps (qcow2's bitmaps extension, qcow2.txt "Bitmaps"), read-only: which
//! guest ranges were written since a bitmap was started, for incremental snapshots.
//!
//! The extension points to a bitmap directory; each entry names a bitmap, its granularity (bytes
//! per bit) and its bitmap table, whose entries point to clusters of bits (bit `i` of a cluster,
//! least significant bit first in each byte, covers the `i`-th granule of that cluster's share of
//! the guest), or say "all zeros" / "all ones" without a cluster. Every count and offset is
//! checked against qemu's limits and the file before anything is allocated.

use super::header::{AUTOCLEAR_BITMAPS, Header, be32, be64};
use crate::error::{Error, Result};
use crate::host::HostFile;
use serde::Serialize;
use std::path::Path;

/// qemu's limits (block/qcow2-bitmap.c).
pub(super) const MAX_BITMAPS: u32 = 65535;
pub(super) const MAX_DIRECTORY_SIZE: u64 = 64 << 20;
pub(super) const MAX_NAME: usize = 1023;
pub(super) const MIN_GRANULARITY_BITS: u8 = 9;
pub(super) const MAX_GRANULARITY_BITS: u8 = 31;
pub(super) const ENTRY_FIXED: usize = 24;
pub(super) const FLAG_IN_USE: u32 = 1 << 0;
pub(super) const FLAG_AUTO: u32 = 1 << 1;
const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
pub(super) const TYPE_DIRTY_TRACKING: u8 = 1;
/// Bits 9-55 of a bitmap table entry: the cluster offset; bit 0: all ones when no cluster.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_ALL_ONES: u64 = 1;

/// The header extension: where the bitmap directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

impl BitmapsExtension {
    /// Parses the extension's data (at header offset `pos`, for errors).
    pub fn parse(path: &Path, pos: u64, data: &[u8]) -> Result<BitmapsExtension> {
        if data.len() < 24 {
            return Err(Error::corrupt(
                path,
                "qcow2 bitmaps extension",
                pos,
                format!("{} bytes, the extension has 24", data.len()),
            ));
        }
        Ok(BitmapsExtension {
            nb_bitmaps: be32(data, 0),
            directory_size: be64(data, 8),
            directory_offset: be64(data, 16),
        })
    }

    /// The extension's data as the header stores it.
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&self.nb_bitmaps.to_be_bytes());
        b[8..16].copy_from_slice(&self.directory_size.to_be_bytes());
        b[16..24].copy_from_slice(&self.directory_offset.to_be_bytes());
        b
    }
}

/// One persistent bitmap, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bitmap {
    pub name: String,
    /// Guest bytes per bit.
    pub granularity: u64,
    /// Set while a qemu process has the bitmap open (or crashed with it open): its bits are
    /// not to be trusted.
    #[serde(skip)]
    pub in_use: bool,
    #[serde(skip)]
    pub auto: bool,
    /// qemu's flag names: `in-use`, `auto`.
    pub flags: Vec<&'static str>,
    #[serde(skip)]
    table_offset: u64,
    #[serde(skip)]
    table_size: u32,
    /// Length of the directory entry (with padding): entries follow each other.
    #[serde(skip)]
    pub(super) entry_len: usize,
}

/// The bitmaps of an image (none without the extension).
pub fn list(file: &HostFile, header: &Header) -> Result<Vec<Bitmap>> {
    let Some(ext) = header.bitmaps else {
        return Ok(Vec::new());
    };
    let corrupt = |offset: u64, reason: String| {
        Error::corrupt(file.path(), "qcow2 bitmap directory", offset, reason)
    };
    if ext.nb_bitmaps > MAX_BITMAPS || ext.directory_size > MAX_DIRECTORY_SIZE {
        return Err(corrupt(
            ext.directory_offset,
            format!(
                "{} bitmaps in {} bytes is over qemu's limits",
                ext.nb_bitmaps, ext.directory_size
            ),
        ));
    }
    let dir = file.read_vec_at(
        ext.directory_offset,
        ext.directory_size,
        "qcow2 bitmap directory",
    )?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..ext.nb_bitmaps {
        let at = ext.directory_offset + pos as u64;
        if pos + ENTRY_FIXED > dir.len() {
            return Err(corrupt(at, "the directory ends inside an entry".into()));
        }
        let e = &dir[pos..];
        let flags = be32(e, 12);
        let kind = e[16];
        let granularity_bits = e[17];
        let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
        let extra = be32(e, 20) as usize;
        let entry_len = (ENTRY_FIXED + extra + name_size).next_multiple_of(8);
        if name_size > MAX_NAME || pos + entry_len > dir.len() {
            return Err(corrupt(at, "entry runs past the directory".into()));
        }
        if kind != TYPE_DIRTY_TRACKING {
            return Err(corrupt(
                at + 16,
                format!("bitmap type {kind} (only dirty tracking, 1, exists)"),
            ));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return Err(corrupt(
                at + 17,
                format!("granularity 2^{granularity_bits} is out of range"),
            ));
        }
        if extra > 0 && flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            return Err(Error::unsupported(
                file.path(),
                "a bitmap with extra data that is not marked compatible",
            ));
        }
        let name_at = ENTRY_FIXED + extra;
        let name = String::from_utf8(e[name_at..name_at + name_size].to_vec())
            .map_err(|_| corrupt(at, "bitmap name is not UTF-8".into()))?;
        let (in_use, auto) = (flags & FLAG_IN_USE != 0, flags & FLAG_AUTO != 0);
        out.push(Bitmap {
            name,
            granularity: 1 << granularity_bits,
            in_use,
            auto,
            flags: [(in_use, "in-use"), (auto, "auto")]
                .into_iter()
                .filter_map(|(set, name)| set.then_some(name))
                .collect(),
            table_offset: be64(e, 0),
            table_size: be32(e, 8),
            entry_len,
        });
        pos += entry_len;
    }
    Ok(out)
}

/// Every range the bitmaps occupy (directory, bitmap tables, clusters of bits) as (structure,
/// offset, length), for counting references. Nothing when the image's bitmaps are marked
/// inconsistent: qemu then ignores the extension and its clusters are leaks.
pub(super) fn structures(
    file: &HostFile,
    header: &Header,
) -> Result<Vec<(&'static str, u64, u64)>> {
    let Some(ext) = header
        .bitmaps
        .filter(|_| header.autoclear_features & AUTOCLEAR_BITMAPS != 0)
    else {
        return Ok(Vec::new());
    };
    let mut out = vec![("bitmap directory", ext.directory_offset, ext.directory_size)];
    for b in list(file, header)? {
        let table = file.read_vec_at(
            b.table_offset,
            u64::from(b.table_size) * 8,
            "qcow2 bitmap table",
        )?;
        out.push(("bitmap table", b.table_offset, table.len() as u64));
        for entry in table.chunks_exact(8) {
            let offset = be64(entry, 0) & TABLE_OFFSET_MASK;
            if offset != 0 {
                out.push(("bitmap data", offset, header.cluster_size()));
            }
        }
    }
    Ok(out)
}

/// The bits of one bitmap, per bitmap-table entry.
#[derive(Debug)]
enum Part {
    Zeros,
    Ones,
    Bits(Vec<u8>),
}

/// A loaded dirty bitmap: which guest granules were written since it was started.
#[derive(Debug)]
pub struct DirtyBitmap {
    granularity: u64,
    /// Granules per table entry (the bits of one cluster).
    per_part: u64,
    parts: Vec<Part>,
}

impl DirtyBitmap {
    /// Whether any byte of guest range `[start, end)` is marked written.
    pub fn any_dirty(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        let (first, last) = (start / self.granularity, (end - 1) / self.granularity);
        (first..=last).any(|g| match self.parts.get((g / self.per_part) as usize) {
            None | Some(Part::Zeros) => false,
            Some(Part::Ones) => true,
            Some(Part::Bits(b)) => {
                let i = g % self.per_part;
                b[(i / 8) as usize] & (1 << (i % 8)) != 0
            }
        })
    }
}

/// Loads bitmap `name` of the qcow2 image at `path` for incremental use: a bitmap that is in
/// use, or an image whose bitmaps are marked inconsistent, is refused with the reason.
pub fn load(path: &Path, name: &str) -> Result<DirtyBitmap> {
    let file = HostFile::open(path)?;
    let header = Header::read(&file)?;
    let bitmaps = list(&file, &header)?;
    let Some(b) = bitmaps.iter().find(|b| b.name == name) else {
        let names: Vec<&str> = bitmaps.iter().map(|b| b.name.as_str()).collect();
        return Err(Error::invalid(format!(
            "{}: no persistent bitmap '{name}' (the image has: {})",
            path.display(),
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        )));
    };
    if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Err(Error::invalid(format!(
            "{}: the image's bitmaps are marked inconsistent (written by a program that does \
             not keep them): bitmap '{name}' cannot be trusted",
            path.display()
        )));
    }
    if b.in_use {
        return Err(Error::invalid(format!(
            "{}: bitmap '{name}' is in use (the image is open in qemu, or qemu stopped without \
             closing it): its bits cannot be trusted",
            path.display()
        )));
    }
    let cluster = header.cluster_size();
    let per_part = cluster * 8;
    let granules = header.size.div_ceil(b.granularity);
    let expected = granules.div_ceil(per_part);
    if u64::from(b.table_size) != expected {
        return Err(Error::corrupt(
            path,
            "qcow2 bitmap table",
            b.table_offset,
            format!("{} entries for a guest that needs {expected}", b.table_size),
        ));
    }
    let table = file.read_vec_at(
        b.table_offset,
        u64::from(b.table_size) * 8,
        "qcow2 bitmap table",
    )?;
    let mut parts = Vec::with_capacity(b.table_size as usize);
    for (i, entry) in table.chunks_exact(8).enumerate() {
        let entry = be64(entry, 0);
        let offset = entry & TABLE_OFFSET_MASK;
        let at = b.table_offset + 8 * i as u64;
        if entry & !(TABLE_OFFSET_MASK | TABLE_ALL_ONES) != 0
            || (offset != 0 && entry & TABLE_ALL_ONES != 0)
        {
            return Err(Error::corrupt(
                path,
                "qcow2 bitmap table entry",
                at,
                format!("reserved bits set in {entry:#x}"),
            ));
        }
        parts.push(match (offset, entry & TABLE_ALL_ONES) {
            (0, 0) => Part::Zeros,
            (0, _) => Part::Ones,
            (o, _) => {
                if o % cluster != 0 {
                    return Err(Error::corrupt(
                        path,
                        "qcow2 bitmap table entry",
                        at,
                        format!("data offset {o:#x} is not cluster aligned"),
                    ));
                }
                Part::Bits(file.read_vec_at(o, cluster, "qcow2 bitmap data")?)
            }
        });
    }
    Ok(DirtyBitmap {
        granularity: b.granularity,
        per_part,
        parts,
    })
}

//! The metadata region: block size, virtual size, sector sizes and, for differencing images,
//! the parent locator (and finding the parent it names).

use super::header::Region;
use super::log::LoggedFile;
use super::*;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

pub(super) const METADATA_TABLE_LEN: u64 = 64 * KIB;

/// The largest virtual disk the specification allows.
pub(super) const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

pub(super) const MAX_PARENT_LOCATOR_ENTRIES: usize = 256;

pub(super) const FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA16737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);

pub(super) const VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2FA54224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);

pub(super) const PAGE_83_DATA: [u8; 16] = guid(
    0xBECA12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);

pub(super) const LOGICAL_SECTOR_SIZE: [u8; 16] = guid(
    0x8141BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);

pub(super) const PHYSICAL_SECTOR_SIZE: [u8; 16] = guid(
    0xCDA348C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);

pub(super) const PARENT_LOCATOR: [u8; 16] = guid(
    0xA8D35F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);

pub(super) const VHDX_PARENT_LOCATOR_TYPE: [u8; 16] = guid(
    0xB04AEFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

pub(super) struct Metadata {
    pub(super) block_size: u64,
    pub(super) leave_blocks_allocated: bool,
    pub(super) has_parent: bool,
    pub(super) virtual_size: u64,
    pub(super) logical_sector_size: u64,
    pub(super) physical_sector_size: u64,
    /// Key/value pairs of the parent locator of differencing images.
    pub(super) parent_locator: Vec<(String, String)>,
}

pub(super) fn metadata(file: &LoggedFile, region: &Region) -> Result<Metadata> {
    let path = file.host().path();
    let base = region.offset;
    let table_len = METADATA_TABLE_LEN.min(region.length);
    let t = file.read_vec_at(base, table_len, "vhdx metadata table")?;
    let corrupt = |at: u64, r: String| Error::corrupt(path, "vhdx metadata", at, r);
    if t.get(..8) != Some(b"metadata".as_slice()) {
        return Err(corrupt(base, "signature is not \"metadata\"".into()));
    }
    let count = LE::read_u16(&t[10..]) as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(corrupt(
            base,
            format!("{count} entries (limit {MAX_TABLE_ENTRIES})"),
        ));
    }
    // Item id -> (offset in file, length).
    let mut items: Vec<([u8; 16], u64, u64)> = Vec::new();
    for (i, e) in t[32..].chunks_exact(32).take(count).enumerate() {
        let at = base + 32 + 32 * i as u64;
        let mut id = [0u8; 16];
        id.copy_from_slice(&e[..16]);
        let offset = u64::from(LE::read_u32(&e[16..]));
        let length = u64::from(LE::read_u32(&e[20..]));
        let required = LE::read_u32(&e[24..]) & 4 != 0;
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            PAGE_83_DATA,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ];
        if !known.contains(&id) {
            if required {
                return Err(Error::unsupported(
                    path,
                    format!("required vhdx metadata item {}", guid_string(&id)),
                ));
            }
            continue;
        }
        if length > 0 && (offset < METADATA_TABLE_LEN || offset + length > region.length) {
            return Err(corrupt(
                at,
                format!(
                    "item {} at {offset:#x}+{length:#x} lies outside the metadata region",
                    guid_string(&id)
                ),
            ));
        }
        if items.iter().any(|(i, _, _)| *i == id) {
            return Err(corrupt(
                at,
                format!("item {} listed twice", guid_string(&id)),
            ));
        }
        items.push((id, base + offset, length));
    }
    let item = |id: [u8; 16], name: &str, min_len: u64| -> Result<Vec<u8>> {
        let Some(&(_, at, len)) = items.iter().find(|(i, _, _)| *i == id) else {
            return Err(corrupt(base, format!("no {name} item")));
        };
        if len < min_len {
            return Err(corrupt(
                at,
                format!("{name} item of {len} bytes is too short"),
            ));
        }
        file.read_vec_at(at, len, "vhdx metadata item")
    };
    let fp = item(FILE_PARAMETERS, "file parameters", 8)?;
    let block_size = u64::from(LE::read_u32(&fp));
    let flags = LE::read_u32(&fp[4..]);
    let virtual_size = LE::read_u64(&item(VIRTUAL_DISK_SIZE, "virtual disk size", 8)?);
    let logical_sector_size = u64::from(LE::read_u32(&item(
        LOGICAL_SECTOR_SIZE,
        "logical sector size",
        4,
    )?));
    let physical_sector_size = u64::from(LE::read_u32(&item(
        PHYSICAL_SECTOR_SIZE,
        "physical sector size",
        4,
    )?));
    if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
        return Err(corrupt(
            base,
            format!("block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
        ));
    }
    for (name, v) in [
        ("logical", logical_sector_size),
        ("physical", physical_sector_size),
    ] {
        if v != 512 && v != 4096 {
            return Err(corrupt(
                base,
                format!("{name} sector size {v} is neither 512 nor 4096"),
            ));
        }
    }
    if virtual_size > MAX_VIRTUAL_SIZE || virtual_size % logical_sector_size != 0 {
        return Err(corrupt(
            base,
            format!(
                "virtual size {virtual_size} is above 64 TiB or not a multiple of the sector size"
            ),
        ));
    }
    let has_parent = flags & 2 != 0;
    let parent_locator = if has_parent {
        parse_parent_locator(&item(PARENT_LOCATOR, "parent locator", 20)?)
            .map_err(|r| corrupt(base, format!("parent locator: {r}")))?
    } else {
        Vec::new()
    };
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: flags & 1 != 0,
        has_parent,
        virtual_size,
        logical_sector_size,
        physical_sector_size,
        parent_locator,
    })
}

/// The key/value pairs of a VHDX parent locator (UTF-16LE strings).
pub(super) fn parse_parent_locator(b: &[u8]) -> std::result::Result<Vec<(String, String)>, String> {
    if b.get(..16) != Some(VHDX_PARENT_LOCATOR_TYPE.as_slice()) {
        return Err("unknown locator type".into());
    }
    let count = LE::read_u16(&b[18..]) as usize;
    if count > MAX_PARENT_LOCATOR_ENTRIES {
        return Err(format!("{count} entries"));
    }
    let string = |off: u32, len: u16| -> std::result::Result<String, String> {
        let off = off as usize;
        let s = b
            .get(off..off + len as usize)
            .filter(|s| s.len() % 2 == 0)
            .ok_or_else(|| format!("string at {off:#x}+{len} outside the item"))?;
        let units: Vec<u16> = s.chunks_exact(2).map(LE::read_u16).collect();
        String::from_utf16(&units).map_err(|e| e.to_string())
    };
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let e = b
            .get(20 + 12 * i..32 + 12 * i)
            .ok_or("entry table outside the item")?;
        let key = string(LE::read_u32(e), LE::read_u16(&e[8..]))?;
        let value = string(LE::read_u32(&e[4..]), LE::read_u16(&e[10..]))?;
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// The parent file: relative_path resolved against the child's directory first, then the
/// absolute paths (usable when they happen to exist here). Returns (name as recorded, path).
pub(super) fn find_parent(child: &Path, locator: &[(String, String)]) -> Result<(String, PathBuf)> {
    let get = |k: &str| locator.iter().find(|(key, _)| key == k).map(|(_, v)| v);
    let dir = child.parent().unwrap_or(Path::new(""));
    let mut tried = Vec::new();
    for key in ["relative_path", "absolute_win32_path", "volume_path"] {
        let Some(value) = get(key) else { continue };
        let unix = value.replace('\\', "/");
        let candidate = if key == "relative_path" {
            dir.join(unix.trim_start_matches("./"))
        } else {
            PathBuf::from(&unix)
        };
        if candidate.exists() {
            return Ok((value.clone(), candidate));
        }
        tried.push(candidate.display().to_string());
    }
    Err(Error::invalid(format!(
        "{}: parent of differencing vhdx not found (tried: {})",
        child.display(),
        if tried.is_empty() {
            "no path in the parent locator".to_string()
        } else {
            tried.join(", ")
        }
    )))
}

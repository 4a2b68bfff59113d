//! El Torito boot catalog: the validation entry, the initial/default entry, and section headers
//! with their section entries (one section per platform, e.g. BIOS and UEFI).

use super::bytes::{le_u16, le_u32, u8_at};
use super::volume::SECTOR;
use crate::error::{Error, Result};
use crate::host::HostFile;
use serde::Serialize;

const ENTRY: usize = 32;
/// Catalog sectors read at most: 1024 entries, far more than any real catalog holds.
const MAX_CATALOG_SECTORS: u64 = 16;

const HEADER_MORE: u8 = 0x90;
const HEADER_FINAL: u8 = 0x91;
const EXTENSION: u8 = 0x44;
const BOOTABLE: u8 = 0x88;
/// Media type bit: an extension entry follows this section entry.
const MEDIA_EXTENSION_FOLLOWS: u8 = 0x20;

/// One bootable image the catalog describes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BootEntry {
    pub platform: String,
    pub emulation: String,
    pub bootable: bool,
    /// Real-mode segment the image loads at; 0 means the BIOS default 0x7C0.
    #[serde(rename = "load-segment")]
    pub load_segment: u16,
    /// Emulated 512-byte sectors loaded.
    #[serde(rename = "sector-count")]
    pub sector_count: u16,
    /// 2048-byte sector where the boot image starts.
    #[serde(rename = "load-rba")]
    pub load_rba: u32,
}

fn platform_name(id: u8) -> String {
    match id {
        0 => "bios".into(),
        1 => "powerpc".into(),
        2 => "mac".into(),
        0xef => "uefi".into(),
        other => format!("{other:#04x}"),
    }
}

fn emulation_name(media: u8) -> String {
    match media & 0x0f {
        0 => "no-emulation".into(),
        1 => "1.2M floppy".into(),
        2 => "1.44M floppy".into(),
        3 => "2.88M floppy".into(),
        4 => "hard disk".into(),
        other => format!("unknown ({other})"),
    }
}

fn boot_entry(e: &[u8], platform: u8) -> BootEntry {
    BootEntry {
        platform: platform_name(platform),
        emulation: emulation_name(u8_at(e, 1)),
        bootable: u8_at(e, 0) == BOOTABLE,
        load_segment: le_u16(e, 2),
        sector_count: le_u16(e, 6),
        load_rba: le_u32(e, 8),
    }
}

/// Reads the boot catalog at `sector`.
pub fn read_catalog(file: &HostFile, sector: u32) -> Result<Vec<BootEntry>> {
    let offset = u64::from(sector) * SECTOR;
    let corrupt = |at: usize, reason: &str| {
        Error::corrupt(
            file.path(),
            "El Torito boot catalog",
            offset + at as u64,
            reason,
        )
    };
    let len = file
        .len()
        .saturating_sub(offset)
        .min(MAX_CATALOG_SECTORS * SECTOR);
    let catalog = file.read_vec_at(offset, len, "El Torito boot catalog")?;
    let mut entries = catalog.chunks_exact(ENTRY);
    let validation = entries
        .next()
        .ok_or_else(|| corrupt(0, "catalog lies past the end of the image"))?;
    if u8_at(validation, 0) != 1 || validation.get(30..32) != Some(&[0x55, 0xaa][..]) {
        return Err(corrupt(
            0,
            "validation entry has no header ID 1 and key 55 AA",
        ));
    }
    let sum = validation.chunks_exact(2).fold(0u16, |acc, w| {
        acc.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
    });
    if sum != 0 {
        return Err(corrupt(0, "validation entry checksum does not sum to zero"));
    }
    let initial = entries
        .next()
        .ok_or_else(|| corrupt(ENTRY, "no initial/default entry"))?;
    let mut boot = vec![boot_entry(initial, u8_at(validation, 1))];
    // Section headers, each followed by its section entries (and their extension entries).
    while let Some(header) = entries.next() {
        let indicator = u8_at(header, 0);
        if indicator != HEADER_MORE && indicator != HEADER_FINAL {
            break;
        }
        let platform = u8_at(header, 1);
        for _ in 0..le_u16(header, 2) {
            let Some(e) = entries.next() else { break };
            boot.push(boot_entry(e, platform));
            if u8_at(e, 1) & MEDIA_EXTENSION_FOLLOWS != 0 {
                for ext in entries.by_ref() {
                    if u8_at(ext, 0) != EXTENSION || u8_at(ext, 1) & MEDIA_EXTENSION_FOLLOWS == 0 {
                        break;
                    }
                }
            }
        }
        if indicator == HEADER_FINAL {
            break;
        }
    }
    Ok(boot)
}

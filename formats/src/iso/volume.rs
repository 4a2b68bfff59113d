//! Volume descriptors (ECMA-119 section 8): the primary descriptor, Joliet and ISO 9660:1999
//! supplementary descriptors, and the El Torito boot record, read from sector 16 up to the
//! set terminator.

use super::bytes::{both_u16, both_u32, le_u32, slice, u8_at};
use super::dir::{Record, parse_record};
use crate::error::{Error, Result};
use crate::host::HostFile;

/// Bytes per logical sector on a CD: volume descriptors, directory sectors and the El Torito
/// catalog are laid out in units of this size whatever the logical block size.
pub const SECTOR: u64 = 2048;
/// Sector of the first volume descriptor (the first 16 are the system area).
pub const FIRST_DESCRIPTOR_SECTOR: u64 = 16;
/// The standard identifier of every volume descriptor, at byte 1.
pub const MAGIC: &[u8; 5] = b"CD001";
/// More descriptors than any real disc has: a set without a terminator stops here.
const MAX_DESCRIPTORS: u64 = 64;

const TYPE_BOOT_RECORD: u8 = 0;
const TYPE_PRIMARY: u8 = 1;
const TYPE_SUPPLEMENTARY: u8 = 2;
const TYPE_TERMINATOR: u8 = 255;

/// The identifiers, dates and root directory of one volume descriptor.
#[derive(Debug, Clone)]
pub struct Descriptor {
    /// Image offset of the descriptor, for error messages.
    pub offset: u64,
    pub system_id: String,
    pub volume_id: String,
    pub publisher_id: String,
    pub preparer_id: String,
    pub application_id: String,
    /// `YYYY-MM-DD hh:mm:ss.cc +hh:mm`, `None` when the field says "not specified".
    pub creation_date: Option<String>,
    pub modification_date: Option<String>,
    pub volume_set_size: u16,
    /// Bytes per logical block: extents are counted in these.
    pub block_size: u32,
    pub volume_blocks: u32,
    /// Where the root directory's records start (past any extended attribute record) and how
    /// many bytes they take.
    pub root_extent: u32,
    pub root_size: u32,
}

/// The descriptors of a volume set that diskkit uses.
#[derive(Debug, Clone)]
pub struct Volumes {
    pub primary: Descriptor,
    /// A supplementary descriptor with a Joliet escape sequence (UCS-2 names).
    pub joliet: Option<Descriptor>,
    /// An ISO 9660:1999 enhanced volume descriptor (version 2) is present.
    pub enhanced: bool,
    /// Sector of the El Torito boot catalog, from the boot record descriptor.
    pub boot_catalog: Option<u32>,
}

impl Volumes {
    pub fn read(file: &HostFile) -> Result<Volumes> {
        let mut primary = None;
        let mut joliet = None;
        let mut enhanced = false;
        let mut boot_catalog = None;
        let mut sector = vec![0u8; SECTOR as usize];
        for index in 0..MAX_DESCRIPTORS {
            let offset = (FIRST_DESCRIPTOR_SECTOR + index) * SECTOR;
            if offset + SECTOR > file.len() {
                break;
            }
            file.read_exact_at(&mut sector, offset, "ISO volume descriptor")?;
            if slice(&sector, 1, 5) != Some(&MAGIC[..]) {
                if index == 0 {
                    return Err(not_iso(file));
                }
                return Err(Error::corrupt(
                    file.path(),
                    "ISO volume descriptor",
                    offset,
                    "no CD001 identifier before the set terminator",
                ));
            }
            let version = u8_at(&sector, 6);
            match u8_at(&sector, 0) {
                TYPE_TERMINATOR => break,
                TYPE_PRIMARY if primary.is_none() => {
                    primary = Some(Descriptor::parse(file, &sector, offset, false)?)
                }
                TYPE_SUPPLEMENTARY if version == 2 => enhanced = true,
                TYPE_SUPPLEMENTARY if joliet.is_none() && is_joliet_escape(&sector) => {
                    joliet = Some(Descriptor::parse(file, &sector, offset, true)?)
                }
                TYPE_BOOT_RECORD
                    if slice(&sector, 7, 23) == Some(&b"EL TORITO SPECIFICATION"[..]) =>
                {
                    boot_catalog = Some(le_u32(&sector, 71))
                }
                _ => {}
            }
        }
        let primary = primary.ok_or_else(|| {
            Error::corrupt(
                file.path(),
                "ISO volume descriptor set",
                FIRST_DESCRIPTOR_SECTOR * SECTOR,
                "no primary volume descriptor",
            )
        })?;
        Ok(Volumes {
            primary,
            joliet,
            enhanced,
            boot_catalog,
        })
    }
}

/// True when the file has the ISO 9660 identifier at sector 16.
pub fn has_magic(file: &HostFile) -> Result<bool> {
    let offset = FIRST_DESCRIPTOR_SECTOR * SECTOR + 1;
    if file.len() < offset + MAGIC.len() as u64 {
        return Ok(false);
    }
    let mut magic = [0u8; 5];
    file.read_exact_at(&mut magic, offset, "ISO volume descriptor")?;
    Ok(&magic == MAGIC)
}

pub fn not_iso(file: &HostFile) -> Error {
    Error::corrupt(
        file.path(),
        "ISO volume descriptor",
        FIRST_DESCRIPTOR_SECTOR * SECTOR,
        "not an ISO 9660 image (no CD001 identifier at sector 16)",
    )
}

/// Joliet marks its supplementary descriptor with one of three escape sequences (UCS-2 levels
/// 1 to 3) at byte 88.
fn is_joliet_escape(sector: &[u8]) -> bool {
    matches!(slice(sector, 88, 3), Some(b"%/@" | b"%/C" | b"%/E"))
}

impl Descriptor {
    fn parse(file: &HostFile, d: &[u8], offset: u64, ucs2: bool) -> Result<Descriptor> {
        let corrupt =
            |reason: String| Error::corrupt(file.path(), "ISO volume descriptor", offset, reason);
        let block_size = u32::from(both_u16(d, 128));
        if !(512..=2048).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(corrupt(format!(
                "logical block size {block_size} is not 512, 1024 or 2048"
            )));
        }
        let root: Record = slice(d, 156, 34)
            .and_then(|r| parse_record(r).ok())
            .ok_or_else(|| corrupt("root directory record is malformed".into()))?;
        let text = |at: usize, len: usize| identifier(slice(d, at, len).unwrap_or_default(), ucs2);
        Ok(Descriptor {
            offset,
            system_id: text(8, 32),
            volume_id: text(40, 32),
            publisher_id: text(318, 128),
            preparer_id: text(446, 128),
            application_id: text(574, 128),
            creation_date: slice(d, 813, 17).and_then(volume_date),
            modification_date: slice(d, 830, 17).and_then(volume_date),
            volume_set_size: both_u16(d, 120),
            block_size,
            volume_blocks: both_u32(d, 80),
            root_extent: root.extent.saturating_add(u32::from(root.ear_blocks)),
            root_size: root.size,
        })
    }
}

/// A descriptor identifier: a-/d-characters (or UCS-2 big endian in a Joliet descriptor) padded
/// with spaces.
fn identifier(raw: &[u8], ucs2: bool) -> String {
    let s = if ucs2 {
        super::dir::decode_ucs2(raw)
    } else {
        String::from_utf8_lossy(raw).into_owned()
    };
    s.trim_end_matches([' ', '\0']).to_string()
}

/// A 17-byte volume date: 16 ASCII digits `YYYYMMDDhhmmsscc` and the offset from UTC in 15-minute
/// units. All zeros (digits or bytes) means "not specified".
fn volume_date(raw: &[u8]) -> Option<String> {
    let digits = raw.get(..16)?;
    if !digits.iter().all(u8::is_ascii_digit) || digits.iter().all(|&b| b == b'0') {
        return None;
    }
    let d = |at: usize, len: usize| std::str::from_utf8(digits.get(at..at + len)?).ok();
    let tz = i32::from(u8_at(raw, 16) as i8) * 15;
    Some(format!(
        "{}-{}-{} {}:{}:{}.{} {}{:02}:{:02}",
        d(0, 4)?,
        d(4, 2)?,
        d(6, 2)?,
        d(8, 2)?,
        d(10, 2)?,
        d(12, 2)?,
        d(14, 2)?,
        if tz < 0 { '-' } else { '+' },
        tz.abs() / 60,
        tz.abs() % 60
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_dates() {
        let mut raw = *b"2024010203040506\x04";
        assert_eq!(
            volume_date(&raw).as_deref(),
            Some("2024-01-02 03:04:05.06 +01:00")
        );
        raw[16] = (-6i8) as u8;
        assert_eq!(
            volume_date(&raw).as_deref(),
            Some("2024-01-02 03:04:05.06 -01:30")
        );
        assert_eq!(volume_date(b"0000000000000000\0"), None);
        assert_eq!(volume_date(&[0u8; 17]), None);
    }
}

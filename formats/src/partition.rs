//! Partition tables inside a guest: the MBR and the GPT (UEFI specification, chapter 5), read for
//! pre-flight checks and rewritten when a disk grows (the GPT's backup moves to the new end).
//!
//! This is guest content, so every field is hostile: sizes are checked against the disk before
//! anything is read or allocated, the partition array read is bounded ([`MAX_ARRAY_BYTES`]),
//! and every error names the structure and its byte offset in the guest. Logical sectors of 512
//! bytes, as every cloud's disks present them.

use crate::error::{Error, Result};
use crate::image::Image;
use std::fmt;
use std::path::Path;

/// Bytes per logical sector.
pub const SECTOR: u64 = 512;
/// The GPT header signature.
pub const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// Bytes of a partition array read at most: 256 entries of 128 bytes is what every tool writes
/// (32 KiB); 1 MiB leaves room for unusual but valid tables and bounds what a hostile header
/// can make us read.
pub const MAX_ARRAY_BYTES: u64 = 1 << 20;
/// MBR partition type of a GPT's protective partition.
pub const PROTECTIVE_TYPE: u8 = 0xEE;
/// Bytes of the GPT header fields of revision 1.0 (the rest of the sector is reserved).
const GPT_HEADER_FIELDS: usize = 92;
/// Offset of the header CRC field, zeroed while the CRC is computed.
const GPT_HEADER_CRC_AT: usize = 16;
/// Offset of the four MBR partition entries, and their size.
const MBR_ENTRIES_AT: usize = 446;
const MBR_ENTRY_SIZE: usize = 16;
/// GPT attribute bit 2: legacy BIOS bootable.
const LEGACY_BIOS_BOOTABLE: u64 = 1 << 2;

/// A GUID as stored on disk (first three fields little-endian).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The GUID written `AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE`.
    pub const fn from_fields(a: u32, b: u16, c: u16, d: [u8; 8]) -> Guid {
        let a = a.to_le_bytes();
        let b = b.to_le_bytes();
        let c = c.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ])
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.0;
        write!(
            f,
            "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-",
            u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
            u16::from_le_bytes([g[4], g[5]]),
            u16::from_le_bytes([g[6], g[7]]),
            g[8],
            g[9]
        )?;
        g[10..].iter().try_for_each(|b| write!(f, "{b:02X}"))
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// EFI system partition.
pub const ESP_TYPE: Guid = Guid::from_fields(
    0xC12A_7328,
    0xF81F,
    0x11D2,
    [0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B],
);
/// BIOS boot partition (GRUB's core image on a GPT disk booted by a BIOS).
pub const BIOS_BOOT_TYPE: Guid = Guid::from_fields(
    0x2168_6148,
    0x6449,
    0x6E6F,
    [0x74, 0x4E, 0x65, 0x65, 0x64, 0x45, 0x46, 0x49],
);

/// One used entry of the MBR's partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbrPartition {
    /// 1 to 4.
    pub number: u8,
    /// Status 0x80: the BIOS boots this partition.
    pub bootable: bool,
    pub kind: u8,
    pub first_lba: u32,
    pub sectors: u32,
}

/// The master boot record: sector 0 with the 0x55AA signature and a valid partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mbr {
    /// The used entries (type not 0), in table order.
    pub partitions: Vec<MbrPartition>,
}

impl Mbr {
    /// Parses sector 0; `None` when it holds no partition table (no signature, or status bytes
    /// other than 0x00 and 0x80, as in a filesystem's boot sector).
    pub fn parse(sector: &[u8]) -> Option<Mbr> {
        if sector.len() < SECTOR as usize || sector[510..512] != [0x55, 0xAA] {
            return None;
        }
        let mut partitions = Vec::new();
        for (i, e) in sector[MBR_ENTRIES_AT..MBR_ENTRIES_AT + 4 * MBR_ENTRY_SIZE]
            .chunks_exact(MBR_ENTRY_SIZE)
            .enumerate()
        {
            if e[0] != 0 && e[0] != 0x80 {
                return None;
            }
            if e[4] == 0 {
                continue;
            }
            partitions.push(MbrPartition {
                number: i as u8 + 1,
                bootable: e[0] == 0x80,
                kind: e[4],
                first_lba: u32::from_le_bytes([e[8], e[9], e[10], e[11]]),
                sectors: u32::from_le_bytes([e[12], e[13], e[14], e[15]]),
            });
        }
        Some(Mbr { partitions })
    }

    /// True when the table holds a GPT's protective partition.
    pub fn is_protective(&self) -> bool {
        self.partitions.iter().any(|p| p.kind == PROTECTIVE_TYPE)
    }
}

/// A GPT header (primary or backup), its CRC checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptHeader {
    pub revision: u32,
    pub header_size: u32,
    /// Where this header is.
    pub my_lba: u64,
    /// Where the other header is.
    pub alternate_lba: u64,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    pub disk_guid: Guid,
    /// Where this header's partition array starts.
    pub entries_lba: u64,
    pub entry_count: u32,
    pub entry_size: u32,
    pub entries_crc32: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

impl GptHeader {
    /// True when `sector` starts with the GPT signature.
    pub fn has_signature(sector: &[u8]) -> bool {
        sector.starts_with(GPT_SIGNATURE)
    }

    /// Parses the header in `sector`, read from LBA `lba` of a disk of `disk_sectors` sectors;
    /// `path` names the image in errors. Checks the CRC, that the header says it is at `lba`,
    /// and that its usable range and partition array lie inside the disk.
    pub fn parse(sector: &[u8], lba: u64, disk_sectors: u64, path: &Path) -> Result<GptHeader> {
        let offset = lba.saturating_mul(SECTOR);
        let bad = |reason: String| Error::corrupt(path, "GPT header", offset, reason);
        if sector.len() < SECTOR as usize || !Self::has_signature(sector) {
            return Err(bad("no \"EFI PART\" signature".into()));
        }
        let header_size = le32(sector, 12);
        if !(GPT_HEADER_FIELDS as u32..=SECTOR as u32).contains(&header_size) {
            return Err(bad(format!(
                "header size {header_size} is not between {GPT_HEADER_FIELDS} and {SECTOR}"
            )));
        }
        let stored_crc = le32(sector, GPT_HEADER_CRC_AT);
        let computed = header_crc(&sector[..header_size as usize]);
        if stored_crc != computed {
            return Err(bad(format!(
                "header CRC32 {stored_crc:#010x} does not match its content ({computed:#010x})"
            )));
        }
        let mut disk_guid = [0u8; 16];
        disk_guid.copy_from_slice(&sector[56..72]);
        let h = GptHeader {
            revision: le32(sector, 8),
            header_size,
            my_lba: le64(sector, 24),
            alternate_lba: le64(sector, 32),
            first_usable_lba: le64(sector, 40),
            last_usable_lba: le64(sector, 48),
            disk_guid: Guid(disk_guid),
            entries_lba: le64(sector, 72),
            entry_count: le32(sector, 80),
            entry_size: le32(sector, 84),
            entries_crc32: le32(sector, 88),
        };
        if h.my_lba != lba {
            return Err(bad(format!(
                "says it is at LBA {}, found at {lba}",
                h.my_lba
            )));
        }
        if h.entry_size < 128 || !h.entry_size.is_power_of_two() {
            return Err(bad(format!(
                "partition entry size {} is not 128 times a power of two",
                h.entry_size
            )));
        }
        let array = h.array_bytes();
        if array > MAX_ARRAY_BYTES {
            return Err(bad(format!(
                "partition array of {} entries of {} bytes exceeds {MAX_ARRAY_BYTES} bytes",
                h.entry_count, h.entry_size
            )));
        }
        let last_lba = disk_sectors.saturating_sub(1);
        if h.entries_lba < 2 || h.entries_lba.saturating_add(h.array_sectors()) > disk_sectors {
            return Err(bad(format!(
                "partition array at LBA {} ({} sectors) is not inside the disk (LBA 2 to {last_lba})",
                h.entries_lba,
                h.array_sectors()
            )));
        }
        if h.first_usable_lba > h.last_usable_lba.saturating_add(1) || h.last_usable_lba >= last_lba
        {
            return Err(bad(format!(
                "usable LBAs {}..={} are not inside the disk's {disk_sectors} sectors",
                h.first_usable_lba, h.last_usable_lba
            )));
        }
        Ok(h)
    }

    /// Bytes of the partition array.
    pub fn array_bytes(&self) -> u64 {
        u64::from(self.entry_count) * u64::from(self.entry_size)
    }

    /// Sectors of the partition array.
    pub fn array_sectors(&self) -> u64 {
        self.array_bytes().div_ceil(SECTOR)
    }

    /// The header as one sector, CRC computed (reserved bytes zero).
    pub fn encode(&self) -> Vec<u8> {
        let mut s = vec![0u8; SECTOR as usize];
        s[..8].copy_from_slice(GPT_SIGNATURE);
        s[8..12].copy_from_slice(&self.revision.to_le_bytes());
        s[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        s[24..32].copy_from_slice(&self.my_lba.to_le_bytes());
        s[32..40].copy_from_slice(&self.alternate_lba.to_le_bytes());
        s[40..48].copy_from_slice(&self.first_usable_lba.to_le_bytes());
        s[48..56].copy_from_slice(&self.last_usable_lba.to_le_bytes());
        s[56..72].copy_from_slice(&self.disk_guid.0);
        s[72..80].copy_from_slice(&self.entries_lba.to_le_bytes());
        s[80..84].copy_from_slice(&self.entry_count.to_le_bytes());
        s[84..88].copy_from_slice(&self.entry_size.to_le_bytes());
        s[88..92].copy_from_slice(&self.entries_crc32.to_le_bytes());
        let crc = header_crc(&s[..self.header_size as usize]);
        s[GPT_HEADER_CRC_AT..GPT_HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        s
    }
}

/// CRC32 of a header with its CRC field taken as zero.
fn header_crc(header: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..GPT_HEADER_CRC_AT]);
    h.update(&[0; 4]);
    h.update(&header[GPT_HEADER_CRC_AT + 4..]);
    h.finalize()
}

/// One used GPT partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    /// From 1, the entry's place in the array.
    pub number: u32,
    pub type_guid: Guid,
    pub unique_guid: Guid,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

impl GptPartition {
    pub fn is_esp(&self) -> bool {
        self.type_guid == ESP_TYPE
    }

    /// A partition firmware boots from: an EFI system partition, a BIOS boot partition, or one
    /// with the legacy-BIOS-bootable attribute.
    pub fn is_boot(&self) -> bool {
        self.is_esp()
            || self.type_guid == BIOS_BOOT_TYPE
            || self.attributes & LEGACY_BIOS_BOOTABLE != 0
    }
}

/// A GPT: the primary header, its partition array, and what was found of the backup.
#[derive(Debug)]
pub struct Gpt {
    pub primary: GptHeader,
    /// The primary partition array as stored (copied to the backup when the disk grows).
    pub array: Vec<u8>,
    pub partitions: Vec<GptPartition>,
    /// The backup header at the primary's alternate LBA, or why it is unusable.
    pub backup: Result<GptHeader>,
}

/// What a disk holds at its start: an MBR (protective for a GPT disk) and a GPT.
#[derive(Debug, Default)]
pub struct PartitionTable {
    pub mbr: Option<Mbr>,
    pub gpt: Option<Gpt>,
    /// Sector 0 as read (rewritten when a protective MBR's size grows with the disk).
    pub sector0: Vec<u8>,
    /// Sectors of the disk.
    pub disk_sectors: u64,
}

/// Reads the partition tables of `image`; `path` names it in errors. A disk without any table
/// gives an empty [`PartitionTable`]; a GPT whose primary header or array is damaged is an
/// error naming it; a damaged backup is recorded in [`Gpt::backup`].
pub fn read(image: &dyn Image, path: &Path) -> Result<PartitionTable> {
    read_with(image.virtual_size(), path, &mut |buf, offset| {
        image.read_at(buf, offset)
    })
}

/// [`read`] over any reader of a disk of `size` bytes.
pub fn read_with(
    size: u64,
    path: &Path,
    read_at: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
) -> Result<PartitionTable> {
    let disk_sectors = size / SECTOR;
    let mut table = PartitionTable {
        disk_sectors,
        ..PartitionTable::default()
    };
    if disk_sectors == 0 {
        return Ok(table);
    }
    let mut sector0 = vec![0u8; SECTOR as usize];
    read_at(&mut sector0, 0)?;
    table.mbr = Mbr::parse(&sector0);
    table.sector0 = sector0;
    if disk_sectors < 3 {
        return Ok(table);
    }
    let mut sector = vec![0u8; SECTOR as usize];
    read_at(&mut sector, SECTOR)?;
    if !GptHeader::has_signature(&sector) {
        return Ok(table);
    }
    let primary = GptHeader::parse(&sector, 1, disk_sectors, path)?;
    let array = read_array(&primary, path, read_at)?;
    let partitions = parse_partitions(&primary, &array, path)?;
    let backup = read_backup(&primary, disk_sectors, path, read_at);
    table.gpt = Some(Gpt {
        primary,
        array,
        partitions,
        backup,
    });
    Ok(table)
}

/// The partition array `header` points to, its CRC checked.
fn read_array(
    header: &GptHeader,
    path: &Path,
    read_at: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
) -> Result<Vec<u8>> {
    // Both bounded by `GptHeader::parse`: at most MAX_ARRAY_BYTES, inside the disk.
    let offset = header.entries_lba * SECTOR;
    let mut array = vec![0u8; header.array_bytes() as usize];
    read_at(&mut array, offset)?;
    let computed = crc32fast::hash(&array);
    if computed != header.entries_crc32 {
        return Err(Error::corrupt(
            path,
            "GPT partition array",
            offset,
            format!(
                "CRC32 {computed:#010x} does not match the header at LBA {} ({:#010x})",
                header.my_lba, header.entries_crc32
            ),
        ));
    }
    Ok(array)
}

/// The used entries of `array`, each inside the header's usable LBAs.
fn parse_partitions(header: &GptHeader, array: &[u8], path: &Path) -> Result<Vec<GptPartition>> {
    let mut partitions = Vec::new();
    for (i, e) in array.chunks_exact(header.entry_size as usize).enumerate() {
        let mut type_guid = Guid::default();
        type_guid.0.copy_from_slice(&e[..16]);
        if type_guid.is_zero() {
            continue;
        }
        let mut unique_guid = Guid::default();
        unique_guid.0.copy_from_slice(&e[16..32]);
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let p = GptPartition {
            number: i as u32 + 1,
            type_guid,
            unique_guid,
            first_lba: le64(e, 32),
            last_lba: le64(e, 40),
            attributes: le64(e, 48),
            name: String::from_utf16_lossy(&units),
        };
        if p.first_lba > p.last_lba
            || p.first_lba < header.first_usable_lba
            || p.last_lba > header.last_usable_lba
        {
            return Err(Error::corrupt(
                path,
                format!("GPT partition entry {}", p.number),
                header.entries_lba * SECTOR + (i as u64) * u64::from(header.entry_size),
                format!(
                    "LBAs {}..={} are not inside the usable LBAs {}..={}",
                    p.first_lba, p.last_lba, header.first_usable_lba, header.last_usable_lba
                ),
            ));
        }
        partitions.push(p);
    }
    Ok(partitions)
}

/// The backup header the primary names, checked against it.
fn read_backup(
    primary: &GptHeader,
    disk_sectors: u64,
    path: &Path,
    read_at: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
) -> Result<GptHeader> {
    let lba = primary.alternate_lba;
    if lba >= disk_sectors || lba < 2 {
        return Err(Error::corrupt(
            path,
            "GPT header",
            SECTOR,
            format!("backup header LBA {lba} is not inside the disk's {disk_sectors} sectors"),
        ));
    }
    let mut sector = vec![0u8; SECTOR as usize];
    read_at(&mut sector, lba * SECTOR)?;
    let backup = GptHeader::parse(&sector, lba, disk_sectors, path)?;
    let bad = |reason: String| Error::corrupt(path, "backup GPT header", lba * SECTOR, reason);
    if backup.alternate_lba != 1 {
        return Err(bad(format!(
            "names LBA {} as the primary header, not 1",
            backup.alternate_lba
        )));
    }
    if (
        backup.first_usable_lba,
        backup.last_usable_lba,
        backup.disk_guid,
        backup.entry_count,
        backup.entry_size,
        backup.entries_crc32,
    ) != (
        primary.first_usable_lba,
        primary.last_usable_lba,
        primary.disk_guid,
        primary.entry_count,
        primary.entry_size,
        primary.entries_crc32,
    ) {
        return Err(bad("differs from the primary header".into()));
    }
    read_array(&backup, path, read_at)?;
    Ok(backup)
}

/// Bytes to write over a guest: `(offset, bytes)`.
pub type Patch = (u64, Vec<u8>);

impl PartitionTable {
    /// The sectors to rewrite so that the GPT fits a disk grown to `new_size` bytes: the backup
    /// partition array and header at the new end, the primary header naming them (backup LBA,
    /// last usable LBA, CRC), the old backup header zeroed (so nothing finds a stale copy), and a
    /// protective MBR that covered the old disk covering the new one. Sorted by offset, disjoint.
    /// Nothing when the disk has no GPT.
    pub fn grown_gpt(&self, new_size: u64) -> Result<Vec<Patch>> {
        let Some(gpt) = &self.gpt else {
            return Ok(Vec::new());
        };
        let new_sectors = new_size / SECTOR;
        let old_last = self.disk_sectors - 1;
        let new_last = new_sectors.saturating_sub(1);
        let array_sectors = gpt.primary.array_sectors();
        if new_sectors < self.disk_sectors || new_last < 2 + 2 * array_sectors + 1 {
            return Err(Error::invalid(format!(
                "a GPT disk of {} sectors cannot become {new_sectors}",
                self.disk_sectors
            )));
        }
        let backup_array_lba = new_last - array_sectors;
        let mut primary = gpt.primary.clone();
        primary.alternate_lba = new_last;
        // Tools leave the space between the last usable LBA and the backup array unused; keep
        // that gap as it was (commonly none).
        let old_gap = old_last
            .saturating_sub(array_sectors)
            .saturating_sub(gpt.primary.last_usable_lba + 1);
        primary.last_usable_lba = backup_array_lba - 1 - old_gap;
        let backup = GptHeader {
            my_lba: new_last,
            alternate_lba: 1,
            entries_lba: backup_array_lba,
            ..primary.clone()
        };
        let mut patches = Vec::new();
        if let Some(sector0) = self.protective_mbr_grown(new_sectors) {
            patches.push((0, sector0));
        }
        patches.push((SECTOR, primary.encode()));
        if old_last < backup_array_lba {
            patches.push((old_last * SECTOR, vec![0; SECTOR as usize]));
        }
        let mut array = gpt.array.clone();
        array.resize((array_sectors * SECTOR) as usize, 0);
        patches.push((backup_array_lba * SECTOR, array));
        patches.push((new_last * SECTOR, backup.encode()));
        patches.sort_by_key(|p| p.0);
        Ok(patches)
    }

    /// Sector 0 with the protective partition covering a disk of `new_sectors`, when it
    /// covered the whole old disk (a hybrid MBR is left as it is).
    fn protective_mbr_grown(&self, new_sectors: u64) -> Option<Vec<u8>> {
        let mbr = self.mbr.as_ref()?;
        let p = mbr.partitions.iter().find(|p| p.kind == PROTECTIVE_TYPE)?;
        let covering = |sectors: u64| u32::try_from(sectors - 1).unwrap_or(u32::MAX);
        if p.first_lba != 1 || p.sectors != covering(self.disk_sectors) {
            return None;
        }
        let mut sector0 = self.sector0.clone();
        let at = MBR_ENTRIES_AT + usize::from(p.number - 1) * MBR_ENTRY_SIZE + 12;
        sector0[at..at + 4].copy_from_slice(&covering(new_sectors).to_le_bytes());
        Some(sector0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GPT disk of `sectors` with one ESP at LBA 2048..=4095, as sgdisk lays it out.
    fn gpt_disk(sectors: u64) -> Vec<u8> {
        let mut disk = vec![0u8; (sectors * SECTOR) as usize];
        // Protective MBR.
        let e = &mut disk[MBR_ENTRIES_AT..MBR_ENTRIES_AT + 16];
        e[4] = PROTECTIVE_TYPE;
        e[8..12].copy_from_slice(&1u32.to_le_bytes());
        e[12..16].copy_from_slice(&((sectors - 1) as u32).to_le_bytes());
        disk[510] = 0x55;
        disk[511] = 0xAA;
        let mut array = vec![0u8; 128 * 128];
        array[..16].copy_from_slice(&ESP_TYPE.0);
        array[16] = 7;
        array[32..40].copy_from_slice(&2048u64.to_le_bytes());
        array[40..48].copy_from_slice(&4095u64.to_le_bytes());
        array[56] = b'E';
        let last = sectors - 1;
        let primary = GptHeader {
            revision: 0x1_0000,
            header_size: 92,
            my_lba: 1,
            alternate_lba: last,
            first_usable_lba: 34,
            last_usable_lba: last - 33,
            disk_guid: Guid([9; 16]),
            entries_lba: 2,
            entry_count: 128,
            entry_size: 128,
            entries_crc32: crc32fast::hash(&array),
        };
        let backup = GptHeader {
            my_lba: last,
            alternate_lba: 1,
            entries_lba: last - 32,
            ..primary.clone()
        };
        let put = |disk: &mut Vec<u8>, lba: u64, bytes: &[u8]| {
            let at = (lba * SECTOR) as usize;
            disk[at..at + bytes.len()].copy_from_slice(bytes);
        };
        put(&mut disk, 1, &primary.encode());
        put(&mut disk, 2, &array);
        put(&mut disk, last - 32, &array);
        put(&mut disk, last, &backup.encode());
        disk
    }

    fn read_bytes(disk: &[u8]) -> Result<PartitionTable> {
        read_with(disk.len() as u64, Path::new("d"), &mut |buf, off| {
            let off = off as usize;
            buf.copy_from_slice(&disk[off..off + buf.len()]);
            Ok(())
        })
    }

    #[test]
    fn guid_prints_mixed_endian() {
        assert_eq!(ESP_TYPE.to_string(), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    }

    #[test]
    fn reads_a_gpt_and_its_backup() {
        let disk = gpt_disk(8192);
        let t = read_bytes(&disk).unwrap();
        assert!(t.mbr.as_ref().unwrap().is_protective());
        let gpt = t.gpt.unwrap();
        assert_eq!(gpt.partitions.len(), 1);
        assert!(gpt.partitions[0].is_esp() && gpt.partitions[0].is_boot());
        assert_eq!(gpt.partitions[0].name, "E");
        assert_eq!(gpt.backup.unwrap().my_lba, 8191);
    }

    #[test]
    fn damage_is_named_with_its_offset() {
        let mut disk = gpt_disk(8192);
        disk[SECTOR as usize + 40] ^= 1;
        let e = read_bytes(&disk).unwrap_err().to_string();
        assert!(
            e.contains("GPT header at offset 0x200") && e.contains("CRC"),
            "{e}"
        );
        let mut disk = gpt_disk(8192);
        disk[2 * SECTOR as usize + 100] ^= 1;
        let e = read_bytes(&disk).unwrap_err().to_string();
        assert!(e.contains("GPT partition array at offset 0x400"), "{e}");
        let mut disk = gpt_disk(8192);
        let last = disk.len() - 512;
        disk[last + 40] ^= 1;
        let t = read_bytes(&disk).unwrap();
        let e = t.gpt.unwrap().backup.unwrap_err().to_string();
        assert!(e.contains(&format!("{:#x}", last)), "{e}");
    }

    #[test]
    fn growing_moves_the_backup_to_the_new_end() {
        let disk = gpt_disk(8192);
        let t = read_bytes(&disk).unwrap();
        let mut grown = disk.clone();
        grown.resize(16384 * 512, 0);
        for (at, bytes) in t.grown_gpt(grown.len() as u64).unwrap() {
            grown[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
        }
        let g = read_bytes(&grown).unwrap();
        let gpt = g.gpt.unwrap();
        assert_eq!(gpt.primary.alternate_lba, 16383);
        assert_eq!(gpt.primary.last_usable_lba, 16383 - 33);
        assert_eq!(gpt.backup.unwrap().entries_lba, 16383 - 32);
        assert_eq!(g.mbr.unwrap().partitions[0].sectors, 16383);
        // The stale backup header is gone.
        assert!(!GptHeader::has_signature(&grown[8191 * 512..]));
    }

    #[test]
    fn hostile_headers_are_refused_before_reading() {
        let mut disk = gpt_disk(8192);
        // 2^32-1 entries: refused by size, nothing allocated.
        let mut h = GptHeader::parse(&disk[512..1024], 1, 8192, Path::new("d")).unwrap();
        h.entry_count = u32::MAX;
        disk[512..1024].copy_from_slice(&h.encode());
        let e = read_bytes(&disk).unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");
        // Not an MBR: a boot sector whose "status" bytes are code.
        let mut sector = vec![0u8; 512];
        sector[446] = 0x33;
        sector[510] = 0x55;
        sector[511] = 0xAA;
        assert!(Mbr::parse(&sector).is_none());
        assert!(read_bytes(&[]).unwrap().mbr.is_none());
    }
}

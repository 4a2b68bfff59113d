//! The two headers (the current one locates the log) and the region table (which locates the
//! BAT and the metadata region), each checksummed with CRC-32C.

use super::log::{LogLocation, LoggedFile};
use super::*;
use crate::error::{Error, Result};
use crate::host::HostFile;

pub(super) const REGION_TABLE_LEN: usize = 64 * 1024;

pub(super) const HEADER_LEN: usize = 4096;

pub(super) const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];

/// The fields of the current header that locate the log.
pub(super) struct Header {
    pub(super) sequence: u64,
    pub(super) log: LogLocation,
}

#[derive(Clone, Copy)]
pub(super) struct Region {
    pub(super) guid: [u8; 16],
    pub(super) offset: u64,
    pub(super) length: u64,
}

/// The valid header with the highest sequence number.
pub(super) fn current_header(host: &HostFile) -> Result<Header> {
    let mut best: Option<Header> = None;
    let mut problems = Vec::new();
    for at in HEADER_OFFSETS {
        let mut h = [0u8; HEADER_LEN];
        if let Err(e) = host.read_exact_at(&mut h, at, "vhdx header") {
            problems.push(e.to_string());
            continue;
        }
        if &h[..4] != b"head" {
            problems.push(format!("header at {at:#x}: bad signature"));
            continue;
        }
        if !checksum_ok(&h) {
            problems.push(format!("header at {at:#x}: bad checksum"));
            continue;
        }
        let version = LE::read_u16(&h[66..]);
        if version != 1 {
            return Err(Error::unsupported(
                host.path(),
                format!("vhdx header version {version}"),
            ));
        }
        let mut log_guid = [0u8; 16];
        log_guid.copy_from_slice(&h[48..64]);
        let header = Header {
            sequence: LE::read_u64(&h[8..]),
            log: LogLocation {
                offset: LE::read_u64(&h[72..]),
                length: u64::from(LE::read_u32(&h[68..])),
                guid: log_guid,
            },
        };
        if best.as_ref().is_none_or(|b| header.sequence > b.sequence) {
            best = Some(header);
        }
    }
    best.ok_or_else(|| {
        Error::corrupt(
            host.path(),
            "vhdx header",
            HEADER_OFFSETS[0],
            format!("no valid header: {}", problems.join("; ")),
        )
    })
}

/// CRC-32C of a structure whose checksum field (bytes 4..8) counts as zero.
/// The checksummed structures at fixed places, as (offset, length): the two headers, then the
/// two region tables.
pub const SEALED: [(u64, usize); 4] = [
    (HEADER_OFFSETS[0], HEADER_LEN),
    (HEADER_OFFSETS[1], HEADER_LEN),
    (REGION_TABLE_OFFSETS[0], REGION_TABLE_LEN),
    (REGION_TABLE_OFFSETS[1], REGION_TABLE_LEN),
];

/// Writes the CRC-32C of a header, region table or log entry (`structure`, whole) into its
/// checksum field, as a writer seals it.
pub fn seal(structure: &mut [u8]) {
    if let Some(field) = structure.get_mut(4..8) {
        field.fill(0);
        let crc = crc32c::crc32c(structure);
        structure[4..8].copy_from_slice(&crc.to_le_bytes());
    }
}

pub(super) fn checksum_ok(structure: &[u8]) -> bool {
    let Some(stored) = structure.get(4..8).map(LE::read_u32) else {
        return false;
    };
    let crc = crc32c::crc32c(&structure[..4]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &structure[8..]) == stored
}

/// The first valid region table copy, its regions checked to lie in the file past the headers
/// without overlapping each other or the log.
pub(super) fn region_table(file: &LoggedFile, log: &LogLocation) -> Result<Vec<Region>> {
    let path = file.host().path();
    let mut table = None;
    for at in REGION_TABLE_OFFSETS {
        let t = file.read_vec_at(at, REGION_TABLE_LEN as u64, "vhdx region table")?;
        if &t[..4] == b"regi" && checksum_ok(&t) {
            table = Some((at, t));
            break;
        }
    }
    let Some((at, t)) = table else {
        return Err(Error::corrupt(
            path,
            "vhdx region table",
            REGION_TABLE_OFFSETS[0],
            "neither copy has a valid signature and checksum",
        ));
    };
    let corrupt = |r: String| Error::corrupt(path, "vhdx region table", at, r);
    let count = LE::read_u32(&t[8..]) as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(corrupt(format!(
            "{count} entries (limit {MAX_TABLE_ENTRIES})"
        )));
    }
    let mut regions: Vec<Region> = Vec::with_capacity(count);
    for e in t[16..].chunks_exact(32).take(count) {
        let mut g = [0u8; 16];
        g.copy_from_slice(&e[..16]);
        let offset = LE::read_u64(&e[16..]);
        let length = u64::from(LE::read_u32(&e[24..]));
        let required = LE::read_u32(&e[28..]) & 1 != 0;
        if g != BAT_REGION && g != METADATA_REGION {
            if required {
                return Err(Error::unsupported(
                    path,
                    format!("required vhdx region {}", guid_string(&g)),
                ));
            }
            continue;
        }
        if offset < MIB || offset % MIB != 0 || length == 0 || length % MIB != 0 {
            return Err(corrupt(format!(
                "region {} at {offset:#x} of {length:#x} bytes is not 1 MiB aligned past the headers",
                guid_string(&g)
            )));
        }
        // On disk, not merely inside a size the log extends the file to.
        file.host().check_range(offset, length, "vhdx region")?;
        let overlaps = |o: u64, l: u64| offset < o.saturating_add(l) && o < offset + length;
        if regions
            .iter()
            .any(|r| r.guid == g || overlaps(r.offset, r.length))
            || (log.length > 0 && overlaps(log.offset, log.length))
        {
            return Err(corrupt(format!(
                "region {} at {offset:#x} is duplicated or overlaps another region or the log",
                guid_string(&g)
            )));
        }
        regions.push(Region {
            guid: g,
            offset,
            length,
        });
    }
    Ok(regions)
}

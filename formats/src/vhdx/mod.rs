//! Microsoft VHDX images ([MS-VHDX]): two checksummed headers, a region table locating the block
//! allocation table (BAT) and the metadata region, a metadata log replayed in memory, payload
//! blocks, and for differencing images sector bitmaps and a parent locator.

mod check;
mod log;

pub use check::check;

use crate::backing::{BackingOpener, Role};
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::{
    Extent, ExtentKind, Format, Image, ImageInfo, check_guest_range, map_backing, read_backing,
};
use byteorder::{ByteOrder, LittleEndian as LE};
use log::{LogLocation, LoggedFile};
use serde_json::json;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"vhdxfile";

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
const HEADER_LEN: usize = 4096;
const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
const REGION_TABLE_LEN: usize = 64 * 1024;
const METADATA_TABLE_LEN: u64 = 64 * KIB;
const MAX_TABLE_ENTRIES: usize = 2047;
/// The largest virtual disk the specification allows.
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
const MAX_PARENT_LOCATOR_ENTRIES: usize = 256;

/// A GUID as VHDX stores it: the first three fields little-endian, the last eight bytes as is.
const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

const BAT_REGION: [u8; 16] = guid(
    0x2DC27766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
const METADATA_REGION: [u8; 16] = guid(
    0x8B7CA206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA16737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2FA54224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const PAGE_83_DATA: [u8; 16] = guid(
    0xBECA12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
const LOGICAL_SECTOR_SIZE: [u8; 16] = guid(
    0x8141BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
const PHYSICAL_SECTOR_SIZE: [u8; 16] = guid(
    0xCDA348C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
const PARENT_LOCATOR: [u8; 16] = guid(
    0xA8D35F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
const VHDX_PARENT_LOCATOR_TYPE: [u8; 16] = guid(
    0xB04AEFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

// Payload block states of BAT entries.
const PAYLOAD_NOT_PRESENT: u64 = 0;
const PAYLOAD_UNDEFINED: u64 = 1;
const PAYLOAD_ZERO: u64 = 2;
const PAYLOAD_UNMAPPED: u64 = 3;
/// The value the 0.95 draft gave to UNMAPPED; images made then still carry it.
const PAYLOAD_UNMAPPED_V095: u64 = 5;
const PAYLOAD_FULLY_PRESENT: u64 = 6;
const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
// Sector bitmap block states.
const SB_NOT_PRESENT: u64 = 0;
const SB_PRESENT: u64 = 6;
/// Sectors described by one sector bitmap block (1 MiB of bits).
const SECTORS_PER_BITMAP: u64 = 1 << 23;

fn bat_state(entry: u64) -> u64 {
    entry & 7
}

fn bat_offset(entry: u64) -> u64 {
    (entry >> 20) * MIB
}

/// Where a guest run's bytes come from.
enum Source {
    Host(u64),
    Zero,
    /// Not in this file: the parent's bytes (differencing) or zeros.
    Unallocated,
}

pub struct VhdxImage {
    file: LoggedFile,
    virtual_size: u64,
    block_size: u64,
    logical_sector_size: u64,
    physical_sector_size: u64,
    chunk_ratio: u64,
    leave_blocks_allocated: bool,
    bat: Vec<u64>,
    /// A differencing image: unallocated blocks come from the parent.
    has_parent: bool,
    parent: Option<Box<dyn Image>>,
    parent_name: Option<String>,
    parent_path: Option<PathBuf>,
    log_replayed: bool,
    /// Problems found while opening that did not prevent reading.
    warnings: Vec<String>,
}

/// The fields of the current header that locate the log.
struct Header {
    sequence: u64,
    log: LogLocation,
}

/// Where the structures besides the headers lie, and the parent locator of differencing
/// images.
struct Layout {
    log: LogLocation,
    bat: Region,
    metadata: Region,
    parent_locator: Option<Vec<(String, String)>>,
}

#[derive(Clone, Copy)]
struct Region {
    guid: [u8; 16],
    offset: u64,
    length: u64,
}

struct Metadata {
    block_size: u64,
    leave_blocks_allocated: bool,
    has_parent: bool,
    virtual_size: u64,
    logical_sector_size: u64,
    physical_sector_size: u64,
    /// Key/value pairs of the parent locator of differencing images.
    parent_locator: Vec<(String, String)>,
}

impl VhdxImage {
    pub fn open(host: HostFile, opener: &mut dyn BackingOpener) -> Result<VhdxImage> {
        let (mut image, layout) = Self::read_layout(host)?;
        let path = image.file.host().path().to_path_buf();
        if let Some((at, reason)) = image.bat_problems(layout.bat.offset, 1).into_iter().next() {
            return Err(Error::corrupt(&path, "vhdx BAT entry", at, reason));
        }
        if let Some(locator) = &layout.parent_locator {
            let (name, parent_path) = find_parent(&path, locator)?;
            image.parent = Some(opener.open_backing(
                &path,
                &parent_path,
                Role::Parent,
                None,
                &mut image.warnings,
            )?);
            image.parent_name = Some(name);
            image.parent_path = Some(parent_path);
        }
        Ok(image)
    }

    /// Reads headers, log, region table, metadata and BAT, without checking the BAT's entries
    /// or opening a parent.
    fn read_layout(host: HostFile) -> Result<(VhdxImage, Layout)> {
        let path = host.path().to_path_buf();
        let mut magic = [0u8; 8];
        host.read_exact_at(&mut magic, 0, "vhdx file type identifier")?;
        if &magic != MAGIC {
            return Err(Error::corrupt(
                &path,
                "vhdx file type identifier",
                0,
                "signature is not \"vhdxfile\"",
            ));
        }
        let header = current_header(&host)?;
        let log_location = header.log;
        let (file, log_replayed) = log::replay(host, header.log)?;
        let regions = region_table(&file, &log_location)?;
        let region = |g: [u8; 16], name: &str| {
            regions.iter().find(|r| r.guid == g).ok_or_else(|| {
                Error::corrupt(
                    &path,
                    "vhdx region table",
                    REGION_TABLE_OFFSETS[0],
                    format!("no {name} region"),
                )
            })
        };
        let bat_region = region(BAT_REGION, "BAT")?;
        let metadata_region = region(METADATA_REGION, "metadata")?;
        let meta = metadata(&file, metadata_region)?;

        let chunk_ratio = (SECTORS_PER_BITMAP * meta.logical_sector_size) / meta.block_size;
        let payload_blocks = meta.virtual_size.div_ceil(meta.block_size);
        let bat_entries = if meta.has_parent {
            payload_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            payload_blocks + payload_blocks.saturating_sub(1) / chunk_ratio
        };
        if bat_entries * 8 > bat_region.length {
            return Err(Error::corrupt(
                &path,
                "vhdx BAT",
                bat_region.offset,
                format!(
                    "{} bytes hold fewer than the {bat_entries} entries a {}-byte disk needs",
                    bat_region.length, meta.virtual_size
                ),
            ));
        }
        let bat_bytes = file.read_vec_at(bat_region.offset, bat_entries * 8, "vhdx BAT")?;
        let bat: Vec<u64> = bat_bytes.chunks_exact(8).map(LE::read_u64).collect();
        let layout = Layout {
            log: log_location,
            bat: *bat_region,
            metadata: *metadata_region,
            parent_locator: meta.has_parent.then_some(meta.parent_locator),
        };
        let image = VhdxImage {
            file,
            virtual_size: meta.virtual_size,
            block_size: meta.block_size,
            logical_sector_size: meta.logical_sector_size,
            physical_sector_size: meta.physical_sector_size,
            chunk_ratio,
            leave_blocks_allocated: meta.leave_blocks_allocated,
            bat,
            has_parent: layout.parent_locator.is_some(),
            parent: None,
            parent_name: None,
            parent_path: None,
            log_replayed,
            warnings: Vec::new(),
        };
        Ok((image, layout))
    }

    /// Problems of BAT entries (at most `limit`): states that are not allowed, and present
    /// blocks that overlap the headers or lie past the end of the file, with the offset of
    /// each entry. `map` trusts a table without problems.
    fn bat_problems(&self, bat_offset_in_file: u64, limit: usize) -> Vec<(u64, String)> {
        let mut problems = Vec::new();
        for (i, &entry) in self.bat.iter().enumerate() {
            if problems.len() >= limit {
                break;
            }
            let at = bat_offset_in_file + i as u64 * 8;
            if let Err(reason) = self.check_entry(i as u64, entry) {
                problems.push((at, reason));
            }
        }
        problems
    }

    /// Checks BAT entry `i`.
    fn check_entry(&self, i: u64, entry: u64) -> std::result::Result<(), String> {
        let state = bat_state(entry);
        if (i + 1).is_multiple_of(self.chunk_ratio + 1) {
            // Only differencing images consult sector bitmaps. Elsewhere the entries are
            // unused, and qemu before 8.0 left garbage in them: ignore them there.
            return match state {
                _ if !self.has_parent => Ok(()),
                SB_NOT_PRESENT => Ok(()),
                SB_PRESENT => self.check_block(entry, MIB),
                s => Err(format!("sector bitmap entry in state {s}")),
            };
        }
        let block = i - i / (self.chunk_ratio + 1);
        let block_start = block * self.block_size;
        if block_start >= self.virtual_size {
            return Ok(());
        }
        let needed = self.block_size.min(self.virtual_size - block_start);
        match state {
            PAYLOAD_NOT_PRESENT
            | PAYLOAD_UNDEFINED
            | PAYLOAD_ZERO
            | PAYLOAD_UNMAPPED
            | PAYLOAD_UNMAPPED_V095 => Ok(()),
            PAYLOAD_FULLY_PRESENT => self.check_block(entry, needed),
            PAYLOAD_PARTIALLY_PRESENT if self.has_parent => {
                self.check_block(entry, needed)?;
                if bat_state(self.bitmap_entry(block)) != SB_PRESENT {
                    return Err("partially present block without a sector bitmap".into());
                }
                Ok(())
            }
            s => Err(format!("payload block entry in state {s}")),
        }
    }

    /// True when BAT entry `i` (valid) points at bytes of the file that this image uses.
    fn entry_is_stored(&self, i: u64, entry: u64) -> bool {
        let state = bat_state(entry);
        if (i + 1).is_multiple_of(self.chunk_ratio + 1) {
            return self.has_parent && state == SB_PRESENT;
        }
        let block = i - i / (self.chunk_ratio + 1);
        block * self.block_size < self.virtual_size
            && (state == PAYLOAD_FULLY_PRESENT
                || (self.has_parent && state == PAYLOAD_PARTIALLY_PRESENT))
    }

    fn check_block(&self, entry: u64, len: u64) -> std::result::Result<(), String> {
        let offset = bat_offset(entry);
        if offset < MIB {
            return Err(format!("block at {offset:#x} overlaps the headers"));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.file.len() => Ok(()),
            _ => Err(format!(
                "block at {offset:#x} runs past the end of the file ({:#x})",
                self.file.len()
            )),
        }
    }

    fn payload_entry(&self, block: u64) -> u64 {
        let index = block + block / self.chunk_ratio;
        self.bat.get(index as usize).copied().unwrap_or(0)
    }

    fn bitmap_entry(&self, block: u64) -> u64 {
        let chunk = block / self.chunk_ratio;
        let index = chunk * (self.chunk_ratio + 1) + self.chunk_ratio;
        self.bat.get(index as usize).copied().unwrap_or(0)
    }

    /// What backs the guest bytes from `offset` on, for how many bytes (at most `max_len`): the
    /// following blocks join the run while they read the same way (data that follows on in the
    /// file, zeros, or unallocated); a partially present block is split by its sector bitmap.
    fn locate(&self, offset: u64, max_len: u64) -> Result<(Source, u64)> {
        let block = offset / self.block_size;
        let within = offset % self.block_size;
        let first_len = max_len.min(self.block_size - within);
        let entry = self.payload_entry(block);
        let source = match self.block_source(entry) {
            Some(source) => source,
            None => return self.locate_partial(block, entry, within, first_len),
        };
        let source = match source {
            Source::Host(at) => Source::Host(at + within),
            other => other,
        };
        let mut len = first_len;
        let mut next = block + 1;
        while len < max_len {
            let joins = match (&source, self.block_source(self.payload_entry(next))) {
                (Source::Host(at), Some(Source::Host(b))) => Some(b) == at.checked_add(len),
                (Source::Zero, Some(Source::Zero))
                | (Source::Unallocated, Some(Source::Unallocated)) => true,
                _ => false,
            };
            if !joins {
                break;
            }
            len = (len + self.block_size).min(max_len);
            next += 1;
        }
        Ok((source, len))
    }

    /// How a whole payload block reads, from its BAT entry; `None` for a partially present one.
    fn block_source(&self, entry: u64) -> Option<Source> {
        Some(match bat_state(entry) {
            PAYLOAD_FULLY_PRESENT => Source::Host(bat_offset(entry)),
            PAYLOAD_PARTIALLY_PRESENT => return None,
            PAYLOAD_NOT_PRESENT => Source::Unallocated,
            // ZERO, and UNDEFINED/UNMAPPED whose contents the file does not define: zeros.
            _ => Source::Zero,
        })
    }

    /// Splits a partially present block by its sector bitmap: set bits are in this file, clear
    /// bits in the parent.
    fn locate_partial(
        &self,
        block: u64,
        entry: u64,
        within: u64,
        len: u64,
    ) -> Result<(Source, u64)> {
        let sector_size = self.logical_sector_size;
        let first = within / sector_size;
        let last = (within + len).div_ceil(sector_size);
        // Sector index of the block's first sector inside its chunk's bitmap.
        let base = (block % self.chunk_ratio) * (self.block_size / sector_size);
        let (from_bit, to_bit) = (base + first, base + last);
        let bitmap_at = bat_offset(self.bitmap_entry(block)) + from_bit / 8;
        let bytes = self.file.read_vec_at(
            bitmap_at,
            (to_bit.div_ceil(8)) - from_bit / 8,
            "vhdx sector bitmap",
        )?;
        let bit = |n: u64| {
            let rel = n - (from_bit - from_bit % 8);
            bytes
                .get((rel / 8) as usize)
                .is_some_and(|b| b & (1 << (rel % 8)) != 0)
        };
        let present = bit(from_bit);
        let mut n = from_bit + 1;
        while n < to_bit && bit(n) == present {
            n += 1;
        }
        let run_end = ((n - base) * sector_size).min(within + len);
        let run = run_end - within;
        Ok(if present {
            (Source::Host(bat_offset(entry) + within), run)
        } else {
            (Source::Unallocated, run)
        })
    }

    fn subformat(&self) -> &'static str {
        if self.parent.is_some() {
            "differencing"
        } else if self.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        }
    }
}

/// The valid header with the highest sequence number.
fn current_header(host: &HostFile) -> Result<Header> {
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
fn checksum_ok(structure: &[u8]) -> bool {
    let Some(stored) = structure.get(4..8).map(LE::read_u32) else {
        return false;
    };
    let crc = crc32c::crc32c(&structure[..4]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &structure[8..]) == stored
}

/// The first valid region table copy, its regions checked to lie in the file past the headers
/// without overlapping each other or the log.
fn region_table(file: &LoggedFile, log: &LogLocation) -> Result<Vec<Region>> {
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

fn metadata(file: &LoggedFile, region: &Region) -> Result<Metadata> {
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
fn parse_parent_locator(b: &[u8]) -> std::result::Result<Vec<(String, String)>, String> {
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
fn find_parent(child: &Path, locator: &[(String, String)]) -> Result<(String, PathBuf)> {
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

fn guid_string(g: &[u8; 16]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{}",
        LE::read_u32(g),
        LE::read_u16(&g[4..]),
        LE::read_u16(&g[6..]),
        g[8..]
            .iter()
            .enumerate()
            .map(|(i, b)| if i == 2 {
                format!("-{b:02X}")
            } else {
                format!("{b:02X}")
            })
            .collect::<String>()
    )
}

impl Image for VhdxImage {
    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_guest_range(self.virtual_size, offset, 1)?;
        let max_len = max_len.min(self.virtual_size - offset);
        let (source, mut length) = self.locate(offset, max_len)?;
        let kind = match source {
            Source::Host(at) => {
                // Blocks are often sparse on the host (qemu's fixed images are): holes read as
                // zeros, so map them as such and spare readers the work.
                let (data, run) = self.file.data_run(at, length)?;
                length = run;
                if data {
                    ExtentKind::Data { offset: at }
                } else {
                    ExtentKind::Zero
                }
            }
            Source::Zero => ExtentKind::Zero,
            Source::Unallocated => return map_backing(self.parent.as_deref(), offset, length),
        };
        Ok(Extent {
            start: offset,
            length,
            kind,
            depth: 0,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.virtual_size, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (source, len) = self.locate(pos, (buf.len() - done) as u64)?;
            let out = &mut buf[done..done + len as usize];
            match source {
                Source::Host(at) => self.file.read_exact_at(out, at, "vhdx payload block")?,
                Source::Zero => out.fill(0),
                Source::Unallocated => read_backing(self.parent.as_deref(), out, pos)?,
            }
            done += len as usize;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        let host = self.file.host();
        let mut info = ImageInfo::basic(
            host.path().to_path_buf(),
            Format::Vhdx,
            self.virtual_size,
            host.allocated_bytes(),
        );
        info.cluster_size = Some(self.block_size);
        info.format_specific = Some(json!({
            "type": "vhdx",
            "data": {
                "subformat": self.subformat(),
                "block-size": self.block_size,
                "logical-sector-size": self.logical_sector_size,
                "physical-sector-size": self.physical_sector_size,
                "log-replayed": self.log_replayed,
            }
        }));
        info.warnings = self.warnings.clone();
        if self.log_replayed {
            info.warnings.push(
                "the metadata log was not empty: it was replayed in memory (the file is unchanged)"
                    .into(),
            );
        }
        if let Some(p) = &self.parent {
            info.backing_filename = self.parent_name.clone();
            info.full_backing_filename = self.parent_path.clone();
            info.backing_filename_format = Some(p.format().to_string());
        }
        info
    }

    fn backing(&self) -> Option<&dyn Image> {
        self.parent.as_deref()
    }
}

//! Microsoft VHDX images ([MS-VHDX]): two checksummed headers, a region table locating the block
//! allocation table (BAT) and the metadata region, a metadata log replayed in memory, payload
//! blocks, and for differencing images sector bitmaps and a parent locator.

mod check;
mod header;
mod log;
mod metadata;
mod read;

pub use check::{check, check_file};
pub use header::{SEALED, seal};
pub use read::VhdxImage;

use byteorder::{ByteOrder, LittleEndian as LE};

pub const MAGIC: &[u8; 8] = b"vhdxfile";

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Entries of the region table and of the metadata table at most.
const MAX_TABLE_ENTRIES: usize = 2047;
const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];

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

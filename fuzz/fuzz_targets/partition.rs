//! The partition table parser on arbitrary guest bytes: MBR, GPT headers, partition arrays and
//! the backup header are read, and a GPT is grown to a larger disk, without a panic, a hang or an
//! allocation the bytes ask for. GPT header and array CRCs are made valid first, so mutations
//! reach the fields behind them (bad CRCs are covered by unit tests).
#![no_main]

use diskkit_formats::partition::{self, GptHeader, SECTOR};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let mut disk = data.to_vec();
    fix_crcs(&mut disk);
    let size = disk.len() as u64;
    let table = partition::read_with(size, Path::new("fuzz"), &mut |buf, offset| {
        let at = usize::try_from(offset).expect("offset");
        buf.copy_from_slice(&disk[at..at + buf.len()]);
        Ok(())
    });
    if let Ok(t) = table {
        // Growing: patches stay inside the new disk.
        let new_size = (size / SECTOR + 4096) * SECTOR;
        if let Ok(patches) = t.grown_gpt(new_size) {
            for (at, bytes) in patches {
                assert!(at + bytes.len() as u64 <= new_size);
            }
        }
    }
});

/// Recomputes the CRCs of the primary header at LBA 1 and of the header at the LBA it names as
/// its backup, each over its partition array when that lies inside the input.
fn fix_crcs(disk: &mut [u8]) {
    let sectors = disk.len() as u64 / SECTOR;
    let mut lba = 1;
    for _ in 0..2 {
        if lba >= sectors {
            return;
        }
        let at = (lba * SECTOR) as usize;
        if !GptHeader::has_signature(&disk[at..]) {
            return;
        }
        let h = &mut disk[at..at + SECTOR as usize];
        let (entries, count, size) = (
            u64::from_le_bytes(h[72..80].try_into().unwrap()),
            u32::from_le_bytes(h[80..84].try_into().unwrap()),
            u32::from_le_bytes(h[84..88].try_into().unwrap()),
        );
        let array = u64::from(count) * u64::from(size);
        let start = entries.saturating_mul(SECTOR);
        if array <= partition::MAX_ARRAY_BYTES && start.saturating_add(array) <= disk.len() as u64 {
            let crc = crc32fast::hash(&disk[start as usize..(start + array) as usize]);
            disk[at + 88..at + 92].copy_from_slice(&crc.to_le_bytes());
        }
        let h = &mut disk[at..at + SECTOR as usize];
        let header_size = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
        if (92..=512).contains(&header_size) {
            h[16..20].fill(0);
            let crc = crc32fast::hash(&h[..header_size]);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
        }
        lba = u64::from_le_bytes(disk[at + 32..at + 40].try_into().unwrap());
    }
}

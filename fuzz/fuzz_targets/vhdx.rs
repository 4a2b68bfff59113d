//! The VHDX driver on arbitrary bytes (headers, regions, metadata, log, BAT): opening, walking
//! and checking the image return errors, never panic or hang. The CRC-32C of both headers and
//! both region tables is made valid first, so that mutations reach the structures behind them
//! (bad checksums are covered by tests).
#![no_main]

use diskkit_formats::Format;
use diskkit_formats::vhdx::{SEALED, seal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut data = data.to_vec();
    for (offset, len) in SEALED {
        let start = offset as usize;
        if let Some(structure) = data.get_mut(start..start + len) {
            seal(structure);
        }
    }
    let f = diskkit_fuzz::image_file(&data);
    let _ = diskkit_formats::vhdx::check(f.path(), None);
    diskkit_fuzz::open_and_walk(&f, Some(Format::Vhdx));
});

//! The VHD parser on arbitrary bytes: opening (footers, dynamic header, BAT, parent locators),
//! walking the map and reading, and `check`, return errors and never panic or hang. Footer and
//! header checksums are made valid first, so mutations reach the structures behind them (bad
//! checksums are covered by tests).
#![no_main]

use diskkit_formats::Format;
use diskkit_formats::vhd;
use diskkit_formats::vhd::layout::{DynamicHeader, FOOTER_SIZE, Footer, HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut data = data.to_vec();
    fix_checksums(&mut data);
    let f = diskkit_fuzz::image_file(&data);
    let _ = vhd::check(f.path(), None);
    diskkit_fuzz::open_and_walk(&f, Some(Format::Vhd));
});

/// Re-encodes the footers at both ends and the dynamic header they point to, which recomputes
/// their checksums.
fn fix_checksums(data: &mut [u8]) {
    let footer_len = FOOTER_SIZE as usize;
    if data.len() < footer_len {
        return;
    }
    let mut header_at = None;
    for at in [0, data.len() - footer_len] {
        let slot = &mut data[at..at + footer_len];
        if Footer::has_cookie(slot) {
            let footer = Footer::parse(slot);
            header_at = Some(footer.data_offset);
            slot.copy_from_slice(&footer.to_bytes());
        }
    }
    let header_len = HEADER_SIZE as usize;
    if let Some(at) = header_at.and_then(|a| usize::try_from(a).ok())
        && let Some(slot) = data.get_mut(at..at.saturating_add(header_len))
        && slot.len() == header_len
        && DynamicHeader::has_cookie(slot)
    {
        let header = DynamicHeader::parse(slot);
        slot.copy_from_slice(&header.to_bytes());
    }
}

//! Format detection and opening with every driver: whatever the bytes, opening and walking the
//! image returns errors, never panics or hangs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskkit_fuzz::open_and_walk(&diskkit_fuzz::image_file(data), None);
});

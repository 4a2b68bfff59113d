//! The VMDK driver on arbitrary bytes (a sparse extent or a descriptor): opening and walking the
//! image returns errors, never panics or hangs.
#![no_main]

use diskkit_formats::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskkit_fuzz::open_and_walk(&diskkit_fuzz::image_file(data), Some(Format::Vmdk));
});

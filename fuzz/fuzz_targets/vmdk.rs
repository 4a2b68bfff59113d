//! The VMDK driver on arbitrary bytes (a sparse extent or a descriptor): opening, walking and
//! checking the image return errors, never panic or hang.
#![no_main]

use diskkit_formats::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let f = diskkit_fuzz::image_file(data);
    let _ = diskkit_formats::check::check(Format::Vmdk, f.path(), None);
    diskkit_fuzz::open_and_walk(&f, Some(Format::Vmdk));
});

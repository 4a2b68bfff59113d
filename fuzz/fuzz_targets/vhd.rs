//! The VHD parser on arbitrary bytes: opening (footers, dynamic header, BAT, parent locators),
//! walking the map and reading, and `check`, return errors and never panic or hang.
#![no_main]

use diskkit_formats::vhd;
use diskkit_formats::{Extents, Format, Image, OpenOptions, open};
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(data).expect("write fuzz input");
    let _ = vhd::check(f.path(), None);
    let opts = OpenOptions {
        format: Some(Format::Vhd),
        ..OpenOptions::default()
    };
    let Ok(image) = open(f.path(), &opts) else {
        return;
    };
    walk(image.as_ref());
});

/// Maps the whole image and reads a bounded, unaligned piece at both ends of every extent (so
/// reads cross sector bitmaps and block boundaries).
fn walk(image: &dyn Image) {
    let _ = image.info();
    let mut buf = vec![0u8; 4099];
    let extents = Extents::new(image, 0, image.virtual_size()).take(10_000);
    for e in extents.map_while(Result::ok) {
        let n = e.length.min(buf.len() as u64);
        let _ = image.read_at(&mut buf[..n as usize], e.start);
        let _ = image.read_at(&mut buf[..n as usize], e.end() - n);
    }
}

//! The VHDX driver on arbitrary bytes (headers, regions, metadata, log, BAT): opening and walking the
//! image returns errors, never panics or hangs.
#![no_main]

use diskkit_formats::{Extents, Format, Image, OpenOptions, open};
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(data).expect("write fuzz input");
    let opts = OpenOptions {
        format: Some(Format::Vhdx),
        ..OpenOptions::default()
    };
    let Ok(image) = open(f.path(), &opts) else {
        return;
    };
    walk(image.as_ref());
});

/// Maps the whole image and reads a bounded amount of every extent.
fn walk(image: &dyn Image) {
    let _ = image.info();
    let mut buf = vec![0u8; 64 << 10];
    for (i, e) in Extents::new(image, 0, image.virtual_size()).enumerate() {
        let Ok(e) = e else { return };
        if i > 10_000 {
            return;
        }
        let n = e.length.min(buf.len() as u64) as usize;
        let _ = image.read_at(&mut buf[..n], e.start);
    }
}

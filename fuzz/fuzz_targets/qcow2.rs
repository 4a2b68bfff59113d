//! qcow2 parsing: any bytes checked or opened as qcow2 (and each internal snapshot view) must
//! give errors, never panics, hangs or huge allocations.
#![no_main]

use diskkit_formats::{Extents, Format, Image, OpenOptions, open};
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(data).expect("write fuzz input");
    // check walks every table, snapshots' included, and the refcount structure.
    let _ = diskkit_formats::qcow2::check(f.path(), None);
    let mut opts = OpenOptions {
        format: Some(Format::Qcow2),
        snapshot: None,
    };
    let Ok(image) = open(f.path(), &opts) else {
        return;
    };
    walk(image.as_ref());
    for s in image.info().snapshots.iter().take(4) {
        opts.snapshot = Some(s.id.clone());
        if let Ok(view) = open(f.path(), &opts) {
            walk(view.as_ref());
        }
    }
});

/// Maps the whole image and reads a bounded amount of every extent, plus one read that spans
/// several extents.
fn walk(image: &dyn Image) {
    let _ = image.info();
    let mut buf = vec![0u8; 256 << 10];
    for (i, e) in Extents::new(image, 0, image.virtual_size()).enumerate() {
        let Ok(e) = e else { return };
        if i > 10_000 {
            return;
        }
        let n = e.length.min(buf.len() as u64) as usize;
        let _ = image.read_at(&mut buf[..n], e.start);
    }
    let n = image.virtual_size().min(buf.len() as u64) as usize;
    let _ = image.read_at(&mut buf[..n], 0);
}

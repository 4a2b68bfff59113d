//! qcow2 parsing: any bytes checked or opened as qcow2 (and each internal snapshot view) must
//! give errors, never panics, hangs or huge allocations.
#![no_main]

use diskkit_formats::{Format, OpenOptions, open};
use diskkit_fuzz::walk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let f = diskkit_fuzz::image_file(data);
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

//! qcow2 in-place edits on hostile images: snapshot create/apply/delete, amend and bitmap
//! changes on any bytes must give errors, never panics, hangs or huge allocations.
#![no_main]

use diskkit_formats::CreateOptions;
use diskkit_formats::qcow2::{amend, bitmap_edit, snapshot_edit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let f = diskkit_fuzz::image_file(data);
    let path = f.path();
    let _ = snapshot_edit::create(path, "fuzz", (0, 0));
    let _ = snapshot_edit::apply(path, "1");
    let _ = bitmap_edit::add(path, "b", None, false);
    let _ = bitmap_edit::change(path, "b", bitmap_edit::BitmapChange::Clear);
    let _ = snapshot_edit::delete(path, "fuzz");
    let mut opts = CreateOptions::default();
    if opts.parse_options("compat=0.10,refcount_bits=16").is_ok() {
        let _ = amend(path, &mut opts);
    }
});

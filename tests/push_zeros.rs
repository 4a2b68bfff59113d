//! push -O vpc and -O qcow2 leave zero data out of the object, as convert does: a raw file
//! whose allocated bytes are mostly zeros uploads only its non-zero clusters (blocks).

mod common;

use common::*;
use std::io::{Seek, SeekFrom, Write};

const MIB: u64 = 1 << 20;

#[test]
fn zeros_inside_allocated_data_are_not_uploaded() {
    let dir = tempdir();
    let d = dir.path();
    // 64 MiB written as zeros (allocated on disk, not holes), 5 MiB of random data at 20 MiB
    // and one byte at 50 MiB + 3.
    let src = d.join("dense.raw");
    let mut f = std::fs::File::create(&src).unwrap();
    let zeros = vec![0u8; MIB as usize];
    for _ in 0..64 {
        f.write_all(&zeros).unwrap();
    }
    f.seek(SeekFrom::Start(20 * MIB)).unwrap();
    f.write_all(&pseudo_random(3, 5 * MIB as usize)).unwrap();
    f.seek(SeekFrom::Start(50 * MIB + 3)).unwrap();
    f.write_all(&[7]).unwrap();
    drop(f);
    let bucket = d.join("bucket");
    std::fs::create_dir(&bucket).unwrap();
    for (fmt, name, most) in [
        // 5 MiB in three 2 MiB blocks, one more for the byte at 50 MiB.
        ("vpc", "dense.vhd", 8 * MIB + MIB / 2),
        // 5 MiB of 64 KiB clusters, one more for the byte, and metadata.
        ("qcow2", "dense.qcow2", 5 * MIB + MIB / 2),
    ] {
        let object = bucket.join(name);
        diskkit_ok(&["push", "-O", fmt, path_str(&src), path_str(&object)]);
        let size = std::fs::metadata(&object).unwrap().len();
        assert!(
            size <= most,
            "{name}: {size} bytes, expected at most {most}"
        );
        if fmt == "qcow2" {
            // qemu-img checks no VHDs.
            qemu_img(&["check", path_str(&object)]);
        }
        qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            fmt,
            path_str(&src),
            path_str(&object),
        ]);
        // The layout is a function of the source: pushed again, the same size (a VHD's
        // footer carries a creation time and a unique id, so not the same bytes).
        let again = bucket.join(format!("again-{name}"));
        diskkit_ok(&["push", "-O", fmt, path_str(&src), path_str(&again)]);
        assert_eq!(std::fs::metadata(&again).unwrap().len(), size, "{name}");
    }
}

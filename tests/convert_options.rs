//! convert --salvage, --target-is-zero and -r, judged against qemu-img's reading of the images.

mod common;
use common::*;
use std::os::unix::fs::FileExt;

const MIB: u64 = 1 << 20;

/// Damages the compressed data of guest cluster 0 of a qcow2 image with 64 KiB clusters (its
/// metadata stays intact: the map still says "compressed").
fn damage_first_compressed_cluster(img: &std::path::Path) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let word = |at: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, at).unwrap();
        u64::from_be_bytes(b)
    };
    let l1 = word(40);
    let l2 = word(l1) & 0x00ff_ffff_ffff_fe00;
    let entry = word(l2);
    assert!(entry & (1 << 62) != 0, "cluster 0 is compressed");
    let host = entry & ((1 << 54) - 1);
    // 0xff starts a deflate block of the reserved type: no decoder accepts it.
    f.write_all_at(&[0xff; 16], host).unwrap();
}

#[test]
fn salvage_writes_unreadable_ranges_as_zeros_and_lists_them() {
    let dir = tempdir();
    let raw = mixed_raw(dir.path(), "src.raw", 8 * MIB);
    let img = p(dir.path(), "c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=64k",
        path_str(&raw),
        path_str(&img),
    ]);
    damage_first_compressed_cluster(&img);
    let out = p(dir.path(), "out.raw");
    let (code, _, err) = diskkit(&["convert", "-O", "raw", path_str(&img), path_str(&out)]);
    assert_eq!(code, 2, "a damaged source fails without --salvage: {err}");
    assert!(!out.exists());

    let (code, _, err) = diskkit(&[
        "convert",
        "--salvage",
        "-O",
        "raw",
        path_str(&img),
        path_str(&out),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("0x0..0x10000") || err.contains("65536 bytes"),
        "{err}"
    );
    assert!(err.contains("salvaged: 65536 bytes in 1 range(s)"), "{err}");
    let mut want = std::fs::read(&raw).unwrap();
    want[..65536].fill(0);
    assert!(std::fs::read(&out).unwrap() == want);
}

#[test]
fn target_is_zero_skips_zero_ranges_and_rate_limit_keeps_content() {
    let dir = tempdir();
    let raw = mixed_raw(dir.path(), "src.raw", 8 * MIB);
    let src = std::fs::read(&raw).unwrap();
    // A target that does not read as zeros shows which ranges were skipped.
    let dst = p(dir.path(), "dst.raw");
    std::fs::write(&dst, vec![0xaa; src.len()]).unwrap();
    diskkit_ok(&[
        "convert",
        "-n",
        "--target-is-zero",
        "-O",
        "raw",
        path_str(&raw),
        path_str(&dst),
    ]);
    let got = std::fs::read(&dst).unwrap();
    let data: Vec<bool> = src.iter().map(|&b| b != 0).collect();
    assert!(got.iter().zip(&src).all(|(g, s)| *s == 0 || g == s));
    assert!(
        got.iter().zip(&data).any(|(&g, &d)| !d && g == 0xaa),
        "zero ranges were written"
    );
    // Without it, the same target gets the zeros.
    diskkit_ok(&["convert", "-n", "-O", "raw", path_str(&raw), path_str(&dst)]);
    assert!(std::fs::read(&dst).unwrap() == src);
    let (code, _, _) = diskkit(&[
        "convert",
        "--target-is-zero",
        path_str(&raw),
        path_str(&p(dir.path(), "x.raw")),
    ]);
    assert_eq!(code, 2, "--target-is-zero needs -n");

    let out = p(dir.path(), "limited.qcow2");
    diskkit_ok(&[
        "convert",
        "-r",
        "64M",
        "-O",
        "qcow2",
        path_str(&raw),
        path_str(&out),
    ]);
    qemu_img(&["compare", path_str(&raw), path_str(&out)]);
}

//! VMDK output (monolithicSparse and streamOptimized) from convert, create and push, with
//! qemu-img as the oracle: every file passes `qemu-img check` and compares identical to its
//! source.

mod common;
use common::*;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

fn convert_vmdk(src: &Path, dst: &Path, options: &str) {
    diskkit_ok(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        options,
        path_str(src),
        path_str(dst),
    ]);
}

/// qemu-img check passes and qemu-img compare finds the guest equal to `src`'s.
fn assert_same(src: &Path, vmdk: &Path) {
    let check = qemu_img(&["check", "-f", "vmdk", path_str(vmdk)]);
    assert!(check.contains("No errors"), "{check}");
    qemu_img(&["compare", "-F", "vmdk", path_str(src), path_str(vmdk)]);
    // diskkit's own reader and check take it too.
    diskkit_ok(&["check", path_str(vmdk)]);
    diskkit_ok(&["compare", path_str(src), path_str(vmdk)]);
}

/// Raw sources: the mixed qemu-io pattern at an odd size spanning two grain tables, an empty
/// disk, and a fully allocated one (incompressible data and text) of a size not a multiple of
/// the grain.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mixed = mixed_raw(dir, "mixed.raw", 40 * MIB + 1000);
    let empty = p(dir, "empty.raw");
    qemu_img(&["create", "-f", "raw", path_str(&empty), "10M"]);
    let full = p(dir, "full.raw");
    let mut content = pseudo_random(7, (2 * MIB) as usize);
    let mut line = 0;
    while content.len() < (3 * MIB + 4096 + 512) as usize {
        content.extend_from_slice(format!("line {line} of a text file\n").as_bytes());
        line += 1;
    }
    content.truncate((3 * MIB + 4096 + 512) as usize);
    std::fs::write(&full, &content).unwrap();
    vec![mixed, empty, full]
}

#[test]
fn convert_writes_both_subformats_that_qemu_reads_back() {
    let dir = tempdir();
    for src in sources(dir.path()) {
        for sub in ["monolithicSparse", "streamOptimized"] {
            let dst = dir.path().join(format!(
                "{}.{sub}.vmdk",
                src.file_stem().unwrap().to_string_lossy()
            ));
            convert_vmdk(&src, &dst, &format!("subformat={sub}"));
            assert_same(&src, &dst);
        }
    }
}

#[test]
fn every_adapter_type_and_hwversion() {
    let dir = tempdir();
    let src = mixed_raw(dir.path(), "src.raw", 8 * MIB);
    for sub in ["monolithicSparse", "streamOptimized"] {
        for adapter in ["ide", "lsilogic", "buslogic", "legacyESX"] {
            let dst = dir.path().join(format!("{sub}-{adapter}.vmdk"));
            convert_vmdk(
                &src,
                &dst,
                &format!("subformat={sub},adapter_type={adapter},hwversion=7"),
            );
            assert_same(&src, &dst);
            let bytes = std::fs::read(&dst).unwrap();
            let text = String::from_utf8_lossy(&bytes[512..512 * 21]);
            assert!(
                text.contains(&format!("ddb.adapterType = \"{adapter}\"")),
                "{text}"
            );
            assert!(text.contains("ddb.virtualHWVersion = \"7\""), "{text}");
        }
    }
}

#[test]
fn stream_optimized_header_is_version_3_with_its_create_type() {
    let dir = tempdir();
    let src = mixed_raw(dir.path(), "src.raw", 8 * MIB);
    let dst = dir.path().join("so.vmdk");
    convert_vmdk(&src, &dst, "subformat=streamOptimized");
    let bytes = std::fs::read(&dst).unwrap();
    assert_eq!(&bytes[..4], b"KDMV");
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
    let text = String::from_utf8_lossy(&bytes[512..512 * 21]);
    assert!(text.contains("createType=\"streamOptimized\""), "{text}");
    assert!(text.contains("RW 16384 SPARSE \"so.vmdk\""), "{text}");
    // End of stream: footer marker, footer, end-of-stream marker (all zeros).
    let n = bytes.len();
    assert!(bytes[n - 512..].iter().all(|&b| b == 0));
    assert_eq!(&bytes[n - 1024..n - 1020], b"KDMV");
    assert_eq!(
        u32::from_le_bytes(bytes[n - 1536 + 12..n - 1536 + 16].try_into().unwrap()),
        3
    );
    let info = qemu_img(&["info", "--output", "json", path_str(&dst)]);
    assert!(
        info.contains("\"create-type\": \"streamOptimized\""),
        "{info}"
    );
    let info = diskkit_ok(&["info", "--output", "json", path_str(&dst)]);
    assert!(info.contains("streamOptimized"), "{info}");
    // monolithicSparse, qemu-img's default subformat, is diskkit's default too.
    let mono = dir.path().join("mono.vmdk");
    diskkit_ok(&["convert", "-O", "vmdk", path_str(&src), path_str(&mono)]);
    let info = qemu_img(&["info", "--output", "json", path_str(&mono)]);
    assert!(
        info.contains("\"create-type\": \"monolithicSparse\""),
        "{info}"
    );
}

#[test]
fn create_makes_empty_vmdks_and_bad_options_are_named() {
    let dir = tempdir();
    for sub in ["monolithicSparse", "streamOptimized"] {
        let img = dir.path().join(format!("{sub}.vmdk"));
        diskkit_ok(&[
            "create",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            path_str(&img),
            "100M",
        ]);
        let check = qemu_img(&["check", path_str(&img)]);
        assert!(check.contains("No errors"), "{check}");
        let info = qemu_img(&["info", "--output", "json", path_str(&img)]);
        assert!(info.contains("\"virtual-size\": 104857600"), "{info}");
    }
    let src = mixed_raw(dir.path(), "src.raw", 8 * MIB);
    for (bad, named) in [
        ("subformat=twoGbMaxExtentFlat", "subformat"),
        ("adapter_type=nvme", "adapter_type"),
        ("hwversion=new", "hwversion"),
        ("compat6=on", "compat6"),
    ] {
        let dst = dir.path().join("bad.vmdk");
        let (code, _, err) = diskkit(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            bad,
            path_str(&src),
            path_str(&dst),
        ]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains(named), "{bad}: {err}");
        assert!(!dst.exists());
    }
}

#[test]
fn measure_covers_what_convert_writes() {
    let dir = tempdir();
    let src = mixed_raw(dir.path(), "src.raw", 40 * MIB);
    for sub in ["monolithicSparse", "streamOptimized"] {
        let out = diskkit_ok(&[
            "measure",
            "--output",
            "json",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            path_str(&src),
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let required = v["required"].as_u64().unwrap();
        let dst = dir.path().join(format!("{sub}.vmdk"));
        convert_vmdk(&src, &dst, &format!("subformat={sub}"));
        let written = std::fs::metadata(&dst).unwrap().len();
        assert!(written <= required, "{sub}: {written} > {required}");
        assert!(v["fully-allocated"].as_u64().unwrap() >= 40 * MIB);
    }
}

#[test]
fn push_streams_the_same_file_convert_writes() {
    let dir = tempdir();
    let bucket = dir.path().join("bucket");
    std::fs::create_dir(&bucket).unwrap();
    let src = mixed_raw(dir.path(), "src.raw", 40 * MIB + 1000);
    let url = format!("{}/src.vmdk", bucket.display());
    let env = s3::Env {
        cache: dir.path().join("cache"),
        endpoint: None,
    };
    env.ok(&[
        "push",
        "--part-size",
        "5M",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        path_str(&src),
        &url,
    ]);
    let object = bucket.join("src.vmdk");
    assert_same(&src, &object);
    // convert writes the same bytes (the descriptor names src.vmdk in both).
    let file = dir.path().join("src.vmdk");
    convert_vmdk(&src, &file, "subformat=streamOptimized");
    assert!(std::fs::read(&object).unwrap() == std::fs::read(&file).unwrap());
}

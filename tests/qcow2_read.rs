//! qcow2 reading: every variant qemu 10 writes, checked byte for byte against qemu's own view,
//! plus damaged images that must fail cleanly.

mod common;
use common::*;
use diskkit::formats::{Image, ImplicitOpens, OpenOptions, open, open_with};
use serde_json::Value;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn lib_open(img: &Path, snapshot: Option<&str>) -> Box<dyn Image> {
    open(
        img,
        &OpenOptions {
            format: None,
            snapshot: snapshot.map(str::to_string),
        },
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", img.display()))
}

/// Reads the whole guest view through the library in unaligned chunks.
fn lib_bytes(image: &dyn Image) -> Vec<u8> {
    let size = image.virtual_size() as usize;
    let mut out = vec![0u8; size];
    let mut pos = 0;
    let mut chunk = 777_777;
    while pos < size {
        let n = chunk.min(size - pos);
        image.read_at(&mut out[pos..pos + n], pos as u64).unwrap();
        pos += n;
        chunk = chunk * 3 % 1_500_007 + 1;
    }
    out
}

/// (start, end, zero) triples from a `map --output json` listing (diskkit's or qemu's).
fn zero_ranges(json: &str) -> Vec<(u64, u64, bool)> {
    let v: Vec<Value> = serde_json::from_str(json).unwrap();
    v.iter()
        .map(|e| {
            let s = e["start"].as_u64().unwrap();
            (s, s + e["length"].as_u64().unwrap(), e["zero"] == true)
        })
        .collect()
}

fn zero_at(ranges: &[(u64, u64, bool)], pos: u64) -> bool {
    ranges
        .iter()
        .find(|r| r.0 <= pos && pos < r.1)
        .unwrap_or_else(|| panic!("offset {pos} not mapped"))
        .2
}

/// diskkit's guest view, map and info agree with qemu's.
fn assert_matches_qemu(img: &Path, dir: &Path) {
    let guest = qemu_guest_bytes(img, dir);
    let image = lib_open(img, None);
    assert_eq!(image.virtual_size(), guest.len() as u64);
    assert!(
        lib_bytes(image.as_ref()) == guest,
        "{} content",
        img.display()
    );

    let copy = dir.join("qemu-copy.raw");
    std::fs::write(&copy, &guest).unwrap();
    let (code, out, err) = diskkit(&["compare", "-F", "raw", path_str(img), path_str(&copy)]);
    assert_eq!(code, 0, "{out}{err}");

    let ours = zero_ranges(&diskkit_ok(&["map", "--output", "json", path_str(img)]));
    let theirs = zero_ranges(&qemu_img(&["map", "--output=json", path_str(img)]));
    let mut bounds: Vec<u64> = ours.iter().chain(&theirs).map(|r| r.0).collect();
    bounds.sort_unstable();
    bounds.dedup();
    for b in bounds.into_iter().filter(|&b| b < guest.len() as u64) {
        assert_eq!(
            zero_at(&ours, b),
            zero_at(&theirs, b),
            "{}: zero flag at {b}\nours {ours:?}\nqemu {theirs:?}",
            img.display()
        );
    }

    let ours: Value =
        serde_json::from_str(&diskkit_ok(&["info", "--output", "json", path_str(img)])).unwrap();
    let theirs: Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", path_str(img)])).unwrap();
    for key in [
        "virtual-size",
        "format",
        "backing-filename",
        "cluster-size",
        "backing-filename-format",
        "dirty-flag",
    ] {
        assert_eq!(ours[key], theirs[key], "{}: info {key}", img.display());
    }
    assert_eq!(
        ours["format-specific"],
        theirs["format-specific"],
        "{}",
        img.display()
    );
}

fn create(img: &Path, opts: &str, size: u64) {
    let mut args = vec!["create", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let size = size.to_string();
    args.extend([path_str(img), size.as_str()]);
    qemu_img(&args);
}

#[test]
fn versions_cluster_sizes_and_refcount_widths() {
    let dir = tempdir();
    let size = 8 * MIB;
    for (i, opts) in [
        "compat=0.10,cluster_size=512",
        "compat=1.1,cluster_size=4096,refcount_bits=1",
        "cluster_size=65536,refcount_bits=64",
        "cluster_size=2M",
        "compat=0.10,cluster_size=2M",
    ]
    .iter()
    .enumerate()
    {
        let img = p(dir.path(), &format!("v{i}.qcow2"));
        create(&img, opts, size);
        qemu_io("qcow2", &img, &as_refs(&mixed_pattern(size)));
        assert_matches_qemu(&img, dir.path());
    }
}

#[test]
fn compressed_zlib_and_zstd() {
    let dir = tempdir();
    let src = p(dir.path(), "src.raw");
    qemu_img(&["create", "-f", "raw", path_str(&src), "6M"]);
    qemu_io(
        "raw",
        &src,
        &[
            "write -P 0x61 0 1M",
            "write -P 0x62 1200k 333k",
            // Incompressible-ish data stays uncompressed: qemu then stores it plainly.
            "write -s /proc/self/exe 3M 64k",
            "write -P 0x63 5M 1M",
        ],
    );
    for (i, opts) in [
        "compression_type=zlib",
        "compression_type=zstd",
        "compression_type=zlib,cluster_size=512",
        "compression_type=zstd,cluster_size=2M",
        "compat=0.10,cluster_size=4096",
    ]
    .iter()
    .enumerate()
    {
        let img = p(dir.path(), &format!("c{i}.qcow2"));
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            opts,
            path_str(&src),
            path_str(&img),
        ]);
        assert_matches_qemu(&img, dir.path());
    }
    // Compressed clusters written by qemu-io (no final padding of the file).
    let img = p(dir.path(), "io.qcow2");
    create(&img, "cluster_size=4096,compression_type=zstd", 4 * MIB);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -c -P 0x71 0 64k",
            "write -c -P 0x72 1M 4k",
            "write -c -P 0x73 4092k 4k",
        ],
    );
    assert_matches_qemu(&img, dir.path());
}

#[test]
fn extended_l2_subclusters_over_a_backing_file() {
    let dir = tempdir();
    let base = p(dir.path(), "base.qcow2");
    create(&base, "", 4 * MIB);
    qemu_io("qcow2", &base, &["write -P 0xbb 0 4M"]);
    let img = p(dir.path(), "ext.qcow2");
    create(
        &img,
        "extended_l2=on,cluster_size=64k,backing_file=base.qcow2,backing_fmt=qcow2",
        4 * MIB,
    );
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0x55 4k 2k",
            "write -z 10k 4k",
            "write -P 0x56 62k 4k",
            "write -z 1M 64k",
            "write -P 0x57 2M 128k",
            "write -z 3M 6k",
        ],
    );
    assert_matches_qemu(&img, dir.path());
    // Without a backing file, unallocated subclusters read as zeros.
    let solo = p(dir.path(), "ext-solo.qcow2");
    create(&solo, "extended_l2=on,cluster_size=32k", 4 * MIB);
    qemu_io("qcow2", &solo, &["write -P 0x58 1k 1k", "write -z 5k 3k"]);
    assert_matches_qemu(&solo, dir.path());
}

#[test]
fn external_data_files() {
    let dir = tempdir();
    for (i, raw) in ["off", "on"].iter().enumerate() {
        let img = p(dir.path(), &format!("ext{i}.qcow2"));
        // qemu creates (and opens) relative data file names from its working directory.
        let data = p(dir.path(), &format!("ext{i}.data"));
        create(
            &img,
            &format!("data_file={},data_file_raw={raw}", path_str(&data)),
            8 * MIB,
        );
        qemu_io("qcow2", &img, &as_refs(&mixed_pattern(8 * MIB)));
        assert_matches_qemu(&img, dir.path());
        let info = diskkit_ok(&["info", "--output", "json", path_str(&img)]);
        assert!(info.contains(&format!("ext{i}.data")), "{info}");
    }
}

#[test]
fn backing_chain_relative_absolute_raw_and_short_backing() {
    let dir = tempdir();
    let base = p(dir.path(), "base.raw");
    qemu_img(&["create", "-f", "raw", path_str(&base), "4M"]);
    // A raw backing that starts with the qcow2 magic must not be probed as qcow2.
    qemu_io("raw", &base, &["write -P 0x11 0 1M", "write -P 0x12 3M 1M"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"QFI\xfb", 0))
        .unwrap();
    let sub = p(dir.path(), "sub");
    std::fs::create_dir(&sub).unwrap();
    let mid = sub.join("mid.qcow2");
    // Relative to mid's own folder.
    create(&mid, "backing_file=../base.raw,backing_fmt=raw", 6 * MIB);
    qemu_io(
        "qcow2",
        &mid,
        &["write -P 0x21 512k 1M", "write -z 3584k 64k"],
    );
    let top = p(dir.path(), "top.qcow2");
    let mid_abs = mid.to_str().unwrap().to_string();
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        &mid_abs,
        "-F",
        "qcow2",
        path_str(&top),
        "8M",
    ]);
    qemu_io("qcow2", &top, &["write -P 0x31 1M 64k", "write -z 3M 128k"]);
    assert_matches_qemu(&top, dir.path());
    assert_matches_qemu(&mid, dir.path());

    let chain: Vec<Value> = serde_json::from_str(&diskkit_ok(&[
        "info",
        "--backing-chain",
        "--output",
        "json",
        path_str(&top),
    ]))
    .unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[0]["backing-filename-format"], "qcow2");
    assert_eq!(chain[1]["backing-filename"], "../base.raw");
    assert_eq!(chain[2]["format"], "raw");
}

#[test]
fn backing_cycle_is_refused() {
    let dir = tempdir();
    let img = p(dir.path(), "loop.qcow2");
    create(&img, "", MIB);
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "loop.qcow2",
        "-F",
        "qcow2",
        path_str(&img),
    ]);
    let (code, _, err) = diskkit(&["info", path_str(&img)]);
    assert_eq!(code, 2);
    assert!(err.contains("loops"), "{err}");
}

#[test]
fn internal_snapshots_are_listed_and_viewable() {
    let dir = tempdir();
    let img = p(dir.path(), "snap.qcow2");
    create(&img, "cluster_size=4096", 4 * MIB);
    qemu_io("qcow2", &img, &["write -P 0x41 0 1M"]);
    qemu_img(&["snapshot", "-c", "first", path_str(&img)]);
    qemu_io("qcow2", &img, &["write -P 0x42 512k 1M", "write -z 0 4k"]);
    qemu_img(&["snapshot", "-c", "second", path_str(&img)]);
    qemu_io("qcow2", &img, &["write -P 0x43 3M 4k"]);
    let before = std::fs::read(&img).unwrap();

    assert_matches_qemu(&img, dir.path());
    for (key, name) in [("first", "first"), ("2", "second")] {
        let view = lib_open(&img, Some(key));
        assert!(
            lib_bytes(view.as_ref()) == snapshot_bytes(&img, name),
            "{key}"
        );
        diskkit_ok(&["map", "-l", key, path_str(&img)]);
    }
    let (code, _, err) = diskkit(&["info", "-l", "nosuch", path_str(&img)]);
    assert_eq!(code, 2, "{err}");

    let ours: Value =
        serde_json::from_str(&diskkit_ok(&["info", "--output", "json", path_str(&img)])).unwrap();
    let theirs: Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", path_str(&img)])).unwrap();
    // diskkit also shows each snapshot's recorded disk size.
    let mut ours = ours["snapshots"].clone();
    for s in ours.as_array_mut().unwrap() {
        assert_eq!(s["virtual-size"], 4 * MIB);
        s.as_object_mut().unwrap().remove("virtual-size");
    }
    assert_eq!(ours, theirs["snapshots"]);
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "reading must not modify"
    );
}

fn patch(img: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, offset).unwrap();
}

fn read_be64(img: &Path, offset: u64) -> u64 {
    let data = std::fs::read(img).unwrap();
    u64::from_be_bytes(
        data[offset as usize..offset as usize + 8]
            .try_into()
            .unwrap(),
    )
}

#[test]
fn feature_bits_dirty_corrupt_and_unknown() {
    let dir = tempdir();
    for (bit, expect) in [(0u64, "dirty"), (1, "corrupt")] {
        let img = p(dir.path(), &format!("bit{bit}.qcow2"));
        create(&img, "lazy_refcounts=on", 2 * MIB);
        qemu_io("qcow2", &img, &["write -P 0x61 0 100k"]);
        patch(&img, 72, &(1u64 << bit).to_be_bytes());
        let guest = lib_bytes(lib_open(&img, None).as_ref());
        assert!(guest[..100 << 10].iter().all(|&b| b == 0x61));
        let (code, out, err) = diskkit(&["info", "--output", "json", path_str(&img)]);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains(expect), "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["dirty-flag"], bit == 0);
        assert_eq!(v["format-specific"]["data"]["corrupt"], bit == 1);
    }
    let img = p(dir.path(), "unknown.qcow2");
    create(&img, "", MIB);
    patch(&img, 72, &(1u64 << 9).to_be_bytes());
    let (code, _, err) = diskkit(&["info", path_str(&img)]);
    assert_eq!(code, 2);
    assert!(err.contains("bit(s) 9"), "{err}");
}

/// A way to damage a copy of a good image.
type Damage<'a> = Box<dyn Fn(&Path) + 'a>;

#[test]
fn damaged_images_fail_cleanly() {
    let dir = tempdir();
    let good = p(dir.path(), "good.qcow2");
    create(&good, "cluster_size=4096", 4 * MIB);
    qemu_io("qcow2", &good, &["write -P 0x61 0 2M"]);
    let good_bytes = std::fs::read(&good).unwrap();
    let l1 = read_be64(&good, 40);
    let l2 = read_be64(&good, l1) & 0x00ff_ffff_ffff_fe00;

    let cases: Vec<(&str, Damage)> = vec![
        (
            "truncated",
            Box::new(|f: &Path| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(f)
                    .unwrap()
                    .set_len(l2 + 100)
                    .unwrap()
            }),
        ),
        (
            "header only",
            Box::new(|f: &Path| std::fs::write(f, &good_bytes[..50]).unwrap()),
        ),
        (
            "L1 past end",
            Box::new(move |f: &Path| patch(f, l1, &(1u64 << 40).to_be_bytes())),
        ),
        (
            "L1 unaligned",
            Box::new(move |f: &Path| patch(f, l1, &(l2 + 512).to_be_bytes())),
        ),
        (
            "L2 unaligned",
            Box::new(move |f: &Path| patch(f, l2, &((1u64 << 63) | 0x10200).to_be_bytes())),
        ),
        (
            "L1 table offset",
            Box::new(|f: &Path| patch(f, 40, &(1u64 << 50).to_be_bytes())),
        ),
        (
            "L1 size",
            Box::new(|f: &Path| patch(f, 36, &u32::MAX.to_be_bytes())),
        ),
        (
            "compressed garbage",
            Box::new(move |f: &Path| {
                patch(
                    f,
                    l2,
                    &((1u64 << 62) | (1u64 << 58) | (l2 + 8)).to_be_bytes(),
                )
            }),
        ),
    ];
    for (name, damage) in cases {
        let img = p(dir.path(), "bad.qcow2");
        std::fs::write(&img, &good_bytes).unwrap();
        damage(&img);
        let (code, _, err) = diskkit(&["compare", path_str(&img), path_str(&good)]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(err.contains("bad.qcow2"), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
}

/// A backing file is opened under the caller's policy for files that image metadata names.
#[test]
fn backing_file_outside_the_directory_follows_the_policy() {
    let dir = tempdir();
    let (base_dir, top_dir) = (dir.path().join("base"), dir.path().join("top"));
    std::fs::create_dir(&base_dir).unwrap();
    std::fs::create_dir(&top_dir).unwrap();
    let base = base_dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), "1M"]);
    qemu_io("qcow2", &base, &["write -P 0x5a 0 64k"]);
    let top = top_dir.join("top.qcow2");
    let top_on = |backing: &str| {
        let args = ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing];
        qemu_img(&[&args[..], &[path_str(&top)]].concat());
    };
    top_on("../base/base.qcow2");
    let open_as = |policy| open_with(&top, &OpenOptions::default(), policy);

    let image = open_as(ImplicitOpens::Allow).unwrap();
    assert!(
        image.info().warnings.is_empty(),
        "{:?}",
        image.info().warnings
    );
    assert_eq!(lib_bytes(image.as_ref())[..65536], [0x5a; 65536]);

    // The default (the CLI's): opened, with a warning that `info` shows.
    let warnings = open(&top, &OpenOptions::default()).unwrap().info().warnings;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("base.qcow2") && warnings[0].contains("outside"));
    let info: Value =
        serde_json::from_str(&diskkit_ok(&["info", "--output", "json", path_str(&top)])).unwrap();
    assert_eq!(info["warnings"][0].as_str(), Some(warnings[0].as_str()));

    let err = open_as(ImplicitOpens::RefuseOutsideDir)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("top.qcow2") && err.contains("base.qcow2") && err.contains("outside"),
        "{err}"
    );
    let err = open_as(ImplicitOpens::Refuse).err().unwrap().to_string();
    assert!(err.contains("must not name other files"), "{err}");

    // A symbolic link beside the image that leads out of the directory is outside too.
    std::os::unix::fs::symlink(&base, top_dir.join("link.qcow2")).unwrap();
    top_on("link.qcow2");
    assert!(open_as(ImplicitOpens::RefuseOutsideDir).is_err());
    // A backing file in the image's directory passes all but the strictest policy.
    std::fs::rename(&base, top_dir.join("beside.qcow2")).unwrap();
    top_on("beside.qcow2");
    let image = open_as(ImplicitOpens::RefuseOutsideDir).unwrap();
    assert!(
        image.info().warnings.is_empty(),
        "{:?}",
        image.info().warnings
    );
    assert!(open_as(ImplicitOpens::Refuse).is_err());
}

/// The JSON report of `check` by qemu-img and by diskkit, with their exit codes.
fn both_checks(img: &Path) -> ((i32, Value), (i32, Value)) {
    let qemu = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", path_str(img)])
        .output()
        .unwrap();
    let (code, out, err) = diskkit(&["check", "--output", "json", path_str(img)]);
    let ours = serde_json::from_str(&out).unwrap_or(Value::String(err));
    (
        (
            qemu.status.code().unwrap(),
            serde_json::from_slice(&qemu.stdout).unwrap_or(Value::Null),
        ),
        (code, ours),
    )
}

/// `check` refuses what `open` refuses, and counts each damaged entry once, as qemu-img does.
#[test]
fn check_of_damaged_images_agrees_with_qemu() {
    let dir = tempdir();
    let img = p(dir.path(), "cut.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&img), "64M"]);
    qemu_io("qcow2", &img, &["write -P 0x11 0 40M"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    let ((qemu_code, qemu), (code, ours)) = both_checks(&img);
    assert_eq!(code, qemu_code, "{ours}");
    assert!(qemu["corruptions"].as_u64().unwrap() > 100, "{qemu}");
    assert_eq!(ours["corruptions"], qemu["corruptions"], "{ours}");

    // A virtual size of 2^64 - 1: info refuses it, and so does check, naming the L1 table.
    let huge = p(dir.path(), "huge.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&huge), "1M"]);
    patch(&huge, 24, &u64::MAX.to_be_bytes());
    let ((qemu_code, _), (code, ours)) = both_checks(&huge);
    assert_ne!(qemu_code, 0);
    assert_ne!(code, 0);
    assert!(ours.as_str().unwrap().contains("L1 table"), "{ours}");
    assert_ne!(diskkit(&["info", path_str(&huge)]).0, 0);
}

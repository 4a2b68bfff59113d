//! qcow2 writing, measure, check and resize, judged by qemu-img (check clean, compare identical,
//! measure figures).

mod common;
use common::*;
use diskkit::formats::image::{GuestRange, allocated_ranges};
use diskkit::formats::qcow2::{Qcow2Writer, measure};
use diskkit::formats::{CreateOptions, Extents, Format, Image, ImageWriter, OpenOptions, open};
use std::path::Path;

const MIB: u64 = 1 << 20;

fn lib_open(img: &Path) -> Box<dyn Image> {
    open(img, &OpenOptions::default()).unwrap()
}

fn create_opts(spec: &str, compress: bool, backing: Option<(&str, Format)>) -> CreateOptions {
    let mut o = CreateOptions {
        compress,
        backing_file: backing.map(|b| b.0.to_string()),
        backing_format: backing.map(|b| b.1),
        ..Default::default()
    };
    o.parse_options(spec).unwrap();
    o
}

/// Copies the guest view of `src` into a new qcow2 at `out` the way the convert engine does:
/// unaligned chunks of at most 1 MiB from several threads, zero ranges via write_zeroes when the
/// new image does not already read as zeros.
fn copy_into(src: &Path, out: &Path, mut opts: CreateOptions) {
    let image = lib_open(src);
    copy_with(
        image.as_ref(),
        Qcow2Writer::create(out, image.virtual_size(), &mut opts).unwrap(),
    );
}

fn copy_with(image: &dyn Image, writer: Qcow2Writer) {
    let mut jobs = Vec::new();
    for e in Extents::new(image, 0, image.virtual_size()) {
        let e = e.unwrap();
        let mut pos = e.start;
        while pos < e.end() {
            let n = (e.end() - pos).min(MIB - 4096 * 3);
            jobs.push((pos, n, e.is_zero()));
            pos += n;
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                let mut buf = vec![0u8; MIB as usize];
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(pos, n, zero)) = jobs.get(i) else {
                        return;
                    };
                    if zero {
                        if !writer.zero_initialized() {
                            writer.write_zeroes(pos, n).unwrap();
                        }
                    } else {
                        let b = &mut buf[..n as usize];
                        image.read_at(b, pos).unwrap();
                        writer.write_at(b, pos).unwrap();
                    }
                }
            });
        }
    });
    Box::new(writer).finish().unwrap();
}

fn assert_clean_and_equal(src: &Path, out: &Path) {
    let check = qemu_img(&["check", path_str(out)]);
    assert!(check.contains("No errors"), "{}: {check}", out.display());
    let ours = diskkit::formats::qcow2::check(out, None).unwrap();
    assert_eq!(ours.exit_code(), 0, "{}: {ours:?}", out.display());
    qemu_img(&["compare", path_str(src), path_str(out)]);
}

/// An 8 MiB + 1.5 KiB raw source: patterned, zero and incompressible ranges, an unaligned end.
fn source(dir: &Path) -> std::path::PathBuf {
    let src = p(dir, "src.raw");
    let size = 8 * MIB + 1536;
    qemu_img(&["create", "-f", "raw", path_str(&src), &size.to_string()]);
    let mut cmds = mixed_pattern(8 * MIB);
    cmds.push("write -s /proc/self/exe 6M 200k".into());
    cmds.push(format!("write -P 0x66 {} 1536", 8 * MIB));
    qemu_io("raw", &src, &as_refs(&cmds));
    src
}

#[test]
fn writes_images_qemu_reads_and_checks_clean() {
    let dir = tempdir();
    let src = source(dir.path());
    for (i, (spec, compress)) in [
        ("", false),
        ("compat=0.10", false),
        ("cluster_size=512", false),
        ("cluster_size=2M", false),
        ("cluster_size=4k,refcount_bits=1", false),
        ("refcount_bits=64,lazy_refcounts=on", false),
        ("extended_l2=on,cluster_size=32k", false),
        ("preallocation=metadata", false),
        ("compression_type=zlib", true),
        ("compression_type=zstd,cluster_size=4k", true),
        ("compat=0.10,cluster_size=512", true),
    ]
    .into_iter()
    .enumerate()
    {
        let out = p(dir.path(), &format!("out{i}.qcow2"));
        copy_into(&src, &out, create_opts(spec, compress, None));
        assert_clean_and_equal(&src, &out);
        let info = qemu_img(&["info", "--output=json", path_str(&out)]);
        if compress {
            let map = qemu_img(&["map", "--output=json", path_str(&out)]);
            assert!(map.contains("\"compressed\": true"), "{spec}: {map}");
            let kind = if spec.contains("zstd") {
                "zstd"
            } else {
                "zlib"
            };
            assert!(info.contains(kind), "{info}");
        }
        if spec.contains("0.10") {
            assert!(info.contains("\"compat\": \"0.10\""), "{info}");
        }
    }
}

#[test]
fn writes_overlays_with_zero_clusters_over_backing_data() {
    let dir = tempdir();
    let base = p(dir.path(), "base.qcow2");
    qemu_img(&["create", "-f", "qcow2", path_str(&base), "4M"]);
    qemu_io("qcow2", &base, &["write -P 0x11 0 4M"]);
    // The source: base's content with some ranges rewritten and some zeroed.
    let top = p(dir.path(), "top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        path_str(&top),
        "4M",
    ]);
    qemu_io("qcow2", &top, &["write -P 0x22 1M 64k", "write -z 2M 192k"]);
    for (i, spec) in ["", "compat=0.10"].into_iter().enumerate() {
        let out = p(dir.path(), &format!("ov{i}.qcow2"));
        copy_into(
            &top,
            &out,
            create_opts(spec, false, Some(("base.qcow2", Format::Qcow2))),
        );
        assert_clean_and_equal(&top, &out);
        let info = qemu_img(&["info", "--output=json", path_str(&out)]);
        assert!(
            info.contains("\"backing-filename\": \"base.qcow2\""),
            "{info}"
        );
        assert!(
            info.contains("\"backing-filename-format\": \"qcow2\""),
            "{info}"
        );
    }
}

#[test]
fn writes_into_existing_empty_images() {
    let dir = tempdir();
    let src = source(dir.path());
    let image = lib_open(&src);
    let size = image.virtual_size().to_string();
    for (i, opts) in ["cluster_size=4k", "compat=0.10,cluster_size=2M"]
        .into_iter()
        .enumerate()
    {
        let out = p(dir.path(), &format!("n{i}.qcow2"));
        qemu_img(&["create", "-f", "qcow2", "-o", opts, path_str(&out), &size]);
        copy_with(image.as_ref(), Qcow2Writer::open_existing(&out).unwrap());
        assert_clean_and_equal(&src, &out);
        // Now it holds data: refused.
        assert!(Qcow2Writer::open_existing(&out).is_err());
    }
}

#[test]
fn convert_cli_writes_qcow2() {
    let dir = tempdir();
    let src = source(dir.path());
    let out = p(dir.path(), "cli.qcow2");
    diskkit_ok(&[
        "convert",
        "-O",
        "qcow2",
        "-c",
        "-o",
        "compression_type=zstd,cluster_size=16k",
        path_str(&src),
        path_str(&out),
    ]);
    assert_clean_and_equal(&src, &out);
    let overlay = p(dir.path(), "overlay.qcow2");
    diskkit_ok(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "src.raw",
        "-F",
        "raw",
        path_str(&out),
        path_str(&overlay),
    ]);
    assert_clean_and_equal(&src, &overlay);
    let measured = diskkit_ok(&["measure", "-O", "qcow2", path_str(&src)]);
    assert_eq!(
        measured,
        qemu_img(&["measure", "-O", "qcow2", path_str(&src)])
    );
}

/// qemu sees qcow2 guests in whole sectors: an odd-sized source becomes an image rounded up to
/// 512 bytes (as `qemu-img convert` makes it), whose extra bytes read as zeros.
#[test]
fn odd_sized_sources_round_up_to_sectors() {
    let dir = tempdir();
    let src = p(dir.path(), "odd.raw");
    let content: Vec<u8> = (0..1000u32).map(|i| (i % 251 + 1) as u8).collect();
    std::fs::write(&src, &content).unwrap();
    let ours = p(dir.path(), "ours.qcow2");
    diskkit_ok(&["convert", "-O", "qcow2", path_str(&src), path_str(&ours)]);
    let theirs = p(dir.path(), "theirs.qcow2");
    qemu_img(&["convert", "-O", "qcow2", path_str(&src), path_str(&theirs)]);
    for img in [&ours, &theirs] {
        let info = qemu_img(&["info", "--output=json", path_str(img)]);
        assert!(info.contains("\"virtual-size\": 1024"), "{info}");
        assert_eq!(lib_open(img).virtual_size(), 1024);
        qemu_img(&["compare", path_str(&src), path_str(img)]);
        diskkit_ok(&["compare", path_str(&src), path_str(img)]);
    }
    let created = p(dir.path(), "created.qcow2");
    diskkit_ok(&["create", "-f", "qcow2", path_str(&created), "1000"]);
    assert_eq!(lib_open(&created).virtual_size(), 1024);
    diskkit_ok(&["resize", path_str(&created), "1500"]);
    assert_eq!(lib_open(&created).virtual_size(), 1536);
}

#[test]
fn refuses_bad_options() {
    let dir = tempdir();
    let out = p(dir.path(), "x.qcow2");
    for spec in [
        "compat=0.10,compression_type=zstd",
        "cluster_size=1000",
        "extended_l2=on,cluster_size=4k",
        "bogus=1",
        "preallocation=full",
    ] {
        let mut o = create_opts(spec, false, None);
        assert!(Qcow2Writer::create(&out, MIB, &mut o).is_err(), "{spec}");
    }
}

#[test]
fn measure_agrees_with_qemu() {
    let dir = tempdir();
    let src = source(dir.path());
    let image = lib_open(&src);
    for spec in [
        "",
        "cluster_size=512",
        "cluster_size=2M,refcount_bits=64",
        "extended_l2=on",
    ] {
        let size = image.virtual_size();
        let mut allocated = allocated_ranges(image.as_ref(), GuestRange::new(0, size));
        let ours = measure(
            image.virtual_size(),
            &mut create_opts(spec, false, None),
            &mut allocated,
        )
        .unwrap();
        let mut args = vec!["measure", "--output=json", "-O", "qcow2"];
        if !spec.is_empty() {
            args.extend(["-o", spec]);
        }
        args.push(path_str(&src));
        let theirs: serde_json::Value = serde_json::from_str(&qemu_img(&args)).unwrap();
        assert_eq!(ours.fully_allocated, theirs["fully-allocated"], "{spec}");
        let required = theirs["required"].as_u64().unwrap();
        let slack = 2 * (1u64 << 16).max(if spec.contains("2M") { 2 * MIB } else { 0 });
        assert!(
            ours.required.abs_diff(required) <= slack,
            "{spec}: ours {} qemu {required}",
            ours.required
        );
    }
}

/// `qemu-img check --output=json`, whatever its exit code (it is non-zero for leaks).
fn qemu_check(img: &Path) -> serde_json::Value {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", path_str(img)])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn be64_at(img: &Path, offset: u64) -> u64 {
    let f = std::fs::File::open(img).unwrap();
    let mut b = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

fn patch(img: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, offset).unwrap();
}

/// File offset of the 16-bit refcount of host cluster `cluster` (first refcount block).
fn refcount_slot(img: &Path, cluster: u64) -> u64 {
    let table = be64_at(img, 48);
    be64_at(img, table) + cluster * 2
}

fn assert_same_counts(img: &Path, ours: &diskkit::formats::CheckReport) {
    let theirs = qemu_check(img);
    let n = |k: &str| theirs[k].as_u64().unwrap_or(0);
    assert_eq!(
        ours.corruptions,
        n("corruptions"),
        "{}: {ours:?} {theirs}",
        img.display()
    );
    assert_eq!(
        ours.leaks,
        n("leaks"),
        "{}: {ours:?} {theirs}",
        img.display()
    );
}

#[test]
fn check_agrees_with_qemu_and_repairs() {
    use diskkit::formats::Repair;
    use diskkit::formats::qcow2::check;
    let dir = tempdir();
    let mut clean = Vec::new();
    for (i, opts) in [
        "cluster_size=65536",
        "compat=0.10,cluster_size=512",
        "refcount_bits=1,cluster_size=4k",
        "extended_l2=on",
    ]
    .into_iter()
    .enumerate()
    {
        clean.push(qcow2_fixture(dir.path(), &format!("c{i}.qcow2"), opts));
    }
    // Snapshots, compressed clusters and zeroed allocated clusters in one image.
    qemu_img(&["snapshot", "-c", "s1", path_str(&clean[0])]);
    qemu_io(
        "qcow2",
        &clean[0],
        &[
            "write -P 0x77 0 128k",
            "write -c -P 0x78 5M 128k",
            "write -z 3M 64k",
        ],
    );
    for img in &clean {
        let ours = check(img, None).unwrap();
        assert_eq!(
            (ours.corruptions, ours.leaks),
            (0, 0),
            "{}: {ours:?}",
            img.display()
        );
        let theirs = qemu_check(img);
        assert_eq!(
            ours.allocated_clusters,
            theirs["allocated-clusters"].as_u64()
        );
        assert_eq!(
            ours.compressed_clusters.unwrap_or(0),
            theirs["compressed-clusters"].as_u64().unwrap_or(0)
        );
        assert_eq!(ours.image_end_offset, theirs["image-end-offset"].as_u64());
        assert_eq!(
            ours.fragmented_clusters.unwrap_or(0),
            theirs["fragmented-clusters"].as_u64().unwrap_or(0)
        );
        assert_eq!(ours.exit_code(), 0);
        assert_eq!(
            diskkit_ok(&["check", path_str(img)]),
            qemu_img(&["check", path_str(img)])
        );
    }

    // A leak: one more cluster at the end of the file with refcount 1.
    let img = p(dir.path(), "leak.qcow2");
    std::fs::copy(&clean[0], &img).unwrap();
    let end = std::fs::metadata(&img).unwrap().len().div_ceil(65536);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len((end + 1) * 65536)
        .unwrap();
    patch(&img, refcount_slot(&img, end), &1u16.to_be_bytes());
    let ours = check(&img, None).unwrap();
    assert_eq!(ours.leaks, 1);
    assert_eq!(ours.exit_code(), 3);
    assert_same_counts(&img, &ours);
    let fixed = check(&img, Some(Repair::Leaks)).unwrap();
    assert_eq!((fixed.leaks_fixed, fixed.exit_code()), (1, 0), "{fixed:?}");
    assert!(qemu_img(&["check", path_str(&img)]).contains("No errors"));

    // A corruption: the first data cluster's refcount zeroed (also breaks its COPIED flag).
    let img = p(dir.path(), "corrupt.qcow2");
    std::fs::copy(&clean[3], &img).unwrap();
    let l2 = be64_at(&img, be64_at(&img, 40)) & 0x00ff_ffff_ffff_fe00;
    let data = be64_at(&img, l2) & 0x00ff_ffff_ffff_fe00;
    patch(&img, refcount_slot(&img, data / 65536), &0u16.to_be_bytes());
    let ours = check(&img, None).unwrap();
    assert_eq!(ours.corruptions, 2, "{ours:?}");
    assert_eq!(ours.exit_code(), 2);
    assert_same_counts(&img, &ours);
    let only_leaks = check(&img, Some(Repair::Leaks)).unwrap();
    assert_eq!(only_leaks.exit_code(), 2);
    let fixed = check(&img, Some(Repair::All)).unwrap();
    assert_eq!(fixed.exit_code(), 0, "{fixed:?}");
    assert!(qemu_img(&["check", path_str(&img)]).contains("No errors"));
    qemu_img(&["compare", path_str(&clean[3]), path_str(&img)]);
}

#[test]
fn resize_grows_and_shrinks() {
    use diskkit::formats::qcow2::resize;
    let dir = tempdir();
    let img = p(dir.path(), "r.qcow2");
    // 512-byte clusters: one L1 entry maps only 32 KiB, so growing relocates the L1 table.
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        path_str(&img),
        "1M",
    ]);
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x31 0 64k", "write -P 0x32 960k 64k"],
    );
    let before = p(dir.path(), "before.raw");
    qemu_img(&["convert", "-O", "raw", path_str(&img), path_str(&before)]);

    resize(&img, 4 * MIB).unwrap();
    assert!(qemu_img(&["check", path_str(&img)]).contains("No errors"));
    assert!(qemu_img(&["info", "--output=json", path_str(&img)]).contains("4194304"));
    qemu_img(&["compare", path_str(&before), path_str(&img)]);
    qemu_io("qcow2", &img, &["write -P 0x33 3M 4k"]);

    // Through the CLI: shrinking needs --shrink and reports what is dropped: the 0x32 data past
    // the new end (which cuts a cluster) and the 4k at 3M.
    let new_size = 1000 * 1024 + 100;
    let (code, _, err) = diskkit(&["resize", path_str(&img), &new_size.to_string()]);
    // qcow2 guests are whole sectors: the new end is rounded up.
    let new_size = 1000 * 1024 + 512;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--shrink"), "{err}");
    let lost = (1024 * 1024 - new_size) + 4096;
    let (code, _, err) = diskkit(&["resize", "--shrink", path_str(&img), "1024100"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("({lost} bytes)")), "{err}");
    assert!(qemu_img(&["check", path_str(&img)]).contains("No errors"));
    // Growing again shows zeros past the old end, including the cut cluster's tail.
    resize(&img, MIB).unwrap();
    let expect = p(dir.path(), "expect.raw");
    std::fs::copy(&before, &expect).unwrap();
    let mut bytes = std::fs::read(&expect).unwrap();
    bytes[new_size as usize..].fill(0);
    std::fs::write(&expect, &bytes).unwrap();
    qemu_img(&["compare", path_str(&expect), path_str(&img)]);
    assert!(qemu_img(&["check", path_str(&img)]).contains("No errors"));
}

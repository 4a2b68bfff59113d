//! convert, create, measure, resize and check against qemu-img.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// Bytes the file occupies on the host.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// qemu-img map of a raw file: the (start, length) ranges it reports as data.
fn qemu_data_ranges(path: &Path, fmt: &str) -> Vec<(u64, u64)> {
    let map: Vec<serde_json::Value> = serde_json::from_str(&qemu_img(&[
        "map",
        "--output=json",
        "-f",
        fmt,
        path_str(path),
    ]))
    .unwrap();
    map.iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn qemu_virtual_size(path: &Path, fmt: &str) -> u64 {
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        "-f",
        fmt,
        path_str(path),
    ]))
    .unwrap();
    info["virtual-size"].as_u64().unwrap()
}

fn is_data_at(ranges: &[(u64, u64)], offset: u64) -> bool {
    ranges.iter().any(|&(s, l)| s <= offset && offset < s + l)
}

fn identical(a: &Path, b: &Path) {
    let out = qemu_img(&["compare", path_str(a), path_str(b)]);
    assert!(out.contains("identical"), "{out}");
}

/// Files in `dir`, sorted, hidden (temporary) ones included.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn raw_to_raw_stays_sparse_and_detects_zeros() {
    let dir = tempdir();
    let src = mixed_raw(dir.path(), "src.raw", 16 * MIB);
    let out = p(dir.path(), "out.raw");
    assert_eq!(diskkit_ok(&["convert", path_str(&src), path_str(&out)]), "");
    identical(&src, &out);
    assert!(allocated(&out) <= allocated(&src));
    // mixed_pattern writes 128 KiB of zeros as data at 2 MiB: the default -S 4k makes it a hole,
    // -S 0 copies it as data.
    let zeros_at = 2 * MIB + 4096;
    assert!(is_data_at(&qemu_data_ranges(&src, "raw"), zeros_at));
    assert!(!is_data_at(&qemu_data_ranges(&out, "raw"), zeros_at));
    assert!(is_data_at(&qemu_data_ranges(&out, "raw"), 4096));

    let out0 = p(dir.path(), "out0.raw");
    diskkit_ok(&[
        "convert",
        "-S",
        "0",
        "-m",
        "1",
        path_str(&src),
        path_str(&out0),
    ]);
    identical(&src, &out0);
    assert!(is_data_at(&qemu_data_ranges(&out0, "raw"), zeros_at));
    assert_eq!(listing(dir.path()), ["out.raw", "out0.raw", "src.raw"]);
}

#[test]
fn convert_into_existing_target() {
    let dir = tempdir();
    let src = mixed_raw(dir.path(), "src.raw", 8 * MIB);
    let tgt = p(dir.path(), "tgt.raw");
    qemu_img(&[
        "create",
        "-f",
        "raw",
        path_str(&tgt),
        &(8 * MIB).to_string(),
    ]);
    qemu_io("raw", &tgt, &["write -P 0x77 0 8M"]);
    diskkit_ok(&["convert", "-n", "-O", "raw", path_str(&src), path_str(&tgt)]);
    identical(&src, &tgt);
    // Zero ranges were punched, not left with the old content.
    assert!(allocated(&tgt) < 8 * MIB);

    let small = p(dir.path(), "small.raw");
    qemu_img(&["create", "-f", "raw", path_str(&small), "4M"]);
    let (code, _, err) = diskkit(&["convert", "-n", path_str(&src), path_str(&small)]);
    assert_eq!(code, 2);
    assert!(
        err.contains("smaller") && err.contains(path_str(&small)),
        "{err}"
    );
}

#[test]
fn convert_n_without_o_keeps_the_targets_format() {
    // Without -O the target is written as what it is, not taken for raw (which would put guest
    // bytes over a qcow2 header or a VHD's metadata).
    let dir = tempdir();
    let src = mixed_raw(dir.path(), "src.raw", 8 * MIB);
    for (format, opts) in [
        ("qcow2", "compat=1.1"),
        ("vpc", "subformat=fixed,force_size=on"),
    ] {
        let tgt = p(dir.path(), &format!("tgt.{format}"));
        diskkit_ok(&["create", "-f", format, "-o", opts, path_str(&tgt), "8M"]);
        diskkit_ok(&["convert", "-n", path_str(&src), path_str(&tgt)]);
        let out = qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            format,
            path_str(&src),
            path_str(&tgt),
        ]);
        assert!(out.contains("identical"), "{format}: {out}");
    }
    qemu_img(&[
        "check",
        "-f",
        "qcow2",
        path_str(&p(dir.path(), "tgt.qcow2")),
    ]);
}

#[test]
fn failed_conversion_leaves_nothing_and_keeps_old_output() {
    let dir = tempdir();
    let src = mixed_raw(dir.path(), "src.raw", 8 * MIB);
    let out = p(dir.path(), "out.raw");
    // Fails at creation (unknown option) and while copying (bad -S).
    for args in [["-o", "bogus=1"], ["-S", "1000"]] {
        let (code, _, err) =
            diskkit(&["convert", args[0], args[1], path_str(&src), path_str(&out)]);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.starts_with("diskkit: "), "{err}");
        assert_eq!(listing(dir.path()), ["src.raw"]);
    }
    // An existing output survives a failed conversion untouched.
    std::fs::write(&out, b"previous").unwrap();
    let (code, _, _) = diskkit(&["convert", "-S", "1000", path_str(&src), path_str(&out)]);
    assert_eq!(code, 2);
    assert_eq!(std::fs::read(&out).unwrap(), b"previous");
    assert_eq!(listing(dir.path()), ["out.raw", "src.raw"]);
    // Outputs that cannot be image files.
    let missing = p(dir.path(), "missing/out.raw");
    for (target, why) in [
        (dir.path(), "is a directory"),
        (missing.as_path(), "does not exist"),
        (Path::new("/dev/null"), "convert -n writes into a device"),
    ] {
        let (code, _, err) = diskkit(&["convert", path_str(&src), path_str(target)]);
        assert_eq!(code, 2);
        assert!(err.contains(why), "{err}");
    }
    assert_eq!(listing(dir.path()), ["out.raw", "src.raw"]);
}

#[test]
fn refuses_to_overwrite_its_input() {
    let dir = tempdir();
    let src = mixed_raw(dir.path(), "src.raw", 8 * MIB);
    let before = std::fs::read(&src).unwrap();
    for extra in [&[][..], &["-n"][..]] {
        let mut args = vec!["convert"];
        args.extend_from_slice(extra);
        args.extend([path_str(&src), path_str(&src)]);
        let (code, _, err) = diskkit(&args);
        assert_eq!(code, 2);
        assert!(err.contains("also an input"), "{err}");
    }
    assert_eq!(std::fs::read(&src).unwrap(), before);
}

fn file_hash(path: &Path) -> u64 {
    use std::hash::{DefaultHasher, Hasher};
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = DefaultHasher::new();
    let mut buf = vec![0; MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finish();
        }
        h.write(&buf[..n]);
    }
}

#[test]
fn killed_conversion_leaves_no_output() {
    use std::os::unix::fs::FileExt;
    use std::os::unix::process::ExitStatusExt;
    let dir = tempdir();
    let src = p(dir.path(), "big.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(256 * MIB).unwrap();
    // 128 MiB of random data in runs of 8 MiB, every other run a hole.
    for i in 0..16 {
        f.write_all_at(&pseudo_random(i + 1, 8 * MIB as usize), i * 16 * MIB)
            .unwrap();
    }
    drop(f);
    let before = file_hash(&src);
    let out = p(dir.path(), "out.raw");
    // SIGKILL cannot be caught: the temporary file stays, the final name never appears. SIGTERM
    // is caught: the temporary file is removed too.
    for signal in [libc::SIGKILL, libc::SIGTERM] {
        let mut killed = false;
        // Signal as soon as the temporary output appears, sooner and sooner if it finished first.
        for delay_ms in [20, 5, 0] {
            let mut child = std::process::Command::new(diskkit_bin())
                .args(["convert", "-m", "1", path_str(&src), path_str(&out)])
                .spawn()
                .unwrap();
            let tmp = p(dir.path(), &format!(".out.raw.diskkit-tmp-{}", child.id()));
            while !tmp.exists() && child.try_wait().unwrap().is_none() {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            // SAFETY: signals our own child, which has not been reaped yet.
            unsafe { libc::kill(child.id() as i32, signal) };
            let status = child.wait().unwrap();
            if status.signal() == Some(signal) {
                killed = true;
                assert!(!out.exists(), "signal {signal} left {}", out.display());
                if signal == libc::SIGKILL {
                    std::fs::remove_file(&tmp).unwrap();
                }
                assert_eq!(listing(dir.path()), ["big.raw"], "signal {signal}");
                break;
            }
            assert!(status.success());
            std::fs::remove_file(&out).unwrap();
        }
        assert!(killed, "every conversion finished before signal {signal}");
    }
    assert_eq!(file_hash(&src), before, "the source changed");
}

#[test]
fn create_matches_qemu() {
    let dir = tempdir();
    let img = p(dir.path(), "new.raw");
    let out = diskkit_ok(&["create", "-f", "raw", path_str(&img), "10M"]);
    assert!(out.starts_with("Formatting"), "{out}");
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", path_str(&img)])).unwrap();
    assert_eq!(info["virtual-size"], 10 * MIB);
    assert_eq!(info["format"], "raw");
    assert_eq!(allocated(&img), 0);

    let full = p(dir.path(), "full.raw");
    diskkit_ok(&[
        "create",
        "-q",
        "-o",
        "preallocation=full",
        path_str(&full),
        "1M",
    ]);
    assert_eq!(allocated(&full), MIB);
    let (code, _, err) = diskkit(&["create", "-o", "preallocation=maybe", path_str(&full), "1M"]);
    assert_eq!(code, 2);
    assert!(err.contains("preallocation"), "{err}");
    let (code, _, _) = diskkit(&["create", "-f", "raw", path_str(&img)]);
    assert_eq!(code, 2, "a size is needed without -b");
}

#[test]
fn measure_raw_matches_qemu() {
    let dir = tempdir();
    let src = mixed_raw(dir.path(), "src.raw", 8 * MIB);
    for args in [
        vec!["measure", "-O", "raw", path_str(&src)],
        vec!["measure", "-O", "raw", "--size", "1G"],
    ] {
        assert_eq!(diskkit_ok(&args), qemu_img(&args));
    }
    let json: serde_json::Value = serde_json::from_str(&diskkit_ok(&[
        "measure", "-O", "raw", "--output", "json", "--size", "3M",
    ]))
    .unwrap();
    assert_eq!(json["required"], 3 * MIB);
    assert_eq!(json["fully-allocated"], 3 * MIB);
}

#[test]
fn resize_raw_like_qemu() {
    let dir = tempdir();
    let img = mixed_raw(dir.path(), "img.raw", 8 * MIB);
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert_eq!(
        diskkit_ok(&["resize", path_str(&img), "+2M"]),
        "Image resized.\n"
    );
    assert_eq!(size(&img), 10 * MIB);
    diskkit_ok(&["resize", "-q", path_str(&img), "12M"]);
    assert_eq!(size(&img), 12 * MIB);

    // Shrinking needs --shrink, and says how much allocated data it drops.
    let (code, _, err) = diskkit(&["resize", path_str(&img), "-6M"]);
    assert_eq!(code, 2);
    assert!(err.contains("--shrink"), "{err}");
    assert_eq!(size(&img), 12 * MIB);
    let (code, out, err) = diskkit(&["resize", "--shrink", path_str(&img), "-6M"]);
    assert_eq!((code, out.as_str()), (0, "Image resized.\n"));
    assert_eq!(size(&img), 6 * MIB);
    // The 12 KiB written at the end of the original 8 MiB are gone.
    assert!(err.contains("(12288 bytes)"), "{err}");
    let (code, _, err) = diskkit(&["resize", "--shrink", path_str(&img), "4M"]);
    assert_eq!(code, 0);
    assert_eq!(err, "", "nothing allocated between 4M and 6M");
}

#[test]
fn check_raw_has_no_checks_as_qemu() {
    let dir = tempdir();
    let img = mixed_raw(dir.path(), "img.raw", 8 * MIB);
    let qemu = std::process::Command::new("qemu-img")
        .args(["check", "-f", "raw", path_str(&img)])
        .output()
        .unwrap();
    let (code, _, err) = diskkit(&["check", path_str(&img)]);
    assert_eq!(Some(code), qemu.status.code());
    assert!(err.contains("does not support checks"), "{err}");
}

/// A conversion source: qemu's format name, and the snapshot to convert (qcow2).
struct Source {
    path: std::path::PathBuf,
    fmt: &'static str,
    snapshot: Option<&'static str>,
}

fn interop_sources(dir: &Path) -> Vec<Source> {
    let raw = mixed_raw(dir, "src.raw", 8 * MIB);
    let mut out = vec![Source {
        path: raw.clone(),
        fmt: "raw",
        snapshot: None,
    }];
    for (name, fmt, opts) in [
        ("v3.qcow2", "qcow2", &["-o", "compat=1.1"][..]),
        ("v2.qcow2", "qcow2", &["-o", "compat=0.10"]),
        ("zlib.qcow2", "qcow2", &["-c"]),
        (
            "zstd.qcow2",
            "qcow2",
            &["-c", "-o", "compression_type=zstd"],
        ),
        ("dyn.vhd", "vpc", &["-o", "subformat=dynamic"]),
        ("fixed.vhd", "vpc", &["-o", "subformat=fixed"]),
    ] {
        let img = p(dir, name);
        let mut args = vec!["convert", "-O", fmt];
        args.extend(opts);
        args.extend([path_str(&raw), path_str(&img)]);
        qemu_img(&args);
        out.push(Source {
            path: img,
            fmt,
            snapshot: None,
        });
    }
    // A size that is no multiple of any cluster or sector size.
    let odd = p(dir, "odd.raw");
    qemu_img(&[
        "create",
        "-f",
        "raw",
        path_str(&odd),
        &((5 << 20) + 333).to_string(),
    ]);
    qemu_io(
        "raw",
        &odd,
        &["write -P 0x41 0 64k", "write -P 0x42 5M 333"],
    );
    out.push(Source {
        path: odd,
        fmt: "raw",
        snapshot: None,
    });
    // A chain whose top overwrites, zeroes and adds to the base's data.
    let base = p(dir, "base.qcow2");
    qemu_img(&["convert", "-O", "qcow2", path_str(&raw), path_str(&base)]);
    let top = p(dir, "top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        path_str(&base),
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x66 32k 64k",
            "write -z 0 16k",
            "write -P 0x67 6M 100k",
        ],
    );
    out.push(Source {
        path: top,
        fmt: "qcow2",
        snapshot: None,
    });
    // Converted as of the snapshot, not the current state.
    let snap = p(dir, "snap.qcow2");
    qemu_img(&["convert", "-O", "qcow2", path_str(&raw), path_str(&snap)]);
    qemu_img(&["snapshot", "-c", "before", path_str(&snap)]);
    qemu_io("qcow2", &snap, &["write -P 0x99 0 1M", "write -z 2M 2M"]);
    out.push(Source {
        path: snap,
        fmt: "qcow2",
        snapshot: Some("before"),
    });
    out
}

/// Every source converts to every output format identically (qemu-img compare) and into images
/// qemu-img check calls clean.
#[test]
fn interop_matrix() {
    let dir = tempdir();
    // (label, qemu format of the output, diskkit arguments)
    let outputs: [(&str, &str, &[&str]); 10] = [
        ("raw", "raw", &["-O", "raw"]),
        ("qcow2", "qcow2", &["-O", "qcow2"]),
        (
            "qcow2-zstd",
            "qcow2",
            &["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
        ),
        ("qcow2-zlib", "qcow2", &["-O", "qcow2", "-c"]),
        ("qcow2-v2", "qcow2", &["-O", "qcow2", "-o", "compat=0.10"]),
        (
            "qcow2-4k",
            "qcow2",
            &["-O", "qcow2", "-o", "cluster_size=4096"],
        ),
        ("vpc-fixed", "vpc", &["-O", "vpc", "-o", "subformat=fixed"]),
        (
            "vpc-dynamic",
            "vpc",
            &["-O", "vhd", "-o", "subformat=dynamic"],
        ),
        ("vpc-force", "vpc", &["-O", "vpc", "-o", "force_size=on"]),
        ("azure", "vpc", &["--target", "azure"]),
    ];
    for src in interop_sources(dir.path()) {
        // What the source reads as, according to qemu.
        let reference = p(dir.path(), "reference.raw");
        let mut args = vec!["convert", "-f", src.fmt, "-O", "raw"];
        let snap_opt = src.snapshot.map(|s| format!("snapshot.name={s}"));
        if let Some(o) = &snap_opt {
            args.extend(["-l", o]);
        }
        args.extend([path_str(&src.path), path_str(&reference)]);
        qemu_img(&args);
        for (label, fmt, extra) in outputs {
            let out = p(dir.path(), &format!("out-{label}"));
            let mut args = vec!["convert"];
            args.extend(extra);
            if let Some(s) = src.snapshot {
                args.extend(["-l", s]);
            }
            args.extend([path_str(&src.path), path_str(&out)]);
            diskkit_ok(&args);
            let cmp = qemu_img(&[
                "compare",
                "-f",
                "raw",
                "-F",
                fmt,
                path_str(&reference),
                path_str(&out),
            ]);
            assert!(
                cmp.contains("identical"),
                "{} -> {label}: {cmp}",
                src.path.display()
            );
            if fmt == "qcow2" {
                let check = qemu_img(&["check", path_str(&out)]);
                assert!(check.contains("No errors"), "{label}: {check}");
            }
            if fmt != "raw" {
                // qemu-img check knows no vpc checks; ours must find the image clean.
                let (code, report, err) = diskkit(&["check", "-f", fmt, path_str(&out)]);
                assert_eq!(code, 0, "{label}: {report}{err}");
            }
            std::fs::remove_file(&out).unwrap();
        }
    }
}

#[test]
fn vhd_create_measure_resize_check() {
    let dir = tempdir();
    let img = p(dir.path(), "new.vhd");
    diskkit_ok(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "force_size=on",
        path_str(&img),
        "16M",
    ]);
    assert_eq!(qemu_virtual_size(&img, "vpc"), 16 * MIB);
    diskkit_ok(&["resize", path_str(&img), "+8M"]);
    assert_eq!(qemu_virtual_size(&img, "vpc"), 24 * MIB);
    let (code, out, _) = diskkit(&["check", path_str(&img)]);
    assert_eq!(code, 0);
    assert!(out.contains("No errors were found on the image."), "{out}");

    // A dynamic VHD needs its metadata plus one 2 MiB block per block touched by data.
    let src = mixed_raw(dir.path(), "src.raw", 8 * MIB);
    let m: serde_json::Value = serde_json::from_str(&diskkit_ok(&[
        "measure",
        "-O",
        "vpc",
        "--output",
        "json",
        path_str(&src),
    ]))
    .unwrap();
    let out = p(dir.path(), "out.vhd");
    diskkit_ok(&["convert", "-O", "vpc", path_str(&src), path_str(&out)]);
    assert_eq!(
        m["required"].as_u64().unwrap(),
        std::fs::metadata(&out).unwrap().len()
    );
    assert!(m["fully-allocated"].as_u64().unwrap() > 8 * MIB);
}

#[test]
fn overlay_on_raw_backing_writes_only_differences() {
    let dir = tempdir();
    let base = mixed_raw(dir.path(), "base.raw", 8 * MIB);
    let changed = p(dir.path(), "changed.raw");
    std::fs::copy(&base, &changed).unwrap();
    // Changed data, data zeroed over the base's data, and new data in a hole of the base.
    qemu_io(
        "raw",
        &changed,
        &[
            "write -P 0x5a 1M 4k",
            "write -z 0 64k",
            "write -P 0x5b 6M 64k",
        ],
    );
    let ov = p(dir.path(), "ov.qcow2");
    diskkit_ok(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "base.raw",
        "-F",
        "raw",
        path_str(&changed),
        path_str(&ov),
    ]);
    // The overlay reads as the changed image, through its backing file.
    identical(&changed, &ov);
    let check = qemu_img(&["check", path_str(&ov)]);
    assert!(check.contains("No errors"), "{check}");
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", path_str(&ov)])).unwrap();
    assert_eq!(info["backing-filename"], "base.raw");
    // Only the three changed 64 KiB clusters are allocated in the overlay itself.
    let map: Vec<serde_json::Value> =
        serde_json::from_str(&qemu_img(&["map", "--output=json", path_str(&ov)])).unwrap();
    let own: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        own,
        [(0, 64 << 10), (MIB, 64 << 10), (6 * MIB, 64 << 10)],
        "{map:?}"
    );
}

#[test]
fn qcow2_create_measure_resize_check_match_qemu() {
    let dir = tempdir();
    let src = mixed_raw(dir.path(), "src.raw", 8 * MIB);
    for opts in ["cluster_size=65536", "cluster_size=4096", "compat=0.10"] {
        let args = ["measure", "-O", "qcow2", "-o", opts, path_str(&src)];
        assert_eq!(diskkit_ok(&args), qemu_img(&args), "{opts}");
        let args = ["measure", "-O", "qcow2", "-o", opts, "--size", "100G"];
        assert_eq!(diskkit_ok(&args), qemu_img(&args), "{opts}");
    }

    let img = p(dir.path(), "new.qcow2");
    diskkit_ok(&["create", "-f", "qcow2", path_str(&img), "16M"]);
    assert_eq!(qemu_virtual_size(&img, "qcow2"), 16 * MIB);
    assert!(qemu_img(&["check", path_str(&img)]).contains("No errors"));
    // An overlay takes its backing file's size.
    let top = p(dir.path(), "top.qcow2");
    diskkit_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "new.qcow2",
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    assert_eq!(qemu_virtual_size(&top, "qcow2"), 16 * MIB);

    let data = p(dir.path(), "data.qcow2");
    diskkit_ok(&["convert", "-O", "qcow2", path_str(&src), path_str(&data)]);
    diskkit_ok(&["resize", path_str(&data), "+8M"]);
    assert_eq!(qemu_virtual_size(&data, "qcow2"), 16 * MIB);
    let (code, _, err) = diskkit(&["resize", "--shrink", path_str(&data), "6M"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("discarded"), "{err}");
    assert_eq!(qemu_virtual_size(&data, "qcow2"), 6 * MIB);
    assert!(qemu_img(&["check", path_str(&data)]).contains("No errors"));

    let (code, out, _) = diskkit(&["check", path_str(&data)]);
    assert_eq!(code, 0);
    assert!(out.contains("No errors were found on the image."), "{out}");

    // -n into an empty qcow2 image that qemu made keeps its cluster size.
    let existing = p(dir.path(), "existing.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        path_str(&existing),
        "8M",
    ]);
    diskkit_ok(&[
        "convert",
        "-n",
        "-O",
        "qcow2",
        path_str(&src),
        path_str(&existing),
    ]);
    identical(&src, &existing);
    assert_eq!(
        diskkit_ok(&["check", path_str(&existing)]),
        qemu_img(&["check", path_str(&existing)])
    );
    assert!(qemu_img(&["info", path_str(&existing)]).contains("cluster_size: 4096"));
    let (code, out, _) = diskkit(&["check", "--output", "json", path_str(&data)]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["corruptions"], 0);
    assert_eq!(json["leaks"], 0);
}

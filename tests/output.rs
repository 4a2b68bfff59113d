//! Safe outputs: cache modes (`-t`), qemu-img's compatibility flags, leftovers of killed runs.

mod common;

use common::*;

const MIB: u64 = 1 << 20;

/// A qcow2 source with data, a zeroed range and a hole, made by qemu-io.
fn source(dir: &std::path::Path) -> std::path::PathBuf {
    let src = p(dir, "src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&src), "40M"]);
    qemu_io(
        "qcow2",
        &src,
        &[
            "write -P 0x5a 0 3M",
            "write -z 4M 1M",
            "write -P 0x17 33M 5M",
        ],
    );
    src
}

#[test]
fn every_cache_mode_writes_the_same_image() {
    let dir = tempdir();
    let src = source(dir.path());
    for mode in ["writeback", "none", "writethrough", "directsync", "unsafe"] {
        for fmt in ["raw", "qcow2", "vpc"] {
            let out = p(dir.path(), &format!("{mode}.{fmt}"));
            diskkit_ok(&[
                "convert",
                "-t",
                mode,
                "-T",
                "none",
                "-U",
                "-W",
                "-O",
                fmt,
                path_str(&src),
                path_str(&out),
            ]);
            // qemu-img checks qcow2 only among these.
            if fmt == "qcow2" {
                qemu_img(&["check", "-f", fmt, path_str(&out)]);
            }
            qemu_img(&[
                "compare",
                "-f",
                "qcow2",
                "-F",
                fmt,
                path_str(&src),
                path_str(&out),
            ]);
        }
    }
    let (code, _, err) = diskkit(&["convert", "-t", "sometimes", path_str(&src), "x.raw"]);
    assert_eq!(code, 2);
    assert!(err.contains("sometimes"), "{err}");
}

/// `-t none` writes the data with direct I/O: the output does not stay in the page cache.
#[test]
fn cache_mode_none_leaves_the_output_out_of_the_page_cache() {
    let dir = tempdir();
    let src = source(dir.path());
    for fmt in ["raw", "qcow2", "vpc"] {
        let out = p(dir.path(), &format!("direct.{fmt}"));
        diskkit_ok(&[
            "convert",
            "-t",
            "none",
            "-O",
            fmt,
            path_str(&src),
            path_str(&out),
        ]);
        let fincore = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES", path_str(&out)])
            .output()
            .unwrap();
        let resident: u64 = String::from_utf8_lossy(&fincore.stdout)
            .trim()
            .parse()
            .unwrap();
        // The source holds 8 MiB of data; only metadata pages may stay cached.
        assert!(
            resident < MIB,
            "{fmt}: {resident} bytes of the output cached"
        );
    }
}

/// Direct writes into a fresh raw or qcow2 file go into ranges allocated ahead (ext4 serializes
/// direct writes into holes); what the source's data turns out not to need (its zeros) is given
/// back at the end, so the output is exactly as sparse as one written into holes.
#[test]
fn direct_outputs_stay_as_sparse_as_their_data() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempdir();
    let src = p(dir.path(), "src.raw");
    qemu_img(&["create", "-q", "-f", "raw", path_str(&src), "16M"]);
    // Allocated zeros between two runs of data, then a hole.
    qemu_io(
        "raw",
        &src,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0 1M 2M",
            "write -P 0x17 3M 1M",
        ],
    );
    let allocated = |path: &std::path::Path| std::fs::metadata(path).unwrap().blocks() * 512;
    assert_eq!(allocated(&src), 4 * MIB);
    for (sparse_size, expected) in [("4k", 2 * MIB), ("0", 4 * MIB)] {
        let out = p(dir.path(), &format!("out-{sparse_size}.raw"));
        diskkit_ok(&[
            "convert",
            "-t",
            "none",
            "-S",
            sparse_size,
            "-O",
            "raw",
            path_str(&src),
            path_str(&out),
        ]);
        qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            path_str(&src),
            path_str(&out),
        ]);
        assert_eq!(allocated(&out), expected, "-S {sparse_size}");
    }
    // qcow2 clusters allocated ahead and not used are cut off: the same file as through the
    // page cache, where nothing is allocated ahead.
    let mut lengths = Vec::new();
    for mode in ["none", "writeback"] {
        let out = p(dir.path(), &format!("out-{mode}.qcow2"));
        diskkit_ok(&[
            "convert",
            "-t",
            mode,
            "-O",
            "qcow2",
            path_str(&src),
            path_str(&out),
        ]);
        qemu_img(&["check", path_str(&out)]);
        qemu_img(&["compare", "-f", "raw", path_str(&src), path_str(&out)]);
        lengths.push((std::fs::metadata(&out).unwrap().len(), allocated(&out)));
    }
    let [(direct_len, direct_blocks), (cached_len, cached_blocks)] = lengths[..] else {
        unreachable!()
    };
    assert_eq!(direct_len, cached_len);
    // Allocated ahead and written in part: at most the one cluster of the L1 table.
    assert!(
        direct_blocks.abs_diff(cached_blocks) <= 64 << 10,
        "{direct_blocks} against {cached_blocks}"
    );
}

#[test]
fn a_rerun_removes_leftovers_of_killed_runs() {
    let dir = tempdir();
    let src = source(dir.path());
    let out = p(dir.path(), "out.qcow2");
    // A process that is gone, as after a SIGKILL.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let leftover = p(dir.path(), &format!(".out.qcow2.diskkit-tmp-{dead}"));
    std::fs::write(&leftover, vec![0x77; MIB as usize]).unwrap();
    diskkit_ok(&["convert", "-O", "qcow2", path_str(&src), path_str(&out)]);
    assert!(!leftover.exists(), "the leftover of PID {dead} stayed");
    qemu_img(&["compare", path_str(&src), path_str(&out)]);
}

#[test]
fn errors_name_the_output_not_its_temporary_file() {
    // A writer refusing its options fails after the temporary name exists.
    let dir = tempdir();
    let src = source(dir.path());
    let out = p(dir.path(), "out.vhd");
    let (code, _, err) = diskkit(&[
        "convert",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed,target=azure",
        "-c",
        path_str(&src),
        path_str(&out),
    ]);
    assert_eq!(code, 2);
    assert!(!err.contains("diskkit-tmp"), "{err}");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["src.qcow2"]);
}

#[test]
fn an_interrupted_pull_leaves_nothing_behind() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempdir();
    let bucket = p(dir.path(), "bucket");
    std::fs::create_dir(&bucket).unwrap();
    let src = p(dir.path(), "src.raw");
    std::fs::write(&src, pseudo_random(11, 48 * MIB as usize)).unwrap();
    let object = format!("{}/disk.qcow2", path_str(&bucket));
    let cache = p(dir.path(), "cache");
    let run = |args: &[&str]| {
        std::process::Command::new(diskkit_bin())
            .args(args)
            .env("XDG_CACHE_HOME", &cache)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    assert!(
        run(&["push", "-O", "qcow2", path_str(&src), &object])
            .wait()
            .unwrap()
            .success()
    );
    let out_dir = p(dir.path(), "out");
    std::fs::create_dir(&out_dir).unwrap();
    let dst = p(&out_dir, "pulled.raw");
    let mut interrupted = false;
    for delay_ms in [30, 10, 3, 0] {
        // A qcow2 object is downloaded to a scratch file next to DST, then converted.
        let mut child = run(&["pull", "-O", "raw", &object, path_str(&dst)]);
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        let left: Vec<String> = std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        if status.signal() == Some(libc::SIGTERM) {
            interrupted = true;
            assert!(left.is_empty(), "an interrupted pull left {left:?}");
            break;
        }
        std::fs::remove_file(&dst).unwrap();
    }
    assert!(interrupted, "every pull finished before SIGTERM");
}

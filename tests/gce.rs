//! `--target gce`: disk.raw grown to a whole GiB, alone in a gzip'ed GNU sparse tar, as a file
//! (convert) and as an object (push into a local bucket); GNU tar, gzip and sgdisk are the
//! oracles.

mod common;

use common::*;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A raw disk of `size` bytes holding the mixed pattern and 3 MiB of incompressible data at
/// 10 MiB (several gzip members).
fn raw_disk(dir: &Path, size: u64) -> PathBuf {
    let src = mixed_raw(dir, "src.raw", size);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&pseudo_random(7, 3 << 20), 10 * MIB)
        .unwrap();
    src
}

/// A 20 MiB GPT disk made by sgdisk: an ESP and a Linux partition, with data in both.
fn gpt_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("gpt.raw");
    qemu_img(&["create", "-f", "raw", path_str(&disk), "20M"]);
    run(
        "sgdisk",
        &[
            "-n",
            "1:2048:+4M",
            "-t",
            "1:ef00",
            "-n",
            "2:0:0",
            "-t",
            "2:8300",
            path_str(&disk),
        ],
    );
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(&pseudo_random(3, 1 << 20), MIB).unwrap();
    f.write_all_at(&pseudo_random(4, 2 << 20), 12 * MIB)
        .unwrap();
    disk
}

/// Lists the tarball and extracts it with GNU tar (-S: holes as holes) into `dir/x`; checks
/// that it holds exactly disk.raw, of a whole number of GiB; returns the extracted path.
fn extract(tarball: &Path, dir: &Path) -> PathBuf {
    run("gzip", &["-t", path_str(tarball)]);
    let listing = run("tar", &["-tzf", path_str(tarball)]);
    assert_eq!(listing, "disk.raw\n", "exactly one member");
    let verbose = run("tar", &["-tvzf", path_str(tarball)]);
    assert!(verbose.starts_with("-rw-r--r--"), "{verbose}");
    let x = dir.join("x");
    std::fs::create_dir_all(&x).unwrap();
    run("tar", &["-xSzf", path_str(tarball), "-C", path_str(&x)]);
    let disk = x.join("disk.raw");
    let meta = std::fs::metadata(&disk).unwrap();
    assert!(
        meta.len() > 0 && meta.len().is_multiple_of(GIB),
        "{}",
        meta.len()
    );
    disk
}

/// `disk` is `src` followed by zeros (qemu-img compare checks the extra bytes are zeros).
fn assert_source_then_zeros(src: &Path, disk: &Path) {
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        path_str(src),
        path_str(disk),
    ]);
    assert!(cmp.contains("identical"), "{cmp}");
}

#[test]
fn convert_writes_a_sparse_gnu_tarball_of_disk_raw() {
    let dir = tempdir();
    let src = raw_disk(dir.path(), 20 * MIB);
    let before = std::fs::read(&src).unwrap();
    let out = dir.path().join("image.tar.gz");
    // No partition table: the pre-flight check fails, --no-preflight skips it.
    diskkit_ok(&[
        "convert",
        "--target",
        "gce",
        "--no-preflight",
        path_str(&src),
        path_str(&out),
    ]);
    let disk = extract(&out, dir.path());
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), GIB);
    // Sparse: the holes of the source stayed holes.
    assert!(meta.blocks() * 512 < 32 * MIB, "{} blocks", meta.blocks());
    assert_source_then_zeros(&src, &disk);
    assert_eq!(std::fs::read(&src).unwrap(), before, "source untouched");
    // Several gzip members: one per MiB of tar.
    let gz = std::fs::read(&out).unwrap();
    let members = gz.windows(4).filter(|w| w == &[0x1f, 0x8b, 8, 0]).count();
    assert!(members >= 3, "{members} members");
}

#[test]
fn a_gpt_moves_to_the_end_of_the_grown_disk() {
    let dir = tempdir();
    let src = gpt_disk(dir.path());
    let before = std::fs::read(&src).unwrap();
    let out = dir.path().join("gpt.tar.gz");
    diskkit_ok(&["convert", "--target", "gce", path_str(&src), path_str(&out)]);
    assert_eq!(std::fs::read(&src).unwrap(), before, "source untouched");
    let disk = extract(&out, dir.path());
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), GIB);
    let verify = run("sgdisk", &["-v", path_str(&disk)]);
    assert!(verify.contains("No problems found"), "{verify}");
    let partitions = |p: &Path| {
        let text = run("sgdisk", &["-p", path_str(p)]);
        text.lines()
            .skip_while(|l| !l.starts_with("Number"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(partitions(&src), partitions(&disk));
    assert_eq!(partitions(&disk).len(), 3, "{:?}", partitions(&disk));
    // The partitions' content is the source's.
    let f = std::fs::File::open(&disk).unwrap();
    let mut got = vec![0u8; (18 * MIB) as usize];
    f.read_exact_at(&mut got, MIB).unwrap();
    assert_eq!(&got[..], &before[MIB as usize..19 * MIB as usize]);
    // diskkit's own pre-flight agrees.
    let report = diskkit_ok(&[
        "check",
        "--target",
        "gce",
        "--role",
        "system",
        "--output",
        "json",
        path_str(&disk),
    ]);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    for check in report["checks"].as_array().unwrap() {
        let expected = if check["rule"] == "format" {
            "warn"
        } else {
            "pass"
        };
        assert_eq!(check["status"], expected, "{check}");
    }
}

#[test]
fn disks_over_8_gib_use_base_256_sizes() {
    let dir = tempdir();
    let src = dir.path().join("big.raw");
    qemu_img(&["create", "-f", "raw", path_str(&src), "9000M"]);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&pseudo_random(9, 1 << 20), 8800 * MIB)
        .unwrap();
    let out = dir.path().join("big.tar.gz");
    diskkit_ok(&[
        "convert",
        "--target",
        "gce",
        "--force",
        path_str(&src),
        path_str(&out),
    ]);
    let disk = extract(&out, dir.path());
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 9 * GIB);
    assert_source_then_zeros(&src, &disk);
}

#[test]
fn push_streams_the_same_tarball_into_a_bucket() {
    let dir = tempdir();
    let src = gpt_disk(dir.path());
    let bucket = dir.path().join("bucket");
    std::fs::create_dir(&bucket).unwrap();
    let cache = dir.path().join("cache");
    let url = format!("{}/image.tar.gz", bucket.display());
    let env = s3::Env {
        cache: cache.clone(),
        endpoint: None,
    };
    env.ok(&["push", "--target", "gce", path_str(&src), &url]);
    let object = bucket.join("image.tar.gz");
    let disk = extract(&object, dir.path());
    let verify = run("sgdisk", &["-v", path_str(&disk)]);
    assert!(verify.contains("No problems found"), "{verify}");
    // The same bytes as convert writes: the tarball is a function of the disk.
    let file = dir.path().join("file.tar.gz");
    diskkit_ok(&[
        "convert",
        "--target",
        "gce",
        path_str(&src),
        path_str(&file),
    ]);
    assert!(std::fs::read(&object).unwrap() == std::fs::read(&file).unwrap());
}

#[test]
fn gce_refuses_what_does_not_apply() {
    let dir = tempdir();
    let src = gpt_disk(dir.path());
    let out = dir.path().join("o.tar.gz");
    let (code, _, err) = diskkit(&[
        "convert",
        "--target",
        "gce",
        "-c",
        path_str(&src),
        path_str(&out),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(!out.exists());
    // A damaged GPT is refused: GCE's import would fail on it.
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(b"X", 512 + 40).unwrap();
    let (code, _, err) = diskkit(&[
        "convert",
        "--target",
        "gce",
        "--no-preflight",
        path_str(&src),
        path_str(&out),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("GPT header at offset 0x200"), "{err}");
    assert!(!out.exists());
}

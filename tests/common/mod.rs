//! Helpers for integration tests: run qemu-img/qemu-io (the oracle) and diskkit, make fixtures.
#![allow(dead_code)] // each test binary uses a different subset

pub mod faults;
pub mod s3;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn diskkit_bin() -> &'static str {
    env!("CARGO_BIN_EXE_diskkit")
}

fn run_checked(mut cmd: Command) -> Output {
    let desc = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    assert!(
        out.status.success(),
        "{desc} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs qemu-img with `args`; panics with its output when it fails.
pub fn qemu_img(args: &[&str]) -> String {
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    String::from_utf8_lossy(&run_checked(cmd).stdout).into_owned()
}

/// Runs qemu-io commands (`-c` each) on an image of format `fmt`.
pub fn qemu_io(fmt: &str, path: &Path, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", fmt]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg(path);
    let out = run_checked(cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?} on {}: {text}",
        path.display()
    );
}

/// Runs diskkit; returns (exit code, stdout, stderr).
pub fn diskkit(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(diskkit_bin())
        .args(args)
        .output()
        .expect("run diskkit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs diskkit and insists on exit 0; returns stdout.
pub fn diskkit_ok(args: &[&str]) -> String {
    let (code, out, err) = diskkit(args);
    assert_eq!(code, 0, "diskkit {args:?} failed:\n{out}\n{err}");
    out
}

/// The guest content of an image as qemu sees it (qemu-img convert -O raw).
pub fn qemu_guest_bytes(path: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.qemu-guest.raw",
        path.file_name().unwrap().to_string_lossy()
    ));
    qemu_img(&["convert", "-O", "raw", path_str(path), path_str(&out)]);
    let bytes = std::fs::read(&out).expect("read qemu output");
    std::fs::remove_file(&out).ok();
    bytes
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("diskkit-test-")
        .tempdir()
        .expect("tempdir")
}

/// qemu-io commands that write a recognisable mix: patterned data, runs of zeros written as data,
/// explicit zero ranges and untouched holes, scaled to an image of `size` bytes (>= 8 MiB).
pub fn mixed_pattern(size: u64) -> Vec<String> {
    let mib = 1u64 << 20;
    assert!(size >= 8 * mib);
    vec![
        format!("write -P 0x11 0 {}", 64 * 1024),
        format!("write -P 0x22 {} {}", mib + 512, 3 * 4096 + 17),
        format!("write -P 0x00 {} {}", 2 * mib, 128 * 1024),
        format!("write -P 0x33 {} {}", 3 * mib - 4096, 8192),
        format!("write -z {} {}", 4 * mib, mib),
        format!("write -P 0x44 {} {}", size - 3 * 4096, 3 * 4096),
    ]
}

/// A sparse raw image `name` in `dir` of `size` bytes holding the `mixed_pattern`.
pub fn mixed_raw(dir: &Path, name: &str, size: u64) -> PathBuf {
    let img = p(dir, name);
    qemu_img(&["create", "-f", "raw", path_str(&img), &size.to_string()]);
    qemu_io("raw", &img, &as_refs(&mixed_pattern(size)));
    img
}

pub fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Deterministic incompressible bytes (xorshift64), for sources that take time to process.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `qemu-img check` finds no corruption (leaks are allowed: exit 0 or 3); the error is its report.
pub fn qemu_check_clean(img: &Path) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", path_str(img)])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let code = out.status.code();
    if matches!(code, Some(0) | Some(3))
        && report["corruptions"].as_u64().unwrap_or(0) == 0
        && report["check-errors"].as_u64().unwrap_or(0) == 0
    {
        return Ok(());
    }
    Err(format!(
        "qemu-img check {}: exit {code:?}\n{}\n{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

pub fn assert_no_corruption(img: &Path) {
    if let Err(e) = qemu_check_clean(img) {
        panic!("{e}");
    }
}

pub fn qemu_info(img: &Path) -> Value {
    serde_json::from_str(&qemu_img(&["info", "--output=json", path_str(img)])).unwrap()
}

/// The guest content of internal snapshot `name` as qemu reads it.
pub fn snapshot_bytes(img: &Path, name: &str) -> Vec<u8> {
    let out = img.with_extension(format!("snap-{name}.raw"));
    qemu_img(&[
        "convert",
        "-l",
        &format!("snapshot.name={name}"),
        "-O",
        "raw",
        path_str(img),
        path_str(&out),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// Everything a user sees of an image, as qemu sees it: guest bytes, each snapshot's bytes,
/// version, refcount width, lazy refcounts, bitmaps.
/// (guest bytes, (ID, name, guest bytes) of each snapshot, options summary)
pub type View = (Vec<u8>, Vec<(String, String, Vec<u8>)>, String);

pub fn qemu_view(img: &Path) -> View {
    let i = qemu_info(img);
    let snapshots = i["snapshots"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|s| {
            let name = s["name"].as_str().unwrap().to_string();
            let bytes = snapshot_bytes(img, &name);
            (s["id"].as_str().unwrap().to_string(), name, bytes)
        })
        .collect();
    let d = &i["format-specific"]["data"];
    let summary = format!(
        "compat={} refcount-bits={} lazy={} bitmaps={} size={}",
        d["compat"], d["refcount-bits"], d["lazy-refcounts"], d["bitmaps"], i["virtual-size"]
    );
    (
        qemu_guest_bytes(img, img.parent().unwrap()),
        snapshots,
        summary,
    )
}

/// A qcow2 image of `size` bytes with the mixed pattern written by qemu-io.
pub fn qcow2_fixture(dir: &Path, name: &str, opts: &str) -> std::path::PathBuf {
    let img = p(dir, name);
    let size = 8u64 << 20;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        path_str(&img),
        &size.to_string(),
    ]);
    qemu_io("qcow2", &img, &as_refs(&mixed_pattern(size)));
    img
}

/// A new empty qcow2 overlay at `img` on `backing` (a name relative to `img`'s folder).
pub fn qcow2_overlay(img: &Path, backing: &str, format: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        format,
        path_str(img),
    ]);
}

/// Names that only diskkit's unfinished work carries.
pub const TEMP_MARKS: [&str; 4] = [
    ".diskkit-tmp-",
    ".diskkit-download-",
    ".diskkit-upload-",
    ".diskkit-scratch-",
];

/// Temporary files under `roots` (recursively), and upload checkpoints left behind.
pub fn temps_left(roots: &[PathBuf]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack: Vec<PathBuf> = roots.to_vec();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            } else if TEMP_MARKS.iter().any(|m| name.contains(m))
                || (dir.ends_with("diskkit/uploads") && name.ends_with(".json"))
            {
                found.push(format!("left behind: {}", e.path().display()));
            }
        }
    }
    found
}

/// An 8 MiB raw source: the mixed pattern plus 2 MiB of incompressible data, so that writers
/// take long enough to be killed in the middle.
pub fn noisy_raw(dir: &Path, name: &str, seed: u64) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let img = mixed_raw(dir, name, 8 << 20);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&pseudo_random(seed, 2 << 20), 5 << 20)
        .unwrap();
    img
}

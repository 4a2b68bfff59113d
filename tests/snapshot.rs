//! Data-disk snapshots: create, restore, incrementals, diff, rm + gc, verify, damage, the gc
//! rule, snapshots as images; on a local store and on the suite's S3 server.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

/// Runs diskkit with the S3 test settings in the environment; returns (code, stdout, stderr).
fn dk(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(diskkit_bin())
        .args(args)
        .env("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .output()
        .expect("run diskkit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn dk_ok(args: &[&str]) -> String {
    let (code, out, err) = dk(args);
    assert_eq!(code, 0, "diskkit {args:?} failed:\n{out}\n{err}");
    out
}

/// `snapshot create`; returns (id, stdout).
fn create(extra: &[&str], image: &Path, store: &str) -> (String, String) {
    let mut args = vec!["snapshot", "create"];
    args.extend_from_slice(extra);
    args.extend([path_str(image), store]);
    let out = dk_ok(&args);
    let id = out.lines().last().unwrap().to_string();
    assert_eq!(id.len(), 32, "{out}");
    (id, out)
}

/// A 48 MiB qcow2 with data, zeros and a repeated chunk, made by qemu-io.
fn qcow2_source(dir: &Path) -> PathBuf {
    let src = p(dir, "data.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&src), "48M"]);
    qemu_io(
        "qcow2",
        &src,
        &[
            "write -P 0x11 0 8M",
            "write -P 0x22 12M 3M",
            "write -z 20M 4M",
            "write -P 0x33 40M 1M",
        ],
    );
    src
}

fn restored_equals(store: &str, id: &str, src: &Path, dir: &Path, fmt: &str) {
    let out = p(dir, &format!("restored-{}.{fmt}", &id[..8]));
    dk_ok(&["snapshot", "restore", "-O", fmt, store, id, path_str(&out)]);
    if fmt == "qcow2" {
        qemu_img(&["check", path_str(&out)]);
    }
    qemu_img(&["compare", "-F", fmt, path_str(src), path_str(&out)]);
}

fn round_trip(store: &str, dir: &Path) {
    let qcow2 = qcow2_source(dir);
    let compressed = p(dir, "data-c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        path_str(&qcow2),
        path_str(&compressed),
    ]);
    let vhd = p(dir, "data.vhd");
    qemu_img(&["convert", "-O", "vpc", path_str(&qcow2), path_str(&vhd)]);
    let raw = p(dir, "data.raw");
    qemu_img(&["convert", "-O", "raw", path_str(&qcow2), path_str(&raw)]);
    let (first, summary) = create(&["--name", "data1", "--tag", "env=test"], &qcow2, store);
    assert!(summary.contains("every data chunk read"), "{summary}");
    // The snapshot's digest is diskkit hash's at the store's chunk size.
    let digest = dk_ok(&["hash", path_str(&qcow2)]);
    assert!(
        summary.contains(digest.split_whitespace().next().unwrap()),
        "{summary}\n{digest}"
    );
    restored_equals(store, &first, &qcow2, dir, "raw");
    restored_equals(store, &first, &qcow2, dir, "qcow2");
    for src in [&compressed, &vhd, &raw] {
        let (id, out) = create(&[], src, store);
        // Same guest content: no new chunk stored.
        assert!(out.contains("stored 0 B new"), "{out}");
        restored_equals(store, &id, src, dir, "vpc");
    }
    let ls = dk_ok(&["snapshot", "ls", "--output", "json", store]);
    let list: serde_json::Value = serde_json::from_str(&ls).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 4, "{ls}");
    assert!(ls.contains("\"env\": \"test\""), "{ls}");
    // A unique prefix is enough; a snapshot is an image source.
    let spec = format!("{store}#{}", &first[..6]);
    dk_ok(&["compare", &spec, path_str(&qcow2)]);
    assert_eq!(
        dk_ok(&["hash", &spec]).split_whitespace().next(),
        digest.split_whitespace().next()
    );
    let (code, out, _) = dk(&["snapshot", "verify", "--read-data", store]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn local_store_round_trips_every_source_format() {
    let dir = tempdir();
    let store = p(dir.path(), "store");
    round_trip(path_str(&store), dir.path());
}

#[test]
fn s3_store_round_trips_every_source_format() {
    let Some(endpoint) = s3::shared_server() else {
        return;
    };
    // SAFETY: set before any thread of this test binary reads the environment for S3.
    unsafe { std::env::set_var("AWS_ENDPOINT_URL", &endpoint) };
    let dir = tempdir();
    let prefix = format!(
        "s3://diskkit-test/snapshots-{}-{}",
        std::process::id(),
        dir.path().file_name().unwrap().to_string_lossy()
    );
    round_trip(&prefix, dir.path());
}

#[test]
fn overlay_incremental_reads_only_the_overlay_and_diff_lists_the_writes() {
    let dir = tempdir();
    let store = p(dir.path(), "store");
    let store = path_str(&store);
    let base = qcow2_source(dir.path());
    let (parent, _) = create(&[], &base, store);
    let top = p(dir.path(), "top.qcow2");
    qcow2_overlay(&top, "data.qcow2", "qcow2");
    qemu_io(
        "qcow2",
        &top,
        &["write -P 0x44 4M 64k", "write -P 0x55 30M 1M"],
    );
    let (child, out) = create(&["--parent", &parent[..8]], &top, store);
    assert!(out.contains("overlay"), "{out}");
    // Two chunks hold the overlay's clusters: only they were read.
    assert!(out.contains("read 8 MiB,"), "{out}");
    restored_equals(store, &child, &top, dir.path(), "raw");
    let diff = dk_ok(&[
        "snapshot", "diff", "--output", "json", store, &parent, &child,
    ]);
    let ranges: serde_json::Value = serde_json::from_str(&diff).unwrap();
    assert_eq!(
        ranges,
        serde_json::json!([
            {"start": 4 * MIB, "length": 4 * MIB},
            {"start": 28 * MIB, "length": 4 * MIB},
        ]),
        "{diff}"
    );
    // Without a matching backing file, every data chunk is read.
    let flat = p(dir.path(), "flat.qcow2");
    qemu_img(&["convert", "-O", "qcow2", path_str(&top), path_str(&flat)]);
    let (_, out) = create(&["--parent", &parent], &flat, store);
    assert!(out.contains("every data chunk read"), "{out}");
}

#[test]
fn rm_and_gc_free_exactly_the_unreferenced_chunks() {
    let dir = tempdir();
    let store_dir = p(dir.path(), "store");
    let store = path_str(&store_dir);
    let a = qcow2_source(dir.path());
    let (id_a, _) = create(&[], &a, store);
    let b = p(dir.path(), "b.qcow2");
    qemu_img(&["convert", "-O", "qcow2", path_str(&a), path_str(&b)]);
    qemu_io("qcow2", &b, &["write -P 0x66 44M 4M"]);
    let (id_b, _) = create(&[], &b, store);
    let chunks = |dir: &Path| walk_files(&dir.join("chunks")).len();
    // a: 0x11 chunk (x2, one stored), 0x22 chunk, 0x33 chunk; b adds its 0x66 chunk.
    assert_eq!(chunks(&store_dir), 4);
    let out = dk_ok(&["snapshot", "gc", store]);
    assert!(out.contains("0 removed"), "{out}");
    dk_ok(&["snapshot", "rm", store, &id_b[..10]]);
    let out = dk_ok(&["snapshot", "gc", store]);
    assert!(out.contains("1 removed"), "{out}");
    assert_eq!(chunks(&store_dir), 3);
    restored_equals(store, &id_a, &a, dir.path(), "raw");
    dk_ok(&["snapshot", "rm", store, &id_a]);
    dk_ok(&["snapshot", "gc", store]);
    assert_eq!(chunks(&store_dir), 0);
}

#[test]
fn gc_and_create_never_overlap() {
    let dir = tempdir();
    let store_dir = p(dir.path(), "store");
    let store = path_str(&store_dir);
    let src = qcow2_source(dir.path());
    create(&[], &src, store);
    let host = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // A create in progress (PID 1 is alive): gc removes nothing.
    std::fs::create_dir_all(store_dir.join("leases")).unwrap();
    let lease = store_dir.join("leases/other-1-1");
    let holder = format!(r#"{{"host": "{host}", "pid": 1, "started": {now}}}"#);
    std::fs::write(&lease, &holder).unwrap();
    let (code, _, err) = dk(&["snapshot", "gc", store]);
    assert_eq!(code, 2);
    assert!(err.contains("snapshot create is running"), "{err}");
    // A lease of a process that is gone is not in the way.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::write(
        &lease,
        format!(r#"{{"host": "{host}", "pid": {dead}, "started": {now}}}"#),
    )
    .unwrap();
    dk_ok(&["snapshot", "gc", store]);
    assert!(!lease.exists());
    // A gc in progress: create refuses to start, and stores nothing.
    std::fs::write(store_dir.join("gc.lock"), &holder).unwrap();
    let before = walk_files(&store_dir.join("chunks"));
    let other = p(dir.path(), "other.raw");
    std::fs::write(&other, vec![0x99; 5 * MIB as usize]).unwrap();
    let (code, _, err) = dk(&["snapshot", "create", path_str(&other), store]);
    assert_eq!(code, 2);
    assert!(err.contains("garbage collection is running"), "{err}");
    assert_eq!(walk_files(&store_dir.join("chunks")), before);
    assert!(walk_files(&store_dir.join("leases")).is_empty());
}

#[test]
fn damage_is_found_by_verify_and_restore() {
    let dir = tempdir();
    let store_dir = p(dir.path(), "store");
    let store = path_str(&store_dir);
    let src = qcow2_source(dir.path());
    let (id, _) = create(&[], &src, store);
    let chunks = walk_files(&store_dir.join("chunks"));
    // Flip a byte of one chunk's stored data; remove another.
    let mut bytes = std::fs::read(&chunks[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&chunks[0], bytes).unwrap();
    let (code, _, _) = dk(&["snapshot", "verify", store]);
    assert_eq!(code, 0, "without --read-data only presence is checked");
    let (code, out, _) = dk(&["snapshot", "verify", "--read-data", store]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("CRC") && out.contains(&id) && out.contains("DAMAGED"),
        "{out}"
    );
    std::fs::remove_file(&chunks[1]).unwrap();
    let (code, out, _) = dk(&["snapshot", "verify", store]);
    assert_eq!(code, 1);
    assert!(out.contains("missing"), "{out}");
    let dst = p(dir.path(), "restored.raw");
    let (code, _, err) = dk(&["snapshot", "restore", store, &id, path_str(&dst)]);
    assert_eq!(code, 2);
    assert!(err.contains("chunk"), "{err}");
    assert!(!dst.exists());
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains("diskkit-tmp")),
        "{names:?}"
    );
}

#[test]
fn hostile_store_contents_are_named_errors() {
    let dir = tempdir();
    let store_dir = p(dir.path(), "store");
    let store = path_str(&store_dir);
    let src = qcow2_source(dir.path());
    let (id, _) = create(&[], &src, store);
    let index = store_dir.join("snapshots").join(&id);
    let bytes = std::fs::read(&index).unwrap();
    std::fs::write(&index, &bytes[..bytes.len() - 7]).unwrap();
    let (code, _, err) = dk(&["snapshot", "info", store, &id]);
    assert_eq!(code, 2);
    assert!(err.contains("snapshot index") && err.contains(&id), "{err}");
    // Names that are not ids are never taken from a listing or from the user.
    std::fs::write(store_dir.join("snapshots/..hidden"), b"x").unwrap();
    let (code, _, err) = dk(&["snapshot", "info", store, "../../etc"]);
    assert_eq!(code, 2);
    assert!(err.contains("hexadecimal"), "{err}");
    let (code, _, err) = dk(&["snapshot", "ls", path_str(&p(dir.path(), "nowhere"))]);
    assert_eq!(code, 2);
    assert!(err.contains("no snapshot store"), "{err}");
}

#[test]
fn killed_create_leaves_no_snapshot_and_a_rerun_completes() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempdir();
    let store_dir = p(dir.path(), "store");
    let store = path_str(&store_dir);
    // Incompressible data, so the create takes long enough to be killed in the middle.
    let src = p(dir.path(), "big.raw");
    std::fs::write(&src, pseudo_random(7, 96 * MIB as usize)).unwrap();
    let mut killed = false;
    for delay_ms in [150, 60, 20, 5] {
        let mut child = Command::new(diskkit_bin())
            .args(["snapshot", "create", path_str(&src), store])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        if child.wait().unwrap().signal() == Some(libc::SIGKILL) {
            killed = true;
            break;
        }
        std::fs::remove_dir_all(&store_dir).unwrap();
    }
    assert!(killed, "every create finished before the kill");
    // Nothing lists missing chunks; the rerun completes and verifies.
    if store_dir.join("config").exists() {
        let (code, out, _) = dk(&["snapshot", "verify", store]);
        assert_eq!(code, 0, "{out}");
    }
    let (id, _) = create(&[], &src, store);
    dk_ok(&["snapshot", "verify", "--read-data", store]);
    restored_equals(store, &id, &src, dir.path(), "raw");
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(walk_files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[test]
fn encrypted_store_round_trips_and_refuses_a_wrong_or_missing_key() {
    let dir = tempdir();
    let store_dir = p(dir.path(), "store");
    let store = path_str(&store_dir);
    let key = p(dir.path(), "key");
    std::fs::write(&key, "11".repeat(32)).unwrap();
    let wrong = p(dir.path(), "wrong");
    std::fs::write(&wrong, "22".repeat(32)).unwrap();
    let src = qcow2_source(dir.path());
    let (code, _, err) = dk(&["snapshot", "create", "--encrypt", path_str(&src), store]);
    assert_eq!(code, 2);
    assert!(err.contains("needs a key"), "{err}");
    let (id, _) = create(&["--encrypt", "--key-file", path_str(&key)], &src, store);
    // Neither names nor bytes reveal the content: no chunk is named by its SHA-256, and the
    // index does not show the disk's name.
    let digest = dk_ok(&["hash", path_str(&src)]);
    let sha_of_first = {
        let data = vec![0x11u8; 4 * MIB as usize];
        let out = Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        out.stdin.as_ref().unwrap().write_all(&data).unwrap();
        let o = out.wait_with_output().unwrap();
        String::from_utf8(o.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let names: Vec<String> = walk_files(&store_dir.join("chunks"))
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.is_empty() && !names.contains(&sha_of_first),
        "{names:?}"
    );
    let index = std::fs::read(store_dir.join("snapshots").join(&id)).unwrap();
    assert!(!String::from_utf8_lossy(&index).contains("data.qcow2"));
    let keyed = ["--key-file", path_str(&key)];
    let mut restore = vec!["snapshot", "restore"];
    restore.extend(keyed);
    let out = p(dir.path(), "restored.raw");
    restore.extend([store, &id, path_str(&out)]);
    dk_ok(&restore);
    qemu_img(&["compare", path_str(&src), path_str(&out)]);
    let info = dk_ok(&["snapshot", "info", "--key-file", path_str(&key), store, &id]);
    assert!(
        info.contains(digest.split_whitespace().next().unwrap()),
        "{info}"
    );
    let (code, _, err) = dk(&["snapshot", "ls", store]);
    assert_eq!(code, 2);
    assert!(err.contains("encrypted"), "{err}");
    let (code, _, err) = dk(&["snapshot", "ls", "--key-file", path_str(&wrong), store]);
    assert_eq!(code, 2);
    assert!(err.contains("wrong key"), "{err}");
    let verify = dk_ok(&[
        "snapshot",
        "verify",
        "--read-data",
        "--key-file",
        path_str(&key),
        store,
    ]);
    assert!(verify.contains("OK"), "{verify}");
}

#[test]
fn bitmap_incremental_reads_only_the_marked_chunks() {
    let dir = tempdir();
    let store_dir = p(dir.path(), "store");
    let store = path_str(&store_dir);
    let img = qcow2_source(dir.path());
    let (parent, _) = create(&[], &img, store);
    qemu_img(&["bitmap", "--add", path_str(&img), "since-parent"]);
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x77 9M 4k", "write -P 0x78 44M 1M"],
    );
    let info = dk_ok(&["info", "--output", "json", path_str(&img)]);
    assert!(info.contains("\"since-parent\""), "{info}");
    let (child, out) = create(
        &["--parent", &parent, "--bitmap", "since-parent"],
        &img,
        store,
    );
    assert!(out.contains("bitmap"), "{out}");
    // The two chunks holding the writes were read, nothing else.
    assert!(out.contains("read 8 MiB,"), "{out}");
    restored_equals(store, &child, &img, dir.path(), "raw");
    // Bitmaps that cannot be trusted are refused.
    let refused = |bitmap: &str, image: &Path| {
        let args = [
            "snapshot", "create", "--parent", &parent, "--bitmap", bitmap,
        ];
        let (code, _, err) = dk(&[&args[..], &[path_str(image), store]].concat());
        assert_eq!(code, 2, "{err}");
        err
    };
    let err = refused("nope", &img);
    assert!(err.contains("since-parent"), "{err}");
    let mut bytes = std::fs::read(&img).unwrap();
    // The in-use flag of the directory entry (stale copies of the directory in freed clusters
    // may hold the name too).
    let names: Vec<usize> = (0..bytes.len() - 12)
        .filter(|&i| &bytes[i..i + 12] == b"since-parent")
        .collect();
    assert!(!names.is_empty());
    for at in names {
        bytes[at - 24 + 15] |= 1;
    }
    let in_use = p(dir.path(), "in-use.qcow2");
    std::fs::write(&in_use, &bytes).unwrap();
    let err = refused("since-parent", &in_use);
    assert!(err.contains("in use"), "{err}");
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[95] &= !1; // the "bitmaps consistent" autoclear bit
    std::fs::write(&in_use, &bytes).unwrap();
    let err = refused("since-parent", &in_use);
    assert!(err.contains("inconsistent"), "{err}");
}

//! qcow2 images changed in place (internal snapshots, amend, bitmaps), judged by qemu-img and
//! qemu-io both ways, and killed with SIGKILL at every commit step.

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

#[test]
fn snapshots_made_by_diskkit_are_read_applied_and_kept_by_qemu() {
    let dir = tempdir();
    let img = qcow2_fixture(dir.path(), "a.qcow2", "cluster_size=4k");
    let first = qemu_guest_bytes(&img, dir.path());
    diskkit_ok(&["snapshot", "-c", "one", path_str(&img)]);
    assert_no_corruption(&img);
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x55 0 8k", "write -P 0x66 5M 100k"],
    );
    let second = qemu_guest_bytes(&img, dir.path());
    diskkit_ok(&["snapshot", "-c", "two", path_str(&img)]);
    qemu_io("qcow2", &img, &["write -P 0x77 1M 64k", "write -z 0 4k"]);
    assert_no_corruption(&img);

    let list = qemu_img(&["snapshot", "-l", path_str(&img)]);
    assert!(list.contains("one") && list.contains("two"), "{list}");
    let i = qemu_info(&img);
    assert_eq!(i["snapshots"][0]["id"], "1");
    assert_eq!(i["snapshots"][1]["id"], "2");
    assert_eq!(i["snapshots"][0]["vm-state-size"], 0);
    assert_eq!(snapshot_bytes(&img, "one"), first);
    assert_eq!(snapshot_bytes(&img, "two"), second);
    let ours = diskkit_ok(&["snapshot", "-l", path_str(&img)]);
    assert!(ours.contains("one") && ours.contains("two"), "{ours}");
    assert_eq!(
        ours.lines()
            .filter(|l| l.starts_with("1 ") || l.starts_with("2 "))
            .count(),
        2,
        "{ours}"
    );

    // Apply by name: the guest is the snapshot's; qemu's writes then leave snapshot two alone.
    diskkit_ok(&["snapshot", "-a", "one", path_str(&img)]);
    assert_no_corruption(&img);
    assert_eq!(qemu_guest_bytes(&img, dir.path()), first);
    qemu_io("qcow2", &img, &["write -P 0x99 0 2M"]);
    assert_no_corruption(&img);
    assert_eq!(snapshot_bytes(&img, "one"), first);
    assert_eq!(snapshot_bytes(&img, "two"), second);

    // Delete by ID and by name; qemu applies what is left.
    diskkit_ok(&["snapshot", "-d", "1", path_str(&img)]);
    assert_no_corruption(&img);
    let list = qemu_img(&["snapshot", "-l", path_str(&img)]);
    assert!(!list.contains("one") && list.contains("two"), "{list}");
    qemu_img(&["snapshot", "-a", "two", path_str(&img)]);
    assert_eq!(qemu_guest_bytes(&img, dir.path()), second);
    diskkit_ok(&["snapshot", "-d", "two", path_str(&img)]);
    assert_no_corruption(&img);
    assert_eq!(qemu_guest_bytes(&img, dir.path()), second);
    assert!(qemu_info(&img)["snapshots"].is_null());
    // Everything the snapshots held is free again: qemu-img check counts no leak either.
    let (code, _, _) = diskkit(&["snapshot", "-d", "two", path_str(&img)]);
    assert_eq!(code, 2, "deleting a missing snapshot is an error");
}

#[test]
fn snapshots_made_by_qemu_are_applied_and_deleted_by_diskkit() {
    let dir = tempdir();
    let img = qcow2_fixture(dir.path(), "q.qcow2", "compat=0.10");
    let first = qemu_guest_bytes(&img, dir.path());
    qemu_img(&["snapshot", "-c", "base", path_str(&img)]);
    qemu_io("qcow2", &img, &["write -P 0x5a 0 1M"]);
    qemu_img(&["snapshot", "-c", "later", path_str(&img)]);
    let second = qemu_guest_bytes(&img, dir.path());
    let (code, _, err) = diskkit(&["snapshot", "-c", "base", path_str(&img)]);
    assert_eq!(code, 2);
    assert!(err.contains("exists"), "{err}");

    diskkit_ok(&["snapshot", "-a", "base", path_str(&img)]);
    assert_no_corruption(&img);
    assert_eq!(qemu_guest_bytes(&img, dir.path()), first);
    diskkit_ok(&["snapshot", "-d", "base", path_str(&img)]);
    assert_no_corruption(&img);
    assert_eq!(snapshot_bytes(&img, "later"), second);
    // A new snapshot after qemu's: the next ID, as qemu numbers them.
    diskkit_ok(&["snapshot", "-c", "mine", path_str(&img)]);
    assert_eq!(qemu_info(&img)["snapshots"][1]["id"], "3");
    assert_no_corruption(&img);
    // Store snapshots keep their subcommand form beside the flags.
    let (code, _, err) = diskkit(&["snapshot", "ls", path_str(&dir.path().join("nostore"))]);
    assert_ne!(code, 0);
    assert!(!err.contains("unexpected argument"), "{err}");
}

#[test]
fn amend_downgrades_and_upgrades_as_qemu_reads_them() {
    let dir = tempdir();
    // Zero clusters (a version 3 feature) over a backing file: written out as zeroed clusters.
    qcow2_fixture(dir.path(), "base.qcow2", "cluster_size=64k");
    let img = p(dir.path(), "top.qcow2");
    qcow2_overlay(&img, "base.qcow2", "qcow2");
    qemu_io(
        "qcow2",
        &img,
        &["write -z 0 128k", "write -P 0x21 1M 64k", "write -z 3M 1M"],
    );
    qemu_img(&["snapshot", "-c", "s", path_str(&img)]);
    let before = qemu_view(&img);
    diskkit_ok(&["amend", "-o", "compat=0.10", path_str(&img)]);
    assert_no_corruption(&img);
    let after = qemu_view(&img);
    assert_eq!(after.0, before.0);
    assert_eq!(after.1, before.1);
    assert_eq!(qemu_info(&img)["format-specific"]["data"]["compat"], "0.10");

    diskkit_ok(&[
        "amend",
        "-o",
        "compat=1.1,lazy_refcounts=on",
        "-o",
        "refcount_bits=4",
        path_str(&img),
    ]);
    assert_no_corruption(&img);
    let d = qemu_info(&img)["format-specific"]["data"].clone();
    assert_eq!(d["compat"], "1.1");
    assert_eq!(d["lazy-refcounts"], true);
    assert_eq!(d["refcount-bits"], 4);
    assert_eq!(qemu_view(&img).0, before.0);
    // qemu writes through the new refcounts.
    qemu_io("qcow2", &img, &["write -P 0x31 6M 256k"]);
    assert_no_corruption(&img);

    let (code, _, err) = diskkit(&["amend", "-o", "compat=0.10", path_str(&img)]);
    assert_eq!(code, 2);
    assert!(err.contains("lazy refcounts"), "{err}");
    // One-bit refcounts cannot count clusters the snapshot shares.
    let (code, _, err) = diskkit(&["amend", "-o", "refcount_bits=1", path_str(&img)]);
    assert_eq!(code, 2);
    assert!(err.contains("references"), "{err}");
    assert_no_corruption(&img);
}

#[test]
fn amend_refuses_downgrades_the_features_forbid() {
    let dir = tempdir();
    for (opts, feature) in [
        ("compression_type=zstd", "zstd"),
        ("extended_l2=on", "extended L2"),
        ("lazy_refcounts=on", "lazy refcounts"),
        ("refcount_bits=8", "8-bit refcounts"),
    ] {
        let img = qcow2_fixture(dir.path(), "f.qcow2", opts);
        let (code, _, err) = diskkit(&["amend", "-o", "compat=0.10", path_str(&img)]);
        assert_eq!(code, 2, "{opts}");
        assert!(err.contains(feature), "{opts}: {err}");
        assert_eq!(qemu_info(&img)["format-specific"]["data"]["compat"], "1.1");
    }
    let img = qcow2_fixture(dir.path(), "b.qcow2", "cluster_size=64k");
    qemu_img(&["bitmap", "--add", path_str(&img), "b"]);
    let (code, _, err) = diskkit(&["amend", "-o", "compat=0.10", path_str(&img)]);
    assert_eq!(code, 2);
    assert!(err.contains("bitmaps"), "{err}");
}

#[test]
fn bitmaps_both_ways() {
    let dir = tempdir();
    let img = qcow2_fixture(dir.path(), "b.qcow2", "cluster_size=64k");
    diskkit_ok(&["bitmap", "--add", "-g", "128K", path_str(&img), "ours"]);
    qemu_img(&["bitmap", "--add", path_str(&img), "theirs"]);
    assert_no_corruption(&img);
    // qemu records its writes in both (enabled) bitmaps: clusters of bits appear.
    qemu_io("qcow2", &img, &["write -P 0x42 2M 512k"]);
    assert_no_corruption(&img);
    let b = qemu_info(&img)["format-specific"]["data"]["bitmaps"].clone();
    assert_eq!(b[0]["name"], "ours");
    assert_eq!(b[0]["granularity"], 131072);
    assert_eq!(b[0]["flags"], serde_json::json!(["auto"]));
    assert_eq!(b[1]["name"], "theirs");
    let ours = diskkit_ok(&["info", "--output", "json", path_str(&img)]);
    let ours: Value = serde_json::from_str(&ours).unwrap();
    assert_eq!(ours["format-specific"]["data"]["bitmaps"], b);

    // An in-place change elsewhere keeps the bitmaps' clusters.
    diskkit_ok(&["snapshot", "-c", "s", path_str(&img)]);
    assert_no_corruption(&img);
    diskkit_ok(&["bitmap", "--disable", path_str(&img), "theirs"]);
    let b = qemu_info(&img)["format-specific"]["data"]["bitmaps"].clone();
    assert_eq!(b[1]["flags"], serde_json::json!([]));
    diskkit_ok(&["bitmap", "--enable", path_str(&img), "theirs"]);
    diskkit_ok(&["bitmap", "--clear", path_str(&img), "ours"]);
    assert_no_corruption(&img);

    // qemu copies the bitmaps diskkit wrote.
    let copy = p(dir.path(), "copy.qcow2");
    qemu_img(&[
        "convert",
        "--bitmaps",
        "-O",
        "qcow2",
        path_str(&img),
        path_str(&copy),
    ]);
    let b = qemu_info(&copy)["format-specific"]["data"]["bitmaps"].clone();
    assert_eq!(b.as_array().map(Vec::len), Some(2), "{b}");

    diskkit_ok(&["bitmap", "--remove", path_str(&img), "ours"]);
    diskkit_ok(&["bitmap", "--remove", path_str(&img), "theirs"]);
    assert_no_corruption(&img);
    assert!(qemu_info(&img)["format-specific"]["data"]["bitmaps"].is_null());
    let (code, _, err) = diskkit(&["bitmap", "--clear", path_str(&img), "gone"]);
    assert_eq!(code, 2);
    assert!(err.contains("no persistent bitmap"), "{err}");
}

/// Runs `args` with DISKKIT_STOP_AT=`step`, waits until diskkit says it stopped there, and
/// kills it with SIGKILL.
fn kill_at(args: &[&str], step: &str) {
    let mut child = Command::new(diskkit_bin())
        .args(args)
        .env("DISKKIT_STOP_AT", step)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let reached = lines.any(|l| l.unwrap().contains(&format!("after step '{step}'")));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(reached, "diskkit {args:?} ended before step {step}");
}

#[test]
fn sigkill_at_every_step_leaves_the_image_as_before_or_after() {
    let dir = tempdir();
    let base = qcow2_fixture(dir.path(), "base.qcow2", "cluster_size=4k");
    qemu_img(&["snapshot", "-c", "old", path_str(&base)]);
    qemu_io("qcow2", &base, &["write -P 0x71 0 1M", "write -z 6M 512k"]);
    qemu_img(&["bitmap", "--add", path_str(&base), "bm"]);
    // (arguments before IMAGE, after IMAGE)
    let ops: [(&[&str], &[&str]); 7] = [
        (&["snapshot", "-c", "new"], &[]),
        (&["snapshot", "-a", "old"], &[]),
        (&["snapshot", "-d", "old"], &[]),
        (&["amend", "-o", "refcount_bits=8"], &[]),
        (&["bitmap", "--add"], &["b2"]),
        (&["bitmap", "--remove"], &["bm"]),
        (&["bitmap", "--disable"], &["bm"]),
    ];
    for (op, tail) in ops {
        let work = p(dir.path(), "work.qcow2");
        std::fs::copy(&base, &work).unwrap();
        let mut args = op.to_vec();
        args.push(path_str(&work));
        args.extend(tail);
        let before = qemu_view(&work);
        diskkit_ok(&args);
        let after = qemu_view(&work);
        assert_ne!(before, after, "{op:?} changes what qemu sees");
        for (step, expect_after) in [("written", false), ("refcounts", false), ("header", true)] {
            std::fs::copy(&base, &work).unwrap();
            kill_at(&args, step);
            assert_no_corruption(&work);
            let seen = qemu_view(&work);
            let want = if expect_after { &after } else { &before };
            assert!(
                &seen == want,
                "{op:?} killed after {step}: not the expected state"
            );
        }
    }
    // amend compat=0.10 needs an image without bitmaps.
    let work = p(dir.path(), "v2.qcow2");
    for step in ["written", "refcounts", "header"] {
        std::fs::copy(&base, &work).unwrap();
        diskkit_ok(&["bitmap", "--remove", path_str(&work), "bm"]);
        let before = qemu_view(&work);
        kill_at(&["amend", "-o", "compat=0.10", path_str(&work)], step);
        assert_no_corruption(&work);
        let seen = qemu_view(&work);
        if step == "header" {
            assert_eq!(seen.0, before.0);
            assert!(seen.2.contains("compat=\"0.10\""), "{}", seen.2);
        } else {
            assert!(seen == before, "amend killed after {step}");
        }
    }
}

/// base.qcow2 <- top.qcow2, and other.qcow2 (partly the same as base, partly not).
fn chain(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let base = qcow2_fixture(dir, "base.qcow2", "cluster_size=64k");
    let other = p(dir, "other.qcow2");
    std::fs::copy(&base, &other).unwrap();
    qemu_io(
        "qcow2",
        &other,
        &[
            "write -P 0x61 0 32k",
            "write -z 3M 64k",
            "write -P 0x62 7M 100k",
        ],
    );
    let top = p(dir, "top.qcow2");
    qcow2_overlay(&top, "base.qcow2", "qcow2");
    qemu_io(
        "qcow2",
        &top,
        &["write -P 0x63 16k 8k", "write -P 0x64 5M 1M"],
    );
    (base, other, top)
}

#[test]
fn rebase_keeps_the_guest_and_qemu_reads_it() {
    let dir = tempdir();
    let (_, other, top) = chain(dir.path());
    let guest = qemu_guest_bytes(&top, dir.path());
    diskkit_ok(&["rebase", "-b", "other.qcow2", "-F", "qcow2", path_str(&top)]);
    assert_no_corruption(&top);
    assert_eq!(qemu_guest_bytes(&top, dir.path()), guest);
    assert_eq!(qemu_info(&top)["backing-filename"], "other.qcow2");
    assert_eq!(qemu_info(&top)["backing-filename-format"], "qcow2");
    // -u: the backing file moved; only the name changes.
    std::fs::rename(&other, p(dir.path(), "moved.qcow2")).unwrap();
    diskkit_ok(&["rebase", "-u", "-b", "moved.qcow2", path_str(&top)]);
    assert_no_corruption(&top);
    assert_eq!(qemu_guest_bytes(&top, dir.path()), guest);
    // No backing file at all: everything the guest sees comes into the image.
    diskkit_ok(&["rebase", "-b", "", path_str(&top)]);
    assert_no_corruption(&top);
    assert!(qemu_info(&top)["backing-filename"].is_null());
    assert_eq!(qemu_guest_bytes(&top, dir.path()), guest);
}

#[test]
fn commit_moves_the_overlay_into_its_base() {
    let dir = tempdir();
    let (base, _, top) = chain(dir.path());
    let guest = qemu_guest_bytes(&top, dir.path());
    diskkit_ok(&["commit", "-d", path_str(&top)]);
    assert_no_corruption(&base);
    assert_eq!(qemu_guest_bytes(&base, dir.path()), guest);
    assert_eq!(qemu_guest_bytes(&top, dir.path()), guest);
    // Without -d the overlay is emptied: nothing allocated in it any more.
    qemu_io("qcow2", &top, &["write -P 0x65 1M 64k"]);
    let guest = qemu_guest_bytes(&top, dir.path());
    diskkit_ok(&["commit", path_str(&top)]);
    assert_no_corruption(&top);
    assert_no_corruption(&base);
    assert_eq!(qemu_guest_bytes(&base, dir.path()), guest);
    assert_eq!(qemu_guest_bytes(&top, dir.path()), guest);
    let map = qemu_img(&["map", "--output=json", path_str(&top)]);
    assert!(!map.contains("\"depth\": 0, \"present\": true"), "{map}");
    // A raw base is written in place.
    let raw = p(dir.path(), "base.raw");
    qemu_img(&["convert", "-O", "raw", path_str(&base), path_str(&raw)]);
    let over = p(dir.path(), "over.qcow2");
    qcow2_overlay(&over, "base.raw", "raw");
    qemu_io(
        "qcow2",
        &over,
        &["write -P 0x66 100k 300k", "write -z 2M 1M"],
    );
    let guest = qemu_guest_bytes(&over, dir.path());
    diskkit_ok(&["commit", path_str(&over)]);
    assert_eq!(std::fs::read(&raw).unwrap(), guest);
    assert_no_corruption(&over);
}

#[test]
fn sigkill_during_rebase_and_commit_keeps_the_guest() {
    let dir = tempdir();
    let (base, _, top) = chain(dir.path());
    let guest = qemu_guest_bytes(&top, dir.path());
    let saved_base = p(dir.path(), "saved-base.qcow2");
    let saved_top = p(dir.path(), "saved-top.qcow2");
    std::fs::copy(&base, &saved_base).unwrap();
    std::fs::copy(&top, &saved_top).unwrap();
    for op in [&["rebase", "-b", "other.qcow2"][..], &["commit"][..]] {
        for step in ["written", "refcounts", "header"] {
            std::fs::copy(&saved_base, &base).unwrap();
            std::fs::copy(&saved_top, &top).unwrap();
            let mut args = op.to_vec();
            args.push(path_str(&top));
            kill_at(&args, step);
            assert_no_corruption(&top);
            assert_no_corruption(&base);
            assert_eq!(
                qemu_guest_bytes(&top, dir.path()),
                guest,
                "{op:?} killed after {step}"
            );
        }
    }
}

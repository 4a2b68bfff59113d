//! Bundles (full-ECS images): create, ls, info, verify, restore, a bundle's disk as an image,
//! rm's cascade, copy that sends only missing chunks, share links; on a local store and on the
//! suite's S3 server.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs diskkit with the S3 test settings in the environment (or, with `anonymous`, without any
/// credentials); returns (code, stdout, stderr).
fn run(args: &[&str], anonymous: bool) -> (i32, String, String) {
    let mut cmd = Command::new(diskkit_bin());
    cmd.args(args);
    if anonymous {
        for v in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL",
            "AWS_PROFILE",
        ] {
            cmd.env_remove(v);
        }
        cmd.env("HOME", "/nonexistent");
    } else {
        cmd.env("AWS_ACCESS_KEY_ID", "diskkittest")
            .env("AWS_SECRET_ACCESS_KEY", "diskkittestsecret")
            .env("AWS_REGION", "us-east-1");
    }
    let out = cmd.output().expect("run diskkit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn dk(args: &[&str]) -> (i32, String, String) {
    run(args, false)
}

fn dk_ok(args: &[&str]) -> String {
    let (code, out, err) = dk(args);
    assert_eq!(code, 0, "diskkit {args:?} failed:\n{out}\n{err}");
    out
}

fn dk_err(args: &[&str]) -> String {
    let (code, out, err) = dk(args);
    assert_eq!(code, 2, "diskkit {args:?} should fail:\n{out}\n{err}");
    err
}

/// A machine: a system qcow2, a VHD data disk that shares a chunk with it, a raw data disk.
struct Machine {
    system: PathBuf,
    vhd: PathBuf,
    raw: PathBuf,
}

fn machine(dir: &Path) -> Machine {
    let system = p(dir, "system.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&system), "24M"]);
    qemu_io(
        "qcow2",
        &system,
        &[
            "write -P 0x11 0 4M",
            "write -P 0x12 9M 2M",
            "write -P 0x13 20M 1M",
        ],
    );
    let vhd_src = p(dir, "data1.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&vhd_src), "16M"]);
    // Its first chunk is the system disk's first chunk: stored once.
    qemu_io(
        "qcow2",
        &vhd_src,
        &["write -P 0x11 0 4M", "write -P 0x21 8M 1M"],
    );
    let vhd = p(dir, "data1.vhd");
    qemu_img(&["convert", "-O", "vpc", path_str(&vhd_src), path_str(&vhd)]);
    let raw = mixed_raw(dir, "data2.raw", 12 << 20);
    Machine { system, vhd, raw }
}

fn create_full(store: &str, name: &str, m: &Machine) -> String {
    dk_ok(&[
        "bundle",
        "create",
        "--system",
        path_str(&m.system),
        "--data",
        &format!("vdb={}", path_str(&m.vhd)),
        "--data",
        &format!("vdc={}", path_str(&m.raw)),
        "--firmware",
        "uefi",
        "--os",
        "Debian 13",
        "--tag",
        "env=test",
        store,
        name,
    ])
}

fn manifest(store: &str, name: &str) -> serde_json::Value {
    let out = dk_ok(&["bundle", "info", "--output", "json", store, name]);
    serde_json::from_str(&out).unwrap()
}

fn snapshot_of(m: &serde_json::Value, device: &str) -> String {
    m["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == device)
        .unwrap()["snapshot"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Restores `name` from `store` into `dir` as qcow2 and compares every disk with its source.
fn restore_and_compare(store: &str, name: &str, m: &Machine, dir: &Path, anonymous: bool) {
    let (code, out, err) = run(
        &[
            "bundle",
            "restore",
            "-O",
            "qcow2",
            store,
            name,
            path_str(dir),
        ],
        anonymous,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    for (file, src) in [
        (format!("{name}-system.qcow2"), &m.system),
        (format!("{name}-data-vdb.qcow2"), &m.vhd),
        (format!("{name}-data-vdc.qcow2"), &m.raw),
    ] {
        let restored = p(dir, &file);
        qemu_img(&["check", path_str(&restored)]);
        qemu_img(&["compare", path_str(src), path_str(&restored)]);
    }
}

/// Bytes of the chunk objects of a local store.
fn chunk_bytes(store: &Path) -> u64 {
    fn walk(dir: &Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| {
                let m = e.metadata().unwrap();
                if m.is_dir() { walk(&e.path()) } else { m.len() }
            })
            .sum()
    }
    walk(&store.join("chunks"))
}

fn ls(store: &str) -> serde_json::Value {
    serde_json::from_str(&dk_ok(&["bundle", "ls", "--output", "json", store])).unwrap()
}

#[test]
fn full_ecs_bundle_on_a_local_store() {
    let dir = tempdir();
    let m = machine(dir.path());
    let store_dir = p(dir.path(), "store");
    let store = path_str(&store_dir);
    let out = create_full(store, "web", &m);
    assert!(out.starts_with("full-ecs bundle web with 3 disks"), "{out}");
    let list = ls(store);
    assert_eq!(list[0]["name"], "web");
    assert_eq!(list[0]["kind"], "full-ecs");
    assert_eq!(
        list[0]["disks"],
        serde_json::json!(["system:vda", "data:vdb", "data:vdc"])
    );
    let size = |f: &Path| {
        let info: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output", "json", path_str(f)])).unwrap();
        info["virtual-size"].as_u64().unwrap()
    };
    assert_eq!(
        list[0]["virtual_size"],
        size(&m.system) + size(&m.vhd) + size(&m.raw)
    );
    let man = manifest(store, "web");
    assert_eq!(man["firmware"], "uefi");
    assert_eq!(man["disks"][1]["source_format"], "vpc");
    // The shared chunk is stored once: 7 distinct data chunks of 4 MiB... at most.
    assert!(
        list[0]["stored_size"].as_u64().unwrap() <= 8 << 22,
        "{list}"
    );
    restore_and_compare(store, "web", &m, &p(dir.path(), "out"), false);
    // Names of the clouds' exports.
    let ali = p(dir.path(), "ali");
    dk_ok(&[
        "bundle",
        "restore",
        "--naming",
        "alibaba",
        store,
        "web",
        path_str(&ali),
    ]);
    for f in ["web_system_vda.raw", "web_data_vdb.raw", "web_data_vdc.raw"] {
        assert!(p(&ali, f).exists(), "{f}");
    }
    let tc = p(dir.path(), "tc");
    dk_ok(&[
        "bundle",
        "restore",
        "-O",
        "vpc",
        "--naming",
        "tencent",
        "--prefix",
        "exp",
        store,
        "web",
        path_str(&tc),
    ]);
    let vdb = snapshot_of(&man, "vdb");
    assert!(p(&tc, &format!("exp_web_data_{vdb}.vpc")).exists());
    // A bundle's disk is an image source.
    let spec = format!("{store}#web/vdb");
    dk_ok(&["compare", &spec, path_str(&m.vhd)]);
    assert_eq!(
        dk_ok(&["hash", &spec]).split_whitespace().next(),
        dk_ok(&["hash", path_str(&m.vhd)]).split_whitespace().next()
    );
    assert!(dk_err(&["info", &format!("{store}#web/vdz")]).contains("no disk vdz"));
    assert!(dk_ok(&["bundle", "verify", "--read-data", store, "web"]).contains("OK"));
    // A name is taken once.
    assert!(create_full(store, "web2", &m).contains("web2"));
    let e = dk_err(&[
        "bundle",
        "create",
        "--system",
        path_str(&m.system),
        store,
        "web",
    ]);
    assert!(e.contains("already exists"), "{e}");

    // rm: the data-disk snapshots go, the system disk another bundle lists stays.
    let system = snapshot_of(&man, "vda");
    dk_ok(&[
        "bundle",
        "create",
        "--system",
        &format!("@{}", &system[..8]),
        "--data",
        &format!("xvdb={}", path_str(&m.raw)),
        store,
        "shares-system",
    ]);
    let out = dk_ok(&["bundle", "rm", store, "web"]);
    assert!(
        out.contains(&format!("kept snapshot {system} (used by shares-system)")),
        "{out}"
    );
    let snapshots = dk_ok(&["snapshot", "ls", store]);
    assert!(snapshots.contains(&system), "{snapshots}");
    assert!(!snapshots.contains(&vdb), "{snapshots}");
    let names: Vec<String> = ls(store)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["shares-system", "web2"]);
    dk_ok(&[
        "compare",
        &format!("{store}#shares-system/vda"),
        path_str(&m.system),
    ]);

    // copy: all chunks the first time, then only the missing ones.
    let dst_dir = p(dir.path(), "dst");
    let dst = path_str(&dst_dir);
    let first: serde_json::Value = serde_json::from_str(&dk_ok(&[
        "bundle", "copy", "--output", "json", store, "web2", dst,
    ]))
    .unwrap();
    assert_eq!(first["bytes_sent"], chunk_bytes(&dst_dir));
    assert_eq!(first["chunks_sent"], first["chunks"]);
    let before = chunk_bytes(&dst_dir);
    let second: serde_json::Value = serde_json::from_str(&dk_ok(&[
        "bundle",
        "copy",
        "--output",
        "json",
        store,
        "shares-system",
        dst,
    ]))
    .unwrap();
    // Every chunk of shares-system is one web2 has: nothing to send.
    assert_eq!(second["bytes_sent"], 0, "{second}");
    assert_eq!(chunk_bytes(&dst_dir), before);
    assert!(dk_ok(&["bundle", "copy", store, "web2", dst]).contains("already"));
    restore_and_compare(dst, "web2", &m, &p(dir.path(), "copied"), false);
    assert!(dk_ok(&["bundle", "verify", "--read-data", dst, "web2"]).contains("OK"));
    // --system-only: the services' behaviour.
    let sys_dir = p(dir.path(), "sysonly");
    dk_ok(&[
        "bundle",
        "copy",
        "--system-only",
        store,
        "web2",
        path_str(&sys_dir),
    ]);
    assert_eq!(ls(path_str(&sys_dir))[0]["kind"], "system-disk");

    // A local directory has no server to serve a link.
    let e = dk_err(&["bundle", "share", "--expires", "1h", store, "web2"]);
    assert!(e.contains("local-directory store cannot be shared"), "{e}");

    // A damaged manifest is named and refused; verify says which.
    let manifest_file = p(&store_dir, "bundles/web2");
    let text = std::fs::read_to_string(&manifest_file).unwrap();
    std::fs::write(&manifest_file, text.replace("Debian 13", "Debian 14")).unwrap();
    let e = dk_err(&["bundle", "info", store, "web2"]);
    assert!(e.contains("bundles/web2") && e.contains("digest"), "{e}");
}

#[test]
fn bad_arguments_are_refused() {
    let dir = tempdir();
    let m = machine(dir.path());
    let store = p(dir.path(), "store");
    let store = path_str(&store);
    let sys = path_str(&m.system);
    for (args, says) in [
        (vec!["--system", sys, store, "../x"], "bundle name"),
        (
            vec!["--data", &format!("../b={sys}"), store, "x"],
            "device name",
        ),
        (vec![store, "empty"], "at least one disk"),
        (vec!["--iso", sys, store, "x"], "ISO 9660"),
    ] {
        let mut a = vec!["bundle", "create"];
        a.extend(args);
        let e = dk_err(&a);
        assert!(e.contains(says), "{a:?}: {e}");
    }
}

#[test]
fn iso_bundle_restores_byte_for_byte() {
    let dir = tempdir();
    let iso = p(dir.path(), "cd.iso");
    let tree = p(dir.path(), "tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("hello.txt"), b"hello").unwrap();
    let status = Command::new("xorriso")
        .args([
            "-as",
            "mkisofs",
            "-quiet",
            "-o",
            path_str(&iso),
            path_str(&tree),
        ])
        .status();
    if !status.is_ok_and(|s| s.success()) {
        let status = Command::new("genisoimage")
            .args(["-quiet", "-o", path_str(&iso), path_str(&tree)])
            .status()
            .expect("xorriso or genisoimage");
        assert!(status.success());
    }
    let store = p(dir.path(), "store");
    let store = path_str(&store);
    dk_ok(&["bundle", "create", "--iso", path_str(&iso), store, "cd"]);
    assert_eq!(ls(store)[0]["kind"], "iso");
    let out = p(dir.path(), "out");
    dk_ok(&["bundle", "restore", store, "cd", path_str(&out)]);
    assert_eq!(
        std::fs::read(p(&out, "cd.iso")).unwrap(),
        std::fs::read(&iso).unwrap()
    );
}

#[test]
fn s3_store_bundles_copies_and_share_links() {
    let Some(endpoint) = common::s3::shared_server() else {
        return;
    };
    // SAFETY: set before any thread of this test binary reads the environment for S3.
    unsafe { std::env::set_var("AWS_ENDPOINT_URL", &endpoint) };
    let dir = tempdir();
    let m = machine(dir.path());
    let s3 = format!(
        "s3://diskkit-test/bundles-{}-{}",
        std::process::id(),
        dir.path().file_name().unwrap().to_string_lossy()
    );
    create_full(&s3, "web", &m);
    assert_eq!(ls(&s3)[0]["kind"], "full-ecs");
    restore_and_compare(&s3, "web", &m, &p(dir.path(), "out"), false);
    // From S3 to a local store and back to another prefix: only missing chunks sent.
    let local = p(dir.path(), "local");
    let first: serde_json::Value = serde_json::from_str(&dk_ok(&[
        "bundle",
        "copy",
        "--output",
        "json",
        &s3,
        "web",
        path_str(&local),
    ]))
    .unwrap();
    assert_eq!(first["bytes_sent"], chunk_bytes(&local));
    let s3b = format!("{s3}-copy");
    let back: serde_json::Value = serde_json::from_str(&dk_ok(&[
        "bundle",
        "copy",
        "--output",
        "json",
        path_str(&local),
        "web",
        &s3b,
    ]))
    .unwrap();
    assert_eq!(back["bytes_sent"], first["bytes_sent"]);
    let again: serde_json::Value = serde_json::from_str(&dk_ok(&[
        "bundle",
        "copy",
        "--system-only",
        "--output",
        "json",
        &s3,
        "web",
        &format!("{s3}-sys"),
    ]))
    .unwrap();
    assert_eq!(again["disks"], 1);

    // A share link restores without credentials, until it expires.
    let link = dk_ok(&["bundle", "share", "--expires", "4s", &s3, "web"]);
    let link = link.trim();
    assert!(link.starts_with("http"), "{link}");
    restore_and_compare(link, "web", &m, &p(dir.path(), "shared"), true);
    let (code, out, err) = run(&["bundle", "info", link], true);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("kind: full-ecs"), "{out}");
    std::thread::sleep(std::time::Duration::from_secs(6));
    let (code, _, err) = run(
        &[
            "bundle",
            "restore",
            link,
            "web",
            path_str(&p(dir.path(), "late")),
        ],
        true,
    );
    assert_eq!(code, 2);
    assert!(err.contains("expired"), "{err}");
    assert!(!p(dir.path(), "late").join("web-system.raw").exists());
    // The server refuses it too, not only diskkit's own check of the link's date.
    if let Ok(out) = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", link])
        .output()
    {
        assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    }
}

/// `bundle info --target` checks the machine's disk count against the cloud's import limit:
/// 18 disks pass AWS's 21 and fail Alibaba's system disk + 16 data disks (exit 4).
#[test]
fn info_checks_the_disk_count_against_a_target() {
    let dir = tempdir();
    let disk = mixed_raw(dir.path(), "disk.raw", 8 << 20);
    let store = p(dir.path(), "store");
    let disk_arg = path_str(&disk);
    let data: Vec<String> = (0..17)
        .map(|i| format!("vd{}={disk_arg}", (b'b' + i) as char))
        .collect();
    let mut args = vec!["bundle", "create", "--system", disk_arg];
    for d in &data {
        args.extend(["--data", d]);
    }
    args.extend([path_str(&store), "many"]);
    dk_ok(&args);
    let out = dk_ok(&[
        "bundle",
        "info",
        "--target",
        "aws",
        path_str(&store),
        "many",
    ]);
    assert!(
        out.contains("target aws: disks pass: 18 disks, at most 21"),
        "{out}"
    );
    let (code, out, err) = dk(&[
        "bundle",
        "info",
        "--target",
        "alibaba",
        "--output",
        "json",
        path_str(&store),
        "many",
    ]);
    assert_eq!(code, 4, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["checks"][0]["status"], "fail", "{v}");
    assert_eq!(v["bundle"]["disks"].as_array().unwrap().len(), 18);
    assert!(
        dk_err(&[
            "bundle",
            "info",
            "--target",
            "moon",
            path_str(&store),
            "many"
        ])
        .contains("moon")
    );
}

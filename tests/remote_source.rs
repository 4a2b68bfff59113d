//! Bucket URLs as image sources: info, map, hash, compare and convert read an object in place
//! (ranged reads) in every format diskkit reads, and give what they give for the same file read
//! locally. Objects live in a local-directory bucket (`file://`) and on the S3 test server
//! (SeaweedFS, started by scripts/test.sh, which exports DISKKIT_TEST_S3_ENDPOINT).

mod common;

use common::*;
use diskkit::storage::{Location, Settings};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
const ACCESS_KEY: &str = "diskkittest";
const SECRET_KEY: &str = "diskkittestsecret";

/// diskkit with the S3 test server's settings (when given) and no profile of the user's.
fn run(dir: &Path, endpoint: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(diskkit_bin());
    cmd.args(args)
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_SESSION_TOKEN");
    match endpoint {
        Some(e) => cmd.env("AWS_ENDPOINT_URL", e),
        None => cmd.env_remove("AWS_ENDPOINT_URL"),
    };
    let out = cmd.output().expect("run diskkit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(dir: &Path, endpoint: Option<&str>, args: &[&str]) -> String {
    let (code, out, err) = run(dir, endpoint, args);
    assert_eq!(code, 0, "diskkit {args:?} failed:\n{out}\n{err}");
    out
}

/// One guest content in every format diskkit reads, made by qemu-img (and an ISO by xorriso).
fn fixtures(dir: &Path) -> Vec<PathBuf> {
    let base = mixed_raw(dir, "base.raw", 12 * MIB);
    let mut out = vec![base.clone()];
    for (name, args) in [
        ("plain.qcow2", &["-O", "qcow2"][..]),
        ("compressed.qcow2", &["-c", "-O", "qcow2"]),
        ("dynamic.vhd", &["-O", "vpc", "-o", "force_size=on"]),
        (
            "fixed.vhd",
            &["-O", "vpc", "-o", "subformat=fixed,force_size=on"],
        ),
        ("disk.vhdx", &["-O", "vhdx"]),
        ("sparse.vmdk", &["-O", "vmdk"]),
        (
            "stream.vmdk",
            &["-O", "vmdk", "-o", "subformat=streamOptimized"],
        ),
    ] {
        let path = dir.join(name);
        let mut a = vec!["convert", "-f", "raw"];
        a.extend(args);
        a.extend([path_str(&base), path_str(&path)]);
        qemu_img(&a);
        out.push(path);
    }
    let tree = dir.join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("a.bin"), pseudo_random(7, 300_000)).unwrap();
    std::fs::write(tree.join("b.txt"), b"hello from a bucket\n").unwrap();
    let iso = dir.join("tree.iso");
    let status = Command::new("xorriso")
        .args(["-as", "mkisofs", "-R", "-J", "-quiet", "-o"])
        .arg(&iso)
        .arg(&tree)
        .status()
        .expect("xorriso is needed (scripts/test.sh installs it)");
    assert!(status.success());
    out.push(iso);
    out
}

/// Copies every fixture into `bucket` written densely (no holes), as an object is: local reads
/// of these copies are what reads of the objects must equal (an object has no holes to map).
fn dense_copies(fixtures: &[PathBuf], bucket: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(bucket).unwrap();
    fixtures
        .iter()
        .map(|f| {
            let copy = bucket.join(f.file_name().unwrap());
            std::fs::write(&copy, std::fs::read(f).unwrap()).unwrap();
            copy
        })
        .collect()
}

/// The JSON of `info` without what names or measures the container (file name, disk size).
fn info_fields(json: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("filename");
    o.remove("actual-size");
    v
}

/// info, map, hash, compare and convert of `url` give what they give for `local`.
fn same_as_local(dir: &Path, endpoint: Option<&str>, local: &Path, url: &str) {
    let l = path_str(local);
    let e = endpoint;
    let info_local = ok(dir, e, &["info", "--output", "json", l]);
    let info_remote = ok(dir, e, &["info", "--output", "json", url]);
    assert_eq!(info_fields(&info_remote), info_fields(&info_local), "{url}");
    assert_eq!(
        ok(dir, e, &["map", "--output", "json", url]),
        ok(dir, e, &["map", "--output", "json", l]),
        "{url}"
    );
    let digest = |out: String| out.split_whitespace().next().unwrap().to_string();
    assert_eq!(
        digest(ok(dir, e, &["hash", url])),
        digest(ok(dir, e, &["hash", l])),
        "{url}"
    );
    ok(dir, e, &["compare", l, url]);
    ok(dir, e, &["compare", url, l]);
    // check reads the object in place and reports what it reports for the file (exit 63 for
    // formats without checks).
    let (local_code, local_report, _) = run(dir, e, &["check", "--output", "json", l]);
    let (remote_code, remote_report, _) = run(dir, e, &["check", "--output", "json", url]);
    assert_eq!(remote_code, local_code, "{url}");
    if local_code == 0 {
        assert_eq!(
            info_fields(&remote_report),
            info_fields(&local_report),
            "{url}"
        );
    }
    let out = dir.join("converted.qcow2");
    let _ = std::fs::remove_file(&out);
    ok(dir, e, &["convert", "-O", "qcow2", url, path_str(&out)]);
    qemu_img(&["check", path_str(&out)]);
    qemu_img(&[
        "compare",
        "-f",
        qemu_format(local),
        "-F",
        "qcow2",
        l,
        path_str(&out),
    ]);
}

/// qemu's name of the format of a fixture (it probes a fixed VHD as raw).
fn qemu_format(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => "qcow2",
        Some("vhd") => "vpc",
        Some("vhdx") => "vhdx",
        Some("vmdk") => "vmdk",
        _ => "raw",
    }
}

#[test]
fn local_bucket_objects_read_in_place() {
    let dir = tempdir();
    let d = dir.path();
    let bucket = d.join("bucket");
    for local in dense_copies(&fixtures(d), &bucket) {
        let url = format!("file://{}", local.display());
        same_as_local(d, None, &local, &url);
        if local.extension().is_some_and(|e| e == "qcow2") {
            let (code, _, err) = run(d, None, &["check", "-r", "leaks", &url]);
            assert_eq!(code, 2, "{err}");
            assert!(err.contains("repairs local files only"), "{err}");
        }
    }
}

#[test]
fn s3_objects_read_in_place() {
    let Some(endpoint) = std::env::var("DISKKIT_TEST_S3_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
    else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "DISKKIT_TEST_S3_ENDPOINT is not set: run the tests through scripts/test.sh"
        );
        eprintln!("skipped: no S3 test server (run scripts/test.sh to start one)");
        return;
    };
    let dir = tempdir();
    let d = dir.path();
    let prefix = format!("remote-source-{}", std::process::id());
    let settings = Settings {
        endpoint: Some(endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some(ACCESS_KEY.into()),
        secret_access_key: Some(SECRET_KEY.into()),
        ..Settings::default()
    };
    let store =
        diskkit::storage::open(&Location::parse("s3://diskkit-test/").unwrap(), &settings).unwrap();
    for local in dense_copies(&fixtures(d), &d.join("dense")) {
        let name = local.file_name().unwrap().to_string_lossy().into_owned();
        let key = format!("{prefix}/{name}");
        store.write(&key, std::fs::read(&local).unwrap()).unwrap();
        same_as_local(
            d,
            Some(&endpoint),
            &local,
            &format!("s3://diskkit-test/{key}"),
        );
    }
    let (code, _, err) = run(
        d,
        Some(&endpoint),
        &["info", &format!("s3://diskkit-test/{prefix}/missing.qcow2")],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("missing.qcow2") && err.contains("no such object"),
        "{err}"
    );
}

/// An image read from a bucket opens no local file: a backing file or a VMDK extent it names
/// is refused, even one that exists next to the bucket.
#[test]
fn bucket_images_name_no_local_files() {
    let dir = tempdir();
    let d = dir.path();
    let bucket = d.join("bucket");
    std::fs::create_dir(&bucket).unwrap();
    let secret = d.join("secret.raw");
    std::fs::write(&secret, vec![0x5a; 1 << 20]).unwrap();
    let overlay = bucket.join("overlay.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        path_str(&secret),
        "-F",
        "raw",
        path_str(&overlay),
    ]);
    let descriptor = bucket.join("flat.vmdk");
    std::fs::write(
        &descriptor,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
             createType=\"monolithicFlat\"\n\nRW 2048 FLAT \"{}\" 0\n\n\
             ddb.adapterType = \"ide\"\n",
            secret.display()
        ),
    )
    .unwrap();
    for (image, role) in [(&overlay, "backing file"), (&descriptor, "extent file")] {
        // Read locally, the named file is opened (with the default policy).
        ok(d, None, &["hash", path_str(image)]);
        let url = format!("file://{}", image.display());
        for cmd in ["info", "hash", "map"] {
            let (code, out, err) = run(d, None, &[cmd, &url]);
            assert_ne!(code, 0, "{cmd} {url}: {out}");
            assert!(
                err.contains(role) && err.contains("must stand alone"),
                "{cmd} {url}: {err}"
            );
        }
    }
}

//! Storage failures as a program and a user meet them: create-if-absent races (exactly one
//! writer wins, the others get `AlreadyExists`), the documented failures (missing bucket, wrong
//! credentials, dead endpoint, full local disk) asserted by error kind, and the messages of
//! wrong URLs, keys and OSS/OBS settings. Through the local-directory bucket and a real S3
//! server (SeaweedFS on loopback, DISKKIT_TEST_S3_ENDPOINT, as in tests/storage.rs).

mod common;

use common::s3::*;
use common::*;
use diskkit::formats::error::ErrorKind;
use diskkit::storage::{Location, Settings, Store};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

fn bucket_url(bucket: &str, key: &str) -> String {
    format!("s3://{bucket}/{key}")
}

#[test]
fn s3_errors_are_clear() {
    let Some((dir, env)) = shared_server_env() else {
        return;
    };
    let src = dir.path().join("s.raw");
    qemu_img(&["create", "-f", "raw", path_str(&src), "1M"]);
    let url = bucket_url("diskkit-test", "errors/s.raw");
    let (code, _, err) = env
        .command(&["push", path_str(&src), &url])
        .env("AWS_SECRET_ACCESS_KEY", "wrong")
        .output()
        .map(|o| {
            (
                o.status.code().unwrap_or(-1),
                String::new(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert_eq!(code, 2);
    assert!(
        err.contains("SignatureDoesNotMatch") && err.contains("secret"),
        "{err}"
    );
    let unreachable = Env {
        cache: dir.path().join("cache"),
        endpoint: Some("http://127.0.0.1:9".into()),
    };
    let (code, _, err) = unreachable.run(&["ls", "s3://diskkit-test/"]);
    assert_eq!(code, 2);
    assert!(err.contains("127.0.0.1:9"), "{err}");
    let (code, _, err) = unreachable.run(&["push", path_str(&src), &url]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot reach the endpoint"), "{err}");
}

#[test]
fn s3_missing_bucket() {
    let Some((dir, env)) = shared_server_env() else {
        return;
    };
    let src = dir.path().join("s.raw");
    qemu_img(&["create", "-f", "raw", path_str(&src), "1M"]);
    let bucket = format!("diskkit-missing-{}", std::process::id());
    let url = bucket_url(&bucket, "m/s.raw");
    let pulled = dir.path().join("pulled.raw");
    let prefix = format!("s3://{bucket}/");
    // Push last: a server that creates buckets on upload would make the others pass.
    for args in [
        vec!["ls", &prefix],
        vec!["pull", &url, path_str(&pulled)],
        vec!["verify", &url],
        vec!["rm", &url],
        vec!["push", path_str(&src), &url],
    ] {
        let (code, _, err) = env.run(&args);
        assert_eq!(
            code, 2,
            "{args:?} succeeded: the test server must refuse to create buckets on upload \
             (weed mini -s3.autoCreateBucket=false, as scripts/test.sh starts it)\n{err}"
        );
        assert!(
            err.contains(&format!("s3://{bucket}/"))
                && err.contains("NoSuchBucket")
                && err.contains("does not exist")
                && err.contains("create the bucket first"),
            "{args:?}: {err}"
        );
    }
    assert!(!pulled.exists());
}

/// A 2 MiB tmpfs mounted on a directory, unmounted when dropped (also when a test panics).
struct SmallDisk(PathBuf);

impl SmallDisk {
    /// `None` (with the reason printed) when mounting is not allowed, outside CI.
    fn mount(dir: &Path) -> Option<SmallDisk> {
        std::fs::create_dir(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs", path_str(dir)])
            .output()
            .expect("run mount");
        if out.status.success() {
            return Some(SmallDisk(dir.to_path_buf()));
        }
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "cannot mount a tmpfs (the full-disk tests need root): {why}"
        );
        eprintln!("skipped: cannot mount a tmpfs (needs root): {why}");
        None
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Pushes 8 MiB of data (no zeros for a sparse output to skip) to `url`, pulls it onto a 2 MiB
/// disk as raw and as qcow2: each pull fails naming DST and the space needed, and leaves the
/// disk empty.
fn pull_to_full_disk(env: &Env, dir: &Path, url: &str) {
    let src = dir.join("full.raw");
    qemu_img(&["create", "-f", "raw", path_str(&src), "8M"]);
    qemu_io("raw", &src, &["write -P 0xa5 0 8M"]);
    env.ok(&["push", path_str(&src), url]);
    let Some(disk) = SmallDisk::mount(&dir.join("small")) else {
        return;
    };
    for fmt in ["raw", "qcow2"] {
        let dst = disk.0.join(format!("pulled.{fmt}"));
        let (code, _, err) = env.run(&["pull", "-O", fmt, url, path_str(&dst)]);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(&format!("{}: no space left on device", dst.display()))
                && err.contains(&format!("needs up to {} bytes", 8 * MIB)),
            "{err}"
        );
        let left: Vec<_> = std::fs::read_dir(&disk.0).unwrap().collect();
        assert!(left.is_empty(), "{fmt}: left behind {left:?}");
    }
}

#[test]
fn local_bucket_pull_to_full_disk() {
    let (dir, bucket, env) = local_bucket_env();
    let url = format!("{}/full.raw", bucket.display());
    pull_to_full_disk(&env, dir.path(), &url);
}

#[test]
fn s3_pull_to_full_disk() {
    let Some((dir, env)) = shared_server_env() else {
        return;
    };
    let url = bucket_url(
        "diskkit-test",
        &format!("full-{}/full.raw", std::process::id()),
    );
    pull_to_full_disk(&env, dir.path(), &url);
    env.ok(&["rm", &url]);
}

fn open_store(url: &str, settings: &Settings) -> (Location, Box<dyn Store>) {
    let location = Location::parse(url).unwrap();
    let store = diskkit::storage::open(&location, settings).unwrap();
    (location, store)
}

/// Eight writers race to create one object: exactly one wins, the others (and a later writer)
/// get `AlreadyExists`, and the object holds the winner's bytes.
fn create_if_absent_race(store: &dyn Store, key: &str) {
    let results: Vec<_> = std::thread::scope(|s| {
        let writers: Vec<_> = (0..8u8)
            .map(|i| s.spawn(move || (i, store.create_if_absent(key, vec![i; 1000 + i as usize]))))
            .collect();
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let winners: Vec<u8> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for (_, r) in &results {
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
        }
    }
    let winner = winners[0];
    let stored = store.read_small(key).unwrap().unwrap();
    assert_eq!(stored, vec![winner; 1000 + winner as usize]);
    let later = store.create_if_absent(key, vec![9]).unwrap_err();
    assert_eq!(later.kind(), ErrorKind::AlreadyExists, "{later}");
}

#[test]
fn local_bucket_create_if_absent() {
    let (_dir, bucket, _env) = local_bucket_env();
    let (_, store) = open_store(&format!("{}/", bucket.display()), &Settings::default());
    create_if_absent_race(store.as_ref(), "ledger/entry-1");
    // No temporary file is left next to the object.
    let names: Vec<_> = std::fs::read_dir(bucket.join("ledger")).unwrap().collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn s3_create_if_absent() {
    let Some(endpoint) = shared_server() else {
        return;
    };
    let (_, store) = open_store("s3://diskkit-test/", &s3_settings(&endpoint));
    let key = format!("cia-{}/entry", std::process::id());
    create_if_absent_race(store.as_ref(), &key);
    store.delete(&[key]).unwrap();
}

/// Failures a program acts on have kinds, whatever the message says.
#[test]
fn s3_errors_have_kinds() {
    let Some(endpoint) = shared_server() else {
        return;
    };
    let missing = format!("s3://diskkit-missing-{}/", std::process::id());
    let (_, store) = open_store(&missing, &s3_settings(&endpoint));
    assert_eq!(store.list("").unwrap_err().kind(), ErrorKind::NoSuchBucket);
    assert_eq!(store.no_such_object("k").kind(), ErrorKind::NoSuchBucket);
    let wrong = Settings {
        secret_access_key: Some("wrong".into()),
        ..s3_settings(&endpoint)
    };
    let (_, store) = open_store("s3://diskkit-test/", &wrong);
    assert_eq!(store.list("").unwrap_err().kind(), ErrorKind::AccessDenied);
    assert_eq!(
        store.create_upload("k").unwrap_err().kind(),
        ErrorKind::AccessDenied
    );
    let (_, store) = open_store("s3://diskkit-test/k", &s3_settings(&endpoint));
    assert_eq!(store.stat("no/such/key").unwrap().map(|m| m.size), None);
    assert_eq!(store.no_such_object("k").kind(), ErrorKind::NotFound);
}

/// A closed loopback port: every command says it cannot reach the endpoint (after retrying),
/// and the error is of the network kind.
#[test]
fn dead_endpoint_is_explained() {
    let dir = tempdir();
    let env = Env {
        cache: dir.path().join("cache"),
        endpoint: Some("http://127.0.0.1:9".into()),
    };
    let (_, store) = open_store("s3://b/k", &s3_settings("http://127.0.0.1:9"));
    let e = store.stat("k").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");
    assert!(e.kind().is_retryable());
    let pulled = dir.path().join("pulled");
    for args in [
        vec!["ls", "s3://b/"],
        vec!["verify", "s3://b/k"],
        vec!["pull", "s3://b/k", path_str(&pulled)],
    ] {
        let (code, _, err) = env.run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("cannot reach the endpoint http://127.0.0.1:9 after 4 attempts"),
            "{args:?}: {err}"
        );
    }
}

/// OSS and OBS settings that are missing say which ones, before any request.
#[test]
fn oss_and_obs_misconfiguration_is_explained() {
    let dir = tempdir();
    let env = Env {
        cache: dir.path().join("cache"),
        endpoint: None,
    };
    let run = |args: &[&str], set: &[(&str, &str)]| {
        let mut cmd = env.command(args);
        for var in [
            "OSS_ENDPOINT",
            "OSS_ACCESS_KEY_ID",
            "OSS_ACCESS_KEY_SECRET",
            "ALIBABA_CLOUD_ACCESS_KEY_ID",
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
            "OBS_ENDPOINT",
            "OBS_ACCESS_KEY_ID",
            "OBS_SECRET_ACCESS_KEY",
            "HUAWEICLOUD_SDK_AK",
            "HUAWEICLOUD_SDK_SK",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(set.iter().copied());
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["ls", "oss://bucket/"], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("oss://bucket/: no endpoint: set OSS_ENDPOINT, --endpoint")
            && !err.contains("ConfigInvalid"),
        "{err}"
    );
    let obs = [("OBS_ENDPOINT", "https://obs.example.com")];
    let (code, err) = run(&["ls", "obs://bucket/"], &obs);
    assert_eq!(code, Some(2));
    assert!(
        err.contains(
            "obs://bucket/: no credentials: set OBS_ACCESS_KEY_ID and OBS_SECRET_ACCESS_KEY"
        ),
        "{err}"
    );
    let (code, err) = run(
        &["ls", "oss://bucket/"],
        &[("OSS_ENDPOINT", "https://oss.example.com")],
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains("no credentials: set OSS_ACCESS_KEY_ID"),
        "{err}"
    );
}

/// A local bucket on a full disk: the error is of the no-space kind.
#[test]
fn local_bucket_full_disk_has_its_kind() {
    let dir = tempdir();
    let Some(disk) = SmallDisk::mount(&dir.path().join("small")) else {
        return;
    };
    let (_, store) = open_store(&format!("{}/", disk.0.display()), &Settings::default());
    let e = store.create_if_absent("big", vec![1; 4 << 20]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    let id = store.create_upload("big").unwrap();
    let e = store
        .upload_part("big", &id, 1, 0, vec![1u8; 4 << 20].into())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    store.abort_upload("big", &id).unwrap();
}

/// A manifest that is not one (damaged, or written by something else): pull and verify fail
/// naming the manifest object, and pull writes nothing.
#[test]
fn local_bucket_damaged_manifest_is_named() {
    let (dir, bucket, env) = local_bucket_env();
    let src = mixed_raw(dir.path(), "src.raw", 8 * MIB);
    let url = format!("{}/disk.raw", bucket.display());
    env.ok(&["push", path_str(&src), &url]);
    let manifest = bucket.join("disk.raw.diskkit.json");
    std::fs::write(&manifest, "{").unwrap();
    let pulled = dir.path().join("pulled.raw");
    for args in [
        vec!["verify", url.as_str()],
        vec!["pull", url.as_str(), path_str(&pulled)],
    ] {
        let (code, _, err) = env.run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "{}: not a diskkit object manifest",
                manifest.display()
            )),
            "{args:?}: {err}"
        );
    }
    assert!(!pulled.exists());
}

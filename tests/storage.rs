//! push/pull/verify/ls/rm through the local-directory bucket and a real S3 server (SeaweedFS on
//! loopback, started by scripts/test.sh, which exports DISKKIT_TEST_S3_ENDPOINT and the keys).
//! Under CI a missing server fails the tests that need it; elsewhere they say why they skip.

mod common;

use common::s3::*;
use common::*;
use diskkit::storage::Location;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn bucket_url(endpoint_bucket: &str, key: &str) -> String {
    format!("s3://{endpoint_bucket}/{key}")
}

/// Sources of one guest content in three formats, `size` bytes.
fn sources(dir: &Path, size: u64) -> Vec<PathBuf> {
    let pattern = mixed_pattern(size);
    let mut out = Vec::new();
    for (fmt, name) in [
        ("raw", "src.raw"),
        ("qcow2", "src.qcow2"),
        ("vpc", "src.vhd"),
    ] {
        let path = dir.join(name);
        let mut args = vec!["create", "-f", fmt];
        if fmt == "vpc" {
            args.extend(["-o", "force_size=on"]);
        }
        let size_s = size.to_string();
        args.extend([path_str(&path), size_s.as_str()]);
        qemu_img(&args);
        qemu_io(fmt, &path, &as_refs(&pattern));
        out.push(path);
    }
    out
}

fn source_digest(env: &Env, src: &Path) -> String {
    env.ok(&["hash", path_str(src)])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn manifest_digest(path: &Path) -> (String, u64) {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    (
        v["guest"]["digest"].as_str().unwrap().to_string(),
        v["guest"]["virtual_size"].as_u64().unwrap(),
    )
}

/// Pushes every source as raw and as fixed VHD to `url_of(key)`, pulls each back as raw and
/// checks it against the source with qemu-img and against the manifest digest.
fn round_trips(env: &Env, dir: &Path, url_of: &dyn Fn(&str) -> String) {
    for src in sources(dir, 12 * MIB) {
        let digest = source_digest(env, &src);
        let name = src.file_name().unwrap().to_string_lossy().into_owned();
        for (out_fmt, opts, ext) in [
            ("raw", "", "raw"),
            ("vpc", "subformat=dynamic", "vhd"),
            ("vpc", "subformat=fixed", "fixed.vhd"),
            ("qcow2", "", "qcow2"),
            ("qcow2", "compression_type=zlib", "zlib.qcow2"),
            ("qcow2", "compression_type=zstd", "zstd.qcow2"),
        ] {
            let key = format!("images/{name}.{ext}");
            let url = url_of(&key);
            let mut args = vec!["push", "-O", out_fmt, "--parallel", "3"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            if opts.starts_with("compression_type") {
                args.push("-c");
            }
            args.extend([path_str(&src), &url]);
            env.ok(&args);
            let out = env.ok(&["verify", &url]);
            assert!(out.contains("OK"), "{out}");
            let pulled = dir.join(format!("{name}.{ext}.pulled"));
            // Converted back to raw (without -O the object comes as it is, byte for byte).
            env.ok(&["pull", "-O", "raw", &url, path_str(&pulled)]);
            qemu_img(&["compare", path_str(&src), path_str(&pulled)]);
            // The manifest digest is the digest of the object's guest content: the source's
            // own for raw, and for VHD the source's padded to the VHD's size.
            let listing = env.ok(&["ls", &url_of("images/")]);
            let line = listing
                .lines()
                .find(|l| {
                    l.split('\t').next().is_some_and(|k| {
                        k.ends_with(&format!("/{name}.{ext}")) || k == format!("{name}.{ext}")
                    })
                })
                .unwrap_or_else(|| panic!("{key} not in listing:\n{listing}"));
            assert!(line.contains(&format!("\t{out_fmt}\t")), "{line}");
            if out_fmt == "vpc" {
                assert!(line.ends_with(&source_digest(env, &pulled)), "{line}");
            } else {
                assert!(line.ends_with(&digest), "{line} vs {digest}");
            }
            std::fs::remove_file(&pulled).unwrap();
        }
    }
}

#[test]
fn local_bucket_round_trips() {
    let (dir, bucket, env) = local_bucket_env();
    round_trips(&env, dir.path(), &|key| {
        format!("file://{}/{key}", bucket.display())
    });
    // The VHD objects are valid VHDs for qemu, with the source's guest content; the dynamic
    // one stores only the blocks with data.
    let src = dir.path().join("src.qcow2");
    for name in ["src.qcow2.vhd", "src.qcow2.fixed.vhd"] {
        let vhd = bucket.join("images").join(name);
        qemu_img(&["compare", "-F", "vpc", path_str(&src), path_str(&vhd)]);
    }
    for name in ["src.vhd.qcow2", "src.vhd.zlib.qcow2", "src.vhd.zstd.qcow2"] {
        let qcow2 = bucket.join("images").join(name);
        qemu_img(&["check", path_str(&qcow2)]);
        qemu_img(&["compare", path_str(&src), path_str(&qcow2)]);
    }
    let info = qemu_img(&["info", path_str(&bucket.join("images/src.raw.zstd.qcow2"))]);
    assert!(info.contains("compression type: zstd"), "{info}");
    let dynamic = std::fs::metadata(bucket.join("images/src.qcow2.vhd"))
        .unwrap()
        .len();
    assert!(
        dynamic < 8 * MIB,
        "dynamic VHD of 12 MiB with ~2 MiB of data: {dynamic}"
    );
    // Pulling converts on the fly into any writable format.
    let pulled = dir.path().join("pulled.qcow2");
    let url = format!("{}/images/src.vhd.raw", bucket.display());
    env.ok(&["pull", "-O", "qcow2", &url, path_str(&pulled)]);
    qemu_img(&["check", path_str(&pulled)]);
    qemu_img(&["compare", path_str(&src), path_str(&pulled)]);
    let (digest, _) = manifest_digest(&bucket.join("images/src.raw.raw.diskkit.json"));
    assert_eq!(digest, source_digest(&env, &dir.path().join("src.raw")));
    // rm removes image and manifest; nothing else is left behind (no temporary uploads).
    let url = format!("{}/images/src.raw.raw", bucket.display());
    env.ok(&["rm", &url]);
    assert!(!bucket.join("images/src.raw.raw").exists());
    assert!(!bucket.join("images/src.raw.raw.diskkit.json").exists());
    let left: Vec<_> = std::fs::read_dir(bucket.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 34, "{left:?}");
    assert!(
        left.iter().all(|n| !n.contains("diskkit-upload")),
        "{left:?}"
    );
}

#[test]
fn s3_round_trips() {
    let Some((dir, env)) = shared_server_env() else {
        return;
    };
    let prefix = format!("rt-{}", std::process::id());
    round_trips(&env, dir.path(), &|key| {
        bucket_url("diskkit-test", &format!("{prefix}/{key}"))
    });
    // Objects are typed by their names' extensions.
    let endpoint = env.endpoint.as_deref().unwrap();
    for (ext, media_type) in [
        ("qcow2", "application/x-qemu-disk"),
        ("vhd", "application/x-vhd-disk"),
        ("raw", "application/x-raw-disk-image"),
    ] {
        let head = Command::new("curl")
            .args(["-sSfI", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
            .arg(format!("{ACCESS_KEY}:{SECRET_KEY}"))
            .arg(format!(
                "{endpoint}/diskkit-test/{prefix}/images/src.raw.{ext}"
            ))
            .output()
            .unwrap();
        let head = String::from_utf8_lossy(&head.stdout).to_ascii_lowercase();
        assert!(
            head.contains(&format!("content-type: {media_type}")),
            "{ext}: {head}"
        );
    }
    let url = bucket_url("diskkit-test", &format!("{prefix}/images/src.raw.raw"));
    env.ok(&["rm", &url]);
    let (code, _, err) = env.run(&["verify", &url]);
    assert_eq!(code, 2);
    assert!(err.contains("no such object"), "{err}");
}

/// Starts a push that sends one part at a time slowly, kills it once `after` parts are recorded,
/// and returns how many were.
fn push_and_kill(env: &Env, src: &Path, url: &str, after: usize, extra: &[&str]) -> usize {
    // About one 5 MiB part each 0.3 s.
    let mut args = vec!["push", "--part-size", "5M", "--parallel", "1", "-r", "16M"];
    args.extend(extra);
    args.extend([path_str(src), url]);
    let mut child = env
        .command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while env.checkpoint_parts() < after {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "push made no progress"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "push ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    env.checkpoint_parts()
}

/// "N parts of ..., S sent now, R already sent before" → (N, S, R).
fn part_counts(out: &str) -> (usize, usize, usize) {
    let nums: Vec<usize> = out
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let n = nums.len();
    assert!(n >= 3, "{out}");
    let parts_at = out.find(" parts of ").unwrap();
    let total = out[..parts_at]
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (total, nums[n - 2], nums[n - 1])
}

fn kill_and_resume(env: &Env, dir: &Path, url: &str, stat_missing: &dyn Fn() -> bool) {
    let src = dir.join("big.qcow2");
    qemu_img(&["create", "-f", "qcow2", path_str(&src), "26M"]);
    qemu_io("qcow2", &src, &as_refs(&mixed_pattern(26 * MIB)));
    let done = push_and_kill(env, &src, url, 2, &[]);
    assert!(done >= 2);
    assert!(
        stat_missing(),
        "a killed push left an object under the final key"
    );
    let out = env.ok(&[
        "push",
        "--part-size",
        "5M",
        "--parallel",
        "1",
        path_str(&src),
        url,
    ]);
    let (total, sent, resumed) = part_counts(&out);
    assert_eq!(total, 6, "{out}");
    assert_eq!(resumed, done, "{out}");
    assert_eq!(sent, total - done, "{out}");
    env.ok(&["verify", url]);
    let pulled = dir.join("big.pulled");
    env.ok(&["pull", url, path_str(&pulled)]);
    qemu_img(&["compare", path_str(&src), path_str(&pulled)]);

    // --abort forgets the upload: the next push starts over.
    push_and_kill(env, &src, url, 1, &[]);
    env.ok(&["push", "--abort", url]);
    assert_eq!(env.checkpoint_parts(), 0);
    let out = env.ok(&["push", "--part-size", "5M", path_str(&src), url]);
    assert_eq!(part_counts(&out), (6, 6, 0), "{out}");

    // An upload the server no longer has: the rerun says so and sends everything again.
    push_and_kill(env, &src, url, 1, &[]);
    env.forget_upload_on_server();
    let (code, out, err) = env.run(&["push", "--part-size", "5M", path_str(&src), url]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("gone on the server"), "{err}");
    assert_eq!(part_counts(&out), (6, 6, 0), "{out}");
    env.ok(&["verify", url]);
}

#[test]
fn local_bucket_kill_and_resume() {
    let (dir, bucket, env) = local_bucket_env();
    let url = format!("{}/disk.raw", bucket.display());
    let target = bucket.join("disk.raw");
    kill_and_resume(&env, dir.path(), &url, &|| !target.exists());
}

/// A compressed qcow2 push, killed and rerun: the parts are compressed again the same way, so
/// the rerun sends only the missing ones and the object is a valid image of the source.
#[test]
fn local_bucket_compressed_push_resumes() {
    let (dir, bucket, env) = local_bucket_env();
    // 12 MiB of incompressible data, 12 MiB of text, 8 MiB of zeros: about 13 MiB compressed.
    let src = dir.path().join("mixed.raw");
    let mut content = Vec::with_capacity(32 * MIB as usize);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    while content.len() < 12 * MIB as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        content.extend_from_slice(&x.to_le_bytes());
    }
    let mut line = 0;
    while content.len() < 24 * MIB as usize {
        content.extend_from_slice(format!("line {line} of some text in a file\n").as_bytes());
        line += 1;
    }
    content.resize(32 * MIB as usize, 0);
    std::fs::write(&src, &content).unwrap();
    let url = format!("{}/disk.qcow2", bucket.display());
    let args = ["-O", "qcow2", "-c", "-o", "compression_type=zstd"];
    let done = push_and_kill(&env, &src, &url, 1, &args);
    assert!(done >= 1);
    assert!(!bucket.join("disk.qcow2").exists());
    let mut rerun = vec!["push", "--part-size", "5M", "--parallel", "1"];
    rerun.extend(args);
    rerun.extend([path_str(&src), &url]);
    let out = env.ok(&rerun);
    let (total, sent, resumed) = part_counts(&out);
    assert!(total >= 3, "{out}");
    assert_eq!((sent, resumed), (total - done, done), "{out}");
    let object = bucket.join("disk.qcow2");
    qemu_img(&["check", path_str(&object)]);
    qemu_img(&["compare", path_str(&src), path_str(&object)]);
    let size = std::fs::metadata(&object).unwrap().len();
    assert!(size < 16 * MIB, "compressed object of {size} bytes");
    env.ok(&["verify", &url]);
}

/// pull never replaces a device node or a directory with the image (a FIFO stands in for a
/// device here).
#[test]
fn local_bucket_pull_refuses_devices_and_directories() {
    use std::os::unix::fs::FileTypeExt;
    let (dir, bucket, env) = local_bucket_env();
    let src = dir.path().join("s.raw");
    std::fs::write(&src, vec![1u8; 4096]).unwrap();
    let url = format!("{}/s.raw", bucket.display());
    env.ok(&["push", path_str(&src), &url]);
    let fifo = dir.path().join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let (code, _, err) = env.run(&["pull", &url, path_str(&fifo)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let (code, _, err) = env.run(&["pull", &url, path_str(dir.path())]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is a directory"), "{err}");
}

/// Raw and fixed VHD objects pulled as they are come back byte for byte, also when their size
/// is not a multiple of the disk's block (the tail cannot go through direct I/O).
#[test]
fn local_bucket_pulls_objects_as_they_are() {
    let (dir, bucket, env) = local_bucket_env();
    let src = dir.path().join("odd.raw");
    let data: Vec<u8> = (0..(5u32 << 20) + 1234)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    for (fmt, opts, key) in [
        ("raw", "", "odd.raw"),
        ("vpc", "subformat=fixed", "odd.vhd"),
    ] {
        let url = format!("{}/{key}", bucket.display());
        env.ok(&["push", "-O", fmt, "-o", opts, path_str(&src), &url]);
        let pulled = dir.path().join(format!("pulled-{key}"));
        let out = env.ok(&["pull", "-O", fmt, &url, path_str(&pulled)]);
        assert!(out.contains("verified"), "{out}");
        assert!(std::fs::read(&pulled).unwrap() == std::fs::read(bucket.join(key)).unwrap());
    }
}

/// An object changed after its push fails pull and verify, whether they hash the bytes as they
/// arrive (raw, fixed VHD) or the file pull wrote (qcow2).
#[test]
fn local_bucket_detects_changed_objects() {
    let (dir, bucket, env) = local_bucket_env();
    let src = dir.path().join("s.raw");
    std::fs::write(&src, vec![7u8; 3 << 20]).unwrap();
    // The guest data's last byte comes before this many bytes at the object's end: raw ends
    // with it, fixed VHD puts its footer after it, plain qcow2 its refcounts.
    for (fmt, opts, key, tail) in [
        ("raw", "", "s.raw", 0),
        ("vpc", "subformat=fixed", "s.vhd", 512),
        ("qcow2", "", "s.qcow2", (3 << 16) - 1),
    ] {
        let url = format!("{}/{key}", bucket.display());
        env.ok(&["push", "-O", fmt, "-o", opts, path_str(&src), &url]);
        let object = bucket.join(key);
        let mut bytes = std::fs::read(&object).unwrap();
        let at = bytes[..bytes.len() - tail]
            .iter()
            .rposition(|&b| b != 0)
            .unwrap();
        assert_eq!(bytes[at], 7);
        bytes[at] ^= 1;
        std::fs::write(&object, &bytes).unwrap();
        let pulled = dir.path().join(format!("pulled.{fmt}"));
        let (code, _, err) = env.run(&["pull", "-O", fmt, &url, path_str(&pulled)]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("differs from the manifest"), "{err}");
        let (code, _, err) = env.run(&["verify", &url]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("differs from the manifest"), "{err}");
    }
}

#[test]
fn s3_kill_and_resume() {
    let Some((dir, env)) = shared_server_env() else {
        return;
    };
    let url = bucket_url(
        "diskkit-test",
        &format!("resume-{}/disk.raw", std::process::id()),
    );
    kill_and_resume(&env, dir.path(), &url, &|| {
        let (code, _, err) = env.run(&["verify", &url]);
        code == 2 && err.contains("no such object")
    });
}

#[test]
fn s3_server_dies_midway_then_resume() {
    if shared_server().is_none() {
        return;
    }
    let dir = tempdir();
    let data = dir.path().join("weed");
    std::fs::create_dir(&data).unwrap();
    // Ports of our own (and their gRPC twins at +10000), away from the shared server's.
    let base = 21000 + (std::process::id() % 400) as u16 * 10;
    let mut server = Server::start(&data, base);
    let env = Env {
        cache: dir.path().join("cache"),
        endpoint: Some(server.endpoint()),
    };
    let src = dir.path().join("d.qcow2");
    qemu_img(&["create", "-f", "qcow2", path_str(&src), "26M"]);
    qemu_io("qcow2", &src, &as_refs(&mixed_pattern(26 * MIB)));
    let url = "s3://diskkit-test/dies/d.raw";
    let push = env
        .command(&[
            "push",
            "--part-size",
            "5M",
            "--parallel",
            "1",
            "--rate-limit",
            "10M",
            path_str(&src),
            url,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while env.checkpoint_parts() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "push made no progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.stop();
    let out = push.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot reach the endpoint"), "{err}");
    assert!(err.contains("rerun the same command"), "{err}");
    let done = env.checkpoint_parts();
    let server = Server::start(&server.dir.clone(), base);
    let out = env.ok(&["push", "--part-size", "5M", path_str(&src), url]);
    assert_eq!(part_counts(&out), (6, 6 - done, done), "{out}");
    env.ok(&["verify", url]);
    drop(server);
}

/// Without -O, pull writes the object as it is: a dynamic VHD or qcow2 object comes back byte
/// for byte (and checked), not converted to raw.
#[test]
fn local_bucket_pull_is_byte_for_byte() {
    let (dir, bucket, env) = local_bucket_env();
    let src = mixed_raw(dir.path(), "src.raw", 12 * MIB);
    for (fmt, key) in [("vpc", "disk-azure.vhd"), ("qcow2", "disk.qcow2")] {
        let url = format!("{}/{key}", bucket.display());
        env.ok(&["push", "-O", fmt, path_str(&src), &url]);
        let pulled = dir.path().join(format!("pulled-{key}"));
        let out = env.ok(&["pull", &url, path_str(&pulled)]);
        assert!(out.contains("verified against the manifest"), "{out}");
        assert!(std::fs::read(&pulled).unwrap() == std::fs::read(bucket.join(key)).unwrap());
        let info = env.ok(&["info", path_str(&pulled)]);
        assert!(info.contains(fmt), "{info}");
    }
}

/// Objects diskkit did not push: refused unchecked unless --no-verify (local buckets have no
/// MD5 ETag), and the message says no check was made.
#[test]
fn local_bucket_pulls_foreign_objects() {
    let (dir, bucket, env) = local_bucket_env();
    std::fs::write(bucket.join("foreign.img"), vec![3u8; 100_000]).unwrap();
    let url = format!("{}/foreign.img", bucket.display());
    let pulled = dir.path().join("pulled.img");
    let (code, _, err) = env.run(&["pull", &url, path_str(&pulled)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pull --no-verify takes it unchecked"), "{err}");
    assert!(!pulled.exists());
    let out = env.ok(&["pull", "--no-verify", &url, path_str(&pulled)]);
    assert!(out.contains("not verified (--no-verify)"), "{out}");
    assert_eq!(std::fs::read(&pulled).unwrap(), vec![3u8; 100_000]);
    let (code, _, err) = env.run(&["verify", &url]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pull --no-verify takes it unchecked"), "{err}");
}

/// An object another tool uploaded in one part: its MD5 ETag checks pull and verify.
#[test]
fn s3_pulls_foreign_objects_checked_by_md5() {
    let Some((dir, env)) = shared_server_env() else {
        return;
    };
    let endpoint = env.endpoint.clone().unwrap();
    let key = format!("foreign-{}/disk.img", std::process::id());
    let bucket = Location::parse("s3://diskkit-test/").unwrap();
    let store = diskkit::storage::open(&bucket, &s3_settings(&endpoint)).unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    store.write(&key, data.clone()).unwrap();
    let url = bucket_url("diskkit-test", &key);
    let out = env.ok(&["verify", &url]);
    assert!(out.contains("verified against the store's ETag"), "{out}");
    let pulled = dir.path().join("pulled.img");
    let out = env.ok(&["pull", &url, path_str(&pulled)]);
    assert!(out.contains("MD5") && out.contains("store's ETag"), "{out}");
    assert_eq!(std::fs::read(&pulled).unwrap(), data);
    store.delete(&[key]).unwrap();
    // A multipart upload (5 MiB parts) whose manifest is gone: its MD5-N ETag checks it.
    let src = mixed_raw(dir.path(), "multi.raw", 12 * MIB);
    let multi_key = format!("foreign-{}/multi.raw", std::process::id());
    let multi = bucket_url("diskkit-test", &multi_key);
    env.ok(&["push", "--part-size", "5M", path_str(&src), &multi]);
    store
        .delete(&[format!("{multi_key}.diskkit.json")])
        .unwrap();
    let out = env.ok(&["verify", &multi]);
    assert!(
        out.contains("-3 verified against the store's ETag"),
        "{out}"
    );
    env.ok(&["rm", &multi]);
    // An empty object: nothing to read, its MD5 is still checked.
    let empty_key = format!("foreign-{}/empty.img", std::process::id());
    store.write(&empty_key, Vec::new()).unwrap();
    let empty = bucket_url("diskkit-test", &empty_key);
    let out = env.ok(&["verify", &empty]);
    assert!(out.contains("d41d8cd98f00b204e9800998ecf8427e"), "{out}");
    let out = env.ok(&["pull", &empty, path_str(&dir.path().join("empty.img"))]);
    assert!(out.contains("store's ETag"), "{out}");
    store.delete(&[empty_key]).unwrap();
}

/// push FILE DIR/ and pull URL DIR/ keep the file name, as cp does; --target azure makes a
/// fixed VHD; ls has a header, human sizes and JSON.
#[test]
fn local_bucket_names_target_and_listing() {
    let (dir, bucket, env) = local_bucket_env();
    let help = env.ok(&["push", "--help"]);
    assert!(
        help.contains("The image to upload") && help.contains("Where to put it"),
        "{help}"
    );
    let help = env.ok(&["pull", "--help"]);
    assert!(
        help.contains("The object to download") && help.contains("The file to write"),
        "{help}"
    );
    let src = mixed_raw(dir.path(), "named.raw", 8 * MIB);
    env.ok(&["push", path_str(&src), &format!("{}/", bucket.display())]);
    assert!(bucket.join("named.raw").is_file());
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let url = format!("{}/named.raw", bucket.display());
    env.ok(&["pull", &url, &format!("{}/", out_dir.display())]);
    assert!(out_dir.join("named.raw").is_file());
    let azure = format!("{}/azure.vhd", bucket.display());
    env.ok(&["push", "--target", "azure", path_str(&src), &azure]);
    let info = qemu_img(&["info", "-f", "vpc", path_str(&bucket.join("azure.vhd"))]);
    assert!(info.contains("vpc"), "{info}");
    let size = std::fs::metadata(bucket.join("azure.vhd")).unwrap().len();
    assert_eq!(size % MIB, 512, "fixed VHD: MiB-aligned data and a footer");
    let listing = env.ok(&["ls", &format!("{}/", bucket.display())]);
    let mut lines = listing.lines();
    assert_eq!(
        lines.next(),
        Some("KEY\tSIZE\tMODIFIED\tFORMAT\tGUEST\tDIGEST")
    );
    let line = lines.find(|l| l.starts_with("named.raw\t")).unwrap();
    assert!(
        line.contains("\t8 MiB\t") && line.contains("\traw\t"),
        "{line}"
    );
    let json = env.ok(&["ls", "--output", "json", &format!("{}/", bucket.display())]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let named = v
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["key"] == "named.raw")
        .unwrap();
    assert_eq!(named["size"], 8 * MIB);
    assert_eq!(named["format"], "raw");
    assert!(
        named["modified"].as_str().unwrap().ends_with('Z'),
        "{named}"
    );
}

/// Zeros of a raw image are holes in a local bucket's object.
#[test]
fn local_bucket_objects_are_sparse() {
    use std::os::unix::fs::MetadataExt;
    let (dir, bucket, env) = local_bucket_env();
    let src = dir.path().join("sparse.raw");
    qemu_img(&["create", "-f", "raw", path_str(&src), "64M"]);
    qemu_io("raw", &src, &["write -P 0x11 10M 1M"]);
    let url = format!("{}/sparse.raw", bucket.display());
    env.ok(&["push", path_str(&src), &url]);
    let meta = std::fs::metadata(bucket.join("sparse.raw")).unwrap();
    assert_eq!(meta.len(), 64 * MIB);
    assert!(
        meta.blocks() * 512 <= 2 * MIB,
        "{} bytes allocated",
        meta.blocks() * 512
    );
    env.ok(&["verify", &url]);
}

/// A local bucket with a push of a 26 MiB raw source killed after one part: (directory,
/// bucket, environment, source, URL).
fn killed_local_push() -> (tempfile::TempDir, PathBuf, Env, PathBuf, String) {
    let (dir, bucket, env) = local_bucket_env();
    let src = dir.path().join("big.raw");
    qemu_img(&["create", "-f", "raw", path_str(&src), "26M"]);
    qemu_io("raw", &src, &as_refs(&mixed_pattern(26 * MIB)));
    let url = format!("{}/disk.raw", bucket.display());
    push_and_kill(&env, &src, &url, 1, &[]);
    (dir, bucket, env, src, url)
}

/// A rerun after the source changed says one thing to do: abort, then push again.
#[test]
fn local_bucket_changed_source_gives_one_instruction() {
    let (_dir, _bucket, env, src, url) = killed_local_push();
    qemu_io("raw", &src, &["write -P 0x77 0 1M"]);
    let (code, _, err) = env.run(&["push", path_str(&src), &url]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "run diskkit push --abort {}",
            Location::parse(&url).unwrap().url()
        )),
        "{err}"
    );
    assert!(!err.contains("rerun the same command"), "{err}");
}

/// A push killed at any moment completes on the first rerun: here before any part was sent.
#[test]
fn s3_push_killed_early_completes_on_first_rerun() {
    let Some((dir, env)) = shared_server_env() else {
        return;
    };
    let src = dir.path().join("early.raw");
    qemu_img(&["create", "-f", "raw", path_str(&src), "64M"]);
    qemu_io("raw", &src, &as_refs(&mixed_pattern(64 * MIB)));
    let url = bucket_url(
        "diskkit-test",
        &format!("early-{}/disk.raw", std::process::id()),
    );
    let args = ["push", "--part-size", "5M", path_str(&src), &url];
    for delay_ms in [0, 150, 600] {
        let mut child = env
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let out = env.ok(&args);
        assert!(out.contains("13 parts of 5 MiB"), "{out}");
        env.ok(&["verify", &url]);
    }
    env.ok(&["rm", &url]);
}

/// Keys with characters that URLs and signatures escape go through every call.
#[test]
fn s3_keys_with_odd_characters() {
    let Some((dir, env)) = shared_server_env() else {
        return;
    };
    let src = dir.path().join("s.raw");
    std::fs::write(&src, vec![5u8; 1 << 20]).unwrap();
    let url = bucket_url(
        "diskkit-test",
        &format!("odd-{}/a b+c=d%e&f~é.raw", std::process::id()),
    );
    env.ok(&["push", path_str(&src), &url]);
    env.ok(&["verify", &url]);
    env.ok(&["rm", &url]);
}

/// An upload that vanishes while a rerun sends its parts (expired, or aborted by another
/// process) is started afresh once: the rerun still completes.
#[test]
fn local_bucket_upload_vanishing_midway_restarts() {
    let (_dir, bucket, env, src, url) = killed_local_push();
    let args = [
        "push",
        "--part-size",
        "5M",
        "--parallel",
        "1",
        "-r",
        "16M",
        path_str(&src),
        &url,
    ];
    let rerun = env
        .command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let parts_before = env.checkpoint_parts();
    let start = Instant::now();
    while env.checkpoint_parts() <= parts_before {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "rerun made no progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for e in std::fs::read_dir(&bucket).unwrap().flatten() {
        if e.file_name().to_string_lossy().contains("diskkit-upload") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let out = rerun.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("gone on the server"), "{err}");
    env.ok(&["verify", &url]);
}

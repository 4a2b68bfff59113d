//! diskkit under network faults: push, verify, pull, snapshot create and restore, bundle copy and
//! batch run through a proxy that drops, stalls, resets and truncates requests and answers 500
//! and 503 SlowDown, in front of the suite's S3 server. Every run either completes or fails with a clear error (exit 2, no
//! panic), a rerun resumes, and nothing corrupt or unverified ever stands under a final name.

mod common;

use common::faults::{ALL_FAULTS, FaultProxy, Plan};
use common::s3::*;
use common::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// Runs of one command before giving up (a run outlives an outage's first requests, fails when
/// one request has failed four times, and the next run starts past it).
const RUNS: usize = 8;

/// Every fourth request faulted, every kind in turn, and all requests from `outage` on, for
/// twelve requests. Round `r` of [`each_round`] starts the kinds `r` places further and the
/// outage `r % 3` requests earlier (still inside the command it is meant to stop).
fn plan(outage: u64) -> Plan {
    let round = ROUND.get();
    let mut faults = ALL_FAULTS.to_vec();
    let kinds = faults.len();
    faults.rotate_left(round as usize % kinds);
    let outage = outage - round % 3;
    Plan {
        every: 4,
        outage: outage..outage + 12,
        faults,
        stall: Duration::from_secs(3),
    }
}

/// A test's directory, a faulty proxy to the shared server, an environment through it and a
/// clean one, a qcow2 source of `mib` MiB of mixed data, and a key prefix of the test's own.
struct Setup {
    dir: tempfile::TempDir,
    proxy: FaultProxy,
    faulty: Env,
    clean: Env,
    src: std::path::PathBuf,
    prefix: String,
}

fn setup(mib: u64) -> Option<Setup> {
    let endpoint = shared_server()?;
    let dir = tempdir();
    let proxy = FaultProxy::start(&endpoint, plan(10));
    let faulty = Env {
        cache: dir.path().join("cache"),
        endpoint: Some(proxy.endpoint()),
    };
    let clean = Env {
        cache: dir.path().join("clean-cache"),
        endpoint: Some(endpoint),
    };
    let src = p(dir.path(), "d.qcow2");
    let size = format!("{mib}M");
    qemu_img(&["create", "-f", "qcow2", path_str(&src), &size]);
    qemu_io("qcow2", &src, &as_refs(&mixed_pattern(mib * MIB)));
    let prefix = format!(
        "s3://diskkit-test/faults-{}",
        dir.path().file_name().unwrap().to_string_lossy()
    );
    Some(Setup {
        dir,
        proxy,
        faulty,
        clean,
        src,
        prefix,
    })
}

/// Whether the listing of `url`'s folder holds the object at `url` itself (a push writes its
/// manifest before the object is complete; `ls URL` of an object lists a folder of that name).
fn object_listed(env: &Env, url: &str) -> bool {
    let folder = &url[..=url.rfind('/').unwrap()];
    let (code, listed, _) = env.run(&["ls", "--output", "json", folder]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap_or_default();
    code == 0
        && listed
            .as_array()
            .is_some_and(|a| a.iter().any(|o| o["url"] == url))
}

/// Runs `args` until it succeeds (at most [`RUNS`] times); after each failed run, `check` is
/// called. Returns the runs it took.
fn until_done(env: &Env, args: &[&str], check: &mut dyn FnMut()) -> usize {
    for run in 1..=RUNS {
        if run > 1 {
            FAILED_RUNS.set(FAILED_RUNS.get() + 1);
        }
        let out = env
            .command(args)
            .env("DISKKIT_S3_READ_TIMEOUT", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => return run,
            Some(2) => {
                assert!(
                    err.contains("diskkit"),
                    "unclear error for {args:?}:\n{err}"
                );
                assert!(!err.contains("panicked"), "{err}");
                check();
            }
            code => panic!("diskkit {args:?} ended with {code:?}:\n{err}"),
        }
    }
    panic!("diskkit {args:?} did not complete in {RUNS} runs");
}

/// Runs `round` `DISKKIT_FAULT_ROUNDS` times (once by default), each with the faults of
/// [`plan`] in another order: longer campaigns for the README's figures.
fn each_round(round: fn()) {
    let rounds = std::env::var("DISKKIT_FAULT_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1u64);
    for r in 0..rounds {
        ROUND.set(r);
        round();
    }
}

thread_local! {
    /// This test's round of [`each_round`].
    static ROUND: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Runs of this test's commands that failed (and were run again).
    static FAILED_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Prints what a test put through the proxy (`cargo test --test faults -- --nocapture`: the
/// figures of the README's reliability table). Reached only when every check passed.
fn print_tally(test: &str, proxy: &FaultProxy) {
    let failed_runs = FAILED_RUNS.replace(0);
    eprintln!(
        "faults: {test}: {} requests, {} faults injected, {failed_runs} failed runs resumed: {:?}",
        proxy.requests(),
        proxy.faults_injected(),
        proxy.counts()
    );
}

#[test]
fn push_verify_pull_complete_or_resume_under_faults() {
    each_round(push_verify_pull_complete_or_resume_under_faults_round);
}

fn push_verify_pull_complete_or_resume_under_faults_round() {
    let Some(t) = setup(30) else {
        return;
    };
    let (env, clean, proxy) = (&t.faulty, &t.clean, &t.proxy);
    let url = format!("{}/d.raw", t.prefix);
    // An object under the final key is always whole and verified.
    let mut object_whole = || {
        if object_listed(clean, &url) {
            clean.ok(&["verify", &url]);
        }
    };
    let runs = until_done(
        env,
        &[
            "push",
            "--part-size",
            "5M",
            "--parallel",
            "2",
            path_str(&t.src),
            &url,
        ],
        &mut object_whole,
    );
    assert!(
        runs > 1,
        "the outage did not stop a push: {:?}",
        proxy.counts()
    );
    assert!(
        object_listed(clean, &url),
        "the pushed object is not listed"
    );
    proxy.set_plan(plan(proxy.requests() + 3));
    until_done(env, &["verify", &url], &mut || {});
    let pulled = p(t.dir.path(), "pulled.raw");
    proxy.set_plan(plan(proxy.requests() + 3));
    // A pull that failed leaves nothing under the output's name.
    let runs = until_done(env, &["pull", &url, path_str(&pulled)], &mut || {
        assert!(!pulled.exists(), "a failed pull left {}", pulled.display());
    });
    assert!(
        runs > 1,
        "the outage did not stop a pull: {:?}",
        proxy.counts()
    );
    qemu_img(&["compare", path_str(&t.src), path_str(&pulled)]);
    let counts = proxy.counts();
    for f in ALL_FAULTS {
        assert!(
            counts.contains_key(&format!("{f:?}")),
            "{f:?} never injected: {counts:?}"
        );
    }
    clean.ok(&["rm", &url]);
    print_tally("push_verify_pull_complete_or_resume_under_faults", &t.proxy);
}

#[test]
fn snapshot_create_and_restore_complete_or_resume_under_faults() {
    each_round(snapshot_create_and_restore_complete_or_resume_under_faults_round);
}

fn snapshot_create_and_restore_complete_or_resume_under_faults_round() {
    let Some(t) = setup(24) else {
        return;
    };
    let (env, clean, proxy) = (&t.faulty, &t.clean, &t.proxy);
    let store = format!("{}/store", t.prefix);
    // A snapshot that is listed is complete: its chunks are all there.
    let mut store_sound = || {
        if clean.run(&["snapshot", "ls", &store]).0 == 0 {
            clean.ok(&["snapshot", "verify", &store]);
        }
    };
    let runs = until_done(
        env,
        &["snapshot", "create", path_str(&t.src), &store],
        &mut store_sound,
    );
    assert!(
        runs > 1,
        "the outage did not stop a create: {:?}",
        proxy.counts()
    );
    let id = clean.ok(&["snapshot", "ls", "--output", "json", &store]);
    let list: serde_json::Value = serde_json::from_str(&id).unwrap();
    let id = list[0]["id"].as_str().expect("snapshot id").to_string();
    clean.ok(&["snapshot", "verify", "--read-data", &store]);
    let restored = p(t.dir.path(), "restored.qcow2");
    proxy.set_plan(plan(proxy.requests() + 3));
    until_done(
        env,
        &[
            "snapshot",
            "restore",
            "-O",
            "qcow2",
            &store,
            &id,
            path_str(&restored),
        ],
        &mut || assert!(!restored.exists(), "a failed restore left its output"),
    );
    qemu_img(&["check", path_str(&restored)]);
    qemu_img(&["compare", path_str(&t.src), path_str(&restored)]);
    assert!(proxy.faults_injected() >= 12, "{:?}", proxy.counts());
    print_tally(
        "snapshot_create_and_restore_complete_or_resume_under_faults",
        &t.proxy,
    );
}

#[test]
fn bundle_copy_completes_or_resumes_under_faults() {
    each_round(bundle_copy_completes_or_resumes_under_faults_round);
}

fn bundle_copy_completes_or_resumes_under_faults_round() {
    let Some(t) = setup(16) else {
        return;
    };
    let (env, clean, proxy) = (&t.faulty, &t.clean, &t.proxy);
    let data = p(t.dir.path(), "data.raw");
    qemu_img(&["create", "-f", "raw", path_str(&data), "8M"]);
    qemu_io("raw", &data, &as_refs(&mixed_pattern(8 * MIB)));
    let local = p(t.dir.path(), "store");
    let data_arg = format!("vdb={}", data.display());
    clean.ok(&[
        "bundle",
        "create",
        "--system",
        path_str(&t.src),
        "--data",
        &data_arg,
        path_str(&local),
        "web",
    ]);
    let dst = format!("{}/store", t.prefix);
    // A bundle that is listed is whole: its manifest is written after every chunk.
    let mut bundle_sound = || {
        let (code, listed, _) = clean.run(&["bundle", "ls", "--output", "json", &dst]);
        if code == 0 && listed.contains("\"web\"") {
            clean.ok(&["bundle", "verify", &dst, "web"]);
        }
    };
    let runs = until_done(
        env,
        &["bundle", "copy", path_str(&local), "web", &dst],
        &mut bundle_sound,
    );
    assert!(
        runs > 1,
        "the outage did not stop a copy: {:?}",
        proxy.counts()
    );
    clean.ok(&["bundle", "verify", &dst, "web"]);
    for (disk, img) in [("vda", &t.src), ("vdb", &data)] {
        clean.ok(&["compare", path_str(img), &format!("{dst}#web/{disk}")]);
    }
    print_tally("bundle_copy_completes_or_resumes_under_faults", &t.proxy);
}

#[test]
fn batch_run_completes_or_resumes_under_faults() {
    each_round(batch_run_completes_or_resumes_under_faults_round);
}

fn batch_run_completes_or_resumes_under_faults_round() {
    let Some(t) = setup(8) else {
        return;
    };
    let (env, clean, proxy) = (&t.faulty, &t.clean, &t.proxy);
    let objects: Vec<(String, &str)> = [("a.raw", "raw"), ("b.qcow2", "qcow2"), ("c.vhd", "vpc")]
        .iter()
        .map(|(name, format)| (format!("{}/out/{name}", t.prefix), *format))
        .collect();
    let converted = p(t.dir.path(), "converted.qcow2");
    let mut jobs = String::from("source,destination,operation,format\n");
    for (url, format) in &objects {
        jobs.push_str(&format!("{},{url},push,{format}\n", t.src.display()));
    }
    jobs.push_str(&format!(
        "{},{},convert,qcow2\n",
        t.src.display(),
        converted.display()
    ));
    let job_file = p(t.dir.path(), "jobs.csv");
    std::fs::write(&job_file, jobs).unwrap();
    let state = format!("{}/state", t.prefix);
    let args = [
        "batch",
        "run",
        path_str(&job_file),
        "--state",
        &state,
        "--retries",
        "1",
    ];
    // A worker either finishes (0) or gives up on items still failing with retryable errors
    // (75, "run again"); after each, every object under its final key verifies.
    let mut done = false;
    for _ in 0..RUNS {
        let out = env
            .command(&args)
            .env("DISKKIT_S3_READ_TIMEOUT", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
        for (url, _) in &objects {
            if object_listed(clean, url) {
                clean.ok(&["verify", url]);
            }
        }
        match out.status.code() {
            Some(0) => {
                done = true;
                break;
            }
            Some(75) => FAILED_RUNS.set(FAILED_RUNS.get() + 1),
            code => panic!("batch run ended with {code:?}:\n{err}"),
        }
    }
    assert!(done, "batch run did not complete in {RUNS} runs");
    assert!(proxy.faults_injected() >= 12, "{:?}", proxy.counts());
    for (url, _) in &objects {
        assert!(object_listed(clean, url), "{url} is not listed");
        clean.ok(&["verify", url]);
        clean.ok(&["compare", path_str(&t.src), url]);
    }
    qemu_img(&["compare", path_str(&t.src), path_str(&converted)]);
    let status = clean.ok(&["batch", "status", "--state", &state, "--output", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        (&status["done"], &status["failed"]),
        (&4.into(), &0.into()),
        "{status}"
    );
    // A rerun has nothing left to do.
    let out = env.command(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    print_tally("batch_run_completes_or_resumes_under_faults", &t.proxy);
}

//! `diskkit batch`: job files, several workers sharing one state, a worker killed mid-item and
//! rerun, a permanently failing item among good ones, a real S3 server restarted during a run,
//! the deployment files, and a real Slurm job array (scripts/test.sh starts a private
//! single-node cluster and exports DISKKIT_TEST_SLURM; like the S3 server, under CI a missing
//! or broken cluster fails the test, elsewhere it says why it skips).

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
use common::s3::{ACCESS_KEY, SECRET_KEY};

/// A diskkit command with its own checkpoint and profile directories and the S3 test keys.
fn diskkit_cmd(cache: &Path, endpoint: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(diskkit_bin());
    cmd.args(args)
        .env("XDG_CACHE_HOME", cache)
        .env("XDG_CONFIG_HOME", cache)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("AWS_BATCH_JOB_ARRAY_INDEX");
    match endpoint {
        Some(e) => cmd.env("AWS_ENDPOINT_URL", e),
        None => cmd.env_remove("AWS_ENDPOINT_URL"),
    };
    cmd
}

fn output(mut cmd: Command) -> (i32, String, String) {
    let out = cmd.output().expect("run diskkit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `n` small source images, raw, qcow2 and VHD in turn, each with its own data at both ends
/// and a hole between.
fn sources(dir: &Path, n: usize, size: u64) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let raw = dir.join(format!("src-{i}.raw"));
            let f = std::fs::File::create(&raw).unwrap();
            use std::os::unix::fs::FileExt;
            f.write_all_at(&pseudo_random(i as u64 + 1, MIB as usize), 0)
                .unwrap();
            f.write_all_at(
                &pseudo_random(i as u64 + 100, 512 << 10),
                size - (512 << 10),
            )
            .unwrap();
            drop(f);
            let fmt = ["raw", "qcow2", "vpc"][i % 3];
            if fmt == "raw" {
                return raw;
            }
            let out = dir.join(format!("src-{i}.{fmt}"));
            qemu_img(&["convert", "-O", fmt, path_str(&raw), path_str(&out)]);
            std::fs::remove_file(&raw).unwrap();
            out
        })
        .collect()
}

/// Writes a CSV job file converting each source to `out/dst-I.qcow2`; returns the outputs.
fn convert_job(dir: &Path, srcs: &[PathBuf]) -> (PathBuf, Vec<PathBuf>) {
    let mut text = String::from("source,destination,format\n");
    let mut outs = Vec::new();
    for (i, s) in srcs.iter().enumerate() {
        let name = s.file_name().unwrap().to_string_lossy();
        text.push_str(&format!("{name},out/dst-{i}.qcow2,qcow2\n"));
        outs.push(dir.join(format!("out/dst-{i}.qcow2")));
    }
    let jobs = dir.join("jobs.csv");
    std::fs::write(&jobs, text).unwrap();
    (jobs, outs)
}

/// Each output passes qemu-img check and has its source's content.
fn verify_converted(srcs: &[PathBuf], outs: &[PathBuf]) {
    for (s, o) in srcs.iter().zip(outs) {
        qemu_img(&["check", path_str(o)]);
        qemu_img(&["compare", "-q", path_str(s), path_str(o)]);
    }
}

fn status_json(cache: &Path, endpoint: Option<&str>, state: &str) -> serde_json::Value {
    let (code, out, err) = output(diskkit_cmd(
        cache,
        endpoint,
        &["batch", "status", "--state", state, "--output", "json"],
    ));
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `batch check JOBS`: (exit code, stdout, stderr).
fn batch_check(cache: &Path, jobs: &Path) -> (i32, String, String) {
    output(diskkit_cmd(
        cache,
        None,
        &["batch", "check", path_str(jobs)],
    ))
}

/// `batch report --output json` of a local state: one record per item, in job-file order.
fn report_json(cache: &Path, state: &Path) -> Vec<serde_json::Value> {
    let (code, out, err) = output(diskkit_cmd(
        cache,
        None,
        &[
            "batch",
            "report",
            "--state",
            path_str(state),
            "--output",
            "json",
        ],
    ));
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `diskkit hash -a ALGORITHM` of an image.
fn guest_digest(image: &Path, algorithm: &str) -> String {
    let hash = diskkit_ok(&["hash", "-a", algorithm, path_str(image)]);
    hash.split_whitespace().next().unwrap().to_string()
}

/// The JSON event lines of a log.
fn events(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn count(events: &[serde_json::Value], kind: &str) -> usize {
    events.iter().filter(|e| e["event"] == kind).count()
}

/// Files in `dir` (not recursive), sorted.
fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn check_names_line_and_field() {
    let dir = tempdir();
    let srcs = sources(dir.path(), 2, 2 * MIB);
    let (jobs, _) = convert_job(dir.path(), &srcs);
    let cache = dir.path().join("cache");
    let (code, out, err) = batch_check(&cache, &jobs);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 items"), "{out}");
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "source,destination,format\nsrc-0.raw,a.qcow2,qcow2\nmissing.raw,b.qcow2,qcow2\n",
    )
    .unwrap();
    let (code, _, err) = batch_check(&cache, &bad);
    assert_eq!(code, 2);
    assert!(err.contains("line 3: field source:"), "{err}");
    std::fs::write(&bad, "source,destination,format\nsrc-0.raw,a.qcow2,qcow9\n").unwrap();
    let (code, _, err) = batch_check(&cache, &bad);
    assert_eq!(code, 2);
    assert!(err.contains("line 2: field format:"), "{err}");
    // run refuses the same file before doing anything.
    let state = dir.path().join("state");
    let (code, _, err) = output(diskkit_cmd(
        &cache,
        None,
        &["batch", "run", path_str(&bad), "--state", path_str(&state)],
    ));
    assert_eq!(code, 2, "{err}");
    assert!(!state.exists());
}

#[test]
fn three_workers_share_one_job_and_a_rerun_does_nothing() {
    let dir = tempdir();
    let srcs = sources(dir.path(), 12, 3 * MIB);
    let (jobs, outs) = convert_job(dir.path(), &srcs);
    let cache = dir.path().join("cache");
    let state = dir.path().join("state");
    let args = [
        "batch",
        "run",
        path_str(&jobs),
        "--state",
        path_str(&state),
        "--jobs",
        "2",
        "--log-format",
        "json",
    ];
    let workers: Vec<Child> = (0..3)
        .map(|_| {
            diskkit_cmd(&cache, None, &args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        let out = w.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{log}");
        all.extend(events(&log));
    }
    // Every item done exactly once over the three workers.
    let mut lines: Vec<u64> = all
        .iter()
        .filter(|e| e["event"] == "done")
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    lines.sort();
    assert_eq!(lines, (2..14).collect::<Vec<u64>>());
    verify_converted(&srcs, &outs);
    assert_eq!(
        file_names(&dir.path().join("out")).len(),
        12,
        "no leftovers"
    );
    let s = status_json(&cache, None, path_str(&state));
    assert_eq!(
        (
            &s["items"],
            &s["done"],
            &s["failed"],
            &s["running"],
            &s["pending"]
        ),
        (&12.into(), &12.into(), &0.into(), &0.into(), &0.into()),
        "{s}"
    );
    assert_eq!(s["workers"], 3, "{s}");
    assert_eq!(s["workers_active"], 0, "{s}");
    // Guest bytes of the sources (VHD rounds sizes up to its geometry).
    assert!(s["bytes_done"].as_u64().unwrap() >= 12 * 3 * MIB, "{s}");
    assert!(s["failures"].as_array().unwrap().is_empty());
    // The report: one done record per item, with the digest diskkit hash computes (BLAKE3 by
    // default for conversions).
    let report = report_json(&cache, &state);
    assert_eq!(report.len(), 12);
    assert_eq!(report[0]["digest"], guest_digest(&srcs[0], "blake3"));
    assert_eq!(report[0]["digest_definition"], "diskkit-guest-blake3-v1");
    // The same command again: nothing to do, nothing written.
    let mtimes: Vec<_> = outs
        .iter()
        .map(|o| std::fs::metadata(o).unwrap().modified().unwrap())
        .collect();
    let (code, _, log) = output(diskkit_cmd(&cache, None, &args));
    assert_eq!(code, 0, "{log}");
    let again = events(&log);
    assert_eq!(count(&again, "started"), 0, "{log}");
    let finished = again
        .iter()
        .find(|e| e["event"] == "worker-finished")
        .unwrap();
    assert_eq!(finished["already_done"], 12, "{log}");
    for (o, m) in outs.iter().zip(mtimes) {
        assert_eq!(std::fs::metadata(o).unwrap().modified().unwrap(), m);
    }
}

/// Spawns a worker whose JSON events arrive on the returned channel as they are written.
fn spawn_worker(mut cmd: Command) -> (Child, mpsc::Receiver<serde_json::Value>) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            } else {
                eprintln!("worker: {line}");
            }
        }
    });
    (child, rx)
}

/// Waits for an event matching `want`; returns every event seen until then.
fn wait_for(
    rx: &mpsc::Receiver<serde_json::Value>,
    want: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let mut seen = Vec::new();
    loop {
        let e = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no awaited event; saw {seen:?}"));
        let hit = want(&e);
        seen.push(e);
        if hit {
            return seen;
        }
    }
}

#[test]
fn killed_worker_mid_item_then_rerun_resumes() {
    let dir = tempdir();
    let srcs = sources(dir.path(), 4, 8 * MIB);
    let bucket = dir.path().join("bucket");
    std::fs::create_dir(&bucket).unwrap();
    // Pushes into a local bucket, slowed so that the kill lands inside one.
    let mut text = String::from(
        "{\"source\":\"src-0.raw\",\"destination\":\"out/c0.qcow2\",\"format\":\"qcow2\"}\n",
    );
    for (i, s) in srcs.iter().enumerate() {
        text.push_str(&format!(
            "{{\"source\":\"{}\",\"destination\":\"bucket/p{i}.raw\",\"operation\":\"push\"}}\n",
            s.file_name().unwrap().to_string_lossy()
        ));
    }
    let jobs = dir.path().join("jobs.jsonl");
    std::fs::write(&jobs, text).unwrap();
    let cache = dir.path().join("cache");
    let state = dir.path().join("state");
    let args = |rate: &'static str| {
        vec![
            "batch".to_string(),
            "run".into(),
            path_str(&jobs).into(),
            "--state".into(),
            path_str(&state).into(),
            "--jobs".into(),
            "1".into(),
            "--log-format".into(),
            "json".into(),
            "--rate-limit".into(),
            rate.into(),
        ]
    };
    let first = args("3M");
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let (mut worker, rx) = spawn_worker(diskkit_cmd(&cache, None, &first));
    wait_for(&rx, |e| e["event"] == "started" && e["operation"] == "push");
    // Inside the push: some parts are sent.
    std::thread::sleep(Duration::from_millis(2500));
    worker.kill().unwrap();
    worker.wait().unwrap();
    // The rerun on this host takes over the dead process's claim at once (a lease wait would
    // leave that item to another worker, and this one would end with it undone).
    let second = args("1G");
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    let (code, _, log) = output(diskkit_cmd(&cache, None, &second));
    assert_eq!(code, 0, "{log}");
    let ev = events(&log);
    assert_eq!(count(&ev, "takeover"), 1, "{log}");
    let s = status_json(&cache, None, path_str(&state));
    assert_eq!((&s["done"], &s["running"]), (&5.into(), &0.into()), "{s}");
    for (i, src) in srcs.iter().enumerate() {
        let object = bucket.join(format!("p{i}.raw"));
        diskkit_ok(&["verify", path_str(&object)]);
        qemu_img(&["compare", "-q", path_str(src), path_str(&object)]);
    }
    // Each object once, no unfinished upload left behind.
    let names = file_names(&bucket);
    assert_eq!(names.len(), 8, "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn corrupt_source_fails_permanently_while_the_others_complete() {
    let dir = tempdir();
    let mut srcs = sources(dir.path(), 4, 2 * MIB);
    let corrupt = dir.path().join("corrupt.qcow2");
    qemu_img(&["create", "-f", "qcow2", path_str(&corrupt), "4M"]);
    {
        use std::os::unix::fs::FileExt;
        // An L1 table offset past any file the image could have.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&corrupt)
            .unwrap();
        f.write_all_at(&0x7fff_ffff_ffff_fe00u64.to_be_bytes(), 40)
            .unwrap();
    }
    srcs.insert(2, corrupt.clone());
    let (jobs, outs) = convert_job(dir.path(), &srcs);
    let cache = dir.path().join("cache");
    let state = dir.path().join("state");
    let run = |extra: &[&str]| {
        let mut args = vec!["batch", "run", path_str(&jobs), "--state", path_str(&state)];
        args.extend_from_slice(extra);
        output(diskkit_cmd(&cache, None, &args))
    };
    let (code, _, log) = run(&[]);
    assert_eq!(code, 3, "{log}");
    assert!(log.contains("failed line 4"), "{log}");
    let good: Vec<usize> = vec![0, 1, 3, 4];
    let pick = |v: &[PathBuf]| good.iter().map(|&i| v[i].clone()).collect::<Vec<_>>();
    verify_converted(&pick(&srcs), &pick(&outs));
    assert!(!outs[2].exists());
    let s = status_json(&cache, None, path_str(&state));
    assert_eq!(
        (&s["done"], &s["failed"], &s["pending"]),
        (&4.into(), &1.into(), &0.into()),
        "{s}"
    );
    let f = &s["failures"][0];
    assert_eq!(f["line"], 4, "{s}");
    assert_eq!(f["error_kind"], "CorruptImage", "{s}");
    assert_eq!(f["retryable"], false, "{s}");
    assert!(
        f["message"].as_str().unwrap().contains("corrupt.qcow2"),
        "{s}"
    );
    assert_eq!(f["attempts"], 1, "a permanent error is not retried: {s}");
    let (code, human, _) = output(diskkit_cmd(
        &cache,
        None,
        &["batch", "status", "--state", path_str(&state)],
    ));
    assert_eq!(code, 0);
    assert!(
        human.contains("5: 4 done, 1 failed, 0 running, 0 pending"),
        "{human}"
    );
    assert!(human.contains("failed:    line 4"), "{human}");
    let (code, csv, _) = output(diskkit_cmd(
        &cache,
        None,
        &["batch", "report", "--state", path_str(&state)],
    ));
    assert_eq!(code, 0);
    assert_eq!(csv.lines().count(), 6, "{csv}");
    assert_eq!(
        csv.lines().filter(|l| l.contains(",failed,")).count(),
        1,
        "{csv}"
    );
    // A rerun leaves the permanent failure alone and says so.
    let (code, _, log) = run(&[]);
    assert_eq!(code, 3, "{log}");
    assert!(log.contains("skipped line 4"), "{log}");
    // --retry-failed tries it again (and it fails again)...
    let (code, _, log) = run(&["--retry-failed"]);
    assert_eq!(code, 3, "{log}");
    assert!(log.contains("failed line 4"), "{log}");
    // ... and a fixed source is new work, tried without asking.
    std::fs::copy(&srcs[0], &corrupt).unwrap();
    let (code, _, log) = run(&[]);
    assert_eq!(code, 0, "{log}");
    qemu_img(&["compare", "-q", path_str(&corrupt), path_str(&outs[2])]);
    let s = status_json(&cache, None, path_str(&state));
    assert_eq!((&s["done"], &s["failed"]), (&5.into(), &0.into()), "{s}");
}

#[test]
fn s3_server_restarted_during_a_run_is_recovered_by_retries() {
    if s3::shared_server().is_none() {
        return;
    }
    let dir = tempdir();
    let data = dir.path().join("weed");
    std::fs::create_dir(&data).unwrap();
    // Ports of our own (gRPC twins at +10000), away from the shared server and tests/storage.rs.
    let base = 26000 + (std::process::id() % 300) as u16 * 10;
    let mut weed = s3::Server::start(&data, base);
    let endpoint = weed.endpoint();
    let srcs = sources(dir.path(), 6, 4 * MIB);
    let mut text = String::from("source,destination,operation,format\n");
    for (i, s) in srcs.iter().enumerate() {
        text.push_str(&format!(
            "{},s3://diskkit-test/restart/o{i}.qcow2,push,qcow2\n",
            s.file_name().unwrap().to_string_lossy()
        ));
    }
    let jobs = dir.path().join("jobs.csv");
    std::fs::write(&jobs, text).unwrap();
    let cache = dir.path().join("cache");
    let state = "s3://diskkit-test/restart/state/";
    let cmd = diskkit_cmd(
        &cache,
        Some(&endpoint),
        &[
            "batch",
            "run",
            path_str(&jobs),
            "--state",
            state,
            "--jobs",
            "2",
            "--rate-limit",
            "2M",
            "--retries",
            "8",
            "--log-format",
            "json",
        ],
    );
    let (mut worker, rx) = spawn_worker(cmd);
    wait_for(&rx, |e| e["event"] == "done");
    // Longer than the storage layer's own retries ride out: the worker's retries must.
    weed.stop();
    std::thread::sleep(Duration::from_secs(15));
    let _weed = s3::Server::start(&data, base);
    let status = worker.wait().unwrap();
    let rest: Vec<serde_json::Value> = rx.try_iter().collect();
    assert_eq!(status.code(), Some(0), "{rest:?}");
    assert!(
        count(&rest, "retry") + count(&rest, "state-retry") > 0,
        "the outage was not seen: {rest:?}"
    );
    let s = status_json(&cache, Some(&endpoint), state);
    assert_eq!((&s["done"], &s["failed"]), (&6.into(), &0.into()), "{s}");
    for i in 0..6 {
        let url = format!("s3://diskkit-test/restart/o{i}.qcow2");
        let (code, out, err) = output(diskkit_cmd(&cache, Some(&endpoint), &["verify", &url]));
        assert_eq!(code, 0, "{url}: {out}{err}");
    }
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn kubernetes_manifest_is_an_indexed_job_that_fails_indexes_on_permanent_failures() {
    let text = std::fs::read_to_string(repo_file("deploy/kubernetes/batch-job.yaml")).unwrap();
    let docs: Vec<serde_norway::Value> = serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let job = docs.iter().find(|d| d["kind"] == "Job").expect("a Job");
    let secret = docs
        .iter()
        .find(|d| d["kind"] == "Secret")
        .expect("a Secret");
    assert_eq!(job["apiVersion"], "batch/v1");
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    assert!(spec["backoffLimitPerIndex"].as_u64().unwrap() >= 1);
    let pod = &spec["template"]["spec"];
    assert_eq!(
        pod["restartPolicy"], "Never",
        "backoffLimitPerIndex needs it"
    );
    let container = &pod["containers"][0];
    let name = container["name"].as_str().unwrap();
    // The permanent-failure exit code, as batch run --help documents it.
    let help = diskkit_ok(&["batch", "run", "--help"]);
    assert!(help.contains("3 some items failed permanently"), "{help}");
    let rules = spec["podFailurePolicy"]["rules"].as_sequence().unwrap();
    let fail_index = rules
        .iter()
        .find(|r| r["action"] == "FailIndex")
        .expect("a FailIndex rule");
    assert_eq!(fail_index["onExitCodes"]["containerName"], name);
    assert_eq!(fail_index["onExitCodes"]["operator"], "In");
    assert_eq!(fail_index["onExitCodes"]["values"][0], 3);
    // The worker: batch run with the state in a bucket and as many shards as completions.
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(&args[..2], ["batch", "run"]);
    let after = |flag: &str| args[args.iter().position(|a| *a == flag).unwrap() + 1];
    assert!(after("--state").starts_with("s3://"));
    assert_eq!(
        after("--shards").parse::<u64>().unwrap(),
        spec["completions"].as_u64().unwrap()
    );
    let secret_name = secret["metadata"]["name"].as_str().unwrap();
    assert!(
        container["envFrom"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|e| e["secretRef"]["name"] == secret_name),
        "credentials from the Secret"
    );
    // The arguments parse: run them up to the job file, which is not here.
    let (code, _, err) = diskkit(&args);
    assert_eq!(code, 2);
    assert!(err.contains("/jobs/jobs.csv"), "{err}");
}

#[test]
fn containerfile_builds_in_one_stage_and_runs_the_binary_alone() {
    let text = std::fs::read_to_string(repo_file("deploy/Containerfile")).unwrap();
    let instructions: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<usize> = (0..instructions.len())
        .filter(|&i| instructions[i].starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "build stage and runtime stage");
    assert!(instructions[froms[0]].ends_with(" AS build"));
    let build = &instructions[froms[0]..froms[1]];
    assert!(
        build
            .iter()
            .any(|l| l.contains("cargo build --release --locked"))
    );
    let runtime = &instructions[froms[1]..];
    assert!(runtime[0].contains("-slim"), "{}", runtime[0]);
    let copies: Vec<&&str> = runtime.iter().filter(|l| l.starts_with("COPY")).collect();
    assert_eq!(copies.len(), 1);
    assert!(copies[0].starts_with("COPY --from=build /src/target/release/diskkit "));
    assert!(
        runtime
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT [\"/usr/local/bin/diskkit\"]"))
    );
    assert!(
        runtime.iter().any(|l| l.starts_with("USER ")),
        "not as root"
    );
    // Everything the build stage copies is in the repository (the workspace builds from it).
    for dir in ["src", "formats", "Cargo.toml", "Cargo.lock"] {
        assert!(repo_file(dir).exists(), "{dir}");
    }
    let status = Command::new("bash")
        .args([
            "-n",
            path_str(&repo_file("deploy/slurm/diskkit-batch.sbatch")),
        ])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The private Slurm cluster scripts/test.sh started (its slurm.conf), or `None` outside CI.
fn slurm_cluster() -> Option<PathBuf> {
    match std::env::var("DISKKIT_TEST_SLURM") {
        Ok(conf) if !conf.is_empty() => Some(PathBuf::from(conf)),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "DISKKIT_TEST_SLURM is not set: run the tests through scripts/test.sh, which \
                 starts a private Slurm cluster"
            );
            eprintln!("skipped: no Slurm test cluster (run scripts/test.sh to start one)");
            None
        }
    }
}

fn slurm(conf: &Path, tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .env("SLURM_CONF", conf)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(task, state)` of the job's array tasks that are not finished.
fn unfinished_tasks(conf: &Path, job: &str) -> Vec<(String, String)> {
    slurm(
        conf,
        "squeue",
        &["-h", "-j", job, "-t", "PD,R,CG,S,CF,RQ,RS", "-o", "%K %T"],
    )
    .lines()
    .filter_map(|l| l.split_once(' '))
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect()
}

#[test]
fn slurm_array_cancelled_task_requeued_does_every_item_once() {
    let Some(conf) = slurm_cluster() else {
        return;
    };
    let Some(endpoint) = s3::shared_server() else {
        return;
    };
    let dir = tempdir();
    let srcs = sources(dir.path(), 30, 2 * MIB);
    let prefix = format!("s3://diskkit-test/batch-slurm-{}", std::process::id());
    let mut text = String::from("source,destination,operation,format\n");
    let mut converts = Vec::new();
    let mut pushes = Vec::new();
    for (i, s) in srcs.iter().enumerate() {
        let name = s.file_name().unwrap().to_string_lossy();
        if i % 3 == 1 {
            let url = format!("{prefix}/out/o{i}.qcow2");
            text.push_str(&format!("{name},{url},push,qcow2\n"));
            pushes.push(url);
        } else {
            text.push_str(&format!("{name},out/c{i}.qcow2,convert,qcow2\n"));
            converts.push((s.clone(), dir.path().join(format!("out/c{i}.qcow2"))));
        }
    }
    let jobs = dir.path().join("jobs.csv");
    std::fs::write(&jobs, text).unwrap();
    let state = format!("{prefix}/state/");
    let cache = dir.path().join("cache");
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let script = repo_file("deploy/slurm/diskkit-batch.sbatch");
    let mut sbatch = diskkit_cmd(
        &cache,
        Some(&endpoint),
        &[
            "--parsable",
            "--array=0-2",
            // Three tasks at once on a 2-core runner.
            "--cpus-per-task=1",
            "--mem=256M",
            "--open-mode=append",
            &format!("--output={}/task-%a.log", logs.display()),
            path_str(&script),
            path_str(&jobs),
            &state,
            "--rate-limit",
            "1M",
        ],
    );
    sbatch
        .env("SLURM_CONF", &conf)
        .env("DISKKIT", diskkit_bin())
        .env("DISKKIT_JOBS", "1")
        .current_dir(dir.path());
    // diskkit_cmd made the command for diskkit: run sbatch with the same environment.
    let sbatch_out = {
        let mut c = Command::new("sbatch");
        c.args(sbatch.get_args());
        for (k, v) in sbatch.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.current_dir(dir.path());
        c.output().expect("run sbatch")
    };
    assert!(
        sbatch_out.status.success(),
        "sbatch: {}",
        String::from_utf8_lossy(&sbatch_out.stderr)
    );
    let job = String::from_utf8_lossy(&sbatch_out.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    // Task 1 inside a push (1 MiB/s: each push takes seconds): cancel it there.
    let log1 = logs.join("task-1.log");
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(&log1).unwrap_or_default();
        let ev = events(&log);
        let pushing = ev
            .iter()
            .rev()
            .find(|e| e["event"] == "started" || e["event"] == "done");
        if pushing.is_some_and(|e| e["event"] == "started" && e["operation"] == "push") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "task 1 started no push: {log}\n{:?}",
            unfinished_tasks(&conf, &job)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let task1 = format!("{job}_1");
    slurm(&conf, "scancel", &[&task1]);
    let start = Instant::now();
    while unfinished_tasks(&conf, &job).iter().any(|(t, _)| t == "1") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "task 1 not cancelled"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // slurmd refuses a job's credential issued in the second it revoked the job's last one
    // ("Job credential revoked"): let that second pass.
    std::thread::sleep(Duration::from_millis(2100));
    slurm(&conf, "scontrol", &["requeue", &task1]);
    // A requeued job waits before it is eligible again: now will do.
    slurm(
        &conf,
        "scontrol",
        &["update", &format!("jobid={task1}"), "StartTime=now"],
    );
    let start = Instant::now();
    while !unfinished_tasks(&conf, &job).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the array did not finish: {:?}",
            unfinished_tasks(&conf, &job)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut all = Vec::new();
    for t in 0..3 {
        let log = std::fs::read_to_string(logs.join(format!("task-{t}.log"))).unwrap();
        all.extend(events(&log));
    }
    let shown = || {
        (0..3)
            .map(|t| std::fs::read_to_string(logs.join(format!("task-{t}.log"))).unwrap())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    for t in 0..3 {
        let info = slurm(&conf, "scontrol", &["show", "job", &format!("{job}_{t}")]);
        assert!(info.contains("JobState=COMPLETED"), "{info}\n{}", shown());
        assert!(info.contains("ExitCode=0:0"), "{info}\n{}", shown());
    }
    assert!(
        slurm(&conf, "scontrol", &["show", "job", &task1]).contains("Restarts=1"),
        "task 1 was requeued"
    );
    // Every item done exactly once over the tasks, and recorded.
    let mut lines: Vec<u64> = all
        .iter()
        .filter(|e| e["event"] == "done")
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    lines.sort();
    assert_eq!(lines, (2..32).collect::<Vec<u64>>(), "{}", shown());
    let s = status_json(&cache, Some(&endpoint), &state);
    assert_eq!(
        (&s["done"], &s["failed"], &s["running"]),
        (&30.into(), &0.into(), &0.into()),
        "{s}"
    );
    // Outputs: each once, complete, with its source's content.
    let out_dir = dir.path().join("out");
    assert_eq!(
        file_names(&out_dir).len(),
        converts.len(),
        "{:?}",
        file_names(&out_dir)
    );
    for (src, out) in &converts {
        qemu_img(&["check", path_str(out)]);
        qemu_img(&["compare", "-q", path_str(src), path_str(out)]);
    }
    let (code, listing, err) = output(diskkit_cmd(
        &cache,
        Some(&endpoint),
        &["ls", "--output", "json", &format!("{prefix}/out/")],
    ));
    assert_eq!(code, 0, "{err}");
    for url in &pushes {
        let key = url.rsplit('/').next().unwrap();
        assert_eq!(
            listing.matches(&format!("/{key}\"")).count(),
            1,
            "{key}: {listing}"
        );
        let (code, out, err) = output(diskkit_cmd(&cache, Some(&endpoint), &["verify", url]));
        assert_eq!(code, 0, "{url}: {out}{err}");
    }
}

#[test]
fn targets_run_preflight_checks_and_gce_items_write_the_tarball() {
    let dir = tempdir();
    let d = dir.path();
    let good = sources(d, 1, 2 * MIB).remove(0);
    // GCE needs a partition table: a GPT disk with data in its partition.
    let gpt_disk = |name: &str| {
        let disk = d.join(name);
        qemu_img(&["create", "-f", "raw", path_str(&disk), "8M"]);
        let out = Command::new("sgdisk")
            .args(["-n1:0:+2M", "-t1:8300", path_str(&disk)])
            .output()
            .expect("run sgdisk");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        qemu_io("raw", &disk, &["write -P 0x5c 1M 1M"]);
        disk
    };
    let gpt = gpt_disk("gpt.raw");
    // A GPT disk whose primary header fails its CRC: the partition-table rule fails.
    let broken = gpt_disk("broken-gpt.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&broken)
            .unwrap();
        f.write_all_at(b"X", 512 + 48).unwrap();
    }
    let jobs = d.join("jobs.csv");
    std::fs::write(
        &jobs,
        format!(
            "source,destination,target\n{},out/good.vmdk,aws\n{},out/broken.vmdk,aws\n{},out/good.tar.gz,gce\n",
            path_str(&good),
            path_str(&broken),
            path_str(&gpt)
        ),
    )
    .unwrap();
    let cache = d.join("cache");
    let state = d.join("state");
    let (code, _, log) = batch_check(&cache, &jobs);
    assert_eq!(code, 0, "gce is a target of batch items: {log}");
    let (code, _, log) = output(diskkit_cmd(
        &cache,
        None,
        &[
            "batch",
            "run",
            path_str(&jobs),
            "--state",
            path_str(&state),
            "--digest",
            "sha256",
        ],
    ));
    assert_eq!(code, 3, "{log}");
    qemu_img(&[
        "compare",
        "-q",
        path_str(&good),
        path_str(&d.join("out/good.vmdk")),
    ]);
    assert!(!d.join("out/broken.vmdk").exists());
    let s = status_json(&cache, None, path_str(&state));
    assert_eq!((&s["done"], &s["failed"]), (&2.into(), &1.into()), "{s}");
    let f = &s["failures"][0];
    assert_eq!(
        (&f["line"], &f["retryable"]),
        (&3.into(), &false.into()),
        "{s}"
    );
    let message = f["message"].as_str().unwrap();
    assert!(
        message.contains("pre-flight checks for target aws failed")
            && message.contains("partition-table")
            && message.contains("CRC"),
        "{message}"
    );
    // GCE: disk.raw in a gzip'ed tarball, grown to whole GiB (the GPT backup moved to its end),
    // with the source's partition content.
    let unpacked = d.join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    let tar = Command::new("tar")
        .args([
            "-xzf",
            path_str(&d.join("out/good.tar.gz")),
            "-C",
            path_str(&unpacked),
        ])
        .output()
        .expect("run tar");
    assert!(
        tar.status.success(),
        "{}",
        String::from_utf8_lossy(&tar.stderr)
    );
    let disk = unpacked.join("disk.raw");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1 << 30);
    let part = |p: &Path| std::fs::read(p).unwrap()[MIB as usize..3 * MIB as usize].to_vec();
    assert!(part(&gpt) == part(&disk));
    // The done record's digest is disk.raw's guest digest, SHA-256 as --digest asked.
    let report = report_json(&cache, &state);
    assert_eq!(report[2]["digest"], guest_digest(&disk, "sha256"));
    assert_eq!(report[2]["digest_definition"], "diskkit-guest-sha256-v1");
}

#[test]
fn check_opens_the_objects_pull_items_read() {
    let Some(endpoint) = s3::shared_server() else {
        return;
    };
    let dir = tempdir();
    let src = sources(dir.path(), 1, 2 * MIB).remove(0);
    let cache = dir.path().join("cache");
    let prefix = format!("s3://diskkit-test/batch-check-{}", std::process::id());
    let object = format!("{prefix}/a.qcow2");
    let (code, _, err) = output(diskkit_cmd(
        &cache,
        Some(&endpoint),
        &["push", "-O", "qcow2", path_str(&src), &object],
    ));
    assert_eq!(code, 0, "{err}");
    let jobs = dir.path().join("jobs.csv");
    std::fs::write(
        &jobs,
        format!(
            "source,destination,operation\n{object},a.qcow2,pull\n{prefix}/missing.qcow2,b.qcow2,pull\n"
        ),
    )
    .unwrap();
    let (code, _, err) = output(diskkit_cmd(
        &cache,
        Some(&endpoint),
        &["batch", "check", path_str(&jobs)],
    ));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("line 3: field source:"), "{err}");
    assert!(!err.contains("line 2:"), "{err}");
    std::fs::write(
        &jobs,
        format!("source,destination,operation\n{object},a.qcow2,pull\n"),
    )
    .unwrap();
    let (code, out, err) = output(diskkit_cmd(
        &cache,
        Some(&endpoint),
        &["batch", "check", path_str(&jobs)],
    ));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 items, all sources readable"), "{out}");
}

#[test]
fn bundle_items_snapshot_a_machine_once() {
    let dir = tempdir();
    let d = dir.path();
    let srcs = sources(d, 2, 2 * MIB);
    let jobs = d.join("jobs.csv");
    std::fs::write(
        &jobs,
        format!(
            "source,destination,operation,options\n{},store#vm-1,bundle,\"vdb={}\"\n",
            srcs[0].file_name().unwrap().to_string_lossy(),
            srcs[1].file_name().unwrap().to_string_lossy()
        ),
    )
    .unwrap();
    let cache = d.join("cache");
    let state = d.join("state");
    let (code, _, err) = batch_check(&cache, &jobs);
    assert_eq!(code, 0, "{err}");
    let run = || {
        output(diskkit_cmd(
            &cache,
            None,
            &["batch", "run", path_str(&jobs), "--state", path_str(&state)],
        ))
    };
    let (code, _, log) = run();
    assert_eq!(code, 0, "{log}");
    let store = d.join("store");
    diskkit_ok(&["bundle", "verify", "--read-data", path_str(&store), "vm-1"]);
    let info = diskkit_ok(&[
        "bundle",
        "info",
        path_str(&store),
        "vm-1",
        "--output",
        "json",
    ]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let disks = info["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{info}");
    assert_eq!(
        (&disks[0]["device"], &disks[1]["device"]),
        (&"vda".into(), &"vdb".into())
    );
    assert_eq!(
        disks[1]["digest"],
        guest_digest(&srcs[1], "sha256"),
        "{info}"
    );
    let report = report_json(&cache, &state);
    assert_eq!(report[0]["digest"], info["digest"], "{info}");
    // A run that died after writing the bundle but before recording it: the bundle found with
    // the same disks is the item done.
    std::fs::remove_dir_all(&state).unwrap();
    let (code, _, log) = run();
    assert_eq!(code, 0, "{log}");
    assert_eq!(report_json(&cache, &state)[0]["state"], "done");
    // The same in a store of 1 MiB chunks, whose snapshots' digests are at that chunk size.
    diskkit_ok(&[
        "snapshot",
        "create",
        "--chunk-size",
        "1M",
        path_str(&srcs[1]),
        path_str(&d.join("store1m")),
    ]);
    std::fs::write(
        &jobs,
        format!(
            "source,destination,operation,options\n{},store1m#vm-3,bundle,\"vdb={}\"\n",
            srcs[0].file_name().unwrap().to_string_lossy(),
            srcs[1].file_name().unwrap().to_string_lossy()
        ),
    )
    .unwrap();
    for _ in 0..2 {
        std::fs::remove_dir_all(&state).unwrap();
        let (code, _, log) = run();
        assert_eq!(code, 0, "{log}");
    }
    // Bad data disk specs are named at check time.
    std::fs::write(
        &jobs,
        "source,destination,operation,options\nsrc-0.raw,store#vm-2,bundle,vdb\nsrc-0.raw,store,bundle,\n",
    )
    .unwrap();
    let (code, _, err) = batch_check(&cache, &jobs);
    assert_eq!(code, 2);
    assert!(err.contains("line 2: field options: 'vdb'"), "{err}");
    assert!(err.contains("line 3: field destination:"), "{err}");
}

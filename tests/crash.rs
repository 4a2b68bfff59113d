//! Crash consistency: every command that writes is killed with SIGKILL after a seeded random
//! delay (somewhere between its start and the time a clean run takes), then run again, and a
//! checker asserts the invariants after each kill and after each rerun:
//! - no partial file under a final name: a destination is absent or whole and equal to its
//!   source (`qemu-img compare`);
//! - no temporary file left after the clean rerun (`.NAME.diskkit-tmp-PID`, downloads, uploads,
//!   scratch files);
//! - no snapshot or bundle referencing a missing chunk (`snapshot verify`, `bundle verify`);
//! - images changed in place pass `qemu-img check` and read as the state before or after.
//!
//! CI runs the fixed seeds of `CI_SEEDS`; `DISKKIT_CRASH_ROUNDS=N` runs N seeded rounds per
//! operation instead. `--nocapture` prints the table (operation, kills, reruns, failures).
//! Push and pull use a local `file://` bucket, and the suite's S3 server as well when
//! DISKKIT_TEST_S3_ENDPOINT is set.

mod common;
use common::s3::{Env, local_bucket_env, shared_server};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const CI_SEEDS: [u64; 4] = [11, 23, 37, 41];

fn seeds() -> Vec<u64> {
    match std::env::var("DISKKIT_CRASH_ROUNDS").map(|n| n.parse::<u64>()) {
        Ok(Ok(n)) => (1..=n).map(|i| i * 7919).collect(),
        _ => CI_SEEDS.to_vec(),
    }
}

/// A fraction in [0, 1) drawn from `seed` and the operation's name.
fn fraction(seed: u64, name: &str) -> f64 {
    let mixed = name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let bytes = pseudo_random(mixed, 8);
    let x = u64::from_le_bytes(bytes.try_into().unwrap());
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// What one operation's rounds came to.
struct Tally {
    op: String,
    kills: u32,
    reruns: u32,
    failures: Vec<String>,
}

/// Checks an invariant; returns what is wrong (nothing when it holds).
type Check<'a> = Box<dyn Fn() -> Vec<String> + 'a>;

/// A command to kill and rerun, with how to put its starting state back and what must hold.
struct Op<'a> {
    name: String,
    args: Vec<String>,
    env: &'a Env,
    reset: Box<dyn Fn() + 'a>,
    /// What may be seen after a kill.
    after_kill: Check<'a>,
    /// Whether the kill left work to do (in-place changes that completed are not redone).
    needs_rerun: Box<dyn Fn() -> bool + 'a>,
    /// What must hold after the clean rerun.
    after_rerun: Check<'a>,
    /// Folders where no temporary file may remain after the clean rerun.
    roots: Vec<PathBuf>,
}

impl<'a> Op<'a> {
    fn new(name: impl Into<String>, env: &'a Env, args: &[&str]) -> Op<'a> {
        Op {
            name: name.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env,
            reset: Box::new(|| {}),
            after_kill: Box::new(Vec::new),
            needs_rerun: Box::new(|| true),
            after_rerun: Box::new(Vec::new),
            roots: Vec::new(),
        }
    }
}

/// Starts `args`, kills it with SIGKILL after `delay` unless it ended before; says whether it
/// was killed.
fn kill_after(env: &Env, args: &[String], delay: Duration) -> bool {
    let mut child = env
        .command(&as_refs(args))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start diskkit");
    std::thread::sleep(delay);
    if child.try_wait().unwrap().is_some() {
        return false;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    true
}

fn run_rounds(op: &Op) -> Tally {
    let mut tally = Tally {
        op: op.name.clone(),
        kills: 0,
        reruns: 0,
        failures: Vec::new(),
    };
    let clean_run = |tally: &mut Tally, what: &str| {
        let (code, out, err) = op.env.run(&as_refs(&op.args));
        if code != 0 {
            tally
                .failures
                .push(format!("{}: {what} exit {code}\n{out}\n{err}", op.name));
        }
        tally.failures.extend((op.after_rerun)());
        tally.failures.extend(temps_left(&op.roots));
    };
    (op.reset)();
    let start = Instant::now();
    clean_run(&mut tally, "uninterrupted run");
    let clean = start.elapsed();
    for seed in seeds() {
        (op.reset)();
        let delay = clean.mul_f64(fraction(seed, &op.name));
        if kill_after(op.env, &op.args, delay) {
            tally.kills += 1;
            let seen = (op.after_kill)();
            tally.failures.extend(
                seen.into_iter()
                    .map(|f| format!("seed {seed}, killed after {delay:?}: {f}")),
            );
        }
        if (op.needs_rerun)() {
            tally.reruns += 1;
            clean_run(&mut tally, &format!("rerun after seed {seed}"));
        }
    }
    tally
}

fn print_table(title: &str, tallies: &[Tally]) {
    let mut text = format!(
        "\n{title}\n{:<34} {:>6} {:>7} {:>19}\n",
        "operation", "kills", "reruns", "invariant failures"
    );
    for t in tallies {
        text.push_str(&format!(
            "{:<34} {:>6} {:>7} {:>19}\n",
            t.op,
            t.kills,
            t.reruns,
            t.failures.len()
        ));
    }
    println!("{text}");
    let failures: Vec<&String> = tallies.iter().flat_map(|t| &t.failures).collect();
    assert!(failures.is_empty(), "invariant failures:\n{failures:#?}");
}

/// `dst` is absent, or whole: the same guest as `src` and a clean `qemu-img check`.
fn absent_or_equal(src: &Path, dst: &Path) -> Vec<String> {
    if !dst.exists() {
        return Vec::new();
    }
    equal(src, dst)
}

/// `dst` exists, passes `qemu-img check` and has `src`'s guest content.
fn equal(src: &Path, dst: &Path) -> Vec<String> {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-q", path_str(src), path_str(dst)])
        .output()
        .unwrap();
    let mut failures = Vec::new();
    if !out.status.success() {
        failures.push(format!(
            "{} is not {} (qemu-img compare exit {:?}: {})",
            dst.display(),
            src.display(),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // qemu-img check has checks for these (not for raw and VHD).
    let checked = ["qcow2", "vmdk"].contains(&qemu_info(dst)["format"].as_str().unwrap_or(""));
    if checked && let Err(e) = qemu_check_clean(dst) {
        failures.push(e);
    }
    failures
}

fn remove(path: &Path) {
    if path.is_dir() {
        std::fs::remove_dir_all(path).unwrap();
    } else if path.exists() {
        std::fs::remove_file(path).unwrap();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    remove(to);
    let status = std::process::Command::new("cp")
        .args(["-a", path_str(from), path_str(to)])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A command that must succeed, its failure as an invariant failure.
fn succeeds(env: &Env, args: &[&str]) -> Vec<String> {
    let (code, out, err) = env.run(args);
    if code == 0 {
        Vec::new()
    } else {
        vec![format!("diskkit {args:?}: exit {code}\n{out}\n{err}")]
    }
}

#[test]
fn convert_killed_anywhere_leaves_nothing_partial() {
    let (dir, _, env) = local_bucket_env();
    let src = noisy_raw(dir.path(), "src.raw", 1);
    let mut tallies = Vec::new();
    for (fmt, extra) in [
        ("qcow2", None),
        ("qcow2", Some("-c")),
        ("vpc", None),
        ("vmdk", None),
    ] {
        let dst = dir.path().join(format!("out/dst.{fmt}"));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        let mut args = vec!["convert", "-O", fmt];
        args.extend(extra);
        args.extend([path_str(&src), path_str(&dst)]);
        let name = format!("convert -O {fmt} {}", extra.unwrap_or(""));
        let mut op = Op::new(name.trim_end(), &env, &args);
        op.reset = Box::new(|| remove(&dst));
        op.after_kill = Box::new(|| absent_or_equal(&src, &dst));
        op.after_rerun = Box::new(|| equal(&src, &dst));
        op.roots = vec![dir.path().to_path_buf()];
        tallies.push(run_rounds(&op));
    }
    print_table("crash: convert", &tallies);
}

/// `push` and `pull` through one bucket: `url(key)` names an object.
fn push_and_pull(env: &Env, dir: &Path, url: &dyn Fn(&str) -> String, label: &str) -> Vec<Tally> {
    let src = noisy_raw(dir, "src.raw", 2);
    let object = url("crash/src.raw");
    let mut tallies = Vec::new();
    // An object is never seen incomplete: `verify` passes, or it is not there at all.
    let verified_or_absent = || {
        let (code, _, err) = env.run(&["verify", &object]);
        let absent = err.contains("no such object");
        if code == 0 || absent {
            Vec::new()
        } else {
            vec![format!("verify {object}: exit {code}: {err}")]
        }
    };
    let mut push = Op::new(
        format!("push ({label})"),
        env,
        &["push", path_str(&src), &object],
    );
    push.reset = Box::new(|| {
        env.run(&["rm", &object]);
    });
    push.after_kill = Box::new(verified_or_absent);
    push.after_rerun = Box::new(|| succeeds(env, &["verify", &object]));
    push.roots = vec![dir.to_path_buf()];
    tallies.push(run_rounds(&push));

    for (fmt, name) in [(None, "pulled.raw"), (Some("qcow2"), "pulled.qcow2")] {
        let dst = dir.join(name);
        let mut args = vec!["pull"];
        if let Some(f) = fmt {
            args.extend(["-O", f]);
        }
        args.extend([object.as_str(), path_str(&dst)]);
        let mut pull = Op::new(
            format!(
                "pull {}({label})",
                fmt.map_or(String::new(), |f| format!("-O {f} "))
            ),
            env,
            &args,
        );
        pull.reset = Box::new(|| remove(&dst));
        pull.after_kill = Box::new(|| absent_or_equal(&src, &dst));
        pull.after_rerun = Box::new(|| equal(&src, &dst));
        pull.roots = vec![dir.to_path_buf()];
        tallies.push(run_rounds(&pull));
    }
    tallies
}

#[test]
fn push_and_pull_killed_anywhere_leave_nothing_partial() {
    let (dir, bucket, env) = local_bucket_env();
    let mut tallies = push_and_pull(
        &env,
        dir.path(),
        &|key| format!("file://{}/{key}", bucket.display()),
        "file://",
    );
    if let Some(endpoint) = shared_server() {
        let s3_dir = tempdir();
        let s3_env = Env {
            cache: s3_dir.path().join("cache"),
            endpoint: Some(endpoint),
        };
        let prefix = format!("crash-{}", std::process::id());
        tallies.extend(push_and_pull(
            &s3_env,
            s3_dir.path(),
            &|key| format!("s3://diskkit-test/{prefix}/{key}"),
            "s3://",
        ));
    }
    print_table("crash: push and pull", &tallies);
}

/// The store is readable and every index's chunks are there, or the store was never made
/// (a local store: its config file is absent).
fn store_clean_or_absent(env: &Env, store: &Path) -> Vec<String> {
    // The config is written first: without it there is no store yet.
    if !store.join("config").exists() {
        return Vec::new();
    }
    let (code, out, err) = env.run(&["snapshot", "verify", path_str(store)]);
    if code == 0 {
        return Vec::new();
    }
    vec![format!(
        "snapshot verify {}: exit {code}\n{out}\n{err}",
        store.display()
    )]
}

/// Every snapshot of `store` has `src`'s guest content (`diskkit compare`).
fn snapshots_equal(env: &Env, store: &Path, src: &Path) -> Vec<String> {
    let (code, out, err) = env.run(&["snapshot", "ls", "--output", "json", path_str(store)]);
    if code != 0 {
        return vec![format!("snapshot ls: exit {code}: {err}")];
    }
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let ids: Vec<String> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["id"].as_str().map(str::to_string))
        .collect();
    if ids.is_empty() {
        return vec![format!("no snapshot in {}: {out}", store.display())];
    }
    ids.iter()
        .flat_map(|id| {
            succeeds(
                env,
                &[
                    "compare",
                    path_str(src),
                    &format!("{}#{id}", store.display()),
                ],
            )
        })
        .collect()
}

/// `bundle verify` passes, or the bundle does not exist (its manifest, written last, absent).
fn bundle_clean_or_absent(env: &Env, store: &Path, name: &str) -> Vec<String> {
    let mut failures = store_clean_or_absent(env, store);
    if !store.exists() {
        return failures;
    }
    if bundle_listed(env, store, name) {
        failures.extend(succeeds(env, &["bundle", "verify", path_str(store), name]));
    }
    failures
}

fn bundle_listed(env: &Env, store: &Path, name: &str) -> bool {
    let (_, listed, _) = env.run(&["bundle", "ls", "--output", "json", path_str(store)]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap_or_default();
    listed
        .as_array()
        .is_some_and(|a| a.iter().any(|b| b["name"] == name))
}

#[test]
fn snapshot_and_bundle_killed_anywhere_reference_no_missing_chunk() {
    let (dir, _, env) = local_bucket_env();
    let d = dir.path();
    let src = noisy_raw(d, "src.raw", 3);
    let data = noisy_raw(d, "data.raw", 4);
    let store = d.join("store");
    let mut tallies = Vec::new();

    let mut create = Op::new(
        "snapshot create",
        &env,
        &["snapshot", "create", path_str(&src), path_str(&store)],
    );
    create.reset = Box::new(|| remove(&store));
    create.after_kill = Box::new(|| store_clean_or_absent(&env, &store));
    create.after_rerun = Box::new(|| {
        let mut f = store_clean_or_absent(&env, &store);
        f.extend(snapshots_equal(&env, &store, &src));
        f
    });
    create.roots = vec![d.to_path_buf()];
    tallies.push(run_rounds(&create));

    // gc after the second snapshot is removed: the first must keep every chunk.
    let template = d.join("gc-template");
    remove(&store);
    env.ok(&["snapshot", "create", path_str(&src), path_str(&template)]);
    let second = env.ok(&["snapshot", "create", path_str(&data), path_str(&template)]);
    let second = second.lines().last().unwrap().trim().to_string();
    env.ok(&["snapshot", "rm", path_str(&template), &second]);
    let mut gc = Op::new("snapshot gc", &env, &["snapshot", "gc", path_str(&store)]);
    gc.reset = Box::new(|| copy_dir(&template, &store));
    let kept = || {
        let mut f = store_clean_or_absent(&env, &store);
        f.extend(snapshots_equal(&env, &store, &src));
        f
    };
    gc.after_kill = Box::new(kept);
    gc.after_rerun = Box::new(kept);
    gc.roots = vec![store.clone()];
    tallies.push(run_rounds(&gc));

    let bundle_whole = |store: &Path| {
        let mut f = bundle_clean_or_absent(&env, store, "web");
        f.extend(succeeds(
            &env,
            &["bundle", "verify", path_str(store), "web"],
        ));
        for (disk, img) in [("vda", &src), ("vdb", &data)] {
            let member = format!("{}#web/{disk}", store.display());
            f.extend(succeeds(&env, &["compare", path_str(img), &member]));
        }
        f
    };
    let system_arg = path_str(&src).to_string();
    let data_arg = format!("vdb={}", data.display());
    let mut bundle = Op::new(
        "bundle create",
        &env,
        &[
            "bundle",
            "create",
            "--system",
            &system_arg,
            "--data",
            &data_arg,
            path_str(&store),
            "web",
        ],
    );
    bundle.reset = Box::new(|| remove(&store));
    bundle.after_kill = Box::new(|| bundle_clean_or_absent(&env, &store, "web"));
    // A bundle whose manifest was written is complete; a second create of it is refused.
    bundle.needs_rerun = Box::new(|| !bundle_listed(&env, &store, "web"));
    bundle.after_rerun = Box::new(|| bundle_whole(&store));
    bundle.roots = vec![d.to_path_buf()];
    tallies.push(run_rounds(&bundle));

    // The bundle made by the last rerun above is the source of the copies.
    let copy_dst = d.join("copy-store");
    let mut copy = Op::new(
        "bundle copy",
        &env,
        &[
            "bundle",
            "copy",
            path_str(&store),
            "web",
            path_str(&copy_dst),
        ],
    );
    copy.reset = Box::new(|| remove(&copy_dst));
    copy.after_kill = Box::new(|| bundle_clean_or_absent(&env, &copy_dst, "web"));
    copy.after_rerun = Box::new(|| bundle_whole(&copy_dst));
    copy.roots = vec![d.to_path_buf()];
    tallies.push(run_rounds(&copy));
    print_table("crash: snapshot and bundle stores", &tallies);
}

#[test]
fn batch_run_killed_anywhere_converges() {
    let (dir, _, env) = local_bucket_env();
    let d = dir.path();
    let srcs: Vec<PathBuf> = (0..3)
        .map(|i| noisy_raw(d, &format!("src-{i}.raw"), 10 + i))
        .collect();
    let mut jobs = String::from("source,destination,format\n");
    for i in 0..3 {
        jobs.push_str(&format!("src-{i}.raw,out/dst-{i}.qcow2,qcow2\n"));
    }
    let job_file = d.join("jobs.csv");
    std::fs::write(&job_file, jobs).unwrap();
    let state = d.join("state");
    let out = d.join("out");
    let outs: Vec<PathBuf> = (0..3).map(|i| out.join(format!("dst-{i}.qcow2"))).collect();
    let mut batch = Op::new(
        "batch run (3 converts)",
        &env,
        &[
            "batch",
            "run",
            path_str(&job_file),
            "--state",
            path_str(&state),
        ],
    );
    batch.reset = Box::new(|| {
        remove(&state);
        remove(&out);
        std::fs::create_dir(&out).unwrap();
    });
    batch.after_kill = Box::new(|| {
        srcs.iter()
            .zip(&outs)
            .flat_map(|(s, o)| absent_or_equal(s, o))
            .collect()
    });
    batch.after_rerun = Box::new(|| {
        srcs.iter()
            .zip(&outs)
            .flat_map(|(s, o)| equal(s, o))
            .collect()
    });
    batch.roots = vec![d.to_path_buf()];
    print_table("crash: batch", &[run_rounds(&batch)]);
}

/// qemu's view of `img` if `qemu-img check` passes, else the failure.
fn checked_view(img: &Path) -> Result<View, String> {
    qemu_check_clean(img)?;
    Ok(qemu_view(img))
}

#[test]
fn in_place_changes_killed_anywhere_read_as_before_or_after() {
    let (dir, _, env) = local_bucket_env();
    let d = dir.path();
    let base = qcow2_fixture(d, "base.qcow2", "cluster_size=4k");
    qemu_img(&["snapshot", "-c", "old", path_str(&base)]);
    qemu_io("qcow2", &base, &["write -P 0x71 0 1M", "write -z 6M 512k"]);
    qemu_img(&["bitmap", "--add", path_str(&base), "bm"]);
    // resize refuses images with internal snapshots, as qemu-img does.
    let plain = d.join("plain.qcow2");
    std::fs::copy(&base, &plain).unwrap();
    qemu_img(&["snapshot", "-d", "old", path_str(&plain)]);
    let work = d.join("work.qcow2");
    let mut tallies = Vec::new();
    // (arguments before IMAGE, after IMAGE, starting image)
    let ops: [(&[&str], &[&str], &Path); 6] = [
        (&["snapshot", "-c", "new"], &[], &base),
        (&["snapshot", "-a", "old"], &[], &base),
        (&["snapshot", "-d", "old"], &[], &base),
        (&["amend", "-o", "refcount_bits=8"], &[], &base),
        (&["bitmap", "--add"], &["b2"], &base),
        (&["resize"], &["12M"], &plain),
    ];
    for (head, tail, start) in ops {
        let mut args = head.to_vec();
        args.push(path_str(&work));
        args.extend(tail);
        std::fs::copy(start, &work).unwrap();
        let before = qemu_view(&work);
        diskkit_ok(&args);
        let after = qemu_view(&work);
        let mut op = Op::new(head.join(" "), &env, &args);
        op.reset = Box::new(|| {
            std::fs::copy(start, &work).unwrap();
        });
        op.after_kill = Box::new(|| match checked_view(&work) {
            Ok(v) if v == before || v == after => Vec::new(),
            Ok(_) => vec!["neither the state before nor after".to_string()],
            Err(e) => vec![e],
        });
        // A change that completed is not made again (a second `snapshot -c new` is refused).
        op.needs_rerun = Box::new(|| qemu_view(&work) == before);
        op.after_rerun = Box::new(|| match checked_view(&work) {
            Ok(v) if v == after => Vec::new(),
            Ok(_) => vec!["not the state after".to_string()],
            Err(e) => vec![e],
        });
        op.roots = vec![d.to_path_buf()];
        tallies.push(run_rounds(&op));
    }

    // rebase and commit on base <- top: the guest of top stays the same throughout.
    let other = d.join("other.qcow2");
    std::fs::copy(&base, &other).unwrap();
    qemu_img(&["snapshot", "-d", "old", path_str(&other)]);
    qemu_io(
        "qcow2",
        &other,
        &["write -P 0x61 0 32k", "write -P 0x62 7M 100k"],
    );
    let top = d.join("top.qcow2");
    let saved = [d.join("saved-base.qcow2"), d.join("saved-top.qcow2")];
    qcow2_overlay(&top, "base.qcow2", "qcow2");
    qemu_io(
        "qcow2",
        &top,
        &["write -P 0x63 16k 8k", "write -P 0x64 5M 1M"],
    );
    std::fs::copy(&base, &saved[0]).unwrap();
    std::fs::copy(&top, &saved[1]).unwrap();
    let guest = qemu_guest_bytes(&top, d);
    for head in [&["rebase", "-b", "other.qcow2"][..], &["commit"][..]] {
        let mut args = head.to_vec();
        args.push(path_str(&top));
        let mut op = Op::new(head.join(" "), &env, &args);
        op.reset = Box::new(|| {
            std::fs::copy(&saved[0], &base).unwrap();
            std::fs::copy(&saved[1], &top).unwrap();
        });
        let same_guest = || {
            let mut f: Vec<String> = [&base, &top]
                .iter()
                .filter_map(|i| qemu_check_clean(i).err())
                .collect();
            if f.is_empty() && qemu_guest_bytes(&top, d) != guest {
                f.push("the guest of top.qcow2 changed".into());
            }
            f
        };
        op.after_kill = Box::new(same_guest);
        op.after_rerun = Box::new(same_guest);
        op.roots = vec![d.to_path_buf()];
        tallies.push(run_rounds(&op));
    }
    print_table("crash: in-place qcow2 changes", &tallies);
}

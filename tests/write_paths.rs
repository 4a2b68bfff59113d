//! Every write path against a destination that cannot take it: a full filesystem, a read-only
//! one, and symlinks (README, "Full disks, read-only folders, symlinks"). Each must fail with a
//! non-zero exit and an error naming the path, leave nothing under the final name and no
//! temporary file; a symlink planted at a temporary name is never followed.
//!
//! The full and read-only filesystems are tmpfs mounts, which need root: as another user those
//! tests say they are skipped.

mod common;
use common::s3::{Env, local_bucket_env};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs with `options` at `dir` (created), or says why not and returns None.
    fn mount(dir: &Path, options: &str) -> Option<Tmpfs> {
        let uid = Command::new("id").arg("-u").output().unwrap();
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            eprintln!("skipped: mounting a small tmpfs needs root (run the tests as root)");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs", path_str(dir)])
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "skipped: mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// Fills the filesystem of `dir` to the last byte.
fn fill(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![0x5au8; 64 << 10];
    loop {
        if f.write_all(&block).is_err() {
            break;
        }
    }
    let mut byte = [0x5au8];
    while f.write_all(&byte).is_ok() {
        byte[0] ^= 1;
    }
}

/// The sources every write path reads, made once per test.
struct Fixtures {
    dir: tempfile::TempDir,
    env: Env,
    src: PathBuf,
    bucket: PathBuf,
    store: PathBuf,
    snapshot: String,
    iso: PathBuf,
}

fn fixtures() -> Fixtures {
    let (dir, bucket, env) = local_bucket_env();
    let d = dir.path();
    let src = noisy_raw(d, "src.raw", 5);
    env.ok(&[
        "push",
        path_str(&src),
        &format!("file://{}/src.raw", bucket.display()),
    ]);
    let store = d.join("store");
    let out = env.ok(&["snapshot", "create", path_str(&src), path_str(&store)]);
    let snapshot = out.lines().last().unwrap().trim().to_string();
    env.ok(&[
        "bundle",
        "create",
        "--system",
        path_str(&src),
        path_str(&store),
        "web",
    ]);
    let tree = d.join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("big.bin"), pseudo_random(6, 2 << 20)).unwrap();
    let iso = d.join("data.iso");
    let made = Command::new("xorriso")
        .args([
            "-as",
            "mkisofs",
            "-quiet",
            "-R",
            "-o",
            path_str(&iso),
            path_str(&tree),
        ])
        .status()
        .expect("xorriso is needed (scripts/test.sh installs it)");
    assert!(made.success());
    Fixtures {
        dir,
        env,
        src,
        bucket,
        store,
        snapshot,
        iso,
    }
}

/// The write paths, each as (name, arguments writing into `dst`, the final path it names).
fn write_paths(f: &Fixtures, dst: &Path) -> Vec<(&'static str, Vec<String>, PathBuf)> {
    let s = |p: &Path| p.display().to_string();
    let object = format!("file://{}/src.raw", f.bucket.display());
    let at = |name: &str| dst.join(name);
    vec![
        (
            "convert",
            vec![
                "convert".into(),
                "-O".into(),
                "qcow2".into(),
                s(&f.src),
                s(&at("out.qcow2")),
            ],
            at("out.qcow2"),
        ),
        (
            "create",
            vec![
                "create".into(),
                "-f".into(),
                "vpc".into(),
                s(&at("new.vhd")),
                "64M".into(),
            ],
            at("new.vhd"),
        ),
        (
            "hash --manifest",
            vec![
                "hash".into(),
                "--manifest".into(),
                s(&at("src.manifest")),
                s(&f.src),
            ],
            at("src.manifest"),
        ),
        (
            "pull",
            vec!["pull".into(), object, s(&at("pulled.raw"))],
            at("pulled.raw"),
        ),
        (
            "snapshot restore",
            vec![
                "snapshot".into(),
                "restore".into(),
                "-O".into(),
                "qcow2".into(),
                s(&f.store),
                f.snapshot.clone(),
                s(&at("restored.qcow2")),
            ],
            at("restored.qcow2"),
        ),
        (
            "bundle restore",
            vec![
                "bundle".into(),
                "restore".into(),
                s(&f.store),
                "web".into(),
                s(&at("restored")),
            ],
            at("restored"),
        ),
        (
            "bundle export",
            vec![
                "bundle".into(),
                "export".into(),
                s(&f.store),
                "web".into(),
                s(&at("web.ova")),
            ],
            at("web.ova"),
        ),
        (
            "iso extract",
            vec![
                "iso".into(),
                "extract".into(),
                s(&f.iso),
                "-C".into(),
                s(&at("extracted")),
            ],
            at("extracted"),
        ),
        (
            "push to file://",
            vec![
                "push".into(),
                s(&f.src),
                format!("file://{}/obj.raw", dst.display()),
            ],
            at("obj.raw"),
        ),
        (
            "snapshot create",
            vec![
                "snapshot".into(),
                "create".into(),
                s(&f.src),
                s(&at("store")),
            ],
            at("store"),
        ),
    ]
}

/// The regular files under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                found.push(e.path());
            }
        }
    }
    found.sort();
    found
}

/// Runs every write path into `dst` and checks that each fails cleanly with `reason` in its
/// error; returns what went wrong.
fn each_fails_cleanly(f: &Fixtures, dst: &Path, reason: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, args, final_path) in write_paths(f, dst) {
        let before = files(dst);
        let (code, out, err) = f.env.run(&as_refs(&args));
        // A push keeps its unfinished upload to resume, and says how to drop it.
        if err.contains("push --abort") {
            f.env.ok(&["push", "--abort", args.last().unwrap()]);
        }
        let after = files(dst);
        let mut wrong = Vec::new();
        if code == 0 {
            wrong.push("exit 0".to_string());
        }
        if !err.contains(path_str(dst)) || !err.contains(reason) {
            wrong.push(format!(
                "the error does not say {reason:?} about {}",
                dst.display()
            ));
        }
        if final_path.is_file() {
            wrong.push(format!("{} exists", final_path.display()));
        }
        if after != before {
            wrong.push(format!("files before {before:?}, after {after:?}"));
        }
        wrong.extend(temps_left(&[dst.to_path_buf()]));
        if !wrong.is_empty() {
            failures.push(format!("{name}: {}\n{out}{err}", wrong.join("; ")));
        }
    }
    failures
}

#[test]
fn a_full_filesystem_fails_every_write_path_cleanly() {
    let f = fixtures();
    let Some(fs) = Tmpfs::mount(&f.dir.path().join("full"), "size=1m") else {
        return;
    };
    fill(&fs.dir);
    let failures = each_fails_cleanly(&f, &fs.dir, "No space left on device");
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_read_only_filesystem_fails_every_write_path_cleanly() {
    let f = fixtures();
    let Some(fs) = Tmpfs::mount(&f.dir.path().join("ro"), "size=1m,ro") else {
        return;
    };
    let failures = each_fails_cleanly(&f, &fs.dir, "Read-only file system");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The in-place qcow2 edits of an image on a full filesystem: each needs new clusters, so each
/// fails with the reason and the image's name, and the image stays as it was (no corruption,
/// qemu reads the same guest, snapshots and options); with room again, each succeeds.
#[test]
fn in_place_edits_on_a_full_filesystem_fail_and_leave_the_image_as_it_was() {
    let (dir, _, env) = local_bucket_env();
    let start = qcow2_fixture(dir.path(), "start.qcow2", "cluster_size=4k");
    let Some(fs) = Tmpfs::mount(&dir.path().join("full"), "size=16m") else {
        return;
    };
    let img = fs.dir.join("disk.qcow2");
    std::fs::copy(&start, &img).unwrap();
    let before = qemu_view(&img);
    // Resize first: it refuses images with internal snapshots, as qemu-img does.
    let ops: [&[&str]; 4] = [
        // A larger L1 table: 64 GiB in 4 KiB clusters needs 256 KiB of it.
        &["resize", "IMG", "64G"],
        &["amend", "-o", "refcount_bits=8"],
        &["bitmap", "--add", "IMG", "b2"],
        &["snapshot", "-c", "new"],
    ];
    let args_of = |op: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = op
            .iter()
            .map(|a| a.replace("IMG", path_str(&img)))
            .collect();
        if !op.contains(&"IMG") {
            args.push(path_str(&img).to_string());
        }
        args
    };
    fill(&fs.dir);
    let mut failures = Vec::new();
    for op in ops {
        let args = args_of(op);
        let (code, out, err) = env.run(&as_refs(&args));
        if code == 0 || !err.contains("No space left on device") || !err.contains(path_str(&img)) {
            failures.push(format!("{op:?}: exit {code}, unclear error\n{out}{err}"));
        }
        if let Err(e) = qemu_check_clean(&img) {
            failures.push(format!("{op:?}: {e}"));
        }
    }
    failures.extend(temps_left(std::slice::from_ref(&fs.dir)));
    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        qemu_view(&img) == before,
        "the failed edits changed the image"
    );
    for op in ops {
        env.ok(&as_refs(&args_of(op)));
        assert_no_corruption(&img);
    }
    let info = qemu_info(&img);
    assert_eq!(info["virtual-size"], 64u64 << 30);
    assert_eq!(info["snapshots"].as_array().map(Vec::len), Some(1));
}

/// Runs `args` from a shell that first plants, at the temporary name diskkit will use for
/// `dst` (`.NAME.diskkit-tmp-PID`: the shell's PID, which diskkit keeps through exec), a symlink
/// to `victim`.
fn run_with_planted_temp(env: &Env, dst: &Path, victim: &Path, args: &[String]) -> (i32, String) {
    let temp = dst.with_file_name(format!(
        ".{}.diskkit-tmp-",
        dst.file_name().unwrap().to_string_lossy()
    ));
    // The test paths have no spaces nor quotes.
    let script = format!(
        "ln -s {} {}$$ && exec {} \"$@\"",
        victim.display(),
        temp.display(),
        diskkit_bin()
    );
    // diskkit's environment (env.command's), with the shell as the program.
    let diskkit = env.command(&[]);
    let envs: Vec<_> = diskkit
        .get_envs()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script, "sh"]).args(args).envs(envs);
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Removes the symlinks planted at temporary names of `dst`.
fn remove_planted(dst: &Path) {
    let prefix = format!(
        ".{}.diskkit-tmp-",
        dst.file_name().unwrap().to_string_lossy()
    );
    for e in std::fs::read_dir(dst.parent().unwrap()).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) && e.path().is_symlink() {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
}

#[test]
fn symlinks_planted_at_temporary_names_are_never_followed() {
    let f = fixtures();
    let d = f.dir.path().join("dst");
    std::fs::create_dir(&d).unwrap();
    let victim = f.dir.path().join("victim");
    let mut failures = Vec::new();
    let single_file = [
        "convert",
        "create",
        "hash --manifest",
        "pull",
        "snapshot restore",
        "bundle export",
    ];
    for (name, args, final_path) in write_paths(&f, &d) {
        if !single_file.contains(&name) {
            continue;
        }
        std::fs::write(&victim, b"not yours").unwrap();
        let (code, err) = run_with_planted_temp(&f.env, &final_path, &victim, &args);
        if code != 0 {
            failures.push(format!("{name}: exit {code}: {err}"));
        }
        if std::fs::read(&victim).unwrap() != b"not yours" {
            failures.push(format!("{name}: wrote through the planted symlink"));
        }
        // A command that writes no file under that temporary name leaves the link alone.
        remove_planted(&final_path);
        let meta = std::fs::symlink_metadata(&final_path);
        if !meta.is_ok_and(|m| m.is_file()) {
            failures.push(format!(
                "{name}: {} is not a regular file",
                final_path.display()
            ));
        }
        failures.extend(temps_left(std::slice::from_ref(&d)));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_destination_symlink_the_user_named_is_written_through_a_dangling_one_refused() {
    let f = fixtures();
    let d = f.dir.path();
    // Named by the user: the output replaces the link's target; the link stays.
    let target = d.join("target.qcow2");
    std::fs::write(&target, b"old").unwrap();
    let link = d.join("link.qcow2");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    diskkit_ok(&["convert", "-O", "qcow2", path_str(&f.src), path_str(&link)]);
    assert!(link.is_symlink());
    qemu_img(&["compare", "-q", path_str(&f.src), path_str(&target)]);
    // A dangling link: nothing to write through, refused.
    let dangling = d.join("dangling.qcow2");
    std::os::unix::fs::symlink(d.join("nowhere/x.qcow2"), &dangling).unwrap();
    let (code, _, err) = diskkit(&[
        "convert",
        "-O",
        "qcow2",
        path_str(&f.src),
        path_str(&dangling),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("dangling symlink") && err.contains(path_str(&dangling)),
        "{err}"
    );
    assert!(temps_left(&[d.to_path_buf()]).is_empty());
}

#[test]
fn outputs_named_by_diskkit_in_a_folder_never_follow_a_symlink_there() {
    let f = fixtures();
    let out = f.dir.path().join("restored");
    std::fs::create_dir(&out).unwrap();
    let victim = f.dir.path().join("victim");
    std::fs::write(&victim, b"not yours").unwrap();
    let object = format!("file://{}/src.raw", f.bucket.display());
    let folder = format!("{}/", out.display());
    // The user named the folder, not these links: bundle restore and pull DIR/ name the files.
    let runs: [(&str, Vec<&str>); 2] = [
        (
            "web-system.qcow2",
            vec![
                "bundle",
                "restore",
                "-O",
                "qcow2",
                path_str(&f.store),
                "web",
                path_str(&out),
            ],
        ),
        ("src.raw", vec!["pull", &object, &folder]),
    ];
    for (name, args) in runs {
        let planted = out.join(name);
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let (code, _, err) = f.env.run(&args);
        let kept = std::fs::read(&victim).unwrap() == b"not yours";
        assert!(
            kept,
            "wrote through {}: exit {code}: {err}",
            planted.display()
        );
        assert_ne!(code, 0, "{err}");
        assert!(
            err.contains(path_str(&planted)) && err.contains("symlink"),
            "{err}"
        );
        std::fs::remove_file(&planted).unwrap();
    }
}

//! The command line as a user meets it: output to closed pipes and full devices, control
//! characters from images, completions and the man page, help texts.

mod common;
use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs diskkit with stdout on `stdout`; returns (status, stderr).
fn run_with_stdout(args: &[&str], stdout: Stdio) -> (std::process::ExitStatus, String) {
    let out = Command::new(diskkit_bin())
        .args(args)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .expect("run diskkit");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every command that prints, on a small qcow2 and a small ISO in `dir`.
fn printing_commands(dir: &Path) -> Vec<Vec<String>> {
    let qcow2 = p(dir, "a.qcow2");
    qemu_img(&["create", "-f", "qcow2", path_str(&qcow2), "1M"]);
    let iso = p(dir, "a.iso");
    std::fs::create_dir_all(dir.join("tree")).unwrap();
    std::fs::write(dir.join("tree/file"), b"x").unwrap();
    let made = Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-R", "-o"])
        .arg(&iso)
        .arg(dir.join("tree"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let q = path_str(&qcow2).to_string();
    let i = path_str(&iso).to_string();
    let cmd = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        cmd(&["info", &q]),
        cmd(&["info", "--output", "json", &q]),
        cmd(&["map", &q]),
        cmd(&["check", &q]),
        cmd(&["compare", &q, &q]),
        cmd(&["hash", &q, &q]),
        cmd(&["iso", "ls", "-l", &i]),
    ]
}

#[test]
fn full_device_is_a_write_error_not_a_panic() {
    let dir = tempdir();
    for args in printing_commands(dir.path()) {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let (status, err) = run_with_stdout(&as_refs(&args), full.into());
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(
            err, "diskkit: write error: No space left on device\n",
            "{args:?}"
        );
    }
}

#[test]
fn closed_pipe_ends_quietly_by_sigpipe() {
    let dir = tempdir();
    for args in printing_commands(dir.path()) {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let (status, err) = run_with_stdout(&as_refs(&args), writer.into());
        assert_eq!(status.signal(), Some(libc::SIGPIPE), "{args:?}: {err}");
        assert_eq!(err, "", "{args:?}");
    }
}

/// True when `text` holds an escape sequence or a control character other than line ends.
fn has_raw_controls(text: &str) -> bool {
    text.chars().any(|c| c.is_control() && c != '\n')
}

#[test]
fn names_from_images_are_escaped() {
    let dir = tempdir();
    let evil = "x\u{1b}[31mred\u{9b}2J";
    // A qcow2 whose backing file name carries an escape sequence (the backing does not exist).
    let top = p(dir.path(), "top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        evil,
        path_str(&top),
        "1M",
    ]);
    let (_, out, err) = diskkit(&["info", path_str(&top)]);
    assert!(
        !has_raw_controls(&out) && !has_raw_controls(&err),
        "{out}{err}"
    );
    assert!(
        format!("{out}{err}").contains("\\u{1b}[31mred"),
        "{out}{err}"
    );
    // A Rock Ridge name and a symbolic link target with one.
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join(evil), b"x").unwrap();
    std::os::unix::fs::symlink(evil, tree.join("link")).unwrap();
    let iso = p(dir.path(), "a.iso");
    let made = Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-R", "-o"])
        .arg(&iso)
        .arg(&tree)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    for long in [&[][..], &["-l"]] {
        let out = diskkit_ok(&[&["iso", "ls"], long, &[path_str(&iso)]].concat());
        assert!(!has_raw_controls(&out), "{out}");
        assert!(out.contains("x\\u{1b}[31mred\\u{9b}2J"), "{out}");
    }
}

#[test]
fn completions_load_in_their_shell() {
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let script = diskkit_ok(&["completions", shell]);
        for command in ["convert", "hash", "iso", "pull"] {
            assert!(script.contains(command), "{shell}: no {command}");
        }
    }
    let bash = Command::new("bash")
        .args([
            "-c",
            &format!(
                "source <({} completions bash) && complete -p diskkit",
                diskkit_bin()
            ),
        ])
        .output()
        .unwrap();
    assert!(bash.status.success(), "{bash:?}");
    assert!(String::from_utf8_lossy(&bash.stdout).contains("diskkit"));
    assert_ne!(diskkit(&["completions", "tcsh"]).0, 0);
}

#[test]
fn man_pages_cover_every_command() {
    let page = diskkit_ok(&["man"]);
    assert!(
        page.starts_with(".ie") && page.contains(".TH diskkit 1"),
        "{page}"
    );
    for command in ["info", "convert", "hash", "iso", "push", "completions"] {
        assert!(page.contains(&format!("diskkit\\-{command}")), "{command}");
        let sub = diskkit_ok(&["man", command]);
        assert!(sub.contains(&format!(".TH diskkit-{command} 1")), "{sub}");
    }
    let (code, _, err) = diskkit(&["man", "nope"]);
    assert_eq!((code, err.as_str()), (2, "diskkit: man: no command nope\n"));
}

/// `map --output json` says what `qemu-img map --output=json` says: raw holes carry their
/// offset, unallocated blocks of a format without backing files (vpc) are present.
#[test]
fn map_json_is_qemu_img_map() {
    let dir = tempdir();
    let raw = p(dir.path(), "m.raw");
    qemu_img(&["create", "-f", "raw", path_str(&raw), "4M"]);
    qemu_io("raw", &raw, &["write -P 1 0 64k", "write -P 2 1M 64k"]);
    let mut images = vec![(raw.clone(), "raw")];
    for fmt in ["vpc", "qcow2", "vmdk"] {
        let img = p(dir.path(), &format!("m.{fmt}"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            fmt,
            path_str(&raw),
            path_str(&img),
        ]);
        images.push((img, fmt));
    }
    qemu_io("qcow2", &images[2].0, &["write -z 2M 64k"]);
    let overlay = p(dir.path(), "overlay.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        path_str(&raw),
        "-F",
        "raw",
        path_str(&overlay),
    ]);
    qemu_io("qcow2", &overlay, &["write -P 3 0 4k"]);
    images.push((overlay, "qcow2"));
    for (img, fmt) in &images {
        let parse = |text: &str| -> serde_json::Value { serde_json::from_str(text).unwrap() };
        let qemu = parse(&qemu_img(&[
            "map",
            "-f",
            fmt,
            "--output=json",
            path_str(img),
        ]));
        let ours = parse(&diskkit_ok(&["map", "--output", "json", path_str(img)]));
        assert_eq!(ours, qemu, "{}", img.display());
    }
}

/// With stderr not a terminal (a CI log), -p prints progress lines that name the image.
#[test]
fn progress_is_logged_when_stderr_is_not_a_terminal() {
    let dir = tempdir();
    let a = mixed_raw(dir.path(), "a.raw", 8 << 20);
    let b = mixed_raw(dir.path(), "b.raw", 8 << 20);
    let (_, _, err) = diskkit(&["hash", "-p", path_str(&a), path_str(&b)]);
    for img in [&a, &b] {
        let name = path_str(img);
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with(&format!("diskkit: hashing {name}: ")))
            .collect();
        // Lines at tenths of the work; one may be skipped while another thread prints.
        assert!(
            lines
                .iter()
                .any(|l| l.contains("% (") && l.contains(" of 8 MiB), ")),
            "{err}"
        );
        assert!(lines.last().unwrap().contains(": done, 8 MiB in "), "{err}");
    }
    let (code, _, err) = diskkit(&["compare", "-p", path_str(&a), path_str(&b)]);
    assert_eq!(code, 0);
    assert!(err.contains("diskkit: comparing: done, 8 MiB in "), "{err}");
}

/// Every positional argument of these commands says in `-h` what it may be, and the top help
/// names every format and what the commands are for.
#[test]
fn help_says_what_each_argument_may_be() {
    for command in [
        &["info"][..],
        &["map"],
        &["compare"],
        &["check"],
        &["resize"],
        &["create"],
        &["hash"],
        &["iso", "ls"],
        &["iso", "extract"],
        &["completions"],
        &["man"],
    ] {
        let help = diskkit_ok(&[command, &["-h"]].concat());
        let arguments = help
            .split("Arguments:\n")
            .nth(1)
            .and_then(|rest| rest.split("\n\n").next())
            .unwrap_or_else(|| panic!("{command:?}: no arguments\n{help}"));
        for line in arguments.lines() {
            let (name, text) = line.trim().split_once("  ").unwrap_or((line, ""));
            assert!(!text.trim().is_empty(), "{command:?}: {name} has no help");
        }
    }
    let top = diskkit_ok(&["-h"]);
    let about = top.lines().next().unwrap();
    for word in [
        "VHDX",
        "VMDK",
        "ISO",
        "convert",
        "hash",
        "object storage",
        "check",
    ] {
        assert!(about.contains(word), "{word}: {about}");
    }
}

//! `--target CLOUD` profiles, `diskkit targets` and the pre-flight checks (`check --target`, and
//! automatically before a `--target` convert): images built with qemu-img and sgdisk to fail
//! each rule, and good ones.

mod common;

use common::*;
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
/// `check --target` and convert/push exit with this when a pre-flight rule fails.
const EXIT_PREFLIGHT: i32 = 4;

fn sgdisk(args: &[&str]) {
    let out = Command::new("sgdisk").args(args).output().expect("sgdisk");
    assert!(
        out.status.success(),
        "sgdisk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 20 MiB raw GPT disk with partitions of these sgdisk type codes (ef00 ESP, 8300 Linux).
fn gpt_disk(dir: &Path, name: &str, types: &[&str]) -> PathBuf {
    let disk = dir.join(name);
    qemu_img(&["create", "-f", "raw", path_str(&disk), "20M"]);
    let mut args = Vec::new();
    for (i, t) in types.iter().enumerate() {
        let n = i + 1;
        args.push(format!("-n{n}:0:+4M"));
        args.push(format!("-t{n}:{t}"));
    }
    args.push(path_str(&disk).to_string());
    sgdisk(&as_refs(&args));
    disk
}

/// A fixed VHD of exactly `size` made by qemu-img.
fn fixed_vhd(path: &Path, size: &str) {
    let opts = "subformat=fixed,force_size=on";
    qemu_img(&["create", "-f", "vpc", "-o", opts, path_str(path), size]);
}

/// `check --target CLOUD [extra] IMAGE --output json`: (exit code, rule -> (status, reason)).
fn check(cloud: &str, extra: &[&str], image: &Path) -> (i32, Vec<(String, String, String)>) {
    let mut args = vec!["check", "--target", cloud, "--output", "json"];
    args.extend(extra);
    args.push(path_str(image));
    let (code, out, err) = diskkit(&args);
    assert!(code == 0 || code == EXIT_PREFLIGHT, "{code}: {err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["target"], cloud);
    let checks = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["rule"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
                c["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (code, checks)
}

/// The status and reason of `rule` in a report.
fn rule<'a>(checks: &'a [(String, String, String)], rule: &str) -> (&'a str, &'a str) {
    let c = checks
        .iter()
        .find(|c| c.0 == rule)
        .unwrap_or_else(|| panic!("no {rule} in {checks:?}"));
    (&c.1, &c.2)
}

#[test]
fn targets_lists_every_profile_with_its_rules() {
    let text = diskkit_ok(&["targets"]);
    for cloud in [
        "aws", "azure", "gce", "alibaba", "huawei", "tencent", "ucloud",
    ] {
        assert!(text.contains(&format!("\n{cloud}: ")) || text.starts_with(&format!("{cloud}: ")));
    }
    assert!(
        text.contains("streamOptimized") && text.contains("at most 21"),
        "{text}"
    );
    let json: Value = serde_json::from_str(&diskkit_ok(&["targets", "--output", "json"])).unwrap();
    let profiles = json.as_array().unwrap();
    assert_eq!(profiles.len(), 7);
    let azure = profiles.iter().find(|p| p["name"] == "azure").unwrap();
    assert_eq!(azure["alignment"]["value"], MIB);
    assert!(
        azure["alignment"]["requirement"]
            .as_str()
            .unwrap()
            .contains("MiB")
    );
    let alibaba = profiles.iter().find(|p| p["name"] == "alibaba").unwrap();
    assert_eq!(alibaba["sizes"][0]["role"], "system");
    assert_eq!(alibaba["max_disks"]["value"], 17);
}

#[test]
fn explicit_choices_that_break_a_rule_are_refused_or_forced() {
    let dir = tempdir();
    let src = mixed_raw(dir.path(), "src.raw", 9 * MIB);
    let out = dir.path().join("out.img");
    for (cloud, extra, names) in [
        ("azure", vec!["-O", "qcow2"], "fixed VHDs only"),
        ("azure", vec!["-o", "subformat=dynamic"], "fixed VHDs only"),
        ("gce", vec!["-O", "raw"], "disk.raw alone"),
        (
            "aws",
            vec!["-O", "vmdk", "-o", "subformat=monolithicSparse"],
            "monolithicSparse VMDK is refused",
        ),
    ] {
        let mut args = vec!["convert", "--target", cloud];
        args.extend(&extra);
        args.extend([path_str(&src), path_str(&out)]);
        let (code, _, err) = diskkit(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(names) && err.contains("--force"), "{err}");
        assert!(!out.exists());
    }
    // --force writes it, saying what the import will refuse.
    let (code, _, err) = diskkit(&[
        "convert",
        "--target",
        "azure",
        "--force",
        "-O",
        "qcow2",
        path_str(&src),
        path_str(&out),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("--force") && err.contains("fixed VHDs only"),
        "{err}"
    );
    assert!(qemu_img(&["info", path_str(&out)]).contains("file format: qcow2"));
    // A target's own format: the table's default (here qcow2 for huawei).
    let q = dir.path().join("huawei.img");
    diskkit_ok(&[
        "convert",
        "--target",
        "huawei",
        path_str(&src),
        path_str(&q),
    ]);
    assert!(qemu_img(&["info", path_str(&q)]).contains("file format: qcow2"));
    // Azure as before: a fixed VHD of whole MiB.
    let v = dir.path().join("azure.vhd");
    diskkit_ok(&["convert", "--target", "azure", path_str(&src), path_str(&v)]);
    assert_eq!(std::fs::metadata(&v).unwrap().len(), 9 * MIB + 512);
}

#[test]
fn preflight_runs_before_a_target_convert() {
    let dir = tempdir();
    let src = mixed_raw(dir.path(), "src.raw", 9 * MIB);
    let out = dir.path().join("out.vhd");
    // No partition table on a system disk: refused before anything is written.
    let (code, _, err) = diskkit(&[
        "convert",
        "--target",
        "azure",
        "--role",
        "system",
        path_str(&src),
        path_str(&out),
    ]);
    assert_eq!(code, EXIT_PREFLIGHT, "{err}");
    assert!(
        err.contains("partition-table") && err.contains("bootable"),
        "{err}"
    );
    assert!(!out.exists());
    for skip in ["--no-preflight", "--force"] {
        let (code, _, err) = diskkit(&[
            "convert",
            "--target",
            "azure",
            "--role",
            "system",
            skip,
            path_str(&src),
            path_str(&out),
        ]);
        assert_eq!(code, 0, "{skip}: {err}");
        std::fs::remove_file(&out).unwrap();
    }
    // A data disk needs no partition table: unchanged azure behaviour.
    diskkit_ok(&[
        "convert",
        "--target",
        "azure",
        "--role",
        "data",
        path_str(&src),
        path_str(&out),
    ]);
}

#[test]
fn good_images_pass() {
    let dir = tempdir();
    let disk = gpt_disk(dir.path(), "good.raw", &["ef00", "8300"]);
    let vhd = dir.path().join("good.vhd");
    diskkit_ok(&[
        "convert",
        "--target",
        "azure",
        path_str(&disk),
        path_str(&vhd),
    ]);
    let (code, checks) = check("azure", &["--role", "system"], &vhd);
    assert_eq!(code, 0, "{checks:?}");
    for c in &checks {
        assert_eq!(c.1, "pass", "{c:?}");
    }
    for r in [
        "format",
        "size",
        "alignment",
        "vhd-footer",
        "metadata",
        "partition-table",
        "gpt",
    ] {
        rule(&checks, r);
    }
    assert!(rule(&checks, "bootable").1.contains("EFI system partition"));
    // Text output: one line per rule and a summary.
    let text = diskkit_ok(&["check", "--target", "azure", path_str(&vhd)]);
    assert!(
        text.contains("pass  vhd-footer:") && text.contains("0 failed"),
        "{text}"
    );
    // An MBR disk with a bootable partition, as qcow2 compat 0.10 for tencent.
    let mbr = dir.path().join("mbr.raw");
    qemu_img(&["create", "-f", "raw", path_str(&mbr), "20M"]);
    let mut sector = [0u8; 512];
    sector[446] = 0x80;
    sector[450] = 0x83;
    sector[454..458].copy_from_slice(&2048u32.to_le_bytes());
    sector[458..462].copy_from_slice(&10_000u32.to_le_bytes());
    sector[510..].copy_from_slice(&[0x55, 0xAA]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mbr)
        .unwrap()
        .write_all_at(&sector, 0)
        .unwrap();
    let q = dir.path().join("mbr.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "compat=0.10",
        path_str(&mbr),
        path_str(&q),
    ]);
    let (code, checks) = check("tencent", &["--role", "system"], &q);
    assert_eq!(code, 0, "{checks:?}");
    assert_eq!(rule(&checks, "qcow2-compat").0, "pass");
    assert!(rule(&checks, "bootable").1.contains("MBR partition 1"));
}

#[test]
fn images_built_to_fail_each_rule() {
    let dir = tempdir();
    let d = dir.path();
    // format: a dynamic VHD is not what Azure takes (diskkit converts it: a warning).
    let dynamic = d.join("dynamic.vhd");
    qemu_img(&["create", "-f", "vpc", path_str(&dynamic), "8M"]);
    let (_, checks) = check("azure", &["--role", "data"], &dynamic);
    let (status, reason) = rule(&checks, "format");
    assert_eq!(status, "warn");
    assert!(reason.contains("fixed VHDs only") && reason.contains("convert --target azure"));
    // size: below Alibaba's system-disk minimum; above Huawei's normal import.
    let small = d.join("small.qcow2");
    qemu_img(&["create", "-f", "qcow2", path_str(&small), "1G"]);
    let (code, checks) = check("alibaba", &["--role", "system"], &small);
    assert_eq!(code, EXIT_PREFLIGHT);
    assert_eq!(rule(&checks, "size").0, "fail");
    assert!(rule(&checks, "size").1.contains("5 to 500 GiB"));
    let (_, checks) = check("alibaba", &[], &small);
    assert!(
        checks
            .iter()
            .filter(|c| c.0 == "size")
            .all(|c| c.1 == "warn"),
        "{checks:?}"
    );
    let big = d.join("big.qcow2");
    qemu_img(&["create", "-f", "qcow2", path_str(&big), "200G"]);
    let (code, checks) = check("huawei", &["--role", "data"], &big);
    assert_eq!(code, EXIT_PREFLIGHT);
    assert!(rule(&checks, "size").1.contains("128 GiB"));
    // alignment: a fixed VHD as it is must be whole MiB; a raw disk for GCE is rounded.
    let odd = d.join("odd.vhd");
    fixed_vhd(&odd, "10000K");
    let (code, checks) = check("azure", &["--role", "data"], &odd);
    assert_eq!(code, EXIT_PREFLIGHT);
    assert_eq!(rule(&checks, "alignment").0, "fail");
    let (_, checks) = check("gce", &[], &gpt_disk(d, "g.raw", &["ef00"]));
    let (status, reason) = rule(&checks, "alignment");
    assert_eq!(status, "warn");
    assert!(reason.contains("rounds it up to 1073741824"), "{reason}");
    // partition table: none on a disk for GCE.
    let bare = mixed_raw(d, "bare.raw", 8 * MIB);
    let (code, checks) = check("gce", &[], &bare);
    assert_eq!(code, EXIT_PREFLIGHT);
    assert_eq!(rule(&checks, "partition-table").0, "fail");
    let (code, checks) = check("ucloud", &["--role", "data"], &bare);
    assert_eq!((code, rule(&checks, "partition-table").0), (0, "pass"));
    // GPT: a damaged primary header is named with its offset.
    let broken = gpt_disk(d, "broken.raw", &["ef00"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&broken)
        .unwrap();
    f.write_all_at(b"X", 512 + 48).unwrap();
    let (code, checks) = check("aws", &["--role", "system"], &broken);
    assert_eq!(code, EXIT_PREFLIGHT);
    let (status, reason) = rule(&checks, "partition-table");
    assert_eq!(status, "fail");
    assert!(
        reason.contains("GPT header at offset 0x200") && reason.contains("CRC"),
        "{reason}"
    );
    // GPT: the backup header is not at the end of a disk grown by truncate.
    let grown = gpt_disk(d, "grown.raw", &["ef00"]);
    qemu_img(&["resize", "-f", "raw", path_str(&grown), "30M"]);
    let (_, checks) = check("aws", &["--role", "system"], &grown);
    let (status, reason) = rule(&checks, "gpt");
    assert_eq!(status, "warn");
    assert!(
        reason.contains("not at the disk's last LBA 61439"),
        "{reason}"
    );
    let (_, checks) = check("gce", &["--role", "system"], &grown);
    assert!(rule(&checks, "gpt").1.contains("moves it to the end"));
    // bootable: a system disk with only a Linux partition.
    let linux = gpt_disk(d, "linux.raw", &["8300"]);
    let (code, checks) = check("tencent", &["--role", "system"], &linux);
    assert_eq!(code, EXIT_PREFLIGHT);
    assert_eq!(rule(&checks, "bootable").0, "fail");
    let (code, checks) = check("tencent", &["--role", "data"], &linux);
    assert_eq!((code, rule(&checks, "bootable").0), (0, "pass"));
    // qcow2 compat: zstd compression is newer than import services' qemu-img.
    let zstd = d.join("zstd.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        path_str(&zstd),
        "8M",
    ]);
    let (code, checks) = check("huawei", &["--role", "data"], &zstd);
    assert_eq!(code, EXIT_PREFLIGHT);
    assert!(rule(&checks, "qcow2-compat").1.contains("zstd"));
    // VHD footer: a checksum that does not match, and a differencing disk.
    let fixed = d.join("fixed.vhd");
    fixed_vhd(&fixed, "8M");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&fixed)
        .unwrap();
    f.write_all_at(b"X", 8 * MIB + 40).unwrap();
    let (code, checks) = check("azure", &["--role", "data", "-f", "vpc"], &fixed);
    assert_eq!(code, EXIT_PREFLIGHT);
    let (status, reason) = rule(&checks, "vhd-footer");
    assert_eq!(status, "fail");
    assert!(reason.contains("checksum"), "{reason}");
    let child = d.join("child.vhd");
    qemu_img(&["create", "-f", "vpc", path_str(&child), "8M"]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&child)
        .unwrap();
    // Disk type 4 (differencing) in both footer copies, checksums fixed by hand.
    for at in [0, std::fs::metadata(&child).unwrap().len() - 512] {
        let mut footer = [0u8; 512];
        f.read_exact_at(&mut footer, at).unwrap();
        footer[60..64].copy_from_slice(&4u32.to_be_bytes());
        footer[64..68].fill(0);
        let sum = !footer
            .iter()
            .fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
        footer[64..68].copy_from_slice(&sum.to_be_bytes());
        f.write_all_at(&footer, at).unwrap();
    }
    let (code, checks) = check("aws", &["--role", "data", "-f", "vpc"], &child);
    assert_eq!(code, EXIT_PREFLIGHT);
    assert!(rule(&checks, "vhd-footer").1.contains("differencing"));
}

#[test]
fn aws_gets_a_stream_optimized_vmdk() {
    let dir = tempdir();
    let disk = gpt_disk(dir.path(), "aws.raw", &["ef00", "8300"]);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(&pseudo_random(5, 3 << 20), 9 * MIB).unwrap();
    let vmdk = dir.path().join("aws.vmdk");
    diskkit_ok(&[
        "convert",
        "--target",
        "aws",
        "--role",
        "system",
        path_str(&disk),
        path_str(&vmdk),
    ]);
    let info = qemu_img(&["info", path_str(&vmdk)]);
    assert!(info.contains("create type: streamOptimized"), "{info}");
    let cmp = qemu_img(&["compare", path_str(&disk), path_str(&vmdk)]);
    assert!(cmp.contains("identical"), "{cmp}");
    let (code, checks) = check("aws", &["--role", "system"], &vmdk);
    assert_eq!(code, 0, "{checks:?}");
    let (status, reason) = rule(&checks, "format");
    assert_eq!(status, "pass");
    assert!(reason.contains("streamOptimized"), "{reason}");
    // A monolithicSparse VMDK as it is: not what VM Import takes.
    let sparse = dir.path().join("sparse.vmdk");
    qemu_img(&["convert", "-O", "vmdk", path_str(&disk), path_str(&sparse)]);
    let (_, checks) = check("aws", &["--role", "system"], &sparse);
    assert_eq!(rule(&checks, "format").0, "warn");
    // --force writes it anyway.
    let forced = dir.path().join("forced.vmdk");
    let (code, _, err) = diskkit(&[
        "convert",
        "--target",
        "aws",
        "--force",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicSparse",
        path_str(&disk),
        path_str(&forced),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("monolithicSparse VMDK is refused"), "{err}");
    // push --target aws: the same kind of object, streamed.
    let bucket = dir.path().join("bucket");
    std::fs::create_dir(&bucket).unwrap();
    let cache = dir.path().join("cache");
    let object_url = format!("{}/disk.vmdk", bucket.display());
    let env = s3::Env {
        cache: cache.clone(),
        endpoint: None,
    };
    env.ok(&["push", "--target", "aws", path_str(&disk), &object_url]);
    let object = bucket.join("disk.vmdk");
    assert!(qemu_img(&["info", path_str(&object)]).contains("create type: streamOptimized"));
    let cmp = qemu_img(&["compare", path_str(&disk), path_str(&object)]);
    assert!(cmp.contains("identical"), "{cmp}");
}

//! OVA and OVF packages: disks read in place (info, compare, convert, hash on `x.ova` and
//! `x.ova#member`), `bundle import` of an OVA built the way osbuild and open-vmdk build them
//! (qemu-img streamOptimized VMDKs, a hand-written OVF, sha256sum for the .mf, tar), and
//! hostile packages refused with the member named.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn ovf(disks: &[(&str, u64, u64)]) -> String {
    let mut refs = String::new();
    let mut section = String::new();
    let mut items = String::new();
    for (i, (href, size, capacity)) in disks.iter().enumerate() {
        refs += &format!(r#"<File ovf:id="file{i}" ovf:href="{href}" ovf:size="{size}"/>"#);
        section += &format!(
            r#"<Disk ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" ovf:capacity="{capacity}" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>"#
        );
        items += &format!(
            r#"<Item><rasd:AddressOnParent>{i}</rasd:AddressOnParent><rasd:ElementName>disk{i}</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource><rasd:InstanceID>{}</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>"#,
            10 + i
        );
    }
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>{refs}</References>
  <DiskSection><Info>Virtual disk information</Info>{section}</DiskSection>
  <VirtualSystem ovf:id="appliance">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian12_64Guest"><Info>OS</Info><Description>Debian 13</Description></OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware</Info>
      <Item><rasd:Address>0</rasd:Address><rasd:ElementName>SCSI controller 0</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      {items}
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

struct Ova {
    ova: PathBuf,
    sources: Vec<PathBuf>,
}

/// Two disks as osbuild and open-vmdk make an OVA: qemu-img streamOptimized VMDKs, the OVF,
/// `SHA256(name)= hex` lines from sha256sum, tar in that order.
fn build_ova(dir: &Path) -> Ova {
    let sys = p(dir, "sys.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&sys), "20M"]);
    qemu_io(
        "qcow2",
        &sys,
        &["write -P 0x51 0 3M", "write -P 0x52 17M 1M"],
    );
    let data = mixed_raw(dir, "data.raw", 10 << 20);
    let pkg = p(dir, "pkg");
    std::fs::create_dir_all(&pkg).unwrap();
    let mut disks = Vec::new();
    for (src, name) in [
        (&sys, "appliance-disk1.vmdk"),
        (&data, "appliance-disk2.vmdk"),
    ] {
        let vmdk = p(&pkg, name);
        qemu_img(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            path_str(src),
            path_str(&vmdk),
        ]);
        let capacity = if name.ends_with("1.vmdk") {
            20 << 20
        } else {
            10 << 20
        };
        disks.push((name, std::fs::metadata(&vmdk).unwrap().len(), capacity));
    }
    std::fs::write(p(&pkg, "appliance.ovf"), ovf(&disks)).unwrap();
    let mut mf = String::new();
    for f in [
        "appliance.ovf",
        "appliance-disk1.vmdk",
        "appliance-disk2.vmdk",
    ] {
        mf += &format!("SHA256({f})= {}\n", sha256sum(&p(&pkg, f)));
    }
    std::fs::write(p(&pkg, "appliance.mf"), mf).unwrap();
    let ova = p(dir, "appliance.ova");
    let status = Command::new("tar")
        .args([
            "--format=ustar",
            "-C",
            path_str(&pkg),
            "-cf",
            path_str(&ova),
        ])
        .args([
            "appliance.ovf",
            "appliance.mf",
            "appliance-disk1.vmdk",
            "appliance-disk2.vmdk",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    Ova {
        ova,
        sources: vec![sys, data],
    }
}

#[test]
fn disks_inside_an_ova_are_read_in_place() {
    let dir = tempdir();
    let o = build_ova(dir.path());
    let ova = path_str(&o.ova);
    let info = diskkit_ok(&["info", "--output", "json", ova]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 20 << 20);
    assert_eq!(info["format"], "vmdk");
    diskkit_ok(&["compare", ova, path_str(&o.sources[0])]);
    let second = format!("{ova}#appliance-disk2.vmdk");
    diskkit_ok(&["compare", &second, path_str(&o.sources[1])]);
    assert_eq!(
        diskkit_ok(&["hash", &second]).split_whitespace().next(),
        diskkit_ok(&["hash", path_str(&o.sources[1])])
            .split_whitespace()
            .next()
    );
    let out = p(dir.path(), "out.qcow2");
    diskkit_ok(&["convert", "-O", "qcow2", ova, path_str(&out)]);
    qemu_img(&["check", path_str(&out)]);
    qemu_img(&["compare", path_str(&o.sources[0]), path_str(&out)]);
    let (code, _, err) = diskkit(&["info", &format!("{ova}#nothere.vmdk")]);
    assert_eq!(code, 2);
    assert!(err.contains("nothere.vmdk"), "{err}");
}

#[test]
fn an_osbuild_style_ova_imports_as_a_bundle() {
    let dir = tempdir();
    let o = build_ova(dir.path());
    let store = p(dir.path(), "store");
    let store = path_str(&store);
    let out = diskkit_ok(&["bundle", "import", path_str(&o.ova), store]);
    assert!(
        out.contains("full-ecs bundle appliance (3 digests"),
        "{out}"
    );
    assert!(
        out.contains("firmware: uefi") && out.contains("os: Debian 13"),
        "{out}"
    );
    let restored = p(dir.path(), "restored");
    diskkit_ok(&[
        "bundle",
        "restore",
        "-O",
        "qcow2",
        store,
        "appliance",
        path_str(&restored),
    ]);
    for (file, src) in [
        ("appliance-system.qcow2", &o.sources[0]),
        ("appliance-data-vdb.qcow2", &o.sources[1]),
    ] {
        qemu_img(&["compare", path_str(src), path_str(&p(&restored, file))]);
    }
    // The same package as an OVF beside its files.
    let ovf = p(dir.path(), "pkg/appliance.ovf");
    diskkit_ok(&["bundle", "import", path_str(&ovf), store, "from-ovf"]);
    diskkit_ok(&[
        "compare",
        &format!("{store}#from-ovf/vdb"),
        path_str(&o.sources[1]),
    ]);
}

/// Rebuilds the package's OVA after `change` edits its directory.
fn retar(dir: &Path, members: &[&str]) -> PathBuf {
    let ova = p(dir, "bad.ova");
    let status = Command::new("tar")
        .args([
            "--format=ustar",
            "-C",
            path_str(&p(dir, "pkg")),
            "-cf",
            path_str(&ova),
        ])
        .args(members)
        .status()
        .unwrap();
    assert!(status.success());
    ova
}

#[test]
fn hostile_packages_are_refused_with_the_member_named() {
    let dir = tempdir();
    let o = build_ova(dir.path());
    let store = p(dir.path(), "store");
    let store = path_str(&store);
    let pkg = p(dir.path(), "pkg");
    let all = [
        "appliance.ovf",
        "appliance.mf",
        "appliance-disk1.vmdk",
        "appliance-disk2.vmdk",
    ];
    let import_err = |ova: &Path| {
        let (code, out, err) = diskkit(&["bundle", "import", path_str(ova), store, "bad"]);
        assert_eq!(code, 2, "{out}");
        err
    };
    // A digest that does not match.
    let mf = std::fs::read_to_string(p(&pkg, "appliance.mf")).unwrap();
    let good = sha256sum(&p(&pkg, "appliance-disk2.vmdk"));
    std::fs::write(p(&pkg, "appliance.mf"), mf.replace(&good, &"0".repeat(64))).unwrap();
    let err = import_err(&retar(dir.path(), &all));
    assert!(
        err.contains("appliance.ova#appliance-disk2.vmdk")
            || err.contains("bad.ova#appliance-disk2.vmdk"),
        "{err}"
    );
    assert!(err.contains("SHA256"), "{err}");
    std::fs::write(p(&pkg, "appliance.mf"), &mf).unwrap();
    // A reference to a file the archive lacks.
    let err = import_err(&retar(dir.path(), &all[..3]));
    assert!(
        err.contains("appliance-disk2.vmdk") && err.contains("not in the archive"),
        "{err}"
    );
    // An entity bomb.
    let text = std::fs::read_to_string(p(&pkg, "appliance.ovf")).unwrap();
    let bomb = text.replacen(
        "<Envelope",
        "<!DOCTYPE Envelope [<!ENTITY a \"aaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;\">]><Envelope",
        1,
    );
    std::fs::write(p(&pkg, "appliance.ovf"), bomb).unwrap();
    let err = import_err(&retar(
        dir.path(),
        &[
            "appliance.ovf",
            "appliance-disk1.vmdk",
            "appliance-disk2.vmdk",
        ],
    ));
    assert!(
        err.contains("DOCTYPE") && err.contains("appliance.ovf"),
        "{err}"
    );
    std::fs::write(p(&pkg, "appliance.ovf"), &text).unwrap();
    // A member climbing out, and a link (made by Python's tarfile, which writes what it is told).
    let script = format!(
        "import tarfile,io\n\
         t=tarfile.open('{0}/evil.ova','w',format=tarfile.USTAR_FORMAT)\n\
         t.add('{1}/appliance.ovf',arcname='appliance.ovf')\n\
         i=tarfile.TarInfo('../escape.vmdk'); i.size=3; t.addfile(i,io.BytesIO(b'abc'))\n\
         t.close()\n\
         t=tarfile.open('{0}/link.ova','w',format=tarfile.USTAR_FORMAT)\n\
         t.add('{1}/appliance.ovf',arcname='appliance.ovf')\n\
         i=tarfile.TarInfo('appliance-disk1.vmdk'); i.type=tarfile.SYMTYPE; i.linkname='/etc/shadow'; t.addfile(i)\n\
         t.close()\n",
        path_str(dir.path()),
        path_str(&pkg)
    );
    let status = Command::new("python3")
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(status.success());
    let err = import_err(&p(dir.path(), "evil.ova"));
    assert!(
        err.contains("evil.ova") && err.contains("../escape.vmdk"),
        "{err}"
    );
    let err = import_err(&p(dir.path(), "link.ova"));
    assert!(err.contains("link.ova") && err.contains("Symlink"), "{err}");
    assert!(!Path::new(store).join("bundles/bad").exists());
    let _ = o;
}

/// Members of a tar archive in order, by `tar tf`.
fn tar_list(ova: &Path) -> Vec<String> {
    let out = Command::new("tar").arg("tf").arg(ova).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Checks an OVA diskkit wrote: member order, .mf digests, VMDKs against their sources, the
/// OVF's sizes and capacities (read back through import).
fn check_exported(ova: &Path, name: &str, sources: &[&Path], dir: &Path) {
    let members = tar_list(ova);
    let mut expected = vec![format!("{name}.ovf"), format!("{name}.mf")];
    expected.extend((1..=sources.len()).map(|i| format!("{name}-disk{i}.vmdk")));
    assert_eq!(members, expected);
    let x = p(dir, &format!("x-{name}"));
    std::fs::create_dir_all(&x).unwrap();
    let status = Command::new("tar")
        .args(["-C", path_str(&x), "-xf", path_str(ova)])
        .status()
        .unwrap();
    assert!(status.success());
    let mf = std::fs::read_to_string(p(&x, &format!("{name}.mf"))).unwrap();
    let mut lines = String::new();
    for m in members.iter().filter(|m| !m.ends_with(".mf")) {
        lines += &format!("SHA256({m})= {}\n", sha256sum(&p(&x, m)));
    }
    assert_eq!(mf, lines);
    let ovf = std::fs::read_to_string(p(&x, &format!("{name}.ovf"))).unwrap();
    for (i, src) in sources.iter().enumerate() {
        let vmdk = p(&x, &format!("{name}-disk{}.vmdk", i + 1));
        qemu_img(&["check", path_str(&vmdk)]);
        qemu_img(&["compare", path_str(src), path_str(&vmdk)]);
        let size = std::fs::metadata(&vmdk).unwrap().len();
        assert!(ovf.contains(&format!("ovf:size=\"{size}\"")), "{ovf}");
        let info: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output", "json", path_str(src)])).unwrap();
        let capacity = info["virtual-size"].as_u64().unwrap();
        assert!(
            ovf.contains(&format!("ovf:capacity=\"{capacity}\"")),
            "{ovf}"
        );
        let head = std::fs::read(&vmdk).unwrap();
        assert_eq!(&head[..8], b"KDMV\x03\0\0\0", "header version 3");
        let text = String::from_utf8_lossy(&head[..4096.min(head.len())]);
        assert!(text.contains("createType=\"streamOptimized\""), "{text}");
        assert!(text.contains("ddb.adapterType = \"lsilogic\""), "{text}");
    }
    assert!(
        ovf.contains("<rasd:ResourceType>6</rasd:ResourceType>"),
        "{ovf}"
    );
}

#[test]
fn bundles_and_images_export_as_ovas_that_import_back() {
    let dir = tempdir();
    let o = build_ova(dir.path());
    let store = p(dir.path(), "store");
    let store = path_str(&store);
    diskkit_ok(&["bundle", "import", path_str(&o.ova), store, "app"]);
    let ova = p(dir.path(), "app.ova");
    diskkit_ok(&["bundle", "export", store, "app", path_str(&ova)]);
    let sources: Vec<&Path> = o.sources.iter().map(PathBuf::as_path).collect();
    check_exported(&ova, "app", &sources, dir.path());
    // A diskkit OVA imports, and reads in place.
    let out = diskkit_ok(&["bundle", "import", path_str(&ova), store, "again"]);
    assert!(out.contains("full-ecs bundle again (3 digests"), "{out}");
    assert!(out.contains("firmware: uefi"), "{out}");
    diskkit_ok(&[
        "compare",
        &format!("{}#app-disk2.vmdk", path_str(&ova)),
        path_str(&o.sources[1]),
    ]);
    // Image files as an OVA, SHA-512 manifest.
    let packed = p(dir.path(), "one.ova");
    diskkit_ok(&[
        "bundle",
        "pack",
        "--manifest-alg",
        "sha512",
        path_str(&o.sources[1]),
        path_str(&packed),
    ]);
    assert_eq!(tar_list(&packed), ["one.ovf", "one.mf", "one-disk1.vmdk"]);
    let out = diskkit_ok(&["bundle", "import", path_str(&packed), store, "one"]);
    assert!(out.contains("data") || out.contains("system-disk"), "{out}");
    // An OVA into a bucket, in parts, when the suite's S3 server runs.
    if let Some(endpoint) = common::s3::shared_server() {
        let url = format!(
            "s3://diskkit-test/ova-{}-{}/app.ova",
            std::process::id(),
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let env = |c: &mut Command| {
            c.env("AWS_ENDPOINT_URL", &endpoint)
                .env("AWS_ACCESS_KEY_ID", common::s3::ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", common::s3::SECRET_KEY)
                .env("AWS_REGION", "us-east-1");
        };
        let mut c = Command::new(diskkit_bin());
        c.args(["bundle", "export", store, "app", &url]);
        env(&mut c);
        assert!(c.status().unwrap().success());
        let back = p(dir.path(), "back.ova");
        let mut c = Command::new(diskkit_bin());
        c.args(["pull", &url, path_str(&back)]);
        env(&mut c);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        check_exported(&back, "app", &sources, dir.path());
    }
}

/// Parts of a bucket export in its output: "N parts of SIZE, S sent now, R already sent
/// before" → (N, S, R).
fn part_counts(out: &str) -> (usize, usize, usize) {
    let counts = out
        .rsplit_once("; ")
        .map(|(_, c)| c)
        .unwrap_or_else(|| panic!("no part counts in {out}"));
    let nums: Vec<usize> = counts
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    // "N parts of 5 MiB, S sent now, R already ...": the size is the second number.
    assert_eq!(nums.len(), 4, "{out}");
    (nums[0], nums[2], nums[3])
}

#[test]
fn an_ova_export_to_a_bucket_resumes_after_a_kill() {
    let Some((dir, env)) = common::s3::shared_server_env() else {
        return;
    };
    // Incompressible data: the OVA needs several 5 MiB parts.
    let src = p(dir.path(), "sys.raw");
    std::fs::write(&src, pseudo_random(14, 24 << 20)).unwrap();
    let store = p(dir.path(), "store");
    let store = path_str(&store);
    diskkit_ok(&["bundle", "create", "--system", path_str(&src), store, "m"]);
    let url = format!(
        "s3://diskkit-test/ova-kill-{}-{}/m.ova",
        std::process::id(),
        dir.path().file_name().unwrap().to_string_lossy()
    );
    let export = ["bundle", "export", "--part-size", "5M", "--parallel", "1"];
    // One 5 MiB part about every 0.3 s; killed (SIGKILL) once two parts are recorded.
    let mut slow = export.to_vec();
    slow.extend(["-r", "16M", store, "m", &url]);
    let mut child = env
        .command(&slow)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while env.checkpoint_parts() < 2 {
        assert!(start.elapsed().as_secs() < 120, "export made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "export ended before the kill"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = env.checkpoint_parts();
    let (code, _, err) = env.run(&["verify", &url]);
    assert_eq!(
        code, 2,
        "a killed export left an object under the final key"
    );
    assert!(err.contains("no such object"), "{err}");
    let mut rerun = export.to_vec();
    rerun.extend([store, "m", &url]);
    let out = env.ok(&rerun);
    let (total, sent, resumed) = part_counts(&out);
    assert!(total >= 5, "{out}");
    assert_eq!(resumed, done, "{out}");
    assert_eq!(sent, total - done, "{out}");
    let back = p(dir.path(), "back.ova");
    env.ok(&["pull", &url, path_str(&back)]);
    check_exported(&back, "m", &[&src], dir.path());
}

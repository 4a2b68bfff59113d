//! ISO 9660 images built with xorriso from a temporary tree: info (El Torito, Joliet, Rock
//! Ridge), listings under every name mode, extraction that reproduces the tree, multi-extent files,
//! and hostile images whose names or links try to escape the output directory.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

fn xorriso(args: &[&str]) {
    let out = Command::new("xorriso")
        .args(args)
        .output()
        .expect("xorriso is needed by the ISO tests (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "xorriso {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic bytes that differ per file.
fn content(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn long_name(len: usize, tag: char) -> String {
    let mut s: String = std::iter::repeat_n('n', len - 1).collect();
    s.push(tag);
    s
}

/// A tree with deep nesting, long names, links, modes and two boot images.
fn make_tree(src: &Path) {
    let mut deep = src.to_path_buf();
    for i in 0..10 {
        deep.push(format!("level{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom.txt"), b"the bottom\n").unwrap();
    fs::create_dir(src.join("docs")).unwrap();
    for (i, (name, len, mode)) in [
        ("empty", 0usize, 0o644),
        ("one", 1, 0o644),
        ("sector", 2048, 0o600),
        ("odd size.bin", 3001, 0o755),
        ("big.bin", 300_000, 0o640),
    ]
    .into_iter()
    .enumerate()
    {
        let p = src.join("docs").join(name);
        fs::write(&p, content(i as u32 + 1, len)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::write(src.join(long_name(200, 'a')), b"long name\n").unwrap();
    fs::write(src.join(long_name(100, 'b')), b"joliet-long name\n").unwrap();
    symlink("docs/one", src.join("rel-link")).unwrap();
    symlink("../../docs/big.bin", src.join("level0/level1/up-link")).unwrap();
    symlink("/etc/hostname", src.join("abs-link")).unwrap();
    fs::set_permissions(src.join("docs"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(src.join("boot.img"), content(90, 2048)).unwrap();
    fs::write(src.join("efi.img"), content(91, 4096)).unwrap();
}

#[derive(Debug, PartialEq)]
enum Node {
    Dir(u32),
    File(u32, Vec<u8>),
    Link(String),
}

/// Every path below `root` with its type, permission bits, content or link target.
fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = fs::symlink_metadata(&p).unwrap();
            let perm = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                let t = fs::read_link(&p).unwrap();
                out.insert(rel, Node::Link(t.to_string_lossy().into_owned()));
            } else if m.is_dir() {
                out.insert(rel, Node::Dir(perm));
                walk(root, &p, out);
            } else {
                out.insert(rel, Node::File(perm, fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn build_rr_iso(dir: &Path) -> (PathBuf, PathBuf) {
    let src = dir.join("src");
    fs::create_dir(&src).unwrap();
    make_tree(&src);
    let iso = dir.join("tree.iso");
    xorriso(&[
        "-as",
        "mkisofs",
        "-R",
        "-J",
        "-joliet-long",
        "-V",
        "DISKKIT_TEST",
        "-publisher",
        "diskkit tests",
        "-b",
        "boot.img",
        "-no-emul-boot",
        "-boot-load-size",
        "4",
        "-eltorito-alt-boot",
        "-e",
        "efi.img",
        "-no-emul-boot",
        "-o",
        path_str(&iso),
        path_str(&src),
    ]);
    (src, iso)
}

#[test]
fn info_reports_volume_boot_entries_and_extensions() {
    let dir = tempdir();
    let (_, iso) = build_rr_iso(dir.path());
    let info: serde_json::Value =
        serde_json::from_str(&diskkit_ok(&["info", "--output", "json", path_str(&iso)])).unwrap();
    assert_eq!(info["format"], "iso");
    assert_eq!(info["virtual-size"], fs::metadata(&iso).unwrap().len());
    let data = &info["format-specific"]["data"];
    assert_eq!(info["format-specific"]["type"], "iso");
    assert_eq!(data["volume-id"], "DISKKIT_TEST");
    assert_eq!(data["publisher-id"], "DISKKIT TESTS");
    assert_eq!(data["joliet"], true);
    assert_eq!(data["rock-ridge"], true);
    assert_eq!(data["iso9660-1999"], false);
    assert_eq!(data["bootable"], true);
    assert!(data["creation-date"].as_str().unwrap().starts_with("20"));
    let boot = data["boot-entries"].as_array().unwrap();
    assert_eq!(boot.len(), 2, "{boot:?}");
    assert_eq!(boot[0]["platform"], "bios");
    assert_eq!(boot[0]["emulation"], "no-emulation");
    assert_eq!(boot[0]["sector-count"], 4);
    assert_eq!(boot[1]["platform"], "uefi");
    assert_eq!(boot[1]["bootable"], true);
    // The load RBA points at the boot image's bytes.
    let image = fs::read(&iso).unwrap();
    let rba = boot[0]["load-rba"].as_u64().unwrap() as usize * 2048;
    assert_eq!(&image[rba..rba + 2048], &content(90, 2048)[..]);

    let human = diskkit_ok(&["info", path_str(&iso)]);
    assert!(human.contains("file format: iso"), "{human}");
    assert!(
        human.contains("bootable: yes (BIOS no-emulation, UEFI)"),
        "{human}"
    );
    assert!(human.contains("platform: uefi"), "{human}");

    // An ISO is a plain source for compare: its guest view is its bytes.
    let copy = dir.path().join("copy.raw");
    fs::write(&copy, &image).unwrap();
    assert_eq!(diskkit(&["compare", path_str(&iso), path_str(&copy)]).0, 0);
}

#[test]
fn listing_and_extraction_reproduce_the_tree() {
    let dir = tempdir();
    let (src, iso) = build_rr_iso(dir.path());
    let want = snapshot(&src);

    // ls -R lists every path (Rock Ridge names by default), ls -l shows modes and link targets.
    let listed: Vec<String> = diskkit_ok(&["iso", "ls", "-R", path_str(&iso)])
        .lines()
        .map(str::to_string)
        .filter(|l| l != "boot.catalog")
        .collect();
    assert_eq!(listed, want.keys().cloned().collect::<Vec<_>>());
    let long = diskkit_ok(&["iso", "ls", "-l", path_str(&iso)]);
    assert!(long.contains("rel-link -> docs/one"), "{long}");
    assert!(long.contains("abs-link -> /etc/hostname"), "{long}");
    assert!(
        long.lines()
            .any(|l| l.starts_with("drwxr-x--- ") && l.ends_with(" docs")),
        "{long}"
    );
    let docs = diskkit_ok(&["iso", "ls", "-l", path_str(&iso), "/docs"]);
    assert!(
        docs.lines().any(|l| l.starts_with("-rwxr-xr-x ")
            && l.contains(" 3001 ")
            && l.ends_with(" odd size.bin")),
        "{docs}"
    );
    let one = diskkit_ok(&["iso", "ls", "-l", path_str(&iso), "level0/level1/up-link"]);
    assert!(
        one.trim_end().ends_with("up-link -> ../../docs/big.bin"),
        "{one}"
    );

    // Joliet names: long names up to 103 characters, no modes.
    let joliet = diskkit_ok(&["iso", "ls", "--names", "joliet", path_str(&iso)]);
    assert!(joliet.lines().any(|l| l == long_name(100, 'b')), "{joliet}");
    assert!(joliet.lines().any(|l| l == "docs"), "{joliet}");
    // ISO 9660 names: upper case, versions stripped.
    let plain = diskkit_ok(&["iso", "ls", "--names", "iso", path_str(&iso), "DOCS"]);
    assert!(plain.lines().any(|l| l == "BIG.BIN"), "{plain}");

    // Extraction reproduces names, modes, contents and link targets.
    let out = dir.path().join("out");
    // The absolute link is refused by default (exit 2, the rest extracted) and kept on request.
    let (code, _, err) = diskkit(&["iso", "extract", path_str(&iso), "-C", path_str(&out)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("abs-link") && err.contains("outside"), "{err}");
    assert!(fs::symlink_metadata(out.join("abs-link")).is_err());
    assert!(fs::read_link(out.join("level0/level1/up-link")).is_ok());
    diskkit_ok(&[
        "iso",
        "extract",
        "--keep-outside-links",
        path_str(&iso),
        "-C",
        path_str(&out),
    ]);
    let mut got = snapshot(&out);
    got.remove("boot.catalog");
    assert_eq!(got.len(), want.len());
    for (path, node) in &want {
        assert_eq!(got.get(path), Some(node), "{path}");
    }

    // Extracting selected paths puts them at their place in the tree.
    let part = dir.path().join("part");
    diskkit_ok(&[
        "iso",
        "extract",
        path_str(&iso),
        "docs/big.bin",
        "level0/level1",
        "-C",
        path_str(&part),
    ]);
    assert_eq!(
        fs::read(part.join("docs/big.bin")).unwrap(),
        content(5, 300_000)
    );
    assert!(
        part.join(
            "level0/level1/level2/level3/level4/level5/level6/level7/level8/level9/bottom.txt"
        )
        .is_file()
    );
    assert!(!part.join("docs/one").exists());
}

#[test]
fn plain_and_joliet_only_images() {
    let dir = tempdir();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/Mixed Case.txt"), b"joliet keeps case\n").unwrap();
    fs::write(src.join("readme"), b"plain\n").unwrap();
    let plain = dir.path().join("plain.iso");
    xorriso(&[
        "-as",
        "mkisofs",
        "--norock",
        "-o",
        path_str(&plain),
        path_str(&src),
    ]);
    let joliet = dir.path().join("joliet.iso");
    xorriso(&[
        "-as",
        "mkisofs",
        "-J",
        "-o",
        path_str(&joliet),
        path_str(&src),
    ]);

    let info: serde_json::Value =
        serde_json::from_str(&diskkit_ok(&["info", "--output", "json", path_str(&plain)])).unwrap();
    let data = &info["format-specific"]["data"];
    assert_eq!(
        (
            data["joliet"].as_bool(),
            data["rock-ridge"].as_bool(),
            data["bootable"].as_bool()
        ),
        (Some(false), Some(false), Some(false))
    );
    assert_eq!(
        diskkit_ok(&["iso", "ls", "-R", path_str(&plain)]),
        "README\nSUB\nSUB/MIXED_CA.TXT\n"
    );
    let (code, _, err) = diskkit(&["iso", "ls", "--names", "rr", path_str(&plain)]);
    assert_eq!(code, 2);
    assert!(err.contains("no Rock Ridge names"), "{err}");

    // Without Rock Ridge, Joliet names are the default.
    assert_eq!(
        diskkit_ok(&["iso", "ls", "-R", path_str(&joliet)]),
        "readme\nsub\nsub/Mixed Case.txt\n"
    );
    let out = dir.path().join("out");
    diskkit_ok(&["iso", "extract", path_str(&joliet), "-C", path_str(&out)]);
    assert_eq!(
        fs::read(out.join("sub/Mixed Case.txt")).unwrap(),
        b"joliet keeps case\n"
    );

    // ISO 9660:1999 (level 4) adds an enhanced volume descriptor.
    let level4 = dir.path().join("level4.iso");
    xorriso(&[
        "-as",
        "mkisofs",
        "-iso-level",
        "4",
        "-o",
        path_str(&level4),
        path_str(&src),
    ]);
    let info: serde_json::Value = serde_json::from_str(&diskkit_ok(&[
        "info",
        "--output",
        "json",
        path_str(&level4),
    ]))
    .unwrap();
    assert_eq!(info["format-specific"]["data"]["iso9660-1999"], true);

    // Not an ISO at all.
    let raw = dir.path().join("raw.img");
    fs::write(&raw, vec![0u8; 64 << 10]).unwrap();
    let (code, _, err) = diskkit(&["iso", "ls", path_str(&raw)]);
    assert_eq!(code, 2);
    assert!(err.contains("not an ISO 9660 image"), "{err}");
}

#[test]
fn relocated_deep_directories_are_shown_in_place() {
    // ISO 9660 allows 8 levels; with relocation the deeper ones move to rr_moved and Rock Ridge
    // CL/RE entries record where they belong.
    let dir = tempdir();
    let src = dir.path().join("src");
    let deep = src.join("1/2/3/4/5/6/7/8/9/10");
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("file"), b"deep\n").unwrap();
    let iso = dir.path().join("reloc.iso");
    xorriso(&[
        "-compliance",
        "deep_paths_off",
        "-rr_reloc_dir",
        "rr_moved",
        "-outdev",
        path_str(&iso),
        "-map",
        path_str(&src),
        "/",
    ]);
    let plain = diskkit_ok(&["iso", "ls", "-R", "--names", "iso", path_str(&iso)]);
    assert!(plain.lines().any(|l| l.starts_with("RR_MOVED/")), "{plain}");
    let listing = diskkit_ok(&["iso", "ls", "-R", path_str(&iso)]);
    assert!(
        listing.lines().any(|l| l == "1/2/3/4/5/6/7/8/9/10/file"),
        "{listing}"
    );
    assert!(!listing.contains("rr_moved"), "{listing}");
    let out = dir.path().join("out");
    diskkit_ok(&["iso", "extract", path_str(&iso), "-C", path_str(&out)]);
    assert_eq!(
        fs::read(out.join("1/2/3/4/5/6/7/8/9/10/file")).unwrap(),
        b"deep\n"
    );
}

/// Offsets of `needle` in `hay`.
fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn multi_extent_files_concatenate() {
    // Two files whose records are made into the two extents of one file: the first record gets
    // the multi-extent flag, the second the first's name.
    let dir = tempdir();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("aaaa.bin"), content(7, 4096)).unwrap();
    fs::write(src.join("aaab.bin"), content(8, 3000)).unwrap();
    let iso = dir.path().join("multi.iso");
    xorriso(&[
        "-as",
        "mkisofs",
        "--norock",
        "-iso-level",
        "3",
        "-o",
        path_str(&iso),
        path_str(&src),
    ]);
    let mut image = fs::read(&iso).unwrap();
    let first = find_all(&image, b"AAAA.BIN;1");
    let second = find_all(&image, b"AAAB.BIN;1");
    assert_eq!((first.len(), second.len()), (1, 1));
    image[first[0] - 33 + 25] |= 0x80;
    image[second[0]..second[0] + 10].copy_from_slice(b"AAAA.BIN;1");
    fs::write(&iso, &image).unwrap();

    let listing = diskkit_ok(&["iso", "ls", "-l", path_str(&iso)]);
    assert_eq!(listing.lines().count(), 1, "{listing}");
    assert!(
        listing.contains(" 7096 ") && listing.trim_end().ends_with(" AAAA.BIN"),
        "{listing}"
    );
    let out = dir.path().join("out");
    diskkit_ok(&["iso", "extract", path_str(&iso), "-C", path_str(&out)]);
    let mut want = content(7, 4096);
    want.extend(content(8, 3000));
    assert_eq!(fs::read(out.join("AAAA.BIN")).unwrap(), want);
}

/// Nothing exists in `dir` (the place an escaping write would land).
fn assert_empty(dir: &Path) {
    let left: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        left.is_empty(),
        "written outside the output directory: {left:?}"
    );
}

#[test]
fn hostile_names_and_links_never_escape() {
    let dir = tempdir();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("zzzzzz1")).unwrap();
    fs::write(src.join("zzevilz"), b"evil\n").unwrap();
    fs::write(src.join("zzzzzz1/payload"), b"payload\n").unwrap();
    fs::write(src.join("good"), b"good\n").unwrap();
    symlink(&outside, src.join("zzlink1")).unwrap();
    let iso = dir.path().join("hostile.iso");
    xorriso(&["-as", "mkisofs", "-R", "-o", path_str(&iso), path_str(&src)]);
    let mut image = fs::read(&iso).unwrap();
    // Rock Ridge NM: a name that climbs out, and a directory named like the link to `outside`.
    for (from, to) in [(&b"zzevilz"[..], &b"../evil"[..]), (b"zzzzzz1", b"zzlink1")] {
        let at = find_all(&image, from);
        assert!(!at.is_empty());
        for i in at {
            image[i..i + 7].copy_from_slice(to);
        }
    }
    fs::write(&iso, &image).unwrap();

    let (code, listing, err) = diskkit(&["iso", "ls", "-R", path_str(&iso)]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("../evil"), "{err}");
    assert!(!listing.contains("evil"), "{listing}");

    // By default the link to `outside` is refused; the directory of the same name is then an
    // ordinary directory inside the output.
    let out = dir.path().join("out");
    let (code, _, err) = diskkit(&["iso", "extract", path_str(&iso), "-C", path_str(&out)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("points outside the output directory"), "{err}");
    assert!(!out.join("zzlink1").is_symlink());
    assert_empty(&outside);
    assert!(!dir.path().join("evil").exists());
    assert_eq!(fs::read(out.join("good")).unwrap(), b"good\n");

    // Kept on request, the link is created but never written through.
    let out = dir.path().join("out-links");
    let (code, _, err) = diskkit(&[
        "iso",
        "extract",
        "--keep-outside-links",
        path_str(&iso),
        "-C",
        path_str(&out),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("links are never followed"), "{err}");
    assert_empty(&outside);
    assert_eq!(fs::read_link(out.join("zzlink1")).unwrap(), outside);
}

#[test]
fn damaged_images_fail_cleanly() {
    let dir = tempdir();
    let (_, iso) = build_rr_iso(dir.path());
    let pristine = fs::read(&iso).unwrap();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();

    // A directory record pointing back at the root: a loop, reported and skipped.
    let mut image = pristine.clone();
    let root_extent = &pristine[0x8000 + 156 + 2..0x8000 + 156 + 10];
    let docs = find_all(&image, b"DOCS\x00")[0] - 33;
    image[docs + 2..docs + 10].copy_from_slice(root_extent);
    let looped = dir.path().join("loop.iso");
    fs::write(&looped, &image).unwrap();
    let (code, _, err) = diskkit(&["iso", "ls", "-R", path_str(&looped)]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("loop"), "{err}");

    // A file extent past the end of the image: that file fails, the rest is extracted.
    let mut image = pristine.clone();
    let big = find_all(&image, b"BIG.BIN;1")[0] - 33;
    image[big + 2..big + 6].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
    let outside_extent = dir.path().join("extent.iso");
    fs::write(&outside_extent, &image).unwrap();
    let out = dir.path().join("extent-out");
    let (code, _, err) = diskkit(&[
        "iso",
        "extract",
        path_str(&outside_extent),
        "-C",
        path_str(&out),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("extent of ISO file \"big.bin\""), "{err}");
    assert!(out.join("docs/one").is_file() && !out.join("docs/big.bin").exists());

    // A Rock Ridge continuation area that continues into itself: a bounded chain, an error.
    let mut image = pristine.clone();
    let ce = find_all(&image, b"CE\x1c\x01")[0];
    let field = |at: usize| u32::from_le_bytes(image[at..at + 4].try_into().unwrap()) as usize;
    let target = field(ce + 4) * 2048 + field(ce + 12);
    let entry = image[ce..ce + 28].to_vec();
    image[target..target + 28].copy_from_slice(&entry);
    let ce_loop = dir.path().join("ce-loop.iso");
    fs::write(&ce_loop, &image).unwrap();
    let (code, _, err) = diskkit(&["iso", "ls", path_str(&ce_loop)]);
    assert_eq!(code, 2);
    assert!(err.contains("SUSP continuation area"), "{err}");

    // Bytes of the descriptors and directories overwritten: always exit 0 or 2, never a crash,
    // never a write outside the output directory.
    let damaged = dir.path().join("damaged.iso");
    let mut seed = 12345u32;
    for round in 0..60 {
        let mut image = pristine.clone();
        for _ in 0..8 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let at = 16 * 2048 + seed as usize % (40 * 2048);
            image[at] = (seed >> 24) as u8;
        }
        fs::write(&damaged, &image).unwrap();
        let out = dir.path().join(format!("out{round}"));
        for args in [
            vec!["info", path_str(&damaged)],
            vec!["iso", "ls", "-lR", path_str(&damaged)],
            vec!["iso", "extract", path_str(&damaged), "-C", path_str(&out)],
        ] {
            let (code, _, err) = diskkit(&args);
            assert!(
                code == 0 || code == 2,
                "{args:?} round {round}: {code} {err}"
            );
        }
        assert_empty(&outside);
        fs::remove_dir_all(&out).ok();
    }
}

#[test]
fn published_grub_rescue_iso() {
    // Where scripts/test.sh downloads it (under cargo's target directory, wherever that is).
    let downloads = std::env::var_os("DISKKIT_TEST_DOWNLOADS")
        .map_or_else(|| "target/test-downloads".into(), PathBuf::from);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(downloads)
        .join("grub-rescue-pc/usr/lib/grub-rescue");
    let iso = dir.join("grub-rescue-cdrom.iso");
    if !iso.exists() {
        println!(
            "SKIPPED: {} is missing: the grub-rescue-pc package could not be downloaded (scripts/test.sh fetches it)",
            iso.display()
        );
        return;
    }
    let info: serde_json::Value =
        serde_json::from_str(&diskkit_ok(&["info", "--output", "json", path_str(&iso)])).unwrap();
    let data = &info["format-specific"]["data"];
    assert_eq!(data["bootable"], true);
    assert_eq!(data["boot-entries"][0]["platform"], "bios");
    assert_eq!(data["boot-entries"][0]["emulation"], "no-emulation");
    let listing = diskkit_ok(&["iso", "ls", "-R", path_str(&iso)]);
    assert!(
        listing
            .lines()
            .any(|l| l == "boot/grub/i386-pc/eltorito.img"),
        "{listing}"
    );
    assert!(listing.lines().count() > 100, "{listing}");
    let tmp = tempdir();
    let out = tmp.path().join("out");
    diskkit_ok(&[
        "iso",
        "extract",
        path_str(&iso),
        "boot/grub/i386-pc",
        "-C",
        path_str(&out),
    ]);
    // The El Torito load RBA points at eltorito.img's first sector.
    let eltorito = fs::read(out.join("boot/grub/i386-pc/eltorito.img")).unwrap();
    let image = fs::read(&iso).unwrap();
    let rba = data["boot-entries"][0]["load-rba"].as_u64().unwrap() as usize * 2048;
    assert_eq!(&image[rba..rba + 2048], &eltorito[..2048]);
}

//! VMDK and VHDX reading: every subformat qemu-img makes reads like qemu reads it, the VHDX log is
//! replayed in memory, and damaged images fail with errors, never panics.

mod common;
use common::*;
use diskkit::formats::vhdx::seal;
use diskkit::formats::{Extents, Image, ImplicitOpens, OpenOptions, open, open_with};
use std::path::Path;

const MIB: u64 = 1 << 20;

/// A raw image of `size` bytes holding the mixed pattern.
fn pattern_raw(dir: &Path, size: u64) -> std::path::PathBuf {
    let raw = p(dir, "src.raw");
    qemu_img(&["create", "-f", "raw", path_str(&raw), &size.to_string()]);
    qemu_io("raw", &raw, &as_refs(&mixed_pattern(size)));
    raw
}

/// An empty VHDX of `size` with 1 MiB blocks, made by qemu-img.
fn create_vhdx_1m(path: &Path, size: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        path_str(path),
        size,
    ]);
}

fn open_image(path: &Path) -> Box<dyn Image> {
    open(path, &OpenOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The guest bytes as diskkit reads them, in uneven chunks to cross grain and block edges.
fn diskkit_bytes(image: &dyn Image) -> Vec<u8> {
    let mut out = vec![0u8; image.virtual_size() as usize];
    let mut pos = 0;
    for chunk in out.chunks_mut(3 * MIB as usize + 4096 + 512) {
        image.read_at(chunk, pos).unwrap();
        pos += chunk.len() as u64;
    }
    out
}

fn info_json(img: &Path) -> serde_json::Value {
    serde_json::from_str(&diskkit_ok(&["info", "--output", "json", path_str(img)])).unwrap()
}

fn qemu_info(img: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["info", "--output", "json", path_str(img)])).unwrap()
}

/// Checks `img` against qemu: same format and virtual size in `info`, identical guest bytes,
/// `compare` against qemu's raw copy says identical, and every range the map calls zero is zero
/// (and some range is).
fn check_against_qemu(img: &Path, format: &str, dir: &Path) -> serde_json::Value {
    let info = info_json(img);
    let qinfo = qemu_info(img);
    assert_eq!(info["format"], format);
    assert_eq!(info["format"], qinfo["format"]);
    assert_eq!(info["virtual-size"], qinfo["virtual-size"]);

    let guest = qemu_guest_bytes(img, dir);
    let image = open_image(img);
    assert!(diskkit_bytes(image.as_ref()) == guest, "{}", img.display());
    let mut zero_bytes = 0;
    for e in Extents::new(image.as_ref(), 0, image.virtual_size()) {
        let e = e.unwrap();
        if e.is_zero() {
            zero_bytes += e.length;
            let range = &guest[e.start as usize..e.end() as usize];
            assert!(range.iter().all(|&b| b == 0), "{e:?}");
        }
    }
    assert!(zero_bytes > 0, "{}: no zero extent mapped", img.display());

    let copy = p(dir, "qemu-copy.raw");
    std::fs::write(&copy, &guest).unwrap();
    let (code, out, err) = diskkit(&["compare", path_str(img), path_str(&copy)]);
    assert_eq!(code, 0, "{}: {out}{err}", img.display());
    info
}

#[test]
fn vmdk_subformats_read_like_qemu() {
    let dir = tempdir();
    let size = 12 * MIB;
    let raw = pattern_raw(dir.path(), size);
    for sub in [
        "monolithicSparse",
        "streamOptimized",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ] {
        let img = p(dir.path(), &format!("{sub}.vmdk"));
        qemu_img(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            path_str(&raw),
            path_str(&img),
        ]);
        let info = check_against_qemu(&img, "vmdk", dir.path());
        let data = &info["format-specific"]["data"];
        assert_eq!(data["create-type"], sub);
        let qdata = &qemu_info(&img)["format-specific"]["data"];
        assert_eq!(data["cid"], qdata["cid"]);
        assert_eq!(data["extents"].as_array().unwrap().len(), 1);
        if sub.contains("Sparse") || sub == "streamOptimized" {
            assert_eq!(info["cluster-size"], 65536);
        }
        if sub == "streamOptimized" {
            assert_eq!(data["extents"][0]["compressed"], true);
            let map: Vec<serde_json::Value> =
                serde_json::from_str(&diskkit_ok(&["map", "--output", "json", path_str(&img)]))
                    .unwrap();
            assert!(map.iter().any(|e| e["compressed"] == true), "{map:?}");
        }
    }
}

#[test]
fn vmdk_split_extents_past_2gib() {
    let dir = tempdir();
    let size = 2 * 1024 * MIB + 3 * MIB;
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let img = p(dir.path(), &format!("big-{sub}.vmdk"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            path_str(&img),
            &size.to_string(),
        ]);
        let edge = 2 * 1024 * MIB;
        qemu_io(
            "vmdk",
            &img,
            &[
                "write -P 0x61 0 4k",
                &format!("write -P 0x62 {} 64k", edge - 32 * 1024),
                &format!("write -P 0x63 {} 512", size - 512),
            ],
        );
        let info = info_json(&img);
        assert_eq!(info["virtual-size"], size);
        assert_eq!(
            info["format-specific"]["data"]["extents"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        let image = open_image(&img);
        let mut buf = vec![0u8; 128 * 1024];
        image.read_at(&mut buf, edge - 64 * 1024).unwrap();
        assert!(buf[..32 * 1024].iter().all(|&b| b == 0));
        assert!(buf[32 * 1024..96 * 1024].iter().all(|&b| b == 0x62));
        assert!(buf[96 * 1024..].iter().all(|&b| b == 0));
        // compare reads only allocated data, so a sparse 2 GiB raw copy is cheap.
        let copy = p(dir.path(), "big.raw");
        qemu_img(&["convert", "-O", "raw", path_str(&img), path_str(&copy)]);
        let (code, out, err) = diskkit(&["compare", "--strict", path_str(&img), path_str(&copy)]);
        assert_eq!(code, 0, "{sub}: {out}{err}");
        qemu_io("raw", &copy, &[&format!("write -P 0x01 {} 1", edge + 5)]);
        let (code, out, _) = diskkit(&["compare", path_str(&img), path_str(&copy)]);
        assert_eq!(code, 1);
        assert!(out.contains(&(edge + 5).to_string()), "{out}");
        std::fs::remove_file(&copy).unwrap();
    }
}

#[test]
fn vmdk_delta_disk_reads_through_parent() {
    let dir = tempdir();
    let base = p(dir.path(), "base.vmdk");
    let child = p(dir.path(), "child.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", path_str(&base), "8M"]);
    qemu_io(
        "vmdk",
        &base,
        &["write -P 0x41 0 1M", "write -P 0x42 6M 64k"],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        path_str(&child),
    ]);
    qemu_io("vmdk", &child, &["write -P 0x43 512k 64k"]);
    let guest = qemu_guest_bytes(&child, dir.path());
    let image = open_image(&child);
    assert!(image.backing().is_some());
    assert!(diskkit_bytes(image.as_ref()) == guest);
    let depths: Vec<u32> = Extents::new(image.as_ref(), 0, image.virtual_size())
        .map(|e| e.unwrap().depth)
        .collect();
    assert!(depths.contains(&0) && depths.contains(&1), "{depths:?}");
    let info = info_json(&child);
    assert_eq!(info["backing-filename"], "base.vmdk");
}

#[test]
fn vhdx_subformats_read_like_qemu() {
    let dir = tempdir();
    let size = 12 * MIB;
    let raw = pattern_raw(dir.path(), size);
    for (sub, opts) in [
        ("dynamic", ""),
        ("dynamic", ",block_size=1M"),
        ("dynamic", ",block_size=32M,log_size=4M"),
        ("fixed", ""),
        ("fixed", ",block_size=2M"),
    ] {
        let img = p(dir.path(), "img.vhdx");
        qemu_img(&[
            "convert",
            "-O",
            "vhdx",
            "-o",
            &format!("subformat={sub}{opts}"),
            path_str(&raw),
            path_str(&img),
        ]);
        // Unwritten blocks, and holes of the host file inside written ones, map as zero.
        let info = check_against_qemu(&img, "vhdx", dir.path());
        let data = &info["format-specific"]["data"];
        assert_eq!(data["subformat"], sub, "{opts}");
        assert_eq!(data["log-replayed"], false);
        assert_eq!(data["block-size"], info["cluster-size"]);
        std::fs::remove_file(&img).unwrap();
    }
}

// ---- VHDX log fixtures -------------------------------------------------------------------------

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// CRC-32C of `s` with its checksum field (bytes 4..8) taken as zero, stored into that field.
/// The file offsets of the log and the BAT of a qemu-made VHDX.
struct VhdxLayout {
    log_offset: u64,
    bat_offset: u64,
}

fn layout(bytes: &[u8]) -> VhdxLayout {
    let rt = 192 * 1024;
    let mut bat_offset = 0;
    for i in 0..le32(bytes, rt + 8) as usize {
        let e = rt + 16 + 32 * i;
        if bytes[e..e + 4] == [0x66, 0x77, 0xc2, 0x2d] {
            bat_offset = le64(bytes, e + 16);
        }
    }
    VhdxLayout {
        log_offset: le64(bytes, 64 * 1024 + 72),
        bat_offset,
    }
}

/// A log entry of sequence `seq` whose sequence starts at log offset `tail`, that writes
/// `sectors` (file offset, 4 KiB of content) and zeroes `zeros` (file offset, length).
fn log_entry(
    guid: &[u8; 16],
    seq: u64,
    tail: u32,
    sectors: &[(u64, Vec<u8>)],
    zeros: &[(u64, u64)],
    file_len: u64,
) -> Vec<u8> {
    let count = sectors.len() + zeros.len();
    assert!(64 + 32 * count <= 4096);
    let mut e = vec![0u8; 4096 * (1 + sectors.len())];
    e[..4].copy_from_slice(b"loge");
    let len = e.len() as u32;
    e[8..12].copy_from_slice(&len.to_le_bytes());
    e[12..16].copy_from_slice(&tail.to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    e[32..48].copy_from_slice(guid);
    e[48..56].copy_from_slice(&file_len.to_le_bytes());
    e[56..64].copy_from_slice(&file_len.to_le_bytes());
    let mut d = 64;
    for (off, len) in zeros {
        e[d..d + 4].copy_from_slice(b"zero");
        e[d + 8..d + 16].copy_from_slice(&len.to_le_bytes());
        e[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
        e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
        d += 32;
    }
    for (i, (off, content)) in sectors.iter().enumerate() {
        e[d..d + 4].copy_from_slice(b"desc");
        e[d + 4..d + 8].copy_from_slice(&content[4092..]);
        e[d + 8..d + 16].copy_from_slice(&content[..8]);
        e[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
        e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
        d += 32;
        let s = 4096 * (i + 1);
        e[s..s + 4].copy_from_slice(b"data");
        e[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
        e[s + 8..s + 4092].copy_from_slice(&content[8..4092]);
        e[s + 4092..s + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
    }
    seal(&mut e);
    e
}

/// Builds a qemu-made dynamic VHDX whose log holds one entry: new content for one data sector,
/// a zeroed range of data, and a BAT update that turns block 1 into a ZERO block.
fn vhdx_with_log(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let img = p(dir, "logged.vhdx");
    create_vhdx_1m(&img, "8M");
    qemu_io("vhdx", &img, &["write -P 0x11 0 2M", "write -P 0x22 2M 1M"]);
    let mut bytes = std::fs::read(&img).unwrap();
    let l = layout(&bytes);
    let block0 = le64(&bytes, l.bat_offset as usize);
    assert_eq!(block0 & 7, 6, "block 0 is present");
    let first_block = block0 >> 20 << 20;
    let guid = [0x5a; 16];
    let mut sector = vec![0xabu8; 4096];
    sector[..8].copy_from_slice(b"LEADING!");
    sector[4092..].copy_from_slice(b"TAIL");
    let bat_sector = l.bat_offset;
    let mut bat = bytes[bat_sector as usize..bat_sector as usize + 4096].to_vec();
    bat[8..16].copy_from_slice(&2u64.to_le_bytes()); // block 1: PAYLOAD_BLOCK_ZERO
    let entry = log_entry(
        &guid,
        7,
        0,
        &[(first_block + 8192, sector), (bat_sector, bat)],
        &[(first_block + 65536, 3 * 4096)],
        bytes.len() as u64,
    );
    put_log_entry(&mut bytes, &l, 0, &entry);
    set_log_guid(&mut bytes, &guid);
    std::fs::write(&img, &bytes).unwrap();
    (img, bytes)
}

/// Writes `entry` at log offset `pos` of the (1 MiB, circular) log.
fn put_log_entry(bytes: &mut [u8], l: &VhdxLayout, pos: usize, entry: &[u8]) {
    let log_len = 1 << 20;
    for (i, sector) in entry.chunks(4096).enumerate() {
        let at = l.log_offset as usize + (pos + 4096 * i) % log_len;
        bytes[at..at + 4096].copy_from_slice(sector);
    }
}

/// Marks the log as holding entries of `guid` in both headers.
fn set_log_guid(bytes: &mut [u8], guid: &[u8; 16]) {
    for h in [64 * 1024, 128 * 1024] {
        bytes[h + 48..h + 64].copy_from_slice(guid);
        seal(&mut bytes[h..h + 4096]);
    }
}

/// qemu's replay of the log (it replays when opening read-write) of a copy of `img`.
fn qemu_replayed_bytes(img: &Path, dir: &Path) -> Vec<u8> {
    let replayed = p(dir, "replayed.vhdx");
    std::fs::copy(img, &replayed).unwrap();
    qemu_io("vhdx", &replayed, &["read 0 512"]);
    qemu_guest_bytes(&replayed, dir)
}

#[test]
fn vhdx_log_sequence_wrapping_the_circular_log() {
    let dir = tempdir();
    let img = p(dir.path(), "wrap.vhdx");
    create_vhdx_1m(&img, "8M");
    qemu_io("vhdx", &img, &["write -P 0x11 0 1M"]);
    let mut bytes = std::fs::read(&img).unwrap();
    let l = layout(&bytes);
    let block0 = le64(&bytes, l.bat_offset as usize) >> 20 << 20;
    let guid = [0x3c; 16];
    let log_len = 1u32 << 20;
    let sector = |v: u8| vec![v; 4096];
    let tail = log_len - 4096;
    // seq 7 at the last log sector wraps its data sector to log offset 0; seq 8 follows at 4 KiB
    // and zeroes what seq 7 wrote; seq 3 is an older sequence that must not be replayed.
    let e7 = log_entry(
        &guid,
        7,
        tail,
        &[(block0, sector(0x77))],
        &[],
        bytes.len() as u64,
    );
    let e8 = log_entry(
        &guid,
        8,
        tail,
        &[(block0 + 8192, sector(0x88))],
        &[(block0, 4096)],
        bytes.len() as u64,
    );
    let e3 = log_entry(
        &guid,
        3,
        65536,
        &[(block0 + 16384, sector(0x33))],
        &[],
        bytes.len() as u64,
    );
    put_log_entry(&mut bytes, &l, tail as usize, &e7);
    put_log_entry(&mut bytes, &l, 4096, &e8);
    put_log_entry(&mut bytes, &l, 65536, &e3);
    set_log_guid(&mut bytes, &guid);
    std::fs::write(&img, &bytes).unwrap();

    let ours = diskkit_bytes(open_image(&img).as_ref());
    assert!(ours[..4096].iter().all(|&b| b == 0));
    assert!(ours[4096..8192].iter().all(|&b| b == 0x11));
    assert!(ours[8192..12288].iter().all(|&b| b == 0x88));
    assert!(ours[16384..20480].iter().all(|&b| b == 0x11));
    assert!(ours == qemu_replayed_bytes(&img, dir.path()));
}

#[test]
fn vhdx_log_is_replayed_in_memory_like_qemu_replays_it() {
    let dir = tempdir();
    let (img, original) = vhdx_with_log(dir.path());
    let image = open_image(&img);
    let ours = diskkit_bytes(image.as_ref());
    let info = image.info();
    assert_eq!(info.format_specific.unwrap()["data"]["log-replayed"], true);
    drop(image);
    assert!(
        std::fs::read(&img).unwrap() == original,
        "input must not be written"
    );

    assert!(ours[8192..8200] == *b"LEADING!");
    assert!(ours[8200..12284].iter().all(|&b| b == 0xab));
    assert!(ours[65536..65536 + 3 * 4096].iter().all(|&b| b == 0));
    assert!(ours[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0));

    assert!(ours == qemu_replayed_bytes(&img, dir.path()));
}

#[test]
fn vhdx_torn_log_is_refused() {
    let dir = tempdir();
    let (img, mut bytes) = vhdx_with_log(dir.path());
    let l = layout(&bytes);
    bytes[l.log_offset as usize + 4096 + 100] ^= 0xff; // a data sector: the checksum fails
    std::fs::write(&img, &bytes).unwrap();
    let (code, _, err) = diskkit(&["info", path_str(&img)]);
    assert_eq!(code, 2);
    assert!(
        err.contains("vhdx log") && err.contains("valid sequence"),
        "{err}"
    );
}

// ---- hostile inputs ----------------------------------------------------------------------------

/// Opens and walks a damaged image: any error is fine, a panic or hang is not. Returns whether
/// opening (or reading) failed.
fn open_and_walk(path: &Path, format: &str) -> bool {
    let opts = OpenOptions {
        format: Some(diskkit::formats::Format::parse(format).unwrap()),
        ..OpenOptions::default()
    };
    let Ok(image) = open(path, &opts) else {
        return true;
    };
    let _ = image.info();
    let mut buf = vec![0u8; 256 * 1024];
    let mut failed = false;
    for e in Extents::new(image.as_ref(), 0, image.virtual_size()).take(10_000) {
        let Ok(e) = e else { return true };
        let n = e.length.min(buf.len() as u64) as usize;
        failed |= image.read_at(&mut buf[..n], e.start).is_err();
    }
    failed
}

fn assert_corrupt(path: &Path, format: &str, what: &str) {
    assert!(open_and_walk(path, format), "{what}: damage went unnoticed");
    let (code, _, err) = diskkit(&["compare", "-f", format, path_str(path), path_str(path)]);
    assert_eq!(code, 2, "{what}: {err}");
    assert!(err.starts_with("diskkit: "), "{what}: {err}");
}

#[test]
fn damaged_vmdk_fails_cleanly() {
    let dir = tempdir();
    let raw = pattern_raw(dir.path(), 8 * MIB);
    let sparse = p(dir.path(), "s.vmdk");
    let stream = p(dir.path(), "st.vmdk");
    qemu_img(&["convert", "-O", "vmdk", path_str(&raw), path_str(&sparse)]);
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        path_str(&raw),
        path_str(&stream),
    ]);
    let s = std::fs::read(&sparse).unwrap();
    let gd = le64(&s, 56) as usize * 512;
    let gt = le32(&s, gd) as usize * 512;
    let d = dir.path();
    let far = (u32::MAX - 8).to_le_bytes();
    for (name, at, bytes, what) in [
        (
            "gd.vmdk",
            48,
            &[0xffu8; 16][..],
            "both grain directories past the end",
        ),
        (
            "grain.vmdk",
            20,
            &3u64.to_le_bytes()[..],
            "grain size not a power of two",
        ),
        (
            "gtes.vmdk",
            44,
            &0u32.to_le_bytes()[..],
            "no entries per grain table",
        ),
        (
            "cap.vmdk",
            12,
            &(u64::MAX / 2).to_le_bytes()[..],
            "absurd capacity",
        ),
        ("gt.vmdk", gd, &far[..], "grain table past the end"),
        ("gte.vmdk", gt, &far[..], "grain past the end"),
        ("nl.vmdk", 73, &b"\r"[..], "newline test bytes"),
        ("ver.vmdk", 4, &9u32.to_le_bytes()[..], "unknown version"),
    ] {
        let bad = p(d, name);
        std::fs::write(&bad, patch(&s, at, bytes)).unwrap();
        assert_corrupt(&bad, "vmdk", what);
    }
    // Stream-optimized: a grain marker whose size or data is wrong.
    let st = std::fs::read(&stream).unwrap();
    let first_grain = st
        .chunks(512)
        .position(|c| c[..8] == 0u64.to_le_bytes() && le32(c, 8) > 0 && c[12] == 0x78)
        .unwrap()
        * 512;
    for (name, at, bytes, what) in [
        (
            "st-size.vmdk",
            first_grain + 8,
            &u32::MAX.to_le_bytes()[..],
            "compressed size",
        ),
        (
            "st-data.vmdk",
            first_grain + 20,
            &[0xffu8; 8][..],
            "deflate data",
        ),
        (
            "st-lba.vmdk",
            first_grain,
            &77u64.to_le_bytes()[..],
            "marker lba",
        ),
    ] {
        let bad = p(d, name);
        std::fs::write(&bad, patch(&st, at, bytes)).unwrap();
        assert_corrupt(&bad, "vmdk", what);
    }
    // Truncations anywhere: errors only.
    for src in [&s, &st] {
        for cut in [
            0,
            4,
            100,
            512,
            1024,
            2048,
            40_000,
            src.len() / 2,
            src.len() - 512,
            src.len() - 1,
        ] {
            let t = p(d, "cut.vmdk");
            std::fs::write(&t, &src[..cut.min(src.len())]).unwrap();
            open_and_walk(&t, "vmdk");
        }
    }
    // Descriptors: missing extent files, absurd sizes, too many extents.
    let desc = |name: &str, body: &str| {
        let path = p(d, name);
        std::fs::write(
            &path,
            format!("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n{body}"),
        )
        .unwrap();
        path
    };
    assert_corrupt(
        &desc("missing.vmdk", "RW 100 FLAT \"nope.raw\" 0\n"),
        "vmdk",
        "missing extent",
    );
    assert_corrupt(
        &desc("huge.vmdk", "RW 18446744073709551615 ZERO\nRW 10 ZERO\n"),
        "vmdk",
        "extent sizes overflow",
    );
    let many: String = (0..5000).map(|_| "RW 1 ZERO\n").collect();
    assert_corrupt(&desc("many.vmdk", &many), "vmdk", "too many extents");
    assert_corrupt(
        &desc(
            "short.vmdk",
            &format!("RW 100000 SPARSE \"{}\"\n", path_str(&sparse)),
        ),
        "vmdk",
        "sparse extent smaller than its descriptor line",
    );
    // Detection: a text descriptor is a vmdk, its absolute path is reported.
    let abs = desc(
        "abs.vmdk",
        &format!("RW 16384 SPARSE \"{}\"\n", path_str(&sparse)),
    );
    let info = info_json(&abs);
    assert_eq!(info["format"], "vmdk");
    assert!(
        info["warnings"][0].as_str().unwrap().contains("absolute"),
        "{info}"
    );
}

#[test]
fn damaged_vhdx_fails_cleanly() {
    let dir = tempdir();
    let d = dir.path();
    let img = p(d, "v.vhdx");
    create_vhdx_1m(&img, "8M");
    qemu_io("vhdx", &img, &["write -P 0x11 0 2M"]);
    let v = std::fs::read(&img).unwrap();
    let l = layout(&v);
    let rt = 192 * 1024;
    let meta = le64(&v, rt + 16 + 32 + 16) as usize;
    let file_params = meta + le32(&v, meta + 32 + 16) as usize;

    // Region tables: resealed so that only the checked property is wrong.
    let region_patch = |name: &str, entry: usize, offset: u64| {
        let mut b = v.clone();
        for t in [rt, 256 * 1024] {
            let e = t + 16 + 32 * entry + 16;
            b[e..e + 8].copy_from_slice(&offset.to_le_bytes());
            seal(&mut b[t..t + 64 * 1024]);
        }
        let path = p(d, name);
        std::fs::write(&path, &b).unwrap();
        path
    };
    assert_corrupt(
        &region_patch("overlap.vhdx", 1, l.bat_offset),
        "vhdx",
        "regions overlap",
    );
    assert_corrupt(
        &region_patch("outside.vhdx", 0, 1 << 40),
        "vhdx",
        "BAT outside the file",
    );
    assert_corrupt(
        &region_patch("log.vhdx", 0, l.log_offset),
        "vhdx",
        "BAT over the log",
    );

    let mut bad_headers = v.clone();
    bad_headers[64 * 1024 + 20] ^= 1;
    bad_headers[128 * 1024 + 20] ^= 1;
    let far_block = ((1u64 << 30) << 20 | 6).to_le_bytes();
    for (name, b, what) in [
        ("headers.vhdx", bad_headers, "both header checksums"),
        (
            "bs.vhdx",
            patch(&v, file_params, &(3u32 << 20).to_le_bytes()),
            "block size 3 MiB",
        ),
        (
            "bs2.vhdx",
            patch(&v, file_params, &(512u32 << 20).to_le_bytes()),
            "block size 512 MiB",
        ),
        (
            "block.vhdx",
            patch(&v, l.bat_offset as usize, &far_block),
            "block past the end",
        ),
        (
            "state.vhdx",
            patch(&v, l.bat_offset as usize, &4u64.to_le_bytes()),
            "reserved block state",
        ),
        (
            "partial.vhdx",
            patch(&v, l.bat_offset as usize, &7u64.to_le_bytes()),
            "partial block without parent",
        ),
    ] {
        let path = p(d, name);
        std::fs::write(&path, &b).unwrap();
        assert_corrupt(&path, "vhdx", what);
    }
    for cut in [
        0,
        8,
        70_000,
        200_000,
        300_000,
        MIB as usize + 10,
        v.len() / 2,
        v.len() - 1,
    ] {
        let t = p(d, "cut.vhdx");
        std::fs::write(&t, &v[..cut.min(v.len())]).unwrap();
        open_and_walk(&t, "vhdx");
    }
}

fn patch(src: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut b = src.to_vec();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    b
}

// ---- VHDX differencing (qemu cannot make these: built by patching a qemu-made image) --------

/// A GUID in VHDX byte order (first three fields little-endian).
fn guid_bytes(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[..4].copy_from_slice(&d1.to_le_bytes());
    g[4..6].copy_from_slice(&d2.to_le_bytes());
    g[6..8].copy_from_slice(&d3.to_le_bytes());
    g[8..].copy_from_slice(&d4);
    g
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// A parent locator item naming `relative_path`.
fn parent_locator(relative_path: &str) -> Vec<u8> {
    let vhdx_type = guid_bytes(
        0xB04AEFB7,
        0xD19E,
        0x4A81,
        [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
    );
    let pairs = [
        ("parent_linkage", "{00000000-0000-0000-0000-000000000000}"),
        ("relative_path", relative_path),
    ];
    let mut item = vhdx_type.to_vec();
    item.extend_from_slice(&0u16.to_le_bytes());
    item.extend_from_slice(&(pairs.len() as u16).to_le_bytes());
    let mut strings = Vec::new();
    let strings_at = 20 + 12 * pairs.len();
    for (k, v) in pairs {
        let (k, v) = (utf16(k), utf16(v));
        let key_at = strings_at + strings.len();
        strings.extend_from_slice(&k);
        let value_at = strings_at + strings.len();
        strings.extend_from_slice(&v);
        item.extend_from_slice(&(key_at as u32).to_le_bytes());
        item.extend_from_slice(&(value_at as u32).to_le_bytes());
        item.extend_from_slice(&(k.len() as u16).to_le_bytes());
        item.extend_from_slice(&(v.len() as u16).to_le_bytes());
    }
    item.extend_from_slice(&strings);
    item
}

#[test]
fn vhdx_differencing_reads_parent_and_sector_bitmap() {
    let dir = tempdir();
    let d = dir.path();
    let parent = p(d, "parent.vhdx");
    create_vhdx_1m(&parent, "8M");
    qemu_io("vhdx", &parent, &["write -P 0x50 0 8M"]);
    let child = p(d, "child.vhdx");
    create_vhdx_1m(&child, "8M");
    qemu_io("vhdx", &child, &["write -P 0x63 1M 2M"]);

    let mut b = std::fs::read(&child).unwrap();
    let l = layout(&b);
    let meta = le64(&b, 192 * 1024 + 16 + 32 + 16) as usize;
    // File parameters: set HasParent.
    let fp = meta + le32(&b, meta + 32 + 16) as usize;
    b[fp + 4] |= 2;
    // A sixth metadata item: the parent locator.
    let count = u16::from_le_bytes([b[meta + 10], b[meta + 11]]) as usize;
    let item = parent_locator("parent.vhdx");
    let e = meta + 32 + 32 * count;
    b[e..e + 16].copy_from_slice(&guid_bytes(
        0xA8D35F2D,
        0xB30B,
        0x454D,
        [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
    ));
    b[e + 16..e + 20].copy_from_slice(&0x20000u32.to_le_bytes());
    b[e + 20..e + 24].copy_from_slice(&(item.len() as u32).to_le_bytes());
    b[e + 24..e + 28].copy_from_slice(&4u32.to_le_bytes());
    b[meta + 10..meta + 12].copy_from_slice(&((count + 1) as u16).to_le_bytes());
    b[meta + 0x20000..meta + 0x20000 + item.len()].copy_from_slice(&item);
    // BAT: block 0 from the parent, block 1 here, block 2 half here (sector bitmap), the rest
    // from the parent. The chunk's sector bitmap goes at the end of the file.
    let bat = l.bat_offset as usize;
    let entry = |i: usize| le64(&b, bat + 8 * i);
    let (block1, block2) = (entry(1) >> 20 << 20, entry(2) >> 20 << 20);
    let bitmap_at = b.len() as u64;
    let mut bitmap = vec![0u8; 1 << 20];
    let sectors_per_block = 2048;
    bitmap[2 * sectors_per_block / 8..(2 * sectors_per_block + 1024) / 8].fill(0xff);
    b.extend_from_slice(&bitmap);
    let chunk_ratio = 4096;
    let mut set =
        |i: usize, v: u64| b[bat + 8 * i..bat + 8 * i + 8].copy_from_slice(&v.to_le_bytes());
    set(0, 0);
    set(1, block1 | 6);
    set(2, block2 | 7);
    for i in 3..8 {
        set(i, 0);
    }
    set(chunk_ratio, bitmap_at | 6);
    std::fs::write(&child, &b).unwrap();

    let image = open_image(&child);
    assert_eq!(
        image.info().format_specific.unwrap()["data"]["subformat"],
        "differencing"
    );
    let ours = diskkit_bytes(image.as_ref());
    let m = MIB as usize;
    let expect = |range: std::ops::Range<usize>, v: u8| {
        assert!(
            ours[range.clone()].iter().all(|&x| x == v),
            "{range:?} != {v:#x}"
        );
    };
    expect(0..m, 0x50);
    expect(m..2 * m + m / 2, 0x63);
    expect(2 * m + m / 2..8 * m, 0x50);
    let depths: Vec<(u64, u32)> = Extents::new(image.as_ref(), 0, image.virtual_size())
        .map(|e| e.map(|e| (e.start, e.depth)).unwrap())
        .collect();
    assert_eq!(
        depths,
        [(0, 1), (m as u64, 0), (2 * m as u64 + m as u64 / 2, 1)]
    );
    let info = info_json(&child);
    assert_eq!(info["backing-filename"], "parent.vhdx");

    // Without its parent the image cannot be read.
    std::fs::remove_file(&parent).unwrap();
    let (code, _, err) = diskkit(&["info", path_str(&child)]);
    assert_eq!(code, 2);
    assert!(err.contains("parent"), "{err}");
}

/// A monolithicFlat descriptor made by qemu-img whose extent line names `extent` instead.
fn flat_descriptor_naming(dir: &Path, name: &str, extent: &str) -> std::path::PathBuf {
    let desc = p(dir, name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        path_str(&desc),
        "1M",
    ]);
    let text = std::fs::read_to_string(&desc).unwrap();
    let flat = format!("\"{}\"", name.replace(".vmdk", "-flat.vmdk"));
    assert!(text.contains(&flat), "{text}");
    std::fs::write(&desc, text.replace(&flat, &format!("\"{extent}\""))).unwrap();
    desc
}

/// CVE-2022-47951: a VMDK descriptor can name any host file as its extent. The caller's policy
/// decides whether it is read.
#[test]
fn flat_extent_naming_a_host_file_follows_the_policy() {
    let dir = tempdir();
    let host_file = "/etc/hostname";
    let desc = flat_descriptor_naming(dir.path(), "host.vmdk", host_file);
    let open_as = |policy| open_with(&desc, &OpenOptions::default(), policy);
    let outside = |w: &[String]| {
        w.iter()
            .any(|w| w.contains(host_file) && w.contains("outside"))
    };

    assert!(!outside(
        &open_as(ImplicitOpens::Allow).unwrap().info().warnings
    ));
    assert!(outside(
        &open(&desc, &OpenOptions::default())
            .unwrap()
            .info()
            .warnings
    ));
    let info = info_json(&desc);
    let cli_warnings: Vec<String> = serde_json::from_value(info["warnings"].clone()).unwrap();
    assert!(outside(&cli_warnings), "{info}");
    for policy in [ImplicitOpens::RefuseOutsideDir, ImplicitOpens::Refuse] {
        let err = open_as(policy).err().unwrap().to_string();
        assert!(
            err.contains("host.vmdk") && err.contains(host_file),
            "{err}"
        );
    }
}

/// Runs diskkit, failing the test if it has not finished within a few seconds.
fn diskkit_within_seconds(args: &[&str]) -> (i32, String) {
    use std::time::{Duration, Instant};
    let mut child = std::process::Command::new(diskkit_bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            panic!("diskkit {args:?} still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A FIFO named as an extent or backing file is refused before it is read: reading it would
/// block `info` and `hash` forever.
#[test]
fn named_fifo_is_refused_without_blocking() {
    let dir = tempdir();
    let d = dir.path();
    let status = std::process::Command::new("mkfifo")
        .arg(p(d, "fifo"))
        .status()
        .unwrap();
    assert!(status.success());
    let desc = flat_descriptor_naming(d, "flat.vmdk", "fifo");
    let top = p(d, "top.qcow2");
    // -u: qemu-img itself would block on the FIFO.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        "fifo",
        path_str(&top),
        "1M",
    ]);
    for image in [&desc, &top] {
        let err = open_with(image, &OpenOptions::default(), ImplicitOpens::Allow)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("FIFO"), "{err}");
        for command in ["info", "hash"] {
            let (code, err) = diskkit_within_seconds(&[command, path_str(image)]);
            assert_ne!(code, 0);
            assert!(err.contains("is a FIFO, not a regular file"), "{err}");
        }
    }
}

/// `check` of VMDK and VHDX: clean images made by qemu-img are clean, truncated ones are
/// corrupt for both (VHDX: the same count), and blocks sharing bytes are found.
#[test]
fn check_of_vmdk_and_vhdx_agrees_with_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let status = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    for (format, options) in [
        ("vmdk", "subformat=monolithicSparse"),
        ("vmdk", "subformat=streamOptimized"),
        ("vmdk", "subformat=twoGbMaxExtentSparse"),
        ("vmdk", "subformat=monolithicFlat"),
        ("vhdx", "block_size=1M"),
    ] {
        let img = p(
            d,
            &format!("clean-{}.{format}", options.replace(['=', ','], "-")),
        );
        let raw = pattern_raw(d, 16 * MIB);
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            format,
            "-o",
            options,
            path_str(&raw),
            path_str(&img),
        ]);
        let (code, out, err) = diskkit(&["check", path_str(&img)]);
        assert_eq!(code, 0, "{options}: {out}{err}");
        assert_eq!(status(&["check", path_str(&img)]).0, 0);
    }
    for format in ["vmdk", "vhdx"] {
        let img = p(d, &format!("cut.{format}"));
        qemu_img(&["create", "-q", "-f", format, path_str(&img), "64M"]);
        qemu_io(format, &img, &["write -P 0x11 0 40M"]);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(20 * MIB)
            .unwrap();
        let (qemu_code, qemu) = status(&["check", "--output=json", path_str(&img)]);
        let (code, out, _) = diskkit(&["check", "--output", "json", path_str(&img)]);
        assert_eq!(code, 2, "{out}");
        assert_ne!(qemu_code, 0);
        let ours: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(ours["corruptions"].as_u64().unwrap() > 0, "{ours}");
        if format == "vhdx" {
            let qemu: serde_json::Value = serde_json::from_str(&qemu).unwrap();
            assert_eq!(ours["corruptions"], qemu["corruptions"], "{ours}");
        }
    }

    // Two BAT entries naming the same block: reads would alias, check says so.
    let img = p(d, "shared.vhdx");
    create_vhdx_1m(&img, "8M");
    qemu_io("vhdx", &img, &["write -P 0x11 0 2M"]);
    let mut v = std::fs::read(&img).unwrap();
    let bat = layout(&v).bat_offset as usize;
    let first: [u8; 8] = v[bat..bat + 8].try_into().unwrap();
    v[bat + 8..bat + 16].copy_from_slice(&first);
    std::fs::write(&img, &v).unwrap();
    let (code, out, _) = diskkit(&["check", path_str(&img)]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("overlaps"), "{out}");
}

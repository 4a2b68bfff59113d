//! VHD (vpc): reading qemu-made images, writing images qemu reads, differencing disks, check,
//! resize and hostile inputs.

mod common;
use common::*;
use diskkit::formats::image::GuestRange;
use diskkit::formats::vhd::layout::{
    DiskType, DynamicHeader, FOOTER_SIZE, Footer, HEADER_SIZE, PLATFORM_W2RU, ParentLocator,
    UNALLOCATED, bitmap_size,
};
use diskkit::formats::vhd::{self, VhdWriter};
use diskkit::formats::{
    CreateOptions, Error, Extents, Format, Image, ImageWriter, ImplicitOpens, OpenOptions, Repair,
    open, open_with,
};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn open_vhd(path: &Path) -> Box<dyn Image> {
    open(path, &OpenOptions::default()).expect("open image")
}

fn read_all(img: &dyn Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut buf, 0).expect("read image");
    buf
}

/// qemu's view of a vpc image (`-f vpc`: qemu probes fixed VHDs as raw).
fn qemu_vpc_bytes(path: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-view.raw");
    qemu_img(&[
        "convert",
        "-f",
        "vpc",
        "-O",
        "raw",
        path_str(path),
        path_str(&out),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

fn qemu_virtual_size(path: &Path) -> u64 {
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "-f",
        "vpc",
        "--output=json",
        path_str(path),
    ]))
    .unwrap();
    info["virtual-size"].as_u64().unwrap()
}

fn qemu_create_vpc(path: &Path, spec: &str, size: u64) {
    let size = size.to_string();
    qemu_img(&["create", "-f", "vpc", "-o", spec, path_str(path), &size]);
}

fn opts(spec: &str) -> CreateOptions {
    let mut o = CreateOptions::default();
    o.parse_options(spec).unwrap();
    o
}

/// The ranges of `img` that its map says hold data.
fn data_ranges(img: &dyn Image) -> Vec<std::ops::Range<u64>> {
    Extents::new(img, 0, img.virtual_size())
        .map(|e| e.unwrap())
        .filter(|e| !e.is_zero())
        .map(|e| e.start..e.end())
        .collect()
}

/// Copies the `data` ranges of `src` into a new VHD through the library, from 3 threads, in
/// chunks that do not line up with sectors or blocks.
fn write_vhd(src: &dyn Image, data: &[std::ops::Range<u64>], out: &Path, spec: &str) -> u64 {
    let writer = VhdWriter::create(out, src.virtual_size(), &mut opts(spec)).unwrap();
    let mut chunks = Vec::new();
    for r in data {
        let mut pos = r.start;
        while pos < r.end {
            let n = (r.end - pos).min(100_003);
            chunks.push((pos, n));
            pos += n;
        }
    }
    std::thread::scope(|s| {
        for part in chunks.chunks(chunks.len().div_ceil(3).max(1)) {
            let w = &writer;
            s.spawn(move || {
                for &(pos, n) in part {
                    let mut buf = vec![0u8; n as usize];
                    src.read_at(&mut buf, pos).unwrap();
                    w.write_at(&buf, pos).unwrap();
                }
            });
        }
    });
    let size = writer.virtual_size();
    Box::new(writer).finish().unwrap();
    size
}

#[test]
fn qemu_made_vhds_read_like_qemu() {
    let dir = tempdir();
    let size = 10 * MIB + 4096;
    for spec in [
        "subformat=dynamic",
        "subformat=dynamic,force_size=on",
        "subformat=fixed",
        "subformat=fixed,force_size=on",
    ] {
        let img = p(dir.path(), "qemu.vhd");
        qemu_create_vpc(&img, spec, size);
        let vsize = qemu_virtual_size(&img);
        qemu_io("vpc", &img, &as_refs(&mixed_pattern(vsize & !4095)));

        // Detected without -f, even the fixed ones qemu probes as raw.
        let info: serde_json::Value =
            serde_json::from_str(&diskkit_ok(&["info", "--output", "json", path_str(&img)]))
                .unwrap();
        assert_eq!(info["format"], "vpc", "{spec}");
        assert_eq!(info["virtual-size"], vsize, "{spec}");
        let subformat = if spec.contains("fixed") {
            "fixed"
        } else {
            "dynamic"
        };
        assert_eq!(info["format-specific"]["data"]["subformat"], subformat);

        let guest = qemu_vpc_bytes(&img, dir.path());
        let image = open_vhd(&img);
        assert_eq!(read_all(image.as_ref()), guest, "{spec}");
        // Every range the map calls zero is zero in qemu's view.
        for e in Extents::new(image.as_ref(), 0, vsize) {
            let e = e.unwrap();
            if e.is_zero() {
                assert!(
                    guest[e.start as usize..e.end() as usize]
                        .iter()
                        .all(|&b| b == 0)
                );
            }
        }
        let copy = p(dir.path(), "copy.raw");
        std::fs::write(&copy, &guest).unwrap();
        let (code, out, err) = diskkit(&["compare", path_str(&img), path_str(&copy)]);
        assert_eq!(code, 0, "{spec}: {out}{err}");

        let report = vhd::check(&img, None).unwrap();
        assert_eq!(report.exit_code(), 0, "{spec}: {:?}", report.messages);
    }
}

#[test]
fn written_vhds_are_read_by_qemu() {
    let dir = tempdir();
    let src = p(dir.path(), "src.raw");
    let src_size = 9 * MIB + 3000;
    qemu_img(&["create", "-f", "raw", path_str(&src), &src_size.to_string()]);
    qemu_io("raw", &src, &as_refs(&mixed_pattern(9 * MIB)));
    let src_img = open(
        &src,
        &OpenOptions {
            format: Some(Format::Raw),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    // The map of a raw file can change as the filesystem settles its extents: take it once.
    let allocated = data_ranges(src_img.as_ref());
    for spec in [
        "",
        "subformat=fixed",
        "force_size=on",
        "subformat=fixed,force_size=on",
        "block_size=512K",
        "target=azure",
    ] {
        let out = p(dir.path(), "out.vhd");
        let size = write_vhd(src_img.as_ref(), &allocated, &out, spec);
        let sector_size = src_size.next_multiple_of(512);
        match spec {
            "target=azure" => assert_eq!(size, 10 * MIB),
            s if s.contains("force_size") => assert_eq!(size, sector_size),
            _ => assert!(size >= sector_size && size < sector_size + 64 * 1024),
        }
        assert_eq!(qemu_virtual_size(&out), size, "{spec}");
        qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "vpc",
            path_str(&src),
            path_str(&out),
        ]);

        // Our reader verifies both footers' and the header's checksums on open.
        let back = open_vhd(&out);
        assert_eq!(back.virtual_size(), size);
        assert!(back.info().warnings.is_empty(), "{spec}");
        let fixed = spec.contains("fixed") || spec.contains("azure");
        let expected = if fixed { "fixed" } else { "dynamic" };
        assert_eq!(
            back.info().format_specific.unwrap()["data"]["subformat"],
            expected
        );
        let report = vhd::check(&out, None).unwrap();
        assert_eq!(report.exit_code(), 0, "{spec}: {:?}", report.messages);

        let mut ranges = allocated
            .iter()
            .map(|r| Ok(GuestRange::new(r.start, r.end)));
        let m = vhd::measure(src_size, &mut opts(spec), &mut ranges).unwrap();
        let len = std::fs::metadata(&out).unwrap().len();
        assert_eq!(m.required, len, "{spec}");
        assert!(m.fully_allocated >= len);
    }
}

#[test]
fn create_options_are_checked() {
    let dir = tempdir();
    let out = p(dir.path(), "x.vhd");
    for spec in [
        "subformat=sparse",
        "bogus=1",
        "target=gcp",
        "block_size=1000",
    ] {
        let e = VhdWriter::create(&out, MIB, &mut opts(spec)).err().unwrap();
        assert!(matches!(e, Error::Invalid(_)), "{spec}: {e}");
    }
    let mut o = opts("");
    o.compress = true;
    let e = VhdWriter::create(&out, MIB, &mut o).err().unwrap();
    assert!(e.to_string().contains("compress"), "{e}");
}

/// Turns a dynamic VHD made by our writer into a differencing disk of `parent`: disk type 4,
/// parent UUID and name, a relative Windows locator ("W2ru") stored before the moved footer.
fn make_differencing(child: &Path, parent_uuid: [u8; 16], locator: &str) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(child)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut buf = vec![0u8; FOOTER_SIZE as usize];
    f.read_exact_at(&mut buf, 0).unwrap();
    let mut footer = Footer::parse(&buf);
    footer.disk_type = DiskType::Differencing.raw();
    let mut hbuf = vec![0u8; HEADER_SIZE as usize];
    f.read_exact_at(&mut hbuf, footer.data_offset).unwrap();
    let mut header = DynamicHeader::parse(&hbuf);
    header.parent_uuid = parent_uuid;
    header.set_parent_name("parent.vhd");
    let text: Vec<u8> = locator.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let locator_at = len - FOOTER_SIZE;
    header.parent_locators[0] = ParentLocator {
        platform_code: PLATFORM_W2RU,
        data_space: 512,
        data_length: text.len() as u32,
        data_offset: locator_at,
    };
    let mut sector = vec![0u8; 512];
    sector[..text.len()].copy_from_slice(&text);
    f.write_all_at(&sector, locator_at).unwrap();
    f.write_all_at(&header.to_bytes(), footer.data_offset)
        .unwrap();
    f.write_all_at(&footer.to_bytes(), 0).unwrap();
    f.write_all_at(&footer.to_bytes(), locator_at + 512)
        .unwrap();
}

#[test]
fn differencing_disk_reads_through_to_its_parent() {
    let dir = tempdir();
    let size = 8 * MIB;
    let parent = p(dir.path(), "parent.vhd");
    qemu_img(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "force_size=on",
        path_str(&parent),
        "8M",
    ]);
    qemu_io("vpc", &parent, &["write -P 0xaa 0 8M"]);
    let parent_uuid = {
        let bytes = std::fs::read(&parent).unwrap();
        Footer::parse(&bytes[..512]).uuid
    };

    // The child: data in blocks 0 and 2; block 0's bitmap then marks only its second half
    // present, so the first half comes from the parent.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let child = sub.join("child.vhd");
    let w = VhdWriter::create(&child, size, &mut opts("force_size=on")).unwrap();
    w.write_at(&vec![0x11; 2 * MIB as usize], 0).unwrap();
    w.write_at(&vec![0x22; 3000], 4 * MIB + 512).unwrap();
    Box::new(w).finish().unwrap();
    make_differencing(&child, parent_uuid, "..\\parent.vhd");
    let block0 = {
        let img = std::fs::read(&child).unwrap();
        let header = DynamicHeader::parse(&img[512..1536]);
        let at = header.table_offset as usize;
        let e = u32::from_be_bytes(img[at..at + 4].try_into().unwrap());
        assert_ne!(e, UNALLOCATED);
        u64::from(e) * 512
    };
    let mut bitmap = vec![0u8; bitmap_size(2 * MIB) as usize];
    bitmap[256..].fill(0xff);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&child)
        .unwrap()
        .write_all_at(&bitmap, block0)
        .unwrap();

    let mut expected = vec![0xaau8; size as usize];
    expected[MIB as usize..2 * MIB as usize].fill(0x11);
    let start = (4 * MIB + 512) as usize;
    expected[start..start + 3000].fill(0x22);
    // The rest of the child's allocated block 2 is present in the child and reads as zeros.
    expected[4 * MIB as usize..start].fill(0);
    expected[start + 3000..6 * MIB as usize].fill(0);

    // The parent lies in the directory above: allowed, so that the only warning possible is
    // about the parent's identity.
    let image = open_with(&child, &OpenOptions::default(), ImplicitOpens::Allow).unwrap();
    assert!(
        image.info().warnings.is_empty(),
        "{:?}",
        image.info().warnings
    );
    assert_eq!(read_all(image.as_ref()), expected);
    let info = image.info();
    assert_eq!(info.backing_filename.as_deref(), Some("..\\parent.vhd"));
    assert_eq!(info.backing_filename_format.as_deref(), Some("vpc"));
    assert_eq!(
        info.format_specific.unwrap()["data"]["subformat"],
        "differencing"
    );
    let depths: Vec<(u64, u32)> = Extents::new(image.as_ref(), 0, size)
        .map(|e| e.unwrap())
        .map(|e| (e.start, e.depth))
        .collect();
    assert_eq!(depths[0], (0, 1));
    assert!(depths.contains(&(MIB, 0)));

    // A parent with another UUID is still used, with a warning.
    make_differencing(&child, [7; 16], "..\\parent.vhd");
    let image = open_with(&child, &OpenOptions::default(), ImplicitOpens::Allow).unwrap();
    assert!(image.info().warnings[0].contains("UUID"));

    // A locator naming a missing file falls back to the parent name, which is relative to
    // the child's directory: here it names nothing either, so opening fails clearly.
    make_differencing(&child, parent_uuid, "gone.vhd");
    let err = open(&child, &OpenOptions::default()).err().unwrap();
    assert!(err.to_string().contains("gone.vhd"), "{err}");
}

fn corrupt_copy(src: &Path, dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut bytes = std::fs::read(src).unwrap();
    edit(&mut bytes);
    let out = p(dir, name);
    std::fs::write(&out, bytes).unwrap();
    path_str(&out).to_string()
}

fn open_err(path: &str) -> Error {
    open(Path::new(path), &OpenOptions::default())
        .err()
        .expect("must fail")
}

#[test]
fn hostile_vhds_fail_cleanly() {
    let dir = tempdir();
    let good = p(dir.path(), "good.vhd");
    qemu_img(&["create", "-f", "vpc", path_str(&good), "8M"]);
    qemu_io("vpc", &good, &["write -P 0x5a 0 3M"]);
    let bytes = std::fs::read(&good).unwrap();
    let len = bytes.len();
    let header = DynamicHeader::parse(&bytes[512..1536]);
    let bat = header.table_offset as usize;
    let edit_header = |b: &mut Vec<u8>, f: &dyn Fn(&mut DynamicHeader)| {
        let mut h = DynamicHeader::parse(&b[512..1536]);
        f(&mut h);
        b[512..1536].copy_from_slice(&h.to_bytes());
    };

    // Both footers damaged: checksum error.
    let path = corrupt_copy(&good, dir.path(), "sum.vhd", |b| {
        b[100] ^= 1;
        b[len - 412] ^= 1;
    });
    let e = open_err(&path);
    assert!(
        matches!(e, Error::Corrupt { .. }) && e.to_string().contains("checksum"),
        "{e}"
    );

    // Only the end footer damaged: opens from the copy with a warning; check -r repairs it.
    let path = corrupt_copy(&good, dir.path(), "end.vhd", |b| b[len - 412] ^= 1);
    let img = open_vhd(Path::new(&path));
    assert!(img.info().warnings[0].contains("copy at offset 0"));
    let r = vhd::check(Path::new(&path), Some(Repair::All)).unwrap();
    assert_eq!((r.corruptions, r.corruptions_fixed), (1, 1));
    assert_eq!(vhd::check(Path::new(&path), None).unwrap().exit_code(), 0);

    // Header checksum.
    let path = corrupt_copy(&good, dir.path(), "hdr.vhd", |b| b[600] ^= 1);
    assert!(open_err(&path).to_string().contains("dynamic disk header"));

    // A BAT entry pointing past the end of the file: open fails naming the entry; check
    // reports it and -r all clears it.
    let path = corrupt_copy(&good, dir.path(), "bat.vhd", |b| {
        b[bat + 4..bat + 8].copy_from_slice(&0x0100_0000u32.to_be_bytes())
    });
    let e = open_err(&path);
    assert!(e.to_string().contains("allocation table entry"), "{e}");
    let r = vhd::check(Path::new(&path), None).unwrap();
    assert_eq!(r.exit_code(), 2, "{:?}", r.messages);
    vhd::check(Path::new(&path), Some(Repair::All)).unwrap();
    assert_eq!(vhd::check(Path::new(&path), None).unwrap().exit_code(), 0);
    open_vhd(Path::new(&path));

    // A BAT entry pointing into the header: check reports the overlap.
    let path = corrupt_copy(&good, dir.path(), "overlap.vhd", |b| {
        b[bat..bat + 4].copy_from_slice(&1u32.to_be_bytes())
    });
    let r = vhd::check(Path::new(&path), None).unwrap();
    assert!(r.corruptions >= 1 && r.messages.iter().any(|m| m.contains("overlaps")));

    // A huge max_table_entries costs nothing: only the entries the size needs are read.
    let path = corrupt_copy(&good, dir.path(), "entries.vhd", |b| {
        edit_header(b, &|h| h.max_table_entries = u32::MAX)
    });
    assert_eq!(
        read_all(open_vhd(Path::new(&path)).as_ref()),
        read_all(open_vhd(&good).as_ref())
    );

    // Too few entries for the size, and a block size that is not a power of two.
    for (name, f) in [
        (
            "few.vhd",
            &(|h: &mut DynamicHeader| h.max_table_entries = 1) as &dyn Fn(&mut DynamicHeader),
        ),
        ("bs.vhd", &|h: &mut DynamicHeader| h.block_size = 3 << 20),
        ("bat-off.vhd", &|h: &mut DynamicHeader| {
            h.table_offset = u64::MAX - 2
        }),
    ] {
        let path = corrupt_copy(&good, dir.path(), name, |b| edit_header(b, f));
        assert!(matches!(open_err(&path), Error::Corrupt { .. }), "{name}");
    }

    // A parent locator claiming bytes at the end of the address space: check stays in the file.
    let path = corrupt_copy(&good, dir.path(), "locator.vhd", |b| {
        edit_header(b, &|h| {
            h.parent_locators[0] = ParentLocator {
                platform_code: PLATFORM_W2RU,
                data_space: 1,
                data_length: 512,
                data_offset: u64::MAX - 10,
            }
        })
    });
    let r = vhd::check(Path::new(&path), Some(Repair::All)).unwrap();
    assert!(r.image_end_offset.unwrap() <= len as u64 + 512);

    // An absurd size in a footer sized by current_size.
    let path = corrupt_copy(&good, dir.path(), "size.vhd", |b| {
        let mut f = Footer::parse(&b[..512]);
        f.creator_app = *b"win ";
        f.current_size = u64::MAX;
        let fb = f.to_bytes();
        b[..512].copy_from_slice(&fb);
        b[len - 512..].copy_from_slice(&fb);
    });
    assert!(open_err(&path).to_string().contains("2040 GiB"));

    // Truncated in the middle of a block, and to nothing but the first sector.
    for (name, cut) in [("trunc.vhd", len - 600_000), ("tiny.vhd", 300)] {
        let path = corrupt_copy(&good, dir.path(), name, |b| b.truncate(cut));
        let e = open(
            Path::new(&path),
            &OpenOptions {
                format: Some(Format::Vhd),
                ..OpenOptions::default()
            },
        )
        .err()
        .unwrap();
        assert!(matches!(e, Error::Corrupt { .. }), "{name}: {e}");
    }
    // The CLI prints the error and exits 2.
    let (code, _, err) = diskkit(&[
        "info",
        "-f",
        "vpc",
        &p(dir.path(), "tiny.vhd").to_string_lossy(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("VHD footer"), "{err}");
}

#[test]
fn resize_fixed_and_dynamic() {
    let dir = tempdir();
    for spec in ["subformat=fixed", "", "force_size=on"] {
        let img = p(dir.path(), "r.vhd");
        let w = VhdWriter::create(&img, 6 * MIB, &mut opts(spec)).unwrap();
        w.write_at(&vec![0x77; 6 * MIB as usize], 0).unwrap();
        let size = w.virtual_size();
        Box::new(w).finish().unwrap();

        let e = vhd::resize(&img, 3 * MIB, false).unwrap_err();
        assert!(e.to_string().contains("shrink"), "{e}");
        let r = vhd::resize(&img, 3 * MIB, true).unwrap();
        assert!(r.virtual_size >= 3 * MIB && r.virtual_size < 3 * MIB + 64 * 1024);
        // Dynamic disks store only the 6 MiB written; fixed ones store their whole size.
        let stored = if spec.contains("fixed") {
            size
        } else {
            6 * MIB
        };
        assert_eq!(r.discarded_bytes, stored - r.virtual_size, "{spec}");
        assert_eq!(qemu_virtual_size(&img), r.virtual_size);

        // Growing back shows zeros past the cut, in qemu's view and ours.
        let grown = vhd::resize(&img, 4 * MIB, false).unwrap();
        assert_eq!(qemu_virtual_size(&img), grown.virtual_size);
        let guest = qemu_vpc_bytes(&img, dir.path());
        let cut = r.virtual_size as usize;
        assert!(guest[..cut].iter().all(|&b| b == 0x77), "{spec}");
        assert!(guest[cut..].iter().all(|&b| b == 0), "{spec}");
        assert_eq!(read_all(open_vhd(&img).as_ref()), guest);
        assert_eq!(vhd::check(&img, None).unwrap().exit_code(), 0);
    }
    // A dynamic disk's BAT grows in place up to the first block: our writer leaves room for 512
    // entries (block data is 4 KiB-aligned), i.e. 1 GiB.
    let img = p(dir.path(), "d.vhd");
    let w = VhdWriter::create(&img, 4 * MIB, &mut opts("force_size=on")).unwrap();
    w.write_at(&[1], 0).unwrap();
    Box::new(w).finish().unwrap();
    assert_eq!(
        vhd::resize(&img, 900 * MIB, false).unwrap().virtual_size,
        900 * MIB
    );
    assert_eq!(qemu_virtual_size(&img), 900 * MIB);
    assert_eq!(vhd::check(&img, None).unwrap().exit_code(), 0);
    let e = vhd::resize(&img, 2 << 30, false).unwrap_err();
    assert!(e.to_string().contains("room for 512 entries"), "{e}");
}

#[test]
fn qemu_writes_into_images_diskkit_made() {
    let dir = tempdir();
    // An empty dynamic disk, and one shrunk so that blocks were dropped from its end: qemu
    // appends new blocks at the footer, which must not sit on stale bytes.
    let empty = p(dir.path(), "empty.vhd");
    let w = VhdWriter::create(&empty, 8 * MIB, &mut opts("force_size=on")).unwrap();
    Box::new(w).finish().unwrap();
    let shrunk = p(dir.path(), "shrunk.vhd");
    let w = VhdWriter::create(&shrunk, 8 * MIB, &mut opts("force_size=on")).unwrap();
    w.write_at(&vec![0x66; 8 * MIB as usize], 0).unwrap();
    Box::new(w).finish().unwrap();
    vhd::resize(&shrunk, 3 * MIB, true).unwrap();
    vhd::resize(&shrunk, 8 * MIB, false).unwrap();
    for img in [&empty, &shrunk] {
        qemu_io(
            "vpc",
            img,
            &["write -P 0x55 5M 4k", "write -P 0x44 100k 1k"],
        );
        let guest = qemu_vpc_bytes(img, dir.path());
        assert_eq!(read_all(open_vhd(img).as_ref()), guest);
        assert!(
            guest[4 * MIB as usize..5 * MIB as usize]
                .iter()
                .all(|&b| b == 0)
        );
        assert_eq!(vhd::check(img, None).unwrap().exit_code(), 0);
    }
}

#[test]
fn fixed_vhd_is_detected_and_old_511_byte_footer_read() {
    let dir = tempdir();
    let img = p(dir.path(), "fixed.vhd");
    qemu_img(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed,force_size=on",
        path_str(&img),
        "4M",
    ]);
    qemu_io("vpc", &img, &["write -P 0x3c 1M 64k"]);
    // qemu probes it as raw; diskkit finds the footer.
    assert!(qemu_img(&["info", path_str(&img)]).contains("file format: raw"));
    assert_eq!(open_vhd(&img).format(), Format::Vhd);
    let guest = qemu_vpc_bytes(&img, dir.path());

    // The same disk with a 511-byte footer (no saved-state byte), as some early tools wrote.
    let mut bytes = std::fs::read(&img).unwrap();
    bytes.pop();
    let old = p(dir.path(), "old.vhd");
    std::fs::write(&old, &bytes).unwrap();
    let image = open_vhd(&old);
    assert_eq!(image.format(), Format::Vhd);
    assert_eq!(read_all(image.as_ref()), guest);
}

#[test]
fn sizes_round_like_qemu() {
    let dir = tempdir();
    let ours = p(dir.path(), "ours.vhd");
    let theirs = p(dir.path(), "theirs.vhd");
    // Small disks (17 sectors per track), 31 and 63 sectors, 255 sectors past ~31.5 GiB, and
    // past the largest CHS geometry (~127 GiB) where only current_size can express the size.
    for size in [
        MIB,
        10 * MIB + 4097,
        300 * MIB + 1,
        (1 << 30) - 512,
        40 << 30,
        (130 << 30) + 7,
    ] {
        for spec in ["force_size=off", "force_size=on"] {
            let w = VhdWriter::create(&ours, size, &mut opts(spec)).unwrap();
            let planned = w.virtual_size();
            Box::new(w).finish().unwrap();
            qemu_create_vpc(&theirs, spec, size);
            let expected = qemu_virtual_size(&theirs);
            assert_eq!(planned, expected, "{size} {spec}");
            assert_eq!(qemu_virtual_size(&ours), expected, "{size} {spec}");
            assert_eq!(open_vhd(&ours).virtual_size(), expected);
        }
    }
}

#[test]
fn cli_convert_measure_check_resize() {
    let dir = tempdir();
    let src = p(dir.path(), "src.qcow2");
    qemu_img(&["create", "-f", "qcow2", path_str(&src), "9M"]);
    qemu_io("qcow2", &src, &as_refs(&mixed_pattern(9 * MIB)));
    for (args, size) in [
        (vec!["-O", "vpc"], None),
        (
            vec!["-O", "vhd", "-o", "subformat=fixed,force_size=on"],
            Some(9 * MIB),
        ),
        (vec!["--target", "azure"], Some(9 * MIB)),
    ] {
        let out = p(dir.path(), "out.vhd");
        let mut cmd = vec!["convert"];
        cmd.extend(&args);
        cmd.extend([path_str(&src), path_str(&out)]);
        diskkit_ok(&cmd);
        qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "vpc",
            path_str(&src),
            path_str(&out),
        ]);
        if let Some(size) = size {
            assert_eq!(qemu_virtual_size(&out), size, "{args:?}");
        }
        let check = diskkit_ok(&["check", "--output", "json", path_str(&out)]);
        let check: serde_json::Value = serde_json::from_str(&check).unwrap();
        assert_eq!(check["corruptions"], 0, "{args:?}");
    }
    let m: serde_json::Value = serde_json::from_str(&diskkit_ok(&[
        "measure",
        "-O",
        "vpc",
        "--output",
        "json",
        path_str(&src),
    ]))
    .unwrap();
    let out = p(dir.path(), "out.vhd");
    diskkit_ok(&["convert", "-O", "vpc", path_str(&src), path_str(&out)]);
    assert_eq!(m["required"], std::fs::metadata(&out).unwrap().len());

    diskkit_ok(&["resize", path_str(&out), "+64M"]);
    assert!(qemu_virtual_size(&out) >= 73 * MIB);
    assert_eq!(diskkit(&["resize", path_str(&out), "4M"]).0, 2);
    diskkit_ok(&["resize", "--shrink", path_str(&out), "4M"]);
    assert!(qemu_virtual_size(&out) >= 4 * MIB && qemu_virtual_size(&out) < 5 * MIB);
    let (code, out_text, _) = diskkit(&["check", path_str(&out)]);
    assert_eq!(code, 0, "{out_text}");
}

/// The last 512 bytes of a file (a fixed VHD's footer).
fn tail_footer(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    bytes[bytes.len() - FOOTER_SIZE as usize..].to_vec()
}

#[test]
fn convert_n_fills_existing_fixed_vhds() {
    let dir = tempdir();
    let size = 8 * MIB;
    let qcow2_src = p(dir.path(), "src.qcow2");
    qemu_img(&["create", "-f", "qcow2", path_str(&qcow2_src), "8M"]);
    qemu_io("qcow2", &qcow2_src, &as_refs(&mixed_pattern(size)));
    let raw_src = mixed_raw(dir.path(), "src.raw", size);
    let by_qemu = p(dir.path(), "qemu.vhd");
    qemu_create_vpc(&by_qemu, "subformat=fixed,force_size=on", size);
    let by_diskkit = p(dir.path(), "diskkit.vhd");
    diskkit_ok(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed,force_size=on",
        path_str(&by_diskkit),
        "8M",
    ]);
    for (src, src_fmt, target) in [
        (&qcow2_src, "qcow2", &by_qemu),
        (&raw_src, "raw", &by_diskkit),
    ] {
        // Old content everywhere: the source's zero ranges must be zeroed, not skipped.
        qemu_io("vpc", target, &["write -P 0x5a 0 8M"]);
        let footer = tail_footer(target);
        let len = std::fs::metadata(target).unwrap().len();
        diskkit_ok(&[
            "convert",
            "-n",
            "-O",
            "vpc",
            path_str(src),
            path_str(target),
        ]);
        let out = qemu_img(&[
            "compare",
            "-f",
            src_fmt,
            "-F",
            "vpc",
            path_str(src),
            path_str(target),
        ]);
        assert!(out.contains("identical"), "{out}");
        assert_eq!(qemu_virtual_size(target), size);
        assert_eq!(std::fs::metadata(target).unwrap().len(), len);
        assert_eq!(tail_footer(target), footer);
        let image = open_vhd(target);
        assert_eq!(image.virtual_size(), size);
        assert_eq!(read_all(image.as_ref()), qemu_guest_bytes(src, dir.path()));
        assert_eq!(vhd::check(target, None).unwrap().exit_code(), 0);
    }

    // Dynamic disks and targets smaller than the source are refused, and left untouched.
    let dynamic = p(dir.path(), "dynamic.vhd");
    qemu_create_vpc(&dynamic, "subformat=dynamic,force_size=on", size);
    let small = p(dir.path(), "small.vhd");
    qemu_create_vpc(&small, "subformat=fixed,force_size=on", 4 * MIB);
    let dynamic_refusal = format!(
        "{}: unsupported: writing into a dynamic VHD",
        dynamic.display()
    );
    for (target, why) in [(&dynamic, dynamic_refusal.as_str()), (&small, "smaller")] {
        let before = std::fs::read(target).unwrap();
        let (code, _, err) = diskkit(&[
            "convert",
            "-n",
            "-O",
            "vpc",
            path_str(&qcow2_src),
            path_str(target),
        ]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(why), "{err}");
        assert_eq!(std::fs::read(target).unwrap(), before);
    }
}

#[test]
fn writer_into_existing_fixed_vhd_keeps_its_footer() {
    let dir = tempdir();
    // A fixed disk with the old 511-byte footer: the data region ends where that footer starts.
    let img = p(dir.path(), "old.vhd");
    qemu_create_vpc(&img, "subformat=fixed,force_size=on", MIB);
    qemu_io("vpc", &img, &["write -P 0x77 0 1M"]);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes.pop();
    std::fs::write(&img, &bytes).unwrap();

    let w = VhdWriter::open_existing(&img).unwrap();
    assert_eq!(w.virtual_size(), MIB);
    assert!(!w.zero_initialized());
    w.write_at(&[0x12; 512], MIB - 512).unwrap();
    assert!(w.write_at(&[0x12; 512], MIB).is_err());
    assert!(w.write_zeroes(MIB - 4096, 8192).is_err());
    w.write_zeroes(4096, 64 << 10).unwrap();
    Box::new(w).finish().unwrap();

    let after = std::fs::read(&img).unwrap();
    assert_eq!(after.len(), bytes.len());
    assert_eq!(after[MIB as usize..], bytes[MIB as usize..]);
    let guest = read_all(open_vhd(&img).as_ref());
    assert!(guest[..4096].iter().all(|&b| b == 0x77));
    assert!(guest[4096..(68 << 10)].iter().all(|&b| b == 0));
    assert!(
        guest[(68 << 10)..(MIB - 512) as usize]
            .iter()
            .all(|&b| b == 0x77)
    );
    assert!(guest[(MIB - 512) as usize..].iter().all(|&b| b == 0x12));
}

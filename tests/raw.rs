//! Raw images: guest view, sparse map and compare against qemu.

mod common;
use common::*;

#[test]
fn raw_guest_view_map_and_info_match_qemu() {
    let dir = tempdir();
    // A size that is not a multiple of 512 must work too.
    for size in [16u64 << 20, (9 << 20) + 333] {
        let img = p(dir.path(), &format!("img-{size}.raw"));
        qemu_img(&["create", "-f", "raw", path_str(&img), &size.to_string()]);
        qemu_io("raw", &img, &as_refs(&mixed_pattern(size & !4095)));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(size)
            .unwrap();

        let info: serde_json::Value =
            serde_json::from_str(&diskkit_ok(&["info", "--output", "json", path_str(&img)]))
                .unwrap();
        assert_eq!(info["format"], "raw");
        // qemu's rule: a disk of whole 512-byte sectors, the missing tail reading as zeros.
        let qemu_info: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output", "json", path_str(&img)])).unwrap();
        let guest_size = size.next_multiple_of(512);
        assert_eq!(qemu_info["virtual-size"], guest_size);
        assert_eq!(info["virtual-size"], guest_size);

        // Every range the map calls zero reads as zero in qemu's view.
        let guest = qemu_guest_bytes(&img, dir.path());
        let map: Vec<serde_json::Value> =
            serde_json::from_str(&diskkit_ok(&["map", "--output", "json", path_str(&img)]))
                .unwrap();
        let mut covered = 0;
        for e in &map {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            assert_eq!(start, covered);
            covered += len;
            if e["zero"] == true {
                assert!(
                    guest[start as usize..(start + len) as usize]
                        .iter()
                        .all(|&b| b == 0)
                );
            }
        }
        assert_eq!(covered, guest_size);
        assert_eq!(guest.len() as u64, guest_size);
        assert!(
            map.iter().any(|e| e["zero"] == true),
            "holes must be mapped"
        );

        // compare: identical to qemu's copy, different after one byte changes.
        let copy = p(dir.path(), "copy.raw");
        std::fs::write(&copy, &guest).unwrap();
        let (code, out, _) = diskkit(&["compare", path_str(&img), path_str(&copy)]);
        assert_eq!(code, 0, "{out}");
        qemu_io("raw", &copy, &["write -P 0x99 5000000 1"]);
        let (code, out, _) = diskkit(&["compare", path_str(&img), path_str(&copy)]);
        assert_eq!(code, 1);
        assert!(out.contains("5000000"), "{out}");
    }
}

#[test]
fn compare_sizes_strict_and_lenient() {
    let dir = tempdir();
    let a = p(dir.path(), "a.raw");
    let b = p(dir.path(), "b.raw");
    qemu_img(&["create", "-f", "raw", path_str(&a), "8M"]);
    qemu_img(&["create", "-f", "raw", path_str(&b), "12M"]);
    qemu_io("raw", &a, &["write -P 0x5a 1M 4k"]);
    qemu_io("raw", &b, &["write -P 0x5a 1M 4k"]);
    assert_eq!(diskkit(&["compare", path_str(&a), path_str(&b)]).0, 0);
    assert_eq!(
        diskkit(&["compare", "--strict", path_str(&a), path_str(&b)]).0,
        1
    );
    qemu_io("raw", &b, &["write -P 0x01 10M 1"]);
    let (code, out, _) = diskkit(&["compare", path_str(&a), path_str(&b)]);
    assert_eq!(code, 1);
    assert!(out.contains(&(10u64 << 20).to_string()), "{out}");
}

#[test]
fn missing_file_is_an_error_with_exit_2() {
    let (code, _, err) = diskkit(&["info", "/nonexistent/disk.img"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
}

/// A raw source streamed as every format that streams: parts produced in any order assemble
/// into a file that qemu reads as the source.
#[test]
fn streams_of_a_raw_source_read_like_it_in_qemu() {
    use diskkit::formats::image::GuestRange;
    use diskkit::formats::write::CreateOptions;
    use diskkit::formats::{Extents, Format, OpenOptions, open, stream};
    let dir = tempdir();
    let size = (8 << 20) + 3 * 512;
    let src = mixed_raw(dir.path(), "src.raw", size);
    let image = open(&src, &OpenOptions::default()).unwrap();
    for (format, options, compress) in [
        (Format::Raw, "", false),
        (Format::Vhd, "subformat=fixed", false),
        (Format::Vhd, "subformat=dynamic", false),
        (Format::Qcow2, "", false),
        (Format::Qcow2, "", true),
    ] {
        let mut opts = CreateOptions {
            compress,
            ..Default::default()
        };
        opts.parse_options(options).unwrap();
        let mut allocated = Extents::new(image.as_ref(), 0, size)
            .filter(|e| !e.as_ref().is_ok_and(|e| e.is_zero()))
            .map(|e| e.map(|e| GuestRange::new(e.start, e.end())));
        let s = stream(image.as_ref(), format, &mut opts, &mut allocated, &|_| {}).unwrap();
        assert_eq!(s.format(), format);
        let mut file = vec![0u8; s.size() as usize];
        let part = 777_777;
        for start in (0..file.len()).step_by(part).rev() {
            let end = (start + part).min(file.len());
            s.read_at(&mut file[start..end], start as u64).unwrap();
        }
        assert!(s.read_at(&mut [0], s.size()).is_err());
        let out = p(dir.path(), &format!("out-{format}-{compress}"));
        std::fs::write(&out, &file).unwrap();
        let name = format.name();
        let what = format!("{name} {options} compress={compress}");
        let guest = p(dir.path(), "guest.raw");
        qemu_img(&[
            "convert",
            "-f",
            name,
            "-O",
            "raw",
            path_str(&out),
            path_str(&guest),
        ]);
        let guest = std::fs::read(&guest).unwrap();
        assert_eq!(
            guest[..size as usize],
            std::fs::read(&src).unwrap()[..],
            "{what}"
        );
        assert!(guest[size as usize..].iter().all(|&b| b == 0), "{what}");
        if format == Format::Qcow2 {
            qemu_img(&["check", "-f", name, path_str(&out)]);
        }
    }
    let mut opts = CreateOptions {
        compress: true,
        ..Default::default()
    };
    let err = stream(
        image.as_ref(),
        Format::Vhd,
        &mut opts,
        &mut std::iter::empty(),
        &|_| {},
    );
    assert!(err.is_err());
    // A format diskkit only reads has no stream.
    let err = stream(
        image.as_ref(),
        Format::Vhdx,
        &mut CreateOptions::default(),
        &mut std::iter::empty(),
        &|_| {},
    );
    assert!(err.is_err());
}

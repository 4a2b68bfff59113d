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
        assert_eq!(info["virtual-size"], size);

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
        assert_eq!(covered, size);
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

//! `diskkit hash`: one digest per guest content whatever the format, checked against a plain
//! reference implementation of the definition; manifests, --check, stdin, sparse images.

mod common;
use common::*;
use diskkit::formats::digest::{Algorithm, DEFAULT_CHUNK_SIZE, Manifest};
use diskkit::formats::{Extent, Format, Image, ImageInfo, OpenOptions, Result, open};
use diskkit::hash::hash_image;
use diskkit::progress::NoProgress;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

const MIB: u64 = 1 << 20;

/// The hash function of a definition, from its reference crate.
fn reference_hash(algorithm: Algorithm, data: &[u8]) -> [u8; 32] {
    match algorithm {
        Algorithm::Sha256 => Sha256::digest(data).into(),
        Algorithm::Blake3 => *blake3::hash(data).as_bytes(),
    }
}

/// The SHA-256 digest definition computed the straightforward way, independent of the engine:
/// `chunk_sha(offset, length)` gives the SHA-256 of each chunk in turn.
fn reference_digest(
    chunk_size: u64,
    size: u64,
    chunk_sha: impl FnMut(u64, u64) -> [u8; 32],
) -> String {
    reference_digest_by(Algorithm::Sha256, chunk_size, size, chunk_sha)
}

/// [`reference_digest`] of either definition, `chunk_hash` by its hash function.
fn reference_digest_by(
    algorithm: Algorithm,
    chunk_size: u64,
    size: u64,
    mut chunk_hash: impl FnMut(u64, u64) -> [u8; 32],
) -> String {
    let tag: &[u8] = match algorithm {
        Algorithm::Sha256 => b"diskkit-guest-sha256-v1",
        Algorithm::Blake3 => b"diskkit-guest-blake3-v1",
    };
    let mut input = tag.to_vec();
    input.extend(chunk_size.to_le_bytes());
    let mut offset = 0;
    while offset < size {
        let len = chunk_size.min(size - offset);
        input.extend(chunk_hash(offset, len));
        offset += len;
    }
    input.extend(size.to_le_bytes());
    reference_hash(algorithm, &input)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The reference digest of a raw file, reading every byte.
fn reference_digest_of_file(path: &Path, chunk_size: u64) -> String {
    reference_digest_of_file_by(Algorithm::Sha256, path, chunk_size)
}

fn reference_digest_of_file_by(algorithm: Algorithm, path: &Path, chunk_size: u64) -> String {
    let bytes = std::fs::read(path).unwrap();
    reference_digest_by(algorithm, chunk_size, bytes.len() as u64, |o, l| {
        reference_hash(algorithm, &bytes[o as usize..(o + l) as usize])
    })
}

/// The digest `diskkit hash` prints for `path` with extra `args`.
fn diskkit_digest(path: &Path, args: &[&str]) -> String {
    let mut all = vec!["hash"];
    all.extend_from_slice(args);
    all.push(path_str(path));
    let out = diskkit_ok(&all);
    let (digest, name) = out.trim_end().split_once("  ").expect("DIGEST  NAME");
    assert_eq!(name, path_str(path));
    digest.to_string()
}

/// The digest of `path` hashed as a raw stream on stdin.
fn diskkit_stdin_digest(path: &Path) -> String {
    let out = Command::new(diskkit_bin())
        .args(["hash", "-"])
        .stdin(Stdio::from(std::fs::File::open(path).unwrap()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.ends_with("  -\n"), "{text}");
    text[..64].to_string()
}

#[test]
fn same_content_same_digest_in_every_format() {
    let dir = tempdir();
    let size = 20 * MIB + 64 * 1024; // a short last chunk
    let raw = mixed_raw(dir.path(), "mixed.raw", size);
    let expected = reference_digest_of_file(&raw, DEFAULT_CHUNK_SIZE);
    assert_eq!(diskkit_digest(&raw, &[]), expected);
    assert_eq!(diskkit_stdin_digest(&raw), expected);

    // The same guest content in other layouts and formats, made by qemu-img; a manifest of the
    // raw image checks every one of them.
    let manifest = p(dir.path(), "raw.manifest.json");
    diskkit_ok(&["hash", "--manifest", path_str(&manifest), path_str(&raw)]);
    let variants: &[(&str, &[&str])] = &[
        // Every byte written: no holes for the map to skip.
        ("dense.raw", &["-O", "raw", "-S", "0"]),
        ("plain.qcow2", &["-O", "qcow2"]),
        ("zlib.qcow2", &["-O", "qcow2", "-c"]),
        (
            "zstd.qcow2",
            &["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
        ),
        (
            "small-clusters.qcow2",
            &["-O", "qcow2", "-o", "cluster_size=4096"],
        ),
        (
            "fixed.vhd",
            &["-O", "vpc", "-o", "subformat=fixed,force_size=on"],
        ),
        (
            "dynamic.vhd",
            &["-O", "vpc", "-o", "subformat=dynamic,force_size=on"],
        ),
        ("disk.vmdk", &["-O", "vmdk"]),
        ("disk.vhdx", &["-O", "vhdx"]),
    ];
    for (name, convert_args) in variants {
        let img = p(dir.path(), name);
        let mut args = vec!["convert", "-f", "raw"];
        args.extend_from_slice(convert_args);
        args.extend([path_str(&raw), path_str(&img)]);
        qemu_img(&args);
        assert_eq!(diskkit_digest(&img, &[]), expected, "{name}");
        let (code, out, err) = diskkit(&["hash", "--check", path_str(&manifest), path_str(&img)]);
        assert_eq!(code, 0, "{name}: {out}{err}");
    }

    // Other chunk sizes give other digests, each as the definition says.
    for chunk in [4096u64, 64 * MIB] {
        let flag = format!("--chunk-size={chunk}");
        assert_eq!(
            diskkit_digest(&raw, &[&flag]),
            reference_digest_of_file(&raw, chunk),
            "{chunk}"
        );
    }
}

#[test]
fn backing_chain_hashes_as_its_guest_view() {
    let dir = tempdir();
    let base = mixed_raw(dir.path(), "mixed.raw", 12 * MIB);
    let middle = p(dir.path(), "middle.qcow2");
    let top = p(dir.path(), "top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        path_str(&base),
        "-F",
        "raw",
        path_str(&middle),
    ]);
    qemu_io(
        "qcow2",
        &middle,
        &["write -P 0x55 1M 64k", "write -z 0 32k"],
    );
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        path_str(&middle),
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    // Data over a hole, zeros over data of the layer below, data at the end.
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x66 7M 4k",
            "write -z 1M 4k",
            "write -P 0x77 11M 1M",
        ],
    );
    let flat = p(dir.path(), "flat.raw");
    std::fs::write(&flat, qemu_guest_bytes(&top, dir.path())).unwrap();
    let expected = reference_digest_of_file(&flat, MIB);
    assert_eq!(diskkit_digest(&top, &["--chunk-size", "1M"]), expected);
    assert_ne!(diskkit_digest(&middle, &["--chunk-size", "1M"]), expected);
}

#[test]
fn one_changed_byte_is_found_by_check() {
    let dir = tempdir();
    let raw = mixed_raw(dir.path(), "mixed.raw", 16 * MIB);
    let manifest = p(dir.path(), "disk.manifest.json");
    let out = diskkit_ok(&[
        "hash",
        "--chunk-size",
        "1M",
        "--manifest",
        path_str(&manifest),
        path_str(&raw),
    ]);
    let (code, out_ok, _) = diskkit(&["hash", "--check", path_str(&manifest), path_str(&raw)]);
    assert_eq!(
        (code, out_ok.as_str()),
        (0, format!("{}: OK\n", path_str(&raw)).as_str())
    );
    let qcow2 = p(dir.path(), "disk.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-c",
        path_str(&raw),
        path_str(&qcow2),
    ]);

    // A byte changes in a hole (chunk 6) of the raw image and in compressed data (chunk 1) of the
    // qcow2 image: only that chunk differs, and the digest changes.
    for (img, fmt, chunk) in [(&raw, "raw", 6), (&qcow2, "qcow2", 1)] {
        let offset = chunk * MIB + 12345;
        qemu_io(fmt, img, &[&format!("write -P 0x77 {offset} 1")]);
        assert_ne!(
            diskkit_digest(img, &["--chunk-size", "1M"]),
            out[..64].to_string()
        );
        let (code, out, _) = diskkit(&["hash", "--check", path_str(&manifest), path_str(img)]);
        assert_eq!(code, 1, "{out}");
        let differs: Vec<&str> = out.lines().filter(|l| l.contains("differs")).collect();
        assert_eq!(
            differs,
            [format!("chunk {chunk} at offset {}: differs", chunk * MIB)]
        );
        assert!(out.contains("FAILED (1 of 16 chunks differ)"), "{out}");
    }

    // A different size with data past the manifest's end is named as such.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(17 * MIB)
        .unwrap();
    qemu_io("raw", &raw, &[&format!("write -P 0x01 {} 1", 16 * MIB + 5)]);
    let (code, out, _) = diskkit(&["hash", "--check", path_str(&manifest), path_str(&raw)]);
    assert_eq!(code, 1);
    assert!(out.contains("virtual size 17825792 differs"), "{out}");
    assert!(
        out.contains("data at offset 16777221, past the manifest's end"),
        "{out}"
    );

    // A damaged manifest is an error, not a mismatch.
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replacen("\"length\": 1048576", "\"length\": 7", 1),
    )
    .unwrap();
    let (code, _, err) = diskkit(&["hash", "--check", path_str(&manifest), path_str(&raw)]);
    assert_eq!(code, 2);
    assert!(err.contains("inconsistent"), "{err}");
}

/// A VHD whose size qemu rounded up to a CHS geometry holds the same disk as its source
/// (`compare` says identical): `--check` says so, with its own exit code, in both directions.
#[test]
fn check_tells_zeros_added_at_the_end_from_other_content() {
    let dir = tempdir();
    let raw = mixed_raw(dir.path(), "src.raw", 16 * MIB);
    let vhd = p(dir.path(), "rounded.vhd");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        path_str(&raw),
        path_str(&vhd),
    ]);
    let vhd_size = 16 * MIB + 4096;
    assert!(qemu_img(&["info", path_str(&vhd)]).contains(&format!("({vhd_size} bytes)")));
    assert_eq!(diskkit(&["compare", path_str(&raw), path_str(&vhd)]).0, 0);
    let raw_manifest = p(dir.path(), "raw.json");
    let vhd_manifest = p(dir.path(), "vhd.json");
    diskkit_ok(&[
        "hash",
        "--manifest",
        path_str(&raw_manifest),
        path_str(&raw),
    ]);
    diskkit_ok(&[
        "hash",
        "--manifest",
        path_str(&vhd_manifest),
        path_str(&vhd),
    ]);
    for (manifest, image, how, sizes) in [
        (&raw_manifest, &vhd, "added at", (vhd_size, 16 * MIB)),
        (&vhd_manifest, &raw, "missing from", (16 * MIB, vhd_size)),
    ] {
        let (code, out, err) = diskkit(&["hash", "--check", path_str(manifest), path_str(image)]);
        assert_eq!(code, 3, "{out}{err}");
        assert_eq!(
            out,
            format!(
                "{}: SAME CONTENT, 4096 zero bytes {how} the end (virtual size {}, the \
                 manifest's {}: a VHD geometry or sector rounding)\n",
                path_str(image),
                sizes.0,
                sizes.1
            )
        );
    }
    // Data in the last, short chunk of the smaller disk is a difference, not padding.
    qemu_io(
        "vpc",
        &vhd,
        &[&format!("write -P 0x05 {} 512", 16 * MIB - 512)],
    );
    let (code, out, _) = diskkit(&["hash", "--check", path_str(&raw_manifest), path_str(&vhd)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAILED (1 of 4 chunks differ; virtual size"),
        "{out}"
    );
}

/// `--check` reads its own `DIGEST  NAME` output back, as `sha256sum -c`.
#[test]
fn check_reads_a_digest_list() {
    let dir = tempdir();
    let a = mixed_raw(dir.path(), "a.raw", 8 * MIB);
    let b = p(dir.path(), "b.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        path_str(&a),
        path_str(&b),
    ]);
    let list = p(dir.path(), "SUMS");
    std::fs::write(&list, diskkit_ok(&["hash", path_str(&a), path_str(&b)])).unwrap();
    let (code, out, _) = diskkit(&["hash", "--check", path_str(&list)]);
    let ok = format!("{}: OK\n{}: OK\n", path_str(&a), path_str(&b));
    assert_eq!((code, out.as_str()), (0, ok.as_str()));

    qemu_io("qcow2", &b, &["write -P 0x09 4096 1"]);
    let (code, out, err) = diskkit(&["hash", "--check", path_str(&list)]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        out,
        format!("{}: OK\n{}: FAILED\n", path_str(&a), path_str(&b))
    );
    assert!(err.contains("1 computed digest(s) did NOT match"), "{err}");

    std::fs::remove_file(&a).unwrap();
    let (code, out, err) = diskkit(&["hash", "--check", path_str(&list)]);
    assert_eq!(code, 2);
    assert!(out.starts_with(&format!("{}: FAILED open or read\n", path_str(&a))));
    assert!(err.contains(path_str(&a)), "{err}");

    std::fs::write(&list, "0123  a.raw\n").unwrap();
    let (code, _, err) = diskkit(&["hash", "--check", path_str(&list)]);
    assert_eq!(code, 2);
    assert!(err.contains("line 1: not a `DIGEST  NAME` line"), "{err}");
}

/// `diskkit-guest-blake3-v1`: the SHA-256 definition's shape with BLAKE3, computed plainly here;
/// the same for every format and for stdin; manifests name it and check images with it.
#[test]
fn blake3_digest_follows_its_definition() {
    let dir = tempdir();
    let size = 9 * MIB + 4096;
    let raw = mixed_raw(dir.path(), "mixed.raw", size);
    let expected = reference_digest_of_file_by(Algorithm::Blake3, &raw, DEFAULT_CHUNK_SIZE);
    assert_eq!(diskkit_digest(&raw, &["-a", "blake3"]), expected);
    assert_ne!(diskkit_digest(&raw, &[]), expected);
    let qcow2 = p(dir.path(), "disk.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        path_str(&raw),
        path_str(&qcow2),
    ]);
    assert_eq!(diskkit_digest(&qcow2, &["--algorithm=blake3"]), expected);
    let out = Command::new(diskkit_bin())
        .args(["hash", "-a", "blake3", "-"])
        .stdin(std::fs::File::open(&raw).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{expected}  -\n")
    );

    // A manifest of the raw image: BLAKE3 chunk records, and it checks the qcow2 image.
    let manifest = p(dir.path(), "m.json");
    diskkit_ok(&[
        "hash",
        "-a",
        "blake3",
        "--manifest",
        path_str(&manifest),
        path_str(&raw),
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    assert_eq!(
        (&json["definition"], &json["algorithm"], &json["digest"]),
        (
            &"diskkit-guest-blake3-v1".into(),
            &"blake3".into(),
            &expected.clone().into()
        )
    );
    let bytes = std::fs::read(&raw).unwrap();
    let first = blake3::hash(&bytes[..DEFAULT_CHUNK_SIZE as usize])
        .to_hex()
        .to_string();
    assert_eq!(json["chunks"][0]["blake3"], first);
    assert!(json["chunks"][0].get("sha256").is_none());
    let (code, out, err) = diskkit(&["hash", "--check", path_str(&manifest), path_str(&qcow2)]);
    assert_eq!(code, 0, "{out}{err}");
    // The manifest's algorithm is the check's: -a cannot change it.
    let (code, _, err) = diskkit(&[
        "hash",
        "-a",
        "sha256",
        "--check",
        path_str(&manifest),
        path_str(&qcow2),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("algorithm is blake3"), "{err}");
    // A digest list does not say how it was made: checked with other flags, nothing matches,
    // and the warning asks.
    let list = p(dir.path(), "list.txt");
    std::fs::write(&list, format!("{expected}  {}\n", path_str(&raw))).unwrap();
    let (code, out, _) = diskkit(&["hash", "-a", "blake3", "--check", path_str(&list)]);
    assert_eq!((code, out), (0, format!("{}: OK\n", path_str(&raw))));
    let (code, _, err) = diskkit(&["hash", "--check", path_str(&list)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("made with other -a or --chunk-size"), "{err}");
    let (code, _, err) = diskkit(&["hash", "-a", "md5", path_str(&raw)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sha256, blake3"), "{err}");
}

#[test]
fn manifest_round_trip() {
    let dir = tempdir();
    let size = 10 * MIB + 4096;
    let raw = mixed_raw(dir.path(), "mixed.raw", size);
    let manifest_path = p(dir.path(), "m.json");
    let out = diskkit_ok(&[
        "hash",
        "--manifest",
        path_str(&manifest_path),
        path_str(&raw),
    ]);
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    let m = Manifest::from_json(text.as_bytes()).unwrap();
    assert_eq!(m.digest_hex(), out[..64]);
    assert_eq!(m.virtual_size, size);
    assert_eq!(m.format.as_deref(), Some("raw"));
    assert_eq!(m.source.as_deref(), Some(path_str(&raw)));
    assert_eq!(Manifest::from_json(m.to_json().as_bytes()).unwrap(), m);
    // Every chunk record is the SHA-256 and CRC-32 of those bytes.
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(m.chunks.len(), 3);
    for c in &m.chunks {
        let data = &bytes[c.offset as usize..(c.offset + c.length) as usize];
        assert_eq!(c.hash, <[u8; 32]>::from(Sha256::digest(data)));
        assert_eq!(c.crc32, crc32fast::hash(data));
    }
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["algorithm"], "sha256");
    assert_eq!(json["chunks"][2]["length"], 2 * MIB + 4096);
    // Only the manifest is left in the directory: the temporary file was renamed over it.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 2);
    // A FIFO (or device) is never replaced by a manifest.
    let fifo = p(dir.path(), "fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let (code, _, err) = diskkit(&["hash", "--manifest", path_str(&fifo), path_str(&raw)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn several_images_and_errors() {
    let dir = tempdir();
    let raw = mixed_raw(dir.path(), "mixed.raw", 8 * MIB);
    let empty = p(dir.path(), "empty.raw");
    std::fs::write(&empty, b"").unwrap();
    let (code, out, err) = diskkit(&["hash", path_str(&raw), "/nonexistent.img", path_str(&empty)]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent.img"), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[1].starts_with(&reference_digest_of_file(&empty, DEFAULT_CHUNK_SIZE)));
    for bad in ["3M", "2K", "1G"] {
        assert_eq!(diskkit(&["hash", "--chunk-size", bad, path_str(&raw)]).0, 2);
    }
}

/// An image wrapper that counts the guest bytes read through it.
struct CountingImage {
    inner: Box<dyn Image>,
    read: AtomicU64,
}

impl Image for CountingImage {
    fn format(&self) -> Format {
        self.inner.format()
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        self.inner.map(offset, max_len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn info(&self) -> ImageInfo {
        self.inner.info()
    }
}

fn counted(path: &Path) -> CountingImage {
    CountingImage {
        inner: open(path, &OpenOptions::default()).unwrap(),
        read: AtomicU64::new(0),
    }
}

#[test]
fn sparse_terabyte_is_hashed_without_reading() {
    let dir = tempdir();
    let img = p(dir.path(), "huge.raw");
    let size = (1u64 << 40) + 12345;
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    // A raw disk is whole 512-byte sectors, as qemu sees it: the file's tail reads as zeros.
    let size = size.next_multiple_of(512);
    let image = counted(&img);
    let hash = hash_image(
        &image,
        Algorithm::Sha256,
        DEFAULT_CHUNK_SIZE,
        &NoProgress,
        None,
    )
    .unwrap();
    assert_eq!(
        image.read.load(Ordering::Relaxed),
        0,
        "holes must not be read"
    );
    let mut zero_sha = HashMap::new();
    let expected = reference_digest(DEFAULT_CHUNK_SIZE, size, |_, len| {
        *zero_sha
            .entry(len)
            .or_insert_with(|| Sha256::digest(vec![0u8; len as usize]).into())
    });
    let got: String = hash.digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(got, expected);
    assert_eq!(hash.virtual_size, size);

    // With data, only the chunks holding data are read, and the digest still follows the
    // reference read byte by byte.
    let small = mixed_raw(dir.path(), "mixed.raw", 16 * MIB);
    let image = counted(&small);
    let mut chunks = Vec::new();
    let hash = hash_image(
        &image,
        Algorithm::Sha256,
        MIB,
        &NoProgress,
        Some(&mut |c| chunks.push(c)),
    )
    .unwrap();
    let got: String = hash.digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(got, reference_digest_of_file(&small, MIB));
    assert!(image.read.load(Ordering::Relaxed) < 8 * MIB);
    assert_eq!(chunks.len(), 16);
    // Without chunk records (and CRCs), the same digest.
    assert_eq!(
        hash_image(&image, Algorithm::Sha256, MIB, &NoProgress, None).unwrap(),
        hash
    );
}

#[test]
fn snapshot_is_hashed_as_it_was() {
    let dir = tempdir();
    let raw = mixed_raw(dir.path(), "mixed.raw", 8 * MIB);
    let img = p(dir.path(), "snap.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        path_str(&raw),
        path_str(&img),
    ]);
    qemu_img(&["snapshot", "-c", "before", path_str(&img)]);
    qemu_io("qcow2", &img, &["write -P 0x99 0 1M"]);
    let before = diskkit_digest(&raw, &[]);
    assert_eq!(diskkit_digest(&img, &["-l", "before"]), before);
    assert_ne!(diskkit_digest(&img, &[]), before);
}

/// One rule for odd-length raw data: a file and the same bytes on stdin are a disk of whole
/// 512-byte sectors, and hash alike.
#[test]
fn odd_length_stdin_hashes_like_the_file() {
    let dir = tempdir();
    let raw = p(dir.path(), "odd.raw");
    std::fs::write(&raw, vec![0x5a; 4 * MIB as usize + 1000]).unwrap();
    let file = diskkit_digest(&raw, &[]);
    assert_eq!(diskkit_stdin_digest(&raw), file);
    let padded = p(dir.path(), "padded.raw");
    let mut bytes = vec![0x5a; 4 * MIB as usize + 1000];
    bytes.resize(4 * MIB as usize + 1024, 0);
    std::fs::write(&padded, bytes).unwrap();
    assert_eq!(diskkit_stdin_digest(&padded), file);
}

//! Property tests against qemu: random images (data of random and repetitive bytes, data that is
//! zeros, explicit zero ranges, discards, compressed clusters and holes; odd virtual sizes; qcow2
//! cluster sizes from 512 B to 2 MiB; an overlay on a raw or qcow2 base) are built with qemu-img
//! and qemu-io, converted by diskkit to every writable format, and each output must pass
//! `qemu-img check` where qemu checks the format, be identical to the source under
//! `qemu-img compare`, and have the source's guest digest (`diskkit hash`), or, for VHD, which
//! rounds the size up to a CHS geometry, the same content with zeros added (`hash --check`,
//! exit 3).
//!
//! 10 cases by default (10 to 30 s); `PROPTEST_CASES=200 cargo test --test proptest_qemu`
//! runs more. A failing case is shrunk and saved in `proptest-regressions/proptest_qemu.txt`,
//! which is replayed first on every run.

mod common;

use common::{diskkit, path_str, pseudo_random, qemu_img, qemu_io};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

/// What one qemu-io command puts at a guest range.
#[derive(Debug, Clone)]
enum Fill {
    /// Incompressible bytes from a seed.
    Random(u64),
    /// A short pattern repeated (compressible).
    Repeat(Vec<u8>),
    /// Zero bytes written as data.
    ZeroData,
    /// `write -z`: an explicit zero range (zero clusters in qcow2, holes in raw).
    Zeroes,
    /// `discard`: the range deallocated (a backing file shows through in an overlay).
    Discard,
    /// `write -c` of whole clusters (qcow2 only; other images get repetitive data instead).
    Compressed(u64),
}

#[derive(Debug, Clone)]
struct Write {
    /// Fractions of the virtual size, so a write stays inside any size the case picks.
    at: u64,
    len: u64,
    fill: Fill,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Any byte count: qemu reads a raw file of any size.
    Raw,
    /// `cluster_bits` from 9 (512 B) to 21 (2 MiB); sizes in whole sectors.
    Qcow2 { cluster_bits: u32 },
}

#[derive(Debug, Clone)]
struct Layer {
    kind: Kind,
    size: u64,
    writes: Vec<Write>,
}

#[derive(Debug, Clone)]
struct Case {
    top: Layer,
    /// A base under `top` (then a qcow2 overlay), at most as large as it.
    base: Option<Layer>,
    /// Cluster size of diskkit's qcow2 outputs, 512 B to 2 MiB.
    out_cluster_bits: u32,
}

fn fill() -> impl Strategy<Value = Fill> {
    prop_oneof![
        3 => any::<u64>().prop_map(Fill::Random),
        2 => prop::collection::vec(any::<u8>(), 1..16).prop_map(Fill::Repeat),
        1 => Just(Fill::ZeroData),
        2 => Just(Fill::Zeroes),
        1 => Just(Fill::Discard),
        1 => any::<u64>().prop_map(Fill::Compressed),
    ]
}

fn writes() -> impl Strategy<Value = Vec<Write>> {
    let write =
        (any::<u64>(), 1..256u64 << 10, fill()).prop_map(|(at, len, fill)| Write { at, len, fill });
    prop::collection::vec(write, 0..10)
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Raw),
        (9u32..=21).prop_map(|cluster_bits| Kind::Qcow2 { cluster_bits }),
    ]
}

/// Sizes from 1 to 4 MiB, in bytes for raw and in sectors for qcow2, mostly not multiples of
/// anything larger.
fn layer(kind: Kind) -> impl Strategy<Value = Layer> {
    (MIB..4 * MIB, writes()).prop_map(move |(size, writes)| {
        let size = match kind {
            Kind::Raw => size,
            Kind::Qcow2 { .. } => size.next_multiple_of(512),
        };
        Layer { kind, size, writes }
    })
}

fn case() -> impl Strategy<Value = Case> {
    let plain = kind().prop_flat_map(layer).prop_map(|top| (top, None));
    let overlay = ((9u32..=21), kind())
        .prop_flat_map(|(cluster_bits, base_kind)| {
            (layer(Kind::Qcow2 { cluster_bits }), layer(base_kind))
        })
        .prop_map(|(top, mut base)| {
            base.size = base.size.min(top.size);
            (top, Some(base))
        });
    (prop_oneof![plain, overlay], 9u32..=21).prop_map(|((top, base), out_cluster_bits)| Case {
        top,
        base,
        out_cluster_bits,
    })
}

fn format_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Raw => "raw",
        Kind::Qcow2 { .. } => "qcow2",
    }
}

/// Makes `layer` at `path` (on `backing` if given) with qemu-img and qemu-io.
fn build(dir: &Path, path: &Path, layer: &Layer, backing: Option<(&Path, Kind)>) {
    match layer.kind {
        Kind::Raw => {
            std::fs::File::create(path)
                .and_then(|f| f.set_len(layer.size))
                .expect("create raw");
        }
        Kind::Qcow2 { cluster_bits } => {
            let mut args = vec![
                "create".to_string(),
                "-q".into(),
                "-f".into(),
                "qcow2".into(),
                "-o".into(),
                format!("cluster_size={}", 1u64 << cluster_bits),
            ];
            if let Some((base, base_kind)) = backing {
                args.extend([
                    "-b".into(),
                    path_str(base).into(),
                    "-F".into(),
                    format_name(base_kind).into(),
                ]);
            }
            args.extend([path_str(path).into(), layer.size.to_string()]);
            qemu_img(&common::as_refs(&args));
        }
    }
    let cluster = match layer.kind {
        Kind::Raw => None,
        Kind::Qcow2 { cluster_bits } => Some(1u64 << cluster_bits),
    };
    // qemu compresses only into clusters never allocated: compressed writes go first, one per
    // cluster.
    let mut order: Vec<_> = layer.writes.iter().enumerate().collect();
    order.sort_by_key(|(_, w)| !matches!(w.fill, Fill::Compressed(_)));
    let mut compressed = std::collections::BTreeSet::new();
    let mut cmds = Vec::new();
    for (i, w) in order {
        let at = w.at % layer.size;
        let len = w.len.min(layer.size - at);
        let pattern_file = |bytes: &[u8]| {
            let f = dir.join(format!(
                "{}.pattern{i}",
                path.file_name().unwrap().display()
            ));
            std::fs::write(&f, bytes).expect("write pattern");
            f
        };
        cmds.push(match (&w.fill, cluster) {
            (Fill::Random(seed), _) => {
                let f = pattern_file(&pseudo_random(*seed, len as usize));
                format!("write -s {} {at} {len}", path_str(&f))
            }
            (Fill::Repeat(pattern), _) => {
                format!("write -s {} {at} {len}", path_str(&pattern_file(pattern)))
            }
            (Fill::ZeroData, _) => format!("write -P 0 {at} {len}"),
            (Fill::Zeroes, _) => format!("write -z {at} {len}"),
            (Fill::Discard, _) => format!("discard {at} {len}"),
            (Fill::Compressed(seed), Some(cluster)) => {
                // Whole clusters (the last one may end at the virtual size); half of each
                // cluster repetitive so that it compresses.
                let at = at / cluster * cluster;
                if !compressed.insert(at) {
                    continue;
                }
                let len = cluster.min(layer.size - at);
                let mut bytes = pseudo_random(*seed, len as usize / 2);
                bytes.resize(len as usize, (seed % 251) as u8);
                format!("write -c -s {} {at} {len}", path_str(&pattern_file(&bytes)))
            }
            (Fill::Compressed(seed), None) => {
                format!(
                    "write -s {} {at} {len}",
                    path_str(&pattern_file(&[*seed as u8, 0]))
                )
            }
        });
    }
    if !cmds.is_empty() {
        qemu_io(format_name(layer.kind), path, &common::as_refs(&cmds));
    }
}

/// diskkit's output formats: (file name, -O, extra convert flags, qemu's format name).
const OUTPUTS: [(&str, &str, &[&str], &str); 8] = [
    ("out.raw", "raw", &[], "raw"),
    ("out.qcow2", "qcow2", &[], "qcow2"),
    ("zlib.qcow2", "qcow2", &["-c"], "qcow2"),
    (
        "zstd.qcow2",
        "qcow2",
        &["-c", "-o", "compression_type=zstd"],
        "qcow2",
    ),
    ("dynamic.vhd", "vpc", &[], "vpc"),
    ("fixed.vhd", "vpc", &["-o", "subformat=fixed"], "vpc"),
    ("sparse.vmdk", "vmdk", &[], "vmdk"),
    (
        "stream.vmdk",
        "vmdk",
        &["-o", "subformat=streamOptimized"],
        "vmdk",
    ),
];

fn run(program: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The digest `diskkit hash` prints for one image.
fn digest(args: &[&str]) -> String {
    let (code, out, err) = diskkit(args);
    assert_eq!(code, 0, "diskkit {args:?}: {out}{err}");
    out.split_whitespace().next().expect("a digest").to_string()
}

fn converts_to_every_format(case: &Case) -> Result<(), TestCaseError> {
    let dir = common::tempdir();
    let src_fmt = match case.base {
        Some(_) => "qcow2",
        None => format_name(case.top.kind),
    };
    let src: PathBuf = dir.path().join(format!("src.{src_fmt}"));
    match &case.base {
        Some(base) => {
            let base_path = dir.path().join(format!("base.{}", format_name(base.kind)));
            build(dir.path(), &base_path, base, None);
            build(dir.path(), &src, &case.top, Some((&base_path, base.kind)));
        }
        None => build(dir.path(), &src, &case.top, None),
    }
    let manifest = dir.path().join("src.json");
    let src_digest = digest(&[
        "hash",
        "-f",
        src_fmt,
        "--manifest",
        path_str(&manifest),
        path_str(&src),
    ]);
    let cluster_size = format!("cluster_size={}", 1u64 << case.out_cluster_bits);
    for (name, format, flags, qemu_fmt) in OUTPUTS {
        let out = dir.path().join(name);
        let mut args = vec!["convert", "-f", src_fmt, "-O", format];
        args.extend(flags);
        if format == "qcow2" {
            args.extend(["-o", &cluster_size]);
        }
        args.extend([path_str(&src), path_str(&out)]);
        let (code, stdout, stderr) = diskkit(&args);
        prop_assert_eq!(code, 0, "diskkit {:?}: {}{}", args, stdout, stderr);

        let (code, text) = run("qemu-img", &["check", "-f", qemu_fmt, path_str(&out)]);
        // 63: qemu cannot check this format (raw, vpc).
        let unchecked = code == 63 && matches!(qemu_fmt, "raw" | "vpc");
        prop_assert!(code == 0 || unchecked, "qemu-img check {}: {}", name, text);

        let (code, text) = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                src_fmt,
                "-F",
                qemu_fmt,
                path_str(&src),
                path_str(&out),
            ],
        );
        prop_assert_eq!(code, 0, "qemu-img compare src {}: {}", name, text);

        let out_digest = digest(&["hash", "-f", qemu_fmt, path_str(&out)]);
        if out_digest != src_digest {
            // Only VHD rounds the size up (to a CHS geometry), by zeros at the end; every
            // reader already sees a raw file of any size in whole sectors, as qemu does.
            prop_assert_eq!(
                qemu_fmt,
                "vpc",
                "{} has another digest than its source",
                name
            );
            let (code, stdout, stderr) = diskkit(&[
                "hash",
                "-f",
                qemu_fmt,
                "--check",
                path_str(&manifest),
                path_str(&out),
            ]);
            prop_assert_eq!(code, 3, "hash --check {}: {}{}", name, stdout, stderr);
        }
    }
    Ok(())
}

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    Config {
        cases,
        // Each case runs some 40 processes: shrink a failure in bounded time.
        max_shrink_iters: 200,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/proptest_qemu.txt",
        ))),
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]
    #[test]
    fn every_writable_format_matches_qemu(case in case()) {
        converts_to_every_format(&case)?;
    }
}

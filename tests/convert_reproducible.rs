//! `convert -c` output is a function of the input and the options: two conversions of one
//! source give the same bytes, however the worker threads interleave.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::io::{Seek, SeekFrom, Write};

const MIB: u64 = 1 << 20;

fn sha256(path: &std::path::Path) -> String {
    let digest: [u8; 32] = Sha256::digest(std::fs::read(path).unwrap()).into();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn compressed_conversions_are_byte_identical() {
    let dir = tempdir();
    let d = dir.path();
    // Compressible text, incompressible data (stored plain) and zeros in runs, in a source
    // large enough that many workers take chunks at once.
    let src = d.join("mix.raw");
    let mut f = std::fs::File::create(&src).unwrap();
    f.set_len(48 * MIB).unwrap();
    let text: Vec<u8> = (0..8 * MIB)
        .map(|i| b"the quick brown fox jumps over the lazy dog 0123456789\n"[(i % 55) as usize])
        .collect();
    for (at, bytes) in [
        (0, pseudo_random(1, 6 * MIB as usize)),
        (7 * MIB + 4096, text.clone()),
        (20 * MIB, pseudo_random(2, 10 * MIB as usize)),
        (33 * MIB + 512, text),
        (47 * MIB, pseudo_random(3, MIB as usize - 1000)),
    ] {
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&bytes).unwrap();
    }
    drop(f);
    for extra in [&[][..], &["-o", "compression_type=zstd"], &["-m", "8"]] {
        let mut digests = Vec::new();
        for run in 0..3 {
            let out = d.join(format!("out{run}.qcow2"));
            let _ = std::fs::remove_file(&out);
            let mut args = vec!["convert", "-c", "-O", "qcow2"];
            args.extend(extra);
            args.extend([path_str(&src), path_str(&out)]);
            diskkit_ok(&args);
            qemu_img(&["check", path_str(&out)]);
            qemu_img(&["compare", "-f", "raw", path_str(&src), path_str(&out)]);
            digests.push(sha256(&out));
        }
        assert!(
            digests.windows(2).all(|w| w[0] == w[1]),
            "convert -c {extra:?} gave different files: {digests:?}"
        );
    }
}

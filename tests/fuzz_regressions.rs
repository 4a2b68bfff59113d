//! The inputs the fuzz campaign found crashing (`scripts/fuzz.sh`), minimized and kept under
//! `fuzz/regressions/TARGET/`, replayed on every test run through the targets' own code
//! (`fuzz/src/targets.rs`): a fixed bug that comes back fails here, without a fuzzer.

#[path = "../fuzz/src/lib.rs"]
mod diskkit_fuzz;

use std::path::Path;

#[test]
fn kept_fuzz_inputs_no_longer_crash() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut replayed = 0;
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("fuzz/regressions")
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    for dir in dirs {
        let target = dir.file_name().unwrap().to_string_lossy().into_owned();
        let (_, run) = diskkit_fuzz::targets::ALL
            .iter()
            .find(|(name, _)| *name == target)
            .unwrap_or_else(|| panic!("{}: no fuzz target of that name", dir.display()));
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        for input in inputs {
            eprintln!("{target}: {}", input.display());
            run(&std::fs::read(&input).unwrap());
            replayed += 1;
        }
    }
    assert!(replayed > 0, "nothing kept under {}", root.display());
}

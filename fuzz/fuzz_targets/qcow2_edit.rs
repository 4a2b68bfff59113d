#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| diskkit_fuzz::targets::qcow2_edit::run(data));

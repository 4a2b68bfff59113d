#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| diskkit_fuzz::targets::bundle_manifest::run(data));

#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| diskkit_fuzz::targets::jobfile::run(data));

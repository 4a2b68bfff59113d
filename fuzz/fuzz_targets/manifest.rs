//! Hash manifests are read from users' files: parsing and validating one must never panic, and a
//! manifest that passes validation must survive a round trip.
#![no_main]

use diskkit_formats::digest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::from_json(data) {
        let again = Manifest::from_json(m.to_json().as_bytes()).expect("valid manifest re-reads");
        assert_eq!(again, m);
    }
});

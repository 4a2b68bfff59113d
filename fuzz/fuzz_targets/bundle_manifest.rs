//! Bundle manifests are read from stores that may be damaged or hostile: decoding never panics,
//! and a manifest that decodes encodes back to one that decodes the same.
#![no_main]

use diskkit::bundle::Manifest;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(Path::new("fuzz"), data) {
        let mut again = m.clone();
        let bytes = again.encode().expect("a decoded manifest encodes");
        assert_eq!(Manifest::decode(Path::new("fuzz"), &bytes).expect("decodes"), m);
    }
});

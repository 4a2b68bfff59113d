//! Snapshot indexes are read from stores that may be damaged or hostile: decoding must never
//! panic nor allocate beyond the input's size, and an index that decodes must re-encode to the
//! same bytes. The checksum is repaired first, so mutations reach the checks behind it.
#![no_main]

use diskkit_formats::chunk_store::SnapshotIndex;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    if bytes.len() >= 52 {
        let body = bytes.len() - 32;
        let sum = Sha256::digest(&bytes[..body]);
        bytes[body..].copy_from_slice(&sum);
    }
    if let Ok(index) = SnapshotIndex::decode(Path::new("fuzz"), &bytes) {
        let again = index.encode().expect("a decoded index encodes");
        let reread = SnapshotIndex::decode(Path::new("fuzz"), &again).expect("re-encoded index decodes");
        assert_eq!(reread, index);
    }
});

//! The member index of an OVA and its .mf manifest: never a panic, never a member outside the
//! archive or with a name that climbs out of it.
#![no_main]

use diskkit::bundle::ova::{parse_mf, tar_index};
use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use std::path::{Component, Path};

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    if let Ok(members) = tar_index::index(Path::new("fuzz.ova"), Cursor::new(data), len) {
        for m in members {
            assert!(m.offset + m.size <= len);
            assert!(Path::new(&m.name)
                .components()
                .all(|c| matches!(c, Component::Normal(_))));
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_mf(Path::new("fuzz.mf"), text);
    }
});

//! Batch job files are written by users and scripts: parsing one (CSV or JSON Lines) must never
//! panic, and a job file that passes must hold only complete items with distinct destinations.
#![no_main]

use diskkit::batch::jobfile::parse;
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(items) = parse("fuzz", data, Path::new("/base")) {
        let mut destinations = HashSet::new();
        let mut last_line = 0;
        for item in &items {
            assert!(!item.source.is_empty() && !item.destination.is_empty());
            assert!(item.line > last_line, "lines in order");
            last_line = item.line;
            assert!(destinations.insert(item.destination.clone()), "distinct destinations");
        }
    }
});

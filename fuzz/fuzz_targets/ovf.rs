//! OVF descriptors come inside OVAs from anywhere: parsing must never panic, expand an entity
//! or allocate beyond the input's size, and every disk it yields has a sane capacity and a
//! plain file name.
#![no_main]

use diskkit::bundle::ova::ovf;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = ovf::parse(Path::new("fuzz.ovf"), text) {
        for disk in &d.disks {
            assert!(disk.capacity <= ovf::MAX_CAPACITY);
            assert!(ovf::check_href(Path::new("fuzz.ovf"), &disk.href).is_ok());
        }
    }
});

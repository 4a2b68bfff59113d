//! ISO 9660 parsing: volume descriptors, the boot catalog and the whole file tree under every name
//! mode, with file reads. The fuzz bytes start at sector 16 (the first volume descriptor) after a
//! zeroed system area, so small inputs reach the parser.
#![no_main]

use diskkit_formats::HostFile;
use diskkit_formats::iso::{IsoFs, IsoImage, NameMode, Visit};
use diskkit_formats::{Image, image::first_nonzero_byte};
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};

const SYSTEM_AREA: usize = 16 * 2048;

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(&[0u8; SYSTEM_AREA]).expect("write system area");
    f.write_all(data).expect("write fuzz input");
    if let Ok(image) = HostFile::open(f.path()).and_then(IsoImage::open) {
        let _ = image.info();
    }
    let Ok(fs) = HostFile::open(f.path()).and_then(IsoFs::from_host) else {
        return;
    };
    let mut buf = vec![0u8; 64 << 10];
    for mode in [
        NameMode::Auto,
        NameMode::Iso,
        NameMode::Joliet,
        NameMode::RockRidge,
    ] {
        let Ok(root) = fs.root(mode) else { continue };
        let mut entries = 0u32;
        let _ = fs.walk(&root, &mut |visit| {
            if let Visit::Entry { entry, .. } = visit {
                entries += 1;
                // Read the start of a bounded number of files.
                if entries < 1000
                    && let Ok(mut reader) = fs.open_file(entry)
                    && let Ok(n) = reader.read(&mut buf)
                {
                    let _ = first_nonzero_byte(&buf[..n]);
                }
            }
            Ok(())
        });
        let _ = fs.lookup(mode, "a/b/../c");
    }
});

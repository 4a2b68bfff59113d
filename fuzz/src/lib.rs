//! What every fuzz target does with its bytes: put them in a file, open it as an image, and walk
//! the whole image, so that any panic, hang or runaway allocation in a driver shows.

use diskkit_formats::{Extents, Format, Image, OpenOptions, open};
use std::io::Write;

/// The fuzz input as a temporary file (drivers read files, not buffers).
pub fn image_file(data: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(data).expect("write fuzz input");
    f
}

/// Opens `file` as `format` (detected when `None`) and walks it.
pub fn open_and_walk(file: &tempfile::NamedTempFile, format: Option<Format>) {
    let opts = OpenOptions {
        format,
        ..OpenOptions::default()
    };
    if let Ok(image) = open(file.path(), &opts) {
        walk(image.as_ref());
    }
}

/// Maps the whole image (at most 10,000 extents) and reads an odd-sized piece at both ends of
/// every extent, so reads cross sector, cluster and block boundaries, then one read from 0 that
/// spans several extents. Data extents are also read through the memory map.
pub fn walk(image: &dyn Image) {
    let _ = image.info();
    let mut buf = vec![0u8; 64 << 10];
    let odd = 4099u64;
    for e in Extents::new(image, 0, image.virtual_size())
        .take(10_000)
        .map_while(Result::ok)
    {
        let n = e.length.min(odd) as usize;
        let _ = image.read_at(&mut buf[..n], e.start);
        let _ = image.read_at(&mut buf[..n], e.end() - n as u64);
        // The zero-copy path hashing takes: the same bytes, straight from the file.
        let _ = image.with_mapped(e.start, e.length, &mut |bytes| {
            std::hint::black_box(bytes.iter().fold(0u8, |a, b| a ^ b));
        });
    }
    let n = image.virtual_size().min(buf.len() as u64) as usize;
    let _ = image.read_at(&mut buf[..n], 0);
}

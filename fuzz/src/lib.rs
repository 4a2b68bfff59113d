//! What every fuzz target does with its bytes: put them in a file, open it as an image, and walk
//! the whole image, so that any panic, hang or runaway allocation in a driver shows.

pub mod targets;

use diskkit_formats::{ExtentKind, Extents, Format, Image, OpenOptions, open};
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

/// A guest made from fuzz bytes, as a writer receives it: its bytes and, per byte range, whether
/// the source's map calls it data (written with `write_at`) or zeros/holes (`write_zeroes`).
pub struct Guest {
    pub bytes: Vec<u8>,
    /// Ascending, disjoint data ranges.
    pub data: Vec<std::ops::Range<usize>>,
    /// A multiplier that permutes the order in which write units are handed to the writer.
    pub stride: usize,
    /// A byte for the target to pick the writer's options with.
    pub pick: u8,
}

impl Guest {
    /// Largest guest a fuzz input describes: large enough for several 2 MiB clusters or blocks.
    const MAX_SIZE: usize = 5 << 20;

    /// Reads a guest from `input`: a size (3 bytes, squared), an order and an option pick (1 byte each),
    /// then extents of 4 bytes
    /// (kind, a parameter, a length in bytes or sectors) laid one after another from offset 0:
    /// pseudo-random data, a repeated byte, zeros written as data, input bytes as data, or a hole.
    pub fn parse(input: &[u8]) -> Option<Guest> {
        let (head, mut rest) = input.split_at_checked(5)?;
        // Squared, so that most guests are small (runs are fast) and some reach the maximum.
        let frac = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
        let size = 1 + ((frac * frac) >> 24) * Self::MAX_SIZE / (1 << 24);
        let (stride, pick) = (usize::from(head[3]), head[4]);
        let mut bytes = vec![0u8; size];
        let mut data = Vec::new();
        let mut at = 0;
        while at < size {
            let Some((e, tail)) = rest.split_at_checked(4) else {
                break;
            };
            rest = tail;
            let (kind, param) = (e[0], e[1]);
            let units = usize::from(u16::from_le_bytes([e[2], e[3]])) + 1;
            let len = if kind & 0x80 != 0 { units * 512 } else { units }.min(size - at);
            let range = at..at + len;
            match kind % 5 {
                0 => pseudo_random_fill(
                    &mut bytes[range.clone()],
                    u64::from(param) << 32 | at as u64,
                ),
                1 => bytes[range.clone()].fill(param),
                2 => {}
                3 => {
                    let n = len.min(rest.len());
                    bytes[at..at + n].copy_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
                _ => {
                    at += len;
                    continue;
                }
            }
            data.push(range);
            at += len;
        }
        Some(Guest {
            bytes,
            data,
            stride,
            pick,
        })
    }

    fn has_data(&self, range: std::ops::Range<usize>) -> bool {
        self.data
            .iter()
            .any(|d| d.start < range.end && range.start < d.end)
    }
}

/// Deterministic incompressible bytes (xorshift64).
fn pseudo_random_fill(out: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// The round trip of the guest that `input` describes, with the options (qemu's `-o` syntax and
/// `-c`) that `options` picks from its pick byte.
pub fn round_trip_input(input: &[u8], format: Format, options: impl Fn(u8) -> (String, bool)) {
    if let Some(guest) = Guest::parse(input) {
        let (opts, compress) = options(guest.pick);
        round_trip(format, &opts, compress, &guest);
    }
}

/// Writes `guest` as a new image of `format` with `options` (qemu's `-o` syntax) through the
/// library's writer, as convert drives it (units of the writer's alignment or 4 KiB, each
/// written once: data units with `write_at`, the others with `write_zeroes`, in a permuted
/// order), reads the file back with the reader and panics if any guest byte differs or the size
/// is wrong. Options the writer refuses end the run quietly.
fn round_trip(format: Format, options: &str, compress: bool, guest: &Guest) {
    use diskkit_formats::write::create;
    use diskkit_formats::{CreateOptions, ImageWriter};
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("image");
    let mut opts = CreateOptions {
        compress,
        // Never synced: a sync per run would bound the fuzzer to a few dozen runs a second.
        cache: diskkit_formats::write::CacheMode::Unsafe,
        ..CreateOptions::default()
    };
    opts.parse_options(options).expect("options parse");
    let size = guest.bytes.len() as u64;
    let Ok(writer) = create(format, &path, size, &mut opts) else {
        return;
    };
    let virtual_size = writer.virtual_size();
    assert!(
        virtual_size >= size,
        "{format} writer of {size} bytes holds {virtual_size}"
    );
    let align = writer.write_alignment();
    assert!(align.is_power_of_two(), "{format} alignment {align}");
    // Convert's unit: the writer's alignment, at least its 4 KiB zero-detection block.
    let align = align.max(4096) as usize;
    let units = guest.bytes.len().div_ceil(align);
    // Visits every unit once: i * stride mod units, with a stride prime to units.
    let mut stride = guest.stride.max(1) % units.max(1);
    while stride == 0 || gcd(stride, units) != 1 {
        stride += 1;
    }
    let write = |w: &dyn ImageWriter| -> diskkit_formats::Result<()> {
        for i in 0..units {
            let u = i * stride % units;
            let range = u * align..((u + 1) * align).min(guest.bytes.len());
            if guest.has_data(range.clone()) {
                w.write_at(&guest.bytes[range.clone()], range.start as u64)?;
            } else {
                w.write_zeroes(range.start as u64, range.len() as u64)?;
            }
        }
        Ok(())
    };
    write(writer.as_ref()).unwrap_or_else(|e| panic!("{format} write: {e}"));
    writer
        .finish()
        .unwrap_or_else(|e| panic!("{format} finish: {e}"));

    let opts = OpenOptions {
        format: Some(format),
        ..OpenOptions::default()
    };
    let image = open(&path, &opts).unwrap_or_else(|e| panic!("{format} reopen: {e}"));
    // Readers see whole sectors, as qemu does (a raw file of any size).
    let read_size = image.virtual_size();
    assert!(
        (virtual_size..=virtual_size.next_multiple_of(512)).contains(&read_size),
        "{format} written as {virtual_size} bytes reads as {read_size}"
    );
    let virtual_size = read_size;
    let mut back = vec![0u8; virtual_size as usize];
    image
        .read_at(&mut back, 0)
        .unwrap_or_else(|e| panic!("{format} read back: {e}"));
    if let Some(at) = (0..back.len()).find(|&i| back[i] != guest.bytes.get(i).copied().unwrap_or(0))
    {
        panic!("{format} ({options}, compress {compress}): guest byte {at:#x} differs");
    }
    // The map agrees with the bytes: what it calls zeros reads as zeros.
    for e in Extents::new(image.as_ref(), 0, virtual_size) {
        let e = e.unwrap_or_else(|err| panic!("{format} map: {err}"));
        if matches!(e.kind, ExtentKind::Zero | ExtentKind::Unallocated) {
            let r = e.start as usize..e.end() as usize;
            assert!(
                back[r].iter().all(|&b| b == 0),
                "{format}: zero extent {e:?} holds data"
            );
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

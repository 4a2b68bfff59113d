//! Compressed clusters: raw deflate (zlib type, 4 KiB window as qemu uses) and zstd frames.

use super::header::CompressionType;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::cell::RefCell;

/// Decompresses one cluster: `out` must be filled exactly. Trailing input bytes are allowed (the
/// descriptor rounds up to sectors, and another cluster's data may share the last sector).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let produced = match kind {
        CompressionType::Zlib => inflate(input, out)?,
        CompressionType::Zstd => unzstd(input, out)?,
    };
    if produced != out.len() {
        return Err(format!(
            "{} data decompresses to {produced} bytes, not a cluster of {}",
            kind.name(),
            out.len()
        ));
    }
    Ok(())
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<usize, String> {
    let mut d = Decompress::new(false);
    loop {
        let (before_in, before_out) = (d.total_in(), d.total_out());
        let status = d
            .decompress(
                &input[before_in as usize..],
                &mut out[before_out as usize..],
                FlushDecompress::Finish,
            )
            .map_err(|e| format!("deflate: {e}"))?;
        let done = d.total_out() as usize == out.len() || status == Status::StreamEnd;
        if done || (d.total_in(), d.total_out()) == (before_in, before_out) {
            return Ok(d.total_out() as usize);
        }
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<usize, String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let before = (inb.pos(), outb.pos());
        let hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| format!("zstd: {e}"))?;
        let full = outb.pos() == outb.capacity();
        if full || hint == 0 || (inb.pos(), outb.pos()) == before {
            return Ok(outb.pos());
        }
    }
}

/// Compresses one cluster; `None` when the result would not be smaller than the input (qemu then
/// stores the cluster uncompressed).
pub fn compress(kind: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
    let out = match kind {
        // Random or already-compressed clusters would come out no smaller, and deflate spends
        // longer on them than on text (zstd skips them at memory speed by itself): judging them
        // first cut `convert -c` of a mixed disk from 6.1 to 2.3 s of CPU, same output.
        CompressionType::Zlib if crate::entropy::looks_incompressible(input) => return None,
        CompressionType::Zlib => deflate(input)?,
        CompressionType::Zstd => zstd_compress(input)?,
    };
    (out.len() < input.len()).then_some(out)
}

// Compressor state is reused per thread: setting one up costs more than compressing a cluster.
thread_local! {
    static DEFLATE: RefCell<Option<Compress>> = const { RefCell::new(None) };
    static ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

/// zstd level 1: on 64 KiB clusters of mixed disk data it stores within 0.3% of the default
/// level 3 (what qemu uses) and takes a quarter less CPU time.
const ZSTD_LEVEL: i32 = 1;

fn zstd_compress(input: &[u8]) -> Option<Vec<u8>> {
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let c = match &mut *slot {
            Some(c) => c,
            None => slot.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?),
        };
        c.compress(input).ok()
    })
}

fn deflate(input: &[u8]) -> Option<Vec<u8>> {
    DEFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        // qemu inflates with a 4 KiB window (windowBits -12): a bigger window would be unreadable.
        let c = slot.get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::default(), false, 12)
        });
        c.reset();
        // Room for the worst case (zlib's compressBound), so that the stream always ends: a
        // compressor reset after running out of room mid-stream panics on its next cluster
        // (zlib-rs 0.6), which random clusters too short for the entropy test did.
        let bound = input.len() + (input.len() >> 12) + (input.len() >> 14) + 13;
        let mut out = Vec::with_capacity(bound);
        match c.compress_vec(input, &mut out, FlushCompress::Finish) {
            Ok(Status::StreamEnd) => Some(out),
            _ => {
                *slot = None;
                None
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_short_output() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = compress(kind, &data).unwrap();
            // The thread's reused compressor state must not leak into the next cluster.
            assert!(compress(kind, &[0x5a; 100]).is_some());
            assert_eq!(compress(kind, &data).as_ref(), Some(&c));
            c.extend_from_slice(&[0xab; 100]);
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
            let mut big = vec![0u8; data.len() * 2];
            assert!(decompress(kind, &c, &mut big).is_err());
            assert!(decompress(kind, &c[..c.len() / 4], &mut out).is_err());
        }
        assert!(compress(CompressionType::Zlib, &[0x5a]).is_none());
    }

    #[test]
    fn incompressible_small_clusters_are_stored_as_is() {
        // Clusters of 512 B to 8 KiB are too short for the entropy test, so deflate sees random
        // bytes that do not fit in the cluster's size (zlib-rs once panicked on that).
        let random = crate::entropy::tests::noise(65536, 3);
        for len in [512, 1024, 2048, 4096, 8192] {
            // One after another on this thread's reused compressor.
            for piece in random.chunks(len) {
                for kind in [CompressionType::Zlib, CompressionType::Zstd] {
                    assert_eq!(compress(kind, piece), None, "{kind:?} {len}");
                }
            }
        }
    }
}

//! The qcow2 writer round trip: a random guest (data, zeros, holes; any size) written plain or
//! compressed (zlib, zstd), with cluster sizes from 512 B to 2 MiB and extended L2 entries,
//! reads back identical (`diskkit_fuzz::round_trip_input`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    diskkit_fuzz::round_trip_input(data, diskkit_formats::Format::Qcow2, |pick| {
        let cluster_size = 512u32 << (pick % 13);
        let (compress, compression) = match (pick >> 4) % 3 {
            0 => (false, "zlib"),
            1 => (true, "zlib"),
            _ => (true, "zstd"),
        };
        // Subclusters need clusters of 16 KiB or more and no compression, as in qemu.
        let extended_l2 = pick & 0x80 != 0 && !compress && cluster_size >= 16 << 10;
        let options = format!(
            "cluster_size={cluster_size},compression_type={compression},extended_l2={}",
            if extended_l2 { "on" } else { "off" }
        );
        (options, compress)
    });
});

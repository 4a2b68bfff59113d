//! The VHD writer round trip: a random guest (data, zeros, holes; any size) written as a dynamic
//! VHD (block sizes 512 KiB to 2 MiB) or a fixed one, with or without force_size, reads back
//! identical (`diskkit_fuzz::round_trip_input`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    diskkit_fuzz::round_trip_input(data, diskkit_formats::Format::Vhd, |pick| {
        let force_size = if pick & 1 != 0 { "on" } else { "off" };
        let options = if pick & 2 != 0 {
            format!("subformat=fixed,force_size={force_size}")
        } else {
            let block_size = (512u32 << 10) << ((pick >> 2) % 3);
            format!("subformat=dynamic,block_size={block_size},force_size={force_size}")
        };
        (options, false)
    });
});

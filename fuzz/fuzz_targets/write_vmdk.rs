//! The VMDK writers' round trip: a random guest (data, zeros, holes; any size) written as
//! monolithicSparse or streamOptimized reads back identical (`diskkit_fuzz::round_trip_input`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    diskkit_fuzz::round_trip_input(data, diskkit_formats::Format::Vmdk, |pick| {
        let subformat = match pick & 1 {
            0 => "monolithicSparse",
            _ => "streamOptimized",
        };
        (format!("subformat={subformat}"), false)
    });
});

//! The raw writer round trip: a random guest (data, zeros, holes; any size) written through the
//! library's writer as convert drives it reads back identical (`diskkit_fuzz::round_trip_input`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    diskkit_fuzz::round_trip_input(data, diskkit_formats::Format::Raw, |_| {
        (String::new(), false)
    });
});

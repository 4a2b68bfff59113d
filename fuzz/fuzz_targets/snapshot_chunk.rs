//! Chunk objects are read from stores that may be damaged or hostile: decoding must never panic
//! nor allocate beyond the header's bounded length. The CRC is repaired first, so mutations reach
//! the decompressor.
#![no_main]

use diskkit_formats::chunk_store::{CHUNK_HEADER, decode_chunk, encode_chunk};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    if bytes.len() >= CHUNK_HEADER {
        let crc = crc32c::crc32c(&bytes[CHUNK_HEADER..]);
        bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok(content) = decode_chunk(Path::new("fuzz"), &bytes) {
        let again = encode_chunk(&content).expect("decoded content encodes");
        assert_eq!(decode_chunk(Path::new("fuzz"), &again).expect("re-encoded chunk decodes"), content);
    }
});

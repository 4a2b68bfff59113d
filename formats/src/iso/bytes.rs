//! Field readers over untrusted byte slices: a field past the end of its slice reads as zero (or
//! `None`), never panics. ISO 9660 records most numbers "both-endian" (little endian followed by
//! big endian); diskkit reads the little-endian half.

pub fn slice(b: &[u8], at: usize, len: usize) -> Option<&[u8]> {
    b.get(at..at.checked_add(len)?)
}

fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    slice(b, at, N)
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; N])
}

pub fn u8_at(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

pub fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(array(b, at))
}

pub fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array(b, at))
}

/// A both-endian 16-bit field (4 bytes).
pub fn both_u16(b: &[u8], at: usize) -> u16 {
    le_u16(b, at)
}

/// A both-endian 32-bit field (8 bytes).
pub fn both_u32(b: &[u8], at: usize) -> u32 {
    le_u32(b, at)
}

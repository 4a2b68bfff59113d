//! Telling data no compressor can shrink (random, encrypted or already compressed bytes) from
//! data worth compressing, without compressing it.
//!
//! Compressing such data costs the most and gains nothing: deflate spends longer on random
//! bytes than on text (it searches for matches it never finds), and every cluster, grain or chunk
//! of it ends up stored as is anyway. Two counts cost a small fraction of a compression: the
//! Shannon entropy of the bytes' histogram (within a hair of 8 bits per byte: no Huffman coding
//! gains) and the number of distinct byte pairs (as many as random bytes of that length show:
//! no short repeats for a match finder, which a uniform histogram alone does not rule out, as in
//! a counting pattern).

/// The smallest piece judged: the entropy of fewer random bytes falls too far below 8 bits
/// (a histogram of n bytes falls about 255 / (2 n ln 2) bits short on average: 0.011 at 16 KiB).
pub const MIN_PIECE: usize = 16 << 10;

/// Entropy in bits per byte above which a piece of at least [`MIN_PIECE`] bytes counts as
/// incompressible: random 16 KiB pieces measure 7.989 on average with a spread of about 0.002;
/// the densest text and code stay below 7.
const THRESHOLD: f64 = 7.95;

/// True when `data` (at least [`MIN_PIECE`] bytes; shorter pieces are never judged
/// incompressible) is bytes that no compressor would shrink.
pub fn looks_incompressible(data: &[u8]) -> bool {
    if data.len() < MIN_PIECE {
        return false;
    }
    // Four interleaved histograms: consecutive equal bytes would otherwise serialise on one
    // counter.
    let mut counts = [[0u32; 256]; 4];
    let quads = data.chunks_exact(4);
    let tail = quads.remainder();
    for q in quads {
        counts[0][q[0] as usize] += 1;
        counts[1][q[1] as usize] += 1;
        counts[2][q[2] as usize] += 1;
        counts[3][q[3] as usize] += 1;
    }
    for &b in tail {
        counts[0][b as usize] += 1;
    }
    let n = data.len() as f64;
    let entropy: f64 = (0..256)
        .map(|byte| counts.iter().map(|c| c[byte]).sum::<u32>())
        .filter(|&c| c > 0)
        .map(|c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum();
    // The pair count is taken only for pieces the histogram has not ruled out already.
    entropy > THRESHOLD && distinct_pairs(data) as f64 >= PAIRS_SHARE * expected_pairs(n)
}

/// [`looks_incompressible`] of a large buffer judged from `pieces` pieces of [`MIN_PIECE`] bytes
/// spread evenly over it: true only when every piece is. A buffer that mixes text into random
/// bytes at a finer grain may be judged incompressible and stored as is, a small loss against
/// the time of compressing all the random bytes to find that out.
pub fn looks_incompressible_sampled(data: &[u8], pieces: usize) -> bool {
    let pieces = pieces.max(1);
    if data.len() < pieces * MIN_PIECE {
        return looks_incompressible(data);
    }
    let stride = (data.len() - MIN_PIECE) / (pieces - 1).max(1);
    (0..pieces).all(|i| looks_incompressible(&data[i * stride..i * stride + MIN_PIECE]))
}

/// Share of the distinct byte pairs random bytes would show, below which a piece has repeats:
/// random pieces of 16 KiB and more come within 1% of the expected count.
const PAIRS_SHARE: f64 = 0.9;

/// Distinct pairs of consecutive bytes in `data`.
fn distinct_pairs(data: &[u8]) -> u32 {
    let mut seen = [0u64; 1024];
    for w in data.windows(2) {
        let pair = (w[0] as usize) << 8 | w[1] as usize;
        seen[pair >> 6] |= 1 << (pair & 63);
    }
    seen.iter().map(|w| w.count_ones()).sum()
}

/// Distinct pairs expected among `n` random bytes: each of the 65,536 pairs is missing from
/// n - 1 draws with probability (1 - 1/65536)^(n-1).
fn expected_pairs(n: f64) -> f64 {
    65536.0 * (1.0 - (-(n - 1.0) / 65536.0).exp())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// splitmix64: bytes no compressor shrinks, without a dependency.
    pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                (z ^ (z >> 31)) as u8
            })
            .collect()
    }

    #[test]
    fn random_bytes_are_incompressible_and_text_and_zeros_are_not() {
        for seed in 1..20 {
            assert!(looks_incompressible(&noise(MIN_PIECE, seed)));
            assert!(looks_incompressible(&noise(64 << 10, seed)));
        }
        assert!(!looks_incompressible(&noise(MIN_PIECE - 1, 1)));
        assert!(!looks_incompressible(&vec![0; 64 << 10]));
        let text: Vec<u8> = (0..70_000u32)
            .flat_map(|i| format!("{i:08} INFO request served in {} ms\n", i % 97).into_bytes())
            .take(64 << 10)
            .collect();
        assert!(!looks_incompressible(&text));
        // Base64 of random bytes: 6 bits per byte, which compressors do shrink.
        let b64: Vec<u8> = noise(64 << 10, 3)
            .iter()
            .map(|b| {
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                    [(b & 63) as usize]
            })
            .collect();
        assert!(!looks_incompressible(&b64));
        // A counting pattern: a flat histogram, but short repeats a match finder uses.
        let counting: Vec<u8> = (0..64u32 << 10).map(|i| (i % 251) as u8).collect();
        assert!(!looks_incompressible(&counting));
        // A random 4 KiB block repeated.
        assert!(!looks_incompressible(&noise(4096, 9).repeat(16)));
        // Half random, half zeros: compressible.
        let mut half = noise(64 << 10, 5);
        half[32 << 10..].fill(0);
        assert!(!looks_incompressible(&half));
    }

    #[test]
    fn samples_judge_large_buffers() {
        let mut data = noise(1 << 20, 4);
        assert!(looks_incompressible_sampled(&data, 8));
        // Half the last sampled piece is a run of one byte.
        data[(1 << 20) - MIN_PIECE / 2..].fill(b'a');
        assert!(!looks_incompressible_sampled(&data, 8));
        // Small buffers are judged whole.
        assert!(looks_incompressible_sampled(&noise(MIN_PIECE, 2), 8));
        assert!(!looks_incompressible_sampled(&noise(MIN_PIECE - 1, 2), 8));
    }
}

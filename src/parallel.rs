//! Thread pools for the engine's parallel passes over image content.

use diskkit_formats::{Error, Result};
use rayon::ThreadPool;

/// Threads per core for passes that read images and then compute (hash, compare): while one
/// thread waits for its read (cold page cache, network disk), another computes. Hashing 1 GiB of
/// data on 2 cores with a cold page cache took 8-10 s with 2 threads, 4.4-7 s with 3 and 2.8-5 s
/// with 4; with a warm cache the extra threads cost nothing.
const READ_THREADS_PER_CORE: usize = 2;

/// A pool with `READ_THREADS_PER_CORE` threads for each thread of rayon's global pool (one per
/// core, or `RAYON_NUM_THREADS`).
pub fn read_pool() -> Result<ThreadPool> {
    let threads = READ_THREADS_PER_CORE * rayon::current_num_threads();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::invalid(format!("cannot start {threads} threads: {e}")))
}

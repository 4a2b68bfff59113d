//! Thread pools for the engine's parallel passes over image content.

use diskkit_formats::{Error, Result};
use rayon::ThreadPool;
use std::sync::OnceLock;

/// Threads per core for passes that read images and then compute (hash, compare): while one
/// thread waits for its read (cold page cache, network disk), another computes. Hashing 1 GiB of
/// data on 2 cores with a cold page cache took 8-10 s with 2 threads, 4.4-7 s with 3 and 2.8-5 s
/// with 4; with a warm cache the extra threads cost nothing.
const READ_THREADS_PER_CORE: usize = 2;

static READ_POOL: OnceLock<ThreadPool> = OnceLock::new();

/// The engine's pool for convert, compare and hash: `READ_THREADS_PER_CORE` threads per core
/// (see [`cores`]), started on first use and kept for the life of the process.
pub fn read_pool() -> Result<&'static ThreadPool> {
    if let Some(pool) = READ_POOL.get() {
        return Ok(pool);
    }
    let pool = pool_of(READ_THREADS_PER_CORE * cores())?;
    // A pool started meanwhile by another thread wins; this one is dropped.
    Ok(READ_POOL.get_or_init(|| pool))
}

/// A pool of its own with `threads` threads (at least one), for a caller that chose the number.
pub fn pool_of(threads: usize) -> Result<ThreadPool> {
    let threads = threads.max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::invalid(format!("cannot start {threads} threads: {e}")))
}

/// Cores to use, as rayon counts them for its global pool: `RAYON_NUM_THREADS` when set to a
/// positive number, else the CPUs this process may run on. Counted here rather than by asking
/// rayon, which would start its global pool (or answer for the pool the caller runs in).
pub fn cores() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

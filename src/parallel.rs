//! The engine's threads: the read pool for parallel passes over image content, and
//! [`run_indexed`] for jobs that wait on requests.

use diskkit_formats::{Error, Result};
use rayon::ThreadPool;
use std::sync::OnceLock;

/// Threads per core for passes that read images, compute, and write: while one thread waits
/// for its read (cold page cache, network disk) or for its direct write to reach the disk,
/// another computes. Hashing 1 GiB of data on 2 cores with a cold page cache took 8-10 s with
/// 2 threads, 4.4-7 s with 3 and 2.8-5 s with 4; the batch benchmark's 16 conversions (direct
/// writes) took 2.6-2.9 s with 4 threads and 2.3-2.5 s with 8, a snapshot restore 1.0-1.4 s and
/// 0.9 s; with a warm cache and buffered writes the extra threads cost nothing.
const READ_THREADS_PER_CORE: usize = 4;

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

/// Runs `job(0)`, `job(1)`, ... `job(count - 1)` from up to `threads` threads, each taking the
/// next index when done; stops handing out work at the first error and returns it.
///
/// For jobs that mostly wait on a request (the parts of an upload, the ranges of a download):
/// `threads` is how many requests are in flight (`--parallel`), which has nothing to do with
/// the cores, so these threads are not the read pool's (four on two cores would cap eight
/// requests at four, and a batch worker's items would take the pool threads their own
/// compute needs). Threads are scoped: none outlives the call.
pub fn run_indexed(
    threads: usize,
    count: usize,
    job: impl Fn(usize) -> Result<()> + Sync,
) -> Result<()> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, count.max(1)) {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    if let Err(e) = job(i) {
                        failed.store(true, Ordering::Relaxed);
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

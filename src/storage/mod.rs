//! Images in object storage: buckets addressed by URL, multipart uploads that resume, sidecar
//! manifests that prove content, ranged reads that feed the convert engine.
//!
//! Async stays inside this module: [`Store`] owns a tokio runtime and exposes blocking calls, so
//! the engine (convert, hash) keeps driving sources and writers synchronously from its threads.
//!
//! Backends: `s3://` goes through OpenDAL for reads, listings and deletes, and through a small
//! SigV4 client of our own ([`s3`]) for multipart uploads, because resuming needs the upload id
//! and part numbers that OpenDAL keeps private. `oss://` and `obs://` use OpenDAL's native
//! backends (uploads there are multipart but not resumable). A local directory (or `file://`) is
//! the bucket that needs no server; its uploads go to a temporary file renamed into place.

mod checkpoint;
mod location;
pub mod pull;
pub mod push;
mod s3;
mod store;

pub use location::{Location, Scheme, Settings};
pub use store::{ObjectEntry, Store};

/// Suffix of the sidecar manifest object written next to every pushed image.
pub const MANIFEST_SUFFIX: &str = ".diskkit.json";

/// Name of the sidecar manifest of the image object `key`.
pub fn manifest_key(key: &str) -> String {
    format!("{key}{MANIFEST_SUFFIX}")
}

/// Runs `job(0)`, `job(1)`, ... `job(count - 1)` from up to `threads` threads, each taking the
/// next index when done; stops handing out work at the first error and returns it.
fn run_parallel(
    threads: usize,
    count: usize,
    job: impl Fn(usize) -> diskkit_formats::Result<()> + Sync,
) -> diskkit_formats::Result<()> {
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

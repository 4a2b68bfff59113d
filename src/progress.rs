//! Progress reporting from the engine, without tying the engine to a terminal library.

/// Receives the number of guest bytes processed, possibly from several threads at once.
pub trait Progress: Sync {
    fn advance(&self, bytes: u64);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn advance(&self, _bytes: u64) {}
}

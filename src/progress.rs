//! Progress reporting from the engine, without tying the engine to a terminal library.

/// Receives the number of guest bytes processed, possibly from several threads at once.
pub trait Progress: Sync {
    /// `bytes` more guest bytes are done, whether they were read or passed over as zeros.
    fn advance(&self, bytes: u64);

    /// Of the guest bytes advanced, `bytes` held data and were read. Zero ranges of the
    /// allocation map cost nearly nothing, so a display that shows rate and time left counts
    /// these; an engine that does not report them leaves both to the advanced bytes.
    fn data_read(&self, bytes: u64) {
        let _ = bytes;
    }
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn advance(&self, _bytes: u64) {}
}

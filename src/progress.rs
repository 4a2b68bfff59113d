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

/// Counts what an engine reports, for tests.
#[cfg(test)]
#[derive(Default)]
pub struct Counted {
    pub advanced: std::sync::atomic::AtomicU64,
    pub read: std::sync::atomic::AtomicU64,
}

#[cfg(test)]
impl Counted {
    /// Bytes advanced and bytes read.
    pub fn totals(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.advanced.load(Relaxed), self.read.load(Relaxed))
    }
}

#[cfg(test)]
impl Progress for Counted {
    fn advance(&self, bytes: u64) {
        self.advanced
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    fn data_read(&self, bytes: u64) {
        self.read
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

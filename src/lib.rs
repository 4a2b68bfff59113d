//! diskkit engine: operations on disk images built on the image model of `diskkit-formats`.
//! Synchronous and free of command-line concerns; the CLI in `main.rs` is a thin layer on top.

pub mod batch;
pub mod bundle;
pub mod chain;
pub mod compare;
pub mod convert;
pub mod gce;
pub mod hash;
pub mod hash_check;
pub mod iso_extract;
pub mod output;
pub mod parallel;
pub mod preflight;
pub mod progress;
pub mod snapshot;
pub mod storage;
pub mod targets;
#[cfg(test)]
mod test_image;

pub use diskkit_formats as formats;
pub use diskkit_formats::{Error, Result};

//! Consistency checks of image metadata (`diskkit check`), reported as `qemu-img check` does.

use crate::error::Result;
use crate::image::Format;
use crate::registry::driver;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Checks the metadata of the image at `path` (repairing what `repair` allows). `None` when the
/// format has no metadata to check (raw, ISO).
pub fn check(format: Format, path: &Path, repair: Option<Repair>) -> Result<Option<CheckReport>> {
    driver(format)
        .check
        .map(|check| check(path, repair))
        .transpose()
}

/// What `check -r` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Free clusters that are allocated but used by nothing.
    Leaks,
    /// Leaks and corruptions (wrong refcounts).
    All,
}

/// The outcome of a check; JSON field names follow `qemu-img check --output=json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub filename: PathBuf,
    pub format: String,
    /// Problems that can lose data (refcount too low, overlapping metadata, bad table entries).
    pub corruptions: u64,
    /// Clusters allocated but used by nothing: wasted space, no data at risk.
    pub leaks: u64,
    /// Problems that stopped the check itself (unreadable structures).
    #[serde(rename = "check-errors")]
    pub check_errors: u64,
    #[serde(rename = "corruptions-fixed", skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    #[serde(rename = "leaks-fixed", skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    #[serde(rename = "image-end-offset", skip_serializing_if = "Option::is_none")]
    pub image_end_offset: Option<u64>,
    #[serde(rename = "total-clusters", skip_serializing_if = "Option::is_none")]
    pub total_clusters: Option<u64>,
    #[serde(rename = "allocated-clusters", skip_serializing_if = "Option::is_none")]
    pub allocated_clusters: Option<u64>,
    #[serde(
        rename = "fragmented-clusters",
        skip_serializing_if = "Option::is_none"
    )]
    pub fragmented_clusters: Option<u64>,
    #[serde(
        rename = "compressed-clusters",
        skip_serializing_if = "Option::is_none"
    )]
    pub compressed_clusters: Option<u64>,
    /// One line per problem found, naming the structure and offset.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl CheckReport {
    /// Exit code as `qemu-img check`: 0 clean, 1 the check could not complete, 2 corruptions
    /// remain, 3 only leaks remain.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > self.corruptions_fixed {
            2
        } else if self.leaks > self.leaks_fixed {
            3
        } else {
            0
        }
    }
}

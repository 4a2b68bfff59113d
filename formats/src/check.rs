//! Consistency checks of image metadata (`diskkit check`), reported as `qemu-img check` does.

use crate::backing::{BackingOpener, ImplicitOpens};
use crate::error::Result;
use crate::host::HostFile;
use crate::image::Format;
use crate::open::ChainOpener;
use crate::registry::driver;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Checks the metadata of the image at `path` (repairing what `repair` allows). `None` when the
/// format has no metadata to check (raw, ISO). Files the image names (VMDK extents) are opened
/// under the default [`ImplicitOpens`] policy.
pub fn check(format: Format, path: &Path, repair: Option<Repair>) -> Result<Option<CheckReport>> {
    check_with(format, path, repair, ImplicitOpens::default())
}

/// [`check`] with the policy for the files that image metadata names.
pub fn check_with(
    format: Format,
    path: &Path,
    repair: Option<Repair>,
    policy: ImplicitOpens,
) -> Result<Option<CheckReport>> {
    if driver(format).check.is_none() {
        return Ok(None);
    }
    let mut opener = ChainOpener::for_image(path, policy)?;
    check_file(format, HostFile::open(path)?, repair, &mut opener)
}

/// [`check`] of an opened file (a local file, or an object read in place: repairs need a local
/// file), opening the files it names through `opener`.
pub fn check_file(
    format: Format,
    file: HostFile,
    repair: Option<Repair>,
    opener: &mut dyn BackingOpener,
) -> Result<Option<CheckReport>> {
    let Some(check) = driver(format).check else {
        return Ok(None);
    };
    check(file, repair, opener).map(Some)
}

/// Problems listed in a report at most (see [`CheckReport::corruption`]).
const MAX_LISTED: usize = 10_000;

/// Bytes `start..end` of an image file that one structure uses, for [`CheckReport::overlaps`].
#[derive(Clone, Copy)]
pub(crate) struct Used {
    pub start: u64,
    pub end: u64,
    pub what: Structure,
}

/// A structure of an image file, named in messages: a kind and, for tables and blocks, its
/// number.
#[derive(Clone, Copy)]
pub(crate) struct Structure(pub &'static str, pub Option<u64>);

impl std::fmt::Display for Structure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            Some(n) => write!(f, "{} {n}", self.0),
            None => f.write_str(self.0),
        }
    }
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
    /// Records a problem that can lose data. Past [`MAX_LISTED`] problems, they are counted
    /// but not listed: a hostile image must not turn into gigabytes of messages.
    pub(crate) fn corruption(&mut self, message: String) {
        self.corruptions += 1;
        match self.messages.len().cmp(&MAX_LISTED) {
            std::cmp::Ordering::Less => self.messages.push(message),
            std::cmp::Ordering::Equal => self
                .messages
                .push("further problems are counted, not listed".into()),
            std::cmp::Ordering::Greater => {}
        }
    }

    /// Records a corruption for every byte range of `used` that overlaps another: two
    /// structures (or a structure and data) claiming the same bytes of the file.
    pub(crate) fn overlaps(&mut self, mut used: Vec<Used>) {
        used.retain(|u| u.start < u.end);
        used.sort_unstable_by_key(|u| (u.start, u.end));
        let mut furthest: Option<Used> = None;
        for u in used {
            match furthest {
                Some(f) if u.start < f.end => {
                    self.corruption(format!(
                        "ERROR: {} at {:#x} overlaps {} at {:#x}",
                        u.what, u.start, f.what, f.start
                    ));
                    if u.end > f.end {
                        furthest = Some(u);
                    }
                }
                _ => furthest = Some(u),
            }
        }
    }

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

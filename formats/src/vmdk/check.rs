//! `check` of VMDK images: the descriptor and every extent header must open (as for reading),
//! and in sparse extents no grain table or grain may lie past the end of its file or share
//! bytes with the header, the grain directory, a grain table or another grain.

use super::{Storage, VmdkImage};
use crate::backing::BackingOpener;
use crate::check::{CheckReport, Repair};
use crate::error::{Error, Result};
use crate::host::HostFile;

/// Checks the VMDK image in `file`, whose extents `opener` opens. Nothing is repaired:
/// `repair` is refused.
pub fn check(
    file: HostFile,
    repair: Option<Repair>,
    opener: &mut dyn BackingOpener,
) -> Result<CheckReport> {
    let path = &file.path().to_path_buf();
    if repair.is_some() {
        return Err(Error::unsupported(path, "repairing vmdk images"));
    }
    let image = VmdkImage::open(file, opener)?;
    let mut report = CheckReport {
        filename: path.to_path_buf(),
        format: "vmdk".into(),
        ..Default::default()
    };
    // What opening found (extents outside the descriptor's directory) belongs in the report.
    for w in &image.warnings {
        report.messages.push(format!("Warning: {w}"));
    }
    for extent in &image.extents {
        if let Storage::Sparse(sparse) = &extent.storage {
            sparse.check(&mut report);
        }
    }
    Ok(report)
}

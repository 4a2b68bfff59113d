//! `check` of VHDX images, as `qemu-img check` does it: every BAT entry whose block lies past
//! the end of the file (a truncated image) or overlaps metadata or another block is a
//! corruption; a log that needed replaying is reported.

use super::{MIB, SB_PRESENT, VhdxImage, bat_offset, bat_state};
use crate::check::{CheckReport, Repair, Structure, Used};
use crate::error::{Error, Result};
use crate::host::HostFile;
use std::path::Path;

/// Checks the VHDX image at `path`. Nothing is repaired: `repair` is refused.
pub fn check(path: &Path, repair: Option<Repair>) -> Result<CheckReport> {
    check_file(HostFile::open(path)?, repair)
}

/// [`check`] of an opened file: a local file, or an object read in place (repairs need a local
/// file).
pub fn check_file(file: HostFile, repair: Option<Repair>) -> Result<CheckReport> {
    let path = &file.path().to_path_buf();
    if repair.is_some() {
        return Err(Error::unsupported(path, "repairing vhdx images"));
    }
    let (image, layout) = VhdxImage::read_layout(file)?;
    let mut report = CheckReport {
        filename: path.to_path_buf(),
        format: "vhdx".into(),
        ..Default::default()
    };
    let bat_at = |i: usize| layout.bat.offset + i as u64 * 8;
    let region = |start: u64, length: u64, name| Used {
        start,
        end: start.saturating_add(length),
        what: Structure(name, None),
    };
    let mut used = vec![
        region(0, MIB, "the headers and region tables"),
        region(layout.log.offset, layout.log.length, "the log"),
        region(layout.bat.offset, layout.bat.length, "the BAT"),
        region(
            layout.metadata.offset,
            layout.metadata.length,
            "the metadata region",
        ),
    ];
    for (i, &entry) in image.bat.iter().enumerate() {
        match image.check_entry(i as u64, entry) {
            Err(reason) => report.corruption(format!(
                "ERROR: BAT entry {i} at {:#x}: {reason}",
                bat_at(i)
            )),
            Ok(()) if image.entry_is_stored(i as u64, entry) => {
                let len = if bat_state(entry) == SB_PRESENT {
                    MIB
                } else {
                    image.block_size
                };
                used.push(Used {
                    start: bat_offset(entry),
                    end: bat_offset(entry) + len,
                    what: Structure("the block of BAT entry", Some(i as u64)),
                });
            }
            Ok(()) => {}
        }
    }
    report.overlaps(used);
    if image.log_replayed {
        report
            .messages
            .push("the metadata log is not empty: it needs replaying".into());
    }
    Ok(report)
}

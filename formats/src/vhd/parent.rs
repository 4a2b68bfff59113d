//! Finding and opening the parent of a differencing disk through its locators.

use super::layout::*;
use super::read::VhdImage;
use crate::backing::{BackingOpener, Role};
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::{Format, Image};
use crate::registry::detect;
use std::path::{Path, PathBuf};

/// Longest parent locator diskkit reads (a path, UTF-16).
const MAX_LOCATOR_LEN: u32 = 64 << 10;

/// The parent of a differencing disk.
pub(super) struct Parent {
    pub(super) image: Box<dyn Image>,
    /// The locator or name it was found by, as recorded in the child.
    pub(super) recorded: String,
    pub(super) path: PathBuf,
}

/// A parent file name as one locator records it, and how to turn it into a path.
fn locator_path(child_dir: &Path, text: &str, url: bool) -> Option<PathBuf> {
    let text = text.trim_end_matches('\0');
    let path = if url {
        let rest = text.strip_prefix("file://")?;
        let rest = rest.strip_prefix("localhost").unwrap_or(rest);
        percent_decode(rest)?
    } else {
        // Windows paths: a drive-letter path cannot name a file here; relative ones can.
        let p = text.replace('\\', "/");
        if p.as_bytes().get(1) == Some(&b':') {
            return None;
        }
        p
    };
    if path.is_empty() {
        return None;
    }
    Some(child_dir.join(path))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Finds and opens the parent of a differencing disk: the relative Windows locator first, then
/// the absolute one, the file URL (MacX) and the parent name of the header, each relative to
/// the child's directory.
pub(super) fn open_parent(
    file: &HostFile,
    header: &DynamicHeader,
    opener: &mut dyn BackingOpener,
    warnings: &mut Vec<String>,
) -> Result<Parent> {
    let child_dir = file
        .path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut recorded = Vec::new();
    for code in [PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_MACX] {
        for l in header
            .parent_locators
            .iter()
            .filter(|l| l.platform_code == code)
        {
            if l.data_length == 0 || l.data_length > MAX_LOCATOR_LEN {
                continue;
            }
            let bytes =
                file.read_vec_at(l.data_offset, l.data_length.into(), "VHD parent locator")?;
            let text = if code == PLATFORM_MACX {
                String::from_utf8_lossy(&bytes).into_owned()
            } else {
                let units: Vec<u16> = bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16_lossy(&units)
            };
            recorded.push((text, code == PLATFORM_MACX));
        }
    }
    recorded.push((header.parent_name(), false));
    let mut tried = Vec::new();
    for (text, url) in &recorded {
        let Some(path) = locator_path(&child_dir, text, *url) else {
            continue;
        };
        if !path.is_file() {
            let shown = path.display().to_string();
            if !tried.contains(&shown) {
                tried.push(shown);
            }
            continue;
        }
        let parent = opener.open_file(file.path(), &path, Role::Parent, warnings)?;
        let image: Box<dyn Image> = if detect(&parent)? == Format::Vhd {
            let vhd = VhdImage::open(parent, opener)?;
            if vhd.uuid() != header.parent_uuid {
                warnings.push(format!(
                    "parent {} has UUID {}, the differencing disk expects {}",
                    path.display(),
                    uuid_string(&vhd.uuid()),
                    uuid_string(&header.parent_uuid)
                ));
            }
            Box::new(vhd)
        } else {
            opener.open_image(parent, None)?
        };
        return Ok(Parent {
            image,
            recorded: text.trim_end_matches('\0').to_string(),
            path,
        });
    }
    Err(Error::io(
        file.path(),
        format!(
            "open the parent of this differencing disk (tried: {})",
            if tried.is_empty() {
                "no usable locator".to_string()
            } else {
                tried.join(", ")
            }
        ),
        std::io::Error::from(std::io::ErrorKind::NotFound),
    ))
}

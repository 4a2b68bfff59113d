//! The VMDK descriptor: the text that names the extent files of a disk and its parent link,
//! either a file of its own or embedded in a hosted sparse extent.

use crate::error::{Error, Result};
use std::path::Path;

/// The largest descriptor diskkit reads. Real descriptors are a few hundred bytes.
pub const MAX_DESCRIPTOR_SIZE: u64 = 1 << 20;
/// The most extents one descriptor may list (each one holds an open file).
pub const MAX_EXTENTS: usize = 4096;
/// `parentCID` of a disk without parent.
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

const MAGIC_LINE: &str = "# Disk DescriptorFile";

/// How an extent stores its sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// Hosted sparse extent (grain directory and tables), also used by streamOptimized.
    Sparse,
    /// Sectors stored as they are in a file, from a sector offset on.
    Flat,
    /// A flat extent on VMFS storage: the same layout as FLAT.
    Vmfs,
    /// No file: reads as zeros.
    Zero,
}

impl ExtentType {
    pub fn name(self) -> &'static str {
        match self {
            ExtentType::Sparse => "SPARSE",
            ExtentType::Flat => "FLAT",
            ExtentType::Vmfs => "VMFS",
            ExtentType::Zero => "ZERO",
        }
    }
}

/// One extent line: `RW 32768 SPARSE "disk-s001.vmdk"` or `RW 32768 FLAT "disk-flat.vmdk" 0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Size in 512-byte sectors.
    pub sectors: u64,
    pub kind: ExtentType,
    /// File name as written, relative to the descriptor's directory unless absolute.
    pub filename: Option<String>,
    /// Start of the extent's data in its file, in sectors (flat extents).
    pub offset: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub create_type: String,
    pub cid: u32,
    pub parent_cid: u32,
    pub parent_file_name_hint: Option<String>,
    pub extents: Vec<ExtentLine>,
}

/// True when `head` (the first bytes of a file) starts like a text descriptor.
pub fn looks_like_descriptor(head: &[u8]) -> bool {
    let start = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(head.len());
    head[start..].starts_with(MAGIC_LINE.as_bytes())
}

impl Descriptor {
    /// Parses descriptor text; `path` and `offset` locate it for error messages. Text after the
    /// first NUL (padding of embedded descriptors) is ignored.
    pub fn parse(bytes: &[u8], path: &Path, offset: u64) -> Result<Descriptor> {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let text = std::str::from_utf8(&bytes[..end]).map_err(|e| {
            Error::corrupt(
                path,
                "vmdk descriptor",
                offset,
                format!("not UTF-8 text: {e}"),
            )
        })?;
        let corrupt = |line_no: usize, reason: String| {
            Error::corrupt(
                path,
                "vmdk descriptor",
                offset,
                format!("line {}: {reason}", line_no + 1),
            )
        };
        let mut d = Descriptor {
            parent_cid: NO_PARENT_CID,
            ..Descriptor::default()
        };
        for (no, raw_line) in text.lines().enumerate() {
            let line = raw_line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parsed = parse_extent_line(line).map_err(|e| match e {
                LineError::Bad(r) => corrupt(no, r),
                LineError::Unsupported(kind) => {
                    Error::unsupported(path, format!("vmdk {kind} extents"))
                }
            })?;
            if let Some(ext) = parsed {
                if d.extents.len() >= MAX_EXTENTS {
                    return Err(corrupt(no, format!("more than {MAX_EXTENTS} extents")));
                }
                d.extents.push(ext);
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(corrupt(no, format!("unrecognised line {line:?}")));
            };
            let key = key.trim();
            let value = unquote(value.trim());
            match key {
                "CID" => d.cid = parse_cid(value).map_err(|r| corrupt(no, r))?,
                "parentCID" => d.parent_cid = parse_cid(value).map_err(|r| corrupt(no, r))?,
                "createType" => d.create_type = value.to_string(),
                "parentFileNameHint" => d.parent_file_name_hint = Some(value.to_string()),
                // version, encoding, ddb.* and other keys do not affect the guest view.
                _ => {}
            }
        }
        if d.extents.is_empty() {
            return Err(Error::corrupt(
                path,
                "vmdk descriptor",
                offset,
                "no extent lines",
            ));
        }
        Ok(d)
    }

    /// The guest size: the sum of the extent sizes.
    pub fn total_sectors(&self) -> Option<u64> {
        self.extents
            .iter()
            .try_fold(0u64, |acc, e| acc.checked_add(e.sectors))
    }
}

fn unquote(s: &str) -> &str {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
}

fn parse_cid(s: &str) -> std::result::Result<u32, String> {
    u32::from_str_radix(s, 16).map_err(|_| format!("bad CID {s:?}"))
}

enum LineError {
    Bad(String),
    /// An extent type VMware defines that diskkit does not read.
    Unsupported(String),
}

impl From<String> for LineError {
    fn from(reason: String) -> Self {
        LineError::Bad(reason)
    }
}

/// Parses an extent line; `Ok(None)` when the line is not one (it does not start with an access
/// mode).
fn parse_extent_line(line: &str) -> std::result::Result<Option<ExtentLine>, LineError> {
    let Some((access, rest)) = line.split_once(char::is_whitespace) else {
        return Ok(None);
    };
    if !matches!(access, "RW" | "RDONLY" | "NOACCESS") {
        return Ok(None);
    }
    let mut words = rest.trim_start().splitn(3, char::is_whitespace);
    let sectors = words.next().unwrap_or("");
    let sectors: u64 = sectors
        .parse()
        .map_err(|_| LineError::Bad(format!("bad extent size {sectors:?}")))?;
    let kind = match words.next().unwrap_or("") {
        "SPARSE" => ExtentType::Sparse,
        "FLAT" => ExtentType::Flat,
        "VMFS" => ExtentType::Vmfs,
        "ZERO" => ExtentType::Zero,
        other @ ("VMFSSPARSE" | "SESPARSE" | "VMFSRDM" | "VMFSRAW") => {
            return Err(LineError::Unsupported(other.to_string()));
        }
        other => return Err(format!("unknown extent type {other:?}").into()),
    };
    let rest = words.next().unwrap_or("").trim();
    if kind == ExtentType::Zero {
        return Ok(Some(ExtentLine {
            sectors,
            kind,
            filename: None,
            offset: 0,
        }));
    }
    let Some(quoted) = rest.strip_prefix('"') else {
        return Err(format!("extent file name not quoted in {line:?}").into());
    };
    let Some((name, after)) = quoted.split_once('"') else {
        return Err(format!("unterminated extent file name in {line:?}").into());
    };
    if name.is_empty() {
        return Err(LineError::Bad("empty extent file name".into()));
    }
    let after = after.trim();
    let offset = if after.is_empty() {
        0
    } else {
        after
            .parse()
            .map_err(|_| LineError::Bad(format!("bad extent offset {after:?}")))?
    };
    if kind == ExtentType::Sparse && offset != 0 {
        return Err(LineError::Bad("sparse extents take no offset".into()));
    }
    Ok(Some(ExtentLine {
        sectors,
        kind,
        filename: Some(name.to_string()),
        offset,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# Disk DescriptorFile\nversion=1\nCID=d209ddff\nparentCID=ffffffff\n\
createType=\"twoGbMaxExtentFlat\"\n\n# Extent description\nRW 4192256 FLAT \"d-f001.vmdk\" 0\n\
RDONLY 100 FLAT \"with space.raw\" 8\nNOACCESS 20 ZERO\n\nddb.adapterType = \"ide\"\n";

    #[test]
    fn parses_extents_and_ids() {
        let d = Descriptor::parse(TEXT.as_bytes(), Path::new("d.vmdk"), 0).unwrap();
        assert_eq!(d.cid, 0xd209ddff);
        assert_eq!(d.parent_cid, NO_PARENT_CID);
        assert_eq!(d.create_type, "twoGbMaxExtentFlat");
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[1].filename.as_deref(), Some("with space.raw"));
        assert_eq!(d.extents[1].offset, 8);
        assert_eq!(d.extents[2].kind, ExtentType::Zero);
        assert_eq!(d.total_sectors(), Some(4192256 + 120));
        assert!(looks_like_descriptor(TEXT.as_bytes()));
        let sesparse = format!("{MAGIC_LINE}\nRW 8 SESPARSE \"x\"\n");
        assert!(matches!(
            Descriptor::parse(sesparse.as_bytes(), Path::new("d"), 0),
            Err(Error::Unsupported { .. })
        ));
        assert!(!looks_like_descriptor(b"KDMV"));
    }

    #[test]
    fn rejects_bad_lines() {
        for bad in [
            "RW 10 FLAT noquote.raw",
            "RW x FLAT \"a\"",
            "RW 10 OTHER \"a\"",
            "RW 10 SPARSE \"a\" 5",
            "RW 10 FLAT \"a",
            "CID=zz",
            "garbage line",
            "",
        ] {
            let text = format!("{MAGIC_LINE}\n{bad}\n");
            assert!(
                Descriptor::parse(text.as_bytes(), Path::new("d"), 0).is_err(),
                "{bad}"
            );
        }
    }
}

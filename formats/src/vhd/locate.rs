//! Where the structures of a VHD file are: the footer (at the end, or a copy at the start), the
//! dynamic header and the block allocation table, each checked before use.

use super::layout::*;
use crate::error::{Error, Result};
use crate::host::HostFile;

/// The footer that describes an image and where it was found.
pub(crate) struct LocatedFooter {
    pub footer: Footer,
    pub disk_type: DiskType,
    /// Where the data area of a fixed disk ends (the end footer's offset).
    pub data_end: u64,
    /// Problems that did not prevent using the footer (a damaged copy).
    pub warnings: Vec<String>,
    /// Offset of a footer copy that is damaged, missing or stale (what `check -r` rewrites).
    pub stale_copy: Option<u64>,
}

fn checksum_error(file: &HostFile, structure: &str, offset: u64) -> Error {
    Error::corrupt(
        file.path(),
        structure,
        offset,
        "checksum mismatch (the bytes are damaged)",
    )
}

/// Finds the footer of a VHD: at the end of the file (fixed disks; 511 bytes on some early
/// images), or at offset 0 and at the end (dynamic and differencing disks). The end footer is
/// authoritative; a damaged one is replaced by its copy at offset 0, with a warning.
pub(crate) fn locate_footer(file: &HostFile) -> Result<LocatedFooter> {
    let len = file.len();
    if len < FOOTER_SIZE {
        return Err(Error::corrupt(
            file.path(),
            "VHD footer",
            0,
            format!("file of {len} bytes is too small for a 512-byte footer"),
        ));
    }
    let tail_at = len - FOOTER_SIZE;
    let head = file.read_vec_at(0, FOOTER_SIZE, "VHD footer copy")?;
    let mut tail = file.read_vec_at(tail_at, FOOTER_SIZE, "VHD footer")?;
    let mut tail_at = tail_at;
    if !Footer::has_cookie(&tail) && tail.get(1..).is_some_and(Footer::has_cookie) {
        tail = tail.split_off(1);
        tail_at += 1;
    }
    let tail_footer = Footer::has_cookie(&tail).then(|| Footer::parse(&tail));
    let mut warnings = Vec::new();
    let mut stale_copy = None;

    let head_valid = Footer::has_cookie(&head) && Footer::checksum_ok(&head);
    let tail_ok = tail_footer.is_some() && Footer::checksum_ok(&tail);
    // A fixed disk, unless this is a damaged end footer of a dynamic disk with a good copy.
    if let Some(f) = &tail_footer
        && DiskType::from_raw(f.disk_type) == Some(DiskType::Fixed)
        && (tail_ok || !head_valid)
    {
        if !Footer::checksum_ok(&tail) {
            return Err(checksum_error(file, "VHD footer", tail_at));
        }
        return Ok(LocatedFooter {
            footer: f.clone(),
            disk_type: DiskType::Fixed,
            data_end: tail_at,
            warnings,
            stale_copy,
        });
    }
    let footer = if Footer::has_cookie(&head) {
        if tail_ok {
            if head != tail {
                stale_copy = Some(0);
            }
            if !head_valid {
                warnings.push(
                    "the footer copy at offset 0 is damaged (checksum mismatch); using the footer \
                     at the end of the file"
                        .to_string(),
                );
            } else if head != tail {
                warnings.push(
                    "the footer copy at offset 0 differs from the footer at the end of the file; \
                     using the end one"
                        .to_string(),
                );
            }
            Footer::parse(&tail)
        } else if head_valid {
            stale_copy = Some(tail_at);
            warnings.push(format!(
                "the footer at the end of the file (offset {tail_at:#x}) is {}; using its copy at \
                 offset 0",
                if tail_footer.is_some() {
                    "damaged"
                } else {
                    "missing"
                }
            ));
            Footer::parse(&head)
        } else {
            return Err(checksum_error(file, "VHD footer copy", 0));
        }
    } else if tail_footer.is_some() {
        if !tail_ok {
            return Err(checksum_error(file, "VHD footer", tail_at));
        }
        stale_copy = Some(0);
        warnings.push("the footer copy at offset 0 is missing".to_string());
        Footer::parse(&tail)
    } else {
        return Err(Error::corrupt(
            file.path(),
            "VHD footer",
            tail_at,
            "no 'conectix' cookie at offset 0 or in the last 512 bytes: not a VHD image",
        ));
    };
    let disk_type = match DiskType::from_raw(footer.disk_type) {
        Some(DiskType::Fixed) => {
            return Err(Error::corrupt(
                file.path(),
                "VHD footer",
                0,
                "a fixed disk's footer must be at the end of the file, not only at offset 0",
            ));
        }
        Some(t) => t,
        None => {
            return Err(Error::unsupported(
                file.path(),
                format!("VHD disk type {}", footer.disk_type),
            ));
        }
    };
    Ok(LocatedFooter {
        footer,
        disk_type,
        data_end: tail_at,
        warnings,
        stale_copy,
    })
}

/// The guest size of the image `located` describes (as qemu computes it), checked against the VHD
/// maximum and, for a fixed disk, against the data that precedes its footer.
pub(crate) fn checked_guest_size(file: &HostFile, located: &LocatedFooter) -> Result<u64> {
    let size = located.footer.guest_size();
    let at = located.data_end;
    let corrupt = |reason: String| Error::corrupt(file.path(), "VHD footer", at, reason);
    if size > MAX_VIRTUAL_SIZE {
        return Err(corrupt(format!(
            "virtual size {size} exceeds the VHD maximum of 2040 GiB"
        )));
    }
    if located.disk_type == DiskType::Fixed && size > at {
        return Err(corrupt(format!(
            "fixed disk of {size} bytes but only {at} bytes of data precede the footer \
             (truncated file?)"
        )));
    }
    Ok(size)
}

/// Whether a file that has no magic at offset 0 ends with a fixed VHD's footer (qemu probes
/// such files as raw; diskkit recognises them).
pub fn has_fixed_footer(file: &HostFile) -> Result<bool> {
    let len = file.len();
    for footer_len in [FOOTER_SIZE, OLD_FOOTER_SIZE] {
        if len < footer_len {
            continue;
        }
        let buf = file.read_vec_at(len - footer_len, footer_len, "VHD footer")?;
        if Footer::has_cookie(&buf) {
            return Ok(DiskType::from_raw(Footer::parse(&buf).disk_type) == Some(DiskType::Fixed));
        }
    }
    Ok(false)
}

/// The `current_size` of the footer `bytes` (a file's last [`FOOTER_SIZE`] bytes), or `None`
/// when they are no valid footer (cookie and checksum): the check of a fixed disk's trailer for
/// a reader that has the guest bytes already (a pulled or verified object).
pub fn trailing_footer_size(bytes: &[u8; FOOTER_SIZE as usize]) -> Option<u64> {
    (Footer::has_cookie(bytes) && Footer::checksum_ok(bytes))
        .then(|| Footer::parse(bytes).current_size)
}

/// The dynamic header and BAT of a dynamic or differencing disk, validated against the file.
pub(crate) struct SparseLayout {
    pub header: DynamicHeader,
    pub block_size: u64,
    pub bitmap_size: u64,
    /// Entries covering the virtual size (entries past it are never read).
    pub bat: Vec<u32>,
}

impl SparseLayout {
    /// File offset of the bitmap of an allocated block.
    pub fn block_offset(&self, entry: u32) -> u64 {
        u64::from(entry) * SECTOR
    }

    pub fn block_footprint(&self) -> u64 {
        self.bitmap_size + self.block_size
    }

    /// File bytes (bitmap and data) of the block a BAT entry points to; `None` if unallocated.
    /// A u32 entry times 512 plus at most 256 MiB + 64 KiB cannot overflow.
    pub fn block_range(&self, entry: u32) -> Option<std::ops::Range<u64>> {
        (entry != UNALLOCATED).then(|| {
            let start = self.block_offset(entry);
            start..start + self.block_footprint()
        })
    }

    /// File offset of BAT entry `i`.
    pub fn entry_offset(&self, i: usize) -> u64 {
        self.header.table_offset + 4 * i as u64
    }
}

/// Reads and validates the dynamic header; returns it with its validated block size.
pub(crate) fn read_header(file: &HostFile, footer: &Footer) -> Result<(DynamicHeader, u64)> {
    let at = footer.data_offset;
    let bytes = file.read_vec_at(at, HEADER_SIZE, "VHD dynamic disk header")?;
    let corrupt =
        |reason: String| Error::corrupt(file.path(), "VHD dynamic disk header", at, reason);
    if !DynamicHeader::has_cookie(&bytes) {
        return Err(corrupt("no 'cxsparse' cookie".to_string()));
    }
    if !DynamicHeader::checksum_ok(&bytes) {
        return Err(checksum_error(file, "VHD dynamic disk header", at));
    }
    let header = DynamicHeader::parse(&bytes);
    let bs = u64::from(header.block_size);
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(corrupt(format!(
            "block size {bs} is not a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
        )));
    }
    Ok((header, bs))
}

/// Reads the dynamic header and the BAT entries that cover `virtual_size` (entries past it are
/// never used, so a hostile entry count costs nothing).
pub(crate) fn read_sparse_unchecked(
    file: &HostFile,
    footer: &Footer,
    virtual_size: u64,
) -> Result<SparseLayout> {
    let (header, block_size) = read_header(file, footer)?;
    let entries = virtual_size.div_ceil(block_size);
    let table = header.table_offset;
    if entries > u64::from(header.max_table_entries) {
        return Err(Error::corrupt(
            file.path(),
            "VHD block allocation table",
            table,
            format!(
                "{} entries cannot cover the virtual size of {virtual_size} bytes ({entries} \
                 blocks of {block_size} bytes)",
                header.max_table_entries
            ),
        ));
    }
    if entries > MAX_BAT_ENTRIES {
        return Err(Error::unsupported(
            file.path(),
            format!("VHD block allocation table of {entries} entries (limit {MAX_BAT_ENTRIES})"),
        ));
    }
    let raw = file.read_vec_at(table, entries * 4, "VHD block allocation table")?;
    let bat = raw
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(SparseLayout {
        header,
        block_size,
        bitmap_size: bitmap_size(block_size),
        bat,
    })
}

/// [`read_sparse_unchecked`], then checks that every allocated block lies inside the file.
pub(crate) fn read_sparse(
    file: &HostFile,
    footer: &Footer,
    virtual_size: u64,
) -> Result<SparseLayout> {
    let layout = read_sparse_unchecked(file, footer, virtual_size)?;
    for (i, &e) in layout.bat.iter().enumerate() {
        let Some(blk) = layout.block_range(e) else {
            continue;
        };
        if blk.end > file.len() {
            return Err(Error::corrupt(
                file.path(),
                "VHD block allocation table entry",
                layout.entry_offset(i),
                format!(
                    "block {i} at {:#x} ends at {:#x}, past the end of the file ({:#x})",
                    blk.start,
                    blk.end,
                    file.len()
                ),
            ));
        }
    }
    Ok(layout)
}

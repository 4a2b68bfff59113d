//! Consistency check, repair and resize of VHD images.

use super::layout::*;
use super::locate::{
    LocatedFooter, SparseLayout, locate_footer, read_sparse, read_sparse_unchecked,
};
use crate::check::{CheckReport, Repair};
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::Format;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

fn open_rw(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, "open for writing", e))
}

fn write(file: &File, path: &Path, buf: &[u8], at: u64, what: &str) -> Result<()> {
    file.write_all_at(buf, at)
        .map_err(|e| Error::io(path, format!("write {what} at {at:#x}"), e))
}

fn bat_bytes(entries: &[u32]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// Checks a VHD: footer and header checksums, footer copies, and that every BAT entry points
/// inside the file without overlapping metadata or other blocks. With `repair`, a damaged or
/// stale footer copy is rewritten from the good one, and (`Repair::All`) BAT entries pointing
/// past the end of the file are cleared (their blocks read as zeros afterwards).
pub fn check(path: &Path, repair: Option<Repair>) -> Result<CheckReport> {
    check_file(HostFile::open(path)?, repair)
}

/// [`check`] of an opened file: a local file, or an object read in place (repairs need a local
/// file).
pub fn check_file(file: HostFile, repair: Option<Repair>) -> Result<CheckReport> {
    let path = &file.path().to_path_buf();
    let mut report = CheckReport {
        filename: path.to_path_buf(),
        format: Format::Vhd.name().to_string(),
        ..CheckReport::default()
    };
    let stop = |mut report: CheckReport, e: Error| match e {
        Error::Corrupt { .. } | Error::Unsupported { .. } => {
            report.check_errors += 1;
            report.messages.push(e.to_string());
            Ok(report)
        }
        e => Err(e),
    };
    let located = match locate_footer(&file) {
        Ok(l) => l,
        Err(e) => return stop(report, e),
    };
    let LocatedFooter {
        footer,
        disk_type,
        data_end,
        warnings,
        stale_copy,
    } = located;
    for w in warnings {
        report.corruptions += 1;
        report.messages.push(w);
    }
    let virtual_size = footer.guest_size();
    if disk_type == DiskType::Fixed {
        report.image_end_offset = Some(file.len());
        if virtual_size > data_end {
            report.corruptions += 1;
            report.messages.push(format!(
                "fixed disk of {virtual_size} bytes but the footer is at {data_end:#x}"
            ));
        }
        return Ok(report);
    }
    let layout = match read_sparse_unchecked(&file, &footer, virtual_size) {
        Ok(l) => l,
        Err(e) => return stop(report, e),
    };
    let (bad_entries, end) =
        check_blocks(&file, &layout, footer.data_offset, data_end, &mut report);
    report.image_end_offset = Some(end + FOOTER_SIZE);

    let Some(repair) = repair else {
        return Ok(report);
    };
    let rw = open_rw(path)?;
    if let Some(at) = stale_copy {
        let at = if at == 0 { 0 } else { at.max(end) };
        write(&rw, path, &footer.to_bytes(), at, "VHD footer")?;
        if at != 0 {
            rw.set_len(at + FOOTER_SIZE)
                .map_err(|e| Error::io(path, "set length", e))?;
        }
        report.corruptions_fixed += 1;
    }
    if repair == Repair::All && !bad_entries.is_empty() {
        let mut bat = layout.bat.clone();
        for &i in &bad_entries {
            if let Some(e) = bat.get_mut(i) {
                *e = UNALLOCATED;
            }
        }
        write(
            &rw,
            path,
            &bat_bytes(&bat),
            layout.header.table_offset,
            "VHD BAT",
        )?;
        report.corruptions_fixed += bad_entries.len() as u64;
    }
    rw.sync_all().map_err(|e| Error::io(path, "sync", e))?;
    Ok(report)
}

/// Checks the BAT entries of a dynamic disk. Returns the indexes of entries that point past the
/// end of the file (repairable by clearing) and the end of the last block or metadata (at most
/// the file's end).
fn check_blocks(
    file: &HostFile,
    l: &SparseLayout,
    header_at: u64,
    data_end: u64,
    report: &mut CheckReport,
) -> (Vec<usize>, u64) {
    let h = &l.header;
    let bat_len = bat_size(u64::from(h.max_table_entries));
    let mut metadata: Vec<(Range<u64>, &str)> = vec![
        (0..FOOTER_SIZE, "footer copy"),
        (
            header_at..header_at.saturating_add(HEADER_SIZE),
            "dynamic disk header",
        ),
        (
            h.table_offset..h.table_offset.saturating_add(bat_len),
            "block allocation table",
        ),
    ];
    metadata.extend(
        h.parent_locators
            .iter()
            .filter(|p| p.platform_code != 0 && p.data_length > 0)
            .map(|p| {
                (
                    p.data_offset..p.data_offset.saturating_add(u64::from(p.data_length)),
                    "parent locator",
                )
            }),
    );
    let mut end = metadata.iter().map(|(r, _)| r.end).max().unwrap_or(0);
    report.total_clusters = Some(l.bat.len() as u64);
    let mut blocks: Vec<(Range<u64>, usize)> = Vec::new();
    let mut bad = Vec::new();
    let mut fragmented = 0;
    let mut prev_end = None;
    for (i, &e) in l.bat.iter().enumerate() {
        let Some(r) = l.block_range(e) else {
            continue;
        };
        if prev_end.is_some_and(|p| p != r.start) {
            fragmented += 1;
        }
        prev_end = Some(r.end);
        if r.end > data_end {
            report.corruptions += 1;
            report.messages.push(format!(
                "BAT entry {i} (at {:#x}): block at {:#x}..{:#x} extends past the footer at \
                 {data_end:#x}",
                l.entry_offset(i),
                r.start,
                r.end
            ));
            if r.end > file.len() {
                bad.push(i);
                continue;
            }
        }
        for (m, name) in &metadata {
            if r.start < m.end && m.start < r.end {
                report.corruptions += 1;
                report.messages.push(format!(
                    "BAT entry {i} (at {:#x}): block at {:#x} overlaps the {name} at {:#x}",
                    l.entry_offset(i),
                    r.start,
                    m.start
                ));
            }
        }
        end = end.max(r.end);
        blocks.push((r, i));
    }
    blocks.sort_by_key(|(r, _)| r.start);
    for pair in blocks.windows(2) {
        if let [(a, i), (b, j)] = pair
            && b.start < a.end
        {
            report.corruptions += 1;
            report.messages.push(format!(
                "BAT entries {i} and {j}: blocks at {:#x} and {:#x} overlap",
                a.start, b.start
            ));
        }
    }
    report.allocated_clusters = Some(blocks.len() as u64 + bad.len() as u64);
    report.fragmented_clusters = Some(fragmented);
    // Hostile locator or BAT fields may claim ranges past the file; the image ends inside it.
    (bad, end.min(file.len()))
}

/// What a resize did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeOutcome {
    /// The new virtual size (rounded as the image's size rule requires).
    pub virtual_size: u64,
    /// Guest bytes stored in the image that a shrink dropped.
    pub discarded_bytes: u64,
}

/// The size and geometry a resized image gets. Images sized by CHS stay so (rounded up as when
/// creating); images sized by `current_size` take the size in whole sectors.
fn resized_footer(footer: &Footer, requested: u64) -> Result<Footer> {
    let sectors = requested.div_ceil(SECTOR);
    let geometry = if footer.geometry.sectors() == MAX_CHS_SECTORS {
        Geometry::MAX
    } else if footer.sized_by_current_size() {
        Geometry::for_sectors(sectors)
    } else {
        Geometry::covering(sectors)
    };
    let size = if footer.sized_by_current_size() || geometry == Geometry::MAX {
        sectors * SECTOR
    } else {
        geometry.sectors() * SECTOR
    };
    if size > MAX_VIRTUAL_SIZE {
        return Err(Error::invalid(format!(
            "VHD images hold at most 2040 GiB ({MAX_VIRTUAL_SIZE} bytes); {size} requested"
        )));
    }
    Ok(Footer {
        current_size: size,
        geometry,
        ..footer.clone()
    })
}

/// Changes the virtual size of a fixed or dynamic VHD. Shrinking needs `shrink` and drops the
/// data past the new end; a dynamic disk grows only as far as its BAT has room for.
/// Differencing disks are not resized (the parent's data past the old end would show through).
pub fn resize(path: &Path, new_size: u64, shrink: bool) -> Result<ResizeOutcome> {
    let file = HostFile::open(path)?;
    let located = locate_footer(&file)?;
    if let Some(w) = located.warnings.first() {
        return Err(Error::invalid(format!(
            "{}: {w}; repair it first (check -r)",
            path.display()
        )));
    }
    let old = &located.footer;
    let old_size = old.guest_size();
    let new = resized_footer(old, new_size)?;
    let size = new.guest_size();
    if size < old_size && !shrink {
        return Err(Error::invalid(format!(
            "{}: shrinking from {old_size} to {size} bytes drops data; allow it with --shrink",
            path.display()
        )));
    }
    let rw = open_rw(path)?;
    let discarded = match located.disk_type {
        DiskType::Fixed => {
            // Cut the file at the smaller size so nothing stale reappears, then extend with
            // zeros and put the footer after the data.
            rw.set_len(old_size.min(size).min(located.data_end))
                .and_then(|_| rw.set_len(size))
                .map_err(|e| Error::io(path, "set length", e))?;
            write(&rw, path, &new.to_bytes(), size, "VHD footer")?;
            old_size.saturating_sub(size)
        }
        DiskType::Dynamic => resize_dynamic(&file, &rw, &located, &new, size)?,
        DiskType::Differencing => {
            return Err(Error::unsupported(path, "resizing differencing VHDs"));
        }
    };
    rw.sync_all().map_err(|e| Error::io(path, "sync", e))?;
    Ok(ResizeOutcome {
        virtual_size: size,
        discarded_bytes: discarded,
    })
}

fn resize_dynamic(
    file: &HostFile,
    rw: &File,
    located: &LocatedFooter,
    new: &Footer,
    size: u64,
) -> Result<u64> {
    let path = file.path();
    let old_size = located.footer.guest_size();
    let mut l = read_sparse(file, &located.footer, old_size)?;
    let bs = l.block_size;
    let old_entries = l.bat.len();
    let entries = size.div_ceil(bs) as usize;
    let mut header = l.header.clone();
    // qemu reads max_table_entries entries and appends blocks after them: they must exist.
    file.check_range(
        header.table_offset,
        bat_size(u64::from(header.max_table_entries)),
        "VHD block allocation table",
    )?;

    if entries as u64 > u64::from(header.max_table_entries) {
        // The BAT can grow in place up to the first block or parent locator behind it; with
        // nothing behind it, the footer moves.
        let table = header.table_offset;
        let obstacle = l
            .bat
            .iter()
            .filter_map(|&e| l.block_range(e).map(|r| r.start))
            .chain(
                header
                    .parent_locators
                    .iter()
                    .filter(|p| p.platform_code != 0)
                    .map(|p| p.data_offset),
            )
            .filter(|&o| o >= table)
            .min();
        let need = bat_size(entries as u64);
        match obstacle {
            Some(o) if table + need > o => {
                let room = (o - table) / 4;
                return Err(Error::invalid(format!(
                    "{}: the block allocation table has room for {room} entries, so the image \
                     can grow to at most {} bytes (convert it to a new image to grow further)",
                    path.display(),
                    room * bs
                )));
            }
            _ => {}
        }
        header.max_table_entries =
            u32::try_from(entries).map_err(|_| Error::invalid("too many VHD blocks"))?;
    }

    let mut discarded = 0;
    let zeros = vec![0u8; (1 << 20).min(bs) as usize];
    // Blocks past the new end are dropped; the part of the last block past the old or new end
    // is zeroed, so no stale bytes become visible when the image grows.
    for (i, e) in l.bat.iter_mut().enumerate() {
        let Some(r) = (*e != UNALLOCATED).then(|| u64::from(*e) * SECTOR) else {
            continue;
        };
        let block_start = i as u64 * bs;
        let keep = size.saturating_sub(block_start).min(bs);
        let old_visible = old_size.saturating_sub(block_start).min(bs);
        discarded += old_visible.saturating_sub(keep);
        if keep == 0 {
            *e = UNALLOCATED;
        } else if keep.min(old_visible) < bs {
            let data = r + bitmap_size(bs);
            let mut at = keep.min(old_visible);
            while at < bs {
                let n = (bs - at).min(zeros.len() as u64);
                write(rw, path, &zeros[..n as usize], data + at, "VHD block data")?;
                at += n;
            }
        }
    }
    l.bat.resize(entries.max(old_entries), UNALLOCATED);
    write(rw, path, &bat_bytes(&l.bat), header.table_offset, "VHD BAT")?;
    write(
        rw,
        path,
        &header.to_bytes(),
        located.footer.data_offset,
        "VHD dynamic disk header",
    )?;
    let footer = new.to_bytes();
    write(rw, path, &footer, 0, "VHD footer copy")?;
    // The footer goes right after the last block still in use (or the BAT): qemu appends new
    // blocks at the footer, and must not land on dropped blocks whose stale data it would show.
    let footer_at = l
        .bat
        .iter()
        .filter_map(|&e| l.block_range(e).map(|r| r.end))
        .chain([
            header.table_offset + bat_size(u64::from(header.max_table_entries)),
            located.footer.data_offset + HEADER_SIZE,
        ])
        .max()
        .unwrap_or(0);
    write(rw, path, &footer, footer_at, "VHD footer")?;
    rw.set_len(footer_at + FOOTER_SIZE)
        .map_err(|e| Error::io(path, "set length", e))?;
    Ok(discarded)
}

//! Opening a VHDX image and reading its guest view through the BAT.

use super::header::Region;
use super::header::{current_header, region_table};
use super::log::{self, LogLocation, LoggedFile};
use super::metadata::{find_parent, metadata};
use super::*;
use crate::backing::{BackingOpener, Role};
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::{
    Extent, ExtentKind, Format, Image, ImageInfo, check_guest_range, map_backing, read_backing,
};
use serde_json::json;
use std::path::PathBuf;

/// Where a guest run's bytes come from.
enum Source {
    Host(u64),
    Zero,
    /// Not in this file: the parent's bytes (differencing) or zeros.
    Unallocated,
}

pub struct VhdxImage {
    pub(super) file: LoggedFile,
    pub(super) virtual_size: u64,
    pub(super) block_size: u64,
    pub(super) logical_sector_size: u64,
    pub(super) physical_sector_size: u64,
    pub(super) chunk_ratio: u64,
    pub(super) leave_blocks_allocated: bool,
    pub(super) bat: Vec<u64>,
    /// A differencing image: unallocated blocks come from the parent.
    pub(super) has_parent: bool,
    pub(super) parent: Option<Box<dyn Image>>,
    pub(super) parent_name: Option<String>,
    pub(super) parent_path: Option<PathBuf>,
    pub(super) log_replayed: bool,
    /// Problems found while opening that did not prevent reading.
    pub(super) warnings: Vec<String>,
}

/// Where the structures besides the headers lie, and the parent locator of differencing
/// images.
pub(super) struct Layout {
    pub(super) log: LogLocation,
    pub(super) bat: Region,
    pub(super) metadata: Region,
    pub(super) parent_locator: Option<Vec<(String, String)>>,
}

impl VhdxImage {
    pub fn open(host: HostFile, opener: &mut dyn BackingOpener) -> Result<VhdxImage> {
        let (mut image, layout) = Self::read_layout(host)?;
        let path = image.file.host().path().to_path_buf();
        if let Some((at, reason)) = image.bat_problems(layout.bat.offset, 1).into_iter().next() {
            return Err(Error::corrupt(&path, "vhdx BAT entry", at, reason));
        }
        if let Some(locator) = &layout.parent_locator {
            let (name, parent_path) = find_parent(&path, locator)?;
            image.parent = Some(opener.open_backing(
                &path,
                &parent_path,
                Role::Parent,
                None,
                &mut image.warnings,
            )?);
            image.parent_name = Some(name);
            image.parent_path = Some(parent_path);
        }
        Ok(image)
    }

    /// Reads headers, log, region table, metadata and BAT, without checking the BAT's entries
    /// or opening a parent.
    pub(super) fn read_layout(host: HostFile) -> Result<(VhdxImage, Layout)> {
        let path = host.path().to_path_buf();
        let mut magic = [0u8; 8];
        host.read_exact_at(&mut magic, 0, "vhdx file type identifier")?;
        if &magic != MAGIC {
            return Err(Error::corrupt(
                &path,
                "vhdx file type identifier",
                0,
                "signature is not \"vhdxfile\"",
            ));
        }
        let header = current_header(&host)?;
        let log_location = header.log;
        let (file, log_replayed) = log::replay(host, header.log)?;
        let regions = region_table(&file, &log_location)?;
        let region = |g: [u8; 16], name: &str| {
            regions.iter().find(|r| r.guid == g).ok_or_else(|| {
                Error::corrupt(
                    &path,
                    "vhdx region table",
                    REGION_TABLE_OFFSETS[0],
                    format!("no {name} region"),
                )
            })
        };
        let bat_region = region(BAT_REGION, "BAT")?;
        let metadata_region = region(METADATA_REGION, "metadata")?;
        let meta = metadata(&file, metadata_region)?;

        let chunk_ratio = (SECTORS_PER_BITMAP * meta.logical_sector_size) / meta.block_size;
        let payload_blocks = meta.virtual_size.div_ceil(meta.block_size);
        let bat_entries = if meta.has_parent {
            payload_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            payload_blocks + payload_blocks.saturating_sub(1) / chunk_ratio
        };
        if bat_entries * 8 > bat_region.length {
            return Err(Error::corrupt(
                &path,
                "vhdx BAT",
                bat_region.offset,
                format!(
                    "{} bytes hold fewer than the {bat_entries} entries a {}-byte disk needs",
                    bat_region.length, meta.virtual_size
                ),
            ));
        }
        let bat_bytes = file.read_vec_at(bat_region.offset, bat_entries * 8, "vhdx BAT")?;
        let bat: Vec<u64> = bat_bytes.chunks_exact(8).map(LE::read_u64).collect();
        let layout = Layout {
            log: log_location,
            bat: *bat_region,
            metadata: *metadata_region,
            parent_locator: meta.has_parent.then_some(meta.parent_locator),
        };
        let image = VhdxImage {
            file,
            virtual_size: meta.virtual_size,
            block_size: meta.block_size,
            logical_sector_size: meta.logical_sector_size,
            physical_sector_size: meta.physical_sector_size,
            chunk_ratio,
            leave_blocks_allocated: meta.leave_blocks_allocated,
            bat,
            has_parent: layout.parent_locator.is_some(),
            parent: None,
            parent_name: None,
            parent_path: None,
            log_replayed,
            warnings: Vec::new(),
        };
        Ok((image, layout))
    }

    /// Problems of BAT entries (at most `limit`): states that are not allowed, and present
    /// blocks that overlap the headers or lie past the end of the file, with the offset of
    /// each entry. `map` trusts a table without problems.
    fn bat_problems(&self, bat_offset_in_file: u64, limit: usize) -> Vec<(u64, String)> {
        let mut problems = Vec::new();
        for (i, &entry) in self.bat.iter().enumerate() {
            if problems.len() >= limit {
                break;
            }
            let at = bat_offset_in_file + i as u64 * 8;
            if let Err(reason) = self.check_entry(i as u64, entry) {
                problems.push((at, reason));
            }
        }
        problems
    }

    /// Checks BAT entry `i`.
    pub(super) fn check_entry(&self, i: u64, entry: u64) -> std::result::Result<(), String> {
        let state = bat_state(entry);
        if (i + 1).is_multiple_of(self.chunk_ratio + 1) {
            // Only differencing images consult sector bitmaps. Elsewhere the entries are
            // unused, and qemu before 8.0 left garbage in them: ignore them there.
            return match state {
                _ if !self.has_parent => Ok(()),
                SB_NOT_PRESENT => Ok(()),
                SB_PRESENT => self.check_block(entry, MIB),
                s => Err(format!("sector bitmap entry in state {s}")),
            };
        }
        let block = i - i / (self.chunk_ratio + 1);
        let block_start = block * self.block_size;
        if block_start >= self.virtual_size {
            return Ok(());
        }
        let needed = self.block_size.min(self.virtual_size - block_start);
        match state {
            PAYLOAD_NOT_PRESENT
            | PAYLOAD_UNDEFINED
            | PAYLOAD_ZERO
            | PAYLOAD_UNMAPPED
            | PAYLOAD_UNMAPPED_V095 => Ok(()),
            PAYLOAD_FULLY_PRESENT => self.check_block(entry, needed),
            PAYLOAD_PARTIALLY_PRESENT if self.has_parent => {
                self.check_block(entry, needed)?;
                if bat_state(self.bitmap_entry(block)) != SB_PRESENT {
                    return Err("partially present block without a sector bitmap".into());
                }
                Ok(())
            }
            s => Err(format!("payload block entry in state {s}")),
        }
    }

    /// True when BAT entry `i` (valid) points at bytes of the file that this image uses.
    pub(super) fn entry_is_stored(&self, i: u64, entry: u64) -> bool {
        let state = bat_state(entry);
        if (i + 1).is_multiple_of(self.chunk_ratio + 1) {
            return self.has_parent && state == SB_PRESENT;
        }
        let block = i - i / (self.chunk_ratio + 1);
        block * self.block_size < self.virtual_size
            && (state == PAYLOAD_FULLY_PRESENT
                || (self.has_parent && state == PAYLOAD_PARTIALLY_PRESENT))
    }

    fn check_block(&self, entry: u64, len: u64) -> std::result::Result<(), String> {
        let offset = bat_offset(entry);
        if offset < MIB {
            return Err(format!("block at {offset:#x} overlaps the headers"));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.file.len() => Ok(()),
            _ => Err(format!(
                "block at {offset:#x} runs past the end of the file ({:#x})",
                self.file.len()
            )),
        }
    }

    fn payload_entry(&self, block: u64) -> u64 {
        let index = block + block / self.chunk_ratio;
        self.bat.get(index as usize).copied().unwrap_or(0)
    }

    fn bitmap_entry(&self, block: u64) -> u64 {
        let chunk = block / self.chunk_ratio;
        let index = chunk * (self.chunk_ratio + 1) + self.chunk_ratio;
        self.bat.get(index as usize).copied().unwrap_or(0)
    }

    /// What backs the guest bytes from `offset` on, for how many bytes (at most `max_len`): the
    /// following blocks join the run while they read the same way (data that follows on in the
    /// file, zeros, or unallocated); a partially present block is split by its sector bitmap.
    fn locate(&self, offset: u64, max_len: u64) -> Result<(Source, u64)> {
        let block = offset / self.block_size;
        let within = offset % self.block_size;
        let first_len = max_len.min(self.block_size - within);
        let entry = self.payload_entry(block);
        let source = match self.block_source(entry) {
            Some(source) => source,
            None => return self.locate_partial(block, entry, within, first_len),
        };
        let source = match source {
            Source::Host(at) => Source::Host(at + within),
            other => other,
        };
        let mut len = first_len;
        let mut next = block + 1;
        while len < max_len {
            let joins = match (&source, self.block_source(self.payload_entry(next))) {
                (Source::Host(at), Some(Source::Host(b))) => Some(b) == at.checked_add(len),
                (Source::Zero, Some(Source::Zero))
                | (Source::Unallocated, Some(Source::Unallocated)) => true,
                _ => false,
            };
            if !joins {
                break;
            }
            len = (len + self.block_size).min(max_len);
            next += 1;
        }
        Ok((source, len))
    }

    /// How a whole payload block reads, from its BAT entry; `None` for a partially present one.
    fn block_source(&self, entry: u64) -> Option<Source> {
        Some(match bat_state(entry) {
            PAYLOAD_FULLY_PRESENT => Source::Host(bat_offset(entry)),
            PAYLOAD_PARTIALLY_PRESENT => return None,
            PAYLOAD_NOT_PRESENT => Source::Unallocated,
            // ZERO, and UNDEFINED/UNMAPPED whose contents the file does not define: zeros.
            _ => Source::Zero,
        })
    }

    /// Splits a partially present block by its sector bitmap: set bits are in this file, clear
    /// bits in the parent.
    fn locate_partial(
        &self,
        block: u64,
        entry: u64,
        within: u64,
        len: u64,
    ) -> Result<(Source, u64)> {
        let sector_size = self.logical_sector_size;
        let first = within / sector_size;
        let last = (within + len).div_ceil(sector_size);
        // Sector index of the block's first sector inside its chunk's bitmap.
        let base = (block % self.chunk_ratio) * (self.block_size / sector_size);
        let (from_bit, to_bit) = (base + first, base + last);
        let bitmap_at = bat_offset(self.bitmap_entry(block)) + from_bit / 8;
        let bytes = self.file.read_vec_at(
            bitmap_at,
            (to_bit.div_ceil(8)) - from_bit / 8,
            "vhdx sector bitmap",
        )?;
        let bit = |n: u64| {
            let rel = n - (from_bit - from_bit % 8);
            bytes
                .get((rel / 8) as usize)
                .is_some_and(|b| b & (1 << (rel % 8)) != 0)
        };
        let present = bit(from_bit);
        let mut n = from_bit + 1;
        while n < to_bit && bit(n) == present {
            n += 1;
        }
        let run_end = ((n - base) * sector_size).min(within + len);
        let run = run_end - within;
        Ok(if present {
            (Source::Host(bat_offset(entry) + within), run)
        } else {
            (Source::Unallocated, run)
        })
    }

    fn subformat(&self) -> &'static str {
        if self.parent.is_some() {
            "differencing"
        } else if self.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        }
    }
}

impl Image for VhdxImage {
    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_guest_range(self.virtual_size, offset, 1)?;
        let max_len = max_len.min(self.virtual_size - offset);
        let (source, mut length) = self.locate(offset, max_len)?;
        let kind = match source {
            Source::Host(at) => {
                // Blocks are often sparse on the host (qemu's fixed images are): holes read as
                // zeros, so map them as such and spare readers the work.
                let (data, run) = self.file.data_run(at, length)?;
                length = run;
                if data {
                    ExtentKind::Data { offset: at }
                } else {
                    ExtentKind::Zero
                }
            }
            Source::Zero => ExtentKind::Zero,
            Source::Unallocated => return map_backing(self.parent.as_deref(), offset, length),
        };
        Ok(Extent {
            start: offset,
            length,
            kind,
            depth: 0,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.virtual_size, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (source, len) = self.locate(pos, (buf.len() - done) as u64)?;
            let out = &mut buf[done..done + len as usize];
            match source {
                Source::Host(at) => self.file.read_exact_at(out, at, "vhdx payload block")?,
                Source::Zero => out.fill(0),
                Source::Unallocated => read_backing(self.parent.as_deref(), out, pos)?,
            }
            done += len as usize;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        let host = self.file.host();
        let mut info = ImageInfo::basic(
            host.path().to_path_buf(),
            Format::Vhdx,
            self.virtual_size,
            host.allocated_bytes(),
        );
        info.cluster_size = Some(self.block_size);
        info.format_specific = Some(json!({
            "type": "vhdx",
            "data": {
                "subformat": self.subformat(),
                "block-size": self.block_size,
                "logical-sector-size": self.logical_sector_size,
                "physical-sector-size": self.physical_sector_size,
                "log-replayed": self.log_replayed,
            }
        }));
        info.warnings = self.warnings.clone();
        if self.log_replayed {
            info.warnings.push(
                "the metadata log was not empty: it was replayed in memory (the file is unchanged)"
                    .into(),
            );
        }
        if let Some(p) = &self.parent {
            info.backing_filename = self.parent_name.clone();
            info.full_backing_filename = self.parent_path.clone();
            info.backing_filename_format = Some(p.format().to_string());
        }
        info
    }

    fn backing(&self) -> Option<&dyn Image> {
        self.parent.as_deref()
    }
}

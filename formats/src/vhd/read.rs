//! Reading VHD images: fixed, dynamic and differencing disks.

use super::layout::*;
use super::locate::{LocatedFooter, SparseLayout, checked_guest_size, locate_footer, read_sparse};
use super::parent::{Parent, open_parent};
use crate::backing::BackingOpener;
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::{
    Extent, ExtentKind, Format, Image, ImageInfo, check_guest_range, map_backing, read_backing,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Memory the bitmap cache may hold.
const BITMAP_CACHE_BYTES: u64 = 16 << 20;

/// A block's sector bitmap, reduced to the common all-set / all-clear cases.
enum Bitmap {
    Full,
    Empty,
    Bits(Box<[u8]>),
}

impl Bitmap {
    fn classify(bits: Vec<u8>, sectors: u64) -> Bitmap {
        let set = (0..sectors).filter(|&i| bitmap_bit(&bits, i)).count() as u64;
        if set == sectors {
            Bitmap::Full
        } else if set == 0 {
            Bitmap::Empty
        } else {
            Bitmap::Bits(bits.into_boxed_slice())
        }
    }

    /// Whether sector `first` is present, and the end of the run of sectors alike, at most `end`.
    fn run(&self, first: u64, end: u64) -> (bool, u64) {
        match self {
            Bitmap::Full => (true, end),
            Bitmap::Empty => (false, end),
            Bitmap::Bits(b) => {
                let present = bitmap_bit(b, first);
                let run_end = (first + 1..end)
                    .find(|&i| bitmap_bit(b, i) != present)
                    .unwrap_or(end);
                (present, run_end)
            }
        }
    }
}

struct Sparse {
    layout: SparseLayout,
    bitmaps: Mutex<HashMap<u64, Arc<Bitmap>>>,
    bitmap_cache_entries: usize,
}

/// An opened VHD image.
pub struct VhdImage {
    file: HostFile,
    footer: Footer,
    disk_type: DiskType,
    virtual_size: u64,
    sparse: Option<Sparse>,
    parent: Option<Parent>,
    warnings: Vec<String>,
}

/// Where a guest range of one layer lives.
enum Location {
    /// Stored in this file at the given offset.
    Here(u64),
    /// Not present in this layer: zeros, or the parent's data for differencing disks.
    Absent,
}

impl VhdImage {
    /// Opens a VHD; `opener` opens the parent of a differencing disk.
    pub fn open(file: HostFile, opener: &mut dyn BackingOpener) -> Result<VhdImage> {
        let located = locate_footer(&file)?;
        let virtual_size = checked_guest_size(&file, &located)?;
        let LocatedFooter {
            footer,
            disk_type,
            mut warnings,
            ..
        } = located;
        let (sparse, parent) = match disk_type {
            DiskType::Fixed => (None, None),
            DiskType::Dynamic | DiskType::Differencing => {
                let layout = read_sparse(&file, &footer, virtual_size)?;
                let parent = if disk_type == DiskType::Differencing {
                    Some(open_parent(&file, &layout.header, opener, &mut warnings)?)
                } else {
                    None
                };
                let per_entry = layout.bitmap_size.max(64);
                let sparse = Sparse {
                    bitmap_cache_entries: (BITMAP_CACHE_BYTES / per_entry).max(4) as usize,
                    layout,
                    bitmaps: Mutex::new(HashMap::new()),
                };
                (Some(sparse), parent)
            }
        };
        Ok(VhdImage {
            file,
            footer,
            disk_type,
            virtual_size,
            sparse,
            parent,
            warnings,
        })
    }

    /// The disk's unique identifier (footer), which a differencing child records as its parent's.
    pub fn uuid(&self) -> [u8; 16] {
        self.footer.uuid
    }

    fn bitmap(&self, s: &Sparse, block: u64, entry: u32) -> Result<Arc<Bitmap>> {
        let cached = s
            .bitmaps
            .lock()
            .map_err(|_| Error::invalid("VHD bitmap cache poisoned"))?
            .get(&block)
            .cloned();
        if let Some(b) = cached {
            return Ok(b);
        }
        let l = &s.layout;
        let bits =
            self.file
                .read_vec_at(l.block_offset(entry), l.bitmap_size, "VHD block bitmap")?;
        let bitmap = Arc::new(Bitmap::classify(bits, l.block_size / SECTOR));
        let mut cache = s
            .bitmaps
            .lock()
            .map_err(|_| Error::invalid("VHD bitmap cache poisoned"))?;
        if cache.len() >= s.bitmap_cache_entries {
            cache.clear();
        }
        cache.insert(block, bitmap.clone());
        Ok(bitmap)
    }

    /// Where the bytes at `offset` live, and for how many bytes (at most `max_len`) that holds.
    fn locate(&self, offset: u64, max_len: u64) -> Result<(Location, u64)> {
        let Some(s) = &self.sparse else {
            return Ok((Location::Here(offset), max_len));
        };
        let l = &s.layout;
        let bs = l.block_size;
        let end = offset + max_len;
        let block = offset / bs;
        let entry_of = |b: u64| l.bat.get(b as usize).copied().unwrap_or(UNALLOCATED);
        let entry = entry_of(block);
        if entry == UNALLOCATED {
            let mut run_end = (block + 1) * bs;
            while run_end < end && entry_of(run_end / bs) == UNALLOCATED {
                run_end += bs;
            }
            return Ok((Location::Absent, run_end.min(end) - offset));
        }
        let within = offset % bs;
        let bitmap = self.bitmap(s, block, entry)?;
        let (present, run_end) = bitmap.run(within / SECTOR, bs / SECTOR);
        let len = (run_end * SECTOR - within).min(max_len);
        Ok(if present {
            let host = l.block_offset(entry) + l.bitmap_size + within;
            (Location::Here(host), len)
        } else {
            (Location::Absent, len)
        })
    }

    /// A fixed disk's data area is a raw image: holes of a sparse file map as zeros.
    fn map_fixed(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let (kind, end) = match self.file.next_data(offset)? {
            Some(d) if d == offset => (
                ExtentKind::Data { offset },
                self.file.next_hole(offset)?.max(offset + 1),
            ),
            Some(d) => (ExtentKind::Zero, d),
            None => (ExtentKind::Zero, u64::MAX),
        };
        Ok(Extent {
            start: offset,
            length: (end - offset).min(max_len),
            kind,
            depth: 0,
        })
    }

    fn parent_image(&self) -> Option<&dyn Image> {
        self.parent.as_ref().map(|p| p.image.as_ref())
    }
}

impl Image for VhdImage {
    fn format(&self) -> Format {
        Format::Vhd
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_guest_range(self.virtual_size, offset, 1)?;
        let max_len = max_len.min(self.virtual_size - offset);
        if self.sparse.is_none() {
            return self.map_fixed(offset, max_len);
        }
        match self.locate(offset, max_len)? {
            (Location::Here(host), length) => Ok(Extent {
                start: offset,
                length,
                kind: ExtentKind::Data { offset: host },
                depth: 0,
            }),
            (Location::Absent, length) => map_backing(self.parent_image(), offset, length),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.virtual_size, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (loc, len) = self.locate(pos, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + len as usize];
            match loc {
                Location::Here(host) => self.file.read_exact_at(chunk, host, "VHD data")?,
                Location::Absent => read_backing(self.parent_image(), chunk, pos)?,
            }
            done += len as usize;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        let mut info = ImageInfo::basic(
            self.file.path().to_path_buf(),
            Format::Vhd,
            self.virtual_size,
            self.file.allocated_bytes(),
        );
        info.cluster_size = self.sparse.as_ref().map(|s| s.layout.block_size);
        let mut data = serde_json::json!({
            "subformat": self.disk_type.name(),
            "creator": self.footer.creator_app_str(),
            "uuid": uuid_string(&self.footer.uuid),
        });
        if let Some(s) = &self.sparse
            && self.disk_type == DiskType::Differencing
        {
            data["parent-uuid"] = uuid_string(&s.layout.header.parent_uuid).into();
        }
        info.format_specific = Some(serde_json::json!({"type": "vpc", "data": data}));
        if let Some(p) = &self.parent {
            info.backing_filename = Some(p.recorded.clone());
            info.full_backing_filename = Some(p.path.clone());
            info.backing_filename_format = Some(p.image.format().name().to_string());
        }
        info.warnings = self.warnings.clone();
        info
    }

    fn backing(&self) -> Option<&dyn Image> {
        self.parent_image()
    }
}

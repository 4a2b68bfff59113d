//! Reading VHD images: fixed, dynamic and differencing disks.

use super::layout::*;
use crate::backing::{BackingOpener, Role};
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::{
    Extent, ExtentKind, Format, Image, ImageInfo, check_guest_range, map_backing, read_backing,
};
use crate::registry::detect;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Longest parent locator diskkit reads (a path, UTF-16).
const MAX_LOCATOR_LEN: u32 = 64 << 10;
/// Memory the bitmap cache may hold.
const BITMAP_CACHE_BYTES: u64 = 16 << 20;

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

/// The parent of a differencing disk.
struct Parent {
    image: Box<dyn Image>,
    /// The locator or name it was found by, as recorded in the child.
    recorded: String,
    path: PathBuf,
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
fn open_parent(
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

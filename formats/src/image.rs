//! The image model shared by every format: a virtual size, an extent map that says what backs each
//! guest range without reading data, and positioned reads of guest content.

mod walk;

pub use walk::{
    DataRanges, GuestRange, Step, TouchedClusters, Walk, allocated_ranges, for_each_piece,
    read_filled, touched_clusters, with_bytes,
};

use crate::error::{Error, Result};
use serde::Serialize;
use std::fmt;
use std::path::PathBuf;

/// Image formats diskkit knows. `name()` is qemu's driver name where qemu has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Raw,
    Qcow2,
    /// Microsoft VHD (qemu calls the driver "vpc").
    Vhd,
    Vhdx,
    Vmdk,
    Iso,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vhd => "vpc",
            Format::Vhdx => "vhdx",
            Format::Vmdk => "vmdk",
            Format::Iso => "iso",
        }
    }

    /// Parses a format name as users type it (`vpc` and `vhd` are the same format).
    pub fn parse(s: &str) -> Result<Format> {
        match s.to_ascii_lowercase().as_str() {
            "raw" | "file" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "vpc" | "vhd" => Ok(Format::Vhd),
            "vhdx" => Ok(Format::Vhdx),
            "vmdk" => Ok(Format::Vmdk),
            "iso" | "iso9660" => Ok(Format::Iso),
            other => Err(Error::invalid(format!(
                "unknown format '{other}' (known: raw, qcow2, vpc/vhd, vhdx, vmdk, iso)"
            ))),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What backs a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Uncompressed guest data stored contiguously at `offset` in the host file of layer `depth`
    /// (the external data file for qcow2 images that have one).
    Data { offset: u64 },
    /// Guest data stored compressed; reading it costs decompression.
    Compressed,
    /// Allocated in some layer and reads as zeros (qcow2 zero cluster, hole of a raw file).
    Zero,
    /// Not allocated in any layer of the chain: reads as zeros.
    Unallocated,
}

/// One run of guest bytes with the same backing kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub kind: ExtentKind,
    /// Layer of the backing chain that provides the range: 0 is the image itself.
    pub depth: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.length
    }

    pub fn range(&self) -> GuestRange {
        GuestRange::new(self.start, self.end())
    }

    /// True when the range reads as zeros without reading anything.
    pub fn is_zero(&self) -> bool {
        matches!(self.kind, ExtentKind::Zero | ExtentKind::Unallocated)
    }
}

/// An internal snapshot (qcow2), as `qemu-img snapshot -l` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    #[serde(rename = "date-sec")]
    pub date_sec: u64,
    #[serde(rename = "date-nsec")]
    pub date_nsec: u32,
    #[serde(rename = "vm-clock-sec")]
    pub vm_clock_sec: u64,
    #[serde(rename = "vm-clock-nsec")]
    pub vm_clock_nsec: u32,
    #[serde(rename = "vm-state-size")]
    pub vm_state_size: u64,
    /// Guest size recorded with the snapshot.
    #[serde(rename = "virtual-size", skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
}

/// What `info` reports about one image (one layer of a chain). Field names in JSON follow
/// `qemu-img info --output=json`.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub filename: PathBuf,
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// Bytes the image occupies on the host (qemu's "disk size").
    #[serde(rename = "actual-size")]
    pub actual_size: u64,
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// Backing file name as recorded in the image.
    #[serde(rename = "backing-filename", skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Backing file path resolved against the image's directory.
    #[serde(
        rename = "full-backing-filename",
        skip_serializing_if = "Option::is_none"
    )]
    pub full_backing_filename: Option<PathBuf>,
    #[serde(
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    pub backing_filename_format: Option<String>,
    #[serde(rename = "dirty-flag")]
    pub dirty_flag: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    /// Format-specific details as qemu reports them: `{"type": "qcow2", "data": {...}}`.
    #[serde(rename = "format-specific", skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<serde_json::Value>,
    /// Problems found while opening that did not prevent reading (corrupt flag, lazy refcounts).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl ImageInfo {
    /// Info with the fields every format has; drivers fill in the rest.
    pub fn basic(filename: PathBuf, format: Format, virtual_size: u64, actual_size: u64) -> Self {
        ImageInfo {
            filename,
            format: format.name().to_string(),
            virtual_size,
            actual_size,
            cluster_size: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            dirty_flag: false,
            snapshots: Vec::new(),
            format_specific: None,
            warnings: Vec::new(),
        }
    }
}

/// An opened disk image: the guest view of one file (and its backing chain).
///
/// Implementations are shared between threads: `map` and `read_at` take `&self` and may be
/// called concurrently, so callers can read several ranges in parallel.
pub trait Image: Send + Sync {
    fn format(&self) -> Format;

    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;

    /// Describes the guest bytes starting at `offset`: the returned extent starts at `offset`, is
    /// at least one byte and at most `max_len` bytes long, and never crosses the virtual size.
    /// Reads metadata only, never guest data. `offset` must be below the virtual size.
    fn map(&self, offset: u64, max_len: u64) -> Result<Extent>;

    /// Fills `buf` with guest content starting at `offset`. The range must lie inside the
    /// virtual size.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Calls `f` on guest bytes `offset..offset + len` where they lie, uncompressed and
    /// contiguous, in memory already (a host file mapped in memory, a decoded chunk held in a
    /// cache), and returns true; returns false without
    /// calling it when they do not (or the format does not say), and `read_at` must be used.
    /// Lets hashing work on data without copying it.
    fn with_mapped(&self, offset: u64, len: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool> {
        let _ = (offset, len, f);
        Ok(false)
    }

    /// Bytes worth reading at once, when reads have a fixed cost that small ones would pay
    /// too often (a request to a remote store); 0 when any size does.
    fn optimal_transfer(&self) -> u64 {
        0
    }

    /// Everything `info` shows about this layer.
    fn info(&self) -> ImageInfo;

    /// The backing image, for formats with backing chains.
    fn backing(&self) -> Option<&dyn Image> {
        None
    }
}

/// Index of the first non-zero byte of `buf`. Scans word-sized blocks first: this runs over every
/// byte of data that convert, compare and hash read.
pub fn first_nonzero_byte(buf: &[u8]) -> Option<usize> {
    const BLOCK: usize = 256;
    let mut base = 0;
    for block in buf.chunks(BLOCK) {
        // Fixed-size words OR-ed together compile to vector code that runs at memory speed.
        let words = block.chunks_exact(16);
        let tail = words.remainder();
        let all_zero = words.fold(0u128, |acc, w| {
            acc | u128::from_ne_bytes(w.try_into().unwrap_or([1; 16]))
        }) == 0
            && tail.iter().all(|&b| b == 0);
        if !all_zero {
            return block.iter().position(|&b| b != 0).map(|i| base + i);
        }
        base += block.len();
    }
    None
}

/// Checks a guest request against the virtual size; every driver's `read_at` and `map` start here.
pub fn check_guest_range(size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::invalid(format!(
            "guest range {offset:#x}+{len:#x} is outside the virtual size {size:#x}"
        ))),
    }
}

/// Maps a range that a layer leaves unallocated: it comes from the backing image one level
/// deeper, or reads as zeros past the backing image's end or without a backing image.
pub fn map_backing(backing: Option<&dyn Image>, offset: u64, max_len: u64) -> Result<Extent> {
    if let Some(b) = backing
        && offset < b.virtual_size()
    {
        let mut e = b.map(offset, max_len.min(b.virtual_size() - offset))?;
        e.depth += 1;
        return Ok(e);
    }
    Ok(Extent {
        start: offset,
        length: max_len,
        kind: ExtentKind::Unallocated,
        depth: 0,
    })
}

/// Reads a range that a layer leaves unallocated from the backing image; bytes past the backing
/// image's end, or without a backing image, read as zeros.
pub fn read_backing(backing: Option<&dyn Image>, buf: &mut [u8], offset: u64) -> Result<()> {
    let from_backing = match backing {
        Some(b) if offset < b.virtual_size() => {
            let n = (b.virtual_size() - offset).min(buf.len() as u64) as usize;
            b.read_at(&mut buf[..n], offset)?;
            n
        }
        _ => 0,
    };
    buf[from_backing..].fill(0);
    Ok(())
}

/// Iterates over the extents of `image` between `start` and `end`, merging neighbours of the same
/// kind and depth (and contiguous host offsets) into one extent. A map error ends the walk; the
/// extents before it come first.
pub struct Extents<'a> {
    image: &'a dyn Image,
    pos: u64,
    end: u64,
    pending: Option<Extent>,
    /// A map error met while `pending` was still being extended: returned right after it.
    error: Option<Error>,
}

impl<'a> Extents<'a> {
    pub fn new(image: &'a dyn Image, start: u64, end: u64) -> Self {
        Extents {
            image,
            pos: start,
            end: end.min(image.virtual_size()),
            pending: None,
            error: None,
        }
    }

    /// Ends the walk with `err`, after the extent being merged if there is one.
    fn fail(&mut self, err: Error) -> Option<Result<Extent>> {
        self.pos = self.end;
        match self.pending.take() {
            Some(p) => {
                self.error = Some(err);
                Some(Ok(p))
            }
            None => Some(Err(err)),
        }
    }
}

fn mergeable(a: &Extent, b: &Extent) -> bool {
    a.depth == b.depth
        && a.end() == b.start
        && match (a.kind, b.kind) {
            (ExtentKind::Data { offset: x }, ExtentKind::Data { offset: y }) => {
                x.checked_add(a.length) == Some(y)
            }
            (x, y) => x == y,
        }
}

impl Iterator for Extents<'_> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Result<Extent>> {
        if let Some(err) = self.error.take() {
            return Some(Err(err));
        }
        loop {
            if self.pos >= self.end {
                return self.pending.take().map(Ok);
            }
            let e = match self.image.map(self.pos, self.end - self.pos) {
                Ok(e) => e,
                Err(err) => return self.fail(err),
            };
            if e.start != self.pos || e.length == 0 || e.length > self.end - self.pos {
                let err = Error::invalid(format!(
                    "{} driver returned a bad extent {:?} for offset {:#x}",
                    self.image.format(),
                    e,
                    self.pos
                ));
                return self.fail(err);
            }
            self.pos = e.end();
            match self.pending.as_mut() {
                Some(p) if mergeable(p, &e) => p.length += e.length,
                Some(_) => return self.pending.replace(e).map(Ok),
                None => self.pending = Some(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::first_nonzero_byte;

    #[test]
    fn first_nonzero_byte_finds_every_position() {
        for len in [0, 1, 15, 16, 17, 255, 256, 257, 1000] {
            let mut buf = vec![0u8; len];
            assert_eq!(first_nonzero_byte(&buf), None, "len {len}");
            for at in (0..len).rev() {
                buf[at] = 7;
                assert_eq!(first_nonzero_byte(&buf), Some(at), "len {len} at {at}");
            }
        }
    }
}

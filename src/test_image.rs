//! An in-memory image for the engine's unit tests.

use diskkit_formats::image::GuestRange;
use diskkit_formats::{Extent, ExtentKind, Format, Image, ImageInfo, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// An in-memory image whose map calls `data` ranges data and the rest zero; `mapped` makes its
/// data readable in place, like a raw file's; `transfer` is its optimal transfer size; `reads`
/// counts calls of `read_at`.
pub struct MemImage {
    pub bytes: Vec<u8>,
    pub data: Vec<GuestRange>,
    pub mapped: bool,
    pub transfer: u64,
    pub reads: AtomicU64,
}

impl MemImage {
    /// An image of `size` bytes holding `writes` (offset, bytes) as data, zeros elsewhere.
    pub fn new(size: usize, writes: &[(u64, &[u8])]) -> Self {
        let mut bytes = vec![0; size];
        let mut data = Vec::new();
        for &(off, buf) in writes {
            bytes[off as usize..off as usize + buf.len()].copy_from_slice(buf);
            data.push(GuestRange::new(off, off + buf.len() as u64));
        }
        data.sort();
        MemImage {
            bytes,
            data,
            mapped: false,
            transfer: 0,
            reads: AtomicU64::new(0),
        }
    }

    pub fn mapped(self) -> Self {
        MemImage {
            mapped: true,
            ..self
        }
    }
}

impl Image for MemImage {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let end = offset + max_len.min(self.virtual_size() - offset);
        let (kind, until) = match self.data.iter().find(|r| r.end > offset) {
            Some(r) if r.start <= offset => (ExtentKind::Data { offset }, r.end),
            Some(r) => (ExtentKind::Zero, r.start),
            None => (ExtentKind::Zero, end),
        };
        Ok(Extent {
            start: offset,
            length: until.min(end) - offset,
            kind,
            depth: 0,
        })
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        buf.copy_from_slice(&self.bytes[offset as usize..offset as usize + buf.len()]);
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn optimal_transfer(&self) -> u64 {
        self.transfer
    }
    fn with_mapped(&self, offset: u64, len: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool> {
        // Data ranges only, as a format maps the bytes it stores.
        let inside = self
            .data
            .iter()
            .any(|r| r.start <= offset && offset + len <= r.end);
        if self.mapped && inside {
            f(&self.bytes[offset as usize..(offset + len) as usize]);
        }
        Ok(self.mapped && inside)
    }
    fn info(&self) -> ImageInfo {
        ImageInfo::basic(PathBuf::from("mem"), Format::Raw, self.virtual_size(), 0)
    }
}

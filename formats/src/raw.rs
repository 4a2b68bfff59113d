//! Raw images: the guest view is the file itself. Holes (SEEK_HOLE) read as zeros and are mapped
//! as zero extents, so a sparse raw file costs only its allocated data.
//!
//! A guest is whole 512-byte sectors, as qemu sees it: a file whose length is not a multiple of
//! 512 is a disk of the next whole sector, whose missing tail reads as zeros.

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::{Extent, ExtentKind, Format, Image, ImageInfo, check_guest_range};
use crate::write::{CreateOptions, ImageWriter, Measure};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub struct RawImage {
    file: HostFile,
    /// The format the user sees: an ISO's guest view is its bytes, read by this driver.
    format: Format,
}

impl RawImage {
    pub fn open(file: HostFile) -> Self {
        RawImage {
            file,
            format: Format::Raw,
        }
    }

    /// A raw view reported under another format name (ISO images are raw byte streams).
    pub fn with_format(file: HostFile, format: Format) -> Self {
        RawImage { file, format }
    }

    pub fn host(&self) -> &HostFile {
        &self.file
    }

    fn guest_size(&self) -> u64 {
        self.file.len().div_ceil(SECTOR) * SECTOR
    }
}

/// qemu's unit of a raw disk's size.
const SECTOR: u64 = 512;

impl Image for RawImage {
    fn format(&self) -> Format {
        self.format
    }

    fn virtual_size(&self) -> u64 {
        self.guest_size()
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_guest_range(self.guest_size(), offset, 1)?;
        let max_len = max_len.min(self.guest_size() - offset);
        // Past the end of the file `data_run` finds no data: the tail of the last sector is zero.
        let (data, length) = self.file.data_run(offset, max_len)?;
        Ok(Extent {
            start: offset,
            length,
            kind: if data {
                ExtentKind::Data { offset }
            } else {
                ExtentKind::Zero
            },
            depth: 0,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.guest_size(), offset, buf.len() as u64)?;
        self.file.read_zero_padded_at(buf, offset)
    }

    fn with_mapped(&self, offset: u64, len: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool> {
        check_guest_range(self.guest_size(), offset, len)?;
        Ok(self.file.with_mapped(offset, len, f))
    }

    fn info(&self) -> ImageInfo {
        ImageInfo::basic(
            self.file.path().to_path_buf(),
            self.format,
            self.guest_size(),
            self.file.allocated_bytes(),
        )
    }
}

/// How `create` reserves the space of a new raw image (`-o preallocation=...`, as qemu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Preallocation {
    /// A sparse file: blocks are allocated as data is written.
    Off,
    /// Blocks reserved with fallocate(2): no data written, no later ENOSPC.
    Falloc,
    /// Every byte written with zeros.
    Full,
}

/// Writes a raw image: guest offset = file offset.
pub struct RawWriter {
    file: HostFile,
    /// A new file reads as zeros everywhere; an existing target (`convert -n`) does not.
    fresh: bool,
    writeback: crate::write::Writeback,
}

impl RawWriter {
    /// Creates (or truncates) `path` as a sparse file of `virtual_size` bytes. Takes the
    /// `preallocation` option.
    pub fn create(path: &Path, virtual_size: u64, opts: &mut CreateOptions) -> Result<Self> {
        let prealloc = match opts.take("preallocation").as_deref() {
            None | Some("off") => Preallocation::Off,
            Some("falloc") => Preallocation::Falloc,
            Some("full") => Preallocation::Full,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "raw: preallocation '{other}' is not one of off, falloc, full"
                )));
            }
        };
        if opts.backing_file.is_some() {
            return Err(Error::invalid("raw images cannot have a backing file"));
        }
        if opts.compress {
            return Err(Error::invalid("raw images cannot be compressed"));
        }
        opts.reject_unknown(Format::Raw)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(path, "create", e))?;
        file.set_len(virtual_size)
            .map_err(|e| Error::io(path, "set size", e))?;
        match prealloc {
            Preallocation::Off => {}
            Preallocation::Falloc => fallocate(&file, path, 0, 0, virtual_size)?,
            Preallocation::Full => write_zeros(&file, path, 0, virtual_size)?,
        }
        Ok(RawWriter {
            file: HostFile::from_file(path, file)?,
            fresh: true,
            writeback: crate::write::Writeback::for_file(opts.cache, path),
        })
    }

    /// Opens an existing file or block device to overwrite its content (`convert -n`). Its size
    /// stays as it is.
    pub fn open_existing(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, "open for writing", e))?;
        Ok(RawWriter {
            file: HostFile::from_file(path, file)?,
            fresh: false,
            writeback: Default::default(),
        })
    }

    fn path(&self) -> &Path {
        self.file.path()
    }
}

impl ImageWriter for RawWriter {
    fn virtual_size(&self) -> u64 {
        self.file.len()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_guest_range(self.file.len(), offset, buf.len() as u64)?;
        self.writeback
            .write_at(self.file.file()?, self.path(), buf, offset, "image data")
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_guest_range(self.file.len(), offset, len)?;
        if self.fresh {
            return Ok(());
        }
        zero_range(self.file.file()?, self.path(), offset, len)
    }

    fn zero_initialized(&self) -> bool {
        self.fresh
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.writeback.sync_all(self.file.file()?, self.path())
    }
}

/// Changes the size of a raw image: growing adds a hole, shrinking drops the tail.
pub fn resize(path: &Path, new_size: u64) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, "open for writing", e))?;
    file.set_len(new_size)
        .map_err(|e| Error::io(path, "resize", e))?;
    file.sync_all().map_err(|e| Error::io(path, "sync", e))
}

/// What a new raw image takes on the host: every guest byte, as qemu-img measure reports for raw
/// (it cannot promise that the file stays sparse).
pub fn measure(virtual_size: u64) -> Measure {
    Measure {
        required: virtual_size,
        fully_allocated: virtual_size,
    }
}

fn fallocate(file: &File, path: &Path, mode: libc::c_int, offset: u64, len: u64) -> Result<()> {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(Error::invalid(format!(
            "{}: range {offset:#x}+{len:#x} too large",
            path.display()
        )));
    };
    if n == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a descriptor we own, with a checked range; it touches no memory.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
    if r == 0 {
        Ok(())
    } else {
        Err(Error::io(
            path,
            format!("fallocate {offset:#x}+{len:#x}"),
            std::io::Error::last_os_error(),
        ))
    }
}

/// Makes a range of an existing file read as zeros: punches a hole (keeping the file size), or
/// writes the zeros on filesystems and devices that cannot punch holes.
pub(crate) fn zero_range(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, path, punch, offset, len) {
        Ok(()) => Ok(()),
        Err(Error::Io { source, .. })
            if matches!(
                source.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENODEV) | Some(libc::EINVAL)
            ) =>
        {
            write_zeros(file, path, offset, len)
        }
        Err(e) => Err(e),
    }
}

/// Writes zeros over a range, in bounded pieces.
fn write_zeros(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    const PIECE: u64 = 1 << 20;
    let zeros = vec![0u8; PIECE.min(len) as usize];
    let mut pos = offset;
    let end = offset.saturating_add(len);
    while pos < end {
        let n = (end - pos).min(PIECE) as usize;
        file.write_all_at(&zeros[..n], pos)
            .map_err(|e| Error::io(path, format!("write zeros at {pos:#x}"), e))?;
        pos += n as u64;
    }
    Ok(())
}

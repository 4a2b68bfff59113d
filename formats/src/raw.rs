//! Raw images: the guest view is the file itself. Holes (SEEK_HOLE) read as zeros and are mapped
//! as zero extents, so a sparse raw file costs only its allocated data.

use crate::error::Result;
use crate::host::HostFile;
use crate::image::{Extent, ExtentKind, Format, Image, ImageInfo, check_guest_range};

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
}

impl Image for RawImage {
    fn format(&self) -> Format {
        self.format
    }

    fn virtual_size(&self) -> u64 {
        self.file.len()
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_guest_range(self.file.len(), offset, 1)?;
        let max_len = max_len.min(self.file.len() - offset);
        let (kind, end) = match self.file.next_data(offset)? {
            Some(d) if d == offset => (
                ExtentKind::Data { offset },
                self.file.next_hole(offset)?.max(offset + 1),
            ),
            Some(d) => (ExtentKind::Zero, d),
            None => (ExtentKind::Zero, self.file.len()),
        };
        Ok(Extent {
            start: offset,
            length: (end - offset).min(max_len),
            kind,
            depth: 0,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.file.len(), offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset, "raw data")
    }

    fn info(&self) -> ImageInfo {
        ImageInfo::basic(
            self.file.path().to_path_buf(),
            self.format,
            self.file.len(),
            self.file.allocated_bytes(),
        )
    }
}

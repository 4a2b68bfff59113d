//! ISO 9660 images (ECMA-119) with Joliet, Rock Ridge, ISO 9660:1999 and El Torito.
//!
//! As a disk image an ISO is its bytes: [`IsoImage`] is the raw view plus what `info` tells about
//! the volume. [`IsoFs`] reads the file tree under ISO 9660, Joliet or Rock Ridge names.

mod bytes;
mod dir;
mod eltorito;
mod rockridge;
mod volume;

pub use dir::{Entry, EntryKind, FileReader, IsoFs, Listing, NameMode, Visit};
pub use eltorito::BootEntry;
pub use volume::{Descriptor, Volumes, has_magic};

use crate::error::Result;
use crate::host::HostFile;
use crate::image::{Extent, Format, Image, ImageInfo};
use crate::raw::RawImage;
use serde_json::json;

pub struct IsoImage {
    raw: RawImage,
    details: serde_json::Value,
    warnings: Vec<String>,
}

impl IsoImage {
    /// Reads the volume descriptors and boot catalog. A damaged boot catalog is a warning: the
    /// image's bytes stay readable.
    pub fn open(file: HostFile) -> Result<IsoImage> {
        let fs = IsoFs::from_host(file)?;
        let mut warnings = Vec::new();
        let boot = match fs.volumes().boot_catalog {
            Some(sector) => eltorito::read_catalog(fs.host(), sector).unwrap_or_else(|e| {
                warnings.push(format!("boot catalog not read: {e}"));
                Vec::new()
            }),
            None => Vec::new(),
        };
        let v = fs.volumes();
        let p = &v.primary;
        let mut data = json!({
            "volume-id": p.volume_id,
            "system-id": p.system_id,
            "publisher-id": p.publisher_id,
            "preparer-id": p.preparer_id,
            "application-id": p.application_id,
            "volume-set-size": p.volume_set_size,
            "joliet": v.joliet.is_some(),
            "rock-ridge": fs.has_rock_ridge(),
            "iso9660-1999": v.enhanced,
            "bootable": boot.iter().any(|b| b.bootable),
            "boot-entries": boot,
        });
        for (key, date) in [
            ("creation-date", &p.creation_date),
            ("modification-date", &p.modification_date),
        ] {
            if let Some(d) = date {
                data[key] = json!(d);
            }
        }
        Ok(IsoImage {
            raw: RawImage::with_format(fs.into_host(), Format::Iso),
            details: json!({"type": "iso", "data": data}),
            warnings,
        })
    }
}

impl Image for IsoImage {
    fn format(&self) -> Format {
        Format::Iso
    }

    fn virtual_size(&self) -> u64 {
        self.raw.virtual_size()
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        self.raw.map(offset, max_len)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.raw.read_at(buf, offset)
    }

    fn info(&self) -> ImageInfo {
        let mut info = self.raw.info();
        info.format_specific = Some(self.details.clone());
        info.warnings = self.warnings.clone();
        info
    }
}

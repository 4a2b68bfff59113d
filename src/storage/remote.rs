//! [`RemoteImage`]: a raw or fixed-VHD object as an [`Image`] whose reads are ranged GETs, so
//! the convert engine pulls it (parallel reads, zero detection, any output format) and the hash
//! engine verifies it, unchanged.

use super::push::ObjectManifest;
use super::{Location, Store};
use diskkit_formats::image::check_guest_range;
use diskkit_formats::registry::driver;
use diskkit_formats::{Extent, ExtentKind, Format, Image, ImageInfo, Result};
use std::path::PathBuf;

/// The guest content of an object, read with ranged requests.
pub struct RemoteImage<'a> {
    store: &'a dyn Store,
    location: Location,
    pub(super) format: Format,
    virtual_size: u64,
}

impl<'a> RemoteImage<'a> {
    /// The object as an image when its guest bytes are stored first and whole (raw, fixed
    /// VHD); `None` for formats that must be read locally.
    pub fn new(
        store: &'a dyn Store,
        location: &Location,
        manifest: &ObjectManifest,
    ) -> Result<Option<RemoteImage<'a>>> {
        let format = manifest.format()?;
        let guest = manifest.guest.virtual_size;
        let direct = driver(format)
            .plain_file_size
            .is_some_and(|plain| plain(guest) == Some(manifest.object_size));
        Ok(direct.then(|| RemoteImage {
            store,
            location: location.clone(),
            format,
            virtual_size: guest,
        }))
    }
}

impl Image for RemoteImage<'_> {
    fn format(&self) -> Format {
        self.format
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Everything is data: the guest bytes lie at the start of the object.
    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_guest_range(self.virtual_size, offset, max_len)?;
        Ok(Extent {
            start: offset,
            length: max_len,
            kind: ExtentKind::Data { offset },
            depth: 0,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.virtual_size, offset, buf.len() as u64)?;
        self.store.read_at(&self.location.key, buf, offset)
    }

    /// Each read is a request: fewer, larger ones cost the server less and pay the request
    /// latency less often (pulling 2 GiB as qcow2 from SeaweedFS: 8.3 s with 2 MiB reads, 4.3 s
    /// with 16 MiB ones, which the convert engine buffers: 16 MiB per thread).
    fn optimal_transfer(&self) -> u64 {
        16 << 20
    }

    fn info(&self) -> ImageInfo {
        ImageInfo::basic(
            PathBuf::from(self.location.url()),
            self.format,
            self.virtual_size,
            0,
        )
    }
}

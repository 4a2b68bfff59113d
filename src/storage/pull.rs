//! `pull`, `verify`, `ls`: images in a bucket read back through ranged reads.
//!
//! [`RemoteImage`] makes a raw or fixed-VHD object an [`Image`] whose reads are ranged GETs, so
//! the convert engine pulls it (parallel reads, zero detection for sparse output, any output
//! format) and the hash engine verifies it, unchanged.

use super::push::ObjectManifest;
use super::store::is_upload_temp;
use super::{Location, MANIFEST_SUFFIX, Store, manifest_key};
use crate::convert::{ConvertOptions, convert_to_path};
use crate::hash::hash_image;
use crate::progress::Progress;
use diskkit_formats::digest::hex;
use diskkit_formats::image::check_guest_range;
use diskkit_formats::write::CreateOptions;
use diskkit_formats::{Error, Extent, ExtentKind, Format, Image, ImageInfo, Result};
use std::path::{Path, PathBuf};

/// The guest content of an object, read with ranged requests.
pub struct RemoteImage<'a> {
    store: &'a Store,
    location: Location,
    format: Format,
    virtual_size: u64,
}

impl<'a> RemoteImage<'a> {
    /// The image at `location`, described by its manifest (required: it says the format and
    /// the digest to check against).
    pub fn open(
        store: &'a Store,
        location: &Location,
    ) -> Result<(RemoteImage<'a>, ObjectManifest)> {
        if location.is_prefix() {
            return Err(Error::invalid(format!(
                "{}: name an object, not a prefix",
                location.url()
            )));
        }
        let Some(size) = store.stat(&location.key)? else {
            return Err(Error::invalid(format!(
                "{}: no such object",
                location.url()
            )));
        };
        let manifest_at = manifest_key(&location.key);
        let Some(bytes) = store.read_small(&manifest_at)? else {
            return Err(Error::invalid(format!(
                "{}: no manifest {manifest_at} next to it (push it with diskkit push)",
                location.url()
            )));
        };
        let manifest = ObjectManifest::from_json(&bytes)?;
        if manifest.object_size != size {
            return Err(Error::invalid(format!(
                "{}: object has {size} bytes, its manifest says {}",
                location.url(),
                manifest.object_size
            )));
        }
        let format = manifest.format()?;
        let guest = manifest.guest.virtual_size;
        let expected = match format {
            Format::Raw => guest,
            Format::Vhd => guest + diskkit_formats::vhd::layout::FOOTER_SIZE,
            other => {
                return Err(Error::invalid(format!(
                    "{}: {other} objects cannot be read remotely",
                    location.url()
                )));
            }
        };
        if expected != size {
            return Err(Error::invalid(format!(
                "{}: a {format} object of {guest} guest bytes has {expected} bytes, not {size}",
                location.url()
            )));
        }
        let image = RemoteImage {
            store,
            location: location.clone(),
            format,
            virtual_size: guest,
        };
        Ok((image, manifest))
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

    fn info(&self) -> ImageInfo {
        ImageInfo::basic(
            PathBuf::from(self.location.url()),
            self.format,
            self.virtual_size,
            0,
        )
    }
}

/// Downloads the image at `location` into a new image of `format` at `dst` (sparse where the
/// guest has zeros), then checks the written image's digest against the manifest.
pub fn pull(
    store: &Store,
    location: &Location,
    dst: &Path,
    format: Format,
    create: &mut CreateOptions,
    threads: usize,
    downloading: &dyn Progress,
) -> Result<String> {
    let (remote, manifest) = RemoteImage::open(store, location)?;
    let opts = ConvertOptions {
        threads: Some(threads),
        ..ConvertOptions::default()
    };
    convert_to_path(&remote, format, dst, create, &opts, downloading)?;
    let written = diskkit_formats::open(
        dst,
        &diskkit_formats::OpenOptions {
            format: Some(format),
            snapshot: None,
        },
    )?;
    let size = manifest.guest.virtual_size;
    let digest = hash_image(
        written.as_ref(),
        manifest.guest.chunk_size,
        &crate::progress::NoProgress,
        &mut |_| {},
    )?;
    if written.virtual_size() != size || digest.digest != manifest.guest.digest {
        return Err(Error::invalid(format!(
            "{}: the pulled image's digest {} differs from the manifest's {} (left at {})",
            location.url(),
            hex(&digest.digest),
            manifest.guest.digest_hex(),
            dst.display()
        )));
    }
    Ok(manifest.guest.digest_hex())
}

/// Reads the object at `location` and checks its guest digest against its manifest; returns
/// the digest.
pub fn verify(store: &Store, location: &Location, reading: &dyn Progress) -> Result<String> {
    let (remote, manifest) = RemoteImage::open(store, location)?;
    let digest = hash_image(&remote, manifest.guest.chunk_size, reading, &mut |_| {})?;
    if digest.digest != manifest.guest.digest {
        return Err(Error::invalid(format!(
            "{}: content digest {} differs from the manifest's {}",
            location.url(),
            hex(&digest.digest),
            manifest.guest.digest_hex()
        )));
    }
    if let Format::Vhd = remote.format {
        check_vhd_footer(store, location, manifest.guest.virtual_size)?;
    }
    Ok(manifest.guest.digest_hex())
}

/// A fixed VHD object ends with a valid footer that gives the guest size.
fn check_vhd_footer(store: &Store, location: &Location, guest: u64) -> Result<()> {
    use diskkit_formats::vhd::layout::{FOOTER_SIZE, Footer};
    let mut bytes = [0u8; FOOTER_SIZE as usize];
    store.read_at(&location.key, &mut bytes, guest)?;
    if !Footer::has_cookie(&bytes) || !Footer::checksum_ok(&bytes) {
        return Err(Error::invalid(format!(
            "{}: no valid VHD footer at offset {guest}",
            location.url()
        )));
    }
    let footer = Footer::parse(&bytes);
    if footer.current_size != guest {
        return Err(Error::invalid(format!(
            "{}: VHD footer says {} guest bytes, the manifest {guest}",
            location.url(),
            footer.current_size
        )));
    }
    Ok(())
}

/// One image found by [`list`]: its key and what its manifest says (`None`: no or unreadable
/// manifest).
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub manifest: Option<ObjectManifest>,
}

/// The images under the prefix of `location`: every object except manifests and unfinished
/// local uploads.
pub fn list(store: &Store, location: &Location) -> Result<Vec<Listed>> {
    let prefix = if location.is_prefix() {
        location.key.clone()
    } else {
        format!("{}/", location.key)
    };
    let mut out = Vec::new();
    for o in store.list(&prefix)? {
        let name = o.key.rsplit('/').next().unwrap_or(&o.key);
        if o.key.ends_with(MANIFEST_SUFFIX) || is_upload_temp(name) {
            continue;
        }
        let manifest = store
            .read_small(&manifest_key(&o.key))?
            .and_then(|b| ObjectManifest::from_json(&b).ok());
        out.push(Listed {
            key: o.key,
            size: o.size,
            manifest,
        });
    }
    Ok(out)
}

/// Removes the image at `location` and its manifest.
pub fn remove(store: &Store, location: &Location) -> Result<()> {
    if location.is_prefix() {
        return Err(Error::invalid(format!(
            "{}: name an object, not a prefix",
            location.url()
        )));
    }
    if store.stat(&location.key)?.is_none() {
        return Err(Error::invalid(format!(
            "{}: no such object",
            location.url()
        )));
    }
    store.delete(&location.key)?;
    store.delete(&manifest_key(&location.key))
}

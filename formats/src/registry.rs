//! The format table: one entry per format saying how to recognise, open, create, check, resize,
//! measure and stream it. Everything that depends on the format dispatches through [`driver`]
//! (except the names in `Format`).

use crate::backing::BackingOpener;
use crate::check::{CheckReport, Repair};
use crate::error::Result;
use crate::host::HostFile;
use crate::image::{Format, GuestRange, Image};
use crate::iso::IsoImage;
use crate::qcow2::{self, Qcow2Image, Qcow2Writer};
use crate::raw::{self, RawImage, RawWriter};
use crate::stream::StreamFn;
use crate::vhd::{self, VhdImage, VhdWriter};
use crate::vhdx::{self, VhdxImage};
use crate::vmdk::{self, VmdkImage};
use crate::write::{CreateOptions, ImageWriter, Measure};
use std::path::Path;

/// Bytes of a file's start that [`Driver::detect`] is shown.
pub const MAGIC_LEN: usize = 8;

/// True when the file is of the format: `head` is its first bytes (up to [`MAGIC_LEN`]).
pub type DetectFn = fn(head: &[u8], file: &HostFile) -> Result<bool>;
/// Opens an image in `file`; its backing files come through the opener.
pub type OpenFn = fn(file: HostFile, backing: &mut dyn BackingOpener) -> Result<Box<dyn Image>>;
/// Opens the view of the internal snapshot with this ID or name.
pub type OpenSnapshotFn =
    fn(file: HostFile, backing: &mut dyn BackingOpener, snapshot: &str) -> Result<Box<dyn Image>>;
pub type CreateFn =
    fn(path: &Path, virtual_size: u64, opts: &mut CreateOptions) -> Result<Box<dyn ImageWriter>>;
/// Opens an existing image to overwrite its guest content in place.
pub type OpenExistingFn = fn(path: &Path) -> Result<Box<dyn ImageWriter>>;
/// Checks the image at `path`; files its metadata names are opened through `backing`.
pub type CheckFn = fn(
    file: HostFile,
    repair: Option<Repair>,
    backing: &mut dyn BackingOpener,
) -> Result<CheckReport>;
pub type ResizeFn = fn(path: &Path, new_size: u64) -> Result<()>;
/// Host bytes a new image needs for a guest of `virtual_size` bytes with data in `allocated`.
pub type MeasureFn = fn(
    virtual_size: u64,
    opts: &mut CreateOptions,
    allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
) -> Result<Measure>;

/// What diskkit can do with one format; `None` where it cannot.
pub struct Driver {
    pub format: Format,
    /// Asked in table order; `None` (raw) takes whatever no other driver recognises.
    pub detect: Option<DetectFn>,
    pub open: OpenFn,
    pub open_snapshot: Option<OpenSnapshotFn>,
    pub create: Option<CreateFn>,
    pub measure: Option<MeasureFn>,
    pub open_existing: Option<OpenExistingFn>,
    pub check: Option<CheckFn>,
    pub resize: Option<ResizeFn>,
    /// The virtual size a resize to `new_size` bytes gives.
    pub resized_size: fn(new_size: u64) -> Result<u64>,
    /// Lays out a source as an image file computed on demand.
    pub stream: Option<StreamFn>,
    /// The size of a file of this format that holds a guest of `virtual_size` bytes first and
    /// whole, followed by a trailer at most (raw; a fixed VHD): a file of that size can be read
    /// as the guest straight (a bucket object by ranged reads, no driver).
    /// `None` from the function: no such file can exist (the size overflows).
    pub plain_file_size: Option<fn(virtual_size: u64) -> Option<u64>>,
}

/// A format diskkit only reads.
const fn read_only(format: Format, detect: Option<DetectFn>, open: OpenFn) -> Driver {
    Driver {
        format,
        detect,
        open,
        open_snapshot: None,
        create: None,
        measure: None,
        open_existing: None,
        check: None,
        resize: None,
        resized_size: Ok,
        stream: None,
        plain_file_size: None,
    }
}

static QCOW2: Driver = Driver {
    format: Format::Qcow2,
    detect: Some(|head, _| Ok(head.starts_with(b"QFI\xfb"))),
    open: |file, backing| Ok(Box::new(Qcow2Image::open(file, backing, None)?)),
    open_snapshot: Some(|file, backing, name| {
        Ok(Box::new(Qcow2Image::open(file, backing, Some(name))?))
    }),
    create: Some(|path, size, opts| Ok(Box::new(Qcow2Writer::create(path, size, opts)?))),
    measure: Some(qcow2::measure),
    open_existing: Some(|path| Ok(Box::new(Qcow2Writer::open_existing(path)?))),
    check: Some(|file, repair, _| qcow2::check_file(file, repair)),
    resize: Some(qcow2::resize),
    resized_size: qcow2::sectors_up,
    stream: Some(qcow2::stream::stream),
    plain_file_size: None,
};

static VHDX: Driver = Driver {
    check: Some(|file, repair, _| vhdx::check_file(file, repair)),
    ..read_only(
        Format::Vhdx,
        Some(|head, _| Ok(head == vhdx::MAGIC)),
        |file, backing| Ok(Box::new(VhdxImage::open(file, backing)?)),
    )
};

static VHD: Driver = Driver {
    format: Format::Vhd,
    detect: Some(|head, file| {
        Ok(head == vhd::layout::FOOTER_COOKIE || vhd::has_fixed_footer(file)?)
    }),
    open: |file, backing| Ok(Box::new(VhdImage::open(file, backing)?)),
    open_snapshot: None,
    create: Some(|path, size, opts| Ok(Box::new(VhdWriter::create(path, size, opts)?))),
    measure: Some(vhd::measure),
    open_existing: Some(|path| Ok(Box::new(VhdWriter::open_existing(path)?))),
    check: Some(|file, repair, _| vhd::check_file(file, repair)),
    resize: Some(|path, size| vhd::resize(path, size, true).map(|_| ())),
    resized_size: Ok,
    stream: Some(vhd::stream::stream),
    plain_file_size: Some(|size| size.checked_add(vhd::layout::FOOTER_SIZE)),
};

static ISO: Driver = read_only(
    Format::Iso,
    Some(|_, file| crate::iso::has_magic(file)),
    |file, _| Ok(Box::new(IsoImage::open(file)?)),
);

static VMDK: Driver = Driver {
    check: Some(vmdk::check),
    create: Some(vmdk::create),
    measure: Some(vmdk::measure),
    stream: Some(vmdk::stream::stream),
    ..read_only(
        Format::Vmdk,
        Some(|_, file| vmdk::detect(file)),
        |file, backing| Ok(Box::new(VmdkImage::open(file, backing)?)),
    )
};

static RAW: Driver = Driver {
    format: Format::Raw,
    detect: None,
    open: |file, _| Ok(Box::new(RawImage::open(file))),
    open_snapshot: None,
    create: Some(|path, size, opts| Ok(Box::new(RawWriter::create(path, size, opts)?))),
    // A raw image needs every byte whatever the data; `allocated` is not consulted.
    measure: Some(|size, opts, _| {
        opts.reject_unknown(Format::Raw)?;
        Ok(raw::measure(size))
    }),
    open_existing: Some(|path| Ok(Box::new(RawWriter::open_existing(path)?))),
    check: None,
    resize: Some(raw::resize),
    resized_size: Ok,
    stream: Some(crate::stream::raw),
    plain_file_size: Some(Some),
};

/// The table, in detection order.
static DRIVERS: [&Driver; 6] = [&QCOW2, &VHDX, &VHD, &ISO, &VMDK, &RAW];

/// The table entry of `format`.
pub fn driver(format: Format) -> &'static Driver {
    match format {
        Format::Qcow2 => &QCOW2,
        Format::Vhdx => &VHDX,
        Format::Vhd => &VHD,
        Format::Iso => &ISO,
        Format::Vmdk => &VMDK,
        Format::Raw => &RAW,
    }
}

/// Guesses the format of a file from its content, never its name. Anything unrecognised is raw.
pub fn detect(file: &HostFile) -> Result<Format> {
    let mut head = [0u8; MAGIC_LEN];
    let n = file.len().min(MAGIC_LEN as u64) as usize;
    file.read_exact_at(&mut head[..n], 0, "format magic")?;
    for d in DRIVERS {
        match d.detect {
            Some(detect) if detect(&head[..n], file)? => return Ok(d.format),
            Some(_) => {}
            None => return Ok(d.format),
        }
    }
    Ok(Format::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_has_one_entry() {
        for d in DRIVERS {
            assert_eq!(driver(d.format).format, d.format);
            assert_eq!(DRIVERS.iter().filter(|o| o.format == d.format).count(), 1);
        }
    }

    #[test]
    fn plain_files_are_raw_and_fixed_vhd() {
        let plain = |format| driver(format).plain_file_size.map(|f| f(1 << 20));
        assert_eq!(plain(Format::Raw), Some(Some(1 << 20)));
        assert_eq!(plain(Format::Vhd), Some(Some((1 << 20) + 512)));
        for format in [Format::Qcow2, Format::Vhdx, Format::Vmdk, Format::Iso] {
            assert_eq!(plain(format), None);
        }
        let vhd = driver(Format::Vhd).plain_file_size.unwrap();
        assert_eq!(vhd(u64::MAX), None);
    }
}

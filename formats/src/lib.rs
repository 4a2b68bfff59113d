//! diskkit-formats: the on-disk disk image formats diskkit reads and writes, one module per
//! format, behind one image model ([`Image`]: virtual size, extent map, positioned reads).
//!
//! This crate knows nothing of the command line, async runtimes or object storage.

pub mod backing;
pub mod check;
pub mod chunk_store;
pub mod digest;
pub mod entropy;
pub mod error;
pub mod host;
pub mod image;
pub mod iso;
pub mod nonzero;
pub mod open;
pub mod partition;
pub mod qcow2;
pub mod raw;
pub mod registry;
pub mod stream;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;
pub mod write;

pub use backing::ImplicitOpens;
pub use check::{CheckReport, Repair};
pub use error::{Error, ErrorKind, Result};
pub use host::HostFile;
pub use image::{Extent, ExtentKind, Extents, Format, Image, ImageInfo, SnapshotInfo};
pub use open::{OpenOptions, detect, open, open_file, open_with};
pub use stream::{ImageStream, stream};
pub use write::{CreateOptions, ImageWriter, Measure};

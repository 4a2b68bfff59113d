//! qcow2 (QEMU copy-on-write v2): versions 2 and 3, written from qemu's docs/interop/qcow2.txt.
//!
//! Reading covers everything qemu 10 writes: cluster sizes 512 B to 2 MiB, any refcount width,
//! zlib and zstd compressed clusters, zero clusters, extended L2 entries (subclusters), external
//! data files, backing chains, internal snapshots (read-only views) and lazy-refcount (dirty) or
//! corrupt-flagged images (opened read-only with a warning).
//!
//! Writing ([`Qcow2Writer`]) creates new images; [`measure`] sizes them; [`check`] verifies (and
//! repairs) refcounts; [`resize`] changes the virtual size in place.

mod amend;
pub mod bitmap;
pub mod bitmap_edit;
mod check;
pub mod cluster_write;
mod compress;
pub mod edit;
pub mod header;
mod l2;
mod read;
mod refcount;
mod resize;
pub mod snapshot;
pub mod snapshot_edit;
pub mod stream;
mod write;

pub use amend::amend;
pub use check::{check, check_file};
pub use read::Qcow2Image;
pub use resize::resize;
pub use write::{Qcow2Writer, measure};

use crate::error::{Error, Result};

/// qemu sees a qcow2 guest in whole 512-byte sectors: it rounds the size of a new image up and
/// reads a header size rounded down. diskkit does the same, so that both see the same guest.
const SECTOR: u64 = 512;

/// The virtual size of a new (or resized) image for a guest of `size` bytes.
pub(crate) fn sectors_up(size: u64) -> Result<u64> {
    size.checked_next_multiple_of(SECTOR).ok_or_else(|| {
        Error::invalid(format!(
            "qcow2: a virtual size of {size} bytes is too large"
        ))
    })
}

/// The guest size qemu reads from a header size.
pub(crate) fn sectors_down(size: u64) -> u64 {
    size / SECTOR * SECTOR
}

//! qcow2 (QEMU copy-on-write v2): versions 2 and 3, written from qemu's docs/interop/qcow2.txt.
//!
//! Reading covers everything qemu 10 writes: cluster sizes 512 B to 2 MiB, any refcount width,
//! zlib and zstd compressed clusters, zero clusters, extended L2 entries (subclusters), external
//! data files, backing chains, internal snapshots (read-only views) and lazy-refcount (dirty) or
//! corrupt-flagged images (opened read-only with a warning).
//!
//! Writing ([`Qcow2Writer`]) creates new images; [`measure`] sizes them; [`check`] verifies (and
//! repairs) refcounts; [`resize`] changes the virtual size in place.

mod check;
mod compress;
pub mod header;
mod l2;
mod read;
mod refcount;
mod resize;
pub mod snapshot;
mod write;

pub use check::check;
pub use read::Qcow2Image;
pub use resize::resize;
pub use write::{Qcow2Writer, measure};

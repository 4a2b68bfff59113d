//! Microsoft VHD (Virtual Hard Disk; qemu's "vpc" driver), after Microsoft's "Virtual Hard Disk
//! Image Format Specification" 1.0: fixed disks (raw data followed by a 512-byte footer), dynamic
//! disks (footer copy, dynamic header, block allocation table, blocks of a sector bitmap plus
//! data, footer) and differencing disks (dynamic disks whose absent sectors come from a parent).

mod check;
pub mod layout;
mod locate;
mod parent;
mod read;
pub mod stream;
mod write;

pub use check::{ResizeOutcome, check, check_file, resize};
pub use locate::{has_fixed_footer, trailing_footer_size};
pub use read::VhdImage;
pub use write::{VhdWriter, measure};

//! What a format driver is handed to open the files its image's metadata names (backing files,
//! qcow2 external data files, VMDK extents, VHD and VHDX parents): implicit opens, which the
//! user never named. The opener decides whether each may be opened at all ([`ImplicitOpens`])
//! and keeps the chain finite; drivers never open such files themselves.

use crate::error::Result;
use crate::host::HostFile;
use crate::image::{Format, Image};
use std::path::Path;

/// Which files that image metadata names may be opened. A hostile image can name any host file
/// (CVE-2022-47951: a VMDK descriptor whose flat extent is `/etc/shadow` turns a conversion into a
/// file read), so the caller chooses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ImplicitOpens {
    /// Every named file.
    Allow,
    /// Every named file; those outside the naming image's directory (and its subdirectories)
    /// add a warning to the naming image's [`crate::ImageInfo::warnings`].
    #[default]
    WarnOutsideDir,
    /// Only files inside the naming image's directory (and its subdirectories).
    RefuseOutsideDir,
    /// None: the image must stand alone (images read from a bucket).
    Refuse,
}

/// The role a named file plays, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    BackingFile,
    DataFile,
    Extent,
    Parent,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::BackingFile => "backing file",
            Role::DataFile => "external data file",
            Role::Extent => "extent file",
            Role::Parent => "parent image",
        }
    }

    /// True for files that are images with chains of their own (counted against loops and
    /// [`crate::open::MAX_CHAIN_DEPTH`]).
    pub fn is_image(self) -> bool {
        matches!(self, Role::BackingFile | Role::Parent)
    }
}

/// Opens the files an image's metadata names, under the caller's [`ImplicitOpens`] policy.
pub trait BackingOpener {
    /// Opens `named` (already resolved against the naming image's directory) for the image at
    /// `referrer`. Refuses what the policy forbids and anything but a regular file or a block
    /// device (a FIFO or a terminal would block reads forever), before reading a byte. A
    /// warning the policy asks for is pushed onto `warnings`.
    fn open_file(
        &mut self,
        referrer: &Path,
        named: &Path,
        role: Role,
        warnings: &mut Vec<String>,
    ) -> Result<HostFile>;

    /// Opens an image, with its own backing chain, in a file that [`BackingOpener::open_file`]
    /// returned for a backing file or parent; `None` detects the format.
    fn open_image(&mut self, file: HostFile, format: Option<Format>) -> Result<Box<dyn Image>>;

    /// [`BackingOpener::open_file`] then [`BackingOpener::open_image`].
    fn open_backing(
        &mut self,
        referrer: &Path,
        named: &Path,
        role: Role,
        format: Option<Format>,
        warnings: &mut Vec<String>,
    ) -> Result<Box<dyn Image>> {
        let file = self.open_file(referrer, named, role, warnings)?;
        self.open_image(file, format)
    }
}

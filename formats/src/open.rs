//! Format detection by magic bytes and opening of images with their backing chains.

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::{Format, Image};
use crate::iso::IsoImage;
use crate::qcow2::Qcow2Image;
use crate::raw::RawImage;
use crate::vhd::{self, VhdImage};
use crate::vhdx::VhdxImage;
use crate::vmdk::VmdkImage;
use std::path::{Path, PathBuf};

/// The deepest backing chain diskkit follows; deeper chains are refused as probably cyclic or
/// hostile.
pub const MAX_CHAIN_DEPTH: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The format the user named (`-f`); `None` detects it from magic bytes.
    pub format: Option<Format>,
    /// View an internal snapshot (qcow2) instead of the current state.
    pub snapshot: Option<String>,
}

/// Guesses the format of a file from its magic bytes, never its name. Anything unrecognised is raw.
pub fn detect(file: &HostFile) -> Result<Format> {
    let mut head = [0u8; 8];
    let n = file.len().min(8) as usize;
    file.read_exact_at(&mut head[..n], 0, "format magic")?;
    Ok(match &head[..n] {
        [b'Q', b'F', b'I', 0xfb, ..] => Format::Qcow2,
        b"conectix" => Format::Vhd,
        b"vhdxfile" => Format::Vhdx,
        _ if vhd::has_fixed_footer(file)? => Format::Vhd,
        _ if crate::iso::has_magic(file)? => Format::Iso,
        _ if crate::vmdk::detect(file)? => Format::Vmdk,
        _ => Format::Raw,
    })
}

/// Opens an image and, recursively, its backing chain.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn Image>> {
    let mut chain = Chain::default();
    chain.open(path, opts.format, opts.snapshot.as_deref())
}

/// State carried while opening a backing chain: the files already open (to refuse cycles).
#[derive(Default)]
pub struct Chain {
    visited: Vec<PathBuf>,
}

impl Chain {
    /// Opens one layer; format drivers call this again for their backing file.
    pub fn open(
        &mut self,
        path: &Path,
        format: Option<Format>,
        snapshot: Option<&str>,
    ) -> Result<Box<dyn Image>> {
        let canonical = path
            .canonicalize()
            .map_err(|e| Error::io(path, "open", e))?;
        if self.visited.contains(&canonical) {
            return Err(Error::invalid(format!(
                "{}: backing chain loops back to this file",
                path.display()
            )));
        }
        if self.visited.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::invalid(format!(
                "{}: backing chain deeper than {MAX_CHAIN_DEPTH} images",
                path.display()
            )));
        }
        self.visited.push(canonical);
        let file = HostFile::open(path)?;
        let format = match format {
            Some(f) => f,
            None => detect(&file)?,
        };
        if snapshot.is_some() && format != Format::Qcow2 {
            return Err(Error::invalid(format!(
                "{}: --snapshot needs a qcow2 image, this is {format}",
                path.display()
            )));
        }
        match format {
            Format::Raw => Ok(Box::new(RawImage::open(file))),
            Format::Qcow2 => Ok(Box::new(Qcow2Image::open(file, self, snapshot)?)),
            Format::Vhd => Ok(Box::new(VhdImage::open(file, self)?)),
            Format::Iso => Ok(Box::new(IsoImage::open(file)?)),
            Format::Vmdk => Ok(Box::new(VmdkImage::open(file, self)?)),
            Format::Vhdx => Ok(Box::new(VhdxImage::open(file, self)?)),
        }
    }
}

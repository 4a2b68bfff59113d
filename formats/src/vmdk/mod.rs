//! VMware VMDK images (Virtual Disk Format 1.1): a descriptor lists extents — hosted sparse
//! files (monolithicSparse, twoGbMaxExtentSparse, streamOptimized with deflate-compressed
//! grains), flat files (monolithicFlat, twoGbMaxExtentFlat, vmfs) and zero extents — laid end to
//! end in the guest. Delta disks read unallocated grains from the parent named by
//! `parentFileNameHint`.
//!
//! Host offsets in the extent map are offsets in the extent's own file, as qemu reports them.

mod check;
mod descriptor;
mod layout;
mod sparse;
pub mod stream;
mod write;

pub use check::check;
pub use descriptor::{Descriptor, ExtentLine, ExtentType, MAX_DESCRIPTOR_SIZE};
use descriptor::{NO_PARENT_CID, looks_like_descriptor};
use sparse::{Grain, SparseExtent};
pub use stream::stream_optimized;
pub use write::{create, measure};

use crate::backing::{BackingOpener, Role};
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::{
    Extent, ExtentKind, Format, Image, ImageInfo, check_guest_range, map_backing, read_backing,
};
use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const SECTOR: u64 = 512;

/// True when the file starts with a sparse extent header or a text descriptor.
pub fn detect(file: &HostFile) -> Result<bool> {
    let mut head = [0u8; 64];
    let n = file.len().min(head.len() as u64) as usize;
    file.read_exact_at(&mut head[..n], 0, "format magic")?;
    Ok(head[..n].starts_with(sparse::MAGIC)
        || (file.len() <= MAX_DESCRIPTOR_SIZE && looks_like_descriptor(&head[..n])))
}

enum Storage {
    Sparse(SparseExtent),
    Flat { file: HostFile, start: u64 },
    Zero,
}

/// One extent placed in the guest.
struct VmdkExtent {
    /// Guest byte offset of the extent's first byte.
    guest_start: u64,
    length: u64,
    line: ExtentLine,
    storage: Storage,
}

/// Where a guest run's bytes come from.
enum Source {
    /// Uncompressed bytes at this offset of extent `extent`'s file.
    Host {
        extent: usize,
        offset: u64,
    },
    /// A compressed grain of extent `extent` starting at extent byte `grain_start`.
    Compressed {
        extent: usize,
        grain_start: u64,
        at: u64,
        /// Offset of the run in the decompressed grain.
        skip: usize,
    },
    Zero,
    /// Not allocated in this disk: the parent's bytes, or zeros without a parent.
    Unallocated,
}

pub struct VmdkImage {
    path: PathBuf,
    descriptor: Descriptor,
    extents: Vec<VmdkExtent>,
    virtual_size: u64,
    parent: Option<Box<dyn Image>>,
    warnings: Vec<String>,
}

impl VmdkImage {
    /// Opens a sparse extent file (its embedded descriptor, if any, gives the disk's identity)
    /// or a text descriptor and the extent files it names.
    pub fn open(file: HostFile, opener: &mut dyn BackingOpener) -> Result<VmdkImage> {
        let path = file.path().to_path_buf();
        let mut magic = [0u8; 4];
        let n = file.len().min(4) as usize;
        file.read_exact_at(&mut magic[..n], 0, "vmdk magic")?;
        let mut warnings = Vec::new();
        let (descriptor, extents) = if &magic == sparse::MAGIC {
            open_monolithic(file)?
        } else {
            if file.len() > MAX_DESCRIPTOR_SIZE {
                return Err(Error::corrupt(
                    &path,
                    "vmdk descriptor",
                    0,
                    format!(
                        "{} bytes: not a sparse extent, and larger than a descriptor may be ({MAX_DESCRIPTOR_SIZE})",
                        file.len()
                    ),
                ));
            }
            let text = file.read_vec_at(0, file.len(), "vmdk descriptor")?;
            let descriptor = Descriptor::parse(&text, &path, 0)?;
            let extents = open_extents(&path, &descriptor, opener, &mut warnings)?;
            (descriptor, extents)
        };
        let virtual_size = extents.last().map_or(0, |e| e.guest_start + e.length);
        let parent = match (&descriptor.parent_file_name_hint, descriptor.parent_cid) {
            (_, NO_PARENT_CID) => None,
            (Some(hint), _) => Some(opener.open_backing(
                &path,
                &resolve(&path, hint),
                Role::Parent,
                None,
                &mut warnings,
            )?),
            (None, _) => {
                warnings.push(
                    "delta disk without parentFileNameHint: unallocated grains read as zeros"
                        .into(),
                );
                None
            }
        };
        Ok(VmdkImage {
            path,
            descriptor,
            extents,
            virtual_size,
            parent,
            warnings,
        })
    }

    /// The extent holding guest byte `offset` (below the virtual size).
    fn extent_index(&self, offset: u64) -> usize {
        self.extents
            .partition_point(|e| e.guest_start + e.length <= offset)
    }

    /// What backs the guest bytes from `offset` on, and for how many bytes (at most `max_len`,
    /// never past the end of a grain table, a compressed grain or an extent).
    fn locate(&self, offset: u64, max_len: u64) -> Result<(Source, u64)> {
        let index = self.extent_index(offset);
        let Some(ext) = self.extents.get(index) else {
            return Err(Error::invalid(format!(
                "offset {offset:#x} is past the last vmdk extent"
            )));
        };
        let within = offset - ext.guest_start;
        let max_len = max_len.min(ext.length - within);
        Ok(match &ext.storage {
            Storage::Zero => (Source::Zero, max_len),
            Storage::Flat { file, start } => {
                let host = start + within;
                // Holes, and the end of a short flat file (qemu reads zeros there too), are zero.
                match file.data_run(host, max_len)? {
                    (true, len) => (
                        Source::Host {
                            extent: index,
                            offset: host,
                        },
                        len,
                    ),
                    (false, len) => (Source::Zero, len),
                }
            }
            Storage::Sparse(s) => {
                let (grain, len) = s.grain_run(within, max_len)?;
                let grain_start = within - within % s.grain_bytes();
                let source = match grain {
                    Grain::Unallocated => Source::Unallocated,
                    Grain::Zero => Source::Zero,
                    Grain::Data(at) => Source::Host {
                        extent: index,
                        offset: at + (within - grain_start),
                    },
                    Grain::Compressed(at) => Source::Compressed {
                        extent: index,
                        grain_start,
                        at,
                        skip: (within - grain_start) as usize,
                    },
                };
                (source, len)
            }
        })
    }

    fn host_file(&self, extent: usize) -> Option<&HostFile> {
        match &self.extents.get(extent)?.storage {
            Storage::Sparse(s) => Some(s.file()),
            Storage::Flat { file, .. } => Some(file),
            Storage::Zero => None,
        }
    }
}

/// A sparse extent opened directly: the disk is this one extent.
fn open_monolithic(file: HostFile) -> Result<(Descriptor, Vec<VmdkExtent>)> {
    let path = file.path().to_path_buf();
    let extent = SparseExtent::open(file)?;
    let h = extent.header;
    let descriptor = if h.descriptor_offset != 0 && h.descriptor_sectors != 0 {
        let at = h.descriptor_offset.checked_mul(SECTOR);
        let len = h.descriptor_sectors.checked_mul(SECTOR);
        let (Some(at), Some(len)) = (at, len) else {
            return Err(Error::corrupt(
                &path,
                "vmdk descriptor",
                h.descriptor_offset,
                "offset overflows",
            ));
        };
        if len > MAX_DESCRIPTOR_SIZE {
            return Err(Error::corrupt(
                &path,
                "vmdk descriptor",
                at,
                format!("{len} bytes, more than {MAX_DESCRIPTOR_SIZE}"),
            ));
        }
        let text = extent.file().read_vec_at(at, len, "vmdk descriptor")?;
        Descriptor::parse(&text, &path, at)?
    } else {
        Descriptor {
            create_type: "monolithicSparse".into(),
            parent_cid: NO_PARENT_CID,
            ..Descriptor::default()
        }
    };
    // The embedded descriptor names this file as the one extent; its size is the header's.
    let line = ExtentLine {
        sectors: h.capacity,
        kind: ExtentType::Sparse,
        filename: Some(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
        offset: 0,
    };
    let length = extent.capacity_bytes();
    if length / SECTOR != h.capacity {
        return Err(Error::corrupt(
            &path,
            "vmdk sparse header",
            12,
            "capacity overflows",
        ));
    }
    Ok((
        descriptor,
        vec![VmdkExtent {
            guest_start: 0,
            length,
            line,
            storage: Storage::Sparse(extent),
        }],
    ))
}

/// Opens the extent files a text descriptor names, relative to its directory.
fn open_extents(
    path: &Path,
    descriptor: &Descriptor,
    opener: &mut dyn BackingOpener,
    warnings: &mut Vec<String>,
) -> Result<Vec<VmdkExtent>> {
    descriptor
        .total_sectors()
        .and_then(|s| s.checked_mul(SECTOR))
        .ok_or_else(|| {
            Error::corrupt(
                path,
                "vmdk descriptor",
                0,
                "extent sizes add up past 2^64 bytes",
            )
        })?;
    let mut extents = Vec::with_capacity(descriptor.extents.len());
    let mut guest_start = 0u64;
    for line in &descriptor.extents {
        let length = line.sectors * SECTOR;
        let storage = match (&line.kind, &line.filename) {
            (ExtentType::Zero, _) => Storage::Zero,
            (_, None) => {
                return Err(Error::corrupt(
                    path,
                    "vmdk descriptor",
                    0,
                    "extent without a file name",
                ));
            }
            (kind, Some(name)) => {
                let extent_path = resolve(path, name);
                if Path::new(name).is_absolute() {
                    // The disk cannot move with its files (the opener says whether it lies
                    // outside the descriptor's directory).
                    warnings.push(format!("extent file {name:?} is an absolute path"));
                }
                let file = opener.open_file(path, &extent_path, Role::Extent, warnings)?;
                if *kind == ExtentType::Sparse {
                    let s = SparseExtent::open(file)?;
                    if s.capacity_bytes() < length {
                        return Err(Error::corrupt(
                            &extent_path,
                            "vmdk sparse header",
                            12,
                            format!(
                                "capacity of {} sectors is smaller than the descriptor's {}",
                                s.header.capacity, line.sectors
                            ),
                        ));
                    }
                    Storage::Sparse(s)
                } else {
                    let start = line
                        .offset
                        .checked_mul(SECTOR)
                        .filter(|s| s.checked_add(length).is_some())
                        .ok_or_else(|| {
                            Error::corrupt(path, "vmdk descriptor", 0, "extent offset overflows")
                        })?;
                    Storage::Flat { file, start }
                }
            }
        };
        if length > 0 {
            extents.push(VmdkExtent {
                guest_start,
                length,
                line: line.clone(),
                storage,
            });
        }
        guest_start += length;
    }
    Ok(extents)
}

/// Resolves a file name from a descriptor against the descriptor's directory.
fn resolve(descriptor_path: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    descriptor_path.parent().unwrap_or(Path::new("")).join(name)
}

impl Image for VmdkImage {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_guest_range(self.virtual_size, offset, 1)?;
        let max_len = max_len.min(self.virtual_size - offset);
        let (source, length) = self.locate(offset, max_len)?;
        let kind = match source {
            Source::Host { offset, .. } => ExtentKind::Data { offset },
            Source::Compressed { .. } => ExtentKind::Compressed,
            Source::Zero => ExtentKind::Zero,
            Source::Unallocated => {
                return map_backing(self.parent.as_deref(), offset, length);
            }
        };
        Ok(Extent {
            start: offset,
            length,
            kind,
            depth: 0,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.virtual_size, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (source, len) = self.locate(pos, (buf.len() - done) as u64)?;
            let out = &mut buf[done..done + len as usize];
            match source {
                Source::Host { extent, offset } => {
                    let file = self
                        .host_file(extent)
                        .ok_or_else(|| Error::invalid("vmdk extent has no file"))?;
                    file.read_exact_at(out, offset, "vmdk grain data")?;
                }
                Source::Compressed {
                    extent,
                    grain_start,
                    at,
                    skip,
                } => {
                    let Some(Storage::Sparse(s)) = self.extents.get(extent).map(|e| &e.storage)
                    else {
                        return Err(Error::invalid(
                            "vmdk compressed grain outside a sparse extent",
                        ));
                    };
                    let grain = s.read_compressed(grain_start, at)?;
                    let part = grain
                        .get(skip..skip + out.len())
                        .ok_or_else(|| Error::invalid("vmdk read runs past the end of a grain"))?;
                    out.copy_from_slice(part);
                }
                Source::Zero => out.fill(0),
                Source::Unallocated => read_backing(self.parent.as_deref(), out, pos)?,
            }
            done += len as usize;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        let own_size = std::fs::metadata(&self.path).map_or(0, |m| m.blocks() * 512);
        let actual_size: u64 = std::iter::once(own_size)
            .chain(self.extents.iter().filter_map(|e| match &e.storage {
                Storage::Flat { file, .. } => Some(file.allocated_bytes()),
                Storage::Sparse(s) if s.file().path() != self.path => {
                    Some(s.file().allocated_bytes())
                }
                _ => None,
            }))
            .sum();
        let mut info = ImageInfo::basic(
            self.path.clone(),
            Format::Vmdk,
            self.virtual_size,
            actual_size,
        );
        let grain = |e: &VmdkExtent| match &e.storage {
            Storage::Sparse(s) => Some(s.grain_bytes()),
            _ => None,
        };
        info.cluster_size = self.extents.first().and_then(grain);
        let extents: Vec<_> = self
            .extents
            .iter()
            .map(|e| {
                let mut v = json!({
                    "filename": e.line.filename.clone().unwrap_or_default(),
                    "format": e.line.kind.name(),
                    "virtual-size": e.length,
                });
                if let Some(g) = grain(e) {
                    v["cluster-size"] = json!(g);
                }
                if let Storage::Sparse(s) = &e.storage
                    && s.header.compressed()
                {
                    v["compressed"] = json!(true);
                }
                v
            })
            .collect();
        info.format_specific = Some(json!({
            "type": "vmdk",
            "data": {
                "create-type": self.descriptor.create_type,
                "cid": self.descriptor.cid,
                "parent-cid": self.descriptor.parent_cid,
                "extents": extents,
            }
        }));
        if let (Some(hint), Some(_)) = (&self.descriptor.parent_file_name_hint, &self.parent) {
            info.backing_filename = Some(hint.clone());
            info.full_backing_filename = Some(resolve(&self.path, hint));
            info.backing_filename_format = self.parent.as_ref().map(|p| p.format().to_string());
        }
        info.warnings = self.warnings.clone();
        info
    }

    fn backing(&self) -> Option<&dyn Image> {
        self.parent.as_deref()
    }
}

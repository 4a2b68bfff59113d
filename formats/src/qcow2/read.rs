//! Opening a qcow2 image and reading its guest view: map and read_at over L1/L2 tables.

use super::compress::decompress;
use super::header::Header;
use super::l2::{Cluster, CompressedDesc, Geometry, L2Cache, OFFSET_MASK, read_table};
use super::snapshot::{self, Snapshot};
use crate::backing::{BackingOpener, Role};
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::{
    Extent, ExtentKind, Format, Image, ImageInfo, check_guest_range, map_backing, read_backing,
};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

pub struct Qcow2Image {
    file: HostFile,
    /// External data file; guest clusters live there instead of in `file`.
    data_file: Option<HostFile>,
    header: Header,
    geo: Geometry,
    /// The L1 table in use (active, or the snapshot's) and its file offset.
    l1: Vec<u64>,
    l1_offset: u64,
    virtual_size: u64,
    l2_cache: L2Cache,
    backing: Option<Box<dyn Image>>,
    full_backing: Option<PathBuf>,
    snapshots: Vec<Snapshot>,
    warnings: Vec<String>,
}

/// What one run of guest bytes maps to in this layer alone.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Data(u64),
    /// A compressed cluster; `u64` is how far into the cluster the run starts.
    Compressed(CompressedDesc, u64),
    Zero,
    Unallocated,
}

/// Refuses an L1 table of `l1_size` entries too small to map `virtual_size` bytes: what `open`
/// and `check` refuse alike.
pub(super) fn check_l1_size(
    path: &Path,
    geo: &Geometry,
    l1_size: u32,
    virtual_size: u64,
    structure: &str,
    offset: u64,
) -> Result<()> {
    if geo.l1_entries_for(virtual_size) > u64::from(l1_size) {
        return Err(Error::corrupt(
            path,
            structure,
            offset,
            format!("{l1_size} entries cannot map a virtual size of {virtual_size} bytes"),
        ));
    }
    Ok(())
}

/// Resolves a file name recorded in an image: relative names are relative to the image's folder.
pub(crate) fn resolve_relative(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

impl Qcow2Image {
    /// Opens the image in `file`, and through `opener` its data file and backing chain. With
    /// `snapshot`, the view is that internal snapshot's.
    pub fn open(
        file: HostFile,
        opener: &mut dyn BackingOpener,
        snapshot: Option<&str>,
    ) -> Result<Self> {
        let header = Header::read(&file)?;
        let path = file.path().to_path_buf();
        let geo = header.geometry();
        let (snapshots, _) = snapshot::read_table(&file, &header)?;
        let (l1_offset, l1_size, virtual_size, l1_structure) = match snapshot {
            None => (
                header.l1_table_offset,
                header.l1_size,
                super::sectors_down(header.size),
                "qcow2 L1 table",
            ),
            Some(key) => {
                let s = snapshot::find(&snapshots, key).ok_or_else(|| {
                    Error::invalid(format!(
                        "{}: no snapshot with ID or name '{key}'",
                        path.display()
                    ))
                })?;
                (
                    s.l1_table_offset,
                    s.l1_size,
                    super::sectors_down(s.info.virtual_size.unwrap_or(header.size)),
                    "qcow2 snapshot L1 table",
                )
            }
        };
        check_l1_size(&path, &geo, l1_size, virtual_size, l1_structure, l1_offset)?;
        let l1 = read_table(&file, l1_offset, u64::from(l1_size), l1_structure)?;

        let mut warnings = Vec::new();
        if header.dirty() {
            warnings.push(
                "image is dirty (lazy refcounts were in use): refcounts may be stale until \
                 'check -r all'"
                    .to_string(),
            );
        }
        if header.corrupt() {
            warnings.push(
                "image is marked corrupt: opened read-only; metadata may be inconsistent"
                    .to_string(),
            );
        }
        let data_file = match &header.data_file {
            Some(name) if header.has_data_file() => {
                // Relative names: the image's folder, then (as qemu does) the working directory.
                let beside = resolve_relative(&path, name);
                let named = if beside.exists() {
                    &beside
                } else {
                    Path::new(name)
                };
                Some(opener.open_file(&path, named, Role::DataFile, &mut warnings)?)
            }
            _ => None,
        };
        let full_backing = header
            .backing_file
            .as_deref()
            .map(|name| resolve_relative(&path, name));
        let backing = match &full_backing {
            Some(p) => {
                let fmt = header
                    .backing_format
                    .as_deref()
                    .map(Format::parse)
                    .transpose()
                    .map_err(|e| Error::unsupported(&path, format!("backing file format: {e}")))?;
                Some(opener.open_backing(&path, p, Role::BackingFile, fmt, &mut warnings)?)
            }
            None => None,
        };
        Ok(Qcow2Image {
            l2_cache: L2Cache::new(geo.cluster_size()),
            file,
            data_file,
            header,
            geo,
            l1,
            l1_offset,
            virtual_size,
            backing,
            full_backing,
            snapshots,
            warnings,
        })
    }

    fn data_host(&self) -> &HostFile {
        self.data_file.as_ref().unwrap_or(&self.file)
    }

    /// The run starting at guest `offset` that one L2 entry (or one unallocated L1 entry)
    /// describes: its kind and length, up to the end of that cluster, subcluster run or L2 range.
    fn piece(&self, offset: u64) -> Result<(Kind, u64)> {
        let cs = self.geo.cluster_size();
        let coverage = self.geo.l1_coverage();
        let l1_index = offset / coverage;
        let to_l1_end = coverage - offset % coverage;
        let Some(&l1e) = self.l1.get(l1_index as usize) else {
            return Ok((Kind::Unallocated, to_l1_end));
        };
        let l2_offset = l1e & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((Kind::Unallocated, to_l1_end));
        }
        if !l2_offset.is_multiple_of(cs) {
            return Err(Error::corrupt(
                self.file.path(),
                "qcow2 L1 table",
                self.l1_offset + l1_index * 8,
                format!("L2 table offset {l2_offset:#x} is not cluster aligned"),
            ));
        }
        let table = self.l2_cache.get(&self.file, l2_offset, cs)?;
        let l2_index = (offset / cs) % self.geo.l2_entries();
        let words_per_entry = if self.geo.extended_l2 { 2 } else { 1 };
        let i = (l2_index * words_per_entry) as usize;
        let entry = table.get(i).copied().unwrap_or(0);
        let bitmap = if self.geo.extended_l2 {
            table.get(i + 1).copied().unwrap_or(0)
        } else {
            0
        };
        let at = l2_offset + l2_index * self.geo.l2_entry_bytes();
        let in_cluster = offset % cs;
        let to_cluster_end = cs - in_cluster;
        let (host, alloc, zero) = match self.geo.decode(self.file.path(), entry, bitmap, at)? {
            Cluster::Unallocated => {
                // Skip the table's following empty entries in one go: sparse tables are common.
                let empty = table
                    .get(i..)
                    .unwrap_or_default()
                    .chunks(words_per_entry as usize)
                    .skip(1)
                    .take_while(|e| e.iter().all(|&w| w == 0))
                    .count() as u64;
                return Ok((Kind::Unallocated, to_cluster_end + empty * cs));
            }
            Cluster::Zero { .. } => return Ok((Kind::Zero, to_cluster_end)),
            Cluster::Compressed(d) => return Ok((Kind::Compressed(d, in_cluster), to_cluster_end)),
            Cluster::Data { host, alloc, zero } => (host, alloc, zero),
            Cluster::Subclusters { zero } => (0, 0, zero),
        };
        // Subcluster states; without extended L2 every subcluster is the whole cluster.
        let sc_size = self.geo.subcluster_size();
        let state = |sc: u64| {
            let bit = 1u32 << (sc % 32);
            (alloc & bit != 0, zero & bit != 0)
        };
        let first = in_cluster / sc_size;
        let s0 = state(first);
        let mut end_sc = first + 1;
        while end_sc * sc_size < cs && state(end_sc) == s0 {
            end_sc += 1;
        }
        let len = (end_sc * sc_size).min(cs) - in_cluster;
        let kind = match s0 {
            (true, _) => Kind::Data(host + in_cluster),
            (false, true) => Kind::Zero,
            (false, false) => Kind::Unallocated,
        };
        Ok((kind, len))
    }

    /// The longest run from `offset` (at most `max_len`) of one kind in this layer: contiguous
    /// data, zeros, unallocated, or (with `merge_compressed`) compressed clusters; without it a
    /// compressed run ends at its cluster's end.
    fn run(&self, offset: u64, max_len: u64, merge_compressed: bool) -> Result<(Kind, u64)> {
        let (kind, first_len) = self.piece(offset)?;
        let mut len = first_len.min(max_len);
        if matches!(kind, Kind::Compressed(..)) && !merge_compressed {
            return Ok((kind, len));
        }
        while len < max_len {
            let (next, next_len) = self.piece(offset + len)?;
            let continues = match (kind, next) {
                (Kind::Data(a), Kind::Data(b)) => a.checked_add(len) == Some(b),
                (Kind::Compressed(..), Kind::Compressed(..)) => true,
                (Kind::Zero, Kind::Zero) | (Kind::Unallocated, Kind::Unallocated) => true,
                _ => false,
            };
            if !continues {
                break;
            }
            len += next_len.min(max_len - len);
        }
        Ok((kind, len))
    }

    /// Reads the part of compressed cluster `d` that starts `skip` bytes into it into `buf`.
    fn read_compressed(&self, buf: &mut [u8], d: CompressedDesc, skip: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let corrupt =
            |why: String| Error::corrupt(self.file.path(), "qcow2 compressed cluster", d.host, why);
        if d.host >= self.file.len() {
            return Err(corrupt(format!(
                "starts past the end of the file ({:#x})",
                self.file.len()
            )));
        }
        // The descriptor counts whole sectors; the last one may extend past the end of the file.
        let avail = d.size.min(self.file.len() - d.host);
        let input = self
            .file
            .read_vec_at(d.host, avail, "qcow2 compressed cluster")?;
        let whole = skip == 0 && buf.len() as u64 == cs;
        let mut cluster = if whole {
            Vec::new()
        } else {
            vec![0u8; cs as usize]
        };
        let out = if whole { &mut *buf } else { &mut cluster[..] };
        decompress(self.header.compression, &input, out).map_err(corrupt)?;
        if !whole {
            let start = skip as usize;
            buf.copy_from_slice(&cluster[start..start + buf.len()]);
        }
        Ok(())
    }
}

impl Image for Qcow2Image {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_guest_range(self.virtual_size, offset, 1)?;
        let max_len = max_len.min(self.virtual_size - offset).max(1);
        let (kind, length) = self.run(offset, max_len, true)?;
        let kind = match kind {
            Kind::Data(host) => ExtentKind::Data { offset: host },
            Kind::Compressed(..) => ExtentKind::Compressed,
            Kind::Zero => ExtentKind::Zero,
            Kind::Unallocated => return map_backing(self.backing.as_deref(), offset, length),
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
        let mut jobs = Vec::new();
        let mut rest = buf;
        let mut pos = offset;
        while !rest.is_empty() {
            let (kind, len) = self.run(pos, rest.len() as u64, false)?;
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(len as usize);
            match kind {
                Kind::Data(host) => self.data_host().read_zero_padded_at(part, host)?,
                Kind::Zero => part.fill(0),
                Kind::Unallocated => read_backing(self.backing.as_deref(), part, pos)?,
                Kind::Compressed(d, skip) => jobs.push((part, d, skip)),
            }
            rest = tail;
            pos += len;
        }
        // Decompression is the costly part of reading compressed images: spread it over cores.
        if jobs.len() > 1 {
            jobs.into_par_iter()
                .try_for_each(|(part, d, skip)| self.read_compressed(part, d, skip))
        } else {
            jobs.into_iter()
                .try_for_each(|(part, d, skip)| self.read_compressed(part, d, skip))
        }
    }

    fn with_mapped(&self, offset: u64, len: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool> {
        check_guest_range(self.virtual_size, offset, len)?;
        match self.run(offset, len, false)? {
            (Kind::Data(host), run) if run == len => Ok(self.data_host().with_mapped(host, len, f)),
            _ => Ok(false),
        }
    }

    fn info(&self) -> ImageInfo {
        let h = &self.header;
        let mut info = ImageInfo::basic(
            self.file.path().to_path_buf(),
            Format::Qcow2,
            self.virtual_size,
            self.file.allocated_bytes(),
        );
        info.cluster_size = Some(h.cluster_size());
        info.backing_filename = h.backing_file.clone();
        info.full_backing_filename = self.full_backing.clone();
        info.backing_filename_format = h.backing_format.clone();
        info.dirty_flag = h.dirty();
        info.snapshots = self.snapshots.iter().map(|s| s.info.clone()).collect();
        info.warnings = self.warnings.clone();
        let mut data = serde_json::Map::new();
        let compat = if h.version == 2 { "0.10" } else { "1.1" };
        data.insert("compat".into(), compat.into());
        data.insert("compression-type".into(), h.compression.name().into());
        if h.version >= 3 {
            data.insert("lazy-refcounts".into(), h.lazy_refcounts().into());
        }
        data.insert("refcount-bits".into(), h.refcount_bits().into());
        if h.version >= 3 {
            if let Some(name) = h.data_file.as_ref().filter(|_| h.has_data_file()) {
                data.insert("data-file".into(), name.as_str().into());
                data.insert("data-file-raw".into(), h.data_file_raw().into());
            }
            data.insert("corrupt".into(), h.corrupt().into());
            data.insert("extended-l2".into(), h.extended_l2().into());
        }
        // As qemu-img info: persistent bitmaps with their flags and granularity. A damaged
        // directory is a warning here; using a bitmap reports the error.
        match super::bitmap::list(&self.file, h) {
            Ok(bitmaps) if !bitmaps.is_empty() => {
                data.insert("bitmaps".into(), serde_json::json!(bitmaps));
            }
            Ok(_) => {}
            Err(e) => info.warnings.push(e.to_string()),
        }
        info.format_specific = Some(serde_json::json!({"type": "qcow2", "data": data}));
        info
    }

    fn backing(&self) -> Option<&dyn Image> {
        self.backing.as_deref()
    }
}

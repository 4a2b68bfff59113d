//! The qcow2 header (first cluster): fixed fields, version 3 additions and header extensions.

use super::l2::Geometry;
use super::refcount::RefcountLayout;
use crate::error::{Error, Result};
use crate::host::HostFile;
use std::path::Path;

pub const MAGIC: [u8; 4] = *b"QFI\xfb";
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 104;
/// Header length qemu writes for version 3: 104 bytes plus the compression type byte, padded.
pub const V3_HEADER_LEN_WITH_COMPRESSION: u32 = 112;
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need subclusters of at least 512 bytes: 32 per cluster.
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
pub const MAX_BACKING_NAME_LEN: u32 = 1023;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
pub const EXT_BITMAPS: u32 = 0x2385_2875;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
pub const INCOMPAT_KNOWN: u64 = 0x1f;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// The bitmaps extension is consistent with the image (qemu clears it when a program that does
/// not know bitmaps writes the image).
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Offsets of header fields that writers patch in place.
pub const OFF_SIZE: u64 = 24;
pub const OFF_L1_SIZE: u64 = 36;
pub const OFF_L1_TABLE_OFFSET: u64 = 40;
pub const OFF_REFCOUNT_TABLE_OFFSET: u64 = 48;
pub const OFF_REFCOUNT_TABLE_CLUSTERS: u64 = 56;
pub const OFF_INCOMPATIBLE_FEATURES: u64 = 72;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: CompressionType,
    /// Backing file name as recorded (not resolved).
    pub backing_file: Option<String>,
    /// Backing file format extension.
    pub backing_format: Option<String>,
    /// External data file name extension.
    pub data_file: Option<String>,
    /// Persistent dirty bitmaps extension (see [`super::bitmap`]).
    pub bitmaps: Option<super::bitmap::BitmapsExtension>,
    /// Extensions diskkit does not interpret (feature names and unknown ones), kept verbatim so
    /// that rewriting the header in place preserves them: (type, data).
    pub other_extensions: Vec<(u32, Vec<u8>)>,
}

/// Big-endian field at `at`; callers have checked that `b` holds it.
pub(super) fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

pub(super) fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

fn text(path: &Path, what: &str, offset: u64, bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes)
        .map_err(|_| Error::corrupt(path, what, offset, "name is not valid UTF-8"))
}

impl Header {
    pub fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: self.cluster_bits,
            extended_l2: self.extended_l2(),
            has_data_file: self.has_data_file(),
        }
    }

    pub fn refcount_layout(&self) -> RefcountLayout {
        RefcountLayout {
            cluster_bits: self.cluster_bits,
            order: self.refcount_order,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0
    }

    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    pub fn dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    pub fn corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Reads and validates the header and its extensions. Everything is checked against the file
    /// size and the spec's limits before it is used.
    pub fn read(file: &HostFile) -> Result<Header> {
        let path = file.path();
        let bad = |off: u64, why: String| Error::corrupt(path, "qcow2 header", off, why);
        let mut fixed = [0u8; V3_HEADER_LEN as usize];
        let fixed_len = file.len().min(u64::from(V3_HEADER_LEN)) as usize;
        if fixed_len < V2_HEADER_LEN as usize {
            return Err(bad(
                0,
                format!("file is {} bytes, shorter than a header", file.len()),
            ));
        }
        file.read_exact_at(&mut fixed[..fixed_len], 0, "qcow2 header")?;
        if fixed[..4] != MAGIC {
            return Err(bad(0, "bad magic".into()));
        }
        let version = be32(&fixed, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(
                path,
                format!("qcow2 version {version} (known: 2, 3)"),
            ));
        }
        if version == 3 && fixed_len < V3_HEADER_LEN as usize {
            return Err(bad(0, "version 3 header is truncated".into()));
        }
        let cluster_bits = be32(&fixed, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(
                20,
                format!("cluster_bits {cluster_bits} outside 9..=21"),
            ));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(&fixed, 8),
            backing_file_size: be32(&fixed, 16),
            cluster_bits,
            size: be64(&fixed, 24),
            crypt_method: be32(&fixed, 32),
            l1_size: be32(&fixed, 36),
            l1_table_offset: be64(&fixed, 40),
            refcount_table_offset: be64(&fixed, 48),
            refcount_table_clusters: be32(&fixed, 56),
            nb_snapshots: be32(&fixed, 60),
            snapshots_offset: be64(&fixed, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            bitmaps: None,
            other_extensions: Vec::new(),
        };
        let cluster_size = h.cluster_size();
        if version == 3 {
            h.incompatible_features = be64(&fixed, 72);
            h.compatible_features = be64(&fixed, 80);
            h.autoclear_features = be64(&fixed, 88);
            h.refcount_order = be32(&fixed, 96);
            h.header_length = be32(&fixed, 100);
            if h.refcount_order > 6 {
                return Err(bad(
                    96,
                    format!("refcount_order {} above 6", h.refcount_order),
                ));
            }
            if h.header_length < V3_HEADER_LEN
                || !h.header_length.is_multiple_of(8)
                || u64::from(h.header_length) > cluster_size
            {
                return Err(bad(
                    100,
                    format!("header_length {} invalid", h.header_length),
                ));
            }
        }
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bits: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| b.to_string())
                .collect();
            return Err(Error::unsupported(
                path,
                format!(
                    "unknown incompatible qcow2 feature bit(s) {}",
                    bits.join(", ")
                ),
            ));
        }
        if h.crypt_method != 0 {
            return Err(Error::unsupported(
                path,
                format!("encrypted qcow2 images (crypt_method {})", h.crypt_method),
            ));
        }
        if h.extended_l2() && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(bad(
                20,
                format!("extended L2 entries need clusters of 16 KiB or more, not {cluster_size}"),
            ));
        }
        for (field, off, value) in [
            ("l1_table_offset", 40, h.l1_table_offset),
            ("refcount_table_offset", 48, h.refcount_table_offset),
            ("snapshots_offset", 64, h.snapshots_offset),
        ] {
            if !value.is_multiple_of(cluster_size) {
                return Err(bad(
                    off,
                    format!("{field} {value:#x} is not cluster aligned"),
                ));
            }
        }

        // Bytes 104.. of a longer header: the compression type.
        let head = file.read_vec_at(0, file.len().min(cluster_size), "qcow2 header cluster")?;
        let has_compression_field = h.header_length > V3_HEADER_LEN;
        let compression_byte = if has_compression_field {
            head.get(V3_HEADER_LEN as usize)
                .copied()
                .ok_or_else(|| bad(104, "header is truncated".into()))?
        } else {
            0
        };
        let flagged = h.incompatible_features & INCOMPAT_COMPRESSION != 0;
        h.compression = match (compression_byte, flagged) {
            (0, false) => CompressionType::Zlib,
            (1, true) => CompressionType::Zstd,
            (0, true) => {
                return Err(bad(
                    104,
                    "compression type bit set but compression_type is zlib".into(),
                ));
            }
            (t, false) => {
                return Err(bad(
                    104,
                    format!("compression_type {t} without the compression type feature bit"),
                ));
            }
            (t, true) => {
                return Err(Error::unsupported(
                    path,
                    format!("qcow2 compression type {t}"),
                ));
            }
        };

        h.read_extensions(path, &head)?;

        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME_LEN {
                return Err(bad(
                    16,
                    format!(
                        "backing file name length {} above 1023",
                        h.backing_file_size
                    ),
                ));
            }
            let name = file.read_vec_at(
                h.backing_file_offset,
                u64::from(h.backing_file_size),
                "qcow2 backing file name",
            )?;
            h.backing_file = Some(text(
                path,
                "qcow2 backing file name",
                h.backing_file_offset,
                name,
            )?);
        }
        if h.has_data_file() && h.data_file.is_none() {
            return Err(Error::unsupported(
                path,
                "external data file without a recorded file name",
            ));
        }
        if h.data_file_raw() && !h.has_data_file() {
            return Err(bad(
                88,
                "data_file_raw set without an external data file".into(),
            ));
        }
        Ok(h)
    }

    /// Parses the extensions between the header and the end of the first cluster (or the backing
    /// file name, when that comes first). Unknown extensions are skipped.
    fn read_extensions(&mut self, path: &Path, head: &[u8]) -> Result<()> {
        let mut end = head.len() as u64;
        if self.backing_file_offset > u64::from(self.header_length) {
            end = end.min(self.backing_file_offset);
        }
        let mut pos = u64::from(self.header_length);
        while pos + 8 <= end {
            let at = pos as usize;
            let kind = be32(head, at);
            let len = u64::from(be32(head, at + 4));
            if kind == EXT_END {
                break;
            }
            let data_start = pos + 8;
            let data_end = data_start + len;
            if data_end > end {
                return Err(Error::corrupt(
                    path,
                    "qcow2 header extension",
                    pos,
                    format!("extension {kind:#x} of {len} bytes runs past the header area"),
                ));
            }
            let data = head[data_start as usize..data_end as usize].to_vec();
            match kind {
                EXT_BACKING_FORMAT => {
                    self.backing_format =
                        Some(text(path, "qcow2 backing format extension", pos, data)?)
                }
                EXT_DATA_FILE => {
                    self.data_file = Some(text(path, "qcow2 data file extension", pos, data)?)
                }
                EXT_BITMAPS => {
                    self.bitmaps = Some(super::bitmap::BitmapsExtension::parse(path, pos, &data)?)
                }
                _ => self.other_extensions.push((kind, data)),
            }
            pos = data_end.next_multiple_of(8);
        }
        Ok(())
    }
}

impl Header {
    /// A header for a new image; the table offsets are filled in when the layout is known.
    pub fn new(version: u32, cluster_bits: u32, size: u64, refcount_order: u32) -> Header {
        Header {
            version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order,
            header_length: if version == 2 {
                V2_HEADER_LEN
            } else {
                V3_HEADER_LEN_WITH_COMPRESSION
            },
            compression: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            bitmaps: None,
            other_extensions: Vec::new(),
        }
    }

    /// The first cluster of the image: header, extensions (backing format) and backing file name.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut b = Vec::with_capacity(self.cluster_size() as usize);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_be_bytes());
        let name_slot = b.len();
        b.extend_from_slice(&[0; 12]); // backing file offset and size, patched below
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            let mut incompat = self.incompatible_features;
            if self.compression == CompressionType::Zstd {
                incompat |= INCOMPAT_COMPRESSION;
            }
            b.extend_from_slice(&incompat.to_be_bytes());
            b.extend_from_slice(&self.compatible_features.to_be_bytes());
            b.extend_from_slice(&self.autoclear_features.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length.to_be_bytes());
            b.push(match self.compression {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            });
            b.resize(self.header_length as usize, 0);
        }
        let mut extension = |kind: u32, data: &[u8]| {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        };
        if let Some(fmt) = &self.backing_format {
            extension(EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        if let Some(name) = &self.data_file {
            extension(EXT_DATA_FILE, name.as_bytes());
        }
        if let Some(ext) = &self.bitmaps {
            extension(EXT_BITMAPS, &ext.encode());
        }
        for (kind, data) in &self.other_extensions {
            extension(*kind, data);
        }
        b.extend_from_slice(&[0; 8]); // end of extensions
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME_LEN as usize {
                return Err(Error::invalid(format!(
                    "backing file name longer than {MAX_BACKING_NAME_LEN} bytes"
                )));
            }
            let at = b.len() as u64;
            b[name_slot..name_slot + 8].copy_from_slice(&at.to_be_bytes());
            b[name_slot + 8..name_slot + 12].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(Error::invalid(format!(
                "qcow2 header with backing file name needs {} bytes, more than a {}-byte cluster",
                b.len(),
                self.cluster_size()
            )));
        }
        b.resize(self.cluster_size() as usize, 0);
        Ok(b)
    }
}

//! Hosted sparse extents (monolithicSparse, twoGbMaxExtentSparse, streamOptimized): a header, a
//! grain directory (GD) of grain tables (GT) whose entries give the sector of each grain.

use crate::check::{CheckReport, Structure, Used};
use crate::error::{Error, Result};
use crate::host::HostFile;
use byteorder::{ByteOrder, LittleEndian as LE};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

pub const MAGIC: &[u8; 4] = b"KDMV";
const SECTOR: u64 = 512;
/// gdOffset of stream-optimized extents whose grain directory is found through the footer.
const GD_AT_END: u64 = u64::MAX;

const FLAG_NEWLINE_TEST: u32 = 1 << 0;
const FLAG_REDUNDANT_GT: u32 = 1 << 1;
const FLAG_ZEROED_GRAIN_GTE: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const COMPRESSION_DEFLATE: u16 = 1;

/// Grain table entry meaning "reads as zeros" when the extent has FLAG_ZEROED_GRAIN_GTE.
const GTE_ZEROED: u32 = 1;
const MARKER_EOS: u32 = 0;
const MARKER_FOOTER: u32 = 3;

/// Grain sizes from 512 bytes to 64 MiB.
const MAX_GRAIN_SECTORS: u64 = 1 << 17;
const MAX_GTES_PER_GT: u32 = 4096;
/// At most 16 Mi grain tables (a 64 MiB grain directory).
const MAX_GD_ENTRIES: u64 = 1 << 24;
/// Grain table entries `check` walks at most per extent (1 TiB of 64 KiB grains).
const MAX_CHECKED_GRAINS: u64 = 1 << 24;
/// Grain tables kept in memory per extent (512 entries of 4 bytes each, normally).
const GT_CACHE_TABLES: usize = 256;

/// The fields of SparseExtentHeader that diskkit uses.
#[derive(Debug, Clone, Copy)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    /// Extent size in sectors.
    pub capacity: u64,
    pub grain_sectors: u64,
    pub descriptor_offset: u64,
    pub descriptor_sectors: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub compress_algorithm: u16,
}

impl SparseHeader {
    fn parse(b: &[u8; 512]) -> SparseHeader {
        SparseHeader {
            version: LE::read_u32(&b[4..]),
            flags: LE::read_u32(&b[8..]),
            capacity: LE::read_u64(&b[12..]),
            grain_sectors: LE::read_u64(&b[20..]),
            descriptor_offset: LE::read_u64(&b[28..]),
            descriptor_sectors: LE::read_u64(&b[36..]),
            gtes_per_gt: LE::read_u32(&b[44..]),
            rgd_offset: LE::read_u64(&b[48..]),
            gd_offset: LE::read_u64(&b[56..]),
            compress_algorithm: LE::read_u16(&b[77..]),
        }
    }

    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    fn markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }
}

/// Where one grain's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// Not allocated in this extent: the parent's data, or zeros.
    Unallocated,
    Zero,
    /// Uncompressed at this byte offset of the extent file.
    Data(u64),
    /// Compressed, with its grain marker (streamOptimized) or deflate stream at this byte offset.
    Compressed(u64),
}

pub struct SparseExtent {
    file: HostFile,
    pub header: SparseHeader,
    grain_bytes: u64,
    /// Sector offsets of the grain tables; 0 = table not allocated.
    gd: Vec<u32>,
    gt_cache: Mutex<VecDeque<(usize, Arc<[u32]>)>>,
}

impl SparseExtent {
    /// Reads and validates the header (or, for stream-optimized extents, the footer) and loads
    /// the grain directory.
    pub fn open(file: HostFile) -> Result<SparseExtent> {
        let path = file.path().to_path_buf();
        let corrupt = |off: u64, r: String| Error::corrupt(&path, "vmdk sparse header", off, r);
        let mut raw = [0u8; 512];
        file.read_exact_at(&mut raw, 0, "vmdk sparse header")?;
        if &raw[..4] != MAGIC {
            return Err(corrupt(0, "magic is not KDMV".into()));
        }
        let mut header = SparseHeader::parse(&raw);
        if !(1..=3).contains(&header.version) {
            return Err(Error::unsupported(
                &path,
                format!("vmdk sparse extent version {}", header.version),
            ));
        }
        // Sparse files carry newline bytes so that a text-mode transfer is detectable.
        if header.flags & FLAG_NEWLINE_TEST != 0 && raw[73..77] != *b"\n \r\n" {
            return Err(corrupt(
                73,
                "newline test bytes altered (file transferred in text mode?)".into(),
            ));
        }
        if header.markers() && header.gd_offset == GD_AT_END {
            header = read_footer(&file, &header)?;
        }
        if header.compressed() && header.compress_algorithm != COMPRESSION_DEFLATE {
            return Err(Error::unsupported(
                &path,
                format!("vmdk compression algorithm {}", header.compress_algorithm),
            ));
        }
        if !header.grain_sectors.is_power_of_two() || header.grain_sectors > MAX_GRAIN_SECTORS {
            return Err(corrupt(
                20,
                format!(
                    "grain size of {} sectors is not a power of two up to {MAX_GRAIN_SECTORS}",
                    header.grain_sectors
                ),
            ));
        }
        if header.gtes_per_gt == 0 || header.gtes_per_gt > MAX_GTES_PER_GT {
            return Err(corrupt(
                44,
                format!(
                    "{} entries per grain table (1 to {MAX_GTES_PER_GT} allowed)",
                    header.gtes_per_gt
                ),
            ));
        }
        let sectors_per_gt = header.grain_sectors * u64::from(header.gtes_per_gt);
        let gd_entries = header.capacity.div_ceil(sectors_per_gt);
        if gd_entries > MAX_GD_ENTRIES {
            return Err(corrupt(
                12,
                format!(
                    "capacity of {} sectors needs {gd_entries} grain tables (limit {MAX_GD_ENTRIES})",
                    header.capacity
                ),
            ));
        }
        let gd = load_gd(&file, &header, gd_entries)?;
        Ok(SparseExtent {
            grain_bytes: header.grain_sectors * SECTOR,
            file,
            header,
            gd,
            gt_cache: Mutex::new(VecDeque::new()),
        })
    }

    pub fn file(&self) -> &HostFile {
        &self.file
    }

    pub fn grain_bytes(&self) -> u64 {
        self.grain_bytes
    }

    /// Extent size in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.header.capacity.saturating_mul(SECTOR)
    }

    /// The grain holding extent byte `offset`, and how many bytes from `offset` on (at most
    /// `max_len`) read the same way: the following grains of the same table while they are
    /// unallocated or zero alike, or their data follows on in the file. Compressed grains are
    /// one grain each.
    pub fn grain_run(&self, offset: u64, max_len: u64) -> Result<(Grain, u64)> {
        let grain_bytes = self.grain_bytes;
        let grain_index = offset / grain_bytes;
        let per_gt = u64::from(self.header.gtes_per_gt);
        let gd_index = (grain_index / per_gt) as usize;
        let Some(&gt_sector) = self.gd.get(gd_index) else {
            return Err(Error::invalid(format!(
                "vmdk extent offset {offset:#x} is outside the extent"
            )));
        };
        let first_len = (grain_bytes - offset % grain_bytes).min(max_len);
        let table_rest = (per_gt - grain_index % per_gt - 1) * grain_bytes;
        if gt_sector == 0 {
            return Ok((Grain::Unallocated, max_len.min(first_len + table_rest)));
        }
        let table = self.grain_table(gd_index, gt_sector)?;
        let first_entry = (grain_index % per_gt) as usize;
        let entries = table.get(first_entry..).unwrap_or(&[]);
        let mut grains = entries.iter().map(|&gte| self.classify(gte));
        let first = grains.next().unwrap_or(Grain::Unallocated);
        let mut len = first_len;
        if !matches!(first, Grain::Compressed(_)) {
            for (n, next) in (1u64..).zip(grains) {
                if len >= max_len {
                    break;
                }
                let continues = match (first, next) {
                    (Grain::Data(a), Grain::Data(b)) => Some(b) == a.checked_add(n * grain_bytes),
                    (Grain::Unallocated, Grain::Unallocated) | (Grain::Zero, Grain::Zero) => true,
                    _ => false,
                };
                if !continues {
                    break;
                }
                len = (len + grain_bytes).min(max_len);
            }
        }
        Ok((first, len))
    }

    fn classify(&self, gte: u32) -> Grain {
        match gte {
            0 => Grain::Unallocated,
            GTE_ZEROED if self.header.flags & FLAG_ZEROED_GRAIN_GTE != 0 => Grain::Zero,
            s if self.header.compressed() => Grain::Compressed(u64::from(s) * SECTOR),
            s => Grain::Data(u64::from(s) * SECTOR),
        }
    }

    fn grain_table(&self, gd_index: usize, gt_sector: u32) -> Result<Arc<[u32]>> {
        {
            let cache = lock(&self.gt_cache);
            if let Some((_, t)) = cache.iter().find(|(i, _)| *i == gd_index) {
                return Ok(t.clone());
            }
        }
        let offset = u64::from(gt_sector) * SECTOR;
        let bytes = self.file.read_vec_at(
            offset,
            u64::from(self.header.gtes_per_gt) * 4,
            "vmdk grain table",
        )?;
        let table: Arc<[u32]> = bytes.chunks_exact(4).map(LE::read_u32).collect();
        let mut cache = lock(&self.gt_cache);
        if cache.len() >= GT_CACHE_TABLES {
            cache.pop_front();
        }
        cache.push_back((gd_index, table.clone()));
        Ok(table)
    }

    /// Adds to `report` every grain table and grain that lies past the end of the file, and
    /// every overlap between the header, the descriptor, the grain directory, the grain tables
    /// and the uncompressed grains.
    pub fn check(&self, report: &mut CheckReport) {
        let (len, name) = (self.file.len(), self.file.path().display());
        let h = &self.header;
        let at = |sector: u64, bytes: u64, what| Used {
            start: sector.saturating_mul(SECTOR),
            end: sector.saturating_mul(SECTOR).saturating_add(bytes),
            what: Structure(what, None),
        };
        let gd_bytes = self.gd.len() as u64 * 4;
        let mut used = vec![
            at(0, SECTOR, "the header"),
            at(
                h.descriptor_offset,
                h.descriptor_sectors.saturating_mul(SECTOR),
                "the descriptor",
            ),
            at(h.gd_offset, gd_bytes, "the grain directory"),
        ];
        if h.flags & FLAG_REDUNDANT_GT != 0 {
            used.push(at(h.rgd_offset, gd_bytes, "the redundant grain directory"));
        }
        let table_bytes = u64::from(h.gtes_per_gt) * 4;
        let mut walked = 0u64;
        for (i, &gt) in self.gd.iter().enumerate() {
            if gt == 0 {
                continue;
            }
            // Grain directory entries may all name one table: time and memory are bounded by
            // the entries walked, not by the file's size.
            walked += u64::from(h.gtes_per_gt);
            if walked > MAX_CHECKED_GRAINS {
                report.check_errors += 1;
                report.messages.push(format!(
                    "{name}: more than {MAX_CHECKED_GRAINS} grain table entries: check stopped"
                ));
                return;
            }
            let start = u64::from(gt) * SECTOR;
            let table = match self
                .file
                .read_vec_at(start, table_bytes, "vmdk grain table")
            {
                Ok(t) => t,
                Err(e) => {
                    report.corruption(format!("ERROR: {name}: grain table {i}: {e}"));
                    continue;
                }
            };
            used.push(Used {
                start,
                end: start + table_bytes,
                what: Structure("grain table", Some(i as u64)),
            });
            for (j, gte) in table.chunks_exact(4).map(LE::read_u32).enumerate() {
                let grain = i as u64 * u64::from(h.gtes_per_gt) + j as u64;
                let start = match self.classify(gte) {
                    Grain::Data(start) | Grain::Compressed(start) => start,
                    Grain::Unallocated | Grain::Zero => continue,
                };
                if start >= len {
                    report.corruption(format!(
                        "ERROR: {name}: grain {grain} at {start:#x} points after the end of \
                         the file ({len:#x})"
                    ));
                } else if !h.compressed() {
                    // The last grain may end past the file's end: qemu reads zeros there.
                    used.push(Used {
                        start,
                        end: (start + self.grain_bytes).min(len),
                        what: Structure("grain", Some(grain)),
                    });
                }
            }
        }
        report.overlaps(used);
    }

    /// Decompresses the grain starting at extent byte `grain_start` whose data is at `at`.
    /// Returns the grain's bytes (a whole grain, zero-padded past the end of the stream).
    pub fn read_compressed(&self, grain_start: u64, at: u64) -> Result<Vec<u8>> {
        let path = self.file.path();
        // Deflate can grow incompressible data a little; anything larger is not a grain.
        let max_stored = self.grain_bytes * 2 + 4096;
        let (data_at, stored) = if self.header.markers() {
            let mut marker = [0u8; 12];
            self.file
                .read_exact_at(&mut marker, at, "vmdk grain marker")?;
            let lba = LE::read_u64(&marker);
            let size = u64::from(LE::read_u32(&marker[8..]));
            if lba != grain_start / SECTOR {
                return Err(Error::corrupt(
                    path,
                    "vmdk grain marker",
                    at,
                    format!(
                        "marker says sector {lba} but the grain table maps sector {}",
                        grain_start / SECTOR
                    ),
                ));
            }
            if size == 0 || size > max_stored {
                return Err(Error::corrupt(
                    path,
                    "vmdk grain marker",
                    at,
                    format!("compressed size {size} out of range"),
                ));
            }
            (at + 12, size)
        } else {
            (at, max_stored.min(self.file.len().saturating_sub(at)))
        };
        let stored_bytes = self
            .file
            .read_vec_at(data_at, stored, "vmdk compressed grain")?;
        let mut out = vec![0u8; self.grain_bytes as usize];
        let mut z = flate2::Decompress::new(true);
        let status = z
            .decompress(&stored_bytes, &mut out, flate2::FlushDecompress::Finish)
            .map_err(|e| {
                Error::corrupt(
                    path,
                    "vmdk compressed grain",
                    at,
                    format!("inflate failed: {e}"),
                )
            })?;
        let wanted = self
            .grain_bytes
            .min(self.capacity_bytes().saturating_sub(grain_start));
        if status != flate2::Status::StreamEnd || z.total_out() < wanted {
            return Err(Error::corrupt(
                path,
                "vmdk compressed grain",
                at,
                format!(
                    "compressed stream yields {} bytes, grain needs {wanted}",
                    z.total_out()
                ),
            ));
        }
        Ok(out)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Stream-optimized extents written in one pass put the real header (the footer) at the end:
/// footer marker, footer, end-of-stream marker, one sector each.
fn read_footer(file: &HostFile, header: &SparseHeader) -> Result<SparseHeader> {
    let path = file.path();
    let len = file.len();
    if len < 3 * SECTOR || !len.is_multiple_of(SECTOR) {
        return Err(Error::corrupt(
            path,
            "vmdk footer",
            len,
            "grain directory is at the end but the file has no room for a footer",
        ));
    }
    let mut tail = [0u8; 3 * SECTOR as usize];
    let at = len - 3 * SECTOR;
    file.read_exact_at(&mut tail, at, "vmdk footer")?;
    let marker_type = |m: &[u8]| (LE::read_u32(&m[8..]) == 0).then(|| LE::read_u32(&m[12..]));
    let (footer_marker, rest) = tail.split_at(SECTOR as usize);
    let (footer, eos) = rest.split_at(SECTOR as usize);
    if marker_type(footer_marker) != Some(MARKER_FOOTER) || marker_type(eos) != Some(MARKER_EOS) {
        return Err(Error::corrupt(
            path,
            "vmdk footer",
            at,
            "no footer marker and end-of-stream marker at the end of the file",
        ));
    }
    let mut raw = [0u8; 512];
    raw.copy_from_slice(footer);
    if &raw[..4] != MAGIC {
        return Err(Error::corrupt(
            path,
            "vmdk footer",
            at + SECTOR,
            "magic is not KDMV",
        ));
    }
    let f = SparseHeader::parse(&raw);
    if f.gd_offset == GD_AT_END
        || f.capacity != header.capacity
        || f.grain_sectors != header.grain_sectors
    {
        return Err(Error::corrupt(
            path,
            "vmdk footer",
            at + SECTOR,
            "footer disagrees with the header or has no grain directory offset",
        ));
    }
    Ok(f)
}

/// Loads the grain directory, falling back to the redundant copy when the primary one lies
/// outside the file.
fn load_gd(file: &HostFile, header: &SparseHeader, entries: u64) -> Result<Vec<u32>> {
    let bytes_len = entries * 4;
    let read = |sector: u64| -> Result<Vec<u32>> {
        let offset = sector.checked_mul(SECTOR).ok_or_else(|| {
            Error::corrupt(
                file.path(),
                "vmdk grain directory",
                sector,
                "offset overflows",
            )
        })?;
        if sector == 0 {
            return Err(Error::corrupt(
                file.path(),
                "vmdk grain directory",
                0,
                "grain directory at sector 0 overlaps the header",
            ));
        }
        let bytes = file.read_vec_at(offset, bytes_len, "vmdk grain directory")?;
        Ok(bytes.chunks_exact(4).map(LE::read_u32).collect())
    };
    match read(header.gd_offset) {
        Ok(gd) => Ok(gd),
        Err(e) if header.flags & FLAG_REDUNDANT_GT != 0 => read(header.rgd_offset).map_err(|_| e),
        Err(e) => Err(e),
    }
}

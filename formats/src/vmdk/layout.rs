//! What the VMDK writers and streams share: the `-o` options, the sparse extent header, the
//! embedded descriptor, markers and compressed grains (VMware Virtual Disk Format 5.0).
//!
//! Both subformats use 64 KiB grains and grain tables of 512 entries (32 MiB of guest each),
//! the values VMware's own tools write.

use super::sparse::MAGIC;
use crate::error::{Error, Result};
use crate::image::Format;
use crate::write::CreateOptions;
use byteorder::{ByteOrder, LittleEndian as LE};
use std::cell::RefCell;

pub const SECTOR: u64 = 512;
pub const GRAIN_SECTORS: u64 = 128;
pub const GRAIN_BYTES: u64 = GRAIN_SECTORS * SECTOR;
pub const GTES_PER_GT: u64 = 512;
/// Guest bytes one grain table covers.
pub const GT_SPAN: u64 = GRAIN_BYTES * GTES_PER_GT;
/// Sectors of one grain table.
pub const GT_SECTORS: u64 = GTES_PER_GT * 4 / SECTOR;
/// Sectors reserved for the embedded descriptor (VMware's tools reserve 20 too).
pub const DESCRIPTOR_SECTORS: u64 = 20;
/// Largest capacity diskkit writes: grain table entries are 32-bit sector numbers, so the file
/// must stay below 2 TiB; 2 TiB minus what the metadata of a full disk needs keeps any image
/// inside that limit.
pub const MAX_CAPACITY: u64 = (2 << 40) - (16 << 30);

const FLAG_NEWLINE_TEST: u32 = 1 << 0;
const FLAG_REDUNDANT_GT: u32 = 1 << 1;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const COMPRESSION_DEFLATE: u16 = 1;
/// gdOffset of a stream-optimized header: the footer holds the real one.
const GD_AT_END: u64 = u64::MAX;

pub const MARKER_EOS: u32 = 0;
pub const MARKER_GT: u32 = 1;
pub const MARKER_GD: u32 = 2;
pub const MARKER_FOOTER: u32 = 3;
/// Bytes of a grain marker before the compressed data: the grain's sector and the data size.
pub const GRAIN_MARKER_BYTES: usize = 12;

/// `subformat=`: how the one extent stores its grains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    /// Grains uncompressed, grain tables allocated up front, redundant tables (qemu's default).
    MonolithicSparse,
    /// Grains deflate-compressed behind markers, tables after their grains, directory and
    /// footer at the end: what VMware's OVF tools and AWS import take.
    StreamOptimized,
}

/// `adapter_type=`: the controller the descriptor names; it also picks the CHS geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adapter {
    Ide,
    LsiLogic,
    BusLogic,
    LegacyEsx,
}

impl Adapter {
    fn name(self) -> &'static str {
        match self {
            Adapter::Ide => "ide",
            Adapter::LsiLogic => "lsilogic",
            Adapter::BusLogic => "buslogic",
            Adapter::LegacyEsx => "legacyESX",
        }
    }
}

/// The `-o` options of a new VMDK, as qemu-img names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmdkOptions {
    pub subformat: Subformat,
    pub adapter: Adapter,
    /// `ddb.virtualHWVersion`: the oldest VMware virtual hardware that may use the disk.
    pub hw_version: u32,
    /// Guest size in sectors (the requested size rounded up to whole sectors).
    pub capacity: u64,
}

impl VmdkOptions {
    /// Takes the VMDK options out of `opts` for a guest of `virtual_size` bytes and refuses the
    /// rest: `subformat=monolithicSparse|streamOptimized` (default monolithicSparse, as
    /// qemu-img), `adapter_type=ide|lsilogic|buslogic|legacyESX` (default ide) and
    /// `hwversion=N` (default 4).
    pub fn take(virtual_size: u64, opts: &mut CreateOptions) -> Result<VmdkOptions> {
        let subformat = match opts.take("subformat").as_deref() {
            None | Some("monolithicSparse") => Subformat::MonolithicSparse,
            Some("streamOptimized") => Subformat::StreamOptimized,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "option subformat: '{other}' is not monolithicSparse or streamOptimized \
                     (diskkit writes single-file VMDKs only)"
                )));
            }
        };
        let adapter = match opts.take("adapter_type").as_deref() {
            None | Some("ide") => Adapter::Ide,
            Some("lsilogic") => Adapter::LsiLogic,
            Some("buslogic") => Adapter::BusLogic,
            Some("legacyESX") => Adapter::LegacyEsx,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "option adapter_type: '{other}' is not ide, lsilogic, buslogic or legacyESX"
                )));
            }
        };
        let hw_version = match opts.take("hwversion") {
            None => 4,
            Some(v) => v.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| {
                Error::invalid(format!(
                    "option hwversion: '{v}' is not a virtual hardware version (a number such \
                     as 4, 6 or 13)"
                ))
            })?,
        };
        opts.reject_unknown(Format::Vmdk)?;
        if opts.backing_file.is_some() {
            return Err(Error::invalid(
                "creating VMDK delta disks (-B) is not supported; diskkit reads them",
            ));
        }
        if opts.compress && subformat != Subformat::StreamOptimized {
            return Err(Error::invalid(
                "-c: VMDK grains are compressed only in subformat=streamOptimized",
            ));
        }
        let capacity = virtual_size.div_ceil(SECTOR);
        if capacity * SECTOR > MAX_CAPACITY {
            return Err(Error::invalid(format!(
                "VMDK images diskkit writes hold at most {MAX_CAPACITY} bytes (grain offsets are \
                 32-bit sector numbers); {virtual_size} requested"
            )));
        }
        Ok(VmdkOptions {
            subformat,
            adapter,
            hw_version,
            capacity,
        })
    }

    /// Guest size in bytes.
    pub fn guest_size(&self) -> u64 {
        self.capacity * SECTOR
    }

    /// Grain directory entries: one per grain table.
    pub fn gd_entries(&self) -> u64 {
        self.guest_size().div_ceil(GT_SPAN)
    }

    /// The sparse extent header. `gd` and `rgd` are sector offsets of the grain directories
    /// (`None`: stream-optimized header, the footer has it); `overhead` is the sectors before
    /// the first grain.
    pub fn header(&self, gd: Option<u64>, rgd: u64, overhead: u64) -> [u8; SECTOR as usize] {
        let mut h = [0u8; SECTOR as usize];
        let (version, flags) = match self.subformat {
            Subformat::MonolithicSparse => (1, FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GT),
            // Version 3 is what VMware and AWS require of stream-optimized extents.
            Subformat::StreamOptimized => (3, FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS),
        };
        h[..4].copy_from_slice(MAGIC);
        LE::write_u32(&mut h[4..], version);
        LE::write_u32(&mut h[8..], flags);
        LE::write_u64(&mut h[12..], self.capacity);
        LE::write_u64(&mut h[20..], GRAIN_SECTORS);
        LE::write_u64(&mut h[28..], 1);
        LE::write_u64(&mut h[36..], DESCRIPTOR_SECTORS);
        LE::write_u32(&mut h[44..], GTES_PER_GT as u32);
        LE::write_u64(&mut h[48..], rgd);
        LE::write_u64(&mut h[56..], gd.unwrap_or(GD_AT_END));
        LE::write_u64(&mut h[64..], overhead);
        // uncleanShutdown (72) stays 0; then the bytes that reveal a text-mode transfer.
        h[73..77].copy_from_slice(b"\n \r\n");
        if self.subformat == Subformat::StreamOptimized {
            LE::write_u16(&mut h[77..], COMPRESSION_DEFLATE);
        }
        h
    }

    /// The embedded descriptor, zero-padded to its reserved sectors. `name` is the file name
    /// the extent line records (readers of a monolithic file use the file itself).
    pub fn descriptor(&self, name: &str, cid: u32) -> Result<Vec<u8>> {
        let create_type = match self.subformat {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::StreamOptimized => "streamOptimized",
        };
        // A quote or a line break in the name would end the extent line early.
        let name: String = name
            .chars()
            .map(|c| if c == '"' || c.is_control() { '_' } else { c })
            .collect();
        let (cylinders, heads, sectors) = self.geometry();
        let text = format!(
            "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\n\
             createType=\"{create_type}\"\n\n# Extent description\nRW {} SPARSE \"{name}\"\n\n\
             # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"{}\"\n\
             ddb.geometry.cylinders = \"{cylinders}\"\nddb.geometry.heads = \"{heads}\"\n\
             ddb.geometry.sectors = \"{sectors}\"\nddb.adapterType = \"{}\"\n",
            self.capacity,
            self.hw_version,
            self.adapter.name()
        );
        let room = (DESCRIPTOR_SECTORS * SECTOR) as usize;
        if text.len() > room {
            return Err(Error::invalid(format!(
                "VMDK descriptor of {} bytes does not fit in {room} (file name too long?)",
                text.len()
            )));
        }
        let mut bytes = text.into_bytes();
        bytes.resize(room, 0);
        Ok(bytes)
    }

    /// The CHS geometry VMware tools expect for the adapter: 16 heads on IDE, 255 on SCSI,
    /// 63 sectors per track, cylinders capped at 65535.
    fn geometry(&self) -> (u64, u64, u64) {
        let heads = if self.adapter == Adapter::Ide {
            16
        } else {
            255
        };
        let sectors = 63;
        (
            (self.capacity / (heads * sectors)).min(65535),
            heads,
            sectors,
        )
    }
}

/// A metadata marker sector: `sectors` of metadata of `kind` follow it.
pub fn marker(sectors: u64, kind: u32) -> [u8; SECTOR as usize] {
    let mut m = [0u8; SECTOR as usize];
    LE::write_u64(&mut m, sectors);
    LE::write_u32(&mut m[12..], kind);
    m
}

/// A grain table's or directory's entries as little-endian bytes, zero-padded to whole sectors.
pub fn table_bytes(entries: &[u32]) -> Vec<u8> {
    let mut out = vec![0u8; (entries.len() as u64 * 4).next_multiple_of(SECTOR) as usize];
    for (slot, e) in out.chunks_exact_mut(4).zip(entries) {
        LE::write_u32(slot, *e);
    }
    out
}

/// Sectors before the first grain of a stream-optimized extent: header, descriptor, padding.
pub const STREAM_DATA_START: u64 = 128;
/// Sectors of a grain table with its marker.
pub const GT_BLOCK_SECTORS: u64 = 1 + GT_SECTORS;

impl VmdkOptions {
    /// Header, descriptor and padding of a stream-optimized extent: [`STREAM_DATA_START`]
    /// sectors.
    pub fn stream_head(&self, name: &str, cid: u32) -> Result<Vec<u8>> {
        let mut head = self.header(None, 0, STREAM_DATA_START).to_vec();
        head.extend(self.descriptor(name, cid)?);
        head.resize((STREAM_DATA_START * SECTOR) as usize, 0);
        Ok(head)
    }

    /// Sectors of the end of a stream-optimized extent: grain directory marker and directory,
    /// footer marker, footer, end-of-stream marker.
    pub fn stream_tail_sectors(&self) -> u64 {
        1 + (self.gd_entries() * 4).div_ceil(SECTOR) + 3
    }

    /// The end of a stream-optimized extent that starts at sector `at`, for grain directory
    /// `gd` (sector of each grain table, 0 for none).
    pub fn stream_tail(&self, gd: &[u32], at: u64) -> Vec<u8> {
        let table = table_bytes(gd);
        let mut tail = marker(table.len() as u64 / SECTOR, MARKER_GD).to_vec();
        tail.extend(table);
        tail.extend(marker(1, MARKER_FOOTER));
        tail.extend(self.header(Some(at + 1), 0, STREAM_DATA_START));
        tail.extend(marker(0, MARKER_EOS));
        tail
    }
}

/// A grain table after its marker: [`GT_BLOCK_SECTORS`] sectors.
pub fn gt_block(entries: &[u32]) -> Vec<u8> {
    let mut block = marker(GT_SECTORS, MARKER_GT).to_vec();
    block.extend(table_bytes(entries));
    block
}

/// The content identifier (descriptor `CID`) of a stream-optimized disk, derived from its
/// stored grains (guest sector and stored sectors of each, in order) so that a file and a
/// stream of one source, and a resumed upload, carry the same one. qemu picks a random CID;
/// VMware only compares it with a child disk's parentCID.
#[derive(Default)]
pub struct ContentId(sha2::Sha256);

impl ContentId {
    pub fn add(&mut self, lba: u64, sectors: u64) {
        use sha2::Digest;
        self.0.update(lba.to_le_bytes());
        self.0.update(sectors.to_le_bytes());
    }

    /// The digest of what was added, and the CID taken from it.
    pub fn finish(self, capacity: u64) -> ([u8; 32], u32) {
        use sha2::Digest;
        let mut sha = self.0;
        sha.update(capacity.to_le_bytes());
        let digest: [u8; 32] = sha.finalize().into();
        (digest, LE::read_u32(&digest))
    }
}

/// deflate level of compressed grains. Measured on benches/vmdk.sh's mixed 1 GiB disk against
/// qemu-img (zlib level 6): level 2 stores 1.025x qemu's bytes for 0.46x its CPU time; level 6
/// 1.003x for 0.78x; level 1 (static codes only) 1.11x for 0.29x.
const DEFLATE_LEVEL: u32 = 2;

thread_local! {
    // Setting a compressor up costs more than compressing a grain: one per thread, reset.
    static ZLIB: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
}

/// The stored form of a grain whose content is `grain` (a whole grain, the last one
/// zero-padded), starting at guest sector `lba`: grain marker, zlib stream, zero padding to a
/// whole sector. `None` when the grain is all zeros (not stored: it reads as zeros).
pub fn grain_record(grain: &[u8], lba: u64) -> Result<Option<Vec<u8>>> {
    if crate::image::first_nonzero_byte(grain).is_none() {
        return Ok(None);
    }
    ZLIB.with(|cell| {
        let mut slot = cell.borrow_mut();
        let z = slot.get_or_insert_with(|| {
            flate2::Compress::new(flate2::Compression::new(DEFLATE_LEVEL), true)
        });
        z.reset();
        let mut out = Vec::with_capacity(GRAIN_MARKER_BYTES + grain.len() + grain.len() / 8);
        out.resize(GRAIN_MARKER_BYTES, 0);
        // Fast levels can grow incompressible data: more room until the stream ends.
        loop {
            let consumed = z.total_in() as usize;
            match z.compress_vec(&grain[consumed..], &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => break,
                Ok(_) if out.len() < 2 * grain.len() => out.reserve(grain.len() / 4),
                other => {
                    return Err(Error::invalid(format!(
                        "deflate of the grain at sector {lba} failed: {other:?}"
                    )));
                }
            }
        }
        let size = (out.len() - GRAIN_MARKER_BYTES) as u32;
        LE::write_u64(&mut out, lba);
        LE::write_u32(&mut out[8..], size);
        out.resize((out.len() as u64).next_multiple_of(SECTOR) as usize, 0);
        Ok(Some(out))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write::options as opts;

    #[test]
    fn options_as_qemu_names_them() {
        let o = VmdkOptions::take(1000, &mut opts("")).unwrap();
        assert_eq!(o.subformat, Subformat::MonolithicSparse);
        assert_eq!((o.adapter, o.hw_version, o.capacity), (Adapter::Ide, 4, 2));
        let o = VmdkOptions::take(
            1 << 30,
            &mut opts("subformat=streamOptimized,adapter_type=lsilogic,hwversion=13"),
        )
        .unwrap();
        assert_eq!(o.subformat, Subformat::StreamOptimized);
        assert_eq!((o.adapter, o.hw_version), (Adapter::LsiLogic, 13));
        let text = String::from_utf8(o.descriptor("a\"b.vmdk", 0x1234).unwrap()).unwrap();
        assert!(text.contains("createType=\"streamOptimized\""), "{text}");
        assert!(text.contains("RW 2097152 SPARSE \"a_b.vmdk\""), "{text}");
        assert!(text.contains("CID=00001234"), "{text}");
        for bad in [
            "subformat=twoGbMaxExtentFlat",
            "adapter_type=nvme",
            "hwversion=x",
            "hwversion=0",
            "zeroed_grain=on",
        ] {
            let e = VmdkOptions::take(1 << 20, &mut opts(bad)).unwrap_err();
            assert!(
                e.to_string().contains(bad.split('=').next().unwrap()),
                "{e}"
            );
        }
        assert!(VmdkOptions::take(3 << 40, &mut opts("")).is_err());
    }

    #[test]
    fn grain_records_are_whole_sectors_with_a_marker() {
        let grain: Vec<u8> = (0..GRAIN_BYTES).map(|i| (i / 100) as u8).collect();
        let r = grain_record(&grain, 256).unwrap().unwrap();
        assert!(r.len().is_multiple_of(SECTOR as usize));
        assert_eq!(LE::read_u64(&r), 256);
        let size = LE::read_u32(&r[8..]) as usize;
        let mut out = vec![0u8; grain.len()];
        let mut z = flate2::Decompress::new(true);
        z.decompress(&r[12..12 + size], &mut out, flate2::FlushDecompress::Finish)
            .unwrap();
        assert_eq!(out, grain);
        assert_eq!(grain_record(&grain, 256).unwrap().unwrap(), r);
        assert!(grain_record(&[0; 65536], 0).unwrap().is_none());
    }
}

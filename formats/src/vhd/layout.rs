//! On-disk structures of the VHD format (Microsoft Virtual Hard Disk Image Format Specification):
//! the 512-byte hard disk footer, the 1024-byte dynamic disk header, the block allocation table
//! and the CHS geometry rules. All integers are big-endian.

use byteorder::{BigEndian, ByteOrder};

pub const FOOTER_SIZE: u64 = 512;
/// Some early Virtual PC images end with a 511-byte footer (no saved-state byte).
pub const OLD_FOOTER_SIZE: u64 = 511;
pub const HEADER_SIZE: u64 = 1024;
pub const SECTOR: u64 = 512;

pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// Footer and header format version 1.0.
pub const VERSION: u32 = 0x0001_0000;
/// "Reserved" feature bit that the specification says must always be set.
pub const FEATURES_RESERVED: u32 = 0x2;
/// Data offset of a fixed disk's footer: there is no next structure.
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// BAT entry of a block that is not allocated.
pub const UNALLOCATED: u32 = u32::MAX;
/// VHD timestamps count seconds from 2000-01-01 00:00:00 UTC.
pub const EPOCH_2000: u64 = 946_684_800;

/// Largest CHS geometry (65535 cylinders, 16 heads, 255 sectors per track), in sectors.
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// Largest virtual size of a VHD: 2040 GiB (qemu refuses larger images; Hyper-V creates none).
pub const MAX_VIRTUAL_SIZE: u64 = 0xff00_0000 * SECTOR;
/// Block sizes diskkit accepts: powers of two in this range (Hyper-V uses 512 KiB and 2 MiB).
pub const MIN_BLOCK_SIZE: u64 = SECTOR;
pub const MAX_BLOCK_SIZE: u64 = 256 << 20;
pub const DEFAULT_BLOCK_SIZE: u64 = 2 << 20;
/// Most BAT entries diskkit loads or writes (256 MiB of table; 2040 GiB in 2 MiB blocks is 1 Mi).
pub const MAX_BAT_ENTRIES: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    pub fn from_raw(v: u32) -> Option<DiskType> {
        match v {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    pub fn raw(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// The name `info` shows (qemu's `subformat` values, plus "differencing").
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// Cylinders, heads and sectors per track as stored in the footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
}

impl Geometry {
    pub const MAX: Geometry = Geometry {
        cylinders: 65535,
        heads: 16,
        sectors_per_track: 255,
    };

    pub fn sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    /// The geometry the specification's algorithm (appendix "CHS calculation") derives from a
    /// sector count. It may cover fewer sectors than asked for: it rounds down.
    pub fn for_sectors(total: u64) -> Geometry {
        let total = total.min(MAX_CHS_SECTORS);
        let (spt, heads, cyl_times_heads) = if total >= 65535 * 16 * 63 {
            (255, 16, total / 255)
        } else {
            let mut spt = 17;
            let mut cth = total / spt;
            let mut heads = cth.div_ceil(1024).max(4);
            if cth >= heads * 1024 || heads > 16 {
                spt = 31;
                heads = 16;
                cth = total / spt;
            }
            if cth >= heads * 1024 {
                spt = 63;
                heads = 16;
                cth = total / spt;
            }
            (spt, heads, cth)
        };
        Geometry {
            // Bounded by the 65535 * 16 * 255 cap above.
            cylinders: (cyl_times_heads / heads).min(65535) as u16,
            heads: heads as u8,
            sectors_per_track: spt as u8,
        }
    }

    /// The smallest geometry that covers at least `total` sectors, as qemu rounds sizes up when
    /// it creates an image without force_size (so a conversion never truncates the guest).
    /// Sizes beyond the largest geometry get [`Geometry::MAX`].
    pub fn covering(total: u64) -> Geometry {
        if total >= MAX_CHS_SECTORS {
            return Geometry::MAX;
        }
        // The spec's geometry of n sectors loses at most heads * spt - 1 sectors (< 4080), so
        // this loop ends after a few thousand steps at most.
        let mut n = total;
        loop {
            let g = Geometry::for_sectors(n);
            if g.sectors() >= total {
                return g;
            }
            n += 1;
        }
    }
}

/// The hard disk footer: at the end of every VHD, and copied at offset 0 of dynamic and
/// differencing disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    /// Offset of the dynamic disk header; [`NO_DATA_OFFSET`] for fixed disks.
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: u32,
    pub checksum: u32,
    pub uuid: [u8; 16],
    pub saved_state: u8,
}

/// One's complement of the byte sum of `buf`, with the 4 checksum bytes at `checksum_at`
/// counted as zero (the footer and header checksum rule).
pub fn checksum(buf: &[u8], checksum_at: usize) -> u32 {
    let sum = buf.iter().enumerate().fold(0u32, |acc, (i, &b)| {
        if (checksum_at..checksum_at + 4).contains(&i) {
            acc
        } else {
            acc.wrapping_add(u32::from(b))
        }
    });
    !sum
}

const FOOTER_CHECKSUM_AT: usize = 64;
const HEADER_CHECKSUM_AT: usize = 36;

fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

impl Footer {
    /// True when `buf` starts with the footer cookie.
    pub fn has_cookie(buf: &[u8]) -> bool {
        buf.starts_with(FOOTER_COOKIE)
    }

    /// Decodes a footer of [`FOOTER_SIZE`] or [`OLD_FOOTER_SIZE`] bytes (shorter input is padded
    /// with zeros). Fields are not validated.
    pub fn parse(bytes: &[u8]) -> Footer {
        let mut b = [0u8; FOOTER_SIZE as usize];
        let n = bytes.len().min(b.len());
        b[..n].copy_from_slice(&bytes[..n]);
        Footer {
            features: BigEndian::read_u32(&b[8..]),
            version: BigEndian::read_u32(&b[12..]),
            data_offset: BigEndian::read_u64(&b[16..]),
            timestamp: BigEndian::read_u32(&b[24..]),
            creator_app: array(&b[28..]),
            creator_version: BigEndian::read_u32(&b[32..]),
            creator_os: array(&b[36..]),
            original_size: BigEndian::read_u64(&b[40..]),
            current_size: BigEndian::read_u64(&b[48..]),
            geometry: Geometry {
                cylinders: BigEndian::read_u16(&b[56..]),
                heads: b[58],
                sectors_per_track: b[59],
            },
            disk_type: BigEndian::read_u32(&b[60..]),
            checksum: BigEndian::read_u32(&b[64..]),
            uuid: array(&b[68..]),
            saved_state: b[84],
        }
    }

    /// Encodes the footer with its checksum computed (the `checksum` field is ignored).
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE as usize] {
        let mut b = [0u8; FOOTER_SIZE as usize];
        b[..8].copy_from_slice(FOOTER_COOKIE);
        BigEndian::write_u32(&mut b[8..], self.features);
        BigEndian::write_u32(&mut b[12..], self.version);
        BigEndian::write_u64(&mut b[16..], self.data_offset);
        BigEndian::write_u32(&mut b[24..], self.timestamp);
        b[28..32].copy_from_slice(&self.creator_app);
        BigEndian::write_u32(&mut b[32..], self.creator_version);
        b[36..40].copy_from_slice(&self.creator_os);
        BigEndian::write_u64(&mut b[40..], self.original_size);
        BigEndian::write_u64(&mut b[48..], self.current_size);
        BigEndian::write_u16(&mut b[56..], self.geometry.cylinders);
        b[58] = self.geometry.heads;
        b[59] = self.geometry.sectors_per_track;
        BigEndian::write_u32(&mut b[60..], self.disk_type);
        b[68..84].copy_from_slice(&self.uuid);
        b[84] = self.saved_state;
        let sum = checksum(&b, FOOTER_CHECKSUM_AT);
        BigEndian::write_u32(&mut b[64..], sum);
        b
    }

    /// Whether the stored checksum matches the bytes it was decoded from.
    pub fn checksum_ok(bytes: &[u8]) -> bool {
        let mut b = [0u8; FOOTER_SIZE as usize];
        let n = bytes.len().min(b.len());
        b[..n].copy_from_slice(&bytes[..n]);
        checksum(&b, FOOTER_CHECKSUM_AT) == BigEndian::read_u32(&b[FOOTER_CHECKSUM_AT..])
    }

    /// The guest size as qemu 10 computes it (block/vpc.c, `vpc_open`). Virtual PC sized disks
    /// by their CHS geometry and its footer sizes are often larger than what the guest saw,
    /// while Hyper-V and most converters use `current_size`. qemu uses `current_size` when the
    /// creator application is one of "win " (Hyper-V), "qem2" (qemu with force_size), "d2v "
    /// (Disk2vhd), "CTXS" (XenConverter) or "tap\0" (XenServer), or when the geometry is the
    /// largest CHS geometry (which marks sizes CHS cannot express); everything else, including
    /// "vpc " and "qemu" (qemu without force_size), is sized by cylinders * heads * sectors.
    /// Either way the size is whole sectors.
    pub fn guest_size(&self) -> u64 {
        if self.sized_by_current_size() || self.geometry.sectors() == MAX_CHS_SECTORS {
            self.current_size / SECTOR * SECTOR
        } else {
            self.geometry.sectors() * SECTOR
        }
    }

    /// Whether the creator application is one whose images qemu sizes by `current_size`.
    pub fn sized_by_current_size(&self) -> bool {
        const CURRENT_SIZE_CREATORS: [&[u8; 4]; 5] = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"];
        CURRENT_SIZE_CREATORS.contains(&&self.creator_app)
    }

    pub fn creator_app_str(&self) -> String {
        printable(&self.creator_app)
    }
}

/// A 4-character code as text (non-printable bytes shown as escapes).
pub fn printable(code: &[u8]) -> String {
    code.iter()
        .flat_map(|&c| std::ascii::escape_default(c))
        .map(char::from)
        .collect()
}

/// Formats a UUID as the usual 8-4-4-4-12 hex groups, bytes in stored order.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// One entry of the dynamic header's parent locator table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParentLocator {
    pub platform_code: u32,
    /// Space reserved for the locator (sectors per the spec; Windows writes bytes).
    pub data_space: u32,
    pub data_length: u32,
    pub data_offset: u64,
}

/// Platform codes of parent locators diskkit reads.
pub const PLATFORM_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
pub const PLATFORM_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
pub const PLATFORM_MACX: u32 = u32::from_be_bytes(*b"MacX");

pub const PARENT_LOCATORS: usize = 8;
const PARENT_NAME_AT: usize = 64;
const PARENT_NAME_LEN: usize = 512;
const LOCATORS_AT: usize = 576;

/// The dynamic disk header of dynamic and differencing disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    pub data_offset: u64,
    pub table_offset: u64,
    pub version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub checksum: u32,
    pub parent_uuid: [u8; 16],
    pub parent_timestamp: u32,
    /// Parent file name, UTF-16BE, as stored (512 bytes).
    pub parent_name: [u8; PARENT_NAME_LEN],
    pub parent_locators: [ParentLocator; PARENT_LOCATORS],
}

impl DynamicHeader {
    /// A header without parent for a disk whose BAT is at `table_offset`.
    pub fn new(table_offset: u64, max_table_entries: u32, block_size: u32) -> Self {
        DynamicHeader {
            // The spec says 0xFFFFFFFF, but Microsoft's tools write all 64 bits set.
            data_offset: u64::MAX,
            table_offset,
            version: VERSION,
            max_table_entries,
            block_size,
            checksum: 0,
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            parent_name: [0; PARENT_NAME_LEN],
            parent_locators: [ParentLocator::default(); PARENT_LOCATORS],
        }
    }

    pub fn has_cookie(buf: &[u8]) -> bool {
        buf.starts_with(HEADER_COOKIE)
    }

    /// Decodes `bytes` ([`HEADER_SIZE`] long; shorter input is padded with zeros).
    pub fn parse(bytes: &[u8]) -> DynamicHeader {
        let mut b = [0u8; HEADER_SIZE as usize];
        let n = bytes.len().min(b.len());
        b[..n].copy_from_slice(&bytes[..n]);
        let mut parent_locators = [ParentLocator::default(); PARENT_LOCATORS];
        for (i, l) in parent_locators.iter_mut().enumerate() {
            let e = &b[LOCATORS_AT + 24 * i..];
            *l = ParentLocator {
                platform_code: BigEndian::read_u32(e),
                data_space: BigEndian::read_u32(&e[4..]),
                data_length: BigEndian::read_u32(&e[8..]),
                data_offset: BigEndian::read_u64(&e[16..]),
            };
        }
        DynamicHeader {
            data_offset: BigEndian::read_u64(&b[8..]),
            table_offset: BigEndian::read_u64(&b[16..]),
            version: BigEndian::read_u32(&b[24..]),
            max_table_entries: BigEndian::read_u32(&b[28..]),
            block_size: BigEndian::read_u32(&b[32..]),
            checksum: BigEndian::read_u32(&b[36..]),
            parent_uuid: array(&b[40..]),
            parent_timestamp: BigEndian::read_u32(&b[56..]),
            parent_name: array(&b[PARENT_NAME_AT..]),
            parent_locators,
        }
    }

    /// Encodes the header with its checksum computed.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE as usize] {
        let mut b = [0u8; HEADER_SIZE as usize];
        b[..8].copy_from_slice(HEADER_COOKIE);
        BigEndian::write_u64(&mut b[8..], self.data_offset);
        BigEndian::write_u64(&mut b[16..], self.table_offset);
        BigEndian::write_u32(&mut b[24..], self.version);
        BigEndian::write_u32(&mut b[28..], self.max_table_entries);
        BigEndian::write_u32(&mut b[32..], self.block_size);
        b[40..56].copy_from_slice(&self.parent_uuid);
        BigEndian::write_u32(&mut b[56..], self.parent_timestamp);
        b[PARENT_NAME_AT..PARENT_NAME_AT + PARENT_NAME_LEN].copy_from_slice(&self.parent_name);
        for (i, l) in self.parent_locators.iter().enumerate() {
            let e = &mut b[LOCATORS_AT + 24 * i..];
            BigEndian::write_u32(e, l.platform_code);
            BigEndian::write_u32(&mut e[4..], l.data_space);
            BigEndian::write_u32(&mut e[8..], l.data_length);
            BigEndian::write_u64(&mut e[16..], l.data_offset);
        }
        let sum = checksum(&b, HEADER_CHECKSUM_AT);
        BigEndian::write_u32(&mut b[HEADER_CHECKSUM_AT..], sum);
        b
    }

    pub fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.len() >= HEADER_SIZE as usize
            && checksum(&bytes[..HEADER_SIZE as usize], HEADER_CHECKSUM_AT)
                == BigEndian::read_u32(&bytes[HEADER_CHECKSUM_AT..])
    }

    /// The parent file name (UTF-16BE up to the first NUL).
    pub fn parent_name(&self) -> String {
        let units: Vec<u16> = self
            .parent_name
            .chunks_exact(2)
            .map(BigEndian::read_u16)
            .take_while(|&u| u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }

    /// Stores `name` as the parent name (UTF-16BE, truncated to fit with a NUL).
    pub fn set_parent_name(&mut self, name: &str) {
        self.parent_name = [0; PARENT_NAME_LEN];
        for (i, u) in name
            .encode_utf16()
            .take(PARENT_NAME_LEN / 2 - 1)
            .enumerate()
        {
            BigEndian::write_u16(&mut self.parent_name[2 * i..], u);
        }
    }
}

/// Size of a block's sector bitmap: one bit per sector, padded to whole sectors.
pub fn bitmap_size(block_size: u64) -> u64 {
    (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR)
}

/// Bytes of the BAT for `entries` entries, padded to whole sectors.
pub fn bat_size(entries: u64) -> u64 {
    (entries * 4).next_multiple_of(SECTOR)
}

/// Whether sector `i` of a block is marked present in its bitmap (most significant bit first).
pub fn bitmap_bit(bitmap: &[u8], i: u64) -> bool {
    bitmap
        .get((i / 8) as usize)
        .is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_follows_the_spec_and_rounds_up_like_qemu() {
        // 16 MiB: 32768 sectors -> 17 spt, 4 heads, 481 cylinders (32708 sectors).
        let g = Geometry::for_sectors(32768);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (481, 4, 17));
        let up = Geometry::covering(32768);
        assert!(up.sectors() >= 32768);
        assert!(Geometry::for_sectors(up.sectors()).sectors() == up.sectors());
        assert_eq!(Geometry::covering(MAX_CHS_SECTORS + 5), Geometry::MAX);
        assert_eq!(Geometry::covering(0).sectors(), 0);
    }

    #[test]
    fn footer_and_header_round_trip_with_checksums() {
        let f = Footer {
            features: FEATURES_RESERVED,
            version: VERSION,
            data_offset: 512,
            timestamp: 7,
            creator_app: *b"dkit",
            creator_version: 1,
            creator_os: *b"Wi2k",
            original_size: 1 << 20,
            current_size: 1 << 20,
            geometry: Geometry::for_sectors(2048),
            disk_type: DiskType::Dynamic.raw(),
            checksum: 0,
            uuid: [9; 16],
            saved_state: 0,
        };
        let b = f.to_bytes();
        assert!(Footer::has_cookie(&b) && Footer::checksum_ok(&b));
        let back = Footer::parse(&b);
        assert_eq!(back.current_size, f.current_size);
        assert_eq!(back.to_bytes(), b);
        let mut bad = b;
        bad[100] ^= 1;
        assert!(!Footer::checksum_ok(&bad));
        assert_eq!(super::super::trailing_footer_size(&b), Some(1 << 20));
        assert_eq!(super::super::trailing_footer_size(&bad), None);
        assert_eq!(super::super::trailing_footer_size(&[0; 512]), None);

        let mut h = DynamicHeader::new(1536, 8, 2 << 20);
        h.set_parent_name("parent.vhd");
        let hb = h.to_bytes();
        assert!(DynamicHeader::checksum_ok(&hb));
        let back = DynamicHeader::parse(&hb);
        assert_eq!(back.parent_name(), "parent.vhd");
        assert_eq!(back.to_bytes(), hb);
    }

    #[test]
    fn guest_size_follows_qemus_creator_rules() {
        let mut f = Footer::parse(&[]);
        f.current_size = 10 << 20;
        f.geometry = Geometry::for_sectors(f.current_size / SECTOR);
        let chs = f.geometry.sectors() * SECTOR;
        assert!(chs < f.current_size);
        for (app, size) in [
            (b"vpc ", chs),
            (b"qemu", chs),
            (b"dkit", chs),
            (b"win ", 10 << 20),
            (b"qem2", 10 << 20),
            (b"d2v ", 10 << 20),
            (b"tap\0", 10 << 20),
        ] {
            f.creator_app = *app;
            assert_eq!(f.guest_size(), size, "{}", printable(app));
        }
        f.creator_app = *b"vpc ";
        f.geometry = Geometry::MAX;
        assert_eq!(f.guest_size(), 10 << 20);
    }

    #[test]
    fn bitmap_helpers() {
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(512), 512);
        assert_eq!(bitmap_size(256 << 20), 64 << 10);
        assert!(bitmap_bit(&[0x80], 0) && !bitmap_bit(&[0x80], 1) && !bitmap_bit(&[0x80], 9));
    }
}

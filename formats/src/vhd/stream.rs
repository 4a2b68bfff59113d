//! VHDs as a stream of bytes computed on demand, so an image can be sent into object storage in
//! parts, in any order, without a file on disk.
//!
//! Fixed disks are the guest bytes followed by the footer. Dynamic disks need to know which
//! blocks hold data before the first byte is sent (the BAT precedes the blocks): the caller
//! passes the source's allocated ranges, every block they touch that holds a non-zero byte is
//! stored (in guest order, with every sector marked present) and the others stay unallocated.

use super::layout::{DiskType, DynamicHeader, FOOTER_SIZE, SECTOR, UNALLOCATED, bat_size};
use super::write::Plan;
use crate::error::{Error, Result};
use crate::image::{Format, GuestRange, Image, check_guest_range, touched_clusters};
use crate::nonzero::nonzero_granules;
use crate::stream::{ImageStream, ZeroPadded, inside_guest};
use crate::write::CreateOptions;
use byteorder::{BigEndian, ByteOrder};

/// The byte layout of a VHD made of a guest of known allocation.
pub struct VhdStream {
    /// Guest size of the VHD (rounded up from the source's as the format requires).
    guest_size: u64,
    footer: [u8; FOOTER_SIZE as usize],
    /// Dynamic disks: the layout of the blocks.
    dynamic: Option<Blocks>,
}

struct Blocks {
    /// Footer copy, dynamic header, BAT and padding: everything before the first block.
    head: Vec<u8>,
    /// Guest block numbers, in the order their blocks follow `head`.
    stored: Vec<u64>,
    block_size: u64,
    bitmap_size: u64,
}

impl VhdStream {
    /// Plans the VHD for a guest of `virtual_size` bytes with the `-o` options in `opts`
    /// (`subformat=dynamic` by default, as for files). `allocated` gives the guest ranges that
    /// hold data, ascending; it is read only for dynamic disks.
    pub fn plan(
        virtual_size: u64,
        opts: &mut CreateOptions,
        allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
    ) -> Result<VhdStream> {
        let plan = Plan::from_options(virtual_size, opts)?;
        let footer = plan.footer()?.to_bytes();
        let dynamic = match plan.disk_type {
            DiskType::Fixed => None,
            _ => Some(blocks(&plan, &footer, allocated)?),
        };
        Ok(VhdStream {
            guest_size: plan.virtual_size,
            footer,
            dynamic,
        })
    }

    pub fn guest_size(&self) -> u64 {
        self.guest_size
    }

    pub fn is_fixed(&self) -> bool {
        self.dynamic.is_none()
    }

    /// Bytes of the whole VHD.
    pub fn object_size(&self) -> u64 {
        let body = match &self.dynamic {
            None => self.guest_size,
            Some(b) => b.head.len() as u64 + b.stored.len() as u64 * (b.bitmap_size + b.block_size),
        };
        body + FOOTER_SIZE
    }

    /// Fills `buf` with the VHD's bytes at `offset`; guest data comes from `read_guest(buf,
    /// guest_offset)`, called only for ranges inside the guest size.
    pub fn fill(
        &self,
        buf: &mut [u8],
        offset: u64,
        read_guest: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let size = self.object_size();
        // The stream's bytes play the guest's part here: same bounds rule.
        check_guest_range(size, offset, buf.len() as u64)?;
        let footer_at = size - FOOTER_SIZE;
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let rest = &mut buf[done..];
            let n = if pos >= footer_at {
                copy_from(rest, &self.footer, pos - footer_at)
            } else {
                match &self.dynamic {
                    None => {
                        let n = rest.len().min((footer_at - pos) as usize);
                        read_guest(&mut rest[..n], pos)?;
                        n
                    }
                    Some(b) => b.fill(rest, pos, self.guest_size, read_guest)?,
                }
            };
            done += n;
        }
        Ok(())
    }
}

impl Blocks {
    /// Fills the start of `buf` from object offset `pos` (before the final footer); returns the
    /// number of bytes filled.
    fn fill(
        &self,
        buf: &mut [u8],
        pos: u64,
        guest_size: u64,
        read_guest: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<usize> {
        let head = self.head.len() as u64;
        if pos < head {
            return Ok(copy_from(buf, &self.head, pos));
        }
        let footprint = self.bitmap_size + self.block_size;
        let rel = pos - head;
        let Some(&block) = self.stored.get((rel / footprint) as usize) else {
            return Err(Error::invalid(format!(
                "VHD stream offset {pos} is past its blocks"
            )));
        };
        let within = rel % footprint;
        if within < self.bitmap_size {
            let n = buf.len().min((self.bitmap_size - within) as usize);
            buf[..n].fill(0xff);
            return Ok(n);
        }
        let in_block = within - self.bitmap_size;
        let n = buf.len().min((self.block_size - in_block) as usize);
        let guest = block * self.block_size + in_block;
        // The last block may reach past the guest size: those bytes are zeros.
        let from_guest = guest_size.saturating_sub(guest).min(n as u64) as usize;
        if from_guest > 0 {
            read_guest(&mut buf[..from_guest], guest)?;
        }
        buf[from_guest..n].fill(0);
        Ok(n)
    }
}

/// Copies `src[from..]` into the start of `dst`; returns the number of bytes copied.
fn copy_from(dst: &mut [u8], src: &[u8], from: u64) -> usize {
    let src = src.get(from as usize..).unwrap_or_default();
    let n = dst.len().min(src.len());
    dst[..n].copy_from_slice(&src[..n]);
    n
}

/// The blocks of a dynamic disk: every block an allocated range touches, in guest order.
fn blocks(
    plan: &Plan,
    footer: &[u8; FOOTER_SIZE as usize],
    allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
) -> Result<Blocks> {
    let block_size = plan.block_size;
    let entries = plan.entries();
    let mut stored: Vec<u64> = Vec::new();
    for run in touched_clusters(inside_guest(plan.virtual_size, allocated), block_size) {
        stored.extend(run?);
    }
    let head_len = plan.first_block();
    let mut bat = vec![UNALLOCATED; entries as usize];
    for (k, &block) in stored.iter().enumerate() {
        let at = head_len + k as u64 * plan.footprint();
        let entry = u32::try_from(at / SECTOR)
            .ok()
            .filter(|&e| e != UNALLOCATED)
            .ok_or_else(|| Error::invalid("VHD file would exceed 2 TiB"))?;
        if let Some(slot) = bat.get_mut(block as usize) {
            *slot = entry;
        }
    }
    let mut head = vec![0u8; head_len as usize];
    head[..FOOTER_SIZE as usize].copy_from_slice(footer);
    let header = DynamicHeader::new(plan.table_offset(), entries as u32, block_size as u32);
    let header_at = FOOTER_SIZE as usize;
    let header = header.to_bytes();
    head[header_at..header_at + header.len()].copy_from_slice(&header);
    let table = plan.table_offset() as usize;
    let table_len = bat_size(entries) as usize;
    let table = &mut head[table..table + table_len];
    table.fill(0xff);
    for (slot, entry) in table.chunks_exact_mut(4).zip(&bat) {
        BigEndian::write_u32(slot, *entry);
    }
    Ok(Blocks {
        head,
        stored,
        block_size,
        bitmap_size: plan.bitmap_size(),
    })
}

/// `src` laid out as a fixed or dynamic VHD (see [`crate::stream`]).
pub(crate) fn stream<'a>(
    src: &'a dyn Image,
    opts: &mut CreateOptions,
    allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
    _compressing: &(dyn Fn(u64) + Sync),
) -> Result<Box<dyn ImageStream + 'a>> {
    // Blocks that hold only zeros stay unallocated (read only for dynamic disks, lazily).
    let block_size = Plan::from_options(src.virtual_size(), &mut opts.clone())?.block_size;
    let mut allocated = nonzero_granules(src, allocated, block_size);
    let layout = VhdStream::plan(src.virtual_size(), opts, &mut allocated)?;
    // The geometry may round the guest up: zeros past the source's end.
    let guest = ZeroPadded::new(src, layout.guest_size());
    Ok(Box::new(VhdImageStream { layout, guest }))
}

struct VhdImageStream<'a> {
    layout: VhdStream,
    guest: ZeroPadded<'a>,
}

impl ImageStream for VhdImageStream<'_> {
    fn format(&self) -> Format {
        Format::Vhd
    }

    fn size(&self) -> u64 {
        self.layout.object_size()
    }

    fn guest(&self) -> &dyn Image {
        &self.guest
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.layout
            .fill(buf, offset, &mut |b, at| self.guest.read_at(b, at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhd::layout::Footer;

    fn opts(spec: &str) -> CreateOptions {
        let mut o = CreateOptions::default();
        o.parse_options(spec).unwrap();
        o
    }

    fn whole(s: &VhdStream, guest: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; s.object_size() as usize];
        s.fill(&mut out, 0, &mut |buf, at| {
            buf.copy_from_slice(&guest[at as usize..at as usize + buf.len()]);
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn fixed_is_guest_then_footer() {
        let mut none = std::iter::empty();
        let s = VhdStream::plan(10 << 20, &mut opts("subformat=fixed"), &mut none).unwrap();
        assert!(s.is_fixed());
        let guest = vec![7u8; s.guest_size() as usize];
        let bytes = whole(&s, &guest);
        let footer = &bytes[bytes.len() - 512..];
        assert!(Footer::checksum_ok(footer));
        assert_eq!(Footer::parse(footer).current_size, s.guest_size());
        assert!(bytes[..guest.len()].iter().all(|&b| b == 7));
    }

    #[test]
    fn dynamic_stores_touched_blocks_only() {
        let size = 8 << 20;
        let mut ranges = [(4096, 100), (5 << 20, 2 << 20)]
            .into_iter()
            .map(|(start, len)| Ok(GuestRange::new(start, start + len)));
        let s = VhdStream::plan(size, &mut opts("force_size=on"), &mut ranges).unwrap();
        assert!(!s.is_fixed());
        let b = s.dynamic.as_ref().unwrap();
        assert_eq!(b.stored, vec![0, 2, 3]);
        let guest: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let bytes = whole(&s, &guest);
        // Parts filled piecewise at odd boundaries give the same bytes.
        let mut pieces = vec![0u8; bytes.len()];
        for (i, chunk) in pieces.chunks_mut(777_777).enumerate() {
            s.fill(chunk, i as u64 * 777_777, &mut |buf, at| {
                buf.copy_from_slice(&guest[at as usize..at as usize + buf.len()]);
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(pieces, bytes);
        let block_data = |k: usize| {
            let at = b.head.len() + k * (b.bitmap_size + b.block_size) as usize;
            &bytes[at + b.bitmap_size as usize..at + (b.bitmap_size + b.block_size) as usize]
        };
        assert_eq!(block_data(1), &guest[4 << 20..6 << 20]);
        assert!(Footer::checksum_ok(&bytes[..512]));
        assert_eq!(&bytes[..512], &bytes[bytes.len() - 512..]);
    }
}

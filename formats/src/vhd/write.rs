//! Creating VHD images: fixed and dynamic disks, and the Azure profile.

use super::layout::*;
use super::locate::{checked_guest_size, locate_footer};
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::{Format, GuestRange, check_guest_range, touched_clusters};
use crate::write::{CreateOptions, ImageWriter, Measure};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Creator application written in the footer. qemu sizes images of creators it does not know
/// by their CHS geometry, so diskkit's footers always agree with it: either the geometry covers
/// exactly `current_size` (CHS-rounded sizes), or it is the largest geometry, which qemu and
/// Hyper-V read as "use current_size" (force_size and the Azure profile, as qemu does).
const CREATOR_APP: &[u8; 4] = b"dkit";
/// diskkit 0.1 (major in the high 16 bits).
const CREATOR_VERSION: u32 = 0x0000_0001;
/// Host OS code: "Wi2k" is what Windows tools and qemu write, and what Azure's tooling expects.
const CREATOR_OS: &[u8; 4] = b"Wi2k";
/// Azure accepts only fixed VHDs whose virtual size is a whole number of MiB.
const AZURE_ALIGNMENT: u64 = 1 << 20;
/// Block data of dynamic disks starts 4 KiB-aligned in the file (for blocks of 4 KiB or more).
const DATA_ALIGNMENT: u64 = 4096;

/// What a set of create options asks for, with the size rounded as the format requires.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) disk_type: DiskType,
    pub(super) virtual_size: u64,
    geometry: Geometry,
    pub(super) block_size: u64,
}

impl Plan {
    pub(super) fn from_options(requested: u64, opts: &mut CreateOptions) -> Result<Plan> {
        let subformat = opts.take("subformat");
        let force_size = opts.take_bool("force_size")?;
        let block_size = opts.take_size("block_size")?;
        let target = opts.take("target");
        opts.reject_unknown(Format::Vhd)?;
        if opts.compress {
            return Err(Error::invalid("vpc (VHD) images cannot be compressed (-c)"));
        }
        if opts.backing_file.is_some() {
            return Err(Error::invalid(
                "creating differencing VHDs (-B) is not supported; diskkit reads them",
            ));
        }
        let mut disk_type = match subformat.as_deref() {
            None | Some("dynamic") => DiskType::Dynamic,
            Some("fixed") => DiskType::Fixed,
            Some(o) => {
                return Err(Error::invalid(format!(
                    "option subformat: '{o}' is not fixed or dynamic"
                )));
            }
        };
        let mut force_size = force_size.unwrap_or(false);
        let mut size = requested.next_multiple_of(SECTOR);
        match target.as_deref() {
            None => {}
            Some("azure") => {
                if subformat.as_deref() == Some("dynamic") {
                    return Err(Error::invalid(
                        "target=azure needs a fixed VHD; drop subformat=dynamic",
                    ));
                }
                disk_type = DiskType::Fixed;
                force_size = true;
                size = size.next_multiple_of(AZURE_ALIGNMENT);
            }
            Some(o) => {
                return Err(Error::invalid(format!(
                    "option target: unknown '{o}' (azure)"
                )));
            }
        }
        let geometry = if force_size {
            Geometry::MAX
        } else {
            Geometry::covering(size / SECTOR)
        };
        if geometry != Geometry::MAX {
            size = geometry.sectors() * SECTOR;
        }
        if size > MAX_VIRTUAL_SIZE {
            return Err(Error::invalid(format!(
                "VHD images hold at most 2040 GiB ({MAX_VIRTUAL_SIZE} bytes); {size} requested"
            )));
        }
        let block_size = match (disk_type, block_size) {
            (DiskType::Fixed, Some(_)) => {
                return Err(Error::invalid("option block_size needs subformat=dynamic"));
            }
            (_, b) => b.unwrap_or(DEFAULT_BLOCK_SIZE),
        };
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::invalid(format!(
                "option block_size: {block_size} is not a power of two between {MIN_BLOCK_SIZE} \
                 and {MAX_BLOCK_SIZE}"
            )));
        }
        if disk_type == DiskType::Dynamic && size.div_ceil(block_size) > MAX_BAT_ENTRIES {
            return Err(Error::invalid(format!(
                "block_size {block_size} is too small for {size} bytes (more than \
                 {MAX_BAT_ENTRIES} blocks)"
            )));
        }
        Ok(Plan {
            disk_type,
            virtual_size: size,
            geometry,
            block_size,
        })
    }

    pub(super) fn entries(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size)
    }

    pub(super) fn table_offset(&self) -> u64 {
        FOOTER_SIZE + HEADER_SIZE
    }

    pub(super) fn bitmap_size(&self) -> u64 {
        bitmap_size(self.block_size)
    }

    /// File offset of the first block: after the BAT, placed so block data is 4 KiB-aligned.
    pub(super) fn first_block(&self) -> u64 {
        let bat_end = self.table_offset() + bat_size(self.entries());
        (bat_end + self.bitmap_size()).next_multiple_of(DATA_ALIGNMENT) - self.bitmap_size()
    }

    pub(super) fn footprint(&self) -> u64 {
        self.bitmap_size() + self.block_size
    }

    /// Where the footer of a dynamic disk with `blocks` blocks goes: after the last block, or
    /// right after the BAT when there is none (where qemu, which appends blocks at the footer,
    /// allocates the first block; a footer further on would end up inside that block's data).
    fn footer_offset(&self, blocks: u64) -> u64 {
        if blocks == 0 {
            self.table_offset() + bat_size(self.entries())
        } else {
            self.first_block() + blocks * self.footprint()
        }
    }

    fn file_size(&self, blocks: u64) -> u64 {
        match self.disk_type {
            DiskType::Fixed => self.virtual_size + FOOTER_SIZE,
            _ => self.footer_offset(blocks) + FOOTER_SIZE,
        }
    }

    pub(super) fn footer(&self) -> Result<Footer> {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(EPOCH_2000))
            .unwrap_or(0);
        Ok(Footer {
            features: FEATURES_RESERVED,
            version: VERSION,
            data_offset: match self.disk_type {
                DiskType::Fixed => NO_DATA_OFFSET,
                _ => FOOTER_SIZE,
            },
            timestamp: u32::try_from(timestamp).unwrap_or(u32::MAX),
            creator_app: *CREATOR_APP,
            creator_version: CREATOR_VERSION,
            creator_os: *CREATOR_OS,
            original_size: self.virtual_size,
            current_size: self.virtual_size,
            geometry: self.geometry,
            disk_type: self.disk_type.raw(),
            checksum: 0,
            uuid: random_uuid()?,
            saved_state: 0,
        })
    }
}

/// A random (version 4) UUID from the kernel's generator.
fn random_uuid() -> Result<[u8; 16]> {
    let path = Path::new("/dev/urandom");
    let mut u = [0u8; 16];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut u))
        .map_err(|e| Error::io(path, "read random bytes for the disk UUID", e))?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

/// Block allocation state of a dynamic disk being written.
struct Allocation {
    bat: Vec<u32>,
    next_free: u64,
}

struct Dynamic {
    alloc: Mutex<Allocation>,
    /// Sector bitmap of a written block: every sector present (the unwritten parts of a fresh
    /// block are holes of the new file and read as zeros).
    full_bitmap: Vec<u8>,
}

/// Writes a new VHD image, or into an existing fixed one (`convert -n`). Dynamic disks allocate
/// blocks on first write; `finish` writes the BAT and the footers.
pub struct VhdWriter {
    file: File,
    path: PathBuf,
    plan: Plan,
    /// The footer `finish` writes after the data of a new image. `None` for an existing fixed
    /// disk: its footer stays as it is, and its old content does not read as zeros.
    footer: Option<[u8; FOOTER_SIZE as usize]>,
    dynamic: Option<Dynamic>,
    writeback: crate::write::Writeback,
}

impl VhdWriter {
    /// Creates `path` for a guest of `virtual_size` bytes. The image may be larger: sizes are
    /// rounded up to whole sectors and, without `force_size=on`, to a CHS geometry (as qemu
    /// does), and to whole MiB with `target=azure`.
    ///
    /// Options: `subformat=dynamic|fixed` (default dynamic), `force_size=on|off`,
    /// `block_size=SIZE` (dynamic; default 2 MiB), `target=azure` (fixed, MiB-aligned size,
    /// force_size).
    pub fn create(path: &Path, virtual_size: u64, opts: &mut CreateOptions) -> Result<VhdWriter> {
        let plan = Plan::from_options(virtual_size, opts)?;
        let footer = plan.footer()?.to_bytes();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(path, "create", e))?;
        let w = |buf: &[u8], at: u64, what: &str| {
            file.write_all_at(buf, at)
                .map_err(|e| Error::io(path, format!("write {what} at {at:#x}"), e))
        };
        let dynamic = match plan.disk_type {
            DiskType::Fixed => {
                file.set_len(plan.file_size(0))
                    .map_err(|e| Error::io(path, "set length", e))?;
                None
            }
            _ => {
                let header = DynamicHeader::new(
                    plan.table_offset(),
                    plan.entries() as u32,
                    plan.block_size as u32,
                );
                w(&footer, 0, "VHD footer copy")?;
                w(&header.to_bytes(), FOOTER_SIZE, "VHD dynamic disk header")?;
                Some(Dynamic {
                    alloc: Mutex::new(Allocation {
                        bat: vec![UNALLOCATED; plan.entries() as usize],
                        next_free: plan.first_block(),
                    }),
                    full_bitmap: vec![0xff; plan.bitmap_size() as usize],
                })
            }
        };
        Ok(VhdWriter {
            writeback: crate::write::Writeback::for_file(opts.cache, path),
            file,
            path: path.to_path_buf(),
            plan,
            footer: Some(footer),
            dynamic,
        })
    }

    /// Opens the existing fixed VHD at `path` to overwrite its guest content in place
    /// (`convert -n`), keeping its size, footer and any bytes between the guest's end and the
    /// footer. Dynamic and differencing disks are refused.
    pub fn open_existing(path: &Path) -> Result<VhdWriter> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, "open for writing", e))?;
        let host = HostFile::from_file(path, file)?;
        let located = locate_footer(&host)?;
        let virtual_size = checked_guest_size(&host, &located)?;
        if located.disk_type != DiskType::Fixed {
            return Err(Error::unsupported(
                path,
                format!(
                    "writing into a {} VHD (its blocks and allocation table would have to be \
                     rewritten in place; -n takes fixed VHDs, or convert without -n)",
                    located.disk_type.name()
                ),
            ));
        }
        Ok(VhdWriter {
            writeback: crate::write::Writeback::default(),
            file: host.into_file()?,
            path: path.to_path_buf(),
            plan: Plan {
                disk_type: DiskType::Fixed,
                virtual_size,
                geometry: located.footer.geometry,
                block_size: DEFAULT_BLOCK_SIZE,
            },
            footer: None,
            dynamic: None,
        })
    }

    fn write_file(&self, buf: &[u8], at: u64, what: &str) -> Result<()> {
        self.writeback
            .write_at(&self.file, &self.path, buf, at, what)
    }

    /// File offset of block `index`'s data, allocating the block on first use.
    fn block_data(&self, d: &Dynamic, index: u64) -> Result<u64> {
        let (bitmap_at, fresh) = {
            let mut a = d
                .alloc
                .lock()
                .map_err(|_| Error::invalid("VHD writer allocation lock poisoned"))?;
            let Allocation { bat, next_free } = &mut *a;
            let entry = bat
                .get_mut(index as usize)
                .ok_or_else(|| Error::invalid(format!("VHD block {index} out of range")))?;
            if *entry == UNALLOCATED {
                let at = *next_free;
                *entry = u32::try_from(at / SECTOR)
                    .ok()
                    .filter(|&e| e != UNALLOCATED)
                    .ok_or_else(|| Error::invalid("VHD file would exceed 2 TiB"))?;
                *next_free += self.plan.footprint();
                (at, true)
            } else {
                (u64::from(*entry) * SECTOR, false)
            }
        };
        if fresh {
            self.write_file(&d.full_bitmap, bitmap_at, "VHD block bitmap")?;
        }
        Ok(bitmap_at + self.plan.bitmap_size())
    }
}

impl ImageWriter for VhdWriter {
    fn virtual_size(&self) -> u64 {
        self.plan.virtual_size
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_guest_range(self.plan.virtual_size, offset, buf.len() as u64)?;
        let Some(d) = &self.dynamic else {
            return self.write_file(buf, offset, "VHD data");
        };
        let bs = self.plan.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = pos % bs;
            let n = ((bs - within) as usize).min(buf.len() - done);
            let data = self.block_data(d, pos / bs)?;
            self.write_file(&buf[done..done + n], data + within, "VHD data")?;
            done += n;
        }
        Ok(())
    }

    /// A new image reads as zeros everywhere and each range is written once: nothing to do. In
    /// an existing fixed disk, guest offsets are file offsets: the range is punched or zeroed.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_guest_range(self.plan.virtual_size, offset, len)?;
        if self.footer.is_some() {
            return Ok(());
        }
        crate::raw::zero_range(&self.file, &self.path, offset, len)
    }

    fn zero_initialized(&self) -> bool {
        self.footer.is_some()
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let Some(footer) = &self.footer else {
            return self.writeback.sync_all(&self.file, &self.path);
        };
        let end = match &self.dynamic {
            None => self.plan.virtual_size,
            Some(d) => {
                let a = d
                    .alloc
                    .lock()
                    .map_err(|_| Error::invalid("VHD writer allocation lock poisoned"))?;
                let mut table = vec![0xffu8; bat_size(self.plan.entries()) as usize];
                for (chunk, e) in table.chunks_exact_mut(4).zip(&a.bat) {
                    chunk.copy_from_slice(&e.to_be_bytes());
                }
                self.write_file(
                    &table,
                    self.plan.table_offset(),
                    "VHD block allocation table",
                )?;
                let blocks = a.bat.iter().filter(|&&e| e != UNALLOCATED).count();
                self.plan.footer_offset(blocks as u64)
            }
        };
        self.write_file(footer, end, "VHD footer")?;
        self.file
            .set_len(end + FOOTER_SIZE)
            .map_err(|e| Error::io(&self.path, "set length", e))?;
        self.writeback.sync_all(&self.file, &self.path)
    }
}

/// Bytes a new VHD needs: `required` for the allocated guest ranges (ascending; a dynamic disk
/// stores every block they touch), `fully_allocated` for every block.
pub fn measure(
    virtual_size: u64,
    opts: &mut CreateOptions,
    allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
) -> Result<Measure> {
    let plan = Plan::from_options(virtual_size, opts)?;
    let entries = plan.entries();
    let fully_allocated = plan.file_size(entries);
    if plan.disk_type == DiskType::Fixed {
        return Ok(Measure {
            required: fully_allocated,
            fully_allocated,
        });
    }
    let inside =
        allocated.map(|r| r.map(|r| GuestRange::new(r.start, r.end.min(plan.virtual_size))));
    let mut blocks = 0u64;
    for run in touched_clusters(inside, plan.block_size) {
        let run = run?;
        blocks += run.end.min(entries).saturating_sub(run.start);
    }
    Ok(Measure {
        required: plan.file_size(blocks),
        fully_allocated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(spec: &str) -> CreateOptions {
        let mut o = CreateOptions::default();
        o.parse_options(spec).unwrap();
        o
    }

    #[test]
    fn sizes_round_as_qemu_and_azure() {
        // 16 MiB is not a CHS size: qemu rounds it up to 16 MiB + some sectors.
        let p = Plan::from_options(16 << 20, &mut opts("")).unwrap();
        assert!(p.virtual_size >= 16 << 20 && p.geometry != Geometry::MAX);
        assert_eq!(p.virtual_size, p.geometry.sectors() * SECTOR);
        let p = Plan::from_options(16 << 20, &mut opts("force_size=on")).unwrap();
        assert_eq!(p.virtual_size, 16 << 20);
        let p = Plan::from_options((5 << 20) + 1, &mut opts("target=azure")).unwrap();
        assert_eq!((p.virtual_size, p.disk_type), (6 << 20, DiskType::Fixed));
        assert!(Plan::from_options(1 << 20, &mut opts("target=azure,subformat=dynamic")).is_err());
        assert!(Plan::from_options(1 << 20, &mut opts("block_size=3000")).is_err());
        assert!(Plan::from_options(1 << 20, &mut opts("cluster_size=4096")).is_err());
        assert!(Plan::from_options(3 << 40, &mut opts("force_size=on")).is_err());
    }

    #[test]
    fn measure_counts_touched_blocks() {
        let ranges = [(0, 1), ((2 << 20) - 1, (2 << 20) + 1), (0, 512)];
        let m = measure(
            64 << 20,
            &mut opts("force_size=on"),
            &mut ranges
                .into_iter()
                .map(|(start, end)| Ok(GuestRange::new(start, end))),
        )
        .unwrap();
        let one = bitmap_size(2 << 20) + (2 << 20);
        assert_eq!(m.fully_allocated - m.required, 30 * one);
        let f = measure(
            64 << 20,
            &mut opts("subformat=fixed,force_size=on"),
            &mut std::iter::empty(),
        )
        .unwrap();
        assert_eq!(f.required, (64 << 20) + 512);
    }
}

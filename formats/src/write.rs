//! The writing side of the image model: a destination image that receives guest content.
//!
//! The engine (convert) drives writers from several threads at once over disjoint guest ranges;
//! each format's writer keeps its own metadata consistent under concurrent calls and completes it
//! in `finish`. Writers never rename files: the engine writes to a temporary name and renames
//! into place only after `finish` has returned (outputs are synced by then).

use crate::error::{Error, Result};
use crate::image::{Format, GuestRange};
use crate::registry::driver;
use std::collections::BTreeMap;
use std::path::Path;

/// A destination image being written.
pub trait ImageWriter: Send + Sync {
    /// Guest size of the image being written.
    fn virtual_size(&self) -> u64;

    /// Writes guest data at `offset`. Called concurrently from several threads for disjoint
    /// ranges; a range is written at most once per conversion.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes `[offset, offset + len)` read as zeros. A fresh image already reads as zeros, so
    /// writers of new images may ignore this; writers into existing images (`convert -n`) and
    /// overlays (where the backing image has data) must record it.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// True when the fresh image reads as zeros everywhere, so zero ranges can be skipped.
    fn zero_initialized(&self) -> bool;

    /// Told once, before any write, which guest ranges may receive data (the source's
    /// allocated ranges, ascending): a writer that gains from allocating them ahead does so.
    /// A hint: the others leave the iterator alone, so the source's map is not even walked,
    /// and an error in it only stops the reserving (the copy meets it again).
    fn reserve(&self, _allocated: &mut dyn Iterator<Item = Result<GuestRange>>) {}

    /// Writes must start and end on multiples of this many bytes (a power of two), except a
    /// write that ends at the virtual size. Formats that allocate whole clusters or blocks say
    /// their cluster size, so that each cluster is written once, whole.
    fn write_alignment(&self) -> u64 {
        1
    }

    /// Completes metadata and syncs everything to stable storage.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Creates a new image of `format` at `path` (replacing any file there). The format takes the
/// options it knows out of `opts` and refuses the others.
pub fn create(
    format: Format,
    path: &Path,
    virtual_size: u64,
    opts: &mut CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    let create = driver(format).create.ok_or_else(|| cannot_write(format))?;
    create(path, virtual_size, opts)
}

/// Opens an existing image to overwrite its guest content in place (`convert -n`).
pub fn open_existing(format: Format, path: &Path) -> Result<Box<dyn ImageWriter>> {
    let open_existing = driver(format).open_existing.ok_or_else(|| {
        Error::invalid(format!(
            "cannot write into existing {format} images (-n needs a raw, qcow2 or fixed vpc \
             target)"
        ))
    })?;
    open_existing(path)
}

/// Host bytes a new image of `format` needs for a guest of `virtual_size` bytes whose data lies
/// in `allocated` (ascending, as [`allocated_ranges`](crate::image::allocated_ranges) yields
/// them).
pub fn measure(
    format: Format,
    virtual_size: u64,
    opts: &mut CreateOptions,
    allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
) -> Result<Measure> {
    let measure = driver(format).measure.ok_or_else(|| cannot_write(format))?;
    measure(virtual_size, opts, allocated)
}

/// Changes the virtual size of an image in place. Shrinking drops guest data past the new end;
/// callers confirm that with the user first.
pub fn resize(format: Format, path: &Path, new_size: u64) -> Result<()> {
    let resize = driver(format)
        .resize
        .ok_or_else(|| Error::invalid(format!("cannot resize {format} images")))?;
    resize(path, new_size)
}

/// The virtual size [`resize`] gives an image of `format` asked for `new_size` bytes (qcow2 keeps
/// whole 512-byte sectors, as qemu does).
pub fn resized_size(format: Format, new_size: u64) -> Result<u64> {
    (driver(format).resized_size)(new_size)
}

fn cannot_write(format: Format) -> Error {
    Error::invalid(format!("cannot write {format} images"))
}

/// Output of `measure`, as `qemu-img measure` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Measure {
    /// Bytes the new image needs for the given source's data (zeros and holes excluded).
    pub required: u64,
    /// Bytes the new image needs if every guest byte were allocated.
    #[serde(rename = "fully-allocated")]
    pub fully_allocated: u64,
}

/// Options for creating an image: qemu-img's `-o key=value,...` list plus the flags that have
/// their own switches (`-c`, `-B`/`-F`).
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// `-o` options by name; each format takes the ones it knows and refuses the others.
    pub options: BTreeMap<String, String>,
    /// `-c`: compress data (formats that support it).
    pub compress: bool,
    /// `-B`/`-b`: backing file name as it is to be recorded in the image.
    pub backing_file: Option<String>,
    /// `-F`: format of the backing file.
    pub backing_format: Option<Format>,
    /// `-t`: how the new image's writes reach stable storage.
    pub cache: CacheMode,
}

impl CreateOptions {
    /// Parses `key=value,key2=value2` (qemu's `-o` syntax; `,,` is a literal comma).
    pub fn parse_options(&mut self, spec: &str) -> Result<()> {
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = spec.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    items.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        for item in items.into_iter().filter(|i| !i.is_empty()) {
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
                // A bare flag means "on", as in qemu (`-o lazy_refcounts`).
                None => (item.trim().to_string(), "on".to_string()),
            };
            self.options.insert(k, v);
        }
        Ok(())
    }

    /// Takes out option `key`; formats call this for each option they know and then
    /// [`CreateOptions::reject_unknown`].
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.options.remove(key)
    }

    /// Takes out a boolean option (`on/off`, `true/false`, `yes/no`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        self.take(key)
            .map(|v| match v.as_str() {
                "on" | "true" | "yes" | "1" => Ok(true),
                "off" | "false" | "no" | "0" => Ok(false),
                _ => Err(Error::invalid(format!("option {key}: '{v}' is not on/off"))),
            })
            .transpose()
    }

    /// Takes out a size option (`2M`, `65536`; suffixes as [`parse_size`]).
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>> {
        self.take(key)
            .map(|v| parse_size(&v).map_err(|e| Error::invalid(format!("option {key}: {e}"))))
            .transpose()
    }

    /// Fails when options remain that the format did not take.
    pub fn reject_unknown(&self, format: Format) -> Result<()> {
        if self.options.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = self.options.keys().map(String::as_str).collect();
        Err(Error::invalid(format!(
            "format {format} does not support option(s): {}",
            names.join(", ")
        )))
    }
}

/// Parses `10G`, `512M`, `4k`, `1.5T` or a plain byte count.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let unit = s[i..].to_ascii_lowercase();
            let unit = unit.trim_end_matches("ib").trim_end_matches('b');
            let shift = match unit {
                "" => 0,
                "k" => 10,
                "m" => 20,
                "g" => 30,
                "t" => 40,
                "p" => 50,
                "e" => 60,
                _ => return Err(format!("unknown size suffix in '{s}'")),
            };
            (&s[..i], 1u64 << shift)
        }
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 10G, 512M, 4096)"))?;
    let bytes = value * mult as f64;
    if !(0.0..=u64::MAX as f64).contains(&bytes) || bytes.fract() != 0.0 {
        return Err(format!("'{s}' is not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

/// How a new image's writes reach stable storage: qemu's cache modes (`-t`). Every mode but
/// `Unsafe` ends with the image synced, so an output renamed into place is complete on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Through the page cache, synced once at the end (diskkit's default).
    #[default]
    Writeback,
    /// Data written with `O_DIRECT` (as qemu's `cache=none`): a large conversion neither evicts
    /// the machine's page cache nor pays for filling it. Writes that direct I/O cannot take
    /// (metadata, pieces not aligned to 4 KiB, filesystems such as tmpfs that refuse it) go
    /// through the page cache, flushed and dropped from it batch by batch.
    None,
    /// Each data write is on stable storage before the next (`O_DSYNC` semantics).
    WriteThrough,
    /// `None` and `WriteThrough` together.
    DirectSync,
    /// Never synced: the image may still be in the page cache when diskkit exits (qemu-img
    /// convert's default). A crash can leave a truncated image under the final name.
    Unsafe,
}

impl CacheMode {
    /// Parses qemu's cache mode names.
    pub fn parse(s: &str) -> Result<CacheMode> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "none" => Ok(CacheMode::None),
            "writethrough" => Ok(CacheMode::WriteThrough),
            "directsync" => Ok(CacheMode::DirectSync),
            "unsafe" => Ok(CacheMode::Unsafe),
            other => Err(Error::invalid(format!(
                "cache mode '{other}' is not one of writeback, none, writethrough, directsync, \
                 unsafe"
            ))),
        }
    }

    /// Whether the image is synced before it is renamed into place.
    pub fn syncs(self) -> bool {
        self != CacheMode::Unsafe
    }
}

/// Starts writing a new image's data to disk while the conversion goes on, so that the fsync at
/// the end has little left to do: each time another `BATCH` bytes have been written to the file,
/// the kernel is asked to start writeback of all its dirty pages, without waiting for it. Large
/// batches keep disk requests large. A hint only: a write error is reported by the final sync.
/// It also carries the output's [`CacheMode`], which decides what happens per write and at the
/// end, and in the direct modes the output opened a second time with `O_DIRECT`.
#[derive(Default)]
pub struct Writeback {
    written: std::sync::atomic::AtomicU64,
    mode: CacheMode,
    /// The output opened with `O_DIRECT` (modes `None` and `DirectSync`), while the filesystem
    /// takes direct writes.
    direct: Option<std::fs::File>,
    direct_works: std::sync::atomic::AtomicBool,
}

/// Alignment of the offsets, lengths and buffers of direct writes: the largest logical block
/// size disks ask for.
pub const DIRECT_ALIGN: usize = 4096;

/// A buffer aligned for direct I/O, which unaligned data is copied through.
struct AlignedBuffer {
    bytes: Vec<u8>,
    start: usize,
}

impl AlignedBuffer {
    const LEN: usize = 1 << 20;

    fn new() -> Self {
        let bytes = vec![0u8; Self::LEN + DIRECT_ALIGN];
        let start = bytes.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuffer { bytes, start }
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + len]
    }
}

thread_local! {
    static BOUNCE: std::cell::RefCell<Option<AlignedBuffer>> = const { std::cell::RefCell::new(None) };
}

impl Writeback {
    const BATCH: u64 = 16 << 20;

    /// For the output file at `path`: in the direct modes its data writes go through a second
    /// descriptor opened with `O_DIRECT` (when the filesystem refuses it, through the cache).
    pub fn for_file(mode: CacheMode, path: &Path) -> Self {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = matches!(mode, CacheMode::None | CacheMode::DirectSync)
            .then(|| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .ok()
            })
            .flatten();
        Writeback {
            mode,
            direct_works: std::sync::atomic::AtomicBool::new(direct.is_some()),
            direct,
            ..Default::default()
        }
    }

    /// Whether data writes go to disk directly (`O_DIRECT`), bypassing the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some() && self.direct_works.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes `data` at `offset` of `file` (at `path`; `what` names it in errors): with direct
    /// I/O when this output has it and `offset` and the length are aligned (data in a buffer
    /// that is not is copied through an aligned one), through the page cache otherwise.
    pub fn write_at(
        &self,
        file: &std::fs::File,
        path: &Path,
        data: &[u8],
        offset: u64,
        what: &str,
    ) -> Result<()> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering;
        let failed = |e| Error::io(path, format!("write {what} at {offset:#x}"), e);
        if let Some(direct) = &self.direct
            && self.direct_works.load(Ordering::Relaxed)
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
            && data.len().is_multiple_of(DIRECT_ALIGN)
        {
            match write_direct(direct, data, offset) {
                Ok(()) => {
                    if self.mode == CacheMode::DirectSync {
                        direct.sync_data().map_err(failed)?;
                    }
                    return Ok(());
                }
                // The filesystem wants another alignment, or none: the cache from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_works.store(false, Ordering::Relaxed)
                }
                Err(e) => return Err(failed(e)),
            }
        }
        file.write_all_at(data, offset).map_err(failed)?;
        self.wrote(file, path, data.len() as u64)
    }

    /// Records `len` bytes just written to `file` (at `path`, for errors).
    pub fn wrote(&self, file: &std::fs::File, path: &Path, len: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        if matches!(self.mode, CacheMode::WriteThrough | CacheMode::DirectSync) {
            file.sync_data()
                .map_err(|e| Error::io(path, "sync (writethrough)", e))?;
        }
        let before = self
            .written
            .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        if before / Self::BATCH == before.wrapping_add(len) / Self::BATCH {
            return Ok(());
        }
        let fd = file.as_raw_fd();
        match self.mode {
            CacheMode::Unsafe => {}
            CacheMode::Writeback | CacheMode::WriteThrough => {
                // SAFETY: sync_file_range on a descriptor we own (offset 0, length 0: the whole
                // file); it touches no memory of ours.
                unsafe {
                    libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE);
                }
            }
            CacheMode::None | CacheMode::DirectSync => {
                // Wait for the batch to be written, then drop the now clean pages. Pages still
                // being written by other threads are kept by the kernel and dropped next time.
                // SAFETY: as above; posix_fadvise only advises on the descriptor's pages.
                unsafe {
                    libc::sync_file_range(
                        fd,
                        0,
                        0,
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    );
                    libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED);
                }
            }
        }
        Ok(())
    }

    /// Makes the data written so far durable (`fdatasync`), unless the mode is `Unsafe`: the
    /// ordering barrier formats use before writing a header that points to the data.
    pub fn sync_data(&self, file: &std::fs::File, path: &Path) -> Result<()> {
        if self.mode.syncs() {
            file.sync_data().map_err(|e| Error::io(path, "sync", e))?;
        }
        Ok(())
    }

    /// Makes the whole file durable (`fsync`) at the end of writing, unless the mode is
    /// `Unsafe`; in the modes that keep the page cache clean, its pages are dropped too.
    pub fn sync_all(&self, file: &std::fs::File, path: &Path) -> Result<()> {
        use std::os::fd::AsRawFd;
        if self.mode.syncs() {
            file.sync_all().map_err(|e| Error::io(path, "sync", e))?;
        }
        if matches!(self.mode, CacheMode::None | CacheMode::DirectSync) {
            // SAFETY: advice on a descriptor we own; touches no memory of ours.
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
        Ok(())
    }
}

/// Writes aligned `data` at aligned `offset` through `direct` (opened with `O_DIRECT`), copying
/// it through an aligned buffer when `data` itself is not aligned in memory.
fn write_direct(direct: &std::fs::File, data: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    if (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
        return direct.write_all_at(data, offset);
    }
    BOUNCE.with_borrow_mut(|bounce| {
        let bounce = bounce.get_or_insert_with(AlignedBuffer::new);
        let mut at = offset;
        for piece in data.chunks(AlignedBuffer::LEN) {
            let buf = bounce.get(piece.len());
            buf.copy_from_slice(piece);
            direct.write_all_at(buf, at)?;
            at += piece.len() as u64;
        }
        Ok(())
    })
}

/// A new file at `path` for an image (an existing file is truncated; the engine only creates
/// images under a temporary name).
pub(crate) fn create_image_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io(path, "create", e))
}

/// `-o` options parsed from `spec`, for tests.
#[cfg(test)]
pub(crate) fn options(spec: &str) -> CreateOptions {
    let mut o = CreateOptions::default();
    o.parse_options(spec).unwrap();
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_option_lists() {
        let mut o = CreateOptions::default();
        o.parse_options("compat=0.10,cluster_size=4096,lazy_refcounts,name=a,,b")
            .unwrap();
        assert_eq!(o.take("compat").as_deref(), Some("0.10"));
        assert_eq!(o.take("cluster_size").as_deref(), Some("4096"));
        assert_eq!(o.take_bool("lazy_refcounts").unwrap(), Some(true));
        assert_eq!(o.take("name").as_deref(), Some("a,b"));
        assert!(o.reject_unknown(Format::Qcow2).is_ok());
        o.parse_options("bogus=1").unwrap();
        assert!(o.reject_unknown(Format::Qcow2).is_err());
    }
}

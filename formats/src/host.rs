//! Positioned, bounds-checked access to a host file. All format readers go through [`HostFile`] so
//! that a structure pointing past the end of the file becomes a [`Error::Corrupt`] naming the
//! structure, and so that no allocation is ever sized by an untrusted field alone.
//!
//! The file is a local file, or a [`RemoteFile`] the caller supplies (an object in a bucket,
//! read with ranged requests): every driver reads either through the same calls. This crate
//! knows nothing of how a remote file is reached; caching and retries are the implementer's.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// True when `file` lies on a filesystem of a local disk or of memory. Files on network and FUSE
/// filesystems are read, not mapped: a failed read of a mapped page kills the process with SIGBUS
/// where a read returns an error, and such filesystems fail far more often than local disks.
fn on_local_filesystem(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    const LOCAL: [i64; 8] = [
        0xEF53,      // ext2, ext3, ext4
        0x5846_5342, // xfs
        0x9123_683E, // btrfs
        0x0102_1994, // tmpfs
        0x794C_7630, // overlayfs
        0x2FC1_2FC1, // zfs
        0xF2F5_2010, // f2fs
        0x6165_6673, // bcachefs
    ];
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills `st` for a descriptor we own.
    if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstatfs succeeded, so it filled `st`.
    let kind = unsafe { st.assume_init() }.f_type;
    // The field's type differs between platforms.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    LOCAL.contains(&(kind as i64))
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .unwrap_or(4096)
}

/// A readable file of known size that is not a local file (an object in a bucket). Reads may
/// come from several threads at once.
pub trait RemoteFile: Send + Sync {
    /// Bytes of the file.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset`; the range lies inside [`RemoteFile::len`]. `what` names the
    /// structure read, for the error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()>;
}

/// Where the bytes of a [`HostFile`] come from.
enum Content {
    Local(File),
    Remote(Box<dyn RemoteFile>),
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Content::Local(file) => std::fmt::Debug::fmt(file, f),
            Content::Remote(_) => f.write_str("RemoteFile"),
        }
    }
}

#[derive(Debug)]
pub struct HostFile {
    /// The file's path, or the URL of a remote file: what messages name.
    path: PathBuf,
    content: Content,
    len: u64,
    /// The file mapped in memory, made on first use by [`HostFile::mapped`] (`None`: cannot be).
    mapping: OnceLock<Option<memmap2::Mmap>>,
}

impl HostFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
        Self::from_file(path, file)
    }

    pub fn from_file(path: &Path, file: File) -> Result<Self> {
        let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
        let len = if meta.file_type().is_block_device() {
            block_device_len(&file, path)?
        } else {
            meta.len()
        };
        Ok(HostFile {
            path: path.to_path_buf(),
            content: Content::Local(file),
            len,
            mapping: OnceLock::new(),
        })
    }

    /// A remote file, named `name` (its URL) in messages. It is never mapped and reads as data
    /// everywhere (no holes).
    pub fn from_remote(name: &Path, file: Box<dyn RemoteFile>) -> Self {
        HostFile {
            path: name.to_path_buf(),
            len: file.size(),
            content: Content::Remote(file),
            mapping: OnceLock::new(),
        }
    }

    /// True for a [`RemoteFile`]: files its metadata names are not local files.
    pub fn is_remote(&self) -> bool {
        matches!(self.content, Content::Remote(_))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The open local file, for writers (which open their files locally) and windows on it; an
    /// error for a file made by [`HostFile::from_remote`].
    pub fn file(&self) -> Result<&File> {
        match &self.content {
            Content::Local(file) => Ok(file),
            Content::Remote(_) => Err(self.not_local()),
        }
    }

    /// The open file, for a writer that validated the image through this view first.
    pub fn into_file(self) -> Result<File> {
        match self.content {
            Content::Local(file) => Ok(file),
            Content::Remote(_) => Err(self.not_local()),
        }
    }

    fn not_local(&self) -> Error {
        Error::unsupported(
            &self.path,
            "not a local file (an object read remotely cannot be written or windowed)",
        )
    }

    /// Calls `f` on bytes `offset..offset + len` of a regular file mapped in memory, and returns
    /// true; hashing reads data this way without copying it. Returns false without calling `f`
    /// when the range is not inside the file as opened or the file cannot be mapped: callers then
    /// read it. The pages are unmapped from the process afterwards (they stay in the page cache),
    /// so memory use does not grow with the bytes seen.
    ///
    /// Only files on local filesystems are mapped (see [`on_local_filesystem`]). The file must not
    /// shrink meanwhile: touching a page past its new end raises SIGBUS, as for every program
    /// that maps files.
    pub fn with_mapped(&self, offset: u64, len: u64, f: &mut dyn FnMut(&[u8])) -> bool {
        let Some(end) = offset.checked_add(len).filter(|&e| e <= self.len) else {
            return false;
        };
        let Content::Local(file) = &self.content else {
            return false;
        };
        let map = self.mapping.get_or_init(|| {
            let regular = file.metadata().is_ok_and(|m| m.is_file());
            if !regular || self.len == 0 || !on_local_filesystem(file) {
                return None;
            }
            // SAFETY: the map is read-only and lives as long as the file handle. Another process
            // writing the file changes the bytes seen, as it would for reads; one truncating it
            // is the documented SIGBUS case.
            unsafe { memmap2::MmapOptions::new().len(self.len as usize).map(file) }.ok()
        });
        let Some(map) = map else {
            return false;
        };
        let (start, end) = (offset as usize, end as usize);
        f(&map[start..end]);
        // Only pages wholly inside the range. Another thread reading the same bytes (an image
        // may map one host cluster twice) just faults them in again.
        let page = page_size();
        let (first, last) = (start.next_multiple_of(page), end / page * page);
        if last > first {
            // SAFETY: a shared read-only file mapping: dropping its pages loses nothing; a later
            // access maps them again from the page cache.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first)
            };
        }
        true
    }

    /// Bytes the file occupies on the host (allocated blocks), as `qemu-img info` "disk size";
    /// a remote file, its size.
    pub fn allocated_bytes(&self) -> u64 {
        match &self.content {
            Content::Local(file) => file
                .metadata()
                .map(|m| m.blocks().saturating_mul(512))
                .unwrap_or(0),
            Content::Remote(_) => self.len,
        }
    }

    /// Checks that `len` bytes at `offset` lie inside the file; `structure` names what was sought.
    pub fn check_range(&self, offset: u64, len: u64, structure: &str) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::corrupt(
                &self.path,
                structure,
                offset,
                format!(
                    "{len} bytes requested but the file ends at {:#x} ({} bytes)",
                    self.len, self.len
                ),
            )),
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`; reading past the end is a corrupt-image error.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64, structure: &str) -> Result<()> {
        self.check_range(offset, buf.len() as u64, structure)?;
        self.read_inside(buf, offset, structure)
    }

    /// Reads a range already known to lie inside the file.
    fn read_inside(&self, buf: &mut [u8], offset: u64, structure: &str) -> Result<()> {
        match &self.content {
            Content::Local(file) => file
                .read_exact_at(buf, offset)
                .map_err(|e| Error::io(&self.path, format!("read {structure} at {offset:#x}"), e)),
            Content::Remote(file) => file.read_exact_at(buf, offset, structure),
        }
    }

    /// Reads `len` bytes at `offset` into a new buffer. The range is checked against the file size
    /// before allocating, so a hostile length cannot cause a large allocation.
    pub fn read_vec_at(&self, offset: u64, len: u64, structure: &str) -> Result<Vec<u8>> {
        self.check_range(offset, len, structure)?;
        let mut buf = vec![0u8; len as usize];
        self.read_exact_at(&mut buf, offset, structure)?;
        Ok(buf)
    }

    /// Reads bytes at `offset`, filling with zeros whatever lies past the end of the file. Used for
    /// data areas where a file shorter than its last cluster is legitimate (qemu truncates lazily).
    pub fn read_zero_padded_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let avail = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            self.read_inside(head, offset, "data")?;
        }
        tail.fill(0);
        Ok(())
    }

    /// The next offset at or after `offset` that holds data (SEEK_DATA), or `None` when only a hole
    /// remains. Filesystems without hole reporting answer that everything is data.
    pub fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        self.seek(offset, libc::SEEK_DATA)
    }

    /// The next hole at or after `offset` (SEEK_HOLE); the end of the file counts as a hole.
    pub fn next_hole(&self, offset: u64) -> Result<u64> {
        Ok(self.seek(offset, libc::SEEK_HOLE)?.unwrap_or(self.len))
    }

    /// Whether the `len` bytes at `offset` start with data or with a hole (or the end of the
    /// file), and for how many bytes that lasts (at least one, at most `len`).
    pub fn data_run(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        Ok(match self.next_data(offset)? {
            Some(d) if d == offset => {
                let hole = self.next_hole(offset)?.max(offset + 1);
                (true, len.min(hole - offset))
            }
            Some(d) => (false, len.min(d - offset)),
            None => (false, len),
        })
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Result<Option<u64>> {
        use std::os::fd::AsRawFd;
        if offset >= self.len {
            return Ok(None);
        }
        let Content::Local(file) = &self.content else {
            // A remote file is data everywhere.
            return Ok(Some(if whence == libc::SEEK_DATA {
                offset
            } else {
                self.len
            }));
        };
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Ok(None);
        };
        // SAFETY: lseek on a descriptor we own; it only moves the file position, which no other
        // code relies on (all reads are positioned).
        let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            // No hole support: the whole file is data.
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(if whence == libc::SEEK_DATA {
                Some(offset)
            } else {
                Some(self.len)
            }),
            _ => Err(Error::io(&self.path, "lseek", err)),
        }
    }
}

fn block_device_len(file: &File, path: &Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
        .map_err(|e| Error::io(path, "size of block device", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_bytes_are_the_file_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let content: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let file = HostFile::open(&path).unwrap();
        let local = on_local_filesystem(file.file().unwrap());
        let mut seen = Vec::new();
        let mapped = file.with_mapped(4000, 8000, &mut |b| seen.extend_from_slice(b));
        assert_eq!(mapped, local);
        if mapped {
            assert_eq!(seen, content[4000..12000]);
            // Twice: the pages dropped after the first call map again.
            seen.clear();
            assert!(file.with_mapped(0, content.len() as u64, &mut |b| seen.extend_from_slice(b)));
            assert_eq!(seen, content);
        }
        // Ranges past the end are never mapped.
        assert!(!file.with_mapped(12_000, 1000, &mut |_| panic!("called")));
        assert!(!file.with_mapped(u64::MAX, 2, &mut |_| panic!("called")));
    }

    struct InMemory(Vec<u8>);

    impl RemoteFile for InMemory {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }

        fn read_exact_at(&self, buf: &mut [u8], offset: u64, _what: &str) -> Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn remote_files_read_checked_and_as_data_everywhere() {
        let content: Vec<u8> = (0..5000).map(|i| (i % 251) as u8).collect();
        let url = Path::new("s3://bucket/disk.img");
        let file = HostFile::from_remote(url, Box::new(InMemory(content.clone())));
        assert!(file.is_remote());
        assert_eq!(file.len(), 5000);
        assert_eq!(file.path(), url);
        assert_eq!(file.read_vec_at(100, 200, "x").unwrap(), content[100..300]);
        // Past the end: a corrupt-image error naming the URL and the structure, not a read.
        let err = file.read_vec_at(4900, 200, "qcow2 L2 table").unwrap_err();
        assert!(err.to_string().contains("s3://bucket/disk.img"), "{err}");
        assert!(err.to_string().contains("qcow2 L2 table"), "{err}");
        let mut padded = [1u8; 300];
        file.read_zero_padded_at(&mut padded, 4800).unwrap();
        assert_eq!(padded[..200], content[4800..]);
        assert!(padded[200..].iter().all(|&b| b == 0));
        assert_eq!(file.data_run(10, 1000).unwrap(), (true, 1000));
        assert_eq!(file.data_run(10, 10_000).unwrap(), (true, 4990));
        assert_eq!(file.data_run(5000, 10).unwrap(), (false, 10));
        assert!(!file.with_mapped(0, 10, &mut |_| panic!("called")));
        assert_eq!(file.allocated_bytes(), 5000);
    }
}

//! Positioned, bounds-checked access to a host file. All format readers go through [`HostFile`] so
//! that a structure pointing past the end of the file becomes a [`Error::Corrupt`] naming the
//! structure, and so that no allocation is ever sized by an untrusted field alone.

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

#[derive(Debug)]
pub struct HostFile {
    path: PathBuf,
    file: File,
    /// Where the bytes this view shows start in the file: 0, or a member's offset inside an
    /// archive (a disk inside an OVA is read in place).
    base: u64,
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
            file,
            base: 0,
            len,
            mapping: OnceLock::new(),
        })
    }

    /// The `len` bytes at `offset` of this file as a file of their own, named `path` in errors:
    /// a member of an archive read in place. Every read, map and hole query stays inside it.
    pub fn window(&self, path: &Path, offset: u64, len: u64) -> Result<HostFile> {
        self.check_range(offset, len, "archive member")?;
        let file = self
            .file
            .try_clone()
            .map_err(|e| Error::io(&self.path, "open again", e))?;
        Ok(HostFile {
            path: path.to_path_buf(),
            file,
            base: self.base + offset,
            len,
            mapping: OnceLock::new(),
        })
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

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The open file, for a writer that validated the image through this view first.
    pub fn into_file(self) -> File {
        self.file
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
        let map = self.mapping.get_or_init(|| {
            let regular = self.file.metadata().is_ok_and(|m| m.is_file());
            if !regular || self.len == 0 || !on_local_filesystem(&self.file) {
                return None;
            }
            // SAFETY: the map is read-only and lives as long as the file handle. Another process
            // writing the file changes the bytes seen, as it would for reads; one truncating it
            // is the documented SIGBUS case.
            unsafe {
                memmap2::MmapOptions::new()
                    .len((self.base + self.len) as usize)
                    .map(&self.file)
            }
            .ok()
        });
        let Some(map) = map else {
            return false;
        };
        let (start, end) = ((self.base + offset) as usize, (self.base + end) as usize);
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

    /// Bytes the file occupies on the host (allocated blocks), as `qemu-img info` "disk size".
    pub fn allocated_bytes(&self) -> u64 {
        if self.base > 0 {
            // A member of an archive: the file's blocks are the archive's.
            return self.len;
        }
        self.file
            .metadata()
            .map(|m| m.blocks().saturating_mul(512))
            .unwrap_or(0)
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
        self.file
            .read_exact_at(buf, self.base + offset)
            .map_err(|e| Error::io(&self.path, format!("read {structure} at {offset:#x}"), e))
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
            self.file
                .read_exact_at(head, self.base + offset)
                .map_err(|e| Error::io(&self.path, format!("read data at {offset:#x}"), e))?;
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
        let Ok(off) = libc::off_t::try_from(self.base + offset) else {
            return Ok(None);
        };
        // SAFETY: lseek on a descriptor we own; it only moves the file position, which no other
        // code relies on (all reads are positioned).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r >= 0 {
            // Back to this view's offsets; data past its end is not its data.
            let at = (r as u64).saturating_sub(self.base);
            return Ok(match whence {
                libc::SEEK_DATA if at >= self.len => None,
                _ => Some(at.min(self.len)),
            });
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
        let local = on_local_filesystem(file.file());
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

    #[test]
    fn a_window_is_a_file_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive");
        let content: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let file = HostFile::open(&path).unwrap();
        let w = file.window(Path::new("archive#m"), 1000, 5000).unwrap();
        assert_eq!(w.len(), 5000);
        assert_eq!(w.read_vec_at(10, 20, "x").unwrap(), content[1010..1030]);
        let e = w
            .read_vec_at(4990, 20, "member header")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("archive#m") && e.contains("member header"),
            "{e}"
        );
        let mut seen = Vec::new();
        if w.with_mapped(0, 5000, &mut |b| seen.extend_from_slice(b)) {
            assert_eq!(seen, content[1000..6000]);
        }
        assert_eq!(w.next_data(0).unwrap(), Some(0));
        assert_eq!(w.next_hole(0).unwrap(), 5000);
        assert!(file.window(Path::new("x"), 10_000, 5000).is_err());
    }
}

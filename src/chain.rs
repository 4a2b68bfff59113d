//! Rebase and commit: changing a qcow2 image's backing chain in place while the guest keeps its
//! content. Guest data goes in through `ClusterWriter` (new space, one header switch), so a
//! crash leaves each image as before or as after.

use crate::formats::image::read_backing;
use crate::formats::qcow2::cluster_write::{ClusterWriter, discard_all};
use crate::formats::qcow2::edit::Edit;
use crate::formats::{Error, ExtentKind, Format, Image, Result};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What the header of a rebased image records.
pub struct NewBacking<'a> {
    /// The name to record (`None`: no backing file).
    pub name: Option<&'a str>,
    pub format: Option<Format>,
}

fn set_backing(edit: &mut Edit, to: &NewBacking) {
    edit.header.backing_file = to.name.map(str::to_string);
    edit.header.backing_format = to.format.map(|f| f.name().to_string());
}

/// `rebase -u`: records another backing file without looking at any data.
pub fn rebase_unsafe(path: &Path, to: &NewBacking) -> Result<()> {
    let mut edit = Edit::open(path)?;
    set_backing(&mut edit, to);
    edit.commit()
}

/// Whether every byte of `[start, end)` of `image` (`None`: no image) reads as zeros by its map
/// alone (nothing is read).
fn zeros_by_map(image: Option<&dyn Image>, start: u64, end: u64) -> Result<bool> {
    let Some(image) = image else {
        return Ok(true);
    };
    let end = end.min(image.virtual_size());
    let mut at = start;
    while at < end {
        let e = image.map(at, end - at)?;
        if !matches!(e.kind, ExtentKind::Zero | ExtentKind::Unallocated) {
            return Ok(false);
        }
        at = e.start + e.length;
    }
    Ok(true)
}

/// Safe rebase of the qcow2 image at `path`, opened as `image` (with its current backing
/// chain), onto `new_backing` (opened; `None` for none): every cluster the image leaves to its
/// backing and where the old and new backing differ gets the old content written into the
/// image. Ranges both backings leave as zeros by their maps are not read. Returns the number
/// of clusters written.
pub fn rebase(
    path: &Path,
    image: &dyn Image,
    new_backing: Option<&dyn Image>,
    to: &NewBacking,
) -> Result<u64> {
    let mut w = ClusterWriter::open(path)?;
    let cs = w.cluster_size();
    let size = image.virtual_size();
    let mut old = vec![0u8; cs as usize];
    let mut new = vec![0u8; cs as usize];
    let mut written = 0;
    let mut at = 0;
    while at < size {
        let e = image.map(at, size - at)?;
        let end = e.start + e.length;
        let own = e.depth == 0 && e.kind != ExtentKind::Unallocated;
        // The top layer allocates whole clusters: a cluster this extent touches is wholly
        // left to the backing when the extent comes from it.
        let next = end.next_multiple_of(cs).min(size.next_multiple_of(cs));
        let old_zero = matches!(e.kind, ExtentKind::Zero | ExtentKind::Unallocated);
        let same_zeros = old_zero && zeros_by_map(new_backing, at, next)?;
        if !own && !same_zeros {
            for c in at / cs..next / cs {
                let start = c * cs;
                let len = cs.min(size - start) as usize;
                image.read_at(&mut old[..len], start)?;
                read_backing(new_backing, &mut new[..len], start)?;
                if old[..len] != new[..len] {
                    w.write_cluster(c, &old[..len])?;
                    written += 1;
                }
            }
        }
        at = next;
    }
    set_backing(w.edit(), to);
    w.commit()?;
    Ok(written)
}

/// The layer of a backing chain that `commit` writes into.
pub struct Base<'a> {
    /// Its layer number (1: the top image's own backing file).
    pub depth: u32,
    pub path: &'a Path,
    pub format: Format,
    pub virtual_size: u64,
}

/// Commits the content `top` holds above layer `base` into that layer (qcow2 or raw), then
/// empties the qcow2 image at `top_path` unless `keep_top`. Returns the guest bytes committed.
pub fn commit(top: &dyn Image, top_path: &Path, base: &Base, keep_top: bool) -> Result<u64> {
    let size = top.virtual_size();
    if base.virtual_size < size {
        return Err(Error::unsupported(
            base.path,
            format!(
                "committing a {size}-byte image into a smaller base ({} bytes): resize the \
                 base first",
                base.virtual_size
            ),
        ));
    }
    let (base_depth, base_path) = (base.depth, base.path);
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < size {
        let e = top.map(at, size - at)?;
        if e.kind != ExtentKind::Unallocated && e.depth < base_depth {
            ranges.push((e.start, e.start + e.length));
        }
        at = e.start + e.length;
    }
    let committed: u64 = ranges.iter().map(|(a, b)| b - a).sum();
    match base.format {
        Format::Qcow2 => {
            let mut w = ClusterWriter::open(base_path)?;
            let cs = w.cluster_size();
            let mut buf = vec![0u8; cs as usize];
            let mut last = None;
            for &(a, b) in &ranges {
                for c in a / cs..b.div_ceil(cs) {
                    if last == Some(c) {
                        continue;
                    }
                    last = Some(c);
                    let start = c * cs;
                    let len = cs.min(size - start) as usize;
                    top.read_at(&mut buf[..len], start)?;
                    w.write_cluster(c, &buf[..len])?;
                }
            }
            w.commit()?;
        }
        Format::Raw => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(base_path)
                .map_err(|e| Error::io(base_path, "open for writing", e))?;
            let mut buf = vec![0u8; 1 << 20];
            for &(a, b) in &ranges {
                let mut pos = a;
                while pos < b {
                    let n = (b - pos).min(buf.len() as u64) as usize;
                    top.read_at(&mut buf[..n], pos)?;
                    file.write_all_at(&buf[..n], pos)
                        .map_err(|e| Error::io(base_path, format!("write at {pos:#x}"), e))?;
                    pos += n as u64;
                }
            }
            file.sync_all()
                .map_err(|e| Error::io(base_path, "sync", e))?;
        }
        other => {
            return Err(Error::unsupported(
                base_path,
                format!("committing into a {other} image (qcow2 and raw bases)"),
            ));
        }
    }
    if !keep_top {
        discard_all(top_path)?;
    }
    Ok(committed)
}

//! `amend`: changing a qcow2 image's version (compat 0.10 / 1.1), lazy refcounts and refcount
//! width in place, through [`Edit`] (so a crash leaves the image as before or as after).

use super::edit::Edit;
use super::header::{
    COMPAT_LAZY_REFCOUNTS, CompressionType, Header, V2_HEADER_LEN, V3_HEADER_LEN_WITH_COMPRESSION,
};
use super::l2::{Cluster, OFFSET_MASK, be_words, read_table};
use super::snapshot_edit::{entries, set_table};
use super::write::{take_refcount_bits, take_version};
use crate::error::{Error, Result};
use crate::image::Format;
use crate::write::CreateOptions;
use std::collections::HashMap;
use std::path::Path;

/// Applies the `-o` options `compat`, `lazy_refcounts` and `refcount_bits` to the qcow2 image
/// at `path`. A downgrade to compat 0.10 that a feature of the image forbids is refused with
/// the feature named; zero clusters (a version 3 feature) are written out as zeroed clusters.
pub fn amend(path: &Path, opts: &mut CreateOptions) -> Result<()> {
    let version = take_version(opts)?;
    let lazy = opts.take_bool("lazy_refcounts")?;
    let bits = take_refcount_bits(opts)?;
    opts.reject_unknown(Format::Qcow2)?;
    let mut edit = Edit::open(path)?;
    let h = edit.current().clone();
    let version = version.unwrap_or(h.version);
    let lazy = lazy.unwrap_or(h.lazy_refcounts());
    let order = bits.map_or(h.refcount_order, u32::trailing_zeros);
    if version == 2 {
        let refuse = |feature: &str| {
            Err(Error::unsupported(
                path,
                format!("downgrading to compat=0.10 an image with {feature}"),
            ))
        };
        if lazy {
            return refuse("lazy refcounts (add lazy_refcounts=off)");
        }
        if h.compression == CompressionType::Zstd {
            return refuse("zstd compression (compression_type=zstd)");
        }
        if h.extended_l2() {
            return refuse("extended L2 entries (extended_l2)");
        }
        if h.bitmaps.is_some() {
            return refuse("persistent bitmaps (remove them with diskkit bitmap --remove)");
        }
        if order != 4 {
            return refuse(&format!(
                "{}-bit refcounts (compat=0.10 has 16-bit refcounts only: add refcount_bits=16)",
                1u32 << order
            ));
        }
    }
    let unchanged = version == h.version && lazy == h.lazy_refcounts() && order == h.refcount_order;
    if unchanged {
        return Ok(());
    }
    if version == 2 && h.version == 3 {
        expand_zero_clusters(&mut edit)?;
    }
    let new = &mut edit.header;
    new.version = version;
    new.refcount_order = order;
    if version == 2 {
        new.header_length = V2_HEADER_LEN;
        new.compatible_features = 0;
        new.incompatible_features = 0;
        new.autoclear_features = 0;
    } else {
        new.header_length = new.header_length.max(V3_HEADER_LEN_WITH_COMPRESSION);
        new.compatible_features = if lazy {
            new.compatible_features | COMPAT_LAZY_REFCOUNTS
        } else {
            new.compatible_features & !COMPAT_LAZY_REFCOUNTS
        };
    }
    edit.commit()
}

/// Version 2 has no zero flag: every zero cluster, of the active state and of each snapshot,
/// becomes a new zeroed cluster, or unallocated when nothing shows through it (no backing
/// file). The L2 tables that change are copied; the L1 tables and snapshot table that point
/// to them too.
fn expand_zero_clusters(edit: &mut Edit) -> Result<()> {
    let h = edit.current().clone();
    let mut moved = HashMap::new();
    if let Some(l1) = expand_l1(edit, &h, h.l1_table_offset, h.l1_size, &mut moved)? {
        edit.header.l1_table_offset = edit.write_new(&l1)?;
    }
    let (list, mut table) = entries(edit)?;
    let mut changed = false;
    for (s, bytes) in list.iter().zip(&mut table) {
        if let Some(l1) = expand_l1(edit, &h, s.l1_table_offset, s.l1_size, &mut moved)? {
            let at = edit.write_new(&l1)?;
            bytes[..8].copy_from_slice(&at.to_be_bytes());
            changed = true;
        }
    }
    if changed {
        set_table(edit, &table)?;
    }
    Ok(())
}

/// The L1 table at `offset` with every L2 table that holds zero clusters replaced by an
/// expanded copy (`moved` remembers copies, so tables shared by several L1 tables stay
/// shared), or `None` when nothing changes.
fn expand_l1(
    edit: &mut Edit,
    h: &Header,
    offset: u64,
    size: u32,
    moved: &mut HashMap<u64, u64>,
) -> Result<Option<Vec<u8>>> {
    let geo = h.geometry();
    let cs = geo.cluster_size();
    let file = edit.reader()?;
    let mut l1 = read_table(&file, offset, u64::from(size), "qcow2 L1 table")?;
    let mut changed = false;
    for l1e in l1.iter_mut() {
        let l2 = *l1e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        let target = match moved.get(&l2) {
            Some(&t) => t,
            None => {
                let mut table = be_words(&file.read_vec_at(l2, cs, "qcow2 L2 table")?);
                let mut any = false;
                for (i, e) in table.iter_mut().enumerate() {
                    let at = l2 + i as u64 * 8;
                    if let Cluster::Zero { .. } = geo.decode(file.path(), *e, 0, at)? {
                        *e = if h.backing_file.is_some() {
                            edit.write_new(&vec![0u8; cs as usize])?
                        } else {
                            0
                        };
                        any = true;
                    }
                }
                let t = if any {
                    let bytes: Vec<u8> = table.iter().flat_map(|w| w.to_be_bytes()).collect();
                    edit.write_new(&bytes)?
                } else {
                    l2
                };
                moved.insert(l2, t);
                t
            }
        };
        if target != l2 {
            *l1e = target;
            changed = true;
        }
    }
    Ok(changed.then(|| l1.iter().flat_map(|w| w.to_be_bytes()).collect()))
}

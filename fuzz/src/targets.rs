//! The fuzz targets' bodies, one module per target: `fuzz_targets/NAME.rs` hands libFuzzer's
//! input to `NAME::run`, and the workspace's tests replay the kept crashing inputs
//! (`fuzz/regressions/NAME/`) through the same code (`tests/fuzz_regressions.rs`).

use super::{image_file, open_and_walk, round_trip_input, walk};

/// A target's body: libFuzzer's input in, a panic on a bug.
pub type Target = fn(&[u8]);

/// Every target, by name.
pub const ALL: &[(&str, Target)] = &[
    ("bundle_manifest", bundle_manifest::run),
    ("detect", detect::run),
    ("iso", iso::run),
    ("jobfile", jobfile::run),
    ("manifest", manifest::run),
    ("ova_tar", ova_tar::run),
    ("ovf", ovf::run),
    ("partition", partition::run),
    ("qcow2", qcow2::run),
    ("qcow2_edit", qcow2_edit::run),
    ("snapshot_chunk", snapshot_chunk::run),
    ("snapshot_index", snapshot_index::run),
    ("vhd", vhd::run),
    ("vhdx", vhdx::run),
    ("vmdk", vmdk::run),
    ("write_qcow2", write_qcow2::run),
    ("write_raw", write_raw::run),
    ("write_vhd", write_vhd::run),
    ("write_vmdk", write_vmdk::run),
];

pub mod bundle_manifest {
    //! Bundle manifests are read from stores that may be damaged or hostile: decoding never panics,
    //! and a manifest that decodes encodes back to one that decodes the same.
    use diskkit::bundle::Manifest;
    use std::path::Path;

    pub fn run(data: &[u8]) {
        if let Ok(m) = Manifest::decode(Path::new("fuzz"), data) {
            let mut again = m.clone();
            let bytes = again.encode().expect("a decoded manifest encodes");
            assert_eq!(
                Manifest::decode(Path::new("fuzz"), &bytes).expect("decodes"),
                m
            );
        }
    }
}

pub mod detect {
    //! Format detection and opening with every driver: whatever the bytes, opening and walking the
    //! image returns errors, never panics or hangs.

    use super::*;
    pub fn run(data: &[u8]) {
        open_and_walk(&image_file(data), None);
    }
}

pub mod iso {
    //! ISO 9660 parsing: volume descriptors, the boot catalog and the whole file tree under every name
    //! mode, with file reads. The fuzz bytes start at sector 16 (the first volume descriptor) after a
    //! zeroed system area, so small inputs reach the parser.

    use diskkit_formats::HostFile;
    use diskkit_formats::iso::{IsoFs, IsoImage, NameMode, Visit};
    use diskkit_formats::{Image, image::first_nonzero_byte};
    use std::io::{Read, Write};

    const SYSTEM_AREA: usize = 16 * 2048;

    pub fn run(data: &[u8]) {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(&[0u8; SYSTEM_AREA]).expect("write system area");
        f.write_all(data).expect("write fuzz input");
        if let Ok(image) = HostFile::open(f.path()).and_then(IsoImage::open) {
            let _ = image.info();
        }
        let Ok(fs) = HostFile::open(f.path()).and_then(IsoFs::from_host) else {
            return;
        };
        let mut buf = vec![0u8; 64 << 10];
        for mode in [
            NameMode::Auto,
            NameMode::Iso,
            NameMode::Joliet,
            NameMode::RockRidge,
        ] {
            let Ok(root) = fs.root(mode) else { continue };
            let mut entries = 0u32;
            let _ = fs.walk(&root, &mut |visit| {
                if let Visit::Entry { entry, .. } = visit {
                    entries += 1;
                    // Read the start of a bounded number of files.
                    if entries < 1000
                        && let Ok(mut reader) = fs.open_file(entry)
                        && let Ok(n) = reader.read(&mut buf)
                    {
                        let _ = first_nonzero_byte(&buf[..n]);
                    }
                }
                Ok(())
            });
            let _ = fs.lookup(mode, "a/b/../c");
        }
    }
}

pub mod jobfile {
    //! Batch job files are written by users and scripts: parsing one (CSV or JSON Lines) must never
    //! panic, and a job file that passes must hold only complete items with distinct destinations.
    use diskkit::batch::jobfile::parse;
    use std::collections::HashSet;
    use std::path::Path;

    pub fn run(data: &[u8]) {
        if let Ok(items) = parse("fuzz", data, Path::new("/base")) {
            let mut destinations = HashSet::new();
            let mut last_line = 0;
            for item in &items {
                assert!(!item.source.is_empty() && !item.destination.is_empty());
                assert!(item.line > last_line, "lines in order");
                last_line = item.line;
                assert!(
                    destinations.insert(item.destination.clone()),
                    "distinct destinations"
                );
            }
        }
    }
}

pub mod manifest {
    //! Hash manifests are read from users' files: parsing and validating one must never panic, and a
    //! manifest that passes validation must survive a round trip.
    use diskkit_formats::digest::Manifest;

    pub fn run(data: &[u8]) {
        if let Ok(m) = Manifest::from_json(data) {
            let again =
                Manifest::from_json(m.to_json().as_bytes()).expect("valid manifest re-reads");
            assert_eq!(again, m);
        }
    }
}

pub mod ova_tar {
    //! The member index of an OVA and its .mf manifest: never a panic, never a member outside the
    //! archive or with a name that climbs out of it.
    use diskkit::bundle::ova::{parse_mf, tar_index};
    use std::io::Cursor;
    use std::path::{Component, Path};

    pub fn run(data: &[u8]) {
        let len = data.len() as u64;
        if let Ok(members) = tar_index::index(Path::new("fuzz.ova"), Cursor::new(data), len) {
            for m in members {
                assert!(m.offset + m.size <= len);
                assert!(
                    Path::new(&m.name)
                        .components()
                        .all(|c| matches!(c, Component::Normal(_)))
                );
            }
        }
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = parse_mf(Path::new("fuzz.mf"), text);
        }
    }
}

pub mod ovf {
    //! OVF descriptors come inside OVAs from anywhere: parsing must never panic, expand an entity
    //! or allocate beyond the input's size, and every disk it yields has a sane capacity and a
    //! plain file name.
    use diskkit::bundle::ova::ovf;
    use std::path::Path;

    pub fn run(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(d) = ovf::parse(Path::new("fuzz.ovf"), text) {
            for disk in &d.disks {
                assert!(disk.capacity <= ovf::MAX_CAPACITY);
                assert!(ovf::check_href(Path::new("fuzz.ovf"), &disk.href).is_ok());
            }
        }
    }
}

pub mod partition {
    //! The partition table parser on arbitrary guest bytes: MBR, GPT headers, partition arrays and
    //! the backup header are read, and a GPT is grown to a larger disk, without a panic, a hang or an
    //! allocation the bytes ask for. GPT header and array CRCs are made valid first, so mutations
    //! reach the fields behind them (bad CRCs are covered by unit tests).
    use diskkit_formats::partition::{self, GptHeader, SECTOR};
    use std::path::Path;

    pub fn run(data: &[u8]) {
        let mut disk = data.to_vec();
        fix_crcs(&mut disk);
        let size = disk.len() as u64;
        let table = partition::read_with(size, Path::new("fuzz"), &mut |buf, offset| {
            let at = usize::try_from(offset).expect("offset");
            buf.copy_from_slice(&disk[at..at + buf.len()]);
            Ok(())
        });
        if let Ok(t) = table {
            // Growing: patches stay inside the new disk.
            let new_size = (size / SECTOR + 4096) * SECTOR;
            if let Ok(patches) = t.grown_gpt(new_size) {
                for (at, bytes) in patches {
                    assert!(at + bytes.len() as u64 <= new_size);
                }
            }
        }
    }

    /// Recomputes the CRCs of the primary header at LBA 1 and of the header at the LBA it names as
    /// its backup, each over its partition array when that lies inside the input.
    fn fix_crcs(disk: &mut [u8]) {
        let sectors = disk.len() as u64 / SECTOR;
        let mut lba = 1;
        for _ in 0..2 {
            if lba >= sectors {
                return;
            }
            let at = (lba * SECTOR) as usize;
            if !GptHeader::has_signature(&disk[at..]) {
                return;
            }
            let h = &mut disk[at..at + SECTOR as usize];
            let (entries, count, size) = (
                u64::from_le_bytes(h[72..80].try_into().unwrap()),
                u32::from_le_bytes(h[80..84].try_into().unwrap()),
                u32::from_le_bytes(h[84..88].try_into().unwrap()),
            );
            let array = u64::from(count) * u64::from(size);
            let start = entries.saturating_mul(SECTOR);
            if array <= partition::MAX_ARRAY_BYTES
                && start.saturating_add(array) <= disk.len() as u64
            {
                let crc = crc32fast::hash(&disk[start as usize..(start + array) as usize]);
                disk[at + 88..at + 92].copy_from_slice(&crc.to_le_bytes());
            }
            let h = &mut disk[at..at + SECTOR as usize];
            let header_size = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
            if (92..=512).contains(&header_size) {
                h[16..20].fill(0);
                let crc = crc32fast::hash(&h[..header_size]);
                h[16..20].copy_from_slice(&crc.to_le_bytes());
            }
            lba = u64::from_le_bytes(disk[at + 32..at + 40].try_into().unwrap());
        }
    }
}

pub mod qcow2 {
    //! qcow2 parsing: any bytes checked or opened as qcow2 (and each internal snapshot view) must
    //! give errors, never panics, hangs or huge allocations.

    use super::*;
    use diskkit_formats::{Format, OpenOptions, open};

    pub fn run(data: &[u8]) {
        let f = image_file(data);
        // check walks every table, snapshots' included, and the refcount structure.
        let _ = diskkit_formats::qcow2::check(f.path(), None);
        let mut opts = OpenOptions {
            format: Some(Format::Qcow2),
            snapshot: None,
        };
        let Ok(image) = open(f.path(), &opts) else {
            return;
        };
        walk(image.as_ref());
        for s in image.info().snapshots.iter().take(4) {
            opts.snapshot = Some(s.id.clone());
            if let Ok(view) = open(f.path(), &opts) {
                walk(view.as_ref());
            }
        }
    }
}

pub mod qcow2_edit {
    //! qcow2 in-place edits on hostile images: snapshot create/apply/delete, amend and bitmap
    //! changes on any bytes must give errors, never panics, hangs or huge allocations.

    use super::*;
    use diskkit_formats::CreateOptions;
    use diskkit_formats::qcow2::{amend, bitmap_edit, snapshot_edit};

    pub fn run(data: &[u8]) {
        let f = image_file(data);
        let path = f.path();
        let _ = snapshot_edit::create(path, "fuzz", (0, 0));
        let _ = snapshot_edit::apply(path, "1");
        let _ = bitmap_edit::add(path, "b", None, false);
        let _ = bitmap_edit::change(path, "b", bitmap_edit::BitmapChange::Clear);
        let _ = snapshot_edit::delete(path, "fuzz");
        let mut opts = CreateOptions::default();
        if opts.parse_options("compat=0.10,refcount_bits=16").is_ok() {
            let _ = amend(path, &mut opts);
        }
    }
}

pub mod snapshot_chunk {
    //! Chunk objects are read from stores that may be damaged or hostile: decoding must never panic
    //! nor allocate beyond the header's bounded length. The CRC is repaired first, so mutations reach
    //! the decompressor.
    use diskkit_formats::chunk_store::{CHUNK_HEADER, decode_chunk, encode_chunk};
    use std::path::Path;

    pub fn run(data: &[u8]) {
        let mut bytes = data.to_vec();
        if bytes.len() >= CHUNK_HEADER {
            let crc = crc32c::crc32c(&bytes[CHUNK_HEADER..]);
            bytes[20..24].copy_from_slice(&crc.to_le_bytes());
        }
        if let Ok(content) = decode_chunk(Path::new("fuzz"), &bytes) {
            let again = encode_chunk(&content).expect("decoded content encodes");
            let reread = decode_chunk(Path::new("fuzz"), &again).expect("re-encoded chunk decodes");
            assert_eq!(&*reread, &*content);
        }
    }
}

pub mod snapshot_index {
    //! Snapshot indexes are read from stores that may be damaged or hostile: decoding must never
    //! panic nor allocate beyond the input's size, and an index that decodes must re-encode to the
    //! same bytes. The checksum is repaired first, so mutations reach the checks behind it.
    use diskkit_formats::chunk_store::SnapshotIndex;
    use sha2::{Digest, Sha256};
    use std::path::Path;

    pub fn run(data: &[u8]) {
        let mut bytes = data.to_vec();
        if bytes.len() >= 52 {
            let body = bytes.len() - 32;
            let sum = Sha256::digest(&bytes[..body]);
            bytes[body..].copy_from_slice(&sum);
        }
        if let Ok(index) = SnapshotIndex::decode(Path::new("fuzz"), &bytes) {
            let again = index.encode().expect("a decoded index encodes");
            let reread =
                SnapshotIndex::decode(Path::new("fuzz"), &again).expect("re-encoded index decodes");
            assert_eq!(reread, index);
        }
    }
}

pub mod vhd {
    //! The VHD parser on arbitrary bytes: opening (footers, dynamic header, BAT, parent locators),
    //! walking the map and reading, and `check`, return errors and never panic or hang. Footer and
    //! header checksums are made valid first, so mutations reach the structures behind them (bad
    //! checksums are covered by tests).

    use super::*;
    use diskkit_formats::Format;
    use diskkit_formats::vhd;
    use diskkit_formats::vhd::layout::{DynamicHeader, FOOTER_SIZE, Footer, HEADER_SIZE};

    pub fn run(data: &[u8]) {
        let mut data = data.to_vec();
        fix_checksums(&mut data);
        let f = image_file(&data);
        let _ = vhd::check(f.path(), None);
        open_and_walk(&f, Some(Format::Vhd));
    }

    /// Re-encodes the footers at both ends and the dynamic header they point to, which recomputes
    /// their checksums.
    fn fix_checksums(data: &mut [u8]) {
        let footer_len = FOOTER_SIZE as usize;
        if data.len() < footer_len {
            return;
        }
        let mut header_at = None;
        for at in [0, data.len() - footer_len] {
            let slot = &mut data[at..at + footer_len];
            if Footer::has_cookie(slot) {
                let footer = Footer::parse(slot);
                header_at = Some(footer.data_offset);
                slot.copy_from_slice(&footer.to_bytes());
            }
        }
        let header_len = HEADER_SIZE as usize;
        if let Some(at) = header_at.and_then(|a| usize::try_from(a).ok())
            && let Some(slot) = data.get_mut(at..at.saturating_add(header_len))
            && slot.len() == header_len
            && DynamicHeader::has_cookie(slot)
        {
            let header = DynamicHeader::parse(slot);
            slot.copy_from_slice(&header.to_bytes());
        }
    }
}

pub mod vhdx {
    //! The VHDX driver on arbitrary bytes (headers, regions, metadata, log, BAT): opening, walking
    //! and checking the image return errors, never panic or hang. The CRC-32C of both headers and
    //! both region tables is made valid first, so that mutations reach the structures behind them
    //! (bad checksums are covered by tests).

    use super::*;
    use diskkit_formats::Format;
    use diskkit_formats::vhdx::{SEALED, seal};

    pub fn run(data: &[u8]) {
        let mut data = data.to_vec();
        for (offset, len) in SEALED {
            let start = offset as usize;
            if let Some(structure) = data.get_mut(start..start + len) {
                seal(structure);
            }
        }
        let f = image_file(&data);
        let _ = diskkit_formats::vhdx::check(f.path(), None);
        open_and_walk(&f, Some(Format::Vhdx));
    }
}

pub mod vmdk {
    //! The VMDK driver on arbitrary bytes (a sparse extent or a descriptor): opening, walking and
    //! checking the image return errors, never panic or hang.

    use super::*;
    use diskkit_formats::Format;

    pub fn run(data: &[u8]) {
        let f = image_file(data);
        let _ = diskkit_formats::check::check(Format::Vmdk, f.path(), None);
        open_and_walk(&f, Some(Format::Vmdk));
    }
}

pub mod write_qcow2 {
    //! The qcow2 writer round trip: a random guest (data, zeros, holes; any size) written plain or
    //! compressed (zlib, zstd), with cluster sizes from 512 B to 2 MiB and extended L2 entries,
    //! reads back identical (`diskkit_fuzz::round_trip_input`).

    use super::*;
    pub fn run(data: &[u8]) {
        round_trip_input(data, diskkit_formats::Format::Qcow2, |pick| {
            let cluster_size = 512u32 << (pick % 13);
            let (compress, compression) = match (pick >> 4) % 3 {
                0 => (false, "zlib"),
                1 => (true, "zlib"),
                _ => (true, "zstd"),
            };
            // Subclusters need clusters of 16 KiB or more and no compression, as in qemu.
            let extended_l2 = pick & 0x80 != 0 && !compress && cluster_size >= 16 << 10;
            let options = format!(
                "cluster_size={cluster_size},compression_type={compression},extended_l2={}",
                if extended_l2 { "on" } else { "off" }
            );
            (options, compress)
        });
    }
}

pub mod write_raw {
    //! The raw writer round trip: a random guest (data, zeros, holes; any size) written through the
    //! library's writer as convert drives it reads back identical (`diskkit_fuzz::round_trip_input`).

    use super::*;
    pub fn run(data: &[u8]) {
        round_trip_input(data, diskkit_formats::Format::Raw, |_| {
            (String::new(), false)
        });
    }
}

pub mod write_vhd {
    //! The VHD writer round trip: a random guest (data, zeros, holes; any size) written as a dynamic
    //! VHD (block sizes 512 KiB to 2 MiB) or a fixed one, with or without force_size, reads back
    //! identical (`diskkit_fuzz::round_trip_input`).

    use super::*;
    pub fn run(data: &[u8]) {
        round_trip_input(data, diskkit_formats::Format::Vhd, |pick| {
            let force_size = if pick & 1 != 0 { "on" } else { "off" };
            let options = if pick & 2 != 0 {
                format!("subformat=fixed,force_size={force_size}")
            } else {
                let block_size = (512u32 << 10) << ((pick >> 2) % 3);
                format!("subformat=dynamic,block_size={block_size},force_size={force_size}")
            };
            (options, false)
        });
    }
}

pub mod write_vmdk {
    //! The VMDK writers' round trip: a random guest (data, zeros, holes; any size) written as
    //! monolithicSparse or streamOptimized reads back identical (`diskkit_fuzz::round_trip_input`).

    use super::*;
    pub fn run(data: &[u8]) {
        round_trip_input(data, diskkit_formats::Format::Vmdk, |pick| {
            let subformat = match pick & 1 {
                0 => "monolithicSparse",
                _ => "streamOptimized",
            };
            (format!("subformat={subformat}"), false)
        });
    }
}

//! The member index of a tar archive (an OVA) read through the `tar` crate: names, offsets and
//! sizes of the regular files, each checked, so that a member can be read in place as a window
//! of the archive (tar members are contiguous).

use diskkit_formats::{Error, Result};
use std::collections::BTreeSet;
use std::io::{Read, Seek};
use std::path::{Component, Path};

/// Members an archive may have (an OVA has a descriptor, a manifest, a certificate and disks).
pub const MAX_MEMBERS: usize = 4096;

/// A regular file in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Where its bytes start in the archive.
    pub offset: u64,
    pub size: u64,
    /// Where its header starts (for messages).
    pub header: u64,
}

/// The regular files of the tar archive `reader` of `len` bytes, in archive order (`name` says
/// which archive in errors). Refuses links, devices, absolute names and names with `..`,
/// duplicated names, members that reach past the end of the archive, sparse members.
pub fn index<R: Read + Seek>(name: &Path, reader: R, len: u64) -> Result<Vec<Member>> {
    let corrupt = |offset: u64, reason: String| Error::corrupt(name, "tar member", offset, reason);
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries_with_seek()
        .map_err(|e| corrupt(0, format!("not a tar archive: {e}")))?;
    let mut members = Vec::new();
    let mut seen = BTreeSet::new();
    let mut at = 0u64;
    for entry in entries {
        let entry = entry.map_err(|e| corrupt(at, format!("unreadable header: {e}")))?;
        let offset = entry.raw_file_position();
        let header = entry.raw_header_position();
        at = offset;
        let size = entry.size();
        let path = entry
            .path()
            .map_err(|e| corrupt(header, format!("unreadable name: {e}")))?;
        let shown = path.to_string_lossy().into_owned();
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(corrupt(
                header,
                format!("'{shown}' is a {kind:?}: an archive to read in place holds only files"),
            ));
        }
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
            || shown.is_empty()
            || path.has_root()
        {
            return Err(corrupt(
                header,
                format!("'{shown}': absolute names and '..' are refused"),
            ));
        }
        match offset.checked_add(size) {
            Some(end) if end <= len => {}
            _ => {
                return Err(corrupt(
                    header,
                    format!("'{shown}' of {size} bytes at {offset} reaches past the end ({len})"),
                ));
            }
        }
        if !seen.insert(shown.clone()) {
            return Err(corrupt(header, format!("'{shown}' appears twice")));
        }
        if members.len() >= MAX_MEMBERS {
            return Err(corrupt(header, format!("more than {MAX_MEMBERS} members")));
        }
        members.push(Member {
            name: shown,
            offset,
            size,
            header,
        });
    }
    Ok(members)
}

/// True when `head` (the first 512 bytes of a file, or fewer) is a ustar or GNU tar header.
pub fn is_tar(head: &[u8]) -> bool {
    head.len() >= 512 && &head[257..262] == b"ustar"
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn archive(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // set_path refuses '..': write the raw name for hostile fixtures.
            let raw = h.as_old_mut();
            raw.name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn members_are_indexed_in_place() {
        let bytes = archive(&[("a.ovf", b"<x/>"), ("disk.vmdk", &[7u8; 1000])]);
        let m = index(Path::new("t.ova"), Cursor::new(&bytes), bytes.len() as u64).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].name, "a.ovf");
        assert_eq!(m[1].offset, 1536);
        assert_eq!(&bytes[1536..2536], &[7u8; 1000][..]);
        assert!(is_tar(&bytes));
    }

    #[test]
    fn hostile_members_are_refused() {
        for (members, says) in [
            (vec![("../x", &b"1"[..])], "'..'"),
            (vec![("/etc/x", &b"1"[..])], "absolute"),
            (vec![("a", &b"1"[..]), ("a", &b"2"[..])], "twice"),
        ] {
            let bytes = archive(&members);
            let e = index(Path::new("t.ova"), Cursor::new(&bytes), bytes.len() as u64)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says) && e.contains("t.ova"), "{e}");
        }
        // A size past the end of the archive.
        let bytes = archive(&[("a", &[1u8; 600])]);
        let cut = &bytes[..1024];
        let e = index(Path::new("t.ova"), Cursor::new(cut), cut.len() as u64).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
        // A link.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_path("l").unwrap();
        h.set_link_name("/etc/shadow").unwrap();
        h.set_size(0);
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let e = index(Path::new("t.ova"), Cursor::new(&bytes), bytes.len() as u64).unwrap_err();
        assert!(e.to_string().contains("Symlink"), "{e}");
    }
}

//! The VHDX metadata log, replayed in memory. A file closed uncleanly can hold metadata updates
//! (BAT, metadata region) in its log that never reached their place in the file; reading such a
//! file as it is gives a stale view. diskkit never writes its input, so the active log sequence
//! becomes an overlay of patched 4 KiB sectors that every later read consults.

use crate::error::{Error, Result};
use crate::host::HostFile;
use byteorder::{ByteOrder, LittleEndian as LE};
use std::collections::BTreeMap;

/// Log entries are made of 4 KiB sectors; every file offset they touch is 4 KiB aligned.
pub const LOG_SECTOR: u64 = 4096;
const ENTRY_HEADER_LEN: u64 = 64;
const DESCRIPTOR_LEN: u64 = 32;
/// Larger logs are refused when they hold entries: the replay keeps an entry's descriptors in
/// memory. Hyper-V and qemu make 1 MiB logs.
pub const MAX_REPLAY_LOG: u64 = 64 << 20;
/// Bytes of log entries the search for the active sequence may checksum, in multiples of the log
/// length: a well-formed log is read about once; a hostile one cannot make the search quadratic.
const SCAN_PASSES: u64 = 4;

/// The log as the current header locates it.
#[derive(Debug, Clone, Copy)]
pub struct LogLocation {
    pub offset: u64,
    pub length: u64,
    pub guid: [u8; 16],
}

#[derive(Debug, Clone)]
enum Patch {
    Zero,
    /// A data sector of the log at host offset `source`: its bytes 8..4092 with the first eight
    /// and last four bytes kept in the descriptor.
    Sector {
        source: u64,
        leading: [u8; 8],
        trailing: [u8; 4],
    },
}

/// The image file with the replayed log laid over it.
pub struct LoggedFile {
    host: HostFile,
    /// Non-overlapping patched ranges: start -> (length, patch).
    patches: BTreeMap<u64, (u64, Patch)>,
    /// The file's length after replay (a log may extend the file).
    len: u64,
}

impl LoggedFile {
    pub fn host(&self) -> &HostFile {
        &self.host
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn check_range(&self, offset: u64, len: u64, structure: &str) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::corrupt(
                self.host.path(),
                structure,
                offset,
                format!("{len} bytes requested but the file ends at {:#x}", self.len),
            )),
        }
    }

    pub fn read_vec_at(&self, offset: u64, len: u64, structure: &str) -> Result<Vec<u8>> {
        self.check_range(offset, len, structure)?;
        let mut buf = vec![0u8; len as usize];
        self.read_exact_at(&mut buf, offset, structure)?;
        Ok(buf)
    }

    /// Whether the `len` bytes at `offset` start with data or a hole of the host file, and how
    /// far that lasts (at least one byte). Ranges the log patches count as data.
    pub fn data_run(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let end = offset.saturating_add(len);
        let patched = self
            .patches
            .range(..end)
            .next_back()
            .is_some_and(|(s, (l, _))| s.saturating_add(*l) > offset);
        if patched || len == 0 {
            return Ok((true, len));
        }
        self.host.data_run(offset, len)
    }

    /// Reads the file as the replayed log leaves it.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64, structure: &str) -> Result<()> {
        self.check_range(offset, buf.len() as u64, structure)?;
        let on_disk = self.host.len().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(on_disk);
        self.host.read_exact_at(head, offset, structure)?;
        tail.fill(0);
        if self.patches.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        // Patches are sorted and disjoint: walk back from the last one starting before `end`.
        for (&start, (len, patch)) in self.patches.range(..end).rev() {
            let patch_end = start.saturating_add(*len);
            if patch_end <= offset {
                break;
            }
            let from = start.max(offset);
            let to = patch_end.min(end);
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match patch {
                Patch::Zero => out.fill(0),
                Patch::Sector {
                    source,
                    leading,
                    trailing,
                } => {
                    let mut sector = [0u8; LOG_SECTOR as usize];
                    self.host
                        .read_exact_at(&mut sector, *source, "vhdx log data sector")?;
                    sector[..8].copy_from_slice(leading);
                    sector[LOG_SECTOR as usize - 4..].copy_from_slice(trailing);
                    let skip = (from - start) as usize;
                    out.copy_from_slice(&sector[skip..skip + out.len()]);
                }
            }
        }
        Ok(())
    }

    /// Lays `patch` over [start, start + len), replacing what earlier patches said there.
    fn apply(&mut self, start: u64, len: u64, patch: Patch) {
        let end = start.saturating_add(len);
        if end == start {
            return;
        }
        let overlapping: Vec<u64> = self
            .patches
            .range(..end)
            .rev()
            .take_while(|(s, (l, _))| s.saturating_add(*l) > start)
            .map(|(s, _)| *s)
            .collect();
        for s in overlapping {
            let Some((l, old)) = self.patches.remove(&s) else {
                continue;
            };
            // Sector patches are aligned 4 KiB units, so only zero ranges leave remnants.
            if let Patch::Zero = old {
                if s < start {
                    self.patches.insert(s, (start - s, Patch::Zero));
                }
                let old_end = s.saturating_add(l);
                if old_end > end {
                    self.patches.insert(end, (old_end - end, Patch::Zero));
                }
            }
        }
        self.patches.insert(start, (end - start, patch));
    }
}

#[derive(Debug)]
enum Descriptor {
    Zero {
        file_offset: u64,
        length: u64,
    },
    Data {
        file_offset: u64,
        source: u64,
        leading: [u8; 8],
        trailing: [u8; 4],
    },
}

#[derive(Debug)]
struct Entry {
    /// Offset of the entry in the log.
    position: u64,
    length: u64,
    sequence: u64,
    tail: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    descriptors: Vec<Descriptor>,
}

struct Log<'a> {
    host: &'a HostFile,
    loc: LogLocation,
    /// Entry bytes the search may still checksum.
    budget: u64,
    /// Whether any sector looked like an entry of this log (signature and GUID).
    saw_entry: bool,
}

/// Opens `host` with its log replayed. Returns whether a log sequence was replayed.
pub fn replay(host: HostFile, loc: LogLocation) -> Result<(LoggedFile, bool)> {
    let mut file = LoggedFile {
        len: host.len(),
        host,
        patches: BTreeMap::new(),
    };
    if loc.guid == [0; 16] {
        return Ok((file, false));
    }
    let path = file.host.path().to_path_buf();
    let mib = 1 << 20;
    if loc.length == 0 || !loc.length.is_multiple_of(mib) || !loc.offset.is_multiple_of(mib) {
        return Err(Error::corrupt(
            &path,
            "vhdx log",
            loc.offset,
            format!(
                "log of {:#x} bytes at {:#x} is not 1 MiB aligned",
                loc.length, loc.offset
            ),
        ));
    }
    file.host.check_range(loc.offset, loc.length, "vhdx log")?;
    if loc.length > MAX_REPLAY_LOG {
        return Err(Error::unsupported(
            &path,
            format!(
                "replaying a vhdx log of {} MiB (limit {} MiB)",
                loc.length >> 20,
                MAX_REPLAY_LOG >> 20
            ),
        ));
    }
    let mut log = Log {
        host: &file.host,
        loc,
        budget: loc.length * SCAN_PASSES,
        saw_entry: false,
    };
    let Some(active) = log.active_sequence()? else {
        if log.saw_entry {
            return Err(Error::corrupt(
                &path,
                "vhdx log",
                loc.offset,
                "the log holds entries of this file but none forms a valid sequence \
                 (torn or corrupt log); cannot replay it",
            ));
        }
        return Ok((file, false));
    };
    let Some(head) = active.last() else {
        return Ok((file, false));
    };
    if head.flushed_file_offset > file.host.len() {
        return Err(Error::corrupt(
            &path,
            "vhdx log",
            loc.offset + head.position,
            format!(
                "the log says the file held {:#x} bytes but it has {:#x}: data was lost",
                head.flushed_file_offset,
                file.host.len()
            ),
        ));
    }
    file.len = file.len.max(head.last_file_offset);
    for entry in &active {
        for d in &entry.descriptors {
            match *d {
                Descriptor::Zero {
                    file_offset,
                    length,
                } => file.apply(file_offset, length, Patch::Zero),
                Descriptor::Data {
                    file_offset,
                    source,
                    leading,
                    trailing,
                } => file.apply(
                    file_offset,
                    LOG_SECTOR,
                    Patch::Sector {
                        source,
                        leading,
                        trailing,
                    },
                ),
            }
        }
    }
    Ok((file, true))
}

impl Log<'_> {
    /// The valid sequence with the highest sequence number, tail entry first. A sequence is a
    /// run of valid entries, each right after the previous one in the circular log with the
    /// next sequence number, whose last entry's tail points at one of its entries.
    fn active_sequence(&mut self) -> Result<Option<Vec<Entry>>> {
        let length = self.loc.length;
        let mut best: Option<Vec<Entry>> = None;
        let mut pos = 0;
        while pos < length {
            let Some(first) = self.entry_at(pos)? else {
                pos += LOG_SECTOR;
                continue;
            };
            let mut used = first.length;
            let mut run = vec![first];
            while used < length {
                let Some(prev) = run.last().map(|e| e.sequence) else {
                    break;
                };
                match self.entry_at((pos + used) % length)? {
                    Some(e)
                        if Some(e.sequence) == prev.checked_add(1) && used + e.length <= length =>
                    {
                        used += e.length;
                        run.push(e);
                    }
                    _ => break,
                }
            }
            if let Some(head) = run.last() {
                let newer = best
                    .as_ref()
                    .and_then(|b| b.last())
                    .is_none_or(|b| head.sequence > b.sequence);
                if let Some(t) = run.iter().position(|e| e.position == head.tail)
                    && newer
                {
                    best = Some(run.split_off(t));
                }
            }
            // Whatever the run covered has been scanned; a run that wrapped covered the rest.
            pos += used;
        }
        Ok(best)
    }

    /// The entry at log offset `pos` when it is valid: signature, this file's log GUID,
    /// checksum, and descriptors and data sectors that agree with its sequence number.
    fn entry_at(&mut self, pos: u64) -> Result<Option<Entry>> {
        let loc = self.loc;
        let mut h = [0u8; ENTRY_HEADER_LEN as usize];
        self.host
            .read_exact_at(&mut h, loc.offset + pos, "vhdx log entry")?;
        if &h[..4] != b"loge" || h[32..48] != loc.guid {
            return Ok(None);
        }
        self.saw_entry = true;
        let checksum = LE::read_u32(&h[4..]);
        let length = u64::from(LE::read_u32(&h[8..]));
        let tail = u64::from(LE::read_u32(&h[12..]));
        let sequence = LE::read_u64(&h[16..]);
        let descriptor_count = u64::from(LE::read_u32(&h[24..]));
        let flushed_file_offset = LE::read_u64(&h[48..]);
        let last_file_offset = LE::read_u64(&h[56..]);
        let sectors = length / LOG_SECTOR;
        let descriptor_sectors =
            (ENTRY_HEADER_LEN + descriptor_count * DESCRIPTOR_LEN).div_ceil(LOG_SECTOR);
        if length == 0
            || length % LOG_SECTOR != 0
            || length > loc.length
            || tail % LOG_SECTOR != 0
            || tail >= loc.length
            || descriptor_sectors > sectors
        {
            return Ok(None);
        }
        if self.budget < length {
            return Err(Error::corrupt(
                self.host.path(),
                "vhdx log",
                loc.offset + pos,
                "searching the log for its active sequence reads too much: the log is hostile",
            ));
        }
        self.budget -= length;

        let mut crc = 0u32;
        let mut descriptor_bytes = Vec::with_capacity((descriptor_sectors * LOG_SECTOR) as usize);
        // (host offset, signature ok, sequence high, sequence low) of each data sector.
        let mut data_sectors = Vec::new();
        let mut sector = [0u8; LOG_SECTOR as usize];
        for i in 0..sectors {
            let at = loc.offset + (pos + i * LOG_SECTOR) % loc.length;
            self.host.read_exact_at(&mut sector, at, "vhdx log entry")?;
            if i == 0 {
                sector[4..8].fill(0);
            }
            crc = crc32c::crc32c_append(crc, &sector);
            if i < descriptor_sectors {
                descriptor_bytes.extend_from_slice(&sector);
            } else {
                data_sectors.push((
                    at,
                    &sector[..4] == b"data",
                    LE::read_u32(&sector[4..]),
                    LE::read_u32(&sector[LOG_SECTOR as usize - 4..]),
                ));
            }
        }
        if crc != checksum {
            return Ok(None);
        }
        let mut descriptors = Vec::new();
        let mut data = data_sectors.into_iter();
        let table = descriptor_bytes
            .get(ENTRY_HEADER_LEN as usize..)
            .unwrap_or(&[]);
        for d in table
            .chunks_exact(DESCRIPTOR_LEN as usize)
            .take(descriptor_count as usize)
        {
            let file_offset = LE::read_u64(&d[16..]);
            if LE::read_u64(&d[24..]) != sequence || file_offset % LOG_SECTOR != 0 {
                return Ok(None);
            }
            match &d[..4] {
                b"zero" => {
                    let length = LE::read_u64(&d[8..]);
                    if length % LOG_SECTOR != 0 {
                        return Ok(None);
                    }
                    descriptors.push(Descriptor::Zero {
                        file_offset,
                        length,
                    });
                }
                b"desc" => {
                    let Some((source, signed, high, low)) = data.next() else {
                        return Ok(None);
                    };
                    if !signed || high != (sequence >> 32) as u32 || low != sequence as u32 {
                        return Ok(None);
                    }
                    let mut leading = [0u8; 8];
                    leading.copy_from_slice(&d[8..16]);
                    let mut trailing = [0u8; 4];
                    trailing.copy_from_slice(&d[4..8]);
                    descriptors.push(Descriptor::Data {
                        file_offset,
                        source,
                        leading,
                        trailing,
                    });
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(Entry {
            position: pos,
            length,
            sequence,
            tail,
            flushed_file_offset,
            last_file_offset,
            descriptors,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Later patches replace earlier ones; zero ranges split around them.
    #[test]
    fn overlay_layers_patches_in_order() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut content = vec![0xeeu8; 64 * 1024];
        content[60 * 1024..].fill(0x5a); // a "data sector" of the log at 60 KiB
        f.write_all(&content).unwrap();
        let host = HostFile::open(f.path()).unwrap();
        let mut file = LoggedFile {
            len: host.len() + 8192,
            host,
            patches: BTreeMap::new(),
        };
        file.apply(0, 32 * 1024, Patch::Zero);
        let sector = Patch::Sector {
            source: 60 * 1024,
            leading: *b"leading!",
            trailing: *b"tail",
        };
        file.apply(8 * 1024, LOG_SECTOR, sector);
        file.apply(28 * 1024, 8 * 1024, Patch::Zero);
        let mut buf = vec![0u8; 72 * 1024];
        file.read_exact_at(&mut buf, 0, "test").unwrap();
        assert!(buf[..8 * 1024].iter().all(|&b| b == 0));
        assert_eq!(&buf[8 * 1024..8 * 1024 + 8], b"leading!");
        assert!(buf[8 * 1024 + 8..12 * 1024 - 4].iter().all(|&b| b == 0x5a));
        assert_eq!(&buf[12 * 1024 - 4..12 * 1024], b"tail");
        assert!(buf[12 * 1024..36 * 1024].iter().all(|&b| b == 0));
        assert!(buf[36 * 1024..60 * 1024].iter().all(|&b| b == 0xee));
        // Past the file on disk but inside the length the log gives it: zeros.
        assert!(buf[64 * 1024..].iter().all(|&b| b == 0));
        let mut part = [0u8; 16];
        file.read_exact_at(&mut part, 12 * 1024 - 8, "test")
            .unwrap();
        assert_eq!(&part[4..8], b"tail");
        assert!(
            file.read_exact_at(&mut part, 72 * 1024 - 8, "test")
                .is_err()
        );
        assert_eq!(file.patches.len(), 4);
    }
}

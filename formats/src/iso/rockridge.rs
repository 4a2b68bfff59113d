//! System Use Sharing Protocol (IEEE P1281) entries and the Rock Ridge (IEEE P1282) fields diskkit
//! uses: NM names, PX modes, SL symbolic links, TF times and the CL/RE directory relocation.

use super::bytes::{le_u32, slice, u8_at};
use super::dir::{long_time, short_time};
use crate::error::{Error, Result};
use crate::host::HostFile;

/// Continuation areas followed for one directory record: real records use one or two.
const MAX_CE_HOPS: u32 = 16;
/// System use bytes read for one record, all areas together.
const MAX_SUSP_BYTES: u64 = 64 << 10;
/// Longest Rock Ridge name or symbolic link target accepted (Linux PATH_MAX).
pub const MAX_NAME_BYTES: usize = 1024;
const MAX_LINK_BYTES: usize = 4096;

/// Extension identifiers that announce Rock Ridge in an ER entry.
const RRIP_IDS: [&[u8]; 3] = [b"RRIP_1991A", b"IEEE_P1282", b"IEEE_1282"];

/// The Rock Ridge view of one directory record.
#[derive(Debug, Default)]
pub struct Fields {
    /// NM content, continuation pieces joined.
    pub name: Option<Vec<u8>>,
    /// st_mode from PX.
    pub mode: Option<u32>,
    pub symlink: Option<String>,
    /// Modification time (seconds since the epoch) from TF.
    pub mtime: Option<i64>,
    /// CL: this record stands for a directory relocated to this block.
    pub child_link: Option<u32>,
    /// RE: this is a relocated directory, listed where its CL record is instead.
    pub relocated: bool,
}

/// Where the SUSP entries of records begin, learnt from the SP entry of the root's "." record.
#[derive(Debug, Clone, Copy)]
pub struct Susp {
    pub skip: usize,
    pub block_size: u32,
}

impl Susp {
    /// Detects Rock Ridge from the system use field of the root directory's "." record: an SP
    /// entry, then an ER entry naming Rock Ridge (or, for writers that omit ER, Rock Ridge fields).
    pub fn detect(
        file: &HostFile,
        root_dot_system_use: &[u8],
        block_size: u32,
        offset: u64,
    ) -> Result<Option<Susp>> {
        let su = root_dot_system_use;
        if slice(su, 0, 2) != Some(b"SP") || slice(su, 4, 2) != Some(&[0xbe, 0xef]) {
            return Ok(None);
        }
        let susp = Susp {
            skip: usize::from(u8_at(su, 6)),
            block_size,
        };
        let mut rock_ridge = false;
        susp.for_each(file, su, 0, offset, |sig, entry| {
            rock_ridge |= match sig {
                b"ER" => {
                    let id_len = usize::from(u8_at(entry, 4));
                    slice(entry, 8, id_len).is_some_and(|id| RRIP_IDS.contains(&id))
                }
                b"RR" | b"PX" | b"NM" => true,
                _ => false,
            };
            Ok(())
        })?;
        Ok(rock_ridge.then_some(susp))
    }

    /// The Rock Ridge fields of a directory record with system use field `su` at image `offset`.
    pub fn fields(&self, file: &HostFile, su: &[u8], offset: u64) -> Result<Fields> {
        let mut f = Fields::default();
        let mut link = LinkBuilder::default();
        let corrupt =
            |what: &str, reason: String| Error::corrupt(file.path(), what, offset, reason);
        self.for_each(file, su, self.skip, offset, |sig, e| {
            let data = e.get(5..).unwrap_or_default();
            match sig {
                b"NM" => {
                    if u8_at(e, 4) & 0b110 != 0 {
                        return Err(corrupt("Rock Ridge NM", "name is '.' or '..'".into()));
                    }
                    let name = f.name.get_or_insert_with(Vec::new);
                    name.extend_from_slice(data);
                    if name.len() > MAX_NAME_BYTES {
                        return Err(corrupt(
                            "Rock Ridge NM",
                            format!("name longer than {MAX_NAME_BYTES} bytes"),
                        ));
                    }
                }
                b"PX" => f.mode = Some(le_u32(e, 4)),
                b"SL" => {
                    link.add(data);
                    if link.len() > MAX_LINK_BYTES {
                        return Err(corrupt(
                            "Rock Ridge SL",
                            format!("symbolic link target longer than {MAX_LINK_BYTES} bytes"),
                        ));
                    }
                }
                b"TF" => f.mtime = f.mtime.or(modify_time(e)),
                b"CL" => f.child_link = Some(le_u32(e, 4)),
                b"RE" => f.relocated = true,
                _ => {}
            }
            Ok(())
        })?;
        f.symlink = link.finish();
        Ok(f)
    }

    /// Calls `visit(signature, entry)` for every SUSP entry of a record, following CE
    /// continuation areas (bounded in hops and bytes) and stopping at ST.
    fn for_each(
        &self,
        file: &HostFile,
        su: &[u8],
        skip: usize,
        offset: u64,
        mut visit: impl FnMut(&[u8; 2], &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut area = su.get(skip..).unwrap_or_default().to_vec();
        let mut area_offset = offset;
        let mut hops = 0;
        let mut total = area.len() as u64;
        loop {
            let mut continuation = None;
            let mut pos = 0usize;
            while let Some(head) = slice(&area, pos, 4) {
                let len = usize::from(head[2]);
                let Some(entry) = slice(&area, pos, len).filter(|_| len >= 4) else {
                    // A malformed length ends the area: what follows cannot be framed.
                    break;
                };
                let sig = [head[0], head[1]];
                match &sig {
                    b"ST" => break,
                    b"CE" => {
                        continuation =
                            Some((le_u32(entry, 4), le_u32(entry, 12), le_u32(entry, 20)))
                    }
                    _ => visit(&sig, entry)?,
                }
                pos += len;
            }
            let Some((block, within, len)) = continuation else {
                return Ok(());
            };
            hops += 1;
            total += u64::from(len);
            if hops > MAX_CE_HOPS || total > MAX_SUSP_BYTES {
                return Err(Error::corrupt(
                    file.path(),
                    "SUSP continuation area",
                    area_offset,
                    format!(
                        "continuation chain longer than {MAX_CE_HOPS} areas or {MAX_SUSP_BYTES} bytes (a loop?)"
                    ),
                ));
            }
            area_offset = u64::from(block) * u64::from(self.block_size) + u64::from(within);
            area = file.read_vec_at(area_offset, u64::from(len), "SUSP continuation area")?;
        }
    }
}

/// Builds a symbolic link target from SL component records, which may continue across SL entries.
#[derive(Default)]
struct LinkBuilder {
    seen: bool,
    absolute: bool,
    components: Vec<Vec<u8>>,
    /// The last component continues in the next component record.
    glue: bool,
}

const SL_CONTINUE: u8 = 1;
const SL_CURRENT: u8 = 2;
const SL_PARENT: u8 = 4;
const SL_ROOT: u8 = 8;
const SL_VOLROOT: u8 = 16;

impl LinkBuilder {
    fn add(&mut self, mut records: &[u8]) {
        self.seen = true;
        while let [flags, len, rest @ ..] = records {
            let len = usize::from(*len).min(rest.len());
            let (content, next) = rest.split_at(len);
            records = next;
            if flags & (SL_ROOT | SL_VOLROOT) != 0 {
                self.absolute = true;
                self.components.clear();
                self.glue = false;
                continue;
            }
            let text: &[u8] = if flags & SL_CURRENT != 0 {
                b"."
            } else if flags & SL_PARENT != 0 {
                b".."
            } else {
                content
            };
            match self.components.last_mut() {
                Some(last) if self.glue => last.extend_from_slice(text),
                _ => self.components.push(text.to_vec()),
            }
            self.glue = flags & SL_CONTINUE != 0;
        }
    }

    fn len(&self) -> usize {
        self.components.iter().map(|c| c.len() + 1).sum()
    }

    fn finish(self) -> Option<String> {
        if !self.seen {
            return None;
        }
        let joined = self.components.join(&b'/');
        let mut target = if self.absolute {
            vec![b'/']
        } else {
            Vec::new()
        };
        target.extend_from_slice(&joined);
        Some(String::from_utf8_lossy(&target).into_owned())
    }
}

/// The modification time of a TF entry: timestamps follow in flag-bit order (creation, modify,
/// access, ...), each 7 bytes, or 17 in the long form.
fn modify_time(e: &[u8]) -> Option<i64> {
    const MODIFY: u8 = 2;
    const CREATION: u8 = 1;
    const LONG_FORM: u8 = 0x80;
    let flags = u8_at(e, 4);
    if flags & MODIFY == 0 {
        return None;
    }
    let long = flags & LONG_FORM != 0;
    let size = if long { 17 } else { 7 };
    let at = 5 + if flags & CREATION != 0 { size } else { 0 };
    let stamp = slice(e, at, size)?;
    if long {
        long_time(stamp)
    } else {
        short_time(stamp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(entries: &[&[u8]]) -> Option<String> {
        let mut b = LinkBuilder::default();
        for e in entries {
            b.add(e);
        }
        b.finish()
    }

    #[test]
    fn symlink_components() {
        assert_eq!(
            link(&[&[
                SL_ROOT, 0, 0, 3, b'e', b't', b'c', 0, 6, b'p', b'a', b's', b's', b'w', b'd'
            ]])
            .as_deref(),
            Some("/etc/passwd")
        );
        // ".." then a component split over two SL entries.
        assert_eq!(
            link(&[&[SL_PARENT, 0, SL_CONTINUE, 2, b'a', b'b'], &[0, 1, b'c']]).as_deref(),
            Some("../abc")
        );
        assert_eq!(link(&[&[SL_CURRENT, 0]]).as_deref(), Some("."));
        // A length past the end is clamped, not a panic.
        assert_eq!(link(&[&[0, 200, b'x']]).as_deref(), Some("x"));
        assert_eq!(link(&[]), None);
    }

    #[test]
    fn tf_modify_time() {
        // creation + modify, short form: modify is the second stamp.
        let mut e = vec![b'T', b'F', 19, 1, 3];
        e.extend_from_slice(&[100, 1, 1, 0, 0, 0, 0]);
        e.extend_from_slice(&[70, 1, 1, 0, 0, 10, 0]);
        assert_eq!(modify_time(&e), Some(10));
        let mut long = vec![b'T', b'F', 22, 1, 0x82];
        long.extend_from_slice(b"1970010100010000\0");
        assert_eq!(modify_time(&long), Some(60));
        assert_eq!(modify_time(&long[..10]), None);
    }
}

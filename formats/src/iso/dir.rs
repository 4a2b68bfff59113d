//! Directory records (ECMA-119 section 9.1) and the file tree built from them, under ISO 9660,
//! Joliet or Rock Ridge names: listing, path lookup, bounded recursive walks and file reads.

use super::bytes::{both_u32, slice, u8_at};
use super::rockridge::{self, Susp};
use super::volume::{Descriptor, SECTOR, Volumes};
use crate::error::{Error, Result};
use crate::host::HostFile;
use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

/// Largest directory diskkit reads: about 250,000 entries.
const MAX_DIR_BYTES: u64 = 16 << 20;
/// Directory bytes one walk may read in total. Directories occupy distinct sectors, so a real
/// tree's total is below its image size; this also bounds the memory a hostile tree can pin.
const MAX_WALK_DIR_BYTES: u64 = 64 << 20;
/// Deepest directory nesting a walk descends into.
const MAX_DEPTH: usize = 64;

const FLAG_DIRECTORY: u8 = 2;
const FLAG_ASSOCIATED: u8 = 4;
const FLAG_MULTI_EXTENT: u8 = 0x80;
/// Length of a directory record without its identifier.
const RECORD_FIXED: usize = 33;

/// Which names (and metadata) to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameMode {
    /// Rock Ridge when present, else Joliet when present, else ISO 9660.
    Auto,
    /// ISO 9660 identifiers of the primary tree, version (";1") and trailing dot removed.
    Iso,
    /// UCS-2 names of the Joliet supplementary tree.
    Joliet,
    /// Rock Ridge names, modes, links and times of the primary tree.
    RockRidge,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink(String),
    /// A device, FIFO or socket (Rock Ridge PX type): listed, never read.
    Special,
}

/// A byte range of the image holding file data or directory records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    offset: u64,
    len: u64,
}

/// One file, directory or link of the tree.
///
/// `name` is a single path component: never empty, ".", "..", and never containing '/' or NUL
/// (records with such names are skipped with a warning when the directory is read).
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
    /// File size (all extents of a multi-extent file), or the directory's record bytes.
    pub size: u64,
    /// Rock Ridge st_mode (type and permission bits).
    pub mode: Option<u32>,
    /// Modification time in seconds since the epoch (Rock Ridge TF, else the record date).
    pub mtime: Option<i64>,
    mode_of_names: NameMode,
    spans: Vec<Span>,
    /// Image offset of the (first) directory record, for error messages.
    record_offset: u64,
}

impl Entry {
    pub fn is_dir(&self) -> bool {
        self.kind == EntryKind::Dir
    }

    /// The mode to show: Rock Ridge's, else read-only defaults as Linux shows plain ISO files.
    pub fn display_mode(&self) -> u32 {
        match (&self.kind, self.mode) {
            (_, Some(m)) => m,
            (EntryKind::Dir, None) => 0o040555,
            (EntryKind::Symlink(_), None) => 0o120777,
            _ => 0o100444,
        }
    }
}

/// The entries of one directory, sorted by name, and what was skipped.
#[derive(Debug, Default)]
pub struct Listing {
    pub entries: Vec<Entry>,
    pub warnings: Vec<String>,
}

/// What a walk reports, in depth-first order.
pub enum Visit<'a> {
    /// An entry at `path` (components below the walk's start directory).
    Entry {
        path: &'a [String],
        entry: &'a Entry,
    },
    /// Something skipped; the walk goes on.
    Warning(String),
}

/// A parsed directory record; `ident` and `system_use` borrow the record bytes.
pub struct Record<'a> {
    pub extent: u32,
    pub ear_blocks: u8,
    pub size: u32,
    pub date: &'a [u8],
    pub flags: u8,
    pub interleaved: bool,
    pub ident: &'a [u8],
    pub system_use: &'a [u8],
}

/// Parses one record; `r` starts at the record and may extend past it.
pub fn parse_record(r: &[u8]) -> std::result::Result<Record<'_>, &'static str> {
    let len = usize::from(u8_at(r, 0));
    let r = r.get(..len).ok_or("record runs past its sector")?;
    let ident_len = usize::from(u8_at(r, 32));
    if len < RECORD_FIXED + 1 || RECORD_FIXED + ident_len > len {
        return Err("record length too small for its identifier");
    }
    let su_start = RECORD_FIXED + ident_len + usize::from(ident_len % 2 == 0);
    Ok(Record {
        extent: both_u32(r, 2),
        ear_blocks: u8_at(r, 1),
        size: both_u32(r, 10),
        date: slice(r, 18, 7).unwrap_or_default(),
        flags: u8_at(r, 25),
        interleaved: u8_at(r, 26) != 0 || u8_at(r, 27) != 0,
        ident: slice(r, RECORD_FIXED, ident_len).unwrap_or_default(),
        system_use: r.get(su_start..).unwrap_or_default(),
    })
}

/// Read access to the file tree of an ISO image.
pub struct IsoFs {
    file: HostFile,
    volumes: Volumes,
    /// SUSP framing when the primary tree carries Rock Ridge.
    rock_ridge: Option<Susp>,
}

impl IsoFs {
    pub fn open(path: &Path) -> Result<IsoFs> {
        Self::from_host(HostFile::open(path)?)
    }

    pub fn from_host(file: HostFile) -> Result<IsoFs> {
        if !super::volume::has_magic(&file)? {
            return Err(super::volume::not_iso(&file));
        }
        let volumes = Volumes::read(&file)?;
        let p = &volumes.primary;
        let root_offset = u64::from(p.root_extent) * u64::from(p.block_size);
        let head = file.read_vec_at(
            root_offset,
            u64::from(p.root_size).min(SECTOR),
            "ISO root directory",
        )?;
        let rock_ridge = match parse_record(&head) {
            Ok(dot) => Susp::detect(&file, dot.system_use, p.block_size, root_offset)?,
            Err(reason) => {
                return Err(Error::corrupt(
                    file.path(),
                    "ISO root directory",
                    root_offset,
                    reason,
                ));
            }
        };
        Ok(IsoFs {
            file,
            volumes,
            rock_ridge,
        })
    }

    pub fn host(&self) -> &HostFile {
        &self.file
    }

    pub fn into_host(self) -> HostFile {
        self.file
    }

    pub fn volumes(&self) -> &Volumes {
        &self.volumes
    }

    pub fn has_rock_ridge(&self) -> bool {
        self.rock_ridge.is_some()
    }

    /// The name mode `Auto` stands for on this image.
    pub fn resolve(&self, mode: NameMode) -> Result<NameMode> {
        let missing = |what: &str| {
            Err(Error::invalid(format!(
                "{}: the image has no {what} names",
                self.file.path().display()
            )))
        };
        match mode {
            NameMode::Auto if self.rock_ridge.is_some() => Ok(NameMode::RockRidge),
            NameMode::Auto if self.volumes.joliet.is_some() => Ok(NameMode::Joliet),
            NameMode::Auto => Ok(NameMode::Iso),
            NameMode::RockRidge if self.rock_ridge.is_none() => missing("Rock Ridge"),
            NameMode::Joliet if self.volumes.joliet.is_none() => missing("Joliet"),
            m => Ok(m),
        }
    }

    fn descriptor(&self, mode: NameMode) -> &Descriptor {
        match (&self.volumes.joliet, mode) {
            (Some(j), NameMode::Joliet) => j,
            _ => &self.volumes.primary,
        }
    }

    fn block_offset(&self, mode: NameMode, block: u32) -> u64 {
        u64::from(block) * u64::from(self.descriptor(mode).block_size)
    }

    /// The root directory of the tree `mode` names.
    pub fn root(&self, mode: NameMode) -> Result<Entry> {
        let mode = self.resolve(mode)?;
        let d = self.descriptor(mode);
        Ok(Entry {
            name: String::new(),
            kind: EntryKind::Dir,
            size: u64::from(d.root_size),
            mode: None,
            mtime: None,
            mode_of_names: mode,
            spans: vec![Span {
                offset: self.block_offset(mode, d.root_extent),
                len: u64::from(d.root_size),
            }],
            record_offset: d.offset + 156,
        })
    }

    /// Follows a '/'-separated path from the root ("" or "/" is the root itself). Returns the
    /// entry and the names leading to it from the root.
    pub fn lookup(&self, mode: NameMode, path: &str) -> Result<(Vec<String>, Entry)> {
        let mut stack = vec![self.root(mode)?];
        for component in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if component == ".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let Some(dir) = stack.last().filter(|e| e.is_dir()) else {
                return Err(Error::invalid(format!(
                    "{path}: not a directory in the ISO"
                )));
            };
            let found = self
                .read_dir(dir)?
                .entries
                .into_iter()
                .find(|e| e.name == component)
                .ok_or_else(|| {
                    Error::invalid(format!("{path}: no such file or directory in the ISO"))
                })?;
            stack.push(found);
        }
        let names = stack.iter().skip(1).map(|e| e.name.clone()).collect();
        let entry = stack.pop().ok_or_else(|| {
            Error::invalid(format!("{path}: no such file or directory in the ISO"))
        })?;
        Ok((names, entry))
    }

    /// Reads the entries of directory `dir`, skipping (with a warning) records that are damaged
    /// or carry unsafe names.
    pub fn read_dir(&self, dir: &Entry) -> Result<Listing> {
        let span = match (&dir.kind, dir.spans.as_slice()) {
            (EntryKind::Dir, [span]) => *span,
            _ => return Err(Error::invalid(format!("{}: not a directory", dir.name))),
        };
        if span.len > MAX_DIR_BYTES {
            return Err(Error::corrupt(
                self.file.path(),
                "ISO directory record",
                dir.record_offset,
                format!(
                    "directory of {} bytes is larger than {MAX_DIR_BYTES}",
                    span.len
                ),
            ));
        }
        let data = self
            .file
            .read_vec_at(span.offset, span.len, "ISO directory")?;
        let mut listing = Listing::default();
        let mut pending: Option<(Vec<u8>, Entry)> = None;
        for (index, sector) in data.chunks(SECTOR as usize).enumerate() {
            let sector_offset = span.offset + index as u64 * SECTOR;
            let mut pos = 0;
            while pos < sector.len() && sector[pos] != 0 {
                let offset = sector_offset + pos as u64;
                let record = match parse_record(&sector[pos..]) {
                    Ok(r) => r,
                    Err(reason) => {
                        listing.warnings.push(format!(
                            "{}: ISO directory record at offset {offset:#x}: {reason}; rest of the sector skipped",
                            self.file.path().display()
                        ));
                        break;
                    }
                };
                pos += usize::from(sector[pos]);
                if matches!(record.ident, [0] | [1]) || record.flags & FLAG_ASSOCIATED != 0 {
                    continue;
                }
                if let Some((ident, mut entry)) = pending.take() {
                    if ident == record.ident {
                        match self.append_extent(&mut entry, &record, offset) {
                            Ok(()) if record.flags & FLAG_MULTI_EXTENT != 0 => {
                                pending = Some((ident, entry))
                            }
                            Ok(()) => listing.entries.push(entry),
                            Err(e) => listing.warnings.push(e.to_string()),
                        }
                        continue;
                    }
                    listing.warnings.push(unfinished(&self.file, &entry));
                    listing.entries.push(entry);
                }
                match self.entry(dir.mode_of_names, &record, offset) {
                    Ok(None) => {}
                    Ok(Some(entry)) if record.flags & FLAG_MULTI_EXTENT != 0 => {
                        if entry.kind == EntryKind::File {
                            pending = Some((record.ident.to_vec(), entry));
                        } else {
                            listing.warnings.push(
                                Error::corrupt(
                                    self.file.path(),
                                    "ISO directory record",
                                    offset,
                                    "only files can have several extents",
                                )
                                .to_string(),
                            );
                        }
                    }
                    Ok(Some(entry)) => listing.entries.push(entry),
                    Err(e) => listing.warnings.push(e.to_string()),
                }
            }
        }
        if let Some((_, entry)) = pending {
            listing.warnings.push(unfinished(&self.file, &entry));
            listing.entries.push(entry);
        }
        listing.entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(listing)
    }

    /// Builds the entry of one record; `None` for records hidden under this name mode.
    fn entry(&self, mode: NameMode, r: &Record, offset: u64) -> Result<Option<Entry>> {
        let corrupt = |reason: String| {
            Error::corrupt(self.file.path(), "ISO directory record", offset, reason)
        };
        let is_dir = r.flags & FLAG_DIRECTORY != 0;
        let fields = match (mode, &self.rock_ridge) {
            (NameMode::RockRidge, Some(susp)) => susp.fields(&self.file, r.system_use, offset)?,
            _ => rockridge::Fields::default(),
        };
        if fields.relocated {
            return Ok(None);
        }
        let name = match (mode, fields.name) {
            (NameMode::Joliet, _) => {
                if !r.ident.len().is_multiple_of(2) {
                    return Err(corrupt("Joliet name has an odd byte count".into()));
                }
                strip_version(&decode_ucs2(r.ident), is_dir).to_string()
            }
            (_, Some(nm)) => String::from_utf8_lossy(&nm).into_owned(),
            _ => strip_version(&String::from_utf8_lossy(r.ident), is_dir).to_string(),
        };
        if let Some(reason) = unsafe_name(&name) {
            return Err(corrupt(format!("name {name:?} {reason}")));
        }
        let data_block = r
            .extent
            .checked_add(u32::from(r.ear_blocks))
            .ok_or_else(|| corrupt("extent number overflows".into()))?;
        let mut span = Span {
            offset: self.block_offset(mode, data_block),
            len: u64::from(r.size),
        };
        let kind = if let Some(block) = fields.child_link {
            // The directory was moved (deep nesting); its own "." record gives its size.
            let target = self.block_offset(mode, block);
            let head = self.file.read_vec_at(
                target,
                256.min(self.file.len().saturating_sub(target)),
                "relocated directory",
            )?;
            let dot =
                parse_record(&head).map_err(|reason| corrupt(format!("CL target: {reason}")))?;
            span = Span {
                offset: target,
                len: u64::from(dot.size),
            };
            EntryKind::Dir
        } else if is_dir {
            EntryKind::Dir
        } else if let Some(target) = fields.symlink {
            EntryKind::Symlink(target)
        } else {
            match fields.mode.map(|m| m & 0o170000) {
                None | Some(0o100000) | Some(0) => EntryKind::File,
                Some(_) => EntryKind::Special,
            }
        };
        if kind == EntryKind::File && r.interleaved {
            return Err(Error::unsupported(
                self.file.path(),
                format!("interleaved file {name:?} (record at {offset:#x})"),
            ));
        }
        Ok(Some(Entry {
            name,
            size: span.len,
            kind,
            mode: fields.mode,
            mtime: fields.mtime.or_else(|| short_time(r.date)),
            mode_of_names: mode,
            spans: vec![span],
            record_offset: offset,
        }))
    }

    fn append_extent(&self, entry: &mut Entry, r: &Record, offset: u64) -> Result<()> {
        let corrupt = |reason: &str| {
            Error::corrupt(self.file.path(), "ISO multi-extent record", offset, reason)
        };
        let block = r
            .extent
            .checked_add(u32::from(r.ear_blocks))
            .ok_or_else(|| corrupt("extent number overflows"))?;
        let len = u64::from(r.size);
        entry.size = entry
            .size
            .checked_add(len)
            .ok_or_else(|| corrupt("file size overflows"))?;
        entry.spans.push(Span {
            offset: self.block_offset(entry.mode_of_names, block),
            len,
        });
        Ok(())
    }

    /// Walks the tree below `dir` depth first, reporting every entry and every skipped part.
    /// Directories reached twice (loops), nesting deeper than `MAX_DEPTH` and unreadable
    /// subdirectories are skipped with a warning; a tree with more directory data than a real
    /// one could hold is an error.
    pub fn walk(&self, dir: &Entry, visit: &mut dyn FnMut(Visit) -> Result<()>) -> Result<()> {
        let mut state = WalkState {
            visited: HashSet::new(),
            budget: MAX_WALK_DIR_BYTES,
            path: Vec::new(),
        };
        if let Some(span) = dir.spans.first() {
            state.visited.insert(span.offset);
        }
        self.charge(dir, &mut state)?;
        let listing = self.read_dir(dir)?;
        self.walk_listing(listing, &mut state, visit)
    }

    /// Counts a directory against the walk's budget of directory bytes.
    fn charge(&self, dir: &Entry, state: &mut WalkState) -> Result<()> {
        state.budget = state.budget.checked_sub(dir.size).ok_or_else(|| {
            Error::corrupt(
                self.file.path(),
                "ISO directory tree",
                dir.record_offset,
                format!("more than {MAX_WALK_DIR_BYTES} bytes of directories"),
            )
        })?;
        Ok(())
    }

    fn walk_listing(
        &self,
        listing: Listing,
        state: &mut WalkState,
        visit: &mut dyn FnMut(Visit) -> Result<()>,
    ) -> Result<()> {
        for w in listing.warnings {
            visit(Visit::Warning(w))?;
        }
        for entry in listing.entries {
            state.path.push(entry.name.clone());
            visit(Visit::Entry {
                path: &state.path,
                entry: &entry,
            })?;
            if entry.is_dir() {
                let shown = state.path.join("/");
                let key = entry.spans.first().map_or(0, |s| s.offset);
                if state.path.len() >= MAX_DEPTH {
                    visit(Visit::Warning(format!(
                        "{shown}: deeper than {MAX_DEPTH} directories, not descended into"
                    )))?;
                } else if !state.visited.insert(key) {
                    visit(Visit::Warning(format!(
                        "{shown}: directory already visited (a loop), skipped"
                    )))?;
                } else {
                    self.charge(&entry, state)?;
                    match self.read_dir(&entry) {
                        Ok(sub) => self.walk_listing(sub, state, visit)?,
                        Err(e) => visit(Visit::Warning(format!("{shown}: {e}")))?,
                    }
                }
            }
            state.path.pop();
        }
        Ok(())
    }

    /// A reader of a file's content (all extents in order). Every extent is checked against the
    /// image size first.
    pub fn open_file(&self, entry: &Entry) -> Result<FileReader<'_>> {
        if entry.kind != EntryKind::File {
            return Err(Error::invalid(format!(
                "{}: not a regular file",
                entry.name
            )));
        }
        for span in &entry.spans {
            self.file.check_range(
                span.offset,
                span.len,
                &format!(
                    "extent of ISO file {:?} (record at {:#x})",
                    entry.name, entry.record_offset
                ),
            )?;
        }
        Ok(FileReader {
            file: &self.file,
            spans: entry.spans.clone(),
            index: 0,
            pos: 0,
        })
    }
}

struct WalkState {
    visited: HashSet<u64>,
    budget: u64,
    path: Vec<String>,
}

fn unfinished(file: &HostFile, entry: &Entry) -> String {
    Error::corrupt(
        file.path(),
        "ISO multi-extent record",
        entry.record_offset,
        format!(
            "file {:?} has no final extent record; kept what was found",
            entry.name
        ),
    )
    .to_string()
}

/// Streams a file's bytes from its extents.
pub struct FileReader<'a> {
    file: &'a HostFile,
    spans: Vec<Span>,
    index: usize,
    pos: u64,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some(span) = self.spans.get(self.index) {
            let left = span.len - self.pos;
            if left == 0 {
                self.index += 1;
                self.pos = 0;
                continue;
            }
            let n = left.min(buf.len() as u64) as usize;
            self.file
                .read_exact_at(&mut buf[..n], span.offset + self.pos, "ISO file data")
                .map_err(std::io::Error::other)?;
            self.pos += n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}

/// Why `name` cannot be a path component, if it cannot.
fn unsafe_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name == "." || name == ".." {
        Some("is a relative path component")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name.contains('\0') {
        Some("contains NUL")
    } else if name.len() > rockridge::MAX_NAME_BYTES {
        Some("is too long")
    } else {
        None
    }
}

/// Removes the file version (";1") and, for files, the dot of an empty extension ("README.").
fn strip_version(ident: &str, is_dir: bool) -> &str {
    if is_dir {
        return ident;
    }
    let base = ident.split_once(';').map_or(ident, |(b, _)| b);
    match base.strip_suffix('.') {
        Some(b) if !b.is_empty() => b,
        _ => base,
    }
}

/// UCS-2 big endian (Joliet) to a string; unpaired surrogates become U+FFFD.
pub fn decode_ucs2(raw: &[u8]) -> String {
    let units = raw
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]));
    char::decode_utf16(units)
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

/// Days from 1970-01-01 to a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn to_unix(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64, tz: u8) -> Option<i64> {
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let local = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s;
    Some(local - i64::from(tz as i8) * 15 * 60)
}

/// A 7-byte record date: years since 1900, month, day, hour, minute, second, UTC offset in
/// 15-minute units.
pub fn short_time(b: &[u8]) -> Option<i64> {
    let [y, mo, d, h, mi, s, tz] = <[u8; 7]>::try_from(b).ok()?;
    to_unix(
        1900 + i64::from(y),
        mo.into(),
        d.into(),
        h.into(),
        mi.into(),
        s.into(),
        tz,
    )
}

/// A 17-byte date: `YYYYMMDDhhmmsscc` in ASCII digits and the UTC offset.
pub fn long_time(b: &[u8]) -> Option<i64> {
    let digits = std::str::from_utf8(b.get(..16)?).ok()?;
    let n = |at: usize, len: usize| digits.get(at..at + len)?.parse::<i64>().ok();
    to_unix(
        n(0, 4)?,
        n(4, 2)?,
        n(6, 2)?,
        n(8, 2)?,
        n(10, 2)?,
        n(12, 2)?,
        u8_at(b, 16),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(strip_version("README.;1", false), "README");
        assert_eq!(strip_version("A.TXT;1", false), "A.TXT");
        assert_eq!(strip_version("DIR.X", true), "DIR.X");
        assert_eq!(strip_version(".;1", false), ".");
        assert_eq!(decode_ucs2(&[0, b'a', 0xd8, 0x00, 0, b'b']), "a\u{fffd}b");
        assert!(unsafe_name("../evil").is_some());
        assert!(unsafe_name("..").is_some());
        assert!(unsafe_name("a\0b").is_some());
        assert!(unsafe_name("ok name").is_none());
    }

    #[test]
    fn times() {
        assert_eq!(short_time(&[70, 1, 1, 0, 0, 0, 0]), Some(0));
        // 01:00 at UTC+1 is midnight UTC.
        assert_eq!(short_time(&[70, 1, 1, 1, 0, 0, 4]), Some(0));
        assert_eq!(short_time(&[124, 2, 29, 12, 0, 0, 0]), Some(1_709_208_000));
        assert_eq!(short_time(&[0; 7]), None);
        assert_eq!(long_time(b"2024022912000000\0"), Some(1_709_208_000));
        assert_eq!(long_time(b"20240229120000"), None);
    }

    #[test]
    fn record_framing() {
        let mut r = vec![0u8; 40];
        r[0] = 40;
        r[32] = 4;
        r[33..37].copy_from_slice(b"A;1X");
        let rec = parse_record(&r).unwrap();
        assert_eq!(rec.ident, b"A;1X");
        assert_eq!(rec.system_use.len(), 40 - 38);
        r[32] = 9;
        assert!(parse_record(&r).is_err());
        r[0] = 60;
        assert!(parse_record(&r).is_err());
    }
}

//! Writing new qcow2 images ([`Qcow2Writer`]) and sizing them ([`measure`]).
//!
//! Guest data goes to host clusters allocated in order as writes arrive (from several threads);
//! L1/L2 tables are kept in memory and written in `finish`, after the data, followed by a
//! refcount structure computed from what was actually written, then the header. An interrupted
//! conversion leaves no valid header, never a half-consistent image.
//!
//! Compressed images (`-c`) are byte-reproducible: clusters are compressed on the writing
//! threads as they arrive, but placed in guest order (packed one after the other, plain
//! clusters at the next free cluster), so the file is a function of the guest content and the
//! options, not of thread timing. A cluster is placed once every cluster before it has been
//! written or zeroed (the convert engine reports every cluster, zeros included); until then it
//! waits in memory, up to [`MAX_PENDING_BYTES`], past which it waits in an unnamed scratch file
//! next to the image. `finish` places whatever still waits, in guest order.

use super::compress::compress;
use super::header::{COMPAT_LAZY_REFCOUNTS, CompressionType, Header, INCOMPAT_EXTENDED_L2};
use super::l2::{COMPRESSED, COPIED, Geometry, MAX_L1_BYTES, OFFSET_MASK, ZERO, read_table};
use super::refcount::{Counts, RefcountLayout, write_structure};
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::{Format, GuestRange, first_nonzero_byte, touched_clusters};
use crate::write::{CreateOptions, ImageWriter, Measure, Writeback};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Creation options, as qemu-img's `-o` names them for qcow2.
#[derive(Debug, Clone)]
struct Config {
    version: u32,
    cluster_bits: u32,
    refcount_order: u32,
    compression: CompressionType,
    /// `-c`: store clusters compressed when that makes them smaller.
    compress: bool,
    lazy_refcounts: bool,
    extended_l2: bool,
    preallocate_metadata: bool,
    backing_file: Option<String>,
    backing_format: Option<Format>,
}

fn parse_cluster_size(v: &str) -> Result<u32> {
    let bad = || {
        Error::invalid(format!(
            "cluster_size '{v}': need a power of two from 512 to 2M"
        ))
    };
    let t = v.trim().to_ascii_lowercase();
    let t = t.trim_end_matches('b');
    let (num, shift) = match t.strip_suffix('k') {
        Some(n) => (n, 10),
        None => match t.strip_suffix('m') {
            Some(n) => (n, 20),
            None => (t, 0),
        },
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let size = n.checked_shl(shift).ok_or_else(bad)?;
    if !size.is_power_of_two() || !(512..=2 << 20).contains(&size) {
        return Err(bad());
    }
    Ok(size.trailing_zeros())
}

/// Takes out `compat` (qcow2 version 3 for 1.1, 2 for 0.10).
pub(super) fn take_version(opts: &mut CreateOptions) -> Result<Option<u32>> {
    match opts.take("compat").as_deref() {
        None => Ok(None),
        Some("1.1") | Some("v3") => Ok(Some(3)),
        Some("0.10") | Some("v2") => Ok(Some(2)),
        Some(v) => Err(Error::invalid(format!("compat '{v}': use 1.1 or 0.10"))),
    }
}

/// Takes out `refcount_bits` (a power of two up to 64).
pub(super) fn take_refcount_bits(opts: &mut CreateOptions) -> Result<Option<u32>> {
    opts.take("refcount_bits")
        .map(|v| {
            v.parse()
                .ok()
                .filter(|b: &u32| b.is_power_of_two() && *b <= 64)
                .ok_or_else(|| Error::invalid(format!("refcount_bits '{v}': use 1, 2, 4, ... 64")))
        })
        .transpose()
}

impl Config {
    fn from_opts(opts: &mut CreateOptions) -> Result<Config> {
        let version = take_version(opts)?.unwrap_or(3);
        let cluster_bits = match opts.take("cluster_size") {
            Some(v) => parse_cluster_size(&v)?,
            None => 16,
        };
        let compression = take_compression_type(opts)?;
        let refcount_bits = take_refcount_bits(opts)?.unwrap_or(16);
        let lazy_refcounts = opts.take_bool("lazy_refcounts")?.unwrap_or(false);
        let extended_l2 = opts.take_bool("extended_l2")?.unwrap_or(false);
        let preallocate_metadata = match opts.take("preallocation").as_deref() {
            None | Some("off") => false,
            Some("metadata") => true,
            Some(v) => {
                return Err(Error::invalid(format!(
                    "preallocation '{v}': use off or metadata"
                )));
            }
        };
        let mut backing_file = opts.backing_file.clone();
        if let Some(b) = opts.take("backing_file") {
            backing_file.get_or_insert(b);
        }
        let mut backing_format = opts.backing_format;
        if let Some(f) = opts.take("backing_fmt") {
            backing_format.get_or_insert(Format::parse(&f)?);
        }
        opts.reject_unknown(Format::Qcow2)?;
        let cfg = Config {
            version,
            cluster_bits,
            refcount_order: refcount_bits.trailing_zeros(),
            compression,
            compress: opts.compress,
            lazy_refcounts,
            extended_l2,
            preallocate_metadata,
            backing_file,
            backing_format,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let refuse = |why: &str| Err(Error::invalid(format!("qcow2: {why}")));
        if self.version == 2 {
            if self.lazy_refcounts {
                return refuse("lazy_refcounts needs compat=1.1");
            }
            if self.compression != CompressionType::Zlib {
                return refuse("compression_type=zstd needs compat=1.1");
            }
            if self.extended_l2 {
                return refuse("extended_l2 needs compat=1.1");
            }
            if self.refcount_order != 4 {
                return refuse("refcount_bits other than 16 need compat=1.1");
            }
        }
        if self.extended_l2 && self.cluster_bits < super::header::MIN_EXTENDED_L2_CLUSTER_BITS {
            return refuse("extended_l2 needs cluster_size of 16k or more");
        }
        if self.preallocate_metadata && self.backing_file.is_some() {
            return refuse("preallocation=metadata cannot be combined with a backing file");
        }
        if self.preallocate_metadata && self.compress {
            return refuse("preallocation=metadata cannot be combined with compression");
        }
        Ok(())
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: self.cluster_bits,
            extended_l2: self.extended_l2,
            has_data_file: false,
        }
    }

    fn refcounts(&self) -> RefcountLayout {
        RefcountLayout {
            cluster_bits: self.cluster_bits,
            order: self.refcount_order,
        }
    }

    /// L1 entries for `size`, refused beyond qemu's 32 MiB L1 limit.
    fn l1_entries(&self, size: u64) -> Result<u64> {
        let n = self.geometry().l1_entries_for(size);
        if n * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(format!(
                "qcow2: {size} bytes needs an L1 table above 32 MiB; use a larger cluster_size"
            )));
        }
        Ok(n)
    }
}

/// A new qcow2 image being written.
pub struct Qcow2Writer {
    path: PathBuf,
    file: File,
    cfg: Config,
    geo: Geometry,
    virtual_size: u64,
    state: Mutex<State>,
    writeback: Writeback,
    /// Compressed images: where clusters wait for their place beyond [`MAX_PENDING_BYTES`].
    scratch: Option<File>,
}

struct State {
    /// First free host byte for new clusters (cluster aligned).
    next_cluster: u64,
    /// Free bytes `[pos, end)` left in the clusters that hold compressed data.
    compressed_free: Option<(u64, u64)>,
    /// L2 tables by L1 index: the entries (two words each with extended L2).
    tables: HashMap<u64, Vec<u64>>,
    /// Clusters of a compressed image written in pieces: their content so far and how many
    /// bytes arrived (compression needs the whole cluster).
    partial: HashMap<u64, (Vec<u8>, u64)>,
    /// Bytes held in `partial`.
    partial_bytes: u64,
    /// Compressed images: the guest clusters written or zeroed so far, one bit each.
    reported: Vec<u64>,
    /// Compressed images: the first guest cluster not written or zeroed yet; every stored
    /// cluster below it is placed.
    frontier: u64,
    /// Compressed images: stored clusters waiting for their place, by guest cluster.
    pending: BTreeMap<u64, Waiting>,
    /// Bytes of `pending` held in memory.
    pending_bytes: u64,
    /// End of what the scratch file holds.
    scratch_end: u64,
}

/// Clusters given their place: bytes and host offset, to be written.
type Placed = Vec<(Vec<u8>, u64)>;

/// A stored cluster of a compressed image, waiting for its place.
struct Waiting {
    /// Stored compressed (else plain, one whole host cluster).
    compressed: bool,
    bytes: WaitingBytes,
}

enum WaitingBytes {
    Memory(Vec<u8>),
    /// `len` bytes at `at` in the scratch file.
    Scratch {
        at: u64,
        len: u64,
    },
}

/// Memory that compressed clusters waiting for their place may hold; past it, they wait in the
/// scratch file.
const MAX_PENDING_BYTES: u64 = 128 << 20;

/// Memory that clusters assembled from pieces may hold; past it, further clusters written in
/// pieces are stored uncompressed, each piece written in place as it arrives.
const MAX_PARTIAL_BYTES: u64 = 256 << 20;

impl State {
    fn empty() -> State {
        State {
            next_cluster: 0,
            compressed_free: None,
            tables: HashMap::new(),
            partial: HashMap::new(),
            partial_bytes: 0,
            reported: Vec::new(),
            frontier: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            scratch_end: 0,
        }
    }
}

/// What a whole guest cluster becomes.
enum Content<'a> {
    Data(&'a [u8]),
    Zero,
}

impl Qcow2Writer {
    /// Creates the image file at `path` (truncating it) for `virtual_size` guest bytes.
    /// The size is rounded up to whole 512-byte sectors, as qemu does.
    pub fn create(path: &Path, virtual_size: u64, opts: &mut CreateOptions) -> Result<Qcow2Writer> {
        let virtual_size = super::sectors_up(virtual_size)?;
        let cfg = Config::from_opts(opts)?;
        let geo = cfg.geometry();
        let l1_entries = cfg.l1_entries(virtual_size)?;
        let file = File::create(path).map_err(|e| Error::io(path, "create", e))?;
        let scratch = if cfg.compress {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let dir = dir.unwrap_or(Path::new("."));
            // Unnamed where the system allows (nothing is left behind, even after SIGKILL).
            Some(tempfile::tempfile_in(dir).map_err(|e| Error::io(dir, "create scratch file", e))?)
        } else {
            None
        };
        let cs = geo.cluster_size();
        let mut state = State {
            next_cluster: cs,
            ..State::empty()
        };
        if cfg.preallocate_metadata {
            // Every guest cluster gets its host cluster now, at cs * (1 + index).
            let clusters = virtual_size.div_ceil(cs);
            let per_table = geo.l2_entries();
            let words = geo.l2_entry_bytes() as usize / 8;
            for t in 0..l1_entries {
                let mut table = vec![0u64; (per_table as usize) * words];
                for i in 0..per_table.min(clusters - t * per_table) {
                    let host = cs * (1 + t * per_table + i);
                    table[i as usize * words] = host | COPIED;
                    if geo.extended_l2 {
                        table[i as usize * words + 1] = u64::from(u32::MAX);
                    }
                }
                state.tables.insert(t, table);
            }
            state.next_cluster = cs * (1 + clusters);
        }
        Ok(Qcow2Writer {
            writeback: Writeback::for_file(opts.cache, path),
            path: path.to_path_buf(),
            file,
            cfg,
            geo,
            virtual_size,
            state: Mutex::new(state),
            scratch,
        })
    }

    /// Opens an existing, empty qcow2 image (as `qemu-img create` makes it) to write into it
    /// (`convert -n`), keeping its options, size and backing file. New data goes after the
    /// existing file end, so the image stays valid until `finish` switches the header.
    pub fn open_existing(path: &Path) -> Result<Qcow2Writer> {
        let host = HostFile::open(path)?;
        let h = Header::read(&host)?;
        let refuse = |why: &str| Err(Error::unsupported(path, format!("writing into {why}")));
        if h.nb_snapshots > 0 || h.has_data_file() || h.autoclear_features != 0 {
            return refuse("a qcow2 image with snapshots, a data file or bitmaps");
        }
        if h.dirty() || h.corrupt() {
            return refuse("a qcow2 image marked dirty or corrupt");
        }
        let l1 = read_table(
            &host,
            h.l1_table_offset,
            u64::from(h.l1_size),
            "qcow2 L1 table",
        )?;
        let geo = h.geometry();
        for &e in &l1 {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let table = host.read_vec_at(off, geo.cluster_size(), "qcow2 L2 table")?;
            if table.iter().any(|&b| b != 0) {
                return refuse("a qcow2 image that already holds data");
            }
        }
        let cfg = Config {
            version: h.version,
            cluster_bits: h.cluster_bits,
            refcount_order: h.refcount_order,
            compression: h.compression,
            compress: false,
            lazy_refcounts: h.lazy_refcounts(),
            extended_l2: h.extended_l2(),
            preallocate_metadata: false,
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.as_deref().map(Format::parse).transpose()?,
        };
        cfg.l1_entries(h.size)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, "open for writing", e))?;
        Ok(Qcow2Writer {
            writeback: Writeback::default(),
            path: path.to_path_buf(),
            file,
            cfg,
            geo,
            virtual_size: h.size,
            state: Mutex::new(State {
                next_cluster: host.len().next_multiple_of(geo.cluster_size()),
                ..State::empty()
            }),
            scratch: None,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pwrite(&self, buf: &[u8], at: u64) -> Result<()> {
        self.writeback
            .write_at(&self.file, &self.path, buf, at, "image data")
    }

    /// Compressed images: records that guest cluster `c` was written (`stored`: what it is
    /// stored as) or zeroed, and places every cluster this completes the guest-order prefix of.
    /// Returns the bytes to write and where, for the caller to write without the lock.
    fn report(&self, st: &mut State, c: u64, stored: Option<Waiting>) -> Result<Placed> {
        if let Some(mut w) = stored {
            if let WaitingBytes::Memory(bytes) = &w.bytes {
                let len = bytes.len() as u64;
                if c != st.frontier && st.pending_bytes + len > MAX_PENDING_BYTES {
                    let at = st.scratch_end;
                    self.spill(bytes, at)?;
                    st.scratch_end += len;
                    w.bytes = WaitingBytes::Scratch { at, len };
                } else {
                    st.pending_bytes += len;
                }
            }
            st.pending.insert(c, w);
        }
        mark_reported(st, c);
        self.advance(st)
    }

    /// Places the stored clusters below the first cluster not reported yet.
    fn advance(&self, st: &mut State) -> Result<Placed> {
        let mut placed = Vec::new();
        loop {
            let f = st.frontier;
            let word = st.reported.get((f / 64) as usize).copied().unwrap_or(0);
            if word >> (f % 64) & 1 == 0 {
                return Ok(placed);
            }
            if let Some(w) = st.pending.remove(&f) {
                placed.push(self.place(st, f, w)?);
            }
            st.frontier += 1;
        }
    }

    /// Writes what [`Self::place`] placed.
    fn write_placed(&self, placed: Placed) -> Result<()> {
        for (bytes, host) in placed {
            self.pwrite(&bytes, host)?;
        }
        Ok(())
    }

    /// Gives the waiting cluster `c` the next place (compressed data right after the previous
    /// compressed cluster, plain data at the next free host cluster) and its L2 entry; returns
    /// its bytes and host offset, to be written.
    fn place(&self, st: &mut State, c: u64, w: Waiting) -> Result<(Vec<u8>, u64)> {
        let cs = self.geo.cluster_size();
        let bytes = match w.bytes {
            WaitingBytes::Memory(b) => {
                st.pending_bytes -= b.len() as u64;
                b
            }
            WaitingBytes::Scratch { at, len } => self.read_spilled(at, len)?,
        };
        let len = bytes.len() as u64;
        let (host, entry, bitmap) = if w.compressed {
            let host = alloc_bytes(st, len, cs);
            (host, self.geo.compressed_entry(host, len), 0)
        } else {
            let host = st.next_cluster;
            st.next_cluster += cs;
            (host, host | COPIED, u64::from(u32::MAX))
        };
        self.set_entry(st, c, entry, bitmap);
        Ok((bytes, host))
    }

    fn spill(&self, bytes: &[u8], at: u64) -> Result<()> {
        let scratch = self.scratch_file()?;
        scratch
            .write_all_at(bytes, at)
            .map_err(|e| Error::io(&self.path, format!("write scratch data at {at:#x}"), e))
    }

    fn read_spilled(&self, at: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.scratch_file()?
            .read_exact_at(&mut buf, at)
            .map_err(|e| Error::io(&self.path, format!("read scratch data at {at:#x}"), e))?;
        Ok(buf)
    }

    fn scratch_file(&self) -> Result<&File> {
        self.scratch
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{}: no scratch file", self.path.display())))
    }

    /// Guest bytes cluster `c` holds (the last cluster may be cut by the virtual size).
    fn cluster_len(&self, c: u64) -> u64 {
        let cs = self.geo.cluster_size();
        cs.min(self.virtual_size - c * cs)
    }

    /// Sets the L2 entry of guest cluster `c` (entry and, with extended L2, bitmap).
    fn set_entry(&self, st: &mut State, c: u64, entry: u64, bitmap: u64) {
        let per_table = self.geo.l2_entries();
        let words = (self.geo.l2_entry_bytes() / 8) as usize;
        let table = st
            .tables
            .entry(c / per_table)
            .or_insert_with(|| vec![0; per_table as usize * words]);
        let i = (c % per_table) as usize * words;
        table[i] = entry;
        if self.geo.extended_l2 {
            table[i + 1] = bitmap;
        }
    }

    /// Stores one whole guest cluster.
    fn put_cluster(&self, c: u64, content: Content) -> Result<()> {
        let cs = self.geo.cluster_size();
        let data = match content {
            Content::Data(d) if first_nonzero_byte(d).is_some() => d,
            // Zeros: a fresh image (or preallocated sparse cluster) already reads as zeros.
            _ if self.zero_initialized() => return self.report_zero(c),
            _ if self.cfg.version >= 3 => {
                let (entry, bitmap) = if self.geo.extended_l2 {
                    (0, u64::from(u32::MAX) << 32)
                } else {
                    (ZERO, 0)
                };
                let mut st = self.lock();
                self.set_entry(&mut st, c, entry, bitmap);
                drop(st);
                return self.report_zero(c);
            }
            // Version 2 has no zero clusters: hiding the backing file takes zero data.
            Content::Data(d) => d,
            Content::Zero => &vec![0u8; self.cluster_len(c) as usize],
        };
        if self.cfg.compress {
            let mut whole = std::borrow::Cow::Borrowed(data);
            if (data.len() as u64) < cs {
                whole.to_mut().resize(cs as usize, 0);
            }
            // Compression runs outside the lock, on the calling thread.
            let stored = match compress(self.cfg.compression, &whole) {
                Some(z) => Waiting {
                    compressed: true,
                    bytes: WaitingBytes::Memory(z),
                },
                None => Waiting {
                    compressed: false,
                    bytes: WaitingBytes::Memory(data.to_vec()),
                },
            };
            let placed = self.report(&mut self.lock(), c, Some(stored))?;
            return self.write_placed(placed);
        }
        self.put_plain(c, data)
    }

    /// Compressed images: records that guest cluster `c` reads as zeros.
    fn report_zero(&self, c: u64) -> Result<()> {
        if !self.cfg.compress {
            return Ok(());
        }
        let placed = self.report(&mut self.lock(), c, None)?;
        self.write_placed(placed)
    }

    /// Stores `data`, whole guest clusters from `first` on, uncompressed in consecutive host
    /// clusters with one write: a run of clusters costs one lock and one system call.
    fn put_plain(&self, first: u64, data: &[u8]) -> Result<()> {
        let cs = self.geo.cluster_size();
        if self.cfg.preallocate_metadata {
            return self.pwrite(data, cs * (1 + first));
        }
        let count = (data.len() as u64).div_ceil(cs);
        let host = {
            let mut st = self.lock();
            let host = st.next_cluster;
            st.next_cluster += count * cs;
            for i in 0..count {
                self.set_entry(
                    &mut st,
                    first + i,
                    (host + i * cs) | COPIED,
                    u64::from(u32::MAX),
                );
            }
            host
        };
        self.pwrite(data, host)
    }

    /// Host offset of guest cluster `c` when it is mapped to an uncompressed host cluster.
    fn mapped_host(&self, st: &State, c: u64) -> Option<u64> {
        let per_table = self.geo.l2_entries();
        let words = (self.geo.l2_entry_bytes() / 8) as usize;
        let entry = *st
            .tables
            .get(&(c / per_table))?
            .get((c % per_table) as usize * words)?;
        let host = entry & OFFSET_MASK;
        (entry & COMPRESSED == 0 && host != 0).then_some(host)
    }

    /// Stores `len` bytes of `data` (or zeros, when `None`) at `skip` bytes into cluster `c`,
    /// which this call does not cover whole. Uncompressed clusters are allocated by their first
    /// piece and written in place (a fresh host cluster reads as zeros where nothing was
    /// written); compressed images assemble the cluster in memory and store it once complete.
    fn put_partial(&self, c: u64, skip: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        if self.cfg.compress {
            let full = self.cluster_len(c);
            let mut st = self.lock();
            let buffered = st.partial.contains_key(&c);
            if buffered
                || (self.mapped_host(&st, c).is_none()
                    && st.partial_bytes + full <= MAX_PARTIAL_BYTES)
            {
                if !buffered {
                    st.partial_bytes += full;
                }
                let (buf, filled) = st
                    .partial
                    .entry(c)
                    .or_insert_with(|| (vec![0u8; full as usize], 0));
                if let Some(d) = data {
                    buf[skip as usize..(skip + len) as usize].copy_from_slice(d);
                }
                *filled += len;
                if *filled < full {
                    return Ok(());
                }
                st.partial_bytes -= full;
                let buf = st.partial.remove(&c).map(|(b, _)| b).unwrap_or_default();
                drop(st);
                return self.put_cluster(c, Content::Data(&buf));
            }
        }
        let zero = data.is_none_or(|d| first_nonzero_byte(d).is_none());
        let host = {
            let mut st = self.lock();
            match self.mapped_host(&st, c) {
                Some(h) => h,
                // Zeros in an image that reads as zeros: nothing to store.
                None if zero && self.zero_initialized() => return Ok(()),
                None => {
                    let h = st.next_cluster;
                    st.next_cluster += self.geo.cluster_size();
                    self.set_entry(&mut st, c, h | COPIED, u64::from(u32::MAX));
                    h
                }
            }
        };
        match data {
            Some(d) if !zero => self.pwrite(d, host + skip),
            _ => Ok(()),
        }
    }

    /// Splits `[offset, offset + len)` into whole clusters and pieces of clusters.
    fn for_clusters(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, u64, bool, usize) -> Result<()>,
    ) -> Result<()> {
        crate::image::check_guest_range(self.virtual_size, offset, len)?;
        let cs = self.geo.cluster_size();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let c = pos / cs;
            let skip = pos % cs;
            let n = (cs - skip).min(end - pos);
            let whole = skip == 0 && n == self.cluster_len(c);
            f(c, skip, n, whole, (pos - offset) as usize)?;
            pos += n;
        }
        Ok(())
    }
}

/// Records that guest cluster `c` of a compressed image was written or zeroed.
fn mark_reported(st: &mut State, c: u64) {
    let (word, bit) = ((c / 64) as usize, c % 64);
    if st.reported.len() <= word {
        st.reported.resize(word + 1, 0);
    }
    st.reported[word] |= 1 << bit;
}

/// The `compression_type` option: zlib (qemu's default) or zstd.
pub(crate) fn take_compression_type(opts: &mut CreateOptions) -> Result<CompressionType> {
    match opts.take("compression_type").as_deref() {
        None | Some("zlib") => Ok(CompressionType::Zlib),
        Some("zstd") => Ok(CompressionType::Zstd),
        Some(v) => Err(Error::invalid(format!(
            "compression_type '{v}': use zlib or zstd"
        ))),
    }
}

/// Reserves `len` bytes for compressed data, packed after the previous compressed cluster and
/// spilling into the next host cluster when that one is free (the descriptor allows it).
fn alloc_bytes(st: &mut State, len: u64, cs: u64) -> u64 {
    match st.compressed_free {
        Some((pos, end)) if pos + len <= end => {
            st.compressed_free = Some((pos + len, end));
            pos
        }
        Some((pos, end)) if end == st.next_cluster => {
            let grow = (pos + len - end).div_ceil(cs) * cs;
            st.next_cluster += grow;
            st.compressed_free = Some((pos + len, end + grow));
            pos
        }
        _ => {
            let pos = st.next_cluster;
            st.next_cluster += len.div_ceil(cs) * cs;
            st.compressed_free = Some((pos + len, st.next_cluster));
            pos
        }
    }
}

impl ImageWriter for Qcow2Writer {
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// A cluster may arrive in several pieces (from any threads); bytes of it that are never
    /// written read as zeros.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        // Whole non-zero clusters stored uncompressed are gathered into runs `(first cluster,
        // buffer range)` and stored with one write each; other clusters go one by one.
        let mut run: Option<(u64, std::ops::Range<usize>)> = None;
        self.for_clusters(offset, buf.len() as u64, |c, skip, n, whole, at| {
            let piece = at..at + n as usize;
            if whole && !self.cfg.compress && first_nonzero_byte(&buf[piece.clone()]).is_some() {
                match &mut run {
                    Some((_, r)) if r.end == piece.start => r.end = piece.end,
                    _ => {
                        if let Some((first, r)) = run.replace((c, piece)) {
                            self.put_plain(first, &buf[r])?;
                        }
                    }
                }
                return Ok(());
            }
            if let Some((first, r)) = run.take() {
                self.put_plain(first, &buf[r])?;
            }
            if whole {
                self.put_cluster(c, Content::Data(&buf[piece]))
            } else {
                self.put_partial(c, skip, n, Some(&buf[piece]))
            }
        })?;
        match run {
            Some((first, r)) => self.put_plain(first, &buf[r]),
            None => Ok(()),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.cfg.compress && self.zero_initialized() {
            // Whole clusters are only reported, under one lock: the engine reports every zero
            // range of a compressed output, however large.
            let mut guard = None;
            self.for_clusters(offset, len, |c, skip, n, whole, _| {
                if whole {
                    mark_reported(guard.get_or_insert_with(|| self.lock()), c);
                    Ok(())
                } else {
                    guard = None;
                    self.put_partial(c, skip, n, None)
                }
            })?;
            let placed = self.advance(&mut guard.unwrap_or_else(|| self.lock()))?;
            return self.write_placed(placed);
        }
        self.for_clusters(offset, len, |c, skip, n, whole, _| {
            if whole {
                self.put_cluster(c, Content::Zero)
            } else {
                self.put_partial(c, skip, n, None)
            }
        })
    }

    fn zero_initialized(&self) -> bool {
        self.cfg.backing_file.is_none()
    }

    /// With direct I/O, the host clusters the data will take are allocated ahead, past the
    /// end of the file: ext4 runs a direct write that extends a file, or that lands in
    /// unallocated blocks, alone under the file's lock and journals the new size, while it
    /// runs direct writes into allocated blocks inside the file in parallel (the batch
    /// benchmark's 16 conversions: 2.8-3.1 s without, 2.2-2.6 s with). The clusters left over
    /// (zeros the conversion found in the data) are cut off with the file's final length in
    /// [`finish`](ImageWriter::finish).
    fn reserve(&self, allocated: &mut dyn Iterator<Item = Result<GuestRange>>) {
        if !self.writeback.is_direct() || self.cfg.compress || self.cfg.preallocate_metadata {
            return;
        }
        let cs = self.geo.cluster_size();
        let clusters: u64 = touched_clusters(allocated, cs)
            .map_while(|run| run.ok())
            .map(|run| run.end - run.start)
            .sum();
        let start = self.lock().next_cluster;
        let len = clusters.min(self.virtual_size.div_ceil(cs)) * cs;
        // A hint: where the filesystem refuses, the clusters are allocated as they are written.
        let _ = crate::raw::fallocate(&self.file, &self.path, 0, start, len);
    }

    /// Whole clusters: each is then stored (and compressed) by one call.
    fn write_alignment(&self) -> u64 {
        self.geo.cluster_size()
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let partial: Vec<(u64, Vec<u8>)> = self
            .lock()
            .partial
            .drain()
            .map(|(c, (b, _))| (c, b))
            .collect();
        for (c, buf) in partial {
            self.put_cluster(c, Content::Data(&buf))?;
        }
        let mut st = std::mem::replace(&mut *self.lock(), State::empty());
        // Clusters after one never written or zeroed (a caller that skips zeros) wait until
        // now: placed in guest order all the same.
        for (c, w) in std::mem::take(&mut st.pending) {
            let (bytes, host) = self.place(&mut st, c, w)?;
            self.pwrite(&bytes, host)?;
        }
        let cs = self.geo.cluster_size();
        let mut pos = st.next_cluster;
        let l1_entries = self.cfg.l1_entries(self.virtual_size)?;
        let mut l1 = vec![0u64; l1_entries as usize];
        let mut indices: Vec<u64> = st.tables.keys().copied().collect();
        indices.sort_unstable();
        let mut tables = Vec::new();
        let mut tables_bytes = Vec::with_capacity(indices.len() * cs as usize);
        let mut host_refs = Counts::new(0);
        for &i in &indices {
            l1[i as usize] = pos | COPIED;
            let table = &st.tables[&i];
            tables_bytes.extend(table.iter().flat_map(|w| w.to_be_bytes()));
            tables.push(table);
            pos += cs;
        }
        let l2_start = st.next_cluster;
        self.pwrite(&tables_bytes, l2_start)?;
        let l1_offset = pos;
        let l1_bytes: Vec<u8> = l1.iter().flat_map(|w| w.to_be_bytes()).collect();
        self.pwrite(&l1_bytes, l1_offset)?;
        pos += (l1_entries * 8).div_ceil(cs) * cs;

        // Exact refcounts of everything written: header, data, L2 tables, L1.
        host_refs.counts.resize((pos / cs) as usize, 0);
        host_refs.add_range(0, cs, self.geo.cluster_bits);
        host_refs.add_range(l2_start, pos - l2_start, self.geo.cluster_bits);
        let words = (self.geo.l2_entry_bytes() / 8) as usize;
        for table in tables {
            for e in table.chunks(words) {
                let bitmap = e.get(1).copied().unwrap_or(0);
                let cluster = self.geo.decode(&self.path, e[0], bitmap, 0)?;
                host_refs.add_cluster(&self.geo, cluster);
            }
        }
        let (rt_offset, rt_clusters, end) = write_structure(
            &self.file,
            &self.path,
            self.cfg.refcounts(),
            host_refs.counts,
        )?;

        let mut h = Header::new(
            self.cfg.version,
            self.cfg.cluster_bits,
            self.virtual_size,
            self.cfg.refcount_order,
        );
        h.l1_size = l1_entries as u32;
        h.l1_table_offset = l1_offset;
        h.refcount_table_offset = rt_offset;
        h.refcount_table_clusters = rt_clusters;
        h.compression = self.cfg.compression;
        if self.cfg.lazy_refcounts {
            h.compatible_features |= COMPAT_LAZY_REFCOUNTS;
        }
        if self.cfg.extended_l2 {
            h.incompatible_features |= INCOMPAT_EXTENDED_L2;
        }
        h.backing_file = self.cfg.backing_file.clone();
        h.backing_format = self.cfg.backing_format.map(|f| f.name().to_string());
        self.file
            .set_len(end)
            .map_err(|e| Error::io(&self.path, "set length", e))?;
        // The header goes last, after everything it points to is on disk.
        self.writeback.sync_data(&self.file, &self.path)?;
        self.pwrite(&h.encode()?, 0)?;
        self.writeback.sync_all(&self.file, &self.path)
    }
}

/// Size of a new qcow2 image of `virtual_size` bytes holding the guest ranges `allocated`
/// (`(start, end)`, ascending), as `qemu-img measure -O qcow2` computes it.
// The tuples stay until tests/qcow2_write.rs passes `GuestRange`s.
pub fn measure(
    virtual_size: u64,
    opts: &mut CreateOptions,
    allocated: &mut dyn Iterator<Item = Result<GuestRange>>,
) -> Result<Measure> {
    let cfg = Config::from_opts(opts)?;
    cfg.l1_entries(virtual_size)?;
    let cs = cfg.geometry().cluster_size();
    let aligned = virtual_size.next_multiple_of(cs);
    let required_data = if cfg.backing_file.is_some() {
        // The backing file may share nothing with the source: every cluster may be written.
        aligned
    } else {
        let mut clusters = 0u64;
        for run in touched_clusters(allocated, cs) {
            let run = run?;
            clusters += run.end - run.start;
        }
        clusters * cs
    };
    let fully = full_size(&cfg, aligned);
    Ok(Measure {
        required: fully - aligned + required_data,
        fully_allocated: fully,
    })
}

/// Header, all L2 tables, the L1 table, refcounts for all of it, and `aligned` bytes of data.
fn full_size(cfg: &Config, aligned: u64) -> u64 {
    let geo = cfg.geometry();
    let cs = geo.cluster_size();
    let l2_tables = (aligned / cs).div_ceil(geo.l2_entries());
    let l1_bytes = (l2_tables * 8).next_multiple_of(cs);
    let meta = cs + l2_tables * cs + l1_bytes;
    let (blocks, table) = cfg.refcounts().structure_clusters((meta + aligned) / cs);
    meta + (blocks + table) * cs + aligned
}

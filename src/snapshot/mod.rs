//! Data-disk snapshots in a content-addressed store: a local directory or a bucket prefix.
//!
//! Layout under the store's prefix (the byte formats are in `diskkit_formats::chunk_store`):
//!
//! - `config` — JSON: `{"format": "diskkit-snapshot-store", "version": 1, "chunk_size": N}`.
//!   Written once, when the first snapshot is created; every later command reads it.
//! - `chunks/ab/cd/<sha256>` — one object per distinct chunk of guest data, named by the SHA-256
//!   of its guest bytes (zero chunks are never stored).
//! - `snapshots/<id>` — one index per snapshot, written last: a snapshot never lists a chunk
//!   that is not already stored.
//! - `leases/<host>-<pid>-<nanos>` — one per `snapshot create` in progress; `gc.lock` while a
//!   garbage collection runs. See [`gc`] for the rule that keeps the two apart.
//!
//! Chunks are fixed-size and aligned to the guest, so a snapshot's chunk digests are the chunk
//! digests of `diskkit hash` at the store's chunk size: the snapshot's guest digest is what
//! `diskkit hash --chunk-size N SRC` prints.

mod create;
mod crypto;
mod image;

pub use create::{
    CreateOptions, CreateReport, DiskSource, IncrementalPath, SentChunks, create, create_set,
};
pub use crypto::{Crypto, KEY_ENV};
pub use image::SnapshotImage;

use crate::storage::{Location, Scheme, Settings, Store};
use diskkit_formats::chunk_store::{self, ChunkData, HOLE, SnapshotIndex};
use diskkit_formats::digest::hex;
use diskkit_formats::error::ErrorKind;
use diskkit_formats::{Error, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The default chunk size of a new store: Proxmox Backup Server's for VM disks.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
const STORE_FORMAT: &str = "diskkit-snapshot-store";
const STORE_VERSION: u32 = 1;
/// A lease or gc lock older than this is taken for the leftover of a dead process on another
/// machine (on this machine a dead PID is recognised at once).
const LEASE_EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// The store's `config` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreConfig {
    format: String,
    version: u32,
    chunk_size: u64,
    /// The cipher of an encrypted store ([`crypto`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encryption: Option<String>,
    /// Recognises the key of an encrypted store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_check: Option<String>,
}

/// What a store that does not exist yet is made with.
#[derive(Debug, Clone, Copy)]
pub struct NewStore {
    pub chunk_size: u64,
    /// Seal chunks and indexes with the key given to [`SnapshotStore::open`].
    pub encrypt: bool,
}

/// An opened snapshot store.
pub struct SnapshotStore {
    store: Box<dyn Store>,
    location: Location,
    /// Key prefix of the store inside the bucket: empty or ending in `/`.
    prefix: String,
    chunk_size: u64,
    crypto: Option<Crypto>,
}

/// One snapshot as `ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotEntry {
    pub id: String,
    #[serde(flatten)]
    pub meta: chunk_store::SnapshotMeta,
    /// Chunks that hold data (the others are zeros).
    pub data_chunks: u64,
}

impl SnapshotStore {
    /// Opens the store at `url`. With `create_chunk_size`, a store that does not exist yet is
    /// created with that chunk size; without, it must exist.
    /// `settings` come from flags; the environment and `profile` fill in the rest. `key` is
    /// needed for an encrypted store (and ignored for another).
    pub fn open(
        url: &str,
        settings: &Settings,
        profile: Option<&str>,
        key: Option<Crypto>,
        new: Option<NewStore>,
    ) -> Result<SnapshotStore> {
        if let Some(n) = new {
            chunk_store::check_chunk_size(n.chunk_size)?;
            if n.encrypt && key.is_none() {
                return Err(Error::invalid(format!(
                    "--encrypt needs a key: --key-file FILE or {KEY_ENV} (64 hex digits)"
                )));
            }
            // A local store is a directory of its own (Location takes the nearest existing
            // directory as the bucket otherwise).
            if !url.contains("://") || url.starts_with("file://") {
                let dir = url.strip_prefix("file://").unwrap_or(url);
                std::fs::create_dir_all(dir).map_err(|e| Error::io(Path::new(dir), "create", e))?;
            }
        }
        let location = Location::parse(url)?;
        if location.scheme == Scheme::Local
            && !Path::new(&location.bucket).join(&location.key).is_dir()
        {
            return Err(Error::invalid(format!(
                "{url}: no snapshot store here (snapshot create makes one)"
            )));
        }
        let settings = settings.clone().resolve(location.scheme, profile)?;
        let store = crate::storage::open(&location, &settings)?;
        Self::with_store(store, location, url, key, new)
    }

    /// Opens the store of `location` (`url` for messages) through `store`, a bucket or a
    /// read-only view of one (a share link).
    pub fn with_store(
        store: Box<dyn Store>,
        location: Location,
        url: &str,
        key: Option<Crypto>,
        new: Option<NewStore>,
    ) -> Result<SnapshotStore> {
        let prefix = match location.key.trim_end_matches('/') {
            "" => String::new(),
            k => format!("{k}/"),
        };
        let config_key = format!("{prefix}config");
        let config = match store.read_small(&config_key)? {
            Some(bytes) => {
                let config: StoreConfig = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::corrupt(
                        Path::new(&location.with_key(&config_key).url()),
                        "store config",
                        0,
                        e.to_string(),
                    )
                })?;
                if config.format != STORE_FORMAT || config.version != STORE_VERSION {
                    return Err(Error::unsupported(
                        Path::new(url),
                        format!(
                            "store format {} version {} (this diskkit knows {STORE_FORMAT} {STORE_VERSION})",
                            config.format, config.version
                        ),
                    ));
                }
                chunk_store::check_chunk_size(config.chunk_size)?;
                if new.is_some_and(|n| n.encrypt) && config.encryption.is_none() {
                    return Err(Error::invalid(format!(
                        "{url}: this store is not encrypted: --encrypt applies to a new store"
                    )));
                }
                config
            }
            None => match new {
                Some(n) => {
                    let config = StoreConfig {
                        format: STORE_FORMAT.into(),
                        version: STORE_VERSION,
                        chunk_size: n.chunk_size,
                        encryption: n.encrypt.then(|| crypto::CIPHER.to_string()),
                        key_check: key
                            .as_ref()
                            .filter(|_| n.encrypt)
                            .map(|k| k.key_check().to_string()),
                    };
                    let text = serde_json::to_vec_pretty(&config)
                        .map_err(|e| Error::invalid(e.to_string()))?;
                    store.write(&config_key, text)?;
                    config
                }
                None => {
                    return Err(Error::invalid(format!(
                        "{url}: no snapshot store here (no config object; snapshot create makes one)"
                    )));
                }
            },
        };
        let crypto = match (&config.encryption, key) {
            (None, _) => None,
            (Some(c), _) if c != crypto::CIPHER => {
                return Err(Error::unsupported(
                    Path::new(url),
                    format!("store encryption '{c}'"),
                ));
            }
            (Some(_), None) => {
                return Err(Error::invalid(format!(
                    "{url}: the store is encrypted: give its key (--key-file FILE or {KEY_ENV})"
                )));
            }
            (Some(_), Some(k)) => {
                if config.key_check.as_deref() != Some(k.key_check()) {
                    return Err(Error::invalid(format!(
                        "{url}: wrong key for this encrypted store"
                    )));
                }
                Some(k)
            }
        };
        Ok(SnapshotStore {
            store,
            location,
            prefix,
            chunk_size: config.chunk_size,
            crypto,
        })
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The store's URL, for messages.
    pub fn url(&self) -> String {
        let url = self
            .location
            .with_key(self.prefix.trim_end_matches('/'))
            .url();
        url.trim_end_matches('/').to_string()
    }

    /// Whether chunks and indexes are sealed.
    pub fn encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    /// The object name of the chunk whose content has SHA-256 `digest`: the digest itself, or
    /// its keyed hash in an encrypted store.
    fn object_digest(&self, digest: &[u8; 32]) -> [u8; 32] {
        match &self.crypto {
            Some(c) => c.chunk_name(digest),
            None => *digest,
        }
    }

    pub(crate) fn chunk_key(&self, digest: &[u8; 32]) -> String {
        let h = hex(&self.object_digest(digest));
        format!("{}chunks/{}/{}/{h}", self.prefix, &h[..2], &h[2..4])
    }

    pub(crate) fn index_key(&self, id: &str) -> String {
        format!("{}snapshots/{id}", self.prefix)
    }

    /// A name for errors about an object of the store.
    fn object_name(&self, key: &str) -> PathBuf {
        PathBuf::from(self.location.with_key(key).url())
    }

    /// Writes a small object whole: atomically on a local store (temporary file, rename), as
    /// one PUT elsewhere (object stores never show a partial object).
    fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.store.write(key, bytes)
    }

    /// The content of the object `key` as read (opened with the key in an encrypted store).
    fn unseal(&self, name: &Path, key: &str, bytes: Vec<u8>) -> Result<Vec<u8>> {
        match &self.crypto {
            Some(c) => c.open(name, object_leaf(key), &bytes),
            None => Ok(bytes),
        }
    }

    /// The object to store for content `bytes` at `key` (sealed in an encrypted store).
    fn seal<'a>(&self, key: &str, bytes: &'a [u8]) -> Result<Cow<'a, [u8]>> {
        match &self.crypto {
            Some(c) => c.seal(object_leaf(key), bytes).map(Cow::Owned),
            None => Ok(Cow::Borrowed(bytes)),
        }
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        (self.location.scheme == Scheme::Local).then(|| Path::new(&self.location.bucket).join(key))
    }

    /// The key of the object `relative` (a path under the store's prefix).
    pub(crate) fn key_of(&self, relative: &str) -> String {
        format!("{}{relative}", self.prefix)
    }

    /// The bucket the store lives in.
    pub(crate) fn bucket(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Where the store is.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The content of the small object `relative` (opened with the key in an encrypted store),
    /// `None` when it does not exist; objects over `max` bytes are refused before reading.
    pub(crate) fn read_object(&self, relative: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let key = self.key_of(relative);
        let name = self.object_name(&key);
        match self.store.stat(&key)? {
            None => return Ok(None),
            Some(m) if m.size > max => {
                return Err(Error::corrupt(
                    &name,
                    "object",
                    0,
                    format!(
                        "{} bytes, more than the {max} such an object may have",
                        m.size
                    ),
                ));
            }
            Some(_) => {}
        }
        let Some(bytes) = self.store.read_small(&key)? else {
            return Ok(None);
        };
        self.unseal(&name, &key, bytes).map(Some)
    }

    /// Writes the small object `relative` (sealed in an encrypted store) only if none of that
    /// name exists: exactly one of racing writers wins, the others get `AlreadyExists`.
    pub(crate) fn create_object(&self, relative: &str, bytes: Vec<u8>) -> Result<()> {
        let key = self.key_of(relative);
        let sealed = self.seal(&key, &bytes)?.into_owned();
        self.store.create_if_absent(&key, sealed)
    }

    /// Removes the objects `relative` (missing ones are no error).
    pub(crate) fn delete_objects(&self, relative: &[String]) -> Result<()> {
        let keys: Vec<String> = relative.iter().map(|r| self.key_of(r)).collect();
        self.store.delete(&keys)
    }

    /// The names of the objects directly under `relative_dir` (ending in `/`).
    pub(crate) fn list_names(&self, relative_dir: &str) -> Result<Vec<String>> {
        let dir = self.key_of(relative_dir);
        Ok(self
            .store
            .list(&dir)?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(&dir).map(str::to_string))
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .collect())
    }

    /// Copies chunk `digest` into `dst` unless it is there already; returns the bytes sent
    /// (0 when it was there). The chunk is checked against its name on the way and sent in its
    /// encoded form (sealed with `dst`'s key when `dst` is encrypted): never compressed again.
    pub(crate) fn copy_chunk(&self, dst: &SnapshotStore, digest: &[u8; 32]) -> Result<u64> {
        if dst.has_chunk(digest)? {
            return Ok(0);
        }
        let (encoded, _) = self.fetch_chunk(digest)?;
        let sent = encoded.len() as u64;
        dst.put_chunk_parts(digest, &[&encoded])?;
        Ok(sent)
    }

    /// Reads and checks a chunk: its stored form, then its content against its name. A chunk
    /// file of a local store that is not encrypted is read where its bytes can stay (see
    /// [`chunk_store::read_chunk`]).
    pub fn read_chunk(&self, digest: &[u8; 32]) -> Result<ChunkData> {
        let key = self.chunk_key(digest);
        let name = self.object_name(&key);
        let data = match self.local_path(&key).filter(|_| self.crypto.is_none()) {
            Some(path) => {
                let (mut file, len) =
                    open_chunk_file(&path, &name)?.ok_or_else(|| missing(&name))?;
                chunk_store::read_chunk(&name, &mut file, len)?
            }
            None => return self.fetch_chunk(digest).map(|(_, data)| data),
        };
        check_content(&name, &data, digest)?;
        Ok(data)
    }

    /// A chunk's encoded form (unsealed) and its guest bytes, checked against its name.
    fn fetch_chunk(&self, digest: &[u8; 32]) -> Result<(Vec<u8>, ChunkData)> {
        let key = self.chunk_key(digest);
        let name = self.object_name(&key);
        let bytes = match self.local_path(&key) {
            Some(path) => match open_chunk_file(&path, &name)? {
                Some((mut file, len)) => {
                    use std::io::Read;
                    let mut bytes = vec![0u8; len];
                    file.read_exact(&mut bytes)
                        .map_err(|e| Error::io(&path, "read", e))?;
                    Some(bytes)
                }
                None => None,
            },
            None => self.store.read_small(&key)?,
        }
        .ok_or_else(|| missing(&name))?;
        let encoded = self.unseal(&name, &key, bytes)?;
        let data = chunk_store::decode_chunk(&name, &encoded)?;
        check_content(&name, &data, digest)?;
        Ok((encoded, data))
    }

    /// Ids of every snapshot in the store.
    pub(crate) fn ids(&self) -> Result<Vec<String>> {
        let dir = format!("{}snapshots/", self.prefix);
        let mut ids: Vec<String> = self
            .store
            .list(&dir)?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(&dir).map(str::to_string))
            .filter(|id| is_id(id))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The full id for `prefix` (a unique prefix of an id is enough).
    pub fn resolve(&self, prefix: &str) -> Result<String> {
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid(format!(
                "'{prefix}': a snapshot id is hexadecimal (see snapshot ls)"
            )));
        }
        let prefix = prefix.to_ascii_lowercase();
        let matching: Vec<String> = self
            .ids()?
            .into_iter()
            .filter(|id| id.starts_with(&prefix))
            .collect();
        match matching.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(Error::invalid(format!(
                "{}: no snapshot {prefix}",
                self.url()
            ))),
            many => Err(Error::invalid(format!(
                "{}: '{prefix}' matches {} snapshots ({}...): give more of the id",
                self.url(),
                many.len(),
                many[..2].join(", ")
            ))),
        }
    }

    /// The index of snapshot `id` (a full id).
    pub fn index(&self, id: &str) -> Result<SnapshotIndex> {
        let key = self.index_key(id);
        let bytes = self
            .store
            .read_small(&key)?
            .ok_or_else(|| Error::invalid(format!("{}: no snapshot {id}", self.url())))?;
        let name = self.object_name(&key);
        let bytes = self.unseal(&name, &key, bytes)?;
        let index = SnapshotIndex::decode(&name, &bytes)?;
        if index.meta.chunk_size != self.chunk_size {
            return Err(Error::corrupt(
                &self.object_name(&key),
                "snapshot index",
                0,
                format!(
                    "chunk size {} differs from the store's {}",
                    index.meta.chunk_size, self.chunk_size
                ),
            ));
        }
        Ok(index)
    }

    /// Every snapshot, oldest first.
    pub fn list(&self) -> Result<Vec<SnapshotEntry>> {
        let mut out = Vec::new();
        for id in self.ids()? {
            let index = self.index(&id)?;
            out.push(SnapshotEntry {
                data_chunks: index.chunks.iter().filter(|c| **c != HOLE).count() as u64,
                id,
                meta: index.meta,
            });
        }
        out.sort_by(|a, b| (a.meta.created, &a.id).cmp(&(b.meta.created, &b.id)));
        Ok(out)
    }

    /// Removes snapshots (their indexes; `gc` frees the chunks no other snapshot uses).
    pub fn remove(&self, id: &str) -> Result<()> {
        self.store.delete(&[self.index_key(id)])
    }

    /// Takes a lease for a `snapshot create`, after which [`gc`] deletes nothing: it is
    /// written first, then the gc lock is looked for (see [`gc`]).
    pub(crate) fn take_lease(&self) -> Result<Lease<'_>> {
        let key = format!(
            "{}leases/{}-{}-{}",
            self.prefix,
            host_name(),
            std::process::id(),
            now_nanos()
        );
        self.put(&key, holder_record())?;
        let lease = Lease { store: self, key };
        if let Some(holder) = self.live_holder(&format!("{}gc.lock", self.prefix))? {
            return Err(Error::invalid(format!(
                "{}: a garbage collection is running ({holder}): run snapshot create again \
                 when it is done",
                self.url()
            )));
        }
        Ok(lease)
    }

    /// The holder of the lease or lock at `key` when it is still live: an object younger than
    /// [`LEASE_EXPIRY`] whose process, when it ran on this machine, still exists. A dead
    /// holder's object is removed.
    fn live_holder(&self, key: &str) -> Result<Option<String>> {
        let Some(bytes) = self.store.read_small(key)? else {
            return Ok(None);
        };
        let holder: Holder = serde_json::from_slice(&bytes).unwrap_or_default();
        let age = now_secs().saturating_sub(holder.started);
        let dead_here = holder.host == host_name()
            && holder.pid != std::process::id()
            && !crate::output::process_alive(holder.pid as i32);
        if dead_here || age > LEASE_EXPIRY.as_secs() {
            self.store.delete(&[key.to_string()])?;
            return Ok(None);
        }
        Ok(Some(format!(
            "PID {} on {}, started {}s ago",
            holder.pid, holder.host, age
        )))
    }
}

/// A `snapshot create` in progress, removed when dropped.
pub(crate) struct Lease<'a> {
    store: &'a SnapshotStore,
    key: String,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let _ = self.store.store.delete(std::slice::from_ref(&self.key));
    }
}

/// Who holds a lease or the gc lock.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Holder {
    host: String,
    pid: u32,
    started: u64,
}

fn holder_record() -> Vec<u8> {
    serde_json::to_vec(&Holder {
        host: host_name(),
        pid: std::process::id(),
        started: now_secs(),
    })
    .unwrap_or_default()
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name: String = String::from_utf8_lossy(&buf[..end])
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if ok && !name.is_empty() {
        name
    } else {
        "localhost".into()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The last component of a key: the chunk name or snapshot id a sealed object is bound to.
fn object_leaf(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// Snapshot ids are 32 lowercase hex digits: nothing else is taken from a listing.
pub(crate) fn is_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What `gc` did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    pub snapshots: u64,
    pub chunks_kept: u64,
    pub chunks_removed: u64,
    pub bytes_removed: u64,
}

/// Frees the chunks no snapshot references.
///
/// The rule that keeps a concurrent `snapshot create` safe: a create writes its lease before
/// it looks for `gc.lock`, and gc writes `gc.lock` before it looks for leases. Whichever comes
/// second sees the other and stops (a create fails and can be rerun; gc deletes nothing), so a
/// create never decides to reuse a chunk that gc is about to delete. Object stores give
/// read-after-write consistency for these small objects (S3 has since 2020), which is all the
/// rule needs. Leases and locks of processes that died are recognised (same machine: the PID is
/// gone; elsewhere: older than 24 hours) and removed.
pub fn gc(store: &SnapshotStore) -> Result<GcReport> {
    let lock_key = format!("{}gc.lock", store.prefix);
    if let Some(holder) = store.live_holder(&lock_key)? {
        return Err(Error::invalid(format!(
            "{}: another garbage collection is running ({holder})",
            store.url()
        )));
    }
    match store.store.create_if_absent(&lock_key, holder_record()) {
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            return Err(Error::invalid(format!(
                "{}: another garbage collection started at the same time",
                store.url()
            )));
        }
        other => other?,
    }
    let result = (|| {
        let leases = format!("{}leases/", store.prefix);
        for lease in store.store.list(&leases)? {
            if let Some(holder) = store.live_holder(&lease.key)? {
                return Err(Error::invalid(format!(
                    "{}: a snapshot create is running ({holder}): nothing was removed; run gc \
                     again when it is done",
                    store.url()
                )));
            }
        }
        let mut report = GcReport::default();
        let mut referenced: HashSet<[u8; 32]> = HashSet::new();
        for id in store.ids()? {
            report.snapshots += 1;
            let index = store.index(&id)?;
            let used = index.chunks.iter().filter(|c| **c != HOLE);
            referenced.extend(used.map(|c| store.object_digest(c)));
        }
        let chunks = format!("{}chunks/", store.prefix);
        let mut unreferenced = Vec::new();
        for object in store.store.list(&chunks)? {
            let Some(digest) = object.key.rsplit('/').next().and_then(parse_digest) else {
                continue;
            };
            if referenced.contains(&digest) {
                report.chunks_kept += 1;
            } else {
                unreferenced.push(object.key);
                report.chunks_removed += 1;
                report.bytes_removed += object.size;
            }
        }
        store.store.delete(&unreferenced)?;
        Ok(report)
    })();
    store.store.delete(&[lock_key])?;
    result
}

fn parse_digest(h: &str) -> Option<[u8; 32]> {
    if h.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A chunk `verify` found damaged or missing, with the snapshots that use it.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedChunk {
    pub chunk: String,
    pub problem: String,
    pub snapshots: Vec<String>,
}

/// What `verify` found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct VerifyReport {
    pub snapshots: u64,
    pub chunks_checked: u64,
    /// Snapshots whose index could not be read, with the reason.
    pub bad_indexes: BTreeMap<String, String>,
    pub damaged: Vec<DamagedChunk>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.bad_indexes.is_empty() && self.damaged.is_empty()
    }
}

/// Checks that every index of `ids` (all snapshots when empty) is consistent and every chunk
/// it lists is present; with `read_data`, that every chunk decodes to content matching its
/// name. Chunks are read in parallel.
pub fn verify(store: &SnapshotStore, ids: &[String], read_data: bool) -> Result<VerifyReport> {
    use rayon::prelude::*;
    let ids = if ids.is_empty() {
        store.ids()?
    } else {
        ids.to_vec()
    };
    let mut report = VerifyReport::default();
    let mut users: BTreeMap<[u8; 32], Vec<String>> = BTreeMap::new();
    for id in ids {
        report.snapshots += 1;
        match store.index(&id) {
            Ok(index) => {
                for c in index.chunks.into_iter().filter(|c| *c != HOLE) {
                    let u = users.entry(c).or_default();
                    if u.last() != Some(&id) {
                        u.push(id.clone());
                    }
                }
            }
            Err(e) => {
                report.bad_indexes.insert(id, e.to_string());
            }
        }
    }
    let chunks: Vec<([u8; 32], Vec<String>)> = users.into_iter().collect();
    report.chunks_checked = chunks.len() as u64;
    let problems: Vec<Option<DamagedChunk>> = crate::parallel::read_pool()?.install(|| {
        chunks
            .par_iter()
            .map(|(digest, snapshots)| {
                let problem = if read_data {
                    store.read_chunk(digest).err().map(|e| e.to_string())
                } else {
                    match store.store.stat(&store.chunk_key(digest)) {
                        Ok(Some(_)) => None,
                        Ok(None) => Some("missing from the store".to_string()),
                        Err(e) => Some(e.to_string()),
                    }
                };
                problem.map(|problem| DamagedChunk {
                    chunk: hex(digest),
                    problem,
                    snapshots: snapshots.clone(),
                })
            })
            .collect()
    });
    report.damaged = problems.into_iter().flatten().collect();
    Ok(report)
}

/// A guest range where two snapshots differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChangedRange {
    pub start: u64,
    pub length: u64,
}

/// The guest ranges, in whole chunks, whose content differs between two snapshots (like EBS's
/// ListChangedBlocks); a range past the end of the smaller one counts as changed.
pub fn diff(a: &SnapshotIndex, b: &SnapshotIndex) -> Result<Vec<ChangedRange>> {
    if a.meta.chunk_size != b.meta.chunk_size {
        return Err(Error::invalid(
            "the snapshots have different chunk sizes: they cannot be compared chunk by chunk",
        ));
    }
    let cs = a.meta.chunk_size;
    let end = a.meta.virtual_size.max(b.meta.virtual_size);
    let mut out: Vec<ChangedRange> = Vec::new();
    for i in 0..a.chunks.len().max(b.chunks.len()) {
        if a.chunks.get(i) == b.chunks.get(i) {
            continue;
        }
        let start = i as u64 * cs;
        let length = cs.min(end - start);
        match out.last_mut() {
            Some(last) if last.start + last.length == start => last.length += length,
            _ => out.push(ChangedRange { start, length }),
        }
    }
    Ok(out)
}

fn missing(name: &Path) -> Error {
    Error::corrupt(name, "chunk", 0, "missing from the store")
}

/// Checks a chunk's guest bytes against the digest that names it.
fn check_content(name: &Path, data: &[u8], digest: &[u8; 32]) -> Result<()> {
    if &diskkit_formats::digest::sha256(data) == digest {
        Ok(())
    } else {
        Err(Error::corrupt(
            name,
            "chunk data",
            0,
            "content does not match the chunk's name (damaged)",
        ))
    }
}

/// A chunk object of a local store, opened straight from its file, with its size: then it is
/// read in one read of that size, where the object layer (stat, zeroed buffer, read through the
/// runtime, copy) cost a tenth of a restore's CPU time, and an unsized `read_to_end` took ten
/// reads a chunk. `None` when the file does not exist.
fn open_chunk_file(path: &Path, name: &Path) -> Result<Option<(std::fs::File, usize)>> {
    // The largest object a chunk can be: the largest chunk stored as is, its header, and
    // room for a sealed store's nonce and tag. Anything larger is not read.
    const LIMIT: u64 = chunk_store::MAX_CHUNK_SIZE + 64 * 1024;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, "open", e)),
    };
    let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
    // A device or a pipe under a chunk's name has no size to trust.
    if !meta.is_file() {
        return Err(Error::corrupt(name, "chunk", 0, "not a regular file"));
    }
    if meta.len() > LIMIT {
        return Err(Error::corrupt(
            name,
            "chunk",
            0,
            format!(
                "{} bytes is larger than any chunk object ({LIMIT})",
                meta.len()
            ),
        ));
    }
    // Exactly the size seen is read: a file that changed meanwhile fails its checks after.
    Ok(Some((file, meta.len() as usize)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_files_are_opened_only_when_regular() {
        let dir = tempfile::tempdir().unwrap();
        let name = Path::new("store#chunk");
        let file = dir.path().join("chunk");
        assert!(open_chunk_file(&file, name).unwrap().is_none());
        std::fs::write(&file, b"DKCHUNK1 and more").unwrap();
        assert_eq!(open_chunk_file(&file, name).unwrap().unwrap().1, 17);
        // A directory (or a device, a pipe) under a chunk's name is refused, not read.
        let e = open_chunk_file(dir.path(), name).unwrap_err().to_string();
        assert!(
            e.contains("not a regular file") && e.contains("store#chunk"),
            "{e}"
        );
    }

    #[test]
    fn ids_and_digests_are_checked() {
        assert!(is_id(&"ab".repeat(16)));
        assert!(!is_id("../../etc/passwd"));
        assert!(!is_id(&"AB".repeat(16)));
        assert_eq!(parse_digest(&"0f".repeat(32)), Some([0x0f; 32]));
        assert_eq!(parse_digest("zz"), None);
        assert_eq!(parse_digest(&"g0".repeat(32)), None);
    }
}

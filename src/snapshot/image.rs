//! A snapshot as an image (`STORE#ID`): chunks fetched, checked and decompressed on demand, so a
//! snapshot converts, hashes, compares or uploads without a restore step. Restore itself is a
//! conversion from this image.

use super::SnapshotStore;
use crate::storage::Settings;
use diskkit_formats::chunk_store::{ChunkData, HOLE, SnapshotIndex};
use diskkit_formats::image::check_guest_range;
use diskkit_formats::{Extent, ExtentKind, Format, Image, ImageInfo, Result};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

type ChunkSlot = Arc<OnceLock<Option<Arc<ChunkData>>>>;

/// Decoded chunks kept for readers that come back to the same chunk (the convert engine reads
/// a chunk in several pieces, from several threads).
const CACHED_CHUNKS: usize = 16;

pub struct SnapshotImage {
    store: Arc<SnapshotStore>,
    id: String,
    index: SnapshotIndex,
    /// Most recently used last; a slot is filled by the reader that loads the chunk (empty
    /// while it loads; `None` when the load failed).
    cache: Mutex<Vec<(u64, ChunkSlot)>>,
}

impl SnapshotImage {
    /// Opens snapshot `id` (or a unique prefix) of the store at `url`.
    pub fn open(
        url: &str,
        id: &str,
        settings: &Settings,
        profile: Option<&str>,
        key: Option<super::Crypto>,
    ) -> Result<SnapshotImage> {
        let store = SnapshotStore::open(url, settings, profile, key, None)?;
        Self::of(store, id)
    }

    pub fn of(store: SnapshotStore, id: &str) -> Result<SnapshotImage> {
        Self::of_shared(Arc::new(store), id)
    }

    /// Snapshot `id` of a store that other images read too (the disks of a bundle).
    pub fn of_shared(store: Arc<SnapshotStore>, id: &str) -> Result<SnapshotImage> {
        let id = store.resolve(id)?;
        let index = store.index(&id)?;
        Ok(SnapshotImage {
            store,
            id,
            index,
            cache: Mutex::new(Vec::new()),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn index(&self) -> &SnapshotIndex {
        &self.index
    }

    /// The decoded chunk `i`. Readers that want the same chunk at once (grains of one chunk
    /// read by several threads) share one fetch: the first loads it, the others wait for it.
    fn chunk(&self, i: u64) -> Result<Arc<ChunkData>> {
        let slot = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            match cache.iter().position(|(c, _)| *c == i) {
                Some(at) => {
                    // Most recently used last.
                    let entry = cache.remove(at);
                    let slot = entry.1.clone();
                    cache.push(entry);
                    slot
                }
                None => {
                    if cache.len() >= CACHED_CHUNKS {
                        cache.remove(0);
                    }
                    let slot = Arc::new(OnceLock::new());
                    cache.push((i, slot.clone()));
                    slot
                }
            }
        };
        if let Some(Some(data)) = slot.get() {
            return Ok(data.clone());
        }
        let mut failure = None;
        let loaded = slot.get_or_init(|| match self.load_chunk(i) {
            Ok(data) => Some(data),
            Err(e) => {
                failure = Some(e);
                None
            }
        });
        match (loaded, failure) {
            (Some(data), _) => Ok(data.clone()),
            (None, Some(e)) => {
                self.forget(i);
                Err(e)
            }
            // Another reader's load failed: try again, for this reader's own error.
            (None, None) => self.load_chunk(i),
        }
    }

    /// Fetches, checks and decodes chunk `i`.
    fn load_chunk(&self, i: u64) -> Result<Arc<ChunkData>> {
        let digest = self.index.chunks[i as usize];
        let data = Arc::new(self.store.read_chunk(&digest)?);
        let cs = self.index.meta.chunk_size;
        let expected = cs.min(self.index.meta.virtual_size - i * cs);
        if data.len() as u64 != expected {
            return Err(diskkit_formats::Error::corrupt(
                &PathBuf::from(self.name()),
                "snapshot chunk",
                i * cs,
                format!("holds {} bytes, the chunk needs {expected}", data.len()),
            ));
        }
        Ok(data)
    }

    /// Drops chunk `i` from the cache (its load failed: a later read tries again).
    fn forget(&self, i: u64) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|(c, _)| *c != i);
    }

    fn name(&self) -> String {
        format!("{}#{}", self.store.url(), self.id)
    }
}

impl Image for SnapshotImage {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.index.meta.virtual_size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_guest_range(self.virtual_size(), offset, 1)?;
        let cs = self.index.meta.chunk_size;
        let end = offset + max_len.min(self.virtual_size() - offset);
        let hole = |i: u64| self.index.chunks[i as usize] == HOLE;
        let first = offset / cs;
        let kind_is_hole = hole(first);
        let mut i = first + 1;
        while i * cs < end && hole(i) == kind_is_hole {
            i += 1;
        }
        Ok(Extent {
            start: offset,
            length: (i * cs).min(end) - offset,
            kind: if kind_is_hole {
                ExtentKind::Zero
            } else {
                ExtentKind::Compressed
            },
            depth: 0,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.virtual_size(), offset, buf.len() as u64)?;
        let cs = self.index.meta.chunk_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let i = pos / cs;
            let within = (pos - i * cs) as usize;
            let n = (buf.len() - done).min(cs as usize - within);
            if self.index.chunks[i as usize] == HOLE {
                buf[done..done + n].fill(0);
            } else {
                let data = self.chunk(i)?;
                buf[done..done + n].copy_from_slice(&data[within..within + n]);
            }
            done += n;
        }
        Ok(())
    }

    /// A range inside one stored chunk is handed out from the decoded chunk, which saves the
    /// copy into the reader's buffer (a tenth of a restore's time).
    fn with_mapped(&self, offset: u64, len: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool> {
        check_guest_range(self.virtual_size(), offset, len)?;
        let cs = self.index.meta.chunk_size;
        let i = offset / cs;
        let within = (offset - i * cs) as usize;
        if len == 0 || within as u64 + len > cs || self.index.chunks[i as usize] == HOLE {
            return Ok(false);
        }
        let data = self.chunk(i)?;
        f(&data[within..within + len as usize]);
        Ok(true)
    }

    /// Whole chunks: each costs a request and a decompression.
    fn optimal_transfer(&self) -> u64 {
        self.index.meta.chunk_size
    }

    fn info(&self) -> ImageInfo {
        let mut info = ImageInfo::basic(
            PathBuf::from(self.name()),
            Format::Raw,
            self.virtual_size(),
            0,
        );
        info.format = "diskkit-snapshot".into();
        info.cluster_size = Some(self.index.meta.chunk_size);
        info.format_specific = Some(serde_json::json!({
            "type": "diskkit-snapshot",
            "data": {
                "id": self.id,
                "name": self.index.meta.name,
                "source-format": self.index.meta.source_format,
                "created": self.index.meta.created,
                "parent": self.index.meta.parent,
                "digest": self.index.meta.digest,
                "tags": self.index.meta.tags,
            }
        }));
        info
    }
}

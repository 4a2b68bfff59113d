//! An object in a bucket read in place as an image of any format: [`ObjectFile`] is the
//! formats crate's [`RemoteFile`] over [`Store::read_at`], so every driver (qcow2, VHD, VHDX,
//! VMDK, raw, ISO) reads a bucket object with ranged requests exactly as it reads a local file.
//!
//! Drivers read metadata in small pieces (headers, L2 and grain tables, compressed clusters,
//! directory records): those reads are served from a small LRU of aligned blocks, so a run of
//! them costs one request. Large reads (guest data) go to the store directly.
//!
//! An image read from a bucket never opens a local file: the files its metadata names (backing
//! files, data files, VMDK extents, parents) are refused, since a name inside an object says
//! nothing trustworthy about this host ([`ImplicitOpens::Refuse`] semantics). Such images are
//! pulled with their siblings, or converted to stand alone, before being read.

use super::{Location, Settings, Store};
use diskkit_formats::backing::{BackingOpener, Role};
use diskkit_formats::host::{HostFile, RemoteFile};
use diskkit_formats::{Error, Format, Image, OpenOptions, Result};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Bytes of one cached block: a few qcow2 compressed clusters or VMDK grains, many tables.
const BLOCK: u64 = 256 << 10;
/// Blocks kept: 8 MiB per open object.
const CACHED_BLOCKS: usize = 32;

/// True when `source` names an object in a bucket (`s3://`, `oss://`, `obs://`, `file://`)
/// rather than a local file.
pub fn is_bucket_url(source: &str) -> bool {
    ["s3://", "oss://", "obs://", "file://"]
        .iter()
        .any(|p| source.starts_with(p))
}

/// An object read with ranged requests, small reads served from cached blocks.
pub struct ObjectFile {
    store: Box<dyn Store>,
    key: String,
    size: u64,
    /// Most recently used last.
    blocks: Mutex<Vec<(u64, Arc<Vec<u8>>)>>,
}

impl ObjectFile {
    /// The object at `location` (which must exist) in `store`.
    pub fn open(store: Box<dyn Store>, location: &Location) -> Result<ObjectFile> {
        if location.is_prefix() {
            return Err(Error::invalid(format!(
                "{}: names a prefix, not an object",
                location.url()
            )));
        }
        let meta = store
            .stat(&location.key)?
            .ok_or_else(|| store.no_such_object(&location.key))?;
        Ok(ObjectFile {
            store,
            key: location.key.clone(),
            size: meta.size,
            blocks: Mutex::new(Vec::with_capacity(CACHED_BLOCKS)),
        })
    }

    /// Block `index`, from the cache or the store.
    fn block(&self, index: u64, what: &str) -> Result<Arc<Vec<u8>>> {
        let lock = || self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut blocks = lock();
            if let Some(k) = blocks.iter().position(|(i, _)| *i == index) {
                let hit = blocks.remove(k);
                let data = hit.1.clone();
                blocks.push(hit);
                return Ok(data);
            }
        }
        // Fetched without the lock: other readers go on meanwhile (two may fetch one block).
        let start = index * BLOCK;
        let mut data = vec![0; (self.size - start).min(BLOCK) as usize];
        self.fetch(&mut data, start, what)?;
        let data = Arc::new(data);
        let mut blocks = lock();
        if blocks.len() >= CACHED_BLOCKS {
            blocks.remove(0);
        }
        blocks.push((index, data.clone()));
        Ok(data)
    }

    fn fetch(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        self.store
            .read_at(&self.key, buf, offset)
            .map_err(|e| match e {
                Error::Storage {
                    kind, url, message, ..
                } => Error::Storage {
                    kind,
                    url,
                    op: format!("read {what} at {offset:#x}"),
                    message,
                },
                e => e,
            })
    }
}

impl RemoteFile for ObjectFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        if buf.len() as u64 >= BLOCK {
            return self.fetch(buf, offset, what);
        }
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let block = self.block(at / BLOCK, what)?;
            let from = (at % BLOCK) as usize;
            let n = (buf.len() - done).min(block.len().saturating_sub(from));
            if n == 0 {
                return Err(Error::storage(
                    diskkit_formats::ErrorKind::Network,
                    self.store.url(&self.key),
                    format!("read {what} at {at:#x}"),
                    "the object is shorter than when it was opened",
                ));
            }
            buf[done..done + n].copy_from_slice(&block[from..from + n]);
            done += n;
        }
        Ok(())
    }
}

/// Refuses every file an image's metadata names: see the module documentation.
struct StandAlone;

impl BackingOpener for StandAlone {
    fn open_file(
        &mut self,
        referrer: &Path,
        named: &Path,
        role: Role,
        _warnings: &mut Vec<String>,
    ) -> Result<HostFile> {
        Err(Error::invalid(format!(
            "{}: {} {} not opened: an image read from a bucket must stand alone (pull it with \
             the files it names, then read it locally)",
            referrer.display(),
            role.name(),
            named.display()
        )))
    }

    fn open_image(&mut self, file: HostFile, _format: Option<Format>) -> Result<Box<dyn Image>> {
        // open_file refuses everything, so no file reaches here.
        Err(Error::invalid(format!(
            "{}: an image read from a bucket must stand alone",
            file.path().display()
        )))
    }
}

/// Opens the object `url` as an image, read in place (`opts` as for local files: `-f`, `-l`).
/// Connection settings come from `settings`, then the environment and the default profile.
pub fn open_object_image(
    url: &str,
    settings: &Settings,
    opts: &OpenOptions,
) -> Result<Box<dyn Image>> {
    diskkit_formats::open_file(open_object_file(url, settings)?, opts, &mut StandAlone)
}

/// The object `url` as a file read in place with ranged requests.
pub fn open_object_file(url: &str, settings: &Settings) -> Result<HostFile> {
    let location = Location::parse(url)?;
    let settings = settings.clone().resolve(location.scheme, None)?;
    let store = super::open(&location, &settings)?;
    let object = ObjectFile::open(store, &location)?;
    Ok(HostFile::from_remote(
        Path::new(&location.url()),
        Box::new(object),
    ))
}

/// Checks the metadata of the image in the object `url` (format `format`, or detected), read
/// in place: `check` of a bucket object without downloading it. Returns the format and the
/// report (`None` when the format has no checks). Nothing is repaired in a bucket.
pub fn check_object(
    url: &str,
    settings: &Settings,
    format: Option<Format>,
) -> Result<(Format, Option<diskkit_formats::CheckReport>)> {
    let file = open_object_file(url, settings)?;
    let format = match format {
        Some(f) => f,
        None => diskkit_formats::detect(&file)?,
    };
    let report = diskkit_formats::check::check_file(format, file, None, &mut StandAlone)?;
    Ok((format, report))
}

//! One item, done by the engine in this process: convert, push, pull or snapshot create, with
//! the same engine calls as the commands of those names.

use super::jobfile::{Item, Operation};
use crate::convert::{ConvertOptions, convert_to_path};
use crate::hash::hash_image;
use crate::progress::Progress;
use crate::storage::push::{self, PushOptions};
use crate::storage::{Location, Settings, Store, pull};
use diskkit_formats::digest::{DEFAULT_CHUNK_SIZE, hex};
use diskkit_formats::{Error, Format, Image, ImplicitOpens, OpenOptions, Result, open_with};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// What a finished item produced.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub digest: Option<String>,
}

/// What every item of a run shares: connection settings, one open store per bucket, the policy
/// for files images name, and the upload parallelism the memory budget allows.
pub struct Context {
    pub settings: Settings,
    pub profile: Option<String>,
    pub implicit_opens: ImplicitOpens,
    /// Parts in flight per push (and ranged reads per pull).
    pub parallel: usize,
    /// Bytes per second at most, per push item.
    pub rate_limit: Option<u64>,
    stores: Mutex<HashMap<String, Arc<dyn Store>>>,
}

impl Context {
    pub fn new(
        settings: Settings,
        profile: Option<String>,
        implicit_opens: ImplicitOpens,
        parallel: usize,
        rate_limit: Option<u64>,
    ) -> Context {
        Context {
            settings,
            profile,
            implicit_opens,
            parallel: parallel.max(1),
            rate_limit,
            stores: Mutex::new(HashMap::new()),
        }
    }

    /// The store of `url`'s bucket, opened once per run.
    fn store(&self, url: &str) -> Result<(Location, Arc<dyn Store>)> {
        let location = Location::parse(url)?;
        let bucket = location.with_key("").url();
        let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = stores.get(&bucket) {
            return Ok((location, s.clone()));
        }
        let settings = self
            .settings
            .clone()
            .resolve(location.scheme, self.profile.as_deref())?;
        let store: Arc<dyn Store> = Arc::from(crate::storage::open(&location, &settings)?);
        stores.insert(bucket, store.clone());
        Ok((location, store))
    }

    fn open(&self, path: &str) -> Result<Box<dyn Image>> {
        open_with(
            Path::new(path),
            &OpenOptions::default(),
            self.implicit_opens,
        )
    }

    /// Runs `item` once, reporting guest bytes to `progress`.
    pub fn execute(&self, item: &Item, key: &str, progress: &dyn Progress) -> Result<Outcome> {
        match item.operation {
            Operation::Convert => self.convert(item, progress),
            Operation::Push => self.push(item, key, progress),
            Operation::Pull => self.pull(item, progress),
            Operation::Snapshot => self.snapshot(item, progress),
        }
    }

    fn convert(&self, item: &Item, progress: &dyn Progress) -> Result<Outcome> {
        let src = self.open(&item.source)?;
        let (format, mut create) = item.output(Format::Raw)?;
        let dst = Path::new(&item.destination);
        make_parent(dst)?;
        // The shared read pool: K conversions at once take turns on the same threads.
        convert_to_path(
            src.as_ref(),
            format,
            dst,
            &mut create,
            &ConvertOptions::default(),
            progress,
        )?;
        drop(src);
        let out = self.open(&item.destination)?;
        let digest = hash_image(
            out.as_ref(),
            DEFAULT_CHUNK_SIZE,
            &crate::progress::NoProgress,
            None,
        )?;
        Ok(Outcome {
            bytes_in: digest.virtual_size,
            bytes_out: file_size(dst)?,
            digest: Some(hex(&digest.digest)),
        })
    }

    fn push(&self, item: &Item, key: &str, progress: &dyn Progress) -> Result<Outcome> {
        let src = self.open(&item.source)?;
        let (format, mut create) = item.output(Format::Raw)?;
        let (location, store) = self.store(&item.destination)?;
        let export = push::plan(
            src.as_ref(),
            format,
            &mut create,
            &crate::progress::NoProgress,
        )?;
        let opts = PushOptions {
            part_size: None,
            parallel: self.parallel,
            source_name: Path::new(&item.source)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            // The item key covers the source's identity and the output's options; the layout
            // fingerprint, what the object's bytes are made of.
            identity: format!("batch item {key} layout={}", export.layout_fingerprint()),
            rate_limit: self.rate_limit,
        };
        let report = push::push(
            store.as_ref(),
            &location,
            export.as_ref(),
            &opts,
            progress,
            &crate::progress::NoProgress,
        )?;
        let manifest = store
            .read_small(&crate::storage::manifest_key(&location.key))?
            .ok_or_else(|| store.no_such_object(&crate::storage::manifest_key(&location.key)))?;
        let manifest = push::ObjectManifest::from_json(&manifest)?;
        Ok(Outcome {
            bytes_in: src.virtual_size(),
            bytes_out: report.object_size,
            digest: Some(hex(&manifest.guest.digest)),
        })
    }

    fn pull(&self, item: &Item, progress: &dyn Progress) -> Result<Outcome> {
        let (location, store) = self.store(&item.source)?;
        let (format, mut create) = item.output(Format::Raw)?;
        let dst = Path::new(&item.destination);
        make_parent(dst)?;
        let mut opts = pull::PullOptions {
            format: item.format.map(|_| format),
            create: &mut create,
            threads: self.parallel,
            verify: true,
        };
        let verified = pull::pull(store.as_ref(), &location, dst, &mut opts, progress)?;
        let digest = match verified {
            pull::Verified::Manifest(d) => Some(d),
            _ => None,
        };
        let size = file_size(dst)?;
        Ok(Outcome {
            bytes_in: size,
            bytes_out: size,
            digest,
        })
    }

    fn snapshot(&self, item: &Item, progress: &dyn Progress) -> Result<Outcome> {
        use crate::snapshot::{CreateOptions, Crypto, SnapshotStore, create};
        let src = self.open(&item.source)?;
        let key = Crypto::from_user(None)?;
        let store = SnapshotStore::open(
            &item.destination,
            &self.settings,
            self.profile.as_deref(),
            key,
            None,
        )?;
        let report = create(
            &store,
            src.as_ref(),
            Path::new(&item.source),
            &CreateOptions::default(),
            progress,
        )?;
        Ok(Outcome {
            bytes_in: src.virtual_size(),
            bytes_out: report.bytes_stored,
            digest: Some(report.digest),
        })
    }
}

fn make_parent(dst: &Path) -> Result<()> {
    match dst.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create", e))
        }
        _ => Ok(()),
    }
}

fn file_size(path: &Path) -> Result<u64> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| Error::io(path, "stat", e))
}

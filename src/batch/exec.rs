//! One item, done by the engine in this process: convert, push, pull or snapshot create, with
//! the same engine calls as the commands of those names.

use super::jobfile::{BundleDisks, Item, Operation, bundle_destination};
use super::state::BUNDLE_DIGEST;
use crate::convert::{ConvertOptions, convert_to_path_with_digest};
use crate::gce::{self, GceStream, Tarball};
use crate::hash::{ImageHash, hash_image};
use crate::preflight::{self, Status};
use crate::progress::Progress;
use crate::storage::push::{self, PushOptions};
use crate::storage::{Location, Settings, Store, open_object_image, pull};
use crate::targets::Output;
use diskkit_formats::digest::{Algorithm, ChunkHasher, DEFAULT_CHUNK_SIZE, hex};
use diskkit_formats::error::ErrorKind;
use diskkit_formats::write::{CacheMode, CreateOptions};
use diskkit_formats::{
    Error, Format, Image, ImageStream, ImplicitOpens, OpenOptions, Result, open_with,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// What a finished item produced.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub digest: Option<OutputDigest>,
}

/// The digest of an item's output, and the definition that says what it is a digest of.
#[derive(Debug, Clone)]
pub struct OutputDigest {
    pub definition: &'static str,
    /// Lowercase hex.
    pub hex: String,
}

impl OutputDigest {
    fn guest(hash: &ImageHash) -> OutputDigest {
        OutputDigest {
            definition: hash.algorithm.definition(),
            hex: hex(&hash.digest),
        }
    }
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
    /// The guest digest convert items record. Push and snapshot items record the SHA-256 guest
    /// digest, pull items the definition of the object's manifest, bundle items their manifest's
    /// digest ([`BUNDLE_DIGEST`]).
    pub digest: Algorithm,
    stores: Mutex<HashMap<String, Arc<dyn Store>>>,
}

impl Context {
    pub fn new(
        settings: Settings,
        profile: Option<String>,
        implicit_opens: ImplicitOpens,
        parallel: usize,
        rate_limit: Option<u64>,
        digest: Algorithm,
    ) -> Context {
        Context {
            settings,
            profile,
            implicit_opens,
            parallel: parallel.max(1),
            rate_limit,
            digest,
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
            Operation::Bundle => self.bundle(item, progress),
        }
    }

    fn convert(&self, item: &Item, progress: &dyn Progress) -> Result<Outcome> {
        let src = self.open(&item.source)?;
        let (output, mut create) = item.output(Format::Raw)?;
        // A worker writes output after output that nothing reads right away: with direct I/O
        // (qemu's cache=none, what OpenStack converts images with) they neither evict the page
        // cache nor pay for the kernel's copy into it, which was two fifths of a batch
        // conversion's CPU time. Still synced before the rename.
        create.cache = CacheMode::None;
        preflight(item, src.as_ref(), &output, &create)?;
        let dst = Path::new(&item.destination);
        make_parent(dst)?;
        let format = match output {
            Output::Image { format, .. } => format,
            Output::GceTarball => {
                let tar = Tarball::of(src.as_ref(), Path::new(&item.source))?;
                gce::write_file(&tar, dst, None, create.cache, progress)?;
                return Ok(Outcome {
                    bytes_in: src.virtual_size(),
                    bytes_out: file_size(dst)?,
                    digest: Some(guest_digest(tar.disk(), self.digest, DEFAULT_CHUNK_SIZE)?),
                });
            }
        };
        // The shared read pool: K conversions at once take turns on the same threads. The digest
        // of the done record is taken from what the conversion writes, not read back.
        let (_, hash) = convert_to_path_with_digest(
            src.as_ref(),
            format,
            dst,
            &mut create,
            &ConvertOptions::default(),
            ChunkHasher::without_crc(self.digest, DEFAULT_CHUNK_SIZE)?,
            progress,
        )?;
        Ok(Outcome {
            bytes_in: hash.virtual_size,
            bytes_out: file_size(dst)?,
            digest: Some(OutputDigest::guest(&hash)),
        })
    }

    fn push(&self, item: &Item, key: &str, progress: &dyn Progress) -> Result<Outcome> {
        let src = self.open(&item.source)?;
        let (output, mut create) = item.output(Format::Raw)?;
        preflight(item, src.as_ref(), &output, &create)?;
        let (location, store) = self.store(&item.destination)?;
        let export: Box<dyn ImageStream + '_> = match output {
            Output::Image { format, .. } => push::plan(
                src.as_ref(),
                format,
                &mut create,
                &crate::progress::NoProgress,
            )?,
            Output::GceTarball => Box::new(GceStream::plan(
                Tarball::of(src.as_ref(), Path::new(&item.source))?,
                &crate::progress::NoProgress,
            )?),
        };
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
            digest: Some(OutputDigest {
                definition: manifest.guest.definition(),
                hex: manifest.guest.digest_hex(),
            }),
        })
    }

    fn pull(&self, item: &Item, progress: &dyn Progress) -> Result<Outcome> {
        let (location, store) = self.store(&item.source)?;
        let (format, mut create) = item.image_output(Format::Raw)?;
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
            pull::Verified::Manifest { definition, digest } => Some(OutputDigest {
                definition,
                hex: digest,
            }),
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
            digest: Some(OutputDigest {
                definition: Algorithm::Sha256.definition(),
                hex: report.digest,
            }),
        })
    }
}

/// Opens the source of `item` as an image, as `batch check` does before anything runs: a local
/// file, or an object (pull) read in place through ranged requests.
pub fn open_source(
    item: &Item,
    settings: &Settings,
    implicit_opens: ImplicitOpens,
) -> Result<Box<dyn Image>> {
    if item.operation.local_source() {
        open_with(
            Path::new(&item.source),
            &OpenOptions::default(),
            implicit_opens,
        )
    } else {
        open_object_image(&item.source, settings, &OpenOptions::default())
    }
}

/// Runs the pre-flight checks of an item with a target on what it is about to write, as convert
/// and push do: a failed rule fails the item (permanently: the same source fails again).
fn preflight(item: &Item, src: &dyn Image, output: &Output, create: &CreateOptions) -> Result<()> {
    let Some(cloud) = item.target else {
        return Ok(());
    };
    let path = Path::new(&item.source);
    let report = preflight::check_planned(cloud, src, path, output, create, None);
    if !report.failed() {
        return Ok(());
    }
    let failed: Vec<String> = report
        .checks
        .iter()
        .filter(|f| f.status == Status::Fail)
        .map(|f| format!("{}: {}", f.rule, f.reason))
        .collect();
    Err(Error::invalid(format!(
        "{}: pre-flight checks for target {} failed: {}",
        path.display(),
        cloud.name(),
        failed.join("; ")
    )))
}

/// The guest digest of `image` by `algorithm`, in chunks of `chunk_size`.
fn guest_digest(image: &dyn Image, algorithm: Algorithm, chunk_size: u64) -> Result<OutputDigest> {
    let hash = hash_image(
        image,
        algorithm,
        chunk_size,
        &crate::progress::NoProgress,
        None,
    )?;
    Ok(OutputDigest::guest(&hash))
}

impl Context {
    /// A bundle of the source (system disk) and the data disks of `options`, created in the
    /// store (made if absent, as `bundle create` does). A bundle of that name that exists
    /// already with the same disk contents is this item done by an earlier run that died before
    /// recording it; with other contents it is a permanent failure.
    fn bundle(&self, item: &Item, progress: &dyn Progress) -> Result<Outcome> {
        use crate::bundle::{self, DiskInput, NewBundle, NewDisk, Role};
        use crate::snapshot::{Crypto, DEFAULT_CHUNK_SIZE as STORE_CHUNK, NewStore, SnapshotStore};
        let (store_url, name) = bundle_destination(&item.destination)?;
        let disks = BundleDisks::parse(&item.options, Path::new("/"))?;
        let mut images = vec![(
            Role::System,
            disks.system_device.clone(),
            self.open(&item.source)?,
            item.source.clone(),
        )];
        for (device, path) in &disks.data {
            images.push((Role::Data, device.clone(), self.open(path)?, path.clone()));
        }
        let new = NewStore {
            chunk_size: STORE_CHUNK,
            encrypt: false,
        };
        let store = SnapshotStore::open(
            store_url,
            &self.settings,
            self.profile.as_deref(),
            Crypto::from_user(None)?,
            Some(new),
        )?;
        let new_disks: Vec<NewDisk<'_>> = images
            .iter()
            .map(|(role, device, image, path)| NewDisk {
                role: *role,
                device: device.clone(),
                input: DiskInput::Image(image.as_ref(), Path::new(path)),
            })
            .collect();
        let manifest =
            match bundle::create(&store, name, &new_disks, &NewBundle::default(), progress) {
                Ok((manifest, _)) => manifest,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let manifest = bundle::load(&store, name)?;
                    let same =
                        manifest.disks.len() == images.len()
                            && manifest.disks.iter().zip(&images).all(
                                |(d, (_, device, image, _))| {
                                    d.device == *device
                                        // A snapshot's digest is at its store's chunk size.
                                        && guest_digest(
                                            image.as_ref(),
                                            Algorithm::Sha256,
                                            store.chunk_size(),
                                        )
                                            .is_ok_and(|g| g.hex == d.digest)
                                },
                            );
                    if !same {
                        return Err(e);
                    }
                    manifest
                }
                Err(e) => return Err(e),
            };
        Ok(Outcome {
            bytes_in: images.iter().map(|(_, _, i, _)| i.virtual_size()).sum(),
            bytes_out: manifest.disks.iter().map(|d| d.virtual_size).sum(),
            digest: Some(OutputDigest {
                definition: BUNDLE_DIGEST,
                hex: manifest.digest,
            }),
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

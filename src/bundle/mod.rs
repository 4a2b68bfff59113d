//! Bundles: the file-side form of a cloud's machine images (a system disk image, a data disk
//! image, a full-ECS image: a system disk plus a snapshot of every data disk, an ISO image), kept
//! in a snapshot store under one manifest.
//!
//! A bundle is the object `bundles/<NAME>` of a snapshot store ([`crate::snapshot`]): a JSON
//! [`Manifest`] naming one snapshot per disk. It is written last, only if no bundle of that
//! name exists (create-if-absent), after every snapshot it names is stored; the snapshots are
//! ordinary snapshots of the store, so `snapshot ls`, `gc` and `verify` see them.
//!
//! # Manifest, version 1
//!
//! ```json
//! {"format": "diskkit-bundle", "version": 1, "name": "web", "kind": "full-ecs",
//!  "created": 1765000000,
//!  "disks": [{"role": "system", "device": "vda", "snapshot": "<32 hex>",
//!             "virtual_size": 1073741824, "source_format": "qcow2", "digest": "<64 hex>"}],
//!  "firmware": "uefi", "os": "Debian 13", "tags": {"env": "prod"},
//!  "digest": "<64 hex>"}
//! ```
//!
//! - `kind` follows from the disks' roles: `system-disk` (one system disk), `data-disk` (data
//!   disks only), `full-ecs` (a system disk and data disks), `iso` (one ISO).
//! - `disks` in order (the system disk first); `device` is the guest's name for it (`vda`,
//!   `xvdb`: lowercase letters and digits); `digest` is the snapshot's guest digest.
//! - `digest` is the SHA-256 of the manifest's compact JSON with `digest` set to `""`: a
//!   manifest that does not match it is refused as damaged.
//! - A reader refuses other formats, versions, unknown fields, unknown kinds and roles, more
//!   than [`MAX_DISKS`] disks and manifests over [`MAX_MANIFEST`] bytes.

pub mod ova;
pub mod share;

use crate::progress::Progress;
use crate::snapshot::{self, DiskSource, SnapshotImage, SnapshotStore};
use diskkit_formats::chunk_store::{HOLE, SnapshotIndex};
use diskkit_formats::digest::hex;
use diskkit_formats::error::ErrorKind;
use diskkit_formats::{Error, Image, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "diskkit-bundle";
pub const VERSION: u32 = 1;
/// Disks a bundle may have (clouds attach at most 64 data disks to an instance).
pub const MAX_DISKS: usize = 65;
/// Bytes a manifest may have.
pub const MAX_MANIFEST: u64 = 1 << 20;
/// Where manifests live in the store.
const BUNDLES: &str = "bundles/";

/// What a cloud would call the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    SystemDisk,
    DataDisk,
    FullEcs,
    Iso,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::SystemDisk => "system-disk",
            Kind::DataDisk => "data-disk",
            Kind::FullEcs => "full-ecs",
            Kind::Iso => "iso",
        }
    }

    /// The kind of a bundle whose disks have `roles`.
    pub fn of(roles: &[Role]) -> Result<Kind> {
        let count = |r: Role| roles.iter().filter(|&&x| x == r).count();
        let (system, data, iso) = (count(Role::System), count(Role::Data), count(Role::Iso));
        match (system, data, iso) {
            (0, 0, 0) => Err(Error::invalid("a bundle needs at least one disk")),
            (0, 0, 1) => Ok(Kind::Iso),
            (_, _, i) if i > 0 => Err(Error::invalid(
                "an ISO image holds only the ISO: make a separate bundle for the disks",
            )),
            (s, _, _) if s > 1 => Err(Error::invalid("a bundle has at most one system disk")),
            (1, 0, _) => Ok(Kind::SystemDisk),
            (0, _, _) => Ok(Kind::DataDisk),
            _ => Ok(Kind::FullEcs),
        }
    }
}

/// What a disk is to the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    System,
    Data,
    Iso,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Data => "data",
            Role::Iso => "iso",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    Bios,
    Uefi,
}

impl std::str::FromStr for Firmware {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "bios" => Ok(Firmware::Bios),
            "uefi" => Ok(Firmware::Uefi),
            _ => Err(format!("'{s}': firmware is bios or uefi")),
        }
    }
}

/// One disk of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub role: Role,
    pub device: String,
    pub snapshot: String,
    pub virtual_size: u64,
    pub source_format: String,
    pub digest: String,
}

/// A bundle's manifest (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub name: String,
    pub kind: Kind,
    pub created: u64,
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub firmware: Option<Firmware>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub digest: String,
}

impl Manifest {
    /// The digest over the manifest with its `digest` field empty.
    fn compute_digest(&self) -> Result<String> {
        let mut unsigned = self.clone();
        unsigned.digest.clear();
        let bytes = serde_json::to_vec(&unsigned).map_err(|e| Error::invalid(e.to_string()))?;
        Ok(hex(&Sha256::digest(&bytes)))
    }

    /// The manifest's bytes, its digest set.
    pub fn encode(&mut self) -> Result<Vec<u8>> {
        self.digest = self.compute_digest()?;
        serde_json::to_vec_pretty(self).map_err(|e| Error::invalid(e.to_string()))
    }

    /// Parses and checks a manifest read from `name`.
    pub fn decode(name: &Path, bytes: &[u8]) -> Result<Manifest> {
        let corrupt = |reason: String| Error::corrupt(name, "bundle manifest", 0, reason);
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(corrupt(format!(
                "{} bytes, more than {MAX_MANIFEST}",
                bytes.len()
            )));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if m.format != FORMAT || m.version != VERSION {
            return Err(Error::unsupported(
                name,
                format!(
                    "bundle format {} version {} (this diskkit knows {FORMAT} {VERSION})",
                    m.format, m.version
                ),
            ));
        }
        if m.disks.len() > MAX_DISKS {
            return Err(corrupt(format!(
                "{} disks, more than {MAX_DISKS}",
                m.disks.len()
            )));
        }
        check_name(&m.name).map_err(|e| corrupt(e.to_string()))?;
        let roles: Vec<Role> = m.disks.iter().map(|d| d.role).collect();
        let kind = Kind::of(&roles).map_err(|e| corrupt(e.to_string()))?;
        if kind != m.kind {
            return Err(corrupt(format!(
                "kind {} does not match its disks ({})",
                m.kind.name(),
                kind.name()
            )));
        }
        let mut devices = BTreeSet::new();
        for d in &m.disks {
            check_device(&d.device).map_err(|e| corrupt(e.to_string()))?;
            if !devices.insert(d.device.as_str()) {
                return Err(corrupt(format!("device {} twice", d.device)));
            }
            if !snapshot::is_id(&d.snapshot) {
                return Err(corrupt(format!(
                    "disk {}: '{}' is not a snapshot id",
                    d.device, d.snapshot
                )));
            }
        }
        if m.compute_digest()? != m.digest {
            return Err(corrupt(
                "the digest does not match the manifest (damaged)".into(),
            ));
        }
        Ok(m)
    }

    pub fn disk(&self, device: &str) -> Result<&Disk> {
        self.disks
            .iter()
            .find(|d| d.device == device)
            .ok_or_else(|| {
                let devices: Vec<&str> = self.disks.iter().map(|d| d.device.as_str()).collect();
                Error::invalid(format!(
                    "bundle {} has no disk {device} (its disks: {})",
                    self.name,
                    devices.join(", ")
                ))
            })
    }

    pub fn virtual_size(&self) -> u64 {
        self.disks.iter().map(|d| d.virtual_size).sum()
    }
}

/// Bundle names: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`: they are object
/// names and the stem of restored file names.
pub fn check_name(name: &str) -> Result<()> {
    let ok = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "'{name}': a bundle name is 1 to 128 letters, digits, '.', '_' or '-', not starting \
             with '.' or '-'"
        )))
    }
}

/// Device names: 1 to 16 lowercase letters and digits, starting with a letter (`vda`, `xvdb`).
pub fn check_device(device: &str) -> Result<()> {
    let ok = (1..=16).contains(&device.len())
        && device.starts_with(|c: char| c.is_ascii_lowercase())
        && device
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "'{device}': a device name is 1 to 16 lowercase letters and digits, starting with a \
             letter (vda, xvdb)"
        )))
    }
}

fn manifest_object(name: &str) -> String {
    format!("{BUNDLES}{name}")
}

/// The manifest of bundle `name`.
pub fn load(store: &SnapshotStore, name: &str) -> Result<Manifest> {
    check_name(name)?;
    let object = manifest_object(name);
    let bytes = store
        .read_object(&object, MAX_MANIFEST)?
        .ok_or_else(|| Error::invalid(format!("{}: no bundle {name}", store.url())))?;
    let m = Manifest::decode(&PathBuf::from(format!("{}/{object}", store.url())), &bytes)?;
    if m.name != name {
        return Err(Error::corrupt(
            &PathBuf::from(format!("{}/{object}", store.url())),
            "bundle manifest",
            0,
            format!("names bundle {}, not {name}", m.name),
        ));
    }
    Ok(m)
}

/// The names of every bundle in the store.
pub fn names(store: &SnapshotStore) -> Result<Vec<String>> {
    let mut names: Vec<String> = store
        .list_names(BUNDLES)?
        .into_iter()
        .filter(|n| check_name(n).is_ok())
        .collect();
    names.sort();
    Ok(names)
}

/// Where a new bundle's disk comes from.
pub enum DiskInput<'a> {
    /// An image, snapshotted into the store (its file, for the snapshot's source identity).
    Image(&'a dyn Image, &'a Path),
    /// A snapshot the store already holds (id or unique prefix), referenced as is.
    Snapshot(String),
}

pub struct NewDisk<'a> {
    pub role: Role,
    pub device: String,
    pub input: DiskInput<'a>,
}

/// What a new bundle records besides its disks.
#[derive(Debug, Clone, Default)]
pub struct NewBundle {
    pub firmware: Option<Firmware>,
    pub os: Option<String>,
    pub tags: BTreeMap<String, String>,
}

/// Creates bundle `name`: snapshots every disk given as an image (in parallel, deduplicated
/// together), then writes the manifest last, only if no bundle of that name exists.
pub fn create(
    store: &SnapshotStore,
    name: &str,
    disks: &[NewDisk<'_>],
    meta: &NewBundle,
    progress: &dyn Progress,
) -> Result<(Manifest, Vec<snapshot::CreateReport>)> {
    check_name(name)?;
    if disks.len() > MAX_DISKS {
        return Err(Error::invalid(format!(
            "{} disks: a bundle has at most {MAX_DISKS}",
            disks.len()
        )));
    }
    let roles: Vec<Role> = disks.iter().map(|d| d.role).collect();
    let kind = Kind::of(&roles)?;
    let mut devices = BTreeSet::new();
    for d in disks {
        check_device(&d.device)?;
        if !devices.insert(d.device.as_str()) {
            return Err(Error::invalid(format!("device {} given twice", d.device)));
        }
    }
    if store
        .read_object(&manifest_object(name), MAX_MANIFEST)?
        .is_some()
    {
        return Err(exists(store, name));
    }
    let sources: Vec<DiskSource<'_>> = disks
        .iter()
        .filter_map(|d| match &d.input {
            DiskInput::Image(image, path) => Some(DiskSource {
                image: *image,
                source: path,
                opts: snapshot::CreateOptions {
                    name: Some(format!("{name}/{}", d.device)),
                    tags: BTreeMap::from([
                        ("bundle".to_string(), name.to_string()),
                        ("role".to_string(), d.role.name().to_string()),
                    ]),
                    ..Default::default()
                },
            }),
            DiskInput::Snapshot(_) => None,
        })
        .collect();
    let reports = snapshot::create_set(store, &sources, progress)?;
    let mut made = reports.iter();
    let mut entries = Vec::with_capacity(disks.len());
    for d in disks {
        let id = match &d.input {
            DiskInput::Image(..) => made
                .next()
                .map(|r| r.id.clone())
                .ok_or_else(|| Error::invalid("bundle create: a disk's snapshot is missing"))?,
            DiskInput::Snapshot(prefix) => store.resolve(prefix)?,
        };
        let index = store.index(&id)?;
        entries.push(Disk {
            role: d.role,
            device: d.device.clone(),
            snapshot: id,
            virtual_size: index.meta.virtual_size,
            source_format: index.meta.source_format.clone(),
            digest: index.meta.digest.clone(),
        });
    }
    let mut manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        name: name.to_string(),
        kind,
        created: now_secs(),
        disks: entries,
        firmware: meta.firmware,
        os: meta.os.clone(),
        tags: meta.tags.clone(),
        digest: String::new(),
    };
    write_manifest(store, &mut manifest)?;
    Ok((manifest, reports))
}

fn exists(store: &SnapshotStore, name: &str) -> Error {
    Error::storage(
        ErrorKind::AlreadyExists,
        format!("{}/{}", store.url(), manifest_object(name)),
        "create bundle",
        format!("bundle {name} already exists (bundle rm it first, or choose another name)"),
    )
}

/// Writes a manifest only if no bundle of its name exists.
fn write_manifest(store: &SnapshotStore, manifest: &mut Manifest) -> Result<()> {
    let bytes = manifest.encode()?;
    match store.create_object(&manifest_object(&manifest.name), bytes) {
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(exists(store, &manifest.name)),
        other => other,
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One bundle as `ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    pub kind: Kind,
    /// `role:device` of each disk, in order.
    pub disks: Vec<String>,
    pub virtual_size: u64,
    /// Guest bytes of the distinct data chunks of its disks (before compression; chunks shared
    /// with other bundles counted too).
    pub stored_size: u64,
    pub created: u64,
}

/// The distinct data chunks of `manifest`'s disks, and their indexes.
fn chunks_of(
    store: &SnapshotStore,
    manifest: &Manifest,
) -> Result<(BTreeSet<[u8; 32]>, Vec<SnapshotIndex>)> {
    let mut chunks = BTreeSet::new();
    let mut indexes = Vec::with_capacity(manifest.disks.len());
    for d in &manifest.disks {
        let index = store.index(&d.snapshot)?;
        chunks.extend(index.chunks.iter().filter(|c| **c != HOLE));
        indexes.push(index);
    }
    Ok((chunks, indexes))
}

/// Every bundle of the store, by name.
pub fn list(store: &SnapshotStore) -> Result<Vec<Summary>> {
    let mut out = Vec::new();
    for name in names(store)? {
        let m = load(store, &name)?;
        let (chunks, _) = chunks_of(store, &m)?;
        out.push(Summary {
            kind: m.kind,
            disks: m
                .disks
                .iter()
                .map(|d| format!("{}:{}", d.role.name(), d.device))
                .collect(),
            virtual_size: m.virtual_size(),
            stored_size: chunks.len() as u64 * store.chunk_size(),
            created: m.created,
            name,
        });
    }
    Ok(out)
}

/// What `verify` found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct VerifyReport {
    /// Disks whose snapshot is missing or does not match the manifest.
    pub disk_problems: Vec<String>,
    pub snapshots: snapshot::VerifyReport,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.disk_problems.is_empty() && self.snapshots.is_clean()
    }
}

/// Checks the manifest (its digest), that every disk's snapshot exists and matches the manifest,
/// and every chunk (read and checked with `read_data`).
pub fn verify(store: &SnapshotStore, name: &str, read_data: bool) -> Result<VerifyReport> {
    let m = load(store, name)?;
    let mut report = VerifyReport::default();
    let mut ids = Vec::new();
    for d in &m.disks {
        match store.index(&d.snapshot) {
            Ok(index) => {
                if index.meta.digest != d.digest || index.meta.virtual_size != d.virtual_size {
                    report.disk_problems.push(format!(
                        "disk {}: snapshot {} holds another disk than the manifest says",
                        d.device, d.snapshot
                    ));
                }
                ids.push(d.snapshot.clone());
            }
            Err(e) => report
                .disk_problems
                .push(format!("disk {}: snapshot {}: {e}", d.device, d.snapshot)),
        }
    }
    report.snapshots = snapshot::verify(store, &ids, read_data)?;
    Ok(report)
}

/// What `rm` did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RemoveReport {
    pub removed: Vec<String>,
    /// Snapshots kept because other bundles use them: id → those bundles.
    pub kept: BTreeMap<String, Vec<String>>,
}

/// Removes bundle `name` and the snapshots it owns, as clouds delete an image's data-disk
/// snapshots with it; a snapshot another bundle lists is kept. The manifest goes first, so an
/// interrupted rm leaves unreferenced snapshots (freed by a later gc after `snapshot rm`), never
/// a bundle that lists a missing snapshot. `snapshot gc` then frees the chunks.
pub fn remove(store: &SnapshotStore, name: &str) -> Result<RemoveReport> {
    let m = load(store, name)?;
    let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for other in names(store)?.into_iter().filter(|n| n != name) {
        let o = load(store, &other).map_err(|e| {
            Error::invalid(format!(
                "bundle {other} cannot be read, so it may use {name}'s snapshots: nothing \
                 removed ({e})"
            ))
        })?;
        for d in o.disks {
            users.entry(d.snapshot).or_default().push(other.clone());
        }
    }
    store.delete_objects(&[manifest_object(name)])?;
    let mut report = RemoveReport::default();
    for d in &m.disks {
        match users.get(&d.snapshot) {
            Some(by) => {
                report.kept.insert(d.snapshot.clone(), by.clone());
            }
            None => {
                store.remove(&d.snapshot)?;
                report.removed.push(d.snapshot.clone());
            }
        }
    }
    Ok(report)
}

/// What `copy` did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CopyReport {
    pub disks: usize,
    /// Distinct data chunks of the copied disks.
    pub chunks: u64,
    /// Those the destination lacked, and the bytes sent for them (as stored: compressed).
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    /// The destination already held this very bundle.
    pub already_there: bool,
}

/// Copies bundle `name` from `src` to `dst` (all disks, or only the system disk): only the
/// chunks `dst` lacks are sent, each checked against its name on the way; then the indexes,
/// then the manifest. A rerun after an interruption sends only what is still missing. At the
/// end every chunk is looked for in `dst` and the manifest read back.
pub fn copy(
    src: &SnapshotStore,
    name: &str,
    dst: &SnapshotStore,
    system_only: bool,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    use rayon::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    if src.chunk_size() != dst.chunk_size() {
        return Err(Error::invalid(format!(
            "{} has {} chunks, {} has {}: a bundle is copied between stores of one chunk size",
            src.url(),
            src.chunk_size(),
            dst.url(),
            dst.chunk_size()
        )));
    }
    let mut m = load(src, name)?;
    if system_only {
        m.disks.retain(|d| d.role == Role::System);
        if m.disks.is_empty() {
            return Err(Error::invalid(format!(
                "bundle {name} has no system disk (--system-only)"
            )));
        }
        m.kind = Kind::SystemDisk;
    }
    if let Some(there) = dst.read_object(&manifest_object(name), MAX_MANIFEST)? {
        let there = Manifest::decode(Path::new(&dst.url()), &there)?;
        let mut here = m.clone();
        here.encode()?;
        if there.disks == here.disks {
            return Ok(CopyReport {
                disks: m.disks.len(),
                already_there: true,
                ..Default::default()
            });
        }
        return Err(exists(dst, name));
    }
    let _lease = dst.take_lease()?;
    let (chunks, indexes) = chunks_of(src, &m)?;
    let chunks: Vec<[u8; 32]> = chunks.into_iter().collect();
    let (sent_chunks, sent_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    crate::parallel::read_pool()?.install(|| {
        chunks.par_iter().try_for_each(|c| {
            let n = src.copy_chunk(dst, c)?;
            if n > 0 {
                sent_chunks.fetch_add(1, Ordering::Relaxed);
                sent_bytes.fetch_add(n, Ordering::Relaxed);
            }
            progress.advance(src.chunk_size());
            Ok::<_, Error>(())
        })
    })?;
    dst.sync_chunks()?;
    for (d, index) in m.disks.iter().zip(&indexes) {
        let id = dst.write_index(index)?;
        if id != d.snapshot {
            return Err(Error::invalid(format!(
                "disk {}: snapshot {} re-encodes as {id}",
                d.device, d.snapshot
            )));
        }
    }
    // Verified at the destination: every chunk and index there, before the manifest.
    let check = snapshot::verify(
        dst,
        &m.disks
            .iter()
            .map(|d| d.snapshot.clone())
            .collect::<Vec<_>>(),
        false,
    )?;
    if !check.is_clean() {
        return Err(Error::invalid(format!(
            "{}: after the copy, {} chunks and {} indexes are missing or damaged",
            dst.url(),
            check.damaged.len(),
            check.bad_indexes.len()
        )));
    }
    write_manifest(dst, &mut m)?;
    load(dst, name)?;
    Ok(CopyReport {
        disks: m.disks.len(),
        chunks: chunks.len() as u64,
        chunks_sent: sent_chunks.into_inner(),
        bytes_sent: sent_bytes.into_inner(),
        already_there: false,
    })
}

/// How restored files are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// `NAME-system.FMT`, `NAME-data-DEVICE.FMT`, `NAME.iso`
    Diskkit,
    /// `NAME_system_DEVICE.FMT`, `NAME_data_DEVICE.FMT` (the role plus the device, as
    /// Alibaba Cloud's ExportImage names a full image's disks)
    Alibaba,
    /// `PREFIX_NAME_system|data_SNAPSHOT.FMT` (Tencent Cloud's ExportImages)
    Tencent,
}

impl std::str::FromStr for Naming {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "diskkit" => Ok(Naming::Diskkit),
            "alibaba" => Ok(Naming::Alibaba),
            "tencent" => Ok(Naming::Tencent),
            _ => Err(format!("'{s}': naming is diskkit, alibaba or tencent")),
        }
    }
}

/// The file name of disk `d` of bundle `m` restored as `ext` (an ISO is always `.iso`).
pub fn file_name(m: &Manifest, d: &Disk, naming: Naming, ext: &str, prefix: &str) -> String {
    let ext = if d.role == Role::Iso { "iso" } else { ext };
    let (name, role, device) = (&m.name, d.role.name(), &d.device);
    match (naming, d.role) {
        (Naming::Diskkit, Role::Iso) => format!("{name}.iso"),
        (Naming::Diskkit, Role::System) => format!("{name}-system.{ext}"),
        (Naming::Diskkit, _) => format!("{name}-{role}-{device}.{ext}"),
        (Naming::Alibaba, _) => format!("{name}_{role}_{device}.{ext}"),
        (Naming::Tencent, _) => format!("{prefix}_{name}_{role}_{}.{ext}", d.snapshot),
    }
}

/// Disk `device` of bundle `name` as an image.
pub fn disk_image(store: SnapshotStore, name: &str, device: &str) -> Result<SnapshotImage> {
    let m = load(&store, name)?;
    let id = m.disk(device)?.snapshot.clone();
    SnapshotImage::of(store, &id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            name: "web".into(),
            kind: Kind::FullEcs,
            created: 1,
            disks: vec![
                Disk {
                    role: Role::System,
                    device: "vda".into(),
                    snapshot: "ab".repeat(16),
                    virtual_size: 1 << 20,
                    source_format: "qcow2".into(),
                    digest: "00".repeat(32),
                },
                Disk {
                    role: Role::Data,
                    device: "vdb".into(),
                    snapshot: "cd".repeat(16),
                    virtual_size: 1 << 20,
                    source_format: "raw".into(),
                    digest: "11".repeat(32),
                },
            ],
            firmware: Some(Firmware::Uefi),
            os: None,
            tags: BTreeMap::new(),
            digest: String::new(),
        }
    }

    #[test]
    fn manifests_round_trip_and_damage_is_caught() {
        let name = Path::new("m");
        let mut m = manifest();
        let bytes = m.encode().unwrap();
        assert_eq!(Manifest::decode(name, &bytes).unwrap(), m);
        let text = String::from_utf8(bytes).unwrap();
        let damaged = text.replace("\"vdb\"", "\"vdc\"");
        let e = Manifest::decode(name, damaged.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("digest"), "{e}");
        let unknown = text.replace("full-ecs", "half-ecs");
        assert!(Manifest::decode(name, unknown.as_bytes()).is_err());
        let mut wrong_kind = manifest();
        wrong_kind.kind = Kind::DataDisk;
        let bytes = wrong_kind.encode().unwrap();
        let e = Manifest::decode(name, &bytes).unwrap_err();
        assert!(e.to_string().contains("does not match its disks"), "{e}");
        let mut many = manifest();
        many.kind = Kind::DataDisk;
        many.disks = (0..100)
            .map(|i| Disk {
                role: Role::Data,
                device: format!("d{i}"),
                ..manifest().disks[1].clone()
            })
            .collect();
        let e = Manifest::decode(name, &many.encode().unwrap()).unwrap_err();
        assert!(e.to_string().contains("disks, more than"), "{e}");
        let mut escape = manifest();
        escape.disks[1].device = "../x".into();
        assert!(Manifest::decode(name, &escape.encode().unwrap()).is_err());
    }

    #[test]
    fn kinds_follow_the_disks() {
        use Role::*;
        assert_eq!(Kind::of(&[System]).unwrap(), Kind::SystemDisk);
        assert_eq!(Kind::of(&[Data, Data]).unwrap(), Kind::DataDisk);
        assert_eq!(Kind::of(&[System, Data]).unwrap(), Kind::FullEcs);
        assert_eq!(Kind::of(&[Iso]).unwrap(), Kind::Iso);
        assert!(Kind::of(&[]).is_err());
        assert!(Kind::of(&[System, System]).is_err());
        assert!(Kind::of(&[Iso, Data]).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("web-1.prod_x").is_ok());
        for bad in ["", ".hidden", "-x", "a/b", "..", "a b", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_device("xvdb").is_ok());
        for bad in ["", "Vda", "1a", "vd/a", "vd-a"] {
            assert!(check_device(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn restored_files_are_named_per_cloud() {
        let mut m = manifest();
        m.encode().unwrap();
        let (sys, data) = (&m.disks[0], &m.disks[1]);
        assert_eq!(
            file_name(&m, sys, Naming::Diskkit, "qcow2", "p"),
            "web-system.qcow2"
        );
        assert_eq!(
            file_name(&m, data, Naming::Diskkit, "raw", "p"),
            "web-data-vdb.raw"
        );
        assert_eq!(
            file_name(&m, data, Naming::Alibaba, "raw", "p"),
            "web_data_vdb.raw"
        );
        assert_eq!(
            file_name(&m, sys, Naming::Tencent, "vhd", "exp"),
            format!("exp_web_system_{}.vhd", "ab".repeat(16))
        );
    }
}

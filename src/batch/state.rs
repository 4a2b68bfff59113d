//! The shared state of a batch job: small objects under one prefix of a [`Store`] (a bucket
//! prefix or a local directory), one per item and state, so that any number of workers on any
//! number of machines share it through create-if-absent alone:
//!
//! ```text
//! STATE/job.json                    the job: item count and digest of its items (first worker)
//! STATE/claims/ITEM/GENERATION      a worker's lease on ITEM (create-if-absent; renewed)
//! STATE/done/ITEM                   the result of a finished item (ITEM: the item's key, which
//!                                   covers its source's identity: a changed source is new work)
//! STATE/failed/ID                   the last failure of an item (ID: the item as the job file
//!                                   writes it; removed when the item succeeds)
//! STATE/workers/WORKER              one worker's counters, for status
//! ```
//!
//! Listing one state is one paginated listing of its prefix, whatever the number of items; a
//! worker lists `done/`, `failed/` and `claims/` once per pass, never per item. Claims are
//! deleted when their item is recorded, so `claims/` holds only items in flight (and those of
//! dead workers until taken over).

use super::lease::{Claim, WorkerId};
use crate::storage::{Location, Settings, Store};
use diskkit_formats::digest::Algorithm;
use diskkit_formats::error::ErrorKind;
use diskkit_formats::{Error, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// Largest state object read: each holds one item's record.
const MAX_RECORD: u64 = 64 << 10;
/// Highest claim generation: one more than that many takeovers of one item is refused.
const MAX_GENERATION: u32 = 999_999;

/// `STATE/job.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobRecord {
    pub items: usize,
    /// SHA-256 (hex) of the items' canonical forms in order: a state belongs to one job file.
    pub digest: String,
    /// Seconds since 1970 when the first worker started.
    pub created: u64,
}

/// `STATE/done/ITEM` or `STATE/failed/ITEM`: what became of an item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemRecord {
    /// The item's key (its work) and its id (its place in the job file).
    pub key: String,
    pub id: String,
    pub line: usize,
    pub operation: String,
    pub source: String,
    pub destination: String,
    /// `done` or `failed`.
    pub state: String,
    /// Guest bytes of the source.
    #[serde(default)]
    pub bytes_in: u64,
    /// Bytes written (file or object size; stored bytes for a snapshot).
    #[serde(default)]
    pub bytes_out: u64,
    /// Digest (hex) of what was written: for convert, push, pull and snapshot items the guest
    /// digest, of the definition `digest_definition` names.
    #[serde(default)]
    pub digest: Option<String>,
    /// `diskkit-guest-blake3-v1`, `diskkit-guest-sha256-v1` or, for a bundle,
    /// [`BUNDLE_DIGEST`]. Records written before it existed lack it: see
    /// [`ItemRecord::infer_digest_definition`].
    #[serde(default)]
    pub digest_definition: Option<String>,
    /// Seconds since 1970 (with fractions).
    pub started: f64,
    pub finished: f64,
    pub attempts: u32,
    pub worker: String,
    /// For a failure: the error kind (`CorruptImage`, `Network`...), whether a retry may help,
    /// and the message.
    #[serde(default)]
    pub error_kind: Option<String>,
    #[serde(default)]
    pub retryable: bool,
    #[serde(default)]
    pub message: Option<String>,
}

/// What a bundle item's digest is: the SHA-256 of its manifest (see `bundle`), which names every
/// disk's guest digest.
pub const BUNDLE_DIGEST: &str = "diskkit-bundle-manifest-sha256";

impl ItemRecord {
    /// Names the definition of a digest recorded before records named it: a bundle's manifest
    /// digest, or else the SHA-256 guest digest, the only one diskkit recorded then.
    pub fn infer_digest_definition(&mut self) {
        if self.digest.is_some() && self.digest_definition.is_none() {
            let definition = match self.operation.as_str() {
                "bundle" => BUNDLE_DIGEST,
                _ => Algorithm::Sha256.definition(),
            };
            self.digest_definition = Some(definition.to_string());
        }
    }
}

/// `STATE/workers/WORKER`: counters of one worker process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub worker: String,
    pub started: f64,
    pub updated: f64,
    pub done: u64,
    pub failed: u64,
    /// Guest bytes of the items done.
    pub bytes: u64,
    pub finished: bool,
}

/// The state store of one job.
pub struct State {
    store: Box<dyn Store>,
    prefix: String,
    url: String,
}

/// The claims found by one listing: item → highest generation.
pub type Claims = HashMap<String, u32>;

impl State {
    /// Opens the state at `url` (a directory, created when missing, or a bucket prefix).
    pub fn open(url: &str, settings: &Settings, profile: Option<&str>) -> Result<State> {
        if !url.contains("://") || url.starts_with("file://") {
            let dir = url.strip_prefix("file://").unwrap_or(url);
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.as_ref(), "create", e))?;
        }
        let location = Location::parse(url)?;
        let settings = settings.clone().resolve(location.scheme, profile)?;
        let store = crate::storage::open(&location, &settings)?;
        let mut prefix = location.key.clone();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(State {
            url: location.with_key(&prefix).url(),
            store,
            prefix,
        })
    }

    /// The state's URL, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    fn claim_key(item: &str, generation: u32) -> String {
        format!("claims/{item}/{generation:06}")
    }

    /// Reads a small JSON object; `None` when absent.
    fn read<T: DeserializeOwned>(&self, rel: &str) -> Result<Option<T>> {
        let key = self.key(rel);
        let Some(meta) = self.store.stat(&key)? else {
            return Ok(None);
        };
        if meta.size > MAX_RECORD {
            return Err(Error::storage(
                ErrorKind::InvalidArgument,
                self.store.url(&key),
                "read state",
                format!(
                    "{} bytes: not a batch state object (at most {MAX_RECORD})",
                    meta.size
                ),
            ));
        }
        let mut buf = vec![0; meta.size as usize];
        match self.store.read_at(&key, &mut buf, 0) {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            r => r?,
        }
        serde_json::from_slice(&buf).map(Some).map_err(|e| {
            Error::storage(
                ErrorKind::InvalidArgument,
                self.store.url(&key),
                "read state",
                format!("not a batch state object: {e}"),
            )
        })
    }

    fn json<T: Serialize>(value: &T) -> Vec<u8> {
        serde_json::to_vec(value).unwrap_or_default()
    }

    /// Item names under `dir/` (one listing).
    fn names(&self, dir: &str) -> Result<Vec<String>> {
        let prefix = self.key(&format!("{dir}/"));
        Ok(self
            .store
            .list(&prefix)?
            .into_iter()
            .filter_map(|e| e.key.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }

    /// Records the job at the first run; later runs must bring the same items.
    pub fn check_job(&self, job: &JobRecord) -> Result<JobRecord> {
        let key = self.key("job.json");
        match self.store.create_if_absent(&key, Self::json(job)) {
            Ok(()) => return Ok(job.clone()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let recorded: JobRecord = self
            .read("job.json")?
            .ok_or_else(|| self.store.no_such_object(&key))?;
        if recorded.digest != job.digest || recorded.items != job.items {
            return Err(Error::storage(
                ErrorKind::InvalidArgument,
                self.store.url(&key),
                "check job",
                format!(
                    "this state belongs to another job file ({} items, digest {}; this one has \
                     {} items, digest {}): give each job file its own --state",
                    recorded.items, recorded.digest, job.items, job.digest
                ),
            ));
        }
        Ok(recorded)
    }

    /// The job record, when a worker has started.
    pub fn job(&self) -> Result<Option<JobRecord>> {
        self.read("job.json")
    }

    pub fn done(&self) -> Result<HashSet<String>> {
        Ok(self.names("done")?.into_iter().collect())
    }

    pub fn failed(&self) -> Result<HashSet<String>> {
        Ok(self.names("failed")?.into_iter().collect())
    }

    /// Every claimed item with its highest generation.
    pub fn claims(&self) -> Result<Claims> {
        let mut claims = Claims::new();
        for name in self.names("claims")? {
            let Some((item, generation)) = name.split_once('/') else {
                continue;
            };
            let Ok(generation) = generation.parse::<u32>() else {
                continue;
            };
            let slot = claims.entry(item.to_string()).or_insert(generation);
            *slot = (*slot).max(generation);
        }
        Ok(claims)
    }

    pub fn read_claim(&self, item: &str, generation: u32) -> Result<Option<Claim>> {
        self.read(&Self::claim_key(item, generation))
    }

    /// Takes generation `generation` of `item`'s claim; false when another worker has it.
    pub fn create_claim(&self, item: &str, generation: u32, claim: &Claim) -> Result<bool> {
        if generation > MAX_GENERATION {
            return Err(Error::invalid(format!(
                "{}: item {item} was taken over {MAX_GENERATION} times",
                self.url
            )));
        }
        let key = self.key(&Self::claim_key(item, generation));
        match self.store.create_if_absent(&key, Self::json(claim)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Extends a claim this worker holds.
    pub fn renew_claim(&self, item: &str, generation: u32, claim: &Claim) -> Result<()> {
        let key = self.key(&Self::claim_key(item, generation));
        self.store.write(&key, Self::json(claim))
    }

    /// Removes every generation of `item`'s claim up to `generation`.
    pub fn release(&self, item: &str, generation: u32) -> Result<()> {
        let keys: Vec<String> = (0..=generation)
            .map(|g| self.key(&Self::claim_key(item, g)))
            .collect();
        self.store.delete(&keys)
    }

    pub fn is_done(&self, item: &str) -> Result<bool> {
        Ok(self
            .store
            .stat(&self.key(&format!("done/{item}")))?
            .is_some())
    }

    /// Records an item's result: done (and any earlier failure forgotten) or failed.
    pub fn record(&self, record: &ItemRecord) -> Result<()> {
        if record.state == "done" {
            self.store.write(
                &self.key(&format!("done/{}", record.key)),
                Self::json(record),
            )?;
            self.store
                .delete(&[self.key(&format!("failed/{}", record.id))])
        } else {
            self.store.write(
                &self.key(&format!("failed/{}", record.id)),
                Self::json(record),
            )
        }
    }

    /// The record `name` (a key in `done`, an id in `failed`).
    pub fn item_record(&self, dir: &str, name: &str) -> Result<Option<ItemRecord>> {
        self.read(&format!("{dir}/{name}"))
    }

    pub fn item_names(&self, dir: &str) -> Result<Vec<String>> {
        self.names(dir)
    }

    pub fn write_worker(&self, record: &WorkerRecord) -> Result<()> {
        self.store.write(
            &self.key(&format!("workers/{}", record.worker)),
            Self::json(record),
        )
    }

    pub fn workers(&self) -> Result<Vec<WorkerRecord>> {
        let mut out = Vec::new();
        for name in self.names("workers")? {
            if let Some(w) = self.read(&format!("workers/{name}"))? {
                out.push(w);
            }
        }
        Ok(out)
    }

    /// A claim this process may take over: expired, or left by a dead process of this host.
    pub fn claim_is_stale(claim: &Claim, me: &WorkerId, now: f64) -> bool {
        claim.expires < now || claim.worker.is_dead_process_of(me)
    }
}

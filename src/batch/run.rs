//! `batch run`: one worker. It claims the items of its shard one by one (K at once), runs each
//! with retries for retryable errors, records the result in the state and releases the claim;
//! with `steal`, it then takes the unclaimed or stale items of the other shards.

use super::exec::{Context, Outcome};
use super::jobfile::Item;
use super::keys::{item_id, item_key, job_digest};
use super::lease::{Claim, WorkerId, now};
use super::shard::Shard;
use super::state::{Claims, ItemRecord, JobRecord, State, WorkerRecord};
use crate::progress::Progress;
use diskkit_formats::error::ErrorKind;
use diskkit_formats::{Error, Result};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How the event log is written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    /// One JSON object per line.
    Json,
}

pub struct RunOptions {
    pub shard: Shard,
    /// Items run at once.
    pub jobs: usize,
    /// Retries of an item after a retryable error.
    pub retries: u32,
    /// Stop taking new items once more than this many failed permanently in this run.
    pub max_failed: Option<u64>,
    pub steal: bool,
    /// Retry items whose last failure was permanent (default: skipped as failed).
    pub retry_failed: bool,
    /// How long a claim lives without renewal.
    pub lease: Duration,
    /// First retry delay; doubled per retry up to 32 times it.
    pub backoff: Duration,
    pub log: LogFormat,
    /// Progress lines at this interval.
    pub progress_every: Option<Duration>,
}

/// What a worker did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Items this worker completed.
    pub done: u64,
    /// Items found done already.
    pub already_done: u64,
    /// Items that failed with an error a retry cannot fix (in this run, or recorded before and
    /// not retried).
    pub failed_permanent: u64,
    /// Items that still failed with retryable errors after the retries.
    pub failed_retryable: u64,
    /// Items live workers held (they finish them).
    pub held_elsewhere: u64,
    /// `max_failed` was exceeded: items were left untouched.
    pub stopped: bool,
}

/// Counters a worker keeps while it runs.
#[derive(Default)]
struct Counters {
    done: AtomicU64,
    already_done: AtomicU64,
    failed_permanent: AtomicU64,
    failed_retryable: AtomicU64,
    held_elsewhere: AtomicU64,
    bytes: AtomicU64,
}

/// Guest bytes of one running item, for progress lines.
struct ItemProgress {
    bytes: AtomicU64,
}

impl Progress for ItemProgress {
    fn advance(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Relaxed);
    }
}

/// A claim this worker holds.
struct Held {
    generation: u32,
    line: usize,
}

struct Worker<'a> {
    items: &'a [Item],
    /// Per item: its key (its work: claims and done records) and its id (failure records).
    keys: Vec<String>,
    ids: Vec<String>,
    state: &'a State,
    ctx: &'a Context,
    opts: &'a RunOptions,
    me: WorkerId,
    started: f64,
    counters: Counters,
    held: Mutex<HashMap<String, Held>>,
    running: Mutex<HashMap<usize, Arc<ItemProgress>>>,
    stop: AtomicBool,
    log: Mutex<std::io::Stderr>,
}

/// What claiming found.
enum Claimed {
    Mine(u32),
    Busy,
    Done,
}

/// Runs the items of `items` that `opts.shard` (and `opts.steal`) give this worker.
pub fn run(items: &[Item], state: &State, ctx: &Context, opts: &RunOptions) -> Result<Summary> {
    let keys: Vec<String> = items.iter().map(item_key).collect();
    let ids: Vec<String> = items.iter().map(item_id).collect();
    let w = Worker {
        items,
        keys,
        ids,
        state,
        ctx,
        opts,
        me: WorkerId::current(),
        started: now(),
        counters: Counters::default(),
        held: Mutex::new(HashMap::new()),
        running: Mutex::new(HashMap::new()),
        stop: AtomicBool::new(false),
        log: Mutex::new(std::io::stderr()),
    };
    w.with_retries("record the job", || {
        state.check_job(&JobRecord {
            items: items.len(),
            digest: job_digest(items),
            created: now() as u64,
        })
    })?;
    w.emit(
        "worker-started",
        None,
        serde_json::json!({"shard": opts.shard.to_string()}),
    );
    let finished = (Mutex::new(false), Condvar::new());
    let result = std::thread::scope(|s| {
        s.spawn(|| w.ticker(&finished));
        let r = w.work();
        *finished.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        finished.1.notify_all();
        r
    });
    let record = w.worker_record(true);
    // The counters are for status; a worker whose work is recorded is not failed for them.
    let _ = w.state.write_worker(&record);
    result?;
    let c = &w.counters;
    let summary = Summary {
        done: c.done.load(Relaxed),
        already_done: c.already_done.load(Relaxed),
        failed_permanent: c.failed_permanent.load(Relaxed),
        failed_retryable: c.failed_retryable.load(Relaxed),
        held_elsewhere: c.held_elsewhere.load(Relaxed),
        stopped: w.stop.load(Relaxed),
    };
    w.emit(
        "worker-finished",
        None,
        serde_json::json!({
            "done": summary.done, "already_done": summary.already_done,
            "failed_permanent": summary.failed_permanent,
            "failed_retryable": summary.failed_retryable,
            "held_elsewhere": summary.held_elsewhere,
        }),
    );
    Ok(summary)
}

/// The delay before retry `attempt` (from 1): `base` doubled per attempt, at most 32 times
/// `base`, with up to a quarter more at random so that workers do not retry in step.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let d = base * (1u32 << attempt.saturating_sub(1).min(5));
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos()) as u64;
    d + d.mul_f64((jitter % 1000) as f64 / 4000.0)
}

impl Worker<'_> {
    /// Runs `f`, retrying retryable failures of the state store with backoff for about two
    /// minutes: the store is shared by every worker, and a short outage must not fail them.
    fn with_retries<T>(&self, what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let mut attempt = 0;
        loop {
            match f() {
                Err(e) if e.kind().is_retryable() && attempt < 8 => {
                    attempt += 1;
                    self.emit(
                        "state-retry",
                        None,
                        serde_json::json!({"what": what, "attempt": attempt, "error": e.to_string()}),
                    );
                    std::thread::sleep(
                        backoff(Duration::from_secs(1), attempt).min(Duration::from_secs(30)),
                    );
                }
                r => return r,
            }
        }
    }

    fn work(&self) -> Result<()> {
        let (done, _, claims) = self.listings()?;
        let mine: Vec<usize> = (0..self.items.len())
            .filter(|&i| self.opts.shard.contains(i))
            .collect();
        self.pass(&mine, &done, &claims)?;
        if !self.opts.steal {
            return Ok(());
        }
        // Stealing: the other shards' items nobody holds, until none is left.
        let mut attempted = HashSet::new();
        while !self.stop.load(Relaxed) {
            let (done, failed, claims) = self.listings()?;
            let mut free = Vec::new();
            for i in 0..self.items.len() {
                let key = &self.keys[i];
                if self.opts.shard.contains(i)
                    || done.contains(key)
                    || failed.contains(&self.ids[i])
                    || attempted.contains(&i)
                {
                    continue;
                }
                let stale = match claims.get(key) {
                    None => true,
                    Some(&g) => {
                        match self.with_retries("read a claim", || self.state.read_claim(key, g))? {
                            None => true,
                            Some(c) => State::claim_is_stale(&c, &self.me, now()),
                        }
                    }
                };
                if stale {
                    free.push(i);
                }
            }
            if free.is_empty() {
                break;
            }
            attempted.extend(free.iter().copied());
            self.pass(&free, &done, &claims)?;
        }
        Ok(())
    }

    fn listings(&self) -> Result<(HashSet<String>, HashSet<String>, Claims)> {
        let done = self.with_retries("list done items", || self.state.done())?;
        let failed = self.with_retries("list failed items", || self.state.failed())?;
        let claims = self.with_retries("list claims", || self.state.claims())?;
        Ok((done, failed, claims))
    }

    /// Runs `positions` on `jobs` threads. Items listed done are counted and skipped; the
    /// first error of the state store stops the pass and is returned.
    fn pass(&self, positions: &[usize], done: &HashSet<String>, claims: &Claims) -> Result<()> {
        let mut queue = VecDeque::new();
        for &i in positions {
            if done.contains(&self.keys[i]) {
                self.counters.already_done.fetch_add(1, Relaxed);
            } else {
                queue.push_back(i);
            }
        }
        let queue = Mutex::new(queue);
        let first_error = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..self.opts.jobs.max(1) {
                s.spawn(|| {
                    loop {
                        if self.stop.load(Relaxed) {
                            break;
                        }
                        let Some(i) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
                        else {
                            break;
                        };
                        let hint = claims.get(&self.keys[i]).copied();
                        if let Err(e) = self.item(i, hint) {
                            self.stop.store(true, Relaxed);
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            break;
                        }
                    }
                });
            }
        });
        match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Claims item `i`, runs it and records it. Errors are the state store's only.
    fn item(&self, i: usize, hint: Option<u32>) -> Result<()> {
        let key = &self.keys[i];
        let item = &self.items[i];
        let generation = match self.claim(key, item.line, hint)? {
            Claimed::Mine(g) => g,
            Claimed::Busy => {
                self.counters.held_elsewhere.fetch_add(1, Relaxed);
                return Ok(());
            }
            Claimed::Done => {
                self.counters.already_done.fetch_add(1, Relaxed);
                return Ok(());
            }
        };
        self.held.lock().unwrap_or_else(|p| p.into_inner()).insert(
            key.clone(),
            Held {
                generation,
                line: item.line,
            },
        );
        let result = self.claimed(i, key, generation);
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        result
    }

    /// Runs a claimed item unless it was finished meanwhile or failed permanently before.
    fn claimed(&self, i: usize, key: &str, generation: u32) -> Result<()> {
        let item = &self.items[i];
        if self.with_retries("check an item", || self.state.is_done(key))? {
            self.counters.already_done.fetch_add(1, Relaxed);
            return self.with_retries("release a claim", || self.state.release(key, generation));
        }
        if !self.opts.retry_failed {
            // Listed or not: another worker may have recorded it since the listing. A failure
            // of another version of the source does not count.
            let id = &self.ids[i];
            let before =
                self.with_retries("read a failure", || self.state.item_record("failed", id))?;
            if let Some(f) = before.filter(|f| !f.retryable && f.key == key) {
                self.counters.failed_permanent.fetch_add(1, Relaxed);
                self.emit(
                    "skipped",
                    Some(i),
                    serde_json::json!({"reason": "failed permanently before (--retry-failed retries it)",
                                       "error_kind": f.error_kind, "message": f.message}),
                );
                return self.expire(key, generation, item.line);
            }
        }
        let progress = Arc::new(ItemProgress {
            bytes: AtomicU64::new(0),
        });
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(i, progress.clone());
        let started = now();
        self.emit(
            "started",
            Some(i),
            serde_json::json!({"generation": generation}),
        );
        let mut attempts = 0;
        let result = loop {
            attempts += 1;
            progress.bytes.store(0, Relaxed);
            match self.ctx.execute(item, key, progress.as_ref()) {
                Err(e) if e.kind().is_retryable() && attempts <= self.opts.retries => {
                    let wait = backoff(self.opts.backoff, attempts);
                    self.emit(
                        "retry",
                        Some(i),
                        serde_json::json!({"attempt": attempts, "error_kind": format!("{:?}", e.kind()),
                                           "message": e.to_string(), "wait_seconds": wait.as_secs_f64()}),
                    );
                    std::thread::sleep(wait);
                }
                r => break r,
            }
        };
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&i);
        let record = self.record_of(i, key, started, attempts, &result);
        self.with_retries("record an item", || self.state.record(&record))?;
        match &result {
            Ok(out) => {
                self.counters.done.fetch_add(1, Relaxed);
                self.counters.bytes.fetch_add(out.bytes_in, Relaxed);
                self.emit(
                    "done",
                    Some(i),
                    serde_json::json!({"seconds": record.finished - started, "bytes_in": out.bytes_in,
                                       "bytes_out": out.bytes_out, "digest": out.digest.as_ref().map(|d| &d.hex),
                                       "digest_definition": out.digest.as_ref().map(|d| d.definition),
                                       "attempts": attempts}),
                );
                self.with_retries("release a claim", || self.state.release(key, generation))
            }
            Err(e) => {
                let retryable = e.kind().is_retryable();
                if retryable {
                    self.counters.failed_retryable.fetch_add(1, Relaxed);
                } else {
                    let n = self.counters.failed_permanent.fetch_add(1, Relaxed) + 1;
                    if self.opts.max_failed.is_some_and(|m| n > m) {
                        self.stop.store(true, Relaxed);
                    }
                }
                self.emit(
                    "failed",
                    Some(i),
                    serde_json::json!({"error_kind": format!("{:?}", e.kind()), "retryable": retryable,
                                       "message": e.to_string(), "attempts": attempts}),
                );
                // The claim stays, expired: a rerun takes it over at once.
                self.expire(key, generation, item.line)
            }
        }
    }

    fn expire(&self, key: &str, generation: u32, line: usize) -> Result<()> {
        let claim = Claim {
            worker: self.me.clone(),
            expires: 0.0,
            line,
        };
        self.with_retries("expire a claim", || {
            self.state.renew_claim(key, generation, &claim)
        })
    }

    fn record_of(
        &self,
        i: usize,
        key: &str,
        started: f64,
        attempts: u32,
        result: &Result<Outcome>,
    ) -> ItemRecord {
        let item = &self.items[i];
        let mut r = ItemRecord {
            key: key.to_string(),
            id: self.ids[i].clone(),
            line: item.line,
            operation: item.operation.name().into(),
            source: item.source.clone(),
            destination: item.destination.clone(),
            state: "done".into(),
            bytes_in: 0,
            bytes_out: 0,
            digest: None,
            digest_definition: None,
            started,
            finished: now(),
            attempts,
            worker: self.me.name(),
            error_kind: None,
            retryable: false,
            message: None,
        };
        match result {
            Ok(out) => {
                r.bytes_in = out.bytes_in;
                r.bytes_out = out.bytes_out;
                r.digest = out.digest.as_ref().map(|d| d.hex.clone());
                r.digest_definition = out.digest.as_ref().map(|d| d.definition.to_string());
            }
            Err(e) => {
                r.state = "failed".into();
                r.error_kind = Some(format!("{:?}", e.kind()));
                r.retryable = e.kind().is_retryable();
                r.message = Some(e.to_string());
            }
        }
        r
    }

    /// Takes item `key`'s claim: a new one, or the next generation of a stale one.
    fn claim(&self, key: &str, line: usize, hint: Option<u32>) -> Result<Claimed> {
        let claim = Claim {
            worker: self.me.clone(),
            expires: now() + self.opts.lease.as_secs_f64(),
            line,
        };
        let mut known = hint;
        // Each round either wins or learns of a newer claim; a few rounds settle any race.
        for _ in 0..8 {
            let generation = match known {
                None => 0,
                Some(g) => {
                    match self.with_retries("read a claim", || self.state.read_claim(key, g))? {
                        // Released: claims go only once the item is done.
                        None => {
                            if self.with_retries("check an item", || self.state.is_done(key))? {
                                return Ok(Claimed::Done);
                            }
                            g
                        }
                        Some(c) if State::claim_is_stale(&c, &self.me, now()) => {
                            if c.expires > 0.0 {
                                self.emit(
                                "takeover",
                                None,
                                serde_json::json!({"key": key, "line": line, "from": c.worker.name(),
                                                   "generation": g + 1}),
                            );
                            }
                            g + 1
                        }
                        Some(_) => return Ok(Claimed::Busy),
                    }
                }
            };
            if self.with_retries("claim an item", || {
                self.state.create_claim(key, generation, &claim)
            })? {
                return Ok(Claimed::Mine(generation));
            }
            known = Some(generation);
        }
        Ok(Claimed::Busy)
    }

    fn worker_record(&self, finished: bool) -> WorkerRecord {
        let c = &self.counters;
        WorkerRecord {
            worker: self.me.name(),
            started: self.started,
            updated: now(),
            done: c.done.load(Relaxed),
            failed: c.failed_permanent.load(Relaxed) + c.failed_retryable.load(Relaxed),
            bytes: c.bytes.load(Relaxed),
            finished,
        }
    }

    /// Renews the leases of held claims, writes the worker's counters and prints progress, at
    /// their intervals, until `finished`.
    fn ticker(&self, finished: &(Mutex<bool>, Condvar)) {
        let renew_every = self.opts.lease / 3;
        let mut next_renew = std::time::Instant::now();
        let mut next_progress = self
            .opts
            .progress_every
            .map(|d| std::time::Instant::now() + d);
        let mut last_bytes = (std::time::Instant::now(), 0u64);
        let mut done = finished.0.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            let now_i = std::time::Instant::now();
            if now_i >= next_renew {
                drop(done);
                self.renew();
                next_renew = now_i + renew_every;
                done = finished.0.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if let Some(at) = next_progress
                && now_i >= at
            {
                drop(done);
                last_bytes = self.progress_line(last_bytes);
                next_progress = self.opts.progress_every.map(|d| now_i + d);
                done = finished.0.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let wake = next_progress.map_or(next_renew, |p| p.min(next_renew));
            let wait = wake.saturating_duration_since(now_i);
            done = finished
                .1
                .wait_timeout(done, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn renew(&self) {
        let held: Vec<(String, u32, usize)> = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, h)| (k.clone(), h.generation, h.line))
            .collect();
        let expires = now() + self.opts.lease.as_secs_f64();
        for (key, generation, line) in held {
            let claim = Claim {
                worker: self.me.clone(),
                expires,
                line,
            };
            if let Err(e) = self.state.renew_claim(&key, generation, &claim) {
                // The next renewal tries again; the lease outlives two missed ones.
                self.emit(
                    "lease-renewal-failed",
                    None,
                    serde_json::json!({"key": key, "message": e.to_string()}),
                );
            }
        }
        if let Err(e) = self.state.write_worker(&self.worker_record(false)) {
            self.emit(
                "state-write-failed",
                None,
                serde_json::json!({"message": e.to_string()}),
            );
        }
    }

    fn progress_line(
        &self,
        (at, bytes_then): (std::time::Instant, u64),
    ) -> (std::time::Instant, u64) {
        let running: Vec<(usize, u64)> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(&i, p)| (i, p.bytes.load(Relaxed)))
            .collect();
        let c = &self.counters;
        let bytes = c.bytes.load(Relaxed) + running.iter().map(|r| r.1).sum::<u64>();
        let secs = at.elapsed().as_secs_f64().max(1e-3);
        let rate = bytes.saturating_sub(bytes_then) as f64 / secs;
        self.emit(
            "progress",
            None,
            serde_json::json!({
                "done": c.done.load(Relaxed) + c.already_done.load(Relaxed),
                "failed": c.failed_permanent.load(Relaxed) + c.failed_retryable.load(Relaxed),
                "running": running.iter().map(|&(i, b)| serde_json::json!({"line": self.items[i].line, "bytes": b})).collect::<Vec<_>>(),
                "bytes_per_second": rate.round(),
            }),
        );
        (std::time::Instant::now(), bytes)
    }

    /// Writes one event to stderr: a JSON line, or a line of text.
    fn emit(&self, event: &str, item: Option<usize>, fields: serde_json::Value) {
        let mut obj = serde_json::Map::new();
        obj.insert(
            "time".into(),
            serde_json::json!((now() * 1000.0).round() / 1000.0),
        );
        obj.insert("event".into(), event.into());
        obj.insert("worker".into(), self.me.name().into());
        if let Some(i) = item {
            let it = &self.items[i];
            obj.insert("line".into(), it.line.into());
            obj.insert("key".into(), self.keys[i].clone().into());
            obj.insert("operation".into(), it.operation.name().into());
            obj.insert("source".into(), it.source.clone().into());
            obj.insert("destination".into(), it.destination.clone().into());
        }
        if let serde_json::Value::Object(f) = fields {
            obj.extend(f);
        }
        let line = match self.opts.log {
            LogFormat::Json => serde_json::Value::Object(obj).to_string(),
            LogFormat::Text => text_event(&obj),
        };
        let mut out = self.log.lock().unwrap_or_else(|p| p.into_inner());
        // A closed stderr must not stop the work.
        let _ = writeln!(out, "{line}");
    }
}

/// `diskkit batch: EVENT line N (SOURCE -> DESTINATION): key=value ...`
fn text_event(obj: &serde_json::Map<String, serde_json::Value>) -> String {
    let mut s = format!("diskkit batch: {}", obj["event"].as_str().unwrap_or(""));
    if let (Some(line), Some(src), Some(dst)) =
        (obj.get("line"), obj.get("source"), obj.get("destination"))
    {
        s.push_str(&format!(
            " line {line} ({} -> {})",
            src.as_str().unwrap_or(""),
            dst.as_str().unwrap_or("")
        ));
    }
    for (k, v) in obj {
        if matches!(
            k.as_str(),
            "time" | "event" | "worker" | "line" | "key" | "source" | "destination" | "operation"
        ) {
            continue;
        }
        match v {
            serde_json::Value::String(t) => s.push_str(&format!(", {k}: {t}")),
            v => s.push_str(&format!(", {k}: {v}")),
        }
    }
    s
}

/// Errors of a worker as a whole, for its exit code: retrying the worker may help when the
/// state store was unreachable.
pub fn worker_error_is_retryable(e: &Error) -> bool {
    e.kind().is_retryable() || e.kind() == ErrorKind::Interrupted
}

//! `batch status` and `batch report`: what the state says, from one listing per state prefix
//! plus the few objects that matter (live claims, failures, worker counters).

use super::lease::now;
use super::state::{ItemRecord, State};
use diskkit_formats::Result;
use rayon::prelude::*;
use serde::Serialize;

/// Failures whose records status reads (the count is always exact).
pub const MAX_FAILURES_SHOWN: usize = 1000;
/// Concurrent reads of state objects.
const READERS: usize = 16;

/// A failed item, as status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub line: usize,
    pub source: String,
    pub destination: String,
    pub error_kind: Option<String>,
    pub retryable: bool,
    pub message: Option<String>,
    pub attempts: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub state: String,
    /// Items of the job file (unknown until a worker started).
    pub items: Option<usize>,
    pub done: usize,
    pub failed: usize,
    /// Items held by a claim that has not expired.
    pub running: usize,
    /// Items neither done, failed nor running.
    pub pending: Option<usize>,
    /// Guest bytes of the items done.
    pub bytes_done: u64,
    /// From the first worker's start to the last worker's latest update.
    pub elapsed_seconds: f64,
    pub bytes_per_second: f64,
    pub items_per_second: f64,
    pub workers: usize,
    /// Workers that have not finished (or died without saying so).
    pub workers_active: usize,
    pub failures: Vec<Failure>,
}

/// Reads `names` under `dir` with a few concurrent requests.
fn records(state: &State, dir: &str, names: &[String]) -> Result<Vec<ItemRecord>> {
    let pool = crate::parallel::pool_of(READERS)?;
    let read: Result<Vec<Option<ItemRecord>>> = pool.install(|| {
        names
            .par_iter()
            .map(|n| state.item_record(dir, n))
            .collect()
    });
    Ok(read?.into_iter().flatten().collect())
}

pub fn status(state: &State) -> Result<Status> {
    let job = state.job()?;
    let done = state.item_names("done")?;
    let failed_names = state.item_names("failed")?;
    let claims = state.claims()?;
    let done_set: std::collections::HashSet<&String> = done.iter().collect();
    let now = now();
    let live: Vec<(String, u32)> = claims
        .into_iter()
        .filter(|(k, _)| !done_set.contains(k))
        .collect();
    let pool = crate::parallel::pool_of(READERS)?;
    let running: Result<Vec<bool>> = pool.install(|| {
        live.par_iter()
            .map(|(k, g)| Ok(state.read_claim(k, *g)?.is_some_and(|c| c.expires >= now)))
            .collect()
    });
    let running = running?.into_iter().filter(|&r| r).count();
    let shown = &failed_names[..failed_names.len().min(MAX_FAILURES_SHOWN)];
    let mut failures: Vec<Failure> = records(state, "failed", shown)?
        .into_iter()
        .map(|r| Failure {
            line: r.line,
            source: r.source,
            destination: r.destination,
            error_kind: r.error_kind,
            retryable: r.retryable,
            message: r.message,
            attempts: r.attempts,
        })
        .collect();
    failures.sort_by_key(|f| f.line);
    let workers = state.workers()?;
    let first = workers
        .iter()
        .map(|w| w.started)
        .fold(f64::INFINITY, f64::min);
    let last = workers.iter().map(|w| w.updated).fold(0.0, f64::max);
    let elapsed = if workers.is_empty() {
        0.0
    } else {
        (last - first).max(0.0)
    };
    let bytes_done: u64 = workers.iter().map(|w| w.bytes).sum();
    let counted = done.len() + failed_names.len() + running;
    let per_second = |n: f64| if elapsed > 0.0 { n / elapsed } else { 0.0 };
    Ok(Status {
        state: state.url().to_string(),
        items: job.as_ref().map(|j| j.items),
        done: done.len(),
        failed: failed_names.len(),
        running,
        pending: job.map(|j| j.items.saturating_sub(counted)),
        bytes_done,
        elapsed_seconds: (elapsed * 1000.0).round() / 1000.0,
        bytes_per_second: per_second(bytes_done as f64).round(),
        items_per_second: (per_second(done.len() as f64) * 1000.0).round() / 1000.0,
        workers: workers.len(),
        workers_active: workers.iter().filter(|w| !w.finished).count(),
        failures,
    })
}

/// Every recorded item (done and failed), in job-file order.
pub fn report(state: &State) -> Result<Vec<ItemRecord>> {
    let mut all = records(state, "done", &state.item_names("done")?)?;
    let done: std::collections::HashSet<String> = all.iter().map(|r| r.id.clone()).collect();
    // An item that failed, then succeeded, has both records until the failure is removed.
    let failed: Vec<String> = state
        .item_names("failed")?
        .into_iter()
        .filter(|id| !done.contains(id))
        .collect();
    all.extend(records(state, "failed", &failed)?);
    all.sort_by_key(|r| r.line);
    all.iter_mut().for_each(ItemRecord::infer_digest_definition);
    Ok(all)
}

//! Batch jobs: thousands of images converted, pushed, pulled or snapshotted by any number of
//! workers (a Slurm job array, a Kubernetes Indexed Job, an AWS Batch array job, or several runs
//! by hand), each item done exactly once, failures isolated and retried, and any run killed at any
//! point resumed by running it again.
//!
//! - [`jobfile`]: the job file (CSV or JSON Lines), checked before anything runs.
//! - [`keys`]: item keys from the item's identity (source identity, destination, work).
//! - [`shard`]: which items a worker starts with (`--shard`, scheduler environments).
//! - [`lease`]: worker identities and claims that expire.
//! - [`state`]: the shared state, small objects in a bucket prefix or a directory.
//! - [`exec`]: one item through the engine, in this process.
//! - [`run`]: the worker loop (claims, retries, records, stealing, event log).
//! - [`status`]: status and report from the state.
//!
//! No scheduler here: placing workers on machines is the cluster's job. diskkit makes each
//! worker safe to start, kill and start again.

pub mod exec;
pub mod jobfile;
pub mod keys;
pub mod lease;
pub mod run;
pub mod shard;
pub mod state;
pub mod status;

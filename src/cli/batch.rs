//! `diskkit batch`: check, run, status and report of batch jobs (the engine is `diskkit::batch`).

use super::storage::Connection;
use super::util::{Out, human_size, implicit_opens, parse_digest_algorithm, parse_size, printable};
use super::{EXIT_ERROR, EXIT_OK};
use diskkit::batch::exec::{Context, open_source};
use diskkit::batch::jobfile::{Item, JobFile};
use diskkit::batch::run::{self, LogFormat, RunOptions};
use diskkit::batch::shard::Shard;
use diskkit::batch::state::State;
use diskkit::batch::status;
use diskkit::formats::digest::Algorithm;
use diskkit::formats::{Error, Result};
use rayon::prelude::*;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

/// `batch run`: some items failed permanently (a retry of the worker cannot fix them).
pub const EXIT_ITEMS_FAILED: i32 = 3;
/// `batch run`: the worker failed, or items still failed with retryable errors; running the
/// same command again makes sense (sysexits' EX_TEMPFAIL).
pub const EXIT_RETRY: i32 = 75;

const JOB_FILE: &str = "Job file: CSV with a header line, or JSON Lines (one object per line), \
one item per line, with the fields source (path or URL), destination (path or URL), operation \
(convert, push, pull, snapshot, bundle; default convert), format (the output format, -O; \
default raw), options (as -o, e.g. cluster_size=65536,compression_type=zstd) and target (azure, \
gce...: its format and options, and its pre-flight checks, as convert --target). Absent or \
empty fields take the command's defaults. Relative paths are taken from the job file's \
directory.\n\n\
convert: local image -> new local image; push: local image -> s3://, oss://, obs:// or local \
DIR/KEY object (with its manifest); pull: object -> local image (verified); snapshot: local \
image -> an existing snapshot store (diskkit snapshot init); bundle: the source as the system \
disk and options DEVICE=IMAGE,... as data disks (system=DEVICE names the system disk's device, \
vda by default) -> STORE#NAME, a bundle in a snapshot store (made if absent).";

const EXIT_CODES: &str = "Exit codes of batch run: 0 every item of this worker is done (items \
other live workers hold are theirs); 3 some items failed permanently (corrupt or unsupported \
source, bad options...: retrying the worker cannot fix them; a Kubernetes podFailurePolicy can \
fail the index on it); 75 the worker failed (state store unreachable, items still failing \
with retryable errors after --retries): run the same command again; 2 bad arguments or job \
file.";

/// Batch jobs: convert, push, pull, snapshot or bundle thousands of images, resumably, over many workers
#[derive(clap::Args)]
#[command(
    long_about = "Batch jobs: a job file lists items (one image each); any number of \
workers (a Slurm job array, a Kubernetes Indexed Job, an AWS Batch array job, or runs by \
hand on several machines) share a state directory or bucket prefix and do every item exactly \
once. Rerunning the same command is always safe: done items are skipped, a half-done push \
resumes from its multipart checkpoint, claims of dead workers expire (and a rerun on the same \
host takes over those of its earlier processes at once).\n\n\
diskkit batch check JOBS; diskkit batch run JOBS --state STATE; diskkit batch status \
--state STATE; diskkit batch report --state STATE."
)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    Check(CheckArgs),
    Run(RunArgs),
    Status(StatusArgs),
    Report(ReportArgs),
}

/// Check a job file before anything runs: fields, duplicate destinations, missing sources,
/// unreadable images
#[derive(clap::Args)]
#[command(
    long_about = "Check JOBS: every line parses, names known fields with valid values, no two \
items write the same destination, and every source exists and opens as an image (local files, \
and the objects pull items read, opened in place with ranged requests). Errors name the line \
and the field. Exit codes: 0 the job file is good, 2 it is not.",
    after_help = JOB_FILE
)]
pub struct CheckArgs {
    /// The job file
    jobs: PathBuf,
    #[command(flatten)]
    connection: Connection,
}

/// Run a worker: claim items, run them K at once, record results in the shared state
#[derive(clap::Args)]
#[command(
    long_about = "Run one worker over JOBS with the shared state STATE (a directory, or a \
bucket prefix such as s3://bucket/jobs/migration-1/).\n\n\
Shards: --shard I/N, or the scheduler's environment: JOB_COMPLETION_INDEX (Kubernetes Indexed \
Jobs; give --shards N), SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT (Slurm job arrays), \
AWS_BATCH_JOB_ARRAY_INDEX (AWS Batch; --shards N or AWS_BATCH_JOB_ARRAY_SIZE). Shard I of N \
starts with the items at positions I, I+N, I+2N... of the job file; without a shard a worker \
takes every item (several such workers share them through their claims).\n\n\
Each item is claimed by creating a claim object (create-if-absent) holding the worker's \
identity (host, process id and start) and a lease renewed every third of --lease; a claim \
whose lease expired, or whose process on this host is gone, is taken over. Retryable errors \
(network, timeouts, throttling, server errors) are retried --retries times with backoff; \
other errors fail the item at once; a failing item never stops the others. Done items are \
recorded with their output digest, sizes and times, failed ones with the error kind and \
message. A conversion's digest is the guest digest of what it wrote, taken as it is written \
(--digest: blake3 by default, as `diskkit hash -a blake3` computes it; sha256 as plain `diskkit \
hash`); push and snapshot items record the SHA-256 guest digest, pull items the digest of the \
object's manifest, bundle items their manifest's digest. Each record names its digest's \
definition.\n\n\
Events go to stderr: one line per item started, retried, done or failed (--log-format json: \
JSON lines with the error kind), and progress lines every --progress-interval seconds (with -p, \
every 2 seconds).",
    after_help = format!("{EXIT_CODES}\n\n{JOB_FILE}")
)]
pub struct RunArgs {
    /// The job file
    jobs: PathBuf,
    /// Shared state: a directory (created if missing) or a bucket prefix (s3://BUCKET/PREFIX/)
    #[arg(long, value_name = "STATE")]
    state: String,
    /// This worker's shard, I/N (0 <= I < N) [default: from the scheduler's environment, else
    /// every item]
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// Number of shards, with an index from JOB_COMPLETION_INDEX or AWS_BATCH_JOB_ARRAY_INDEX
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// Items run at once; they share one thread pool
    #[arg(short = 'j', long = "jobs", value_name = "K", default_value_t = 2,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    jobs_at_once: usize,
    /// Guest digest recorded for conversions: blake3, or sha256 (about a third of blake3's
    /// speed per core, the default of `diskkit hash`)
    #[arg(long, value_name = "ALGORITHM", default_value = "blake3",
          value_parser = parse_digest_algorithm)]
    digest: Algorithm,
    /// Retries of an item after a retryable error (with backoff from 1 s, doubling up to 32 s)
    #[arg(long, value_name = "R", default_value_t = 5)]
    retries: u32,
    /// Stop taking new items once more than M items failed permanently in this run
    #[arg(long, value_name = "M")]
    max_failed: Option<u64>,
    /// When this worker's shard is finished, take the unclaimed or expired items of the others
    #[arg(long)]
    steal: bool,
    /// Run again the items whose last failure was permanent (default: they stay failed)
    #[arg(long)]
    retry_failed: bool,
    /// Seconds a claim lives without renewal: a dead worker's items wait this long for another
    /// host (a rerun on the same host takes them at once)
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(3..=86_400))]
    lease: u64,
    /// Memory for uploads and downloads over all items at once (parts in flight x part size)
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "256M")]
    memory: u64,
    /// Upload each push item at most RATE bytes per second (as push -r)
    #[arg(short = 'r', long, value_name = "RATE", value_parser = parse_size)]
    rate_limit: Option<u64>,
    /// Event log format on stderr
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormatArg,
    /// Progress lines every 2 seconds
    #[arg(short = 'p', long)]
    progress: bool,
    /// Seconds between progress lines [default: 30 when stderr is not a terminal, none when it
    /// is (unless -p)]
    #[arg(long, value_name = "SECS")]
    progress_interval: Option<u64>,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

/// Totals by state, throughput, elapsed time and the failures of a batch job
#[derive(clap::Args)]
#[command(
    long_about = "Show the state of a batch job: items done, failed, running (claims whose \
lease has not expired) and pending; guest bytes done, elapsed time and throughput from the \
workers' counters; and the failures with their error kind and message (the first 1000). \
--output json prints the same as one JSON object. Exit codes: 0 success, 2 error."
)]
pub struct StatusArgs {
    /// Shared state: a directory or a bucket prefix
    #[arg(long, value_name = "STATE")]
    state: String,
    /// Output format
    #[arg(long, value_enum, default_value = "human")]
    output: StatusFormat,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StatusFormat {
    Human,
    Json,
}

/// Every item's result (done and failed) as CSV or JSON
#[derive(clap::Args)]
#[command(
    long_about = "Write every recorded item's result, in job-file order: line, key, state, \
operation, source, destination, bytes in and out, digest and its definition, start and finish \
times, attempts, \
worker, and for failures the error kind and message. To stdout, or to FILE (written under a \
temporary name and renamed). Exit codes: 0 success, 2 error."
)]
pub struct ReportArgs {
    /// Shared state: a directory or a bucket prefix
    #[arg(long, value_name = "STATE")]
    state: String,
    /// Output format
    #[arg(long, value_enum, default_value = "csv")]
    output: ReportFormat,
    /// Write the report to FILE instead of stdout
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReportFormat {
    Csv,
    Json,
}

pub fn run(args: Args) -> Result<i32> {
    match args.command {
        Command::Check(a) => check(a),
        Command::Run(a) => run_worker(a),
        Command::Status(a) => show_status(a),
        Command::Report(a) => report(a),
    }
}

fn check(args: CheckArgs) -> Result<i32> {
    let job = JobFile::read(&args.jobs)?;
    let policy = implicit_opens();
    let settings = args.connection.settings();
    let problems: Vec<String> = job
        .items
        .par_iter()
        .filter_map(|item: &Item| {
            open_source(item, &settings, policy).err().map(|e| {
                format!(
                    "{}: line {}: field source: {e}",
                    args.jobs.display(),
                    item.line
                )
            })
        })
        .collect();
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("diskkit: {}", printable(p));
        }
        return Ok(EXIT_ERROR);
    }
    let mut out = Out::new();
    writeln!(
        out,
        "{}: {} items, all sources readable",
        printable(&args.jobs.display().to_string()),
        job.items.len()
    )?;
    out.flush()?;
    Ok(EXIT_OK)
}

fn run_worker(args: RunArgs) -> Result<i32> {
    // Upload threads come and go per push, each taking one of glibc's per-thread arenas, where
    // the part buffers (16 MiB) they free stay for that arena's next user: the worker's RSS
    // reached 450 MiB for 128 MiB of parts in flight. With one arena, a freed part buffer is
    // reused by the next part whichever thread makes it (185 MiB for the same run, as fast; a
    // fixed mmap threshold instead got 150 MiB but cost 2 s of system time in page faults).
    // SAFETY: mallopt only sets the allocator's tunables (under its own lock).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let job = JobFile::read(&args.jobs)?;
    let shard = match &args.shard {
        Some(s) => Shard::parse(s)?,
        None => Shard::from_env(args.shards)?.unwrap_or(Shard::ALL),
    };
    let state = State::open(
        &args.state,
        &args.connection.settings(),
        args.connection.profile(),
    );
    let state = match state {
        Ok(s) => s,
        Err(e) => return Ok(worker_failed(&e)),
    };
    let part = diskkit::storage::push::DEFAULT_PART_SIZE;
    // A part in flight is held twice (the buffer being filled and the request body).
    let parallel = (args.memory / (2 * args.jobs_at_once as u64 * part))
        .clamp(1, diskkit::storage::push::DEFAULT_PARALLEL as u64) as usize;
    let ctx = Context::new(
        args.connection.settings(),
        args.connection.profile().map(str::to_string),
        implicit_opens(),
        parallel,
        args.rate_limit,
        args.digest,
    );
    let progress_every = match (args.progress, args.progress_interval) {
        (_, Some(0)) => None,
        (_, Some(s)) => Some(Duration::from_secs(s)),
        (true, None) => Some(Duration::from_secs(2)),
        (false, None) => (!std::io::stderr().is_terminal()).then(|| Duration::from_secs(30)),
    };
    let opts = RunOptions {
        shard,
        jobs: args.jobs_at_once,
        retries: args.retries,
        max_failed: args.max_failed,
        steal: args.steal,
        retry_failed: args.retry_failed,
        lease: Duration::from_secs(args.lease),
        backoff: Duration::from_secs(1),
        log: match args.log_format {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        },
        progress_every,
    };
    let summary = match run::run(&job.items, &state, &ctx, &opts) {
        Ok(s) => s,
        Err(e) => return Ok(worker_failed(&e)),
    };
    Ok(if summary.failed_permanent > 0 || summary.stopped {
        EXIT_ITEMS_FAILED
    } else if summary.failed_retryable > 0 {
        EXIT_RETRY
    } else {
        EXIT_OK
    })
}

/// The exit code of a worker that could not go on: a retry makes sense unless the error says
/// otherwise (bad state URL, credentials, another job's state).
fn worker_failed(e: &Error) -> i32 {
    super::util::report_error(e);
    if run::worker_error_is_retryable(e) {
        EXIT_RETRY
    } else {
        EXIT_ERROR
    }
}

fn open_state(state: &str, connection: &Connection) -> Result<State> {
    State::open(state, &connection.settings(), connection.profile())
}

fn show_status(args: StatusArgs) -> Result<i32> {
    let state = open_state(&args.state, &args.connection)?;
    let s = status::status(&state)?;
    let mut out = Out::new();
    match args.output {
        StatusFormat::Json => {
            let text = serde_json::to_string_pretty(&s)
                .map_err(|e| Error::invalid(format!("status: {e}")))?;
            writeln!(out, "{text}")?;
        }
        StatusFormat::Human => {
            let items = s.items.map_or("?".to_string(), |n| n.to_string());
            let pending = s.pending.map_or("?".to_string(), |n| n.to_string());
            writeln!(out, "state:     {}", printable(&s.state))?;
            writeln!(
                out,
                "items:     {items}: {} done, {} failed, {} running, {pending} pending",
                s.done, s.failed, s.running
            )?;
            writeln!(
                out,
                "workers:   {} ({} active)",
                s.workers, s.workers_active
            )?;
            writeln!(
                out,
                "done:      {} in {:.1} s ({}/s, {:.2} items/s)",
                human_size(s.bytes_done),
                s.elapsed_seconds,
                human_size(s.bytes_per_second as u64),
                s.items_per_second
            )?;
            for f in &s.failures {
                writeln!(
                    out,
                    "failed:    line {} ({} -> {}): {} [{}{}, {} attempts]",
                    f.line,
                    printable(&f.source),
                    printable(&f.destination),
                    printable(f.message.as_deref().unwrap_or("")),
                    f.error_kind.as_deref().unwrap_or("?"),
                    if f.retryable { ", retryable" } else { "" },
                    f.attempts
                )?;
            }
            if s.failed > s.failures.len() {
                writeln!(
                    out,
                    "           ... and {} more failures",
                    s.failed - s.failures.len()
                )?;
            }
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn report(args: ReportArgs) -> Result<i32> {
    let state = open_state(&args.state, &args.connection)?;
    let records = status::report(&state)?;
    let bytes = match args.output {
        ReportFormat::Json => {
            let mut v = serde_json::to_vec_pretty(&records)
                .map_err(|e| Error::invalid(format!("report: {e}")))?;
            v.push(b'\n');
            v
        }
        ReportFormat::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            let csv_error = |e: csv::Error| Error::invalid(format!("report: {e}"));
            w.write_record([
                "line",
                "key",
                "state",
                "operation",
                "source",
                "destination",
                "bytes_in",
                "bytes_out",
                "digest",
                "digest_definition",
                "started",
                "finished",
                "attempts",
                "worker",
                "error_kind",
                "retryable",
                "message",
            ])
            .map_err(csv_error)?;
            for r in &records {
                w.write_record([
                    r.line.to_string(),
                    r.key.clone(),
                    r.state.clone(),
                    r.operation.clone(),
                    r.source.clone(),
                    r.destination.clone(),
                    r.bytes_in.to_string(),
                    r.bytes_out.to_string(),
                    r.digest.clone().unwrap_or_default(),
                    r.digest_definition.clone().unwrap_or_default(),
                    format!("{:.3}", r.started),
                    format!("{:.3}", r.finished),
                    r.attempts.to_string(),
                    r.worker.clone(),
                    r.error_kind.clone().unwrap_or_default(),
                    r.retryable.to_string(),
                    r.message.clone().unwrap_or_default(),
                ])
                .map_err(csv_error)?;
            }
            w.into_inner()
                .map_err(|e| Error::invalid(format!("report: {e}")))?
        }
    };
    match &args.file {
        Some(path) => diskkit::output::write_file(path, &bytes)?,
        None => {
            let mut out = Out::new();
            out.write_all(&bytes)?;
            out.flush()?;
        }
    }
    Ok(EXIT_OK)
}

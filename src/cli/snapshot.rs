//! `diskkit snapshot ...`: data-disk snapshots in a content-addressed store.

use super::info::snapshot_list;
use super::inplace::require_qcow2;
use super::storage::Connection;
use super::util::{
    Bar, Out, OutputFormat, create_options, human_size, open_image, parse_format, parse_size,
    printable,
};
use super::{EXIT_DIFFERENT, EXIT_OK};
use diskkit::formats::chunk_store::HOLE;
use diskkit::formats::qcow2::snapshot_edit;
use diskkit::formats::write::CacheMode;
use diskkit::formats::{Error, Format, Image, Result};
use diskkit::snapshot::{self, Crypto, NewStore, SnapshotImage, SnapshotStore};
use std::collections::BTreeMap;
use std::path::PathBuf;

const STORES: &str = "STORE is a local directory (created by the first snapshot create) or a \
bucket prefix: s3://BUCKET/PREFIX, oss://BUCKET/PREFIX, obs://BUCKET/PREFIX (connection \
settings as for push: flags, environment, profile). An ID may be any unique prefix of a \
snapshot's id. A snapshot is also an image: STORE#ID works as the source of info, map, compare, \
hash, convert and push.";

const INTERNAL: &str = "Internal snapshots (qemu-img's form): diskkit snapshot -l|-c NAME|-a \
NAME|-d NAME IMAGE lists, creates, applies or deletes the internal snapshots of a qcow2 IMAGE in \
place; a crash at any moment leaves the image as before or as after.";

/// Snapshots: data-disk snapshots in a store (subcommands), or a qcow2 image's internal ones
/// (-l, -c, -a, -d)
#[derive(clap::Args)]
#[command(
    long_about = "Two kinds of snapshots share this command.\n\n\
Store snapshots (subcommands create, ls, info, diff, restore, rm, gc, verify): snapshots of disk \
images in a store you own: each chunk of guest data is stored once, named by its SHA-256, so a \
later snapshot of the same disk costs only what changed. Chunks of zeros are never stored or \
sent. See README.md for the store's layout.\n\n\
Internal snapshots (flags -l, -c, -a, -d, as qemu-img snapshot): kept inside a qcow2 image, \
sharing its clusters. Create records the current state under NAME (IDs numbered as qemu does, \
no VM state); apply makes a snapshot (ID or name) the current state, dropping what only the \
current state held; delete frees what only that snapshot held. Each change is written to free \
space and switched on by one header write, so a crash leaves the image as before or as after.",
    after_help = format!("{STORES}\n\n{INTERNAL}"),
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    group = clap::ArgGroup::new("action").required(true).args(["list", "create", "apply", "delete"])
)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    internal: InternalArgs,
}

/// qemu-img's flag form: one action on one qcow2 image.
#[derive(clap::Args)]
struct InternalArgs {
    /// List the internal snapshots of IMAGE
    #[arg(short = 'l')]
    list: bool,
    /// Create internal snapshot NAME of IMAGE's current state
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Apply internal snapshot NAME (ID or name): it becomes IMAGE's current state
    #[arg(short = 'a', value_name = "NAME")]
    apply: Option<String>,
    /// Delete internal snapshot NAME (ID or name)
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// The qcow2 image (with -l, -c, -a or -d)
    #[arg(required = true)]
    image: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum Command {
    Create(CreateArgs),
    Ls(LsArgs),
    Info(InfoArgs),
    Diff(DiffArgs),
    Restore(RestoreArgs),
    Rm(RmArgs),
    Gc(GcArgs),
    Verify(VerifyArgs),
}

/// Snapshot an image into a store; prints the new snapshot's id as the last line
#[derive(clap::Args)]
#[command(
    long_about = "Reads only what IMAGE's allocation map calls data, in fixed chunks aligned to \
the guest (4 MiB unless the store was made with another --chunk-size); a chunk the store already \
has is not sent again. Hashing, compression (zstd, kept only when smaller) and storing run in \
parallel with bounded memory. The snapshot's index is written last: a killed create never leaves \
a snapshot that lists missing chunks, and a rerun sends only what is missing.\n\n\
With --parent ID, when IMAGE is a qcow2 overlay whose backing file is the parent's source \
(same path, size and modification time), only the overlay's own clusters are read; other chunks \
are the parent's. With --bitmap NAME as well, a qcow2 persistent dirty bitmap says which chunks \
changed since the parent and only those are read. Otherwise every data chunk is read and hashed \
and only new chunks stored. The summary says which path was taken.",
    after_help = STORES
)]
struct CreateArgs {
    /// Source format (detected from magic bytes when omitted)
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Disk name recorded in the snapshot [default: IMAGE's file name]
    #[arg(long)]
    name: Option<String>,
    /// The snapshot this one is incremental to (id or unique prefix)
    #[arg(long, value_name = "ID")]
    parent: Option<String>,
    /// With --parent: a persistent dirty bitmap of the qcow2 IMAGE that records the writes since
    /// the parent was taken (qemu-img bitmap --add, or a VM's block-dirty-bitmap-add); only the
    /// chunks it marks are read. A bitmap in use or marked inconsistent is refused
    #[arg(long, value_name = "NAME", requires = "parent")]
    bitmap: Option<String>,
    /// A label, KEY=VALUE (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Chunk size of a NEW store: a power of two from 512K to 8M [default: 4M]
    #[arg(long, value_parser = parse_size)]
    chunk_size: Option<u64>,
    /// Make a NEW store encrypted: chunks and indexes sealed (XChaCha20-Poly1305), chunk names
    /// keyed, with the key of --key-file or DISKKIT_SNAPSHOT_KEY
    #[arg(long)]
    encrypt: bool,
    /// Show a progress bar
    #[arg(short = 'p', long)]
    progress: bool,
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    #[command(flatten)]
    access: Access,
    /// The image to snapshot (any format diskkit reads)
    image: PathBuf,
    /// The store
    store: String,
}

/// Where the store is, and its key when it is encrypted.
#[derive(clap::Args)]
pub(super) struct Access {
    #[command(flatten)]
    pub(super) conn: Connection,
    /// The key of an encrypted store: a file of 64 hex digits or 32 bytes [default: the
    /// environment variable DISKKIT_SNAPSHOT_KEY]
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
}

impl Access {
    pub(super) fn open(&self, store: &str, new: Option<NewStore>) -> Result<SnapshotStore> {
        let key = Crypto::from_user(self.key_file.as_deref())?;
        SnapshotStore::open(store, &self.conn.settings(), self.conn.profile(), key, new)
    }
}

pub(super) fn parse_tag(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{s}': tags are KEY=VALUE")),
    }
}

/// Free the chunks no snapshot of the store references any more (after snapshot rm)
#[derive(clap::Args)]
#[command(after_help = STORES)]
struct GcArgs {
    #[command(flatten)]
    access: Access,
    store: String,
}

/// List the snapshots of a store, oldest first
#[derive(clap::Args)]
#[command(after_help = STORES)]
struct LsArgs {
    /// Only snapshots of this disk
    #[arg(long)]
    name: Option<String>,
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    #[command(flatten)]
    access: Access,
    store: String,
}

/// Show one snapshot
#[derive(clap::Args)]
#[command(after_help = STORES)]
struct InfoArgs {
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    #[command(flatten)]
    access: Access,
    store: String,
    id: String,
}

/// The guest ranges that differ between two snapshots (whole chunks)
#[derive(clap::Args)]
#[command(after_help = STORES)]
struct DiffArgs {
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    #[command(flatten)]
    access: Access,
    store: String,
    id1: String,
    id2: String,
}

/// Write a snapshot out as an image of any writable format
#[derive(clap::Args)]
#[command(
    long_about = "Fetches and decompresses chunks in parallel and writes them out of order, \
zero chunks as holes or unallocated clusters, into DST of format -O (default raw), written as \
convert writes: under a temporary name, synced, renamed into place. Every chunk's content is \
checked against its name.",
    after_help = STORES
)]
struct RestoreArgs {
    /// Output format: raw, qcow2, vpc
    #[arg(short = 'O', value_parser = parse_format)]
    out_format: Option<Format>,
    /// Output format options, qemu style (repeatable)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Compress the output (qcow2)
    #[arg(short = 'c')]
    compress: bool,
    /// Show a progress bar
    #[arg(short = 'p', long)]
    progress: bool,
    #[command(flatten)]
    access: Access,
    store: String,
    id: String,
    /// The new image
    dst: PathBuf,
}

/// Remove snapshots (snapshot gc then frees the chunks nothing else uses)
#[derive(clap::Args)]
#[command(after_help = STORES)]
struct RmArgs {
    #[command(flatten)]
    access: Access,
    store: String,
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Check snapshots: every index consistent, every chunk present (and sound with --read-data)
#[derive(clap::Args)]
#[command(
    long_about = "Checks every index (or those named) and that every chunk they list is in the \
store; with --read-data every chunk is read, decompressed and its content checked against its \
name. Lists damaged chunks with the snapshots they affect. Exit codes: 0 clean, 1 damage found, \
2 error.",
    after_help = STORES
)]
struct VerifyArgs {
    /// Read every chunk and check its content
    #[arg(long)]
    read_data: bool,
    #[command(flatten)]
    access: Access,
    store: String,
    ids: Vec<String>,
}

pub fn run(args: Args) -> Result<i32> {
    let Some(command) = args.command else {
        return internal(args.internal);
    };
    match command {
        Command::Create(a) => create(a),
        Command::Ls(a) => ls(a),
        Command::Info(a) => info(a),
        Command::Diff(a) => diff(a),
        Command::Restore(a) => restore(a),
        Command::Rm(a) => rm(a),
        Command::Gc(a) => gc(a),
        Command::Verify(a) => verify(a),
    }
}

/// `snapshot -l|-c|-a|-d IMAGE`: internal snapshots of a qcow2 image.
fn internal(args: InternalArgs) -> Result<i32> {
    let image = args
        .image
        .ok_or_else(|| Error::invalid("snapshot -l, -c, -a and -d need an IMAGE"))?;
    require_qcow2(&image, None, "internal snapshots")?;
    if args.list {
        let snapshots = open_image(&image, Some(Format::Qcow2), None)?
            .info()
            .snapshots;
        if !snapshots.is_empty() {
            let mut out = Out::new();
            write!(out, "{}", snapshot_list(&snapshots))?;
            out.flush()?;
        }
    } else if let Some(name) = args.create {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        snapshot_edit::create(&image, &name, (now.as_secs(), now.subsec_nanos()))?;
    } else if let Some(key) = args.apply {
        snapshot_edit::apply(&image, &key)?;
    } else if let Some(key) = args.delete {
        snapshot_edit::delete(&image, &key)?;
    }
    Ok(EXIT_OK)
}

pub(super) fn json(value: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string_pretty(value).map_err(|e| Error::invalid(e.to_string()))
}

fn create(args: CreateArgs) -> Result<i32> {
    let mut out = Out::new();
    let image = open_image(&args.image, args.format, None)?;
    let store = args.access.open(
        &args.store,
        Some(NewStore {
            chunk_size: args.chunk_size.unwrap_or(snapshot::DEFAULT_CHUNK_SIZE),
            encrypt: args.encrypt,
        }),
    )?;
    if args.chunk_size.is_some_and(|c| c != store.chunk_size()) {
        return Err(Error::invalid(format!(
            "{}: the store's chunk size is {}; --chunk-size only applies to a new store",
            store.url(),
            store.chunk_size()
        )));
    }
    let opts = snapshot::CreateOptions {
        name: args.name,
        parent: args.parent,
        bitmap: args.bitmap,
        tags: args.tags.into_iter().collect::<BTreeMap<_, _>>(),
    };
    let bar = Bar::new(args.progress, image.virtual_size(), "snapshot");
    let report = snapshot::create(&store, image.as_ref(), &args.image, &opts, &bar)?;
    bar.finish();
    match args.output {
        OutputFormat::Json => writeln!(out, "{}", json(&report)?)?,
        OutputFormat::Human => {
            let path = match report.path {
                snapshot::IncrementalPath::Full => "every data chunk read",
                snapshot::IncrementalPath::Overlay => "overlay: only the overlay's clusters read",
                snapshot::IncrementalPath::Bitmap => "bitmap: only the chunks it marks read",
            };
            writeln!(out, "path: {path}")?;
            writeln!(
                out,
                "read {}, stored {} new ({} of new data), reused {}, from the parent {}, {} zero chunks",
                human_size(report.bytes_read),
                human_size(report.bytes_stored),
                human_size(report.bytes_new),
                human_size(report.bytes_reused),
                human_size(report.bytes_from_parent),
                report.zero_chunks
            )?;
            writeln!(out, "digest: {}", report.digest)?;
            writeln!(out, "{}", report.id)?;
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn ls(args: LsArgs) -> Result<i32> {
    let mut out = Out::new();
    let store = args.access.open(&args.store, None)?;
    let mut entries = store.list()?;
    if let Some(name) = &args.name {
        entries.retain(|e| &e.meta.name == name);
    }
    match args.output {
        OutputFormat::Json => writeln!(out, "{}", json(&entries)?)?,
        OutputFormat::Human => {
            writeln!(
                out,
                "{:<32}  {:<20}  {:>10}  {:>10}  {:<20}  PARENT",
                "ID", "NAME", "VIRTUAL", "DATA", "CREATED"
            )?;
            for e in entries {
                writeln!(
                    out,
                    "{:<32}  {:<20}  {:>10}  {:>10}  {:<20}  {}",
                    e.id,
                    printable(&e.meta.name),
                    human_size(e.meta.virtual_size),
                    human_size(e.data_chunks * e.meta.chunk_size),
                    utc(e.meta.created),
                    e.meta
                        .parent
                        .as_deref()
                        .map_or("-", |p| &p[..12.min(p.len())])
                )?;
            }
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn info(args: InfoArgs) -> Result<i32> {
    let mut out = Out::new();
    let store = args.access.open(&args.store, None)?;
    let image = SnapshotImage::of(store, &args.id)?;
    let meta = &image.index().meta;
    let data_chunks = image.index().chunks.iter().filter(|c| **c != HOLE).count();
    match args.output {
        OutputFormat::Json => writeln!(
            out,
            "{}",
            json(&serde_json::json!({
                "id": image.id(),
                "meta": meta,
                "chunks": image.index().chunks.len(),
                "data-chunks": data_chunks,
            }))?
        )?,
        OutputFormat::Human => {
            writeln!(out, "id: {}", image.id())?;
            writeln!(out, "name: {}", printable(&meta.name))?;
            writeln!(out, "source format: {}", printable(&meta.source_format))?;
            writeln!(
                out,
                "virtual size: {} ({} bytes)",
                human_size(meta.virtual_size),
                meta.virtual_size
            )?;
            writeln!(out, "chunk size: {}", human_size(meta.chunk_size))?;
            writeln!(
                out,
                "chunks: {} ({data_chunks} with data)",
                image.index().chunks.len()
            )?;
            writeln!(out, "created: {}", utc(meta.created))?;
            writeln!(out, "parent: {}", meta.parent.as_deref().unwrap_or("-"))?;
            writeln!(out, "digest: {}", meta.digest)?;
            for (k, v) in &meta.tags {
                writeln!(out, "tag: {}={}", printable(k), printable(v))?;
            }
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn diff(args: DiffArgs) -> Result<i32> {
    let mut out = Out::new();
    let store = args.access.open(&args.store, None)?;
    let a = store.index(&store.resolve(&args.id1)?)?;
    let b = store.index(&store.resolve(&args.id2)?)?;
    let ranges = snapshot::diff(&a, &b)?;
    match args.output {
        OutputFormat::Json => writeln!(out, "{}", json(&ranges)?)?,
        OutputFormat::Human => {
            for r in &ranges {
                writeln!(
                    out,
                    "{:#x} +{:#x} ({})",
                    r.start,
                    r.length,
                    human_size(r.length)
                )?;
            }
            let total: u64 = ranges.iter().map(|r| r.length).sum();
            writeln!(
                out,
                "{} changed in {} ranges",
                human_size(total),
                ranges.len()
            )?;
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn restore(args: RestoreArgs) -> Result<i32> {
    let store = args.access.open(&args.store, None)?;
    let image = SnapshotImage::of(store, &args.id)?;
    let mut create = create_options(&args.options)?;
    create.compress = args.compress;
    // Written with direct I/O (qemu's cache=none), synced before the rename: a restored disk
    // is rarely read right away, and sparing the page cache halved a restore's system time.
    create.cache = CacheMode::None;
    let bar = Bar::new(args.progress, image.virtual_size(), "restoring");
    diskkit::convert::convert_to_path(
        &image,
        args.out_format.unwrap_or(Format::Raw),
        &args.dst,
        &mut create,
        &Default::default(),
        &bar,
    )?;
    bar.finish();
    Ok(EXIT_OK)
}

/// The full ids of `ids` (unique prefixes), all resolved before anything is done with them:
/// a typo stops the command before it removes or checks anything.
fn resolve_all(store: &SnapshotStore, ids: &[String]) -> Result<Vec<String>> {
    ids.iter().map(|i| store.resolve(i)).collect()
}

fn rm(args: RmArgs) -> Result<i32> {
    let mut out = Out::new();
    let store = args.access.open(&args.store, None)?;
    let ids = resolve_all(&store, &args.ids)?;
    for id in ids {
        store.remove(&id)?;
        writeln!(out, "removed {id}")?;
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn gc(args: GcArgs) -> Result<i32> {
    let mut out = Out::new();
    let store = args.access.open(&args.store, None)?;
    let r = snapshot::gc(&store)?;
    writeln!(
        out,
        "{} snapshots; {} chunks kept, {} removed ({})",
        r.snapshots,
        r.chunks_kept,
        r.chunks_removed,
        human_size(r.bytes_removed)
    )?;
    out.flush()?;
    Ok(EXIT_OK)
}

fn verify(args: VerifyArgs) -> Result<i32> {
    let mut out = Out::new();
    let store = args.access.open(&args.store, None)?;
    let ids = resolve_all(&store, &args.ids)?;
    let report = snapshot::verify(&store, &ids, args.read_data)?;
    for (id, e) in &report.bad_indexes {
        writeln!(out, "snapshot {id}: {}", printable(e))?;
    }
    for d in &report.damaged {
        writeln!(
            out,
            "chunk {}: {} (used by {})",
            d.chunk,
            printable(&d.problem),
            d.snapshots.join(", ")
        )?;
    }
    writeln!(
        out,
        "{} snapshots, {} chunks checked{}: {}",
        report.snapshots,
        report.chunks_checked,
        if args.read_data { " (data read)" } else { "" },
        if report.is_clean() { "OK" } else { "DAMAGED" }
    )?;
    out.flush()?;
    Ok(if report.is_clean() {
        EXIT_OK
    } else {
        EXIT_DIFFERENT
    })
}

/// Seconds since the epoch as `2026-12-06T02:56:36Z`.
pub(super) fn utc(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| secs.to_string(), |t| t.to_string())
}

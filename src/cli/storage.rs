//! `push`, `pull`, `verify`, `ls`, `rm`: images in object storage.

use super::util::{Bar, create_options, human_size, open_image, parse_format, parse_size};
use super::{EXIT_ERROR, EXIT_OK};
use diskkit::convert::allocated_ranges;
use diskkit::formats::error::ErrorKind;
use diskkit::formats::{Error, Format, Result};
use diskkit::storage::push::{self, Export, PushOptions};
use diskkit::storage::{Location, Settings, Store, pull};
use std::path::PathBuf;

const URLS: &str = "URLs: s3://BUCKET/KEY, oss://BUCKET/KEY, obs://BUCKET/KEY, or a local \
directory path (DIR/KEY or file://DIR/KEY) as a bucket that needs no server.\n\n\
Connection settings come from the flags, else the environment (s3: AWS_ENDPOINT_URL, AWS_REGION, \
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN; oss: OSS_ENDPOINT, \
OSS_ACCESS_KEY_ID, OSS_ACCESS_KEY_SECRET; obs: OBS_ENDPOINT, OBS_ACCESS_KEY_ID, \
OBS_SECRET_ACCESS_KEY), else the profile (--profile, or \"default\") in \
~/.config/diskkit/profiles.json: {\"NAME\": {\"endpoint\": ..., \"region\": ..., \
\"access_key_id\": ..., \"secret_access_key\": ..., \"virtual_host\": false}}.";

/// Where the bucket is and how to sign in.
#[derive(clap::Args)]
pub struct Connection {
    /// Endpoint URL, e.g. http://127.0.0.1:8333 (default: AWS for the region)
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// Region used for signing [default: us-east-1]
    #[arg(long)]
    region: Option<String>,
    /// Profile of ~/.config/diskkit/profiles.json to take missing settings from
    #[arg(long)]
    profile: Option<String>,
    /// Address buckets as BUCKET.endpoint (virtual-hosted style) instead of endpoint/BUCKET
    #[arg(long)]
    virtual_host: bool,
}

impl Connection {
    fn open(&self, url: &str) -> Result<(Location, Box<dyn Store>)> {
        let location = Location::parse(url)?;
        let settings = Settings {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            virtual_host: self.virtual_host,
            ..Settings::default()
        }
        .resolve(location.scheme, self.profile.as_deref())?;
        let store = diskkit::storage::open(&location, &settings)?;
        Ok((location, store))
    }
}

/// Upload an image into a bucket, converting on the fly; resumable
#[derive(clap::Args)]
#[command(
    long_about = "Upload SRC to URL as a multipart upload with parallel parts, converting \
on the fly with -O: raw, or vpc (VHD: dynamic by default, storing only the blocks the \
source's allocation map touches; -o subformat=fixed, or target=azure for Azure's fixed, \
MiB-aligned VHDs), or qcow2 (v3, 64 KiB clusters, only clusters with data; with -c \
compressed, -o compression_type=zlib|zstd, zlib by default as qemu). No local copy is made: \
the object's layout is computed from the source's allocation map before the first byte is \
sent (with -c, by compressing the source once first to learn each cluster's compressed size: \
a \"compressing\" pass, then the parts compress again as they are sent), and each part is \
produced on demand. Memory is about --part-size x --parallel.\n\n\
Every push also writes URL.diskkit.json: the object's format and size, the source name, the \
creation time and the guest digest with its chunk manifest (as diskkit hash computes them), \
which pull and verify check against.\n\n\
Resume: completed parts are recorded in a checkpoint (~/.cache/diskkit/uploads/). If a push \
fails or is killed, nothing appears under URL; rerunning the same command sends only the \
missing parts, or --abort URL abandons the upload. s3:// and local buckets resume; oss:// and \
obs:// uploads restart from the beginning.\n\n\
Exit codes: 0 success, 2 error."
)]
#[command(after_help = URLS)]
pub struct PushArgs {
    /// Source format (detected from magic bytes when omitted)
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Object format: raw, vpc (VHD) or qcow2 [default: raw]
    #[arg(short = 'O', value_parser = parse_format)]
    out_format: Option<Format>,
    /// Object format options, qemu style (vpc: subformat=dynamic|fixed, block_size,
    /// force_size, target=azure; qcow2: compression_type=zlib|zstd)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Compress the output (qcow2 only)
    #[arg(short = 'c')]
    compress: bool,
    /// Parts uploaded at once
    #[arg(long, value_name = "N", default_value_t = push::DEFAULT_PARALLEL)]
    parallel: usize,
    /// Part size (at least 5M; default 16M, grown so the object fits in 10,000 parts)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    part_size: Option<u64>,
    /// Show progress bars
    #[arg(short = 'p', long)]
    progress: bool,
    /// Abandon the unfinished upload to URL and forget its checkpoint (takes only URL)
    #[arg(long, value_name = "URL", conflicts_with_all = ["src", "dst"])]
    abort: Option<String>,
    #[command(flatten)]
    connection: Connection,
    #[arg(required_unless_present = "abort")]
    src: Option<PathBuf>,
    #[arg(value_name = "URL", required_unless_present = "abort")]
    dst: Option<String>,
}

pub fn push(args: PushArgs) -> Result<i32> {
    if let Some(url) = &args.abort {
        let (location, store) = args.connection.open(url)?;
        push::abort(store.as_ref(), &location)?;
        println!("aborted the unfinished upload to {}", location.url());
        return Ok(EXIT_OK);
    }
    let (Some(src_path), Some(url)) = (&args.src, &args.dst) else {
        return Err(Error::invalid("push needs SRC and URL (or --abort URL)"));
    };
    let src = open_image(src_path, args.format, None)?;
    let mut create = create_options(&args.options)?;
    create.compress = args.compress;
    let out_format = args.out_format.unwrap_or(Format::Raw);
    let (location, store) = args.connection.open(url)?;
    if args.compress {
        // Planning compresses the whole source: find a wrong URL, endpoint or credentials first.
        store.stat(&location.key)?;
    }
    let show_compressing = args.progress && args.compress;
    let compressing = Bar::new(
        show_compressing,
        if show_compressing {
            allocated_cluster_bytes(src.as_ref())
        } else {
            0
        },
        "compressing",
    );
    let export = Export::plan(src.as_ref(), out_format, &mut create, &compressing);
    compressing.finish();
    let export = export?;
    let meta = std::fs::metadata(src_path).map_err(|e| Error::io(src_path, "stat", e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let source = std::path::absolute(src_path).unwrap_or_else(|_| src_path.clone());
    let opts = PushOptions {
        part_size: args.part_size,
        parallel: args.parallel.max(1),
        source_name: src_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        identity: format!(
            "{} size={} mtime={mtime} format={} options={:?} compress={} layout={}",
            source.display(),
            meta.len(),
            out_format.name(),
            args.options,
            args.compress,
            export.layout_fingerprint()
        ),
    };
    let guest_size = export.guest_size(src.as_ref());
    let object_size = export.object_size(src.as_ref());
    let hashing = Bar::new(args.progress, guest_size, "hashing");
    let uploading = Bar::new(args.progress, object_size, "uploading");
    let result = push::push(
        store.as_ref(),
        &location,
        src.as_ref(),
        &export,
        &opts,
        &hashing,
        &uploading,
    );
    hashing.finish();
    uploading.finish();
    match result {
        Ok(r) => {
            if r.restarted {
                eprintln!(
                    "diskkit: the unfinished upload an earlier push recorded for {} was gone on \
                     the server (expired or aborted): all parts were sent again",
                    location.url()
                );
            }
            println!(
                "pushed {} ({}, {}): {} parts of {}, {} sent now, {} already sent before",
                location.url(),
                export.format(),
                human_size(r.object_size),
                r.parts,
                human_size(r.part_size),
                r.sent,
                r.resumed
            );
            Ok(EXIT_OK)
        }
        Err(e) => {
            eprintln!("diskkit: {e}");
            // A conflicting unfinished upload says itself what to do.
            if e.kind() != ErrorKind::AlreadyExists
                && store.resumable()
                && push::has_checkpoint(&location)
            {
                eprintln!(
                    "diskkit: the upload is unfinished and nothing was written under {}: rerun \
                     the same command to resume it, or run diskkit push --abort {url}",
                    location.url()
                );
            }
            Ok(EXIT_ERROR)
        }
    }
}

/// Bytes of the streamed qcow2 clusters that hold data in `image`: what the compressing pass goes
/// through.
fn allocated_cluster_bytes(image: &dyn diskkit::formats::Image) -> u64 {
    use diskkit::formats::qcow2::stream::CLUSTER_SIZE as CLUSTER;
    let mut last_cluster = None;
    let mut clusters = 0;
    for (start, end) in allocated_ranges(image, 0, image.virtual_size()).map_while(Result::ok) {
        if end <= start {
            continue;
        }
        let first = (start / CLUSTER).max(last_cluster.map_or(0, |c: u64| c + 1));
        let last = (end - 1) / CLUSTER;
        clusters += (last + 1).saturating_sub(first);
        last_cluster = Some(last);
    }
    clusters * CLUSTER
}

/// Download an image from a bucket, converting on the fly, and verify it
#[derive(clap::Args)]
#[command(
    long_about = "Download the image at URL into DST (format -O, default raw) with \
parallel ranged reads; runs of zeros become holes. DST is written under a temporary name and \
renamed into place when complete; its guest digest is then checked against the object's \
manifest (URL.diskkit.json).\n\nExit codes: 0 success (digest matches), 2 error or mismatch."
)]
#[command(after_help = URLS)]
pub struct PullArgs {
    /// Output format: raw, qcow2, vpc [default: raw]
    #[arg(short = 'O', value_parser = parse_format)]
    out_format: Option<Format>,
    /// Output format options, qemu style
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Ranged reads in flight at once
    #[arg(long, value_name = "N", default_value_t = push::DEFAULT_PARALLEL)]
    parallel: usize,
    /// Show a progress bar
    #[arg(short = 'p', long)]
    progress: bool,
    #[command(flatten)]
    connection: Connection,
    #[arg(value_name = "URL")]
    src: String,
    dst: PathBuf,
}

pub fn pull(args: PullArgs) -> Result<i32> {
    let (location, store) = args.connection.open(&args.src)?;
    let mut create = create_options(&args.options)?;
    let size = store.stat(&location.key)?.map_or(0, |m| m.size);
    let bar = Bar::new(args.progress, size, "downloading");
    let digest = pull::pull(
        store.as_ref(),
        &location,
        &args.dst,
        args.out_format.unwrap_or(Format::Raw),
        &mut create,
        args.parallel.max(1),
        &bar,
    )?;
    bar.finish();
    println!(
        "pulled {} into {}: digest {digest} verified",
        location.url(),
        args.dst.display()
    );
    Ok(EXIT_OK)
}

/// Check an image in a bucket against its manifest, reading it in place
#[derive(clap::Args)]
#[command(
    long_about = "Read the image at URL with ranged reads and check its guest digest \
against its manifest (URL.diskkit.json).\n\nExit codes: 0 verified, 2 error or mismatch."
)]
#[command(after_help = URLS)]
pub struct VerifyArgs {
    /// Ranged reads in flight at once
    #[arg(long, value_name = "N", default_value_t = push::DEFAULT_PARALLEL)]
    parallel: usize,
    /// Show a progress bar
    #[arg(short = 'p', long)]
    progress: bool,
    #[command(flatten)]
    connection: Connection,
    #[arg(value_name = "URL")]
    url: String,
}

pub fn verify(args: VerifyArgs) -> Result<i32> {
    let (location, store) = args.connection.open(&args.url)?;
    let size = store.stat(&location.key)?.map_or(0, |m| m.size);
    let bar = Bar::new(args.progress, size, "verifying");
    let digest = pull::verify(store.as_ref(), &location, args.parallel.max(1), &bar)?;
    bar.finish();
    println!("{}: OK {digest}", location.url());
    Ok(EXIT_OK)
}

/// List the images in a bucket with their format, size and digest
#[derive(clap::Args)]
#[command(after_help = URLS)]
pub struct LsArgs {
    #[command(flatten)]
    connection: Connection,
    /// A bucket or prefix: s3://BUCKET/, s3://BUCKET/DIR/, a local directory
    #[arg(value_name = "URL")]
    url: String,
}

pub fn ls(args: LsArgs) -> Result<i32> {
    let (location, store) = args.connection.open(&args.url)?;
    for item in pull::list(store.as_ref(), &location)? {
        match &item.manifest {
            Some(m) => println!(
                "{}\t{}\t{}\t{}",
                item.key,
                m.format,
                m.guest.virtual_size,
                m.guest.digest_hex()
            ),
            None => println!("{}\t-\t{}\t-", item.key, item.size),
        }
    }
    Ok(EXIT_OK)
}

/// Remove an image and its manifest from a bucket
#[derive(clap::Args)]
#[command(after_help = URLS)]
pub struct RmArgs {
    #[command(flatten)]
    connection: Connection,
    #[arg(value_name = "URL")]
    url: String,
}

pub fn rm(args: RmArgs) -> Result<i32> {
    let (location, store) = args.connection.open(&args.url)?;
    pull::remove(store.as_ref(), &location)?;
    Ok(EXIT_OK)
}

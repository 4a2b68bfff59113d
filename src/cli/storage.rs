//! `push`, `pull`, `verify`, `ls`, `rm`: images in object storage.

use super::targets::TargetArgs;
use super::util::{
    Bar, Out, create_options, human_size, open_image, parse_format, parse_size, printable,
};
use super::{EXIT_ERROR, EXIT_OK};
use diskkit::formats::digest::Algorithm;
use diskkit::formats::image::{GuestRange, allocated_ranges, touched_clusters};
use diskkit::formats::{Error, ErrorKind, Format, Result};
use diskkit::storage::push::{self, PushOptions};
use diskkit::storage::{Location, Settings, Store, catalog, pull};
use diskkit::targets::Output;
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
    /// The settings the flags give; the environment and the profile fill in the rest when a
    /// store is opened.
    pub fn settings(&self) -> Settings {
        Settings {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            virtual_host: self.virtual_host,
            ..Settings::default()
        }
    }

    /// The profile named by `--profile`.
    pub fn profile(&self) -> Option<&str> {
        self.profile.as_deref()
    }

    fn open(&self, url: &str) -> Result<(Location, Box<dyn Store>)> {
        let location = Location::parse(url)?;
        let settings = self.settings().resolve(location.scheme, self.profile())?;
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
--target CLOUD uploads what the cloud's image import accepts (as convert --target; diskkit \
targets lists them), after pre-flight checks. gce uploads GCE's tarball (disk.raw in a gzip'ed \
GNU sparse tar), also without a local copy: its gzip members are compressed once to learn the \
object's size (a \"compressing\" pass), then again as the parts are sent.\n\n\
Exit codes: 0 success, 2 error, 4 a pre-flight check of --target failed."
)]
#[command(after_help = URLS)]
pub struct PushArgs {
    /// Source format (detected from magic bytes when omitted)
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Object format: raw, vpc (VHD), qcow2 or vmdk (streamOptimized) [default: raw]
    #[arg(short = 'O', value_parser = parse_format)]
    out_format: Option<Format>,
    /// Object format options, qemu style (vpc: subformat=dynamic|fixed, block_size,
    /// force_size, target=azure; qcow2: compression_type=zlib|zstd; vmdk: adapter_type,
    /// hwversion)
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
    /// Upload at most RATE bytes per second over all parts (e.g. 50M), as qemu-img's -r
    #[arg(short = 'r', long, value_name = "RATE", value_parser = parse_size)]
    rate_limit: Option<u64>,
    /// Show progress bars
    #[arg(short = 'p', long)]
    progress: bool,
    /// Abandon the unfinished upload to URL and forget its checkpoint (takes only URL)
    #[arg(long, value_name = "URL", conflicts_with_all = ["src", "dst"])]
    abort: Option<String>,
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    target: TargetArgs,
    /// The image to upload: a local file in any format diskkit reads (raw, qcow2, VHD, VHDX,
    /// VMDK, ISO)
    #[arg(value_name = "SRC", required_unless_present = "abort")]
    src: Option<PathBuf>,
    /// Where to put it: s3://BUCKET/KEY, oss://..., obs://..., a local DIR/KEY; a URL ending in
    /// / (or an existing directory) keeps SRC's file name
    #[arg(value_name = "URL", required_unless_present = "abort")]
    dst: Option<String>,
}

pub fn push(args: PushArgs) -> Result<i32> {
    if let Some(url) = &args.abort {
        let (location, store) = args.connection.open(url)?;
        push::abort(store.as_ref(), &location)?;
        let mut out = Out::new();
        writeln!(out, "aborted the unfinished upload to {}", location.url())?;
        out.flush()?;
        return Ok(EXIT_OK);
    }
    let (Some(src_path), Some(url)) = (&args.src, &args.dst) else {
        return Err(Error::invalid("push needs SRC and URL (or --abort URL)"));
    };
    let src = open_image(src_path, args.format, None)?;
    let mut create = create_options(&args.options)?;
    create.compress = args.compress;
    let output = args.target.output(args.out_format, &mut create)?;
    if let Some(code) = args
        .target
        .preflight(src.as_ref(), src_path, &output, &create)?
    {
        return Ok(code);
    }
    let (mut location, store) = args.connection.open(url)?;
    if location.is_prefix() {
        // Into a "directory": the source's file name, as cp does.
        let name = src_path
            .file_name()
            .ok_or_else(|| Error::invalid(format!("{}: no file name", src_path.display())))?;
        location = location.with_key(&format!("{}{}", location.key, name.to_string_lossy()));
    }
    // Planning may read or compress the whole source (zero detection, compressed layouts): find a
    // wrong URL, endpoint or credentials first.
    store.stat(&location.key)?;
    let (export, out_format) = match output {
        Output::Image { format, .. } => {
            // Compressed qcow2 and streamOptimized VMDK compress every cluster once to plan.
            let show_compressing = args.progress && (args.compress || format == Format::Vmdk);
            let compressing = Bar::new(
                show_compressing,
                if show_compressing {
                    allocated_cluster_bytes(src.as_ref())
                } else {
                    0
                },
                "compressing",
            );
            let export = push::plan(src.as_ref(), format, &mut create, &compressing);
            compressing.finish();
            (export?, format)
        }
        Output::GceTarball => {
            if args.compress {
                return Err(Error::invalid("-c: the GCE tarball is gzip'ed already"));
            }
            let tar = diskkit::gce::Tarball::of(src.as_ref(), src_path)?;
            let compressing = Bar::new(args.progress, tar.data_len(), "compressing");
            let export = diskkit::gce::GceStream::plan(tar, &compressing);
            compressing.finish();
            let export: Box<dyn diskkit::formats::ImageStream> = Box::new(export?);
            (export, Format::Raw)
        }
    };
    let opts = PushOptions {
        part_size: args.part_size,
        rate_limit: args.rate_limit,
        parallel: args.parallel.max(1),
        source_name: src_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        identity: push::local_push_identity(
            src_path,
            out_format,
            &create,
            args.compress,
            export.as_ref(),
        )?,
    };
    let guest_size = export.guest().virtual_size();
    let object_size = export.size();
    let hashing = Bar::new(args.progress, guest_size, "hashing")
        .with_data_of(&[export.guest()], guest_size)?;
    let uploading = Bar::new(args.progress, object_size, "uploading");
    let result = push::push(
        store.as_ref(),
        &location,
        export.as_ref(),
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
            let mut out = Out::new();
            writeln!(
                out,
                "pushed {} ({}, {}): {} parts of {}, {} sent now, {} already sent before",
                location.url(),
                export.format(),
                human_size(r.object_size),
                r.parts,
                human_size(r.part_size),
                r.sent,
                r.resumed
            )?;
            out.flush()?;
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
    let ranges = allocated_ranges(image, GuestRange::new(0, image.virtual_size()));
    let clusters: u64 = touched_clusters(ranges, CLUSTER)
        .map_while(Result::ok)
        .map(|run| run.end - run.start)
        .sum();
    clusters * CLUSTER
}

/// Download an image from a bucket, converting on the fly, and verify it
#[derive(clap::Args)]
#[command(
    long_about = "Download the object at URL into DST with parallel ranged reads: byte for \
byte, or converted to the format -O; runs of zeros become holes. DST is written under a \
temporary name and renamed into place when complete.\n\n\
Verification: an object pushed by diskkit is checked against its manifest (URL.diskkit.json): \
the guest digest of what was written. Any other object is checked against the store's MD5 \
ETag when the store offers one (the content's MD5, or for a multipart upload the MD5 of its \
parts' MD5s, tried with the part sizes upload tools use); an object with neither is refused \
unless --no-verify. The message says which check was made.\n\n\
Exit codes: 0 success (the check passed or --no-verify), 2 error or mismatch."
)]
#[command(after_help = URLS)]
pub struct PullArgs {
    /// Output format: raw, qcow2, vpc [default: the object as it is, byte for byte]
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
    /// Take an object that has neither a diskkit manifest nor an MD5 ETag without checking it
    #[arg(long)]
    no_verify: bool,
    #[command(flatten)]
    connection: Connection,
    /// The object to download: s3://BUCKET/KEY, oss://..., obs://..., a local DIR/KEY
    #[arg(value_name = "URL")]
    src: String,
    /// The file to write (replaced if it exists); a path ending in / is a directory to write
    /// into under the object's name
    #[arg(value_name = "DST")]
    dst: PathBuf,
}

pub fn pull(args: PullArgs) -> Result<i32> {
    let (location, store) = args.connection.open(&args.src)?;
    let mut create = create_options(&args.options)?;
    let size = store.stat(&location.key)?.map_or(0, |m| m.size);
    let bar = Bar::new(args.progress, size, "downloading");
    let dst = pull_target(&args.dst, &location)?;
    let mut opts = pull::PullOptions {
        format: args.out_format,
        create: &mut create,
        threads: args.parallel.max(1),
        verify: !args.no_verify,
    };
    let verified = pull::pull(store.as_ref(), &location, &dst, &mut opts, &bar)?;
    bar.finish();
    let mut out = Out::new();
    writeln!(
        out,
        "pulled {} into {}: {}",
        location.url(),
        dst.display(),
        describe(&verified)
    )?;
    out.flush()?;
    Ok(EXIT_OK)
}

/// The file a pull writes: `dst`, or in the directory `dst/` the object's name.
fn pull_target(dst: &std::path::Path, location: &Location) -> Result<PathBuf> {
    let into_dir = dst.as_os_str().as_encoded_bytes().ends_with(b"/");
    if !into_dir {
        if dst.is_dir() {
            return Err(Error::invalid(format!(
                "{}: is a directory (end it with / to pull into it under the object's name)",
                dst.display()
            )));
        }
        return Ok(dst.to_path_buf());
    }
    match location.key.rsplit('/').next().filter(|n| !n.is_empty()) {
        // The object's name, not the user's: never written through a symlink there.
        Some(name) => diskkit::output::not_a_symlink(&dst.join(name)),
        None => Err(Error::invalid(format!(
            "{}: name an object, not a prefix",
            location.url()
        ))),
    }
}

/// A manifest's digest as the messages show it: the definition named unless it is the SHA-256
/// one that `diskkit hash` prints by default.
fn manifest_digest(definition: &str, digest: &str) -> String {
    if definition == Algorithm::Sha256.definition() {
        printable(digest).into_owned()
    } else {
        format!("{} ({})", printable(digest), printable(definition))
    }
}

/// What was checked, as the pull and verify messages say it.
fn describe(verified: &pull::Verified) -> String {
    match verified {
        pull::Verified::Manifest { definition, digest } => {
            let digest = manifest_digest(definition, digest);
            format!("digest {digest} verified against the manifest")
        }
        pull::Verified::Md5(md5) => format!(
            "MD5 {} verified against the store's ETag (no diskkit manifest)",
            printable(md5)
        ),
        pull::Verified::Unchecked => "not verified (--no-verify)".to_string(),
    }
}

/// Check an image in a bucket against its manifest, reading it in place
#[derive(clap::Args)]
#[command(
    long_about = "Read the image at URL with ranged reads and check its guest digest \
against its manifest (URL.diskkit.json); an object diskkit did not push is checked against the \
store's MD5 ETag (as pull does), and refused when it has none.\n\n\
Exit codes: 0 verified, 2 error or mismatch."
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
    let verified = pull::verify(store.as_ref(), &location, args.parallel.max(1), &bar)?;
    bar.finish();
    let mut out = Out::new();
    match verified {
        pull::Verified::Manifest { definition, digest } => {
            let digest = manifest_digest(definition, &digest);
            writeln!(out, "{}: OK {digest}", location.url())?
        }
        other => writeln!(out, "{}: OK, {}", location.url(), describe(&other))?,
    }
    out.flush()?;
    Ok(EXIT_OK)
}

/// List the objects in a bucket with their size, time, format and digest
#[derive(clap::Args)]
#[command(
    long_about = "List the objects under URL (recursively), manifests and unfinished uploads \
left out: KEY (relative to URL), SIZE of the object, MODIFIED (UTC), and for objects pushed by \
diskkit their FORMAT, GUEST size and DIGEST (else -). Columns are separated by tabs.\n\n\
--output json prints one JSON array instead: key, url, size, modified (RFC 3339), and format, \
guest_size, digest (null when unknown); sizes in bytes."
)]
#[command(after_help = URLS)]
pub struct LsArgs {
    /// Output: text (a header, then one line per object) or json
    #[arg(long, value_enum, default_value = "text")]
    output: LsOutput,
    #[command(flatten)]
    connection: Connection,
    /// A bucket or prefix: s3://BUCKET/, s3://BUCKET/DIR/, a local directory
    #[arg(value_name = "URL")]
    url: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LsOutput {
    Text,
    Json,
}

pub fn ls(args: LsArgs) -> Result<i32> {
    let (location, store) = args.connection.open(&args.url)?;
    let items = catalog::list(store.as_ref(), &location)?;
    let time = |t: Option<std::time::SystemTime>| t.and_then(|t| jiff::Timestamp::try_from(t).ok());
    if args.output == LsOutput::Json {
        let json: Vec<_> = items
            .iter()
            .map(|item| {
                let m = item.manifest.as_ref();
                serde_json::json!({
                    "key": item.key,
                    "url": location.with_key(&item.full_key).url(),
                    "size": item.size,
                    "modified": time(item.modified).map(|t| t.to_string()),
                    "format": m.map(|m| &m.format),
                    "guest_size": m.map(|m| m.guest.virtual_size),
                    "digest": m.map(|m| m.guest.digest_hex()),
                })
            })
            .collect();
        let text =
            serde_json::to_string_pretty(&json).map_err(|e| Error::invalid(format!("ls: {e}")))?;
        let mut out = Out::new();
        writeln!(out, "{text}")?;
        out.flush()?;
        return Ok(EXIT_OK);
    }
    let mut out = Out::new();
    writeln!(out, "KEY\tSIZE\tMODIFIED\tFORMAT\tGUEST\tDIGEST")?;
    for item in &items {
        let modified = time(item.modified).map_or("-".to_string(), |t| {
            t.strftime("%Y-%m-%d %H:%M:%S").to_string()
        });
        let (format, guest, digest) = match &item.manifest {
            Some(m) => (
                printable(&m.format).into_owned(),
                human_size(m.guest.virtual_size),
                m.guest.digest_hex(),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        writeln!(
            out,
            "{}\t{}\t{modified}\t{format}\t{guest}\t{digest}",
            printable(&item.key),
            human_size(item.size),
        )?;
    }
    out.flush()?;
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
    catalog::remove(store.as_ref(), &location)?;
    Ok(EXIT_OK)
}

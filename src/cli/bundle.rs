//! `diskkit bundle ...`: machine images (a system disk and data-disk snapshots under one
//! manifest) in a snapshot store; OVA import and export.

use super::snapshot::{Access, json, parse_tag, utc};
use super::targets::EXIT_PREFLIGHT_FAILED;
use super::util::{
    Bar, Out, OutputFormat, create_options, human_size, open_image, parse_format, printable,
};
use super::{EXIT_DIFFERENT, EXIT_OK};
use diskkit::bundle::ova::ManifestAlg;
use diskkit::bundle::ova::export::{ExportDisk, MachineHints, Ova};
use diskkit::bundle::{self, DiskInput, Firmware, Manifest, Naming, NewBundle, NewDisk, Role};
use diskkit::formats::write::CacheMode;
use diskkit::formats::{Error, Format, Image, ImageStream, Result};
use diskkit::preflight::Status;
use diskkit::snapshot::{self, NewStore, SnapshotStore};
use diskkit::targets::Cloud;
use std::path::PathBuf;
use std::time::Duration;

const STORES: &str = "STORE is a snapshot store: a local directory or s3://, oss://, obs://BUCKET/PREFIX \
(see diskkit snapshot --help). Where a bundle is read (ls, info, verify, restore, copy's source), \
STORE may also be a link made by bundle share. A bundle's disk is an image source too: \
STORE#NAME/DEVICE works as the source of info, map, compare, hash, convert and push.";

/// Machine images: a system disk and data-disk snapshots under one manifest
#[derive(clap::Args)]
#[command(
    long_about = "A bundle is what clouds call a custom image: a system disk image, a data disk \
image, a full-ECS image (the system disk and a snapshot of every data disk) or an ISO image, kept \
in a snapshot store you own. Its disks are ordinary snapshots (deduplicated with every other \
snapshot of the store); its manifest names them in order with their devices, firmware and OS \
hints. Exit codes: 0 success, 1 verify found damage, 2 error.",
    after_help = STORES
)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    Create(CreateArgs),
    Ls(LsArgs),
    Info(InfoArgs),
    Verify(VerifyArgs),
    Restore(RestoreArgs),
    Rm(RmArgs),
    Copy(CopyArgs),
    Share(ShareArgs),
    Import(ImportArgs),
    Export(ExportArgs),
    Pack(PackArgs),
}

/// Snapshot a machine's disks into a store under one manifest
#[derive(clap::Args)]
#[command(
    long_about = "Snapshots every disk in parallel, deduplicated together (a chunk two disks \
share is stored once), then writes the bundle's manifest last and only if no bundle of that name \
exists: an interrupted create leaves no bundle, and a rerun sends only the missing chunks. The \
kind follows from the disks: --system alone is a system disk image, --data alone a data disk \
image, both a full-ECS image, --iso an ISO image. An image may be @ID, a snapshot the store \
already holds, referenced as is (two bundles may then share it; bundle rm keeps it while another \
bundle lists it).",
    after_help = STORES
)]
struct CreateArgs {
    /// The system disk: an image in any format diskkit reads, or @ID
    #[arg(long, value_name = "IMAGE")]
    system: Option<String>,
    /// Guest device name of the system disk
    #[arg(long, value_name = "DEVICE", default_value = "vda")]
    system_device: String,
    /// A data disk as DEVICE=IMAGE, e.g. vdb=data.vhd (repeatable; in order)
    #[arg(long = "data", value_name = "DEVICE=IMAGE", value_parser = parse_data)]
    data: Vec<(String, String)>,
    /// An ISO image (an ISO bundle holds nothing else)
    #[arg(long, value_name = "ISO")]
    iso: Option<PathBuf>,
    /// Firmware the machine boots with
    #[arg(long, value_parser = parse_firmware)]
    firmware: Option<Firmware>,
    /// Operating system, free text (e.g. "Debian 13")
    #[arg(long, value_name = "TEXT")]
    os: Option<String>,
    /// A label, KEY=VALUE (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Chunk size of a NEW store (see snapshot create)
    #[arg(long, value_parser = super::util::parse_size)]
    chunk_size: Option<u64>,
    /// Make a NEW store encrypted (see snapshot create)
    #[arg(long)]
    encrypt: bool,
    /// Show a progress bar
    #[arg(short = 'p', long)]
    progress: bool,
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    #[command(flatten)]
    access: Access,
    store: String,
    name: String,
}

fn parse_data(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((d, i)) if !d.is_empty() && !i.is_empty() => Ok((d.to_string(), i.to_string())),
        _ => Err(format!(
            "'{s}': a data disk is DEVICE=IMAGE, e.g. vdb=data.vhd"
        )),
    }
}

fn parse_firmware(s: &str) -> std::result::Result<Firmware, String> {
    s.parse()
}

fn parse_naming(s: &str) -> std::result::Result<Naming, String> {
    s.parse()
}

/// List the bundles of a store
#[derive(clap::Args)]
#[command(after_help = STORES)]
struct LsArgs {
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    #[command(flatten)]
    access: Access,
    store: String,
}

/// Show a bundle's manifest
#[derive(clap::Args)]
#[command(after_help = STORES)]
struct InfoArgs {
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Also check the bundle against CLOUD's rule for machine imports (the number of disks,
    /// see diskkit targets); exit code 4 when it fails. Each disk's own rules run when it is
    /// written for the cloud (push --target CLOUD STORE#NAME/DEVICE URL)
    #[arg(long, value_name = "CLOUD", value_parser = parse_cloud)]
    target: Option<Cloud>,
    #[command(flatten)]
    access: Access,
    store: String,
    /// The bundle (may be omitted with a share link)
    name: Option<String>,
}

fn parse_cloud(name: &str) -> std::result::Result<Cloud, String> {
    diskkit::targets::parse(name).map_err(|e| e.to_string())
}

/// Check a bundle: manifest, snapshots, chunks (and their content with --read-data)
#[derive(clap::Args)]
#[command(
    long_about = "Checks the manifest's digest, that every disk's snapshot exists and is the \
disk the manifest names, and that every chunk is present; with --read-data every chunk is read, \
decompressed and checked against its name. Exit codes: 0 clean, 1 damage found, 2 error.",
    after_help = STORES
)]
struct VerifyArgs {
    #[arg(long)]
    read_data: bool,
    #[command(flatten)]
    access: Access,
    store: String,
    name: Option<String>,
}

/// Write every disk of a bundle out as an image file into a directory
#[derive(clap::Args)]
#[command(
    long_about = "One image per disk in DIR (created if missing), each written as convert \
writes: temporary name, synced, renamed. Names by --naming: diskkit (NAME-system.FMT, \
NAME-data-DEVICE.FMT), alibaba (NAME_system_DEVICE.FMT, NAME_data_DEVICE.FMT: the role and the \
device, as Alibaba Cloud's ExportImage names disks), tencent (PREFIX_NAME_system_SNAPSHOT.FMT, \
as Tencent Cloud's ExportImages). An ISO is restored as NAME.iso, byte for byte.",
    after_help = STORES
)]
struct RestoreArgs {
    /// Output format: raw, qcow2, vpc, vhdx, vmdk
    #[arg(short = 'O', value_parser = parse_format)]
    out_format: Option<Format>,
    /// Output format options, qemu style (repeatable)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// How files are named: diskkit, alibaba or tencent
    #[arg(long, value_parser = parse_naming, default_value = "diskkit")]
    naming: Naming,
    /// The file name prefix of --naming tencent
    #[arg(long, default_value = "diskkit")]
    prefix: String,
    /// Show a progress bar
    #[arg(short = 'p', long)]
    progress: bool,
    #[command(flatten)]
    access: Access,
    store: String,
    /// The bundle (may be omitted with a share link: STORE LINK DIR becomes LINK DIR)
    name: String,
    dir: Option<PathBuf>,
}

/// Remove a bundle and the snapshots it owns (snapshot gc then frees the chunks)
#[derive(clap::Args)]
#[command(
    long_about = "Removes the bundle's manifest, then the snapshots of its disks, as clouds \
delete an image's data-disk snapshots with it; a snapshot another bundle lists is kept. Run \
snapshot gc afterwards to free the chunks nothing references any more.",
    after_help = STORES
)]
struct RmArgs {
    #[command(flatten)]
    access: Access,
    store: String,
    name: String,
}

/// Copy a bundle to another store: only the chunks the destination lacks are sent
#[derive(clap::Args)]
#[command(
    long_about = "Copies a bundle to another directory, bucket, region or provider (DST is made \
when it does not exist, with SRC's chunk size). Only the chunks DST lacks are sent, each checked \
against its name on the way; then the snapshot indexes; every chunk is then looked for at DST \
and the manifest is written last. Interrupted, it is resumed by running it again. All disks by \
default (clouds copy only the system disk; --system-only does as they do). The same connection \
flags and key apply to both stores; each scheme reads its own environment.",
    after_help = STORES
)]
struct CopyArgs {
    /// Copy only the system disk (the copy is a system disk image)
    #[arg(long)]
    system_only: bool,
    /// Show a progress bar
    #[arg(short = 'p', long)]
    progress: bool,
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    #[command(flatten)]
    access: Access,
    src: String,
    /// The bundle (may be omitted with a share link: LINK DST)
    name: String,
    dst: Option<String>,
}

/// Print a read-only link to a bundle that works without credentials until it expires
#[derive(clap::Args)]
#[command(
    long_about = "Prints a link (a presigned URL) that bundle restore, info, verify and copy \
accept in place of STORE, with no credentials, until it expires (at most 7 days). Bundles of \
S3, OSS and OBS stores can be shared (each provider's query signature); a local directory has no \
server to serve the link, and bundles of encrypted stores cannot be shared (as clouds refuse to \
share encrypted images).",
    after_help = STORES
)]
struct ShareArgs {
    /// How long the link works: 90s, 30m, 12h, 7d
    #[arg(long, value_parser = parse_duration)]
    expires: Duration,
    #[command(flatten)]
    access: Access,
    store: String,
    name: String,
}

/// Import an OVA or OVF (any number of disks) as a bundle, reading its disks in place
#[derive(clap::Args)]
#[command(
    long_about = "Reads the OVF descriptor (first .ovf member of the OVA), checks every file its .mf manifest lists (SHA1, SHA256 or SHA512), then snapshots the disks in place, without extracting them: VMDK (streamOptimized, monolithicSparse, or a descriptor and its flat extent in the package), qcow2, VHD or raw. The descriptor's hardware order gives the machine's order: the first disk is the system disk (vda), the others data disks (vdb, vdc...). NAME defaults to the virtual system's id. An OVA is found by its content (a tar archive with an .ovf member), whatever its name.",
    after_help = STORES
)]
struct ImportArgs {
    /// Show a progress bar
    #[arg(short = 'p', long)]
    progress: bool,
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    #[command(flatten)]
    access: Access,
    /// The OVA, or the OVF descriptor with its files beside it
    src: PathBuf,
    store: String,
    name: Option<String>,
}

const OVA_LAYOUT: &str = "The OVA holds the .ovf descriptor first, the .mf manifest second \
(lines exactly ALG(name)= hex), then one streamOptimized VMDK per disk (LSI Logic adapter, as the \
OVF's SCSI controller). No temporary file either way. A file DEST is written in one compression \
pass (the .ovf's and .mf's space reserved, the disks streamed and hashed, the .ovf and .mf written \
last; temporary name, synced, renamed). For an s3://, oss:// or obs:// DEST, each disk is \
compressed once to know its size and digest, then the archive is uploaded in parts produced on \
demand, with push's checkpoint: an interrupted export resumes where it stopped when rerun (diskkit \
push --abort URL forgets it).";

/// How an OVA goes into a bucket (push's flags).
#[derive(clap::Args)]
struct UploadArgs {
    /// Parts uploaded at once (bucket DEST)
    #[arg(long, value_name = "N", default_value_t = diskkit::storage::push::DEFAULT_PARALLEL)]
    parallel: usize,
    /// Part size (bucket DEST; at least 5M; default 16M, grown to fit 10,000 parts)
    #[arg(long, value_name = "SIZE", value_parser = super::util::parse_size)]
    part_size: Option<u64>,
    /// Upload at most RATE bytes per second (bucket DEST), as qemu-img's -r
    #[arg(short = 'r', long, value_name = "RATE", value_parser = super::util::parse_size)]
    rate_limit: Option<u64>,
}

/// Export a bundle as an OVA (VMware, VirtualBox, any OVF importer)
#[derive(clap::Args)]
#[command(long_about = OVA_LAYOUT, after_help = STORES)]
struct ExportArgs {
    /// Digest algorithm of the .mf: sha256, sha1 or sha512
    #[arg(long, value_parser = parse_alg, default_value = "sha256")]
    manifest_alg: ManifestAlg,
    /// Show a progress bar
    #[arg(short = 'p', long)]
    progress: bool,
    #[command(flatten)]
    access: Access,
    #[command(flatten)]
    upload: UploadArgs,
    store: String,
    name: String,
    /// The OVA: a file, or an object URL (s3://BUCKET/KEY.ova)
    dest: String,
}

/// Pack image files into an OVA: the first is the system disk, the others data disks
#[derive(clap::Args)]
#[command(long_about = OVA_LAYOUT)]
struct PackArgs {
    /// The machine's name in the OVF and the members' names [default: DEST's file stem]
    #[arg(long)]
    name: Option<String>,
    #[arg(long, value_parser = parse_firmware)]
    firmware: Option<Firmware>,
    #[arg(long, value_name = "TEXT")]
    os: Option<String>,
    #[arg(long, value_parser = parse_alg, default_value = "sha256")]
    manifest_alg: ManifestAlg,
    #[arg(short = 'p', long)]
    progress: bool,
    #[command(flatten)]
    access: Access,
    #[command(flatten)]
    upload: UploadArgs,
    /// Images (any source diskkit reads), in the machine's order
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// The OVA: a file, or an object URL
    dest: String,
}

fn parse_alg(s: &str) -> std::result::Result<ManifestAlg, String> {
    s.parse()
}

fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("'{s}': a duration is a number and s, m, h or d (12h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => {
            return Err(format!(
                "'{s}': a duration is a number and s, m, h or d (12h)"
            ));
        }
    };
    Ok(Duration::from_secs(secs))
}

pub fn run(args: Args) -> Result<i32> {
    match args.command {
        Command::Create(a) => create(a),
        Command::Ls(a) => ls(a),
        Command::Info(a) => info(a),
        Command::Verify(a) => verify(a),
        Command::Restore(a) => restore(a),
        Command::Rm(a) => rm(a),
        Command::Copy(a) => copy(a),
        Command::Share(a) => share(a),
        Command::Import(a) => import(a),
        Command::Export(a) => export(a),
        Command::Pack(a) => pack(a),
    }
}

/// The store to read a bundle from (a store or a share link) and the bundle's name: with a link,
/// the name is the link's unless the user names the same one.
fn open_source(
    access: &Access,
    store: &str,
    name: Option<&str>,
) -> Result<(SnapshotStore, String)> {
    if bundle::share::is_link(store) {
        let (s, shared) = bundle::share::open(store)?;
        if let Some(n) = name
            && n != shared
        {
            return Err(Error::invalid(format!(
                "the link shares bundle {shared}, not {n}"
            )));
        }
        return Ok((s, shared));
    }
    let name = name.ok_or_else(|| Error::invalid("name the bundle (STORE NAME)"))?;
    Ok((access.open(store, None)?, name.to_string()))
}

/// An image of a new bundle's disk: a file or source diskkit opens, or `@ID`.
enum Input {
    Image(Box<dyn Image>, PathBuf),
    Snapshot(String),
}

fn input(spec: &str) -> Result<Input> {
    if let Some(id) = spec.strip_prefix('@') {
        return Ok(Input::Snapshot(id.to_string()));
    }
    let path = PathBuf::from(spec);
    Ok(Input::Image(open_image(&path, None, None)?, path))
}

fn create(args: CreateArgs) -> Result<i32> {
    let mut out = Out::new();
    let mut inputs: Vec<(Role, String, Input)> = Vec::new();
    if let Some(s) = &args.system {
        inputs.push((Role::System, args.system_device.clone(), input(s)?));
    }
    for (device, spec) in &args.data {
        inputs.push((Role::Data, device.clone(), input(spec)?));
    }
    if let Some(iso) = &args.iso {
        let image = open_image(iso, None, None)?;
        if image.format() != Format::Iso {
            return Err(Error::invalid(format!(
                "{}: --iso takes an ISO 9660 image, this is {}",
                iso.display(),
                image.format()
            )));
        }
        // Kept byte for byte: restored as the same .iso file.
        let raw = open_image(iso, Some(Format::Raw), None)?;
        inputs.push((Role::Iso, "cdrom".into(), Input::Image(raw, iso.clone())));
    }
    let store = args.access.open(
        &args.store,
        Some(NewStore {
            chunk_size: args.chunk_size.unwrap_or(snapshot::DEFAULT_CHUNK_SIZE),
            encrypt: args.encrypt,
        }),
    )?;
    let disks: Vec<NewDisk<'_>> = inputs
        .iter()
        .map(|(role, device, i)| NewDisk {
            role: *role,
            device: device.clone(),
            input: match i {
                Input::Image(image, path) => DiskInput::Image(image.as_ref(), path),
                Input::Snapshot(id) => DiskInput::Snapshot(id.clone()),
            },
        })
        .collect();
    let total = inputs
        .iter()
        .map(|(_, _, i)| match i {
            Input::Image(image, _) => image.virtual_size(),
            Input::Snapshot(_) => 0,
        })
        .sum();
    let meta = NewBundle {
        firmware: args.firmware,
        os: args.os,
        tags: args.tags.into_iter().collect(),
    };
    let bar = Bar::new(args.progress, total, "bundle");
    let (manifest, reports) = bundle::create(&store, &args.name, &disks, &meta, &bar)?;
    bar.finish();
    match args.output {
        OutputFormat::Json => writeln!(
            out,
            "{}",
            json(&serde_json::json!({"manifest": manifest, "snapshots": reports}))?
        )?,
        OutputFormat::Human => {
            let read: u64 = reports.iter().map(|r| r.bytes_read).sum();
            let stored: u64 = reports.iter().map(|r| r.bytes_stored).sum();
            let reused: u64 = reports.iter().map(|r| r.bytes_reused).sum();
            writeln!(
                out,
                "{} bundle {} with {} disks: read {}, stored {} new, reused {}",
                manifest.kind.name(),
                manifest.name,
                manifest.disks.len(),
                human_size(read),
                human_size(stored),
                human_size(reused)
            )?;
            for d in &manifest.disks {
                writeln!(out, "  {} {} {}", d.role.name(), d.device, d.snapshot)?;
            }
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn ls(args: LsArgs) -> Result<i32> {
    let mut out = Out::new();
    let store = if bundle::share::is_link(&args.store) {
        bundle::share::open(&args.store)?.0
    } else {
        args.access.open(&args.store, None)?
    };
    let list = bundle::list(&store)?;
    match args.output {
        OutputFormat::Json => writeln!(out, "{}", json(&list)?)?,
        OutputFormat::Human => {
            writeln!(
                out,
                "{:<24}  {:<11}  {:>10}  {:>10}  {:<20}  DISKS",
                "NAME", "KIND", "VIRTUAL", "STORED", "CREATED"
            )?;
            for b in list {
                writeln!(
                    out,
                    "{:<24}  {:<11}  {:>10}  {:>10}  {:<20}  {}",
                    b.name,
                    b.kind.name(),
                    human_size(b.virtual_size),
                    human_size(b.stored_size),
                    utc(b.created),
                    b.disks.join(" ")
                )?;
            }
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn print_manifest(out: &mut Out, m: &Manifest) -> Result<()> {
    writeln!(out, "name: {}", m.name)?;
    writeln!(out, "kind: {}", m.kind.name())?;
    writeln!(out, "created: {}", utc(m.created))?;
    if let Some(f) = m.firmware {
        writeln!(
            out,
            "firmware: {}",
            if f == Firmware::Uefi { "uefi" } else { "bios" }
        )?;
    }
    if let Some(os) = &m.os {
        writeln!(out, "os: {}", printable(os))?;
    }
    for (k, v) in &m.tags {
        writeln!(out, "tag: {}={}", printable(k), printable(v))?;
    }
    writeln!(out, "digest: {}", m.digest)?;
    for d in &m.disks {
        writeln!(
            out,
            "disk {}: {} {} ({} bytes), from {}, snapshot {}, digest {}",
            d.device,
            d.role.name(),
            human_size(d.virtual_size),
            d.virtual_size,
            printable(&d.source_format),
            d.snapshot,
            d.digest
        )?;
    }
    Ok(())
}

fn info(args: InfoArgs) -> Result<i32> {
    let mut out = Out::new();
    let (store, name) = open_source(&args.access, &args.store, args.name.as_deref())?;
    let m = bundle::load(&store, &name)?;
    let check = args
        .target
        .map(|cloud| (cloud, diskkit::preflight::disk_count(cloud, m.disks.len())));
    match (args.output, &check) {
        (OutputFormat::Json, None) => writeln!(out, "{}", json(&m)?)?,
        (OutputFormat::Json, Some((cloud, finding))) => {
            let both =
                serde_json::json!({"bundle": m, "target": cloud.name(), "checks": [finding]});
            writeln!(out, "{}", json(&both)?)?
        }
        (OutputFormat::Human, _) => {
            print_manifest(&mut out, &m)?;
            if let Some((cloud, f)) = &check {
                writeln!(
                    out,
                    "target {}: {} {}: {}",
                    cloud.name(),
                    f.rule,
                    f.status.name(),
                    f.reason
                )?;
            }
        }
    }
    out.flush()?;
    Ok(match check {
        Some((_, f)) if f.status == Status::Fail => EXIT_PREFLIGHT_FAILED,
        _ => EXIT_OK,
    })
}

fn verify(args: VerifyArgs) -> Result<i32> {
    let mut out = Out::new();
    let (store, name) = open_source(&args.access, &args.store, args.name.as_deref())?;
    let report = bundle::verify(&store, &name, args.read_data)?;
    for p in &report.disk_problems {
        writeln!(out, "{}", printable(p))?;
    }
    for (id, e) in &report.snapshots.bad_indexes {
        writeln!(out, "snapshot {id}: {}", printable(e))?;
    }
    for d in &report.snapshots.damaged {
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
        "bundle {name}: {} snapshots, {} chunks checked{}: {}",
        report.snapshots.snapshots,
        report.snapshots.chunks_checked,
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

fn restore(args: RestoreArgs) -> Result<i32> {
    let mut out = Out::new();
    // With a link, NAME may be left out: `restore LINK DIR`.
    let (name, dir) = match (&args.dir, bundle::share::is_link(&args.store)) {
        (Some(dir), _) => (Some(args.name.as_str()), dir.clone()),
        (None, true) => (None, PathBuf::from(&args.name)),
        (None, false) => return Err(Error::invalid("bundle restore STORE NAME DIR: give DIR")),
    };
    let (store, name) = open_source(&args.access, &args.store, name)?;
    let m = bundle::load(&store, &name)?;
    let format = args.out_format.unwrap_or(Format::Raw);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create", e))?;
    let store = std::sync::Arc::new(store);
    let files: Vec<PathBuf> = m
        .disks
        .iter()
        .map(|d| {
            let name = bundle::file_name(&m, d, args.naming, format.name(), &args.prefix);
            diskkit::output::not_a_symlink(&dir.join(name))
        })
        .collect::<Result<_>>()?;
    for (d, file) in m.disks.iter().zip(files) {
        let image = diskkit::snapshot::SnapshotImage::of_shared(store.clone(), &d.snapshot)?;
        let disk_format = if d.role == Role::Iso {
            Format::Raw
        } else {
            format
        };
        let mut create = create_options(&args.options)?;
        // Written with direct I/O (qemu's cache=none), synced before the rename: a restored disk
        // is rarely read right away, and sparing the page cache halved a restore's system time.
        create.cache = CacheMode::None;
        let bar = Bar::new(
            args.progress,
            image.virtual_size(),
            &format!("restoring {}", d.device),
        );
        diskkit::convert::convert_to_path(
            &image,
            disk_format,
            &file,
            &mut create,
            &Default::default(),
            &bar,
        )?;
        bar.finish();
        writeln!(out, "{}", printable(&file.display().to_string()))?;
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn rm(args: RmArgs) -> Result<i32> {
    let mut out = Out::new();
    let store = args.access.open(&args.store, None)?;
    let report = bundle::remove(&store, &args.name)?;
    writeln!(out, "removed bundle {}", args.name)?;
    for id in &report.removed {
        writeln!(out, "removed snapshot {id}")?;
    }
    for (id, by) in &report.kept {
        writeln!(out, "kept snapshot {id} (used by {})", by.join(", "))?;
    }
    writeln!(out, "run snapshot gc to free the chunks")?;
    out.flush()?;
    Ok(EXIT_OK)
}

fn copy(args: CopyArgs) -> Result<i32> {
    let mut out = Out::new();
    let (name, dst) = match (&args.dst, bundle::share::is_link(&args.src)) {
        (Some(dst), _) => (Some(args.name.as_str()), dst.clone()),
        (None, true) => (None, args.name.clone()),
        (None, false) => return Err(Error::invalid("bundle copy SRC NAME DST: give DST")),
    };
    let (src, name) = open_source(&args.access, &args.src, name)?;
    let dst = args.access.open(
        &dst,
        Some(NewStore {
            chunk_size: src.chunk_size(),
            encrypt: false,
        }),
    )?;
    let bar = Bar::new(args.progress, 0, "copying");
    let report = bundle::copy(&src, &name, &dst, args.system_only, &bar)?;
    bar.finish();
    match args.output {
        OutputFormat::Json => writeln!(out, "{}", json(&report)?)?,
        OutputFormat::Human if report.already_there => {
            writeln!(out, "bundle {name} is already in {}", dst.url())?
        }
        OutputFormat::Human => writeln!(
            out,
            "copied bundle {name} ({} disks) to {}: {} of {} chunks sent, {}",
            report.disks,
            dst.url(),
            report.chunks_sent,
            report.chunks,
            human_size(report.bytes_sent)
        )?,
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn share(args: ShareArgs) -> Result<i32> {
    let mut out = Out::new();
    let store = args.access.open(&args.store, None)?;
    let settings = args
        .access
        .conn
        .settings()
        .resolve(store.location().scheme, args.access.conn.profile())?;
    let link = bundle::share::share(&store, &args.name, &settings, args.expires)?;
    eprintln!(
        "diskkit: bundle {} shared ({} objects) until {}",
        args.name,
        link.objects,
        utc(link.expires)
    );
    writeln!(out, "{}", link.url)?;
    out.flush()?;
    Ok(EXIT_OK)
}

fn import(args: ImportArgs) -> Result<i32> {
    let mut out = Out::new();
    let store = args.access.open(
        &args.store,
        Some(NewStore {
            chunk_size: snapshot::DEFAULT_CHUNK_SIZE,
            encrypt: false,
        }),
    )?;
    let bar = Bar::new(args.progress, 0, "importing");
    let report = bundle::ova::import(&args.src, &store, args.name.as_deref(), &bar)?;
    bar.finish();
    match args.output {
        OutputFormat::Json => writeln!(out, "{}", json(&report)?)?,
        OutputFormat::Human => {
            writeln!(
                out,
                "imported {} as {} bundle {} ({} digests of the .mf checked)",
                printable(&args.src.display().to_string()),
                report.manifest.kind.name(),
                report.name,
                report.digests_checked
            )?;
            print_manifest(&mut out, &report.manifest)?;
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

/// Writes `plan` to DEST (a file, or an object of a bucket), then names what it holds.
/// Where an OVA goes and what it is made of.
struct OvaDest<'d> {
    dest: &'d str,
    access: &'d Access,
    upload: &'d UploadArgs,
    /// What the OVA is made of (the store and bundle, or the image files): a rerun resumes an
    /// upload of the same source only.
    source: String,
    progress: bool,
}

/// Writes `ova` to a file (one compression pass) or uploads it to a bucket (a layout pass, then
/// push's resumable upload), and prints its size and members.
fn write_ova(ova: &Ova<'_, '_>, to: &OvaDest<'_>) -> Result<i32> {
    let guest = ova.disks.iter().map(|d| d.image.virtual_size()).sum();
    let mut out = Out::new();
    if to.dest.contains("://") && !to.dest.starts_with("file://") {
        let location = diskkit::storage::Location::parse(to.dest)?;
        let settings = to
            .access
            .conn
            .settings()
            .resolve(location.scheme, to.access.conn.profile())?;
        let store = diskkit::storage::open(&location, &settings)?;
        let bar = Bar::new(to.progress, guest, "laying out the disks");
        let plan = ova.plan(&bar)?;
        bar.finish();
        let opts = diskkit::storage::push::PushOptions {
            part_size: to.upload.part_size,
            parallel: to.upload.parallel.max(1),
            rate_limit: to.upload.rate_limit,
            source_name: format!("{}.ova", ova.name),
            identity: format!("ova {} layout={}", to.source, plan.layout_fingerprint()),
        };
        let system = plan.guest().virtual_size();
        let hashing = Bar::new(to.progress, system, "hashing the system disk");
        let uploading = Bar::new(to.progress, plan.size(), "uploading the OVA");
        let r = diskkit::storage::push::push(
            store.as_ref(),
            &location,
            &plan,
            &opts,
            &hashing,
            &uploading,
        )?;
        hashing.finish();
        uploading.finish();
        // Push's sidecar describes a bare image (pull and verify refuse a container): an OVA is
        // read by bundle import and pulled byte for byte, checked against its ETag.
        store.delete(&[diskkit::storage::manifest_key(&location.key)])?;
        writeln!(
            out,
            "{} ({} bytes): {}; {} parts of {}, {} sent now, {} already sent before{}",
            to.dest,
            plan.size(),
            plan.members.join(", "),
            r.parts,
            human_size(r.part_size),
            r.sent,
            r.resumed,
            if r.restarted {
                " (the earlier upload was gone on the server)"
            } else {
                ""
            }
        )?;
    } else {
        let bar = Bar::new(to.progress, guest, "writing the OVA");
        let summary = ova.write_file(
            std::path::Path::new(to.dest.strip_prefix("file://").unwrap_or(to.dest)),
            &bar,
        )?;
        bar.finish();
        writeln!(
            out,
            "{} ({} bytes): {}",
            to.dest,
            summary.size,
            summary.members.join(", ")
        )?;
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn export(args: ExportArgs) -> Result<i32> {
    let (store, name) = open_source(&args.access, &args.store, Some(&args.name))?;
    let m = bundle::load(&store, &name)?;
    let store = std::sync::Arc::new(store);
    let images: Vec<diskkit::snapshot::SnapshotImage> = m
        .disks
        .iter()
        .map(|d| diskkit::snapshot::SnapshotImage::of_shared(store.clone(), &d.snapshot))
        .collect::<Result<_>>()?;
    let disks: Vec<ExportDisk<'_>> = images
        .iter()
        .zip(&m.disks)
        .map(|(image, d)| ExportDisk {
            image,
            role: d.role,
            device: d.device.clone(),
        })
        .collect();
    let hints = MachineHints {
        firmware: m.firmware,
        os: m.os.clone(),
    };
    let ova = Ova {
        name: &name,
        disks: &disks,
        hints: &hints,
        alg: args.manifest_alg,
        mtime: m.created,
    };
    let to = OvaDest {
        dest: &args.dest,
        access: &args.access,
        upload: &args.upload,
        source: format!("{}#{name} digest={}", store.url(), m.digest),
        progress: args.progress,
    };
    write_ova(&ova, &to)
}

fn pack(args: PackArgs) -> Result<i32> {
    let name = match &args.name {
        Some(n) => n.clone(),
        None => std::path::Path::new(&args.dest)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "machine".into()),
    };
    bundle::check_name(&name)?;
    let images: Vec<Box<dyn Image>> = args
        .images
        .iter()
        .map(|p| open_image(p, None, None))
        .collect::<Result<_>>()?;
    let disks: Vec<ExportDisk<'_>> = images
        .iter()
        .enumerate()
        .map(|(i, image)| ExportDisk {
            image: image.as_ref(),
            role: if i == 0 { Role::System } else { Role::Data },
            device: format!("disk{}", i + 1),
        })
        .collect();
    let hints = MachineHints {
        firmware: args.firmware,
        os: args.os.clone(),
    };
    // The newest source's time: a rerun produces the same archive (a resumable upload).
    let mtime = args
        .images
        .iter()
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max()
        .unwrap_or_else(std::time::SystemTime::now)
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ova = Ova {
        name: &name,
        disks: &disks,
        hints: &hints,
        alg: args.manifest_alg,
        mtime,
    };
    let to = OvaDest {
        dest: &args.dest,
        access: &args.access,
        upload: &args.upload,
        source: format!("{:?} mtime={mtime}", args.images),
        progress: args.progress,
    };
    write_ova(&ova, &to)
}

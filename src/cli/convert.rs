//! `diskkit convert`: copy an image into a new one of any format, like `qemu-img convert`.

use super::EXIT_OK;
use super::targets::TargetArgs;
use super::util::{Bar, create_options, open_image, parse_format, parse_size, warn};
use diskkit::convert::{ConvertOptions, convert_into_existing, convert_to_path};
use diskkit::formats::image::GuestRange;
use diskkit::formats::write::CacheMode;
use diskkit::formats::{Error, Format, Image, Result};
use diskkit::targets::Output;
use std::path::{Path, PathBuf};

/// Convert an image to another format (or copy it), reading only its allocated data
#[derive(clap::Args)]
#[command(
    long_about = "Convert SRC into a new image DST of format -O (default raw). Only the \
ranges SRC's allocation map calls data are read; aligned runs of zeros inside them (-S) become \
holes or unallocated clusters. Work is spread over several threads with bounded memory.\n\n\
DST is written under a temporary name (.DST.diskkit-tmp-PID) in the same directory and renamed \
into place only once complete and synced: an interrupted or failed conversion never leaves a \
partial image under the final name. SIGINT, SIGTERM and SIGHUP remove the temporary file; only \
a process killed with SIGKILL (or a crash of the machine) can leave it behind. The source \
is only read, and an output that is one of the inputs is refused. With -n the existing DST is \
overwritten in place instead (raw files and block devices, an empty qcow2 image as create \
makes it, keeping its options, or a fixed VHD, keeping its size and footer); without -O, DST \
is written as the format it has (qemu-img would assume raw).\n\n\
-t CACHE sets how the output reaches the disk (qemu's cache modes; default writeback = synced \
before the rename; unsafe = qemu-img convert's default, never synced). -T, -U and -W are \
accepted for scripts written for qemu-img (see their descriptions).\n\n\
A SIGKILL (or a crash) can leave the temporary file .DST.diskkit-tmp-PID behind: the next \
conversion to the same DST removes the leftovers of processes that no longer exist.\n\n\
--target CLOUD writes what the cloud's image import accepts (diskkit targets lists them): \
-O and -o default to the target's, and a choice that breaks one of its rules is refused unless \
--force. gce writes DST as GCE's tarball: disk.raw, grown to a whole GiB (a GPT's backup header \
and partition array moved to the new end), alone in a gzip'ed GNU sparse tar. Pre-flight checks \
(diskkit check --target) run first: a failed one stops the conversion (exit code 4) unless \
--force or --no-preflight.\n\n\
Prints nothing on success unless -p. Exit codes: 0 success, 2 error, 4 a pre-flight check of \
--target failed."
)]
pub struct Args {
    /// Source format (detected from magic bytes when omitted)
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Output format: raw, qcow2, vpc (or vhd), vmdk (-o subformat=monolithicSparse|streamOptimized)
    /// [default: raw; with -n: DST's own format]
    #[arg(short = 'O', value_parser = parse_format)]
    out_format: Option<Format>,
    /// Output format options, qemu style: key=value,key2=value2 (repeatable)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Compress the output's data (qcow2; pick the algorithm with -o compression_type=zlib|zstd)
    #[arg(short = 'c')]
    compress: bool,
    /// Show a progress bar
    #[arg(short = 'p', long)]
    progress: bool,
    /// Aligned runs of at least SIZE zero bytes inside data are not written (multiple of 512;
    /// 0 writes all allocated data)
    #[arg(short = 'S', value_name = "SIZE", value_parser = parse_size, default_value = "4k")]
    sparse_size: u64,
    /// Write into the existing DST instead of creating it (raw files or block devices, an empty
    /// qcow2 image, or a fixed VHD; DST must be at least as large as SRC)
    #[arg(short = 'n')]
    no_create: bool,
    /// Make DST an overlay on BACKING: only ranges that differ from BACKING are written.
    /// BACKING is recorded as given; a relative name is relative to DST's directory
    #[arg(short = 'B', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of BACKING (detected when omitted)
    #[arg(short = 'F', value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Worker threads, 1 to 64 [default: four per CPU]; memory is about 2 MiB per thread
    /// (4 MiB with -B)
    #[arg(short = 'm', long = "parallel", value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    threads: Option<usize>,
    /// Convert the image as of this internal snapshot (qcow2; name or ID)
    #[arg(short = 'l', long = "snapshot", value_name = "NAME|ID")]
    snapshot: Option<String>,
    #[command(flatten)]
    target: TargetArgs,
    /// Cache mode of the output, as qemu's: writeback (default: through the page cache, synced
    /// before the rename), none (data written with O_DIRECT, as qemu's cache=none: the page
    /// cache is neither evicted nor filled; synced before the rename), writethrough (each write
    /// synced), directsync (both), unsafe (never
    /// synced, as qemu-img convert's default: fastest, but a crash can leave a partial image)
    #[arg(short = 't', value_name = "CACHE", value_parser = parse_cache_mode, default_value = "writeback")]
    cache: CacheMode,
    /// Cache mode of the source: accepted for qemu-img compatibility. diskkit only reads the
    /// source, memory-mapped where it can, whatever the mode
    #[arg(short = 'T', value_name = "SRC_CACHE", value_parser = parse_cache_mode)]
    src_cache: Option<CacheMode>,
    /// Force share: read an image another process holds open. Accepted for qemu-img
    /// compatibility: diskkit takes no image locks, so it always can
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Out-of-order writes: accepted for qemu-img compatibility; diskkit always writes in
    /// parallel, in any order
    #[arg(short = 'W')]
    out_of_order: bool,
    /// With -n: the existing DST reads as zeros already, so zero ranges are not written
    #[arg(long, requires = "no_create")]
    target_is_zero: bool,
    /// Read at most RATE guest bytes per second (10M, 1G...), as qemu-img's -r
    #[arg(short = 'r', long = "rate-limit", value_name = "RATE", value_parser = parse_size)]
    rate_limit: Option<u64>,
    /// Rescue a damaged source: ranges that cannot be read (I/O errors, damaged compressed
    /// data) are written as zeros and listed on stderr, instead of ending the conversion
    #[arg(long)]
    salvage: bool,
    /// Source image: a file or block device in any format diskkit reads (raw, qcow2 with its
    /// backing chain, vpc/vhd, vhdx, vmdk, iso)
    src: PathBuf,
    /// Output image: a new file (created under a temporary name, renamed into place when
    /// complete); with -n an existing image or block device written in place
    dst: PathBuf,
}

fn parse_cache_mode(s: &str) -> std::result::Result<CacheMode, String> {
    CacheMode::parse(s).map_err(|e| e.to_string())
}

pub fn run(args: Args) -> Result<i32> {
    let src = open_image(&args.src, args.format, args.snapshot.as_deref())?;
    let mut create = create_options(&args.options)?;
    let output = args.target.output(args.out_format, &mut create)?;
    if let Some(code) = args
        .target
        .preflight(src.as_ref(), &args.src, &output, &create)?
    {
        return Ok(code);
    }
    let out_format = match output {
        Output::Image { format, .. } => format,
        Output::GceTarball => return convert_gce(&args, src.as_ref()),
    };
    create.compress = args.compress;
    create.cache = args.cache;
    let backing = match &args.backing {
        Some(name) => Some(open_backing(name, args.backing_format, &args.dst)?),
        None => None,
    };
    if let Some(b) = &backing {
        create.backing_file = args.backing.clone();
        create.backing_format = Some(b.format());
    }
    let opts = ConvertOptions {
        sparse_size: args.sparse_size,
        backing: backing.as_deref(),
        threads: args.threads,
        target_is_zero: args.target_is_zero,
        rate_limit: args.rate_limit,
        salvage: args.salvage,
    };
    let bar = Bar::new(args.progress, src.virtual_size(), "converting")
        .with_data_of(&[src.as_ref()], src.virtual_size())?;
    let stats = if args.no_create {
        if args.compress || !args.options.is_empty() || args.backing.is_some() {
            return Err(Error::invalid(
                "-n writes into an existing image: -o, -c and -B need a new one",
            ));
        }
        let format = args
            .target
            .target
            .map_or(args.out_format, |_| Some(out_format));
        convert_into_existing(src.as_ref(), format, &args.dst, &opts, &bar)?
    } else {
        convert_to_path(
            src.as_ref(),
            out_format,
            &args.dst,
            &mut create,
            &opts,
            &bar,
        )?
    };
    bar.finish();
    report_salvaged(&stats.salvaged);
    Ok(EXIT_OK)
}

/// `--target gce`: DST is the tarball of disk.raw.
fn convert_gce(args: &Args, src: &dyn Image) -> Result<i32> {
    if args.no_create || args.compress || args.backing.is_some() {
        return Err(Error::invalid(
            "--target gce writes a new gzip'ed tarball: -n, -c and -B do not apply",
        ));
    }
    let tar = diskkit::gce::Tarball::of(src, &args.src)?;
    let bar = Bar::new(args.progress, tar.data_len(), "writing the GCE tarball");
    diskkit::gce::write_file(&tar, &args.dst, args.threads, args.cache, &bar)?;
    bar.finish();
    Ok(EXIT_OK)
}

/// Opens `-B NAME` as the new image will find it: relative to the new image's directory.
pub fn open_backing(name: &str, format: Option<Format>, image: &Path) -> Result<Box<dyn Image>> {
    let path = Path::new(name);
    let path = match image.parent() {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    };
    open_image(&path, format, None)
}

/// `--salvage`: one warning per unreadable range, then the total.
fn report_salvaged(ranges: &[(GuestRange, String)]) {
    for (range, why) in ranges {
        warn(&format!(
            "could not read guest bytes {range} ({} bytes), written as zeros: {why}",
            range.len()
        ));
    }
    if !ranges.is_empty() {
        let total: u64 = ranges.iter().map(|(r, _)| r.len()).sum();
        warn(&format!(
            "salvaged: {total} bytes in {} range(s) written as zeros",
            ranges.len()
        ));
    }
}

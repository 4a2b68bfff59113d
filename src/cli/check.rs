//! `diskkit check`: consistency check of image metadata, like `qemu-img check`.

use super::targets::{parse_cloud, parse_role, print_report};
use super::util::implicit_opens;
use super::util::{IMAGE_HELP, Out, OutputFormat, parse_format, printable};
use diskkit::formats::check::{self, CheckReport, Repair};
use diskkit::formats::{Error, Format, HostFile, Result, detect};
use diskkit::targets::{Cloud, Role};
use std::path::PathBuf;

/// `qemu-img check` exits with this when the format has no metadata to check (raw).
const EXIT_NO_CHECK: i32 = 63;

/// Check (and optionally repair) the metadata of an image
#[derive(clap::Args)]
#[command(
    long_about = "Check the metadata of IMAGE (qcow2: tables and refcounts; vpc: footer, \
header and block table) for corruptions and leaked space, and with -r repair them.\n\n\
Exit codes, as qemu-img check: 0 no problems, 1 the check could not complete, 2 corruptions \
remain, 3 only leaks remain, 63 the format has no checks (raw), and 2 for other errors (unreadable \
file, bad arguments).\n\n\
With --target CLOUD, IMAGE is checked against the cloud's import rules instead (pre-flight; \
diskkit targets lists them): the format accepted, the virtual size within the vendor's limits \
and aligned (Azure 1 MiB, GCE 1 GiB; a warning when diskkit rounds it on output), a partition \
table (MBR or GPT: headers, CRCs, backup header at the end), a boot partition (bootable MBR \
partition, EFI system partition or BIOS boot partition) on system disks, the qcow2 compat \
level, the VHD footer (cookie, disk type, checksum) and the image's metadata. Each rule is \
reported as pass, warn or fail with its reason (--output json: target, filename, role, and \
checks: rule, status, reason). Exit codes with --target: 0 no rule failed (warnings allowed), \
4 a rule failed, 2 error."
)]
pub struct Args {
    /// Image format (detected from magic bytes when omitted)
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Repair: leaks (free unused clusters) or all (leaks and corruptions)
    #[arg(short = 'r', value_enum)]
    repair: Option<RepairArg>,
    /// Output format: text, or JSON with qemu-img check's fields
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Print nothing; only the exit code tells
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Check IMAGE against CLOUD's import rules instead (aws, azure, gce, alibaba, huawei,
    /// tencent, ucloud)
    #[arg(long, value_name = "CLOUD", value_parser = parse_cloud, conflicts_with = "repair")]
    target: Option<Cloud>,
    /// With --target: what the disk is for, system or data (partition table, boot partition and
    /// size limits depend on it; unknown: those rules warn instead of failing)
    #[arg(long, value_name = "ROLE", value_parser = parse_role, requires = "target")]
    role: Option<Role>,
    #[arg(help = IMAGE_HELP)]
    image: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum RepairArg {
    Leaks,
    All,
}

pub fn run(args: Args) -> Result<i32> {
    if let Some(cloud) = args.target {
        let report = diskkit::preflight::check_file(
            cloud,
            &args.image,
            args.format,
            args.role,
            implicit_opens(),
        )?;
        if args.quiet {
            return Ok(if report.failed() {
                super::targets::EXIT_PREFLIGHT_FAILED
            } else {
                super::EXIT_OK
            });
        }
        return print_report(&report, args.output);
    }
    let repair = args.repair.map(|r| match r {
        RepairArg::Leaks => Repair::Leaks,
        RepairArg::All => Repair::All,
    });
    // The image is not opened as a whole: a check must work on images too damaged to open.
    let checked = match args
        .image
        .to_str()
        .filter(|s| !args.image.exists() && diskkit::storage::is_bucket_url(s))
    {
        Some(url) => {
            if repair.is_some() {
                return Err(Error::invalid(format!(
                    "{url}: -r repairs local files only: pull the object, repair it, push it back"
                )));
            }
            let settings = diskkit::storage::Settings::default();
            diskkit::storage::check_object(url, &settings, args.format)?
        }
        None => {
            let format = match args.format {
                Some(f) => f,
                None => detect(&HostFile::open(&args.image)?)?,
            };
            let report = check::check_with(format, &args.image, repair, implicit_opens())?;
            (format, report)
        }
    };
    let (_, Some(report)) = checked else {
        eprintln!(
            "diskkit: {}: this image format ({}) does not support checks",
            args.image.display(),
            checked.0
        );
        return Ok(EXIT_NO_CHECK);
    };
    if !args.quiet {
        let mut out = Out::new();
        match args.output {
            OutputFormat::Human => write!(out, "{}", human(&report))?,
            OutputFormat::Json => writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&report).map_err(|e| Error::invalid(e.to_string()))?
            )?,
        }
        out.flush()?;
    }
    Ok(report.exit_code())
}

/// The report in qemu-img check's words.
fn human(r: &CheckReport) -> String {
    let mut out = String::new();
    for m in &r.messages {
        out.push_str(&printable(m));
        out.push('\n');
    }
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        out.push_str(&format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\n",
            r.leaks_fixed, r.corruptions_fixed
        ));
    }
    let corruptions = r.corruptions - r.corruptions_fixed.min(r.corruptions);
    let leaks = r.leaks - r.leaks_fixed.min(r.leaks);
    if corruptions == 0 && leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    }
    if corruptions > 0 {
        out.push_str(&format!(
            "\n{corruptions} errors were found on the image.\nData may be corrupted, or further \
             writes to the image may corrupt it.\n"
        ));
    }
    if leaks > 0 {
        out.push_str(&format!(
            "\n{leaks} leaked clusters were found on the image.\nThis means waste of disk space, \
             but no harm to data.\n"
        ));
    }
    if r.check_errors > 0 {
        out.push_str(&format!(
            "\n{} internal errors have occurred during the check.\n",
            r.check_errors
        ));
    }
    if let (Some(total), Some(alloc)) = (r.total_clusters, r.allocated_clusters)
        && total > 0
        && alloc > 0
    {
        // As qemu-img: fragmented and compressed are shares of the allocated clusters.
        let pct = |n: u64, of: u64| n as f64 * 100.0 / of as f64;
        out.push_str(&format!(
            "{alloc}/{total} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            pct(alloc, total),
            pct(r.fragmented_clusters.unwrap_or(0), alloc),
            pct(r.compressed_clusters.unwrap_or(0), alloc)
        ));
    }
    if let Some(end) = r.image_end_offset {
        out.push_str(&format!("Image end offset: {end}\n"));
    }
    out
}

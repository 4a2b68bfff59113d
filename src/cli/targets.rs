//! `diskkit targets`, and what convert, push and check share about `--target CLOUD`: the
//! flags, picking the output from the target table, the pre-flight report and its exit code.

use super::EXIT_OK;
use super::util::{Out, OutputFormat, human_size, printable, warn};
use diskkit::formats::write::CreateOptions;
use diskkit::formats::{Error, Format, Image, Result};
use diskkit::preflight::{self, Report, Status};
use diskkit::targets::{self, Cloud, Output, PROFILES, Role, TableNeeded};
use std::path::Path;

/// Exit code of a pre-flight check that failed (check --target; convert and push refuse).
pub const EXIT_PREFLIGHT_FAILED: i32 = 4;

/// Help of `--target`: the clouds.
pub const TARGET_HELP: &str = "Write what CLOUD's image import accepts: aws (streamOptimized \
VMDK), azure (fixed VHD, size a whole MiB), gce (disk.raw in a gzip'ed GNU sparse tar, size a \
whole GiB, a GPT's backup moved to the end), alibaba, huawei, tencent, ucloud (qcow2). -O/-o \
that break the target's rules are refused (see diskkit targets); pre-flight checks run first";

pub fn parse_cloud(s: &str) -> std::result::Result<Cloud, String> {
    targets::parse(s).map_err(|e| e.to_string())
}

pub fn parse_role(s: &str) -> std::result::Result<Role, String> {
    Role::parse(s).map_err(|e| e.to_string())
}

/// `--target` and its companions, on convert and push.
#[derive(clap::Args)]
pub struct TargetArgs {
    #[arg(long, value_name = "CLOUD", value_parser = parse_cloud, help = TARGET_HELP)]
    pub target: Option<Cloud>,
    /// With --target: write an explicit -O/-o that breaks a target rule, and go on when a
    /// pre-flight check fails; what the import will refuse is printed
    #[arg(long, requires = "target")]
    pub force: bool,
    /// With --target: skip the pre-flight checks
    #[arg(long, requires = "target")]
    pub no_preflight: bool,
    /// With --target: what the disk is for, system or data (the pre-flight checks of partition
    /// table, boot partition and size limits depend on it; unknown: they warn)
    #[arg(long, value_name = "ROLE", value_parser = parse_role, requires = "target")]
    pub role: Option<Role>,
}

impl TargetArgs {
    /// What to write from `-O` (`out_format`), the `-o` options in `create` and `--target`:
    /// the target's format and options fill in what was not given; a choice that breaks one of
    /// its rules is refused, or with --force written after a warning.
    pub fn output(&self, out_format: Option<Format>, create: &mut CreateOptions) -> Result<Output> {
        let Some(cloud) = self.target else {
            return Ok(Output::Image {
                format: out_format.unwrap_or(Format::Raw),
                options: &[],
            });
        };
        let resolved = targets::resolve(cloud, out_format, create);
        if !resolved.broken.is_empty() {
            if !self.force {
                return Err(targets::refusal(cloud, &resolved.broken));
            }
            for b in &resolved.broken {
                warn(&format!("--force: --target {}: {b}", cloud.name()));
            }
        }
        Ok(resolved.output)
    }

    /// Runs the pre-flight checks of `src` (`path`) for `output`, unless --no-preflight:
    /// warnings and failures go to stderr. `Some(exit code)` when a check failed and --force
    /// was not given: the caller stops.
    pub fn preflight(
        &self,
        src: &dyn Image,
        path: &Path,
        output: &Output,
        create: &CreateOptions,
    ) -> Result<Option<i32>> {
        let Some(cloud) = self.target else {
            return Ok(None);
        };
        if self.no_preflight {
            return Ok(None);
        }
        let report = preflight::check_planned(cloud, src, path, output, create, self.role);
        for f in report.checks.iter().filter(|f| f.status != Status::Pass) {
            eprintln!(
                "diskkit: pre-flight {} {}: {}: {}",
                cloud.name(),
                f.status.name(),
                f.rule,
                printable(&f.reason)
            );
        }
        if !report.failed() {
            return Ok(None);
        }
        if self.force {
            warn(&format!(
                "--force: writing it anyway; the {} import will refuse it for the failed checks above",
                cloud.name()
            ));
            return Ok(None);
        }
        eprintln!(
            "diskkit: pre-flight checks for --target {} failed: nothing written (--force writes \
             it anyway, --no-preflight skips the checks; exit code {EXIT_PREFLIGHT_FAILED})",
            cloud.name()
        );
        Ok(Some(EXIT_PREFLIGHT_FAILED))
    }
}

/// Prints a pre-flight report as text or JSON; returns its exit code (0, or
/// [`EXIT_PREFLIGHT_FAILED`] when a rule failed).
pub fn print_report(report: &Report, output: OutputFormat) -> Result<i32> {
    let mut out = Out::new();
    match output {
        OutputFormat::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(report).map_err(|e| Error::invalid(e.to_string()))?
        )?,
        OutputFormat::Human => {
            writeln!(
                out,
                "{} for {}:",
                printable(&report.filename),
                report.target
            )?;
            for f in &report.checks {
                writeln!(
                    out,
                    "  {:<4}  {}: {}",
                    f.status.name(),
                    f.rule,
                    printable(&f.reason)
                )?;
            }
            let count = |s| report.checks.iter().filter(|f| f.status == s).count();
            writeln!(
                out,
                "{}: {} passed, {} warnings, {} failed",
                report.worst().name(),
                count(Status::Pass),
                count(Status::Warn),
                count(Status::Fail)
            )?;
        }
    }
    out.flush()?;
    Ok(if report.failed() {
        EXIT_PREFLIGHT_FAILED
    } else {
        EXIT_OK
    })
}

/// List the cloud targets and the import rules each encodes
#[derive(clap::Args)]
#[command(
    long_about = "List the clouds --target knows (convert, push, check) with what each \
writes by default, the formats its import accepts, its size, alignment and disk-count limits, \
whether it needs a partition table, and notes on what diskkit cannot check; every rule with the \
vendor requirement it encodes.\n\n--output json prints the same as one JSON array.\n\n\
Exit codes: 0 success, 2 error."
)]
pub struct Args {
    /// Output format: text or JSON
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
}

pub fn run(args: Args) -> Result<i32> {
    let mut out = Out::new();
    if args.output == OutputFormat::Json {
        let text =
            serde_json::to_string_pretty(&PROFILES).map_err(|e| Error::invalid(e.to_string()))?;
        writeln!(out, "{text}")?;
        out.flush()?;
        return Ok(EXIT_OK);
    }
    for p in &PROFILES {
        writeln!(out, "{}: {}", p.cloud.name(), p.vendor)?;
        writeln!(out, "  writes: {}", p.output.describe())?;
        let accepts: Vec<String> = p
            .accepts
            .iter()
            .map(|a| match a.subformat {
                Some(s) => format!("{} ({s})", a.format.name()),
                None => a.format.name().to_string(),
            })
            .collect();
        if !accepts.is_empty() {
            writeln!(out, "  accepts: {}", accepts.join(", "))?;
        }
        writeln!(out, "  format: {}", p.formats_requirement)?;
        for l in p.sizes {
            writeln!(
                out,
                "  size: {} to {}{}: {}",
                human_size(l.min),
                human_size(l.max),
                match l.role {
                    Some(Role::System) => " (system disks)",
                    Some(Role::Data) => " (data disks)",
                    None => "",
                },
                l.requirement
            )?;
        }
        if let Some(a) = p.alignment {
            writeln!(
                out,
                "  alignment: {}: {}",
                human_size(a.value),
                a.requirement
            )?;
        }
        if let Some(d) = p.max_disks {
            writeln!(out, "  disks: at most {}: {}", d.value, d.requirement)?;
        }
        writeln!(
            out,
            "  partition table: {}",
            match p.partition_table {
                TableNeeded::Always => "required (MBR or GPT)",
                TableNeeded::SystemDisk =>
                    "required on system disks, with a bootable or EFI system partition",
            }
        )?;
        for n in p.notes {
            writeln!(out, "  note: {n}")?;
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

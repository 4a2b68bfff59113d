//! Pre-flight checks: an image against a cloud's import rules ([`crate::targets`]), so that what
//! the import would refuse is known before a long upload. Every rule gives pass, warn or fail
//! with its reason; `diskkit check --target` runs them on a file as it is ([`check_file`]),
//! convert and push on what they are about to write ([`check_output`]).

use crate::targets::{Cloud, Output, Profile, Role, TableNeeded};
use diskkit_formats::check::check_with;
use diskkit_formats::partition::{self, PartitionTable};
use diskkit_formats::vhd::layout::{DiskType, FOOTER_SIZE, Footer};
use diskkit_formats::write::CreateOptions;
use diskkit_formats::{
    Format, HostFile, Image, ImplicitOpens, OpenOptions, Result, detect, open_with,
};
use serde::Serialize;
use std::path::Path;

/// How a rule went. Ordered: the worst of a report is its maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One rule's result.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// The rule: `format`, `size`, `alignment`, `partition-table`, `gpt`, `bootable`,
    /// `qcow2-compat`, `vhd-footer`, `metadata`, `disks`, `image`.
    pub rule: &'static str,
    pub status: Status,
    pub reason: String,
}

fn finding(rule: &'static str, status: Status, reason: impl Into<String>) -> Finding {
    Finding {
        rule,
        status,
        reason: reason.into(),
    }
}

/// All rules of one target for one image.
#[derive(Debug, Serialize)]
pub struct Report {
    pub target: &'static str,
    pub filename: String,
    pub role: Option<Role>,
    pub checks: Vec<Finding>,
}

impl Report {
    pub fn worst(&self) -> Status {
        self.checks
            .iter()
            .map(|f| f.status)
            .max()
            .unwrap_or(Status::Pass)
    }

    pub fn failed(&self) -> bool {
        self.worst() == Status::Fail
    }
}

/// What is uploaded: the format (with its subformat) and the virtual size the import sees.
struct Upload {
    format: Format,
    subformat: Option<String>,
    virtual_size: u64,
    /// The file is written by diskkit for the target (convert/push), not uploaded as it is.
    converted: bool,
}

/// Checks the image file at `path` as it is (`diskkit check --target`): the file-level rules
/// (VHD footer, metadata) first, so that an image too damaged to open still gets a report,
/// then the rules on its content. `format` forces the format (detected when `None`).
pub fn check_file(
    cloud: Cloud,
    path: &Path,
    format: Option<Format>,
    role: Option<Role>,
    policy: ImplicitOpens,
) -> Result<Report> {
    let profile = cloud.profile();
    let format = match format {
        Some(f) => f,
        None => detect(&HostFile::open(path)?)?,
    };
    let mut checks = Vec::new();
    if format == Format::Vhd {
        checks.push(
            vhd_footer(path, cloud)
                .unwrap_or_else(|e| finding("vhd-footer", Status::Fail, e.to_string())),
        );
    }
    match check_with(format, path, None, policy) {
        Err(e) => checks.push(finding("metadata", Status::Fail, e.to_string())),
        Ok(None) => {}
        Ok(Some(r)) => checks.push(if r.corruptions > 0 || r.check_errors > 0 {
            finding(
                "metadata",
                Status::Fail,
                format!(
                    "{} corruptions, {} check errors (diskkit check tells which)",
                    r.corruptions, r.check_errors
                ),
            )
        } else if r.leaks > 0 {
            finding(
                "metadata",
                Status::Warn,
                format!(
                    "{} leaked clusters (harmless; check -r leaks frees them)",
                    r.leaks
                ),
            )
        } else {
            finding("metadata", Status::Pass, "no corruptions or leaks")
        }),
    }
    let opts = OpenOptions {
        format: Some(format),
        ..OpenOptions::default()
    };
    let image = match open_with(path, &opts, policy) {
        Ok(i) => i,
        Err(e) => {
            checks.push(finding(
                "image",
                Status::Fail,
                format!("cannot be opened: {e}"),
            ));
            return Ok(report(cloud, path, role, checks));
        }
    };
    let upload = Upload {
        format,
        subformat: subformat_of(image.as_ref()),
        virtual_size: image.virtual_size(),
        converted: false,
    };
    content_rules(profile, image.as_ref(), path, role, &upload, &mut checks);
    Ok(report(cloud, path, role, checks))
}

/// Checks what convert or push will write for `cloud` from `src` (`path` names it): `output`
/// with the `subformat` the options give, of `virtual_size` bytes (the writer's rounding done).
pub fn check_output(
    cloud: Cloud,
    src: &dyn Image,
    path: &Path,
    output: &Output,
    subformat: Option<String>,
    virtual_size: u64,
    role: Option<Role>,
) -> Report {
    let format = match output {
        Output::Image { format, .. } => *format,
        Output::GceTarball => Format::Raw,
    };
    let upload = Upload {
        format,
        subformat,
        virtual_size,
        converted: true,
    };
    let mut checks = Vec::new();
    content_rules(cloud.profile(), src, path, role, &upload, &mut checks);
    report(cloud, path, role, checks)
}

/// [`check_output`] of what convert or push is about to write for `cloud` from `src` with the
/// create options `create`: the subformat they give and the source's virtual size.
pub fn check_planned(
    cloud: Cloud,
    src: &dyn Image,
    path: &Path,
    output: &Output,
    create: &CreateOptions,
    role: Option<Role>,
) -> Report {
    let subformat = match output {
        Output::Image { format, .. } => crate::targets::output_subformat(*format, create),
        Output::GceTarball => None,
    };
    check_output(
        cloud,
        src,
        path,
        output,
        subformat,
        src.virtual_size(),
        role,
    )
}

/// The disk-count rule for a bundle of `disks` disks (one import).
pub fn disk_count(cloud: Cloud, disks: usize) -> Finding {
    match cloud.profile().check_disk_count(disks) {
        Ok(()) => finding(
            "disks",
            Status::Pass,
            match cloud.profile().max_disks {
                Some(l) => format!("{disks} disks, at most {}", l.value),
                None => format!("{disks} disks; no limit stated"),
            },
        ),
        Err(reason) => finding("disks", Status::Fail, reason),
    }
}

fn report(cloud: Cloud, path: &Path, role: Option<Role>, checks: Vec<Finding>) -> Report {
    Report {
        target: cloud.name(),
        filename: path.display().to_string(),
        role,
        checks,
    }
}

/// The subformat the image's `info` reports (VHD type, VMDK create type).
fn subformat_of(image: &dyn Image) -> Option<String> {
    let specific = image.info().format_specific?;
    let data = specific.get("data")?;
    data.get("subformat")
        .or_else(|| data.get("create-type"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g.fract() == 0.0 {
        format!("{g} GiB")
    } else {
        format!("{g:.3} GiB")
    }
}

/// The rules on the guest and the upload's format and size.
fn content_rules(
    profile: &Profile,
    image: &dyn Image,
    path: &Path,
    role: Option<Role>,
    upload: &Upload,
    checks: &mut Vec<Finding>,
) {
    checks.push(format_rule(profile, upload));
    checks.extend(size_rules(profile, role, upload));
    if let Some(a) = profile.alignment {
        let size = upload.virtual_size;
        checks.push(if size.is_multiple_of(a.value) {
            finding(
                "alignment",
                Status::Pass,
                format!("{size} bytes: {}", a.requirement),
            )
        } else if upload.converted || !profile.accepts(upload.format, upload.subformat.as_deref()) {
            finding(
                "alignment",
                Status::Warn,
                format!(
                    "{size} bytes: {}; diskkit rounds it up to {} on output",
                    a.requirement,
                    size.next_multiple_of(a.value)
                ),
            )
        } else {
            finding(
                "alignment",
                Status::Fail,
                format!("{size} bytes: {}", a.requirement),
            )
        });
    }
    match upload.format {
        Format::Qcow2 => checks.push(qcow2_compat(image, upload.converted)),
        Format::Vhd if upload.converted => checks.push(finding(
            "vhd-footer",
            Status::Pass,
            "diskkit writes the footer (cookie \"conectix\", checksum)",
        )),
        _ => {}
    }
    let table = partition::read(image, path);
    checks.extend(table_rules(profile, role, &table));
}

fn format_rule(profile: &Profile, upload: &Upload) -> Finding {
    let what = match &upload.subformat {
        Some(s) => format!("{} ({s})", upload.format.name()),
        None => upload.format.name().to_string(),
    };
    let cloud = profile.cloud.name();
    if upload.converted && profile.output == Output::GceTarball && upload.format == Format::Raw {
        return finding(
            "format",
            Status::Pass,
            format!("diskkit writes it: {}", profile.formats_requirement),
        );
    }
    if profile.accepts(upload.format, upload.subformat.as_deref()) {
        return finding(
            "format",
            Status::Pass,
            format!("{what}: {}", profile.formats_requirement),
        );
    }
    if upload.converted {
        finding(
            "format",
            Status::Fail,
            format!("{what}: {}", profile.formats_requirement),
        )
    } else {
        finding(
            "format",
            Status::Warn,
            format!(
                "{what} is not accepted as it is: {}; diskkit convert --target {cloud} (or push \
                 --target {cloud}) writes {}",
                profile.formats_requirement,
                profile.output.describe()
            ),
        )
    }
}

fn size_rules(profile: &Profile, role: Option<Role>, upload: &Upload) -> Vec<Finding> {
    let size = upload.virtual_size;
    let mut out = Vec::new();
    for l in profile.size_limits(role, Some(upload.format)) {
        let inside = (l.min..=l.max).contains(&size);
        let status = match (inside, role, l.role) {
            (true, ..) => Status::Pass,
            // The user did not say which kind of disk: a limit of one role only warns.
            (false, None, Some(_)) => Status::Warn,
            (false, ..) => Status::Fail,
        };
        out.push(finding(
            "size",
            status,
            format!("virtual size {}: {}", gib(size), l.requirement),
        ));
    }
    if out.is_empty() {
        out.push(finding(
            "size",
            Status::Pass,
            format!("virtual size {}: the vendor states no limit", gib(size)),
        ));
    }
    out
}

fn qcow2_compat(image: &dyn Image, converted: bool) -> Finding {
    if converted {
        return finding(
            "qcow2-compat",
            Status::Pass,
            "diskkit writes qcow2 compat 1.1 (version 3) with zlib compression, which every \
             vendor's import reads",
        );
    }
    let data = image
        .info()
        .format_specific
        .and_then(|s| s.get("data").cloned())
        .unwrap_or_default();
    let compat = data.get("compat").and_then(|v| v.as_str()).unwrap_or("?");
    let mut newer = Vec::new();
    if data.get("compression-type").and_then(|v| v.as_str()) == Some("zstd") {
        newer.push("zstd compression (qemu 5.1+)");
    }
    if data.get("extended-l2").and_then(|v| v.as_bool()) == Some(true) {
        newer.push("extended L2 entries (qemu 5.2+)");
    }
    if data.get("data-file").is_some() {
        newer.push("an external data file (not uploaded with the image)");
    }
    match (compat, newer.is_empty()) {
        ("0.10" | "1.1", true) => finding(
            "qcow2-compat",
            Status::Pass,
            format!("compat {compat}: read by every import service's qemu-img"),
        ),
        (_, true) => finding(
            "qcow2-compat",
            Status::Warn,
            format!("compat {compat}: import services read 0.10 and 1.1"),
        ),
        (_, false) => finding(
            "qcow2-compat",
            Status::Fail,
            format!(
                "compat {compat} with {}: the import's qemu-img may not read it; diskkit convert \
                 -O qcow2 writes a plain compat 1.1 image",
                newer.join(", ")
            ),
        ),
    }
}

/// The VHD footer at the end of the file: cookie, checksum, disk type (Azure: fixed, and a file
/// size of the virtual size + 512).
fn vhd_footer(path: &Path, cloud: Cloud) -> Result<Finding> {
    let file = HostFile::open(path)?;
    let len = file.len();
    if len < FOOTER_SIZE {
        return Ok(finding(
            "vhd-footer",
            Status::Fail,
            format!("{len} bytes: too short for a 512-byte footer"),
        ));
    }
    let mut bytes = [0u8; FOOTER_SIZE as usize];
    file.read_exact_at(&mut bytes, len - FOOTER_SIZE, "VHD footer")?;
    let at = len - FOOTER_SIZE;
    if !Footer::has_cookie(&bytes) {
        let reason = format!(
            "no \"conectix\" cookie in the footer at offset {at:#x}: the file is not a VHD \
             ending in its footer (a copy cut short, or a dynamic VHD whose end was lost)"
        );
        return Ok(finding("vhd-footer", Status::Fail, reason));
    }
    if !Footer::checksum_ok(&bytes) {
        let reason = format!("footer at offset {at:#x}: checksum does not match its content");
        return Ok(finding("vhd-footer", Status::Fail, reason));
    }
    let footer = Footer::parse(&bytes);
    let (status, reason) = match DiskType::from_raw(footer.disk_type) {
        None => (
            Status::Fail,
            format!(
                "disk type {} is not fixed (2) or dynamic (3)",
                footer.disk_type
            ),
        ),
        Some(DiskType::Differencing) => (
            Status::Fail,
            "a differencing VHD needs its parent: no import takes it (diskkit convert -O vpc \
             flattens it)"
                .to_string(),
        ),
        Some(DiskType::Fixed)
            if cloud == Cloud::Azure && len != footer.current_size.saturating_add(FOOTER_SIZE) =>
        {
            (
                Status::Fail,
                format!(
                    "fixed VHD of {len} bytes, not its virtual size {} + 512: Azure needs the \
                     file size to be exactly that",
                    footer.current_size
                ),
            )
        }
        Some(t) => (
            Status::Pass,
            format!("cookie \"conectix\", checksum valid, {} disk", t.name()),
        ),
    };
    Ok(finding("vhd-footer", status, reason))
}

/// Partition table, GPT and bootable-partition rules.
fn table_rules(
    profile: &Profile,
    role: Option<Role>,
    table: &Result<PartitionTable>,
) -> Vec<Finding> {
    let table = match table {
        Ok(t) => t,
        Err(e) => return vec![finding("partition-table", Status::Fail, e.to_string())],
    };
    let needed = profile.partition_table == TableNeeded::Always || role == Some(Role::System);
    let mut out = Vec::new();
    let gce = profile.output == Output::GceTarball;
    match (&table.gpt, &table.mbr) {
        (Some(gpt), mbr) => {
            out.push(finding(
                "partition-table",
                Status::Pass,
                format!("GPT with {} partitions", gpt.partitions.len()),
            ));
            let last = table.disk_sectors - 1;
            out.push(match &gpt.backup {
                Err(e) if gce => finding(
                    "gpt",
                    Status::Warn,
                    format!("{e}; diskkit --target gce rewrites the backup from the primary"),
                ),
                Err(e) => finding("gpt", Status::Fail, e.to_string()),
                Ok(b) if b.my_lba != last && gce => finding(
                    "gpt",
                    Status::Warn,
                    format!(
                        "backup header at LBA {}, not at the disk's last LBA {last}: diskkit \
                         --target gce moves it to the end",
                        b.my_lba
                    ),
                ),
                Ok(b) if b.my_lba != last => finding(
                    "gpt",
                    Status::Warn,
                    format!(
                        "backup header at LBA {}, not at the disk's last LBA {last} (the disk \
                         grew without moving it): firmware may report the GPT damaged; sgdisk -e \
                         moves it",
                        b.my_lba
                    ),
                ),
                Ok(_) if !mbr.as_ref().is_some_and(|m| m.is_protective()) => finding(
                    "gpt",
                    Status::Warn,
                    "headers and CRCs valid, backup at the end, but no protective MBR",
                ),
                Ok(_) => finding(
                    "gpt",
                    Status::Pass,
                    "headers and partition arrays valid (CRCs), backup header at the disk's end",
                ),
            });
        }
        (None, Some(mbr)) => out.push(finding(
            "partition-table",
            Status::Pass,
            format!("MBR with {} partitions", mbr.partitions.len()),
        )),
        (None, None) => out.push(finding(
            "partition-table",
            match (needed, role) {
                (true, _) => Status::Fail,
                (false, None) => Status::Warn,
                (false, Some(_)) => Status::Pass,
            },
            match (needed, role) {
                (false, Some(Role::Data)) => "none (a data disk needs none)".to_string(),
                _ if profile.partition_table == TableNeeded::Always => format!(
                    "none: {} needs an MBR or GPT partition table",
                    profile.vendor
                ),
                _ => format!("none: {}", crate::targets::BOOT_TABLE),
            },
        )),
    }
    out.push(bootable_rule(role, table));
    out
}

fn bootable_rule(role: Option<Role>, table: &PartitionTable) -> Finding {
    if role == Some(Role::Data) {
        return finding(
            "bootable",
            Status::Pass,
            "a data disk needs no boot partition",
        );
    }
    let gpt_boot = table
        .gpt
        .as_ref()
        .and_then(|g| g.partitions.iter().find(|p| p.is_boot()));
    let mbr_boot = table
        .mbr
        .as_ref()
        .and_then(|m| m.partitions.iter().find(|p| p.bootable));
    match (gpt_boot, mbr_boot) {
        (Some(p), _) => finding(
            "bootable",
            Status::Pass,
            format!(
                "GPT partition {} is {}",
                p.number,
                if p.is_esp() {
                    "an EFI system partition"
                } else {
                    "a BIOS boot partition (or marked legacy-BIOS-bootable)"
                }
            ),
        ),
        (None, Some(p)) => finding(
            "bootable",
            Status::Pass,
            format!("MBR partition {} is marked bootable", p.number),
        ),
        (None, None) => finding(
            "bootable",
            if role == Some(Role::System) {
                Status::Fail
            } else {
                Status::Warn
            },
            format!(
                "no EFI system partition, BIOS boot partition or bootable MBR partition: {}{}",
                crate::targets::BOOT_TABLE,
                if role.is_none() {
                    " (--role system makes this a failure, --role data skips it)"
                } else {
                    ""
                }
            ),
        ),
    }
}

//! The cloud target table: what each cloud's image import accepts, one [`Profile`] per cloud,
//! each rule carrying the vendor requirement it encodes (the text users see). `--target`
//! (convert, push), `diskkit targets` and the pre-flight checks ([`crate::preflight`]) all read
//! this table and nothing else.
//!
//! Numbers come from the vendors' import documentation; a rule diskkit cannot check from the
//! image (bucket region, storage class) is listed as a note.

use diskkit_formats::write::CreateOptions;
use diskkit_formats::{Error, Format, Result};
use serde::Serialize;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A cloud `--target` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cloud {
    /// AWS VM Import: streamOptimized VMDK
    Aws,
    /// Azure: fixed VHD, size a whole MiB
    Azure,
    /// Google Compute Engine: disk.raw in a gzip'ed GNU sparse tar, size a whole GiB
    Gce,
    /// Alibaba Cloud ECS image import
    Alibaba,
    /// Huawei Cloud IMS
    Huawei,
    /// Tencent Cloud CVM image import
    Tencent,
    /// UCloud image import
    Ucloud,
}

impl Cloud {
    pub const ALL: [Cloud; 7] = [
        Cloud::Aws,
        Cloud::Azure,
        Cloud::Gce,
        Cloud::Alibaba,
        Cloud::Huawei,
        Cloud::Tencent,
        Cloud::Ucloud,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cloud::Aws => "aws",
            Cloud::Azure => "azure",
            Cloud::Gce => "gce",
            Cloud::Alibaba => "alibaba",
            Cloud::Huawei => "huawei",
            Cloud::Tencent => "tencent",
            Cloud::Ucloud => "ucloud",
        }
    }

    /// The cloud's profile.
    pub fn profile(self) -> &'static Profile {
        PROFILES
            .iter()
            .find(|p| p.cloud == self)
            .expect("every cloud has a profile")
    }
}

/// What a disk is for: some limits differ between the disk a machine boots from and the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The disk the machine boots from
    System,
    /// Any other disk
    Data,
}

/// What `--target` writes when no `-O` is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// An image of `format` with these `-o` options (each unless given).
    Image {
        format: Format,
        options: &'static [(&'static str, &'static str)],
    },
    /// GCE's `disk.raw` in a gzip'ed GNU sparse tar ([`crate::gce`]).
    GceTarball,
}

impl Output {
    /// `vmdk -o subformat=streamOptimized`, `disk.raw in a gzip'ed GNU sparse tar`.
    pub fn describe(&self) -> String {
        match self {
            Output::Image {
                format,
                options: [],
            } => format.name().to_string(),
            Output::Image { format, options } => {
                let o: Vec<String> = options.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{} -o {}", format.name(), o.join(","))
            }
            Output::GceTarball => "disk.raw in a gzip'ed GNU (oldgnu) sparse tar".to_string(),
        }
    }
}

/// A format the cloud imports; `subformat` restricts it to one kind (qemu's `subformat` option
/// names: VHD `fixed`/`dynamic`, VMDK `streamOptimized`/`monolithicSparse`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Accepted {
    #[serde(serialize_with = "format_name")]
    pub format: Format,
    pub subformat: Option<&'static str>,
}

fn format_name<S: serde::Serializer>(f: &Format, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(f.name())
}

fn format_names<S: serde::Serializer>(
    formats: &&'static [Format],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(formats.iter().map(|f| f.name()))
}

const fn any(format: Format) -> Accepted {
    Accepted {
        format,
        subformat: None,
    }
}

/// Limits of the virtual size, for disks of `role` (both when `None`) written in one of
/// `formats` (all when empty).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SizeLimit {
    pub role: Option<Role>,
    #[serde(serialize_with = "format_names")]
    pub formats: &'static [Format],
    pub min: u64,
    pub max: u64,
    pub requirement: &'static str,
}

/// A rule with a number: the alignment of the virtual size, the disks of one import.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Limit {
    pub value: u64,
    pub requirement: &'static str,
}

/// Where the cloud needs a partition table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TableNeeded {
    /// On every disk (the import itself checks).
    Always,
    /// On the disk a machine boots from.
    SystemDisk,
}

/// One cloud's import rules.
#[derive(Debug, Serialize)]
pub struct Profile {
    #[serde(rename = "name", serialize_with = "cloud_name")]
    pub cloud: Cloud,
    /// The import service the rules are about.
    pub vendor: &'static str,
    #[serde(serialize_with = "output_text")]
    pub output: Output,
    pub accepts: &'static [Accepted],
    /// The requirement the accepted formats encode.
    pub formats_requirement: &'static str,
    pub sizes: &'static [SizeLimit],
    /// The virtual size must be a multiple of this many bytes (diskkit rounds it up on output).
    pub alignment: Option<Limit>,
    /// Disks in one import at most.
    pub max_disks: Option<Limit>,
    pub partition_table: TableNeeded,
    /// Requirements diskkit cannot check from the image.
    pub notes: &'static [&'static str],
}

fn cloud_name<S: serde::Serializer>(c: &Cloud, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(c.name())
}

fn output_text<S: serde::Serializer>(o: &Output, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&o.describe())
}

/// Why a system disk needs a partition table and a boot partition.
pub const BOOT_TABLE: &str =
    "a system disk boots from a partition table (MBR or GPT) with a bootable partition";

/// The table.
pub static PROFILES: [Profile; 7] = [
    Profile {
        cloud: Cloud::Aws,
        vendor: "AWS VM Import/Export (ImportImage)",
        output: Output::Image {
            format: Format::Vmdk,
            options: &[("subformat", "streamOptimized")],
        },
        accepts: &[
            Accepted {
                format: Format::Vmdk,
                subformat: Some("streamOptimized"),
            },
            any(Format::Vhd),
            any(Format::Vhdx),
            any(Format::Raw),
        ],
        formats_requirement: "VM Import takes OVA, streamOptimized VMDK, VHD/VHDX (fixed or \
dynamic) and raw images; a monolithicSparse VMDK is refused",
        sizes: &[],
        alignment: None,
        max_disks: Some(Limit {
            value: 21,
            requirement: "VM Import takes at most 21 volumes per import",
        }),
        partition_table: TableNeeded::SystemDisk,
        notes: &["the image must be in an S3 bucket in the region of the import"],
    },
    Profile {
        cloud: Cloud::Azure,
        vendor: "Azure (managed disk from a VHD page blob)",
        output: Output::Image {
            format: Format::Vhd,
            options: &[("subformat", "fixed"), ("target", "azure")],
        },
        accepts: &[Accepted {
            format: Format::Vhd,
            subformat: Some("fixed"),
        }],
        formats_requirement: "Azure takes fixed VHDs only (cookie \"conectix\", file size the \
virtual size + 512 bytes)",
        sizes: &[],
        alignment: Some(Limit {
            value: MIB,
            requirement: "Azure needs a virtual size that is a whole number of MiB",
        }),
        max_disks: None,
        partition_table: TableNeeded::SystemDisk,
        notes: &["upload as a page blob"],
    },
    Profile {
        cloud: Cloud::Gce,
        vendor: "Google Compute Engine (images create --source-uri)",
        output: Output::GceTarball,
        accepts: &[],
        formats_requirement: "GCE imports a file named disk.raw alone in a gzip'ed tar in GNU \
(oldgnu) format, sparse",
        sizes: &[],
        alignment: Some(Limit {
            value: GIB,
            requirement: "GCE needs disk.raw to be a whole number of GiB",
        }),
        max_disks: None,
        partition_table: TableNeeded::Always,
        notes: &[
            "a GPT's backup header must be at the disk's end: diskkit moves it when it grows the disk",
        ],
    },
    Profile {
        cloud: Cloud::Alibaba,
        vendor: "Alibaba Cloud ECS ImportImage",
        output: Output::Image {
            format: Format::Qcow2,
            options: &[],
        },
        accepts: &[
            any(Format::Qcow2),
            any(Format::Vhd),
            any(Format::Raw),
            any(Format::Vmdk),
        ],
        formats_requirement: "ImportImage takes qcow2, VHD, raw and (in the console) VMDK images",
        sizes: &[
            SizeLimit {
                role: Some(Role::System),
                formats: &[],
                min: 5 * GIB,
                max: 500 * GIB,
                requirement: "ImportImage takes system disks of 5 to 500 GiB",
            },
            SizeLimit {
                role: Some(Role::Data),
                formats: &[],
                min: 5 * GIB,
                max: 1000 * GIB,
                requirement: "ImportImage takes data disks of 5 to 1000 GiB",
            },
        ],
        alignment: None,
        max_disks: Some(Limit {
            value: 17,
            requirement: "ImportImage takes a system disk and at most 16 data disks",
        }),
        partition_table: TableNeeded::SystemDisk,
        notes: &["the image must be in an OSS bucket in the region of the import"],
    },
    Profile {
        cloud: Cloud::Huawei,
        vendor: "Huawei Cloud IMS (image import)",
        output: Output::Image {
            format: Format::Qcow2,
            options: &[],
        },
        accepts: &[
            any(Format::Vmdk),
            any(Format::Vhd),
            any(Format::Qcow2),
            any(Format::Raw),
            any(Format::Vhdx),
        ],
        formats_requirement: "IMS takes VMDK, VHD, qcow2, raw, VHDX (and QED, VDI, QCOW, ZVHD, \
ZVHD2, ISO) images",
        sizes: &[
            SizeLimit {
                role: None,
                formats: &[Format::Vmdk, Format::Vhd, Format::Qcow2, Format::Vhdx],
                min: 0,
                max: 128 * GIB,
                requirement: "IMS imports images of at most 128 GiB (fast import of larger ones \
takes raw or ZVHD2 only)",
            },
            SizeLimit {
                role: None,
                formats: &[Format::Raw],
                min: 0,
                max: 1024 * GIB,
                requirement: "IMS fast import takes raw images of at most 1 TiB (with a bitmap \
.mf file beside it)",
            },
        ],
        alignment: None,
        max_disks: None,
        partition_table: TableNeeded::SystemDisk,
        notes: &["the image must be in an OBS bucket of the Standard storage class"],
    },
    Profile {
        cloud: Cloud::Tencent,
        vendor: "Tencent Cloud CVM (image import)",
        output: Output::Image {
            format: Format::Qcow2,
            options: &[],
        },
        accepts: &[
            any(Format::Raw),
            any(Format::Vhd),
            any(Format::Qcow2),
            any(Format::Vmdk),
        ],
        formats_requirement: "CVM image import takes raw, VHD, qcow2 and VMDK images",
        sizes: &[],
        alignment: None,
        max_disks: None,
        partition_table: TableNeeded::SystemDisk,
        notes: &["the image must be in a COS bucket"],
    },
    Profile {
        cloud: Cloud::Ucloud,
        vendor: "UCloud (image import)",
        output: Output::Image {
            format: Format::Qcow2,
            options: &[],
        },
        accepts: &[
            any(Format::Raw),
            any(Format::Vhd),
            any(Format::Vmdk),
            any(Format::Qcow2),
        ],
        formats_requirement: "UCloud image import takes raw, VHD, VMDK and qcow2 images",
        sizes: &[],
        alignment: None,
        max_disks: None,
        partition_table: TableNeeded::SystemDisk,
        notes: &["the image is copied through a UFile bucket"],
    },
];

impl Profile {
    /// The first accepted entry that `format` of `subformat` (as the image or the options say;
    /// `None` when unknown) matches.
    pub fn accepts(&self, format: Format, subformat: Option<&str>) -> bool {
        self.accepts.iter().any(|a| {
            a.format == format
                && a.subformat
                    .is_none_or(|s| subformat.is_some_and(|x| x.eq_ignore_ascii_case(s)))
        })
    }

    /// The size limits that apply to a disk of `role` in `format`.
    pub fn size_limits(
        &self,
        role: Option<Role>,
        format: Option<Format>,
    ) -> impl Iterator<Item = &SizeLimit> {
        self.sizes.iter().filter(move |l| {
            (l.role.is_none() || role.is_none() || l.role == role)
                && (l.formats.is_empty() || format.is_none_or(|f| l.formats.contains(&f)))
        })
    }

    /// Checks a bundle's disk count against the import's limit: `Err` with the requirement
    /// when there are too many.
    pub fn check_disk_count(&self, disks: usize) -> std::result::Result<(), String> {
        match self.max_disks {
            Some(l) if disks as u64 > l.value => Err(format!(
                "{disks} disks, at most {}: {}",
                l.value, l.requirement
            )),
            _ => Ok(()),
        }
    }
}

/// What `--target` resolved to for convert or push.
#[derive(Debug)]
pub struct Resolved {
    /// What to write.
    pub output: Output,
    /// Rules the explicit `-O`/`-o` break (allowed only with `--force`), each naming the rule
    /// and what will fail.
    pub broken: Vec<String>,
}

/// The subformat a new image of `format` gets from these options (qemu's defaults when none).
pub fn output_subformat(format: Format, create: &CreateOptions) -> Option<String> {
    let given = create.options.get("subformat").cloned();
    match format {
        Format::Vhd => Some(given.unwrap_or_else(|| "dynamic".into())),
        Format::Vmdk => Some(given.unwrap_or_else(|| "monolithicSparse".into())),
        _ => given,
    }
}

/// Picks the output of `--target cloud` from the table, with `-O` (`out_format`) and the `-o`
/// options in `create`: the profile's format and options fill in what was not given. The rules
/// an explicit choice breaks are returned in [`Resolved::broken`]; the caller refuses them
/// unless forced.
pub fn resolve(cloud: Cloud, out_format: Option<Format>, create: &mut CreateOptions) -> Resolved {
    let profile = cloud.profile();
    let mut broken = Vec::new();
    let (format, defaults) = match (profile.output, out_format) {
        (Output::GceTarball, None) => {
            if !create.options.is_empty() {
                broken.push(format!(
                    "format ({}): -o {} does not apply to the disk.raw tarball and is ignored",
                    profile.formats_requirement,
                    create.options.keys().cloned().collect::<Vec<_>>().join(",")
                ));
                create.options.clear();
            }
            return Resolved {
                output: Output::GceTarball,
                broken,
            };
        }
        (Output::GceTarball, Some(f)) => (f, &[][..]),
        (Output::Image { format, options }, None) => (format, options),
        (Output::Image { format, options }, Some(f)) if f == format => (f, options),
        (Output::Image { .. }, Some(f)) => (f, &[][..]),
    };
    // The profile's options of its format, each unless given; an azure `-o subformat=dynamic`
    // stays, and breaks the rule below (as it did before the table: the VHD writer refuses it).
    for (k, v) in defaults {
        create
            .options
            .entry((*k).to_string())
            .or_insert_with(|| (*v).to_string());
    }
    let subformat = output_subformat(format, create);
    if !profile.accepts(format, subformat.as_deref()) {
        let what = match &subformat {
            Some(s) => format!("{} (subformat {s})", format.name()),
            None => format.name().to_string(),
        };
        broken.push(format!(
            "format: {}; {what} will be refused by the import",
            profile.formats_requirement
        ));
    }
    Resolved {
        output: Output::Image {
            format,
            options: &[],
        },
        broken,
    }
}

/// The error for rules an explicit choice breaks, without `--force`.
pub fn refusal(cloud: Cloud, broken: &[String]) -> Error {
    Error::invalid(format!(
        "--target {}: {} (--force writes it anyway)",
        cloud.name(),
        broken.join("; ")
    ))
}

impl Role {
    pub fn parse(name: &str) -> Result<Role> {
        match name {
            "system" => Ok(Role::System),
            "data" => Ok(Role::Data),
            _ => Err(Error::invalid(format!(
                "unknown disk role '{name}' (system or data)"
            ))),
        }
    }
}

/// The profile of a name (`aws`, `gce`...).
pub fn parse(name: &str) -> Result<Cloud> {
    Cloud::ALL
        .into_iter()
        .find(|c| c.name().eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            let names: Vec<_> = Cloud::ALL.iter().map(|c| c.name()).collect();
            Error::invalid(format!(
                "unknown target '{name}' (one of {})",
                names.join(", ")
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(spec: &str) -> CreateOptions {
        let mut o = CreateOptions::default();
        if !spec.is_empty() {
            o.parse_options(spec).unwrap();
        }
        o
    }

    #[test]
    fn every_cloud_has_one_profile() {
        for c in Cloud::ALL {
            assert_eq!(c.profile().cloud, c);
            assert_eq!(PROFILES.iter().filter(|p| p.cloud == c).count(), 1);
            assert_eq!(parse(c.name()).unwrap(), c);
        }
        assert!(parse("ibm").is_err());
    }

    #[test]
    fn targets_pick_their_format_and_options() {
        let mut o = opts("");
        let r = resolve(Cloud::Azure, None, &mut o);
        assert!(r.broken.is_empty());
        assert_eq!(o.options["target"], "azure");
        assert_eq!(o.options["subformat"], "fixed");
        let mut o = opts("");
        let r = resolve(Cloud::Aws, None, &mut o);
        assert!(r.broken.is_empty(), "{:?}", r.broken);
        assert_eq!(o.options["subformat"], "streamOptimized");
        let mut o = opts("");
        assert_eq!(resolve(Cloud::Gce, None, &mut o).output, Output::GceTarball);
    }

    #[test]
    fn explicit_choices_that_break_a_rule_are_named() {
        let r = resolve(Cloud::Azure, Some(Format::Qcow2), &mut opts(""));
        assert!(r.broken[0].contains("fixed VHDs only"), "{:?}", r.broken);
        let r = resolve(Cloud::Azure, None, &mut opts("subformat=dynamic"));
        assert_eq!(r.broken.len(), 1);
        let r = resolve(
            Cloud::Aws,
            Some(Format::Vmdk),
            &mut opts("subformat=monolithicSparse"),
        );
        assert!(r.broken[0].contains("monolithicSparse"), "{:?}", r.broken);
        let r = resolve(Cloud::Aws, Some(Format::Vhd), &mut opts(""));
        assert!(r.broken.is_empty());
        let r = resolve(Cloud::Gce, Some(Format::Raw), &mut opts(""));
        assert!(r.broken[0].contains("disk.raw"), "{:?}", r.broken);
    }

    #[test]
    fn disk_counts() {
        assert!(Cloud::Aws.profile().check_disk_count(21).is_ok());
        let e = Cloud::Aws.profile().check_disk_count(22).unwrap_err();
        assert!(e.contains("21 volumes"), "{e}");
        assert!(Cloud::Gce.profile().check_disk_count(100).is_ok());
    }
}

//! `diskkit info`: what an image is, as `qemu-img info` shows it.

use super::EXIT_OK;
use super::util::{
    IMAGE_HELP, Out, OutputFormat, backing_chain, human_size, open_image, parse_format, printable,
    warn,
};
use diskkit::formats::{Format, ImageInfo, Result};
use std::path::PathBuf;

/// Show format, sizes, backing chain, snapshots and format details of an image
#[derive(clap::Args)]
pub struct Args {
    /// Image format (detected from magic bytes when omitted)
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// Show every image of the backing chain, top first
    #[arg(long)]
    backing_chain: bool,
    /// Output format: human-readable text or JSON with qemu-img's field names
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Describe the image as of this internal snapshot (name or ID)
    #[arg(short = 'l', long)]
    snapshot: Option<String>,
    #[arg(help = IMAGE_HELP)]
    image: PathBuf,
}

pub fn run(args: Args) -> Result<i32> {
    let image = open_image(&args.image, args.format, args.snapshot.as_deref())?;
    let layers: Vec<ImageInfo> = if args.backing_chain {
        backing_chain(image.as_ref())
            .iter()
            .map(|l| l.info())
            .collect()
    } else {
        vec![image.info()]
    };
    for info in &layers {
        for w in &info.warnings {
            warn(&format!("{}: {w}", info.filename.display()));
        }
    }
    let mut out = Out::new();
    match args.output {
        OutputFormat::Json => {
            let text = if args.backing_chain {
                serde_json::to_string_pretty(&layers)
            } else {
                serde_json::to_string_pretty(&layers[0])
            };
            writeln!(
                out,
                "{}",
                text.map_err(|e| diskkit::Error::invalid(e.to_string()))?
            )?;
        }
        OutputFormat::Human => {
            for (i, info) in layers.iter().enumerate() {
                if i > 0 {
                    writeln!(out)?;
                }
                write!(out, "{}", human(info))?;
            }
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn human(info: &ImageInfo) -> String {
    let mut s = String::new();
    // Every value may come from the image (names, backing file names): printed escaped.
    let mut line = |k: &str, v: String| s.push_str(&format!("{k}: {}\n", printable(&v)));
    line("image", info.filename.display().to_string());
    line("file format", info.format.clone());
    line(
        "virtual size",
        format!(
            "{} ({} bytes)",
            human_size(info.virtual_size),
            info.virtual_size
        ),
    );
    line("disk size", human_size(info.actual_size));
    if let Some(c) = info.cluster_size {
        line("cluster_size", c.to_string());
    }
    if let Some(b) = &info.backing_filename {
        let full = info
            .full_backing_filename
            .as_ref()
            .map(|p| p.display().to_string())
            .filter(|p| p != b)
            .map(|p| format!(" (actual path: {p})"))
            .unwrap_or_default();
        line("backing file", format!("{b}{full}"));
    }
    if let Some(f) = &info.backing_filename_format {
        line("backing file format", f.clone());
    }
    if info.dirty_flag {
        line("dirty flag", "yes".into());
    }
    if !info.snapshots.is_empty() {
        s.push_str(&snapshot_list(&info.snapshots));
    }
    if let Some(serde_json::Value::Object(spec)) = &info.format_specific
        && let Some(serde_json::Value::Object(data)) = spec.get("data")
        && !data.is_empty()
    {
        s.push_str("Format specific information:\n");
        for (k, v) in data {
            if k == "bootable"
                && let Some(summary) = boot_summary(data)
            {
                s.push_str(&format!("    {k}: {}\n", printable(&summary)));
            } else {
                human_value(&mut s, 4, k, v);
            }
        }
    }
    s
}

/// One `key: value` line, or for objects and arrays a `key:` line with the members (array
/// items as `[i]`) indented below.
fn human_value(s: &mut String, indent: usize, key: &str, v: &serde_json::Value) {
    use serde_json::Value;
    let pad = " ".repeat(indent);
    match v {
        Value::Object(map) if !map.is_empty() => {
            s.push_str(&format!("{pad}{}:\n", printable(key)));
            for (k, v) in map {
                human_value(s, indent + 4, k, v);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            s.push_str(&format!("{pad}{}:\n", printable(key)));
            for (i, v) in items.iter().enumerate() {
                human_value(s, indent + 4, &format!("[{i}]"), v);
            }
        }
        Value::String(t) => s.push_str(&format!("{pad}{}: {}\n", printable(key), printable(t))),
        other => s.push_str(&format!("{pad}{}: {other}\n", printable(key))),
    }
}

/// "yes (BIOS no-emulation, UEFI)" from El Torito boot entries (`bootable`, `boot-entries`).
fn boot_summary(data: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    let entries = data.get("boot-entries")?.as_array()?;
    let bootable: Vec<String> = entries
        .iter()
        .filter(|e| e["bootable"] == true)
        .map(|e| {
            let platform = e["platform"].as_str().unwrap_or("?");
            let emulation = e["emulation"].as_str().unwrap_or("?");
            match platform {
                "uefi" if emulation == "no-emulation" => "UEFI".to_string(),
                "uefi" => format!("UEFI {emulation}"),
                "bios" => format!("BIOS {emulation}"),
                other => format!("{other} {emulation}"),
            }
        })
        .collect();
    Some(if bootable.is_empty() {
        "no".to_string()
    } else {
        format!("yes ({})", bootable.join(", "))
    })
}

/// UTC date from seconds since the epoch, `YYYY-MM-DD hh:mm:ss`.
pub(super) fn format_date(secs: u64) -> String {
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil-from-days (proleptic Gregorian), valid for any u64 day count we can meet.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn format_clock(sec: u64, nsec: u32) -> String {
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        sec / 3600,
        sec / 60 % 60,
        sec % 60,
        nsec / 1_000_000
    )
}

/// The internal snapshot table as qemu-img prints it (`info` and `snapshot -l`).
pub(super) fn snapshot_list(snapshots: &[diskkit::formats::image::SnapshotInfo]) -> String {
    let mut s = String::from("Snapshot list:\n");
    s.push_str(&format!(
        "{:<4} {:<20} {:>10} {:<19} {:>15}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK"
    ));
    for sn in snapshots {
        s.push_str(&format!(
            "{:<4} {:<20} {:>10} {:<19} {:>15}\n",
            printable(&sn.id),
            printable(&sn.name),
            human_size(sn.vm_state_size),
            format_date(sn.date_sec),
            format_clock(sn.vm_clock_sec, sn.vm_clock_nsec),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(format_date(0), "1970-01-01 00:00:00");
        assert_eq!(format_date(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(format_clock(3723, 5_000_000), "01:02:03.005");
    }
}

//! `diskkit map`: the allocation map of an image, like `qemu-img map`.

use super::EXIT_OK;
use super::util::{Out, OutputFormat, open_image, parse_format};
use diskkit::formats::{Extent, ExtentKind, Extents, Format, Result};
use serde::Serialize;
use std::path::PathBuf;

/// Show which guest ranges hold data, which read as zeros and where they are stored
#[derive(clap::Args)]
pub struct Args {
    /// Image format (detected from magic bytes when omitted)
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// Output format: a table, or JSON with qemu-img map's fields
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Map the image as of this internal snapshot (name or ID)
    #[arg(short = 'l', long)]
    snapshot: Option<String>,
    image: PathBuf,
}

/// One line of `qemu-img map --output=json`.
#[derive(Serialize)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

impl From<&Extent> for MapEntry {
    fn from(e: &Extent) -> Self {
        let (present, zero, data, compressed, offset) = match e.kind {
            ExtentKind::Data { offset } => (true, false, true, false, Some(offset)),
            ExtentKind::Compressed => (true, false, true, true, None),
            ExtentKind::Zero => (true, true, false, false, None),
            ExtentKind::Unallocated => (false, true, false, false, None),
        };
        MapEntry {
            start: e.start,
            length: e.length,
            depth: e.depth,
            present,
            zero,
            data,
            compressed,
            offset,
        }
    }
}

pub fn run(args: Args) -> Result<i32> {
    let image = open_image(&args.image, args.format, args.snapshot.as_deref())?;
    let mut out = Out::new();
    if args.output == OutputFormat::Human {
        writeln!(
            out,
            "{:<18} {:<18} {:<11} {:>5} {:<18}",
            "Offset", "Length", "Kind", "Depth", "Host offset"
        )?;
    } else {
        write!(out, "[")?;
    }
    for (i, e) in Extents::new(image.as_ref(), 0, image.virtual_size()).enumerate() {
        let e = e?;
        match args.output {
            OutputFormat::Json => {
                let sep = if i == 0 { "" } else { ",\n" };
                let entry = serde_json::to_string(&MapEntry::from(&e))
                    .map_err(|e| diskkit::Error::invalid(e.to_string()))?;
                write!(out, "{sep}{entry}")?;
            }
            OutputFormat::Human => {
                let (kind, host) = match e.kind {
                    ExtentKind::Data { offset } => ("data", format!("{offset:#x}")),
                    ExtentKind::Compressed => ("compressed", "-".into()),
                    ExtentKind::Zero => ("zero", "-".into()),
                    ExtentKind::Unallocated => ("unallocated", "-".into()),
                };
                writeln!(
                    out,
                    "{:<#18x} {:<#18x} {:<11} {:>5} {host}",
                    e.start, e.length, kind, e.depth
                )?;
            }
        }
    }
    if args.output == OutputFormat::Json {
        writeln!(out, "]")?;
    }
    out.flush()?;
    Ok(EXIT_OK)
}

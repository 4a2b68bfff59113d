//! `diskkit map`: the allocation map of an image, like `qemu-img map`.

use super::EXIT_OK;
use super::util::{IMAGE_HELP, Out, OutputFormat, backing_chain, open_image, parse_format};
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
    #[arg(help = IMAGE_HELP)]
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

impl MapEntry {
    /// The entry qemu-img prints for `e`; `layers` are the formats of the backing chain, top
    /// first.
    fn new(e: &Extent, layers: &[Format]) -> Self {
        let layer = layers.get(e.depth as usize).copied();
        let (present, zero, data, compressed, offset) = match e.kind {
            ExtentKind::Data { offset } => (true, false, true, false, Some(offset)),
            ExtentKind::Compressed => (true, false, true, true, None),
            // A raw file's host offset is the guest offset, holes included.
            ExtentKind::Zero => (true, true, false, false, raw_offset(layer, e)),
            // qemu calls unallocated ranges present when the format cannot have a backing file
            // (vpc, vhdx): nothing below could supply them, they are the image's zeros.
            ExtentKind::Unallocated => {
                let present = !layer.is_some_and(supports_backing);
                (present, true, false, false, None)
            }
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

fn raw_offset(layer: Option<Format>, e: &Extent) -> Option<u64> {
    (layer == Some(Format::Raw)).then_some(e.start)
}

/// Formats whose images may have a backing file, as qemu's drivers declare it.
fn supports_backing(format: Format) -> bool {
    matches!(format, Format::Qcow2 | Format::Vmdk)
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
    let layers: Vec<Format> = backing_chain(image.as_ref())
        .iter()
        .map(|l| l.format())
        .collect();
    for (i, e) in Extents::new(image.as_ref(), 0, image.virtual_size()).enumerate() {
        let e = e?;
        match args.output {
            OutputFormat::Json => {
                let sep = if i == 0 { "" } else { ",\n" };
                let entry = serde_json::to_string(&MapEntry::new(&e, &layers))
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

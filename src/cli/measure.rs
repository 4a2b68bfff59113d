//! `diskkit measure`: the host space a conversion would need, like `qemu-img measure`.

use super::EXIT_OK;
use super::util::{Out, OutputFormat, create_options, open_image, parse_format, parse_size};
use diskkit::formats::image::{GuestRange, allocated_ranges};
use diskkit::formats::{Format, Result, write};
use std::path::PathBuf;

/// Compute the host space an image of format -O needs for SRC's data (or for an empty image)
#[derive(clap::Args)]
#[command(
    long_about = "Compute how many bytes an image of format -O would take on the host: \
\"required size\" for the data of SRC (its allocated, non-zero extents; nothing is read but \
metadata), or for an empty image of --size bytes, and \"fully allocated size\" if every guest \
byte held data. Raw images always need their full virtual size.\n\n\
Exit codes: 0 success, 2 error."
)]
pub struct Args {
    /// Output format to measure for: raw, qcow2, vpc (or vhd), vmdk
    #[arg(short = 'O', value_parser = parse_format)]
    out_format: Format,
    /// Output format options as for convert/create (cluster_size, subformat, ...)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Source format (detected when omitted)
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Measure the source as of this internal snapshot (qcow2; name or ID)
    #[arg(short = 'l', long = "snapshot", value_name = "NAME|ID")]
    snapshot: Option<String>,
    /// Measure an empty image of this virtual size instead of a source
    #[arg(long, value_parser = parse_size, conflicts_with = "src", required_unless_present = "src")]
    size: Option<u64>,
    /// Output format: text as qemu-img, or JSON {"required", "fully-allocated"}
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Source image whose data is measured
    src: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<i32> {
    let mut opts = create_options(&args.options)?;
    let measure = match (&args.src, args.size) {
        (Some(src), _) => {
            let image = open_image(src, args.format, args.snapshot.as_deref())?;
            let size = image.virtual_size();
            let mut ranges = allocated_ranges(image.as_ref(), GuestRange::new(0, size));
            write::measure(args.out_format, size, &mut opts, &mut ranges)?
        }
        (None, size) => {
            let size = size.unwrap_or(0);
            write::measure(args.out_format, size, &mut opts, &mut std::iter::empty())?
        }
    };
    let mut out = Out::new();
    match args.output {
        OutputFormat::Human => writeln!(
            out,
            "required size: {}\nfully allocated size: {}",
            measure.required, measure.fully_allocated
        )?,
        OutputFormat::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&measure)
                .map_err(|e| diskkit::Error::invalid(e.to_string()))?
        )?,
    }
    out.flush()?;
    Ok(EXIT_OK)
}

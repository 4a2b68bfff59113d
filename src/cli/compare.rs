//! `diskkit compare`: are two images the same disk, whatever their formats?

use super::util::{Bar, Out, open_image, parse_format};
use super::{EXIT_DIFFERENT, EXIT_OK};
use diskkit::compare::{CompareResult, compare};
use diskkit::formats::{Format, Result};
use std::path::PathBuf;

/// Compare the guest-visible content of two images (exit 0 identical, 1 different, 2 error)
#[derive(clap::Args)]
#[command(
    long_about = "Compare the guest-visible content of two images, in any formats. Ranges both \
allocation maps call zero are not read. Without --strict, images of different sizes are identical \
when the larger one holds only zeros past the end of the smaller (as qemu-img compare).\n\n\
Exit codes: 0 identical, 1 different (the first differing offset is printed), 2 error."
)]
pub struct Args {
    /// Format of the first image (detected when omitted)
    #[arg(short = 'f', value_parser = parse_format)]
    format_a: Option<Format>,
    /// Format of the second image (detected when omitted)
    #[arg(short = 'F', value_parser = parse_format)]
    format_b: Option<Format>,
    /// Images of different sizes are different
    #[arg(short = 's', long)]
    strict: bool,
    /// Show a progress bar
    #[arg(short = 'p', long)]
    progress: bool,
    /// Print nothing; only the exit code tells
    #[arg(short = 'q', long)]
    quiet: bool,
    /// The first image: a file in any format diskkit reads (raw, qcow2, vpc/VHD, vhdx, vmdk,
    /// iso), detected from its content unless -f names one
    a: PathBuf,
    /// The second image, in any format, detected unless -F names one
    b: PathBuf,
}

pub fn run(args: Args) -> Result<i32> {
    let a = open_image(&args.a, args.format_a, None)?;
    let b = open_image(&args.b, args.format_b, None)?;
    let common = a.virtual_size().min(b.virtual_size());
    let bar = Bar::new(args.progress, common, "comparing")
        .with_data_of(&[a.as_ref(), b.as_ref()], common)?;
    let result = compare(a.as_ref(), b.as_ref(), args.strict, &bar)?;
    bar.finish();
    let (msg, code) = match result {
        CompareResult::Identical => ("Images are identical.".to_string(), EXIT_OK),
        CompareResult::ContentDiffers { offset } => (
            format!("Content mismatch at offset {offset}!"),
            EXIT_DIFFERENT,
        ),
        CompareResult::SizeDiffers { a, b } => (
            format!("Strict mode: Image size mismatch! ({a} vs {b} bytes)"),
            EXIT_DIFFERENT,
        ),
    };
    if !args.quiet {
        let mut out = Out::new();
        writeln!(out, "{msg}")?;
        out.flush()?;
    }
    Ok(code)
}

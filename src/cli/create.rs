//! `diskkit create`: a new empty image, like `qemu-img create`.

use super::EXIT_OK;
use super::convert::open_backing;
use super::util::{Out, create_options, parse_format, parse_size};
use diskkit::formats::{Error, Format, Result};
use diskkit::output::write_new_image;
use std::path::PathBuf;

/// Create a new empty image (optionally an overlay on a backing image)
#[derive(clap::Args)]
#[command(
    long_about = "Create FILE as an empty image of format -f (default raw) and SIZE \
bytes. With -b the image is an overlay that reads through to BACKING wherever it has no data of \
its own; SIZE then defaults to BACKING's size. The image is built under a temporary name and \
renamed into place when complete; an existing FILE is replaced.\n\n\
Format options (-o): raw: preallocation=off|falloc|full. qcow2, vpc and vmdk options as qemu-img.\n\n\
Exit codes: 0 success, 2 error."
)]
pub struct Args {
    /// Image format: raw, qcow2, vpc (or vhd), vmdk
    #[arg(short = 'f', value_parser = parse_format, default_value = "raw")]
    format: Format,
    /// Format options, qemu style: key=value,key2=value2 (repeatable)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file, recorded as given; a relative name is relative to FILE's directory
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the backing file (detected when omitted)
    #[arg(short = 'F', value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Print nothing on success
    #[arg(short = 'q', long)]
    quiet: bool,
    /// The image file to create (an existing file is replaced once the new one is complete)
    file: PathBuf,
    /// Virtual size, e.g. 10G (optional with -b)
    #[arg(value_parser = parse_size)]
    size: Option<u64>,
}

pub fn run(args: Args) -> Result<i32> {
    let mut opts = create_options(&args.options)?;
    let mut size = args.size;
    if let Some(name) = &args.backing {
        let backing = open_backing(name, args.backing_format, &args.file)?;
        size = size.or(Some(backing.virtual_size()));
        opts.backing_file = Some(name.clone());
        opts.backing_format = Some(backing.format());
    }
    let Some(size) = size else {
        return Err(Error::invalid("create: SIZE is required without -b"));
    };
    write_new_image(args.format, &args.file, size, &mut opts, |_| Ok(()))?;
    if !args.quiet {
        let mut out = Out::new();
        writeln!(
            out,
            "Formatting '{}', fmt={} size={size}",
            args.file.display(),
            args.format
        )?;
        out.flush()?;
    }
    Ok(EXIT_OK)
}

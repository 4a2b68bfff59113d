//! `diskkit amend`: change a qcow2 image's options in place, like `qemu-img amend`.

use super::EXIT_OK;
use super::inplace::require_qcow2;
use super::util::{create_options, parse_format};
use diskkit::formats::{Format, Result, qcow2};
use std::path::PathBuf;

/// Change a qcow2 image's version, lazy refcounts or refcount width in place
#[derive(clap::Args)]
#[command(
    long_about = "Change options of a qcow2 IMAGE in place: -o compat=0.10|1.1, \
lazy_refcounts=on|off, refcount_bits=1|2|4|8|16|32|64 (comma-separated, -o repeatable).\n\n\
compat=0.10 (qcow2 version 2) is what older hypervisors and clouds import; a downgrade is \
refused, naming the feature, when the image uses one that version 2 lacks: zstd compression, \
extended L2 entries, an external data file, persistent bitmaps, lazy refcounts (turn them off \
in the same command), refcounts other than 16 bits. Zero clusters, which version 2 lacks too, \
are written out (as zeroed clusters, or left unallocated when no backing file shows through). \
The new metadata is written to free space and switched on by one header write: a crash leaves \
the image as before or as after.\n\n\
Exit codes: 0 success (also when nothing changes), 2 error."
)]
pub struct Args {
    /// Image format: only qcow2 has amendable options
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Options to change, qemu's syntax: compat=0.10,lazy_refcounts=off
    #[arg(short = 'o', value_name = "OPTIONS", required = true)]
    options: Vec<String>,
    /// The qcow2 image, changed in place
    image: PathBuf,
}

pub fn run(args: Args) -> Result<i32> {
    require_qcow2(&args.image, args.format, "amend")?;
    let mut opts = create_options(&args.options)?;
    qcow2::amend(&args.image, &mut opts)?;
    Ok(EXIT_OK)
}

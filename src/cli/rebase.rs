//! `diskkit rebase`: give a qcow2 image another backing file, like `qemu-img rebase`.

use super::EXIT_OK;
use super::inplace::require_qcow2;
use super::util::{open_image, parse_format};
use diskkit::chain::{self, NewBacking};
use diskkit::formats::{Format, Result};
use std::path::PathBuf;

/// Change the backing file of a qcow2 image, keeping its guest content
#[derive(clap::Args)]
#[command(
    long_about = "Makes NEW the backing file of the qcow2 IMAGE (-b \"\": no backing file). \
Safe mode (the default) keeps what the guest sees: wherever IMAGE leaves a cluster to its \
backing file and the old and new backing files differ there, the old content is written into \
IMAGE (ranges both leave as zeros are not read). -u only rewrites the recorded name and format, \
for a backing file that was moved or renamed.\n\n\
NEW is recorded as given; a relative name is relative to IMAGE's directory. The change is \
written to free space and switched on by one header write: a crash leaves IMAGE as before or \
as after.\n\n\
Exit codes: 0 success, 2 error."
)]
pub struct Args {
    /// Format of IMAGE: only qcow2 is rebased
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// The new backing file ("" for none)
    #[arg(short = 'b', value_name = "NEW", required = true)]
    backing: String,
    /// Format of the new backing file (detected when omitted; recorded in IMAGE)
    #[arg(short = 'F', value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Unsafe: rewrite the backing file name only, without looking at any data
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// The qcow2 image, changed in place
    image: PathBuf,
}

pub fn run(args: Args) -> Result<i32> {
    require_qcow2(&args.image, args.format, "rebase")?;
    let name = (!args.backing.is_empty()).then_some(args.backing.as_str());
    if args.unsafe_mode {
        let to = NewBacking {
            name,
            format: args.backing_format,
        };
        chain::rebase_unsafe(&args.image, &to)?;
        return Ok(EXIT_OK);
    }
    let image = open_image(&args.image, Some(Format::Qcow2), None)?;
    let new_backing = match name {
        Some(n) => {
            let dir = args.image.parent().unwrap_or(std::path::Path::new(""));
            Some(open_image(&dir.join(n), args.backing_format, None)?)
        }
        None => None,
    };
    let to = NewBacking {
        name,
        format: args
            .backing_format
            .or(new_backing.as_ref().map(|b| b.format())),
    };
    chain::rebase(&args.image, image.as_ref(), new_backing.as_deref(), &to)?;
    Ok(EXIT_OK)
}

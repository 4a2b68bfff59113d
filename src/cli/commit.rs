//! `diskkit commit`: write a qcow2 overlay's changes into its backing file, like `qemu-img
//! commit`.

use super::EXIT_OK;
use super::inplace::require_qcow2;
use super::util::{backing_chain, open_image, parse_format};
use diskkit::chain::{self, Base};
use diskkit::formats::{Error, Format, Result};
use std::path::PathBuf;

/// Write what a qcow2 overlay changed into its backing file
#[derive(clap::Args)]
#[command(
    long_about = "Writes the guest content the qcow2 IMAGE holds above its backing file into \
that file (or into BASE, a deeper file of the chain, with -b), then empties IMAGE unless -d: the \
guest seen through IMAGE is unchanged either way. The base is qcow2 or raw; a qcow2 base gets \
the data in free space, switched on by one header write (a crash leaves it as before or as \
after); a raw base is written in place. Images between IMAGE and a deeper BASE are left as they \
are, as qemu-img does.\n\n\
Exit codes: 0 success, 2 error."
)]
pub struct Args {
    /// Format of IMAGE: only qcow2
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// The backing file to commit into [default: IMAGE's backing file]
    #[arg(short = 'b', value_name = "BASE")]
    base: Option<PathBuf>,
    /// Keep IMAGE's content (do not empty it)
    #[arg(short = 'd')]
    keep: bool,
    /// The qcow2 overlay
    image: PathBuf,
}

pub fn run(args: Args) -> Result<i32> {
    require_qcow2(&args.image, args.format, "commit")?;
    let image = open_image(&args.image, Some(Format::Qcow2), None)?;
    let chain = backing_chain(image.as_ref());
    let found = match &args.base {
        None => chain.get(1).map(|_| 1),
        Some(b) => {
            let want = std::fs::canonicalize(b).map_err(|e| Error::io(b, "open", e))?;
            chain
                .iter()
                .skip(1)
                .position(|l| std::fs::canonicalize(&l.info().filename).is_ok_and(|p| p == want))
                .map(|i| i + 1)
        }
    };
    let Some(depth) = found else {
        return Err(Error::invalid(format!(
            "{}: {}",
            args.image.display(),
            match &args.base {
                Some(b) => format!("{} is not in its backing chain", b.display()),
                None => "it has no backing file to commit into".into(),
            }
        )));
    };
    let layer = chain[depth];
    let path = layer.info().filename;
    let base = Base {
        depth: depth as u32,
        path: &path,
        format: layer.format(),
        virtual_size: layer.virtual_size(),
    };
    let committed = chain::commit(image.as_ref(), &args.image, &base, args.keep)?;
    eprintln!("Image committed ({committed} bytes).");
    Ok(EXIT_OK)
}

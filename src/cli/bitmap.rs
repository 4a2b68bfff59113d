//! `diskkit bitmap`: add, remove, clear, enable or disable a qcow2 persistent dirty bitmap,
//! like `qemu-img bitmap`.

use super::EXIT_OK;
use super::inplace::require_qcow2;
use super::util::parse_size;
use diskkit::formats::qcow2::bitmap_edit::{self, BitmapChange};
use diskkit::formats::{Error, Result};
use std::path::PathBuf;

/// Add, remove, clear, enable or disable a persistent dirty bitmap of a qcow2 image
#[derive(clap::Args)]
#[command(
    long_about = "Changes the persistent dirty bitmaps of a qcow2 IMAGE (compat=1.1) in place. \
A bitmap records which guest ranges were written (by qemu, while the bitmap is enabled) since it \
was added or cleared; diskkit snapshot create --bitmap NAME reads only those. `diskkit info` \
lists bitmaps with their granularity and flags (auto: enabled; in-use: open in a qemu, or left \
so by a crash).\n\n\
--add makes an empty, enabled bitmap (with --disable: disabled), --clear empties one, --enable \
and --disable switch recording, --remove deletes it. A crash leaves the image as before or as \
after.\n\n\
Exit codes: 0 success, 2 error."
)]
pub struct Args {
    /// Add a new empty bitmap NAME
    #[arg(long)]
    add: bool,
    /// Remove bitmap NAME
    #[arg(long, conflicts_with_all = ["add", "clear", "enable", "disable"])]
    remove: bool,
    /// Clear bitmap NAME (no range marked written)
    #[arg(long, conflicts_with_all = ["add", "enable", "disable"])]
    clear: bool,
    /// Enable bitmap NAME: qemu records writes in it
    #[arg(long, conflicts_with_all = ["add", "disable"])]
    enable: bool,
    /// Disable bitmap NAME (with --add: add it disabled)
    #[arg(long)]
    disable: bool,
    /// With --add: guest bytes per bit, a power of two from 512 to 2G [default: the cluster
    /// size within 4K..64K, as qemu]
    #[arg(short = 'g', long, value_parser = parse_size, requires = "add")]
    granularity: Option<u64>,
    /// The qcow2 image, changed in place
    image: PathBuf,
    /// The bitmap's name
    name: String,
}

pub fn run(args: Args) -> Result<i32> {
    require_qcow2(&args.image, None, "persistent bitmaps")?;
    let (image, name) = (&args.image, &args.name);
    if args.add {
        bitmap_edit::add(image, name, args.granularity, args.disable)?;
        return Ok(EXIT_OK);
    }
    let change = match (args.remove, args.clear, args.enable, args.disable) {
        (true, ..) => BitmapChange::Remove,
        (_, true, ..) => BitmapChange::Clear,
        (_, _, true, _) => BitmapChange::Enable,
        (.., true) => BitmapChange::Disable,
        _ => {
            return Err(Error::invalid(
                "bitmap: give one of --add, --remove, --clear, --enable, --disable",
            ));
        }
    };
    bitmap_edit::change(image, name, change)?;
    Ok(EXIT_OK)
}

//! `diskkit resize`: change an image's virtual size, like `qemu-img resize`.

use super::EXIT_OK;
use super::util::{Out, human_size, open_image, parse_format, parse_size};
use diskkit::formats::image::{GuestRange, allocated_ranges};
use diskkit::formats::{Error, Format, Result, write};
use std::path::PathBuf;

/// Grow or shrink the virtual size of an image in place
#[derive(clap::Args)]
#[command(
    long_about = "Set the virtual size of IMAGE to SIZE, or grow (+SIZE) or shrink (-SIZE) \
it by that much. Growing adds guest space that reads as zeros. Shrinking discards every guest byte \
past the new end, so it needs --shrink; diskkit then reports how much allocated data was past the \
new end (found from the allocation map, nothing is read).\n\n\
Exit codes: 0 success, 2 error (including a shrink without --shrink)."
)]
pub struct Args {
    /// Image format (detected when omitted)
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Allow the new size to be smaller than the current one (data past it is lost)
    #[arg(long)]
    shrink: bool,
    /// Print nothing on success
    #[arg(short = 'q', long)]
    quiet: bool,
    /// The image file to resize in place: raw, qcow2 or vpc (VHD)
    image: PathBuf,
    /// New size (10G), or a change (+1G, -512M)
    #[arg(allow_hyphen_values = true)]
    size: String,
}

pub fn run(args: Args) -> Result<i32> {
    let (format, new, lost) = {
        let image = open_image(&args.image, args.format, None)?;
        let old = image.virtual_size();
        let new = write::resized_size(image.format(), new_size(old, &args.size)?)?;
        let lost = if new < old {
            if !args.shrink {
                return Err(Error::invalid(format!(
                    "{}: shrinking from {old} to {new} bytes discards data past the new end; \
                     use --shrink to do it",
                    args.image.display()
                )));
            }
            allocated_ranges(image.as_ref(), GuestRange::new(new, old))
                .map(|r| r.map(|r| r.len()))
                .sum::<Result<u64>>()?
        } else {
            0
        };
        (image.format(), new, lost)
    };
    // The image is closed before it changes.
    write::resize(format, &args.image, new)?;
    if lost > 0 {
        eprintln!(
            "diskkit: warning: {} ({lost} bytes) of allocated data past the new end were discarded",
            human_size(lost)
        );
    }
    if !args.quiet {
        let mut out = Out::new();
        writeln!(out, "Image resized.")?;
        out.flush()?;
    }
    Ok(EXIT_OK)
}

/// `10G`, `+1G` or `-512M` applied to the current size.
fn new_size(old: u64, spec: &str) -> Result<u64> {
    let spec = spec.trim();
    let parse = |s: &str| parse_size(s).map_err(Error::invalid);
    let new = if let Some(delta) = spec.strip_prefix('+') {
        old.checked_add(parse(delta)?)
    } else if let Some(delta) = spec.strip_prefix('-') {
        old.checked_sub(parse(delta)?)
    } else {
        Some(parse(spec)?)
    };
    new.ok_or_else(|| Error::invalid(format!("size {spec} from {old} bytes is out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_sizes() {
        assert_eq!(new_size(1 << 20, "+1M").unwrap(), 2 << 20);
        assert_eq!(new_size(2 << 20, "-1M").unwrap(), 1 << 20);
        assert_eq!(new_size(2 << 20, "8M").unwrap(), 8 << 20);
        assert!(new_size(1 << 20, "-2M").is_err());
        assert!(new_size(u64::MAX, "+1").is_err());
    }
}

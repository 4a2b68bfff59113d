//! Fixed VHDs as a stream: the guest bytes followed by a footer computed up front, so an image
//! can be sent into object storage without a file on disk.

use super::layout::{DiskType, FOOTER_SIZE};
use super::write::Plan;
use crate::error::{Error, Result};
use crate::write::CreateOptions;

/// Plans a fixed VHD for a guest of `virtual_size` bytes with the `-o` options in `opts`
/// (`subformat` defaults to fixed here). Returns the VHD's virtual size (rounded up as the
/// format and any `target` require; the guest bytes past the source's end are zeros) and the
/// footer that follows the guest bytes.
pub fn fixed_footer(
    virtual_size: u64,
    opts: &mut CreateOptions,
) -> Result<(u64, [u8; FOOTER_SIZE as usize])> {
    opts.options
        .entry("subformat".into())
        .or_insert_with(|| "fixed".into());
    let plan = Plan::from_options(virtual_size, opts)?;
    if plan.disk_type != DiskType::Fixed {
        return Err(Error::invalid(
            "streamed VHD output is fixed (-o subformat=fixed); dynamic VHDs are not streamed",
        ));
    }
    Ok((plan.virtual_size, plan.footer()?.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhd::layout::Footer;

    #[test]
    fn footer_describes_a_fixed_disk() {
        let (size, bytes) = fixed_footer(10 << 20, &mut CreateOptions::default()).unwrap();
        assert!(size >= 10 << 20);
        assert!(Footer::checksum_ok(&bytes));
        let f = Footer::parse(&bytes);
        assert_eq!(f.current_size, size);
        assert_eq!(f.disk_type, DiskType::Fixed.raw());
        let mut dynamic = CreateOptions::default();
        dynamic.options.insert("subformat".into(), "dynamic".into());
        assert!(fixed_footer(10 << 20, &mut dynamic).is_err());
    }
}

//! Helpers shared by the subcommands: opening images from flags, output modes, human sizes.

use clap::ValueEnum;
use diskkit::formats::{CreateOptions, Format, Image, OpenOptions, Result, open};
use diskkit::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

pub fn parse_format(s: &str) -> std::result::Result<Format, String> {
    Format::parse(s).map_err(|e| e.to_string())
}

pub fn open_image(
    path: &Path,
    format: Option<Format>,
    snapshot: Option<&str>,
) -> Result<Box<dyn Image>> {
    open(
        path,
        &OpenOptions {
            format,
            snapshot: snapshot.map(str::to_string),
        },
    )
}

/// Collects repeated `-o key=value,...` arguments.
pub fn create_options(specs: &[String]) -> Result<CreateOptions> {
    let mut opts = CreateOptions::default();
    for spec in specs {
        opts.parse_options(spec)?;
    }
    Ok(opts)
}

/// `1 GiB`, `512 KiB`, `3.5 MiB`: sizes as qemu-img prints them.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value.fract() == 0.0 {
        format!("{value} {}", UNITS[unit])
    } else {
        format!("{value:.3} {}", UNITS[unit])
            .replace(".000 ", " ")
            .to_string()
    }
}

pub use diskkit::formats::write::parse_size;
/// A progress bar over `total` bytes when `enabled`, hidden otherwise.
pub struct Bar(ProgressBar);

impl Bar {
    pub fn new(enabled: bool, total: u64, what: &str) -> Self {
        if !enabled {
            return Bar(ProgressBar::hidden());
        }
        let pb = ProgressBar::new(total);
        pb.set_style(
            ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_message(what.to_string());
        Bar(pb)
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bar {
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("1.3").is_err());
        assert!(parse_size("12Q").is_err());
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(1536), "1.500 KiB");
        assert_eq!(human_size(100), "100 B");
    }
}

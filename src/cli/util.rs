//! Helpers shared by the subcommands: opening images from flags, output modes, human sizes.

use clap::ValueEnum;
use diskkit::formats::{CreateOptions, Format, Image, OpenOptions, Result, open};
use diskkit::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};
use std::borrow::Cow;
use std::io::{BufWriter, StdoutLock, Write};
use std::path::Path;

/// `text` safe to print on a terminal: control characters (escape sequences, newlines, C1
/// codes) in names taken from images and manifests are shown as Rust escapes (`\u{1b}`), so
/// they can neither drive the terminal nor fake an output line.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// Prints an error on stderr as every command does; error texts quote names from images.
pub fn report_error(e: &diskkit::Error) {
    eprintln!("diskkit: {}", printable(&e.to_string()));
}

/// Prints a warning on stderr.
pub fn warn(message: &str) {
    eprintln!("diskkit: warning: {}", printable(message));
}

/// Standard output of every command, buffered; the one place that decides what a failed write
/// means. A reader that went away (`diskkit hash *.qcow2 | head -1`) ends the process quietly
/// by SIGPIPE, as coreutils and qemu-img do (status 141 in a shell); any other failure (a full
/// disk) is the error `write error: No space left on device`. `write!`/`writeln!` work on it and
/// return that error; a command calls `flush` before it succeeds.
pub struct Out(BufWriter<StdoutLock<'static>>);

impl Out {
    pub fn new() -> Self {
        Out(BufWriter::new(std::io::stdout().lock()))
    }

    pub fn write_fmt(&mut self, args: std::fmt::Arguments) -> Result<()> {
        self.0.write_fmt(args).map_err(write_error)
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.0.write_all(bytes).map_err(write_error)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.0.flush().map_err(write_error)
    }
}

fn write_error(e: std::io::Error) -> diskkit::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        // Rust ignores SIGPIPE at startup (writes then fail with EPIPE); restore the default
        // action and take the signal, so the shell and `set -o pipefail` see what they see
        // for coreutils.
        // SAFETY: resetting a signal disposition and raising it have no memory effects.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
        std::process::exit(128 + libc::SIGPIPE);
    }
    // "No space left on device", without the " (os error 28)" of io::Error's Display.
    let text = e.to_string();
    let reason = text.split(" (os error").next().unwrap_or(&text);
    diskkit::Error::invalid(format!("write error: {reason}"))
}

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

/// `image` and its backing images, top first.
pub fn backing_chain(image: &dyn Image) -> Vec<&dyn Image> {
    let mut chain = vec![image];
    while let Some(b) = chain[chain.len() - 1].backing() {
        chain.push(b);
    }
    chain
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

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("disk-1.qcow2 é"), "disk-1.qcow2 é");
        assert_eq!(
            printable("a\x1b[31mb\nc\u{9b}d"),
            "a\\u{1b}[31mb\\nc\\u{9b}d"
        );
    }
}

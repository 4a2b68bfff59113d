//! Helpers shared by the subcommands: opening images from flags, output modes, human sizes.

use clap::ValueEnum;
use diskkit::formats::digest::Algorithm;
use diskkit::formats::image::{GuestRange, allocated_ranges};
use diskkit::formats::{
    CreateOptions, Format, Image, ImplicitOpens, OpenOptions, Result, open_with,
};
use diskkit::progress::Progress;
use indicatif::{HumanDuration, ProgressBar, ProgressState, ProgressStyle};
use std::borrow::Cow;
use std::io::{BufWriter, IsTerminal, StdoutLock, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Help of an image argument: what a file may be.
pub const IMAGE_HELP: &str = "An image file in any format diskkit reads (raw, qcow2, vpc/VHD, \
vhdx, vmdk, iso), detected from its content unless -f names one";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

pub fn parse_format(s: &str) -> std::result::Result<Format, String> {
    Format::parse(s).map_err(|e| e.to_string())
}

/// A guest digest algorithm: `sha256` or `blake3`.
pub fn parse_digest_algorithm(s: &str) -> std::result::Result<Algorithm, String> {
    Algorithm::from_name(s).map_err(|e| e.to_string())
}

/// The policy for files that image metadata names, set once from the command line.
static IMPLICIT_OPENS: std::sync::OnceLock<ImplicitOpens> = std::sync::OnceLock::new();

pub fn set_implicit_opens(policy: ImplicitOpens) {
    let _ = IMPLICIT_OPENS.set(policy);
}

pub fn implicit_opens() -> ImplicitOpens {
    IMPLICIT_OPENS.get().copied().unwrap_or_default()
}

/// Opens an image source: a file, `STORE#ID`, a snapshot in a snapshot store, or
/// `STORE#NAME/DEVICE`, a disk of a bundle, or an OVA's first disk (`x.ova`, found by content)
/// or another of its disks (`x.ova#disk2.vmdk`) read in place (connection
/// settings and an encrypted store's key from the environment and the default profile). A file whose name contains `#`
/// is still a file when it exists. A bucket URL (`s3://`, `oss://`, `obs://`, `file://`) is an
/// object read in place with ranged requests; it must name no other file.
pub fn open_image(
    path: &Path,
    format: Option<Format>,
    snapshot: Option<&str>,
) -> Result<Box<dyn Image>> {
    // An OVA (found by content): its first disk, or `x.ova#MEMBER` for another.
    if format.is_none() && snapshot.is_none() {
        if path.is_file() && diskkit::bundle::ova::is_ova(path) {
            return diskkit::bundle::ova::open_disk(path, None);
        }
        if !path.exists()
            && let Some((ova, member)) = path.to_str().and_then(|s| s.rsplit_once('#'))
            && Path::new(ova).is_file()
            && diskkit::bundle::ova::is_ova(Path::new(ova))
        {
            return diskkit::bundle::ova::open_disk(Path::new(ova), Some(member));
        }
    }
    if !path.exists()
        // `s3://BUCKET/STORE#ID` is a snapshot (below), not an object.
        && let Some(url) = path
            .to_str()
            .filter(|s| diskkit::storage::is_bucket_url(s) && !s.contains('#'))
    {
        let opts = OpenOptions {
            format,
            snapshot: snapshot.map(str::to_string),
        };
        let settings = diskkit::storage::Settings::default();
        return diskkit::storage::open_object_image(url, &settings, &opts);
    }
    if !path.exists()
        && let Some((store, id)) = path.to_str().and_then(|s| s.rsplit_once('#'))
    {
        if format.is_some() || snapshot.is_some() {
            return Err(diskkit::Error::invalid(format!(
                "{}: a store snapshot has no -f or -l",
                path.display()
            )));
        }
        let settings = diskkit::storage::Settings::default();
        let key = diskkit::snapshot::Crypto::from_user(None)?;
        // `STORE#NAME/DEVICE`: a disk of a bundle (snapshot ids never hold a `/`).
        if let Some((name, device)) = id.split_once('/') {
            let store = diskkit::snapshot::SnapshotStore::open(store, &settings, None, key, None)?;
            return Ok(Box::new(diskkit::bundle::disk_image(store, name, device)?));
        }
        return Ok(Box::new(diskkit::snapshot::SnapshotImage::open(
            store, id, &settings, None, key,
        )?));
    }
    open_with(
        path,
        &OpenOptions {
            format,
            snapshot: snapshot.map(str::to_string),
        },
        implicit_opens(),
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
/// Progress of one job on stderr, shown only when asked for (-p): a bar on a terminal, else (batch
/// jobs, CI logs) a line every tenth of the work or every 10 seconds. The percentage counts guest
/// bytes. Rate and time left count the data read, against the data the allocation map holds
/// (`with_data_of`), when the engine reports reads ([`Progress::data_read`]): zero ranges pass in
/// an instant and would otherwise make the estimate many times too long.
pub struct Bar {
    counters: Option<Arc<Counters>>,
    terminal: Option<ProgressBar>,
}

/// What a progress line shows, shared with the bar's drawing thread.
struct Counters {
    what: String,
    total: u64,
    /// Data bytes of the job, from the allocation map (0: unknown).
    data_total: AtomicU64,
    done: AtomicU64,
    read: AtomicU64,
    start: Instant,
    /// Log lines: when the last one was printed, and at which tenth of the work.
    logged: Mutex<(Instant, u64)>,
}

/// A log line at least this often, even when a tenth of the work takes longer.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Bar {
    pub fn new(enabled: bool, total: u64, what: &str) -> Self {
        if !enabled {
            return Bar {
                counters: None,
                terminal: None,
            };
        }
        let now = Instant::now();
        let counters = Arc::new(Counters {
            what: printable(what).into_owned(),
            total,
            data_total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            read: AtomicU64::new(0),
            start: now,
            logged: Mutex::new((now, 0)),
        });
        let terminal = std::io::stderr().is_terminal().then(|| {
            let estimate = Arc::clone(&counters);
            let style = ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} ({estimate})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key(
                "estimate",
                move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&estimate.estimate(estimate.start.elapsed()));
                },
            );
            let pb = ProgressBar::new(total).with_style(style);
            pb.set_message(counters.what.clone());
            pb
        });
        Bar {
            counters: Some(counters),
            terminal,
        }
    }

    /// Counts the data of `images` in `[0, end)` as the work to do (metadata only, and only
    /// when the bar is shown).
    pub fn with_data_of(self, images: &[&dyn Image], end: u64) -> Result<Self> {
        if let Some(c) = &self.counters {
            let mut data = 0;
            for image in images {
                let range = GuestRange::new(0, end.min(image.virtual_size()));
                for data_range in allocated_ranges(*image, range) {
                    data += data_range?.len();
                }
            }
            c.data_total.store(data, Ordering::Relaxed);
        }
        Ok(self)
    }

    pub fn finish(&self) {
        if let Some(pb) = &self.terminal {
            pb.finish_and_clear();
        } else if let Some(c) = &self.counters {
            eprintln!(
                "diskkit: {}: done, {} in {:.1}s",
                c.what,
                human_size(c.done.load(Ordering::Relaxed)),
                c.start.elapsed().as_secs_f64()
            );
        }
    }
}

impl Counters {
    /// "312 MiB/s, 12s left" after `elapsed`.
    fn estimate(&self, elapsed: Duration) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let read = self.read.load(Ordering::Relaxed);
        let data_total = self.data_total.load(Ordering::Relaxed);
        let (processed, left) = if read > 0 && data_total > 0 {
            (read, data_total.saturating_sub(read))
        } else {
            (done, self.total.saturating_sub(done))
        };
        let secs = elapsed.as_secs_f64();
        if processed == 0 || secs <= 0.0 {
            return "estimating".to_string();
        }
        let rate = processed as f64 / secs;
        format!(
            "{}/s, {} left",
            human_size(rate as u64),
            HumanDuration(Duration::from_secs_f64(left as f64 / rate))
        )
    }

    /// Prints a log line when the work crossed a tenth or the last line is old enough.
    fn log(&self, done: u64) {
        let tenth = (done * 10).checked_div(self.total).unwrap_or(10);
        // Another thread printing now is reason enough to skip this update.
        let Ok(mut last) = self.logged.try_lock() else {
            return;
        };
        if tenth <= last.1 && last.0.elapsed() < LOG_INTERVAL {
            return;
        }
        *last = (Instant::now(), tenth);
        eprintln!(
            "diskkit: {}: {}% ({} of {}), {}",
            self.what,
            (done * 100).checked_div(self.total).unwrap_or(100),
            human_size(done),
            human_size(self.total),
            self.estimate(self.start.elapsed())
        );
    }
}

impl Progress for Bar {
    fn advance(&self, bytes: u64) {
        let Some(c) = &self.counters else {
            return;
        };
        let done = c.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        match &self.terminal {
            Some(pb) => pb.inc(bytes),
            None => c.log(done),
        }
    }

    fn data_read(&self, bytes: u64) {
        if let Some(c) = &self.counters {
            c.read.fetch_add(bytes, Ordering::Relaxed);
        }
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

    #[test]
    fn estimate_counts_data_read_not_zero_ranges() {
        let bar = Bar::new(true, 10 << 30, "hashing x");
        let c = bar.counters.as_ref().unwrap();
        c.data_total.store(1 << 30, Ordering::Relaxed);
        // 9 GiB done in 1 s, of which 512 MiB data: 512 MiB of data left at 512 MiB/s.
        c.done.store(9 << 30, Ordering::Relaxed);
        c.read.store(512 << 20, Ordering::Relaxed);
        assert_eq!(
            c.estimate(Duration::from_secs(1)),
            "512 MiB/s, 1 second left"
        );
        // An engine that reports no reads: guest bytes, as before.
        c.read.store(0, Ordering::Relaxed);
        assert_eq!(c.estimate(Duration::from_secs(9)), "1 GiB/s, 1 second left");
        assert_eq!(c.estimate(Duration::ZERO), "estimating");
    }
}

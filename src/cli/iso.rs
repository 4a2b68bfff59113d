//! `diskkit iso`: list and extract the files of an ISO 9660 image.

use super::info::format_date;
use super::util::{Out, printable, warn};
use super::{EXIT_ERROR, EXIT_OK};
use diskkit::formats::Result;
use diskkit::formats::iso::{Entry, EntryKind, IsoFs, NameMode, Visit};
use diskkit::iso_extract;
use std::path::PathBuf;

/// List or extract the files of an ISO 9660 image (Rock Ridge, Joliet, plain ISO names)
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: IsoCommand,
}

#[derive(clap::Subcommand)]
enum IsoCommand {
    Ls(LsArgs),
    Extract(ExtractArgs),
}

/// Which names to read; by default Rock Ridge, else Joliet, else ISO 9660
#[derive(Clone, Copy, clap::ValueEnum)]
enum Names {
    Iso,
    Joliet,
    Rr,
}

fn name_mode(names: Option<Names>) -> NameMode {
    match names {
        None => NameMode::Auto,
        Some(Names::Iso) => NameMode::Iso,
        Some(Names::Joliet) => NameMode::Joliet,
        Some(Names::Rr) => NameMode::RockRidge,
    }
}

/// List a directory (or one file) of an ISO image
#[derive(clap::Args)]
struct LsArgs {
    /// Long listing: mode, size, modification time (UTC), name, symbolic link target
    #[arg(short = 'l')]
    long: bool,
    /// List subdirectories recursively, one path per line
    #[arg(short = 'R')]
    recursive: bool,
    /// Names to read: iso (ISO 9660), joliet, rr (Rock Ridge)
    #[arg(long, value_enum)]
    names: Option<Names>,
    /// The ISO 9660 image file (plain or hybrid .iso)
    iso: PathBuf,
    /// Path inside the image (default: the root directory)
    path: Option<String>,
}

/// Extract files, directories and symbolic links of an ISO image into a directory
#[derive(clap::Args)]
struct ExtractArgs {
    /// Names to read: iso (ISO 9660), joliet, rr (Rock Ridge)
    #[arg(long, value_enum)]
    names: Option<Names>,
    /// Directory to extract into (created when missing)
    #[arg(short = 'C', long = "directory", default_value = ".")]
    dir: PathBuf,
    /// Also create symbolic links whose target lies outside DIR (absolute, or climbing out with
    /// ..). They are refused by default; either way diskkit never writes through a link.
    #[arg(long)]
    keep_outside_links: bool,
    /// The ISO 9660 image file (plain or hybrid .iso)
    iso: PathBuf,
    /// Paths inside the image to extract (default: everything)
    paths: Vec<String>,
}

pub fn run(args: Args) -> Result<i32> {
    match args.command {
        IsoCommand::Ls(a) => ls(a),
        IsoCommand::Extract(a) => extract(a),
    }
}

fn ls(args: LsArgs) -> Result<i32> {
    let fs = IsoFs::open(&args.iso)?;
    let (_, entry) = fs.lookup(name_mode(args.names), args.path.as_deref().unwrap_or(""))?;
    let mut out = Out::new();
    let mut print = |name: &str, e: &Entry| -> Result<()> {
        let line = if args.long {
            long_line(name, e)
        } else {
            printable(name).into_owned()
        };
        writeln!(out, "{line}")
    };
    if !entry.is_dir() {
        print(&entry.name, &entry)?;
    } else if args.recursive {
        fs.walk(&entry, &mut |visit| match visit {
            Visit::Entry { path, entry } => print(&path.join("/"), entry),
            Visit::Warning(w) => {
                warn(&w);
                Ok(())
            }
        })?;
    } else {
        let listing = fs.read_dir(&entry)?;
        for w in &listing.warnings {
            warn(w);
        }
        for e in &listing.entries {
            print(&e.name, e)?;
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn long_line(name: &str, e: &Entry) -> String {
    let date = e.mtime.map_or_else(
        || "-".repeat(19),
        |t| format_date(u64::try_from(t).unwrap_or(0)),
    );
    let link = match &e.kind {
        EntryKind::Symlink(target) => format!(" -> {}", printable(target)),
        _ => String::new(),
    };
    format!(
        "{} {:>12} {date} {}{link}",
        mode_string(e.display_mode()),
        e.size,
        printable(name)
    )
}

/// `drwxr-xr-x` from st_mode.
fn mode_string(mode: u32) -> String {
    let kind = match mode & 0o170000 {
        0o040000 => 'd',
        0o120000 => 'l',
        0o020000 => 'c',
        0o060000 => 'b',
        0o010000 => 'p',
        0o140000 => 's',
        _ => '-',
    };
    let mut s = String::from(kind);
    for (shift, special, set, unset) in [
        (6, 0o4000, 's', 'S'),
        (3, 0o2000, 's', 'S'),
        (0, 0o1000, 't', 'T'),
    ] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, mode & special != 0) {
            (true, true) => set,
            (false, true) => unset,
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

fn extract(args: ExtractArgs) -> Result<i32> {
    let fs = IsoFs::open(&args.iso)?;
    let problems = iso_extract::extract(
        &fs,
        name_mode(args.names),
        &args.paths,
        &args.dir,
        args.keep_outside_links,
        &mut |message| warn(message),
    )?;
    if problems > 0 {
        eprintln!(
            "diskkit: {problems} problem(s): some entries of {} were not extracted",
            printable(&args.iso.display().to_string())
        );
        return Ok(EXIT_ERROR);
    }
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(mode_string(0o040755), "drwxr-xr-x");
        assert_eq!(mode_string(0o100600), "-rw-------");
        assert_eq!(mode_string(0o120777), "lrwxrwxrwx");
        assert_eq!(mode_string(0o104755), "-rwsr-xr-x");
        assert_eq!(mode_string(0o041644), "drw-r--r-T");
    }
}

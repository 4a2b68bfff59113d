//! Command-line interface, qemu-img style. Each subcommand lives in its own module.

mod amend;
mod batch;
mod bitmap;
mod bundle;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod generate;
mod hash;
mod info;
mod inplace;
mod iso;
mod map;
mod measure;
mod rebase;
mod resize;
mod snapshot;
mod storage;
mod targets;
mod util;

use clap::{Parser, Subcommand};

/// Exit codes shared by all commands (as qemu-img uses them).
pub const EXIT_OK: i32 = 0;
/// `compare`: the images differ.
pub const EXIT_DIFFERENT: i32 = 1;
/// An error: bad arguments, unreadable or corrupt image.
pub const EXIT_ERROR: i32 = 2;

#[derive(Parser)]
#[command(
    name = "diskkit",
    version,
    about = "Disk images for the cloud (raw, qcow2, VHD, VHDX, VMDK, ISO): inspect, check, \
create, resize, convert, compare and hash them, list and extract ISO files, and push, pull and \
verify them in object storage (S3, OSS, OBS or a local directory)",
    long_about = "Disk images for the cloud (raw, qcow2, VHD, VHDX, VMDK, ISO): inspect (info, \
map), check and repair, create, resize and measure, convert, compare and hash them, list and \
extract the files of ISO images, and push, pull, verify, list and remove them in object storage \
(s3://, oss://, obs:// or a local directory as the bucket; see diskkit push --help).\n\n\
diskkit works on the guest-visible content of disk images in any supported \
format, reading only what the image's allocation map says holds data.\n\n\
Formats are detected from magic bytes, never from file names; -f FMT forces one \
(raw, qcow2, vpc|vhd, vhdx, vmdk, iso).\n\n\
Exit codes: 0 success (compare: identical), 1 compare: images differ, 2 error \
(bad arguments, unreadable or corrupt image); check has its own (see diskkit check --help).",
    after_help = "Sizes accept suffixes K, M, G, T, P (powers of 1024), e.g. 10G or 512M."
)]
pub struct Cli {
    /// Refuse files that image metadata names (backing files, data files, VMDK extents, VHD and
    /// VHDX parents) outside the image's directory, instead of warning about them
    #[arg(long, global = true)]
    no_external_files: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Info(info::Args),
    Map(map::Args),
    Compare(compare::Args),
    Iso(iso::Args),
    Hash(hash::Args),
    Convert(convert::Args),
    Create(create::Args),
    Measure(measure::Args),
    Resize(resize::Args),
    Check(check::Args),
    Push(storage::PushArgs),
    Pull(storage::PullArgs),
    Verify(storage::VerifyArgs),
    Ls(storage::LsArgs),
    Rm(storage::RmArgs),
    Snapshot(snapshot::Args),
    Amend(amend::Args),
    Bitmap(bitmap::Args),
    Rebase(rebase::Args),
    Commit(commit::Args),
    Targets(targets::Args),
    Bundle(bundle::Args),
    Batch(batch::Args),
    Completions(generate::CompletionsArgs),
    Man(generate::ManArgs),
}

pub fn run() -> i32 {
    let cli = Cli::parse();
    util::set_implicit_opens(if cli.no_external_files {
        diskkit::formats::ImplicitOpens::RefuseOutsideDir
    } else {
        diskkit::formats::ImplicitOpens::WarnOutsideDir
    });
    let result = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Map(a) => map::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Iso(a) => iso::run(a),
        Command::Hash(a) => hash::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Create(a) => create::run(a),
        Command::Measure(a) => measure::run(a),
        Command::Resize(a) => resize::run(a),
        Command::Check(a) => check::run(a),
        Command::Push(a) => storage::push(a),
        Command::Pull(a) => storage::pull(a),
        Command::Verify(a) => storage::verify(a),
        Command::Ls(a) => storage::ls(a),
        Command::Rm(a) => storage::rm(a),
        Command::Snapshot(a) => snapshot::run(a),
        Command::Amend(a) => amend::run(a),
        Command::Bitmap(a) => bitmap::run(a),
        Command::Rebase(a) => rebase::run(a),
        Command::Commit(a) => commit::run(a),
        Command::Targets(a) => targets::run(a),
        Command::Bundle(a) => bundle::run(a),
        Command::Batch(a) => batch::run(a),
        Command::Completions(a) => generate::completions(a),
        Command::Man(a) => generate::man(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            util::report_error(&e);
            EXIT_ERROR
        }
    }
}

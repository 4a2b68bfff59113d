//! `diskkit hash`: a format-independent digest of guest content, sha256sum style, with per-chunk
//! manifests and verification against them.

use super::util::{
    Bar, Out, open_image, parse_digest_algorithm, parse_format, parse_size, printable,
    report_error, warn,
};
use super::{EXIT_DIFFERENT, EXIT_ERROR, EXIT_OK};
use diskkit::formats::digest::{
    Algorithm, ChunkDigest, DEFAULT_CHUNK_SIZE, Manifest, check_chunk_size, hex,
};
use diskkit::formats::{Error, Format, Result};
use diskkit::hash::{ImageHash, hash_image, hash_stream};
use diskkit::hash_check::{ManifestCheck, check_image, check_stream, parse_digest_line};
use diskkit::progress::NoProgress;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

/// Hash the guest content of images, the same digest whatever the format (sha256sum-style output)
#[derive(clap::Args)]
#[command(
    long_about = "Hash the guest-visible content of images: the same disk gives the same \
digest as raw, qcow2, VHD or any other format, sparse or not. Prints `DIGEST  NAME` lines like \
sha256sum. IMAGE is an image file in any supported format; `-`, or no IMAGE, hashes stdin as a \
raw stream.\n\n\
The digest (diskkit-guest-sha256-v1): the content is cut into chunks of --chunk-size bytes (the \
last may be short), each chunk is hashed with SHA-256, and the digest is SHA-256 of the ASCII tag \
\"diskkit-guest-sha256-v1\", the chunk size as 64-bit little-endian, the chunk digests in order, \
and the virtual size as 64-bit little-endian. Zero ranges of the allocation map are not read. \
With -a blake3, the same with BLAKE3 and the tag \"diskkit-guest-blake3-v1\": about three times \
faster per core, the digest `diskkit batch run` records for conversions by default.\n\n\
--manifest FILE writes the per-chunk digests (hash and CRC-32) as JSON.\n\n\
--check MANIFEST IMAGE verifies an image against a manifest and names the chunks that differ. \
It tells content that differs from the same content with zeros added or removed at the end (a \
VHD whose size was rounded up to a CHS geometry, a size rounded to sectors: what compare calls \
identical), which has its own exit code. --check LIST, where LIST holds `DIGEST  NAME` lines as \
diskkit hash prints them, hashes every NAME with the -a and --chunk-size given (a list does not record them: use \
the ones it was made with; default sha256 and 4M) and prints \
`NAME: OK` or `NAME: FAILED`, as sha256sum -c.\n\n\
Exit codes: 0 success (--check: the same content and size), 1 --check: the content differs, \
2 error (bad arguments, unreadable or corrupt image or manifest), 3 --check MANIFEST: the same \
content, but one side has zero bytes past the other's end."
)]
pub struct Args {
    /// Image format (detected from magic bytes when omitted; stdin is always raw)
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// Chunk size: a power of two from 4K to 256M [default: 4M; a manifest has its own]
    #[arg(long, value_parser = parse_size)]
    chunk_size: Option<u64>,
    /// Hash function: sha256 or blake3 [default: sha256; a manifest has its own]
    #[arg(short = 'a', long, value_name = "ALGORITHM", value_parser = parse_digest_algorithm)]
    algorithm: Option<Algorithm>,
    /// Hash the image as of this internal snapshot (name or ID)
    #[arg(short = 'l', long)]
    snapshot: Option<String>,
    /// Show a progress bar
    #[arg(short = 'p', long)]
    progress: bool,
    /// Write the per-chunk manifest (JSON) of the single IMAGE to FILE, atomically
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Verify the single IMAGE against the manifest FILE, or every image of a `DIGEST  NAME`
    /// list FILE
    #[arg(long, value_name = "FILE", conflicts_with = "manifest")]
    check: Option<PathBuf>,
    /// Image files in any format diskkit reads (raw, qcow2, vpc/VHD, vhdx, vmdk, iso), detected
    /// from their content unless -f names one; `-` or none: stdin, as a raw stream
    images: Vec<PathBuf>,
}

/// `--check MANIFEST`: the same content, with zero bytes past one side's end.
const EXIT_ZERO_TAIL: i32 = 3;

/// A digest list longer than this is refused rather than read into memory.
const MAX_DIGEST_LIST: u64 = 16 << 20;

pub fn run(args: Args) -> Result<i32> {
    let mut images = args.images.clone();
    if images.is_empty() {
        images.push(PathBuf::from("-"));
    }
    if let Some(file) = &args.check {
        return check(&args, file, &images);
    }
    let chunk_size = chunk_size(&args)?;
    if let Some(manifest_path) = &args.manifest {
        let [image] = images.as_slice() else {
            return Err(Error::invalid("--manifest needs exactly one IMAGE"));
        };
        let mut chunks = Vec::new();
        let (hash, format) = hash_one(&args, image, chunk_size, Some(&mut |c| chunks.push(c)))?;
        let mut manifest = Manifest::new(hash.algorithm, chunk_size, chunks)?;
        manifest.format = Some(format);
        manifest.source = Some(image.display().to_string());
        diskkit::output::write_file(manifest_path, manifest.to_json().as_bytes())?;
        let mut out = Out::new();
        writeln!(out, "{}  {}", hex(&hash.digest), image.display())?;
        out.flush()?;
        return Ok(EXIT_OK);
    }
    let mut code = EXIT_OK;
    let mut out = Out::new();
    for image in &images {
        match hash_one(&args, image, chunk_size, None) {
            Ok((hash, _)) => {
                // Each line as soon as it is known: hashing the next image may take minutes.
                writeln!(out, "{}  {}", hex(&hash.digest), image.display())?;
                out.flush()?;
            }
            Err(e) => {
                report_error(&e);
                code = EXIT_ERROR;
            }
        }
    }
    Ok(code)
}

fn algorithm(args: &Args) -> Algorithm {
    args.algorithm.unwrap_or_default()
}

fn chunk_size(args: &Args) -> Result<u64> {
    let chunk_size = args.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
    check_chunk_size(chunk_size)?;
    Ok(chunk_size)
}

/// Hashes one image (or stdin for `-`); returns its hash and format name.
fn hash_one(
    args: &Args,
    image: &Path,
    chunk_size: u64,
    on_chunk: Option<&mut dyn FnMut(ChunkDigest)>,
) -> Result<(ImageHash, String)> {
    if image == Path::new("-") {
        check_stdin_args(args)?;
        // The stream length is unknown: no progress bar.
        let stdin = &mut std::io::stdin();
        let hash = hash_stream(stdin, algorithm(args), chunk_size, &NoProgress, on_chunk)?;
        return Ok((hash, Format::Raw.name().to_string()));
    }
    let img = open_image(image, args.format, args.snapshot.as_deref())?;
    let size = img.virtual_size();
    let bar = Bar::new(args.progress, size, &format!("hashing {}", image.display()))
        .with_data_of(&[img.as_ref()], size)?;
    let hash = hash_image(img.as_ref(), algorithm(args), chunk_size, &bar, on_chunk)?;
    bar.finish();
    Ok((hash, img.format().name().to_string()))
}

fn check_stdin_args(args: &Args) -> Result<()> {
    if args.format.is_some_and(|f| f != Format::Raw) || args.snapshot.is_some() {
        return Err(Error::invalid(
            "stdin is hashed as a raw stream: -f and --snapshot need an image file",
        ));
    }
    Ok(())
}

/// `--check FILE`: a manifest (JSON) checks the one IMAGE, a digest list checks its names.
fn check(args: &Args, file: &Path, images: &[PathBuf]) -> Result<i32> {
    let mut reader =
        std::io::BufReader::new(std::fs::File::open(file).map_err(|e| Error::io(file, "open", e))?);
    let starts_json = reader
        .fill_buf()
        .map_err(|e| Error::io(file, "read", e))?
        .trim_ascii_start()
        .starts_with(b"{");
    if starts_json {
        let manifest = Manifest::from_json(reader)
            .map_err(|e| Error::invalid(format!("{}: {e}", file.display())))?;
        if args.chunk_size.is_some_and(|c| c != manifest.chunk_size) {
            return Err(Error::invalid(format!(
                "{}: the manifest's chunk size is {}: --chunk-size cannot change it",
                file.display(),
                manifest.chunk_size
            )));
        }
        if args.algorithm.is_some_and(|a| a != manifest.algorithm) {
            return Err(Error::invalid(format!(
                "{}: the manifest's algorithm is {}: -a cannot change it",
                file.display(),
                manifest.algorithm
            )));
        }
        let [image] = images else {
            return Err(Error::invalid(
                "--check MANIFEST verifies exactly one IMAGE",
            ));
        };
        return check_manifest(args, &manifest, image);
    }
    if !args.images.is_empty() {
        return Err(Error::invalid(format!(
            "{}: a digest list names its images: no IMAGE arguments",
            file.display()
        )));
    }
    let mut text = String::new();
    reader
        .take(MAX_DIGEST_LIST + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(file, "read", e))?;
    if text.len() as u64 > MAX_DIGEST_LIST {
        return Err(Error::invalid(format!(
            "{}: a digest list is at most {MAX_DIGEST_LIST} bytes",
            file.display()
        )));
    }
    check_list(args, file, &text)
}

fn check_manifest(args: &Args, manifest: &Manifest, image: &Path) -> Result<i32> {
    let result = if image == Path::new("-") {
        check_stdin_args(args)?;
        check_stream(&mut std::io::stdin(), manifest, &NoProgress)?
    } else {
        let img = open_image(image, args.format, args.snapshot.as_deref())?;
        let size = manifest.virtual_size;
        let bar = Bar::new(
            args.progress,
            size,
            &format!("checking {}", image.display()),
        )
        .with_data_of(&[img.as_ref()], size)?;
        let result = check_image(img.as_ref(), manifest, &bar)?;
        bar.finish();
        result
    };
    let name = image.display().to_string();
    let name = printable(&name);
    let mut out = Out::new();
    let code = match result {
        ManifestCheck::Matches => {
            writeln!(out, "{name}: OK")?;
            EXIT_OK
        }
        ManifestCheck::ZeroTail {
            image_size,
            manifest_size,
        } => {
            let (n, how) = if image_size > manifest_size {
                (image_size - manifest_size, "added at")
            } else {
                (manifest_size - image_size, "missing from")
            };
            writeln!(
                out,
                "{name}: SAME CONTENT, {n} zero bytes {how} the end (virtual size {image_size}, \
                 the manifest's {manifest_size}: a VHD geometry or sector rounding)"
            )?;
            EXIT_ZERO_TAIL
        }
        ManifestCheck::Differs {
            chunks,
            image_size,
            manifest_size,
            nonzero_past_end,
        } => {
            for offset in &chunks {
                writeln!(
                    out,
                    "chunk {} at offset {offset}: differs",
                    offset / manifest.chunk_size
                )?;
            }
            if let Some(offset) = nonzero_past_end {
                writeln!(out, "data at offset {offset}, past the manifest's end")?;
            }
            let size = if image_size == manifest_size {
                String::new()
            } else {
                format!("; virtual size {image_size} differs from the manifest's {manifest_size}")
            };
            writeln!(
                out,
                "{name}: FAILED ({} of {} chunks differ{size})",
                chunks.len(),
                manifest.chunks.len()
            )?;
            EXIT_DIFFERENT
        }
    };
    out.flush()?;
    Ok(code)
}

/// `sha256sum -c` for `diskkit hash` output: hashes every name of the list.
fn check_list(args: &Args, file: &Path, text: &str) -> Result<i32> {
    let chunk_size = chunk_size(args)?;
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = parse_digest_line(line)
            .map_err(|e| Error::invalid(format!("{} line {}: {e}", file.display(), i + 1)))?;
        entries.push(entry);
    }
    if entries.is_empty() {
        return Err(Error::invalid(format!(
            "{}: no `DIGEST  NAME` line",
            file.display()
        )));
    }
    let mut out = Out::new();
    let (mut failed, mut errors, total) = (0, 0, entries.len());
    for (digest, name) in entries {
        let shown = printable(name);
        match hash_one(args, Path::new(name), chunk_size, None) {
            Ok((hash, _)) if hash.digest == digest => writeln!(out, "{shown}: OK")?,
            Ok(_) => {
                failed += 1;
                writeln!(out, "{shown}: FAILED")?;
            }
            Err(e) => {
                errors += 1;
                out.flush()?;
                report_error(&e);
                writeln!(out, "{shown}: FAILED open or read")?;
            }
        }
        out.flush()?;
    }
    if failed > 0 {
        // A list does not say how its digests were made.
        let hint = if failed + errors == total {
            format!(
                " (none did: was the list made with other -a or --chunk-size than {} and {chunk_size}?)",
                algorithm(args)
            )
        } else {
            String::new()
        };
        warn(&format!("{failed} computed digest(s) did NOT match{hint}"));
    }
    Ok(if errors > 0 {
        EXIT_ERROR
    } else if failed > 0 {
        EXIT_DIFFERENT
    } else {
        EXIT_OK
    })
}

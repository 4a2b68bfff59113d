//! `diskkit hash`: a format-independent digest of guest content, sha256sum style, with per-chunk
//! manifests and verification against them.

use super::util::{Bar, Out, open_image, parse_format, parse_size, printable, report_error};
use super::{EXIT_DIFFERENT, EXIT_ERROR, EXIT_OK};
use diskkit::formats::digest::{ChunkDigest, DEFAULT_CHUNK_SIZE, Manifest, check_chunk_size, hex};
use diskkit::formats::{Error, Format, Result};
use diskkit::hash::{ImageHash, hash_image, hash_stream};
use diskkit::progress::NoProgress;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Hash the guest content of images, the same digest whatever the format (sha256sum-style output)
#[derive(clap::Args)]
#[command(
    long_about = "Hash the guest-visible content of images: the same disk gives the same \
digest as raw, qcow2, VHD or any other format, sparse or not. Prints `DIGEST  NAME` lines like \
sha256sum. IMAGE `-`, or no IMAGE, hashes stdin as a raw stream.\n\n\
The digest (diskkit-guest-sha256-v1): the content is cut into chunks of --chunk-size bytes (the \
last may be short), each chunk is hashed with SHA-256, and the digest is SHA-256 of the ASCII tag \
\"diskkit-guest-sha256-v1\", the chunk size as 64-bit little-endian, the chunk digests in order, \
and the virtual size as 64-bit little-endian. Zero ranges of the allocation map are not read.\n\n\
--manifest FILE writes the per-chunk digests (SHA-256 and CRC-32) as JSON; --check MANIFEST IMAGE \
verifies an image against one and names the chunks that differ.\n\n\
Exit codes: 0 success (--check: the image matches), 1 --check: the image differs from the \
manifest, 2 error (bad arguments, unreadable or corrupt image or manifest)."
)]
pub struct Args {
    /// Image format (detected from magic bytes when omitted; stdin is always raw)
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// Chunk size: a power of two from 4K to 256M [default: 4M]
    #[arg(long, value_parser = parse_size, conflicts_with = "check")]
    chunk_size: Option<u64>,
    /// Hash the image as of this internal snapshot (name or ID)
    #[arg(short = 'l', long)]
    snapshot: Option<String>,
    /// Show a progress bar
    #[arg(short = 'p', long)]
    progress: bool,
    /// Write the per-chunk manifest (JSON) of the single IMAGE to FILE, atomically
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Verify the single IMAGE against MANIFEST; list the chunks that differ
    #[arg(long, value_name = "MANIFEST", conflicts_with = "manifest")]
    check: Option<PathBuf>,
    /// Images to hash (`-` or none: stdin)
    images: Vec<PathBuf>,
}

pub fn run(args: Args) -> Result<i32> {
    let mut images = args.images.clone();
    if images.is_empty() {
        images.push(PathBuf::from("-"));
    }
    if let Some(manifest) = &args.check {
        let [image] = images.as_slice() else {
            return Err(Error::invalid("--check verifies exactly one IMAGE"));
        };
        return check(&args, manifest, image);
    }
    let chunk_size = args.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
    check_chunk_size(chunk_size)?;
    if let Some(manifest_path) = &args.manifest {
        let [image] = images.as_slice() else {
            return Err(Error::invalid("--manifest needs exactly one IMAGE"));
        };
        let mut chunks = Vec::new();
        let (hash, format) = hash_one(&args, image, chunk_size, Some(&mut |c| chunks.push(c)))?;
        let mut manifest = Manifest::new(chunk_size, chunks)?;
        manifest.format = Some(format);
        manifest.source = Some(image.display().to_string());
        write_atomically(manifest_path, &manifest.to_json())?;
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

/// Hashes one image (or stdin for `-`); returns its hash and format name.
fn hash_one(
    args: &Args,
    image: &Path,
    chunk_size: u64,
    on_chunk: Option<&mut dyn FnMut(ChunkDigest)>,
) -> Result<(ImageHash, String)> {
    if image == Path::new("-") {
        if args.format.is_some_and(|f| f != Format::Raw) || args.snapshot.is_some() {
            return Err(Error::invalid(
                "stdin is hashed as a raw stream: -f and --snapshot need an image file",
            ));
        }
        // The stream length is unknown: no progress bar.
        let hash = hash_stream(&mut std::io::stdin(), chunk_size, &NoProgress, on_chunk)?;
        return Ok((hash, Format::Raw.name().to_string()));
    }
    let img = open_image(image, args.format, args.snapshot.as_deref())?;
    let bar = Bar::new(args.progress, img.virtual_size(), "hashing");
    let hash = hash_image(img.as_ref(), chunk_size, &bar, on_chunk)?;
    bar.finish();
    Ok((hash, img.format().name().to_string()))
}

fn check(args: &Args, manifest_path: &Path, image: &Path) -> Result<i32> {
    let file =
        std::fs::File::open(manifest_path).map_err(|e| Error::io(manifest_path, "open", e))?;
    let expected = Manifest::from_json(file)
        .map_err(|e| Error::invalid(format!("{}: {e}", manifest_path.display())))?;
    let mut differing = Vec::new();
    let mut index = 0usize;
    let (hash, _) = hash_one(
        args,
        image,
        expected.chunk_size,
        Some(&mut |c| {
            if expected.chunks.get(index) != Some(&c) {
                differing.push(c.offset);
            }
            index += 1;
        }),
    )?;
    let name = image.display().to_string();
    let name = printable(&name);
    let mut out = Out::new();
    if hash.virtual_size != expected.virtual_size {
        writeln!(
            out,
            "{name}: FAILED: virtual size {} differs from the manifest's {}",
            hash.virtual_size, expected.virtual_size
        )?;
        out.flush()?;
        return Ok(EXIT_DIFFERENT);
    }
    if differing.is_empty() && hash.digest == expected.digest {
        writeln!(out, "{name}: OK")?;
        out.flush()?;
        return Ok(EXIT_OK);
    }
    for offset in &differing {
        writeln!(
            out,
            "chunk {} at offset {offset}: differs",
            offset / expected.chunk_size
        )?;
    }
    writeln!(
        out,
        "{name}: FAILED ({} of {} chunks differ)",
        differing.len(),
        expected.chunks.len()
    )?;
    out.flush()?;
    Ok(EXIT_DIFFERENT)
}

/// Writes `text` to `path` so that readers see the old file or the whole new one, even after a
/// crash: a temporary file in the same directory, flushed to disk, renamed over `path`.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = &diskkit::output::final_target(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".diskkit-manifest-")
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, "create temporary file", e))?;
    tmp.write_all(text.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| Error::io(tmp.path(), "write", e))?;
    tmp.persist(path)
        .map_err(|e| Error::io(path, "rename into place", e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "sync directory", e))
}

//! Is this the disk a hash manifest, or a `DIGEST  NAME` line, describes? Tells content that
//! differs from the same content with zeros added or removed at the end: what a VHD whose size
//! was rounded up to a CHS geometry, or a size rounded to whole sectors, shows next to its
//! source, and what `compare` calls identical.

use crate::compare::first_nonzero;
use crate::hash::{hash_image, hash_stream};
use crate::progress::Progress;
use diskkit_formats::digest::{ChunkDigest, Manifest};
use diskkit_formats::image::check_guest_range;
use diskkit_formats::{Error, Extent, ExtentKind, Format, Image, ImageInfo, Result};
use std::io::Read;

/// The verdict of [`check_image`] and [`check_stream`].
#[derive(Debug, PartialEq, Eq)]
pub enum ManifestCheck {
    /// Same size, same content.
    Matches,
    /// Same content; the sizes differ and every byte past the shorter end is zero.
    ZeroTail { image_size: u64, manifest_size: u64 },
    /// The content differs.
    Differs {
        /// Guest offsets of the manifest's chunks that differ (over the manifest's size).
        chunks: Vec<u64>,
        image_size: u64,
        manifest_size: u64,
        /// The image's first non-zero byte past the manifest's end.
        nonzero_past_end: Option<u64>,
    },
}

/// Checks `image` against `manifest`: hashes the image cut or zero-extended to the manifest's
/// size with the manifest's chunk size, and scans what lies past the manifest's end for data.
pub fn check_image(
    image: &dyn Image,
    manifest: &Manifest,
    progress: &dyn Progress,
) -> Result<ManifestCheck> {
    let view = Resized {
        inner: image,
        size: manifest.virtual_size,
    };
    let mut diff = ChunkDiff::new(manifest);
    let hash = hash_image(
        &view,
        manifest.algorithm,
        manifest.chunk_size,
        progress,
        Some(&mut |c| diff.push(c)),
    )?;
    let image_size = image.virtual_size();
    let nonzero_past_end = if image_size > manifest.virtual_size {
        first_nonzero(image, manifest.virtual_size, image_size)?
    } else {
        None
    };
    Ok(diff.finish(hash.digest, image_size, nonzero_past_end))
}

/// Checks a raw stream against `manifest`. Its length is known only at its end, so a stream of
/// another size differs: telling zeros added at the end needs an image file.
pub fn check_stream(
    reader: &mut (dyn Read + Send),
    manifest: &Manifest,
    progress: &dyn Progress,
) -> Result<ManifestCheck> {
    let mut diff = ChunkDiff::new(manifest);
    let hash = hash_stream(
        reader,
        manifest.algorithm,
        manifest.chunk_size,
        progress,
        Some(&mut |c| diff.push(c)),
    )?;
    let sized = if hash.virtual_size == manifest.virtual_size {
        diff.finish(hash.digest, hash.virtual_size, None)
    } else {
        ManifestCheck::Differs {
            chunks: diff.differing,
            image_size: hash.virtual_size,
            manifest_size: manifest.virtual_size,
            nonzero_past_end: None,
        }
    };
    Ok(sized)
}

/// Compares chunk digests, in guest order, with the manifest's.
struct ChunkDiff<'a> {
    manifest: &'a Manifest,
    index: usize,
    differing: Vec<u64>,
}

impl<'a> ChunkDiff<'a> {
    fn new(manifest: &'a Manifest) -> Self {
        ChunkDiff {
            manifest,
            index: 0,
            differing: Vec::new(),
        }
    }

    fn push(&mut self, chunk: ChunkDigest) {
        if self.manifest.chunks.get(self.index) != Some(&chunk) {
            self.differing.push(chunk.offset);
        }
        self.index += 1;
    }

    /// The verdict once the content up to the manifest's size has been hashed into `digest`.
    fn finish(
        self,
        digest: [u8; 32],
        image_size: u64,
        nonzero_past_end: Option<u64>,
    ) -> ManifestCheck {
        let manifest_size = self.manifest.virtual_size;
        if !self.differing.is_empty()
            || digest != self.manifest.digest
            || nonzero_past_end.is_some()
        {
            ManifestCheck::Differs {
                chunks: self.differing,
                image_size,
                manifest_size,
                nonzero_past_end,
            }
        } else if image_size == manifest_size {
            ManifestCheck::Matches
        } else {
            ManifestCheck::ZeroTail {
                image_size,
                manifest_size,
            }
        }
    }
}

/// `inner` cut, or extended with zeros, to `size` bytes.
struct Resized<'a> {
    inner: &'a dyn Image,
    size: u64,
}

impl Image for Resized<'_> {
    fn format(&self) -> Format {
        self.inner.format()
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        check_guest_range(self.size, offset, 1)?;
        let max_len = max_len.min(self.size - offset);
        let inner_size = self.inner.virtual_size();
        if offset < inner_size {
            return self.inner.map(offset, max_len.min(inner_size - offset));
        }
        Ok(Extent {
            start: offset,
            length: max_len,
            kind: ExtentKind::Zero,
            depth: 0,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.size, offset, buf.len() as u64)?;
        let inside = self
            .inner
            .virtual_size()
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        let (data, past_end) = buf.split_at_mut(inside);
        if !data.is_empty() {
            self.inner.read_at(data, offset)?;
        }
        past_end.fill(0);
        Ok(())
    }

    fn with_mapped(&self, offset: u64, len: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.virtual_size().min(self.size) => {
                self.inner.with_mapped(offset, len, f)
            }
            _ => Ok(false),
        }
    }

    fn optimal_transfer(&self) -> u64 {
        self.inner.optimal_transfer()
    }

    fn info(&self) -> ImageInfo {
        self.inner.info()
    }
}

/// One line of `diskkit hash` output, as `sha256sum` writes them: 64 hex digits, two spaces
/// (or a space and `*`, sha256sum's binary mark), the name.
pub fn parse_digest_line(line: &str) -> Result<([u8; 32], &str)> {
    let malformed = || Error::invalid(format!("not a `DIGEST  NAME` line: {line:.80}"));
    let (hex, rest) = line.split_at_checked(64).ok_or_else(malformed)?;
    let name = rest
        .strip_prefix("  ")
        .or_else(|| rest.strip_prefix(" *"))
        .filter(|n| !n.is_empty())
        .ok_or_else(malformed)?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(malformed());
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.as_bytes().chunks(2)) {
        let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        *byte = digit(pair[0]) << 4 | digit(pair[1]);
    }
    Ok((digest, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_lines() {
        let hex = "00ff".repeat(16);
        let line = format!("{hex}  disk one.qcow2");
        let (digest, name) = parse_digest_line(&line).unwrap();
        assert_eq!((digest[0], digest[1], name), (0, 0xff, "disk one.qcow2"));
        assert_eq!(parse_digest_line(&format!("{hex} *d")).unwrap().1, "d");
        for bad in [
            format!("{hex} d"),
            format!("{hex}  "),
            format!("{}  d", &hex[..62]),
            format!("{}+1  d", &hex[..62]),
            format!("{}é  d", &hex[..62]),
            String::new(),
        ] {
            assert!(parse_digest_line(&bad).is_err(), "{bad}");
        }
    }
}

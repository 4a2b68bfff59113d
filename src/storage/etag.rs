//! Checks of objects diskkit did not push: the store's MD5 ETag, for single-part and multipart
//! uploads, computed as the object's bytes go by in order.

use super::download::PIECE;
use super::pull::Verified;
use super::{Location, ObjectMeta, manifest_key};
use diskkit_formats::digest::hex;
use diskkit_formats::error::ErrorKind;
use diskkit_formats::{Error, Result};
use std::path::Path;

/// Part sizes upload tools commonly use (aws cli 8 MiB, diskkit 16 MiB, the S3 minimum...):
/// candidates, besides the even split, for the part size of a multipart object.
const COMMON_PART_SIZES_MIB: [u64; 9] = [5, 8, 15, 16, 32, 64, 100, 128, 256];

/// Checks an object without a manifest against the store's ETag as its bytes go by in order:
/// a single-part upload's ETag is the content's MD5; a multipart one (`MD5-N`) the MD5 of its
/// N parts' MD5s, computed for each plausible part size (the store does not say which).
pub(super) struct EtagCheck {
    expected: String,
    whole: md5::Md5,
    /// Multipart candidates: (part size, its hasher).
    parts: Vec<(u64, PartMd5s)>,
}

/// The MD5 of each part of one size, folded into the MD5 of the MD5s.
#[derive(Default)]
struct PartMd5s {
    filled: u64,
    part: md5::Md5,
    of_parts: md5::Md5,
    count: u64,
}

impl EtagCheck {
    /// `None` when `verify` is off; an error when the ETag is no MD5 (or none) to check against.
    pub(super) fn new(
        meta: &ObjectMeta,
        location: &Location,
        verify: bool,
    ) -> Result<Option<EtagCheck>> {
        if !verify {
            return Ok(None);
        }
        let etag = meta.etag.as_deref().unwrap_or("").to_ascii_lowercase();
        let (md5, count) = match etag.split_once('-') {
            Some((md5, n)) => (
                md5,
                n.parse::<u64>().ok().filter(|n| (1..=10_000).contains(n)),
            ),
            None => (etag.as_str(), Some(0)),
        };
        let size = meta.size;
        let parts: Vec<(u64, PartMd5s)> = match count {
            Some(n) if n > 0 => {
                let even = size.div_ceil(n).next_multiple_of(1 << 20);
                let mut sizes: Vec<u64> = COMMON_PART_SIZES_MIB.iter().map(|m| m << 20).collect();
                sizes.extend([even, size.div_ceil(n)]);
                sizes.sort_unstable();
                sizes.dedup();
                sizes
                    .into_iter()
                    .filter(|&p| p > 0 && size.div_ceil(p).max(1) == n)
                    .map(|p| (p, PartMd5s::default()))
                    .collect()
            }
            _ => Vec::new(),
        };
        let plain = md5.len() == 32 && md5.bytes().all(|b| b.is_ascii_hexdigit());
        if !plain || count.is_none() || (count != Some(0) && parts.is_empty()) {
            return Err(Error::storage(
                ErrorKind::Unsupported,
                location.url(),
                "verify",
                format!(
                    "no diskkit manifest ({}) and no MD5 ETag (the store gives {}) to check the \
                     object against (diskkit pull --no-verify takes it unchecked)",
                    manifest_key(&location.key),
                    meta.etag
                        .as_deref()
                        .map_or("none".to_string(), |t| format!("'{t}'"))
                ),
            ));
        }
        Ok(Some(EtagCheck {
            expected: etag,
            whole: Default::default(),
            parts,
        }))
    }

    /// Feeds the object's next bytes.
    pub(super) fn feed(&mut self, mut bytes: &[u8]) {
        use md5::Digest;
        if self.parts.is_empty() {
            self.whole.update(bytes);
            return;
        }
        let all = bytes;
        for (size, p) in &mut self.parts {
            bytes = all;
            while !bytes.is_empty() {
                let n = ((*size - p.filled) as usize).min(bytes.len());
                p.part.update(&bytes[..n]);
                p.filled += n as u64;
                bytes = &bytes[n..];
                if p.filled == *size {
                    p.end_part();
                }
            }
        }
    }

    /// Compares what was fed with the ETag.
    pub(super) fn check(self, location: &Location) -> Result<Verified> {
        use md5::Digest;
        let found = if self.parts.is_empty() {
            vec![hex(&self.whole.finalize())]
        } else {
            self.parts
                .into_iter()
                .map(|(_, mut p)| {
                    if p.filled > 0 {
                        p.end_part();
                    }
                    format!("{}-{}", hex(&p.of_parts.finalize()), p.count)
                })
                .collect()
        };
        if !found.contains(&self.expected) {
            return Err(Error::storage(
                ErrorKind::DigestMismatch,
                location.url(),
                "verify",
                format!(
                    "content MD5 {} differs from the store's ETag {}",
                    found.join(" or "),
                    self.expected
                ),
            ));
        }
        Ok(Verified::Md5(self.expected))
    }

    /// Feeds the file at `path`, then checks.
    pub(super) fn check_file(mut self, path: &Path, location: &Location) -> Result<Verified> {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
        let mut buf = vec![0; PIECE];
        loop {
            match f.read(&mut buf) {
                Ok(0) => return self.check(location),
                Ok(n) => self.feed(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(path, "read", e)),
            }
        }
    }
}

impl PartMd5s {
    pub(super) fn end_part(&mut self) {
        use md5::Digest;
        let part = std::mem::take(&mut self.part).finalize();
        self.of_parts.update(part);
        self.filled = 0;
        self.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_of_single_and_multipart_uploads() {
        use md5::Digest;
        let data: Vec<u8> = (0..(11u32 << 20)).map(|i| (i % 251) as u8).collect();
        let location = Location::parse("s3://b/k").unwrap();
        let meta = |etag: &str| ObjectMeta {
            size: data.len() as u64,
            modified: None,
            etag: Some(etag.to_string()),
        };
        let whole = hex(&md5::Md5::digest(&data));
        // aws cli's 8 MiB parts.
        let part_md5s: Vec<u8> = data
            .chunks(8 << 20)
            .flat_map(|c| md5::Md5::digest(c).to_vec())
            .collect();
        let multipart = format!("{}-2", hex(&md5::Md5::digest(&part_md5s)));
        for etag in [&whole, &multipart] {
            let mut check = EtagCheck::new(&meta(etag), &location, true)
                .unwrap()
                .unwrap();
            for piece in data.chunks(777_777) {
                check.feed(piece);
            }
            assert_eq!(check.check(&location).unwrap(), Verified::Md5(etag.clone()));
        }
        let mut check = EtagCheck::new(&meta(&multipart), &location, true)
            .unwrap()
            .unwrap();
        check.feed(&data[1..]);
        let e = check.check(&location).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DigestMismatch, "{e}");
        // ETags that are no MD5 (or a part count no size fits) cannot check anything.
        for etag in [
            "abc",
            &format!("{whole}-0"),
            &format!("{whole}-x"),
            &format!("{whole}-9999"),
        ] {
            let e = EtagCheck::new(&meta(etag), &location, true).err().unwrap();
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{etag}: {e}");
        }
        assert!(
            EtagCheck::new(&meta("abc"), &location, false)
                .unwrap()
                .is_none()
        );
    }
}

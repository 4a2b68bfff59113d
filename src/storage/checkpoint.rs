//! The local record of an unfinished upload, so that rerunning the same push sends only the
//! parts still missing. One file per destination URL under `$XDG_CACHE_HOME/diskkit/uploads/`
//! (or `~/.cache/...`), rewritten atomically after every completed part.

use diskkit_formats::digest::hex;
use diskkit_formats::error::ErrorKind;
use diskkit_formats::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub url: String,
    /// What is being sent: source path, size and modification time, output format and
    /// options. A rerun with a different identity refuses to mix parts.
    pub identity: String,
    pub upload_id: String,
    pub object_size: u64,
    pub part_size: u64,
    /// Completed parts: number → ETag.
    pub parts: BTreeMap<u32, String>,
}

/// Where the checkpoint of uploads to `url` lives.
pub fn path_for(url: &str) -> Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or_else(|| Error::invalid("no cache directory: set HOME or XDG_CACHE_HOME"))?;
    let name = hex(&Sha256::digest(url.as_bytes())[..16]);
    Ok(base
        .join("diskkit")
        .join("uploads")
        .join(format!("{name}.json")))
}

impl Checkpoint {
    /// The checkpoint at `path`, if there is one.
    pub fn load(path: &Path) -> Result<Option<Checkpoint>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::storage(
                    ErrorKind::CorruptImage,
                    path.display().to_string(),
                    "read checkpoint",
                    format!(
                        "damaged upload checkpoint ({e}); remove it or run diskkit push --abort URL"
                    ),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, "read checkpoint", e)),
        }
    }

    /// Writes the checkpoint to `path` atomically (see [`crate::output`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create", e))?;
        }
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::invalid(format!("checkpoint: {e}")))?;
        crate::output::write_file(path, &json)
    }

    pub fn remove(path: &Path) -> Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(path, "remove checkpoint", e))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b.json");
        assert_eq!(Checkpoint::load(&path).unwrap(), None);
        let mut c = Checkpoint {
            url: "s3://b/k".into(),
            identity: "x".into(),
            upload_id: "id".into(),
            object_size: 10,
            part_size: 5,
            parts: BTreeMap::new(),
        };
        c.parts.insert(2, "\"etag\"".into());
        c.save(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), Some(c));
        Checkpoint::remove(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), None);
        std::fs::write(&path, "{").unwrap();
        assert!(Checkpoint::load(&path).is_err());
    }
}

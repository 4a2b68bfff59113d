//! Bucket URLs and the connection settings (endpoint, region, credentials) that go with them.

use diskkit_formats::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Which kind of store a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    S3,
    Oss,
    Obs,
    /// A local directory: the bucket that needs no server.
    Local,
}

/// An object (or, with an empty or `/`-terminated key, a prefix) in a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub scheme: Scheme,
    /// Bucket name; for [`Scheme::Local`], the directory that plays the bucket.
    pub bucket: String,
    /// Object key inside the bucket, without a leading `/`.
    pub key: String,
}

impl Location {
    /// Parses `s3://BUCKET/KEY`, `oss://BUCKET/KEY`, `obs://BUCKET/KEY`, `file://DIR/KEY` or a
    /// plain path. A local path that is an existing directory (or ends in `/`) names the
    /// directory itself, as a prefix to list.
    pub fn parse(url: &str) -> Result<Location> {
        let remote = [
            ("s3://", Scheme::S3),
            ("oss://", Scheme::Oss),
            ("obs://", Scheme::Obs),
        ];
        for (prefix, scheme) in remote {
            if let Some(rest) = url.strip_prefix(prefix) {
                let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(Error::invalid(format!("{url}: no bucket name")));
                }
                return Ok(Location {
                    scheme,
                    bucket: bucket.to_string(),
                    key: key.trim_start_matches('/').to_string(),
                });
            }
        }
        if url.contains("://") && !url.starts_with("file://") {
            return Err(Error::invalid(format!(
                "{url}: unknown scheme (s3://, oss://, obs://, file:// or a local path)"
            )));
        }
        let path = url.strip_prefix("file://").unwrap_or(url);
        if path.is_empty() {
            return Err(Error::invalid("empty location"));
        }
        let p = Path::new(path);
        if path.ends_with('/') || p.is_dir() {
            return Ok(Location {
                scheme: Scheme::Local,
                bucket: path.to_string(),
                key: String::new(),
            });
        }
        // The bucket is the nearest existing directory above the path; the rest is the key,
        // so pushes can create subdirectories as object stores create key prefixes.
        let mut dir = p.parent();
        let mut key = vec![
            p.file_name()
                .ok_or_else(|| Error::invalid(format!("{url}: not a file name")))?,
        ];
        while let Some(d) = dir {
            if d.as_os_str().is_empty() || d.is_dir() {
                break;
            }
            // `missing/..` names the directory above only once `missing` exists (the OS
            // resolves `..` through it): refuse rather than guess.
            let Some(name) = d.file_name() else {
                return Err(Error::invalid(format!(
                    "{url}: '..' after a directory that does not exist ({})",
                    d.parent().unwrap_or(d).display()
                )));
            };
            key.push(name);
            dir = d.parent();
        }
        let bucket = match dir {
            Some(d) if !d.as_os_str().is_empty() => d.to_string_lossy().into_owned(),
            _ => ".".to_string(),
        };
        key.reverse();
        let key: Vec<_> = key.iter().map(|k| k.to_string_lossy()).collect();
        Ok(Location {
            scheme: Scheme::Local,
            bucket,
            key: key.join("/"),
        })
    }

    /// True when the location names a prefix (to list) rather than one object.
    pub fn is_prefix(&self) -> bool {
        self.key.is_empty() || self.key.ends_with('/')
    }

    /// The location of another key in the same bucket.
    pub fn with_key(&self, key: &str) -> Location {
        Location {
            key: key.to_string(),
            ..self.clone()
        }
    }

    /// The URL form, for messages and checkpoint keys.
    pub fn url(&self) -> String {
        match self.scheme {
            Scheme::S3 => format!("s3://{}/{}", self.bucket, self.key),
            Scheme::Oss => format!("oss://{}/{}", self.bucket, self.key),
            Scheme::Obs => format!("obs://{}/{}", self.bucket, self.key),
            Scheme::Local => {
                let dir = absolute(Path::new(&self.bucket));
                format!("file://{}", dir.join(&self.key).display())
            }
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// How to reach and sign in to a store. Each field comes from the command-line flag when given,
/// else from the environment, else from the profile file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Address buckets as `BUCKET.endpoint` instead of `endpoint/BUCKET`.
    #[serde(default)]
    pub virtual_host: bool,
}

impl Settings {
    /// Fills the fields `self` (from flags) leaves empty from the environment variables of
    /// `scheme`, then from `profile` in the profile file (`default` when not named).
    pub fn resolve(mut self, scheme: Scheme, profile: Option<&str>) -> Result<Settings> {
        let env = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        let [endpoint, region, key, secret, token]: [&[&str]; 5] = match scheme {
            Scheme::S3 | Scheme::Local => [
                &["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"],
                &["AWS_REGION", "AWS_DEFAULT_REGION"],
                &["AWS_ACCESS_KEY_ID"],
                &["AWS_SECRET_ACCESS_KEY"],
                &["AWS_SESSION_TOKEN"],
            ],
            Scheme::Oss => [
                &["OSS_ENDPOINT"],
                &["OSS_REGION"],
                &["OSS_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_ID"],
                &["OSS_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_ACCESS_KEY_SECRET"],
                &[],
            ],
            Scheme::Obs => [
                &["OBS_ENDPOINT"],
                &[],
                &["OBS_ACCESS_KEY_ID", "HUAWEICLOUD_SDK_AK"],
                &["OBS_SECRET_ACCESS_KEY", "HUAWEICLOUD_SDK_SK"],
                &[],
            ],
        };
        self.endpoint = self.endpoint.or_else(|| env(endpoint));
        self.region = self.region.or_else(|| env(region));
        self.access_key_id = self.access_key_id.or_else(|| env(key));
        self.secret_access_key = self.secret_access_key.or_else(|| env(secret));
        self.session_token = self.session_token.or_else(|| env(token));
        if let Some(p) = load_profile(profile)? {
            self.endpoint = self.endpoint.or(p.endpoint);
            self.region = self.region.or(p.region);
            self.access_key_id = self.access_key_id.or(p.access_key_id);
            self.secret_access_key = self.secret_access_key.or(p.secret_access_key);
            self.session_token = self.session_token.or(p.session_token);
            self.virtual_host |= p.virtual_host;
        }
        Ok(self)
    }
}

/// The profile file: `$XDG_CONFIG_HOME/diskkit/profiles.json` (or `~/.config/...`), a JSON object
/// of named [`Settings`].
pub fn profile_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("diskkit").join("profiles.json"))
}

/// Reads profile `name` (or `default`). A named profile must exist; `default` may be absent.
fn load_profile(name: Option<&str>) -> Result<Option<Settings>> {
    let Some(path) = profile_path() else {
        return match name {
            Some(n) => Err(Error::invalid(format!("profile '{n}': no home directory"))),
            None => Ok(None),
        };
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && name.is_none() => return Ok(None),
        Err(e) => return Err(Error::io(&path, "read profile file", e)),
    };
    let mut profiles: BTreeMap<String, Settings> = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    match name {
        Some(n) => profiles
            .remove(n)
            .map(Some)
            .ok_or_else(|| Error::invalid(format!("{}: no profile '{n}'", path.display()))),
        None => Ok(profiles.remove("default")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let l = Location::parse("s3://b/dir/disk.raw").unwrap();
        assert_eq!(
            (l.scheme, l.bucket.as_str(), l.key.as_str()),
            (Scheme::S3, "b", "dir/disk.raw")
        );
        assert!(!l.is_prefix());
        let l = Location::parse("oss://b").unwrap();
        assert_eq!((l.scheme, l.key.as_str()), (Scheme::Oss, ""));
        assert!(l.is_prefix());
        assert!(Location::parse("s3:///key").is_err());
        assert!(Location::parse("gs://b/k").is_err());
        let l = Location::parse("file:///nonexistent-dir/x.img").unwrap();
        assert_eq!(
            (l.scheme, l.bucket.as_str(), l.key.as_str()),
            (Scheme::Local, "/", "nonexistent-dir/x.img")
        );
        let l = Location::parse("x.img").unwrap();
        assert_eq!((l.bucket.as_str(), l.key.as_str()), (".", "x.img"));
        assert!(Location::parse("/tmp/").unwrap().is_prefix());
        // `..` resolves as the OS does where the directory before it exists, and is refused
        // where it does not.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let l = Location::parse(&format!("{}/sub/../x.img", dir.path().display())).unwrap();
        assert_eq!(l.key, "x.img");
        assert_eq!(
            std::path::absolute(Path::new(&l.bucket))
                .unwrap()
                .join(&l.key),
            {
                std::fs::canonicalize(dir.path())
                    .unwrap()
                    .join("sub/../x.img")
            }
        );
        let missing = format!("{}/nosuch/../x.img", dir.path().display());
        let e = Location::parse(&missing).unwrap_err();
        assert!(
            e.to_string()
                .contains("'..' after a directory that does not exist"),
            "{e}"
        );
    }
}

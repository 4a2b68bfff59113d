//! `ls` and `rm`: the images under a prefix with what their manifests say, and their removal.

use super::local::is_upload_temp;
use super::push::ObjectManifest;
use super::{Location, MANIFEST_SUFFIX, Store, manifest_key};
use diskkit_formats::{Error, Result};

/// One object found by [`list`]: its key and what its manifest says (`None`: no or unreadable
/// manifest).
pub struct Listed {
    /// The key relative to the listed prefix.
    pub key: String,
    /// The whole key in the bucket.
    pub full_key: String,
    pub size: u64,
    pub modified: Option<std::time::SystemTime>,
    pub manifest: Option<ObjectManifest>,
}

/// The images under the prefix of `location`: every object except manifests and unfinished
/// local uploads.
pub fn list(store: &dyn Store, location: &Location) -> Result<Vec<Listed>> {
    let prefix = if location.is_prefix() {
        location.key.clone()
    } else {
        format!("{}/", location.key)
    };
    let mut out = Vec::new();
    for o in store.list(&prefix)? {
        let name = o.key.rsplit('/').next().unwrap_or(&o.key);
        if o.key.ends_with(MANIFEST_SUFFIX) || is_upload_temp(name) {
            continue;
        }
        let manifest = store
            .read_small(&manifest_key(&o.key))?
            .and_then(|b| ObjectManifest::from_json(&b).ok());
        out.push(Listed {
            key: o.key.strip_prefix(&prefix).unwrap_or(&o.key).to_string(),
            full_key: o.key,
            size: o.size,
            modified: o.modified,
            manifest,
        });
    }
    Ok(out)
}

/// Removes the image at `location` and its manifest.
pub fn remove(store: &dyn Store, location: &Location) -> Result<()> {
    if location.is_prefix() {
        return Err(Error::invalid(format!(
            "{}: name an object, not a prefix",
            location.url()
        )));
    }
    if store.stat(&location.key)?.is_none() {
        return Err(store.no_such_object(&location.key));
    }
    store.delete(&[location.key.clone(), manifest_key(&location.key)])
}

//! Item keys: what identifies an item's work, so that the same work is done once whoever runs
//! it, and a changed source is work of its own.

use super::jobfile::{BundleDisks, Item, Operation};
use sha2::{Digest, Sha256};

/// Domain of the key hash: a change of this definition changes every key.
const KEY_DEFINITION: &str = "diskkit-batch-item-v1";

/// The key of `item`: SHA-256 (first 128 bits, hex) over the source's identity (a local file's
/// absolute path, size and modification time; an object's URL), the destination, the
/// operation, the format, the options and the target.
pub fn item_key(item: &Item) -> String {
    let mut h = Sha256::new();
    for part in [
        KEY_DEFINITION.to_string(),
        source_identity(item),
        item.canonical(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    diskkit_formats::digest::hex(&digest[..16])
}

/// The item's identity in its job (the fields as written, not the source's content): failures
/// are recorded under it, so that a later success of the same item, whatever its source has
/// become, replaces them.
pub fn item_id(item: &Item) -> String {
    let mut h = Sha256::new();
    h.update(b"diskkit-batch-item-id-v1\0");
    h.update(item.canonical().as_bytes());
    diskkit_formats::digest::hex(&h.finalize()[..16])
}

fn source_identity(item: &Item) -> String {
    if !item.operation.local_source() {
        return item.source.clone();
    }
    let mut identity = file_identity(&item.source);
    // A bundle's data disks are sources too.
    if item.operation == Operation::Bundle
        && let Ok(disks) = BundleDisks::parse(&item.options, std::path::Path::new("/"))
    {
        for (_, path) in &disks.data {
            identity.push('\n');
            identity.push_str(&file_identity(path));
        }
    }
    identity
}

/// A local file's absolute path, size and modification time.
fn file_identity(path: &str) -> String {
    match std::fs::metadata(path) {
        Ok(m) => {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("{path} size={} mtime={mtime}", m.len())
        }
        // The item fails when it runs, naming the file.
        Err(_) => format!("{path} absent"),
    }
}

/// SHA-256 (hex) of the items' canonical forms, in order: the job's identity.
pub fn job_digest(items: &[Item]) -> String {
    let mut h = Sha256::new();
    for item in items {
        let c = item.canonical();
        h.update((c.len() as u64).to_le_bytes());
        h.update(c.as_bytes());
    }
    diskkit_formats::digest::hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::jobfile::parse;

    #[test]
    fn keys_follow_the_source_and_the_work() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.raw"), b"x").unwrap();
        let items = parse(
            "jobs",
            b"source,destination,format\na.raw,a.qcow2,qcow2\na.raw,b.qcow2,qcow2\na.raw,c.raw,\n",
            dir.path(),
        )
        .unwrap();
        let keys: Vec<_> = items.iter().map(item_key).collect();
        assert_eq!(keys[0].len(), 32);
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[0], keys[2]);
        assert_eq!(keys[0], item_key(&items[0]));
        std::fs::write(dir.path().join("a.raw"), b"xy").unwrap();
        let id = item_id(&items[0]);
        assert_ne!(keys[0], item_key(&items[0]), "a changed source is new work");
        assert_eq!(id, item_id(&items[0]), "of the same item");
        assert_ne!(id, item_id(&items[1]));
        assert_ne!(job_digest(&items), job_digest(&items[..2]));
    }
}

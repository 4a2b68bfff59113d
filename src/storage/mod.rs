//! Images in object storage: buckets addressed by URL, multipart uploads that resume, sidecar
//! manifests that prove content, ranged reads that feed the convert engine.
//!
//! Async stays inside this module: a [`Store`] (from [`open`]) drives its requests on the process's one tokio runtime and exposes
//! blocking calls, so the engine (convert, hash) keeps driving sources and writers synchronously
//! from its threads. Every failure is an [`Error::Storage`](diskkit_formats::Error::Storage) or
//! I/O error whose [`kind`](diskkit_formats::Error::kind) says what a program can do about it.
//!
//! Backends: `s3://` goes through OpenDAL for reads, listings, writes and deletes, and through
//! multipart calls of our own ([`s3`], signed by reqsign) for uploads, because resuming needs the
//! upload id and part numbers that OpenDAL keeps private. `oss://` and `obs://` use OpenDAL's
//! native backends (uploads there are multipart but not resumable). A local directory (or
//! `file://`) is the bucket that needs no server; its uploads go to a temporary file renamed
//! into place. The `store` module documents what each guarantees.

pub mod catalog;
mod checkpoint;
mod download;
mod etag;
mod local;
mod location;
mod object_file;
mod objects;
pub mod pull;
pub mod push;
pub mod remote;
mod s3;
mod store;

pub use location::{Location, Scheme, Settings};
pub use object_file::{
    ObjectFile, check_object, is_bucket_url, open_object_file, open_object_image,
};
pub use s3::region_and_endpoint;
pub use store::{ObjectEntry, ObjectMeta, Store, UploadParts, io_runtime, open};

/// Suffix of the sidecar manifest object written next to every pushed image.
pub const MANIFEST_SUFFIX: &str = ".diskkit.json";

/// Name of the sidecar manifest of the image object `key`.
pub fn manifest_key(key: &str) -> String {
    format!("{key}{MANIFEST_SUFFIX}")
}

/// Splits `data` into maximal runs of `grain`-sized blocks (the last may be shorter) that are all
/// zeros or all hold data, and hands each to `f` as `(start, end, zeros)`: zeros can stay holes.
fn zero_runs(
    data: &[u8],
    grain: usize,
    f: &mut dyn FnMut(usize, usize, bool) -> diskkit_formats::Result<()>,
) -> diskkit_formats::Result<()> {
    use diskkit_formats::image::first_nonzero_byte;
    let mut start = 0;
    while start < data.len() {
        let zeros = first_nonzero_byte(&data[start..(start + grain).min(data.len())]).is_none();
        let mut end = (start + grain).min(data.len());
        while end < data.len() {
            let next = (end + grain).min(data.len());
            if first_nonzero_byte(&data[end..next]).is_none() != zeros {
                break;
            }
            end = next;
        }
        f(start, end, zeros)?;
        start = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_runs_split_data_from_zeros() {
        let mut data = vec![0u8; 10];
        data[4] = 1;
        data[5] = 1;
        let mut runs = Vec::new();
        super::zero_runs(&data, 2, &mut |s, e, z| {
            runs.push((s, e, z));
            Ok(())
        })
        .unwrap();
        assert_eq!(runs, [(0, 4, true), (4, 6, false), (6, 10, true)]);
        data[9] = 1;
        runs.clear();
        super::zero_runs(&data, 4, &mut |s, e, z| {
            runs.push((s, e, z));
            Ok(())
        })
        .unwrap();
        assert_eq!(runs, [(0, 4, true), (4, 10, false)]);
    }
}

//! Snapshot pictures in object storage ([`object_store`]): a local directory by default, an
//! S3-compatible bucket in production.
//!
//! Keys, under the configured location: `snapshots/{device}/{seq}.jpg` for the full frame and
//! `snapshots/{device}/{seq}-crop.jpg` for the crop. A put is atomic (the local store writes a
//! temporary file, fsyncs it and renames it; S3 has no partial objects) and writing the same key
//! again replaces it with the same bytes, so an upload repeated by the agent is harmless. The
//! database row that names the keys is written after the objects (see
//! [`crate::store::EventStore::record_snapshot`]), so a row never points at a missing object; a
//! crash in between leaves an object without a row, which the agent's next upload adopts.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

/// Where snapshots are kept (the validated form of `[snapshots] url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotLocation {
    /// A local directory (created if missing).
    Local(PathBuf),
    /// An S3 or S3-compatible bucket and a key prefix (possibly empty). Credentials, region and
    /// endpoint come from the standard `AWS_*` environment variables.
    S3 { bucket: String, prefix: String },
}

impl std::fmt::Display for SnapshotLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotLocation::Local(dir) => write!(f, "file://{}", dir.display()),
            SnapshotLocation::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            SnapshotLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Everything that can go wrong with snapshot objects.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotStoreError {
    /// The local directory could not be created.
    #[error("snapshot directory {path}: {source}")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The object store failed (I/O, network, credentials, ...).
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// A key cannot be formed for this device id (`.` and `..` would be path traversal).
    #[error("no object key for device {0:?}")]
    BadDevice(String),
    /// A stored key is not a valid object path (the row is corrupt).
    #[error("invalid object key {0:?}")]
    BadKey(String),
}

/// The snapshot objects of the aggregator.
#[derive(Debug, Clone)]
pub struct SnapshotObjects {
    store: Arc<dyn ObjectStore>,
    location: String,
}

impl SnapshotObjects {
    /// Opens the store at `location`: creates the local directory, or configures the S3 client
    /// from the environment (no request is made yet).
    pub fn open(location: &SnapshotLocation) -> Result<Self, SnapshotStoreError> {
        let store: Arc<dyn ObjectStore> = match location {
            SnapshotLocation::Local(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|source| SnapshotStoreError::Directory { path: dir.clone(), source })?;
                // fsync the file and its directory before a put returns: the agent deletes its
                // copy once we confirm.
                Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir)?.with_fsync(true))
            }
            SnapshotLocation::S3 { bucket, prefix } => {
                let s3 = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).build()?;
                if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(s3, prefix.as_str()))
                }
            }
        };
        Ok(Self { store, location: location.to_string() })
    }

    /// Over any object store (tests use `object_store::memory::InMemory`).
    pub fn with_store(store: Arc<dyn ObjectStore>, location: impl Into<String>) -> Self {
        Self { store, location: location.into() }
    }

    /// Opens a local directory (tests and the demo).
    pub fn local(dir: &FsPath) -> Result<Self, SnapshotStoreError> {
        Self::open(&SnapshotLocation::Local(dir.to_path_buf()))
    }

    /// Where the objects are, for logs.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Key of the full frame of event `seq` of `device`.
    pub fn full_key(device: &str, seq: u64) -> Result<Path, SnapshotStoreError> {
        Self::key(device, format!("{seq}.jpg"))
    }

    /// Key of the crop of event `seq` of `device`.
    pub fn crop_key(device: &str, seq: u64) -> Result<Path, SnapshotStoreError> {
        Self::key(device, format!("{seq}-crop.jpg"))
    }

    fn key(device: &str, file: String) -> Result<Path, SnapshotStoreError> {
        if device.is_empty() || device == "." || device == ".." || device.contains('/') {
            return Err(SnapshotStoreError::BadDevice(device.to_owned()));
        }
        Ok(Path::from_iter([PathPart::from("snapshots"), PathPart::from(device), PathPart::from(file)]))
    }

    /// Stores `bytes` under `key`, durably when it returns.
    pub async fn put(&self, key: &Path, bytes: Vec<u8>) -> Result<(), SnapshotStoreError> {
        self.store.put(key, PutPayload::from(bytes)).await?;
        Ok(())
    }

    /// The object under `key` (as a database row names it); `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<axum::body::Bytes>, SnapshotStoreError> {
        let path = Path::parse(key).map_err(|_| SnapshotStoreError::BadKey(key.to_owned()))?;
        match self.store.get(&path).await {
            Ok(result) => Ok(Some(result.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the object under `key` (as a database row names it): `true` if it was deleted,
    /// `false` if it did not exist (S3 does not tell; it answers `true`). Retention only.
    pub async fn delete(&self, key: &str) -> Result<bool, SnapshotStoreError> {
        let path = Path::parse(key).map_err(|_| SnapshotStoreError::BadKey(key.to_owned()))?;
        match self.store.delete(&path).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_per_device_and_seq() {
        assert_eq!(SnapshotObjects::full_key("box-7", 42).expect("key").as_ref(), "snapshots/box-7/42.jpg");
        assert_eq!(SnapshotObjects::crop_key("box_7.a", 1).expect("key").as_ref(), "snapshots/box_7.a/1-crop.jpg");
        for bad in ["", ".", "..", "a/b"] {
            assert!(SnapshotObjects::full_key(bad, 1).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn local_objects_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let objects = SnapshotObjects::local(&dir.path().join("data")).expect("open");
        let key = SnapshotObjects::full_key("box-7", 3).expect("key");
        objects.put(&key, vec![0xFF, 0xD8, 0xFF, 1, 2]).await.expect("put");
        assert!(dir.path().join("data/snapshots/box-7/3.jpg").is_file());
        let got = objects.get(key.as_ref()).await.expect("get").expect("present");
        assert_eq!(&got[..], &[0xFF, 0xD8, 0xFF, 1, 2]);
        assert!(objects.get("snapshots/box-7/4.jpg").await.expect("get").is_none());
        assert!(matches!(objects.get("a//b").await, Err(SnapshotStoreError::BadKey(_))));
    }
}

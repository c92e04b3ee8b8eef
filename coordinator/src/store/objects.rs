//! Where files' bytes live: the chunk tables of the database (the default)
//! or an object store named by a URL (`--blob-store`): a local folder,
//! `s3://bucket/prefix` (any S3-compatible service), `gs://bucket/prefix`
//! or `az://container/prefix`. Credentials, endpoints and regions come from
//! the variables each service's own tools read (`AWS_*`, `GOOGLE_*`,
//! `AZURE_*`).
//!
//! Every file row records its location, so files of several stores can be
//! read side by side while `ptune-coordinator blobs move` moves them. A
//! row's object is `blobs/<id>` or `checkpoints/<id>` under the location.

use std::collections::HashMap;
use std::path::Path as FsPath;
use std::sync::{Arc, Mutex};

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use uuid::Uuid;

use super::{ChunkTarget, Result, Store, StoreError};

/// Where new files go.
#[derive(Clone, Debug, Default)]
pub enum BlobStore {
    /// Chunk rows in PostgreSQL.
    #[default]
    Database,
    /// An object store; PostgreSQL keeps the metadata.
    Objects(ObjectBackend),
}

impl BlobStore {
    /// The store a `--blob-store` value names: `postgres` (or an empty
    /// value) for the database, else an object store URL or an absolute
    /// folder path.
    pub fn parse(value: &str) -> Result<Self> {
        match value.trim() {
            "" | "postgres" | "postgresql" | "database" => Ok(BlobStore::Database),
            url => Ok(BlobStore::Objects(ObjectBackend::open(url)?)),
        }
    }

    /// The location new rows record (`None` for the database).
    pub fn location(&self) -> Option<&str> {
        match self {
            BlobStore::Database => None,
            BlobStore::Objects(backend) => Some(backend.location()),
        }
    }
}

/// An opened object store and the location that names it.
#[derive(Clone, Debug)]
pub struct ObjectBackend {
    location: Arc<str>,
    store: Arc<dyn ObjectStore>,
}

impl ObjectBackend {
    /// Opens the store `url` names; a folder is created if missing.
    pub fn open(url: &str) -> Result<Self> {
        let url = url.trim().trim_end_matches('/');
        let refuse = |why: String| StoreError::Objects(format!("--blob-store {url}: {why}"));
        if let Some(folder) = url.strip_prefix("file://").or(url.starts_with('/').then_some(url)) {
            let folder = if folder.is_empty() { "/" } else { folder };
            std::fs::create_dir_all(folder).map_err(|e| refuse(format!("cannot create the folder: {e}")))?;
            let store = LocalFileSystem::new_with_prefix(FsPath::new(folder)).map_err(|e| refuse(e.to_string()))?;
            return Ok(Self { location: format!("file://{folder}").into(), store: Arc::new(store) });
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(refuse(
                "expected postgres, an absolute folder, file:///folder, s3://bucket/prefix, gs://bucket/prefix \
                 or az://container/prefix"
                    .into(),
            ));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(refuse("the URL names no bucket or container".into()));
        }
        let root = format!("{scheme}://{bucket}");
        // The stores' HTTP client takes the process's TLS provider: ring,
        // as for gRPC (the workspace Cargo.toml says why no other). A
        // provider installed before is kept.
        #[allow(deprecated)] // ring, as tls.rs says
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let store: Arc<dyn ObjectStore> = match scheme {
            "s3" | "s3a" => {
                Arc::new(AmazonS3Builder::from_env().with_url(&root).build().map_err(|e| refuse(e.to_string()))?)
            }
            "gs" => Arc::new(
                GoogleCloudStorageBuilder::from_env().with_url(&root).build().map_err(|e| refuse(e.to_string()))?,
            ),
            "az" | "azure" | "abfs" | "abfss" => {
                Arc::new(MicrosoftAzureBuilder::from_env().with_url(&root).build().map_err(|e| refuse(e.to_string()))?)
            }
            other => return Err(refuse(format!("unknown scheme {other}; use s3, gs, az or file"))),
        };
        let prefix = prefix.trim_matches('/');
        let store: Arc<dyn ObjectStore> =
            if prefix.is_empty() { store } else { Arc::new(PrefixStore::new(store, Path::from(prefix))) };
        Ok(Self { location: url.into(), store })
    }

    /// The URL rows record for this store.
    pub fn location(&self) -> &str {
        &self.location
    }

    pub fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The object holding a file's bytes.
    pub fn path(target: ChunkTarget) -> Path {
        match target {
            ChunkTarget::Blob(id) => Path::from(format!("blobs/{id}")),
            ChunkTarget::Checkpoint(id) => Path::from(format!("checkpoints/{id}")),
        }
    }
}

/// The store new files go to, and the object stores opened to read files
/// other locations hold.
#[derive(Debug, Default)]
pub(super) struct Files {
    pub(super) write_to: BlobStore,
    opened: Mutex<HashMap<String, ObjectBackend>>,
}

/// Where a stored file's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRef {
    pub target: ChunkTarget,
    /// `None`: the chunk tables.
    pub location: Option<String>,
}

impl FileRef {
    pub fn blob(id: Uuid, location: Option<String>) -> Self {
        Self { target: ChunkTarget::Blob(id), location }
    }
}

impl Store {
    /// Sends new files to `blob_store` from now on.
    pub fn with_blob_store(mut self, blob_store: BlobStore) -> Self {
        self.files = Arc::new(Files { write_to: blob_store, opened: Mutex::default() });
        self
    }

    /// Where new files go.
    pub fn blob_store(&self) -> &BlobStore {
        &self.files.write_to
    }

    /// The object store at `location`: the configured one, or one opened
    /// (once) from the URL, for files written before a change of store.
    pub fn objects_at(&self, location: &str) -> Result<ObjectBackend> {
        if let BlobStore::Objects(backend) = &self.files.write_to {
            if backend.location() == location {
                return Ok(backend.clone());
            }
        }
        let mut opened = self.files.opened.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(backend) = opened.get(location) {
            return Ok(backend.clone());
        }
        let backend = ObjectBackend::open(location)?;
        opened.insert(location.to_string(), backend.clone());
        Ok(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_store() {
        assert!(matches!(BlobStore::parse("postgres").unwrap(), BlobStore::Database));
        assert!(matches!(BlobStore::parse("").unwrap(), BlobStore::Database));
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("files");
        let local = BlobStore::parse(folder.to_str().unwrap()).unwrap();
        assert_eq!(local.location(), Some(format!("file://{}", folder.display()).as_str()));
        assert!(folder.is_dir(), "the folder is created");
        let s3 = ObjectBackend::open("s3://bucket/some/prefix/").unwrap();
        assert_eq!(s3.location(), "s3://bucket/some/prefix");
        assert_eq!(ObjectBackend::path(ChunkTarget::Blob(Uuid::nil())).as_ref(), format!("blobs/{}", Uuid::nil()));
    }

    #[test]
    fn refusals_name_the_setting() {
        for bad in ["ftp://host/x", "s3://", "relative/folder"] {
            let e = ObjectBackend::open(bad).unwrap_err().to_string();
            assert!(e.contains("--blob-store"), "{bad}: {e}");
        }
    }
}

//! Files (datasets, adapters, checkpoints) written and streamed in chunks,
//! so that neither an upload nor a download holds a whole file in memory:
//! into chunk rows of the database, or into objects of the store given with
//! `--blob-store` (`store/objects.rs`), while PostgreSQL keeps the metadata.
//! An object is complete before the row that links it commits; an object
//! whose row goes is deleted by the leader ([`collect_dropped_objects`]).
//! [`move_files`] moves files between stores.

mod moving;

pub use moving::{move_files, MoveReport};

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, BoxStream, Stream, StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use crate::error::Error;
use crate::store::{self, BlobStore, ChunkTarget, FileRef, ObjectBackend, Store, StoreError};

/// Bytes per streamed chunk.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Bytes read from the database per query.
const WINDOW_BYTES: u64 = store::CHUNK_BYTES as u64;
/// Bytes per part of a multipart object upload (S3 wants at least 5 MiB).
const PART_BYTES: usize = 8 << 20;
/// Parts of one upload in flight at once; with [`PART_BYTES`] this bounds
/// what an upload to an object store holds in memory.
const PARTS_IN_FLIGHT: usize = 2;

/// The `size` bytes of a stored file as chunks of [`CHUNK_BYTES`], from the
/// database or the object store its row names.
pub fn read(store: Store, file: FileRef, size: u64) -> BoxStream<'static, Result<Vec<u8>, Error>> {
    match file.location {
        None => chunks(size, move |offset, len| {
            let store = store.clone();
            async move { Ok(store.file_window(file.target, offset, len).await?) }
        })
        .boxed(),
        Some(location) => stream::once(async move {
            let backend = store.objects_at(&location)?;
            let got = backend.objects().get(&ObjectBackend::path(file.target)).await.map_err(objects_error)?;
            Ok::<_, Error>(sized(got.into_stream(), size))
        })
        .try_flatten()
        .boxed(),
    }
}

/// An object's body re-cut into chunks of at most [`CHUNK_BYTES`], failing
/// when it is not `size` bytes long.
fn sized(
    body: BoxStream<'static, object_store::Result<Bytes>>,
    size: u64,
) -> BoxStream<'static, Result<Vec<u8>, Error>> {
    stream::try_unfold((body, Bytes::new(), 0u64), move |(mut body, mut pending, mut seen)| async move {
        while pending.is_empty() {
            match body.next().await {
                Some(part) => {
                    pending = part.map_err(objects_error)?;
                    seen += pending.len() as u64;
                    if seen > size {
                        return Err(Error::Internal(format!("stored object holds more than its {size} bytes")));
                    }
                }
                None if seen == size => return Ok(None),
                None => return Err(Error::Internal(format!("stored object ended at byte {seen} of {size}"))),
            }
        }
        let chunk = pending.split_to(CHUNK_BYTES.min(pending.len()));
        Ok(Some((chunk.to_vec(), (body, pending, seen))))
    })
    .boxed()
}

fn objects_error(e: object_store::Error) -> Error {
    StoreError::Objects(e.to_string()).into()
}

/// The `total` bytes of a blob as chunks of [`CHUNK_BYTES`], reading
/// windows with `read(offset, len)`.
pub fn chunks<F, Fut>(total: u64, read: F) -> impl Stream<Item = Result<Vec<u8>, Error>> + Send + 'static
where
    F: FnMut(u64, u64) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Vec<u8>, Error>> + Send,
{
    stream::try_unfold((0u64, read), move |(offset, mut read)| async move {
        if offset >= total {
            return Ok(None);
        }
        let len = WINDOW_BYTES.min(total - offset);
        let window = read(offset, len).await?;
        if window.is_empty() {
            return Err(Error::Internal(format!("blob ended at byte {offset} of {total}")));
        }
        let next = offset + window.len() as u64;
        Ok(Some((window, (next, read))))
    })
    .map_ok(|window| stream::iter(window.chunks(CHUNK_BYTES).map(|c| Ok(c.to_vec())).collect::<Vec<_>>()))
    .try_flatten()
    .boxed()
}

/// Where a [`BlobWriter`]'s bytes go.
enum Sink {
    /// Chunk rows of [`store::CHUNK_BYTES`], numbered from 0. `unwritten`:
    /// the blob whose row is inserted with the first chunk stored.
    Database { pending: Vec<u8>, next_seq: u32, unwritten: Option<uuid::Uuid> },
    /// One object, written in parts; the upload starts with the first byte.
    Object { backend: ObjectBackend, upload: Option<WriteMultipart> },
}

/// A file being received: its bytes go to the database a chunk of
/// [`store::CHUNK_BYTES`] at a time, or to an object store a part at a
/// time, hashed on the way, so an upload holds at most a few parts in
/// memory whatever size its sender announces. An upload dropped before
/// [`BlobWriter::finish`] is removed, row and bytes.
pub struct BlobWriter {
    store: Store,
    target: ChunkTarget,
    sink: Sink,
    /// Largest accepted size, and the field a larger upload is refused under.
    limit: u64,
    field: &'static str,
    received: u64,
    hasher: Sha256,
    finished: bool,
}

/// What a finished [`BlobWriter`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub size: u64,
    pub sha256: String,
}

impl BlobWriter {
    /// Writes into `target` in the coordinator's blob store (where the
    /// target's row says its bytes are), refusing more than `limit` bytes
    /// under `field`.
    pub fn new(store: Store, target: ChunkTarget, limit: u64, field: &'static str) -> Self {
        let to = store.blob_store().clone();
        Self::to(store, &to, target, limit, field)
    }

    /// Writes into `target` in the store `to`.
    pub fn to(store: Store, to: &BlobStore, target: ChunkTarget, limit: u64, field: &'static str) -> Self {
        let sink = match to {
            BlobStore::Database => Sink::Database { pending: Vec::new(), next_seq: 0, unwritten: None },
            BlobStore::Objects(backend) => Sink::Object { backend: backend.clone(), upload: None },
        };
        Self { store, target, sink, limit, field, received: 0, hasher: Sha256::new(), finished: false }
    }

    /// Whether a blob of `size` bytes from [`Self::new_blob`] stays whole in
    /// memory until [`Self::finish_small`]: less than one chunk, in the database.
    pub fn stays_in_memory(store: &Store, size: u64) -> bool {
        matches!(store.blob_store(), BlobStore::Database) && size < store::CHUNK_BYTES as u64
    }

    /// Writes a new blob in the coordinator's blob store. In the database,
    /// its row is inserted only with its first full chunk: a file smaller
    /// than one chunk comes back whole from [`Self::finish_small`], for the
    /// transaction that links it to write it in. In an object store, the row
    /// is inserted now, so that the object of an upload cut off is found and
    /// collected. Returns the writer and the blob's id.
    pub async fn new_blob(store: Store, limit: u64, field: &'static str) -> Result<(Self, uuid::Uuid), Error> {
        Ok(match store.blob_store() {
            BlobStore::Database => {
                let blob = uuid::Uuid::new_v4();
                let mut writer = Self::new(store, ChunkTarget::Blob(blob), limit, field);
                writer.sink = Sink::Database { pending: Vec::new(), next_seq: 0, unwritten: Some(blob) };
                (writer, blob)
            }
            BlobStore::Objects(_) => {
                let blob = store.begin_blob().await?;
                (Self::new(store, ChunkTarget::Blob(blob), limit, field), blob)
            }
        })
    }

    /// Where the chunks go.
    pub fn target(&self) -> ChunkTarget {
        self.target
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Adds the next bytes, storing every full chunk or part.
    pub async fn push(&mut self, mut data: &[u8]) -> Result<(), Error> {
        if self.received.saturating_add(data.len() as u64) > self.limit {
            return Err(Error::invalid(
                self.field,
                format!("more than {} bytes arrived; the upload may be at most that large", self.limit),
            ));
        }
        self.received += data.len() as u64;
        self.hasher.update(data);
        match &mut self.sink {
            Sink::Database { pending, next_seq, unwritten } => {
                while !data.is_empty() {
                    if pending.capacity() == 0 {
                        pending.reserve_exact(store::CHUNK_BYTES);
                    }
                    let take = (store::CHUNK_BYTES - pending.len()).min(data.len());
                    pending.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if pending.len() == store::CHUNK_BYTES {
                        write_row(&self.store, unwritten).await?;
                        self.store.put_chunk(self.target, *next_seq, pending).await?;
                        *next_seq += 1;
                        pending.clear();
                    }
                }
            }
            Sink::Object { backend, upload } => {
                let upload = match upload {
                    Some(upload) => upload,
                    None => {
                        let started = backend
                            .objects()
                            .put_multipart(&ObjectBackend::path(self.target))
                            .await
                            .map_err(objects_error)?;
                        upload.insert(WriteMultipart::new_with_chunk_size(started, PART_BYTES))
                    }
                };
                upload.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(objects_error)?;
                upload.write(data);
            }
        }
        Ok(())
    }

    /// Stores the last chunk (or completes the object) and returns the size
    /// and sha256 of all bytes, and a guard that removes the target's row
    /// unless the caller linked it first (see [`Unlinked`]).
    pub async fn finish(mut self) -> Result<(Written, Unlinked), Error> {
        match &mut self.sink {
            Sink::Database { pending, next_seq, unwritten } => {
                write_row(&self.store, unwritten).await?;
                if !pending.is_empty() {
                    self.store.put_chunk(self.target, *next_seq, pending).await?;
                }
            }
            Sink::Object { backend, upload } => {
                let path = ObjectBackend::path(self.target);
                match upload.take() {
                    Some(upload) => upload.finish().await.map_err(objects_error)?,
                    None => backend.objects().put(&path, Bytes::new().into()).await.map_err(objects_error)?,
                };
            }
        }
        self.finished = true;
        let sha256 = hex::encode(std::mem::take(&mut self.hasher).finalize());
        let unlinked = Unlinked { store: self.store.clone(), target: self.target, armed: true };
        Ok((Written { size: self.received, sha256 }, unlinked))
    }

    /// As [`Self::finish`], but a blob of [`Self::new_blob`] still held
    /// whole in memory (less than one chunk, none stored yet) is not written:
    /// its bytes come back for the statement that links it to write
    /// ([`Received::Small`]).
    pub async fn finish_small(mut self) -> Result<Received, Error> {
        if let Sink::Database { pending, unwritten: Some(_), .. } = &mut self.sink {
            if !pending.is_empty() {
                self.finished = true;
                let data = std::mem::take(pending);
                let sha256 = hex::encode(std::mem::take(&mut self.hasher).finalize());
                return Ok(Received::Small { data, written: Written { size: self.received, sha256 } });
            }
        }
        let (written, unlinked) = self.finish().await?;
        Ok(Received::Stored(written, unlinked))
    }

    /// Drops what was written without touching the target's row: a move
    /// between stores that did not complete.
    pub(crate) async fn discard(mut self) -> Result<(), Error> {
        self.finished = true;
        match &mut self.sink {
            Sink::Database { .. } => Ok(self.store.drop_chunks(self.target).await?),
            Sink::Object { upload, .. } => match upload.take() {
                Some(upload) => upload.abort().await.map_err(objects_error),
                None => Ok(()),
            },
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let upload = match &mut self.sink {
            Sink::Object { upload, .. } => upload.take(),
            Sink::Database { unwritten: Some(_), .. } => return,
            Sink::Database { .. } => None,
        };
        let (store, target) = (self.store.clone(), self.target);
        tokio::spawn(async move {
            if let Some(upload) = upload {
                if let Err(e) = upload.abort().await {
                    warn!(?target, error = %e, "cannot abort an unfinished object upload; the store's lifecycle rules remove its parts");
                }
            }
            if let Err(e) = store.abandon_upload(target).await {
                warn!(?target, error = %e, "cannot remove an unfinished upload; the reaper collects it later");
            }
        });
    }
}

/// Inserts the row of a new blob before its first chunk is stored.
async fn write_row(store: &Store, unwritten: &mut Option<uuid::Uuid>) -> Result<(), Error> {
    if let Some(blob) = *unwritten {
        store.begin_blob_as(blob).await?;
        *unwritten = None;
    }
    Ok(())
}

/// What a finished [`BlobWriter::finish_small`] received.
pub enum Received {
    /// Stored as it arrived; the row is linked by the caller.
    Stored(Written, Unlinked),
    /// Held in memory: nothing is stored.
    Small { data: Vec<u8>, written: Written },
}

/// A written file between [`BlobWriter::finish`] and the statement that
/// links its row. Dropped, it removes the row if still unlinked (a no-op
/// once linked), so a call cancelled in between (its client went away)
/// leaves neither a row nor, after the next collection, an object.
#[must_use = "dropping it at once removes the unlinked row"]
pub struct Unlinked {
    store: Store,
    target: ChunkTarget,
    armed: bool,
}

impl Unlinked {
    /// For a file whose row was already complete (a move between stores):
    /// nothing to remove.
    pub(crate) fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for Unlinked {
    fn drop(&mut self) {
        if self.armed {
            let (store, target) = (self.store.clone(), self.target);
            tokio::spawn(async move {
                if let Err(e) = store.abandon_upload(target).await {
                    warn!(?target, error = %e, "cannot remove an unlinked upload; the reaper collects it later");
                }
            });
        }
    }
}

/// How long after its row went an object is deleted.
pub const DROPPED_OBJECT_GRACE: Duration = Duration::from_secs(60);

/// What one [`collect_files`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub checkpoints: u64,
    pub blobs: u64,
    pub objects: u64,
}

/// Removes checkpoints of finished jobs, blobs nothing links and uploads
/// abandoned for `abandoned_after`, then deletes the objects of rows that
/// went at least `grace` ago.
pub async fn collect_files(store: &Store, abandoned_after: Duration, grace: Duration) -> Result<Collected, Error> {
    let checkpoints = store.collect_checkpoints(abandoned_after, 1000).await?;
    let blobs = store.collect_blobs(abandoned_after, 1000).await?;
    let objects = collect_dropped_objects(store, grace, 1000).await?;
    Ok(Collected { checkpoints, blobs, objects })
}

/// Deletes the objects whose rows went at least `grace` ago (the grace lets
/// a download that looked the row up just before finish), then forgets
/// them. Returns how many were deleted; an object already gone counts.
pub async fn collect_dropped_objects(store: &Store, grace: Duration, limit: u32) -> Result<u64, Error> {
    let dropped = store.dropped_objects(grace, limit).await?;
    let mut done = Vec::with_capacity(dropped.len());
    for (id, location, key) in dropped {
        let backend = match store.objects_at(&location) {
            Ok(backend) => backend,
            Err(e) => {
                warn!(%location, error = %e, "cannot open the store of a dropped object; retrying later");
                continue;
            }
        };
        match backend.objects().delete(&object_store::path::Path::from(key.as_str())).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => done.push(id),
            Err(e) => warn!(%location, %key, error = %e, "cannot delete a dropped object; retrying later"),
        }
    }
    store.forget_dropped_objects(&done).await?;
    if !done.is_empty() {
        debug!(objects = done.len(), "deleted objects no row references");
    }
    Ok(done.len() as u64)
}

impl Written {
    /// Checks the written bytes against the size and sha256 their header
    /// announced; refusals name `{prefix}size` and `{prefix}sha256`.
    pub fn matches(&self, size: u64, sha256: &str, prefix: &str) -> Result<(), Error> {
        let field = |name: &str| if prefix.is_empty() { name.to_string() } else { format!("{prefix}_{name}") };
        if self.size != size {
            return Err(Error::invalid(
                field("size"),
                format!("announced {size} bytes but {} arrived; upload the whole archive again", self.size),
            ));
        }
        if self.sha256 != sha256 {
            return Err(Error::invalid(
                field("sha256"),
                format!("the received bytes hash to {}, not {sha256}; upload the archive again", self.sha256),
            ));
        }
        Ok(())
    }
}

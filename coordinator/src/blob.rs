//! Files in the database (datasets, adapters, checkpoints) written and
//! streamed in chunks, so that neither an upload nor a download holds a
//! whole file in memory.

use std::future::Future;

use futures::stream::{self, Stream, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::error::Error;
use crate::store::{self, ChunkTarget, Store};

/// Bytes per streamed chunk.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Bytes read from the database per query.
const WINDOW_BYTES: u64 = store::CHUNK_BYTES as u64;

/// The `size` bytes of stored blob `blob` as chunks of [`CHUNK_BYTES`].
pub fn read(store: Store, blob: uuid::Uuid, size: u64) -> impl Stream<Item = Result<Vec<u8>, Error>> + Send + 'static {
    chunks(size, move |offset, len| {
        let store = store.clone();
        async move { Ok(store.blob_window(blob, offset, len).await?) }
    })
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

/// A file being received: its bytes go to the database a chunk of
/// [`store::CHUNK_BYTES`] at a time, hashed on the way, so an upload holds at
/// most one chunk in memory whatever size its sender announces. An upload
/// dropped before [`BlobWriter::finish`] is removed.
pub struct BlobWriter {
    store: Store,
    target: ChunkTarget,
    /// Largest accepted size, and the field a larger upload is refused under.
    limit: u64,
    field: &'static str,
    pending: Vec<u8>,
    received: u64,
    next_seq: u32,
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
    /// Writes into `target`, refusing more than `limit` bytes under `field`.
    pub fn new(store: Store, target: ChunkTarget, limit: u64, field: &'static str) -> Self {
        Self {
            store,
            target,
            limit,
            field,
            pending: Vec::new(),
            received: 0,
            next_seq: 0,
            hasher: Sha256::new(),
            finished: false,
        }
    }

    /// Where the chunks go.
    pub fn target(&self) -> ChunkTarget {
        self.target
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Adds the next bytes, storing every full chunk.
    pub async fn push(&mut self, mut data: &[u8]) -> Result<(), Error> {
        if self.received.saturating_add(data.len() as u64) > self.limit {
            return Err(Error::invalid(
                self.field,
                format!("more than {} bytes arrived; the upload may be at most that large", self.limit),
            ));
        }
        self.received += data.len() as u64;
        self.hasher.update(data);
        while !data.is_empty() {
            if self.pending.capacity() == 0 {
                self.pending.reserve_exact(store::CHUNK_BYTES);
            }
            let take = (store::CHUNK_BYTES - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == store::CHUNK_BYTES {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Error> {
        if !self.pending.is_empty() {
            self.store.put_chunk(self.target, self.next_seq, &self.pending).await?;
            self.next_seq += 1;
            self.pending.clear();
        }
        Ok(())
    }

    /// Stores the last chunk and returns the size and sha256 of all bytes.
    /// The caller links the target; until then a reaper may collect it.
    pub async fn finish(mut self) -> Result<Written, Error> {
        self.flush().await?;
        self.finished = true;
        let sha256 = hex::encode(std::mem::take(&mut self.hasher).finalize());
        Ok(Written { size: self.received, sha256 })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.finished {
            let (store, target) = (self.store.clone(), self.target);
            tokio::spawn(async move {
                if let Err(e) = store.abandon_upload(target).await {
                    warn!(?target, error = %e, "cannot remove an unfinished upload; the reaper collects it later");
                }
            });
        }
    }
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

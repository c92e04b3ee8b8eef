//! Streaming stored blobs (datasets, adapters) in chunks, reading the
//! database a window at a time instead of loading whole files.

use std::future::Future;

use futures::stream::{self, Stream, StreamExt, TryStreamExt};

use crate::error::Error;

/// Bytes per streamed chunk.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Bytes read from the database per query.
const WINDOW_BYTES: u64 = 1024 * 1024;

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

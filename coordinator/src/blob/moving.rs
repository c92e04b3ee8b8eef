//! Moving every file to another store (`ptune-coordinator blobs move --to`).
//!
//! Each complete blob and checkpoint that lives elsewhere is copied, the
//! copy checked against the size and sha256 its row records, and the row
//! switched to the new location in one transaction that also drops its old
//! chunk rows (an old object is queued for deletion by migration 0012's
//! trigger). A file deleted or moved meanwhile keeps its row and the copy
//! is discarded, so coordinators may keep serving during a move; a move
//! that stops half-way is finished by running it again. Uploads still in
//! flight finish in the old store and move on the next run.

use futures::StreamExt;
use object_store::ObjectStoreExt;
use tracing::info;

use super::{read, BlobWriter};
use crate::error::Error;
use crate::store::{BlobStore, ChunkTarget, FileRef, ObjectBackend, Store, StoredFile};

/// Files considered per database read.
const BATCH: u32 = 100;

/// What a move did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MoveReport {
    /// Files now in the target store.
    pub moved: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Files deleted or moved by someone else while being copied.
    pub skipped: u64,
}

/// Moves every complete file that is not in `to` into it.
pub async fn move_files(store: &Store, to: &BlobStore) -> Result<MoveReport, Error> {
    let mut report = MoveReport::default();
    for checkpoints in [false, true] {
        let mut after = uuid::Uuid::nil();
        loop {
            let batch = store.files_elsewhere(checkpoints, to.location(), after, BATCH).await?;
            let Some(last) = batch.last() else { break };
            after = last.id();
            for file in batch {
                if move_one(store, to, &file).await? {
                    report.moved += 1;
                    report.bytes += file.size;
                } else {
                    report.skipped += 1;
                }
            }
            info!(moved = report.moved, bytes = report.bytes, skipped = report.skipped, "moving files");
        }
    }
    Ok(report)
}

/// Copies one file into `to` and switches its row; false when the row went
/// or moved meanwhile.
async fn move_one(store: &Store, to: &BlobStore, file: &StoredFile) -> Result<bool, Error> {
    let target = file.target;
    if matches!(to, BlobStore::Database) {
        // Chunk rows a stopped move left behind.
        store.drop_chunks(target).await?;
    }
    let mut writer = BlobWriter::to(store.clone(), to, target, u64::MAX, "size");
    let mut chunks = read(store.clone(), FileRef { target, location: file.location.clone() }, file.size);
    while let Some(chunk) = chunks.next().await {
        let pushed = match chunk {
            Ok(chunk) => writer.push(&chunk).await,
            Err(e) => Err(e),
        };
        if let Err(e) = pushed {
            writer.discard().await?;
            return Err(e);
        }
    }
    let (written, unlinked) = writer.finish().await?;
    unlinked.keep();
    if written.size != file.size || written.sha256 != file.sha256 {
        discard_copy(store, to, target).await?;
        return Err(Error::Internal(format!(
            "{target:?}: the copy holds {} bytes hashing to {}, but the row records {} bytes hashing to {}; \
             the file was left where it was",
            written.size, written.sha256, file.size, file.sha256
        )));
    }
    let switched = store.switch_location(target, file.location.as_deref(), to.location()).await?;
    if !switched {
        discard_copy(store, to, target).await?;
    }
    Ok(switched)
}

/// Removes a finished copy whose row did not switch to it.
async fn discard_copy(store: &Store, to: &BlobStore, target: ChunkTarget) -> Result<(), Error> {
    match to {
        BlobStore::Database => Ok(store.drop_chunks(target).await?),
        BlobStore::Objects(backend) => match backend.objects().delete(&ObjectBackend::path(target)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(super::objects_error(e)),
        },
    }
}

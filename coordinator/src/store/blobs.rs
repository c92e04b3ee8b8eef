//! Files stored as numbered chunks: dataset and adapter blobs, and
//! checkpoint archives. Every chunk but the last holds exactly
//! [`CHUNK_BYTES`], so a byte offset names its chunk.

use std::time::Duration;

use ptune_core::JobId;
use sqlx::PgConnection;
use tracing::instrument;
use uuid::Uuid;

use super::{millis, to_i64, to_u64, FileRef, Result, Store};
use crate::model::DatasetRef;

/// Bytes per stored chunk (the last chunk of a file may be shorter).
pub const CHUNK_BYTES: usize = 1 << 20;

/// Where a file's chunks are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkTarget {
    /// A dataset or adapter blob.
    Blob(Uuid),
    /// A job's resume checkpoint.
    Checkpoint(Uuid),
}

/// A complete file and what its row records about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredFile {
    pub target: ChunkTarget,
    /// `None`: the chunk tables.
    pub location: Option<String>,
    pub size: u64,
    pub sha256: String,
}

impl StoredFile {
    pub fn id(&self) -> Uuid {
        match self.target {
            ChunkTarget::Blob(id) | ChunkTarget::Checkpoint(id) => id,
        }
    }
}

impl Store {
    /// Starts a blob; it stays invisible until linked with [`link_blob`].
    /// Its bytes go to the configured blob store, which the row records.
    pub async fn begin_blob(&self) -> Result<Uuid> {
        let id = Uuid::new_v4();
        self.begin_blob_as(id).await?;
        Ok(id)
    }

    /// As [`Self::begin_blob`], for the blob `id`.
    pub async fn begin_blob_as(&self, id: Uuid) -> Result<()> {
        sqlx::query("INSERT INTO blobs (id, location) VALUES ($1, $2)")
            .bind(id)
            .bind(self.blob_store().location())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Stores chunk `seq` of a file being written.
    pub async fn put_chunk(&self, target: ChunkTarget, seq: u32, data: &[u8]) -> Result<()> {
        let seq = i32::try_from(seq).unwrap_or(i32::MAX);
        let query = match target {
            ChunkTarget::Blob(id) => sqlx::query(
                "WITH touched AS (UPDATE blobs SET touched_at = now() WHERE id = $1) \
                 INSERT INTO blob_chunks (blob_id, seq, data) VALUES ($1, $2, $3)",
            )
            .bind(id),
            ChunkTarget::Checkpoint(id) => {
                sqlx::query("INSERT INTO job_checkpoint_chunks (checkpoint_id, seq, data) VALUES ($1, $2, $3)").bind(id)
            }
        };
        query.bind(seq).bind(data).execute(&self.pool).await?;
        Ok(())
    }

    /// Forgets a file whose upload did not finish.
    pub async fn abandon_upload(&self, target: ChunkTarget) -> Result<()> {
        let query = match target {
            ChunkTarget::Blob(id) => sqlx::query("DELETE FROM blobs WHERE id = $1 AND NOT complete").bind(id),
            ChunkTarget::Checkpoint(id) => {
                sqlx::query("DELETE FROM job_checkpoints WHERE id = $1 AND NOT complete").bind(id)
            }
        };
        query.execute(&self.pool).await?;
        Ok(())
    }

    /// The blob holding a dataset's bytes.
    pub async fn dataset_blob(&self, reference: &DatasetRef) -> Result<Option<FileRef>> {
        let row: Option<(Uuid, Option<String>)> = sqlx::query_as(
            "SELECT b.id, b.location FROM datasets d JOIN blobs b ON b.id = d.blob_id WHERE d.sha256 = $1",
        )
        .bind(reference.sha256())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id, location)| FileRef::blob(id, location)))
    }

    /// The blob holding a job's adapter archive.
    pub async fn adapter_blob(&self, job: JobId) -> Result<Option<FileRef>> {
        let row: Option<(Uuid, Option<String>)> = sqlx::query_as(
            "SELECT b.id, b.location FROM adapters a JOIN blobs b ON b.id = a.blob_id WHERE a.job_id = $1",
        )
        .bind(job.0)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id, location)| FileRef::blob(id, location)))
    }

    /// Up to `len` bytes of a file kept in chunk rows, from `offset` (fewer
    /// at its end).
    #[instrument(skip_all, fields(target = ?target, offset, len))]
    pub async fn file_window(&self, target: ChunkTarget, offset: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let chunk = CHUNK_BYTES as u64;
        let (first, last) = (offset / chunk, (offset + len - 1) / chunk);
        let (sql, id) = match target {
            ChunkTarget::Blob(id) => {
                ("SELECT data FROM blob_chunks WHERE blob_id = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq", id)
            }
            ChunkTarget::Checkpoint(id) => (
                "SELECT data FROM job_checkpoint_chunks WHERE checkpoint_id = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq",
                id,
            ),
        };
        let chunks: Vec<Vec<u8>> = sqlx::query_scalar(sql)
        .bind(id)
        .bind(i32::try_from(first).unwrap_or(i32::MAX))
        .bind(i32::try_from(last).unwrap_or(i32::MAX))
        .fetch_all(&self.pool)
        .await?;
        let skip = usize::try_from(offset - first * chunk).unwrap_or(usize::MAX);
        let take = usize::try_from(len).unwrap_or(usize::MAX);
        let mut window: Vec<u8> = match chunks.len() {
            1 => chunks.into_iter().next().unwrap_or_default(),
            _ => chunks.concat(),
        };
        window.drain(..skip.min(window.len()));
        window.truncate(take);
        Ok(window)
    }

    /// Removes the chunk rows of a file whose bytes live elsewhere (what
    /// a move into the database wrote before it gave up).
    pub async fn drop_chunks(&self, target: ChunkTarget) -> Result<()> {
        let query = match target {
            ChunkTarget::Blob(id) => sqlx::query("DELETE FROM blob_chunks WHERE blob_id = $1").bind(id),
            ChunkTarget::Checkpoint(id) => {
                sqlx::query("DELETE FROM job_checkpoint_chunks WHERE checkpoint_id = $1").bind(id)
            }
        };
        query.execute(&self.pool).await?;
        Ok(())
    }

    /// Up to `limit` complete blobs (or checkpoints) not at `location`, in
    /// id order after `after`.
    pub async fn files_elsewhere(
        &self,
        checkpoints: bool,
        location: Option<&str>,
        after: Uuid,
        limit: u32,
    ) -> Result<Vec<StoredFile>> {
        let sql = if checkpoints {
            "SELECT id, location, size, sha256 FROM job_checkpoints \
             WHERE complete AND location IS DISTINCT FROM $1 AND id > $2 ORDER BY id LIMIT $3"
        } else {
            // A blob linked before sizes were recorded has none; nothing
            // links it any more (migration 0012 filled in the rest).
            "SELECT id, location, size, sha256 FROM blobs \
             WHERE complete AND size IS NOT NULL AND location IS DISTINCT FROM $1 AND id > $2 ORDER BY id LIMIT $3"
        };
        let rows: Vec<(Uuid, Option<String>, i64, String)> =
            sqlx::query_as(sql).bind(location).bind(after).bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.into_iter()
            .map(|(id, location, size, sha256)| {
                let target = if checkpoints { ChunkTarget::Checkpoint(id) } else { ChunkTarget::Blob(id) };
                Ok(StoredFile { target, location, size: to_u64(size, "file size")?, sha256 })
            })
            .collect()
    }

    /// Records that a file's bytes are now at `to`, if its row still says
    /// `from`; drops its chunk rows when they held it. False when the row
    /// went or moved meanwhile.
    pub async fn switch_location(&self, target: ChunkTarget, from: Option<&str>, to: Option<&str>) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let (update, id) = match target {
            ChunkTarget::Blob(id) => {
                ("UPDATE blobs SET location = $3 WHERE id = $1 AND location IS NOT DISTINCT FROM $2", id)
            }
            ChunkTarget::Checkpoint(id) => {
                ("UPDATE job_checkpoints SET location = $3 WHERE id = $1 AND location IS NOT DISTINCT FROM $2", id)
            }
        };
        let switched = sqlx::query(update).bind(id).bind(from).bind(to).execute(&mut *tx).await?.rows_affected() == 1;
        if switched && from.is_none() {
            let chunks = match target {
                ChunkTarget::Blob(_) => "DELETE FROM blob_chunks WHERE blob_id = $1",
                ChunkTarget::Checkpoint(_) => "DELETE FROM job_checkpoint_chunks WHERE checkpoint_id = $1",
            };
            sqlx::query(chunks).bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(switched)
    }

    /// Objects whose row went at least `grace` ago: (entry, location, key).
    pub async fn dropped_objects(&self, grace: Duration, limit: u32) -> Result<Vec<(i64, String, String)>> {
        Ok(sqlx::query_as(
            "SELECT id, location, key FROM dropped_objects \
             WHERE dropped_at <= now() - $1 * interval '1 millisecond' ORDER BY id LIMIT $2",
        )
        .bind(millis(grace))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Forgets dropped objects that were deleted from their store.
    pub async fn forget_dropped_objects(&self, entries: &[i64]) -> Result<()> {
        if !entries.is_empty() {
            sqlx::query("DELETE FROM dropped_objects WHERE id = ANY($1)").bind(entries).execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Removes blobs nothing can read: uploads untouched for
    /// `abandoned_after` and complete blobs whose dataset or adapter is
    /// gone. Returns how many went.
    #[instrument(skip_all)]
    pub async fn collect_blobs(&self, abandoned_after: Duration, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM blobs WHERE id IN ( \
                 SELECT b.id FROM blobs b \
                 WHERE (NOT b.complete AND b.touched_at < now() - $1 * interval '1 millisecond') \
                    OR (b.complete \
                        AND NOT EXISTS (SELECT 1 FROM datasets d WHERE d.blob_id = b.id) \
                        AND NOT EXISTS (SELECT 1 FROM adapters a WHERE a.blob_id = b.id)) \
                 LIMIT $2)",
        )
        .bind(millis(abandoned_after))
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

/// Marks a fully written blob of `size` bytes hashing to `sha256`
/// complete, in the transaction that links it.
pub(super) async fn link_blob(db: &mut PgConnection, blob: Uuid, size: u64, sha256: &str) -> Result<()> {
    sqlx::query("UPDATE blobs SET complete = true, touched_at = now(), size = $2, sha256 = $3 WHERE id = $1")
        .bind(blob)
        .bind(to_i64(size))
        .bind(sha256)
        .execute(db)
        .await?;
    Ok(())
}

/// Drops a blob the transaction decided not to link.
pub(super) async fn drop_blob(db: &mut PgConnection, blob: Uuid) -> Result<()> {
    sqlx::query("DELETE FROM blobs WHERE id = $1 AND NOT complete").bind(blob).execute(db).await?;
    Ok(())
}


//! Files stored as numbered chunks: dataset and adapter blobs, and
//! checkpoint archives. Every chunk but the last holds exactly
//! [`CHUNK_BYTES`], so a byte offset names its chunk.

use std::time::Duration;

use ptune_core::JobId;
use sqlx::PgConnection;
use tracing::instrument;
use uuid::Uuid;

use super::{millis, Result, Store};
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

impl Store {
    /// Starts a blob; it stays invisible until linked with [`link_blob`].
    pub async fn begin_blob(&self) -> Result<Uuid> {
        let id = Uuid::new_v4();
        sqlx::query("INSERT INTO blobs (id) VALUES ($1)").bind(id).execute(&self.pool).await?;
        Ok(id)
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
    pub async fn dataset_blob(&self, reference: &DatasetRef) -> Result<Option<Uuid>> {
        Ok(sqlx::query_scalar("SELECT blob_id FROM datasets WHERE sha256 = $1")
            .bind(reference.sha256())
            .fetch_optional(&self.pool)
            .await?)
    }

    /// The blob holding a job's adapter archive.
    pub async fn adapter_blob(&self, job: JobId) -> Result<Option<Uuid>> {
        Ok(sqlx::query_scalar("SELECT blob_id FROM adapters WHERE job_id = $1")
            .bind(job.0)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Up to `len` bytes of a blob from `offset` (fewer at its end).
    #[instrument(skip_all, fields(blob = %blob, offset, len))]
    pub async fn blob_window(&self, blob: Uuid, offset: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let chunk = CHUNK_BYTES as u64;
        let (first, last) = (offset / chunk, (offset + len - 1) / chunk);
        let chunks: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT data FROM blob_chunks WHERE blob_id = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq",
        )
        .bind(blob)
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

/// Marks a fully written blob complete, in the transaction that links it.
pub(super) async fn link_blob(db: &mut PgConnection, blob: Uuid) -> Result<()> {
    sqlx::query("UPDATE blobs SET complete = true, touched_at = now() WHERE id = $1").bind(blob).execute(db).await?;
    Ok(())
}

/// Drops a blob the transaction decided not to link.
pub(super) async fn drop_blob(db: &mut PgConnection, blob: Uuid) -> Result<()> {
    sqlx::query("DELETE FROM blobs WHERE id = $1 AND NOT complete").bind(blob).execute(db).await?;
    Ok(())
}


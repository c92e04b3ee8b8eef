//! Resume checkpoints of jobs, stored as chunks so that neither an upload
//! nor a download holds one whole in memory.
//!
//! An upload inserts an incomplete row, then its chunks one by one as they
//! arrive (each in its own statement, no transaction held open across the
//! stream), then in one transaction fenced by the lease marks it complete
//! and deletes the job's older checkpoints. Readers only ever see complete
//! checkpoints; an upload cut off mid-way leaves an incomplete row that
//! [`Store::collect_checkpoints`] removes.

use std::time::Duration;

use ptune_core::JobId;
use sqlx::PgExecutor;
use tracing::instrument;
use uuid::Uuid;

use super::jobs::DbJobState;
use super::fencing::{read_leased, Fenced};
use super::{millis, to_i64, to_u64, ChunkTarget, FileRef, Result, Store};
use crate::model::{CheckpointInfo, CheckpointUpload, LeaseRef};

/// The job's newest complete checkpoint.
pub(super) async fn latest_checkpoint<'e>(db: impl PgExecutor<'e>, job: JobId) -> Result<Option<CheckpointInfo>> {
    let row: Option<(i64, String, i64)> = sqlx::query_as(
        "SELECT step, sha256, size FROM job_checkpoints WHERE job_id = $1 AND complete ORDER BY step DESC LIMIT 1",
    )
    .bind(job.0)
    .fetch_optional(db)
    .await?;
    row.map(|(step, sha256, size)| checkpoint_info(step, sha256, size)).transpose()
}

/// A checkpoint's record from its row's step, sha256 and size.
pub(super) fn checkpoint_info(step: i64, sha256: String, size: i64) -> Result<CheckpointInfo> {
    Ok(CheckpointInfo { step: to_u64(step, "checkpoint step")?, sha256, size: to_u64(size, "checkpoint size")? })
}

/// What finishing an upload did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointStored {
    /// It is now the job's checkpoint.
    Stored,
    /// The job already has a checkpoint of as many or more steps; this one was dropped.
    Older,
}

impl Store {
    /// Whether `lease` holds its job now (running under that epoch, with its token).
    async fn lease_holds(db: &sqlx::PgPool, lease: LeaseRef) -> Result<Fenced<()>> {
        Self::lease_holds_in(&mut *db.acquire().await?, lease).await
    }

    async fn lease_holds_in(db: &mut sqlx::PgConnection, lease: LeaseRef) -> Result<Fenced<()>> {
        Ok(match read_leased(db, lease, false).await?.valid() {
            Ok((DbJobState::Running, epoch, _)) if epoch == to_i64(lease.epoch) => Fenced::Valid(()),
            Ok((state, epoch, _)) => Fenced::Stale { state: state.into(), epoch: to_u64(epoch, "lease_epoch")? },
            Err(refused) => refused,
        })
    }

    /// Starts storing a checkpoint of a running lease; returns the id its
    /// chunks go under.
    #[instrument(skip_all, fields(job_id = %upload.lease.job_id, epoch = upload.lease.epoch, step = upload.info.step))]
    pub async fn begin_checkpoint(&self, upload: &CheckpointUpload) -> Result<Fenced<Uuid>> {
        if let fenced @ (Fenced::NotFound | Fenced::Stale { .. } | Fenced::Forbidden) =
            Self::lease_holds(&self.pool, upload.lease).await?
        {
            return Ok(fenced.map(|()| Uuid::nil()));
        }
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO job_checkpoints (id, job_id, epoch, step, sha256, size, location) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(upload.lease.job_id.0)
        .bind(to_i64(upload.lease.epoch))
        .bind(to_i64(upload.info.step))
        .bind(&upload.info.sha256)
        .bind(to_i64(upload.info.size))
        .bind(self.blob_store().location())
        .execute(&self.pool)
        .await?;
        Ok(Fenced::Valid(id))
    }

    /// Makes checkpoint `id` the job's checkpoint, if the lease still holds
    /// the job and no checkpoint of as many steps is stored; older ones go.
    #[instrument(skip_all, fields(job_id = %upload.lease.job_id, step = upload.info.step))]
    pub async fn finish_checkpoint(&self, id: Uuid, upload: &CheckpointUpload) -> Result<Fenced<CheckpointStored>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE").bind(upload.lease.job_id.0).execute(&mut *tx).await?;
        let holds = Self::lease_holds_in(&mut tx, upload.lease).await?;
        let latest = latest_checkpoint(&mut *tx, upload.lease.job_id).await?;
        let outcome = match holds {
            Fenced::Valid(()) if latest.is_some_and(|l| l.step >= upload.info.step) => {
                sqlx::query("DELETE FROM job_checkpoints WHERE id = $1").bind(id).execute(&mut *tx).await?;
                Fenced::Valid(CheckpointStored::Older)
            }
            Fenced::Valid(()) => {
                sqlx::query("UPDATE job_checkpoints SET complete = true WHERE id = $1").bind(id).execute(&mut *tx).await?;
                sqlx::query("DELETE FROM job_checkpoints WHERE job_id = $1 AND id <> $2 AND complete")
                    .bind(upload.lease.job_id.0)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                Fenced::Valid(CheckpointStored::Stored)
            }
            other => {
                sqlx::query("DELETE FROM job_checkpoints WHERE id = $1").bind(id).execute(&mut *tx).await?;
                other.map(|()| CheckpointStored::Older)
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// The checkpoint a running lease resumes from, and where its bytes
    /// are, if the job has one.
    #[instrument(skip_all, fields(job_id = %lease.job_id, epoch = lease.epoch))]
    pub async fn checkpoint_for(&self, lease: LeaseRef) -> Result<Fenced<Option<(FileRef, CheckpointInfo)>>> {
        if let fenced @ (Fenced::NotFound | Fenced::Stale { .. } | Fenced::Forbidden) =
            Self::lease_holds(&self.pool, lease).await?
        {
            return Ok(fenced.map(|()| None));
        }
        let row: Option<(Uuid, i64, String, i64, Option<String>)> = sqlx::query_as(
            "SELECT id, step, sha256, size, location FROM job_checkpoints WHERE job_id = $1 AND complete \
             ORDER BY step DESC LIMIT 1",
        )
        .bind(lease.job_id.0)
        .fetch_optional(&self.pool)
        .await?;
        let found = row
            .map(|(id, step, sha256, size, location)| {
                Ok::<_, super::StoreError>((
                    FileRef { target: ChunkTarget::Checkpoint(id), location },
                    CheckpointInfo {
                        step: to_u64(step, "checkpoint step")?,
                        sha256,
                        size: to_u64(size, "checkpoint size")?,
                    },
                ))
            })
            .transpose()?;
        Ok(Fenced::Valid(found))
    }

    /// Removes checkpoints no attempt can resume from: those of finished
    /// jobs, and uploads left incomplete for longer than `abandoned_after`.
    /// Returns how many went.
    #[instrument(skip_all)]
    pub async fn collect_checkpoints(&self, abandoned_after: Duration, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM job_checkpoints WHERE id IN ( \
                 SELECT c.id FROM job_checkpoints c JOIN jobs j ON j.id = c.job_id \
                 WHERE j.state IN ('succeeded', 'failed', 'cancelled') \
                    OR (NOT c.complete AND c.created_at < now() - $1 * interval '1 millisecond') \
                 LIMIT $2)",
        )
        .bind(millis(abandoned_after))
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

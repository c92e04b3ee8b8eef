//! Adapter archives of succeeded jobs.

use ptune_core::JobId;
use tracing::instrument;

use super::{to_i64, Result, Store};

impl Store {
    /// Up to `len` bytes of a job's adapter archive from `offset`.
    #[instrument(skip_all, fields(job_id = %job, offset))]
    pub async fn adapter_window(&self, job: JobId, offset: u64, len: u64) -> Result<Vec<u8>> {
        let bytes: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT substring(content FROM $2::int FOR $3::int) FROM adapters WHERE job_id = $1")
                .bind(job.0)
                .bind(to_i64(offset + 1))
                .bind(to_i64(len))
                .fetch_optional(&self.pool)
                .await?;
        Ok(bytes.unwrap_or_default())
    }
}

//! Datasets: content-addressed by sha256, stored once.

use tracing::instrument;

use super::{to_i64, to_u64, Result, Store};
use crate::model::{DatasetInfo, DatasetRef};

#[derive(sqlx::FromRow)]
struct DatasetRow {
    sha256: String,
    file_name: String,
    size: i64,
    lines: i64,
}

impl DatasetRow {
    fn into_info(self) -> Result<DatasetInfo> {
        Ok(DatasetInfo {
            reference: DatasetRef::from_sha256(self.sha256),
            file_name: self.file_name,
            size: to_u64(self.size, "dataset size")?,
            lines: to_u64(self.lines, "dataset lines")?,
        })
    }
}

impl Store {
    /// Stores a dataset unless the same bytes are already stored; returns
    /// the stored record either way (with the first upload's file name).
    #[instrument(skip_all, fields(dataset = %info.reference, size = info.size))]
    pub async fn insert_dataset(&self, info: &DatasetInfo, content: &[u8]) -> Result<DatasetInfo> {
        sqlx::query(
            "INSERT INTO datasets (sha256, file_name, size, lines, content) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (sha256) DO NOTHING",
        )
        .bind(info.reference.sha256())
        .bind(&info.file_name)
        .bind(to_i64(info.size))
        .bind(to_i64(info.lines))
        .bind(content)
        .execute(&self.pool)
        .await?;
        let stored = self.dataset(&info.reference).await?;
        Ok(stored.unwrap_or_else(|| info.clone()))
    }

    /// A dataset's record, or `None` if it was never uploaded.
    #[instrument(skip_all, fields(dataset = %reference))]
    pub async fn dataset(&self, reference: &DatasetRef) -> Result<Option<DatasetInfo>> {
        let row: Option<DatasetRow> =
            sqlx::query_as("SELECT sha256, file_name, size, lines FROM datasets WHERE sha256 = $1")
                .bind(reference.sha256())
                .fetch_optional(&self.pool)
                .await?;
        row.map(DatasetRow::into_info).transpose()
    }

    /// Up to `len` bytes of a dataset from `offset`.
    #[instrument(skip_all, fields(dataset = %reference, offset))]
    pub async fn dataset_window(&self, reference: &DatasetRef, offset: u64, len: u64) -> Result<Vec<u8>> {
        let bytes: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT substring(content FROM $2::int FOR $3::int) FROM datasets WHERE sha256 = $1")
                .bind(reference.sha256())
                .bind(to_i64(offset + 1))
                .bind(to_i64(len))
                .fetch_optional(&self.pool)
                .await?;
        Ok(bytes.unwrap_or_default())
    }
}

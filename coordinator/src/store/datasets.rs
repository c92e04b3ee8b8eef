//! Datasets: content-addressed by sha256, stored once.

use tracing::instrument;
use uuid::Uuid;

use super::blobs::{drop_blob, link_blob};
use super::{to_i64, to_u64, Result, Store};
use crate::jobs::DatasetFacts;
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
    /// Links a written blob as a dataset unless the same bytes are already
    /// stored (then the blob is dropped); returns the stored record either
    /// way (with the first upload's file name).
    #[instrument(skip_all, fields(dataset = %info.reference, size = info.size))]
    pub async fn insert_dataset(&self, info: &DatasetInfo, facts: &DatasetFacts, blob: Uuid) -> Result<DatasetInfo> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO datasets (sha256, file_name, size, lines, blob_id, facts) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (sha256) DO NOTHING",
        )
        .bind(info.reference.sha256())
        .bind(&info.file_name)
        .bind(to_i64(info.size))
        .bind(to_i64(info.lines))
        .bind(blob)
        .bind(sqlx::types::Json(facts))
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 1 {
            link_blob(&mut tx, blob, info.size, info.reference.sha256()).await?;
        } else {
            drop_blob(&mut tx, blob).await?;
        }
        tx.commit().await?;
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

    /// What admission needs of a dataset, gathered at its upload; `None`
    /// for datasets stored before facts were kept.
    #[instrument(skip_all, fields(dataset = %reference))]
    pub async fn dataset_facts(&self, reference: &DatasetRef) -> Result<Option<DatasetFacts>> {
        let facts: Option<Option<sqlx::types::Json<DatasetFacts>>> =
            sqlx::query_scalar("SELECT facts FROM datasets WHERE sha256 = $1")
                .bind(reference.sha256())
                .fetch_optional(&self.pool)
                .await?;
        Ok(facts.flatten().map(|json| json.0))
    }
}

//! Workers: registration, liveness and the models they serve.

use std::time::Duration;

use ptune_core::WorkerId;
use sqlx::types::Json;
use tracing::instrument;

use super::{millis, Result, Store};
use crate::model::WorkerRegistration;

impl Store {
    /// Inserts or replaces a worker's registration and marks it alive.
    #[instrument(skip_all, fields(worker_id = %id))]
    pub async fn upsert_worker(&self, id: WorkerId, reg: &WorkerRegistration) -> Result<()> {
        sqlx::query(
            "INSERT INTO workers (id, hostname, devices, slots, models) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET hostname = EXCLUDED.hostname, devices = EXCLUDED.devices, \
                 slots = EXCLUDED.slots, models = EXCLUDED.models, registered_at = now(), last_heartbeat = now()",
        )
        .bind(id.0)
        .bind(&reg.hostname)
        .bind(Json(&reg.devices))
        .bind(i32::try_from(reg.slots).unwrap_or(i32::MAX))
        .bind(Json(&reg.models))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks a worker alive; false when it is not registered.
    #[instrument(skip_all, fields(worker_id = %id))]
    pub async fn touch_worker(&self, id: WorkerId) -> Result<bool> {
        let done = sqlx::query("UPDATE workers SET last_heartbeat = now() WHERE id = $1")
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Names of the base models a worker registered, or `None` for an unknown worker.
    #[instrument(skip_all, fields(worker_id = %id))]
    pub async fn worker_models(&self, id: WorkerId) -> Result<Option<Vec<String>>> {
        let names: Option<Vec<String>> = sqlx::query_scalar(
            "SELECT coalesce(array_agg(m->>'name') FILTER (WHERE m IS NOT NULL), '{}') \
             FROM workers w LEFT JOIN LATERAL jsonb_array_elements(w.models) m ON true \
             WHERE w.id = $1 GROUP BY w.id",
        )
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?;
        Ok(names)
    }

    /// The smallest `max_positions` any worker reported for a base model, or
    /// `None` when no worker has registered it with a known limit.
    #[instrument(skip_all, fields(base_model = name))]
    pub async fn model_max_positions(&self, name: &str) -> Result<Option<u32>> {
        let value: Option<i64> = sqlx::query_scalar(
            "SELECT min((m->>'max_positions')::bigint) FROM workers w, jsonb_array_elements(w.models) m \
             WHERE m->>'name' = $1 AND (m->>'max_positions')::bigint > 0",
        )
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        Ok(value.map(|v| u32::try_from(v).unwrap_or(u32::MAX)))
    }

    /// Workers that heartbeated within `window`.
    pub async fn workers_online(&self, window: Duration) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM workers WHERE last_heartbeat > now() - $1 * interval '1 millisecond'",
        )
        .bind(millis(window))
        .fetch_one(&self.pool)
        .await?;
        super::to_u64(n, "worker count")
    }
}

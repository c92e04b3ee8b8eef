//! Workers: registration, liveness and the models they serve.

use std::collections::HashMap;
use std::time::Duration;

use ptune_core::{ModelShape, WorkerId};
use sqlx::types::Json;
use tracing::instrument;

use uuid::Uuid;

use super::{millis, to_i64, to_u64, Result, Store};

/// Who registered a worker id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerOwnership {
    Unknown,
    /// The token asking.
    Mine,
    /// Another token.
    Other,
}
use crate::model::{AdvertisedModel, Device, ModelSupport, WorkerOffer, WorkerRegistration};
use crate::placement::DeviceRoom;

/// The devices placement sees of a worker that registered `devices` and
/// `memory` bytes (0: unknown): one unnamed device of its memory when it
/// registered none; otherwise each device's memory, the CPU's capped by the
/// worker's (workers that predate placement by device registered the CPU
/// with the machine's memory and their `--memory-mib` as the worker's).
fn device_rooms(devices: &[Device], memory: u64) -> Vec<DeviceRoom> {
    let known = |bytes: u64| (bytes > 0).then_some(bytes);
    if devices.is_empty() {
        return vec![DeviceRoom { name: String::new(), memory_bytes: known(memory) }];
    }
    let room = |device: &Device| {
        let is_cpu = device.name == "cpu" || device.name.starts_with("cpu:");
        match (known(device.memory_bytes), known(memory).filter(|_| is_cpu)) {
            (Some(device), Some(worker)) => Some(device.min(worker)),
            (device, worker) => device.or(worker),
        }
    };
    devices.iter().map(|d| DeviceRoom { name: d.name.clone(), memory_bytes: room(d) }).collect()
}

/// What leasing reads of a worker's registration; cached (`cache.rs`).
#[derive(Clone, Debug)]
pub(super) struct Registration {
    /// The base models it can train.
    models: Vec<String>,
    /// Its devices as placement sees them.
    rooms: Vec<DeviceRoom>,
    /// The token that registered it.
    token_id: Option<Uuid>,
}

impl Registration {
    /// Whether `token` may speak for the worker: the one that registered
    /// it, or any when none did.
    fn ownership(&self, token: Uuid) -> WorkerOwnership {
        match self.token_id {
            Some(owner) if owner != token => WorkerOwnership::Other,
            _ => WorkerOwnership::Mine,
        }
    }
}

impl Store {
    /// Inserts or replaces a worker's registration, made with token
    /// `token`, and marks it alive. False when the worker id belongs to
    /// another token that is still live: only the token that registered a
    /// worker may speak for it.
    #[instrument(skip_all, fields(worker_id = %id))]
    pub async fn upsert_worker(&self, id: WorkerId, reg: &WorkerRegistration, token: Uuid) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO workers (id, hostname, devices, slots, models, memory_bytes, token_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (id) DO UPDATE SET hostname = EXCLUDED.hostname, devices = EXCLUDED.devices, \
                 slots = EXCLUDED.slots, models = EXCLUDED.models, memory_bytes = EXCLUDED.memory_bytes, \
                 registered_at = now(), last_heartbeat = now(), unhealthy_reason = '', token_id = EXCLUDED.token_id \
             WHERE workers.token_id IS NULL OR workers.token_id = EXCLUDED.token_id \
                OR NOT EXISTS (SELECT 1 FROM api_tokens t WHERE t.id = workers.token_id AND t.revoked_at IS NULL \
                               AND (t.expires_at IS NULL OR t.expires_at > now()))",
        )
        .bind(id.0)
        .bind(&reg.hostname)
        .bind(Json(&reg.devices))
        .bind(i32::try_from(reg.slots).unwrap_or(i32::MAX))
        .bind(Json(&reg.models))
        .bind(to_i64(reg.memory_bytes.unwrap_or(0)))
        .bind(token)
        .execute(&self.pool)
        .await?;
        // Other coordinators hear of it through migration 0017's notification.
        self.cache.forget(super::cache::CacheKind::Worker, id.0);
        Ok(done.rows_affected() == 1)
    }

    /// Whether worker `id` is registered, and by token `token`.
    pub async fn worker_token(&self, id: WorkerId, token: Uuid) -> Result<WorkerOwnership> {
        Ok(self.registration(id).await?.map_or(WorkerOwnership::Unknown, |r| r.ownership(token)))
    }

    /// Marks a worker alive and records why it takes no jobs (empty:
    /// healthy); false when it is not registered. A healthy worker's row
    /// that another transaction holds (the worker's own lease being
    /// claimed, in a group commit) is left as it is rather than waited
    /// for: the worker is alive, and its next heartbeat writes the time. A
    /// reason to take no jobs is always written.
    #[instrument(skip_all, fields(worker_id = %id))]
    pub async fn touch_worker(&self, id: WorkerId, unhealthy_reason: &str) -> Result<bool> {
        if !unhealthy_reason.is_empty() {
            let done = sqlx::query("UPDATE workers SET last_heartbeat = now(), unhealthy_reason = $2 WHERE id = $1")
                .bind(id.0)
                .bind(unhealthy_reason)
                .execute(&self.pool)
                .await?;
            return Ok(done.rows_affected() == 1);
        }
        let known = sqlx::query_scalar(
            "WITH free AS (SELECT id FROM workers WHERE id = $1 FOR NO KEY UPDATE SKIP LOCKED), \
                  touched AS (UPDATE workers w SET last_heartbeat = now(), unhealthy_reason = '' \
                              FROM free WHERE w.id = free.id) \
             SELECT EXISTS (SELECT 1 FROM workers WHERE id = $1)",
        )
        .bind(id.0)
        .fetch_one(&self.pool)
        .await?;
        Ok(known)
    }

    /// Records a worker's lease request: it is alive and healthy (a worker
    /// asks for work only then), has `free_slots` free and holds `loaded`
    /// in memory. Other workers' leases read this to
    /// leave it the jobs it is better placed for. False when it is not
    /// registered.
    #[instrument(skip_all, fields(worker_id = %id))]
    pub async fn record_poll(&self, id: WorkerId, free_slots: u32, loaded: &[String]) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE workers SET last_heartbeat = now(), polled_at = now(), free_slots = $2, loaded_models = $3, \
                 unhealthy_reason = '' \
             WHERE id = $1",
        )
        .bind(id.0)
        .bind(i32::try_from(free_slots).unwrap_or(i32::MAX))
        .bind(loaded)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks the workers `ids`, each waiting in a `LeaseJob` call, alive
    /// and asking, in one statement (`workers/presence.rs`).
    #[instrument(skip_all, fields(workers = ids.len()))]
    pub async fn refresh_pollers(&self, ids: &[Uuid]) -> Result<()> {
        sqlx::query(
            "UPDATE workers SET last_heartbeat = now(), polled_at = now(), unhealthy_reason = '' WHERE id = ANY($1)",
        )
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What a worker registered that leasing needs, and whether `token`
    /// speaks for it: the base models it can train (not those it advertised
    /// as unsupported) and its devices with the memory each may use (one
    /// unnamed device of the worker's memory when it registered none), or
    /// `None` for an unknown worker. `loaded` is left empty.
    pub async fn worker_offer(&self, id: WorkerId, token: Uuid) -> Result<Option<(WorkerOffer, WorkerOwnership)>> {
        let Some(registration) = self.registration(id).await? else { return Ok(None) };
        let ownership = registration.ownership(token);
        let offer = WorkerOffer { models: registration.models, loaded: Vec::new(), devices: registration.rooms };
        Ok(Some((offer, ownership)))
    }

    /// What worker `id` registered, from the cache when it holds it
    /// (`cache.rs`); `None` for an unknown worker.
    async fn registration(&self, id: WorkerId) -> Result<Option<Registration>> {
        if let Some(registration) = self.cache.worker(id.0) {
            return Ok(Some(registration));
        }
        let start = self.cache.read_start();
        let row: Option<(Vec<String>, i64, Json<Vec<Device>>, Option<Uuid>)> = sqlx::query_as(
            "SELECT coalesce(array_agg(m->>'name') \
                 FILTER (WHERE m IS NOT NULL AND coalesce(m->>'unsupported_reason', '') = ''), '{}'), \
                 w.memory_bytes, w.devices, w.token_id \
             FROM workers w LEFT JOIN LATERAL jsonb_array_elements(w.models) m ON true \
             WHERE w.id = $1 GROUP BY w.id",
        )
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?;
        let Some((models, memory, Json(devices), token_id)) = row else { return Ok(None) };
        let memory = to_u64(memory, "worker memory_bytes")?;
        let registration = Registration { models, rooms: device_rooms(&devices, memory), token_id };
        self.cache.put_worker(start, id.0, registration.clone());
        Ok(Some(registration))
    }

    /// The shape of each of `names` that some worker trains and reported in
    /// full; when workers disagree, the one with the most parameters, so that
    /// estimates err on the large side.
    #[instrument(skip_all)]
    pub async fn model_shapes(&self, names: &[String]) -> Result<HashMap<String, ModelShape>> {
        let models: Vec<Json<AdvertisedModel>> = sqlx::query_scalar(
            "SELECT DISTINCT ON (e->>'name') e FROM workers w, jsonb_array_elements(w.models) e \
             WHERE e->>'name' = ANY($1) AND coalesce(e->>'unsupported_reason', '') = '' \
             ORDER BY e->>'name', coalesce((e->>'parameters')::bigint, 0) DESC, w.id",
        )
        .bind(names)
        .fetch_all(&self.hot)
        .await?;
        Ok(models
            .into_iter()
            .filter_map(|Json(model)| {
                let shape = model.shape()?;
                Some((model.name, shape))
            })
            .collect())
    }

    /// What the registered workers say about a base model: served (with the
    /// smallest `max_positions` and the types they reported), known only as
    /// a model none of them can train (with one worker's reason), or unknown.
    #[instrument(skip_all, fields(base_model = name))]
    pub async fn model_support(&self, name: &str) -> Result<ModelSupport> {
        // One row whatever matches; the unsupported type and reason come
        // from the same worker (the first by id).
        let row: SupportRow = sqlx::query_as(
            "WITH m AS ( \
                 SELECT w.id, e->>'model_type' AS model_type, e->>'max_positions' AS max_positions, \
                        nullif(e->>'unsupported_reason', '') AS reason \
                 FROM workers w, jsonb_array_elements(w.models) e WHERE e->>'name' = $1) \
             SELECT bool_or(reason IS NULL) AS served, \
                    min(max_positions::bigint) FILTER (WHERE reason IS NULL AND max_positions::bigint > 0) \
                        AS max_positions, \
                    array_agg(DISTINCT model_type) FILTER (WHERE reason IS NULL AND model_type <> '') \
                        AS served_types, \
                    (array_agg(model_type ORDER BY id) FILTER (WHERE reason IS NOT NULL))[1] AS model_type, \
                    (array_agg(reason ORDER BY id) FILTER (WHERE reason IS NOT NULL))[1] AS reason \
             FROM m",
        )
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        Ok(match (row.served, row.reason) {
            (Some(true), _) => ModelSupport::Served {
                max_positions: row.max_positions.map(|v| u32::try_from(v).unwrap_or(u32::MAX)),
                model_types: row.served_types.unwrap_or_default(),
            },
            (_, Some(reason)) => ModelSupport::Unsupported { model_type: row.model_type.unwrap_or_default(), reason },
            _ => ModelSupport::Unknown,
        })
    }

    /// For each of `names`, what the registered workers say about it: served
    /// by a worker at all, served by one that heartbeated within `window`,
    /// one worker's reason when only workers that cannot train it know it,
    /// and the devices of each online worker serving it. Names no worker
    /// knows are missing from the map.
    #[instrument(skip_all)]
    pub async fn model_availability(&self, names: &[String], window: Duration) -> Result<HashMap<String, Availability>> {
        let rows: Vec<AvailabilityRow> = sqlx::query_as(
            "WITH m AS ( \
                 SELECT w.id, w.last_heartbeat > now() - $2 * interval '1 millisecond' AS online, w.memory_bytes, \
                        w.devices, e->>'name' AS name, e->>'model_type' AS model_type, \
                        nullif(e->>'unsupported_reason', '') AS reason \
                 FROM workers w, jsonb_array_elements(w.models) e WHERE e->>'name' = ANY($1)) \
             SELECT name, bool_or(reason IS NULL) AS served, bool_or(reason IS NULL AND online) AS online, \
                    (array_agg(model_type ORDER BY id) FILTER (WHERE reason IS NOT NULL))[1] AS model_type, \
                    (array_agg(reason ORDER BY id) FILTER (WHERE reason IS NOT NULL))[1] AS reason, \
                    coalesce(jsonb_agg(jsonb_build_object('memory_bytes', memory_bytes, 'devices', devices) \
                                       ORDER BY id) FILTER (WHERE reason IS NULL AND online), '[]') AS workers \
             FROM m GROUP BY name",
        )
        .bind(names)
        .bind(millis(window))
        .fetch_all(&self.hot)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let unsupported = row.reason.map(|reason| (row.model_type.unwrap_or_default(), reason));
                let workers = row.workers.0.iter().map(|w| device_rooms(&w.devices, w.memory_bytes)).collect();
                (row.name, Availability { served: row.served, online: row.online, unsupported, workers })
            })
            .collect())
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

/// What [`Store::model_support`] aggregates over the workers' entries for a name.
#[derive(sqlx::FromRow)]
struct SupportRow {
    served: Option<bool>,
    max_positions: Option<i64>,
    served_types: Option<Vec<String>>,
    model_type: Option<String>,
    reason: Option<String>,
}

/// What [`Store::model_availability`] aggregates per name.
#[derive(sqlx::FromRow)]
struct AvailabilityRow {
    name: String,
    served: bool,
    online: bool,
    model_type: Option<String>,
    reason: Option<String>,
    workers: Json<Vec<WorkerDevices>>,
}

/// A worker's memory and devices, as [`Store::model_availability`] reads them.
#[derive(serde::Deserialize)]
struct WorkerDevices {
    memory_bytes: u64,
    devices: Vec<Device>,
}

/// What the registered workers say about one base model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Availability {
    /// Some registered worker can train on it.
    pub served: bool,
    /// Some worker that can train on it is online.
    pub online: bool,
    /// A worker's `(model_type, reason)` when it knows the model but cannot train it.
    pub unsupported: Option<(String, String)>,
    /// The devices of each online worker that trains it, as placement sees
    /// them (`crate::placement::DeviceRoom`).
    pub workers: Vec<Vec<DeviceRoom>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, memory_bytes: u64) -> Device {
        Device { name: name.into(), memory_bytes, free_memory_bytes: 0 }
    }

    fn rooms(devices: &[Device], memory: u64) -> Vec<(String, Option<u64>)> {
        device_rooms(devices, memory).into_iter().map(|d| (d.name, d.memory_bytes)).collect()
    }

    #[test]
    fn the_cpu_is_capped_by_the_workers_memory_and_a_gpu_counts_its_own() {
        let gpus = [device("cuda:0", 80), device("cuda:1", 0)];
        assert_eq!(rooms(&gpus, 50), [("cuda:0".into(), Some(80)), ("cuda:1".into(), None)]);
        let cpus = [device("cpu", 64), device("cpu:1", 0)];
        assert_eq!(rooms(&cpus, 16), [("cpu".into(), Some(16)), ("cpu:1".into(), Some(16))]);
        assert_eq!(rooms(&cpus, 0), [("cpu".into(), Some(64)), ("cpu:1".into(), None)]);
        assert_eq!(rooms(&[], 16), [(String::new(), Some(16))], "a worker without devices is one of its memory");
        assert_eq!(rooms(&[], 0), [(String::new(), None)]);
    }
}

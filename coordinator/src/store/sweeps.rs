//! Sweeps: insert, read, list, the leaderboard, and what users change
//! (cancel, extend, concurrency). The sweep engine's transaction is in
//! `sweep_drive`. Lock order: sweep row, then job rows.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use ptune_core::sweep::{
    AlgorithmKind, AshaPlan, Direction, FailureReason, Objective, Params, SweepState, TrialState, MAX_TRIALS,
};
use ptune_core::{JobId, SweepId};
use sqlx::types::Json;
use sqlx::{PgExecutor, Postgres, Transaction};
use tracing::instrument;
use uuid::Uuid;

use super::jobs::DbJobState;
use super::{to_u32, to_u64, Result, Store, StoreError};
use crate::model::{best_trial, BlobInfo, PageToken, Sweep, SweepPage, Trial, TrialCounts};

/// The `sweep_state` Postgres enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "sweep_state", rename_all = "lowercase")]
pub(super) enum DbSweepState {
    Running,
    Completed,
    Cancelled,
    Failed,
}

impl From<DbSweepState> for SweepState {
    fn from(s: DbSweepState) -> Self {
        match s {
            DbSweepState::Running => SweepState::Running,
            DbSweepState::Completed => SweepState::Completed,
            DbSweepState::Cancelled => SweepState::Cancelled,
            DbSweepState::Failed => SweepState::Failed,
        }
    }
}

impl From<SweepState> for DbSweepState {
    fn from(s: SweepState) -> Self {
        match s {
            SweepState::Running => DbSweepState::Running,
            SweepState::Completed => DbSweepState::Completed,
            SweepState::Cancelled => DbSweepState::Cancelled,
            SweepState::Failed => DbSweepState::Failed,
        }
    }
}

/// A sweep to store.
#[derive(Clone, Debug)]
pub struct NewSweep<'a> {
    pub id: SweepId,
    pub name: &'a str,
    pub owner: &'a str,
    pub definition: &'a serde_json::Value,
    pub algorithm: AlgorithmKind,
    pub objective: &'a Objective,
    pub trial_budget: u32,
    pub max_concurrent_trials: u32,
    pub max_failed_trials: Option<u32>,
    pub plan: Option<&'a AshaPlan>,
}

/// What a change to a sweep found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SweepChange {
    /// Done; these trial jobs changed with it.
    Done(Vec<JobId>),
    /// The sweep is in a state that does not allow the change.
    Refused(SweepState),
    /// Extending by that many would exceed the space's unused configurations
    /// (this many are left) or [`MAX_TRIALS`].
    Exhausted { remaining: u64 },
    NotFound,
}

macro_rules! sweep_select {
    () => {
        "SELECT s.id, s.name, s.owner, s.definition, s.algorithm, s.objective_metric, s.objective_direction, \
                s.state, s.error, s.trial_budget, s.max_concurrent_trials, s.max_failed_trials, \
                s.asha_rungs, s.asha_max_steps, s.asha_reduction_factor, s.created_at, s.finished_at \
         FROM sweeps s "
    };
}

#[derive(sqlx::FromRow)]
struct SweepRow {
    id: Uuid,
    name: String,
    owner: String,
    definition: Json<serde_json::Value>,
    algorithm: String,
    objective_metric: String,
    objective_direction: String,
    state: DbSweepState,
    error: String,
    trial_budget: i32,
    max_concurrent_trials: i32,
    max_failed_trials: Option<i32>,
    asha_rungs: Option<Vec<i64>>,
    asha_max_steps: Option<i64>,
    asha_reduction_factor: Option<i32>,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

impl SweepRow {
    fn into_sweep(self, counts: TrialCounts) -> Result<Sweep> {
        let plan = plan(self.asha_rungs, self.asha_max_steps, self.asha_reduction_factor)?;
        let description =
            self.definition.0.get("description").and_then(|d| d.as_str()).unwrap_or_default().to_string();
        Ok(Sweep {
            id: SweepId(self.id),
            name: self.name,
            owner: self.owner,
            description,
            state: self.state.into(),
            algorithm: self.algorithm.parse().map_err(StoreError::Corrupt)?,
            objective: Objective {
                metric: self.objective_metric,
                direction: self.objective_direction.parse().map_err(StoreError::Corrupt)?,
            },
            max_concurrent_trials: to_u32(self.max_concurrent_trials, "max_concurrent_trials")?,
            max_failed_trials: self.max_failed_trials.map(|n| to_u32(n, "max_failed_trials")).transpose()?,
            trial_budget: to_u32(self.trial_budget, "trial_budget")?,
            trials_created: counts.total(),
            counts,
            plan,
            error: self.error,
            created_at: self.created_at,
            finished_at: self.finished_at,
            definition: self.definition.0,
        })
    }
}

/// The stored ASHA plan of a sweep, if it runs ASHA.
pub(super) fn plan(rungs: Option<Vec<i64>>, max_steps: Option<i64>, eta: Option<i32>) -> Result<Option<AshaPlan>> {
    Ok(match (rungs, max_steps, eta) {
        (Some(rungs), Some(max_steps), Some(eta)) => Some(AshaPlan {
            rungs: rungs.into_iter().map(|r| to_u64(r, "asha rung")).collect::<Result<_>>()?,
            max_steps: to_u64(max_steps, "asha_max_steps")?,
            reduction_factor: to_u32(eta, "asha_reduction_factor")?,
        }),
        _ => None,
    })
}

#[derive(sqlx::FromRow)]
struct TrialRow {
    id: Uuid,
    trial_index: i32,
    trial_params: Json<Params>,
    state: DbJobState,
    early_stopped: bool,
    error: String,
    step: i64,
    total_steps: i64,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    adapter_sha256: Option<String>,
    adapter_size: Option<i64>,
    stopped_rung: Option<i32>,
    objective: Option<f64>,
    objective_step: Option<i64>,
}

impl TrialRow {
    fn into_trial(self, rank: Option<u32>) -> Result<Trial> {
        let state = TrialState::of(self.state.into(), self.early_stopped);
        let adapter = match (self.adapter_sha256, self.adapter_size) {
            (Some(sha256), Some(size)) => Some(BlobInfo { sha256, size: to_u64(size, "adapter size")? }),
            _ => None,
        };
        Ok(Trial {
            index: to_u32(self.trial_index, "trial_index")?,
            job_id: JobId(self.id),
            params: self.trial_params.0,
            state,
            failure_reason: (state == TrialState::Failed).then(|| FailureReason::of(&self.error)),
            stopped_rung: if state == TrialState::EarlyStopped {
                self.stopped_rung.map(|r| to_u32(r, "rung")).transpose()?
            } else {
                None
            },
            objective: self.objective,
            objective_step: self.objective_step.map(|s| to_u64(s, "objective step")).transpose()?,
            step: to_u64(self.step, "step")?,
            total_steps: to_u64(self.total_steps, "total_steps")?,
            rank,
            error: self.error,
            adapter,
            created_at: self.created_at,
            finished_at: self.finished_at,
        })
    }
}

/// Every trial of a sweep, best first: trials with an objective by the
/// objective in its direction, ties to fewer steps then the lower index; then
/// the others by index. The objective is the latest value of the metric, or
/// for a trial stopped early its value at the rung it stopped at.
pub(super) async fn leaderboard<'e>(db: impl PgExecutor<'e>, id: SweepId, objective: &Objective) -> Result<Vec<Trial>> {
    let rows: Vec<TrialRow> = sqlx::query_as(
        "SELECT * FROM ( \
             SELECT j.id, j.trial_index, j.trial_params, j.state, j.early_stopped, j.error, j.step, j.total_steps, \
                    j.created_at, j.finished_at, ad.sha256 AS adapter_sha256, ad.size AS adapter_size, \
                    d.rung AS stopped_rung, \
                    CASE WHEN j.early_stopped AND d.rung IS NOT NULL THEN d.value ELSE m.value END AS objective, \
                    CASE WHEN j.early_stopped AND d.rung IS NOT NULL THEN d.rung_step ELSE m.step END AS objective_step \
             FROM jobs j \
             LEFT JOIN adapters ad ON ad.job_id = j.id \
             LEFT JOIN asha_decisions d \
                    ON d.sweep_id = j.sweep_id AND d.trial_index = j.trial_index AND d.decision = 'stop' \
             LEFT JOIN LATERAL ( \
                 SELECT mm.step, mm.value FROM metrics mm \
                 WHERE mm.job_id = j.id AND mm.kind = 'eval' AND mm.name = $2 \
                 ORDER BY mm.step DESC LIMIT 1 \
             ) m ON true \
             WHERE j.sweep_id = $1 \
         ) t \
         ORDER BY (t.objective IS NULL OR t.objective = 'NaN'), \
                  CASE WHEN $3 THEN t.objective END DESC, \
                  CASE WHEN NOT $3 THEN t.objective END ASC, \
                  CASE WHEN t.objective IS NULL OR t.objective = 'NaN' THEN 0 ELSE t.step END, \
                  t.trial_index",
    )
    .bind(id.0)
    .bind(&objective.metric)
    .bind(objective.direction == Direction::Maximize)
    .fetch_all(db)
    .await?;
    let mut rank = 0;
    rows.into_iter()
        .map(|row| {
            let ranked = row.objective.is_some_and(|v| !v.is_nan());
            if ranked {
                rank += 1;
            }
            row.into_trial(ranked.then_some(rank))
        })
        .collect()
}

/// Trial counts of each sweep in `ids`.
async fn trial_counts<'e>(db: impl PgExecutor<'e>, ids: &[Uuid]) -> Result<HashMap<Uuid, TrialCounts>> {
    let rows: Vec<(Uuid, DbJobState, bool, String, i64)> = sqlx::query_as(
        "SELECT sweep_id, state, early_stopped, CASE WHEN state = 'failed' THEN left(error, 16) ELSE '' END, count(*) \
         FROM jobs WHERE sweep_id = ANY($1) GROUP BY 1, 2, 3, 4",
    )
    .bind(ids)
    .fetch_all(db)
    .await?;
    let mut counts: HashMap<Uuid, TrialCounts> = HashMap::new();
    for (sweep, state, early_stopped, error, n) in rows {
        let trial = TrialState::of(state.into(), early_stopped);
        let reason = (trial == TrialState::Failed).then(|| FailureReason::of(&error));
        let entry = counts.entry(sweep).or_default();
        for _ in 0..n {
            entry.add(trial, reason);
        }
    }
    Ok(counts)
}

/// Ends the trials of a sweep that is stopping: queued ones are cancelled at
/// once, running ones are asked to stop. Returns the jobs changed.
pub(super) async fn end_active_trials(
    tx: &mut Transaction<'static, Postgres>,
    id: SweepId,
    reason: &str,
) -> Result<Vec<JobId>> {
    let mut changed: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE jobs SET state = 'cancelled', error = $2, finished_at = now(), updated_at = now() \
         WHERE sweep_id = $1 AND state = 'queued' RETURNING id",
    )
    .bind(id.0)
    .bind(reason)
    .fetch_all(&mut **tx)
    .await?;
    let running: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE jobs SET cancel_requested = true, updated_at = now() \
         WHERE sweep_id = $1 AND state = 'running' RETURNING id",
    )
    .bind(id.0)
    .fetch_all(&mut **tx)
    .await?;
    changed.extend(running);
    Ok(changed.into_iter().map(JobId).collect())
}

/// Marks a locked sweep finished in `state`, recording its best trial.
pub(super) async fn finish_sweep(
    tx: &mut Transaction<'static, Postgres>,
    id: SweepId,
    objective: &Objective,
    state: SweepState,
    error: &str,
) -> Result<()> {
    let board = leaderboard(&mut **tx, id, objective).await?;
    let best = best_trial(&board).map(|t| i32::try_from(t.index).unwrap_or(i32::MAX));
    sqlx::query(
        "UPDATE sweeps SET state = $2, error = $3, best_trial_index = $4, finished_at = now(), updated_at = now() \
         WHERE id = $1",
    )
    .bind(id.0)
    .bind(DbSweepState::from(state))
    .bind(error)
    .bind(best)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Locks a sweep row for a change; its state and objective.
async fn lock_sweep(tx: &mut Transaction<'static, Postgres>, id: SweepId) -> Result<Option<(DbSweepState, Objective)>> {
    let row: Option<(DbSweepState, String, String)> = sqlx::query_as(
        "SELECT state, objective_metric, objective_direction FROM sweeps WHERE id = $1 FOR UPDATE",
    )
    .bind(id.0)
    .fetch_optional(&mut **tx)
    .await?;
    row.map(|(state, metric, direction)| {
        Ok((state, Objective { metric, direction: direction.parse().map_err(StoreError::Corrupt)? }))
    })
    .transpose()
}

impl Store {
    /// Stores a new running sweep; the engine creates its trials.
    #[instrument(skip_all, fields(sweep_id = %new.id))]
    pub async fn insert_sweep(&self, new: &NewSweep<'_>) -> Result<()> {
        let to_i32 = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        sqlx::query(
            "INSERT INTO sweeps (id, name, owner, definition, algorithm, objective_metric, objective_direction, \
                 trial_budget, max_concurrent_trials, max_failed_trials, asha_rungs, asha_max_steps, \
                 asha_reduction_factor) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(new.id.0)
        .bind(new.name)
        .bind(new.owner)
        .bind(Json(new.definition))
        .bind(new.algorithm.as_str())
        .bind(&new.objective.metric)
        .bind(new.objective.direction.as_str())
        .bind(to_i32(new.trial_budget))
        .bind(to_i32(new.max_concurrent_trials))
        .bind(new.max_failed_trials.map(to_i32))
        .bind(new.plan.map(|p| p.rungs.iter().map(|&r| super::to_i64(r)).collect::<Vec<_>>()))
        .bind(new.plan.map(|p| super::to_i64(p.max_steps)))
        .bind(new.plan.map(|p| to_i32(p.reduction_factor)))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One sweep with its trial counts, or `None`.
    #[instrument(skip_all, fields(sweep_id = %id))]
    pub async fn get_sweep(&self, id: SweepId) -> Result<Option<Sweep>> {
        let row: Option<SweepRow> =
            sqlx::query_as(concat!(sweep_select!(), "WHERE s.id = $1")).bind(id.0).fetch_optional(&self.pool).await?;
        let Some(row) = row else { return Ok(None) };
        let mut counts = trial_counts(&self.pool, &[id.0]).await?;
        row.into_sweep(counts.remove(&id.0).unwrap_or_default()).map(Some)
    }

    /// Number of sweeps in every state (zero included).
    pub async fn sweep_counts(&self) -> Result<Vec<(SweepState, u64)>> {
        let rows: Vec<(DbSweepState, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM sweeps GROUP BY state").fetch_all(&self.pool).await?;
        let counts: HashMap<SweepState, i64> = rows.into_iter().map(|(s, n)| (s.into(), n)).collect();
        SweepState::ALL
            .into_iter()
            .map(|s| Ok((s, to_u64(counts.get(&s).copied().unwrap_or(0), "sweep count")?)))
            .collect()
    }

    /// The sweep's trials, best first (see the `leaderboard` query).
    #[instrument(skip_all, fields(sweep_id = %id))]
    pub async fn leaderboard(&self, id: SweepId, objective: &Objective) -> Result<Vec<Trial>> {
        leaderboard(&self.pool, id, objective).await
    }

    /// Sweeps in `states` (all when empty), newest first, at most `limit`, after `after`.
    #[instrument(skip_all, fields(limit))]
    pub async fn list_sweeps(
        &self,
        states: &[SweepState],
        limit: u32,
        after: Option<PageToken<SweepId>>,
        owner: Option<&str>,
    ) -> Result<SweepPage> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let rows: Vec<SweepRow> = sqlx::query_as(concat!(
            sweep_select!(),
            "WHERE (cardinality($1::text[]) = 0 OR s.state = ANY($1::text[]::sweep_state[])) \
               AND ($2::timestamptz IS NULL OR (s.created_at, s.id) < ($2, $3::uuid)) \
               AND ($5::text IS NULL OR s.owner = $5) \
             ORDER BY s.created_at DESC, s.id DESC LIMIT $4"
        ))
        .bind(&states)
        .bind(after.map(|t| t.created_at))
        .bind(after.map(|t| t.id.0))
        .bind(i64::from(limit) + 1)
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        let more = rows.len() > limit as usize;
        let ids: Vec<Uuid> = rows.iter().take(limit as usize).map(|r| r.id).collect();
        let mut counts = trial_counts(&self.pool, &ids).await?;
        let mut sweeps = Vec::with_capacity(ids.len());
        for row in rows.into_iter().take(limit as usize) {
            let id = row.id;
            let sweep = row.into_sweep(counts.remove(&id).unwrap_or_default())?;
            let board = leaderboard(&self.pool, sweep.id, &sweep.objective).await?;
            let best = best_trial(&board).cloned();
            sweeps.push((sweep, best));
        }
        let next = match sweeps.last() {
            Some((last, _)) if more => Some(PageToken { created_at: last.created_at, id: last.id }),
            _ => None,
        };
        Ok(SweepPage { sweeps, next })
    }

    /// Cancels a running sweep and its unfinished trials.
    #[instrument(skip_all, fields(sweep_id = %id))]
    pub async fn cancel_sweep(&self, id: SweepId) -> Result<SweepChange> {
        let mut tx = self.pool.begin().await?;
        let Some((state, objective)) = lock_sweep(&mut tx, id).await? else { return Ok(SweepChange::NotFound) };
        if state != DbSweepState::Running {
            return Ok(SweepChange::Refused(state.into()));
        }
        let changed = end_active_trials(&mut tx, id, "cancelled with its sweep").await?;
        finish_sweep(&mut tx, id, &objective, SweepState::Cancelled, "").await?;
        tx.commit().await?;
        Ok(SweepChange::Done(changed))
    }

    /// Adds `trials` to a running or completed sweep (which runs again).
    /// `distinct` is the number of distinct configurations of a discrete space.
    #[instrument(skip_all, fields(sweep_id = %id, trials))]
    pub async fn extend_sweep(&self, id: SweepId, trials: u32, distinct: Option<u64>) -> Result<SweepChange> {
        let mut tx = self.pool.begin().await?;
        let Some((state, _)) = lock_sweep(&mut tx, id).await? else { return Ok(SweepChange::NotFound) };
        if !matches!(state, DbSweepState::Running | DbSweepState::Completed) {
            return Ok(SweepChange::Refused(state.into()));
        }
        let budget: i32 =
            sqlx::query_scalar("SELECT trial_budget FROM sweeps WHERE id = $1").bind(id.0).fetch_one(&mut *tx).await?;
        let budget = u64::from(to_u32(budget, "trial_budget")?);
        let limit = distinct.unwrap_or(u64::MAX).min(u64::from(MAX_TRIALS));
        if budget + u64::from(trials) > limit {
            return Ok(SweepChange::Exhausted { remaining: limit.saturating_sub(budget) });
        }
        sqlx::query(
            "UPDATE sweeps SET trial_budget = trial_budget + $2, state = 'running', error = '', finished_at = NULL, \
                 updated_at = now() WHERE id = $1",
        )
        .bind(id.0)
        .bind(i32::try_from(trials).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(SweepChange::Done(Vec::new()))
    }

    /// Sets how many trials of a running or completed sweep may be queued or running at once.
    #[instrument(skip_all, fields(sweep_id = %id, max_concurrent_trials = n))]
    pub async fn set_max_concurrent_trials(&self, id: SweepId, n: u32) -> Result<SweepChange> {
        let mut tx = self.pool.begin().await?;
        let Some((state, _)) = lock_sweep(&mut tx, id).await? else { return Ok(SweepChange::NotFound) };
        if !matches!(state, DbSweepState::Running | DbSweepState::Completed) {
            return Ok(SweepChange::Refused(state.into()));
        }
        sqlx::query("UPDATE sweeps SET max_concurrent_trials = $2, updated_at = now() WHERE id = $1")
            .bind(id.0)
            .bind(i32::try_from(n).unwrap_or(i32::MAX))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(SweepChange::Done(Vec::new()))
    }
}

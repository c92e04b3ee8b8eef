//! The sweep engine's transaction: one running sweep row locked
//! (`FOR UPDATE SKIP LOCKED`, so two coordinators never drive one sweep at
//! once), its trials and rung results read, and its decisions, new trials and
//! state written, all committed together or not at all.

use std::str::FromStr;

use ptune_core::sweep::{Decision, Objective, Params, SweepState};
use ptune_core::{JobId, JobSpec, JobState, MemoryEstimate, SweepId};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use tracing::instrument;
use uuid::Uuid;

use super::jobs::DbJobState;
use super::sweeps::{end_active_trials, finish_sweep, plan};
use super::{to_i64, to_u32, to_u64, Result, Store, StoreError};
use crate::model::DatasetRef;

/// The settings of a sweep being driven.
#[derive(Clone, Debug)]
pub struct DriveSweep {
    pub id: SweepId,
    pub definition: Value,
    pub objective: Objective,
    pub trial_budget: u32,
    pub max_concurrent_trials: u32,
    pub max_failed_trials: Option<u32>,
    pub plan: Option<ptune_core::sweep::AshaPlan>,
}

/// A trial as the engine needs it.
#[derive(Clone, Debug)]
pub struct DriveTrial {
    pub index: u32,
    pub job_id: JobId,
    pub state: JobState,
    pub early_stopped: bool,
    pub error: String,
    pub params: Params,
}

/// A trial's objective at a rung step that has no decision yet.
#[derive(Clone, Debug)]
pub struct RungResult {
    pub index: u32,
    pub job_id: JobId,
    pub step: u64,
    pub value: f64,
    /// The trial's eval loss at the step, which breaks ties of `value`.
    pub tiebreak: Option<f64>,
}

/// A decision taken earlier.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub index: u32,
    pub rung: u32,
    pub decision: Decision,
    pub value: f64,
    pub tiebreak: Option<f64>,
}

/// A trial job to create.
#[derive(Clone, Debug)]
pub struct NewTrial<'a> {
    pub job_id: JobId,
    pub index: u32,
    pub params: &'a Params,
    pub spec: &'a JobSpec,
    pub total_steps: u64,
    /// Its memory estimate, when a worker has reported its model's shape.
    pub estimate: Option<MemoryEstimate>,
}

/// One running sweep, locked until [`SweepDrive::commit`] (or drop, which rolls back).
pub struct SweepDrive {
    tx: Transaction<'static, Postgres>,
    pub sweep: DriveSweep,
}

#[derive(sqlx::FromRow)]
struct DriveRow {
    definition: Json<Value>,
    objective_metric: String,
    objective_direction: String,
    trial_budget: i32,
    max_concurrent_trials: i32,
    max_failed_trials: Option<i32>,
    asha_rungs: Option<Vec<i64>>,
    asha_max_steps: Option<i64>,
    asha_reduction_factor: Option<i32>,
}

impl Store {
    /// Running sweeps, oldest first.
    pub async fn running_sweeps(&self) -> Result<Vec<SweepId>> {
        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM sweeps WHERE state = 'running' ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        Ok(ids.into_iter().map(SweepId).collect())
    }

    /// Locks a running sweep for the engine; `None` if it is not running or
    /// another transaction (another coordinator, a user's change) holds it.
    #[instrument(skip_all, fields(sweep_id = %id))]
    pub async fn begin_drive(&self, id: SweepId) -> Result<Option<SweepDrive>> {
        let mut tx = self.pool.begin().await?;
        let row: Option<DriveRow> = sqlx::query_as(
            "SELECT definition, objective_metric, objective_direction, trial_budget, max_concurrent_trials, \
                    max_failed_trials, asha_rungs, asha_max_steps, asha_reduction_factor \
             FROM sweeps WHERE id = $1 AND state = 'running' FOR UPDATE SKIP LOCKED",
        )
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let sweep = DriveSweep {
            id,
            definition: row.definition.0,
            objective: Objective {
                metric: row.objective_metric,
                direction: FromStr::from_str(&row.objective_direction).map_err(StoreError::Corrupt)?,
            },
            trial_budget: to_u32(row.trial_budget, "trial_budget")?,
            max_concurrent_trials: to_u32(row.max_concurrent_trials, "max_concurrent_trials")?,
            max_failed_trials: row.max_failed_trials.map(|n| to_u32(n, "max_failed_trials")).transpose()?,
            plan: plan(row.asha_rungs, row.asha_max_steps, row.asha_reduction_factor)?,
        };
        Ok(Some(SweepDrive { tx, sweep }))
    }
}

impl SweepDrive {
    /// Every trial of the sweep, by index.
    pub async fn trials(&mut self) -> Result<Vec<DriveTrial>> {
        let rows: Vec<(i32, Uuid, DbJobState, bool, String, Json<Params>)> = sqlx::query_as(
            "SELECT trial_index, id, state, early_stopped, error, trial_params FROM jobs \
             WHERE sweep_id = $1 ORDER BY trial_index",
        )
        .bind(self.sweep.id.0)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.into_iter()
            .map(|(index, id, state, early_stopped, error, params)| {
                Ok(DriveTrial {
                    index: to_u32(index, "trial_index")?,
                    job_id: JobId(id),
                    state: state.into(),
                    early_stopped,
                    error,
                    params: params.0,
                })
            })
            .collect()
    }

    /// Objective values reported at rung steps that have no decision yet, in
    /// arrival order, skipping trials already stopped.
    pub async fn pending_rung_results(&mut self, rungs: &[u64]) -> Result<Vec<RungResult>> {
        let steps: Vec<i64> = rungs.iter().map(|&r| to_i64(r)).collect();
        // The eval loss breaks ties of any other objective; both arrive in
        // the same evaluation report.
        let rows: Vec<(i32, Uuid, i64, f64, Option<f64>)> = sqlx::query_as(
            "SELECT j.trial_index, j.id, m.step, m.value, l.value FROM jobs j JOIN metrics m ON m.job_id = j.id \
             LEFT JOIN metrics l ON l.job_id = j.id AND l.kind = 'eval' AND l.name = 'loss' AND l.step = m.step \
                                  AND $2 <> 'loss' \
             WHERE j.sweep_id = $1 AND m.kind = 'eval' AND m.name = $2 AND m.step = ANY($3) \
               AND NOT EXISTS ( \
                   SELECT 1 FROM asha_decisions d WHERE d.sweep_id = j.sweep_id AND d.trial_index = j.trial_index \
                     AND (d.rung_step = m.step OR d.decision = 'stop')) \
             ORDER BY m.recorded_at, j.trial_index, m.step",
        )
        .bind(self.sweep.id.0)
        .bind(&self.sweep.objective.metric)
        .bind(&steps)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.into_iter()
            .map(|(index, id, step, value, tiebreak)| {
                Ok(RungResult {
                    index: to_u32(index, "trial_index")?,
                    job_id: JobId(id),
                    step: to_u64(step, "step")?,
                    value,
                    tiebreak,
                })
            })
            .collect()
    }

    /// Every decision taken so far.
    pub async fn recorded(&mut self) -> Result<Vec<Recorded>> {
        let rows: Vec<(i32, i32, String, f64, Option<f64>)> =
            sqlx::query_as("SELECT trial_index, rung, decision, value, tiebreak FROM asha_decisions WHERE sweep_id = $1")
                .bind(self.sweep.id.0)
                .fetch_all(&mut *self.tx)
                .await?;
        rows.into_iter()
            .map(|(index, rung, decision, value, tiebreak)| {
                let decision = match decision.as_str() {
                    "promote" => Decision::Promote,
                    "stop" => Decision::Stop,
                    other => return Err(StoreError::Corrupt(format!("unknown asha decision {other:?}"))),
                };
                Ok(Recorded { index: to_u32(index, "trial_index")?, rung: to_u32(rung, "rung")?, decision, value, tiebreak })
            })
            .collect()
    }

    /// Records a decision and its effect: a stopped trial's worker is asked
    /// to stop (or, if the trial is queued again, it ends at once). True when
    /// the trial's job changed.
    #[instrument(skip_all, fields(sweep_id = %self.sweep.id, trial = result.index, rung))]
    pub async fn record_decision(&mut self, result: &RungResult, rung: u32, decision: Decision) -> Result<bool> {
        sqlx::query(
            "INSERT INTO asha_decisions (sweep_id, trial_index, rung, rung_step, decision, value, tiebreak) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(self.sweep.id.0)
        .bind(i32::try_from(result.index).unwrap_or(i32::MAX))
        .bind(i32::try_from(rung).unwrap_or(i32::MAX))
        .bind(to_i64(result.step))
        .bind(decision.as_str())
        .bind(result.value)
        .bind(result.tiebreak)
        .execute(&mut *self.tx)
        .await?;
        if decision == Decision::Promote {
            return Ok(false);
        }
        let running = sqlx::query(
            "UPDATE jobs SET early_stop_requested = true, updated_at = now() \
             WHERE id = $1 AND state = 'running' AND NOT cancel_requested",
        )
        .bind(result.job_id.0)
        .execute(&mut *self.tx)
        .await?;
        let queued = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', early_stopped = true, early_stop_requested = true, \
                 error = $2, finished_at = now(), updated_at = now() \
             WHERE id = $1 AND state = 'queued'",
        )
        .bind(result.job_id.0)
        .bind(format!("stopped early by its sweep at rung {rung} (step {})", result.step))
        .execute(&mut *self.tx)
        .await?;
        Ok(running.rows_affected() + queued.rows_affected() > 0)
    }

    /// Non-empty lines of an uploaded dataset, if it is stored.
    pub async fn dataset_lines(&mut self, reference: &DatasetRef) -> Result<Option<u64>> {
        let lines: Option<i64> = sqlx::query_scalar("SELECT lines FROM datasets WHERE sha256 = $1")
            .bind(reference.sha256())
            .fetch_optional(&mut *self.tx)
            .await?;
        lines.map(|n| to_u64(n, "dataset lines")).transpose()
    }

    /// Creates trial `index` as a queued job. Its `created_at` is the clock at
    /// insertion, so trials are leased in index order.
    #[instrument(skip_all, fields(sweep_id = %self.sweep.id, trial = trial.index, job_id = %trial.job_id))]
    pub async fn insert_trial(&mut self, trial: NewTrial<'_>) -> Result<()> {
        let spec = trial.spec;
        sqlx::query(
            "INSERT INTO jobs (id, name, owner, base_model, method, spec, state, max_attempts, total_steps, \
                 sweep_id, trial_index, trial_params, memory_weights_bytes, memory_job_bytes, memory_activation_bytes, \
                 created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8, $9, $10, $11, $12, $13, $14, \
                     clock_timestamp(), clock_timestamp())",
        )
        .bind(trial.job_id.0)
        .bind(&spec.name)
        .bind(&spec.owner)
        .bind(&spec.base_model)
        .bind(spec.method.as_str())
        .bind(Json(spec))
        .bind(i32::try_from(spec.max_attempts).unwrap_or(i32::MAX))
        .bind(to_i64(trial.total_steps))
        .bind(self.sweep.id.0)
        .bind(i32::try_from(trial.index).unwrap_or(i32::MAX))
        .bind(Json(trial.params))
        .bind(trial.estimate.map(|e| to_i64(e.weights_bytes)))
        .bind(trial.estimate.map(|e| to_i64(e.job_bytes)))
        .bind(trial.estimate.map(|e| to_i64(e.activation_bytes)))
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Lowers the budget to the trials created when the space has run out of configurations.
    pub async fn set_budget(&mut self, budget: u32) -> Result<()> {
        sqlx::query("UPDATE sweeps SET trial_budget = $2, updated_at = now() WHERE id = $1")
            .bind(self.sweep.id.0)
            .bind(i32::try_from(budget).unwrap_or(i32::MAX))
            .execute(&mut *self.tx)
            .await?;
        self.sweep.trial_budget = budget;
        Ok(())
    }

    /// Ends the sweep in `state`; a failed sweep ends its unfinished trials
    /// too. Returns the jobs changed.
    pub async fn finish(&mut self, state: SweepState, error: &str) -> Result<Vec<JobId>> {
        let changed = if state == SweepState::Failed {
            end_active_trials(&mut self.tx, self.sweep.id, "cancelled: its sweep failed").await?
        } else {
            Vec::new()
        };
        finish_sweep(&mut self.tx, self.sweep.id, &self.sweep.objective, state, error).await?;
        Ok(changed)
    }

    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

//! What users do with sweeps: create (with every check a trial would meet at
//! submit time), inspect with a leaderboard, list, cancel, extend, and change
//! their concurrency. The [`engine`] drives running sweeps in the background.

mod engine;

use std::collections::HashMap;
use std::sync::Arc;

use ptune_core::sweep::{trial_error, Params, SweepDefinition, SweepState, MAX_CONCURRENT_TRIALS};
use ptune_core::{JobId, SpecError, SweepId};
use serde_json::Value;
use tokio::sync::Notify;
use tracing::info;

pub use engine::{spawn_engine, SweepEngine, DRIVE_INTERVAL};

use crate::auth::{Identity, Scope};
use crate::error::Error;
use crate::events::{EventHub, HubEventKind};
use crate::jobs::{admit, check_export_size, Jobs, Lookups};
use crate::limits;
use crate::memory;
use crate::model::{PageToken, Sweep, SweepPage, SweepReport};
use crate::store::{NewSweep, Store, SweepChange};

/// The sweep-facing domain service. Cheap to clone.
#[derive(Clone)]
pub struct Sweeps {
    store: Store,
    jobs: Jobs,
    hub: EventHub,
    /// Wakes the engine after a change, rather than at its next tick.
    nudge: Arc<Notify>,
    default_max_attempts: u32,
}

impl Sweeps {
    pub fn new(store: Store, jobs: Jobs, hub: EventHub, nudge: Arc<Notify>, default_max_attempts: u32) -> Self {
        Self { store, jobs, hub, nudge, default_max_attempts }
    }

    /// Validates a definition and stores the sweep as running; the engine
    /// creates its trials. The trial specs checked are those of the whole
    /// grid, or of the extremes of a random space, each against the base
    /// model's limits and the uploaded datasets, as a submitted job would be.
    pub async fn create(&self, mut definition: Value, caller: &Identity) -> Result<SweepReport, Error> {
        if let Some(template) = definition.get_mut("template").and_then(Value::as_object_mut) {
            template.entry("max_attempts").or_insert_with(|| Value::from(self.default_max_attempts));
        }
        if let Some(fields) = definition.as_object_mut() {
            let requested = fields.get("owner").and_then(Value::as_str).unwrap_or_default();
            let owner = crate::jobs::owner_for(requested, caller, "owner")?;
            fields.insert("owner".into(), Value::from(owner));
        }
        let def = SweepDefinition::from_json(&definition)?;
        let mut lookups = Lookups::default();
        let mut checked: HashMap<String, u64> = HashMap::new();
        let mut steps_per_epoch = None;
        for params in def.validation_configs() {
            let mut spec = def.trial_spec(0, &params, None)?;
            spec.validate(None).map_err(|e| trial_error(e, &params))?;
            let support = self.jobs.model_support(&spec.base_model, &mut lookups).await?;
            let limits = admit(&spec, &support).map_err(|e| in_trial(e, &params))?;
            spec.validate(limits.as_ref()).map_err(|e| trial_error(e, &params))?;
            if let Some(estimate) = memory::estimate_spec(&self.store, &spec).await? {
                check_export_size(&spec, &estimate, self.jobs.file_limits().adapter).map_err(|e| in_trial(e, &params))?;
            }
            let key = serde_json::json!([spec.task, spec.data.train, spec.data.eval, spec.data.label_field, spec.data.labels])
                .to_string();
            let lines = match checked.get(&key) {
                Some(&lines) => lines,
                None => {
                    let train = self.jobs.check_datasets(&mut spec, &mut lookups).await.map_err(|e| in_trial(e, &params))?;
                    checked.insert(key, train.lines);
                    train.lines
                }
            };
            if steps_per_epoch.is_none() {
                let examples = match spec.data.max_train_examples {
                    0 => lines,
                    limit => limit.min(lines),
                };
                steps_per_epoch = Some(examples.div_ceil(u64::from(spec.training.batch_size.max(1))).max(1));
            }
        }
        let plan = def.asha().map(|asha| asha.plan(steps_per_epoch)).transpose()?;
        let id = SweepId::new();
        self.store
            .insert_sweep(&NewSweep {
                id,
                name: &def.name,
                owner: &def.owner,
                definition: &definition,
                algorithm: def.kind(),
                objective: &def.objective,
                trial_budget: def.budget(),
                max_concurrent_trials: def.max_concurrent_trials,
                max_failed_trials: def.max_failed_trials,
                plan: plan.as_ref(),
            })
            .await?;
        info!(sweep_id = %id, name = %def.name, algorithm = def.kind().as_str(), trials = def.budget(),
              max_concurrent_trials = def.max_concurrent_trials, owner = %def.owner, "sweep created");
        self.jobs.audit(caller, "sweep.create", &id.to_string(), serde_json::json!({ "name": def.name })).await;
        self.nudge.notify_one();
        self.get(id, &Scope::All).await
    }

    /// A sweep the caller may see, with its leaderboard.
    pub async fn get(&self, id: SweepId, scope: &Scope) -> Result<SweepReport, Error> {
        let sweep = self.find(id, scope).await?;
        let leaderboard = self.store.leaderboard(id, &sweep.objective).await?;
        Ok(SweepReport { sweep, leaderboard })
    }

    /// A sweep the caller may see (another owner's sweep is not found for
    /// a submitter), without its trials.
    pub async fn find(&self, id: SweepId, scope: &Scope) -> Result<Sweep, Error> {
        self.store.get_sweep(id).await?.filter(|s| scope.sees(&s.owner)).ok_or_else(|| not_found(id))
    }

    /// Sweeps in `states` (all when empty) the caller may see, newest
    /// first, each with its best trial.
    pub async fn list(
        &self,
        states: &[SweepState],
        page_size: u32,
        after: Option<PageToken<SweepId>>,
        scope: &Scope,
    ) -> Result<SweepPage, Error> {
        Ok(self.store.list_sweeps(states, limits::page_size(page_size), after, scope.owner()).await?)
    }

    /// Cancels a running sweep: queued trials at once, running ones at their next step.
    pub async fn cancel(&self, id: SweepId, caller: &Identity) -> Result<SweepReport, Error> {
        self.find(id, &caller.scope()).await?;
        match self.store.cancel_sweep(id).await? {
            SweepChange::Done(jobs) => {
                info!(sweep_id = %id, trials_stopped = jobs.len(), "sweep cancelled");
                self.publish(&jobs);
            }
            SweepChange::Refused(state) => {
                return Err(Error::FailedPrecondition(format!(
                    "sweep {id} already {state}; only running sweeps can be cancelled"
                )))
            }
            SweepChange::NotFound | SweepChange::Exhausted { .. } => return Err(not_found(id)),
        }
        self.jobs.audit(caller, "sweep.cancel", &id.to_string(), serde_json::json!({})).await;
        self.get(id, &Scope::All).await
    }

    /// Adds trials to a random or ASHA sweep that is running or completed.
    pub async fn extend(&self, id: SweepId, trials: u32, caller: &Identity) -> Result<SweepReport, Error> {
        if !(1..=ptune_core::sweep::MAX_TRIALS).contains(&trials) {
            return Err(Error::invalid("trials", format!("must be between 1 and {}", ptune_core::sweep::MAX_TRIALS)));
        }
        let sweep = self.find(id, &caller.scope()).await?;
        let def = SweepDefinition::from_json(&sweep.definition)
            .map_err(|e| Error::Internal(format!("stored definition of sweep {id} is invalid: {e}")))?;
        if !def.extensible() {
            return Err(Error::FailedPrecondition(format!(
                "sweep {id} is a grid search, which already covers its whole space; extend random or asha sweeps"
            )));
        }
        match self.store.extend_sweep(id, trials, def.distinct_configs()).await? {
            SweepChange::Done(_) => info!(sweep_id = %id, trials, "sweep extended"),
            SweepChange::Refused(state) => {
                return Err(Error::FailedPrecondition(format!(
                    "sweep {id} is {state}; only running or completed sweeps can be extended"
                )))
            }
            SweepChange::Exhausted { remaining } => {
                return Err(Error::FailedPrecondition(format!(
                    "sweep {id} can take only {remaining} more trials: its space has no more unused configurations \
                     (or the sweep would pass {} trials); extend by at most {remaining}",
                    ptune_core::sweep::MAX_TRIALS
                )))
            }
            SweepChange::NotFound => return Err(not_found(id)),
        }
        self.jobs.audit(caller, "sweep.extend", &id.to_string(), serde_json::json!({ "trials": trials })).await;
        self.nudge.notify_one();
        self.get(id, &Scope::All).await
    }

    /// Changes how many trials may be queued or running at once.
    pub async fn set_max_concurrent_trials(&self, id: SweepId, n: u32, caller: &Identity) -> Result<SweepReport, Error> {
        if !(1..=MAX_CONCURRENT_TRIALS).contains(&n) {
            return Err(Error::invalid(
                "max_concurrent_trials",
                format!("must be between 1 and {MAX_CONCURRENT_TRIALS}, got {n}"),
            ));
        }
        self.find(id, &caller.scope()).await?;
        match self.store.set_max_concurrent_trials(id, n).await? {
            SweepChange::Done(_) => info!(sweep_id = %id, max_concurrent_trials = n, "sweep concurrency changed"),
            SweepChange::Refused(state) => {
                return Err(Error::FailedPrecondition(format!(
                    "sweep {id} is {state}; only running or completed sweeps can be changed"
                )))
            }
            SweepChange::NotFound | SweepChange::Exhausted { .. } => return Err(not_found(id)),
        }
        self.jobs
            .audit(caller, "sweep.update", &id.to_string(), serde_json::json!({ "max_concurrent_trials": n }))
            .await;
        self.nudge.notify_one();
        self.get(id, &Scope::All).await
    }

    fn publish(&self, jobs: &[JobId]) {
        for &job in jobs {
            self.hub.publish(job, HubEventKind::Changed);
        }
    }
}

/// A job-level validation error of a trial, renamed to the definition's field.
fn in_trial(e: Error, params: &Params) -> Error {
    match e {
        Error::InvalidArgument { field, message } => trial_error(SpecError::new(field, message), params).into(),
        other => other,
    }
}

fn not_found(id: SweepId) -> Error {
    Error::NotFound(format!("sweep {id} not found; list sweeps with ListSweeps"))
}

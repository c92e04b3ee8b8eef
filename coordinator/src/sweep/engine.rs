//! The sweep engine: a background task that drives every running sweep
//! every [`DRIVE_INTERVAL`], and at once when an evaluation arrives, a job
//! changes state, or a user changes a sweep.
//!
//! Driving one sweep is one transaction with its row locked (see
//! `store::sweep_drive`):
//! 1. ASHA: every objective value reported at a rung step without a decision
//!    gets one, in arrival order, with its effect (a stop request);
//! 2. more failed trials than `max_failed_trials` fail the sweep;
//! 3. new trials are created up to `max_concurrent_trials` unfinished and the
//!    budget, trial `i` always with the parameters the definition gives `i`;
//! 4. a sweep whose trials are all created and finished completes.
//!
//! Everything is read from the database on every pass, so a restarted
//! coordinator carries on where the last one stopped; trial numbers are dense
//! and unique per sweep, and decisions are unique per (trial, rung), so a
//! pass that is repeated after a crash can neither duplicate a trial nor take
//! a decision twice.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ptune_core::sweep::{decide, AshaPlan, Decision, RungValue, SweepDefinition, SweepState, TrialState};
use ptune_core::{JobId, JobSpec, MetricKind, SweepId};
use tokio::sync::{broadcast, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::events::{EventHub, HubEvent, HubEventKind};
use crate::memory;
use crate::model::DatasetRef;
use crate::store::{DriveTrial, NewTrial, Store, SweepDrive};

/// How often running sweeps are driven without a nudge.
pub const DRIVE_INTERVAL: Duration = Duration::from_millis(300);
/// Configurations tried for a trial whose drawn spec turns out invalid.
const MAX_INVALID_DRAWS: usize = 100;

/// Drives sweeps. Owned by its task; definitions are cached by sweep id
/// (they never change once stored).
pub struct SweepEngine {
    store: Store,
    hub: EventHub,
    definitions: HashMap<SweepId, Arc<SweepDefinition>>,
}

impl SweepEngine {
    pub fn new(store: Store, hub: EventHub) -> Self {
        Self { store, hub, definitions: HashMap::new() }
    }

    /// Drives every running sweep once. A sweep that fails to drive is
    /// logged and retried on the next pass.
    pub async fn drive_all(&mut self) -> Result<(), Error> {
        let running = self.store.running_sweeps().await?;
        self.definitions.retain(|id, _| running.contains(id));
        for id in running {
            if let Err(e) = self.drive(id).await {
                warn!(sweep_id = %id, error = %e, "driving the sweep failed; retrying on the next pass");
            }
        }
        Ok(())
    }

    async fn drive(&mut self, id: SweepId) -> Result<(), Error> {
        let Some(mut drive) = self.store.begin_drive(id).await? else { return Ok(()) };
        let definition = self.definition(id, &drive)?;
        let mut changed = Vec::new();
        if let Some(plan) = drive.sweep.plan.clone() {
            changed.extend(decide_rungs(&mut drive, &plan).await?);
        }
        let trials = drive.trials().await?;
        let failed: Vec<&DriveTrial> =
            trials.iter().filter(|t| TrialState::of(t.state, t.early_stopped) == TrialState::Failed).collect();
        if let Some(max) = drive.sweep.max_failed_trials {
            if failed.len() > max as usize {
                let last = failed.last().map_or("", |t| t.error.as_str());
                let error = format!(
                    "{} trials failed, more than max_failed_trials {max}; last error: {last}",
                    failed.len()
                );
                changed.extend(drive.finish(SweepState::Failed, &error).await?);
                drive.commit().await?;
                warn!(sweep_id = %id, failed = failed.len(), max_failed_trials = max, "sweep failed");
                self.publish(&changed);
                return Ok(());
            }
        }
        let (created, no_valid_config) = create_trials(&self.store, &mut drive, &definition, &trials).await?;
        if let Some(error) = no_valid_config {
            changed.extend(drive.finish(SweepState::Failed, &error).await?);
            drive.commit().await?;
            warn!(sweep_id = %id, error = %error, "sweep failed");
            changed.extend(created.trials.iter().map(|(_, job)| *job));
            self.publish(&changed);
            return Ok(());
        }
        let all_done = trials.iter().all(|t| t.state.is_terminal()) && created.trials.is_empty();
        if all_done && trials.len() as u32 >= drive.sweep.trial_budget {
            drive.finish(SweepState::Completed, "").await?;
            drive.commit().await?;
            info!(sweep_id = %id, trials = trials.len(), "sweep completed");
        } else {
            drive.commit().await?;
        }
        let unestimated: Vec<(JobId, &JobSpec)> = created.unestimated.iter().map(|(id, spec)| (*id, spec)).collect();
        memory::estimate_new(&self.store, &unestimated).await;
        for (index, job) in &created.trials {
            debug!(sweep_id = %id, trial = index, job_id = %job, "trial created");
        }
        changed.extend(created.trials.iter().map(|(_, job)| *job));
        self.publish(&changed);
        Ok(())
    }

    fn definition(&mut self, id: SweepId, drive: &SweepDrive) -> Result<Arc<SweepDefinition>, Error> {
        if let Some(def) = self.definitions.get(&id) {
            return Ok(def.clone());
        }
        let def = SweepDefinition::from_json(&drive.sweep.definition)
            .map_err(|e| Error::Internal(format!("stored definition of sweep {id} is invalid: {e}")))?;
        let def = Arc::new(def);
        self.definitions.insert(id, def.clone());
        Ok(def)
    }

    fn publish(&self, jobs: &[JobId]) {
        for &job in jobs {
            self.hub.publish(job, HubEventKind::Changed);
        }
    }
}

/// Takes the ASHA decision of every rung result that has none, in arrival
/// order, against the values recorded at its rung so far. Returns the jobs
/// whose stop was requested.
async fn decide_rungs(drive: &mut SweepDrive, plan: &AshaPlan) -> Result<Vec<JobId>, Error> {
    let pending = drive.pending_rung_results(&plan.rungs).await?;
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let mut at_rung: Vec<Vec<RungValue>> = vec![Vec::new(); plan.rungs.len()];
    let mut decided = HashSet::new();
    let mut stopped = HashSet::new();
    for r in drive.recorded().await? {
        if let Some(values) = at_rung.get_mut(r.rung as usize) {
            values.push(RungValue::new(r.value, r.tiebreak));
        }
        decided.insert((r.index, r.rung));
        if r.decision == Decision::Stop {
            stopped.insert(r.index);
        }
    }
    let direction = drive.sweep.objective.direction;
    let mut changed = Vec::new();
    for result in pending {
        let Some(rung) = plan.rung_at(result.step) else { continue };
        if stopped.contains(&result.index) || !decided.insert((result.index, rung as u32)) {
            continue;
        }
        let value = RungValue::new(result.value, result.tiebreak);
        let decision = decide(&at_rung[rung], value, plan.reduction_factor, direction);
        at_rung[rung].push(value);
        let job_changed = drive.record_decision(&result, rung as u32, decision).await?;
        info!(sweep_id = %drive.sweep.id, trial = result.index, job_id = %result.job_id, rung, step = result.step,
              value = result.value, tiebreak = ?result.tiebreak, recorded = at_rung[rung].len(), decision = decision.as_str(), "asha decision");
        if decision == Decision::Stop {
            stopped.insert(result.index);
            if job_changed {
                changed.push(result.job_id);
            }
        }
    }
    Ok(changed)
}

/// The trials a pass created.
#[derive(Default)]
struct Created {
    /// The (index, job) of each.
    trials: Vec<(u32, JobId)>,
    /// Those stored without a memory estimate (no worker had reported their
    /// model's shape), with their specs.
    unestimated: Vec<(JobId, JobSpec)>,
}

/// Creates trials while fewer than `max_concurrent_trials` are unfinished
/// and the budget allows, each with its memory estimate when a worker has
/// reported its model's shape. Returns those created, and why the sweep
/// must fail if a trial has no valid configuration.
async fn create_trials(
    store: &Store,
    drive: &mut SweepDrive,
    definition: &SweepDefinition,
    trials: &[DriveTrial],
) -> Result<(Created, Option<String>), Error> {
    let existing = trials.len() as u32;
    let active = trials.iter().filter(|t| !t.state.is_terminal()).count() as u32;
    let room = drive.sweep.max_concurrent_trials.saturating_sub(active);
    let wanted = room.min(drive.sweep.trial_budget.saturating_sub(existing));
    let mut taken: HashSet<String> = trials.iter().map(|t| t.params.key()).collect();
    let plan = drive.sweep.plan.clone();
    let mut created = Created::default();
    for index in existing..existing + wanted {
        let mut invalid = Vec::new();
        let trial = loop {
            let Some(params) = definition.params_for(index, &taken) else { break None };
            taken.insert(params.key());
            match definition.trial_spec(index, &params, plan.as_ref()) {
                Ok(spec) => break Some((params, spec)),
                Err(e) if invalid.len() < MAX_INVALID_DRAWS => {
                    warn!(sweep_id = %drive.sweep.id, trial = index, %params, error = %e, "drawn configuration is invalid; drawing another");
                    invalid.push(e);
                }
                Err(e) => {
                    let error = format!("trial {index} found no valid configuration in {MAX_INVALID_DRAWS} draws; last: {e}");
                    return Ok((created, Some(error)));
                }
            }
        };
        let Some((params, spec)) = trial else {
            info!(sweep_id = %drive.sweep.id, trials = index, "no unused configuration is left; the sweep plans no more trials");
            drive.set_budget(index).await?;
            break;
        };
        let reference: DatasetRef = spec.data.train.parse().map_err(|e: String| Error::Internal(e))?;
        let lines = drive.dataset_lines(&reference).await?.unwrap_or(0);
        let examples = match spec.data.max_train_examples {
            0 => lines,
            limit => limit.min(lines),
        };
        let job_id = JobId::new();
        let estimate = memory::estimate_spec(store, &spec).await?;
        let total_steps = spec.total_steps(examples);
        drive.insert_trial(NewTrial { job_id, index, params: &params, spec: &spec, total_steps, estimate }).await?;
        created.trials.push((index, job_id));
        if estimate.is_none() {
            created.unestimated.push((job_id, spec));
        }
    }
    Ok((created, None))
}

/// Runs the engine until `shutdown` turns true: a pass every
/// [`DRIVE_INTERVAL`], on every `nudge`, and on hub events that can change a
/// sweep (state changes, evaluation metrics).
pub fn spawn_engine(
    mut engine: SweepEngine,
    nudge: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let mut events = engine.hub.subscribe();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(DRIVE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                _ = tick.tick() => {}
                () = nudge.notified() => {}
                event = events.recv() => match event {
                    Ok(event) if !relevant(&event) => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            }
            // Fold the events that piled up into this pass.
            while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = events.try_recv() {}
            if let Err(e) = engine.drive_all().await {
                warn!(error = %e, "driving sweeps failed; retrying");
            }
        }
        debug!("sweep engine stopped");
    })
}

/// Events after which a sweep may have something to do.
fn relevant(event: &HubEvent) -> bool {
    match &event.kind {
        HubEventKind::Changed | HubEventKind::Resync => true,
        HubEventKind::Metrics(metrics) => metrics.iter().any(|m| m.kind == MetricKind::Eval),
        HubEventKind::Progress { .. } => false,
    }
}

//! What users do with jobs: submit (with every check that can run before a
//! worker sees the job), inspect, list, cancel, watch, and fetch results.
//! Reads are reports ([`JobReport`]): the job with why it waits, the same
//! for gRPC and the dashboard.

mod admission;
mod datasets;
mod facts;
mod submit;
mod watch;

use std::collections::HashMap;
use std::time::Duration;

use futures::Stream;
use ptune_core::{JobId, JobState, Metric, MetricKind};
use tokio::sync::watch as signal;
use tracing::info;

pub(crate) use admission::{admit, check_export_size};
pub use datasets::{DatasetUpload, LabelCheck};
pub use facts::DatasetFacts;
pub(crate) use submit::Lookups;
pub use submit::{BatchItem, MAX_BATCH};

use crate::auth::{Identity, Role, Scope};
use crate::blob;
use crate::cursor::JobCursor;
use crate::error::Error;
use crate::limits::FileLimits;
use crate::events::{EventHub, HubEventKind};
use crate::limits::{self, MAX_PAGE_SIZE};
use crate::memory;
use crate::model::{
    BlobInfo, DatasetInfo, Job, JobEvent, JobFilter, JobPage, JobReport,
};
use crate::store::{Availability, CancelOutcome, Store};

/// The owner of what `caller` submits: its own name, unless `requested`
/// names another and the caller is an admin. `field` names the spec field.
pub(crate) fn owner_for(requested: &str, caller: &Identity, field: &str) -> Result<String, Error> {
    let requested = requested.trim();
    if requested.is_empty() || requested == caller.name {
        return Ok(caller.name.clone());
    }
    if caller.role == Role::Admin {
        return Ok(requested.to_string());
    }
    Err(Error::PermissionDenied(format!(
        "{field}: {requested:?} is not this token's name {:?}; a job or sweep is owned by the token that submits it \
         (leave {field} empty)",
        caller.name
    )))
}

/// Why a queued job waits although workers could take it: it backs off
/// after an error until its `retry_at`.
fn backing_off(job: &Job) -> Option<String> {
    let at = job.retry_at.filter(|at| *at > chrono::Utc::now())?;
    Some(format!(
        "backing off: attempt failed {} of {} times; next attempt not before {}",
        job.failures,
        job.max_attempts,
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    ))
}

/// The job-facing domain service. Cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    store: Store,
    hub: EventHub,
    default_max_attempts: u32,
    /// How recent a worker's last heartbeat must be for it to count as online.
    online_window: Duration,
    /// Largest adapter and dataset accepted.
    files: FileLimits,
    shutdown: signal::Receiver<bool>,
}

impl Jobs {
    pub fn new(
        store: Store,
        hub: EventHub,
        default_max_attempts: u32,
        online_window: Duration,
        files: FileLimits,
        shutdown: signal::Receiver<bool>,
    ) -> Self {
        Self { store, hub, default_max_attempts, online_window, files, shutdown }
    }

    /// Largest adapter and dataset accepted.
    pub fn file_limits(&self) -> FileLimits {
        self.files
    }

    /// `jobs` with why each queued one is not being trained, when the
    /// workers registered so far explain it.
    async fn reports(&self, jobs: Vec<Job>) -> Result<Vec<JobReport>, Error> {
        let mut reasons = self.waiting_reasons(&jobs).await?;
        Ok(jobs
            .into_iter()
            .map(|job| JobReport { waiting_reason: reasons.remove(&job.id), job })
            .collect())
    }

    /// Why each queued job of `jobs` is not being trained: no worker serves
    /// its base model (it waits until one registers), the only workers that
    /// know the model cannot train it, every worker serving it is offline,
    /// it needs more memory than any online worker serving it has, or it
    /// backs off after an error. Jobs that are simply waiting for a free
    /// slot have no entry.
    async fn waiting_reasons(&self, jobs: &[Job]) -> Result<HashMap<JobId, String>, Error> {
        let queued: Vec<&Job> = jobs.iter().filter(|j| j.state == JobState::Queued).collect();
        if queued.is_empty() {
            return Ok(HashMap::new());
        }
        let names = memory::model_names(queued.iter().map(|j| &j.spec));
        let availability = self.store.model_availability(&names, self.online_window).await?;
        Ok(queued
            .into_iter()
            .filter_map(|job| {
                let model = &job.spec.base_model;
                let reason = match availability.get(model) {
                    None => format!("unschedulable: no registered worker serves base model {model:?}; it waits until one does"),
                    Some(Availability { served: false, unsupported: Some((model_type, reason)), .. }) => format!(
                        "unschedulable: base model {model:?} has model_type {model_type:?}, which ptune cannot train; {reason}"
                    ),
                    Some(Availability { served: false, .. }) => {
                        format!("unschedulable: no registered worker can train base model {model:?}")
                    }
                    Some(Availability { online: false, .. }) => {
                        format!("waiting: every worker serving base model {model:?} is offline")
                    }
                    Some(availability) => match memory::too_large(job, availability) {
                        Some(reason) => reason,
                        None => backing_off(job)?,
                    },
                };
                Some((job.id, reason))
            })
            .collect())
    }

    /// Registered workers, online first, at most `limit` (0: 100).
    pub async fn workers(&self, limit: u32) -> Result<Vec<crate::store::WorkerView>, Error> {
        let limit = if limit == 0 { 100 } else { limit.min(MAX_PAGE_SIZE) };
        Ok(self.store.worker_table(self.online_window, limit, 0).await?.0)
    }


    /// Records a mutation in the audit trail; a failure to record is logged.
    pub(crate) async fn audit(&self, caller: &Identity, action: &str, target: &str, detail: serde_json::Value) {
        if let Err(e) = self.store.audit(caller, action, target, detail).await {
            tracing::error!(error = %e, action, target, actor = %caller.name, "cannot record an audit entry");
        }
    }

    /// One job the caller may see (another owner's job is not found for a
    /// submitter), with why it waits.
    pub async fn get(&self, id: JobId, scope: &Scope) -> Result<JobReport, Error> {
        let job = self.find(id, scope).await?;
        Ok(self.reports(vec![job]).await?.remove(0))
    }

    /// One job the caller may see, as stored.
    pub async fn find(&self, id: JobId, scope: &Scope) -> Result<Job, Error> {
        self.store.get_job(id).await?.filter(|j| scope.sees(&j.spec.owner)).ok_or_else(|| not_found(id))
    }

    /// Jobs matching `filter` that the caller may see, newest first, with
    /// why they wait; `page_size` 0 means the default and larger sizes are
    /// capped (see [`limits::page_size`]).
    pub async fn list(
        &self,
        filter: &JobFilter,
        page_size: u32,
        after: Option<JobCursor>,
        scope: &Scope,
    ) -> Result<JobPage, Error> {
        let size = limits::page_size(page_size);
        let mut filter = filter.clone();
        if let Some(me) = scope.owner() {
            if filter.owner.as_deref().is_some_and(|o| o != me) {
                return Ok(JobPage { jobs: Vec::new(), next: None });
            }
            filter.owner = Some(me.to_string());
        }
        let (jobs, next) = self.store.list_jobs(&filter, size, after.as_ref()).await?;
        Ok(JobPage { jobs: self.reports(jobs).await?, next })
    }

    /// Cancels a queued job at once; asks the worker of a running job to stop.
    pub async fn cancel(&self, id: JobId, caller: &Identity) -> Result<JobReport, Error> {
        self.find(id, &caller.scope()).await?;
        match self.store.cancel_job(id).await? {
            CancelOutcome::NotFound => return Err(not_found(id)),
            CancelOutcome::AlreadyFinished(state) => {
                return Err(Error::FailedPrecondition(format!(
                    "job {id} already {state}; only queued or running jobs can be cancelled"
                )))
            }
            CancelOutcome::Cancelled => info!(job_id = %id, "queued job cancelled"),
            CancelOutcome::Requested => info!(job_id = %id, "cancellation requested; waiting for the worker"),
        }
        self.audit(caller, "job.cancel", &id.to_string(), serde_json::json!({})).await;
        self.hub.publish(id, HubEventKind::Changed);
        self.get(id, &Scope::All).await
    }

    /// The job now, then its changes until it finishes (see [`watch`]).
    pub async fn watch(
        &self,
        id: JobId,
        scope: &Scope,
    ) -> Result<impl Stream<Item = Result<JobEvent, Error>> + Send + 'static, Error> {
        self.find(id, scope).await?;
        watch::watch(self.store.clone(), &self.hub, self.shutdown.clone(), id).await
    }

    /// Every metric of a job, ordered by step.
    pub async fn metrics(&self, id: JobId, kind: Option<MetricKind>, scope: &Scope) -> Result<Vec<Metric>, Error> {
        self.find(id, scope).await?;
        Ok(self.store.metrics(id, kind).await?)
    }

    /// The adapter archive of a succeeded job: its hash and size, and its
    /// bytes in chunks. The download is recorded in the audit trail, with
    /// `via` naming the interface when it is not gRPC (`dashboard`).
    pub async fn adapter(
        &self,
        id: JobId,
        caller: &Identity,
        via: Option<&str>,
    ) -> Result<(BlobInfo, impl Stream<Item = Result<Vec<u8>, Error>> + Send + 'static), Error> {
        let job = self.find(id, &caller.scope()).await?;
        if job.state != JobState::Succeeded {
            return Err(Error::FailedPrecondition(format!(
                "job {id} is {}; its adapter can be downloaded once it has succeeded",
                job.state
            )));
        }
        let info = job.adapter.ok_or_else(|| Error::Internal(format!("succeeded job {id} has no adapter row")))?;
        let mut detail = serde_json::json!({ "sha256": info.sha256 });
        if let Some(via) = via {
            detail["via"] = via.into();
        }
        self.audit(caller, "adapter.download", &id.to_string(), detail).await;
        let blob = self.store.adapter_blob(id).await?.ok_or_else(|| Error::Internal(format!("succeeded job {id} has no adapter blob")))?;
        let chunks = blob::read(self.store.clone(), blob, info.size);
        Ok((info, chunks))
    }

    /// Starts receiving a dataset.
    pub async fn begin_dataset(&self) -> Result<DatasetUpload, Error> {
        Ok(DatasetUpload::new(self.store.clone(), self.store.begin_blob().await?, self.files.dataset))
    }

    /// Stores a received dataset (once per content) and returns its reference.
    pub async fn store_dataset(&self, upload: DatasetUpload) -> Result<DatasetInfo, Error> {
        let (info, facts, blob, unlinked) = upload.finish().await?;
        let stored = self.store.insert_dataset(&info, &facts, blob).await?;
        drop(unlinked);
        info!(dataset = %stored.reference, file_name = %stored.file_name, size = stored.size, lines = stored.lines, "dataset stored");
        Ok(stored)
    }
}

fn not_found(id: JobId) -> Error {
    Error::NotFound(format!("job {id} not found; list jobs with ListJobs"))
}

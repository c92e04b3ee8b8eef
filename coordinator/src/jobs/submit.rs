//! Submitting jobs, one or thousands at once. Every spec gets every check
//! that can run before a worker sees it: the spec itself, admission against
//! the registered workers' models, its datasets and labels, the memory
//! estimate and the export size. The database reads those checks need are
//! made once per base model and dataset of a call ([`Lookups`]), and a
//! batch's admitted jobs are stored in one transaction.

use std::collections::HashMap;

use futures::StreamExt;
use ptune_core::{JobId, JobSpec, MemoryEstimate, ModelShape, Task};
use tracing::info;

use super::{admission, owner_for, DatasetFacts, Jobs, LabelCheck};
use crate::auth::{Identity, Scope};
use crate::blob;
use crate::error::Error;
use crate::memory;
use crate::model::{DatasetInfo, DatasetRef, JobReport, ModelSupport};

/// Most specs in one [`Jobs::submit_many`] call.
pub const MAX_BATCH: usize = 10_000;

/// What the checks of one call read from the database, read once.
#[derive(Default)]
pub(crate) struct Lookups {
    support: HashMap<String, ModelSupport>,
    shapes: HashMap<String, Option<ModelShape>>,
    datasets: HashMap<String, Option<DatasetInfo>>,
    facts: HashMap<String, Option<DatasetFacts>>,
}

/// A spec that passed every check, ready to store.
struct Admitted {
    id: JobId,
    spec: JobSpec,
    total_steps: u64,
    estimate: Option<MemoryEstimate>,
}

/// One spec of a batch: as decoded from the request (or why it could not
/// be), and whether it left `max_attempts` to the coordinator.
pub type BatchItem = Result<(JobSpec, bool), Error>;

impl Jobs {
    /// Checks and stores one job; its report, as `GetJob` would give it.
    pub async fn submit(&self, spec: JobSpec, default_attempts: bool, caller: &Identity) -> Result<JobReport, Error> {
        let job = self.admit(spec, default_attempts, caller, &mut Lookups::default()).await?;
        self.store.insert_job(job.id, &job.spec, job.total_steps, job.estimate.as_ref()).await?;
        if job.estimate.is_none() {
            memory::estimate_new(&self.store, &[(job.id, &job.spec)]).await;
        }
        info!(job_id = %job.id, name = %job.spec.name, base_model = %job.spec.base_model, method = %job.spec.method,
              owner = %job.spec.owner, "job submitted");
        self.audit(caller, "job.submit", &job.id.to_string(), serde_json::json!({ "name": job.spec.name })).await;
        self.get(job.id, &Scope::All).await
    }

    /// Checks every spec of `items` as [`Jobs::submit`] does and stores
    /// those that pass in one transaction; with `all_or_nothing`, none
    /// unless all pass. One result per item, in order: the stored job's id
    /// or why it was refused (a refusal of a whole all-or-nothing batch
    /// names the items that failed).
    pub async fn submit_many(
        &self,
        items: Vec<BatchItem>,
        all_or_nothing: bool,
        caller: &Identity,
    ) -> Result<Vec<Result<JobId, Error>>, Error> {
        if items.is_empty() || items.len() > MAX_BATCH {
            return Err(Error::invalid("specs", format!("must hold 1 to {MAX_BATCH} specs, got {}", items.len())));
        }
        let mut lookups = Lookups::default();
        let mut checked = Vec::with_capacity(items.len());
        for item in items {
            checked.push(match item {
                Ok((spec, default_attempts)) => self.admit(spec, default_attempts, caller, &mut lookups).await,
                Err(e) => Err(e),
            });
        }
        let refused: Vec<usize> = checked.iter().enumerate().filter(|(_, c)| c.is_err()).map(|(i, _)| i).collect();
        if all_or_nothing && !refused.is_empty() {
            let failed = refused.iter().take(20).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
            return Ok(checked
                .into_iter()
                .map(|c| {
                    c.and_then(|_| {
                        Err(Error::FailedPrecondition(format!(
                            "not stored: the batch is all-or-nothing and {} specs were refused (items {failed}{})",
                            refused.len(),
                            if refused.len() > 20 { ", ..." } else { "" }
                        )))
                    })
                })
                .collect());
        }
        let admitted: Vec<&Admitted> = checked.iter().filter_map(|c| c.as_ref().ok()).collect();
        let rows: Vec<_> =
            admitted.iter().map(|job| (job.id, &job.spec, job.total_steps, job.estimate.as_ref())).collect();
        self.store.insert_jobs(&rows).await?;
        let unestimated: Vec<(JobId, &JobSpec)> =
            admitted.iter().filter(|job| job.estimate.is_none()).map(|job| (job.id, &job.spec)).collect();
        memory::estimate_new(&self.store, &unestimated).await;
        let ids: Vec<String> = admitted.iter().map(|job| job.id.to_string()).collect();
        info!(submitted = ids.len(), refused = refused.len(), "jobs submitted in a batch");
        let detail = serde_json::json!({ "submitted": ids.len(), "refused": refused.len(), "job_ids": ids });
        self.audit(caller, "job.submit_batch", &format!("{} jobs", admitted.len()), detail).await;
        Ok(checked.into_iter().map(|c| c.map(|job| job.id)).collect())
    }

    /// Runs every check on `spec`; the spec as it will be stored.
    async fn admit(
        &self,
        mut spec: JobSpec,
        default_attempts: bool,
        caller: &Identity,
        lookups: &mut Lookups,
    ) -> Result<Admitted, Error> {
        if default_attempts {
            spec.max_attempts = self.default_max_attempts;
        }
        spec.owner = owner_for(&spec.owner, caller, "owner")?;
        // Everything that needs no database first: no unchecked value reaches it.
        spec.validate(None)?;
        let support = self.model_support(&spec.base_model, lookups).await?;
        let limits = admission::admit(&spec, &support)?;
        spec.validate(limits.as_ref())?;
        let train = self.check_datasets(&mut spec, lookups).await?;
        let examples = match spec.data.max_train_examples {
            0 => train.lines,
            limit => limit.min(train.lines),
        };
        let estimate = self.estimate(&spec, lookups).await?;
        if let Some(estimate) = &estimate {
            admission::check_export_size(&spec, estimate, self.files.adapter)?;
        }
        Ok(Admitted { id: JobId::new(), total_steps: spec.total_steps(examples), spec, estimate })
    }

    /// What the registered workers say about a base model.
    pub(crate) async fn model_support(&self, base_model: &str, lookups: &mut Lookups) -> Result<ModelSupport, Error> {
        if let Some(support) = lookups.support.get(base_model) {
            return Ok(support.clone());
        }
        let support = self.store.model_support(base_model).await?;
        lookups.support.insert(base_model.to_string(), support.clone());
        Ok(support)
    }

    /// The spec's memory estimate, once a worker reported its model's shape.
    async fn estimate(&self, spec: &JobSpec, lookups: &mut Lookups) -> Result<Option<MemoryEstimate>, Error> {
        if !lookups.shapes.contains_key(&spec.base_model) {
            let mut shapes = self.store.model_shapes(std::slice::from_ref(&spec.base_model)).await?;
            lookups.shapes.insert(spec.base_model.clone(), shapes.remove(&spec.base_model));
        }
        Ok(lookups.shapes[&spec.base_model].as_ref().map(|shape| ptune_core::memory::estimate(spec, shape)))
    }

    /// Checks that a spec's datasets are uploaded and (for classification)
    /// carry only declared labels, writes their canonical references into the
    /// spec, and returns the training set's record.
    pub(crate) async fn check_datasets(&self, spec: &mut JobSpec, lookups: &mut Lookups) -> Result<DatasetInfo, Error> {
        let train = self.uploaded_dataset("data.train", &spec.data.train, lookups).await?;
        let eval = self.uploaded_dataset("data.eval", &spec.data.eval, lookups).await?;
        spec.data.train = train.reference.to_string();
        spec.data.eval = eval.reference.to_string();
        if spec.task == Task::SequenceClassification {
            self.check_labels(spec, &train, lookups).await?;
            if eval.reference != train.reference {
                self.check_labels(spec, &eval, lookups).await?;
            }
        }
        Ok(train)
    }

    async fn uploaded_dataset(
        &self,
        field: &str,
        reference: &str,
        lookups: &mut Lookups,
    ) -> Result<DatasetInfo, Error> {
        let parsed: DatasetRef = reference.parse().map_err(|e| Error::invalid(field, e))?;
        let key = parsed.to_string();
        if !lookups.datasets.contains_key(&key) {
            lookups.datasets.insert(key.clone(), self.store.dataset(&parsed).await?);
        }
        lookups.datasets[&key].clone().ok_or_else(|| {
            Error::invalid(field, format!("dataset {parsed} is not uploaded; upload it with UploadDataset first"))
        })
    }

    /// Checks every example's label: from the facts gathered at upload, or,
    /// when they lack what the check needs (a dataset uploaded before they
    /// were kept, or a label field with too many values), by reading the
    /// dataset a chunk at a time.
    async fn check_labels(&self, spec: &JobSpec, dataset: &DatasetInfo, lookups: &mut Lookups) -> Result<(), Error> {
        let key = dataset.reference.to_string();
        if !lookups.facts.contains_key(&key) {
            lookups.facts.insert(key.clone(), self.store.dataset_facts(&dataset.reference).await?);
        }
        if let Some(facts) = &lookups.facts[&key] {
            if let Some(verdict) = facts.check_labels(spec, &dataset.file_name) {
                return Ok(verdict?);
            }
        }
        let blob = self
            .store
            .dataset_blob(&dataset.reference)
            .await?
            .ok_or_else(|| Error::Internal(format!("dataset {} has no stored bytes", dataset.reference)))?;
        let mut check = LabelCheck::new(spec, &dataset.file_name);
        let mut chunks = blob::read(self.store.clone(), blob, dataset.size);
        while let Some(chunk) = chunks.next().await {
            check.feed(&chunk?)?;
        }
        Ok(check.finish()?)
    }
}

//! What the training loop asks of a task: a job's model and data, set up
//! by its task ([`TaskRun`]), and what an evaluation gives back.

use std::path::Path;

use ptune_core::{JobSpec, Metric};
use serde_json::Value;
use tch::{nn, Tensor};

use crate::engine::error::EngineError;
use crate::engine::rng::DropoutStream;

/// What the training loop needs of a job's model and data, whatever the task.
pub(crate) trait TaskRun {
    fn train_len(&self) -> usize;
    fn eval_len(&self) -> usize;
    /// Forward and backward pass over the job's batch of `plan`, alone,
    /// with dropout drawn from the plan's stream where the task supports it;
    /// returns the batch's mean loss, detached.
    fn backward(&self, plan: &PlannedStep) -> Tensor;
    /// How many terms the mean training loss of the examples `indices`
    /// averages: one per example, or per labelled token for a task whose
    /// loss is a mean over tokens. A data-parallel rank weights its share's
    /// mean loss by its share of the batch's terms.
    fn loss_terms(&self, indices: &[usize]) -> usize {
        indices.len()
    }
    /// Evaluates every evaluation example, without gradients.
    fn evaluate(&self, step: u64) -> Result<TaskEvaluation, EngineError>;
    /// Writes the export of the job's variables `vars` into `out_dir`.
    fn export(&self, out_dir: &Path, vars: &nn::VarStore, provenance: &Value) -> Result<(), EngineError>;
}

/// Metrics of one evaluation, and the prediction for each evaluation example
/// in file order (a label, a list of tags with `null` for words cut by
/// truncation, or a generated text).
pub struct TaskEvaluation {
    pub metrics: Vec<Metric>,
    pub predictions: Vec<Value>,
}

/// Batch size of evaluations ([`JobSpec::eval_batch_size`], which the
/// memory estimate counts too).
pub(crate) fn eval_batch_size(spec: &JobSpec) -> usize {
    spec.eval_batch_size() as usize
}

/// One step's plan: its examples, learning-rate factor, dropout stream and
/// the factor its loss is multiplied by before the backward pass (1 but
/// for a float16 base, see `loss_scale.rs`).
pub(crate) struct PlannedStep {
    pub indices: Vec<usize>,
    pub lr_factor: f64,
    pub stream: DropoutStream,
    pub loss_scale: f64,
}

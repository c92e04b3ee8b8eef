//! Resume checkpoints, kept apart from exports: everything a run needs to
//! continue exactly where it was, in a folder of two files.
//!
//! - `state.safetensors`: the job's variables (`model.` + their names: the
//!   adapter, its encoder, the head) and AdamW's moments (`optimizer.`).
//! - `trainer_state.json`: the step reached (which fixes the scheduler's
//!   position and the data order position: batches are drawn from a
//!   generator seeded by the job's seed, so a resumed run skips the batches
//!   already taken), the last evaluation, and a digest of the spec.
//!
//! The random state needs no capture: the training loop reseeds libtorch's
//! generator from (seed, step) before every step, so dropout at step k+1 is
//! the same whether or not the run stopped at step k.
//!
//! A checkpoint is written into a sibling folder (`.NAME.saving`), each file
//! flushed to the disk, then the old folder is renamed aside
//! (`.NAME.previous`), the new one into place, and the old one removed,
//! each rename flushed. A process killed at any point leaves a whole
//! checkpoint: the old one, the new one, or, when it died between the two
//! renames, one of the siblings, which [`recover`] puts back before the
//! folder is read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ptune_core::{JobSpec, Metric};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{nn, Tensor};

use super::error::EngineError;
use super::export::write_safetensors;
use super::models::safetensors::read_tensors;
use super::optim::AdamW;
use super::train::loss_scale::LossScaler;

pub const STATE_FILE: &str = "state.safetensors";
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const FORMAT: u32 = 1;

/// What `trainer_state.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: u32,
    /// Optimizer steps taken.
    pub step: u64,
    pub total_steps: u64,
    /// sha256 of the spec's training-relevant fields ([`spec_digest`]): a
    /// checkpoint only resumes the job it was written for.
    pub spec_sha256: String,
    /// Metrics of the last evaluation, at or before `step`.
    pub last_eval: Vec<Metric>,
    /// The loss scaler of a job on a float16 base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScaler>,
}

/// Digest of everything in `spec` that changes the computation: all but the
/// name, owner and attempt limit.
pub fn spec_digest(spec: &JobSpec) -> String {
    let mut json = spec.to_json();
    if let Some(fields) = json.as_object_mut() {
        for key in ["name", "owner", "max_attempts"] {
            fields.remove(key);
        }
    }
    hex::encode(Sha256::digest(json.to_string().as_bytes()))
}

/// True when `dir` holds a complete checkpoint (after [`recover`]).
pub fn exists(dir: &Path) -> bool {
    recover(dir);
    complete(dir)
}

/// Both files present and the trainer state readable (it is written last).
fn complete(dir: &Path) -> bool {
    dir.join(STATE_FILE).is_file()
        && std::fs::read(dir.join(TRAINER_STATE_FILE))
            .ok()
            .is_some_and(|text| serde_json::from_slice::<TrainerState>(&text).is_ok())
}

/// Puts back the checkpoint of a save that was cut off between its two
/// renames: the new one (`.saving`, complete once its trainer state is
/// there) or else the old one (`.previous`).
pub fn recover(dir: &Path) {
    if complete(dir) {
        return;
    }
    for candidate in [sibling(dir, "saving"), sibling(dir, "previous")] {
        if complete(&candidate) {
            let _ = std::fs::remove_dir_all(dir);
            match crate::durable::rename(&candidate, dir) {
                Ok(()) => tracing::warn!(checkpoint = %dir.display(), from = %candidate.display(),
                                        "recovered a checkpoint whose save was cut off"),
                Err(e) => tracing::warn!(checkpoint = %dir.display(), error = %e, "cannot recover a checkpoint"),
            }
            return;
        }
    }
}

/// Writes a checkpoint of `vars` and `optimizer` at `state.step` into `dir`,
/// replacing the one there, durably (see the module documentation). `job`
/// names the run for the fault-injection hooks.
pub fn save(
    dir: &Path,
    state: &TrainerState,
    vars: &nn::VarStore,
    optimizer: &AdamW,
    job: &str,
) -> Result<(), EngineError> {
    recover(dir);
    let staging = sibling(dir, "saving");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| EngineError::io(&staging, e))?;
    let mut tensors: Vec<(String, Tensor)> =
        vars.variables().into_iter().map(|(name, tensor)| (format!("model.{name}"), tensor)).collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors.extend(optimizer.state_tensors());
    let written = write_safetensors(&staging.join(STATE_FILE), &tensors).and_then(|()| {
        crate::faults::at(crate::faults::Point::Checkpoint, job, state.step).map_err(|e| EngineError::io(&staging, e))?;
        let json = serde_json::to_vec_pretty(state).expect("trainer state serializes");
        let path = staging.join(TRAINER_STATE_FILE);
        crate::durable::write(&path, &json).map_err(|e| EngineError::io(&path, e))
    });
    if let Err(e) = written {
        // The checkpoint in `dir` is untouched.
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }

    let previous = sibling(dir, "previous");
    let _ = std::fs::remove_dir_all(&previous);
    if dir.exists() {
        crate::durable::rename(dir, &previous).map_err(|e| EngineError::io(dir, e))?;
    }
    crate::durable::rename(&staging, dir).map_err(|e| EngineError::io(dir, e))?;
    let _ = std::fs::remove_dir_all(&previous);
    Ok(())
}

/// Reads the checkpoint in `dir` into `vars` and `optimizer` (built for
/// `spec` the same way as when it was saved) and returns its state. A
/// checkpoint of another spec, or one whose tensors do not fit, is refused
/// with the reason.
pub fn load(dir: &Path, spec: &JobSpec, vars: &nn::VarStore, optimizer: &mut AdamW) -> Result<TrainerState, EngineError> {
    let refuse = |message: String| EngineError::Model(format!("checkpoint {}: {message}", dir.display()));
    recover(dir);
    let path = dir.join(TRAINER_STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| refuse(format!("{TRAINER_STATE_FILE}: {e}")))?;
    if state.format != FORMAT {
        return Err(refuse(format!("format {} is not {FORMAT}", state.format)));
    }
    if state.spec_sha256 != spec_digest(spec) {
        return Err(refuse("it was written for a different job spec; resume with the spec that wrote it".into()));
    }
    let path = dir.join(STATE_FILE);
    let device = vars.device();
    let saved: HashMap<String, Tensor> =
        read_tensors(&path, device).map_err(|e| refuse(format!("cannot read {STATE_FILE}: {e}")))?;
    // Everything is checked before anything is copied, so a refused
    // checkpoint leaves the freshly initialised run untouched.
    let variables = vars.variables();
    for (name, variable) in &variables {
        let key = format!("model.{name}");
        let tensor = saved.get(&key).ok_or_else(|| refuse(format!("no tensor {key}")))?;
        if tensor.size() != variable.size() {
            return Err(refuse(format!("{key} has shape {:?}, expected {:?}", tensor.size(), variable.size())));
        }
    }
    let model_tensors = saved.keys().filter(|k| k.starts_with("model.")).count();
    if model_tensors != variables.len() {
        return Err(refuse(format!("{model_tensors} model tensors saved, expected {}", variables.len())));
    }
    optimizer.check_state(&saved).map_err(refuse)?;
    for (name, variable) in &variables {
        let mut variable = variable.shallow_clone();
        tch::no_grad(|| variable.copy_(&saved[&format!("model.{name}")]));
    }
    optimizer.load_state(state.step, &saved).map_err(refuse)?;
    Ok(state)
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir.file_name().map_or_else(|| "checkpoint".into(), |n| n.to_string_lossy().into_owned());
    dir.with_file_name(format!(".{name}.{suffix}"))
}

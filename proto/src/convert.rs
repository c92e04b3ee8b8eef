//! `TryFrom` conversions between prost messages and domain types. A missing or
//! bad field yields a [`SpecError`] that names it.

use ptune_core::spec::defaults;
use ptune_core::sweep::{AlgorithmKind, Direction, SweepState, TrialState};
use ptune_core::{
    DataConfig, EncoderType, GenerationConfig, HeadConfig, JobSpec, JobState, Method, Metric, MetricKind, PeftConfig, Pooling, Precision, PromptInit, SpecError, Task,
    TrainingConfig,
};

use crate::v1;

impl From<Method> for v1::Method {
    fn from(m: Method) -> Self {
        match m {
            Method::PromptTuning => v1::Method::PromptTuning,
            Method::PTuning => v1::Method::PTuning,
            Method::PrefixTuning => v1::Method::PrefixTuning,
            Method::PTuningV2 => v1::Method::PTuningV2,
            Method::Lora => v1::Method::Lora,
            Method::Full => v1::Method::Full,
        }
    }
}

/// The domain method of a wire value; `None` for unspecified.
pub fn method_from_wire(value: i32) -> Result<Option<Method>, SpecError> {
    let method = v1::Method::try_from(value)
        .map_err(|_| SpecError::new("method", format!("unknown method number {value}")))?;
    Ok(match method {
        v1::Method::Unspecified => None,
        v1::Method::PromptTuning => Some(Method::PromptTuning),
        v1::Method::PTuning => Some(Method::PTuning),
        v1::Method::PrefixTuning => Some(Method::PrefixTuning),
        v1::Method::PTuningV2 => Some(Method::PTuningV2),
        v1::Method::Lora => Some(Method::Lora),
        v1::Method::Full => Some(Method::Full),
    })
}

impl From<Task> for v1::Task {
    fn from(t: Task) -> Self {
        match t {
            Task::SequenceClassification => v1::Task::SequenceClassification,
            Task::TokenClassification => v1::Task::TokenClassification,
            Task::CausalLm => v1::Task::CausalLm,
        }
    }
}

fn task_from_wire(value: i32) -> Result<Task, SpecError> {
    match v1::Task::try_from(value) {
        Ok(v1::Task::SequenceClassification) => Ok(Task::SequenceClassification),
        Ok(v1::Task::TokenClassification) => Ok(Task::TokenClassification),
        Ok(v1::Task::CausalLm) => Ok(Task::CausalLm),
        _ => Err(SpecError::new(
            "task",
            "must be one of sequence_classification, token_classification, causal_lm",
        )),
    }
}

impl From<JobState> for v1::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Queued => v1::JobState::Queued,
            JobState::Running => v1::JobState::Running,
            JobState::Succeeded => v1::JobState::Succeeded,
            JobState::Failed => v1::JobState::Failed,
            JobState::Cancelled => v1::JobState::Cancelled,
        }
    }
}

/// The domain state of a wire value; `None` for unspecified.
pub fn state_from_wire(value: i32) -> Result<Option<JobState>, SpecError> {
    Ok(match v1::JobState::try_from(value) {
        Ok(v1::JobState::Unspecified) => None,
        Ok(v1::JobState::Queued) => Some(JobState::Queued),
        Ok(v1::JobState::Running) => Some(JobState::Running),
        Ok(v1::JobState::Succeeded) => Some(JobState::Succeeded),
        Ok(v1::JobState::Failed) => Some(JobState::Failed),
        Ok(v1::JobState::Cancelled) => Some(JobState::Cancelled),
        Err(_) => return Err(SpecError::new("states", format!("unknown job state number {value}"))),
    })
}

impl From<PromptInit> for v1::PromptInit {
    fn from(p: PromptInit) -> Self {
        match p {
            PromptInit::Random => v1::PromptInit::Random,
            PromptInit::Vocab => v1::PromptInit::Vocab,
            PromptInit::Text => v1::PromptInit::Text,
        }
    }
}

impl From<&JobSpec> for v1::JobSpec {
    fn from(s: &JobSpec) -> Self {
        v1::JobSpec {
            name: s.name.clone(),
            base_model: s.base_model.clone(),
            task: v1::Task::from(s.task) as i32,
            method: v1::Method::from(s.method) as i32,
            peft: Some(v1::PeftConfig {
                num_virtual_tokens: Some(s.peft.num_virtual_tokens),
                init: v1::PromptInit::from(s.peft.init) as i32,
                init_text: s.peft.init_text.clone().unwrap_or_default(),
                encoder_reparameterization_type: s.peft.encoder_reparameterization_type.map(|e| e.as_str().to_string()),
                encoder_hidden_size: s.peft.encoder_hidden_size,
                encoder_num_layers: s.peft.encoder_num_layers,
                encoder_dropout: s.peft.encoder_dropout,
                prefix_projection: s.peft.prefix_projection,
                prefix_dropout: s.peft.prefix_dropout,
                r: s.peft.r,
                lora_alpha: s.peft.lora_alpha,
                lora_dropout: s.peft.lora_dropout,
                target_modules: s.peft.target_modules.clone().unwrap_or_default(),
            }),
            data: Some(v1::DataConfig {
                train: s.data.train.clone(),
                eval: s.data.eval.clone(),
                text_field: s.data.text_field.clone(),
                label_field: s.data.label_field.clone(),
                labels: s.data.labels.clone(),
                max_seq_len: s.data.max_seq_len,
                max_train_examples: s.data.max_train_examples,
                max_eval_examples: s.data.max_eval_examples,
                references_field: s.data.references_field.clone(),
            }),
            generation: s.generation.as_ref().map(|g| v1::GenerationConfig {
                max_new_tokens: Some(g.max_new_tokens),
                num_beams: Some(g.num_beams),
            }),
            training: Some(v1::TrainingConfig {
                learning_rate: s.training.learning_rate,
                batch_size: s.training.batch_size,
                epochs: s.training.epochs,
                max_steps: s.training.max_steps,
                warmup_ratio: s.training.warmup_ratio,
                weight_decay: s.training.weight_decay,
                eval_every: s.training.eval_every,
                seed: Some(s.training.seed),
                head_learning_rate: s.training.head_learning_rate.unwrap_or(0.0),
                checkpoint_every: s.training.checkpoint_every,
                stall_timeout_seconds: s.training.stall_timeout_seconds,
                precision: s.training.precision.as_str().to_string(),
                devices: s.training.devices,
            }),
            max_attempts: s.max_attempts,
            owner: s.owner.clone(),
            head: (!s.head.is_default()).then(|| v1::HeadConfig { pooling: s.head.pooling.as_str().to_string() }),
        }
    }
}

fn or_default<T: PartialEq + Default>(value: T, default: T) -> T {
    if value == T::default() {
        default
    } else {
        value
    }
}

impl TryFrom<v1::JobSpec> for JobSpec {
    type Error = SpecError;

    /// Zero values stand for "use the default", as proto3 cannot tell them apart.
    fn try_from(s: v1::JobSpec) -> Result<Self, SpecError> {
        let method = method_from_wire(s.method)?.ok_or_else(|| {
            SpecError::new("method", "must be set; allowed: prompt_tuning, p_tuning, prefix_tuning, p_tuning_v2, lora, full")
        })?;
        let task = task_from_wire(s.task)?;
        let peft = s.peft.unwrap_or_default();
        let data = s.data.ok_or_else(|| SpecError::new("data", "must be set"))?;
        let training = s.training.ok_or_else(|| SpecError::new("training", "must be set"))?;
        let init = match v1::PromptInit::try_from(peft.init) {
            Ok(v1::PromptInit::Unspecified | v1::PromptInit::Random) => PromptInit::Random,
            Ok(v1::PromptInit::Vocab) => PromptInit::Vocab,
            Ok(v1::PromptInit::Text) => PromptInit::Text,
            Err(_) => return Err(SpecError::new("peft.init", "must be random, vocab or text")),
        };
        Ok(JobSpec {
            name: s.name,
            base_model: s.base_model,
            task,
            method,
            peft: PeftConfig {
                // Unset means the default; a 0 sent for a method with virtual
                // tokens is kept, so validation reports it.
                num_virtual_tokens: peft
                    .num_virtual_tokens
                    .filter(|&n| n != 0 || method.uses_virtual_tokens())
                    .unwrap_or(defaults::NUM_VIRTUAL_TOKENS),
                init,
                init_text: Some(peft.init_text).filter(|t| !t.is_empty()),
                encoder_reparameterization_type: peft
                    .encoder_reparameterization_type
                    .map(|e| match e.trim().to_ascii_lowercase().as_str() {
                        "mlp" => Ok(EncoderType::Mlp),
                        "lstm" => Ok(EncoderType::Lstm),
                        _ => Err(SpecError::new(
                            "peft.encoder_reparameterization_type",
                            format!("must be mlp or lstm, got {e:?}"),
                        )),
                    })
                    .transpose()?,
                encoder_hidden_size: peft.encoder_hidden_size,
                encoder_num_layers: peft.encoder_num_layers,
                encoder_dropout: peft.encoder_dropout,
                prefix_projection: peft.prefix_projection,
                prefix_dropout: peft.prefix_dropout,
                r: peft.r,
                lora_alpha: peft.lora_alpha,
                lora_dropout: peft.lora_dropout,
                target_modules: Some(peft.target_modules).filter(|m| !m.is_empty()),
            },
            data: DataConfig {
                train: data.train,
                eval: data.eval,
                text_field: or_default(data.text_field, defaults::TEXT_FIELD.into()),
                label_field: or_default(data.label_field, defaults::LABEL_FIELD.into()),
                labels: data.labels,
                max_seq_len: or_default(data.max_seq_len, defaults::MAX_SEQ_LEN),
                max_train_examples: data.max_train_examples,
                max_eval_examples: data.max_eval_examples,
                references_field: data.references_field,
            },
            generation: s.generation.map(|g| {
                GenerationConfig {
                    max_new_tokens: g.max_new_tokens.unwrap_or(defaults::MAX_NEW_TOKENS),
                    num_beams: g.num_beams.unwrap_or(defaults::NUM_BEAMS),
                }
            }),
            training: TrainingConfig {
                learning_rate: training.learning_rate,
                batch_size: or_default(training.batch_size, defaults::BATCH_SIZE),
                epochs: or_default(training.epochs, defaults::EPOCHS),
                max_steps: training.max_steps,
                warmup_ratio: training.warmup_ratio,
                weight_decay: training.weight_decay,
                eval_every: training.eval_every,
                seed: training.seed.unwrap_or(defaults::SEED),
                head_learning_rate: Some(training.head_learning_rate).filter(|lr| *lr != 0.0),
                checkpoint_every: training.checkpoint_every,
                stall_timeout_seconds: training.stall_timeout_seconds,
                precision: match training.precision.trim() {
                    "" => Precision::Fp32,
                    precision => precision.parse().map_err(|e: String| SpecError::new("training.precision", e))?,
                },
                devices: training.devices.max(1),
            },
            head: HeadConfig {
                pooling: match s.head.map(|h| h.pooling).filter(|p| !p.trim().is_empty()) {
                    Some(pooling) => pooling.parse().map_err(|e: String| SpecError::new("head.pooling", e))?,
                    None => Pooling::Cls,
                },
            },
            max_attempts: or_default(s.max_attempts, defaults::MAX_ATTEMPTS),
            owner: s.owner,
        })
    }
}

impl From<&Metric> for v1::Metric {
    fn from(m: &Metric) -> Self {
        v1::Metric { step: m.step, kind: m.kind.as_str().to_string(), name: m.name.clone(), value: m.value }
    }
}

impl TryFrom<v1::Metric> for Metric {
    type Error = SpecError;

    fn try_from(m: v1::Metric) -> Result<Self, SpecError> {
        let kind: MetricKind = m.kind.parse().map_err(|e: String| SpecError::new("metrics.kind", e))?;
        if m.name.is_empty() || m.name.len() > 64 || !m.name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c)) {
            return Err(SpecError::new("metrics.name", "must be 1 to 64 letters, digits, '_', '.', '-' or '/'"));
        }
        Ok(Metric { step: m.step, kind, name: m.name, value: m.value })
    }
}

impl From<SweepState> for v1::SweepState {
    fn from(s: SweepState) -> Self {
        match s {
            SweepState::Running => v1::SweepState::Running,
            SweepState::Completed => v1::SweepState::Completed,
            SweepState::Cancelled => v1::SweepState::Cancelled,
            SweepState::Failed => v1::SweepState::Failed,
        }
    }
}

/// The domain sweep state of a wire value; `None` for unspecified.
pub fn sweep_state_from_wire(value: i32) -> Result<Option<SweepState>, SpecError> {
    Ok(match v1::SweepState::try_from(value) {
        Ok(v1::SweepState::Unspecified) => None,
        Ok(v1::SweepState::Running) => Some(SweepState::Running),
        Ok(v1::SweepState::Completed) => Some(SweepState::Completed),
        Ok(v1::SweepState::Cancelled) => Some(SweepState::Cancelled),
        Ok(v1::SweepState::Failed) => Some(SweepState::Failed),
        Err(_) => return Err(SpecError::new("states", format!("unknown sweep state number {value}"))),
    })
}

impl From<TrialState> for v1::TrialState {
    fn from(s: TrialState) -> Self {
        match s {
            TrialState::Queued => v1::TrialState::Queued,
            TrialState::Running => v1::TrialState::Running,
            TrialState::Succeeded => v1::TrialState::Succeeded,
            TrialState::EarlyStopped => v1::TrialState::EarlyStopped,
            TrialState::Failed => v1::TrialState::Failed,
            TrialState::Cancelled => v1::TrialState::Cancelled,
        }
    }
}

/// The domain trial state of a wire value; `None` for unspecified or unknown.
pub fn trial_state_from_wire(value: i32) -> Option<TrialState> {
    match v1::TrialState::try_from(value).ok()? {
        v1::TrialState::Unspecified => None,
        v1::TrialState::Queued => Some(TrialState::Queued),
        v1::TrialState::Running => Some(TrialState::Running),
        v1::TrialState::Succeeded => Some(TrialState::Succeeded),
        v1::TrialState::EarlyStopped => Some(TrialState::EarlyStopped),
        v1::TrialState::Failed => Some(TrialState::Failed),
        v1::TrialState::Cancelled => Some(TrialState::Cancelled),
    }
}

impl From<AlgorithmKind> for v1::SweepAlgorithm {
    fn from(a: AlgorithmKind) -> Self {
        match a {
            AlgorithmKind::Grid => v1::SweepAlgorithm::Grid,
            AlgorithmKind::Random => v1::SweepAlgorithm::Random,
            AlgorithmKind::Asha => v1::SweepAlgorithm::Asha,
        }
    }
}

/// The algorithm's name for a wire value (`"unknown"` when unspecified).
pub fn algorithm_name(value: i32) -> &'static str {
    match v1::SweepAlgorithm::try_from(value) {
        Ok(v1::SweepAlgorithm::Grid) => AlgorithmKind::Grid.as_str(),
        Ok(v1::SweepAlgorithm::Random) => AlgorithmKind::Random.as_str(),
        Ok(v1::SweepAlgorithm::Asha) => AlgorithmKind::Asha.as_str(),
        _ => "unknown",
    }
}

impl From<Direction> for v1::ObjectiveDirection {
    fn from(d: Direction) -> Self {
        match d {
            Direction::Maximize => v1::ObjectiveDirection::Maximize,
            Direction::Minimize => v1::ObjectiveDirection::Minimize,
        }
    }
}

/// The domain direction of a wire value; `None` for unspecified.
pub fn direction_from_wire(value: i32) -> Option<Direction> {
    match v1::ObjectiveDirection::try_from(value).ok()? {
        v1::ObjectiveDirection::Maximize => Some(Direction::Maximize),
        v1::ObjectiveDirection::Minimize => Some(Direction::Minimize),
        v1::ObjectiveDirection::Unspecified => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every example job, and so every method's settings, survives the trip
    /// through the wire format unchanged: a submitted job trains with the
    /// settings its author wrote.
    #[test]
    fn every_example_job_round_trips_through_the_wire_format() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/jobs") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read example");
            let spec = JobSpec::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let back = JobSpec::try_from(v1::JobSpec::from(&spec)).expect("back from the wire");
            assert_eq!(back, spec, "{}: the whole spec comes back", path.display());
            checked += 1;
        }
        assert!(checked >= 7, "expected a spec per method in {}", dir.display());
    }

    /// A field left out gets the same default from TOML as from a gRPC
    /// client that leaves it unset (zero): the seed, batch size, epochs,
    /// sequence length, field names, prompt length, generation and attempts.
    #[test]
    fn a_spec_with_only_its_required_fields_means_the_same_from_toml_and_from_the_wire() {
        let toml = r#"
name = "minimal"
base_model = "all-MiniLM-L6-v2"
task = "sequence_classification"
method = "prompt_tuning"
[data]
train = "sha256:aa"
eval = "sha256:bb"
labels = ["0", "1"]
[training]
learning_rate = 0.03
"#;
        let from_toml = JobSpec::from_toml(toml).expect("a valid minimal spec");
        let wire = v1::JobSpec {
            name: "minimal".into(),
            base_model: "all-MiniLM-L6-v2".into(),
            task: v1::Task::SequenceClassification as i32,
            method: v1::Method::PromptTuning as i32,
            data: Some(v1::DataConfig {
                train: "sha256:aa".into(),
                eval: "sha256:bb".into(),
                labels: vec!["0".into(), "1".into()],
                ..Default::default()
            }),
            training: Some(v1::TrainingConfig { learning_rate: 0.03, ..Default::default() }),
            ..Default::default()
        };
        let from_wire = JobSpec::try_from(wire).expect("the same spec from the wire");
        assert_eq!(from_wire, from_toml);
        assert_eq!(from_wire.training.seed, defaults::SEED);
        let mut zero = v1::JobSpec::from(&from_toml);
        zero.training.as_mut().unwrap().seed = Some(0);
        assert_eq!(JobSpec::try_from(zero).unwrap().training.seed, 0, "seed 0 can be asked for");
    }

    /// A bf16 or fp16 job keeps its precision through the wire; a client
    /// that leaves the field unset asks for fp32, and a misspelt one is
    /// refused naming the field.
    #[test]
    fn precision_round_trips_and_an_unknown_one_names_the_field() {
        let mut spec = JobSpec::try_from(example_on_the_wire("sst2-prompt-tuning.toml")).expect("example");
        for precision in [Precision::Bf16, Precision::Fp16, Precision::Fp32] {
            spec.training.precision = precision;
            let wire = v1::JobSpec::from(&spec);
            assert_eq!(wire.training.as_ref().map(|t| t.precision.as_str()), Some(precision.as_str()));
            assert_eq!(JobSpec::try_from(wire).expect("back from the wire"), spec);
        }
        let mut wire = v1::JobSpec::from(&spec);
        wire.training.as_mut().expect("training").precision = String::new();
        assert_eq!(JobSpec::try_from(wire.clone()).expect("unset").training.precision, Precision::Fp32);
        wire.training.as_mut().expect("training").precision = "int8".into();
        let err = JobSpec::try_from(wire).expect_err("int8 is not a precision");
        assert!(err.to_string().starts_with("training.precision: unknown precision \"int8\""), "{err}");
    }

    /// `examples/jobs/<name>` as a client puts it on the wire.
    fn example_on_the_wire(name: &str) -> v1::JobSpec {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs").join(name);
        let text = std::fs::read_to_string(path).expect("read example");
        v1::JobSpec::from(&JobSpec::from_toml(&text).expect("valid example"))
    }

    #[test]
    fn an_unknown_pooling_names_the_field() {
        let mut wire = example_on_the_wire("sst2-prompt-tuning.toml");
        wire.head = Some(v1::HeadConfig { pooling: "max".into() });
        let err = JobSpec::try_from(wire).expect_err("max is not a pooling");
        assert!(err.to_string().starts_with("head.pooling: unknown pooling \"max\""), "{err}");
    }

    #[test]
    fn an_unknown_encoder_type_names_the_field() {
        let mut wire = example_on_the_wire("sst2-p-tuning-lstm.toml");
        wire.peft.as_mut().expect("peft").encoder_reparameterization_type = Some("gru".into());
        let err = JobSpec::try_from(wire).expect_err("gru is not an encoder");
        assert!(err.to_string().contains("peft.encoder_reparameterization_type"), "{err}");
    }
}

//! Checking a spec: every field against its bounds, the settings each
//! method and task allows, and (when a worker reported them) the base
//! model's limits. Each refusal names the field and what is allowed.

use super::kinds::{EncoderType, Method, Pooling, Precision, PromptInit, Task};
use super::limits::{MAX_BATCH_SIZE, MAX_DEVICES, MAX_EXAMPLES, MAX_LABELS, MAX_STEPS, MAX_TOKENS, STALL_TIMEOUT_SECONDS};
use super::parse::{join, join_or};
use super::sections::*;
use super::{JobSpec, ModelLimits, SpecError};
use crate::bounds;

impl JobSpec {
    /// Checks every field that can be checked without reading the data.
    /// `limits` adds the model-dependent checks when the model is known.
    pub fn validate(&self, limits: Option<&ModelLimits>) -> Result<(), SpecError> {
        let name_len = self.name.chars().count();
        if name_len == 0 || name_len > 128 {
            return Err(SpecError::new("name", format!("must be 1 to 128 characters, got {name_len}")));
        }
        if self.base_model.trim().is_empty() {
            return Err(SpecError::new("base_model", "must name a base model served by a worker"));
        }
        self.validate_bounds()?;
        if !Task::SUPPORTED.contains(&self.task) {
            return Err(SpecError::new(
                "task",
                format!("{} is not supported yet; supported: {}", self.task, join(&Task::SUPPORTED)),
            ));
        }
        if !Method::SUPPORTED.contains(&self.method) {
            return Err(SpecError::new(
                "method",
                format!("{} is not supported yet; supported: {}", self.method, join(&Method::SUPPORTED)),
            ));
        }
        if self.task == Task::CausalLm && !Method::CAUSAL_LM.contains(&self.method) {
            return Err(SpecError::new(
                "method",
                format!(
                    "{} is not supported for causal_lm yet; supported: {}",
                    self.method,
                    join(&Method::CAUSAL_LM)
                ),
            ));
        }
        self.validate_generation()?;
        if self.head.pooling != Pooling::Cls && self.task != Task::SequenceClassification {
            return Err(SpecError::new(
                "head.pooling",
                format!("only applies to task sequence_classification; this job's task is {}", self.task),
            ));
        }
        self.validate_peft()?;
        self.validate_data(limits)?;
        self.validate_training()?;
        if self.max_attempts == 0 || self.max_attempts > 100 {
            return Err(SpecError::new(
                "max_attempts",
                format!("must be between 1 and 100, got {}", self.max_attempts),
            ));
        }
        Ok(())
    }

    /// The length and character set of every text, and the range of every
    /// count, so that no request can store a value the rest cannot handle.
    fn validate_bounds(&self) -> Result<(), SpecError> {
        bounds::line("name", &self.name, 128)?;
        bounds::folder_name("base_model", &self.base_model)?;
        if !self.owner.is_empty() {
            bounds::line("owner", &self.owner, 64)?;
        }
        let data = &self.data;
        bounds::line("data.train", &data.train, 4096)?;
        bounds::line("data.eval", &data.eval, 4096)?;
        bounds::line("data.text_field", &data.text_field, 128)?;
        bounds::line("data.label_field", &data.label_field, 128)?;
        if let Some(field) = &data.references_field {
            bounds::line("data.references_field", field, 128)?;
        }
        if data.labels.len() > MAX_LABELS {
            return Err(SpecError::new("data.labels", format!("at most {MAX_LABELS} labels, got {}", data.labels.len())));
        }
        for (i, label) in data.labels.iter().enumerate() {
            bounds::line(&format!("data.labels[{i}]"), label, 256)?;
        }
        for (field, examples) in [("data.max_train_examples", data.max_train_examples), ("data.max_eval_examples", data.max_eval_examples)] {
            if examples > MAX_EXAMPLES {
                return Err(SpecError::new(field, format!("must be at most {MAX_EXAMPLES} (0: all), got {examples}")));
            }
        }
        if let Some(text) = &self.peft.init_text {
            bounds::paragraph("peft.init_text", text, 4096)?;
        }
        let t = &self.training;
        for (field, steps) in
            [("training.max_steps", t.max_steps), ("training.eval_every", t.eval_every), ("training.checkpoint_every", t.checkpoint_every)]
        {
            if steps > MAX_STEPS {
                return Err(SpecError::new(field, format!("must be at most {MAX_STEPS}, got {steps}")));
            }
        }
        if !(t.epochs.is_finite() && (0.0..=1000.0).contains(&t.epochs)) {
            return Err(SpecError::new("training.epochs", format!("must be between 0 and 1000, got {}", t.epochs)));
        }
        Ok(())
    }

    fn validate_generation(&self) -> Result<(), SpecError> {
        let Some(generation) = &self.generation else { return Ok(()) };
        if self.task != Task::CausalLm {
            return Err(SpecError::new("generation", format!("only applies to task causal_lm; this job's task is {}", self.task)));
        }
        check_range("generation.max_new_tokens", generation.max_new_tokens, 1, MAX_TOKENS)?;
        check_range("generation.num_beams", generation.num_beams, 1, MAX_BEAMS)
    }

    fn validate_peft(&self) -> Result<(), SpecError> {
        let peft = &self.peft;
        let method = self.method;
        let nvt = peft.num_virtual_tokens;
        if method.uses_virtual_tokens() && !(1..=MAX_TOKENS).contains(&nvt) {
            return Err(SpecError::new(
                "peft.num_virtual_tokens",
                format!("prompt length must be between 1 and {MAX_TOKENS}, got {nvt}"),
            ));
        }
        let only_for = |field: &str, set: bool, methods: &[Method]| {
            if set && !methods.contains(&method) {
                return Err(SpecError::new(
                    format!("peft.{field}"),
                    format!("only applies to method {}; this job's method is {method}", join_or(methods)),
                ));
            }
            Ok(())
        };
        only_for("init", peft.init != PromptInit::Random, &[Method::PromptTuning])?;
        only_for("init_text", peft.init_text.is_some(), &[Method::PromptTuning])?;
        if peft.init == PromptInit::Text && peft.init_text.as_deref().is_none_or(|t| t.trim().is_empty()) {
            return Err(SpecError::new("peft.init_text", "must be a non-empty text when peft.init is \"text\""));
        }

        only_for("encoder_reparameterization_type", peft.encoder_reparameterization_type.is_some(), &[Method::PTuning])?;
        only_for("encoder_hidden_size", peft.encoder_hidden_size.is_some(), &[Method::PTuning, Method::PrefixTuning])?;
        only_for("prefix_projection", peft.prefix_projection.is_some(), &[Method::PrefixTuning])?;
        if method == Method::PrefixTuning && peft.encoder_hidden_size.is_some() && !peft.prefix_projection() {
            return Err(SpecError::new(
                "peft.encoder_hidden_size",
                "only applies with peft.prefix_projection = true; without it the prefixes are learned directly",
            ));
        }
        if let Some(size) = peft.encoder_hidden_size {
            check_range("peft.encoder_hidden_size", size, 1, MAX_ENCODER_HIDDEN_SIZE)?;
        }
        for (field, set) in [
            ("encoder_num_layers", peft.encoder_num_layers.is_some()),
            ("encoder_dropout", peft.encoder_dropout.is_some()),
        ] {
            only_for(field, set, &[Method::PTuning])?;
            if set && peft.encoder_type() != EncoderType::Lstm {
                return Err(SpecError::new(
                    format!("peft.{field}"),
                    "only applies with peft.encoder_reparameterization_type = \"lstm\"",
                ));
            }
        }
        if let Some(layers) = peft.encoder_num_layers {
            check_range("peft.encoder_num_layers", layers, 1, 8)?;
        }
        if let Some(p) = peft.encoder_dropout {
            check_probability("peft.encoder_dropout", p)?;
        }

        only_for("prefix_dropout", peft.prefix_dropout.is_some(), &[Method::PTuningV2])?;
        if let Some(p) = peft.prefix_dropout {
            check_probability("peft.prefix_dropout", p)?;
        }

        only_for("r", peft.r.is_some(), &[Method::Lora])?;
        only_for("lora_alpha", peft.lora_alpha.is_some(), &[Method::Lora])?;
        only_for("lora_dropout", peft.lora_dropout.is_some(), &[Method::Lora])?;
        only_for("target_modules", peft.target_modules.is_some(), &[Method::Lora])?;
        if let Some(r) = peft.r {
            check_range("peft.r", r, 1, MAX_LORA_R)?;
        }
        if let Some(alpha) = peft.lora_alpha {
            if !(alpha.is_finite() && alpha > 0.0 && alpha <= 1e5) {
                return Err(SpecError::new("peft.lora_alpha", format!("must be greater than 0 and at most 100000, got {alpha}")));
            }
        }
        if let Some(p) = peft.lora_dropout {
            check_probability("peft.lora_dropout", p)?;
        }
        if let Some(targets) = &peft.target_modules {
            if targets.is_empty() || targets.len() > 32 {
                return Err(SpecError::new(
                    "peft.target_modules",
                    format!("must list 1 to 32 module names, got {}", targets.len()),
                ));
            }
            for (i, target) in targets.iter().enumerate() {
                let valid = !target.is_empty()
                    && target.split('.').all(|part| {
                        !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    });
                if !valid {
                    return Err(SpecError::new(
                        "peft.target_modules",
                        format!("{target:?} is not a module name such as \"query\" or \"attention.output.dense\""),
                    ));
                }
                if targets[..i].contains(target) {
                    return Err(SpecError::new("peft.target_modules", format!("{target:?} is listed twice")));
                }
            }
        }
        Ok(())
    }

    fn validate_data(&self, limits: Option<&ModelLimits>) -> Result<(), SpecError> {
        let data = &self.data;
        if data.train.trim().is_empty() {
            return Err(SpecError::new("data.train", "must name the training file"));
        }
        if data.eval.trim().is_empty() {
            return Err(SpecError::new("data.eval", "must name the evaluation file"));
        }
        if self.task == Task::CausalLm {
            if !data.labels.is_empty() {
                return Err(SpecError::new(
                    "data.labels",
                    "causal_lm jobs have no labels (the target text is what is learned); remove data.labels",
                ));
            }
        } else if data.labels.len() < 2 {
            return Err(SpecError::new(
                "data.labels",
                format!("must list at least 2 labels, got {}", data.labels.len()),
            ));
        }
        if self.task != Task::CausalLm && data.references_field.is_some() {
            return Err(SpecError::new("data.references_field", format!("only applies to task causal_lm; this job's task is {}", self.task)));
        }
        if let Some(field) = &data.references_field {
            if field.trim().is_empty() {
                return Err(SpecError::new("data.references_field", "must name a field"));
            }
        }
        if let Some(dup) = data.labels.iter().enumerate().find(|(i, l)| data.labels[..*i].contains(l)) {
            return Err(SpecError::new("data.labels", format!("label {:?} is listed twice", dup.1)));
        }
        if self.task == Task::TokenClassification {
            let is_tag = |tag: &str| {
                tag == "O"
                    || ["B-", "I-", "E-", "S-"]
                        .iter()
                        .any(|scheme| tag.strip_prefix(scheme).is_some_and(|kind| !kind.trim().is_empty()))
            };
            if let Some(bad) = data.labels.iter().find(|tag| !is_tag(tag)) {
                return Err(SpecError::new(
                    "data.labels",
                    format!(
                        "token_classification tags are O or B-, I-, E-, S- and an entity type (e.g. \"B-person\"); got {bad:?}"
                    ),
                ));
            }
        }
        if !(1..=MAX_TOKENS).contains(&data.max_seq_len) {
            return Err(SpecError::new(
                "data.max_seq_len",
                format!("must be between 1 and {MAX_TOKENS}, got {}", data.max_seq_len),
            ));
        }
        if let Some(limits) = limits {
            // Virtual tokens take positions (prefixes too: the real tokens'
            // positions start after them, as in transformers), and so do the
            // tokens a causal LM generates after its input.
            let prompt = if self.method.uses_virtual_tokens() { self.peft.num_virtual_tokens } else { 0 };
            let generated = if self.task == Task::CausalLm { self.generation().max_new_tokens } else { 0 };
            let total = prompt + data.max_seq_len + generated;
            if total > limits.max_positions {
                let allowed = limits.max_positions.saturating_sub(data.max_seq_len + generated);
                let and_generated = if generated > 0 {
                    format!(" plus generation.max_new_tokens {generated}")
                } else {
                    String::new()
                };
                if prompt > 0 {
                    return Err(SpecError::new(
                        "peft.num_virtual_tokens",
                        format!(
                            "prompt length {prompt} plus data.max_seq_len {}{and_generated} exceeds the {} positions of {}; \
                             use at most {allowed} virtual tokens or a shorter max_seq_len",
                            data.max_seq_len, limits.max_positions, self.base_model
                        ),
                    ));
                }
                // No virtual tokens (LoRA, full fine-tuning): the sequence
                // and the generated tokens must share the positions.
                let shorter = match limits.max_positions.saturating_sub(generated) {
                    0 => format!("generate fewer than {} tokens", limits.max_positions),
                    room if generated > 0 => format!("use a max_seq_len of at most {room} or generate fewer tokens"),
                    room => format!("use a max_seq_len of at most {room}"),
                };
                return Err(SpecError::new(
                    "data.max_seq_len",
                    format!(
                        "data.max_seq_len {}{and_generated} exceeds the {} positions of {}; {shorter}",
                        data.max_seq_len, limits.max_positions, self.base_model
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_training(&self) -> Result<(), SpecError> {
        let t = &self.training;
        let lr_ok = |lr: f64| lr.is_finite() && lr > 0.0 && lr <= 10.0;
        if !lr_ok(t.learning_rate) {
            return Err(SpecError::new(
                "training.learning_rate",
                format!("must be greater than 0 and at most 10, got {}", t.learning_rate),
            ));
        }
        if let Some(head_lr) = t.head_learning_rate {
            if !lr_ok(head_lr) {
                return Err(SpecError::new(
                    "training.head_learning_rate",
                    format!("must be greater than 0 and at most 10, got {head_lr}"),
                ));
            }
        }
        if !(1..=MAX_BATCH_SIZE).contains(&t.batch_size) {
            return Err(SpecError::new(
                "training.batch_size",
                format!("must be between 1 and {MAX_BATCH_SIZE}, got {}", t.batch_size),
            ));
        }
        if !(1..=MAX_DEVICES).contains(&t.devices) {
            return Err(SpecError::new(
                "training.devices",
                format!("must be between 1 and {MAX_DEVICES}, got {}", t.devices),
            ));
        }
        if t.devices > t.batch_size {
            return Err(SpecError::new(
                "training.devices",
                format!("must be at most training.batch_size ({}) so that every device has examples, got {}", t.batch_size, t.devices),
            ));
        }
        if t.max_steps == 0 && !(t.epochs.is_finite() && t.epochs > 0.0 && t.epochs <= 1000.0) {
            return Err(SpecError::new(
                "training.epochs",
                format!("must be greater than 0 and at most 1000 when max_steps is 0, got {}", t.epochs),
            ));
        }
        if !(0.0..=1.0).contains(&t.warmup_ratio) {
            return Err(SpecError::new(
                "training.warmup_ratio",
                format!("must be between 0 and 1, got {}", t.warmup_ratio),
            ));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(SpecError::new(
                "training.weight_decay",
                format!("must be 0 or more, got {}", t.weight_decay),
            ));
        }
        if t.precision != Precision::Fp32 && self.method == Method::Full {
            // Full fine-tuning trains the base's own weights: keeping them in
            // bf16 or fp16 would need float32 master copies, which it has not.
            return Err(SpecError::new(
                "training.precision",
                format!("{} is not supported for method full, which trains the weights themselves; use fp32", t.precision),
            ));
        }
        if t.stall_timeout_seconds != 0 && !STALL_TIMEOUT_SECONDS.contains(&t.stall_timeout_seconds) {
            return Err(SpecError::new(
                "training.stall_timeout_seconds",
                format!(
                    "must be 0 (the worker's default) or between {} and {}, got {}",
                    STALL_TIMEOUT_SECONDS.start(),
                    STALL_TIMEOUT_SECONDS.end(),
                    t.stall_timeout_seconds
                ),
            ));
        }
        Ok(())
    }
}

fn check_range(field: &str, value: u32, min: u32, max: u32) -> Result<(), SpecError> {
    if !(min..=max).contains(&value) {
        return Err(SpecError::new(field, format!("must be between {min} and {max}, got {value}")));
    }
    Ok(())
}

fn check_probability(field: &str, p: f64) -> Result<(), SpecError> {
    if !(p.is_finite() && (0.0..1.0).contains(&p)) {
        return Err(SpecError::new(field, format!("must be at least 0 and less than 1, got {p}")));
    }
    Ok(())
}

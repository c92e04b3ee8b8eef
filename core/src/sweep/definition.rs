//! Sweep definitions: parsing, validation, and the job spec of each trial.
//!
//! A definition is the sweep TOML file as JSON:
//!
//! ```toml
//! name = "sst2-grid"
//! max_concurrent_trials = 4        # default 4
//! max_failed_trials = 3            # default: no limit
//! [objective]
//! metric = "accuracy"              # an evaluation metric the worker reports
//! direction = "maximize"           # or "minimize"
//! [algorithm]
//! type = "grid"                    # grid | random | asha
//! [template]                       # a job spec; the space's values are applied to it
//! base_model = "all-MiniLM-L6-v2"
//! # ...
//! [space.peft.num_virtual_tokens]
//! values = [5, 10, 20, 50]
//! [space.training.learning_rate]
//! type = "log_uniform"
//! min = 1e-3
//! max = 3e-2
//! ```

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::asha::{AshaConfig, AshaPlan, ResourceUnit};
use super::rng::SplitMix64;
use super::space::{GridError, Params, SearchSpace};
use super::Direction;
use crate::spec::{JobSpec, ModelLimits, SpecError};

/// Most trials one sweep may plan, extensions included.
pub const MAX_TRIALS: u32 = 10_000;
/// Largest grid accepted unless `algorithm.max_trials` says otherwise.
pub const DEFAULT_GRID_CAP: u32 = 1_000;
/// Most trials of a sweep that may be queued or running at once.
pub const MAX_CONCURRENT_TRIALS: u32 = 1_000;
pub const DEFAULT_CONCURRENT_TRIALS: u32 = 4;
/// Longest sweep name (trial jobs are named `<sweep>-t<index>`).
const MAX_NAME_CHARS: usize = 100;
/// Draws tried for a configuration no earlier trial has.
const MAX_DRAWS: u64 = 1_000;

/// What the sweep optimises: an evaluation metric and a direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Objective {
    /// Name of an evaluation metric (`kind = "eval"`), e.g. `accuracy`.
    pub metric: String,
    pub direction: Direction,
}

/// How trial configurations are drawn for ASHA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    /// Like the random algorithm, from the seed.
    Random,
    /// In grid order; the space must be discrete.
    Grid,
}

/// How a sweep chooses its trials.
#[derive(Clone, Debug, PartialEq)]
pub enum Algorithm {
    /// Every configuration of a discrete space, in grid order.
    Grid { max_trials: u32 },
    /// `num_trials` configurations drawn from the space; trial `i` from a
    /// generator seeded with `(seed, i)`.
    Random { num_trials: u32, seed: u64 },
    /// Trials drawn like random (or in grid order), stopped early by ASHA.
    Asha { num_trials: u32, seed: u64, sampler: Sampler, config: AshaConfig },
}

/// The algorithm's name, as stored and shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AlgorithmKind {
    Grid,
    Random,
    Asha,
}

impl AlgorithmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlgorithmKind::Grid => "grid",
            AlgorithmKind::Random => "random",
            AlgorithmKind::Asha => "asha",
        }
    }
}

impl std::str::FromStr for AlgorithmKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "grid" => Ok(AlgorithmKind::Grid),
            "random" => Ok(AlgorithmKind::Random),
            "asha" => Ok(AlgorithmKind::Asha),
            other => Err(format!("algorithm must be grid, random or asha, got {other:?}")),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefinition {
    name: String,
    #[serde(default)]
    owner: String,
    #[serde(default)]
    description: String,
    #[serde(default = "default_concurrency")]
    max_concurrent_trials: u32,
    #[serde(default)]
    max_failed_trials: Option<u32>,
    objective: RawObjective,
    algorithm: RawAlgorithm,
    template: Map<String, Value>,
    space: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObjective {
    metric: String,
    direction: Direction,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlgorithm {
    #[serde(rename = "type")]
    kind: String,
    num_trials: Option<u32>,
    seed: Option<u64>,
    max_trials: Option<u32>,
    sampler: Option<String>,
    resource: Option<ResourceUnit>,
    min_resource: Option<f64>,
    max_resource: Option<f64>,
    reduction_factor: Option<u32>,
    num_rungs: Option<u32>,
}

fn default_concurrency() -> u32 {
    DEFAULT_CONCURRENT_TRIALS
}

/// A validated sweep definition.
#[derive(Clone, Debug)]
pub struct SweepDefinition {
    pub name: String,
    pub owner: String,
    pub description: String,
    pub max_concurrent_trials: u32,
    /// The sweep fails once more trials than this have failed; `None`: no limit.
    pub max_failed_trials: Option<u32>,
    pub objective: Objective,
    pub algorithm: Algorithm,
    /// The job spec every trial starts from (the space's values replace its fields).
    pub template: Map<String, Value>,
    pub space: SearchSpace,
    /// Every configuration in grid order, when the space is discrete and small
    /// enough to list ([`MAX_TRIALS`]).
    grid: Option<Vec<Params>>,
    /// The job spec's defaults, for conditions on fields the template leaves out.
    defaults: Value,
}

impl SweepDefinition {
    /// Parses and validates a definition: everything that can be checked
    /// without the coordinator's datasets and models, including the job spec
    /// of every grid configuration (or of the extremes of a random space).
    /// Errors name the field (`space.training.learning_rate`, `algorithm.seed`).
    pub fn from_json(value: &Value) -> Result<Self, SpecError> {
        let raw: RawDefinition = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "definition".to_string() } else { path };
            SpecError::new(field, e.inner().to_string())
        })?;
        let name_len = raw.name.chars().count();
        if name_len == 0 || name_len > MAX_NAME_CHARS {
            return Err(SpecError::new("name", format!("must be 1 to {MAX_NAME_CHARS} characters, got {name_len}")));
        }
        if !(1..=MAX_CONCURRENT_TRIALS).contains(&raw.max_concurrent_trials) {
            return Err(SpecError::new(
                "max_concurrent_trials",
                format!("must be between 1 and {MAX_CONCURRENT_TRIALS}, got {}", raw.max_concurrent_trials),
            ));
        }
        let metric = raw.objective.metric.trim().to_string();
        if metric.is_empty() || metric.len() > 64 {
            return Err(SpecError::new("objective.metric", "must name an evaluation metric (1 to 64 characters), e.g. accuracy"));
        }
        let space = SearchSpace::from_json(&raw.space)?;
        let mut definition = SweepDefinition {
            name: raw.name,
            owner: raw.owner,
            description: raw.description,
            max_concurrent_trials: raw.max_concurrent_trials,
            max_failed_trials: raw.max_failed_trials,
            objective: Objective { metric, direction: raw.objective.direction },
            algorithm: Algorithm::Grid { max_trials: 0 },
            template: raw.template,
            space,
            grid: None,
            defaults: spec_defaults(),
        };
        definition.algorithm = definition.algorithm_from(raw.algorithm)?;
        definition.validate_configs(None)?;
        Ok(definition)
    }

    fn algorithm_from(&mut self, raw: RawAlgorithm) -> Result<Algorithm, SpecError> {
        let kind: AlgorithmKind = raw.kind.parse().map_err(|e: String| SpecError::new("algorithm.type", e))?;
        let refuse = |name: &str, present: bool| {
            if present {
                Err(SpecError::new(format!("algorithm.{name}"), format!("does not apply to {}", kind.as_str())))
            } else {
                Ok(())
            }
        };
        let asha_only = [
            ("resource", raw.resource.is_some()),
            ("min_resource", raw.min_resource.is_some()),
            ("max_resource", raw.max_resource.is_some()),
            ("reduction_factor", raw.reduction_factor.is_some()),
            ("num_rungs", raw.num_rungs.is_some()),
            ("sampler", raw.sampler.is_some()),
        ];
        let num_trials = |n: Option<u32>| -> Result<Option<u32>, SpecError> {
            match n {
                Some(n) if n == 0 || n > MAX_TRIALS => Err(SpecError::new(
                    "algorithm.num_trials",
                    format!("must be between 1 and {MAX_TRIALS}, got {n}"),
                )),
                other => Ok(other),
            }
        };
        match kind {
            AlgorithmKind::Grid => {
                for (name, present) in asha_only {
                    refuse(name, present)?;
                }
                refuse("num_trials", raw.num_trials.is_some())?;
                refuse("seed", raw.seed.is_some())?;
                let cap = raw.max_trials.unwrap_or(DEFAULT_GRID_CAP);
                if cap == 0 || cap > MAX_TRIALS {
                    return Err(SpecError::new(
                        "algorithm.max_trials",
                        format!("must be between 1 and {MAX_TRIALS}, got {cap}"),
                    ));
                }
                self.grid = Some(self.enumerate(u64::from(cap), "grid search", cap)?);
                Ok(Algorithm::Grid { max_trials: cap })
            }
            AlgorithmKind::Random => {
                for (name, present) in asha_only {
                    refuse(name, present)?;
                }
                refuse("max_trials", raw.max_trials.is_some())?;
                let n = num_trials(raw.num_trials)?
                    .ok_or_else(|| SpecError::new("algorithm.num_trials", "is required for random search"))?;
                let grid = self.space.grid(&self.context(), u64::from(MAX_TRIALS)).ok();
                self.grid = grid;
                self.check_distinct(n)?;
                Ok(Algorithm::Random { num_trials: n, seed: raw.seed.unwrap_or(0) })
            }
            AlgorithmKind::Asha => {
                refuse("max_trials", raw.max_trials.is_some())?;
                let sampler = match raw.sampler.as_deref() {
                    None | Some("random") => Sampler::Random,
                    Some("grid") => Sampler::Grid,
                    Some(other) => {
                        return Err(SpecError::new(
                            "algorithm.sampler",
                            format!("must be random or grid, got {other:?}"),
                        ))
                    }
                };
                let config = AshaConfig {
                    unit: raw.resource.unwrap_or_default(),
                    min_resource: raw
                        .min_resource
                        .ok_or_else(|| SpecError::new("algorithm.min_resource", "is required for asha"))?,
                    max_resource: raw
                        .max_resource
                        .ok_or_else(|| SpecError::new("algorithm.max_resource", "is required for asha"))?,
                    reduction_factor: raw.reduction_factor.unwrap_or(3),
                    num_rungs: raw.num_rungs,
                };
                config.validate()?;
                for path in ["training.max_steps", "training.eval_every"] {
                    if self.space.parameter(path).is_some() {
                        return Err(SpecError::new(
                            format!("space.{path}"),
                            "is set by asha from algorithm.max_resource and the rungs; remove it from the space",
                        ));
                    }
                }
                if config.unit == ResourceUnit::Epochs {
                    for path in ["training.batch_size", "data.max_train_examples", "data.train"] {
                        if self.space.parameter(path).is_some() {
                            return Err(SpecError::new(
                                "algorithm.resource",
                                format!("epochs need the same steps per epoch in every trial, but the space varies {path}; use resource = \"steps\""),
                            ));
                        }
                    }
                }
                let num_trials = num_trials(raw.num_trials)?;
                let n = match sampler {
                    Sampler::Grid => {
                        let grid = self.enumerate(u64::from(MAX_TRIALS), "asha with sampler = \"grid\"", MAX_TRIALS)?;
                        let size = grid.len() as u32;
                        self.grid = Some(grid);
                        match num_trials {
                            Some(n) if n > size => {
                                return Err(SpecError::new(
                                    "algorithm.num_trials",
                                    format!("the grid has {size} configurations, fewer than num_trials {n}"),
                                ))
                            }
                            Some(n) => n,
                            None => size,
                        }
                    }
                    Sampler::Random => {
                        let n = num_trials
                            .ok_or_else(|| SpecError::new("algorithm.num_trials", "is required for asha with random sampling"))?;
                        let grid = self.space.grid(&self.context(), u64::from(MAX_TRIALS)).ok();
                        self.grid = grid;
                        self.check_distinct(n)?;
                        n
                    }
                };
                Ok(Algorithm::Asha { num_trials: n, seed: raw.seed.unwrap_or(0), sampler, config })
            }
        }
    }

    /// The grid of a discrete space, worded for `what` when there is none.
    fn enumerate(&self, cap: u64, what: &str, stated_cap: u32) -> Result<Vec<Params>, SpecError> {
        match self.space.grid(&self.context(), cap) {
            Ok(grid) => Ok(grid),
            Err(GridError::Continuous { path, kind }) => Err(SpecError::new(
                format!("space.{path}"),
                format!("{what} needs discrete values (values or int_range), got {kind}; use random or asha sampling"),
            )),
            Err(GridError::TooLarge { at_least }) => Err(SpecError::new(
                "space",
                format!(
                    "the grid has {at_least} or more configurations, more than the cap of {stated_cap} (algorithm.max_trials, at most {MAX_TRIALS}); shrink the space or use random search"
                ),
            )),
        }
    }

    /// Refuses more trials than a discrete space has distinct configurations.
    fn check_distinct(&self, n: u32) -> Result<(), SpecError> {
        match self.distinct_configs() {
            Some(size) if u64::from(n) > size => Err(SpecError::new(
                "algorithm.num_trials",
                format!("the space has only {size} distinct configurations, fewer than num_trials {n}; lower it or use grid"),
            )),
            _ => Ok(()),
        }
    }

    pub fn kind(&self) -> AlgorithmKind {
        match self.algorithm {
            Algorithm::Grid { .. } => AlgorithmKind::Grid,
            Algorithm::Random { .. } => AlgorithmKind::Random,
            Algorithm::Asha { .. } => AlgorithmKind::Asha,
        }
    }

    /// Trials the definition plans (before any extension).
    pub fn budget(&self) -> u32 {
        match &self.algorithm {
            Algorithm::Grid { .. } => self.grid.as_ref().map_or(0, |g| g.len() as u32),
            Algorithm::Random { num_trials, .. } | Algorithm::Asha { num_trials, .. } => *num_trials,
        }
    }

    /// Distinct configurations of the space when it is discrete and listable;
    /// `None` when it is unbounded for practical purposes.
    pub fn distinct_configs(&self) -> Option<u64> {
        self.grid.as_ref().map(|g| g.len() as u64)
    }

    /// True when more trials can be added after the planned ones.
    pub fn extensible(&self) -> bool {
        !matches!(self.algorithm, Algorithm::Grid { .. })
    }

    pub fn asha(&self) -> Option<&AshaConfig> {
        match &self.algorithm {
            Algorithm::Asha { config, .. } => Some(config),
            _ => None,
        }
    }

    /// The parameters of trial `index`, given the keys ([`Params::key`]) of
    /// every configuration earlier trials have. Grid order for grid sweeps;
    /// otherwise the first draw from `(seed, index, draw)` that no earlier
    /// trial has, falling back to the first unused grid configuration.
    /// `None` when no unused configuration is left.
    pub fn params_for(&self, index: u32, taken: &HashSet<String>) -> Option<Params> {
        let seed = match &self.algorithm {
            Algorithm::Grid { .. } | Algorithm::Asha { sampler: Sampler::Grid, .. } => {
                return self.grid.as_ref()?.get(index as usize).cloned();
            }
            Algorithm::Random { seed, .. } | Algorithm::Asha { seed, .. } => *seed,
        };
        let context = self.context();
        for draw in 0..MAX_DRAWS {
            let params = self.space.sample(&mut SplitMix64::for_trial(seed, u64::from(index), draw), &context);
            if !taken.contains(&params.key()) {
                return Some(params);
            }
        }
        self.grid.as_ref()?.iter().find(|p| !taken.contains(&p.key())).cloned()
    }

    /// The configurations whose job specs are checked when the sweep is
    /// created: the whole grid when there is one, else the extremes.
    pub fn validation_configs(&self) -> Vec<Params> {
        match &self.grid {
            Some(grid) => grid.clone(),
            None => self.space.extreme_configs(&self.context()),
        }
    }

    /// Checks the job spec of every validation configuration; `limits`
    /// adds the base model's checks, `plan` the ASHA settings.
    pub fn validate_configs(&self, limits: Option<&ModelLimits>) -> Result<(), SpecError> {
        let plan = match self.asha() {
            Some(c) if c.unit == ResourceUnit::Steps => Some(c.plan(None)?),
            _ => None,
        };
        for params in self.validation_configs() {
            let spec = self.trial_spec(0, &params, plan.as_ref())?;
            spec.validate(limits).map_err(|e| attribute(&e.field, e.message, &params))?;
        }
        Ok(())
    }

    /// The job spec of trial `index`: the template with `params` applied, named
    /// `<sweep>-t<index>` and owned by the sweep's owner; under ASHA,
    /// `training.max_steps` is the plan's maximum and `training.eval_every`
    /// lands on every rung. Errors name the space path or template field.
    pub fn trial_spec(&self, index: u32, params: &Params, plan: Option<&AshaPlan>) -> Result<JobSpec, SpecError> {
        let mut spec = Value::Object(self.template.clone());
        for (path, value) in &params.0 {
            set_path(&mut spec, path, value.clone())
                .map_err(|prefix| SpecError::new(format!("space.{path}"), format!("{prefix} is not a table in the template")))?;
        }
        let fixed = |e: String| SpecError::new("template", e);
        set_path(&mut spec, "name", Value::from(format!("{}-t{index}", self.name))).map_err(fixed)?;
        set_path(&mut spec, "owner", Value::from(self.owner.clone())).map_err(fixed)?;
        if let Some(plan) = plan {
            let template_every = lookup(&spec, "training.eval_every").and_then(|v| v.as_u64()).unwrap_or(0);
            set_path(&mut spec, "training.max_steps", Value::from(plan.max_steps)).map_err(fixed)?;
            set_path(&mut spec, "training.eval_every", Value::from(plan.eval_every(template_every))).map_err(fixed)?;
        }
        let spec: JobSpec = serde_path_to_error::deserialize(&spec)
            .map_err(|e| attribute(&e.path().to_string(), e.inner().to_string(), params))?;
        spec.validate(None).map_err(|e| attribute(&e.field, e.message, params))?;
        Ok(spec)
    }

    /// Looks a field up for a condition: the trial's parameters, then the
    /// template, then the job spec's defaults.
    fn context(&self) -> impl Fn(&Params, &str) -> Option<Value> + '_ {
        move |params: &Params, path: &str| {
            params
                .get(path)
                .cloned()
                .or_else(|| lookup_map(&self.template, path).cloned())
                .or_else(|| lookup(&self.defaults, path).cloned())
        }
    }
}

/// A job-spec error of a trial with `params`, renamed to the definition's
/// field: `space.<path>` when the field is searched, `template.<path>` otherwise.
pub fn trial_error(error: SpecError, params: &Params) -> SpecError {
    attribute(&error.field, error.message, params)
}

/// Names the space path when the failing field is searched, the template field otherwise.
fn attribute(path: &str, message: String, params: &Params) -> SpecError {
    if path == "." || path.is_empty() || path == "spec" {
        return SpecError::new("template", message);
    }
    let searched = params.0.keys().any(|p| path == p || path.starts_with(&format!("{p}.")));
    if searched {
        SpecError::new(format!("space.{path}"), message)
    } else {
        SpecError::new(format!("template.{path}"), message)
    }
}

/// Sets the value at a dotted path, creating missing tables; the error is
/// the prefix that exists and is not a table.
fn set_path(root: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let mut node = root;
    let mut parts = path.split('.').peekable();
    let mut walked = Vec::new();
    while let Some(part) = parts.next() {
        let Value::Object(table) = node else { return Err(walked.join(".")) };
        walked.push(part);
        if parts.peek().is_none() {
            table.insert(part.to_string(), value);
            return Ok(());
        }
        node = table.entry(part.to_string()).or_insert_with(|| Value::Object(Map::new()));
    }
    Ok(())
}

fn lookup<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(root, |node, part| node.as_object()?.get(part))
}

fn lookup_map<'a>(root: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let (first, rest) = path.split_once('.').map_or((path, None), |(a, b)| (a, Some(b)));
    let node = root.get(first)?;
    match rest {
        None => Some(node),
        Some(rest) => lookup(node, rest),
    }
}

/// The job spec's default values, without the fields that have none.
fn spec_defaults() -> Value {
    let minimal = r#"
        name = "-"
        base_model = "-"
        task = "sequence_classification"
        method = "prompt_tuning"
        [data]
        train = "-"
        eval = "-"
        labels = ["-"]
        [training]
        learning_rate = 1
    "#;
    let mut defaults = JobSpec::from_toml(minimal).expect("the minimal spec parses").to_json();
    for path in ["name", "base_model", "task", "method", "data.train", "data.eval", "data.labels", "training.learning_rate"] {
        let (parent, key) = path.rsplit_once('.').map_or((None, path), |(p, k)| (Some(p), k));
        let table = match parent {
            None => defaults.as_object_mut(),
            Some(p) => p.split('.').try_fold(&mut defaults, |node, part| node.get_mut(part)).and_then(Value::as_object_mut),
        };
        if let Some(table) = table {
            table.remove(key);
        }
    }
    defaults
}

#[cfg(test)]
mod tests;

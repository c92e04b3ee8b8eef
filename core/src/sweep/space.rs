//! Search spaces: which values each job field takes across a sweep's trials.
//!
//! A space maps dotted job-spec paths (`peft.num_virtual_tokens`,
//! `training.learning_rate`) to a domain: explicit values, an integer range
//! with a step, or a uniform or log-uniform real range. A parameter may be
//! conditional (`when`): it only takes part when other fields (template
//! fields or unconditional parameters) have given values; otherwise the
//! template's value stands.
//!
//! Enumeration order is fixed, so grid trial `i` is the same configuration on
//! every coordinator: unconditional parameters sorted by path, the first one
//! varying slowest, each one's values in the order written; then the
//! conditional parameters that apply, in the same manner.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::rng::SplitMix64;
use crate::spec::SpecError;

/// One trial's parameters: job-spec path to value, ordered by path.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Params(pub BTreeMap<String, Value>);

impl Params {
    /// Canonical text of the parameters: equal configurations give equal keys.
    pub fn key(&self) -> String {
        serde_json::to_string(&self.0).expect("parameters serialize to json")
    }

    pub fn get(&self, path: &str) -> Option<&Value> {
        self.0.get(path)
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(&self.0).expect("parameters serialize to json")
    }
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(" "))
    }
}

/// The values one parameter takes.
#[derive(Clone, Debug, PartialEq)]
pub enum Domain {
    /// Explicit values, in the order written.
    Values(Vec<Value>),
    /// Integers `min, min + step, …` up to and including `max` when it falls on a step.
    IntRange { min: i64, max: i64, step: i64 },
    /// Reals drawn uniformly from `[min, max)`.
    Uniform { min: f64, max: f64 },
    /// Reals whose logarithm is uniform on `[ln min, ln max)`; `min > 0`.
    LogUniform { min: f64, max: f64 },
}

impl Domain {
    /// Number of values of a discrete domain; `None` for a continuous one.
    pub fn count(&self) -> Option<u64> {
        match self {
            Domain::Values(values) => Some(values.len() as u64),
            Domain::IntRange { min, max, step } => Some(((max - min) / step) as u64 + 1),
            Domain::Uniform { .. } | Domain::LogUniform { .. } => None,
        }
    }

    pub fn is_discrete(&self) -> bool {
        self.count().is_some()
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Domain::Values(_) => "values",
            Domain::IntRange { .. } => "int_range",
            Domain::Uniform { .. } => "uniform",
            Domain::LogUniform { .. } => "log_uniform",
        }
    }

    /// Value `i` of a discrete domain (`i < len`).
    fn nth(&self, i: u64) -> Value {
        match self {
            Domain::Values(values) => values[i as usize].clone(),
            Domain::IntRange { min, step, .. } => Value::from(min + step * i as i64),
            Domain::Uniform { .. } | Domain::LogUniform { .. } => unreachable!("continuous domains have no nth value"),
        }
    }

    fn sample(&self, rng: &mut SplitMix64) -> Value {
        match self {
            Domain::Values(_) | Domain::IntRange { .. } => {
                let n = self.count().expect("discrete");
                self.nth(rng.below(n))
            }
            Domain::Uniform { min, max } => number(significant(min + rng.next_f64() * (max - min)).clamp(*min, *max)),
            Domain::LogUniform { min, max } => {
                let (lo, hi) = (min.ln(), max.ln());
                number(significant((lo + rng.next_f64() * (hi - lo)).exp()).clamp(*min, *max))
            }
        }
    }

    /// The values that bound the domain: every listed value, the ends of ranges.
    fn extremes(&self) -> Vec<Value> {
        match self {
            Domain::Values(values) => values.clone(),
            Domain::IntRange { .. } => {
                let n = self.count().expect("discrete");
                if n == 1 {
                    vec![self.nth(0)]
                } else {
                    vec![self.nth(0), self.nth(n - 1)]
                }
            }
            Domain::Uniform { min, max } | Domain::LogUniform { min, max } => vec![number(*min), number(*max)],
        }
    }
}

/// `x` rounded to 8 significant digits: readable, and short enough that
/// every JSON parser (and Postgres' jsonb) gives back exactly the same float.
fn significant(x: f64) -> f64 {
    format!("{x:.7e}").parse().unwrap_or(x)
}

fn number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// A parameter applies only when the field at `path` has one of `values`.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub path: String,
    pub values: Vec<Value>,
}

/// One dimension of a search space.
#[derive(Clone, Debug, PartialEq)]
pub struct Parameter {
    /// Dotted path into the job spec, e.g. `training.learning_rate`.
    pub path: String,
    pub domain: Domain,
    /// All must hold for the parameter to apply; empty: always applies.
    pub when: Vec<Condition>,
}

impl Parameter {
    fn applies(&self, params: &Params, context: &dyn Fn(&Params, &str) -> Option<Value>) -> bool {
        self.when.iter().all(|c| context(params, &c.path).is_some_and(|v| c.values.iter().any(|w| same_value(&v, w))))
    }
}

/// Looks a field up for a condition: the trial's parameters first, then the
/// template (with the job spec's defaults). `None` when the field is unset.
pub type Context<'a> = &'a dyn Fn(&Params, &str) -> Option<Value>;

/// Why a space has no grid of the wanted size.
#[derive(Clone, Debug, PartialEq)]
pub enum GridError {
    /// The parameter at this path is continuous.
    Continuous { path: String, kind: &'static str },
    /// The grid has more configurations than the cap (at least this many).
    TooLarge { at_least: u64 },
}

/// A search space: unconditional parameters sorted by path, then conditional ones.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchSpace {
    params: Vec<Parameter>,
}

/// Spec paths a space may not set: the sweep names and owns its trials.
const RESERVED: [&str; 2] = ["name", "owner"];

impl SearchSpace {
    /// Parses the `space` table: nested tables down to parameter tables, or
    /// dotted keys (`"training.learning_rate" = { ... }`). Errors name the
    /// field as `space.<path>`.
    pub fn from_json(space: &Value) -> Result<Self, SpecError> {
        let Value::Object(table) = space else {
            return Err(SpecError::new("space", "must be a table of parameters"));
        };
        let mut params = Vec::new();
        collect("", table, &mut params)?;
        if params.is_empty() {
            return Err(SpecError::new(
                "space",
                "must define at least one parameter, e.g. [space.training.learning_rate] values = [1e-3, 3e-2]",
            ));
        }
        params.sort_by(|a, b| (!a.when.is_empty(), &a.path).cmp(&(!b.when.is_empty(), &b.path)));
        if let Some(dup) = params.windows(2).find(|w| w[0].path == w[1].path) {
            return Err(SpecError::new(format!("space.{}", dup[0].path), "is defined twice"));
        }
        for p in &params {
            for c in &p.when {
                if c.path == p.path {
                    return Err(SpecError::new(format!("space.{}.when", p.path), "a parameter cannot depend on itself"));
                }
                if params.iter().any(|q| q.path == c.path && !q.when.is_empty()) {
                    return Err(SpecError::new(
                        format!("space.{}.when", p.path),
                        format!("{} is itself conditional; conditions may only name template fields or unconditional parameters", c.path),
                    ));
                }
            }
        }
        Ok(Self { params })
    }

    pub fn params(&self) -> &[Parameter] {
        &self.params
    }

    pub fn parameter(&self, path: &str) -> Option<&Parameter> {
        self.params.iter().find(|p| p.path == path)
    }

    /// True when every parameter has finitely many values.
    pub fn is_discrete(&self) -> bool {
        self.params.iter().all(|p| p.domain.is_discrete())
    }

    fn unconditional(&self) -> impl Iterator<Item = &Parameter> {
        self.params.iter().filter(|p| p.when.is_empty())
    }

    fn conditional(&self) -> impl Iterator<Item = &Parameter> {
        self.params.iter().filter(|p| !p.when.is_empty())
    }

    /// Every configuration in grid order, or why there is no grid of at most
    /// `cap` configurations.
    pub fn grid(&self, context: Context<'_>, cap: u64) -> Result<Vec<Params>, GridError> {
        if let Some(p) = self.params.iter().find(|p| !p.domain.is_discrete()) {
            return Err(GridError::Continuous { path: p.path.clone(), kind: p.domain.kind() });
        }
        let base: Vec<&Parameter> = self.unconditional().collect();
        let combos = product(&base);
        if combos > cap {
            return Err(GridError::TooLarge { at_least: combos });
        }
        let mut grid = Vec::new();
        for i in 0..combos {
            let params = decode(&base, i, Params::default());
            let active: Vec<&Parameter> = self.conditional().filter(|p| p.applies(&params, context)).collect();
            let extra = product(&active);
            if grid.len() as u64 + extra > cap {
                return Err(GridError::TooLarge { at_least: grid.len() as u64 + extra });
            }
            grid.extend((0..extra).map(|j| decode(&active, j, params.clone())));
        }
        Ok(grid)
    }

    /// A random configuration: unconditional parameters drawn in path order,
    /// then the conditional ones that apply.
    pub fn sample(&self, rng: &mut SplitMix64, context: Context<'_>) -> Params {
        let mut params = Params::default();
        for p in self.unconditional() {
            params.0.insert(p.path.clone(), p.domain.sample(rng));
        }
        let active: Vec<&Parameter> = self.conditional().filter(|p| p.applies(&params, context)).collect();
        for p in active {
            params.0.insert(p.path.clone(), p.domain.sample(rng));
        }
        params
    }

    /// Configurations that together take every parameter to each of its
    /// extremes (every listed value, both ends of every range), plus the
    /// corner where every parameter is at its last extreme: the trials whose
    /// specs are validated when a random or continuous sweep is created.
    pub fn extreme_configs(&self, context: Context<'_>) -> Vec<Params> {
        let first = |p: &Parameter| p.domain.extremes().into_iter().next().expect("a domain has a value");
        let last = |p: &Parameter| p.domain.extremes().into_iter().last().expect("a domain has a value");
        let with_active = |mut params: Params, pick: &dyn Fn(&Parameter) -> Value| {
            let active: Vec<&Parameter> = self.conditional().filter(|p| p.applies(&params, context)).collect();
            for p in active {
                params.0.entry(p.path.clone()).or_insert_with(|| pick(p));
            }
            params
        };
        let base = Params(self.unconditional().map(|p| (p.path.clone(), first(p))).collect());
        let mut configs = vec![with_active(base.clone(), &first)];
        for p in &self.params {
            for value in p.domain.extremes() {
                let mut params = base.clone();
                // Satisfy the parameter's own conditions where they name space parameters.
                for c in &p.when {
                    if self.parameter(&c.path).is_some() {
                        params.0.insert(c.path.clone(), c.values[0].clone());
                    }
                }
                params.0.insert(p.path.clone(), value);
                configs.push(with_active(params, &first));
            }
        }
        let corner = Params(self.unconditional().map(|p| (p.path.clone(), last(p))).collect());
        configs.push(with_active(corner, &last));
        let mut seen = std::collections::HashSet::new();
        configs.retain(|c| seen.insert(c.key()));
        configs
    }
}

/// Number of combinations of discrete parameters (saturating).
fn product(params: &[&Parameter]) -> u64 {
    params.iter().fold(1u64, |n, p| n.saturating_mul(p.domain.count().expect("discrete")))
}

/// Combination `i` of `params` in mixed radix, the first parameter slowest.
fn decode(params: &[&Parameter], mut i: u64, mut into: Params) -> Params {
    let mut values = Vec::with_capacity(params.len());
    for p in params.iter().rev() {
        let n = p.domain.count().expect("discrete");
        values.push((p.path.clone(), p.domain.nth(i % n)));
        i /= n;
    }
    into.0.extend(values);
    into
}

/// Equal values, numbers compared by value (`5` equals `5.0`).
pub fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// A table is a parameter when it says what its values are.
fn is_parameter(table: &Map<String, Value>) -> bool {
    table.contains_key("values") || table.contains_key("type")
}

fn collect(prefix: &str, table: &Map<String, Value>, out: &mut Vec<Parameter>) -> Result<(), SpecError> {
    for (key, value) in table {
        let path = format!("{prefix}{key}");
        match value {
            Value::Object(inner) if is_parameter(inner) => out.push(parameter(&path, inner)?),
            Value::Object(inner) => collect(&format!("{path}."), inner, out)?,
            _ => {
                return Err(SpecError::new(
                    format!("space.{path}"),
                    "must be a parameter table: values = [...], or type = \"int_range\", \"uniform\" or \"log_uniform\" with min and max",
                ))
            }
        }
    }
    Ok(())
}

fn parameter(path: &str, table: &Map<String, Value>) -> Result<Parameter, SpecError> {
    let field = format!("space.{path}");
    if RESERVED.contains(&path) {
        return Err(SpecError::new(field, "is set by the sweep for every trial and cannot be searched"));
    }
    const KEYS: [&str; 6] = ["type", "values", "min", "max", "step", "when"];
    if let Some(unknown) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(SpecError::new(
            format!("{field}.{unknown}"),
            format!("unknown key; a parameter takes {}", KEYS.join(", ")),
        ));
    }
    let kind = match table.get("type") {
        None => "values",
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(SpecError::new(format!("{field}.type"), format!("must be a string, got {other}"))),
    };
    let domain = match kind {
        "values" | "choice" => values_domain(&field, table)?,
        "int_range" => int_range(&field, table)?,
        "uniform" => {
            let (min, max) = bounds(&field, table)?;
            if min >= max {
                return Err(SpecError::new(field, format!("uniform bounds need min < max, got min {min} and max {max}")));
            }
            Domain::Uniform { min, max }
        }
        "log_uniform" | "loguniform" | "log-uniform" => {
            let (min, max) = bounds(&field, table)?;
            if min <= 0.0 || max <= 0.0 {
                let bad = if min <= 0.0 { min } else { max };
                return Err(SpecError::new(field, format!("log-uniform bounds must be > 0, got {bad}")));
            }
            if min >= max {
                return Err(SpecError::new(
                    field,
                    format!("log-uniform bounds need min < max, got min {min} and max {max}"),
                ));
            }
            Domain::LogUniform { min, max }
        }
        other => {
            return Err(SpecError::new(
                format!("{field}.type"),
                format!("unknown type {other:?}; allowed: values, int_range, uniform, log_uniform"),
            ))
        }
    };
    if kind != "values" && kind != "choice" && table.contains_key("values") {
        return Err(SpecError::new(format!("{field}.values"), format!("does not apply to type {kind:?}")));
    }
    let when = match table.get("when") {
        None => Vec::new(),
        Some(Value::Object(conditions)) if !conditions.is_empty() => conditions
            .iter()
            .map(|(on, wanted)| {
                let values = match wanted {
                    Value::Array(values) if !values.is_empty() => values.clone(),
                    Value::Array(_) => {
                        return Err(SpecError::new(format!("{field}.when.{on}"), "must list at least one value"))
                    }
                    scalar => vec![scalar.clone()],
                };
                if let Some(bad) = values.iter().find(|v| !is_scalar(v)) {
                    return Err(SpecError::new(format!("{field}.when.{on}"), format!("values must be scalars, got {bad}")));
                }
                Ok(Condition { path: on.clone(), values })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(SpecError::new(
                format!("{field}.when"),
                "must be a table of field paths to values, e.g. when = { \"peft.init\" = \"text\" }",
            ))
        }
    };
    Ok(Parameter { path: path.to_string(), domain, when })
}

fn is_scalar(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

fn values_domain(field: &str, table: &Map<String, Value>) -> Result<Domain, SpecError> {
    for key in ["min", "max", "step"] {
        if table.contains_key(key) {
            return Err(SpecError::new(format!("{field}.{key}"), "does not apply to a list of values; use type = \"int_range\""));
        }
    }
    let Some(Value::Array(values)) = table.get("values") else {
        return Err(SpecError::new(format!("{field}.values"), "must be a list of values"));
    };
    if values.is_empty() {
        return Err(SpecError::new(format!("{field}.values"), "must list at least one value"));
    }
    if let Some(bad) = values.iter().find(|v| !is_scalar(v)) {
        return Err(SpecError::new(format!("{field}.values"), format!("must be numbers, strings or booleans, got {bad}")));
    }
    if let Some((i, v)) = values.iter().enumerate().find(|(i, v)| values[..*i].iter().any(|w| same_value(v, w))) {
        return Err(SpecError::new(format!("{field}.values"), format!("value {v} is listed twice (at {i})")));
    }
    Ok(Domain::Values(values.clone()))
}

fn int_range(field: &str, table: &Map<String, Value>) -> Result<Domain, SpecError> {
    let int = |key: &str| -> Result<Option<i64>, SpecError> {
        match table.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| SpecError::new(format!("{field}.{key}"), format!("must be an integer, got {v}"))),
        }
    };
    let min = int("min")?.ok_or_else(|| SpecError::new(format!("{field}.min"), "is required for int_range"))?;
    let max = int("max")?.ok_or_else(|| SpecError::new(format!("{field}.max"), "is required for int_range"))?;
    let step = int("step")?.unwrap_or(1);
    if step < 1 {
        return Err(SpecError::new(format!("{field}.step"), format!("must be at least 1, got {step}")));
    }
    if min > max {
        return Err(SpecError::new(field, format!("int_range needs min <= max, got min {min} and max {max}")));
    }
    Ok(Domain::IntRange { min, max, step })
}

fn bounds(field: &str, table: &Map<String, Value>) -> Result<(f64, f64), SpecError> {
    if table.contains_key("step") {
        return Err(SpecError::new(format!("{field}.step"), "applies to int_range only"));
    }
    let real = |key: &str| -> Result<f64, SpecError> {
        let v = table.get(key).ok_or_else(|| SpecError::new(format!("{field}.{key}"), "is required"))?;
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| SpecError::new(format!("{field}.{key}"), format!("must be a finite number, got {v}")))
    };
    Ok((real("min")?, real("max")?))
}

#[cfg(test)]
mod tests;

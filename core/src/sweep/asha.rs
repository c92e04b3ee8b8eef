//! Asynchronous successive halving (ASHA; Li et al., "A System for Massively
//! Parallel Hyperparameter Tuning", MLSys 2020, <https://arxiv.org/abs/1810.05934>),
//! in its stop-based form as Ray Tune's `ASHAScheduler` runs it.
//!
//! Every trial is planned for the maximum resource. Rungs sit at
//! `min_resource * η^k` (below the maximum); the worker evaluates at each.
//! When a trial's objective at a rung arrives, it is compared with every value
//! recorded at that rung so far, its own included: it continues if it ranks in
//! the top `max(1, ⌊n / η⌋)` of those `n` values, and is stopped otherwise.
//! Ties of the objective are broken by the evaluation loss at the rung (lower
//! ranks ahead) when both values have one and the objective is not the loss
//! itself: a discrete metric such as accuracy often ties on a plateau (every
//! trial predicting the majority class early on), where the loss still tells
//! trials apart. Remaining ties go to the value recorded earlier, as in the
//! paper's `top_k` over a stably sorted rung: a newcomer that merely equals
//! them has shown nothing (ties going to newcomers would promote them all).
//! Decisions are final: a trial is never compared twice at one rung.

use serde::{Deserialize, Serialize};

use super::Direction;
use crate::spec::SpecError;

/// What a resource is counted in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceUnit {
    /// Optimizer steps.
    #[default]
    Steps,
    /// Passes over the training set, converted to steps when the sweep is
    /// created (every trial must then have the same steps per epoch).
    Epochs,
}

impl ResourceUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceUnit::Steps => "steps",
            ResourceUnit::Epochs => "epochs",
        }
    }
}

/// ASHA settings as written in a sweep definition.
#[derive(Clone, Debug, PartialEq)]
pub struct AshaConfig {
    pub unit: ResourceUnit,
    /// Resource of the first rung.
    pub min_resource: f64,
    /// Resource of a trial that is never stopped.
    pub max_resource: f64,
    /// η: the fraction `1/η` of each rung continues.
    pub reduction_factor: u32,
    /// Use only the first this many rungs; `None`: every rung below the maximum.
    pub num_rungs: Option<u32>,
}

/// Largest reduction factor accepted.
pub const MAX_REDUCTION_FACTOR: u32 = 100;

impl AshaConfig {
    /// Checks the settings on their own; `field` prefixes the field names.
    pub fn validate(&self) -> Result<(), SpecError> {
        let field = |name: &str| format!("algorithm.{name}");
        let whole = |x: f64| x.fract() == 0.0;
        if !(self.min_resource.is_finite() && self.min_resource > 0.0) {
            return Err(SpecError::new(field("min_resource"), format!("must be greater than 0, got {}", self.min_resource)));
        }
        if self.unit == ResourceUnit::Steps && !whole(self.min_resource) {
            return Err(SpecError::new(field("min_resource"), format!("must be a whole number of steps, got {}", self.min_resource)));
        }
        if !(self.max_resource.is_finite() && self.max_resource > self.min_resource) {
            return Err(SpecError::new(
                field("max_resource"),
                format!("must be greater than min_resource {}, got {}", self.min_resource, self.max_resource),
            ));
        }
        if self.unit == ResourceUnit::Steps && !whole(self.max_resource) {
            return Err(SpecError::new(field("max_resource"), format!("must be a whole number of steps, got {}", self.max_resource)));
        }
        if !(2..=MAX_REDUCTION_FACTOR).contains(&self.reduction_factor) {
            return Err(SpecError::new(
                field("reduction_factor"),
                format!("must be between 2 and {MAX_REDUCTION_FACTOR}, got {}", self.reduction_factor),
            ));
        }
        let available = self.rung_resources().len();
        if let Some(n) = self.num_rungs {
            if n == 0 || n as usize > available {
                return Err(SpecError::new(
                    field("num_rungs"),
                    format!(
                        "must be between 1 and {available} (rungs at min_resource * reduction_factor^k below max_resource), got {n}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Rung resources `min * η^k < max`, limited to `num_rungs`.
    fn rung_resources(&self) -> Vec<f64> {
        let eta = f64::from(self.reduction_factor);
        let mut rungs = Vec::new();
        let mut r = self.min_resource;
        // The tolerance keeps min * η^k == max (up to rounding) off the rungs.
        while r < self.max_resource * (1.0 - 1e-9) {
            rungs.push(r);
            r *= eta;
        }
        if let Some(n) = self.num_rungs {
            rungs.truncate(n as usize);
        }
        rungs
    }

    /// The rungs and the maximum in steps. `steps_per_epoch` is needed when
    /// the unit is epochs.
    pub fn plan(&self, steps_per_epoch: Option<u64>) -> Result<AshaPlan, SpecError> {
        self.validate()?;
        let to_steps = |r: f64| -> Result<u64, SpecError> {
            match self.unit {
                ResourceUnit::Steps => Ok(r.round() as u64),
                ResourceUnit::Epochs => {
                    let per_epoch = steps_per_epoch.ok_or_else(|| {
                        SpecError::new("algorithm.resource", "epochs need the number of training examples; use steps")
                    })?;
                    Ok((r * per_epoch as f64).ceil().max(1.0) as u64)
                }
            }
        };
        let max_steps = to_steps(self.max_resource)?;
        let mut rungs = Vec::new();
        for r in self.rung_resources() {
            let step = to_steps(r)?;
            if rungs.last().is_some_and(|&prev| prev >= step) || step >= max_steps {
                return Err(SpecError::new(
                    "algorithm.min_resource",
                    format!(
                        "rungs fall on the same step with {} steps per epoch; raise min_resource or use steps",
                        steps_per_epoch.unwrap_or(0)
                    ),
                ));
            }
            rungs.push(step);
        }
        Ok(AshaPlan { rungs, max_steps, reduction_factor: self.reduction_factor })
    }
}

/// ASHA resolved to steps, as the coordinator runs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AshaPlan {
    /// Steps at which trials are compared, increasing, all below `max_steps`.
    pub rungs: Vec<u64>,
    /// Steps of a trial that is never stopped (`training.max_steps`).
    pub max_steps: u64,
    pub reduction_factor: u32,
}

impl AshaPlan {
    /// The evaluation interval for trials: the template's when it lands on
    /// every rung, otherwise the greatest common divisor of the rungs.
    pub fn eval_every(&self, template_eval_every: u64) -> u64 {
        if template_eval_every > 0 && self.rungs.iter().all(|r| r % template_eval_every == 0) {
            return template_eval_every;
        }
        self.rungs.iter().copied().fold(0, gcd).max(1)
    }

    /// The index of the rung at `step`, if a rung is there.
    pub fn rung_at(&self, step: u64) -> Option<usize> {
        self.rungs.iter().position(|&r| r == step)
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// What happens to a trial at a rung.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// It continues to the next rung.
    Promote,
    /// It stops now.
    Stop,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Promote => "promote",
            Decision::Stop => "stop",
        }
    }
}

/// A trial's result at a rung: its objective and, to break ties of the
/// objective, its evaluation loss at the same step (lower is better).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RungValue {
    pub objective: f64,
    pub tiebreak: Option<f64>,
}

impl RungValue {
    pub fn new(objective: f64, tiebreak: Option<f64>) -> Self {
        Self { objective, tiebreak }
    }

    /// True when `self`, recorded earlier, ranks ahead of `value`: it is
    /// better, or equal and not beaten on the tie-breaker. A value that is
    /// not a number never ranks ahead.
    fn ranks_ahead_of(&self, value: &RungValue, direction: Direction) -> bool {
        if direction.better(value.objective, self.objective) {
            return false;
        }
        if self.objective == value.objective {
            if let (Some(recorded), Some(new)) = (self.tiebreak, value.tiebreak) {
                return !(new < recorded);
            }
        }
        true
    }
}

/// The ASHA rule: `value` continues if fewer than `max(1, ⌊n/η⌋)` of the `n`
/// values at the rung (`recorded` plus itself) rank ahead of it; a recorded
/// value ranks ahead when it is better, or equal without a lower
/// tie-breaker (earlier values win remaining ties). A value whose objective
/// is not a number never continues, and never ranks ahead.
pub fn decide(recorded: &[RungValue], value: RungValue, reduction_factor: u32, direction: Direction) -> Decision {
    if value.objective.is_nan() {
        return Decision::Stop;
    }
    let n = recorded.len() + 1;
    let keep = (n / reduction_factor.max(1) as usize).max(1);
    let ahead = recorded.iter().filter(|r| r.ranks_ahead_of(&value, direction)).count();
    if ahead < keep {
        Decision::Promote
    } else {
        Decision::Stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(min: f64, max: f64, eta: u32) -> AshaConfig {
        AshaConfig { unit: ResourceUnit::Steps, min_resource: min, max_resource: max, reduction_factor: eta, num_rungs: None }
    }

    #[test]
    fn rungs_sit_at_min_times_powers_of_eta_below_the_maximum() {
        let plan = config(10.0, 90.0, 3).plan(None).unwrap();
        assert_eq!((plan.rungs.as_slice(), plan.max_steps), (&[10, 30][..], 90));
        assert_eq!(plan.eval_every(0), 10);
        assert_eq!(plan.eval_every(5), 5, "a template interval that hits every rung is kept");
        assert_eq!(plan.eval_every(20), 10);
        assert_eq!(config(1.0, 100.0, 2).plan(None).unwrap().rungs, [1, 2, 4, 8, 16, 32, 64]);
        let capped = AshaConfig { num_rungs: Some(2), ..config(1.0, 100.0, 2) };
        assert_eq!(capped.plan(None).unwrap().rungs, [1, 2]);
        assert_eq!(plan.rung_at(30), Some(1));
        assert_eq!(plan.rung_at(20), None);
    }

    #[test]
    fn epochs_become_steps_and_bad_settings_name_their_field() {
        let epochs = AshaConfig { unit: ResourceUnit::Epochs, ..config(0.5, 4.0, 2) };
        let plan = epochs.plan(Some(63)).unwrap();
        assert_eq!((plan.rungs.as_slice(), plan.max_steps), (&[32, 63, 126][..], 252));
        assert_eq!(epochs.plan(Some(1)).unwrap_err().field, "algorithm.min_resource");
        assert_eq!(config(0.0, 9.0, 3).validate().unwrap_err().field, "algorithm.min_resource");
        assert_eq!(config(9.0, 9.0, 3).validate().unwrap_err().field, "algorithm.max_resource");
        assert_eq!(config(1.0, 9.0, 1).validate().unwrap_err().field, "algorithm.reduction_factor");
        let too_many = AshaConfig { num_rungs: Some(3), ..config(10.0, 90.0, 3) };
        let err = too_many.validate().unwrap_err();
        assert_eq!(err.field, "algorithm.num_rungs");
        assert!(err.message.contains("between 1 and 2"), "{err}");
    }

    fn values(objectives: &[f64]) -> Vec<RungValue> {
        objectives.iter().map(|&o| RungValue::new(o, None)).collect()
    }

    fn one(objective: f64) -> RungValue {
        RungValue::new(objective, None)
    }

    #[test]
    fn a_trial_continues_only_in_the_top_fraction_of_its_rung() {
        let max = Direction::Maximize;
        assert_eq!(decide(&[], one(0.1), 3, max), Decision::Promote, "the first arrival has nothing to beat");
        assert_eq!(decide(&values(&[0.5]), one(0.6), 3, max), Decision::Promote);
        assert_eq!(decide(&values(&[0.5]), one(0.4), 3, max), Decision::Stop);
        assert_eq!(decide(&values(&[0.5]), one(0.5), 3, max), Decision::Stop, "the earlier value wins a tie");
        assert_eq!(decide(&values(&[0.52; 5]), one(0.52), 3, max), Decision::Stop, "a plateau promotes nobody new");
        // n = 6, η = 3: the top 2 continue.
        assert_eq!(decide(&values(&[0.9, 0.1, 0.2, 0.3, 0.4]), one(0.5), 3, max), Decision::Promote);
        assert_eq!(decide(&values(&[0.9, 0.8, 0.2, 0.3, 0.4]), one(0.5), 3, max), Decision::Stop);
        assert_eq!(decide(&values(&[0.3]), one(0.2), 2, Direction::Minimize), Decision::Promote);
        assert_eq!(decide(&values(&[0.3]), one(f64::NAN), 2, max), Decision::Stop);
        assert_eq!(decide(&values(&[f64::NAN]), one(0.0), 2, max), Decision::Promote, "a NaN is never better");
    }

    #[test]
    fn the_eval_loss_breaks_ties_of_the_objective() {
        let max = Direction::Maximize;
        // Every trial at the majority-class accuracy: the lower loss goes on.
        let plateau = [RungValue::new(0.52, Some(0.69)), RungValue::new(0.52, Some(0.71))];
        assert_eq!(decide(&plateau, RungValue::new(0.52, Some(0.60)), 3, max), Decision::Promote);
        assert_eq!(decide(&plateau, RungValue::new(0.52, Some(0.70)), 3, max), Decision::Stop);
        assert_eq!(decide(&plateau[..1], RungValue::new(0.52, Some(0.69)), 2, max), Decision::Stop, "an equal loss is still a tie");
        assert_eq!(decide(&plateau[..1], RungValue::new(0.52, None), 2, max), Decision::Stop, "no loss: the earlier value wins");
        // The objective still comes first.
        assert_eq!(decide(&plateau[..1], RungValue::new(0.51, Some(0.1)), 2, max), Decision::Stop);
        assert_eq!(decide(&plateau[..1], RungValue::new(0.53, Some(0.9)), 2, max), Decision::Promote);
    }
}

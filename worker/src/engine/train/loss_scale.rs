//! Dynamic loss scaling for a float16 base (Micikevicius et al. 2018,
//! <https://arxiv.org/abs/1710.03740>), with the policy of PyTorch's
//! `torch.amp.GradScaler`: the loss is multiplied by a scale before the
//! backward pass so that small gradients survive float16's narrow range on
//! their way through the base; the job's float32 gradients are divided by it
//! again before the optimizer sees them. A step whose gradients hold an inf
//! or a NaN is skipped (no update, the moments untouched) and the scale
//! halves; after [`GROWTH_INTERVAL`] good steps in a row it doubles.
//!
//! bf16 has float32's range and needs none of this: its jobs keep a scale of 1.

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The first scale, as `GradScaler`'s `init_scale`.
pub const INITIAL_SCALE: f64 = 65_536.0;
/// Good steps in a row after which the scale doubles (`growth_interval`).
pub const GROWTH_INTERVAL: u64 = 2_000;
/// Skipped steps in a row after which a job has diverged rather than overflowed.
pub const MAX_SKIPPED_IN_A_ROW: u64 = 32;

/// The scale of one job's loss and what decides its next value; saved in
/// checkpoints so that a resumed job scales as the uninterrupted one would.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    scale: f64,
    growth_interval: u64,
    /// Steps since the scale last changed, all with finite gradients.
    good_steps: u64,
    /// Steps skipped in a row.
    skipped: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::new(INITIAL_SCALE, GROWTH_INTERVAL)
    }
}

/// What a step's gradients decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaledStep {
    /// The gradients are finite and unscaled: apply the update.
    Apply,
    /// An inf or NaN: skip the update; the scale has halved.
    Skip,
}

impl LossScaler {
    pub fn new(scale: f64, growth_interval: u64) -> Self {
        Self { scale, growth_interval: growth_interval.max(1), good_steps: 0, skipped: 0 }
    }

    /// The factor the loss is multiplied by before the backward pass.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Steps skipped in a row, up to now.
    pub fn skipped_in_a_row(&self) -> u64 {
        self.skipped
    }

    /// Divides `grads` (the job's float32 gradients of the scaled loss) by
    /// the scale in place, and updates the scale by whether they are all
    /// finite. Undefined gradients (a tensor the step did not reach) are
    /// left alone.
    pub fn unscale(&mut self, grads: &mut [Tensor]) -> ScaledStep {
        let inverse = 1.0 / self.scale;
        let mut finite = true;
        tch::no_grad(|| {
            for grad in grads.iter_mut().filter(|g| g.defined()) {
                let _ = grad.g_mul_scalar_(inverse);
                finite &= bool::try_from(grad.isfinite().all()).unwrap_or(false);
            }
        });
        self.update(finite)
    }

    /// Moves the scale on after a step whose gradients were `finite` or not.
    pub fn update(&mut self, finite: bool) -> ScaledStep {
        if !finite {
            self.scale = (self.scale * 0.5).max(f64::MIN_POSITIVE);
            self.good_steps = 0;
            self.skipped += 1;
            return ScaledStep::Skip;
        }
        self.skipped = 0;
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        ScaledStep::Apply
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn an_overflow_skips_the_step_and_halves_the_scale() {
        let mut scaler = LossScaler::new(1024.0, 3);
        // Gradients of a loss scaled by 1024: finite, divided back.
        let mut grads = [Tensor::from_slice(&[1024.0f32, -2048.0]), Tensor::new()];
        assert_eq!(scaler.unscale(&mut grads), ScaledStep::Apply);
        assert_eq!(Vec::<f32>::try_from(&grads[0]).unwrap(), [1.0, -2.0]);
        assert_eq!(scaler.scale(), 1024.0);

        // One inf among them: the step is skipped and the scale halves.
        let mut grads = [Tensor::from_slice(&[1.0f32, f32::INFINITY]), Tensor::from_slice(&[0.5f32])];
        assert_eq!(scaler.unscale(&mut grads), ScaledStep::Skip);
        assert_eq!((scaler.scale(), scaler.skipped_in_a_row()), (512.0, 1));
        let mut grads = [Tensor::from_slice(&[f32::NAN]).to_kind(Kind::Float)];
        assert_eq!(scaler.unscale(&mut grads), ScaledStep::Skip);
        assert_eq!((scaler.scale(), scaler.skipped_in_a_row()), (256.0, 2));

        // Three good steps in a row double it; the count starts again after a skip.
        for _ in 0..2 {
            assert_eq!(scaler.update(true), ScaledStep::Apply);
            assert_eq!(scaler.scale(), 256.0);
        }
        assert_eq!(scaler.skipped_in_a_row(), 0);
        assert_eq!(scaler.update(true), ScaledStep::Apply);
        assert_eq!(scaler.scale(), 512.0);
    }
}

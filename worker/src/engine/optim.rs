//! AdamW (Loshchilov & Hutter 2019, <https://arxiv.org/abs/1711.05101>) with
//! the update of `torch.optim.AdamW`, and the linear warmup/decay schedule of
//! Hugging Face `get_linear_schedule_with_warmup`.
//!
//! The optimizer is written out rather than taken from libtorch so that its
//! state (moments and step) stays reachable for checkpoints, and so that only
//! the adapter's tensors ever get state: the frozen base never appears here.

use std::collections::HashMap;

use tch::Tensor;

/// Learning-rate multiplier: linear warmup from 0 over `warmup_steps`, then
/// linear decay to 0 at `total_steps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearSchedule {
    warmup_steps: u64,
    total_steps: u64,
}

impl LinearSchedule {
    /// Warmup steps are `ceil(warmup_ratio * total_steps)`, as HF
    /// `TrainingArguments.get_warmup_steps` computes them.
    pub fn new(total_steps: u64, warmup_ratio: f64) -> Self {
        let warmup_steps = (warmup_ratio * total_steps as f64).ceil() as u64;
        Self { warmup_steps, total_steps }
    }

    /// Multiplier for the update that follows `completed` optimizer steps
    /// (0-based, as the HF `LambdaLR` sees it).
    pub fn factor(&self, completed: u64) -> f64 {
        if completed < self.warmup_steps {
            return completed as f64 / self.warmup_steps.max(1) as f64;
        }
        let remaining = self.total_steps.saturating_sub(completed) as f64;
        (remaining / self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64).max(0.0)
    }
}

/// Tensors sharing a learning rate and weight decay.
struct ParamGroup {
    lr: f64,
    weight_decay: f64,
    params: Vec<Slot>,
}

struct Slot {
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW with per-group base learning rates, scaled at each step by a schedule.
pub struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    steps: u64,
    groups: Vec<ParamGroup>,
}

impl Default for AdamW {
    fn default() -> Self {
        Self::new(0.9, 0.999, 1e-8)
    }
}

impl AdamW {
    pub fn new(beta1: f64, beta2: f64, eps: f64) -> Self {
        Self { beta1, beta2, eps, steps: 0, groups: Vec::new() }
    }

    /// Adds trainable tensors with base learning rate `lr` and decoupled
    /// weight decay `weight_decay`.
    pub fn add_group(&mut self, params: Vec<Tensor>, lr: f64, weight_decay: f64) {
        let params = params
            .into_iter()
            .map(|param| Slot { exp_avg: param.zeros_like(), exp_avg_sq: param.zeros_like(), param })
            .collect();
        self.groups.push(ParamGroup { lr, weight_decay, params });
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The optimizer's state for a checkpoint: every tensor's first and
    /// second moments, named `optimizer.{group}.{index}.exp_avg|exp_avg_sq`
    /// in the order the groups and tensors were added.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = Vec::new();
        for (g, group) in self.groups.iter().enumerate() {
            for (i, slot) in group.params.iter().enumerate() {
                tensors.push((format!("optimizer.{g}.{i}.exp_avg"), slot.exp_avg.shallow_clone()));
                tensors.push((format!("optimizer.{g}.{i}.exp_avg_sq"), slot.exp_avg_sq.shallow_clone()));
            }
        }
        tensors
    }

    /// Checks that `tensors` hold every moment [`AdamW::state_tensors`]
    /// would save for this optimizer, with the right shapes, and no others.
    pub fn check_state(&self, tensors: &HashMap<String, Tensor>) -> Result<(), String> {
        for (name, moment) in self.state_tensors() {
            let saved = tensors.get(&name).ok_or_else(|| format!("no tensor {name}"))?;
            if saved.size() != moment.size() {
                return Err(format!("{name} has shape {:?}, expected {:?}", saved.size(), moment.size()));
            }
        }
        let expected = self.groups.iter().map(|g| 2 * g.params.len()).sum::<usize>();
        let saved = tensors.keys().filter(|k| k.starts_with("optimizer.")).count();
        if saved != expected {
            return Err(format!("{saved} optimizer tensors saved, expected {expected}"));
        }
        Ok(())
    }

    /// Restores what [`AdamW::state_tensors`] saved, after `steps` updates,
    /// into an optimizer built with the same groups and tensors; names a
    /// missing or misshapen moment and then changes nothing.
    pub fn load_state(&mut self, steps: u64, tensors: &HashMap<String, Tensor>) -> Result<(), String> {
        self.check_state(tensors)?;
        for (name, mut moment) in self.state_tensors() {
            tch::no_grad(|| moment.copy_(&tensors[&name]));
        }
        self.steps = steps;
        Ok(())
    }

    /// The gradient of every tensor this optimizer updates, in the order of
    /// [`AdamW::state_tensors`] (undefined for a tensor without one); they
    /// share storage with the gradients the next [`AdamW::step`] reads.
    pub fn grads(&self) -> Vec<Tensor> {
        self.groups.iter().flat_map(|g| g.params.iter()).map(|slot| slot.param.grad()).collect()
    }

    /// Every tensor this optimizer updates, in the order of
    /// [`AdamW::state_tensors`].
    pub fn params(&self) -> Vec<Tensor> {
        self.groups.iter().flat_map(|g| g.params.iter()).map(|slot| slot.param.shallow_clone()).collect()
    }

    /// Clears the gradients of every tensor this optimizer updates.
    pub fn zero_grad(&mut self) {
        for slot in self.groups.iter_mut().flat_map(|g| g.params.iter_mut()) {
            slot.param.zero_grad();
        }
    }

    /// One update with every group's learning rate times `lr_factor`.
    /// Tensors without a gradient are left as they are.
    pub fn step(&mut self, lr_factor: f64) {
        self.steps += 1;
        let (beta1, beta2, eps) = (self.beta1, self.beta2, self.eps);
        let bias_correction1 = 1.0 - beta1.powi(self.steps as i32);
        let bias_correction2_sqrt = (1.0 - beta2.powi(self.steps as i32)).sqrt();
        tch::no_grad(|| {
            for group in &mut self.groups {
                let lr = group.lr * lr_factor;
                for slot in &mut group.params {
                    let grad = slot.param.grad();
                    if !grad.defined() {
                        continue;
                    }
                    if group.weight_decay != 0.0 {
                        let _ = slot.param.g_mul_scalar_(1.0 - lr * group.weight_decay);
                    }
                    // torch's arithmetic in torch's order, in place on one
                    // temporary at a time: the step's peak is one tensor's
                    // size on top of the moments (for full fine-tuning, the
                    // word-embedding table's).
                    let _ = slot.exp_avg.lerp_(&grad, 1.0 - beta1);
                    let _ = slot.exp_avg_sq.g_mul_scalar_(beta2);
                    let mut squared = &grad * &grad;
                    let _ = squared.g_mul_scalar_(1.0 - beta2);
                    let _ = slot.exp_avg_sq.g_add_(&squared);
                    drop(squared);
                    let mut update = slot.exp_avg_sq.sqrt();
                    let _ = update.g_div_scalar_(bias_correction2_sqrt);
                    let _ = update.g_add_scalar_(eps);
                    // exp_avg / denom, written over denom.
                    let _ = slot.exp_avg.div_out(&update, &update);
                    let _ = update.g_mul_scalar_(lr / bias_correction1);
                    let _ = slot.param.g_sub_(&update);
                }
            }
        });
    }
}

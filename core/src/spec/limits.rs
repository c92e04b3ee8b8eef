//! The bounds every spec is held to, whatever its model.

/// Hard cap on virtual tokens and sequence length, whatever the model.
pub const MAX_TOKENS: u32 = 512;
/// Hard cap on examples per step.
pub const MAX_BATCH_SIZE: u32 = 4096;
/// Most devices one job trains on together (`training.devices`).
pub const MAX_DEVICES: u32 = 16;
/// Most optimizer steps a job may plan (and the most between evaluations or checkpoints).
pub const MAX_STEPS: u64 = 10_000_000;
/// Most declared labels.
pub const MAX_LABELS: usize = 10_000;
/// Most examples a job may cap its data at.
pub const MAX_EXAMPLES: u64 = 1_000_000_000;
/// Bounds of `training.stall_timeout_seconds` when set: ten seconds to a week.
pub const STALL_TIMEOUT_SECONDS: std::ops::RangeInclusive<u64> = 10..=604_800;

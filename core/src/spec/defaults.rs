//! Every default of a spec field, in one place: the TOML and JSON readers
//! (serde, through the `default_*` functions) and the gRPC conversion
//! (`ptune-proto`) both take them from here, so a field left out gets the
//! same value whichever way it came.

pub const NUM_VIRTUAL_TOKENS: u32 = 20;
pub const TEXT_FIELD: &str = "text";
pub const LABEL_FIELD: &str = "label";
pub const MAX_SEQ_LEN: u32 = 128;
pub const MAX_NEW_TOKENS: u32 = 64;
pub const NUM_BEAMS: u32 = 1;
pub const BATCH_SIZE: u32 = 32;
pub const EPOCHS: f64 = 1.0;
pub const SEED: u64 = 42;
/// Attempts that may fail with an error of the job before it fails.
pub const MAX_ATTEMPTS: u32 = 3;

pub(super) fn default_virtual_tokens() -> u32 {
    NUM_VIRTUAL_TOKENS
}
pub(super) fn default_text_field() -> String {
    TEXT_FIELD.into()
}
pub(super) fn default_label_field() -> String {
    LABEL_FIELD.into()
}
pub(super) fn default_max_new_tokens() -> u32 {
    MAX_NEW_TOKENS
}
pub(super) fn default_num_beams() -> u32 {
    NUM_BEAMS
}
pub(super) fn default_max_seq_len() -> u32 {
    MAX_SEQ_LEN
}
pub(super) fn default_batch_size() -> u32 {
    BATCH_SIZE
}
pub(super) fn default_epochs() -> f64 {
    EPOCHS
}
pub(super) fn default_seed() -> u64 {
    SEED
}
pub(super) fn default_max_attempts() -> u32 {
    MAX_ATTEMPTS
}

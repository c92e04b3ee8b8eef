//! Parameter-efficient adapters trained on a frozen base model. Each method
//! matches the Hugging Face PEFT library, so exports load with
//! `PeftModel.from_pretrained` and give the same outputs.
//!
//! An adapter fits any base through the base's [`HookSites`]: its prompt
//! rides in front of the input embeddings, its prefixes and low-rank deltas
//! through the forward's [`Hooks`]. [`build_adapter`] makes a job's adapter
//! from its spec, the same way for every task; [`SavedAdapter`] reads one
//! back from an export. Full fine-tuning, the baseline, trains the job's
//! own copy of the base instead ([`Trainable::Full`]).
//!
//! [`HookSites`]: crate::engine::models::hooks::HookSites
//! [`Hooks`]: crate::engine::models::hooks::Hooks

mod adapter;
mod build;
mod config;
mod load;
pub mod lora;
pub mod p_tuning;
pub mod prefix;
pub mod prompt_tuning;

pub use self::adapter::{Adapter, DrawnAdapter, Trainable};
pub use self::build::build_adapter;
pub use self::config::{adapter_config, wrapped_prefix, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
pub use self::load::SavedAdapter;

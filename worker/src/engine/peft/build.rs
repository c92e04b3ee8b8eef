//! Building a job's adapter from its spec, for any task on any base: the
//! method and `[peft]` settings of the spec, shaped by where the adapter
//! fits the base ([`HookSites`]).

use ptune_core::{JobSpec, Method};
use tch::nn;

use super::lora::{resolve_targets, Lora, LoraConfig};
use super::p_tuning::{PromptEncoder, PromptEncoderConfig};
use super::prefix::{PrefixShape, PrefixTuning};
use super::prompt_tuning::{PromptInit, PromptTuning};
use super::adapter::{Adapter, Trainable};
use crate::engine::error::EngineError;
use crate::engine::models::hooks::HookSites;

/// What the job `spec` trains on a base that `sites` describes, its
/// variables declared under `p` and drawn from libtorch's generator as it
/// stands (the caller seeds it): the method's adapter, or, for full
/// fine-tuning, the job's own copy of the base, which `full` makes.
/// `encode` tokenizes a prompt's init text with the base's tokenizer.
pub fn build_adapter<M>(
    spec: &JobSpec,
    sites: &HookSites<'_>,
    encode: &dyn Fn(&str) -> Result<Vec<i64>, EngineError>,
    p: &nn::Path,
    full: impl FnOnce() -> Result<M, EngineError>,
) -> Result<Trainable<M>, EngineError> {
    let peft = &spec.peft;
    let nvt = i64::from(peft.num_virtual_tokens);
    let hidden = sites.hidden_size;
    let encoder_hidden = i64::from(peft.encoder_hidden_size_for(hidden as u32));
    let adapter = match spec.method {
        Method::PromptTuning => {
            let init = PromptInit::from_spec(peft, encode, sites.vocab_size)?;
            Adapter::PromptTuning(PromptTuning::new(p, nvt, &init, sites.word_embeddings))
        }
        Method::PTuning => Adapter::PTuning(PromptEncoder::new(
            &(p / "prompt_encoder"),
            &PromptEncoderConfig {
                num_virtual_tokens: nvt,
                token_dim: hidden,
                encoder_type: peft.encoder_type(),
                hidden_size: encoder_hidden,
                num_layers: i64::from(peft.encoder_num_layers()),
                dropout: peft.encoder_dropout(),
            },
        )),
        Method::PrefixTuning => {
            let projection = peft.prefix_projection().then_some(encoder_hidden);
            Adapter::Prefix(PrefixTuning::new(&(p / "prompt_encoder"), prefix_shape(sites, nvt), projection, 0.0))
        }
        Method::PTuningV2 => Adapter::Prefix(PrefixTuning::new(
            &(p / "prompt_encoder"),
            prefix_shape(sites, nvt),
            None,
            peft.prefix_dropout(),
        )),
        Method::Lora => {
            let linears = &sites.linears;
            let modules = resolve_targets(sites.model_type, linears, peft.target_modules.as_deref())?;
            Adapter::Lora(Lora::new(p, LoraConfig::for_spec(peft, modules, linears), linears.num_layers))
        }
        Method::Full => return Ok(Trainable::Full(full()?)),
    };
    Ok(Trainable::Adapter(adapter))
}

/// Prefixes of `nvt` positions have the keys' shape: key/value heads times
/// head size, at every layer.
pub(crate) fn prefix_shape(sites: &HookSites<'_>, nvt: i64) -> PrefixShape {
    PrefixShape {
        num_virtual_tokens: nvt,
        num_layers: sites.num_layers,
        num_heads: sites.num_kv_heads,
        token_dim: sites.num_kv_heads * sites.head_dim,
    }
}

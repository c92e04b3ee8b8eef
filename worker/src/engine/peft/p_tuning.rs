//! P-tuning (Liu et al. 2021, <https://arxiv.org/abs/2103.10385>) as Hugging
//! Face PEFT's `P_TUNING` (`PromptEncoder`): the virtual tokens are the output
//! of an encoder run over a learned `[num_virtual_tokens, hidden]` table,
//! either an MLP (Linear, ReLU, Linear, ReLU, Linear) or a bidirectional LSTM
//! followed by Linear, ReLU, Linear. They are prepended at the input only,
//! as prompt tuning's are. Variable names follow PEFT's `prompt_encoder`
//! state dict (`embedding.weight`, `mlp_head.0.weight`, `lstm_head.weight_ih_l0`, ...).

use ptune_core::spec::EncoderType;
use tch::nn::{self, Module};
use tch::Tensor;

/// A `torch.nn.Linear` with PyTorch's default initialisation: weight and
/// bias uniform in `±1/sqrt(in)` (what `kaiming_uniform_(a=sqrt(5))` gives).
pub(crate) fn torch_linear(p: nn::Path, in_dim: i64, out_dim: i64) -> nn::Linear {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let init = nn::Init::Uniform { lo: -bound, up: bound };
    nn::linear(p, in_dim, out_dim, nn::LinearConfig { ws_init: init, bs_init: Some(init), bias: true })
}

/// A multi-layer bidirectional LSTM (`torch.nn.LSTM(bidirectional=True,
/// batch_first=True)`), weights uniform in `±1/sqrt(hidden)` as PyTorch
/// initialises them.
struct BiLstm {
    /// Per layer and direction: `weight_ih`, `weight_hh`, `bias_ih`,
    /// `bias_hh`, in the order `torch.lstm` takes them.
    params: Vec<Tensor>,
    hidden: i64,
    num_layers: i64,
    dropout: f64,
}

impl BiLstm {
    fn new(p: &nn::Path, input: i64, hidden: i64, num_layers: i64, dropout: f64) -> Self {
        let bound = 1.0 / (hidden as f64).sqrt();
        let mut params = Vec::new();
        for layer in 0..num_layers {
            let layer_input = if layer == 0 { input } else { 2 * hidden };
            for suffix in ["", "_reverse"] {
                let mut var = |name: &str, dims: &[i64]| {
                    params.push(p.uniform(&format!("{name}_l{layer}{suffix}"), dims, -bound, bound));
                };
                var("weight_ih", &[4 * hidden, layer_input]);
                var("weight_hh", &[4 * hidden, hidden]);
                var("bias_ih", &[4 * hidden]);
                var("bias_hh", &[4 * hidden]);
            }
        }
        Self { params, hidden, num_layers, dropout }
    }

    /// `[batch, seq, input]` -> `[batch, seq, 2 * hidden]`, from zero states.
    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let batch = xs.size()[0];
        let state = Tensor::zeros([2 * self.num_layers, batch, self.hidden], (xs.kind(), xs.device()));
        let states = [&state, &state];
        let params: Vec<&Tensor> = self.params.iter().collect();
        let (output, _, _) = xs.lstm(&states, &params[..], true, self.num_layers, self.dropout, train, true, true);
        output
    }
}

enum Head {
    Mlp(nn::Linear, nn::Linear, nn::Linear),
    Lstm(BiLstm, nn::Linear, nn::Linear),
}

/// P-tuning's prompt encoder: the learned table and the network over it.
pub struct PromptEncoder {
    embedding: Tensor,
    head: Head,
    encoder_type: EncoderType,
    hidden_size: i64,
}

/// What a P-tuning encoder is made of.
#[derive(Clone, Copy, Debug)]
pub struct PromptEncoderConfig {
    pub num_virtual_tokens: i64,
    pub token_dim: i64,
    pub encoder_type: EncoderType,
    pub hidden_size: i64,
    /// LSTM layers (LSTM encoder only).
    pub num_layers: i64,
    /// Dropout between LSTM layers in training (LSTM encoder only).
    pub dropout: f64,
}

impl PromptEncoder {
    /// Declares the encoder under `p` (PEFT's `prompt_encoder.<adapter>`):
    /// the table N(0, 1) as `nn.Embedding`, the rest as PyTorch initialises it.
    pub fn new(p: &nn::Path, cfg: &PromptEncoderConfig) -> Self {
        let (dim, h) = (cfg.token_dim, cfg.hidden_size);
        let embedding = (p / "embedding").randn_standard("weight", &[cfg.num_virtual_tokens, dim]);
        let mlp = p / "mlp_head";
        let head = match cfg.encoder_type {
            EncoderType::Mlp => Head::Mlp(
                torch_linear(&mlp / 0, dim, h),
                torch_linear(&mlp / 2, h, h),
                torch_linear(&mlp / 4, h, dim),
            ),
            EncoderType::Lstm => Head::Lstm(
                BiLstm::new(&(p / "lstm_head"), dim, h, cfg.num_layers, cfg.dropout),
                torch_linear(&mlp / 0, 2 * h, 2 * h),
                torch_linear(&mlp / 2, 2 * h, dim),
            ),
        };
        Self { embedding, head, encoder_type: cfg.encoder_type, hidden_size: h }
    }

    pub fn encoder_type(&self) -> EncoderType {
        self.encoder_type
    }

    pub fn hidden_size(&self) -> i64 {
        self.hidden_size
    }

    pub fn num_virtual_tokens(&self) -> i64 {
        self.embedding.size()[0]
    }

    /// `[num_virtual_tokens, hidden]` virtual tokens: the encoder's output,
    /// which is also what PEFT saves as `prompt_embeddings`.
    pub fn prompt(&self, train: bool) -> Tensor {
        match &self.head {
            Head::Mlp(l0, l2, l4) => l4.forward(&l2.forward(&l0.forward(&self.embedding).relu()).relu()),
            Head::Lstm(lstm, l0, l2) => {
                // [1, nvt, 2 * hidden]: one sequence of the virtual tokens
                let states = lstm.forward(&self.embedding.unsqueeze(0), train).squeeze_dim(0);
                l2.forward(&l0.forward(&states).relu())
            }
        }
    }
}

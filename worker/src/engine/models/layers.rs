//! Layers every architecture uses: dropout drawn from the job's stream, and
//! the feed-forward activations the configs name.

use tch::{Kind, Tensor};

use crate::engine::error::EngineError;

/// Inverted dropout: zeroes each element with probability `p` and scales the
/// rest by `1 / (1 - p)`, in training only. The keep mask comes from 31-bit
/// random integers compared with `p * 2^31`: the same distribution as
/// `Tensor::dropout`'s Bernoulli draws, which libtorch's CPU generator
/// produces about twice as slowly, and dropout dominates the non-matmul time
/// of a training step. The mask comes from the thread's active
/// [`DropoutStream`](crate::engine::rng::DropoutStream), if any.
pub(crate) fn dropout(xs: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return xs.shallow_clone();
    }
    crate::engine::rng::before_draw();
    let threshold = (p * 2f64.powi(31)).round() as i64;
    let mut draws = Tensor::empty(xs.size(), (Kind::Int, xs.device()));
    let keep = draws.random_().ge(threshold);
    xs * keep * (1.0 / (1.0 - p))
}

/// Feed-forward activations of the configs (`hidden_act`,
/// `activation_function`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Activation {
    /// Exact GELU (HF "gelu").
    Gelu,
    /// Tanh approximation of GELU (HF "gelu_new", "gelu_pytorch_tanh", "gelu_fast").
    GeluTanh,
    Relu,
    /// `x * sigmoid(x)` (HF "silu", "swish").
    Silu,
}

impl Activation {
    pub(crate) fn parse(name: &str) -> Result<Self, EngineError> {
        match name {
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(EngineError::Model(format!(
                "unsupported activation {other:?}; supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu"
            ))),
        }
    }

    pub(crate) fn apply(self, xs: &Tensor) -> Tensor {
        match self {
            Self::Gelu => xs.gelu("none"),
            Self::GeluTanh => xs.gelu("tanh"),
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
        }
    }
}

//! Domain types shared by the coordinator, the worker and the CLI: job specs
//! and their validation, sweep definitions and their search spaces, the
//! table of model types ptune trains, memory estimates, ids, states and
//! metrics. No networking, no storage.

pub mod archive;
pub mod bounds;
pub mod ids;
pub mod memory;
pub mod model_types;
pub mod spec;
pub mod state;
pub mod sweep;

pub use ids::{JobId, SweepId, WorkerId};
pub use memory::{MemoryEstimate, ModelShape};
pub use model_types::{Architecture, ModelFamily, ModelType};
pub use spec::{
    DataConfig, EncoderType, GenerationConfig, HeadConfig, JobSpec, Method, ModelLimits, PeftConfig, Pooling, Precision, PromptInit, SpecError, Task,
    TrainingConfig,
};
pub use state::{JobState, Metric, MetricKind};

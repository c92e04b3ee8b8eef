//! ptune worker: the coordinator agent and the libtorch training engine.

pub mod agent;
pub mod engine;
pub mod local;

//! ptune worker: the coordinator agent and the libtorch training engine.

pub mod agent;
pub mod durable;
pub mod engine;
pub mod faults;
pub mod local;

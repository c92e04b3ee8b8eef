//! What the worker's test files share; each uses part of it.
//! - [`paths`]: the workspace, fixtures, MiniLM, datasets, Python.
//! - [`engine`]: training a job on a model folder, runs taking turns.
//! - [`cluster`]: a real coordinator and real worker processes.
//! - [`synthetic`]: made-up datasets for the tiny-fixture engine tests.
//! - [`faults`]: the fault-injection suite's scenarios (feature `fault-injection`).
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod engine;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod paths;
pub mod synthetic;

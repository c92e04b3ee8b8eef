//! The ptune coordinator: accepts jobs over gRPC, leases them to workers under
//! fenced leases, requeues the work of workers that stop heartbeating, and
//! keeps every decision in PostgreSQL.
//!
//! Layers, outermost first: [`grpc`] (thin tonic adapters) and [`dashboard`]
//! (HTTP, with [`metrics`]) call the domain services: [`jobs`] and [`sweep`]
//! (what users do) and [`workers`] (what workers do, and the reaper), which
//! call [`store`] (all SQL). Pure policies sit below them all: [`placement`]
//! (which job a worker gets), [`retry`] (what an ended attempt leads to);
//! [`memory`] keeps every job's estimate, and [`error`] maps domain errors to
//! gRPC and HTTP answers. The sweep engine drives running sweeps in the
//! background.

pub mod auth;
pub mod announce;
pub mod blob;
pub mod config;
pub mod cursor;
pub mod dashboard;
pub mod embedded_pg;
pub mod error;
pub mod events;
pub mod group;
pub mod grpc;
pub mod jobs;
pub mod leader;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod placement;
pub mod readiness;
pub mod relay;
pub mod retry;
pub mod server;
pub mod store;
pub mod sweep;
pub mod tables;
pub mod testing;
pub mod tls;
pub mod workers;

pub use config::Config;
pub use error::Error;
pub use server::{Coordinator, CoordinatorHandle};

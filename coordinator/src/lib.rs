//! The ptune coordinator: accepts jobs over gRPC, leases them to workers under
//! fenced leases, requeues the work of workers that stop heartbeating, and
//! keeps every decision in PostgreSQL.
//!
//! Layers, outermost first: [`grpc`] (thin tonic adapters) and [`dashboard`]
//! (HTTP, with [`metrics`]) call the domain in [`jobs`] and [`sweep`] (what users do) and
//! [`scheduler`] (what workers do, leases, the reaper), which call [`store`]
//! (all SQL). The sweep engine drives running sweeps in the background.

pub mod auth;
pub mod blob;
pub mod config;
pub mod dashboard;
pub mod embedded_pg;
pub mod error;
pub mod events;
pub mod grpc;
pub mod jobs;
pub mod leader;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod readiness;
pub mod relay;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod sweep;
pub mod testing;
pub mod tls;

pub use config::Config;
pub use error::Error;
pub use server::{Coordinator, CoordinatorHandle};

//! The fault-injection suite: real coordinator and worker processes, real
//! PostgreSQL, MiniLM training SST-2, and real faults (kill -9, SIGTERM,
//! a private PostgreSQL stopped in immediate mode, a TCP proxy that cuts a
//! worker off, fault hooks that panic, abort, hang or fill the disk).
//!
//! Needs the worker built with `--features fault-injection` (the hooks
//! exist only then): `cargo test -p ptune-worker --features fault-injection
//! --test faults`, which `scripts/test.sh` runs. Each scenario prints a
//! `RELIABILITY |` row for `docs/reliability.md`.
//!
//! The scenarios, by what fails: `workers.rs` (worker processes killed,
//! signalled or cut off), `control_plane.rs` (a coordinator or PostgreSQL
//! going away), `jobs.rs` (jobs that panic, abort, hang or fill the disk).

#![cfg(feature = "fault-injection")]

#[path = "../support/mod.rs"]
mod support;

mod control_plane;
mod jobs;
mod workers;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::faults::*;
use ptune_coordinator::testing::fresh_database;
use ptune_proto::v1::{self, JobState};
use rand::{Rng, SeedableRng};

const LEASE_MS: u64 = 3000;
/// Checkpoints (uploaded) every 5 steps besides those of the evaluations.
const EVERY_5: &str = "checkpoint_every = 5";

/// The worker id a worker process registered under.
fn worker_id(worker: &WorkerProcess) -> String {
    std::fs::read_to_string(worker.work_dir.join("worker_id")).unwrap_or_default().trim().to_string()
}


/// The jobs' states, by id.
async fn states(client: &mut ptune_proto::v1::job_service_client::JobServiceClient<ptune_proto::client::AuthChannel>, ids: &[String]) -> Vec<v1::Job> {
    let mut jobs = Vec::new();
    for id in ids {
        jobs.push(get(client, id).await);
    }
    jobs
}

/// How each attempt of a job ended, in order.
async fn outcomes(database_url: &str, job: &str) -> Vec<String> {
    let sql = "SELECT coalesce(outcome, 'open') FROM job_attempts WHERE job_id = $1::uuid ORDER BY attempt";
    query_texts(database_url, sql, job).await
}

/// The worker that ended a job's last attempt successfully.
async fn completed_by(database_url: &str, job: &str) -> Vec<String> {
    let sql = "SELECT worker_id::text FROM job_attempts WHERE job_id = $1::uuid AND outcome = 'succeeded'";
    query_texts(database_url, sql, job).await
}

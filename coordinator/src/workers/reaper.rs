//! The background task that ends leases whose worker stopped heartbeating,
//! marks the workers waiting for work alive (`presence.rs`), and, on the
//! leader only (`leader.rs`), removes checkpoints no attempt can
//! resume from and abandoned uploads.
//!
//! A lease expires when its worker stopped renewing it, but also when the
//! renewals could not reach the database: during a database outage (or
//! while this coordinator was stopped), every worker's heartbeats fail. So
//! when a tick succeeds after [`OUTAGE_GAP`] without a successful one, the
//! reaper first gives every open lease a full lease period, in the same
//! transaction as the reaping: no running job is requeued because of an
//! outage, whatever its length.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::Workers;
use crate::blob::Collected;

/// How often expired leases are looked for.
pub const REAP_INTERVAL: Duration = Duration::from_millis(500);
/// A reaper that has not reached the database for this long treats the
/// next success as the end of an outage.
pub const OUTAGE_GAP: Duration = Duration::from_secs(2);
/// How often checkpoints of finished jobs and abandoned uploads are removed.
const COLLECT_INTERVAL: Duration = Duration::from_secs(60);
/// An upload that has not finished for this long was abandoned.
const ABANDONED_UPLOAD: Duration = Duration::from_secs(3600);

/// Runs [`Workers::reap_expired`] every [`REAP_INTERVAL`] until `shutdown`
/// turns true, and [`Workers::collect_files`] every [`COLLECT_INTERVAL`]
/// while `leader` says this coordinator leads. Database errors are logged
/// and retried on the next tick.
pub fn spawn_reaper(
    workers: Workers,
    leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ok = Instant::now();
        let mut last_collect = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                _ = tick.tick() => {}
            }
            let after_outage = last_ok.elapsed() >= OUTAGE_GAP;
            match workers.reap_expired(after_outage).await {
                Ok(n) => {
                    if after_outage {
                        info!(unreachable_ms = last_ok.elapsed().as_millis() as u64, "database reachable again");
                    }
                    last_ok = Instant::now();
                    if n > 0 {
                        debug!(leases = n, "expired leases ended");
                    }
                }
                Err(e) => warn!(error = %e, "reaping expired leases failed; retrying"),
            }
            if let Err(e) = workers.refresh_waiting().await {
                debug!(error = %e, "marking waiting workers alive failed; retrying");
            }
            if *leader.borrow() && last_collect.elapsed() >= COLLECT_INTERVAL {
                last_collect = Instant::now();
                match workers.collect_files(ABANDONED_UPLOAD).await {
                    Ok(done) if done == Collected::default() => {}
                    Ok(Collected { checkpoints, blobs, objects }) => {
                        debug!(checkpoints, blobs, objects, "removed files nothing reads any more")
                    }
                    Err(e) => warn!(error = %e, "removing old files failed; retrying later"),
                }
            }
        }
        debug!("reaper stopped");
    })
}

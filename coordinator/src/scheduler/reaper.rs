//! The background task that ends leases whose worker stopped heartbeating.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::Scheduler;

/// How often expired leases are looked for.
pub const REAP_INTERVAL: Duration = Duration::from_millis(500);

/// Runs [`Scheduler::reap_expired`] every [`REAP_INTERVAL`] until `shutdown`
/// turns true. Database errors are logged and retried on the next tick.
pub fn spawn_reaper(scheduler: Scheduler, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                _ = tick.tick() => {}
            }
            match scheduler.reap_expired().await {
                Ok(0) => {}
                Ok(n) => debug!(leases = n, "expired leases ended"),
                Err(e) => warn!(error = %e, "reaping expired leases failed; retrying"),
            }
        }
        debug!("reaper stopped");
    })
}

//! Whether this worker should take jobs. A worker whose attempts fail for
//! infrastructure reasons (its disk, its devices, engine threads that hang)
//! stops leasing, says why in every heartbeat (shown by `ptune workers
//! list`, the dashboard and `/metrics`), and resumes once the cause is gone:
//! a full disk is probed every [`DISK_PROBE_INTERVAL`]; repeated device
//! errors and stuck engine threads last until the worker is restarted.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// Infrastructure failures in a row after which a worker stops leasing. A
/// full disk stops it at the first.
pub const UNHEALTHY_AFTER: u32 = 3;
/// Engine threads given up on after which a worker stops leasing.
pub const MAX_STUCK_THREADS: usize = 2;
/// How often a worker whose disk was full checks whether it has room again.
pub const DISK_PROBE_INTERVAL: Duration = Duration::from_secs(15);
/// What the disk probe writes.
const PROBE_BYTES: usize = 1 << 20;

#[derive(Default)]
struct State {
    infra_in_a_row: u32,
    /// Why the worker takes no jobs; `None` while healthy.
    reason: Option<String>,
    disk_full: bool,
    last_probe: Option<Instant>,
}

/// How an attempt ended, as far as the worker's health goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The job succeeded, or failed for a reason of its own.
    Fine,
    /// The worker failed the attempt: a disk or device error.
    Infrastructure { reason: String, disk_full: bool },
    /// Nothing to learn (cancelled, lease lost, drained).
    Neutral,
}

/// The worker's health. Cheap to clone; clones share the state.
#[derive(Clone, Default)]
pub struct Health(Arc<Mutex<State>>);

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts how an attempt ended.
    pub fn record(&self, verdict: Verdict) {
        let mut state = self.lock();
        match verdict {
            Verdict::Fine => state.infra_in_a_row = 0,
            Verdict::Neutral => {}
            Verdict::Infrastructure { reason, disk_full } => {
                state.infra_in_a_row += 1;
                if disk_full {
                    state.disk_full = true;
                    state.last_probe = Some(Instant::now());
                    set(&mut state, format!("disk full: {reason}; free space in the work directory"));
                } else if state.infra_in_a_row >= UNHEALTHY_AFTER {
                    let n = state.infra_in_a_row;
                    set(&mut state, format!("{n} attempts in a row failed for infrastructure reasons; last: {reason}"));
                }
            }
        }
    }

    /// Marks the worker unhealthy when too many engine threads hang.
    pub fn engine_threads_stuck(&self, stuck: usize) {
        if stuck >= MAX_STUCK_THREADS {
            set(&mut self.lock(), format!("{stuck} engine threads stopped making progress; restart the worker"));
        }
    }

    /// Why the worker takes no jobs; `None` while healthy. A full disk is
    /// probed (a small file written and removed under `work_dir`) at most
    /// every [`DISK_PROBE_INTERVAL`], and forgiven once it has room.
    pub fn unhealthy_reason(&self, work_dir: &Path) -> Option<String> {
        let mut state = self.lock();
        if state.disk_full && state.last_probe.is_none_or(|t| t.elapsed() >= DISK_PROBE_INTERVAL) {
            state.last_probe = Some(Instant::now());
            if probe(work_dir).is_ok() {
                info!("the work directory has room again; taking jobs");
                state.disk_full = false;
                state.infra_in_a_row = 0;
                state.reason = None;
            }
        }
        state.reason.clone()
    }
}

fn set(state: &mut State, reason: String) {
    if state.reason.as_deref() != Some(reason.as_str()) {
        warn!(reason = %reason, "worker unhealthy: it takes no new jobs");
    }
    state.reason = Some(reason);
}

fn probe(work_dir: &Path) -> std::io::Result<()> {
    let path = work_dir.join(".disk-probe");
    let written = crate::durable::write(&path, &vec![0u8; PROBE_BYTES]);
    let _ = std::fs::remove_file(&path);
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn infra(disk_full: bool) -> Verdict {
        Verdict::Infrastructure { reason: "cuda error: ecc".into(), disk_full }
    }

    #[test]
    fn repeated_infrastructure_failures_make_a_worker_unhealthy_and_success_resets_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let health = Health::default();
        health.record(infra(false));
        health.record(Verdict::Fine);
        health.record(infra(false));
        health.record(infra(false));
        assert_eq!(health.unhealthy_reason(dir.path()), None, "two in a row after a success");
        health.record(infra(false));
        let reason = health.unhealthy_reason(dir.path()).expect("three in a row");
        assert!(reason.contains("3 attempts in a row") && reason.contains("cuda error"), "{reason}");
    }

    #[test]
    fn a_full_disk_stops_leasing_at_once_and_is_forgiven_when_the_probe_writes() {
        let dir = tempfile::tempdir().unwrap();
        let health = Health::default();
        health.record(infra(true));
        let reason = health.unhealthy_reason(dir.path()).expect("unhealthy at the first disk failure");
        assert!(reason.starts_with("disk full"), "{reason}");
        health.lock().last_probe = Some(Instant::now() - DISK_PROBE_INTERVAL);
        assert_eq!(health.unhealthy_reason(dir.path()), None, "the probe found room");
    }
}

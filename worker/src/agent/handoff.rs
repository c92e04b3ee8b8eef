//! The next job, asked for with a completion (`CompleteJobHeader.next`):
//! a busy worker takes its next lease in the call that ends its last job,
//! with no LeaseJob round trip and no slot standing empty until the main
//! loop next asks. A lease that comes this way is held at once (heartbeats
//! renew it from then on) and handed to the main loop, which runs it as
//! one it leased itself.

use std::sync::Arc;

use ptune_proto::v1;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::leases::{Directive, Leases};

/// A lease a completion brought, held, for the main loop to run.
pub type Handed = (v1::Lease, Directive);

/// What a completion asks for, and where the lease it brings goes.
/// Cheap to clone.
#[derive(Clone)]
pub struct Handoff {
    /// The request to send with a completion now; `None` while the worker
    /// takes no new work (it is draining or unhealthy).
    ask: Arc<dyn Fn() -> Option<v1::LeaseJobRequest> + Send + Sync>,
    leases: Leases,
    to_loop: mpsc::UnboundedSender<Handed>,
}

impl Handoff {
    /// A handoff asking with `ask`, and the main loop's end of it.
    pub fn new(
        ask: impl Fn() -> Option<v1::LeaseJobRequest> + Send + Sync + 'static,
        leases: Leases,
    ) -> (Self, mpsc::UnboundedReceiver<Handed>) {
        let (to_loop, handed) = mpsc::unbounded_channel();
        (Self { ask: Arc::new(ask), leases, to_loop }, handed)
    }

    /// The next-lease request for a completion about to be sent.
    pub fn ask(&self) -> Option<v1::LeaseJobRequest> {
        (self.ask)()
    }

    /// Holds `lease`, which a completion brought, and hands it to the main
    /// loop. A lease the loop can no longer take (the worker stopped) is
    /// dropped: it expires and its job is queued again.
    pub fn take(&self, lease: v1::Lease) {
        if uuid::Uuid::parse_str(&lease.job_id).is_err() {
            warn!(job_id = %lease.job_id, "lease names a job id that is not a UUID; ignoring it");
            return;
        }
        info!(job_id = %lease.job_id, epoch = lease.epoch, attempt = lease.attempt, devices = ?lease.devices,
              checkpoint_step = lease.checkpoint.as_ref().map(|c| c.step), "job leased with the last completion");
        let directive = self.leases.insert(&lease.job_id, lease.epoch, &lease.lease_token);
        let name = lease.spec.as_ref().map_or("", |s| s.name.as_str());
        let _ = crate::faults::at(crate::faults::Point::Handoff, name, 0);
        let (job_id, epoch) = (lease.job_id.clone(), lease.epoch);
        if self.to_loop.send((lease, directive)).is_err() {
            warn!(job_id, epoch, "the worker is stopping; the lease it was given expires");
            self.leases.remove(&job_id, epoch);
        }
    }
}

//! What a coordinator does to leases when it starts: nothing while another
//! coordinator is serving the fleet, a full lease period when none was.
//!
//! Workers renew their leases through whichever coordinator answers. When
//! every coordinator was down (a restart of the only one, an outage of all),
//! no renewal could land, so the leases of live workers may have run out
//! meanwhile; a starting coordinator then gives every open lease a full
//! period, so those workers reconnect before any of their jobs is reaped.
//! When a worker was served within `quiet` (another replica is up: a
//! rolling restart), the leases are left as they are, and a dead worker's
//! job is reaped on time rather than kept leased by every replica's start.

use std::time::Duration;

use tracing::instrument;

use super::{Result, Store};

impl Store {
    /// Extends every open lease to a full `timeout` from now, unless a
    /// worker heartbeat or lease request reached the database within
    /// `quiet`; returns how many leases were extended.
    #[instrument(skip_all)]
    pub async fn extend_leases_if_unserved(&self, timeout: Duration, quiet: Duration) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE job_attempts SET lease_expires_at = greatest(lease_expires_at, now() + $1 * interval '1 millisecond') \
             WHERE ended_at IS NULL AND NOT EXISTS ( \
                 SELECT 1 FROM workers \
                 WHERE greatest(last_heartbeat, polled_at) > now() - $2 * interval '1 millisecond')",
        )
        .bind(i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX))
        .bind(i64::try_from(quiet.as_millis()).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

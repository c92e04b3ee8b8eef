//! One leader among the coordinators on a database, for the maintenance
//! that must run once (removing files nothing reads any more) rather than
//! on every replica.
//!
//! The leader is whoever holds a PostgreSQL session advisory lock
//! ([`LOCK_KEY`]) on a connection of its own, outside the pool. PostgreSQL
//! releases the lock when that session ends, so a leader that dies, is
//! killed or is cut off from the database loses it within the server's
//! detection of the dead connection, and another replica, retrying every
//! [`RETRY`], takes it. The holder checks its connection every [`RETRY`]
//! too, and steps down as soon as a check fails. `ptune_coordinator_leader`
//! is 1 while a coordinator leads.
//!
//! A connection pooler in transaction mode between the coordinators and
//! PostgreSQL would break this (the lock belongs to a session): use session
//! mode, as for LISTEN.

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::store::Store;

/// The advisory lock's key: "ptune" and 1, as one 64-bit number.
pub const LOCK_KEY: i64 = 0x7074_756e_6500_0001;
/// How often a follower tries to lead, and a leader checks its connection.
pub const RETRY: Duration = Duration::from_secs(1);

/// Runs the election until `stop`; the receiver it returns says whether this
/// coordinator leads now.
pub fn spawn(store: Store, mut stop: watch::Receiver<bool>) -> (watch::Receiver<bool>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut session: Option<PgConnection> = None;
        loop {
            let leads = match session.as_mut() {
                Some(connection) => still_holds(connection).await,
                None => match try_lead(&store).await {
                    Some(connection) => {
                        session = Some(connection);
                        true
                    }
                    None => false,
                },
            };
            if !leads {
                session = None;
            }
            if *tx.borrow() != leads {
                if leads {
                    info!("this coordinator leads: it runs the maintenance that runs once");
                } else {
                    warn!("this coordinator no longer leads");
                }
                store.prometheus().set_leader(leads);
                let _ = tx.send(leads);
            }
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => break,
                () = tokio::time::sleep(RETRY) => {}
            }
        }
        if let Some(connection) = session {
            // Closing the session releases the lock for the next leader now.
            let _ = connection.close().await;
        }
        store.prometheus().set_leader(false);
    });
    (rx, task)
}

/// A connection holding the lock, or `None` when another session holds it
/// or the database cannot be reached.
async fn try_lead(store: &Store) -> Option<PgConnection> {
    let mut connection = match store.pool().acquire().await {
        Ok(connection) => connection,
        Err(e) => {
            debug!(error = %e, "cannot reach the database to run for leader");
            return None;
        }
    };
    // The connection leaves the pool only when it won the lock; a follower
    // hands it back, rather than opening a new one every second.
    match sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)").bind(LOCK_KEY).fetch_one(&mut *connection).await {
        Ok(true) => Some(connection.detach()),
        Ok(false) => None,
        Err(e) => {
            debug!(error = %e, "cannot run for leader");
            None
        }
    }
}

/// Whether the session still holds the lock.
async fn still_holds(connection: &mut PgConnection) -> bool {
    let held = sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted \
         AND objid = ($1 & x'ffffffff'::bigint)::oid AND classid = ($1 >> 32)::oid)",
    )
    .bind(LOCK_KEY)
    .fetch_one(connection)
    .await;
    match held {
        Ok(held) => held,
        Err(e) => {
            warn!(error = %e, "the leader's connection failed");
            false
        }
    }
}

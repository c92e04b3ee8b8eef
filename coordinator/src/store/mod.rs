//! All SQL of the coordinator. Every state change is one transaction; rows
//! that a change depends on are locked (`FOR UPDATE`, `SKIP LOCKED` for
//! queues), so two coordinators on one database never double-handle a job.
//! SQLSTATE codes are mapped to [`StoreError`] variants here and nowhere else.

pub mod admin;
#[macro_use]
mod attempts;
mod blobs;
mod cache;
mod checkpoints;
mod counts;
mod dashboard;
mod datasets;
mod endings;
mod fencing;
mod jobs;
mod leases;
mod leasing;
mod metrics;
mod objects;
mod progress;
mod retention;
mod sweep_drive;
mod sweeps;
mod takeover;
mod tokens;
mod workers;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use tracing::{info, instrument};

use crate::metrics::Metrics;

pub use dashboard::{
    AshaDecisionView, AttemptView, JobSort, JobSummary, JobTablePage, JobTableQuery, JobTotal, RecentWaits,
    SeriesPoint, TrialPoint, WorkerView, COUNT_CAP, MAX_SERIES_POINTS,
};
pub use blobs::{ChunkTarget, StoredFile, CHUNK_BYTES};
pub use objects::{BlobStore, FileRef, ObjectBackend};
pub use checkpoints::CheckpointStored;
pub use jobs::{CancelOutcome, EstimateLock, QueuePosition};
pub use retention::RetentionBatch;
pub use leasing::{Cycle, Cycled, LeaseAsk, Leased, QueueOutlook, QUEUE_HEADS_SQL, QUEUE_OUTLOOK_SQL};
pub use workers::{Availability, WorkerOwnership};
pub use fencing::Fenced;
pub use endings::{FailOutcome, Reaped};
pub use leases::{AdapterFile, CompleteOutcome, RENEW_LEASES_SQL};
pub use progress::merge_reports;
pub use sweep_drive::{DriveSweep, DriveTrial, NewTrial, Recorded, RungResult, SweepDrive};
pub use sweeps::{NewSweep, SweepChange};
pub use tokens::{AuditEntry, Refusal, TokenRecord};

/// Embedded migrations from the top-level `migrations/` folder.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Failures of the store, already sorted by what a caller can do about them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is shutting down; retry later.
    #[error("{0}")]
    Unavailable(#[source] sqlx::Error),
    /// A unique constraint was violated (the named constraint).
    #[error("conflict on {0}")]
    Conflict(String),
    /// A referenced row does not exist (the named constraint).
    #[error("missing reference {0}")]
    MissingReference(String),
    /// A stored value cannot be represented in the domain (a bug or manual edits).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("applying migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// The object store holding files failed or refused (its message).
    #[error("object store: {0}")]
    Objects(String),
}

impl StoreError {
    /// Whether the database could not be reached (retrying may help), also
    /// when that happened while applying migrations.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => {
                !matches!(e, sqlx::Error::Database(_))
            }
            _ => false,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            // A protocol error mid-conversation is a connection the server dropped.
            sqlx::Error::Io(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::BeginFailed => StoreError::Unavailable(e),
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default().into_owned();
                let constraint = db.constraint().unwrap_or_default().to_string();
                match code.as_str() {
                    "23505" => StoreError::Conflict(constraint),
                    "23503" => StoreError::MissingReference(constraint),
                    // Connection exceptions, shutdowns, too many connections,
                    // serialization failures and deadlocks: all worth a retry.
                    c if c.starts_with("08")
                        || c.starts_with("57P")
                        || c == "53300"
                        || c == "40001"
                        || c == "40P01" =>
                    {
                        StoreError::Unavailable(e)
                    }
                    _ => StoreError::Database(e),
                }
            }
            _ => StoreError::Database(e),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Handle to the database; cheap to clone. It also records, in
/// [`Metrics`], what only it sees: queue waits and lease latencies when it
/// leases, and leases it ends as expired.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// Connections whose statements are planned once, not on every call
    /// (`plan_cache_mode = force_generic_plan`), for leasing, progress and
    /// the model lookups of admission.
    /// Given arrays of ids, PostgreSQL planned those statements anew on each
    /// call (a plan for the actual array looked cheaper than one for any),
    /// which cost more than running them. The statements that page through
    /// large tables with optional filters stay on `pool`: their plans do
    /// depend on the values.
    hot: PgPool,
    metrics: Arc<Metrics>,
    /// This handle's name on its connections (`application_name`): the
    /// origin of the job events its writes send (migration 0011), so that
    /// a coordinator tells its own events from other replicas'.
    origin: Arc<str>,
    /// Where files' bytes go (`objects.rs`).
    files: Arc<objects::Files>,
    /// Token rows and worker registrations kept in memory (`cache.rs`).
    cache: Arc<Cache>,
    /// The jobs this handle's lease calls claimed lately (`leasing.rs`).
    claimed: Arc<leasing::Claimed>,
}

type Cache = cache::StoreCache<tokens::TokenRow, workers::Registration>;

impl Store {
    /// Connects a pool. Calls fail with [`StoreError::Unavailable`] after five
    /// seconds without a connection rather than hanging.
    #[instrument(skip_all)]
    pub async fn connect(url: &str) -> Result<Self> {
        let (options, origin) = Self::options(url)?;
        let hot = Self::hot_pool(&options);
        let pool = Self::pool_options().connect_with(options).await?;
        Ok(Self::with_pools(pool, hot, origin))
    }

    /// A pool that connects on first use, so a coordinator can start before
    /// its database; fails only for a url that cannot be parsed.
    pub fn connect_lazy(url: &str) -> Result<Self> {
        Self::lazy_with(Self::options(url)?)
    }

    /// As [`Self::connect_lazy`], for a coordinator that announces its own
    /// job events after commit (`announce.rs`): the triggers of its writes
    /// send none (migration 0019).
    pub fn connect_lazy_announcing(url: &str) -> Result<Self> {
        let (options, origin) = Self::options(url)?;
        Self::lazy_with((options.options([("ptune.announces", "on")]), origin))
    }

    fn lazy_with((options, origin): (PgConnectOptions, Arc<str>)) -> Result<Self> {
        let hot = Self::hot_pool(&options);
        let pool = Self::pool_options().connect_lazy_with(options);
        Ok(Self::with_pools(pool, hot, origin))
    }

    fn with_pools(pool: PgPool, hot: PgPool, origin: Arc<str>) -> Self {
        let (metrics, files, cache, claimed) = Default::default();
        Self { pool, hot, metrics, origin, files, cache, claimed }
    }

    /// The pool of [`Store::hot`], connecting on first use.
    fn hot_pool(options: &PgConnectOptions) -> PgPool {
        let options = options.clone().options([("plan_cache_mode", "force_generic_plan")]);
        Self::pool_options().connect_lazy_with(options)
    }

    /// A transaction on [`Self::hot`] whose statements that change a job's
    /// state append the change to `job_state_counts` themselves
    /// ([`counts::count_moved`]): the counting trigger skips their rows
    /// (`ptune.counts = 'own'`, migration 0023). Only statements that count
    /// their own moves may change a job's state in it. The setting is made
    /// with the `BEGIN`, in its round trip.
    async fn begin_counting(&self) -> Result<Transaction<'static, Postgres>> {
        Ok(self.hot.begin_with("BEGIN; SET LOCAL ptune.counts = 'own'").await?)
    }

    /// Each pool: 16 connections, and calls fail with
    /// [`StoreError::Unavailable`] after five seconds without one.
    fn pool_options() -> PgPoolOptions {
        PgPoolOptions::new().max_connections(16).acquire_timeout(Duration::from_secs(5))
    }

    fn options(url: &str) -> Result<(PgConnectOptions, Arc<str>)> {
        let origin: Arc<str> = format!("ptune-coordinator-{}", uuid::Uuid::new_v4().simple()).into();
        let options: PgConnectOptions = url.parse()?;
        Ok((options.application_name(&origin), origin))
    }

    /// The name this handle's writes carry as the origin of their events.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The change notifications of cached rows are heard from now on
    /// (`relay.rs`): the cache starts serving, from empty.
    pub(crate) fn trust_cache(&self) {
        self.cache.trust();
    }

    /// The change notifications may be missed from now on: the cache is
    /// emptied and every read goes to the database.
    pub(crate) fn distrust_cache(&self) {
        self.cache.distrust();
    }

    /// Drops the cached row a `ptune_cache` notification names; false for
    /// a payload that names none.
    pub(crate) fn forget_cached(&self, payload: &str) -> bool {
        let Some((kind, id)) = cache::CacheKind::parse(payload) else { return false };
        self.cache.forget(kind, id);
        true
    }

    /// The pool, for the event listener's own connection.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Sends `payloads` on `channel` in one statement whose transaction does
    /// not wait for a flush to disk: it writes nothing, and notifications are
    /// not kept across a crash anyway (`announce.rs`).
    pub(crate) async fn notify_all(&self, channel: &str, payloads: &[String]) -> Result<()> {
        sqlx::query(
            "SELECT count(pg_notify($1, p)) \
             FROM (SELECT set_config('synchronous_commit', 'off', true)) AS s, unnest($2::text[]) AS p",
        )
        .bind(channel)
        .bind(payloads)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The metrics this store's coordinator exposes.
    pub fn prometheus(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Applies pending migrations.
    #[instrument(skip_all)]
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        info!(migrations = MIGRATOR.iter().count(), "database schema is up to date");
        Ok(())
    }

    /// Round trip to the database.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// A transaction whose statements are planned for the values
    /// they are given (`plan_cache_mode = force_custom_plan`), for the
    /// keyset listings: a plan cached for any values could not use the
    /// cursor as an index bound and would read every row before a deep page.
    pub(super) async fn begin_custom_plans(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL plan_cache_mode = force_custom_plan").execute(&mut *tx).await?;
        Ok(tx)
    }

    /// Waits for checked-out connections to return, then closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
        self.hot.close().await;
    }
}

/// Reads an unsigned domain number stored in a signed column.
fn to_u64(value: i64, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {value}")))
}

fn to_u32(value: i32, what: &str) -> Result<u32> {
    u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {value}")))
}

/// Domain numbers are checked to fit before they reach the store; this
/// saturates rather than wrapping for the impossible rest.
fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

//! Taking a queued job: the SQL reads what [`crate::placement::place`]
//! decides on (the asking worker's running jobs, the other workers asking,
//! and the candidate jobs), then claims its pick. The rules and why the
//! pick does not depend on how candidates are paged are in `placement.rs`.
//!
//! Candidates are read without locks: first the head of the queue, a page
//! of the oldest jobs on the worker's models read per model from the
//! queue's index, so a lease costs the same with ten jobs queued or a
//! hundred thousand; only when placement passes over that whole page is the
//! queue read a page of classes at a time. The claim then locks the oldest
//! job of the pick's class (`Candidate::class`: the same model, estimate,
//! device count and settledness, so placement cannot tell it from the pick
//! but by age) that is still queued and that no one else holds (`FOR
//! UPDATE SKIP LOCKED`), first among the jobs of the class the page listed
//! (read by id), then in the whole queue, and reads it again: workers asking
//! at the same moment, who all pick the same oldest job, each get a
//! different one of its class instead of all but one coming away empty.
//! Under such contention a worker may get a younger job of the class than
//! the oldest of another class, so the queue's order holds per class. A
//! class with nothing left to claim is passed over and the next pick
//! placed: two workers never get the same job.
//!
//! Lease calls of many workers arriving together ([`Store::lease_group`])
//! share these reads and one claiming transaction: each call's pick is
//! placed over its own first page, passing over the picks of the calls
//! before it, and each class's picks lock that many of its oldest listed
//! jobs at once. [`Store::cycle`] does the same inside the transaction
//! that records the completions whose workers asked for their next lease,
//! so a completion and that lease commit once.
//!
//! A claim passes over the listed jobs that another lease call of this
//! coordinator claimed lately ([`Claimed`]). `FOR UPDATE` on a row whose
//! claim committed while the statement ran locks the row's new version
//! before it finds the job no longer queued, and PostgreSQL keeps that lock
//! until the claim commits: the job's own worker, reporting its first step,
//! waited for it. With a hundred workers asking at once, progress reports
//! and completions waited 2 to 5 ms on such locks on average.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ptune_core::{JobId, JobSpec};
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use tracing::{instrument, warn};
use uuid::Uuid;

use super::checkpoints::checkpoint_info;
use super::counts::count_moved;
use super::fencing::Fenced;
use super::jobs::memory_estimate;
use super::leases::{complete_in, AdapterFile, CompleteOutcome};
use super::{millis, to_i64, to_u32, to_u64, Result, Store};
use crate::model::{Completion, Lease, WorkerOffer};
use crate::placement::{self, Asker, Candidate, Rival, Running, CANDIDATES_PER_PAGE, POLL_FRESH, SPREAD_WINDOW};

/// Picks that others claimed first before a lease request gives up (the
/// worker asks again shortly).
const MAX_CLAIMS: usize = 8;

/// How long a claimed job is passed over by this coordinator's claims: a
/// page read before the claim may list it for that long at most.
const CLAIMED_FOR: Duration = Duration::from_secs(10);

/// The jobs this coordinator claimed within [`CLAIMED_FOR`], which its
/// other claims pass over (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Claimed(std::sync::Mutex<ClaimedJobs>);

#[derive(Debug, Default)]
struct ClaimedJobs {
    at: std::collections::HashMap<Uuid, Instant>,
    /// When claims older than [`CLAIMED_FOR`] were last forgotten.
    pruned: Option<Instant>,
}

impl Claimed {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClaimedJobs> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `listed` but the jobs claimed lately, in order.
    fn unclaimed(&self, listed: &[Uuid]) -> Vec<Uuid> {
        let claimed = self.lock();
        listed.iter().filter(|id| !claimed.at.get(id).is_some_and(|at| at.elapsed() < CLAIMED_FOR)).copied().collect()
    }

    /// `job` was claimed now. Claims older than [`CLAIMED_FOR`] are
    /// forgotten at most once a second, so the set holds what a few seconds
    /// of claims add, and an insert costs the same however fast jobs go.
    fn insert(&self, job: Uuid) {
        let mut claimed = self.lock();
        let now = Instant::now();
        if claimed.pruned.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
            claimed.at.retain(|_, at| now.duration_since(*at) < CLAIMED_FOR);
            claimed.pruned = Some(now);
        }
        claimed.at.insert(job, now);
    }
}

/// `training.devices` of job `$q`'s spec (1 when left out).
macro_rules! job_devices {
    ($q:literal) => {
        concat!("coalesce((", $q, ".spec->'training'->>'devices')::int, 1)")
    };
}

/// The columns of a candidate `q`; `$window` names the parameter holding
/// [`SPREAD_WINDOW`] in milliseconds.
macro_rules! candidate_columns {
    ($window:literal) => {
        concat!(
            "q.id, q.base_model, q.created_at, q.memory_weights_bytes, q.memory_job_bytes, \
             q.memory_activation_bytes, ",
            job_devices!("q"),
            " AS device_count, q.updated_at <= now() - ",
            $window,
            " * interval '1 millisecond' AS settled"
        )
    };
}

/// The oldest queued jobs whose retry time has passed (but `taken`) on
/// each model of `$1`, `$4` at most of each, read from the queue's index
/// (`jobs_queue_idx`, queued jobs only) so the read costs the same however
/// many jobs are queued or finished. The model is matched as a range of one
/// and the jobs ordered by it too, so that index is the only one that gives
/// the order: matched with `=`, the model drops out of the order and
/// PostgreSQL may walk `jobs_created_idx` from the oldest job instead,
/// filtering out every job that is no longer queued. It did so with
/// statistics taken while a large submission was all queued: every lease
/// then read each job leased or finished since (tests/hot_plans.rs).
pub const QUEUE_HEADS_SQL: &str = concat!(
    "SELECT c.* FROM unnest($1::text[]) AS m (model) \
     CROSS JOIN LATERAL ( \
         SELECT ",
    candidate_columns!("$2"),
    "    FROM jobs q \
         WHERE q.state = 'queued' AND q.base_model >= m.model AND q.base_model <= m.model \
           AND (q.retry_at IS NULL OR q.retry_at <= now()) AND q.id <> ALL($3) \
         ORDER BY q.base_model, q.created_at, q.id LIMIT $4) c"
);

/// For [`Store::queue_outlook`], given the models `$1` and the spread
/// window `$2` in milliseconds: whether a job on one of them is queued, and
/// in how many seconds a queued job's retry time passes or its window ends
/// (NULL: none will). Each part reads an index a little way: whether a
/// model has a job queued (the queue's index, per model, read as
/// [`QUEUE_HEADS_SQL`] reads it, for the same reason: asked whether any row
/// is queued with statistics that say all are, PostgreSQL scanned the whole
/// table), the earliest retry time to come (migration 0020) and the oldest
/// job still in its window. Aggregating over all queued jobs instead also
/// walked the index entries of every job leased since the last vacuum.
pub const QUEUE_OUTLOOK_SQL: &str = "SELECT EXISTS ( \
         SELECT 1 FROM unnest($1::text[]) AS m (model) \
         CROSS JOIN LATERAL ( \
             SELECT 1 FROM jobs q \
             WHERE q.state = 'queued' AND q.base_model >= m.model AND q.base_model <= m.model \
             ORDER BY q.base_model, q.created_at, q.id LIMIT 1) q), \
     extract(epoch FROM least( \
         (SELECT min(retry_at) FROM jobs \
          WHERE state = 'queued' AND retry_at IS NOT NULL AND retry_at > now() AND base_model = ANY($1)), \
         (SELECT updated_at + $2 * interval '1 millisecond' FROM jobs \
          WHERE state = 'queued' AND updated_at > now() - $2 * interval '1 millisecond' \
            AND base_model = ANY($1) \
          ORDER BY updated_at LIMIT 1)) - now())::float8";

#[derive(sqlx::FromRow)]
struct CandidateRow {
    id: Uuid,
    base_model: String,
    created_at: DateTime<Utc>,
    memory_weights_bytes: Option<i64>,
    memory_job_bytes: Option<i64>,
    memory_activation_bytes: Option<i64>,
    device_count: i32,
    settled: bool,
}

impl CandidateRow {
    fn into_candidate(self) -> Result<Candidate> {
        Ok(Candidate {
            id: JobId(self.id),
            estimate: memory_estimate(self.memory_weights_bytes, self.memory_job_bytes, self.memory_activation_bytes)?,
            base_model: self.base_model,
            devices: u32::try_from(self.device_count).unwrap_or(1),
            created_at: self.created_at,
            settled: self.settled,
        })
    }
}

/// The job placement picked, and the jobs of its class on the page it was
/// picked from, oldest first (the pick among them).
struct Pick {
    job: Candidate,
    listed: Vec<Uuid>,
}

/// The other workers asking for work ([`Store::rivals`]), read once
/// placement weighs a job still in its spread window: rule 2 is all that
/// reads them, and only for such jobs.
struct Rivals<'o> {
    worker: ptune_core::WorkerId,
    models: &'o [String],
    read: Option<Vec<Rival>>,
}

impl Rivals<'_> {
    /// The rivals placement needs to place `jobs`.
    async fn for_jobs(&mut self, store: &Store, jobs: &[Candidate]) -> Result<&[Rival]> {
        if self.read.is_none() && jobs.iter().any(|c| !c.settled) {
            self.read = Some(self.among(&store.polling().await?));
        }
        Ok(self.read.as_deref().unwrap_or_default())
    }

    /// Of the workers `polling`, those other than the asking one that serve
    /// one of its models, each with the models it serves of those.
    fn among(&self, polling: &[Polling]) -> Vec<Rival> {
        polling
            .iter()
            .filter(|p| p.id != self.worker.0)
            .filter_map(|p| {
                let serves: Vec<String> = p.serves.iter().filter(|m| self.models.contains(m)).cloned().collect();
                (!serves.is_empty()).then(|| Rival { serves, loaded: p.loaded.clone(), running: p.running })
            })
            .collect()
    }
}

/// A worker that asked for work within [`POLL_FRESH`] with a slot free.
struct Polling {
    id: Uuid,
    /// The base models it trains.
    serves: Vec<String>,
    loaded: Vec<String>,
    running: u32,
}

/// What [`Candidate::class`] reads, as a key of a map or set.
type ClassKey = (String, Option<(u64, u64, u64)>, u32, bool);

/// The class of `c`.
fn class_key(c: &Candidate) -> ClassKey {
    let (model, estimate, devices, settled) = c.class();
    (model.to_string(), estimate.map(|e| (e.weights_bytes, e.job_bytes, e.activation_bytes)), devices, settled)
}

#[derive(sqlx::FromRow)]
struct RunningRow {
    worker_id: Uuid,
    base_model: String,
    memory_weights_bytes: Option<i64>,
    memory_job_bytes: Option<i64>,
    memory_activation_bytes: Option<i64>,
    devices: Vec<String>,
}

/// The claimed job, as the claim read it.
#[derive(sqlx::FromRow)]
struct Locked {
    #[sqlx(flatten)]
    candidate: CandidateRow,
    queued_secs: f64,
}

/// A job as its claim leased it, and the checkpoint it resumes from.
#[derive(sqlx::FromRow)]
struct LeasedRow {
    id: Uuid,
    spec: Json<JobSpec>,
    attempts: i32,
    lease_epoch: i64,
    devices: Vec<String>,
    checkpoint_step: Option<i64>,
    checkpoint_sha256: Option<String>,
    checkpoint_size: Option<i64>,
}

/// A worker asking for a job, as [`Store::lease_group`] takes it.
#[derive(Clone, Debug)]
pub struct LeaseAsk {
    pub worker: ptune_core::WorkerId,
    pub offer: WorkerOffer,
}

/// What a lease call got: the lease, if any, and how many leasable jobs it
/// saw at the head of the queue.
pub type Leased = Result<(Option<Lease>, usize)>;

/// One call's part of [`Store::cycle`]: a completion, with the next lease
/// its worker asks for, or a lease call of its own.
#[derive(Clone, Debug)]
pub enum Cycle {
    Complete { completion: Completion, adapter: AdapterFile, next: Option<LeaseAsk> },
    Lease(LeaseAsk),
}

/// What a [`Cycle`] got: the completion's outcome and, where it asked for
/// one and completed, its next lease; or the lease call's.
#[derive(Debug)]
pub enum Cycled {
    Complete(Fenced<CompleteOutcome>, Option<Leased>),
    Lease(Leased),
}

/// The picks of [`Store::plan_together`], placed but not yet claimed.
struct Planned<'a> {
    outcome: Vec<Together>,
    /// Each pick: the ask's index, its worker as placement saw it, the
    /// rivals read for it, the job picked and how many jobs it saw.
    picks: Vec<(usize, Asker, Rivals<'a>, Candidate, usize)>,
    /// The head of the queue the picks were placed from.
    queued: Vec<Candidate>,
}

/// What an ask of a group got together: a lease (with how many leasable
/// jobs it saw and how long the job was queued), nothing it could take
/// among the jobs it saw, or a lease call of its own to make.
enum Together {
    Leased(Lease, usize, Duration),
    Seen(usize),
    Alone,
}

/// What [`Store::queue_outlook`] sees of the queue of some models.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QueueOutlook {
    /// Some job on them is queued, leasable now or not.
    pub queued: bool,
    /// How long until a queued job's retry time or spread window ends.
    pub changes_in: Option<Duration>,
}

impl Store {
    /// Leases to `worker` the queued job [`placement::place`] picks among
    /// those on the offer's models whose retry time has passed. The job
    /// becomes running under a new epoch and a new attempt is opened.
    pub async fn lease_next_job(
        &self,
        worker: ptune_core::WorkerId,
        offer: &WorkerOffer,
        timeout: Duration,
    ) -> Result<Option<Lease>> {
        Ok(self.lease_seeing(worker, offer, timeout).await?.0)
    }

    /// As [`Self::lease_next_job`]; also how many leasable jobs it saw at
    /// the head of the queue (at most a page), the one leased included.
    #[instrument(skip_all, fields(worker_id = %worker))]
    pub async fn lease_seeing(
        &self,
        worker: ptune_core::WorkerId,
        offer: &WorkerOffer,
        timeout: Duration,
    ) -> Result<(Option<Lease>, usize)> {
        let started = Instant::now();
        // An empty queue is seen without reading what placement weighs.
        let head = self.queue_head(offer, &[]).await?;
        let seen = head.len();
        if head.is_empty() {
            self.metrics.observe_lease(started.elapsed(), None);
            return Ok((None, 0));
        }
        let mut first = Some(head);
        let asker = Asker {
            loaded: offer.loaded.clone(),
            devices: offer.devices.clone(),
            running: self.running_on(&[worker.0], &[]).await?.remove(&worker.0).unwrap_or_default(),
        };
        let mut rivals = Rivals { worker, models: &offer.models, read: None };
        let mut taken = Vec::new();
        while taken.len() < MAX_CLAIMS {
            let Some(pick) = self.pick(&asker, &mut rivals, offer, &taken, first.take()).await? else { break };
            match self.claim(worker, &pick, &taken, &asker, &mut rivals, timeout).await? {
                Some((lease, queued_for)) => {
                    self.metrics.observe_lease(started.elapsed(), Some(queued_for));
                    return Ok((Some(lease), seen));
                }
                None => taken.push(pick.job.id.0),
            }
        }
        self.metrics.observe_lease(started.elapsed(), None);
        Ok((None, seen))
    }

    /// Leases to each of `asks` (of distinct workers, asking at the same
    /// time) what [`Self::lease_seeing`] would, the picks of all of them
    /// read and claimed together: one read of the head of the queue, one of
    /// the jobs they run, and one transaction that locks and leases every
    /// pick. Placement picks for each ask in turn, passing over the jobs
    /// picked for those before it; the picks of a class then lock the
    /// oldest jobs of the class that no one else holds. An ask left without
    /// one (other coordinators' claims hold them), or that needs more of the
    /// queue than its first page, is leased alone afterwards, as is each
    /// ask when the group's reads or transaction fail.
    pub async fn lease_group(&self, asks: &[LeaseAsk], timeout: Duration) -> Vec<Leased> {
        let started = Instant::now();
        let together = match asks {
            [_] => vec![Together::Alone],
            _ => self.lease_together(asks, timeout).await.unwrap_or_else(|error| {
                warn!(%error, asks = asks.len(), "leasing a group together failed; leasing each alone");
                asks.iter().map(|_| Together::Alone).collect()
            }),
        };
        self.settle(asks, together, started, timeout).await
    }

    /// Completes the completions of `cycles` and leases to their asks in
    /// one transaction, so that a worker's completion and its next lease
    /// (`CompleteJobHeader.next`) commit together: the completions as
    /// [`complete_in`] writes them, then the asks of those that completed (or
    /// had completed: a retry) and the lone lease calls as
    /// [`Self::lease_group`] would, placed with the jobs completed here no
    /// longer running. The leases are claimed after a savepoint: when
    /// claiming fails, the completions still commit and each ask is leased
    /// alone afterwards. An `Err` means nothing was written.
    #[instrument(skip_all, fields(cycles = cycles.len()))]
    pub async fn cycle(&self, cycles: &[Cycle], timeout: Duration) -> Result<Vec<Cycled>> {
        let started = Instant::now();
        let done: Vec<(&Completion, &AdapterFile)> = cycles
            .iter()
            .filter_map(|c| match c {
                Cycle::Complete { completion, adapter, .. } => Some((completion, adapter)),
                Cycle::Lease(_) => None,
            })
            .collect();
        if done.is_empty() {
            let asks: Vec<LeaseAsk> =
                cycles.iter().filter_map(|c| if let Cycle::Lease(a) = c { Some(a.clone()) } else { None }).collect();
            return Ok(self.lease_group(&asks, timeout).await.into_iter().map(Cycled::Lease).collect());
        }
        let mut tx = self.begin_counting().await?;
        let mut completed = complete_in(&mut tx, &done).await?.into_iter();
        let mut outcomes = Vec::with_capacity(cycles.len());
        // Which cycle each ask is of, and the jobs completed here.
        let (mut asks, mut of, mut ended) = (Vec::new(), Vec::new(), Vec::new());
        for (i, cycle) in cycles.iter().enumerate() {
            match cycle {
                Cycle::Complete { completion, next, .. } => {
                    let outcome = completed.next().expect("an outcome for each completion");
                    let finished = matches!(outcome, Fenced::Valid(CompleteOutcome::Completed));
                    if finished {
                        ended.push(completion.lease.job_id.0);
                    }
                    // A retried completion asks again: its first answer was lost.
                    let retried = outcome == Fenced::Valid(CompleteOutcome::AlreadyCompleted);
                    if let Some(ask) = next.as_ref().filter(|_| finished || retried) {
                        asks.push(ask.clone());
                        of.push(i);
                    }
                    outcomes.push(Some(outcome));
                }
                Cycle::Lease(ask) => {
                    asks.push(ask.clone());
                    of.push(i);
                    outcomes.push(None);
                }
            }
        }
        let mut claimed = Vec::new();
        let together = if asks.is_empty() {
            Vec::new()
        } else {
            match self.plan_together(&asks, &ended).await {
                Ok(planned) if planned.picks.is_empty() => planned.outcome,
                Ok(planned) => {
                    sqlx::query("SAVEPOINT lease").execute(&mut *tx).await?;
                    match self.claim_together(&mut tx, &asks, planned, timeout).await {
                        Ok((together, jobs)) => {
                            claimed = jobs;
                            together
                        }
                        Err(error) => {
                            warn!(%error, asks = asks.len(), "leasing with the completions failed; leasing each alone");
                            sqlx::query("ROLLBACK TO SAVEPOINT lease").execute(&mut *tx).await?;
                            asks.iter().map(|_| Together::Alone).collect()
                        }
                    }
                }
                Err(error) => {
                    warn!(%error, asks = asks.len(), "placing the asks of completions failed; leasing each alone");
                    asks.iter().map(|_| Together::Alone).collect()
                }
            }
        };
        tx.commit().await?;
        claimed.iter().for_each(|job| self.claimed.insert(*job));
        let mut leased: HashMap<usize, Leased> =
            of.into_iter().zip(self.settle(&asks, together, started, timeout).await).collect();
        Ok(cycles
            .iter()
            .zip(outcomes)
            .enumerate()
            .map(|(i, (cycle, outcome))| match (cycle, outcome) {
                (Cycle::Complete { .. }, Some(outcome)) => Cycled::Complete(outcome, leased.remove(&i)),
                _ => Cycled::Lease(leased.remove(&i).expect("a lone lease call is always leased")),
            })
            .collect())
    }

    /// What each of `asks` got from what it got together: a lease call of
    /// its own for each [`Together::Alone`].
    async fn settle(
        &self,
        asks: &[LeaseAsk],
        together: Vec<Together>,
        started: Instant,
        timeout: Duration,
    ) -> Vec<Leased> {
        let each = asks.iter().zip(together).map(|(ask, together)| async move {
            match together {
                Together::Leased(lease, seen, queued_for) => {
                    self.metrics.observe_lease(started.elapsed(), Some(queued_for));
                    Ok((Some(lease), seen))
                }
                Together::Seen(seen) => {
                    self.metrics.observe_lease(started.elapsed(), None);
                    Ok((None, seen))
                }
                Together::Alone => self.lease_seeing(ask.worker, &ask.offer, timeout).await,
            }
        });
        futures::future::join_all(each).await
    }

    /// The group part of [`Self::lease_group`]: what each ask got together.
    async fn lease_together(&self, asks: &[LeaseAsk], timeout: Duration) -> Result<Vec<Together>> {
        let planned = self.plan_together(asks, &[]).await?;
        if planned.picks.is_empty() {
            return Ok(planned.outcome);
        }
        let mut tx = self.begin_counting().await?;
        let (outcome, claimed) = self.claim_together(&mut tx, asks, planned, timeout).await?;
        tx.commit().await?;
        claimed.iter().for_each(|job| self.claimed.insert(*job));
        Ok(outcome)
    }

    /// Placement's pick for each of `asks` in turn, passing over the jobs
    /// picked for those before it, from one read of the head of the queue
    /// and one of the jobs the asking workers run (but `ended`).
    async fn plan_together<'a>(&self, asks: &'a [LeaseAsk], ended: &[Uuid]) -> Result<Planned<'a>> {
        let mut models: Vec<String> = asks.iter().flat_map(|a| a.offer.models.iter().cloned()).collect();
        models.sort();
        models.dedup();
        // A page of each model beyond the jobs the asks before the last may pick.
        let queued = self.queue_heads(&models, &[], CANDIDATES_PER_PAGE as usize + asks.len()).await?;
        if queued.is_empty() {
            return Ok(Planned { outcome: asks.iter().map(|_| Together::Seen(0)).collect(), picks: Vec::new(), queued });
        }
        let workers: Vec<Uuid> = asks.iter().map(|a| a.worker.0).collect();
        let mut running = self.running_on(&workers, ended).await?;
        let polling = if queued.iter().any(|c| !c.settled) { Some(self.polling().await?) } else { None };
        let mut outcome: Vec<Together> = Vec::with_capacity(asks.len());
        let mut picked = HashSet::new();
        let mut picks = Vec::new();
        for (index, ask) in asks.iter().enumerate() {
            let head = head_of(&queued, &ask.offer, &picked);
            let asker = Asker {
                loaded: ask.offer.loaded.clone(),
                devices: ask.offer.devices.clone(),
                running: running.remove(&ask.worker.0).unwrap_or_default(),
            };
            let mut rivals = Rivals { worker: ask.worker, models: &ask.offer.models, read: None };
            if let Some(polling) = &polling {
                rivals.read = Some(rivals.among(polling));
            }
            outcome.push(match self.place_head(&asker, &mut rivals, &head).await? {
                Some(pick) => {
                    picked.insert(pick.job.id.0);
                    picks.push((index, asker, rivals, pick.job, head.len()));
                    Together::Alone
                }
                None if head.len() < CANDIDATES_PER_PAGE as usize => Together::Seen(head.len()),
                None => Together::Alone,
            });
        }
        Ok(Planned { outcome, picks, queued })
    }

    /// Locks and leases in `tx` the picks of [`Self::plan_together`]; what
    /// each ask got, and the jobs claimed (for [`Claimed`] once committed).
    async fn claim_together(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        asks: &[LeaseAsk],
        planned: Planned<'_>,
        timeout: Duration,
    ) -> Result<(Vec<Together>, Vec<Uuid>)> {
        let Planned { mut outcome, picks, queued } = planned;
        // Jobs of one class are alike to placement but for their age, so the
        // picks of a class lock the oldest of its listed jobs that no one
        // else holds, as many as there are picks, and take them in the
        // asks' order: where another coordinator's claim holds the jobs
        // they picked, they get the next ones instead of each leasing alone.
        let mut classes: Vec<(ClassKey, usize)> = Vec::new();
        for (_, _, _, job, _) in &picks {
            let class = class_key(job);
            match classes.iter_mut().find(|(c, _)| *c == class) {
                Some((_, n)) => *n += 1,
                None => classes.push((class, 1)),
            }
        }
        let mut locked: HashMap<ClassKey, std::vec::IntoIter<Locked>> = HashMap::new();
        for (class, n) in classes {
            let listed: Vec<Uuid> = queued.iter().filter(|c| class_key(c) == class).map(|c| c.id.0).collect();
            let rows = lock_listed(tx, &self.claimed.unclaimed(&listed), n).await?;
            locked.insert(class, rows.into_iter());
        }
        let mut claims = Vec::new();
        let mut seen = Vec::new();
        for (index, asker, mut rivals, job, head) in picks {
            // None left of its class (others hold them): leased alone.
            let Some(Locked { candidate, queued_secs }) = locked.get_mut(&class_key(&job)).and_then(Iterator::next)
            else {
                continue;
            };
            let candidate = [candidate.into_candidate()?];
            let Some(placed) = placement::place(&asker, rivals.for_jobs(self, &candidate).await?, &candidate) else {
                continue;
            };
            claims.push(Claim { job: candidate[0].id, worker: asks[index].worker, devices: placed.devices, queued_secs });
            seen.push((index, head));
        }
        let leases = lease_claimed(tx, &claims, timeout).await?;
        for ((claim, lease), (index, head)) in claims.iter().zip(leases).zip(seen) {
            outcome[index] = Together::Leased(lease, head, claim.queued_for());
        }
        Ok((outcome, claims.iter().map(|c| c.job.0).collect()))
    }

    /// The job placement picks, passing over `taken`. It first reads the
    /// oldest queued jobs ([`Self::queue_head`]; `first` when already read
    /// with the same `taken`): the pick is nearly always among them. When
    /// placement passes over a whole page of them, it reads the queue a page
    /// of classes at a time ([`Self::classes`]), which skips the jobs of the
    /// classes it passed over however many they are.
    async fn pick(
        &self,
        asker: &Asker,
        rivals: &mut Rivals<'_>,
        offer: &WorkerOffer,
        taken: &[Uuid],
        first: Option<Vec<Candidate>>,
    ) -> Result<Option<Pick>> {
        let head = match first {
            Some(head) => head,
            None => self.queue_head(offer, taken).await?,
        };
        if let Some(pick) = self.place_head(asker, rivals, &head).await? {
            return Ok(Some(pick));
        }
        if head.len() < CANDIDATES_PER_PAGE as usize {
            return Ok(None);
        }
        let mut after: Option<Candidate> = None;
        loop {
            let page = self.classes(offer, taken, after.as_ref()).await?;
            if let Some(placed) = placement::place(asker, rivals.for_jobs(self, &page).await?, &page) {
                return Ok(Some(Pick { job: placed.job.clone(), listed: vec![placed.job.id.0] }));
            }
            if page.len() < CANDIDATES_PER_PAGE as usize {
                return Ok(None);
            }
            after = page.into_iter().last();
        }
    }

    /// The job placement picks of `head`, a page of the queue's oldest jobs
    /// ([`head_of`]), placing the oldest of each class.
    async fn place_head(&self, asker: &Asker, rivals: &mut Rivals<'_>, head: &[Candidate]) -> Result<Option<Pick>> {
        let mut seen = HashSet::new();
        let oldest: Vec<Candidate> = head.iter().filter(|c| seen.insert(class_key(c))).cloned().collect();
        let Some(placed) = placement::place(asker, rivals.for_jobs(self, &oldest).await?, &oldest) else {
            return Ok(None);
        };
        let class = class_key(placed.job);
        let listed = head.iter().filter(|c| class_key(c) == class).map(|c| c.id.0).collect();
        Ok(Some(Pick { job: placed.job.clone(), listed }))
    }

    /// Whether any job on one of `models` is queued, leasable now or not,
    /// and how long until one changes for placement by time alone: its
    /// retry time passes, or its [`SPREAD_WINDOW`] ends and any worker may
    /// take it. Nothing is notified then, so a lease call waiting for work
    /// looks again at that time ([`QUEUE_OUTLOOK_SQL`]).
    #[instrument(skip_all)]
    pub async fn queue_outlook(&self, models: &[String]) -> Result<QueueOutlook> {
        let (queued, secs): (bool, Option<f64>) = sqlx::query_as(QUEUE_OUTLOOK_SQL)
            .bind(models)
            .bind(millis(SPREAD_WINDOW))
            .fetch_one(&self.pool)
            .await?;
        Ok(QueueOutlook {
            queued,
            changes_in: secs.map(|s| Duration::try_from_secs_f64(s).unwrap_or_default()),
        })
    }

    /// The jobs each of `workers` runs but `ended` (completed in a
    /// transaction not yet committed), with their estimates (none for a
    /// worker running none).
    async fn running_on(&self, workers: &[Uuid], ended: &[Uuid]) -> Result<HashMap<Uuid, Vec<Running>>> {
        let rows: Vec<RunningRow> = sqlx::query_as(
            "SELECT a.worker_id, j.base_model, j.memory_weights_bytes, j.memory_job_bytes, j.memory_activation_bytes, \
                    a.devices \
             FROM jobs j JOIN job_attempts a ON a.job_id = j.id AND a.epoch = j.lease_epoch \
             WHERE a.worker_id = ANY($1) AND a.ended_at IS NULL AND j.state = 'running' AND j.id <> ALL($2)",
        )
        .bind(workers)
        .bind(ended)
        .fetch_all(&self.hot)
        .await?;
        let mut running: HashMap<Uuid, Vec<Running>> = HashMap::new();
        for r in rows {
            let estimate = memory_estimate(r.memory_weights_bytes, r.memory_job_bytes, r.memory_activation_bytes)?;
            let job = Running { base_model: r.base_model, estimate, devices: r.devices };
            running.entry(r.worker_id).or_default().push(job);
        }
        Ok(running)
    }

    /// The workers that asked for work within [`POLL_FRESH`] with a slot
    /// free, with the models they train (those are all they say).
    async fn polling(&self) -> Result<Vec<Polling>> {
        let rows: Vec<(Uuid, Vec<String>, Vec<String>, i64)> = sqlx::query_as(
            "SELECT o.id, \
                    ARRAY(SELECT m->>'name' FROM jsonb_array_elements(o.models) m \
                          WHERE coalesce(m->>'unsupported_reason', '') = '') AS serves, \
                    o.loaded_models, \
                    (SELECT count(*) FROM job_attempts a JOIN jobs j ON j.id = a.job_id AND j.lease_epoch = a.epoch \
                     WHERE a.worker_id = o.id AND a.ended_at IS NULL AND j.state = 'running') AS running \
             FROM workers o \
             WHERE o.free_slots > 0 AND o.polled_at > now() - $1 * interval '1 millisecond'",
        )
        .bind(millis(POLL_FRESH))
        .fetch_all(&self.hot)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, serves, loaded, running)| Polling {
                id,
                serves,
                loaded,
                running: u32::try_from(running).unwrap_or(u32::MAX),
            })
            .collect())
    }

    /// The first page of the queued jobs on the offer's models whose retry
    /// time has passed (but `taken`), in the order placement prefers them
    /// ([`head_of`]).
    async fn queue_head(&self, offer: &WorkerOffer, taken: &[Uuid]) -> Result<Vec<Candidate>> {
        let queued = self.queue_heads(&offer.models, taken, CANDIDATES_PER_PAGE as usize).await?;
        Ok(head_of(&queued, offer, &HashSet::new()))
    }

    /// The oldest queued jobs whose retry time has passed (but `taken`) on
    /// each of `models`, `per_model` at most of each ([`QUEUE_HEADS_SQL`]).
    async fn queue_heads(&self, models: &[String], taken: &[Uuid], per_model: usize) -> Result<Vec<Candidate>> {
        let rows: Vec<CandidateRow> = sqlx::query_as(QUEUE_HEADS_SQL)
            .bind(models)
            .bind(millis(SPREAD_WINDOW))
            .bind(taken)
            .bind(i64::try_from(per_model).unwrap_or(i64::MAX))
            .fetch_all(&self.hot)
            .await?;
        rows.into_iter().map(CandidateRow::into_candidate).collect()
    }

    /// A page of classes after `after`: of the queued jobs on the offer's
    /// models whose retry time has passed (but `taken`), the oldest of each
    /// [`Candidate::class`], in the order placement prefers them. It reads
    /// every such job, once per page.
    async fn classes(&self, offer: &WorkerOffer, taken: &[Uuid], after: Option<&Candidate>) -> Result<Vec<Candidate>> {
        let rows: Vec<CandidateRow> = sqlx::query_as(concat!(
            "SELECT * FROM ( \
                 SELECT DISTINCT ON (q.base_model, q.memory_weights_bytes, q.memory_job_bytes, \
                                     q.memory_activation_bytes, device_count, settled) ",
            candidate_columns!("$3"),
            "    FROM jobs q \
                 WHERE q.state = 'queued' AND q.base_model = ANY($1) AND (q.retry_at IS NULL OR q.retry_at <= now()) \
                   AND q.id <> ALL($4) \
                 ORDER BY q.base_model, q.memory_weights_bytes, q.memory_job_bytes, q.memory_activation_bytes, \
                          device_count, settled, q.created_at, q.id) c \
             WHERE $5::timestamptz IS NULL \
                OR (NOT c.base_model = ANY($2), c.created_at, c.id) > (NOT $6 = ANY($2), $5, $7::uuid) \
             ORDER BY NOT c.base_model = ANY($2), c.created_at, c.id \
             LIMIT $8"
        ))
        .bind(&offer.models)
        .bind(&offer.loaded)
        .bind(millis(SPREAD_WINDOW))
        .bind(taken)
        .bind(after.map(|c| c.created_at))
        .bind(after.map(|c| c.base_model.as_str()))
        .bind(after.map(|c| c.id.0))
        .bind(i64::from(CANDIDATES_PER_PAGE))
        .fetch_all(&self.hot)
        .await?;
        rows.into_iter().map(CandidateRow::into_candidate).collect()
    }

    /// Locks the oldest queued job of `pick`'s class (but `taken`) that no
    /// one else holds, checks that placement still gives it to `asker`, and
    /// leases it to `worker`. Returns the lease and how long the job was
    /// queued; `None` when the class has no job left to be had.
    async fn claim(
        &self,
        worker: ptune_core::WorkerId,
        pick: &Pick,
        taken: &[Uuid],
        asker: &Asker,
        rivals: &mut Rivals<'_>,
        timeout: Duration,
    ) -> Result<Option<(Lease, Duration)>> {
        let mut tx = self.begin_counting().await?;
        let claimed = match lock_listed(&mut tx, &self.claimed.unclaimed(&pick.listed), 1).await?.pop() {
            Some(claimed) => Some(claimed),
            None => lock_oldest_of_class(&mut tx, &pick.job, taken).await?,
        };
        let Some(Locked { candidate, queued_secs }) = claimed else { return Ok(None) };
        let candidate = [candidate.into_candidate()?];
        let job = candidate[0].id;
        let Some(placed) = placement::place(asker, rivals.for_jobs(self, &candidate).await?, &candidate) else {
            return Ok(None);
        };
        let claim = Claim { job, worker, devices: placed.devices, queued_secs };
        self.claimed.insert(job.0);
        let lease = lease_claimed(&mut tx, std::slice::from_ref(&claim), timeout).await?.remove(0);
        tx.commit().await?;
        Ok(Some((lease, claim.queued_for())))
    }
}

/// A job locked for a worker, and the devices placement gave it.
struct Claim {
    job: JobId,
    worker: ptune_core::WorkerId,
    devices: Vec<String>,
    /// How long the job was queued.
    queued_secs: f64,
}

impl Claim {
    fn queued_for(&self) -> Duration {
        Duration::try_from_secs_f64(self.queued_secs).unwrap_or_default()
    }
}

/// Leases each locked job of `claims` to its worker, in one statement: the
/// job's new lease, its attempt, the worker's slot, the count of jobs per
/// state and the checkpoint to resume from, in `tx` of
/// [`Store::begin_counting`]. The leases are in the order of `claims`.
async fn lease_claimed(
    tx: &mut Transaction<'static, Postgres>,
    claims: &[Claim],
    timeout: Duration,
) -> Result<Vec<Lease>> {
    let tokens: Vec<(String, [u8; 32])> = claims.iter().map(|_| crate::auth::tokens::lease_token()).collect();
    let rows: Vec<LeasedRow> = sqlx::query_as(concat!(
        "WITH l AS ( \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::jsonb[], $4::bytea[]) \
                 AS l (job_id, worker_id, devices, token_hash)), \
         j AS ( \
             UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_epoch = lease_epoch + 1, \
                 cancel_requested = false, retry_at = NULL, started_at = coalesce(started_at, now()), \
                 updated_at = now(), devices = ARRAY(SELECT jsonb_array_elements_text(l.devices)) \
             FROM l WHERE jobs.id = l.job_id AND jobs.state = 'queued' \
             RETURNING jobs.id, jobs.spec, jobs.attempts, jobs.lease_epoch, jobs.devices, l.worker_id, l.token_hash), ",
        count_moved!("j", "queued", "running"),
        ", \
         a AS ( \
             INSERT INTO job_attempts \
                 (job_id, attempt, worker_id, epoch, lease_expires_at, lease_token_hash, devices) \
             SELECT j.id, j.attempts, j.worker_id, j.lease_epoch, now() + $5 * interval '1 millisecond', \
                    j.token_hash, j.devices FROM j), \
         w AS (UPDATE workers SET free_slots = greatest(free_slots - 1, 0) FROM l WHERE workers.id = l.worker_id) \
         SELECT j.id, j.spec, j.attempts, j.lease_epoch, j.devices, c.step AS checkpoint_step, \
                c.sha256 AS checkpoint_sha256, c.size AS checkpoint_size \
         FROM j LEFT JOIN LATERAL ( \
             SELECT step, sha256, size FROM job_checkpoints WHERE job_id = j.id AND complete \
             ORDER BY step DESC LIMIT 1) c ON true"
    ))
    .bind(claims.iter().map(|c| c.job.0).collect::<Vec<_>>())
    .bind(claims.iter().map(|c| c.worker.0).collect::<Vec<_>>())
    .bind(claims.iter().map(|c| Json(&c.devices)).collect::<Vec<_>>())
    .bind(tokens.iter().map(|(_, hash)| &hash[..]).collect::<Vec<_>>())
    .bind(millis(timeout))
    .fetch_all(&mut **tx)
    .await?;
    let mut rows: HashMap<Uuid, LeasedRow> = rows.into_iter().map(|r| (r.id, r)).collect();
    claims
        .iter()
        .zip(tokens)
        .map(|(claim, (lease_token, _))| {
            let row = rows.remove(&claim.job.0).ok_or_else(|| {
                super::StoreError::Corrupt(format!("job {} was locked for a lease but not leased", claim.job))
            })?;
            let LeasedRow { spec, attempts, lease_epoch, devices, checkpoint_step, checkpoint_sha256, checkpoint_size, .. } =
                row;
            let checkpoint = match (checkpoint_step, checkpoint_sha256, checkpoint_size) {
                (Some(step), Some(sha256), Some(size)) => Some(checkpoint_info(step, sha256, size)?),
                _ => None,
            };
            Ok(Lease {
                job_id: claim.job,
                epoch: to_u64(lease_epoch, "lease_epoch")?,
                spec: spec.0,
                attempt: to_u32(attempts, "attempts")?,
                checkpoint,
                lease_token,
                devices,
            })
        })
        .collect()
}

/// The first page of the jobs of `queued` on the offer's models but
/// `passed`, in the order placement prefers them: jobs on a model the
/// worker holds first, then by submission and id. `queued` holds the oldest
/// of each model, at least a page of each beyond those `passed`, so this is
/// the page a read of the whole queue would give.
fn head_of(queued: &[Candidate], offer: &WorkerOffer, passed: &HashSet<Uuid>) -> Vec<Candidate> {
    let mut head: Vec<Candidate> = queued
        .iter()
        .filter(|c| offer.models.contains(&c.base_model) && !passed.contains(&c.id.0))
        .cloned()
        .collect();
    head.sort_by_key(|c| (!offer.loaded.contains(&c.base_model), c.created_at, c.id.0));
    head.truncate(CANDIDATES_PER_PAGE as usize);
    head
}

/// Of the jobs `listed` (ids of one class, oldest first, as a page read
/// them), locks the `n` oldest still queued and leasable that no one else
/// holds, oldest first. Reading them by id passes over none of the jobs leased since the
/// page was read, as a walk of the queue's index would until it is
/// vacuumed.
async fn lock_listed(tx: &mut Transaction<'static, Postgres>, listed: &[Uuid], n: usize) -> Result<Vec<Locked>> {
    // Joined to the list in its order, each job is read by its key: asked
    // for `id = ANY(..)` ordered by age, PostgreSQL also scanned the whole
    // queue's index for `state = 'queued'` (a bitmap AND), which cost more
    // than all the rest of a lease with a few thousand jobs queued. A queued
    // job's updated_at is when it was queued (submitted or requeued).
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        candidate_columns!("$2"),
        ", extract(epoch FROM now() - q.updated_at)::float8 AS queued_secs \
         FROM unnest($1::uuid[]) WITH ORDINALITY AS l (id, n) \
         CROSS JOIN LATERAL (SELECT * FROM jobs j WHERE j.id = l.id OFFSET 0) q \
         WHERE q.state = 'queued' AND (q.retry_at IS NULL OR q.retry_at <= now()) \
         ORDER BY l.n LIMIT $3 \
         FOR UPDATE OF q SKIP LOCKED"
    ))
    .bind(listed)
    .bind(millis(SPREAD_WINDOW))
    .bind(i64::try_from(n).unwrap_or(i64::MAX))
    .fetch_all(&mut **tx)
    .await?)
}

/// Locks the oldest queued and leasable job of `pick`'s class (but
/// `taken`) that no one else holds, through the queue's index as
/// [`QUEUE_HEADS_SQL`] reads it.
async fn lock_oldest_of_class(
    tx: &mut Transaction<'static, Postgres>,
    pick: &Candidate,
    taken: &[Uuid],
) -> Result<Option<Locked>> {
    let estimate = pick.estimate;
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        candidate_columns!("$2"),
        ", extract(epoch FROM now() - q.updated_at)::float8 AS queued_secs \
         FROM jobs q \
         WHERE q.state = 'queued' AND q.base_model >= $1 AND q.base_model <= $1 \
           AND (q.retry_at IS NULL OR q.retry_at <= now()) \
           AND q.memory_weights_bytes IS NOT DISTINCT FROM $3 AND q.memory_job_bytes IS NOT DISTINCT FROM $4 \
           AND q.memory_activation_bytes IS NOT DISTINCT FROM $5 \
           AND (q.updated_at <= now() - $2 * interval '1 millisecond') = $6 AND q.id <> ALL($7) AND ",
        job_devices!("q"),
        " = $8 \
         ORDER BY q.base_model, q.created_at, q.id LIMIT 1 \
         FOR UPDATE SKIP LOCKED"
    ))
    .bind(&pick.base_model)
    .bind(millis(SPREAD_WINDOW))
    .bind(estimate.map(|e| to_i64(e.weights_bytes)))
    .bind(estimate.map(|e| to_i64(e.job_bytes)))
    .bind(estimate.map(|e| to_i64(e.activation_bytes)))
    .bind(pick.settled)
    .bind(taken)
    .bind(i32::try_from(pick.devices).unwrap_or(i32::MAX))
    .fetch_optional(&mut **tx)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_passes_over_jobs_claimed_lately_and_forgets_old_claims() {
        let claimed = Claimed::default();
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        claimed.insert(ids[1]);
        claimed.insert(ids[3]);
        assert_eq!(claimed.unclaimed(&ids), vec![ids[0], ids[2]], "the others, in the listed order");
        let long_ago = Instant::now() - CLAIMED_FOR;
        claimed.lock().at.insert(ids[0], long_ago);
        assert_eq!(claimed.unclaimed(&ids), vec![ids[0], ids[2]], "a claim older than CLAIMED_FOR is not passed over");
        claimed.lock().pruned = Some(long_ago);
        claimed.insert(ids[2]);
        let kept: std::collections::HashSet<Uuid> = claimed.lock().at.keys().copied().collect();
        assert_eq!(kept, [ids[1], ids[2], ids[3]].into_iter().collect(), "the old claim is forgotten");
    }
}

//! Engine threads: libtorch work never runs on the async runtime. Each thread
//! owns an [`Engine`] and takes training runs from a shared queue; all of
//! them share one [`ModelCache`], so the process holds each frozen base
//! model once whatever the number of slots.
//!
//! Jobs on a shared frozen base (every method but full fine-tuning:
//! classification on an encoder, causal LM on a decoder) train in packs:
//! the thread that takes such a job opens a pack for its base model and
//! task, and jobs of the same kind that arrive while it runs join it between
//! steps, up to the pack limits, instead of starting on a thread of their
//! own. Full fine-tuning runs alone.
//!
//! Every run, packed or alone, runs under `catch_unwind`: a panic ends the
//! runs on that thread with [`EngineError::Panicked`] and the thread takes
//! the next run. A thread that stops making progress (the watchdog in
//! `job.rs` sees its runs' [`Liveness`] go silent) is abandoned: a new
//! thread takes its place, and the stuck one exits if it ever wakes up.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use ptune_core::{Method, Metric, Precision, Task};
use tokio::sync::mpsc::UnboundedSender;

use super::archive::{self, Archive};
use crate::engine::liveness::{self, Liveness};
use crate::engine::{
    panic_message, Control, Engine, EngineError, Event, ModelCache, PackJob, PackLimits, TrainJob, TrainOutcome,
};

/// What an engine thread tells the async side about a run.
#[derive(Debug)]
pub enum RunUpdate {
    Step { step: u64, total_steps: u64, metrics: Vec<Metric> },
    Eval { step: u64, metrics: Vec<Metric> },
    /// A checkpoint of `step` was written and packed into `archive`.
    Checkpoint { step: u64, archive: Archive },
    Done(Result<TrainOutcome, EngineError>),
}

/// One training run for an engine thread.
pub struct RunRequest {
    pub model_dir: PathBuf,
    pub job: TrainJob,
    /// The devices the lease gave the job, this pool's device first. Runs
    /// train on this pool's device; a data-parallel job (`training.devices`
    /// above 1) runs one rank on each.
    pub devices: Vec<tch::Device>,
    pub directive: super::Directive,
    pub updates: UnboundedSender<RunUpdate>,
    /// Stamped while the run makes progress on a thread.
    pub liveness: Liveness,
    /// Where archives of the run's checkpoints are written.
    pub archive_dir: PathBuf,
    /// The engine thread that holds the run, once one took it.
    pub thread: Arc<AtomicUsize>,
}

/// No thread holds the run yet.
pub const NO_THREAD: usize = usize::MAX;

/// Which runs may share a pack: one task on one model in one precision
/// (the pack's passes run through one copy of the base).
#[derive(Clone, Debug, PartialEq, Eq)]
struct PackKey {
    model_dir: PathBuf,
    task: Task,
    precision: Precision,
}

/// How the engine thread reaches a run's owner after it left the engine's
/// hands (for a panic that cut its pack short).
struct RunEnd {
    updates: UnboundedSender<RunUpdate>,
    liveness: Liveness,
    done: Arc<AtomicBool>,
}

impl RunEnd {
    fn finish(&self, result: Result<TrainOutcome, EngineError>) {
        if !self.done.swap(true, Ordering::SeqCst) {
            liveness::detach(&self.liveness);
            let _ = self.updates.send(RunUpdate::Done(result));
        }
    }
}

impl RunRequest {
    /// What a run must share with others to pack with them; none for full
    /// fine-tuning and for data-parallel runs (`training.devices` above 1),
    /// which train alone.
    fn pack_key(&self) -> Option<PackKey> {
        let spec = &self.job.spec;
        (spec.method != Method::Full && spec.training.devices <= 1).then(|| PackKey {
            model_dir: self.model_dir.clone(),
            task: spec.task,
            precision: spec.training.precision,
        })
    }

    /// The run's callbacks for the engine, once `thread` holds it: every
    /// event goes to the async side (checkpoints packed into archives
    /// first); the directive answers each event.
    fn into_pack_job(self, thread: usize) -> (PackJob, RunEnd) {
        let RunRequest { job, directive, updates, liveness, archive_dir, thread: holder, .. } = self;
        holder.store(thread, Ordering::SeqCst);
        liveness::attach(&liveness);
        let end = RunEnd { updates: updates.clone(), liveness, done: Arc::default() };
        let done = RunEnd { updates: end.updates.clone(), liveness: end.liveness.clone(), done: end.done.clone() };
        let job = PackJob {
            job,
            on_event: Box::new(move |event| {
                if let Some(update) = update_of(event, &archive_dir) {
                    let _ = updates.send(update);
                }
                directive.control()
            }),
            on_done: Box::new(move |result| done.finish(result)),
        };
        (job, end)
    }
}

fn update_of(event: Event<'_>, archive_dir: &std::path::Path) -> Option<RunUpdate> {
    Some(match event {
        Event::Step { step, total_steps, metrics } => RunUpdate::Step { step, total_steps, metrics: metrics.to_vec() },
        Event::Eval { step, metrics } => RunUpdate::Eval { step, metrics: metrics.to_vec() },
        Event::Checkpoint { step, dir } => {
            // Packed here, on the engine thread, before the next step can
            // replace the folder.
            let out = archive_dir.join(format!("checkpoint-{step}.tar"));
            match archive::pack(dir, &out) {
                Ok(archive) => RunUpdate::Checkpoint { step, archive },
                Err(e) => {
                    tracing::warn!(step, error = %format!("{e:#}"), "cannot pack the checkpoint for upload; it stays local");
                    return None;
                }
            }
        }
    })
}

/// The queue and the packs that are open.
#[derive(Default)]
struct Queue {
    pending: VecDeque<RunRequest>,
    /// Each open pack's key and how many more jobs it takes.
    packs: Vec<(u64, PackKey, usize)>,
    next_pack: u64,
    closed: bool,
}

impl Queue {
    /// True when an open pack will take a run with `key` at its next step.
    fn claimed(&self, key: &Option<PackKey>) -> bool {
        key.as_ref().is_some_and(|key| self.packs.iter().any(|(_, k, room)| k == key && *room > 0))
    }
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    limits: PackLimits,
    /// Threads given up on because they stopped making progress.
    abandoned: Mutex<HashSet<usize>>,
    next_thread: AtomicUsize,
    cache: Arc<ModelCache>,
    torch_threads: u32,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_abandoned(&self, thread: usize) -> bool {
        self.abandoned.lock().unwrap_or_else(|e| e.into_inner()).contains(&thread)
    }

    /// The next run no open pack is waiting for; `None` once shut down.
    fn take(&self) -> Option<RunRequest> {
        let mut queue = self.lock();
        loop {
            if queue.closed {
                return None;
            }
            let free = (0..queue.pending.len()).find(|&i| !queue.claimed(&queue.pending[i].pack_key()));
            if let Some(i) = free {
                return queue.pending.remove(i);
            }
            queue = self.ready.wait(queue).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Opens a pack for `key`; returns its id.
    fn open(&self, key: PackKey) -> u64 {
        let mut queue = self.lock();
        let id = queue.next_pack;
        queue.next_pack += 1;
        queue.packs.push((id, key, self.limits.max_jobs.saturating_sub(1)));
        id
    }

    /// Up to `room` waiting runs for pack `id`; records its room left.
    fn admit(&self, id: u64, key: &PackKey, room: usize) -> Vec<RunRequest> {
        let mut queue = self.lock();
        if queue.closed {
            return Vec::new();
        }
        let mut taken = Vec::new();
        let mut i = 0;
        while i < queue.pending.len() && taken.len() < room {
            if queue.pending[i].pack_key().as_ref() == Some(key) {
                taken.extend(queue.pending.remove(i));
            } else {
                i += 1;
            }
        }
        let left = room - taken.len();
        if let Some(pack) = queue.packs.iter_mut().find(|(p, _, _)| *p == id) {
            pack.2 = left;
        }
        if left == 0 {
            // Runs of this kind are no longer claimed: idle threads may start them.
            self.ready.notify_all();
        }
        taken
    }

    fn close(&self, id: u64) {
        self.lock().packs.retain(|(p, _, _)| *p != id);
        self.ready.notify_all();
    }
}

/// A fixed number of live engine threads sharing one queue.
#[derive(Clone)]
pub struct EnginePool {
    shared: Arc<Shared>,
}

impl EnginePool {
    /// Starts `threads` engine threads whose libtorch work uses
    /// `torch_threads` threads each (0: every core), sharing `cache`, packing
    /// jobs within `limits` (`max_jobs` 1: every job alone).
    pub fn start(threads: usize, torch_threads: u32, cache: Arc<ModelCache>, limits: PackLimits) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            ready: Condvar::new(),
            limits,
            abandoned: Mutex::default(),
            next_thread: AtomicUsize::new(0),
            cache,
            torch_threads,
        });
        let pool = Self { shared };
        for _ in 0..threads.max(1) {
            pool.spawn_thread();
        }
        pool
    }

    fn spawn_thread(&self) {
        let shared = self.shared.clone();
        let index = shared.next_thread.fetch_add(1, Ordering::SeqCst);
        let engine = Engine::with_cache(shared.cache.clone(), shared.torch_threads as usize);
        std::thread::Builder::new()
            .name(format!("engine-{index}"))
            .spawn(move || engine_thread(index, engine, &shared))
            .expect("engine thread starts");
    }

    pub fn submit(&self, request: RunRequest) {
        self.shared.lock().pending.push_back(request);
        self.shared.ready.notify_all();
    }

    /// Gives up on engine thread `thread` (it stopped making progress) and
    /// starts another in its place; false if it was already given up on.
    pub fn abandon(&self, thread: usize) -> bool {
        if thread == NO_THREAD || !self.shared.abandoned.lock().unwrap_or_else(|e| e.into_inner()).insert(thread) {
            return false;
        }
        tracing::error!(thread = format!("engine-{thread}"), "engine thread stopped making progress; starting another in its place");
        self.spawn_thread();
        true
    }

    /// How many engine threads were given up on.
    pub fn abandoned(&self) -> usize {
        self.shared.abandoned.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn shutdown(&self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
    }
}

/// The outcome of a run stopped before it started.
fn not_started(suspended: bool) -> TrainOutcome {
    TrainOutcome {
        steps: 0,
        total_steps: 0,
        final_metrics: Vec::new(),
        eval_predictions: Vec::new(),
        stopped: true,
        suspended,
    }
}

fn engine_thread(index: usize, mut engine: Engine, shared: &Shared) {
    while !shared.is_abandoned(index) {
        let Some(request) = shared.take() else { return };
        // A run stopped or handed back while it waited never starts.
        match request.directive.control() {
            Control::Stop | Control::Suspend => {
                let suspended = request.directive.control() == Control::Suspend;
                let _ = request.updates.send(RunUpdate::Done(Ok(not_started(suspended))));
                continue;
            }
            Control::Continue | Control::Finish => {}
        }
        let model_dir = request.model_dir.clone();
        let key = request.pack_key().filter(|_| shared.limits.max_jobs > 1);
        let mut ends: Vec<RunEnd> = Vec::new();
        let trained = match key {
            Some(key) => {
                let id = shared.open(key.clone());
                let (first, end) = request.into_pack_job(index);
                ends.push(end);
                let mut admit = |room: usize| -> Vec<PackJob> {
                    let mut jobs = Vec::new();
                    for run in shared.admit(id, &key, room) {
                        match run.directive.control() {
                            Control::Stop | Control::Suspend => {
                                let suspended = run.directive.control() == Control::Suspend;
                                let _ = run.updates.send(RunUpdate::Done(Ok(not_started(suspended))));
                            }
                            _ => {
                                let (job, end) = run.into_pack_job(index);
                                ends.push(end);
                                jobs.push(job);
                            }
                        }
                    }
                    jobs
                };
                let trained = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    engine.train_pack(&model_dir, shared.limits, first, &mut admit)
                }));
                shared.close(id);
                trained
            }
            None => {
                let devices = rank_devices(&request, engine.device());
                let (mut job, end) = request.into_pack_job(index);
                let trained = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let result = engine.train_data_parallel(&model_dir, &job.job, &devices, &mut job.on_event);
                    (job.on_done)(result);
                }));
                ends.push(end);
                trained
            }
        };
        if let Err(payload) = trained {
            let message = panic_message(payload.as_ref());
            tracing::error!(model = %model_dir.display(), panic = %message, "a training run panicked; its jobs fail and will be retried");
            for end in &ends {
                end.finish(Err(EngineError::Panicked(message.clone())));
            }
        }
    }
    tracing::warn!(thread = format!("engine-{index}"), "an abandoned engine thread woke up and exits");
}

/// One device per rank of `request`'s job: the lease's devices when it
/// named as many as the job asks for; otherwise (a coordinator that names
/// no devices) every rank on `own`, the engine's device.
fn rank_devices(request: &RunRequest, own: tch::Device) -> Vec<tch::Device> {
    let ranks = request.job.spec.training.devices.max(1) as usize;
    if request.devices.len() == ranks {
        request.devices.clone()
    } else {
        vec![own; ranks]
    }
}

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

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use ptune_core::{Method, Metric, Task};
use tokio::sync::mpsc::UnboundedSender;

use crate::engine::{
    Control, Engine, EngineError, Event, ModelCache, PackJob, PackLimits, TrainJob, TrainOutcome,
};

/// What an engine thread tells the async side about a run.
#[derive(Debug)]
pub enum RunUpdate {
    Step { step: u64, total_steps: u64, metrics: Vec<Metric> },
    Eval { step: u64, metrics: Vec<Metric> },
    Done(Result<TrainOutcome, EngineError>),
}

/// One training run for an engine thread.
pub struct RunRequest {
    pub model_dir: PathBuf,
    pub job: TrainJob,
    pub directive: super::Directive,
    pub updates: UnboundedSender<RunUpdate>,
}

/// Which runs may share a pack: one task on one model.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PackKey {
    model_dir: PathBuf,
    task: Task,
}

impl RunRequest {
    fn pack_key(&self) -> Option<PackKey> {
        let spec = &self.job.spec;
        (spec.method != Method::Full).then(|| PackKey { model_dir: self.model_dir.clone(), task: spec.task })
    }

    /// The run's callbacks for the engine: every event and the ending go
    /// to the async side; the directive answers each event.
    fn into_pack_job(self) -> PackJob {
        let RunRequest { job, directive, updates, .. } = self;
        let done = updates.clone();
        PackJob {
            job,
            on_event: Box::new(move |event| {
                let _ = updates.send(update_of(event));
                directive.control()
            }),
            on_done: Box::new(move |result| {
                let _ = done.send(RunUpdate::Done(result));
            }),
        }
    }
}

fn update_of(event: Event<'_>) -> RunUpdate {
    match event {
        Event::Step { step, total_steps, metrics } => RunUpdate::Step { step, total_steps, metrics: metrics.to_vec() },
        Event::Eval { step, metrics } => RunUpdate::Eval { step, metrics: metrics.to_vec() },
    }
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
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
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

/// A fixed set of engine threads sharing one queue.
#[derive(Clone)]
pub struct EnginePool {
    shared: Arc<Shared>,
}

impl EnginePool {
    /// Starts `threads` engine threads whose libtorch work uses
    /// `torch_threads` threads each (0: every core), sharing `cache`, packing
    /// jobs within `limits` (`max_jobs` 1: every job alone).
    pub fn start(threads: usize, torch_threads: u32, cache: Arc<ModelCache>, limits: PackLimits) -> Self {
        let shared = Arc::new(Shared { queue: Mutex::default(), ready: Condvar::new(), limits });
        for index in 0..threads.max(1) {
            let shared = shared.clone();
            let engine = Engine::with_cache(cache.clone(), torch_threads as usize);
            std::thread::Builder::new()
                .name(format!("engine-{index}"))
                .spawn(move || engine_thread(engine, &shared))
                .expect("engine thread starts");
        }
        Self { shared }
    }

    pub fn submit(&self, request: RunRequest) {
        self.shared.lock().pending.push_back(request);
        self.shared.ready.notify_all();
    }

    pub fn shutdown(&self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
    }
}

fn engine_thread(mut engine: Engine, shared: &Shared) {
    while let Some(request) = shared.take() {
        match request.pack_key() {
            Some(key) if shared.limits.max_jobs > 1 => {
                let id = shared.open(key.clone());
                let model_dir = request.model_dir.clone();
                let mut admit = |room: usize| -> Vec<PackJob> {
                    shared.admit(id, &key, room).into_iter().map(RunRequest::into_pack_job).collect()
                };
                // A panic in libtorch ends the pack's runs (their channels
                // close, so each job fails as retryable and resumes from its
                // checkpoint), not the thread.
                let trained = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    engine.train_pack(&model_dir, shared.limits, request.into_pack_job(), &mut admit)
                }));
                if trained.is_err() {
                    tracing::error!(model = %model_dir.display(), "a packed run panicked; its jobs will be retried");
                }
                shared.close(id);
            }
            _ => {
                let updates = request.updates.clone();
                let directive = request.directive.clone();
                let mut on_event = |event: Event<'_>| -> Control {
                    let _ = updates.send(update_of(event));
                    directive.control()
                };
                let result = engine.train(&request.model_dir, &request.job, &mut on_event);
                let _ = request.updates.send(RunUpdate::Done(result));
            }
        }
    }
}

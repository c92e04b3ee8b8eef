//! Engine threads: libtorch work never runs on the async runtime. Each thread
//! owns an [`Engine`] and takes one training run at a time from a shared
//! queue; all of them share one [`ModelCache`], so the process holds each
//! frozen base model once whatever the number of slots.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use ptune_core::Metric;
use tokio::sync::mpsc::UnboundedSender;

use crate::engine::{Engine, EngineError, Event, ModelCache, TrainJob, TrainOutcome};

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

/// A fixed set of engine threads sharing one queue.
#[derive(Clone)]
pub struct EnginePool {
    queue: mpsc::Sender<Option<RunRequest>>,
    threads: usize,
}

impl EnginePool {
    /// Starts `threads` engine threads whose libtorch work uses
    /// `torch_threads` threads each (0: every core), sharing `cache`.
    pub fn start(threads: usize, torch_threads: u32, cache: Arc<ModelCache>) -> Self {
        let (queue, receiver) = mpsc::channel::<Option<RunRequest>>();
        let receiver = Arc::new(Mutex::new(receiver));
        for index in 0..threads.max(1) {
            let receiver = receiver.clone();
            let engine = Engine::with_cache(cache.clone(), torch_threads as usize);
            std::thread::Builder::new()
                .name(format!("engine-{index}"))
                .spawn(move || engine_thread(engine, receiver))
                .expect("engine thread starts");
        }
        Self { queue, threads: threads.max(1) }
    }

    pub fn submit(&self, request: RunRequest) {
        // The threads live as long as the process; a send only fails after shutdown.
        let _ = self.queue.send(Some(request));
    }

    pub fn shutdown(&self) {
        for _ in 0..self.threads {
            let _ = self.queue.send(None);
        }
    }
}

fn engine_thread(mut engine: Engine, receiver: Arc<Mutex<mpsc::Receiver<Option<RunRequest>>>>) {
    loop {
        let next = receiver.lock().expect("engine queue lock").recv();
        let Ok(Some(request)) = next else { return };
        let updates = request.updates.clone();
        let directive = request.directive.clone();
        let mut on_event = |event: Event<'_>| {
            let update = match event {
                Event::Step { step, total_steps, metrics } => {
                    RunUpdate::Step { step, total_steps, metrics: metrics.to_vec() }
                }
                Event::Eval { step, metrics } => RunUpdate::Eval { step, metrics: metrics.to_vec() },
            };
            let _ = updates.send(update);
            directive.control()
        };
        let result = engine.train(&request.model_dir, &request.job, &mut on_event);
        let _ = request.updates.send(RunUpdate::Done(result));
    }
}

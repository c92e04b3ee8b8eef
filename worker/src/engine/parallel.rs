//! Data-parallel training of one job over several devices
//! (`training.devices`): one rank per device, each on its own thread with
//! its own copy of the job's variables and its share of every batch (see
//! `train/parallel.rs`), the ranks meeting in a [`Collective`]: NCCL when
//! every device is a CUDA device and the worker was built with the `nccl`
//! feature, the host collective otherwise. Rank 0 runs on the calling
//! thread and alone reports to the caller, evaluates, checkpoints and
//! exports.
//!
//! All or nothing: a rank that fails or panics breaks the group, every
//! other rank's next collective call fails, and the job fails with the
//! failing rank's own error (or, when none is known, the collective's,
//! which is retried), without an export.

use std::path::Path;
use std::sync::{Arc, Mutex};

use tch::Device;

use super::cache::ModelCache;
use super::collective::{Collective, CollectiveError, HostGroup, DEFAULT_TIMEOUT};
use super::error::{panic_message, EngineError};
use super::job::{Control, Event, TrainJob, TrainOutcome};
use super::models::frozen::FrozenBase;
use super::pack::SharedBase;
use super::tasks::check_architecture;
use super::train::drive_rank;

/// Building a job's variables seeds and draws from libtorch's process-wide
/// generator: ranks build theirs one at a time, so that each gets the
/// initialisation the job gets alone.
static PREPARE: Mutex<()> = Mutex::new(());

/// One rank's model cache, device and collective handle.
pub(crate) struct Rank {
    pub cache: Arc<ModelCache>,
    pub comm: Box<dyn Collective>,
}

/// Handles of a group over `devices`: NCCL over CUDA devices when the
/// worker has it, the host collective otherwise.
pub(crate) fn group(devices: &[Device]) -> Result<Vec<Box<dyn Collective>>, EngineError> {
    #[cfg(feature = "nccl")]
    {
        let ordinals: Option<Vec<usize>> =
            devices.iter().map(|d| if let Device::Cuda(i) = d { Some(*i) } else { None }).collect();
        if let Some(ordinals) = ordinals {
            let ranks = super::collective::nccl::NcclGroup::new(&ordinals, DEFAULT_TIMEOUT)?;
            return Ok(ranks.into_iter().map(|r| Box::new(r) as Box<dyn Collective>).collect());
        }
    }
    Ok(HostGroup::new(devices.len(), DEFAULT_TIMEOUT).into_iter().map(|r| Box::new(r) as Box<dyn Collective>).collect())
}

/// Trains `job` data parallel over `ranks` (rank 0 first), each rank's
/// libtorch work on `threads` CPU threads. Calls `on_event` as
/// `Engine::train` does, from rank 0's steps.
pub(crate) fn train_ranks(
    ranks: Vec<Rank>,
    threads: i32,
    model_dir: &Path,
    job: &TrainJob,
    on_event: &mut dyn FnMut(Event<'_>) -> Control,
) -> Result<TrainOutcome, EngineError> {
    check_architecture(&job.spec, model_dir)?;
    let world = ranks.len();
    tracing::info!(job = %job.spec.name, ranks = world, "training data parallel");
    let mut ranks = ranks.into_iter();
    let lead = ranks.next().ok_or_else(|| EngineError::Model("data-parallel training needs a device".into()))?;
    let (lead_result, others) = std::thread::scope(|scope| {
        let handles: Vec<_> = ranks
            .enumerate()
            .map(|(i, rank)| {
                std::thread::Builder::new()
                    .name(format!("rank-{}", i + 1))
                    .spawn_scoped(scope, move || run_rank(rank, threads, model_dir, job, None))
            })
            .collect();
        let lead_result = run_rank(lead, threads, model_dir, job, Some(on_event));
        let others: Vec<Result<Option<TrainOutcome>, EngineError>> = handles
            .into_iter()
            .enumerate()
            .map(|(i, handle)| match handle {
                Err(e) => Err(EngineError::Io { path: format!("rank {} thread", i + 1), source: e }),
                Ok(handle) => handle.join().unwrap_or_else(|payload| {
                    Err(EngineError::Panicked(format!("rank {}: {}", i + 1, panic_message(payload.as_ref()))))
                }),
            })
            .collect();
        (lead_result, others)
    });
    let mut errors: Vec<EngineError> = Vec::new();
    let outcome = match lead_result {
        Ok(outcome) => outcome,
        Err(e) => {
            errors.push(e);
            None
        }
    };
    errors.extend(others.into_iter().filter_map(Result::err));
    // The failing rank's own error rather than the others' broken group.
    if let Some(first) = errors.iter().position(|e| !matches!(e, EngineError::Collective(_))) {
        return Err(errors.swap_remove(first));
    }
    if let Some(error) = errors.into_iter().next() {
        return Err(error);
    }
    outcome.ok_or_else(|| EngineError::Collective(CollectiveError::Mismatch("rank 0 ended without an outcome".into())))
}

/// One rank's run: its model, its variables, its loop. Leaves the group when
/// it finished and breaks it when it failed.
fn run_rank(
    rank: Rank,
    threads: i32,
    model_dir: &Path,
    job: &TrainJob,
    on_event: Option<&mut dyn FnMut(Event<'_>) -> Control>,
) -> Result<Option<TrainOutcome>, EngineError> {
    let Rank { cache, mut comm } = rank;
    let _span = tracing::info_span!("rank", rank = comm.rank()).entered();
    tch::set_num_threads(threads);
    let result = cache.get_in(model_dir, job.spec.training.precision).and_then(|model| match &model.model {
        FrozenBase::Encoder(base) => rank_on(base, cache.device(), job, comm.as_mut(), on_event),
        FrozenBase::Decoder(base) => rank_on(base, cache.device(), job, comm.as_mut(), on_event),
    });
    match &result {
        Ok(_) => comm.leave(),
        Err(e) => comm.abort(&e.to_string()),
    }
    result
}

fn rank_on<B: SharedBase>(
    base: &B,
    device: Device,
    job: &TrainJob,
    comm: &mut dyn Collective,
    on_event: Option<&mut dyn FnMut(Event<'_>) -> Control>,
) -> Result<Option<TrainOutcome>, EngineError> {
    let (vars, run) = {
        let _turn = PREPARE.lock().unwrap_or_else(|e| e.into_inner());
        base.prepare(device, job)?
    };
    drive_rank(job, base.sha256(), &vars, &run, comm, on_event)
}

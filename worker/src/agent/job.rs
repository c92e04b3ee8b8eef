//! One leased job from start to finish: fetch its datasets, train it on an
//! engine thread, stream its progress, and upload the adapter. Every call
//! carries the lease epoch; a rejected epoch means the lease is gone and the
//! run stops without reporting anything more.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ptune_core::{JobSpec, Metric};
use ptune_proto::v1::{self, worker_service_client::WorkerServiceClient};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::{error, info, warn};

use super::datasets;
use super::models::ServedModel;
use super::runner::{EnginePool, RunRequest, RunUpdate};
use super::{Directive, Leases};
use crate::engine::{Resume, TrainJob};

const UPLOAD_CHUNK: usize = 256 << 10;

#[derive(Clone)]
pub struct JobContext {
    pub client: WorkerServiceClient<Channel>,
    pub engines: EnginePool,
    pub models: Arc<Vec<ServedModel>>,
    pub work_dir: PathBuf,
    pub leases: Leases,
}

/// How a run ended, as the coordinator must hear it.
enum Ending {
    Succeeded { step: u64, metrics: Vec<Metric>, adapter_dir: PathBuf },
    Failed { error: String, retryable: bool },
    Cancelled,
    /// The coordinator no longer recognises the lease: say nothing more.
    LeaseLost,
}

pub async fn run(mut ctx: JobContext, lease: v1::Lease, stop: Directive) {
    let job_id = lease.job_id.clone();
    let epoch = lease.epoch;
    let stage = ctx.work_dir.join("jobs").join(format!("{job_id}-{epoch}"));
    let checkpoint = checkpoint_dir(&ctx.work_dir, &job_id);
    let ending = match train(&mut ctx, &lease, &stop, &stage, &checkpoint).await {
        Ok(ending) => ending,
        Err(err) => Ending::Failed { error: format!("{err:#}"), retryable: true },
    };
    // A later attempt on this worker resumes from the checkpoint; once the
    // job can have no later attempt, the checkpoint has served its purpose.
    let final_ending = matches!(ending, Ending::Succeeded { .. } | Ending::Cancelled | Ending::Failed { retryable: false, .. });
    finish(&mut ctx.client, &job_id, epoch, ending).await;
    ctx.leases.remove(&job_id, epoch);
    let _ = tokio::fs::remove_dir_all(&stage).await;
    if final_ending {
        let _ = tokio::fs::remove_dir_all(&checkpoint).await;
    }
}

/// Where a job's resume checkpoint lives on this worker: one folder per job,
/// shared by its attempts, so a retry (after a crash of this process, say)
/// continues from the last evaluation instead of step 0.
pub fn checkpoint_dir(work_dir: &Path, job_id: &str) -> PathBuf {
    work_dir.join("checkpoints").join(job_id)
}

async fn train(
    ctx: &mut JobContext,
    lease: &v1::Lease,
    stop: &Directive,
    stage: &Path,
    checkpoint: &Path,
) -> anyhow::Result<Ending> {
    let spec = JobSpec::try_from(lease.spec.clone().unwrap_or_default()).context("lease carried an invalid spec")?;
    let Some(model) = ctx.models.iter().find(|m| m.name == spec.base_model) else {
        return Ok(Ending::Failed {
            error: format!("this worker does not serve base model {:?}", spec.base_model),
            retryable: true,
        });
    };
    let train_file = datasets::fetch(&mut ctx.client, &spec.data.train, &ctx.work_dir).await?;
    let eval_file = datasets::fetch(&mut ctx.client, &spec.data.eval, &ctx.work_dir).await?;
    tokio::fs::create_dir_all(stage).await?;
    let job = TrainJob {
        train_name: train_file.file_name,
        eval_name: eval_file.file_name,
        spec,
        train_file: train_file.path,
        eval_file: eval_file.path,
        out_dir: stage.join("adapter"),
        checkpoint_dir: Some(checkpoint.to_path_buf()),
        resume: Resume::IfPossible,
    };
    let (updates, mut receiver) = mpsc::unbounded_channel();
    ctx.engines.submit(RunRequest { model_dir: model.dir.clone(), job, directive: stop.clone(), updates });

    let mut lease_lost = false;
    loop {
        let Some(first) = receiver.recv().await else {
            anyhow::bail!("engine thread exited without a result");
        };
        // Coalesce whatever piled up while the last report was in flight.
        let mut batch = vec![first];
        while let Ok(more) = receiver.try_recv() {
            batch.push(more);
        }
        let mut done = None;
        let mut report = v1::ReportProgressRequest { job_id: lease.job_id.clone(), epoch: lease.epoch, ..Default::default() };
        for update in batch {
            match update {
                RunUpdate::Step { step, total_steps, metrics } => {
                    report.step = step;
                    report.total_steps = total_steps;
                    report.metrics.extend(metrics.iter().map(v1::Metric::from));
                }
                RunUpdate::Eval { step, metrics } => {
                    report.step = report.step.max(step);
                    report.metrics.extend(metrics.iter().map(v1::Metric::from));
                }
                RunUpdate::Done(result) => done = Some(result),
            }
        }
        if !lease_lost && (report.step > 0 || !report.metrics.is_empty()) {
            match ctx.client.report_progress(report).await {
                Ok(response) => match response.get_ref().stop_reason() {
                    v1::StopReason::EarlyStopped => {
                        info!(job_id = %lease.job_id, "sweep stopped the job early; exporting what it learned");
                        stop.finish();
                    }
                    v1::StopReason::Diverged => {
                        warn!(job_id = %lease.job_id, "coordinator failed the job as diverged; stopping");
                        lease_lost = true;
                        stop.stop();
                    }
                    v1::StopReason::Cancelled => stop.stop(),
                    v1::StopReason::Unspecified if response.get_ref().stop => stop.stop(),
                    v1::StopReason::Unspecified => {}
                },
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    warn!(job_id = %lease.job_id, error = %status.message(), "lease lost; stopping");
                    lease_lost = true;
                    stop.stop();
                }
                Err(status) => warn!(job_id = %lease.job_id, error = %status.message(), "progress report failed"),
            }
        }
        if let Some(result) = done {
            return Ok(match result {
                _ if lease_lost => Ending::LeaseLost,
                Ok(outcome) if outcome.stopped => Ending::Cancelled,
                Ok(outcome) => Ending::Succeeded {
                    step: outcome.steps,
                    metrics: outcome.final_metrics,
                    adapter_dir: stage.join("adapter"),
                },
                Err(err) => Ending::Failed { retryable: err.is_retryable(), error: err.to_string() },
            });
        }
    }
}

async fn finish(client: &mut WorkerServiceClient<Channel>, job_id: &str, epoch: u64, ending: Ending) {
    match ending {
        Ending::LeaseLost => {}
        Ending::Succeeded { step, metrics, adapter_dir } => match archive(&adapter_dir) {
            Ok(bytes) => complete(client, job_id, epoch, step, &metrics, bytes).await,
            Err(err) => {
                let error = format!("cannot package the adapter: {err:#}");
                fail(client, job_id, epoch, error, true, false).await
            }
        },
        Ending::Failed { error, retryable } => {
            error!(job_id, error = %error, retryable, "job failed");
            fail(client, job_id, epoch, error, retryable, false).await
        }
        Ending::Cancelled => fail(client, job_id, epoch, "stopped on request".into(), false, true).await,
    }
}

/// Retries a call until it succeeds or the lease is gone: a coordinator that
/// is restarting must not make a finished job's result disappear.
async fn with_retry<F, Fut>(what: &str, job_id: &str, mut call: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let mut delay = Duration::from_millis(200);
    for _ in 0..60 {
        match call().await {
            Ok(()) => return,
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                warn!(job_id, error = %status.message(), "{what} refused: lease no longer valid");
                return;
            }
            Err(status) => {
                warn!(job_id, error = %status.message(), "{what} failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    error!(job_id, "{what} gave up; the lease will expire and the job will be retried");
}

async fn complete(client: &mut WorkerServiceClient<Channel>, job_id: &str, epoch: u64, step: u64, metrics: &[Metric], bytes: Vec<u8>) {
    let sha = hex::encode(Sha256::digest(&bytes));
    info!(job_id, sha256 = %sha, size = bytes.len(), "uploading adapter");
    let header = v1::CompleteJobHeader {
        job_id: job_id.to_string(),
        epoch,
        adapter_sha256: sha,
        adapter_size: bytes.len() as u64,
        metrics: metrics.iter().map(v1::Metric::from).collect(),
        step,
        peak_rss_bytes: super::peak_rss_bytes(),
    };
    with_retry("completion", job_id, || {
        let mut parts = vec![v1::CompleteJobChunk { part: Some(v1::complete_job_chunk::Part::Header(header.clone())) }];
        parts.extend(
            bytes
                .chunks(UPLOAD_CHUNK)
                .map(|c| v1::CompleteJobChunk { part: Some(v1::complete_job_chunk::Part::Data(c.to_vec())) }),
        );
        let mut client = client.clone();
        async move { client.complete_job(tokio_stream::iter(parts)).await.map(|_| ()) }
    })
    .await;
}

async fn fail(client: &mut WorkerServiceClient<Channel>, job_id: &str, epoch: u64, error: String, retryable: bool, cancelled: bool) {
    let request = v1::FailJobRequest { job_id: job_id.to_string(), epoch, error, cancelled, retryable };
    with_retry("failure report", job_id, || {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.fail_job(request).await.map(|_| ()) }
    })
    .await;
}

/// Packs an adapter folder into a deterministic tar (sorted names, zero
/// mtimes), so the same files always give the same sha256.
pub fn archive(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read adapter folder {}", dir.display()))?
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    let mut builder = tar::Builder::new(Vec::new());
    for name in names {
        let data = std::fs::read(dir.join(&name))?;
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        builder.append_data(&mut header, &name, data.as_slice())?;
    }
    Ok(builder.into_inner()?)
}

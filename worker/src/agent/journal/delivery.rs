//! Delivering a lease's journal to the coordinators: the undelivered
//! records in order, the pending progress records merged into one report
//! and sent together with other leases' reports ([`super::progress`]),
//! checkpoints a later one supersedes skipped, archives streamed from disk;
//! transport failures retried with a growing backoff for as long as it
//! takes, a lost lease ending delivery at once.

use std::path::PathBuf;
use std::time::Duration;

use ptune_proto::v1;
use tokio::sync::mpsc;
use tonic::Code;
use tracing::{info, warn};

use super::progress::ProgressSender;
use super::{Journal, JournalMetric, LeaseFile, Record};
use crate::agent::archive::Archive;
use crate::agent::client::{is_transient, Coordinators, CALL_TIMEOUT};
use crate::agent::handoff::Handoff;
use crate::agent::leases::{Directive, StopCause};

/// Bytes per message of an archive upload.
const UPLOAD_CHUNK: usize = 256 << 10;
/// Most progress records sent in one report.
const MAX_RECORDS_PER_REPORT: usize = 256;

/// How delivery of a journal ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The ending was acknowledged.
    Ended,
    /// The coordinator no longer recognises the lease; nothing more was sent.
    LeaseLost,
    /// The journal's writer went away without an ending.
    Abandoned,
}

/// What delivery needs from the worker.
#[derive(Clone)]
pub struct Courier {
    pub coordinators: Coordinators,
    /// Largest checkpoint the coordinator accepts; larger ones stay local.
    pub max_checkpoint_bytes: u64,
    /// Sends progress reports together with those of the other leases.
    pub progress: ProgressSender,
    /// Asks for the worker's next job with each completion; `None`: it does not.
    pub handoff: Option<Handoff>,
}

/// Delivers the journal's records in order, taking new ones from
/// `incoming` as they come, until its ending was delivered or the lease is
/// gone. Answers to progress reports (cancel, early stop, diverged) and a
/// lost lease are passed on to `directive`.
pub async fn deliver(
    courier: Courier,
    mut journal: Journal,
    mut incoming: mpsc::UnboundedReceiver<Record>,
    directive: Directive,
) -> (Journal, Delivery) {
    let mut backoff = Duration::from_millis(200);
    let mut open = true;
    loop {
        while let Ok(record) = incoming.try_recv() {
            journal.append(record);
        }
        if journal.finished() {
            return (journal, Delivery::Ended);
        }
        if journal.delivered == journal.records.len() {
            if !open {
                return (journal, Delivery::Abandoned);
            }
            match incoming.recv().await {
                Some(record) => journal.append(record),
                None => open = false,
            }
            continue;
        }
        let (unit, covers) = next_unit(&journal);
        let (kind, ending, completion) = (unit.kind(), unit.is_ending(), matches!(unit, Unit::Complete(..)));
        match send(courier.clone(), journal.lease.clone(), unit, directive.clone()).await {
            Ok(()) => {
                journal.mark_delivered(covers);
                backoff = Duration::from_millis(200);
            }
            Err(Refusal::LeaseLost(why)) => {
                warn!(job_id = %journal.lease.job_id, epoch = journal.lease.epoch, reason = %why, "lease lost; stopping the job");
                directive.stop(StopCause::LeaseLost);
                return (journal, Delivery::LeaseLost);
            }
            Err(Refusal::Rejected(why)) => {
                warn!(job_id = %journal.lease.job_id, record = kind, reason = %why, "the coordinator refused a record");
                if completion {
                    // The adapter cannot be taken: the attempt fails instead.
                    journal.records.truncate(journal.delivered);
                    journal.append(Record::Fail {
                        error: format!("the coordinator refused the adapter: {why}"),
                        retryable: true,
                        infrastructure: false,
                        cancelled: false,
                    });
                } else if ending {
                    return (journal, Delivery::Ended);
                } else {
                    journal.mark_delivered(covers);
                }
            }
            Err(Refusal::Unreachable(why)) => {
                warn!(job_id = %journal.lease.job_id, record = kind, error = %why, retry_in_ms = backoff.as_millis() as u64,
                      "coordinator unreachable; the record stays journaled and goes again");
                // New records keep arriving meanwhile.
                let wait = tokio::time::sleep(backoff);
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        _ = &mut wait => break,
                        record = incoming.recv(), if open => match record {
                            Some(record) => journal.append(record),
                            None => open = false,
                        },
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// What one call delivers.
enum Unit {
    Progress(v1::ReportProgressRequest),
    /// A checkpoint a later record supersedes, or too large to upload.
    Skip,
    Checkpoint(u64, Archive),
    Complete(u64, Vec<JournalMetric>, Archive, u64),
    Fail(v1::FailJobRequest),
    Release(v1::ReleaseJobRequest),
}

impl Unit {
    fn kind(&self) -> &'static str {
        match self {
            Unit::Progress(_) => "progress",
            Unit::Skip => "skipped checkpoint",
            Unit::Checkpoint(..) => "checkpoint",
            Unit::Complete(..) => "completion",
            Unit::Fail(_) => "failure",
            Unit::Release(_) => "release",
        }
    }

    fn is_ending(&self) -> bool {
        matches!(self, Unit::Complete(..) | Unit::Fail(_) | Unit::Release(_))
    }
}

/// The progress records that come next in the journal, merged into one
/// report (the highest step, every metric), and how many they are; `None`
/// when the next record is not progress.
pub(super) fn progress_report(journal: &Journal) -> Option<(v1::ReportProgressRequest, usize)> {
    let lease = &journal.lease;
    let mut report = v1::ReportProgressRequest {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        lease_token: lease.lease_token.clone(),
        ..Default::default()
    };
    let mut covers = 0;
    for record in journal.records[journal.delivered..].iter().take(MAX_RECORDS_PER_REPORT) {
        let Record::Progress { step, total_steps, metrics } = record else { break };
        report.step = report.step.max(*step);
        if *total_steps > 0 {
            report.total_steps = *total_steps;
        }
        report.metrics.extend(metrics.iter().map(v1::Metric::from));
        covers += 1;
    }
    (covers > 0).then_some((report, covers))
}

/// The next call for the undelivered records, and how many records it covers.
fn next_unit(journal: &Journal) -> (Unit, usize) {
    let pending = &journal.records[journal.delivered..];
    let lease = &journal.lease;
    match &pending[0] {
        Record::Progress { .. } => {
            let (report, covers) = progress_report(journal).expect("the first pending record is progress");
            (Unit::Progress(report), covers)
        }
        Record::Checkpoint { step, archive } => {
            let superseded = pending[1..].iter().any(|r| matches!(r, Record::Checkpoint { .. } | Record::Complete { .. }));
            if superseded {
                (Unit::Skip, 1)
            } else {
                (Unit::Checkpoint(*step, archive.clone()), 1)
            }
        }
        Record::Complete { step, metrics, archive, peak_rss_bytes } => {
            (Unit::Complete(*step, metrics.clone(), archive.clone(), *peak_rss_bytes), 1)
        }
        Record::Fail { error, retryable, infrastructure, cancelled } => (
            Unit::Fail(v1::FailJobRequest {
                job_id: lease.job_id.clone(),
                epoch: lease.epoch,
                error: error.clone(),
                cancelled: *cancelled,
                retryable: *retryable,
                infrastructure: *infrastructure,
                lease_token: lease.lease_token.clone(),
            }),
            1,
        ),
        Record::Release { reason } => (
            Unit::Release(v1::ReleaseJobRequest {
                job_id: lease.job_id.clone(),
                epoch: lease.epoch,
                reason: reason.clone(),
                lease_token: lease.lease_token.clone(),
            }),
            1,
        ),
    }
}

/// Why a call did not go through.
enum Refusal {
    /// The lease is gone (FAILED_PRECONDITION, NOT_FOUND).
    LeaseLost(String),
    /// The coordinator refused the record itself (a bad argument).
    Rejected(String),
    /// No coordinator answered; worth trying again.
    Unreachable(String),
}

fn refusal(status: tonic::Status) -> Refusal {
    match status.code() {
        Code::FailedPrecondition | Code::NotFound => Refusal::LeaseLost(status.message().to_string()),
        _ if is_transient(&status) => Refusal::Unreachable(status.message().to_string()),
        _ => Refusal::Rejected(status.message().to_string()),
    }
}

async fn send(courier: Courier, lease: LeaseFile, unit: Unit, directive: Directive) -> Result<(), Refusal> {
    let coordinators = &courier.coordinators;
    match unit {
        Unit::Skip => Ok(()),
        Unit::Progress(report) => {
            let response = courier.progress.send(report).await.map_err(refusal)?;
            match response.stop_reason() {
                v1::StopReason::EarlyStopped => {
                    info!(job_id = %lease.job_id, "sweep stopped the job early; exporting what it learned");
                    directive.finish();
                }
                v1::StopReason::Diverged => {
                    warn!(job_id = %lease.job_id, "coordinator failed the job as diverged; stopping");
                    return Err(Refusal::LeaseLost("the coordinator failed the job as diverged".into()));
                }
                v1::StopReason::Cancelled => directive.stop(StopCause::Cancelled),
                v1::StopReason::Unspecified if response.stop => directive.stop(StopCause::Cancelled),
                v1::StopReason::Unspecified => {}
            }
            Ok(())
        }
        Unit::Checkpoint(step, archive) => {
            if archive.size > courier.max_checkpoint_bytes {
                warn!(job_id = %lease.job_id, step, size = archive.size, max = courier.max_checkpoint_bytes,
                      "checkpoint larger than the coordinator takes; it stays on this worker only");
                return Ok(());
            }
            let header = v1::CheckpointHeader {
                job_id: lease.job_id.clone(),
                epoch: lease.epoch,
                step,
                sha256: archive.sha256.clone(),
                size: archive.size,
                lease_token: lease.lease_token.clone(),
            };
            upload(coordinators.clone(), archive.path.clone(), lease.name.clone(), Upload::Checkpoint(header)).await?;
            info!(job_id = %lease.job_id, step, size = archive.size, "checkpoint uploaded");
            Ok(())
        }
        Unit::Complete(step, metrics, archive, peak_rss_bytes) => {
            info!(job_id = %lease.job_id, sha256 = %archive.sha256, size = archive.size, "uploading adapter");
            let header = v1::CompleteJobHeader {
                job_id: lease.job_id.clone(),
                epoch: lease.epoch,
                adapter_sha256: archive.sha256.clone(),
                adapter_size: archive.size,
                metrics: metrics.iter().map(v1::Metric::from).collect(),
                step,
                peak_rss_bytes,
                lease_token: lease.lease_token.clone(),
                next: courier.handoff.as_ref().and_then(Handoff::ask),
            };
            let next = upload(coordinators.clone(), archive.path.clone(), lease.name.clone(), Upload::Completion(header))
                .await?;
            if let (Some(next), Some(handoff)) = (next, &courier.handoff) {
                handoff.take(next);
            }
            Ok(())
        }
        Unit::Fail(request) => coordinators
            .call(CALL_TIMEOUT, move |mut c| {
                let request = request.clone();
                async move { c.fail_job(request).await.map(|_| ()) }
            })
            .await
            .map_err(refusal),
        Unit::Release(request) => coordinators
            .call(CALL_TIMEOUT, move |mut c| {
                let request = request.clone();
                async move { c.release_job(request).await.map(|_| ()) }
            })
            .await
            .map_err(refusal),
    }
}

/// An archive upload: its header says what the archive is.
#[derive(Clone)]
enum Upload {
    Checkpoint(v1::CheckpointHeader),
    Completion(v1::CompleteJobHeader),
}

/// Streams the header, then the file at `path` in chunks, read from disk as
/// the stream is consumed. Answers the lease a completion brought.
async fn upload(
    coordinators: Coordinators,
    path: PathBuf,
    job: String,
    upload: Upload,
) -> Result<Option<v1::Lease>, Refusal> {
    let size = std::fs::metadata(&path).map_err(|e| Refusal::Rejected(format!("{}: {e}", path.display())))?.len();
    // A minute, plus a second per 10 MB.
    let timeout = Duration::from_secs(60 + size / 10_000_000);
    coordinators
        .call(timeout, move |mut client| {
            let (path, job, upload) = (path.clone(), job.clone(), upload.clone());
            async move {
                match upload {
                    Upload::Checkpoint(header) => {
                        use v1::checkpoint_chunk::Part;
                        let first = v1::CheckpointChunk { part: Some(Part::Header(header)) };
                        let stream = file_stream(path, first, |data| v1::CheckpointChunk { part: Some(Part::Data(data)) }, job);
                        client.upload_checkpoint(stream).await.map(|_| None)
                    }
                    Upload::Completion(header) => {
                        use v1::complete_job_chunk::Part;
                        let first = v1::CompleteJobChunk { part: Some(Part::Header(header)) };
                        let stream = file_stream(path, first, |data| v1::CompleteJobChunk { part: Some(Part::Data(data)) }, job);
                        client.complete_job(stream).await.map(|r| r.into_inner().next)
                    }
                }
            }
        })
        .await
        .map_err(refusal)
}

/// The header, then the file at `path` in chunks, read from disk by a
/// blocking task as the stream is consumed (a few chunks ahead).
fn file_stream<M: Send + 'static>(
    path: PathBuf,
    first: M,
    chunk: fn(Vec<u8>) -> M,
    job: String,
) -> tokio_stream::wrappers::ReceiverStream<M> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        if tx.blocking_send(first).is_err() {
            return;
        }
        let Ok(mut file) = std::fs::File::open(&path) else { return };
        let mut sent = 0u64;
        loop {
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            let n = match std::io::Read::read(&mut file, &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.truncate(n);
            if tx.blocking_send(chunk(buf)).is_err() {
                return;
            }
            if sent == 0 {
                let _ = crate::faults::at(crate::faults::Point::Upload, &job, 0);
            }
            sent += n as u64;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::journal::tests::{checkpoint, lease, progress};

    #[test]
    fn progress_is_sent_together_superseded_checkpoints_are_skipped_and_nothing_follows_an_ending() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::create(dir.path(), lease()).unwrap();
        for record in [progress(1), progress(2), checkpoint(2), progress(3), checkpoint(3)] {
            journal.append(record);
        }
        let (unit, covers) = next_unit(&journal);
        let Unit::Progress(report) = unit else { panic!("progress first") };
        assert_eq!((covers, report.step, report.metrics.len(), report.epoch), (2, 2, 2, 3));
        journal.mark_delivered(covers);
        assert!(matches!(next_unit(&journal), (Unit::Skip, 1)), "checkpoint 2 is superseded by checkpoint 3");
        journal.mark_delivered(2);
        assert!(matches!(next_unit(&journal), (Unit::Checkpoint(3, _), 1)));

        journal.append(Record::Release { reason: "draining".into() });
        journal.append(progress(4));
        assert_eq!(journal.records.len(), 6, "nothing is journaled after an ending");
        journal.mark_delivered(2);
        assert!(journal.finished());
    }
}

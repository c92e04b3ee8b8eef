//! Each lease's journal: what the worker must tell the coordinator about a
//! job (progress and metrics, checkpoints, and how the attempt ended), kept
//! on disk and delivered in order, so neither a coordinator or database
//! outage nor a restart of the worker loses it.
//!
//! A lease's folder, `<work dir>/leases/<job id>-<epoch>/`, holds
//! `lease.json` (the lease as it was given), `journal.jsonl` (the records,
//! appended in order; endings and checkpoints flushed to the disk),
//! `delivered` (how many records the coordinator acknowledged), and the
//! archives the records name. Every call a record becomes is idempotent on
//! the coordinator (metrics are keyed by step, a completion or failure of
//! an ended attempt is a replay), so records delivered again after a crash
//! do no harm.
//!
//! Delivery ([`deliver`]) retries transport failures for as long as it
//! takes (the lease still stands while the coordinator is away: workers
//! keep training through outages), and stops at once when the coordinator
//! says the lease is gone.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ptune_core::{Metric, MetricKind};
use ptune_proto::v1;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tonic::Code;
use tracing::{info, warn};

use super::archive::Archive;
use super::client::{is_transient, Coordinators, CALL_TIMEOUT};
use super::leases::{Directive, StopCause};

/// Bytes per message of an archive upload.
const UPLOAD_CHUNK: usize = 256 << 10;
/// Most progress records sent in one report.
const MAX_RECORDS_PER_REPORT: usize = 256;

/// A metric as the journal writes it: non-finite values as text, which
/// JSON has no numbers for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JournalMetric {
    step: u64,
    kind: MetricKind,
    name: String,
    #[serde(with = "finite_or_text")]
    value: f64,
}

impl From<&Metric> for JournalMetric {
    fn from(m: &Metric) -> Self {
        Self { step: m.step, kind: m.kind, name: m.name.clone(), value: m.value }
    }
}

impl From<&JournalMetric> for v1::Metric {
    fn from(m: &JournalMetric) -> Self {
        v1::Metric { step: m.step, kind: m.kind.as_str().to_string(), name: m.name.clone(), value: m.value }
    }
}

mod finite_or_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
        if value.is_finite() {
            s.serialize_f64(*value)
        } else {
            s.serialize_str(&value.to_string())
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Value {
            Number(f64),
            Text(String),
        }
        match Value::deserialize(d)? {
            Value::Number(n) => Ok(n),
            Value::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// One thing the coordinator must hear about a lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Progress { step: u64, total_steps: u64, metrics: Vec<JournalMetric> },
    /// A resume checkpoint to upload, unless a later one supersedes it.
    Checkpoint { step: u64, archive: Archive },
    Complete { step: u64, metrics: Vec<JournalMetric>, archive: Archive, peak_rss_bytes: u64 },
    Fail { error: String, retryable: bool, infrastructure: bool, cancelled: bool },
    Release { reason: String },
}

impl Record {
    /// True for the records that end an attempt.
    pub fn is_ending(&self) -> bool {
        matches!(self, Record::Complete { .. } | Record::Fail { .. } | Record::Release { .. })
    }
}

/// The lease as given, kept beside its journal (readable by the worker's
/// user only: it holds the lease token).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseFile {
    pub job_id: String,
    pub epoch: u64,
    /// Proves the lease to the coordinator; every call about it carries it.
    pub lease_token: String,
    /// The job's name, for logs.
    pub name: String,
}

/// A lease's journal on disk and in memory.
pub struct Journal {
    dir: PathBuf,
    pub lease: LeaseFile,
    records: Vec<Record>,
    delivered: usize,
}

/// Where lease folders live under a work directory.
pub fn leases_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("leases")
}

impl Journal {
    /// Creates the journal of a new lease.
    pub fn create(work_dir: &Path, lease: LeaseFile) -> anyhow::Result<Self> {
        let dir = leases_dir(work_dir).join(format!("{}-{}", lease.job_id, lease.epoch));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let json = serde_json::to_vec_pretty(&lease)?;
        crate::durable::write_private(&dir.join("lease.json"), &json)
            .with_context(|| format!("cannot write {}", dir.display()))?;
        Ok(Self { dir, lease, records: Vec::new(), delivered: 0 })
    }

    /// Reads a journal a previous run of the worker left.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(dir.join("lease.json"))?;
        let lease: LeaseFile = serde_json::from_str(&text)?;
        let mut records = Vec::new();
        if let Ok(text) = std::fs::read_to_string(dir.join("journal.jsonl")) {
            for line in text.lines() {
                // A line cut off by a crash is the last one; nothing follows it.
                match serde_json::from_str(line) {
                    Ok(record) => records.push(record),
                    Err(_) => break,
                }
            }
        }
        let delivered = std::fs::read_to_string(dir.join("delivered"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0usize)
            .min(records.len());
        Ok(Self { dir: dir.to_path_buf(), lease, records, delivered })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The highest step a progress record reached.
    pub fn last_step(&self) -> u64 {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::Progress { step, .. } => Some(*step),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// True once an ending was written (no record may follow it).
    pub fn has_ending(&self) -> bool {
        self.ending().is_some()
    }

    /// The record that ended the attempt, once written.
    pub fn ending(&self) -> Option<&Record> {
        self.records.iter().find(|r| r.is_ending())
    }

    /// True once every record, an ending among them, was delivered.
    pub fn finished(&self) -> bool {
        self.has_ending() && self.delivered == self.records.len()
    }

    /// Appends a record; records after an ending are dropped. A record the
    /// disk refuses stays in memory and is still delivered.
    pub fn append(&mut self, record: Record) {
        if self.has_ending() {
            return;
        }
        let durable = !matches!(record, Record::Progress { .. });
        if let Err(e) = self.write_line(&record, durable) {
            warn!(job_id = %self.lease.job_id, error = %e, "cannot journal a record on disk; it is kept in memory");
        }
        self.records.push(record);
    }

    fn write_line(&self, record: &Record, durable: bool) -> std::io::Result<()> {
        crate::faults::check_write()?;
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut file =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("journal.jsonl"))?;
        file.write_all(&line)?;
        if durable {
            file.sync_data()?;
        }
        Ok(())
    }

    fn mark_delivered(&mut self, n: usize) {
        self.delivered = (self.delivered + n).min(self.records.len());
        let path = self.dir.join("delivered");
        let tmp = self.dir.join(".delivered.tmp");
        // Not flushed: after a crash some records go again, which is harmless.
        if std::fs::write(&tmp, self.delivered.to_string()).and_then(|()| std::fs::rename(&tmp, &path)).is_err() {
            warn!(job_id = %self.lease.job_id, "cannot record delivered journal records; they may be sent again");
        }
    }

    /// Removes the lease's folder.
    pub fn remove(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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

/// The next call for the undelivered records, and how many records it covers.
fn next_unit(journal: &Journal) -> (Unit, usize) {
    let pending = &journal.records[journal.delivered..];
    let lease = &journal.lease;
    match &pending[0] {
        Record::Progress { .. } => {
            let mut report =
                v1::ReportProgressRequest {
                    job_id: lease.job_id.clone(),
                    epoch: lease.epoch,
                    lease_token: lease.lease_token.clone(),
                    ..Default::default()
                };
            let mut covers = 0;
            for record in pending.iter().take(MAX_RECORDS_PER_REPORT) {
                let Record::Progress { step, total_steps, metrics } = record else { break };
                report.step = report.step.max(*step);
                if *total_steps > 0 {
                    report.total_steps = *total_steps;
                }
                report.metrics.extend(metrics.iter().map(v1::Metric::from));
                covers += 1;
            }
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
            let response = coordinators
                .call(CALL_TIMEOUT, move |mut c| {
                    let report = report.clone();
                    async move { c.report_progress(report).await.map(|r| r.into_inner()) }
                })
                .await
                .map_err(refusal)?;
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
            };
            upload(coordinators.clone(), archive.path.clone(), lease.name.clone(), Upload::Completion(header)).await
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
/// the stream is consumed.
async fn upload(coordinators: Coordinators, path: PathBuf, job: String, upload: Upload) -> Result<(), Refusal> {
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
                        client.upload_checkpoint(stream).await.map(|_| ())
                    }
                    Upload::Completion(header) => {
                        use v1::complete_job_chunk::Part;
                        let first = v1::CompleteJobChunk { part: Some(Part::Header(header)) };
                        let stream = file_stream(path, first, |data| v1::CompleteJobChunk { part: Some(Part::Data(data)) }, job);
                        client.complete_job(stream).await.map(|_| ())
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

    fn progress(step: u64) -> Record {
        let metric = Metric { step, kind: MetricKind::Train, name: "loss".into(), value: 1.0 / step as f64 };
        Record::Progress { step, total_steps: 40, metrics: vec![JournalMetric::from(&metric)] }
    }

    fn checkpoint(step: u64) -> Record {
        let archive = Archive { path: PathBuf::from(format!("checkpoint-{step}.tar")), sha256: "ab".repeat(32), size: 10 };
        Record::Checkpoint { step, archive }
    }

    fn lease() -> LeaseFile {
        LeaseFile {
            job_id: "00000000-0000-4000-8000-000000000001".into(),
            epoch: 3,
            lease_token: "plt_x".into(),
            name: "j".into(),
        }
    }

    #[test]
    fn a_journal_survives_a_restart_with_its_delivered_count_and_a_line_cut_off_by_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::create(dir.path(), lease()).unwrap();
        for record in [progress(1), progress(2), checkpoint(2), progress(3)] {
            journal.append(record);
        }
        journal.mark_delivered(2);
        let path = journal.dir().to_path_buf();
        // A crash while appending leaves half a line.
        let mut file = std::fs::OpenOptions::new().append(true).open(path.join("journal.jsonl")).unwrap();
        file.write_all(b"{\"type\":\"progr").unwrap();

        let reopened = Journal::open(&path).unwrap();
        assert_eq!(reopened.records, [progress(1), progress(2), checkpoint(2), progress(3)]);
        assert_eq!((reopened.delivered, reopened.last_step(), reopened.has_ending()), (2, 3, false));
    }

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

    #[test]
    fn non_finite_metrics_round_trip_through_the_journal() {
        let metric = Metric { step: 1, kind: MetricKind::Eval, name: "f1".into(), value: f64::NAN };
        let record = Record::Progress { step: 1, total_steps: 0, metrics: vec![JournalMetric::from(&metric)] };
        let text = serde_json::to_string(&record).unwrap();
        let Record::Progress { metrics, .. } = serde_json::from_str(&text).unwrap() else { panic!() };
        assert!(metrics[0].value.is_nan(), "{text}");
    }
}

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
//! Delivery ([`delivery::deliver`]) retries transport failures for as
//! long as it takes (the lease still stands while the coordinator is away:
//! workers keep training through outages), and stops at once when the
//! coordinator says the lease is gone.

pub mod delivery;
pub mod progress;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ptune_core::{Metric, MetricKind};
use ptune_proto::v1;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::archive::Archive;

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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn progress(step: u64) -> Record {
        let metric = Metric { step, kind: MetricKind::Train, name: "loss".into(), value: 1.0 / step as f64 };
        Record::Progress { step, total_steps: 40, metrics: vec![JournalMetric::from(&metric)] }
    }

    pub(super) fn checkpoint(step: u64) -> Record {
        let archive = Archive { path: PathBuf::from(format!("checkpoint-{step}.tar")), sha256: "ab".repeat(32), size: 10 };
        Record::Checkpoint { step, archive }
    }

    pub(super) fn lease() -> LeaseFile {
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
    fn non_finite_metrics_round_trip_through_the_journal() {
        let metric = Metric { step: 1, kind: MetricKind::Eval, name: "f1".into(), value: f64::NAN };
        let record = Record::Progress { step: 1, total_steps: 0, metrics: vec![JournalMetric::from(&metric)] };
        let text = serde_json::to_string(&record).unwrap();
        let Record::Progress { metrics, .. } = serde_json::from_str(&text).unwrap() else { panic!() };
        assert!(metrics[0].value.is_nan(), "{text}");
    }
}

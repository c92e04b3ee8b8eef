//! Progress of several leases in one transaction: a worker training several
//! jobs packed in one pass, or catching up after an outage, sends the steps
//! of all of them at once. Each statement covers every lease of the batch
//! (`UNNEST`): one locks the job rows and reads the lease tokens, and one
//! moves the jobs' steps, inserts the metrics and renews the attempts whose
//! lease is half gone.
//! Each lease is fenced on its own: a stale or unknown lease gets its own
//! answer and changes nothing, while the others are recorded.
//!
//! Job rows are locked in id order, so two batches naming the same jobs
//! cannot deadlock; attempt rows come after their job rows, as everywhere
//! (`attempts.rs`). Metrics are keyed by (job, kind, name, step), so a
//! batch sent again after a lost answer records nothing twice.

use std::collections::HashMap;
use std::time::Duration;

use ptune_core::sweep::DIVERGED_PREFIX;
use ptune_core::{JobId, JobState, MetricKind};
use tracing::instrument;
use uuid::Uuid;

use super::attempts::{end_attempt, lock_leased_all, set_state_after_attempt};
use super::fencing::Fenced;
use super::metrics::{upsert_metrics, MetricColumns};
use super::{millis, to_i64, Result, Store};
use crate::model::{LeaseRef, ProgressReport, StopSignal};

/// The reports of one batch merged per lease, in the order each lease first
/// appears: the highest step, the last planned total that is set, and every
/// metric in the order sent.
pub fn merge_reports(reports: &[ProgressReport]) -> Vec<ProgressReport> {
    let mut merged: Vec<ProgressReport> = Vec::new();
    let mut index: HashMap<(JobId, u64), usize> = HashMap::new();
    for report in reports {
        let key = (report.lease.job_id, report.lease.epoch);
        match index.get(&key) {
            Some(&i) if merged[i].lease == report.lease => {
                let into = &mut merged[i];
                into.step = into.step.max(report.step);
                if report.total_steps > 0 {
                    into.total_steps = report.total_steps;
                }
                into.metrics.extend(report.metrics.iter().cloned());
            }
            // The same lease with another token: its own entry, refused on its own.
            Some(_) => merged.push(report.clone()),
            None => {
                index.insert(key, merged.len());
                merged.push(report.clone());
            }
        }
    }
    merged
}

impl Store {
    /// Records the progress and metrics of several leases and renews those
    /// with less than half of `timeout` left, all in one transaction, and answers for each lease of
    /// [`merge_reports`]`(reports)` in its order whether it should stop. A
    /// training loss that is NaN or infinite fails its job as diverged.
    #[instrument(skip_all, fields(reports = reports.len()))]
    pub async fn report_progress_batch(
        &self,
        reports: &[ProgressReport],
        timeout: Duration,
    ) -> Result<Vec<(ProgressReport, Fenced<StopSignal>)>> {
        let merged = merge_reports(reports);
        let leases: Vec<LeaseRef> = merged.iter().map(|r| r.lease).collect();
        let mut tx = self.hot.begin().await?;
        let locked = lock_leased_all(&mut tx, &leases).await?;
        let mut answers = Vec::with_capacity(merged.len());
        let mut valid = Vec::new();
        for (report, lock) in merged.into_iter().zip(locked) {
            let fenced = match lock.valid() {
                Err(refused) => refused,
                Ok(job) if !job.holds(report.lease) => job.stale()?,
                Ok(job) => {
                    valid.push(answers.len());
                    Fenced::Valid(if job.cancel_requested {
                        StopSignal::Cancel
                    } else if job.early_stop_requested {
                        StopSignal::EarlyStop
                    } else {
                        StopSignal::Continue
                    })
                }
            };
            answers.push((report, fenced));
        }
        if valid.is_empty() {
            return Ok(answers);
        }

        let job_ids: Vec<Uuid> = valid.iter().map(|&i| answers[i].0.lease.job_id.0).collect();
        let steps: Vec<i64> = valid.iter().map(|&i| to_i64(answers[i].0.step)).collect();
        let totals: Vec<i64> = valid.iter().map(|&i| to_i64(answers[i].0.total_steps)).collect();
        let epochs: Vec<i64> = valid.iter().map(|&i| to_i64(answers[i].0.lease.epoch)).collect();
        let metrics = MetricColumns::of(valid.iter().flat_map(|&i| {
            let report = &answers[i].0;
            report.metrics.iter().map(move |m| (report.lease.job_id, m))
        }));
        // The steps, the metrics and the renewed leases, in one statement.
        // A lease is renewed only once less than half of it is left (the
        // worker's heartbeats renew it as well): renewing rewrites the
        // attempt's row with an entry in each of its six indexes
        // (`lease_expires_at` is one of them), so a job reporting every
        // step rewrote it at every step; now about twice per lease period.
        let query = sqlx::query(concat!(
            "WITH j AS ( \
                 UPDATE jobs j SET step = r.step, \
                     total_steps = CASE WHEN r.total_steps > 0 THEN r.total_steps ELSE j.total_steps END \
                 FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[]) AS r(id, step, total_steps) WHERE j.id = r.id), ",
            upsert_metrics!("6", "7", "8", "9", "10"),
            " UPDATE job_attempts a SET lease_expires_at = now() + $5 * interval '1 millisecond' \
             FROM UNNEST($1::uuid[], $4::bigint[]) AS l(job_id, epoch) \
             WHERE a.job_id = l.job_id AND a.epoch = l.epoch AND a.ended_at IS NULL \
               AND a.lease_expires_at < now() + $5 * interval '1 millisecond' / 2"
        ))
        .bind(&job_ids)
        .bind(&steps)
        .bind(&totals)
        .bind(&epochs)
        .bind(millis(timeout));
        metrics.bind(query).execute(&mut *tx).await?;
        drop(metrics);

        for &i in &valid {
            let (report, fenced) = &mut answers[i];
            let diverged = report
                .metrics
                .iter()
                .filter(|m| m.kind == MetricKind::Train && m.name == "loss" && !m.value.is_finite())
                .min_by_key(|m| m.step);
            if let Some(m) = diverged {
                let error = format!("{DIVERGED_PREFIX} loss became {} at step {}", m.value, m.step);
                end_attempt(&mut tx, report.lease, "failed", &error).await?;
                set_state_after_attempt(&mut tx, report.lease.job_id, JobState::Failed, &error, None).await?;
                *fenced = Fenced::Valid(StopSignal::Diverged);
            }
        }
        tx.commit().await?;
        Ok(answers)
    }
}

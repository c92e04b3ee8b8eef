//! Progress of every lease of this worker in one call. Each lease's
//! delivery ([`super::delivery`]) hands its next progress report (the
//! pending steps of its journal, merged) to one task, and waits for that
//! lease's answer before it goes on, so each journal is still delivered in
//! order. The task sends whatever reports are waiting together, one
//! `ReportProgressBatch` call for the jobs of a pack that reached a step
//! together, and reports that arrive while a call is under way go in the
//! next one: no report waits for a timer.
//!
//! A coordinator that predates `ReportProgressBatch` answers
//! `UNIMPLEMENTED`; the task then sends each report alone with
//! `ReportProgress`, as before, from then on.

use ptune_proto::v1;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};
use tracing::info;

use crate::agent::client::{Coordinators, CALL_TIMEOUT};

/// Most reports one call carries (the coordinator takes 1,000).
const MAX_REPORTS_PER_CALL: usize = 500;

type Answer = Result<v1::ReportProgressResponse, Status>;

/// One lease's report waiting for its answer.
struct Pending {
    report: v1::ReportProgressRequest,
    reply: oneshot::Sender<Answer>,
}

/// Sends progress reports, batched with those of the worker's other
/// leases. Cheap to clone; the task ends when every clone is dropped.
#[derive(Clone)]
pub struct ProgressSender {
    tx: mpsc::UnboundedSender<Pending>,
}

impl ProgressSender {
    /// Starts the task that sends the reports.
    pub fn start(coordinators: Coordinators) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(coordinators, rx));
        Self { tx }
    }

    /// Sends one lease's report and waits for its answer.
    pub async fn send(&self, report: v1::ReportProgressRequest) -> Answer {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Pending { report, reply }).map_err(|_| Status::cancelled("the worker is stopping"))?;
        answer.await.map_err(|_| Status::cancelled("the worker is stopping"))?
    }
}

async fn run(coordinators: Coordinators, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut batches = true;
    while let Some(first) = rx.recv().await {
        let mut pending = vec![first];
        while pending.len() < MAX_REPORTS_PER_CALL {
            match rx.try_recv() {
                Ok(more) => pending.push(more),
                Err(_) => break,
            }
        }
        if batches {
            let (request, waiting) = coalesce(pending);
            let answer = coordinators
                .call(CALL_TIMEOUT, move |mut c| {
                    let request = request.clone();
                    async move { c.report_progress_batch(request).await.map(|r| r.into_inner()) }
                })
                .await;
            match answer {
                Err(status) if status.code() == Code::Unimplemented => {
                    info!("the coordinator takes no progress batches; reporting each job alone");
                    batches = false;
                    pending = waiting;
                }
                answer => {
                    let keys: Vec<(String, u64)> =
                        waiting.iter().map(|p| (p.report.job_id.clone(), p.report.epoch)).collect();
                    for (p, answer) in waiting.into_iter().zip(answers_for(&keys, answer)) {
                        let _ = p.reply.send(answer);
                    }
                    continue;
                }
            }
        }
        for p in pending {
            let report = p.report;
            let call = coordinators.call(CALL_TIMEOUT, move |mut c| {
                let report = report.clone();
                async move { c.report_progress(report).await.map(|r| r.into_inner()) }
            });
            tokio::spawn(async move {
                let _ = p.reply.send(call.await);
            });
        }
    }
}

/// The batch request of the waiting reports, which it carries in their order.
fn coalesce(pending: Vec<Pending>) -> (v1::ReportProgressBatchRequest, Vec<Pending>) {
    let request = v1::ReportProgressBatchRequest { reports: pending.iter().map(|p| p.report.clone()).collect() };
    (request, pending)
}

/// Each lease's answer, for the leases `keys` (job id and epoch) of a batch:
/// the coordinator's answer for it, the call's failure for all when the call
/// failed, and a failure worth retrying for a lease it did not answer.
fn answers_for(keys: &[(String, u64)], answer: Result<v1::ReportProgressBatchResponse, Status>) -> Vec<Answer> {
    let answers = match answer {
        Ok(response) => response.answers,
        Err(status) => return keys.iter().map(|_| Err(status.clone())).collect(),
    };
    keys.iter()
        .map(|(job_id, epoch)| match answers.iter().find(|a| a.job_id == *job_id && a.epoch == *epoch) {
            Some(a) if a.error_code != 0 => Err(Status::new(Code::from(a.error_code), a.error_message.clone())),
            Some(a) => Ok(a.recorded.unwrap_or_default()),
            None => Err(Status::unavailable(format!("the coordinator did not answer for job {job_id}; sending again"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::journal::delivery::progress_report;
    use crate::agent::journal::tests::{lease, progress};
    use crate::agent::journal::{Journal, LeaseFile};

    fn journal_of(dir: &std::path::Path, job_id: &str, steps: std::ops::RangeInclusive<u64>) -> Journal {
        let mut journal = Journal::create(dir, LeaseFile { job_id: job_id.into(), ..lease() }).unwrap();
        for step in steps {
            journal.append(progress(step));
        }
        journal
    }

    #[test]
    fn the_pending_steps_of_several_jobs_go_in_one_batch_and_each_job_gets_its_own_answer() {
        let dir = tempfile::tempdir().unwrap();
        let journals = [journal_of(dir.path(), "job-a", 1..=3), journal_of(dir.path(), "job-b", 1..=2)];
        let mut replies = Vec::new();
        let mut pending = Vec::new();
        for journal in &journals {
            let (report, covers) = progress_report(journal).expect("progress pending");
            assert_eq!(covers, journal.records.len(), "every pending step of a job goes in its report");
            let (reply, answer) = oneshot::channel();
            pending.push(Pending { report, reply });
            replies.push(answer);
        }
        let (request, waiting) = coalesce(pending);
        let sent: Vec<(&str, u64, usize)> =
            request.reports.iter().map(|r| (r.job_id.as_str(), r.step, r.metrics.len())).collect();
        assert_eq!(sent, [("job-a", 3, 3), ("job-b", 2, 2)], "one call carries both jobs, every step of each");

        // The coordinator stops job a (cancelled) and refuses job b's lease.
        let cancelled = v1::ReportProgressResponse { stop: true, stop_reason: v1::StopReason::Cancelled as i32 };
        let response = v1::ReportProgressBatchResponse {
            answers: vec![
                v1::ProgressAnswer {
                    job_id: "job-b".into(),
                    epoch: 3,
                    error_code: Code::FailedPrecondition as i32,
                    error_message: "lease job-b@3 is no longer valid".into(),
                    ..Default::default()
                },
                v1::ProgressAnswer {
                    job_id: "job-a".into(),
                    epoch: 3,
                    recorded: Some(cancelled),
                    ..Default::default()
                },
            ],
        };
        let keys: Vec<(String, u64)> = waiting.iter().map(|p| (p.report.job_id.clone(), p.report.epoch)).collect();
        let answers = answers_for(&keys, Ok(response));
        assert_eq!(answers[0].as_ref().unwrap().stop_reason(), v1::StopReason::Cancelled);
        let refused = answers[1].as_ref().unwrap_err();
        assert_eq!((refused.code(), refused.message()), (Code::FailedPrecondition, "lease job-b@3 is no longer valid"));

        // A failed call fails every report of it; an answer missing for a job is retried.
        let down = answers_for(&keys, Err(Status::unavailable("connection refused")));
        assert!(down.iter().all(|a| a.as_ref().unwrap_err().code() == Code::Unavailable));
        let partial = answers_for(&keys[..1], Ok(v1::ReportProgressBatchResponse::default()));
        assert_eq!(partial[0].as_ref().unwrap_err().code(), Code::Unavailable);
    }
}

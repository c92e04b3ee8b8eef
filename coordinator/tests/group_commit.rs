//! Progress reports and completions of many workers arriving at once are
//! written together, several calls in one transaction (`group.rs`), over
//! real gRPC. Each call still gets its own answer: a refused report or
//! completion changes nothing and refuses no one else, a diverged loss
//! fails only its job, a retried completion is recognised, two completions
//! of one job with different adapters keep one, and every accepted step,
//! metric and adapter is stored exactly once, small and large adapters
//! alike. `/metrics` shows how many calls each transaction wrote.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{metric, sha256, state};
use futures::future::join_all;
use ptune_proto::v1;
use tonic::Code;

/// Workers, each holding one job.
const WORKERS: usize = 24;

fn report(lease: &v1::Lease, step: u64, loss: f64) -> v1::ReportProgressRequest {
    v1::ReportProgressRequest {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        step,
        total_steps: 10,
        metrics: vec![metric(step, "train", "loss", loss)],
        lease_token: lease.lease_token.clone(),
    }
}

/// The adapter job `i` completes with: its own bytes, one of them past one chunk (1 MiB).
fn adapter(i: usize) -> Vec<u8> {
    let size = if i == 9 { (1 << 20) + 10 } else { 3000 + i };
    (0..size).map(|b| (b * 7 + i) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_written_together_each_get_their_own_answer_and_store_exactly_what_was_accepted() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let spec = env.spec("grouped").await;
    let mut leases = Vec::new();
    for i in 0..WORKERS {
        env.submit(v1::JobSpec { name: format!("grouped-{i}"), ..spec.clone() }).await;
        let worker = env.register().await;
        leases.push(env.lease(&worker).await.expect("a lease for each worker"));
    }
    // Job 2's lease is lost before it reports: its job failed.
    env.fail(&leases[2], "injected error", false, false).await.unwrap();

    // Every worker reports at once: step 1 alone and step 2 in a batch, in
    // two calls in flight together. Job 0's worker shows a wrong token and
    // job 1's loss diverges.
    let calls = leases.iter().enumerate().map(|(i, lease)| {
        let mut client = env.workers.clone();
        let mut lease = lease.clone();
        if i == 0 {
            lease.lease_token = "not-the-token".into();
        }
        let loss = if i == 1 { f64::NAN } else { 1.0 / (i + 1) as f64 };
        let mut batch_client = client.clone();
        let batch = v1::ReportProgressBatchRequest { reports: vec![report(&lease, 2, loss / 2.0)] };
        async move {
            let (single, batched) = tokio::join!(
                client.report_progress(report(&lease, 1, loss)),
                batch_client.report_progress_batch(batch)
            );
            (single.map(|r| r.into_inner()), batched.map(|r| r.into_inner().answers))
        }
    });
    let answers = join_all(calls).await;
    for (i, (single, batched)) in answers.iter().enumerate() {
        let batched = batched.as_ref().expect("a batch call is answered per lease");
        assert_eq!(batched.len(), 1, "job {i}: one answer for its one lease");
        let code = Code::from(batched[0].error_code);
        match i {
            0 => {
                assert_eq!(single.as_ref().unwrap_err().code(), Code::PermissionDenied, "job 0: {single:?}");
                assert_eq!(code, Code::PermissionDenied, "job 0's batch: {batched:?}");
            }
            1 => {
                // Whichever of its two calls came first failed the job; the other is refused or told the same.
                let stopped =
                    [single.as_ref().ok().map(|r| r.stop_reason()), batched[0].recorded.map(|r| r.stop_reason())];
                assert!(stopped.contains(&Some(v1::StopReason::Diverged)), "job 1 diverged: {single:?} {batched:?}");
            }
            2 => {
                assert_eq!(single.as_ref().unwrap_err().code(), Code::FailedPrecondition, "job 2: {single:?}");
                assert_eq!(code, Code::FailedPrecondition, "job 2's batch: {batched:?}");
            }
            _ => {
                let single = single.as_ref().unwrap_or_else(|e| panic!("job {i} was refused: {e:?}"));
                assert!(!single.stop, "job {i} keeps training");
                assert_eq!(code, Code::Ok, "job {i}'s batch: {batched:?}");
                assert!(!batched[0].recorded.unwrap().stop, "job {i} keeps training");
            }
        }
    }

    // Every worker completes at once, job 0's again with a wrong token. Jobs
    // 3 to 6 complete twice with the same adapter (a retry whose first answer
    // was lost), job 7 twice with two different adapters; job 9's adapter
    // passes one chunk.
    let mut calls = Vec::new();
    for (i, lease) in leases.iter().enumerate() {
        let mut shown = lease.clone();
        if i == 0 {
            shown.lease_token = "not-the-token".into();
        }
        calls.push((i, env.complete_parts(&shown, &adapter(i))));
        if (3..=6).contains(&i) {
            calls.push((i, env.complete_parts(lease, &adapter(i))));
        }
        if i == 7 {
            calls.push((i, env.complete_parts(lease, &adapter(100))));
        }
    }
    let completions = calls.into_iter().map(|(i, parts)| {
        let mut client = env.workers.clone();
        async move { (i, client.complete_job(futures::stream::iter(parts)).await.map(|_| ())) }
    });
    let mut outcomes: HashMap<usize, Vec<Result<(), tonic::Status>>> = HashMap::new();
    for (i, outcome) in join_all(completions).await {
        outcomes.entry(i).or_default().push(outcome);
    }

    for i in 0..WORKERS {
        let job = env.get(&leases[i].job_id).await;
        let outcomes = &outcomes[&i];
        match i {
            0 => {
                assert_eq!(outcomes[0].as_ref().unwrap_err().code(), Code::PermissionDenied);
                assert_eq!(state(&job), v1::JobState::Running, "job 0 is untouched by the wrong token");
                assert_eq!(job.step, 0, "job 0 recorded no step");
            }
            1 | 2 => {
                assert_eq!(outcomes[0].as_ref().unwrap_err().code(), Code::FailedPrecondition, "job {i}");
                assert_eq!(state(&job), v1::JobState::Failed, "job {i}");
                assert!(job.adapter_sha256.is_empty(), "job {i} has no adapter");
            }
            7 => {
                let ok: Vec<_> = outcomes.iter().filter(|o| o.is_ok()).collect();
                assert_eq!(ok.len(), 1, "one of job 7's two adapters is kept: {outcomes:?}");
                let refused = outcomes.iter().find_map(|o| o.as_ref().err()).expect("the other is refused");
                assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
                assert_eq!(state(&job), v1::JobState::Succeeded);
                let kept = [sha256(&adapter(7)), sha256(&adapter(100))];
                assert!(kept.contains(&job.adapter_sha256), "job 7 keeps one of its adapters whole");
                assert!(refused.message().contains(&job.adapter_sha256), "the refusal names the kept adapter");
            }
            _ => {
                assert!(outcomes.iter().all(Result::is_ok), "job {i}: {outcomes:?}");
                assert_eq!(state(&job), v1::JobState::Succeeded, "job {i}");
                assert_eq!(job.adapter_sha256, sha256(&adapter(i)), "job {i} keeps its own adapter");
                assert_eq!(job.adapter_size_bytes, adapter(i).len() as u64, "job {i}");
                assert_eq!(job.step, 10, "job {i} ends at its last step");
            }
        }
    }

    // Exactly what was accepted is stored: two losses for each job that
    // trained, one final accuracy for each job that succeeded, one complete
    // blob per adapter and none left over.
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    let rows: Vec<(String, String, i64, f64)> =
        sqlx::query_as("SELECT job_id::text, kind, step, value FROM metrics ORDER BY job_id, kind, step")
            .fetch_all(&pool)
            .await
            .unwrap();
    for (i, lease) in leases.iter().enumerate() {
        let mine: Vec<(&str, i64, f64)> =
            rows.iter().filter(|r| r.0 == lease.job_id).map(|r| (r.1.as_str(), r.2, r.3)).collect();
        let expected: Vec<(&str, i64, f64)> = match i {
            0 | 2 => vec![],
            _ => {
                let loss = 1.0 / (i + 1) as f64;
                vec![("eval", 10, 0.9), ("train", 1, loss), ("train", 2, loss / 2.0)]
            }
        };
        if i == 1 {
            // The diverged step is recorded as it was sent, and nothing after it.
            assert!(mine.iter().all(|(kind, _, value)| *kind == "train" && value.is_nan()), "job 1: {mine:?}");
            assert!(!mine.is_empty() && mine.len() <= 2, "job 1: {mine:?}");
            continue;
        }
        assert_eq!(mine, expected, "metrics of job {i}");
    }
    let (blobs, adapters, incomplete): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM blobs b JOIN adapters a ON a.blob_id = b.id WHERE b.complete), \
                (SELECT count(*) FROM adapters), (SELECT count(*) FROM blobs WHERE NOT complete)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let succeeded = (WORKERS - 3) as i64;
    assert_eq!(
        (blobs, adapters, incomplete),
        (succeeded, succeeded, 0),
        "one complete blob per adapter, none left over"
    );

    // The jobs per state that the overview and /metrics read are exact: the
    // leases and completions counted their own moves, each retried or
    // refused completion none.
    let (counted, actual) = env.state_counts().await;
    let expected = vec![("failed".to_string(), 2), ("running".to_string(), 1), ("succeeded".to_string(), succeeded)];
    assert_eq!(actual, expected, "the jobs' states");
    assert_eq!(counted, actual, "the counts per state match the jobs");

    // The calls went together: /metrics counts fewer progress transactions than calls.
    let calls = env.metric_value("ptune_group_commit_calls_sum{writes=\"progress\"}").await;
    let transactions = env.metric_value("ptune_group_commit_calls_count{writes=\"progress\"}").await;
    assert_eq!(calls, (2 * WORKERS) as f64, "every progress call was written");
    assert!(transactions < calls, "{calls} progress calls in {transactions} transactions");
    env.stop().await;
}

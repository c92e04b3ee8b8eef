//! A completion that asks for the worker's next job (`CompleteJobHeader.next`):
//! it brings the next queued job's lease, which works as one from LeaseJob;
//! a request that would wait is refused before anything is recorded; a next
//! lease that cannot be taken, or whose claim fails in the completion's
//! transaction, leaves the completion recorded.

mod common;

use std::time::Duration;

use common::{metric, state, Env};
use ptune_proto::v1::{self, complete_job_chunk::Part};
use tonic::Code;

const ADAPTER: &[u8] = b"adapter bytes";

fn ask(worker: &str) -> v1::LeaseJobRequest {
    v1::LeaseJobRequest { worker_id: worker.to_string(), free_slots: 1, ..Default::default() }
}

/// Completes `lease`, asking for `next` with it.
async fn complete_asking(
    env: &mut Env,
    lease: &v1::Lease,
    next: v1::LeaseJobRequest,
) -> Result<v1::CompleteJobResponse, tonic::Status> {
    let mut parts = env.complete_parts(lease, ADAPTER);
    let Some(Part::Header(header)) = &mut parts[0].part else { unreachable!("the first part is the header") };
    header.next = Some(next);
    env.workers.complete_job(futures::stream::iter(parts)).await.map(tonic::Response::into_inner)
}

/// Completes `lease` asking for `next`, which must be refused naming its field.
async fn refused(env: &mut Env, lease: &v1::Lease, next: v1::LeaseJobRequest, message_start: &str) {
    let err = complete_asking(env, lease, next).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with(message_start), "{}", err.message());
}

/// Two jobs named `name` submitted and a worker registered that leased the
/// first: the coordinator, the leased job, the queued one, the worker and
/// its lease.
async fn one_leased_one_queued(name: &str) -> (Env, v1::Job, v1::Job, String, v1::Lease) {
    let mut env = common::start(Duration::from_secs(10)).await;
    let spec = env.spec(name).await;
    let job = env.submit(spec.clone()).await;
    let queued = env.submit(spec).await;
    let worker = env.register().await;
    let lease = env.lease(&worker).await.expect("the first job is leased");
    (env, job, queued, worker, lease)
}

#[tokio::test]
async fn a_completion_brings_the_next_queued_job_whose_lease_works_like_any_other() {
    let (mut env, first, second, worker, lease) = one_leased_one_queued("next").await;
    assert_eq!(lease.job_id, first.id, "oldest first");

    let reply = complete_asking(&mut env, &lease, ask(&worker)).await.expect("the completion is recorded");
    assert_eq!(state(&env.get(&first.id).await), v1::JobState::Succeeded);
    let next = reply.next.expect("the queued job comes with the completion");
    assert_eq!((next.job_id.as_str(), next.epoch, next.attempt), (second.id.as_str(), 1, 1));
    assert_eq!(next.spec.as_ref().unwrap().name, "next");
    let running = env.get(&second.id).await;
    assert_eq!((state(&running), running.worker_id.as_str()), (v1::JobState::Running, worker.as_str()));

    // The lease reports, heartbeats and completes as one LeaseJob gave.
    assert!(!env.report(&next, 3, vec![metric(3, "train", "loss", 0.5)]).await.unwrap());
    let beat = env.heartbeat(&worker, &[&next]).await;
    assert!(beat.known && beat.stop.is_empty(), "{beat:?}");
    let last = complete_asking(&mut env, &next, ask(&worker)).await.expect("the second completion is recorded");
    assert!(last.next.is_none(), "nothing is queued any more: {:?}", last.next);
    let done = env.get(&second.id).await;
    assert_eq!((state(&done), done.step), (v1::JobState::Succeeded, 10));
    assert!(env.lease(&worker).await.is_none());

    // A completion that asks for nothing gets nothing, as before.
    let plain_spec = env.spec("plain").await;
    let third = env.submit(plain_spec.clone()).await;
    let lease = env.lease(&worker).await.unwrap();
    let fourth = env.submit(plain_spec).await;
    let parts = env.complete_parts(&lease, ADAPTER);
    let plain = env.workers.complete_job(futures::stream::iter(parts)).await.unwrap().into_inner();
    assert!(plain.next.is_none());
    assert_eq!(state(&env.get(&third.id).await), v1::JobState::Succeeded);
    assert_eq!(state(&env.get(&fourth.id).await), v1::JobState::Queued, "no lease was asked for");
    // The leases and completions counted their own moves between states.
    let (counted, actual) = env.state_counts().await;
    assert_eq!(actual, vec![("queued".to_string(), 1), ("succeeded".to_string(), 3)], "the jobs' states");
    assert_eq!(counted, actual, "the counts per state match the jobs");
    env.stop().await;
}

#[tokio::test]
async fn a_next_lease_request_that_would_wait_or_names_no_worker_is_refused_before_anything_is_recorded() {
    let (mut env, job, _, worker, lease) = one_leased_one_queued("refused").await;

    let waits = v1::LeaseJobRequest { wait_ms: 1000, ..ask(&worker) };
    refused(&mut env, &lease, waits, "next.wait_ms: must be 0").await;
    refused(&mut env, &lease, ask("not-a-worker"), "next.worker_id: ").await;
    let bad_model = v1::LeaseJobRequest { loaded_models: vec!["../etc".into()], ..ask(&worker) };
    refused(&mut env, &lease, bad_model, "next.loaded_models[0]").await;

    assert_eq!(state(&env.get(&job.id).await), v1::JobState::Running, "a refused completion records nothing");
    complete_asking(&mut env, &lease, ask(&worker)).await.expect("the same completion, asked right, is recorded");
    env.stop().await;
}

#[tokio::test]
async fn a_next_lease_that_cannot_be_taken_leaves_the_completion_recorded_and_the_queue_as_it_was() {
    let (mut env, job, queued, worker, lease) = one_leased_one_queued("stays").await;

    // A worker that never registered cannot be leased to: the completion stands.
    let stranger = ptune_core::WorkerId::new().to_string();
    let reply = complete_asking(&mut env, &lease, ask(&stranger)).await.expect("the completion is recorded");
    assert!(reply.next.is_none());
    assert_eq!(state(&env.get(&job.id).await), v1::JobState::Succeeded);
    assert_eq!(state(&env.get(&queued.id).await), v1::JobState::Queued);
    // The worker then asks with LeaseJob, as it does when a completion brings nothing.
    assert_eq!(env.lease(&worker).await.expect("LeaseJob still leases it").job_id, queued.id);
    env.stop().await;
}

#[tokio::test]
async fn a_next_lease_whose_claim_fails_in_the_completions_transaction_leaves_the_completion_recorded() {
    let (mut env, job, queued, worker, lease) = one_leased_one_queued("poisoned").await;

    // Opening an attempt of the queued job fails, as a claim that breaks
    // after the completion's writes would: the statement that leases it
    // errors inside the transaction that completes the first job.
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION refuse_attempt() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'attempts of job {id} are refused'; END $$; \
         CREATE TRIGGER refuse_attempt BEFORE INSERT ON job_attempts FOR EACH ROW \
         WHEN (NEW.job_id = '{id}') EXECUTE FUNCTION refuse_attempt();",
        id = queued.id
    )))
    .execute(&pool)
    .await
    .unwrap();
    let reply = complete_asking(&mut env, &lease, ask(&worker)).await.expect("the completion is recorded");
    assert!(reply.next.is_none(), "no lease could be taken: {:?}", reply.next);
    let done = env.get(&job.id).await;
    assert_eq!((state(&done), done.attempts), (v1::JobState::Succeeded, 1));
    let still = env.get(&queued.id).await;
    assert_eq!((state(&still), still.attempts), (v1::JobState::Queued, 0), "the failed claim left no trace");

    sqlx::raw_sql("DROP TRIGGER refuse_attempt ON job_attempts").execute(&pool).await.unwrap();
    let next = env.lease(&worker).await.expect("LeaseJob leases it once attempts open again");
    assert_eq!((next.job_id.as_str(), next.attempt), (queued.id.as_str(), 1));
    env.stop().await;
}

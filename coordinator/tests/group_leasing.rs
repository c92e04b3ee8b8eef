//! Lease calls of many workers arriving at once are placed and claimed
//! together (`Store::lease_group`): one read of the queue's head, one of the
//! jobs the workers run, one transaction for all the claims. Each worker
//! still gets what it would get asking alone: a job it fits, on a model it
//! holds first, a job in its spread window left to a better placed worker,
//! and never a job another lease holds or already took. Over real gRPC and
//! on the store, against a real database.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::MODEL;
use futures::future::join_all;
use ptune_coordinator::model::WorkerOffer;
use ptune_coordinator::placement::DeviceRoom;
use ptune_coordinator::store::{LeaseAsk, Store};
use ptune_coordinator::testing::minilm_model;
use ptune_core::WorkerId;
use ptune_proto::v1;

const MIB: u64 = 1 << 20;
const OTHER_MODEL: &str = "other-bert";
const IDLE_MODEL: &str = "idle-bert";

/// Workers asking at once in the gRPC test.
const WORKERS: usize = 40;

async fn register(env: &mut common::Env, models: &[&str], memory_bytes: u64) -> String {
    let request = v1::RegisterWorkerRequest {
        hostname: "test-host".into(),
        slots: 4,
        models: models.iter().map(|m| minilm_model(m)).collect(),
        memory_bytes,
        ..Default::default()
    };
    env.workers.register_worker(request).await.expect("register").into_inner().worker_id
}

/// What `worker` offers a lease call of the store.
fn ask(worker: &str, models: &[&str], loaded: &[&str], memory_bytes: u64) -> LeaseAsk {
    LeaseAsk {
        worker: WorkerId(worker.parse().unwrap()),
        offer: WorkerOffer {
            models: models.iter().map(|m| m.to_string()).collect(),
            loaded: loaded.iter().map(|m| m.to_string()).collect(),
            devices: vec![DeviceRoom { name: String::new(), memory_bytes: Some(memory_bytes) }],
        },
    }
}

/// The job each ask of a group got, and how many leasable jobs it saw.
async fn lease_group(store: &Store, asks: &[LeaseAsk]) -> Vec<(Option<String>, usize)> {
    store
        .lease_group(asks, Duration::from_secs(30))
        .await
        .into_iter()
        .map(|r| {
            let (lease, seen) = r.expect("a lease call");
            (lease.map(|l| l.job_id.to_string()), seen)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_calls_arriving_together_each_get_a_different_job_and_every_job_is_leased_once() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let spec = env.spec("together").await;
    let mut submitted = HashSet::new();
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        submitted.insert(env.submit(v1::JobSpec { name: format!("together-{i}"), ..spec.clone() }).await.id);
        workers.push(env.register().await);
    }
    let calls = workers.iter().map(|worker| {
        let mut client = env.workers.clone();
        let request = v1::LeaseJobRequest { worker_id: worker.clone(), free_slots: 1, ..Default::default() };
        async move { client.lease_job(request).await.expect("lease").into_inner().lease }
    });
    let leased: Vec<String> =
        join_all(calls).await.into_iter().map(|l| l.expect("a job for every worker").job_id).collect();
    let distinct: HashSet<String> = leased.iter().cloned().collect();
    assert_eq!(distinct.len(), WORKERS, "no job leased twice");
    assert_eq!(distinct, submitted, "every job leased");
    for id in &leased {
        let job = env.get(id).await;
        assert_eq!((common::state(&job), job.attempts), (v1::JobState::Running, 1), "{id} leased once");
    }
    // The leases counted their own moves between states, a group's together.
    let (counted, actual) = env.state_counts().await;
    assert_eq!(actual, vec![("running".to_string(), WORKERS as i64)], "the jobs' states");
    assert_eq!(counted, actual, "the counts per state match the jobs");

    // The calls went together: /metrics counts fewer lease groups than calls.
    let calls = env.metric_value("ptune_group_commit_calls_sum{writes=\"lease\"}").await;
    let groups = env.metric_value("ptune_group_commit_calls_count{writes=\"lease\"}").await;
    assert_eq!(calls, WORKERS as f64, "every lease call was placed");
    assert!(groups < calls, "{calls} lease calls in {groups} groups");
    env.stop().await;
}

#[tokio::test]
async fn each_ask_of_a_group_gets_what_it_would_alone_and_a_job_another_lease_holds_is_passed_over() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let both = register(&mut env, &[MODEL, OTHER_MODEL], 1 << 30).await;
    let one = register(&mut env, &[MODEL], 1 << 30).await;
    let idle = register(&mut env, &[IDLE_MODEL], 1 << 30).await;
    // Each job needs about 125 MiB (memory.rs): none fits in 100 MiB.
    let small = register(&mut env, &[MODEL], 100 * MIB).await;
    let spec = env.spec("grouped").await;
    let mut jobs = Vec::new();
    for (name, model) in [("first", MODEL), ("other", OTHER_MODEL), ("third", MODEL), ("fourth", MODEL)] {
        jobs.push(env.submit(v1::JobSpec { name: name.into(), base_model: model.into(), ..spec.clone() }).await.id);
    }
    let store = Store::connect(&env.db.url).await.unwrap();

    let asks = [
        ask(&small, &[MODEL], &[], 100 * MIB),
        ask(&both, &[MODEL, OTHER_MODEL], &[OTHER_MODEL], 1 << 30),
        ask(&one, &[MODEL], &[], 1 << 30),
        ask(&idle, &[IDLE_MODEL], &[], 1 << 30),
    ];
    assert_eq!(
        lease_group(&store, &asks).await,
        vec![
            (None, 3),                  // it fits none of the three jobs on its model
            (Some(jobs[1].clone()), 4), // the job on the model it holds, though younger
            (Some(jobs[0].clone()), 3), // the oldest job left on its model
            (None, 0),                  // nothing queued on its model
        ]
    );

    // Another lease holds the third job (as a claim of another coordinator
    // would): the first ask, which picked it, gets the next job of its
    // class, the fourth, and the second ask, which picked the fourth, finds
    // nothing left it may take, never the held job. The third is leased once
    // the other lets go.
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    let mut other = pool.begin().await.unwrap();
    let third: uuid::Uuid = jobs[2].parse().unwrap();
    sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE").bind(third).execute(&mut *other).await.unwrap();
    let asks = [ask(&both, &[MODEL, OTHER_MODEL], &[OTHER_MODEL], 1 << 30), ask(&one, &[MODEL], &[], 1 << 30)];
    let got = lease_group(&store, &asks).await;
    assert_eq!(got, vec![(Some(jobs[3].clone()), 2), (None, 1)], "the fourth job to the first ask, none to the second");
    assert_eq!(common::state(&env.get(&jobs[2]).await), v1::JobState::Queued);
    other.rollback().await.unwrap();
    let got = lease_group(&store, &asks).await;
    assert_eq!(got, vec![(Some(jobs[2].clone()), 1), (None, 0)]);
    for id in &jobs {
        let job = env.get(id).await;
        assert_eq!((common::state(&job), job.attempts), (v1::JobState::Running, 1), "{id} leased once");
    }
    env.stop().await;
}

#[tokio::test]
async fn within_a_group_a_job_in_its_spread_window_goes_to_the_worker_that_holds_its_model() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let cold = register(&mut env, &[MODEL], 1 << 30).await;
    let warm = register(&mut env, &[MODEL], 1 << 30).await;
    // Both ask over gRPC while nothing is queued: each counts as asking,
    // the warm one holding the model.
    for (worker, loaded) in [(&cold, vec![]), (&warm, vec![MODEL.to_string()])] {
        let request =
            v1::LeaseJobRequest { worker_id: worker.clone(), free_slots: 1, loaded_models: loaded, wait_ms: 0 };
        assert_eq!(env.workers.lease_job(request).await.expect("lease").into_inner().lease, None);
    }
    let spec = env.spec("fresh").await;
    let job = env.submit(spec).await.id;
    let store = Store::connect(&env.db.url).await.unwrap();
    // The cold worker asks first in the group, but the job is left to the
    // warm one while it is new.
    let asks = [ask(&cold, &[MODEL], &[], 1 << 30), ask(&warm, &[MODEL], &[MODEL], 1 << 30)];
    assert_eq!(lease_group(&store, &asks).await, vec![(None, 1), (Some(job), 1)]);
    env.stop().await;
}

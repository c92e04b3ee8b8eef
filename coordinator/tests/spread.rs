//! Load spreading through the real gRPC services on a real database: a new
//! job waits a moment for an idle worker rather than piling onto a busy
//! one, goes to a worker that holds its model in memory before one that
//! would load it, and is never held back for longer than the spread window.

mod common;

use std::time::Duration;

use common::MODEL;
use ptune_coordinator::placement::SPREAD_WINDOW;
use ptune_proto::v1;

/// A worker's lease request with `free_slots` free, holding `loaded`.
async fn ask(env: &mut common::Env, worker: &str, free_slots: u32, loaded: &[&str]) -> Option<String> {
    let request = v1::LeaseJobRequest {
        worker_id: worker.into(),
        free_slots,
        loaded_models: loaded.iter().map(|m| m.to_string()).collect(),
        wait_ms: 0,
    };
    env.workers.lease_job(request).await.expect("lease").into_inner().lease.map(|l| l.job_id)
}

async fn submit(env: &mut common::Env, names: &[&str]) -> Vec<String> {
    let spec = env.spec("spread").await;
    let mut ids = Vec::new();
    for name in names {
        ids.push(env.submit(v1::JobSpec { name: name.to_string(), ..spec.clone() }).await.id);
    }
    ids
}

#[tokio::test]
async fn jobs_spread_over_idle_workers_and_prefer_the_one_holding_the_model() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let (busy, idle) = (env.register().await, env.register().await);
    // Both ask for work while there is none: both are idle and asking.
    assert_eq!(ask(&mut env, &busy, 2, &[MODEL]).await, None);
    assert_eq!(ask(&mut env, &idle, 2, &[MODEL]).await, None);

    let jobs = submit(&mut env, &["first", "second", "third"]).await;
    assert_eq!(ask(&mut env, &busy, 2, &[MODEL]).await.as_ref(), Some(&jobs[0]));
    // It now runs one job, the other worker none: the next job is left to that one.
    assert_eq!(ask(&mut env, &busy, 1, &[MODEL]).await, None, "an idle worker is asking");
    assert_eq!(ask(&mut env, &idle, 2, &[MODEL]).await.as_ref(), Some(&jobs[1]));
    // One job each: no worker is better placed, the first to ask takes the third.
    assert_eq!(ask(&mut env, &busy, 1, &[MODEL]).await.as_ref(), Some(&jobs[2]));

    // A worker that holds the model goes first, though it runs more jobs...
    let fresh = env.register().await;
    assert_eq!(ask(&mut env, &fresh, 2, &[]).await, None);
    assert_eq!(ask(&mut env, &idle, 1, &[MODEL]).await, None, "idle has no job queued yet");
    let later = submit(&mut env, &["fourth"]).await;
    assert_eq!(ask(&mut env, &fresh, 2, &[]).await, None, "left to the worker holding the model");
    assert_eq!(ask(&mut env, &idle, 1, &[MODEL]).await.as_ref(), Some(&later[0]));

    // ...and a job the better placed worker does not take is anyone's after
    // the window (while that worker still counts as asking).
    let last = submit(&mut env, &["fifth"]).await;
    assert_eq!(ask(&mut env, &busy, 1, &[]).await, None, "fresh holds what busy holds and runs nothing");
    tokio::time::sleep(SPREAD_WINDOW + Duration::from_millis(200)).await;
    assert_eq!(ask(&mut env, &busy, 1, &[]).await.as_ref(), Some(&last[0]));
    env.stop().await;
}

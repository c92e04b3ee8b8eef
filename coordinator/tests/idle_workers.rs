//! Idle workers over real gRPC: a worker that holds no lease does not
//! heartbeat, its `LeaseJob` calls keep it online, however long they wait
//! (`workers/presence.rs`), and say it is healthy again; what coordinators
//! keep in memory so that those calls cost the database nothing (token rows
//! and worker registrations, `store/cache.rs`) changes on every coordinator
//! when it changes on one (migration 0017's notifications).

mod common;

use std::time::{Duration, Instant};

use ptune_coordinator::testing::channel;
use ptune_coordinator::Coordinator;
use ptune_proto::v1;
use ptune_proto::v1::admin_service_client::AdminServiceClient;
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;

fn ask(worker: &str, wait_ms: u32) -> v1::LeaseJobRequest {
    v1::LeaseJobRequest { worker_id: worker.into(), free_slots: 1, wait_ms, ..Default::default() }
}

async fn worker_info(env: &mut common::Env, id: &str) -> v1::WorkerInfo {
    let workers = env.jobs.list_workers(v1::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    workers.into_iter().find(|w| w.worker_id == id).expect("the worker is listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_waiting_for_work_stays_online_without_heartbeats_and_asking_says_it_is_healthy() {
    // Online means heard from within the lease timeout, here shorter than one wait.
    let lease_timeout = Duration::from_secs(3);
    let mut env = common::start(lease_timeout).await;
    let worker = env.register().await;

    // Unhealthy, told by a heartbeat; asking for work again says it is healthy.
    let unhealthy = v1::HeartbeatRequest {
        worker_id: worker.clone(),
        unhealthy_reason: "disk full: 10 MiB free".into(),
        ..Default::default()
    };
    env.workers.heartbeat(unhealthy).await.unwrap();
    assert_eq!(worker_info(&mut env, &worker).await.unhealthy_reason, "disk full: 10 MiB free");

    let mut workers = env.workers.clone();
    let asker = worker.clone();
    let started = Instant::now();
    let waiting = tokio::spawn(async move { workers.lease_job(ask(&asker, 5000)).await });
    let mut looked = 0;
    while started.elapsed() < Duration::from_millis(4500) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let info = worker_info(&mut env, &worker).await;
        assert!(
            info.online,
            "{:?} into a 5 s wait the worker is offline (last heard of {:.1} s ago, lease timeout 3 s)",
            started.elapsed(),
            info.heartbeat_age_seconds
        );
        assert_eq!(info.unhealthy_reason, "", "asking for work says the worker is healthy");
        looked += 1;
    }
    assert!(looked >= 6, "looked while it waited");
    assert!(waiting.await.unwrap().unwrap().into_inner().lease.is_none(), "no job was queued");

    // Once it stops asking, it goes offline after the lease timeout.
    common::wait_until(15, || {
        let mut jobs = env.jobs.clone();
        let worker = worker.clone();
        async move {
            let workers = jobs.list_workers(v1::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
            workers.iter().any(|w| w.worker_id == worker && !w.online)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_through_one_coordinator_is_refused_by_another_that_served_it() {
    let env = common::start(Duration::from_secs(30)).await;
    let b = Coordinator::start(env.config.clone()).await.expect("a second coordinator on the same database");
    let url_a = format!("http://{}", env.coordinator.as_ref().unwrap().grpc_addr);
    let url_b = format!("http://{}", b.grpc_addr);
    let mut admin = AdminServiceClient::new(channel(&url_a, &env.tokens.admin));
    let created = admin
        .create_token(v1::CreateTokenRequest { name: "short-lived".into(), role: "viewer".into(), expires_in_days: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut viewer_b = JobServiceClient::new(channel(&url_b, &created.token));
    for _ in 0..3 {
        viewer_b.list_workers(v1::ListWorkersRequest::default()).await.expect("a live token is served by B");
    }

    admin.revoke_token(v1::RevokeTokenRequest { token: "short-lived".into() }).await.unwrap();
    // B hears of it within milliseconds; without the notification it would serve its copy for minutes.
    let deadline = Instant::now() + Duration::from_secs(5);
    let refusal = loop {
        match viewer_b.list_workers(v1::ListWorkersRequest::default()).await {
            Err(status) => break status,
            Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(_) => panic!("B still serves a token revoked through A 5 s ago"),
        }
    };
    assert_eq!(refusal.code(), tonic::Code::Unauthenticated);
    assert!(refusal.message().contains("token revoked at"), "{}", refusal.message());
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_registered_again_through_one_coordinator_is_leased_as_registered_by_another() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let b = Coordinator::start(env.config.clone()).await.expect("a second coordinator on the same database");
    let mut workers_b = WorkerServiceClient::new(channel(&format!("http://{}", b.grpc_addr), &env.tokens.worker));
    let worker = env.register().await;
    // B reads the registration (serving the test model) and keeps it.
    for _ in 0..2 {
        assert!(workers_b.lease_job(ask(&worker, 0)).await.unwrap().into_inner().lease.is_none());
    }

    // Through A, the worker now serves another model only.
    env.workers
        .register_worker(v1::RegisterWorkerRequest {
            worker_id: worker.clone(),
            hostname: "test-host".into(),
            devices: vec![v1::Device { name: "cpu".into(), memory_bytes: 1 << 30, ..Default::default() }],
            slots: 2,
            models: vec![v1::BaseModel { name: "another-model".into(), max_positions: 512, ..Default::default() }],
            ..Default::default()
        })
        .await
        .unwrap();
    let spec = env.spec("not-for-it").await;
    let job = env.submit(spec).await;
    // The notification reaches B within milliseconds; half a second is ample.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lease = workers_b.lease_job(ask(&worker, 0)).await.unwrap().into_inner().lease;
    assert!(lease.is_none(), "B leased job {} on {} to a worker that no longer serves it", job.id, common::MODEL);

    // Registered with the model again, B leases it the job.
    env.register_as(&worker).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lease = workers_b.lease_job(ask(&worker, 0)).await.unwrap().into_inner().lease;
    assert_eq!(lease.map(|l| l.job_id), Some(job.id));
    b.shutdown().await.unwrap();
}

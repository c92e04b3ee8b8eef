//! Three `ptune-coordinator` processes on one fresh database, with protocol
//! workers spread over them (each fails over to the next coordinator when
//! its own stops answering, as real workers do): 200 jobs and an ASHA sweep
//! run to the end while the leader is killed with SIGKILL mid-run. Every job
//! succeeds exactly once, no job is ever held by two workers at once, ASHA
//! decides each rung of each trial once, and another coordinator leads
//! within one lease period of the leader's death.

mod common;

use std::collections::HashSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ptune_coordinator::auth::Role;
use ptune_coordinator::testing::{channel, create_token, fresh_database};
use ptune_proto::client::AuthChannel;
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::sweep_service_client::SweepServiceClient;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;
use ptune_proto::v1::{self, complete_job_chunk::Part};
use serde_json::json;
use tonic::{Code, Status};

const JOBS: usize = 200;
const WORKERS: usize = 12;
const LEASE: Duration = Duration::from_secs(6);

struct Replica {
    child: Child,
    grpc: String,
    http: std::net::SocketAddr,
}

impl Replica {
    /// Starts a coordinator on free ports. A port found free can be taken by
    /// another process before the coordinator binds it; the coordinator then
    /// exits at once, and is started again on other ports.
    fn start(database_url: &str) -> Replica {
        let port = || TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let listens = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        for _ in 0..5 {
            let (grpc, http) = (port(), port());
            let mut child = Command::new(env!("CARGO_BIN_EXE_ptune-coordinator"))
                .args(["--database-url", database_url])
                .args(["--grpc-addr", &format!("127.0.0.1:{grpc}"), "--http-addr", &format!("127.0.0.1:{http}")])
                .args(["--lease-timeout-ms", &LEASE.as_millis().to_string(), "--heartbeat-interval-ms", "1000"])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .expect("ptune-coordinator starts");
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().expect("the child's status").is_none() && Instant::now() < deadline {
                if listens(grpc) && listens(http) {
                    // It binds both before anything else: still running now, the ports are its own.
                    std::thread::sleep(Duration::from_millis(100));
                    if child.try_wait().expect("the child's status").is_none() {
                        return Replica { child, grpc: format!("http://127.0.0.1:{grpc}"), http: ([127, 0, 0, 1], http).into() };
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("a coordinator could not bind free ports five times over");
    }

    async fn leads(&self, token: &str) -> bool {
        let metrics = common::http_get(self.http, "/metrics", Some(token)).await;
        metrics.lines().any(|l| l == "ptune_coordinator_leader 1")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Retries a call on a transport failure, moving to the next coordinator.
async fn failover<T, F, Fut>(clients: &[WorkerServiceClient<AuthChannel>], at: &Mutex<usize>, mut call: F) -> Result<T, Status>
where
    F: FnMut(WorkerServiceClient<AuthChannel>) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    for _ in 0..200 {
        let i = *at.lock().unwrap();
        match call(clients[i].clone()).await {
            Err(s) if matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled) => {
                *at.lock().unwrap() = (i + 1) % clients.len();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
    Err(Status::unavailable("no coordinator answered"))
}

/// Leases and trains until `done`: four steps a job, an eval accuracy every
/// step that grows with the learning rate (so ASHA has curves to rank),
/// completing early when ASHA stops a trial.
async fn worker(
    clients: Vec<WorkerServiceClient<AuthChannel>>,
    first: usize,
    held: Arc<Mutex<HashSet<String>>>,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    let at = Mutex::new(first);
    let id = failover(&clients, &at, |mut c| async move {
        c.register_worker(v1::RegisterWorkerRequest {
            hostname: "fake".into(),
            devices: vec![v1::Device { name: "cpu".into(), memory_bytes: 1 << 30, ..Default::default() }],
            slots: 1,
            models: vec![v1::BaseModel { name: common::MODEL.into(), max_positions: 512, ..Default::default() }],
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().worker_id)
    })
    .await
    .expect("register");
    let mut trained = 0;
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        let request = v1::LeaseJobRequest { worker_id: id.clone(), free_slots: 1, ..Default::default() };
        let lease = failover(&clients, &at, |mut c| {
            let request = request.clone();
            async move { c.lease_job(request).await.map(|r| r.into_inner().lease) }
        })
        .await
        .expect("lease");
        let Some(lease) = lease else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        assert!(held.lock().unwrap().insert(lease.job_id.clone()), "job {} held by two workers at once", lease.job_id);
        let training = lease.spec.as_ref().unwrap().training.clone().unwrap();
        let lr = training.learning_rate;
        let mut last = 0;
        for step in 1..=training.max_steps {
            last = step;
            let metrics = vec![
                common::metric(step, "train", "loss", 1.0 / step as f64),
                common::metric(step, "eval", "accuracy", (lr * 10.0).min(1.0) * step as f64 / training.max_steps as f64),
            ];
            let request = v1::ReportProgressRequest {
                job_id: lease.job_id.clone(),
                epoch: lease.epoch,
                step,
                total_steps: training.max_steps,
                metrics,
                lease_token: lease.lease_token.clone(),
            };
            let reply = failover(&clients, &at, |mut c| {
                let request = request.clone();
                async move { c.report_progress(request).await.map(|r| r.into_inner()) }
            })
            .await
            .expect("report");
            if reply.stop {
                assert_eq!(reply.stop_reason, v1::StopReason::EarlyStopped as i32, "only ASHA stops jobs here");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let adapter = format!("adapter of {}", lease.job_id).into_bytes();
        let header = v1::CompleteJobHeader {
            job_id: lease.job_id.clone(),
            epoch: lease.epoch,
            adapter_sha256: common::sha256(&adapter),
            adapter_size: adapter.len() as u64,
            metrics: vec![common::metric(last, "eval", "accuracy", 0.5)],
            step: last,
            lease_token: lease.lease_token.clone(),
            ..Default::default()
        };
        let parts = vec![
            v1::CompleteJobChunk { part: Some(Part::Header(header)) },
            v1::CompleteJobChunk { part: Some(Part::Data(adapter)) },
        ];
        failover(&clients, &at, |mut c| {
            let parts = parts.clone();
            async move { c.complete_job(futures::stream::iter(parts)).await.map(|_| ()) }
        })
        .await
        .expect("complete");
        held.lock().unwrap().remove(&lease.job_id);
        trained += 1;
    }
    trained
}

#[tokio::test]
async fn jobs_and_a_sweep_finish_once_each_while_the_leading_coordinator_is_killed() {
    let db = fresh_database().await.unwrap();
    let admin = create_token(&db.url, Role::Admin, "admin").await.unwrap();
    let worker_token = create_token(&db.url, Role::Worker, "workers").await.unwrap();
    let mut replicas: Vec<Replica> = (0..3).map(|_| Replica::start(&db.url)).collect();
    let mut jobs: Vec<JobServiceClient<AuthChannel>> =
        replicas.iter().map(|r| JobServiceClient::new(channel(&r.grpc, &admin))).collect();
    for client in &mut jobs {
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.list_jobs(v1::ListJobsRequest { page_size: 1, ..Default::default() }).await.is_err() {
            assert!(Instant::now() < deadline, "a coordinator did not start serving");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let upload = |client: &mut JobServiceClient<AuthChannel>, name: &str, content: &str| {
        let chunk = v1::DatasetChunk { file_name: name.into(), data: content.as_bytes().to_vec() };
        let mut client = client.clone();
        async move { client.upload_dataset(futures::stream::iter([chunk])).await.unwrap().into_inner().reference }
    };
    let train = upload(&mut jobs[0], "train.jsonl", common::TRAIN).await;
    let eval = upload(&mut jobs[1], "eval.jsonl", common::EVAL).await;
    for i in 0..JOBS {
        let mut spec = common::spec(&format!("job-{i}"), &train, &eval);
        spec.training.as_mut().unwrap().max_steps = 4;
        jobs[i % 3].submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await.unwrap();
    }
    let lrs: Vec<f64> = (1..=8).map(|i| f64::from(i) * 0.01).collect();
    let mut definition = common::sweeps::definition(
        "asha-under-kill",
        &(train.clone(), eval.clone()),
        json!({ "type": "asha", "sampler": "grid", "min_resource": 2, "max_resource": 8, "reduction_factor": 2 }),
        json!({ "training.learning_rate": { "values": lrs } }),
    );
    definition["max_concurrent_trials"] = json!(8);
    definition["template"]["training"]["eval_every"] = json!(1);
    let mut sweeps = SweepServiceClient::new(channel(&replicas[1].grpc, &admin));
    let sweep = sweeps
        .create_sweep(v1::CreateSweepRequest { definition_json: definition.to_string() })
        .await
        .unwrap()
        .into_inner();

    let worker_clients: Vec<WorkerServiceClient<AuthChannel>> =
        replicas.iter().map(|r| WorkerServiceClient::new(channel(&r.grpc, &worker_token))).collect();
    let held = Arc::new(Mutex::new(HashSet::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = (0..WORKERS)
        .map(|w| tokio::spawn(worker(worker_clients.clone(), w % 3, held.clone(), done.clone())))
        .collect();

    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let succeeded = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE state = 'succeeded'").fetch_one(&pool).await.unwrap()
    };
    while succeeded().await < (JOBS / 3) as i64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut leader = None;
    for (i, r) in replicas.iter().enumerate() {
        if r.leads(&admin).await {
            assert!(leader.replace(i).is_none(), "two leaders");
        }
    }
    let leader = leader.expect("a leader");
    let mut dead = replicas.remove(leader);
    dead.child.kill().unwrap();
    let killed_at = Instant::now();
    dead.child.wait().unwrap();
    let mut moved = None;
    while moved.is_none() && killed_at.elapsed() < 3 * LEASE {
        for r in &replicas {
            if r.leads(&admin).await {
                moved = Some(killed_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moved = moved.expect("another coordinator leads");
    println!("leadership moved {moved:?} after the leader was killed");
    assert!(moved < LEASE, "leadership moves within one lease period: {moved:?}");

    let deadline = Instant::now() + Duration::from_secs(240);
    let total = JOBS as i64 + lrs.len() as i64;
    loop {
        let finished: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')")
            .fetch_one(&pool)
            .await
            .unwrap();
        let sweep_state: String = sqlx::query_scalar("SELECT state::text FROM sweeps WHERE id = $1::uuid")
            .bind(&sweep.id)
            .fetch_one(&pool)
            .await
            .unwrap();
        if finished == total && sweep_state != "running" {
            assert_eq!(sweep_state, "completed");
            break;
        }
        assert!(Instant::now() < deadline, "{finished} of {total} jobs finished, sweep {sweep_state}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut trained = 0;
    for task in tasks {
        trained += task.await.expect("no worker saw a job twice");
    }

    let states: Vec<(String, i64)> = sqlx::query_as("SELECT state::text, count(*) FROM jobs GROUP BY 1 ORDER BY 1")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(states, [("succeeded".to_string(), total)], "every job and trial succeeded");
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT job_id FROM job_attempts WHERE outcome = 'succeeded' GROUP BY job_id HAVING count(*) > 1) t",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(twice, 0, "no job succeeded twice");
    assert_eq!(trained as i64, total, "every lease a worker took ended in one completion");
    let decided_twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT trial_index, rung FROM asha_decisions GROUP BY 1, 2 HAVING count(*) > 1) t",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(decided_twice, 0, "each rung of each trial decided once");
    let decisions: i64 = sqlx::query_scalar("SELECT count(*) FROM asha_decisions").fetch_one(&pool).await.unwrap();
    assert!(decisions > 0, "ASHA decided rungs");
    println!("{total} jobs, {decisions} ASHA decisions, leadership moved after {moved:?}");
}

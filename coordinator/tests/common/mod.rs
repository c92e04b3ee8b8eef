//! Shared setup: a coordinator on a fresh database, real gRPC clients over
//! TCP, and small builders for specs, datasets and workers; [`sweeps`] holds
//! the sweep helpers and the scripted fake worker, [`tls`] a coordinator
//! with TLS on.
#![allow(dead_code)]

pub mod sweeps;
pub mod tls;

use std::time::Duration;

use ptune_coordinator::testing::{channel, fresh_database, TestDatabase, TestTokens};
use ptune_coordinator::{Config, Coordinator, CoordinatorHandle};
use ptune_proto::client::AuthChannel;
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::sweep_service_client::SweepServiceClient;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;
use ptune_proto::v1::{self, complete_job_chunk::Part};
use sha2::{Digest, Sha256};

pub const MODEL: &str = "tiny-bert";

pub const TRAIN: &str = "{\"text\": \"great film\", \"label\": 1}\n{\"text\": \"dull\", \"label\": 0}\n\n{\"text\": \"fine\", \"label\": 1}\n";
pub const EVAL: &str = "{\"text\": \"superb\", \"label\": 1}\n{\"text\": \"awful\", \"label\": 0}\n";

/// A coordinator on a fresh database, one token of each role, and clients:
/// `jobs` and `sweeps` with the admin token, `workers` with the worker token.
pub struct Env {
    pub db: TestDatabase,
    pub config: Config,
    pub coordinator: Option<CoordinatorHandle>,
    pub tokens: TestTokens,
    pub jobs: JobServiceClient<AuthChannel>,
    pub workers: WorkerServiceClient<AuthChannel>,
    pub sweeps: SweepServiceClient<AuthChannel>,
}

/// A coordinator with the given lease timeout on a fresh database.
pub async fn start(lease_timeout: Duration) -> Env {
    start_with(lease_timeout, |_| {}).await
}

/// Like [`start`], with other settings changed by `adjust`.
pub async fn start_with(lease_timeout: Duration, adjust: impl FnOnce(&mut Config)) -> Env {
    let db = fresh_database().await.expect("a test database (is postgres running?)");
    let mut config = Config::new(db.url.clone());
    config.lease_timeout = lease_timeout;
    config.heartbeat_interval = lease_timeout / 4;
    adjust(&mut config);
    let coordinator = Coordinator::start(config.clone()).await.expect("coordinator starts");
    let tokens = TestTokens::create(&db.url).await.expect("test tokens");
    let (jobs, workers, sweeps) = clients(&coordinator, &tokens);
    Env { db, config, coordinator: Some(coordinator), tokens, jobs, workers, sweeps }
}

/// Clients of a coordinator: jobs and sweeps as admin, workers as worker.
pub fn clients(
    c: &CoordinatorHandle,
    tokens: &TestTokens,
) -> (JobServiceClient<AuthChannel>, WorkerServiceClient<AuthChannel>, SweepServiceClient<AuthChannel>) {
    let url = format!("http://{}", c.grpc_addr);
    (
        JobServiceClient::new(channel(&url, &tokens.admin)),
        WorkerServiceClient::new(channel(&url, &tokens.worker)),
        SweepServiceClient::new(channel(&url, &tokens.admin)),
    )
}

impl Env {
    /// Shuts the coordinator down and starts a new one on the same database.
    pub async fn restart(&mut self) {
        self.coordinator.take().unwrap().shutdown().await.expect("graceful shutdown");
        let coordinator = Coordinator::start(self.config.clone()).await.expect("coordinator restarts");
        (self.jobs, self.workers, self.sweeps) = clients(&coordinator, &self.tokens);
        self.coordinator = Some(coordinator);
    }

    /// Like [`Env::restart`], but the new coordinator listens on the same
    /// address, so clients held elsewhere (a worker task) reconnect to it.
    pub async fn restart_in_place(&mut self) {
        self.config.grpc_addr = self.coordinator.as_ref().unwrap().grpc_addr;
        self.restart().await;
    }

    pub async fn stop(mut self) {
        if let Some(c) = self.coordinator.take() {
            c.shutdown().await.expect("graceful shutdown");
        }
    }

    pub async fn upload(&mut self, file_name: &str, content: &str) -> v1::DatasetInfo {
        let chunks: Vec<v1::DatasetChunk> = content
            .as_bytes()
            .chunks(16)
            .enumerate()
            .map(|(i, data)| v1::DatasetChunk {
                file_name: if i == 0 { file_name.to_string() } else { String::new() },
                data: data.to_vec(),
            })
            .collect();
        self.jobs.upload_dataset(futures::stream::iter(chunks)).await.expect("upload").into_inner()
    }

    /// Uploads the standard datasets and returns a valid spec using them.
    pub async fn spec(&mut self, name: &str) -> v1::JobSpec {
        let train = self.upload("train.jsonl", TRAIN).await.reference;
        let eval = self.upload("eval.jsonl", EVAL).await.reference;
        spec(name, &train, &eval)
    }

    pub async fn submit(&mut self, spec: v1::JobSpec) -> v1::Job {
        self.jobs.submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await.expect("submit").into_inner().job.unwrap()
    }

    pub async fn get(&mut self, id: &str) -> v1::Job {
        self.jobs.get_job(v1::GetJobRequest { job_id: id.to_string() }).await.expect("get job").into_inner()
    }

    /// Registers a worker serving [`MODEL`] and returns its id.
    pub async fn register(&mut self) -> String {
        self.register_as("").await
    }

    /// Registers worker `id` (a new one when empty) serving [`MODEL`] and
    /// returns its id.
    pub async fn register_as(&mut self, id: &str) -> String {
        let reply = self
            .workers
            .register_worker(v1::RegisterWorkerRequest {
                worker_id: id.to_string(),
                hostname: "test-host".into(),
                devices: vec![v1::Device { name: "cpu".into(), memory_bytes: 1 << 30, ..Default::default() }],
                slots: 2,
                models: vec![v1::BaseModel { name: MODEL.into(), max_positions: 512, ..Default::default() }],
                ..Default::default()
            })
            .await
            .expect("register")
            .into_inner();
        reply.worker_id
    }

    pub async fn lease(&mut self, worker: &str) -> Option<v1::Lease> {
        self.workers
            .lease_job(v1::LeaseJobRequest { worker_id: worker.to_string(), free_slots: 1, ..Default::default() })
            .await
            .expect("lease")
            .into_inner()
            .lease
    }

    pub async fn heartbeat(&mut self, worker: &str, leases: &[&v1::Lease]) -> v1::HeartbeatResponse {
        let leases = leases
            .iter()
            .map(|l| v1::LeaseRef { job_id: l.job_id.clone(), epoch: l.epoch, lease_token: l.lease_token.clone() })
            .collect();
        self.workers
            .heartbeat(v1::HeartbeatRequest { worker_id: worker.to_string(), leases, ..Default::default() })
            .await
            .expect("heartbeat")
            .into_inner()
    }

    pub async fn report(
        &mut self,
        lease: &v1::Lease,
        step: u64,
        metrics: Vec<v1::Metric>,
    ) -> Result<bool, tonic::Status> {
        let req = v1::ReportProgressRequest {
            job_id: lease.job_id.clone(),
            epoch: lease.epoch,
            step,
            total_steps: 10,
            metrics,
            lease_token: lease.lease_token.clone(),
        };
        self.workers.report_progress(req).await.map(|r| r.into_inner().stop)
    }

    pub async fn complete(&mut self, lease: &v1::Lease, adapter: &[u8]) -> Result<(), tonic::Status> {
        let parts = self.complete_parts(lease, adapter);
        self.workers.complete_job(futures::stream::iter(parts)).await.map(|_| ())
    }

    /// The messages of a CompleteJob call: the header, then the adapter in pieces.
    pub fn complete_parts(&self, lease: &v1::Lease, adapter: &[u8]) -> Vec<v1::CompleteJobChunk> {
        let header = v1::CompleteJobHeader {
            job_id: lease.job_id.clone(),
            epoch: lease.epoch,
            adapter_sha256: sha256(adapter),
            adapter_size: adapter.len() as u64,
            metrics: vec![metric(10, "eval", "accuracy", 0.9)],
            step: 10,
            lease_token: lease.lease_token.clone(),
            ..Default::default()
        };
        let mut parts = vec![v1::CompleteJobChunk { part: Some(Part::Header(header)) }];
        parts.extend(adapter.chunks(100_000).map(|c| v1::CompleteJobChunk { part: Some(Part::Data(c.to_vec())) }));
        parts
    }

    pub async fn fail(
        &mut self,
        lease: &v1::Lease,
        error: &str,
        cancelled: bool,
        retryable: bool,
    ) -> Result<(), tonic::Status> {
        let req = v1::FailJobRequest {
            job_id: lease.job_id.clone(),
            epoch: lease.epoch,
            error: error.into(),
            cancelled,
            retryable,
            infrastructure: false,
            lease_token: lease.lease_token.clone(),
        };
        self.workers.fail_job(req).await.map(|_| ())
    }

    /// Polls the job until `done` holds, for at most `secs` seconds.
    pub async fn wait_for(&mut self, id: &str, secs: u64, done: impl Fn(&v1::Job) -> bool) -> v1::Job {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let job = self.get(id).await;
            if done(&job) {
                return job;
            }
            assert!(tokio::time::Instant::now() < deadline, "job did not get there within {secs} s: {job:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub fn spec(name: &str, train: &str, eval: &str) -> v1::JobSpec {
    v1::JobSpec {
        name: name.into(),
        base_model: MODEL.into(),
        task: v1::Task::SequenceClassification as i32,
        method: v1::Method::PromptTuning as i32,
        peft: Some(v1::PeftConfig { num_virtual_tokens: Some(20), ..Default::default() }),
        data: Some(v1::DataConfig {
            train: train.into(),
            eval: eval.into(),
            labels: vec!["0".into(), "1".into()],
            max_seq_len: 64,
            // Evaluation batches of 8 need less memory than a training step
            // of 2 here, so the memory estimates the tests name are a step's.
            max_eval_examples: 8,
            ..Default::default()
        }),
        training: Some(v1::TrainingConfig { learning_rate: 0.03, batch_size: 2, ..Default::default() }),
        generation: None,
        head: None,
        max_attempts: 0,
        owner: "alice".into(),
    }
}

pub fn metric(step: u64, kind: &str, name: &str, value: f64) -> v1::Metric {
    v1::Metric { step, kind: kind.into(), name: name.into(), value }
}

pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn state(job: &v1::Job) -> v1::JobState {
    v1::JobState::try_from(job.state).unwrap()
}

/// A plain HTTP/1.1 GET of `path` on the coordinator's HTTP address, with
/// `token` as a bearer token when given; the whole response, headers included.
pub async fn http_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

impl Env {
    /// The value of the sample `name` (with its labels) on `/metrics`.
    pub async fn metric_value(&self, name: &str) -> f64 {
        let http = self.coordinator.as_ref().expect("a running coordinator").http_addr;
        let scraped = http_get(http, "/metrics", Some(&self.tokens.viewer)).await;
        let line = scraped.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {scraped}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// The jobs per state as counted in `job_state_counts` (what the overview
    /// and /metrics read), and as the jobs table holds them, states with
    /// jobs only, by state name.
    pub async fn state_counts(&self) -> (Vec<(String, i64)>, Vec<(String, i64)>) {
        let pool = sqlx::PgPool::connect(&self.db.url).await.unwrap();
        let counted = sqlx::query_as(
            "SELECT state::text, sum(n)::bigint FROM job_state_counts GROUP BY state HAVING sum(n) <> 0 ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let actual =
            sqlx::query_as("SELECT state::text, count(*) FROM jobs GROUP BY state ORDER BY 1").fetch_all(&pool).await.unwrap();
        pool.close().await;
        (counted, actual)
    }
}

/// Waits up to `secs` seconds for `done` to hold.
pub async fn wait_until<F, Fut>(secs: u64, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "condition not reached within {secs} s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends and receives raw bytes: a message that does not decode, or a call
/// to any method by its path.
#[derive(Clone, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Self::Error> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Self::Error> {
        let bytes = prost::bytes::Buf::chunk(src).to_vec();
        prost::bytes::Buf::advance(src, bytes.len());
        Ok(Some(bytes))
    }
}

/// PEM files in a temporary folder: a CA, the coordinator's certificate
/// (for localhost and 127.0.0.1), a worker's client certificate from the
/// same CA, and one from a stranger's CA.
pub struct Pki {
    _dir: tempfile::TempDir,
    pub ca: std::path::PathBuf,
    pub server: (std::path::PathBuf, std::path::PathBuf),
    pub client: (std::path::PathBuf, std::path::PathBuf),
    pub stranger: (std::path::PathBuf, std::path::PathBuf),
}

pub fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let authority = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        (params.self_signed(&key).unwrap(), key)
    };
    let (ca, ca_key) = authority("ptune test CA");
    let (other_ca, other_key) = authority("a stranger's CA");
    let leaf =
        |names: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose, issuer: &rcgen::Certificate, issuer_key: &rcgen::KeyPair| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![usage];
            (params.signed_by(&key, issuer, issuer_key).unwrap().pem(), key.serialize_pem())
        };
    let server = leaf(vec!["localhost".into(), "127.0.0.1".into()], rcgen::ExtendedKeyUsagePurpose::ServerAuth, &ca, &ca_key);
    let client = leaf(vec!["worker-1".into()], rcgen::ExtendedKeyUsagePurpose::ClientAuth, &ca, &ca_key);
    let stranger = leaf(vec!["worker-1".into()], rcgen::ExtendedKeyUsagePurpose::ClientAuth, &other_ca, &other_key);
    Pki {
        ca: write("ca.pem", ca.pem()),
        server: (write("server.pem", server.0), write("server.key", server.1)),
        client: (write("client.pem", client.0), write("client.key", client.1)),
        stranger: (write("stranger.pem", stranger.0), write("stranger.key", stranger.1)),
        _dir: dir,
    }
}

//! A real coordinator (in process, real Postgres, gRPC over TCP) and real
//! worker processes (the `ptune-worker` binary) for end-to-end tests.


use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use ptune_coordinator::testing::{fresh_database, TestDatabase, TestTokens};
use ptune_coordinator::{Config, Coordinator, CoordinatorHandle};
use ptune_proto::client::AuthChannel;
use ptune_proto::v1::{self, job_service_client::JobServiceClient};

pub const MODEL: &str = "all-MiniLM-L6-v2";

pub use super::paths::{minilm_dir, sst2, workspace as workspace_root};

pub struct Cluster {
    pub db: TestDatabase,
    pub coordinator: Option<CoordinatorHandle>,
    pub dir: tempfile::TempDir,
    pub models_dir: PathBuf,
    /// One token of each role; clients use the admin one, workers the worker one.
    pub tokens: TestTokens,
}

impl Cluster {
    pub async fn start(lease_timeout: Duration) -> Cluster {
        let db = fresh_database().await.expect("test database");
        let dir = tempfile::tempdir().expect("tempdir");
        let models_dir = dir.path().join("models");
        std::fs::create_dir_all(&models_dir).unwrap();
        std::os::unix::fs::symlink(minilm_dir(), models_dir.join(MODEL)).unwrap();
        let coordinator = Coordinator::start(config(&db.url, lease_timeout)).await.expect("coordinator starts");
        let tokens = TestTokens::create(&db.url).await.expect("test tokens");
        Cluster { db, coordinator: Some(coordinator), dir, models_dir, tokens }
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.coordinator.as_ref().expect("coordinator running").grpc_addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr())
    }

    /// A sweep-service client with the admin token.
    pub fn sweeps(&self) -> v1::sweep_service_client::SweepServiceClient<AuthChannel> {
        v1::sweep_service_client::SweepServiceClient::new(ptune_coordinator::testing::channel(&self.url(), &self.tokens.admin))
    }

    /// A job-service client with the admin token.
    pub async fn client(&self) -> JobServiceClient<AuthChannel> {
        let channel = ptune_coordinator::testing::channel(&self.url(), &self.tokens.admin);
        JobServiceClient::new(channel).max_decoding_message_size(64 << 20)
    }

    /// Starts a `ptune-worker` process with its own work dir.
    pub fn spawn_worker(&self, name: &str) -> WorkerProcess {
        self.spawn_worker_with_slots(name, 1)
    }

    /// A worker process training up to `slots` jobs at once.
    pub fn spawn_worker_with_slots(&self, name: &str, slots: u32) -> WorkerProcess {
        self.spawn_worker_with(name, &["--slots", &slots.to_string()], &[])
    }

    /// A worker process with more flags (`--slots` among them, else one
    /// slot) and environment variables.
    pub fn spawn_worker_with(&self, name: &str, args: &[&str], envs: &[(&str, &str)]) -> WorkerProcess {
        let work_dir = self.dir.path().join(name);
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ptune-worker"))
            .args(["--coordinator", &self.url()])
            .arg("--models-dir")
            .arg(&self.models_dir)
            .arg("--work-dir")
            .arg(&work_dir)
            .args(["--threads", "1"])
            .args(args)
            .envs(envs.iter().copied())
            .env("PTUNE_TOKEN", &self.tokens.worker)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("worker starts");
        WorkerProcess { child, log: self.dir.path().join(format!("{name}.log")) }
    }

    /// The work directory of the worker spawned as `name`.
    pub fn worker_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn worker_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

pub fn config(database_url: &str, lease_timeout: Duration) -> Config {
    Config {
        lease_timeout,
        heartbeat_interval: Duration::from_millis(300),
        default_max_attempts: 3,
        ..Config::new(database_url)
    }
}

pub struct WorkerProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    /// SIGKILL: the worker gets no chance to hand its job back.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Uploads a local file and returns its reference.
pub async fn upload(client: &mut JobServiceClient<AuthChannel>, path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let chunks: Vec<v1::DatasetChunk> = bytes
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, c)| v1::DatasetChunk {
            file_name: if i == 0 { path.file_name().unwrap().to_string_lossy().into() } else { String::new() },
            data: c.to_vec(),
        })
        .collect();
    client.upload_dataset(tokio_stream::iter(chunks)).await.expect("upload").into_inner().reference
}

/// A small prompt-tuning spec on SST-2.
pub fn sst2_spec(train: &str, eval: &str, max_steps: u64) -> v1::JobSpec {
    sst2_job("e2e-sst2", train, eval, max_steps, 10, "")
}

/// Prompt tuning on SST-2 with MiniLM named `name`: `max_steps` steps, an
/// evaluation (and checkpoint) every `eval_every`; `extra` adds
/// `[training]` keys, e.g. `checkpoint_every = 5`. Every job of one spec
/// trains the same numbers, whatever its name.
pub fn sst2_job(name: &str, train: &str, eval: &str, max_steps: u64, eval_every: u64, extra: &str) -> v1::JobSpec {
    let spec = ptune_core::JobSpec::from_toml(&format!(
        r#"
        name = "{name}"
        base_model = "{MODEL}"
        task = "sequence_classification"
        method = "prompt_tuning"
        max_attempts = 3
        [peft]
        num_virtual_tokens = 8
        [data]
        train = "{train}"
        eval = "{eval}"
        labels = [0, 1]
        max_seq_len = 32
        max_train_examples = 640
        max_eval_examples = 128
        [training]
        learning_rate = 3e-2
        batch_size = 16
        max_steps = {max_steps}
        eval_every = {eval_every}
        seed = 7
        {extra}
        "#
    ))
    .expect("valid spec");
    v1::JobSpec::from(&spec)
}

pub async fn get(client: &mut JobServiceClient<AuthChannel>, id: &str) -> v1::Job {
    client.get_job(v1::GetJobRequest { job_id: id.into() }).await.expect("get job").into_inner()
}

/// Polls until `pred` holds for the job, or panics after `timeout` with the job's last state.
pub async fn wait_for(
    client: &mut JobServiceClient<AuthChannel>,
    id: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&v1::Job) -> bool,
) -> v1::Job {
    let start = Instant::now();
    loop {
        let job = get(client, id).await;
        if pred(&job) {
            return job;
        }
        assert!(start.elapsed() < timeout, "job never became {what} within {timeout:?}; last: {job:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn state(job: &v1::Job) -> v1::JobState {
    v1::JobState::try_from(job.state).unwrap()
}

/// Every state the watch stream reported, in order, until the stream ends.
pub async fn watched_states(client: &mut JobServiceClient<AuthChannel>, id: &str) -> (Vec<v1::JobState>, usize) {
    let mut stream = client.watch_job(v1::WatchJobRequest { job_id: id.into() }).await.expect("watch").into_inner();
    let mut states = Vec::new();
    let mut metric_events = 0;
    while let Some(event) = stream.next().await {
        match event.expect("watch event").event {
            Some(v1::job_event::Event::Job(job)) => {
                let s = state(&job);
                if states.last() != Some(&s) {
                    states.push(s);
                }
            }
            Some(v1::job_event::Event::Metrics(_)) => metric_events += 1,
            _ => {}
        }
    }
    (states, metric_events)
}

/// Text without the terminal colour codes of the workers' logs.
pub fn without_colours(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().take_while(|&c| c != 'm').for_each(drop);
        } else {
            plain.push(c);
        }
    }
    plain
}

//! Files in each blob store a coordinator can use: PostgreSQL (the default),
//! a local folder, and a real S3-compatible server (`moto_server`, started
//! here on 127.0.0.1). For each, through a `ptune-coordinator` process and
//! real gRPC:
//! - a 1.5 GB dataset and a 1.5 GB full fine-tuning export round-trip with
//!   their sha256 checked, while the coordinator's peak resident memory
//!   stays under 300 MB;
//! - identical uploads are stored once;
//! - an upload cut off mid-way leaves neither an object nor a row;
//! - moving every file to another store and back (`ptune-coordinator blobs
//!   move`) loses nothing, and the store left behind ends up empty.
//!
//! They move several gigabytes each, so they are ignored in the integration
//! tier and run by `scripts/test-blob-stores.sh` (which installs the S3
//! server). `PTUNE_BLOB_TEST_MB` changes the file size (default 1500).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use ptune_coordinator::auth::Role;
use ptune_coordinator::store::ObjectBackend;
use ptune_coordinator::testing::{
    channel, create_token, fresh_database, minilm_model, tiny_spec, CoordinatorProcess, S3Server, TestDatabase,
};
use ptune_proto::client::AuthChannel;
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;
use ptune_proto::v1::{self, complete_job_chunk::Part};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

const BINARY: &str = env!("CARGO_BIN_EXE_ptune-coordinator");
const MB: u64 = 1_000_000;
/// Bytes per gRPC message, as the CLI and the worker send them.
const MESSAGE_BYTES: u64 = 256 * 1024;
/// The most the coordinator may hold while moving the big files.
const MAX_PEAK_RSS: u64 = 300 * MB;

fn file_bytes() -> u64 {
    std::env::var("PTUNE_BLOB_TEST_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(1500) * MB
}

/// The file stores under test.
enum Backend {
    Database,
    Folder(tempfile::TempDir),
    S3(S3Server),
}

impl Backend {
    /// The `--blob-store` value.
    fn arg(&self) -> String {
        match self {
            Backend::Database => "postgres".into(),
            Backend::Folder(dir) => dir.path().display().to_string(),
            Backend::S3(_) => "s3://ptune-test/files".into(),
        }
    }

    /// The location rows record.
    fn location(&self) -> Option<String> {
        match self {
            Backend::Database => None,
            Backend::Folder(dir) => Some(format!("file://{}", dir.path().display())),
            Backend::S3(_) => Some("s3://ptune-test/files".into()),
        }
    }

    fn envs(&self) -> Vec<(&'static str, String)> {
        match self {
            Backend::S3(server) => server.envs(),
            _ => Vec::new(),
        }
    }

    /// Every object in the store, and for a folder every file (an
    /// unfinished multipart upload's parts included).
    async fn objects(&self) -> Vec<String> {
        match self {
            Backend::Database => Vec::new(),
            Backend::Folder(dir) => files_under(dir.path()),
            Backend::S3(_) => {
                let backend = ObjectBackend::open(&self.arg()).unwrap();
                let listed: Vec<_> = backend.objects().list(None).collect().await;
                listed.into_iter().map(|meta| meta.unwrap().location.to_string()).collect()
            }
        }
    }
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path.display().to_string());
        }
    }
    found
}

/// Deterministic bytes: the JSON Lines of dataset `seed` (every line has a
/// label), or an incompressible archive.
struct Generator {
    seed: u64,
    dataset: bool,
    size: u64,
}

impl Generator {
    /// Message `i` of the file.
    fn message(&self, i: u64) -> Vec<u8> {
        let start = i * MESSAGE_BYTES;
        let len = MESSAGE_BYTES.min(self.size - start) as usize;
        if self.dataset {
            // Lines of LINE_BYTES, so every message holds whole lines.
            let mut bytes = Vec::with_capacity(len);
            let first = start / LINE_BYTES;
            for line in first..first + len as u64 / LINE_BYTES {
                let text = format!("{{\"text\": \"file {} line {line}\", \"label\": {}}}", self.seed, line % 2);
                bytes.extend_from_slice(text.as_bytes());
                bytes.resize(bytes.len() + LINE_BYTES as usize - 1 - text.len(), b' ');
                bytes.push(b'\n');
            }
            bytes
        } else {
            let mut state = self.seed ^ (i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        }
    }

    fn messages(&self) -> u64 {
        self.size.div_ceil(MESSAGE_BYTES)
    }

    fn sha256(&self) -> String {
        let mut hasher = Sha256::new();
        for i in 0..self.messages() {
            hasher.update(self.message(i));
        }
        hex::encode(hasher.finalize())
    }
}

/// Bytes per line of a generated dataset (a divisor of [`MESSAGE_BYTES`]).
const LINE_BYTES: u64 = 128;

/// A dataset file of about `size` bytes (whole lines).
fn dataset(seed: u64, size: u64) -> Generator {
    Generator { seed, dataset: true, size: size / LINE_BYTES * LINE_BYTES }
}

struct Setup {
    db: TestDatabase,
    pool: PgPool,
    /// The object store settings of both stores of the test.
    envs: Vec<(&'static str, String)>,
    coordinator: CoordinatorProcess,
    jobs: JobServiceClient<AuthChannel>,
    workers: WorkerServiceClient<AuthChannel>,
    worker: String,
}

async fn setup(backend: &Backend, other: &Backend) -> Setup {
    let db = fresh_database().await.unwrap();
    let admin = create_token(&db.url, Role::Admin, "admin").await.unwrap();
    let worker_token = create_token(&db.url, Role::Worker, "worker").await.unwrap();
    let pool = PgPool::connect(&db.url).await.unwrap();
    let blob_store = backend.arg();
    let envs: Vec<_> = backend.envs().into_iter().chain(other.envs()).collect();
    let env_refs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = [
        ["--blob-store", &blob_store],
        ["--max-adapter-mib", "2000"],
        ["--max-dataset-mib", "2000"],
        // A client that stops sending is cut off this soon.
        ["--upload-idle-timeout", "2"],
        // The test's worker sends no heartbeats while it moves gigabytes.
        ["--lease-timeout-ms", "3600000"],
    ]
    .concat();
    let coordinator = CoordinatorProcess::start(BINARY, &db.url, &args, &env_refs).unwrap();
    coordinator.wait_until_serving(&admin).await.unwrap();
    let jobs = JobServiceClient::new(channel(&coordinator.url, &admin));
    let mut workers = WorkerServiceClient::new(channel(&coordinator.url, &worker_token));
    let worker = workers
        .register_worker(v1::RegisterWorkerRequest {
            hostname: "blob-test".into(),
            devices: vec![v1::Device { name: "cpu".into(), memory_bytes: 64 << 30, ..Default::default() }],
            slots: 1,
            models: vec![minilm_model("tiny-bert")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    Setup { db, pool, envs, coordinator, jobs, workers, worker }
}

async fn upload(jobs: &mut JobServiceClient<AuthChannel>, file: Generator) -> Result<v1::DatasetInfo, tonic::Status> {
    let chunks = futures::stream::iter(0..file.messages()).map(move |i| v1::DatasetChunk {
        file_name: if i == 0 { format!("file-{}.jsonl", file.seed) } else { String::new() },
        data: file.message(i),
    });
    jobs.upload_dataset(chunks).await.map(|r| r.into_inner())
}

/// Submits a job on `dataset` and leases it.
async fn leased(s: &mut Setup, name: &str, dataset: &str) -> v1::Lease {
    s.jobs.submit_job(v1::SubmitJobRequest { spec: Some(tiny_spec(name, dataset, v1::Method::Full)) }).await.unwrap();
    let request = v1::LeaseJobRequest { worker_id: s.worker.clone(), free_slots: 1, ..Default::default() };
    s.workers.lease_job(request).await.unwrap().into_inner().lease.expect("a job to lease")
}

/// The size and sha256 of what a stream of chunks carried.
async fn digest<S>(mut chunks: S) -> (u64, String)
where
    S: futures::Stream<Item = Result<Vec<u8>, tonic::Status>> + Unpin,
{
    let (mut size, mut hasher) = (0u64, Sha256::new());
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.unwrap();
        size += chunk.len() as u64;
        hasher.update(&chunk);
    }
    (size, hex::encode(hasher.finalize()))
}

/// What a worker downloads of a dataset under `lease`.
async fn fetch_dataset(s: &mut Setup, lease: &v1::Lease, reference: &str) -> (u64, String) {
    let request = v1::DownloadDatasetRequest {
        reference: reference.into(),
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        lease_token: lease.lease_token.clone(),
    };
    let stream = s.workers.download_dataset(request).await.unwrap().into_inner();
    digest(stream.map(|c| c.map(|c| c.data))).await
}

/// What a user downloads of a job's adapter.
async fn fetch_adapter(s: &mut Setup, job_id: &str) -> (u64, String) {
    let stream =
        s.jobs.download_adapter(v1::DownloadAdapterRequest { job_id: job_id.into() }).await.unwrap().into_inner();
    digest(stream.map(|c| c.map(|c| c.data))).await
}

/// Completes `lease` with `archive`, streamed.
async fn complete(s: &mut Setup, lease: &v1::Lease, archive: Generator) {
    let header = v1::CompleteJobHeader {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        adapter_sha256: archive.sha256(),
        adapter_size: archive.size,
        step: 1,
        lease_token: lease.lease_token.clone(),
        ..Default::default()
    };
    let head = futures::stream::once(async move { v1::CompleteJobChunk { part: Some(Part::Header(header)) } });
    let body = futures::stream::iter(0..archive.messages())
        .map(move |i| v1::CompleteJobChunk { part: Some(Part::Data(archive.message(i))) });
    s.workers.complete_job(head.chain(body)).await.unwrap();
}

/// Runs `ptune-coordinator blobs ...` on the test database; its output.
fn blobs(s: &Setup, args: &[&str]) -> String {
    let output = Command::new(BINARY)
        .args(["--database-url", &s.db.url, "blobs"])
        .args(args)
        .envs(s.envs.iter().cloned())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "blobs {args:?} failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

/// Complete blobs and checkpoints, and how many of them are in `location`.
async fn rows(pool: &PgPool, location: Option<&str>) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE location IS NOT DISTINCT FROM $1) FROM \
         (SELECT location FROM blobs WHERE complete UNION ALL SELECT location FROM job_checkpoints WHERE complete) f",
    )
    .bind(location)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Files with chunk rows in the database.
async fn files_in_database(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(DISTINCT blob_id) FROM blob_chunks) + \
                (SELECT count(DISTINCT checkpoint_id) FROM job_checkpoint_chunks)",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Where every file's bytes are, checked from both sides: the rows all
/// name `backend`, and the store holds exactly one object per row.
async fn assert_all_in(s: &Setup, backend: &Backend, expected_files: i64) {
    let (files, there) = rows(&s.pool, backend.location().as_deref()).await;
    assert_eq!((files, there), (expected_files, expected_files), "every file's row names {}", backend.arg());
    let objects = backend.objects().await;
    match backend {
        Backend::Database => assert_eq!(files_in_database(&s.pool).await, expected_files),
        _ => {
            assert_eq!(objects.len() as i64, expected_files, "one object per file: {objects:?}");
            assert_eq!(files_in_database(&s.pool).await, 0, "no chunk rows are left");
        }
    }
}

async fn round_trip(backend: Backend, other: Backend) {
    let size = file_bytes();
    let mut s = setup(&backend, &other).await;

    // A big dataset and a big export, there and back.
    let big = dataset(1, size);
    let big_sha = big.sha256();
    let info = upload(&mut s.jobs, big).await.unwrap();
    assert_eq!((info.size_bytes, info.reference.clone()), (size, format!("sha256:{big_sha}")));
    let lease = leased(&mut s, "big", &info.reference).await;
    assert_eq!(fetch_dataset(&mut s, &lease, &info.reference).await, (size, big_sha.clone()), "the dataset comes back");
    let export = Generator { seed: 2, dataset: false, size };
    let export_sha = export.sha256();
    complete(&mut s, &lease, export).await;
    assert_eq!(fetch_adapter(&mut s, &lease.job_id).await, (size, export_sha.clone()), "the export comes back");
    let peak = s.coordinator.peak().unwrap();
    eprintln!(
        "BLOB-STORE | {} | 2 x {} MB up, 2 x {} MB down | coordinator peak RSS {} MB",
        backend.arg(),
        size / MB,
        size / MB,
        peak / MB
    );
    assert!(peak < MAX_PEAK_RSS, "the coordinator peaked at {} MB", peak / MB);

    // Identical uploads are stored once.
    let small = upload(&mut s.jobs, dataset(3, 3 * MB)).await.unwrap();
    let again = upload(&mut s.jobs, dataset(3, 3 * MB)).await.unwrap();
    assert_eq!(small.reference, again.reference);
    // Blobs: the big dataset, the export, the small dataset.
    blobs(&s, &["collect", "--grace-secs", "0"]);
    assert_all_in(&s, &backend, 3).await;

    // An upload cut off mid-way (its client stops sending and is ended
    // after the idle timeout) leaves neither an object nor a row.
    let mut cut_jobs = s.jobs.clone();
    let partial = dataset(4, 100 * MB);
    let sent = 40;
    let chunks = futures::stream::iter(0..partial.messages()).then(move |i| {
        let message = partial.message(i);
        async move {
            if i >= sent {
                // The client hangs here: the stream never ends.
                std::future::pending::<()>().await;
            }
            v1::DatasetChunk { file_name: if i == 0 { "cut.jsonl".into() } else { String::new() }, data: message }
        }
    });
    let cut = tokio::spawn(async move { cut_jobs.upload_dataset(chunks).await });
    let receiving = || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM blobs WHERE NOT complete").fetch_one(&s.pool).await.unwrap();
        n
    };
    common::wait_until(30, || async { receiving().await == 1 }).await;
    let ended = tokio::time::timeout(Duration::from_secs(30), cut).await.expect("the stalled upload is ended").unwrap();
    assert_eq!(ended.unwrap_err().code(), tonic::Code::DeadlineExceeded);
    common::wait_until(30, || async { receiving().await == 0 }).await;
    blobs(&s, &["collect", "--grace-secs", "0"]);
    assert_all_in(&s, &backend, 3).await;

    // Everything moves to the other store and back, nothing lost.
    for (to, from) in [(&other, &backend), (&backend, &other)] {
        let table = blobs(&s, &["move", "--to", &to.arg()]);
        assert!(table.contains("| 3 |"), "three files moved: {table}");
        blobs(&s, &["collect", "--grace-secs", "0"]);
        assert_all_in(&s, to, 3).await;
        assert!(from.objects().await.is_empty(), "the store moved from is empty: {:?}", from.objects().await);
        if matches!(from, Backend::Database) {
            assert_eq!(files_in_database(&s.pool).await, 0);
        }
        assert_eq!(
            fetch_adapter(&mut s, &lease.job_id).await,
            (size, export_sha.clone()),
            "the export survives the move"
        );
    }
    // A new lease reads the dataset back from where it ended up.
    let lease = leased(&mut s, "after-moves", &info.reference).await;
    assert_eq!(fetch_dataset(&mut s, &lease, &info.reference).await, (size, big_sha));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "moves gigabytes: run scripts/test-blob-stores.sh"]
async fn postgres_default_round_trips_and_moves_to_a_folder_and_back() {
    let folder = tempfile::tempdir().unwrap();
    round_trip(Backend::Database, Backend::Folder(folder)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "moves gigabytes: run scripts/test-blob-stores.sh"]
async fn a_folder_round_trips_and_moves_to_postgres_and_back() {
    let folder = tempfile::tempdir().unwrap();
    round_trip(Backend::Folder(folder), Backend::Database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "moves gigabytes and needs moto_server: run scripts/test-blob-stores.sh"]
async fn s3_round_trips_and_moves_to_postgres_and_back() {
    let server = S3Server::start("ptune-test").await;
    round_trip(Backend::S3(server), Backend::Database).await;
}

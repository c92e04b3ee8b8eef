//! The `ptune` binary against a real coordinator (real Postgres, gRPC over TCP).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ptune_coordinator::testing::{fresh_database, minilm_model, TestTokens};
use ptune_coordinator::{Config, Coordinator, CoordinatorHandle};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// A coordinator on a fresh database, and its tokens.
struct Setup {
    _db: ptune_coordinator::testing::TestDatabase,
    coordinator: CoordinatorHandle,
    tokens: TestTokens,
}

/// Runs `ptune` as the submitter `tester`, with the token in PTUNE_TOKEN
/// and no config file.
async fn ptune(setup: &Setup, args: &[&str]) -> Run {
    ptune_as(setup, &setup.tokens.submitter, args).await
}

async fn ptune_as(setup: &Setup, token: &str, args: &[&str]) -> Run {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ptune"))
        .arg("--coordinator")
        .arg(format!("http://{}", setup.coordinator.grpc_addr))
        .args(args)
        .env("PTUNE_TOKEN", token)
        .env("PTUNE_CONFIG", "/nonexistent/ptune/config.toml")
        .output()
        .await
        .expect("ptune runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into(),
        stderr: String::from_utf8_lossy(&output.stderr).into(),
    }
}

async fn start() -> Setup {
    let db = fresh_database().await.expect("test database");
    let config = Config {
        lease_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_millis(500),
        default_max_attempts: 3,
        ..Config::new(db.url.clone())
    };
    let coordinator = Coordinator::start(config).await.expect("coordinator starts");
    let tokens = TestTokens::create(&db.url).await.expect("test tokens");
    Setup { _db: db, coordinator, tokens }
}

fn sst2_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/sst2").canonicalize().expect("shared SST-2 data")
}

fn write_spec(dir: &Path, peft: &str, train: &Path, labels: &str) -> PathBuf {
    let spec = format!(
        r#"
name = "cli-test"
base_model = "all-MiniLM-L6-v2"
task = "sequence_classification"
method = "prompt_tuning"
[peft]
{peft}
[data]
train = "{}"
eval = "{}"
labels = {labels}
max_seq_len = 64
[training]
learning_rate = 0.03
"#,
        train.display(),
        sst2_dir().join("dev.jsonl").display()
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, spec).unwrap();
    path
}

/// Registers a worker serving all-MiniLM-L6-v2 with the shape it reports.
async fn register_minilm(setup: &Setup) {
    use ptune_proto::v1::{self, worker_service_client::WorkerServiceClient};
    let url = format!("http://{}", setup.coordinator.grpc_addr);
    let mut client = WorkerServiceClient::new(ptune_coordinator::testing::channel(&url, &setup.tokens.worker));
    let models = vec![minilm_model("all-MiniLM-L6-v2")];
    let request = v1::RegisterWorkerRequest { hostname: "h".into(), slots: 1, models, ..Default::default() };
    client.register_worker(request).await.expect("register");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_prints_the_job_id_last_and_the_job_can_be_listed_inspected_and_cancelled() {
    let setup = start().await;
    register_minilm(&setup).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "num_virtual_tokens = 20", &sst2_dir().join("train.jsonl"), "[0, 1]");

    let submitted = ptune(&setup, &["submit", spec.to_str().unwrap()]).await;
    assert_eq!(submitted.code, 0, "{}", submitted.stderr);
    let id = submitted.stdout.lines().last().expect("an id line").trim().to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "last line is not a job id: {:?}", submitted.stdout);

    let listed = ptune(&setup, &["--output", "json", "jobs", "list", "--state", "queued"]).await;
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let listing: serde_json::Value = serde_json::from_str(&listed.stdout).expect("json listing");
    assert_eq!(listing["jobs"][0]["id"], id.as_str());
    assert_eq!(listing["jobs"][0]["method"], "prompt_tuning");

    let shown = ptune(&setup, &["--output", "json", "jobs", "get", &id]).await;
    let job: serde_json::Value = serde_json::from_str(&shown.stdout).expect("json job");
    assert_eq!(job["state"], "queued");
    assert_eq!(job["spec"]["peft"]["num_virtual_tokens"], 20);
    assert!(job["spec"]["data"]["train"].as_str().unwrap().starts_with("sha256:"), "datasets are uploaded");
    // Weights 90,852,864 bytes, job (20 * 384 + 770) * 16, activations 32 * 84 * 6 * 4 * (18 * 384 + 3 * 12 * 84).
    assert_eq!(job["memory_estimate_bytes"], 90_852_864 + 135_200 + 640_991_232);
    assert_eq!(job["worker_peak_rss_bytes"], serde_json::Value::Null, "not completed");
    let text = ptune(&setup, &["jobs", "get", &id]).await;
    assert!(text.stdout.contains("\nmemory:      estimate 698 MiB\n"), "{}", text.stdout);

    let cancelled = ptune(&setup, &["jobs", "cancel", &id]).await;
    assert_eq!(cancelled.code, 0, "{}", cancelled.stderr);
    let waited = ptune(&setup, &["jobs", "wait", &id]).await;
    assert_eq!(waited.code, 1, "wait exits non-zero for a job that did not succeed");
    assert!(waited.stdout.contains("cancelled"), "{}", waited.stdout);

    let refused = ptune(&setup, &["jobs", "cancel", &id]).await;
    assert_ne!(refused.code, 0, "a finished job cannot be cancelled again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_refused_with_the_field_and_the_allowed_values() {
    let setup = start().await;
    let dir = tempfile::tempdir().unwrap();
    let train = sst2_dir().join("train.jsonl");

    let spec = write_spec(dir.path(), "num_virtual_tokens = 0", &train, "[0, 1]");
    let run = ptune(&setup, &["submit", spec.to_str().unwrap()]).await;
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("peft.num_virtual_tokens"), "{}", run.stderr);
    assert!(run.stderr.contains("between 1 and 512, got 0"), "{}", run.stderr);

    let spec = write_spec(dir.path(), "num_virtual_tokens = 20", &dir.path().join("missing.jsonl"), "[0, 1]");
    let run = ptune(&setup, &["submit", spec.to_str().unwrap()]).await;
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("data.train") && run.stderr.contains("missing.jsonl"), "{}", run.stderr);

    let odd = dir.path().join("odd.jsonl");
    std::fs::write(&odd, "{\"text\": \"fine\", \"label\": 1}\n{\"text\": \"what\", \"label\": 2}\n").unwrap();
    let spec = write_spec(dir.path(), "num_virtual_tokens = 20", &odd, "[0, 1]");
    let run = ptune(&setup, &["submit", spec.to_str().unwrap()]).await;
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("data.labels") && run.stderr.contains("\"2\""), "{}", run.stderr);

    let spec = write_spec(dir.path(), "num_virtual_tokens = 20", &train, "[0, 1]");
    let text = std::fs::read_to_string(&spec).unwrap().replace("prompt_tuning", "adapterfusion");
    std::fs::write(&spec, text).unwrap();
    let run = ptune(&setup, &["submit", spec.to_str().unwrap()]).await;
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("unknown method \"adapterfusion\""), "{}", run.stderr);

    let listed = ptune(&setup, &["--output", "json", "jobs", "list"]).await;
    let listing: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(listing["jobs"].as_array().unwrap().len(), 0, "nothing invalid was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_of_a_json_lines_file_uploads_each_dataset_once_and_answers_each_spec() {
    let setup = start().await;
    register_minilm(&setup).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(sst2_dir().join("dev.jsonl"), dir.path().join("dev.jsonl")).unwrap();
    let line = |name: &str, lr: f64| {
        serde_json::json!({
            "name": name, "base_model": "all-MiniLM-L6-v2", "task": "sequence_classification",
            "method": "prompt_tuning", "peft": { "num_virtual_tokens": 10 },
            "data": { "train": "dev.jsonl", "eval": "dev.jsonl", "labels": [0, 1], "max_seq_len": 64 },
            "training": { "learning_rate": lr },
        })
        .to_string()
    };
    let specs = [line("a", 0.03), String::new(), line("b", -1.0), line("c", 0.3)].join("\n");
    let file = dir.path().join("specs.jsonl");
    std::fs::write(&file, specs).unwrap();

    let run = ptune(&setup, &["submit", file.to_str().unwrap()]).await;
    assert_eq!(run.code, 1, "a refused spec makes the exit code 1: {}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", run.stdout);
    assert!(lines[0].starts_with(&format!("{}:1\t", file.display())), "{}", lines[0]);
    assert!(uuid::Uuid::parse_str(lines[0].split('\t').nth(1).unwrap()).is_ok(), "{}", lines[0]);
    assert!(lines[1].starts_with(&format!("{}:3\trefused: training.learning_rate: ", file.display())), "{}", lines[1]);
    assert!(lines[2].starts_with(&format!("{}:4\t", file.display())), "{}", lines[2]);
    assert_eq!(run.stderr.matches("uploaded ").count(), 1, "the dataset is uploaded once: {}", run.stderr);
    assert!(run.stderr.contains("submitted 2 of 3 jobs"), "{}", run.stderr);

    let all = ptune(&setup, &["--output", "json", "submit", "--all-or-nothing", file.to_str().unwrap()]).await;
    assert_eq!(all.code, 1);
    let outcomes: serde_json::Value = serde_json::from_str(&all.stdout).expect("json outcomes");
    assert_eq!(outcomes[0]["error"]["code"], "FAILED_PRECONDITION");
    assert_eq!(outcomes[1]["error"]["field"], "training.learning_rate");
    let listed = ptune(&setup, &["--output", "json", "jobs", "list"]).await;
    let listing: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(listing["jobs"].as_array().unwrap().len(), 2, "the all-or-nothing batch stored nothing");
}

fn write_sweep(dir: &Path, space: &str) -> PathBuf {
    let sst2 = sst2_dir();
    let definition = format!(
        r#"
name = "cli-sweep"
max_concurrent_trials = 2

[objective]
metric = "accuracy"
direction = "maximize"

[algorithm]
type = "grid"

[template]
base_model = "all-MiniLM-L6-v2"
task = "sequence_classification"
method = "prompt_tuning"
[template.data]
train = "{}"
eval = "{}"
labels = [0, 1]
max_seq_len = 64
[template.training]
learning_rate = 0.03
max_steps = 10

{space}
"#,
        sst2.join("train.jsonl").display(),
        sst2.join("dev.jsonl").display()
    );
    let path = dir.join("sweep.toml");
    std::fs::write(&path, definition).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_create_prints_the_id_last_and_status_shows_the_leaderboard_as_json() {
    let setup = start().await;
    let dir = tempfile::tempdir().unwrap();
    let space = r#"
[space.peft.num_virtual_tokens]
values = [5, 10]
[space.training.learning_rate]
values = [0.01, 0.03]
"#;
    let file = write_sweep(dir.path(), space);
    let created = ptune(&setup, &["sweep", "create", file.to_str().unwrap()]).await;
    assert_eq!(created.code, 0, "{}", created.stderr);
    let id = created.stdout.lines().last().expect("an id line").trim().to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "last line is not a sweep id: {:?}", created.stdout);

    // The engine creates trials up to max_concurrent_trials.
    let mut status = serde_json::Value::Null;
    for _ in 0..100 {
        let run = ptune(&setup, &["--output", "json", "sweep", "status", &id]).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        status = serde_json::from_str(&run.stdout).expect("json status");
        if status["trials_created"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!((status["id"].as_str(), status["state"].as_str()), (Some(id.as_str()), Some("running")));
    assert_eq!((status["algorithm"].as_str(), status["trial_budget"].as_u64()), (Some("grid"), Some(4)));
    let board = status["leaderboard"].as_array().expect("a leaderboard");
    assert_eq!(board.len(), 2, "{status:#}");
    assert_eq!(board[0]["trial"], 0);
    assert_eq!(board[0]["params"], serde_json::json!({ "peft.num_virtual_tokens": 5, "training.learning_rate": 0.01 }));
    assert_eq!((board[1]["status"].as_str(), board[1]["rank"].is_null()), (Some("queued"), true));

    let text = ptune(&setup, &["sweep", "status", &id]).await;
    assert!(text.stdout.contains("RANK  TRIAL  JOB"), "{}", text.stdout);
    assert!(text.stdout.contains("num_virtual_tokens=10 learning_rate=0.03") || text.stdout.contains("num_virtual_tokens=5 learning_rate=0.03"), "{}", text.stdout);

    let trials = ptune(&setup, &["--output", "json", "jobs", "list", "--sweep", &id]).await;
    let listing: serde_json::Value = serde_json::from_str(&trials.stdout).unwrap();
    assert_eq!(listing["jobs"].as_array().unwrap().len(), 2);
    let csv = ptune(&setup, &["sweep", "export", &id, "--format", "csv"]).await;
    let header = csv.stdout.lines().next().unwrap().to_string();
    assert!(header.contains("peft.num_virtual_tokens,training.learning_rate"), "{header}");
    assert_eq!(csv.stdout.lines().count(), 3);
    let best = ptune(&setup, &["sweep", "best", &id]).await;
    assert_eq!(best.code, 1, "no trial has an adapter yet");
    let list = ptune(&setup, &["sweep", "list"]).await;
    assert!(list.stdout.contains("BEST FINISHED") && list.stdout.contains("ranks running trials too"), "{}", list.stdout);
    assert!(!text.stdout.contains("best finished trial:"), "no trial finished, so none is named best: {}", text.stdout);

    let cancelled = ptune(&setup, &["sweep", "cancel", &id]).await;
    assert_eq!(cancelled.code, 0, "{}", cancelled.stderr);
    let waited = ptune(&setup, &["sweep", "wait", &id]).await;
    assert_eq!(waited.code, 1, "wait exits non-zero for a sweep that did not complete");
    assert!(waited.stdout.contains("cancelled"), "{}", waited.stdout);
    let listed = ptune(&setup, &["--output", "json", "sweep", "list"]).await;
    let sweeps: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(sweeps["sweeps"][0]["state"], "cancelled");

    let bad = write_sweep(dir.path(), "[space.training.learning_rate]\ntype = \"log_uniform\"\nmin = 0\nmax = 0.1\n");
    let refused = ptune(&setup, &["sweep", "create", bad.to_str().unwrap()]).await;
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("space.training.learning_rate: log-uniform bounds must be > 0, got 0"), "{}", refused.stderr);
}

/// A tar archive of raw entries, built by hand so that it can hold what
/// tar libraries refuse to write: `(kind, name, link name, data, announced size)`.
fn raw_tar(entries: &[(tar::EntryType, String, &str, &[u8], u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, name, link, data, size) in entries {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(*kind);
        header.set_mode(0o644);
        header.set_size(*size);
        if *kind == tar::EntryType::Char {
            header.set_device_major(1).unwrap();
            header.set_device_minor(3).unwrap();
        }
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// Submits a job as the submitter, leases it as a worker and completes it
/// with `archive` as its adapter: what a worker token in the wrong hands
/// could hand the job's owner.
async fn job_with_adapter(setup: &Setup, archive: &[u8]) -> String {
    use ptune_proto::v1::{self, complete_job_chunk::Part, job_service_client::JobServiceClient};
    use ptune_proto::v1::worker_service_client::WorkerServiceClient;
    use sha2::Digest;
    let url = format!("http://{}", setup.coordinator.grpc_addr);
    let mut jobs = JobServiceClient::new(ptune_coordinator::testing::channel(&url, &setup.tokens.submitter));
    let mut workers = WorkerServiceClient::new(ptune_coordinator::testing::channel(&url, &setup.tokens.worker));
    let lines = "{\"text\": \"fine\", \"label\": 1}\n{\"text\": \"dull\", \"label\": 0}\n";
    let chunk = v1::DatasetChunk { file_name: "d.jsonl".into(), data: lines.as_bytes().to_vec() };
    let data = jobs.upload_dataset(futures::stream::iter([chunk])).await.unwrap().into_inner().reference;
    let spec = v1::JobSpec {
        name: "archive".into(),
        base_model: "all-MiniLM-L6-v2".into(),
        task: v1::Task::SequenceClassification as i32,
        method: v1::Method::PromptTuning as i32,
        peft: Some(v1::PeftConfig { num_virtual_tokens: Some(4), ..Default::default() }),
        data: Some(v1::DataConfig { train: data.clone(), eval: data, labels: vec!["0".into(), "1".into()], ..Default::default() }),
        training: Some(v1::TrainingConfig { learning_rate: 0.03, max_steps: 1, ..Default::default() }),
        ..Default::default()
    };
    let id = jobs.submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await.unwrap().into_inner().job.unwrap().id;
    let models = vec![minilm_model("all-MiniLM-L6-v2")];
    let device = v1::Device { name: "cuda:3".into(), memory_bytes: 80 << 30, free_memory_bytes: 79 << 30 };
    let devices = vec![device];
    let request = v1::RegisterWorkerRequest { hostname: "h".into(), slots: 1, models, devices, ..Default::default() };
    let worker = workers.register_worker(request).await.unwrap().into_inner().worker_id;
    let request = v1::LeaseJobRequest { worker_id: worker, free_slots: 1, ..Default::default() };
    let lease = workers.lease_job(request).await.unwrap().into_inner().lease.expect("the job is leased");
    assert_eq!(lease.job_id, id);
    let header = v1::CompleteJobHeader {
        job_id: id.clone(),
        epoch: lease.epoch,
        adapter_sha256: hex::encode(sha2::Sha256::digest(archive)),
        adapter_size: archive.len() as u64,
        step: 1,
        lease_token: lease.lease_token,
        ..Default::default()
    };
    let parts = [Part::Header(header), Part::Data(archive.to_vec())].map(|p| v1::CompleteJobChunk { part: Some(p) });
    workers.complete_job(futures::stream::iter(parts)).await.expect("the archive is accepted as an adapter");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_get_shows_the_devices_a_job_ran_on_and_workers_list_their_devices() {
    let setup = start().await;
    let id = job_with_adapter(&setup, b"adapter").await;
    let text = ptune(&setup, &["jobs", "get", &id]).await;
    assert!(text.stdout.contains("\ndevices:     cuda:3\n"), "{}", text.stdout);
    let shown = ptune(&setup, &["--output", "json", "jobs", "get", &id]).await;
    let job: serde_json::Value = serde_json::from_str(&shown.stdout).expect("json job");
    assert_eq!(job["devices"], serde_json::json!(["cuda:3"]));

    // Listing workers takes an admin token.
    let workers = ptune_as(&setup, &setup.tokens.admin, &["workers", "list"]).await;
    assert!(workers.stdout.contains("cuda:3 (80.0 GiB)"), "{}{}", workers.stdout, workers.stderr);
    let listed = ptune_as(&setup, &setup.tokens.admin, &["--output", "json", "workers", "list"]).await;
    let listed: serde_json::Value = serde_json::from_str(&listed.stdout).expect("json workers");
    let device = &listed[0]["devices"][0];
    assert_eq!(device["memory_bytes"].as_u64(), Some(80 << 30));
    assert_eq!(device["free_memory_bytes"].as_u64(), Some(79 << 30));
}

/// The names in a folder, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_get_refuses_archives_that_reach_outside_the_folder_and_leaves_everything_as_it_was() {
    use tar::EntryType::{Char, Link, Regular, Symlink};
    let setup = start().await;
    let root = tempfile::tempdir().unwrap();
    let (canary, work) = (root.path().join("canary"), root.path().join("work"));
    std::fs::create_dir_all(&canary).unwrap();
    std::fs::create_dir_all(work.join("out")).unwrap();
    std::fs::write(canary.join("secret"), "untouched").unwrap();
    std::fs::write(work.join("out").join("keep"), "the previous adapter").unwrap();
    let c = canary.display().to_string();
    let config: &[u8] = b"{}";

    let hostile: Vec<(&str, Vec<u8>, &str)> = vec![
        ("..", raw_tar(&[(Regular, "../../canary/x".into(), "", b"pwned", 5)]), "not a plain file name"),
        ("absolute path", raw_tar(&[(Regular, format!("{c}/abs"), "", b"pwned", 5)]), "not a plain file name"),
        (
            "symlink escape",
            raw_tar(&[(Symlink, "d".into(), &c, b"", 0), (Regular, "d/pwned".into(), "", b"pwned", 5)]),
            "Symlink entry",
        ),
        (
            "hardlink",
            raw_tar(&[(Link, "h".into(), &format!("{c}/secret"), b"", 0), (Regular, "h".into(), "", b"pwned", 5)]),
            "Link entry",
        ),
        ("device file", raw_tar(&[(Char, "null".into(), "", b"", 0)]), "Char entry"),
        (
            "size of 2^63",
            raw_tar(&[(Regular, "adapter_config.json".into(), "", config, 2), (Regular, "big".into(), "", &[0; 512], 1 << 63)]),
            "unpacks to more than",
        ),
    ];
    let out = work.join("out");
    for (what, archive, reason) in &hostile {
        let id = job_with_adapter(&setup, archive).await;
        let run = ptune(&setup, &["adapter", "get", &id, "-o", out.to_str().unwrap()]).await;
        assert_ne!(run.code, 0, "{what}: refused");
        assert!(run.stderr.contains("refusing the adapter archive") && run.stderr.contains(reason), "{what}: {}", run.stderr);
        assert_eq!(listing(&canary), ["secret"], "{what}: nothing appears beside the canary");
        assert_eq!(std::fs::read_to_string(canary.join("secret")).unwrap(), "untouched", "{what}");
        assert_eq!(listing(&work), ["out"], "{what}: no temporary file or folder is left behind");
        assert_eq!(listing(&out), ["keep"], "{what}: the folder already there is left as it was");
    }
    assert!(!root.path().join("x").exists() && !root.path().join("abs").exists());

    let good = raw_tar(&[
        (Regular, "adapter_config.json".into(), "", config, 2),
        (Regular, "adapter_model.safetensors".into(), "", b"weights", 7),
    ]);
    let id = job_with_adapter(&setup, &good).await;
    let run = ptune(&setup, &["adapter", "get", &id, "-o", out.to_str().unwrap()]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(listing(&out), ["adapter_config.json", "adapter_model.safetensors"], "a good archive replaces the folder");
    assert_eq!(listing(&work), ["out"]);
    let small = ptune(&setup, &["adapter", "get", &id, "-o", out.to_str().unwrap(), "--max-bytes", "100"]).await;
    assert!(small.code != 0 && small.stderr.contains("more than --max-bytes 100"), "{}", small.stderr);
    assert_eq!(listing(&out), ["adapter_config.json", "adapter_model.safetensors"]);
}

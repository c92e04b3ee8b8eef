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

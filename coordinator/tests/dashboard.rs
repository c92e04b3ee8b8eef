//! The operator dashboard on a real coordinator and database, with data made
//! through the real gRPC APIs (jobs, a grid sweep, a worker that reports
//! curves and uploads adapters): its JSON API, the adapter download, the
//! live event stream, and the pages themselves in headless Chromium, which
//! must show the numbers that are in the database and what `GetJob` says of
//! a job (why it waits, its memory estimate, its worker's peak).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{metric, Env};
use ptune_coordinator::testing::minilm_model;
use ptune_proto::v1::{self, complete_job_chunk::Part};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Eval accuracy of each grid trial, by (prompt length, learning rate).
/// Exact binary fractions, so the page prints them exactly.
const GRID: [(u32, f64, f64); 4] = [(5, 0.001, 0.5625), (5, 0.03, 0.6875), (20, 0.001, 0.75), (20, 0.03, 0.9375)];
const LOSSES: [f64; 5] = [0.6929, 0.6502, 0.5874, 0.5123, 0.4321];
/// The memory estimate of the standard spec on MiniLM's shape (see
/// `tests/memory.rs`): weights, job, activations.
const ESTIMATE: (u64, u64, u64) = (90_852_864, 135_200, 40_061_952);
/// The peak memory the worker reports when it completes a job.
const PEAK_RSS: u64 = 321 << 20;
/// The base model of the queued job, which no worker serves.
const UNSERVED: &str = "other-bert";

struct Seeded {
    worker: String,
    training: v1::Lease,
    training_id: String,
    finished_id: String,
    queued_id: String,
    sweep_id: String,
    adapter: Vec<u8>,
}

/// Two standalone jobs (one training with a loss curve, one finished with an
/// adapter), a 2 x 2 grid sweep run to completion, and one queued job on a
/// model no worker serves. The worker reports its model's shape, so every
/// job on it has a memory estimate.
async fn seed(env: &mut Env) -> Seeded {
    let worker = register_shaped(env).await;
    let spec = env.spec("loss-curve").await;
    let training_job = env.submit(spec.clone()).await;
    let finished_job = env.submit(v1::JobSpec { name: "finished".into(), owner: "bob".into(), ..spec.clone() }).await;

    let training = env.lease(&worker).await.unwrap();
    assert_eq!(training.job_id, training_job.id);
    for (i, loss) in LOSSES.iter().enumerate() {
        let step = i as u64 + 1;
        let mut metrics =
            vec![metric(step, "train", "loss", *loss), metric(step, "train", "examples_per_second", 250.0)];
        if step == 5 {
            metrics.push(metric(step, "eval", "accuracy", 0.8125));
        }
        env.report(&training, step, metrics).await.unwrap();
    }

    let finished = env.lease(&worker).await.unwrap();
    assert_eq!(finished.job_id, finished_job.id);
    env.report(&finished, 1, vec![metric(1, "train", "loss", 0.7)]).await.unwrap();
    // Over a megabyte, so the download spans several database windows and chunks.
    let adapter: Vec<u8> = (0..1_500_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    complete(env, &finished, 10, vec![metric(10, "eval", "accuracy", 0.9)], &adapter).await;

    let (train, eval) = (
        env.upload("train.jsonl", common::TRAIN).await.reference,
        env.upload("eval.jsonl", common::EVAL).await.reference,
    );
    let definition = json!({
        "name": "grid",
        "owner": "alice",
        "max_concurrent_trials": 4,
        "objective": { "metric": "accuracy", "direction": "maximize" },
        "algorithm": { "type": "grid" },
        "template": {
            "base_model": common::MODEL,
            "task": "sequence_classification",
            "method": "prompt_tuning",
            "peft": { "num_virtual_tokens": 10 },
            "data": { "train": train, "eval": eval, "labels": [0, 1], "max_seq_len": 64 },
            "training": { "learning_rate": 0.01, "batch_size": 2, "max_steps": 4 },
        },
        "space": {
            "peft.num_virtual_tokens": { "values": [5, 20] },
            "training.learning_rate": { "values": [0.001, 0.03] },
        },
    });
    let sweep = env
        .sweeps
        .create_sweep(v1::CreateSweepRequest { definition_json: definition.to_string() })
        .await
        .expect("create sweep")
        .into_inner();
    let mut trained = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while trained < GRID.len() {
        assert!(tokio::time::Instant::now() < deadline, "the sweep's trials were not all queued");
        let Some(lease) = env.lease(&worker).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let spec = lease.spec.clone().unwrap();
        let (nvt, lr) = (spec.peft.unwrap().num_virtual_tokens.unwrap(), spec.training.unwrap().learning_rate);
        let accuracy = GRID.iter().find(|(n, l, _)| *n == nvt && (*l - lr).abs() < 1e-12).expect("a grid point").2;
        for step in 1..=4u64 {
            let mut metrics = vec![metric(step, "train", "loss", 1.0 / step as f64)];
            if step == 2 {
                metrics.push(metric(step, "eval", "accuracy", accuracy / 2.0));
            }
            env.report(&lease, step, metrics).await.unwrap();
        }
        complete(env, &lease, 4, vec![metric(4, "eval", "accuracy", accuracy)], lease.job_id.as_bytes()).await;
        trained += 1;
    }
    loop {
        let s = env.sweeps.get_sweep(v1::GetSweepRequest { sweep_id: sweep.id.clone() }).await.unwrap().into_inner();
        if s.state == v1::SweepState::Completed as i32 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the sweep did not complete: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let queued = env.submit(v1::JobSpec { name: "waiting".into(), base_model: UNSERVED.into(), ..spec }).await;
    Seeded {
        worker,
        training,
        training_id: training_job.id,
        finished_id: finished_job.id,
        queued_id: queued.id,
        sweep_id: sweep.id,
        adapter,
    }
}

/// Registers a worker as [`Env::register`] does, reporting MiniLM's shape.
async fn register_shaped(env: &mut Env) -> String {
    let request = v1::RegisterWorkerRequest {
        hostname: "test-host".into(),
        devices: vec![v1::Device { name: "cpu".into(), memory_bytes: 1 << 30, ..Default::default() }],
        slots: 2,
        models: vec![minilm_model(common::MODEL)],
        ..Default::default()
    };
    env.workers.register_worker(request).await.expect("register").into_inner().worker_id
}

async fn complete(env: &mut Env, lease: &v1::Lease, step: u64, metrics: Vec<v1::Metric>, adapter: &[u8]) {
    let header = v1::CompleteJobHeader {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        adapter_sha256: common::sha256(adapter),
        adapter_size: adapter.len() as u64,
        metrics,
        step,
        peak_rss_bytes: PEAK_RSS,
        lease_token: lease.lease_token.clone(),
        next: None,
    };
    let mut parts = vec![v1::CompleteJobChunk { part: Some(Part::Header(header)) }];
    parts.extend(adapter.chunks(100_000).map(|c| v1::CompleteJobChunk { part: Some(Part::Data(c.to_vec())) }));
    env.workers.complete_job(futures::stream::iter(parts)).await.expect("complete");
}

/// Keeps the worker online and its throughput fresh before a page reads them.
async fn touch(env: &mut Env, s: &Seeded) {
    let metrics = vec![metric(5, "train", "examples_per_second", 250.0)];
    env.report(&s.training, 5, metrics).await.unwrap();
    env.heartbeat(&s.worker, &[&s.training]).await;
}

// --------------------------------------------------------------------- API

#[tokio::test]
async fn the_workers_api_counts_packs_and_the_models_a_worker_holds() {
    let mut env = common::start(Duration::from_secs(60)).await;
    let worker = env.register().await;
    let spec = env.spec("packed").await;
    for name in ["a", "b", "alone"] {
        env.submit(v1::JobSpec { name: name.into(), ..spec.clone() }).await;
    }
    let mut leases = Vec::new();
    for _ in 0..3 {
        let request =
            v1::LeaseJobRequest { worker_id: worker.clone(), free_slots: 1, loaded_models: vec![common::MODEL.into()], wait_ms: 0 };
        leases.push(env.workers.lease_job(request).await.unwrap().into_inner().lease.expect("a lease"));
    }
    // Two jobs share their passes, the third trains alone.
    for (lease, pack_jobs) in leases.iter().zip([2.0, 2.0, 1.0]) {
        env.report(lease, 1, vec![metric(1, "train", "pack_jobs", pack_jobs)]).await.unwrap();
    }
    let http = Http::viewer(&env);
    let workers = get(&http, "/api/workers").await.json();
    let w = &workers["workers"][0];
    assert_eq!((w["packs_running"].clone(), w["packed_jobs"].clone()), (json!(1), json!(2)), "{w}");
    assert_eq!(w["loaded_models"], json!([common::MODEL]));
    assert_eq!(w["slots_busy"], 3);
    env.stop().await;
}

#[tokio::test]
async fn the_api_pages_sorts_filters_and_streams_adapters_and_events() {
    let mut env = common::start(Duration::from_secs(60)).await;
    let s = seed(&mut env).await;
    let http = Http::viewer(&env);

    let all = get(&http, "/api/jobs").await.json();
    assert_eq!(all["total"], 7, "three jobs and four trials");
    let names: Vec<&str> = all["jobs"].as_array().unwrap().iter().map(|j| j["name"].as_str().unwrap()).collect();
    assert_eq!(names.first(), Some(&"waiting"), "newest first");

    let by_name = get(&http, "/api/jobs?sort=name&order=asc&limit=3").await.json();
    let names: Vec<&str> = by_name["jobs"].as_array().unwrap().iter().map(|j| j["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["finished", "grid-t0", "grid-t1"]);
    let after = by_name["next"].as_str().expect("a cursor to the next page");
    let next = get(&http, &format!("/api/jobs?sort=name&order=asc&limit=3&after={after}")).await.json();
    let names: Vec<&str> = next["jobs"].as_array().unwrap().iter().map(|j| j["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["grid-t2", "grid-t3", "loss-curve"]);

    let running = get(&http, "/api/jobs?state=running").await.json();
    assert_eq!(running["total"], 1);
    assert_eq!(running["jobs"][0]["id"], s.training_id.as_str());
    assert_eq!(running["jobs"][0]["loss"], 0.4321, "latest training loss");
    let trials = get(&http, &format!("/api/jobs?sweep={}&sort=sweep&order=asc", s.sweep_id)).await.json();
    let indexes: Vec<i64> =
        trials["jobs"].as_array().unwrap().iter().map(|j| j["trial_index"].as_i64().unwrap()).collect();
    assert_eq!(indexes, [0, 1, 2, 3]);
    assert_eq!(get(&http, "/api/jobs?owner=bob").await.json()["jobs"][0]["id"], s.finished_id.as_str());

    let bad = get(&http, "/api/jobs?sort=colour").await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap().starts_with("sort: must be one of created"), "{:?}", bad.json());
    assert_eq!(get(&http, "/api/jobs?state=sleeping").await.status, 400);
    assert_eq!(get(&http, "/api/jobs?limit=100000").await.status, 400);
    assert_eq!(get(&http, "/api/jobs/00000000-0000-4000-8000-000000000000").await.status, 404);

    let job = get(&http, &format!("/api/jobs/{}", s.training_id)).await.json();
    assert_eq!(job["state"], "running");
    assert_eq!(job["attempt_history"][0]["hostname"], "test-host");
    assert_eq!(job["attempt_history"][0]["worker_id"], s.worker.as_str());
    assert_eq!(job["spec"]["name"], "loss-curve");
    let (weights, own, activations) = ESTIMATE;
    assert_eq!(
        job["memory_estimate"],
        json!({
            "weights_bytes": weights, "job_bytes": own, "activation_bytes": activations,
            "total_bytes": weights + own + activations,
        })
    );
    assert_eq!((job["waiting_reason"].clone(), job["worker_peak_rss_bytes"].clone()), (Value::Null, Value::Null));
    // The same job as GetJob gives it.
    let grpc = env.get(&s.training_id).await;
    assert_eq!(job["memory_estimate"]["total_bytes"], grpc.memory_estimate_bytes);
    let finished = get(&http, &format!("/api/jobs/{}", s.finished_id)).await.json();
    assert_eq!(finished["worker_peak_rss_bytes"], PEAK_RSS);
    assert_eq!(finished["worker_peak_rss_bytes"], env.get(&s.finished_id).await.worker_peak_rss_bytes);
    let queued = get(&http, &format!("/api/jobs/{}", s.queued_id)).await.json();
    let reason = format!("unschedulable: no registered worker serves base model {UNSERVED:?}; it waits until one does");
    assert_eq!(queued["waiting_reason"], reason.as_str());
    assert_eq!(queued["waiting_reason"], env.get(&s.queued_id).await.waiting_reason.as_str());
    assert_eq!(queued["memory_estimate"], Value::Null, "no worker reported its model's shape");
    let curves = get(&http, &format!("/api/jobs/{}/metrics", s.training_id)).await.json();
    let loss =
        curves["series"].as_array().unwrap().iter().find(|c| c["kind"] == "train" && c["name"] == "loss").unwrap();
    let expected: Vec<Value> = LOSSES.iter().enumerate().map(|(i, l)| json!([i + 1, l])).collect();
    assert_eq!(loss["points"].as_array().unwrap(), &expected);
    let tail = get(&http, &format!("/api/jobs/{}/metrics?after_step=4", s.training_id)).await.json();
    let loss = tail["series"].as_array().unwrap().iter().find(|c| c["name"] == "loss").unwrap();
    assert_eq!(loss["points"], json!([[5, 0.4321]]), "only the points after the step asked for");

    let download = get(&http, &format!("/api/jobs/{}/adapter", s.finished_id)).await;
    assert_eq!(download.status, 200);
    assert_eq!(download.header("content-type"), Some("application/x-tar"));
    assert_eq!(download.header("content-length"), Some(s.adapter.len().to_string().as_str()));
    assert!(download.header("content-disposition").unwrap().contains(&format!("ptune-adapter-{}.tar", s.finished_id)));
    assert!(download.body == s.adapter, "the download is the uploaded archive, byte for byte");
    let none = get(&http, &format!("/api/jobs/{}/adapter", s.queued_id)).await;
    assert_eq!(none.status, 404);
    assert!(none.json()["error"].as_str().unwrap().contains("has no adapter (it is queued)"));

    let sweep = get(&http, &format!("/api/sweeps/{}", s.sweep_id)).await.json();
    assert_eq!(sweep["state"], "completed");
    let board = sweep["leaderboard"].as_array().unwrap();
    let objectives: Vec<f64> = board.iter().map(|t| t["objective"].as_f64().unwrap()).collect();
    assert_eq!(objectives, [0.9375, 0.75, 0.6875, 0.5625], "best first");
    assert_eq!(sweep["best_trial"], board[0]["index"]);
    assert_eq!(board[0]["params"], json!({ "peft.num_virtual_tokens": 20, "training.learning_rate": 0.03 }));
    let curves = get(&http, &format!("/api/sweeps/{}/curves", s.sweep_id)).await.json();
    assert_eq!(curves["metric"], "accuracy");
    assert_eq!(curves["trials"].as_array().unwrap().len(), 4);
    assert_eq!(curves["trials"][0]["points"].as_array().unwrap().len(), 2, "evaluated at steps 2 and 4");
    let list = get(&http, "/api/sweeps").await.json();
    assert_eq!(list["sweeps"][0]["best"]["objective"], 0.9375);

    touch(&mut env, &s).await;
    let overview = get(&http, "/api/overview").await.json();
    assert_eq!(overview["jobs"], json!({ "queued": 1, "running": 1, "succeeded": 5, "failed": 0, "cancelled": 0 }));
    assert_eq!(overview["queue"]["depth"], 1);
    assert_eq!(overview["queue"]["recent"]["leases"], 6);
    assert_eq!(overview["workers"], json!({ "online": 1, "slots": 2, "slots_busy": 1 }));
    assert_eq!(overview["examples_per_second"], 250.0);
    let workers = get(&http, "/api/workers").await.json();
    assert_eq!(workers["workers"][0]["hostname"], "test-host");
    assert_eq!(workers["workers"][0]["slots_busy"], 1);
    assert_eq!(workers["workers"][0]["running_jobs"], json!([s.training_id]));
    assert_eq!(workers["workers"][0]["examples_per_second"], 250.0);
    assert_eq!(workers["workers"][0]["packs_running"], 0, "one job, alone");
    assert_eq!(workers["workers"][0]["packed_jobs"], 0);

    // Live: an open event stream hears about a job submitted after it opened.
    let mut events = EventStream::open(&http).await;
    events.wait_for("event: hello").await;
    let spec = env.spec("late").await;
    let late = env.submit(spec).await;
    let lease = env.lease(&s.worker).await.expect("the queued job");
    events.wait_for(&lease.job_id).await;
    assert_ne!(late.id, "");
    env.stop().await;
}

// ---------------------------------------------------------------- browser

#[tokio::test]
async fn headless_chromium_shows_the_numbers_in_the_database() {
    let browser = chromium();
    let mut env = common::start(Duration::from_secs(60)).await;
    let s = seed(&mut env).await;
    let http = Http::viewer(&env);
    let artifacts = artifacts_dir();
    let profile = tempfile::tempdir().unwrap();
    // Logging in sets the session cookie in the browser's profile.
    let login = format!("http://{}/login?token={}", http.addr, http.token);
    let landed = run_chromium(&browser, profile.path(), &["--dump-dom".into(), login]).await;
    assert!(landed.contains("data-nav=\"overview\""), "the login did not lead to the dashboard:\n{landed}");
    let http = (http, profile.path());

    let jobs = page(&browser, &http, "#/jobs", "jobs", &artifacts, "jobs").await;
    assert!(jobs.contains("data-total=\"7\""), "{jobs}");
    for name in ["loss-curve", "finished", "waiting", "grid-t0", "grid-t3"] {
        assert!(jobs.contains(&format!(">{name}</a>")), "{name} missing from the jobs table:\n{jobs}");
    }
    assert!(jobs.contains(">0.4321<"), "the training job's latest loss:\n{jobs}");
    assert!(jobs.contains("1–7 of 7"), "{jobs}");

    let job = page(&browser, &http, &format!("#/jobs/{}", s.training_id), "job", &artifacts, "job-training").await;
    assert!(job.contains("train loss: 5 points, last 0.4321 at step 5"), "the loss curve:\n{job}");
    assert!(job.contains("eval accuracy: 1 points, last 0.8125 at step 5"), "the eval curve:\n{job}");
    assert!(job.contains("data-points=\"5\""), "{job}");
    assert!(job.contains("test-host · "), "the attempt's worker:\n{job}");
    assert!(
        job.contains("estimate 125.0 MiB (weights 86.6 MiB, job 132.0 KiB, activations 38.2 MiB)"),
        "the memory estimate:\n{job}"
    );

    let finished = page(&browser, &http, &format!("#/jobs/{}", s.finished_id), "job", &artifacts, "job-finished").await;
    assert!(finished.contains(&format!("href=\"/api/jobs/{}/adapter\"", s.finished_id)), "{finished}");
    assert!(finished.contains("; worker peak 321.0 MiB"), "the worker's peak:\n{finished}");

    let queued = page(&browser, &http, &format!("#/jobs/{}", s.queued_id), "job", &artifacts, "job-queued").await;
    let waiting = section(&queued, "id=\"job-waiting\"", "</p>");
    assert!(waiting.contains("waiting: unschedulable: no registered worker serves base model"), "{queued}");

    let sweep = page(&browser, &http, &format!("#/sweeps/{}", s.sweep_id), "sweep", &artifacts, "sweep").await;
    let heatmap = section(&sweep, "id=\"heatmap-table\"", "</table>");
    for (_, _, accuracy) in GRID {
        assert!(
            heatmap.contains(&format!(">{accuracy}</td>")),
            "accuracy {accuracy} missing from the heatmap:\n{heatmap}"
        );
    }
    assert!(heatmap.contains("data-x=\"peft.num_virtual_tokens\" data-y=\"training.learning_rate\""), "{heatmap}");
    assert!(sweep.contains("4 of 4 cells evaluated"), "{sweep}");
    assert!(sweep.contains("accuracy of 4 trials, 8 points"), "the trials' curves:\n{sweep}");
    assert!(sweep.contains("best finished trial #3 at 0.9375"), "{sweep}");
    assert!(section(&sweep, "<tr class=\"best\"", "</tr>").contains(">0.9375<"), "the best row is highlighted");

    touch(&mut env, &s).await;
    let overview = page(&browser, &http, "#/", "overview", &artifacts, "overview").await;
    assert!(section(&overview, "id=\"card-queue\"", "</div></div>").contains("class=\"value\">1<"), "{overview}");
    assert!(section(&overview, "id=\"card-rate\"", "</div></div>").contains("class=\"value\">250<"), "{overview}");
    assert!(section(&overview, "id=\"card-slots\"", "</div></div>").contains("class=\"value\">1 / 2<"), "{overview}");

    touch(&mut env, &s).await;
    let workers = page(&browser, &http, "#/workers", "workers", &artifacts, "workers").await;
    let row = section(&workers, &format!("data-worker=\"{}\"", s.worker), "</tr>");
    assert!(row.contains(">test-host<") && row.contains(">1 / 2<") && row.contains(">250<"), "{row}");
    assert!(row.contains("latest pack_jobs metric)\">0</td>"), "packs running:\n{row}");
    println!("dashboard screenshots: {}", artifacts.display());
    env.stop().await;
}

/// Loads a page in headless Chromium, saves a screenshot, and returns the
/// DOM once the page says it has loaded `view`.
async fn page(browser: &Path, http: &(Http, &Path), hash: &str, view: &str, artifacts: &Path, label: &str) -> String {
    let (http, profile) = http;
    let url = format!("http://{}/{hash}", http.addr);
    let shot = artifacts.join(format!("dashboard-{label}.png"));
    let args = [format!("--screenshot={}", shot.display()), "--window-size=1400,1200".into(), url.clone()];
    run_chromium(browser, profile, &args).await;
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false), "no screenshot of {url}");
    let dom = run_chromium(browser, profile, &["--dump-dom".into(), url.clone()]).await;
    assert!(dom.contains(&format!("data-ready=\"{view}\"")), "{url} did not finish loading:\n{dom}");
    assert!(!dom.contains("id=\"error-box\""), "{url} shows an error:\n{dom}");
    assert!(!dom.contains("[object ") && !dom.contains(">null<") && !dom.contains(">undefined<"), "{url}:\n{dom}");
    dom
}

/// Runs headless Chromium on `profile` (which keeps its cookies between runs).
async fn run_chromium(browser: &Path, profile: &Path, args: &[String]) -> String {
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(browser)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"])
            .arg(format!("--user-data-dir={}", profile.display()))
            // Virtual time: the snapshot is taken once the page's fetches are done and 1.5
            // virtual seconds of timers have run (the page opens its event stream after 2).
            .args(["--run-all-compositor-stages-before-draw", "--virtual-time-budget=1500"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finishes within 90 s")
    .expect("chromium runs");
    assert!(output.status.success(), "chromium failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Chromium: `$PTUNE_CHROMIUM`, or the first of the usual names on `PATH`.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("PTUNE_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome-headless-shell"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("no chromium found: run scripts/setup.sh (it installs Debian's chromium) or set PTUNE_CHROMIUM");
}

/// `target/test-artifacts` of this workspace.
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The text from the first `start` to the next `end` after it.
fn section<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let from = text.find(start).unwrap_or_else(|| panic!("{start} not found in:\n{text}"));
    let to = text[from..].find(end).map_or(text.len(), |i| from + i + end.len());
    &text[from..to]
}

// ------------------------------------------------------------------- HTTP

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not json ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// The coordinator's HTTP address and the token requests carry.
struct Http {
    addr: SocketAddr,
    token: String,
}

impl Http {
    /// With the viewer token: what an ops dashboard reads with.
    fn viewer(env: &Env) -> Self {
        Self { addr: env.coordinator.as_ref().unwrap().http_addr, token: env.tokens.viewer.clone() }
    }
}

async fn get(http: &Http, path: &str) -> Response {
    let addr = http.addr;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        http.token
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("an http response");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(": ").map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))).collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Response { status, headers, body }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
        raw = &raw[line_end + 2 + size + 2..];
    }
}

/// The raw text of an open `/api/events` response.
struct EventStream {
    stream: tokio::net::TcpStream,
    seen: String,
}

impl EventStream {
    async fn open(http: &Http) -> Self {
        let addr = http.addr;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
            http.token
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        Self { stream, seen: String::new() }
    }

    async fn wait_for(&mut self, text: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        while !self.seen.contains(text) {
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{text:?} not in the event stream within 10 s:\n{}", self.seen))
                .unwrap();
            assert!(n > 0, "the event stream closed:\n{}", self.seen);
            self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
}

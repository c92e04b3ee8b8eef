//! A thousand hostile requests against a running coordinator, over real
//! gRPC with valid tokens (an attacker who holds a submitter's or a
//! worker's token): random bytes, NUL and control characters, bidirectional
//! overrides, 100 KB strings, path-like names, NaN and infinities,
//! `u64::MAX`, invalid ids, page tokens and enums, undecodable messages and
//! oversized ones. Every one must get a clear client error (never
//! `INTERNAL` or `UNKNOWN`) within a second, and the coordinator must serve
//! normally afterwards.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::RawCodec;
use ptune_proto::v1;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;

/// Values that have broken services before.
fn hostile_strings(rng: &mut StdRng) -> String {
    let random_bytes: Vec<u8> = (0..rng.gen_range(1..64)).map(|_| rng.gen()).collect();
    let choices = [
        "\0".to_string(),
        "name\0with-nul".into(),
        "../../etc/passwd".into(),
        "/absolute/path".into(),
        "x".repeat(100_000),
        "evil\u{202E}gpj.exe".into(),
        "\u{1b}[31mred\u{1b}[0m".into(),
        "line\nbreak".into(),
        "😀".repeat(2000),
        String::new(),
        " ".into(),
        "sha256:../../../x".into(),
        format!("sha256:{}", "g".repeat(64)),
        "'; DROP TABLE jobs; --".into(),
        "\"}\n# EOF".into(),
        String::from_utf8_lossy(&random_bytes).into_owned(),
        "00000000-0000-0000-0000-000000000000".into(),
        "not-a-uuid".into(),
        "1700000000000000.zzzz".into(),
    ];
    choices[rng.gen_range(0..choices.len())].clone()
}

fn hostile_u64(rng: &mut StdRng) -> u64 {
    [0, 1, u64::MAX, i64::MAX as u64 + 1, u32::MAX as u64, 1 << 40][rng.gen_range(0..6)]
}

fn hostile_f64(rng: &mut StdRng) -> f64 {
    [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 1e308, -1.0, f64::MIN_POSITIVE, 0.0][rng.gen_range(0..8)]
}

fn hostile_enum(rng: &mut StdRng) -> i32 {
    [0, 1, 7, 99, -1, i32::MAX][rng.gen_range(0..6)]
}

/// A valid spec with one field made hostile.
fn hostile_spec(rng: &mut StdRng, train: &str, eval: &str) -> v1::JobSpec {
    let mut spec = common::spec("hostile", train, eval);
    let training = spec.training.as_mut().unwrap();
    let data = spec.data.as_mut().unwrap();
    match rng.gen_range(0..16) {
        0 => spec.name = hostile_strings(rng),
        1 => spec.base_model = hostile_strings(rng),
        2 => spec.owner = hostile_strings(rng),
        3 => data.train = hostile_strings(rng),
        4 => data.text_field = hostile_strings(rng),
        5 => data.labels = vec![hostile_strings(rng); rng.gen_range(1..3)],
        6 => training.max_steps = hostile_u64(rng),
        7 => training.learning_rate = hostile_f64(rng),
        8 => training.epochs = hostile_f64(rng),
        9 => training.warmup_ratio = hostile_f64(rng),
        10 => spec.method = hostile_enum(rng),
        11 => spec.task = hostile_enum(rng),
        12 => training.batch_size = u32::MAX,
        13 => training.seed = Some(u64::MAX),
        14 => data.max_train_examples = hostile_u64(rng),
        _ => spec.peft.get_or_insert_with(Default::default).init_text = hostile_strings(rng),
    }
    spec
}

const METHODS: &[&str] = &[
    "/ptune.v1.JobService/SubmitJob",
    "/ptune.v1.JobService/GetJob",
    "/ptune.v1.JobService/ListJobs",
    "/ptune.v1.JobService/CancelJob",
    "/ptune.v1.SweepService/CreateSweep",
    "/ptune.v1.SweepService/ExtendSweep",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_hostile_requests_get_clear_client_errors_within_a_second_and_the_coordinator_serves_on() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let url = format!("http://{}", env.coordinator.as_ref().unwrap().grpc_addr);
    let train = env.upload("train.jsonl", common::TRAIN).await.reference;
    let eval = env.upload("eval.jsonl", common::EVAL).await.reference;
    let worker = env.register().await;
    let submitter = ptune_coordinator::testing::channel(&url, &env.tokens.submitter);
    let mut jobs = v1::job_service_client::JobServiceClient::new(submitter.clone());
    let mut sweeps = v1::sweep_service_client::SweepServiceClient::new(submitter.clone());
    let mut workers = env.workers.clone();
    let mut raw = tonic::client::Grpc::new(submitter);

    let mut rng = StdRng::seed_from_u64(1010);
    let mut codes: BTreeMap<String, u32> = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    for i in 0..1000 {
        let started = Instant::now();
        let call = async {
            let code = |r: Result<(), tonic::Status>| match r {
                Ok(()) => Code::Ok,
                Err(s) if matches!(s.code(), Code::Internal | Code::Unknown) => panic!("request {i}: {s:?}"),
                Err(s) => s.code(),
            };
            match i % 14 {
                0 | 1 => {
                    let spec = hostile_spec(&mut rng, &train, &eval);
                    code(jobs.submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await.map(|_| ()))
                }
                2 => code(jobs.get_job(v1::GetJobRequest { job_id: hostile_strings(&mut rng) }).await.map(|_| ())),
                3 => {
                    let request = v1::ListJobsRequest {
                        states: vec![hostile_enum(&mut rng)],
                        base_model: hostile_strings(&mut rng),
                        method: hostile_enum(&mut rng),
                        name_prefix: hostile_strings(&mut rng),
                        owner: hostile_strings(&mut rng),
                        page_size: u32::MAX,
                        page_token: hostile_strings(&mut rng),
                        sweep_id: hostile_strings(&mut rng),
                    };
                    code(jobs.list_jobs(request).await.map(|_| ()))
                }
                4 => {
                    let request = v1::GetMetricsRequest { job_id: hostile_strings(&mut rng), kind: hostile_strings(&mut rng) };
                    code(jobs.get_metrics(request).await.map(|_| ()))
                }
                5 => {
                    let chunk = v1::DatasetChunk { file_name: hostile_strings(&mut rng), data: hostile_strings(&mut rng).into_bytes() };
                    code(jobs.upload_dataset(futures::stream::iter([chunk])).await.map(|_| ()))
                }
                6 => {
                    let definition = match rng.gen_range(0..4) {
                        0 => hostile_strings(&mut rng),
                        1 => format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
                        2 => serde_json::json!({ "name": hostile_strings(&mut rng), "template": { "base_model": hostile_strings(&mut rng) } }).to_string(),
                        _ => serde_json::json!({ "name": "s", "owner": hostile_strings(&mut rng), "algorithm": { "type": "grid" }, "objective": { "metric": "accuracy", "direction": "maximize" }, "template": { "base_model": "tiny-bert", "task": "sequence_classification", "method": "prompt_tuning", "data": { "train": train, "eval": eval, "labels": ["0", "1"] }, "training": { "learning_rate": 0.1, "max_steps": u64::MAX } }, "space": { "training.learning_rate": { "values": [0.1] } } }).to_string(),
                    };
                    code(sweeps.create_sweep(v1::CreateSweepRequest { definition_json: definition }).await.map(|_| ()))
                }
                7 => {
                    let request = v1::ExtendSweepRequest { sweep_id: hostile_strings(&mut rng), trials: hostile_u64(&mut rng) as u32 };
                    code(sweeps.extend_sweep(request).await.map(|_| ()))
                }
                8 => {
                    let request = v1::RegisterWorkerRequest {
                        worker_id: hostile_strings(&mut rng),
                        hostname: hostile_strings(&mut rng),
                        devices: vec![v1::Device { name: hostile_strings(&mut rng), memory_bytes: hostile_u64(&mut rng), ..Default::default() }],
                        slots: u32::MAX,
                        models: vec![v1::BaseModel { name: hostile_strings(&mut rng), model_type: hostile_strings(&mut rng), ..Default::default() }],
                        memory_bytes: hostile_u64(&mut rng),
                    };
                    code(workers.register_worker(request).await.map(|_| ()))
                }
                9 => {
                    let lease = v1::LeaseRef { job_id: hostile_strings(&mut rng), epoch: hostile_u64(&mut rng), lease_token: hostile_strings(&mut rng) };
                    let request = v1::HeartbeatRequest { worker_id: worker.clone(), leases: vec![lease], unhealthy_reason: hostile_strings(&mut rng) };
                    code(workers.heartbeat(request).await.map(|_| ()))
                }
                10 => {
                    let metric = v1::Metric { step: hostile_u64(&mut rng), kind: hostile_strings(&mut rng), name: hostile_strings(&mut rng), value: hostile_f64(&mut rng) };
                    let request = v1::ReportProgressRequest {
                        job_id: hostile_strings(&mut rng),
                        epoch: hostile_u64(&mut rng),
                        step: hostile_u64(&mut rng),
                        total_steps: hostile_u64(&mut rng),
                        metrics: vec![metric],
                        lease_token: hostile_strings(&mut rng),
                    };
                    code(workers.report_progress(request).await.map(|_| ()))
                }
                11 => {
                    let request = v1::DownloadDatasetRequest {
                        reference: hostile_strings(&mut rng),
                        job_id: hostile_strings(&mut rng),
                        epoch: hostile_u64(&mut rng),
                        lease_token: hostile_strings(&mut rng),
                    };
                    code(workers.download_dataset(request).await.map(|_| ()))
                }
                12 => {
                    // A message that does not decode, to a random method.
                    let bytes: Vec<u8> = (0..rng.gen_range(1..512)).map(|_| rng.gen()).collect();
                    let path = http::uri::PathAndQuery::from_static(METHODS[rng.gen_range(0..METHODS.len())]);
                    raw.ready().await.unwrap();
                    code(raw.unary(tonic::Request::new(bytes), path, RawCodec).await.map(|_: tonic::Response<Vec<u8>>| ()))
                }
                _ => {
                    // An oversized message: 17 MiB of name.
                    let mut spec = common::spec("big", &train, &eval);
                    spec.name = "x".repeat(17 << 20);
                    code(jobs.submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await.map(|_| ()))
                }
            }
        };
        let answered = tokio::time::timeout(Duration::from_secs(1), call).await;
        let code = answered.unwrap_or_else(|_| panic!("request {i} got no answer within a second"));
        slowest = slowest.max(started.elapsed());
        assert!(!matches!(code, Code::Internal | Code::Unknown), "request {i} got {code:?}");
        *codes.entry(format!("{code:?}")).or_default() += 1;
    }
    println!("1000 hostile requests: {codes:?}; slowest answer {slowest:?}");
    assert!(codes.get("InvalidArgument").copied().unwrap_or(0) > 300, "most are refused as invalid: {codes:?}");

    // The coordinator serves normally afterwards.
    let normal = env.spec("after-the-storm").await;
    let job = env.submit(normal).await;
    assert_eq!(common::state(&env.get(&job.id).await), v1::JobState::Queued);
    let accepted = env.jobs.list_jobs(v1::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    for job in &accepted {
        let spec = job.spec.as_ref().unwrap();
        for text in [&spec.name, &spec.base_model, &spec.owner] {
            assert!(!text.contains('\0') && !text.contains('/') || text == &spec.name, "{text:?} was stored");
            assert!(text.chars().count() <= 128, "a long value was stored: {} characters", text.chars().count());
        }
    }
    env.stop().await;
}

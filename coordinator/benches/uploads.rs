//! Coordinator memory while files arrive: a `ptune-coordinator` process on
//! a fresh database receives dataset uploads (one, then four at once, each
//! `PTUNE_BENCH_UPLOAD_MB` MB, default 250) and an adapter upload whose
//! header announces 1 GB and then sends nothing. The peak resident memory
//! of each phase (`VmHWM`, reset between phases) is compared with the idle
//! coordinator measured in the same run. Prints a Markdown table.
//!
//! `bench/uploads.sh [MB]`, or `cargo bench -p ptune-coordinator --bench uploads`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use ptune_coordinator::auth::Role;
use ptune_coordinator::testing::{channel, create_token, fresh_database, minilm_model, tiny_spec, CoordinatorProcess};
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;
use ptune_proto::v1::{self, complete_job_chunk::Part};

const MB: u64 = 1_000_000;
/// Bytes per gRPC message of an upload, as the CLI sends them.
const MESSAGE_BYTES: usize = 256 * 1024;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let upload_mb: u64 = std::env::var("PTUNE_BENCH_UPLOAD_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(250);
    let db = fresh_database().await?;
    let admin = create_token(&db.url, Role::Admin, "bench-admin").await?;
    let worker_token = create_token(&db.url, Role::Worker, "bench-worker").await?;
    let coordinator = CoordinatorProcess::start(env!("CARGO_BIN_EXE_ptune-coordinator"), &db.url, &[], &[])?;
    let url = coordinator.url.clone();
    let mut jobs = JobServiceClient::new(channel(&url, &admin));
    let mut workers = WorkerServiceClient::new(channel(&url, &worker_token));
    coordinator.wait_until_serving(&admin).await?;

    // Warm up: one small upload, job submission, registration and lease,
    // so the idle figure includes what every coordinator has loaded.
    let small = upload(jobs.clone(), 1, MB).await?;
    let spec = tiny_spec("upload-bench", &small.reference, v1::Method::PromptTuning);
    jobs.submit_job(v1::SubmitJobRequest { spec: Some(spec.clone()) }).await?;
    let worker = workers
        .register_worker(v1::RegisterWorkerRequest {
            hostname: "bench".into(),
            devices: vec![v1::Device { name: "cpu".into(), memory_bytes: 8 << 30, ..Default::default() }],
            slots: 4,
            models: vec![minilm_model("tiny-bert")],
            ..Default::default()
        })
        .await?
        .into_inner()
        .worker_id;
    let warm_lease = lease(&mut workers, &worker).await?;
    complete(&mut workers, &warm_lease, &[7u8; 1000]).await?;

    let mut rows = Vec::new();
    let start = coordinator.reset_peak()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = coordinator.peak()?;
    rows.push(Row { phase: "idle (after a warm-up)".into(), received_mb: 0.0, seconds: 0.0, start, peak: idle });

    for (phase, concurrent) in [("1 dataset upload", 1u64), ("4 concurrent dataset uploads", 4)] {
        let start = coordinator.reset_peak()?;
        let started = Instant::now();
        let uploads: Vec<_> = (0..concurrent).map(|i| tokio::spawn(upload(jobs.clone(), 100 + i, upload_mb * MB))).collect();
        for u in uploads {
            u.await??;
        }
        let seconds = started.elapsed().as_secs_f64();
        rows.push(Row {
            phase: format!("{phase} of {upload_mb} MB"),
            received_mb: (concurrent * upload_mb) as f64,
            seconds,
            start,
            peak: coordinator.peak()?,
        });
    }

    jobs.submit_job(v1::SubmitJobRequest { spec: Some(v1::JobSpec { name: "announces-1gb".into(), ..spec }) }).await?;
    let big = lease(&mut workers, &worker).await?;
    let start = coordinator.reset_peak()?;
    let started = Instant::now();
    let refused = complete_with_nothing(&mut workers, &big, 1_000_000_000, Duration::from_secs(3)).await;
    rows.push(Row {
        phase: "adapter header announcing 1 GB, then nothing for 3 s".into(),
        received_mb: 0.0,
        seconds: started.elapsed().as_secs_f64(),
        start,
        peak: coordinator.peak()?,
    });
    let refusal = refused.err().map(|s| format!("{:?}: {}", s.code(), s.message())).unwrap_or_default();

    println!("Coordinator peak resident memory (VmHWM of the ptune-coordinator process, reset before each phase)\n");
    println!("| phase | received (MB) | time (s) | MB/s | RSS at start (MB) | peak RSS (MB) | peak - start (MB) | peak / idle |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let rate = if row.seconds > 0.0 && row.received_mb > 0.0 { format!("{:.0}", row.received_mb / row.seconds) } else { "-".into() };
        println!(
            "| {} | {:.0} | {:.1} | {rate} | {:.0} | {:.0} | {:.0} | {:.2} |",
            row.phase,
            row.received_mb,
            row.seconds,
            row.start as f64 / MB as f64,
            row.peak as f64 / MB as f64,
            row.peak.saturating_sub(row.start) as f64 / MB as f64,
            row.peak as f64 / idle as f64,
        );
    }
    println!("\nThe 1 GB announcement ended with: {refusal}");
    drop(coordinator);
    Ok(())
}

struct Row {
    phase: String,
    received_mb: f64,
    seconds: f64,
    /// Resident memory when the phase began (memory freed by earlier
    /// phases may stay with the process).
    start: u64,
    peak: u64,
}

/// Streams `size` bytes of generated JSON Lines (distinct per `seed`).
async fn upload(
    mut jobs: JobServiceClient<ptune_proto::client::AuthChannel>,
    seed: u64,
    size: u64,
) -> anyhow::Result<v1::DatasetInfo> {
    let line = format!("{{\"text\": \"upload {seed} line padding padding padding padding\", \"label\": 1}}\n");
    let per_message = (MESSAGE_BYTES / line.len()).max(1);
    let message: Vec<u8> = line.repeat(per_message).into_bytes();
    let message_len = message.len() as u64;
    let messages = size.div_ceil(message_len);
    let chunks = futures::stream::iter(0..messages).map(move |i| v1::DatasetChunk {
        file_name: if i == 0 { format!("upload-{seed}.jsonl") } else { String::new() },
        data: message.clone(),
    });
    let info = jobs.upload_dataset(chunks).await.context("uploading")?.into_inner();
    let sent = messages * message_len;
    if info.size_bytes != sent {
        bail!("the coordinator stored {} bytes of the {sent} sent", info.size_bytes);
    }
    Ok(info)
}

/// Completes a lease with `adapter` as its archive.
async fn complete(
    workers: &mut WorkerServiceClient<ptune_proto::client::AuthChannel>,
    lease: &v1::Lease,
    adapter: &[u8],
) -> anyhow::Result<()> {
    use sha2::Digest;
    let header = v1::CompleteJobHeader {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        adapter_sha256: hex::encode(sha2::Sha256::digest(adapter)),
        adapter_size: adapter.len() as u64,
        step: 1,
        lease_token: lease.lease_token.clone(),
        ..Default::default()
    };
    let parts = [Part::Header(header), Part::Data(adapter.to_vec())].map(|p| v1::CompleteJobChunk { part: Some(p) });
    workers.complete_job(futures::stream::iter(parts)).await.context("completing the warm-up job")?;
    Ok(())
}

/// Sends a CompleteJob header announcing `announced` bytes, waits `hold`,
/// and ends the stream without sending any.
async fn complete_with_nothing(
    workers: &mut WorkerServiceClient<ptune_proto::client::AuthChannel>,
    lease: &v1::Lease,
    announced: u64,
    hold: Duration,
) -> Result<(), tonic::Status> {
    let header = v1::CompleteJobHeader {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        adapter_sha256: "0".repeat(64),
        adapter_size: announced,
        step: 1,
        lease_token: lease.lease_token.clone(),
        ..Default::default()
    };
    let first = futures::stream::once(async move { v1::CompleteJobChunk { part: Some(Part::Header(header)) } });
    let then_nothing = futures::stream::once(async move {
        tokio::time::sleep(hold).await;
    })
    .filter_map(|()| async { None });
    workers.complete_job(first.chain(then_nothing)).await.map(|_| ())
}

async fn lease(
    workers: &mut WorkerServiceClient<ptune_proto::client::AuthChannel>,
    worker: &str,
) -> anyhow::Result<v1::Lease> {
    let request = v1::LeaseJobRequest { worker_id: worker.into(), free_slots: 1, ..Default::default() };
    workers.lease_job(request).await?.into_inner().lease.context("no job to lease")
}


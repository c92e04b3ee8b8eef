//! Two ways for a worker to move files when the coordinator stores them in
//! an S3-compatible object store (`moto_server` on 127.0.0.1): through the
//! coordinator (what ptune does: `DownloadDataset` and `CompleteJob`
//! stream through it, checked against the lease and hashed on the way), or
//! straight to the store with presigned URLs (a GET of the object, a PUT of
//! a new one; plain HTTP, signed by the object_store crate's signer). For
//! each: seconds, MB/s, and the CPU time the coordinator and the store
//! server spent, measured in the same run on the same file.
//!
//! `bench/blob_paths.sh [MB]` (default 500 MB).

use std::time::Instant;

use anyhow::{bail, Context};
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::signer::Signer;
use ptune_coordinator::auth::Role;
use ptune_coordinator::testing::{
    channel, cpu_seconds, create_token, fresh_database, minilm_model, tiny_spec, CoordinatorProcess, S3Server,
};
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;
use ptune_proto::v1::{self, complete_job_chunk::Part};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MB: u64 = 1_000_000;
/// Bytes per gRPC message and per HTTP write, as the worker sends them.
const MESSAGE_BYTES: usize = 256 * 1024;
const BUCKET: &str = "bench";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mb: u64 = std::env::var("PTUNE_BENCH_BLOB_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let lines = (mb * MB) as usize / 64;
    let line = |i: usize| format!("{{\"text\": \"line {i:>34}\", \"label\": {}}}\n", i % 2);
    assert_eq!(line(0).len(), 64);
    let size = (lines * 64) as u64;

    let s3 = S3Server::start(BUCKET).await;
    let db = fresh_database().await?;
    let admin = create_token(&db.url, Role::Admin, "bench-admin").await?;
    let worker_token = create_token(&db.url, Role::Worker, "bench-worker").await?;
    let envs = s3.envs();
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let store_url = format!("s3://{BUCKET}/files");
    let args = ["--blob-store", &store_url, "--max-adapter-mib", "100000", "--lease-timeout-ms", "3600000"];
    let coordinator = CoordinatorProcess::start(env!("CARGO_BIN_EXE_ptune-coordinator"), &db.url, &args, &envs)?;
    coordinator.wait_until_serving(&admin).await?;
    let mut jobs = JobServiceClient::new(channel(&coordinator.url, &admin));
    let mut workers = WorkerServiceClient::new(channel(&coordinator.url, &worker_token));
    let mut rows = Vec::new();
    let mut measure = Measure { coordinator: &coordinator, store: s3.pid() };

    // Through the coordinator: a user's upload, a worker's download, a
    // worker's adapter upload.
    let messages = move || {
        let mut next = 0;
        std::iter::from_fn(move || {
            (next < lines).then(|| {
                let end = (next + MESSAGE_BYTES / 64).min(lines);
                let bytes: Vec<u8> = (next..end).flat_map(|i| line(i).into_bytes()).collect();
                next = end;
                bytes
            })
        })
    };
    let sha256 = hex::encode(messages().fold(Sha256::new(), |h, m| h.chain_update(m)).finalize());
    let started = measure.start()?;
    let chunks =
        futures::stream::iter(messages()).map(|data| v1::DatasetChunk { file_name: "bench.jsonl".into(), data });
    let info = jobs.upload_dataset(chunks).await?.into_inner();
    if info.size_bytes != size {
        bail!("stored {} bytes of {size}", info.size_bytes);
    }
    rows.push(measure.row("through the coordinator", "upload (UploadDataset)", size, started)?);

    let worker = workers
        .register_worker(v1::RegisterWorkerRequest {
            hostname: "bench".into(),
            devices: vec![v1::Device { name: "cpu".into(), memory_bytes: 64 << 30, ..Default::default() }],
            slots: 1,
            models: vec![minilm_model("tiny-bert")],
            ..Default::default()
        })
        .await?
        .into_inner()
        .worker_id;
    let spec = tiny_spec("blob-paths", &info.reference, v1::Method::PromptTuning);
    jobs.submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await?;
    let request = v1::LeaseJobRequest { worker_id: worker, free_slots: 1, ..Default::default() };
    let lease = workers.lease_job(request).await?.into_inner().lease.context("no lease")?;
    let started = measure.start()?;
    let request = v1::DownloadDatasetRequest {
        reference: info.reference.clone(),
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        lease_token: lease.lease_token.clone(),
    };
    let mut stream = workers.download_dataset(request).await?.into_inner();
    let (mut got, mut hasher) = (0u64, Sha256::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        got += chunk.data.len() as u64;
        hasher.update(&chunk.data);
    }
    check(got, hasher, size, &sha256)?;
    rows.push(measure.row("through the coordinator", "download (DownloadDataset)", size, started)?);

    let started = measure.start()?;
    let header = v1::CompleteJobHeader {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        adapter_sha256: sha256.clone(),
        adapter_size: size,
        step: 1,
        lease_token: lease.lease_token.clone(),
        ..Default::default()
    };
    let head = futures::stream::once(async move { v1::CompleteJobChunk { part: Some(Part::Header(header)) } });
    let body = futures::stream::iter(messages()).map(|data| v1::CompleteJobChunk { part: Some(Part::Data(data)) });
    workers.complete_job(head.chain(body)).await?;
    rows.push(measure.row("through the coordinator", "upload (CompleteJob)", size, started)?);

    // Straight to the store: presigned URLs for the same object and a new one.
    let blob: uuid::Uuid = {
        let pool = sqlx::PgPool::connect(&db.url).await?;
        let sha = info.reference.trim_start_matches("sha256:");
        sqlx::query_scalar("SELECT blob_id FROM datasets WHERE sha256 = $1").bind(sha).fetch_one(&pool).await?
    };
    #[allow(deprecated)] // ring, as coordinator/src/tls.rs says
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let signer = AmazonS3Builder::from_env().with_url(format!("s3://{BUCKET}")).build()?;
    let expires = std::time::Duration::from_secs(3600);
    let get = signer.signed_url(http::Method::GET, &Path::from(format!("files/blobs/{blob}")), expires).await?;
    let started = measure.start()?;
    let (got, hasher) = http_get(s3.port, &path_and_query(get.as_str())).await?;
    check(got, hasher, size, &sha256)?;
    rows.push(measure.row("presigned URL", "download (GET)", size, started)?);

    let put = signer.signed_url(http::Method::PUT, &Path::from("files/direct/upload"), expires).await?;
    let started = measure.start()?;
    http_put(s3.port, &path_and_query(put.as_str()), size, messages()).await?;
    rows.push(measure.row("presigned URL", "upload (PUT)", size, started)?);

    println!("Moving a {} MB file between a worker and an S3-compatible store (moto_server), two ways\n", size / MB);
    println!(
        "| path | transfer | seconds | MB/s | coordinator CPU s | store server CPU s | coordinator CPU s per GB |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {} | {:.1} | {:.0} | {:.1} | {:.1} | {:.2} |",
            row.path,
            row.transfer,
            row.seconds,
            row.bytes as f64 / MB as f64 / row.seconds,
            row.coordinator_cpu,
            row.store_cpu,
            row.coordinator_cpu / (row.bytes as f64 / 1e9),
        );
    }
    Ok(())
}

struct Row {
    path: &'static str,
    transfer: &'static str,
    bytes: u64,
    seconds: f64,
    coordinator_cpu: f64,
    store_cpu: f64,
}

/// CPU time of the coordinator and the store server around a transfer.
struct Measure<'a> {
    coordinator: &'a CoordinatorProcess,
    store: u32,
}

impl Measure<'_> {
    fn start(&mut self) -> anyhow::Result<(Instant, f64, f64)> {
        Ok((Instant::now(), self.coordinator.cpu_seconds()?, cpu_seconds(self.store)?))
    }

    fn row(
        &mut self,
        path: &'static str,
        transfer: &'static str,
        bytes: u64,
        (started, coordinator, store): (Instant, f64, f64),
    ) -> anyhow::Result<Row> {
        Ok(Row {
            path,
            transfer,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
            coordinator_cpu: self.coordinator.cpu_seconds()? - coordinator,
            store_cpu: cpu_seconds(self.store)? - store,
        })
    }
}

fn check(got: u64, hasher: Sha256, size: u64, sha256: &str) -> anyhow::Result<()> {
    let hex = hex::encode(hasher.finalize());
    if got != size || hex != sha256 {
        bail!("received {got} bytes hashing to {hex}, expected {size} bytes hashing to {sha256}");
    }
    Ok(())
}

/// The part of a URL after its host.
fn path_and_query(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.find('/').map_or("/".to_string(), |i| rest[i..].to_string())
}

/// A plain HTTP/1.1 GET; the body's size and hash.
async fn http_get(port: u16, target: &str) -> anyhow::Result<(u64, Sha256)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; MESSAGE_BYTES];
    let (mut head, mut body, mut hasher) = (Vec::new(), 0u64, Sha256::new());
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if body == 0 && head.windows(4).all(|w| w != b"\r\n\r\n") {
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                let rest = head.split_off(end + 4);
                if !head.starts_with(b"HTTP/1.1 200") {
                    bail!("GET answered {}", String::from_utf8_lossy(&head));
                }
                body += rest.len() as u64;
                hasher.update(&rest);
            }
        } else {
            body += n as u64;
            hasher.update(&buf[..n]);
        }
    }
    Ok((body, hasher))
}

/// A plain HTTP/1.1 PUT of `size` bytes from `body`.
async fn http_put(port: u16, target: &str, size: u64, body: impl Iterator<Item = Vec<u8>>) -> anyhow::Result<()> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!(
        "PUT {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    for part in body {
        stream.write_all(&part).await?;
    }
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    if !answer.starts_with("HTTP/1.1 200") {
        bail!("PUT answered {}", answer.lines().next().unwrap_or_default());
    }
    Ok(())
}

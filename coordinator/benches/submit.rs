//! Submissions per second of the demo's SST-2 job (`examples/jobs/
//! sst2-prompt-tuning.toml`, whose 5 MB training set declares two labels)
//! over real gRPC, with the dataset facts gathered at upload and, as the
//! baseline in the same run, with them cleared so that every submission
//! reads both datasets again to check their labels (what admission did
//! before the facts were kept). Rounds alternate A B A B. Then, facts kept,
//! one `SubmitJobs` call of BATCH specs against `SubmitJob` calls one after
//! the other (JOBS of them), again A B A B. Prints Markdown
//! tables for docs/benchmarks.md.
//!
//!   bench/submit.sh [JOBS [ROUNDS [BATCH]]]   (default 200 jobs per round, 3 rounds, batches of 5,000)
//!
//! Needs the PostgreSQL server of the tests and ../shared/data
//! (`PTUNE_SHARED_DATA` to put it elsewhere).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use ptune_coordinator::auth::Role;
use ptune_coordinator::testing::{channel, create_token, fresh_database};
use ptune_coordinator::{Config, Coordinator};
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::{self, DatasetChunk};

/// Bytes per gRPC message of an upload, as the CLI sends them.
const MESSAGE_BYTES: usize = 256 * 1024;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let jobs: usize = args.first().map_or(Ok(200), |a| a.parse())?;
    let rounds: usize = args.get(1).map_or(Ok(3), |a| a.parse())?;
    let batch: usize = args.get(2).map_or(Ok(5000), |a| a.parse())?;
    let data = std::env::var_os("PTUNE_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));

    let db = fresh_database().await?;
    let coordinator = Coordinator::start(Config::new(db.url.clone())).await?;
    let token = create_token(&db.url, Role::Admin, "bench-admin").await?;
    let mut client = JobServiceClient::new(channel(&format!("http://{}", coordinator.grpc_addr), &token));

    let mut template = ptune_core::JobSpec::from_toml(include_str!("../../examples/jobs/sst2-prompt-tuning.toml"))
        .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
    let train = upload(&mut client, &data.join("sst2/train.jsonl")).await?;
    let eval = upload(&mut client, &data.join("sst2/dev.jsonl")).await?;
    template.data.train = train.reference.clone();
    template.data.eval = eval.reference.clone();
    let pool = sqlx::PgPool::connect(&db.url).await?;
    let facts: Vec<(String, serde_json::Value)> = sqlx::query_as("SELECT sha256, facts FROM datasets").fetch_all(&pool).await?;
    anyhow::ensure!(facts.len() == 2, "both datasets have facts: {facts:?}");

    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (variant, kept) in [(0, true), (1, false)] {
            if kept {
                for (sha256, facts) in &facts {
                    sqlx::query("UPDATE datasets SET facts = $1 WHERE sha256 = $2").bind(facts).bind(sha256).execute(&pool).await?;
                }
            } else {
                sqlx::query("UPDATE datasets SET facts = NULL").execute(&pool).await?;
            }
            let started = Instant::now();
            for i in 0..jobs {
                let mut spec = template.clone();
                spec.name = format!("bench-{round}-{variant}-{i}");
                client.submit_job(v1::SubmitJobRequest { spec: Some((&spec).into()) }).await?;
            }
            rates[variant].push(jobs as f64 / started.elapsed().as_secs_f64());
        }
    }

    // One call of `batch` specs against as many calls of one.
    for (sha256, facts) in &facts {
        sqlx::query("UPDATE datasets SET facts = $1 WHERE sha256 = $2").bind(facts).bind(sha256).execute(&pool).await?;
    }
    let mut batch_rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        let specs: Vec<v1::JobSpec> = (0..batch)
            .map(|i| {
                let mut spec = template.clone();
                spec.name = format!("batch-{round}-{i}");
                (&spec).into()
            })
            .collect();
        let started = Instant::now();
        let reply = client.submit_jobs(v1::SubmitJobsRequest { specs: specs.clone(), all_or_nothing: false }).await?;
        anyhow::ensure!(reply.get_ref().submitted as usize == batch, "every spec of the batch was stored");
        batch_rates[0].push(batch as f64 / started.elapsed().as_secs_f64());
        // The baseline's rate from JOBS calls (thousands would take minutes).
        let started = Instant::now();
        for spec in specs.into_iter().take(jobs) {
            client.submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await?;
        }
        batch_rates[1].push(jobs.min(batch) as f64 / started.elapsed().as_secs_f64());
    }
    coordinator.shutdown().await?;

    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (kept, read) = (median(&mut rates[0].clone()), median(&mut rates[1].clone()));
    println!(
        "Submissions per second of the SST-2 demo job over gRPC ({jobs} per round, {rounds} rounds A B A B, median; \
         train {} bytes, dev {} bytes)\n",
        train.size_bytes, eval.size_bytes
    );
    println!("| admission | jobs/s (median) | rounds | ratio |");
    println!("|---|---:|---|---:|");
    let show = |v: &[f64]| v.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ");
    println!("| labels from the facts kept at upload | {kept:.0} | {} | {:.1}x |", show(&rates[0]), kept / read);
    println!("| labels read from the datasets (baseline) | {read:.0} | {} | 1.0x |", show(&rates[1]));
    let (many, one) = (median(&mut batch_rates[0].clone()), median(&mut batch_rates[1].clone()));
    println!("\nSubmissions per second of {batch} SST-2 demo jobs: one SubmitJobs call against SubmitJob calls one at a time ({jobs} per round; {rounds} rounds A B A B, median)\n");
    println!("| submission | jobs/s (median) | rounds | ratio |");
    println!("|---|---:|---|---:|");
    println!("| one SubmitJobs call of {batch} | {many:.0} | {} | {:.1}x |", show(&batch_rates[0]), many / one);
    println!("| SubmitJob, one call per job (baseline) | {one:.0} | {} | 1.0x |", show(&batch_rates[1]));
    Ok(())
}

async fn upload(client: &mut JobServiceClient<ptune_proto::client::AuthChannel>, path: &std::path::Path) -> anyhow::Result<v1::DatasetInfo> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("data.jsonl").to_string();
    let chunks: Vec<DatasetChunk> = bytes
        .chunks(MESSAGE_BYTES)
        .enumerate()
        .map(|(i, data)| DatasetChunk { file_name: if i == 0 { name.clone() } else { String::new() }, data: data.to_vec() })
        .collect();
    Ok(client.upload_dataset(futures::stream::iter(chunks)).await?.into_inner())
}

//! Submissions per second of the demo's SST-2 job (`examples/jobs/
//! sst2-prompt-tuning.toml`, whose 5 MB training set declares two labels)
//! over real gRPC, with the dataset facts gathered at upload and, as the
//! baseline in the same run, with them cleared so that every submission
//! reads both datasets again to check their labels (what admission did
//! before the facts were kept). Rounds alternate A B A B. Prints a Markdown
//! table for docs/benchmarks.md.
//!
//!   bench/submit.sh [JOBS [ROUNDS]]      (default 200 jobs per round, 3 rounds)
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

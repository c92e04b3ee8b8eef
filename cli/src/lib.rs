//! The `ptune` command line: a thin gRPC client of the coordinator. Every
//! command prints tables for people, or JSON with `--output json`.

mod commands;
mod output;
mod view;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::sweep_service_client::SweepServiceClient;
use tonic::transport::Channel;

pub use commands::{adapter::AdapterCommand, jobs::JobsCommand, sweep::SweepCommand, workers::WorkersCommand};

/// Command-line client for the ptune coordinator.
#[derive(Debug, Parser)]
#[command(name = "ptune", version, about)]
pub struct Cli {
    /// Coordinator gRPC address.
    #[arg(long, global = true, env = "PTUNE_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a job from a TOML spec; uploads the datasets it references and
    /// prints the new job id as the last line.
    Submit {
        /// Job spec (TOML). Dataset paths are relative to this file.
        file: std::path::PathBuf,
        /// Follow the job's progress until it finishes (exit 0 only if it succeeded).
        #[arg(long)]
        watch: bool,
    },
    /// Inspect and control jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Download trained adapters.
    #[command(subcommand)]
    Adapter(AdapterCommand),
    /// Hyperparameter sweeps: create, follow the leaderboard, get the best trial.
    #[command(subcommand)]
    Sweep(SweepCommand),
    /// The workers: slots, models, heartbeats and health.
    #[command(subcommand)]
    Workers(WorkersCommand),
}

/// Runs one command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let channel = connect(&cli.coordinator).await?;
    let client = JobServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
    match cli.command {
        Command::Submit { file, watch } => commands::submit::run(client, cli.output, &file, watch).await,
        Command::Jobs(cmd) => commands::jobs::run(client, cli.output, cmd).await,
        Command::Adapter(cmd) => commands::adapter::run(client, cli.output, cmd).await,
        Command::Workers(cmd) => commands::workers::run(client, cli.output, cmd).await,
        Command::Sweep(cmd) => {
            let sweeps = SweepServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
            commands::sweep::run(sweeps, client, cli.output, cmd).await
        }
    }
}

/// Largest answer accepted (a big sweep's leaderboard, adapter chunks).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

async fn connect(url: &str) -> anyhow::Result<Channel> {
    let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    let channel = Channel::from_shared(url.clone())
        .with_context(|| format!("invalid coordinator address {url:?}"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}; is ptune-coordinator running? (set --coordinator or PTUNE_COORDINATOR)"))?;
    Ok(channel)
}

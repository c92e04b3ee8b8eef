//! The `ptune` command line: a thin gRPC client of the coordinator. Every
//! command prints tables for people, or JSON with `--output json`.

mod commands;
mod output;
mod view;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ptune_proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

pub use commands::{adapter::AdapterCommand, jobs::JobsCommand};

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
}

/// Runs one command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let client = connect(&cli.coordinator).await?;
    match cli.command {
        Command::Submit { file, watch } => commands::submit::run(client, cli.output, &file, watch).await,
        Command::Jobs(cmd) => commands::jobs::run(client, cli.output, cmd).await,
        Command::Adapter(cmd) => commands::adapter::run(client, cli.output, cmd).await,
    }
}

async fn connect(url: &str) -> anyhow::Result<JobServiceClient<Channel>> {
    let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    let channel = Channel::from_shared(url.clone())
        .with_context(|| format!("invalid coordinator address {url:?}"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}; is ptune-coordinator running? (set --coordinator or PTUNE_COORDINATOR)"))?;
    Ok(JobServiceClient::new(channel).max_decoding_message_size(64 << 20))
}

//! The `ptune` command line: a thin gRPC client of the coordinator. Every
//! command prints tables for people, or JSON with `--output json`.

mod commands;
mod config;
mod output;
mod view;

use std::path::PathBuf;

use ptune_proto::client::ClientOptions;
use ptune_proto::v1::admin_service_client::AdminServiceClient;
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::sweep_service_client::SweepServiceClient;
use clap::{Parser, Subcommand, ValueEnum};

pub use commands::{
    adapter::AdapterCommand, admin::TokenCommand, jobs::JobsCommand, sweep::SweepCommand, workers::WorkersCommand,
};

/// The coordinator address when neither a flag, the environment nor the config file names one.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:50051";

/// Command-line client for the ptune coordinator.
#[derive(Debug, Parser)]
#[command(name = "ptune", version, about)]
pub struct Cli {
    /// Coordinator gRPC address (http:// or https://); default: the config file's, else http://127.0.0.1:50051.
    #[arg(long, global = true, env = "PTUNE_COORDINATOR")]
    pub coordinator: Option<String>,
    /// API token; default: the config file's (`ptune login`). Prefer PTUNE_TOKEN: a flag shows in `ps`.
    #[arg(long, global = true, env = "PTUNE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM of the CA that signed the coordinator's certificate (https://).
    #[arg(long, global = true, env = "PTUNE_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
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
    /// prints the new job id as the last line. Several files, or a JSON Lines
    /// file of specs (one JSON object per line, the TOML spec's fields), are
    /// submitted in batches of up to 10,000 (`SubmitJobs`): one line per
    /// spec, its job id or why it was refused; exit 1 if any was refused.
    Submit {
        /// Job specs: TOML files, or `.jsonl` files of one spec per line.
        /// Dataset paths are relative to the file that names them.
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
        /// Follow the job's progress until it finishes (exit 0 only if it
        /// succeeded); one TOML spec only.
        #[arg(long)]
        watch: bool,
        /// Store no job of a batch unless every spec in it is admitted.
        #[arg(long)]
        all_or_nothing: bool,
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
    /// Save the coordinator address and a token in ~/.config/ptune/config.toml (mode 0600), after checking them.
    Login {
        /// The token to save (default: --token or PTUNE_TOKEN; read from stdin when neither is given).
        #[arg(long = "with-token", value_name = "TOKEN")]
        with_token: Option<String>,
    },
    /// API tokens (admins): create, list, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The audit trail of every change (admins).
    Audit {
        /// At most this many entries, newest first.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// Runs one command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let saved = config::load()?;
    let url = cli.coordinator.clone().or(saved.coordinator.clone()).unwrap_or_else(|| DEFAULT_COORDINATOR.into());
    let options = ClientOptions {
        token: cli.token.clone().or(saved.token.clone()),
        ca_cert: cli.ca_cert.clone().or(saved.ca_cert.clone()),
        client_cert: None,
    };
    if let Command::Login { with_token } = cli.command {
        return config::login(&url, options, with_token, cli.ca_cert.or(saved.ca_cert)).await;
    }
    let channel = ptune_proto::client::connect(&url, &options)
        .await
        .map_err(|e| anyhow::anyhow!("{e}; is ptune-coordinator running? (set --coordinator or PTUNE_COORDINATOR)"))?;
    if options.token.is_none() {
        eprintln!("note: no token given (ptune login, PTUNE_TOKEN or --token); the coordinator will refuse the call");
    }
    let client = JobServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
    match cli.command {
        Command::Submit { files, watch, all_or_nothing } => {
            commands::submit::run(client, cli.output, &files, watch, all_or_nothing).await
        }
        Command::Jobs(cmd) => commands::jobs::run(client, cli.output, cmd).await,
        Command::Adapter(cmd) => commands::adapter::run(client, cli.output, cmd).await,
        Command::Workers(cmd) => commands::workers::run(client, cli.output, cmd).await,
        Command::Sweep(cmd) => {
            let sweeps = SweepServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
            commands::sweep::run(sweeps, client, cli.output, cmd).await
        }
        Command::Token(cmd) => commands::admin::tokens(AdminServiceClient::new(channel), cli.output, cmd).await,
        Command::Audit { limit } => commands::admin::audit(AdminServiceClient::new(channel), cli.output, limit).await,
        Command::Login { .. } => unreachable!("handled above"),
    }
}

/// Largest answer accepted (a big sweep's leaderboard, adapter chunks).
const MAX_MESSAGE_BYTES: usize = 64 << 20;


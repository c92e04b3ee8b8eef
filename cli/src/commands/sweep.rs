//! `ptune sweep ...`: create a sweep from a TOML definition, follow its
//! leaderboard, get its best trial and adapter, export its trials, and
//! cancel, extend or resize it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Subcommand, ValueEnum};
use ptune_core::sweep::{SweepDefinition, SweepState};
use ptune_proto::convert::sweep_state_from_wire;
use ptune_proto::v1::{self, job_service_client::JobServiceClient, sweep_service_client::SweepServiceClient};
use serde_json::Value;
use ptune_proto::client::AuthChannel;

use super::adapter;
use super::status_error;
use super::submit::upload_referenced;
use crate::output;
use crate::view::{value_text, SweepView, TrialView};
use crate::Format;

#[derive(Debug, Subcommand)]
pub enum SweepCommand {
    /// Create a sweep from a TOML definition: uploads the datasets its
    /// template names (paths relative to the file) and prints the sweep id as
    /// the last line.
    Create {
        /// Sweep definition (TOML); see examples/sweeps/.
        file: PathBuf,
    },
    /// List sweeps, newest first, with their best trial.
    List {
        /// Only sweeps in this state (repeatable): running, completed, cancelled, failed.
        #[arg(long = "state")]
        states: Vec<SweepState>,
        /// At most this many sweeps.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue from a previous listing's next page token.
        #[arg(long)]
        page_token: Option<String>,
    },
    /// A sweep's state and its leaderboard: rank, trial, job, parameters, objective, state, steps.
    Status {
        id: String,
        /// Show only the best this many trials.
        #[arg(long)]
        top: Option<usize>,
    },
    /// The best trial with an adapter, and how to fetch the adapter.
    Best {
        id: String,
        /// Download the best trial's adapter into this folder.
        #[arg(long)]
        download: Option<PathBuf>,
    },
    /// Wait until a sweep finishes; exits 0 only if it completed.
    Wait {
        id: String,
        /// Give up after this many seconds (exit 3).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Every trial with its parameters and objective, as CSV or JSON.
    Export {
        id: String,
        #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
        format: ExportFormat,
        /// Write to this file instead of standard output.
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// Cancel a running sweep: queued trials at once, running ones at their next step.
    Cancel { id: String },
    /// Add trials to a random or ASHA sweep (a completed one runs again);
    /// new trials never repeat a configuration the sweep already had.
    Extend {
        id: String,
        /// How many trials to add.
        #[arg(long)]
        trials: u32,
    },
    /// Change how many trials of a sweep may be queued or running at once.
    Update {
        id: String,
        #[arg(long)]
        max_concurrent_trials: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Csv,
    Json,
}

/// How often `sweep wait` looks at the sweep.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(
    mut sweeps: SweepServiceClient<AuthChannel>,
    mut jobs: JobServiceClient<AuthChannel>,
    format: Format,
    cmd: SweepCommand,
) -> anyhow::Result<i32> {
    match cmd {
        SweepCommand::Create { file } => create(&mut sweeps, &mut jobs, format, &file).await,
        SweepCommand::List { states, limit, page_token } => {
            let request = v1::ListSweepsRequest {
                states: states.into_iter().map(|s| v1::SweepState::from(s) as i32).collect(),
                page_size: limit,
                page_token: page_token.unwrap_or_default(),
            };
            let response = sweeps.list_sweeps(request).await.map_err(status_error)?.into_inner();
            print_list(format, &response);
            Ok(0)
        }
        SweepCommand::Status { id, top } => {
            let sweep = get(&mut sweeps, &id).await?;
            let mut view = SweepView::new(&sweep);
            if let Some(n) = top {
                view.leaderboard.truncate(n);
            }
            match format {
                Format::Json => output::json(&view),
                Format::Text => print_status(&view),
            }
            Ok(0)
        }
        SweepCommand::Best { id, download } => best(&mut sweeps, &mut jobs, format, &id, download).await,
        SweepCommand::Wait { id, timeout } => {
            let waiting = wait(&mut sweeps, &id);
            let sweep = match timeout {
                Some(secs) => match tokio::time::timeout(Duration::from_secs(secs), waiting).await {
                    Ok(sweep) => sweep?,
                    Err(_) => {
                        eprintln!("sweep {id} did not finish within {secs} s");
                        return Ok(3);
                    }
                },
                None => waiting.await?,
            };
            let view = SweepView::new(&sweep);
            match format {
                Format::Json => output::json(&view),
                Format::Text => println!("{}", summary_line(&view)),
            }
            Ok(if view.state == SweepState::Completed.as_str() { 0 } else { 1 })
        }
        SweepCommand::Export { id, format: export, out } => {
            let sweep = get(&mut sweeps, &id).await?;
            let view = SweepView::new(&sweep);
            let text = match export {
                ExportFormat::Csv => csv(&view.leaderboard),
                ExportFormat::Json => serde_json::to_string_pretty(&view.leaderboard)? + "\n",
            };
            match &out {
                None => print!("{text}"),
                Some(path) => {
                    std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?;
                    match format {
                        Format::Json => output::json(&serde_json::json!({
                            "sweep_id": id, "file": path.display().to_string(), "trials": view.leaderboard.len(),
                        })),
                        Format::Text => eprintln!("wrote {} trials of sweep {id} to {}", view.leaderboard.len(), path.display()),
                    }
                }
            }
            Ok(0)
        }
        SweepCommand::Cancel { id } => {
            let request = v1::CancelSweepRequest { sweep_id: id };
            let sweep = sweeps.cancel_sweep(request).await.map_err(status_error)?.into_inner();
            let view = SweepView::new(&sweep);
            match format {
                Format::Json => output::json(&view),
                Format::Text => println!(
                    "sweep {} cancelled; {} running trials stop at their next step",
                    view.id, view.counts.running
                ),
            }
            Ok(0)
        }
        SweepCommand::Extend { id, trials } => {
            let request = v1::ExtendSweepRequest { sweep_id: id, trials };
            let sweep = sweeps.extend_sweep(request).await.map_err(status_error)?.into_inner();
            let view = SweepView::new(&sweep);
            match format {
                Format::Json => output::json(&view),
                Format::Text => {
                    println!("sweep {} extended to {} trials; it is {}", view.id, view.trial_budget, view.state)
                }
            }
            Ok(0)
        }
        SweepCommand::Update { id, max_concurrent_trials } => {
            let request = v1::UpdateSweepRequest { sweep_id: id, max_concurrent_trials };
            let sweep = sweeps.update_sweep(request).await.map_err(status_error)?.into_inner();
            let view = SweepView::new(&sweep);
            match format {
                Format::Json => output::json(&view),
                Format::Text => println!("sweep {} runs at most {} trials at once", view.id, view.max_concurrent_trials),
            }
            Ok(0)
        }
    }
}

async fn get(client: &mut SweepServiceClient<AuthChannel>, id: &str) -> anyhow::Result<v1::Sweep> {
    let request = v1::GetSweepRequest { sweep_id: id.to_string() };
    Ok(client.get_sweep(request).await.map_err(status_error)?.into_inner())
}

/// Reads the TOML definition, checks it, uploads the datasets it names and creates the sweep.
async fn create(
    sweeps: &mut SweepServiceClient<AuthChannel>,
    jobs: &mut JobServiceClient<AuthChannel>,
    format: Format,
    file: &Path,
) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read sweep definition {}", file.display()))?;
    let toml: toml::Value = toml::from_str(&text).map_err(|e| anyhow!("{}: {}", file.display(), e.message().trim()))?;
    let mut definition = serde_json::to_value(toml)?;
    // Every check that needs no coordinator runs before anything is uploaded.
    SweepDefinition::from_json(&definition).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    for key in ["train", "eval"] {
        let field = format!("template.data.{key}");
        if let Some(slot) = definition.pointer_mut(&format!("/template/data/{key}")) {
            let path = slot.as_str().unwrap_or_default().to_string();
            *slot = Value::from(upload_referenced(jobs, format, base, &field, &path).await?);
        }
        // Datasets may also be searched over: upload every listed file.
        for pointer in [format!("/space/data/{key}/values"), format!("/space/data.{key}/values")] {
            if let Some(Value::Array(values)) = definition.pointer_mut(&pointer) {
                for value in values.iter_mut() {
                    let path = value.as_str().unwrap_or_default().to_string();
                    *value = Value::from(upload_referenced(jobs, format, base, &format!("space.data.{key}"), &path).await?);
                }
            }
        }
    }
    // The owner is the token's name: the coordinator sets it.
    let request = v1::CreateSweepRequest { definition_json: definition.to_string() };
    let sweep = sweeps.create_sweep(request).await.map_err(status_error)?.into_inner();
    let view = SweepView::new(&sweep);
    match format {
        Format::Json => output::json(&view),
        Format::Text => {
            eprintln!(
                "created sweep {:?}: {} over {} trials, at most {} at once, {} {}",
                view.name,
                view.algorithm,
                view.trial_budget,
                view.max_concurrent_trials,
                view.objective_direction,
                view.objective_metric
            );
            println!("{}", view.id);
        }
    }
    Ok(0)
}

async fn best(
    sweeps: &mut SweepServiceClient<AuthChannel>,
    jobs: &mut JobServiceClient<AuthChannel>,
    format: Format,
    id: &str,
    download: Option<PathBuf>,
) -> anyhow::Result<i32> {
    let sweep = get(sweeps, id).await?;
    let view = SweepView::new(&sweep);
    let Some(best) = view.best_trial.clone() else {
        eprintln!("sweep {id} has no trial with an adapter yet ({}; {} of {} trials finished)", view.state, view.finished(), view.trial_budget);
        return Ok(1);
    };
    let saved = match &download {
        Some(dir) => Some(adapter::download(jobs, &best.job_id, dir, adapter::DEFAULT_MAX_BYTES).await?),
        None => None,
    };
    match format {
        Format::Json => output::json(&serde_json::json!({
            "sweep_id": view.id,
            "objective_metric": view.objective_metric,
            "objective_direction": view.objective_direction,
            "best_trial": best,
            "adapter": {
                "job_id": best.job_id,
                "sha256": best.adapter_sha256,
                "dir": download.as_ref().map(|d| d.display().to_string()),
                "files": saved.as_ref().map(|s| s.files.clone()),
            },
        })),
        Format::Text => {
            let objective = best.objective.map(output::num).unwrap_or_else(|| "-".into());
            println!(
                "best trial {} of sweep {}: {} {} at step {}",
                best.trial,
                view.id,
                view.objective_metric,
                objective,
                best.objective_step.unwrap_or(best.step)
            );
            println!("  parameters: {}", best.params_text());
            println!("  state:      {} ({} of {} steps)", best.status, best.step, best.total_steps);
            println!("  job:        {}", best.job_id);
            println!("  adapter:    sha256 {}", best.adapter_sha256);
            match (&download, &saved) {
                (Some(dir), Some(saved)) => println!("  written to: {} ({})", dir.display(), saved.files.join(", ")),
                _ => println!("  fetch it:   ptune adapter get {} -o DIR", best.job_id),
            }
        }
    }
    Ok(0)
}

/// Polls the sweep until it finishes; rides out coordinator restarts.
async fn wait(client: &mut SweepServiceClient<AuthChannel>, id: &str) -> anyhow::Result<v1::Sweep> {
    loop {
        let request = v1::GetSweepRequest { sweep_id: id.to_string() };
        match client.get_sweep(request).await {
            Ok(response) => {
                let sweep = response.into_inner();
                if sweep_state_from_wire(sweep.state).ok().flatten().is_some_and(SweepState::is_terminal) {
                    return Ok(sweep);
                }
            }
            Err(status) if matches!(status.code(), tonic::Code::NotFound | tonic::Code::InvalidArgument) => {
                return Err(status_error(status));
            }
            Err(_) => {}
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn summary_line(view: &SweepView) -> String {
    let c = &view.counts;
    let mut line = format!(
        "sweep {} {}: {} trials ({} succeeded, {} stopped early, {} failed, {} cancelled)",
        view.id,
        view.state,
        view.trials_created,
        c.succeeded,
        c.early_stopped,
        c.failed,
        c.cancelled
    );
    if let Some(best) = &view.best_trial {
        let objective = best.objective.map(output::num).unwrap_or_else(|| "-".into());
        line.push_str(&format!(
            "; best trial {} {} {} ({}, job {})",
            best.trial,
            view.objective_metric,
            objective,
            best.params_text(),
            best.job_id
        ));
    }
    if !view.error.is_empty() {
        line.push_str(&format!("; {}", view.error));
    }
    line
}

fn print_list(format: Format, response: &v1::ListSweepsResponse) {
    let views: Vec<SweepView> = response.sweeps.iter().map(SweepView::new).collect();
    if format == Format::Json {
        output::json(&serde_json::json!({ "sweeps": views, "next_page_token": response.next_page_token }));
        return;
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let best = v
                .best_trial
                .as_ref()
                .map(|b| format!("{} (trial {})", b.objective.map(output::num).unwrap_or_else(|| "-".into()), b.trial))
                .unwrap_or_else(|| "-".into());
            vec![
                v.id.clone(),
                v.name.clone(),
                v.algorithm.clone(),
                v.state.clone(),
                format!("{}/{}", v.finished(), v.trial_budget),
                format!("{} {}", v.objective_direction, v.objective_metric),
                best,
                v.created_at.clone(),
            ]
        })
        .collect();
    output::table(&["ID", "NAME", "ALGORITHM", "STATE", "TRIALS", "OBJECTIVE", "BEST FINISHED", "CREATED"], &rows);
    if !response.next_page_token.is_empty() {
        println!("more: --page-token {}", response.next_page_token);
    }
    println!("{BEST_MEANS}");
}

fn print_status(view: &SweepView) {
    println!(
        "sweep {} {:?}: {} ({}), {} {}",
        view.id, view.name, view.state, view.algorithm, view.objective_direction, view.objective_metric
    );
    let c = &view.counts;
    println!(
        "trials: {} of {} created; {} queued, {} running, {} succeeded, {} stopped early, {} failed ({} diverged), {} cancelled; at most {} at once",
        view.trials_created,
        view.trial_budget,
        c.queued,
        c.running,
        c.succeeded,
        c.early_stopped,
        c.failed,
        c.diverged,
        c.cancelled,
        view.max_concurrent_trials
    );
    if let Some(max_steps) = view.max_steps {
        let rungs: Vec<String> = view.rung_steps.iter().map(u64::to_string).collect();
        println!("rungs:  steps {} of {max_steps}", rungs.join(", "));
    }
    if !view.error.is_empty() {
        println!("error:  {}", view.error);
    }
    println!();
    let rows: Vec<Vec<String>> = view
        .leaderboard
        .iter()
        .map(|t| {
            vec![
                t.rank.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                t.trial.to_string(),
                t.job_id.clone(),
                t.params_text(),
                t.objective.map(output::num).unwrap_or_else(|| "-".into()),
                t.status.clone(),
                format!("{}/{}", t.step, t.total_steps),
            ]
        })
        .collect();
    output::table(&["RANK", "TRIAL", "JOB", "PARAMETERS", "OBJECTIVE", "STATE", "STEPS"], &rows);
    if let Some(best) = &view.best_trial {
        println!("best finished trial: {} ({BEST_MEANS_SHORT})", best.trial);
    }
}

/// What "best" means wherever a sweep's best trial is shown (the CLI, the
/// dashboard and `sweep best` agree): the best-ranked trial that finished
/// with an adapter. The leaderboard ranks every trial by its latest value,
/// running ones included, so its first row may still be running.
const BEST_MEANS: &str =
    "BEST FINISHED: the best-ranked trial that finished with an adapter; `sweep status` ranks running trials too, by their latest value";
const BEST_MEANS_SHORT: &str = "the best-ranked trial with an adapter; RANK also ranks running trials by their latest value";

/// The trials as CSV: one column per searched parameter path.
fn csv(trials: &[TrialView]) -> String {
    let mut paths: Vec<String> = trials
        .iter()
        .filter_map(|t| t.params.as_object())
        .flat_map(|p| p.keys().cloned())
        .collect();
    paths.sort();
    paths.dedup();
    let mut header: Vec<String> =
        ["rank", "trial", "job_id", "state", "status", "objective", "objective_step", "step", "total_steps"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    header.extend(paths.iter().cloned());
    header.extend(["failure_reason", "adapter_sha256", "error"].iter().map(|s| s.to_string()));
    let mut out = csv_line(&header);
    for t in trials {
        let mut row = vec![
            t.rank.map(|r| r.to_string()).unwrap_or_default(),
            t.trial.to_string(),
            t.job_id.clone(),
            t.state.clone(),
            t.status.clone(),
            t.objective.map(|o| o.to_string()).unwrap_or_default(),
            t.objective_step.map(|s| s.to_string()).unwrap_or_default(),
            t.step.to_string(),
            t.total_steps.to_string(),
        ];
        row.extend(paths.iter().map(|p| t.params.get(p).map(value_text).unwrap_or_default()));
        row.push(t.failure_reason.clone().unwrap_or_default());
        row.push(t.adapter_sha256.clone());
        row.push(t.error.clone());
        out.push_str(&csv_line(&row));
    }
    out
}

/// One RFC 4180 line: fields with commas, quotes or line breaks are quoted.
fn csv_line(fields: &[String]) -> String {
    let quoted: Vec<String> = fields
        .iter()
        .map(|f| {
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f.clone()
            }
        })
        .collect();
    quoted.join(",") + "\n"
}

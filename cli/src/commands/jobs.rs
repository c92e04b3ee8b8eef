//! `ptune jobs ...`: list, inspect, follow and cancel jobs.

use std::time::Duration;

use anyhow::anyhow;
use clap::Subcommand;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use ptune_core::{JobState, Method};
use ptune_proto::v1::{
    self, job_event::Event, job_service_client::JobServiceClient, CancelJobRequest, GetJobRequest,
    GetMetricsRequest, ListJobsRequest, WatchJobRequest,
};
use ptune_proto::client::AuthChannel;

use super::status_error;
use crate::output;
use crate::view::{
    attempts_line, headline, headline_metric, job_state, latest, memory_line, state_name, JobView, MetricView,
};
use crate::Format;

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// Only jobs in this state (repeatable): queued, running, succeeded, failed, cancelled.
        #[arg(long = "state")]
        states: Vec<JobState>,
        /// Only jobs on this base model.
        #[arg(long)]
        model: Option<String>,
        /// Only jobs with this method.
        #[arg(long)]
        method: Option<Method>,
        /// Only jobs whose name starts with this text.
        #[arg(long)]
        name: Option<String>,
        /// Only jobs of this owner.
        #[arg(long)]
        owner: Option<String>,
        /// Only the trials of this sweep.
        #[arg(long)]
        sweep: Option<String>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue from a previous listing's next page token.
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Show one job.
    Get { id: String },
    /// Follow a job live until it finishes; exits 0 only if it succeeded.
    Watch { id: String },
    /// Wait quietly until a job finishes; exits 0 only if it succeeded.
    Wait {
        id: String,
        /// Give up after this many seconds (exit 3).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Cancel a job.
    Cancel { id: String },
    /// Every recorded metric of a job.
    Metrics {
        id: String,
        /// Only "train" or "eval" metrics.
        #[arg(long)]
        kind: Option<String>,
    },
}

pub async fn run(mut client: JobServiceClient<AuthChannel>, format: Format, cmd: JobsCommand) -> anyhow::Result<i32> {
    match cmd {
        JobsCommand::List { states, model, method, name, owner, sweep, limit, page_token } => {
            let request = ListJobsRequest {
                states: states.into_iter().map(|s| v1::JobState::from(s) as i32).collect(),
                base_model: model.unwrap_or_default(),
                method: method.map(|m| v1::Method::from(m) as i32).unwrap_or_default(),
                name_prefix: name.unwrap_or_default(),
                owner: owner.unwrap_or_default(),
                page_size: limit,
                page_token: page_token.unwrap_or_default(),
                sweep_id: sweep.unwrap_or_default(),
            };
            let response = client.list_jobs(request).await.map_err(status_error)?.into_inner();
            print_list(format, &response);
            Ok(0)
        }
        JobsCommand::Get { id } => {
            let job = get(&mut client, &id).await?;
            match format {
                Format::Json => output::json(&JobView::new(&job, true)),
                Format::Text => print_job(&job),
            }
            Ok(0)
        }
        JobsCommand::Watch { id } => follow(&mut client, format, &id).await,
        JobsCommand::Wait { id, timeout } => {
            let waiting = wait(&mut client, &id);
            let job = match timeout {
                Some(secs) => match tokio::time::timeout(Duration::from_secs(secs), waiting).await {
                    Ok(job) => job?,
                    Err(_) => {
                        eprintln!("job {id} did not finish within {secs} s");
                        return Ok(3);
                    }
                },
                None => waiting.await?,
            };
            finish(format, &job)
        }
        JobsCommand::Cancel { id } => {
            let job = client.cancel_job(CancelJobRequest { job_id: id }).await.map_err(status_error)?.into_inner();
            match format {
                Format::Json => output::json(&JobView::new(&job, false)),
                Format::Text if job.cancel_requested => {
                    println!("cancellation of job {} requested; it stops at its next step", job.id)
                }
                Format::Text => println!("job {} is {}", job.id, state_name(job.state)),
            }
            Ok(0)
        }
        JobsCommand::Metrics { id, kind } => {
            let request = GetMetricsRequest { job_id: id, kind: kind.unwrap_or_default() };
            let metrics = client.get_metrics(request).await.map_err(status_error)?.into_inner().metrics;
            match format {
                Format::Json => output::json(&metrics.iter().map(MetricView::from).collect::<Vec<_>>()),
                Format::Text => {
                    let rows: Vec<Vec<String>> = metrics
                        .iter()
                        .map(|m| vec![m.step.to_string(), m.kind.clone(), m.name.clone(), output::num(m.value)])
                        .collect();
                    output::table(&["STEP", "KIND", "NAME", "VALUE"], &rows);
                }
            }
            Ok(0)
        }
    }
}

async fn get(client: &mut JobServiceClient<AuthChannel>, id: &str) -> anyhow::Result<v1::Job> {
    Ok(client.get_job(GetJobRequest { job_id: id.to_string() }).await.map_err(status_error)?.into_inner())
}

fn print_list(format: Format, response: &v1::ListJobsResponse) {
    if format == Format::Json {
        let jobs: Vec<JobView> = response.jobs.iter().map(|j| JobView::new(j, false)).collect();
        output::json(&serde_json::json!({ "jobs": jobs, "next_page_token": response.next_page_token }));
        return;
    }
    let rows: Vec<Vec<String>> = response
        .jobs
        .iter()
        .map(|job| {
            let view = JobView::new(job, false);
            let eval = headline(job).unwrap_or_else(|| "-".into());
            vec![
                view.id,
                view.name,
                view.state,
                view.method,
                view.base_model,
                format!("{}/{}", view.step, view.total_steps),
                eval,
                view.created_at,
            ]
        })
        .collect();
    output::table(&["ID", "NAME", "STATE", "METHOD", "BASE MODEL", "STEP", "EVAL", "CREATED"], &rows);
    if !response.next_page_token.is_empty() {
        println!("more: --page-token {}", response.next_page_token);
    }
}

fn print_job(job: &v1::Job) {
    let view = JobView::new(job, true);
    println!("id:          {}", view.id);
    println!("name:        {}", view.name);
    let note = match (view.cancel_requested, view.early_stopped) {
        (true, _) => " (cancel requested)",
        (false, true) => " (stopped early by its sweep)",
        _ => "",
    };
    println!("state:       {}{note}", view.state);
    if !view.waiting_reason.is_empty() {
        println!("waiting:     {}", view.waiting_reason);
    }
    if let (Some(sweep), Some(trial)) = (&view.sweep_id, view.trial_index) {
        println!("sweep:       {sweep} (trial {trial})");
    }
    println!("method:      {}", view.method);
    println!("base model:  {}", view.base_model);
    println!("owner:       {}", view.owner);
    println!("step:        {}/{}", view.step, view.total_steps);
    println!("attempts:    {}", attempts_line(&view));
    if !view.retry_at.is_empty() {
        println!("retry at:    {}", view.retry_at);
    }
    if !view.worker_id.is_empty() {
        println!("worker:      {}", view.worker_id);
    }
    if !view.devices.is_empty() {
        println!("devices:     {}", view.devices.join(", "));
    }
    println!("created:     {}", view.created_at);
    if !view.started_at.is_empty() {
        println!("started:     {}", view.started_at);
    }
    if !view.finished_at.is_empty() {
        println!("finished:    {}", view.finished_at);
    }
    if !view.error.is_empty() {
        println!("error:       {}", view.error);
    }
    if !view.adapter_sha256.is_empty() {
        println!("adapter:     sha256 {} ({} bytes)", view.adapter_sha256, view.adapter_size_bytes);
    }
    if let Some(memory) = memory_line(&view) {
        println!("memory:      {memory}");
    }
    for m in &view.metrics {
        println!("metric:      {:<5} {:<20} {:>12}  (step {})", m.kind, m.name, output::num(m.value), m.step);
    }
}

/// Streams a job's events until it finishes, retrying the stream if the
/// coordinator restarts, and returns its final snapshot.
async fn stream_until_done(
    client: &mut JobServiceClient<AuthChannel>,
    id: &str,
    mut on_event: impl FnMut(&Event),
) -> anyhow::Result<v1::Job> {
    let mut last: Option<v1::Job> = None;
    loop {
        match client.watch_job(WatchJobRequest { job_id: id.to_string() }).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                while let Some(item) = stream.next().await {
                    let Ok(event) = item else { break };
                    let Some(event) = event.event else { continue };
                    on_event(&event);
                    if let Event::Job(job) = &event {
                        last = Some(job.clone());
                    }
                }
            }
            Err(status) if matches!(status.code(), tonic::Code::NotFound | tonic::Code::InvalidArgument) => {
                return Err(status_error(status));
            }
            Err(_) => {}
        }
        if let Some(job) = &last {
            if job_state(job).is_some_and(JobState::is_terminal) {
                return Ok(job.clone());
            }
        }
        // The stream ended early (coordinator restart): reconnect after a short pause.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(job) = get(client, id).await {
            if job_state(&job).is_some_and(JobState::is_terminal) {
                return Ok(job);
            }
        }
    }
}

async fn wait(client: &mut JobServiceClient<AuthChannel>, id: &str) -> anyhow::Result<v1::Job> {
    stream_until_done(client, id, |_| {}).await
}

/// `jobs watch`: a live progress bar (text) or one JSON event per line.
pub async fn follow(client: &mut JobServiceClient<AuthChannel>, format: Format, id: &str) -> anyhow::Result<i32> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}")
            .expect("valid template"),
    );
    let mut loss = None;
    let mut eval = String::new();
    let mut headline_name = ("accuracy", "acc");
    let job = stream_until_done(client, id, |event| match format {
        Format::Json => output::json_line(&event_json(event)),
        Format::Text => match event {
            Event::Job(job) => {
                bar.set_length(job.total_steps);
                bar.set_position(job.step);
                bar.set_message(state_name(job.state));
                if let Some(headline) = headline(job) {
                    eval = format!("eval {headline}");
                }
                headline_name = headline_metric(job);
            }
            Event::Progress(p) => {
                bar.set_length(p.total_steps);
                bar.set_position(p.step);
            }
            Event::Metrics(batch) => {
                for m in &batch.metrics {
                    match (m.kind.as_str(), m.name.as_str()) {
                        ("train", "loss") => loss = Some(m.value),
                        ("eval", name) if name == headline_name.0 => {
                            eval = format!("eval {} {:.4}", headline_name.1, m.value)
                        }
                        _ => {}
                    }
                }
                let loss = loss.map(|l| format!("loss {l:.4}")).unwrap_or_default();
                bar.set_message(format!("{loss}  {eval}"));
            }
        },
    })
    .await?;
    bar.finish_and_clear();
    finish(format, &job)
}

fn event_json(event: &Event) -> serde_json::Value {
    match event {
        Event::Job(job) => serde_json::json!({ "job": JobView::new(job, false) }),
        Event::Progress(p) => serde_json::json!({ "progress": { "step": p.step, "total_steps": p.total_steps } }),
        Event::Metrics(batch) => {
            serde_json::json!({ "metrics": batch.metrics.iter().map(MetricView::from).collect::<Vec<_>>() })
        }
    }
}

/// Prints a finished job's outcome; exit code 0 only for success.
fn finish(format: Format, job: &v1::Job) -> anyhow::Result<i32> {
    let state = job_state(job).ok_or_else(|| anyhow!("job {} has an unknown state", job.id))?;
    match format {
        Format::Json => output::json(&JobView::new(job, false)),
        Format::Text => {
            let mut line = format!("job {} {}", job.id, state);
            let (name, _) = headline_metric(job);
            if let Some(value) = latest(job, "eval", name) {
                line.push_str(&format!("; eval {name} {value:.4}"));
            }
            if !job.error.is_empty() {
                line.push_str(&format!("; {}", job.error));
            }
            println!("{line}");
        }
    }
    Ok(if state == JobState::Succeeded { 0 } else { 1 })
}

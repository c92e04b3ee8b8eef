//! `ptune submit` of many specs: TOML files and JSON Lines files of specs
//! are read, each local dataset they name is uploaded once, and the specs
//! go to `SubmitJobs` in batches of up to [`BATCH`]. One line per spec, in
//! order: where it came from, and its job id or why it was refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use ptune_core::JobSpec;
use ptune_proto::client::AuthChannel;
use ptune_proto::v1::{self, job_service_client::JobServiceClient, SubmitJobsRequest};
use serde::Serialize;

use super::{is_jsonl, upload_referenced};
use crate::commands::status_error;
use crate::output;
use crate::Format;

/// Specs per `SubmitJobs` call (the coordinator's limit).
const BATCH: usize = 10_000;

/// One spec and where it was read.
struct Source {
    origin: String,
    /// Its dataset paths are relative to this file's folder.
    file: PathBuf,
    spec: JobSpec,
}

/// What became of one spec.
#[derive(Serialize)]
struct Outcome {
    source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Refusal>,
}

#[derive(Serialize)]
struct Refusal {
    code: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    field: String,
    message: String,
}

pub async fn run(
    mut client: JobServiceClient<AuthChannel>,
    format: Format,
    files: &[PathBuf],
    all_or_nothing: bool,
) -> anyhow::Result<i32> {
    let mut sources = Vec::new();
    for file in files {
        sources.extend(read(file)?);
    }
    if all_or_nothing && sources.len() > BATCH {
        bail!("--all-or-nothing holds for one call of at most {BATCH} specs; {} were given", sources.len());
    }
    // Each local dataset once, whatever number of specs name it.
    let mut uploaded: HashMap<PathBuf, String> = HashMap::new();
    for source in &mut sources {
        let base = source.file.parent().unwrap_or(Path::new(".")).to_path_buf();
        for field in ["data.train", "data.eval"] {
            let value = if field == "data.train" { &mut source.spec.data.train } else { &mut source.spec.data.eval };
            if value.starts_with("sha256:") {
                continue;
            }
            let path =
                if Path::new(value.as_str()).is_absolute() { PathBuf::from(&*value) } else { base.join(&*value) };
            let reference = match uploaded.get(&path) {
                Some(reference) => reference.clone(),
                None => {
                    let reference =
                        upload_referenced(&mut client, format, Path::new(""), field, &path.display().to_string())
                            .await?;
                    uploaded.insert(path, reference.clone());
                    reference
                }
            };
            *value = reference;
        }
    }
    let mut outcomes = Vec::with_capacity(sources.len());
    for batch in sources.chunks(BATCH) {
        let specs = batch.iter().map(|s| v1::JobSpec::from(&s.spec)).collect();
        let reply =
            client.submit_jobs(SubmitJobsRequest { specs, all_or_nothing }).await.map_err(status_error)?.into_inner();
        if reply.results.len() != batch.len() {
            bail!("the coordinator answered {} results for {} specs", reply.results.len(), batch.len());
        }
        for (source, result) in batch.iter().zip(reply.results) {
            outcomes.push(Outcome {
                source: source.origin.clone(),
                job_id: (!result.job_id.is_empty()).then_some(result.job_id),
                error: result.error.map(|e| Refusal { code: e.code, field: e.field, message: e.message }),
            });
        }
    }
    let refused = outcomes.iter().filter(|o| o.job_id.is_none()).count();
    match format {
        Format::Json => output::json(&outcomes),
        Format::Text => {
            for outcome in &outcomes {
                match (&outcome.job_id, &outcome.error) {
                    (Some(id), _) => println!("{}\t{id}", outcome.source),
                    (None, Some(e)) if e.field.is_empty() => println!("{}\trefused: {}", outcome.source, e.message),
                    (None, Some(e)) => println!("{}\trefused: {}: {}", outcome.source, e.field, e.message),
                    (None, None) => println!("{}\trefused", outcome.source),
                }
            }
            eprintln!("submitted {} of {} jobs", outcomes.len() - refused, outcomes.len());
        }
    }
    Ok(if refused == 0 { 0 } else { 1 })
}

/// The specs of one file: a TOML spec, or one JSON spec per non-empty
/// line of a `.jsonl` file (`FILE:LINE` names each).
fn read(file: &Path) -> anyhow::Result<Vec<Source>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read job specs {}", file.display()))?;
    if !is_jsonl(file) {
        let spec = JobSpec::from_toml(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
        return Ok(vec![Source { origin: file.display().to_string(), file: file.to_path_buf(), spec }]);
    }
    let mut sources = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let origin = format!("{}:{}", file.display(), i + 1);
        let spec: JobSpec = serde_json::from_str(line).map_err(|e| anyhow!("{origin}: {e}"))?;
        sources.push(Source { origin, file: file.to_path_buf(), spec });
    }
    if sources.is_empty() {
        bail!("{}: holds no spec", file.display());
    }
    Ok(sources)
}

//! `ptune submit FILE...`: upload the datasets the specs reference, then
//! submit them: one TOML spec with `SubmitJob`, anything more (several
//! files, JSON Lines files of specs) in batches with `SubmitJobs`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use ptune_core::JobSpec;
use ptune_proto::v1::{self, job_service_client::JobServiceClient, DatasetChunk, SubmitJobRequest};
use tokio::io::AsyncReadExt;
use ptune_proto::client::AuthChannel;

use super::{jobs, status_error};
use crate::output;
use crate::view::JobView;
use crate::Format;

mod batch;

const CHUNK: usize = 1 << 20;

pub async fn run(
    client: JobServiceClient<AuthChannel>,
    format: Format,
    files: &[PathBuf],
    watch: bool,
    all_or_nothing: bool,
) -> anyhow::Result<i32> {
    match files {
        [file] if !is_jsonl(file) && !all_or_nothing => run_one(client, format, file, watch).await,
        _ if watch => Err(anyhow!("--watch follows one job: give one TOML spec")),
        _ => batch::run(client, format, files, all_or_nothing).await,
    }
}

fn is_jsonl(file: &Path) -> bool {
    file.extension().is_some_and(|e| e == "jsonl")
}

async fn run_one(mut client: JobServiceClient<AuthChannel>, format: Format, file: &Path, watch: bool) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read job spec {}", file.display()))?;
    let mut spec = JobSpec::from_toml(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    spec.data.train = upload_referenced(&mut client, format, base, "data.train", &spec.data.train).await?;
    spec.data.eval = upload_referenced(&mut client, format, base, "data.eval", &spec.data.eval).await?;
    // The owner is the token's name: the coordinator sets it.
    let response = client
        .submit_job(SubmitJobRequest { spec: Some(v1::JobSpec::from(&spec)) })
        .await
        .map_err(status_error)?
        .into_inner();
    let job = response.job.ok_or_else(|| anyhow!("coordinator returned no job"))?;
    match format {
        Format::Json => output::json(&JobView::new(&job, true)),
        Format::Text => {
            eprintln!("submitted job {:?} ({} on {})", spec.name, spec.method, spec.base_model);
            println!("{}", job.id);
        }
    }
    if watch {
        return jobs::follow(&mut client, format, &job.id).await;
    }
    Ok(0)
}

/// Uploads a local dataset named in the spec and returns its `sha256:` reference.
/// A value that is already a reference is kept as it is.
pub(crate) async fn upload_referenced(
    client: &mut JobServiceClient<AuthChannel>,
    format: Format,
    base: &Path,
    field: &str,
    value: &str,
) -> anyhow::Result<String> {
    if value.starts_with("sha256:") {
        return Ok(value.to_string());
    }
    if value.trim().is_empty() {
        return Err(anyhow!("{field}: must name a JSON Lines file"));
    }
    let path: PathBuf = if Path::new(value).is_absolute() { value.into() } else { base.join(value) };
    let mut reader = tokio::fs::File::open(&path)
        .await
        .with_context(|| format!("{field}: cannot open dataset {}", path.display()))?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let (tx, rx) = tokio::sync::mpsc::channel::<DatasetChunk>(4);
    let reading = tokio::spawn(async move {
        let mut first = true;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            buf.truncate(n);
            let name = if first { file_name.clone() } else { String::new() };
            first = false;
            if tx.send(DatasetChunk { file_name: name, data: buf }).await.is_err() {
                return Ok(());
            }
        }
    });
    let info = client
        .upload_dataset(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow!("{field}: upload of {} failed: {}", path.display(), status_error(s)))?
        .into_inner();
    reading.await?.with_context(|| format!("{field}: cannot read {}", path.display()))?;
    if format == Format::Text {
        eprintln!("uploaded {} ({} lines, {} bytes) as {}", path.display(), info.lines, info.size_bytes, info.reference);
    }
    Ok(info.reference)
}

//! `ptune adapter get ID -o DIR`: download and unpack a trained adapter.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use futures::StreamExt;
use ptune_proto::v1::{job_service_client::JobServiceClient, DownloadAdapterRequest};
use sha2::{Digest, Sha256};
use ptune_proto::client::AuthChannel;

use super::status_error;
use crate::output;
use crate::Format;

#[derive(Debug, Subcommand)]
pub enum AdapterCommand {
    /// Download a succeeded job's adapter as a Hugging Face PEFT folder.
    Get {
        id: String,
        /// Folder to write adapter_config.json and adapter_model.safetensors into.
        #[arg(short, long)]
        out: PathBuf,
    },
}

pub async fn run(mut client: JobServiceClient<AuthChannel>, format: Format, cmd: AdapterCommand) -> anyhow::Result<i32> {
    let AdapterCommand::Get { id, out } = cmd;
    let saved = download(&mut client, &id, &out).await?;
    match format {
        Format::Json => output::json(&serde_json::json!({
            "job_id": id, "dir": out.display().to_string(), "sha256": saved.sha256,
            "size_bytes": saved.size_bytes, "files": saved.files,
        })),
        Format::Text => println!("adapter of job {id} written to {} ({})", out.display(), saved.files.join(", ")),
    }
    Ok(0)
}

/// An adapter written to a folder.
pub(crate) struct Saved {
    pub sha256: String,
    pub size_bytes: u64,
    pub files: Vec<String>,
}

/// Downloads a succeeded job's adapter, checks its sha256 and unpacks it into `out`.
pub(crate) async fn download(client: &mut JobServiceClient<AuthChannel>, id: &str, out: &Path) -> anyhow::Result<Saved> {
    let mut stream = client
        .download_adapter(DownloadAdapterRequest { job_id: id.to_string() })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut expected_sha = String::new();
    let mut total = 0u64;
    let mut archive = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(status_error)?;
        if !chunk.sha256.is_empty() {
            expected_sha = chunk.sha256;
            total = chunk.total_size;
            archive.reserve(total as usize);
        }
        archive.extend_from_slice(&chunk.data);
    }
    let actual = hex::encode(Sha256::digest(&archive));
    if archive.len() as u64 != total || actual != expected_sha {
        bail!("adapter download of job {id} is corrupt: got {} bytes with sha256 {actual}, expected {total} bytes with sha256 {expected_sha}", archive.len());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut files = Vec::new();
    let mut tar = tar::Archive::new(archive.as_slice());
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        if path.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            return Err(anyhow!("adapter archive holds an unsafe path {}", path.display()));
        }
        entry.unpack(out.join(&path))?;
        files.push(path.display().to_string());
    }
    Ok(Saved { sha256: actual, size_bytes: total, files })
}

//! Datasets are fetched from the coordinator by reference and cached on disk,
//! so a worker never needs a path that only the client's machine has.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use futures::StreamExt;
use ptune_proto::v1::{worker_service_client::WorkerServiceClient, DownloadDatasetRequest};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;

/// A dataset on local disk and the file name it was uploaded under.
pub struct LocalDataset {
    pub path: PathBuf,
    pub file_name: String,
}

/// Returns the local copy of a dataset, downloading it on first use. The
/// content is checked against its sha256 before it is used.
pub async fn fetch(
    client: &mut WorkerServiceClient<Channel>,
    reference: &str,
    work_dir: &Path,
) -> anyhow::Result<LocalDataset> {
    let Some(hex_digest) = reference.strip_prefix("sha256:") else {
        bail!("dataset reference {reference:?} is not of the form sha256:<hex>");
    };
    if hex_digest.len() != 64 || !hex_digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("dataset reference {reference:?} is not of the form sha256:<64 hex digits>");
    }
    let dir = work_dir.join("datasets");
    tokio::fs::create_dir_all(&dir).await?;
    let path = dir.join(format!("{hex_digest}.jsonl"));
    let name_path = dir.join(format!("{hex_digest}.name"));
    if path.exists() {
        let file_name = std::fs::read_to_string(&name_path).unwrap_or_else(|_| reference.to_string());
        return Ok(LocalDataset { path, file_name });
    }
    let mut file_name = String::new();
    let partial = dir.join(format!("{hex_digest}.{}.partial", std::process::id()));
    let mut file = tokio::fs::File::create(&partial).await?;
    let mut hasher = Sha256::new();
    let mut stream = client
        .download_dataset(DownloadDatasetRequest { reference: reference.to_string() })
        .await
        .with_context(|| format!("cannot download dataset {reference}"))?
        .into_inner();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("download of dataset {reference} broke off"))?;
        if file_name.is_empty() && !chunk.file_name.is_empty() {
            file_name = chunk.file_name.clone();
        }
        hasher.update(&chunk.data);
        file.write_all(&chunk.data).await?;
    }
    file.flush().await?;
    drop(file);
    let actual = hex::encode(hasher.finalize());
    if actual != hex_digest {
        let _ = tokio::fs::remove_file(&partial).await;
        bail!("dataset {reference} arrived corrupt (sha256 {actual})");
    }
    if file_name.is_empty() {
        file_name = reference.to_string();
    }
    tokio::fs::write(&name_path, &file_name).await?;
    tokio::fs::rename(&partial, &path).await?;
    Ok(LocalDataset { path, file_name })
}

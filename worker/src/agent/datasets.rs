//! Datasets are fetched from the coordinator by reference and cached on disk,
//! so a worker never needs a path that only the client's machine has.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

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

/// One lock per dataset digest: the jobs of a pack often start together on
/// the same data, and only the first of them downloads it.
fn download_lock(hex_digest: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    locks.entry(hex_digest.to_string()).or_default().clone()
}

/// A name for a partial download that no other download, in this process
/// or another one sharing the work directory, writes to.
fn partial_name(hex_digest: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{hex_digest}.{}-{}.partial", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Returns the local copy of a dataset, downloading it on first use. The
/// content is checked against its sha256 before it is used. Concurrent
/// calls for the same dataset download it once.
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
    let lock = download_lock(hex_digest);
    let _downloading = lock.lock().await;
    if path.exists() {
        let file_name = std::fs::read_to_string(&name_path).unwrap_or_else(|_| reference.to_string());
        return Ok(LocalDataset { path, file_name });
    }
    let partial = dir.join(partial_name(hex_digest));
    let downloaded = download(client, reference, &partial).await;
    let (mut file_name, actual) = match downloaded {
        Ok(done) => done,
        Err(err) => {
            // A download that broke off leaves nothing behind.
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(err);
        }
    };
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

/// Streams dataset `reference` into `partial`: the file name it was
/// uploaded under (empty if none came) and the content's sha256.
async fn download(
    client: &mut WorkerServiceClient<Channel>,
    reference: &str,
    partial: &Path,
) -> anyhow::Result<(String, String)> {
    let mut file = tokio::fs::File::create(partial).await?;
    let mut file_name = String::new();
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
    Ok((file_name, hex::encode(hasher.finalize())))
}

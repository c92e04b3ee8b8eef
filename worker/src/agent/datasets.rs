//! Datasets are fetched from the coordinator by reference and cached on disk,
//! so a worker never needs a path that only the client's machine has. A
//! cached copy is checked against its sha256 every time a job is about to
//! use it, and fetched again when it does not match (a disk that flipped
//! bits, a file someone edited). A download the coordinator cannot serve
//! right now is retried until it can, or until the job is stopped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use ptune_proto::v1::{self, DownloadDatasetRequest};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::warn;

use super::archive;
use super::client::{is_transient, Coordinators, CALL_TIMEOUT};
use super::leases::Directive;
use crate::engine::Control;

/// How long a download may wait for its next chunk.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
/// Downloads that arrive corrupt before the job fails.
const CORRUPT_TRIES: u32 = 3;

/// A dataset on local disk and the file name it was uploaded under.
pub struct LocalDataset {
    pub path: PathBuf,
    pub file_name: String,
}

/// Why a dataset could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The local disk refused the write (full, read-only, failing).
    #[error("cannot store dataset {reference}: {source}")]
    Disk { reference: String, source: std::io::Error },
    /// The reference is malformed or the coordinator does not have it.
    #[error("{0}")]
    Missing(String),
    /// Every download arrived corrupt, or the coordinator refused it.
    #[error("{0}")]
    Failed(String),
    /// The job was stopped while waiting for the coordinator.
    #[error("stopped while fetching dataset {0}")]
    Stopped(String),
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

/// Returns the local copy of a dataset, downloading it when it is not
/// cached or the cached copy does not hash to its reference. Concurrent
/// calls for the same dataset download it once. Transport failures are
/// retried until `directive` stops the job.
pub async fn fetch(
    coordinators: &Coordinators,
    reference: &str,
    lease: &v1::Lease,
    work_dir: &Path,
    directive: &Directive,
) -> Result<LocalDataset, FetchError> {
    let Some(hex_digest) = reference.strip_prefix("sha256:") else {
        return Err(FetchError::Missing(format!("dataset reference {reference:?} is not of the form sha256:<hex>")));
    };
    if hex_digest.len() != 64 || !hex_digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(FetchError::Missing(format!(
            "dataset reference {reference:?} is not of the form sha256:<64 lowercase hex digits>"
        )));
    }
    let disk = |source| FetchError::Disk { reference: reference.to_string(), source };
    let dir = work_dir.join("datasets");
    tokio::fs::create_dir_all(&dir).await.map_err(disk)?;
    let path = dir.join(format!("{hex_digest}.jsonl"));
    let name_path = dir.join(format!("{hex_digest}.name"));
    let lock = download_lock(hex_digest);
    let _downloading = lock.lock().await;
    if path.exists() {
        let cached = path.clone();
        let digest = tokio::task::spawn_blocking(move || archive::digest(&cached)).await.ok().and_then(Result::ok);
        match digest {
            Some((actual, _)) if actual == hex_digest => {
                let file_name = std::fs::read_to_string(&name_path).unwrap_or_else(|_| reference.to_string());
                return Ok(LocalDataset { path, file_name });
            }
            other => {
                warn!(dataset = %reference, found = ?other.map(|(sha, _)| sha), "cached dataset does not match its sha256; fetching it again");
                let _ = tokio::fs::remove_file(&path).await;
            }
        }
    }
    let mut delay = Duration::from_millis(200);
    let mut corrupt = 0;
    let (file_name, partial) = loop {
        if matches!(directive.control(), Control::Stop | Control::Suspend) {
            return Err(FetchError::Stopped(reference.to_string()));
        }
        let partial = dir.join(partial_name(hex_digest));
        let downloaded = download(coordinators, reference, lease, &partial).await;
        match downloaded {
            Ok((file_name, actual)) if actual == hex_digest => break (file_name, partial),
            Ok((_, actual)) => {
                let _ = tokio::fs::remove_file(&partial).await;
                corrupt += 1;
                if corrupt >= CORRUPT_TRIES {
                    return Err(FetchError::Failed(format!("dataset {reference} arrived corrupt {corrupt} times (sha256 {actual})")));
                }
                warn!(dataset = %reference, sha256 = %actual, "dataset arrived corrupt; fetching it again");
            }
            Err(Attempt::Disk(e)) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(disk(e));
            }
            Err(Attempt::Refused(status)) => {
                let _ = tokio::fs::remove_file(&partial).await;
                if status.code() == tonic::Code::NotFound || status.code() == tonic::Code::InvalidArgument {
                    return Err(FetchError::Missing(format!("dataset {reference}: {}", status.message())));
                }
                if !is_transient(&status) {
                    return Err(FetchError::Failed(format!("cannot download dataset {reference}: {}", status.message())));
                }
                warn!(dataset = %reference, error = %status.message(), "dataset download failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };
    let file_name = if file_name.is_empty() { reference.to_string() } else { file_name };
    crate::durable::write(&name_path, file_name.as_bytes()).map_err(disk)?;
    crate::durable::rename(&partial, &path).map_err(disk)?;
    Ok(LocalDataset { path, file_name })
}

/// Why one download attempt failed.
enum Attempt {
    Disk(std::io::Error),
    Refused(tonic::Status),
}

/// Streams dataset `reference` into `partial`: the file name it was
/// uploaded under (empty if none came) and the content's sha256.
async fn download(
    coordinators: &Coordinators,
    reference: &str,
    lease: &v1::Lease,
    partial: &Path,
) -> Result<(String, String), Attempt> {
    crate::faults::check_write().map_err(Attempt::Disk)?;
    let mut file = tokio::fs::File::create(partial).await.map_err(Attempt::Disk)?;
    let request = DownloadDatasetRequest {
        reference: reference.to_string(),
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        lease_token: lease.lease_token.clone(),
    };
    let mut stream = coordinators
        .call(CALL_TIMEOUT, move |mut c| {
            let request = request.clone();
            async move { c.download_dataset(request).await.map(|r| r.into_inner()) }
        })
        .await
        .map_err(Attempt::Refused)?;
    let mut file_name = String::new();
    let mut hasher = Sha256::new();
    let mut first = true;
    loop {
        let chunk = match tokio::time::timeout(CHUNK_TIMEOUT, stream.next()).await {
            Err(_) => return Err(Attempt::Refused(tonic::Status::deadline_exceeded("dataset download stalled"))),
            Ok(None) => break,
            Ok(Some(chunk)) => chunk.map_err(Attempt::Refused)?,
        };
        if file_name.is_empty() && !chunk.file_name.is_empty() {
            file_name = chunk.file_name.clone();
        }
        hasher.update(&chunk.data);
        crate::faults::check_write().map_err(Attempt::Disk)?;
        file.write_all(&chunk.data).await.map_err(Attempt::Disk)?;
        if first {
            first = false;
            let _ = crate::faults::at(crate::faults::Point::Download, reference, 0);
        }
    }
    file.flush().await.map_err(Attempt::Disk)?;
    file.sync_all().await.map_err(Attempt::Disk)?;
    Ok((file_name, hex::encode(hasher.finalize())))
}

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
        /// Folder to write adapter_config.json and adapter_model.safetensors into (replaced if it exists).
        #[arg(short, long)]
        out: PathBuf,
        /// Largest archive accepted, in bytes.
        #[arg(long, default_value_t = DEFAULT_MAX_BYTES)]
        max_bytes: u64,
    },
}

pub async fn run(mut client: JobServiceClient<AuthChannel>, format: Format, cmd: AdapterCommand) -> anyhow::Result<i32> {
    let AdapterCommand::Get { id, out, max_bytes } = cmd;
    let saved = download(&mut client, &id, &out, max_bytes).await?;
    let note = load_note(&out);
    match format {
        Format::Json => output::json(&serde_json::json!({
            "job_id": id, "dir": out.display().to_string(), "sha256": saved.sha256,
            "size_bytes": saved.size_bytes, "files": saved.files, "load_note": note,
        })),
        Format::Text => {
            println!("adapter of job {id} written to {} ({})", out.display(), saved.files.join(", "));
            if let Some(note) = note {
                eprintln!("{note}");
            }
        }
    }
    Ok(0)
}

/// A one-line note when a plain `PeftModel.from_pretrained` of the export in
/// `dir` would not reproduce the trained model, naming the loader that does
/// (`ptune.hf.load` of the Python package); `None` when it would, or when the
/// folder has no readable `ptune.json`.
pub(crate) fn load_note(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("ptune.json")).ok()?;
    let provenance: serde_json::Value = serde_json::from_str(&text).ok()?;
    let spec = &provenance["spec"];
    let (task, method) = (spec["task"].as_str()?, spec["method"].as_str()?);
    let mut reasons = Vec::new();
    if task == "sequence_classification" && spec["head"]["pooling"].as_str() == Some("mean") {
        reasons.push("its head reads the mean of the tokens");
    }
    if task != "causal_lm" && matches!(method, "prefix_tuning" | "p_tuning_v2") {
        reasons.push("PEFT runs no prefixes on encoders under transformers 5");
    }
    if task == "token_classification" && matches!(method, "prompt_tuning" | "p_tuning") {
        reasons.push("PEFT returns the virtual tokens' logits too");
    }
    if reasons.is_empty() {
        return None;
    }
    Some(format!(
        "note: a plain PeftModel.from_pretrained does not reproduce this model ({}); load it with ptune.hf.load({:?}, BASE_MODEL_DIR) from the Python package (pip install ./python)",
        reasons.join("; "),
        dir.display().to_string()
    ))
}

/// An adapter written to a folder.
pub(crate) struct Saved {
    pub sha256: String,
    pub size_bytes: u64,
    pub files: Vec<String>,
}

/// The largest adapter archive `ptune adapter get` accepts unless told otherwise.
pub const DEFAULT_MAX_BYTES: u64 = 4 << 30;

/// Downloads a succeeded job's adapter, checks its sha256 and unpacks it
/// into `out` (replacing what is there). The archive streams to a
/// temporary file beside `out` (nothing is sized by what the server
/// announces), and is unpacked into a temporary folder that takes `out`'s
/// place only once every entry was accepted: plain files with plain names,
/// at most `max_bytes` in all; links, devices, folders, absolute paths and
/// `..` are refused.
pub(crate) async fn download(
    client: &mut JobServiceClient<AuthChannel>,
    id: &str,
    out: &Path,
    max_bytes: u64,
) -> anyhow::Result<Saved> {
    use tokio::io::AsyncWriteExt;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
    let unique = format!("{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    let archive_path = parent.join(format!(".{name}.{unique}.tar"));
    let staging = parent.join(format!(".{name}.{unique}.unpacking"));
    let cleanup = |paths: &[&Path]| {
        for p in paths {
            let _ = std::fs::remove_file(p);
            let _ = std::fs::remove_dir_all(p);
        }
    };

    let mut stream = client
        .download_adapter(DownloadAdapterRequest { job_id: id.to_string() })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut file = tokio::fs::File::create(&archive_path)
        .await
        .with_context(|| format!("cannot write {}", archive_path.display()))?;
    let mut hasher = Sha256::new();
    let (mut expected_sha, mut announced, mut received) = (String::new(), 0u64, 0u64);
    let streamed: anyhow::Result<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(status_error)?;
            if !chunk.sha256.is_empty() {
                expected_sha = chunk.sha256;
                announced = chunk.total_size;
                if announced > max_bytes {
                    bail!("the adapter of job {id} is {announced} bytes, more than --max-bytes {max_bytes}");
                }
            }
            received += chunk.data.len() as u64;
            if received > max_bytes || (announced > 0 && received > announced) {
                bail!("the adapter download of job {id} sent more than it announced ({announced} bytes, at most {max_bytes})");
            }
            hasher.update(&chunk.data);
            file.write_all(&chunk.data).await?;
        }
        file.flush().await?;
        Ok(())
    }
    .await;
    drop(file);
    if let Err(e) = streamed {
        cleanup(&[&archive_path]);
        return Err(e);
    }
    let actual = hex::encode(hasher.finalize());
    if received != announced || actual != expected_sha {
        cleanup(&[&archive_path]);
        bail!("adapter download of job {id} is corrupt: got {received} bytes with sha256 {actual}, expected {announced} bytes with sha256 {expected_sha}");
    }
    let unpacked = std::fs::File::open(&archive_path)
        .map_err(anyhow::Error::from)
        .and_then(|f| Ok(ptune_core::archive::unpack_plain_files(f, &staging, max_bytes)?));
    cleanup(&[&archive_path]);
    let files = match unpacked {
        Ok(files) => files,
        Err(e) => {
            cleanup(&[&staging]);
            return Err(anyhow!("refusing the adapter archive of job {id}: {e:#}"));
        }
    };
    // Into place: what was at `out` goes only once the new folder is whole.
    let old = parent.join(format!(".{name}.{unique}.replaced"));
    if out.exists() {
        std::fs::rename(out, &old).with_context(|| format!("cannot replace {}", out.display()))?;
    }
    if let Err(e) = std::fs::rename(&staging, out) {
        let _ = std::fs::rename(&old, out);
        cleanup(&[&staging]);
        return Err(e).with_context(|| format!("cannot write {}", out.display()));
    }
    cleanup(&[&old]);
    Ok(Saved { sha256: actual, size_bytes: received, files })
}

#[cfg(test)]
mod tests {
    use super::load_note;

    fn export(spec: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ptune.json"), serde_json::json!({ "spec": spec }).to_string()).unwrap();
        dir
    }

    #[test]
    fn the_note_names_the_loader_only_where_peft_alone_differs() {
        let mean = export(serde_json::json!({
            "task": "sequence_classification", "method": "prompt_tuning", "head": { "pooling": "mean" },
        }));
        let note = load_note(mean.path()).expect("mean pooling needs the loader");
        assert!(note.contains("mean of the tokens") && note.contains("ptune.hf.load("), "{note}");
        let cls = export(serde_json::json!({ "task": "sequence_classification", "method": "lora" }));
        assert_eq!(load_note(cls.path()), None);
        let prefix = export(serde_json::json!({ "task": "token_classification", "method": "p_tuning_v2" }));
        assert!(load_note(prefix.path()).unwrap().contains("prefixes"));
        assert_eq!(load_note(tempfile::tempdir().unwrap().path()), None, "no ptune.json, no note");
    }
}

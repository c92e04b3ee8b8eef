//! The CLI's config file, `~/.config/ptune/config.toml` (or under
//! `$XDG_CONFIG_HOME`), written by `ptune login` with mode 0600: the
//! coordinator's address, the token, and the CA of an `https://`
//! coordinator. Flags and environment variables win over it.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use ptune_proto::client::ClientOptions;
use ptune_proto::v1::{self, job_service_client::JobServiceClient};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Saved {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

/// Where the config file is: `$PTUNE_CONFIG`, else under the XDG config folder.
pub fn path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PTUNE_CONFIG") {
        return Some(PathBuf::from(path));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("ptune").join("config.toml"))
}

/// The saved settings (none when there is no file).
pub fn load() -> anyhow::Result<Saved> {
    let Some(path) = path() else { return Ok(Saved::default()) };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("{} is not a valid config file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Saved::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// `ptune login`: checks the token against the coordinator, then saves both.
pub async fn login(url: &str, mut options: ClientOptions, with_token: Option<String>, ca_cert: Option<PathBuf>) -> anyhow::Result<i32> {
    let token = match with_token.or(options.token.take()) {
        Some(token) => token,
        None => {
            eprintln!("paste the token (ptk_...) and press enter:");
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            line.trim().to_string()
        }
    };
    anyhow::ensure!(!token.is_empty(), "no token given");
    options.token = Some(token.clone());
    let channel = ptune_proto::client::connect(url, &options).await?;
    // Any authenticated call tells whether the token is good; a viewer or admin may list workers, a
    // submitter its jobs, a worker token is refused for both.
    let mut jobs = JobServiceClient::new(channel);
    let check = jobs.list_jobs(v1::ListJobsRequest { page_size: 1, ..Default::default() }).await;
    if let Err(status) = check {
        anyhow::bail!("the coordinator refused the token: {}", status.message());
    }
    let path = path().context("no HOME or XDG_CONFIG_HOME to keep the config file in; set PTUNE_CONFIG")?;
    let saved = Saved { coordinator: Some(url.to_string()), token: Some(token), ca_cert };
    write_private(&path, toml::to_string(&saved)?.as_bytes())?;
    println!("logged in to {url}; saved in {}", path.display());
    Ok(0)
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // An existing file keeps its mode on open: make it private too.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    Ok(())
}

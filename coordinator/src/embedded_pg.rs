//! A private PostgreSQL cluster under the coordinator's data directory, for a
//! single-machine user who has no database to point at. It uses the server
//! binaries installed on the machine (`initdb`, `pg_ctl`), listens on a Unix
//! socket inside the data directory only (no TCP port to collide with), in a
//! folder only the server's user may enter (mode 0700: other local users
//! cannot reach it), accepts only the coordinator's own operating-system
//! user (peer authentication, written into `pg_hba.conf` at every start, so
//! clusters made by earlier versions with `trust` are closed too), and is
//! stopped when the coordinator shuts down. A `--database-url` replaces it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context};
use tokio::process::Command;
use tracing::info;

/// A running private cluster.
pub struct EmbeddedPostgres {
    data_dir: PathBuf,
    socket_dir: PathBuf,
    run_as: Option<String>,
    pg_ctl: PathBuf,
}

impl EmbeddedPostgres {
    /// Initialises the cluster on first use, then starts it.
    pub async fn start(data_dir: &Path) -> anyhow::Result<Self> {
        let bin_dir = find_bin_dir().context(
            "no PostgreSQL server binaries found (looked for initdb in /usr/lib/postgresql/*/bin and PATH); \
             install PostgreSQL or pass --database-url",
        )?;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
        let root = std::fs::canonicalize(data_dir)?;
        let cluster = root.join("pg");
        let socket_dir = root.join("pg-socket");
        std::fs::create_dir_all(&socket_dir)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o700))?;
        }
        // initdb refuses to run as root: run the server as the `postgres` user then.
        let run_as = if nix::unistd::geteuid().is_root() { Some("postgres".to_string()) } else { None };
        let this = Self { data_dir: cluster.clone(), socket_dir, run_as, pg_ctl: bin_dir.join("pg_ctl") };
        if let Some(user) = &this.run_as {
            chown_to(user, &root).await?;
        }
        if !cluster.join("PG_VERSION").exists() {
            info!(data_dir = %cluster.display(), "initialising embedded postgres cluster");
            let initdb = bin_dir.join("initdb");
            let status = this
                .command(&initdb)
                .args(["-D", &cluster.to_string_lossy(), "-U", "postgres", "--auth-local=peer", "--auth-host=reject", "-E", "UTF8"])
                .stdout(Stdio::null())
                .status()
                .await
                .context("cannot run initdb")?;
            if !status.success() {
                bail!("initdb failed for {}", cluster.display());
            }
        }
        this.stop_stale().await;
        this.allow_only_the_coordinator(&cluster)?;
        let options = format!("-c listen_addresses='' -c unix_socket_directories='{}'", this.socket_dir.display());
        let log = root.join("postgres.log");
        let status = this
            .command(&this.pg_ctl)
            .args(["start", "-w", "-t", "60", "-D", &cluster.to_string_lossy(), "-l", &log.to_string_lossy()])
            .args(["-o", &options])
            .stdout(Stdio::null())
            .status()
            .await
            .context("cannot run pg_ctl start")?;
        if !status.success() {
            bail!("embedded postgres did not start; see {}", log.display());
        }
        info!(data_dir = %cluster.display(), socket_dir = %this.socket_dir.display(),
              "embedded postgres started (pass --database-url to use a shared server instead)");
        Ok(this)
    }

    /// Connection URL over the cluster's Unix socket.
    pub fn url(&self) -> String {
        format!("postgres://postgres@localhost/postgres?host={}", self.socket_dir.display())
    }

    /// Whether a cluster under `data_dir` is running now (a coordinator's).
    pub fn running(data_dir: &Path) -> bool {
        data_dir.join("pg").join("postmaster.pid").exists() && data_dir.join("pg-socket").join(".s.PGSQL.5432").exists()
    }

    /// Connection URL of the cluster under `data_dir`.
    pub fn url_for(data_dir: &Path) -> anyhow::Result<String> {
        let socket_dir = std::fs::canonicalize(data_dir)?.join("pg-socket");
        Ok(format!("postgres://postgres@localhost/postgres?host={}", socket_dir.display()))
    }

    /// Stops the cluster (fast shutdown: open sessions are closed, data is flushed).
    pub async fn stop(self) {
        let status = self
            .command(&self.pg_ctl)
            .args(["stop", "-w", "-m", "fast", "-D", &self.data_dir.to_string_lossy()])
            .stdout(Stdio::null())
            .status()
            .await;
        match status {
            Ok(s) if s.success() => info!("embedded postgres stopped"),
            other => tracing::warn!(result = ?other, "embedded postgres did not stop cleanly"),
        }
    }

    /// Writes `pg_hba.conf` and `pg_ident.conf` so that the server accepts
    /// connections over its socket only from the operating-system user the
    /// coordinator runs as (and the server's own), as database user
    /// `postgres`; nothing else.
    fn allow_only_the_coordinator(&self, cluster: &Path) -> anyhow::Result<()> {
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .context("cannot find the name of the user the coordinator runs as")?;
        let server = self.run_as.clone().unwrap_or_else(|| me.clone());
        let hba = "# Written by ptune-coordinator at every start; edits are replaced.\n\
                   # Only the coordinator's operating-system user, over the socket, as postgres.\n\
                   local all postgres peer map=ptune\n";
        let ident = format!(
            "# Written by ptune-coordinator at every start; edits are replaced.\nptune {me} postgres\nptune {server} postgres\n"
        );
        for (name, text) in [("pg_hba.conf", hba.to_string()), ("pg_ident.conf", ident)] {
            let path = cluster.join(name);
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
            if let Some(user) = &self.run_as {
                let user = nix::unistd::User::from_name(user).ok().flatten().context("the server's user is gone")?;
                nix::unistd::chown(&path, Some(user.uid), Some(user.gid))?;
            }
        }
        Ok(())
    }

    /// A server left running by a killed coordinator still holds the cluster: stop it first.
    async fn stop_stale(&self) {
        if self.data_dir.join("postmaster.pid").exists() {
            let _ = self
                .command(&self.pg_ctl)
                .args(["stop", "-w", "-m", "fast", "-D", &self.data_dir.to_string_lossy()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
        }
    }

    fn command(&self, program: &Path) -> Command {
        match &self.run_as {
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", user, "--"]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }
}

async fn chown_to(user: &str, dir: &Path) -> anyhow::Result<()> {
    let status = Command::new("chown")
        .args(["-R", &format!("{user}:{user}")])
        .arg(dir)
        .status()
        .await
        .context("cannot run chown")?;
    if !status.success() {
        bail!("cannot give {} to user {user}", dir.display());
    }
    Ok(())
}

fn find_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some(newest) = versions.pop() {
        return Some(newest);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists())
}

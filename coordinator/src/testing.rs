//! Test support for this crate and for integration tests of other crates.

use anyhow::Context;

use crate::auth::Role;
use crate::store::{admin, Store};

/// What a worker registers for all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M
/// parameters), served under `name`.
pub fn minilm_model(name: &str) -> ptune_proto::v1::BaseModel {
    ptune_proto::v1::BaseModel {
        name: name.into(),
        model_type: "bert".into(),
        max_positions: 512,
        hidden_size: 384,
        num_layers: 6,
        num_attention_heads: 12,
        parameters: 22_713_216,
        ..Default::default()
    }
}

/// A binary classification job on `dataset` (training and evaluation) for
/// the base model "tiny-bert" (register it with [`minilm_model`]): prompt
/// tuning with 20 virtual tokens, or another method without PEFT settings.
pub fn tiny_spec(name: &str, dataset: &str, method: ptune_proto::v1::Method) -> ptune_proto::v1::JobSpec {
    use ptune_proto::v1;
    let prompt = method == v1::Method::PromptTuning;
    v1::JobSpec {
        name: name.into(),
        base_model: "tiny-bert".into(),
        task: v1::Task::SequenceClassification as i32,
        method: method as i32,
        peft: prompt.then(|| v1::PeftConfig { num_virtual_tokens: Some(20), ..Default::default() }),
        data: Some(v1::DataConfig {
            train: dataset.into(),
            eval: dataset.into(),
            labels: vec!["0".into(), "1".into()],
            max_seq_len: 64,
            ..Default::default()
        }),
        training: Some(v1::TrainingConfig {
            learning_rate: if prompt { 0.03 } else { 0.0001 },
            batch_size: 2,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A token of `role` named `name` on the database at `database_url` (its
/// migrations applied first).
pub async fn create_token(database_url: &str, role: Role, name: &str) -> anyhow::Result<String> {
    let store = Store::connect(database_url).await?;
    store.migrate().await?;
    let (_, token) = store.create_token(name, role, None, "test").await?;
    store.close().await;
    Ok(token)
}

/// One token of each role, as most tests need them.
#[derive(Clone, Debug)]
pub struct TestTokens {
    pub admin: String,
    pub submitter: String,
    pub viewer: String,
    pub worker: String,
}

impl TestTokens {
    /// Creates `admin`, `submitter` (named "tester"), `viewer` and `worker` tokens.
    pub async fn create(database_url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            admin: create_token(database_url, Role::Admin, "admin").await?,
            submitter: create_token(database_url, Role::Submitter, "tester").await?,
            viewer: create_token(database_url, Role::Viewer, "viewer").await?,
            worker: create_token(database_url, Role::Worker, "worker").await?,
        })
    }
}

/// A lazily connected channel to `url` whose calls carry `token`.
pub fn channel(url: &str, token: &str) -> ptune_proto::client::AuthChannel {
    let options = ptune_proto::client::ClientOptions { token: Some(token.to_string()), ..Default::default() };
    ptune_proto::client::channel(url, &options).expect("a valid address")
}

/// Server that test databases are created on, unless
/// `$PTUNE_TEST_DATABASE_URL` names another.
pub const DEFAULT_TEST_SERVER_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A fresh, uniquely named database, dropped (`WITH (FORCE)`, so open pools
/// do not keep it alive) when the guard is dropped.
pub struct TestDatabase {
    /// URL of the fresh database.
    pub url: String,
    name: String,
    server_url: String,
}

/// Creates a fresh database on the server at `$PTUNE_TEST_DATABASE_URL`
/// (default [`DEFAULT_TEST_SERVER_URL`]).
pub async fn fresh_database() -> anyhow::Result<TestDatabase> {
    let server_url = std::env::var("PTUNE_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_TEST_SERVER_URL.to_string());
    let name = format!("ptune_test_{}", uuid::Uuid::new_v4().simple());
    admin::create_database(&server_url, &name)
        .await
        .with_context(|| format!("creating a test database on {server_url}; set PTUNE_TEST_DATABASE_URL"))?;
    let url = with_database(&server_url, &name)?;
    Ok(TestDatabase { url, name, server_url })
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (server_url, name) = (self.server_url.clone(), self.name.clone());
        // Drop may run inside a runtime, which must not block on itself: use
        // a thread with its own runtime and wait for it.
        let dropped = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(admin::drop_database(&server_url, &name)).map_err(anyhow::Error::from)
        })
        .join();
        if let Ok(Err(e)) | Err(e) = dropped.map_err(|_| anyhow::anyhow!("drop thread panicked")) {
            eprintln!("dropping test database {} failed: {e:#}", self.name);
        }
    }
}

/// `url` with its database (path) replaced by `database`, keeping any query.
fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let scheme_end = url.find("://").context("database url must look like postgres://user@host:port/db")? + 3;
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_end = base[scheme_end..].find('/').map_or(base.len(), |i| scheme_end + i);
    Ok(format!("{}/{database}{query}", &base[..authority_end]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_database_of_a_url_is_replaced_and_its_query_kept() {
        let f = super::with_database;
        assert_eq!(f("postgres://u@h:5432/postgres", "x").unwrap(), "postgres://u@h:5432/x");
        assert_eq!(f("postgres://u@h", "x").unwrap(), "postgres://u@h/x");
        assert_eq!(f("postgres://u@h/db?sslmode=disable", "x").unwrap(), "postgres://u@h/x?sslmode=disable");
    }
}

/// A PostgreSQL cluster of a test's own, in a temporary folder: stopping it
/// never touches the machine's shared server. It listens on a Unix socket,
/// and on `127.0.0.1` too when [`PgSettings::port`] is given.
pub struct PrivatePostgres {
    data: std::path::PathBuf,
    socket: std::path::PathBuf,
    bin: std::path::PathBuf,
    run_as_postgres: bool,
    port: Option<u16>,
}

/// How a [`PrivatePostgres`] is set up besides its defaults.
#[derive(Clone, Debug, Default)]
pub struct PgSettings {
    /// Listen on `127.0.0.1:port` as well as the socket.
    pub port: Option<u16>,
    /// Lines appended to `postgresql.conf`.
    pub conf: Vec<String>,
    /// `pg_hba.conf` in place of initdb's (trust for everyone).
    pub hba: Option<String>,
    /// Files copied into the cluster's folder (e.g. TLS certificates),
    /// readable by the server only.
    pub files: Vec<(String, Vec<u8>)>,
}

impl PrivatePostgres {
    /// A cluster on a Unix socket under `dir`, started.
    pub fn start(dir: &std::path::Path) -> Self {
        Self::start_with(dir, PgSettings::default())
    }

    /// A cluster under `dir` set up with `settings`, started.
    pub fn start_with(dir: &std::path::Path, settings: PgSettings) -> Self {
        use std::process::{Command, Stdio};
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql")
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max()
            .expect("initdb");
        let root = dir.join("pg");
        let (data, socket) = (root.join("data"), root.join("socket"));
        std::fs::create_dir_all(&socket).unwrap();
        let run_as_postgres = nix::unistd::geteuid().is_root();
        let this = Self { data, socket, bin, run_as_postgres, port: settings.port };
        let chown = |path: &std::path::Path| {
            if run_as_postgres {
                assert!(Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status().unwrap().success());
            }
        };
        chown(&root);
        if run_as_postgres {
            // The postgres user must reach the folder.
            let mut up = root.clone();
            while let Some(parent) = up.parent() {
                let _ = Command::new("chmod").arg("o+x").arg(parent).status();
                up = parent.to_path_buf();
            }
        }
        let status = this
            .command("initdb")
            .args(["-D", &this.data.to_string_lossy(), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "initdb failed");
        for (name, bytes) in &settings.files {
            let path = this.data.join(name);
            std::fs::write(&path, bytes).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            chown(&path);
        }
        if !settings.conf.is_empty() {
            use std::io::Write;
            let mut conf = std::fs::OpenOptions::new().append(true).open(this.data.join("postgresql.conf")).unwrap();
            writeln!(conf, "\n{}", settings.conf.join("\n")).unwrap();
        }
        if let Some(hba) = &settings.hba {
            std::fs::write(this.data.join("pg_hba.conf"), hba).unwrap();
            chown(&this.data.join("pg_hba.conf"));
        }
        this.up();
        this
    }

    fn command(&self, program: &str) -> std::process::Command {
        let program = self.bin.join(program);
        if self.run_as_postgres {
            let mut cmd = std::process::Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(program);
            cmd
        } else {
            std::process::Command::new(program)
        }
    }

    /// The URL over the Unix socket.
    pub fn url(&self) -> String {
        format!("postgres://postgres@localhost/postgres?host={}", self.socket.display())
    }

    /// Starts the server (again).
    pub fn up(&self) {
        let listen = match self.port {
            Some(port) => format!("-c listen_addresses='127.0.0.1' -p {port}"),
            None => "-c listen_addresses=''".to_string(),
        };
        let options = format!("{listen} -c unix_socket_directories='{}' -c fsync=off", self.socket.display());
        let log = self.data.parent().unwrap().join("postgres.log");
        let status = self
            .command("pg_ctl")
            .args(["start", "-w", "-t", "60", "-D", &self.data.to_string_lossy(), "-l", &log.to_string_lossy(), "-o", &options])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "postgres did not start; see {}", log.display());
    }

    /// Stops the server in immediate mode: connections drop, no checkpoint.
    pub fn down_immediate(&self) {
        let status = self
            .command("pg_ctl")
            .args(["stop", "-w", "-m", "immediate", "-D", &self.data.to_string_lossy()])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "postgres did not stop");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["stop", "-w", "-m", "immediate", "-D", &self.data.to_string_lossy()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A `ptune-coordinator` process (the binary at `binary`, as tests and
/// benchmarks get it from `CARGO_BIN_EXE_ptune-coordinator`) on free local
/// ports, killed when dropped; it reads its own memory figures.
pub struct CoordinatorProcess {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT` of its gRPC server.
    pub url: String,
    /// Its HTTP server.
    pub http: std::net::SocketAddr,
}

impl CoordinatorProcess {
    /// Starts it on `database_url` with `args` and `envs` added.
    pub fn start(binary: &str, database_url: &str, args: &[&str], envs: &[(&str, &str)]) -> anyhow::Result<Self> {
        let port = || -> anyhow::Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
        let (grpc, http) = (port()?, port()?);
        let child = std::process::Command::new(binary)
            .args(["--database-url", database_url])
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}"), "--http-addr", &format!("127.0.0.1:{http}")])
            .args(args)
            .envs(envs.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting ptune-coordinator")?;
        Ok(Self { child, url: format!("http://127.0.0.1:{grpc}"), http: ([127, 0, 0, 1], http).into() })
    }

    /// Waits up to 20 s for its gRPC server to answer `token`'s calls.
    pub async fn wait_until_serving(&self, token: &str) -> anyhow::Result<()> {
        let mut jobs = ptune_proto::v1::job_service_client::JobServiceClient::new(channel(&self.url, token));
        for _ in 0..100 {
            let request = ptune_proto::v1::ListJobsRequest { page_size: 1, ..Default::default() };
            if jobs.list_jobs(request).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        anyhow::bail!("ptune-coordinator did not answer within 20 s")
    }

    /// Its process id, for readings of `/proc/PID` such as CPU time.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resets the process's peak resident memory to its current one.
    /// Returns the resident memory at the reset.
    pub fn reset_peak(&self) -> anyhow::Result<u64> {
        std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5").context("resetting VmHWM")?;
        self.status("VmRSS:")
    }

    /// Peak resident memory since the last reset (or the start), in bytes.
    pub fn peak(&self) -> anyhow::Result<u64> {
        self.status("VmHWM:")
    }

    /// CPU time the process used so far, in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.child.id())
    }

    /// A memory figure of `/proc/PID/status`, in bytes.
    fn status(&self, name: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("{name} missing"))?;
        let kib: u64 = line.split_whitespace().nth(1).context("no value")?.parse()?;
        Ok(kib * 1024)
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user and system) process `pid` used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces, in parentheses.
    let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> { Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?) };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    // In USER_HZ, 100 per second on Linux.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// An S3-compatible server (`moto_server`, from `$PTUNE_MOTO_SERVER` or
/// the `.venv-s3` that `scripts/test-blob-stores.sh` installs) on a free
/// local port, with one bucket; killed when dropped.
pub struct S3Server {
    child: std::process::Child,
    pub port: u16,
}

impl S3Server {
    /// Starts it, creates `bucket`, and sets the `AWS_*` variables of
    /// [`S3Server::envs`] in this process too, so that object stores opened
    /// here reach it.
    pub async fn start(bucket: &str) -> S3Server {
        let binary = std::env::var("PTUNE_MOTO_SERVER").map(std::path::PathBuf::from).unwrap_or_else(|_| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-s3/bin/moto_server")
        });
        assert!(binary.exists(), "{} is missing: run scripts/test-blob-stores.sh, which installs it", binary.display());
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = std::process::Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let server = S3Server { child, port };
        for (key, value) in server.envs() {
            std::env::set_var(key, value);
        }
        for _ in 0..300 {
            if server.create_bucket(bucket).await.is_ok() {
                return server;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("moto_server did not answer within 30 s");
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Creates a bucket with a plain HTTP PUT (the server checks no signature).
    async fn create_bucket(&self, name: &str) -> std::io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let request =
            format!("PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.port);
        stream.write_all(request.as_bytes()).await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") {
            Ok(())
        } else {
            Err(std::io::Error::other(answer))
        }
    }

    /// The variables that point the object_store crate's S3 client here.
    pub fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

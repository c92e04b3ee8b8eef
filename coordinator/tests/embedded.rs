//! The single-machine setup: `ptune-coordinator --data-dir DIR` with its
//! embedded PostgreSQL. The first start writes an admin token (mode 0600)
//! that works over gRPC; the database's socket folder is closed to other
//! local users (0700) and the server accepts only the coordinator's own
//! operating-system user as `postgres`; a SIGTERM stops both.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use ptune_proto::v1;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_database_admits_only_the_coordinator_and_the_first_admin_token_works() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("coordinator");
    let grpc = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ptune-coordinator"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}"), "--http-addr", &format!("127.0.0.1:{}", free_port())])
        .env_remove("PTUNE_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let token_file = data.join("admin.token");
    for _ in 0..600 {
        if std::fs::metadata(&token_file).is_ok_and(|m| m.len() > 0) {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the coordinator exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&token_file), 0o600, "the admin token is private");
    assert_eq!(mode(&data.join("pg-socket")), 0o700, "other local users cannot reach the database's socket");

    let token = std::fs::read_to_string(&token_file).unwrap();
    let url = format!("http://127.0.0.1:{grpc}");
    let mut jobs = v1::job_service_client::JobServiceClient::new(ptune_coordinator::testing::channel(&url, token.trim()));
    // The token is written before the coordinator serves: while it says it
    // is starting, ask again, as a client would.
    let mut listed = jobs.list_jobs(v1::ListJobsRequest::default()).await;
    for _ in 0..300 {
        match &listed {
            Err(status) if status.code() == tonic::Code::Unavailable && status.message().contains("is starting") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                listed = jobs.list_jobs(v1::ListJobsRequest::default()).await;
            }
            _ => break,
        }
    }
    assert!(listed.expect("the bootstrapped admin token works").into_inner().jobs.is_empty());

    let socket = data.join("pg-socket").canonicalize().unwrap();
    let as_role = |role: &str| format!("postgres://{role}@localhost/postgres?host={}", socket.display());
    let pool = sqlx::PgPool::connect(&as_role("postgres")).await.expect("the coordinator's user connects as postgres");
    let hba: Vec<String> =
        sqlx::query_scalar("SELECT auth_method FROM pg_hba_file_rules WHERE error IS NULL").fetch_all(&pool).await.unwrap();
    assert_eq!(hba, ["peer"], "peer authentication only: no trust, no TCP");
    pool.close().await;
    let other = sqlx::PgPool::connect(&as_role("intruder")).await.unwrap_err().to_string();
    assert!(other.contains("no pg_hba.conf entry"), "another role is refused: {other}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "a SIGTERM stops the coordinator cleanly: {status:?}");
    assert!(!data.join("pg").join("postmaster.pid").exists(), "and its database with it");
}

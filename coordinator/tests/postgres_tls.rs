//! PostgreSQL over TLS: a private cluster that accepts only encrypted TCP
//! connections, with a certificate made here. The coordinator reaches it
//! with `sslmode=verify-full` and its CA, every connection it holds is
//! encrypted, and clients that do not encrypt or do not trust the server's
//! certificate get nothing.

mod common;

use ptune_coordinator::auth::Role;
use ptune_coordinator::testing::{channel, create_token, PgSettings, PrivatePostgres};
use ptune_coordinator::{Config, Coordinator};
use ptune_proto::v1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_reaches_postgres_over_verified_tls_and_unencrypted_or_unverified_clients_are_refused() {
    let pki = common::pki();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let settings = PgSettings {
        port: Some(port),
        conf: vec!["ssl = on".into(), "ssl_cert_file = 'server.pem'".into(), "ssl_key_file = 'server.key'".into()],
        hba: Some(
            "local all all trust\nhostssl all postgres 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n".into(),
        ),
        files: vec![("server.pem".into(), read(&pki.server.0)), ("server.key".into(), read(&pki.server.1))],
    };
    let _postgres = PrivatePostgres::start_with(dir.path(), settings);
    let base = format!("postgres://postgres@localhost:{port}/postgres");
    let verified = format!("{base}?sslmode=verify-full&sslrootcert={}", pki.ca.display());

    let coordinator = Coordinator::start(Config::new(verified.clone())).await.expect("the coordinator starts over TLS");
    let token = create_token(&verified, Role::Admin, "admin").await.unwrap();
    let mut jobs = v1::job_service_client::JobServiceClient::new(channel(&format!("http://{}", coordinator.grpc_addr), &token));
    jobs.list_jobs(v1::ListJobsRequest::default()).await.expect("the coordinator serves from its TLS database");

    let pool = sqlx::PgPool::connect(&verified).await.unwrap();
    let (connections, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.backend_type = 'client backend' AND a.client_addr IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(connections >= 2, "the coordinator's pool and this one: {connections}");
    assert_eq!(encrypted, connections, "every TCP connection is encrypted");
    pool.close().await;

    let plain = sqlx::PgPool::connect(&format!("{base}?sslmode=disable")).await.unwrap_err().to_string();
    assert!(plain.contains("pg_hba.conf") && plain.contains("no encryption"), "{plain}");
    let untrusted = format!("{base}?sslmode=verify-full&sslrootcert={}", pki.stranger.0.display());
    let e = sqlx::PgPool::connect(&untrusted).await.unwrap_err().to_string();
    assert!(e.to_lowercase().contains("certificate") || e.to_lowercase().contains("issuer"), "{e}");
    coordinator.shutdown().await.unwrap();
}

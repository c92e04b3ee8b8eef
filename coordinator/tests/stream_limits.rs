//! Limits on what one caller holds open, on a real coordinator: `WatchJob`
//! streams and the dashboard's event streams count against one limit per
//! token and one in all, and an upload that stops sending is ended.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::TRAIN;
use futures::StreamExt;
use ptune_proto::v1;
use ptune_proto::v1::job_service_client::JobServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// Opens `/api/events` with `token` and reads until the answer's head and,
/// when accepted, the first event arrived; the open connection and what it read.
async fn open_events(addr: SocketAddr, token: &str) -> (tokio::net::TcpStream, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !(seen.contains("event: hello") || seen.contains("\"error\"")) {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "the connection closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    (stream, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_are_limited_per_token_and_in_all_and_a_stalled_upload_is_ended() {
    let mut env = common::start_with(Duration::from_secs(10), |c| {
        c.limits.streams_per_token = 2;
        c.limits.streams = 3;
        c.limits.upload_idle = Duration::from_secs(1);
    })
    .await;
    let url = format!("http://{}", env.coordinator.as_ref().unwrap().grpc_addr);
    let http = env.coordinator.as_ref().unwrap().http_addr;
    let spec = env.spec("watched").await;
    let job = env.submit(spec).await;
    let tokens = env.tokens.clone();
    let watch = async |token: &str| {
        let mut jobs = JobServiceClient::new(ptune_coordinator::testing::channel(&url, token));
        let mut stream = jobs.watch_job(v1::WatchJobRequest { job_id: job.id.clone() }).await?.into_inner();
        stream.message().await?;
        Ok::<_, tonic::Status>(stream)
    };

    let first = watch(&tokens.admin).await.expect("a first stream");
    let _second = watch(&tokens.admin).await.expect("a second stream");
    let e = watch(&tokens.admin).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-streams-per-token 2"), "{}", e.message());
    let (_events, seen) = open_events(http, &tokens.viewer).await;
    assert!(seen.starts_with("HTTP/1.1 200"), "the viewer's event stream opens: {seen}");
    let (_, refused) = open_events(http, &tokens.viewer).await;
    assert!(refused.starts_with("HTTP/1.1 429") && refused.contains("--max-streams 3"), "the total is reached: {refused}");
    let e = watch(&tokens.viewer).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "WatchJob and events share the total: {e:?}");

    drop(first);
    common::wait_until(10, || async { watch(&tokens.viewer).await.is_ok() }).await;

    // An upload that stops sending is ended, and nothing of it is kept.
    let mut jobs = JobServiceClient::new(ptune_coordinator::testing::channel(&url, &tokens.submitter));
    let first_chunk = v1::DatasetChunk { file_name: "stalled.jsonl".into(), data: TRAIN.as_bytes().to_vec() };
    let stalled = futures::stream::iter([first_chunk]).chain(futures::stream::pending());
    let e = jobs.upload_dataset(stalled).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("sent nothing for 1 s"), "{}", e.message());
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    common::wait_until(10, || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM blobs WHERE NOT complete").fetch_one(&pool).await.unwrap();
        left == 0
    })
    .await;
    pool.close().await;
    env.stop().await;
}

//! The standard gRPC health service, through a real health client: every
//! ptune service and the whole server report SERVING while the coordinator
//! runs, and a watcher hears NOT_SERVING as soon as shutdown begins (so load
//! balancers drain it before calls fail).

mod common;

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test]
async fn health_reports_serving_then_not_serving_when_shutdown_begins() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let coordinator = env.coordinator.take().unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", coordinator.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);

    for service in ["", "ptune.v1.JobService", "ptune.v1.WorkerService", "ptune.v1.SweepService"] {
        let reply = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "service {service:?}");
    }
    let unknown = health.check(HealthCheckRequest { service: "ptune.v1.NoSuchService".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut watch =
        health.watch(HealthCheckRequest { service: "ptune.v1.JobService".into() }).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    let shutdown = tokio::spawn(coordinator.shutdown());
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.expect("a status change");
    assert_eq!(next.unwrap().unwrap().status(), ServingStatus::NotServing);
    // The open watch would hold the graceful shutdown: close it, as a client that heard NOT_SERVING does.
    drop(watch);
    drop(health);
    tokio::time::timeout(Duration::from_secs(8), shutdown)
        .await
        .expect("shutdown finishes once watchers leave")
        .unwrap()
        .expect("graceful shutdown");
}

//! Who may call what, checked over the wire with TLS on (certificates made
//! here with rcgen): every method that reflection lists refuses a call
//! without a token; each role gets exactly the calls the role table gives
//! it; a submitter cannot see, cancel or download another owner's job; a
//! worker token cannot cancel or download, nor speak for a lease another
//! worker holds; revoked and expired tokens are refused at once; plaintext
//! clients, clients that do not trust the coordinator and, under mutual
//! TLS, clients without a certificate from the operator's CA get nothing;
//! and the HTTPS dashboard refuses what its roles do not allow.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{pki, Env, Pki, RawCodec, EVAL, MODEL, TRAIN};
use futures::StreamExt;
use prost::Message;
use ptune_coordinator::auth::Role;
use ptune_coordinator::config::TlsFiles;
use ptune_proto::client::{AuthChannel, ClientOptions};
use ptune_proto::v1;
use ptune_proto::v1::admin_service_client::AdminServiceClient;
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::sweep_service_client::SweepServiceClient;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tonic::Code;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

/// The role table as the roles are documented, written out here rather
/// than read from the code it checks: which roles may call each method.
fn allowed(path: &str) -> &'static [Role] {
    use Role::*;
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap();
    match (service, method) {
        ("grpc.health.v1.Health", _) => &[Admin, Submitter, Viewer, Worker],
        ("grpc.reflection.v1.ServerReflection", _) => &[Admin, Submitter, Viewer, Worker],
        ("ptune.v1.JobService", "SubmitJob" | "CancelJob" | "UploadDataset") => &[Admin, Submitter],
        ("ptune.v1.JobService", "GetJob" | "ListJobs" | "WatchJob" | "GetMetrics" | "DownloadAdapter") => {
            &[Admin, Submitter, Viewer]
        }
        ("ptune.v1.JobService", "ListWorkers") => &[Admin, Viewer],
        ("ptune.v1.SweepService", "CreateSweep" | "CancelSweep" | "ExtendSweep" | "UpdateSweep") => &[Admin, Submitter],
        ("ptune.v1.SweepService", "GetSweep" | "ListSweeps") => &[Admin, Submitter, Viewer],
        ("ptune.v1.WorkerService", _) => &[Admin, Worker],
        ("ptune.v1.AdminService", _) => &[Admin],
        _ => panic!("{path} is a method the role table does not know; add it to the table and to docs/security.md"),
    }
}

/// A coordinator with TLS on, its clients switched to `https://` with the
/// test CA.
async fn start_tls(pki: &Pki, client_ca: bool) -> Env {
    let files = TlsFiles {
        cert: pki.server.0.clone(),
        key: pki.server.1.clone(),
        client_ca: client_ca.then(|| pki.ca.clone()),
    };
    let mut env = common::start_with(Duration::from_secs(10), |c| c.tls = Some(files)).await;
    let url = grpc_url(&env);
    let client_cert = client_ca.then(|| pki.client.clone());
    env.jobs = JobServiceClient::new(tls_channel(&url, pki, Some(&env.tokens.admin), client_cert.clone()));
    env.sweeps = SweepServiceClient::new(tls_channel(&url, pki, Some(&env.tokens.admin), client_cert.clone()));
    env.workers = WorkerServiceClient::new(tls_channel(&url, pki, Some(&env.tokens.worker), client_cert));
    env
}

fn grpc_url(env: &Env) -> String {
    format!("https://localhost:{}", env.coordinator.as_ref().unwrap().grpc_addr.port())
}

fn tls_channel(url: &str, pki: &Pki, token: Option<&str>, client_cert: Option<(PathBuf, PathBuf)>) -> AuthChannel {
    let options = ClientOptions { token: token.map(str::to_string), ca_cert: Some(pki.ca.clone()), client_cert };
    ptune_proto::client::channel(url, &options).unwrap()
}

/// Calls `path` with one empty message and reads the first answer: `Ok`
/// when a message came (or a stream stayed open), else the status.
async fn call(channel: AuthChannel, path: &str) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    let path: http::uri::PathAndQuery = path.parse().unwrap();
    let answer = async {
        grpc.ready().await.map_err(|e| tonic::Status::unavailable(format!("not connected: {e}")))?;
        let request = tonic::Request::new(futures::stream::iter([Vec::<u8>::new()]));
        let mut stream = grpc.streaming(request, path, RawCodec).await?.into_inner();
        stream.message().await.map(|_| ())
    };
    tokio::time::timeout(Duration::from_secs(5), answer).await.unwrap_or(Ok(()))
}

/// Every method the coordinator's reflection service lists, as paths.
async fn reflected_methods(channel: AuthChannel) -> Vec<String> {
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = |request: MessageRequest| ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([ask(MessageRequest::ListServices(String::new()))]))
        .await
        .expect("reflection answers an admin")
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("reflection did not list the services")
    };
    let mut methods = Vec::new();
    for service in list.service {
        let requests = [ask(MessageRequest::FileContainingSymbol(service.name.clone()))];
        let mut answers =
            reflection.server_reflection_info(futures::stream::iter(requests)).await.unwrap().into_inner();
        let Some(MessageResponse::FileDescriptorResponse(files)) =
            answers.next().await.unwrap().unwrap().message_response
        else {
            panic!("reflection has no file for {}", service.name)
        };
        for bytes in files.file_descriptor_proto {
            let file = prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap();
            for s in &file.service {
                if format!("{}.{}", file.package(), s.name()) == service.name {
                    methods.extend(s.method.iter().map(|m| format!("/{}/{}", service.name, m.name())));
                }
            }
        }
    }
    methods.sort();
    methods.dedup();
    methods
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_every_method_refuses_a_missing_token_and_each_role_gets_exactly_its_calls() {
    let pki = pki();
    let env = start_tls(&pki, false).await;
    let url = grpc_url(&env);
    let tokens = env.tokens.clone();

    let listed = reflected_methods(tls_channel(&url, &pki, Some(&tokens.admin), None)).await;
    let services: BTreeSet<&str> =
        listed.iter().map(|m| m.trim_start_matches('/').split('/').next().unwrap()).collect();
    assert_eq!(
        services,
        BTreeSet::from([
            "grpc.reflection.v1.ServerReflection",
            "ptune.v1.AdminService",
            "ptune.v1.JobService",
            "ptune.v1.SweepService",
            "ptune.v1.WorkerService"
        ]),
        "reflection lists the four services and itself"
    );
    assert!(listed.len() >= 30, "reflection lists every method: {listed:?}");
    let paths = listed;

    for path in &paths {
        let refused = call(tls_channel(&url, &pki, None, None), path).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{path} without a token: {refused:?}");
        assert!(
            refused.message().contains("missing token") && refused.message().contains("needs a bearer token of role"),
            "{path}: the refusal names what is missing: {}",
            refused.message()
        );
    }
    let health = call(tls_channel(&url, &pki, None, None), "/grpc.health.v1.Health/Check").await;
    assert!(health.is_ok(), "health needs no token: {health:?}");
    let unknown = call(tls_channel(&url, &pki, None, None), "/ptune.v1.JobService/NoSuchMethod").await.unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated, "an unknown method is no way around the token");

    for (role, token) in [
        (Role::Admin, &tokens.admin),
        (Role::Submitter, &tokens.submitter),
        (Role::Viewer, &tokens.viewer),
        (Role::Worker, &tokens.worker),
    ] {
        for path in &paths {
            let answer = call(tls_channel(&url, &pki, Some(token), None), path).await;
            if allowed(path).contains(&role) {
                let code = answer.as_ref().err().map_or(Code::Ok, tonic::Status::code);
                assert!(
                    !matches!(code, Code::PermissionDenied | Code::Unauthenticated | Code::Internal | Code::Unknown),
                    "{role} may call {path}: {answer:?}"
                );
            } else {
                let refused = answer.expect_err(&format!("{role} may not call {path}"));
                assert_eq!(refused.code(), Code::PermissionDenied, "{role} calling {path}: {refused:?}");
                assert!(
                    refused.message().contains(&format!("has role {role}")) && refused.message().contains("needs role"),
                    "{role} calling {path}: the refusal names the role needed: {}",
                    refused.message()
                );
            }
        }
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_see_only_their_own_workers_speak_only_for_their_leases_and_revoked_or_expired_tokens_stop_at_once() {
    let pki = pki();
    let mut env = start_tls(&pki, false).await;
    let url = grpc_url(&env);
    let tokens = env.tokens.clone();
    let mut admin = AdminServiceClient::new(tls_channel(&url, &pki, Some(&tokens.admin), None));
    let mut create = async |name: &str, role: &str| {
        let request = v1::CreateTokenRequest { name: name.into(), role: role.into(), expires_in_days: 0 };
        admin.create_token(request).await.expect("an admin creates tokens").into_inner().token
    };
    let mallory = create("mallory", "submitter").await;
    let second_worker = create("worker-2", "worker").await;
    let temporary = create("temp-viewer", "viewer").await;
    let jobs_as = |token: &str| JobServiceClient::new(tls_channel(&url, &pki, Some(token), None));
    let (mut tester, mut intruder, mut viewer) =
        (jobs_as(&tokens.submitter), jobs_as(&mallory), jobs_as(&tokens.viewer));

    // tester submits; the job is tester's whatever the spec says.
    let chunk = |name: &str, data: &str| v1::DatasetChunk { file_name: name.into(), data: data.as_bytes().to_vec() };
    let train = tester.upload_dataset(futures::stream::iter([chunk("train.jsonl", TRAIN)])).await.unwrap().into_inner();
    let eval = tester.upload_dataset(futures::stream::iter([chunk("eval.jsonl", EVAL)])).await.unwrap().into_inner();
    let mut spec = common::spec("mine", &train.reference, &eval.reference);
    let refused = tester.submit_job(v1::SubmitJobRequest { spec: Some(spec.clone()) }).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "a spec naming another owner: {refused:?}");
    assert!(
        refused.message().contains("owner: \"alice\" is not this token's name \"tester\""),
        "{}",
        refused.message()
    );
    spec.owner.clear();
    let job = tester.submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await.unwrap().into_inner().job.unwrap();
    assert_eq!(job.spec.as_ref().unwrap().owner, "tester");
    let id = job.id.clone();

    // Another submitter cannot tell the job exists.
    let not_found = |r: Result<(), tonic::Status>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::NotFound, "{what}: {e:?}");
        assert!(e.message().contains(&id) && !e.message().contains("tester"), "{what}: {}", e.message());
    };
    not_found(intruder.get_job(v1::GetJobRequest { job_id: id.clone() }).await.map(|_| ()), "get");
    not_found(intruder.cancel_job(v1::CancelJobRequest { job_id: id.clone() }).await.map(|_| ()), "cancel");
    not_found(
        intruder.get_metrics(v1::GetMetricsRequest { job_id: id.clone(), kind: String::new() }).await.map(|_| ()),
        "metrics",
    );
    not_found(
        intruder.download_adapter(v1::DownloadAdapterRequest { job_id: id.clone() }).await.map(|_| ()),
        "download",
    );
    let watched = match intruder.watch_job(v1::WatchJobRequest { job_id: id.clone() }).await {
        Ok(stream) => stream.into_inner().message().await.map(|_| ()),
        Err(e) => Err(e),
    };
    not_found(watched, "watch");
    let listed = intruder.list_jobs(v1::ListJobsRequest::default()).await.unwrap().into_inner();
    assert!(listed.jobs.is_empty(), "mallory lists none of tester's jobs: {:?}", listed.jobs);
    let asked = v1::ListJobsRequest { owner: "tester".into(), ..Default::default() };
    assert!(intruder.list_jobs(asked).await.unwrap().into_inner().jobs.is_empty(), "nor by asking for tester's");
    let definition = serde_json::json!({
        "name": "tester-sweep", "objective": { "metric": "accuracy", "direction": "maximize" },
        "algorithm": { "type": "grid" },
        "template": { "base_model": MODEL, "task": "sequence_classification", "method": "prompt_tuning",
            "data": { "train": train.reference, "eval": eval.reference, "labels": ["0", "1"] },
            "training": { "learning_rate": 0.01, "max_steps": 4 } },
        "space": { "training.learning_rate": { "values": [0.01] } },
    });
    let mut tester_sweeps = SweepServiceClient::new(tls_channel(&url, &pki, Some(&tokens.submitter), None));
    let sweep = tester_sweeps
        .create_sweep(v1::CreateSweepRequest { definition_json: definition.to_string() })
        .await
        .unwrap()
        .into_inner();
    let mut intruder_sweeps = SweepServiceClient::new(tls_channel(&url, &pki, Some(&mallory), None));
    let e = intruder_sweeps.get_sweep(v1::GetSweepRequest { sweep_id: sweep.id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "another owner's sweep: {e:?}");
    let e = intruder_sweeps.cancel_sweep(v1::CancelSweepRequest { sweep_id: sweep.id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "cancelling another owner's sweep: {e:?}");
    assert!(intruder_sweeps
        .list_sweeps(v1::ListSweepsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sweeps
        .is_empty());

    // A viewer reads everything and changes nothing.
    assert_eq!(
        viewer.get_job(v1::GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner().spec.unwrap().owner,
        "tester"
    );
    let e = viewer.cancel_job(v1::CancelJobRequest { job_id: id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // A worker token neither cancels nor downloads, even a job it could name.
    let mut worker_jobs = jobs_as(&tokens.worker);
    let e = worker_jobs.cancel_job(v1::CancelJobRequest { job_id: id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = worker_jobs.download_adapter(v1::DownloadAdapterRequest { job_id: id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Workers: the lease holder speaks for its lease, no one else does.
    let holder = env.register().await;
    let mut lease = None;
    while lease.as_ref().is_none_or(|l: &v1::Lease| l.job_id != id) {
        lease = Some(env.lease(&holder).await.expect("the queued jobs are leased"));
    }
    let lease = lease.unwrap();
    let mut other = WorkerServiceClient::new(tls_channel(&url, &pki, Some(&second_worker), None));
    let e =
        other.heartbeat(v1::HeartbeatRequest { worker_id: holder.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "a heartbeat for another token's worker: {e:?}");
    let e = other
        .lease_job(v1::LeaseJobRequest { worker_id: holder.clone(), free_slots: 1, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "leasing as another token's worker: {e:?}");
    let forged = v1::Lease { lease_token: "plt_guessed".into(), ..lease.clone() };
    let parts = env.complete_parts(&forged, b"forged adapter");
    let e = other.complete_job(futures::stream::iter(parts)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "completing a lease without its token: {e:?}");
    let progress = v1::ReportProgressRequest {
        job_id: id.clone(),
        epoch: lease.epoch,
        step: 1,
        total_steps: 4,
        metrics: vec![],
        lease_token: String::new(),
    };
    let e = other.report_progress(progress).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::PermissionDenied | Code::InvalidArgument),
        "progress without the lease token: {e:?}"
    );
    let failure = v1::FailJobRequest {
        job_id: id.clone(),
        epoch: lease.epoch,
        error: "forged".into(),
        lease_token: "plt_x".into(),
        ..Default::default()
    };
    let e = other.fail_job(failure).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "failing another worker's lease: {e:?}");
    assert_eq!(common::state(&env.get(&id).await), v1::JobState::Running, "the forged calls changed nothing");
    env.complete(&lease, b"the real adapter").await.expect("the holder completes");
    let mut download =
        tester.download_adapter(v1::DownloadAdapterRequest { job_id: id.clone() }).await.unwrap().into_inner();
    let mut adapter = Vec::new();
    while let Some(chunk) = download.message().await.unwrap() {
        adapter.extend(chunk.data);
    }
    assert_eq!(adapter, b"the real adapter");

    // A revoked token is refused from the next call on; so is an expired one.
    let mut temp = jobs_as(&temporary);
    temp.list_jobs(v1::ListJobsRequest::default()).await.expect("a fresh token works");
    admin.revoke_token(v1::RevokeTokenRequest { token: "temp-viewer".into() }).await.unwrap();
    let e = temp.list_jobs(v1::ListJobsRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("token revoked at"), "{}", e.message());
    let store = ptune_coordinator::store::Store::connect(&env.db.url).await.unwrap();
    let soon = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let (_, short_lived) = store.create_token("short-lived", Role::Viewer, Some(soon), "test").await.unwrap();
    let mut short = jobs_as(&short_lived);
    short.list_jobs(v1::ListJobsRequest::default()).await.expect("before it expires");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let e = short.list_jobs(v1::ListJobsRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("token expired at"), "{}", e.message());
    let e = jobs_as("ptk_00000000-0000-0000-0000-000000000000_forged")
        .list_jobs(v1::ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // The audit trail holds who did what.
    let audit =
        admin.list_audit(v1::ListAuditRequest { page_size: 100, before_id: 0 }).await.unwrap().into_inner().entries;
    let did = |actor: &str, action: &str| audit.iter().any(|e| e.actor == actor && e.action == action);
    assert!(
        did("tester", "job.submit") && did("tester", "sweep.create") && did("tester", "adapter.download"),
        "{audit:?}"
    );
    assert!(did("admin", "token.create") && did("admin", "token.revoke"), "{audit:?}");
    assert!(!did("mallory", "job.cancel"), "refused calls change nothing: {audit:?}");
    store.close().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tls_clients_that_trust_the_coordinator_and_under_mtls_hold_a_certificate_of_its_ca_get_through() {
    let pki = pki();
    let env = start_tls(&pki, true).await;
    let url = grpc_url(&env);
    let worker = env.tokens.worker.clone();
    let register = async |channel: AuthChannel| {
        let request = v1::RegisterWorkerRequest {
            hostname: "mtls-host".into(),
            devices: vec![v1::Device { name: "cpu".into(), memory_bytes: 1 << 30 }],
            slots: 1,
            models: vec![v1::BaseModel { name: MODEL.into(), max_positions: 512, ..Default::default() }],
            ..Default::default()
        };
        WorkerServiceClient::new(channel).register_worker(request).await.map(|r| r.into_inner().worker_id)
    };
    let with_cert = tls_channel(&url, &pki, Some(&worker), Some(pki.client.clone()));
    assert!(register(with_cert).await.is_ok(), "a worker with a certificate of the CA and a worker token registers");

    let without_cert = tls_channel(&url, &pki, Some(&worker), None);
    assert!(register(without_cert).await.is_err(), "no client certificate, no call");
    let stranger = tls_channel(&url, &pki, Some(&worker), Some(pki.stranger.clone()));
    assert!(register(stranger).await.is_err(), "a certificate of another CA is refused");
    let port = env.coordinator.as_ref().unwrap().grpc_addr.port();
    let plaintext = ptune_coordinator::testing::channel(&format!("http://localhost:{port}"), &worker);
    let e = register(plaintext).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled),
        "plaintext to a TLS port: {e:?}"
    );
    let untrusting =
        ClientOptions { token: Some(worker.clone()), ca_cert: None, client_cert: Some(pki.client.clone()) };
    let untrusting = ptune_proto::client::channel(&url, &untrusting).unwrap();
    assert!(
        register(untrusting).await.is_err(),
        "a client that does not trust the coordinator's CA does not talk to it"
    );
    let no_token = tls_channel(&url, &pki, None, Some(pki.client.clone()));
    let e = register(no_token).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "a certificate does not replace the token: {e:?}");
    env.stop().await;
}

/// An HTTP/1.1 request over TLS to the dashboard, trusting the test CA;
/// the status and the whole response.
async fn https(addr: SocketAddr, ca: &Path, request: &str) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector.connect("localhost".try_into().unwrap(), tcp).await.expect("TLS handshake");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await; // a peer that closes without close_notify still said everything
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

fn get(path: &str, port: u16, token: Option<&str>) -> String {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n{auth}Connection: close\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_https_dashboard_refuses_every_route_without_a_token_and_every_role_but_viewer_and_admin() {
    let pki = pki();
    let mut env = start_tls(&pki, false).await;
    let url = grpc_url(&env);
    let addr = env.coordinator.as_ref().unwrap().http_addr;
    let port = addr.port();
    let spec = env.spec("dash").await;
    let job = env.submit(spec).await;
    let worker = env.register().await;
    let lease = env.lease(&worker).await.unwrap();
    env.complete(&lease, b"adapter bytes").await.unwrap();
    let tokens = env.tokens.clone();

    let routes = [
        "/".to_string(),
        "/assets/app.js".into(),
        "/metrics".into(),
        "/api/overview".into(),
        "/api/jobs".into(),
        format!("/api/jobs/{}", job.id),
        format!("/api/jobs/{}/metrics", job.id),
        format!("/api/jobs/{}/adapter", job.id),
        "/api/sweeps".into(),
        "/api/sweeps/00000000-0000-0000-0000-000000000000".into(),
        "/api/sweeps/00000000-0000-0000-0000-000000000000/curves".into(),
        "/api/workers".into(),
        "/api/events".into(),
        "/api/no-such-route".into(),
    ];
    for route in &routes {
        let (status, text) = https(addr, &pki.ca, &get(route, port, None)).await;
        let page = !route.starts_with("/api/") && route != "/metrics";
        if page {
            assert!(
                status == 303 && text.contains("location: /login"),
                "{route} without a token goes to the login page: {text}"
            );
        } else {
            assert_eq!(status, 401, "{route} without a token: {text}");
            assert!(text.contains("missing token"), "{route}: {text}");
        }
        for token in [&tokens.submitter, &tokens.worker] {
            let (status, text) = https(addr, &pki.ca, &get(route, port, Some(token))).await;
            if page {
                assert!(status == 303 || status == 403, "{route} as a non-viewer: {text}");
            } else {
                assert_eq!(status, 403, "{route} as a submitter or worker: {text}");
                assert!(text.contains("needs role admin or viewer"), "{route}: {text}");
            }
        }
    }
    for (route, expected) in [("/healthz", 200), ("/livez", 200), ("/login", 200)] {
        let (status, text) = https(addr, &pki.ca, &get(route, port, None)).await;
        assert_eq!(status, expected, "{route} is public: {text}");
    }
    let (status, text) = https(addr, &pki.ca, &get("/api/jobs", port, Some(&tokens.viewer))).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(&job.id) && text.to_ascii_lowercase().contains("content-security-policy"), "{text}");
    let (status, text) =
        https(addr, &pki.ca, &get(&format!("/api/jobs/{}/adapter", job.id), port, Some(&tokens.viewer))).await;
    assert!(status == 200 && text.ends_with("adapter bytes"), "{text}");
    let rebinding = format!("GET /api/jobs HTTP/1.1\r\nHost: attacker.example:{port}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", tokens.viewer);
    let (status, _) = https(addr, &pki.ca, &rebinding).await;
    assert_eq!(status, 421, "a Host the coordinator does not answer to (DNS rebinding)");

    // Logging in sets a Secure, HttpOnly, SameSite=Strict session cookie under TLS.
    let form = format!("token={}", tokens.viewer);
    let login = format!(
        "POST /login HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len()
    );
    let (_, text) = https(addr, &pki.ca, &login).await;
    let cookie =
        text.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).expect("a session cookie").to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Secure"), "{cookie}");
    let session = cookie.split_once(':').unwrap().1.split(';').next().unwrap().trim().to_string();
    let with_cookie = format!(
        "GET /api/overview HTTP/1.1\r\nHost: localhost:{port}\r\nCookie: {session}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(https(addr, &pki.ca, &with_cookie).await.0, 200, "the session cookie lets the viewer in");

    let mut admin = AdminServiceClient::new(tls_channel(&url, &pki, Some(&tokens.admin), None));
    let audit = admin.list_audit(v1::ListAuditRequest::default()).await.unwrap().into_inner().entries;
    assert!(
        audit.iter().any(|e| e.actor == "viewer" && e.action == "adapter.download" && e.target == job.id),
        "a dashboard download is audited: {audit:?}"
    );
    env.stop().await;
}

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

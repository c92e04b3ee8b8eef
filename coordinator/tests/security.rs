//! Who may call what, checked over the wire with TLS on (certificates made
//! here with rcgen): every method that reflection lists refuses a call
//! without a token; each role gets exactly the calls the role table gives
//! it; a submitter cannot see, cancel or download another owner's job; a
//! worker token cannot cancel or download, nor speak for a lease another
//! worker holds; revoked and expired tokens are refused at once. What TLS
//! itself refuses, and the HTTPS dashboard, are `tls.rs`.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::tls::{grpc_url, start_tls, tls_channel};
use common::{pki, RawCodec, EVAL, MODEL, TRAIN};
use futures::StreamExt;
use prost::Message;
use ptune_coordinator::auth::Role;
use ptune_proto::client::AuthChannel;
use ptune_proto::v1;
use ptune_proto::v1::admin_service_client::AdminServiceClient;
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::sweep_service_client::SweepServiceClient;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;
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
        ("ptune.v1.JobService", "SubmitJob" | "SubmitJobs" | "CancelJob" | "UploadDataset") => &[Admin, Submitter],
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

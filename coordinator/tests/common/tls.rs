//! A coordinator with TLS on both ports, and clients that trust the test CA
//! (certificates from [`super::pki`]).

use std::path::PathBuf;
use std::time::Duration;

use ptune_coordinator::config::TlsFiles;
use ptune_proto::client::{AuthChannel, ClientOptions};
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::sweep_service_client::SweepServiceClient;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;

use super::{Env, Pki};

/// A coordinator with TLS on, its clients switched to `https://` with the
/// test CA.
pub async fn start_tls(pki: &Pki, client_ca: bool) -> Env {
    let files = TlsFiles {
        cert: pki.server.0.clone(),
        key: pki.server.1.clone(),
        client_ca: client_ca.then(|| pki.ca.clone()),
    };
    let mut env = super::start_with(Duration::from_secs(10), |c| c.tls = Some(files)).await;
    let url = grpc_url(&env);
    let client_cert = client_ca.then(|| pki.client.clone());
    env.jobs = JobServiceClient::new(tls_channel(&url, pki, Some(&env.tokens.admin), client_cert.clone()));
    env.sweeps = SweepServiceClient::new(tls_channel(&url, pki, Some(&env.tokens.admin), client_cert.clone()));
    env.workers = WorkerServiceClient::new(tls_channel(&url, pki, Some(&env.tokens.worker), client_cert));
    env
}

pub fn grpc_url(env: &Env) -> String {
    format!("https://localhost:{}", env.coordinator.as_ref().unwrap().grpc_addr.port())
}

pub fn tls_channel(url: &str, pki: &Pki, token: Option<&str>, client_cert: Option<(PathBuf, PathBuf)>) -> AuthChannel {
    let options = ClientOptions { token: token.map(str::to_string), ca_cert: Some(pki.ca.clone()), client_cert };
    ptune_proto::client::channel(url, &options).unwrap()
}

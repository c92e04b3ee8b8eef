//! TLS on both ports, checked over the wire (certificates made here with
//! rcgen): plaintext clients, clients that do not trust the coordinator
//! and, under mutual TLS, clients without a certificate from the
//! operator's CA get nothing; and the HTTPS dashboard refuses what its
//! roles do not allow, sets its session cookie Secure, and refuses Hosts it
//! does not answer to.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use common::tls::{grpc_url, start_tls, tls_channel};
use common::{pki, MODEL};
use ptune_proto::client::{AuthChannel, ClientOptions};
use ptune_proto::v1;
use ptune_proto::v1::admin_service_client::AdminServiceClient;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tls_clients_that_trust_the_coordinator_and_under_mtls_hold_a_certificate_of_its_ca_get_through() {
    let pki = pki();
    let env = start_tls(&pki, true).await;
    let url = grpc_url(&env);
    let worker = env.tokens.worker.clone();
    let register = async |channel: AuthChannel| {
        let request = v1::RegisterWorkerRequest {
            hostname: "mtls-host".into(),
            devices: vec![v1::Device { name: "cpu".into(), memory_bytes: 1 << 30, ..Default::default() }],
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

//! How clients (the CLI, workers, tests) reach a coordinator: a channel to
//! its address, over TLS for `https://` addresses (with the coordinator's CA
//! when it is not one of the system's, and a client certificate when the
//! coordinator asks for one), with every call carrying the bearer token.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Clone, Debug, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// A token as given (`ptk_...`); `None` sends none.
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        token
            .map(|t| format!("Bearer {}", t.trim()).parse::<MetadataValue<Ascii>>())
            .transpose()
            .map(Self)
            .map_err(|_| ClientError("the token has characters a header cannot carry; copy it again".into()))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the bearer token.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

/// What a client needs besides the address.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// The bearer token (`ptk_...`).
    pub token: Option<String>,
    /// PEM of the CA that signed the coordinator's certificate (for `https://`).
    pub ca_cert: Option<PathBuf>,
    /// PEM certificate and key presented to a coordinator that requires
    /// client certificates (mTLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// A client-side setup error, said for a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientError(pub String);

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ClientError {}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError(format!("cannot read the {what} {}: {e}", path.display())))
}

/// `url` with `http://` added when it names no scheme.
pub fn normalize(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// An endpoint for `url` (`http://` or `https://`; TLS with `options`'
/// CA and client certificate for the latter).
pub fn endpoint(url: &str, options: &ClientOptions) -> Result<Endpoint, ClientError> {
    endpoint_named(url, options, None)
}

/// Like [`endpoint`], checking the coordinator's certificate for `domain`
/// rather than the address's host (an address a name resolved to).
pub fn endpoint_named(url: &str, options: &ClientOptions, domain: Option<&str>) -> Result<Endpoint, ClientError> {
    let url = normalize(url);
    let mut endpoint =
        Endpoint::from_shared(url.clone()).map_err(|e| ClientError(format!("invalid coordinator address {url:?}: {e}")))?;
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match &options.ca_cert {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &options.client_cert {
            tls = tls.identity(Identity::from_pem(read(cert, "client certificate")?, read(key, "client key")?));
        }
        if let Some(domain) = domain {
            tls = tls.domain_name(domain);
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| ClientError(format!("TLS settings for {url}: {e}")))?;
    } else if options.ca_cert.is_some() || options.client_cert.is_some() {
        return Err(ClientError(format!(
            "{url} is not an https:// address, but a CA or client certificate was given; use https://"
        )));
    }
    Ok(endpoint.connect_timeout(Duration::from_secs(5)))
}

/// A lazily connected channel to `url` whose calls carry `options.token`.
pub fn channel(url: &str, options: &ClientOptions) -> Result<AuthChannel, ClientError> {
    let channel = endpoint(url, options)?.connect_lazy();
    Ok(InterceptedService::new(channel, BearerToken::new(options.token.as_deref())?))
}

/// Like [`channel`], but connected now: fails when the coordinator cannot be reached.
pub async fn connect(url: &str, options: &ClientOptions) -> Result<AuthChannel, ClientError> {
    let url_shown = normalize(url);
    let channel = endpoint(url, options)?.connect().await.map_err(|e| {
        let mut cause = String::new();
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        while let Some(err) = source {
            cause = err.to_string();
            source = err.source();
        }
        ClientError(format!("cannot reach the coordinator at {url_shown}: {cause}"))
    })?;
    Ok(InterceptedService::new(channel, BearerToken::new(options.token.as_deref())?))
}

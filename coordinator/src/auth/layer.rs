//! The tower layer that authenticates every gRPC call: it reads the bearer
//! token, finds its [`Identity`], checks [`permission`] for the method, and
//! hands the identity to the handler in the request's extensions. A call
//! without a token is refused `UNAUTHENTICATED`, one outside its role
//! `PERMISSION_DENIED`, each saying what was missing.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

use super::{permission, Identity, Permission};
use crate::store::{Refusal, Store};

/// Adds [`AuthService`] around the tonic routes.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    store: Store,
}

impl AuthLayer {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, store: self.store.clone() }
    }
}

/// See [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    store: Store,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The bearer token of a request's `authorization` header.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Who may call `path` with `token`: the caller's identity, or the status
/// that refuses the call.
pub async fn check(store: &Store, path: &str, token: Option<&str>) -> Result<Option<Identity>, Status> {
    let needed = permission(path).unwrap_or(Permission::Authenticated);
    if needed == Permission::Public {
        return Ok(None);
    }
    let Some(token) = token else {
        return Err(Status::unauthenticated(format!(
            "missing token: {path} needs a bearer token of role {} (authorization: Bearer ptk_...; \
             `ptune login` or PTUNE_TOKEN)",
            needed.roles()
        )));
    };
    let identity = match store.authenticate(token).await {
        Ok(Ok(identity)) => identity,
        Ok(Err(Refusal::Unknown)) => {
            return Err(Status::unauthenticated("invalid token: not a token of this coordinator; ask an admin for one"))
        }
        Ok(Err(Refusal::Revoked(at))) => {
            return Err(Status::unauthenticated(format!("token revoked at {}; ask an admin for a new one", at.to_rfc3339())))
        }
        Ok(Err(Refusal::Expired(at))) => {
            return Err(Status::unauthenticated(format!("token expired at {}; ask an admin for a new one", at.to_rfc3339())))
        }
        Err(e) => return Err(crate::error::Error::from(e).into()),
    };
    if !identity.role.allows(needed) {
        return Err(Status::permission_denied(format!(
            "token {:?} has role {}; {path} needs role {}",
            identity.name,
            identity.role,
            needed.roles()
        )));
    }
    Ok(Some(identity))
}

impl<S, ReqBody> Service<Request<ReqBody>> for AuthService<S>
where
    S: Service<Request<ReqBody>, Response = Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready serves this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let store = self.store.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let token = bearer(req.headers()).map(str::to_string);
            match check(&store, &path, token.as_deref()).await {
                Ok(identity) => {
                    if let Some(identity) = identity {
                        req.extensions_mut().insert(identity);
                    }
                    inner.call(req).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// The identity the auth layer attached to a request.
pub fn identity<T>(req: &tonic::Request<T>) -> Result<Identity, Status> {
    req.extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing token: this call needs a bearer token"))
}

//! `ptune.v1.AdminService`: tokens and the audit trail (admins only; the
//! auth layer checks the role).

use chrono::{DateTime, SecondsFormat, Utc};
use ptune_proto::v1::{self, admin_service_server::AdminService};
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use crate::auth::layer::identity;
use crate::auth::Role;
use crate::error::Error;
use crate::store::{AuditEntry, Store, TokenRecord};

/// Most audit entries per page.
const MAX_AUDIT_PAGE: u32 = 1000;

/// The gRPC face of token administration.
pub struct AdminApi {
    store: Store,
}

impl AdminApi {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

fn timestamp(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true)).unwrap_or_default()
}

fn token_info(t: &TokenRecord) -> v1::TokenInfo {
    v1::TokenInfo {
        id: t.id.to_string(),
        name: t.name.clone(),
        role: t.role.clone(),
        created_at: timestamp(Some(t.created_at)),
        created_by: t.created_by.clone(),
        expires_at: timestamp(t.expires_at),
        last_used_at: timestamp(t.last_used_at),
        revoked_at: timestamp(t.revoked_at),
    }
}

fn audit_entry(e: &AuditEntry) -> v1::AuditEntry {
    v1::AuditEntry {
        id: e.id,
        at: timestamp(Some(e.at)),
        actor: e.actor.clone(),
        role: e.role.clone(),
        action: e.action.clone(),
        target: e.target.clone(),
        detail_json: e.detail.0.to_string(),
    }
}

/// Checks a token name: 1 to 64 characters, letters, digits and `._@-`,
/// starting with a letter or digit.
pub fn token_name(name: &str) -> Result<&str, Error> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
    if !valid {
        return Err(Error::invalid(
            "name",
            "must be 1 to 64 characters: letters, digits and . _ @ -, starting with a letter or digit",
        ));
    }
    Ok(name)
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    #[instrument(skip_all)]
    async fn create_token(&self, req: Request<v1::CreateTokenRequest>) -> Result<Response<v1::CreateTokenResponse>, Status> {
        let caller = identity(&req)?;
        let req = req.into_inner();
        let name = token_name(&req.name)?;
        let role: Role = req.role.parse().map_err(|e: String| Error::invalid("role", e))?;
        if req.expires_in_days > 3650 {
            return Err(Error::invalid("expires_in_days", format!("must be 0 (never) to 3650, got {}", req.expires_in_days)).into());
        }
        let expires_at = (req.expires_in_days > 0).then(|| Utc::now() + chrono::Duration::days(i64::from(req.expires_in_days)));
        let (record, token) = self.store.create_token(name, role, expires_at, &caller.name).await.map_err(Error::from)?;
        info!(token = %record.name, role = %record.role, by = %caller.name, "token created");
        let detail = serde_json::json!({ "name": record.name, "role": record.role });
        self.store.audit(&caller, "token.create", &record.id.to_string(), detail).await.map_err(Error::from)?;
        Ok(Response::new(v1::CreateTokenResponse { info: Some(token_info(&record)), token }))
    }

    #[instrument(skip_all)]
    async fn list_tokens(&self, _req: Request<v1::ListTokensRequest>) -> Result<Response<v1::ListTokensResponse>, Status> {
        let tokens = self.store.list_tokens().await.map_err(Error::from)?;
        Ok(Response::new(v1::ListTokensResponse { tokens: tokens.iter().map(token_info).collect() }))
    }

    #[instrument(skip_all)]
    async fn revoke_token(&self, req: Request<v1::RevokeTokenRequest>) -> Result<Response<v1::TokenInfo>, Status> {
        let caller = identity(&req)?;
        let wanted = req.into_inner().token;
        if uuid::Uuid::try_parse(&wanted).is_err() && token_name(&wanted).is_err() {
            return Err(Error::invalid("token", "must be a token's id or name").into());
        }
        let record = self
            .store
            .revoke_token(&wanted)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::NotFound(format!("no live token has id or name {wanted:?}")))?;
        info!(token = %record.name, by = %caller.name, "token revoked");
        let detail = serde_json::json!({ "name": record.name });
        self.store.audit(&caller, "token.revoke", &record.id.to_string(), detail).await.map_err(Error::from)?;
        Ok(Response::new(token_info(&record)))
    }

    #[instrument(skip_all)]
    async fn list_audit(&self, req: Request<v1::ListAuditRequest>) -> Result<Response<v1::ListAuditResponse>, Status> {
        let req = req.into_inner();
        let size = match req.page_size {
            0 => 100,
            n => n.min(MAX_AUDIT_PAGE),
        };
        let before = (req.before_id > 0).then_some(req.before_id);
        let entries = self.store.list_audit(size, before).await.map_err(Error::from)?;
        Ok(Response::new(v1::ListAuditResponse { entries: entries.iter().map(audit_entry).collect() }))
    }
}

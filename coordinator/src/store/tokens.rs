//! API tokens, dashboard sessions and the audit trail.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::instrument;
use uuid::Uuid;

use super::{millis, Result, Store, StoreError};
use crate::auth::{tokens, Identity, Role};

/// A token as admins list it (never its secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    pub id: Uuid,
    pub name: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Why a presented token is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a token this coordinator made (or a wrong secret).
    Unknown,
    Revoked(DateTime<Utc>),
    Expired(DateTime<Utc>),
}

/// One entry of the audit trail.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub role: String,
    pub action: String,
    pub target: String,
    pub detail: sqlx::types::Json<serde_json::Value>,
}

#[derive(Clone, sqlx::FromRow)]
pub(super) struct TokenRow {
    id: Uuid,
    name: String,
    role: String,
    salt: Vec<u8>,
    hash: Vec<u8>,
    created_at: DateTime<Utc>,
    created_by: String,
    expires_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl TokenRow {
    fn record(&self) -> TokenRecord {
        TokenRecord {
            id: self.id,
            name: self.name.clone(),
            role: self.role.clone(),
            created_at: self.created_at,
            created_by: self.created_by.clone(),
            expires_at: self.expires_at,
            last_used_at: self.last_used_at,
            revoked_at: self.revoked_at,
        }
    }
}

/// A last-used time older than this is refreshed (not on every call).
const LAST_USED_RESOLUTION: Duration = Duration::from_secs(60);

impl Store {
    /// Creates a token for `name` with `role`; returns its record and the
    /// token itself (shown once). A live token of the same name is a conflict.
    #[instrument(skip_all, fields(name = %name, role = %role))]
    pub async fn create_token(
        &self,
        name: &str,
        role: Role,
        expires_at: Option<DateTime<Utc>>,
        created_by: &str,
    ) -> Result<(TokenRecord, String)> {
        let new = tokens::generate();
        let row: TokenRow = sqlx::query_as(
            "INSERT INTO api_tokens (id, name, role, salt, hash, expires_at, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
        )
        .bind(new.id)
        .bind(name)
        .bind(role.as_str())
        .bind(&new.salt[..])
        .bind(&new.hash[..])
        .bind(expires_at)
        .bind(created_by)
        .fetch_one(&self.pool)
        .await?;
        Ok((row.record(), new.secret_token))
    }

    /// The identity a presented token stands for, or why it is refused.
    /// Token rows come from the cache when it holds them (`cache.rs`), so
    /// most calls cost the database nothing to authenticate.
    pub async fn authenticate(&self, token: &str) -> Result<std::result::Result<Identity, Refusal>> {
        let Some((id, secret)) = tokens::parse(token) else { return Ok(Err(Refusal::Unknown)) };
        let row = match self.cache.token(id) {
            Some(row) => Some(row),
            None => {
                let start = self.cache.read_start();
                let row: Option<TokenRow> =
                    sqlx::query_as("SELECT * FROM api_tokens WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
                if let Some(row) = &row {
                    self.cache.put_token(start, id, row.clone());
                }
                row
            }
        };
        let Some(mut row) = row.filter(|r| tokens::matches(secret, &r.salt, &r.hash)) else {
            return Ok(Err(Refusal::Unknown));
        };
        if let Some(at) = row.revoked_at {
            return Ok(Err(Refusal::Revoked(at)));
        }
        if let Some(at) = row.expires_at.filter(|at| *at <= Utc::now()) {
            return Ok(Err(Refusal::Expired(at)));
        }
        let stale = row.last_used_at.is_none_or(|at| {
            Utc::now().signed_duration_since(at).to_std().unwrap_or_default() >= LAST_USED_RESOLUTION
        });
        if stale {
            let start = self.cache.read_start();
            sqlx::query("UPDATE api_tokens SET last_used_at = now() WHERE id = $1").bind(id).execute(&self.pool).await?;
            row.last_used_at = Some(Utc::now());
            self.cache.put_token(start, id, row.clone());
        }
        let role = row.role.parse().map_err(StoreError::Corrupt)?;
        Ok(Ok(Identity { token_id: row.id, name: row.name, role }))
    }

    /// Every token, newest first, revoked ones included.
    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let rows: Vec<TokenRow> =
            sqlx::query_as("SELECT * FROM api_tokens ORDER BY created_at DESC, id").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(TokenRow::record).collect())
    }

    /// Revokes the live token with this id or name; `None` when there is none.
    #[instrument(skip_all, fields(token = %id_or_name))]
    pub async fn revoke_token(&self, id_or_name: &str) -> Result<Option<TokenRecord>> {
        let id = Uuid::try_parse(id_or_name).ok();
        let row: Option<TokenRow> = sqlx::query_as(
            "UPDATE api_tokens SET revoked_at = now() \
             WHERE revoked_at IS NULL AND (id = $1 OR name = $2) RETURNING *",
        )
        .bind(id)
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = &row {
            // Other coordinators hear of it through migration 0017's notification.
            self.cache.forget(super::cache::CacheKind::Token, row.id);
            sqlx::query("DELETE FROM dashboard_sessions WHERE token_id = $1").bind(row.id).execute(&self.pool).await?;
        }
        Ok(row.as_ref().map(TokenRow::record))
    }

    /// Whether any live admin token exists (bootstrap creates one when not).
    pub async fn has_admin_token(&self) -> Result<bool> {
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.is_some())
    }

    /// Opens a dashboard session for a token, valid for `ttl`; returns the cookie value.
    pub async fn create_session(&self, token_id: Uuid, ttl: Duration) -> Result<String> {
        let (value, hash) = tokens::session();
        sqlx::query(
            "INSERT INTO dashboard_sessions (id, token_id, expires_at) VALUES ($1, $2, now() + $3 * interval '1 millisecond')",
        )
        .bind(&hash[..])
        .bind(token_id)
        .bind(millis(ttl))
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at < now()").execute(&self.pool).await?;
        Ok(value)
    }

    /// The identity of a live session of a live token.
    pub async fn session_identity(&self, cookie: &str) -> Result<Option<Identity>> {
        let row: Option<(Uuid, String, String)> = sqlx::query_as(
            "SELECT t.id, t.name, t.role FROM dashboard_sessions s JOIN api_tokens t ON t.id = s.token_id \
             WHERE s.id = $1 AND s.expires_at > now() AND t.revoked_at IS NULL \
               AND (t.expires_at IS NULL OR t.expires_at > now())",
        )
        .bind(&tokens::session_hash(cookie)[..])
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(token_id, name, role)| Ok(Identity { token_id, name, role: role.parse().map_err(StoreError::Corrupt)? }))
            .transpose()
    }

    /// Ends a dashboard session.
    pub async fn end_session(&self, cookie: &str) -> Result<()> {
        sqlx::query("DELETE FROM dashboard_sessions WHERE id = $1")
            .bind(&tokens::session_hash(cookie)[..])
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a mutation in the audit trail.
    pub async fn audit(&self, actor: &Identity, action: &str, target: &str, detail: serde_json::Value) -> Result<()> {
        sqlx::query("INSERT INTO audit_log (actor, role, action, target, detail) VALUES ($1, $2, $3, $4, $5)")
            .bind(&actor.name)
            .bind(actor.role.as_str())
            .bind(action)
            .bind(target)
            .bind(sqlx::types::Json(detail))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The newest audit entries, before entry `before` when given.
    pub async fn list_audit(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query_as(
            "SELECT id, at, actor, role, action, target, detail FROM audit_log \
             WHERE ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .bind(before)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}

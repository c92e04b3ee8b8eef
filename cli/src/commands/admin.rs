//! `ptune token ...` and `ptune audit`: administration (admins only).

use clap::Subcommand;
use ptune_proto::client::AuthChannel;
use ptune_proto::v1::{self, admin_service_client::AdminServiceClient};

use super::status_error;
use crate::output;
use crate::Format;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (it is not shown again).
    Create {
        /// admin, submitter, viewer or worker.
        #[arg(long)]
        role: String,
        /// The token's name: the identity that owns what it submits.
        #[arg(long)]
        name: String,
        /// Days until it expires (0: never).
        #[arg(long, default_value_t = 0)]
        expires_in_days: u32,
    },
    /// Every token, newest first (never their secrets).
    List,
    /// Revoke a token by id or name; it is refused from its next call on.
    Revoke { token: String },
}

fn row(t: &v1::TokenInfo) -> Vec<String> {
    let or_dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    vec![
        t.name.clone(),
        t.role.clone(),
        t.id.clone(),
        or_dash(&t.created_at),
        or_dash(&t.expires_at),
        or_dash(&t.last_used_at),
        or_dash(&t.revoked_at),
    ]
}

pub async fn tokens(mut client: AdminServiceClient<AuthChannel>, format: Format, cmd: TokenCommand) -> anyhow::Result<i32> {
    match cmd {
        TokenCommand::Create { role, name, expires_in_days } => {
            let request = v1::CreateTokenRequest { name, role, expires_in_days };
            let created = client.create_token(request).await.map_err(status_error)?.into_inner();
            let info = created.info.unwrap_or_default();
            match format {
                Format::Json => output::json(&serde_json::json!({
                    "id": info.id, "name": info.name, "role": info.role, "expires_at": info.expires_at,
                    "token": created.token,
                })),
                Format::Text => {
                    eprintln!("token {:?} (role {}) created; it is shown once:", info.name, info.role);
                    println!("{}", created.token);
                }
            }
        }
        TokenCommand::List => {
            let tokens = client.list_tokens(v1::ListTokensRequest {}).await.map_err(status_error)?.into_inner().tokens;
            match format {
                Format::Json => output::json(
                    &tokens
                        .iter()
                        .map(|t| serde_json::json!({
                            "id": t.id, "name": t.name, "role": t.role, "created_at": t.created_at,
                            "created_by": t.created_by, "expires_at": t.expires_at, "last_used_at": t.last_used_at,
                            "revoked_at": t.revoked_at,
                        }))
                        .collect::<Vec<_>>(),
                ),
                Format::Text => output::table(
                    &["NAME", "ROLE", "ID", "CREATED", "EXPIRES", "LAST USED", "REVOKED"],
                    &tokens.iter().map(row).collect::<Vec<_>>(),
                ),
            }
        }
        TokenCommand::Revoke { token } => {
            let info = client.revoke_token(v1::RevokeTokenRequest { token }).await.map_err(status_error)?.into_inner();
            match format {
                Format::Json => output::json(&serde_json::json!({ "id": info.id, "name": info.name, "revoked_at": info.revoked_at })),
                Format::Text => println!("token {:?} revoked at {}", info.name, info.revoked_at),
            }
        }
    }
    Ok(0)
}

pub async fn audit(mut client: AdminServiceClient<AuthChannel>, format: Format, limit: u32) -> anyhow::Result<i32> {
    let entries = client
        .list_audit(v1::ListAuditRequest { page_size: limit, before_id: 0 })
        .await
        .map_err(status_error)?
        .into_inner()
        .entries;
    match format {
        Format::Json => output::json(
            &entries
                .iter()
                .map(|e| serde_json::json!({
                    "id": e.id, "at": e.at, "actor": e.actor, "role": e.role, "action": e.action, "target": e.target,
                    "detail": serde_json::from_str::<serde_json::Value>(&e.detail_json).unwrap_or_default(),
                }))
                .collect::<Vec<_>>(),
        ),
        Format::Text => output::table(
            &["AT", "ACTOR", "ROLE", "ACTION", "TARGET", "DETAIL"],
            &entries
                .iter()
                .map(|e| vec![e.at.clone(), e.actor.clone(), e.role.clone(), e.action.clone(), e.target.clone(), e.detail_json.clone()])
                .collect::<Vec<_>>(),
        ),
    }
    Ok(0)
}

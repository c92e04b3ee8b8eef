//! Test support for this crate and for integration tests of other crates.

use anyhow::Context;

use crate::auth::Role;
use crate::store::{admin, Store};

/// What a worker registers for all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M
/// parameters), served under `name`.
pub fn minilm_model(name: &str) -> ptune_proto::v1::BaseModel {
    ptune_proto::v1::BaseModel {
        name: name.into(),
        model_type: "bert".into(),
        max_positions: 512,
        hidden_size: 384,
        num_layers: 6,
        num_attention_heads: 12,
        parameters: 22_713_216,
        ..Default::default()
    }
}

/// A token of `role` named `name` on the database at `database_url` (its
/// migrations applied first).
pub async fn create_token(database_url: &str, role: Role, name: &str) -> anyhow::Result<String> {
    let store = Store::connect(database_url).await?;
    store.migrate().await?;
    let (_, token) = store.create_token(name, role, None, "test").await?;
    store.close().await;
    Ok(token)
}

/// One token of each role, as most tests need them.
#[derive(Clone, Debug)]
pub struct TestTokens {
    pub admin: String,
    pub submitter: String,
    pub viewer: String,
    pub worker: String,
}

impl TestTokens {
    /// Creates `admin`, `submitter` (named "tester"), `viewer` and `worker` tokens.
    pub async fn create(database_url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            admin: create_token(database_url, Role::Admin, "admin").await?,
            submitter: create_token(database_url, Role::Submitter, "tester").await?,
            viewer: create_token(database_url, Role::Viewer, "viewer").await?,
            worker: create_token(database_url, Role::Worker, "worker").await?,
        })
    }
}

/// A lazily connected channel to `url` whose calls carry `token`.
pub fn channel(url: &str, token: &str) -> ptune_proto::client::AuthChannel {
    let options = ptune_proto::client::ClientOptions { token: Some(token.to_string()), ..Default::default() };
    ptune_proto::client::channel(url, &options).expect("a valid address")
}

/// Server that test databases are created on, unless
/// `$PTUNE_TEST_DATABASE_URL` names another.
pub const DEFAULT_TEST_SERVER_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A fresh, uniquely named database, dropped (`WITH (FORCE)`, so open pools
/// do not keep it alive) when the guard is dropped.
pub struct TestDatabase {
    /// URL of the fresh database.
    pub url: String,
    name: String,
    server_url: String,
}

/// Creates a fresh database on the server at `$PTUNE_TEST_DATABASE_URL`
/// (default [`DEFAULT_TEST_SERVER_URL`]).
pub async fn fresh_database() -> anyhow::Result<TestDatabase> {
    let server_url = std::env::var("PTUNE_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_TEST_SERVER_URL.to_string());
    let name = format!("ptune_test_{}", uuid::Uuid::new_v4().simple());
    admin::create_database(&server_url, &name)
        .await
        .with_context(|| format!("creating a test database on {server_url}; set PTUNE_TEST_DATABASE_URL"))?;
    let url = with_database(&server_url, &name)?;
    Ok(TestDatabase { url, name, server_url })
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (server_url, name) = (self.server_url.clone(), self.name.clone());
        // Drop may run inside a runtime, which must not block on itself: use
        // a thread with its own runtime and wait for it.
        let dropped = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(admin::drop_database(&server_url, &name)).map_err(anyhow::Error::from)
        })
        .join();
        if let Ok(Err(e)) | Err(e) = dropped.map_err(|_| anyhow::anyhow!("drop thread panicked")) {
            eprintln!("dropping test database {} failed: {e:#}", self.name);
        }
    }
}

/// `url` with its database (path) replaced by `database`, keeping any query.
fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let scheme_end = url.find("://").context("database url must look like postgres://user@host:port/db")? + 3;
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_end = base[scheme_end..].find('/').map_or(base.len(), |i| scheme_end + i);
    Ok(format!("{}/{database}{query}", &base[..authority_end]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_database_of_a_url_is_replaced_and_its_query_kept() {
        let f = super::with_database;
        assert_eq!(f("postgres://u@h:5432/postgres", "x").unwrap(), "postgres://u@h:5432/x");
        assert_eq!(f("postgres://u@h", "x").unwrap(), "postgres://u@h/x");
        assert_eq!(f("postgres://u@h/db?sslmode=disable", "x").unwrap(), "postgres://u@h/x?sslmode=disable");
    }
}

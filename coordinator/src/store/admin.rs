//! Creating and dropping whole databases (test support).

use sqlx::{AssertSqlSafe, Connection, PgConnection};

use super::{Result, StoreError};

/// A database name is an identifier, not a bind parameter: only plain
/// lowercase names are accepted, so the statement stays injection-free.
fn checked_name(name: &str) -> Result<&str> {
    let plain = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if plain {
        Ok(name)
    } else {
        Err(StoreError::Corrupt(format!("database name {name:?} must be lowercase letters, digits and _")))
    }
}

/// Creates database `name` on the server at `server_url`.
pub async fn create_database(server_url: &str, name: &str) -> Result<()> {
    let name = checked_name(name)?;
    let mut conn = PgConnection::connect(server_url).await?;
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

/// Drops database `name`, disconnecting its sessions.
pub async fn drop_database(server_url: &str, name: &str) -> Result<()> {
    let name = checked_name(name)?;
    let mut conn = PgConnection::connect(server_url).await?;
    sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

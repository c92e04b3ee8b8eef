//! API tokens: `ptk_<id>_<secret>`, where the id (32 hex digits) finds the
//! token's row and the secret (64 hex digits, 256 random bits) proves it.
//! Only a salted sha256 of the secret is stored; a token is shown once,
//! when it is created. Lease tokens (`plt_<64 hex>`) prove that a worker
//! holds a lease; only their sha256 is stored.

use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

const PREFIX: &str = "ptk_";
const LEASE_PREFIX: &str = "plt_";

/// A freshly made token: what to give its holder, and what to store.
pub struct NewToken {
    pub id: Uuid,
    /// The whole token, shown once.
    pub secret_token: String,
    pub salt: [u8; 16],
    pub hash: [u8; 32],
}

/// Makes a token with a new id and secret.
pub fn generate() -> NewToken {
    let id = Uuid::new_v4();
    let mut secret = [0u8; 32];
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let secret_hex = hex::encode(secret);
    let hash = salted(&salt, &secret_hex);
    NewToken { id, secret_token: format!("{PREFIX}{}_{secret_hex}", id.simple()), salt, hash }
}

fn salted(salt: &[u8], secret: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(secret.as_bytes());
    hasher.finalize().into()
}

/// The id and secret of a presented token; `None` when it is not one.
pub fn parse(token: &str) -> Option<(Uuid, &str)> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    if id.len() != 32 || secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((Uuid::try_parse(id).ok()?, secret))
}

/// Whether `secret` hashes with `salt` to `hash`, compared in constant time.
pub fn matches(secret: &str, salt: &[u8], hash: &[u8]) -> bool {
    same(hash, &salted(salt, secret))
}

/// Byte strings compared in time that does not depend on where they differ.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new lease token and the sha256 the store keeps of it.
pub fn lease_token() -> (String, [u8; 32]) {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let token = format!("{LEASE_PREFIX}{}", hex::encode(secret));
    let hash = lease_token_hash(&token);
    (token, hash)
}

/// The sha256 of a lease token as the store keeps it.
pub fn lease_token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The session cookie value of a dashboard login, and its stored sha256.
pub fn session() -> (String, [u8; 32]) {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let value = hex::encode(secret);
    let hash = Sha256::digest(value.as_bytes()).into();
    (value, hash)
}

/// The stored sha256 of a session cookie's value.
pub fn session_hash(value: &str) -> [u8; 32] {
    Sha256::digest(value.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_parses_and_only_its_own_secret_matches() {
        let token = generate();
        let (id, secret) = parse(&token.secret_token).expect("a token parses");
        assert_eq!(id, token.id);
        assert!(matches(secret, &token.salt, &token.hash));
        let other = generate();
        let (_, other_secret) = parse(&other.secret_token).unwrap();
        assert!(!matches(other_secret, &token.salt, &token.hash));
        assert!(parse("ptk_nothex_abc").is_none() && parse("Bearer x").is_none() && parse("").is_none());
        assert!(parse(&token.secret_token.replace("ptk_", "ptx_")).is_none());
    }

    #[test]
    fn lease_tokens_are_unguessable_and_hashed() {
        let (a, hash) = lease_token();
        let (b, _) = lease_token();
        assert_ne!(a, b);
        assert_eq!(lease_token_hash(&a), hash);
        assert_eq!(a.len(), 4 + 64);
    }
}

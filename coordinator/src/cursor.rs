//! Keyset cursors of the job listings (`ListJobs`, the dashboard's job
//! table): where the next page starts, as the sort key, `created_at` and id
//! of the last row of the page before.
//!
//! A page read with a cursor starts right after that row in the listing's
//! order, through an index, however deep the page: no row is counted or
//! skipped on the way, so the thousandth page costs what the first does.
//! Listings sort newest first within their key, so jobs submitted while a
//! client pages land before its cursor: every job that existed when the
//! first page was read is returned exactly once, and none twice.
//!
//! The token is opaque (hex of a versioned binary layout) and carries a
//! fingerprint of the listing it belongs to (filters and sort): a token
//! reused with other filters is refused instead of silently skipping rows.

use chrono::{DateTime, Utc};
use ptune_core::JobId;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The layout version: the first byte of every token.
const VERSION: u8 = 1;
/// Version, fingerprint, `created_at` in microseconds, id.
const FIXED_LEN: usize = 1 + 8 + 8 + 16;
/// Longest text key a cursor carries (names and owners are shorter).
const MAX_TEXT_KEY: usize = 1024;

/// The value of the listing's sort column in the last row of a page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SortKey {
    /// Sorted by creation only.
    Created,
    /// A text column (state, method, base model, owner, name).
    Text(String),
    /// Sweep and trial number; `None` for a job outside sweeps.
    Sweep(Option<(Uuid, i32)>),
}

/// Where the next page of a job listing starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobCursor {
    pub key: SortKey,
    pub created_at: DateTime<Utc>,
    pub id: JobId,
}

/// Why a page token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CursorError {
    /// Not a token this coordinator wrote.
    Malformed,
    /// A token of a listing with other filters or another sort.
    OtherListing,
}

impl CursorError {
    /// What to tell the client, after the field's name.
    pub fn message(self) -> &'static str {
        match self {
            CursorError::Malformed => "must be the next page token of a previous response, unchanged",
            CursorError::OtherListing => {
                "belongs to a listing with other filters or another sort; start again without a page token"
            }
        }
    }
}

impl JobCursor {
    /// The token of this cursor in the listing described by `listing` (a
    /// canonical text of its filters and sort).
    pub fn encode(&self, listing: &str) -> String {
        let mut bytes = Vec::with_capacity(FIXED_LEN + 24);
        bytes.push(VERSION);
        bytes.extend_from_slice(&fingerprint(listing));
        bytes.extend_from_slice(&self.created_at.timestamp_micros().to_be_bytes());
        bytes.extend_from_slice(self.id.0.as_bytes());
        match &self.key {
            SortKey::Created => bytes.push(0),
            SortKey::Text(text) => {
                bytes.push(1);
                bytes.extend_from_slice(text.as_bytes());
            }
            SortKey::Sweep(None) => bytes.push(2),
            SortKey::Sweep(Some((sweep, trial))) => {
                bytes.push(3);
                bytes.extend_from_slice(sweep.as_bytes());
                bytes.extend_from_slice(&trial.to_be_bytes());
            }
        }
        hex::encode(bytes)
    }

    /// Reads a token written by [`JobCursor::encode`] for the same listing.
    pub fn decode(token: &str, listing: &str) -> Result<Self, CursorError> {
        let bytes = hex::decode(token.trim()).map_err(|_| CursorError::Malformed)?;
        if bytes.len() <= FIXED_LEN || bytes[0] != VERSION {
            return Err(CursorError::Malformed);
        }
        let (head, key) = bytes.split_at(FIXED_LEN);
        let micros = i64::from_be_bytes(head[9..17].try_into().map_err(|_| CursorError::Malformed)?);
        let created_at = DateTime::from_timestamp_micros(micros).ok_or(CursorError::Malformed)?;
        let id = JobId(Uuid::from_slice(&head[17..33]).map_err(|_| CursorError::Malformed)?);
        let key = match (key[0], &key[1..]) {
            (0, []) => SortKey::Created,
            (1, text) if text.len() <= MAX_TEXT_KEY => {
                SortKey::Text(String::from_utf8(text.to_vec()).map_err(|_| CursorError::Malformed)?)
            }
            (2, []) => SortKey::Sweep(None),
            (3, rest) if rest.len() == 20 => {
                let sweep = Uuid::from_slice(&rest[..16]).map_err(|_| CursorError::Malformed)?;
                let trial = i32::from_be_bytes(rest[16..].try_into().map_err(|_| CursorError::Malformed)?);
                SortKey::Sweep(Some((sweep, trial)))
            }
            _ => return Err(CursorError::Malformed),
        };
        // Checked last, so a corrupt token reads as corrupt rather than as another listing's.
        if head[1..9] != fingerprint(listing) {
            return Err(CursorError::OtherListing);
        }
        Ok(JobCursor { key, created_at, id })
    }
}

/// The first 8 bytes of the SHA-256 of the listing's description: stable
/// across processes and versions, unlike `std`'s hasher.
fn fingerprint(listing: &str) -> [u8; 8] {
    let digest = Sha256::digest(listing.as_bytes());
    let mut out = [0; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(micros: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(micros).unwrap()
    }

    #[test]
    fn every_key_survives_a_round_trip() {
        let keys = [
            SortKey::Created,
            SortKey::Text("succeeded".into()),
            SortKey::Text(String::new()),
            SortKey::Text("naïve owner".into()),
            SortKey::Sweep(None),
            SortKey::Sweep(Some((Uuid::new_v4(), 41))),
        ];
        for key in keys {
            let cursor = JobCursor { key, created_at: at(1_700_000_000_123_456), id: JobId::new() };
            let token = cursor.encode("owner=alice");
            assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
            assert_eq!(JobCursor::decode(&token, "owner=alice"), Ok(cursor));
        }
    }

    #[test]
    fn a_token_of_another_listing_is_refused() {
        let cursor = JobCursor { key: SortKey::Created, created_at: at(1), id: JobId::new() };
        let token = cursor.encode("states=[Running]");
        assert_eq!(JobCursor::decode(&token, "states=[Queued]"), Err(CursorError::OtherListing));
    }

    #[test]
    fn damaged_tokens_are_refused() {
        let token = JobCursor { key: SortKey::Text("gpt2".into()), created_at: at(5), id: JobId::new() }.encode("");
        for bad in [
            "",
            "nonsense",
            "1700000000123456.0123456789abcdef0123456789abcdef",
            &token[..token.len() - 1],
            &token[..FIXED_LEN * 2],
            &format!("02{}", &token[2..]),
            &format!("{}ff", &token[..FIXED_LEN * 2]),
        ] {
            assert_eq!(JobCursor::decode(bad, ""), Err(CursorError::Malformed), "{bad:?}");
        }
    }
}

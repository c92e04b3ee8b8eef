//! Limits on what one caller can send, read and hold open: the largest
//! adapter a worker may upload, the rows of a page, and long-lived streams
//! (`WatchJob` and the dashboard's server-sent events), which are counted
//! per token and in all; a call beyond either stream limit is refused at
//! once rather than queued. Uploads must keep sending, or they are ended.
//! Request time limits are set where the servers are built (`server.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use crate::auth::Identity;
use crate::error::Error;

/// The largest files accepted: settings (`--max-adapter-mib`,
/// `--max-dataset-mib`), so that exports of fully fine-tuned large models
/// fit where the blob store has room for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileLimits {
    /// An adapter archive (a job's result); also what a full fine-tuning
    /// job's export may be estimated at.
    pub adapter: u64,
    /// An uploaded dataset.
    pub dataset: u64,
}

impl Default for FileLimits {
    fn default() -> Self {
        Self { adapter: 1_000_000_000, dataset: 1_000_000_000 }
    }
}

/// Rows per page of a listing (jobs, sweeps, workers) when the request does not say.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Most rows per page.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// The rows of a page asked for with `requested` (0: the default), at most [`MAX_PAGE_SIZE`].
pub fn page_size(requested: u32) -> u32 {
    if requested == 0 {
        DEFAULT_PAGE_SIZE
    } else {
        requested.min(MAX_PAGE_SIZE)
    }
}

/// How many streams may be open at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// For one token.
    pub streams_per_token: usize,
    /// For the whole coordinator.
    pub streams: usize,
    /// Longest wait for an upload's next message.
    pub upload_idle: Duration,
    /// Longest time a call may take to answer (its response's start; a
    /// stream it returns may run longer).
    pub request: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            streams_per_token: 32,
            streams: 2048,
            upload_idle: Duration::from_secs(60),
            request: Duration::from_secs(900),
        }
    }
}

/// Counts open streams; cloned handles share the counts.
#[derive(Clone, Debug)]
pub struct StreamLimits {
    limits: Limits,
    open: Arc<Mutex<Open>>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_token: HashMap<Uuid, usize>,
}

/// One open stream; dropping it (the stream ends or its client goes away)
/// frees its place.
#[derive(Debug)]
pub struct StreamPermit {
    open: Arc<Mutex<Open>>,
    token: Uuid,
}

impl StreamLimits {
    pub fn new(limits: Limits) -> Self {
        Self { limits, open: Arc::default() }
    }

    /// A place for one more stream of `caller`, or `ResourceExhausted`
    /// naming the limit. `what` names the stream for the message.
    pub fn acquire(&self, caller: &Identity, what: &str) -> Result<StreamPermit, Error> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mine = open.by_token.get(&caller.token_id).copied().unwrap_or(0);
        if mine >= self.limits.streams_per_token {
            return Err(Error::ResourceExhausted(format!(
                "token {:?} has {mine} streams open ({what} and the like), the most one token may hold \
                 (--max-streams-per-token {}); close one first",
                caller.name, self.limits.streams_per_token
            )));
        }
        if open.total >= self.limits.streams {
            return Err(Error::ResourceExhausted(format!(
                "the coordinator has {} streams open, its limit (--max-streams {}); retry later",
                open.total, self.limits.streams
            )));
        }
        open.total += 1;
        *open.by_token.entry(caller.token_id).or_default() += 1;
        Ok(StreamPermit { open: self.open.clone(), token: caller.token_id })
    }

    /// Streams open now, in all.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_token.get_mut(&self.token) {
            *n -= 1;
            if *n == 0 {
                open.by_token.remove(&self.token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn caller(name: &str) -> Identity {
        Identity { token_id: Uuid::new_v4(), name: name.into(), role: Role::Submitter }
    }

    #[test]
    fn streams_are_counted_per_token_and_in_all_and_freed_when_dropped() {
        let limits = StreamLimits::new(Limits { streams_per_token: 2, streams: 3, ..Limits::default() });
        let (ada, bob) = (caller("ada"), caller("bob"));
        let a1 = limits.acquire(&ada, "WatchJob").unwrap();
        let _a2 = limits.acquire(&ada, "WatchJob").unwrap();
        let e = limits.acquire(&ada, "WatchJob").unwrap_err().to_string();
        assert!(e.contains("token \"ada\" has 2 streams open") && e.contains("--max-streams-per-token 2"), "{e}");
        let _b1 = limits.acquire(&bob, "events").unwrap();
        let e = limits.acquire(&bob, "events").unwrap_err().to_string();
        assert!(e.contains("has 3 streams open") && e.contains("--max-streams 3"), "{e}");
        drop(a1);
        assert_eq!(limits.open(), 2);
        limits.acquire(&bob, "events").expect("a freed place is taken again");
    }
}

//! What the hottest calls read and rarely changes, kept in memory: API
//! token rows (every call authenticates) and what leasing reads of a
//! worker's registration (every `LeaseJob` call). An idle fleet then costs
//! the database nothing per call for either.
//!
//! Changes reach every coordinator on the database through `ptune_cache`
//! notifications, which triggers (migration 0017) send in the transaction
//! that changes a cached row; [`crate::relay`] hands them to
//! [`StoreCache::forget`]. The cache is trusted only while that listener is
//! connected: it starts off, is emptied and switched on when the listener
//! connects ([`StoreCache::trust`]), and emptied and switched off when it
//! drops ([`StoreCache::distrust`]), so a change made while nobody listened
//! is never served. A row read from the database is kept only if nothing
//! was forgotten while it was read (a revocation racing the read wins), and
//! entries expire after [`MAX_AGE`] whatever happens. What remains is the
//! moment between another coordinator's commit and its notification's
//! arrival, milliseconds, during which the old row may still be served.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

/// The longest an entry is served without being read again.
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// Entries one map holds at most; a full map is emptied of expired entries,
/// and emptied altogether if that is not enough.
const MAX_ENTRIES: usize = 100_000;

/// Which map a notification names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheKind {
    Token,
    Worker,
}

impl CacheKind {
    /// Reads a `ptune_cache` payload: `t:<token id>` or `w:<worker id>`.
    pub fn parse(payload: &str) -> Option<(Self, Uuid)> {
        let (kind, id) = payload.split_once(':')?;
        let kind = match kind {
            "t" => Self::Token,
            "w" => Self::Worker,
            _ => return None,
        };
        Some((kind, Uuid::parse_str(id).ok()?))
    }
}

/// One map of rows by id.
struct Map<V> {
    entries: HashMap<Uuid, (Instant, V)>,
}

impl<V: Clone> Map<V> {
    fn get(&self, id: Uuid) -> Option<V> {
        self.entries.get(&id).filter(|(at, _)| at.elapsed() < MAX_AGE).map(|(_, v)| v.clone())
    }

    fn put(&mut self, id: Uuid, value: V) {
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.retain(|_, (at, _)| at.elapsed() < MAX_AGE);
            if self.entries.len() >= MAX_ENTRIES {
                self.entries.clear();
            }
        }
        self.entries.insert(id, (Instant::now(), value));
    }
}

impl<V> Default for Map<V> {
    fn default() -> Self {
        Self { entries: HashMap::new() }
    }
}

struct State<T, W> {
    trusted: bool,
    /// Counts every forget and clear, so a read that raced one is not kept.
    generation: u64,
    tokens: Map<T>,
    workers: Map<W>,
}

/// Token rows `T` and worker registrations `W` by id. See the module docs.
pub struct StoreCache<T, W> {
    state: Mutex<State<T, W>>,
}

impl<T, W> std::fmt::Debug for StoreCache<T, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f.debug_struct("StoreCache")
            .field("trusted", &state.trusted)
            .field("tokens", &state.tokens.entries.len())
            .field("workers", &state.workers.entries.len())
            .finish()
    }
}

impl<T, W> Default for StoreCache<T, W> {
    fn default() -> Self {
        Self { state: Mutex::new(State { trusted: false, generation: 0, tokens: Map::default(), workers: Map::default() }) }
    }
}

/// Where a read of the database started, for [`StoreCache::put_token`] and
/// [`StoreCache::put_worker`]; `None` while the cache is not trusted.
#[derive(Clone, Copy, Debug)]
pub struct ReadStart(Option<u64>);

impl<T: Clone, W: Clone> StoreCache<T, W> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<T, W>> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached token row `id`, if trusted and fresh.
    pub fn token(&self, id: Uuid) -> Option<T> {
        let state = self.lock();
        state.trusted.then(|| state.tokens.get(id)).flatten()
    }

    /// The cached registration of worker `id`, if trusted and fresh.
    pub fn worker(&self, id: Uuid) -> Option<W> {
        let state = self.lock();
        state.trusted.then(|| state.workers.get(id)).flatten()
    }

    /// Call before reading a row from the database.
    pub fn read_start(&self) -> ReadStart {
        let state = self.lock();
        ReadStart(state.trusted.then_some(state.generation))
    }

    /// Keeps token row `id` read since `start`, unless something was
    /// forgotten meanwhile.
    pub fn put_token(&self, start: ReadStart, id: Uuid, row: T) {
        let mut state = self.lock();
        if start.0 == Some(state.generation) && state.trusted {
            state.tokens.put(id, row);
        }
    }

    /// Keeps worker `id`'s registration read since `start`, unless
    /// something was forgotten meanwhile.
    pub fn put_worker(&self, start: ReadStart, id: Uuid, registration: W) {
        let mut state = self.lock();
        if start.0 == Some(state.generation) && state.trusted {
            state.workers.put(id, registration);
        }
    }

    /// Drops row `id` of `kind` (it changed).
    pub fn forget(&self, kind: CacheKind, id: Uuid) {
        let mut state = self.lock();
        state.generation = state.generation.wrapping_add(1);
        match kind {
            CacheKind::Token => drop(state.tokens.entries.remove(&id)),
            CacheKind::Worker => drop(state.workers.entries.remove(&id)),
        }
    }

    /// The change notifications are heard from now on: starts serving,
    /// from empty.
    pub fn trust(&self) {
        self.reset(true);
    }

    /// The change notifications may be missed from now on: empties the
    /// cache and reads through until [`StoreCache::trust`].
    pub fn distrust(&self) {
        self.reset(false);
    }

    fn reset(&self, trusted: bool) {
        let mut state = self.lock();
        state.trusted = trusted;
        state.generation = state.generation.wrapping_add(1);
        state.tokens = Map::default();
        state.workers = Map::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Cache = StoreCache<&'static str, u32>;

    #[test]
    fn nothing_is_served_until_the_notifications_are_heard() {
        let cache = Cache::default();
        let id = Uuid::new_v4();
        let start = cache.read_start();
        cache.put_token(start, id, "row");
        assert_eq!(cache.token(id), None, "kept before the listener connected");
        cache.trust();
        let start = cache.read_start();
        cache.put_token(start, id, "row");
        assert_eq!(cache.token(id), Some("row"));
        cache.distrust();
        assert_eq!(cache.token(id), None, "served after the listener dropped");
    }

    #[test]
    fn a_forgotten_row_is_read_again_and_a_read_that_raced_a_change_is_not_kept() {
        let cache = Cache::default();
        cache.trust();
        let (token, worker) = (Uuid::new_v4(), Uuid::new_v4());
        let start = cache.read_start();
        cache.put_token(start, token, "old");
        cache.put_worker(start, worker, 1);
        cache.forget(CacheKind::Token, token);
        assert_eq!(cache.token(token), None);
        assert_eq!(cache.worker(worker), Some(1), "another kind's row is kept");
        // A read that started before a change (here: of another row) is not kept.
        let start = cache.read_start();
        cache.forget(CacheKind::Worker, Uuid::new_v4());
        cache.put_token(start, token, "stale");
        assert_eq!(cache.token(token), None);
    }

    #[test]
    fn payloads_name_a_kind_and_an_id() {
        let id = Uuid::new_v4();
        assert_eq!(CacheKind::parse(&format!("t:{id}")), Some((CacheKind::Token, id)));
        assert_eq!(CacheKind::parse(&format!("w:{id}")), Some((CacheKind::Worker, id)));
        assert_eq!(CacheKind::parse("x:1"), None);
        assert_eq!(CacheKind::parse("t:not-a-uuid"), None);
    }
}

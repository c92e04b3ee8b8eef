//! Randomness a job can reproduce whatever else shares its forward pass.
//!
//! libtorch has one global generator per device. When several jobs train in
//! one packed pass, each job's dropout must still be the same as when it
//! trains alone, so every job draws from its own [`DropoutStream`]: while a
//! stream is active on the thread ([`with_stream`]), every dropout call
//! reseeds the global generator from the stream's seed and the number of
//! draws so far. A job's masks then depend only on its seed, its step, and
//! the order of its own dropout calls, which is the same packed or alone.

use std::cell::Cell;
use std::rc::Rc;

/// SplitMix64 of `seed` and `n`: unrelated 63-bit seeds for neighbouring
/// inputs.
pub fn mix(seed: u64, n: u64) -> i64 {
    let mut z = seed ^ n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// One job's dropout randomness for one step. Clones share the count of draws.
#[derive(Clone, Debug)]
pub struct DropoutStream {
    seed: u64,
    draws: Rc<Cell<u64>>,
}

impl DropoutStream {
    pub fn new(seed: i64) -> Self {
        Self { seed: seed as u64, draws: Rc::new(Cell::new(0)) }
    }

    /// The stream of data-parallel rank `rank` for the same step: its own
    /// seed, so ranks draw unrelated masks for their shares.
    pub fn for_rank(&self, rank: usize) -> Self {
        Self::new(mix(self.seed, rank as u64))
    }

    /// Reseeds libtorch's generator for the stream's next draw.
    fn reseed(&self) {
        let n = self.draws.get();
        self.draws.set(n + 1);
        tch::manual_seed(mix(self.seed, n));
    }
}

thread_local! {
    static ACTIVE: std::cell::RefCell<Option<DropoutStream>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with `stream` active on this thread (or none: the global
/// generator as it stands). On entry the generator is reseeded from the
/// stream, so draws that do not go through [`before_draw`] (an LSTM's own
/// dropout, say) are reproducible too.
pub fn with_stream<T>(stream: Option<&DropoutStream>, f: impl FnOnce() -> T) -> T {
    if let Some(stream) = stream {
        stream.reseed();
    }
    let outer = ACTIVE.with(|active| active.replace(stream.cloned()));
    let out = f();
    ACTIVE.with(|active| active.replace(outer));
    out
}

/// Called before each dropout mask is drawn: reseeds from the active stream.
pub fn before_draw() {
    ACTIVE.with(|active| {
        if let Some(stream) = active.borrow().as_ref() {
            stream.reseed();
        }
    });
}

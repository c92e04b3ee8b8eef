//! A small, portable random number generator for sampling trials.
//!
//! Trials must be reproducible from their sweep's seed forever, across
//! coordinator versions and machines, so the generator is spelled out here
//! rather than borrowed from a crate whose streams may change: SplitMix64
//! (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
//! OOPSLA 2014), as used to seed xoshiro.

/// SplitMix64: 64 bits of state, one multiply-xorshift finaliser per draw.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The stream of draw `draw` of trial `trial` of a sweep seeded `seed`:
    /// independent of every other (trial, draw), so trial `i` gets the same
    /// parameters whatever happened to the trials before it.
    pub fn for_trial(seed: u64, trial: u64, draw: u64) -> Self {
        let key = mix(mix(mix(seed ^ GOLDEN_GAMMA) ^ trial) ^ draw.wrapping_mul(GOLDEN_GAMMA));
        Self::new(key)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix(self.state)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`), by Lemire's multiply-shift; the bias is
    /// below 2^-40 for the sizes a search space has.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_matches_the_reference_splitmix64() {
        // Reference values of SplitMix64 seeded with 0 (Vigna's splitmix64.c).
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(rng.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn trial_streams_are_independent_and_draws_stay_in_range() {
        let a = SplitMix64::for_trial(7, 0, 0).next_u64();
        let b = SplitMix64::for_trial(7, 1, 0).next_u64();
        let c = SplitMix64::for_trial(7, 0, 1).next_u64();
        let d = SplitMix64::for_trial(8, 0, 0).next_u64();
        assert!(a != b && a != c && a != d && b != c);
        assert_eq!(a, SplitMix64::for_trial(7, 0, 0).next_u64());
        let mut rng = SplitMix64::new(3);
        for _ in 0..1000 {
            let u = rng.next_f64();
            assert!((0.0..1.0).contains(&u));
            assert!(rng.below(5) < 5);
        }
    }
}

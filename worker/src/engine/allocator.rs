//! Keeping the C allocator from holding on to the memory libtorch frees
//! between steps.
//!
//! On the CPU, libtorch allocates every tensor with the C library's
//! `malloc`. glibc's serves blocks above its mmap threshold with their own
//! mappings, but raises that threshold (up to 32 MiB) to the size of every
//! such block freed, so after the first steps a step's activations come
//! from its heaps, and freed memory stays there: a step whose batch has
//! other lengths than the last cannot reuse it exactly, and the process
//! grows step after step. The demo job on SST-2 (prompt tuning, batch 32,
//! 125 steps) grew from 600 MiB at its first step to 1.29 GB by its last.
//!
//! Two measures, measured on 30 steps of that job on one thread
//! (`docs/benchmarks.md`, "Memory estimate against measured peak"):
//! [`configure`] pins the threshold at [`MMAP_THRESHOLD`], so blocks that
//! large go back to the system when freed, and the training loop trims the
//! heaps ([`release_free_memory`]) every few steps and after every
//! evaluation. Together they took the peak from 777 to 680 MiB, for about a
//! tenth more time. Returning memory has a price, the page faults of
//! touching it again: a threshold of 1 MiB or less bounded the peak at
//! about 520 MiB but made the steps a third to a half slower, and trimming
//! before every step (689 MiB) a fifth slower.
#![allow(unsafe_code)]

/// Blocks at least this large get their own mapping, returned when freed.
pub const MMAP_THRESHOLD: usize = 4 << 20;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::ffi::c_int;

    /// `M_MMAP_THRESHOLD` of glibc's `malloc.h`.
    pub const M_MMAP_THRESHOLD: c_int = -3;

    extern "C" {
        pub fn mallopt(param: c_int, value: c_int) -> c_int;
        pub fn malloc_trim(pad: usize) -> c_int;
    }
}

/// Pins glibc's mmap threshold at [`MMAP_THRESHOLD`] for the whole process
/// (once; later calls do nothing); a no-op with other C libraries.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt takes two integers and changes a setting of
            // the allocator under its own lock.
            let done = unsafe { glibc::mallopt(glibc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as std::ffi::c_int) };
            if done != 1 {
                tracing::warn!("could not set the allocator's mmap threshold");
            }
        });
    }
}

/// Returns the free memory of every malloc arena to the system (glibc's
/// `malloc_trim`); a no-op with other C libraries.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer and only walks the allocator's
    // own free lists, under its locks.
    unsafe {
        glibc::malloc_trim(0);
    }
}

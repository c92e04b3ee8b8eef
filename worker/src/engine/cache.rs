//! The base models a worker process holds: each loaded once, keyed by its
//! folder, the sha256 of its weights and the precision it computes in (an
//! fp32 and a bf16 job never share weights), and shared by every engine thread
//! and every job on it. When loading another model would exceed the memory
//! budget, models no running job uses are evicted, least recently used
//! first.
//!
//! A folder's weights are hashed when it is first seen and again only when
//! the files' sizes or modification times change, so a job does not pay for
//! hashing gigabytes on every start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ptune_core::Precision;
use tch::Device;

use super::error::EngineError;
use super::models::frozen::{FrozenBase, FrozenDecoder, FrozenEncoder};
use super::models::safetensors::{checkpoint_files, checkpoint_sha256};

/// A frozen base model shared by engine threads.
pub struct SharedModel {
    pub model: FrozenBase,
    /// Bytes its weights take (4 per parameter in fp32, 2 in bf16 and fp16).
    pub bytes: u64,
    pub sha256: String,
    /// The precision its weights were converted to.
    pub precision: Precision,
}

// SAFETY: a `tch::Tensor` is `Send` but not `Sync` only because it wraps a
// raw pointer to a libtorch tensor. A shared model's tensors are frozen
// (`requires_grad` off) and never written after loading: engine threads only
// read them as operands of new tensors, and libtorch supports concurrent
// reads of a tensor from several threads (reference counts are atomic, and
// tensors without gradients carry no autograd state to update). Nothing
// hands out mutable access to them. This is the one exception to the
// workspace's `unsafe_code = "deny"`.
#[allow(unsafe_code)]
unsafe impl Sync for SharedModel {}

impl SharedModel {
    /// The encoder, if this is one.
    pub fn encoder(&self) -> Option<&FrozenEncoder> {
        self.model.encoder()
    }

    /// The decoder, if this is one.
    pub fn decoder(&self) -> Option<&FrozenDecoder> {
        self.model.decoder()
    }
}

/// What the cache holds and has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub models: usize,
    pub bytes: u64,
    pub loads: u64,
    pub evictions: u64,
}

/// The process's base models, shared by its engine threads.
pub struct ModelCache {
    device: Device,
    /// Most bytes of model weights to keep loaded (`None`: no limit).
    budget: Option<u64>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<(PathBuf, String, Precision), Entry>,
    /// Per folder: the files' fingerprint when last hashed, and the hash.
    hashes: HashMap<PathBuf, (Vec<(u64, SystemTime)>, String)>,
    clock: u64,
    loads: u64,
    evictions: u64,
}

struct Entry {
    model: Arc<SharedModel>,
    last_used: u64,
}

impl ModelCache {
    pub fn new(device: Device, budget: Option<u64>) -> Self {
        Self { device, budget, inner: Mutex::new(Inner::default()) }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The model in `dir` (an encoder or a decoder, as its config says):
    /// the copy already loaded from the same folder with the same weights,
    /// or a new one, evicting unused models as the budget requires.
    pub fn get(&self, dir: &Path) -> Result<Arc<SharedModel>, EngineError> {
        self.get_in(dir, Precision::Fp32)
    }

    /// The model in `dir` in `precision`, as [`Self::get`] finds or loads
    /// it: the same folder in another precision is another entry.
    pub fn get_in(&self, dir: &Path, precision: Precision) -> Result<Arc<SharedModel>, EngineError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let sha256 = inner.sha256(dir)?;
        inner.clock += 1;
        let now = inner.clock;
        let key = (dir.to_path_buf(), sha256.clone(), precision);
        if let Some(entry) = inner.entries.get_mut(&key) {
            entry.last_used = now;
            return Ok(entry.model.clone());
        }
        let model = FrozenBase::load_in(dir, self.device, precision)?;
        let bytes = model.info().parameters * precision.bytes();
        inner.make_room(bytes, self.budget);
        let shared = Arc::new(SharedModel { model, bytes, sha256, precision });
        inner.loads += 1;
        tracing::info!(model_dir = %dir.display(), sha256 = %shared.sha256, %precision, bytes, "base model loaded");
        inner.entries.insert(key, Entry { model: shared.clone(), last_used: now });
        Ok(shared)
    }

    /// Folders of the models loaded now, sorted (a folder loaded with two
    /// versions of its weights appears once).
    pub fn loaded_dirs(&self) -> Vec<PathBuf> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut dirs: Vec<PathBuf> = inner.entries.keys().map(|(dir, _, _)| dir.clone()).collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    pub fn stats(&self) -> CacheStats {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        CacheStats {
            models: inner.entries.len(),
            bytes: inner.entries.values().map(|e| e.model.bytes).sum(),
            loads: inner.loads,
            evictions: inner.evictions,
        }
    }
}

impl Inner {
    /// The sha256 of the folder's weights, hashed again only when a file
    /// changed size or modification time.
    fn sha256(&mut self, dir: &Path) -> Result<String, EngineError> {
        let files = checkpoint_files(dir)?;
        let fingerprint = files
            .iter()
            .map(|path| {
                let meta = std::fs::metadata(path).map_err(|e| EngineError::io(path, e))?;
                Ok((meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        if let Some((known, sha256)) = self.hashes.get(dir) {
            if *known == fingerprint {
                return Ok(sha256.clone());
            }
        }
        let sha256 = checkpoint_sha256(dir)?;
        self.hashes.insert(dir.to_path_buf(), (fingerprint, sha256.clone()));
        Ok(sha256)
    }

    /// Evicts models no job uses, least recently used first, until `bytes`
    /// more fit in `budget`. Models in use stay even over the budget.
    fn make_room(&mut self, bytes: u64, budget: Option<u64>) {
        let Some(budget) = budget else { return };
        loop {
            let held: u64 = self.entries.values().map(|e| e.model.bytes).sum();
            if held + bytes <= budget {
                return;
            }
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| Arc::strong_count(&e.model) == 1)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(key, _)| key.clone());
            let Some(key) = victim else {
                tracing::warn!(held, bytes, budget, "models in use exceed the memory budget; loading anyway");
                return;
            };
            let entry = self.entries.remove(&key).expect("the victim is cached");
            self.evictions += 1;
            tracing::info!(model_dir = %key.0.display(), bytes = entry.model.bytes, "base model evicted (least recently used)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    #[test]
    fn every_thread_gets_the_one_copy_of_a_model() {
        let cache = Arc::new(ModelCache::new(Device::Cpu, None));
        let first = cache.get(&fixture("tiny-bert")).unwrap();
        let others: Vec<Arc<SharedModel>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| cache.get(&fixture("tiny-bert")).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(others.iter().all(|m| Arc::ptr_eq(m, &first)), "one copy for every thread");
        let stats = cache.stats();
        assert_eq!((stats.models, stats.loads, stats.evictions), (1, 1, 0));
        assert!(first.encoder().is_some() && first.decoder().is_none());
        assert_eq!(stats.bytes, first.bytes);
        assert_eq!(cache.loaded_dirs(), [fixture("tiny-bert")]);
    }

    #[test]
    fn a_bf16_job_gets_its_own_half_sized_copy_of_a_model() {
        let cache = ModelCache::new(Device::Cpu, None);
        let fp32 = cache.get(&fixture("tiny-bert")).unwrap();
        let bf16 = cache.get_in(&fixture("tiny-bert"), Precision::Bf16).unwrap();
        assert!(!Arc::ptr_eq(&fp32, &bf16), "fp32 and bf16 jobs do not share weights");
        assert!(Arc::ptr_eq(&bf16, &cache.get_in(&fixture("tiny-bert"), Precision::Bf16).unwrap()));
        assert_eq!(bf16.bytes * 2, fp32.bytes);
        let kinds = |model: &SharedModel| model.encoder().unwrap().encoder.tensors().iter().map(|t| t.kind()).collect::<Vec<_>>();
        assert!(kinds(&fp32).iter().all(|&k| k == tch::Kind::Float));
        assert!(kinds(&bf16).iter().all(|&k| k == tch::Kind::BFloat16));
        assert_eq!((cache.stats().models, cache.stats().loads), (2, 2));
        assert_eq!(cache.loaded_dirs(), [fixture("tiny-bert")]);
    }

    #[test]
    fn unused_models_are_evicted_least_recently_used_first_under_the_budget() {
        let probe = ModelCache::new(Device::Cpu, None);
        let bert = probe.get(&fixture("tiny-bert")).unwrap().bytes;
        let gpt2 = probe.get(&fixture("tiny-gpt2")).unwrap().bytes;
        let qwen2 = probe.get(&fixture("tiny-qwen2")).unwrap().bytes;
        // Room for any two of the three.
        let budget = bert + gpt2 + qwen2 - bert.min(gpt2).min(qwen2) + 1;
        let cache = ModelCache::new(Device::Cpu, Some(budget));

        drop(cache.get(&fixture("tiny-bert")).unwrap());
        drop(cache.get(&fixture("tiny-gpt2")).unwrap());
        // tiny-bert was used again most recently: tiny-gpt2 goes.
        drop(cache.get(&fixture("tiny-bert")).unwrap());
        drop(cache.get(&fixture("tiny-qwen2")).unwrap());
        let stats = cache.stats();
        assert_eq!((stats.models, stats.loads, stats.evictions), (2, 3, 1));
        assert!(stats.bytes <= budget);
        let reloaded = cache.get(&fixture("tiny-bert")).unwrap();
        assert_eq!(cache.stats().loads, 3, "tiny-bert stayed loaded");

        // A model in use is never evicted, even over the budget.
        let _gpt2 = cache.get(&fixture("tiny-gpt2")).unwrap();
        let stats = cache.stats();
        assert_eq!((stats.loads, stats.evictions), (4, 2), "tiny-qwen2, unused, went");
        let _qwen2 = cache.get(&fixture("tiny-qwen2")).unwrap();
        let stats = cache.stats();
        assert_eq!((stats.models, stats.evictions), (3, 2), "all three are in use: none can go");
        drop(reloaded);
    }
}

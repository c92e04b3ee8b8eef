//! The devices a worker trains on (`--devices`), and one engine per device:
//! each has its own model cache (the frozen bases live in that device's
//! memory) and its own engine threads and packs, so one worker process
//! serves every GPU of a machine. A lease names the devices its job got;
//! the job runs on the engine of the first of them.
//!
//! Device memory is what the coordinator places jobs by: for a GPU, its
//! memory less what other processes held on it when the worker started
//! (from `nvidia-smi`, the CUDA driver's tool, since libtorch does not
//! expose it), so a GPU shared with another tenant is not overcommitted;
//! for the CPU, the machine's memory, capped by `--memory-mib` (other
//! processes' use of RAM comes and goes, and the operator caps it). Builds with the `integration` feature also accept test devices
//! `cpu:0`, `cpu:1`, ... (separate engines on the CPU) and take their
//! memory from `PTUNE_TEST_DEVICE_MEMORY` (`4GiB,512MiB`), so that tests on a
//! machine without a GPU can place jobs on several devices.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use ptune_proto::v1;

use super::runner::EnginePool;
use crate::engine::{ModelCache, PackLimits};

/// A device this worker trains on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerDevice {
    /// "cpu" or "cuda:N" (test builds: also "cpu:N").
    pub name: String,
    pub device: tch::Device,
    /// Bytes jobs on it may use (0: unknown).
    pub memory_bytes: u64,
    /// Bytes free on it now (0: unknown).
    pub free_memory_bytes: u64,
}

impl WorkerDevice {
    pub fn to_wire(&self) -> v1::Device {
        v1::Device {
            name: self.name.clone(),
            memory_bytes: self.memory_bytes,
            free_memory_bytes: self.free_memory_bytes,
        }
    }
}

/// The devices `--devices` names: `auto` (every GPU libtorch sees, else the
/// CPU), `cpu`, or a comma-separated list of `cuda:N`. `memory_cap` caps the
/// CPU's memory (`--memory-mib`); a GPU counts its own.
pub fn resolve(choice: &str, memory_cap: Option<u64>) -> anyhow::Result<Vec<WorkerDevice>> {
    let names: Vec<String> = match choice.trim() {
        "auto" => match tch::Cuda::device_count() {
            0 => vec!["cpu".into()],
            n => (0..n).map(|i| format!("cuda:{i}")).collect(),
        },
        list => list.split(',').map(|n| n.trim().to_string()).collect(),
    };
    let test_memory = test_memory(names.len())?;
    let mut gpus = None;
    let mut devices: Vec<WorkerDevice> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if devices.iter().any(|d| &d.name == name) {
            bail!("devices: {name:?} is listed twice");
        }
        let (device, memory, free) = match parse(name)? {
            tch::Device::Cpu => (tch::Device::Cpu, total_memory_bytes(), available_memory_bytes()),
            tch::Device::Cuda(index) => {
                let visible = tch::Cuda::device_count();
                if index as i64 >= visible {
                    bail!("devices: {name} is not a GPU libtorch sees (it sees {visible}); use auto or cpu, or cuda:0 to cuda:N-1");
                }
                let gpus = gpus.get_or_insert_with(gpu_memory);
                let (total, free) = gpus.get(index).copied().unwrap_or_else(|| {
                    tracing::warn!(device = %name, "cannot read the GPU's memory (nvidia-smi); the coordinator places jobs on it regardless of memory");
                    (0, 0)
                });
                let room = gpu_room(total, free);
                // The driver keeps a few hundred MiB of every GPU; more than a GiB is someone else's.
                if total - room > 1 << 30 {
                    tracing::warn!(device = %name, total_bytes = total, held_by_others_bytes = total - room,
                                   "other processes hold memory on this GPU; jobs are placed in what is left");
                }
                (tch::Device::Cuda(index), room, free)
            }
            other => bail!("devices: {name:?} names an unsupported device {other:?}"),
        };
        // `--memory-mib` is the machine's memory the worker may use: it caps the CPU, not a GPU's own memory.
        let memory = match (test_memory.as_ref().map(|m| m[i]), memory_cap) {
            (Some(declared), _) => declared,
            (None, Some(cap)) if device == tch::Device::Cpu => memory.min(cap),
            (None, _) => memory,
        };
        devices.push(WorkerDevice { name: name.clone(), device, memory_bytes: memory, free_memory_bytes: free });
    }
    if devices.is_empty() {
        bail!("devices: name at least one device: auto, cpu or cuda:0,cuda:1,...");
    }
    Ok(devices)
}

/// The tch device a name (`cpu` or `cuda:N`) stands for.
pub fn parse(name: &str) -> anyhow::Result<tch::Device> {
    let bad = || {
        anyhow::anyhow!("devices: {name:?} is not a device; use auto, cpu, or a comma-separated list of cuda:N (e.g. cuda:0,cuda:1)")
    };
    match name.split_once(':') {
        None if name == "cpu" => Ok(tch::Device::Cpu),
        Some(("cuda", index)) => Ok(tch::Device::Cuda(index.parse().map_err(|_| bad())?)),
        Some(("cpu", index)) if cfg!(feature = "integration") => {
            index.parse::<usize>().map_err(|_| bad())?;
            Ok(tch::Device::Cpu)
        }
        _ => Err(bad()),
    }
}

/// Device memory declared by `PTUNE_TEST_DEVICE_MEMORY` (one size per
/// device, e.g. `4GiB,4GiB`): honoured only by builds with the
/// `integration` feature, for tests on machines without a GPU.
fn test_memory(devices: usize) -> anyhow::Result<Option<Vec<u64>>> {
    if !cfg!(feature = "integration") {
        return Ok(None);
    }
    let Ok(list) = std::env::var("PTUNE_TEST_DEVICE_MEMORY") else { return Ok(None) };
    let sizes: Vec<u64> = list.split(',').map(|s| parse_size(s.trim())).collect::<anyhow::Result<_>>()?;
    if sizes.len() != devices {
        bail!("PTUNE_TEST_DEVICE_MEMORY: {} sizes for {devices} devices", sizes.len());
    }
    Ok(Some(sizes))
}

/// `4GiB`, `512MiB`, `64KiB` or a number of bytes.
fn parse_size(text: &str) -> anyhow::Result<u64> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit {
        "" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => bail!("size {text:?}: use a number of bytes, KiB, MiB or GiB (e.g. 4GiB)"),
    };
    let n: u64 = number.parse().with_context(|| format!("size {text:?}: not a number"))?;
    n.checked_shl(shift).filter(|b| b >> shift == n).with_context(|| format!("size {text:?} is too large"))
}

/// The memory jobs may use on a GPU with `total` bytes of which `free` are
/// free as the worker starts, before it holds any: what other processes
/// hold is left out. With the free memory unknown (0), all of it.
fn gpu_room(total: u64, free: u64) -> u64 {
    if free == 0 {
        total
    } else {
        free.min(total)
    }
}

/// Total and free bytes of each GPU the process sees, by CUDA index, from
/// `nvidia-smi`; empty when it cannot be read.
fn gpu_memory() -> Vec<(u64, u64)> {
    let output = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=index,uuid,memory.total,memory.free", "--format=csv,noheader,nounits"])
        .output();
    let Some(output) = output.ok().filter(|o| o.status.success()) else { return Vec::new() };
    parse_gpu_memory(&String::from_utf8_lossy(&output.stdout), std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref())
}

/// Total and free bytes by CUDA index from `nvidia-smi`'s CSV lines (index,
/// uuid, MiB total, MiB free). `visible` (`CUDA_VISIBLE_DEVICES`: indices
/// or GPU UUIDs, or their prefixes) maps CUDA indices to the GPUs listed.
fn parse_gpu_memory(csv: &str, visible: Option<&str>) -> Vec<(u64, u64)> {
    let gpus: Vec<(String, String, u64, u64)> = csv
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [index, uuid, total, free] = fields[..] else { return None };
            Some((
                index.to_string(),
                uuid.to_string(),
                total.parse::<u64>().ok()? << 20,
                free.parse::<u64>().ok()? << 20,
            ))
        })
        .collect();
    let visible: Vec<String> = match visible {
        Some(list) if !list.trim().is_empty() => list.split(',').map(|s| s.trim().to_string()).collect(),
        _ => gpus.iter().map(|g| g.0.clone()).collect(),
    };
    visible
        .iter()
        .map_while(|id| gpus.iter().find(|g| &g.0 == id || g.1.starts_with(id.as_str())).map(|g| (g.2, g.3)))
        .collect()
}

/// The machine's memory.
pub fn total_memory_bytes() -> u64 {
    super::proc_bytes("/proc/meminfo", "MemTotal:")
}

fn available_memory_bytes() -> u64 {
    super::proc_bytes("/proc/meminfo", "MemAvailable:")
}

/// A device's engine: its threads, packs and model cache.
pub struct DeviceEngine {
    pub name: String,
    pub device: tch::Device,
    pub pool: EnginePool,
    pub cache: Arc<ModelCache>,
}

/// One engine per device. Cheap to clone.
#[derive(Clone)]
pub struct Engines(Arc<Vec<DeviceEngine>>);

impl Engines {
    /// Starts `slots` engine threads on each of `devices`, each device with
    /// its own model cache of at most `model_memory` bytes of weights.
    pub fn start(
        devices: &[WorkerDevice],
        slots: usize,
        threads: u32,
        model_memory: Option<u64>,
        pack: PackLimits,
    ) -> Self {
        let engines = devices
            .iter()
            .map(|d| {
                let cache = Arc::new(ModelCache::new(d.device, model_memory));
                let pool = EnginePool::start(slots, threads, cache.clone(), pack);
                DeviceEngine { name: d.name.clone(), device: d.device, pool, cache }
            })
            .collect();
        Self(Arc::new(engines))
    }

    /// The engine a lease's job runs on, that of the first device it names
    /// (the first device when it names none: a coordinator that predates
    /// devices), and the tch devices of all it names, that engine's first.
    pub fn for_lease(&self, names: &[String]) -> Result<(&DeviceEngine, Vec<tch::Device>), String> {
        let mut chosen = Vec::new();
        for name in names {
            match self.0.iter().find(|e| &e.name == name) {
                Some(engine) => chosen.push(engine),
                None => return Err(format!("the lease names device {name:?}, which this worker does not have")),
            }
        }
        let first = chosen.first().copied().or(self.0.first()).ok_or("this worker has no device")?;
        let devices = if chosen.is_empty() { vec![first.device] } else { chosen.iter().map(|e| e.device).collect() };
        Ok((first, devices))
    }

    /// Model folders loaded on any device.
    pub fn loaded_dirs(&self) -> HashSet<PathBuf> {
        self.0.iter().flat_map(|e| e.cache.loaded_dirs()).collect()
    }

    /// Engine threads given up on, over every device.
    pub fn abandoned(&self) -> usize {
        self.0.iter().map(|e| e.pool.abandoned()).sum()
    }

    pub fn shutdown(&self) {
        for engine in self.0.iter() {
            engine.pool.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_bytes() {
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("4GB").unwrap_err().to_string().contains("KiB, MiB or GiB"));
        assert!(parse_size("99999999999GiB").is_err());
    }

    #[test]
    fn the_cpu_and_cuda_devices_parse_and_others_are_refused_with_the_choices() {
        assert_eq!(parse("cpu").unwrap(), tch::Device::Cpu);
        assert_eq!(parse("cuda:3").unwrap(), tch::Device::Cuda(3));
        let err = parse("gpu0").unwrap_err().to_string();
        assert!(err.contains("use auto, cpu, or a comma-separated list of cuda:N"), "{err}");
        assert!(parse("cuda:x").is_err());
    }

    #[test]
    fn the_cpu_device_has_the_machines_memory_capped_by_the_flag() {
        let cpu = resolve("cpu", None).unwrap();
        assert_eq!(cpu.len(), 1);
        assert_eq!((cpu[0].name.as_str(), cpu[0].device), ("cpu", tch::Device::Cpu));
        assert_eq!(cpu[0].memory_bytes, total_memory_bytes());
        assert!(cpu[0].memory_bytes > 0);
        assert_eq!(resolve("cpu", Some(1 << 30)).unwrap()[0].memory_bytes, (1 << 30).min(total_memory_bytes()));
        let err = resolve("cpu,cpu", None).unwrap_err().to_string();
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn a_gpu_offers_what_other_processes_leave_free_as_nvidia_smi_lists_it() {
        let csv = "0, GPU-aaaa1111, 81559, 81000\n1, GPU-bbbb2222, 81559, 40960\n";
        let (mib, gib) = (1u64 << 20, 1u64 << 30);
        assert_eq!(parse_gpu_memory(csv, None), [(81559 * mib, 81000 * mib), (81559 * mib, 40 * gib)]);
        // CUDA_VISIBLE_DEVICES renumbers: CUDA index 0 is the GPU it names first, by index or UUID prefix.
        assert_eq!(parse_gpu_memory(csv, Some("1,0")), [(81559 * mib, 40 * gib), (81559 * mib, 81000 * mib)]);
        assert_eq!(parse_gpu_memory(csv, Some("GPU-bbbb")), [(81559 * mib, 40 * gib)]);
        assert_eq!(parse_gpu_memory("not csv\n", None), []);
        // Another tenant holding 40 GiB of an 80 GiB GPU leaves 40 GiB to place jobs in.
        assert_eq!(gpu_room(80 * gib, 40 * gib), 40 * gib);
        assert_eq!(gpu_room(80 * gib, 0), 80 * gib, "free memory unknown: all of it");
    }

    #[test]
    fn auto_takes_every_gpu_else_the_cpu() {
        let names: Vec<String> = resolve("auto", None).unwrap().into_iter().map(|d| d.name).collect();
        match tch::Cuda::device_count() {
            0 => assert_eq!(names, ["cpu"]),
            n => assert_eq!(names, (0..n).map(|i| format!("cuda:{i}")).collect::<Vec<_>>()),
        }
    }
}

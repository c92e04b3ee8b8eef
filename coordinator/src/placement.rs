//! Which queued job a worker asking for work gets, and on which of its
//! devices: a pure function over the asking worker, the other workers asking
//! at the same time, and the candidate jobs. The store reads those
//! (`store/leasing.rs`), calls [`place`], and claims the job it names on the
//! devices it names; no rule of placement is in SQL.
//!
//! The rules, in the order [`place`] applies them:
//! 1. Devices and memory: a worker runs one engine per device, and a job
//!    asking for `training.devices` = N gets N devices of one worker, all or
//!    none (data parallel training across workers is not supported). A
//!    device takes the job only if it fits next to the jobs already placed
//!    on it: their estimates are summed, each base model's weights counted
//!    once per device (the device's engine shares them), and a job on a
//!    model none of them uses adds its weights. A data-parallel job needs
//!    its whole estimate on each of its devices. Activations are summed
//!    too, although packed jobs share a pass bounded by the worker's token
//!    budget: the sum is an upper bound. Jobs without an estimate, and
//!    devices of unknown memory, always fit; a running job whose devices
//!    are not recorded counts on every device. Of the devices that fit, the
//!    job gets those with the most bytes left once it is placed (so jobs
//!    spread over a worker's GPUs), then those running fewer jobs, then the
//!    first registered.
//! 2. Spread: for [`SPREAD_WINDOW`] after it was queued, a job is left to
//!    another worker better placed for it, one that asked for work within
//!    [`POLL_FRESH`] with a slot free ([`Rival`]) and serves its model, and
//!    either holds the model in memory while the asking worker does not, or
//!    holds it as the asking worker does (or not) and runs fewer jobs. After
//!    the window any worker serving the model takes it, so a worker that
//!    asked and went away delays a job by the window at most.
//! 3. Order: of the jobs left, the oldest on a model the worker holds in
//!    memory, else the oldest (by submission, then id).
//!
//! Candidates. The store hands [`place`] the queued jobs on the models the
//! worker trains whose retry time has passed, in the order of rule 3 and a
//! page at a time ([`CANDIDATES_PER_PAGE`]), one job per
//! [`Candidate::class`]: jobs of one class differ in nothing [`place`] reads
//! but their age, so the oldest of each class stands for the others. Rule 3
//! makes the pick the first job of that order that rules 1 and 2 allow, so
//! the first page on which [`place`] picks a job holds the job it would pick
//! over all of them: the page size bounds each read, never which job is
//! placed, and a job that fits is never starved by it. The first page is the
//! classes among the oldest jobs of the queue (a class whose oldest job is
//! later comes after all of them in that order); the pages after it, read
//! only when placement passes over all of those, are classes of the whole
//! queue. A pick is claimed under a row lock
//! (`FOR UPDATE SKIP LOCKED`) and checked again; one that another worker
//! took meanwhile is passed over, as the lock query passes over a locked row.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ptune_core::{JobId, MemoryEstimate};

/// How long a newly queued job may wait for a better placed worker before
/// any worker serving its model takes it.
pub const SPREAD_WINDOW: Duration = Duration::from_secs(2);

/// A worker that asked for a job this recently, with slots free, counts as
/// asking still. Longer than the longest wait of a lease call
/// ([`crate::workers::MAX_LEASE_WAIT`]) with room for the next call to
/// arrive, so a worker waiting in a long poll counts as asking all along
/// (its request is recorded when the call starts). Longer than the window,
/// so a job is held back by the window, never by a stale request alone.
pub const POLL_FRESH: Duration = Duration::from_secs(10);

const _: () = assert!(POLL_FRESH.as_millis() >= 2 * crate::workers::MAX_LEASE_WAIT.as_millis());
const _: () = assert!(POLL_FRESH.as_millis() > SPREAD_WINDOW.as_millis());

/// Candidates the store reads at once.
pub const CANDIDATES_PER_PAGE: u32 = 64;

/// The worker asking for a job.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Asker {
    /// Base models it holds in memory now.
    pub loaded: Vec<String>,
    /// Its devices, in the order it registered them; none counts as one
    /// unnamed device of unknown memory.
    pub devices: Vec<DeviceRoom>,
    /// The jobs it runs.
    pub running: Vec<Running>,
}

/// A device of a worker and the bytes jobs on it may use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceRoom {
    /// As the worker named it ("cpu", "cuda:1"); empty for the one device
    /// of a worker that registered none.
    pub name: String,
    /// `None` when unknown: every job fits.
    pub memory_bytes: Option<u64>,
}

/// A job a worker runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Running {
    pub base_model: String,
    pub estimate: Option<MemoryEstimate>,
    /// The devices it runs on; empty when not recorded (it counts on all).
    pub devices: Vec<String>,
}

/// Another worker that asked for work within [`POLL_FRESH`] with a slot free.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rival {
    /// Base models it trains (of those the asking worker trains).
    pub serves: Vec<String>,
    /// Base models it held in memory when it asked.
    pub loaded: Vec<String>,
    /// Jobs it runs.
    pub running: u32,
}

/// A queued job that may be leased now.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: JobId,
    pub base_model: String,
    pub estimate: Option<MemoryEstimate>,
    /// Devices of one worker it trains on together (`training.devices`).
    pub devices: u32,
    /// When it was submitted: the queue's order.
    pub created_at: DateTime<Utc>,
    /// It was queued (submitted or queued again) [`SPREAD_WINDOW`] ago or more.
    pub settled: bool,
}

/// What [`place`] picks: a job and the devices it runs on.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement<'c> {
    pub job: &'c Candidate,
    /// Names of the asking worker's devices, `job.devices` of them, without
    /// the unnamed device of a worker that registered none.
    pub devices: Vec<String>,
}

impl Candidate {
    /// What [`place`] reads of a candidate besides its age: candidates of
    /// one class are all placed or all passed over.
    pub fn class(&self) -> (&str, Option<MemoryEstimate>, u32, bool) {
        (&self.base_model, self.estimate, self.devices, self.settled)
    }
}

impl Running {
    fn on(&self, device: &DeviceRoom) -> bool {
        self.devices.is_empty() || self.devices.contains(&device.name)
    }
}

/// Bytes the jobs on a device take: each job's own share, and each base
/// model's weights once (at the largest estimate's).
fn used_bytes<'r>(running: impl Iterator<Item = &'r Running>) -> u64 {
    let mut weights: HashMap<&str, u64> = HashMap::new();
    let mut own = 0;
    for job in running {
        let entry = weights.entry(&job.base_model).or_default();
        if let Some(e) = job.estimate {
            own += e.job_bytes + e.activation_bytes;
            *entry = (*entry).max(e.weights_bytes);
        }
    }
    own + weights.values().sum::<u64>()
}

impl Asker {
    fn holds(&self, model: &str) -> bool {
        self.loaded.iter().any(|m| m == model)
    }

    /// Rule 1: the devices `job` gets, or `None` when fewer than it asks
    /// for have room for it.
    fn devices_for(&self, job: &Candidate) -> Option<Vec<String>> {
        let wanted = job.devices.max(1) as usize;
        let unknown = [DeviceRoom::default()];
        let devices = if self.devices.is_empty() { &unknown[..] } else { &self.devices[..] };
        let mut fitting = Vec::new();
        for (index, device) in devices.iter().enumerate() {
            let on_device: Vec<&Running> = self.running.iter().filter(|r| r.on(device)).collect();
            let left = match (device.memory_bytes, job.estimate) {
                (Some(memory), Some(e)) => {
                    let shares_weights = on_device.iter().any(|r| r.base_model == job.base_model);
                    let weights = if shares_weights { 0 } else { e.weights_bytes };
                    let need = used_bytes(on_device.iter().copied()) + e.job_bytes + e.activation_bytes + weights;
                    let Some(left) = memory.checked_sub(need) else { continue };
                    left
                }
                _ => u64::MAX,
            };
            fitting.push((Reverse(left), on_device.len(), index));
        }
        fitting.sort();
        (fitting.len() >= wanted).then(|| {
            fitting[..wanted]
                .iter()
                .map(|&(_, _, i)| devices[i].name.clone())
                .filter(|name| !name.is_empty())
                .collect()
        })
    }

    /// Rule 2: whether `job` is left to a rival better placed for it.
    fn leaves(&self, job: &Candidate, rivals: &[Rival]) -> bool {
        if job.settled {
            return false;
        }
        let model = job.base_model.as_str();
        let mine = self.holds(model);
        let running = self.running.len() as u64;
        rivals.iter().filter(|o| o.serves.iter().any(|m| m == model)).any(|o| {
            let theirs = o.loaded.iter().any(|m| m == model);
            (theirs && !mine) || (theirs == mine && u64::from(o.running) < running)
        })
    }
}

/// The candidate `asker` gets and its devices, if any (see the module doc
/// for the rules).
pub fn place<'c>(asker: &Asker, rivals: &[Rival], candidates: &'c [Candidate]) -> Option<Placement<'c>> {
    candidates
        .iter()
        .filter(|job| !asker.leaves(job, rivals))
        .filter_map(|job| Some(Placement { job, devices: asker.devices_for(job)? }))
        .min_by_key(|p| (!asker.holds(&p.job.base_model), p.job.created_at, p.job.id.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn estimate(weights: u64, job: u64, activations: u64) -> Option<MemoryEstimate> {
        Some(MemoryEstimate { weights_bytes: weights * MIB, job_bytes: job * MIB, activation_bytes: activations * MIB })
    }

    /// Job `name` (its id is its position in `JOBS`) on `model`, submitted
    /// at `second`.
    fn job(name: &str, model: &str, second: i64, estimate: Option<MemoryEstimate>, settled: bool) -> Candidate {
        let index = JOBS.iter().position(|j| *j == name).expect("a named job") as u128;
        Candidate {
            id: JobId(uuid::Uuid::from_u128(index)),
            base_model: model.into(),
            estimate,
            devices: 1,
            created_at: DateTime::from_timestamp(second, 0).unwrap(),
            settled,
        }
    }
    const JOBS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

    fn name(job: &Candidate) -> &'static str {
        JOBS.get(job.id.0.as_u128() as usize).copied().unwrap_or("a newer twin")
    }

    /// A worker that registered no devices: one unnamed device of its memory.
    fn asker(loaded: &[&str], memory_mib: Option<u64>, running: &[(&str, Option<MemoryEstimate>)]) -> Asker {
        Asker {
            loaded: loaded.iter().map(|m| m.to_string()).collect(),
            devices: vec![DeviceRoom { name: String::new(), memory_bytes: memory_mib.map(|m| m * MIB) }],
            running: running
                .iter()
                .map(|(m, e)| Running { base_model: m.to_string(), estimate: *e, devices: Vec::new() })
                .collect(),
        }
    }

    fn rival(serves: &[&str], loaded: &[&str], running: u32) -> Rival {
        Rival {
            serves: serves.iter().map(|m| m.to_string()).collect(),
            loaded: loaded.iter().map(|m| m.to_string()).collect(),
            running,
        }
    }

    struct Case {
        rule: &'static str,
        asker: Asker,
        rivals: Vec<Rival>,
        candidates: Vec<Candidate>,
        placed: Option<&'static str>,
    }

    fn cases() -> Vec<Case> {
        let m100 = estimate(60, 10, 30);
        let idle = || asker(&[], None, &[]);
        vec![
            // Order.
            Case {
                rule: "the oldest job goes first, whatever order the candidates come in",
                asker: idle(),
                rivals: vec![],
                candidates: vec![job("b", "bert", 2, None, true), job("a", "bert", 1, None, true)],
                placed: Some("a"),
            },
            Case {
                rule: "jobs submitted at once go by id",
                asker: idle(),
                rivals: vec![],
                candidates: vec![job("b", "bert", 1, None, true), job("a", "bert", 1, None, true)],
                placed: Some("a"),
            },
            Case {
                rule: "a job on a model the worker holds goes before older ones",
                asker: asker(&["gpt2"], None, &[]),
                rivals: vec![],
                candidates: vec![job("a", "bert", 1, None, true), job("b", "gpt2", 2, None, true)],
                placed: Some("b"),
            },
            Case {
                rule: "no candidates, no job",
                asker: idle(),
                rivals: vec![],
                candidates: vec![],
                placed: None,
            },
            // Memory.
            Case {
                rule: "a job larger than the worker's memory is passed over for a smaller, newer one",
                asker: asker(&[], Some(99), &[]),
                rivals: vec![],
                candidates: vec![job("a", "bert", 1, m100, true), job("b", "bert", 2, estimate(60, 10, 29), true)],
                placed: Some("b"),
            },
            Case {
                rule: "a job that fills the memory exactly fits",
                asker: asker(&[], Some(100), &[]),
                rivals: vec![],
                candidates: vec![job("a", "bert", 1, m100, true)],
                placed: Some("a"),
            },
            Case {
                rule: "a worker of unknown memory takes any job",
                asker: asker(&[], None, &[("bert", m100)]),
                rivals: vec![],
                candidates: vec![job("a", "bert", 1, estimate(100_000, 0, 0), true)],
                placed: Some("a"),
            },
            Case {
                rule: "a job without an estimate fits",
                asker: asker(&[], Some(1), &[("bert", m100)]),
                rivals: vec![],
                candidates: vec![job("a", "bert", 1, None, true)],
                placed: Some("a"),
            },
            Case {
                rule: "a job on a model the worker runs shares its weights",
                asker: asker(&[], Some(140), &[("bert", m100)]),
                rivals: vec![],
                candidates: vec![job("a", "gpt2", 1, m100, true), job("b", "bert", 2, m100, true)],
                placed: Some("b"),
            },
            Case {
                rule: "the weights of a model count once, at the largest estimate's",
                asker: asker(&[], Some(200), &[("bert", m100), ("bert", estimate(70, 10, 30))]),
                rivals: vec![],
                // Used: 70 weights + 2 * 40 own = 150; 40 more fit, 51 do not.
                candidates: vec![job("a", "bert", 1, estimate(0, 11, 40), true), job("b", "bert", 2, m100, true)],
                placed: Some("b"),
            },
            Case {
                rule: "running jobs without an estimate count as zero, and their model's weights are shared",
                asker: asker(&[], Some(40), &[("bert", None)]),
                rivals: vec![],
                candidates: vec![job("a", "bert", 1, m100, true)],
                placed: Some("a"),
            },
            Case {
                rule: "nothing fits, no job",
                asker: asker(&[], Some(50), &[]),
                rivals: vec![],
                candidates: vec![job("a", "bert", 1, m100, true)],
                placed: None,
            },
            // Spread.
            Case {
                rule: "a new job is left to a rival holding its model when the worker does not",
                asker: idle(),
                rivals: vec![rival(&["bert"], &["bert"], 3)],
                candidates: vec![job("a", "bert", 1, None, false)],
                placed: None,
            },
            Case {
                rule: "a new job is left to a rival that holds it as the worker does and runs fewer jobs",
                asker: asker(&["bert"], None, &[("bert", None)]),
                rivals: vec![rival(&["bert"], &["bert"], 0)],
                candidates: vec![job("a", "bert", 1, None, false)],
                placed: None,
            },
            Case {
                rule: "neither holding the model, the rival running fewer jobs is better placed",
                asker: asker(&[], None, &[("gpt2", None)]),
                rivals: vec![rival(&["bert"], &[], 0)],
                candidates: vec![job("a", "bert", 1, None, false)],
                placed: None,
            },
            Case {
                rule: "a rival running as many jobs is not better placed",
                asker: asker(&[], None, &[("bert", None)]),
                rivals: vec![rival(&["bert"], &[], 1)],
                candidates: vec![job("a", "bert", 1, None, false)],
                placed: Some("a"),
            },
            Case {
                rule: "holding the model beats a rival that does not, however few jobs it runs",
                asker: asker(&["bert"], None, &[("bert", None), ("bert", None)]),
                rivals: vec![rival(&["bert"], &[], 0)],
                candidates: vec![job("a", "bert", 1, None, false)],
                placed: Some("a"),
            },
            Case {
                rule: "a rival that does not serve the model is not better placed",
                asker: asker(&[], None, &[("bert", None)]),
                rivals: vec![rival(&["gpt2"], &["bert"], 0)],
                candidates: vec![job("a", "bert", 1, None, false)],
                placed: Some("a"),
            },
            Case {
                rule: "after the window the job is anyone's",
                asker: asker(&[], None, &[("bert", None)]),
                rivals: vec![rival(&["bert"], &["bert"], 0)],
                candidates: vec![job("a", "bert", 1, None, true)],
                placed: Some("a"),
            },
            Case {
                rule: "a job left to a rival makes way for the next",
                asker: idle(),
                rivals: vec![rival(&["bert"], &["bert"], 0)],
                candidates: vec![job("a", "bert", 1, None, false), job("b", "gpt2", 2, None, false)],
                placed: Some("b"),
            },
            Case {
                rule: "all rules at once: held, too large, left to a rival, then the oldest that is left",
                asker: asker(&["gpt2"], Some(120), &[("gpt2", m100)]),
                rivals: vec![rival(&["bert", "gpt2"], &["bert"], 0)],
                candidates: vec![
                    job("a", "bert", 1, None, false),
                    job("b", "gpt2", 5, m100, true),
                    job("c", "llama", 2, estimate(10, 5, 5), true),
                    job("d", "gpt2", 3, estimate(60, 5, 5), true),
                    job("e", "llama", 4, None, true),
                ],
                placed: Some("d"),
            },
        ]
    }

    #[test]
    fn each_rule_places_the_job_it_names() {
        for case in cases() {
            let placed = place(&case.asker, &case.rivals, &case.candidates).map(|p| name(p.job));
            assert_eq!(placed, case.placed, "{}", case.rule);
        }
    }

    #[test]
    fn newer_jobs_of_a_class_never_change_the_pick() {
        // The store sends the oldest job of each class only.
        for case in cases() {
            let mut with_twins = case.candidates.clone();
            for c in &case.candidates {
                let id = JobId(uuid::Uuid::from_u128(c.id.0.as_u128() + 100));
                let twin = Candidate { id, created_at: c.created_at + chrono::Duration::seconds(10), ..c.clone() };
                assert_eq!(twin.class(), c.class());
                with_twins.push(twin);
            }
            let placed = place(&case.asker, &case.rivals, &with_twins).map(|p| name(p.job));
            assert_eq!(placed, case.placed, "{}", case.rule);
        }
    }

    #[test]
    fn the_first_page_with_a_pick_holds_the_pick_over_all_candidates() {
        // The store reads candidates a page at a time in the order of rule 3.
        for case in cases() {
            let mut ordered = case.candidates.clone();
            ordered.sort_by_key(|c| (!case.asker.holds(&c.base_model), c.created_at, c.id.0));
            for size in 1..=3 {
                let paged =
                    ordered.chunks(size).find_map(|page| place(&case.asker, &case.rivals, page)).map(|p| name(p.job));
                assert_eq!(paged, case.placed, "pages of {size}: {}", case.rule);
            }
        }
    }

    /// A worker with devices `memory_mib` (named "cuda:0", "cuda:1", ...;
    /// `None`: unknown) running `running` (model, estimate, its devices).
    fn gpus(memory_mib: &[Option<u64>], running: &[(&str, Option<MemoryEstimate>, &[&str])]) -> Asker {
        Asker {
            loaded: Vec::new(),
            devices: memory_mib
                .iter()
                .enumerate()
                .map(|(i, m)| DeviceRoom { name: format!("cuda:{i}"), memory_bytes: m.map(|m| m * MIB) })
                .collect(),
            running: running
                .iter()
                .map(|(m, e, d)| Running {
                    base_model: m.to_string(),
                    estimate: *e,
                    devices: d.iter().map(|d| d.to_string()).collect(),
                })
                .collect(),
        }
    }

    fn on(devices: u32, candidate: Candidate) -> Candidate {
        Candidate { devices, ..candidate }
    }

    struct DeviceCase {
        rule: &'static str,
        asker: Asker,
        candidates: Vec<Candidate>,
        placed: Option<(&'static str, &'static [&'static str])>,
    }

    fn device_cases() -> Vec<DeviceCase> {
        let m100 = estimate(60, 10, 30);
        vec![
            DeviceCase {
                rule: "a job goes to the device with the most room left",
                asker: gpus(&[Some(150), Some(200)], &[]),
                candidates: vec![job("a", "bert", 1, m100, true)],
                placed: Some(("a", &["cuda:1"])),
            },
            DeviceCase {
                rule: "two jobs too large together for one device go to different devices",
                asker: gpus(&[Some(130), Some(130)], &[("bert", m100, &["cuda:0"])]),
                candidates: vec![job("a", "bert", 1, m100, true)],
                placed: Some(("a", &["cuda:1"])),
            },
            DeviceCase {
                rule: "a job shares the weights of its model on a device, not on another",
                // cuda:0 holds 100 (60 weights) and takes 40 more; cuda:1 runs gpt2 (100): 100 more do not fit.
                asker: gpus(&[Some(140), Some(150)], &[("bert", m100, &["cuda:0"]), ("gpt2", m100, &["cuda:1"])]),
                candidates: vec![job("a", "bert", 1, m100, true)],
                placed: Some(("a", &["cuda:0"])),
            },
            DeviceCase {
                rule: "a job larger than every device is passed over, though the devices together would hold it",
                asker: gpus(&[Some(99), Some(99)], &[]),
                candidates: vec![job("a", "bert", 1, m100, true), job("b", "bert", 2, estimate(60, 10, 29), true)],
                placed: Some(("b", &["cuda:0"])),
            },
            DeviceCase {
                rule: "every device full, no job",
                asker: gpus(&[Some(130), Some(130)], &[("bert", m100, &["cuda:0"]), ("bert", m100, &["cuda:1"])]),
                candidates: vec![job("a", "bert", 1, m100, true)],
                placed: None,
            },
            DeviceCase {
                rule: "a running job whose devices are not recorded counts on every device",
                asker: gpus(&[Some(130), Some(130)], &[("bert", m100, &[])]),
                candidates: vec![job("a", "bert", 1, m100, true)],
                placed: None,
            },
            DeviceCase {
                rule: "devices of unknown memory take any job, the one running fewer jobs first",
                asker: gpus(&[None, None], &[("bert", m100, &["cuda:0"])]),
                candidates: vec![job("a", "bert", 1, estimate(100_000, 0, 0), true)],
                placed: Some(("a", &["cuda:1"])),
            },
            DeviceCase {
                rule: "as much room on each, the first registered device",
                asker: gpus(&[Some(100), Some(100), Some(100)], &[]),
                candidates: vec![job("a", "bert", 1, m100, true)],
                placed: Some(("a", &["cuda:0"])),
            },
            DeviceCase {
                rule: "a data-parallel job gets as many devices as it asks for, the roomiest",
                asker: gpus(&[Some(100), Some(300), Some(200)], &[]),
                candidates: vec![on(2, job("a", "bert", 1, m100, true))],
                placed: Some(("a", &["cuda:1", "cuda:2"])),
            },
            DeviceCase {
                rule: "a data-parallel job needs its whole estimate on each device: all or none",
                asker: gpus(&[Some(100), Some(99)], &[]),
                candidates: vec![on(2, job("a", "bert", 1, m100, true)), job("b", "bert", 2, m100, true)],
                placed: Some(("b", &["cuda:0"])),
            },
            DeviceCase {
                rule: "a job asking for more devices than the worker has is passed over",
                asker: gpus(&[None, None], &[]),
                candidates: vec![on(3, job("a", "bert", 1, None, true))],
                placed: None,
            },
            DeviceCase {
                rule: "a data-parallel job counts on each of its devices",
                asker: gpus(&[Some(130), Some(130), Some(130)], &[("bert", m100, &["cuda:0", "cuda:2"])]),
                candidates: vec![on(2, job("a", "bert", 1, m100, true)), job("b", "bert", 2, m100, true)],
                placed: Some(("b", &["cuda:1"])),
            },
        ]
    }

    #[test]
    fn each_device_rule_places_the_job_on_the_devices_it_names() {
        for case in device_cases() {
            let placed = place(&case.asker, &[], &case.candidates);
            let placed =
                placed.as_ref().map(|p| (name(p.job), p.devices.iter().map(String::as_str).collect::<Vec<_>>()));
            let expected = case.placed.map(|(job, devices)| (job, devices.to_vec()));
            assert_eq!(placed, expected, "{}", case.rule);
        }
    }

    #[test]
    fn a_worker_without_devices_names_none() {
        let candidates = [job("a", "bert", 1, None, true)];
        let placed = place(&asker(&[], Some(100), &[]), &[], &candidates).expect("a placement");
        assert!(placed.devices.is_empty(), "{placed:?}");
    }
}

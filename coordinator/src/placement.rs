//! Which queued job a worker asking for work gets: a pure function over the
//! asking worker, the other workers asking at the same time, and the
//! candidate jobs. The store reads those (`store/leasing.rs`), calls
//! [`place`], and claims the job it names; no rule of placement is in SQL.
//!
//! The rules, in the order [`place`] applies them:
//! 1. Memory: when the worker's memory is known, a job is placed only if it
//!    fits next to the jobs the worker already runs: their estimates are
//!    summed, each base model's weights counted once (the worker shares
//!    them), and a job on a model none of them uses adds its weights.
//!    Activations are summed too, although packed jobs share a pass bounded
//!    by the worker's token budget: the sum is an upper bound. Jobs without
//!    an estimate count as zero.
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
//! page at a time ([`CANDIDATES_PER_PAGE`]). Rule 3 makes the pick the first
//! job of that order that rules 1 and 2 allow, so the first page on which
//! [`place`] picks a job holds the job it would pick over all of them: the
//! page size bounds each read, never which job is placed, and a job that
//! fits is never starved by it. To keep pages few when many jobs ahead do
//! not fit, the store sends one job per [`Candidate::class`]: jobs of one
//! class differ in nothing [`place`] reads but their age, so the oldest of
//! each class stands for the others. A pick is claimed under a row lock
//! (`FOR UPDATE SKIP LOCKED`) and checked again; one that another worker
//! took meanwhile is passed over, as the lock query passes over a locked row.

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
    /// Bytes it may use for training; `None` when unknown (every job fits).
    pub memory_bytes: Option<u64>,
    /// The jobs it runs.
    pub running: Vec<Running>,
}

/// A job a worker runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Running {
    pub base_model: String,
    pub estimate: Option<MemoryEstimate>,
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
    /// When it was submitted: the queue's order.
    pub created_at: DateTime<Utc>,
    /// It was queued (submitted or queued again) [`SPREAD_WINDOW`] ago or more.
    pub settled: bool,
}

impl Candidate {
    /// What [`place`] reads of a candidate besides its age: candidates of
    /// one class are all placed or all passed over.
    pub fn class(&self) -> (&str, Option<MemoryEstimate>, bool) {
        (&self.base_model, self.estimate, self.settled)
    }
}

impl Asker {
    /// Bytes its running jobs take: each job's own share, and each base
    /// model's weights once.
    fn used_bytes(&self) -> u64 {
        let mut weights: HashMap<&str, u64> = HashMap::new();
        let mut own = 0;
        for job in &self.running {
            let entry = weights.entry(&job.base_model).or_default();
            if let Some(e) = job.estimate {
                own += e.job_bytes + e.activation_bytes;
                *entry = (*entry).max(e.weights_bytes);
            }
        }
        own + weights.values().sum::<u64>()
    }

    fn holds(&self, model: &str) -> bool {
        self.loaded.iter().any(|m| m == model)
    }

    /// Rule 1: whether `job` fits next to the jobs it runs, of `used` bytes.
    fn fits(&self, job: &Candidate, used: u64) -> bool {
        let (Some(memory), Some(e)) = (self.memory_bytes, job.estimate) else { return true };
        let shares_weights = self.running.iter().any(|r| r.base_model == job.base_model);
        let weights = if shares_weights { 0 } else { e.weights_bytes };
        used + e.job_bytes + e.activation_bytes + weights <= memory
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

/// The candidate `asker` gets, if any (see the module doc for the rules).
pub fn place<'c>(asker: &Asker, rivals: &[Rival], candidates: &'c [Candidate]) -> Option<&'c Candidate> {
    let used = asker.used_bytes();
    candidates
        .iter()
        .filter(|job| asker.fits(job, used) && !asker.leaves(job, rivals))
        .min_by_key(|job| (!asker.holds(&job.base_model), job.created_at, job.id.0))
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
            created_at: DateTime::from_timestamp(second, 0).unwrap(),
            settled,
        }
    }
    const JOBS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

    fn name(job: &Candidate) -> &'static str {
        JOBS.get(job.id.0.as_u128() as usize).copied().unwrap_or("a newer twin")
    }

    fn asker(loaded: &[&str], memory_mib: Option<u64>, running: &[(&str, Option<MemoryEstimate>)]) -> Asker {
        Asker {
            loaded: loaded.iter().map(|m| m.to_string()).collect(),
            memory_bytes: memory_mib.map(|m| m * MIB),
            running: running.iter().map(|(m, e)| Running { base_model: m.to_string(), estimate: *e }).collect(),
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
            let placed = place(&case.asker, &case.rivals, &case.candidates).map(name);
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
            let placed = place(&case.asker, &case.rivals, &with_twins).map(name);
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
                let paged = ordered.chunks(size).find_map(|page| place(&case.asker, &case.rivals, page)).map(name);
                assert_eq!(paged, case.placed, "pages of {size}: {}", case.rule);
            }
        }
    }
}

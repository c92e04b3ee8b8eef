//! Fault injection for the fault-tolerance tests: compiled only with the
//! `fault-injection` feature, which no release build enables. Without it
//! every hook is an empty inline function.
//!
//! With it, `PTUNE_FAULTS` holds rules separated by `;`, each
//! `ACTION@POINT` followed by `,key=value` filters:
//!
//! - actions: `panic`, `abort` (the process dies at once, as with a
//!   segfault), `hang` (the thread sleeps forever without progress),
//!   `pause` (logs `fault injected` and sleeps `ms`, so a test can kill the
//!   process at that point), `enospc` (this and every later guarded write
//!   fails with "no space left on device", as on a full disk);
//! - points: `step` (after an optimizer step), `checkpoint` (between the two
//!   files of a checkpoint), `download` (after a dataset's first chunk),
//!   `upload` (after an adapter's first chunk), `write` (any guarded write),
//!   `handoff` (a completion brought the next lease, not yet started);
//! - filters: `job=NAME` (the spec's name), `step=N` (at step N; for `write`,
//!   once a job reached step N), `rank=N` (on rank N of a data-parallel
//!   run only; a rule without it fires on every rank), `ms=N` (for `pause`).

/// Where a fault can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    Step,
    Checkpoint,
    Download,
    Upload,
    Write,
    /// A completion brought the next lease; the worker holds it but has not started it.
    Handoff,
}

#[cfg(not(feature = "fault-injection"))]
mod hooks {
    use super::Point;

    /// Runs the rules that match `point` for `job` at `step`.
    #[inline(always)]
    pub fn at(_point: Point, _job: &str, _step: u64) -> std::io::Result<()> {
        Ok(())
    }

    /// Runs the rules that match `point` for `job` at `step` on
    /// data-parallel rank `rank`.
    #[inline(always)]
    pub fn at_rank(_point: Point, _job: &str, _step: u64, _rank: usize) -> std::io::Result<()> {
        Ok(())
    }

    /// Fails when an injected full disk refuses writes.
    #[inline(always)]
    pub fn check_write() -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(feature = "fault-injection")]
mod hooks {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::Duration;

    use super::Point;

    #[derive(Debug)]
    struct Rule {
        action: String,
        point: Point,
        job: Option<String>,
        step: Option<u64>,
        rank: Option<usize>,
        ms: u64,
    }

    static DISK_FULL: AtomicBool = AtomicBool::new(false);
    /// The highest step any job reached, for `enospc@write,step=N`.
    static HIGHEST_STEP: AtomicU64 = AtomicU64::new(0);

    fn rules() -> &'static [Rule] {
        static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
        RULES.get_or_init(|| {
            let text = std::env::var("PTUNE_FAULTS").unwrap_or_default();
            let rules: Vec<Rule> = text.split(';').filter(|r| !r.trim().is_empty()).map(parse).collect();
            if !rules.is_empty() {
                tracing::warn!(rules = ?rules, "fault injection is on");
            }
            rules
        })
    }

    fn parse(text: &str) -> Rule {
        let mut parts = text.trim().split(',');
        let head = parts.next().unwrap_or_default();
        let (action, point) = head.split_once('@').unwrap_or_else(|| panic!("PTUNE_FAULTS rule {text:?}: no @POINT"));
        let point = match point {
            "step" => Point::Step,
            "checkpoint" => Point::Checkpoint,
            "download" => Point::Download,
            "upload" => Point::Upload,
            "write" => Point::Write,
            "handoff" => Point::Handoff,
            other => panic!("PTUNE_FAULTS rule {text:?}: unknown point {other:?}"),
        };
        let mut rule = Rule { action: action.to_string(), point, job: None, step: None, rank: None, ms: 0 };
        for filter in parts {
            match filter.split_once('=') {
                Some(("job", v)) => rule.job = Some(v.to_string()),
                Some(("step", v)) => rule.step = v.parse().ok(),
                Some(("rank", v)) => rule.rank = v.parse().ok(),
                Some(("ms", v)) => rule.ms = v.parse().unwrap_or(0),
                _ => panic!("PTUNE_FAULTS rule {text:?}: unknown filter {filter:?}"),
            }
        }
        rule
    }

    fn disk_full() -> std::io::Error {
        std::io::Error::from_raw_os_error(28)
    }

    pub fn at(point: Point, job: &str, step: u64) -> std::io::Result<()> {
        at_rank(point, job, step, 0)
    }

    pub fn at_rank(point: Point, job: &str, step: u64, rank: usize) -> std::io::Result<()> {
        if point == Point::Step {
            HIGHEST_STEP.fetch_max(step, Ordering::SeqCst);
        }
        for rule in rules().iter().filter(|r| r.point == point) {
            if rule.job.as_deref().is_some_and(|j| j != job) || rule.rank.is_some_and(|r| r != rank) {
                continue;
            }
            let step_matches = match (point, rule.step) {
                (_, None) => true,
                (Point::Write, Some(n)) => HIGHEST_STEP.load(Ordering::SeqCst) >= n,
                (_, Some(n)) => n == step,
            };
            if !step_matches {
                continue;
            }
            tracing::warn!(action = %rule.action, point = ?point, job, step, rank, "fault injected");
            match rule.action.as_str() {
                "panic" => panic!("injected fault: panic at {point:?} of job {job} step {step}"),
                "abort" => std::process::abort(),
                "hang" => loop {
                    std::thread::sleep(Duration::from_secs(3600));
                },
                "pause" => std::thread::sleep(Duration::from_millis(rule.ms)),
                "enospc" => {
                    DISK_FULL.store(true, Ordering::SeqCst);
                    return Err(disk_full());
                }
                other => panic!("PTUNE_FAULTS: unknown action {other:?}"),
            }
        }
        Ok(())
    }

    pub fn check_write() -> std::io::Result<()> {
        if DISK_FULL.load(Ordering::SeqCst) {
            return Err(disk_full());
        }
        // `enospc@write,step=N` fills the disk once a job reached step N.
        for rule in rules().iter().filter(|r| r.point == Point::Write && r.action == "enospc") {
            if rule.step.is_none_or(|n| HIGHEST_STEP.load(Ordering::SeqCst) >= n) {
                tracing::warn!(action = "enospc", point = "write", "fault injected");
                DISK_FULL.store(true, Ordering::SeqCst);
                return Err(disk_full());
            }
        }
        Ok(())
    }
}

pub use hooks::{at, at_rank, check_write};

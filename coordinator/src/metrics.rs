//! Prometheus metrics of a coordinator, exposed at `/metrics` in the
//! OpenMetrics text format.
//!
//! Two kinds live here. Events this process observes (gRPC calls, leases
//! taken, queue waits, leases that expired) are counters and histograms in
//! memory; they start at zero with the process, which Prometheus handles as a
//! counter reset. Levels (jobs by state, workers online, throughput) are read
//! from PostgreSQL on every scrape, so every coordinator on one database
//! reports the same truth.

mod grpc;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub use grpc::GrpcMetricsLayer;

use crate::model::FleetLevels;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of a gRPC call: `service` (`ptune.v1.JobService`), `method`
/// (`SubmitJob`) and the status `code` (`OK`, `NotFound`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub service: String,
    pub method: String,
    pub code: String,
}

/// What a group commit wrote (`group.rs`): `progress` or `completion`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    writes: &'static str,
}

/// Whether a lease request found a job.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaseLabels {
    outcome: &'static str,
}

/// Which queued jobs a registration estimated: `all` of a model's queue
/// (the shape known for the model changed) or those `without` an estimate.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EstimateLabels {
    scope: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric of one coordinator. Cheap to share behind an [`Arc`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    grpc_requests: Family<GrpcLabels, Counter>,
    grpc_duration: HistogramFamily<GrpcLabels>,
    queue_wait: Histogram,
    lease_duration: HistogramFamily<LeaseLabels>,
    leases_expired: Counter,
    leader: Gauge,
    group_calls: HistogramFamily<GroupLabels>,
    estimated: Family<EstimateLabels, Counter>,
    levels: Arc<Mutex<Option<FleetLevels>>>,
}

fn latency_buckets() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn group_buckets() -> Histogram {
    // 1 to 512 calls.
    Histogram::new(exponential_buckets(1.0, 2.0, 10))
}

fn queue_wait_buckets() -> Histogram {
    // 100 ms to about 7 hours.
    Histogram::new(exponential_buckets(0.1, 3.0, 13))
}

impl Default for Metrics {
    fn default() -> Self {
        let grpc_requests = Family::<GrpcLabels, Counter>::default();
        let grpc_duration = HistogramFamily::<GrpcLabels>::new_with_constructor(latency_buckets as fn() -> Histogram);
        let queue_wait = queue_wait_buckets();
        let lease_duration = HistogramFamily::<LeaseLabels>::new_with_constructor(latency_buckets as fn() -> Histogram);
        let leases_expired = Counter::default();
        let leader = Gauge::default();
        let group_calls = HistogramFamily::<GroupLabels>::new_with_constructor(group_buckets as fn() -> Histogram);
        let estimated = Family::<EstimateLabels, Counter>::default();
        let levels = Arc::new(Mutex::new(None));

        let mut registry = Registry::default();
        registry.register(
            "ptune_grpc_requests",
            "gRPC calls handled, by service, method and status code",
            grpc_requests.clone(),
        );
        registry.register(
            "ptune_grpc_request_duration_seconds",
            "Time from a gRPC call's arrival to its status (the whole stream for streaming calls)",
            grpc_duration.clone(),
        );
        registry.register(
            "ptune_queue_wait_seconds",
            "Time jobs waited in the queue before a worker leased them (since submission or requeue)",
            queue_wait.clone(),
        );
        registry.register(
            "ptune_lease_duration_seconds",
            "Time the database took to answer a lease request, by whether a job was leased",
            lease_duration.clone(),
        );
        registry.register(
            "ptune_leases_expired",
            "Leases ended because their worker stopped heartbeating",
            leases_expired.clone(),
        );
        registry.register(
            "ptune_coordinator_leader",
            "1 on the coordinator that holds the leader lock and runs singleton maintenance, 0 on the others",
            leader.clone(),
        );
        registry.register(
            "ptune_group_commit_calls",
            "Worker calls written in one transaction, by kind (progress, completion, lease: leases claimed together)",
            group_calls.clone(),
        );
        registry.register(
            "ptune_memory_estimates",
            "Queued jobs given a memory estimate when a worker registered their base model, by scope: all (the \
             model's shape changed, so its whole queue) or without (jobs that had none)",
            estimated.clone(),
        );
        registry.register_collector(Box::new(LevelsCollector { levels: levels.clone() }));
        Self {
            registry,
            grpc_requests,
            grpc_duration,
            queue_wait,
            lease_duration,
            leases_expired,
            leader,
            group_calls,
            estimated,
            levels,
        }
    }
}

impl Metrics {
    /// Records one finished gRPC call.
    pub fn observe_grpc(&self, labels: &GrpcLabels, elapsed: Duration) {
        self.grpc_requests.get_or_create(labels).inc();
        self.grpc_duration.get_or_create(labels).observe(elapsed.as_secs_f64());
    }

    /// Records a lease request: how long it took and whether it leased a job
    /// that had waited `queued_for`.
    pub fn observe_lease(&self, elapsed: Duration, queued_for: Option<Duration>) {
        let outcome = if queued_for.is_some() { "leased" } else { "empty" };
        self.lease_duration.get_or_create(&LeaseLabels { outcome }).observe(elapsed.as_secs_f64());
        if let Some(wait) = queued_for {
            self.queue_wait.observe(wait.as_secs_f64());
        }
    }

    /// Records a group commit of `calls` calls that wrote `writes`.
    pub fn observe_group(&self, writes: &'static str, calls: usize) {
        self.group_calls.get_or_create(&GroupLabels { writes }).observe(calls as f64);
    }

    /// Counts queued jobs a registration estimated: all of a model's queue, or those without an estimate.
    pub fn estimated(&self, whole_queue: bool, jobs: usize) {
        let scope = if whole_queue { "all" } else { "without" };
        self.estimated.get_or_create(&EstimateLabels { scope }).inc_by(jobs as u64);
    }

    /// Counts leases the reaper ended.
    pub fn leases_expired(&self, n: usize) {
        self.leases_expired.inc_by(n as u64);
    }

    /// Whether this coordinator leads.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The exposition: the in-memory metrics and `levels`, read from the
    /// database just before.
    pub fn encode(&self, levels: FleetLevels) -> String {
        // Concurrent scrapes each set their own reading; the lock is never held across an await.
        *self.levels.lock().unwrap_or_else(|e| e.into_inner()) = Some(levels);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// Writes the database levels of the last reading at each scrape.
#[derive(Debug)]
struct LevelsCollector {
    levels: Arc<Mutex<Option<FleetLevels>>>,
}

impl Collector for LevelsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let guard = self.levels.lock().unwrap_or_else(|e| e.into_inner());
        let Some(levels) = guard.as_ref() else { return Ok(()) };

        let mut family = encoder.encode_descriptor("ptune_jobs", "Jobs by state", None, MetricType::Gauge)?;
        for (state, n) in &levels.jobs {
            count(*n).encode(family.encode_family(&[("state", state.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor("ptune_sweeps", "Sweeps by state", None, MetricType::Gauge)?;
        for (state, n) in &levels.sweeps {
            count(*n).encode(family.encode_family(&[("state", state.as_str())])?)?;
        }
        let queued_for = levels.oldest_queued.map_or(0.0, |d| d.as_secs_f64());
        gauge(queued_for).encode(encoder.encode_descriptor(
            "ptune_queue_oldest_wait_seconds",
            "How long the job queued longest has been waiting (0 when the queue is empty)",
            None,
            MetricType::Gauge,
        )?)?;
        count(levels.workers_online).encode(encoder.encode_descriptor(
            "ptune_workers_online",
            "Workers that heartbeated within the lease timeout",
            None,
            MetricType::Gauge,
        )?)?;
        count(levels.workers_unhealthy).encode(encoder.encode_descriptor(
            "ptune_workers_unhealthy",
            "Workers online that take no new jobs (a full disk, repeated device errors)",
            None,
            MetricType::Gauge,
        )?)?;
        count(levels.slots).encode(encoder.encode_descriptor(
            "ptune_slots",
            "Job slots of the workers online",
            None,
            MetricType::Gauge,
        )?)?;
        count(levels.slots_busy).encode(encoder.encode_descriptor(
            "ptune_slots_busy",
            "Open leases, one slot each",
            None,
            MetricType::Gauge,
        )?)?;
        let mut family = encoder.encode_descriptor(
            "ptune_worker_examples_per_second",
            "Training examples per second of each online worker, summed over its running jobs",
            None,
            MetricType::Gauge,
        )?;
        for w in &levels.workers {
            let worker_id = w.worker_id.to_string();
            let hostname = label_value(&w.hostname);
            let labels = [("worker_id", worker_id.as_str()), ("hostname", hostname.as_str())];
            gauge(w.examples_per_second).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// A label value escaped as OpenMetrics requires (the encoder writes
/// values as they are): backslash, double quote and newline.
fn label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c if c.is_control() => {}
            c => escaped.push(c),
        }
    }
    escaped
}

fn gauge(value: f64) -> ConstGauge<f64> {
    ConstGauge::new(value)
}

fn count(n: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
}

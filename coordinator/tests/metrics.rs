//! `/metrics` as Prometheus scrapes it: the exposition parses (checked by a
//! strict parser of the OpenMetrics text format below), and its numbers
//! move as jobs are submitted, leased, reported on and lost.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use common::metric;
use ptune_proto::v1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn metrics_parse_and_move_with_submissions_leases_reports_and_expiries() {
    let mut env = common::start(Duration::from_secs(2)).await;
    let http = (env.coordinator.as_ref().unwrap().http_addr, env.tokens.viewer.clone());

    let before = scrape(&http).await;
    assert_eq!(before.value("ptune_jobs", &[("state", "queued")]), Some(0.0));
    assert_eq!(before.value("ptune_leases_expired_total", &[]), Some(0.0));
    assert_eq!(before.kind("ptune_queue_wait_seconds"), Some("histogram"));
    assert_eq!(before.value("ptune_queue_wait_seconds_count", &[]), Some(0.0));
    assert_eq!(before.kind("ptune_worker_examples_per_second"), Some("gauge"));

    let spec = env.spec("counted").await;
    let first = env.submit(spec.clone()).await;
    env.submit(v1::JobSpec { name: "counted-2".into(), ..spec }).await;
    let missing = env.jobs.get_job(v1::GetJobRequest { job_id: "00000000-0000-4000-8000-000000000000".into() }).await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);

    let submitted = scrape(&http).await;
    assert_eq!(submitted.kind("ptune_grpc_requests"), Some("counter"));
    assert_eq!(submitted.kind("ptune_grpc_request_duration_seconds"), Some("histogram"));
    let submit_ok = [("service", "ptune.v1.JobService"), ("method", "SubmitJob"), ("code", "OK")];
    assert_eq!(submitted.value("ptune_grpc_requests_total", &submit_ok), Some(2.0));
    assert_eq!(submitted.value("ptune_grpc_request_duration_seconds_count", &submit_ok), Some(2.0));
    let not_found = [("service", "ptune.v1.JobService"), ("method", "GetJob"), ("code", "NotFound")];
    assert_eq!(submitted.value("ptune_grpc_requests_total", &not_found), Some(1.0));
    assert_eq!(submitted.value("ptune_jobs", &[("state", "queued")]), Some(2.0));
    assert!(submitted.value("ptune_queue_oldest_wait_seconds", &[]).unwrap() > 0.0);

    let worker = env.register().await;
    let lease = env.lease(&worker).await.expect("a queued job");
    assert_eq!(lease.job_id, first.id, "oldest first");
    let rate = metric(1, "train", "examples_per_second", 123.5);
    assert!(!env.report(&lease, 1, vec![metric(1, "train", "loss", 0.69), rate]).await.unwrap());
    env.heartbeat(&worker, &[&lease]).await;

    let leased = scrape(&http).await;
    assert_eq!(leased.kind("ptune_lease_duration_seconds"), Some("histogram"));
    assert_eq!(leased.value("ptune_jobs", &[("state", "queued")]), Some(1.0));
    assert_eq!(leased.value("ptune_jobs", &[("state", "running")]), Some(1.0));
    assert_eq!(leased.value("ptune_queue_wait_seconds_count", &[]), Some(1.0));
    assert_eq!(leased.value("ptune_lease_duration_seconds_count", &[("outcome", "leased")]), Some(1.0));
    assert_eq!(leased.value("ptune_workers_online", &[]), Some(1.0));
    assert_eq!(leased.value("ptune_slots", &[]), Some(2.0));
    assert_eq!(leased.value("ptune_slots_busy", &[]), Some(1.0));
    let labels = [("worker_id", worker.as_str()), ("hostname", "test-host")];
    assert_eq!(leased.value("ptune_worker_examples_per_second", &labels), Some(123.5));
    let lease_ok = [("service", "ptune.v1.WorkerService"), ("method", "LeaseJob"), ("code", "OK")];
    assert_eq!(leased.value("ptune_grpc_requests_total", &lease_ok), Some(1.0));

    // No heartbeat from here on: the lease expires after 2 s and the reaper
    // requeues the job. A scrape reads the database's levels before the
    // in-process counters, so the one that first counts the expiry may still
    // show the job running; the next one shows it queued.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = scrape(&http).await;
        let requeued = now.value("ptune_jobs", &[("state", "queued")]) == Some(2.0)
            && now.value("ptune_slots_busy", &[]) == Some(0.0);
        if now.value("ptune_leases_expired_total", &[]) == Some(1.0) && requeued {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease did not expire and requeue the job: expired {:?}, queued {:?}, slots busy {:?}",
            now.value("ptune_leases_expired_total", &[]),
            now.value("ptune_jobs", &[("state", "queued")]),
            now.value("ptune_slots_busy", &[])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.stop().await;
}

/// The number of `ptune_grpc_requests_total` series in a scrape.
fn request_series(e: &Exposition) -> usize {
    e.samples.iter().filter(|(name, _, _)| name == "ptune_grpc_requests_total").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hostnames_and_ten_thousand_unknown_paths_leave_the_exposition_parseable_and_small() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let http = (env.coordinator.as_ref().unwrap().http_addr, env.tokens.viewer.clone());

    // A hostname with a quote, a brace and a newline is refused at the edge;
    // one already in the database (registered before the edge checked) is
    // escaped in the label, and the scrape still parses.
    let hostile = "evil\"} 1\n# EOF\n\\";
    let request = v1::RegisterWorkerRequest {
        hostname: hostile.into(),
        devices: vec![v1::Device { name: "cpu".into(), memory_bytes: 1 << 30, ..Default::default() }],
        slots: 1,
        models: vec![v1::BaseModel { name: common::MODEL.into(), max_positions: 512, ..Default::default() }],
        ..Default::default()
    };
    let refused = env.workers.register_worker(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("hostname"), "{}", refused.message());
    let worker = env.register().await;
    let spec = env.spec("labelled").await;
    env.submit(spec).await;
    let lease = env.lease(&worker).await.unwrap();
    env.report(&lease, 1, vec![metric(1, "train", "examples_per_second", 10.0)]).await.unwrap();
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    sqlx::query("UPDATE workers SET hostname = $1 WHERE id = $2::uuid")
        .bind(hostile)
        .bind(&worker)
        .execute(&pool)
        .await
        .unwrap();
    let scraped = scrape(&http).await;
    let labels = [("worker_id", worker.as_str()), ("hostname", hostile)];
    assert_eq!(scraped.value("ptune_worker_examples_per_second", &labels), Some(10.0), "the label holds the hostname as it is");

    // 10,000 calls to paths that are no method: unknown methods of known
    // services, unknown services, with and without a token.
    let before = request_series(&scrape(&http).await);
    let url = format!("http://{}", env.coordinator.as_ref().unwrap().grpc_addr);
    let channels = [
        ptune_coordinator::testing::channel(&url, &env.tokens.admin),
        ptune_proto::client::channel(&url, &Default::default()).unwrap(),
    ];
    for batch in 0..100 {
        let calls = (0..100).map(|i| {
            let n = batch * 100 + i;
            let path = match n % 4 {
                0 => format!("/ptune.v1.JobService/Probe{n}"),
                1 => format!("/ptune.v1.WorkerService/Probe{n}"),
                2 => format!("/grpc.health.v1.Health/Probe{n}"),
                _ => format!("/evil{n}.Service/Method{n}"),
            };
            let mut grpc = tonic::client::Grpc::new(channels[n % 2].clone());
            async move {
                grpc.ready().await.unwrap();
                let path: http::uri::PathAndQuery = path.parse().unwrap();
                let answer = grpc.unary(tonic::Request::new(Vec::new()), path, common::RawCodec).await;
                assert!(answer.is_err(), "no such method");
            }
        });
        futures::future::join_all(calls).await;
    }
    let after = scrape(&http).await;
    let added = request_series(&after) - before;
    assert!(added <= 4, "10,000 unknown paths added {added} series");
    let other: f64 = after
        .samples
        .iter()
        .filter(|(name, labels, _)| name == "ptune_grpc_requests_total" && labels.get("method").map(String::as_str) == Some("other"))
        .map(|(_, _, v)| *v)
        .sum();
    assert_eq!(other, 10_000.0, "every unknown call is counted under method=\"other\"");
    pool.close().await;
    env.stop().await;
}

// ------------------------------------------------------------------ scraping

/// Scrapes `/metrics` at `http` with its token, as Prometheus does.
async fn scrape(http: &(SocketAddr, String)) -> Exposition {
    let (addr, token) = http;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request =
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an http response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text; version=1.0.0"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    match parse(body) {
        Ok(exposition) => exposition,
        Err(e) => panic!("the exposition does not parse: {e}\n{body}"),
    }
}

/// A parsed exposition: metric families by name and every sample.
#[derive(Debug, Default)]
struct Exposition {
    kinds: HashMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Exposition {
    fn kind(&self, family: &str) -> Option<&str> {
        self.kinds.get(family).map(String::as_str)
    }

    /// The value of the sample with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let found: Vec<f64> =
            self.samples.iter().filter(|(n, l, _)| n == name && *l == wanted).map(|(_, _, v)| *v).collect();
        assert!(found.len() <= 1, "{name}{labels:?} appears {} times", found.len());
        found.first().copied()
    }
}

fn valid_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// Parses the OpenMetrics text format strictly: descriptors before their
/// samples, valid names, escaped label values, numeric values, each sample
/// in a declared family with a suffix its type allows, `# EOF` last, and
/// histograms whose buckets are cumulative and end at `+Inf` = `_count`.
fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut lines: Vec<&str> = text.split('\n').collect();
    if lines.pop() != Some("") {
        return Err("the exposition must end with a newline".into());
    }
    if lines.pop() != Some("# EOF") {
        return Err("the last line must be # EOF".into());
    }
    for (n, line) in lines.iter().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (keyword, name, arg) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next());
            if !valid_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            match keyword {
                "TYPE" => {
                    let kind = arg.unwrap_or("");
                    if !["counter", "gauge", "histogram", "summary", "info", "stateset", "unknown"].contains(&kind) {
                        return Err(at(format!("unknown type {kind:?}")));
                    }
                    if out.kinds.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(at(format!("{name} declared twice")));
                    }
                }
                "HELP" | "UNIT" => {}
                other => return Err(at(format!("unknown descriptor {other:?}"))),
            }
            continue;
        }
        let (name, labels, value) = sample(line).map_err(at)?;
        let family = out
            .kinds
            .iter()
            .filter(|(family, kind)| {
                let suffixes: &[&str] = match kind.as_str() {
                    "counter" => &["_total", "_created"],
                    "histogram" => &["_bucket", "_sum", "_count", "_created"],
                    _ => &[""],
                };
                suffixes.iter().any(|s| name == format!("{family}{s}"))
            })
            .map(|(family, _)| family.clone())
            .next();
        if family.is_none() {
            return Err(at(format!("sample {name} belongs to no declared family")));
        }
        out.samples.push((name, labels, value));
    }
    check_histograms(&out)?;
    Ok(out)
}

fn sample(line: &str) -> Result<(String, BTreeMap<String, String>, f64), String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample needs a value")?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err(format!("bad sample name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        loop {
            let start = chars.peek().map(|(i, _)| *i).ok_or("unterminated labels")?;
            if body[start..].starts_with('}') {
                rest = &body[start + 1..];
                break;
            }
            let eq = body[start..].find("=\"").ok_or("a label needs =\"value\"")? + start;
            let key = &body[start..eq];
            if !valid_name(key) || key.contains(':') {
                return Err(format!("bad label name {key:?}"));
            }
            while chars.peek().is_some_and(|(i, _)| *i <= eq + 1) {
                chars.next();
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")?.1 {
                    '"' => break,
                    '\\' => match chars.next().ok_or("dangling escape")?.1 {
                        'n' => value.push('\n'),
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    '\n' => return Err("raw newline in a label value".into()),
                    c => value.push(c),
                }
            }
            if labels.insert(key.to_string(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            if chars.peek().is_some_and(|(_, c)| *c == ',') {
                chars.next();
            }
        }
    }
    let mut fields = rest.strip_prefix(' ').ok_or("a space must precede the value")?.split(' ');
    let value = match fields.next().unwrap_or("") {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|_| format!("bad value {v:?}"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<f64>().map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok((name.to_string(), labels, value))
}

fn check_histograms(e: &Exposition) -> Result<(), String> {
    for (family, kind) in &e.kinds {
        if kind != "histogram" {
            continue;
        }
        let mut series: HashMap<BTreeMap<String, String>, Vec<(f64, f64)>> = HashMap::new();
        for (name, labels, value) in &e.samples {
            if *name == format!("{family}_bucket") {
                let mut rest = labels.clone();
                let le = rest.remove("le").ok_or(format!("{family} bucket without le"))?;
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().map_err(|_| format!("bad le {le}"))? };
                series.entry(rest).or_default().push((le, *value));
            }
        }
        for (labels, buckets) in series {
            let last = buckets.last().ok_or("no buckets")?;
            if last.0 != f64::INFINITY {
                return Err(format!("{family}{labels:?}: the last bucket must be +Inf"));
            }
            if buckets.windows(2).any(|w| w[0].0 >= w[1].0 || w[0].1 > w[1].1) {
                return Err(format!("{family}{labels:?}: buckets must grow in le and count"));
            }
            let count = e
                .samples
                .iter()
                .find(|(n, l, _)| *n == format!("{family}_count") && *l == labels)
                .map(|(_, _, v)| *v)
                .ok_or(format!("{family}{labels:?} has no _count"))?;
            if count != last.1 {
                return Err(format!("{family}{labels:?}: _count {count} differs from the +Inf bucket {}", last.1));
            }
        }
    }
    Ok(())
}

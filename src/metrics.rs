//! The gateway's metrics. The request path writes counters and histograms
//! with relaxed atomics into label sets made up front (arrays indexed by
//! enum): no allocation and no lock per request. `prometheus-client` encodes
//! them at scrape time ([`Metrics`] and [`Process`] are its collectors), in
//! Prometheus' text format or in OpenMetrics. A base room: it imports
//! nothing of ours.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::StatusCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

/// Where an identity lookup was answered, for metrics and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// L1: this process's memory.
    Local,
    /// L2: Redis, verified by some replica of the fleet.
    Shared,
    Verifier,
}

const SOURCES: [&str; 3] = ["cache", "redis", "verifier"];

/// What became of a credential the gateway judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Allowed,
    /// No credential where one was needed, or one that is not valid.
    Refused,
    /// Valid, but its role or organisation does not reach the route.
    Forbidden,
    /// The verifier could not tell.
    Unavailable,
    /// Held back by the lock-out shield.
    RateLimited,
}

const AUTHS: [&str; 5] = ["allowed", "refused", "forbidden", "unavailable", "rate_limited"];

/// Credential kinds as the audit trail names them (`CredentialKind::as_str`);
/// the last one is a request that carried none.
const CREDENTIALS: [&str; 5] = ["password", "api_key", "service_token", "session", "none"];

fn credential_index(kind: Option<&str>) -> usize {
    let none = CREDENTIALS.len() - 1;
    kind.and_then(|k| CREDENTIALS[..none].iter().position(|c| *c == k))
        .unwrap_or(none)
}

/// Who answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The upstream's answer went back to the client.
    Upstream,
    /// The gateway answered itself; with what became of the credential when
    /// the answer was an authentication's.
    Gateway(Option<Auth>),
}

/// One answered request, as [`Metrics::record`] counts it.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub status: StatusCode,
    pub answer: Answer,
    /// `CredentialKind::as_str` of the credential the request carried.
    pub credential: Option<&'static str>,
    /// Where its identity came from, when one was looked up.
    pub source: Option<Source>,
    /// From the head read to the answer's head.
    pub elapsed: Duration,
    /// The upstream exchange, when there was one.
    pub upstream: Option<Duration>,
}

/// `route`: `authenticated` when the gateway judged a credential for the
/// request (a route that needs one, or a password checked on its way to
/// Grafana), `anonymous` otherwise.
const ROUTES: [&str; 2] = ["anonymous", "authenticated"];
/// `outcome`: `forwarded` (the upstream answered), `refused` (the gateway
/// answered 3xx/4xx itself), `failed` (the gateway answered 5xx).
const OUTCOMES: [&str; 3] = ["forwarded", "refused", "failed"];

/// Status codes `http` accepts: 100 to 999.
const CODES: usize = 900;

/// Upper bounds of the duration histograms' buckets, in seconds: from the
/// gateway's own share (a cache hit, well under a millisecond) to the
/// upstream's slowest answers.
const BOUNDS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
];
/// The same, in nanoseconds, for the request path's comparisons.
const BOUNDS_NS: [u64; 18] = {
    let mut ns = [0u64; 18];
    let mut i = 0;
    while i < ns.len() {
        ns[i] = (BOUNDS[i] * 1e9) as u64;
        i += 1;
    }
    ns
};

/// A histogram of durations written with two relaxed atomic adds (its
/// bucket and the sum). Its count is the buckets' total, so `_count` and
/// the `+Inf` bucket always agree.
pub struct Histogram {
    /// Not cumulative; the last is `+Inf`.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .finish_non_exhaustive()
    }
}

impl Histogram {
    pub fn observe(&self, duration: Duration) {
        let ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        // `le`: the first bound at or above the value.
        let bucket = BOUNDS_NS.partition_point(|bound| *bound < ns);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(f64::INFINITY, 0u64); BOUNDS.len() + 1];
        for (i, (bound, count)) in buckets.iter_mut().enumerate() {
            *bound = BOUNDS.get(i).copied().unwrap_or(f64::INFINITY);
            *count = self.buckets[i].load(Ordering::Relaxed);
        }
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<[(&str, &str); 0]>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl EncodeMetric for &Histogram {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        (*self).encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// What the gateway counts. The connection and revocation counters are
/// written where those happen; the rest by [`Metrics::record`], once per
/// answered request, and [`Metrics::observe_verifier`].
pub struct Metrics {
    pub revocations: AtomicU64,
    pub connections_refused: AtomicU64,
    pub connections_open: AtomicU64,
    /// By status code, from 100.
    responses: [AtomicU64; CODES],
    lookups: [AtomicU64; SOURCES.len()],
    auth: [[AtomicU64; AUTHS.len()]; CREDENTIALS.len()],
    requests: [[Histogram; OUTCOMES.len()]; ROUTES.len()],
    upstream: Histogram,
    verifier: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            revocations: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            responses: std::array::from_fn(|_| AtomicU64::new(0)),
            lookups: std::array::from_fn(|_| AtomicU64::new(0)),
            auth: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            requests: std::array::from_fn(|_| std::array::from_fn(|_| Histogram::default())),
            upstream: Histogram::default(),
            verifier: Histogram::default(),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Counts one answered request: a few relaxed atomic adds.
    pub fn record(&self, request: &Request) {
        let code = usize::from(request.status.as_u16());
        if let Some(counter) = self.responses.get(code.wrapping_sub(100)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(source) = request.source {
            self.lookups[source as usize].fetch_add(1, Ordering::Relaxed);
        }
        let (auth, outcome) = match request.answer {
            Answer::Upstream => (request.source.map(|_| Auth::Allowed), 0),
            Answer::Gateway(auth) => (auth, if code >= 500 { 2 } else { 1 }),
        };
        if let Some(auth) = auth {
            self.auth[credential_index(request.credential)][auth as usize].fetch_add(1, Ordering::Relaxed);
        }
        self.requests[usize::from(auth.is_some())][outcome].observe(request.elapsed);
        if let Some(upstream) = request.upstream {
            self.upstream.observe(upstream);
        }
    }

    /// One answer from the verifier (Grafana asked who holds a credential).
    pub fn observe_verifier(&self, duration: Duration) {
        self.verifier.observe(duration);
    }

    pub fn responses(&self, status: u16) -> u64 {
        usize::from(status)
            .checked_sub(100)
            .and_then(|i| self.responses.get(i))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// One family of one sample without labels.
pub fn encode_one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

/// One family with one sample per label set.
pub fn encode_family<'a, L: EncodeLabelSet + 'a, M: EncodeMetric + 'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, unit, metric_type)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The gateway's families, under the registry's prefix (`portcullis_`).
impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        encode_one(
            e,
            "build",
            "The running build.",
            None,
            &Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        )?;
        encode_family(
            e,
            "request_duration",
            "Requests from the head read to the answer's head, by route (authenticated: the gateway \
             judged a credential) and outcome (forwarded: the upstream answered; refused or failed: \
             the gateway answered 3xx/4xx or 5xx itself).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            ROUTES.iter().enumerate().flat_map(|(r, route)| {
                OUTCOMES.iter().enumerate().map(move |(o, outcome)| {
                    ([("route", *route), ("outcome", *outcome)], &self.requests[r][o])
                })
            }),
        )?;
        encode_one(
            e,
            "upstream_duration",
            "Upstream exchanges, from sending the request to its answer's head (failed ones included).",
            Some(&Unit::Seconds),
            &self.upstream,
        )?;
        encode_one(
            e,
            "verifier_duration",
            "Verifications: Grafana asked who holds a credential the cache did not know.",
            Some(&Unit::Seconds),
            &self.verifier,
        )?;
        encode_family(
            e,
            "responses",
            "Responses by status code.",
            None,
            MetricType::Counter,
            self.responses.iter().enumerate().filter_map(|(i, n)| {
                let n = load(n);
                (n > 0).then(|| ([("code", i as u16 + 100)], ConstCounter::new(n)))
            }),
        )?;
        encode_family(
            e,
            "authentications",
            "Credentials judged, by kind (none: a request without one where one is needed) and outcome.",
            None,
            MetricType::Counter,
            CREDENTIALS.iter().enumerate().flat_map(|(c, credential)| {
                AUTHS.iter().enumerate().map(move |(a, outcome)| {
                    (
                        [("credential", *credential), ("outcome", *outcome)],
                        ConstCounter::new(load(&self.auth[c][a])),
                    )
                })
            }),
        )?;
        encode_family(
            e,
            "identity_lookups",
            "Credential lookups by where the answer came from.",
            None,
            MetricType::Counter,
            SOURCES
                .iter()
                .zip(&self.lookups)
                .map(|(source, n)| ([("source", *source)], ConstCounter::new(load(n)))),
        )?;
        encode_one(
            e,
            "revocations",
            "Cache invalidations caused by management calls.",
            None,
            &ConstCounter::new(load(&self.revocations)),
        )?;
        encode_one(
            e,
            "connections_refused",
            "Connections closed at accept because server.max_connections was reached.",
            None,
            &ConstCounter::new(load(&self.connections_refused)),
        )?;
        encode_one(
            e,
            "connections_open",
            "Client connections open.",
            None,
            &ConstGauge::new(load(&self.connections_open)),
        )
    }
}

/// The process' own figures, read from `/proc/self` on each scrape, under
/// the names every Prometheus client library uses (`process_*`).
#[derive(Debug, Default)]
pub struct Process;

/// Clock ticks per second in `/proc`'s counters: the kernel's `USER_HZ`,
/// 100 on every architecture Linux runs on (Go's procfs assumes the same).
const USER_HZ: f64 = 100.0;

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stat) = ProcStat::read() else {
            return Ok(());
        };
        let e = &mut encoder;
        encode_one(
            e,
            "process_cpu",
            "User and system CPU time spent.",
            Some(&Unit::Seconds),
            &ConstCounter::new(stat.cpu_ticks as f64 / USER_HZ),
        )?;
        encode_one(
            e,
            "process_resident_memory",
            "Resident memory size.",
            Some(&Unit::Bytes),
            &ConstGauge::new(stat.rss_bytes),
        )?;
        encode_one(
            e,
            "process_virtual_memory",
            "Virtual memory size.",
            Some(&Unit::Bytes),
            &ConstGauge::new(stat.vsize),
        )?;
        if let Some(boot) = boot_time() {
            encode_one(
                e,
                "process_start_time",
                "Start time of the process since the Unix epoch.",
                Some(&Unit::Seconds),
                &ConstGauge::new(boot as f64 + stat.start_ticks as f64 / USER_HZ),
            )?;
        }
        encode_one(
            e,
            "process_threads",
            "Threads of the process.",
            None,
            &ConstGauge::new(stat.threads),
        )?;
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            encode_one(
                e,
                "process_open_fds",
                "Open file descriptors.",
                None,
                &ConstGauge::new(fds.count() as u64),
            )?;
        }
        if let Some(max) = max_fds() {
            encode_one(
                e,
                "process_max_fds",
                "Limit on open file descriptors (the soft RLIMIT_NOFILE).",
                None,
                &ConstGauge::new(max),
            )?;
        }
        Ok(())
    }
}

/// The fields of `/proc/self/stat` the process metrics need.
#[derive(Debug, PartialEq)]
struct ProcStat {
    cpu_ticks: u64,
    threads: u64,
    start_ticks: u64,
    vsize: u64,
    rss_bytes: u64,
}

impl ProcStat {
    fn read() -> Option<ProcStat> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        ProcStat::parse(&stat, &status)
    }

    /// proc(5): in `stat`, the command name (in parentheses) may hold spaces
    /// and parentheses itself, so the fields are counted after its last
    /// `)`; the resident size is `status`' `VmRSS` (in KiB, whatever the
    /// page size).
    fn parse(text: &str, status: &str) -> Option<ProcStat> {
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        // Field n (1-based, as proc(5) numbers them) is at n - 3.
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(ProcStat {
            cpu_ticks: field(14)? + field(15)?,
            threads: field(20)?,
            start_ticks: field(22)?,
            vsize: field(23)?,
            rss_bytes: status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?
                .saturating_mul(1024),
        })
    }
}

/// Seconds since the epoch at boot (`btime` in `/proc/stat`).
fn boot_time() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit on open files (`/proc/self/limits`).
fn max_fds() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_lands_in_the_first_bucket_at_or_above_it() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_secs(3600));
        assert_eq!(h.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(h.buckets[1].load(Ordering::Relaxed), 1);
        assert_eq!(h.buckets[BOUNDS.len()].load(Ordering::Relaxed), 1);
        assert_eq!(h.count(), 3);
        assert_eq!(BOUNDS_NS[0], 100_000);
        assert_eq!(BOUNDS_NS[BOUNDS.len() - 1], 60_000_000_000);
    }

    #[test]
    fn a_request_is_counted_once_in_each_family() {
        let m = Metrics::default();
        m.record(&Request {
            status: StatusCode::FORBIDDEN,
            answer: Answer::Gateway(Some(Auth::Forbidden)),
            credential: Some("service_token"),
            source: Some(Source::Local),
            elapsed: Duration::from_millis(2),
            upstream: None,
        });
        m.record(&Request {
            status: StatusCode::OK,
            answer: Answer::Upstream,
            credential: None,
            source: None,
            elapsed: Duration::from_millis(2),
            upstream: Some(Duration::from_millis(1)),
        });
        assert_eq!(m.responses(403), 1);
        assert_eq!(m.responses(200), 1);
        assert_eq!(load(&m.auth[2][2]), 1);
        assert_eq!(m.requests[1][1].count(), 1);
        assert_eq!(m.requests[0][0].count(), 1);
        assert_eq!(m.upstream.count(), 1);
        assert_eq!(load(&m.lookups[0]), 1);
        assert_eq!(credential_index(Some("bogus")), CREDENTIALS.len() - 1);
    }

    #[test]
    fn proc_stat_reads_past_a_command_name_with_parentheses() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 12345 1000000 300 \
                    18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            ProcStat::parse(line, "Name:\tx\nVmRSS:\t    1200 kB\nThreads:\t7\n"),
            Some(ProcStat {
                cpu_ticks: 300,
                threads: 7,
                start_ticks: 12345,
                vsize: 1_000_000,
                rss_bytes: 1200 * 1024,
            })
        );
    }
}

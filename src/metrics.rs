//! The gateway's counters, written with relaxed atomics on the request path
//! and rendered in Prometheus' text format by the admin listener. A base
//! room: it imports nothing of ours.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use http::StatusCode;

/// Where an identity lookup was answered, for metrics and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// L1: this process's memory.
    Local,
    /// L2: Redis, verified by some replica of the fleet.
    Shared,
    Verifier,
}

/// Counters exported on `/metrics`; written with relaxed atomics on the
/// request path.
#[derive(Default)]
pub struct Metrics {
    pub responses_2xx: AtomicU64,
    pub responses_3xx: AtomicU64,
    pub responses_4xx: AtomicU64,
    pub responses_5xx: AtomicU64,
    pub cache_hits: AtomicU64,
    pub redis_hits: AtomicU64,
    pub verifications: AtomicU64,
    pub revocations: AtomicU64,
    pub connections_refused: AtomicU64,
    pub connections_open: AtomicU64,
}

impl Metrics {
    pub fn record(&self, status: StatusCode, source: Option<Source>) {
        let counter = match status.as_u16() {
            200..=299 => &self.responses_2xx,
            300..=399 => &self.responses_3xx,
            400..=499 => &self.responses_4xx,
            _ => &self.responses_5xx,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match source {
            Some(Source::Local) => self.cache_hits.fetch_add(1, Ordering::Relaxed),
            Some(Source::Shared) => self.redis_hits.fetch_add(1, Ordering::Relaxed),
            Some(Source::Verifier) => self.verifications.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
    }
}

/// One metric in Prometheus' text format; `samples` are (labels, value),
/// labels written as `{k="v"}` or empty.
pub fn write_metric(out: &mut String, kind: &str, name: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

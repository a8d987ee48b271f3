//! The admin listener (plain HTTP, for probes and scrapers): `/healthz`,
//! `/readyz`, `/metrics`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use crate::cache::Cache;
use crate::http::json_response;
use crate::metrics::{encode_family, encode_one, Metrics, Process};
use crate::shield::Shield;
use crate::tls::CertResolver;

/// The admin listener's answers: always whole.
type Body = http_body_util::Full<bytes::Bytes>;
use crate::shutdown::Shutdown;

/// Redis as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RedisState {
    NotConfigured = 0,
    Up = 1,
    Degraded = 2,
}

/// What `/readyz` checks.
pub struct Readiness {
    pub listening: AtomicBool,
    pub tls_loaded: AtomicBool,
    redis: AtomicU8,
    /// host:port of the upstream, probed with a TCP connect.
    pub upstream: String,
    /// host:port of the verifier's Grafana when it is not the upstream
    /// (`auth.grafana.url`), probed the same way: requests that need a
    /// verification fail while it is down.
    pub verifier: Option<String>,
}

impl Readiness {
    pub fn new(upstream: String) -> Readiness {
        Readiness {
            listening: AtomicBool::new(false),
            tls_loaded: AtomicBool::new(false),
            redis: AtomicU8::new(RedisState::NotConfigured as u8),
            upstream,
            verifier: None,
        }
    }

    pub fn with_verifier(mut self, verifier: Option<String>) -> Readiness {
        self.verifier = verifier;
        self
    }

    pub fn set_redis(&self, state: RedisState) {
        self.redis.store(state as u8, Ordering::Relaxed);
    }

    pub fn redis(&self) -> RedisState {
        match self.redis.load(Ordering::Relaxed) {
            1 => RedisState::Up,
            2 => RedisState::Degraded,
            _ => RedisState::NotConfigured,
        }
    }

    async fn check(&self) -> (StatusCode, serde_json::Value) {
        async fn reachable(target: &str) -> bool {
            matches!(
                tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(target)).await,
                Ok(Ok(_))
            )
        }
        let (upstream_ok, verifier_ok) = tokio::join!(reachable(&self.upstream), async {
            match &self.verifier {
                Some(target) => Some(reachable(target).await),
                None => None,
            }
        });
        let listening = self.listening.load(Ordering::Relaxed);
        let tls = self.tls_loaded.load(Ordering::Relaxed);
        let redis = match self.redis() {
            RedisState::NotConfigured => "not configured",
            RedisState::Up => "up",
            RedisState::Degraded => "degraded",
        };
        let mut reasons = Vec::new();
        if !listening {
            reasons.push("listener not up".to_owned());
        }
        if !tls {
            reasons.push("TLS not loaded".to_owned());
        }
        if !upstream_ok {
            reasons.push(format!("upstream {} unreachable", self.upstream));
        }
        if let (Some(target), Some(false)) = (&self.verifier, verifier_ok) {
            reasons.push(format!("verifier (auth.grafana.url) {target} unreachable"));
        }
        // Redis is optional: a degraded Redis is reported, not fatal.
        let mut body = serde_json::json!({
            "status": if reasons.is_empty() { "ready" } else { "not ready" },
            "listener": listening,
            "tls": tls,
            "upstream": upstream_ok,
            "redis": redis,
            "reasons": reasons,
        });
        if let Some(ok) = verifier_ok {
            body["verifier"] = serde_json::Value::Bool(ok);
        }
        let status = if reasons.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, body)
    }
}

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub cache: Arc<Cache>,
    pub shield: Arc<Shield>,
    /// Built once: the gateway's families, the state read at scrape time
    /// ([`State`]) and the process' own.
    registry: Registry,
}

/// OpenMetrics' `Content-Type`, for scrapers that ask for it (Prometheus
/// does); everyone else gets Prometheus' text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Admin {
    pub fn new(
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        cache: Arc<Cache>,
        shield: Arc<Shield>,
        certificate: Arc<CertResolver>,
    ) -> Admin {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Process));
        let ours = registry.sub_registry_with_prefix("portcullis");
        ours.register_collector(Box::new(metrics.clone()));
        ours.register_collector(Box::new(State {
            readiness: readiness.clone(),
            cache: cache.clone(),
            shield: shield.clone(),
            certificate,
        }));
        Admin {
            metrics,
            readiness,
            cache,
            shield,
            registry,
        }
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        match request.uri().path() {
            "/healthz" => json_response(StatusCode::OK, &serde_json::json!({"status": "alive"})),
            "/readyz" => {
                let (status, body) = self.readiness.check().await;
                json_response(status, &body)
            }
            "/metrics" => {
                let openmetrics = request
                    .headers()
                    .get_all(http::header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| v.contains("application/openmetrics-text"));
                let (text, content_type) = self.render_metrics(openmetrics);
                let mut response = Response::new(Body::from(text));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(content_type),
                );
                response
            }
            _ => json_response(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"message": "Not found"}),
            ),
        }
    }

    /// Every family, in OpenMetrics or in Prometheus' text format (0.0.4),
    /// with its `Content-Type`.
    pub fn render_metrics(&self, openmetrics: bool) -> (String, &'static str) {
        let mut out = String::with_capacity(16 * 1024);
        let encoded = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        if let Err(e) = encoded {
            // Only a writer's error, and a String's never fails.
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        let content_type = if openmetrics {
            OPENMETRICS
        } else {
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE
        };
        (out, content_type)
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut shutdown: Shutdown) {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.wait() => return,
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(request).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

/// What other rooms hold, read at scrape time: the identity cache, the
/// lock-out shield, Redis and the certificate being served.
struct State {
    readiness: Arc<Readiness>,
    cache: Arc<Cache>,
    shield: Arc<Shield>,
    certificate: Arc<CertResolver>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

impl Collector for State {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counter = |a: &AtomicU64| ConstCounter::new(load(a));
        encode_one(
            e,
            "cache_entries",
            "Identities held in memory.",
            None,
            &ConstGauge::new(self.cache.len() as u64),
        )?;
        let shield = &self.shield.stats;
        encode_one(
            e,
            "failed_checks",
            "Credentials Grafana refused that the gateway had sent it to check (each counts towards \
             Grafana's lock-out when it is a password).",
            None,
            &counter(&shield.failures),
        )?;
        encode_family(
            e,
            "throttled",
            "Checks held back by the lock-out shield, by whose failure budget was used up.",
            None,
            MetricType::Counter,
            [
                ([("budget", "login")], counter(&shield.login_throttled)),
                ([("budget", "client")], counter(&shield.client_throttled)),
            ],
        )?;
        let redis = self.readiness.redis();
        encode_family(
            e,
            "redis_state",
            "Redis as /readyz reports it: 1 for the current state (degraded: commands or the \
             eviction bus unusable, the gateway goes on without them).",
            None,
            MetricType::Gauge,
            [
                ("not_configured", RedisState::NotConfigured),
                ("up", RedisState::Up),
                ("degraded", RedisState::Degraded),
            ]
            .map(|(name, state)| ([("state", name)], ConstGauge::new(i64::from(redis == state)))),
        )?;
        if let Some(shared) = self.cache.shared() {
            let s = &shared.stats;
            for (name, help, value) in [
                ("redis_hits", "Identities found in Redis.", &s.hits),
                ("redis_misses", "Redis lookups that found nothing.", &s.misses),
                ("redis_writes", "Identities written to Redis.", &s.writes),
                ("redis_errors", "Redis calls that failed or timed out.", &s.errors),
                (
                    "redis_skipped",
                    "Redis calls skipped while Redis was down.",
                    &s.skipped,
                ),
                ("redis_reconnects", "Reconnections to Redis.", &s.reconnects),
                (
                    "evictions_published",
                    "Evictions published on the bus.",
                    &s.evictions_published,
                ),
                (
                    "evictions_received",
                    "Evictions received from the bus and applied.",
                    &s.evictions_received,
                ),
                (
                    "evictions_unconfirmed",
                    "Broadcasts not confirmed by every replica in time.",
                    &s.evictions_unconfirmed,
                ),
            ] {
                encode_one(e, name, help, None, &counter(value))?;
            }
            encode_one(
                e,
                "redis_up",
                "Redis commands and eviction bus both usable.",
                None,
                &ConstGauge::new(i64::from(shared.is_up())),
            )?;
        }
        if let Some(not_after) = self.certificate.not_after() {
            encode_one(
                e,
                "tls_certificate_expiry_timestamp",
                "When the certificate being served expires (its notAfter), since the Unix epoch.",
                Some(&Unit::Seconds),
                &ConstGauge::new(not_after),
            )?;
        }
        Ok(())
    }
}

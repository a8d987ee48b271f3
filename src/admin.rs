//! The admin listener (plain HTTP, for probes and scrapers): `/healthz`,
//! `/readyz`, `/metrics`.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::cache::Cache;
use crate::http::json_response;
use crate::metrics::{write_metric, Metrics};

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
    pub shield: Arc<crate::shield::Shield>,
}

impl Admin {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        match request.uri().path() {
            "/healthz" => json_response(StatusCode::OK, &serde_json::json!({"status": "alive"})),
            "/readyz" => {
                let (status, body) = self.readiness.check().await;
                json_response(status, &body)
            }
            "/metrics" => {
                let mut response = Response::new(Body::from(self.render_metrics()));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            _ => json_response(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"message": "Not found"}),
            ),
        }
    }

    fn render_metrics(&self) -> String {
        let m = &self.metrics;
        let mut out = String::with_capacity(1024);
        let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
            write_metric(&mut out, "counter", name, help, samples)
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            "portcullis_responses_total",
            "Responses by status class.",
            &[
                ("{class=\"2xx\"}", load(&m.responses_2xx)),
                ("{class=\"3xx\"}", load(&m.responses_3xx)),
                ("{class=\"4xx\"}", load(&m.responses_4xx)),
                ("{class=\"5xx\"}", load(&m.responses_5xx)),
            ],
        );
        counter(
            "portcullis_identity_lookups_total",
            "Credential lookups by where the answer came from.",
            &[
                ("{source=\"cache\"}", load(&m.cache_hits)),
                ("{source=\"redis\"}", load(&m.redis_hits)),
                ("{source=\"verifier\"}", load(&m.verifications)),
            ],
        );
        counter(
            "portcullis_revocations_total",
            "Cache invalidations caused by management calls.",
            &[("", load(&m.revocations))],
        );
        counter(
            "portcullis_connections_refused_total",
            "Connections closed at accept because server.max_connections was reached.",
            &[("", load(&m.connections_refused))],
        );
        let shield = &self.shield.stats;
        counter(
            "portcullis_failed_checks_total",
            "Credentials Grafana refused that the gateway had sent it to check (each counts towards Grafana's lock-out when it is a password).",
            &[("", load(&shield.failures))],
        );
        counter(
            "portcullis_throttled_total",
            "Checks held back by the lock-out shield, by whose failure budget was used up.",
            &[
                ("{budget=\"login\"}", load(&shield.login_throttled)),
                ("{budget=\"client\"}", load(&shield.client_throttled)),
            ],
        );
        self.cache.render_metrics(&mut out);
        let _ = writeln!(
            out,
            "# HELP portcullis_cache_entries Identities held in memory.\n# TYPE portcullis_cache_entries gauge\nportcullis_cache_entries {}",
            self.cache.len()
        );
        let _ = writeln!(
            out,
            "# HELP portcullis_connections_open Client connections open.\n# TYPE portcullis_connections_open gauge\nportcullis_connections_open {}",
            load(&m.connections_open)
        );
        out
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

//! Portcullis: a TLS-terminating authentication gateway for Grafana and PMM.
//!
//! [`start`] binds the listeners and returns a [`Running`] gateway; the binary
//! in `main.rs` adds signals and logging around it, and the tests start it
//! in-process on `127.0.0.1:0`.

pub mod admin;
pub mod auth;
pub mod cache;
pub mod config;
pub mod gateway;
pub mod proxy;
pub mod revoke;
pub mod routes;
pub mod server;
pub mod shield;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{Admin, Metrics, Readiness, RedisState};
use crate::cache::{Cache, KeyOrigin, Keyer};
use crate::config::Config;
use crate::gateway::Gateway;
use crate::server::{Limits, Shutdown, TlsServer};

/// Everything that can stop the gateway from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A started gateway.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub readiness: Arc<Readiness>,
    pub tls_fingerprint: String,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl Running {
    /// Stops accepting; in-flight requests get `server.shutdown_grace`.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the listener has closed and connections have drained.
    pub async fn wait(self) {
        let _ = self.server.await;
    }

    pub async fn stop(self) {
        self.shutdown();
        self.wait().await;
    }
}

/// Binds, loads TLS and starts serving. `env_cache_key` is the value of
/// `PORTCULLIS_CACHE_KEY`, passed in so that tests need no process environment.
pub async fn start(config: Config, env_cache_key: Option<String>) -> Result<Running, Error> {
    let material = tls::load(&config.tls)?;
    tracing::info!(fingerprint = %material.fingerprint, cert = %config.tls.cert.display(), "TLS certificate loaded (SHA-256)");

    let keyer = Keyer::from_config(&config.cache, env_cache_key.as_deref())?;
    let redis = &config.cache.redis;
    if redis.enabled() && keyer.origin == KeyOrigin::Random {
        return Err(config::ConfigError::Key {
            key: "cache.key_file".into(),
            reason: format!(
                "Redis is configured ({}), so replicas share cache entries and need the same HMAC key: \
                 set cache.key_file or {}",
                if redis.cluster.is_empty() {
                    "cache.redis.url"
                } else {
                    "cache.redis.cluster"
                },
                config::CACHE_KEY_ENV
            ),
        }
        .into());
    }
    if keyer.origin == KeyOrigin::Random {
        tracing::info!("cache HMAC key is random for this process (set cache.key_file to share a cache)");
    }
    let mut cache = Cache::new(&config.cache, keyer);
    if redis.enabled() {
        let shared = cache::Shared::connect(redis, config.cache.ttl)
            .await
            .map_err(|(key, reason)| config::ConfigError::Key {
                key: key.into(),
                reason,
            })?;
        cache = cache.with_shared(shared);
    }
    let cache = Arc::new(cache);
    cache.spawn_purger();
    let metrics = Arc::new(Metrics::default());
    let shield = Arc::new(shield::Shield::new(&config.auth, cache.shared().cloned()));
    shield.spawn_purger();
    let gateway = Arc::new(Gateway::new(
        &config,
        cache.clone(),
        shield.clone(),
        metrics.clone(),
    )?);

    let (listener, addr) = bind("server.listen", config.server.listen).await?;
    let (admin_listener, admin_addr) = bind("server.admin_listen", config.server.admin_listen).await?;

    let upstream: http::Uri = config
        .upstream
        .url
        .parse()
        .map_err(|_| config::ConfigError::Key {
            key: "upstream.url".into(),
            reason: "not a URL".into(),
        })?;
    let upstream_port = upstream
        .port_u16()
        .unwrap_or(if upstream.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let readiness = Arc::new(Readiness::new(format!(
        "{}:{upstream_port}",
        upstream
            .host()
            .unwrap_or("127.0.0.1")
            .trim_matches(|c| c == '[' || c == ']')
    )));
    readiness
        .tls_loaded
        .store(true, std::sync::atomic::Ordering::Relaxed);

    let (stop, shutdown) = Shutdown::new();
    if let Some(shared) = cache.shared() {
        let readiness = readiness.clone();
        shared
            .on_state(move |up| readiness.set_redis(if up { RedisState::Up } else { RedisState::Degraded }));
    }
    cache.start_shared(shutdown.clone()).await;
    tls::spawn_reloader(config.tls.clone(), material.resolver.clone(), shutdown.clone());

    let admin = Arc::new(Admin {
        metrics,
        readiness: readiness.clone(),
        cache,
        shield,
    });
    tokio::spawn(admin.serve(admin_listener, shutdown.clone()));

    let server = Arc::new(TlsServer {
        gateway: gateway.clone(),
        acceptor: tokio_rustls::TlsAcceptor::from(material.server_config.clone()),
        limits: Limits {
            max_connections: config.server.max_connections,
            handshake_timeout: config.server.tls_handshake_timeout,
            first_request_timeout: config.server.header_read_timeout,
            idle_timeout: config.server.idle_timeout,
            shutdown_grace: config.server.shutdown_grace,
        },
        http: server::http_builder(&config.server),
    });
    let server = tokio::spawn(server.serve(listener, shutdown));
    readiness
        .listening
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(%addr, %admin_addr, upstream = %config.upstream.url, "portcullis listening");

    Ok(Running {
        addr,
        admin_addr,
        gateway,
        readiness,
        tls_fingerprint: material.fingerprint,
        stop,
        server,
    })
}

/// Binds a listener; the error names the config key (port 0 picks a free port).
async fn bind(key: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let fail = |source| Error::Bind { key, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(fail)?;
    let bound = listener.local_addr().map_err(fail)?;
    Ok((listener, bound))
}

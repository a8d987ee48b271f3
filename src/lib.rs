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
pub(crate) mod http;
pub(crate) mod metrics;
pub mod proxy;
pub(crate) mod revoke;
pub(crate) mod role;
pub(crate) mod routes;
pub(crate) mod server;
pub(crate) mod shield;
pub mod shutdown;
pub(crate) mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{Admin, Readiness, RedisState};
use crate::cache::{Cache, KeyOrigin, Keyer};
use crate::config::{values, Config, ConfigError, TlsConfig, VerifierKind};
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::server::{Limits, TlsServer};
use crate::shutdown::Shutdown;

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
    /// The configuration in use, for the next reload to compare with.
    config: std::sync::Mutex<Config>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl Running {
    /// Takes up `new` (SIGHUP): it is checked as a start would check it, and
    /// when it is valid its routes, identity, session cookie, trusted
    /// proxies, header limit, access log and cache TTLs apply to the
    /// requests that start from now on; no connection is dropped. An invalid
    /// one changes nothing. Returns the keys that changed but need a
    /// restart (listeners, keys, the upstream, Redis, …).
    pub fn reload(&self, new: Config, env_cache_key: Option<&str>) -> Result<Vec<&'static str>, Error> {
        check(&new, env_cache_key)?;
        let mut current = self
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let restart = self.gateway.reload(&current, &new)?;
        *current = new;
        Ok(restart)
    }

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

/// The TLS pair as [`check`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFiles {
    /// Both files are there, readable, and belong together.
    Present,
    /// Neither is there; the first start writes a self-signed pair (the
    /// directory was found writable).
    WillGenerate,
}

/// What [`check`] read, for [`start`] to use.
pub struct Checked {
    keyer: Keyer,
    pub tls: TlsFiles,
}

/// Every check start-up makes short of binding the listeners and reaching
/// Redis, in one place for [`start`] and `portcullis check`: the config's own
/// rules, the files it names (the TLS pair, or a writable place for a
/// generated one; `cache.key_file`; `auth.grafana.admin_token_file`;
/// `upstream.ca_file`), a shared HMAC key when Redis is configured, and
/// everything the request path is built from (routes, verifier, forwarder,
/// identity headers), built once here and dropped. Errors name the key, or
/// the environment variable that set it.
pub fn check(config: &Config, env_cache_key: Option<&str>) -> Result<Checked, Error> {
    config.validate()?;
    let blame = |e: Error| match e {
        Error::Config(c) => Error::Config(config.blame(c)),
        other => other,
    };
    let tls = check_tls(&config.tls).map_err(blame)?;
    let keyer = Keyer::from_config(&config.cache, env_cache_key).map_err(|e| blame(e.into()))?;
    let redis = &config.cache.redis;
    if redis.enabled() && keyer.origin == KeyOrigin::Random {
        return Err(blame(
            ConfigError::Key {
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
            .into(),
        ));
    }
    // What start-up builds from the config, built the same way and dropped
    // (silently: start-up logs its own warnings).
    let built = tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
        let mut cache_config = config.cache.clone();
        cache_config.max_entries = 1;
        let cache = Arc::new(Cache::new(&cache_config, Keyer::new(&[0; 32], KeyOrigin::Random)));
        let shield = Arc::new(shield::Shield::new(&config.auth, None));
        Gateway::new(config, cache, shield, Arc::new(Metrics::default())).map(drop)
    });
    built.map_err(blame)?;
    Ok(Checked { keyer, tls })
}

/// The pair is read and matched when it is there; when neither file is,
/// the place the first start will write it must be writable (an image whose
/// working directory is read-only for its user fails here, not later).
fn check_tls(config: &TlsConfig) -> Result<TlsFiles, Error> {
    match (config.cert.exists(), config.key.exists()) {
        (true, true) => {
            tls::load(config)?;
            Ok(TlsFiles::Present)
        }
        (false, false) => {
            for (key, path) in [("tls.cert", &config.cert), ("tls.key", &config.key)] {
                writable_for(path).map_err(|(dir, e)| ConfigError::Key {
                    key: key.into(),
                    reason: format!(
                        "neither tls.cert nor tls.key exists, so a self-signed pair is generated on start, \
                         but {} cannot be written there ({dir}: {e}); give it a writable directory \
                         (a volume) or point tls.cert and tls.key at an existing pair",
                        path.display()
                    ),
                })?;
            }
            Ok(TlsFiles::WillGenerate)
        }
        _ => Err(tls::TlsError::HalfPair {
            cert: config.cert.clone(),
            key: config.key.clone(),
        }
        .into()),
    }
}

/// Whether `path` could be created: a file is made and removed in the nearest
/// directory above it that exists (the rest is created on the way).
fn writable_for(path: &std::path::Path) -> Result<(), (String, std::io::Error)> {
    let mut dir = path.parent();
    let existing = loop {
        match dir {
            Some(d) if d.as_os_str().is_empty() => break std::path::Path::new("."),
            Some(d) if d.is_dir() => break d,
            Some(d) => dir = d.parent(),
            None => break std::path::Path::new("/"),
        }
    };
    let probe = existing.join(format!(
        ".portcullis-check-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err((existing.display().to_string(), e)),
    }
}

/// Binds, loads TLS and starts serving. `env_cache_key` is the value of
/// `PORTCULLIS_CACHE_KEY`, passed in so that tests need no process environment.
/// Everything [`check`] refuses stops it first.
pub async fn start(config: Config, env_cache_key: Option<String>) -> Result<Running, Error> {
    let checked = check(&config, env_cache_key.as_deref())?;
    let material = tls::load(&config.tls)?;
    tracing::info!(fingerprint = %material.fingerprint, cert = %config.tls.cert.display(), "TLS certificate loaded (SHA-256)");

    let keyer = checked.keyer;
    let redis = &config.cache.redis;
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

    let readiness = Arc::new(readiness_for(&config)?);
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

    let admin = Arc::new(Admin::new(
        metrics,
        readiness.clone(),
        cache,
        shield,
        material.resolver.clone(),
    ));
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
    tracing::info!(%addr, %admin_addr, upstream = %values::redact_url(&config.upstream.url), "portcullis listening");

    Ok(Running {
        addr,
        admin_addr,
        gateway,
        readiness,
        tls_fingerprint: material.fingerprint,
        config: std::sync::Mutex::new(config),
        stop,
        server,
    })
}

/// What `/readyz` probes: the upstream, and the verifier's Grafana when it is
/// somewhere else (`auth.grafana.url` on another host or port).
fn readiness_for(config: &Config) -> Result<Readiness, Error> {
    let target = |key: &str, url: &str| {
        values::check_base_url(url, true)
            .map(|uri| values::connect_target(&uri))
            .map_err(|reason| {
                config.blame(ConfigError::Key {
                    key: key.into(),
                    reason,
                })
            })
    };
    let upstream = target("upstream.url", &config.upstream.url)?;
    let verifier = match config.auth.verifier {
        VerifierKind::Grafana if !config.auth.grafana.url.is_empty() => {
            Some(target("auth.grafana.url", &config.auth.grafana.url)?).filter(|v| *v != upstream)
        }
        _ => None,
    };
    Ok(Readiness::new(upstream).with_verifier(verifier))
}

/// Binds a listener; the error names the config key (port 0 picks a free port).
async fn bind(key: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let fail = |source| Error::Bind { key, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(fail)?;
    let bound = listener.local_addr().map_err(fail)?;
    Ok((listener, bound))
}

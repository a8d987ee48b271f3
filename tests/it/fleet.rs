//! Fleets: several gateways sharing one real Redis and the Grafana stand-in.
//!
//! Each test starts its own `redis-server` on a free port (stopped by PID).
//! What a revocation test proves: once the revoking call has returned on A,
//! B's very next request is refused. The gateway gives this by waiting, before
//! it answers the revoking call, for every subscribed replica to confirm the
//! eviction (see `src/cache/bus.rs`); the tests check that B received it and
//! that A saw every confirmation — no sleeps, no polling of B.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grafana_stub::{Flavor, GrafanaStub};
use portcullis::admin::RedisState;
use portcullis::auth::Role;
use portcullis::cache::SharedStats;
use portcullis::config::{Config, RouteConfig};
use reqwest::StatusCode;

use crate::support::load::Load;
use crate::support::{self, client, Gateway};

/// Shared HMAC key of the test fleets (never a credential).
pub(crate) const FLEET_KEY: &str = "fleet-test-hmac-key-0123456789abcdef";

/// A `redis-server` of our own, on a free loopback port.
pub(crate) struct RedisServer {
    child: Option<Child>,
    port: u16,
    password: Option<String>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    pub(crate) async fn start(password: Option<&str>) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            password: password.map(str::to_owned),
            _dir: tempfile::tempdir().unwrap(),
        };
        server.launch().await;
        server
    }

    /// A server that is not running yet (its port is reserved by nobody).
    fn unstarted() -> RedisServer {
        RedisServer {
            child: None,
            port: free_port(),
            password: None,
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    async fn launch(&mut self) {
        assert!(self.child.is_none());
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", &self._dir.path().display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = &self.password {
            command.args(["--requirepass", p]);
        }
        self.child = Some(command.spawn().expect("redis-server runs (install redis-server)"));
        // Ready when it answers PING.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = self.connection().await {
                if redis::cmd("PING").query_async::<String>(&mut c).await.is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not come up on {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL to our own child, by PID.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(crate) fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }

    /// Every key with every value (strings, and members of sets).
    async fn dump(&self) -> Vec<(String, String)> {
        let mut c = self.connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut c).await.unwrap();
        let mut out = Vec::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut c).await.unwrap();
            let values: Vec<String> = match kind.as_str() {
                "string" => vec![redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default()],
                "set" => redis::cmd("SMEMBERS")
                    .arg(&key)
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default(),
                "zset" => redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default(),
                "none" => continue,
                other => panic!("unexpected Redis type {other} for {key}"),
            };
            for value in values {
                out.push((key.clone(), value));
            }
        }
        out
    }

    /// Fails if any key or value contains any of `secrets`.
    pub(crate) async fn assert_no_secret(&self, secrets: &[&str]) -> usize {
        let dump = self.dump().await;
        for (key, value) in &dump {
            for secret in secrets {
                assert!(!secret.is_empty());
                assert!(!key.contains(secret), "secret in Redis key {key}");
                assert!(
                    !value.contains(secret),
                    "secret in the Redis value of {key}: {value}"
                );
            }
        }
        dump.len()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn fleet_config(stub: &GrafanaStub, redis_url: &str) -> (Config, tempfile::TempDir) {
    let (mut config, dir) = support::config(&stub.url());
    config.cache.redis.url = redis_url.to_owned();
    // Generous for a loaded CI machine: the revocation tests prove the
    // guarantee, not the speed (the kill test keeps the 50 ms default).
    config.cache.redis.timeout = Duration::from_secs(1);
    (config, dir)
}

pub(crate) async fn start_gateway(config: Config, dir: tempfile::TempDir) -> Gateway {
    support::start_with_key(config, dir, Some(FLEET_KEY.to_owned())).await
}

async fn pair(stub: &GrafanaStub, redis: &RedisServer, tweak: impl Fn(&mut Config)) -> (Gateway, Gateway) {
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let (mut config, dir) = fleet_config(stub, &redis.url());
        tweak(&mut config);
        gateways.push(start_gateway(config, dir).await);
    }
    let b = gateways.pop().unwrap();
    let a = gateways.pop().unwrap();
    (a, b)
}

pub(crate) fn stats(gw: &Gateway) -> &SharedStats {
    &gw.running()
        .gateway
        .cache()
        .shared()
        .expect("Redis configured")
        .stats
}

pub(crate) fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

#[derive(Clone)]
pub(crate) enum Auth {
    Bearer(String),
    Basic(String, String),
    Session(String),
    /// A session cookie of another name (PMM's `pmm_session`).
    Cookie(String, String),
}

impl Auth {
    pub(crate) fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Auth::Bearer(token) => request.bearer_auth(token),
            Auth::Basic(user, password) => request.basic_auth(user, Some(password)),
            Auth::Session(value) => request.header("Cookie", format!("grafana_session={value}")),
            Auth::Cookie(name, value) => request.header("Cookie", format!("{name}={value}")),
        }
    }
}

pub(crate) fn admin() -> Auth {
    Auth::Basic("admin".into(), "admin".into())
}

pub(crate) async fn call(
    http: &reqwest::Client,
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    auth: &Auth,
) -> StatusCode {
    auth.apply(http.request(method, format!("{}{path}", gw.url)))
        .send()
        .await
        .expect("request")
        .status()
}

pub(crate) async fn get(http: &reqwest::Client, gw: &Gateway, path: &str, auth: &Auth) -> StatusCode {
    call(http, gw, reqwest::Method::GET, path, auth).await
}

/// A UI path every test credential may read (Viewer); the stand-in answers
/// it without checking credentials itself, so its verification counter
/// counts only the gateways' questions.
const PROBE: &str = "/__stub/echo/fleet-probe";

#[tokio::test]
async fn verified_on_one_gateway_is_served_by_another_without_verification() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let redis = RedisServer::start(None).await;
    let (a, b) = pair(&stub, &redis, |_| {}).await;
    let http = client();

    let sa = stub.add_service_account("fleet-viewer", "Viewer");
    let (_, token) = stub.add_sa_token(sa, "t", None);
    let (_, key) = stub.add_api_key("fleet-key", "Viewer", None);
    stub.add_user("fleet-user", "fleet-pw-123", "Viewer", false);
    let session = stub.login("fleet-user", "fleet-pw-123").expect("login");
    let credentials = [
        Auth::Bearer(token.clone()),
        Auth::Bearer(key.clone()),
        Auth::Basic("fleet-user".into(), "fleet-pw-123".into()),
        Auth::Session(session.clone()),
    ];
    for auth in &credentials {
        assert_eq!(get(&http, &a, PROBE, auth).await, StatusCode::OK);
    }
    let verifications = stub.verifications();
    for auth in &credentials {
        assert_eq!(get(&http, &b, PROBE, auth).await, StatusCode::OK);
    }
    assert_eq!(stub.verifications(), verifications, "B asked Grafana for nothing");
    assert_eq!(
        load(&stats(&b).hits),
        credentials.len() as u64,
        "B found each one in Redis"
    );
    assert_eq!(load(&stats(&a).writes), credentials.len() as u64);
    // And then holds it in memory: no more Redis round trips.
    for auth in &credentials {
        assert_eq!(get(&http, &b, PROBE, auth).await, StatusCode::OK);
    }
    assert_eq!(
        load(&stats(&b).hits) + load(&stats(&b).misses),
        credentials.len() as u64
    );

    let ready: serde_json::Value = http
        .get(format!("{}/readyz", b.admin_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["redis"], "up");
    redis
        .assert_no_secret(&[&token, &key, "fleet-pw-123", &session, FLEET_KEY])
        .await;
}

/// Warms `auth` on both gateways (B from Redis, then from memory), runs the
/// revoking call on A, and checks B's very next request. Returns the time
/// from sending the revoking call to B's refusal.
pub(crate) async fn revoked_on_a_is_refused_on_b<F, Fut>(
    a: &Gateway,
    b: &Gateway,
    auth: &Auth,
    path: &str,
    refused: StatusCode,
    revoke: F,
) -> Duration
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = StatusCode>,
{
    let http = client();
    assert_eq!(get(&http, a, path, auth).await, StatusCode::OK);
    assert_eq!(get(&http, b, path, auth).await, StatusCode::OK);
    assert_eq!(get(&http, b, path, auth).await, StatusCode::OK);
    assert!(!b.running().gateway.cache().is_empty(), "B holds it in memory");

    let received = load(&stats(b).evictions_received);
    let started = Instant::now();
    let status = revoke().await;
    assert!(
        status.is_success() || status.is_redirection(),
        "revoking call answered {status}"
    );
    // The revoking call has returned: B has already applied the eviction…
    assert!(
        load(&stats(b).evictions_received) > received,
        "B received the eviction"
    );
    assert_eq!(
        load(&stats(a).evictions_unconfirmed),
        0,
        "every replica confirmed in time"
    );
    // …so its very next request is refused.
    assert_eq!(get(&http, b, path, auth).await, refused, "B's next request");
    let took = started.elapsed();
    assert_eq!(get(&http, a, path, auth).await, refused, "A's next request");
    took
}

#[tokio::test]
async fn service_account_token_deleted_on_a_is_refused_on_b() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let redis = RedisServer::start(None).await;
    let (a, b) = pair(&stub, &redis, |_| {}).await;
    let sa = stub.add_service_account("fleet-sa", "Viewer");
    let (token_id, token) = stub.add_sa_token(sa, "doomed", None);
    let (_, other) = stub.add_sa_token(sa, "kept", None);
    let auth = Auth::Bearer(token.clone());
    let http = client();
    let path = format!("/api/serviceaccounts/{sa}/tokens/{token_id}");
    revoked_on_a_is_refused_on_b(&a, &b, &auth, PROBE, StatusCode::UNAUTHORIZED, || async {
        call(&http, &a, reqwest::Method::DELETE, &path, &admin()).await
    })
    .await;
    // The account's other token was dropped too (whole principal) but is still valid.
    assert_eq!(
        get(&http, &b, PROBE, &Auth::Bearer(other.clone())).await,
        StatusCode::OK
    );
    redis.assert_no_secret(&[&token, &other, "admin:admin"]).await;
}

#[tokio::test]
async fn api_key_deleted_on_a_is_refused_on_b() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let redis = RedisServer::start(None).await;
    let (a, b) = pair(&stub, &redis, |_| {}).await;
    let (key_id, key) = stub.add_api_key("fleet-doomed-key", "Viewer", None);
    let auth = Auth::Bearer(key.clone());
    let http = client();
    let path = format!("/api/auth/keys/{key_id}");
    revoked_on_a_is_refused_on_b(&a, &b, &auth, PROBE, StatusCode::UNAUTHORIZED, || async {
        call(&http, &a, reqwest::Method::DELETE, &path, &admin()).await
    })
    .await;
    redis.assert_no_secret(&[&key]).await;
}

#[tokio::test]
async fn session_logged_out_on_a_is_refused_on_b() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let redis = RedisServer::start(None).await;
    let (a, b) = pair(&stub, &redis, |_| {}).await;
    stub.add_user("fleet-browser", "fleet-pw-456", "Viewer", false);
    let session = stub.login("fleet-browser", "fleet-pw-456").expect("login");
    let auth = Auth::Session(session.clone());
    let http = client();
    revoked_on_a_is_refused_on_b(&a, &b, &auth, PROBE, StatusCode::UNAUTHORIZED, || {
        get(&http, &a, "/logout", &auth)
    })
    .await;
    redis.assert_no_secret(&[&session, "fleet-pw-456"]).await;
}

#[tokio::test]
async fn auth_token_revoked_on_a_is_refused_on_b() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let redis = RedisServer::start(None).await;
    let (a, b) = pair(&stub, &redis, |_| {}).await;
    stub.add_user("fleet-laptop", "fleet-pw-789", "Viewer", false);
    let other = stub.login("fleet-laptop", "fleet-pw-789").expect("login");
    let current = stub.login("fleet-laptop", "fleet-pw-789").expect("login");
    let http = client();
    let me = Auth::Session(current.clone());
    let tokens: Vec<serde_json::Value> = me
        .apply(http.get(format!("{}/api/user/auth-tokens", a.url)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let other_id = tokens
        .iter()
        .find(|t| t["isActive"] == false)
        .and_then(|t| t["id"].as_i64())
        .expect("the other session's token");
    let auth = Auth::Session(other.clone());
    revoked_on_a_is_refused_on_b(&a, &b, &auth, PROBE, StatusCode::UNAUTHORIZED, || async {
        me.apply(http.post(format!("{}/api/user/revoke-auth-token", a.url)))
            .json(&serde_json::json!({ "authTokenId": other_id }))
            .send()
            .await
            .unwrap()
            .status()
    })
    .await;
    // The revoking session itself is still good (verified again).
    assert_eq!(get(&http, &b, PROBE, &me).await, StatusCode::OK);
    redis.assert_no_secret(&[&current, &other, "fleet-pw-789"]).await;
}

#[tokio::test]
async fn role_lowered_on_a_is_forbidden_on_b() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let redis = RedisServer::start(None).await;
    // Reading the org needs Editor here, so that lowering to Viewer shows.
    let editors_only = |config: &mut Config| {
        config.routes.push(RouteConfig {
            method: Some("GET".into()),
            ..RouteConfig::rule(PROBE, Role::Editor)
        })
    };
    let (a, b) = pair(&stub, &redis, editors_only).await;
    let user = stub.add_user("fleet-editor", "fleet-pw-000", "Editor", false);
    let auth = Auth::Basic("fleet-editor".into(), "fleet-pw-000".into());
    let http = client();
    revoked_on_a_is_refused_on_b(&a, &b, &auth, PROBE, StatusCode::FORBIDDEN, || async {
        admin()
            .apply(http.patch(format!("{}/api/org/users/{user}", a.url)))
            .json(&serde_json::json!({ "role": "Viewer" }))
            .send()
            .await
            .unwrap()
            .status()
    })
    .await;
    redis.assert_no_secret(&["fleet-pw-000"]).await;
}

/// 200 clients with cached credentials keep going while Redis is killed and
/// restarted: not one request fails, and the gateways use Redis again by
/// themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_fails_no_request_and_comes_back() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let mut redis = RedisServer::start(None).await;
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let (mut config, dir) = fleet_config(&stub, &redis.url());
        config.cache.redis.timeout = Duration::from_millis(50);
        gateways.push(Arc::new(start_gateway(config, dir).await));
    }
    let mut credentials = Vec::new();
    let mut secrets = Vec::new();
    for i in 0..4 {
        let sa = stub.add_service_account(&format!("load-{i}"), "Viewer");
        let (_, token) = stub.add_sa_token(sa, "t", None);
        secrets.push(token.clone());
        credentials.push(Auth::Bearer(token));
    }
    stub.add_user("load-user", "load-pw-321", "Viewer", false);
    credentials.push(Auth::Basic("load-user".into(), "load-pw-321".into()));
    let http = client();
    for gw in &gateways {
        for auth in &credentials {
            assert_eq!(get(&http, gw, PROBE, auth).await, StatusCode::OK);
        }
    }

    let load = {
        let (gateways, credentials, http) = (gateways.clone(), credentials.clone(), http.clone());
        Load::start(200, move |n| {
            let gw = gateways[n % 2].clone();
            let request = credentials[n % credentials.len()].apply(http.get(format!("{}{PROBE}", gw.url)));
            async move { request.send().await.is_ok_and(|r| r.status() == StatusCode::OK) }
        })
    };
    let redis_state = |want: RedisState| {
        let gateways = gateways.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while gateways.iter().any(|g| g.running().readiness.redis() != want) {
                assert!(
                    Instant::now() < deadline,
                    "gateways did not report Redis {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };

    load.progress(1000).await;
    redis.kill();
    redis_state(RedisState::Degraded).await;
    let ready = http
        .get(format!("{}/readyz", gateways[0].admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK, "ready, with Redis degraded");
    assert_eq!(
        ready.json::<serde_json::Value>().await.unwrap()["redis"],
        "degraded"
    );
    load.progress(2000).await;
    redis.launch().await;
    redis_state(RedisState::Up).await;
    load.progress(2000).await;
    let (total, failures) = load.stop().await;
    eprintln!("Redis kill: {total} requests, {failures} failed");
    assert_eq!(failures, 0, "requests failed while Redis was away");

    // Redis is used again: a new credential verified on one is served by the other.
    let sa = stub.add_service_account("after-restart", "Viewer");
    let (_, token) = stub.add_sa_token(sa, "t", None);
    let auth = Auth::Bearer(token.clone());
    assert_eq!(get(&http, &gateways[0], PROBE, &auth).await, StatusCode::OK);
    let verifications = stub.verifications();
    assert_eq!(get(&http, &gateways[1], PROBE, &auth).await, StatusCode::OK);
    assert_eq!(stub.verifications(), verifications);
    secrets.push(token);
    secrets.push("load-pw-321".into());
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    redis.assert_no_secret(&secrets).await;
}

#[tokio::test]
async fn redis_down_at_start_is_degraded_then_used_when_it_comes() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let mut redis = RedisServer::unstarted();
    let (a, b) = pair(&stub, &redis, |_| {}).await;
    assert_eq!(a.running().readiness.redis(), RedisState::Degraded);
    let sa = stub.add_service_account("early", "Viewer");
    let (_, token) = stub.add_sa_token(sa, "t", None);
    let auth = Auth::Bearer(token);
    let http = client();
    assert_eq!(
        get(&http, &a, PROBE, &auth).await,
        StatusCode::OK,
        "serves without Redis"
    );
    redis.launch().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while [&a, &b]
        .iter()
        .any(|g| g.running().readiness.redis() != RedisState::Up)
    {
        assert!(Instant::now() < deadline, "did not reconnect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sa = stub.add_service_account("late", "Viewer");
    let (_, token) = stub.add_sa_token(sa, "t", None);
    let auth = Auth::Bearer(token);
    assert_eq!(get(&http, &a, PROBE, &auth).await, StatusCode::OK);
    let verifications = stub.verifications();
    assert_eq!(get(&http, &b, PROBE, &auth).await, StatusCode::OK);
    assert_eq!(stub.verifications(), verifications);
}

#[tokio::test]
async fn redis_password_works_and_a_wrong_one_stops_the_start() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let redis = RedisServer::start(Some("fleet-redis-pw")).await;
    let (a, b) = pair(&stub, &redis, |_| {}).await;
    assert_eq!(a.running().readiness.redis(), RedisState::Up);
    let sa = stub.add_service_account("pw", "Viewer");
    let (_, token) = stub.add_sa_token(sa, "t", None);
    let auth = Auth::Bearer(token.clone());
    let http = client();
    assert_eq!(get(&http, &a, PROBE, &auth).await, StatusCode::OK);
    let verifications = stub.verifications();
    assert_eq!(get(&http, &b, PROBE, &auth).await, StatusCode::OK);
    assert_eq!(stub.verifications(), verifications);

    for url in [
        format!("redis://:wrong-pw@127.0.0.1:{}/", redis.port),
        format!("redis://127.0.0.1:{}/", redis.port),
    ] {
        let (config, _dir) = fleet_config(&stub, &url);
        let error = match portcullis::start(config, Some(FLEET_KEY.into())).await {
            Ok(_) => panic!("started with a bad Redis password"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains("cache.redis.url"), "{error}");
        assert!(error.contains("credentials"), "{error}");
        assert!(
            !error.contains("wrong-pw"),
            "the password is not printed: {error}"
        );
    }
    redis.assert_no_secret(&[&token, "fleet-redis-pw"]).await;
}

#[tokio::test]
async fn redis_needs_a_shared_hmac_key() {
    let (mut config, _dir) = support::config("http://127.0.0.1:9");
    config.cache.redis.url = "redis://127.0.0.1:9/".into();
    let error = match portcullis::start(config, None).await {
        Ok(_) => panic!("started a fleet member with a random HMAC key"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("cache.key_file"), "{error}");
    assert!(error.contains("PORTCULLIS_CACHE_KEY"), "{error}");
}

fn summary(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "{name}: n={} median={:.3} ms p90={:.3} ms p99={:.3} ms worst={:.3} ms",
        samples.len(),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() * 9 / 10]),
        ms(samples[samples.len() * 99 / 100]),
        ms(samples[samples.len() - 1]),
    );
}

/// The closing note's figures (run: `cargo test --release --test it fleet_figures -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn fleet_figures() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let redis = RedisServer::start(None).await;
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let (mut config, dir) = fleet_config(&stub, &redis.url());
        config.cache.redis.timeout = Duration::from_millis(50);
        gateways.push(start_gateway(config, dir).await);
    }
    let (a, b) = (&gateways[0], &gateways[1]);
    let http = client();
    let samples: usize = std::env::var("FLEET_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);

    // L2 hit vs L1 hit on B, same credential, same keep-alive connection.
    let sa = stub.add_service_account("figures", "Viewer");
    let (_, token) = stub.add_sa_token(sa, "t", None);
    let auth = Auth::Bearer(token);
    assert_eq!(get(&http, a, PROBE, &auth).await, StatusCode::OK);
    assert_eq!(get(&http, b, PROBE, &auth).await, StatusCode::OK);
    let (mut l1, mut l2) = (Vec::new(), Vec::new());
    for _ in 0..samples * 4 {
        b.running().gateway.cache().clear_local();
        let t = Instant::now();
        assert_eq!(get(&http, b, PROBE, &auth).await, StatusCode::OK);
        l2.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(get(&http, b, PROBE, &auth).await, StatusCode::OK);
        l1.push(t.elapsed());
    }
    summary("request with an L1 hit", &mut l1);
    summary("request with an L2 hit", &mut l2);
    let added: Vec<Duration> = l2.iter().zip(&l1).map(|(a, b)| a.saturating_sub(*b)).collect();
    let mut added = added;
    summary("added by an L2 hit (L2 - L1, per rank)", &mut added);

    // Revocation: DELETE a token on A, then B's next request.
    let (mut call_a, mut to_refusal, mut after_return) = (Vec::new(), Vec::new(), Vec::new());
    let mut fleet_eviction = Vec::new();
    for i in 0..samples {
        let (token_id, token) = stub.add_sa_token(sa, &format!("r{i}"), None);
        let auth = Auth::Bearer(token);
        assert_eq!(get(&http, a, PROBE, &auth).await, StatusCode::OK);
        assert_eq!(get(&http, b, PROBE, &auth).await, StatusCode::OK);
        let t0 = Instant::now();
        let status = call(
            &http,
            a,
            reqwest::Method::DELETE,
            &format!("/api/serviceaccounts/{sa}/tokens/{token_id}"),
            &admin(),
        )
        .await;
        let t1 = Instant::now();
        assert!(status.is_success());
        assert_eq!(get(&http, b, PROBE, &auth).await, StatusCode::UNAUTHORIZED);
        let t2 = Instant::now();
        call_a.push(t1 - t0);
        fleet_eviction.push(Duration::from_micros(load(&stats(a).last_revocation_us)));
        after_return.push(t2 - t1);
        to_refusal.push(t2 - t0);
    }
    summary("revoking call on A (incl. fleet-wide eviction)", &mut call_a);
    summary(
        "fleet-wide eviction inside A's revoking call",
        &mut fleet_eviction,
    );
    summary("A's answer -> B's refusal", &mut after_return);
    summary("revoking call sent on A -> refusal on B", &mut to_refusal);

    // Baseline: the same revoking call through a gateway without Redis.
    let (config, dir) = support::config(&stub.url());
    let alone = support::start(config, dir).await;
    let mut call_alone = Vec::new();
    for i in 0..samples {
        let (token_id, token) = stub.add_sa_token(sa, &format!("s{i}"), None);
        let auth = Auth::Bearer(token);
        assert_eq!(get(&http, &alone, PROBE, &auth).await, StatusCode::OK);
        let path = format!("/api/serviceaccounts/{sa}/tokens/{token_id}");
        let t0 = Instant::now();
        assert!(call(&http, &alone, reqwest::Method::DELETE, &path, &admin())
            .await
            .is_success());
        call_alone.push(t0.elapsed());
    }
    summary(
        "same revoking call, single gateway without Redis",
        &mut call_alone,
    );
    eprintln!(
        "unconfirmed broadcasts: {}",
        load(&stats(a).evictions_unconfirmed)
    );
}

/// Two caches (as two replicas would hold) on `config`: what one verified
/// the other serves from Redis, and one revocation empties both and Redis.
async fn caches_share_and_evict(config: portcullis::config::CacheConfig) {
    use portcullis::auth::{
        AuthMethod, Credential, DenyReason, Identity, IdentityRecord, Principal, PrincipalKind, Verdict,
    };
    use portcullis::cache::{Cache, Eviction, KeyOrigin, Keyer, Shared, Source};

    let principal = Principal {
        kind: PrincipalKind::ServiceAccount,
        id: 7,
    };
    let identity = || IdentityRecord {
        principal,
        login: "sa-7".into(),
        email: "".into(),
        name: "seven".into(),
        org_id: 1,
        org_role: Role::Viewer,
        other_orgs: Default::default(),
        grafana_admin: false,
        method: AuthMethod::ServiceToken,
        verified_at_ms: 0,
        expires_at_ms: 0,
    };
    let (_stop, shutdown) = portcullis::shutdown::Shutdown::new();
    let mut caches = Vec::new();
    for _ in 0..2 {
        let shared = Shared::connect(&config.redis, config.ttl)
            .await
            .expect("connects");
        assert!(shared.is_commands_up());
        let cache = Arc::new(
            Cache::new(&config, Keyer::new(FLEET_KEY.as_bytes(), KeyOrigin::File)).with_shared(shared),
        );
        cache.start_shared(shutdown.clone()).await;
        assert!(cache.shared().unwrap().is_up(), "subscribed");
        caches.push(cache);
    }
    let keys: Vec<_> = (0..20)
        .map(|n| {
            caches[0].keyer.key(&Credential::Session {
                token: format!("{n:032x}"),
            })
        })
        .collect();
    for key in &keys {
        let (_, source) = caches[0]
            .resolve(*key, || async {
                Ok(Verdict::Allowed(Box::new(Identity::from(identity()))))
            })
            .await
            .unwrap();
        assert_eq!(source, Source::Verifier);
        let (_, source) = caches[1]
            .resolve(*key, || async { panic!("verified again") })
            .await
            .unwrap();
        assert_eq!(source, Source::Shared);
    }
    caches[0].invalidate(&[Eviction::Principal(principal)]).await;
    assert!(
        caches[1].is_empty(),
        "the other replica dropped them before the call returned"
    );
    assert_eq!(load(&caches[0].shared().unwrap().stats.evictions_unconfirmed), 0);
    for key in &keys {
        let (_, source) = caches[1]
            .resolve(*key, || async { Ok(Verdict::Denied(DenyReason::Invalid)) })
            .await
            .unwrap();
        assert_eq!(source, Source::Verifier, "gone from Redis too");
    }
}

fn spawn_quiet(command: &mut Command) -> Child {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server runs")
}

async fn wait_for_ping(port: u16, password: Option<&str>) {
    let url = match password {
        Some(p) => format!("redis://:{p}@127.0.0.1:{port}/"),
        None => format!("redis://127.0.0.1:{port}/"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
        {
            if redis::cmd("PING").query_async::<String>(&mut c).await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "Redis on {port} did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Children killed by PID when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn sentinel_through_the_redis_crate() {
    let dir = tempfile::tempdir().unwrap();
    let (master, sentinel) = (free_port(), free_port());
    let mut children = Children(Vec::new());
    children.0.push(spawn_quiet(
        Command::new("redis-server")
            .current_dir(dir.path())
            .args(["--port", &master.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--requirepass", "sentinel-pw", "--masterauth", "sentinel-pw"]),
    ));
    wait_for_ping(master, Some("sentinel-pw")).await;
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {sentinel}\nbind 127.0.0.1\nsentinel monitor portcullis 127.0.0.1 {master} 1\n\
             sentinel auth-pass portcullis sentinel-pw\n"
        ),
    )
    .unwrap();
    children.0.push(spawn_quiet(
        Command::new("redis-server")
            .current_dir(dir.path())
            .arg(&conf)
            .arg("--sentinel"),
    ));
    wait_for_ping(sentinel, None).await;
    let mut config = portcullis::config::CacheConfig::default();
    config.redis.timeout = Duration::from_secs(1);
    config.redis.url = format!("redis+sentinel://:sentinel-pw@127.0.0.1:{sentinel}/portcullis");
    caches_share_and_evict(config).await;
}

#[tokio::test]
async fn cluster_through_the_redis_crate() {
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let mut children = Children(Vec::new());
    for port in ports {
        children.0.push(spawn_quiet(
            Command::new("redis-server")
                .current_dir(dir.path())
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                ]),
        ));
    }
    for port in ports {
        wait_for_ping(port, None).await;
    }
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&nodes)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli runs");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for port in ports {
        loop {
            let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut c)
                .await
                .unwrap();
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "cluster did not form");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut config = portcullis::config::CacheConfig::default();
    config.redis.timeout = Duration::from_secs(1);
    config.redis.cluster = ports.iter().map(|p| format!("redis://127.0.0.1:{p}/")).collect();
    caches_share_and_evict(config).await;
}

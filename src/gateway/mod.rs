//! The request path, one phase after another (docs/design.md, "The request
//! path"): strip spoofable headers → normalise → route → credential →
//! identity → policy → forward → revoke on success. Each refusal is one
//! `Refusal` variant with one answer.
//!
//! The rooms of the request path's top: `refusal` (every answer the gateway
//! gives itself, one status and one JSON body each), `headers` (header
//! hygiene: what clients may not send, what is injected, cookies), `log`
//! (request ids, the access log's facts, the audit trail).

mod headers;
mod log;
mod refusal;

pub use log::X_REQUEST_ID;
pub use refusal::Refusal;

use self::headers::*;
use self::log::*;

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::auth::org::{self};
use crate::auth::{Credential, CredentialKind, DenyReason, Identity, Role, Verdict, Verifier, VerifyError};
use crate::cache::{Cache, CacheKey, Eviction, Outcome, Source};
use crate::config::{Config, GrafanaMode, Profile};
use crate::metrics::{self, Answer, Auth, Metrics};
use crate::proxy::{self, Body, Forwarder, Peer, ProxyError, RequestBody, TrustedProxies};
use crate::revoke::{reads_session_cookie, ManagementCall, Revocation};
use crate::routes::{normalise, normalise_host, Route, RouteTable};
use crate::shield::{self, Admission, Checked, Shield};

pub struct Gateway {
    /// What a SIGHUP can change, read once per request.
    policy: ArcSwap<Policy>,
    cache: Arc<Cache>,
    verifier: Verifier,
    forwarder: Forwarder,
    default_upstream: http::Uri,
    shield: Arc<Shield>,
    request_ids: RequestIds,
    pub metrics: Arc<Metrics>,
}

/// The part of the configuration a reload replaces: routes, identity, the
/// session cookie's name, trusted proxies, header limits, the access log.
/// Each request works with the one it started with.
struct Policy {
    routes: RouteTable,
    profile: Profile,
    injected: InjectedHeaders,
    trusted: TrustedProxies,
    session_cookie: String,
    access_log: bool,
    grafana_mode: GrafanaMode,
    max_header_bytes: usize,
}

impl Policy {
    fn from_config(config: &Config) -> Result<Policy, crate::Error> {
        Ok(Policy {
            routes: RouteTable::build(config.auth.profile, &config.routes)?,
            profile: config.auth.profile,
            injected: InjectedHeaders::from_config(config)?,
            trusted: TrustedProxies::new(config.server.trusted_proxies.clone()),
            session_cookie: config.auth.session_cookie.clone(),
            access_log: config.log.access_log,
            grafana_mode: config.identity.grafana,
            max_header_bytes: config.server.max_header_bytes,
        })
    }

    /// The client address the shield counts: the peer, or for a trusted
    /// proxy the last address in `X-Forwarded-For` that is not one.
    fn client_ip(&self, peer: &Peer, headers: &HeaderMap) -> IpAddr {
        if !peer.trusted {
            return peer.addr.ip();
        }
        headers
            .get_all(proxy::X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
            .rev()
            .find(|ip| !self.trusted.contains(*ip))
            .unwrap_or_else(|| peer.addr.ip())
    }

    /// A browser navigating to a UI page is sent to the login page; API
    /// clients get 401.
    fn unauthenticated<B>(&self, request: &Request<B>, refusal: Refusal) -> Refusal {
        let wants_html = request
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/html"));
        let path = request.uri().path();
        let ui_page = self.profile == Profile::Grafana && !path.starts_with("/api/") && path != "/api";
        if request.method() == Method::GET && wants_html && ui_page {
            let redirect_to = request
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
            // Grafana's own answer to a page load with a token due for
            // rotation (`pkg/middleware/auth.go`): rotate, then come back.
            if matches!(&refusal, Refusal::Grafana(r) if r.needs_rotation()) {
                return Refusal::Rotate { redirect_to };
            }
            return Refusal::Login { redirect_to };
        }
        refusal
    }

    /// `rotation`: the session cookie goes to Grafana even where the route
    /// forwards no credential.
    fn credentials_for_upstream(
        &self,
        headers: &mut HeaderMap,
        route: &Route,
        credential: Option<&Credential>,
        rotation: bool,
    ) {
        if !route.forward_credentials {
            headers.remove(header::AUTHORIZATION);
            if !rotation {
                remove_cookie(headers, &self.session_cookie);
            }
            return;
        }
        if let Some(rewritten) = credential.and_then(Credential::forwarded_authorization) {
            headers.insert(header::AUTHORIZATION, rewritten);
        }
    }
}

/// What the phases learn about one request, in the order they learn it.
/// `'r` is the request target the normalised path may borrow from.
struct Ctx<'g, 'r> {
    policy: &'g Policy,
    route: &'g Route,
    host_value: Option<HeaderValue>,
    credential: Option<Credential>,
    /// `X-Grafana-Org-Id` / `targetOrgId`.
    requested_org: Option<i64>,
    /// The normalised path as the upstream receives it.
    upstream_path: Cow<'r, str>,
    /// A call that changes what cached identities say, if this is one.
    call: Option<ManagementCall>,
    rotation: bool,
    cache_key: Option<CacheKey>,
    /// The verified identity and the org the request runs in.
    judged: Option<(Arc<Identity>, i64)>,
    /// Who makes a revoking call, when that could be learnt.
    caller: Option<Arc<Identity>>,
    /// The client address as the shield and the audit trail count it.
    client: IpAddr,
}

impl Gateway {
    pub fn new(
        config: &Config,
        cache: Arc<Cache>,
        shield: Arc<Shield>,
        metrics: Arc<Metrics>,
    ) -> Result<Gateway, crate::Error> {
        let policy = Policy::from_config(config)?;
        let default_upstream: http::Uri =
            config
                .upstream
                .url
                .parse()
                .map_err(|_| crate::config::ConfigError::Key {
                    key: "upstream.url".into(),
                    reason: "not a URL".into(),
                })?;
        let forwarder = Forwarder::new(
            &config.upstream,
            std::iter::once(&default_upstream).chain(policy.routes.upstreams()),
        )?;
        Ok(Gateway {
            policy: ArcSwap::from_pointee(policy),
            cache,
            verifier: Verifier::from_config(config)?,
            forwarder,
            default_upstream,
            shield,
            request_ids: RequestIds::new(),
            metrics,
        })
    }

    /// Takes up a new configuration's routes, identity, session cookie,
    /// trusted proxies, header limit and access log for the requests that
    /// start from now on; requests under way finish with the old ones.
    /// Returns the keys that changed but need a restart. An invalid
    /// configuration changes nothing.
    pub fn reload(&self, old: &Config, new: &Config) -> Result<Vec<&'static str>, crate::Error> {
        let policy = Policy::from_config(new)?;
        self.policy.store(Arc::new(policy));
        self.cache.set_ttls(new.cache.ttl, new.cache.negative_ttl);
        let mut restart = Vec::new();
        let differs = |a: String, b: String| a != b;
        let show = |v: &dyn std::fmt::Debug| format!("{v:?}");
        for (key, changed) in [
            ("server.listen", old.server.listen != new.server.listen),
            (
                "server.admin_listen",
                old.server.admin_listen != new.server.admin_listen,
            ),
            (
                "server (limits and time-outs)",
                differs(
                    show(&old.server.max_connections),
                    show(&new.server.max_connections),
                ) || old.server.idle_timeout != new.server.idle_timeout
                    || old.server.header_read_timeout != new.server.header_read_timeout,
            ),
            (
                "tls.cert / tls.key (the files are reloaded when they change)",
                old.tls.cert != new.tls.cert || old.tls.key != new.tls.key,
            ),
            (
                "upstream",
                differs(show(&old.upstream.url), show(&new.upstream.url))
                    || old.upstream.direct_exchange != new.upstream.direct_exchange,
            ),
            (
                "auth.verifier / auth.grafana / auth.static_users",
                differs(show(&old.auth.grafana.url), show(&new.auth.grafana.url))
                    || old.auth.verifier != new.auth.verifier
                    || differs(
                        show(&old.auth.static_users.len()),
                        show(&new.auth.static_users.len()),
                    ),
            ),
            (
                "auth.login_failures / auth.client_failures (the shield's budgets)",
                old.auth.login_failures != new.auth.login_failures
                    || old.auth.client_failures != new.auth.client_failures
                    || old.auth.login_failure_window != new.auth.login_failure_window
                    || old.auth.client_failure_window != new.auth.client_failure_window,
            ),
            (
                "cache.key_file / cache.redis / cache.max_entries",
                old.cache.key_file != new.cache.key_file
                    || differs(show(&old.cache.redis.url), show(&new.cache.redis.url))
                    || old.cache.redis.cluster != new.cache.redis.cluster
                    || old.cache.max_entries != new.cache.max_entries,
            ),
        ] {
            if changed {
                restart.push(key);
            }
        }
        Ok(restart)
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The client of a new connection, as its requests will need it.
    pub fn peer(&self, addr: SocketAddr) -> Peer {
        Peer::new(addr, &self.policy.load().trusted)
    }

    pub async fn handle(&self, mut request: Request<Incoming>, peer: &Peer) -> Response<Body> {
        let started = Instant::now();
        let policy = self.policy.load_full();
        // Before anything else reads the request.
        policy.injected.strip(request.headers_mut(), peer.trusted);
        let request_id = self.request_ids.for_request(request.headers(), peer.trusted);
        request.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        let method = request.method().clone();
        // Path only: a query string may carry secrets.
        let path = policy.access_log.then(|| request.uri().path().to_owned());
        // Also for the access log: Host (HTTP/2's :authority) and User-Agent.
        let (host, user_agent) = match policy.access_log {
            true => (
                request.headers().get(header::HOST).cloned().or_else(|| {
                    let authority = request.uri().authority()?;
                    HeaderValue::from_str(authority.as_str()).ok()
                }),
                request.headers().get(header::USER_AGENT).cloned(),
            ),
            false => (None, None),
        };
        let mut outcomes = Outcomes {
            request_id,
            route: None,
            authorization: request.headers().get(header::AUTHORIZATION).cloned(),
            credential: None,
            identity: None,
            source: None,
            upstream_time: None,
        };
        let mut answer = Answer::Upstream;
        let response = match self.pass(request, peer, &policy, &mut outcomes).await {
            Ok(response) => response,
            Err(refusal) => {
                answer = Answer::Gateway(match &refusal {
                    Refusal::NoCredential
                    | Refusal::Login { .. }
                    | Refusal::BadCredential(_)
                    | Refusal::Refused => Some(Auth::Refused),
                    Refusal::Grafana(r) if !r.needs_rotation() => Some(Auth::Refused),
                    Refusal::Forbidden | Refusal::NotInOrg(_) => Some(Auth::Forbidden),
                    Refusal::VerifierUnavailable(_) => Some(Auth::Unavailable),
                    Refusal::Throttled(_) => Some(Auth::RateLimited),
                    _ => None,
                });
                if matches!(
                    refusal,
                    Refusal::VerifierUnavailable(_)
                        | Refusal::Proxy(
                            ProxyError::Unreachable(_) | ProxyError::InvalidResponse(_) | ProxyError::Timeout
                        )
                ) {
                    tracing::warn!(error = %refusal, detail = ?refusal, request_id = outcomes.request_id.to_str().unwrap_or("-"), "request failed");
                }
                outcomes.audit_refusal(&refusal, peer.addr.ip(), &method);
                refusal.into_response()
            }
        };
        let elapsed = started.elapsed();
        self.metrics.record(&metrics::Request {
            status: response.status(),
            answer,
            credential: outcomes.credential.map(CredentialKind::as_str),
            source: outcomes.source,
            elapsed,
            upstream: outcomes.upstream_time,
        });
        if policy.access_log {
            // Milliseconds to the microsecond.
            let ms = |t: Duration| t.as_micros() as f64 / 1000.0;
            tracing::info!(
                target: "access",
                request_id = outcomes.request_id.to_str().unwrap_or("-"),
                peer = %peer.addr.ip(),
                method = %method,
                host = host.as_ref().and_then(|h| h.to_str().ok()),
                path = path.as_deref().unwrap_or(""),
                status = response.status().as_u16(),
                // The body's length when known (Content-Length, or a whole body).
                bytes = http_body::Body::size_hint(response.body()).exact(),
                duration_ms = ms(elapsed),
                upstream_ms = outcomes.upstream_time.map(ms),
                user = outcomes.identity.as_deref().map(|i| i.login()),
                user_agent = user_agent.as_ref().and_then(|v| v.to_str().ok()),
                cache = outcomes.source.map(|s| match s { Source::Local => "hit", Source::Shared => "redis", Source::Verifier => "miss" }),
            );
        }
        response
    }

    /// The phases a request meets, in order, over one context: request
    /// filter (method, head, path, route, credential, org) → identity and
    /// policy → upstream request → forward → response filter. The access
    /// log and the audit trail are `handle`'s last phase.
    async fn pass<'g>(
        &'g self,
        mut request: Request<Incoming>,
        peer: &Peer,
        policy: &'g Policy,
        outcomes: &mut Outcomes<'g>,
    ) -> Result<Response<Body>, Refusal> {
        // A clone of the target (reference counts, no copy) lets the
        // normalised path borrow it while the request is rewritten.
        let target = request.uri().clone();
        let mut ctx = self.request_filter(&request, &target, policy, outcomes)?;
        self.authenticate(&mut ctx, &request, peer, outcomes).await?;
        let client_upgrade = self.upstream_request(&mut request, &ctx, peer)?;
        let mut response = self
            .forward(request, client_upgrade, &ctx, peer, outcomes)
            .await?;
        self.response_filter(&mut response, &ctx, outcomes).await;
        Ok(response)
    }

    /// Request filter: what the request asks for, read once.
    fn request_filter<'g, 'r>(
        &'g self,
        request: &Request<Incoming>,
        target: &'r http::Uri,
        policy: &'g Policy,
        outcomes: &mut Outcomes<'g>,
    ) -> Result<Ctx<'g, 'r>, Refusal> {
        // TRACE would echo the caller's credentials back through any
        // upstream that answers it.
        if request.method() == Method::TRACE || request.method().as_str() == "TRACK" {
            return Err(Refusal::MethodNotAllowed);
        }
        // hyper reads heads up to twice this (server.rs), so that a head
        // past the limit gets an answer in JSON from here.
        let head_bytes: usize = request
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        if head_bytes > policy.max_header_bytes {
            return Err(Refusal::HeadTooLarge);
        }
        let path = normalise(target.path())?;
        let host_value = request.headers().get(header::HOST).cloned().or_else(|| {
            target
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let host = host_value
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .map(normalise_host);
        let route = policy
            .routes
            .lookup(request.method(), host.as_deref(), &path.decoded);
        outcomes.route = Some(&route.prefix);
        let credential = Credential::from_headers(request.headers(), &policy.session_cookie)?;
        outcomes.credential = credential.as_ref().map(Credential::kind);
        let requested_org = org::requested(request.headers(), target.query())?;
        let upstream_path = match path.encoded {
            Cow::Borrowed(encoded) => route.upstream_path(encoded),
            Cow::Owned(encoded) => Cow::Owned(route.upstream_path(&encoded).into_owned()),
        };
        let call = ManagementCall::recognise(request.method(), &upstream_path);
        Ok(Ctx {
            policy,
            route,
            host_value,
            credential,
            requested_org,
            upstream_path,
            call,
            // Grafana's rotation endpoints read the cookie themselves, and a
            // browser refused there is logged out: no route rule applies.
            rotation: call == Some(ManagementCall::RotateSession),
            cache_key: None,
            judged: None,
            caller: None,
            client: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        })
    }

    /// Identity and policy: who is calling (cache, else the verifier behind
    /// the lock-out shield) and whether the route lets them in.
    async fn authenticate(
        &self,
        ctx: &mut Ctx<'_, '_>,
        request: &Request<Incoming>,
        peer: &Peer,
        outcomes: &mut Outcomes<'_>,
    ) -> Result<(), Refusal> {
        let route = ctx.route;
        // The client address matters only to the shield and the audit of a
        // revoking call: worked out for those alone.
        ctx.client = match ctx.call {
            Some(_) => ctx.policy.client_ip(peer, request.headers()),
            None => peer.addr.ip(),
        };
        if route.min_role != Role::None && !ctx.rotation {
            let Some(credential) = &ctx.credential else {
                return Err(ctx.policy.unauthenticated(request, Refusal::NoCredential));
            };
            let key = self.cache.keyer.key(credential);
            ctx.cache_key = Some(key);
            let (outcome, source) = self
                .cache
                .resolve(key, || {
                    self.check(credential, key, ctx.policy.client_ip(peer, request.headers()))
                })
                .await?;
            outcomes.source = Some(source);
            let identity = match outcome {
                Outcome::Allowed(identity) => identity,
                Outcome::Denied(reason) => {
                    let refusal = match reason {
                        DenyReason::Grafana(refusal) => Refusal::Grafana(refusal),
                        DenyReason::Invalid | DenyReason::Disabled => Refusal::Refused,
                    };
                    return Err(match credential {
                        Credential::Session { .. } => ctx.policy.unauthenticated(request, refusal),
                        _ => refusal,
                    });
                }
            };
            outcomes.identity = Some(identity.clone());
            if !identity.is_fresh(crate::auth::identity::now_ms()) {
                // Resolve only hands out fresh entries; this guards the clock.
                return Err(Refusal::Refused);
            }
            let org_id = ctx.requested_org.unwrap_or(identity.org_id);
            let role = identity.role_in(org_id).ok_or(Refusal::NotInOrg(org_id))?;
            let role = if identity.grafana_admin {
                Role::GrafanaAdmin
            } else {
                role
            };
            if role < route.min_role {
                return Err(Refusal::Forbidden);
            }
            ctx.caller = Some(identity.clone());
            ctx.judged = Some((identity, org_id));
        } else if let Some(password @ Credential::Password { .. }) =
            ctx.credential.as_ref().filter(|_| route.forward_credentials)
        {
            // A password on its way to Grafana unjudged (an anonymous route):
            // every wrong one Grafana saw would count towards locking its
            // user out, so it is checked here, behind the shield, first.
            let key = self.cache.keyer.key(password);
            ctx.cache_key = Some(key);
            let client = ctx.policy.client_ip(peer, request.headers());
            let (outcome, source) = self
                .cache
                .resolve(key, || self.check(password, key, client))
                .await?;
            outcomes.source = Some(source);
            match outcome {
                // As verified as a judged one: towards Grafana's auth proxy
                // it goes as the user too.
                Outcome::Allowed(identity) => {
                    let org_id = ctx.requested_org.unwrap_or(identity.org_id);
                    ctx.caller = Some(identity.clone());
                    ctx.judged = Some((identity, org_id));
                }
                Outcome::Denied(_) => return Err(Refusal::Refused),
            }
        }
        // A call that revokes the caller's own credentials on a route that
        // needs none (PMM's `/graph`): learn who calls before forwarding,
        // while the credential still works. Grafana judges the call itself,
        // so a failed look-up does not stop it.
        if ctx.caller.is_none() && ctx.call.is_some_and(ManagementCall::needs_caller) {
            ctx.caller = Box::pin(self.identify(ctx.credential.as_ref(), ctx.client)).await;
        }
        Ok(())
    }

    /// Upstream request: its target, hop-by-hop and forwarding headers, and
    /// towards Grafana the credential or an identity, never both.
    fn upstream_request(
        &self,
        request: &mut Request<Incoming>,
        ctx: &Ctx<'_, '_>,
        peer: &Peer,
    ) -> Result<Option<hyper::upgrade::OnUpgrade>, Refusal> {
        let route = ctx.route;
        let base = route.upstream.as_ref().unwrap_or(&self.default_upstream);
        let uri = proxy::upstream_uri(base, &ctx.upstream_path, request.uri().query())
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        let upgrade = proxy::is_upgrade(request);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut *request));
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        // Room for the three forwarding and five identity headers at once:
        // a map sized for the client's few headers would otherwise grow twice.
        headers.reserve(8);
        proxy::strip_hop_by_hop(headers, upgrade);
        proxy::set_forwarded(headers, peer, ctx.host_value.as_ref());
        if !headers.contains_key(header::HOST) {
            // HTTP/2 carries the host in :authority; HTTP/1.1 upstreams want Host.
            if let Some(h) = ctx.host_value.clone() {
                headers.insert(header::HOST, h);
            }
        }
        ctx.policy
            .credentials_for_upstream(headers, route, ctx.credential.as_ref(), ctx.rotation);
        // An account Grafana did not name (a token on 10.4) is no identity:
        // every such token would become the same user.
        let identity = ctx.judged.as_ref().filter(|(i, _)| i.is_named());
        if route.grafana {
            // Grafana checks a credential before its auth proxy, and when it
            // refuses one the proxy headers would sign the request in.
            if let (GrafanaMode::AuthProxy, Some((identity, org_id))) = (ctx.policy.grafana_mode, identity) {
                // Tokens and keys cannot be proxy users; the session calls
                // read the cookie themselves.
                if identity.is_user() && !reads_session_cookie(&ctx.upstream_path) {
                    headers.remove(header::AUTHORIZATION);
                    remove_cookie(headers, &ctx.policy.session_cookie);
                    ctx.policy
                        .injected
                        .inject_for_auth_proxy(headers, identity, *org_id);
                }
            }
        } else if route.inject_identity && route.min_role != Role::None {
            if let Some((identity, org_id)) = identity {
                ctx.policy.injected.inject(headers, identity, *org_id);
            }
        }
        Ok(client_upgrade)
    }

    /// Forward: Grafana's login form is a door to its lock-out like Basic
    /// is, so its password is weighed by the shield before Grafana sees it.
    async fn forward(
        &self,
        request: Request<Incoming>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        ctx: &Ctx<'_, '_>,
        peer: &Peer,
        outcomes: &mut Outcomes<'_>,
    ) -> Result<Response<Body>, Refusal> {
        let (request, login) = if shield::is_login_form(request.method(), &ctx.upstream_path) {
            let client = ctx.policy.client_ip(peer, request.headers());
            Box::pin(self.read_login_form(request, client)).await?
        } else {
            (request.map(RequestBody::Streamed), None)
        };
        let forward_started = Instant::now();
        let forwarded = self.forwarder.forward(request, client_upgrade).await;
        outcomes.upstream_time = Some(forward_started.elapsed());
        if let Some(admission) = login {
            let checked = match forwarded.as_ref().map(|r| r.status()) {
                Ok(StatusCode::OK) => Checked::Good,
                Ok(StatusCode::UNAUTHORIZED) => Checked::Refused,
                _ => Checked::Unknown,
            };
            self.shield.settle(admission, checked).await;
        }
        Ok(forwarded?)
    }

    /// Response filter: PMM's cookie paths, a cache that Grafana contradicts,
    /// and what a successful management call revoked.
    async fn response_filter(
        &self,
        response: &mut Response<Body>,
        ctx: &Ctx<'_, '_>,
        outcomes: &Outcomes<'_>,
    ) {
        let route = ctx.route;
        if ctx.policy.profile == Profile::Pmm && route.grafana {
            // PMM's Grafana sets its cookies on its sub path; PMM's front
            // door hands them to the whole site, or the session would never
            // reach `/v1`.
            widen_cookie_paths(response.headers_mut(), "/graph");
        }
        if response.status() == StatusCode::UNAUTHORIZED
            && route.grafana
            && matches!(outcomes.source, Some(Source::Local | Source::Shared))
        {
            // Grafana changed its mind about a credential the cache allowed
            // (revoked or disabled there directly): forget it everywhere.
            if let Some(key) = ctx.cache_key {
                Box::pin(self.cache.invalidate(&[Eviction::Key(key)])).await;
            }
        }
        if let Some(call) = ctx.call {
            if response.status().is_success() || response.status().is_redirection() {
                // Boxed: the rare revoking call should not make every
                // request's future (moved on each request) larger.
                let request = (&outcomes.request_id, ctx.client, response.status());
                Box::pin(self.revoke_after(
                    call,
                    &ctx.upstream_path,
                    ctx.caller.clone(),
                    ctx.cache_key,
                    ctx.credential.as_ref(),
                    request,
                ))
                .await;
            }
        }
    }

    /// Reads a login form (bounded) and admits its password through the
    /// shield. A form the gateway cannot read as Grafana's goes on as it is:
    /// Grafana cannot count a failure against a login it cannot read either.
    async fn read_login_form(
        &self,
        request: Request<Incoming>,
        client: IpAddr,
    ) -> Result<(Request<RequestBody>, Option<Admission>), Refusal> {
        let (parts, body) = request.into_parts();
        use http_body_util::BodyExt;
        let bytes = http_body_util::Limited::new(body, shield::MAX_LOGIN_FORM_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    Refusal::BadLoginForm
                } else {
                    Refusal::BadBody
                }
            })?
            .to_bytes();
        let admission = match shield::login_form_credential(&bytes) {
            Some(credential) => {
                let key = self.cache.keyer.key(&credential);
                let admission = self
                    .shield
                    .admit(&self.cache.keyer, &credential, key, client)
                    .await
                    .map_err(|throttle| Refusal::from(VerifyError::from(throttle)))?;
                Some(admission)
            }
            // Forwarded unweighed, Grafana would count its password anyway.
            None => return Err(Refusal::UnreadableLoginForm),
        };
        let body = RequestBody::Read(http_body_util::Full::new(bytes));
        Ok((Request::from_parts(parts, body), admission))
    }

    /// Who holds `credential`, from the cache or the verifier; `None` when
    /// that cannot be told now.
    async fn identify(&self, credential: Option<&Credential>, client: IpAddr) -> Option<Arc<Identity>> {
        let credential = credential?;
        let key = self.cache.keyer.key(credential);
        match self
            .cache
            .resolve(key, || self.check(credential, key, client))
            .await
        {
            Ok((Outcome::Allowed(identity), _)) => Some(identity),
            Ok((Outcome::Denied(_), _)) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot identify the caller of a revoking call");
                None
            }
        }
    }

    /// One verification at Grafana, behind the lock-out shield: it may be
    /// held back (the login's or the client's failure budget is used up),
    /// and its answer is counted.
    async fn check(
        &self,
        credential: &Credential,
        key: CacheKey,
        client: IpAddr,
    ) -> Result<Verdict, VerifyError> {
        let admission = self
            .shield
            .admit(&self.cache.keyer, credential, key, client)
            .await
            .map_err(VerifyError::from)?;
        let asked = Instant::now();
        let verdict = self.verifier.verify(credential).await;
        self.metrics.observe_verifier(asked.elapsed());
        let checked = match &verdict {
            Ok(Verdict::Allowed(_)) => Checked::Good,
            Ok(Verdict::Denied(DenyReason::Invalid | DenyReason::Disabled)) => Checked::Refused,
            // A session due for rotation is no failure; an error says nothing.
            Ok(Verdict::Denied(DenyReason::Grafana(_))) | Err(_) => Checked::Unknown,
        };
        self.shield.settle(admission, checked).await;
        verdict
    }

    /// Applies what a successful management call revoked — here, in Redis and
    /// on every replica — before its response goes back to the client.
    async fn revoke_after(
        &self,
        call: ManagementCall,
        path: &str,
        mut caller: Option<Arc<Identity>>,
        cache_key: Option<CacheKey>,
        credential: Option<&Credential>,
        (request_id, client, status): (&HeaderValue, IpAddr, StatusCode),
    ) {
        if caller.is_none() && call.needs_caller() {
            // The look-up before forwarding failed (Grafana was briefly
            // away); the call succeeded, so the credential still works.
            caller = self.identify(credential, client).await;
            if caller.is_none() {
                tracing::warn!(
                    ?call,
                    path,
                    "a revoking call succeeded but its caller could not be identified: nothing evicted"
                );
            }
        }
        let revocations = call.revocations(caller.as_deref());
        // Logout is an anonymous route: its key was not computed.
        let caller_key = || cache_key.or_else(|| credential.map(|c| self.cache.keyer.key(c)));
        let mut evictions = Vec::with_capacity(revocations.len());
        for revocation in &revocations {
            match *revocation {
                Revocation::Caller => evictions.extend(caller_key().map(Eviction::Key)),
                Revocation::RetireCaller => evictions.extend(caller_key().map(Eviction::Retire)),
                Revocation::Principal(principal) => evictions.push(Eviction::Principal(principal)),
                Revocation::Method(m) => evictions.push(Eviction::Method(m)),
            }
            self.metrics.revocations.fetch_add(1, Ordering::Relaxed);
        }
        let dropped = if evictions.is_empty() {
            0
        } else {
            self.cache.invalidate(&evictions).await
        };
        tracing::info!(
            target: "audit",
            event = "revocation",
            request_id = request_id.to_str().unwrap_or("-"),
            client = %client,
            caller = caller.as_deref().map(Identity::login),
            call = ?call,
            path,
            status = status.as_u16(),
            revoked = ?revocations,
            dropped_here = dropped,
        );
    }
}

//! The HTTP surface: Grafana's identity and management endpoints as
//! docs/grafana.md lists them, `/login` and `/logout`, pmm-managed's version
//! endpoint, and an echo for everything the gateway merely proxies.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LOCATION, SET_COOKIE, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::auth::{self, ApiError, Caller, Principal};
use crate::clock::rfc3339;
use crate::credentials::{LegacyKey, SaToken};
use crate::pages;
use crate::store::{self, ApiKey, Conflict, LookupError, Role, ServiceAccount, Session, User};
use crate::{Authn, Flavor, SeenRequest, Shared};

pub type Body = Full<Bytes>;

/// Request bodies larger than this are refused (the stand-in never needs more).
const MAX_BODY_BYTES: usize = 1 << 20;

pub async fn handle(shared: Arc<Shared>, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let path = request.uri().path().to_owned();
    count(&shared, request.method(), &path);

    let delay = *shared.delay.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    if shared.unavailable.load(Ordering::SeqCst) {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"message": "Service unavailable"}),
        );
    }

    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return error_response(
                &shared,
                ApiError::new(StatusCode::BAD_REQUEST, "bad request data"),
            )
        }
    };
    let req = Req {
        method: parts.method,
        path,
        query: parts.uri.query().map(str::to_owned),
        version: parts.version,
        headers: parts.headers,
        body,
        peer,
        authn: Mutex::new(None),
    };
    let response = match dispatch(&shared, &req).await {
        Ok(response) => response,
        Err(e) => error_response(&shared, e),
    };
    record(&shared, &req);
    response
}

/// Keeps the request, when recording (`GrafanaStub::record_requests`).
fn record(shared: &Shared, req: &Req) {
    let mut recording = shared.recording();
    if let Some(seen) = recording.as_mut() {
        seen.push(SeenRequest {
            method: req.method.as_str().to_owned(),
            path: req.path.clone(),
            query: req.query.clone(),
            headers: req
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            authn: req.authn.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        });
    }
}

/// Grafana's authentication of a request (`auth::authenticate`), noting
/// the outcome for the recording.
async fn authenticate(shared: &Arc<Shared>, req: &Req) -> Result<Option<Caller>, ApiError> {
    let result = auth::authenticate(shared, &req.headers, req.peer, req.org()).await;
    let note = match &result {
        Ok(Some(caller)) => {
            let store = shared.store();
            let login = match caller.principal {
                Principal::User { id, .. } => store.users.get(&id).map(|u| u.login.clone()),
                Principal::ServiceAccount { id, .. } => {
                    store.service_accounts.get(&id).map(|s| s.login.clone())
                }
                Principal::ApiKey { .. } => None,
            };
            Authn::SignedIn {
                client: caller.via,
                login: login.unwrap_or_default(),
            }
        }
        Ok(None) => Authn::Anonymous,
        Err(e) => Authn::Refused {
            status: e.status.as_u16(),
            reason: e.body["messageId"]
                .as_str()
                .or_else(|| e.body["message"].as_str())
                .unwrap_or_default()
                .to_owned(),
        },
    };
    *req.authn.lock().unwrap_or_else(PoisonError::into_inner) = Some(note);
    result
}

struct Req {
    method: Method,
    path: String,
    query: Option<String>,
    version: http::Version,
    headers: HeaderMap,
    body: Bytes,
    peer: SocketAddr,
    /// What authentication made of the request, once it ran.
    authn: Mutex<Option<Authn>>,
}

impl Req {
    fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body)
            .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "bad request data"))
    }

    fn query_param(&self, name: &str) -> Option<String> {
        self.raw_query_param(name).map(|v| v.replace('+', " "))
    }

    /// The first value of a query parameter, as sent (still escaped).
    fn raw_query_param(&self, name: &str) -> Option<&str> {
        self.query
            .as_deref()?
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// The org the request asks for (`auth::requested_org`).
    fn org(&self) -> i64 {
        auth::requested_org(&self.headers, self.query.as_deref())
    }

    /// Grafana's `web.RemoteAddr`: the first forwarded address, else the peer.
    fn client_ip(&self) -> String {
        self.headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| self.peer.ip().to_string())
    }

    fn user_agent(&self) -> String {
        self.headers
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }
}

fn is_identity_endpoint(method: &Method, path: &str) -> bool {
    match path {
        "/api/user" | "/api/user/orgs" | "/api/org" | "/api/auth/serviceaccount" => true,
        _ => {
            method == Method::GET
                && path
                    .strip_prefix("/api/serviceaccounts/")
                    .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        }
    }
}

/// `verifications` counts the identity endpoints at their un-prefixed
/// spelling only: that is how a gateway asks Grafana who a credential is.
/// The sub-path spelling (`/graph/api/user`) is what browsers call through
/// the proxy; `calls("/graph/api/user")` counts those.
fn count(shared: &Shared, method: &Method, path: &str) {
    if is_identity_endpoint(method, path) {
        shared.verifications.fetch_add(1, Ordering::SeqCst);
    }
    *shared
        .calls
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(path.to_owned())
        .or_default() += 1;
}

// ---- responses -----------------------------------------------------------------

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn ok(value: Value) -> Result<Response<Body>, ApiError> {
    Ok(json_response(StatusCode::OK, &value))
}

fn message(text: &str) -> Result<Response<Body>, ApiError> {
    ok(json!({ "message": text }))
}

fn error_response(shared: &Shared, e: ApiError) -> Response<Body> {
    let mut response = json_response(e.status, &e.body);
    if e.clear_session {
        add_cookies(&mut response, &clear_cookies(shared));
    }
    response
}

fn add_cookies(response: &mut Response<Body>, cookies: &[String]) {
    for cookie in cookies {
        if let Ok(value) = HeaderValue::from_str(cookie) {
            response.headers_mut().append(SET_COOKIE, value);
        }
    }
}

/// Grafana's `sessionExpiryCookie`, read by the frontend (not HttpOnly).
const EXPIRY_COOKIE: &str = "grafana_session_expiry";

/// Grafana's `authn.WriteSessionCookie` (`pkg/services/authn/authn.go`):
/// the session cookie (URL-escaped token, `Max-Age` = the maximum lifetime,
/// HttpOnly, `SameSite=Lax`) and `grafana_session_expiry` = the token's
/// `NextRotation` in Unix seconds (rotation time minus 5 s), same attributes
/// but readable by scripts. Go's `http.Cookie` writes them in this order.
fn session_cookies(shared: &Shared, token: &str, session: &Session) -> Vec<String> {
    let max_age = store::MAX_LIFETIME_SECS;
    let path = shared.settings.cookie_path();
    vec![
        format!(
            "{}={token}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Lax",
            shared.settings.session_cookie
        ),
        format!(
            "{EXPIRY_COOKIE}={}; Path={path}; Max-Age={max_age}; SameSite=Lax",
            session.next_rotation(shared.settings.rotation_interval_secs)
        ),
    ]
}

/// Grafana's `authn.DeleteSessionCookie`: both cookies, `MaxAge: -1`, which
/// Go writes as `Max-Age=0`.
fn clear_cookies(shared: &Shared) -> Vec<String> {
    let path = shared.settings.cookie_path();
    vec![
        format!(
            "{}=; Path={path}; Max-Age=0; HttpOnly; SameSite=Lax",
            shared.settings.session_cookie
        ),
        format!("{EXPIRY_COOKIE}=; Path={path}; Max-Age=0; SameSite=Lax"),
    ]
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "Not found")
}

fn users_only() -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "Endpoint only available for users")
}

fn invalid_role() -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "Invalid role specified")
}

fn user_not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "User not found")
}

fn sa_not_found() -> ApiError {
    ApiError::authn(
        StatusCode::NOT_FOUND,
        "serviceaccounts.ErrNotFound",
        "service account not found",
    )
}

/// Grafana's RBAC refusal (`pkg/middleware/auth.go`, `deny`): what a
/// request running in an org the user does not belong to gets from every
/// org-scoped endpoint, since such a user has no permissions there
/// (grafana/grafana#92274 describes the `-1` org). The stand-in's other
/// refusals keep the legacy `{"message":"Permission denied"}`.
fn access_denied(action: &str) -> ApiError {
    use rand::Rng;
    let id: u64 = rand::thread_rng().gen_range(0..10_000_000_000);
    ApiError {
        status: StatusCode::FORBIDDEN,
        body: json!({
            "accessErrorId": format!("ACE{id:010}"),
            "message": format!(
                "You'll need additional permissions to perform this action. Permissions needed: {action}"
            ),
            "title": "Access denied",
        }),
        clear_session: false,
    }
}

/// Service accounts belong to one org; the others are "not found".
fn sa_in_org(store: &store::Store, sa_id: i64, org_id: i64) -> bool {
    store
        .service_accounts
        .get(&sa_id)
        .is_some_and(|sa| sa.org_id == org_id)
}

fn require_org_admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.org_role >= Role::Admin {
        Ok(())
    } else {
        Err(ApiError::forbidden())
    }
}

fn require_grafana_admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.grafana_admin {
        Ok(())
    } else {
        Err(ApiError::forbidden())
    }
}

fn require_user(caller: &Caller) -> Result<i64, ApiError> {
    caller.user_id().ok_or_else(users_only)
}

// ---- JSON shapes ---------------------------------------------------------------

fn avatar(seed: &str) -> String {
    let digest = Sha256::digest(seed.trim().to_lowercase().as_bytes());
    format!("/avatar/{}", &hex::encode(digest)[..32])
}

fn user_json(u: &User) -> Value {
    json!({
        "id": u.id,
        "uid": u.uid,
        "email": u.email,
        "name": u.name,
        "login": u.login,
        "theme": "",
        // Grafana's `GetProfile` reads the user row: the current org, not
        // the one the request asked for.
        "orgId": u.org_id,
        "isGrafanaAdmin": u.grafana_admin,
        "isDisabled": u.disabled,
        "isExternal": false,
        "isExternallySynced": false,
        "isGrafanaAdminExternallySynced": false,
        "authLabels": [],
        "updatedAt": rfc3339(u.updated),
        "createdAt": rfc3339(u.created),
        "avatarUrl": avatar(&u.email),
    })
}

/// `/api/user` for a service account (Grafana 11 reads its `user` row).
fn sa_as_user_json(sa: &ServiceAccount) -> Value {
    json!({
        "id": sa.id,
        "uid": sa.uid,
        "email": sa.login,
        "name": sa.name,
        "login": sa.login,
        "theme": "",
        "orgId": sa.org_id,
        "isGrafanaAdmin": false,
        "isDisabled": sa.disabled,
        "isExternal": false,
        "isExternallySynced": false,
        "isGrafanaAdminExternallySynced": false,
        "authLabels": [],
        "updatedAt": rfc3339(sa.updated),
        "createdAt": rfc3339(sa.created),
        "avatarUrl": avatar(&sa.login),
    })
}

fn sa_json(sa: &ServiceAccount, tokens: usize) -> Value {
    json!({
        "id": sa.id,
        "uid": sa.uid,
        "name": sa.name,
        "login": sa.login,
        "orgId": sa.org_id,
        "isDisabled": sa.disabled,
        "role": sa.role.as_str(),
        "tokens": tokens,
        "avatarUrl": avatar(&sa.login),
        "isExternal": false,
    })
}

fn sa_detail_json(sa: &ServiceAccount, tokens: usize) -> Value {
    let mut v = sa_json(sa, tokens);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("createdAt".into(), json!(rfc3339(sa.created)));
        obj.insert("updatedAt".into(), json!(rfc3339(sa.updated)));
        obj.insert("teams".into(), json!([]));
    }
    v
}

fn token_json(k: &ApiKey, now: i64) -> Value {
    let (expiration, seconds_until, expired) = match k.expires {
        Some(e) => (json!(rfc3339(e)), (e - now).max(0) as f64, e <= now),
        None => (Value::Null, 0.0, false),
    };
    json!({
        "id": k.id,
        "name": k.name,
        "created": rfc3339(k.created),
        "lastUsedAt": k.last_used.map(rfc3339),
        "expiration": expiration,
        "secondsUntilExpiration": seconds_until,
        "hasExpired": expired,
        "isRevoked": k.is_revoked,
    })
}

fn key_json(k: &ApiKey) -> Value {
    let mut v = json!({ "id": k.id, "name": k.name, "role": k.role.as_str() });
    if let Some(obj) = v.as_object_mut() {
        // Grafana's DTO: `omitempty` on both.
        if let Some(e) = k.expires {
            obj.insert("expiration".into(), json!(rfc3339(e)));
        }
        if let Some(u) = k.last_used {
            obj.insert("lastUsedAt".into(), json!(rfc3339(u)));
        }
    }
    v
}

fn browser_of(user_agent: &str) -> (&'static str, &'static str) {
    let ua = user_agent.to_ascii_lowercase();
    let browser = if ua.contains("firefox") {
        "Firefox"
    } else if ua.contains("chrome") {
        "Chrome"
    } else if ua.contains("safari") {
        "Safari"
    } else if ua.contains("curl") {
        "curl"
    } else {
        "Other"
    };
    let os = if ua.contains("linux") {
        "Linux"
    } else if ua.contains("mac os") {
        "Mac OS X"
    } else if ua.contains("windows") {
        "Windows"
    } else {
        "Other"
    };
    (browser, os)
}

fn session_json(s: &Session, active: Option<i64>) -> Value {
    let (browser, os) = browser_of(&s.user_agent);
    json!({
        "id": s.id,
        "isActive": Some(s.id) == active,
        "clientIp": s.client_ip,
        "browser": browser,
        "browserVersion": "",
        "os": os,
        "osVersion": "",
        "device": "Other",
        "createdAt": rfc3339(s.created),
        // Grafana: `seen_at`, or the creation time while it is 0.
        "seenAt": rfc3339(if s.seen_at == 0 { s.created } else { s.seen_at }),
    })
}

// ---- routing -------------------------------------------------------------------

/// The authenticated `/api` endpoints the stand-in knows.
enum Api {
    User,
    UserOrgs,
    UserUsingOrg(i64),
    Org,
    AuthServiceAccount,
    ListKeys,
    CreateKey,
    DeleteKey(i64),
    CreateSa,
    SearchSa,
    GetSa(i64),
    UpdateSa(i64),
    DeleteSa(i64),
    ListSaTokens(i64),
    CreateSaToken(i64),
    DeleteSaToken(i64, i64),
    UserAuthTokens,
    RevokeUserAuthToken,
    ChangePassword,
    AdminCreateUser,
    AdminPassword(i64),
    AdminDisable(i64, bool),
    AdminDelete(i64),
    AdminLogout(i64),
    AdminRevokeAuthToken(i64),
    AdminAuthTokens(i64),
    AdminPermissions(i64),
    OrgUserUpdate(i64),
    OrgUserDelete(i64),
}

fn id(s: &str) -> Option<i64> {
    s.parse().ok()
}

fn api_route(method: &Method, segs: &[&str], flavor: Flavor) -> Option<Api> {
    use Method as M;
    let m = method.clone();
    Some(match segs {
        ["user"] if m == M::GET => Api::User,
        ["user", "orgs"] if m == M::GET => Api::UserOrgs,
        ["user", "using", o] if m == M::POST => Api::UserUsingOrg(id(o)?),
        ["org"] if m == M::GET => Api::Org,
        ["auth", "serviceaccount"] if m == M::GET && flavor == Flavor::Pmm => Api::AuthServiceAccount,
        ["auth", "keys"] if m == M::GET => Api::ListKeys,
        ["auth", "keys"] if m == M::POST => Api::CreateKey,
        ["auth", "keys", k] if m == M::DELETE => Api::DeleteKey(id(k)?),
        ["serviceaccounts"] if m == M::POST => Api::CreateSa,
        ["serviceaccounts", "search"] if m == M::GET => Api::SearchSa,
        ["serviceaccounts", s] if m == M::GET => Api::GetSa(id(s)?),
        ["serviceaccounts", s] if m == M::PATCH => Api::UpdateSa(id(s)?),
        ["serviceaccounts", s] if m == M::DELETE => Api::DeleteSa(id(s)?),
        ["serviceaccounts", s, "tokens"] if m == M::GET => Api::ListSaTokens(id(s)?),
        ["serviceaccounts", s, "tokens"] if m == M::POST => Api::CreateSaToken(id(s)?),
        ["serviceaccounts", s, "tokens", t] if m == M::DELETE => Api::DeleteSaToken(id(s)?, id(t)?),
        ["user", "auth-tokens"] if m == M::GET => Api::UserAuthTokens,
        ["user", "revoke-auth-token"] if m == M::POST => Api::RevokeUserAuthToken,
        ["user", "password"] if m == M::PUT => Api::ChangePassword,
        ["admin", "users"] if m == M::POST => Api::AdminCreateUser,
        ["admin", "users", u, "password"] if m == M::PUT => Api::AdminPassword(id(u)?),
        ["admin", "users", u, "disable"] if m == M::POST => Api::AdminDisable(id(u)?, true),
        ["admin", "users", u, "enable"] if m == M::POST => Api::AdminDisable(id(u)?, false),
        ["admin", "users", u] if m == M::DELETE => Api::AdminDelete(id(u)?),
        ["admin", "users", u, "logout"] if m == M::POST => Api::AdminLogout(id(u)?),
        ["admin", "users", u, "revoke-auth-token"] if m == M::POST => Api::AdminRevokeAuthToken(id(u)?),
        ["admin", "users", u, "auth-tokens"] if m == M::GET => Api::AdminAuthTokens(id(u)?),
        ["admin", "users", u, "permissions"] if m == M::PUT => Api::AdminPermissions(id(u)?),
        ["org", "users", u] if m == M::PATCH => Api::OrgUserUpdate(id(u)?),
        ["org", "users", u] if m == M::DELETE => Api::OrgUserDelete(id(u)?),
        _ => return None,
    })
}

/// The path as Grafana's router sees it, and whether it came under the sub
/// path. Grafana (`serve_from_sub_path`) trims the prefix when present and
/// routes the rest, so both spellings reach the same handlers; the prefix is
/// only trimmed at a segment boundary here (`/graphite` is not Grafana's).
fn grafana_path<'a>(sub_path: &str, path: &'a str) -> (bool, &'a str) {
    if sub_path.is_empty() {
        return (false, path);
    }
    match path.strip_prefix(sub_path) {
        Some("") => (true, "/"),
        Some(rest) if rest.starts_with('/') => (true, rest),
        _ => (false, path),
    }
}

async fn dispatch(shared: &Arc<Shared>, req: &Req) -> Result<Response<Body>, ApiError> {
    let flavor = shared.settings.flavor;
    let (under_sub_path, path) = grafana_path(&shared.settings.sub_path, &req.path);
    // The UI lives where Grafana is served: under the sub path when there
    // is one (un-prefixed `/` and `/d/…` then echo, as before).
    let ui = under_sub_path || shared.settings.sub_path.is_empty();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (&req.method, segs.as_slice()) {
        (&Method::GET, ["api", "health"]) => ok(json!({
            "commit": "grafana-stub",
            "database": "ok",
            "version": flavor.grafana_version(),
        })),
        (&Method::POST, ["login"]) => login(shared, req).await,
        (&Method::GET, ["login"]) => Ok(login_view(shared, req).await),
        (&Method::GET, ["logout"]) => logout(shared, req).await,
        // Outside the signed-in middleware in Grafana: the cookie decides.
        (&Method::POST, ["api", "user", "auth-tokens", "rotate"]) => rotate(shared, req),
        (&Method::GET, ["user", "auth-tokens", "rotate"]) => Ok(rotate_redirect(shared, req)),
        (_, ["api", rest @ ..]) => {
            let Some(api) = api_route(&req.method, rest, flavor) else {
                authenticate_anyway(shared, req).await;
                return Err(not_found());
            };
            let caller = authenticate(shared, req)
                .await?
                .ok_or_else(ApiError::unauthorized)?;
            api_call(shared, req, &caller, api).await
        }
        (&Method::GET, [""] | ["d", ..]) if ui => Ok(page(shared, req).await),
        (&Method::GET, ["v1", "version"] | ["v1", "server", "version"])
            if flavor == Flavor::Pmm && path == req.path =>
        {
            // pmm-managed does no authentication of its own: the front door does.
            ok(pmm_version())
        }
        // Everything else — pmm-managed's `/v1/…`, the rest of `/graph`,
        // `/prometheus`, `/victoriametrics`, `/swagger`, `/ping`,
        // `/__stub/echo/…` — echoes, so tests see exactly what was forwarded.
        _ => {
            authenticate_anyway(shared, req).await;
            ok(echo(req))
        }
    }
}

/// Grafana's context handler authenticates every request before routing
/// it; a failure only matters to routes that need a user. The stand-in
/// does so for the paths it merely echoes (and unknown API paths) in
/// auth-proxy mode, where what authentication does to Grafana — proxy
/// users signed up and synced, a PBKDF2 per Basic header or key — is what
/// the tests look at. Without `[auth.proxy]` those paths stay as they were
/// (no authentication), so that echo-heavy tests keep their speed.
async fn authenticate_anyway(shared: &Arc<Shared>, req: &Req) {
    if shared.settings.auth_proxy {
        let _ = authenticate(shared, req).await;
    }
}

/// A `302 Found` to `location`.
fn redirect(location: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::FOUND;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(LOCATION, value);
    }
    response
}

/// Go's `url.QueryEscape`: unreserved bytes stay, space becomes `+`, the
/// rest `%XX` (upper case).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(char::from(b)),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Go's `url.QueryUnescape` (lenient: a bad escape is kept as it is).
fn query_unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(v)) => {
                out.push(v);
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Grafana's `getRedirectToQueryParam` (`pkg/middleware/auth.go`): the
/// request URI without the sub path, `forceLogin=true` removed, as
/// `?redirectTo=<QueryEscape>`; nothing for `/`.
fn redirect_to_param(shared: &Shared, req: &Req) -> String {
    let mut uri = req.path.clone();
    if let Some(q) = &req.query {
        uri.push('?');
        uri.push_str(q);
    }
    let sub = &shared.settings.sub_path;
    let mut redirect_to = match uri.strip_prefix(sub.as_str()) {
        Some(rest) if !sub.is_empty() => rest.to_owned(),
        _ => uri,
    };
    if redirect_to == "/" {
        return String::new();
    }
    for pattern in ["&forceLogin=true", "forceLogin=true"] {
        redirect_to = redirect_to.replace(pattern, "");
    }
    format!("?redirectTo={}", query_escape(&redirect_to))
}

/// Grafana's `ValidateRedirectTo` (`pkg/api/login.go`): a local path with
/// one leading slash, under the sub path when there is one.
fn valid_redirect(shared: &Shared, to: &str) -> bool {
    let path = to.split(['?', '#']).next().unwrap_or("");
    let sub = &shared.settings.sub_path;
    path.starts_with('/')
        && !path.starts_with("//")
        && !path.contains("://")
        && !path.contains('\\')
        && (sub.is_empty() || path.starts_with(&format!("{sub}/")))
}

/// `GET {sub}/login` (Grafana's `LoginView`): a signed-in caller is sent on
/// (to `redirectTo` when it is a valid local path, else `{sub}/`); anyone
/// else gets the login form (`pages::login_page`).
async fn login_view(shared: &Arc<Shared>, req: &Req) -> Response<Body> {
    let sub = &shared.settings.sub_path;
    if let Ok(Some(_)) = authenticate(shared, req).await {
        let target = format!(
            "{sub}{}",
            req.raw_query_param("redirectTo")
                .map(query_unescape)
                .unwrap_or_default()
        );
        return if valid_redirect(shared, &target) {
            redirect(&target)
        } else {
            redirect(&format!("{sub}/"))
        };
    }
    html(pages::login_page(sub))
}

/// A frontend route (`{sub}/`, `{sub}/d/…`), behind Grafana's signed-in
/// middleware (`pkg/middleware/auth.go`, anonymous access off): any
/// credential Grafana accepts serves the app page (`pages::app_page`);
/// without one the browser is redirected to `{sub}/login?redirectTo=…`
/// (`notAuthorized` with useSessionStorageForRedirection, on by default in
/// 11.x), deleting an invalid session cookie as the context handler does;
/// a session that needs rotation goes to `{sub}/user/auth-tokens/rotate?
/// redirectTo=…` instead, which rotates and comes back — page loads rotate
/// on the server, API calls through the frontend.
async fn page(shared: &Arc<Shared>, req: &Req) -> Response<Body> {
    let sub = shared.settings.sub_path.clone();
    match authenticate(shared, req).await {
        Ok(Some(caller)) => {
            let login = caller
                .user_id()
                .and_then(|id| shared.store().users.get(&id).map(|u| u.login.clone()))
                .unwrap_or_default();
            html(pages::app_page(&sub, caller.org_id, &login))
        }
        Ok(None) => redirect(&format!("{sub}/login{}", redirect_to_param(shared, req))),
        Err(e) if e.is_rotation() => redirect(&format!(
            "{sub}/user/auth-tokens/rotate{}",
            redirect_to_param(shared, req)
        )),
        Err(e) => {
            let mut response = redirect(&format!("{sub}/login{}", redirect_to_param(shared, req)));
            if e.clear_session {
                add_cookies(&mut response, &clear_cookies(shared));
            }
            response
        }
    }
}

/// `GET /user/auth-tokens/rotate` (`RotateUserAuthTokenRedirect`, where the
/// page middleware sends a browser whose token needs rotation): rotate, then
/// back to `AppSubURL + redirectTo` (or `AppSubURL + "/"` when that is not a
/// valid local path); a failed rotation goes to `{sub}/login`, deleting the
/// cookie when it was invalid.
fn rotate_redirect(shared: &Arc<Shared>, req: &Req) -> Response<Body> {
    let sub = shared.settings.sub_path.clone();
    match rotate_token(shared, req) {
        Ok(rotation) => {
            let target = format!(
                "{sub}{}",
                req.raw_query_param("redirectTo")
                    .map(query_unescape)
                    .unwrap_or_default()
            );
            let target = if valid_redirect(shared, &target) {
                target
            } else {
                format!("{sub}/")
            };
            let mut response = redirect(&target);
            if let Rotation::Rotated(cookies) = rotation {
                add_cookies(&mut response, &cookies);
            }
            response
        }
        Err(e) => {
            let mut response = redirect(&format!("{sub}/login"));
            if e.clear_session {
                add_cookies(&mut response, &clear_cookies(shared));
            }
            response
        }
    }
}

fn html(body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=UTF-8"));
    response
}

fn pmm_version() -> Value {
    json!({
        "version": "3.1.0",
        "server": {
            "version": "3.1.0",
            "full_version": "3.1.0-1.2504091141.2c9a4c5.el9",
            "timestamp": "2025-04-09T11:41:22Z",
        },
        "managed": {
            "version": "3.1.0",
            "full_version": "2c9a4c5a1b1e2d3f4a5b6c7d8e9f0a1b2c3d4e5f",
            "timestamp": "2025-04-09T11:33:10Z",
        },
        "distribution_method": "DOCKER",
    })
}

fn echo(req: &Req) -> Value {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &req.headers {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    json!({
        "method": req.method.as_str(),
        "path": req.path,
        "query": req.query,
        "version": format!("{:?}", req.version),
        "headers": headers,
        "body": String::from_utf8_lossy(&req.body),
    })
}

// ---- login, logout, rotation -----------------------------------------------------

/// Grafana's `LoginCommand`, read as Go's `encoding/json` reads it
/// (`web.Bind`): the first JSON value only, keys matched to `user` and
/// `password` in any case, and the last of several wins.
struct LoginForm {
    user: String,
    password: String,
}

impl LoginForm {
    fn read(body: &[u8]) -> Result<LoginForm, ApiError> {
        let bad = || ApiError::new(StatusCode::BAD_REQUEST, "bad request data");
        let first = serde_json::Deserializer::from_slice(body)
            .into_iter::<Members>()
            .next()
            .ok_or_else(bad)?
            .map_err(|_| bad())?;
        let mut form = LoginForm {
            user: String::new(),
            password: String::new(),
        };
        for (key, value) in first.0 {
            let slot = if key.eq_ignore_ascii_case("user") {
                &mut form.user
            } else if key.eq_ignore_ascii_case("password") {
                &mut form.password
            } else {
                continue;
            };
            *slot = value.as_str().ok_or_else(bad)?.to_owned();
        }
        Ok(form)
    }
}

/// A JSON object's members in document order, duplicates kept.
struct Members(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Members, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Value>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(Visit)
    }
}

async fn login(shared: &Arc<Shared>, req: &Req) -> Result<Response<Body>, ApiError> {
    let form = LoginForm::read(&req.body)?;
    let user_id = auth::check_password(shared, &form.user, &form.password).await?;
    let (token, session_id) = auth::create_session(shared, user_id, &req.client_ip(), &req.user_agent());
    let session = shared
        .store()
        .sessions
        .get(&session_id)
        .cloned()
        .ok_or_else(ApiError::password_failed)?;
    // `HandleLoginResponse`: `redirectUrl` is `AppSubURL + "/"` (the
    // frontend keeps `redirectTo` itself with useSessionStorageForRedirection).
    let mut response = json_response(
        StatusCode::OK,
        &json!({"message": "Logged in", "redirectUrl": format!("{}/", shared.settings.sub_path)}),
    );
    add_cookies(&mut response, &session_cookies(shared, &token, &session));
    Ok(response)
}

/// Grafana's `Logout` (`pkg/api/login.go`) and `authn.Service.Logout`: the
/// session token revoked is the one the request was *authenticated* with —
/// a cookie that needs rotation (or a request authenticated by a key or a
/// password) revokes nothing — then both cookies are deleted and the
/// browser sent to the login page.
async fn logout(shared: &Arc<Shared>, req: &Req) -> Result<Response<Body>, ApiError> {
    if let Ok(Some(caller)) = authenticate(shared, req).await {
        if let Some(id) = current_session(&caller) {
            shared.store().sessions.remove(&id);
        }
    }
    let mut response = redirect(&format!("{}/login", shared.settings.sub_path));
    add_cookies(&mut response, &clear_cookies(shared));
    Ok(response)
}

/// What `rotateToken` (`pkg/api/user_token.go`) comes to.
enum Rotation {
    /// A new token: the `Set-Cookie` lines to send.
    Rotated(Vec<String>),
    /// `RotateToken` returned the same token (rotated less than
    /// `skip_rotation_if_recent` ago): success, no cookie.
    Kept,
}

/// Grafana's `UserAuthTokenService.RotateToken`: look the presented token up
/// (current or previous, `LookupToken` rules), skip when the last rotation is
/// recent, else rotate. Errors as `RotateUserAuthToken` answers them: no
/// cookie or an expired token (`ErrInvalidSessionToken`) delete the cookie
/// and 401; an unknown token 401 without deleting it; both with Grafana's
/// fallback body `{"message":"Unauthorized"}`.
fn rotate_token(shared: &Shared, req: &Req) -> Result<Rotation, ApiError> {
    let invalid = ApiError::session_invalid;
    let token = auth::cookie(&req.headers, &shared.settings.session_cookie).ok_or_else(invalid)?;
    let session = auth::lookup_session(shared, &token).map_err(|e| match e {
        LookupError::NotFound => ApiError::unauthorized(),
        LookupError::Expired => invalid(),
    })?;
    let now = shared.now();
    if session.rotated_at + shared.settings.skip_rotation_secs > now {
        return Ok(Rotation::Kept);
    }
    let new_token = crate::credentials::random_hex(16);
    let new_hash = crate::credentials::hash_session_token(&new_token, &shared.settings.secret_key);
    let rotated = shared
        .store()
        .rotate_session(session.id, new_hash, &req.client_ip(), &req.user_agent(), now)
        .ok_or_else(ApiError::unauthorized)?;
    Ok(Rotation::Rotated(session_cookies(shared, &new_token, &rotated)))
}

/// `POST /api/user/auth-tokens/rotate` (`RotateUserAuthToken`): outside the
/// signed-in middleware, the cookie decides. 200 `{}`, with the new cookies
/// when the token was rotated.
fn rotate(shared: &Arc<Shared>, req: &Req) -> Result<Response<Body>, ApiError> {
    let mut response = json_response(StatusCode::OK, &json!({}));
    if let Rotation::Rotated(cookies) = rotate_token(shared, req)? {
        add_cookies(&mut response, &cookies);
    }
    Ok(response)
}

// ---- authenticated API ---------------------------------------------------------

/// The RBAC action an endpoint checks in the request's org (Grafana 11's
/// `authorize(ac.EvalPermission(…))` in `pkg/api/api.go` and the service
/// accounts API); `None` for the ones behind the signed-in check only (the
/// caller's own profile, orgs, sessions, password) and the server-admin ones
/// (global permissions, which do not depend on org membership).
fn org_permission(api: &Api) -> Option<&'static str> {
    Some(match api {
        Api::Org => "orgs:read",
        Api::ListKeys => "apikeys:read",
        Api::CreateKey => "apikeys:create",
        Api::DeleteKey(_) => "apikeys:delete",
        Api::CreateSa => "serviceaccounts:create",
        Api::SearchSa | Api::GetSa(_) | Api::ListSaTokens(_) => "serviceaccounts:read",
        Api::UpdateSa(_) | Api::CreateSaToken(_) | Api::DeleteSaToken(..) => "serviceaccounts:write",
        Api::DeleteSa(_) => "serviceaccounts:delete",
        Api::OrgUserUpdate(_) => "org.users:write",
        Api::OrgUserDelete(_) => "org.users:remove",
        Api::User
        | Api::UserOrgs
        | Api::UserUsingOrg(_)
        | Api::AuthServiceAccount
        | Api::UserAuthTokens
        | Api::RevokeUserAuthToken
        | Api::ChangePassword
        | Api::AdminCreateUser
        | Api::AdminPassword(_)
        | Api::AdminDisable(..)
        | Api::AdminDelete(_)
        | Api::AdminLogout(_)
        | Api::AdminRevokeAuthToken(_)
        | Api::AdminAuthTokens(_)
        | Api::AdminPermissions(_) => return None,
    })
}

async fn api_call(
    shared: &Arc<Shared>,
    req: &Req,
    caller: &Caller,
    api: Api,
) -> Result<Response<Body>, ApiError> {
    let flavor = shared.settings.flavor;
    if !caller.in_org() {
        if let Some(action) = org_permission(&api) {
            return Err(access_denied(action));
        }
    }
    match api {
        Api::User => get_user(shared, caller, flavor),
        Api::UserOrgs => {
            let user_id = require_user(caller)?;
            let store = shared.store();
            let user = store.users.get(&user_id).ok_or_else(ApiError::unauthorized)?;
            // `GetUserOrgList`: every membership, by org name.
            let mut orgs: Vec<(&str, i64, Role)> = user
                .orgs
                .iter()
                .filter_map(|(org, role)| Some((store.org_name(*org)?, *org, *role)))
                .collect();
            orgs.sort();
            let orgs: Vec<Value> = orgs
                .into_iter()
                .map(|(name, org, role)| json!({"orgId": org, "name": name, "role": role.as_str()}))
                .collect();
            ok(Value::Array(orgs))
        }
        Api::UserUsingOrg(org_id) => {
            // `UserSetUsingOrg`: only an org the user belongs to.
            let user_id = require_user(caller)?;
            let mut store = shared.store();
            let user = store.users.get_mut(&user_id).ok_or_else(ApiError::unauthorized)?;
            if !user.orgs.contains_key(&org_id) {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "Not a valid organization",
                ));
            }
            user.org_id = org_id;
            message("Active organization changed")
        }
        Api::Org => {
            let store = shared.store();
            let name = store.org_name(caller.org_id).ok_or_else(not_found)?;
            ok(json!({"id": caller.org_id, "name": name}))
        }
        Api::AuthServiceAccount => match caller.principal {
            Principal::ServiceAccount { id, .. } => {
                let store = shared.store();
                let sa = store
                    .service_accounts
                    .get(&id)
                    .ok_or_else(ApiError::unauthorized)?;
                ok(sa_json(sa, store.token_count(id)))
            }
            _ => ok(Value::Null),
        },
        Api::ListKeys => list_keys(shared, req, caller),
        Api::CreateKey => create_key(shared, req, caller).await,
        Api::DeleteKey(key_id) => {
            require_org_admin(caller)?;
            let mut store = shared.store();
            let deletable = store
                .keys
                .get(&key_id)
                .is_some_and(|k| k.legacy && k.service_account_id.is_none() && k.org_id == caller.org_id);
            if !deletable {
                return Err(ApiError::new(StatusCode::NOT_FOUND, "Failed to find API key"));
            }
            store.keys.remove(&key_id);
            message("API key deleted")
        }
        Api::CreateSa => create_sa(shared, req, caller),
        Api::SearchSa => search_sa(shared, req, caller),
        Api::GetSa(sa_id) => {
            require_org_admin(caller)?;
            let store = shared.store();
            let sa = store
                .service_accounts
                .get(&sa_id)
                .filter(|sa| sa.org_id == caller.org_id)
                .ok_or_else(sa_not_found)?;
            ok(sa_detail_json(sa, store.token_count(sa_id)))
        }
        Api::UpdateSa(sa_id) => update_sa(shared, req, caller, sa_id),
        Api::DeleteSa(sa_id) => {
            require_org_admin(caller)?;
            let mut store = shared.store();
            if !sa_in_org(&store, sa_id, caller.org_id) || !store.delete_service_account(sa_id) {
                return Err(sa_not_found());
            }
            message("Service account deleted")
        }
        Api::ListSaTokens(sa_id) => {
            require_org_admin(caller)?;
            let now = shared.now();
            let store = shared.store();
            if !sa_in_org(&store, sa_id, caller.org_id) {
                return Err(sa_not_found());
            }
            let tokens: Vec<Value> = store
                .keys
                .values()
                .filter(|k| k.service_account_id == Some(sa_id))
                .map(|k| token_json(k, now))
                .collect();
            ok(Value::Array(tokens))
        }
        Api::CreateSaToken(sa_id) => create_sa_token(shared, req, caller, sa_id).await,
        Api::DeleteSaToken(sa_id, token_id) => {
            require_org_admin(caller)?;
            let mut store = shared.store();
            if !sa_in_org(&store, sa_id, caller.org_id) {
                return Err(sa_not_found());
            }
            if store
                .keys
                .get(&token_id)
                .is_none_or(|k| k.service_account_id != Some(sa_id))
            {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "Failed to delete service account token",
                ));
            }
            store.keys.remove(&token_id);
            message("Service account token deleted")
        }
        Api::UserAuthTokens => {
            let user_id = require_user(caller)?;
            list_sessions(shared, user_id, current_session(caller))
        }
        Api::RevokeUserAuthToken => {
            let user_id = require_user(caller)?;
            revoke_session(shared, req, user_id, current_session(caller))
        }
        Api::ChangePassword => change_password(shared, req, caller).await,
        Api::AdminCreateUser => admin_create_user(shared, req, caller).await,
        Api::AdminPassword(user_id) => {
            require_grafana_admin(caller)?;
            #[derive(Deserialize)]
            struct Form {
                #[serde(default)]
                password: String,
            }
            let form: Form = req.json()?;
            if form.password.chars().count() < 4 {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, "New password too short"));
            }
            if !shared.store().users.contains_key(&user_id) {
                return Err(user_not_found());
            }
            let (salt, hash) = auth::hash_new_password(&form.password).await;
            let now = shared.now();
            let mut store = shared.store();
            let user = store.users.get_mut(&user_id).ok_or_else(user_not_found)?;
            user.salt = salt;
            user.password_hash = hash;
            user.updated = now;
            message("User password updated")
        }
        Api::AdminDisable(user_id, disable) => {
            require_grafana_admin(caller)?;
            let now = shared.now();
            let mut store = shared.store();
            let user = store.users.get_mut(&user_id).ok_or_else(user_not_found)?;
            user.disabled = disable;
            user.updated = now;
            if disable {
                // Grafana revokes every session of a disabled user.
                store.revoke_user_sessions(user_id);
                message("User disabled")
            } else {
                message("User enabled")
            }
        }
        Api::AdminDelete(user_id) => {
            require_grafana_admin(caller)?;
            if !shared.store().delete_user(user_id) {
                return Err(user_not_found());
            }
            message("User deleted")
        }
        Api::AdminLogout(user_id) => {
            require_grafana_admin(caller)?;
            if caller.user_id() == Some(user_id) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "You cannot logout yourself",
                ));
            }
            let mut store = shared.store();
            if !store.users.contains_key(&user_id) {
                return Err(user_not_found());
            }
            store.revoke_user_sessions(user_id);
            message("User logged out")
        }
        Api::AdminRevokeAuthToken(user_id) => {
            require_grafana_admin(caller)?;
            if !shared.store().users.contains_key(&user_id) {
                return Err(user_not_found());
            }
            revoke_session(shared, req, user_id, current_session(caller))
        }
        Api::AdminAuthTokens(user_id) => {
            require_grafana_admin(caller)?;
            if !shared.store().users.contains_key(&user_id) {
                return Err(user_not_found());
            }
            list_sessions(shared, user_id, current_session(caller))
        }
        Api::AdminPermissions(user_id) => {
            require_grafana_admin(caller)?;
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Form {
                #[serde(default)]
                is_grafana_admin: bool,
            }
            let form: Form = req.json()?;
            let now = shared.now();
            let mut store = shared.store();
            let user = store.users.get_mut(&user_id).ok_or_else(user_not_found)?;
            user.grafana_admin = form.is_grafana_admin;
            user.updated = now;
            message("User permissions updated")
        }
        Api::OrgUserUpdate(user_id) => {
            require_org_admin(caller)?;
            #[derive(Deserialize)]
            struct Form {
                #[serde(default)]
                role: String,
            }
            let form: Form = req.json()?;
            let role = Role::parse(&form.role).ok_or_else(invalid_role)?;
            let now = shared.now();
            let mut store = shared.store();
            let org_id = caller.org_id;
            let current = store
                .users
                .get(&user_id)
                .and_then(|u| u.orgs.get(&org_id).copied())
                .ok_or_else(user_not_found)?;
            if current == Role::Admin && role != Role::Admin && store.org_admin_count(org_id) <= 1 {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "Cannot change role so that there is no organization admin left",
                ));
            }
            if let Some(user) = store.users.get_mut(&user_id) {
                user.orgs.insert(org_id, role);
                user.updated = now;
            }
            message("Organization user updated")
        }
        Api::OrgUserDelete(user_id) => {
            require_org_admin(caller)?;
            let mut store = shared.store();
            let org_id = caller.org_id;
            let current = store
                .users
                .get(&user_id)
                .and_then(|u| u.orgs.get(&org_id).copied())
                .ok_or_else(user_not_found)?;
            if current == Role::Admin && store.org_admin_count(org_id) <= 1 {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "Cannot remove last organization admin",
                ));
            }
            // A user left in no org is deleted (`ShouldDeleteOrphanedUser`).
            if store.remove_org_member(org_id, user_id) {
                message("User deleted")
            } else {
                message("User removed from organization")
            }
        }
    }
}

fn current_session(caller: &Caller) -> Option<i64> {
    match caller.principal {
        Principal::User { session, .. } => session,
        _ => None,
    }
}

fn get_user(shared: &Shared, caller: &Caller, flavor: Flavor) -> Result<Response<Body>, ApiError> {
    let store = shared.store();
    match caller.principal {
        Principal::User { id, .. } => {
            let user = store.users.get(&id).ok_or_else(ApiError::unauthorized)?;
            ok(user_json(user))
        }
        // 11.x reads the service account's own user row; 10.4 refuses.
        Principal::ServiceAccount { id, .. } if flavor != Flavor::Grafana10_4 => {
            let sa = store
                .service_accounts
                .get(&id)
                .ok_or_else(ApiError::unauthorized)?;
            ok(sa_as_user_json(sa))
        }
        Principal::ServiceAccount { .. } | Principal::ApiKey { .. } => Err(users_only()),
    }
}

fn list_keys(shared: &Shared, req: &Req, caller: &Caller) -> Result<Response<Body>, ApiError> {
    require_org_admin(caller)?;
    let include_expired = req.query_param("includeExpired").is_some_and(|v| v == "true");
    let now = shared.now();
    let store = shared.store();
    let keys: Vec<Value> = store
        .keys
        .values()
        .filter(|k| k.legacy && k.service_account_id.is_none() && k.org_id == caller.org_id)
        .filter(|k| include_expired || !k.has_expired(now))
        .map(key_json)
        .collect();
    ok(Value::Array(keys))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewKeyForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    seconds_to_live: i64,
}

async fn create_key(shared: &Arc<Shared>, req: &Req, caller: &Caller) -> Result<Response<Body>, ApiError> {
    require_org_admin(caller)?;
    let form: NewKeyForm = req.json()?;
    let role = Role::parse(&form.role).ok_or_else(invalid_role)?;
    if form.name.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad request data"));
    }
    if form.seconds_to_live < 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Invalid API Key expiration",
        ));
    }
    let duplicate = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "API Key Organization ID And Name Must Be Unique",
        )
    };
    let org_id = caller.org_id;
    if shared.store().legacy_key_name_taken(org_id, &form.name) {
        return Err(duplicate());
    }
    let name = form.name.clone();
    // Generating the key hashes it: PBKDF2, off the async workers.
    let key = tokio::task::spawn_blocking(move || {
        let key = LegacyKey::generate(org_id, &name);
        let hash = key.hash();
        (key, hash)
    })
    .await;
    let Ok((key, _)) = key else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Failed to add API Key",
        ));
    };
    let now = shared.now();
    let expires = (form.seconds_to_live > 0).then(|| now + form.seconds_to_live);
    let mut store = shared.store();
    if store.legacy_key_name_taken(org_id, &form.name) {
        return Err(duplicate());
    }
    let id = store.add_legacy_key(&key, role, expires, shared.settings.migrate_api_keys, now);
    ok(json!({"id": id, "name": form.name, "key": key.encode()}))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SaForm {
    name: Option<String>,
    role: Option<String>,
    is_disabled: Option<bool>,
}

fn create_sa(shared: &Shared, req: &Req, caller: &Caller) -> Result<Response<Body>, ApiError> {
    require_org_admin(caller)?;
    let form: SaForm = req.json()?;
    let name = form.name.unwrap_or_default();
    if name.trim().is_empty() {
        return Err(ApiError::authn(
            StatusCode::BAD_REQUEST,
            "serviceaccounts.ErrNameEmpty",
            "service account name is required",
        ));
    }
    let role = match form.role.as_deref() {
        None | Some("") => Role::Viewer,
        Some(r) => Role::parse(r).ok_or_else(|| {
            ApiError::authn(
                StatusCode::BAD_REQUEST,
                "serviceaccounts.ErrInvalidRole",
                &format!("invalid role value: {r}"),
            )
        })?,
    };
    let now = shared.now();
    let mut store = shared.store();
    let sa = store
        .insert_service_account(
            caller.org_id,
            &name,
            &store::service_account_login(&name),
            role,
            form.is_disabled.unwrap_or(false),
            now,
        )
        .map_err(|Conflict::Exists| {
            ApiError::authn(
                StatusCode::BAD_REQUEST,
                "serviceaccounts.ErrAlreadyExists",
                "service account already exists",
            )
        })?;
    Ok(json_response(StatusCode::CREATED, &sa_detail_json(&sa, 0)))
}

fn search_sa(shared: &Shared, req: &Req, caller: &Caller) -> Result<Response<Body>, ApiError> {
    require_org_admin(caller)?;
    let query = req.query_param("query").unwrap_or_default().to_lowercase();
    let per_page = req
        .query_param("perpage")
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|v| *v > 0)
        .unwrap_or(1000);
    let page = req
        .query_param("page")
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|v| *v > 0)
        .unwrap_or(1);
    let store = shared.store();
    let mut matching: Vec<&ServiceAccount> = store
        .service_accounts
        .values()
        .filter(|s| s.org_id == caller.org_id)
        .filter(|s| query.is_empty() || s.name.to_lowercase().contains(&query) || s.login.contains(&query))
        .collect();
    matching.sort_by(|a, b| a.name.cmp(&b.name));
    let total = matching.len();
    let accounts: Vec<Value> = matching
        .into_iter()
        .skip((page - 1).saturating_mul(per_page))
        .take(per_page)
        .map(|s| sa_json(s, store.token_count(s.id)))
        .collect();
    ok(json!({
        "totalCount": total,
        "serviceAccounts": accounts,
        "page": page,
        "perPage": per_page,
    }))
}

fn update_sa(shared: &Shared, req: &Req, caller: &Caller, sa_id: i64) -> Result<Response<Body>, ApiError> {
    require_org_admin(caller)?;
    let form: SaForm = req.json()?;
    let role = match form.role.as_deref() {
        None => None,
        Some(r) => Some(Role::parse(r).ok_or_else(invalid_role)?),
    };
    let now = shared.now();
    let mut store = shared.store();
    if let Some(name) = form.name.as_deref().filter(|n| !n.trim().is_empty()) {
        let login = store::service_account_login(name);
        let clash = store
            .service_accounts
            .values()
            .any(|s| s.id != sa_id && (s.name == name || s.login == login));
        if clash {
            return Err(ApiError::authn(
                StatusCode::BAD_REQUEST,
                "serviceaccounts.ErrAlreadyExists",
                "service account already exists",
            ));
        }
    }
    let tokens = store.token_count(sa_id);
    let sa = store
        .service_accounts
        .get_mut(&sa_id)
        .filter(|sa| sa.org_id == caller.org_id)
        .ok_or_else(sa_not_found)?;
    if let Some(name) = form.name.filter(|n| !n.trim().is_empty()) {
        sa.login = store::service_account_login(&name);
        sa.name = name;
    }
    if let Some(role) = role {
        sa.role = role;
    }
    if let Some(disabled) = form.is_disabled {
        sa.disabled = disabled;
    }
    sa.updated = now;
    ok(json!({
        "message": "Service account updated",
        "id": sa.id,
        "name": sa.name,
        "serviceaccount": sa_detail_json(sa, tokens),
    }))
}

async fn create_sa_token(
    shared: &Arc<Shared>,
    req: &Req,
    caller: &Caller,
    sa_id: i64,
) -> Result<Response<Body>, ApiError> {
    require_org_admin(caller)?;
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Form {
        #[serde(default)]
        name: String,
        #[serde(default)]
        seconds_to_live: i64,
    }
    let form: Form = req.json()?;
    if form.seconds_to_live < 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Invalid SecondsToLive value",
        ));
    }
    let duplicate = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "service account token with given name already exists in the organization",
        )
    };
    let taken = |store: &store::Store, name: &str| {
        store
            .keys
            .values()
            .any(|k| k.service_account_id == Some(sa_id) && k.name == name)
    };
    let name = {
        let store = shared.store();
        if !sa_in_org(&store, sa_id, caller.org_id) {
            return Err(sa_not_found());
        }
        let name = if form.name.is_empty() {
            format!("sa-token-{}", store.token_count(sa_id) + 1)
        } else {
            form.name.clone()
        };
        if taken(&store, &name) {
            return Err(duplicate());
        }
        name
    };
    let token = tokio::task::spawn_blocking(|| {
        let token = SaToken::generate();
        let hash = token.hash();
        (token, hash)
    })
    .await;
    let Ok((token, _)) = token else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Failed to add service account token",
        ));
    };
    let now = shared.now();
    let expires = (form.seconds_to_live > 0).then(|| now + form.seconds_to_live);
    let mut store = shared.store();
    if !sa_in_org(&store, sa_id, caller.org_id) {
        return Err(sa_not_found());
    }
    if taken(&store, &name) {
        return Err(duplicate());
    }
    let id = store.add_sa_token(sa_id, &name, &token, expires, now);
    ok(json!({"id": id, "name": name, "key": token.encode()}))
}

fn list_sessions(shared: &Shared, user_id: i64, active: Option<i64>) -> Result<Response<Body>, ApiError> {
    let now = shared.now();
    let store = shared.store();
    let sessions: Vec<Value> = store
        .sessions
        .values()
        .filter(|s| s.user_id == user_id && !s.expired(now))
        .map(|s| session_json(s, active))
        .collect();
    ok(Value::Array(sessions))
}

fn revoke_session(
    shared: &Shared,
    req: &Req,
    user_id: i64,
    active: Option<i64>,
) -> Result<Response<Body>, ApiError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Form {
        #[serde(default)]
        auth_token_id: i64,
    }
    let form: Form = req.json()?;
    let mut store = shared.store();
    if store
        .sessions
        .get(&form.auth_token_id)
        .is_none_or(|s| s.user_id != user_id)
    {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "User auth token not found"));
    }
    if active == Some(form.auth_token_id) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Cannot revoke active user auth token",
        ));
    }
    store.sessions.remove(&form.auth_token_id);
    message("User auth token revoked")
}

async fn change_password(
    shared: &Arc<Shared>,
    req: &Req,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    let user_id = require_user(caller)?;
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Form {
        #[serde(default)]
        old_password: String,
        #[serde(default)]
        new_password: String,
    }
    let form: Form = req.json()?;
    if !auth::verify_user_password(shared, user_id, &form.old_password).await {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "Invalid old password"));
    }
    if form.new_password.chars().count() < 4 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "New password is too short",
        ));
    }
    let (salt, hash) = auth::hash_new_password(&form.new_password).await;
    let now = shared.now();
    let mut store = shared.store();
    let user = store.users.get_mut(&user_id).ok_or_else(user_not_found)?;
    user.salt = salt;
    user.password_hash = hash;
    user.updated = now;
    message("User password changed")
}

async fn admin_create_user(
    shared: &Arc<Shared>,
    req: &Req,
    caller: &Caller,
) -> Result<Response<Body>, ApiError> {
    require_grafana_admin(caller)?;
    #[derive(Deserialize)]
    struct Form {
        #[serde(default)]
        name: String,
        #[serde(default)]
        email: String,
        #[serde(default)]
        login: String,
        #[serde(default)]
        password: String,
    }
    let form: Form = req.json()?;
    let login = if form.login.is_empty() {
        form.email.clone()
    } else {
        form.login.clone()
    };
    if login.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Validation error, need to specify either username or email",
        ));
    }
    if form.password.chars().count() < 4 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Password is missing or too short",
        ));
    }
    let (salt, hash) = auth::hash_new_password(&form.password).await;
    let now = shared.now();
    let mut store = shared.store();
    let id = store
        .insert_user(
            &login,
            &form.email,
            &form.name,
            salt,
            hash,
            Role::Viewer,
            false,
            now,
        )
        .map_err(|Conflict::Exists| {
            ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "User with same login or email already exists",
            )
        })?;
    let uid = store.users.get(&id).map(|u| u.uid.clone()).unwrap_or_default();
    ok(json!({"id": id, "uid": uid, "message": "User created"}))
}

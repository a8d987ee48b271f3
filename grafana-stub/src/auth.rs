//! Who is calling: Grafana's authn clients in their order — API key / token
//! (Bearer, or Basic with user `api_key`), Basic password, auth proxy,
//! session cookie — with Grafana's answers when they fail. PBKDF2 runs on the
//! blocking pool and never under the store lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, StatusCode};
use serde_json::{json, Value};

use crate::credentials::{self, LegacyKey, SaToken, GRAFANA_PREFIX};
use crate::store::{LookupError, Role, Session};
use crate::{AuthClient, Shared};

/// The identity behind a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// A user; `session` is the session token id when a cookie was used.
    User { id: i64, session: Option<i64> },
    /// A service account, through one of its tokens (or a migrated key).
    ServiceAccount { id: i64, key_id: i64 },
    /// A legacy API key that belongs to no service account.
    ApiKey { key_id: i64 },
}

#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub principal: Principal,
    /// The org the request runs in: the one it asked for (`X-Grafana-Org-Id`
    /// or `?targetOrgId`), else the user's current org, else the key's org.
    /// `-1` when a user asked for an org it does not belong to — Grafana's
    /// `GetSignedInUser` then answers `OrgID -1`, `OrgName "Org missing"`,
    /// no role, so every org-scoped permission check fails.
    pub org_id: i64,
    pub org_role: Role,
    pub grafana_admin: bool,
    /// The client that signed the request in.
    pub via: AuthClient,
}

impl Caller {
    /// Whether the request runs in an org the caller belongs to.
    pub fn in_org(&self) -> bool {
        self.org_id > 0
    }

    pub fn user_id(&self) -> Option<i64> {
        match self.principal {
            Principal::User { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// An error answer: status and JSON body, optionally clearing the session
/// cookie (Grafana does so when a session token is invalid).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: Value,
    pub clear_session: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, message: &str) -> ApiError {
        ApiError {
            status,
            body: json!({ "message": message }),
            clear_session: false,
        }
    }

    /// Grafana's `errutil` public error, as `writeErrOrFallback` renders it.
    pub fn authn(status: StatusCode, message_id: &str, message: &str) -> ApiError {
        ApiError {
            status,
            body: json!({
                "message": message,
                "messageId": message_id,
                "statusCode": status.as_u16(),
                "traceID": "",
            }),
            clear_session: false,
        }
    }

    /// No usable credential: the middleware's fallback.
    pub fn unauthorized() -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized")
    }

    pub fn forbidden() -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "Permission denied")
    }

    fn invalid_api_key() -> ApiError {
        ApiError::authn(StatusCode::UNAUTHORIZED, "api-key.invalid", "Invalid API key")
    }

    fn expired_api_key() -> ApiError {
        ApiError::authn(StatusCode::UNAUTHORIZED, "api-key.expired", "Expired API key")
    }

    fn revoked_api_key() -> ApiError {
        ApiError::authn(StatusCode::UNAUTHORIZED, "api-key.revoked", "Revoked API key")
    }

    fn disabled_service_account() -> ApiError {
        ApiError::authn(
            StatusCode::UNAUTHORIZED,
            "service-account.disabled",
            "Disabled service account",
        )
    }

    /// Also what a disabled user gets: Grafana does not reveal the status.
    pub fn password_failed() -> ApiError {
        ApiError::authn(
            StatusCode::UNAUTHORIZED,
            "password-auth.failed",
            "Invalid username or password",
        )
    }

    fn login_blocked() -> ApiError {
        ApiError::authn(
            StatusCode::UNAUTHORIZED,
            "login-attempt.blocked",
            "Invalid username or password",
        )
    }

    pub fn session_invalid() -> ApiError {
        ApiError {
            clear_session: true,
            ..ApiError::unauthorized()
        }
    }

    /// Grafana's `authn.ErrTokenNeedsRotation`.
    pub fn is_rotation(&self) -> bool {
        self.body["messageId"] == "session.token.rotate"
    }

    fn session_needs_rotation() -> ApiError {
        ApiError::authn(StatusCode::UNAUTHORIZED, "session.token.rotate", "Unauthorized")
    }
}

/// Runs PBKDF2 (or any CPU-heavy closure) off the async workers. A closure
/// that panicked panics here; one cancelled because the runtime is shutting
/// down (a test ending while a request is in flight) never completes —
/// the task awaiting it is being dropped anyway.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => std::future::pending().await,
    }
}

/// Grafana's `orgIDFromRequest` (`pkg/services/authn/authnimpl/service.go`):
/// a positive `targetOrgId` query parameter, else the `X-Grafana-Org-Id`
/// header; what does not parse as an integer counts as absent (0).
pub fn requested_org(headers: &HeaderMap, query: Option<&str>) -> i64 {
    let from_query = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == "targetOrgId")
        .and_then(|(_, v)| v.parse::<i64>().ok())
        .filter(|id| *id > 0);
    from_query.unwrap_or_else(|| {
        headers
            .get("x-grafana-org-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(0)
    })
}

/// Authenticates a request that asks for org `org` (0: none, see
/// `requested_org`). `Ok(None)`: no credential at all; `Err`: the first
/// failing client's answer, as Grafana reports the first error.
pub async fn authenticate(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    peer: SocketAddr,
    org: i64,
) -> Result<Option<Caller>, ApiError> {
    let mut first_error: Option<ApiError> = None;

    if let Some(header) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        if let Some(token) = header.strip_prefix("Bearer ") {
            match api_key(shared, token, org).await {
                Ok(caller) => return Ok(Some(caller)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        } else if let Some((user, password)) = credentials::decode_basic(header) {
            if user == "api_key" {
                match api_key(shared, &password, org).await {
                    Ok(caller) => return Ok(Some(caller)),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            // Grafana tries the Basic client too (and so counts the failure
            // against the username — even `api_key` or `service_token`).
            match check_password(shared, &user, &password).await {
                Ok(user_id) => return Ok(Some(user_caller(shared, user_id, None, org, AuthClient::Basic)?)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    }

    if shared.settings.auth_proxy && auth_proxy_applies(shared, headers) {
        match auth_proxy(shared, headers, peer, org) {
            Ok(caller) => return Ok(Some(caller)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }

    if let Some(token) = cookie(headers, &shared.settings.session_cookie) {
        match session(shared, &token, org) {
            Ok(caller) => return Ok(Some(caller)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }

    match first_error {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// The value of the first cookie called `name` (Go's `Request.Cookie`).
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}

/// A user's identity in the requested org (0: its current org), as
/// Grafana's `GetSignedInUser` resolves it: a member gets its role there; a
/// non-member is still signed in, with org `-1` and no role.
fn user_caller(
    shared: &Shared,
    user_id: i64,
    session: Option<i64>,
    org: i64,
    via: AuthClient,
) -> Result<Caller, ApiError> {
    let store = shared.store();
    let user = store.users.get(&user_id).ok_or_else(ApiError::unauthorized)?;
    let org_id = if org > 0 { org } else { user.org_id };
    let (org_id, org_role) = match user.orgs.get(&org_id) {
        Some(role) => (org_id, *role),
        None => (-1, Role::None),
    };
    Ok(Caller {
        principal: Principal::User { id: user_id, session },
        org_id,
        org_role,
        grafana_admin: user.grafana_admin,
        via,
    })
}

// ---- API keys and service-account tokens -----------------------------------

/// Grafana's API key client (`pkg/services/authn/clients/api_key.go`), for
/// legacy keys and `glsa_` tokens alike. A key belongs to one org: with no
/// org asked for, the key's; another one is refused after the expiry and
/// revocation checks (`validateApiKey`) with `api-key.organization-mismatch`.
async fn api_key(shared: &Arc<Shared>, token: &str, org: i64) -> Result<Caller, ApiError> {
    let key_id = if token.starts_with(GRAFANA_PREFIX) {
        // A bad shape or checksum is refused before any lookup.
        let decoded = SaToken::decode(token).ok_or_else(ApiError::invalid_api_key)?;
        shared.key_hashes.fetch_add(1, Ordering::SeqCst);
        let hash = blocking(move || decoded.hash()).await;
        let store = shared.store();
        store
            .token_by_hash(&hash)
            .map(|k| k.id)
            .ok_or_else(ApiError::invalid_api_key)?
    } else {
        let decoded = LegacyKey::decode(token).ok_or_else(ApiError::invalid_api_key)?;
        let (key_id, stored) = {
            let store = shared.store();
            let key = store
                .legacy_key(decoded.org_id, &decoded.name)
                .ok_or_else(ApiError::invalid_api_key)?;
            (key.id, key.hash.clone())
        };
        shared.key_hashes.fetch_add(1, Ordering::SeqCst);
        let hash = blocking(move || decoded.hash()).await;
        if !credentials::constant_time_eq(&hash, &stored) {
            return Err(ApiError::invalid_api_key());
        }
        key_id
    };

    let now = shared.now();
    let mut store = shared.store();
    // Looked up again: it may have been deleted while PBKDF2 ran.
    let key = store
        .keys
        .get_mut(&key_id)
        .ok_or_else(ApiError::invalid_api_key)?;
    if key.has_expired(now) {
        return Err(ApiError::expired_api_key());
    }
    if key.is_revoked {
        return Err(ApiError::revoked_api_key());
    }
    let org = if org == 0 { key.org_id } else { org };
    if key.org_id != org {
        return Err(ApiError::authn(
            StatusCode::UNAUTHORIZED,
            "api-key.organization-mismatch",
            "API key does not belong to the requested organization",
        ));
    }
    key.last_used = Some(now);
    let (role, sa_id) = (key.role, key.service_account_id);
    match sa_id {
        None => Ok(Caller {
            principal: Principal::ApiKey { key_id },
            org_id: org,
            org_role: role,
            grafana_admin: false,
            via: AuthClient::ApiKey,
        }),
        Some(sa_id) => {
            let sa = store
                .service_accounts
                .get(&sa_id)
                .ok_or_else(ApiError::invalid_api_key)?;
            if sa.disabled {
                return Err(ApiError::disabled_service_account());
            }
            Ok(Caller {
                principal: Principal::ServiceAccount { id: sa_id, key_id },
                org_id: org,
                org_role: sa.role,
                grafana_admin: false,
                via: AuthClient::ApiKey,
            })
        }
    }
}

// ---- passwords -------------------------------------------------------------

/// What a password check needs from the store, copied out of the lock.
enum Candidate {
    Locked,
    Unknown,
    Found { id: i64, salt: String, stored: String },
}

fn candidate(shared: &Shared, login: &str) -> Candidate {
    let now = shared.now();
    let mut store = shared.store();
    if store.is_locked(login, now) {
        return Candidate::Locked;
    }
    match store.user_by_login_or_email(login) {
        Some(u) => Candidate::Found {
            id: u.id,
            salt: u.salt.clone(),
            stored: u.password_hash.clone(),
        },
        None => {
            // docs/grafana.md, "Lock-out": every failed login counts, known user or not.
            store.record_failed_login(login, now);
            Candidate::Unknown
        }
    }
}

/// After the hash comparison: count a failure, or clear the count.
fn conclude(shared: &Shared, login: &str, id: i64, matched: bool) -> Result<i64, ApiError> {
    let now = shared.now();
    let mut store = shared.store();
    if !matched {
        store.record_failed_login(login, now);
        return Err(ApiError::password_failed());
    }
    let user = store.users.get(&id).ok_or_else(ApiError::password_failed)?;
    if user.disabled {
        return Err(ApiError::password_failed());
    }
    store.reset_failed_logins(login);
    Ok(id)
}

/// Grafana's password client: lock-out first, then PBKDF2. Returns the user id.
pub async fn check_password(shared: &Arc<Shared>, login: &str, password: &str) -> Result<i64, ApiError> {
    if password.is_empty() {
        return Err(ApiError::password_failed());
    }
    match candidate(shared, login) {
        Candidate::Locked => Err(ApiError::login_blocked()),
        Candidate::Unknown => Err(ApiError::password_failed()),
        Candidate::Found { id, salt, stored } => {
            let password = password.to_owned();
            shared.password_hashes.fetch_add(1, Ordering::SeqCst);
            let hash = blocking(move || credentials::encode_password(&password, &salt)).await;
            conclude(shared, login, id, credentials::constant_time_eq(&hash, &stored))
        }
    }
}

/// The same check for the synchronous test hooks.
pub fn check_password_blocking(shared: &Shared, login: &str, password: &str) -> Result<i64, ApiError> {
    if password.is_empty() {
        return Err(ApiError::password_failed());
    }
    match candidate(shared, login) {
        Candidate::Locked => Err(ApiError::login_blocked()),
        Candidate::Unknown => Err(ApiError::password_failed()),
        Candidate::Found { id, salt, stored } => {
            let hash = credentials::encode_password(password, &salt);
            conclude(shared, login, id, credentials::constant_time_eq(&hash, &stored))
        }
    }
}

/// Verifies a user's current password (for `PUT /api/user/password`),
/// without lock-out bookkeeping.
pub async fn verify_user_password(shared: &Arc<Shared>, user_id: i64, password: &str) -> bool {
    let Some((salt, stored)) = shared
        .store()
        .users
        .get(&user_id)
        .map(|u| (u.salt.clone(), u.password_hash.clone()))
    else {
        return false;
    };
    let password = password.to_owned();
    shared.password_hashes.fetch_add(1, Ordering::SeqCst);
    let hash = blocking(move || credentials::encode_password(&password, &salt)).await;
    credentials::constant_time_eq(&hash, &stored)
}

/// A new salt and hash for a password, computed off the async workers.
pub async fn hash_new_password(password: &str) -> (String, String) {
    let password = password.to_owned();
    blocking(move || {
        let salt = credentials::random_alphanumeric(10);
        let hash = credentials::encode_password(&password, &salt);
        (salt, hash)
    })
    .await
}

// ---- sessions --------------------------------------------------------------

/// Creates a session; returns the cookie value and the session id.
pub fn create_session(shared: &Shared, user_id: i64, ip: &str, user_agent: &str) -> (String, i64) {
    let token = credentials::random_hex(16);
    let hash = credentials::hash_session_token(&token, &shared.settings.secret_key);
    let now = shared.now();
    let id = shared.store().create_session(user_id, hash, ip, user_agent, now);
    (token, id)
}

/// Grafana's `LookupToken` for a cookie value (current or previous token,
/// see `Store::lookup_token`), plus the user check the session client's
/// user fetch makes: a disabled or deleted user has no session.
pub fn lookup_session(shared: &Shared, token: &str) -> Result<Session, LookupError> {
    let hash = credentials::hash_session_token(token, &shared.settings.secret_key);
    let now = shared.now();
    let mut store = shared.store();
    let session = store.lookup_token(&hash, now)?;
    match store.users.get(&session.user_id) {
        Some(user) if !user.disabled => Ok(session),
        _ => Err(LookupError::NotFound),
    }
}

/// Grafana's session client (`pkg/services/authn/clients/session.go`):
/// look the token up, then refuse it with `session.token.rotate` when it
/// needs rotation — the token is not dead, the frontend rotates it.
fn session(shared: &Shared, token: &str, org: i64) -> Result<Caller, ApiError> {
    let session = lookup_session(shared, token).map_err(|_| ApiError::session_invalid())?;
    if session.needs_rotation(shared.now(), shared.settings.rotation_interval_secs) {
        return Err(ApiError::session_needs_rotation());
    }
    user_caller(
        shared,
        session.user_id,
        Some(session.id),
        org,
        AuthClient::Session,
    )
}

// ---- auth proxy --------------------------------------------------------------

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

const USER_HEADER: &str = "x-webauth-user";
const NAME_HEADER: &str = "x-webauth-name";
const EMAIL_HEADER: &str = "x-webauth-email";
const ROLE_HEADER: &str = "x-webauth-role";
/// Grafana's `shared_secret_header` default.
const SECRET_HEADER: &str = "x-webauth-secret";

/// The proxy client's `Test` (`pkg/services/authn/clients/proxy.go`): the
/// user header is there and, when a shared secret is configured, the
/// secret header carries it. A request that fails it is not an auth-proxy
/// request: the next client (the session cookie) is tried, with no error.
fn auth_proxy_applies(shared: &Shared, headers: &HeaderMap) -> bool {
    if header(headers, USER_HEADER).is_none() {
        return false;
    }
    match &shared.settings.auth_proxy_shared_secret {
        None => true,
        Some(secret) => headers
            .get(SECRET_HEADER)
            .is_some_and(|v| credentials::constant_time_eq(&String::from_utf8_lossy(v.as_bytes()), secret)),
    }
}

/// The `sync_ttl` cache of the auth proxy (Grafana's remote cache under
/// `auth-proxy-sync-ttl:…`): the header values' key → (user id, expiry in
/// Unix seconds), and per username the key cached last, so that a change
/// of any header value drops the previous entry (`Proxy.Hook`).
#[derive(Debug, Default)]
pub struct ProxyCache {
    by_key: HashMap<String, (i64, i64)>,
    by_username: HashMap<String, String>,
}

impl ProxyCache {
    fn get(&self, key: &str, now: i64) -> Option<i64> {
        self.by_key
            .get(key)
            .filter(|(_, expires)| *expires > now)
            .map(|(id, _)| *id)
    }

    fn set(&mut self, username: &str, key: String, user_id: i64, expires: i64) {
        if let Some(previous) = self.by_username.insert(username.to_owned(), key.clone()) {
            self.by_key.remove(&previous);
        }
        self.by_key.insert(key, (user_id, expires));
    }
}

fn user_sync_internal() -> ApiError {
    ApiError::authn(
        StatusCode::INTERNAL_SERVER_ERROR,
        "user.sync.internal",
        "User sync failed",
    )
}

/// Grafana's auth proxy client, its post-auth hooks and its cache hook, as
/// one request meets them (`clients/proxy.go`, `clients/grafana.go`
/// `AuthenticateProxy`, `sync/user_sync.go`, `sync/org_sync.go`):
///
/// 1. Only from the whitelist (loopback here): else `auth-proxy.invalid-ip`.
/// 2. A cache hit (same header values within `sync_ttl`) loads the user
///    by id and syncs nothing.
/// 3. Otherwise the identity is looked up — by email (the email header, or
///    the username when it is an address), then by login or email — among
///    users only: service accounts never match. Found, its login, email
///    and name are updated from the headers; not found, it is signed up
///    (`auto_sign_up`) as an ordinary user, and a login or email already
///    taken — by a service account, say — fails with `500
///    user.sync.internal`.
/// 4. With the role header mapped and valid, org sync: that role in
///    `auto_assign_org_id`, every other membership removed.
/// 5. A disabled user fails with `identity.disabled`; a signed-in one is
///    cached for `sync_ttl`.
fn auth_proxy(shared: &Shared, headers: &HeaderMap, peer: SocketAddr, org: i64) -> Result<Caller, ApiError> {
    if !peer.ip().is_loopback() {
        return Err(ApiError::authn(
            StatusCode::UNAUTHORIZED,
            "auth-proxy.invalid-ip",
            "Unauthorized",
        ));
    }
    let settings = &shared.settings;
    let username = header(headers, USER_HEADER).unwrap_or_default();
    let name = header(headers, NAME_HEADER);
    let email_header = header(headers, EMAIL_HEADER);
    let role_header = header(headers, ROLE_HEADER).filter(|_| settings.auth_proxy_role_sync);
    // `getProxyCacheKey`: the username and the mapped headers' values, in
    // Grafana's field order (Name, Email, Login, Role, Groups).
    let cache_key: String = [Some(username), name, email_header, role_header]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("\u{0}");
    let now = shared.now();

    let cached = shared.proxy_cache().get(&cache_key, now);
    if let Some(id) = cached {
        if shared.store().users.contains_key(&id) {
            return signed_in_proxy_user(shared, id, org);
        }
        // The user is gone: the normal flow, as Grafana does.
    }

    // `AuthenticateProxy` with `header_property = username`.
    let login = username.to_owned();
    let email = email_header
        .map(str::to_owned)
        .or_else(|| username.contains('@').then(|| username.to_owned()))
        .unwrap_or_default();
    let name = name.unwrap_or_default().to_owned();
    let role = role_header.and_then(Role::parse);
    let assign_org = settings.auto_assign_org_id;

    let id = {
        let mut store = shared.store();
        // `lookupByOneOf`: email, then login (`GetByLogin`: login or email);
        // the `user` rows of service accounts are filtered out.
        let found = (!email.is_empty())
            .then(|| {
                store
                    .users
                    .values()
                    .find(|u| u.email.eq_ignore_ascii_case(&email))
                    .map(|u| u.id)
            })
            .flatten()
            .or_else(|| store.user_by_login_or_email(&login).map(|u| u.id));
        let id = match found {
            Some(id) => {
                update_user_attributes(&mut store, id, &login, &email, &name, now)?;
                id
            }
            None if !settings.auth_proxy_auto_sign_up => {
                return Err(ApiError::authn(
                    StatusCode::UNAUTHORIZED,
                    "user.sync.signup-disabled",
                    "Sign up is disabled",
                ))
            }
            None => {
                // Proxy users have no usable password.
                let salt = credentials::random_alphanumeric(10);
                let id = store
                    .insert_user(
                        &login,
                        &email,
                        &name,
                        salt,
                        String::new(),
                        Role::Viewer,
                        false,
                        now,
                    )
                    .map_err(|_| user_sync_internal())?;
                // `SkipOrgSetup` when a role comes with the identity (the org
                // sync adds it); else the `auto_assign_org_id` org as Viewer.
                if let Some(user) = store.users.get_mut(&id) {
                    user.orgs.clear();
                    if role.is_none() {
                        user.orgs.insert(assign_org, Role::Viewer);
                    }
                    user.org_id = assign_org;
                }
                id
            }
        };
        if let Some(role) = role {
            sync_org_roles(&mut store, id, assign_org, role);
        }
        id
    };

    let caller = signed_in_proxy_user(shared, id, org)?;
    shared.proxy_cache().set(
        username,
        cache_key,
        id,
        now.saturating_add(settings.auth_proxy_sync_ttl_secs),
    );
    Ok(caller)
}

/// `FetchSyncedUser` and the service's disabled check.
fn signed_in_proxy_user(shared: &Shared, id: i64, org: i64) -> Result<Caller, ApiError> {
    let disabled = shared.store().users.get(&id).map(|u| u.disabled);
    match disabled {
        None => Err(ApiError::authn(
            StatusCode::UNAUTHORIZED,
            "user.sync.fetch-not-found",
            "User not found",
        )),
        Some(true) => Err(ApiError::authn(
            StatusCode::UNAUTHORIZED,
            "identity.disabled",
            "Unauthorized",
        )),
        Some(false) => user_caller(shared, id, None, org, AuthClient::AuthProxy),
    }
}

/// `UserSync.updateUserAttributes`: the login, email and name the proxy
/// sent replace the stored ones (a value another row holds fails the
/// update, as the unique indexes do).
fn update_user_attributes(
    store: &mut crate::store::Store,
    id: i64,
    login: &str,
    email: &str,
    name: &str,
    now: i64,
) -> Result<(), ApiError> {
    let taken = |store: &crate::store::Store, value: &str, is_login: bool| {
        store.users.values().any(|u| {
            u.id != id
                && if is_login {
                    u.login.eq_ignore_ascii_case(value)
                } else {
                    u.email.eq_ignore_ascii_case(value)
                }
        }) || (is_login
            && store
                .service_accounts
                .values()
                .any(|s| s.login.eq_ignore_ascii_case(value)))
    };
    let Some(user) = store.users.get(&id) else {
        return Err(user_sync_internal());
    };
    let new_login = (!login.is_empty() && login != user.login).then(|| login.to_owned());
    let new_email = (!email.is_empty() && email != user.email).then(|| email.to_owned());
    let new_name = (!name.is_empty() && name != user.name).then(|| name.to_owned());
    if new_login.as_deref().is_some_and(|l| taken(store, l, true))
        || new_email.as_deref().is_some_and(|e| taken(store, e, false))
    {
        return Err(user_sync_internal());
    }
    if let Some(user) = store.users.get_mut(&id) {
        let changed = new_login.is_some() || new_email.is_some() || new_name.is_some();
        if let Some(l) = new_login {
            user.login = l;
        }
        if let Some(e) = new_email {
            user.email = e;
        }
        if let Some(n) = new_name {
            user.name = n;
        }
        if changed {
            user.updated = now;
        }
    }
    Ok(())
}

/// `OrgSync.SyncOrgRolesHook` with the one org role the proxy header
/// gives (`getRoles`: `auto_assign_org_id` → role): the role set there,
/// the user added there if needed, **removed from every other org** (but
/// an org whose last admin the user is keeps it, `ErrLastOrgAdmin`), and
/// the current org moved to `assign_org`.
fn sync_org_roles(store: &mut crate::store::Store, id: i64, assign_org: i64, role: Role) {
    let others: Vec<i64> = store
        .users
        .get(&id)
        .map(|u| u.orgs.keys().copied().filter(|o| *o != assign_org).collect())
        .unwrap_or_default();
    if store.orgs.contains_key(&assign_org) {
        if let Some(user) = store.users.get_mut(&id) {
            user.orgs.insert(assign_org, role);
        }
    }
    for org in others {
        let last_admin = store.users.get(&id).and_then(|u| u.orgs.get(&org)) == Some(&Role::Admin)
            && store.org_admin_count(org) == 1;
        // Grafana leaves a user it removed from every org in none; the
        // stand-in's store would delete it, so the last one stays.
        let last_org = store.users.get(&id).is_some_and(|u| u.orgs.len() == 1);
        if !last_admin && !last_org {
            store.remove_org_member(org, id);
        }
    }
    if let Some(user) = store.users.get_mut(&id) {
        if user.orgs.contains_key(&assign_org) {
            user.org_id = assign_org;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_parsing_like_go() {
        let mut headers = HeaderMap::new();
        headers.insert(
            COOKIE,
            "theme=dark; grafana_session=abc; grafana_session=def"
                .parse()
                .unwrap(),
        );
        assert_eq!(cookie(&headers, "grafana_session").as_deref(), Some("abc"));
        assert_eq!(cookie(&headers, "pmm_session"), None);
    }
}

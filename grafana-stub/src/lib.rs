//! A Grafana / PMM stand-in for Portcullis' tests: the upstream the gateway
//! forwards to and the judge it asks about credentials. It follows
//! `docs/grafana.md` to the letter — credential formats, PBKDF2 costs,
//! answers and status codes — so that the gateway is tested against what a
//! real Grafana does, not against what the gateway expects.
//!
//! ```no_run
//! # async fn demo() {
//! use grafana_stub::{Flavor, GrafanaStub};
//! let stub = GrafanaStub::start(Flavor::Pmm).await;
//! let sa = stub.add_service_account("pmm-agent", "Admin");
//! let (_id, token) = stub.add_sa_token(sa, "agent", None);
//! println!("{} {token}", stub.url());
//! # }
//! ```

mod auth;
mod clock;
pub mod credentials;
mod handlers;
mod pages;
mod server;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::credentials::{LegacyKey, SaToken};
use crate::store::{Role, Store};

pub use crate::store::{ORG_ID, ORG_NAME};

/// Which Grafana the stand-in imitates; they differ in how tokens can ask
/// who they are (docs/grafana.md, "Asking Grafana who a credential is").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Flavor {
    /// PMM 3's Grafana 11: `/api/auth/serviceaccount`, `pmm_session`, the
    /// `/v1/…` API of pmm-managed, legacy keys migrated to service accounts.
    #[default]
    Pmm,
    /// Vanilla Grafana 11.x: `/api/user` names a token's service account.
    Grafana11,
    /// Vanilla Grafana 10.4: `/api/user` refuses tokens with 403.
    Grafana10_4,
}

impl Flavor {
    pub fn default_session_cookie(self) -> &'static str {
        match self {
            Flavor::Pmm => "pmm_session",
            Flavor::Grafana11 | Flavor::Grafana10_4 => "grafana_session",
        }
    }

    /// Where Grafana is served: PMM runs it with `root_url =
    /// https://%(domain)s/graph` and `serve_from_sub_path = true`
    /// (`build/ansible/roles/grafana/files/grafana.ini` in percona/pmm).
    pub fn default_sub_path(self) -> &'static str {
        match self {
            Flavor::Pmm => "/graph",
            Flavor::Grafana11 | Flavor::Grafana10_4 => "",
        }
    }

    /// The Grafana version `/api/health` reports.
    pub fn grafana_version(self) -> &'static str {
        match self {
            Flavor::Pmm => "11.6.3",
            Flavor::Grafana11 => "11.6.3",
            Flavor::Grafana10_4 => "10.4.19",
        }
    }
}

impl FromStr for Flavor {
    type Err = String;

    fn from_str(s: &str) -> Result<Flavor, String> {
        match s.to_ascii_lowercase().as_str() {
            "pmm" => Ok(Flavor::Pmm),
            "grafana11" | "grafana-11" | "11" => Ok(Flavor::Grafana11),
            "grafana10.4" | "grafana-10.4" | "grafana10_4" | "10.4" => Ok(Flavor::Grafana10_4),
            other => Err(format!(
                "unknown flavor {other:?} (pmm | grafana11 | grafana10.4)"
            )),
        }
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::Pmm => "pmm",
            Flavor::Grafana11 => "grafana11",
            Flavor::Grafana10_4 => "grafana10.4",
        })
    }
}

/// How to start a stand-in; `..StubOptions::default()` fills the rest.
#[derive(Debug, Clone)]
pub struct StubOptions {
    pub flavor: Flavor,
    /// `127.0.0.1:0` by default: a free port.
    pub listen: SocketAddr,
    /// Session cookie name; the flavor's default when `None`.
    pub session_cookie: Option<String>,
    /// Grafana's `secret_key`, which salts session-token hashes.
    pub secret_key: String,
    /// Password of the seeded `admin` user.
    pub admin_password: String,
    /// `[auth.proxy] enabled`, with `header_name = X-WEBAUTH-USER`,
    /// `header_property = username`, `headers = Email:X-WEBAUTH-EMAIL
    /// Name:X-WEBAUTH-NAME` (plus `Role:X-WEBAUTH-ROLE` with
    /// `auth_proxy_role_sync`) and `whitelist = 127.0.0.1, ::1` (a header
    /// from any other peer fails with `auth-proxy.invalid-ip`). Grafana's
    /// client order then applies (`pkg/services/authn/authnimpl`): API key /
    /// token (30), Basic (40), **auth proxy (50)**, session cookie (60), each
    /// failure falling through to the next — see `auth::authenticate`.
    /// A proxy identity is always a user (`pkg/services/authn/clients/
    /// grafana.go` `AuthenticateProxy`): looked up by email, then by login or
    /// email, service accounts never matching; an unknown one is signed up
    /// as a new ordinary user (`auth_proxy_auto_sign_up`), and a login or
    /// email a service account or another user already holds fails with
    /// `500 user.sync.internal`. In this mode every request is
    /// authenticated, whatever its path, as Grafana's context handler does
    /// (the echo paths too: a Basic header costs its PBKDF2 there as well).
    pub auth_proxy: bool,
    /// `[auth.proxy] headers = … Role:X-WEBAUTH-ROLE`: a valid role in the
    /// header is synced into `auto_assign_org_id` **and the user is removed
    /// from every other org** (`sync/org_sync.go` `SyncOrgRolesHook`; an org
    /// where the user is the last admin is kept, `ErrLastOrgAdmin`); the
    /// user's current org becomes `auto_assign_org_id`. Off by default, as
    /// in Grafana's `headers =` (and the settings in docs/grafana.md, "Grafana
    /// behind an authenticating proxy").
    pub auth_proxy_role_sync: bool,
    /// `[auth.proxy] shared_secret` (sent in `X-WEBAUTH-SECRET`, Grafana's
    /// `shared_secret_header` default): when set, a request whose header is
    /// missing or different is not an auth-proxy request at all (the proxy
    /// client's `Test` is false) and falls through to the session cookie.
    pub auth_proxy_shared_secret: Option<String>,
    /// `[auth.proxy] sync_ttl` (default 15 minutes in Grafana 12): a proxy
    /// identity is cached under its header values (user, name, email, role)
    /// for this long; a cache hit loads the user by id and skips every sync
    /// (no sign-up, no attribute or role sync). Follows `advance_clock`.
    pub auth_proxy_sync_ttl: Duration,
    /// `[auth.proxy] auto_sign_up` (default true): an unknown login becomes
    /// a new user; off, it fails with `401 user.sync.signup-disabled`.
    pub auth_proxy_auto_sign_up: bool,
    /// `[users] auto_assign_org_id` (default 1): where a synced role goes
    /// and where proxy users signed up without a role land (as Viewer,
    /// `auto_assign_org_role`).
    pub auto_assign_org_id: i64,
    /// Turn legacy API keys into service accounts, as PMM 3 does; `None`
    /// means "as the flavor does" (PMM only).
    pub migrate_api_keys: Option<bool>,
    /// Grafana's `[auth] token_rotation_interval_minutes` (default 10): a
    /// session used within this long of its last rotation is accepted, after
    /// it every request with it is answered `401 session.token.rotate` until
    /// the frontend calls `POST /api/user/auth-tokens/rotate`. Whole seconds
    /// (Grafana keeps `rotated_at` in Unix seconds), at least one. PMM's own
    /// `grafana.ini` sets 60 minutes; 10 is kept as the default for every
    /// flavor (set it to imitate a PMM server exactly).
    pub rotation_interval: Duration,
    /// Grafana's `SkipRotationTime` (`auth_token.go`, 5 s, the
    /// `skipTokenRotationIfRecent` feature, on by default in 11.x): a
    /// rotate call within this long of the last rotation answers 200 without
    /// a new cookie. `Duration::ZERO` turns it off.
    pub skip_rotation_if_recent: Duration,
    /// Grafana's sub path (`root_url = …/graph/` with `serve_from_sub_path =
    /// true`, Grafana's `AppSubURL`). `None`: the flavor's — `/graph` for PMM
    /// (PMM's `grafana.ini`), none for vanilla Grafana; `Some("")` (or
    /// `"/"`): none. With a sub path:
    ///
    /// - Grafana's whole surface is served under it — `{sub}/login`,
    ///   `{sub}/logout`, `{sub}/api/…`, `{sub}/user/auth-tokens/rotate`, and
    ///   the UI pages `{sub}/` and `{sub}/d/…` — and, as Grafana's router only
    ///   trims the prefix (`strings.TrimPrefix`), the API, login, logout and
    ///   rotation also without it (what talks to Grafana directly, like the
    ///   gateway's verifier, uses those). Anything else under the sub path
    ///   echoes, as every non-Grafana path does.
    /// - Redirects are Grafana's: `{sub}/login`, `{sub}/`, and `redirectTo`
    ///   parameters without the sub path (`getRedirectToQueryParam`).
    /// - Cookies get `Path={sub}`: Grafana's `cookieOptions` use `AppSubURL`
    ///   as the path, and Grafana has no setting to change it. PMM's nginx
    ///   rewrites it (`proxy_cookie_path / "/;";` in the `/graph` location
    ///   of `build/ansible/roles/nginx/files/conf.d/pmm.conf`, turning
    ///   `Path=/graph` into `Path=/;graph`, i.e. `Path=/`) so that
    ///   `pmm_session` also reaches `/v1/…`; whatever replaces that nginx
    ///   must do the same. The stand-in sends what Grafana sends.
    pub sub_path: Option<String>,
}

impl Default for StubOptions {
    fn default() -> StubOptions {
        StubOptions {
            flavor: Flavor::default(),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            session_cookie: None,
            secret_key: "SW2YcwTIb9zpOOhoPsMm".to_owned(),
            admin_password: "admin".to_owned(),
            auth_proxy: false,
            auth_proxy_role_sync: false,
            auth_proxy_shared_secret: None,
            auth_proxy_sync_ttl: DEFAULT_AUTH_PROXY_SYNC_TTL,
            auth_proxy_auto_sign_up: true,
            auto_assign_org_id: ORG_ID,
            migrate_api_keys: None,
            rotation_interval: DEFAULT_ROTATION_INTERVAL,
            skip_rotation_if_recent: DEFAULT_SKIP_ROTATION_IF_RECENT,
            sub_path: None,
        }
    }
}

/// Grafana's default `token_rotation_interval_minutes`.
pub const DEFAULT_ROTATION_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Grafana's `SkipRotationTime`.
pub const DEFAULT_SKIP_ROTATION_IF_RECENT: Duration = Duration::from_secs(5);
/// Grafana 12's `[auth.proxy] sync_ttl` default (`pkg/setting/setting_auth_proxy.go`).
pub const DEFAULT_AUTH_PROXY_SYNC_TTL: Duration = Duration::from_secs(15 * 60);

/// Options with the flavor's defaults applied.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub flavor: Flavor,
    pub session_cookie: String,
    pub secret_key: String,
    pub auth_proxy: bool,
    pub auth_proxy_role_sync: bool,
    pub auth_proxy_shared_secret: Option<String>,
    pub auth_proxy_sync_ttl_secs: i64,
    pub auth_proxy_auto_sign_up: bool,
    pub auto_assign_org_id: i64,
    pub migrate_api_keys: bool,
    pub rotation_interval_secs: i64,
    pub skip_rotation_secs: i64,
    /// Grafana's `AppSubURL`: `""` or `/graph` (no trailing slash).
    pub sub_path: String,
}

impl Settings {
    /// Grafana's `cookieOptions` path: `AppSubURL`, else `/`.
    pub fn cookie_path(&self) -> &str {
        if self.sub_path.is_empty() {
            "/"
        } else {
            &self.sub_path
        }
    }
}

/// `AppSubURL` from a configured sub path: one leading slash, no trailing one.
fn normalize_sub_path(path: &str) -> String {
    let trimmed = path.trim().trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("/{trimmed}")
    }
}

/// Everything the server tasks and the test hooks share.
pub(crate) struct Shared {
    pub settings: Settings,
    pub store: Mutex<Store>,
    pub clock: Clock,
    pub verifications: AtomicU64,
    pub calls: Mutex<HashMap<String, u64>>,
    pub unavailable: AtomicBool,
    pub delay: Mutex<Option<Duration>>,
    /// PBKDF2 runs while serving requests: password checks, and key /
    /// token hashes.
    pub password_hashes: AtomicU64,
    pub key_hashes: AtomicU64,
    /// The auth proxy's `sync_ttl` cache (Grafana's remote cache).
    pub proxy_cache: Mutex<auth::ProxyCache>,
    /// Requests seen, when recording (`GrafanaStub::record_requests`).
    pub recorded: Mutex<Option<Vec<SeenRequest>>>,
}

impl Shared {
    /// A poisoned lock only means a panic elsewhere (a failing test); the
    /// data is still consistent enough for a stand-in.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    pub fn proxy_cache(&self) -> MutexGuard<'_, auth::ProxyCache> {
        self.proxy_cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn recording(&self) -> MutexGuard<'_, Option<Vec<SeenRequest>>> {
        self.recorded.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Which of Grafana's authn clients signed a request in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthClient {
    /// API key or service-account token (Bearer, or Basic `api_key:`).
    ApiKey,
    /// Basic with a user's password.
    Basic,
    /// `[auth.proxy]`: the identity headers.
    AuthProxy,
    /// The session cookie.
    Session,
}

/// What Grafana made of a request's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authn {
    /// Signed in by `client` as `login` (a user's or a service account's;
    /// empty for a legacy key of no account).
    SignedIn { client: AuthClient, login: String },
    /// No client applied: no credential, no identity header.
    Anonymous,
    /// Every applicable client failed; the first failure's status and
    /// `messageId` (or message).
    Refused { status: u16, reason: String },
}

/// A request as the stand-in received it (`GrafanaStub::record_requests`).
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    /// The path as received (sub path included).
    pub path: String,
    pub query: Option<String>,
    /// Every header, names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// Who Grafana took the caller for, when the request was authenticated
    /// (every request in auth-proxy mode; otherwise the API, the pages and
    /// logout, as before).
    pub authn: Option<Authn>,
}

impl SeenRequest {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether any `X-WEBAUTH-*` header came with the request.
    pub fn has_identity_headers(&self) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n.to_ascii_lowercase().starts_with("x-webauth-"))
    }

    /// Whether the request carried a credential Grafana checks itself: an
    /// `Authorization` header or the session cookie `cookie_name`.
    pub fn has_credential(&self, cookie_name: &str) -> bool {
        self.header("authorization").is_some()
            || self
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
                .flat_map(|(_, v)| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .any(|(k, v)| k == cookie_name && !v.is_empty())
    }
}

/// A running stand-in. Every method takes `&self`, so tests can share it in
/// an `Arc`. Dropping it stops the server.
pub struct GrafanaStub {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

fn parse_role(role: &str) -> Role {
    Role::parse(role)
        .unwrap_or_else(|| panic!("unknown Grafana role {role:?} (Viewer | Editor | Admin | None)"))
}

impl GrafanaStub {
    /// Starts a stand-in of `flavor` on a free port of 127.0.0.1.
    pub async fn start(flavor: Flavor) -> GrafanaStub {
        GrafanaStub::start_with(StubOptions {
            flavor,
            ..StubOptions::default()
        })
        .await
    }

    /// Starts a stand-in; panics when the address cannot be bound (tests).
    pub async fn start_with(options: StubOptions) -> GrafanaStub {
        let listen = options.listen;
        GrafanaStub::try_start_with(options)
            .await
            .unwrap_or_else(|e| panic!("grafana stub cannot listen on {listen}: {e}"))
    }

    pub async fn try_start_with(options: StubOptions) -> std::io::Result<GrafanaStub> {
        let listener = tokio::net::TcpListener::bind(options.listen).await?;
        let addr = listener.local_addr()?;
        let settings = Settings {
            flavor: options.flavor,
            session_cookie: options
                .session_cookie
                .unwrap_or_else(|| options.flavor.default_session_cookie().to_owned()),
            secret_key: options.secret_key,
            auth_proxy: options.auth_proxy,
            auth_proxy_role_sync: options.auth_proxy_role_sync,
            auth_proxy_shared_secret: options.auth_proxy_shared_secret,
            auth_proxy_sync_ttl_secs: i64::try_from(options.auth_proxy_sync_ttl.as_secs())
                .unwrap_or(i64::MAX),
            auth_proxy_auto_sign_up: options.auth_proxy_auto_sign_up,
            auto_assign_org_id: options.auto_assign_org_id,
            migrate_api_keys: options.migrate_api_keys.unwrap_or(options.flavor == Flavor::Pmm),
            rotation_interval_secs: i64::try_from(options.rotation_interval.as_secs())
                .unwrap_or(i64::MAX)
                .max(1),
            skip_rotation_secs: i64::try_from(options.skip_rotation_if_recent.as_secs()).unwrap_or(i64::MAX),
            sub_path: normalize_sub_path(
                options
                    .sub_path
                    .as_deref()
                    .unwrap_or(options.flavor.default_sub_path()),
            ),
        };
        let clock = Clock::default();
        let mut store = Store::new();
        // A fresh Grafana: admin/admin, org Admin and server admin.
        let salt = credentials::random_alphanumeric(10);
        let hash = credentials::encode_password(&options.admin_password, &salt);
        let now = clock.now();
        store
            .insert_user("admin", "admin@localhost", "", salt, hash, Role::Admin, true, now)
            .map_err(|_| std::io::Error::other("cannot seed admin"))?;
        let shared = Arc::new(Shared {
            settings,
            store: Mutex::new(store),
            clock,
            verifications: AtomicU64::new(0),
            calls: Mutex::new(HashMap::new()),
            unavailable: AtomicBool::new(false),
            delay: Mutex::new(None),
            password_hashes: AtomicU64::new(0),
            key_hashes: AtomicU64::new(0),
            proxy_cache: Mutex::new(auth::ProxyCache::default()),
            recorded: Mutex::new(None),
        });
        let (shutdown, signal) = watch::channel(false);
        let task = tokio::spawn(server::run(listener, Arc::clone(&shared), signal));
        Ok(GrafanaStub {
            shared,
            addr,
            shutdown,
            task: Mutex::new(Some(task)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn flavor(&self) -> Flavor {
        self.shared.settings.flavor
    }

    /// Grafana's sub path (`""` or e.g. `/graph`), see `StubOptions::sub_path`.
    pub fn sub_path(&self) -> String {
        self.shared.settings.sub_path.clone()
    }

    pub fn session_cookie_name(&self) -> String {
        self.shared.settings.session_cookie.clone()
    }

    /// Adds a user in the main org with `role` ("Viewer", "Editor", "Admin"
    /// or "None"); email `<login>@example.com`. Returns the user id. More
    /// orgs: `add_org`, `add_org_member`.
    pub fn add_user(&self, login: &str, password: &str, role: &str, grafana_admin: bool) -> i64 {
        let role = parse_role(role);
        let salt = credentials::random_alphanumeric(10);
        let hash = credentials::encode_password(password, &salt);
        let now = self.shared.now();
        self.shared
            .store()
            .insert_user(
                login,
                &format!("{login}@example.com"),
                login,
                salt,
                hash,
                role,
                grafana_admin,
                now,
            )
            .unwrap_or_else(|_| panic!("user {login:?} already exists"))
    }

    /// Creates a legacy API key; returns its id and the key string.
    pub fn add_api_key(&self, name: &str, role: &str, seconds_to_live: Option<i64>) -> (i64, String) {
        let role = parse_role(role);
        let key = LegacyKey::generate(ORG_ID, name);
        let now = self.shared.now();
        let expires = seconds_to_live.filter(|s| *s > 0).map(|s| now + s);
        let mut store = self.shared.store();
        assert!(
            !store.legacy_key_name_taken(ORG_ID, name),
            "API key {name:?} already exists"
        );
        let id = store.add_legacy_key(&key, role, expires, self.shared.settings.migrate_api_keys, now);
        (id, key.encode())
    }

    /// Registers an exact legacy key string (a seed document's), decoded the
    /// way Go decodes it. Returns the key id.
    pub fn add_api_key_exact(&self, key: &str, role: &str) -> i64 {
        let role = parse_role(role);
        let decoded = LegacyKey::decode(key)
            .unwrap_or_else(|| panic!("{key:?} is not a legacy API key Grafana could decode"));
        let now = self.shared.now();
        let mut store = self.shared.store();
        assert!(
            !store.legacy_key_name_taken(decoded.org_id, &decoded.name),
            "API key {:?} already exists",
            decoded.name
        );
        store.add_legacy_key(&decoded, role, None, self.shared.settings.migrate_api_keys, now)
    }

    /// Adds a service account (login `sa-<name>`) in the main org; returns
    /// its id.
    pub fn add_service_account(&self, name: &str, role: &str) -> i64 {
        self.add_service_account_in(ORG_ID, name, role)
    }

    /// Adds a service account in org `org_id`; its tokens belong to that
    /// org. Returns its id.
    pub fn add_service_account_in(&self, org_id: i64, name: &str, role: &str) -> i64 {
        let role = parse_role(role);
        let now = self.shared.now();
        let mut store = self.shared.store();
        assert!(store.orgs.contains_key(&org_id), "no org {org_id}");
        store
            .insert_service_account(
                org_id,
                name,
                &store::service_account_login(name),
                role,
                false,
                now,
            )
            .unwrap_or_else(|_| panic!("service account {name:?} already exists"))
            .id
    }

    /// Creates an organisation (Grafana's `POST /api/orgs`); returns its id.
    /// Names are unique.
    pub fn add_org(&self, name: &str) -> i64 {
        self.shared
            .store()
            .add_org(name)
            .unwrap_or_else(|_| panic!("org {name:?} already exists"))
    }

    /// Makes user `user_id` a member of org `org_id` with `role` ("Viewer",
    /// "Editor", "Admin" or "None"), or changes its role there (Grafana's
    /// `POST /api/orgs/:orgId/users` / `PATCH …/users/:userId`). Users start
    /// as members of the main org, which stays their current org.
    pub fn add_org_member(&self, org_id: i64, user_id: i64, role: &str) {
        let role = parse_role(role);
        assert!(
            self.shared.store().set_org_member(org_id, user_id, role),
            "no org {org_id} or no user {user_id}"
        );
    }

    /// Removes user `user_id` from org `org_id` (Grafana's `DELETE
    /// /api/orgs/:orgId/users/:userId`): its current org moves to another
    /// of its orgs; a user left in no org is deleted. Returns whether it
    /// was a member.
    pub fn remove_org_member(&self, org_id: i64, user_id: i64) -> bool {
        let mut store = self.shared.store();
        let member = store
            .users
            .get(&user_id)
            .is_some_and(|u| u.orgs.contains_key(&org_id));
        if member {
            store.remove_org_member(org_id, user_id);
        }
        member
    }

    /// Adds a `glsa_` token to a service account; returns its id and the token.
    pub fn add_sa_token(&self, sa_id: i64, name: &str, seconds_to_live: Option<i64>) -> (i64, String) {
        let token = SaToken::generate();
        let now = self.shared.now();
        let expires = seconds_to_live.filter(|s| *s > 0).map(|s| now + s);
        let mut store = self.shared.store();
        assert!(
            store.service_accounts.contains_key(&sa_id),
            "no service account {sa_id}"
        );
        let id = store.add_sa_token(sa_id, name, &token, expires, now);
        (id, token.encode())
    }

    /// Logs in like `POST /login` (same checks, same lock-out) and returns
    /// the session cookie's value.
    pub fn login(&self, login: &str, password: &str) -> Option<String> {
        let user_id = auth::check_password_blocking(&self.shared, login, password).ok()?;
        let (token, _) = auth::create_session(&self.shared, user_id, "127.0.0.1", "grafana-stub");
        Some(token)
    }

    /// Requests received on the identity endpoints: `/api/user`,
    /// `/api/user/orgs`, `/api/org`, `/api/auth/serviceaccount` and
    /// `GET /api/serviceaccounts/:id`.
    pub fn verifications(&self) -> u64 {
        self.shared.verifications.load(Ordering::SeqCst)
    }

    /// Requests received whose path starts with `path_prefix`.
    pub fn calls(&self, path_prefix: &str) -> u64 {
        let calls = self.shared.calls.lock().unwrap_or_else(PoisonError::into_inner);
        calls
            .iter()
            .filter(|(path, _)| path.starts_with(path_prefix))
            .map(|(_, n)| *n)
            .sum()
    }

    pub fn reset_counters(&self) {
        self.shared.verifications.store(0, Ordering::SeqCst);
        self.shared.password_hashes.store(0, Ordering::SeqCst);
        self.shared.key_hashes.store(0, Ordering::SeqCst);
        self.shared
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// "Grafana down": every request answers 503.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Delays every response (time-out tests).
    pub fn set_delay(&self, delay: Option<Duration>) {
        *self.shared.delay.lock().unwrap_or_else(PoisonError::into_inner) = delay;
    }

    /// Moves the stand-in's clock forward: expiry, session lifetimes and the
    /// lock-out window all follow it.
    pub fn advance_clock(&self, by: Duration) {
        self.shared.clock.advance(by);
    }

    /// Failed password checks Grafana counts against `login` in its
    /// brute-force window now (5 lock it).
    pub fn failed_logins(&self, login: &str) -> usize {
        let now = self.shared.now();
        self.shared.store().failed_logins(login, now)
    }

    /// PBKDF2 runs for password checks while serving requests (Basic, the
    /// login form, password changes and new passwords). Each costs Grafana
    /// 10,000 iterations; a request the auth proxy signs in costs none.
    pub fn password_hashes(&self) -> u64 {
        self.shared.password_hashes.load(Ordering::SeqCst)
    }

    /// PBKDF2 runs for API keys and service-account tokens (one per
    /// forwarded key or token that is well-formed enough to be hashed).
    pub fn key_hashes(&self) -> u64 {
        self.shared.key_hashes.load(Ordering::SeqCst)
    }

    /// Every PBKDF2 run while serving requests.
    pub fn pbkdf2_hashes(&self) -> u64 {
        self.password_hashes() + self.key_hashes()
    }

    /// Starts (`true`, clearing what was recorded) or stops keeping every
    /// request received (`recorded_requests`). Off by default: a stand-in
    /// under load would otherwise grow without bound.
    pub fn record_requests(&self, on: bool) {
        *self.shared.recording() = on.then(Vec::new);
    }

    /// The requests received since recording started, oldest first.
    pub fn recorded_requests(&self) -> Vec<SeenRequest> {
        self.shared.recording().clone().unwrap_or_default()
    }

    /// Number of users (service accounts not counted).
    pub fn user_count(&self) -> usize {
        self.shared.store().users.len()
    }

    /// The id of the user whose login is `login` (any case), if any.
    pub fn user_by_login(&self, login: &str) -> Option<i64> {
        self.shared.store().user_by_login(login).map(|u| u.id)
    }

    /// The user's org memberships: org id → role ("Viewer", …). Empty for
    /// no such user.
    pub fn user_orgs(&self, user_id: i64) -> BTreeMap<i64, String> {
        self.shared
            .store()
            .users
            .get(&user_id)
            .map(|u| {
                u.orgs
                    .iter()
                    .map(|(org, role)| (*org, role.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The user's current org (`user.org_id`), if the user exists.
    pub fn user_current_org(&self, user_id: i64) -> Option<i64> {
        self.shared.store().users.get(&user_id).map(|u| u.org_id)
    }

    /// Deletes a user directly in Grafana (as `DELETE /api/admin/users/:id`
    /// would, without going through any proxy): sessions go with it.
    pub fn delete_user(&self, user_id: i64) -> bool {
        self.shared.store().delete_user(user_id)
    }

    /// Deletes a key or token directly in Grafana (the row goes: "Invalid
    /// API key" afterwards).
    pub fn delete_key(&self, key_id: i64) -> bool {
        self.shared.store().keys.remove(&key_id).is_some()
    }

    /// Number of session tokens Grafana holds for the user.
    pub fn session_count(&self, user_id: i64) -> usize {
        self.shared
            .store()
            .sessions
            .values()
            .filter(|s| s.user_id == user_id)
            .count()
    }

    pub fn set_user_disabled(&self, user_id: i64, disabled: bool) -> bool {
        let mut store = self.shared.store();
        let Some(user) = store.users.get_mut(&user_id) else {
            return false;
        };
        user.disabled = disabled;
        if disabled {
            store.revoke_user_sessions(user_id);
        }
        true
    }

    /// Revokes a token or key in place (Grafana's `is_revoked`, set when a
    /// token is found leaked): it then answers "Revoked API key".
    pub fn revoke_key(&self, key_id: i64) -> bool {
        match self.shared.store().keys.get_mut(&key_id) {
            Some(key) => {
                key.is_revoked = true;
                true
            }
            None => false,
        }
    }

    /// Closes the listener and every open connection: the port then refuses.
    pub async fn stop(&self) {
        let _ = self.shutdown.send(true);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for GrafanaStub {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        // Aborting drops the accept loop, its listener and (through the
        // JoinSet) every connection task.
        if let Some(task) = self.task.lock().unwrap_or_else(PoisonError::into_inner).take() {
            task.abort();
        }
    }
}

impl fmt::Debug for GrafanaStub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrafanaStub")
            .field("addr", &self.addr)
            .field("flavor", &self.shared.settings.flavor)
            .finish_non_exhaustive()
    }
}

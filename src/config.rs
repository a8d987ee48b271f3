//! `gateway.toml` plus `PORTCULLIS_<SECTION>_<KEY>` overrides, validated once at
//! start so that every later module can trust what it is handed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::role::Role;

mod env;
pub mod redis;
pub mod values;

pub use env::is_service_link;

/// Environment variable that carries the cache HMAC key itself (not a path).
/// It is a secret, so it never becomes part of the printable config.
pub const CACHE_KEY_ENV: &str = "PORTCULLIS_CACHE_KEY";
const ENV_PREFIX: &str = "PORTCULLIS_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "config file {path} does not exist (a file named with --config must exist; \
         only the implicit ./gateway.toml may be absent)"
    )]
    Missing { path: PathBuf },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {reason}")]
    Key { key: String, reason: String },
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
}

impl ConfigError {
    fn key(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Key {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub upstream: UpstreamConfig,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub identity: IdentityConfig,
    pub cache: CacheConfig,
    pub routes: Vec<RouteConfig>,
    /// Keys set from the environment, and by which variable.
    #[serde(skip)]
    env_keys: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    #[serde(deserialize_with = "values::socket_addr")]
    pub listen: SocketAddr,
    #[serde(deserialize_with = "values::socket_addr")]
    pub admin_listen: SocketAddr,
    /// Peers whose `X-Forwarded-*` headers are believed (a bare address is
    /// one host).
    #[serde(deserialize_with = "values::cidrs")]
    pub trusted_proxies: Vec<IpNet>,
    pub max_connections: usize,
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    #[serde(with = "duration")]
    pub tls_handshake_timeout: Duration,
    pub max_header_bytes: usize,
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Tokio worker threads; 0 means one per core.
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            trusted_proxies: Vec::new(),
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            tls_handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            shutdown_grace: Duration::from_secs(30),
            workers: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Extra SANs for the generated self-signed certificate.
    pub hostnames: Vec<String>,
    /// How often the certificate files are checked for rotation (0 = never).
    #[serde(with = "duration")]
    pub reload_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: PathBuf::from("certs/gateway.crt"),
            key: PathBuf::from("certs/gateway.key"),
            hostnames: Vec::new(),
            reload_interval: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub url: String,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Time allowed until the upstream's response headers arrive.
    #[serde(with = "duration")]
    pub response_timeout: Duration,
    /// PEM bundle of CAs trusted for https upstreams (empty = public roots).
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate from an https upstream. Only for testing.
    pub insecure: bool,
    #[serde(with = "duration")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Bodyless GET/HEAD to an http:// upstream exchanged in the request's
    /// own task; false sends every request through hyper's pooled client.
    pub direct_exchange: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: "http://127.0.0.1:3000".into(),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            ca_file: None,
            insecure: false,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
            direct_exchange: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter directive, e.g. `info` or `portcullis=debug`.
    pub level: String,
    /// One line per request.
    pub access_log: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
            access_log: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Grafana's own UI and API: login flow anonymous, the rest Viewer.
    Grafana,
    /// PMM's nginx table; unmatched paths need Grafana admin.
    Pmm,
    /// Only the `[[routes]]` given in the file.
    Custom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifierKind {
    Grafana,
    Static,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub profile: Profile,
    pub verifier: VerifierKind,
    /// Name of the browser session cookie (PMM: `pmm_session`).
    pub session_cookie: String,
    pub grafana: GrafanaVerifierConfig,
    pub static_users: Vec<StaticUserConfig>,
    /// Failed password checks that may reach Grafana per login within
    /// `login_failure_window`. Must stay below Grafana's own lock-out
    /// threshold (5 per 5 minutes), or strangers can lock users out.
    pub login_failures: u32,
    #[serde(with = "duration")]
    pub login_failure_window: Duration,
    /// How long a password that verified stays known-good: it still gets
    /// through while strangers have used up its login's budget.
    #[serde(with = "duration")]
    pub known_good_for: Duration,
    /// Refused credentials one client address may have checked at Grafana
    /// within `client_failure_window`.
    pub client_failures: u32,
    #[serde(with = "duration")]
    pub client_failure_window: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            profile: Profile::Grafana,
            verifier: VerifierKind::Grafana,
            session_cookie: "grafana_session".into(),
            grafana: GrafanaVerifierConfig::default(),
            static_users: Vec::new(),
            login_failures: 4,
            login_failure_window: Duration::from_secs(300),
            known_good_for: Duration::from_secs(7 * 86_400),
            client_failures: 30,
            client_failure_window: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrafanaFlavor {
    /// Ask PMM's `/api/auth/serviceaccount` first, fall back to vanilla on 404.
    Auto,
    Pmm,
    Vanilla,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrafanaVerifierConfig {
    /// Where credentials are checked; empty means `upstream.url`.
    pub url: String,
    #[serde(with = "duration")]
    pub timeout: Duration,
    pub flavor: GrafanaFlavor,
    /// File holding an admin token used to read a service account's role on
    /// vanilla Grafana.
    pub admin_token_file: Option<PathBuf>,
    /// Role given to a token whose role cannot be learned.
    pub token_default_role: Role,
}

impl Default for GrafanaVerifierConfig {
    fn default() -> Self {
        GrafanaVerifierConfig {
            url: String::new(),
            timeout: Duration::from_secs(5),
            flavor: GrafanaFlavor::Auto,
            admin_token_file: None,
            token_default_role: Role::Viewer,
        }
    }
}

/// A credential known without asking Grafana (`auth.verifier = "static"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticUserConfig {
    pub login: String,
    /// hex SHA-256 of the password or token: the config never holds a secret.
    pub secret_sha256: String,
    pub role: Role,
    #[serde(default)]
    pub grafana_admin: bool,
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// How a request reaches Grafana (routes with `grafana = true`).
    pub grafana: GrafanaMode,
    /// Send the role header: only for Grafana's `headers = Role:…` on a
    /// single-org install, and never for a user who belongs to several orgs
    /// (Grafana would remove them from every other org).
    pub send_role: bool,
    /// File holding `[auth.proxy] shared_secret`, sent in `secret_header`.
    pub shared_secret_file: Option<PathBuf>,
    pub secret_header: String,
    pub user_header: String,
    pub role_header: String,
    pub email_header: String,
    pub name_header: String,
    pub org_header: String,
}

/// The two ways of talking to Grafana (`identity.grafana`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrafanaMode {
    /// The caller's credential, no identity header: works with any Grafana.
    Credential,
    /// A verified user as identity headers only, for Grafana's `[auth.proxy]`
    /// with the gateway whitelisted; tokens and keys as their credential.
    AuthProxy,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            grafana: GrafanaMode::Credential,
            send_role: false,
            shared_secret_file: None,
            secret_header: "X-WEBAUTH-SECRET".into(),
            user_header: "X-WEBAUTH-USER".into(),
            role_header: "X-WEBAUTH-ROLE".into(),
            email_header: "X-WEBAUTH-EMAIL".into(),
            name_header: "X-WEBAUTH-NAME".into(),
            org_header: "X-WEBAUTH-ORG-ID".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    #[serde(with = "duration")]
    pub ttl: Duration,
    #[serde(with = "duration")]
    pub negative_ttl: Duration,
    pub max_entries: usize,
    /// File whose contents (at least 32 bytes) key the HMAC of cache keys.
    pub key_file: Option<PathBuf>,
    pub redis: RedisConfig,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            max_entries: 100_000,
            key_file: None,
            redis: RedisConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://`, `rediss://`, `redis+sentinel://`; empty = no Redis.
    pub url: String,
    /// Cluster seed nodes; when given, `url` is ignored.
    pub cluster: Vec<String>,
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Prefix of every key Portcullis writes.
    pub prefix: String,
    /// Pub/sub channel that carries evictions between replicas.
    pub channel: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: String::new(),
            cluster: Vec::new(),
            timeout: Duration::from_millis(50),
            prefix: "portcullis:".into(),
            channel: "portcullis:evict".into(),
        }
    }
}

impl RedisConfig {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty() || !self.cluster.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix, matched on whole segments of the normalised path.
    pub prefix: String,
    /// Restrict the rule to one method; beats a method-less rule at the same prefix.
    #[serde(default)]
    pub method: Option<String>,
    /// Restrict the rule to one host (compared lower-cased, without port).
    #[serde(default)]
    pub host: Option<String>,
    pub min_role: Role,
    /// Upstream base URL for this route; default `upstream.url`.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Replace the matched prefix with this path towards the upstream.
    #[serde(default)]
    pub rewrite: Option<String>,
    /// Forward the client's `Authorization` and session cookie.
    #[serde(default = "yes")]
    pub forward_credentials: bool,
    /// Inject the identity headers.
    #[serde(default = "yes")]
    pub inject_identity: bool,
    /// Whether the route leads to Grafana, which checks credentials itself
    /// (see `identity.grafana`). Default: every route of the `grafana`
    /// profile; in the `pmm` profile `/graph` and the login flow; a custom
    /// route when it goes to `upstream.url`.
    #[serde(default)]
    pub grafana: Option<bool>,
}

impl RouteConfig {
    /// A rule for `prefix` needing `min_role`, every other field at its
    /// default (credentials forwarded, identity injected, `upstream.url`).
    pub fn rule(prefix: &str, min_role: Role) -> RouteConfig {
        RouteConfig {
            prefix: prefix.into(),
            method: None,
            host: None,
            min_role,
            upstream: None,
            rewrite: None,
            forward_credentials: true,
            inject_identity: true,
            grafana: None,
        }
    }
}

fn yes() -> bool {
    true
}

impl Config {
    /// Reads `path`, which must exist (a file named with `--config`),
    /// applies the environment and validates the result.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let doc = Self::read(path)?.ok_or_else(|| ConfigError::Missing {
            path: path.to_owned(),
        })?;
        Self::from_doc(doc, env)
    }

    /// Reads `path` if it exists, built-in defaults otherwise (the implicit
    /// `./gateway.toml`), applies the environment and validates the result.
    /// The flag tells whether the file was there.
    pub fn load_if_present(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, bool), ConfigError> {
        let doc = Self::read(path)?;
        let found = doc.is_some();
        Ok((Self::from_doc(doc.unwrap_or_default(), env)?, found))
    }

    /// The file's TOML, or `None` when there is no such file.
    fn read(path: &Path) -> Result<Option<toml::Table>, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => text
                .parse::<toml::Table>()
                .map(Some)
                .map_err(|e| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn from_doc(
        mut doc: toml::Table,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env_keys = env::apply_env(&mut doc, env)?;
        Self::from_table(doc, env_keys)
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let doc = text.parse::<toml::Table>().map_err(|e| ConfigError::Syntax {
            path: PathBuf::from("<inline>"),
            message: e.to_string(),
        })?;
        Self::from_table(doc, Vec::new())
    }

    fn from_table(doc: toml::Table, env_keys: Vec<(String, String)>) -> Result<Config, ConfigError> {
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
            let key = e.path().to_string();
            blame(
                &env_keys,
                ConfigError::key(
                    if key == "." { "<root>".into() } else { key },
                    e.into_inner().to_string(),
                ),
            )
        })?;
        config.env_keys = env_keys;
        config.validate()?;
        Ok(config)
    }

    /// An error about a key that was set from the environment names the
    /// variable instead (and still the key); any other error is unchanged.
    pub fn blame(&self, error: ConfigError) -> ConfigError {
        blame(&self.env_keys, error)
    }

    /// The config with every password written in a URL replaced by `***`:
    /// what `portcullis check` prints.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        let redact = values::redact_url;
        c.cache.redis.url = redact(&c.cache.redis.url);
        for seed in &mut c.cache.redis.cluster {
            *seed = redact(seed);
        }
        c.upstream.url = redact(&c.upstream.url);
        c.auth.grafana.url = redact(&c.auth.grafana.url);
        for route in &mut c.routes {
            if let Some(u) = &mut route.upstream {
                *u = redact(u);
            }
        }
        c
    }

    /// The upstream that verifies credentials.
    pub fn grafana_url(&self) -> &str {
        if self.auth.grafana.url.is_empty() {
            &self.upstream.url
        } else {
            &self.auth.grafana.url
        }
    }

    /// The config's own rules (what the files it names hold is checked by
    /// [`crate::check`]). [`Config::load`] has already applied them; a config
    /// built in code gets them at [`crate::start`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_rules().map_err(|e| self.blame(e))
    }

    fn check_rules(&self) -> Result<(), ConfigError> {
        values::check_base_url(&self.upstream.url, false).map_err(|reason| {
            ConfigError::key(
                "upstream.url",
                if reason.contains("has a path") {
                    format!(
                        "{reason}: requests reach the upstream with the client's own path, so a path here \
                         would be lost. Give the upstream's root (e.g. http://grafana:3000); for a Grafana \
                         served from a sub path (root_url .../grafana, serve_from_sub_path = true) clients \
                         use that sub path through the gateway and auth.grafana.url names it \
                         (e.g. http://grafana:3000/grafana); or rewrite per route with [[routes]] rewrite"
                    )
                } else {
                    reason
                },
            )
        })?;
        let auth = &self.auth;
        for (key, count, window) in [
            (
                "auth.login_failures",
                auth.login_failures,
                auth.login_failure_window,
            ),
            (
                "auth.client_failures",
                auth.client_failures,
                auth.client_failure_window,
            ),
        ] {
            if count == 0 || window.is_zero() {
                return Err(ConfigError::key(
                    key,
                    "must be at least 1 within a window longer than zero (0 would refuse every new credential)",
                ));
            }
        }
        if auth.known_good_for < self.cache.ttl {
            return Err(ConfigError::key(
                "auth.known_good_for",
                "must be at least cache.ttl: a verified password has to outlive its cache entry",
            ));
        }
        if !self.auth.grafana.url.is_empty() {
            // The verifier puts its calls under this URL's path.
            values::check_base_url(&self.auth.grafana.url, true)
                .map_err(|reason| ConfigError::key("auth.grafana.url", reason))?;
        }
        for (i, route) in self.routes.iter().enumerate() {
            if !route.prefix.starts_with('/') {
                return Err(ConfigError::key(
                    format!("routes[{i}].prefix"),
                    "must start with `/`",
                ));
            }
            if let Some(method) = &route.method {
                http::Method::from_bytes(method.as_bytes())
                    .map_err(|_| ConfigError::key(format!("routes[{i}].method"), "not an HTTP method"))?;
            }
            if let Some(upstream) = &route.upstream {
                values::check_base_url(upstream, false).map_err(|reason| {
                    ConfigError::key(
                        format!("routes[{i}].upstream"),
                        if reason.contains("has a path") {
                            format!(
                                "{reason}: requests reach the upstream with the client's own path; \
                                 give the upstream's root and change the path with `rewrite`"
                            )
                        } else {
                            reason
                        },
                    )
                })?;
            }
            if let Some(rewrite) = &route.rewrite {
                if !rewrite.starts_with('/') {
                    return Err(ConfigError::key(
                        format!("routes[{i}].rewrite"),
                        "must start with `/`",
                    ));
                }
            }
        }
        let ident = &self.identity;
        for (key, name) in [
            ("identity.user_header", &ident.user_header),
            ("identity.role_header", &ident.role_header),
            ("identity.email_header", &ident.email_header),
            ("identity.name_header", &ident.name_header),
            ("identity.org_header", &ident.org_header),
        ] {
            http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ConfigError::key(key, "not a valid header name"))?;
        }
        if self.auth.session_cookie.is_empty()
            || !self
                .auth
                .session_cookie
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"=;,\"".contains(&b))
        {
            return Err(ConfigError::key("auth.session_cookie", "not a valid cookie name"));
        }
        if self.auth.verifier == VerifierKind::Static && self.auth.static_users.is_empty() {
            return Err(ConfigError::key(
                "auth.static_users",
                "the static verifier needs at least one entry",
            ));
        }
        for (i, user) in self.auth.static_users.iter().enumerate() {
            let ok =
                user.secret_sha256.len() == 64 && user.secret_sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !ok {
                return Err(ConfigError::key(
                    format!("auth.static_users[{i}].secret_sha256"),
                    "must be 64 hex digits (sha256 of the secret)",
                ));
            }
        }
        values::check_log_filter(&self.log.level).map_err(|reason| ConfigError::key("log.level", reason))?;
        if self.cache.max_entries == 0 {
            return Err(ConfigError::key("cache.max_entries", "must be at least 1"));
        }
        if self.cache.ttl.is_zero() {
            return Err(ConfigError::key("cache.ttl", "must be more than zero"));
        }
        if self.server.max_connections == 0 {
            return Err(ConfigError::key("server.max_connections", "must be at least 1"));
        }
        if self.server.max_header_bytes < 1024 {
            return Err(ConfigError::key(
                "server.max_header_bytes",
                "must be at least 1024",
            ));
        }
        if self.cache.redis.enabled() {
            redis::Target::parse(&self.cache.redis, self.cache.redis.timeout)
                .map_err(|(key, reason)| ConfigError::key(key, reason))?;
            if self.cache.redis.timeout.is_zero() {
                return Err(ConfigError::key("cache.redis.timeout", "must be more than zero"));
            }
        }
        Ok(())
    }

    /// The effective config as TOML, for `portcullis check`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

/// `error` with the variable named when its key was set from the environment
/// (`server.listen` by `PORTCULLIS_SERVER_LISTEN`, or a part of it such as
/// `server.trusted_proxies[1]`).
fn blame(env_keys: &[(String, String)], error: ConfigError) -> ConfigError {
    let ConfigError::Key { key, reason } = error else {
        return error;
    };
    let set_by = env_keys.iter().find(|(k, _)| {
        key.strip_prefix(k.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    });
    match set_by {
        Some((_, var)) => ConfigError::Env {
            var: var.clone(),
            reason: format!("{reason} (it sets `{key}`)"),
        },
        None => ConfigError::Key { key, reason },
    }
}

/// Durations are written as `"60s"`, `"500ms"`, `"1m 30s"`, or plain seconds;
/// a negative one is refused with the value it was given.
pub mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(Visitor)
    }

    const HINT: &str = "write e.g. \"30s\", \"500ms\", \"1m 30s\" or a number of seconds";

    struct Visitor;

    impl serde::de::Visitor<'_> for Visitor {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a duration: {HINT}")
        }

        fn visit_u64<E: serde::de::Error>(self, secs: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(secs))
        }

        fn visit_i64<E: serde::de::Error>(self, secs: i64) -> Result<Duration, E> {
            match u64::try_from(secs) {
                Ok(secs) => Ok(Duration::from_secs(secs)),
                Err(_) => Err(E::custom(format!(
                    "`{secs}` is negative: a duration is zero or more; {HINT}"
                ))),
            }
        }

        fn visit_f64<E: serde::de::Error>(self, secs: f64) -> Result<Duration, E> {
            Duration::try_from_secs_f64(secs).map_err(|_| {
                E::custom(format!(
                    "`{secs}` is not a duration (zero or more seconds); {HINT}"
                ))
            })
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
            let trimmed = text.trim();
            if trimmed.starts_with('-') {
                return Err(E::custom(format!(
                    "`{text}` is negative: a duration is zero or more; {HINT}"
                )));
            }
            if let Ok(secs) = trimmed.parse::<u64>() {
                return Ok(Duration::from_secs(secs));
            }
            humantime::parse_duration(trimmed)
                .map_err(|e| E::custom(format!("`{text}` is not a duration ({e}); {HINT}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_hold_the_public_contract() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:8443");
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9901");
        assert_eq!(c.tls.cert, PathBuf::from("certs/gateway.crt"));
        assert_eq!(c.tls.key, PathBuf::from("certs/gateway.key"));
        assert_eq!(c.upstream.url, "http://127.0.0.1:3000");
        assert_eq!(c.cache.ttl, Duration::from_secs(60));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[server]\nlisten_on = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server") && err.contains("listen_on"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let err = Config::from_toml("[server]\nlisten = \"nowhere\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.listen"), "{err}");
        let err = Config::from_toml("[cache]\nttl = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache.ttl") && err.contains("soon"), "{err}");
        let err = Config::from_toml("[[routes]]\nprefix = \"x\"\nmin_role = \"Viewer\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("routes[0].prefix"), "{err}");
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.toml");
        let (c, found) = Config::load_if_present(
            &path,
            env(&[
                ("PORTCULLIS_SERVER_LISTEN", "127.0.0.1:1"),
                ("PORTCULLIS_SERVER_ADMIN_LISTEN", "127.0.0.1:2"),
                ("PORTCULLIS_CACHE_REDIS_URL", "redis://127.0.0.1:6379/"),
                ("PORTCULLIS_CACHE_MAX_ENTRIES", "7"),
                ("PORTCULLIS_AUTH_GRAFANA_URL", "http://127.0.0.1:3001"),
                ("PORTCULLIS_CACHE_KEY", "secret-not-config"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert!(!found);
        assert_eq!(c.server.listen.port(), 1);
        assert_eq!(c.server.admin_listen.port(), 2);
        assert_eq!(c.cache.redis.url, "redis://127.0.0.1:6379/");
        assert_eq!(c.cache.max_entries, 7);
        assert_eq!(c.grafana_url(), "http://127.0.0.1:3001");
        assert!(!c.to_toml().contains("secret-not-config"));
    }

    #[test]
    fn unknown_environment_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Config::load_if_present(
            &dir.path().join("x.toml"),
            env(&[("PORTCULLIS_SERVER_LISTN", "1")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("listn"), "{err}");
        let err = Config::load_if_present(&dir.path().join("x.toml"), env(&[("PORTCULLIS_NOPE", "1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("PORTCULLIS_NOPE"), "{err}");
    }

    #[test]
    fn shipped_gateway_toml_is_valid() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.toml")).unwrap();
        Config::from_toml(&text).unwrap();
    }

    fn env_error(pairs: &[(&str, &str)]) -> String {
        let dir = tempfile::tempdir().unwrap();
        match Config::load_if_present(&dir.path().join("none.toml"), env(pairs)) {
            Ok(_) => panic!("{pairs:?} accepted"),
            Err(e) => e.to_string(),
        }
    }

    fn file_error(text: &str) -> String {
        match Config::from_toml(text) {
            Ok(_) => panic!("{text} accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_named_config_file_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        let err = Config::load(&path, env(&[])).unwrap_err();
        assert!(matches!(err, ConfigError::Missing { .. }), "{err}");
        // Named first, before what the environment gets wrong.
        let err = Config::load(&path, env(&[("PORTCULLIS_SERVER_LISTN", "1")])).unwrap_err();
        assert!(matches!(err, ConfigError::Missing { .. }), "{err}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        // The implicit one may be absent.
        let (c, found) = Config::load_if_present(&path, env(&[])).unwrap();
        assert!(!found);
        assert_eq!(c.server.listen.port(), 8443);
        std::fs::write(&path, "[cache]\nttl = \"2m\"\n").unwrap();
        assert_eq!(
            Config::load(&path, env(&[])).unwrap().cache.ttl,
            Duration::from_secs(120)
        );
        assert!(Config::load_if_present(&path, env(&[])).unwrap().1);
    }

    #[test]
    fn environment_errors_name_the_variable() {
        let err = env_error(&[("PORTCULLIS_SERVER_LISTEN", "garbage")]);
        assert!(err.contains("PORTCULLIS_SERVER_LISTEN"), "{err}");
        assert!(err.contains("garbage") && err.contains("IP:PORT"), "{err}");
        let err = env_error(&[("PORTCULLIS_CACHE_TTL", "-5s")]);
        assert!(
            err.contains("PORTCULLIS_CACHE_TTL") && err.contains("negative"),
            "{err}"
        );
        let err = env_error(&[("PORTCULLIS_SERVER_TRUSTED_PROXIES", "10.0.0.0/8,10.300.0.0/16")]);
        assert!(err.contains("PORTCULLIS_SERVER_TRUSTED_PROXIES"), "{err}");
        assert!(err.contains("10.300.0.0/16") && err.contains("CIDR"), "{err}");
        // Rules checked after reading name the variable too.
        let err = env_error(&[("PORTCULLIS_LOG_LEVEL", "verbose")]);
        assert!(
            err.contains("PORTCULLIS_LOG_LEVEL") && err.contains("verbose"),
            "{err}"
        );
        let err = env_error(&[("PORTCULLIS_UPSTREAM_URL", "http://grafana:3000/grafana")]);
        assert!(err.contains("PORTCULLIS_UPSTREAM_URL"), "{err}");
        // The same value from a file names the key.
        let err = file_error("[server]\nlisten = \"garbage\"");
        assert!(err.contains("server.listen") && err.contains("IP:PORT"), "{err}");
    }

    #[test]
    fn lists_from_the_environment_take_commas() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = Config::load_if_present(
            &dir.path().join("none.toml"),
            env(&[
                ("PORTCULLIS_SERVER_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7"),
                ("PORTCULLIS_TLS_HOSTNAMES", "grafana.example.com,grafana"),
                (
                    "PORTCULLIS_CACHE_REDIS_CLUSTER",
                    "redis://10.0.0.1:6379,redis://10.0.0.2:6379",
                ),
                ("PORTCULLIS_CACHE_KEY_FILE", "/etc/portcullis/cache.key"),
            ]),
        )
        .unwrap();
        let nets: Vec<String> = c.server.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.168.1.7/32"]);
        assert_eq!(c.tls.hostnames, ["grafana.example.com", "grafana"]);
        assert_eq!(c.cache.redis.cluster.len(), 2);
        // The TOML form still works, and a string key keeps its text.
        let (c, _) = Config::load_if_present(
            &dir.path().join("none.toml"),
            env(&[
                ("PORTCULLIS_TLS_HOSTNAMES", "[\"a\", \"b\"]"),
                ("PORTCULLIS_AUTH_SESSION_COOKIE", "1234"),
            ]),
        )
        .unwrap();
        assert_eq!(c.tls.hostnames, ["a", "b"]);
        assert_eq!(c.auth.session_cookie, "1234");
    }

    #[test]
    fn weak_values_get_the_value_and_a_hint() {
        let err = file_error("[server]\nlisten = \"localhost:8443\"");
        assert!(
            err.contains("localhost:8443") && err.contains("127.0.0.1"),
            "{err}"
        );
        let err = file_error("[server]\nadmin_listen = \"9901\"");
        assert!(
            err.contains("server.admin_listen") && err.contains("0.0.0.0:9901"),
            "{err}"
        );
        let err = file_error("[server]\ntrusted_proxies = [\"10.0.0.0/33\"]");
        assert!(
            err.contains("server.trusted_proxies") && err.contains("10.0.0.0/33"),
            "{err}"
        );
        assert!(err.contains("CIDR"), "{err}");
        let c = Config::from_toml("[server]\ntrusted_proxies = [\"10.1.2.3\", \"fd00::1\"]").unwrap();
        let nets: Vec<String> = c.server.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.1.2.3/32", "fd00::1/128"]);
        for negative in ["\"-5s\"", "-5", "-0.5"] {
            let err = file_error(&format!("[cache]\nnegative_ttl = {negative}"));
            assert!(
                err.contains("cache.negative_ttl") && err.contains("negative"),
                "{err}"
            );
        }
        let c = Config::from_toml("[cache]\nttl = 90\nnegative_ttl = 0.5").unwrap();
        assert_eq!(c.cache.ttl, Duration::from_secs(90));
        assert_eq!(c.cache.negative_ttl, Duration::from_millis(500));
    }

    #[test]
    fn a_log_level_that_is_no_level_is_refused() {
        let err = file_error("[log]\nlevel = \"verbose\"");
        assert!(err.contains("log.level") && err.contains("verbose"), "{err}");
        Config::from_toml("[log]\nlevel = \"portcullis=debug,warn\"").unwrap();
    }

    #[test]
    fn kubernetes_service_links_do_not_stop_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let links = [
            ("PORTCULLIS_SERVICE_HOST", "10.96.12.7"),
            ("PORTCULLIS_SERVICE_PORT", "8443"),
            ("PORTCULLIS_SERVICE_PORT_HTTPS", "8443"),
            ("PORTCULLIS_PORT", "tcp://10.96.12.7:8443"),
            ("PORTCULLIS_PORT_8443_TCP", "tcp://10.96.12.7:8443"),
            ("PORTCULLIS_PORT_8443_TCP_PROTO", "tcp"),
            ("PORTCULLIS_PORT_8443_TCP_PORT", "8443"),
            ("PORTCULLIS_PORT_8443_TCP_ADDR", "10.96.12.7"),
            ("PORTCULLIS_REDIS_SERVICE_HOST", "10.96.0.9"),
            ("PORTCULLIS_REDIS_PORT_6379_TCP_ADDR", "10.96.0.9"),
        ];
        let (c, _) = Config::load_if_present(&dir.path().join("none.toml"), env(&links)).unwrap();
        assert_eq!(c.server.listen.port(), 8443);
        let mut with_typo = links.to_vec();
        with_typo.push(("PORTCULLIS_SERVER_LISTN", "0.0.0.0:8443"));
        let err = env_error(&with_typo);
        assert!(err.contains("PORTCULLIS_SERVER_LISTN"), "{err}");
    }

    #[test]
    fn upstream_url_with_a_path_is_refused_with_the_way_out() {
        let err = file_error("[upstream]\nurl = \"http://grafana:3000/grafana\"");
        assert!(err.contains("upstream.url") && err.contains("/grafana"), "{err}");
        assert!(err.contains("auth.grafana.url"), "{err}");
        let err = file_error(
            "[[routes]]\nprefix = \"/x\"\nmin_role = \"Viewer\"\nupstream = \"http://other:3000/x\"",
        );
        assert!(
            err.contains("routes[0].upstream") && err.contains("rewrite"),
            "{err}"
        );
        // The root, with or without its slash, and a verifier under a sub path are fine.
        Config::from_toml("[upstream]\nurl = \"http://grafana:3000/\"").unwrap();
        let c = Config::from_toml(
            "[upstream]\nurl = \"http://grafana:3000\"\n[auth.grafana]\nurl = \"http://grafana:3000/grafana\"",
        )
        .unwrap();
        assert_eq!(c.grafana_url(), "http://grafana:3000/grafana");
    }

    #[test]
    fn the_printed_config_holds_no_password() {
        let c = Config::from_toml(
            "[cache.redis]\nurl = \"redis://:s3cret-pw@10.0.0.1:6379/0\"\ncluster = [\"redis://u:other-pw@10.0.0.2:6379\"]",
        )
        .unwrap();
        let printed = c.redacted().to_toml();
        assert!(
            !printed.contains("s3cret-pw") && !printed.contains("other-pw"),
            "{printed}"
        );
        assert!(printed.contains("redis://:***@10.0.0.1:6379/0"), "{printed}");
        // Still a config that loads.
        Config::from_toml(&printed).unwrap();
    }
}

//! `gateway.toml` plus `PORTCULLIS_<SECTION>_<KEY>` overrides, validated once at
//! start so that every later module can trust what it is handed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::auth::Role;

/// Environment variable that carries the cache HMAC key itself (not a path).
/// It is a secret, so it never becomes part of the printable config.
pub const CACHE_KEY_ENV: &str = "PORTCULLIS_CACHE_KEY";
const ENV_PREFIX: &str = "PORTCULLIS_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Peers whose `X-Forwarded-*` headers are believed.
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
    pub user_header: String,
    pub role_header: String,
    pub email_header: String,
    pub name_header: String,
    pub org_header: String,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
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
}

fn yes() -> bool {
    true
}

impl Config {
    /// Reads `path` if it exists (built-in defaults otherwise), applies the
    /// environment and validates the result.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut doc = match std::fs::read_to_string(path) {
            Ok(text) => text.parse::<toml::Table>().map_err(|e| ConfigError::Syntax {
                path: path.to_owned(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        apply_env(&mut doc, env)?;
        Self::from_table(doc)
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let doc = text.parse::<toml::Table>().map_err(|e| ConfigError::Syntax {
            path: PathBuf::from("<inline>"),
            message: e.to_string(),
        })?;
        Self::from_table(doc)
    }

    fn from_table(doc: toml::Table) -> Result<Config, ConfigError> {
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::key(
                if key == "." { "<root>".into() } else { key },
                e.into_inner().to_string(),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The upstream that verifies credentials.
    pub fn grafana_url(&self) -> &str {
        if self.auth.grafana.url.is_empty() {
            &self.upstream.url
        } else {
            &self.auth.grafana.url
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_http_url("upstream.url", &self.upstream.url)?;
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
            check_http_url("auth.grafana.url", &self.auth.grafana.url)?;
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
                check_http_url(&format!("routes[{i}].upstream"), upstream)?;
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
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::key("log.level", format!("not a log filter: {e}")));
        }
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
            crate::cache::shared::Target::parse(&self.cache.redis, self.cache.redis.timeout)
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

fn check_http_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| ConfigError::key(key, format!("not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(ConfigError::key(key, "scheme must be http or https")),
    }
    if uri.authority().is_none() {
        return Err(ConfigError::key(key, "needs a host"));
    }
    Ok(())
}

/// Sections whose keys may be overridden from the environment, longest first so
/// that `CACHE_REDIS_URL` is `cache.redis.url`, not `cache.redis_url`.
const ENV_SECTIONS: &[&[&str]] = &[
    &["cache", "redis"],
    &["auth", "grafana"],
    &["server"],
    &["tls"],
    &["upstream"],
    &["log"],
    &["auth"],
    &["identity"],
    &["cache"],
];

fn apply_env(
    doc: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if var == CACHE_KEY_ENV {
            continue;
        }
        let rest = rest.to_ascii_lowercase();
        let found = ENV_SECTIONS.iter().find_map(|section| {
            let joined = section.join("_");
            rest.strip_prefix(&joined)
                .and_then(|k| k.strip_prefix('_'))
                .filter(|k| !k.is_empty())
                .map(|k| (*section, k.to_owned()))
        });
        let Some((section, key)) = found else {
            return Err(ConfigError::Env {
                var,
                reason: "does not name a config key (PORTCULLIS_<SECTION>_<KEY>)".into(),
            });
        };
        let mut table = &mut *doc;
        for name in section {
            let entry = table
                .entry(name.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
                var: var.clone(),
                reason: format!("`{name}` in the config file is not a table"),
            })?;
        }
        table.insert(key, env_value(&raw));
    }
    Ok(())
}

/// An environment value is read as a TOML value when it is one (numbers,
/// booleans, arrays), else as a plain string.
fn env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

/// Durations are written as `"60s"`, `"500ms"`, `"1m 30s"`, or plain seconds.
pub mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => humantime::parse_duration(&t).map_err(|e| {
                serde::de::Error::custom(format!(
                    "`{t}` is not a duration ({e}); write e.g. \"30s\" or \"500ms\""
                ))
            }),
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
        let c = Config::load(
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
        let err = Config::load(
            &dir.path().join("x.toml"),
            env(&[("PORTCULLIS_SERVER_LISTN", "1")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("listn"), "{err}");
        let err = Config::load(&dir.path().join("x.toml"), env(&[("PORTCULLIS_NOPE", "1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("PORTCULLIS_NOPE"), "{err}");
    }

    #[test]
    fn shipped_gateway_toml_is_valid() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.toml")).unwrap();
        Config::from_toml(&text).unwrap();
    }
}

//! Route table and path normalisation.
//!
//! Matching happens on one canonical spelling of the path, and that same
//! spelling is what the upstream receives: whatever the gateway decided about a
//! path is what the upstream acts on, so no encoding trick can split the two.

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;

use crate::auth::Role;
use crate::config::{Profile, RouteConfig};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("request target must be an absolute path")]
    NotAbsolute,
    #[error("path contains a NUL or control byte")]
    ControlByte,
    #[error("path is not valid percent-encoding")]
    BadEscape,
}

/// A path that is percent-decoded, free of dot-segments and repeated slashes.
/// `decoded` is used for matching; `encoded` is what is sent upstream. A path
/// that needs no change (nearly every one) is borrowed, not copied twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath<'a> {
    pub decoded: Cow<'a, str>,
    pub encoded: Cow<'a, str>,
}

/// Characters that must stay escaped in a path sent upstream after decoding.
const PATH_ESCAPE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|');

pub fn normalise(raw_path: &str) -> Result<NormalPath<'_>, PathError> {
    if !raw_path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // Fast path: nothing to decode and nothing to clean (the common case).
    let clean = !raw_path.contains('%')
        && !raw_path.contains("//")
        && !raw_path.split('/').any(|s| s == "." || s == "..")
        && !raw_path
            .bytes()
            .any(|b| b.is_ascii_control() || b == b'\\' || b >= 0x80);
    if clean {
        return Ok(NormalPath {
            decoded: Cow::Borrowed(raw_path),
            encoded: Cow::Borrowed(raw_path),
        });
    }
    let bytes = decode_percent(raw_path.as_bytes())?;
    if bytes.iter().any(|b| *b == 0 || b.is_ascii_control()) {
        return Err(PathError::ControlByte);
    }
    // Non-UTF-8 bytes are kept as their lossy form for matching; the encoded
    // form re-escapes exactly the bytes we decoded, so the upstream sees the
    // same segments we matched.
    let decoded_all = String::from_utf8_lossy(&bytes).into_owned();
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded_all.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded_all.ends_with('/') || decoded_all.ends_with("/.") || decoded_all.ends_with("/..");
    let mut decoded = String::with_capacity(decoded_all.len());
    for s in &segments {
        decoded.push('/');
        decoded.push_str(s);
    }
    if decoded.is_empty() || (trailing && !decoded.ends_with('/')) {
        decoded.push('/');
    }
    let mut encoded = String::with_capacity(decoded.len() + 8);
    for (i, s) in decoded.split('/').enumerate() {
        if i > 0 {
            encoded.push('/');
        }
        encoded.extend(percent_encoding::utf8_percent_encode(s, PATH_ESCAPE));
    }
    Ok(NormalPath {
        decoded: Cow::Owned(decoded),
        encoded: Cow::Owned(encoded),
    })
}

fn decode_percent(input: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            let hex = input.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
            let hi = (hex[0] as char).to_digit(16).ok_or(PathError::BadEscape)?;
            let lo = (hex[1] as char).to_digit(16).ok_or(PathError::BadEscape)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(input[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// What the gateway does with requests under one prefix.
#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    pub method: Option<Method>,
    pub host: Option<String>,
    pub min_role: Role,
    /// Where matching requests go instead of `upstream.url`.
    pub upstream: Option<http::Uri>,
    pub rewrite: Option<String>,
    pub forward_credentials: bool,
    pub inject_identity: bool,
    /// Leads to Grafana, which checks credentials itself.
    pub grafana: bool,
}

impl Route {
    fn from_config(c: &RouteConfig, profile: Profile) -> Result<Route, String> {
        let upstream = match &c.upstream {
            Some(u) => Some(u.parse::<http::Uri>().map_err(|e| e.to_string())?),
            None => None,
        };
        let method = match &c.method {
            Some(m) => {
                Some(Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        Ok(Route {
            prefix: normalise(&c.prefix)
                .map_err(|e| e.to_string())?
                .decoded
                .into_owned(),
            method,
            host: c.host.as_ref().map(|h| h.to_ascii_lowercase()),
            min_role: c.min_role,
            upstream,
            rewrite: c.rewrite.clone(),
            forward_credentials: c.forward_credentials,
            inject_identity: c.inject_identity,
            grafana: c.grafana.unwrap_or_else(|| leads_to_grafana(profile, c)),
        })
    }

    /// Path sent upstream: the normalised path with a rewritten prefix.
    pub fn upstream_path<'a>(&self, path: &'a str) -> std::borrow::Cow<'a, str> {
        match &self.rewrite {
            Some(rewrite) => {
                let rest = path.get(self.prefix.trim_end_matches('/').len()..).unwrap_or("");
                std::borrow::Cow::Owned(format!("{}{}", rewrite.trim_end_matches('/'), rest))
            }
            None => std::borrow::Cow::Borrowed(path),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouteTable {
    /// Sorted most specific first: longest prefix, then host-bound, then
    /// method-bound, so the first match is the answer.
    routes: Arc<[Route]>,
    /// Answer for a path no rule covers.
    fallback: Route,
}

impl RouteTable {
    pub fn build(profile: Profile, extra: &[RouteConfig]) -> Result<RouteTable, crate::config::ConfigError> {
        let mut configs = profile_routes(profile);
        // Rules from the file win over the profile's rule at the same place.
        for c in extra {
            configs.retain(|p| !(p.prefix == c.prefix && p.method == c.method && p.host == c.host));
        }
        configs.extend(extra.iter().cloned());
        let mut routes = Vec::with_capacity(configs.len());
        for (i, c) in configs.iter().enumerate() {
            routes.push(Route::from_config(c, profile).map_err(|reason| {
                crate::config::ConfigError::Key {
                    key: format!("routes[{i}]"),
                    reason,
                }
            })?);
        }
        routes.sort_by(|a, b| {
            b.prefix
                .trim_end_matches('/')
                .len()
                .cmp(&a.prefix.trim_end_matches('/').len())
                .then(b.host.is_some().cmp(&a.host.is_some()))
                .then(b.method.is_some().cmp(&a.method.is_some()))
        });
        let fallback_role = match profile {
            Profile::Pmm => Role::GrafanaAdmin,
            Profile::Grafana | Profile::Custom => Role::Viewer,
        };
        Ok(RouteTable {
            routes: routes.into(),
            fallback: Route {
                prefix: "/".into(),
                method: None,
                host: None,
                min_role: fallback_role,
                upstream: None,
                rewrite: None,
                forward_credentials: true,
                inject_identity: true,
                // PMM's unmatched paths are pmm-managed's; elsewhere the
                // fallback goes to `upstream.url`, Grafana.
                grafana: profile != Profile::Pmm,
            },
        })
    }

    /// Every upstream a rule names (besides `upstream.url`).
    pub fn upstreams(&self) -> impl Iterator<Item = &http::Uri> {
        self.routes.iter().filter_map(|r| r.upstream.as_ref())
    }

    /// `path` must come from [`normalise`]; `host` lower-cased without port.
    pub fn lookup(&self, method: &Method, host: Option<&str>, path: &str) -> &Route {
        self.routes
            .iter()
            .find(|r| {
                prefix_matches(&r.prefix, path)
                    && r.method.as_ref().is_none_or(|m| m == method)
                    && r.host.as_deref().is_none_or(|h| Some(h) == host)
            })
            .unwrap_or(&self.fallback)
    }
}

/// Whole-segment prefix match: `/v1/inventory` covers `/v1/inventory` and
/// `/v1/inventory/x`, never `/v1/inventoryx`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Lower-cased host without port, from the authority or `Host` header.
pub fn normalise_host(raw: &str) -> String {
    let host = if let Some(stripped) = raw.strip_prefix('[') {
        stripped.split(']').next().unwrap_or(stripped)
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                raw
            }
        })
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn rule(prefix: &str, min_role: Role) -> RouteConfig {
    RouteConfig::rule(prefix, min_role)
}

fn alias(method: &str, prefix: &str, to: &str) -> RouteConfig {
    RouteConfig {
        method: Some(method.into()),
        rewrite: Some(to.into()),
        ..rule(prefix, Role::None)
    }
}

/// Where a rule's requests go when it does not say: Grafana behind
/// `upstream.url`, except in PMM, where Grafana is `/graph` (and the login
/// flow) and the rest is pmm-managed, VictoriaMetrics and friends.
fn leads_to_grafana(profile: Profile, c: &RouteConfig) -> bool {
    if c.upstream.is_some() {
        return false;
    }
    match profile {
        Profile::Grafana | Profile::Custom => true,
        Profile::Pmm => {
            let prefix = c.prefix.trim_end_matches('/');
            ["/graph", "/login", "/logout", "/api/login", "/api/logout"]
                .iter()
                .any(|p| prefix == *p || prefix.starts_with(&format!("{p}/")))
        }
    }
}

/// The built-in tables (documented in `gateway.toml`).
fn profile_routes(profile: Profile) -> Vec<RouteConfig> {
    // The seed documents write `/api/login` and `/api/logout`; Grafana serves
    // `/login` and `/logout`.
    let login_flow = vec![
        alias("POST", "/api/login", "/login"),
        alias("GET", "/api/logout", "/logout"),
        rule("/login", Role::None),
        rule("/logout", Role::None),
        rule("/public", Role::None),
        rule("/api/health", Role::None),
    ];
    match profile {
        Profile::Custom => Vec::new(),
        Profile::Grafana => login_flow,
        Profile::Pmm => {
            let mut routes = login_flow;
            for p in ["/graph", "/v1/readyz", "/v1/server/readyz", "/ping"] {
                routes.push(rule(p, Role::None));
            }
            for p in [
                "/v1/version",
                "/v1/server/version",
                "/v1/qan",
                "/v1/alerting",
                "/v1/users",
                "/swagger",
            ] {
                routes.push(rule(p, Role::Viewer));
            }
            for p in ["/v1/advisors", "/v1/alerting/rules"] {
                routes.push(rule(p, Role::Editor));
            }
            for p in [
                "/v1/inventory",
                "/v1/management",
                "/v1/server/settings",
                "/v1/backups",
                "/prometheus",
                "/victoriametrics",
            ] {
                routes.push(rule(p, Role::Admin));
            }
            routes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> String {
        normalise(p).unwrap().decoded.into_owned()
    }

    #[test]
    fn normalises_tricks() {
        assert_eq!(n("/v1/server/x/..%2f..%2finventory/"), "/v1/inventory/");
        assert_eq!(n("/a/../admin"), "/admin");
        assert_eq!(n("//admin"), "/admin");
        assert_eq!(n("/%2e%2e/admin"), "/admin");
        assert_eq!(n("/x/%2E%2e/admin"), "/admin");
        assert_eq!(n("/api%2Fadmin"), "/api/admin");
        assert_eq!(n("/../../"), "/");
        assert_eq!(n("/a/./b/."), "/a/b/");
        assert_eq!(n("/plain/path"), "/plain/path");
        assert_eq!(normalise("relative"), Err(PathError::NotAbsolute));
        assert_eq!(normalise("/a%00"), Err(PathError::ControlByte));
        assert_eq!(normalise("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalise("/a%2"), Err(PathError::BadEscape));
    }

    #[test]
    fn encoded_form_keeps_decoded_meaning() {
        let p = normalise("/a%20b/%253f").unwrap();
        assert_eq!(p.decoded, "/a b/%3f");
        assert_eq!(p.encoded, "/a%20b/%253f");
        let p = normalise("/x%3Fy").unwrap();
        assert_eq!(p.encoded, "/x%3Fy");
    }

    #[test]
    fn pmm_table() {
        let t = RouteTable::build(Profile::Pmm, &[]).unwrap();
        let get = Method::GET;
        let role = |p: &str| t.lookup(&get, None, &n(p)).min_role;
        assert_eq!(role("/v1/version"), Role::Viewer);
        assert_eq!(role("/v1/alerting/rules/x"), Role::Editor);
        assert_eq!(role("/v1/alerting/x"), Role::Viewer);
        assert_eq!(role("/v1/server/x/..%2f..%2finventory/nodes"), Role::Admin);
        assert_eq!(role("/v1/inventoryx"), Role::GrafanaAdmin);
        assert_eq!(role("/ping"), Role::None);
        assert_eq!(role("/unknown"), Role::GrafanaAdmin);
    }

    #[test]
    fn method_rule_beats_plain_rule() {
        let extra = vec![
            rule("/api/things", Role::Viewer),
            RouteConfig {
                method: Some("DELETE".into()),
                ..rule("/api/things", Role::Admin)
            },
        ];
        let t = RouteTable::build(Profile::Custom, &extra).unwrap();
        assert_eq!(
            t.lookup(&Method::GET, None, "/api/things/1").min_role,
            Role::Viewer
        );
        assert_eq!(
            t.lookup(&Method::DELETE, None, "/api/things/1").min_role,
            Role::Admin
        );
    }

    #[test]
    fn rewrite_keeps_the_rest() {
        let t = RouteTable::build(Profile::Grafana, &[]).unwrap();
        let r = t.lookup(&Method::POST, None, "/api/login");
        assert_eq!(r.upstream_path("/api/login"), "/login");
        let r = t.lookup(&Method::GET, None, "/api/login");
        assert_eq!(r.min_role, Role::Viewer);
    }

    #[test]
    fn hosts() {
        assert_eq!(normalise_host("Grafana.Example.COM:8443"), "grafana.example.com");
        assert_eq!(normalise_host("[::1]:443"), "::1");
        assert_eq!(normalise_host("LOCALHOST."), "localhost");
    }
}

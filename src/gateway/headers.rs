//! Header hygiene: the headers clients may not send (removed in every
//! spelling before anything reads the request), the identity headers
//! injected towards the upstream, and cookies.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::auth::credential::go_cookie;
use crate::auth::Identity;
use crate::config::Config;

/// Header names the gateway injects, compared in every spelling.
pub(super) struct InjectedHeaders {
    pub(super) user: HeaderName,
    pub(super) role: HeaderName,
    pub(super) email: HeaderName,
    pub(super) name: HeaderName,
    pub(super) org: HeaderName,
    /// Grafana's `[auth.proxy] shared_secret`, and the header it travels in.
    pub(super) secret: Option<(HeaderName, HeaderValue)>,
    /// `identity.send_role`.
    pub(super) send_role: bool,
    /// Folded forms (lower case, `_` as `-`) of every name clients may not send.
    pub(super) spoofable: Vec<Vec<u8>>,
    /// Also folded, dropped only when the peer is not a trusted proxy.
    pub(super) forwarded: Vec<Vec<u8>>,
}

pub(super) fn fold(name: &[u8]) -> Vec<u8> {
    name.iter()
        .map(|b| if *b == b'_' { b'-' } else { b.to_ascii_lowercase() })
        .collect()
}

pub(super) fn folded_eq(name: &[u8], folded: &[u8]) -> bool {
    name.len() == folded.len()
        && name
            .iter()
            .zip(folded)
            .all(|(a, b)| (if *a == b'_' { b'-' } else { a.to_ascii_lowercase() }) == *b)
}

impl InjectedHeaders {
    pub(super) fn from_config(config: &Config) -> Result<InjectedHeaders, crate::Error> {
        let parse = |n: &str| {
            HeaderName::from_bytes(n.as_bytes()).map_err(|_| crate::config::ConfigError::Key {
                key: "identity".into(),
                reason: format!("`{n}` is not a header name"),
            })
        };
        let i = &config.identity;
        let names = [
            parse(&i.user_header)?,
            parse(&i.role_header)?,
            parse(&i.email_header)?,
            parse(&i.name_header)?,
            parse(&i.org_header)?,
        ];
        let secret_header = parse(&i.secret_header)?;
        let secret = match &i.shared_secret_file {
            Some(path) => {
                let bad = |reason: String| crate::config::ConfigError::Key {
                    key: "identity.shared_secret_file".into(),
                    reason,
                };
                let text = std::fs::read_to_string(path)
                    .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
                let mut value = HeaderValue::from_str(text.trim())
                    .ok()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| bad(format!("{} holds no usable secret", path.display())))?;
                value.set_sensitive(true);
                Some((secret_header.clone(), value))
            }
            None => None,
        };
        let spoofable = names
            .iter()
            .chain(std::iter::once(&secret_header))
            .map(|n| fold(n.as_str().as_bytes()))
            .collect();
        let forwarded = [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "forwarded",
            "x-real-ip",
        ]
        .iter()
        .map(|n| fold(n.as_bytes()))
        .collect();
        let [user, role, email, name, org] = names;
        Ok(InjectedHeaders {
            user,
            role,
            email,
            name,
            org,
            secret,
            send_role: i.send_role,
            spoofable,
            forwarded,
        })
    }

    /// Removes every incoming copy of an injected header (and, from untrusted
    /// peers, of the forwarding headers), whatever its spelling.
    pub(super) fn strip(&self, headers: &mut HeaderMap, trusted_peer: bool) {
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|name| {
                let bytes = name.as_str().as_bytes();
                self.spoofable.iter().any(|f| folded_eq(bytes, f))
                    || (!trusted_peer && self.forwarded.iter().any(|f| folded_eq(bytes, f)))
            })
            .cloned()
            .collect();
        for name in doomed {
            headers.remove(name);
        }
    }

    /// The identity headers for `identity` in `org_id`. The role only when
    /// the operator asked for it and the user has one org: Grafana syncs a
    /// role header into one org and removes the user from every other.
    pub(super) fn inject(&self, headers: &mut HeaderMap, identity: &Identity, org_id: i64) {
        let names = [&self.user, &self.role, &self.email, &self.name, &self.org];
        let with_role = self.send_role && !identity.is_multi_org();
        for (name, value) in names.into_iter().zip(identity.header_values(org_id)) {
            if let Some(value) = value.filter(|_| with_role || name != self.role) {
                headers.insert(name.clone(), value);
            }
        }
    }

    /// Towards Grafana's `[auth.proxy]`: the identity, with the shared
    /// secret when one is configured.
    pub(super) fn inject_for_auth_proxy(&self, headers: &mut HeaderMap, identity: &Identity, org_id: i64) {
        self.inject(headers, identity, org_id);
        // Grafana syncs a role header into its `auto_assign_org_id` (1 by
        // default), whatever org the user is in: a user outside it would be
        // moved there and dropped from its own org.
        if identity.role_in(1).is_none() {
            headers.remove(&self.role);
        }
        if let Some((name, value)) = &self.secret {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// Rewrites `Path=<sub_path>` in every `Set-Cookie` to `Path=/` (what PMM's
/// nginx does with `proxy_cookie_path`).
pub(super) fn widen_cookie_paths(headers: &mut HeaderMap, sub_path: &str) {
    if !headers.contains_key(header::SET_COOKIE) {
        return;
    }
    let cookies: Vec<HeaderValue> = headers.get_all(header::SET_COOKIE).iter().cloned().collect();
    headers.remove(header::SET_COOKIE);
    for cookie in cookies {
        let rewritten = cookie.to_str().ok().and_then(|text| {
            let mut changed = false;
            let parts: Vec<String> = text
                .split(';')
                .enumerate()
                .map(|(i, part)| {
                    // The first part is the cookie itself, whatever its name.
                    match part.trim().split_once('=').filter(|_| i > 0) {
                        Some((name, value))
                            if name.trim().eq_ignore_ascii_case("path")
                                && value.trim().trim_end_matches('/') == sub_path =>
                        {
                            changed = true;
                            " Path=/".to_owned()
                        }
                        _ => part.to_owned(),
                    }
                })
                .collect();
            changed
                .then(|| HeaderValue::from_str(&parts.join(";")).ok())
                .flatten()
        });
        headers.append(header::SET_COOKIE, rewritten.unwrap_or(cookie));
    }
}

/// Removes one cookie from every `Cookie` header, keeping the others as Go
/// reads them (the gateway read the session cookie the same way).
pub(super) fn remove_cookie(headers: &mut HeaderMap, name: &str) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter(|part| go_cookie(part).is_some_and(|(n, _)| n != name))
        .map(|part| part.trim().to_owned())
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(header::COOKIE, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_every_spelling() {
        let config = Config::default();
        let injected = InjectedHeaders::from_config(&config).unwrap();
        let mut h = HeaderMap::new();
        for name in [
            "x-webauth-user",
            "x_webauth_user",
            "X_WEBAUTH_Role",
            "x-webauth-org-id",
            "x-forwarded-for",
        ] {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("admin"),
            );
        }
        h.insert("x-other", HeaderValue::from_static("1"));
        injected.strip(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        injected.strip(&mut h, true);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn removes_only_the_session_cookie() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; grafana_session=abc; b=2"),
        );
        remove_cookie(&mut h, "grafana_session");
        assert_eq!(h[header::COOKIE], "a=1; b=2");
    }
}

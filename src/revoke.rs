//! Which management calls change what a cached identity says (GRAFANA.md's
//! table), and so what must be forgotten when one succeeds.

use http::Method;

use crate::auth::{AuthMethod, Identity, Principal, PrincipalKind};

/// What a successful management call invalidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// The credential of the request itself (its own session ended).
    Caller,
    /// Every credential of one principal.
    Principal(Principal),
    /// Every credential of one kind (the call does not say whose).
    Method(AuthMethod),
}

/// Looks at a request that the upstream answered with 2xx. `path` is the
/// normalised path sent upstream; PMM serves Grafana under `/graph`.
pub fn revocation_for(method: &Method, path: &str, caller: Option<&Identity>) -> Vec<Revocation> {
    let path = path
        .strip_prefix("/graph")
        .filter(|p| p.starts_with('/'))
        .unwrap_or(path);
    // Asked after every successful request: the segments go on the stack.
    // No pattern below is longer than five, so a longer path matches none.
    let mut parts = [""; 6];
    let mut len = 0;
    for part in path.trim_matches('/').split('/') {
        let Some(slot) = parts.get_mut(len) else {
            return Vec::new();
        };
        *slot = part;
        len += 1;
    }
    let segments = &parts[..len];
    let id = |s: &str| s.parse::<i64>().ok();
    let user = |s: &str| {
        id(s).map(|id| {
            Revocation::Principal(Principal {
                kind: PrincipalKind::User,
                id,
            })
        })
    };
    let service_account = |s: &str| {
        id(s).map(|id| {
            Revocation::Principal(Principal {
                kind: PrincipalKind::ServiceAccount,
                id,
            })
        })
    };
    let caller_principal = || caller.map(|c| Revocation::Principal(c.principal));
    let m = method.as_str();
    let found: Option<Revocation> = match (m, segments) {
        // Keys: Grafana's key id is never told to us at verification time.
        ("DELETE", ["api", "auth", "keys", _]) => {
            return vec![
                Revocation::Method(AuthMethod::ApiKey),
                Revocation::Principal(Principal {
                    kind: PrincipalKind::ApiKey,
                    id: 0,
                }),
            ]
        }
        ("DELETE", ["api", "serviceaccounts", sa]) => service_account(sa),
        ("PATCH", ["api", "serviceaccounts", sa]) => service_account(sa),
        ("DELETE", ["api", "serviceaccounts", sa, "tokens", _]) => service_account(sa),
        ("GET", ["logout"]) | ("GET", ["api", "logout"]) => Some(Revocation::Caller),
        ("POST", ["api", "user", "auth-tokens", "rotate"]) => Some(Revocation::Caller),
        // Which session was revoked is in the body; dropping all of the
        // user's cached credentials is cheap and never wrong.
        ("POST", ["api", "user", "revoke-auth-token"]) => caller_principal(),
        ("PUT", ["api", "user", "password"]) => caller_principal(),
        ("POST", ["api", "admin", "users", u, "logout"])
        | ("POST", ["api", "admin", "users", u, "revoke-auth-token"])
        | ("POST", ["api", "admin", "users", u, "disable"])
        | ("PUT", ["api", "admin", "users", u, "password"])
        | ("PUT", ["api", "admin", "users", u, "permissions"])
        | ("DELETE", ["api", "admin", "users", u])
        | ("PATCH", ["api", "org", "users", u])
        | ("DELETE", ["api", "org", "users", u])
        | ("PATCH", ["api", "orgs", _, "users", u])
        | ("DELETE", ["api", "orgs", _, "users", u]) => user(u),
        _ => None,
    };
    found.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let sa = |id| {
            vec![Revocation::Principal(Principal {
                kind: PrincipalKind::ServiceAccount,
                id,
            })]
        };
        assert_eq!(
            revocation_for(&Method::DELETE, "/api/serviceaccounts/7/tokens/3", None),
            sa(7)
        );
        assert_eq!(
            revocation_for(&Method::DELETE, "/graph/api/serviceaccounts/7", None),
            sa(7)
        );
        assert_eq!(
            revocation_for(&Method::GET, "/logout", None),
            vec![Revocation::Caller]
        );
        assert_eq!(revocation_for(&Method::DELETE, "/api/auth/keys/3", None).len(), 2);
        assert_eq!(
            revocation_for(&Method::PATCH, "/api/org/users/4", None),
            vec![Revocation::Principal(Principal {
                kind: PrincipalKind::User,
                id: 4
            })]
        );
        assert!(revocation_for(&Method::GET, "/api/serviceaccounts/7", None).is_empty());
        assert!(revocation_for(&Method::DELETE, "/api/serviceaccounts/x", None).is_empty());
        assert!(revocation_for(&Method::DELETE, "/api/serviceaccounts/7/tokens/3/x/y", None).is_empty());
        assert_eq!(
            revocation_for(&Method::DELETE, "/graph/api/orgs/1/users/9/", None),
            vec![Revocation::Principal(Principal {
                kind: PrincipalKind::User,
                id: 9
            })]
        );
    }
}

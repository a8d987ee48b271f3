//! Which management calls change what a cached identity says (docs/grafana.md,
//! "Management endpoints"), and so what must be forgotten when one succeeds.

use http::Method;

use crate::auth::{AuthMethod, Identity, Principal, PrincipalKind};

/// What a successful management call invalidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// The credential of the request itself (its own session ended).
    Caller,
    /// The caller's session token, rotated away from: Grafana still takes
    /// it for a while, so it is verified on each use instead of cached.
    RetireCaller,
    /// Every credential of one principal.
    Principal(Principal),
    /// Every credential of one kind (the call does not say whose).
    Method(AuthMethod),
}

/// A call that changes what cached identities say, recognised before it is
/// forwarded (so that the caller can be identified first, even on a route
/// that needs no credential) and applied after Grafana said 2xx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagementCall {
    /// `DELETE /api/auth/keys/:id`: Grafana never tells a key's id at
    /// verification time, so every key goes.
    DeleteKey,
    /// Changes or ends one service account or one of its tokens.
    ServiceAccount(i64),
    /// Ends the caller's own session (`/logout`).
    EndSession,
    /// Rotates the caller's session token. Grafana reads the cookie itself
    /// and the browser cannot sign in without it, so it reaches Grafana
    /// whatever the route table says.
    RotateSession,
    /// Changes what the caller's own credentials say: one of their sessions
    /// revoked (which one is in the body), their password, their current org.
    CallerUser,
    /// Changes one user, named in the path.
    User(i64),
}

impl ManagementCall {
    /// Recognises a call by method and the normalised path sent upstream;
    /// PMM serves Grafana under `/graph`.
    pub fn recognise(method: &Method, path: &str) -> Option<ManagementCall> {
        let path = path
            .strip_prefix("/graph")
            .filter(|p| p.starts_with('/'))
            .unwrap_or(path);
        // Asked for every request: the segments go on the stack. No pattern
        // below is longer than five, so a longer path matches none.
        let mut parts = [""; 6];
        let mut len = 0;
        for part in path.trim_matches('/').split('/') {
            let slot = parts.get_mut(len)?;
            *slot = part;
            len += 1;
        }
        let id = |s: &str| s.parse::<i64>().ok();
        use ManagementCall as C;
        match (method.as_str(), &parts[..len]) {
            ("DELETE", ["api", "auth", "keys", _]) => Some(C::DeleteKey),
            ("DELETE", ["api", "serviceaccounts", sa])
            | ("PATCH", ["api", "serviceaccounts", sa])
            | ("DELETE", ["api", "serviceaccounts", sa, "tokens", _]) => id(sa).map(C::ServiceAccount),
            ("GET", ["logout"]) | ("GET", ["api", "logout"]) => Some(C::EndSession),
            // The frontend's call, and the page redirect Grafana sends a
            // browser to when a page load finds the token due.
            ("POST", ["api", "user", "auth-tokens", "rotate"])
            | ("GET", ["user", "auth-tokens", "rotate"]) => Some(C::RotateSession),
            ("POST", ["api", "user", "revoke-auth-token"])
            | ("PUT", ["api", "user", "password"])
            | ("POST", ["api", "user", "using", _]) => Some(C::CallerUser),
            ("POST", ["api", "admin", "users", u, "logout"])
            | ("POST", ["api", "admin", "users", u, "revoke-auth-token"])
            | ("POST", ["api", "admin", "users", u, "disable"])
            | ("PUT", ["api", "admin", "users", u, "password"])
            | ("PUT", ["api", "admin", "users", u, "permissions"])
            | ("DELETE", ["api", "admin", "users", u])
            | ("PATCH", ["api", "org", "users", u])
            | ("DELETE", ["api", "org", "users", u])
            | ("PATCH", ["api", "orgs", _, "users", u])
            | ("DELETE", ["api", "orgs", _, "users", u]) => id(u).map(C::User),
            _ => None,
        }
    }

    /// Whether what the call revokes depends on who is calling.
    pub fn needs_caller(self) -> bool {
        self == ManagementCall::CallerUser
    }

    /// What a 2xx answer to the call revokes. `caller` is who made it, when
    /// known; without it a caller-scoped call revokes nothing it can name.
    pub fn revocations(self, caller: Option<&Identity>) -> Vec<Revocation> {
        let principal = |kind, id| Revocation::Principal(Principal { kind, id });
        match self {
            ManagementCall::DeleteKey => vec![
                Revocation::Method(AuthMethod::ApiKey),
                principal(PrincipalKind::ApiKey, 0),
            ],
            ManagementCall::ServiceAccount(id) => vec![principal(PrincipalKind::ServiceAccount, id)],
            ManagementCall::EndSession => vec![Revocation::Caller],
            ManagementCall::RotateSession => vec![Revocation::RetireCaller],
            // Dropping all of the user's cached credentials is cheap and
            // never wrong.
            ManagementCall::CallerUser => caller
                .map(|c| Revocation::Principal(c.principal))
                .into_iter()
                .collect(),
            ManagementCall::User(id) => vec![principal(PrincipalKind::User, id)],
        }
    }
}

/// Grafana's calls that read the session cookie themselves, whatever else
/// authenticated the request: login, logout, the session list (which marks
/// the current one), revoking one of them, rotation. Towards `[auth.proxy]`
/// these go with the cookie, not as a proxy identity: the proxy client would
/// win, and logout would then not end the session.
pub fn reads_session_cookie(path: &str) -> bool {
    let path = path
        .strip_prefix("/graph")
        .filter(|p| p.starts_with('/'))
        .unwrap_or(path)
        .trim_end_matches('/');
    matches!(
        path,
        "/login"
            | "/logout"
            | "/api/user/auth-tokens"
            | "/api/user/auth-tokens/rotate"
            | "/api/user/revoke-auth-token"
            | "/user/auth-tokens/rotate"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revocation_for(method: &Method, path: &str, caller: Option<&Identity>) -> Vec<Revocation> {
        ManagementCall::recognise(method, path).map_or_else(Vec::new, |call| call.revocations(caller))
    }

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
        assert_eq!(
            ManagementCall::recognise(&Method::POST, "/graph/api/user/auth-tokens/rotate"),
            Some(ManagementCall::RotateSession)
        );
        assert_eq!(
            ManagementCall::recognise(&Method::GET, "/user/auth-tokens/rotate"),
            Some(ManagementCall::RotateSession)
        );
        assert!(
            ManagementCall::recognise(&Method::POST, "/graph/api/user/revoke-auth-token")
                .is_some_and(ManagementCall::needs_caller)
        );
        assert_eq!(
            revocation_for(&Method::PUT, "/graph/api/user/password", None),
            vec![]
        );
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

//! Grafana as the judge: asks the upstream Grafana who a credential belongs to,
//! using only the header that carries it (docs/grafana.md, "Asking Grafana who
//! a credential is").

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, COOKIE};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{
    AuthMethod, Credential, DenyReason, GrafanaRefusal, Identity, IdentityRecord, OrgRole, Principal,
    PrincipalKind, Role, Verdict, VerifyError,
};
use crate::config::{Config, GrafanaFlavor};
use crate::http::error_chain;
use crate::upstream::{self, Connector};

/// Largest identity answer read from Grafana.
const MAX_ANSWER_BYTES: usize = 256 * 1024;

const FLAVOR_UNKNOWN: u8 = 0;
const FLAVOR_PMM: u8 = 1;
const FLAVOR_VANILLA: u8 = 2;

pub struct GrafanaVerifier {
    client: Client<Connector, Empty<Bytes>>,
    base: String,
    timeout: Duration,
    /// What the upstream turned out to be (auto-detected once).
    flavor: AtomicU8,
    admin_authorization: Option<HeaderValue>,
    default_role: Role,
    session_cookie: String,
    warned_default_role: AtomicBool,
    warned_unnamed: AtomicBool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GrafanaUser {
    id: i64,
    #[serde(default)]
    email: String,
    #[serde(default)]
    name: String,
    login: String,
    org_id: i64,
    #[serde(default)]
    is_grafana_admin: bool,
    #[serde(default)]
    is_disabled: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UserOrg {
    org_id: i64,
    role: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceAccount {
    id: i64,
    #[serde(default)]
    name: String,
    #[serde(default)]
    login: String,
    #[serde(default)]
    org_id: i64,
    #[serde(default)]
    role: String,
    #[serde(default)]
    is_disabled: bool,
}

#[derive(Deserialize)]
struct Org {
    id: i64,
}

/// Grafana's answer to one identity call.
enum Answer<T> {
    Ok(T),
    /// 401, with Grafana's own answer when it names a `messageId`.
    Refused(Option<GrafanaRefusal>),
    NotFound,
    /// 403 on an endpoint the token may not use (vanilla: users only).
    Forbidden,
}

impl GrafanaVerifier {
    pub fn from_config(config: &Config) -> Result<GrafanaVerifier, crate::Error> {
        let mut upstream = config.upstream.clone();
        upstream.connect_timeout = upstream.connect_timeout.min(config.auth.grafana.timeout);
        let connector = upstream::connector(&upstream)?;
        let admin_authorization = match &config.auth.grafana.admin_token_file {
            Some(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| crate::config::ConfigError::Key {
                    key: "auth.grafana.admin_token_file".into(),
                    reason: format!("cannot read {}: {e}", path.display()),
                })?;
                let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| {
                    crate::config::ConfigError::Key {
                        key: "auth.grafana.admin_token_file".into(),
                        reason: "does not hold a token".into(),
                    }
                })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        if config.auth.grafana.flavor == GrafanaFlavor::Vanilla && admin_authorization.is_none() {
            tracing::warn!(
                "auth.grafana.admin_token_file is not set: the roles of service-account tokens cannot be read \
                 from vanilla Grafana, so tokens are judged as auth.grafana.token_default_role"
            );
        }
        let flavor = match config.auth.grafana.flavor {
            GrafanaFlavor::Auto => FLAVOR_UNKNOWN,
            GrafanaFlavor::Pmm => FLAVOR_PMM,
            GrafanaFlavor::Vanilla => FLAVOR_VANILLA,
        };
        Ok(GrafanaVerifier {
            client: upstream::client(&upstream, connector),
            base: config.grafana_url().trim_end_matches('/').to_owned(),
            timeout: config.auth.grafana.timeout,
            flavor: AtomicU8::new(flavor),
            admin_authorization,
            default_role: config.auth.grafana.token_default_role,
            session_cookie: config.auth.session_cookie.clone(),
            warned_default_role: AtomicBool::new(false),
            warned_unnamed: AtomicBool::new(false),
        })
    }

    pub async fn verify(&self, credential: &Credential) -> Result<Verdict, VerifyError> {
        match tokio::time::timeout(self.timeout, self.ask(credential)).await {
            Ok(result) => result,
            Err(_) => Err(VerifyError::Timeout),
        }
    }

    async fn ask(&self, credential: &Credential) -> Result<Verdict, VerifyError> {
        let presented = match credential.grafana_authorization() {
            Some(auth) => (AUTHORIZATION, auth),
            None => {
                let Credential::Session { token } = credential else {
                    return Ok(Verdict::Denied(DenyReason::Invalid));
                };
                let mut cookie = HeaderValue::from_str(&format!("{}={token}", self.session_cookie))
                    .map_err(|_| VerifyError::Unreachable("session cookie not representable".into()))?;
                cookie.set_sensitive(true);
                (COOKIE, cookie)
            }
        };
        let method = match credential {
            Credential::Password { .. } => AuthMethod::Password,
            Credential::Session { .. } => AuthMethod::Session,
            Credential::ApiKey { .. } => AuthMethod::ApiKey,
            Credential::ServiceToken { .. } => AuthMethod::ServiceToken,
        };
        match method {
            AuthMethod::Password | AuthMethod::Session => self.user_identity(&presented, method).await,
            AuthMethod::ApiKey | AuthMethod::ServiceToken => self.token_identity(&presented, method).await,
        }
    }

    /// Users and sessions: `/api/user`, then the role from `/api/user/orgs`.
    /// Sequential on purpose: a wrong password must count once towards
    /// Grafana's lock-out, not twice.
    async fn user_identity(
        &self,
        presented: &(http::HeaderName, HeaderValue),
        method: AuthMethod,
    ) -> Result<Verdict, VerifyError> {
        let user: GrafanaUser = match self.get("/api/user", presented).await? {
            Answer::Ok(u) => u,
            // The browser's frontend acts on Grafana's own answer (a session
            // due for rotation); every other refusal gets the plain one.
            Answer::Refused(Some(refusal)) if method == AuthMethod::Session => {
                return Ok(Verdict::Denied(DenyReason::Grafana(refusal)))
            }
            Answer::Refused(_) | Answer::Forbidden => return Ok(Verdict::Denied(DenyReason::Invalid)),
            Answer::NotFound => {
                return Err(VerifyError::Upstream {
                    status: 404,
                    path: "/api/user",
                })
            }
        };
        if user.is_disabled {
            return Ok(Verdict::Denied(DenyReason::Disabled));
        }
        let orgs: Vec<UserOrg> = match self.get("/api/user/orgs", presented).await? {
            Answer::Ok(o) => o,
            Answer::Refused(_) | Answer::Forbidden => return Ok(Verdict::Denied(DenyReason::Invalid)),
            Answer::NotFound => {
                return Err(VerifyError::Upstream {
                    status: 404,
                    path: "/api/user/orgs",
                })
            }
        };
        let org_role = orgs
            .iter()
            .find(|o| o.org_id == user.org_id)
            .map_or(Role::None, |o| Role::from_grafana(&o.role));
        let other_orgs: Vec<OrgRole> = orgs
            .iter()
            .filter(|o| o.org_id != user.org_id)
            .map(|o| OrgRole {
                org_id: o.org_id,
                role: Role::from_grafana(&o.role),
            })
            .collect();
        Ok(Verdict::Allowed(Box::new(Identity::from(IdentityRecord {
            principal: Principal {
                kind: PrincipalKind::User,
                id: user.id,
            },
            login: user.login.into(),
            email: user.email.into(),
            name: user.name.into(),
            org_id: user.org_id,
            org_role,
            other_orgs: other_orgs.into(),
            grafana_admin: user.is_grafana_admin,
            method,
            verified_at_ms: 0,
            expires_at_ms: 0,
        }))))
    }

    /// Tokens and keys: PMM names the service account in one call; vanilla
    /// Grafana needs `/api/user` (11.x) or `/api/org` (10.4), and an admin
    /// credential to learn the role.
    async fn token_identity(
        &self,
        presented: &(http::HeaderName, HeaderValue),
        method: AuthMethod,
    ) -> Result<Verdict, VerifyError> {
        if self.flavor.load(Ordering::Relaxed) != FLAVOR_VANILLA {
            match self
                .get::<Option<ServiceAccount>>("/api/auth/serviceaccount", presented)
                .await?
            {
                Answer::Ok(Some(sa)) => {
                    if sa.is_disabled {
                        return Ok(Verdict::Denied(DenyReason::Disabled));
                    }
                    self.flavor.store(FLAVOR_PMM, Ordering::Relaxed);
                    let login = if sa.login.is_empty() {
                        sa.name.clone()
                    } else {
                        sa.login
                    };
                    let mut found = identity(
                        Principal {
                            kind: PrincipalKind::ServiceAccount,
                            id: sa.id,
                        },
                        login,
                        String::new(),
                        sa.name,
                        sa.org_id,
                        Role::from_grafana(&sa.role),
                        false,
                        method,
                    );
                    found.expires_at_ms = self.earliest_token_expiry(found.principal).await.unwrap_or(0);
                    return Ok(Verdict::Allowed(found));
                }
                // A valid credential that is not a service account (a legacy
                // key on an older PMM): learn what vanilla Grafana tells.
                Answer::Ok(None) => {}
                Answer::Refused(_) | Answer::Forbidden => return Ok(Verdict::Denied(DenyReason::Invalid)),
                Answer::NotFound => {
                    if self.flavor.swap(FLAVOR_VANILLA, Ordering::Relaxed) != FLAVOR_VANILLA {
                        tracing::info!(
                            "upstream Grafana has no /api/auth/serviceaccount: using vanilla token checks"
                        );
                    }
                }
            }
        }
        let (principal, login, name, org_id) = match self.get::<GrafanaUser>("/api/user", presented).await? {
            // 11.x names the service account behind the token.
            Answer::Ok(user) => {
                if user.is_disabled {
                    return Ok(Verdict::Denied(DenyReason::Disabled));
                }
                (
                    Principal {
                        kind: PrincipalKind::ServiceAccount,
                        id: user.id,
                    },
                    user.login,
                    user.name,
                    user.org_id,
                )
            }
            Answer::Refused(_) => return Ok(Verdict::Denied(DenyReason::Invalid)),
            // 10.4 refuses tokens there; `/api/org` still proves validity.
            Answer::Forbidden | Answer::NotFound => match self.get::<Org>("/api/org", presented).await? {
                Answer::Ok(org) => {
                    if !self.warned_unnamed.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "this Grafana does not name the account behind a token (10.4): tokens and keys are \
                             forwarded with their credential only, never as an identity, and judged against \
                             routes as auth.grafana.token_default_role"
                        );
                    }
                    (
                        Principal {
                            kind: if method == AuthMethod::ApiKey {
                                PrincipalKind::ApiKey
                            } else {
                                PrincipalKind::ServiceAccount
                            },
                            id: 0,
                        },
                        String::from("service-account"),
                        String::new(),
                        org.id,
                    )
                }
                Answer::Refused(_) | Answer::Forbidden => return Ok(Verdict::Denied(DenyReason::Invalid)),
                Answer::NotFound => {
                    return Err(VerifyError::Upstream {
                        status: 404,
                        path: "/api/org",
                    })
                }
            },
        };
        let role = self.token_role(principal).await?;
        let mut found = identity(principal, login, String::new(), name, org_id, role, false, method);
        found.expires_at_ms = self.earliest_token_expiry(principal).await.unwrap_or(0);
        Ok(Verdict::Allowed(found))
    }

    /// A token must not outlive its own expiry in the cache. Grafana does not
    /// say which of an account's tokens was presented, so with an admin
    /// credential the earliest expiry among the account's live tokens is used:
    /// never later than the presented token's own.
    async fn earliest_token_expiry(&self, principal: Principal) -> Option<u64> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct TokenInfo {
            #[serde(default)]
            seconds_until_expiration: Option<f64>,
            #[serde(default)]
            has_expired: bool,
            #[serde(default)]
            is_revoked: bool,
        }
        let admin = self.admin_authorization.as_ref()?;
        if principal.kind != PrincipalKind::ServiceAccount || principal.id <= 0 {
            return None;
        }
        let path = format!("/api/serviceaccounts/{}/tokens", principal.id);
        let Ok(Answer::Ok(tokens)) = self
            .get_path::<Vec<TokenInfo>>(&path, &(AUTHORIZATION, admin.clone()))
            .await
        else {
            return None;
        };
        let now = super::identity::now_ms();
        tokens
            .iter()
            .filter(|t| !t.has_expired && !t.is_revoked)
            .filter_map(|t| t.seconds_until_expiration)
            .filter(|s| *s > 0.0)
            .map(|s| now.saturating_add((s * 1000.0) as u64))
            .min()
    }

    /// The role of a vanilla token: read with the admin credential when there
    /// is one, else the configured default (said once in the log).
    async fn token_role(&self, principal: Principal) -> Result<Role, VerifyError> {
        if let (Some(admin), true) = (&self.admin_authorization, principal.id > 0) {
            let path = format!("/api/serviceaccounts/{}", principal.id);
            match self
                .get_path::<ServiceAccount>(&path, &(AUTHORIZATION, admin.clone()))
                .await?
            {
                Answer::Ok(sa) => return Ok(Role::from_grafana(&sa.role)),
                _ => tracing::warn!(
                    account = principal.id,
                    "admin credential could not read the service account's role"
                ),
            }
        }
        if !self.warned_default_role.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                role = %self.default_role,
                "token roles cannot be learned from this Grafana; using auth.grafana.token_default_role"
            );
        }
        Ok(self.default_role)
    }

    async fn get<T: DeserializeOwned>(
        &self,
        path: &'static str,
        presented: &(http::HeaderName, HeaderValue),
    ) -> Result<Answer<T>, VerifyError> {
        self.get_path(path, presented).await.map_err(|e| match e {
            VerifyError::Upstream { status, .. } => VerifyError::Upstream { status, path },
            VerifyError::Malformed { reason, .. } => VerifyError::Malformed { path, reason },
            other => other,
        })
    }

    async fn get_path<T: DeserializeOwned>(
        &self,
        path: &str,
        presented: &(http::HeaderName, HeaderValue),
    ) -> Result<Answer<T>, VerifyError> {
        let uri: Uri = format!("{}{path}", self.base)
            .parse()
            .map_err(|e: http::uri::InvalidUri| VerifyError::Unreachable(e.to_string()))?;
        let request = Request::get(uri)
            .header(ACCEPT, "application/json")
            .header(presented.0.clone(), presented.1.clone())
            .body(Empty::new())
            .map_err(|e| VerifyError::Unreachable(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| VerifyError::Unreachable(error_chain(&e)))?;
        let status = response.status();
        match status {
            StatusCode::UNAUTHORIZED => {
                let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                return Ok(Answer::Refused(grafana_refusal(status, body)));
            }
            StatusCode::FORBIDDEN => return Ok(Answer::Forbidden),
            StatusCode::NOT_FOUND => return Ok(Answer::NotFound),
            s if s.is_success() => {}
            s => {
                return Err(VerifyError::Upstream {
                    status: s.as_u16(),
                    path: "?",
                })
            }
        }
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| VerifyError::Unreachable(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&body)
            .map(Answer::Ok)
            .map_err(|e| VerifyError::Malformed {
                path: "?",
                reason: e.to_string(),
            })
    }
}

/// Grafana's 401 as its frontend reads it: a JSON object with a `messageId`.
fn grafana_refusal(status: StatusCode, body: Bytes) -> Option<GrafanaRefusal> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Authn {
        message_id: String,
    }
    let authn: Authn = serde_json::from_slice(&body).ok()?;
    (!authn.message_id.is_empty()).then(|| GrafanaRefusal {
        status,
        body,
        message_id: authn.message_id.into_boxed_str(),
    })
}

#[allow(clippy::too_many_arguments)]
fn identity(
    principal: Principal,
    login: String,
    email: String,
    name: String,
    org_id: i64,
    org_role: Role,
    grafana_admin: bool,
    method: AuthMethod,
) -> Box<Identity> {
    Box::new(Identity::from(IdentityRecord {
        principal,
        login: login.into(),
        email: email.into(),
        name: name.into(),
        org_id,
        org_role,
        other_orgs: Default::default(),
        grafana_admin,
        method,
        verified_at_ms: 0,
        expires_at_ms: 0,
    }))
}

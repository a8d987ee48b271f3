//! What a verified credential says about its holder. This is what the caches
//! hold (in memory and in Redis): never the secret itself.

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::role::Role;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PrincipalKind {
    User,
    ServiceAccount,
    /// A legacy API key whose owner Grafana did not name.
    ApiKey,
}

/// Whose credential it is: what a revocation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Principal {
    pub kind: PrincipalKind,
    /// Grafana's id; 0 when Grafana did not tell.
    pub id: i64,
}

/// A user's role in one organisation other than its current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgRole {
    pub org_id: i64,
    pub role: Role,
}

/// How the request proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AuthMethod {
    Password,
    ApiKey,
    ServiceToken,
    Session,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Password => "password",
            AuthMethod::ApiKey => "api_key",
            AuthMethod::ServiceToken => "service_token",
            AuthMethod::Session => "session",
        }
    }
}

/// A verified identity, as the caches hold it: fixed fields inline and the
/// three strings (login, email, name) packed into one allocation. A full L1
/// holds a hundred thousand of these, and three separate `String`s would cost
/// three allocations and 72 bytes of string headers for each of them
/// (`examples/cache_memory.rs`: 294 bytes per identity packed, 412 unpacked).
#[derive(Clone)]
pub struct Identity {
    pub principal: Principal,
    pub org_id: i64,
    /// Milliseconds since the epoch; wall-clock so replicas agree.
    pub verified_at_ms: u64,
    pub expires_at_ms: u64,
    /// `login`, `email` and `name`, back to back.
    text: Box<str>,
    login_end: usize,
    email_end: usize,
    /// Role in the current org.
    pub org_role: Role,
    /// Memberships besides the current org: empty for most users (no
    /// allocation) and always for tokens and keys, which have one org.
    other_orgs: Box<[OrgRole]>,
    pub grafana_admin: bool,
    pub method: AuthMethod,
}

/// An identity's fields one by one: what verifiers fill in, and the JSON that
/// Redis holds (borrowed when read, so packing costs no extra copies).
#[derive(Debug, Serialize, Deserialize)]
pub struct IdentityRecord<'a> {
    pub principal: Principal,
    #[serde(borrow)]
    pub login: Cow<'a, str>,
    #[serde(borrow)]
    pub email: Cow<'a, str>,
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    pub org_id: i64,
    pub org_role: Role,
    /// Every other org the user belongs to (absent in older entries).
    #[serde(default, skip_serializing_if = "<[OrgRole]>::is_empty")]
    pub other_orgs: Cow<'a, [OrgRole]>,
    pub grafana_admin: bool,
    pub method: AuthMethod,
    pub verified_at_ms: u64,
    pub expires_at_ms: u64,
}

impl From<IdentityRecord<'_>> for Identity {
    fn from(record: IdentityRecord<'_>) -> Identity {
        let mut text = String::with_capacity(record.login.len() + record.email.len() + record.name.len());
        text.push_str(&record.login);
        let login_end = text.len();
        text.push_str(&record.email);
        let email_end = text.len();
        text.push_str(&record.name);
        Identity {
            principal: record.principal,
            org_id: record.org_id,
            verified_at_ms: record.verified_at_ms,
            expires_at_ms: record.expires_at_ms,
            text: text.into_boxed_str(),
            login_end,
            email_end,
            org_role: record.org_role,
            other_orgs: record
                .other_orgs
                .iter()
                .filter(|o| o.org_id != record.org_id)
                .copied()
                .collect(),
            grafana_admin: record.grafana_admin,
            method: record.method,
        }
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.record().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Identity, D::Error> {
        IdentityRecord::deserialize(d).map(Identity::from)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.record().fmt(f)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Identity {
    pub fn login(&self) -> &str {
        &self.text[..self.login_end]
    }

    pub fn email(&self) -> &str {
        &self.text[self.login_end..self.email_end]
    }

    pub fn name(&self) -> &str {
        &self.text[self.email_end..]
    }

    /// The fields one by one, borrowed.
    pub fn record(&self) -> IdentityRecord<'_> {
        IdentityRecord {
            principal: self.principal,
            login: Cow::Borrowed(self.login()),
            email: Cow::Borrowed(self.email()),
            name: Cow::Borrowed(self.name()),
            org_id: self.org_id,
            org_role: self.org_role,
            other_orgs: Cow::Borrowed(&self.other_orgs),
            grafana_admin: self.grafana_admin,
            method: self.method,
            verified_at_ms: self.verified_at_ms,
            expires_at_ms: self.expires_at_ms,
        }
    }

    /// The level used against a route's minimum: Grafana admins pass every
    /// route, as in PMM's auth server.
    pub fn effective_role(&self) -> Role {
        if self.grafana_admin {
            Role::GrafanaAdmin
        } else {
            self.org_role
        }
    }

    /// The role in `org_id`; `None` when the holder is not a member (a token
    /// or key belongs to its one org only).
    pub fn role_in(&self, org_id: i64) -> Option<Role> {
        if org_id == self.org_id {
            return Some(self.org_role);
        }
        self.other_orgs
            .iter()
            .find(|o| o.org_id == org_id)
            .map(|o| o.role)
    }

    /// A person (password or session), who can be an `[auth.proxy]` user;
    /// tokens and keys cannot.
    pub fn is_user(&self) -> bool {
        self.principal.kind == PrincipalKind::User
            && matches!(self.method, AuthMethod::Password | AuthMethod::Session)
    }

    /// Whether the user belongs to more than one org.
    pub fn is_multi_org(&self) -> bool {
        !self.other_orgs.is_empty()
    }

    /// Whether Grafana named the account behind the credential. Vanilla
    /// Grafana 10.4 does not for a token (`/api/user` refuses it), so every
    /// such token looks the same and must not be turned into one identity.
    pub fn is_named(&self) -> bool {
        self.principal.id != 0
    }

    pub fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms < self.expires_at_ms
    }

    /// Stamps the verification time and expiry (TTL from now, or sooner).
    pub fn stamp(&mut self, ttl: Duration, own_expiry_ms: Option<u64>) {
        let now = now_ms();
        self.verified_at_ms = now;
        let by_ttl = now.saturating_add(ttl.as_millis() as u64);
        self.expires_at_ms = own_expiry_ms.map_or(by_ttl, |e| e.min(by_ttl));
    }

    /// Values of the identity headers (user, role, email, name, org), made per
    /// request: keeping them ready would double the memory of every cached
    /// identity for a saving of a few small copies.
    /// `org_id` is the org the request runs in (the current one unless the
    /// request selected another).
    pub fn header_values(&self, org_id: i64) -> [Option<HeaderValue>; 5] {
        let text = |s: &str| {
            (!s.is_empty())
                .then(|| HeaderValue::from_bytes(s.as_bytes()).ok())
                .flatten()
        };
        [
            text(self.login()),
            // Grafana's auth proxy takes org roles only.
            Some(HeaderValue::from_static(
                self.role_in(org_id).unwrap_or(Role::None).as_str(),
            )),
            text(self.email()),
            text(self.name()),
            Some(HeaderValue::from(org_id)),
        ]
    }

    pub fn remaining(&self, now_ms: u64) -> Duration {
        Duration::from_millis(self.expires_at_ms.saturating_sub(now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_order_and_parse() {
        assert!(Role::GrafanaAdmin > Role::Admin && Role::Admin > Role::Editor);
        assert!(Role::Editor > Role::Viewer && Role::Viewer > Role::None);
        assert_eq!(Role::from_grafana("Admin"), Role::Admin);
        assert_eq!(Role::from_grafana("Read Only Editor"), Role::None);
        let r: Role = serde_json::from_str("\"viewer\"").unwrap();
        assert_eq!(r, Role::Viewer);
        assert!(serde_json::from_str::<Role>("\"root\"").is_err());
    }

    #[test]
    fn packed_strings_round_trip_through_json() {
        let identity = Identity::from(IdentityRecord {
            principal: Principal {
                kind: PrincipalKind::User,
                id: 3,
            },
            login: "zoë".into(),
            email: "".into(),
            name: "Zoë \"Z\" Ñandú".into(),
            org_id: 2,
            org_role: Role::Editor,
            other_orgs: vec![OrgRole {
                org_id: 5,
                role: Role::Viewer,
            }]
            .into(),
            grafana_admin: true,
            method: AuthMethod::Session,
            verified_at_ms: 5,
            expires_at_ms: 9,
        });
        assert_eq!(
            (identity.login(), identity.email(), identity.name()),
            ("zoë", "", "Zoë \"Z\" Ñandú")
        );
        let json = serde_json::to_string(&identity).unwrap();
        assert!(
            json.contains(r#""login":"zoë","email":"","name":"Zoë \"Z\" Ñandú""#),
            "{json}"
        );
        let back: Identity = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        assert_eq!(
            (back.principal, back.org_role, back.expires_at_ms),
            (identity.principal, Role::Editor, 9)
        );
    }
}

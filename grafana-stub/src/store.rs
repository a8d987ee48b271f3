//! Grafana's state in memory: organisations, users and their memberships,
//! service accounts, the
//! `api_key` table (legacy keys and service-account tokens share it, as in
//! Grafana), session tokens and failed-login attempts. Plain data and
//! synchronous operations; the callers hold the lock briefly and never across
//! a PBKDF2 computation.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::credentials::{self, LegacyKey, SaToken};

/// The org every fresh Grafana has, where new users land
/// (`auto_assign_org_id`).
pub const ORG_ID: i64 = 1;
pub const ORG_NAME: &str = "Main Org.";

/// Sessions die after 7 days without rotation or 30 days after login
/// (Grafana's `login_maximum_inactive_lifetime_duration` and
/// `login_maximum_lifetime_duration`). How often they must be rotated is
/// `StubOptions::rotation_interval` (Grafana's `token_rotation_interval_minutes`).
pub const MAX_INACTIVE_SECS: i64 = 7 * 86_400;
pub const MAX_LIFETIME_SECS: i64 = 30 * 86_400;

/// Grafana's `usertoken.UrgentRotateTime`: a token the server has not seen in
/// use yet (just created or just rotated) must be rotated after one minute.
/// Also how far `LookupToken` moves `rotated_at` back when a superseded token
/// turns up after its successor was seen.
pub const URGENT_ROTATE_SECS: i64 = 60;

/// Grafana's `usertoken.rotationLeeway`: `grafana_session_expiry` (the
/// frontend's "rotate before this") is the rotation time minus five seconds.
pub const ROTATION_LEEWAY_SECS: i64 = 5;

/// Brute-force protection: this many failures in the window lock a username.
pub const MAX_LOGIN_ATTEMPTS: usize = 5;
pub const LOGIN_ATTEMPT_WINDOW_SECS: i64 = 5 * 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    None,
    Viewer,
    Editor,
    Admin,
}

impl Role {
    /// Grafana's `RoleType.IsValid`: exact spelling only.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "None" => Some(Role::None),
            "Viewer" => Some(Role::Viewer),
            "Editor" => Some(Role::Editor),
            "Admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::None => "None",
            Role::Viewer => "Viewer",
            Role::Editor => "Editor",
            Role::Admin => "Admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub uid: String,
    pub login: String,
    pub email: String,
    pub name: String,
    pub salt: String,
    pub password_hash: String,
    /// `user.org_id`: the current org, used when a request names none (and
    /// what `/api/user` reports as `orgId`); changed by
    /// `POST /api/user/using/:orgId`.
    pub org_id: i64,
    /// `org_user` rows: the user's role in each org it belongs to.
    pub orgs: BTreeMap<i64, Role>,
    pub grafana_admin: bool,
    pub disabled: bool,
    pub created: i64,
    pub updated: i64,
}

#[derive(Debug, Clone)]
pub struct ServiceAccount {
    pub id: i64,
    pub uid: String,
    pub name: String,
    pub login: String,
    pub org_id: i64,
    pub role: Role,
    pub disabled: bool,
    pub created: i64,
    pub updated: i64,
}

/// A row of Grafana's `api_key` table.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: i64,
    pub org_id: i64,
    pub name: String,
    pub hash: String,
    /// Only meaningful for a key that belongs to no service account.
    pub role: Role,
    pub created: i64,
    pub expires: Option<i64>,
    pub last_used: Option<i64>,
    pub service_account_id: Option<i64>,
    /// A legacy `eyJrIjoi…` key (looked up by name) rather than a `glsa_`
    /// token (looked up by hash); a migrated key is legacy and has an account.
    pub legacy: bool,
    pub is_revoked: bool,
}

impl ApiKey {
    pub fn has_expired(&self, now: i64) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// A row of Grafana's `user_auth_token` table
/// (`pkg/services/auth/authimpl/auth_token.go`).
#[derive(Debug, Clone)]
pub struct Session {
    pub id: i64,
    pub user_id: i64,
    /// `auth_token`: hash of the current cookie value.
    pub token_hash: String,
    /// `prev_auth_token`: hash of the value before the last rotation (the
    /// current one itself until the first rotation, as `CreateToken` writes).
    pub prev_token_hash: String,
    /// `auth_token_seen`: the current value has been used at least once.
    pub seen: bool,
    /// `seen_at`: when the current value was first used (0: not yet).
    pub seen_at: i64,
    pub created: i64,
    pub rotated_at: i64,
    pub client_ip: String,
    pub user_agent: String,
}

impl Session {
    pub fn expired(&self, now: i64) -> bool {
        self.created <= now - MAX_LIFETIME_SECS || self.rotated_at <= now - MAX_INACTIVE_SECS
    }

    /// Grafana's `UserToken.NeedsRotation`: a token seen in use must be
    /// rotated once `interval` has passed since the last rotation; one never
    /// seen (the browser did not pick it up) after `URGENT_ROTATE_SECS`.
    /// Grafana compares Unix seconds with the sub-second clock, which makes
    /// the boundary second inclusive, as here.
    pub fn needs_rotation(&self, now: i64, interval_secs: i64) -> bool {
        let limit = if self.seen {
            interval_secs
        } else {
            URGENT_ROTATE_SECS
        };
        self.rotated_at <= now - limit
    }

    /// Value of the `grafana_session_expiry` cookie, Grafana's
    /// `UserToken.NextRotation`: `rotated_at + interval - 5 s`, in Unix seconds.
    pub fn next_rotation(&self, interval_secs: i64) -> i64 {
        self.rotated_at + interval_secs - ROTATION_LEEWAY_SECS
    }
}

/// Why `LookupToken` found no usable session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupError {
    /// `auth.ErrUserTokenNotFound`: no row has this hash (revoked sessions
    /// are deleted, as Grafana's hard revoke does).
    NotFound,
    /// `auth.TokenExpiredError` (unwraps to `ErrInvalidSessionToken`).
    Expired,
}

/// A row of Grafana's `org` table.
#[derive(Debug, Clone)]
pub struct Org {
    pub name: String,
}

#[derive(Debug)]
pub enum Conflict {
    Exists,
}

#[derive(Debug, Default)]
pub struct Store {
    /// Users and service accounts share one id space, as they share
    /// Grafana's `user` table.
    next_user_id: i64,
    next_key_id: i64,
    next_session_id: i64,
    next_org_id: i64,
    pub orgs: BTreeMap<i64, Org>,
    pub users: BTreeMap<i64, User>,
    pub service_accounts: BTreeMap<i64, ServiceAccount>,
    pub keys: BTreeMap<i64, ApiKey>,
    pub sessions: BTreeMap<i64, Session>,
    /// Failed logins per lower-cased username (unix seconds).
    attempts: HashMap<String, Vec<i64>>,
}

/// Grafana's service-account login: `sa-` + the name, lower case, spaces as `-`.
pub fn service_account_login(name: &str) -> String {
    let slug: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_whitespace() {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    format!("sa-{slug}")
}

fn new_uid() -> String {
    credentials::random_alphanumeric(14).to_ascii_lowercase()
}

impl Store {
    /// A fresh Grafana: the main org and nothing else.
    pub fn new() -> Store {
        let mut orgs = BTreeMap::new();
        orgs.insert(
            ORG_ID,
            Org {
                name: ORG_NAME.to_owned(),
            },
        );
        Store {
            next_user_id: 1,
            next_key_id: 1,
            next_session_id: 1,
            next_org_id: ORG_ID + 1,
            orgs,
            ..Store::default()
        }
    }

    // ---- orgs ---------------------------------------------------------------

    /// Org names are unique in Grafana ("Organization name taken").
    pub fn add_org(&mut self, name: &str) -> Result<i64, Conflict> {
        if self.orgs.values().any(|o| o.name.eq_ignore_ascii_case(name)) {
            return Err(Conflict::Exists);
        }
        let id = self.next_org_id;
        self.next_org_id += 1;
        self.orgs.insert(
            id,
            Org {
                name: name.to_owned(),
            },
        );
        Ok(id)
    }

    pub fn org_name(&self, org_id: i64) -> Option<&str> {
        self.orgs.get(&org_id).map(|o| o.name.as_str())
    }

    /// Adds the user to the org with `role`, or changes its role there. A
    /// user that belongs to no org yet gets it as its current org.
    pub fn set_org_member(&mut self, org_id: i64, user_id: i64, role: Role) -> bool {
        if !self.orgs.contains_key(&org_id) {
            return false;
        }
        let Some(user) = self.users.get_mut(&user_id) else {
            return false;
        };
        user.orgs.insert(org_id, role);
        if !user.orgs.contains_key(&user.org_id) {
            user.org_id = org_id;
        }
        true
    }

    /// Grafana's `RemoveOrgUser` as `DELETE /api/org/users/:id` runs it: the
    /// membership goes; a user left in no org is deleted (returns `true`);
    /// one removed from its current org moves to another of its orgs.
    pub fn remove_org_member(&mut self, org_id: i64, user_id: i64) -> bool {
        let Some(user) = self.users.get_mut(&user_id) else {
            return false;
        };
        user.orgs.remove(&org_id);
        if user.orgs.is_empty() {
            self.delete_user(user_id);
            return true;
        }
        if user.org_id == org_id {
            user.org_id = user.orgs.keys().next().copied().unwrap_or(0);
        }
        false
    }

    pub fn org_admin_count(&self, org_id: i64) -> usize {
        self.users
            .values()
            .filter(|u| u.orgs.get(&org_id) == Some(&Role::Admin))
            .count()
    }

    fn take_user_id(&mut self) -> i64 {
        let id = self.next_user_id;
        self.next_user_id += 1;
        id
    }

    fn take_key_id(&mut self) -> i64 {
        let id = self.next_key_id;
        self.next_key_id += 1;
        id
    }

    // ---- users -------------------------------------------------------------

    /// Adds a user whose password hash was computed by the caller.
    #[allow(clippy::too_many_arguments)]
    pub fn insert_user(
        &mut self,
        login: &str,
        email: &str,
        name: &str,
        salt: String,
        password_hash: String,
        role: Role,
        grafana_admin: bool,
        now: i64,
    ) -> Result<i64, Conflict> {
        let email = if email.is_empty() { login } else { email };
        let clash = |u: &User| {
            u.login.eq_ignore_ascii_case(login)
                || u.email.eq_ignore_ascii_case(email)
                || u.login.eq_ignore_ascii_case(email)
        };
        if self.users.values().any(clash)
            || self
                .service_accounts
                .values()
                .any(|s| s.login.eq_ignore_ascii_case(login))
        {
            return Err(Conflict::Exists);
        }
        let id = self.take_user_id();
        self.users.insert(
            id,
            User {
                id,
                uid: new_uid(),
                login: login.to_owned(),
                email: email.to_owned(),
                name: name.to_owned(),
                salt,
                password_hash,
                org_id: ORG_ID,
                orgs: BTreeMap::from([(ORG_ID, role)]),
                grafana_admin,
                disabled: false,
                created: now,
                updated: now,
            },
        );
        Ok(id)
    }

    /// Grafana's `GetByLogin`: the login, else the email, case-insensitively.
    pub fn user_by_login_or_email(&self, login_or_email: &str) -> Option<&User> {
        self.users
            .values()
            .find(|u| u.login.eq_ignore_ascii_case(login_or_email))
            .or_else(|| {
                self.users
                    .values()
                    .find(|u| u.email.eq_ignore_ascii_case(login_or_email))
            })
    }

    pub fn user_by_login(&self, login: &str) -> Option<&User> {
        self.users.values().find(|u| u.login.eq_ignore_ascii_case(login))
    }

    pub fn delete_user(&mut self, id: i64) -> bool {
        let existed = self.users.remove(&id).is_some();
        self.sessions.retain(|_, s| s.user_id != id);
        existed
    }

    // ---- brute-force protection -------------------------------------------

    pub fn is_locked(&self, username: &str, now: i64) -> bool {
        let since = now - LOGIN_ATTEMPT_WINDOW_SECS;
        self.attempts
            .get(&username.to_lowercase())
            .is_some_and(|a| a.iter().filter(|t| **t > since).count() >= MAX_LOGIN_ATTEMPTS)
    }

    pub fn failed_logins(&self, username: &str, now: i64) -> usize {
        let since = now - LOGIN_ATTEMPT_WINDOW_SECS;
        self.attempts
            .get(&username.to_lowercase())
            .map_or(0, |a| a.iter().filter(|t| **t > since).count())
    }

    pub fn record_failed_login(&mut self, username: &str, now: i64) {
        let since = now - LOGIN_ATTEMPT_WINDOW_SECS;
        let entry = self.attempts.entry(username.to_lowercase()).or_default();
        // Old attempts no longer count; drop them so the map stays small.
        entry.retain(|t| *t > since);
        entry.push(now);
    }

    /// A successful login clears the count, as Grafana's login hook does.
    pub fn reset_failed_logins(&mut self, username: &str) {
        self.attempts.remove(&username.to_lowercase());
    }

    // ---- service accounts -------------------------------------------------

    pub fn insert_service_account(
        &mut self,
        org_id: i64,
        name: &str,
        login: &str,
        role: Role,
        disabled: bool,
        now: i64,
    ) -> Result<ServiceAccount, Conflict> {
        if self
            .service_accounts
            .values()
            .any(|s| s.name == name || s.login.eq_ignore_ascii_case(login))
            || self.users.values().any(|u| u.login.eq_ignore_ascii_case(login))
        {
            return Err(Conflict::Exists);
        }
        let id = self.take_user_id();
        let sa = ServiceAccount {
            id,
            uid: new_uid(),
            name: name.to_owned(),
            login: login.to_owned(),
            org_id,
            role,
            disabled,
            created: now,
            updated: now,
        };
        self.service_accounts.insert(id, sa.clone());
        Ok(sa)
    }

    pub fn delete_service_account(&mut self, id: i64) -> bool {
        let existed = self.service_accounts.remove(&id).is_some();
        self.keys.retain(|_, k| k.service_account_id != Some(id));
        existed
    }

    pub fn token_count(&self, sa_id: i64) -> usize {
        self.keys
            .values()
            .filter(|k| k.service_account_id == Some(sa_id))
            .count()
    }

    // ---- api_key table ----------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    pub fn insert_key(
        &mut self,
        name: &str,
        org_id: i64,
        hash: String,
        role: Role,
        expires: Option<i64>,
        service_account_id: Option<i64>,
        legacy: bool,
        now: i64,
    ) -> i64 {
        let id = self.take_key_id();
        self.keys.insert(
            id,
            ApiKey {
                id,
                org_id,
                name: name.to_owned(),
                hash,
                role,
                created: now,
                expires,
                last_used: None,
                service_account_id,
                legacy,
                is_revoked: false,
            },
        );
        id
    }

    /// Legacy keys are unique by (org, name).
    pub fn legacy_key_name_taken(&self, org_id: i64, name: &str) -> bool {
        self.keys
            .values()
            .any(|k| k.legacy && k.org_id == org_id && k.name == name)
    }

    pub fn legacy_key(&self, org_id: i64, name: &str) -> Option<&ApiKey> {
        self.keys
            .values()
            .find(|k| k.legacy && k.org_id == org_id && k.name == name)
    }

    pub fn token_by_hash(&self, hash: &str) -> Option<&ApiKey> {
        self.keys.values().find(|k| !k.legacy && k.hash == hash)
    }

    /// Registers an exact legacy key string: for PMM, migrated to a service
    /// account of its own, as PMM 3 converts every API key.
    pub fn add_legacy_key(
        &mut self,
        key: &LegacyKey,
        role: Role,
        expires: Option<i64>,
        migrate: bool,
        now: i64,
    ) -> i64 {
        let sa_id = if migrate {
            let name = format!("sa-autogen-{}", key.name);
            let login = format!("sa-autogen-{}-{}", key.org_id, key.name);
            // Distinct keys with one name cannot exist; reuse on a clash.
            match self.insert_service_account(key.org_id, &name, &login, role, false, now) {
                Ok(sa) => Some(sa.id),
                Err(Conflict::Exists) => self
                    .service_accounts
                    .values()
                    .find(|s| s.name == name)
                    .map(|s| s.id),
            }
        } else {
            None
        };
        self.insert_key(&key.name, key.org_id, key.hash(), role, expires, sa_id, true, now)
    }

    pub fn add_sa_token(
        &mut self,
        sa_id: i64,
        name: &str,
        token: &SaToken,
        expires: Option<i64>,
        now: i64,
    ) -> i64 {
        // A token belongs to its service account's org.
        let (org_id, role) = self
            .service_accounts
            .get(&sa_id)
            .map_or((ORG_ID, Role::None), |s| (s.org_id, s.role));
        self.insert_key(name, org_id, token.hash(), role, expires, Some(sa_id), false, now)
    }

    // ---- sessions ---------------------------------------------------------

    /// Grafana's `CreateToken`: `prev_auth_token` starts equal to
    /// `auth_token`, not seen yet.
    pub fn create_session(&mut self, user_id: i64, token_hash: String, ip: &str, ua: &str, now: i64) -> i64 {
        let id = self.next_session_id;
        self.next_session_id += 1;
        self.sessions.insert(
            id,
            Session {
                id,
                user_id,
                prev_token_hash: token_hash.clone(),
                token_hash,
                seen: false,
                seen_at: 0,
                created: now,
                rotated_at: now,
                client_ip: ip.to_owned(),
                user_agent: ua.to_owned(),
            },
        );
        id
    }

    /// Grafana's `LookupToken` (`auth_token.go`), updates included. Returns
    /// the session as Grafana's caller sees it, which can differ from the
    /// stored row:
    ///
    /// - The row is found by its current *or* previous token hash.
    /// - The previous token after its successor has been seen in use: the
    ///   caller's copy is marked unseen with `rotated_at` one minute back,
    ///   so it "needs rotation" and the request is answered
    ///   `session.token.rotate`; the row itself gets the same change only
    ///   when the last rotation is older than a minute (`rotated_at < ?` in
    ///   the `UPDATE`). So a superseded token is never a session again once
    ///   its successor has been used — all it can still do is rotate.
    /// - The previous token while its successor is unseen (the rotate
    ///   answer is still on its way, concurrent requests): accepted like an
    ///   unseen token, i.e. until one minute after the rotation.
    /// - The current token, first use: marked seen, `seen_at` = now.
    pub fn lookup_token(&mut self, hash: &str, now: i64) -> Result<Session, LookupError> {
        let id = self
            .sessions
            .values()
            .find(|s| s.token_hash == hash || s.prev_token_hash == hash)
            .map(|s| s.id)
            .ok_or(LookupError::NotFound)?;
        let row = self.sessions.get_mut(&id).ok_or(LookupError::NotFound)?;
        if row.expired(now) {
            return Err(LookupError::Expired);
        }
        let mut copy = row.clone();
        if row.token_hash != hash && row.prev_token_hash == hash && row.seen {
            let backdated = now - URGENT_ROTATE_SECS;
            copy.seen = false;
            copy.rotated_at = backdated;
            if row.rotated_at < backdated {
                row.seen = false;
                row.rotated_at = backdated;
            }
        }
        if !copy.seen && row.token_hash == hash {
            row.seen = true;
            row.seen_at = now;
            copy.seen = true;
            copy.seen_at = now;
        }
        Ok(copy)
    }

    /// Grafana's `rotateToken`: the stored current token becomes the
    /// previous one (whichever token the caller presented), the new one is
    /// unseen, `rotated_at` = now.
    pub fn rotate_session(
        &mut self,
        id: i64,
        new_hash: String,
        ip: &str,
        ua: &str,
        now: i64,
    ) -> Option<Session> {
        let s = self.sessions.get_mut(&id)?;
        s.prev_token_hash = std::mem::replace(&mut s.token_hash, new_hash);
        s.seen = false;
        s.seen_at = 0;
        s.rotated_at = now;
        s.client_ip = ip.to_owned();
        s.user_agent = ua.to_owned();
        Some(s.clone())
    }

    /// Grafana's `RevokeAllUserTokens`: the rows are deleted.
    pub fn revoke_user_sessions(&mut self, user_id: i64) -> usize {
        let before = self.sessions.len();
        self.sessions.retain(|_, s| s.user_id != user_id);
        before - self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_lock_the_username_case_insensitively() {
        let mut store = Store::new();
        let now = 1_000_000;
        for i in 0..4 {
            store.record_failed_login("Admin", now + i);
            assert!(!store.is_locked("admin", now + i));
        }
        store.record_failed_login("ADMIN", now + 4);
        assert!(store.is_locked("admin", now + 5));
        assert!(store.is_locked("Admin", now + 5));
        assert!(!store.is_locked("other", now + 5));
        // The window passes: unlocked again.
        assert!(!store.is_locked("admin", now + 4 + LOGIN_ATTEMPT_WINDOW_SECS));
        store.record_failed_login("admin", now + 10);
        store.reset_failed_logins("admin");
        assert!(!store.is_locked("admin", now + 11));
    }

    #[test]
    fn sessions_expire_and_need_rotation() {
        let mut store = Store::new();
        let interval = 10 * 60;
        let id = store.create_session(1, "h".into(), "127.0.0.1", "curl", 0);
        let s = store.lookup_token("h", 0).expect("fresh");
        assert!(s.seen, "first use marks the token seen");
        assert!(!s.needs_rotation(interval - 1, interval));
        assert!(s.needs_rotation(interval, interval));
        assert_eq!(s.next_rotation(interval), interval - ROTATION_LEEWAY_SECS);
        assert!(!s.expired(MAX_INACTIVE_SECS - 1));
        assert!(s.expired(MAX_INACTIVE_SECS));
        // Never used: urgent rotation after a minute, whatever the interval.
        store.create_session(1, "u".into(), "127.0.0.1", "curl", 0);
        let unseen = store.sessions.values().find(|s| s.token_hash == "u").unwrap();
        assert!(!unseen.needs_rotation(URGENT_ROTATE_SECS - 1, interval));
        assert!(unseen.needs_rotation(URGENT_ROTATE_SECS, interval));
        assert!(store.sessions[&id].seen);
        assert_eq!(store.lookup_token("nope", 0).unwrap_err(), LookupError::NotFound);
        assert_eq!(
            store.lookup_token("h", MAX_LIFETIME_SECS).unwrap_err(),
            LookupError::Expired
        );
    }

    #[test]
    fn previous_token_after_rotation_like_lookup_token() {
        let interval = 600;
        let mut store = Store::new();
        let id = store.create_session(1, "a".into(), "127.0.0.1", "curl", 1000);
        store.lookup_token("a", 1000).unwrap();
        // Rotated at 2000: "a" is the previous token, "b" is not seen yet.
        let rotated = store
            .rotate_session(id, "b".into(), "127.0.0.1", "curl", 2000)
            .unwrap();
        assert_eq!((rotated.prev_token_hash.as_str(), rotated.seen), ("a", false));
        // While "b" is unseen, "a" still works (the rotate answer may not
        // have arrived yet), as an unseen token: for a minute.
        let s = store.lookup_token("a", 2010).unwrap();
        assert!(!s.needs_rotation(2010, interval));
        assert!(store
            .lookup_token("a", 2000 + URGENT_ROTATE_SECS)
            .unwrap()
            .needs_rotation(2000 + URGENT_ROTATE_SECS, interval));
        assert!(
            !store.sessions[&id].seen,
            "the previous token never marks the row seen"
        );
        // "b" is used: now "a" only gets `session.token.rotate`.
        assert!(!store
            .lookup_token("b", 2011)
            .unwrap()
            .needs_rotation(2011, interval));
        let s = store.lookup_token("a", 2012).unwrap();
        assert!(s.needs_rotation(2012, interval));
        // Within a minute of the rotation the row itself is left alone...
        assert_eq!(
            (store.sessions[&id].seen, store.sessions[&id].rotated_at),
            (true, 2000)
        );
        assert!(!store
            .lookup_token("b", 2013)
            .unwrap()
            .needs_rotation(2013, interval));
        // ...later it is backdated and marked unseen: "b" is seen again on
        // its next use and its next rotation comes a minute earlier.
        let s = store.lookup_token("a", 2100).unwrap();
        assert!(s.needs_rotation(2100, interval));
        assert_eq!(
            (store.sessions[&id].seen, store.sessions[&id].rotated_at),
            (false, 2100 - URGENT_ROTATE_SECS)
        );
        let s = store.lookup_token("b", 2101).unwrap();
        assert!(s.seen && !s.needs_rotation(2101, interval));
        assert!(s.needs_rotation(2100 - URGENT_ROTATE_SECS + interval, interval));
        // Rotating again drops "a" for good: "b" becomes the previous token.
        store
            .rotate_session(id, "c".into(), "127.0.0.1", "curl", 2200)
            .unwrap();
        assert_eq!(store.lookup_token("a", 2201).unwrap_err(), LookupError::NotFound);
        assert!(store.lookup_token("b", 2201).is_ok());
    }

    #[test]
    fn memberships_and_the_current_org() {
        let mut store = Store::new();
        let id = store
            .insert_user("u", "u@x", "u", "s".into(), "h".into(), Role::Viewer, false, 0)
            .unwrap();
        let ops = store.add_org("Ops").unwrap();
        assert!(store.add_org("ops").is_err(), "names are unique");
        assert!(store.set_org_member(ops, id, Role::Admin));
        assert!(!store.set_org_member(99, id, Role::Admin));
        let u = &store.users[&id];
        assert_eq!((u.org_id, u.orgs.len(), u.orgs[&ops]), (ORG_ID, 2, Role::Admin));
        assert_eq!(store.org_admin_count(ops), 1);
        // Removed from its current org: moves to the other one.
        assert!(!store.remove_org_member(ORG_ID, id));
        assert_eq!(store.users[&id].org_id, ops);
        // Removed from its last org: deleted.
        assert!(store.remove_org_member(ops, id));
        assert!(!store.users.contains_key(&id));
    }

    #[test]
    fn service_account_logins() {
        assert_eq!(service_account_login("pmm-agent"), "sa-pmm-agent");
        assert_eq!(service_account_login("My Agent"), "sa-my-agent");
    }
}

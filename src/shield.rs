//! The lock-out shield: Grafana locks a username after 5 failed password
//! checks in 5 minutes (`[security]` brute-force protection), counting every
//! refusal of a password it sees — a login form, a Basic API call, the
//! gateway's own verification. Anyone who can reach the gateway could keep
//! any user locked out with a trickle of wrong passwords. The shield stops
//! that:
//!
//! - **Per login**: at most `auth.login_failures` unknown passwords of one
//!   login are checked at Grafana within `auth.login_failure_window`. A slot
//!   is reserved *before* the check (so concurrent checks on any replica
//!   cannot overshoot) and given back when the password turns out good.
//!   Past the budget an unknown password is refused here with 429.
//! - **Known-good passwords pass**: a password that verified for its login
//!   within `auth.known_good_for` (remembered by its HMAC cache key, never in
//!   clear) is checked at Grafana whatever the budget, so the real user gets
//!   in while strangers are refused.
//! - **Per client address**: a failure budget (`auth.client_failures` within
//!   `auth.client_failure_window`, governor's GCRA) so that one address
//!   cannot spray distinct passwords or tokens at Grafana.
//!
//! With Redis the login budget and the known-good set are the fleet's, not
//! each replica's; the client budget is per replica.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::auth::identity::now_ms;
use crate::auth::Credential;
use crate::cache::{CacheKey, Keyer, Shared};
use crate::config::AuthConfig;

/// Logins tracked in memory at once; past it only expired ones are dropped
/// and new unknown logins are refused (never forgotten early: forgetting a
/// login would hand its budget back to whoever is attacking it).
const MAX_LOGINS: usize = 100_000;
/// Known-good credentials remembered in memory; past it the oldest half goes.
const MAX_KNOWN_GOOD: usize = 100_000;
/// Client addresses held as blocked at once.
const MAX_BLOCKED: usize = 100_000;

/// Largest login form read (Grafana's own is a few dozen bytes).
pub const MAX_LOGIN_FORM_BYTES: usize = 64 * 1024;

/// `POST /login` (and PMM's `/graph/login`; the seeds' `/api/login` arrives
/// here already rewritten): Grafana's login form.
pub fn is_login_form(method: &http::Method, path: &str) -> bool {
    let path = path
        .strip_prefix("/graph")
        .filter(|p| p.starts_with('/'))
        .unwrap_or(path);
    method == http::Method::POST && path.trim_end_matches('/') == "/login"
}

/// The password a login form carries, exactly as Grafana's `LoginCommand`
/// is read by Go's `encoding/json`: keys match `user` and `password` in any
/// case, and the last of several wins there. Anything this cannot read as
/// Grafana would — a second key of either name in any case, a non-string,
/// no user, not one JSON object — is `None`, and the form is refused rather
/// than forwarded unweighed.
pub fn login_form_credential(body: &[u8]) -> Option<Credential> {
    /// The object's members in order, duplicates kept.
    struct Members(Vec<(String, serde_json::Value)>);
    impl<'de> serde::Deserialize<'de> for Members {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Members, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = Members;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                    let mut members = Vec::new();
                    while let Some(member) = map.next_entry::<String, serde_json::Value>()? {
                        members.push(member);
                    }
                    Ok(Members(members))
                }
            }
            d.deserialize_map(Visit)
        }
    }
    let Members(members) = serde_json::from_slice(body).ok()?;
    let field = |name: &str| -> Option<Option<String>> {
        let mut found = members.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name));
        match (found.next(), found.next()) {
            (None, _) => Some(None),
            (Some((_, serde_json::Value::String(v))), None) => Some(Some(v.clone())),
            _ => None,
        }
    };
    let user = field("user")??;
    let password = field("password")?.unwrap_or_default();
    (!user.is_empty()).then_some(Credential::Password { user, password })
}

/// Why the shield refused to let a check reach Grafana.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// The login's failure budget is used up.
    Login { retry_after: Duration },
    /// The client address's failure budget is used up.
    Client { retry_after: Duration },
}

impl Throttle {
    pub fn retry_after(self) -> Duration {
        match self {
            Throttle::Login { retry_after } | Throttle::Client { retry_after } => retry_after,
        }
    }
}

impl From<Throttle> for crate::auth::VerifyError {
    fn from(throttle: Throttle) -> Self {
        crate::auth::VerifyError::Throttled {
            retry_after: throttle.retry_after(),
            per_login: matches!(throttle, Throttle::Login { .. }),
        }
    }
}

/// How a check that the shield admitted turned out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Grafana accepted the credential.
    Good,
    /// Grafana refused it: a failure that counts.
    Refused,
    /// Grafana did not say (unreachable, an error): nothing counts.
    Unknown,
}

/// A check in flight: what it reserved, to settle when its answer is known.
#[must_use = "settle the admission with the check's result"]
pub struct Admission {
    client: IpAddr,
    password: Option<PasswordCheck>,
}

struct PasswordCheck {
    credential: CacheKey,
    login: CacheKey,
    /// The reserved slot, when the password was not known-good.
    slot: Option<Slot>,
    known_good: bool,
}

struct Slot {
    id: u64,
    shared: bool,
}

#[derive(Default)]
pub struct ShieldStats {
    pub login_throttled: AtomicU64,
    pub client_throttled: AtomicU64,
    pub failures: AtomicU64,
}

pub struct Shield {
    login_budget: u32,
    login_window: Duration,
    known_good_for: Duration,
    /// Reserved or failed slots per login: (slot id, when, in ms).
    logins: DashMap<CacheKey, VecDeque<(u64, u64)>>,
    known_good: DashMap<CacheKey, u64>,
    /// Known-good passwords with a check under way (one at a time each).
    known_good_busy: DashMap<CacheKey, ()>,
    clients: DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses past their budget, and until when (ms).
    blocked: DashMap<IpAddr, u64>,
    client_window: Duration,
    client_budget: u32,
    shared: Option<Arc<Shared>>,
    instance: u64,
    next_slot: AtomicU64,
    pub stats: ShieldStats,
}

impl Shield {
    pub fn new(config: &AuthConfig, shared: Option<Arc<Shared>>) -> Shield {
        // The failure that finds the budget empty has already reached
        // Grafana: the limiter holds one cell fewer than the budget, so that
        // the budget-th failure is the one that blocks.
        let cells = NonZeroU32::new(config.client_failures.saturating_sub(1)).unwrap_or(NonZeroU32::MIN);
        let period = config.client_failure_window / cells.get();
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(cells))
            .allow_burst(cells);
        Shield {
            login_budget: config.login_failures.max(1),
            login_window: config.login_failure_window,
            known_good_for: config.known_good_for,
            logins: DashMap::new(),
            known_good: DashMap::new(),
            known_good_busy: DashMap::new(),
            clients: RateLimiter::keyed(quota),
            blocked: DashMap::new(),
            client_window: config.client_failure_window,
            client_budget: config.client_failures,
            shared,
            instance: rand::random(),
            next_slot: AtomicU64::new(0),
            stats: ShieldStats::default(),
        }
    }

    /// Before a check of `credential` (keyed `key`) reaches Grafana.
    pub async fn admit(
        &self,
        keyer: &Keyer,
        credential: &Credential,
        key: CacheKey,
        client: IpAddr,
    ) -> Result<Admission, Throttle> {
        let now = now_ms();
        if let Some(until) = self.blocked.get(&client).map(|u| *u) {
            if now < until {
                self.stats.client_throttled.fetch_add(1, Ordering::Relaxed);
                return Err(Throttle::Client {
                    retry_after: Duration::from_millis(until - now),
                });
            }
            self.blocked.remove_if(&client, |_, u| *u <= now);
        }
        let Credential::Password { user, .. } = credential else {
            return Ok(Admission {
                client,
                password: None,
            });
        };
        let login = keyer.login_key(user);
        // A known-good password skips the budget one check at a time: a
        // leaked old password sent many times at once must not add up to
        // Grafana's lock-out before the first refusal forgets it.
        let known_good =
            self.is_known_good(&key, now).await && self.known_good_busy.insert(key, ()).is_none();
        let slot = if known_good {
            None
        } else {
            match self.reserve(&login, now).await {
                Ok(slot) => Some(slot),
                Err(retry_after) => {
                    self.stats.login_throttled.fetch_add(1, Ordering::Relaxed);
                    return Err(Throttle::Login { retry_after });
                }
            }
        };
        Ok(Admission {
            client,
            password: Some(PasswordCheck {
                credential: key,
                login,
                slot,
                known_good,
            }),
        })
    }

    /// After the check: a refusal keeps its slot (it is one of Grafana's
    /// failures) and counts against the client; anything else gives it back.
    pub async fn settle(&self, admission: Admission, checked: Checked) {
        if checked == Checked::Refused {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            self.client_failed(admission.client);
        }
        let Some(password) = admission.password else {
            return;
        };
        if password.known_good {
            self.known_good_busy.remove(&password.credential);
        }
        match checked {
            Checked::Good => {
                if let Some(slot) = &password.slot {
                    self.release(&password.login, slot).await;
                }
                self.remember(password.credential, true).await;
            }
            Checked::Refused => {
                if password.known_good {
                    // The password changed: it is a stranger's now.
                    self.remember(password.credential, false).await;
                }
                if let Some(slot) = &password.slot {
                    // Grafana counts the failure from when it finished
                    // checking, not from the reservation.
                    self.restamp(&password.login, slot).await;
                }
            }
            Checked::Unknown => {
                if let Some(slot) = &password.slot {
                    self.release(&password.login, slot).await;
                }
            }
        }
    }

    async fn restamp(&self, login: &CacheKey, slot: &Slot) {
        let now = now_ms();
        if slot.shared {
            if let Some(shared) = &self.shared {
                shared.restamp_failure(login, &self.member(slot.id), now).await;
            }
            return;
        }
        if let Some(mut slots) = self.logins.get_mut(login) {
            if let Some(at) = slots.iter().position(|(id, _)| *id == slot.id) {
                slots.remove(at);
                slots.push_back((slot.id, now));
            }
        }
    }

    async fn is_known_good(&self, key: &CacheKey, now: u64) -> bool {
        if self.known_good.get(key).is_some_and(|until| *until > now) {
            return true;
        }
        match &self.shared {
            Some(shared) => shared.is_known_good(key).await.unwrap_or(false),
            None => false,
        }
    }

    async fn remember(&self, key: CacheKey, good: bool) {
        let now = now_ms();
        if good {
            if self.known_good.len() >= MAX_KNOWN_GOOD {
                self.known_good.retain(|_, until| *until > now);
                if self.known_good.len() >= MAX_KNOWN_GOOD {
                    let half = now.saturating_add(self.known_good_for.as_millis() as u64 / 2);
                    self.known_good.retain(|_, until| *until > half);
                }
            }
            self.known_good
                .insert(key, now.saturating_add(self.known_good_for.as_millis() as u64));
        } else {
            self.known_good.remove(&key);
        }
        if let Some(shared) = &self.shared {
            shared
                .set_known_good(&key, good.then_some(self.known_good_for))
                .await;
        }
    }

    /// One slot of the login's budget, from Redis when it answers (the
    /// fleet's budget), else from this replica's memory.
    async fn reserve(&self, login: &CacheKey, now: u64) -> Result<Slot, Duration> {
        let id = self.next_slot.fetch_add(1, Ordering::Relaxed);
        if let Some(shared) = &self.shared {
            let member = self.member(id);
            if let Some(answer) = shared
                .reserve_failure(login, &member, self.login_budget, self.login_window)
                .await
            {
                return answer.map(|()| Slot { id, shared: true });
            }
        }
        let window = self.login_window.as_millis() as u64;
        let since = now.saturating_sub(window);
        if !self.logins.contains_key(login) && self.logins.len() >= MAX_LOGINS {
            self.logins
                .retain(|_, slots| slots.back().is_some_and(|(_, at)| *at > since));
            if self.logins.len() >= MAX_LOGINS {
                return Err(self.login_window);
            }
        }
        let mut slots = self.logins.entry(*login).or_default();
        while slots.front().is_some_and(|(_, at)| *at <= since) {
            slots.pop_front();
        }
        if slots.len() >= self.login_budget as usize {
            let oldest = slots.front().map_or(now, |(_, at)| *at);
            return Err(Duration::from_millis(
                (oldest + window).saturating_sub(now).max(1),
            ));
        }
        slots.push_back((id, now));
        Ok(Slot { id, shared: false })
    }

    async fn release(&self, login: &CacheKey, slot: &Slot) {
        if slot.shared {
            if let Some(shared) = &self.shared {
                shared.release_failure(login, &self.member(slot.id)).await;
            }
            return;
        }
        let emptied = match self.logins.get_mut(login) {
            Some(mut slots) => {
                slots.retain(|(id, _)| *id != slot.id);
                slots.is_empty()
            }
            None => false,
        };
        if emptied {
            self.logins.remove_if(login, |_, slots| slots.is_empty());
        }
    }

    fn member(&self, id: u64) -> String {
        format!("{:016x}-{id}", self.instance)
    }

    fn client_failed(&self, client: IpAddr) {
        let exhausted = match self.clients.check_key(&client) {
            Ok(()) if self.client_budget <= 1 => Some(Duration::ZERO),
            Ok(()) => None,
            Err(not_until) => Some(not_until.wait_time_from(DefaultClock::default().now())),
        };
        if let Some(wait) = exhausted {
            let now = now_ms();
            if self.blocked.len() >= MAX_BLOCKED {
                self.blocked.retain(|_, until| *until > now);
            }
            if self.blocked.len() < MAX_BLOCKED {
                // Blocked for the rest of the window at least: a budget that
                // refills one failure at a time would let a sprayer trickle.
                let wait = wait.max(self.client_window);
                self.blocked
                    .insert(client, now.saturating_add(wait.as_millis() as u64));
            }
        }
    }

    /// Drops what has expired (run by the cache's purger period).
    pub fn purge(&self) {
        let now = now_ms();
        let since = now.saturating_sub(self.login_window.as_millis() as u64);
        self.logins
            .retain(|_, slots| slots.back().is_some_and(|(_, at)| *at > since));
        self.known_good.retain(|_, until| *until > now);
        self.blocked.retain(|_, until| *until > now);
        self.clients.retain_recent();
        self.clients.shrink_to_fit();
    }

    /// Purges expired entries every few seconds; stops when dropped.
    pub fn spawn_purger(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shield) = weak.upgrade() else { break };
                shield.purge();
            }
        });
    }

    /// Entries held in memory (logins, known-good, clients, blocked).
    pub fn held(&self) -> [usize; 4] {
        [
            self.logins.len(),
            self.known_good.len(),
            self.clients.len(),
            self.blocked.len(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::KeyOrigin;

    fn shield(budget: u32) -> (Shield, Keyer) {
        let config = AuthConfig {
            login_failures: budget,
            client_failures: 1000,
            ..AuthConfig::default()
        };
        (Shield::new(&config, None), Keyer::new(&[7; 32], KeyOrigin::File))
    }

    fn password(p: &str) -> Credential {
        Credential::Password {
            user: "Admin".into(),
            password: p.into(),
        }
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn login_forms_are_read_as_grafana_reads_them_or_not_at_all() {
        let user = |body: &str| match login_form_credential(body.as_bytes()) {
            Some(Credential::Password { user, password }) => Some((user, password)),
            _ => None,
        };
        assert_eq!(
            user(r#"{"user":"admin","password":"x"}"#),
            Some(("admin".into(), "x".into()))
        );
        assert_eq!(
            user(r#"{"USER":"admin","Password":"x"}"#),
            Some(("admin".into(), "x".into()))
        );
        assert_eq!(user(r#"{"user":"admin"}"#), Some(("admin".into(), "".into())));
        // Go would take the last of these, or read past what serde stops at:
        // refused rather than weighed as something else.
        assert_eq!(user(r#"{"user":"a","user":"admin","password":"x"}"#), None);
        assert_eq!(
            user(r#"{"user":"admin","password":"g","User":"me","Password":"p"}"#),
            None
        );
        assert_eq!(user(r#"{"user":"admin","password":"x"} junk"#), None);
        assert_eq!(user(r#"{"user":1,"password":"x"}"#), None);
        assert_eq!(user(r#"{"user":"\ud800","password":"x"}"#), None);
        assert_eq!(user(""), None);
    }

    #[tokio::test]
    async fn budget_is_reserved_before_the_check_and_a_good_password_still_passes() {
        let (shield, keyer) = shield(4);
        let good = password("admin");
        let admitted = shield
            .admit(&keyer, &good, keyer.key(&good), CLIENT)
            .await
            .unwrap();
        shield.settle(admitted, Checked::Good).await;
        // Four wrong passwords in flight at once: the fifth is refused.
        let mut pending = Vec::new();
        for i in 0..4 {
            let c = password(&format!("wrong-{i}"));
            pending.push(shield.admit(&keyer, &c, keyer.key(&c), CLIENT).await.unwrap());
        }
        let c = password("wrong-4");
        assert!(matches!(
            shield.admit(&keyer, &c, keyer.key(&c), CLIENT).await,
            Err(Throttle::Login { .. })
        ));
        for p in pending {
            shield.settle(p, Checked::Refused).await;
        }
        // Another spelling of the login is the same login.
        let c = Credential::Password {
            user: "ADMIN".into(),
            password: "wrong-5".into(),
        };
        assert!(shield.admit(&keyer, &c, keyer.key(&c), CLIENT).await.is_err());
        // The known-good password is still checked.
        let admitted = shield.admit(&keyer, &good, keyer.key(&good), CLIENT).await;
        assert!(admitted.is_ok());
        shield.settle(admitted.unwrap(), Checked::Good).await;
    }

    #[tokio::test]
    async fn a_good_or_unanswered_check_gives_its_slot_back() {
        let (shield, keyer) = shield(1);
        for checked in [Checked::Unknown, Checked::Good, Checked::Unknown] {
            let c = password(&format!("{checked:?}"));
            let admitted = shield.admit(&keyer, &c, keyer.key(&c), CLIENT).await.unwrap();
            shield.settle(admitted, checked).await;
        }
        let c = password("bad");
        let admitted = shield.admit(&keyer, &c, keyer.key(&c), CLIENT).await.unwrap();
        shield.settle(admitted, Checked::Refused).await;
        let c = password("bad-2");
        assert!(shield.admit(&keyer, &c, keyer.key(&c), CLIENT).await.is_err());
    }

    #[tokio::test]
    async fn a_spraying_client_is_blocked_and_memory_stays_bounded() {
        let config = AuthConfig {
            client_failures: 3,
            ..AuthConfig::default()
        };
        let shield = Shield::new(&config, None);
        let keyer = Keyer::new(&[7; 32], KeyOrigin::File);
        let token = Credential::Session { token: "x".into() };
        for _ in 0..3 {
            let a = shield
                .admit(&keyer, &token, keyer.key(&token), CLIENT)
                .await
                .unwrap();
            shield.settle(a, Checked::Refused).await;
        }
        // The third failure used the budget up.
        assert!(matches!(
            shield.admit(&keyer, &token, keyer.key(&token), CLIENT).await,
            Err(Throttle::Client { .. })
        ));
        // A flood of distinct addresses, one failure each.
        let rss = || {
            std::fs::read_to_string("/proc/self/statm")
                .ok()
                .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
                .map_or(0, |pages| pages * 4096)
        };
        let before = rss();
        for i in 0..100_000u32 {
            let ip = IpAddr::V6(std::net::Ipv6Addr::from(u128::from(i) + 1));
            let a = shield.admit(&keyer, &token, keyer.key(&token), ip).await.unwrap();
            shield.settle(a, Checked::Refused).await;
        }
        let [_, _, clients, blocked] = shield.held();
        println!(
            "100,000 distinct addresses with one failure each: {clients} limiter states, \
             {blocked} blocked, resident memory +{} KiB",
            rss().saturating_sub(before) / 1024
        );
        assert!(clients <= 100_001 && blocked <= 1, "{clients} {blocked}");
    }
}

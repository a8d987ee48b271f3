//! Remembered verifications: L1 in-process map, merged concurrent misses, and
//! (for fleets) L2 in Redis with an eviction bus.
//!
//! Lookup order: L1 (DashMap) → L2 (Redis) → verifier, with write-through of
//! every fresh verification. An L1 hit never touches Redis.

mod bus;
mod key;
mod local;
pub mod shared;

pub use key::{CacheKey, KeyOrigin, Keyer};
pub use local::{LocalCache, Outcome};
pub use shared::{Shared, SharedStats};

pub use crate::metrics::Source;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{watch, OnceCell, RwLock};

use crate::shutdown::Shutdown;

use crate::auth::identity::now_ms;
use crate::auth::{AuthMethod, Principal, Verdict, VerifyError};
use crate::config::CacheConfig;

type Flight = Arc<OnceCell<Result<Outcome, VerifyError>>>;

/// The cacheable form of a verifier's answer, its TTL stamped from now.
fn outcome_of(verdict: Verdict, ttl: Duration) -> Outcome {
    match verdict {
        Verdict::Allowed(mut identity) => {
            // A verifier may know the credential's own expiry.
            let own_expiry = (identity.expires_at_ms > 0).then_some(identity.expires_at_ms);
            identity.stamp(ttl, own_expiry);
            Outcome::Allowed(Arc::new(*identity))
        }
        Verdict::Denied(reason) => Outcome::Denied(reason),
    }
}

/// What one revocation drops, here and on every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// One credential (e.g. the session a logout ended).
    Key(CacheKey),
    /// Every credential of one principal, or of a whole kind when `id` is 0.
    Principal(Principal),
    /// Every credential that authenticated one way.
    Method(AuthMethod),
    /// A session token its holder has just rotated away from: dropped, and
    /// for [`RETIRED_FOR`] verified on every use and never cached, because
    /// Grafana accepts a previous token only for a while after the rotation
    /// and the gateway cannot know for how long.
    Retire(CacheKey),
}

/// How long a rotated-away session token stays uncacheable. Grafana keeps a
/// previous token for at most one rotation interval (10 minutes by default);
/// an hour covers intervals raised well past that.
pub const RETIRED_FOR: Duration = Duration::from_secs(3600);
/// Bound on remembered retired tokens: a full set forgets its oldest half.
const MAX_RETIRED: usize = 65_536;

pub struct Cache {
    pub keyer: Keyer,
    local: LocalCache,
    inflight: DashMap<CacheKey, Flight>,
    /// `cache.ttl` and `cache.negative_ttl` in milliseconds (a reload may
    /// change them; entries keep the expiry they were stored with).
    ttl_ms: AtomicU64,
    negative_ttl_ms: AtomicU64,
    /// Bumped by every invalidation: a verification that started before one
    /// must not write its (possibly stale) answer into the cache.
    generation: AtomicU64,
    /// L2 and the eviction bus, when `cache.redis` is configured.
    shared: Option<Arc<Shared>>,
    /// Write-throughs to Redis hold a read guard; an eviction takes the
    /// write side to wait until those in flight have landed.
    writes: RwLock<()>,
    /// Broadcasts waiting for confirmations, by message id.
    waiters: DashMap<String, watch::Sender<usize>>,
    instance: String,
    next_message: AtomicU64,
    /// Rotated-away session tokens and until when (ms) they stay uncached.
    retired: DashMap<CacheKey, u64>,
}

impl Cache {
    pub fn new(config: &CacheConfig, keyer: Keyer) -> Cache {
        Cache {
            keyer,
            local: LocalCache::new(config.max_entries),
            inflight: DashMap::new(),
            ttl_ms: AtomicU64::new(config.ttl.as_millis() as u64),
            negative_ttl_ms: AtomicU64::new(config.negative_ttl.as_millis() as u64),
            generation: AtomicU64::new(0),
            shared: None,
            writes: RwLock::new(()),
            waiters: DashMap::new(),
            instance: hex::encode(rand::random::<[u8; 8]>()),
            next_message: AtomicU64::new(0),
            retired: DashMap::new(),
        }
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

    /// New TTLs for what is verified from now on (a configuration reload).
    pub fn set_ttls(&self, ttl: Duration, negative_ttl: Duration) {
        self.ttl_ms.store(ttl.as_millis() as u64, Ordering::Relaxed);
        self.negative_ttl_ms
            .store(negative_ttl.as_millis() as u64, Ordering::Relaxed);
    }

    /// Adds L2 and the eviction bus.
    pub fn with_shared(mut self, shared: Arc<Shared>) -> Cache {
        self.shared = Some(shared);
        self
    }

    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    /// Subscribes to the eviction bus (now, if Redis answers) and starts the
    /// background reconnection; no-op without Redis.
    pub async fn start_shared(self: &Arc<Self>, shutdown: Shutdown) {
        if let Some(shared) = &self.shared {
            shared.spawn_reconnector(shutdown.clone());
            bus::start(self, shared.clone(), shutdown).await;
        }
    }

    /// The cached outcome for `key`, or Redis's, or the verifier's, asked at
    /// most once at a time per key however many requests wait for it.
    pub async fn resolve<F, Fut>(&self, key: CacheKey, verify: F) -> Result<(Outcome, Source), VerifyError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Verdict, VerifyError>>,
    {
        if let Some(outcome) = self.local.get(&key, now_ms()) {
            return Ok((outcome, Source::Local));
        }
        // Boxed: a hit should not carry the size of a Redis lookup and a
        // verification in its future.
        Box::pin(self.resolve_miss(key, verify)).await
    }

    async fn resolve_miss<F, Fut>(&self, key: CacheKey, verify: F) -> Result<(Outcome, Source), VerifyError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Verdict, VerifyError>>,
    {
        let flight = self
            .inflight
            .entry(key)
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let mut source = Source::Local;
        let result = flight
            .get_or_init(|| async {
                // A flight that just landed may have filled L1 between our miss
                // and joining this one.
                if let Some(outcome) = self.local.get(&key, now_ms()) {
                    return Ok(outcome);
                }
                let generation = self.generation.load(Ordering::SeqCst);
                if self.is_retired(&key) {
                    source = Source::Verifier;
                    return Ok(outcome_of(verify().await?, self.ttl()));
                }
                if let Some(shared) = &self.shared {
                    if let Some(identity) = shared.get(&key).await {
                        source = Source::Shared;
                        let expires = identity.expires_at_ms;
                        let outcome = Outcome::Allowed(Arc::new(identity));
                        self.insert_if_current(key, outcome.clone(), expires, generation);
                        return Ok(outcome);
                    }
                }
                source = Source::Verifier;
                let verdict = verify().await?;
                let outcome = self.store(key, verdict, generation);
                if let (Some(shared), Outcome::Allowed(identity)) = (&self.shared, &outcome) {
                    let _writing = self.writes.read().await;
                    if self.generation.load(Ordering::SeqCst) == generation {
                        shared.put(&key, identity).await;
                    }
                }
                Ok(outcome)
            })
            .await
            .clone();
        self.inflight.remove_if(&key, |_, f| Arc::ptr_eq(f, &flight));
        result.map(|outcome| (outcome, source))
    }

    fn store(&self, key: CacheKey, verdict: Verdict, generation: u64) -> Outcome {
        let now = now_ms();
        let outcome = outcome_of(verdict, self.ttl());
        let expires_at_ms = match &outcome {
            Outcome::Allowed(identity) => identity.expires_at_ms,
            Outcome::Denied(reason) if reason.is_cacheable() => {
                now.saturating_add(self.negative_ttl_ms.load(Ordering::Relaxed))
            }
            Outcome::Denied(_) => 0,
        };
        if expires_at_ms > now {
            self.insert_if_current(key, outcome.clone(), expires_at_ms, generation);
        }
        outcome
    }

    fn is_retired(&self, key: &CacheKey) -> bool {
        if self.retired.is_empty() {
            return false;
        }
        let now = now_ms();
        match self.retired.get(key).map(|until| *until) {
            Some(until) if now < until => true,
            Some(_) => {
                self.retired.remove_if(key, |_, until| *until <= now);
                false
            }
            None => false,
        }
    }

    fn retire(&self, key: CacheKey) {
        let now = now_ms();
        if self.retired.len() >= MAX_RETIRED {
            self.retired.retain(|_, until| *until > now);
            if self.retired.len() >= MAX_RETIRED {
                let cutoff = now.saturating_add(RETIRED_FOR.as_millis() as u64 / 2);
                self.retired.retain(|_, until| *until > cutoff);
            }
        }
        self.retired
            .insert(key, now.saturating_add(RETIRED_FOR.as_millis() as u64));
    }

    /// Caches an answer obtained under `generation` unless an eviction came
    /// in meanwhile. Checked again after the insert: an eviction that bumped
    /// the generation in between may have swept before our entry existed.
    fn insert_if_current(&self, key: CacheKey, outcome: Outcome, expires_at_ms: u64, generation: u64) {
        if self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        self.local.insert(key, outcome, expires_at_ms, now_ms());
        if self.generation.load(Ordering::SeqCst) != generation {
            self.local.remove(&key);
        }
    }

    /// Drops what `evictions` name from this process's memory and stops
    /// verifications in flight from caching their answers.
    fn evict_local(&self, evictions: &[Eviction]) -> usize {
        self.generation.fetch_add(1, Ordering::SeqCst);
        evictions
            .iter()
            .map(|eviction| match *eviction {
                Eviction::Key(key) => usize::from(self.local.remove(&key)),
                Eviction::Retire(key) => {
                    self.retire(key);
                    usize::from(self.local.remove(&key))
                }
                Eviction::Principal(principal) => self
                    .local
                    .remove_matching(|p, _| {
                        p.kind == principal.kind && (principal.id == 0 || p.id == principal.id || p.id == 0)
                    })
                    .len(),
                Eviction::Method(method) => self.local.remove_matching(|_, m| m == method).len(),
            })
            .sum()
    }

    /// Waits until the Redis write-throughs in flight have landed (or timed
    /// out); later ones see the bumped generation and do not write.
    async fn settle_writes(&self) {
        drop(self.writes.write().await);
    }

    /// After a gap in the eviction feed: anything remembered before now may
    /// have been revoked meanwhile.
    fn after_gap(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let dropped = self.local.remove_older_than(now_ms());
        if dropped > 0 {
            tracing::info!(
                dropped,
                "eviction bus (re)joined: dropped memory entries that may have missed evictions"
            );
        }
    }

    fn acknowledged(&self, id: &str) {
        if let Some(waiter) = self.waiters.get(id) {
            waiter.send_modify(|n| *n += 1);
        }
    }

    /// Revokes: here, in Redis and on every replica, before returning (see
    /// `bus`). Without Redis, or while it is down, only here. Returns the
    /// number of memory entries dropped here.
    pub async fn invalidate(&self, evictions: &[Eviction]) -> usize {
        let dropped = self.evict_local(evictions);
        self.settle_writes().await;
        if let Some(shared) = &self.shared {
            if shared.is_commands_up() {
                let started = std::time::Instant::now();
                let confirmed = self.broadcast(shared, evictions).await;
                let deleted = shared.delete(evictions).await;
                let confirmed = self.broadcast(shared, evictions).await && confirmed;
                // Our own subscriber did this too, unless it is down.
                self.evict_local(evictions);
                shared
                    .stats
                    .last_revocation_us
                    .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                if !(confirmed && deleted) {
                    tracing::warn!(
                        ?evictions,
                        confirmed,
                        deleted,
                        "revocation not confirmed by every replica or not applied in Redis in time"
                    );
                }
            } else {
                tracing::warn!(
                    ?evictions,
                    "Redis is down: revocation applied on this replica only"
                );
            }
        }
        dropped
    }

    /// Publishes an eviction and waits until every subscriber confirmed it
    /// (bounded by four Redis time-outs).
    async fn broadcast(&self, shared: &Shared, evictions: &[Eviction]) -> bool {
        let id = format!(
            "{}-{}",
            self.instance,
            self.next_message.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, mut rx) = watch::channel(0usize);
        self.waiters.insert(id.clone(), tx);
        let message = bus::encode(&id, evictions);
        let confirmed = match shared.publish(&shared.channel, &message).await {
            Some(receivers) => {
                shared.stats.evictions_published.fetch_add(1, Ordering::Relaxed);
                let wait = rx.wait_for(|n| *n >= receivers);
                matches!(tokio::time::timeout(shared.timeout * 4, wait).await, Ok(Ok(_)))
            }
            None => false,
        };
        self.waiters.remove(&id);
        if !confirmed {
            shared.stats.evictions_unconfirmed.fetch_add(1, Ordering::Relaxed);
        }
        confirmed
    }

    /// Forgets every memory entry (Redis keeps its own).
    pub fn clear_local(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.local.clear();
    }

    pub fn len(&self) -> usize {
        self.local.len()
    }

    pub fn is_empty(&self) -> bool {
        self.local.is_empty()
    }

    pub fn purge_expired(&self) -> usize {
        self.local.purge_expired(now_ms())
    }

    /// Background purge of expired entries; stops when the cache is dropped.
    pub fn spawn_purger(self: &Arc<Self>) {
        let weak: Weak<Cache> = Arc::downgrade(self);
        let period = Duration::from_millis(self.negative_ttl_ms.load(Ordering::Relaxed))
            .max(Duration::from_secs(1))
            .min(Duration::from_secs(30));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(cache) = weak.upgrade() else { break };
                cache.purge_expired();
            }
        });
    }
}

//! Remembered verifications: L1 in-process map, merged concurrent misses, and
//! (for fleets) L2 in Redis with an eviction bus.

mod key;
mod local;

pub use key::{CacheKey, KeyOrigin, Keyer};
pub use local::{LocalCache, Outcome};

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::OnceCell;

use crate::auth::identity::now_ms;
use crate::auth::{AuthMethod, Principal, Verdict, VerifyError};
use crate::config::CacheConfig;

type Flight = Arc<OnceCell<Result<Outcome, VerifyError>>>;

/// How a lookup was answered, for metrics and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Local,
    Verifier,
}

pub struct Cache {
    pub keyer: Keyer,
    local: LocalCache,
    inflight: DashMap<CacheKey, Flight>,
    ttl: Duration,
    negative_ttl: Duration,
    /// Bumped by every invalidation: a verification that started before one
    /// must not write its (possibly stale) answer into the cache.
    generation: AtomicU64,
    pub stats: CacheStats,
}

#[derive(Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub verifications: AtomicU64,
    pub invalidations: AtomicU64,
}

impl Cache {
    pub fn new(config: &CacheConfig, keyer: Keyer) -> Cache {
        Cache {
            keyer,
            local: LocalCache::new(config.max_entries),
            inflight: DashMap::new(),
            ttl: config.ttl,
            negative_ttl: config.negative_ttl,
            generation: AtomicU64::new(0),
            stats: CacheStats::default(),
        }
    }

    /// The cached outcome for `key`, or the verifier's, asked at most once at a
    /// time per key however many requests wait for it.
    pub async fn resolve<F, Fut>(&self, key: CacheKey, verify: F) -> Result<(Outcome, Source), VerifyError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Verdict, VerifyError>>,
    {
        if let Some(outcome) = self.local.get(&key, now_ms()) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok((outcome, Source::Local));
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
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
                source = Source::Verifier;
                let generation = self.generation.load(Ordering::Acquire);
                self.stats.verifications.fetch_add(1, Ordering::Relaxed);
                let verdict = verify().await?;
                Ok(self.store(key, verdict, generation))
            })
            .await
            .clone();
        self.inflight.remove_if(&key, |_, f| Arc::ptr_eq(f, &flight));
        result.map(|outcome| (outcome, source))
    }

    fn store(&self, key: CacheKey, verdict: Verdict, generation: u64) -> Outcome {
        let now = now_ms();
        let (outcome, expires_at_ms) = match verdict {
            Verdict::Allowed(mut identity) => {
                identity.stamp(self.ttl, None);
                let expires = identity.expires_at_ms;
                (Outcome::Allowed(Arc::from(identity)), expires)
            }
            Verdict::Denied(reason) => (
                Outcome::Denied(reason),
                now.saturating_add(self.negative_ttl.as_millis() as u64),
            ),
        };
        let cacheable = expires_at_ms > now && self.generation.load(Ordering::Acquire) == generation;
        if cacheable {
            self.local.insert(key, outcome.clone(), expires_at_ms, now);
        }
        outcome
    }

    /// Drops one credential (e.g. the session a logout ended).
    pub fn invalidate_key(&self, key: &CacheKey) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        self.local.remove(key);
    }

    /// Drops every credential of one principal, or of a whole kind when
    /// `principal.id` is 0 (Grafana did not say whose it was).
    pub fn invalidate_principal(&self, principal: Principal) -> usize {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        self.local
            .remove_matching(|p, _| {
                p.kind == principal.kind && (principal.id == 0 || p.id == principal.id || p.id == 0)
            })
            .len()
    }

    /// Drops every credential that authenticated one way (e.g. all legacy keys).
    pub fn invalidate_method(&self, method: AuthMethod) -> usize {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        self.local.remove_matching(|_, m| m == method).len()
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
        let period = self
            .negative_ttl
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

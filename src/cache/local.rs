//! L1: the in-process map of verified (and briefly, refused) credentials.
//! Expiry is checked on every read; a purge task and a size bound keep memory
//! flat under a flood of distinct credentials.

use std::sync::Arc;

use dashmap::DashMap;

use super::key::KeyHashBuilder;
use super::CacheKey;
use crate::auth::{AuthMethod, DenyReason, Identity, Principal};

#[derive(Debug, Clone)]
pub enum Outcome {
    Allowed(Arc<Identity>),
    Denied(DenyReason),
}

#[derive(Debug, Clone)]
struct Entry {
    outcome: Outcome,
    expires_at_ms: u64,
    /// When it was verified (or read from L2); used after a pub/sub outage.
    stored_at_ms: u64,
}

pub struct LocalCache {
    map: DashMap<CacheKey, Entry, KeyHashBuilder>,
    max_entries: usize,
}

impl LocalCache {
    pub fn new(max_entries: usize) -> LocalCache {
        LocalCache {
            map: DashMap::with_capacity_and_hasher(max_entries.min(4096), KeyHashBuilder::default()),
            max_entries,
        }
    }

    pub fn get(&self, key: &CacheKey, now_ms: u64) -> Option<Outcome> {
        let hit = {
            let entry = self.map.get(key)?;
            if now_ms < entry.expires_at_ms {
                return Some(entry.outcome.clone());
            }
            entry.expires_at_ms
        };
        // Expired: remove it unless someone replaced it meanwhile.
        self.map.remove_if(key, |_, e| e.expires_at_ms == hit);
        None
    }

    pub fn insert(&self, key: CacheKey, outcome: Outcome, expires_at_ms: u64, now_ms: u64) {
        if self.map.len() >= self.max_entries && !self.map.contains_key(&key) {
            self.make_room(now_ms);
        }
        self.map.insert(
            key,
            Entry {
                outcome,
                expires_at_ms,
                stored_at_ms: now_ms,
            },
        );
    }

    /// Drops expired entries; if that is not enough, drops about an eighth of
    /// the map at random (keys are HMAC output, so their first byte is a fair
    /// die). One O(n) pass buys room for n/8 inserts.
    fn make_room(&self, now_ms: u64) {
        self.purge_expired(now_ms);
        if self.map.len() >= self.max_entries {
            let cut: u8 = rand::random();
            self.map.retain(|k, _| k.0[0].wrapping_sub(cut) >= 32);
        }
    }

    pub fn purge_expired(&self, now_ms: u64) -> usize {
        let before = self.map.len();
        self.map.retain(|_, e| now_ms < e.expires_at_ms);
        before.saturating_sub(self.map.len())
    }

    pub fn remove(&self, key: &CacheKey) -> bool {
        self.map.remove(key).is_some()
    }

    /// Removes every allowed entry for which `doomed` is true; returns their keys.
    pub fn remove_matching(&self, doomed: impl Fn(&Principal, AuthMethod) -> bool) -> Vec<CacheKey> {
        let mut removed = Vec::new();
        self.map.retain(|k, e| match &e.outcome {
            Outcome::Allowed(id) if doomed(&id.principal, id.method) => {
                removed.push(*k);
                false
            }
            _ => true,
        });
        removed
    }

    /// After a gap in the eviction feed: anything stored before `since_ms`
    /// may have been revoked meanwhile.
    pub fn remove_older_than(&self, since_ms: u64) -> usize {
        let before = self.map.len();
        self.map.retain(|_, e| e.stored_at_ms >= since_ms);
        before.saturating_sub(self.map.len())
    }

    pub fn clear(&self) {
        self.map.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> CacheKey {
        use sha2::Digest;
        CacheKey(sha2::Sha256::digest(n.to_be_bytes()).into())
    }

    #[test]
    fn expiry_is_checked_on_read() {
        let c = LocalCache::new(10);
        c.insert(key(1), Outcome::Denied(DenyReason::Invalid), 100, 0);
        assert!(c.get(&key(1), 99).is_some());
        assert!(c.get(&key(1), 100).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn size_is_bounded() {
        let c = LocalCache::new(1000);
        for n in 0..20_000 {
            c.insert(key(n), Outcome::Denied(DenyReason::Invalid), u64::MAX, 0);
            assert!(c.len() <= 1000);
        }
        assert!(c.len() > 400, "{}", c.len());
    }
}

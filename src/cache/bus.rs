//! The eviction bus: revocations travel between replicas on a Redis pub/sub
//! channel, and every receiver confirms on a second channel once its memory
//! no longer holds what was revoked.
//!
//! The replica that saw the revoking call answers its client only after
//!
//! 1. evicting locally, then publishing the eviction and waiting until every
//!    subscriber (PUBLISH tells how many) has confirmed — each one has then
//!    dropped its memory entries, bumped its generation (so no verification
//!    that started earlier gets cached) and waited for its own Redis writes
//!    in flight;
//! 2. deleting the Redis entries through the principal's index sets (every
//!    stale write has landed by now, so this catches all of them);
//! 3. publishing once more and waiting again: a replica that read a stale
//!    Redis entry between 1 and 2 drops it from memory.
//!
//! So when the revoking response reaches its client, no subscribed replica
//! and no Redis entry still holds the revoked identity: the next request,
//! wherever it lands, is verified again. A replica that was not subscribed
//! (Redis away, subscription broken) drops every memory entry older than its
//! re-subscription as soon as it has one.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::shared::{next_backoff, Shared, FIRST_BACKOFF};
use super::{Cache, CacheKey, Eviction};
use crate::auth::{AuthMethod, Principal};
use crate::shutdown::Shutdown;

#[derive(Serialize, Deserialize)]
enum Wire {
    #[serde(rename = "key")]
    Key(String),
    #[serde(rename = "principal")]
    Principal(Principal),
    #[serde(rename = "method")]
    Method(AuthMethod),
    #[serde(rename = "retire")]
    Retire(String),
}

#[derive(Serialize, Deserialize)]
struct Message {
    id: String,
    evict: Vec<Wire>,
}

pub(super) fn encode(id: &str, evictions: &[Eviction]) -> String {
    let message = Message {
        id: id.to_owned(),
        evict: evictions
            .iter()
            .map(|e| match e {
                Eviction::Key(k) => Wire::Key(k.to_hex()),
                Eviction::Principal(p) => Wire::Principal(*p),
                Eviction::Method(m) => Wire::Method(*m),
                Eviction::Retire(k) => Wire::Retire(k.to_hex()),
            })
            .collect(),
    };
    serde_json::to_string(&message).unwrap_or_default()
}

fn decode(text: &[u8]) -> Option<(String, Vec<Eviction>)> {
    let message: Message = serde_json::from_slice(text).ok()?;
    let evictions = message
        .evict
        .into_iter()
        .filter_map(|w| {
            Some(match w {
                Wire::Key(hex) => Eviction::Key(CacheKey::from_hex(&hex)?),
                Wire::Principal(p) => Eviction::Principal(p),
                Wire::Method(m) => Eviction::Method(m),
                Wire::Retire(hex) => Eviction::Retire(CacheKey::from_hex(&hex)?),
            })
        })
        .collect();
    Some((message.id, evictions))
}

/// Subscribes (now, so that a gateway that has started is on the bus), then
/// keeps the subscription alive in the background.
pub(super) async fn start(cache: &Arc<Cache>, shared: Arc<Shared>, shutdown: Shutdown) {
    let first = if shared.is_commands_up() {
        match shared.subscribe().await {
            Ok(pubsub) => Some(pubsub),
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to the Redis eviction bus yet; retrying in the background");
                None
            }
        }
    } else {
        None
    };
    if first.is_some() {
        cache.after_gap();
        shared.set_subscribed(true);
    }
    tokio::spawn(run(Arc::downgrade(cache), shared, first, shutdown));
}

async fn run(
    cache: Weak<Cache>,
    shared: Arc<Shared>,
    mut first: Option<redis::aio::PubSub>,
    mut shutdown: Shutdown,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let pubsub = match first.take() {
            Some(p) => p,
            None => {
                let attempt = tokio::select! {
                    a = shared.subscribe() => a,
                    _ = shutdown.wait() => return,
                };
                match attempt {
                    Ok(p) => {
                        let Some(c) = cache.upgrade() else { return };
                        // Anything remembered before now may have been
                        // revoked while we were not listening.
                        c.after_gap();
                        shared.set_subscribed(true);
                        backoff = FIRST_BACKOFF;
                        p
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, ?backoff, "Redis subscribe failed");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.wait() => return,
                        }
                        backoff = next_backoff(backoff);
                        continue;
                    }
                }
            }
        };
        shared.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
        let mut stream = pubsub.into_on_message();
        loop {
            let message = tokio::select! {
                m = stream.next() => m,
                _ = shutdown.wait() => return,
            };
            let Some(message) = message else { break };
            let Some(cache) = cache.upgrade() else { return };
            let payload = message.get_payload_bytes();
            if message.get_channel_name() == shared.ack_channel {
                if let Ok(id) = std::str::from_utf8(payload) {
                    cache.acknowledged(id);
                }
                continue;
            }
            let Some((id, evictions)) = decode(payload) else {
                tracing::warn!("undecodable message on the eviction channel");
                continue;
            };
            cache.evict_local(&evictions);
            cache.settle_writes().await;
            shared.stats.evictions_received.fetch_add(1, Ordering::Relaxed);
            // Confirmation: this replica no longer serves what was revoked.
            let _ = shared.publish(&shared.ack_channel, &id).await;
        }
        shared.set_subscribed(false);
        // The command connection likely went with it: find out now.
        let checker = shared.clone();
        tokio::spawn(async move { checker.check().await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::PrincipalKind;

    #[test]
    fn messages_round_trip() {
        let key = CacheKey([7; 32]);
        let evictions = [
            Eviction::Key(key),
            Eviction::Principal(Principal {
                kind: PrincipalKind::ServiceAccount,
                id: 3,
            }),
            Eviction::Method(AuthMethod::ApiKey),
        ];
        let text = encode("a-1", &evictions);
        let (id, back) = decode(text.as_bytes()).unwrap();
        assert_eq!(id, "a-1");
        assert_eq!(back, evictions);
    }
}

//! L2: verified identities in Redis, shared by every replica of a fleet.
//!
//! Keys are `prefix + hex(HMAC cache key)`, values the JSON of an
//! [`Identity`] (never a secret), with an expiry equal to the identity's
//! remaining TTL. Per-principal, per-kind and per-method index sets name the
//! keys that one revocation must drop. Every call is bounded by
//! `cache.redis.timeout`; a connection that fails opens a circuit (calls are
//! skipped at no cost) and a background task reconnects with back-off.
//!
//! Standalone (`redis://`, `rediss://`), Sentinel (`redis+sentinel://`) and
//! Cluster (`cache.redis.cluster`) all go through the `redis` crate's own
//! clients.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisFuture,
    RedisResult, Value,
};
use tokio::sync::Notify;

use super::CacheKey;
use crate::auth::identity::now_ms;
use crate::auth::{AuthMethod, Identity, Principal, PrincipalKind};
use crate::config::redis::{connect_timeout, redact, Target};
use crate::config::RedisConfig;
use crate::shutdown::Shutdown;

/// Consecutive time-outs (not errors: those open it at once) that open the circuit.
const TIMEOUTS_TO_OPEN: u32 = 3;
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Target {
    fn describe(&self) -> &'static str {
        match self {
            Target::Single(_) => "standalone",
            Target::Sentinel { .. } => "sentinel",
            Target::Cluster { .. } => "cluster",
        }
    }

    /// The client of the node that carries pub/sub (the master, or the
    /// cluster's first answering seed).
    async fn bus_client(&self, timeout: Duration) -> RedisResult<Client> {
        match self {
            Target::Single(client) => Ok(client.clone()),
            Target::Sentinel {
                sentinel,
                service,
                node,
            } => {
                let mut sentinel = sentinel.lock().await;
                sentinel.async_master_for(service, Some(node)).await
            }
            Target::Cluster { seeds, .. } => {
                let mut last = None;
                for seed in seeds {
                    match mux(seed, timeout).await {
                        Ok(mut c) => match ping(&mut c, timeout).await {
                            Ok(()) => return Ok(seed.clone()),
                            Err(e) => last = Some(e),
                        },
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| RedisError::from((ErrorKind::ClientError, "no cluster seed"))))
            }
        }
    }

    /// Opens the command connection and the publishing connection, PINGs both.
    async fn connect(&self, timeout: Duration) -> RedisResult<Connected> {
        let bus_client = self.bus_client(timeout).await?;
        let mut bus = mux(&bus_client, timeout).await?;
        ping(&mut bus, timeout).await?;
        let data = match self {
            Target::Cluster { client, .. } => {
                let mut c = tokio::time::timeout(connect_timeout(timeout), client.get_async_connection())
                    .await
                    .map_err(|_| timed_out())??;
                ping(&mut c, timeout).await?;
                Conn::Cluster(c)
            }
            _ => Conn::Single(bus.clone()),
        };
        Ok(Connected {
            data,
            bus,
            bus_client,
        })
    }
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis did not answer in time",
    ))
}

async fn mux(client: &Client, timeout: Duration) -> RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new().set_connection_timeout(connect_timeout(timeout));
    tokio::time::timeout(
        connect_timeout(timeout) + timeout,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .map_err(|_| timed_out())?
}

async fn ping<C: ConnectionLike + Send>(conn: &mut C, timeout: Duration) -> RedisResult<()> {
    let answer: String = tokio::time::timeout(connect_timeout(timeout), redis::cmd("PING").query_async(conn))
        .await
        .map_err(|_| timed_out())??;
    if answer == "PONG" {
        Ok(())
    } else {
        Err(RedisError::from((
            ErrorKind::ResponseError,
            "unexpected PING answer",
        )))
    }
}

/// Whether an error means the credentials in `cache.redis.url` are wrong
/// (fatal at start) rather than Redis being away (degraded).
pub fn is_auth_error(e: &RedisError) -> bool {
    e.kind() == ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH") | Some("WRONGPASS") | Some("NOPERM"))
        || e.to_string().contains("NOAUTH")
        || e.to_string().contains("WRONGPASS")
}

/// Command connection: one multiplexed socket, or the cluster client's.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

struct Connected {
    data: Conn,
    /// PUBLISH goes here: the node the replicas subscribe on.
    bus: MultiplexedConnection,
    bus_client: Client,
}

/// Counters for `/metrics` and the tests.
#[derive(Default)]
pub struct SharedStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub writes: AtomicU64,
    /// Calls that failed or timed out (each then went on without Redis).
    pub errors: AtomicU64,
    /// Calls skipped because the circuit was open.
    pub skipped: AtomicU64,
    pub reconnects: AtomicU64,
    pub evictions_published: AtomicU64,
    /// Eviction messages received and applied (including our own).
    pub evictions_received: AtomicU64,
    /// Broadcasts for which not every subscriber confirmed in time.
    pub evictions_unconfirmed: AtomicU64,
    /// Times the subscription was (re-)established.
    pub subscriptions: AtomicU64,
    /// Microseconds the last fleet-wide revocation took (both broadcasts
    /// confirmed and Redis cleaned), as the revoking call waited for it.
    pub last_revocation_us: AtomicU64,
}

/// Told whether Redis is fully usable (commands and subscription).
type StateHook = Box<dyn Fn(bool) + Send + Sync>;

pub struct Shared {
    target: Target,
    pub timeout: Duration,
    prefix: String,
    pub channel: String,
    pub ack_channel: String,
    /// Index sets live as long as the longest entry they can name.
    index_ttl: Duration,
    /// `None`: circuit open (Redis unusable), calls are skipped.
    conn: ArcSwapOption<Connected>,
    timeouts: AtomicU32,
    reconnect: Notify,
    subscribed: AtomicBool,
    commands_up: AtomicBool,
    state_hook: std::sync::Mutex<Option<StateHook>>,
    pub stats: SharedStats,
}

impl Shared {
    /// Connects once (PING). Wrong credentials are an error naming the key;
    /// an unreachable Redis is not: the gateway starts degraded and the
    /// reconnector keeps trying.
    pub async fn connect(config: &RedisConfig, ttl: Duration) -> Result<Arc<Shared>, (&'static str, String)> {
        let target = Target::parse(config, config.timeout)?;
        let key = if config.cluster.is_empty() {
            "cache.redis.url"
        } else {
            "cache.redis.cluster"
        };
        let shared = Arc::new(Shared {
            target,
            timeout: config.timeout,
            prefix: config.prefix.clone(),
            channel: config.channel.clone(),
            ack_channel: format!("{}:ack", config.channel),
            index_ttl: ttl,
            conn: ArcSwapOption::empty(),
            timeouts: AtomicU32::new(0),
            reconnect: Notify::new(),
            subscribed: AtomicBool::new(false),
            commands_up: AtomicBool::new(false),
            state_hook: std::sync::Mutex::new(None),
            stats: SharedStats::default(),
        });
        let shown = if config.cluster.is_empty() {
            redact(&config.url)
        } else {
            config
                .cluster
                .iter()
                .map(|u| redact(u))
                .collect::<Vec<_>>()
                .join(",")
        };
        match shared.target.connect(config.timeout).await {
            Ok(connected) => {
                shared.conn.store(Some(Arc::new(connected)));
                shared.commands_up.store(true, Ordering::Relaxed);
                tracing::info!(redis = %shown, mode = shared.target.describe(), "Redis connected: shared cache and eviction bus on");
            }
            Err(e) if is_auth_error(&e) => {
                return Err((
                    key,
                    format!("Redis at {shown} refused the credentials (user/password in the URL): {e}"),
                ));
            }
            Err(e) => {
                tracing::warn!(redis = %shown, error = %e, "Redis unreachable at start: serving from memory and the verifier; reconnecting in the background");
                shared.reconnect.notify_one();
            }
        }
        Ok(shared)
    }

    /// Called with `true` when commands and subscription are both up, `false`
    /// when either is down (for `/readyz`).
    pub fn on_state(&self, hook: impl Fn(bool) + Send + Sync + 'static) {
        hook(self.is_up());
        *self.state_hook.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(hook));
    }

    pub fn is_commands_up(&self) -> bool {
        self.conn.load().is_some()
    }

    pub fn is_up(&self) -> bool {
        self.commands_up.load(Ordering::Relaxed) && self.subscribed.load(Ordering::Relaxed)
    }

    fn notify_state(&self) {
        let up = self.is_up();
        if let Some(hook) = self.state_hook.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            hook(up);
        }
    }

    pub fn set_subscribed(&self, up: bool) {
        if self.subscribed.swap(up, Ordering::AcqRel) != up {
            if up {
                tracing::info!(channel = %self.channel, "Redis eviction bus subscribed");
            } else {
                tracing::warn!(channel = %self.channel, "Redis eviction bus lost: memory entries will be dropped when it is back");
            }
            self.notify_state();
        }
    }

    fn key(&self, key: &CacheKey) -> String {
        format!("{}{}", self.prefix, key.to_hex())
    }

    fn principal_index(&self, p: &Principal) -> String {
        format!("{}idx:principal:{:?}:{}", self.prefix, p.kind, p.id)
    }

    fn kind_index(&self, kind: PrincipalKind) -> String {
        format!("{}idx:kind:{kind:?}", self.prefix)
    }

    fn method_index(&self, method: AuthMethod) -> String {
        format!("{}idx:method:{}", self.prefix, method.as_str())
    }

    /// Opens the circuit (when `current` is still the live connection).
    fn open_circuit(&self, current: &Arc<Connected>, error: &dyn std::fmt::Display) {
        let previous = self.conn.compare_and_swap(current, None);
        if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, current)) {
            self.commands_up.store(false, Ordering::Relaxed);
            tracing::warn!(error = %error, "Redis unusable: serving from memory and the verifier; reconnecting in the background");
            self.notify_state();
            self.reconnect.notify_one();
        }
    }

    fn failed(&self, current: &Arc<Connected>, e: RedisError) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
            self.open_circuit(current, &e);
        } else {
            tracing::debug!(error = %e, "Redis command failed");
        }
    }

    fn timed_out(&self, current: &Arc<Connected>) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if self.timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= TIMEOUTS_TO_OPEN {
            self.timeouts.store(0, Ordering::Relaxed);
            self.open_circuit(
                current,
                &format_args!("{TIMEOUTS_TO_OPEN} calls in a row took over {:?}", self.timeout),
            );
        }
    }

    /// Runs `cmds` on the command connection (`bus`: on the pub/sub node),
    /// bounded by the time-out; `None` if Redis is unusable. One pipelined
    /// round trip, or on a cluster one call per command, all at once (a
    /// cluster pipeline would go whole to the first key's node).
    async fn run(&self, cmds: &[Cmd], bus: bool) -> Option<Vec<Value>> {
        let Some(current) = self.conn.load_full() else {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let answer = match (&current.data, bus) {
            (Conn::Cluster(c), false) => {
                let calls = cmds.iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { cmd.query_async::<Value>(&mut c).await }
                });
                tokio::time::timeout(self.timeout, futures_util::future::try_join_all(calls)).await
            }
            _ => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd.clone());
                }
                let mut c = if bus {
                    Conn::Single(current.bus.clone())
                } else {
                    current.data.clone()
                };
                tokio::time::timeout(self.timeout, pipe.query_async::<Vec<Value>>(&mut c)).await
            }
        };
        match answer {
            Ok(Ok(values)) => {
                self.timeouts.store(0, Ordering::Relaxed);
                Some(values)
            }
            Ok(Err(e)) => {
                self.failed(&current, e);
                None
            }
            Err(_) => {
                self.timed_out(&current);
                None
            }
        }
    }

    /// Reserves one of `budget` failure slots of a login (keyed by
    /// `login`) within the sliding `window`, for the whole fleet at once:
    /// `Some(Ok(()))` reserved, `Some(Err(retry_after))` when all are taken,
    /// `None` when Redis cannot be asked.
    pub async fn reserve_failure(
        &self,
        login: &CacheKey,
        member: &str,
        budget: u32,
        window: Duration,
    ) -> Option<Result<(), Duration>> {
        const RESERVE: &str = r#"
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return -1
"#;
        let cmd = redis::cmd("EVAL")
            .arg(RESERVE)
            .arg(1)
            .arg(self.failures_key(login))
            .arg(now_ms())
            .arg(window.as_millis() as u64)
            .arg(budget)
            .arg(member)
            .clone();
        let values = self.run(&[cmd], false).await?;
        let wait: i64 = values.first().and_then(|v| i64::from_redis_value(v).ok())?;
        Some(if wait < 0 {
            Ok(())
        } else {
            Err(Duration::from_millis(wait as u64))
        })
    }

    /// Moves a failed slot's time to `now_ms`, when Grafana counted it.
    pub async fn restamp_failure(&self, login: &CacheKey, member: &str, now_ms: u64) {
        let cmd = redis::cmd("ZADD")
            .arg(self.failures_key(login))
            .arg("XX")
            .arg(now_ms)
            .arg(member)
            .clone();
        self.run(&[cmd], false).await;
    }

    /// Gives a reserved failure slot back (the check did not fail).
    pub async fn release_failure(&self, login: &CacheKey, member: &str) {
        let cmd = redis::cmd("ZREM")
            .arg(self.failures_key(login))
            .arg(member)
            .clone();
        self.run(&[cmd], false).await;
    }

    /// Remembers (`Some(for)`) or forgets (`None`) that a credential verified.
    pub async fn set_known_good(&self, key: &CacheKey, remember: Option<Duration>) {
        let name = self.known_good_key(key);
        let cmd = match remember {
            Some(ttl) => redis::cmd("SET")
                .arg(name)
                .arg(1)
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .clone(),
            None => redis::cmd("DEL").arg(name).clone(),
        };
        self.run(&[cmd], false).await;
    }

    /// Whether some replica saw this credential verify recently; `None` when
    /// Redis cannot be asked.
    pub async fn is_known_good(&self, key: &CacheKey) -> Option<bool> {
        let cmd = redis::cmd("EXISTS").arg(self.known_good_key(key)).clone();
        let values = self.run(&[cmd], false).await?;
        values
            .first()
            .and_then(|v| i64::from_redis_value(v).ok())
            .map(|n| n > 0)
    }

    fn failures_key(&self, login: &CacheKey) -> String {
        format!("{}lf:{}", self.prefix, login.to_hex())
    }

    fn known_good_key(&self, key: &CacheKey) -> String {
        format!("{}kg:{}", self.prefix, key.to_hex())
    }

    /// The identity stored under `key`, if any and still fresh.
    pub async fn get(&self, key: &CacheKey) -> Option<Identity> {
        let values = self
            .run(&[redis::cmd("GET").arg(self.key(key)).clone()], false)
            .await?;
        let value: Option<String> = values.first().and_then(|v| String::from_redis_value(v).ok());
        let identity = value.and_then(|v| serde_json::from_str::<Identity>(&v).ok());
        match identity {
            Some(identity) if identity.is_fresh(now_ms()) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Some(identity)
            }
            _ => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Write-through of a fresh verification: the entry (expiring with the
    /// identity) and its three index memberships, one round trip.
    pub async fn put(&self, key: &CacheKey, identity: &Identity) {
        let remaining = identity.remaining(now_ms());
        if remaining.is_zero() {
            return;
        }
        let Ok(value) = serde_json::to_string(identity) else {
            return;
        };
        let hex = key.to_hex();
        let index_ms = self.index_ttl.max(remaining).as_millis() as u64;
        let mut cmds = vec![redis::cmd("SET")
            .arg(self.key(key))
            .arg(value)
            .arg("PX")
            .arg(remaining.as_millis().max(1) as u64)
            .clone()];
        for index in [
            self.principal_index(&identity.principal),
            self.kind_index(identity.principal.kind),
            self.method_index(identity.method),
        ] {
            cmds.push(redis::cmd("SADD").arg(&index).arg(&hex).clone());
            cmds.push(redis::cmd("PEXPIRE").arg(&index).arg(index_ms).clone());
        }
        if self.run(&cmds, false).await.is_some() {
            self.stats.writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Deletes every stored entry an eviction names, with the index sets that
    /// named them. Returns false if Redis could not be asked.
    pub async fn delete(&self, evictions: &[super::Eviction]) -> bool {
        use super::Eviction;
        let mut direct = Vec::new();
        let mut indexes = Vec::new();
        for eviction in evictions {
            match eviction {
                Eviction::Key(k) | Eviction::Retire(k) => direct.push(self.key(k)),
                Eviction::Principal(p) if p.id == 0 => indexes.push(self.kind_index(p.kind)),
                Eviction::Principal(p) => {
                    indexes.push(self.principal_index(p));
                    indexes.push(self.principal_index(&Principal { kind: p.kind, id: 0 }));
                }
                Eviction::Method(m) => indexes.push(self.method_index(*m)),
            }
        }
        if !indexes.is_empty() {
            let cmds: Vec<Cmd> = indexes
                .iter()
                .map(|i| redis::cmd("SMEMBERS").arg(i).clone())
                .collect();
            let Some(members) = self.run(&cmds, false).await else {
                return false;
            };
            for set in members {
                let hexes: Vec<String> = Vec::from_redis_value(&set).unwrap_or_default();
                direct.extend(hexes.into_iter().map(|hex| format!("{}{hex}", self.prefix)));
            }
            // Emptied indexes go too; members are re-added on the next write.
            direct.extend(indexes);
        }
        if direct.is_empty() {
            return true;
        }
        // One DEL per key: a cluster spreads them over slots.
        let cmds: Vec<Cmd> = direct.iter().map(|k| redis::cmd("DEL").arg(k).clone()).collect();
        self.run(&cmds, false).await.is_some()
    }

    /// PUBLISHes on the bus node; the number of subscribers that received it.
    pub async fn publish(&self, channel: &str, message: &str) -> Option<usize> {
        let values = self
            .run(&[redis::cmd("PUBLISH").arg(channel).arg(message).clone()], true)
            .await?;
        values.first().and_then(|v| usize::from_redis_value(v).ok())
    }

    /// A fresh subscription on the bus node, to both channels.
    pub async fn subscribe(&self) -> RedisResult<redis::aio::PubSub> {
        let client = match self.conn.load_full() {
            Some(c) => c.bus_client.clone(),
            None => self.target.bus_client(self.timeout).await?,
        };
        let limit = connect_timeout(self.timeout);
        let mut pubsub = tokio::time::timeout(limit, client.get_async_pubsub())
            .await
            .map_err(|_| timed_out())??;
        tokio::time::timeout(limit, async {
            pubsub.subscribe(&self.channel).await?;
            pubsub.subscribe(&self.ack_channel).await
        })
        .await
        .map_err(|_| timed_out())??;
        Ok(pubsub)
    }

    /// Checks the command connection now (after the subscription broke).
    pub async fn check(&self) {
        let _ = self.run(&[redis::cmd("PING")], false).await;
    }

    /// Reconnects whenever the circuit opens, with exponential back-off.
    pub fn spawn_reconnector(self: &Arc<Self>, mut shutdown: Shutdown) {
        let s = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = s.reconnect.notified() => {}
                    _ = shutdown.wait() => return,
                }
                let mut backoff = BACKOFF_FIRST;
                while s.conn.load().is_none() {
                    match s.target.connect(s.timeout).await {
                        Ok(connected) => {
                            s.conn.store(Some(Arc::new(connected)));
                            s.timeouts.store(0, Ordering::Relaxed);
                            s.commands_up.store(true, Ordering::Relaxed);
                            s.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                            tracing::info!("Redis reconnected: shared cache back on");
                            s.notify_state();
                            break;
                        }
                        Err(e) if is_auth_error(&e) => {
                            tracing::error!(error = %e, "Redis refuses the configured credentials; still retrying");
                        }
                        Err(e) => tracing::debug!(error = %e, ?backoff, "Redis reconnect failed"),
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait() => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        });
    }
}

/// Back-off between attempts to reach Redis again.
pub fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(BACKOFF_MAX)
}

pub const FIRST_BACKOFF: Duration = BACKOFF_FIRST;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("redis://:s3cret@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact("rediss://u:p@h/"), "rediss://u:***@h/");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn parses_sentinel_urls() {
        let config = RedisConfig {
            url: "redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2/mymaster/2".into(),
            ..RedisConfig::default()
        };
        match Target::parse(&config, Duration::from_millis(50)) {
            Ok(Target::Sentinel { service, node, .. }) => {
                assert_eq!(service, "mymaster");
                let info = node.redis_connection_info.unwrap();
                assert_eq!(info.db, 2);
                assert_eq!(info.password.as_deref(), Some("pw"));
            }
            _ => panic!("not parsed as sentinel"),
        }
        let bad = RedisConfig {
            url: "redis+sentinel://10.0.0.1:26379".into(),
            ..RedisConfig::default()
        };
        assert!(Target::parse(&bad, Duration::from_millis(50)).is_err());
        let bad = RedisConfig {
            url: "http://x".into(),
            ..RedisConfig::default()
        };
        assert_eq!(
            Target::parse(&bad, Duration::from_millis(50)).err().unwrap().0,
            "cache.redis.url"
        );
    }
}

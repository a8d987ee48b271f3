//! Where the Redis servers of `cache.redis` are: standalone (`redis://`,
//! `rediss://`), Sentinel (`redis+sentinel://`) or Cluster (`cache.redis.cluster`),
//! parsed once here so that `check` and start-up refuse the same mistakes.
//! The connections themselves are the cache's (`src/cache/shared.rs`).

use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{Client, ConnectionAddr, ConnectionInfo, RedisConnectionInfo, TlsMode};

use super::RedisConfig;

/// Where the Redis servers are.
pub enum Target {
    Single(Client),
    Sentinel {
        sentinel: tokio::sync::Mutex<Sentinel>,
        service: String,
        node: SentinelNodeConnectionInfo,
    },
    /// Commands go through the cluster client; pub/sub (which a cluster
    /// propagates to every node) through the first seed that answers, so that
    /// every replica counts the same subscribers.
    Cluster {
        client: ClusterClient,
        seeds: Vec<Client>,
    },
}

impl Target {
    /// Parses `cache.redis`; the error names the key and says why.
    pub fn parse(config: &RedisConfig, timeout: Duration) -> Result<Target, (&'static str, String)> {
        if !config.cluster.is_empty() {
            let key = "cache.redis.cluster";
            let mut seeds = Vec::new();
            for url in &config.cluster {
                let client = Client::open(url.as_str())
                    .map_err(|e| (key, format!("`{}` is not a redis:// URL: {e}", redact(url))))?;
                seeds.push(client);
            }
            let client = ClusterClient::builder(config.cluster.clone())
                .connection_timeout(connect_timeout(timeout))
                .response_timeout(timeout.max(Duration::from_millis(10)))
                .retries(1)
                .build()
                .map_err(|e| (key, format!("not a usable cluster seed list: {e}")))?;
            return Ok(Target::Cluster { client, seeds });
        }
        let key = "cache.redis.url";
        let url = config.url.as_str();
        if let Some((tls, rest)) = url
            .strip_prefix("redis+sentinel://")
            .map(|r| (false, r))
            .or_else(|| url.strip_prefix("rediss+sentinel://").map(|r| (true, r)))
        {
            return parse_sentinel(tls, rest).map_err(|reason| (key, reason));
        }
        if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://"))
        {
            return Err((
                key,
                "not a redis://, rediss:// or redis+sentinel:// URL".to_owned(),
            ));
        }
        let client = Client::open(url).map_err(|e| (key, format!("not a usable Redis URL: {e}")))?;
        Ok(Target::Single(client))
    }
}

fn parse_sentinel(tls: bool, rest: &str) -> Result<Target, String> {
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let (username, password) = match userinfo {
        Some(u) => {
            let (user, pass) = u.split_once(':').unwrap_or((u, ""));
            (
                (!user.is_empty()).then(|| decode(user)),
                (!pass.is_empty()).then(|| decode(pass)),
            )
        }
        None => (None, None),
    };
    let mut nodes = Vec::new();
    for host in hosts.split(',').filter(|h| !h.is_empty()) {
        let (name, port) = match host.rsplit_once(':') {
            Some((n, p)) if !n.ends_with(']') || host.starts_with('[') => (
                n.trim_matches(|c| c == '[' || c == ']'),
                p.parse::<u16>()
                    .map_err(|_| format!("`{host}`: the port is not a number"))?,
            ),
            _ => (host.trim_matches(|c| c == '[' || c == ']'), 26379),
        };
        nodes.push(ConnectionInfo {
            addr: ConnectionAddr::Tcp(name.to_owned(), port),
            redis: RedisConnectionInfo::default(),
        });
    }
    if nodes.is_empty() {
        return Err("redis+sentinel:// needs at least one sentinel host:port".into());
    }
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    let service = parts
        .next()
        .ok_or("redis+sentinel://HOSTS/SERVICE: the master's service name is missing")?
        .to_owned();
    let db = match parts.next() {
        Some(d) => d
            .parse::<i64>()
            .map_err(|_| format!("`{d}` is not a database number"))?,
        None => 0,
    };
    let sentinel = Sentinel::build(nodes).map_err(|e| format!("not a usable sentinel list: {e}"))?;
    Ok(Target::Sentinel {
        sentinel: tokio::sync::Mutex::new(sentinel),
        service,
        node: SentinelNodeConnectionInfo {
            tls_mode: tls.then_some(TlsMode::Secure),
            redis_connection_info: Some(RedisConnectionInfo {
                db,
                username,
                password,
                ..RedisConnectionInfo::default()
            }),
        },
    })
}

/// A URL fit for logs: the password replaced.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..])
        }
        None => url.to_owned(),
    }
}

/// Connecting may take longer than one command.
pub(crate) fn connect_timeout(timeout: Duration) -> Duration {
    timeout.max(Duration::from_secs(1))
}

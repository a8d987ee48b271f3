//! Resident memory of the identity cache, two ways.
//!
//! In this process: fills the cache with N distinct verified identities
//! (realistic logins, emails and names) through the same path a request takes,
//! and prints the process' RSS before and after.
//!
//! `cargo run --release --example cache_memory -- 100000`
//!
//! For a running gateway (the benchmark's memory case): writes N such
//! identities for N freshly generated, well-formed `glsa_` tokens into Redis
//! through the gateway's own L2 writer, keyed with the gateway's HMAC key, and
//! prints the tokens. A gateway on that Redis and key then loads each identity
//! on first sight, as it would one verified by another replica, so that a
//! load over the token list fills its L1 without N PBKDF2 verifications.
//!
//! `cargo run --release --example cache_memory -- 100000 --seed-redis
//!  redis://127.0.0.1:6379/ --key-file certs/cache.key --ttl 1h > tokens.txt`

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use grafana_stub::credentials::SaToken;
use portcullis::auth::{
    AuthMethod, Credential, Identity, IdentityRecord, Principal, PrincipalKind, Role, Verdict,
};
use portcullis::cache::{Cache, KeyOrigin, Keyer, Shared};
use portcullis::config::{CacheConfig, RedisConfig};

const USAGE: &str = "usage: cache_memory [N] [--seed-redis URL --key-file FILE [--ttl 1h]]";

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The i-th identity: a service account with a login, an email and a name of
/// the lengths Grafana's own tend to have.
fn identity(i: usize) -> Identity {
    Identity::from(IdentityRecord {
        principal: Principal {
            kind: PrincipalKind::ServiceAccount,
            id: i as i64 + 1,
        },
        login: format!("sa-1-service-account-{i}").into(),
        email: format!("service-account-{i}@example.com").into(),
        name: format!("Service Account {i}").into(),
        org_id: 1,
        org_role: Role::Viewer,
        other_orgs: Default::default(),
        grafana_admin: false,
        method: AuthMethod::ServiceToken,
        verified_at_ms: 0,
        expires_at_ms: 0,
    })
}

fn token_credential(token: String) -> Credential {
    Credential::ServiceToken {
        token,
        from_service_token_basic: false,
    }
}

struct Seed {
    redis_url: String,
    key_file: PathBuf,
    ttl: Duration,
}

fn parse_args() -> Result<(usize, Option<Seed>), String> {
    let mut n = 100_000;
    let (mut url, mut key_file, mut ttl) = (None, None, Duration::from_secs(3600));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seed-redis" => url = Some(value()?),
            "--key-file" => key_file = Some(PathBuf::from(value()?)),
            "--ttl" => {
                let text = value()?;
                ttl = humantime::parse_duration(&text).map_err(|e| format!("--ttl {text}: {e}"))?;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => {
                n = other
                    .parse()
                    .map_err(|_| format!("`{other}` is not a count\n{USAGE}"))?
            }
        }
    }
    let seed = match (url, key_file) {
        (Some(redis_url), Some(key_file)) => Some(Seed {
            redis_url,
            key_file,
            ttl,
        }),
        (None, None) => None,
        _ => return Err(format!("--seed-redis and --key-file go together\n{USAGE}")),
    };
    Ok((n, seed))
}

async fn measure_in_process(n: usize) {
    let config = CacheConfig {
        max_entries: n,
        ..CacheConfig::default()
    };
    let cache = Arc::new(Cache::new(&config, Keyer::new(&[7; 32], KeyOrigin::File)));
    let before = rss_kib("VmRSS:");
    for i in 0..n {
        let key = cache
            .keyer
            .key(&token_credential(format!("glsa_{i:032}_00000000")));
        let verified = identity(i);
        cache
            .resolve(key, || async { Ok(Verdict::Allowed(Box::new(verified))) })
            .await
            .expect("verified");
    }
    let after = rss_kib("VmRSS:");
    println!(
        "identities: {}  RSS before: {} KiB  after: {} KiB  growth: {:.1} MiB ({:.0} bytes/identity)  VmHWM: {} KiB",
        cache.len(),
        before,
        after,
        (after - before) as f64 / 1024.0,
        (after - before) as f64 * 1024.0 / cache.len().max(1) as f64,
        rss_kib("VmHWM:")
    );
}

async fn seed_redis(n: usize, seed: Seed) -> Result<(), String> {
    let cache_config = CacheConfig {
        key_file: Some(seed.key_file),
        ..CacheConfig::default()
    };
    let keyer = Keyer::from_config(&cache_config, None).map_err(|e| e.to_string())?;
    let redis = RedisConfig {
        url: seed.redis_url,
        timeout: Duration::from_secs(5),
        ..RedisConfig::default()
    };
    let shared = Shared::connect(&redis, seed.ttl)
        .await
        .map_err(|(key, reason)| format!("{key}: {reason}"))?;
    if !shared.is_commands_up() {
        return Err("Redis did not answer".into());
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for i in 0..n {
        let token = SaToken::generate().encode();
        let key = keyer.key(&token_credential(token.clone()));
        let mut verified = identity(i);
        verified.stamp(seed.ttl, None);
        shared.put(&key, &verified).await;
        writeln!(out, "{token}").map_err(|e| format!("stdout: {e}"))?;
    }
    out.flush().map_err(|e| format!("stdout: {e}"))?;
    let written = shared.stats.writes.load(std::sync::atomic::Ordering::Relaxed);
    if written != n as u64 {
        return Err(format!("Redis took {written} of {n} identities"));
    }
    eprintln!("seeded {n} identities into Redis");
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let (n, seed) = match parse_args() {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    match seed {
        None => measure_in_process(n).await,
        Some(seed) => {
            if let Err(message) = seed_redis(n, seed).await {
                eprintln!("cache_memory: {message}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

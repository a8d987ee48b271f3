//! Resident memory of the identity cache: fills it with N distinct verified
//! identities (realistic logins, emails and names) through the same path a
//! request takes, and prints the process' RSS before and after.
//!
//! `cargo run --release --example cache_memory -- 100000`

use std::sync::Arc;

use portcullis::auth::{AuthMethod, Credential, Identity, Principal, PrincipalKind, Role, Verdict};
use portcullis::cache::{Cache, KeyOrigin, Keyer};
use portcullis::config::CacheConfig;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let config = CacheConfig {
        max_entries: n,
        ..CacheConfig::default()
    };
    let cache = Arc::new(Cache::new(&config, Keyer::new(&[7; 32], KeyOrigin::File)));
    let before = rss_kib("VmRSS:");
    for i in 0..n {
        let credential = Credential::ServiceToken {
            token: format!("glsa_{i:032}_00000000"),
            from_service_token_basic: false,
        };
        let key = cache.keyer.key(&credential);
        let identity = Identity {
            principal: Principal {
                kind: PrincipalKind::ServiceAccount,
                id: i as i64,
            },
            login: format!("sa-1-service-account-{i}"),
            email: format!("service-account-{i}@example.com"),
            name: format!("Service Account {i}"),
            org_id: 1,
            org_role: Role::Viewer,
            grafana_admin: false,
            method: AuthMethod::ServiceToken,
            verified_at_ms: 0,
            expires_at_ms: 0,
        };
        cache
            .resolve(key, || async { Ok(Verdict::Allowed(Box::new(identity))) })
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

//! No stranger can lock a user out: wrong passwords sent through the gateway
//! never add up to Grafana's lock-out (5 per login in 5 minutes, counted by
//! the stand-in exactly as Grafana does), and the real user still gets in.

use std::time::Duration;

use grafana_stub::{Flavor, GrafanaStub, StubOptions};
use portcullis::config::{Config, Profile};
use reqwest::header::RETRY_AFTER;
use reqwest::StatusCode;

use crate::fleet::{self, RedisServer};
use crate::support::{self, client, Gateway};

/// Grafana locks a login at this many failures in its window.
const GRAFANA_LOCKS_AT: usize = 5;

fn tune(config: &mut Config) {
    // Short, so that a trickle of one wrong password gets past the negative
    // cache quickly: each repetition is a new check for the shield to judge.
    config.cache.negative_ttl = Duration::from_millis(20);
}

async fn start(stub: &GrafanaStub, profile: Profile, tweak: impl FnOnce(&mut Config)) -> Gateway {
    let (mut config, dir) = support::config(&stub.url());
    config.auth.profile = profile;
    config.auth.session_cookie = stub.session_cookie_name();
    tune(&mut config);
    tweak(&mut config);
    support::start(config, dir).await
}

async fn basic(gw: &Gateway, path: &str, user: &str, password: &str) -> reqwest::Response {
    client()
        .get(format!("{}{path}", gw.url))
        .basic_auth(user, Some(password))
        .send()
        .await
        .unwrap()
}

/// Statuses of `n` requests with `password(i)`, a little apart.
async fn attempts(
    gw: &Gateway,
    path: &str,
    user: &str,
    n: usize,
    password: impl Fn(usize) -> String,
) -> Vec<StatusCode> {
    let mut statuses = Vec::new();
    for i in 0..n {
        let response = basic(gw, path, user, &password(i)).await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = response.headers()[RETRY_AFTER].to_str().unwrap().parse().unwrap();
            assert!((1..=300).contains(&retry), "Retry-After {retry}");
            let body: serde_json::Value = response.json().await.unwrap();
            assert!(body["message"].as_str().unwrap().contains("Too many"), "{body}");
            statuses.push(StatusCode::TOO_MANY_REQUESTS);
        } else {
            statuses.push(response.status());
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    statuses
}

fn count(statuses: &[StatusCode], status: StatusCode) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[tokio::test]
async fn a_trickle_or_a_spray_of_wrong_passwords_never_locks_the_admin_out() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let gw = start(&stub, Profile::Grafana, |_| {}).await;
    let path = "/api/org";

    // The admin has used the gateway: its password is known to be good.
    assert_eq!(basic(&gw, path, "admin", "admin").await.status(), 200);

    // A stranger trickles the same wrong password…
    let trickle = attempts(&gw, path, "admin", 20, |_| "wrong-password".into()).await;
    let after_trickle = stub.failed_logins("admin");
    // …and sprays distinct ones, in another spelling of the login.
    let spray = attempts(&gw, path, "ADMIN", 30, |i| format!("guess-{i}")).await;
    let after_spray = stub.failed_logins("admin");
    println!(
        "trickle: {} refused by Grafana, {} held back (429); spray: {} refused, {} held back; \
         failures Grafana counted for admin: {after_trickle} after the trickle, {after_spray} after the spray",
        count(&trickle, StatusCode::UNAUTHORIZED),
        count(&trickle, StatusCode::TOO_MANY_REQUESTS),
        count(&spray, StatusCode::UNAUTHORIZED),
        count(&spray, StatusCode::TOO_MANY_REQUESTS),
    );
    assert!(
        after_spray < GRAFANA_LOCKS_AT,
        "Grafana counted {after_spray} failures"
    );
    assert!(count(&trickle, StatusCode::TOO_MANY_REQUESTS) > 0);
    assert!(count(&spray, StatusCode::TOO_MANY_REQUESTS) >= 25);
    assert!(trickle.iter().chain(&spray).all(|s| *s == 401 || *s == 429));

    // The admin still gets in, verified afresh (its cache entry ran out).
    gw.running().gateway.cache().clear_local();
    assert_eq!(basic(&gw, path, "admin", "admin").await.status(), 200);
    // A password nobody has seen good is held back while the budget is used.
    stub.add_user("other-admin", "other-pw-1", "Admin", true);
    let _ = attempts(&gw, path, "other-admin", 4, |i| format!("bad-{i}")).await;
    assert_eq!(
        basic(&gw, path, "other-admin", "other-pw-1").await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(stub.failed_logins("other-admin"), 4);

    let metrics = client()
        .get(format!("{}/metrics", gw.admin_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let throttled: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_throttled_total{budget=\"login\"} "))
        .expect("throttle counter")
        .parse()
        .unwrap();
    assert!(throttled >= 25, "{throttled}");
    // And Grafana itself never locked it.
    assert!(
        stub.login("admin", "admin").is_some(),
        "admin locked out at Grafana"
    );
}

#[tokio::test]
async fn wrong_passwords_on_pmms_anonymous_graph_are_shielded_too() {
    let stub = GrafanaStub::start(Flavor::Pmm).await;
    let gw = start(&stub, Profile::Pmm, |_| {}).await;
    // `/graph` is forwarded unjudged, and Grafana checks Basic credentials
    // there itself: each wrong one would count.
    let statuses = attempts(&gw, "/graph/api/search", "admin", 12, |i| format!("guess-{i}")).await;
    assert!(stub.failed_logins("admin") < GRAFANA_LOCKS_AT, "{statuses:?}");
    assert!(
        count(&statuses, StatusCode::TOO_MANY_REQUESTS) >= 8,
        "{statuses:?}"
    );
    let good = basic(&gw, "/graph/api/search", "admin", "admin").await;
    assert_ne!(good.status(), StatusCode::UNAUTHORIZED);
    assert!(stub.login("admin", "admin").is_some());
}

#[tokio::test]
async fn one_address_cannot_spray_passwords_or_tokens_at_grafana() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let gw = start(&stub, Profile::Grafana, |config| {
        config.auth.client_failures = 5;
        config.auth.client_failure_window = Duration::from_secs(60);
    })
    .await;
    let checked_before = stub.verifications();
    let mut statuses = Vec::new();
    for i in 0..20 {
        // A new login each time: no login's budget is touched twice.
        statuses.push(basic(&gw, "/api/org", &format!("user-{i}"), "pw").await.status());
    }
    for _ in 0..10 {
        // Well-formed tokens Grafana does not know.
        let token = grafana_stub::credentials::SaToken::generate().encode();
        let status = client()
            .get(format!("{}/api/org", gw.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status();
        statuses.push(status);
    }
    assert_eq!(count(&statuses, StatusCode::UNAUTHORIZED), 5, "{statuses:?}");
    assert_eq!(
        count(&statuses, StatusCode::TOO_MANY_REQUESTS),
        25,
        "{statuses:?}"
    );
    assert!(
        stub.verifications() - checked_before <= 10,
        "only 5 checks reached Grafana"
    );
}

#[tokio::test]
async fn a_fleet_shares_one_budget_per_login() {
    let stub = GrafanaStub::start_with(StubOptions {
        flavor: Flavor::Grafana11,
        ..StubOptions::default()
    })
    .await;
    let redis = RedisServer::start(None).await;
    let mut gateways = Vec::new();
    for _ in 0..3 {
        let (mut config, dir) = fleet::fleet_config(&stub, &redis.url());
        tune(&mut config);
        gateways.push(fleet::start_gateway(config, dir).await);
    }
    // Known good on one replica is known good on all.
    assert_eq!(
        basic(&gateways[0], "/api/org", "admin", "admin").await.status(),
        200
    );
    let mut statuses = Vec::new();
    for i in 0..30 {
        let gw = &gateways[i % gateways.len()];
        statuses.push(
            basic(gw, "/api/org", "admin", &format!("guess-{i}"))
                .await
                .status(),
        );
    }
    let failures = stub.failed_logins("admin");
    println!("fleet of 3: {failures} failures reached Grafana for admin out of 30 guesses");
    assert!(failures < GRAFANA_LOCKS_AT, "{failures} ({statuses:?})");
    for gw in &gateways {
        gw.running().gateway.cache().clear_local();
    }
    assert_eq!(
        basic(&gateways[2], "/api/org", "admin", "admin").await.status(),
        200
    );
    redis.assert_no_secret(&["admin:admin", "guess-1"]).await;
}

async fn login_form(gw: &Gateway, path: &str, user: &str, password: &str) -> StatusCode {
    client()
        .post(format!("{}{path}", gw.url))
        .json(&serde_json::json!({"user": user, "password": password}))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn the_login_form_is_shielded_under_every_spelling() {
    for (flavor, profile, paths) in [
        (Flavor::Grafana11, Profile::Grafana, &["/login", "/api/login"][..]),
        (
            Flavor::Pmm,
            Profile::Pmm,
            &["/graph/login", "/login", "/api/login"][..],
        ),
    ] {
        let stub = GrafanaStub::start(flavor).await;
        let gw = start(&stub, profile, |_| {}).await;
        // The admin signs in once: that password is known good from now on.
        assert_eq!(login_form(&gw, paths[0], "admin", "admin").await, StatusCode::OK);
        let mut statuses = Vec::new();
        for i in 0..15 {
            let path = paths[i % paths.len()];
            statuses.push(login_form(&gw, path, "Admin", &format!("guess-{i}")).await);
        }
        let failures = stub.failed_logins("admin");
        println!("{profile:?} login form: {statuses:?}; Grafana counted {failures}");
        assert!(failures < GRAFANA_LOCKS_AT, "{profile:?}: {failures}");
        assert_eq!(count(&statuses, StatusCode::UNAUTHORIZED), 4, "{statuses:?}");
        assert_eq!(
            count(&statuses, StatusCode::TOO_MANY_REQUESTS),
            11,
            "{statuses:?}"
        );
        // The real admin still signs in, on every spelling.
        for path in paths {
            assert_eq!(
                login_form(&gw, path, "admin", "admin").await,
                StatusCode::OK,
                "{path}"
            );
        }
        // A form too large to be one is refused before anything reads it.
        let huge = "x".repeat(100 * 1024);
        assert_eq!(
            login_form(&gw, paths[0], "admin", &huge).await,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}

#[tokio::test]
async fn a_login_form_read_differently_by_grafana_is_refused_not_forwarded() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let gw = start(&stub, Profile::Grafana, |_| {}).await;
    // Go reads keys in any case, lets the last duplicate win and stops after
    // the first value: each of these would reach Grafana's password check
    // unweighed, or weigh one login while Grafana checks another.
    for body in [
        r#"{"USER":"admin","PASSWORD":"x"}"#.to_owned(),
        r#"{"user":"admin","password":"g","User":"me","Password":"p"}"#.to_owned(),
        r#"{"user":"admin","password":"x"} junk"#.to_owned(),
    ] {
        for _ in 0..3 {
            let status = client()
                .post(format!("{}/login", gw.url))
                .header("Content-Type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap()
                .status();
            assert!(
                status == StatusCode::BAD_REQUEST || status == StatusCode::UNAUTHORIZED,
                "{body}: {status}"
            );
        }
    }
    assert!(
        stub.failed_logins("admin") < GRAFANA_LOCKS_AT,
        "Grafana counted {}",
        stub.failed_logins("admin")
    );
    assert!(
        stub.login("admin", "admin").is_some(),
        "admin locked out at Grafana"
    );
}

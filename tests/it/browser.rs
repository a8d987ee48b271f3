//! A real browser in front of the gateway (issue 15 §1): headless Chromium
//! logs in through the gateway on the stand-in's login form, lands back on
//! the page it asked for, and keeps a frontend-like page open across
//! several session rotations. The page's script does what Grafana's
//! `backend_srv.ts` does (see `grafana-stub/src/pages.rs`): it polls
//! `/api/user` every 250 ms, meets Grafana's `401 session.token.rotate`
//! when the session is due, calls `POST /api/user/auth-tokens/rotate` and
//! retries; a 401 from the rotation logs it out.
//!
//! What must hold, as with Grafana itself: every rotation succeeds, no poll
//! fails, the page is never sent back to the login page, and every 401 the
//! page sees is Grafana's own (`messageId` `session.token.rotate`).
//!
//! The rotation interval is 6 s: Grafana skips a rotation asked for less
//! than 5 s after the last one (`SkipRotationTime`), so a shorter interval
//! would fail against Grafana itself. The gateway's cache TTL (1 s) is
//! shorter than it, so cached identities expire between rotations and the
//! gateway meets the rotation answer in its own verification.
//!
//! Each profile runs twice: with the gateway sending the caller's
//! credential to Grafana (`identity.grafana = "credential"`) and with
//! Grafana's `[auth.proxy]` on and the gateway sending a verified user as
//! identity headers (`"auth_proxy"`, issue 19). In auth-proxy mode Grafana
//! no longer meets the session on the page's polls — the proxy client comes
//! before the session client — so the rotation answer reaches the page
//! through the gateway's own verification at its cache TTL, and the rotate
//! call reaches Grafana with the cookie.
//!
//! `cargo test --test it browser -- --nocapture` prints the counts.

#[path = "support/webdriver.rs"]
mod webdriver;

use std::sync::Arc;
use std::time::{Duration, Instant};

use grafana_stub::{Flavor, GrafanaStub, StubOptions};
use portcullis::config::{GrafanaMode, Profile};
use serde_json::Value;

use crate::support::{self, Gateway};
use webdriver::Browser;

const ROTATION: Duration = Duration::from_secs(6);
const INTERVALS: u32 = 4;
const CACHE_TTL: Duration = Duration::from_secs(1);
/// Bounds each step of the sign-in (redirects, page loads, the first poll).
const STEP: Duration = Duration::from_secs(20);

struct Scenario {
    name: &'static str,
    flavor: Flavor,
    profile: Profile,
    /// How the gateway talks to Grafana; `AuthProxy` also turns the
    /// stand-in's `[auth.proxy]` on.
    mode: GrafanaMode,
    /// What the browser opens, e.g. `/d/abc?orgId=1`.
    open: &'static str,
    /// Path of the login page it must be sent to.
    login_path: &'static str,
    /// `redirectTo` it must carry (decoded).
    redirect_to: &'static str,
}

async fn start(scenario: &Scenario) -> (Arc<GrafanaStub>, Gateway) {
    let stub = Arc::new(
        GrafanaStub::start_with(StubOptions {
            flavor: scenario.flavor,
            rotation_interval: ROTATION,
            auth_proxy: scenario.mode == GrafanaMode::AuthProxy,
            ..StubOptions::default()
        })
        .await,
    );
    let (mut config, dir) = support::config(&stub.url());
    config.auth.profile = scenario.profile;
    config.auth.session_cookie = stub.session_cookie_name();
    config.cache.ttl = CACHE_TTL;
    config.identity.grafana = scenario.mode;
    let gateway = support::start(config, dir).await;
    (stub, gateway)
}

fn path_of(url: &str, base: &str) -> String {
    url.strip_prefix(base).unwrap_or(url).to_owned()
}

/// `redirectTo` of a URL, percent-decoded.
fn redirect_to(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    let value = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == "redirectTo")?
        .1;
    let bytes = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[derive(Debug, Default, Clone)]
struct Counters {
    ok: u64,
    rotations: u64,
    renewals: u64,
    failures: u64,
    unauthorized: u64,
    rotate_hints: u64,
    logged_out: bool,
    last_error: String,
    statuses: String,
}

async fn counters(browser: &Browser) -> Option<Counters> {
    let value = browser.execute("return window.__stub || null;", vec![]).await;
    if value.is_null() {
        return None;
    }
    let n = |k: &str| value[k].as_u64().unwrap_or(0);
    Some(Counters {
        ok: n("ok"),
        rotations: n("rotations"),
        renewals: n("renewals"),
        failures: n("failures"),
        unauthorized: n("unauthorized"),
        rotate_hints: n("rotateHints"),
        logged_out: value["loggedOut"] == Value::Bool(true),
        last_error: value["lastError"].as_str().unwrap_or_default().to_owned(),
        statuses: value["statuses"].to_string(),
    })
}

/// One browser at a time: Chromium is the heaviest thing in the suite, and
/// the other tests share the machine's cores with it.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn sign_in_and_stay(scenario: Scenario) {
    let _one_browser = ONE_BROWSER.lock().await;
    let (stub, gw) = start(&scenario).await;
    let browser = Browser::start().await;
    stub.record_requests(true);
    let name = scenario.name;

    // 1. Not signed in: sent to the login page, remembering the page.
    browser.goto(&format!("{}{}", gw.url, scenario.open)).await;
    let login_url = browser
        .wait_for_url("the login page", STEP, |u| {
            path_of(u, &gw.url).starts_with(&format!("{}?", scenario.login_path))
        })
        .await;
    assert_eq!(
        redirect_to(&login_url).as_deref(),
        Some(scenario.redirect_to),
        "{name}: the login redirect must remember the page ({login_url})"
    );

    // 2. The form, through the gateway.
    let user = browser.find("#user", STEP).await;
    browser.type_into(&user, "admin").await;
    let password = browser.find("#password", STEP).await;
    browser.type_into(&password, "admin").await;
    let submit = browser.find("#login-submit", STEP).await;
    browser.click(&submit).await;
    let landing = format!("{}{}", gw.url, scenario.open);
    let url = {
        let deadline = Instant::now() + STEP;
        loop {
            let url = browser.current_url().await;
            if url == landing {
                break url;
            }
            if Instant::now() > deadline {
                let error = browser
                    .execute(
                        "const e = document.getElementById('login-error'); return e ? e.textContent : '';",
                        vec![],
                    )
                    .await;
                panic!("{name}: after logging in the browser is at {url}, not {landing} (login form says {error})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(url, landing, "{name}: lands back on the page it asked for");
    let deadline = Instant::now() + STEP;
    loop {
        if counters(&browser).await.is_some_and(|c| c.ok + c.failures > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: no app page at {landing}: {}",
            browser
                .execute("return document.body ? document.body.innerText : '';", vec![])
                .await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 3. Stay: several rotation intervals, sampled twice a second.
    let started = Instant::now();
    let window = ROTATION * INTERVALS + Duration::from_secs(2);
    let mut last = Counters::default();
    let mut ok_at_interval_start = 0;
    let mut interval_index = 0;
    let mut stalled_intervals = Vec::new();
    let mut reloaded = false;
    let mut left_for: Option<String> = None;
    while started.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let url = browser.current_url().await;
        if url != landing {
            left_for = Some(url);
            break;
        }
        let Some(now) = counters(&browser).await else {
            reloaded = true;
            break;
        };
        if now.ok < last.ok {
            reloaded = true;
        }
        let index = (started.elapsed().as_millis() / ROTATION.as_millis()) as u32;
        if index != interval_index {
            if now.ok <= ok_at_interval_start {
                stalled_intervals.push(interval_index);
            }
            ok_at_interval_start = now.ok;
            interval_index = index;
        }
        last = now;
        if last.logged_out {
            break;
        }
    }
    let final_url = browser.current_url().await;
    browser.close().await;

    println!(
        "browser {name}: rotations survived {} ({} rotate calls answered 200) in {:.1} s \
         (interval {}s, cache ttl {}s); ok polls {}, failures {}, 401s {} ({} with messageId \
         session.token.rotate); \
         un-prefixed identity calls at the stand-in {}; statuses {}; last error {:?}; final url {final_url}",
        last.renewals,
        last.rotations,
        started.elapsed().as_secs_f64(),
        ROTATION.as_secs(),
        CACHE_TTL.as_secs(),
        last.ok,
        last.failures,
        last.unauthorized,
        last.rotate_hints,
        stub.verifications(),
        last.statuses,
        last.last_error,
    );

    let mut broken = Vec::new();
    if let Some(url) = &left_for {
        broken.push(format!(
            "the page left {landing} for {url} (sent back to the login page)"
        ));
    }
    if reloaded || last.logged_out {
        broken.push("the page was logged out or reloaded".to_owned());
    }
    if last.failures != 0 {
        broken.push(format!(
            "{} polls failed (last: {})",
            last.failures, last.last_error
        ));
    }
    if last.rotations < 3 || last.renewals < 3 {
        broken.push(format!(
            "{} rotations ({} with a new session) in {INTERVALS} intervals, expected at least 3",
            last.rotations, last.renewals
        ));
    }
    if !stalled_intervals.is_empty() {
        broken.push(format!("no successful poll in intervals {stalled_intervals:?}"));
    }
    if last.rotate_hints != last.unauthorized {
        broken.push(format!(
            "{} of {} 401s did not carry Grafana's messageId session.token.rotate \
             (the gateway replaced Grafana's answer)",
            last.unauthorized - last.rotate_hints,
            last.unauthorized
        ));
    }
    // What Grafana got: never a credential and identity headers together;
    // in auth-proxy mode (where the gateway judges the page's calls) the
    // polls arrive as the user's identity, without the cookie.
    // (In PMM only `/graph` is Grafana; the stand-in also plays
    // pmm-managed, which takes identity headers beside the cookie, for
    // the rest — a browser's `/favicon.ico`, say.)
    let cookie = stub.session_cookie_name();
    let sub = stub.sub_path();
    let seen = stub.recorded_requests();
    let both: Vec<String> = seen
        .iter()
        .filter(|s| s.path.starts_with(&sub) || s.header("x-forwarded-for").is_none())
        .filter(|s| s.has_credential(&cookie) && s.has_identity_headers())
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    if !both.is_empty() {
        broken.push(format!(
            "requests reached Grafana with a credential and identity headers: {both:?}"
        ));
    }
    let proxied_polls = seen
        .iter()
        .filter(|s| s.path.ends_with("/api/user") && s.header("x-forwarded-for").is_some())
        .filter(|s| {
            matches!(
                s.authn,
                Some(grafana_stub::Authn::SignedIn {
                    client: grafana_stub::AuthClient::AuthProxy,
                    ..
                })
            )
        })
        .count();
    println!("browser {name}: polls Grafana signed in through its auth proxy: {proxied_polls}");
    let judged = scenario.profile == Profile::Grafana;
    if scenario.mode == GrafanaMode::AuthProxy && judged && proxied_polls < 10 {
        broken.push(format!(
            "only {proxied_polls} polls reached Grafana as a proxy identity"
        ));
    }
    if scenario.mode == GrafanaMode::Credential && proxied_polls != 0 {
        broken.push(format!("{proxied_polls} polls went as a proxy identity"));
    }
    assert!(broken.is_empty(), "{name}: {}", broken.join("; "));
}

/// Grafana profile in front of Grafana 11: the gateway itself sends the
/// browser to `/login?redirectTo=…`.
#[tokio::test]
async fn browser_session_survives_rotations_grafana() {
    sign_in_and_stay(grafana_scenario("grafana", GrafanaMode::Credential)).await;
}

/// The same with Grafana's `[auth.proxy]` and the gateway in auth-proxy
/// mode: the page's requests reach Grafana as the user's identity, the
/// login, rotation and session calls with the cookie.
#[tokio::test]
async fn browser_session_survives_rotations_grafana_auth_proxy() {
    sign_in_and_stay(grafana_scenario("grafana auth_proxy", GrafanaMode::AuthProxy)).await;
}

fn grafana_scenario(name: &'static str, mode: GrafanaMode) -> Scenario {
    Scenario {
        name,
        flavor: Flavor::Grafana11,
        profile: Profile::Grafana,
        mode,
        open: "/d/abc?orgId=1",
        login_path: "/login",
        redirect_to: "/d/abc?orgId=1",
    }
}

/// PMM profile in front of PMM's Grafana under `/graph` (an anonymous
/// route the gateway forwards untouched): Grafana itself sends the browser
/// to `/graph/login?redirectTo=/d/abc` (without the sub path, as Grafana's
/// `getRedirectToQueryParam` writes it).
#[tokio::test]
async fn browser_session_survives_rotations_pmm() {
    sign_in_and_stay(pmm_scenario("pmm", GrafanaMode::Credential)).await;
}

/// PMM with `[auth.proxy]` on and the gateway in auth-proxy mode. `/graph`
/// is anonymous in PMM's table, so the browser's session still reaches
/// Grafana as its cookie; what must hold is that nothing breaks.
#[tokio::test]
async fn browser_session_survives_rotations_pmm_auth_proxy() {
    sign_in_and_stay(pmm_scenario("pmm auth_proxy", GrafanaMode::AuthProxy)).await;
}

fn pmm_scenario(name: &'static str, mode: GrafanaMode) -> Scenario {
    Scenario {
        name,
        flavor: Flavor::Pmm,
        profile: Profile::Pmm,
        mode,
        open: "/graph/d/abc",
        login_path: "/graph/login",
        redirect_to: "/d/abc",
    }
}

//! Real dashboards over time: a browser session that Grafana asks to rotate,
//! organisations, and accounts Grafana does not name. Against the stand-in,
//! which answers as Grafana does (`grafana-stub/`).

use std::time::Duration;

use grafana_stub::{Flavor, GrafanaStub, StubOptions};
use portcullis::config::{Config, Profile};
use reqwest::header::{ACCEPT, COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{self, client, set_cookie, Gateway};

const ROTATION: Duration = Duration::from_secs(600);

async fn start(stub: &GrafanaStub, tweak: impl FnOnce(&mut Config)) -> Gateway {
    let (mut config, dir) = support::config(&stub.url());
    config.auth.profile = Profile::Grafana;
    config.auth.session_cookie = stub.session_cookie_name();
    tweak(&mut config);
    support::start(config, dir).await
}

async fn get_with_cookie(url: &str, cookie: &str) -> (StatusCode, String) {
    let response = client().get(url).header(COOKIE, cookie).send().await.unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn a_session_due_for_rotation_rotates_through_the_gateway() {
    let stub = GrafanaStub::start_with(StubOptions {
        flavor: Flavor::Grafana11,
        rotation_interval: ROTATION,
        ..StubOptions::default()
    })
    .await;
    stub.add_user("rotor", "rotor-pw-1", "Viewer", false);
    let gw = start(&stub, |_| {}).await;
    let http = client();
    let name = stub.session_cookie_name();

    // Log in through the gateway, as the login form does.
    let response = http
        .post(format!("{}/login", gw.url))
        .json(&serde_json::json!({"user": "rotor", "password": "rotor-pw-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = set_cookie(&response, &name).expect("session cookie set through the gateway");
    assert!(
        set_cookie(&response, "grafana_session_expiry").is_some(),
        "the expiry cookie the frontend rotates by passes through"
    );
    let old = format!("{name}={first}");
    assert_eq!(
        get_with_cookie(&format!("{}/api/user", gw.url), &old).await.0,
        200
    );

    // The token falls due; the cached entry runs out.
    stub.advance_clock(ROTATION + Duration::from_secs(1));
    gw.running().gateway.cache().clear_local();

    // Grafana's own answer reaches the browser, byte for byte.
    let (direct_status, direct) = get_with_cookie(&format!("{}/api/user", stub.url()), &old).await;
    assert_eq!(direct_status, 401);
    let (status, body) = get_with_cookie(&format!("{}/api/user", gw.url), &old).await;
    assert_eq!((status, body.as_str()), (direct_status, direct.as_str()));
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["messageId"], "session.token.rotate", "{body}");

    // A page load is sent where Grafana sends it: rotate, then come back.
    let page = http
        .get(format!("{}/d/home?orgId=1", gw.url))
        .header(COOKIE, &old)
        .header(ACCEPT, "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::FOUND);
    assert_eq!(
        page.headers()[LOCATION],
        "/user/auth-tokens/rotate?redirectTo=%2Fd%2Fhome%3ForgId%3D1"
    );

    // The frontend rotates through the gateway (a Viewer rule covers the
    // path: it must not stand in the way).
    let rotated = http
        .post(format!("{}/api/user/auth-tokens/rotate", gw.url))
        .header(COOKIE, &old)
        .send()
        .await
        .unwrap();
    assert_eq!(rotated.status(), 200);
    let second = set_cookie(&rotated, &name).expect("a new session cookie");
    assert_ne!(second, first);
    assert!(set_cookie(&rotated, "grafana_session_expiry").is_some());
    let new = format!("{name}={second}");

    // Until the new token is seen, Grafana still takes the old one: the
    // gateway asks every time instead of caching it.
    let before = stub.calls("/api/user");
    for _ in 0..2 {
        let (status, body) = get_with_cookie(&format!("{}/api/user", gw.url), &old).await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(
        stub.calls("/api/user") >= before + 2,
        "the rotated-away token was verified on each use, not cached"
    );

    // The new cookie is verified fresh on its first use, then cached.
    let before = stub.calls("/api/user");
    assert_eq!(
        get_with_cookie(&format!("{}/api/user", gw.url), &new).await.0,
        200
    );
    let after_first = stub.calls("/api/user");
    assert!(after_first > before, "verified on first use");
    assert_eq!(get_with_cookie(&format!("{}/d/home", gw.url), &new).await.0, 200);
    assert_eq!(stub.calls("/api/user"), after_first, "then served from cache");

    // Once Grafana has seen the new token it refuses the old one, and so
    // does the gateway at once: nothing cached it in between.
    let (direct_status, _) = get_with_cookie(&format!("{}/api/user", stub.url()), &old).await;
    assert_eq!(direct_status, 401);
    let (status, _) = get_with_cookie(&format!("{}/d/home", gw.url), &old).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn grafana_10_4_tokens_travel_as_credentials_never_as_one_shared_identity() {
    let stub = GrafanaStub::start(Flavor::Grafana10_4).await;
    let gw = start(&stub, |_| {}).await;
    let http = client();
    let mut seen = Vec::new();
    for name in ["first", "second"] {
        let sa = stub.add_service_account(name, "Viewer");
        let (_, token) = stub.add_sa_token(sa, "t", None);
        let response = http
            .get(format!("{}/__stub/echo/who", gw.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let echo: Value = response.json().await.unwrap();
        let headers = &echo["headers"];
        assert!(
            headers.get("x-webauth-user").is_none(),
            "an account Grafana did not name gets no identity: {headers}"
        );
        assert_eq!(headers["authorization"][0], format!("Bearer {token}"));
        seen.push(token);
    }
    // Still refused when Grafana refuses.
    let response = http
        .get(format!("{}/__stub/echo/who", gw.url))
        .bearer_auth("glsa_iNValIdinValiDinvalidinvalidinva_5b582697")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

const ADMIN_AREA: &str = "/admin-area";

async fn org_echo(
    gw: &Gateway,
    path: &str,
    apply: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    org: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = apply(client().get(format!("{}{path}", gw.url)));
    if let Some(org) = org {
        request = request.header("X-Grafana-Org-Id", org);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, body)
}

#[tokio::test]
async fn a_request_is_judged_with_the_callers_role_in_the_org_it_selects() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let user = stub.add_user("multi", "multi-pw-1", "Viewer", false);
    let ops = stub.add_org("Ops");
    stub.add_org_member(ops, user, "Admin");
    let lab = stub.add_org("Lab");
    let gw = start(&stub, |config| {
        config.identity.send_role = true;
        config.routes.push(portcullis::config::RouteConfig {
            // Not Grafana (which gets no identity header in credential mode):
            // an upstream that takes the identity headers as they come.
            grafana: Some(false),
            ..portcullis::config::RouteConfig::rule(ADMIN_AREA, portcullis::auth::Role::Admin)
        });
    })
    .await;
    let ops = ops.to_string();
    let lab = lab.to_string();
    let session = stub.login("multi", "multi-pw-1").expect("login");
    let cookie = format!("{}={session}", stub.session_cookie_name());
    let basic = |r: reqwest::RequestBuilder| r.basic_auth("multi", Some("multi-pw-1"));
    let browser = |r: reqwest::RequestBuilder| r.header(COOKIE, &cookie);

    for (how, apply) in [
        (
            "basic",
            &basic as &dyn Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
        ),
        ("session", &browser),
    ] {
        // The current org (1): Viewer there.
        let (status, body) = org_echo(&gw, ADMIN_AREA, apply, None).await;
        assert_eq!(status, 403, "{how}: {body}");
        assert_eq!(body["message"], "Permission denied");
        // Org Ops, where the user is Admin: allowed, and Grafana hears of it.
        let (status, echo) = org_echo(&gw, ADMIN_AREA, apply, Some(&ops)).await;
        assert_eq!(status, 200, "{how}: {echo}");
        let headers = &echo["headers"];
        assert_eq!(headers["x-webauth-org-id"][0], ops, "{how}: {headers}");
        // Even asked to send roles, the gateway sends none for a user in
        // several orgs: Grafana would drop them from all but one.
        assert!(headers.get("x-webauth-role").is_none(), "{how}: {headers}");
        assert_eq!(headers["x-grafana-org-id"][0], ops, "{how}: {headers}");
        // The same org through the query parameter Grafana also reads.
        let (status, _) = org_echo(&gw, &format!("{ADMIN_AREA}?targetOrgId={ops}"), apply, None).await;
        assert_eq!(status, 200, "{how}");
        // Not a member of Lab: refused in the JSON form, whatever the route.
        let (status, body) = org_echo(&gw, "/__stub/echo/x", apply, Some(&lab)).await;
        assert_eq!(status, 403, "{how}: {body}");
        assert_eq!(body["message"], "Permission denied");
        // Header and query that disagree, or no org at all: a bad request.
        let (status, _) = org_echo(&gw, &format!("{ADMIN_AREA}?targetOrgId=1"), apply, Some(&ops)).await;
        assert_eq!(status, 400, "{how}");
        let (status, body) = org_echo(&gw, ADMIN_AREA, apply, Some("ops")).await;
        assert_eq!(status, 400, "{how}: {body}");
        assert!(body["message"].as_str().unwrap().contains("X-Grafana-Org-Id"));
    }

    // A token belongs to its one org: another org is refused, not ignored.
    let sa = stub.add_service_account("org-one-viewer", "Viewer");
    let (_, token) = stub.add_sa_token(sa, "t", None);
    let bearer = |r: reqwest::RequestBuilder| r.bearer_auth(&token);
    let viewer_path = "/__stub/echo/token";
    assert_eq!(org_echo(&gw, viewer_path, bearer, None).await.0, 200);
    assert_eq!(org_echo(&gw, viewer_path, bearer, Some("1")).await.0, 200);
    let (status, body) = org_echo(&gw, viewer_path, bearer, Some(&ops)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["message"], "Permission denied");
}

#[tokio::test]
async fn a_pmm_session_from_the_graph_login_reaches_v1() {
    let stub = GrafanaStub::start(Flavor::Pmm).await;
    let (mut config, dir) = support::config(&stub.url());
    config.auth.profile = Profile::Pmm;
    config.auth.session_cookie = stub.session_cookie_name();
    let gw = support::start(config, dir).await;
    // A browser: a cookie jar that honours Path.
    let browser = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = browser
        .post(format!("{}/graph/login", gw.url))
        .json(&serde_json::json!({"user": "admin", "password": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let paths: Vec<String> = login
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    assert!(
        paths
            .iter()
            .all(|c| c.contains("Path=/") && !c.contains("Path=/graph")),
        "{paths:?}"
    );
    let version = browser
        .get(format!("{}/v1/version", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(version.status(), 200, "the pmm_session cookie reached /v1");
}

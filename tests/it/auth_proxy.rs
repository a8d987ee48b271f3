//! Identity Grafana can trust (issue 19): towards Grafana a verified user
//! goes as an identity (`identity.grafana = "auth_proxy"`) or as its
//! credential (`"credential"`), a token or key always as its credential —
//! never both. Against the stand-in in auth-proxy mode, which authenticates
//! as Grafana's `pkg/services/authn` does (client order with fall-through,
//! proxy users signed up and role-synced, PBKDF2 counted), and records what
//! reached it.

use std::collections::BTreeMap;
use std::time::Duration;

use grafana_stub::{AuthClient, Authn, Flavor, GrafanaStub, SeenRequest, StubOptions};
use portcullis::auth::Role;
use portcullis::config::{Config, GrafanaMode, Profile, RouteConfig};
use reqwest::header::COOKIE;
use reqwest::{RequestBuilder, StatusCode};
use serde_json::Value;

use crate::support::{self, client, Gateway};

const MODES: [GrafanaMode; 2] = [GrafanaMode::Credential, GrafanaMode::AuthProxy];

fn stub_options(flavor: Flavor, tweak: impl FnOnce(&mut StubOptions)) -> StubOptions {
    let mut options = StubOptions {
        flavor,
        auth_proxy: true,
        ..StubOptions::default()
    };
    tweak(&mut options);
    options
}

async fn gateway(
    stub: &GrafanaStub,
    profile: Profile,
    mode: GrafanaMode,
    tweak: impl FnOnce(&mut Config),
) -> Gateway {
    let (mut config, dir) = support::config(&stub.url());
    config.auth.profile = profile;
    config.auth.session_cookie = stub.session_cookie_name();
    config.identity.grafana = mode;
    tweak(&mut config);
    support::start(config, dir).await
}

/// The behaviour before issue 19, for the controls: a route that carries the
/// credential *and* the identity headers to Grafana.
fn old_style(prefix: &str) -> RouteConfig {
    RouteConfig {
        grafana: Some(false),
        ..RouteConfig::rule(prefix, Role::Viewer)
    }
}

/// `name=value` of the `Set-Cookie` that sets `name` to a value.
fn set_cookie(response: &reqwest::Response, name: &str) -> Option<String> {
    support::set_cookie(response, name).map(|value| format!("{name}={value}"))
}

/// How a test client presents itself.
#[derive(Clone)]
enum Cred {
    Basic(String, String),
    Cookie(String),
    Bearer(String),
}

impl Cred {
    fn apply(&self, request: RequestBuilder) -> RequestBuilder {
        match self {
            Cred::Basic(user, password) => request.basic_auth(user, Some(password)),
            Cred::Cookie(cookie) => request.header(COOKIE, cookie),
            Cred::Bearer(token) => request.bearer_auth(token),
        }
    }
}

async fn send(gw: &Gateway, method: &str, path: &str, cred: &Cred, org: Option<i64>) -> (StatusCode, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = cred.apply(client().request(method, format!("{}{path}", gw.url)));
    if let Some(org) = org {
        request = request.header("X-Grafana-Org-Id", org.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

/// Requests that reached Grafana with a credential it checks itself *and*
/// an identity header beside it.
fn both(seen: &[SeenRequest], cookie_name: &str) -> Vec<String> {
    seen.iter()
        .filter(|s| s.has_credential(cookie_name) && s.has_identity_headers())
        .map(|s| format!("{} {} {:?}", s.method, s.path, s.headers))
        .collect()
}

/// A request the gateway forwarded (its own verification calls carry no
/// forwarding headers).
fn is_forwarded(seen: &SeenRequest) -> bool {
    seen.header("x-forwarded-for").is_some()
}

/// The recorded requests for one path (first one wins when `last` is false).
fn seen_at<'a>(seen: &'a [SeenRequest], method: &str, path: &str) -> Vec<&'a SeenRequest> {
    seen.iter()
        .filter(|s| s.method == method && s.path == path)
        .collect()
}

/// Every kind of credential, on every kind of Grafana path, through the
/// gateway in both modes, for both profiles: Grafana never gets a credential
/// and an identity header together. In auth-proxy mode, a user reaches it
/// as a proxy identity only (except where Grafana reads the cookie itself),
/// a token as its credential only.
#[tokio::test]
async fn no_identity_header_ever_accompanies_a_credential() {
    for (profile, flavor) in [(Profile::Grafana, Flavor::Grafana11), (Profile::Pmm, Flavor::Pmm)] {
        for mode in MODES {
            no_identity_header_beside_a_credential(profile, flavor, mode, false).await;
        }
        // The control: routes as the gateway had them before issue 19
        // (credential and identity together) are caught by the same check.
        no_identity_header_beside_a_credential(profile, flavor, GrafanaMode::Credential, true).await;
    }
}

async fn no_identity_header_beside_a_credential(
    profile: Profile,
    flavor: Flavor,
    mode: GrafanaMode,
    control: bool,
) {
    let stub = GrafanaStub::start_with(stub_options(flavor, |_| {})).await;
    let sub = stub.sub_path();
    let cookie_name = stub.session_cookie_name();
    stub.add_user("alice", "alice-pw-1", "Editor", false);
    let sa = stub.add_service_account("robot", "Editor");
    let (_, token) = stub.add_sa_token(sa, "t", None);
    let (_, key) = stub.add_api_key("legacy", "Viewer", None);
    let session = stub.login("alice", "alice-pw-1").unwrap();
    let gw = gateway(&stub, profile, mode, |config| {
        if profile == Profile::Pmm {
            // `/graph` behind a rule, so that the gateway judges (and, in
            // auth-proxy mode, proxies) users there too; its login flow stays
            // open. PMM's own table leaves `/graph` anonymous: credentials
            // then go through unjudged, which the profile's default covers.
            config.routes.push(RouteConfig::rule("/graph", Role::Viewer));
            config.routes.push(RouteConfig::rule("/graph/login", Role::None));
            config.routes.push(RouteConfig::rule("/graph/logout", Role::None));
            config.routes.push(RouteConfig::rule("/graph/public", Role::None));
        }
        if control {
            config.routes.push(old_style(&format!("{sub}/api")));
            config.routes.push(old_style("/__stub"));
        }
    })
    .await;
    let label = format!("{profile:?}/{mode:?}{}", if control { " (control)" } else { "" });

    let mut creds = vec![
        ("basic", Cred::Basic("alice".into(), "alice-pw-1".into())),
        ("session", Cred::Cookie(format!("{cookie_name}={session}"))),
        ("bearer glsa", Cred::Bearer(token.clone())),
        ("basic api_key glsa", Cred::Basic("api_key".into(), token.clone())),
        ("bearer legacy key", Cred::Bearer(key.clone())),
    ];
    if profile == Profile::Pmm {
        creds.push((
            "basic service_token",
            Cred::Basic("service_token".into(), token.clone()),
        ));
    }
    // Grafana's paths; in the PMM profile the echo path is pmm-managed's.
    let echo = (profile == Profile::Grafana).then(|| "/__stub/echo/x".to_owned());
    let paths: Vec<String> = [
        "/api/user",
        "/api/org",
        "/api/user/orgs",
        "/api/dashboards/uid/abc",
        "/d/home",
        "/api/user/auth-tokens",
    ]
    .iter()
    .map(|p| format!("{sub}{p}"))
    .chain(echo.clone())
    .collect();

    stub.record_requests(true);
    for (name, cred) in &creds {
        for path in &paths {
            // A second pass comes from the cache.
            for _ in 0..2 {
                let (status, body) = send(&gw, "GET", path, cred, None).await;
                assert!(
                    status != StatusCode::INTERNAL_SERVER_ERROR && status != StatusCode::BAD_GATEWAY,
                    "{label} {name} {path}: {status} {body}"
                );
            }
        }
    }
    // Grafana's session calls with the cookie.
    let cookie = Cred::Cookie(format!("{cookie_name}={session}"));
    let (status, _) = send(&gw, "GET", &format!("{sub}/login"), &cookie, None).await;
    assert_eq!(
        status,
        StatusCode::FOUND,
        "{label}: signed in, the login page sends on"
    );
    let (status, _) = send(&gw, "GET", &format!("{sub}/logout"), &cookie, None).await;
    assert_eq!(status, StatusCode::FOUND, "{label}");
    let seen = stub.recorded_requests();
    stub.record_requests(false);

    let violations = both(&seen, &cookie_name);
    if control {
        assert!(
            !violations.is_empty(),
            "{label}: the check must see credential and identity together on old-style routes"
        );
        return;
    }
    assert!(
        violations.is_empty(),
        "{label}: Grafana got a credential and identity headers together:\n{}",
        violations.join("\n")
    );
    // Nobody was signed up on the way (tokens never became proxy users).
    assert_eq!(stub.user_count(), 2, "{label}: admin and alice only");

    // Who Grafana took each request for, where the gateway judged it.
    let user_paths: Vec<String> = [format!("{sub}/api/user"), format!("{sub}/api/org")]
        .into_iter()
        .chain(echo)
        .collect();
    let proxied: Vec<&SeenRequest> = seen
        .iter()
        .filter(|s| user_paths.contains(&s.path) && s.header("x-webauth-user").is_some())
        .collect();
    match mode {
        GrafanaMode::AuthProxy => {
            // Basic and session, each path twice.
            assert_eq!(
                proxied.len(),
                2 * 2 * user_paths.len(),
                "{label}: users reach Grafana as proxy identities"
            );
            for s in &proxied {
                assert_eq!(s.header("x-webauth-user"), Some("alice"), "{label}");
                assert_eq!(
                    s.authn,
                    Some(Authn::SignedIn {
                        client: AuthClient::AuthProxy,
                        login: "alice".into()
                    }),
                    "{label} {}",
                    s.path
                );
            }
        }
        GrafanaMode::Credential => assert!(proxied.is_empty(), "{label}: no identity header at all"),
    }
    // Tokens and keys: always the credential, signed in by the key client.
    let tokens: Vec<&SeenRequest> = seen
        .iter()
        .filter(|s| {
            user_paths.contains(&s.path)
                && s.header("authorization")
                    .is_some_and(|a| a.starts_with("Bearer ") || a.starts_with("Basic YXBpX2tleT"))
        })
        .collect();
    assert!(
        tokens.len() >= 2 * 2 * user_paths.len(),
        "{label}: {} token requests",
        tokens.len()
    );
    for s in tokens {
        assert!(
            matches!(
                &s.authn,
                Some(Authn::SignedIn {
                    client: AuthClient::ApiKey,
                    ..
                })
            ),
            "{label} {}: {:?}",
            s.path,
            s.authn
        );
    }
}

/// A token revoked or deleted directly in Grafana (not through the
/// gateway) while the gateway still holds it: Grafana refuses it, the
/// client gets the refusal, the gateway forgets it, and Grafana signs
/// nobody up on the way.
#[tokio::test]
async fn a_token_revoked_in_grafana_is_refused_and_creates_no_user() {
    for mode in MODES {
        token_revoked_in_grafana(mode, false).await;
    }
    token_revoked_in_grafana(GrafanaMode::Credential, true).await;
}

async fn token_revoked_in_grafana(mode: GrafanaMode, control: bool) {
    let label = format!("{mode:?}{}", if control { " (control)" } else { "" });
    let stub = GrafanaStub::start_with(stub_options(Flavor::Grafana11, |_| {})).await;
    let gw = gateway(&stub, Profile::Grafana, mode, |config| {
        if control {
            config.routes.push(old_style("/api"));
        }
    })
    .await;
    let revoked_sa = stub.add_service_account("revoked robot", "Viewer");
    let (revoked_id, revoked) = stub.add_sa_token(revoked_sa, "t", None);
    let deleted_sa = stub.add_service_account("deleted robot", "Viewer");
    let (deleted_id, deleted) = stub.add_sa_token(deleted_sa, "t", None);
    let users = stub.user_count();

    for (token, id, revoke) in [(revoked, revoked_id, true), (deleted, deleted_id, false)] {
        let cred = Cred::Bearer(token);
        let (status, body) = send(&gw, "GET", "/api/org", &cred, None).await;
        assert_eq!(status, 200, "{label}: {body}");
        // In the gateway's cache now; changed in Grafana behind its back.
        if revoke {
            assert!(stub.revoke_key(id));
        } else {
            assert!(stub.delete_key(id));
        }
        stub.record_requests(true);
        let (status, body) = send(&gw, "GET", "/api/org", &cred, None).await;
        let seen = stub.recorded_requests();
        if control {
            // Before issue 19 the identity headers went along, and Grafana
            // tried them once the token failed (signing the service
            // account's login up as a user, which collides: its answer is
            // the token's refusal, the first error).
            assert_eq!(seen.len(), 1, "{label}: {seen:#?}");
            assert!(
                seen[0].has_identity_headers(),
                "{label}: the old routes send the identity beside the token ({status} {body})"
            );
            return;
        }
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{label}: {body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        let expected = if revoke {
            "api-key.revoked"
        } else {
            "api-key.invalid"
        };
        assert_eq!(
            answer["messageId"], expected,
            "{label}: Grafana's answer reaches the client"
        );
        // Allowed from the cache: the request itself went to Grafana, and
        // nothing else did.
        assert_eq!(seen.len(), 1, "{label}: {seen:#?}");
        assert!(is_forwarded(&seen[0]), "{label}: {seen:#?}");
        assert!(!seen[0].has_identity_headers(), "{label}: {:?}", seen[0].headers);
        assert_eq!(stub.user_count(), users, "{label}: nobody signed up");

        // Grafana's 401 evicted the entry: the next request is verified
        // again, and refused before it is forwarded.
        stub.record_requests(true);
        let (status, _) = send(&gw, "GET", "/api/org", &cred, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{label}");
        let seen = stub.recorded_requests();
        assert!(
            !seen.is_empty() && !seen.iter().any(is_forwarded),
            "{label}: verified again, not forwarded: {seen:#?}"
        );
        stub.record_requests(false);
        assert_eq!(stub.user_count(), users, "{label}: still nobody signed up");
    }
}

/// A password changed directly in Grafana while the gateway holds the old
/// one: in credential mode Grafana refuses the old password on the request
/// itself and the gateway forgets it (before issue 19 the identity headers
/// beside it signed the request in anyway). In auth-proxy mode Grafana no
/// longer sees the password: the gateway's cache TTL is the only bound,
/// after which its own verification refuses it.
#[tokio::test]
async fn a_password_changed_in_grafana() {
    for (mode, control) in [
        (GrafanaMode::Credential, false),
        (GrafanaMode::Credential, true),
        (GrafanaMode::AuthProxy, false),
    ] {
        let label = format!("{mode:?}{}", if control { " (control)" } else { "" });
        let stub = GrafanaStub::start_with(stub_options(Flavor::Grafana11, |_| {})).await;
        let alice = stub.add_user("alice", "alice-pw-1", "Viewer", false);
        let gw = gateway(&stub, Profile::Grafana, mode, |config| {
            config.cache.ttl = Duration::from_secs(2);
            if control {
                config.routes.push(old_style("/api"));
            }
        })
        .await;
        let old = Cred::Basic("alice".into(), "alice-pw-1".into());
        let (status, _) = send(&gw, "GET", "/api/org", &old, None).await;
        assert_eq!(status, 200, "{label}");
        // Changed by an admin, directly in Grafana.
        let changed = client()
            .put(format!("{}/api/admin/users/{alice}/password", stub.url()))
            .basic_auth("admin", Some("admin"))
            .json(&serde_json::json!({"password": "alice-pw-2"}))
            .send()
            .await
            .unwrap();
        assert_eq!(changed.status(), 200, "{label}");
        stub.record_requests(true);
        let (status, body) = send(&gw, "GET", "/api/org", &old, None).await;
        let seen = stub.recorded_requests();
        match (mode, control) {
            (GrafanaMode::Credential, false) => {
                assert_eq!(status, 401, "{label}: {body}");
                assert!(seen.len() == 1 && is_forwarded(&seen[0]), "{label}: {seen:#?}");
                stub.record_requests(true);
                let (status, _) = send(&gw, "GET", "/api/org", &old, None).await;
                assert_eq!(status, 401, "{label}");
                let seen = stub.recorded_requests();
                assert!(
                    !seen.iter().any(is_forwarded),
                    "{label}: forgotten, verified again and refused: {seen:#?}"
                );
            }
            (GrafanaMode::Credential, true) => {
                // The old password fails at Grafana, the proxy header signs in.
                assert_eq!(
                    status, 200,
                    "{label}: the takeover the old routes allowed ({body})"
                );
                assert_eq!(
                    seen[0].authn,
                    Some(Authn::SignedIn {
                        client: AuthClient::AuthProxy,
                        login: "alice".into()
                    }),
                    "{label}"
                );
            }
            (GrafanaMode::AuthProxy, _) => {
                assert_eq!(status, 200, "{label}: within the cache TTL ({body})");
                tokio::time::sleep(Duration::from_millis(2100)).await;
                let (status, _) = send(&gw, "GET", "/api/org", &old, None).await;
                assert_eq!(status, 401, "{label}: refused once the TTL ran out");
            }
        }
        stub.record_requests(false);
        let new = Cred::Basic("alice".into(), "alice-pw-2".into());
        let (status, _) = send(&gw, "GET", "/api/org", &new, None).await;
        assert_eq!(status, 200, "{label}: the new password works");
    }
}

/// A user in two orgs, with Grafana's `Role:` header mapped (the worst
/// case): Basic and session use through the gateway, in both modes, with
/// and without `identity.send_role`, leave both memberships alone.
#[tokio::test]
async fn a_two_org_user_keeps_both_memberships() {
    for mode in MODES {
        for send_role in [false, true] {
            two_org_user(mode, send_role).await;
        }
    }
}

async fn two_org_user(mode: GrafanaMode, send_role: bool) {
    let label = format!("{mode:?} send_role={send_role}");
    let stub =
        GrafanaStub::start_with(stub_options(Flavor::Grafana11, |o| o.auth_proxy_role_sync = true)).await;
    let multi = stub.add_user("multi", "multi-pw-1", "Viewer", false);
    let ops = stub.add_org("Ops");
    stub.add_org_member(ops, multi, "Editor");
    let memberships = BTreeMap::from([(1, "Viewer".to_owned()), (ops, "Editor".to_owned())]);
    let gw = gateway(&stub, Profile::Grafana, mode, |config| {
        config.identity.send_role = send_role;
        // Verified again within the test: a fresh identity each time.
        config.cache.ttl = Duration::from_secs(1);
    })
    .await;
    let session = stub.login("multi", "multi-pw-1").unwrap();
    stub.record_requests(true);
    for cred in [
        Cred::Basic("multi".into(), "multi-pw-1".into()),
        Cred::Cookie(format!("{}={session}", stub.session_cookie_name())),
    ] {
        for org in [None, Some(1), Some(ops)] {
            for path in ["/api/user", "/api/org", "/__stub/echo/dash", "/d/home"] {
                let (status, body) = send(&gw, "GET", path, &cred, org).await;
                assert!(status.is_success(), "{label} {path} org {org:?}: {status} {body}");
            }
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (status, _) = send(&gw, "GET", "/api/user", &cred, Some(ops)).await;
        assert_eq!(status, 200, "{label}");
    }
    let seen = stub.recorded_requests();
    assert_eq!(
        stub.user_orgs(multi),
        memberships,
        "{label}: both memberships kept"
    );
    assert_eq!(stub.user_current_org(multi), Some(1), "{label}");
    let with_role: Vec<&SeenRequest> = seen
        .iter()
        .filter(|s| s.header("x-webauth-role").is_some())
        .collect();
    assert!(
        with_role.is_empty(),
        "{label}: a role header for a multi-org user: {:?}",
        with_role[0].headers
    );
    // The org the request selected is the one Grafana answered in.
    let (_, org) = send(
        &gw,
        "GET",
        "/api/org",
        &Cred::Basic("multi".into(), "multi-pw-1".into()),
        Some(ops),
    )
    .await;
    let org: Value = serde_json::from_str(&org).unwrap();
    assert_eq!(org["id"], ops, "{label}");

    // The same stand-in does remove memberships when a role comes: the
    // check above could see the loss.
    if mode == GrafanaMode::AuthProxy && send_role {
        let stray = stub.add_user("stray", "stray-pw-1", "Viewer", false);
        stub.add_org_member(ops, stray, "Editor");
        let response = client()
            .get(format!("{}/api/user", stub.url()))
            .header("X-WEBAUTH-USER", "stray")
            .header("X-WEBAUTH-ROLE", "Viewer")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            stub.user_orgs(stray).len(),
            1,
            "a role header costs the other orgs"
        );
    }
}

/// `identity.send_role` for a user of one org that is not Grafana's
/// `auto_assign_org_id` (1): Grafana would sync the role into org 1 and
/// remove the user from its own org. No role header may go then either.
#[tokio::test]
async fn a_single_org_user_outside_org_one_keeps_its_org() {
    let stub =
        GrafanaStub::start_with(stub_options(Flavor::Grafana11, |o| o.auth_proxy_role_sync = true)).await;
    let solo = stub.add_user("solo", "solo-pw-1", "Viewer", false);
    let ops = stub.add_org("Ops");
    stub.add_org_member(ops, solo, "Editor");
    assert!(stub.remove_org_member(1, solo));
    assert_eq!(stub.user_current_org(solo), Some(ops));
    let gw = gateway(&stub, Profile::Grafana, GrafanaMode::AuthProxy, |config| {
        config.identity.send_role = true;
    })
    .await;
    stub.record_requests(true);
    let cred = Cred::Basic("solo".into(), "solo-pw-1".into());
    let (status, body) = send(&gw, "GET", "/api/org", &cred, None).await;
    assert_eq!(status, 200, "{body}");
    let seen = stub.recorded_requests();
    assert_eq!(
        stub.user_orgs(solo),
        BTreeMap::from([(ops, "Editor".to_owned())]),
        "the user's only org is kept; role headers sent: {:?}",
        seen.iter()
            .filter_map(|s| s.header("x-webauth-role"))
            .collect::<Vec<_>>()
    );
    let org: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(org["id"], ops, "answered in the user's own org");

    // A user of org 1 alone gets its role synced, as asked.
    let main = stub.add_user("main", "main-pw-1", "Editor", false);
    stub.record_requests(true);
    let cred = Cred::Basic("main".into(), "main-pw-1".into());
    let (status, _) = send(&gw, "GET", "/api/org", &cred, None).await;
    assert_eq!(status, 200);
    let seen = stub.recorded_requests();
    let forwarded: Vec<&SeenRequest> = seen.iter().filter(|s| is_forwarded(s)).collect();
    assert_eq!(forwarded.len(), 1);
    assert_eq!(forwarded[0].header("x-webauth-role"), Some("Editor"));
    assert_eq!(stub.user_orgs(main), BTreeMap::from([(1, "Editor".to_owned())]));
}

/// `[auth.proxy] shared_secret`: the gateway sends it from
/// `identity.shared_secret_file` with every proxy identity (and never with
/// a credential); identity and secret headers a client sends are dropped.
#[tokio::test]
async fn the_shared_secret_goes_with_the_identity_and_clients_cannot_spoof_either() {
    let stub = GrafanaStub::start_with(stub_options(Flavor::Grafana11, |o| {
        o.auth_proxy_shared_secret = Some("s3cret-from-file".into())
    }))
    .await;
    stub.add_user("alice", "alice-pw-1", "Viewer", false);
    let sa = stub.add_service_account("robot", "Viewer");
    let (_, token) = stub.add_sa_token(sa, "t", None);
    let secret_dir = tempfile::tempdir().unwrap();
    let secret_file = secret_dir.path().join("proxy-secret");
    std::fs::write(&secret_file, "s3cret-from-file\n").unwrap();
    let gw = gateway(&stub, Profile::Grafana, GrafanaMode::AuthProxy, |config| {
        config.identity.shared_secret_file = Some(secret_file.clone());
    })
    .await;
    let spoof = |r: RequestBuilder| {
        r.header("X-WEBAUTH-USER", "admin")
            .header("X-Webauth-Secret", "s3cret-from-file")
            .header("x_webauth_role", "Admin")
    };
    stub.record_requests(true);
    for (cred, login, via) in [
        (
            Some(Cred::Basic("alice".into(), "alice-pw-1".into())),
            "alice",
            AuthClient::AuthProxy,
        ),
        (Some(Cred::Bearer(token.clone())), "sa-robot", AuthClient::ApiKey),
    ] {
        let cred = cred.unwrap();
        let response = spoof(cred.apply(client().get(format!("{}/api/user", gw.url))))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let user: Value = response.json().await.unwrap();
        assert_eq!(user["login"], login);
        let seen = stub.recorded_requests();
        let last = seen.iter().rev().find(|s| is_forwarded(s)).unwrap();
        assert_eq!(
            last.authn,
            Some(Authn::SignedIn {
                client: via,
                login: login.into()
            })
        );
        match via {
            AuthClient::AuthProxy => {
                assert_eq!(last.header("x-webauth-secret"), Some("s3cret-from-file"));
                assert_eq!(last.header("x-webauth-user"), Some("alice"));
            }
            _ => assert!(!last.has_identity_headers(), "{:?}", last.headers),
        }
        assert_eq!(last.header("x_webauth_role"), None);
    }
    // Anonymous routes: the spoofed headers never arrive.
    let response = spoof(client().get(format!("{}/api/health", gw.url)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = stub.recorded_requests();
    let last = seen.iter().rev().find(|s| s.path == "/api/health").unwrap();
    assert!(!last.has_identity_headers(), "{:?}", last.headers);
    assert_eq!(stub.user_count(), 2);
}

/// In auth-proxy mode a Basic request reaches Grafana without
/// `Authorization`, and Grafana hashes no password for it; in credential
/// mode it hashes one per request. Both profiles: PMM's `/graph` is
/// anonymous in its table, yet the gateway checks a Basic password there
/// (behind its lock-out shield) and knows the user.
#[tokio::test]
async fn a_proxied_basic_request_costs_grafana_no_hashing() {
    for (profile, flavor) in [(Profile::Grafana, Flavor::Grafana11), (Profile::Pmm, Flavor::Pmm)] {
        for mode in MODES {
            basic_hashing(profile, flavor, mode).await;
        }
    }
}

async fn basic_hashing(profile: Profile, flavor: Flavor, mode: GrafanaMode) {
    let label = format!("{profile:?}/{mode:?}");
    let stub = GrafanaStub::start_with(stub_options(flavor, |_| {})).await;
    let sub = stub.sub_path();
    stub.add_user("alice", "alice-pw-1", "Viewer", false);
    let gw = gateway(&stub, profile, mode, |_| {}).await;
    let cred = Cred::Basic("alice".into(), "alice-pw-1".into());
    let path = format!("{sub}/api/user");
    // The first request verifies the password (at Grafana: one hash).
    let (status, body) = send(&gw, "GET", &path, &cred, None).await;
    assert_eq!(status, 200, "{label}: {body}");
    stub.reset_counters();
    stub.record_requests(true);
    const N: u64 = 5;
    for _ in 0..N {
        let (status, body) = send(&gw, "GET", &path, &cred, None).await;
        assert_eq!(status, 200, "{label}: {body}");
        let user: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(user["login"], "alice", "{label}");
    }
    let seen = stub.recorded_requests();
    let forwarded = seen_at(&seen, "GET", &path);
    assert_eq!(forwarded.len() as u64, N, "{label}");
    match mode {
        GrafanaMode::AuthProxy => {
            for s in &forwarded {
                assert_eq!(s.header("authorization"), None, "{label}: Authorization removed");
                assert_eq!(s.header("x-webauth-user"), Some("alice"), "{label}");
            }
            assert_eq!(stub.password_hashes(), 0, "{label}: Grafana hashed no password");
        }
        GrafanaMode::Credential => {
            for s in &forwarded {
                assert!(s.header("authorization").is_some(), "{label}");
                assert!(!s.has_identity_headers(), "{label}");
            }
            assert_eq!(stub.password_hashes(), N, "{label}: one PBKDF2 per request");
        }
    }
}

struct Flow {
    name: &'static str,
    profile: Profile,
    flavor: Flavor,
    /// `/graph` behind a Viewer rule (PMM profile only).
    judged_graph: bool,
}

/// Login, the session list, rotation and logout through the gateway in
/// both modes: the login form signs in, `/api/user/auth-tokens` marks the
/// session in use as current, a session due for rotation rotates, and
/// logout ends the session in Grafana (in auth-proxy mode too: those calls
/// go with the cookie, not as a proxy identity).
#[tokio::test]
async fn login_rotation_and_logout_in_both_modes() {
    for flow in [
        Flow {
            name: "grafana",
            profile: Profile::Grafana,
            flavor: Flavor::Grafana11,
            judged_graph: false,
        },
        Flow {
            name: "pmm",
            profile: Profile::Pmm,
            flavor: Flavor::Pmm,
            judged_graph: false,
        },
        Flow {
            name: "pmm, /graph behind a rule",
            profile: Profile::Pmm,
            flavor: Flavor::Pmm,
            judged_graph: true,
        },
    ] {
        for mode in MODES {
            session_flow(&flow, mode).await;
        }
    }
}

async fn session_flow(flow: &Flow, mode: GrafanaMode) {
    const ROTATION: Duration = Duration::from_secs(600);
    let label = format!("{} {mode:?}", flow.name);
    let stub = GrafanaStub::start_with(stub_options(flow.flavor, |o| o.rotation_interval = ROTATION)).await;
    let sub = stub.sub_path();
    let name = stub.session_cookie_name();
    let alice = stub.add_user("alice", "alice-pw-1", "Viewer", false);
    let gw = gateway(&stub, flow.profile, mode, |config| {
        if flow.judged_graph {
            config.routes.push(RouteConfig::rule("/graph", Role::Viewer));
            config.routes.push(RouteConfig::rule("/graph/login", Role::None));
            config.routes.push(RouteConfig::rule("/graph/logout", Role::None));
        }
    })
    .await;
    let http = client();

    // Log in on the form, through the gateway.
    let response = http
        .post(format!("{}{sub}/login", gw.url))
        .json(&serde_json::json!({"user": "alice", "password": "alice-pw-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{label}");
    let first = set_cookie(&response, &name).unwrap_or_else(|| panic!("{label}: no session cookie"));
    assert_eq!(stub.session_count(alice), 1, "{label}");
    let cookie = Cred::Cookie(first.clone());
    let (status, body) = send(&gw, "GET", &format!("{sub}/api/user"), &cookie, None).await;
    assert_eq!(status, 200, "{label}: {body}");

    // The session list: the session in use is the current one.
    stub.record_requests(true);
    let (status, body) = send(&gw, "GET", &format!("{sub}/api/user/auth-tokens"), &cookie, None).await;
    assert_eq!(status, 200, "{label}: {body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{label}: {body}");
    assert_eq!(
        list[0]["isActive"], true,
        "{label}: the current session is marked ({body})"
    );
    let seen = stub.recorded_requests();
    let forwarded = seen_at(&seen, "GET", &format!("{sub}/api/user/auth-tokens"));
    assert_eq!(forwarded.len(), 1, "{label}");
    assert!(
        forwarded[0].has_credential(&name),
        "{label}: the cookie went along"
    );
    assert!(!forwarded[0].has_identity_headers(), "{label}");

    // The session falls due: Grafana's 401 reaches the browser, which
    // rotates through the gateway; the new cookie works.
    stub.advance_clock(ROTATION + Duration::from_secs(1));
    gw.running().gateway.cache().clear_local();
    let (status, body) = send(&gw, "GET", &format!("{sub}/api/user"), &cookie, None).await;
    assert_eq!(status, 401, "{label}: {body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["messageId"], "session.token.rotate", "{label}");
    let rotated = http
        .post(format!("{}{sub}/api/user/auth-tokens/rotate", gw.url))
        .header(COOKIE, &first)
        .send()
        .await
        .unwrap();
    assert_eq!(rotated.status(), 200, "{label}");
    let second = set_cookie(&rotated, &name).unwrap_or_else(|| panic!("{label}: no rotated cookie"));
    assert_ne!(second, first, "{label}");
    let cookie = Cred::Cookie(second.clone());
    let (status, body) = send(&gw, "GET", &format!("{sub}/api/user"), &cookie, None).await;
    assert_eq!(status, 200, "{label}: {body}");
    let (status, _) = send(&gw, "GET", &format!("{sub}/d/home"), &cookie, None).await;
    assert_eq!(status, 200, "{label}: the page with the new cookie");

    // Logout ends the session in Grafana, and the cookie is refused after.
    stub.record_requests(true);
    let (status, _) = send(&gw, "GET", &format!("{sub}/logout"), &cookie, None).await;
    assert_eq!(status, StatusCode::FOUND, "{label}");
    let seen = stub.recorded_requests();
    stub.record_requests(false);
    let forwarded = seen_at(&seen, "GET", &format!("{sub}/logout"));
    assert_eq!(forwarded.len(), 1, "{label}");
    assert!(
        !forwarded[0].has_identity_headers(),
        "{label}: {:?}",
        forwarded[0].headers
    );
    assert_eq!(
        stub.session_count(alice),
        0,
        "{label}: the session ended in Grafana"
    );
    let (status, _) = send(&gw, "GET", &format!("{sub}/api/user"), &cookie, None).await;
    assert_eq!(status, 401, "{label}: the old cookie no longer works");
    if flow.profile == Profile::Grafana || flow.judged_graph {
        let (status, _) = send(&gw, "GET", &format!("{sub}/d/home"), &cookie, None).await;
        assert!(status == StatusCode::FOUND || status == 401, "{label}: {status}");
    }
}

/// A user changed in Grafana behind the gateway's back, in auth-proxy mode:
/// disabled, Grafana refuses the proxy identity and the gateway forgets
/// it; deleted, Grafana (with `auto_sign_up = false`) refuses to sign the
/// login up again, and the gateway forgets it too.
#[tokio::test]
async fn a_user_changed_in_grafana_is_refused_and_forgotten_in_auth_proxy_mode() {
    let stub = GrafanaStub::start_with(stub_options(Flavor::Grafana11, |o| {
        o.auth_proxy_auto_sign_up = false
    }))
    .await;
    let gw = gateway(&stub, Profile::Grafana, GrafanaMode::AuthProxy, |_| {}).await;
    let disabled = stub.add_user("dora", "dora-pw-1", "Viewer", false);
    let deleted = stub.add_user("dan", "dan-pw-1", "Viewer", false);
    for (login, password, id, delete) in [
        ("dora", "dora-pw-1", disabled, false),
        ("dan", "dan-pw-1", deleted, true),
    ] {
        let cred = Cred::Basic(login.into(), password.into());
        let (status, _) = send(&gw, "GET", "/api/user", &cred, None).await;
        assert_eq!(status, 200, "{login}");
        if delete {
            assert!(stub.delete_user(id));
        } else {
            assert!(stub.set_user_disabled(id, true));
        }
        stub.record_requests(true);
        let (status, body) = send(&gw, "GET", "/api/org", &cred, None).await;
        assert_eq!(status, 401, "{login}: {body}");
        let seen = stub.recorded_requests();
        assert!(
            seen.len() == 1 && is_forwarded(&seen[0]),
            "{login}: from the cache, refused by Grafana: {seen:#?}"
        );
        stub.record_requests(true);
        let (status, _) = send(&gw, "GET", "/api/org", &cred, None).await;
        assert_eq!(status, 401, "{login}");
        let seen = stub.recorded_requests();
        assert!(
            !seen.is_empty() && !seen.iter().any(is_forwarded),
            "{login}: forgotten, verified again and refused: {seen:#?}"
        );
        assert_eq!(
            stub.user_by_login(login).is_some(),
            !delete,
            "{login}: not signed up again"
        );
    }
}

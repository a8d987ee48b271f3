//! Authentication end to end: every seed curl example, the role × route
//! matrix, caching proven by the stand-in's counters, merging, negative
//! caching, expiry, malformed credentials, spoofed headers and path tricks.

use std::sync::Arc;
use std::time::Duration;

use grafana_stub::{Flavor, GrafanaStub};
use portcullis::auth::Role;
use portcullis::config::{Config, Profile, RouteConfig};
use reqwest::StatusCode;
use serde_json::Value;

use crate::support::shell::Shell;
use crate::support::{self, client, curl, Gateway};

const SEED_PMM_KEY: &str =
    "eyJrIjoiUXRkeDNMS1g1bFVyY0tUj1o0SmhBc3g4QUdTRVAwekoiLCJuIjoicG1tLXRlc3QiLCJpZCI6MX0=";
const SEED_GRAFANA_KEY: &str =
    "eyJrIjoiWHZiSWd3NzdCYUZnNUtibE9obUpESmE3bzJYNDRIc0UiLCJuIjoibXlrZXkiLCJpZCI6MX1=";

async fn setup_with(
    flavor: Flavor,
    profile: Profile,
    tweak: impl FnOnce(&mut Config),
) -> (Arc<GrafanaStub>, Gateway) {
    let stub = Arc::new(GrafanaStub::start(flavor).await);
    let (mut config, dir) = support::config(&stub.url());
    config.auth.profile = profile;
    if flavor == Flavor::Pmm {
        config.auth.session_cookie = "pmm_session".into();
    }
    tweak(&mut config);
    let gateway = support::start(config, dir).await;
    (stub, gateway)
}

async fn setup(flavor: Flavor, profile: Profile) -> (Arc<GrafanaStub>, Gateway) {
    setup_with(flavor, profile, |_| {}).await
}

async fn json(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, value)
}

/// The nine curl lines of PMM's documents (docs/design.md, "The documented
/// curl lines"), as written there: only the host is the gateway's, and the
/// documents' placeholders (`<api_key>`, `SERVICE_TOKEN`, …) stand for keys
/// the stand-in knows.
#[tokio::test]
async fn pmm_seed_curl_examples_work_as_written() {
    let (stub, gw) = setup(Flavor::Pmm, Profile::Pmm).await;
    stub.add_api_key_exact(SEED_PMM_KEY, "Admin");
    let sa = stub.add_service_account("pmm-agent", "Admin");
    let (_, token) = stub.add_sa_token(sa, "agent-token", None);
    let sh = Shell::at(&gw)
        .set("<api_key>", SEED_PMM_KEY)
        .set("API_KEY", SEED_PMM_KEY)
        .set("<service_token>", &token)
        .set("SERVICE_TOKEN", &token);
    let seed_lines = [
        // 000: Basic by header and by -u.
        r"curl -X GET -H 'Authorization: Basic YWRtaW46YWRtaW4=' \
             -H 'Content-Type: application/json' https://HOST/v1/version",
        r"curl -X GET -u admin:admin -H 'Content-Type: application/json' https://HOST/v1/version",
        // 000: the documented legacy key, Bearer and in the URL.
        r"curl -X GET -H 'Authorization: Bearer eyJrIjoiUXRkeDNMS1g1bFVyY0tUj1o0SmhBc3g4QUdTRVAwekoiLCJuIjoicG1tLXRlc3QiLCJpZCI6MX0=' \
             -H 'Content-Type: application/json' https://HOST/v1/version",
        r"curl -X GET -H 'Content-Type: application/json' \
         https://api_key:eyJrIjoiUXRkeDNMS1g1bFVyY0tUj1o0SmhBc3g4QUdTRVAwekoiLCJuIjoicG1tLXRlc3QiLCJpZCI6MX0=@HOST/v1/version",
        // 001: the same key by its placeholders.
        r#"curl -H "Authorization: Bearer <api_key>" https://HOST/v1/version"#,
        r"curl -X GET https://api_key:API_KEY@localhost:PORT/v1/version",
        // 004: service tokens, Bearer and `service_token:` in the URL.
        r#"curl -H "Authorization: Bearer <service_token>" https://HOST/v1/version"#,
        r"curl -X GET https://service_token:SERVICE_TOKEN@localhost:PORT/v1/version",
        r"curl -X GET -H 'Authorization: Bearer SERVICE_TOKEN' \
             -H 'Content-Type: application/json' https://HOST/v1/version",
    ];
    for line in seed_lines {
        let (status, body) = sh.run(line).await;
        assert_eq!(status, 200, "{line} -> {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(v["version"].is_string(), "{body}");
    }
}

/// Grafana's documents' curl lines (docs/design.md, "The documented curl
/// lines"), as written there but for the host, and the calls their raw HTTP
/// examples make, typed as curl lines.
#[tokio::test]
async fn grafana_seed_curl_examples_work_as_written() {
    let (stub, gw) = setup(Flavor::Grafana11, Profile::Grafana).await;
    stub.add_api_key_exact(SEED_GRAFANA_KEY, "Admin");
    let sh = Shell::at(&gw).set("KEY", SEED_GRAFANA_KEY);

    // 002: basic auth in the URL, answer passed through.
    let (status, body) = sh.run("curl https://admin:admin@localhost:PORT/api/org").await;
    assert_eq!((status, body.as_str()), (200, r#"{"id":1,"name":"Main Org."}"#));
    // 003: -u.
    let (status, _) = sh.run("curl -u admin:admin https://HOST/api/org").await;
    assert_eq!(status, 200);

    // 002: the documented key lists, creates and deletes keys.
    let (status, body) = sh
        .run("curl -H 'Accept: application/json' -H 'Authorization: Bearer KEY' https://HOST/api/auth/keys")
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(serde_json::from_str::<Value>(&body).unwrap().is_array());
    let (status, body) = sh
        .run(
            r#"curl -X POST -H 'Content-Type: application/json' -H 'Authorization: Bearer KEY' \
                 -d '{"name":"mykey-2","role":"Admin"}' https://HOST/api/auth/keys"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    let new_key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_i64().unwrap().to_string();
    let sh = sh.set("NEW_KEY", &new_key).set("ID", &id);
    let (status, _) = sh
        .run("curl -H 'Authorization: Bearer NEW_KEY' https://HOST/api/org")
        .await;
    assert_eq!(status, 200);
    let (status, body) = sh
        .run("curl -X DELETE -H 'Authorization: Bearer KEY' https://HOST/api/auth/keys/ID")
        .await;
    assert_eq!((status, body.as_str()), (200, r#"{"message":"API key deleted"}"#));
    // Deleted through the gateway: refused on the very next request.
    let (status, _) = sh
        .run("curl -H 'Authorization: Bearer NEW_KEY' https://HOST/api/org")
        .await;
    assert_eq!(status, 401);

    // 002/003: the truncated documentation key is no key: refused locally.
    let before = stub.verifications();
    let (status, body) = sh
        .run(
            r#"curl -H "Authorization: Bearer eyJrIjoiT0tTcG1pUlY2RnVKZTFVaDFsNFZXdE9ZWmNrMkZYbk" \
                 https://HOST/api/org"#,
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["message"],
        "Unauthorized"
    );
    assert_eq!(stub.verifications(), before);

    // 003: session login through the seeds' /api/login (keeping the cookie
    // in a jar), then logout.
    let jar = tempfile::NamedTempFile::new().unwrap();
    let sh = sh.set("JAR", jar.path().to_str().unwrap());
    let (status, body) = sh
        .run(
            r#"curl -X POST https://HOST/api/login -c JAR \
                 -H "Content-Type: application/json" \
                 -d '{
                   "user": "admin",
                   "password": "admin"
                 }'"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["message"],
        "Logged in"
    );
    let (status, body) = sh.run("curl -b JAR https://HOST/api/user").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["login"], "admin");
    let (status, _) = sh.run("curl -X GET -b JAR https://HOST/api/logout").await;
    assert_eq!(status, 302);
    let (status, _) = sh.run("curl -b JAR https://HOST/api/user").await;
    assert_eq!(status, 401, "a logged-out session is refused on the next request");

    // 003: auth tokens of a user, revoke one, rotate.
    let session = stub.login("admin", "admin").expect("stub login");
    let (status, body) = sh
        .run(
            r"curl -X GET https://HOST/api/user/auth-tokens \
                 -u admin:admin",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let tokens: Value = serde_json::from_str(&body).unwrap();
    let token_id = tokens.as_array().unwrap().last().unwrap()["id"]
        .as_i64()
        .unwrap()
        .to_string();
    let sh = sh.set("SESSION", &session).set("TOKEN_ID", &token_id);
    let (status, _) = sh
        .run("curl -b grafana_session=SESSION https://HOST/api/user")
        .await;
    assert_eq!(status, 200);
    let (status, body) = sh
        .run(
            r#"curl -X POST https://HOST/api/user/revoke-auth-token \
                 -u admin:admin \
                 -H "Content-Type: application/json" \
                 -d '{
                   "authTokenId": TOKEN_ID
                 }'"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = sh
        .run("curl -b grafana_session=SESSION https://HOST/api/user")
        .await;
    assert_eq!(status, 401, "a revoked session is refused on the next request");
    // Rotation with Basic: whatever Grafana answers, passed through as JSON.
    let direct = reqwest::Client::new()
        .post(format!("{}/api/user/auth-tokens/rotate", stub.url()))
        .basic_auth("admin", Some("admin"))
        .send()
        .await
        .unwrap()
        .status();
    let (status, _) = sh
        .run(
            r"curl -X POST https://HOST/api/user/auth-tokens/rotate \
                 -u admin:admin",
        )
        .await;
    assert_eq!(status, direct.as_u16());
}

#[tokio::test]
async fn role_by_route_matrix_for_users_tokens_and_keys() {
    let (stub, gw) = setup(Flavor::Pmm, Profile::Pmm).await;
    let c = client();
    let mut principals: Vec<(String, reqwest::RequestBuilder, Role)> = Vec::new();
    let paths = [
        ("/ping", Role::None),
        ("/v1/version", Role::Viewer),
        ("/v1/alerting/x", Role::Viewer),
        ("/v1/alerting/rules/x", Role::Editor),
        ("/v1/inventory/nodes", Role::Admin),
        ("/v1/unmatched", Role::GrafanaAdmin),
    ];
    for role in ["Viewer", "Editor", "Admin"] {
        let login = format!("user-{role}");
        stub.add_user(&login, "pw-secret", role, false);
        let sa = stub.add_service_account(&format!("sa-{role}"), role);
        let (_, token) = stub.add_sa_token(sa, "t", None);
        let (_, key) = stub.add_api_key(&format!("key-{role}"), role, None);
        let level = Role::from_grafana(role);
        for path in paths.iter().map(|p| p.0) {
            let url = format!("{}{path}", gw.url);
            principals.push((
                format!("user {role} {path}"),
                c.get(&url).basic_auth(&login, Some("pw-secret")),
                level,
            ));
            principals.push((
                format!("token {role} {path}"),
                c.get(&url).bearer_auth(&token),
                level,
            ));
            principals.push((format!("key {role} {path}"), c.get(&url).bearer_auth(&key), level));
        }
    }
    stub.add_user("root", "pw-secret", "Viewer", true);
    for path in paths.iter().map(|p| p.0) {
        let url = format!("{}{path}", gw.url);
        principals.push((
            format!("grafana admin {path}"),
            c.get(&url).basic_auth("root", Some("pw-secret")),
            Role::GrafanaAdmin,
        ));
    }
    for (name, request, level) in principals {
        let path = name.rsplit(' ').next().unwrap();
        let needed = paths.iter().find(|p| p.0 == path).unwrap().1;
        let response = request.send().await.unwrap();
        let expected = if level >= needed { 200 } else { 403 };
        assert_eq!(response.status().as_u16(), expected, "{name}");
        if expected == 403 {
            let (_, body) = json(response).await;
            assert_eq!(body["message"], "Permission denied");
        }
    }
}

#[tokio::test]
async fn cache_hits_merged_misses_negative_cache() {
    let (stub, gw) = setup(Flavor::Pmm, Profile::Pmm).await;
    let sa = stub.add_service_account("merge", "Viewer");
    let (_, token) = stub.add_sa_token(sa, "t", None);
    let url = format!("{}/v1/version", gw.url);

    // 1,000 simultaneous requests with one new token: one verification.
    let before = stub.verifications();
    let h2 = support::http2_client();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        // Half over one HTTP/2 connection, half over separate HTTP/1.1 ones.
        let c = if i % 2 == 0 { h2.clone() } else { client() };
        let (url, token) = (url.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            c.get(url).bearer_auth(token).send().await.map(|r| r.status())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(
        stub.verifications() - before,
        1,
        "PMM names a token in one call, made once"
    );

    // Cached: more requests, no more verifications.
    let c = client();
    for _ in 0..50 {
        assert_eq!(
            c.get(&url).bearer_auth(&token).send().await.unwrap().status(),
            200
        );
    }
    assert_eq!(stub.verifications() - before, 1);

    // A user costs two calls (/api/user, /api/user/orgs), once.
    let before = stub.verifications();
    for _ in 0..20 {
        assert_eq!(
            c.get(&url)
                .basic_auth("admin", Some("admin"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    assert_eq!(stub.verifications() - before, 2);

    // A well-formed but unknown token: refused, and remembered as refused.
    let unknown = "glsa_iNValIdinValiDinvalidinvalidinva_5b582697";
    let before = stub.verifications();
    for _ in 0..50 {
        let (status, body) = json(c.get(&url).bearer_auth(unknown).send().await.unwrap()).await;
        assert_eq!(status, 401);
        assert_eq!(body["message"], "Unauthorized");
    }
    assert_eq!(stub.verifications() - before, 1);

    // A wrong password floods without locking the user out in Grafana.
    for _ in 0..20 {
        let status = c
            .get(&url)
            .basic_auth("admin", Some("wrong"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 401);
    }
    let direct = reqwest::Client::new()
        .get(format!("{}/api/user", stub.url()))
        .basic_auth("admin", Some("admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        direct.status(),
        200,
        "negative caching kept admin from being locked out"
    );
}

#[tokio::test]
async fn cached_identity_expires_by_ttl_checked_on_hit() {
    let (stub, gw) = setup_with(Flavor::Pmm, Profile::Pmm, |c| {
        c.cache.ttl = Duration::from_millis(700);
    })
    .await;
    let c = client();
    let url = format!("{}/v1/version", gw.url);
    let sa = stub.add_service_account("ttl", "Viewer");
    let (_, token) = stub.add_sa_token(sa, "t", None);
    let before = stub.verifications();
    assert_eq!(
        c.get(&url).bearer_auth(&token).send().await.unwrap().status(),
        200
    );
    // Used continuously: TTL counts from verification, not from last use.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            c.get(&url).bearer_auth(&token).send().await.unwrap().status(),
            200
        );
    }
    assert!(stub.verifications() - before >= 2, "re-verified after the TTL");
}

#[tokio::test]
async fn malformed_credentials_get_json_errors_not_500() {
    let (stub, gw) = setup(Flavor::Pmm, Profile::Pmm).await;
    let c = client();
    let url = format!("{}/v1/version", gw.url);
    let before = stub.verifications();
    let cases: Vec<(&str, Vec<&[u8]>, u16)> = vec![
        ("bad base64", vec![b"Basic !!!notbase64"], 401),
        ("no colon", vec![b"Basic YWRtaW4="], 401),
        ("non-UTF-8", vec![b"Basic /w=="], 401),
        ("empty bearer", vec![b"Bearer "], 401),
        ("unknown scheme", vec![b"Digest abc"], 401),
        (
            "bad glsa checksum",
            vec![b"Bearer glsa_iNValIdinValiDinvalidinvalidinva_5b582698"],
            401,
        ),
        ("glsa four parts", vec![b"Bearer glsa_a_b_c"], 401),
        ("key not JSON", vec![b"Bearer bm90IGpzb24="], 401),
        ("non-ASCII header", vec![b"Bearer \xff\xfe"], 400),
        (
            "two headers",
            vec![b"Basic YWRtaW46YWRtaW4=", b"Basic YWRtaW46YWRtaW4="],
            400,
        ),
    ];
    for (name, values, expected) in cases {
        let mut headers = reqwest::header::HeaderMap::new();
        for v in values {
            headers.append(
                reqwest::header::AUTHORIZATION,
                reqwest::header::HeaderValue::from_bytes(v).unwrap(),
            );
        }
        let response = c.get(&url).headers(headers).send().await.unwrap();
        let (status, body) = json(response).await;
        assert_eq!(status.as_u16(), expected, "{name}: {body}");
        assert!(body["message"].is_string(), "{name}: {body}");
    }
    assert_eq!(
        stub.verifications(),
        before,
        "refused locally, Grafana never asked"
    );
    // No credential at all.
    let (status, body) = json(c.get(&url).send().await.unwrap()).await;
    assert_eq!(
        (status.as_u16(), body["message"].as_str()),
        (401, Some("Unauthorized"))
    );
}

#[tokio::test]
async fn identity_headers_injected_and_spoofs_removed() {
    let (stub, gw) = setup(Flavor::Pmm, Profile::Pmm).await;
    stub.add_user("viewer1", "pw-secret", "Viewer", false);
    let sa = stub.add_service_account("agent", "Admin");
    let (_, token) = stub.add_sa_token(sa, "t", None);
    let c = client();
    let spoofs = [
        "X-WEBAUTH-USER",
        "x-webauth-user",
        "X_WEBAUTH_USER",
        "x_webauth_user",
        "X-Webauth_User",
        "X-WEBAUTH-ROLE",
        "x_webauth_role",
        "X-WEBAUTH-ORG-ID",
        "X-WEBAUTH-EMAIL",
        "x_webauth_name",
    ];
    let mut request = c
        .get(format!("{}/v1/qan/echo", gw.url))
        .basic_auth("viewer1", Some("pw-secret"));
    for s in spoofs {
        request = request.header(s, "admin");
    }
    let (status, echo) = json(request.send().await.unwrap()).await;
    assert_eq!(status, 200, "{echo}");
    let headers = &echo["headers"];
    assert_eq!(
        headers["x-webauth-user"],
        serde_json::json!(["viewer1"]),
        "{echo}"
    );
    // No role header unless the operator asks for one (identity.send_role).
    assert!(headers.get("x-webauth-role").is_none(), "{echo}");
    assert_eq!(headers["x-webauth-org-id"], serde_json::json!(["1"]));
    for (name, _) in headers.as_object().unwrap() {
        assert!(!name.contains('_'), "spoofed {name} reached the upstream: {echo}");
    }
    // Anonymous route: nothing injected, and no spoof passes either.
    let mut request = c.get(format!("{}/ping", gw.url));
    for s in spoofs {
        request = request.header(s, "admin");
    }
    let (status, echo) = json(request.send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(
        echo["headers"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.contains("webauth")),
        "{echo}"
    );
    // `service_token:` Basic is turned into Bearer towards the upstream.
    let (status, echo) = json(
        c.get(format!("{}/v1/inventory/echo", gw.url))
            .basic_auth("service_token", Some(&token))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(
        echo["headers"]["authorization"],
        serde_json::json!([format!("Bearer {token}")])
    );
    assert_eq!(echo["headers"]["x-webauth-user"], serde_json::json!(["sa-agent"]));
}

#[tokio::test]
async fn path_tricks_cannot_reach_a_stricter_route() {
    let (stub, gw) = setup(Flavor::Pmm, Profile::Pmm).await;
    stub.add_user("viewer1", "pw-secret", "Viewer", false);
    let base = &gw.url;
    for path in [
        "/v1/server/x/..%2f..%2finventory/nodes",
        "/v1/version/../inventory/nodes",
        "/v1/version/%2e%2e/inventory/nodes",
        "/v1/version/%2E%2E%2Finventory/nodes",
        "//v1//inventory/nodes",
        "/v1/./inventory/nodes",
        "/v1/version/..%2F..%2Fv1%2Finventory",
        "/V1/version/../../v1/inventory",
    ] {
        let (status, body) = curl(&[
            "--path-as-is",
            "-u",
            "viewer1:pw-secret",
            &format!("{base}{path}"),
        ])
        .await;
        assert_eq!(status, 403, "{path}: {body}");
    }
    // The spelling the upstream receives is the one that was matched.
    let (status, body) = curl(&[
        "--path-as-is",
        "-u",
        "admin:admin",
        &format!("{base}/v1/server/x/..%2f..%2finventory/nodes"),
    ])
    .await;
    assert_eq!(status, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["path"], "/v1/inventory/nodes");
    // Mixed-case host names are one host.
    let port = gw.running().addr.port();
    let (status, _) = curl(&[
        "-u",
        "viewer1:pw-secret",
        "--resolve",
        &format!("GrAfAnA.LoCaL:{port}:127.0.0.1"),
        &format!("https://GrAfAnA.LoCaL:{port}/v1/version"),
    ])
    .await;
    assert_eq!(status, 200);
    // Malformed escapes are a 400 with a JSON body.
    let (status, body) = curl(&["--path-as-is", "-u", "admin:admin", &format!("{base}/v1/%zz")]).await;
    assert_eq!(status, 400);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["message"].is_string());
}

#[tokio::test]
async fn grafana_down_is_503_for_new_credentials_never_401() {
    let (stub, gw) = setup_with(Flavor::Pmm, Profile::Pmm, |c| {
        c.auth.grafana.timeout = Duration::from_millis(500);
    })
    .await;
    let c = client();
    let url = format!("{}/v1/version", gw.url);
    let sa = stub.add_service_account("down", "Viewer");
    let (_, token) = stub.add_sa_token(sa, "t", None);
    let (_, token2) = stub.add_sa_token(sa, "t2", None);
    let (_, token3) = stub.add_sa_token(sa, "t3", None);

    stub.set_unavailable(true);
    let (status, body) = json(c.get(&url).bearer_auth(&token).send().await.unwrap()).await;
    assert_eq!(status, 503);
    assert_eq!(body["message"], "Authentication service unavailable");
    stub.set_unavailable(false);
    // Not remembered as refused: works as soon as Grafana answers again.
    assert_eq!(
        c.get(&url).bearer_auth(&token).send().await.unwrap().status(),
        200
    );

    stub.set_delay(Some(Duration::from_secs(2)));
    let (status, _) = json(c.get(&url).bearer_auth(&token2).send().await.unwrap()).await;
    assert_eq!(status, 503, "a verifier time-out is 503");
    stub.set_delay(None);

    stub.stop().await;
    let (status, body) = json(c.get(&url).bearer_auth(&token3).send().await.unwrap()).await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test]
async fn browser_without_session_is_sent_to_login() {
    let (_stub, gw) = setup(Flavor::Grafana11, Profile::Grafana).await;
    let c = client();
    let response = c
        .get(format!("{}/d/abc/my-dashboard?orgId=1", gw.url))
        .header("Accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 302);
    assert_eq!(
        response.headers()["location"],
        "/login?redirectTo=%2Fd%2Fabc%2Fmy%2Ddashboard%3ForgId%3D1"
    );
    // An API client gets 401, and the login page itself is open.
    let response = c
        .get(format!("{}/api/dashboards/uid/abc", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = c.get(format!("{}/api/health", gw.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn vanilla_grafana_tokens_use_fallbacks() {
    for flavor in [Flavor::Grafana11, Flavor::Grafana10_4] {
        let (stub, gw) = setup(flavor, Profile::Grafana).await;
        let sa = stub.add_service_account("vanilla", "Admin");
        let (_, token) = stub.add_sa_token(sa, "t", None);
        let c = client();
        let (status, body) = json(
            c.get(format!("{}/api/org", gw.url))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{flavor:?}: {body}");
        let (status, _) = json(
            c.get(format!("{}/api/org", gw.url))
                .bearer_auth("glsa_iNValIdinValiDinvalidinvalidinva_5b582697")
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 401, "{flavor:?}");
    }
}

#[tokio::test]
async fn route_can_withhold_credentials_from_the_upstream() {
    let (stub, gw) = setup_with(Flavor::Pmm, Profile::Pmm, |c| {
        c.routes.push(RouteConfig {
            forward_credentials: false,
            ..RouteConfig::rule("/v1/qan", Role::Viewer)
        });
    })
    .await;
    stub.add_user("viewer1", "pw-secret", "Viewer", false);
    let c = client();
    let (status, echo) = json(
        c.get(format!("{}/v1/qan/x", gw.url))
            .basic_auth("viewer1", Some("pw-secret"))
            .header(
                "Cookie",
                "pmm_session=0123456789abcdef0123456789abcdef; theme=dark",
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{echo}");
    assert!(echo["headers"].get("authorization").is_none(), "{echo}");
    assert_eq!(echo["headers"]["cookie"], serde_json::json!(["theme=dark"]));
    assert_eq!(echo["headers"]["x-webauth-user"], serde_json::json!(["viewer1"]));
}

//! The stand-in over real HTTP: the answers docs/grafana.md gives, per flavor.

use std::time::Duration;

use bytes::Bytes;
use grafana_stub::{Flavor, GrafanaStub, StubOptions};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

const SEED_PMM_KEY: &str =
    "eyJrIjoiUXRkeDNMS1g1bFVyY0tUj1o0SmhBc3g4QUdTRVAwekoiLCJuIjoicG1tLXRlc3QiLCJpZCI6MX0=";
const SEED_GRAFANA_KEY: &str =
    "eyJrIjoiWHZiSWd3NzdCYUZnNUtibE9obUpESmE3bzJYNDRIc0UiLCJuIjoibXlrZXkiLCJpZCI6MX1=";

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

async fn call(
    stub: &GrafanaStub,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Answer {
    let stream = tokio::net::TcpStream::connect(stub.addr())
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut request = Request::builder().method(method).uri(path).header("host", "stub");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .filter_map(|v| v.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

#[tokio::test]
async fn seed_keys_work_on_every_flavor() {
    for flavor in [Flavor::Pmm, Flavor::Grafana11, Flavor::Grafana10_4] {
        let stub = GrafanaStub::start(flavor).await;
        stub.add_api_key_exact(SEED_PMM_KEY, "Admin");
        stub.add_api_key_exact(SEED_GRAFANA_KEY, "Viewer");
        for key in [SEED_PMM_KEY, SEED_GRAFANA_KEY] {
            let a = call(&stub, "GET", "/api/org", &[("authorization", &bearer(key))], None).await;
            assert_eq!(
                (a.status, a.body.to_string()),
                (200, r#"{"id":1,"name":"Main Org."}"#.into()),
                "{flavor}"
            );
            let a = call(
                &stub,
                "GET",
                "/api/org",
                &[("authorization", &basic("api_key", key))],
                None,
            )
            .await;
            assert_eq!(a.status, 200, "{flavor}");
        }
        if flavor == Flavor::Pmm {
            // PMM 3 migrated the keys to service accounts.
            let a = call(
                &stub,
                "GET",
                "/api/auth/serviceaccount",
                &[("authorization", &bearer(SEED_PMM_KEY))],
                None,
            )
            .await;
            assert_eq!(a.status, 200);
            assert_eq!(a.body["role"], "Admin");
        } else {
            let a = call(
                &stub,
                "GET",
                "/api/auth/keys",
                &[("authorization", &bearer(SEED_PMM_KEY))],
                None,
            )
            .await;
            assert_eq!(a.status, 200, "{}", a.body);
            assert_eq!(a.body.as_array().map(Vec::len), Some(2));
            let a = call(
                &stub,
                "GET",
                "/api/auth/keys",
                &[("authorization", &bearer(SEED_GRAFANA_KEY))],
                None,
            )
            .await;
            assert_eq!(
                (a.status, a.body["message"].as_str()),
                (403, Some("Permission denied"))
            );
        }
    }
}

#[tokio::test]
async fn token_identity_answers_per_flavor() {
    for flavor in [Flavor::Pmm, Flavor::Grafana11, Flavor::Grafana10_4] {
        let stub = GrafanaStub::start(flavor).await;
        let sa = stub.add_service_account("pmm-agent", "Editor");
        let (_, token) = stub.add_sa_token(sa, "t", None);
        let auth = [("authorization", bearer(&token))];
        let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
        stub.reset_counters();

        let user = call(&stub, "GET", "/api/user", &auth, None).await;
        let orgs = call(&stub, "GET", "/api/user/orgs", &auth, None).await;
        assert_eq!(
            (orgs.status, orgs.body["message"].as_str()),
            (403, Some("Endpoint only available for users"))
        );
        let org = call(&stub, "GET", "/api/org", &auth, None).await;
        assert_eq!(org.status, 200);
        let sa_answer = call(&stub, "GET", "/api/auth/serviceaccount", &auth, None).await;
        match flavor {
            Flavor::Pmm => {
                assert_eq!(user.body["login"], "sa-pmm-agent");
                assert_eq!(sa_answer.status, 200);
                assert_eq!(sa_answer.body["login"], "sa-pmm-agent");
                assert_eq!(sa_answer.body["role"], "Editor");
                assert_eq!(sa_answer.body["isDisabled"], false);
            }
            Flavor::Grafana11 => {
                assert_eq!(
                    (user.status, &user.body["login"]),
                    (200, &Value::from("sa-pmm-agent"))
                );
                assert_eq!(sa_answer.status, 404);
            }
            Flavor::Grafana10_4 => {
                assert_eq!(user.status, 403);
                assert_eq!(sa_answer.status, 404);
            }
        }
        assert_eq!(stub.verifications(), 4, "{flavor}");
        assert_eq!(stub.calls("/api/user"), 2);

        // A user: /api/auth/serviceaccount says null on PMM.
        if flavor == Flavor::Pmm {
            let a = call(
                &stub,
                "GET",
                "/api/auth/serviceaccount",
                &[("authorization", &basic("admin", "admin"))],
                None,
            )
            .await;
            assert_eq!((a.status, a.body.clone()), (200, Value::Null));
        }
        // The role is readable with an admin credential.
        let a = call(
            &stub,
            "GET",
            &format!("/api/serviceaccounts/{sa}"),
            &[("authorization", &basic("admin", "admin"))],
            None,
        )
        .await;
        assert_eq!((a.status, &a.body["role"]), (200, &Value::from("Editor")));
    }
}

#[tokio::test]
async fn bad_tokens_and_keys_are_refused_like_grafana() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let a = call(&stub, "GET", "/api/org", &[], None).await;
    assert_eq!(
        (a.status, a.body.to_string()),
        (401, r#"{"message":"Unauthorized"}"#.into())
    );
    for token in [
        "glsa_iNValIdinValiDinvalidinvalidinva_5b582697", // well-formed, unknown
        "glsa_iNValIdinValiDinvalidinvalidinva_5b582698", // bad checksum
        "eyJrIjoiT0tTcG1pUlY2RnVKZTFVaDFsNFZXdE9ZWmNrMkZYbk", // truncated
    ] {
        let a = call(
            &stub,
            "GET",
            "/api/org",
            &[("authorization", &bearer(token))],
            None,
        )
        .await;
        assert_eq!(a.status, 401);
        assert_eq!(a.body["message"], "Invalid API key");
        assert_eq!(a.body["messageId"], "api-key.invalid");
        assert_eq!(a.body["statusCode"], 401);
    }

    let sa = stub.add_service_account("short", "Viewer");
    let (_, token) = stub.add_sa_token(sa, "t", Some(60));
    let (_, key) = stub.add_api_key("short-key", "Viewer", Some(60));
    assert_eq!(
        call(
            &stub,
            "GET",
            "/api/org",
            &[("authorization", &bearer(&token))],
            None
        )
        .await
        .status,
        200
    );
    assert_eq!(
        call(
            &stub,
            "GET",
            "/api/org",
            &[("authorization", &bearer(&key))],
            None
        )
        .await
        .status,
        200
    );
    let admin = basic("admin", "admin");
    let tokens = call(
        &stub,
        "GET",
        &format!("/api/serviceaccounts/{sa}/tokens"),
        &[("authorization", &admin)],
        None,
    )
    .await;
    let seconds = tokens.body[0]["secondsUntilExpiration"].as_f64().unwrap_or(0.0);
    assert!(seconds > 50.0 && seconds <= 60.0, "{}", tokens.body);
    stub.advance_clock(Duration::from_secs(61));
    for credential in [&token, &key] {
        let a = call(
            &stub,
            "GET",
            "/api/org",
            &[("authorization", &bearer(credential))],
            None,
        )
        .await;
        assert_eq!(
            (a.status, a.body["message"].as_str()),
            (401, Some("Expired API key"))
        );
    }
    let tokens = call(
        &stub,
        "GET",
        &format!("/api/serviceaccounts/{sa}/tokens"),
        &[("authorization", &admin)],
        None,
    )
    .await;
    assert_eq!(tokens.body[0]["hasExpired"], true);
}

#[tokio::test]
async fn five_failures_lock_the_user_and_failed_basic_counts() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    stub.add_user("alice", "right-pw", "Viewer", false);
    for _ in 0..5 {
        let a = call(
            &stub,
            "GET",
            "/api/user",
            &[("authorization", &basic("Alice", "wrong"))],
            None,
        )
        .await;
        assert_eq!(
            (a.status, a.body["messageId"].as_str()),
            (401, Some("password-auth.failed"))
        );
    }
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[("authorization", &basic("alice", "right-pw"))],
        None,
    )
    .await;
    assert_eq!(
        (a.status, a.body["messageId"].as_str()),
        (401, Some("login-attempt.blocked"))
    );
    let a = call(
        &stub,
        "POST",
        "/login",
        &[("content-type", "application/json")],
        Some(r#"{"user":"alice","password":"right-pw"}"#),
    )
    .await;
    assert_eq!(
        (a.status, a.body["message"].as_str()),
        (401, Some("Invalid username or password"))
    );
    assert!(stub.login("alice", "right-pw").is_none());
    stub.advance_clock(Duration::from_secs(5 * 60 + 1));
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[("authorization", &basic("alice", "right-pw"))],
        None,
    )
    .await;
    assert_eq!((a.status, &a.body["login"]), (200, &Value::from("alice")));

    // `service_token` is just a username to Grafana: five tries lock it.
    for _ in 0..5 {
        call(
            &stub,
            "GET",
            "/api/org",
            &[("authorization", &basic("service_token", "glsa_x_y"))],
            None,
        )
        .await;
    }
    stub.add_user("service_token", "pw-1234", "Viewer", false);
    let a = call(
        &stub,
        "GET",
        "/api/org",
        &[("authorization", &basic("service_token", "pw-1234"))],
        None,
    )
    .await;
    assert_eq!(a.body["messageId"], "login-attempt.blocked");
}

#[tokio::test]
async fn sessions_login_rotate_revoke_logout() {
    let stub = GrafanaStub::start(Flavor::Pmm).await;
    let a = call(
        &stub,
        "POST",
        "/login",
        &[("content-type", "application/json")],
        Some(r#"{"user":"admin@localhost","password":"admin"}"#),
    )
    .await;
    assert_eq!(a.status, 200);
    // PMM serves Grafana under /graph: Grafana's redirects carry it.
    assert_eq!(
        a.body.to_string(),
        r#"{"message":"Logged in","redirectUrl":"/graph/"}"#
    );
    let first = cookie_value(&a.headers, "pmm_session").expect("pmm_session cookie");
    assert_eq!(first.len(), 32);
    assert!(cookie_value(&a.headers, "grafana_session_expiry").is_some());
    let c1 = format!("pmm_session={first}");
    let a = call(&stub, "GET", "/api/user", &[("cookie", &c1)], None).await;
    assert_eq!((a.status, &a.body["login"]), (200, &Value::from("admin")));
    let orgs = call(&stub, "GET", "/api/user/orgs", &[("cookie", &c1)], None).await;
    assert_eq!(orgs.body[0]["role"], "Admin");

    // Rotating again within 5 s of the last rotation (here: the login) is
    // skipped: 200 and no new cookie (Grafana's SkipRotationTime).
    let a = call(
        &stub,
        "POST",
        "/api/user/auth-tokens/rotate",
        &[("cookie", &c1)],
        None,
    )
    .await;
    assert_eq!((a.status, a.body.to_string()), (200, "{}".to_owned()));
    assert_eq!(cookie_value(&a.headers, "pmm_session"), None);
    stub.advance_clock(Duration::from_secs(5));

    // Rotation: a new token. The previous one keeps working until the new
    // one is seen; after that it can only rotate (Grafana's LookupToken).
    let a = call(
        &stub,
        "POST",
        "/api/user/auth-tokens/rotate",
        &[("cookie", &c1)],
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    let second = cookie_value(&a.headers, "pmm_session").expect("rotated cookie");
    assert_ne!(first, second);
    let c2 = format!("pmm_session={second}");
    assert_eq!(
        call(&stub, "GET", "/api/user", &[("cookie", &c1)], None)
            .await
            .status,
        200
    );
    assert_eq!(
        call(&stub, "GET", "/api/user", &[("cookie", &c2)], None)
            .await
            .status,
        200
    );
    let a = call(&stub, "GET", "/api/user", &[("cookie", &c1)], None).await;
    assert_eq!(
        (a.status, a.body["messageId"].as_str()),
        (401, Some("session.token.rotate"))
    );
    // Rotation with Basic and no cookie: 401.
    let a = call(
        &stub,
        "POST",
        "/api/user/auth-tokens/rotate",
        &[("authorization", &basic("admin", "admin"))],
        None,
    )
    .await;
    assert_eq!(a.status, 401);

    // Another session, revoked from the first; the active one cannot be.
    let other = stub.login("admin", "admin").expect("login");
    let list = call(&stub, "GET", "/api/user/auth-tokens", &[("cookie", &c2)], None).await;
    let list = list.body.as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 2);
    let active = list.iter().find(|t| t["isActive"] == true).expect("active");
    let inactive = list.iter().find(|t| t["isActive"] == false).expect("inactive");
    let body = format!(r#"{{"authTokenId":{}}}"#, active["id"]);
    let a = call(
        &stub,
        "POST",
        "/api/user/revoke-auth-token",
        &[("cookie", &c2)],
        Some(&body),
    )
    .await;
    assert_eq!(a.status, 400);
    let body = format!(r#"{{"authTokenId":{}}}"#, inactive["id"]);
    let a = call(
        &stub,
        "POST",
        "/api/user/revoke-auth-token",
        &[("cookie", &c2)],
        Some(&body),
    )
    .await;
    assert_eq!(
        (a.status, a.body["message"].as_str()),
        (200, Some("User auth token revoked"))
    );
    let c3 = format!("pmm_session={other}");
    assert_eq!(
        call(&stub, "GET", "/api/user", &[("cookie", &c3)], None)
            .await
            .status,
        401
    );

    // Sessions must be rotated every 10 minutes, and die after 7 idle days.
    stub.advance_clock(Duration::from_secs(11 * 60));
    let a = call(&stub, "GET", "/api/user", &[("cookie", &c2)], None).await;
    assert_eq!(
        (a.status, a.body["messageId"].as_str()),
        (401, Some("session.token.rotate"))
    );
    let a = call(
        &stub,
        "POST",
        "/api/user/auth-tokens/rotate",
        &[("cookie", &c2)],
        None,
    )
    .await;
    let third = cookie_value(&a.headers, "pmm_session").expect("rotated again");
    let c4 = format!("pmm_session={third}");
    assert_eq!(
        call(&stub, "GET", "/api/user", &[("cookie", &c4)], None)
            .await
            .status,
        200
    );

    let a = call(&stub, "GET", "/logout", &[("cookie", &c4)], None).await;
    assert_eq!(a.status, 302);
    assert_eq!(a.headers["location"], "/graph/login");
    assert_eq!(cookie_value(&a.headers, "pmm_session").as_deref(), Some(""));
    assert_eq!(
        call(&stub, "GET", "/api/user", &[("cookie", &c4)], None)
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn management_calls_end_what_they_should() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let admin = basic("admin", "admin");
    let h = |v: &str| {
        vec![
            ("authorization", v.to_owned()),
            ("content-type", "application/json".to_owned()),
        ]
    };
    let hv = |v: &Vec<(&'static str, String)>| v.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>();
    let headers = hv(&h(&admin));
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // Keys: create, use, duplicate, bad role, delete.
    let a = call(
        &stub,
        "POST",
        "/api/auth/keys",
        &headers,
        Some(r#"{"name":"k1","role":"Editor"}"#),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let key = a.body["key"].as_str().unwrap_or_default().to_owned();
    assert!(key.starts_with("eyJrIjoi"));
    let key_id = a.body["id"].as_i64().unwrap_or_default();
    assert_eq!(
        call(
            &stub,
            "POST",
            "/api/auth/keys",
            &headers,
            Some(r#"{"name":"k1","role":"Editor"}"#)
        )
        .await
        .status,
        409
    );
    let a = call(
        &stub,
        "POST",
        "/api/auth/keys",
        &headers,
        Some(r#"{"name":"k2","role":"Boss"}"#),
    )
    .await;
    assert_eq!(
        (a.status, a.body["message"].as_str()),
        (400, Some("Invalid role specified"))
    );
    assert_eq!(
        call(
            &stub,
            "GET",
            "/api/org",
            &[("authorization", &bearer(&key))],
            None
        )
        .await
        .status,
        200
    );
    let a = call(
        &stub,
        "DELETE",
        &format!("/api/auth/keys/{key_id}"),
        &headers,
        None,
    )
    .await;
    assert_eq!(a.body.to_string(), r#"{"message":"API key deleted"}"#);
    assert_eq!(
        call(
            &stub,
            "DELETE",
            &format!("/api/auth/keys/{key_id}"),
            &headers,
            None
        )
        .await
        .status,
        404
    );
    assert_eq!(
        call(
            &stub,
            "GET",
            "/api/org",
            &[("authorization", &bearer(&key))],
            None
        )
        .await
        .status,
        401
    );

    // Service accounts and tokens.
    let a = call(
        &stub,
        "POST",
        "/api/serviceaccounts",
        &headers,
        Some(r#"{"name":"grafana agent","role":"Viewer"}"#),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.body["login"], "sa-grafana-agent");
    let sa = a.body["id"].as_i64().unwrap_or_default();
    let a = call(
        &stub,
        "POST",
        &format!("/api/serviceaccounts/{sa}/tokens"),
        &headers,
        Some(r#"{"name":"t1"}"#),
    )
    .await;
    assert_eq!(a.status, 200);
    let token = a.body["key"].as_str().unwrap_or_default().to_owned();
    let token_id = a.body["id"].as_i64().unwrap_or_default();
    let a = call(
        &stub,
        "GET",
        "/api/serviceaccounts/search?query=agent&perpage=10&page=1",
        &headers,
        None,
    )
    .await;
    assert_eq!(a.body["totalCount"], 1);
    assert_eq!(a.body["serviceAccounts"][0]["tokens"], 1);
    let a = call(
        &stub,
        "PATCH",
        &format!("/api/serviceaccounts/{sa}"),
        &headers,
        Some(r#"{"role":"Admin"}"#),
    )
    .await;
    assert_eq!(
        (a.status, a.body["message"].as_str()),
        (200, Some("Service account updated"))
    );
    let a = call(
        &stub,
        "GET",
        "/api/auth/keys",
        &[("authorization", &bearer(&token))],
        None,
    )
    .await;
    assert_eq!(a.status, 200, "the token is Admin now");
    let a = call(
        &stub,
        "PATCH",
        &format!("/api/serviceaccounts/{sa}"),
        &headers,
        Some(r#"{"isDisabled":true}"#),
    )
    .await;
    assert_eq!(a.status, 200);
    let a = call(
        &stub,
        "GET",
        "/api/org",
        &[("authorization", &bearer(&token))],
        None,
    )
    .await;
    assert_eq!(
        (a.status, a.body["messageId"].as_str()),
        (401, Some("service-account.disabled"))
    );
    call(
        &stub,
        "PATCH",
        &format!("/api/serviceaccounts/{sa}"),
        &headers,
        Some(r#"{"isDisabled":false}"#),
    )
    .await;
    let a = call(
        &stub,
        "DELETE",
        &format!("/api/serviceaccounts/{sa}/tokens/{token_id}"),
        &headers,
        None,
    )
    .await;
    assert_eq!(a.body["message"], "Service account token deleted");
    assert_eq!(
        call(
            &stub,
            "GET",
            "/api/org",
            &[("authorization", &bearer(&token))],
            None
        )
        .await
        .status,
        401
    );
    let a = call(
        &stub,
        "DELETE",
        &format!("/api/serviceaccounts/{sa}"),
        &headers,
        None,
    )
    .await;
    assert_eq!(a.body["message"], "Service account deleted");

    // Users: created by the server admin, changed, disabled, deleted.
    let a = call(
        &stub,
        "POST",
        "/api/admin/users",
        &headers,
        Some(r#"{"login":"bob","email":"bob@x","password":"bob-pw-1"}"#),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let bob = a.body["id"].as_i64().unwrap_or_default();
    let bob_auth = basic("bob", "bob-pw-1");
    let bob_session = stub.login("bob", "bob-pw-1").expect("login");
    let orgs = call(
        &stub,
        "GET",
        "/api/user/orgs",
        &[("authorization", &bob_auth)],
        None,
    )
    .await;
    assert_eq!(orgs.body[0]["role"], "Viewer");
    let a = call(
        &stub,
        "PATCH",
        &format!("/api/org/users/{bob}"),
        &headers,
        Some(r#"{"role":"Editor"}"#),
    )
    .await;
    assert_eq!(a.body["message"], "Organization user updated");
    let orgs = call(
        &stub,
        "GET",
        "/api/user/orgs",
        &[("authorization", &bob_auth)],
        None,
    )
    .await;
    assert_eq!(orgs.body[0]["role"], "Editor");
    let a = call(
        &stub,
        "GET",
        "/api/auth/keys",
        &[("authorization", &bob_auth)],
        None,
    )
    .await;
    assert_eq!(
        (a.status, a.body.to_string()),
        (403, r#"{"message":"Permission denied"}"#.into())
    );
    let a = call(
        &stub,
        "PUT",
        &format!("/api/admin/users/{bob}/permissions"),
        &[("authorization", &bob_auth)],
        Some(r#"{"isGrafanaAdmin":true}"#),
    )
    .await;
    assert_eq!(a.status, 403);
    let a = call(
        &stub,
        "POST",
        &format!("/api/admin/users/{bob}/disable"),
        &headers,
        None,
    )
    .await;
    assert_eq!(a.body["message"], "User disabled");
    assert_eq!(
        call(&stub, "GET", "/api/user", &[("authorization", &bob_auth)], None)
            .await
            .status,
        401
    );
    let cookie = format!("grafana_session={bob_session}");
    assert_eq!(
        call(&stub, "GET", "/api/user", &[("cookie", &cookie)], None)
            .await
            .status,
        401
    );
    call(
        &stub,
        "POST",
        &format!("/api/admin/users/{bob}/enable"),
        &headers,
        None,
    )
    .await;
    let a = call(
        &stub,
        "PUT",
        &format!("/api/admin/users/{bob}/password"),
        &headers,
        Some(r#"{"password":"new-pw-2"}"#),
    )
    .await;
    assert_eq!(a.body["message"], "User password updated");
    assert_eq!(
        call(&stub, "GET", "/api/user", &[("authorization", &bob_auth)], None)
            .await
            .status,
        401
    );
    assert_eq!(
        call(
            &stub,
            "GET",
            "/api/user",
            &[("authorization", &basic("bob", "new-pw-2"))],
            None
        )
        .await
        .status,
        200
    );
    let a = call(
        &stub,
        "DELETE",
        &format!("/api/admin/users/{bob}"),
        &headers,
        None,
    )
    .await;
    assert_eq!(a.body["message"], "User deleted");
    assert_eq!(
        call(
            &stub,
            "GET",
            "/api/user",
            &[("authorization", &basic("bob", "new-pw-2"))],
            None
        )
        .await
        .status,
        401
    );
}

#[tokio::test]
async fn proxy_paths_echo_and_pmm_version_is_open() {
    let stub = GrafanaStub::start(Flavor::Pmm).await;
    let a = call(&stub, "GET", "/v1/version", &[], None).await;
    assert_eq!((a.status, &a.body["version"]), (200, &Value::from("3.1.0")));
    assert_eq!(a.body["server"]["version"], "3.1.0");
    let a = call(
        &stub,
        "GET",
        "/v1/inventory/nodes?x=1",
        &[("x-webauth-user", "viewer1"), ("x-webauth-user", "again")],
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["path"], "/v1/inventory/nodes");
    assert_eq!(a.body["query"], "x=1");
    assert_eq!(
        a.body["headers"]["x-webauth-user"],
        serde_json::json!(["viewer1", "again"])
    );
    let a = call(&stub, "POST", "/__stub/echo/anything", &[], Some("hello")).await;
    assert_eq!(
        (a.body["method"].as_str(), a.body["body"].as_str()),
        (Some("POST"), Some("hello"))
    );
    let a = call(&stub, "GET", "/api/nope", &[], None).await;
    assert_eq!(a.status, 404);
    let a = call(&stub, "GET", "/api/health", &[], None).await;
    assert_eq!((a.status, &a.body["database"]), (200, &Value::from("ok")));
}

#[tokio::test]
async fn auth_proxy_trusts_loopback_headers() {
    let stub = GrafanaStub::start_with(StubOptions {
        flavor: Flavor::Grafana11,
        auth_proxy: true,
        auth_proxy_role_sync: true,
        ..StubOptions::default()
    })
    .await;
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[("x-webauth-user", "carol"), ("x-webauth-role", "Editor")],
        None,
    )
    .await;
    assert_eq!((a.status, &a.body["login"]), (200, &Value::from("carol")));
    let a = call(
        &stub,
        "GET",
        "/api/user/orgs",
        &[("x-webauth-user", "carol")],
        None,
    )
    .await;
    assert_eq!(a.body[0]["role"], "Editor");
}

fn auth_proxy_stub(tweak: impl FnOnce(&mut StubOptions)) -> StubOptions {
    let mut options = StubOptions {
        flavor: Flavor::Grafana11,
        auth_proxy: true,
        ..StubOptions::default()
    };
    tweak(&mut options);
    options
}

/// Grafana's client order (`authnimpl/service.go`): key/token 30, Basic 40,
/// auth proxy 50, session 60; the first success wins, a failure falls
/// through; the first failure is what the caller gets when none succeeds.
#[tokio::test]
async fn auth_proxy_client_order_with_fall_through() {
    let stub = GrafanaStub::start_with(auth_proxy_stub(|_| {})).await;
    stub.add_user("alice", "alice-pw-1", "Viewer", false);
    stub.add_user("bob", "bob-pw-1", "Editor", false);
    let sa = stub.add_service_account("robot", "Editor");
    let (token_id, token) = stub.add_sa_token(sa, "t", None);
    let session = stub.login("bob", "bob-pw-1").expect("login");
    let bob_cookie = format!("grafana_session={session}");
    stub.record_requests(true);

    // A good credential wins over the proxy header, and is hashed.
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[
            ("authorization", &basic("alice", "alice-pw-1")),
            ("x-webauth-user", "bob"),
        ],
        None,
    )
    .await;
    assert_eq!((a.status, &a.body["login"]), (200, &Value::from("alice")));
    assert_eq!(stub.password_hashes(), 1);
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[("authorization", &bearer(&token)), ("x-webauth-user", "bob")],
        None,
    )
    .await;
    assert_eq!((a.status, &a.body["login"]), (200, &Value::from("sa-robot")));
    assert_eq!(stub.key_hashes(), 1);

    // A credential Grafana refuses: the proxy header signs the request in.
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[
            ("authorization", &basic("alice", "wrong")),
            ("x-webauth-user", "bob"),
        ],
        None,
    )
    .await;
    assert_eq!((a.status, &a.body["login"]), (200, &Value::from("bob")));
    assert!(stub.revoke_key(token_id));
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[("authorization", &bearer(&token)), ("x-webauth-user", "bob")],
        None,
    )
    .await;
    assert_eq!((a.status, &a.body["login"]), (200, &Value::from("bob")));

    // The proxy before the session: the cookie's user is not who is signed in,
    // and the session is not the current one.
    let a = call(
        &stub,
        "GET",
        "/api/user/auth-tokens",
        &[("cookie", &bob_cookie), ("x-webauth-user", "alice")],
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, serde_json::json!([]), "alice has no session");
    let a = call(
        &stub,
        "GET",
        "/api/user/auth-tokens",
        &[("cookie", &bob_cookie)],
        None,
    )
    .await;
    assert_eq!(a.body[0]["isActive"], true);
    // Logout authenticated by the proxy revokes nothing.
    let bob = stub.user_by_login("bob").unwrap();
    let a = call(
        &stub,
        "GET",
        "/logout",
        &[("cookie", &bob_cookie), ("x-webauth-user", "bob")],
        None,
    )
    .await;
    assert_eq!(a.status, 302);
    assert_eq!(stub.session_count(bob), 1);
    call(&stub, "GET", "/logout", &[("cookie", &bob_cookie)], None).await;
    assert_eq!(stub.session_count(bob), 0);

    // Every request is authenticated, the echo paths too (a Basic header
    // costs its PBKDF2 wherever it goes).
    let before = stub.password_hashes();
    let a = call(
        &stub,
        "GET",
        "/__stub/echo/x",
        &[("authorization", &basic("alice", "alice-pw-1"))],
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(stub.password_hashes(), before + 1);
    let seen = stub.recorded_requests();
    let last = seen.last().unwrap();
    assert_eq!(last.path, "/__stub/echo/x");
    assert_eq!(
        last.authn,
        Some(grafana_stub::Authn::SignedIn {
            client: grafana_stub::AuthClient::Basic,
            login: "alice".into()
        })
    );
    assert!(seen
        .iter()
        .any(|s| s.has_identity_headers() && s.has_credential("grafana_session")));
    // No sign-up: an unknown proxy user is refused; with a bad password
    // beside it, the first failure (the password's) is what is answered.
    let strict = GrafanaStub::start_with(auth_proxy_stub(|o| o.auth_proxy_auto_sign_up = false)).await;
    let a = call(&strict, "GET", "/api/user", &[("x-webauth-user", "nobody")], None).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.body["messageId"], "user.sync.signup-disabled");
    let a = call(
        &strict,
        "GET",
        "/api/user",
        &[
            ("authorization", &basic("nobody", "x")),
            ("x-webauth-user", "nobody"),
        ],
        None,
    )
    .await;
    assert_eq!(a.status, 401);
    assert_eq!(
        a.body["messageId"], "password-auth.failed",
        "the first failure is reported"
    );
    assert_eq!(strict.user_count(), 1, "only admin");
}

/// `whitelist`: only the gateway's address (loopback) may send the header;
/// from anywhere else it is an error (`auth-proxy.invalid-ip`), and a
/// session cookie beside it still works.
#[tokio::test]
async fn auth_proxy_header_from_outside_the_whitelist() {
    // The machine's own non-loopback address, if it has one.
    let Some(outside) = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.254:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
    else {
        eprintln!("no non-loopback address: whitelist test skipped");
        return;
    };
    let stub = GrafanaStub::start_with(auth_proxy_stub(|o| {
        o.listen = "0.0.0.0:0".parse().unwrap();
    }))
    .await;
    let session = stub.login("admin", "admin").unwrap();
    let get = |headers: Vec<(&'static str, String)>| {
        let addr = std::net::SocketAddr::new(outside, stub.addr().port());
        async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let mut request = Request::builder().uri("/api/user").header("host", "stub");
            for (k, v) in headers {
                request = request.header(k, v);
            }
            let response = sender
                .send_request(request.body(Full::new(Bytes::new())).unwrap())
                .await
                .expect("response");
            let status = response.status().as_u16();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
            )
        }
    };
    let (status, body) = get(vec![("x-webauth-user", "admin".into())]).await;
    assert_eq!(
        (status, &body["messageId"]),
        (401, &Value::from("auth-proxy.invalid-ip"))
    );
    let (status, body) = get(vec![
        ("x-webauth-user", "mallory".into()),
        ("cookie", format!("grafana_session={session}")),
    ])
    .await;
    assert_eq!((status, &body["login"]), (200, &Value::from("admin")));
    assert_eq!(stub.user_by_login("mallory"), None);
}

/// Proxy identities are users: a service account's login is never matched
/// (`notServiceAccountFilter`); signing it up collides: 500.
#[tokio::test]
async fn auth_proxy_identities_are_users_only() {
    let stub = GrafanaStub::start_with(auth_proxy_stub(|_| {})).await;
    stub.add_service_account("robot", "Admin");
    let users = stub.user_count();
    let a = call(&stub, "GET", "/api/user", &[("x-webauth-user", "sa-robot")], None).await;
    assert_eq!(a.status, 500, "{}", a.body);
    assert_eq!(a.body["messageId"], "user.sync.internal");
    assert_eq!(stub.user_count(), users);
    // An unknown login: a new ordinary user, Viewer in the main org.
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[
            ("x-webauth-user", "carol"),
            ("x-webauth-email", "carol@corp.example"),
        ],
        None,
    )
    .await;
    assert_eq!(
        (a.status, &a.body["email"]),
        (200, &Value::from("carol@corp.example"))
    );
    let carol = stub.user_by_login("carol").expect("signed up");
    assert_eq!(stub.user_count(), users + 1);
    assert_eq!(
        stub.user_orgs(carol),
        std::collections::BTreeMap::from([(1, "Viewer".to_owned())])
    );
    // Without role sync a role header changes nothing.
    call(
        &stub,
        "GET",
        "/api/user",
        &[("x-webauth-user", "carol"), ("x-webauth-role", "Admin")],
        None,
    )
    .await;
    assert_eq!(stub.user_orgs(carol)[&1], "Viewer");
}

/// `Role:` mapped: the role goes into org 1 and every other membership goes
/// (`SyncOrgRolesHook`); without a role header nothing is synced.
#[tokio::test]
async fn auth_proxy_role_sync_removes_other_orgs() {
    let stub = GrafanaStub::start_with(auth_proxy_stub(|o| o.auth_proxy_role_sync = true)).await;
    let multi = stub.add_user("multi", "multi-pw-1", "Viewer", false);
    let ops = stub.add_org("Ops");
    stub.add_org_member(ops, multi, "Editor");
    let keeper = stub.add_org("Keep");
    stub.add_org_member(keeper, multi, "Admin");
    let a = call(&stub, "GET", "/api/user", &[("x-webauth-user", "multi")], None).await;
    assert_eq!(a.status, 200);
    assert_eq!(stub.user_orgs(multi).len(), 3, "no role header: no sync");
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[("x-webauth-user", "multi"), ("x-webauth-role", "Editor")],
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        stub.user_orgs(multi),
        std::collections::BTreeMap::from([(1, "Editor".to_owned()), (keeper, "Admin".to_owned())]),
        "removed from Ops; Keep keeps its last admin"
    );
    assert_eq!(stub.user_current_org(multi), Some(1));
    // An invalid role syncs nothing.
    stub.add_org_member(ops, multi, "Viewer");
    call(
        &stub,
        "GET",
        "/api/user",
        &[("x-webauth-user", "multi"), ("x-webauth-role", "admin")],
        None,
    )
    .await;
    assert!(stub.user_orgs(multi).contains_key(&ops));
}

/// `sync_ttl`: the same header values within the TTL skip every sync.
#[tokio::test]
async fn auth_proxy_sync_ttl_cache() {
    let stub = GrafanaStub::start_with(auth_proxy_stub(|o| {
        o.auth_proxy_role_sync = true;
        o.auth_proxy_sync_ttl = Duration::from_secs(60);
    }))
    .await;
    let headers = [("x-webauth-user", "dave"), ("x-webauth-role", "Viewer")];
    assert_eq!(call(&stub, "GET", "/api/user", &headers, None).await.status, 200);
    let dave = stub.user_by_login("dave").unwrap();
    let ops = stub.add_org("Ops");
    stub.add_org_member(ops, dave, "Editor");
    // Cached: the membership added meanwhile stays.
    assert_eq!(call(&stub, "GET", "/api/user", &headers, None).await.status, 200);
    assert!(stub.user_orgs(dave).contains_key(&ops));
    // Past the TTL: synced again, Ops goes.
    stub.advance_clock(Duration::from_secs(61));
    assert_eq!(call(&stub, "GET", "/api/user", &headers, None).await.status, 200);
    assert!(!stub.user_orgs(dave).contains_key(&ops));
    // Another header value is another key: synced at once.
    stub.add_org_member(ops, dave, "Editor");
    let editor = [("x-webauth-user", "dave"), ("x-webauth-role", "Editor")];
    assert_eq!(call(&stub, "GET", "/api/user", &editor, None).await.status, 200);
    assert_eq!(stub.user_orgs(dave).len(), 1);
    assert_eq!(stub.user_orgs(dave)[&1], "Editor");
    // A user deleted meanwhile: the cache entry leads nowhere; signed up anew.
    assert!(stub.delete_user(dave));
    assert_eq!(call(&stub, "GET", "/api/user", &editor, None).await.status, 200);
    assert_ne!(stub.user_by_login("dave"), Some(dave));
    // Disabled: refused, cached or not.
    let dave = stub.user_by_login("dave").unwrap();
    stub.set_user_disabled(dave, true);
    let a = call(&stub, "GET", "/api/user", &editor, None).await;
    assert_eq!(
        (a.status, &a.body["messageId"]),
        (401, &Value::from("identity.disabled"))
    );
}

/// `shared_secret`: without the right `X-WEBAUTH-SECRET` the proxy client
/// does not apply, and the request falls through to the session cookie.
#[tokio::test]
async fn auth_proxy_shared_secret() {
    let stub = GrafanaStub::start_with(auth_proxy_stub(|o| {
        o.auth_proxy_shared_secret = Some("s3cret".into());
    }))
    .await;
    stub.add_user("erin", "erin-pw-1", "Viewer", false);
    let a = call(&stub, "GET", "/api/user", &[("x-webauth-user", "erin")], None).await;
    assert_eq!(a.status, 401);
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[("x-webauth-user", "erin"), ("x-webauth-secret", "wrong")],
        None,
    )
    .await;
    assert_eq!(a.status, 401);
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[("x-webauth-user", "erin"), ("x-webauth-secret", "s3cret")],
        None,
    )
    .await;
    assert_eq!((a.status, &a.body["login"]), (200, &Value::from("erin")));
    let session = stub.login("admin", "admin").unwrap();
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[
            ("x-webauth-user", "erin"),
            ("cookie", &format!("grafana_session={session}")),
        ],
        None,
    )
    .await;
    assert_eq!((a.status, &a.body["login"]), (200, &Value::from("admin")));
}

#[tokio::test]
async fn down_slow_and_stopped() {
    let stub = GrafanaStub::start_with(StubOptions {
        flavor: Flavor::Grafana11,
        session_cookie: Some("my_session".into()),
        ..StubOptions::default()
    })
    .await;
    let session = stub.login("admin", "admin").expect("login");
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[("cookie", &format!("my_session={session}"))],
        None,
    )
    .await;
    assert_eq!(a.status, 200);

    stub.set_unavailable(true);
    assert_eq!(call(&stub, "GET", "/api/health", &[], None).await.status, 503);
    stub.set_unavailable(false);

    stub.set_delay(Some(Duration::from_millis(300)));
    let started = std::time::Instant::now();
    assert_eq!(call(&stub, "GET", "/api/health", &[], None).await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    stub.set_delay(None);

    // An open keep-alive connection is closed too.
    let stream = tokio::net::TcpStream::connect(stub.addr())
        .await
        .expect("connect");
    let (_sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(conn);
    stub.stop().await;
    assert!(
        tokio::net::TcpStream::connect(stub.addr()).await.is_err(),
        "the port refuses"
    );
    let closed = tokio::time::timeout(Duration::from_secs(2), conn).await;
    assert!(closed.is_ok(), "open connections are closed");
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn set_cookie_line<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
}

#[tokio::test]
async fn rotation_interval_and_the_expiry_cookie() {
    let stub = GrafanaStub::start_with(StubOptions {
        flavor: Flavor::Grafana11,
        rotation_interval: Duration::from_secs(30),
        ..StubOptions::default()
    })
    .await;
    let before = unix_now();
    let a = call(
        &stub,
        "POST",
        "/login",
        &[("content-type", "application/json")],
        Some(r#"{"user":"admin","password":"admin"}"#),
    )
    .await;
    let after = unix_now();
    let token = cookie_value(&a.headers, "grafana_session").expect("cookie");
    // NextRotation: rotated_at + interval - 5 s; readable by scripts.
    let expiry: i64 = cookie_value(&a.headers, "grafana_session_expiry")
        .expect("expiry cookie")
        .parse()
        .unwrap();
    assert!((before + 25..=after + 25).contains(&expiry), "{expiry}");
    let line = set_cookie_line(&a.headers, "grafana_session_expiry").unwrap();
    assert!(!line.contains("HttpOnly"), "{line}");
    assert!(
        line.contains("Path=/;") && line.contains("SameSite=Lax"),
        "{line}"
    );
    let line = set_cookie_line(&a.headers, "grafana_session").unwrap();
    assert!(
        line.contains("HttpOnly") && line.contains("Max-Age=2592000"),
        "{line}"
    );

    let cookie = format!("grafana_session={token}");
    let user = |cookie: String| {
        let stub = &stub;
        async move { call(stub, "GET", "/api/user", &[("cookie", &cookie)], None).await }
    };
    assert_eq!(user(cookie.clone()).await.status, 200);
    stub.advance_clock(Duration::from_secs(29));
    assert_eq!(user(cookie.clone()).await.status, 200, "29 s < 30 s");
    stub.advance_clock(Duration::from_secs(2));
    let a = user(cookie.clone()).await;
    assert_eq!(
        (
            a.status,
            a.body["messageId"].as_str(),
            a.body["statusCode"].as_i64()
        ),
        (401, Some("session.token.rotate"), Some(401))
    );
    // Not dead: the cookie is kept, and rotation gives a new one.
    assert_eq!(cookie_value(&a.headers, "grafana_session"), None);
    let r = call(
        &stub,
        "POST",
        "/api/user/auth-tokens/rotate",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let second = cookie_value(&r.headers, "grafana_session").expect("rotated");
    let expiry2: i64 = cookie_value(&r.headers, "grafana_session_expiry")
        .unwrap()
        .parse()
        .unwrap();
    assert!(expiry2 >= expiry + 31, "{expiry} -> {expiry2}");
    let cookie2 = format!("grafana_session={second}");
    assert_eq!(user(cookie2.clone()).await.status, 200);
    // The superseded token, its successor seen: rotate again, not a session.
    let a = user(cookie.clone()).await;
    assert_eq!(a.body["messageId"], "session.token.rotate");
    // A new unseen token must be used within a minute (urgent rotation).
    stub.advance_clock(Duration::from_secs(31));
    let r = call(
        &stub,
        "POST",
        "/api/user/auth-tokens/rotate",
        &[("cookie", &cookie2)],
        None,
    )
    .await;
    let third = cookie_value(&r.headers, "grafana_session").expect("rotated again");
    stub.advance_clock(Duration::from_secs(60));
    let a = user(format!("grafana_session={third}")).await;
    assert_eq!(a.body["messageId"], "session.token.rotate", "unseen for a minute");
    // Logging out with a token that needs rotation revokes nothing.
    let a = call(
        &stub,
        "GET",
        "/logout",
        &[("cookie", &format!("grafana_session={third}"))],
        None,
    )
    .await;
    assert_eq!(a.status, 302);
    let r = call(
        &stub,
        "POST",
        "/api/user/auth-tokens/rotate",
        &[("cookie", &format!("grafana_session={third}"))],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "still rotatable: {}", r.body);
    // Unknown token: 401, cookie kept; no cookie: 401, cookie deleted.
    let r = call(
        &stub,
        "POST",
        "/api/user/auth-tokens/rotate",
        &[("cookie", "grafana_session=0123456789abcdef0123456789abcdef")],
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.body.to_string()),
        (401, r#"{"message":"Unauthorized"}"#.into())
    );
    assert_eq!(cookie_value(&r.headers, "grafana_session"), None);
    let r = call(&stub, "POST", "/api/user/auth-tokens/rotate", &[], None).await;
    assert_eq!(r.status, 401);
    assert_eq!(cookie_value(&r.headers, "grafana_session").as_deref(), Some(""));
}

#[tokio::test]
async fn pmm_grafana_is_served_under_graph_too() {
    let stub = GrafanaStub::start(Flavor::Pmm).await;
    assert_eq!(stub.sub_path(), "/graph");
    let a = call(
        &stub,
        "POST",
        "/graph/login",
        &[("content-type", "application/json")],
        Some(r#"{"user":"admin","password":"admin"}"#),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["redirectUrl"], "/graph/");
    // Grafana's cookie path is its AppSubURL.
    let line = set_cookie_line(&a.headers, "pmm_session").unwrap();
    assert!(line.contains("; Path=/graph;"), "{line}");
    let line = set_cookie_line(&a.headers, "grafana_session_expiry").unwrap();
    assert!(line.contains("; Path=/graph;"), "{line}");
    let first = format!("pmm_session={}", cookie_value(&a.headers, "pmm_session").unwrap());

    stub.reset_counters();
    for path in ["/graph/api/user", "/api/user"] {
        let a = call(&stub, "GET", path, &[("cookie", &first)], None).await;
        assert_eq!(
            (a.status, a.body["login"].as_str()),
            (200, Some("admin")),
            "{path}"
        );
    }
    assert_eq!(
        stub.verifications(),
        1,
        "only the un-prefixed spelling is a verification"
    );
    assert_eq!(stub.calls("/graph/api/user"), 1);
    let admin = basic("admin", "admin");
    let a = call(
        &stub,
        "POST",
        "/graph/api/serviceaccounts",
        &[("authorization", &admin)],
        Some(r#"{"name":"graph-sa","role":"Viewer"}"#),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let a = call(
        &stub,
        "GET",
        "/graph/api/serviceaccounts/search?query=graph",
        &[("authorization", &admin)],
        None,
    )
    .await;
    assert_eq!(a.body["totalCount"], 1);
    assert_eq!(
        call(
            &stub,
            "GET",
            "/graph/api/nope",
            &[("authorization", &admin)],
            None
        )
        .await
        .status,
        404
    );

    // Revoking another session under /graph.
    let other = stub.login("admin", "admin").unwrap();
    let list = call(
        &stub,
        "GET",
        "/graph/api/user/auth-tokens",
        &[("cookie", &first)],
        None,
    )
    .await;
    let inactive = list
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["isActive"] == false)
        .unwrap()["id"]
        .clone();
    let a = call(
        &stub,
        "POST",
        "/graph/api/user/revoke-auth-token",
        &[("cookie", &first)],
        Some(&format!(r#"{{"authTokenId":{inactive}}}"#)),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[("cookie", &format!("pmm_session={other}"))],
        None,
    )
    .await;
    assert_eq!(a.status, 401);

    // Rotation under /graph, by the API and by the page redirect.
    stub.advance_clock(Duration::from_secs(11 * 60));
    let a = call(&stub, "GET", "/graph/api/user", &[("cookie", &first)], None).await;
    assert_eq!(a.body["messageId"], "session.token.rotate");
    let a = call(
        &stub,
        "POST",
        "/graph/api/user/auth-tokens/rotate",
        &[("cookie", &first)],
        None,
    )
    .await;
    let second = format!(
        "pmm_session={}",
        cookie_value(&a.headers, "pmm_session").expect("rotated")
    );
    assert_eq!(
        call(&stub, "GET", "/graph/api/user", &[("cookie", &second)], None)
            .await
            .status,
        200
    );
    stub.advance_clock(Duration::from_secs(11 * 60));
    let a = call(
        &stub,
        "GET",
        "/graph/user/auth-tokens/rotate?redirectTo=%2Fd%2Fabc%3ForgId%3D1",
        &[("cookie", &second)],
        None,
    )
    .await;
    assert_eq!(a.status, 302);
    assert_eq!(a.headers["location"], "/graph/d/abc?orgId=1");
    let third = format!(
        "pmm_session={}",
        cookie_value(&a.headers, "pmm_session").expect("rotated")
    );
    // Not a local path under the sub path: back to the home page.
    stub.advance_clock(Duration::from_secs(11 * 60));
    let _ = call(&stub, "GET", "/graph/api/user", &[("cookie", &third)], None).await;
    let a = call(
        &stub,
        "GET",
        "/graph/user/auth-tokens/rotate?redirectTo=https%3A%2F%2Fevil.example%2F",
        &[("cookie", &third)],
        None,
    )
    .await;
    assert_eq!(a.headers["location"], "/graph/");
    let a = call(
        &stub,
        "GET",
        "/graph/user/auth-tokens/rotate",
        &[("cookie", "pmm_session=bad")],
        None,
    )
    .await;
    assert_eq!(
        (a.status, a.headers["location"].to_str().unwrap()),
        (302, "/graph/login")
    );

    // Logout under /graph: cookies deleted on Grafana's path.
    let fourth = format!("pmm_session={}", stub.login("admin", "admin").unwrap());
    let a = call(&stub, "GET", "/graph/logout", &[("cookie", &fourth)], None).await;
    assert_eq!(
        (a.status, a.headers["location"].to_str().unwrap()),
        (302, "/graph/login")
    );
    let line = set_cookie_line(&a.headers, "pmm_session").unwrap();
    assert!(
        line.contains("Path=/graph;") && line.contains("Max-Age=0"),
        "{line}"
    );
    assert_eq!(
        call(&stub, "GET", "/api/user", &[("cookie", &fourth)], None)
            .await
            .status,
        401
    );

    // Not Grafana's: echoes, as before.
    for path in [
        "/graph/public/build/app.js",
        "/graphite/api/user",
        "/v1/inventory/nodes",
    ] {
        let a = call(&stub, "GET", path, &[], None).await;
        assert_eq!((a.status, a.body["path"].as_str()), (200, Some(path)));
    }
    assert_eq!(
        call(&stub, "GET", "/graph/v1/version", &[], None).await.body["path"],
        "/graph/v1/version"
    );
}

#[tokio::test]
async fn vanilla_grafana_has_no_sub_path_unless_configured() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let a = call(
        &stub,
        "GET",
        "/graph/api/user",
        &[("authorization", &basic("admin", "admin"))],
        None,
    )
    .await;
    assert_eq!(a.body["path"], "/graph/api/user", "echoed");
    let stub = GrafanaStub::start_with(StubOptions {
        flavor: Flavor::Grafana11,
        sub_path: Some("/grafana/".into()),
        ..StubOptions::default()
    })
    .await;
    assert_eq!(stub.sub_path(), "/grafana");
    let a = call(
        &stub,
        "GET",
        "/grafana/api/user",
        &[("authorization", &basic("admin", "admin"))],
        None,
    )
    .await;
    assert_eq!(a.body["login"], "admin");
    let stub = GrafanaStub::start_with(StubOptions {
        flavor: Flavor::Pmm,
        sub_path: Some(String::new()),
        ..StubOptions::default()
    })
    .await;
    let a = call(
        &stub,
        "POST",
        "/login",
        &[("content-type", "application/json")],
        Some(r#"{"user":"admin","password":"admin"}"#),
    )
    .await;
    assert_eq!(a.body["redirectUrl"], "/");
    assert!(set_cookie_line(&a.headers, "pmm_session")
        .unwrap()
        .contains("Path=/;"));
}

#[tokio::test]
async fn organisations_memberships_and_org_selection() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let ops = stub.add_org("Ops");
    let secret = stub.add_org("Secret");
    let multi = stub.add_user("multi", "multi-pw", "Viewer", false);
    stub.add_org_member(ops, multi, "Admin");
    let auth = basic("multi", "multi-pw");
    let with = |org: i64| (String::from("x-grafana-org-id"), org.to_string());

    let a = call(&stub, "GET", "/api/user", &[("authorization", &auth)], None).await;
    assert_eq!(a.body["orgId"], 1, "the current org");
    let a = call(&stub, "GET", "/api/user/orgs", &[("authorization", &auth)], None).await;
    assert_eq!(
        a.body,
        serde_json::json!([
            {"orgId": 1, "name": "Main Org.", "role": "Viewer"},
            {"orgId": ops, "name": "Ops", "role": "Admin"},
        ])
    );

    // X-Grafana-Org-Id (or ?targetOrgId) runs the request in that org.
    let (h, v) = with(ops);
    let a = call(
        &stub,
        "GET",
        "/api/org",
        &[("authorization", &auth), (&h, &v)],
        None,
    )
    .await;
    assert_eq!(a.body.to_string(), format!(r#"{{"id":{ops},"name":"Ops"}}"#));
    let a = call(
        &stub,
        "GET",
        &format!("/api/org?targetOrgId={ops}"),
        &[("authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(a.body["id"], ops);
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[("authorization", &auth), (&h, &v)],
        None,
    )
    .await;
    assert_eq!(a.body["orgId"], 1, "/api/user reports the user row's current org");
    // The role is the one in that org.
    let search = "/api/serviceaccounts/search";
    let a = call(&stub, "GET", search, &[("authorization", &auth), (&h, &v)], None).await;
    assert_eq!(a.status, 200, "Admin in Ops: {}", a.body);
    let a = call(&stub, "GET", search, &[("authorization", &auth)], None).await;
    assert_eq!(
        (a.status, a.body["message"].as_str()),
        (403, Some("Permission denied"))
    );

    // Not a member: still signed in, but no permission in that org.
    let (h3, v3) = with(secret);
    let a = call(
        &stub,
        "GET",
        "/api/org",
        &[("authorization", &auth), (&h3, &v3)],
        None,
    )
    .await;
    assert_eq!((a.status, a.body["title"].as_str()), (403, Some("Access denied")));
    assert_eq!(
        a.body["message"],
        "You'll need additional permissions to perform this action. Permissions needed: orgs:read"
    );
    assert!(a.body["accessErrorId"].as_str().unwrap().starts_with("ACE"));
    let a = call(
        &stub,
        "GET",
        "/api/user",
        &[("authorization", &auth), (&h3, &v3)],
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    let a = call(
        &stub,
        "GET",
        search,
        &[("authorization", &auth), (&h3, &v3)],
        None,
    )
    .await;
    assert_eq!(a.status, 403);
    // A session selects orgs the same way.
    let session = format!("grafana_session={}", stub.login("multi", "multi-pw").unwrap());
    let a = call(&stub, "GET", "/api/org", &[("cookie", &session), (&h, &v)], None).await;
    assert_eq!(a.body["id"], ops);
    let a = call(
        &stub,
        "GET",
        "/api/org",
        &[("cookie", &session), (&h3, &v3)],
        None,
    )
    .await;
    assert_eq!(a.status, 403);
    // Something that is not a number is no org at all.
    let a = call(
        &stub,
        "GET",
        "/api/org",
        &[("cookie", &session), ("x-grafana-org-id", "ops")],
        None,
    )
    .await;
    assert_eq!(a.body["id"], 1);

    // Switching the current org: members only.
    let a = call(
        &stub,
        "POST",
        &format!("/api/user/using/{ops}"),
        &[("cookie", &session)],
        None,
    )
    .await;
    assert_eq!(
        (a.status, a.body["message"].as_str()),
        (200, Some("Active organization changed"))
    );
    let a = call(&stub, "GET", "/api/user", &[("cookie", &session)], None).await;
    assert_eq!(a.body["orgId"], ops);
    let a = call(&stub, "GET", "/api/org", &[("cookie", &session)], None).await;
    assert_eq!(a.body["id"], ops);
    let a = call(
        &stub,
        "POST",
        &format!("/api/user/using/{secret}"),
        &[("cookie", &session)],
        None,
    )
    .await;
    assert_eq!(
        (a.status, a.body["message"].as_str()),
        (401, Some("Not a valid organization"))
    );

    // Tokens and keys belong to one org: another one is refused.
    let sa = stub.add_service_account("main-sa", "Viewer");
    let (_, token) = stub.add_sa_token(sa, "t", None);
    let (_, key) = stub.add_api_key("main-key", "Viewer", None);
    for credential in [&token, &key] {
        let bearer = bearer(credential);
        let a = call(
            &stub,
            "GET",
            "/api/org",
            &[("authorization", &bearer), (&h, &v)],
            None,
        )
        .await;
        assert_eq!(
            (a.status, a.body["messageId"].as_str(), a.body["message"].as_str()),
            (
                401,
                Some("api-key.organization-mismatch"),
                Some("API key does not belong to the requested organization")
            )
        );
        let (h1, v1) = with(1);
        let a = call(
            &stub,
            "GET",
            "/api/org",
            &[("authorization", &bearer), (&h1, &v1)],
            None,
        )
        .await;
        assert_eq!(a.body["id"], 1);
    }
    let ops_sa = stub.add_service_account_in(ops, "ops-sa", "Editor");
    let (_, ops_token) = stub.add_sa_token(ops_sa, "t", None);
    let a = call(
        &stub,
        "GET",
        "/api/org",
        &[("authorization", &bearer(&ops_token))],
        None,
    )
    .await;
    assert_eq!(a.body["id"], ops, "a token's own org when none is asked for");
    let (h1, v1) = with(1);
    let a = call(
        &stub,
        "GET",
        "/api/org",
        &[("authorization", &bearer(&ops_token)), (&h1, &v1)],
        None,
    )
    .await;
    assert_eq!(a.body["messageId"], "api-key.organization-mismatch");
    // Service accounts are listed in their org only.
    let admin = basic("admin", "admin");
    let a = call(&stub, "GET", search, &[("authorization", &admin)], None).await;
    assert_eq!(a.body["totalCount"], 1);
    let a = call(
        &stub,
        "GET",
        &format!("/api/serviceaccounts/{ops_sa}"),
        &[("authorization", &admin)],
        None,
    )
    .await;
    assert_eq!(a.status, 404);

    // Removed from one org: still a user; from the last one: deleted.
    let a = call(
        &stub,
        "DELETE",
        &format!("/api/org/users/{multi}"),
        &[("authorization", &admin)],
        None,
    )
    .await;
    assert_eq!(a.body["message"], "User removed from organization");
    let a = call(&stub, "GET", "/api/user/orgs", &[("cookie", &session)], None).await;
    assert_eq!(a.body.as_array().map(Vec::len), Some(1));
    stub.add_org_member(ops, 1, "Admin");
    let (h, v) = with(ops);
    let a = call(
        &stub,
        "DELETE",
        &format!("/api/org/users/{multi}"),
        &[("authorization", &admin), (&h, &v)],
        None,
    )
    .await;
    assert_eq!(a.body["message"], "User deleted", "{}", a.body);
    assert_eq!(
        call(&stub, "GET", "/api/user", &[("cookie", &session)], None)
            .await
            .status,
        401
    );
}

async fn raw_text(stub: &GrafanaStub, path: &str, cookie: Option<&str>) -> (u16, HeaderMap, String) {
    let stream = tokio::net::TcpStream::connect(stub.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut request = Request::builder().method("GET").uri(path).header("host", "stub");
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn login_form_app_page_and_page_redirects() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let (status, headers, _) = raw_text(&stub, "/d/abc/my-dash?orgId=1", None).await;
    assert_eq!(status, 302);
    assert_eq!(
        headers["location"],
        "/login?redirectTo=%2Fd%2Fabc%2Fmy-dash%3ForgId%3D1"
    );
    let (status, headers, _) = raw_text(&stub, "/", None).await;
    assert_eq!((status, headers["location"].to_str().unwrap()), (302, "/login"));
    let (status, headers, body) = raw_text(&stub, "/login?redirectTo=%2Fd%2Fabc", None).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(body.contains(r#"id="login-form""#) && body.contains(r#"const APP_SUB_URL = "";"#));

    let session = stub.login("admin", "admin").unwrap();
    let cookie = format!("grafana_session={session}");
    let (status, _, body) = raw_text(&stub, "/d/abc?orgId=1", Some(&cookie)).await;
    assert_eq!(status, 200);
    assert!(body.contains("window.__stub") && body.contains("const ORG_ID = 1;"));
    // Signed in: the login page sends the browser on.
    let (status, headers, _) = raw_text(&stub, "/login?redirectTo=%2Fd%2Fabc", Some(&cookie)).await;
    assert_eq!((status, headers["location"].to_str().unwrap()), (302, "/d/abc"));

    // A page load with a session due for rotation rotates on the server.
    stub.advance_clock(Duration::from_secs(11 * 60));
    let (status, headers, _) = raw_text(&stub, "/d/abc?orgId=1", Some(&cookie)).await;
    assert_eq!(status, 302);
    let location = headers["location"].to_str().unwrap().to_owned();
    assert_eq!(
        location,
        "/user/auth-tokens/rotate?redirectTo=%2Fd%2Fabc%3ForgId%3D1"
    );
    let (status, headers, _) = raw_text(&stub, &location, Some(&cookie)).await;
    assert_eq!(
        (status, headers["location"].to_str().unwrap()),
        (302, "/d/abc?orgId=1")
    );
    let rotated = cookie_value(&headers, "grafana_session").expect("new cookie");
    let (status, _, _) = raw_text(
        &stub,
        "/d/abc?orgId=1",
        Some(&format!("grafana_session={rotated}")),
    )
    .await;
    assert_eq!(status, 200);
    // An unknown session: to the login page, cookie deleted.
    let (status, headers, _) = raw_text(&stub, "/d/x", Some("grafana_session=nope")).await;
    assert_eq!(
        (status, headers["location"].to_str().unwrap()),
        (302, "/login?redirectTo=%2Fd%2Fx")
    );
    assert_eq!(cookie_value(&headers, "grafana_session").as_deref(), Some(""));
    // Other paths still echo.
    let a = call(&stub, "GET", "/__stub/echo/x", &[], None).await;
    assert_eq!(a.body["path"], "/__stub/echo/x");
}

#[tokio::test]
async fn pmm_pages_live_under_graph() {
    let stub = GrafanaStub::start(Flavor::Pmm).await;
    let (status, headers, _) = raw_text(&stub, "/graph/d/abc?orgId=1", None).await;
    assert_eq!(status, 302);
    assert_eq!(
        headers["location"],
        "/graph/login?redirectTo=%2Fd%2Fabc%3ForgId%3D1"
    );
    let (status, _, body) = raw_text(&stub, "/graph/login?redirectTo=%2Fd%2Fabc", None).await;
    assert_eq!(status, 200);
    assert!(body.contains(r#"const APP_SUB_URL = "/graph";"#));
    let cookie = format!("pmm_session={}", stub.login("admin", "admin").unwrap());
    for path in ["/graph/", "/graph", "/graph/d/abc"] {
        let (status, _, body) = raw_text(&stub, path, Some(&cookie)).await;
        assert_eq!(status, 200, "{path}");
        assert!(body.contains("window.__stub"), "{path}");
    }
    // Un-prefixed, they are not Grafana's pages in PMM.
    let a = call(&stub, "GET", "/d/abc", &[("cookie", &cookie)], None).await;
    assert_eq!(a.body["path"], "/d/abc");
}

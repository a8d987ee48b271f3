//! The audit trail: one line per refused authentication and per revoking
//! call, sharing the request id with the access log and the upstream — and
//! not one secret in any line the gateway writes.

use std::time::Duration;

use grafana_stub::{Flavor, GrafanaStub};
use portcullis::config::Profile;
use serde_json::Value;

use crate::support::{self, binary, client};

#[tokio::test]
async fn refusals_and_revocations_are_audited_and_no_log_line_holds_a_secret() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let user_password = "audit-pw-Secret-1";
    let wrong_password = "audit-WRONG-pw-2";
    stub.add_user("auditee", user_password, "Viewer", false);
    let sa = stub.add_service_account("audited", "Viewer");
    let (token_id, token) = stub.add_sa_token(sa, "t", None);
    let (_, key) = stub.add_api_key("audited-key", "Viewer", None);
    let session = stub.login("auditee", user_password).expect("login");
    let unknown_token = grafana_stub::credentials::SaToken::generate().encode();

    let (mut config, dir) = support::config(&stub.url());
    config.auth.profile = Profile::Grafana;
    config.log.access_log = true;
    config.cache.negative_ttl = Duration::from_millis(10);
    let mut gw = binary::spawn(config, dir).await;
    let http = client();
    let get = |path: &str| http.get(format!("{}{path}", gw.url));

    assert_eq!(
        get("/api/org")
            .basic_auth("auditee", Some(user_password))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        get("/api/org")
            .basic_auth("auditee", Some(wrong_password))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        get("/api/org").bearer_auth(&token).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        get("/api/org")
            .bearer_auth(&unknown_token)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        get("/api/org").bearer_auth(&key).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        get("/api/org")
            .header("Cookie", format!("grafana_session={session}"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let login = http
        .post(format!("{}/login", gw.url))
        .json(&serde_json::json!({"user": "auditee", "password": wrong_password}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 401);
    // A trickle past the login's budget.
    for i in 0..6 {
        let _ = get("/api/org")
            .basic_auth("auditee", Some(&format!("{wrong_password}-{i}")))
            .send()
            .await
            .unwrap();
    }
    // A revoking call, and a query string that carries a secret.
    let revoked = http
        .delete(format!("{}/api/serviceaccounts/{sa}/tokens/{token_id}", gw.url))
        .basic_auth("admin", Some("admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let _ = get(&format!("/api/search?api_key={key}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    // A trusted proxy's request id is not taken from a stranger.
    let echo: Value = get("/__stub/echo/id")
        .basic_auth("auditee", Some(user_password))
        .header("X-Request-Id", "forged-by-client")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let upstream_id = echo["headers"]["x-request-id"][0].as_str().unwrap().to_owned();
    assert_ne!(upstream_id, "forged-by-client");

    // Let the last lines reach the log, then stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal(libc::SIGTERM);
    gw.wait(Duration::from_secs(30)).await;
    let logs = gw.logs();

    let secrets = [
        user_password,
        wrong_password,
        token.as_str(),
        unknown_token.as_str(),
        key.as_str(),
        session.as_str(),
        "admin:admin",
        // base64 of the Basic credentials, as they travel.
        &base64_basic("auditee", user_password),
        &base64_basic("admin", "admin"),
    ];
    for line in logs.lines() {
        for secret in &secrets {
            assert!(!line.contains(secret), "a secret in the log: {line}");
        }
    }

    let events: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let audit = |event: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["target"] == "audit" && e["event"] == event)
            .collect()
    };
    let refused = audit("auth_refused");
    let reasons: Vec<&str> = refused.iter().filter_map(|e| e["reason"].as_str()).collect();
    assert!(reasons.contains(&"bad_credential"), "{reasons:?}");
    assert!(reasons.contains(&"login_budget_used_up"), "{reasons:?}");
    let password_refusal = refused
        .iter()
        .find(|e| e["credential"] == "password" && e["reason"] == "bad_credential")
        .expect("a refused password");
    assert_eq!(password_refusal["login"], "auditee");
    assert_eq!(password_refusal["client"], "127.0.0.1");
    assert_eq!(password_refusal["route"], "/");
    let token_refusal = refused
        .iter()
        .find(|e| e["credential"] == "service_token")
        .expect("a refused token");
    assert!(token_refusal.get("login").is_none_or(Value::is_null));
    let revocations = audit("revocation");
    assert_eq!(revocations.len(), 1, "{revocations:?}");
    assert_eq!(revocations[0]["caller"], "admin");
    assert_eq!(revocations[0]["status"], 200);
    // The same id in the access log, the audit line and upstream.
    let id = revocations[0]["request_id"].as_str().unwrap();
    assert!(events
        .iter()
        .any(|e| e["target"] == "access" && e["request_id"] == id && e["method"] == "DELETE"));
    assert!(events
        .iter()
        .any(|e| e["target"] == "access" && e["request_id"] == upstream_id));
}

fn base64_basic(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

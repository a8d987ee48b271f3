//! Requests no honest client sends: every refusal is JSON, nothing ambiguous
//! reaches Grafana, and no client keeps a connection open by pinging it.

use std::time::{Duration, Instant};

use grafana_stub::{Flavor, GrafanaStub};
use portcullis::config::Profile;
use reqwest::StatusCode;

use crate::support::{self, client, raw, Gateway};

async fn start(stub: &GrafanaStub) -> Gateway {
    let (mut config, dir) = support::config(&stub.url());
    config.auth.profile = Profile::Grafana;
    config.server.idle_timeout = Duration::from_secs(1);
    support::start(config, dir).await
}

async fn json(response: reqwest::Response) -> (StatusCode, serde_json::Value) {
    let status = response.status();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text:?}"));
    (status, body)
}

#[tokio::test]
async fn a_huge_authorization_header_gets_431_in_json() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let gw = start(&stub).await;
    let huge = format!("Bearer {}", "a".repeat(64 * 1024));
    let (status, body) = json(
        client()
            .get(format!("{}/api/org", gw.url))
            .header("Authorization", huge)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(body["message"], "Request header fields too large");
}

#[tokio::test]
async fn trace_is_refused_not_forwarded_with_credentials() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let gw = start(&stub).await;
    let before = stub.calls("/");
    let (status, body) = json(
        client()
            .request(reqwest::Method::TRACE, format!("{}/api/org", gw.url))
            .basic_auth("admin", Some("admin"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    assert_eq!(stub.calls("/"), before, "nothing reached Grafana");
}

#[tokio::test]
async fn an_ambiguous_session_cookie_is_a_bad_request() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    stub.add_user("cookie-user", "cookie-pw-1", "Viewer", false);
    let good = stub.login("cookie-user", "cookie-pw-1").expect("login");
    let gw = start(&stub).await;
    let get = |cookie: String| {
        client()
            .get(format!("{}/api/user", gw.url))
            .header("Cookie", cookie)
            .send()
    };
    assert_eq!(
        get(format!("grafana_session={good}")).await.unwrap().status(),
        200
    );
    // Two session cookies: the gateway could check one and Grafana act on
    // the other.
    for cookie in [
        format!("grafana_session={good}; grafana_session=0123456789abcdef0123456789abcdef"),
        format!("grafana_session=0123456789abcdef0123456789abcdef; grafana_session={good}"),
        format!("grafana_session={good}; grafana_session ={good}"),
    ] {
        let (status, body) = json(get(cookie).await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
    // An escaped token: Grafana unescapes it into the same session, which
    // the gateway would cache (and log out) under another key.
    let escaped = format!("grafana_session=%{:02x}{}", good.as_bytes()[0], &good[1..]);
    let (status, body) = json(get(escaped).await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // The name inside another cookie's quoted value is no session cookie
    // (Go's net/http skips it too): no credential, so 401.
    let (status, _) = json(get(format!("x=\"a; grafana_session={good}\"")).await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_http2_connection_kept_alive_by_pings_is_closed_when_idle() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let gw = start(&stub).await;
    let tls = raw::tls_connect(gw.running().addr, &[b"h2"]).await;
    let (mut sender, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
    let mut connection = Box::pin(connection);
    let mut ping_pong = connection.ping_pong().expect("ping_pong");
    let request = http::Request::get(format!("{}/api/health", gw.url))
        .body(())
        .unwrap();
    let (response, _) = sender.send_request(request, true).unwrap();
    let driven = tokio::select! {
        r = response => r,
        _ = connection.as_mut() => panic!("connection ended before the answer"),
    };
    assert_eq!(driven.expect("answer").status(), 200);
    // The sender stays alive (a dropped one would close the connection from
    // our side). Now only PINGs, every 200 ms, for up to 8 s.
    let started = Instant::now();
    let closed = loop {
        if started.elapsed() > Duration::from_secs(8) {
            break false;
        }
        tokio::select! {
            _ = connection.as_mut() => break true,
            pong = ping_pong.ping(h2::Ping::opaque()) => {
                if pong.is_err() {
                    break true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(
        closed,
        "server.idle_timeout (1 s) passed: PINGs must not keep it open"
    );
    println!("closed after {:?} of PINGs", started.elapsed());
}

#[tokio::test]
async fn a_malformed_chunked_body_from_the_client_is_its_own_fault() {
    let stub = GrafanaStub::start(Flavor::Grafana11).await;
    let gw = start(&stub).await;
    // Warm the credential, so that the body is what fails.
    assert_eq!(
        client()
            .get(format!("{}/api/org", gw.url))
            .basic_auth("admin", Some("admin"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let request = "POST /api/dashboards/db HTTP/1.1\r\n\
                   Host: localhost\r\n\
                   Authorization: Basic YWRtaW46YWRtaW4=\r\n\
                   Content-Type: application/json\r\n\
                   Transfer-Encoding: chunked\r\n\
                   Connection: close\r\n\r\n\
                   4\r\n{\"a\"\r\nzz-not-hex\r\n0\r\n\r\n";
    let response = raw::exchange(gw.running().addr, request).await;
    assert_eq!(
        response.status,
        400,
        "{:?}",
        String::from_utf8_lossy(&response.body)
    );
    assert!(response.json()["message"]
        .as_str()
        .unwrap()
        .contains("request body"));
}

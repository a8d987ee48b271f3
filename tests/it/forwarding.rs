//! Forwarding a request upstream: methods, bodies and statuses through,
//! header hygiene (hop-by-hop headers, `X-Forwarded-*` from untrusted and
//! trusted peers) and WebSockets. Authentication is out of the way
//! (`support::plain::passthrough`).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::plain::{json_body, passthrough, seen};
use crate::support::upstream::{self, pattern};
use crate::support::{self, raw};

#[tokio::test]
async fn get_and_post_pass_through_with_headers_and_status() {
    let up = upstream::start().await;
    let (config, dir) = passthrough(&up.url);
    let gw = support::start(config, dir).await;
    let client = support::client();

    let response = client
        .get(format!("{}/echo/some/path?a=1&b=two%20words", gw.url))
        .header("X-Custom", "v1")
        .header("X-Multi", "first")
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-upstream"], "portcullis-test");
    assert_eq!(response.headers()["content-type"], "application/json");
    let echo = json_body(response).await;
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/echo/some/path");
    assert_eq!(echo["query"], "a=1&b=two%20words");
    assert_eq!(
        echo["version"], "HTTP/1.1",
        "the gateway speaks HTTP/1.1 upstream"
    );
    assert_eq!(seen(&echo, "x-custom"), ["v1"]);
    assert_eq!(seen(&echo, "accept"), ["application/json"]);

    // Repeated header lines stay separate and in order.
    let echo = raw::exchange(
        gw.running().addr,
        "GET /echo HTTP/1.1\r\nHost: localhost\r\nX-Multi: first\r\nX-Multi: second\r\nConnection: close\r\n\r\n",
    )
    .await
    .json();
    assert_eq!(seen(&echo, "x-multi"), ["first", "second"]);

    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let body = format!("{{\"hello\":\"{method}\"}}");
        let response = client
            .request(method.parse().unwrap(), format!("{}/api/things/7", gw.url))
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{method}");
        let echo = json_body(response).await;
        assert_eq!(echo["method"], method);
        assert_eq!(echo["path"], "/api/things/7");
        assert_eq!(echo["body"], body);
        assert_eq!(seen(&echo, "content-type"), ["application/json"]);
        assert_eq!(seen(&echo, "content-length"), [body.len().to_string()]);
    }

    for status in [201u16, 202, 204, 301, 304, 400, 404, 418, 429, 500, 502, 503] {
        for method in ["GET", "POST"] {
            let response = client
                .request(method.parse().unwrap(), format!("{}/status/{status}", gw.url))
                .body(if method == "POST" { "x=1" } else { "" })
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), status, "{method} /status/{status}");
            assert_eq!(
                response.headers()["x-upstream"],
                "portcullis-test",
                "{method} /status/{status}"
            );
            let text = response.text().await.unwrap();
            if status == 204 || status == 304 {
                assert!(text.is_empty(), "{status}: {text}");
            } else {
                let body: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert_eq!(
                    body["status"], status,
                    "the upstream's own body, not the gateway's"
                );
            }
        }
    }
}

async fn next<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .expect("message in time")
        .expect("stream open")
        .expect("message")
}

#[tokio::test]
async fn websocket_echo_through_the_gateway() {
    let up = upstream::start().await;
    let (config, dir) = passthrough(&up.url);
    let gw = support::start(config, dir).await;
    let addr = gw.running().addr;

    let tls = raw::tls_connect(addr, &[b"http/1.1"]).await;
    let url = format!("wss://localhost:{}/api/live/ws", addr.port());
    let (mut ws, response) =
        tokio::time::timeout(Duration::from_secs(30), tokio_tungstenite::client_async(url, tls))
            .await
            .expect("handshake in time")
            .expect("WebSocket handshake through the gateway");
    assert_eq!(response.status(), 101);

    let hello: serde_json::Value = match next(&mut ws).await {
        Message::Text(text) => serde_json::from_str(&text).unwrap(),
        other => panic!("expected the upstream's hello, got {other:?}"),
    };
    assert_eq!(hello["hello"], "/api/live/ws");
    let headers = &hello["headers"];
    assert_eq!(headers["upgrade"][0], "websocket");
    assert!(headers["connection"][0]
        .as_str()
        .unwrap()
        .eq_ignore_ascii_case("upgrade"));
    assert!(headers["sec-websocket-key"][0].is_string());
    assert_eq!(headers["x-forwarded-for"][0], "127.0.0.1");

    for i in 0..20 {
        let text = format!("ping {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(next(&mut ws).await, Message::text(text));
    }
    let big: Vec<u8> = pattern::chunk(pattern::CHUNK).to_vec();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(big));
    ws.close(None).await.unwrap();
    // The close handshake completes through the gateway.
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn hop_by_hop_headers_do_not_cross() {
    let up = upstream::start().await;
    let (config, dir) = passthrough(&up.url);
    let gw = support::start(config, dir).await;
    let addr = gw.running().addr;

    let response = raw::exchange(
        addr,
        "GET /echo HTTP/1.1\r\n\
         Host: localhost\r\n\
         Connection: close, X-Hop-A, x-hop-b\r\n\
         X-Hop-A: 1\r\n\
         X-Hop-B: 2\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         Trailer: X-Checksum\r\n\
         Proxy-Connection: keep-alive\r\n\
         Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
         Upgrade: h2c\r\n\
         X-Kept: yes\r\n\
         \r\n",
    )
    .await;
    assert_eq!(response.status, 200);
    let echo = response.json();
    for gone in [
        "connection",
        "x-hop-a",
        "x-hop-b",
        "keep-alive",
        "te",
        "trailer",
        "proxy-connection",
        "proxy-authorization",
        "upgrade",
    ] {
        assert!(
            seen(&echo, gone).is_empty(),
            "{gone} reached the upstream: {echo}"
        );
    }
    assert_eq!(seen(&echo, "x-kept"), ["yes"]);

    // A chunked request body is re-framed, not forwarded as a header.
    let response = raw::exchange(
        addr,
        "POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let echo = response.json();
    assert_eq!(echo["body"], "hello world");

    // And the other way: the upstream's hop-by-hop response headers stop here.
    let response = raw::exchange(
        addr,
        "GET /hop-response HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-resp-kept"), Some("1"));
    assert_eq!(response.header("x-upstream"), Some("portcullis-test"));
    for gone in ["x-resp-hop", "keep-alive", "proxy-authenticate"] {
        assert_eq!(
            response.header(gone),
            None,
            "{gone} reached the client: {response:?}"
        );
    }
    assert_ne!(response.header("connection"), Some("x-resp-hop"));
}

const SPOOFED: &str = "X-Forwarded-For: 6.6.6.6\r\n\
     X-Forwarded-For: 7.7.7.7\r\n\
     X-Forwarded-Proto: http\r\n\
     X-Forwarded-Host: evil.example\r\n\
     X_Forwarded_For: 8.8.8.8\r\n\
     Forwarded: for=6.6.6.6;proto=http\r\n\
     X-Real-IP: 6.6.6.6\r\n";

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_peer_are_replaced() {
    let up = upstream::start().await;
    let (config, dir) = passthrough(&up.url);
    assert!(config.server.trusted_proxies.is_empty());
    let gw = support::start(config, dir).await;

    let request =
        format!("GET /echo HTTP/1.1\r\nHost: gw.example:8443\r\n{SPOOFED}Connection: close\r\n\r\n");
    let echo = raw::exchange(gw.running().addr, &request).await.json();
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"], "{echo}");
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["https"]);
    assert_eq!(seen(&echo, "x-forwarded-host"), ["gw.example:8443"]);
    for gone in ["x_forwarded_for", "forwarded", "x-real-ip"] {
        assert!(
            seen(&echo, gone).is_empty(),
            "{gone} reached the upstream: {echo}"
        );
    }
    assert_eq!(seen(&echo, "host"), ["gw.example:8443"]);

    // Without any spoofing the same three headers are set.
    let echo = json_body(
        support::client()
            .get(format!("{}/echo", gw.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["https"]);
    assert_eq!(
        seen(&echo, "x-forwarded-host"),
        [format!("127.0.0.1:{}", gw.running().addr.port())]
    );
}

#[tokio::test]
async fn forwarded_headers_from_a_trusted_proxy_are_kept_and_extended() {
    let up = upstream::start().await;
    let (mut config, dir) = passthrough(&up.url);
    config.server.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    let gw = support::start(config, dir).await;

    let request = format!("GET /echo HTTP/1.1\r\nHost: gw.example\r\n{SPOOFED}Connection: close\r\n\r\n");
    let echo = raw::exchange(gw.running().addr, &request).await.json();
    // Every hop the proxy reported, in order, then the proxy itself.
    assert_eq!(
        seen(&echo, "x-forwarded-for"),
        ["6.6.6.6, 7.7.7.7, 127.0.0.1"],
        "{echo}"
    );
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["http"]);
    assert_eq!(seen(&echo, "x-forwarded-host"), ["evil.example"]);
    assert_eq!(seen(&echo, "forwarded"), ["for=6.6.6.6;proto=http"]);
    assert_eq!(seen(&echo, "x-real-ip"), ["6.6.6.6"]);

    // A trusted proxy that sends none gets them set like anyone else.
    let request = "GET /echo HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n";
    let echo = raw::exchange(gw.running().addr, request).await.json();
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen(&echo, "x-forwarded-proto"), ["https"]);
    assert_eq!(seen(&echo, "x-forwarded-host"), ["gw.example"]);
}

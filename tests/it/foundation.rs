//! The gateway as a plain TLS reverse proxy, with authentication out of the
//! way (profile "custom", one anonymous route `/`): forwarding, streaming,
//! HTTP/2, WebSockets, header hygiene, certificates, time-outs, probes,
//! signals and the command line.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use portcullis::auth::Role;
use portcullis::config::{Config, Profile, RouteConfig};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::upstream::{self, pattern};
use crate::support::{self, binary, raw, scripted};

/// A config whose single rule lets every request through without a credential.
fn passthrough(upstream_url: &str) -> (Config, tempfile::TempDir) {
    let (mut config, dir) = support::config(upstream_url);
    config.auth.profile = Profile::Custom;
    config.routes = vec![RouteConfig {
        prefix: "/".into(),
        method: None,
        host: None,
        min_role: Role::None,
        upstream: None,
        rewrite: None,
        forward_credentials: true,
        inject_identity: true,
        grafana: None,
    }];
    (config, dir)
}

fn long_client(http1_only: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(900));
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().expect("client")
}

/// The values the upstream saw for one header (empty when absent).
fn seen(echo: &serde_json::Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_array()
        .map(|values| {
            values
                .iter()
                .map(|v| v.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// An address on which nothing listens.
async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

async fn json_body(response: reqwest::Response) -> serde_json::Value {
    let text = response.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

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

#[tokio::test]
async fn http2_from_the_client() {
    let up = upstream::start().await;
    let (config, dir) = passthrough(&up.url);
    let gw = support::start(config, dir).await;

    // ALPN picks h2 for a client that offers it.
    let response = support::client()
        .get(format!("{}/echo", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let tls = raw::tls_connect(gw.running().addr, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    let client = support::http2_client();
    let response = client
        .get(format!("{}/echo/h2?x=1", gw.url))
        .header("X-Custom", "over-h2")
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let echo = json_body(response).await;
    assert_eq!(echo["path"], "/echo/h2");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(seen(&echo, "x-custom"), ["over-h2"]);
    // :authority becomes the upstream's Host.
    assert_eq!(
        seen(&echo, "host"),
        [format!("127.0.0.1:{}", gw.running().addr.port())]
    );

    let response = client
        .post(format!("{}/submit", gw.url))
        .body("h2 body")
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(json_body(response).await["body"], "h2 body");

    let response = client.get(format!("{}/status/418", gw.url)).send().await.unwrap();
    assert_eq!(response.status(), 418);

    // Many streams at once on the one connection.
    let requests = (0..32).map(|i| {
        let client = client.clone();
        let url = format!("{}/echo/{i}", gw.url);
        async move {
            let response = client.get(url).send().await.unwrap();
            assert_eq!(response.version(), reqwest::Version::HTTP_2);
            json_body(response).await["path"].as_str().unwrap().to_owned()
        }
    });
    let paths = futures_util::future::join_all(requests).await;
    for (i, path) in paths.iter().enumerate() {
        assert_eq!(path, &format!("/echo/{i}"));
    }

    // A streamed body of a few MiB over h2 arrives whole.
    let len = 8 * 1024 * 1024 + 13;
    let mut response = client
        .get(format!("{}/stream?bytes={len}", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let mut got = 0u64;
    while let Some(chunk) = response.chunk().await.unwrap() {
        assert!(pattern::matches(got, &chunk), "corrupt at {got}");
        got += chunk.len() as u64;
    }
    assert_eq!(got, len);
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

fn sha256_fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

async fn presented_fingerprint(addr: std::net::SocketAddr) -> String {
    let tls = raw::tls_connect(addr, &[b"http/1.1"]).await;
    let certs = tls.get_ref().1.peer_certificates().expect("server certificate");
    sha256_fingerprint(certs[0].as_ref())
}

#[tokio::test]
async fn certificate_is_generated_on_first_start_and_reused() {
    use std::os::unix::fs::PermissionsExt;

    let up = upstream::start().await;
    let (config, dir) = passthrough(&up.url);
    assert!(!config.tls.cert.exists() && !config.tls.key.exists());

    let first = portcullis::start(config.clone(), None)
        .await
        .expect("first start");
    let cert_pem = std::fs::read(&config.tls.cert).expect("certificate written");
    let key_mode = std::fs::metadata(&config.tls.key)
        .expect("key written")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "key file mode {key_mode:o}");
    assert!(!first.tls_fingerprint.is_empty());
    assert_eq!(presented_fingerprint(first.addr).await, first.tls_fingerprint);
    let fingerprint = first.tls_fingerprint.clone();
    first.stop().await;

    let gw = support::start(config.clone(), dir).await;
    assert_eq!(
        gw.running().tls_fingerprint,
        fingerprint,
        "same certificate on the second start"
    );
    assert_eq!(presented_fingerprint(gw.running().addr).await, fingerprint);
    assert_eq!(
        std::fs::read(&config.tls.cert).unwrap(),
        cert_pem,
        "certificate file untouched"
    );
    let key_mode = std::fs::metadata(&config.tls.key).unwrap().permissions().mode();
    assert_eq!(key_mode & 0o777, 0o600);

    // The generated certificate verifies for localhost and 127.0.0.1 when
    // trusted explicitly (no -k).
    let trusted = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&cert_pem).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let port = gw.running().addr.port();
    for host in ["localhost", "127.0.0.1"] {
        let response = trusted
            .get(format!("https://{host}:{port}/echo"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{host}: {e:?}"));
        assert_eq!(response.status(), 200, "{host}");
    }
}

#[tokio::test]
async fn curl_k_against_the_self_signed_certificate() {
    let up = upstream::start().await;
    let (config, dir) = passthrough(&up.url);
    let gw = support::start(config, dir).await;

    let (status, body) = support::curl(&["-H", "X-From: curl", &format!("{}/echo/curl?q=1", gw.url)]).await;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["path"], "/echo/curl");
    assert_eq!(echo["query"], "q=1");
    assert_eq!(seen(&echo, "x-from"), ["curl"]);
    assert!(seen(&echo, "user-agent")[0].starts_with("curl/"));

    let (status, body) = support::curl(&["-d", "a=1&b=2", &format!("{}/form", gw.url)]).await;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body"], "a=1&b=2");

    let (status, _) = support::curl(&["--http1.1", &format!("{}/status/404", gw.url)]).await;
    assert_eq!(status, 404);
    let (status, _) = support::curl(&["-X", "DELETE", &format!("{}/status/204", gw.url)]).await;
    assert_eq!(status, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_connections_are_closed_while_others_are_served() {
    let up = upstream::start().await;
    let (mut config, dir) = passthrough(&up.url);
    config.server.header_read_timeout = Duration::from_secs(1);
    // Far beyond the test: whatever closes the connections below is the
    // header time-out, not idleness.
    config.server.idle_timeout = Duration::from_secs(600);
    let gw = support::start(config, dir).await;
    let addr = gw.running().addr;

    // 1. Half a request head, then nothing.
    let mut partial = raw::tls_connect(addr, &[b"http/1.1"]).await;
    partial
        .write_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    partial.flush().await.unwrap();

    // 2. A head trickled one byte at a time, each well within any idle limit.
    let mut trickle = raw::tls_connect(addr, &[b"http/1.1"]).await;
    trickle
        .write_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    let trickler = tokio::spawn(async move {
        let started = Instant::now();
        // One more byte of the header value every 200 ms, for ever.
        while started.elapsed() < Duration::from_secs(120) {
            if trickle.write_all(b"a").await.is_err() || trickle.flush().await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    });

    // 3. TLS, then not a byte of HTTP.
    let mut silent = raw::tls_connect(addr, &[b"h2", b"http/1.1"]).await;

    // 4. Half the HTTP/2 preface (before hyper knows which protocol it is).
    let mut preface = raw::tls_connect(addr, &[b"h2"]).await;
    preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    preface.flush().await.unwrap();

    // Everyone else is served meanwhile.
    let client = support::client();
    for i in 0..10 {
        let response = client.get(format!("{}/echo/{i}", gw.url)).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let (status, _) = support::curl(&["--http1.1", &format!("{}/echo", gw.url)]).await;
    assert_eq!(status, 200);

    async fn closed_within(stream: &mut (impl tokio::io::AsyncRead + Unpin), limit: Duration, what: &str) {
        let mut sink = Vec::new();
        match tokio::time::timeout(limit, stream.read_to_end(&mut sink)).await {
            Ok(_) => {}
            Err(_) => panic!("{what}: still open after {limit:?}"),
        }
        // Hyper may answer 408 before closing; it must not have served it.
        let text = String::from_utf8_lossy(&sink);
        assert!(!text.contains("200 OK"), "{what}: {text}");
    }
    closed_within(&mut partial, Duration::from_secs(30), "partial head").await;
    closed_within(&mut silent, Duration::from_secs(30), "silent connection").await;
    closed_within(&mut preface, Duration::from_secs(30), "partial HTTP/2 preface").await;
    let trickled = tokio::time::timeout(Duration::from_secs(150), trickler)
        .await
        .expect("trickler ends")
        .unwrap();
    assert!(trickled, "a trickled head was never cut off");

    // And the gateway still serves.
    let response = client.get(format!("{}/echo", gw.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);

    // The header time-out covers the head only: a first request on a fresh
    // connection that takes longer than it to answer is not cut off.
    for http1_only in [true, false] {
        let response = long_client(http1_only)
            .get(format!("{}/slow?ms=2500", gw.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("slow first request (http1_only={http1_only}): {e:?}"));
        assert_eq!(response.status(), 200);
        assert_eq!(json_body(response).await["path"], "/slow");
    }
}

/// A kept-alive connection that goes quiet after a request is closed once
/// `idle_timeout` has passed; one that keeps sending is not.
#[tokio::test]
async fn idle_keep_alive_connections_are_closed_and_busy_ones_kept() {
    let up = upstream::start().await;
    let (mut config, dir) = passthrough(&up.url);
    config.server.idle_timeout = Duration::from_secs(1);
    let gw = support::start(config, dir).await;
    let addr = gw.running().addr;
    let request = b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n";

    async fn one_response(tls: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin), request: &[u8]) {
        tls.write_all(request).await.unwrap();
        tls.flush().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // The echo answers with a Content-Length: read until the head and
        // that many body bytes are in.
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
                .await
                .expect("a response in time")
                .expect("read");
            assert!(
                n > 0,
                "closed before the response: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen);
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse().ok())
                    .expect("content-length");
                if seen.len() >= end + 4 + length {
                    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                    return;
                }
            }
        }
    }

    let mut quiet = raw::tls_connect(addr, &[b"http/1.1"]).await;
    one_response(&mut quiet, request).await;
    let mut busy = raw::tls_connect(addr, &[b"http/1.1"]).await;
    let started = Instant::now();
    // Three times the limit, a request every 250 ms on the busy one.
    while started.elapsed() < Duration::from_secs(3) {
        one_response(&mut busy, request).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), quiet.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the quiet connection is still open");
    one_response(&mut busy, request).await;
}

#[tokio::test]
async fn upstream_down_is_502_with_json_and_not_ready() {
    let url = closed_port_url().await;
    let (config, dir) = passthrough(&url);
    let gw = support::start(config, dir).await;
    let client = support::client();

    for method in ["GET", "POST"] {
        let response = client
            .request(method.parse().unwrap(), format!("{}/api/anything", gw.url))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 502, "{method}");
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = json_body(response).await;
        let message = body["message"].as_str().expect("message");
        assert!(message.to_lowercase().contains("bad gateway"), "{body}");
    }

    let response = client
        .get(format!("{}/healthz", gw.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "alive even with the upstream down");
    let response = client
        .get(format!("{}/readyz", gw.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body = json_body(response).await;
    assert_eq!(body["upstream"], false, "{body}");
    let reasons = body["reasons"].to_string();
    assert!(reasons.contains("upstream"), "{body}");
}

/// The direct exchange (bodyless GET and HEAD) reads the upstream's answer
/// itself: every framing HTTP/1.1 allows, interim answers, connection reuse,
/// and the failures a real upstream produces.
#[tokio::test]
async fn direct_exchange_handles_every_http1_framing_and_failure() {
    let up = scripted::start().await;
    let (config, dir) = passthrough(&up.url);
    let gw = support::start(config, dir).await;
    let client = long_client(true);
    let get = |path: &str| client.get(format!("{}{path}", gw.url)).send();

    // Keep-alive answers reuse one upstream connection.
    for _ in 0..20 {
        let response = get("/length").await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-path"], "length");
        assert_eq!(response.text().await.unwrap(), scripted::BODY);
    }
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "sequential requests share a connection"
    );

    for path in ["/chunked", "/until-close", "/connection-close", "/early-hints"] {
        let response = get(path).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert!(
            response
                .headers()
                .get("transfer-encoding")
                .is_none_or(|v| v == "chunked"),
            "{path}"
        );
        assert_eq!(response.text().await.unwrap(), scripted::BODY, "{path}");
    }

    // HEAD: the head only, with the length a GET would have.
    let response = client.head(format!("{}/length", gw.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-length"],
        scripted::BODY.len().to_string().as_str()
    );
    assert_eq!(response.text().await.unwrap(), "");

    // A body sent after a bodiless answer is not taken for the next answer.
    for _ in 0..3 {
        let response = client
            .head(format!("{}/body-to-head", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let response = get("/length").await.unwrap();
        assert_eq!(response.headers()["x-path"], "length");
        assert_eq!(response.text().await.unwrap(), scripted::BODY);
    }

    // Garbage is a 502 with a JSON body; a truncated body breaks the client's
    // response, not the gateway.
    let response = get("/garbage").await.unwrap();
    assert_eq!(response.status(), 502);
    let message = json_body(response).await["message"].to_string().to_lowercase();
    assert!(
        message.contains("bad gateway") && message.contains("invalid response"),
        "{message}"
    );
    let truncated = match get("/truncated").await {
        Ok(response) => response.bytes().await.is_err(),
        Err(_) => true,
    };
    assert!(truncated, "a body cut short must not look complete");

    // An upstream that drops idle keep-alive connections without a word: the
    // next request finds the pooled connection dead and is sent again.
    for i in 0..10 {
        let response = get("/drop-after").await.unwrap();
        assert_eq!(response.status(), 200, "request {i}");
        assert_eq!(response.text().await.unwrap(), scripted::BODY);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Still healthy, on the same gateway.
    let response = get("/length").await.unwrap();
    assert_eq!(response.text().await.unwrap(), scripted::BODY);
}

#[tokio::test]
async fn slow_upstream_is_504_with_json() {
    let up = upstream::start().await;
    let (mut config, dir) = passthrough(&up.url);
    config.upstream.response_timeout = Duration::from_secs(1);
    let gw = support::start(config, dir).await;
    let client = support::client();

    // A pooled upstream connection keeps one timer, moved on per request:
    // a quick answer first, so that the slow one below runs on a connection
    // whose timer was armed before.
    let response = client.get(format!("{}/slow?ms=10", gw.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);

    let response = client
        .get(format!("{}/slow?ms=20000", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = json_body(response).await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("timeout"),
        "{body}"
    );

    // Quick answers still pass, on the same gateway, also after a pause
    // longer than the time-out (an idle connection's timer has fired by then)
    // and with answers that, added up, take longer than it.
    let response = client.get(format!("{}/slow?ms=10", gw.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..4 {
        let response = client
            .get(format!("{}/slow?ms=400", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}

#[tokio::test]
async fn healthz_and_readyz_with_the_upstream_up() {
    let up = upstream::start().await;
    let (config, dir) = passthrough(&up.url);
    let gw = support::start(config, dir).await;
    let client = support::client();

    let response = client
        .get(format!("{}/healthz", gw.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(json_body(response).await["status"], "alive");

    let response = client
        .get(format!("{}/readyz", gw.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = json_body(response).await;
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["upstream"], true);
    assert_eq!(body["tls"], true);
    assert_eq!(body["listener"], true);
    assert_eq!(body["redis"], "not configured");

    // The probes live on the admin port only; on the TLS port they are
    // ordinary paths sent upstream.
    let echo = json_body(client.get(format!("{}/healthz", gw.url)).send().await.unwrap()).await;
    assert_eq!(echo["path"], "/healthz");
}

/// Streams `len` bytes down with `down` and up with `up` at the same time;
/// returns a line of figures.
async fn both_ways(gw: &binary::Process, down: &reqwest::Client, up: &reqwest::Client, len: u64) -> String {
    let started = Instant::now();
    let download = async {
        let mut response = down
            .get(format!("{}/stream?bytes={len}", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let version = response.version();
        let mut got = 0u64;
        while let Some(chunk) = response.chunk().await.expect("download chunk") {
            assert!(pattern::matches(got, &chunk), "download corrupt at {got}");
            got += chunk.len() as u64;
        }
        assert_eq!(got, len, "downloaded bytes");
        (version, started.elapsed())
    };
    let upload = async {
        let response = up
            .post(format!("{}/upload", gw.url))
            .body(reqwest::Body::wrap_stream(pattern::stream(len)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let version = response.version();
        let uploaded = json_body(response).await;
        assert_eq!(uploaded["bytes"], len, "{uploaded}");
        assert_eq!(uploaded["pattern_ok"], true, "{uploaded}");
        (version, started.elapsed())
    };
    let ((down_version, down_time), (up_version, up_time)) = tokio::join!(download, upload);
    let rate = |t: Duration| len as f64 / 1048576.0 / t.as_secs_f64();
    format!(
        "down {down_version:?} {:.1}s ({:.0} MiB/s), up {up_version:?} {:.1}s ({:.0} MiB/s)",
        down_time.as_secs_f64(),
        rate(down_time),
        up_time.as_secs_f64(),
        rate(up_time)
    )
}

/// 1 GiB down and 1 GiB up at the same time through the binary, over
/// HTTP/1.1 and HTTP/2 both ways round; its peak resident memory must stay a
/// small fraction of one body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_streams_both_ways_in_bounded_memory() {
    const LEN: u64 = 1024 * 1024 * 1024;
    const GROWTH_BOUND_MIB: u64 = 64;
    const PEAK_BOUND_MIB: u64 = 200;

    let up = upstream::start().await;
    let (mut config, dir) = passthrough(&up.url);
    // The upstream answers /upload once the whole body is in.
    config.upstream.response_timeout = Duration::from_secs(900);
    let mut gw = binary::spawn(config, dir).await;

    let http1 = long_client(true);
    let h2 = long_client(false);
    for (client, version) in [
        (&http1, reqwest::Version::HTTP_11),
        (&h2, reqwest::Version::HTTP_2),
    ] {
        let response = client
            .get(format!("{}/stream?bytes=100000", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), version);
        assert_eq!(response.bytes().await.unwrap().len(), 100_000);
    }
    let before_kib = gw.memory_kib("VmHWM");

    let first = both_ways(&gw, &http1, &h2, LEN).await;
    let second = both_ways(&gw, &h2, &http1, LEN).await;

    let peak_kib = gw.memory_kib("VmHWM");
    let rss_kib = gw.memory_kib("VmRSS");
    eprintln!(
        "1 GiB each way: [{first}] [{second}]; gateway VmHWM {before_kib} KiB before, {peak_kib} KiB after, \
         VmRSS {rss_kib} KiB"
    );
    assert!(
        peak_kib.saturating_sub(before_kib) < GROWTH_BOUND_MIB * 1024,
        "gateway peak memory grew by {} MiB while streaming",
        (peak_kib - before_kib) / 1024
    );
    assert!(
        peak_kib < PEAK_BOUND_MIB * 1024,
        "gateway peak memory {} MiB",
        peak_kib / 1024
    );

    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(60)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_0() {
    let up = upstream::start().await;
    let (mut config, dir) = passthrough(&up.url);
    config.server.shutdown_grace = Duration::from_secs(60);
    let mut gw = binary::spawn(config, dir).await;

    let in_flight = |client: reqwest::Client| {
        let url = format!("{}/gate", gw.url);
        tokio::spawn(async move {
            let response = client.get(url).send().await.expect("in-flight request answered");
            let version = response.version();
            (
                response.status(),
                version,
                response.text().await.expect("in-flight body"),
            )
        })
    };
    let over_h1 = in_flight(long_client(true));
    let over_h2 = in_flight(long_client(false));
    up.state.wait_gated(2).await;

    gw.signal(libc::SIGTERM);
    // The listener closes at once ...
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(gw.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting 30s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "exited with requests in flight"
    );
    // ... while the requests already in flight are answered.
    up.state.open_gate();
    for (task, version) in [
        (over_h1, reqwest::Version::HTTP_11),
        (over_h2, reqwest::Version::HTTP_2),
    ] {
        let (status, got_version, body) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("in-flight request done")
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(got_version, version);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["gated"],
            true
        );
    }
    let status = gw.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "exit status {status:?}; stderr:\n{}", gw.logs());
}

async fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (std::process::ExitStatus, String, String) {
    let mut command = binary::command();
    command.args(args).envs(env.iter().copied());
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("portcullis ends")
        .expect("portcullis runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_bad_config_stops_the_binary_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown.toml",
            "[server]\nlisten_on = \"127.0.0.1:1\"\n",
            "listen_on",
        ),
        ("section.toml", "[sever]\nlisten = \"127.0.0.1:1\"\n", "sever"),
        (
            "value.toml",
            "[upstream]\nresponse_timeout = \"soon\"\n",
            "upstream.response_timeout",
        ),
        (
            "address.toml",
            "[server]\nlisten = \"nowhere\"\n",
            "server.listen",
        ),
        ("url.toml", "[upstream]\nurl = \"ftp://x\"\n", "upstream.url"),
        ("syntax.toml", "[server\nlisten = 1\n", "syntax.toml"),
    ];
    for (name, text, named) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let path = path.to_str().unwrap();
        for subcommand in ["check", "run"] {
            let (status, _, stderr) = run_binary(&["--config", path, subcommand], &[]).await;
            assert!(!status.success(), "{name} {subcommand}: {status:?}");
            assert!(
                stderr.contains(named),
                "{name} {subcommand}: stderr does not name {named}: {stderr}"
            );
        }
    }
    // The same for an environment override that names no key.
    let path = dir.path().join("empty.toml");
    std::fs::write(&path, "").unwrap();
    let path = path.to_str().unwrap();
    let (status, _, stderr) =
        run_binary(&["--config", path, "check"], &[("PORTCULLIS_SERVER_LISTN", "1")]).await;
    assert!(!status.success());
    assert!(stderr.to_lowercase().contains("listn"), "{stderr}");
}

#[tokio::test]
async fn check_prints_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:18443\"\nheader_read_timeout = \"3s\"\n\n\
         [upstream]\nurl = \"http://127.0.0.1:3999\"\n\n\
         [[routes]]\nprefix = \"/public\"\nmin_role = \"none\"\n",
    )
    .unwrap();
    let (status, stdout, stderr) = run_binary(
        &["--config", path.to_str().unwrap(), "check"],
        &[("PORTCULLIS_CACHE_TTL", "90s")],
    )
    .await;
    assert!(status.success(), "{stderr}");
    let printed: toml::Table = stdout
        .parse()
        .unwrap_or_else(|e| panic!("not TOML ({e}):\n{stdout}"));
    assert_eq!(printed["server"]["listen"].as_str(), Some("127.0.0.1:18443"));
    assert_eq!(printed["server"]["header_read_timeout"].as_str(), Some("3s"));
    assert_eq!(printed["upstream"]["url"].as_str(), Some("http://127.0.0.1:3999"));
    // The environment is applied, and the defaults are shown too.
    assert_eq!(printed["cache"]["ttl"].as_str(), Some("1m 30s"));
    assert_eq!(printed["server"]["admin_listen"].as_str(), Some("127.0.0.1:9901"));
    assert_eq!(printed["tls"]["cert"].as_str(), Some("certs/gateway.crt"));
    assert_eq!(printed["routes"][0]["prefix"].as_str(), Some("/public"));
    // What it prints is itself a valid config with the same meaning.
    let reparsed = Config::from_toml(&stdout).expect("printed config loads");
    assert_eq!(reparsed.server.listen.port(), 18443);
    assert_eq!(reparsed.cache.ttl, Duration::from_secs(90));
    assert_eq!(reparsed.routes.len(), 1);
    assert_eq!(reparsed.routes[0].min_role, Role::None);
}

//! The listener's connections: HTTP/2 by ALPN with many streams on one
//! connection, and the time-outs that close slow-loris and idle connections
//! while everyone else is served. Authentication is out of the way
//! (`support::plain::passthrough`).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::plain::{json_body, long_client, passthrough, seen};
use crate::support::upstream::{self, pattern};
use crate::support::{self, raw};

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

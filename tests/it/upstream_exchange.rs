//! The upstream's answer coming back: every HTTP/1.1 framing and failure the
//! direct exchange meets, 502 and 504 with JSON, and bodies streamed both ways
//! in bounded memory. Authentication is out of the way
//! (`support::plain::passthrough`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::plain::{json_body, long_client, passthrough};
use crate::support::upstream::{self, pattern};
use crate::support::{self, binary, scripted};

/// An address on which nothing listens.
async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
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

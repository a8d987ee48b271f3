//! One upstream connection, two users: nothing the upstream sends outside an
//! exchange may reach the next user of a pooled connection, and the direct
//! exchange answers as hyper's pooled client does (issue 16, part 2).
//!
//! Each test runs the gateway once with `upstream.direct_exchange` on (the
//! exchange in the request's own task) and once off (hyper's pool only).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use portcullis::auth::Role;
use portcullis::config::{Config, Profile, RouteConfig, UpstreamConfig};
use portcullis::proxy::exchange::{DirectPools, Exchanged};

use crate::support::{self, scripted, Gateway};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Pooled,
}

const MODES: [Mode; 2] = [Mode::Direct, Mode::Pooled];

/// Every path to the scripted upstream, as is, with the given exchange.
fn config(upstream_url: &str, mode: Mode) -> (Config, tempfile::TempDir) {
    let (mut config, dir) = support::config(upstream_url);
    config.auth.profile = Profile::Custom;
    config.routes = vec![RouteConfig::rule("/", Role::None)];
    config.upstream.direct_exchange = mode == Mode::Direct;
    config.upstream.response_timeout = Duration::from_secs(1);
    (config, dir)
}

async fn gateway(upstream_url: &str, mode: Mode) -> Gateway {
    let (config, dir) = config(upstream_url, mode);
    support::start(config, dir).await
}

/// A user of their own: a new client, so a new connection to the gateway.
fn user() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .http1_only()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// What a client got, in one line: status, `X-Path` if any and the body; for
/// the gateway's own refusals the status and their message; `broken` for an
/// answer that failed before its end.
async fn outcome(gw: &Gateway, method: &str, path: &str) -> String {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let response = match user().request(method, format!("{}{path}", gw.url)).send().await {
        Ok(response) => response,
        Err(_) => return "broken".into(),
    };
    let status = response.status().as_u16();
    let from_gateway = response.headers().get("x-path").is_none() && status >= 500;
    let x_path = response
        .headers()
        .get("x-path")
        .map(|v| format!(" [{}]", v.to_str().unwrap_or("?")))
        .unwrap_or_default();
    let Ok(body) = response.text().await else {
        return "broken".into();
    };
    if from_gateway {
        let json: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{status} without a JSON body ({e}): {body}"));
        return format!("{status} {}", json["message"].as_str().unwrap_or("?"));
    }
    format!("{status}{x_path} {body}").trim_end().to_owned()
}

/// The next user's GET on the connection that just carried another answer
/// and then, while idle, a second one nobody asked for. Returns what the next
/// user got.
async fn late_answer_round(mode: Mode, method: &str, path: &str) -> (String, u64) {
    let up = scripted::start().await;
    let gw = gateway(&up.url, mode).await;
    let first = outcome(&gw, method, path).await;
    assert!(
        first.contains("[stray-first]"),
        "{mode:?} {method} {path}: {first}"
    );
    // The stray answer arrives STRAY_DELAY after the first; the next user
    // comes 0.1 s after that.
    tokio::time::sleep(scripted::STRAY_DELAY + Duration::from_millis(100)).await;
    let next = outcome(&gw, "GET", "/length").await;
    let connections = up.connections.load(Ordering::SeqCst);
    gw.stop().await;
    (next, connections)
}

/// An idle pooled connection that received anything (here a complete second
/// answer) is never given to the next request: after a body with a length,
/// a 204, a 304 and a HEAD, three times each, the next user gets their own
/// answer, in both exchanges.
#[tokio::test]
async fn a_late_answer_on_an_idle_connection_never_reaches_the_next_user() {
    let cases = [
        ("GET", "/stray/length"),
        ("GET", "/stray/no-content"),
        ("GET", "/stray/not-modified"),
        ("HEAD", "/stray/length"),
    ];
    let own = format!("200 [length] {}", scripted::BODY);
    let mut report = String::new();
    let mut wrong = 0;
    for mode in MODES {
        for round in 1..=3 {
            // The four cases side by side: each with its own upstream and gateway.
            let results = futures_util::future::join_all(
                cases
                    .iter()
                    .map(|&(method, path)| late_answer_round(mode, method, path)),
            )
            .await;
            for ((method, path), (next, connections)) in cases.iter().zip(results) {
                let ok = next == own;
                wrong += usize::from(!ok);
                writeln!(
                    report,
                    "{mode:?} round {round}: {method} {path}, then GET /length: {} ({next}; {connections} upstream connection(s))",
                    if ok { "own answer" } else { "WRONG" },
                )
                .unwrap();
            }
        }
    }
    println!("{report}");
    assert_eq!(wrong, 0, "next users given another answer:\n{report}");
}

/// The exchange itself, on a runtime that has not turned its reactor since
/// the stray answer came (as on a gateway busy with other work): the check
/// at reuse must ask the socket. Same cases and timing as above.
#[tokio::test]
async fn a_late_answer_the_runtime_has_not_seen_never_reaches_the_next_request() {
    let cases = [
        ("GET", "/stray/length"),
        ("GET", "/stray/no-content"),
        ("GET", "/stray/not-modified"),
        ("HEAD", "/stray/length"),
    ];
    let mut report = String::new();
    let mut wrong = 0;
    for (method, path) in cases {
        for round in 1..=3 {
            let up = scripted::start_on_own_thread();
            let upstream: Uri = up.url.parse().unwrap();
            let pools = DirectPools::new([&upstream], &UpstreamConfig::default());
            let request = |method: &str, path: &str| {
                Request::builder()
                    .method(method)
                    .uri(format!("{}{path}", up.url))
                    .body(Empty::<Bytes>::new())
                    .unwrap()
            };
            let first = request(method, path);
            let pool = pools.for_request(&first).expect("a request the exchange takes");
            let (status, x_path, _) = exchanged(pool.exchange(&first).await.expect("first answer")).await;
            assert_eq!(x_path, "stray-first", "{method} {path}: {status}");
            // The runtime is busy elsewhere (blocked): the stray answer comes
            // in the meantime and no reactor turn sees it.
            std::thread::sleep(scripted::STRAY_DELAY + Duration::from_millis(100));
            let next = request("GET", "/length");
            let (status, x_path, body) = match pool.exchange(&next).await {
                Ok(response) => exchanged(response).await,
                Err(e) => (0, e.to_string(), String::new()),
            };
            let ok = (status, x_path.as_str(), body.as_str()) == (200, "length", scripted::BODY);
            wrong += usize::from(!ok);
            writeln!(
                report,
                "round {round}: {method} {path}, then GET /length: {} ({status} [{x_path}] {body}; {} upstream connection(s))",
                if ok { "own answer" } else { "WRONG" },
                up.connections.load(Ordering::SeqCst),
            )
            .unwrap();
        }
    }
    println!("{report}");
    assert_eq!(wrong, 0, "next requests given another answer:\n{report}");
}

/// Status, `X-Path` and body of a directly exchanged answer.
async fn exchanged(response: http::Response<Exchanged>) -> (u16, String, String) {
    let status = response.status().as_u16();
    let x_path = response
        .headers()
        .get("x-path")
        .map(|v| v.to_str().unwrap_or("?").to_owned())
        .unwrap_or_default();
    let body = match response.into_body() {
        Exchanged::Whole(bytes) => bytes,
        Exchanged::Streamed(body) => body.collect().await.expect("body").to_bytes(),
    };
    (status, x_path, String::from_utf8_lossy(&body).into_owned())
}

/// A 101 to a request that asked for no upgrade is no interim answer: the
/// gateway answers 502 and does not read on into what follows it.
#[tokio::test]
async fn an_unasked_for_101_is_an_invalid_response() {
    let up = scripted::start().await;
    for mode in MODES {
        let gw = gateway(&up.url, mode).await;
        let got = outcome(&gw, "GET", "/switching").await;
        assert!(
            got.starts_with("502 ") && got.contains("invalid response"),
            "{mode:?}: {got}"
        );
        // Still healthy.
        let got = outcome(&gw, "GET", "/length").await;
        assert_eq!(got, format!("200 [length] {}", scripted::BODY), "{mode:?}");
        gw.stop().await;
    }
}

/// The same scripted answers, valid and broken, through the direct exchange
/// and through hyper's pooled client: the client gets the same in both, and
/// what it gets is right. The requests run in order on one gateway, so an
/// answer that leaves bytes behind on its connection shows in the next one.
#[tokio::test]
async fn the_direct_exchange_and_the_pooled_client_answer_alike() {
    let body = scripted::BODY;
    let invalid = "502 Bad gateway: upstream sent an invalid response";
    let cases: Vec<(&str, &str, String)> = vec![
        ("GET", "/length", format!("200 [length] {body}")),
        ("HEAD", "/length", "200 [length]".into()),
        ("GET", "/chunked", format!("200 {body}")),
        ("GET", "/until-close", format!("200 [until-close] {body}")),
        ("GET", "/connection-close", format!("200 {body}")),
        ("GET", "/early-hints", format!("200 {body}")),
        ("GET", "/interim", format!("200 [interim] {body}")),
        ("GET", "/http10", format!("200 [http10] {body}")),
        ("GET", "/gzip-until-close", format!("200 {body}")),
        ("HEAD", "/body-to-head", "200".into()),
        ("GET", "/length", format!("200 [length] {body}")),
        ("GET", "/no-content-with-body", "204".into()),
        ("GET", "/length", format!("200 [length] {body}")),
        ("GET", "/garbage", invalid.into()),
        ("GET", "/truncated", "broken".into()),
        ("GET", "/bad-chunk-size", "broken".into()),
        ("GET", "/chunk-overrun", "broken".into()),
        ("GET", "/chunked-truncated", "broken".into()),
        ("GET", "/conflicting-length", invalid.into()),
        ("GET", "/negative-length", invalid.into()),
        ("GET", "/head-truncated", "502".into()),
        ("GET", "/empty-close", "502".into()),
        ("GET", "/switching", invalid.into()),
        (
            "GET",
            "/silent",
            "504 Gateway timeout: upstream did not answer in time".into(),
        ),
        ("GET", "/length", format!("200 [length] {body}")),
    ];
    let up = scripted::start().await;
    let mut got: Vec<Vec<String>> = Vec::new();
    for mode in MODES {
        let gw = gateway(&up.url, mode).await;
        let mut answers = Vec::new();
        for (method, path, _) in &cases {
            answers.push(outcome(&gw, method, path).await);
        }
        gw.stop().await;
        got.push(answers);
    }
    let mut report = String::new();
    let mut failures = 0;
    for (i, (method, path, expected)) in cases.iter().enumerate() {
        let (direct, pooled) = (&got[0][i], &got[1][i]);
        // A 502 the upstream's silence caused may name it unreachable or
        // invalid; the class is what counts.
        let fits = |answer: &String| {
            if expected == "502" {
                answer.starts_with("502 ")
            } else {
                answer == expected
            }
        };
        let ok = fits(direct) && fits(pooled) && (expected == "502" || direct == pooled);
        failures += usize::from(!ok);
        writeln!(
            report,
            "{} {method} {path}: direct {direct:?}, pooled {pooled:?}{}",
            if ok { "ok  " } else { "FAIL" },
            if ok {
                String::new()
            } else {
                format!(", expected {expected:?}")
            },
        )
        .unwrap();
    }
    println!("{report}");
    assert_eq!(failures, 0, "\n{report}");
}

//! A real HTTP/1.1 upstream for the gateway to forward to (hyper 1 on
//! `127.0.0.1:0`):
//!
//! - any path not below: echo of method, path, query, headers and body as JSON
//! - `/status/N`: answers with status `N` (and a small JSON body)
//! - `/stream?bytes=N`: `N` bytes of [`pattern`], generated on the fly, chunked
//! - `/upload`: reads the body as it streams in; answers `{"bytes", "pattern_ok"}`
//! - `/slow?ms=N`: waits, then echoes
//! - `/gate`: waits until the test calls [`State::open_gate`]
//! - `/hop-response`: a response carrying hop-by-hop headers
//! - `/api/live/ws`: WebSocket; first sends the request headers it saw, then echoes

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};
use tokio_tungstenite::WebSocketStream;

pub type UpBody = BoxBody<Bytes, Infallible>;

/// The byte at offset `i` of every generated body is `i % 251`: a length that
/// is not a power of two, so a dropped or repeated chunk shows.
pub mod pattern {
    use super::*;

    const PERIOD: usize = 251;
    /// Chunks handed out by the generator; a multiple of the period so that
    /// every chunk starts at phase 0.
    pub const CHUNK: usize = PERIOD * 256;

    fn table() -> &'static Bytes {
        static TABLE: OnceLock<Bytes> = OnceLock::new();
        // Long enough for any phase plus a whole chunk.
        TABLE.get_or_init(|| Bytes::from((0..PERIOD * 257).map(|i| (i % PERIOD) as u8).collect::<Vec<u8>>()))
    }

    /// The `n` bytes at `offset` (`offset` a multiple of the period, `n <= CHUNK`).
    pub fn chunk(n: usize) -> Bytes {
        table().slice(..n.min(CHUNK))
    }

    /// Whether `data` is what the pattern holds at `offset`.
    pub fn matches(offset: u64, data: &[u8]) -> bool {
        let table = table();
        let mut offset = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let phase = (offset % PERIOD as u64) as usize;
            let n = rest.len().min(CHUNK);
            if rest[..n] != table[phase..phase + n] {
                return false;
            }
            rest = &rest[n..];
            offset += n as u64;
        }
        true
    }

    /// A body of `len` pattern bytes made while it is sent.
    pub struct PatternBody {
        pub remaining: u64,
    }

    impl Body for PatternBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.remaining == 0 {
                return Poll::Ready(None);
            }
            let n = self.remaining.min(CHUNK as u64) as usize;
            self.remaining -= n as u64;
            Poll::Ready(Some(Ok(Frame::data(chunk(n)))))
        }

        fn is_end_stream(&self) -> bool {
            self.remaining == 0
        }

        fn size_hint(&self) -> SizeHint {
            // Unknown length on purpose: the gateway must stream chunked bodies.
            SizeHint::default()
        }
    }

    /// The same bytes as a stream for `reqwest::Body::wrap_stream`.
    pub fn stream(
        len: u64,
    ) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + Sync + 'static {
        futures_util::stream::unfold(len, |remaining| async move {
            if remaining == 0 {
                return None;
            }
            let n = remaining.min(CHUNK as u64) as usize;
            Some((Ok(chunk(n)), remaining - n as u64))
        })
    }
}

/// What the upstream saw, for tests to look at.
#[derive(Default)]
pub struct State {
    pub requests: AtomicU64,
    /// Requests waiting at `/gate`.
    pub gated: AtomicU64,
    gate: OnceLock<watch::Sender<bool>>,
}

impl State {
    fn gate(&self) -> &watch::Sender<bool> {
        self.gate.get_or_init(|| watch::channel(false).0)
    }

    /// Lets every request at `/gate` (and later ones) answer.
    pub fn open_gate(&self) {
        self.gate().send_replace(true);
    }

    /// Waits until `n` requests are waiting at `/gate`.
    pub async fn wait_gated(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.gated.load(Ordering::SeqCst) < n {
            assert!(tokio::time::Instant::now() < deadline, "no request reached /gate");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A running upstream; dropped, it stops accepting.
pub struct Upstream {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("upstream binds");
    let addr = listener.local_addr().expect("upstream address");
    let state = Arc::new(State::default());
    let shared = state.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let state = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(request, state).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Upstream {
        addr,
        url: format!("http://{addr}"),
        state,
        task,
    }
}

fn full(body: impl Into<Bytes>) -> UpBody {
    Full::new(body.into()).boxed()
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<UpBody> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
        .headers_mut()
        .insert("x-upstream", HeaderValue::from_static("portcullis-test"));
    response
}

fn query_param(request: &Request<Incoming>, name: &str) -> Option<u64> {
    request
        .uri()
        .query()?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

/// Header names (lower case) to every value received, in order.
pub fn headers_json(headers: &http::HeaderMap) -> serde_json::Value {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        map.entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    serde_json::json!(map)
}

async fn echo(request: Request<Incoming>) -> Response<UpBody> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "headers": headers_json(&parts.headers),
            "body": String::from_utf8_lossy(&body),
        }),
    )
}

async fn handle(mut request: Request<Incoming>, state: Arc<State>) -> Response<UpBody> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let path = request.uri().path().to_owned();
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        let _ = request.into_body().collect().await;
        let mut response = json(status, &serde_json::json!({"status": status.as_u16()}));
        if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            *response.body_mut() = full(Bytes::new());
            response.headers_mut().remove(header::CONTENT_TYPE);
        }
        return response;
    }
    match path.as_str() {
        "/stream" => {
            let len = query_param(&request, "bytes").unwrap_or(0);
            let mut response = Response::new(pattern::PatternBody { remaining: len }.boxed());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        "/upload" => {
            let mut body = request.into_body();
            let mut count = 0u64;
            let mut pattern_ok = true;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return json(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": "body broke off", "bytes": count}),
                    );
                };
                if let Some(data) = frame.data_ref() {
                    pattern_ok &= pattern::matches(count, data);
                    count += data.len() as u64;
                }
            }
            json(
                StatusCode::OK,
                &serde_json::json!({"bytes": count, "pattern_ok": pattern_ok}),
            )
        }
        "/slow" => {
            let ms = query_param(&request, "ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            echo(request).await
        }
        "/gate" => {
            let mut open = state.gate().subscribe();
            state.gated.fetch_add(1, Ordering::SeqCst);
            let _ = open.wait_for(|open| *open).await;
            json(StatusCode::OK, &serde_json::json!({"gated": true}))
        }
        "/hop-response" => {
            let mut response = json(StatusCode::OK, &serde_json::json!({"hop": true}));
            let h = response.headers_mut();
            h.insert(header::CONNECTION, HeaderValue::from_static("x-resp-hop"));
            h.insert("x-resp-hop", HeaderValue::from_static("1"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
            h.insert("x-resp-kept", HeaderValue::from_static("1"));
            response
        }
        "/api/live/ws" => websocket(&mut request),
        _ => echo(request).await,
    }
}

fn websocket(request: &mut Request<Incoming>) -> Response<UpBody> {
    let key = request.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let is_ws = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let (Some(key), true) = (key, is_ws) else {
        return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "not a websocket request"}),
        );
    };
    let seen = headers_json(request.headers());
    let upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let hello = serde_json::json!({"hello": "/api/live/ws", "headers": seen}).to_string();
        if ws.send(Message::text(hello)).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                let _ = ws.close(None).await;
                return;
            }
            let echo = message.is_text() || message.is_binary();
            if echo && ws.send(message).await.is_err() {
                return;
            }
        }
    });
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&tokio_tungstenite::tungstenite::handshake::derive_accept_key(
            key.as_bytes(),
        ))
        .expect("accept key is a header value"),
    );
    response
}

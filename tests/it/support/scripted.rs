//! An HTTP/1.1 upstream that answers with exact bytes, for the framings and
//! failures the gateway's direct exchange must handle itself: chunked bodies
//! with extensions and trailers, bodies delimited by close, interim answers,
//! garbage, truncation, and keep-alive connections dropped while idle.
//!
//! It reads bodyless request heads only (what the direct exchange sends).
//! `GET /PATH` answers:
//! - `/length`: `Content-Length` body, connection kept
//! - `/chunked`: chunked body with a chunk extension and a trailer
//! - `/until-close`: no length at all; the body ends when the connection does
//! - `/connection-close`: `Connection: close`, then the connection is closed
//! - `/early-hints`: a `103` before the real answer
//! - `/body-to-head`: sends its body even to HEAD (a broken upstream)
//! - `/garbage`: not HTTP
//! - `/truncated`: promises 100 bytes, sends 10, closes
//! - `/drop-after`: a keep-alive answer, then the connection is closed while
//!   the gateway holds it idle, without saying so
//! - `/stray/length`, `/stray/no-content`, `/stray/not-modified`: a keep-alive
//!   answer (200 with a body, 204, 304; to HEAD the head only), then, while the
//!   gateway holds the connection idle, [`STRAY_DELAY`] later, a second
//!   complete answer nobody asked for ([`STRAY_BODY`], `X-Path: stray`)
//! - `/switching`: `101 Switching Protocols` to a request that asked for no
//!   upgrade, then a complete `200`, then close
//! - `/interim`: `100` and `102` before the real answer
//! - `/http10`: an HTTP/1.0 answer without a length, ended by close
//! - `/gzip-until-close`: `Transfer-Encoding: gzip` (not chunked): ended by close
//! - `/no-content-with-body`: a 204 with a body after it (a broken upstream)
//! - `/bad-chunk-size`, `/chunk-overrun`, `/chunked-truncated`: broken chunked
//!   bodies (a size that is not hex, data longer than its size, close
//!   mid-chunk)
//! - `/conflicting-length`, `/negative-length`: unusable `Content-Length`s
//! - `/head-truncated`: close inside the head
//! - `/empty-close`: close without a byte
//! - `/silent`: no answer for 10 s

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const BODY: &str = "hello from the scripted upstream";
/// What a `/stray/...` connection sends unasked after its answer.
pub const STRAY_BODY: &str = "STRAY: an answer meant for nobody";
/// How long after its answer a `/stray/...` connection sends [`STRAY_BODY`].
pub const STRAY_DELAY: Duration = Duration::from_millis(300);

pub struct Scripted {
    pub url: String,
    /// Connections accepted so far.
    pub connections: Arc<AtomicU64>,
    task: Option<JoinHandle<()>>,
    /// Ends the runtime of [`start_on_own_thread`].
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The same upstream on a runtime of its own, in its own thread: it keeps
/// to its script while the test's runtime is blocked.
pub fn start_on_own_thread() -> Scripted {
    let (started, up) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let up = start().await;
            let (stop, stopped) = tokio::sync::oneshot::channel();
            let _ = started.send((up.url.clone(), up.connections.clone(), stop));
            // Until told, or until the handle is gone.
            let _ = stopped.await;
        });
    });
    let (url, connections, stop) = up.recv().expect("scripted upstream started");
    Scripted {
        url,
        connections,
        task: None,
        stop: Some(stop),
    }
}

pub async fn start() -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicU64::new(0));
    let counter = connections.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream));
        }
    });
    Scripted {
        url: format!("http://{addr}"),
        connections,
        task: Some(task),
        stop: None,
    }
}

/// Answers request after request until told to close.
async fn serve(mut stream: TcpStream) {
    let mut buf = Vec::new();
    loop {
        let Some((method, path)) = read_head(&mut stream, &mut buf).await else {
            return;
        };
        let head_only = method == "HEAD";
        let body = |s: &str| if head_only { String::new() } else { s.to_owned() };
        let (answer, then_close) = match path.as_str() {
            "/length" => (
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Path: length\r\n\r\n{}", BODY.len(), body(BODY)),
                false,
            ),
            "/chunked" => {
                let (a, b) = BODY.split_at(7);
                let chunks = format!(
                    "{:x};name=value\r\n{a}\r\n{:X}\r\n{b}\r\n0\r\nX-Trailer: t\r\n\r\n",
                    a.len(),
                    b.len()
                );
                (
                    format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{}", body(&chunks)),
                    false,
                )
            }
            "/until-close" => (format!("HTTP/1.1 200 OK\r\nX-Path: until-close\r\n\r\n{}", body(BODY)), true),
            "/connection-close" => (
                format!("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{}", BODY.len(), body(BODY)),
                true,
            ),
            "/early-hints" => (
                format!(
                    "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
                    BODY.len(),
                    body(BODY)
                ),
                false,
            ),
            // A broken upstream: the body even to HEAD, where none may follow.
            "/body-to-head" => (
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{BODY}", BODY.len()),
                false,
            ),
            "/garbage" => ("SSH-2.0-OpenSSH_9.2\r\n\r\n".to_owned(), true),
            "/truncated" => ("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789".to_owned(), true),
            "/stray/length" | "/stray/no-content" | "/stray/not-modified" => {
                let answer = match path.as_str() {
                    "/stray/length" => format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Path: stray-first\r\n\r\n{}",
                        BODY.len(),
                        body(BODY)
                    ),
                    "/stray/no-content" => "HTTP/1.1 204 No Content\r\nX-Path: stray-first\r\n\r\n".to_owned(),
                    _ => "HTTP/1.1 304 Not Modified\r\nETag: \"1\"\r\nX-Path: stray-first\r\n\r\n".to_owned(),
                };
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                tokio::time::sleep(STRAY_DELAY).await;
                let stray = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Path: stray\r\n\r\n{STRAY_BODY}",
                    STRAY_BODY.len()
                );
                if stream.write_all(stray.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            "/switching" => (
                format!(
                    "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\
                     HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Path: after-101\r\n\r\n{BODY}",
                    BODY.len()
                ),
                true,
            ),
            "/interim" => (
                format!(
                    "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n\
                     HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Path: interim\r\n\r\n{}",
                    BODY.len(),
                    body(BODY)
                ),
                false,
            ),
            "/http10" => (format!("HTTP/1.0 200 OK\r\nX-Path: http10\r\n\r\n{}", body(BODY)), true),
            "/gzip-until-close" => (
                format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n{}", body(BODY)),
                true,
            ),
            "/no-content-with-body" => (
                format!("HTTP/1.1 204 No Content\r\nContent-Length: {}\r\n\r\n{BODY}", BODY.len()),
                false,
            ),
            "/bad-chunk-size" => (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_owned(),
                true,
            ),
            "/chunk-overrun" => (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello, world\r\n0\r\n\r\n".to_owned(),
                true,
            ),
            "/chunked-truncated" => (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc".to_owned(),
                true,
            ),
            "/conflicting-length" => (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_owned(),
                true,
            ),
            "/negative-length" => ("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello".to_owned(), true),
            "/head-truncated" => ("HTTP/1.1 200 OK\r\nContent-Le".to_owned(), true),
            "/empty-close" => (String::new(), true),
            "/silent" => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                return;
            }
            "/drop-after" => {
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}", BODY.len(), body(BODY));
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                // Closed only once the gateway holds the connection idle.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
            _ => ("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned(), false),
        };
        if stream.write_all(answer.as_bytes()).await.is_err() || then_close {
            return;
        }
    }
}

/// Reads one request head; `None` when the connection ends.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let mut words = head.split_whitespace();
            return Some((words.next()?.to_owned(), words.next()?.to_owned()));
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

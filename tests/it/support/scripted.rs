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

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const BODY: &str = "hello from the scripted upstream";

pub struct Scripted {
    pub url: String,
    /// Connections accepted so far.
    pub connections: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
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
        task,
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

//! Idle upstream connections per host, their checkout (a connection that
//! heard anything while idle is never reused) and the exchange itself.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::super::has_token;
use super::body::*;
use super::head::*;
use super::*;
use crate::config::UpstreamConfig;

pub struct HostPool {
    pub(super) authority: Authority,
    /// `host:port` with the default port filled in, for connect.
    pub(super) target: String,
    pub(super) idle: Mutex<Vec<Idle>>,
    /// Signalled each time a connection goes back to `idle`.
    pub(super) returned: Notify,
    pub(super) max_idle: usize,
    pub(super) idle_timeout: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) response_timeout: Duration,
}

pub(super) struct Idle {
    pub(super) conn: Conn,
    pub(super) since: Instant,
}

/// A connection with the buffers it keeps between requests.
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) read: BytesMut,
    pub(super) write: Vec<u8>,
    pub(super) reused: bool,
    /// Bounds each wait for an answer. Kept with the connection and moved
    /// later for every request: extending a registered timer is one atomic
    /// operation, where a fresh `timeout()` per request registered and
    /// removed a timer each time (about 1,100 instructions, callgrind).
    pub(super) deadline: Pin<Box<Sleep>>,
}

impl HostPool {
    pub(super) fn new(authority: Authority, config: &UpstreamConfig) -> HostPool {
        let target = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
        HostPool {
            authority,
            target,
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
            max_idle: config.pool_max_idle_per_host,
            idle_timeout: config.pool_idle_timeout,
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
        }
    }

    pub(super) fn idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        // A panic while holding the lock leaves a plain Vec behind: still usable.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used live connection (its buffers and the
    /// upstream's socket state are the warmest). One that heard anything
    /// while idle is closed, and the next one tried.
    pub(super) fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle();
        while let Some(entry) = idle.pop() {
            if entry.since.elapsed() < self.idle_timeout && is_quiet(&entry.conn.stream) {
                let mut conn = entry.conn;
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    pub(super) fn give_back(&self, mut conn: Conn) {
        conn.read.clear();
        let mut idle = self.idle();
        // The oldest entry is the likeliest to have expired: one check per
        // return keeps a quiet pool from holding dead sockets for long.
        if idle
            .first()
            .is_some_and(|e| e.since.elapsed() >= self.idle_timeout)
        {
            idle.remove(0);
        }
        if idle.len() < self.max_idle {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
            drop(idle);
            self.returned.notify_one();
        }
    }

    pub(super) async fn connect(&self) -> Result<Conn, ExchangeError> {
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.target)).await
        {
            Err(_) => return Err(ExchangeError::ConnectTimeout),
            Ok(Err(e)) => return Err(ExchangeError::Connect(e)),
            Ok(Ok(stream)) => stream,
        };
        stream.set_nodelay(true).map_err(ExchangeError::Connect)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        // Best effort, as with the pooled client's connector.
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        Ok(Conn {
            stream,
            read: BytesMut::with_capacity(READ_RESERVE),
            write: Vec::with_capacity(1024),
            reused: false,
            deadline: Box::pin(tokio::time::sleep(self.response_timeout)),
        })
    }

    /// An idle connection, or a new one: whichever comes first. Under a burst
    /// of misses a connection freed by another request is taken as soon as
    /// it is back, instead of every request waiting on its own connect.
    pub(super) async fn checkout(&self) -> Result<Conn, ExchangeError> {
        if let Some(conn) = self.take_idle() {
            return Ok(conn);
        }
        // Boxed, like the retry below: rare, and it would otherwise enlarge
        // every request's future.
        let mut connect = Box::pin(self.connect());
        loop {
            tokio::select! {
                biased;
                conn = &mut connect => return conn,
                () = self.returned.notified() => {
                    if let Some(conn) = self.take_idle() {
                        return Ok(conn);
                    }
                }
            }
        }
    }

    /// Sends the head of `request` and reads the answer's head, within the
    /// response time-out counted from now. A reused connection the upstream
    /// closed while it sat idle fails before any byte of an answer: that
    /// request is sent once more on a new one.
    pub async fn exchange<B>(
        self: &Arc<Self>,
        request: &Request<B>,
    ) -> Result<Response<Exchanged>, ExchangeError> {
        let deadline = Instant::now() + self.response_timeout;
        let conn = match self.take_idle() {
            Some(conn) => conn,
            // Only a request that has to wait for a connection needs a timer
            // of its own before it has one.
            None => within(deadline, Box::pin(self.checkout())).await?,
        };
        match self.round_trip(conn, request, deadline).await {
            Err((e, true)) => {
                tracing::debug!(error = %e, "idle upstream connection was closed; retrying on a new one");
                let conn = within(deadline, Box::pin(self.connect())).await?;
                Box::pin(self.round_trip(conn, request, deadline))
                    .await
                    .map_err(|(e, _)| e)
            }
            other => other.map_err(|(e, _)| e),
        }
    }

    /// The error comes with whether the request may be sent again.
    pub(super) async fn round_trip<B>(
        self: &Arc<Self>,
        mut conn: Conn,
        request: &Request<B>,
        deadline: Instant,
    ) -> Result<Response<Exchanged>, (ExchangeError, bool)> {
        write_head(&mut conn.write, request, &self.authority);
        conn.deadline.as_mut().reset(deadline);
        let Conn {
            stream,
            read,
            write,
            reused,
            deadline: timer,
        } = &mut conn;
        let may_retry = *reused;
        let head = tokio::select! {
            biased;
            head = send_and_read_head(stream, write, read, may_retry) => head?,
            () = timer.as_mut() => return Err((ExchangeError::ResponseTimeout, false)),
        };
        self.respond(conn, head, request.method() == Method::HEAD)
            .map_err(|e| (e, false))
    }

    pub(super) fn respond(
        self: &Arc<Self>,
        mut conn: Conn,
        head: Head,
        to_head_request: bool,
    ) -> Result<Response<Exchanged>, ExchangeError> {
        let Head {
            status,
            mut headers,
            http11,
        } = head;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(ExchangeError::Malformed(
                "101 to a request that asked for no upgrade",
            ));
        }
        let framing = framing(to_head_request, status, &mut headers)?;
        let keep_alive =
            http11 && !framing.is_until_close() && !has_token(&headers, header::CONNECTION, "close");
        let body = match framing {
            Framing::Length(0) | Framing::Empty => {
                // Bytes after a bodiless answer (a body sent to HEAD, say)
                // would be read as the next answer: such a connection closes.
                let clean = conn.read.is_empty();
                self.finish(conn, keep_alive, clean);
                Exchanged::Whole(Bytes::new())
            }
            // The common small answer: already read with its head.
            Framing::Length(n) if n as usize <= conn.read.len() => {
                let body = conn.read.split_to(n as usize).freeze();
                let clean = conn.read.is_empty();
                self.finish(conn, keep_alive, clean);
                Exchanged::Whole(body)
            }
            framing => Exchanged::Streamed(StreamedBody {
                conn: Some(conn),
                pool: self.clone(),
                decoder: match framing {
                    Framing::Length(n) => Decoder::Length(n),
                    Framing::Chunked => Decoder::Chunked(Chunk::Size),
                    _ => Decoder::UntilClose,
                },
                keep_alive,
            }),
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }

    /// A connection whose answer was read to its end goes back to the pool;
    /// one with stray bytes after the answer is closed.
    pub(super) fn finish(&self, conn: Conn, keep_alive: bool, clean: bool) {
        if keep_alive && clean {
            self.give_back(conn);
        }
    }
}

/// Writes the prepared head and reads until a final (non-1xx) answer head is
/// in. The error comes with whether the request may be sent again.
pub(super) async fn send_and_read_head(
    stream: &mut TcpStream,
    write: &[u8],
    read: &mut BytesMut,
    may_retry: bool,
) -> Result<Head, (ExchangeError, bool)> {
    if let Err(e) = stream.write_all(write).await {
        return Err((e.into(), may_retry));
    }
    loop {
        if !read.is_empty() {
            match parse_head(read) {
                // 101 is no interim answer: it ends the exchange, and
                // `respond` refuses it (no request here asked to upgrade).
                Ok(Some(head))
                    if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                {
                    continue
                }
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e) => return Err((e, false)),
            }
        }
        read.reserve(READ_RESERVE);
        match stream.read_buf(read).await {
            Ok(0) if read.is_empty() => return Err((ExchangeError::Closed, may_retry)),
            Ok(0) => {
                return Err((
                    ExchangeError::Malformed("connection closed inside the head"),
                    false,
                ))
            }
            Ok(_) => {}
            Err(e) => return Err((e.into(), may_retry && read.is_empty())),
        }
    }
}

/// `future`, or `ResponseTimeout` once `deadline` has passed.
pub(super) async fn within<T>(
    deadline: Instant,
    future: impl Future<Output = Result<T, ExchangeError>>,
) -> Result<T, ExchangeError> {
    tokio::time::timeout_at(deadline, future)
        .await
        .unwrap_or(Err(ExchangeError::ResponseTimeout))
}

/// An idle connection has nothing to say. Any byte that came while it sat
/// in the pool would be read as the next request's answer (another user's
/// data, if a broken upstream sent a second answer late), and an end of
/// stream means the upstream closed it: either way it is not reused, as
/// nginx closes such a connection from its keep-alive read handler.
///
/// The reactor's flag is free to ask but only knows what the runtime has
/// already polled (on a busy runtime, bytes that came since its last turn
/// go unseen), so a non-blocking peek then asks the socket itself: one
/// system call per reuse.
pub(super) fn is_quiet(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    if stream.poll_read_ready(&mut cx).is_ready() {
        return false;
    }
    let mut byte = [MaybeUninit::<u8>::uninit()];
    match socket2::SockRef::from(stream).recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        // A byte, or the end of the stream.
        Ok(_) => false,
    }
}

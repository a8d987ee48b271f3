//! The upstream exchange for the common request: a GET or HEAD without a
//! body, to a plain-HTTP upstream (the sidecar case). It runs inside the
//! client connection's own task: write the head, read the answer, give the
//! connection back. hyper-util's pooled client puts a connection task, a
//! channel hand-off and a boxed future between those steps, and on a cache
//! hit that was the largest cost the gateway added over nginx. Everything
//! else (request bodies, upgrades, https upstreams) still goes through that
//! client, which streams both ways at once.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::has_token;
use crate::config::UpstreamConfig;

/// hyper's own limit on a response head is larger; 64 KiB is what nginx
/// allows with `proxy_buffer_size` raised generously.
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Space made available before each read of the upstream socket.
const READ_RESERVE: usize = 16 * 1024;
/// A chunk-size or trailer line longer than this is not HTTP.
const MAX_LINE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("cannot connect to the upstream: {0}")]
    Connect(io::Error),
    #[error("connecting to the upstream timed out")]
    ConnectTimeout,
    #[error("upstream connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection before answering")]
    Closed,
    #[error("no answer from the upstream within the response time-out")]
    ResponseTimeout,
    #[error("upstream sent a malformed response: {0}")]
    Malformed(&'static str),
}

/// One idle-connection pool per plain-HTTP upstream the routes name, built
/// once: the lookup is a comparison with one or two authorities.
pub struct DirectPools {
    pools: Vec<Arc<HostPool>>,
}

impl DirectPools {
    pub fn new<'a>(upstreams: impl IntoIterator<Item = &'a Uri>, config: &UpstreamConfig) -> DirectPools {
        let mut pools: Vec<Arc<HostPool>> = Vec::new();
        for uri in upstreams {
            if uri.scheme() != Some(&Scheme::HTTP) {
                continue;
            }
            let Some(authority) = uri.authority() else {
                continue;
            };
            if pools.iter().any(|p| &p.authority == authority) {
                continue;
            }
            pools.push(Arc::new(HostPool::new(authority.clone(), config)));
        }
        DirectPools { pools }
    }

    /// The pool that may carry `request`, if the request is one this path
    /// handles: no body, GET or HEAD (so a retry on a stale connection is
    /// safe), to a plain-HTTP upstream.
    pub fn for_request<B: http_body::Body>(&self, request: &Request<B>) -> Option<&Arc<HostPool>> {
        if !(request.method() == Method::GET || request.method() == Method::HEAD)
            || !request.body().is_end_stream()
        {
            return None;
        }
        let uri = request.uri();
        if uri.scheme() != Some(&Scheme::HTTP) {
            return None;
        }
        let authority = uri.authority()?;
        self.pools.iter().find(|p| &p.authority == authority)
    }
}

pub struct HostPool {
    authority: Authority,
    /// `host:port` with the default port filled in, for connect.
    target: String,
    idle: Mutex<Vec<Idle>>,
    /// Signalled each time a connection goes back to `idle`.
    returned: Notify,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    response_timeout: Duration,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// A connection with the buffers it keeps between requests.
struct Conn {
    stream: TcpStream,
    read: BytesMut,
    write: Vec<u8>,
    reused: bool,
    /// Bounds each wait for an answer. Kept with the connection and moved
    /// later for every request: extending a registered timer is one atomic
    /// operation, where a fresh `timeout()` per request registered and
    /// removed a timer each time (about 1,100 instructions, callgrind).
    deadline: Pin<Box<Sleep>>,
}

impl HostPool {
    fn new(authority: Authority, config: &UpstreamConfig) -> HostPool {
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

    fn idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        // A panic while holding the lock leaves a plain Vec behind: still usable.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used live connection (its buffers and the
    /// upstream's socket state are the warmest). One that heard anything
    /// while idle is closed, and the next one tried.
    fn take_idle(&self) -> Option<Conn> {
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

    fn give_back(&self, mut conn: Conn) {
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

    async fn connect(&self) -> Result<Conn, ExchangeError> {
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
    async fn checkout(&self) -> Result<Conn, ExchangeError> {
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
    async fn round_trip<B>(
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

    fn respond(
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
    fn finish(&self, conn: Conn, keep_alive: bool, clean: bool) {
        if keep_alive && clean {
            self.give_back(conn);
        }
    }
}

/// A body straight from a directly exchanged connection.
pub enum Exchanged {
    /// Complete: read with the head.
    Whole(Bytes),
    Streamed(StreamedBody),
}

/// An answer's body read off its connection as the client takes it. The
/// connection goes back to the pool when the body has been read to its end;
/// dropped part-way, it is closed.
pub struct StreamedBody {
    conn: Option<Conn>,
    pool: Arc<HostPool>,
    decoder: Decoder,
    keep_alive: bool,
}

impl http_body::Body for StreamedBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.read) {
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_done() {
                        // Back in the pool before the client has the last bytes.
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::Done) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
            }
            conn.read.reserve(READ_RESERVE);
            let read = {
                let read = pin!(conn.stream.read_buf(&mut conn.read));
                ready!(read.poll(cx))
            };
            match read {
                Ok(0) if matches!(this.decoder, Decoder::UntilClose) => {
                    this.keep_alive = false;
                    this.decoder = Decoder::Done;
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(ExchangeError::Malformed(
                        "connection closed inside the body",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl StreamedBody {
    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            let clean = conn.read.is_empty();
            self.pool.finish(conn, self.keep_alive, clean);
        }
    }
}

/// Writes the prepared head and reads until a final (non-1xx) answer head is
/// in. The error comes with whether the request may be sent again.
async fn send_and_read_head(
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
async fn within<T>(
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
fn is_quiet(stream: &TcpStream) -> bool {
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

/// `METHOD path?query HTTP/1.1`, a Host if the request has none, and the
/// request's headers as the gateway left them.
fn write_head<B>(out: &mut Vec<u8>, request: &Request<B>, authority: &Authority) {
    out.clear();
    out.extend_from_slice(request.method().as_str().as_bytes());
    out.push(b' ');
    let target = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !request.headers().contains_key(header::HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(authority.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in request.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

struct Head {
    status: StatusCode,
    headers: HeaderMap,
    http11: bool,
}

/// Takes a complete response head off the front of `buf`; `None` until one
/// is there. Header values share the read buffer's memory (no copy each).
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, ExchangeError> {
    // Offsets of each name and value in `buf`, so the parser's borrow ends
    // before the head is split off. The parser's slots start uninitialised:
    // zeroing 128 of them cost more than the parse.
    let (len, code, http11, spans) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(ExchangeError::Malformed("response head too large"))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(ExchangeError::Malformed("too many headers")),
            Err(_) => return Err(ExchangeError::Malformed("not an HTTP/1.x response head")),
        };
        let base = buf.as_ptr() as usize;
        let spans: Vec<_> = parsed
            .headers
            .iter()
            .map(|h| {
                let name = h.name.as_ptr() as usize - base;
                let value = h.value.as_ptr() as usize - base;
                (name..name + h.name.len(), value..value + h.value.len())
            })
            .collect();
        (len, parsed.code.unwrap_or(0), parsed.version == Some(1), spans)
    };
    let head = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code).map_err(|_| ExchangeError::Malformed("bad status code"))?;
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (name, value) in spans {
        let name =
            HeaderName::from_bytes(&head[name]).map_err(|_| ExchangeError::Malformed("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value))
            .map_err(|_| ExchangeError::Malformed("bad header value"))?;
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        headers,
        http11,
    }))
}

enum Framing {
    /// No body whatever the headers say (HEAD, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

impl Framing {
    fn is_until_close(&self) -> bool {
        matches!(self, Framing::UntilClose)
    }
}

/// How the body is delimited (RFC 9112 §6.3). With Transfer-Encoding the
/// Content-Length is dropped: passing both on is how requests get smuggled.
fn framing(
    to_head_request: bool,
    status: StatusCode,
    headers: &mut HeaderMap,
) -> Result<Framing, ExchangeError> {
    if to_head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            // An unreadable coding counts as one that is not chunked.
            .map(|v| v.to_str().unwrap_or("?"))
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty());
        return Ok(match last {
            Some(coding) if coding.eq_ignore_ascii_case("chunked") => Framing::Chunked,
            _ => Framing::UntilClose,
        });
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(ExchangeError::Malformed("bad Content-Length"));
            }
            let n: u64 = std::str::from_utf8(part)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(ExchangeError::Malformed("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(ExchangeError::Malformed("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

enum Decoder {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer fields after the last chunk: read and dropped.
    Trailers,
}

enum Decoded {
    Data(Bytes),
    NeedMore,
    Done,
}

impl Decoder {
    fn is_done(&self) -> bool {
        matches!(self, Decoder::Done | Decoder::Length(0))
    }

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ExchangeError> {
        loop {
            match self {
                Decoder::Done | Decoder::Length(0) => {
                    *self = Decoder::Done;
                    return Ok(Decoded::Done);
                }
                Decoder::Length(remaining) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let data = take_counted(remaining, buf);
                    if *remaining == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Decoded::Data(data));
                }
                Decoder::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                Decoder::Chunked(state) => match state {
                    Chunk::Size => {
                        let Some(size) = take_chunk_size(buf)? else {
                            return Ok(Decoded::NeedMore);
                        };
                        *state = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(remaining) => {
                        if buf.is_empty() {
                            return Ok(Decoded::NeedMore);
                        }
                        let data = take_counted(remaining, buf);
                        if *remaining == 0 {
                            *state = Chunk::DataEnd;
                        }
                        return Ok(Decoded::Data(data));
                    }
                    Chunk::DataEnd => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(Decoded::NeedMore);
                        };
                        if !line.is_empty() {
                            return Err(ExchangeError::Malformed("chunk data longer than its size"));
                        }
                        *state = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(Decoded::NeedMore);
                        };
                        if line.is_empty() {
                            *self = Decoder::Done;
                        }
                    }
                },
            }
        }
    }
}

/// Up to `remaining` bytes off the front of `buf`, counted off `remaining`.
fn take_counted(remaining: &mut u64, buf: &mut BytesMut) -> Bytes {
    let take = (*remaining).min(buf.len() as u64);
    *remaining -= take;
    buf.split_to(take as usize).freeze()
}

/// One line off the front of `buf`, without its CRLF (or bare LF).
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, ExchangeError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(ExchangeError::Malformed("chunk line too long")),
        None => Ok(None),
    }
}

/// A chunk-size line (hexadecimal size, any `;extension`, CRLF) off the
/// front of `buf`, parsed by httparse; `None` until the line is complete.
fn take_chunk_size(buf: &mut BytesMut) -> Result<Option<u64>, ExchangeError> {
    const BAD: ExchangeError = ExchangeError::Malformed("bad chunk size");
    // httparse reads an empty size as 0, the last chunk: a size has digits.
    if buf.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
        return Err(BAD);
    }
    match httparse::parse_chunk_size(buf) {
        Ok(httparse::Status::Complete((len, size))) => {
            // httparse takes a bare LF inside an extension as part of it;
            // any other reader ends the line there.
            if buf[..len - 2].contains(&b'\n') {
                return Err(BAD);
            }
            buf.advance(len);
            Ok(Some(size))
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_LINE => {
            Err(ExchangeError::Malformed("chunk line too long"))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::InvalidChunkSize) => Err(BAD),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(decoder: &mut Decoder, input: &[u8]) -> Result<(Vec<u8>, bool), ExchangeError> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        // Byte by byte: every state must cope with input cut anywhere.
        for &b in input {
            buf.extend_from_slice(&[b]);
            loop {
                match decoder.decode(&mut buf)? {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::NeedMore => break,
                    Decoded::Done => return Ok((out, true)),
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let mut d = Decoder::Chunked(Chunk::Size);
        let (body, done) = decode_all(
            &mut d,
            b"5;ext=1\r\nhello\r\nA\r\n, world!!!\r\n0\r\nx-trailer: 1\r\n\r\n",
        )
        .unwrap();
        assert_eq!(body, b"hello, world!!!");
        assert!(done);
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for bad in [&b"zz\r\n"[..], b"5\r\nhelloX\r\n", b"10000000000000000\r\n"] {
            let mut d = Decoder::Chunked(Chunk::Size);
            assert!(
                decode_all(&mut d, bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn chunk_size_lines_are_read_by_httparse() {
        let size = |line: &[u8]| take_chunk_size(&mut BytesMut::from(line));
        assert_eq!(size(b"1a;name=\"v\" \r\nrest").unwrap(), Some(26));
        assert_eq!(size(b"FFFF\r\n").unwrap(), Some(0xffff));
        assert_eq!(size(b"0\r\n").unwrap(), Some(0));
        assert_eq!(size(b"1a;name").unwrap(), None, "a partial line waits");
        for bad in [
            &b"\r\n"[..],
            b";ext\r\n",
            b" 5\r\n",
            b"5;a\nb\r\n",
            b"5\n",
            b"-5\r\n",
        ] {
            assert!(size(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut long = BytesMut::from(&b"5;"[..]);
        long.extend_from_slice(&[b'x'; MAX_LINE]);
        assert!(take_chunk_size(&mut long).is_err(), "an endless extension");
        let mut buf = BytesMut::from(&b"5;x=1\r\nhello"[..]);
        assert_eq!(take_chunk_size(&mut buf).unwrap(), Some(5));
        assert_eq!(&buf[..], b"hello", "the line and only the line is taken");
    }

    /// The check at reuse asks the socket, not only the reactor: here the
    /// runtime does not turn between the upstream's byte (or close) and the
    /// check, as on a busy gateway.
    #[tokio::test]
    async fn idle_connections_that_heard_anything_are_not_reused() {
        use std::io::Write;
        for what in ["nothing", "a byte", "an end of stream"] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
            let pool = HostPool::new(authority, &UpstreamConfig::default());
            let conn = pool.connect().await.unwrap();
            let (mut upstream, _) = listener.accept().unwrap();
            pool.give_back(conn);
            match what {
                "a byte" => upstream.write_all(b"H").unwrap(),
                "an end of stream" => upstream.shutdown(std::net::Shutdown::Write).unwrap(),
                _ => {}
            }
            // Blocks the runtime's only thread: no reactor turn meanwhile.
            std::thread::sleep(Duration::from_millis(50));
            let reused = pool.take_idle().is_some();
            assert_eq!(reused, what == "nothing", "idle connection that heard {what}");
            assert!(pool.idle().is_empty());
        }
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let mut d = Decoder::Length(5);
        let (body, done) = decode_all(&mut d, b"hello").unwrap();
        assert_eq!((body.as_slice(), done), (&b"hello"[..], true));
        assert!(d.is_done());
    }

    fn head(raw: &[u8]) -> Result<Option<Head>, ExchangeError> {
        parse_head(&mut BytesMut::from(raw))
    }

    #[test]
    fn heads_parse_and_keep_their_headers() {
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: 1\r\nX-A: 2\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!(h.status, StatusCode::OK);
        assert!(h.http11);
        assert_eq!(h.headers.get_all("x-a").iter().count(), 2);
        assert!(head(b"HTTP/1.1 200 OK\r\nContent-").unwrap().is_none());
        assert!(head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        assert!(matches!(
            framing(false, StatusCode::OK, &mut h),
            Ok(Framing::Length(12))
        ));
        assert!(matches!(
            framing(true, StatusCode::OK, &mut h),
            Ok(Framing::Empty)
        ));
        assert!(matches!(
            framing(false, StatusCode::NOT_MODIFIED, &mut h),
            Ok(Framing::Empty)
        ));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12, 13"));
        assert!(framing(false, StatusCode::OK, &mut h).is_err());
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("-1"));
        assert!(framing(false, StatusCode::OK, &mut h).is_err());
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("gzip, chunked"),
        );
        assert!(matches!(
            framing(false, StatusCode::OK, &mut h),
            Ok(Framing::Chunked)
        ));
        assert!(
            !h.contains_key(header::CONTENT_LENGTH),
            "Content-Length dropped beside Transfer-Encoding"
        );
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        assert!(matches!(
            framing(false, StatusCode::OK, &mut h),
            Ok(Framing::UntilClose)
        ));
        assert!(matches!(
            framing(false, StatusCode::OK, &mut HeaderMap::new()),
            Ok(Framing::UntilClose)
        ));
    }

    #[test]
    fn request_heads_carry_target_host_and_headers() {
        let request = Request::get("http://up.internal:3000/api/x?y=1")
            .header("x-grafana-user", "alice")
            .body(())
            .unwrap();
        let mut out = Vec::new();
        write_head(&mut out, &request, &"up.internal:3000".parse().unwrap());
        assert_eq!(
            out,
            b"GET /api/x?y=1 HTTP/1.1\r\nhost: up.internal:3000\r\nx-grafana-user: alice\r\n\r\n"
        );
    }
}

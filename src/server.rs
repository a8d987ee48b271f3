//! The TLS listener: accept, connection limit, handshake and idle time-outs,
//! HTTP/1.1 + HTTP/2 via hyper-util, graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use futures_util::FutureExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::ServerConfig;
use crate::gateway::Gateway;

/// A cloneable "stop now" signal (mini-redis' shutdown, on a watch channel).
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    pub async fn wait(&mut self) {
        // A dropped sender also means stop.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// Time from the handshake to the first complete request head. hyper's
    /// `header_read_timeout` only runs once HTTP/1 has been recognised: a
    /// client that sends nothing (or a partial HTTP/2 preface) after the
    /// handshake would otherwise hold a slot until `idle_timeout`.
    pub first_request_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
}

pub struct TlsServer {
    pub gateway: Arc<Gateway>,
    pub acceptor: TlsAcceptor,
    pub limits: Limits,
    pub http: auto::Builder<TokioExecutor>,
}

pub fn http_builder(config: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.max_header_bytes.min(u32::MAX as usize) as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

impl TlsServer {
    /// Serves until `shutdown`, then lets open connections finish their
    /// requests for up to the grace period.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: Shutdown) {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let mut stop = shutdown.clone();
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                _ = stop.wait() => break,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                self.gateway
                    .metrics
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                drop(tcp);
                continue;
            };
            let server = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                server
                    .gateway
                    .metrics
                    .connections_open
                    .fetch_add(1, Ordering::Relaxed);
                server.connection(tcp, peer, shutdown).await;
                server
                    .gateway
                    .metrics
                    .connections_open
                    .fetch_sub(1, Ordering::Relaxed);
                drop(slot);
            });
        }
        drop(listener);
        // Every connection holds a slot: all slots back means all done.
        let all = u32::try_from(self.limits.max_connections).unwrap_or(u32::MAX);
        if tokio::time::timeout(self.limits.shutdown_grace, slots.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over with connections still open");
        }
    }

    async fn connection(&self, tcp: TcpStream, peer: SocketAddr, mut shutdown: Shutdown) {
        let _ = tcp.set_nodelay(true);
        let tls = match tokio::time::timeout(self.limits.handshake_timeout, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Tracked {
            inner: tls,
            activity: activity.clone(),
        });
        let gateway = self.gateway.clone();
        let in_service = activity.clone();
        let client = Arc::new(gateway.peer(peer));
        let service = service_fn(move |request| {
            let gateway = gateway.clone();
            let activity = in_service.clone();
            let client = client.clone();
            async move {
                let _busy = activity.busy();
                Ok::<_, Infallible>(gateway.handle(request, &client).await)
            }
        });
        let mut conn = pin!(self.http.serve_connection_with_upgrades(io, service));
        let mut closing = false;
        let mut awaiting_first = true;
        // Each of these fires once at most, while the connection wakes this
        // task about twice per request: gated, they are polled only after
        // their own waker fired.
        let first_request = pin!(tokio::time::sleep(self.limits.first_request_timeout));
        let stop = pin!(shutdown.wait());
        let idle = pin!(activity.idle_for(self.limits.idle_timeout));
        let (mut first_request, mut stop, mut idle) =
            (Gated::new(first_request), Gated::new(stop), Gated::new(idle));
        loop {
            tokio::select! {
                // The connection first: it is what wakes this task nearly
                // every time, and a fixed order saves a random draw per wake.
                biased;
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                // A guard is read when `select!` starts, not when the timer
                // fires: check again, or a busy connection is cut mid-request.
                _ = &mut first_request, if awaiting_first && !closing => {
                    awaiting_first = false;
                    if !activity.any_request() {
                        tracing::debug!(%peer, "no request head in time; closing");
                        return;
                    }
                }
                _ = &mut stop, if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = &mut idle, if !closing => {
                    tracing::debug!(%peer, "closing idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// A future polled only once its own waker has fired (and on its first
/// poll). Polling a timer or a watch that has not fired still costs its
/// registration checks, and `select!` polls every branch on every wake.
struct Gated<F> {
    inner: F,
    signal: Arc<Signal>,
    waker: Waker,
}

/// Set by the inner future's waker, which then wakes the task that polled.
struct Signal {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future + Unpin> Gated<F> {
    fn new(inner: F) -> Gated<F> {
        let signal = Arc::new(Signal {
            fired: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Gated {
            inner,
            waker: Waker::from(signal.clone()),
            signal,
        }
    }
}

impl<F: Future + Unpin> Future for Gated<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before the flag is read: a wake in between is not lost.
        self.signal.task.register(cx.waker());
        if !self.signal.fired.swap(false, Ordering::Acquire) {
            return Poll::Pending;
        }
        let this = &mut *self;
        this.inner.poll_unpin(&mut Context::from_waker(&this.waker))
    }
}

/// I/O seen on a connection and requests being handled on it. Reads and
/// writes only bump a counter: reading the clock on every one cost more than
/// the idle check it serves.
struct Activity {
    io_events: AtomicU64,
    busy: AtomicUsize,
    requests: AtomicU64,
}

struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    fn new() -> Activity {
        Activity {
            io_events: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.io_events.fetch_add(1, Ordering::Relaxed);
    }

    fn busy(&self) -> Busy<'_> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(&self.busy)
    }

    fn any_request(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > 0
    }

    /// Resolves once the connection saw no I/O for `limit` and no request is
    /// being handled (a slow upstream is not the client's idleness).
    async fn idle_for(&self, limit: Duration) {
        // Sampled a few times per period: closes between `limit` and
        // `limit + step` after the last I/O.
        let step = (limit / 4).max(Duration::from_millis(100));
        let mut seen = self.io_events.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        loop {
            tokio::time::sleep(step).await;
            let now = self.io_events.load(Ordering::Relaxed);
            if now != seen || self.busy.load(Ordering::Relaxed) > 0 {
                seen = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= limit {
                return;
            }
        }
    }
}

/// The TLS stream, noting each successful read or write.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts how often the inner future is polled.
    struct Counted<F> {
        inner: F,
        polls: Arc<AtomicUsize>,
    }

    impl<F: Future + Unpin> Future for Counted<F> {
        type Output = F::Output;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            self.inner.poll_unpin(cx)
        }
    }

    #[tokio::test]
    async fn gated_future_is_polled_only_after_its_own_wake() {
        let polls = Arc::new(AtomicUsize::new(0));
        let timer = pin!(tokio::time::sleep(Duration::from_millis(50)));
        let mut gated = Gated::new(Counted {
            inner: timer,
            polls: polls.clone(),
        });
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        // The task woke for something else: the timer is not asked again.
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        // Its own wake (the timer firing) lets the poll through.
        (&mut gated).await;
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}

//! The TLS listener: accept, connection limit, handshake and idle time-outs,
//! HTTP/1.1 + HTTP/2 via hyper-util, graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::config::ServerConfig;
use crate::gateway::Gateway;
use crate::shutdown::Shutdown;

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
        // Twice the limit: a head past the limit but within this reaches the
        // gateway, which answers 431 in JSON (hyper's own 431 has no body).
        .max_buf_size(config.max_header_bytes.saturating_mul(2).max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.max_header_bytes.saturating_mul(2).min(u32::MAX as usize) as u32)
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
        let io = TokioIo::new(tls);
        let gateway = self.gateway.clone();
        let in_service = activity.clone();
        let client = Arc::new(gateway.peer(peer));
        let service = service_fn(move |request| {
            let gateway = gateway.clone();
            let activity = in_service.clone();
            let client = client.clone();
            async move {
                // Held until the response body has been sent: a long
                // download is not an idle connection.
                let busy = Busy::new(activity);
                let response = gateway.handle(request, &client).await;
                Ok::<_, Infallible>(response.map(|body| BusyBody { body, _busy: busy }))
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

/// Requests started on a connection and requests (with their response
/// bodies) still under way. Idleness is measured in requests, not bytes: an
/// HTTP/2 client that only sends PINGs is idle.
struct Activity {
    busy: AtomicUsize,
    requests: AtomicU64,
}

/// One request under way, from its head to the end of its response body.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: Arc<Activity>) -> Busy {
        activity.requests.fetch_add(1, Ordering::Relaxed);
        activity.busy.fetch_add(1, Ordering::Relaxed);
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted as under way.
struct BusyBody<B> {
    body: B,
    _busy: Busy,
}

impl<B: http_body::Body + Unpin> http_body::Body for BusyBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Activity {
    fn new() -> Activity {
        Activity {
            busy: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
        }
    }

    fn any_request(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > 0
    }

    /// Resolves once no request was started for `limit` and none is under
    /// way (a slow upstream or a long download is not the client's idleness).
    async fn idle_for(&self, limit: Duration) {
        // Sampled a few times per period: closes between `limit` and
        // `limit + step` after the last request ended.
        let step = (limit / 4).max(Duration::from_millis(100));
        let mut seen = self.requests.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        loop {
            tokio::time::sleep(step).await;
            let now = self.requests.load(Ordering::Relaxed);
            if now != seen || self.busy.load(Ordering::Relaxed) > 0 {
                seen = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= limit {
                return;
            }
        }
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

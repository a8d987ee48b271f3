//! Forwarding: header hygiene, the upstream call with its time-outs, WebSocket
//! upgrades. Bodies stream both ways; nothing here buffers a body. The common
//! bodyless GET/HEAD to a plain-HTTP upstream takes [`exchange`], in the
//! request's own task; the rest takes hyper's pooled client.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;

pub mod exchange;

use self::exchange::{DirectPools, ExchangeError, Exchanged, StreamedBody};
use crate::config::{ConfigError, UpstreamConfig};
use crate::http::error_chain;
use crate::upstream::{self, Connector};

/// What every response of the gateway carries.
pub enum Body {
    /// Streamed from hyper's pooled client.
    Pooled(Incoming),
    /// Streamed off a directly exchanged upstream connection.
    Direct(StreamedBody),
    /// Complete in memory: the gateway's own answers, and small upstream
    /// bodies that arrived with their head.
    Whole(Full<Bytes>),
}

impl Body {
    pub fn whole(bytes: impl Into<Bytes>) -> Body {
        Body::Whole(Full::new(bytes.into()))
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Body {
        Body::whole(bytes)
    }
}

/// What every request the gateway forwards carries: the client's body as it
/// streams in, or one the gateway had to read first (a login form, whose
/// password the lock-out shield weighs before Grafana sees it).
pub enum RequestBody {
    Streamed(Incoming),
    Read(Full<Bytes>),
    /// Streamed, noting in the flag when the client's side fails.
    Watched(Incoming, Arc<AtomicBool>),
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // Both variants are Unpin.
        match self.get_mut() {
            RequestBody::Streamed(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Read(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            RequestBody::Watched(b, failed) => {
                let frame = Pin::new(b).poll_frame(cx);
                if matches!(frame, Poll::Ready(Some(Err(_)))) {
                    failed.store(true, Ordering::Relaxed);
                }
                frame
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streamed(b) | RequestBody::Watched(b, _) => b.is_end_stream(),
            RequestBody::Read(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streamed(b) | RequestBody::Watched(b, _) => b.size_hint(),
            RequestBody::Read(b) => b.size_hint(),
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // Every variant is Unpin.
        match self.get_mut() {
            Body::Pooled(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Body::Direct(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Body::Whole(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Pooled(b) => b.is_end_stream(),
            Body::Direct(b) => b.is_end_stream(),
            Body::Whole(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Pooled(b) => b.size_hint(),
            Body::Direct(b) => b.size_hint(),
            Body::Whole(b) => b.size_hint(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("upstream unreachable")]
    Unreachable(String),
    #[error("upstream sent an invalid response")]
    InvalidResponse(String),
    #[error("upstream did not answer in time")]
    Timeout,
    /// The client's own request body broke off or was malformed while it
    /// was being forwarded: the client's fault, not the upstream's.
    #[error("request body from the client broke off or was malformed")]
    ClientBody,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unreachable(_) | ProxyError::InvalidResponse(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientBody => StatusCode::BAD_REQUEST,
        }
    }
}

/// Connection-level headers (RFC 9110 §7.6.1) that must not cross a proxy,
/// `Upgrade` last (an upgrade keeps it).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
const UPGRADE_BIT: u16 = 1 << 8;

/// The bit of `name` in `HOP_BY_HOP`. Asked of every header of every request
/// and response: one `match` on the lower-case name (a length switch, then
/// one comparison). Searching the table instead cost 1.2k more instructions
/// per request (callgrind); a test keeps the two lists in step.
fn hop_by_hop_bit(name: &HeaderName) -> u16 {
    match name.as_str() {
        "connection" => 1,
        "keep-alive" => 1 << 1,
        "proxy-connection" => 1 << 2,
        "proxy-authenticate" => 1 << 3,
        "proxy-authorization" => 1 << 4,
        "te" => 1 << 5,
        "trailer" => 1 << 6,
        "transfer-encoding" => 1 << 7,
        "upgrade" => UPGRADE_BIT,
        _ => 0,
    }
}

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers and those the `Connection` header names. An
/// upgrade keeps `Connection: upgrade` and `Upgrade`, which the next hop needs.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names present, instead of hashing every name that
    // might be: most messages carry none, or only `Connection: keep-alive`.
    let mut present = headers
        .keys()
        .fold(0u16, |bits, name| bits | hop_by_hop_bit(name));
    if keep_upgrade {
        present &= !UPGRADE_BIT;
    }
    if present & 1 != 0 {
        let named: Vec<HeaderName> = header_tokens(headers, header::CONNECTION)
            // Options, not header names (keep-alive is hop-by-hop anyway).
            .filter(|token| {
                !["close", "keep-alive", "upgrade"]
                    .iter()
                    .any(|o| token.eq_ignore_ascii_case(o))
            })
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (bit, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << bit) != 0 {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

pub fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && has_token(request.headers(), header::CONNECTION, "upgrade")
}

/// The comma-separated tokens of every line of a list header (RFC 9110
/// §5.6.1), trimmed; empty elements and unreadable lines are skipped.
pub fn header_tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether a list header carries `token`, in any case.
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    header_tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// Who may tell us about the original client.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies(nets)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// The client at the other end of a connection, worked out once per
/// connection rather than on each of its requests.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// A trusted proxy: its forwarding headers are believed and extended.
    pub trusted: bool,
    /// The address as `X-Forwarded-For` spells it.
    ip_header: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr, trusted: &TrustedProxies) -> Peer {
        let ip_header = HeaderValue::try_from(addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Peer {
            addr,
            trusted: trusted.contains(addr.ip()),
            ip_header,
        }
    }
}

/// Sets `X-Forwarded-For/-Proto/-Host`. The client's own copies were already
/// removed unless the peer is a trusted proxy, in which case the chain grows.
pub fn set_forwarded(headers: &mut HeaderMap, peer: &Peer, host: Option<&HeaderValue>) {
    // Several header lines are one comma-separated list (RFC 9110 §5.3): keep
    // every hop the trusted proxy reported, in order, not just the first line.
    let chain = if peer.trusted && headers.contains_key(&X_FORWARDED_FOR) {
        let mut hops: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        let peer_ip = peer.addr.ip().to_string();
        hops.push(&peer_ip);
        HeaderValue::from_str(&hops.join(", ")).ok()
    } else {
        None
    };
    headers.insert(X_FORWARDED_FOR, chain.unwrap_or_else(|| peer.ip_header.clone()));
    if !(peer.trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    }
    if !(peer.trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        if let Some(host) = host {
            headers.insert(X_FORWARDED_HOST, host.clone());
        }
    }
}

/// The client half of the proxy. Bodyless GET and HEAD requests to a
/// plain-HTTP upstream are exchanged directly on a pooled connection inside
/// the request's own task; everything else goes through hyper's pooled
/// client, which streams a request body and its answer at the same time.
pub struct Forwarder {
    client: Client<Connector, RequestBody>,
    direct: DirectPools,
    response_timeout: Duration,
}

impl Forwarder {
    /// `upstreams`: every upstream a request may be sent to.
    pub fn new<'a>(
        config: &UpstreamConfig,
        upstreams: impl IntoIterator<Item = &'a Uri>,
    ) -> Result<Forwarder, ConfigError> {
        Ok(Forwarder {
            client: upstream::client(config, upstream::connector(config)?),
            // Switched off, no pool is built and every request takes the client.
            direct: DirectPools::new(upstreams.into_iter().filter(|_| config.direct_exchange), config),
            response_timeout: config.response_timeout,
        })
    }

    /// Sends `request` (already cleaned, with its final URI) and returns the
    /// upstream's response, streaming. `client_upgrade` is the client side of
    /// a WebSocket upgrade, joined to the upstream's on `101`.
    pub async fn forward(
        &self,
        request: Request<RequestBody>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<Body>, ProxyError> {
        if client_upgrade.is_none() {
            if let Some(pool) = self.direct.for_request(&request) {
                // The pool keeps the response time-out itself (a timer per
                // connection, not one per request).
                let mut response = match pool.exchange(&request).await {
                    Err(ExchangeError::ConnectTimeout | ExchangeError::ResponseTimeout) => {
                        return Err(ProxyError::Timeout)
                    }
                    Err(e @ ExchangeError::Malformed(_)) => {
                        return Err(ProxyError::InvalidResponse(e.to_string()))
                    }
                    Err(e) => return Err(ProxyError::Unreachable(e.to_string())),
                    Ok(response) => response,
                };
                strip_hop_by_hop(response.headers_mut(), false);
                return Ok(response.map(|body| match body {
                    Exchanged::Whole(bytes) => Body::whole(bytes),
                    Exchanged::Streamed(body) => Body::Direct(body),
                }));
            }
        }
        Box::pin(self.forward_pooled(request, client_upgrade)).await
    }

    /// Through hyper's pooled client: requests with bodies, upgrades, https.
    async fn forward_pooled(
        &self,
        mut request: Request<RequestBody>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<Body>, ProxyError> {
        let upgrading = client_upgrade.is_some();
        *request.version_mut() = Version::HTTP_11;
        // A body still to come is watched: if it fails, the client is told
        // so (400), not that the upstream is unreachable.
        let client_body_failed = Arc::new(AtomicBool::new(false));
        let request = request.map(|body| match body {
            RequestBody::Streamed(b) if !http_body::Body::is_end_stream(&b) => {
                RequestBody::Watched(b, client_body_failed.clone())
            }
            other => other,
        });
        let mut response = match tokio::time::timeout(self.response_timeout, self.client.request(request))
            .await
        {
            Err(_) => return Err(ProxyError::Timeout),
            Ok(Err(_)) if client_body_failed.load(Ordering::Relaxed) => return Err(ProxyError::ClientBody),
            Ok(Err(e)) => {
                let chain = error_chain(&e);
                return Err(
                    if ["timed out", "timeout", "deadline has elapsed"]
                        .iter()
                        .any(|t| chain.contains(t))
                    {
                        ProxyError::Timeout
                    } else if is_parse_error(&e) {
                        // As the direct exchange says of what it cannot parse.
                        ProxyError::InvalidResponse(chain)
                    } else {
                        ProxyError::Unreachable(chain)
                    },
                );
            }
            Ok(Ok(response)) => response,
        };
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching && !upgrading {
            // hyper hands it over as an upgrade; no request here asked for one.
            return Err(ProxyError::InvalidResponse(
                "101 to a request that asked for no upgrade".into(),
            ));
        }
        // hyper decodes a chunked body and keeps a Content-Length sent beside
        // it; passed on, that length would cut the body short for the client
        // (RFC 9112 §6.3: Transfer-Encoding wins, and the length goes).
        if response.headers().contains_key(header::TRANSFER_ENCODING) {
            response.headers_mut().remove(header::CONTENT_LENGTH);
        }
        if let (true, Some(client_side)) = (switching, client_upgrade) {
            let upstream_side = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                match tokio::try_join!(client_side, upstream_side) {
                    Ok((client, upstream)) => {
                        let mut client = TokioIo::new(client);
                        let mut upstream = TokioIo::new(upstream);
                        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                            tracing::debug!(error = %e, "upgraded connection ended");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
                }
            });
        }
        strip_hop_by_hop(response.headers_mut(), upgrading && switching);
        Ok(response.map(Body::Pooled))
    }
}

/// Whether hyper's client failed on what the upstream sent (a response it
/// could not parse) rather than on reaching it.
fn is_parse_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// `base` (scheme and authority of the upstream) joined with a path and query.
pub fn upstream_uri(base: &Uri, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
    let mut path_and_query = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
    path_and_query.push_str(path);
    if let Some(q) = query {
        path_and_query.push('?');
        path_and_query.push_str(q);
    }
    let mut parts = http::uri::Parts::default();
    parts.scheme = base.scheme().cloned();
    parts.authority = base.authority().cloned();
    // From the String itself: no second copy.
    parts.path_and_query = Some(http::uri::PathAndQuery::try_from(path_and_query)?);
    Ok(Uri::from_parts(parts)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_bits_follow_the_table() {
        for (place, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_bit(name), 1 << place, "{name}");
        }
        assert_eq!(hop_by_hop_bit(&header::UPGRADE), UPGRADE_BIT);
        assert_eq!(hop_by_hop_bit(&header::HOST), 0);
        assert_eq!(hop_by_hop_bit(&HeaderName::from_static("x-te")), 0);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));

        let upgrade = || {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade, x-hop"));
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert("x-hop", HeaderValue::from_static("1"));
            h
        };
        let mut h = upgrade();
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
        let mut h = upgrade();
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 2);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn forwarded_headers_from_untrusted_and_trusted_peers() {
        let peer: SocketAddr = "10.0.0.9:5555".parse().unwrap();
        let trusted_peer = Peer::new(peer, &TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]));
        let untrusted_peer = Peer::new(peer, &TrustedProxies::default());
        assert!(trusted_peer.trusted && !untrusted_peer.trusted);
        let host = HeaderValue::from_static("gw.example");
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        set_forwarded(&mut h, &trusted_peer, Some(&host));
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4, 10.0.0.9");
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, &untrusted_peer, Some(&host));
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.9");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "gw.example");
        let trusted = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        assert!(trusted.contains("10.1.2.3".parse().unwrap()));
        assert!(trusted.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!trusted.contains("11.0.0.1".parse().unwrap()));
    }

    #[test]
    fn uri_join() {
        let base: Uri = "http://127.0.0.1:3000".parse().unwrap();
        assert_eq!(
            upstream_uri(&base, "/a%20b", Some("x=1")).unwrap().to_string(),
            "http://127.0.0.1:3000/a%20b?x=1"
        );
    }
}

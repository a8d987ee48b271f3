//! Connections to upstreams, shared by the forwarder and the Grafana verifier:
//! one connector (http and https, pooled keep-alive) built from `[upstream]`.

use std::sync::Arc;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::{ConfigError, UpstreamConfig};

pub type Connector = HttpsConnector<HttpConnector>;

pub fn connector(config: &UpstreamConfig) -> Result<Connector, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Key {
            key: "upstream".into(),
            reason: e.to_string(),
        })?;
    let tls = if config.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &config.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| ConfigError::Key {
                    key: "upstream.ca_file".into(),
                    reason: format!("cannot read {}: {e}", path.display()),
                })?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.map_err(|e| ConfigError::Key {
                        key: "upstream.ca_file".into(),
                        reason: format!("not a PEM certificate bundle: {e}"),
                    })?;
                    roots.add(cert).map_err(|e| ConfigError::Key {
                        key: "upstream.ca_file".into(),
                        reason: e.to_string(),
                    })?;
                }
                if roots.is_empty() {
                    return Err(ConfigError::Key {
                        key: "upstream.ca_file".into(),
                        reason: "holds no certificate".into(),
                    });
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.connect_timeout));
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));
    // HTTP/1.1 only towards the upstream: WebSocket upgrades need it, and
    // Grafana behind a sidecar speaks it on loopback anyway.
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

pub fn client<B>(config: &UpstreamConfig, connector: Connector) -> Client<Connector, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(config.pool_idle_timeout)
        .pool_max_idle_per_host(config.pool_max_idle_per_host)
        .build(connector)
}

/// `upstream.insecure = true`: encryption without authentication of the peer.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The forwarder's keep-alive pool: HTTP/1.1 connections driven by hyper's
/// connection API. Leaner per request than hyper-util's general client (no
/// per-request task to watch for idleness, no connector clone, no hashing):
/// a connection goes back to the pool when its response body has ended.
pub struct Pool {
    connector: Connector,
    idle: std::sync::Mutex<Vec<IdleConnection>>,
    max_idle_per_upstream: usize,
    idle_timeout: std::time::Duration,
}

struct IdleConnection {
    upstream: Upstream,
    sender: hyper::client::conn::http1::SendRequest<hyper::body::Incoming>,
    since: std::time::Instant,
}

/// Scheme and authority: what makes two connections interchangeable.
#[derive(Clone, PartialEq, Eq)]
struct Upstream {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("request has no scheme or authority")]
    NoAuthority,
    #[error("connect: {0}")]
    Connect(String),
    #[error("{0}")]
    Send(String),
}

impl Pool {
    pub fn new(config: &UpstreamConfig) -> Result<Arc<Pool>, ConfigError> {
        Ok(Arc::new(Pool {
            connector: connector(config)?,
            idle: std::sync::Mutex::new(Vec::new()),
            max_idle_per_upstream: config.pool_max_idle_per_host,
            idle_timeout: config.pool_idle_timeout,
        }))
    }

    /// Sends `request`, whose URI is absolute (it names the upstream); the
    /// request line carries only its path and query. A pooled connection that
    /// turns out to be closed before the request was written is replaced once.
    pub async fn send(
        self: &Arc<Self>,
        mut request: http::Request<hyper::body::Incoming>,
    ) -> Result<http::Response<PooledBody>, PoolError> {
        let uri = request.uri().clone();
        let upstream = Upstream {
            scheme: uri.scheme().cloned().ok_or(PoolError::NoAuthority)?,
            authority: uri.authority().cloned().ok_or(PoolError::NoAuthority)?,
        };
        if !request.headers().contains_key(http::header::HOST) {
            if let Ok(host) = http::HeaderValue::from_str(upstream.authority.as_str()) {
                request.headers_mut().insert(http::header::HOST, host);
            }
        }
        let origin_form = uri.path_and_query().map_or("/", |pq| pq.as_str());
        *request.uri_mut() = origin_form
            .parse()
            .map_err(|e: http::uri::InvalidUri| PoolError::Send(e.to_string()))?;

        let mut fresh = false;
        loop {
            let mut sender = match self.checkout(&upstream).await {
                Some(sender) => sender,
                None => {
                    fresh = true;
                    self.connect(&uri).await?
                }
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    return Ok(response.map(|body| PooledBody {
                        inner: body,
                        home: Some(Home {
                            pool: self.clone(),
                            upstream,
                            sender,
                        }),
                    }))
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the pooled connection had gone stale.
                    Some(unsent) if !fresh => request = unsent,
                    _ => return Err(PoolError::Send(crate::auth::grafana::error_chain(e.error()))),
                },
            }
        }
    }

    async fn checkout(
        &self,
        upstream: &Upstream,
    ) -> Option<hyper::client::conn::http1::SendRequest<hyper::body::Incoming>> {
        loop {
            let mut candidate = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                let now = std::time::Instant::now();
                idle.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < self.idle_timeout);
                let at = idle.iter().rposition(|c| &c.upstream == upstream)?;
                idle.swap_remove(at).sender
            };
            // Just handed back: its connection task may not have noticed the
            // end of the last response yet.
            if candidate.is_ready() || candidate.ready().await.is_ok() {
                return Some(candidate);
            }
        }
    }

    async fn connect(
        &self,
        uri: &http::Uri,
    ) -> Result<hyper::client::conn::http1::SendRequest<hyper::body::Incoming>, PoolError> {
        use tower_service::Service;
        let io = self
            .connector
            .clone()
            .call(uri.clone())
            .await
            .map_err(|e| PoolError::Connect(crate::auth::grafana::error_chain(e.as_ref())))?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| PoolError::Connect(crate::auth::grafana::error_chain(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn give_back(
        &self,
        upstream: Upstream,
        sender: hyper::client::conn::http1::SendRequest<hyper::body::Incoming>,
    ) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.iter().filter(|c| c.upstream == upstream).count() < self.max_idle_per_upstream {
            idle.push(IdleConnection {
                upstream,
                sender,
                since: std::time::Instant::now(),
            });
        }
    }
}

/// Where a response's connection returns once the body has ended.
struct Home {
    pool: Arc<Pool>,
    upstream: Upstream,
    sender: hyper::client::conn::http1::SendRequest<hyper::body::Incoming>,
}

/// An upstream response body that returns its connection to the pool when it
/// ends; dropped early, the connection is closed with it.
pub struct PooledBody {
    inner: hyper::body::Incoming,
    home: Option<Home>,
}

impl PooledBody {
    /// The connection now belongs to an upgrade (WebSocket): never reused.
    pub fn detach(&mut self) {
        self.home = None;
    }

    fn go_home(&mut self) {
        if let Some(home) = self.home.take() {
            home.pool.give_back(home.upstream, home.sender);
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => self.go_home(),
            std::task::Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.go_home(),
            std::task::Poll::Ready(Some(Err(_))) => self.home = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Bodies that were empty from the start (HEAD, 204, 304) are never polled.
        if http_body::Body::is_end_stream(&self.inner) {
            self.go_home();
        }
    }
}

//! The upstream exchange for the common request: a GET or HEAD without a
//! body, to a plain-HTTP upstream (the sidecar case). It runs inside the
//! client connection's own task: write the head, read the answer, give the
//! connection back. hyper-util's pooled client puts a connection task, a
//! channel hand-off and a boxed future between those steps, and on a cache
//! hit that was the largest cost the gateway added over nginx. Everything
//! else (request bodies, upgrades, https upstreams) still goes through that
//! client, which streams both ways at once.
//!
//! Split like Pingora's HTTP/1 client: `pool` (idle connections, checkout,
//! the exchange itself), `head` (request head out, response head in,
//! framing), `body` (the response body, streamed off the connection).

mod body;
mod head;
mod pool;

pub use body::{Exchanged, StreamedBody};
pub use pool::HostPool;

use std::io;
use std::sync::Arc;

use http::uri::Scheme;
use http::{Method, Request, Uri};

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::BytesMut;
    use http::header::{self, HeaderValue};
    use http::uri::Authority;
    use http::{HeaderMap, Request, StatusCode};

    use super::body::*;
    use super::head::*;
    use super::pool::*;
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

//! The request head the gateway writes and the response head it reads,
//! and the framing that head announces (RFC 9112 §6).

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Request, StatusCode};

use super::*;

/// `METHOD path?query HTTP/1.1`, a Host if the request has none, and the
/// request's headers as the gateway left them.
pub(super) fn write_head<B>(out: &mut Vec<u8>, request: &Request<B>, authority: &Authority) {
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

pub(super) struct Head {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) http11: bool,
}

/// Takes a complete response head off the front of `buf`; `None` until one
/// is there. Header values share the read buffer's memory (no copy each).
pub(super) fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, ExchangeError> {
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

pub(super) enum Framing {
    /// No body whatever the headers say (HEAD, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

impl Framing {
    pub(super) fn is_until_close(&self) -> bool {
        matches!(self, Framing::UntilClose)
    }
}

/// How the body is delimited (RFC 9112 §6.3). With Transfer-Encoding the
/// Content-Length is dropped: passing both on is how requests get smuggled.
pub(super) fn framing(
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

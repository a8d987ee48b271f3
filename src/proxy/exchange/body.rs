//! The response body: whole when it came with the head, else streamed off
//! the connection, which goes back to its pool once the body is complete.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncReadExt;

use super::pool::*;
use super::*;

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
    pub(super) conn: Option<Conn>,
    pub(super) pool: Arc<HostPool>,
    pub(super) decoder: Decoder,
    pub(super) keep_alive: bool,
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
    pub(super) fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            let clean = conn.read.is_empty();
            self.pool.finish(conn, self.keep_alive, clean);
        }
    }
}

pub(super) enum Decoder {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

pub(super) enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer fields after the last chunk: read and dropped.
    Trailers,
}

pub(super) enum Decoded {
    Data(Bytes),
    NeedMore,
    Done,
}

impl Decoder {
    pub(super) fn is_done(&self) -> bool {
        matches!(self, Decoder::Done | Decoder::Length(0))
    }

    pub(super) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ExchangeError> {
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
pub(super) fn take_counted(remaining: &mut u64, buf: &mut BytesMut) -> Bytes {
    let take = (*remaining).min(buf.len() as u64);
    *remaining -= take;
    buf.split_to(take as usize).freeze()
}

/// One line off the front of `buf`, without its CRLF (or bare LF).
pub(super) fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, ExchangeError> {
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
pub(super) fn take_chunk_size(buf: &mut BytesMut) -> Result<Option<u64>, ExchangeError> {
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

//! The upstream side of HTTP/1.1: one connection, one exchange at a time, driven in place by
//! the task that waits for the answer and then by the answer's body (`pool::Lease`).
//!
//! Why not hyper's client connection: it runs a dispatcher between a request channel and a
//! callback per exchange, keeps a keep-alive state machine for every poll, and builds its
//! own header map from a parse it then walks again; that was 16.6k of the proxy's 60.4k
//! instructions per JSON request (callgrind, BENCHMARKS.md, tenth session). Here the request
//! head is written from the proxy's header map in one pass, and the answer's head is parsed by
//! `httparse` in place, its values sharing the bytes read, as the proxy's own server does.
//!
//! The rules, RFC 9112's, strict where it leaves a choice:
//! * the request carries `Content-Length` when its body's length is known (an empty body of a
//!   method without request content carries none) and is chunked otherwise, but for a GET,
//!   HEAD or CONNECT, which goes without a body then (hyper's rule); a length or a
//!   Transfer-Encoding the request had is not copied, the framing is this connection's;
//! * an answer's body is delimited by its status (1xx, 204, 304 and any answer to HEAD have
//!   none), then by Transfer-Encoding (chunked last: decoded; anything else: read to the
//!   close), then by Content-Length (every value the same number, else the answer is refused),
//!   else by the close; interim answers (100, 103) are skipped, a 101 is refused;
//! * the connection is used again only when the request was written whole, the answer was
//!   read whole, neither side said `Connection: close` (an HTTP/1.0 answer must say
//!   `keep-alive`), and nothing followed the answer;
//! * an answer may come before the request is written whole: the rest of the request is still
//!   written while its body is read, and a write that fails then, or an upload that fails once
//!   the answer has come (read, or waiting in the socket), does not hide the answer (the
//!   connection is not used again); an upload that fails before any answer is at hand is the
//!   exchange's fault, not a wait for an answer that may never come; an upstream that answers early and stops reading holds nothing up: the exchange
//!   ends with its answer, or at the first-byte or idle timeout;
//! * trailers are not passed on either way: a chunked answer's trailer section is read and
//!   dropped, and a request's trailers are not sent (none of the APIs the proxy fronts uses
//!   them; hyper passed an answer's on to HTTP/2 clients);
//! * a request none of whose bytes were written can be taken back ([`Conn::take_unsent`]), so
//!   the pool can send it on another connection; one that was written even in part cannot (it
//!   may have been acted on).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, SizeHint};

use super::{hex_line, length_field, Decoder, Length, Out, Spans, Step, MAX_HEADERS, SCRATCH};
use crate::body::{BodyError, RequestBody};

/// The largest answer head read (hyper's client reads at most this much before giving up
/// on a head too).
const MAX_HEAD: usize = 8192 + 4096 * 100;

/// Why an exchange failed. The upload's own error is the source of [`Fault::Upload`], so the
/// proxy can tell an upload that failed from an upstream that did.
#[derive(Debug)]
pub enum Fault {
    Io(io::Error),
    /// The upstream closed the connection before the answer was complete.
    Closed(&'static str),
    /// The upstream sent something that is not HTTP/1.1 as RFC 9112 has it.
    Protocol(&'static str),
    Upload(BodyError),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Io(e) => write!(f, "upstream connection error: {e}"),
            Fault::Closed(when) => write!(f, "upstream closed the connection {when}"),
            Fault::Protocol(what) => write!(f, "invalid answer from the upstream: {what}"),
            Fault::Upload(_) => f.write_str("request body failed"),
        }
    }
}

impl std::error::Error for Fault {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // The I/O error's text is in this one's already.
            Fault::Upload(e) => Some(e),
            _ => None,
        }
    }
}

/// How much of a request body is left to write.
enum Send {
    /// No exchange, or the request is written whole (but perhaps not yet flushed).
    Done,
    /// Written with a Content-Length: bytes still owed.
    Length(u64),
    Chunked,
}

/// Where the answer is.
enum Recv {
    /// No exchange.
    Idle,
    /// Waiting for its head; `head` when the request is a HEAD (its answer has no body).
    Head {
        head: bool,
    },
    /// In its body.
    Length(u64),
    Chunked(Decoder),
    UntilClose,
    /// Read whole.
    Done,
}

/// One HTTP/1.1 connection to the upstream over `T` (TCP, or TLS over it).
pub struct Conn<T> {
    io: T,
    /// Bytes read and not yet taken.
    rd: BytesMut,
    out: Out,
    /// Bytes have gone into `io` since its last flush (TLS keeps them until flushed).
    unflushed: bool,
    send: Send,
    /// The request body, once the first byte of the head is written (it is polled only then).
    body: Option<RequestBody>,
    recv: Recv,
    /// The request until the first byte of its head is written: taken back if that fails.
    unsent: Option<Request<RequestBody>>,
    /// The request's headers once it is written, until [`Conn::take_headers`] hands them back
    /// for a retry (a clone of them per exchange cost 1.6% of a request's instructions, 3% of
    /// an SDK's).
    sent_headers: Option<HeaderMap>,
    /// The connection may carry another exchange once this one is over.
    keep_alive: bool,
    /// The upstream has closed its side, or something failed: not to be used again.
    ended: bool,
    /// A write failed after the request's first byte (the answer may still come).
    write_error: Option<io::Error>,
}

impl<T> Conn<T>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    pub fn new(io: T) -> Self {
        Conn {
            io,
            rd: BytesMut::new(),
            out: Out::empty(),
            unflushed: false,
            send: Send::Done,
            body: None,
            recv: Recv::Idle,
            unsent: None,
            sent_headers: None,
            keep_alive: true,
            ended: false,
            write_error: None,
        }
    }

    /// Free for a new exchange: the last one ended cleanly and the upstream has said nothing
    /// since (as far as the last poll knows).
    pub fn reusable(&self) -> bool {
        !self.ended
            && self.keep_alive
            && matches!(self.recv, Recv::Idle | Recv::Done)
            && matches!(self.send, Send::Done)
            && self.out.is_empty()
            && !self.unflushed
            && self.rd.is_empty()
    }

    /// Look at an idle connection: an upstream that closed it, or sent bytes nobody asked
    /// for, ends it. `false` when it has ended.
    pub fn check(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.reusable() {
            return false;
        }
        match self.poll_read(cx) {
            Poll::Pending => true,
            // A close, stray bytes, or an error.
            Poll::Ready(_) => {
                self.ended = true;
                false
            }
        }
    }

    /// Begin an exchange: the request's head is encoded and waits to be written by
    /// [`Conn::poll_head`]. The target is `req`'s path and query (origin-form, whatever the
    /// URI's scheme and authority), and `host` is the one `Host` field, first after the
    /// request line (RFC 9112 §3.2); one among `req`'s fields is not copied.
    pub fn start(&mut self, req: Request<RequestBody>, host: &HeaderValue) {
        debug_assert!(self.reusable());
        let is_head = req.method() == Method::HEAD;
        // Room for a small body read whole too, copied in after the head (a larger one is
        // written from its own buffer).
        let small = req.body().whole().map_or(0, |b| {
            if b.len() <= super::COPY_AT_MOST {
                b.len()
            } else {
                0
            }
        });
        let mut head = Vec::with_capacity(128 + req.headers().len() * 48 + small);
        head.extend_from_slice(req.method().as_str().as_bytes());
        head.push(b' ');
        match req.uri().path_and_query() {
            Some(pq) => head.extend_from_slice(pq.as_str().as_bytes()),
            None => head.push(b'/'),
        }
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(host.as_bytes());
        head.extend_from_slice(b"\r\n");
        let body = req.body();
        self.send = if body.is_end_stream() {
            if carries_content(req.method()) {
                length_field(&mut head, 0);
            }
            Send::Done
        } else {
            match body.size_hint().exact() {
                Some(n) => {
                    length_field(&mut head, n);
                    if n == 0 {
                        Send::Done
                    } else {
                        Send::Length(n)
                    }
                }
                // hyper's rule: a GET, HEAD or CONNECT whose length is not known yet (an
                // HTTP/2 client's end can come in a frame of its own) is sent without a
                // body; origins and firewalls refuse a chunked GET.
                None if matches!(*req.method(), Method::GET | Method::HEAD | Method::CONNECT) => {
                    Send::Done
                }
                None => {
                    head.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    Send::Chunked
                }
            }
        };
        for (name, value) in req.headers() {
            if *name == CONTENT_LENGTH || *name == TRANSFER_ENCODING || *name == HOST {
                continue;
            }
            if *name == CONNECTION && has_token(value, b"close") {
                self.keep_alive = false;
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        self.out = Out::with(head);
        if let (Send::Length(n), Some(whole)) = (&self.send, req.body().whole()) {
            if whole.len() as u64 == *n {
                // A body read whole leaves with the head, in one write (and one segment); the
                // request keeps it until then, to be taken back whole.
                self.out.data(whole.clone());
                self.send = Send::Done;
            }
        }
        self.recv = Recv::Head { head: is_head };
        // The body is polled once the head's first byte is written; until then the request is
        // kept whole, to be taken back.
        self.sent_headers = None;
        self.unsent = Some(req);
    }

    /// The request, if none of it was written (the connection failed first).
    pub fn take_unsent(&mut self) -> Option<Request<RequestBody>> {
        self.unsent.take()
    }

    /// The headers of the request last started, as it was given them (the connection only
    /// reads them), for a caller that may send it again.
    pub fn take_headers(&mut self) -> Option<HeaderMap> {
        match self.unsent.as_mut() {
            Some(req) => Some(std::mem::take(req.headers_mut())),
            None => self.sent_headers.take(),
        }
    }

    /// Write what the request still owes and read until the answer's head is complete.
    pub fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<()>, Fault>> {
        loop {
            if let Err(e) = self.poll_send(cx) {
                // An answer already here (read, or in the socket) is the exchange's outcome,
                // whatever became of the upload after it (the connection is not used again).
                // One that has not come is not waited for: the upstream may be waiting for the
                // rest of the body.
                let waiting = match (&e, &self.recv) {
                    (Fault::Upload(_), Recv::Head { head }) => Some(*head),
                    _ => None,
                };
                let early = waiting.and_then(|head| self.answer_at_hand(head, cx));
                let e = self.fail(e);
                return Poll::Ready(early.ok_or(e));
            }
            let Recv::Head { head: is_head } = self.recv else {
                return Poll::Ready(Err(Fault::Protocol("no exchange on this connection")));
            };
            match self.parse_head(is_head) {
                Err(e) => return Poll::Ready(Err(self.fail(e))),
                Ok(Some(resp)) => return Poll::Ready(Ok(resp)),
                Ok(None) => {}
            }
            if self.rd.len() > MAX_HEAD {
                return Poll::Ready(Err(
                    self.fail(Fault::Protocol("the answer's head is too large"))
                ));
            }
            match ready!(self.poll_read(cx)) {
                Ok(0) => {
                    let e = if self.rd.is_empty() {
                        Fault::Closed("before answering")
                    } else {
                        Fault::Closed("in the middle of the answer's head")
                    };
                    let e = self.read_fault(e);
                    return Poll::Ready(Err(self.fail(e)));
                }
                Ok(_) => {}
                Err(e) => {
                    let e = self.read_fault(Fault::Io(e));
                    return Poll::Ready(Err(self.fail(e)));
                }
            }
        }
    }

    /// The answer body's next piece: `None` at its end. Writes what the request still owes
    /// too.
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Fault>>> {
        loop {
            match self.poll_send(cx) {
                Ok(()) => {}
                // The answer has begun: an upload that fails now stops the writing, not the
                // answer (the connection is not used again).
                Err(Fault::Upload(_)) => self.stop(),
                Err(e) => return Poll::Ready(Some(Err(self.fail(e)))),
            }
            match &mut self.recv {
                Recv::Done | Recv::Idle => return Poll::Ready(None),
                Recv::Head { .. } => {
                    return Poll::Ready(Some(Err(Fault::Protocol("the answer has no head yet"))))
                }
                Recv::Length(left) => {
                    if !self.rd.is_empty() {
                        let take = (self.rd.len() as u64).min(*left) as usize;
                        *left -= take as u64;
                        let done = *left == 0;
                        let data = self.rd.split_to(take).freeze();
                        if done {
                            self.answered();
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                Recv::Chunked(decoder) => match decoder.step(&mut self.rd) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(data))),
                    Ok(Step::End) => {
                        self.answered();
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => {}
                    Err(fault) => {
                        return Poll::Ready(Some(Err(self.fail(Fault::Protocol(fault.0)))))
                    }
                },
                Recv::UntilClose => {
                    if !self.rd.is_empty() {
                        return Poll::Ready(Some(Ok(self.rd.split().freeze())));
                    }
                }
            }
            match ready!(self.poll_read(cx)) {
                Ok(0) => {
                    if matches!(self.recv, Recv::UntilClose) {
                        self.recv = Recv::Done;
                        self.ended = true;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(
                        self.fail(Fault::Closed("in the middle of the answer's body"))
                    )));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(self.fail(Fault::Io(e))))),
            }
        }
    }

    /// The body has no bytes left to give.
    pub fn is_end_stream(&self) -> bool {
        matches!(self.recv, Recv::Done | Recv::Idle | Recv::Length(0))
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.recv {
            Recv::Done | Recv::Idle => SizeHint::with_exact(0),
            Recv::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }

    /// Let the request's writing progress without waiting for the answer: used once the
    /// answer is over, so that a request body still owed is written and flushed, or found
    /// unfinished (the connection then is not reused).
    pub fn poll_finish(&mut self, cx: &mut Context<'_>) {
        if let Err(e) = self.poll_send(cx) {
            self.fail(e);
        }
    }

    /// The answer has been read whole. A read buffer left empty is let go, so an idle
    /// connection does not keep its last read's allocation.
    fn answered(&mut self) {
        self.recv = Recv::Done;
        if self.rd.is_empty() {
            self.rd = BytesMut::new();
        }
    }

    /// The answer's head if it is complete in what has been read or what the socket has now,
    /// without waiting for more.
    fn answer_at_hand(&mut self, is_head: bool, cx: &mut Context<'_>) -> Option<Response<()>> {
        loop {
            if let Some(resp) = self.parse_head(is_head).ok().flatten() {
                return Some(resp);
            }
            if self.rd.len() > MAX_HEAD {
                return None;
            }
            match self.poll_read(cx) {
                Poll::Ready(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    /// Nothing more is written, and the connection is not used again (what is still to be
    /// read of an answer may be).
    fn stop(&mut self) {
        self.ended = true;
        self.send = Send::Done;
        self.body = None;
        self.out = Out::empty();
        self.unflushed = false;
    }

    /// The connection is not to be used again; `e` is returned for the caller to report.
    fn fail(&mut self, e: Fault) -> Fault {
        self.stop();
        e
    }

    /// Write what is pending, then as much of the body as is ready, until the socket is
    /// full or the body has nothing ready; flush once everything is written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Result<(), Fault> {
        loop {
            if !self.out.is_empty() {
                match self.poll_write(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) if self.unsent.is_some() => return Err(Fault::Io(e)),
                    Poll::Ready(Err(e)) => {
                        // The upstream may have answered and stopped reading (a 413 for a
                        // body too large, say): its answer is still read, and the write's
                        // error is what is told only if no answer comes.
                        self.stop_writing(e);
                        return Ok(());
                    }
                    Poll::Pending => return Ok(()),
                }
            }
            let frame = match (&self.send, &mut self.body) {
                (Send::Done, _) | (_, None) => break,
                (_, Some(body)) => Pin::new(body).poll_frame(cx),
            };
            match frame {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    match &mut self.send {
                        Send::Length(left) => {
                            if data.len() as u64 > *left {
                                return Err(Fault::Upload(BodyError::Client(
                                    "the request body is longer than its length".into(),
                                )));
                            }
                            *left -= data.len() as u64;
                            self.out.data(data);
                            if *left == 0 {
                                self.send = Send::Done;
                                self.body = None;
                            }
                        }
                        Send::Chunked => {
                            let mut line = [0u8; 18];
                            self.out.copy(hex_line(data.len(), &mut line));
                            self.out.data(data);
                            self.out.copy(b"\r\n");
                        }
                        Send::Done => {}
                    }
                }
                Poll::Ready(Some(Err(e))) => return Err(Fault::Upload(e)),
                Poll::Ready(None) => match &self.send {
                    Send::Chunked => {
                        self.out.copy(b"0\r\n\r\n");
                        self.send = Send::Done;
                        self.body = None;
                    }
                    _ => {
                        return Err(Fault::Upload(BodyError::Client(
                            "the request body is shorter than its length".into(),
                        )))
                    }
                },
            }
        }
        if self.unflushed && self.out.is_empty() {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => self.stop_writing(e),
                Poll::Pending => {}
            }
        }
        Ok(())
    }

    /// A write failed after the request's first byte: nothing more is written, the
    /// connection is not used again, and the error is kept for when no answer comes.
    fn stop_writing(&mut self, e: io::Error) {
        self.stop();
        self.write_error.get_or_insert(e);
    }

    /// Why the exchange failed when the upstream closed or the read failed: a failed write
    /// came first, and says more.
    fn read_fault(&mut self, read: Fault) -> Fault {
        match self.write_error.take() {
            Some(e) => Fault::Io(e),
            None => read,
        }
    }

    /// Write from `out` until it is empty or the socket is full.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let wrote = {
                let mut slices = [IoSlice::new(&[]); 16];
                let k = self.out.slices(&mut slices);
                let io = Pin::new(&mut self.io);
                if k > 1 && io.is_write_vectored() {
                    ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..k]))
                } else {
                    ready!(Pin::new(&mut self.io).poll_write(cx, &slices[0]))
                }
            };
            match wrote {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.out.advance(n);
                    self.unflushed = true;
                    if let Some(req) = self.unsent.take() {
                        // Written in part: no longer ours to send again. Its body is what is
                        // left to write, if any is owed; an ended one is let go now (an
                        // HTTP/2 client's body holds its stream's state). Its headers are
                        // kept for `take_headers`.
                        let (parts, body) = req.into_parts();
                        self.sent_headers = Some(parts.headers);
                        if !matches!(self.send, Send::Done) {
                            self.body = Some(body);
                        }
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Read what the upstream has sent into `rd`. `Ok(0)` is its close.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let io = &mut self.io;
        let rd = &mut self.rd;
        SCRATCH.with_borrow_mut(|s| {
            let mut buf = hyper::rt::ReadBuf::new(s);
            ready!(Pin::new(io).poll_read(cx, buf.unfilled()))?;
            let got = buf.filled();
            super::append(rd, got);
            Poll::Ready(Ok(got.len()))
        })
    }

    /// The answer's head, once `rd` holds it whole; interim answers are skipped.
    fn parse_head(&mut self, is_head: bool) -> Result<Option<Response<()>>, Fault> {
        loop {
            if self.rd.is_empty() {
                return Ok(None);
            }
            let Some(parsed) = parse_response(&mut self.rd)? else {
                return Ok(None);
            };
            let Parsed {
                status,
                version,
                mut headers,
                close,
                keep,
                length,
                coding,
            } = parsed;
            if status.is_informational() {
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Fault::Protocol(
                        "101 Switching Protocols to a request without Upgrade",
                    ));
                }
                continue;
            }
            self.keep_alive &= match version {
                Version::HTTP_11 => !close,
                _ => keep && !close,
            };
            let bodyless =
                is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
            self.recv = if bodyless {
                Recv::Done
            } else if version == Version::HTTP_10 && coding.is_some() {
                // RFC 9112 §6.1: faulty framing (hyper refuses it too).
                return Err(Fault::Protocol("Transfer-Encoding in an HTTP/1.0 answer"));
            } else if let Some(chunked) = coding {
                // With Transfer-Encoding, a length is not the body's (RFC 9112 §6.3).
                if length != Length::Absent {
                    headers.remove(CONTENT_LENGTH);
                }
                if chunked {
                    Recv::Chunked(Decoder::new())
                } else {
                    self.keep_alive = false;
                    Recv::UntilClose
                }
            } else if let Length::One(n) = length {
                if n == 0 {
                    Recv::Done
                } else {
                    Recv::Length(n)
                }
            } else if length == Length::Bad {
                return Err(Fault::Protocol("Content-Length values that disagree"));
            } else {
                self.keep_alive = false;
                Recv::UntilClose
            };
            if matches!(self.recv, Recv::Done) {
                self.answered();
            }
            let mut resp = Response::new(());
            *resp.status_mut() = status;
            *resp.version_mut() = version;
            *resp.headers_mut() = headers;
            return Ok(Some(resp));
        }
    }
}

/// Whether a method's request carries content, so that an empty body is sent as
/// `Content-Length: 0` (RFC 9110 §8.6: a user agent should not send one for the others).
fn carries_content(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET
            | Method::HEAD
            | Method::DELETE
            | Method::OPTIONS
            | Method::CONNECT
            | Method::TRACE
    )
}

fn has_token(v: &HeaderValue, token: &[u8]) -> bool {
    v.as_bytes()
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// An answer's head as parsed, with what its fields say of its framing (gathered in the one
/// walk that builds the map, so framing costs no lookups).
struct Parsed {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    close: bool,
    keep: bool,
    /// What its Content-Length fields say.
    length: Length,
    /// Transfer-Encoding: `None` without one; `Some(true)` when its last coding is chunked,
    /// `Some(false)` otherwise (an empty one included).
    coding: Option<bool>,
}

/// Parse an answer's head from the start of `buf`, taking its bytes (the values share them).
/// `Ok(None)`: not complete yet.
fn parse_response(buf: &mut BytesMut) -> Result<Option<Parsed>, Fault> {
    let mut fields =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let bad = Fault::Protocol;
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(bad("more than 100 header fields")),
        Err(_) => return Err(bad("a head httparse refuses")),
    };
    let status =
        StatusCode::from_u16(resp.code.unwrap_or(0)).map_err(|_| bad("a bad status code"))?;
    let version = match resp.version {
        Some(0) => Version::HTTP_10,
        Some(1) => Version::HTTP_11,
        _ => return Err(bad("an HTTP version other than 1.0 and 1.1")),
    };
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| (s.as_ptr() as usize - base, s.len());
    let mut spans = Spans::take();
    spans.0.extend(
        resp.headers
            .iter()
            .map(|h| (at(h.name.as_bytes()), at(h.value))),
    );
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(spans.0.len());
    let (mut close, mut keep) = (false, false);
    let mut length = Length::Absent;
    let mut coding = None;
    for &((n, nl), (v, vl)) in &spans.0 {
        let name = super::field_name(&head[n..n + nl]).map_err(|_| bad("a bad field name"))?;
        let value = super::field_value(head.slice(v..v + vl));
        if name == CONNECTION {
            close |= has_token(&value, b"close");
            keep |= has_token(&value, b"keep-alive");
            if value.as_bytes().eq_ignore_ascii_case(b"keep-alive") {
                // What most HTTP/1.1 upstreams send: it is this connection's, names only
                // `Keep-Alive` (hop-by-hop itself), and every answer's fields lose it in
                // `strip_hop_by_hop`; not kept, it costs neither an insert nor a removal.
                continue;
            }
        } else if name == CONTENT_LENGTH {
            length = length.add(value.as_bytes());
        } else if name == TRANSFER_ENCODING {
            // The last coding of the last field decides; a field with none leaves the
            // framing undelimited.
            let last = value
                .as_bytes()
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|c| !c.is_empty());
            coding = match last {
                Some(c) => Some(c.eq_ignore_ascii_case(b"chunked")),
                None => coding.or(Some(false)),
            };
        }
        headers.append(name, value);
    }
    Ok(Some(Parsed {
        status,
        version,
        headers,
        close,
        keep,
        length,
        coding,
    }))
}

// ----- reading answers however they come (for the tests and the fuzz target) ------------------

/// An upstream that says what it is told: each read gets the next piece, then nothing
/// (pending) or the close; writes are kept, and fail once `write_limit` bytes are in.
#[derive(Default)]
struct Script {
    reads: VecDeque<Vec<u8>>,
    closed: bool,
    written: Vec<u8>,
    write_limit: Option<usize>,
    /// Writes (and flushes) wait, as to an upstream that stopped reading.
    stalled: bool,
    /// Flushes alone wait (TLS records not yet out).
    flush_stalled: bool,
    /// Writes wait once this many bytes are in (the upstream stopped reading).
    stall_after: Option<usize>,
    /// Write calls that took bytes.
    writes: usize,
    flushes: usize,
}

impl Script {
    fn answering(pieces: &[&[u8]], closed: bool) -> Script {
        Script {
            // An empty read is the close: empty pieces are not reads.
            reads: pieces
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| p.to_vec())
                .collect(),
            closed,
            ..Script::default()
        }
    }
}

impl hyper::rt::Read for Script {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.reads.pop_front() {
            Some(mut piece) => {
                // What does not fit is the next read's.
                let rest = piece.split_off(piece.len().min(buf.remaining()));
                if !rest.is_empty() {
                    this.reads.push_front(rest);
                }
                buf.put_slice(&piece);
                Poll::Ready(Ok(()))
            }
            None if this.closed => Poll::Ready(Ok(())),
            None => Poll::Pending,
        }
    }
}

impl hyper::rt::Write for Script {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.stalled || this.stall_after.is_some_and(|n| this.written.len() >= n) {
            return Poll::Pending;
        }
        let room = this
            .write_limit
            .or(this.stall_after)
            .map_or(usize::MAX, |l| l - this.written.len());
        if room == 0 {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(room);
        this.written.extend_from_slice(&buf[..n]);
        this.writes += 1;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // As `writev` does: the slices' bytes in order, as far as there is room.
        let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        self.poll_write(cx, &all)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.stalled || this.flush_stalled {
            return Poll::Pending;
        }
        this.flushes += 1;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Read `bytes` as the answer to a POST, whole and in two reads split at `split`: what the
/// connection makes of them (the head, the body, the fault, whether it could be used again)
/// must not depend on how they arrive. Never panics on any input but when the two differ.
#[doc(hidden)]
pub fn check_answer(bytes: &[u8], split: usize) {
    let split = split.min(bytes.len());
    let read = |pieces: &[&[u8]]| {
        let mut conn = Conn::new(Script::answering(pieces, true));
        let body = RequestBody::buffered(Bytes::from_static(b"{}"), Default::default());
        conn.start(
            Request::post("/v1/chat/completions")
                .body(body)
                .expect("a fixed request"),
            &HeaderValue::from_static("up.example"),
        );
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let head = match conn.poll_head(&mut cx) {
            Poll::Ready(Ok(resp)) => format!(
                "{:?} {:?} {:?}",
                resp.status(),
                resp.version(),
                resp.headers()
            ),
            Poll::Ready(Err(e)) => return format!("head: {e}"),
            Poll::Pending => unreachable!("a closed script never waits"),
        };
        let mut data = Vec::new();
        let end = loop {
            match conn.poll_data(&mut cx) {
                Poll::Ready(Some(Ok(d))) => data.extend_from_slice(&d),
                Poll::Ready(Some(Err(e))) => break e.to_string(),
                Poll::Ready(None) => break "end".to_string(),
                Poll::Pending => unreachable!("a closed script never waits"),
            }
        };
        assert!(data.len() <= bytes.len());
        // Bytes after the answer make the connection unusable whether they were read with
        // it or are still to come (the pool's look before reuse reads them).
        let reusable = conn.reusable() && conn.io.reads.is_empty();
        format!("{head} body {data:?} {end} reusable {reusable}")
    };
    let one = read(&[bytes]);
    let two = read(&[&bytes[..split], &bytes[split..]]);
    assert_eq!(one, two, "the answer read whole and in two pieces differ");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use http::header::HOST;
    use tokio::sync::mpsc;

    use crate::body::UploadStats;
    use crate::http1::{ClientBody, Streamed};

    /// As the request parser's test of the same name: `field_value` trusts httparse's check of
    /// a response's values, so every byte at every place must come out as `http` would take it.
    #[test]
    fn a_value_is_taken_as_header_value_would_take_it() {
        let mut taken = 0;
        for at in 0..70 {
            for b in 0..=255u8 {
                let mut value = vec![b'v'; 70];
                value.insert(at, b);
                let mut head = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-v: ".to_vec();
                head.extend_from_slice(&value);
                head.extend_from_slice(b"\r\n\r\n");
                let parsed = match parse_response(&mut BytesMut::from(&head[..])) {
                    Ok(Some(parsed)) => parsed,
                    Ok(None) => panic!("byte {b:#04x} at {at}: a whole head was not complete"),
                    Err(_) => continue,
                };
                for v in parsed.headers.values() {
                    assert_eq!(
                        HeaderValue::from_bytes(v.as_bytes()).ok().as_ref(),
                        Some(v),
                        "byte {b:#04x} at {at}"
                    );
                }
                taken += 1;
                let http_takes = b == b'\t' || (b >= 32 && b != 127);
                assert!(http_takes, "byte {b:#04x} at {at} was let through");
            }
        }
        assert_eq!(taken, 70 * 224);
    }

    fn now<T>(mut f: impl FnMut(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
        f(&mut Context::from_waker(std::task::Waker::noop()))
    }

    fn stats() -> Arc<UploadStats> {
        Arc::new(UploadStats::default())
    }

    fn request(method: Method, body: RequestBody) -> Request<RequestBody> {
        Request::builder()
            .method(method)
            .uri("https://up.example/v1/chat/completions?x=1")
            .body(body)
            .unwrap()
    }

    fn up_host() -> HeaderValue {
        HeaderValue::from_static("up.example")
    }

    fn buffered(b: &'static [u8]) -> RequestBody {
        RequestBody::buffered(Bytes::from_static(b), stats())
    }

    /// A body still arriving: `remaining` as a Content-Length would give it, `None` chunked.
    fn streamed(
        remaining: Option<u64>,
    ) -> (
        mpsc::Sender<Result<Bytes, crate::body::BoxError>>,
        RequestBody,
    ) {
        let (tx, rx) = mpsc::channel(8);
        let inner = ClientBody::Streamed(Streamed {
            rx,
            remaining,
            wanted: None,
            done: false,
        });
        (
            tx,
            RequestBody::new(inner, u64::MAX, Duration::from_secs(60), stats()),
        )
    }

    /// The whole answer body, as far as the script lets it go.
    fn body(conn: &mut Conn<Script>) -> Result<Vec<u8>, Fault> {
        let mut out = Vec::new();
        loop {
            match now(|cx| conn.poll_data(cx)) {
                Poll::Ready(Some(Ok(data))) => out.extend_from_slice(&data),
                Poll::Ready(Some(Err(e))) => return Err(e),
                Poll::Ready(None) => return Ok(out),
                Poll::Pending => panic!(
                    "the body waits for more: {:?}",
                    String::from_utf8_lossy(&out)
                ),
            }
        }
    }

    fn head(conn: &mut Conn<Script>) -> Result<Response<()>, Fault> {
        match now(|cx| conn.poll_head(cx)) {
            Poll::Ready(r) => r,
            Poll::Pending => panic!("the head waits for more"),
        }
    }

    fn written(conn: &Conn<Script>) -> String {
        String::from_utf8(conn.io.written.clone()).unwrap()
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    #[tokio::test]
    async fn a_request_is_framed_by_its_body_and_addressed_by_the_pool_not_by_fields_it_came_with()
    {
        let mut req = request(Method::POST, buffered(b"{\"a\":1}"));
        req.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("99"));
        req.headers_mut()
            .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        req.headers_mut()
            .insert(HOST, HeaderValue::from_static("client.example"));
        req.headers_mut()
            .append("x-many", HeaderValue::from_static("1"));
        req.headers_mut()
            .append("x-many", HeaderValue::from_static("2"));
        let mut conn = Conn::new(Script::answering(&[OK], false));
        conn.start(req, &up_host());
        assert_eq!(head(&mut conn).unwrap().status(), 200);
        assert_eq!(
            written(&conn),
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: up.example\r\ncontent-length: 7\r\n\
             x-many: 1\r\nx-many: 2\r\n\r\n{\"a\":1}"
        );
        assert_eq!(body(&mut conn).unwrap(), b"ok");
        assert!(conn.reusable());
        assert!(conn.io.flushes > 0, "what was written is flushed");
        assert_eq!(conn.io.writes, 1, "a body read whole leaves with the head");

        // Large enough to be written from its own buffer beside the head's: still one write.
        static BIG: [u8; 5000] = [b'x'; 5000];
        let mut conn = Conn::new(Script::answering(&[OK], false));
        conn.start(request(Method::POST, buffered(&BIG)), &up_host());
        head(&mut conn).unwrap();
        assert_eq!(conn.io.writes, 1);
        assert!(written(&conn).ends_with(std::str::from_utf8(&BIG).unwrap()));

        // No body: a GET says nothing of a length, a POST says it is empty.
        for (method, want) in [
            (Method::GET, "GET /v1/chat/completions?x=1 HTTP/1.1\r\nhost: up.example\r\n\r\n"),
            (
                Method::POST,
                "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: up.example\r\ncontent-length: 0\r\n\r\n",
            ),
        ] {
            let mut conn = Conn::new(Script::answering(&[OK], false));
            conn.start(request(method, buffered(b"")), &up_host());
            head(&mut conn).unwrap();
            assert_eq!(written(&conn), want);
        }
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_is_chunked_and_a_known_one_streams_under_its_length() {
        let (tx, body_in) = streamed(None);
        let mut conn = Conn::new(Script::answering(&[], false));
        conn.start(request(Method::POST, body_in), &up_host());
        assert!(now(|cx| conn.poll_head(cx)).is_pending());
        for piece in ["ab", "c", ""] {
            tx.try_send(Ok(Bytes::from(piece))).unwrap();
            assert!(now(|cx| conn.poll_head(cx)).is_pending());
        }
        assert!(written(&conn).ends_with(
            "host: up.example\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"
        ));
        conn.io.reads.push_back(OK.to_vec());
        head(&mut conn).unwrap();
        body(&mut conn).unwrap();
        assert!(conn.reusable());

        let (tx, body_in) = streamed(Some(3));
        let mut conn = Conn::new(Script::answering(&[], false));
        conn.start(request(Method::PUT, body_in), &up_host());
        tx.try_send(Ok(Bytes::from_static(b"ab"))).unwrap();
        tx.try_send(Ok(Bytes::from_static(b"c"))).unwrap();
        drop(tx);
        assert!(now(|cx| conn.poll_head(cx)).is_pending());
        assert!(written(&conn).ends_with("host: up.example\r\ncontent-length: 3\r\n\r\nabc"));
        conn.io.reads.push_back(OK.to_vec());
        head(&mut conn).unwrap();
        body(&mut conn).unwrap();
        assert!(conn.reusable());
    }

    /// `(label, method, answer, closed after it, status, body, reusable)`: each answer whole in
    /// one read, and again one byte a read.
    #[tokio::test]
    async fn answers_are_delimited_as_rfc_9112_says() {
        type Case = (
            &'static str,
            Method,
            &'static [u8],
            bool,
            u16,
            &'static [u8],
            bool,
        );
        let cases: &[Case] = &[
            ("length", Method::POST, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false, 200, b"hello", true),
            ("a list of one length", Method::POST, b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello", false, 200, b"hello", true),
            ("chunked", Method::POST, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\nx-t: 1\r\n\r\n", false, 200, b"hello", true),
            ("chunked wins over a length", Method::POST, b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false, 200, b"hello", true),
            ("another coding: to the close", Method::POST, b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nhello", true, 200, b"hello", false),
            ("no length: to the close", Method::POST, b"HTTP/1.1 200 OK\r\n\r\nhello", true, 200, b"hello", false),
            ("HEAD has no body", Method::HEAD, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false, 200, b"", true),
            ("zero length", Method::POST, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false, 200, b"", true),
            ("204", Method::POST, b"HTTP/1.1 204 No Content\r\n\r\n", false, 204, b"", true),
            ("304 with a length", Method::GET, b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n", false, 304, b"", true),
            ("interim answers skipped", Method::POST, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 402 Payment Required\r\ncontent-length: 2\r\n\r\nno", false, 402, b"no", true),
            ("close", Method::POST, b"HTTP/1.1 429 Too Many Requests\r\nconnection: close\r\ncontent-length: 2\r\n\r\nno", false, 429, b"no", false),
            ("HTTP/1.0", Method::POST, b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", false, 200, b"ok", false),
            ("HTTP/1.0 keep-alive", Method::POST, b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok", false, 200, b"ok", true),
            ("bytes after the answer", Method::POST, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1", false, 200, b"ok", false),
        ];
        for &(label, ref method, answer, closed, status, want, reusable) in cases {
            let whole: Vec<&[u8]> = vec![answer];
            let bytes: Vec<&[u8]> = answer.chunks(1).collect();
            for (how, pieces) in [("whole", whole), ("a byte a read", bytes)] {
                let mut conn = Conn::new(Script::answering(&pieces, closed));
                conn.start(request(method.clone(), buffered(b"")), &up_host());
                let resp = head(&mut conn).unwrap_or_else(|e| panic!("{label}, {how}: {e}"));
                assert_eq!(resp.status(), status, "{label}, {how}");
                let got = body(&mut conn).unwrap_or_else(|e| panic!("{label}, {how}: {e}"));
                assert_eq!(got, want, "{label}, {how}");
                assert!(conn.is_end_stream(), "{label}, {how}");
                // Read a byte at a time, the bytes after the answer are still to come when the
                // body ends; the look at the idle connection finds them.
                let idle = now(|cx| Poll::Ready(conn.check(cx))) == Poll::Ready(true);
                assert_eq!(idle, reusable, "{label}, {how}");
                if label == "chunked wins over a length" {
                    assert!(resp.headers().get(CONTENT_LENGTH).is_none());
                }
            }
        }
    }

    #[tokio::test]
    async fn a_connection_keep_alive_field_is_not_kept_and_any_other_is() {
        let answer: &[u8] =
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nkeep-alive: timeout=5\r\n\
            connection: x-hop\r\nx-hop: 1\r\ncontent-length: 2\r\n\r\nok";
        let mut conn = Conn::new(Script::answering(&[answer], false));
        conn.start(request(Method::POST, buffered(b"{}")), &up_host());
        let resp = head(&mut conn).unwrap();
        let kept: Vec<_> = resp.headers().get_all(CONNECTION).iter().collect();
        assert_eq!(
            kept,
            ["x-hop"],
            "the field that names another header stays, for the strip"
        );
        assert_eq!(resp.headers()["keep-alive"], "timeout=5");
        assert_eq!(body(&mut conn).unwrap(), b"ok");
        assert!(
            conn.reusable(),
            "HTTP/1.0 kept alive: the field was still read"
        );

        let mut resp = resp;
        crate::upstream::strip_hop_by_hop(resp.headers_mut());
        let left: Vec<_> = resp.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(left, ["content-length"]);
    }

    #[test]
    fn an_answer_reads_the_same_however_it_is_split() {
        let answers: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;a=b\r\nhel\r\n2\r\nlo\r\n0\r\nx: y\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200",
            b"HTTP/1.0 200 OK\r\n\r\nto the close",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        ];
        for answer in answers {
            for split in 0..=answer.len() {
                check_answer(answer, split);
            }
        }
    }

    #[tokio::test]
    async fn answers_that_break_the_rules_are_faults_and_end_the_connection() {
        let heads: &[(&str, &[u8])] = &[
            (
                "101",
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
            ),
            (
                "lengths disagree",
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            ),
            (
                "length not a number",
                b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            ),
            ("not HTTP", b"SSH-2.0-OpenSSH_9.2\r\n\r\n"),
            ("HTTP/2 version", b"HTTP/2.0 200 OK\r\n\r\n"),
            ("HTTP/1.0 chunked", b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
            ("closed before answering", b""),
            ("closed mid-head", b"HTTP/1.1 200 OK\r\ncontent-"),
        ];
        for (label, answer) in heads {
            let mut conn = Conn::new(Script::answering(&[answer], true));
            conn.start(request(Method::POST, buffered(b"x")), &up_host());
            let e = head(&mut conn).unwrap_err();
            let closed = label.starts_with("closed");
            assert_eq!(matches!(e, Fault::Closed(_)), closed, "{label}: {e}");
            assert_eq!(matches!(e, Fault::Protocol(_)), !closed, "{label}: {e}");
            assert!(!conn.reusable(), "{label}");
            assert!(conn.take_unsent().is_none(), "{label}: it was written");
        }
        let bodies: &[(&str, &[u8])] = &[
            (
                "closed mid-length",
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel",
            ),
            (
                "closed mid-chunk",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            ),
            (
                "a bad chunk size",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n",
            ),
        ];
        for (label, answer) in bodies {
            let mut conn = Conn::new(Script::answering(&[answer], true));
            conn.start(request(Method::POST, buffered(b"x")), &up_host());
            head(&mut conn).unwrap();
            assert!(body(&mut conn).is_err(), "{label}");
            assert!(!conn.reusable(), "{label}");
        }
        // Fewer fields than httparse's limit, more bytes than the head's.
        let field = format!("x-big: {}\r\n", "v".repeat(8000));
        let pieces: Vec<Vec<u8>> = std::iter::once(b"HTTP/1.1 200 OK\r\n".to_vec())
            .chain(std::iter::repeat_n(field.into_bytes(), MAX_HEAD / 8000 + 2))
            .collect();
        assert!(pieces.len() < MAX_HEADERS);
        let refs: Vec<&[u8]> = pieces.iter().map(|p| p.as_slice()).collect();
        let mut conn = Conn::new(Script::answering(&refs, false));
        conn.start(request(Method::POST, buffered(b"x")), &up_host());
        let e = head(&mut conn).unwrap_err();
        assert!(
            e.to_string().contains("too large"),
            "a head past the limit: {e}"
        );
    }

    #[tokio::test]
    async fn a_request_turned_away_unwritten_comes_back_and_one_written_in_part_does_not() {
        let mut conn = Conn::new(Script {
            write_limit: Some(0),
            ..Script::default()
        });
        conn.start(request(Method::POST, buffered(b"{}")), &up_host());
        assert!(head(&mut conn).is_err());
        let back = conn.take_unsent().expect("nothing was written");
        // As it was given: the URI absolute and no `Host` added, fit for HTTP/2 too.
        assert_eq!(back.uri(), "https://up.example/v1/chat/completions?x=1");
        assert!(!back.headers().contains_key(HOST));
        assert_eq!(back.body().size_hint().exact(), Some(2));

        let mut conn = Conn::new(Script {
            write_limit: Some(10),
            closed: true,
            ..Script::default()
        });
        conn.start(request(Method::POST, buffered(b"{}")), &up_host());
        let e = head(&mut conn).unwrap_err();
        assert!(
            e.to_string().contains("broken pipe"),
            "the write's error is told: {e}"
        );
        assert!(conn.take_unsent().is_none());
    }

    #[tokio::test]
    async fn an_answer_that_comes_while_the_upload_is_unfinished_is_still_read() {
        // The upstream stopped reading after the head and answered 413.
        let mut conn = Conn::new(Script {
            reads: [b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig".to_vec()]
                .into(),
            write_limit: Some(80),
            ..Script::default()
        });
        let (tx, body_in) = streamed(Some(1 << 20));
        conn.start(request(Method::POST, body_in), &up_host());
        tx.try_send(Ok(Bytes::from(vec![b'x'; 4096]))).unwrap();
        assert_eq!(head(&mut conn).unwrap().status(), 413);
        assert_eq!(body(&mut conn).unwrap(), b"big");
        assert!(!conn.reusable());

        // The same answer while the upload is still pending: read, and the connection is not
        // used again with the upload unfinished.
        let (_tx, body_in) = streamed(Some(10));
        let mut conn = Conn::new(Script::answering(
            &[b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"],
            false,
        ));
        conn.start(request(Method::POST, body_in), &up_host());
        assert_eq!(head(&mut conn).unwrap().status(), 200);
        assert!(conn.is_end_stream());
        let _ = now(|cx| {
            conn.poll_finish(cx);
            Poll::Ready(())
        });
        assert!(!conn.reusable());
    }

    #[tokio::test]
    async fn an_answer_from_an_upstream_that_stopped_reading_is_read_and_nothing_waits_on_the_write(
    ) {
        let (tx, body_in) = streamed(Some(1 << 20));
        let mut conn = Conn::new(Script {
            stall_after: Some(1000),
            ..Script::default()
        });
        conn.start(request(Method::POST, body_in), &up_host());
        tx.try_send(Ok(Bytes::from(vec![b'x'; 4096]))).unwrap();
        assert!(
            now(|cx| conn.poll_head(cx)).is_pending(),
            "the upstream took the head and part of the body, then stopped reading"
        );
        assert_eq!(conn.io.written.len(), 1000);
        assert!(written(&conn).starts_with("POST /v1/chat/completions?x=1 HTTP/1.1\r\n"));
        assert!(
            conn.unsent.is_none(),
            "written in part: never to be sent again"
        );
        conn.io
            .reads
            .push_back(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig".to_vec());
        assert_eq!(head(&mut conn).unwrap().status(), 413);
        assert_eq!(body(&mut conn).unwrap(), b"big");
        assert!(!conn.reusable(), "the request is not written whole");
    }

    #[tokio::test]
    async fn an_answer_already_read_outlives_an_upload_that_fails_after_it() {
        let (tx, body_in) = streamed(None);
        let mut conn = Conn::new(Script::answering(&[], false));
        conn.start(request(Method::POST, body_in), &up_host());
        assert!(now(|cx| conn.poll_head(cx)).is_pending());
        // The answer is in the buffer when the upload fails: it is the outcome.
        conn.rd
            .extend_from_slice(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\nno");
        tx.try_send(Err("client went away".into())).unwrap();
        assert_eq!(head(&mut conn).unwrap().status(), 400);
        assert_eq!(body(&mut conn).unwrap(), b"no");
        assert!(!conn.reusable());

        // The answer still in the socket when the upload fails: read, and the outcome.
        let (tx, body_in) = streamed(None);
        let mut conn = Conn::new(Script::answering(&[], false));
        conn.start(request(Method::POST, body_in), &up_host());
        assert!(now(|cx| conn.poll_head(cx)).is_pending());
        conn.io
            .reads
            .push_back(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\nno".to_vec());
        tx.try_send(Err("client went away".into())).unwrap();
        assert_eq!(head(&mut conn).unwrap().status(), 400);
        assert_eq!(body(&mut conn).unwrap(), b"no");

        // None at hand: the upload's fault, not a wait for an answer that may never come.
        let (tx, body_in) = streamed(None);
        let mut conn = Conn::new(Script::answering(&[], false));
        conn.start(request(Method::POST, body_in), &up_host());
        tx.try_send(Err("client went away".into())).unwrap();
        assert!(matches!(head(&mut conn), Err(Fault::Upload(_))));

        // The answer's body being read when the upload fails: it is read to its end.
        let (tx, body_in) = streamed(None);
        let mut conn = Conn::new(Script::answering(
            &[b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nb"],
            false,
        ));
        conn.start(request(Method::POST, body_in), &up_host());
        assert_eq!(head(&mut conn).unwrap().status(), 200);
        assert_eq!(
            now(|cx| conn.poll_data(cx)).map(|d| d.map(|d| d.map_err(|e| e.to_string()))),
            Poll::Ready(Some(Ok(Bytes::from_static(b"b"))))
        );
        tx.try_send(Err("client went away".into())).unwrap();
        conn.io.reads.push_back(b"ig".to_vec());
        assert_eq!(body(&mut conn).unwrap(), b"ig");
        assert!(!conn.reusable());
    }

    #[tokio::test]
    async fn a_connection_waits_for_its_flush_and_holds_nothing_while_idle() {
        // A byte a read: the buffer grows past what it holds, and is let go at the end.
        let bytes: Vec<&[u8]> = OK.chunks(1).collect();
        let mut conn = Conn::new(Script::answering(&bytes, false));
        conn.start(request(Method::POST, buffered(b"{}")), &up_host());
        head(&mut conn).unwrap();
        body(&mut conn).unwrap();
        assert!(conn.reusable());
        assert!(
            conn.body.is_none() && conn.unsent.is_none(),
            "the request is let go"
        );
        assert_eq!(conn.rd.capacity(), 0, "no read buffer kept");

        // A GET whose end is not known yet goes without a body, and lets its body go.
        let (_tx, body_in) = streamed(None);
        let mut conn = Conn::new(Script::answering(&[OK], false));
        conn.start(request(Method::GET, body_in), &up_host());
        head(&mut conn).unwrap();
        assert!(
            !written(&conn).contains("transfer-encoding"),
            "{}",
            written(&conn)
        );
        assert!(conn.body.is_none());
        body(&mut conn).unwrap();
        assert!(conn.reusable());

        // Written but not flushed (TLS holds the bytes): not free for another request.
        let mut conn = Conn::new(Script {
            flush_stalled: true,
            ..Script::answering(&[OK], false)
        });
        conn.start(request(Method::POST, buffered(b"{}")), &up_host());
        head(&mut conn).unwrap();
        body(&mut conn).unwrap();
        assert!(!conn.reusable(), "unflushed");
        conn.io.flush_stalled = false;
        let _ = now(|cx| {
            conn.poll_finish(cx);
            Poll::Ready(())
        });
        assert!(conn.reusable(), "flushed");
    }

    #[tokio::test]
    async fn an_upload_that_fails_is_an_upload_fault() {
        let (tx, body_in) = streamed(None);
        let mut conn = Conn::new(Script::answering(&[], false));
        conn.start(request(Method::POST, body_in), &up_host());
        tx.try_send(Err("client went away".into())).unwrap();
        let e = head(&mut conn).unwrap_err();
        assert!(matches!(e, Fault::Upload(_)));
        let source = std::error::Error::source(&e).expect("the upload's error");
        assert!(source.downcast_ref::<BodyError>().is_some());
        assert!(!conn.reusable());
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_or_spoke_on_is_not_reused() {
        for (label, reads, closed, alive) in [
            ("quiet", vec![], false, true),
            ("closed", vec![], true, false),
            (
                "stray bytes",
                vec![b"HTTP/1.1 408 Request Timeout\r\n\r\n".to_vec()],
                false,
                false,
            ),
        ] {
            let mut conn = Conn::new(Script::answering(&[OK], false));
            conn.start(request(Method::GET, buffered(b"")), &up_host());
            head(&mut conn).unwrap();
            body(&mut conn).unwrap();
            conn.io.reads.extend(reads);
            conn.io.closed = closed;
            assert_eq!(
                now(|cx| Poll::Ready(conn.check(cx))),
                Poll::Ready(alive),
                "{label}"
            );
            assert_eq!(conn.reusable(), alive, "{label}");
        }
    }
}

//! The proxy's own HTTP/1.1 server connection: request heads parsed by `httparse`, bodies
//! framed by Content-Length or chunked coding, answers written with `writev`.
//!
//! Why not hyper's server: a hyper HTTP/1 connection owns an 8 KiB write buffer from its
//! start and an 8–16 KiB read buffer under every request in flight, whose sizes its server
//! builder does not let a caller set. A request waiting in the admission queue pinned about
//! 18 KiB of them (BENCHMARKS.md, "What a queued request is made of"). Here a connection owns
//! no buffer while it waits: bytes are read into the shard's scratch buffer and copied into an
//! allocation of exactly what arrived, so a queued request holds its own head and body and
//! nothing more, and an answer's head is written from a buffer that lives only while it is
//! written.
//!
//! The rules, where RFC 9112 leaves a choice, are strict: hyper's, and stricter where
//! noted:
//! * a head that `httparse` refuses (obsolete line folding, a space before a colon, a control
//!   byte, no version, a version other than 1.0 and 1.1) is answered 400; one over
//!   `server.max_header_bytes`, or with more than [`MAX_HEADERS`] fields, 431;
//! * Content-Length values must all be the same decimal number; Transfer-Encoding must be
//!   `chunked` alone (400 if it does not end in chunked, is empty or repeats it, 501 for a
//!   coding before it, 400 in HTTP/1.0: hyper accepts `gzip, chunked` and a repeated
//!   `chunked`); with both, chunked wins, the length is dropped and the connection closes
//!   after the answer (RFC 9112 §6.3); chunk size lines follow hyper's grammar, but a size
//!   of more than 16 hex digits is refused even with leading zeros, and a body's extensions
//!   are capped at 16 KiB together, as hyper caps them;
//! * `100 Continue` is sent when the handler first asks for the body, not before;
//! * every wait for a head (the first, and each between keep-alive requests) ends after
//!   `server.header_read_timeout`;
//! * a client that closes its side while its request is in flight has gone: the handler's
//!   future is dropped (the proxy detaches what must finish, see `proxy::Detachable`). This
//!   is seen while the connection reads: not while a streamed upload waits for its handler to
//!   take the piece already read (as with hyper, which reads only what a body asks for);
//! * a write that waits the write-stall limit without the client taking a byte ends the
//!   connection (a client that stopped reading must not hold its slot).
//!
//! Connections that open with the HTTP/2 preface are handed back to the caller with the bytes
//! read so far ([`Served::H2`]); the caller serves them with hyper's HTTP/2 server.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderName, HeaderValue, InvalidHeaderName, CONNECTION, CONTENT_LENGTH, DATE, EXPECT,
    TRANSFER_ENCODING,
};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::alarm::Alarm;
use crate::body::BoxError;

pub mod client;

/// Most header fields a request head may carry (hyper's limit too).
pub const MAX_HEADERS: usize = 100;
/// The HTTP/2 connection preface, which a client speaking HTTP/2 with prior knowledge sends
/// first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes taken from the socket per read.
const READ_CHUNK: usize = 64 * 1024;
/// An answer's bytes gathered before they are written, when its body has more ready.
const WRITE_BATCH: usize = 64 * 1024;
/// A chunked body's size lines with their extensions, and its trailer section, each at most
/// this long.
const MAX_CHUNK_LINE: usize = 4096;
/// All of a body's chunk extensions together (hyper's limit too): a client must not send a
/// byte of data per line of extensions for ever.
const MAX_EXTENSIONS: usize = 16 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// What a connection needs to know from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `server.max_header_bytes`.
    pub max_head: usize,
    /// `server.header_read_timeout`.
    pub head_timeout: Duration,
    /// How long a write may wait for the client to take any bytes (`upstream.idle_timeout`).
    pub write_stall: Duration,
}

/// How a connection ended.
pub enum Served {
    /// Closed by the client, a failed read, no head in time, or the stop while idle: the
    /// socket is dropped.
    Closed,
    /// The proxy ends the connection after an answer (or a refusal, or a write that failed or
    /// stalled): the socket's owner ends it with [`finish`].
    Finish,
    /// The client sent the HTTP/2 preface: here are the bytes read from the socket, and
    /// when its first request must have come (`header_read_timeout` after the connection
    /// opened, as for HTTP/1).
    H2(Bytes, Instant),
}

// ----- the request body -------------------------------------------------------------------

/// A client's request body, as the proxy's handlers see it.
pub enum ClientBody {
    /// Read whole with its head (or none at all): the common case for an API call.
    Full(Option<Bytes>),
    /// Still arriving: the connection passes each piece on as it reads it.
    Streamed(Streamed),
    /// From an HTTP/2 connection (hyper's server).
    H2(hyper::body::Incoming),
}

impl ClientBody {
    pub fn empty() -> ClientBody {
        ClientBody::Full(None)
    }
}

/// The part of a body still to come from the client. The connection sends its pieces, and
/// for a chunked body an empty piece at its end: a channel that closes before the end (a
/// Content-Length's bytes all came, or the empty piece) means the client left mid-body, and
/// is an error, never a clean end.
pub struct Streamed {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
    /// Bytes still to come under a Content-Length; `None` for a chunked body.
    remaining: Option<u64>,
    /// Told when the handler first asks for the body: the connection then sends the
    /// `100 Continue` a client that sent `Expect: 100-continue` waits for.
    wanted: Option<tokio::sync::oneshot::Sender<()>>,
    done: bool,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ClientBody::Streamed(s) => {
                if s.done {
                    return Poll::Ready(None);
                }
                if let Some(wanted) = s.wanted.take() {
                    let _ = wanted.send(());
                }
                match s.rx.poll_recv(cx) {
                    Poll::Ready(Some(Ok(data))) if data.is_empty() => {
                        s.done = true;
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Ok(data))) => {
                        if let Some(r) = &mut s.remaining {
                            *r = r.saturating_sub(data.len() as u64);
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        s.done = true;
                        Poll::Ready(Some(Err(e)))
                    }
                    Poll::Ready(None) => {
                        s.done = true;
                        if s.remaining == Some(0) {
                            Poll::Ready(None)
                        } else {
                            Poll::Ready(Some(Err(Box::new(BodyFault(
                                "the client closed before the body's end",
                            )))))
                        }
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            ClientBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(|e| e.into()),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Full(b) => b.is_none(),
            ClientBody::Streamed(s) => s.done || s.remaining == Some(0),
            ClientBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ClientBody::Streamed(s) => match s.remaining {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
            ClientBody::H2(b) => b.size_hint(),
        }
    }
}

/// Why a body could not be read to its end.
#[derive(Debug)]
struct BodyFault(&'static str);

impl std::fmt::Display for BodyFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for BodyFault {}

// ----- the request head -------------------------------------------------------------------

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head, its body not yet taken.
#[derive(Debug)]
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    /// Whether the connection may carry another request after this one.
    keep_alive: bool,
    expect_continue: bool,
}

/// A head refused before it reached a handler: answered with this status, then closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refused(StatusCode);

/// Parse a request head from the start of `buf`: `Ok(None)` if it is not complete yet,
/// else the head and its length in bytes. The head's bytes are taken from `buf` (the header
/// values share them, no copy).
fn parse_head(buf: &mut BytesMut, max_head: usize) -> Result<Option<Head>, Refused> {
    // Not initialised first: zeroing a hundred fields and their spans cost more than the
    // parse itself (callgrind: 8.1k instructions per head, against 3.8k for hyper's).
    let mut fields =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            if buf.len() > max_head {
                return Err(Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE))
        }
        Err(_) => return Err(Refused(StatusCode::BAD_REQUEST)),
    };
    if len > max_head {
        return Err(Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
    }
    let bad = Refused(StatusCode::BAD_REQUEST);
    let base = buf.as_ptr() as usize;
    // Where each piece lies in the head, to share it once the head is frozen.
    let at = |s: &[u8]| (s.as_ptr() as usize - base, s.len());
    let method = Method::from_bytes(req.method.ok_or(bad)?.as_bytes()).map_err(|_| bad)?;
    let target = at(req.path.ok_or(bad)?.as_bytes());
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        Some(1) => Version::HTTP_11,
        _ => return Err(bad),
    };
    let count = req.headers.len();
    let mut spans = Spans::take();
    spans.0.extend(
        req.headers
            .iter()
            .map(|h| (at(h.name.as_bytes()), at(h.value))),
    );
    if target.1 > usize::from(u16::MAX) - 1 {
        // Longer than `http::Uri` holds.
        return Err(Refused(StatusCode::URI_TOO_LONG));
    }
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.0 + target.1)).map_err(|_| bad)?;
    let mut headers = HeaderMap::with_capacity(count);
    let mut framing = Framing::None;
    let (mut close, mut keep, mut expect_continue) = (false, false, false);
    let mut length = Length::Absent;
    let mut chunked = false;
    let mut coded = false;
    let mut te = false;
    for &((n, nl), (v, vl)) in &spans.0 {
        let name = field_name(&head[n..n + nl]).map_err(|_| bad)?;
        let value = field_value(head.slice(v..v + vl));
        if name == CONTENT_LENGTH {
            length = length.add(value.as_bytes());
        } else if name == TRANSFER_ENCODING {
            te = true;
            for coding in value.as_bytes().split(|&b| b == b',') {
                let coding = coding.trim_ascii();
                if coding.is_empty() {
                    continue;
                }
                // Chunked must be the last coding and applied once.
                if chunked {
                    return Err(bad);
                }
                if coding.eq_ignore_ascii_case(b"chunked") {
                    chunked = true;
                } else {
                    coded = true;
                }
            }
        } else if name == CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == EXPECT {
            expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        }
        headers.append(name, value);
    }
    // Every value, lists included, must give the same length (RFC 9112 §6.3), as for an
    // answer's.
    let length = match length {
        Length::Absent => None,
        Length::One(n) => Some(n),
        Length::Bad => return Err(bad),
    };
    let mut keep_alive = match version {
        Version::HTTP_11 => !close,
        _ => keep && !close,
    };
    if te {
        // RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty; one
        // that does not end in chunked leaves a request's length unknown.
        if version == Version::HTTP_10 || !chunked {
            return Err(bad);
        }
        if coded {
            return Err(Refused(StatusCode::NOT_IMPLEMENTED));
        }
        framing = Framing::Chunked;
        if length.is_some() {
            // Chunked wins; the length must not travel on, and whatever follows this
            // request on the connection is not to be trusted.
            headers.remove(CONTENT_LENGTH);
            keep_alive = false;
        }
    } else if let Some(n) = length {
        if n > 0 {
            framing = Framing::Length(n);
        }
    }
    Ok(Some(Head {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11,
    }))
}

/// A field value httparse has already checked, as a `HeaderValue` sharing the head's bytes.
///
/// httparse 1.10 takes into a value only the bytes of its `HEADER_VALUE_MAP`
/// (`\t | ' '..=0x7e | 0x80..=0xff`) and ends it at CR or LF, without obsolete line folding
/// (neither parser here turns it on); `http` 1.x's `HeaderValue::from_maybe_shared` accepts
/// exactly that set (`b >= 32 && b != 127 || b == b'\t'`). Checking again cost 0.9k of the
/// 42.4k instructions a proxied request took (callgrind), so the value is taken unchecked, as
/// hyper's own parser takes it. `a_value_is_taken_as_header_value_would_take_it` (here and in
/// `client`) puts every byte at every place in a value through the parser and this function:
/// a parser that let through a byte `http` refuses fails it, and debug builds check again
/// inside `from_maybe_shared_unchecked` and panic.
pub(crate) fn field_value(bytes: Bytes) -> HeaderValue {
    // SAFETY: `bytes` is a value httparse parsed, so each byte is one `HeaderValue` accepts
    // (see above); the function is only called on such values.
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

/// The `x-` field names the proxy sees on most exchanges, each once interned.
///
/// `http` knows the standard names as static values but makes every other name a fresh
/// allocation with a per-byte table walk: the nine or ten `X-Stainless-*` fields every OpenAI SDK
/// request carries cost ~650 instructions each that way, the five `X-Chutes-*` figures of
/// every Chutes answer about ~360 each. A name here is a `match` on its lowercased bytes
/// and a static `HeaderName`, which `HeaderMap` also hashes and compares faster.
macro_rules! known_names {
    ($($name:literal),* $(,)?) => {
        /// Every name in the table, for the test that keeps it equal to `from_bytes`.
        #[cfg(test)]
        fn known_names() -> Vec<HeaderName> {
            vec![$(HeaderName::from_static(ascii($name))),*]
        }

        /// The interned name whose text is `lower`, already lowercase.
        fn known_lowercase(lower: &[u8]) -> Option<HeaderName> {
            match lower {
                $($name => Some(const { HeaderName::from_static(ascii($name)) }),)*
                _ => None,
            }
        }
    };
}

/// A byte-string literal of the table as the `&str` `from_static` takes, at compile time.
const fn ascii(name: &'static [u8]) -> &'static str {
    match std::str::from_utf8(name) {
        Ok(name) => name,
        Err(_) => panic!("a known field name is ASCII"),
    }
}

known_names![
    b"x-stainless-lang",
    b"x-stainless-package-version",
    b"x-stainless-os",
    b"x-stainless-arch",
    b"x-stainless-runtime",
    b"x-stainless-runtime-version",
    b"x-stainless-async",
    b"x-stainless-retry-count",
    b"x-stainless-read-timeout",
    b"x-stainless-timeout",
    b"x-proxy-max-wait",
    b"x-proxy-client",
    b"x-api-key",
    b"x-chutes-quota-total",
    b"x-chutes-quota-used",
    b"x-chutes-quota-remaining",
    b"x-chutes-rl-user",
    b"x-chutes-rl-chute",
    b"x-chutes-invocationid",
];

/// The longest name in the table (`x-stainless-package-version`).
const KNOWN_NAME_MAX: usize = 27;

/// A field name httparse has parsed, as `HeaderName::from_bytes` would make it, from the
/// table of known names when it is one of them.
#[inline]
pub(crate) fn field_name(name: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    if name.len() > 2 && name[1] == b'-' && name[0] | 0x20 == b'x' {
        if let Some(known) = known_name(name) {
            return Ok(known);
        }
    }
    HeaderName::from_bytes(name)
}

#[inline(never)]
fn known_name(name: &[u8]) -> Option<HeaderName> {
    if name.len() > KNOWN_NAME_MAX {
        return None;
    }
    let mut lower = [0u8; KNOWN_NAME_MAX];
    let lower = &mut lower[..name.len()];
    for (l, &b) in lower.iter_mut().zip(name) {
        *l = b.to_ascii_lowercase();
    }
    known_lowercase(lower)
}

/// One Content-Length value: decimal digits only, no sign, no spaces but around it.
fn content_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

// ----- chunked coding ---------------------------------------------------------------------

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In a size line: the size so far, digits read, bytes of the line read.
    Size {
        size: u64,
        digits: u8,
        line: usize,
    },
    /// Past the size's digits, in whitespace before `;` or the CR.
    Lws {
        size: u64,
        line: usize,
    },
    /// In an extension, up to the CR.
    Ext {
        size: u64,
        line: usize,
    },
    /// After the size line's CR.
    SizeLf {
        size: u64,
    },
    /// In a chunk's data: bytes left.
    Data(u64),
    /// After a chunk's data: its CR, then its LF.
    DataCr,
    DataLf,
    /// In the trailer section: bytes of it read, bytes of the current line.
    Trailer {
        total: usize,
        line: usize,
    },
    /// A trailer line's (or the final empty line's) CR.
    TrailerLf {
        total: usize,
        empty: bool,
    },
    Done,
}

/// What the decoder made of the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Data(Bytes),
    NeedMore,
    End,
}

/// A chunked body's decoder: where it is, and the extension bytes it has seen.
#[derive(Debug)]
struct Decoder {
    at: Chunk,
    extensions: usize,
}

impl Decoder {
    fn new() -> Decoder {
        Decoder {
            at: Chunk::new(),
            extensions: 0,
        }
    }

    /// Decode from the front of `buf`, taking what it consumes.
    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, BodyFault> {
        self.at.step(buf, &mut self.extensions)
    }
}

impl Chunk {
    fn new() -> Chunk {
        Chunk::Size {
            size: 0,
            digits: 0,
            line: 0,
        }
    }

    fn step(&mut self, buf: &mut BytesMut, extensions: &mut usize) -> Result<Step, BodyFault> {
        let fault = |what| Err(BodyFault(what));
        loop {
            if *self == Chunk::Done {
                return Ok(Step::End);
            }
            if let Chunk::Data(left) = *self {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let take = (buf.len() as u64).min(left) as usize;
                *self = if left == take as u64 {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left - take as u64)
                };
                return Ok(Step::Data(buf.split_to(take).freeze()));
            }
            let Some(&b) = buf.first() else {
                return Ok(Step::NeedMore);
            };
            let _ = buf.split_to(1);
            *self = match *self {
                Chunk::Size { size, digits, line } => {
                    if line >= MAX_CHUNK_LINE {
                        return fault("a chunk size line is too long");
                    }
                    match (b as char).to_digit(16) {
                        Some(d) => {
                            if digits >= 16 {
                                return fault("a chunk size is too large");
                            }
                            Chunk::Size {
                                size: (size << 4) | u64::from(d),
                                digits: digits + 1,
                                line: line + 1,
                            }
                        }
                        None if digits == 0 => return fault("a chunk size line has no size"),
                        None if b == b'\r' => Chunk::SizeLf { size },
                        None if b == b';' => Chunk::Ext {
                            size,
                            line: line + 1,
                        },
                        None if b == b' ' || b == b'\t' => Chunk::Lws {
                            size,
                            line: line + 1,
                        },
                        None => return fault("a chunk size is not hexadecimal"),
                    }
                }
                Chunk::Lws { size, line } => {
                    if line >= MAX_CHUNK_LINE {
                        return fault("a chunk size line is too long");
                    }
                    match b {
                        b' ' | b'\t' => Chunk::Lws {
                            size,
                            line: line + 1,
                        },
                        b';' => Chunk::Ext {
                            size,
                            line: line + 1,
                        },
                        b'\r' => Chunk::SizeLf { size },
                        _ => return fault("a chunk size is followed by neither ';' nor CRLF"),
                    }
                }
                Chunk::Ext { size, line } => {
                    *extensions += 1;
                    if line >= MAX_CHUNK_LINE || *extensions > MAX_EXTENSIONS {
                        return fault("chunk extensions are too long");
                    }
                    match b {
                        b'\r' => Chunk::SizeLf { size },
                        b'\n' => return fault("a chunk size line ends without CR"),
                        _ => Chunk::Ext {
                            size,
                            line: line + 1,
                        },
                    }
                }
                Chunk::SizeLf { size } => {
                    if b != b'\n' {
                        return fault("a chunk size line's CR is not followed by LF");
                    }
                    if size == 0 {
                        Chunk::Trailer { total: 0, line: 0 }
                    } else {
                        Chunk::Data(size)
                    }
                }
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => Chunk::new(),
                Chunk::DataCr | Chunk::DataLf => {
                    return fault("a chunk's data is not followed by CRLF")
                }
                Chunk::Trailer { total, line } => {
                    if total >= MAX_TRAILERS {
                        return fault("the trailer section is too long");
                    }
                    match b {
                        b'\r' => Chunk::TrailerLf {
                            total: total + 1,
                            empty: line == 0,
                        },
                        b'\n' => return fault("a trailer line ends without CR"),
                        _ => Chunk::Trailer {
                            total: total + 1,
                            line: line + 1,
                        },
                    }
                }
                Chunk::TrailerLf { total, empty } => {
                    if b != b'\n' {
                        return fault("a trailer line's CR is not followed by LF");
                    }
                    if empty {
                        Chunk::Done
                    } else {
                        Chunk::Trailer { total, line: 0 }
                    }
                }
                Chunk::Data(_) | Chunk::Done => unreachable!("handled above"),
            };
        }
    }
}

// ----- the connection ---------------------------------------------------------------------

thread_local! {
    /// Each shard's read buffer: what a read brings is copied out of it at its exact size.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_CHUNK]);
    /// The last `Date` value written, and the second it is for.
    static DATE_CACHE: RefCell<(u64, HeaderValue)> =
        const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
}

/// Read what the socket has (waiting until it has something) and append it to `buf`.
/// `Ok(0)` is the client's end of stream.
///
/// Polled rather than awaited through `readable()`: that future would be kept in every
/// connection's state (152 bytes), where this keeps two references. A
/// connection is read by its own task alone, which is what `poll_read_ready` asks.
fn read_more<'a>(
    stream: &'a TcpStream,
    buf: &'a mut BytesMut,
) -> impl Future<Output = io::Result<usize>> + use<'a> {
    std::future::poll_fn(move |cx| loop {
        std::task::ready!(stream.poll_read_ready(cx))?;
        let got = SCRATCH.with_borrow_mut(|s| match read_draining(stream, s) {
            Ok(n) => {
                append(buf, &s[..n]);
                Ok(n)
            }
            Err(e) => Err(e),
        });
        match got {
            // The readiness is cleared: the next poll waits for more.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return Poll::Ready(r),
        }
    })
}

/// One read into `s`; a read that did not fill it drained the socket, so its readiness is
/// cleared as tokio's own `poll_read` does on epoll and kqueue, and the next poll waits for
/// the kernel to say more has come instead of asking it with a read that finds nothing (one
/// `recvfrom` and `EAGAIN` a request: the watch for a client leaving, polled while the
/// upstream works). The clear is tokio's: it is skipped if readiness came again since it was
/// read, and it keeps a seen end of stream.
fn read_draining(stream: &TcpStream, s: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    // The read itself is the socket's, not `TcpStream`'s, whose methods keep the readiness
    // themselves (`try_io`'s contract).
    let socket = socket2::SockRef::from(stream);
    let mut got = None;
    let read = stream.try_io(tokio::io::Interest::READABLE, || {
        let n = (&*socket).read(s)?;
        got = Some(n);
        if n > 0 && n < s.len() && !cfg!(windows) {
            // Said as `WouldBlock` only so `try_io` clears the readiness; `got` has the bytes.
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match got {
        Some(n) => Ok(n),
        None => read,
    }
}

/// Append what a read brought to a connection's pending bytes.
fn append(buf: &mut BytesMut, got: &[u8]) {
    if buf.capacity() - buf.len() >= got.len() {
        // Room in a buffer of this connection's own (a head still partial).
        buf.extend_from_slice(got);
    } else {
        // A new allocation: exactly what came, if nothing was pending (extending a buffer
        // split from an earlier one would allocate at least that one's size again); twice
        // what was pending otherwise, so a head that comes a few bytes at a time is not
        // copied once per read.
        let mut fresh = BytesMut::with_capacity((buf.len() + got.len()).max(2 * buf.len()));
        fresh.extend_from_slice(buf);
        fresh.extend_from_slice(got);
        *buf = fresh;
    }
}

/// Serve one HTTP/1.x connection until it closes, or hand it back if it speaks HTTP/2.
///
/// The connection's own state is small (this future is 680 bytes in the release build): the
/// wait for a head and the exchange are separate futures, so they share their space; reads
/// are polled, not awaited through readiness futures; the answer's writer is boxed while it
/// writes. These are
/// plain functions returning `async move` blocks because an `async fn` keeps a copy of each
/// argument beside the argument itself, in every state. The caller owns the socket, so it is
/// not carried in this future as well.
#[allow(clippy::manual_async_fn)] // not an `async fn`: see [`serve`]
pub fn serve<'a, F, Fut, B>(
    stream: &'a TcpStream,
    mut handler: F,
    settings: &'a Settings,
    stop: &'a mut watch::Receiver<bool>,
) -> impl Future<Output = Served> + use<'a, F, Fut, B>
where
    F: FnMut(Request<ClientBody>) -> Fut + 'a,
    Fut: Future<Output = Response<B>> + Send,
    B: Body<Data = Bytes> + Unpin,
{
    async move {
        let mut rbuf = BytesMut::new();
        let mut first = true;
        let opened = Instant::now();
        // The head timeout's one timer from the second request on, moved at each wait.
        let mut alarm = Alarm::new();
        loop {
            let head = match next_head(stream, &mut rbuf, first, settings, stop, &mut alarm).await {
                Ok(head) => head,
                Err(Ended::H2) => return Served::H2(rbuf.freeze(), opened + settings.head_timeout),
                Err(Ended::Refused) => return Served::Finish,
                Err(Ended::Quiet) => return Served::Closed,
            };
            first = false;
            let (meta, pump, wanted, req) = request(head, &mut rbuf);
            // Boxed: a connection between requests is small, the handler's state exists only
            // while it runs.
            let handling = Box::pin(handler(req));
            let wanted = wanted.map(Box::pin);
            match exchange(
                stream, &mut rbuf, handling, pump, wanted, meta, settings, stop,
            )
            .await
            {
                Next::Again => {}
                Next::Close => return Served::Finish,
                Next::Gone => return Served::Closed,
            }
        }
    }
}

/// Why no head came.
enum Ended {
    /// The client sent the HTTP/2 preface (it is in the read buffer).
    H2,
    /// A head that was refused (and answered so): the connection closes.
    Refused,
    /// The client closed, a read failed, no whole head came in time, or the proxy stops:
    /// hyper closes without an answer in each case, and so does this.
    Quiet,
}

/// What follows an exchange.
enum Next {
    /// The connection may carry another request.
    Again,
    /// The proxy closes it (after the answer).
    Close,
    /// The client has gone.
    Gone,
}

/// The next request head, within the head timeout (after the first, on the connection's
/// `alarm`), unless the proxy stops first. A head that is refused is answered here, and then
/// the connection closes.
#[allow(clippy::manual_async_fn)] // not an `async fn`: see [`serve`]
fn next_head<'a>(
    stream: &'a TcpStream,
    rbuf: &'a mut BytesMut,
    first: bool,
    settings: &'a Settings,
    stop: &'a mut watch::Receiver<bool>,
    alarm: &'a mut Alarm,
) -> impl Future<Output = Result<Head, Ended>> + use<'a> {
    async move {
        let deadline = Instant::now() + settings.head_timeout;
        let mut set = false;
        loop {
            if first && !rbuf.is_empty() && H2_PREFACE.starts_with(&rbuf[..rbuf.len().min(24)]) {
                if rbuf.len() >= H2_PREFACE.len() {
                    return Err(Ended::H2);
                }
            } else if !rbuf.is_empty() {
                match parse_head(rbuf, settings.max_head) {
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                    Err(Refused(status)) => {
                        let _ = refuse(stream, status, settings.write_stall).await;
                        return Err(Ended::Refused);
                    }
                }
            }
            let read = if first {
                // The first wait has a timer of its own, kept in this future (whose space the
                // exchange's reuses): a connection that never gets past its first request,
                // idle or queued, holds no timer (and no allocation for one) beside it.
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return Err(Ended::Quiet),
                    r = tokio::time::timeout_at(deadline, read_more(stream, rbuf)) => match r {
                        Ok(r) => r,
                        Err(_) => return Err(Ended::Quiet),
                    },
                }
            } else {
                if !set {
                    alarm.set(deadline);
                    set = true;
                }
                // Bytes that are there win over a deadline just passed, as in `timeout_at`.
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return Err(Ended::Quiet),
                    r = read_more(stream, rbuf) => r,
                    () = &mut *alarm => return Err(Ended::Quiet),
                }
            };
            match read {
                Ok(n) if n > 0 => {}
                _ => return Err(Ended::Quiet),
            }
        }
    }
}

/// What the exchange needs to know of its request once the handler has it.
#[derive(Debug, Clone, Copy)]
struct Meta {
    version: Version,
    is_head: bool,
    keep_alive: bool,
}

/// The request a head and the bytes after it make, and what is left to read of its body.
/// With a body still to come from a client that expects `100 Continue`, the receiver told when
/// the handler first asks for it.
fn request(
    head: Head,
    rbuf: &mut BytesMut,
) -> (
    Meta,
    Pump,
    Option<tokio::sync::oneshot::Receiver<()>>,
    Request<ClientBody>,
) {
    let Head {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue,
    } = head;
    let meta = Meta {
        version,
        is_head: method == Method::HEAD,
        keep_alive,
    };
    let mut wanted_rx = None;
    // The body: whole if it is all here already, else passed on as it arrives.
    let (body, pump) = match framing {
        Framing::None => (ClientBody::empty(), Pump::Done),
        Framing::Length(n) if rbuf.len() as u64 >= n => (
            ClientBody::Full(Some(rbuf.split_to(n as usize).freeze())),
            Pump::Done,
        ),
        framing => {
            let (tx, rx) = mpsc::channel(1);
            let remaining = match framing {
                Framing::Length(n) => Some(n),
                _ => None,
            };
            let wanted = expect_continue.then(|| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                wanted_rx = Some(rx);
                tx
            });
            let body = ClientBody::Streamed(Streamed {
                rx,
                remaining,
                wanted,
                done: false,
            });
            let pump = match remaining {
                Some(left) => Pump::Length { left, tx },
                None => Pump::Chunked {
                    state: Decoder::new(),
                    tx,
                },
            };
            (body, pump)
        }
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    (meta, pump, wanted_rx, req)
}

/// One request: its body passed on, the handler's answer written, the client watched for
/// leaving throughout.
#[allow(clippy::too_many_arguments)]
#[allow(clippy::manual_async_fn)] // not an `async fn`: see [`serve`]
fn exchange<'a, Fut, B>(
    stream: &'a TcpStream,
    rbuf: &'a mut BytesMut,
    mut handling: Pin<Box<Fut>>,
    pump: Pump,
    mut wanted: Option<Pin<Box<tokio::sync::oneshot::Receiver<()>>>>,
    meta: Meta,
    settings: &'a Settings,
    stop: &'a watch::Receiver<bool>,
) -> impl Future<Output = Next> + use<'a, Fut, B>
where
    Fut: Future<Output = Response<B>> + Send,
    B: Body<Data = Bytes> + Unpin,
{
    async move {
        let mut keep_alive = meta.keep_alive;
        let body_done = AtomicBool::new(matches!(pump, Pump::Done));
        let unread = AtomicBool::new(false);
        let watch = reader(stream, rbuf, pump, &body_done, &unread);
        tokio::pin!(watch);
        let resp = loop {
            // What the handler's answer waits for, written below the select (whose output,
            // with room for an answer, would otherwise be kept while it is written).
            let asked = tokio::select! {
                biased;
                r = handling.as_mut() => break r,
                // The client has gone: what it asked for is dropped with the handler.
                () = &mut watch => return Next::Gone,
                // The handler asks for a body the client holds back until told to send it
                // (RFC 9110 §10.1.1), as hyper does: not before, so a request refused on its
                // head alone (401, 413) is answered before the client uploads anything. A
                // body dropped unread sends nothing, and the connection closes after the
                // answer.
                asked = async {
                    match wanted.as_mut() {
                        Some(w) => w.as_mut().await,
                        None => std::future::pending().await,
                    }
                }, if wanted.is_some() => asked.is_ok(),
            };
            wanted = None;
            if asked {
                // Boxed, with its bytes: only a client that asked for `100 Continue` (curl's
                // larger uploads; not the OpenAI SDKs) pays for this write's state.
                let write = Box::pin(async {
                    let mut out = Out::with(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec());
                    write_all(stream, &mut out, settings.write_stall).await
                });
                let wrote = tokio::select! {
                    biased;
                    w = write => w,
                    () = &mut watch => return Next::Gone,
                };
                if wrote.is_err() {
                    return Next::Gone;
                }
            }
        };
        drop(handling);
        // Another request only if this one's body was read to its end and the proxy is not
        // stopping.
        keep_alive &=
            body_done.load(Ordering::Relaxed) && !unread.load(Ordering::Relaxed) && !*stop.borrow();
        // Boxed: only a connection that is answering holds the writer's state.
        let write = Box::pin(write_response(
            stream,
            resp,
            meta.version,
            meta.is_head,
            keep_alive,
            settings.write_stall,
        ));
        let wrote = tokio::select! {
            biased;
            w = write => w,
            () = &mut watch => return Next::Gone,
        };
        match wrote {
            Ok(true) => Next::Again,
            _ => Next::Close,
        }
    }
}

/// End a connection the proxy closes ([`Served::Finish`]): its write side is shut first, so
/// the client reads to the end of what was sent (a FIN, not a reset, when nothing it sent is
/// left unread).
pub fn finish(stream: TcpStream) {
    if let Ok(s) = stream.into_std() {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
}

/// The body still to read from the socket.
enum Pump {
    Done,
    Length {
        left: u64,
        tx: mpsc::Sender<Result<Bytes, BoxError>>,
    },
    Chunked {
        state: Decoder,
        tx: mpsc::Sender<Result<Bytes, BoxError>>,
    },
}

/// Hand a piece of the body to the handler once it has room for it. `false` if the handler
/// has let the body go (the rest of it is then read and dropped, and the connection closes
/// after the answer).
async fn pass_on(
    tx: &mut Option<mpsc::Sender<Result<Bytes, BoxError>>>,
    data: Bytes,
    unread: &AtomicBool,
) -> bool {
    let Some(t) = tx else { return true };
    let reserved = match t.try_reserve() {
        Ok(permit) => Ok(permit),
        Err(mpsc::error::TrySendError::Closed(())) => Err(()),
        // Boxed: the wait for room exists only while the handler is behind (its future
        // would otherwise be kept in every connection's state). The channel holds one piece,
        // so a streamed upload often waits: one small box per piece.
        Err(mpsc::error::TrySendError::Full(())) => Box::pin(t.reserve()).await.map_err(|_| ()),
    };
    match reserved {
        Ok(permit) => {
            permit.send(Ok(data));
            true
        }
        Err(()) => {
            unread.store(true, Ordering::Relaxed);
            false
        }
    }
}

/// While a request is in flight: read its body and pass it on, then watch for the client
/// leaving. Returns only when the client has gone (its end of stream, or a failed read).
#[allow(clippy::manual_async_fn)] // not an `async fn`: see [`serve`]
fn reader<'a>(
    stream: &'a TcpStream,
    rbuf: &'a mut BytesMut,
    pump: Pump,
    body_done: &'a AtomicBool,
    unread: &'a AtomicBool,
) -> impl Future<Output = ()> + use<'a> {
    async move {
        match pump {
            Pump::Done => {}
            Pump::Length { mut left, tx } => {
                let mut tx = Some(tx);
                while left > 0 {
                    if rbuf.is_empty() {
                        match read_more(stream, rbuf).await {
                            Ok(n) if n > 0 => {}
                            // The body then ends short, which its reader is told.
                            _ => return,
                        }
                    }
                    let take = (rbuf.len() as u64).min(left) as usize;
                    let data = rbuf.split_to(take).freeze();
                    left -= take as u64;
                    // The handler let the body go: the rest is read and dropped.
                    if !pass_on(&mut tx, data, unread).await {
                        tx = None;
                    }
                }
                body_done.store(true, Ordering::Relaxed);
            }
            Pump::Chunked { mut state, tx } => {
                let mut tx = Some(tx);
                loop {
                    match state.step(rbuf) {
                        Ok(Step::Data(data)) => {
                            if !pass_on(&mut tx, data, unread).await {
                                tx = None;
                            }
                        }
                        Ok(Step::End) => {
                            // The end, said explicitly (see [`Streamed`]).
                            let _ = pass_on(&mut tx, Bytes::new(), unread).await;
                            break;
                        }
                        Ok(Step::NeedMore) => match read_more(stream, rbuf).await {
                            Ok(n) if n > 0 => {}
                            // The body then ends short, which its reader is told.
                            _ => return,
                        },
                        Err(fault) => {
                            // Nothing after a broken body can be read as a request.
                            unread.store(true, Ordering::Relaxed);
                            if let Some(tx) = &tx {
                                // Boxed: it happens once, to a broken body.
                                let _ = Box::pin(tx.send(Err(Box::new(fault)))).await;
                            }
                            rbuf.clear();
                            break;
                        }
                    }
                }
                body_done.store(true, Ordering::Relaxed);
            }
        }
        // The body is read: what the client sends now is its next request (kept, not parsed
        // until this one is answered), or its end of stream, which means it has gone. Like
        // hyper, nothing more is read while bytes of a next request wait.
        loop {
            if !rbuf.is_empty() {
                if unread.load(Ordering::Relaxed) {
                    rbuf.clear();
                } else {
                    std::future::pending::<()>().await;
                }
            }
            match read_more(stream, rbuf).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
    }
}

// ----- answers ----------------------------------------------------------------------------

/// Bytes waiting to be written, in order: small pieces copied together, large ones shared.
struct Out {
    pieces: Vec<Piece>,
    /// Bytes of the first piece already written.
    offset: usize,
    len: usize,
}

enum Piece {
    Own(Vec<u8>),
    Shared(Bytes),
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        match self {
            Piece::Own(v) => v,
            Piece::Shared(b) => b,
        }
    }
}

/// Data frames at most this long are copied next to the framing around them.
const COPY_AT_MOST: usize = 4096;

impl Out {
    fn with(head: Vec<u8>) -> Out {
        let len = head.len();
        Out {
            pieces: vec![Piece::Own(head)],
            offset: 0,
            len,
        }
    }

    fn empty() -> Out {
        Out {
            pieces: Vec::new(),
            offset: 0,
            len: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pending bytes as slices, as many as `slices` holds; how many were filled.
    fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut k = 0;
        for (i, p) in self.pieces.iter().take(slices.len()).enumerate() {
            let b = p.bytes();
            slices[i] = IoSlice::new(if i == 0 { &b[self.offset..] } else { b });
            k = i + 1;
        }
        k
    }

    /// Append small bytes to the last owned piece (a new one if the last is shared).
    fn copy(&mut self, bytes: &[u8]) {
        self.len += bytes.len();
        if let Some(Piece::Own(v)) = self.pieces.last_mut() {
            v.extend_from_slice(bytes);
            return;
        }
        self.pieces.push(Piece::Own(bytes.to_vec()));
    }

    fn data(&mut self, data: Bytes) {
        if data.len() <= COPY_AT_MOST {
            self.copy(&data);
        } else {
            self.len += data.len();
            self.pieces.push(Piece::Shared(data));
        }
    }

    /// The written bytes are gone.
    fn advance(&mut self, mut n: usize) {
        self.len -= n;
        let mut done = 0;
        for p in &self.pieces {
            let left = p.bytes().len() - self.offset;
            if n < left {
                self.offset += n;
                break;
            }
            n -= left;
            self.offset = 0;
            done += 1;
        }
        self.pieces.drain(..done);
        if self.pieces.is_empty() {
            self.offset = 0;
        }
    }
}

/// Write everything in `out`, each wait for the client bounded by `stall`.
async fn write_all(stream: &TcpStream, out: &mut Out, stall: Duration) -> io::Result<()> {
    while !out.is_empty() {
        let wrote = {
            let mut slices = [IoSlice::new(&[]); 16];
            let k = out.slices(&mut slices);
            stream.try_write_vectored(&slices[..k])
        };
        match wrote {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => out.advance(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Boxed: the timer exists only while a write waits.
                match Box::pin(tokio::time::timeout(stall, stream.writable())).await {
                    Ok(r) => r?,
                    Err(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client took no bytes for upstream.idle_timeout",
                        ))
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A refused head's answer: the status alone, then the connection closes.
async fn refuse(stream: &TcpStream, status: StatusCode, stall: Duration) -> io::Result<()> {
    let mut head = Vec::with_capacity(128);
    status_line(&mut head, status);
    head.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n");
    date_field(&mut head);
    head.extend_from_slice(b"\r\n");
    write_all(stream, &mut Out::with(head), stall).await
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `date: <now>\r\n`, the value formatted once a second per shard.
fn date_field(out: &mut Vec<u8>) {
    let unix = crate::clock::unix_time();
    let secs = unix.as_secs();
    DATE_CACHE.with_borrow_mut(|(at, value)| {
        if *at != secs {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(now)) {
                *value = v;
                *at = secs;
            }
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// How an answer's body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delimit {
    /// No body is written (HEAD, 1xx, 204, 304).
    Bodyless,
    Length(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0 with no length).
    Close,
}

/// Write an answer. `Ok(true)`: the connection may carry another request.
async fn write_response<B>(
    stream: &TcpStream,
    resp: Response<B>,
    version: Version,
    is_head: bool,
    mut keep_alive: bool,
    stall: Duration,
) -> io::Result<bool>
where
    B: Body<Data = Bytes> + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let headers = parts.headers;
    let bodyless = is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // The framing is this connection's: a Transfer-Encoding from elsewhere is not copied,
    // and the length is written once, by this connection, from what the answer says or
    // knows: a list of equal lengths is one length; lengths that differ or do not parse are
    // none; `Connection` is this connection's too. One walk notes the length and the date
    // (lookups would hash each name again), and the fields' walk below leaves those three out.
    let mut length = Length::Absent;
    let mut dated = false;
    for (name, value) in &headers {
        if name == CONTENT_LENGTH {
            length = length.add(value.as_bytes());
        } else if name == DATE {
            dated = true;
        }
    }
    let declared = match length {
        Length::One(n) => Some(n),
        Length::Absent | Length::Bad => None,
    };
    let mut head = Vec::with_capacity(256 + headers.len() * 48);
    status_line(&mut head, status);
    let delimit = if bodyless {
        // A HEAD's or a 304's length describes the body not sent; 1xx and 204 have none.
        if let (Some(n), true) = (declared, is_head || status == StatusCode::NOT_MODIFIED) {
            length_field(&mut head, n);
        }
        Delimit::Bodyless
    } else {
        match declared.or_else(|| body.size_hint().exact()) {
            Some(n) => {
                length_field(&mut head, n);
                Delimit::Length(n)
            }
            None if body.is_end_stream() => {
                length_field(&mut head, 0);
                Delimit::Length(0)
            }
            None if version == Version::HTTP_11 => Delimit::Chunked,
            None => Delimit::Close,
        }
    };
    match delimit {
        Delimit::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Delimit::Close => keep_alive = false,
        _ => {}
    }
    if !keep_alive {
        head.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        head.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !dated {
        date_field(&mut head);
    }
    for (name, value) in &headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == CONNECTION {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let mut out = Out::with(head);
    if matches!(delimit, Delimit::Bodyless | Delimit::Length(0)) {
        // Nothing to send: the body is not polled (as hyper does not), so its end cannot
        // hold the connection.
        drop(body);
        write_all(stream, &mut out, stall).await?;
        return Ok(keep_alive);
    }
    let mut sent: u64 = 0;
    loop {
        // Wait for a frame only when nothing is waiting to be written; else take what is
        // ready at once, so events that come together leave in one write.
        let frame = if out.is_empty() {
            std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        } else {
            match poll_now(&mut body) {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    write_all(stream, &mut out, stall).await?;
                    continue;
                }
            }
        };
        match frame {
            None => break,
            Some(Err(_)) => {
                // The answer cannot be finished: what was written stands, the connection
                // closes, and a chunked body lacks its last chunk, so the client knows.
                write_all(stream, &mut out, stall).await?;
                return Ok(false);
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                match delimit {
                    Delimit::Chunked => {
                        let mut line = [0u8; 18];
                        out.copy(hex_line(data.len(), &mut line));
                        out.data(data);
                        out.copy(b"\r\n");
                    }
                    Delimit::Length(n) => {
                        let room = n - sent;
                        if data.len() as u64 > room {
                            // More than the length said: what fits is written, then the
                            // connection closes.
                            out.data(data.slice(..room as usize));
                            write_all(stream, &mut out, stall).await?;
                            return Ok(false);
                        }
                        sent += data.len() as u64;
                        out.data(data);
                        if sent == n {
                            // Complete: not polled again, as hyper does not.
                            break;
                        }
                    }
                    Delimit::Close => out.data(data),
                    Delimit::Bodyless => {}
                }
            }
        }
        if out.len >= WRITE_BATCH {
            write_all(stream, &mut out, stall).await?;
        }
    }
    drop(body);
    match delimit {
        Delimit::Chunked => out.copy(b"0\r\n\r\n"),
        Delimit::Length(n) if sent != n => {
            // Shorter than its length: the client would wait for bytes that never come.
            write_all(stream, &mut out, stall).await?;
            return Ok(false);
        }
        _ => {}
    }
    write_all(stream, &mut out, stall).await?;
    Ok(keep_alive)
}

/// A body's next frame if it has one ready, without waiting (a waiting body is polled again
/// with the task's waker before the task sleeps).
#[allow(clippy::type_complexity)]
fn poll_now<B: Body + Unpin>(body: &mut B) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
    Pin::new(body).poll_frame(&mut Context::from_waker(Waker::noop()))
}

/// The one length a head's Content-Length values give (`5`, `5, 5`), gathered value by
/// value in the walk over its fields: for a request's head and an answer's alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Length {
    /// No Content-Length field.
    Absent,
    /// Every value seen so far is this length.
    One(u64),
    /// Values that differ, or one that is not a length.
    Bad,
}

impl Length {
    /// With one more field's value (a list of lengths, RFC 9112 §6.3).
    fn add(self, value: &[u8]) -> Length {
        let mut now = self;
        for part in value.split(|&b| b == b',') {
            now = match (now, content_length(part)) {
                (Length::Bad, _) | (_, None) => return Length::Bad,
                (Length::One(l), Some(n)) if l != n => return Length::Bad,
                (_, Some(n)) => Length::One(n),
            };
        }
        now
    }
}

/// Where a head's field names and values lie in its bytes, found by httparse while it borrows
/// them and used once they are frozen.
type Span = ((usize, usize), (usize, usize));

thread_local! {
    /// The shard's list of spans, kept from head to head (at most `MAX_HEADERS` long), so a
    /// head's parse allocates only its header map.
    static SPANS: std::cell::Cell<Vec<Span>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The shard's span list while a head is parsed, empty, and given back when dropped.
struct Spans(Vec<Span>);

impl Spans {
    fn take() -> Spans {
        Spans(SPANS.take())
    }
}

impl Drop for Spans {
    fn drop(&mut self) {
        let mut list = std::mem::take(&mut self.0);
        list.clear();
        SPANS.set(list);
    }
}

fn length_field(head: &mut Vec<u8>, n: u64) {
    head.extend_from_slice(b"content-length: ");
    head.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    head.extend_from_slice(b"\r\n");
}

/// A chunk's size line: `n` in hexadecimal and CRLF.
fn hex_line(mut n: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf[16] = b'\r';
    buf[17] = b'\n';
    let mut i = 16;
    loop {
        i -= 1;
        buf[i] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// For the `http1` fuzz target: the head parser and the chunked decoder on `bytes`, whole and
/// fed in two pieces split at `split`. Panics if the two readings differ, or if a decoder
/// gives more data than it was given bytes.
#[doc(hidden)]
pub fn check_split(bytes: &[u8], split: usize) {
    let split = split.min(bytes.len());
    let max = 8192;
    let whole = parse_head(&mut BytesMut::from(bytes), max);
    let mut buf = BytesMut::from(&bytes[..split]);
    let mut parts = parse_head(&mut buf, max);
    if matches!(parts, Ok(None)) {
        buf.extend_from_slice(&bytes[split..]);
        parts = parse_head(&mut buf, max);
    }
    assert_eq!(
        format!("{whole:?}"),
        format!("{parts:?}"),
        "the head read whole and in two pieces differ"
    );
    let decode = |pieces: &[&[u8]]| {
        let mut state = Decoder::new();
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut pieces = pieces.iter();
        loop {
            match state.step(&mut buf) {
                Ok(Step::Data(d)) => data.extend_from_slice(&d),
                Ok(Step::End) => {
                    let rest: usize = buf.len() + pieces.map(|p| p.len()).sum::<usize>();
                    return Ok((data, rest));
                }
                Ok(Step::NeedMore) => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return Err(Some(data)),
                },
                Err(_) => return Err(None),
            }
        }
    };
    let one = decode(&[bytes]);
    let two = decode(&[&bytes[..split], &bytes[split..]]);
    // A fault is found at the same byte however the bytes come, and so is the end.
    assert_eq!(
        one, two,
        "the chunked body read whole and in two pieces differ"
    );
    if let Ok((data, _)) = &one {
        assert!(data.len() <= bytes.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Xorshift;
    use http_body_util::BodyExt;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn head(bytes: &[u8]) -> Result<Option<Head>, Refused> {
        parse_head(&mut BytesMut::from(bytes), 8192)
    }

    fn status(bytes: &[u8]) -> StatusCode {
        match head(bytes) {
            Err(Refused(s)) => s,
            other => panic!(
                "{:?} was not refused: {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    #[test]
    fn a_head_is_parsed_in_place_and_what_follows_it_stays() {
        let mut buf = BytesMut::from(
            &b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-Two: 1\r\nx-two: 2\r\n\r\nhelloGET"[..],
        );
        let h = parse_head(&mut buf, 8192).unwrap().unwrap();
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.uri, "/v1/chat?x=1");
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.keep_alive);
        let two: Vec<_> = h.headers.get_all("x-two").iter().collect();
        assert_eq!(two, ["1", "2"]);
        assert_eq!(&buf[..], b"helloGET");
        // Not complete yet: nothing is taken.
        let mut part = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: a\r\n"[..]);
        assert!(parse_head(&mut part, 8192).unwrap().is_none());
        assert_eq!(part.len(), 25);
    }

    /// `field_value` takes what httparse passed without checking it again: every byte at every
    /// place of a value (across the 16- and 32-byte strides of httparse's SIMD paths) either
    /// makes the head refused or yields the value `HeaderValue::from_bytes` would have made.
    #[test]
    fn a_value_is_taken_as_header_value_would_take_it() {
        let mut taken = 0;
        for at in 0..70 {
            for b in 0..=255u8 {
                let mut value = vec![b'v'; 70];
                value.insert(at, b);
                let mut req = b"GET / HTTP/1.1\r\nHost: a\r\nx-v: ".to_vec();
                req.extend_from_slice(&value);
                req.extend_from_slice(b"\r\n\r\n");
                let Ok(Some(h)) = head(&req) else { continue };
                for v in h.headers.values() {
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
        // Every byte `http` takes was taken everywhere: 70 places times 224 bytes.
        assert_eq!(taken, 70 * 224);
    }

    /// The table of known names gives, in any case, exactly the name `from_bytes` makes, and
    /// nothing for a name that is only near one of them.
    #[test]
    fn a_known_name_is_the_name_from_bytes_makes() {
        let names = known_names();
        assert_eq!(names.len(), 19);
        for name in [
            crate::upstream::MAX_WAIT_HEADER,
            crate::upstream::CLIENT_HEADER,
            crate::upstream::X_API_KEY,
        ] {
            assert!(names.contains(&name), "{name} is known");
        }
        let same = |b: &[u8]| {
            let from_bytes = HeaderName::from_bytes(b).ok();
            assert_eq!(
                field_name(b).ok(),
                from_bytes,
                "{:?}",
                String::from_utf8_lossy(b)
            );
            from_bytes
        };
        for known in &names {
            let text = known.as_str().as_bytes();
            assert!(text.len() <= KNOWN_NAME_MAX);
            let mut title = text.to_vec();
            for i in 0..title.len() {
                if i == 0 || title[i - 1] == b'-' {
                    title[i] = title[i].to_ascii_uppercase();
                }
            }
            for variant in [text.to_vec(), text.to_ascii_uppercase(), title] {
                assert_eq!(known_name(&variant).as_ref(), Some(known));
                assert_eq!(same(&variant).as_ref(), Some(known));
            }
            let mut longer = text.to_vec();
            longer.push(b'x');
            let mut off = text.to_vec();
            *off.last_mut().unwrap() ^= 0x01;
            let mut spaced = text.to_vec();
            spaced.insert(2, b' ');
            for near in [text[..text.len() - 1].to_vec(), longer, off, spaced] {
                let made = same(&near);
                let expected = made.filter(|n| names.contains(n));
                assert_eq!(
                    known_name(&near),
                    expected,
                    "{:?}",
                    String::from_utf8_lossy(&near)
                );
            }
        }
        // Names the table does not hold are made as before.
        for other in [
            &b"x-"[..],
            b"x",
            b"X-Other",
            b"content-type",
            b"x-\xff",
            b"",
        ] {
            same(other);
        }
    }

    #[test]
    fn framing_and_keep_alive_follow_rfc_9112() {
        let h = |b: &[u8]| head(b).unwrap().unwrap();
        // Repeated equal lengths are one length.
        assert_eq!(
            h(b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n").framing,
            Framing::Length(5)
        );
        assert_eq!(
            h(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").framing,
            Framing::None
        );
        assert_eq!(h(b"GET / HTTP/1.1\r\n\r\n").framing, Framing::None);
        // Chunked wins over a length, which is dropped, and the connection closes after.
        let both = h(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(both.framing, Framing::Chunked);
        assert!(!both.headers.contains_key(CONTENT_LENGTH));
        assert!(!both.keep_alive);
        let chunked = h(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n");
        assert_eq!(chunked.framing, Framing::Chunked);
        assert!(chunked.keep_alive);
        // Keep-alive: HTTP/1.1 unless closed, HTTP/1.0 only if asked.
        assert!(!h(b"GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n").keep_alive);
        assert!(!h(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(h(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(
            h(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
                .expect_continue
        );
        assert!(
            !h(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
                .expect_continue
        );
        // Refused.
        let bad = StatusCode::BAD_REQUEST;
        for b in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding:\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: ,\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: \r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.2\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: 1\r\n b\r\n\r\n",
        ] {
            assert_eq!(status(b), bad, "{:?}", String::from_utf8_lossy(b));
        }
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            StatusCode::NOT_IMPLEMENTED
        );
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(status(&many), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        // Over the limit before the head is whole, and whole but over it.
        let long = [&b"GET /"[..], &[b'a'; 9000]].concat();
        assert_eq!(status(&long), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let whole = [&long[..], b" HTTP/1.1\r\n\r\n"].concat();
        assert_eq!(status(&whole), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }

    /// A chunked body with extensions and a trailer, then the next request's bytes.
    const CHUNKED: &[u8] =
        b"5;ext=\"a\"\r\nhello\r\n1 \r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";

    fn decode(pieces: &[&[u8]]) -> Result<(Vec<u8>, Vec<u8>), BodyFault> {
        let mut state = Decoder::new();
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut pieces = pieces.iter();
        loop {
            match state.step(&mut buf)? {
                Step::Data(d) => data.extend_from_slice(&d),
                Step::End => {
                    let rest = pieces.fold(buf.to_vec(), |mut r, p| {
                        r.extend_from_slice(p);
                        r
                    });
                    return Ok((data, rest));
                }
                Step::NeedMore => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return Err(BodyFault("ran out")),
                },
            }
        }
    }

    #[test]
    fn a_chunked_body_decodes_the_same_however_it_is_split() {
        let want = (b"hello world!".to_vec(), b"NEXT".to_vec());
        assert_eq!(decode(&[CHUNKED]).unwrap(), want);
        let bytes: Vec<&[u8]> = CHUNKED.chunks(1).collect();
        assert_eq!(decode(&bytes).unwrap(), want);
        let mut rng = Xorshift::new();
        for _ in 0..500 {
            let (a, b) = (rng.below(CHUNKED.len()), rng.below(CHUNKED.len()));
            let (a, b) = (a.min(b), a.max(b));
            let got = decode(&[&CHUNKED[..a], &CHUNKED[a..b], &CHUNKED[b..]]).unwrap();
            assert_eq!(got, want, "split at {a} and {b}");
        }
    }

    #[test]
    fn a_broken_chunked_body_is_a_fault_not_a_guess() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX: 1\n\r\n",
            b"11111111111111111\r\n",
            b"1 2\r\nx\r\n",
            b"1 x\r\nx\r\n",
            b"5\t\x00\r\nhello\r\n",
        ] {
            assert!(
                decode(&[bad, b"\r\n0\r\n\r\n"]).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long_ext = [&b"1;"[..], &[b'a'; MAX_CHUNK_LINE], b"\r\nx\r\n0\r\n\r\n"].concat();
        assert!(decode(&[&long_ext]).is_err());
        // Extensions within each line's limit, but too many together.
        let ext_line = [&b"1;"[..], &[b'a'; 100], b"\r\nx\r\n"].concat();
        let many_ext = ext_line.repeat(MAX_EXTENSIONS / 100 + 1);
        assert!(decode(&[&many_ext, b"0\r\n\r\n"]).is_err());
        let within = b"1 \t;a=b\r\nx\r\n".repeat(100);
        assert!(decode(&[&within, b"0\r\n\r\n"]).is_ok());
        let long_trailer = [&b"0\r\nX: "[..], &[b'a'; MAX_TRAILERS], b"\r\n\r\n"].concat();
        assert!(decode(&[&long_trailer]).is_err());
        // The largest size that fits in 64 bits is read as a size, not refused.
        let mut state = Decoder::new();
        let mut buf = BytesMut::from(&b"ffffffffffffffff\r\nab"[..]);
        assert_eq!(
            state.step(&mut buf).unwrap(),
            Step::Data(Bytes::from_static(b"ab"))
        );
        assert_eq!(state.at, Chunk::Data(u64::MAX - 2));
    }

    #[test]
    fn numbers_are_written_as_they_read() {
        for n in [0u64, 9, 10, 4096, u64::MAX] {
            let n = n as usize;
            assert_eq!(hex_line(n, &mut [0; 18]), format!("{n:x}\r\n").as_bytes());
        }
        assert_eq!(content_length(b" 42 "), Some(42));
        assert_eq!(content_length(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(content_length(b"18446744073709551616"), None);
        assert_eq!(content_length(b"-1"), None);
    }

    #[test]
    fn pending_bytes_advance_across_pieces() {
        let mut out = Out::with(b"head".to_vec());
        out.data(Bytes::from(vec![b'x'; COPY_AT_MOST + 1]));
        out.copy(b"\r\n");
        assert_eq!(out.pieces.len(), 3);
        let total = out.len;
        out.advance(2);
        assert_eq!(out.offset, 2);
        out.advance(3);
        assert_eq!((out.pieces.len(), out.offset), (2, 1));
        out.advance(total - 5);
        assert!(out.is_empty());
        assert!(out.pieces.is_empty());
    }

    // ----- over a socket ----------------------------------------------------------------

    /// A body of frames handed out one per poll, each after one `Pending`.
    struct Trickle(std::collections::VecDeque<Bytes>, bool);

    impl Body for Trickle {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.1 = !self.1;
            if self.1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn settings() -> Settings {
        Settings {
            max_head: 8192,
            head_timeout: Duration::from_secs(30),
            write_stall: Duration::from_secs(30),
        }
    }

    /// `serve` on one accepted connection with `handler`: the address to connect to, the
    /// stop signal, and how the connection ended.
    async fn serve_one<F, Fut, B>(
        handler: F,
    ) -> (
        SocketAddr,
        watch::Sender<bool>,
        tokio::task::JoinHandle<&'static str>,
    )
    where
        F: FnMut(Request<ClientBody>) -> Fut + Send + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: Body<Data = Bytes, Error = BoxError> + Unpin + Send + 'static,
    {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut rx = rx;
            match serve(&s, handler, &settings(), &mut rx).await {
                Served::Closed => "closed",
                Served::Finish => {
                    finish(s);
                    "finished"
                }
                Served::H2(..) => "h2",
            }
        });
        (addr, tx, task)
    }

    /// A server whose handler answers `<method> <path> <body>` (the body read whole),
    /// streamed in pieces if the path is `/trickle`.
    async fn server() -> (
        SocketAddr,
        watch::Sender<bool>,
        tokio::task::JoinHandle<&'static str>,
    ) {
        serve_one(|req: Request<ClientBody>| async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes());
            let text = match body {
                Ok(b) => format!(
                    "{} {} {}",
                    parts.method,
                    parts.uri,
                    String::from_utf8_lossy(&b)
                ),
                Err(e) => format!("body error: {e}"),
            };
            let pieces = if parts.uri == "/trickle" {
                text.into_bytes()
                    .chunks(3)
                    .map(Bytes::copy_from_slice)
                    .collect()
            } else {
                [Bytes::from(text)].into()
            };
            Response::new(Trickle(pieces, false))
        })
        .await
    }

    /// The `100 Continue` the connection sends once the handler asks for the body.
    async fn read_continue(c: &mut TcpStream) {
        let mut first = [0u8; 25];
        c.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    async fn read_all(c: &mut TcpStream) -> String {
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Undo chunked coding the simple way (the test's own decoder, not the one under test).
    fn unchunk(mut s: &str) -> String {
        let mut out = String::new();
        loop {
            let (size, rest) = s.split_once("\r\n").unwrap();
            let n = usize::from_str_radix(size, 16).unwrap();
            if n == 0 {
                return out;
            }
            out.push_str(&rest[..n]);
            s = &rest[n + 2..];
        }
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_then_the_close_is_seen() {
        let (addr, _stop, task) = server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /trickle HTTP/1.1\r\n\r\nPOST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        let all = read_all(&mut c).await;
        let answers: Vec<&str> = all.split("HTTP/1.1 200 OK\r\n").skip(1).collect();
        assert_eq!(answers.len(), 3, "{all}");
        // Unknown lengths are chunked; the last answer says the connection closes.
        let body = |a: &str| a.split_once("\r\n\r\n").unwrap().1.to_string();
        assert!(answers[0].contains("transfer-encoding: chunked"));
        assert_eq!(unchunk(&body(answers[0])), "POST /a abc");
        assert_eq!(unchunk(&body(answers[1])), "GET /trickle ");
        assert!(answers[2].contains("connection: close"));
        assert_eq!(unchunk(&body(answers[2])), "POST /c hi");
        assert!(answers.iter().all(|a| a.contains("\r\ndate: ")));
        assert_eq!(task.await.unwrap(), "finished");
    }

    #[tokio::test]
    async fn a_body_that_arrives_in_pieces_reaches_the_handler_whole() {
        let (addr, _stop, task) = server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST /len HTTP/1.1\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        // The 100 comes before any body byte is sent.
        read_continue(&mut c).await;
        for piece in [&b"01234"[..], b"567", b"89"] {
            c.write_all(piece).await.unwrap();
            c.flush().await.unwrap();
        }
        c.write_all(
            b"POST /ch HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc",
        )
        .await
        .unwrap();
        c.write_all(b"\r\n2\r\nde\r\n0\r\n\r\n").await.unwrap();
        // Not shut: a client that closes its side while its request is in flight has gone.
        let all = read_all(&mut c).await;
        assert!(all.contains("POST /len 0123456789"), "{all}");
        assert!(all.contains("POST /ch abcde"), "{all}");
        assert_eq!(task.await.unwrap(), "finished");
    }

    #[tokio::test]
    async fn http_1_0_is_answered_and_closed_and_head_gets_no_body() {
        let (addr, _stop, _task) = server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /trickle HTTP/1.0\r\n\r\n").await.unwrap();
        let all = read_all(&mut c).await;
        // No length is known and HTTP/1.0 has no chunks: the close ends the body.
        assert!(all.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
        assert!(all.contains("connection: close"));
        assert!(!all.contains("transfer-encoding"));
        assert!(all.ends_with("\r\n\r\nGET /trickle "), "{all}");

        let (addr, _stop, _task) = server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"HEAD /x HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let all = read_all(&mut c).await;
        assert!(all.ends_with("\r\n\r\n"), "{all}");
    }

    #[tokio::test]
    async fn a_broken_head_or_body_is_refused_and_closes() {
        let (addr, _stop, task) = server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n")
            .await
            .unwrap();
        let all = read_all(&mut c).await;
        assert!(all.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{all}");
        assert!(all.contains("content-length: 0"));
        assert_eq!(task.await.unwrap(), "finished");

        let (addr, _stop, task) = server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET / HTTP/1.1\r\n\r\n",
        )
        .await
        .unwrap();
        let all = read_all(&mut c).await;
        // The handler sees the fault; nothing after it is read as a request.
        assert!(
            all.contains("body error: a chunk size line has no size"),
            "{all}"
        );
        assert_eq!(all.matches("HTTP/1.1 200").count(), 1, "{all}");
        assert!(all.contains("connection: close"));
        assert_eq!(task.await.unwrap(), "finished");
    }

    #[tokio::test]
    async fn the_http2_preface_is_handed_back_with_what_was_read() {
        let (addr, _stop, task) = server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&H2_PREFACE[..10]).await.unwrap();
        c.flush().await.unwrap();
        c.write_all(&H2_PREFACE[10..]).await.unwrap();
        assert_eq!(task.await.unwrap(), "h2");
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_request_drops_its_handler() {
        let (entered_tx, entered) = tokio::sync::oneshot::channel::<()>();
        let (dropped_tx, dropped) = tokio::sync::oneshot::channel::<()>();
        let mut hooks = Some((entered_tx, dropped_tx));
        let (addr, _stop, task) = serve_one(move |_req: Request<ClientBody>| {
            let (entered, dropped) = hooks.take().unwrap();
            async move {
                struct OnDrop(Option<tokio::sync::oneshot::Sender<()>>);
                impl Drop for OnDrop {
                    fn drop(&mut self) {
                        let _ = self.0.take().unwrap().send(());
                    }
                }
                let _guard = OnDrop(Some(dropped));
                let _ = entered.send(());
                std::future::pending::<Response<Trickle>>().await
            }
        })
        .await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        entered.await.unwrap();
        drop(c);
        dropped.await.expect("the handler was dropped");
        assert_eq!(task.await.unwrap(), "closed");
    }

    #[tokio::test]
    async fn the_stop_closes_an_idle_connection_and_ends_a_busy_one_after_its_answer() {
        let (addr, stop, task) = server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /a HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = c.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
        // Now idle between requests: the stop closes it without an answer.
        stop.send(true).unwrap();
        assert_eq!(read_all(&mut c).await, "");
        assert_eq!(task.await.unwrap(), "closed");

        // A request in flight at the stop is answered, says the connection closes, and
        // closes it. The 100 says the head was read before the stop.
        let (addr, stop, task) = server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST /a HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        read_continue(&mut c).await;
        stop.send(true).unwrap();
        c.write_all(b"hi").await.unwrap();
        let all = read_all(&mut c).await;
        assert!(all.contains("connection: close"), "{all}");
        assert!(all.contains("POST /a hi"), "{all}");
        assert_eq!(task.await.unwrap(), "finished");
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_its_end_is_said() {
        // A length: the channel closing before the length's bytes came is an error.
        let (tx, rx) = mpsc::channel(2);
        let mut body = ClientBody::Streamed(Streamed {
            rx,
            remaining: Some(10),
            wanted: None,
            done: false,
        });
        tx.send(Ok(Bytes::from_static(b"abc"))).await.unwrap();
        drop(tx);
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abc"
        );
        assert!(body.frame().await.unwrap().is_err());
        assert!(body.frame().await.is_none());
        // Chunked: only the empty piece is an end.
        for end in [true, false] {
            let (tx, rx) = mpsc::channel(2);
            let body = ClientBody::Streamed(Streamed {
                rx,
                remaining: None,
                wanted: None,
                done: false,
            });
            tx.send(Ok(Bytes::from_static(b"abc"))).await.unwrap();
            if end {
                tx.send(Ok(Bytes::new())).await.unwrap();
            }
            drop(tx);
            let got = body.collect().await.map(|b| b.to_bytes());
            assert_eq!(got.is_ok(), end, "with the end marker: {end}");
        }
    }

    #[tokio::test]
    async fn no_100_continue_for_a_body_the_handler_never_asks_for() {
        let (addr, _stop, task) = serve_one(|_req: Request<ClientBody>| async {
            let mut r = Response::new(crate::body::ResponseBody::empty());
            *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            r
        })
        .await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST /up HTTP/1.1\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        let all = read_all(&mut c).await;
        assert!(
            all.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
            "{all}"
        );
        assert!(!all.contains("100 Continue"), "{all}");
        assert!(all.contains("connection: close"), "{all}");
        assert_eq!(task.await.unwrap(), "finished");
    }

    /// What `write_response` puts on the wire for this answer to a GET (or a HEAD).
    async fn wire<B: Body<Data = Bytes> + Unpin>(resp: Response<B>, is_head: bool) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let keep = write_response(
            &s,
            resp,
            Version::HTTP_11,
            is_head,
            true,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        drop(s);
        let all = read_all(&mut c).await;
        format!("{keep} {all}")
    }

    #[tokio::test]
    async fn an_answer_carries_one_framing_and_only_its_own() {
        let full = |status: u16, lengths: &[&'static str], body: &'static str| {
            let mut r = Response::new(crate::body::ResponseBody::full(Bytes::from_static(
                body.as_bytes(),
            )));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            for l in lengths {
                r.headers_mut()
                    .append(CONTENT_LENGTH, HeaderValue::from_static(l));
            }
            r.headers_mut()
                .insert(TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
            r
        };
        // The length it says, written once; a list of equal lengths is one.
        let got = wire(full(200, &["5", "5, 5"], "hello"), false).await;
        assert_eq!(got.matches("content-length").count(), 1, "{got}");
        assert!(
            got.contains("content-length: 5\r\n") && got.ends_with("\r\n\r\nhello"),
            "{got}"
        );
        assert!(
            got.starts_with("true ") && !got.contains("transfer-encoding"),
            "{got}"
        );
        // Lengths that differ are none: the body's own size is used.
        let got = wire(full(200, &["5", "6"], "hello"), false).await;
        assert!(got.contains("content-length: 5\r\n"), "{got}");
        // A HEAD keeps its length and sends no body; a 204 has neither.
        let got = wire(full(200, &["42"], ""), true).await;
        assert!(
            got.contains("content-length: 42\r\n") && got.ends_with("\r\n\r\n"),
            "{got}"
        );
        let got = wire(full(204, &["42"], ""), false).await;
        assert!(!got.contains("content-length"), "{got}");
        // A body that is over before it starts is a length of 0, not a close-delimited body.
        let got = wire(Response::new(Trickle([].into(), false)), false).await;
        assert!(got.contains("transfer-encoding: chunked"), "{got}");
        let got = wire(Response::new(crate::body::ResponseBody::empty()), false).await;
        assert!(got.contains("content-length: 0\r\n"), "{got}");
        // A length of 0 is not waited on: a body that never ends does not hold the answer.
        struct Never;
        impl Body for Never {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                Poll::Pending
            }
        }
        let mut never = Response::new(Never);
        never
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        let got = wire(never, false).await;
        assert!(
            got.starts_with("true ") && got.contains("content-length: 0\r\n"),
            "{got}"
        );
        // Shorter than it said: written, then the connection closes.
        let got = wire(full(200, &["10"], "hello"), false).await;
        assert!(got.starts_with("false ") && got.ends_with("hello"), "{got}");
        // Longer: cut at the length, and closed.
        let got = wire(full(200, &["3"], "hello"), false).await;
        assert!(
            got.starts_with("false ") && got.ends_with("\r\n\r\nhel"),
            "{got}"
        );
    }

    #[tokio::test]
    async fn a_read_after_a_large_one_is_held_at_its_own_size() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let mut buf = BytesMut::new();
        c.write_all(&[b'a'; 60_000]).await.unwrap();
        while buf.len() < 60_000 {
            read_more(&s, &mut buf).await.unwrap();
        }
        let big = buf.split_to(60_000).freeze();
        c.write_all(b"0123456789").await.unwrap();
        read_more(&s, &mut buf).await.unwrap();
        assert_eq!(&buf[..], b"0123456789");
        // Not the 32 KiB or more that extending the split-off remainder would allocate.
        assert_eq!(buf.capacity(), 10);
        drop(big);
        // A head still partial grows by doubling, not by a copy per read.
        c.write_all(b"abc").await.unwrap();
        read_more(&s, &mut buf).await.unwrap();
        assert_eq!(buf.capacity(), 20);
    }

    /// A read that drained the socket leaves it not ready, so the next poll waits for the
    /// kernel instead of reading nothing; what comes next is still read, and a read that
    /// fills its buffer keeps the readiness, since more may be waiting.
    #[tokio::test]
    async fn a_short_read_clears_the_readiness_and_the_next_bytes_still_come() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let ready = |s: &TcpStream| {
            let waker = std::task::Waker::noop();
            s.poll_read_ready(&mut std::task::Context::from_waker(waker))
                .is_ready()
        };
        let mut buf = BytesMut::new();
        c.write_all(b"hello").await.unwrap();
        read_more(&s, &mut buf).await.unwrap();
        assert_eq!(&buf[..], b"hello");
        assert!(!ready(&s), "a drained socket is not ready");
        c.write_all(b" world").await.unwrap();
        while buf.len() < 11 {
            read_more(&s, &mut buf).await.unwrap();
        }
        assert_eq!(&buf[..], b"hello world");

        c.write_all(b"0123456789").await.unwrap();
        s.readable().await.unwrap();
        let mut small = [0u8; 4];
        assert_eq!(read_draining(&s, &mut small).unwrap(), 4);
        assert!(ready(&s), "a full read may have left more");
        assert_eq!(read_draining(&s, &mut small).unwrap(), 4);
        assert_eq!(read_draining(&s, &mut small).unwrap(), 2);
        assert_eq!(&small[..2], b"89");
        assert!(!ready(&s));
        // The end of stream is still seen once the kernel says so.
        drop(c);
        let mut rest = BytesMut::new();
        assert_eq!(read_more(&s, &mut rest).await.unwrap(), 0);
    }
}

//! The in-process upstream the integration tests put behind the proxy: an HTTP server on
//! `127.0.0.1:0` that answers with scripted [`Reply`]s and records every request it receives,
//! plus raw-TCP helpers for upstreams that misbehave below HTTP ([`raw_upstream`],
//! [`closed_port_url`]).
//!
//! Tests synchronise on events the mock exposes ([`MockUpstream::wait_for_requests`],
//! [`Gate`]s), never on sleeps. Every wait here is bounded by [`WAIT_LIMIT`] and panics with
//! what was seen so far, so a broken test fails with a message instead of hanging.
//!
//! Deliberately absent: TLS (the proxy accepts `http://` upstreams for exactly this) and any
//! knowledge of Chutes' semantics; tests script those replies themselves. Delays use
//! `tokio::time`, so the mock does not belong in `start_paused` tests: paused time jumps ahead
//! whenever the runtime is idle on sockets and would fire every delay and timeout at once.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long any wait in this module (and [`within`]) lasts before it panics. Generous because a
/// loaded 2-core CI machine can be slow; it exists to turn a hang into a failure, not to
/// measure anything.
pub const WAIT_LIMIT: Duration = Duration::from_secs(20);

/// Pause before retrying after `accept` fails (e.g. out of file descriptors under a load
/// test), so the accept loop backs off instead of spinning. Not synchronisation: nothing waits
/// for it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Awaits `fut`, panicking with `what` if it takes longer than [`WAIT_LIMIT`]. For the test's
/// own awaits (a response head, the next chunk) so a proxy that never answers fails the test.
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT_LIMIT, fut).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {WAIT_LIMIT:?} waiting for {what}"),
    }
}

/// A test-controlled latch, shared by cloning. Closed when created; [`Gate::open`] releases
/// everything waiting on it, now and later, and it never closes again.
///
/// A reply [`Reply::gated`] on it holds its response head, a reply that holds a chunk
/// ([`Reply::hold_chunk`]) holds that chunk: the test decides exactly when the upstream
/// answers, which makes concurrency and streaming tests deterministic.
#[derive(Clone, Debug)]
pub struct Gate {
    // A watch channel rather than `Notify`: a waiter that subscribes after `open` must still see
    // it open, and the flag and the wake-up live in one place.
    open: Arc<watch::Sender<bool>>,
}

impl Gate {
    pub fn new() -> Gate {
        Gate {
            open: Arc::new(watch::channel(false).0),
        }
    }

    pub fn open(&self) {
        self.open.send_replace(true);
    }

    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    async fn wait(&self) {
        let mut open = self.open.subscribe();
        // Cannot fail: `self` holds the sender.
        let _ = open.wait_for(|open| *open).await;
    }
}

impl Default for Gate {
    fn default() -> Gate {
        Gate::new()
    }
}

/// One scripted answer, built fluently: `Reply::json(429, r#"{"detail":"busy"}"#)
/// .header("retry-after", "3")`. Invalid status codes or header names panic at once, where the
/// test wrote them.
#[derive(Clone, Debug)]
pub struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    /// Applied only if no `content-type` was set with [`Reply::header`], so a test can override
    /// what `json`/`sse` imply.
    default_content_type: Option<HeaderValue>,
    chunks: Vec<Chunk>,
    /// Set by `chunks`/`sse`: always send chunked, even when every chunk is ready at once,
    /// because that is what a streaming upstream does.
    streamed: bool,
    ending: Ending,
    head_delay: Duration,
    head_gate: Option<Gate>,
    disconnect: bool,
}

#[derive(Clone, Debug)]
struct Chunk {
    delay: Duration,
    gate: Option<Gate>,
    data: Bytes,
}

/// What the body does once it has sent its chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    Finish,
    /// Send this many chunks, then nothing more, without ending.
    Stall(usize),
    /// Send this many chunks, then fail the body, which makes hyper drop the connection.
    Reset(usize),
}

impl Reply {
    /// `code` with an empty body.
    pub fn status(code: u16) -> Reply {
        let status = StatusCode::from_u16(code)
            .unwrap_or_else(|e| panic!("Reply::status({code}): invalid status code: {e}"));
        Reply {
            status,
            headers: HeaderMap::new(),
            default_content_type: None,
            chunks: Vec::new(),
            streamed: false,
            ending: Ending::Finish,
            head_delay: Duration::ZERO,
            head_gate: None,
            disconnect: false,
        }
    }

    /// `code` with `body` as `application/json` (not checked to be JSON: broken JSON is a
    /// legitimate thing to test with).
    pub fn json(code: u16, body: &str) -> Reply {
        Reply::text(code, "application/json", body)
    }

    pub fn text(code: u16, content_type: &str, body: &str) -> Reply {
        let mut reply = Reply::status(code).raw_body(body.to_owned());
        reply.default_content_type = Some(header_value("content-type", content_type));
        reply
    }

    /// Reads and records the request, then closes the connection without any response: an
    /// upstream that dies mid-request, as seen by a proxy that did get to send.
    pub fn disconnect() -> Reply {
        Reply {
            disconnect: true,
            // Never sent; any status would do.
            ..Reply::status(502)
        }
    }

    /// Adds a header; repeating a name adds another value (e.g. two `set-cookie`s).
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        let name = HeaderName::from_bytes(name.as_bytes())
            .unwrap_or_else(|e| panic!("Reply::header: invalid header name {name:?}: {e}"));
        let value = header_value(name.as_str(), value);
        self.headers.append(name, value);
        self
    }

    /// The whole body, any bytes (invalid UTF-8 included), sent with a `content-length`.
    pub fn raw_body(mut self, bytes: impl Into<Bytes>) -> Reply {
        self.chunks = vec![Chunk {
            delay: Duration::ZERO,
            gate: None,
            data: bytes.into(),
        }];
        self.streamed = false;
        self
    }

    /// A chunked body: each chunk is sent `delay` after the previous one was handed to the
    /// connection (the first, after the head), and the connection is flushed between chunks
    /// that have a delay or a gate, so each arrives on its own.
    pub fn chunks<B: Into<Bytes>>(
        mut self,
        chunks: impl IntoIterator<Item = (Duration, B)>,
    ) -> Reply {
        self.chunks = chunks
            .into_iter()
            .map(|(delay, data)| Chunk {
                delay,
                gate: None,
                data: data.into(),
            })
            .collect();
        self.streamed = true;
        self
    }

    /// [`Reply::chunks`] as `text/event-stream`. Build events with [`sse_data`].
    pub fn sse<B: Into<Bytes>>(self, chunks: impl IntoIterator<Item = (Duration, B)>) -> Reply {
        let mut reply = self.chunks(chunks);
        reply.default_content_type = Some(HeaderValue::from_static("text/event-stream"));
        reply
    }

    /// Holds chunk `index` (0-based, after `chunks`/`sse`/`raw_body`) until `gate` opens, then
    /// applies its delay. The proof that something streams: the client sees chunk 0 while the
    /// mock still holds chunk 1.
    pub fn hold_chunk(mut self, index: usize, gate: Gate) -> Reply {
        let len = self.chunks.len();
        let chunk = self.chunks.get_mut(index).unwrap_or_else(|| {
            panic!("Reply::hold_chunk({index}): the body has {len} chunks; set it first")
        });
        chunk.gate = Some(gate);
        self
    }

    /// Waits this long (after recording the request) before sending the response head.
    pub fn head_delay(mut self, delay: Duration) -> Reply {
        self.head_delay = delay;
        self
    }

    /// Holds the response head until `gate` opens. The request is recorded before the hold, so
    /// `wait_for_requests` sees requests that are waiting on a gate.
    pub fn gated(mut self, gate: Gate) -> Reply {
        self.head_gate = Some(gate);
        self
    }

    /// Sends the first `n` chunks (all of them, if fewer) and then neither more data nor the
    /// end of the body: the connection stays open and silent until the client gives up or the
    /// mock is dropped.
    pub fn stall_after(mut self, n_chunks: usize) -> Reply {
        self.ending = Ending::Stall(n_chunks);
        self
    }

    /// Sends the first `n` chunks (all of them, if fewer) and then drops the connection without
    /// ending the body, so the client sees a truncated chunked body: a body error.
    pub fn reset_after(mut self, n_chunks: usize) -> Reply {
        self.ending = Ending::Reset(n_chunks);
        self
    }

    fn into_response(self) -> Response<MockBody> {
        let mut chunks = VecDeque::from(self.chunks);
        match self.ending {
            Ending::Finish => {}
            Ending::Stall(n) | Ending::Reset(n) => chunks.truncate(n),
        }
        // Only a body that is all there at once and ends normally gets a length; anything
        // that waits, stalls or fails must go out chunked, as a real upstream's would.
        let exact_len = (!self.streamed
            && self.ending == Ending::Finish
            && chunks.iter().all(|c| c.gate.is_none() && c.delay.is_zero()))
        .then(|| chunks.iter().map(|c| c.data.len() as u64).sum());

        let mut response = Response::new(MockBody {
            chunks,
            ending: self.ending,
            waiting: None,
            exact_len,
            flushed_before_reset: false,
        });
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        if let Some(content_type) = self.default_content_type {
            response
                .headers_mut()
                .entry(CONTENT_TYPE)
                .or_insert(content_type);
        }
        response
    }
}

fn header_value(name: &str, value: &str) -> HeaderValue {
    HeaderValue::from_str(value)
        .unwrap_or_else(|e| panic!("invalid value {value:?} for header {name}: {e}"))
}

/// One SSE event carrying `data`: `data: {data}\n\n`. `sse_data("[DONE]")` is the OpenAI end
/// marker.
pub fn sse_data(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// The response body of a scripted reply. Hand-written rather than a spawned task feeding a
/// channel so that delays, gates and stalls live inside the connection's own task and die with
/// it.
struct MockBody {
    chunks: VecDeque<Chunk>,
    ending: Ending,
    /// The delay or gate in front of `chunks[0]`, created when hyper first asks for that chunk
    /// so a delay counts from the previous chunk, not from when the reply was built.
    waiting: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    exact_len: Option<u64>,
    flushed_before_reset: bool,
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(next) = this.chunks.front() else {
            return match this.ending {
                Ending::Finish => Poll::Ready(None),
                // Never woken, on purpose: see `Reply::stall_after`.
                Ending::Stall(_) => Poll::Pending,
                // hyper drops whatever it still has buffered when a body fails, which could
                // be the head and the chunks "sent" so far. Pending once (waking at once) lets
                // it flush them first; the error comes on the next poll.
                Ending::Reset(_) if !this.flushed_before_reset => {
                    this.flushed_before_reset = true;
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Ending::Reset(_) => Poll::Ready(Some(Err("mock upstream: reset_after".into()))),
            };
        };
        if this.waiting.is_none() && (next.gate.is_some() || !next.delay.is_zero()) {
            let (gate, delay) = (next.gate.clone(), next.delay);
            this.waiting = Some(Box::pin(async move {
                if let Some(gate) = gate {
                    gate.wait().await;
                }
                tokio::time::sleep(delay).await;
            }));
        }
        if let Some(waiting) = this.waiting.as_mut() {
            ready!(waiting.as_mut().poll(cx));
            this.waiting = None;
        }
        let chunk = this.chunks.pop_front().expect("front() was Some");
        Poll::Ready(Some(Ok(Frame::data(chunk.data))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.ending == Ending::Finish
    }

    fn size_hint(&self) -> SizeHint {
        self.exact_len
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// A request as the mock received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    /// The request target as received: path and query for an HTTP/1.1 origin-form target. An
    /// absolute-form target shows its scheme and host here, and so does every HTTP/2 request
    /// (hyper rebuilds it from the pseudo-headers); `uri.path_and_query()` compares either way.
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// The whole body, however it was framed (content-length or chunked).
    pub body: Bytes,
    /// False if the sender broke off mid-body; `body` then holds what arrived.
    pub body_complete: bool,
    /// When the request head arrived: compare these to check the spacing of forwarded requests.
    pub at: Instant,
    /// The proxy's end of the connection: equal for requests that shared a kept-alive one.
    pub peer: SocketAddr,
}

impl Recorded {
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// The first value of `name`, if present and printable.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as text, invalid UTF-8 replaced.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An upstream that answers scripted replies in order, falls back to a default, and records
/// every request. Stops when dropped (or at [`MockUpstream::shutdown`]).
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// The accept loop; aborting it ends every connection too (see `Tasks`).
    server: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Counters the `wait_for_*` methods watch; bumped after `state` has the new data.
    progress: watch::Sender<Progress>,
}

struct State {
    script: VecDeque<Reply>,
    default: Reply,
    log: Vec<Recorded>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    requests: usize,
    body_bytes: usize,
    connections: usize,
}

impl MockUpstream {
    /// Answers `200 {"ok":true}` (JSON) unless told otherwise.
    pub async fn start() -> MockUpstream {
        MockUpstream::start_with(Reply::json(200, r#"{"ok":true}"#)).await
    }

    pub async fn start_with(default: Reply) -> MockUpstream {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("mock upstream: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("mock upstream: local_addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                script: VecDeque::new(),
                default,
                log: Vec::new(),
            }),
            progress: watch::channel(Progress::default()).0,
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        MockUpstream {
            addr,
            shared,
            server: Some(server),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues `reply` for the next request that has none yet. Replies are handed out in the
    /// order requests are recorded, so the k-th entry of `requests()` got the k-th reply pushed
    /// (if it was pushed before that request arrived).
    pub fn push(&self, reply: Reply) {
        self.shared.state().script.push_back(reply);
    }

    /// The reply used once the pushed ones run out.
    pub fn set_default(&self, reply: Reply) {
        self.shared.state().default = reply;
    }

    /// How many pushed replies are still unused.
    pub fn pending_replies(&self) -> usize {
        self.shared.state().script.len()
    }

    /// Every request received so far, in the order they were recorded: when the body had been
    /// read, which is arrival order unless bodies were slow.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.state().log.clone()
    }

    pub fn count(&self) -> usize {
        self.shared.state().log.len()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.progress.borrow().connections
    }

    /// Waits until at least `n` requests have been recorded and returns them all (possibly
    /// more than `n`). Panics after [`WAIT_LIMIT`], listing what did arrive.
    pub async fn wait_for_requests(&self, n: usize) -> Vec<Recorded> {
        self.wait_until(&format!("{n} request(s)"), |p| p.requests >= n)
            .await;
        self.requests()
    }

    /// Waits until at least `n` request-body bytes (over all requests) have arrived, including
    /// bodies still being received: the proof that a request body streams through the proxy
    /// rather than being buffered to its end.
    pub async fn wait_for_body_bytes(&self, n: usize) {
        self.wait_until(&format!("{n} request body byte(s)"), |p| p.body_bytes >= n)
            .await;
    }

    /// Waits until at least `n` TCP connections have been accepted.
    pub async fn wait_for_connections(&self, n: usize) {
        self.wait_until(&format!("{n} connection(s)"), |p| p.connections >= n)
            .await;
    }

    /// Stops the server and waits until it has: afterwards connections to `addr` are refused
    /// (which merely dropping the mock cannot promise at once). Returns what it received.
    pub async fn shutdown(mut self) -> Vec<Recorded> {
        if let Some(server) = self.server.take() {
            server.abort();
            // The abort's JoinError is the expected outcome.
            let _ = server.await;
        }
        self.requests()
    }

    async fn wait_until(&self, what: &str, mut done: impl FnMut(&Progress) -> bool) {
        let mut progress = self.shared.progress.subscribe();
        let waited = tokio::time::timeout(WAIT_LIMIT, progress.wait_for(&mut done)).await;
        if waited.is_err() {
            let seen = self.shared.progress.borrow().to_owned();
            let mut log = String::new();
            for r in self.requests() {
                let _ = write!(log, "\n  {} {}", r.method, r.uri);
            }
            panic!(
                "mock upstream {}: timed out after {WAIT_LIMIT:?} waiting for {what}; got \
                 {} request(s), {} body byte(s), {} connection(s):{log}",
                self.url(),
                seen.requests,
                seen.body_bytes,
                seen.connections,
            );
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Never poisoned: nothing panics while holding the lock.
        self.state
            .lock()
            .expect("mock upstream state lock poisoned")
    }

    /// Logs `request` and picks its reply in one step, so log order and reply order agree.
    fn record(&self, request: Recorded) -> Reply {
        let reply = {
            let mut state = self.state();
            state.log.push(request);
            match state.script.pop_front() {
                Some(reply) => reply,
                None => state.default.clone(),
            }
        };
        self.progress.send_modify(|p| p.requests += 1);
        reply
    }
}

/// Spawns tasks that end when the `Tasks`' stop signal's sender is dropped. Used for
/// connections and, as hyper's executor, for HTTP/2 streams, so aborting the task that owns the
/// sender takes everything the server started down with it.
#[derive(Clone)]
struct Tasks {
    stopped: watch::Receiver<()>,
}

impl Tasks {
    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let mut stopped = self.stopped.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = fut => {}
                // Nothing is ever sent: this resolves (with an error) when the sender drops.
                _ = stopped.changed() => {}
            }
        });
    }
}

impl<F> hyper::rt::Executor<F> for Tasks
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.spawn(async move {
            fut.await;
        });
    }
}

/// The accept loop. Owns the stop signal's sender, so when this task is aborted every
/// connection it spawned ends as well.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let (_stop, stopped) = watch::channel(());
    let tasks = Tasks { stopped };
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(ACCEPT_BACKOFF).await;
            continue;
        };
        // SSE chunks must leave when they are written, not when Nagle decides.
        let _ = stream.set_nodelay(true);
        shared.progress.send_modify(|p| p.connections += 1);
        // HTTP/1.1 with keep-alive, or HTTP/2 with prior knowledge, whichever the client speaks.
        let builder = auto::Builder::new(tasks.clone());
        let shared = shared.clone();
        tasks.spawn(async move {
            let service = service_fn(move |request| handle(request, peer, shared.clone()));
            // Errors are the client's doing (or a `disconnect`/`reset_after` reply): nothing to
            // report, the test looks at what its client saw.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    request: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Result<Response<MockBody>, BoxError> {
    // hyper calls the service as soon as the head is parsed.
    let at = Instant::now();
    let (head, mut body) = request.into_parts();
    let mut received = BytesMut::new();
    let mut body_complete = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    received.extend_from_slice(&data);
                    shared.progress.send_modify(|p| p.body_bytes += data.len());
                }
            }
            Err(_) => {
                body_complete = false;
                break;
            }
        }
    }
    let reply = shared.record(Recorded {
        method: head.method,
        uri: head.uri,
        version: head.version,
        headers: head.headers,
        body: received.freeze(),
        body_complete,
        at,
        peer,
    });
    if let Some(gate) = &reply.head_gate {
        gate.wait().await;
    }
    if !reply.head_delay.is_zero() {
        tokio::time::sleep(reply.head_delay).await;
    }
    if reply.disconnect {
        // hyper closes the connection without a response when the service fails.
        return Err("mock upstream: disconnect".into());
    }
    Ok(reply.into_response())
}

/// A URL nothing listens on: binds `127.0.0.1:0`, notes the port and closes it, so
/// connections are refused. (Another test could in principle bind the same port in between;
/// the kernel hands out ephemeral ports in rotation, which makes that very unlikely.)
pub async fn closed_port_url() -> String {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("closed_port_url: bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("closed_port_url: local_addr");
    drop(listener);
    format!("http://{addr}")
}

/// A TCP listener on `127.0.0.1:0` that hands each accepted connection to a test closure,
/// for upstreams that break HTTP itself. Stops when dropped.
pub struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<watch::Sender<usize>>,
    server: JoinHandle<()>,
}

/// Starts a [`RawUpstream`] running `on_connection` for every connection, each in its own task:
///
/// ```ignore
/// let up = raw_upstream(|mut conn| async move {
///     read_request_head(&mut conn).await;
///     let _ = conn.write_all(b"HTTP/1.1 abc\r\n\r\n").await;
/// })
/// .await;
/// ```
///
/// A closure that returns at once (`|_conn| async {}`) accepts and closes.
pub async fn raw_upstream<F, Fut>(on_connection: F) -> RawUpstream
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("raw upstream: bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("raw upstream: local_addr");
    let connections = Arc::new(watch::channel(0).0);
    let counter = connections.clone();
    let server = tokio::spawn(async move {
        let (_stop, stopped) = watch::channel(());
        let tasks = Tasks { stopped };
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            };
            counter.send_modify(|n| *n += 1);
            tasks.spawn(on_connection(stream));
        }
    });
    RawUpstream {
        addr,
        connections,
        server,
    }
}

impl RawUpstream {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        *self.connections.borrow()
    }

    /// Waits until at least `n` connections have been accepted; panics after [`WAIT_LIMIT`].
    pub async fn wait_for_connections(&self, n: usize) {
        let mut accepted = self.connections.subscribe();
        let waited = tokio::time::timeout(WAIT_LIMIT, accepted.wait_for(|c| *c >= n)).await;
        if waited.is_err() {
            panic!(
                "raw upstream {}: timed out after {WAIT_LIMIT:?} waiting for {n} connection(s); \
                 got {}",
                self.url(),
                self.connections()
            );
        }
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Reads from `conn` until the end of a request head (`\r\n\r\n`) or EOF and returns what was
/// read, lossily as text. May read past the head into the body. For raw upstreams that should
/// answer only once the request is in, as a real server would.
pub async fn read_request_head(conn: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match within("a request head on a raw upstream", conn.read(&mut buf)).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

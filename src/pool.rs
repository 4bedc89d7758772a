//! The upstream's connections, kept by the proxy itself rather than a generic pooled client.
//!
//! An HTTP/1.1 connection serves one exchange at a time, so it is *leased* to that exchange
//! and driven by it: the request's own task polls the connection ([`crate::http1::client`]:
//! writing the request, reading and decoding the answer) right where it waits for the answer,
//! and the response body polls it again each time the client's side asks for more. There is
//! no connection task, no channel hop and no cross-task wake-up per request or per streamed
//! chunk, and when several SSE events are already in the socket the client's side takes them
//! all in one poll, so they are written to the client together (BENCHMARKS.md, issue 15).
//! When the body ends the connection goes back to the pool, newest first.
//!
//! Over TLS, ALPN offers HTTP/1.1 alone unless `upstream.http2` is set: hyper's HTTP/2 client
//! spawns two tasks per exchange beside the connection's own and costs 1.2–1.7× the CPU of
//! an HTTP/1.1 exchange over TLS; only many concurrent SSE streams come out ahead on it
//! (BENCHMARKS.md, third session of 2026-12-06).
//!
//! An HTTP/2 connection (chosen by ALPN when offered) is shared by every exchange; it runs in a
//! task of its own, as multiplexing needs, and hyper buffers each stream's DATA frames, so the
//! client's side takes what has arrived in one poll there too. It is let go after the idle
//! timeout unused and pings while streams are open. While ALPN may choose HTTP/2 (over TLS
//! until a dial has got through, and while it chooses it) a new connection is dialled by one
//! exchange at a time while the others wait for it: a cold start's burst makes one TLS
//! handshake. When ALPN chooses HTTP/1.1, or the dial fails, the exchanges that waited dial
//! their own, side by side. A dial (DNS, TCP, TLS, the handshake) takes at most
//! `upstream.connect_timeout`.
//!
//! Idle HTTP/1.1 connections are nobody's to drive. A connection is looked at when it is taken
//! (one poll: a close or stray bytes from the upstream end it there), and a sweeper drops
//! those idle longer than the idle timeout or closed by the upstream. A request that a reused
//! connection turned away before sending any of it (the upstream closed the connection just
//! then) is sent again on another; a fresh connection's failure is the answer.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
#[cfg(test)]
use std::pin::pin;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::uri::{Scheme, Uri};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

use crate::alarm::Alarm;
use crate::body::{BoxError, RequestBody};
use crate::config::UpstreamUrl;
use crate::http1::client::Conn;

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// At most this many idle HTTP/1.1 connections are kept; past it the oldest is closed.
const MAX_IDLE: usize = 512;
/// Sends of one request when reused connections turn it away unsent.
const MAX_TRIES: u32 = 3;
/// HTTP/2 keep-alive pings while streams are open, and how long one may go unanswered.
const H2_PING_EVERY: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// An answer's head, and the request's headers when the caller asked for them back.
pub type Sent = (Response<UpstreamBody>, Option<http::HeaderMap>);

pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// Scheme and authority: what the connector dials.
    dial: Uri,
    /// The `Host` an HTTP/1.1 request carries (the port only when it is not the scheme's).
    host: HeaderValue,
    h2: http2::Builder<TokioExecutor>,
    /// `upstream.connect_timeout`, for a whole dial: DNS, TCP, TLS and the HTTP handshake
    /// (the connector's own timeout bounds the TCP connect alone).
    connect_timeout: Duration,
    /// One per server shard ([`crate::server::shard`]): a connection is registered with the
    /// runtime that dialled it, and is only ever driven there.
    homes: Box<[Arc<Home>]>,
}

/// What a lease returns to: one shard's connections.
struct Home {
    state: Mutex<State>,
    idle_timeout: Duration,
    /// Held while a connection that may be HTTP/2 is dialled (see `State::speaks`).
    dialing: tokio::sync::Mutex<()>,
}

/// What the upstream speaks, as far as this shard has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Speaks {
    /// Over TLS, until a dial has got as far as ALPN's choice (a failed one changes
    /// nothing): it may be HTTP/2.
    Unknown,
    /// Plain HTTP (no ALPN), or ALPN chose HTTP/1.1 on the last dial that got that far.
    Http1,
    /// ALPN chose HTTP/2 on the last dial that got that far (and its handshake worked).
    Http2,
}

struct State {
    /// Oldest first; a checkout takes the newest, so the rest can age out.
    idle: VecDeque<Idle>,
    /// The HTTP/2 connection every exchange shares, once ALPN has chosen it, and when an
    /// exchange last took it: unused for the idle timeout, it is let go like an idle HTTP/1.1
    /// one (its streams in flight carry on), so a load balancer's idle cut-off never meets a
    /// request on it.
    shared: Option<(http2::SendRequest<RequestBody>, Instant)>,
    /// What the upstream spoke on this shard's last dial that got through. While it may be
    /// HTTP/2 (over TLS before any dial has, or ALPN chose it last time) a new connection is
    /// dialled by one exchange at a time, and the others wait for it instead of each dialling
    /// its own: a cold start's burst makes one TLS handshake, not one per request. A dial
    /// takes at most `connect_timeout`, so that is the longest anyone waits for another's.
    speaks: Speaks,
    /// The last dial failed (ran out of `connect_timeout`, or was given up by its exchange):
    /// the exchanges that waited for it dial side by side, each its own, until one gets
    /// through. Waiting for each other's failures would end the k-th after k dials.
    dial_failed: bool,
    sweeping: bool,
}

struct Idle {
    lease: Lease,
    since: Instant,
}

/// Records how a dial ended in its shard's `dial_failed` when dropped: when the dial returns,
/// or when the exchange dialling is dropped in the middle of it.
struct DialOutcome<'a> {
    home: &'a Home,
    got_through: bool,
}

impl Drop for DialOutcome<'_> {
    fn drop(&mut self) {
        let mut st = self.home.lock();
        // A failure counts only when nothing got through meanwhile: one that finishes after a
        // dial beside it made the shared connection says nothing about the next burst.
        st.dial_failed = !self.got_through && st.shared.as_ref().is_none_or(|(s, _)| s.is_closed());
    }
}

/// No answer head by the exchange's deadline (`upstream.first_byte_timeout`).
#[derive(Debug)]
pub struct Elapsed;

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no answer head before the exchange's deadline")
    }
}

impl std::error::Error for Elapsed {}

/// An HTTP/1.1 connection held by one exchange, which drives it.
pub struct Lease {
    conn: Box<Conn<Io>>,
    reused: bool,
    /// The first-byte deadline of the exchange holding the connection, kept with it from one
    /// exchange to the next (`crate::alarm`).
    alarm: Alarm,
}

impl Lease {
    /// Look at the connection (one poll): `false` when the upstream has closed it or sent
    /// bytes nobody asked for. The connection's I/O registers this task's waker.
    fn check(&mut self, cx: &mut Context<'_>) -> bool {
        self.conn.check(cx)
    }

    /// Still open and free for the next request (a poll made just now said so).
    fn reusable(&self) -> bool {
        self.conn.reusable()
    }
}

enum Checked {
    H1(Lease),
    H2 {
        send: http2::SendRequest<RequestBody>,
        reused: bool,
    },
}

impl Pool {
    /// The pool for `base`, dialling with `tls` over `tcp`. Over TLS, ALPN offers HTTP/1.1
    /// alone, or HTTP/2 first and HTTP/1.1 too with `http2` (`upstream.http2`): what the
    /// connector offers and what the pool expects of a dial are decided here together.
    pub fn new(
        tls: hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsProtocols1>,
        tcp: HttpConnector,
        http2: bool,
        base: &UpstreamUrl,
        idle_timeout: Duration,
        connect_timeout: Duration,
        shards: usize,
    ) -> Result<Pool, String> {
        let connector = if http2 {
            tls.enable_all_versions().wrap_connector(tcp)
        } else {
            tls.enable_http1().wrap_connector(tcp)
        };
        let dial = Uri::builder()
            .scheme(base.scheme.clone())
            .authority(base.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| format!("upstream.url: {e}"))?;
        let default_port = if base.scheme == Scheme::HTTPS {
            443
        } else {
            80
        };
        let host = match base.authority.port_u16() {
            Some(p) if p != default_port => format!("{}:{p}", base.authority.host()),
            _ => base.authority.host().to_string(),
        };
        let host =
            HeaderValue::from_str(&host).map_err(|_| format!("upstream.url: bad host {host}"))?;
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        // Pings while streams are open: a flow a middlebox dropped in silence fails its
        // streams within half a minute instead of each waiting out its own timeout.
        h2.timer(TokioTimer::new())
            .keep_alive_interval(H2_PING_EVERY)
            .keep_alive_timeout(H2_PING_TIMEOUT);
        Ok(Pool {
            connector,
            dial,
            host,
            h2,
            connect_timeout,
            homes: (0..shards.max(1))
                .map(|_| {
                    Arc::new(Home {
                        state: Mutex::new(State {
                            idle: VecDeque::new(),
                            shared: None,
                            speaks: if http2 && base.scheme == Scheme::HTTPS {
                                Speaks::Unknown
                            } else {
                                Speaks::Http1
                            },
                            dial_failed: false,
                            sweeping: false,
                        }),
                        idle_timeout,
                        dialing: tokio::sync::Mutex::new(()),
                    })
                })
                .collect(),
        })
    }

    /// `send_keeping` without the headers, for the tests.
    #[cfg(test)]
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        deadline: Instant,
    ) -> Result<Response<UpstreamBody>, BoxError> {
        self.send_keeping(req, deadline, false)
            .await
            .map(|(resp, _)| resp)
    }

    /// This shard's connections.
    fn home(&self) -> &Arc<Home> {
        &self.homes[crate::server::shard() % self.homes.len()]
    }

    /// Send `req` (its URI absolute: the configured upstream's) and wait for the response
    /// head until `deadline` ([`Elapsed`] then): the wait for a connection, a dial, the
    /// request's writing and the answer's head together. The response's body drives its
    /// HTTP/1.1 connection and returns it to the pool once it has been read to the end.
    ///
    /// On an HTTP/1.1 connection the deadline is the connection's own [`Alarm`], moved for
    /// each exchange; the wait for a connection has a timer only when it has to wait.
    ///
    /// With `keep`, the request's headers come back beside the answer, for a caller that may
    /// send the request again: an HTTP/1.1 connection only reads them and hands them back, an
    /// HTTP/2 one is given a clone (hyper takes the request).
    ///
    /// Not an `async fn`: that would keep the request twice (the argument and its moved copy)
    /// in a future every request in flight holds.
    #[allow(clippy::manual_async_fn)]
    pub fn send_keeping(
        &self,
        mut req: Request<RequestBody>,
        deadline: Instant,
        keep: bool,
    ) -> impl Future<Output = Result<Sent, BoxError>> + Send + '_ {
        async move {
            // Sending again is only for a request no byte of which left (a reused connection that
            // had just been closed); a few tries bound it even if each one finds another such.
            let mut tries = 0;
            loop {
                tries += 1;
                let again = tries < MAX_TRIES;
                // A connection at hand is taken in the first poll, before the timer is.
                let Ok(checked) = tokio::time::timeout_at(deadline, self.checkout()).await else {
                    return Err(Elapsed.into());
                };
                match checked? {
                    Checked::H2 { mut send, reused } => {
                        let kept = keep.then(|| req.headers().clone());
                        match tokio::time::timeout_at(deadline, send.try_send_request(req))
                            .await
                            .map_err(|_| Elapsed)?
                        {
                            Ok(resp) => {
                                let resp = resp.map(|body| UpstreamBody {
                                    inner: Inner::H2(body),
                                });
                                return Ok((resp, kept));
                            }
                            Err(mut e) => match e.take_message() {
                                Some(back) if reused && again => {
                                    self.forget_shared(&send);
                                    req = back;
                                }
                                _ => return Err(e.into_error().into()),
                            },
                        }
                    }
                    Checked::H1(mut lease) => {
                        // The connection writes the origin-form target and the `Host`, as
                        // HTTP/1.1 to a server wants, and leaves the request as it is, for
                        // HTTP/2 if it comes back unsent.
                        lease.conn.start(req, &self.host);
                        lease.alarm.set(deadline);
                        // The answer that is there wins over a deadline just passed, as in
                        // `timeout_at`. Given up, the lease is dropped: the connection, in the
                        // middle of an exchange, closes.
                        let head = poll_fn(|cx| match lease.conn.poll_head(cx) {
                            Poll::Ready(head) => Poll::Ready(Ok(head)),
                            Poll::Pending => Pin::new(&mut lease.alarm).poll(cx).map(Err),
                        })
                        .await
                        .map_err(|()| Elapsed)?;
                        match head {
                            Ok(head) if lease.conn.is_end_stream() => {
                                // No body (HEAD, 204, 304, a zero length): the connection goes
                                // back now, once what the request still owes is written.
                                poll_fn(|cx| {
                                    lease.conn.poll_finish(cx);
                                    Poll::Ready(())
                                })
                                .await;
                                // Taken kept or not: a connection back in the pool holds none.
                                let kept = lease.conn.take_headers().filter(|_| keep);
                                self.home().put(lease);
                                return Ok((head.map(|()| UpstreamBody::ended()), kept));
                            }
                            Ok(head) => {
                                let kept = lease.conn.take_headers().filter(|_| keep);
                                let home = Arc::clone(self.home());
                                let resp = head.map(|()| UpstreamBody {
                                    inner: Inner::H1(Some((lease, home))),
                                });
                                return Ok((resp, kept));
                            }
                            Err(e) => match lease.conn.take_unsent() {
                                Some(back) if lease.reused && again => req = back,
                                _ => return Err(e.into()),
                            },
                        }
                    }
                }
            }
        }
    }

    /// A connection for one exchange: the shared HTTP/2 one, the newest idle HTTP/1.1 one
    /// that is still open, or a new one.
    async fn checkout(&self) -> Result<Checked, BoxError> {
        let home = self.home();
        loop {
            let (taken, expired) = {
                let mut st = home.lock();
                if let Some(send) = st.take_shared(home.idle_timeout) {
                    return Ok(Checked::H2 { send, reused: true });
                }
                if st.speaks == Speaks::Http2 {
                    break;
                }
                let expired = st.expire(Instant::now(), home.idle_timeout);
                (st.idle.pop_back(), expired)
            };
            // Closed outside the lock: a close is a syscall.
            drop(expired);
            let Some(Idle { mut lease, .. }) = taken else {
                break;
            };
            // One poll: an upstream that closed the connection while it idled (or sent bytes
            // nobody asked for) ends it here, before a request is written to it.
            if poll_fn(|cx| Poll::Ready(lease.check(cx))).await {
                return Ok(Checked::H1(lease));
            }
        }
        if home.lock().speaks != Speaks::Http1 {
            // One dial at a time; whoever waited takes the connection it made.
            let one = home.dialing.lock().await;
            let alone = {
                let mut st = home.lock();
                if let Some(send) = st.take_shared(home.idle_timeout) {
                    return Ok(Checked::H2 { send, reused: true });
                }
                st.speaks == Speaks::Http1 || st.dial_failed
            };
            if alone {
                // The dial waited for chose HTTP/1.1 (nothing to share) or failed: each
                // exchange dials its own, side by side.
                drop(one);
            }
            return Box::pin(self.connect()).await;
        }
        // Boxed: dialing (TCP, TLS, the handshakes) is a 6 KiB future, needed once per
        // connection, and every exchange's own future would otherwise carry (and move) it.
        Box::pin(self.connect()).await
    }

    /// Dial a new connection: DNS, TCP, TLS and the HTTP handshake, within `connect_timeout`
    /// together. A TLS handshake the upstream never finishes is a connect failure, as one
    /// that fails is, and it does not keep the exchanges waiting for this dial any longer.
    ///
    /// A dial given up before it ends (its exchange's own deadline came first, when
    /// `first_byte_timeout` is the shorter) did not get through either: the exchanges that
    /// waited for it dial side by side, as after a failure. A client leaving does not give a
    /// dial up: its exchange is detached and carries on (`proxy::Detachable`); only the
    /// exchange's timeout or the runtime's end drops it.
    async fn connect(&self) -> Result<Checked, BoxError> {
        let mut outcome = DialOutcome {
            home: self.home(),
            got_through: false,
        };
        let done = match tokio::time::timeout(self.connect_timeout, self.dial()).await {
            Ok(done) => done,
            Err(_) => Err(format!(
                "no connection within upstream.connect_timeout ({})",
                crate::config::fmt_dur(self.connect_timeout)
            )
            .into()),
        };
        outcome.got_through = done.is_ok();
        done
    }

    async fn dial(&self) -> Result<Checked, BoxError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx)).await?;
        let io = connector.call(self.dial.clone()).await?;
        if io.connected().is_negotiated_h2() {
            let (send, conn) = self.h2.handshake(io).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            let mut st = self.home().lock();
            st.speaks = Speaks::Http2;
            if st.shared.as_ref().is_none_or(|(s, _)| s.is_closed()) {
                st.shared = Some((send.clone(), Instant::now()));
            }
            return Ok(Checked::H2 {
                send,
                reused: false,
            });
        }
        // No ALPN (plain HTTP), or it chose HTTP/1.1: idle connections are used again, and
        // dials no longer wait for each other.
        self.home().lock().speaks = Speaks::Http1;
        Ok(Checked::H1(Lease {
            conn: Box::new(Conn::new(io)),
            reused: false,
            alarm: Alarm::new(),
        }))
    }

    /// An HTTP/2 connection that turned a request away is not handed out again.
    fn forget_shared(&self, send: &http2::SendRequest<RequestBody>) {
        let mut st = self.home().lock();
        if st.shared.is_some() && send.is_closed() {
            st.shared = None;
        }
    }

    /// Idle HTTP/1.1 connections now.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.home().lock().idle.len()
    }
}

impl Home {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a list and an option: a panic elsewhere cannot leave it half-changed.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take back a connection whose exchange has ended, if it can serve another.
    fn put(self: &Arc<Home>, mut lease: Lease) {
        if !lease.reusable() {
            return;
        }
        lease.reused = true;
        let now = Instant::now();
        let (dropped, start_sweeper) = {
            let mut st = self.lock();
            let mut dropped = st.expire(now, self.idle_timeout);
            if st.idle.len() >= MAX_IDLE {
                dropped.extend(st.idle.pop_front());
            }
            st.idle.push_back(Idle { lease, since: now });
            let start = !st.sweeping;
            st.sweeping = true;
            (dropped, start)
        };
        drop(dropped);
        if start_sweeper {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(sweep(Arc::downgrade(self)));
            }
        }
    }
}

impl Home {
    /// Close idle connections past the idle timeout or already closed by the upstream. The
    /// list is looked at outside the lock (a look may read, a close is a syscall); what is
    /// still good goes back in front of anything returned meanwhile, which is newer.
    fn sweep_once(&self) {
        let looked_at = {
            let mut st = self.lock();
            drop(st.expire(Instant::now(), self.idle_timeout));
            std::mem::take(&mut st.idle)
        };
        // A poll with a waker that does nothing: the upstream's close shows as the
        // connection's end; the next checkout polls it again with its own waker.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut closed = Vec::new();
        let mut kept = VecDeque::with_capacity(looked_at.len());
        for mut idle in looked_at {
            if idle.lease.check(&mut cx) {
                kept.push_back(idle);
            } else {
                closed.push(idle);
            }
        }
        drop(closed);
        let mut st = self.lock();
        while let Some(idle) = kept.pop_back() {
            st.idle.push_front(idle);
        }
        let mut over = Vec::new();
        while st.idle.len() > MAX_IDLE {
            over.extend(st.idle.pop_front());
        }
        drop(st);
        drop(over);
    }
}

impl State {
    /// The shared HTTP/2 connection for one more exchange, if it is open and was used within
    /// the idle timeout (else it is let go).
    fn take_shared(&mut self, idle_timeout: Duration) -> Option<http2::SendRequest<RequestBody>> {
        // Over HTTP/1.1 there is none: no clock read for it.
        self.shared.as_ref()?;
        let now = Instant::now();
        match &mut self.shared {
            Some((send, used))
                if !send.is_closed() && now.saturating_duration_since(*used) < idle_timeout =>
            {
                *used = now;
                Some(send.clone())
            }
            Some(_) => {
                self.shared = None;
                None
            }
            None => None,
        }
    }

    /// The idle connections past their time, oldest first, out of the list (to be dropped
    /// once the lock is released).
    fn expire(&mut self, now: Instant, idle_timeout: Duration) -> Vec<Idle> {
        let mut out = Vec::new();
        while self
            .idle
            .front()
            .is_some_and(|i| now.saturating_duration_since(i.since) >= idle_timeout)
        {
            out.extend(self.idle.pop_front());
        }
        out
    }
}

/// Every few seconds, close idle connections past the idle timeout or already closed by the
/// upstream, so that a quiet proxy holds no stale sockets. Ends with the pool.
async fn sweep(home: Weak<Home>) {
    let period = match home.upgrade() {
        Some(h) => (h.idle_timeout / 5).max(Duration::from_secs(1)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(home) = home.upgrade() else {
            return;
        };
        home.sweep_once();
    }
}

/// An upstream response's body. Over HTTP/1.1 it carries the lease of its connection and
/// drives it: each poll reads and decodes what has arrived, and writes what the request still
/// owes.
pub struct UpstreamBody {
    inner: Inner,
}

enum Inner {
    H2(Incoming),
    /// `None` once the body has ended (the connection went back to the pool) or failed.
    H1(Option<(Lease, Arc<Home>)>),
}

impl UpstreamBody {
    /// A body with nothing in it.
    fn ended() -> UpstreamBody {
        UpstreamBody {
            inner: Inner::H1(None),
        }
    }
}

/// The body ended: the connection can serve another exchange.
fn release(lease: &mut Option<(Lease, Arc<Home>)>, cx: &mut Context<'_>) {
    if let Some((mut lease, home)) = lease.take() {
        // Lets the request finish writing, if anything of it is still owed.
        lease.conn.poll_finish(cx);
        home.put(lease);
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.inner {
            Inner::H2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Inner::H1(held) => {
                let Some((lease, _)) = held else {
                    return Poll::Ready(None);
                };
                match lease.conn.poll_data(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Ok(data))) => {
                        if lease.conn.is_end_stream() {
                            release(held, cx);
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Poll::Ready(None) => {
                        release(held, cx);
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => {
                        // A connection whose message failed is not reused.
                        *held = None;
                        Poll::Ready(Some(Err(e.into())))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::H2(body) => body.is_end_stream(),
            Inner::H1(None) => true,
            Inner::H1(Some((lease, _))) => lease.conn.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::H2(body) => body.size_hint(),
            Inner::H1(None) => SizeHint::with_exact(0),
            Inner::H1(Some((lease, _))) => lease.conn.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// An HTTP/1.1 upstream on loopback counting the connections it accepted; `/close` answers
    /// with `Connection: close`, `/sse` streams `n` events written at once, `/hang` never
    /// answers.
    async fn upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let path = req.uri().path().to_string();
                        if path == "/hang" {
                            std::future::pending::<()>().await;
                        }
                        let host = req.headers().get(http::header::HOST).cloned();
                        let body = req.into_body().collect().await?.to_bytes();
                        let mut resp = Response::new(Full::new(Bytes::from(format!(
                            "{path} {} {}",
                            host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("-"),
                            String::from_utf8_lossy(&body)
                        ))));
                        if path == "/close" {
                            resp.headers_mut()
                                .insert("connection", HeaderValue::from_static("close"));
                        }
                        if path == "/empty" {
                            *resp.status_mut() = http::StatusCode::NO_CONTENT;
                            *resp.body_mut() = Full::new(Bytes::new());
                        }
                        Ok::<_, hyper::Error>(resp)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn pool(addr: std::net::SocketAddr, idle_timeout: Duration) -> Pool {
        let cfg = crate::config::Config::from_toml(
            &format!("[upstream]\nurl = \"http://{addr}/\"\n"),
            &crate::config::Overrides::default(),
            &|_: &str| None,
        )
        .unwrap();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .unwrap()
            .https_or_http();
        Pool::new(tls, http, true, &cfg.upstream.url, idle_timeout, CONNECT, 1).unwrap()
    }

    fn request(addr: std::net::SocketAddr, path: &str, body: &'static str) -> Request<RequestBody> {
        let stats = Arc::new(crate::body::UploadStats::default());
        let mut req = Request::new(RequestBody::buffered(
            Bytes::from_static(body.as_bytes()),
            stats,
        ));
        *req.uri_mut() = format!("http://{addr}{path}").parse().unwrap();
        *req.method_mut() = http::Method::POST;
        req
    }

    /// A deadline no exchange of these tests reaches.
    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    async fn text(resp: Response<UpstreamBody>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// An exchange the upstream never answers, due `within` from now: given up then, not
    /// sooner, and not much later (paused time: only the deadline can end it).
    async fn given_up_after(pool: &Pool, addr: std::net::SocketAddr, within: Duration) {
        let started = Instant::now();
        let e = pool
            .send(request(addr, "/hang", ""), started + within)
            .await
            .err()
            .unwrap();
        assert!(e.is::<Elapsed>(), "{e}");
        let took = started.elapsed();
        assert!(
            took >= within && took < within + Duration::from_millis(5),
            "{took:?}"
        );
    }

    /// The first-byte deadline on a reused connection is its own exchange's, whatever the
    /// connection's timer was last set to: earlier than the last exchange's (the timer is
    /// filed again), or after it went off unused while the connection idled. An exchange
    /// given up closes its connection. Paused time with real sockets: the deadlines are the
    /// only timers, and every exchange but the `/hang` ones is answered at once.
    #[tokio::test(start_paused = true)]
    async fn a_reused_connection_keeps_each_exchange_s_own_deadline() {
        let (addr, accepted) = upstream().await;
        let pool = pool(addr, Duration::from_secs(600));
        let five = Duration::from_secs(5);
        text(pool.send(request(addr, "/a", ""), far()).await.unwrap()).await;
        // Reused; its timer is at an hour and must now go off at five seconds.
        given_up_after(&pool, addr, five).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // The given-up connection was closed: a new one, whose timer then goes off idle.
        text(
            pool.send(request(addr, "/b", ""), Instant::now() + five)
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        tokio::time::sleep(2 * five).await;
        given_up_after(&pool, addr, five).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the idle connection was used"
        );
    }

    #[tokio::test]
    async fn one_connection_serves_requests_one_after_another() {
        let (addr, accepted) = upstream().await;
        let pool = pool(addr, Duration::from_secs(50));
        for i in 0..5 {
            let resp = pool
                .send(request(addr, "/v1/x?a=1", "hello"), far())
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            // Origin-form target, the upstream's own Host, the body.
            assert_eq!(
                text(resp).await,
                format!("/v1/x 127.0.0.1:{} hello", addr.port())
            );
            assert_eq!(pool.idle(), 1, "after request {i}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_unread_or_a_close_does_not_come_back() {
        let (addr, accepted) = upstream().await;
        let pool = pool(addr, Duration::from_secs(50));
        let resp = pool.send(request(addr, "/close", ""), far()).await.unwrap();
        text(resp).await;
        assert_eq!(pool.idle(), 0, "a Connection: close answer is not pooled");
        let resp = pool.send(request(addr, "/a", ""), far()).await.unwrap();
        drop(resp);
        assert_eq!(pool.idle(), 0, "an unread body's connection is closed");
        let resp = pool.send(request(addr, "/b", ""), far()).await.unwrap();
        text(resp).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(pool.idle(), 1);
    }

    /// A response without a body (204 here; HEAD and 304 alike) may never be polled by
    /// hyper's server, which must not send one: its connection goes back with the head.
    #[tokio::test]
    async fn a_response_without_a_body_returns_its_connection_at_once() {
        let (addr, accepted) = upstream().await;
        let pool = pool(addr, Duration::from_secs(50));
        let resp = pool.send(request(addr, "/empty", ""), far()).await.unwrap();
        assert_eq!(resp.status(), 204);
        drop(resp);
        assert_eq!(pool.idle(), 1);
        text(pool.send(request(addr, "/next", ""), far()).await.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_exchanges_get_their_own_connections_and_all_come_back() {
        let (addr, accepted) = upstream().await;
        let pool = Arc::new(pool(addr, Duration::from_secs(50)));
        let heads: Vec<_> = futures_util::future::join_all(
            (0..4).map(|_| pool.send(request(addr, "/c", "x"), far())),
        )
        .await;
        for h in heads {
            text(h.unwrap()).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        assert_eq!(pool.idle(), 4);
    }

    /// The upstream closes an idle connection (a restart, its keep-alive timeout): it is
    /// dropped from the pool, and the next request goes out on a new one.
    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_replaced() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let close = Arc::new(tokio::sync::Notify::new());
        let closing = Arc::clone(&close);
        tokio::spawn(async move {
            // Answers one request per connection, then closes it, without saying so, when told.
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let closing = Arc::clone(&closing);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    closing.notified().await;
                });
            }
        });
        let pool = pool(addr, Duration::from_secs(50));
        assert_eq!(
            text(pool.send(request(addr, "/", ""), far()).await.unwrap()).await,
            "ok"
        );
        assert_eq!(pool.idle(), 1);
        close.notify_one();
        // The sweeper's look at idle connections sees the close once it has arrived.
        tokio::time::timeout(Duration::from_secs(10), async {
            while pool.idle() > 0 {
                pool.home().sweep_once();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the closed connection never left the pool");
        assert_eq!(
            text(pool.send(request(addr, "/", ""), far()).await.unwrap()).await,
            "ok"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// The mechanism behind the SSE numbers in BENCHMARKS.md: events that have reached the
    /// socket together are handed over one per poll with no wake-up in between (the body
    /// drives its connection), so the client's side takes them all before it writes once.
    #[tokio::test]
    async fn events_already_received_are_taken_without_waiting() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            // The head and ten events in one write: they arrive together.
            let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for i in 0..10 {
                let event = format!("data: {{\"n\":{i}}}\n\n");
                out.extend_from_slice(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes());
            }
            out.extend_from_slice(b"0\r\n\r\n");
            stream.write_all(&out).await.unwrap();
            // Held open: the end of the stream is the last chunk, not a close.
            let _ = stream.read(&mut buf).await;
        });
        let pool = pool(addr, Duration::from_secs(50));
        let resp = pool.send(request(addr, "/", ""), far()).await.unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"data: {\"n\":0}\n\n");
        // Polled with a waker that does nothing: any event that needed the socket read again,
        // or another task to run, would be Pending here.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for i in 1..10 {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(f))) => {
                    let data = f.into_data().unwrap();
                    assert_eq!(data, format!("data: {{\"n\":{i}}}\n\n").as_bytes());
                }
                other => panic!("event {i} was not ready: {:?}", other.map(|o| o.is_some())),
            }
        }
        assert!(matches!(
            Pin::new(&mut body).poll_frame(&mut cx),
            Poll::Ready(None)
        ));
        assert_eq!(
            pool.idle(),
            1,
            "the connection went back once the stream ended"
        );
    }

    const CONNECT: Duration = Duration::from_secs(5);

    fn test_certificate() -> (
        rustls::pki_types::CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        (
            CertificateDer::from(
                include_bytes!("../tests/it/fixtures/self_signed_cert.der").to_vec(),
            ),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                include_bytes!("../tests/it/fixtures/self_signed_key.der").to_vec(),
            )),
        )
    }

    /// A one-shard pool for `https://{addr}/` that trusts the test certificate and offers
    /// HTTP/2 by ALPN.
    fn tls_pool(addr: std::net::SocketAddr) -> Pool {
        tls_pool_offering(addr, true)
    }

    /// A one-shard pool for `https://{addr}/` that trusts the test certificate, offering
    /// HTTP/2 by ALPN only with `http2`.
    fn tls_pool_offering(addr: std::net::SocketAddr, http2: bool) -> Pool {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // The fixture is self-signed (a CA certificate, which webpki refuses as a server's):
        // these tests trust exactly that certificate, with the signatures still checked.
        let client = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ThisCertificate {
                cert: test_certificate().0,
                provider,
            }))
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(client)
            .https_only();
        let url = format!("[upstream]\nurl = \"https://{addr}/\"\n");
        let cfg = crate::config::Config::from_toml(
            &url,
            &crate::config::Overrides::default(),
            &|_: &str| None,
        )
        .unwrap();
        Pool::new(
            tls,
            http,
            http2,
            &cfg.upstream.url,
            Duration::from_secs(50),
            CONNECT,
            1,
        )
        .unwrap()
    }

    /// A TLS upstream on loopback, answering "{version} {path}" in whichever protocol ALPN
    /// chose. It offers h2 and http/1.1, or http/1.1 alone while the returned flag is set.
    /// Also: the connections it accepted, a notify that makes each HTTP/2 connection send a
    /// GOAWAY (an upstream restarting), and a pool for it.
    async fn tls_upstream(
        h1_only: bool,
    ) -> (
        std::net::SocketAddr,
        Arc<AtomicUsize>,
        Arc<tokio::sync::Notify>,
        Arc<std::sync::atomic::AtomicBool>,
        Pool,
    ) {
        let acceptor = |alpn: &[&[u8]]| {
            let (cert, key) = test_certificate();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut server = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert], key)
                .unwrap();
            server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            tokio_rustls::TlsAcceptor::from(Arc::new(server))
        };
        let (both, http1) = (acceptor(&[b"h2", b"http/1.1"]), acceptor(&[b"http/1.1"]));
        let only_h1 = Arc::new(std::sync::atomic::AtomicBool::new(h1_only));
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let goaway = Arc::new(tokio::sync::Notify::new());
        let going = Arc::clone(&goaway);
        let h1 = Arc::clone(&only_h1);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let acceptor = if h1.load(Ordering::SeqCst) {
                    http1.clone()
                } else {
                    both.clone()
                };
                let going = Arc::clone(&going);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let line = format!("{:?} {}", req.version(), req.uri().path());
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(line))))
                    });
                    if !h2 {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                        return;
                    }
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc);
                    let mut conn = pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = going.notified() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        });
        (addr, accepted, goaway, only_h1, tls_pool(addr))
    }

    /// Until the pool's shared HTTP/2 connection is gone or closed (after a GOAWAY).
    async fn shared_closed(pool: &Pool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !pool
                .home()
                .lock()
                .shared
                .as_ref()
                .is_none_or(|(s, _)| s.is_closed())
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the closed connection was never noticed");
    }

    fn https_request(addr: std::net::SocketAddr, path: &str) -> Request<RequestBody> {
        let mut req = request(addr, path, "");
        *req.uri_mut() = format!("https://{addr}{path}").parse().unwrap();
        req
    }

    /// What [`burst`] returns when every exchange went over `version`.
    fn answered(version: &str, prefix: &str) -> Vec<String> {
        (0..4).map(|i| format!("{version} /{prefix}{i}")).collect()
    }

    /// Four exchanges at once through `pool`: their answers' texts.
    async fn burst(pool: &Pool, addr: std::net::SocketAddr, prefix: &str) -> Vec<String> {
        let answers = futures_util::future::join_all(
            (0..4).map(|i| pool.send(https_request(addr, &format!("/{prefix}{i}")), far())),
        )
        .await;
        let mut texts = Vec::new();
        for a in answers {
            texts.push(text(a.unwrap()).await);
        }
        texts
    }

    /// Headers a request is sent with, a retry's to send again: repeated names, one the
    /// known-name table interns and one it does not.
    fn with_headers(mut req: Request<RequestBody>) -> Request<RequestBody> {
        let h = req.headers_mut();
        h.append("x-stainless-lang", HeaderValue::from_static("python"));
        h.append("x-trace", HeaderValue::from_static("a"));
        h.append("x-trace", HeaderValue::from_static("b"));
        h.append(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        req
    }

    /// With `keep`, the headers come back beside the answer exactly as the request had them,
    /// over HTTP/1.1 (an answer with a body and one without) and HTTP/2; without, none do.
    #[tokio::test]
    async fn kept_headers_come_back_as_they_were_sent() {
        let (addr, _) = upstream().await;
        let h1 = pool(addr, Duration::from_secs(600));
        for path in ["/a", "/empty", "/b"] {
            let req = with_headers(request(addr, path, "{}"));
            let sent = req.headers().clone();
            let (resp, kept) = h1.send_keeping(req, far(), true).await.unwrap();
            assert_eq!(kept.as_ref(), Some(&sent), "{path}");
            text(resp).await;
            let req = with_headers(request(addr, path, "{}"));
            let (resp, kept) = h1.send_keeping(req, far(), false).await.unwrap();
            assert!(kept.is_none(), "{path}");
            text(resp).await;
        }
        let (addr, _, _, _, h2) = tls_upstream(false).await;
        let req = with_headers(https_request(addr, "/h2"));
        let sent = req.headers().clone();
        let (resp, kept) = h2.send_keeping(req, far(), true).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(kept.as_ref(), Some(&sent));
        text(resp).await;
        let req = with_headers(https_request(addr, "/h2"));
        let (resp, kept) = h2.send_keeping(req, far(), false).await.unwrap();
        assert!(kept.is_none());
        text(resp).await;
    }

    /// With `upstream.http2`, TLS and HTTP/2 when ALPN picks it. A cold start's burst dials
    /// once; that connection then carries every exchange, concurrent ones included, and stays
    /// shared for the next; when the upstream closes it, the burst that follows waits for one
    /// new dial.
    #[tokio::test]
    async fn over_tls_alpn_h2_one_connection_carries_every_exchange_and_one_dial_replaces_it() {
        let (addr, accepted, goaway, _, pool) = tls_upstream(false).await;
        let want = |p: &str| answered("HTTP/2.0", p);
        assert_eq!(burst(&pool, addr, "cold").await, want("cold"));
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one dial for the cold burst"
        );
        assert_eq!(burst(&pool, addr, "c").await, want("c"));
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one shared connection");
        assert_eq!(pool.idle(), 0, "HTTP/2 is shared, never parked as idle");

        // The upstream closes it: the next burst dials one new connection, not one each.
        goaway.notify_waiters();
        shared_closed(&pool).await;
        assert_eq!(burst(&pool, addr, "d").await, want("d"));
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "one dial for the burst");
    }

    /// A cold burst of four over HTTP/1.1 has a connection each, and the next burst is carried
    /// by those, idle again once each body was read.
    async fn bursts_over_http1_each_with_its_own_connection(
        pool: &Pool,
        addr: std::net::SocketAddr,
        accepted: &AtomicUsize,
    ) {
        let want = |p: &str| answered("HTTP/1.1", p);
        assert_eq!(burst(pool, addr, "cold").await, want("cold"));
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
        assert_eq!(pool.idle(), 4, "each went back once its body was read");
        assert_eq!(burst(pool, addr, "again").await, want("again"));
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            4,
            "the idle ones carried it"
        );
    }

    /// Over TLS where ALPN picks HTTP/1.1: the cold burst's exchanges wait for the first dial
    /// only to learn that, then each has a connection of its own, and they are used again.
    #[tokio::test]
    async fn over_tls_alpn_http1_each_exchange_of_a_burst_has_its_own_connection() {
        let (addr, accepted, _, _, pool) = tls_upstream(true).await;
        bursts_over_http1_each_with_its_own_connection(&pool, addr, &accepted).await;
    }

    /// `upstream.http2 = false` (the default): an upstream that would choose HTTP/2 is offered
    /// HTTP/1.1 alone, and the pool knows it before any dial, so a cold burst dials side by
    /// side instead of waiting to learn what ALPN chose; the connections are used again.
    #[tokio::test]
    async fn over_tls_without_http2_alpn_offers_http1_alone_and_a_cold_burst_dials_at_once() {
        let (addr, accepted, _, _, _) = tls_upstream(false).await;
        let pool = tls_pool_offering(addr, false);
        assert_eq!(pool.homes[0].lock().speaks, Speaks::Http1);
        bursts_over_http1_each_with_its_own_connection(&pool, addr, &accepted).await;
    }

    /// An upstream that spoke HTTP/2 and, after a restart, offers HTTP/1.1 alone: the pool
    /// follows it. The burst after the switch has a connection each, and the next burst is
    /// carried by those idle connections instead of new dials one at a time.
    #[tokio::test]
    async fn an_upstream_that_turns_from_h2_to_http1_has_its_idle_connections_used() {
        let (addr, accepted, goaway, only_h1, pool) = tls_upstream(false).await;
        assert_eq!(burst(&pool, addr, "h2").await, answered("HTTP/2.0", "h2"));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        only_h1.store(true, Ordering::SeqCst);
        goaway.notify_waiters();
        shared_closed(&pool).await;
        let want = |p: &str| answered("HTTP/1.1", p);
        assert_eq!(burst(&pool, addr, "a").await, want("a"));
        assert_eq!(accepted.load(Ordering::SeqCst), 5, "one connection each");
        assert_eq!(pool.idle(), 4);
        assert_eq!(burst(&pool, addr, "b").await, want("b"));
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            5,
            "the idle ones carried it"
        );
    }

    /// A server that accepts connections and never answers: a TLS ClientHello waits forever.
    async fn silent_server() -> std::net::SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        addr
    }

    /// A dial its exchange gives up on (the proxy's `first_byte_timeout` shorter than
    /// `connect_timeout`) counts as failed: the two exchanges that waited for it dial side by
    /// side and are over at one second plus one `connect_timeout`. Counted as nothing, the
    /// next waiter dialled alone and the last waited for its failure too: one second plus
    /// two (tried). Paused time with real sockets, as in
    /// `a_tls_handshake_that_never_ends_fails_at_connect_timeout`.
    #[tokio::test(start_paused = true)]
    async fn a_dial_given_up_by_its_exchange_lets_the_waiters_dial_side_by_side() {
        let addr = silent_server().await;
        let pool = tls_pool(addr);
        let started = tokio::time::Instant::now();
        let impatient = async {
            let first = pool.send(https_request(addr, "/0"), far());
            assert!(tokio::time::timeout(Duration::from_secs(1), first)
                .await
                .is_err());
        };
        let waiters = futures_util::future::join_all(
            (1..3).map(|i| pool.send(https_request(addr, &format!("/{i}")), far())),
        );
        let burst = futures_util::future::join(impatient, waiters);
        let ((), answers) = tokio::time::timeout(Duration::from_secs(60), burst)
            .await
            .expect("the dials were not bounded");
        let took = started.elapsed();
        for a in answers {
            let e = a.err().expect("no connection can be made");
            assert!(e.to_string().contains("upstream.connect_timeout"), "{e}");
        }
        let one = Duration::from_secs(1);
        assert!(
            took >= one + CONNECT && took < one + 2 * CONNECT,
            "the waiters took {took:?}"
        );
    }

    /// A TLS handshake the upstream never answers fails the dial at `connect_timeout` (it
    /// used to wait for the exchange's first-byte timeout). The exchanges that waited for
    /// that dial then dial side by side: a cold burst of three against it is over at twice
    /// `connect_timeout`, not three times. Paused time with real sockets: the dial's timeout is
    /// the only timer that can fire, and if auto-advance fires it before the loopback connect
    /// is done, the stall is TCP's instead of TLS's: the same failure, at the same time.
    #[tokio::test(start_paused = true)]
    async fn a_tls_handshake_that_never_ends_fails_at_connect_timeout() {
        let addr = silent_server().await;
        let pool = tls_pool(addr);
        let started = tokio::time::Instant::now();
        let burst = futures_util::future::join_all(
            (0..3).map(|i| pool.send(https_request(addr, &format!("/{i}")), far())),
        );
        let answers = tokio::time::timeout(Duration::from_secs(60), burst)
            .await
            .expect("the dials were not bounded");
        let took = started.elapsed();
        for a in answers {
            let e = a.err().expect("no connection can be made");
            assert!(
                e.to_string().contains("upstream.connect_timeout (5s)"),
                "{e}"
            );
        }
        assert!(
            took >= 2 * CONNECT && took < 3 * CONNECT,
            "the burst took {took:?}"
        );
    }

    /// Trusts one certificate, byte for byte, and checks handshake signatures against it.
    #[derive(Debug)]
    struct ThisCertificate {
        cert: rustls::pki_types::CertificateDer<'static>,
        provider: Arc<rustls::crypto::CryptoProvider>,
    }

    impl rustls::client::danger::ServerCertVerifier for ThisCertificate {
        fn verify_server_cert(
            &self,
            end_entity: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            if end_entity.as_ref() == self.cert.as_ref() {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            } else {
                Err(rustls::Error::General("not the test certificate".into()))
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_expire() {
        let (addr, accepted) = upstream().await;
        let pool = pool(addr, Duration::from_secs(50));
        text(pool.send(request(addr, "/", ""), far()).await.unwrap()).await;
        assert_eq!(pool.idle(), 1);
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(pool.idle(), 0, "the sweeper closes it");
        text(pool.send(request(addr, "/", ""), far()).await.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}

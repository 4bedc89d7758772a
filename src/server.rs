//! Listeners: the accept loops for the proxy and admin ports, the per-connection HTTP settings
//! that protect the proxy from its clients, and the graceful drain at shutdown.
//!
//! Client connections speak HTTP/1.1 (the proxy's own server, [`crate::http1`]) or HTTP/2
//! with prior knowledge (h2c, hyper's server), told apart by the first bytes. A client that has not sent its whole request head within
//! `server.header_read_timeout` is dropped (slow loris), including one that never even reveals
//! its protocol; heads over `server.max_header_bytes` get 431; and at most
//! `server.max_connections` connections are open at once: past that the loop stops accepting
//! and new connections wait in the kernel's backlog rather than exhausting file descriptors.
//!
//! The proxy listener is served by *shards* ([`serve_sharded`]): one thread per core, each
//! with a single-threaded runtime that runs the connections handed to it (shard 0 accepts,
//! and gives each to the shard with the fewest open), their requests and their upstream
//! connections to the end, as nginx's workers do. A request never hops threads, so it costs no cross-thread wake-up; a
//! work-stealing runtime paid about three futex calls per request at one connection and woke
//! the idle worker for nothing (BENCHMARKS.md, fourth session). The budget, the queue and the
//! metrics are shared by every shard; what belongs to one shard is found by [`shard`].

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::body::ResponseBody;
use crate::config::ServerConfig;
use crate::http1::{self, ClientBody, Served};

/// The TCP peer of a request, handed to the handler with it: the admin endpoints that change
/// something answer only loopback peers. Not a request extension for every request: the
/// first one inserted costs three allocations, and the proxy's own handler does not use it.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// After `accept` fails (typically EMFILE), pause before trying again instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// h2 keep-alive pings find dead client connections under long idle streams.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The shard whose thread this is: 0 outside the shards' own threads (the main thread, which
/// is shard 0, and every test runtime).
pub fn shard() -> usize {
    SHARD.with(Cell::get)
}

/// Most shards a proxy runs, whatever `TOKIO_WORKER_THREADS` asks: each is a thread, a
/// runtime and (over HTTP/2) an upstream connection of its own.
const MAX_SHARDS: usize = 64;
/// How long a shard's runtime may take to close what it still runs after the drain (cut
/// connections, their log lines), and how long `Shards::finish` waits for all of them.
const SHARD_EXIT: Duration = Duration::from_secs(1);

/// The shards a proxy runs: `TOKIO_WORKER_THREADS` if set to a positive number (at most
/// [`MAX_SHARDS`]), else one per core the process may use.
pub fn shard_count() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let var = std::env::var("TOKIO_WORKER_THREADS").ok();
    let (n, refused) = shards_from(var.as_deref(), cores);
    if let Some(why) = refused {
        tracing::warn!("TOKIO_WORKER_THREADS {why}; serving on {n} threads");
    }
    n
}

/// [`shard_count`] from the variable's value and the cores: the count, and why the value
/// was not taken as given, if it was not.
fn shards_from(var: Option<&str>, cores: usize) -> (usize, Option<String>) {
    let Some(v) = var else {
        return (cores.clamp(1, MAX_SHARDS), None);
    };
    match v.trim().parse::<usize>() {
        Ok(n) if n > MAX_SHARDS => (MAX_SHARDS, Some(format!("= {n} is over {MAX_SHARDS}"))),
        Ok(n) if n > 0 => (n, None),
        _ => (
            cores.clamp(1, MAX_SHARDS),
            Some(format!("= {v:?} is not a positive number")),
        ),
    }
}

/// The shards' threads, once their connections are drained. They keep running what was
/// spawned on them (upstream HTTP/2 connections, the reads of answers whose clients left)
/// until [`Shards::finish`] lets them go (or this is dropped).
pub struct Shards {
    release: Vec<tokio::sync::oneshot::Sender<()>>,
    exited: Vec<tokio::sync::oneshot::Receiver<()>>,
}

impl Shards {
    /// Let the shards' threads go and wait (at most about twice [`SHARD_EXIT`]) until each has
    /// shut its runtime down: what that closes (connections still open after the grace, their
    /// log lines) is done before the caller logs that it stopped and the process exits.
    pub async fn finish(self) {
        drop(self.release);
        let all = async {
            for exited in self.exited {
                let _ = exited.await;
            }
        };
        // They shut down side by side; each takes at most SHARD_EXIT for its runtime.
        if tokio::time::timeout(SHARD_EXIT + SHARD_EXIT, all)
            .await
            .is_err()
        {
            tracing::warn!("a shard's thread did not end in time; exiting without it");
        }
    }
}

/// An accepted connection on its way to the shard that will serve it.
struct Handoff {
    stream: std::net::TcpStream,
    peer: std::net::SocketAddr,
    slot: OwnedSemaphorePermit,
}

/// [`serve`] on `shards` shards: the calling task is shard 0, accepts every connection and
/// serves its share; each other shard gets a thread and a single-threaded runtime of its own.
/// A connection goes to the shard with the fewest open connections (shard 0 on a tie, the
/// lowest number otherwise), is registered with that shard's runtime and lives there to the
/// end. The kernel's own spread (several shards waiting on one socket) was tried first and
/// put every connection of a burst on one shard half the time (BENCHMARKS.md, fourth
/// session). `server.max_connections` counts all shards' connections together. Returns once
/// every shard has drained, with the shards' threads still up.
pub async fn serve_sharded<H, Fut>(
    listener: TcpListener,
    cfg: &ServerConfig,
    write_stall: Duration,
    handler: H,
    stop: watch::Receiver<bool>,
    name: &'static str,
    shards: usize,
) -> Shards
where
    H: Fn(Request<ClientBody>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let open: Arc<[AtomicUsize]> = (0..shards.max(1)).map(|_| AtomicUsize::new(0)).collect();
    let mut sharded = Shards {
        release: Vec::new(),
        exited: Vec::new(),
    };
    let mut drained = Vec::new();
    let mut others = Vec::new();
    for i in 1..shards.max(1) {
        let (to_shard, mut incoming) = tokio::sync::mpsc::unbounded_channel::<Handoff>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let (exited_tx, exited_rx) = tokio::sync::oneshot::channel::<()>();
        let (cfg, handler, mut stop, open) = (
            cfg.clone(),
            handler.clone(),
            stop.clone(),
            Arc::clone(&open),
        );
        let started = std::thread::Builder::new()
            .name(format!("shard-{i}"))
            .spawn(move || {
                SHARD.with(|s| s.set(i));
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(listener = name, shard = i, error = %e, "cannot start a shard's runtime");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let conns = Conns::new(&cfg, write_stall, handler, name, open, i, stop.clone());
                    loop {
                        let got = tokio::select! {
                            _ = stop.wait_for(|s| *s) => break,
                            h = incoming.recv() => h,
                        };
                        let Some(h) = got else { break };
                        match TcpStream::from_std(h.stream) {
                            Ok(stream) => conns.serve(stream, h.peer, h.slot),
                            Err(e) => {
                                conns.gone();
                                tracing::warn!(listener = name, shard = i, error = %e, "a shard cannot take a connection");
                            }
                        }
                    }
                    // Connections handed over but not yet taken close unanswered, as those
                    // still in the kernel's backlog do.
                    drop(incoming);
                    conns.drain(cfg.shutdown_grace).await;
                    let _ = done_tx.send(());
                    let _ = release_rx.await;
                });
                runtime.shutdown_timeout(SHARD_EXIT);
                let _ = exited_tx.send(());
            });
        match started {
            Ok(_) => {
                others.push(to_shard);
                drained.push(done_rx);
                sharded.release.push(release_tx);
                sharded.exited.push(exited_rx);
            }
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "cannot start a shard's thread; serving on fewer threads");
                break;
            }
        }
    }
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let conns = Conns::new(
        cfg,
        write_stall,
        handler,
        name,
        Arc::clone(&open),
        0,
        stop.clone(),
    );
    accept(listener, &conns, &others, &open, stop, name, slots).await;
    drop(others);
    conns.drain(cfg.shutdown_grace).await;
    for d in drained {
        let _ = d.await;
    }
    sharded
}

/// Serve `listener` with `handler` until `stop` fires, then drain open connections for at
/// most `grace`. Returns once every connection is closed or the grace period is over.
pub async fn serve<H, Fut>(
    listener: TcpListener,
    cfg: &ServerConfig,
    write_stall: Duration,
    handler: H,
    stop: watch::Receiver<bool>,
    name: &'static str,
) where
    H: Fn(Request<ClientBody>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let open: Arc<[AtomicUsize]> = Arc::new([AtomicUsize::new(0)]);
    let conns = Conns::new(
        cfg,
        write_stall,
        handler,
        name,
        Arc::clone(&open),
        0,
        stop.clone(),
    );
    accept(listener, &conns, &[], &open, stop, name, slots).await;
    conns.drain(cfg.shutdown_grace).await;
}

/// Accept until `stop`, each connection to the shard with the fewest open ones: this one
/// (`conns`, shard 0) or one of `others` (shards 1, 2, ...).
async fn accept<H, Fut>(
    listener: TcpListener,
    conns: &Conns<H>,
    others: &[tokio::sync::mpsc::UnboundedSender<Handoff>],
    open: &[AtomicUsize],
    mut stop: watch::Receiver<bool>,
    name: &'static str,
    slots: Arc<Semaphore>,
) where
    H: Fn(Request<ClientBody>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    loop {
        let slot = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            s = Arc::clone(&slots).acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        // The fewest open connections; the first such (shard 0 first) on a tie.
        let to = (0..=others.len())
            .min_by_key(|&i| open[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        open[to].fetch_add(1, Ordering::Relaxed);
        if to == 0 {
            conns.serve(stream, peer, slot);
            continue;
        }
        // Off this runtime's poller, onto the other shard's when it takes it.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                open[to].fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(listener = name, error = %e, "cannot hand a connection to its shard; closed");
                continue;
            }
        };
        if let Err(back) = others[to - 1].send(Handoff { stream, peer, slot }) {
            // That shard's thread has ended (its runtime could not start): never pick it
            // again, and serve this connection here.
            open[to].store(usize::MAX / 2, Ordering::Relaxed);
            tracing::warn!(
                listener = name,
                shard = to,
                "a shard has stopped; serving its share on shard 0"
            );
            let Handoff { stream, peer, slot } = back.0;
            match TcpStream::from_std(stream) {
                Ok(stream) => {
                    open[0].fetch_add(1, Ordering::Relaxed);
                    conns.serve(stream, peer, slot);
                }
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "cannot take a connection back; closed")
                }
            }
        }
    }
    drop(listener);
}

/// One shard's connections: the HTTP settings, the stop signal they watch, the count of open
/// connections the acceptor balances by, and what the drain waits for.
struct Conns<H> {
    /// What every connection reads and nothing changes: one pointer in each connection's
    /// state, not a copy (hyper's HTTP/2 builder alone is 128 bytes).
    shared: Arc<Shared<H>>,
    stop: watch::Receiver<bool>,
    /// Each connection holds a receiver; the drain waits until none is left.
    live: watch::Sender<()>,
    name: &'static str,
    open: Arc<[AtomicUsize]>,
    me: usize,
}

/// A shard's connection settings and handler, shared by its connections.
struct Shared<H> {
    h1: http1::Settings,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    handler: H,
    name: &'static str,
}

impl<H, Fut> Conns<H>
where
    H: Fn(Request<ClientBody>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    fn new(
        cfg: &ServerConfig,
        write_stall: Duration,
        handler: H,
        name: &'static str,
        open: Arc<[AtomicUsize]>,
        me: usize,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEPALIVE)
            .max_header_list_size(cfg.max_header_bytes as u32);
        Conns {
            shared: Arc::new(Shared {
                h1: http1::Settings {
                    max_head: cfg.max_header_bytes,
                    head_timeout: cfg.header_read_timeout,
                    write_stall,
                },
                h2,
                handler,
                name,
            }),
            stop,
            live: watch::Sender::new(()),
            name,
            open,
            me,
        }
    }

    /// A connection counted for this shard ended without being served.
    fn gone(&self) {
        self.open[self.me].fetch_sub(1, Ordering::Relaxed);
    }

    /// Serve one connection (already counted in `open`) on this runtime, holding its slot.
    fn serve(&self, stream: TcpStream, peer: std::net::SocketAddr, slot: OwnedSemaphorePermit) {
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            stream,
            shared: Arc::clone(&self.shared),
            stop: self.stop.clone(),
            peer,
            _open: OpenGuard(Arc::clone(&self.open), self.me),
            _live: self.live.subscribe(),
            _slot: slot,
        };
        tokio::spawn(connection(conn));
    }

    /// Wait for this shard's connections to end, at most `grace`.
    async fn drain(self, grace: Duration) {
        let name = self.name;
        // Said once per listener, by the shard that accepts (the others drain with it).
        if self.me == 0 {
            tracing::info!(
                listener = name,
                grace_s = grace.as_secs_f64(),
                "stopped accepting; draining connections"
            );
        }
        if tokio::time::timeout(grace, self.live.closed())
            .await
            .is_err()
        {
            tracing::warn!(
                listener = name,
                shard = self.me,
                "shutdown grace period over; closing remaining connections"
            );
        }
    }
}

/// One connection's task: HTTP/1 until the connection ends, or HTTP/2 from its preface on.
///
/// Every byte of this future is paid by each open connection, idle or queued (BENCHMARKS.md,
/// "ninth session"; a test keeps it in bounds): it owns [`Conn`], and the HTTP/1
/// connection's future borrows from it rather than carrying copies.
#[allow(clippy::manual_async_fn)] // not an `async fn`: see `http1::serve`
fn connection<H, Fut>(mut conn: Conn<H>) -> impl Future<Output = ()> + Send
where
    H: Fn(Request<ClientBody>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    async move {
        // Names `conn` whole, so the block captures all of it: it would otherwise capture
        // only the fields it uses, and the guards it never names would be dropped (the slot
        // and the drain's count given back) before the connection is served.
        let _whole = &conn;
        let handler = |req| (conn.shared.handler)(req, Peer(conn.peer));
        // The HTTP/2 connection is made in this statement and awaited in the next, so that
        // what `serve` returned is not kept in this future beside the HTTP/1 one.
        let h2 = match http1::serve(&conn.stream, handler, &conn.shared.h1, &mut conn.stop).await {
            Served::Closed => {
                drop(conn.stream);
                None
            }
            Served::Finish => {
                http1::finish(conn.stream);
                None
            }
            Served::H2(read, deadline) => {
                let shared = &conn.shared;
                // Boxed: most connections are HTTP/1, and hyper's HTTP/2 connection is
                // large.
                Some(Box::pin(serve_h2(
                    shared.h2.clone(),
                    conn.stream,
                    read,
                    deadline,
                    shared.handler.clone(),
                    conn.peer,
                    shared.h1,
                    conn.stop.clone(),
                    shared.name,
                )))
            }
        };
        if let Some(h2) = h2 {
            h2.await;
        }
    }
}

/// One connection's task state: its socket, counted in `open` and in the drain, and holding
/// its slot, until the task ends. The socket is the first field, so however the task ends
/// (even dropped mid-request at the runtime's shutdown), it is closed before the slot and the
/// counts are given back.
struct Conn<H> {
    stream: TcpStream,
    shared: Arc<Shared<H>>,
    stop: watch::Receiver<bool>,
    peer: std::net::SocketAddr,
    _open: OpenGuard,
    _live: watch::Receiver<()>,
    _slot: OwnedSemaphorePermit,
}

/// An HTTP/2 connection (prior knowledge), by hyper's server, from the bytes the HTTP/1
/// reader took to tell the protocol. hyper's HTTP/2 server has no timer for the first
/// request, so one that sends the preface and no request within `header_read_timeout` is
/// closed; later ones are kept alive by pings. At the stop it is shut gracefully (GOAWAY,
/// streams in flight finish).
#[allow(clippy::too_many_arguments)]
async fn serve_h2<H, Fut>(
    builder: hyper::server::conn::http2::Builder<TokioExecutor>,
    stream: TcpStream,
    read: Bytes,
    first_by: tokio::time::Instant,
    h: H,
    peer: std::net::SocketAddr,
    settings: http1::Settings,
    mut stop: watch::Receiver<bool>,
    name: &'static str,
) where
    H: Fn(Request<ClientBody>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let first_head = Arc::new(Notify::new());
    let seen = Arc::clone(&first_head);
    let svc = service_fn(move |req: Request<Incoming>| {
        seen.notify_one();
        let h = h.clone();
        async move { Ok::<_, Infallible>(h(req.map(ClientBody::H2), Peer(peer)).await) }
    });
    let io = TokioIo::new(Stall::new(
        Rewind { read, io: stream },
        settings.write_stall,
    ));
    let conn = builder.serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    // Within the time the connection had for its first head (not a new one from here), and
    // not past the stop.
    let first = tokio::time::timeout_at(first_by, async {
        tokio::select! {
            done = conn.as_mut() => Some(done),
            () = first_head.notified() => None,
            _ = stop.wait_for(|s| *s) => Some(Ok(())),
        }
    })
    .await;
    let done = match first {
        Ok(Some(done)) => done,
        Ok(None) => {
            let mut stopping = false;
            loop {
                tokio::select! {
                    done = conn.as_mut() => break done,
                    _ = stop.wait_for(|s| *s), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
        Err(_) => {
            tracing::debug!(
                listener = name,
                "no request head within server.header_read_timeout; closing"
            );
            return;
        }
    };
    if let Err(e) = done {
        tracing::debug!(listener = name, error = %e, "connection ended with an error");
    }
}

/// A socket whose first bytes were already read: they are read again first.
struct Rewind {
    read: Bytes,
    io: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// One open connection in its shard's count.
struct OpenGuard(Arc<[AtomicUsize]>, usize);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

/// An HTTP/2 client connection whose writes may wait for the client at most `limit` at a
/// time (HTTP/1 connections do the same in `http1::write_all`).
///
/// A client that stops reading a streamed answer shuts its TCP window: the proxy's writes
/// then wait, hyper stops asking the body for more, and the body's own idle timer (counted
/// only while the proxy asks) never runs. Without this, the request would keep its
/// concurrency slot, its permit and its upstream stream for as long as the client keeps the
/// connection open. A write that has waited `limit` (`upstream.idle_timeout`) without the
/// client taking a byte fails with `TimedOut`, hyper closes the connection, and dropping the
/// answer frees what it held. The timer exists only while a write waits.
struct Stall<T> {
    io: T,
    limit: Duration,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Stall<T> {
    fn new(io: T, limit: Duration) -> Stall<T> {
        Stall {
            io,
            limit,
            waiting: None,
        }
    }

    /// A write's outcome, counted against the client's silence.
    fn watch<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.waiting = None;
            return r;
        }
        let limit = self.limit;
        let waiting = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if waiting.as_mut().poll(cx).is_ready() {
            self.waiting = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no bytes for upstream.idle_timeout",
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stall<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stall<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, r)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The size of the future a function of two arguments returns, from its type alone.
    pub(crate) fn future_size<A, B, F>(_: impl Fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Each open connection, idle or queued, holds its task's future; a few layout slips
    /// (an `async fn`'s copies of its arguments, a large value kept across an await) once
    /// doubled it. The bound is for this (the test) build (BENCHMARKS.md, "ninth session",
    /// has the release build's sizes).
    #[test]
    fn a_connection_s_future_stays_small() {
        type Fut = Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>;
        type H = fn(Request<ClientBody>, Peer) -> Fut;
        let size = future_size(|c: Conn<H>, _: ()| connection::<H, Fut>(c));
        // With tokio's task header and trailer (104 bytes, the whole aligned to 128), a task
        // of 896 bytes up to 792 (744 when written).
        assert!(size <= 792, "{size} bytes");
    }

    #[test]
    fn the_shard_count_is_the_variable_or_the_cores_and_a_bad_value_is_said() {
        assert_eq!(shards_from(None, 2), (2, None));
        assert_eq!(shards_from(None, 500), (MAX_SHARDS, None));
        assert_eq!(shards_from(Some(" 3 "), 2), (3, None));
        let (n, why) = shards_from(Some("abc"), 2);
        assert_eq!(n, 2);
        assert!(why.unwrap().contains("\"abc\" is not a positive number"));
        let (n, why) = shards_from(Some("0"), 4);
        assert_eq!(n, 4);
        assert!(why.is_some());
        let (n, why) = shards_from(Some("1000"), 2);
        assert_eq!(n, MAX_SHARDS);
        assert!(why.unwrap().contains("over 64"));
    }
}

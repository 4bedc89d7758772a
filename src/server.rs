//! Listeners: the accept loops for the proxy and admin ports, the per-connection HTTP settings
//! that protect the proxy from its clients, and the graceful drain at shutdown.
//!
//! Client connections speak HTTP/1.1 or HTTP/2 with prior knowledge (h2c), detected per
//! connection. A client that has not sent its whole request head within
//! `server.header_read_timeout` is dropped (slow loris), including one that never even reveals
//! its protocol; heads over `server.max_header_bytes` get 431; and at most
//! `server.max_connections` connections are open at once: past that the loop stops accepting
//! and new connections wait in the kernel's backlog rather than exhausting file descriptors.
//!
//! The proxy listener is served by *shards* ([`serve_sharded`]): one thread per core, each
//! with a single-threaded runtime that accepts from the same listening socket and runs its
//! connections, their requests and their upstream connections to the end, as nginx's
//! workers do. A request never hops threads, so it costs no cross-thread wake-up; a
//! work-stealing runtime paid about three futex calls per request at one connection and woke
//! the idle worker for nothing (BENCHMARKS.md, issue 15). The budget, the queue and the
//! metrics are shared by every shard; what belongs to one shard is found by [`shard`].

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};

use crate::body::ResponseBody;
use crate::config::ServerConfig;

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

/// The shards a proxy runs: `TOKIO_WORKER_THREADS` if set to a positive number, else one per
/// core the process may use.
pub fn shard_count() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The shards' threads, once their listeners are drained. They keep running what was spawned
/// on them (upstream HTTP/2 connections, the reads of answers whose clients left) until this
/// is dropped, which ends them.
pub struct Shards {
    _release: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// [`serve`] on `shards` threads (the calling task is shard 0; the others get a thread and a
/// single-threaded runtime each), all accepting from `listener`. Every connection lives on
/// the shard that accepted it, so it is balanced at accept time: a shard busy with its
/// connections is slower to wake for a new one. `server.max_connections` counts all shards'
/// connections together. Returns once every shard has drained, with the shards' threads still
/// up; dropping what it returns lets them go.
pub async fn serve_sharded<H, Fut>(
    listener: TcpListener,
    cfg: &ServerConfig,
    handler: H,
    stop: watch::Receiver<bool>,
    name: &'static str,
    shards: usize,
) -> Shards
where
    H: Fn(Request<Incoming>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let mut release = Vec::new();
    let mut drained = Vec::new();
    let mut mine = Some(listener);
    if let Some(listener) = mine.take_if(|_| shards > 1) {
        // Each shard registers the listening socket with its own runtime's poller.
        let std = match listener.into_std() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listener = name, error = %e, "cannot share the listener");
                return Shards { _release: release };
            }
        };
        for i in 1..shards {
            let own = match std.try_clone() {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, shards = i, "cannot share the listener further; serving on fewer threads");
                    break;
                }
            };
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
            let (cfg, handler, stop, slots) = (
                cfg.clone(),
                handler.clone(),
                stop.clone(),
                Arc::clone(&slots),
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
                        match TcpListener::from_std(own) {
                            Ok(l) => serve_on(l, &cfg, handler, stop, name, slots).await,
                            Err(e) => {
                                tracing::error!(listener = name, shard = i, error = %e, "a shard cannot listen")
                            }
                        }
                        let _ = done_tx.send(());
                        let _ = release_rx.await;
                    });
                });
            match started {
                Ok(_) => {
                    drained.push(done_rx);
                    release.push(release_tx);
                }
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "cannot start a shard's thread; serving on fewer threads");
                    break;
                }
            }
        }
        match TcpListener::from_std(std) {
            Ok(l) => mine = Some(l),
            Err(e) => tracing::error!(listener = name, error = %e, "shard 0 cannot listen"),
        }
    }
    if let Some(l) = mine {
        serve_on(l, cfg, handler, stop, name, slots).await;
    }
    for d in drained {
        let _ = d.await;
    }
    Shards { _release: release }
}

/// Serve `listener` with `handler` until `stop` fires, then drain open connections for at
/// most `grace`. Returns once every connection is closed or the grace period is over.
pub async fn serve<H, Fut>(
    listener: TcpListener,
    cfg: &ServerConfig,
    handler: H,
    stop: watch::Receiver<bool>,
    name: &'static str,
) where
    H: Fn(Request<Incoming>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    serve_on(listener, cfg, handler, stop, name, slots).await
}

async fn serve_on<H, Fut>(
    listener: TcpListener,
    cfg: &ServerConfig,
    handler: H,
    mut stop: watch::Receiver<bool>,
    name: &'static str,
    slots: Arc<Semaphore>,
) where
    H: Fn(Request<Incoming>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE)
        .max_header_list_size(cfg.max_header_bytes as u32);
    let graceful = GracefulShutdown::new();
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
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        // Set when the first request head has been parsed (hyper calls the service then).
        let first_head = Arc::new(Notify::new());
        let seen = Arc::clone(&first_head);
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            seen.notify_one();
            let h = h.clone();
            async move { Ok::<_, Infallible>(h(req, Peer(peer)).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        let head_timeout = cfg.header_read_timeout;
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            // hyper's HTTP/1 header timer starts only once the protocol is known, and HTTP/2
            // has none: a client that sends nothing, or half the HTTP/2 preface, or a preface
            // and no request, would hold its connection slot forever. So the first request
            // head must arrive within `header_read_timeout` whatever the protocol; later ones
            // are hyper's business (HTTP/1 header timer, HTTP/2 keep-alive pings).
            let first = tokio::time::timeout(head_timeout, async {
                tokio::select! {
                    done = conn.as_mut() => Some(done),
                    () = first_head.notified() => None,
                }
            })
            .await;
            let done = match first {
                Ok(Some(done)) => done,
                Ok(None) => conn.await,
                Err(_) => {
                    tracing::debug!(
                        listener = name,
                        "no request head within server.header_read_timeout; closing"
                    );
                    drop(slot);
                    return;
                }
            };
            if let Err(e) = done {
                tracing::debug!(listener = name, error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    let grace = cfg.shutdown_grace;
    tracing::info!(
        listener = name,
        grace_s = grace.as_secs_f64(),
        "stopped accepting; draining connections"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "shutdown grace period over; closing remaining connections"
        );
    }
}

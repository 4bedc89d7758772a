//! Listeners: the accept loops for the proxy and admin ports, the per-connection HTTP settings
//! that protect the proxy from its clients, and the graceful drain at shutdown.
//!
//! Client connections speak HTTP/1.1 or HTTP/2 with prior knowledge (h2c), detected per
//! connection. A client that has not sent its whole request head within
//! `server.header_read_timeout` is dropped (slow loris), including one that never even reveals
//! its protocol; heads over `server.max_header_bytes` get 431; and at most
//! `server.max_connections` connections are open at once: past that the loop stops accepting
//! and new connections wait in the kernel's backlog rather than exhausting file descriptors.

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

/// The TCP peer of a request, set as a request extension for handlers that decide by it
/// (the admin endpoints that change something answer only loopback peers).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// After `accept` fails (typically EMFILE), pause before trying again instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// h2 keep-alive pings find dead client connections under long idle streams.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);

/// Serve `listener` with `handler` until `stop` fires, then drain open connections for at
/// most `grace`. Returns once every connection is closed or the grace period is over.
pub async fn serve<H, Fut>(
    listener: TcpListener,
    cfg: &ServerConfig,
    handler: H,
    mut stop: watch::Receiver<bool>,
    name: &'static str,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
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
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
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
        let svc = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            seen.notify_one();
            req.extensions_mut().insert(Peer(peer));
            let h = h.clone();
            async move { Ok::<_, Infallible>(h(req).await) }
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

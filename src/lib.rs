//! chutes-proxy: a local reverse proxy that holds one Chutes API key and one account-wide
//! budget for every service that shares the account.
//!
//! Code map (see ARCHITECTURE.md for the life of a request):
//! - [`config`]: TOML + flags -> validated, typed `Config`; every error at once.
//! - [`server`]: accept loops, connection limits, graceful drain.
//! - [`proxy`]: the request pipeline (identify, admit, forward, read signals, answer).
//! - [`asked`]: the request fields the proxy reads, found in one walk.
//! - [`clients`]: which configured client a request belongs to.
//! - [`admission`]: the budget: governor bucket, daily cap, concurrency, cooldown, fair queue.
//! - [`upstream`]: the pooled hyper client, TLS, target rewrite, header rules.
//! - [`body`]: streaming request/response bodies, permits held by the response body.
//! - [`signals`]: reading upstream 429/402 bodies and rate-limit/quota headers.
//! - [`model`]: a request's model (from its JSON body) and model-name wildcards.
//! - [`sse`]: rewriting raw in-stream error lines into SSE error events.
//! - [`response`]: the only place that renders the proxy's own responses.
//! - [`state`]: the persisted state file and its writer.
//! - [`metrics`], [`admin`], [`log`]: what operators see.
//! - [`history`]: the last hour per second, sampled from the counters, for the dashboard.
//! - [`poll`]: the account usage poll (`upstream.quota_url`).
//! - [`heap`]: giving freed heap back to the OS once a deep queue has drained.
//! - [`reload`]: re-reading the config file on SIGHUP or `POST /reload`.
//! - [`status`]: the `/status` document's one type, written by `admin`, read by `status_cmd`.
//! - [`status_cmd`]: the `chutes-proxy status` command.
//! - [`clock`], [`units`]: time sources, durations, sizes, dates.
//! - [`alarm`]: a connection's deadline timer, kept and moved instead of made for each wait.

pub mod admin;
pub mod admission;
pub mod alarm;
pub mod asked;
pub mod body;
pub mod clients;
pub mod clock;
pub mod config;
pub mod heap;
pub mod held;
pub mod history;
pub mod http1;
pub mod log;
pub mod logbuf;
pub mod metrics;
pub mod model;
pub mod poll;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod response;
pub mod server;
pub mod signals;
pub mod sse;
pub mod state;
pub mod status;
pub mod status_cmd;
#[cfg(test)]
pub(crate) mod test_rng;
pub mod units;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::{Admission, Settings};
use crate::clock::WallClock;
use crate::config::Config;
use crate::state::{Loaded, Persisted};

/// Bind the listeners a config asks for. Separate from [`run`] so tests and embedders can
/// bind `127.0.0.1:0` themselves.
pub async fn bind(config: &Config) -> std::io::Result<(TcpListener, Option<TcpListener>)> {
    let main = listen(config.server.listen).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {e}", config.server.listen),
        )
    })?;
    let admin = match config.server.admin_listen {
        Some(a) => Some(listen(a).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {a} (admin): {e}"))
        })?),
        None => None,
    };
    Ok((main, admin))
}

/// How many connections the kernel may hold for a listener before it accepts them (Linux
/// caps it at `net.core.somaxconn`, 4096 by default). `TcpListener::bind` asks for 128, as
/// the standard library does: a burst of a couple of hundred clients connecting at once
/// (services restarting together) overflowed it while the accepting thread was busy, and
/// every connection past it waited for its SYN to be sent again, a second later (the scale
/// bench's 200 late clients: up to 69 of them at 1.0 s). nginx asks for 511.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` with [`LISTEN_BACKLOG`], `SO_REUSEADDR` set as `TcpListener::bind`
/// sets it.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Run the proxy on already-bound listeners until `shutdown` completes, then drain, save the
/// state and return. `wall` is the wall clock (the system clock outside tests).
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    wall: WallClock,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    run_with(config, None, listener, admin_listener, wall, shutdown).await
}

/// As [`run`], able to reload: `source` says where the configuration came from, and SIGHUP
/// or `POST /reload` re-read it from there.
pub async fn run_with(
    config: Config,
    source: Option<reload::Source>,
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    wall: WallClock,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    run_sharded(config, source, listener, admin_listener, wall, shutdown, 1).await
}

/// As [`run_with`], the proxy listener served by `shards` threads (see [`server`]): the
/// calling task's runtime is shard 0 and should be single-threaded (the binary's is), each
/// other shard gets a thread of its own. The admin listener and the background tasks run on
/// the caller's runtime.
pub async fn run_sharded(
    config: Config,
    source: Option<reload::Source>,
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    wall: WallClock,
    shutdown: impl Future<Output = ()>,
    shards: usize,
) -> Result<(), String> {
    let shards = shards.max(1);
    let config = Arc::new(config);
    // Before anything reads the state file (a corrupt one is moved aside): it may be
    // another running proxy's. Held until `run` returns.
    let _state_lock = match &config.state.path {
        Some(p) => Some(state::lock(p).map_err(|e| e.to_string())?),
        None => None,
    };
    let settings = Settings::from_config(&config);
    let restored = restore(&config, &settings, wall);
    let (persist_tx, persist_rx) = watch::channel(0u64);
    let persist = config.state.path.is_some().then_some(persist_tx);
    let fleet = match config.shared_state.backend {
        config::Backend::Local => None,
        config::Backend::Redis => {
            let ss = &config.shared_state;
            let f = admission::fleet::Fleet::new(admission::fleet::FleetSettings {
                redis_url: ss.redis_url.clone(),
                key_prefix: ss.key_prefix.clone(),
                on_error: match ss.on_redis_error {
                    config::OnRedisError::FailClosed => admission::fleet::OnError::FailClosed,
                    config::OnRedisError::Local => admission::fleet::OnError::Local,
                },
                local_fallback_share: ss.local_fallback_share,
                // The probe's holder may die; after this another replica may probe.
                probe_ttl: config.upstream.first_byte_timeout + std::time::Duration::from_secs(5),
                global_concurrency: ss.global_concurrency,
                // A dead replica's lease outlives its request's longest wait for an answer.
                lease_ttl: config.upstream.first_byte_timeout + std::time::Duration::from_secs(5),
            })?;
            Some(Arc::new(f))
        }
    };
    let admission = Arc::new(Admission::with_fleet(
        settings, wall, restored, persist, fleet,
    ));
    let (writer_stop, writer_stopped) = tokio::sync::oneshot::channel::<()>();
    let writer = config.state.path.clone().map(|path| {
        tokio::spawn(state::run_writer_until(
            Arc::clone(&admission),
            path,
            config.limits.day_reset_offset,
            persist_rx,
            async move {
                let _ = writer_stopped.await;
            },
        ))
    });
    let upstream = upstream::Upstream::new(&config.upstream, shards)?;
    let metrics = Arc::new(metrics::Metrics::new(
        &admission.settings().clients,
        config.limits.requests_per_day.is_some(),
    ));
    let proxy = Arc::new(proxy::Proxy::new(
        Arc::clone(&config),
        Arc::clone(&admission),
        upstream,
        Arc::clone(&metrics),
    ));
    let reloader = Arc::new(reload::Reloader::new(
        source,
        Arc::clone(&config),
        Arc::clone(&admission),
        Arc::clone(&proxy),
    ));
    // Registered before the startup line: from then on SIGHUP can never end the process.
    let hup = hangup_signal();
    let main_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    announce(&config, main_addr, admin_addr, shards);

    let (stop_tx, stop_rx) = watch::channel(false);
    let hangup = tokio::spawn(reload_on_hangup(
        hup,
        Arc::clone(&reloader),
        stop_rx.clone(),
    ));
    let poller = match (&config.upstream.quota_source, &config.upstream.api_key) {
        (config::QuotaSource::Url(url), Some(_)) => match url.parse::<http::Uri>() {
            Ok(uri) => Some(tokio::spawn(poll::run(
                Arc::clone(&proxy),
                uri,
                config.upstream.quota_poll,
                stop_rx.clone(),
            ))),
            Err(e) => {
                tracing::warn!(url = %url, error = %e, "upstream.quota_url is not a URL; not polling");
                None
            }
        },
        (config::QuotaSource::Url(_), None) => {
            tracing::info!(
                "no API key held: the quota usage poll is off (it would need a client's key)"
            );
            None
        }
        (config::QuotaSource::Off, _) => None,
    };
    tokio::spawn(heap::trim_after_drain(
        Arc::clone(&admission),
        stop_rx.clone(),
    ));
    let p = Arc::clone(&proxy);
    let main_task = tokio::spawn({
        let cfg = config.server.clone();
        let stall = config.upstream.idle_timeout;
        let stop = stop_rx.clone();
        async move {
            server::serve_sharded(
                listener,
                &cfg,
                stall,
                move |req, _peer| Arc::clone(&p).handle(req),
                stop,
                "proxy",
                shards,
            )
            .await
        }
    });
    let admin_task = admin_listener.map(|l| {
        // The dashboard's history is only read through the admin listener, so the sampler
        // runs only with one.
        let history = Arc::new(history::History::new());
        let sampler = tokio::spawn(history::run_sampler(
            Arc::clone(&history),
            Arc::clone(&metrics),
            Arc::clone(&admission),
            wall,
            stop_rx.clone(),
        ));
        let admin = Arc::new(admin::Admin {
            config: Arc::clone(&config),
            admission: Arc::clone(&admission),
            metrics: Arc::clone(&metrics),
            history,
            wall,
            reloader: Some(Arc::clone(&reloader)),
        });
        let mut cfg = config.server.clone();
        // Scrapes are short; there is nothing to wait for at shutdown.
        cfg.shutdown_grace = std::time::Duration::from_secs(1);
        let stall = config.upstream.idle_timeout;
        let stop = stop_rx.clone();
        let server = tokio::spawn(async move {
            server::serve(
                l,
                &cfg,
                stall,
                move |mut req: http::Request<crate::http1::ClientBody>, peer| {
                    req.extensions_mut().insert(peer);
                    Arc::clone(&admin).handle(req)
                },
                stop,
                "admin",
            )
            .await
        });
        (server, sampler)
    });

    shutdown.await;
    tracing::info!("shutdown requested");
    // Queued requests that cannot be admitted before the grace ends are answered now.
    admission.shutdown(tokio::time::Instant::now() + config.server.shutdown_grace);
    let _ = stop_tx.send(true);
    // Held to the end: the other shards still run what was spawned on them.
    let sharded = main_task.await;
    let _ = hangup.await;
    if let Some(p) = poller {
        let _ = p.await;
    }
    if let Some((server, sampler)) = admin_task {
        let _ = server.await;
        let _ = sampler.await;
    }
    if let Some(w) = writer {
        // Not an abort: a write in progress must land before the final one, not after it.
        let _ = writer_stop.send(());
        let _ = w.await;
    }
    if let Some(path) = &config.state.path {
        state::write_final(&admission, path, config.limits.day_reset_offset).await;
    }
    // What the other shards still close (connections past the grace, their log lines) is
    // done before the last line.
    if let Ok(sharded) = sharded {
        sharded.finish().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Read the state file, deciding what to assume if it cannot be trusted.
fn restore(config: &Config, settings: &Settings, wall: WallClock) -> Persisted {
    let Some(path) = &config.state.path else {
        return Persisted::default();
    };
    match state::load(path) {
        Loaded::Fresh => Persisted::default(),
        Loaded::Restored(p) => {
            tracing::info!(path = %path.display(), used = p.used, "state restored");
            p
        }
        Loaded::Corrupt { message } => {
            // Never under-count: without a trustworthy count, assume today's cap is spent.
            let today = units::day_index(wall.now_unix() as i64, settings.limits.day_reset_offset);
            let used = settings.limits.requests_per_day.map_or(0, |d| d.get());
            tracing::error!(
                "{message}; assuming {} requests already used today{} — delete or fix the file and restart to change that",
                used,
                if used > 0 { " (the whole daily cap)" } else { "" }
            );
            Persisted {
                day: Some(today),
                used,
                assumed: true,
                ..Persisted::default()
            }
        }
    }
}

/// The startup line, and a WARN line for each thing an operator should fix. Everything is a
/// field, so `--log-format json` carries it as JSON (text shows them as `key=value` after the
/// message); the message repeats the addresses for people and for the scripts that read them
/// from it (`scripts/kill9.sh`, `scripts/soak.sh`).
fn announce(config: &Config, main: SocketAddr, admin: Option<SocketAddr>, shards: usize) {
    let l = &config.limits;
    let admin = admin.map_or("disabled".to_string(), |a| format!("http://{a}"));
    // Absolute, so an operator knows which file it is whatever the working directory was.
    let state = config
        .state
        .path
        .as_ref()
        .map_or("memory only".to_string(), |p| {
            std::path::absolute(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string()
        });
    let key = if config.upstream.api_key.is_some() {
        "injected"
    } else {
        "client's own (none configured)"
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %format_args!("http://{main}"),
        admin = %admin,
        shards,
        upstream = %config.upstream.url,
        requests_per_minute = l.requests_per_minute.get(),
        burst = l.burst.get(),
        requests_per_day = l.requests_per_day.map(|d| d.get()),
        max_concurrent = l.max_concurrent,
        queue_max_depth = config.queue.max_depth,
        queue_max_wait_s = config.queue.max_wait.as_secs_f64(),
        key,
        state = %state,
        "chutes-proxy {} listening on http://{main} (admin: {admin}) -> upstream {}",
        env!("CARGO_PKG_VERSION"),
        config.upstream.url,
    );
    if config.upstream.api_key.is_none() {
        tracing::warn!(
            "no upstream API key ({}): each client's own Authorization is passed through; \
             set upstream.require_key = true to refuse to start without one",
            config.upstream.api_key_source
        );
    }
    for w in &config.warnings {
        tracing::warn!(key = %w.key, "{w}");
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

/// SIGHUP taken over by [`take_over_hangup`] before the proxy was configured.
#[cfg(unix)]
static EARLY_HANGUP: std::sync::Mutex<Option<tokio::signal::unix::Signal>> =
    std::sync::Mutex::new(None);

/// Take over SIGHUP now, before the configuration is read (which can block), for the proxy that
/// [`run_with`] starts later in this process: a SIGHUP received in between then reloads once
/// the proxy serves instead of ending the process. Call it inside a Tokio runtime.
pub fn take_over_hangup() {
    #[cfg(unix)]
    {
        let hup = hangup_signal();
        *EARLY_HANGUP.lock().unwrap_or_else(|p| p.into_inner()) = hup;
    }
}

/// Take over SIGHUP (whose default action ends the process), or the handle
/// [`take_over_hangup`] took, with whatever it received since.
fn hangup_signal() -> Hangup {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Some(early) = EARLY_HANGUP
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Some(early);
        }
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /reload instead");
                None
            }
        }
    }
}

/// SIGHUP re-reads the configuration (never ends the process), until `stop`.
async fn reload_on_hangup(
    hup: Hangup,
    reloader: Arc<reload::Reloader>,
    mut stop: watch::Receiver<bool>,
) {
    #[cfg(unix)]
    {
        let Some(mut hup) = hup else {
            let _ = stop.wait_for(|s| *s).await;
            return;
        };
        loop {
            let signal = tokio::select! {
                s = hup.recv() => s,
                _ = stop.wait_for(|s| *s) => return,
            };
            if signal.is_none() {
                let _ = stop.wait_for(|s| *s).await;
                return;
            }
            tracing::info!("SIGHUP: reloading the configuration");
            // A read that hangs (a config on a pipe, a hung mount) is left behind at shutdown
            // rather than holding it.
            tokio::select! {
                _ = reloader.reload_blocking() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (hup, reloader);
        let _ = stop.wait_for(|s| *s).await;
    }
}

#[cfg(test)]
mod tests {
    use super::listen;
    use std::time::Duration;

    /// 200 clients connecting at once to a listener that accepts none of them yet all get
    /// through the handshake: the kernel holds them. With `TcpListener::bind`'s backlog of 128
    /// the 130th and later are never answered until some are accepted, and this times out.
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_backlog_not_in_syn_retries() {
        // The kernel caps the backlog at `somaxconn`: on a host that keeps it below 200 the
        // burst is what it allows.
        let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(4096);
        let n = 200.min(cap);
        let l = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let connects: Vec<_> = (0..n)
            .map(|_| tokio::spawn(tokio::net::TcpStream::connect(addr)))
            .collect();
        let all = async {
            let mut held = Vec::new();
            for c in connects {
                held.push(c.await.unwrap().unwrap());
            }
            held
        };
        let held = tokio::time::timeout(Duration::from_secs(20), all)
            .await
            .expect("every connection is held by the kernel without an accept");
        assert_eq!(held.len(), n);
        drop(l);
    }
}

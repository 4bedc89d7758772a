//! End-to-end overhead: what a request pays for going through chutes-proxy, measured beside
//! the same request sent straight to the upstream and through nginx as a keep-alive reverse
//! proxy, in one run, at the same concurrencies and payloads.
//!
//! Why this shape: users pick a proxy that adds nothing they can feel, so the number that
//! matters is the latency *added* over a direct connection at a realistic fixed rate (open
//! loop, coordinated-omission-free: every request has a scheduled send time and its latency
//! is counted from that time, so a stall is charged to every request it delays), plus the
//! throughput ceiling (closed loop) against direct and against the reference proxy.
//!
//! Paths: `direct` (generator -> mock), `proxy` (generator -> chutes-proxy release binary with
//! limits that never bind -> mock), `nginx` (generator -> nginx, `keepalive 64`, HTTP/1.1,
//! `proxy_buffering off` -> mock). Payloads: a small JSON completion, and a 50-event SSE
//! stream (latency = until the last byte). Concurrency = open keep-alive connections.
//!
//! Run: `scripts/bench-e2e.sh` (installs nginx if missing and root), or
//! `cargo bench --bench e2e`. Knobs (env): E2E_SECS (open-loop seconds per cell, default 5),
//! E2E_CLOSED_SECS (default 3), E2E_RATE (JSON req/s, default 1000), E2E_SSE_RATE (streams/s,
//! default 100), E2E_CONNS (default "1,16,64"), E2E_PAYLOADS (default "json,sse50"),
//! E2E_PROXY_LOG (the proxy's RUST_LOG, default "info" = one log line per request, as users
//! run it), E2E_NGINX=0 to skip nginx, E2E_UPSTREAM=tls for the mock behind TLS (the path to
//! Chutes: `direct` then speaks TLS to it, the proxy and nginx speak plain HTTP to the
//! generator on loopback and TLS to the mock, as a sidecar would; ALPN http/1.1), or
//! E2E_UPSTREAM=tls-h2 for the same with the mock offering h2 first and the proxy set to
//! `upstream.http2 = true` (nginx and direct still speak HTTP/1.1 to it), BENCH_PROXY_BIN to measure another build of the
//! proxy (an A/B of a change). Under `cargo test` it does a smoke run of a second.
//!
//! SSE streams are offered at 100/s (5,000 events/s), not 1,000/s: a 50-event stream that
//! the mock flushes event by event costs the mock itself about half a millisecond, so at
//! 1,000/s on two shared cores the open loop would measure saturation, not overhead.
//!
//! Everything here is on 127.0.0.1; every loop is bounded by a deadline.

// A bench times a real proxy and real sockets from outside, in real time: std's clock is
// what it measures with. clippy.toml keeps std's clock out of the crate itself.
#![allow(clippy::disallowed_methods)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use support::{
    bench_mode, env_num, fmt_delta, fmt_dur, raise_nofile, raw_request, tight_timer_slack,
    wait_listening, Conn, Mock, ProxyProcess, Samples,
};

/// One measured cell: a path at a concurrency with a payload.
struct Cell {
    open: Samples,
    open_errors: usize,
    open_sent: usize,
    closed: Samples,
    closed_errors: usize,
    closed_rps: f64,
    /// CPU the proxy process (or nginx's processes) spent per request in the closed-loop run.
    cpu_per_req: Option<Duration>,
}

struct Plan {
    open_secs: f64,
    closed_secs: f64,
    rate: f64,
    sse_rate: f64,
    conns: Vec<usize>,
    warmup: Duration,
}

fn main() {
    let full = bench_mode();
    let plan = if full {
        Plan {
            open_secs: env_num("E2E_SECS", 5.0),
            closed_secs: env_num("E2E_CLOSED_SECS", 3.0),
            rate: env_num("E2E_RATE", 1000.0),
            sse_rate: env_num("E2E_SSE_RATE", 100.0),
            conns: std::env::var("E2E_CONNS")
                .ok()
                .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
                .filter(|v: &Vec<usize>| !v.is_empty())
                .unwrap_or_else(|| vec![1, 16, 64]),
            warmup: Duration::from_millis(300),
        }
    } else {
        println!("e2e: smoke run (cargo test); `cargo bench --bench e2e` for the real one");
        Plan {
            open_secs: 0.2,
            closed_secs: 0.2,
            rate: 200.0,
            sse_rate: 50.0,
            conns: vec![1, 4],
            warmup: Duration::from_millis(50),
        }
    };
    let nofile = raise_nofile();

    // The smoke run covers the TLS upstream too, so it cannot rot unseen.
    let upstream = std::env::var("E2E_UPSTREAM").unwrap_or_default();
    let h2 = upstream == "tls-h2";
    let tls = upstream == "tls" || h2 || !full;
    let mock = Mock::start_with(
        2,
        false,
        Duration::from_secs(1),
        tls.then(|| support::tls::server(h2)),
    );
    let proxy_log = std::env::var("E2E_PROXY_LOG").unwrap_or_else(|_| "info".into());
    let proxy = if tls {
        ProxyProcess::start_with_env(
            &proxy_config(
                &mock.url(),
                if h2 {
                    "tls_roots = \"native\"\nhttp2 = true\n"
                } else {
                    "tls_roots = \"native\"\n"
                },
            ),
            false,
            &proxy_log,
            &[("SSL_CERT_FILE", support::tls::CA)],
        )
    } else {
        ProxyProcess::start(&proxy_config(&mock.url(), ""), false, &proxy_log)
    };
    let nginx = if full && std::env::var("E2E_NGINX").as_deref() != Ok("0") {
        Nginx::start(mock.addr, tls)
    } else {
        None
    };
    let direct_tls = tls.then(support::tls::client);

    // (name, address, TLS to it, process whose CPU time is charged to the path)
    let mut paths: Vec<Path> = vec![
        ("direct", mock.addr, direct_tls.as_ref(), None),
        ("proxy", proxy.addr, None, Some(proxy.pid())),
    ];
    if let Some(n) = &nginx {
        paths.push(("nginx", n.addr, None, Some(n.child.id())));
    }
    println!(
        "e2e: open loop {:.0} req/s (SSE: {:.0} streams/s) for {:.1}s per cell, closed loop {:.1}s; connections {:?}; upstream {}; proxy {} (RUST_LOG={proxy_log}); nofile {nofile}",
        plan.rate, plan.sse_rate, plan.open_secs, plan.closed_secs, plan.conns,
        match (tls, h2) {
            (true, true) => "TLS (the proxy: h2 by ALPN)",
            (true, false) => "TLS (http/1.1)",
            _ => "plain HTTP/1.1",
        },
        support::proxy_bin()
    );

    let mut results: Vec<(&str, usize, &str, Cell)> = Vec::new();
    let payloads = std::env::var("E2E_PAYLOADS").unwrap_or_else(|_| "json,sse50".into());
    for (payload, stream) in [("json", false), ("sse50", true)] {
        if !payloads.split(',').any(|p| p.trim() == payload) {
            continue;
        }
        for &conns in &plan.conns {
            // Paths interleaved per cell, so that drift in the machine's load (other jobs on
            // a shared host) hits all three alike rather than whichever ran last.
            for &(name, addr, tls, pid) in &paths {
                let req = raw_request(addr, stream, "");
                let rate = if stream { plan.sse_rate } else { plan.rate };
                let cell = measure((addr, tls), &req, conns, rate, &plan, pid);
                eprintln!(
                    "  {payload:5} c={conns:<3} {name:6} open p50 {} p99 {} | closed {:.0} req/s",
                    fmt_dur(cell.open.clone().quantile(0.5)),
                    fmt_dur(cell.open.clone().quantile(0.99)),
                    cell.closed_rps
                );
                results.push((payload, conns, name, cell));
            }
        }
    }
    report(&mut results, &plan);
    let st = &mock.state;
    println!(
        "mock: {} requests, {} of them over HTTP/2",
        st.requests.load(std::sync::atomic::Ordering::Relaxed),
        st.h2_requests.load(std::sync::atomic::Ordering::Relaxed)
    );
    if nginx.is_none() && full {
        println!("nginx: skipped (not installed, or E2E_NGINX=0); scripts/bench-e2e.sh installs it when run as root");
    }
    if !full {
        // The smoke run must have reached the mock through the proxy at least once.
        assert!(
            mock.state
                .requests
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
    }
}

/// A measured path: its name, where the generator connects, over TLS with this config or
/// not, and the process whose CPU time is charged to it.
type Path<'a> = (
    &'static str,
    SocketAddr,
    Option<&'a Arc<rustls::ClientConfig>>,
    Option<u32>,
);

/// Where a generator connects, and over TLS with this config or not.
type Target<'a> = (SocketAddr, Option<&'a Arc<rustls::ClientConfig>>);

/// Limits that cannot bind at any rate this machine can produce: 60M/min is one token per
/// microsecond, with a burst of a million; memory-only state so no disk I/O is measured.
/// `upstream_extra` is more of the `[upstream]` table.
fn proxy_config(upstream: &str, upstream_extra: &str) -> String {
    format!(
        r#"[upstream]
url = "{upstream}"
{upstream_extra}[limits]
requests_per_minute = 60000000
burst = 1000000
max_concurrent = 4096
[queue]
max_depth = 100000
[state]
path = ""
"#
    )
}

fn measure(
    to: Target<'_>,
    req: &[u8],
    conns: usize,
    rate: f64,
    plan: &Plan,
    cpu_pid: Option<u32>,
) -> Cell {
    // Warm-up: opens every connection of the proxy's (and nginx's) upstream pool.
    let _ = closed_loop(to, req, conns, plan.warmup);
    let (open, open_errors, open_sent) = open_loop(
        to,
        req,
        conns,
        rate,
        Duration::from_secs_f64(plan.open_secs),
    );
    let cpu0 = cpu_pid.map(support::cpu_time_tree);
    let d = Duration::from_secs_f64(plan.closed_secs);
    let (closed, closed_errors, elapsed) = closed_loop(to, req, conns, d);
    let cpu_per_req = match (cpu_pid, cpu0) {
        (Some(pid), Some(c0)) if !closed.is_empty() => {
            Some((support::cpu_time_tree(pid).saturating_sub(c0)) / closed.len() as u32)
        }
        _ => None,
    };
    Cell {
        closed_rps: closed.len() as f64 / elapsed.as_secs_f64(),
        open,
        open_errors,
        open_sent,
        closed,
        closed_errors,
        cpu_per_req,
    }
}

/// Open loop: `rate` requests/s spread evenly over `conns` connections (each connection sends
/// every `conns / rate` s, offset so the aggregate is evenly spaced). Latency is measured from
/// the scheduled send time: a connection that falls behind sends at once and its queueing
/// delay is counted (wrk2's correction for coordinated omission).
fn open_loop(
    (addr, tls): Target<'_>,
    req: &[u8],
    conns: usize,
    rate: f64,
    dur: Duration,
) -> (Samples, usize, usize) {
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let per_conn = (dur.as_secs_f64() * rate / conns as f64).ceil() as usize;
    let barrier = Arc::new(Barrier::new(conns + 1));
    let start_at = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut all = Samples::with_capacity(per_conn * conns);
    let (mut errors, mut sent) = (0, 0);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|i| {
                let barrier = Arc::clone(&barrier);
                let start_at = Arc::clone(&start_at);
                s.spawn(move || {
                    tight_timer_slack();
                    let conn = Conn::connect_to(addr, tls);
                    barrier.wait();
                    let mut conn = match conn {
                        Ok(c) => c,
                        Err(_) => return (Samples::default(), per_conn, 0),
                    };
                    let start = *start_at.get().expect("set before the barrier");
                    let offset = Duration::from_secs_f64(i as f64 / rate);
                    let mut lat = Samples::with_capacity(per_conn);
                    let mut errors = 0;
                    // Bounded by count, and a connection that is hopelessly behind stops at
                    // twice the planned duration rather than run on.
                    let hard_end = start + dur * 2 + Duration::from_secs(1);
                    for k in 0..per_conn {
                        let sched = start + offset + interval * k as u32;
                        let now = Instant::now();
                        if now > hard_end {
                            errors += per_conn - k;
                            break;
                        }
                        if sched > now {
                            std::thread::sleep(sched - now);
                        }
                        match conn.roundtrip(req) {
                            Ok(r) if r.status == 200 => lat.push(Instant::now() - sched),
                            Ok(_) => errors += 1,
                            Err(_) => {
                                errors += 1;
                                match Conn::connect_to(addr, tls) {
                                    Ok(c) => conn = c,
                                    Err(_) => break,
                                }
                            }
                        }
                    }
                    (lat, errors, per_conn)
                })
            })
            .collect();
        // Everyone connected: start 20 ms from now so no thread starts already behind.
        start_at
            .set(Instant::now() + Duration::from_millis(20))
            .expect("set once");
        barrier.wait();
        for h in handles {
            let (lat, e, n) = h.join().expect("generator thread");
            all.extend(lat);
            errors += e;
            sent += n;
        }
    });
    (all, errors, sent)
}

/// Closed loop: each connection sends its next request as soon as the previous response has
/// been read, for `dur`. Returns latencies (from send), errors, and the real elapsed time.
fn closed_loop(
    (addr, tls): Target<'_>,
    req: &[u8],
    conns: usize,
    dur: Duration,
) -> (Samples, usize, Duration) {
    let barrier = Arc::new(Barrier::new(conns + 1));
    let mut all = Samples::default();
    let mut errors = 0;
    let mut elapsed = dur;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|_| {
                let barrier = Arc::clone(&barrier);
                s.spawn(move || {
                    let conn = Conn::connect_to(addr, tls);
                    barrier.wait();
                    let Ok(mut conn) = conn else {
                        return (Samples::default(), 1);
                    };
                    let end = Instant::now() + dur;
                    let mut lat = Samples::with_capacity(4096);
                    let mut errors = 0;
                    // Bounded by time; also by count, so a pathological fast path cannot
                    // fill memory.
                    for _ in 0..50_000_000u64 {
                        let t0 = Instant::now();
                        if t0 >= end {
                            break;
                        }
                        match conn.roundtrip(req) {
                            Ok(r) if r.status == 200 => lat.push(t0.elapsed()),
                            Ok(_) => errors += 1,
                            Err(_) => {
                                errors += 1;
                                match Conn::connect_to(addr, tls) {
                                    Ok(c) => conn = c,
                                    Err(_) => break,
                                }
                            }
                        }
                    }
                    (lat, errors)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        for h in handles {
            let (lat, e) = h.join().expect("generator thread");
            all.extend(lat);
            errors += e;
        }
        elapsed = t0.elapsed().max(Duration::from_millis(1));
    });
    (all, errors, elapsed)
}

fn report(results: &mut [(&str, usize, &str, Cell)], plan: &Plan) {
    println!();
    println!(
        "## Open loop at {:.0} req/s for JSON, {:.0} streams/s for SSE (latency from scheduled send to last byte), and closed-loop max throughput",
        plan.rate, plan.sse_rate
    );
    println!();
    println!("| payload | conns | path | p50 | p99 | p99.9 | added p50 | added p99 | errors | closed req/s | vs direct | closed p50 | closed p99 | CPU/req |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // Index of the direct cell for each (payload, conns).
    let direct: Vec<(String, usize, Duration, Duration, f64)> = results
        .iter_mut()
        .filter(|r| r.2 == "direct")
        .map(|(p, c, _, cell)| {
            (
                p.to_string(),
                *c,
                cell.open.quantile(0.5),
                cell.open.quantile(0.99),
                cell.closed_rps,
            )
        })
        .collect();
    for (payload, conns, name, cell) in results.iter_mut() {
        let d = direct
            .iter()
            .find(|d| d.0 == *payload && d.1 == *conns)
            .expect("a direct cell for every cell");
        let (p50, p99, p999) = (
            cell.open.quantile(0.5),
            cell.open.quantile(0.99),
            cell.open.quantile(0.999),
        );
        let (added50, added99) = if *name == "direct" {
            ("—".to_string(), "—".to_string())
        } else {
            (fmt_delta(p50, d.2), fmt_delta(p99, d.3))
        };
        println!(
            "| {payload} | {conns} | {name} | {} | {} | {} | {added50} | {added99} | {}/{} | {:.0} | {:.0}% | {} | {} | {} |",
            fmt_dur(p50),
            fmt_dur(p99),
            fmt_dur(p999),
            cell.open_errors + cell.closed_errors,
            cell.open_sent + cell.closed.len(),
            cell.closed_rps,
            100.0 * cell.closed_rps / d.4.max(1e-9),
            fmt_dur(cell.closed.quantile(0.5)),
            fmt_dur(cell.closed.quantile(0.99)),
            cell.cpu_per_req.map_or("—".to_string(), fmt_dur),
        );
    }
    println!();
    println!("Targets: added p50 ≤ 100µs and added p99 ≤ 1ms at {:.0} req/s (JSON); proxy closed-loop throughput ≥ 80% of direct at 64 connections; on par with nginx. CPU/req: CPU time of the proxy's (nginx's) processes per request in the closed-loop run.", plan.rate);
    let find = |results: &[(&str, usize, &str, Cell)], p: &str, c: usize, n: &str| {
        results
            .iter()
            .position(|r| r.0 == p && r.1 == c && r.2 == n)
    };
    for payload in ["json", "sse50"] {
        let max_c = *plan.conns.iter().max().unwrap_or(&1);
        if let (Some(pi), Some(di)) = (
            find(results, payload, max_c, "proxy"),
            find(results, payload, max_c, "direct"),
        ) {
            let ratio = results[pi].3.closed_rps / results[di].3.closed_rps.max(1e-9);
            let vs_nginx = find(results, payload, max_c, "nginx")
                .map(|ni| results[pi].3.closed_rps / results[ni].3.closed_rps.max(1e-9));
            println!(
                "  {payload}: proxy/direct throughput at {max_c} connections = {:.0}% ({}){}",
                ratio * 100.0,
                if ratio >= 0.8 {
                    "meets ≥ 80%"
                } else {
                    "below 80%"
                },
                vs_nginx.map_or(String::new(), |r| format!(
                    "; proxy/nginx = {:.0}% ({})",
                    r * 100.0,
                    if r >= 0.95 {
                        "on par or better"
                    } else {
                        "behind nginx"
                    }
                ))
            );
        }
    }
}

/// nginx as the reference reverse proxy, with a config written to a temp dir.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn binary() -> Option<PathBuf> {
        ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    }

    /// nginx in front of the mock at `upstream`, which speaks TLS with `tls`.
    fn start(upstream: SocketAddr, tls: bool) -> Option<Nginx> {
        let bin = Self::binary()?;
        let dir = tempfile::tempdir().ok()?;
        let port = support::free_port();
        let d = dir.path().display();
        let (scheme, upstream_tls) = if tls {
            (
                "https",
                format!(
                    "proxy_ssl_trusted_certificate {}; proxy_ssl_verify on; proxy_ssl_name 127.0.0.1; proxy_ssl_session_reuse on;",
                    support::tls::CA
                ),
            )
        } else {
            ("http", String::new())
        };
        // Two workers for two cores, as chutes-proxy runs two tokio workers; an access log
        // line per request, as the proxy logs one (both are the products' defaults).
        let conf = format!(
            r#"worker_processes 2;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  upstream mock {{
    server {upstream};
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass {scheme}://mock;
      {upstream_tls}
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).ok()?;
        let child = Command::new(&bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| eprintln!("nginx: cannot start {}: {e}", bin.display()))
            .ok()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
        let mut n = Nginx {
            child,
            addr,
            _dir: dir,
        };
        if !wait_listening(addr, Duration::from_secs(10)) {
            eprintln!("nginx: did not start listening; skipped");
            let _ = n.child.kill();
            return None;
        }
        let version = Command::new(&bin)
            .arg("-v")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
            .unwrap_or_default();
        println!("nginx: {version} on {addr}");
        Some(n)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT is nginx's graceful stop; the master takes its workers with it.
        support::stop_child(&mut self.child, libc::SIGQUIT);
    }
}

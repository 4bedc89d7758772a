//! Scale: 10,000 clients queued at once, each on its own connection, against a budget that is
//! shut while they arrive, through the release proxy over loopback.
//!
//! Why: a sidecar proxy must survive the day a batch job fires ten thousand requests at it:
//! bounded memory (target ≤ 64 MiB peak RSS), no reordering (FIFO within a client), and no
//! client left hanging past its deadline without either a response or a 429 that says when to
//! come back.
//!
//! How, in three phases: (1) all 10,000 clients connect, in waves, and send nothing yet: the
//! proxy's RSS with that many idle connections. (2) The mock answers a "primer" request with
//! `x-ratelimit-remaining-requests: 0` and a reset 16 s ahead, which closes the proxy's gate
//! (the proactive signal path, no probe). (3) While it is shut, the clients send in waves of
//! 100, 100 ms apart, each tagged `x-bench-seq` with its send order; every one queues
//! (`max_depth = 10,000`, and the estimate fits `max_wait`). Then 200 more arrive and must be
//! shed at once with `queue_full` and a `Retry-After`. When the gate opens the queue drains at
//! 500 req/s. The mock logs the order it receives them in; the admin `/status` is polled for
//! the queue depth; the proxy's RSS is its own (`VmRSS`, `VmHWM`: it is a separate process).
//!
//! FIFO is checked at wave granularity: waves are 100 ms apart, so every request of wave k
//! should be queued before wave k+1 is sent, and the upstream must see waves in order (a
//! violation can also mean the loaded machine took over 100 ms to accept and read a wave).
//! Within a wave the 100 requests race each other through the accept loop and two worker
//! threads, so their relative order is reported but not expected.
//!
//! Run: `cargo bench --bench scale` (raises its own RLIMIT_NOFILE to the hard limit, which
//! the proxy inherits; `scripts/bench-scale.sh` also tries `ulimit -n`). About 40 s. Under
//! `cargo test` it does a smoke run with 200 clients (about 5 s).

// A bench times a real proxy and real sockets from outside, in real time: std's clock is
// what it measures with. clippy.toml keeps std's clock out of the crate itself.
#![allow(clippy::disallowed_methods)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{bench_mode, fmt_dur, raise_nofile, raw_request, Conn, Mock, ProxyProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Plan {
    clients: usize,
    wave: usize,
    wave_gap: Duration,
    extra: usize,
    gate: Duration,
    rpm: u32,
    max_wait: Duration,
}

/// What one client saw.
#[derive(Clone, Copy, Default)]
struct Outcome {
    status: u16,
    retry_after: Option<u64>,
    elapsed: Duration,
    error: bool,
}

/// Slack on top of `max_wait` for "answered by its deadline": the proxy sheds at the deadline,
/// and the answer still has to cross loopback on a busy 2-core machine.
const DEADLINE_SLACK: Duration = Duration::from_secs(1);

fn main() {
    let full = bench_mode();
    let plan = if full {
        Plan {
            clients: 10_000,
            wave: 100,
            wave_gap: Duration::from_millis(100),
            extra: 200,
            gate: Duration::from_secs(16),
            rpm: 30_000,
            max_wait: Duration::from_secs(40),
        }
    } else {
        println!("scale: smoke run (cargo test); `cargo bench --bench scale` for the real one");
        Plan {
            clients: 200,
            wave: 50,
            wave_gap: Duration::from_millis(50),
            extra: 20,
            gate: Duration::from_secs(2),
            rpm: 60_000,
            max_wait: Duration::from_secs(10),
        }
    };
    let nofile = raise_nofile();
    let needed = (plan.clients + plan.extra + 200) as u64;
    if nofile < needed {
        println!(
            "scale: RLIMIT_NOFILE is {nofile}, {needed} needed; raise the hard limit (ulimit -Hn) and rerun. Skipped."
        );
        return;
    }

    let mock = Mock::start(2, true, plan.gate);
    let toml = format!(
        r#"[server]
max_connections = {}
# The clients connect first and send later (to measure idle connections on their own).
header_read_timeout = "120s"
[upstream]
url = "{}"
[limits]
requests_per_minute = {}
burst = 1
max_concurrent = 64
[queue]
max_depth = {}
max_wait = "{}s"
[state]
path = ""
"#,
        plan.clients + plan.extra + 1000,
        mock.url(),
        plan.rpm,
        plan.clients,
        plan.max_wait.as_secs()
    );
    let proxy = ProxyProcess::start(&toml, true, "info");
    let admin = proxy.admin.expect("admin listener");
    let (idle_rss, _) = proxy.rss_kib();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Phase 1: every client connects (in waves, so the listen backlog never overflows), and
    // nothing is sent yet: the memory of idle connections alone.
    let streams = rt.block_on(connect_all(proxy.addr, &plan));
    std::thread::sleep(Duration::from_millis(500));
    let (conn_rss, _) = proxy.rss_kib();

    // Phase 2: close the gate.
    let mut c = Conn::connect(proxy.addr).expect("connect to the proxy");
    let primer = c
        .roundtrip(&raw_request(proxy.addr, false, "x-bench-primer: 1\r\n"))
        .expect("primer");
    assert_eq!(primer.status, 200, "primer request");
    drop(c);
    mock.clear();

    // Watch the queue depth and the proxy's memory while the clients arrive and drain.
    let stop = Arc::new(AtomicBool::new(false));
    let peak_depth = Arc::new(AtomicUsize::new(0));
    let rss_at_peak = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let stop = Arc::clone(&stop);
        let peak_depth = Arc::clone(&peak_depth);
        let rss_at_peak = Arc::clone(&rss_at_peak);
        let pid = proxy.pid();
        std::thread::spawn(move || watch(admin, pid, &stop, &peak_depth, &rss_at_peak))
    };

    // Phase 3: every client sends, wave by wave; then the extras; then the queue drains.
    let started = Instant::now();
    let outcomes = rt.block_on(clients(proxy.addr, streams, &plan));
    let total_time = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    let (after_rss, hwm) = proxy.rss_kib();
    // The proxy gives freed heap back a few seconds after a deep queue drains (src/heap.rs
    // looks every 2 s): read RSS again once that has had time to happen.
    std::thread::sleep(if bench_mode() {
        Duration::from_secs(5)
    } else {
        Duration::from_millis(100)
    });
    let (settled_rss, _) = proxy.rss_kib();

    report(
        &plan,
        &mock,
        &outcomes,
        Memory {
            idle: idle_rss,
            connections: conn_rss,
            at_peak: rss_at_peak.load(Ordering::Relaxed) as u64,
            hwm,
            after: after_rss,
            settled: settled_rss,
        },
        peak_depth.load(Ordering::Relaxed),
        total_time,
    );
}

/// Size of the future an async fn of two arguments returns, from its type alone: what the
/// HTTP/1 server boxes per request in flight, and so a floor on the memory of each queued client.
fn future_size_2<A, B, Fut>(_: impl Fn(A, B) -> Fut) -> usize {
    std::mem::size_of::<Fut>()
}

fn future_size_3<A, B, C, Fut>(_: impl Fn(A, B, C) -> Fut) -> usize {
    std::mem::size_of::<Fut>()
}

/// The proxy's RSS (KiB) at each phase.
struct Memory {
    idle: u64,
    connections: u64,
    at_peak: u64,
    hwm: u64,
    after: u64,
    /// Five seconds after the drain.
    settled: u64,
}

/// Poll `/status` every 100 ms for the queue depth, sampling RSS when the depth peaks.
fn watch(
    admin: SocketAddr,
    pid: u32,
    stop: &AtomicBool,
    peak: &AtomicUsize,
    rss_at_peak: &AtomicUsize,
) {
    let req = format!("GET /status HTTP/1.1\r\nHost: {admin}\r\n\r\n").into_bytes();
    let mut conn = Conn::connect(admin).ok();
    // Bounded: the run itself is bounded, and this stops after 10 minutes regardless.
    let end = Instant::now() + Duration::from_secs(600);
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        if conn.is_none() {
            conn = Conn::connect(admin).ok();
        }
        if let Some(c) = conn.as_mut() {
            match c.roundtrip_body(&req) {
                Ok((_, body)) => {
                    let depth = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["queue"]["depth"].as_u64())
                        .unwrap_or(0) as usize;
                    if depth > peak.load(Ordering::Relaxed) {
                        peak.store(depth, Ordering::Relaxed);
                        let rss = support::proc_status_kib(pid, "VmRSS").unwrap_or(0);
                        rss_at_peak.store(rss as usize, Ordering::Relaxed);
                    }
                }
                Err(_) => conn = None,
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Open one connection per client, `plan.wave` at a time.
async fn connect_all(addr: SocketAddr, plan: &Plan) -> Vec<Option<tokio::net::TcpStream>> {
    let mut out = Vec::with_capacity(plan.clients);
    for w in 0..plan.clients.div_ceil(plan.wave) {
        let n = plan.wave.min(plan.clients - w * plan.wave);
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            set.spawn(async move {
                let s = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio::net::TcpStream::connect(addr),
                )
                .await;
                (i, s.ok().and_then(Result::ok))
            });
        }
        let mut wave: Vec<Option<tokio::net::TcpStream>> = (0..n).map(|_| None).collect();
        while let Some(r) = set.join_next().await {
            if let Ok((i, s)) = r {
                wave[i] = s;
            }
        }
        out.extend(wave);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

async fn clients(
    addr: SocketAddr,
    streams: Vec<Option<tokio::net::TcpStream>>,
    plan: &Plan,
) -> Vec<Outcome> {
    let n = plan.clients + plan.extra;
    let mut set = tokio::task::JoinSet::new();
    let budget = plan.max_wait + plan.gate + Duration::from_secs(15);
    let mut streams = streams.into_iter();
    for i in 0..n {
        if i > 0 && i % plan.wave == 0 && i <= plan.clients {
            tokio::time::sleep(plan.wave_gap).await;
        }
        let req = raw_request(
            addr,
            false,
            &format!("Connection: close\r\nx-bench-seq: {i}\r\n"),
        );
        // The extras connect now; the others use the connection they opened in phase 1.
        let stream = if i < plan.clients {
            streams.next().flatten()
        } else {
            None
        };
        let fresh = i >= plan.clients;
        set.spawn(async move {
            let t0 = Instant::now();
            // Bounded: nobody waits past the run's budget.
            let r = tokio::time::timeout(budget, one(addr, stream, fresh, &req)).await;
            let mut o = match r {
                Ok(Ok(o)) => o,
                _ => Outcome {
                    error: true,
                    ..Outcome::default()
                },
            };
            o.elapsed = t0.elapsed();
            (i, o)
        });
    }
    let mut out = vec![Outcome::default(); n];
    while let Some(r) = set.join_next().await {
        if let Ok((i, o)) = r {
            out[i] = o;
        }
    }
    out
}

/// One client: its own connection (opened earlier, or now if `fresh`), one request, read
/// until the server closes.
async fn one(
    addr: SocketAddr,
    stream: Option<tokio::net::TcpStream>,
    fresh: bool,
    req: &[u8],
) -> std::io::Result<Outcome> {
    let mut s = match stream {
        Some(s) => s,
        None if fresh => tokio::net::TcpStream::connect(addr).await?,
        None => return Err(std::io::Error::other("connection failed in phase 1")),
    };
    s.write_all(req).await?;
    let mut buf = Vec::with_capacity(2048);
    s.read_to_end(&mut buf).await?;
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(buf.len());
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let retry_after = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("retry-after")
            .then(|| v.trim().parse().ok())?
    });
    Ok(Outcome {
        status,
        retry_after,
        elapsed: Duration::ZERO,
        error: false,
    })
}

fn report(
    plan: &Plan,
    mock: &Mock,
    outcomes: &[Outcome],
    mem: Memory,
    peak_depth: usize,
    total_time: Duration,
) {
    let deadline = plan.max_wait + DEADLINE_SLACK;
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let (mut errors, mut late, mut bare_429) = (0, 0, 0);
    let mut max_elapsed = Duration::ZERO;
    for o in outcomes {
        if o.error {
            errors += 1;
            continue;
        }
        *by_status.entry(o.status).or_default() += 1;
        if o.status == 429 && o.retry_after.is_none() {
            bare_429 += 1;
        }
        if o.elapsed > deadline {
            late += 1;
        }
        max_elapsed = max_elapsed.max(o.elapsed);
    }
    let extras = &outcomes[plan.clients..];
    let extras_shed_fast = extras
        .iter()
        .filter(|o| {
            o.status == 429 && o.retry_after.is_some() && o.elapsed < Duration::from_secs(1)
        })
        .count();

    // FIFO: the upstream's arrival order against send order.
    let arrivals = mock.arrivals();
    let seqs: Vec<usize> = arrivals
        .iter()
        .filter_map(|a| a.seq.map(|s| s as usize))
        .collect();
    // Across waves: the wave index must never go down in arrival order.
    let (mut wave_violations, mut worst_lag) = (0, 0);
    let mut max_wave = 0;
    for &s in &seqs {
        let w = s / plan.wave;
        if w < max_wave {
            wave_violations += 1;
            worst_lag = worst_lag.max(max_wave - w);
        }
        max_wave = max_wave.max(w);
    }
    // Within a wave: the fraction of request pairs served in the opposite order to the one
    // they were sent in (0 = send order, about 0.5 = no relation to send order).
    let (mut inverted, mut pairs) = (0usize, 0usize);
    for w in 0..plan.clients.div_ceil(plan.wave) {
        let order: Vec<usize> = seqs
            .iter()
            .copied()
            .filter(|s| s / plan.wave == w)
            .collect();
        for i in 0..order.len() {
            for j in i + 1..order.len() {
                pairs += 1;
                inverted += usize::from(order[i] > order[j]);
            }
        }
    }
    let in_wave_inverted = inverted as f64 / pairs.max(1) as f64;
    let forwarded = seqs.len();
    let duplicate_or_lost = {
        let mut v = seqs.clone();
        v.sort_unstable();
        v.dedup();
        v.len() != forwarded
    };

    println!();
    println!(
        "## {} clients queued at once (+{} over the queue limit), {} req/min, gate shut {}s, max_wait {}s",
        plan.clients,
        plan.extra,
        plan.rpm,
        plan.gate.as_secs(),
        plan.max_wait.as_secs()
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| peak queue depth seen in /status | {peak_depth} |");
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "| proxy RSS: started / {} idle connections / at peak depth / peak (VmHWM) / after the drain / 5 s later | {:.1} / {:.1} / {:.1} / {:.1} / {:.1} / {:.1} MiB (target ≤ 64 MiB) |",
        plan.clients,
        mib(mem.idle),
        mib(mem.connections),
        mib(mem.at_peak),
        mib(mem.hwm),
        mib(mem.after),
        mib(mem.settled)
    );
    println!(
        "| per client: idle connection / queued request on top of it | {:.1} KiB / {:.1} KiB |",
        mem.connections.saturating_sub(mem.idle) as f64 / plan.clients as f64,
        mem.hwm.saturating_sub(mem.connections) as f64 / peak_depth.max(1) as f64
    );
    println!(
        "| size of the per-request future (`Proxy::handle`) / of `Admission::acquire`'s | {} / {} bytes |",
        future_size_2(chutes_proxy::proxy::Proxy::handle),
        future_size_3(chutes_proxy::admission::Admission::acquire),
    );
    println!(
        "| responses by status | {} |",
        by_status
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("| client errors (no response at all) | {errors} |");
    println!("| 429 without Retry-After | {bare_429} |");
    println!(
        "| answered after max_wait + {}s | {late} (slowest {}) |",
        DEADLINE_SLACK.as_secs(),
        fmt_dur(max_elapsed)
    );
    let extras_slowest = extras.iter().map(|o| o.elapsed).max().unwrap_or_default();
    let extras_429 = extras
        .iter()
        .filter(|o| o.status == 429 && o.retry_after.is_some())
        .count();
    println!(
        "| extra clients (over max_depth): 429 + Retry-After / of them within 1 s / slowest answer | {extras_429} / {extras_shed_fast} of {} / {} |",
        plan.extra,
        fmt_dur(extras_slowest)
    );
    println!(
        "| forwarded upstream | {forwarded}{} |",
        if duplicate_or_lost {
            " (DUPLICATES!)"
        } else {
            ""
        }
    );
    println!(
        "| FIFO across waves (waves {} ms apart) | {} |",
        plan.wave_gap.as_millis(),
        if wave_violations == 0 {
            "held: 0 violations".to_string()
        } else {
            format!(
                "{wave_violations} requests served after a later wave's (at most {worst_lag} waves late)"
            )
        }
    );
    println!(
        "| within a wave (sent concurrently): pairs served in reverse send order | {:.1}% |",
        100.0 * in_wave_inverted
    );
    println!("| total run time | {} |", fmt_dur(total_time));
    if !bench_mode() {
        assert_eq!(errors, 0, "every client got an answer");
        assert_eq!(bare_429, 0, "every 429 had a Retry-After");
    }
}

//! Fleet fidelity: three proxy replicas sharing one account budget through a real Redis
//! (issue 8, "Tests and benchmark"). Measures, for the whole fleet:
//!
//! 1. `saturate`: 50 closed-loop clients spread over three replicas against 600 req/min, burst
//!    5. The most requests the upstream saw in any 1 s, 10 s and 60 s window against
//!    `burst + rate × t`, utilisation (admitted / admissible, target ≥ 99%), sheds by reason,
//!    Jain's index of the clients' admitted counts, and Redis round trips per admitted
//!    request (from each replica's `/status` → `fleet.redis_round_trips`).
//! 2. `latency`: the added latency of the Redis path: sequential requests at limits that never
//!    bind, through a `local` replica and a `redis` replica, interleaved so both see the same
//!    machine load; p50/p99/p99.9 of each and the difference.
//!
//! Why: a fleet that overshoots the account's rate gets it banned for longer each time, one
//! that leaves budget unused wastes it, and the Redis hop is on every request's path, so its
//! cost must be known. Everything is loopback and in-process except `redis-server` itself.
//!
//! Self-contained on purpose (no `mod support;`): benches/support is being reworked for the
//! other benches, and this one must not break when it changes.
//!
//! Run: `cargo bench --bench fleet` (about FLEET_SECS + 15 s; FLEET_SECS defaults to 60).
//! Under `cargo test --all-targets` it prints one line and exits: it needs `redis-server` and
//! a minute, which a test run should not pay for.

// A bench times a real proxy and real sockets from outside, in real time: std's clock is
// what it measures with. clippy.toml keeps std's clock out of the crate itself.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chutes_proxy::clock::WallClock;
use chutes_proxy::config::{Config, Overrides};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

const RPM: u32 = 600;
const BURST: u32 = 5;
const CLIENTS: usize = 50;
const REPLICAS: usize = 3;
const LATENCY_N: usize = 300;
/// Safety bound on any closed loop besides its deadline (10 req/s × 60 s is ~600 in total).
const MAX_ITERS: usize = 1_000_000;

const REPLY: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1767225600,"model":"bench/model","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, how are you?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;
const REQUEST: &str = r#"{"model":"bench/model","messages":[{"role":"user","content":"Say hello in five words."}],"max_tokens":16,"stream":false}"#;

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not.
    if !std::env::args().any(|a| a == "--bench") {
        println!("fleet: skipped under cargo test (needs redis-server and a minute); run `cargo bench --bench fleet`");
        return;
    }
    let secs = std::env::var("FLEET_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(60.0)
        .clamp(1.0, 3600.0);
    let redis = Redis::start();
    let mock = Mock::start();
    // Two workers, as in the fidelity bench: proxies and clients share them, the mock has its
    // own runtime so upstream arrival stamps are not delayed by the load generator.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        saturate(&redis, &mock, secs).await;
        latency(&redis, &mock).await;
    });
}

// ---------------------------------------------------------------------------------------------
// Scenario 1: three replicas, 50 clients, saturating the budget
// ---------------------------------------------------------------------------------------------

async fn saturate(redis: &Redis, mock: &Mock, secs: f64) {
    let fleet = format!(
        "[shared_state]\nbackend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"bench-fleet:\"\n",
        redis.url()
    );
    let mut proxies = Vec::new();
    for _ in 0..REPLICAS {
        proxies.push(Proxy::start(mock, RPM, BURST, &fleet).await);
    }
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let shed: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    mock.clear();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        // Round-robin: clients 0, 3, 6, ... on replica 0, and so on (17/17/16).
        let url = proxies[i % REPLICAS].url("/v1/chat/completions");
        let client = client.clone();
        let shed = Arc::clone(&shed);
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            for _ in 0..MAX_ITERS {
                if Instant::now() >= end {
                    break;
                }
                // A request still queued at the end is cut off: it is outside the window.
                let Ok(r) = tokio::time::timeout_at(end.into(), post(&client, &url)).await else {
                    break;
                };
                match r {
                    Ok((200, _)) => ok += 1,
                    Ok((_, reason)) => *shed.lock().unwrap().entry(reason).or_default() += 1,
                    Err(e) => {
                        *shed
                            .lock()
                            .unwrap()
                            .entry(format!("client_error: {e}"))
                            .or_default() += 1;
                        // A broken client must not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            ok
        }));
    }
    let mut per_client = Vec::new();
    for t in tasks {
        per_client.push(t.await.unwrap_or(0) as f64);
    }
    // Round trips: read every replica's counter once, right at the end of the run. Each read
    // is itself one Redis call, which is subtracted below.
    let mut round_trips = Vec::new();
    for p in &proxies {
        round_trips.push(p.redis_round_trips(&client).await);
    }
    let at_upstream_total = mock.arrivals().len();
    for p in proxies {
        p.stop().await;
    }

    let times: Vec<Instant> = {
        let mut t: Vec<Instant> = mock
            .arrivals()
            .into_iter()
            .filter(|a| *a >= t0 && *a <= end)
            .collect();
        t.sort();
        t
    };
    let spacing = 60.0 / f64::from(RPM);
    let admissible = f64::from(BURST) + (secs / spacing).floor();
    println!();
    println!(
        "## saturate — {REPLICAS} replicas on one Redis, {CLIENTS} clients, {RPM} req/min, burst {BURST}, {secs:.0}s"
    );
    println!();
    println!("| window | max seen at upstream | bound burst + rate × t | within bound |");
    println!("|---|---|---|---|");
    let mut done: Vec<f64> = Vec::new();
    for w in [1.0f64, 10.0, 60.0] {
        // A window longer than the run is the run itself; report it once.
        let w = w.min(secs);
        if done.contains(&w) {
            continue;
        }
        done.push(w);
        let bound = f64::from(BURST) + (w / spacing).floor();
        let m = max_in_window(&times, Duration::from_secs_f64(w));
        println!(
            "| {w:.0}s | {m} | {bound:.0} | {} |",
            if m as f64 <= bound { "yes" } else { "NO" }
        );
    }
    println!();
    println!(
        "Utilisation: {} admitted / {admissible:.0} admissible = {:.2}% (target ≥ 99%); {:.3} req/s against {:.3} req/s",
        times.len(),
        100.0 * times.len() as f64 / admissible,
        times.len() as f64 / secs,
        f64::from(RPM) / 60.0
    );
    let client_ok: f64 = per_client.iter().sum();
    let (min, max) = per_client
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
    println!(
        "Fairness: Jain's index of admitted count across {CLIENTS} clients = {:.4} (min {min:.0}, max {max:.0}, {client_ok:.0} answered 200 in time)",
        jain(&per_client)
    );
    let shed = shed.lock().unwrap();
    let shed_s = if shed.is_empty() {
        "none".to_string()
    } else {
        shed.iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("Shed (reason: n): {shed_s}");
    let raw: u64 = round_trips.iter().sum();
    // One round trip per /status read (the fleet figures it reports).
    let net = raw.saturating_sub(round_trips.len() as u64);
    println!(
        "Redis round trips: {raw} reported by the replicas ({round_trips:?}), {net} without the {} status reads; \
         {at_upstream_total} requests reached the upstream by then → {:.2} round trips per admitted request",
        round_trips.len(),
        net as f64 / at_upstream_total.max(1) as f64
    );
}

// ---------------------------------------------------------------------------------------------
// Scenario 2: the added latency of the Redis path
// ---------------------------------------------------------------------------------------------

async fn latency(redis: &Redis, mock: &Mock) {
    // Limits that never bind: 10,000 req/s with a burst of 1,000, far above one sequential
    // client. What is left is the cost of the admission path itself.
    let (rpm, burst) = (600_000, 1000);
    let local = Proxy::start(mock, rpm, burst, "").await;
    let fleet = format!(
        "[shared_state]\nbackend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"bench-latency:\"\n",
        redis.url()
    );
    let remote = Proxy::start(mock, rpm, burst, &fleet).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let urls = [
        local.url("/v1/chat/completions"),
        remote.url("/v1/chat/completions"),
    ];
    // Warm up the connections (client pool, proxy → upstream pool, proxy → Redis).
    for _ in 0..20 {
        for u in &urls {
            let _ = post(&client, u).await;
        }
    }
    let mut samples = [Vec::with_capacity(LATENCY_N), Vec::with_capacity(LATENCY_N)];
    let mut failed = [0usize; 2];
    // Interleaved, so a burst of load from another process on the machine hits both alike.
    for _ in 0..LATENCY_N {
        for (k, u) in urls.iter().enumerate() {
            let t = Instant::now();
            match tokio::time::timeout(Duration::from_secs(10), post(&client, u)).await {
                Ok(Ok((200, _))) => samples[k].push(t.elapsed()),
                _ => failed[k] += 1,
            }
        }
    }
    local.stop().await;
    remote.stop().await;
    for s in &mut samples {
        s.sort();
    }
    println!();
    println!(
        "## latency — {LATENCY_N} sequential requests each, interleaved, limits not binding ({rpm} req/min, burst {burst})"
    );
    println!();
    // With 300 samples p99.9 is the slowest one but one (nearest rank), so it is noisy.
    println!("| backend | ok | p50 | p99 | p99.9 | max |");
    println!("|---|---|---|---|---|---|");
    for (name, s, f) in [
        ("local", &samples[0], failed[0]),
        ("redis", &samples[1], failed[1]),
    ] {
        println!(
            "| {name} | {}{} | {} | {} | {} | {} |",
            s.len(),
            if f > 0 {
                format!(" ({f} failed)")
            } else {
                String::new()
            },
            us(q(s, 0.5)),
            us(q(s, 0.99)),
            us(q(s, 0.999)),
            us(q(s, 1.0)),
        );
    }
    let diff = |p: f64| q(&samples[1], p) as i64 - q(&samples[0], p) as i64;
    println!(
        "| added by redis | | {:+} µs | {:+} µs | {:+} µs | |",
        diff(0.5) / 1000,
        diff(0.99) / 1000,
        diff(0.999) / 1000
    );
}

/// Nearest-rank quantile in nanoseconds (0 for no samples).
fn q(sorted: &[Duration], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_nanos() as u64
}

fn us(ns: u64) -> String {
    format!("{} µs", ns / 1000)
}

// ---------------------------------------------------------------------------------------------
// Pieces
// ---------------------------------------------------------------------------------------------

/// One request through a proxy: the status and, if not 200, the proxy's shed reason.
async fn post(client: &HttpClient, url: &str) -> Result<(u16, String), String> {
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(REQUEST.as_bytes())))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if status == 200 {
        return Ok((200, String::new()));
    }
    let v = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
    let reason = v["error"]["proxy"]["reason"]
        .as_str()
        .map_or_else(|| format!("status_{status}"), str::to_string);
    Ok((status, reason))
}

/// The largest number of instants (sorted) inside any window of length `w`.
fn max_in_window(sorted: &[Instant], w: Duration) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..sorted.len() {
        // Half-open window [t, t + w): arrivals exactly `w` apart are in different windows.
        while sorted[hi].duration_since(sorted[lo]) >= w {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

fn jain(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let sum: f64 = xs.iter().sum();
    let sq: f64 = xs.iter().map(|x| x * x).sum();
    if sq == 0.0 {
        1.0
    } else {
        sum * sum / (n * sq)
    }
}

/// One in-process proxy with its admin listener (for `/status`).
struct Proxy {
    addr: SocketAddr,
    admin: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Proxy {
    async fn start(mock: &Mock, rpm: u32, burst: u32, extra: &str) -> Proxy {
        let toml = format!(
            "[upstream]\nurl = \"http://{}\"\n[limits]\nrequests_per_minute = {rpm}\nburst = {burst}\n\
             max_concurrent = 64\n[queue]\nmax_depth = 1000\nmax_wait = \"30s\"\n[state]\npath = \"\"\n{extra}",
            mock.addr
        );
        let overrides = Overrides {
            listen: Some("127.0.0.1:0".into()),
            admin_listen: Some("127.0.0.1:0".into()),
            upstream: None,
        };
        let config = Config::from_toml(&toml, &overrides, &|_: &str| None).expect("bench config");
        let (main, admin) = chutes_proxy::bind(&config).await.expect("bind");
        let addr = main.local_addr().unwrap();
        let admin_addr = admin
            .as_ref()
            .expect("admin listener")
            .local_addr()
            .unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(chutes_proxy::run(
            config,
            main,
            admin,
            WallClock::System,
            async move {
                let _ = rx.await;
            },
        ));
        Proxy {
            addr,
            admin: admin_addr,
            stop,
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn redis_round_trips(&self, client: &HttpClient) -> u64 {
        let req = http::Request::get(format!("http://{}/status", self.admin))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await
        else {
            return 0;
        };
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        v["fleet"]["redis_round_trips"].as_u64().unwrap_or(0)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// A fast upstream that records when each request's head arrived. Own runtime, so the
/// stamps are not delayed by the proxies and clients.
struct Mock {
    addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<Instant>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Mock {
    fn start() -> Mock {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mock-upstream")
            .enable_all()
            .build()
            .unwrap();
        let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let arr = Arc::clone(&arrivals);
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors or similar: back off rather than spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let arr = Arc::clone(&arr);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        arr.lock().unwrap().push(Instant::now());
                        async {
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from_static(REPLY.as_bytes())))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Mock {
            addr,
            arrivals,
            runtime: Some(runtime),
        }
    }

    fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.arrivals.lock().unwrap().clear();
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// `redis-server` on a free loopback port in a temporary directory, no persistence; killed on
/// drop.
struct Redis {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        let r = Redis {
            port,
            child,
            _dir: dir,
        };
        // Readiness of an external process: poll PING, bounded by a deadline.
        let client = redis::Client::open(r.url()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

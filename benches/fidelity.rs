//! Rate fidelity: does the proxy hold the line exactly, use all of the budget, and share it
//! fairly, when clients want far more than the account allows?
//!
//! Why: Chutes bans an account for longer with each burst past its limit, so the proxy must
//! never let through more than `burst + rate × t` in any window, yet a budget left unused is
//! money and latency thrown away, and one noisy service must not starve the others.
//!
//! Scenarios (each through the real proxy over loopback, in-process, to a recording mock):
//! 1. `saturate`: 50 clients in closed loops against 600 req/min with burst 5. Reports the
//!    most requests the upstream saw in any 1 s, 10 s and 60 s window against the GCRA bound,
//!    utilisation (admitted / `burst + rate × T`, target ≥ 99%), Jain's index of the clients'
//!    mean queue waits and of their admitted counts, and sheds by reason.
//! 2. `flood_vs_trickle` (issue 7): two configured clients of equal weight; `heavy` sends 50×
//!    more than `light`, and `light` asks for less than its share. `light` must get everything
//!    it asks for with waits near zero (under one spacing, 100 ms); `heavy` gets the rest.
//! 3. `weighted_1_3` (issue 7): `light` (weight 3) and `heavy` (weight 1, sending 50× more)
//!    both ask for more than their share: admitted shares must follow the weights, 75/25.
//!    For 2 and 3 the reference is the weighted max-min fair allocation given what each
//!    client asked for; Jain's index is over admitted / fair (1.0 = exactly fair).
//!
//! Run: `cargo bench --bench fidelity` (about 3 minutes); FIDELITY_SECS=10 for a shorter run
//! (windows longer than the run are reported as n/a). Under `cargo test` it does a smoke run
//! of about 3 seconds at a faster rate.

// A bench times a real proxy and real sockets from outside, in real time: std's clock is
// what it measures with. clippy.toml keeps std's clock out of the crate itself.
#![allow(clippy::disallowed_methods)]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chutes_proxy::config::{Config, Overrides};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{
    bench_mode, env_num, fmt_dur, jain, max_in_window, max_min_fair, InProcess, Mock, Samples,
};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// How one simulated client sends.
#[derive(Clone, Copy)]
enum Mode {
    /// `loops` closed loops: each sends its next request when the previous one is answered.
    Closed { loops: usize },
    /// Open loop at a fixed rate (req/s), whatever happens to earlier requests.
    Open { rate: f64 },
}

struct Group {
    label: &'static str,
    /// The configured client this group is attributed to (`x-proxy-client`), or `default`.
    client: Option<&'static str>,
    weight: f64,
    mode: Mode,
}

struct Scenario {
    name: &'static str,
    rpm: u32,
    burst: u32,
    secs: f64,
    clients_toml: &'static str,
    groups: Vec<Group>,
}

/// What one group saw, client side.
#[derive(Default)]
struct Seen {
    sent: usize,
    ok: usize,
    /// Waits (send -> response head) of admitted requests.
    waits: Samples,
    /// Per closed loop: (admitted, total wait), for Jain's index across clients.
    per_loop: Vec<(usize, Duration)>,
    shed: BTreeMap<String, usize>,
}

fn main() {
    let full = bench_mode();
    let secs = if full {
        env_num("FIDELITY_SECS", 60.0).max(1.0)
    } else {
        println!(
            "fidelity: smoke run (cargo test); `cargo bench --bench fidelity` for the real one"
        );
        1.0
    };
    // The real run uses the budget; the smoke run a faster one so a second shows
    // something.
    let (rpm, burst) = if full { (600, 5) } else { (1200, 5) };
    let r = f64::from(rpm) / 60.0;
    let scenarios = vec![
        Scenario {
            name: "saturate",
            rpm,
            burst,
            secs,
            clients_toml: "",
            groups: vec![Group {
                label: "50 clients",
                client: None,
                weight: 1.0,
                mode: Mode::Closed {
                    loops: if full { 50 } else { 10 },
                },
            }],
        },
        Scenario {
            name: "flood_vs_trickle (weights 1:1)",
            rpm,
            burst,
            secs,
            clients_toml: "[[clients.client]]\nname = \"heavy\"\nweight = 1\n[[clients.client]]\nname = \"light\"\nweight = 1\n",
            groups: vec![
                Group {
                    label: "heavy",
                    client: Some("heavy"),
                    weight: 1.0,
                    mode: Mode::Open { rate: 10.0 * r },
                },
                Group {
                    label: "light",
                    client: Some("light"),
                    weight: 1.0,
                    mode: Mode::Open { rate: 0.2 * r },
                },
            ],
        },
        Scenario {
            name: "weighted (heavy 1 : light 3)",
            rpm,
            burst,
            secs,
            clients_toml: "[[clients.client]]\nname = \"heavy\"\nweight = 1\n[[clients.client]]\nname = \"light\"\nweight = 3\n",
            groups: vec![
                Group {
                    label: "heavy",
                    client: Some("heavy"),
                    weight: 1.0,
                    mode: Mode::Open { rate: 50.0 * r },
                },
                Group {
                    label: "light",
                    client: Some("light"),
                    weight: 3.0,
                    mode: Mode::Open { rate: r },
                },
            ],
        },
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for s in &scenarios {
        rt.block_on(run(s));
    }
}

async fn run(s: &Scenario) {
    let mock = Mock::start(1, true, Duration::from_secs(1));
    let toml = format!(
        "[upstream]\nurl = \"{}\"\n[limits]\nrequests_per_minute = {}\nburst = {}\nmax_concurrent = 16\n\
         [queue]\nmax_depth = 1000\nmax_wait = \"20s\"\n[state]\npath = \"\"\n{}",
        mock.url(),
        s.rpm,
        s.burst,
        s.clients_toml
    );
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some(String::new()),
        upstream: None,
    };
    let config = Config::from_toml(&toml, &overrides, &|_: &str| None).expect("bench config");
    let proxy = InProcess::start(config).await;
    let addr = proxy.addr;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("http://{addr}/v1/chat/completions");

    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(s.secs);
    let seen: Vec<Arc<Mutex<Seen>>> = s
        .groups
        .iter()
        .map(|_| Arc::new(Mutex::new(Seen::default())))
        .collect();
    let mut tasks = Vec::new();
    for (gi, g) in s.groups.iter().enumerate() {
        let mk = {
            let url = url.clone();
            let client = client.clone();
            let name = g.client;
            move || send(client.clone(), url.clone(), name, gi)
        };
        match g.mode {
            Mode::Closed { loops } => {
                seen[gi].lock().unwrap().per_loop = vec![(0, Duration::ZERO); loops];
                for l in 0..loops {
                    let seen = Arc::clone(&seen[gi]);
                    let mk = mk.clone();
                    tasks.push(tokio::spawn(async move {
                        // Bounded by the run's end; each request is cut off there too.
                        while Instant::now() < end {
                            let sent_at = Instant::now();
                            seen.lock().unwrap().sent += 1;
                            let Ok(r) = tokio::time::timeout_at(end.into(), mk()).await else {
                                break;
                            };
                            record(&seen, r, sent_at, Some(l));
                        }
                    }));
                }
            }
            Mode::Open { rate } => {
                let seen = Arc::clone(&seen[gi]);
                let n = (rate * s.secs).floor() as usize;
                tasks.push(tokio::spawn(async move {
                    let mut inflight = tokio::task::JoinSet::new();
                    for k in 0..n {
                        let at = t0 + Duration::from_secs_f64(k as f64 / rate);
                        tokio::time::sleep_until(at.into()).await;
                        seen.lock().unwrap().sent += 1;
                        let seen = Arc::clone(&seen);
                        let fut = mk();
                        inflight.spawn(async move {
                            let sent_at = Instant::now();
                            if let Ok(r) = tokio::time::timeout_at(end.into(), fut).await {
                                record(&seen, r, sent_at, None);
                            }
                        });
                        // Reap finished ones so the set stays small under a flood.
                        while inflight.try_join_next().is_some() {}
                    }
                    while inflight.join_next().await.is_some() {}
                }));
            }
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    proxy.stop(Duration::from_secs(5)).await;
    report(s, &mock, t0, end, &seen);
}

/// One request: status, shed reason (for a 429), and when the head arrived.
async fn send(
    client: HttpClient,
    url: String,
    name: Option<&'static str>,
    group: usize,
) -> Result<(u16, Option<String>), String> {
    let mut req = http::Request::post(url)
        .header("content-type", "application/json")
        .header("x-bench-client", group.to_string());
    if let Some(n) = name {
        req = req.header("x-proxy-client", n);
    }
    let req = req
        .body(Full::new(Bytes::from(support::request_body(false))))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let reason = (status != 200).then(|| {
        let v = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
        let reason = v["error"]["proxy"]["reason"]
            .as_str()
            .map_or_else(|| format!("status_{status}"), str::to_string);
        // A queue_timeout is either predicted (shed at once, the point of the design) or a
        // waiter that reached its deadline in the queue (the prediction was too hopeful).
        let message = v["error"]["message"].as_str().unwrap_or("");
        if reason == "queue_timeout" && message.contains("waited") {
            "queue_timeout (waited to its deadline)".to_string()
        } else if reason == "queue_timeout" {
            "queue_timeout (predicted, at once)".to_string()
        } else {
            reason
        }
    });
    Ok((status, reason))
}

fn record(
    seen: &Mutex<Seen>,
    r: Result<(u16, Option<String>), String>,
    sent_at: Instant,
    lp: Option<usize>,
) {
    let wait = sent_at.elapsed();
    let mut s = seen.lock().unwrap();
    match r {
        Ok((200, _)) => {
            s.ok += 1;
            s.waits.push(wait);
            if let Some(l) = lp {
                s.per_loop[l].0 += 1;
                s.per_loop[l].1 += wait;
            }
        }
        Ok((_, reason)) => *s.shed.entry(reason.unwrap_or_default()).or_default() += 1,
        Err(e) => {
            let kind = if e.contains("connect") {
                "client_connect_error"
            } else {
                "client_error"
            };
            *s.shed.entry(kind.into()).or_default() += 1;
        }
    }
}

fn report(s: &Scenario, mock: &Mock, t0: Instant, end: Instant, seen: &[Arc<Mutex<Seen>>]) {
    let arrivals = mock.arrivals();
    let mut times: Vec<Instant> = arrivals
        .iter()
        .filter(|a| a.at >= t0 && a.at <= end)
        .map(|a| a.at)
        .collect();
    times.sort();
    let rate = f64::from(s.rpm) / 60.0;
    let spacing = 60.0 / f64::from(s.rpm);
    let admissible = f64::from(s.burst) + (s.secs / spacing).floor();
    println!();
    println!(
        "## {} — {} req/min, burst {}, {:.0}s",
        s.name, s.rpm, s.burst, s.secs
    );
    println!();
    println!("| window | max seen at upstream | bound burst + rate × t | within bound |");
    println!("|---|---|---|---|");
    for w in [1.0f64, 10.0, 60.0] {
        let bound = f64::from(s.burst) + (w / spacing).floor();
        if w > s.secs + 1e-9 {
            println!("| {w:.0}s | n/a (run is {:.0}s) | {bound:.0} | — |", s.secs);
            continue;
        }
        let m = max_in_window(&times, Duration::from_secs_f64(w));
        println!(
            "| {w:.0}s | {m} | {bound:.0} | {} |",
            if m as f64 <= bound { "yes" } else { "NO" }
        );
    }
    println!();
    println!(
        "Utilisation: {} admitted / {:.0} admissible = {:.2}% (target ≥ 99%); {:.2} req/s against {:.2} req/s",
        times.len(),
        admissible,
        100.0 * times.len() as f64 / admissible,
        times.len() as f64 / s.secs,
        rate
    );

    // Per group: demand, admitted (at the upstream), shares, waits, sheds.
    let by_group: Vec<usize> = (0..s.groups.len())
        .map(|gi| {
            arrivals
                .iter()
                .filter(|a| a.at >= t0 && a.at <= end && a.client == Some(gi as u8))
                .count()
        })
        .collect();
    let demands: Vec<f64> = seen.iter().map(|g| g.lock().unwrap().sent as f64).collect();
    let weights: Vec<f64> = s.groups.iter().map(|g| g.weight).collect();
    let fair = max_min_fair(admissible, &demands, &weights);
    let total: usize = by_group.iter().sum();
    let wsum: f64 = weights.iter().sum();
    println!();
    println!("| client | weight | sent | admitted | share | weight share | max-min fair | admitted / fair | wait p50 | wait p99 | wait max | shed (reason: n) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut ratio = Vec::new();
    for (gi, g) in s.groups.iter().enumerate() {
        let mut st = seen[gi].lock().unwrap();
        let adm = by_group[gi];
        let r = adm as f64 / fair[gi].max(1e-9);
        ratio.push(r);
        let shed = if st.shed.is_empty() {
            "none".to_string()
        } else {
            st.shed
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (p50, p99) = (st.waits.quantile(0.5), st.waits.quantile(0.99));
        println!(
            "| {} | {} | {} | {} | {:.1}% | {:.1}% | {:.0} | {:.3} | {} | {} | {} | {shed} |",
            g.label,
            g.weight,
            st.sent,
            adm,
            100.0 * adm as f64 / total.max(1) as f64,
            100.0 * g.weight / wsum,
            fair[gi],
            r,
            fmt_dur(p50),
            fmt_dur(p99),
            fmt_dur(st.waits.max()),
        );
    }
    if s.groups.len() > 1 {
        println!();
        println!(
            "Jain's index of admitted / max-min fair share across clients: {:.4} (1 = exactly fair)",
            jain(&ratio)
        );
    }
    for (gi, g) in s.groups.iter().enumerate() {
        let st = seen[gi].lock().unwrap();
        if st.per_loop.len() > 1 {
            let waits: Vec<f64> = st
                .per_loop
                .iter()
                .filter(|(n, _)| *n > 0)
                .map(|(n, w)| w.as_secs_f64() / *n as f64)
                .collect();
            let counts: Vec<f64> = st.per_loop.iter().map(|(n, _)| *n as f64).collect();
            println!();
            println!(
                "{}: Jain's index of mean queue wait across {} clients = {:.4}; of admitted count = {:.4}; mean wait {} (min client {}, max client {})",
                g.label,
                st.per_loop.len(),
                jain(&waits),
                jain(&counts),
                fmt_dur(st.waits.mean()),
                fmt_dur(Duration::from_secs_f64(waits.iter().copied().fold(f64::INFINITY, f64::min).min(1e9))),
                fmt_dur(Duration::from_secs_f64(waits.iter().copied().fold(0.0, f64::max))),
            );
        }
    }
}

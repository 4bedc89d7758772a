//! Allowance used on an emulated Chutes account (issue 13 item 10): five services sharing one
//! account, calling Chutes directly, then through chutes-proxy.
//!
//! Why: Chutes bans an account for longer with each burst past its edge limit, so services
//! that each pace themselves but do not know about each other get banned and then waste the
//! budget backing off. A proxy holding the account's budget should turn that into steady use
//! of nearly all of it, and a busy *model* (capacity 429s) must not cost the other services
//! anything.
//!
//! Setup (everything in-process, on 127.0.0.1): the Chutes emulator of
//! `tests/it/support/chutes.rs` (included below by `#[path]`, so tests and bench share one
//! emulator) with an edge limit of `CHUTES_EDGE_RPM` requests per emulated minute (sliding),
//! bans of 60 s doubling per violation, and time running `CHUTES_SCALE` times faster (10: a
//! "minute" lasts 6 s). Five services, each one request at a time with its own fixed spacing
//! (start to start; together 1.47× the edge limit), and on any 429 a backoff of 60, 120, then
//! 240 s (emulated; reset by a success). Service 5 calls `busy/model`, which in the "busy"
//! runs answers a capacity 429 to every third request.
//!
//! Runs: {direct, through the proxy} × {all models healthy, one busy model}. The proxy is the
//! library's `bind`/`run` on the same runtime, configured at 90% of the edge limit (in real
//! time: `0.9 × edge × scale` per minute, burst 5), its queue wait and cooldowns scaled like
//! the emulator's time (20 s, 30 s... emulated). The emulator advertises
//! `X-Chutes-RL-User: edge × scale` so a proxy that follows advertised limits sees the truth
//! in its own (real) time.
//!
//! Reported per run: **allowance used** = requests the edge let through (answered by the
//! application: 200s, capacity 429s, 402s) / (edge limit × emulated minutes), and the share of
//! that which were 200s; bans with their lengths; and per service what it saw (200s, and each
//! kind of error: the edge's nginx 429, a capacity 429, or the proxy's own 429 by reason) and
//! how long it spent backing off.
//!
//! Run: `cargo bench --bench chutes` (about 2.5 minutes: 4 runs of `CHUTES_MINUTES` = 5
//! emulated minutes at ×10). Knobs (env): CHUTES_EDGE_RPM (600), CHUTES_SCALE (10),
//! CHUTES_MINUTES (5), CHUTES_PROXY_SHARE (0.9). Under `cargo test --all-targets` it does a
//! smoke run of two short runs (about 5 seconds).

// A bench times a real proxy and real sockets from outside, in real time: std's clock is
// what it measures with. clippy.toml keeps std's clock out of the crate itself.
#![allow(clippy::disallowed_methods)]

mod support;

#[path = "../tests/it/support/chutes.rs"]
mod emulator;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chutes_proxy::config::{Config, Overrides};
use emulator::{ChutesConfig, ChutesEmulator, Stats, NGINX_429};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{bench_mode, env_num, InProcess};
use tokio::time::Instant;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The services' backoff after a 429, emulated seconds, as the seeds' services did it.
const BACKOFF: [f64; 3] = [60.0, 120.0, 240.0];
/// The model that answers a capacity 429 one time in three in the "busy" runs.
const BUSY_MODEL: &str = "busy/model";
const CALM_MODEL: &str = "deepseek-ai/DeepSeek-V3";
const BUSY_EVERY: u32 = 3;

struct Service {
    name: &'static str,
    model: &'static str,
    /// Spacing between sends, in edge spacings (60 / edge rpm emulated seconds): 2.5 means
    /// this service alone asks for 40% of the edge limit.
    spacing_in_edge_spacings: f64,
}

const SERVICES: [Service; 5] = [
    Service {
        name: "svc1",
        model: CALM_MODEL,
        spacing_in_edge_spacings: 2.5,
    },
    Service {
        name: "svc2",
        model: CALM_MODEL,
        spacing_in_edge_spacings: 3.0,
    },
    Service {
        name: "svc3",
        model: CALM_MODEL,
        spacing_in_edge_spacings: 3.5,
    },
    Service {
        name: "svc4",
        model: CALM_MODEL,
        spacing_in_edge_spacings: 4.0,
    },
    Service {
        name: "svc5",
        model: BUSY_MODEL,
        spacing_in_edge_spacings: 5.0,
    },
];

#[derive(Clone, Copy)]
struct Plan {
    edge_rpm: u32,
    scale: f64,
    minutes: f64,
    proxy_share: f64,
}

impl Plan {
    /// Emulated seconds as real time.
    fn real(&self, emulated_secs: f64) -> Duration {
        Duration::from_secs_f64(emulated_secs / self.scale)
    }
}

struct Run {
    label: &'static str,
    through_proxy: bool,
    busy: bool,
}

/// What one service saw.
#[derive(Default)]
struct Seen {
    sent: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    backing_off: Duration,
}

struct Outcome {
    stats: Stats,
    emulated_minutes: f64,
    seen: Vec<Seen>,
    proxy_note: Option<String>,
}

fn main() {
    let full = bench_mode();
    let plan = if full {
        Plan {
            edge_rpm: env_num("CHUTES_EDGE_RPM", 600.0).max(10.0) as u32,
            scale: env_num("CHUTES_SCALE", 10.0).max(1.0),
            minutes: env_num("CHUTES_MINUTES", 5.0).max(0.5),
            proxy_share: env_num("CHUTES_PROXY_SHARE", 0.9).clamp(0.05, 1.0),
        }
    } else {
        println!("chutes: smoke run (cargo test); `cargo bench --bench chutes` for the real one");
        // An emulated minute of 2 s at 60 requests: enough to see every path work.
        Plan {
            edge_rpm: 60,
            scale: 30.0,
            minutes: 1.0,
            proxy_share: 0.9,
        }
    };
    let all = [
        Run {
            label: "direct, models healthy",
            through_proxy: false,
            busy: false,
        },
        Run {
            label: "direct, one busy model",
            through_proxy: false,
            busy: true,
        },
        Run {
            label: "proxy, models healthy",
            through_proxy: true,
            busy: false,
        },
        Run {
            label: "proxy, one busy model",
            through_proxy: true,
            busy: true,
        },
    ];
    // CHUTES_ONLY=<text>: only the runs whose label contains it (e.g. "busy").
    let only = std::env::var("CHUTES_ONLY").unwrap_or_default();
    let runs: Vec<&Run> = if full {
        all.iter()
            .filter(|r| r.label.contains(only.as_str()))
            .collect()
    } else {
        all.iter().filter(|r| r.busy).collect()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut outcomes = Vec::new();
    for r in &runs {
        eprintln!("chutes: running \"{}\"...", r.label);
        outcomes.push(rt.block_on(run(plan, r)));
    }
    report(plan, &runs, &outcomes);
}

/// The proxy's config for a run: 90% of the edge, everything time-like scaled.
fn proxy_toml(plan: Plan, upstream: &str, with_model_keys: bool) -> String {
    let ms = |emulated_secs: f64| format!("{}ms", plan.real(emulated_secs).as_millis().max(1));
    let rpm = (plan.proxy_share * f64::from(plan.edge_rpm) * plan.scale).floor() as u64;
    // `cooldown.model_*` (CONTRACT r2) keys: scaled like the rest when the proxy has them.
    let model_keys = if with_model_keys {
        format!(
            "model_initial = \"{}\"\nmodel_max = \"{}\"\n",
            ms(5.0),
            ms(120.0)
        )
    } else {
        String::new()
    };
    format!(
        "[upstream]\nurl = \"{upstream}\"\nfirst_byte_timeout = \"10s\"\n\
         [limits]\nrequests_per_minute = {rpm}\nburst = 5\nmax_concurrent = 16\n\
         [queue]\nmax_depth = 1000\nmax_wait = \"{}\"\n\
         [cooldown]\ninitial = \"{}\"\nmax = \"{}\"\n{model_keys}\
         [retry]\nmax_attempts = {}\n\
         [state]\npath = \"\"\n",
        ms(20.0),
        ms(30.0),
        ms(3_600.0),
        // CHUTES_RETRIES: the proxy's retry.max_attempts (its default, 1, when unset).
        env_num("CHUTES_RETRIES", 1.0).clamp(0.0, 10.0) as u32,
    )
}

async fn run(plan: Plan, r: &Run) -> Outcome {
    let mut cfg = ChutesConfig {
        requests_per_minute: plan.edge_rpm,
        ban_initial: Duration::from_secs(60),
        ban_max: Duration::from_secs(86_400),
        time_scale: plan.scale,
        // The daily quota is not what this bench measures: large enough never to bind.
        daily_quota: 1_000_000,
        // Per *real* minute, the proxy's frame of reference.
        rl_user: Some((f64::from(plan.edge_rpm) * plan.scale) as u32),
        ..ChutesConfig::default()
    };
    if r.busy {
        cfg = cfg.capacity_every(BUSY_MODEL, BUSY_EVERY);
    }
    let emu = ChutesEmulator::start(cfg).await;

    let mut proxy = None;
    let mut proxy_note = None;
    let target = if r.through_proxy {
        let overrides = Overrides {
            listen: Some("127.0.0.1:0".into()),
            admin_listen: Some(String::new()),
            upstream: None,
        };
        let no_env = |_: &str| None;
        let config =
            match Config::from_toml(&proxy_toml(plan, &emu.url(), true), &overrides, &no_env) {
                Ok(c) => c,
                Err(e) => {
                    proxy_note = Some(format!(
                        "this proxy refuses cooldown.model_* ({}); ran with its defaults for those",
                        e.to_string().lines().next().unwrap_or("").trim()
                    ));
                    Config::from_toml(&proxy_toml(plan, &emu.url(), false), &overrides, &no_env)
                        .expect("bench proxy config")
                }
            };
        let p = InProcess::start(config).await;
        let addr = p.addr;
        proxy = Some(p);
        format!("http://{addr}")
    } else {
        emu.url()
    };

    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{target}/v1/chat/completions");
    let start_emulated = emu.now();
    let end = Instant::now() + plan.real(plan.minutes * 60.0);
    let seen: Vec<Arc<Mutex<Seen>>> = SERVICES
        .iter()
        .map(|_| Arc::new(Mutex::new(Seen::default())))
        .collect();
    let tasks: Vec<_> = SERVICES
        .iter()
        .zip(&seen)
        .map(|(svc, seen)| {
            let spacing = plan.real(svc.spacing_in_edge_spacings * 60.0 / f64::from(plan.edge_rpm));
            tokio::spawn(service(
                plan,
                client.clone(),
                url.clone(),
                svc.model,
                spacing,
                end,
                Arc::clone(seen),
            ))
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let stats = emu.stats();
    let emulated_minutes = (emu.now() - start_emulated) / 60.0;
    if let Some(p) = proxy {
        p.stop(Duration::from_secs(5)).await;
    }
    let seen = seen
        .into_iter()
        .map(|s| std::mem::take(&mut *s.lock().unwrap()))
        .collect();
    Outcome {
        stats,
        emulated_minutes,
        seen,
        proxy_note,
    }
}

/// One service: a request at a time, `spacing` from send to send, backing off on any 429.
async fn service(
    plan: Plan,
    client: HttpClient,
    url: String,
    model: &'static str,
    spacing: Duration,
    end: Instant,
    seen: Arc<Mutex<Seen>>,
) {
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":1}}"#
    );
    let mut level = 0usize;
    let mut next = Instant::now();
    loop {
        tokio::time::sleep_until(next.min(end)).await;
        if Instant::now() >= end {
            return;
        }
        let sent_at = Instant::now();
        seen.lock().unwrap().sent += 1;
        // A request still unanswered at the end is not counted either way.
        let Ok(outcome) = tokio::time::timeout_at(end, call(&client, &url, &body)).await else {
            return;
        };
        let mut s = seen.lock().unwrap();
        match outcome {
            Ok((200, _)) => {
                s.ok += 1;
                level = 0;
                next = sent_at + spacing;
            }
            Ok((429, kind)) => {
                *s.errors.entry(kind).or_default() += 1;
                let pause = plan.real(BACKOFF[level.min(BACKOFF.len() - 1)]);
                level += 1;
                let now = Instant::now();
                // Only the part inside the run is time lost to it.
                s.backing_off += pause.min(end.saturating_duration_since(now));
                next = now + pause;
            }
            Ok((_, kind)) | Err(kind) => {
                *s.errors.entry(kind).or_default() += 1;
                next = sent_at + spacing;
            }
        }
    }
}

/// Status and, for anything but a 200, what kind of answer it was.
async fn call(client: &HttpClient, url: &str, body: &str) -> Result<(u16, String), String> {
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("connection error ({e})"))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if status == 200 {
        return Ok((200, String::new()));
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let kind = if let Some(reason) = v["error"]["proxy"]["reason"].as_str() {
        format!("proxy {status} {reason}")
    } else if bytes == NGINX_429.as_bytes() {
        format!("edge {status} (nginx page)")
    } else if let Some(detail) = v["detail"].as_str() {
        let short: String = detail.chars().take(40).collect();
        format!("upstream {status} \"{short}\"")
    } else {
        format!("status {status}")
    };
    Ok((status, kind))
}

fn report(plan: Plan, runs: &[&Run], outcomes: &[Outcome]) {
    println!();
    println!(
        "## chutes: 5 services on one emulated account — edge {} req/min (sliding), bans 60 s doubling, time ×{}, {} emulated min per run, proxy at {:.0}% of the edge",
        plan.edge_rpm,
        plan.scale,
        plan.minutes,
        100.0 * plan.proxy_share
    );
    println!();
    println!("| run | allowance used | of which 200s | edge-passed / allowance | bans (emulated lengths) | capacity 429s |");
    println!("|---|---|---|---|---|---|");
    for (r, o) in runs.iter().zip(outcomes) {
        let allowance = f64::from(plan.edge_rpm) * o.emulated_minutes;
        let s = &o.stats;
        let bans = if s.bans.is_empty() {
            "0".to_string()
        } else {
            let lengths: Vec<String> = s
                .bans
                .iter()
                .map(|b| format!("{:.0}s", b.length.as_secs_f64()))
                .collect();
            format!("{} ({})", s.bans.len(), lengths.join(", "))
        };
        println!(
            "| {} | {:.1}% | {:.1}% | {} / {:.0} | {bans} | {} |",
            r.label,
            100.0 * s.edge_passed as f64 / allowance,
            100.0 * s.status(200) as f64 / allowance,
            s.edge_passed,
            allowance,
            s.capacity_429,
        );
    }
    println!();
    println!(
        "| run | service | model | sent | 200s | errors seen (kind: n) | backing off (emulated) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (r, o) in runs.iter().zip(outcomes) {
        for (svc, seen) in SERVICES.iter().zip(&o.seen) {
            let errors = if seen.errors.is_empty() {
                "none".to_string()
            } else {
                seen.errors
                    .iter()
                    .map(|(k, n)| format!("{k}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "| {} | {} | {} | {} | {} | {errors} | {:.0}s |",
                r.label,
                svc.name,
                svc.model,
                seen.sent,
                seen.ok,
                seen.backing_off.as_secs_f64() * plan.scale,
            );
        }
    }
    for (r, o) in runs.iter().zip(outcomes) {
        if let Some(note) = &o.proxy_note {
            println!();
            println!("Note ({}): {note}.", r.label);
        }
    }
}

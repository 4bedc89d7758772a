//! A Chutes emulator: an in-process HTTP/1.1 upstream on `127.0.0.1:0` that answers the way
//! Chutes does (CONTRACT.md "Facts about the upstream", NOTES.md "Chutes, as its own code and
//! its users' captures show it"), for integration tests and for `benches/chutes.rs`.
//!
//! Owns, per emulator (one account):
//! - the edge limiter: at most `requests_per_minute` requests in any sliding (emulated) minute.
//!   The request that would exceed it is a *violation*: it gets nginx's HTML 429 (no
//!   Retry-After, no X-RateLimit-*) and starts a ban of `ban_initial`, doubling with each
//!   violation up to `ban_max`, during which every request gets that same page. Requests
//!   refused by the edge do not enter the window; requests made during a ban do not extend
//!   it (Chutes' exact rule is not public; this is the milder reading, so an emulated ban is
//!   never worse than a real one). The violation count never decays.
//! - per-model capacity: a model configured with `capacity_every = k` answers its k-th, 2k-th,
//!   ... request with `{"detail":"Infrastructure is at maximum capacity, try again later"}`
//!   (429, JSON). Deterministic, and not an account violation (those requests passed the edge,
//!   so they do use the window).
//! - the daily quota, counting successful invocations per emulated UTC day: spent, it answers
//!   402 `{"detail":{"message":"Quota exceeded ...","quota_reset_timestamp":<next 00:00 UTC>}}`;
//!   and optionally a subscription cap per 4-hour UTC window, answered with the
//!   "Subscription usage cap exceeded" 402.
//! - headers on every inference answer (success, capacity 429, 402): `X-Chutes-Quota-Total`,
//!   `-Used`, `-Remaining` as a snapshot *before* the call, `X-Chutes-RL-User` (60, configured,
//!   or `inf`), `X-Chutes-RL-Chute` where the model has an override, `X-Chutes-InvocationID`.
//! - `GET /users/me/quota_usage/me` → `{"quota": q, "used": u}` (`used` a float, as Chutes
//!   writes it); OpenAI-shaped chat completions (JSON, or SSE for `"stream": true`) on any
//!   other `POST /v1/...`; `GET /v1/models`.
//! - time: emulated seconds run `time_scale` times faster than tokio time (10.0: a "minute"
//!   lasts 6 s), and tests can jump the emulated clock with [`ChutesEmulator::advance`]
//!   instead of sleeping. The emulated wall clock starts at `start_unix`.
//! - what happened: per-status and per-model counts, violations and bans ([`Stats`]).
//!
//! Deliberately absent: authentication (any key is accepted), TLS, HTTP/2, per-model quotas,
//! token accounting, and any use of the proxy's own code (so the emulator cannot share a bug
//! with what it tests). One file, no dependency on the test harness around it, so the
//! integration tests (`tests/it/support`) and the benches (`#[path]`) include the same code.

// The tests and the bench each use a different subset.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// nginx's stock 429 page, as Chutes' edge sends it.
pub const NGINX_429: &str = "<html>\r\n<head><title>429 Too Many Requests</title></head>\r\n<body>\r\n<center><h1>429 Too Many Requests</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
/// The per-model capacity answer's body.
pub const CAPACITY_BODY: &str =
    r#"{"detail":"Infrastructure is at maximum capacity, try again later"}"#;
/// The subscription spending-cap 402's body.
pub const USAGE_CAP_BODY: &str =
    r#"{"detail":"Subscription usage cap exceeded. Please add balance to continue."}"#;
/// Chutes' default per-user rate, advertised in `X-Chutes-RL-User`.
pub const DEFAULT_RL_USER: u32 = 60;

const EMULATED_MINUTE: f64 = 60.0;
const DAY: f64 = 86_400.0;
const USAGE_WINDOW: f64 = 4.0 * 3_600.0;

/// How one model behaves.
#[derive(Clone, Debug, Default)]
pub struct ModelBehaviour {
    /// Every k-th request reaching this model (k, 2k, ...) is a capacity 429.
    pub capacity_every: Option<u32>,
    /// The model's own rate limit, sent as `X-Chutes-RL-Chute`.
    pub rl_chute: Option<u32>,
}

/// One account's emulated Chutes. Durations are emulated time.
#[derive(Clone, Debug)]
pub struct ChutesConfig {
    /// The edge limit: requests in any sliding emulated minute.
    pub requests_per_minute: u32,
    /// The first ban; each further violation doubles it.
    pub ban_initial: Duration,
    /// "Up to a day".
    pub ban_max: Duration,
    /// Emulated seconds per tokio second (1.0: real time).
    pub time_scale: f64,
    /// The emulated wall clock (UNIX seconds) when the emulator starts.
    pub start_unix: f64,
    /// Successful invocations allowed per emulated UTC day; 0 = no daily quota (headers say
    /// `Total: 0, Used: 0, Remaining: 0`, as for an account paying as it goes).
    pub daily_quota: u64,
    /// Invocations already counted today when the emulator starts.
    pub used_at_start: u64,
    /// Successful invocations per 4-hour UTC window before the subscription-cap 402; None = no
    /// cap.
    pub usage_cap_per_window: Option<u64>,
    /// `X-Chutes-RL-User`: a rate per minute, or None for `inf`.
    pub rl_user: Option<u32>,
    /// Models with special behaviour; any other model is served normally.
    pub models: HashMap<String, ModelBehaviour>,
    /// Real (tokio) time each inference answer waits before its head is sent.
    pub latency: Duration,
}

impl Default for ChutesConfig {
    fn default() -> Self {
        ChutesConfig {
            requests_per_minute: 60,
            ban_initial: Duration::from_secs(60),
            ban_max: Duration::from_secs(86_400),
            time_scale: 1.0,
            start_unix: chutes_proxy::clock::unix_now(),
            daily_quota: 5_000,
            used_at_start: 0,
            usage_cap_per_window: None,
            rl_user: Some(DEFAULT_RL_USER),
            models: HashMap::new(),
            latency: Duration::ZERO,
        }
    }
}

impl ChutesConfig {
    /// `model` answers a capacity 429 to every `k`-th request.
    pub fn capacity_every(mut self, model: &str, k: u32) -> Self {
        self.models
            .entry(model.to_string())
            .or_default()
            .capacity_every = Some(k.max(1));
        self
    }

    /// `model` advertises its own rate limit.
    pub fn rl_chute(mut self, model: &str, per_minute: u32) -> Self {
        self.models.entry(model.to_string()).or_default().rl_chute = Some(per_minute);
        self
    }
}

/// One ban the edge imposed.
#[derive(Clone, Debug, PartialEq)]
pub struct Ban {
    /// Emulated seconds since the emulator started.
    pub at: f64,
    pub length: Duration,
}

/// What the emulator saw and answered, since it started.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Requests that passed the edge (answered by the application, whatever the status).
    pub edge_passed: u64,
    /// Edge 429s: violations plus requests refused during a ban.
    pub edge_429: u64,
    pub violations: u64,
    /// Requests refused because a ban was running.
    pub banned_hits: u64,
    pub bans: Vec<Ban>,
    /// Every answer, by status.
    pub by_status: BTreeMap<u16, u64>,
    /// Answers of requests that named a model, by model then status (edge 429s included).
    pub by_model: BTreeMap<String, BTreeMap<u16, u64>>,
    /// Capacity 429s answered.
    pub capacity_429: u64,
    /// Successful invocations counted today (the quota's `used`).
    pub used_today: u64,
}

impl Stats {
    pub fn status(&self, code: u16) -> u64 {
        self.by_status.get(&code).copied().unwrap_or(0)
    }

    pub fn model_status(&self, model: &str, code: u16) -> u64 {
        self.by_model
            .get(model)
            .and_then(|m| m.get(&code))
            .copied()
            .unwrap_or(0)
    }
}

struct State {
    config: ChutesConfig,
    /// Real time origin of the emulated clock.
    origin: Instant,
    /// Emulated seconds added by [`ChutesEmulator::advance`].
    offset: f64,
    /// Emulated instants (seconds since start) of the requests in the edge's window.
    window: VecDeque<f64>,
    ban_until: f64,
    /// Requests seen per model, for `capacity_every`.
    model_requests: HashMap<String, u64>,
    /// Emulated UTC day index and 4-hour window index the counters below belong to.
    day: i64,
    used: u64,
    usage_window: i64,
    window_used: u64,
    invocation: u64,
    stats: Stats,
}

impl State {
    /// Emulated seconds since the emulator started.
    fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * self.config.time_scale + self.offset
    }

    fn unix(&self, now: f64) -> f64 {
        self.config.start_unix + now
    }

    /// Resets the daily and 4-hour counters when the emulated clock has crossed into a new
    /// day or window.
    fn roll(&mut self, unix: f64) {
        let day = (unix / DAY).floor() as i64;
        if day != self.day {
            self.day = day;
            self.used = 0;
        }
        let w = (unix / USAGE_WINDOW).floor() as i64;
        if w != self.usage_window {
            self.usage_window = w;
            self.window_used = 0;
        }
    }

    /// The edge: None if the request passes (and is now in the window), else the 429.
    fn edge(&mut self, now: f64) -> Option<Response<Full<Bytes>>> {
        if now < self.ban_until {
            self.stats.banned_hits += 1;
            self.stats.edge_429 += 1;
            return Some(edge_429());
        }
        while self
            .window
            .front()
            .is_some_and(|t| *t <= now - EMULATED_MINUTE)
        {
            self.window.pop_front();
        }
        if self.window.len() >= self.config.requests_per_minute as usize {
            self.stats.violations += 1;
            self.stats.edge_429 += 1;
            let doublings = (self.stats.violations - 1).min(40) as i32;
            let length = (self.config.ban_initial.as_secs_f64() * 2f64.powi(doublings))
                .min(self.config.ban_max.as_secs_f64());
            self.ban_until = now + length;
            self.stats.bans.push(Ban {
                at: now,
                length: Duration::from_secs_f64(length),
            });
            return Some(edge_429());
        }
        self.window.push_back(now);
        self.stats.edge_passed += 1;
        None
    }

    /// An inference call that passed the edge.
    fn invoke(&mut self, model: Option<&str>, stream: bool, unix: f64) -> Response<Full<Bytes>> {
        self.roll(unix);
        let cfg = &self.config;
        let total = cfg.daily_quota;
        // The snapshot before this call, as Chutes' `build_response_headers` takes it.
        let (used, remaining) = if total == 0 {
            (0, 0)
        } else {
            (self.used, total.saturating_sub(self.used))
        };
        let behaviour = model.and_then(|m| cfg.models.get(m)).cloned();
        let rl_chute = behaviour.as_ref().and_then(|b| b.rl_chute);
        let rl_user = cfg.rl_user;
        self.invocation += 1;
        let invocation = self.invocation;
        let with_headers = |mut r: Response<Full<Bytes>>| {
            let h = r.headers_mut();
            h.insert("x-chutes-quota-total", total.into());
            h.insert("x-chutes-quota-used", used.into());
            h.insert("x-chutes-quota-remaining", remaining.into());
            h.insert(
                "x-chutes-rl-user",
                rl_user.map_or(HeaderValue::from_static("inf"), HeaderValue::from),
            );
            if let Some(n) = rl_chute {
                h.insert("x-chutes-rl-chute", n.into());
            }
            h.insert("x-chutes-invocationid", invocation.into());
            r
        };

        let Some(model) = model else {
            return with_headers(json(400, r#"{"detail":"model is required"}"#));
        };
        if total > 0 && self.used >= total {
            let reset = format_midnight(((unix / DAY).floor() + 1.0) * DAY);
            let body = format!(
                r#"{{"detail":{{"message":"Quota exceeded for today ({used}/{total}); resets at 00:00 UTC","quota_reset_timestamp":"{reset}"}}}}"#
            );
            return with_headers(json(402, &body));
        }
        if cfg
            .usage_cap_per_window
            .is_some_and(|cap| self.window_used >= cap)
        {
            return with_headers(json(402, USAGE_CAP_BODY));
        }
        let n = self.model_requests.entry(model.to_string()).or_default();
        *n += 1;
        if behaviour
            .and_then(|b| b.capacity_every)
            .is_some_and(|k| (*n).is_multiple_of(u64::from(k)))
        {
            self.stats.capacity_429 += 1;
            return with_headers(json(429, CAPACITY_BODY));
        }
        self.used += 1;
        self.window_used += 1;
        self.stats.used_today = self.used;
        with_headers(completion(model, invocation, unix, stream))
    }
}

fn response(status: u16, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json(status: u16, body: &str) -> Response<Full<Bytes>> {
    response(status, "application/json", body.to_string())
}

fn edge_429() -> Response<Full<Bytes>> {
    let mut r = response(429, "text/html", NGINX_429.to_string());
    r.headers_mut()
        .insert("server", HeaderValue::from_static("nginx"));
    r
}

/// An OpenAI-shaped chat completion: one JSON object, or SSE chunks ending in `[DONE]`.
fn completion(model: &str, n: u64, unix: f64, stream: bool) -> Response<Full<Bytes>> {
    let model = serde_json::Value::from(model);
    let created = unix as i64;
    if !stream {
        let body = serde_json::json!({
            "id": format!("chatcmpl-emu-{n}"),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        });
        return json(200, &body.to_string());
    }
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        let c = serde_json::json!({
            "id": format!("chatcmpl-emu-{n}"),
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
        });
        format!("data: {c}\n\n")
    };
    let body = [
        chunk(
            serde_json::json!({"role": "assistant", "content": ""}),
            None,
        ),
        chunk(serde_json::json!({"content": "ok"}), None),
        chunk(serde_json::json!({}), Some("stop")),
        "data: [DONE]\n\n".to_string(),
    ]
    .concat();
    response(200, "text/event-stream", body)
}

/// A UTC midnight as Chutes writes `quota_reset_timestamp`: "2025-09-13T00:00:00+00:00".
/// (Howard Hinnant's civil_from_days; written out here rather than borrowed from the proxy.)
fn format_midnight(unix: f64) -> String {
    let z = (unix / DAY).floor() as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T00:00:00+00:00")
}

/// A running emulator. Dropping it stops the server and every connection.
pub struct ChutesEmulator {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: JoinHandle<()>,
}

impl ChutesEmulator {
    pub async fn start(config: ChutesConfig) -> ChutesEmulator {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let start = config.start_unix;
        let used = config.used_at_start;
        let state = Arc::new(Mutex::new(State {
            origin: Instant::now(),
            offset: 0.0,
            window: VecDeque::new(),
            ban_until: f64::NEG_INFINITY,
            model_requests: HashMap::new(),
            day: (start / DAY).floor() as i64,
            used,
            usage_window: (start / USAGE_WINDOW).floor() as i64,
            window_used: 0,
            invocation: 0,
            stats: Stats {
                used_today: used,
                ..Stats::default()
            },
            config,
        }));
        let server = tokio::spawn(serve(listener, Arc::clone(&state)));
        ChutesEmulator {
            addr,
            state,
            server,
        }
    }

    /// `http://127.0.0.1:port`, for `upstream.url` or a direct client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    /// Moves the emulated clock forward (bans end, the window empties, days roll) without
    /// any real time passing.
    pub fn advance(&self, by: Duration) {
        self.lock().offset += by.as_secs_f64();
    }

    /// Emulated seconds since start.
    pub fn now(&self) -> f64 {
        self.lock().now()
    }

    /// Emulated seconds of ban left (0 when none).
    pub fn ban_left(&self) -> f64 {
        let s = self.lock();
        (s.ban_until - s.now()).max(0.0)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug in this file; the figures are still fine to
        // read.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ChutesEmulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The accept loop. Connections end when it is aborted: each one waits on `stopped`, whose
/// sender this task owns.
async fn serve(listener: TcpListener, state: Arc<Mutex<State>>) {
    let (_stop, stopped) = watch::channel(());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors under load: back off rather than spin. Not synchronisation.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, Arc::clone(&state)));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stopped.changed() => {}
            }
        });
    }
}

/// The request's `model` and `stream` fields, if its body is a JSON object.
fn model_and_stream(body: &[u8]) -> (Option<String>, bool) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let model = v.get("model").and_then(|m| m.as_str()).map(str::to_string);
    let stream = v.get("stream").and_then(|s| s.as_bool()).unwrap_or(false);
    (model, stream)
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (head, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let (model, stream) = model_and_stream(&body);
    let path = head.uri.path();
    let inference = head.method == Method::POST && path.starts_with("/v1/");
    let (resp, latency) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        let now = s.now();
        let unix = s.unix(now);
        let resp = match s.edge(now) {
            Some(refused) => refused,
            None if inference => s.invoke(model.as_deref(), stream, unix),
            None if head.method == Method::GET && path == "/users/me/quota_usage/me" => {
                s.roll(unix);
                let body = format!(
                    r#"{{"quota": {}, "used": {:.1}}}"#,
                    s.config.daily_quota, s.used as f64
                );
                json(200, &body)
            }
            None if head.method == Method::GET && path == "/v1/models" => {
                let mut names: Vec<&String> = s.config.models.keys().collect();
                names.sort();
                let data: Vec<_> = names
                    .into_iter()
                    .map(|n| serde_json::json!({"id": n, "object": "model"}))
                    .collect();
                json(
                    200,
                    &serde_json::json!({"object": "list", "data": data}).to_string(),
                )
            }
            None => json(404, r#"{"detail":"Not Found"}"#),
        };
        let code = resp.status().as_u16();
        *s.stats.by_status.entry(code).or_default() += 1;
        if let Some(m) = &model {
            *s.stats
                .by_model
                .entry(m.clone())
                .or_default()
                .entry(code)
                .or_default() += 1;
        }
        (resp, inference.then_some(s.config.latency))
    };
    if let Some(d) = latency.filter(|d| !d.is_zero()) {
        tokio::time::sleep(d).await;
    }
    Ok(resp)
}

//! The two halves of the soak and kill-9 tests (`scripts/soak.sh`, `scripts/kill9.sh`) that a
//! shell script cannot be: a misbehaving mock upstream that counts exactly what it received,
//! and a load generator whose clients abort at random moments.
//!
//! ```text
//! soak mock --port-file F [--mode soak|kill9] [--seed N]
//! soak load --proxy http://127.0.0.1:P --secs S [--concurrency C] [--max-requests M]
//!           [--abort-rate R] [--think-ms T] [--seed N]
//! ```
//!
//! `mock` binds 127.0.0.1:0, writes its port to `F`, and answers until killed. In `soak` mode
//! most answers are small JSON replies, a fifth are slow SSE streams (some carrying Chutes' raw
//! `{"error": ...}` line, some reset mid-body), and a few are 429s (nginx HTML without hints,
//! or JSON with `Retry-After`). In `kill9` mode every answer is a quick 200. Either way it
//! counts each request when its head arrives (before answering, so a request the proxy sent is
//! counted even if everyone hangs up at once) and reports the counts at `GET /__soak/stats`
//! and the `x-proxy-request-id` of every request at `GET /__soak/ids` (neither is counted; the
//! scripts ask the mock directly, not through the proxy).
//!
//! `load` runs `C` closed-loop clients against the proxy until `S` seconds or `M` requests,
//! each pausing a random 0..2T ms between requests so a shed storm does not spin two loaded
//! cores. A fraction `R` of requests is abandoned at a random moment (queued, uploading or
//! mid-stream); some send a large body, some `x-proxy-max-wait: 0`. At the end it prints one
//! JSON object: requests by outcome (HTTP status and the proxy's `error.proxy.reason`).
//!
//! Loopback only; every loop ends at a deadline or a count. Only built by `cargo test`, never run.

// A example times a real proxy and real sockets from outside, in real time: std's clock is
// what it measures with. clippy.toml keeps std's clock out of the crate itself.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A tiny xorshift64* generator: the soak needs variety, not statistics, and the `rand`
/// crate is not worth a dependency for that.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

fn time_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// `--name value` from the command line.
fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    arg(args, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("soak: cannot start a runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("mock") => runtime.block_on(mock(&args)),
        Some("load") => runtime.block_on(load(&args)),
        _ => Err("usage: soak mock --port-file F [--mode soak|kill9] | soak load --proxy URL --secs S [...]".into()),
    };
    if let Err(e) = result {
        eprintln!("soak: {e}");
        std::process::exit(1);
    }
}

// ----- the mock upstream ----------------------------------------------------------------------

/// What the mock received, by the kind of answer it chose, and the proxy's request id of
/// each (so a script can tell exactly which counted request never arrived, if any).
#[derive(Default)]
struct Counts {
    received: AtomicU64,
    by_kind: Mutex<BTreeMap<&'static str, u64>>,
    ids: Mutex<Vec<String>>,
}

impl Counts {
    fn kind(&self, k: &'static str) {
        if let Ok(mut m) = self.by_kind.lock() {
            *m.entry(k).or_default() += 1;
        }
    }
}

/// A response body fed by a task, so streams can be slow, carry raw error lines or fail.
enum MockBody {
    Full(Option<Bytes>),
    Chan(mpsc::Receiver<Result<Bytes, BoxError>>),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Chan(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }
}

fn full(status: u16, content_type: &str, body: &str) -> Response<MockBody> {
    let mut r = Response::new(MockBody::Full(Some(Bytes::from(body.to_string()))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

async fn mock(args: &[String]) -> Result<(), BoxError> {
    let port_file = arg(args, "--port-file").ok_or("--port-file is required")?;
    let kill9 = arg(args, "--mode").as_deref() == Some("kill9");
    let seed = num(args, "--seed", time_seed());
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let port = listener.local_addr()?.port();
    // Written whole then renamed, so the script never reads half a number.
    let tmp = format!("{port_file}.tmp");
    std::fs::write(&tmp, port.to_string())?;
    std::fs::rename(&tmp, &port_file)?;
    let counts = Arc::new(Counts::default());
    let conn_no = AtomicU64::new(0);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(_) => {
                // Out of descriptors, most likely: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let counts = Arc::clone(&counts);
        let rng = Arc::new(Mutex::new(Rng::new(
            seed ^ conn_no.fetch_add(1, Ordering::Relaxed),
        )));
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let counts = Arc::clone(&counts);
                let rng = Arc::clone(&rng);
                async move { Ok::<_, Infallible>(answer(req, counts, rng, kill9).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    counts: Arc<Counts>,
    rng: Arc<Mutex<Rng>>,
    kill9: bool,
) -> Response<MockBody> {
    if req.uri().path() == "/__soak/stats" {
        let by_kind = counts.by_kind.lock().map(|m| m.clone()).unwrap_or_default();
        let body = serde_json::json!({
            "received": counts.received.load(Ordering::SeqCst),
            "by_kind": by_kind,
        });
        return full(200, "application/json", &body.to_string());
    }
    if req.uri().path() == "/__soak/ids" {
        let ids = counts.ids.lock().map(|v| v.join("\n")).unwrap_or_default();
        return full(200, "text/plain", &ids);
    }
    // Counted on the head, before anything can fail: this is "what the upstream saw".
    counts.received.fetch_add(1, Ordering::SeqCst);
    let id = req
        .headers()
        .get("x-proxy-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    if let Ok(mut ids) = counts.ids.lock() {
        ids.push(id);
    }
    // Drain the upload (it may be large or cut off); its content does not matter.
    let mut body = req.into_body();
    while let Some(Ok(_)) = body.frame().await {}
    if kill9 {
        counts.kind("ok");
        return full(200, "application/json", r#"{"ok":true}"#);
    }
    let (roll, delay_ms, chunks, gap_ms, special) = {
        let mut r = rng.lock().unwrap_or_else(|p| p.into_inner());
        (
            r.below(1000),
            r.below(50),
            2 + r.below(18),
            20 + r.below(180),
            r.below(100),
        )
    };
    match roll {
        // 0.3 %: Chutes' edge 429, an nginx page without any hint.
        0..=2 => {
            counts.kind("429_html");
            full(
                429,
                "text/html",
                "<html><head><title>429 Too Many Requests</title></head><body><center><h1>429 Too Many Requests</h1></center><hr><center>nginx</center></body></html>",
            )
        }
        // 0.2 %: an app-level 429 with a Retry-After.
        3..=4 => {
            counts.kind("429_json");
            let mut r = full(
                429,
                "application/json",
                r#"{"detail":"Infrastructure is at maximum capacity, try again later"}"#,
            );
            r.headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("1"));
            r
        }
        // 20 %: a slow SSE stream; some carry a raw error line, some break off.
        5..=204 => {
            let (kind, error_at, reset_at) = match special {
                0..=4 => ("sse_raw_error", Some(chunks / 2), None),
                5..=7 => ("sse_reset", None, Some(chunks / 2)),
                _ => ("sse", None, None),
            };
            counts.kind(kind);
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(async move {
                for i in 0..chunks {
                    tokio::time::sleep(Duration::from_millis(gap_ms)).await;
                    if reset_at == Some(i) {
                        let _ = tx.send(Err("soak mock: reset mid-stream".into())).await;
                        return;
                    }
                    let chunk = if error_at == Some(i) {
                        Bytes::from_static(b"{\"error\": \"Internal server error\"}\n\n")
                    } else {
                        Bytes::from(format!(
                            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"token {i}\"}}}}]}}\n\n"
                        ))
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return; // The proxy went away.
                    }
                }
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
            });
            let mut r = Response::new(MockBody::Chan(rx));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/event-stream"),
            );
            r
        }
        _ => {
            counts.kind("json");
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            full(
                200,
                "application/json",
                r#"{"id":"x","object":"chat.completion","choices":[{"message":{"role":"assistant","content":"ok"}}]}"#,
            )
        }
    }
}

// ----- the load generator ---------------------------------------------------------------------

type Tally = Arc<Mutex<BTreeMap<String, u64>>>;

fn count(tally: &Tally, outcome: String) {
    if let Ok(mut t) = tally.lock() {
        *t.entry(outcome).or_default() += 1;
    }
}

/// "200", "200_body_error", "429_upstream_cooldown", "502_upstream_unavailable", ...
async fn outcome_of(resp: Response<Incoming>) -> String {
    let status = resp.status().as_u16();
    match resp.into_body().collect().await {
        Err(_) => format!("{status}_body_error"),
        Ok(body) => {
            let bytes = body.to_bytes();
            let reason = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| {
                    v.pointer("/error/proxy/reason")
                        .and_then(|r| r.as_str())
                        .map(str::to_string)
                });
            let stream_error = bytes
                .windows(b"upstream_stream_error".len())
                .any(|w| w == b"upstream_stream_error");
            match reason {
                Some(r) => format!("{status}_{r}"),
                None if stream_error => format!("{status}_stream_error_event"),
                None => status.to_string(),
            }
        }
    }
}

async fn load(args: &[String]) -> Result<(), BoxError> {
    let proxy = arg(args, "--proxy").ok_or("--proxy is required")?;
    let secs: u64 = num(args, "--secs", 60);
    let concurrency: usize = num(args, "--concurrency", 16);
    let max_requests: u64 = num(args, "--max-requests", 1_000_000);
    let abort_rate: f64 = num(args, "--abort-rate", 0.1);
    let think_ms: u64 = num(args, "--think-ms", 50);
    let seed = num(args, "--seed", time_seed());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Arc::new(AtomicU64::new(0));
    let tally: Tally = Arc::default();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let big = Bytes::from(vec![b'x'; 256 * 1024]);
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (client, tally, started, proxy, big) = (
            client.clone(),
            Arc::clone(&tally),
            Arc::clone(&started),
            proxy.clone(),
            big.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed ^ (w as u64 + 1).wrapping_mul(0x1234_5678_9ABC));
            while Instant::now() < deadline {
                if started.fetch_add(1, Ordering::Relaxed) >= max_requests {
                    break;
                }
                let stream = rng.chance(0.3);
                let body = if rng.chance(0.05) {
                    big.clone()
                } else {
                    Bytes::from(format!(
                        "{{\"model\":\"soak\",\"stream\":{stream},\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}"
                    ))
                };
                let mut builder = Request::post(format!("{proxy}/v1/chat/completions"))
                    .header("content-type", "application/json");
                if rng.chance(0.05) {
                    builder = builder.header("x-proxy-max-wait", "0");
                }
                let Ok(req) = builder.body(Full::new(body)) else {
                    continue;
                };
                let exchange = async {
                    match client.request(req).await {
                        Ok(resp) => outcome_of(resp).await,
                        Err(_) => "transport_error".to_string(),
                    }
                };
                let outcome = if rng.chance(abort_rate) {
                    // Abandoned at a random moment: while queued, uploading or streaming.
                    let after = Duration::from_millis(rng.below(1500));
                    match tokio::time::timeout(after, exchange).await {
                        Ok(o) => o,
                        Err(_) => "client_abort".to_string(),
                    }
                } else {
                    exchange.await
                };
                count(&tally, outcome);
                let pause = rng.below(2 * think_ms + 1);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let tally = tally.lock().map(|t| t.clone()).unwrap_or_default();
    let total: u64 = tally.values().sum();
    println!(
        "{}",
        serde_json::json!({ "requests": total, "by_outcome": tally })
    );
    Ok(())
}

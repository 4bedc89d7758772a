//! Small plans (issue 18, item 5): how long do 60 sequential requests take through the proxy
//! when it holds a small daily cap durably (`limits.requests_per_day` with a `state.path`)?
//!
//! Why: crash safety reserves daily requests on disk ahead of granting them (`state.rs`), in
//! blocks of 1% of the cap. A 300-a-day plan has blocks of 3, so a sequential client asks for
//! a new block every few requests; if a grant has to wait for that write (and the writer waits
//! on its batching timer first), a client that never comes near the rate limit is slowed by
//! the state file alone. An operator measured 5.9 s for 60 requests where 0.5 s was expected.
//!
//! Cells, each through the real proxy in-process over loopback to the fast mock, one client
//! sending its next request when the previous one is answered (rate limit far above what one
//! client can send, so only the daily-cap bookkeeping differs):
//! - `memory only`: `requests_per_day = 300`, `state.path = ""`: the baseline, no writes;
//! - `300 a day, state file`: blocks of 3;
//! - `2000 a day, state file`: blocks of 20.
//!
//! The state file lives under cargo's target tmp directory (a real disk, not tmpfs), so the
//! fsyncs cost what they cost. Reported: total time, the p50/p99/max of one request, and how
//! many requests took longer than 50 ms (a grant that waited on a write).
//!
//! Run: `cargo bench --bench smallcap` (a few seconds per round, `SMALLCAP_ROUNDS` rounds,
//! default 5). Under `cargo test` it does one round.

// A bench times a real proxy and real sockets from outside, in real time: std's clock is
// what it measures with. clippy.toml keeps std's clock out of the crate itself.
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use chutes_proxy::config::{Config, Overrides};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{bench_mode, env_num, fmt_dur, InProcess, Mock, Samples};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The measurement: 60 sequential requests.
const REQUESTS: usize = 60;
/// A request slower than this waited on something other than loopback and the mock.
const SLOW: Duration = Duration::from_millis(50);

struct Cell {
    label: &'static str,
    per_day: u64,
    state_file: bool,
}

fn main() {
    let rounds = if bench_mode() {
        env_num("SMALLCAP_ROUNDS", 5.0).max(1.0) as usize
    } else {
        println!(
            "smallcap: smoke run (cargo test); `cargo bench --bench smallcap` for the real one"
        );
        1
    };
    let cells = [
        Cell {
            label: "memory only, 300 a day",
            per_day: 300,
            state_file: false,
        },
        Cell {
            label: "300 a day, state file",
            per_day: 300,
            state_file: true,
        },
        Cell {
            label: "2000 a day, state file",
            per_day: 2000,
            state_file: true,
        },
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mock = Mock::start(1, false, Duration::from_secs(1));
    println!();
    println!("## {REQUESTS} sequential requests, one client, rate limit far above it");
    println!();
    println!(
        "| cell | round | total | p50 | p99 | max | requests over {} |",
        fmt_dur(SLOW)
    );
    println!("|---|---|---|---|---|---|---|");
    for round in 1..=rounds {
        // Cells interleaved per round, so drift in the machine's load hits all of them alike.
        for cell in &cells {
            let (total, mut lat, slow) = rt.block_on(run(cell, &mock.url()));
            println!(
                "| {} | {round} | {} | {} | {} | {} | {slow} |",
                cell.label,
                fmt_dur(total),
                fmt_dur(lat.quantile(0.5)),
                fmt_dur(lat.quantile(0.99)),
                fmt_dur(lat.max()),
            );
        }
    }
}

/// One cell: a fresh proxy (fresh state file), then the sequential requests.
async fn run(cell: &Cell, upstream: &str) -> (Duration, Samples, usize) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let state = if cell.state_file {
        dir.path().join("state.json").display().to_string()
    } else {
        String::new()
    };
    let toml = format!(
        "[upstream]\nurl = \"{upstream}\"\n[limits]\nrequests_per_minute = 60000000\nburst = 1000000\n\
         requests_per_day = {}\n[state]\npath = {state:?}\n",
        cell.per_day
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
    let mut lat = Samples::with_capacity(REQUESTS);
    let mut slow = 0;
    let t0 = Instant::now();
    for _ in 0..REQUESTS {
        let sent = Instant::now();
        let req = http::Request::post(&url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(support::request_body(false))))
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
            .await
            .expect("a response within 30 s")
            .expect("request failed");
        assert_eq!(resp.status(), 200, "every request is within the cap");
        let _ = resp.into_body().collect().await;
        let took = sent.elapsed();
        slow += usize::from(took > SLOW);
        lat.push(took);
    }
    let total = t0.elapsed();
    proxy.stop(Duration::from_secs(10)).await;
    (total, lat, slow)
}

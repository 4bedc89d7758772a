//! What operators see: `/status` and `/metrics` after real traffic (forwarded, shed for each
//! reason the admission path can give, an upstream 429), a parse of both metrics formats by a
//! real Prometheus parser (Python `prometheus_client`), and the `chutes-proxy status` command
//! run as a process against a live proxy and a dead port.
//!
//! Values are read exactly where they are deterministic (counters, gauges of a settled
//! proxy); durations are only checked for being in range, never for how fast something was.

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

use crate::support::*;

/// The version of `prometheus_client` CI installs (`.ci/run`); named in skip/fail messages.
const PY_PROM_CLIENT: &str = "prometheus-client==0.26.0";

/// GET /status as JSON.
async fn status(c: &TestClient, proxy: &TestProxy) -> Value {
    let got = get(c, &proxy.admin_url("/status")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("content-type"), Some("application/json"));
    got.json()
}

/// Poll `/status` until `done` holds. For states with no event to wait on (a request sitting
/// in the queue); the pause between polls only keeps the loop from spinning, and `within`
/// bounds the whole wait.
async fn status_when(
    c: &TestClient,
    proxy: &TestProxy,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    within(what, async {
        loop {
            let s = status(c, proxy).await;
            if done(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// GET /metrics, optionally with an `Accept` header.
async fn scrape(c: &TestClient, proxy: &TestProxy, accept: Option<&str>) -> Got {
    let mut r = req("GET", &proxy.admin_url("/metrics"));
    if let Some(a) = accept {
        r = r.header("accept", a);
    }
    let got = send(c, r.body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(got.status, 200, "{}", got.text());
    got
}

/// Scrape the classic text format (what a plain `curl` gets).
async fn metrics(c: &TestClient, proxy: &TestProxy) -> String {
    scrape(c, proxy, None).await.text()
}

/// The value of the one sample written exactly as `series` (name plus labels, in the order
/// the proxy writes them), parsed by hand so the test checks the numbers, not just the shape.
fn sample(text: &str, series: &str) -> f64 {
    let values: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|e| panic!("{series}: bad value {v:?}: {e}"))
        })
        .collect();
    match values.as_slice() {
        [v] => *v,
        _ => panic!(
            "expected one sample {series}, found {}:\n{text}",
            values.len()
        ),
    }
}

fn outcome(outcome: &str) -> String {
    format!("chutes_proxy_requests_total{{outcome=\"{outcome}\",client=\"default\"}}")
}

fn upstream_status(status: &str) -> String {
    format!("chutes_proxy_upstream_responses_total{{status=\"{status}\"}}")
}

async fn get_with(c: &TestClient, url: &str, headers: &[(&str, &str)]) -> Got {
    let mut r = req("GET", url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    send(c, r.body(Full::new(Bytes::new())).unwrap()).await
}

fn reason(got: &Got) -> String {
    got.json()["error"]["proxy"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn status_and_metrics_count_forwarded_and_shed_requests() {
    let mock = MockUpstream::start().await;
    // One token a minute: after the first request the bucket is empty for the whole test.
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 1\nburst = 1\nrequests_per_day = 10\n",
    )
    .start()
    .await;
    let c = client();

    let raw = get(&c, &proxy.admin_url("/status")).await.text();
    assert!(!raw.contains(TEST_KEY), "the API key leaked into /status");
    let s = status(&c, &proxy).await;
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["uptime_seconds"].as_f64().is_some_and(|u| u >= 0.0));
    assert_eq!(s["state"], "open");
    assert_eq!(s["api_key"], "configured");
    assert_eq!(s["backend"], "local");
    assert_eq!(s["fleet"], Value::Null);
    assert_eq!(s["limits"]["requests_per_minute"], 1);
    assert_eq!(s["limits"]["burst"], 1);
    assert_eq!(s["limits"]["requests_per_day"], 10);
    assert_eq!(s["limits"]["day_reset_utc"], "00:00");
    assert_eq!(s["tokens"]["available"], 1);
    assert_eq!(s["tokens"]["spacing_seconds"], 60.0);
    assert_eq!(s["daily"]["used"], 0);
    assert_eq!(s["daily"]["remaining"], 10);
    assert_eq!(s["daily"]["exhausted"], false);
    assert!(s["daily"]["resets_at"]
        .as_str()
        .is_some_and(|r| r.ends_with("T00:00:00Z")));
    let reset_in = s["daily"]["resets_in_seconds"].as_f64().unwrap();
    assert!((0.0..=86_400.0).contains(&reset_in), "{reset_in}");
    assert_eq!(s["cooldown"]["active"], false);
    assert_eq!(s["cooldown"]["last_upstream_429"], Value::Null);
    assert_eq!(s["queue"]["depth"], 0);
    assert_eq!(s["queue"]["oldest_wait_seconds"], Value::Null);
    assert_eq!(s["in_flight"], 0);
    assert_eq!(s["requests"]["forwarded"], 0);
    assert_eq!(s["requests"]["queue_timeout"], 0);
    assert_eq!(s["upstream_responses"], serde_json::json!({}));

    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    let shed = get_with(&c, &proxy.url("/v1/models"), &[("x-proxy-max-wait", "0")]).await;
    assert_eq!(shed.status, 429);
    assert_eq!(reason(&shed), "queue_timeout");

    let s = status(&c, &proxy).await;
    assert_eq!(s["daily"]["used"], 1);
    assert_eq!(s["daily"]["remaining"], 9);
    assert_eq!(s["tokens"]["available"], 0);
    let next = s["tokens"]["next_in_seconds"].as_f64().unwrap();
    assert!(next > 0.0 && next <= 60.0, "next token in {next}s");
    assert_eq!(s["requests"]["forwarded"], 1);
    assert_eq!(s["requests"]["queue_timeout"], 1);
    assert_eq!(s["upstream_responses"]["200"], 1);
    assert_eq!(s["clients"][0]["name"], "default");
    assert_eq!(s["clients"][0]["used_today"], 1);

    let m = metrics(&c, &proxy).await;
    assert_eq!(sample(&m, &outcome("forwarded")), 1.0);
    assert_eq!(sample(&m, &outcome("queue_timeout")), 1.0);
    assert_eq!(sample(&m, &outcome("queue_full")), 0.0);
    assert_eq!(sample(&m, &upstream_status("200")), 1.0);
    assert_eq!(sample(&m, &upstream_status("429")), 0.0);
    assert_eq!(sample(&m, "chutes_proxy_daily_used"), 1.0);
    assert_eq!(sample(&m, "chutes_proxy_daily_remaining"), 9.0);
    assert_eq!(sample(&m, "chutes_proxy_daily_limit"), 10.0);
    assert_eq!(sample(&m, "chutes_proxy_daily_quota_exhausted"), 0.0);
    assert_eq!(sample(&m, "chutes_proxy_cooldown_active"), 0.0);
    assert_eq!(sample(&m, "chutes_proxy_tokens_available"), 0.0);
    assert_eq!(sample(&m, "chutes_proxy_queue_depth"), 0.0);
    // Only admitted requests have a queue wait; the shed one does not count.
    assert_eq!(sample(&m, "chutes_proxy_queue_wait_seconds_count"), 1.0);
    assert_eq!(
        sample(&m, "chutes_proxy_upstream_latency_seconds_count"),
        1.0
    );
    assert_eq!(sample(&m, "chutes_proxy_cooldown_seconds_count"), 0.0);
    mock.wait_for_requests(1).await;
    assert_eq!(
        mock.count(),
        1,
        "the shed request must not reach the upstream"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_format_follows_the_accept_header() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "").start().await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);

    let classic = scrape(&c, &proxy, None).await;
    assert_eq!(
        classic.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(classic.header("vary"), Some("accept"));
    let classic = classic.text();
    assert!(!classic.contains("# EOF"), "{classic}");
    assert!(classic.contains("# TYPE chutes_proxy_requests_total counter\n"));

    // What Prometheus sends.
    let om = scrape(
        &c,
        &proxy,
        Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
    )
    .await;
    assert_eq!(
        om.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let om = om.text();
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE chutes_proxy_requests counter\n"));
    for text in [&classic, &om] {
        assert_eq!(sample(text, &outcome("forwarded")), 1.0);
        assert_eq!(sample(text, &upstream_status("200")), 1.0);
    }
    // No daily cap configured: no made-up remaining count.
    assert!(!classic.contains("chutes_proxy_daily_remaining"));
    assert_eq!(sample(&classic, "chutes_proxy_daily_used"), 1.0);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn queue_full_and_daily_cap_are_counted() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 1\nburst = 1\nrequests_per_day = 1\n[queue]\nmax_depth = 0\n",
    )
    .start()
    .await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    let s = status(&c, &proxy).await;
    assert_eq!(s["state"], "daily_quota_exhausted");
    assert_eq!(s["daily"]["exhausted"], true);
    assert_eq!(s["daily"]["remaining"], 0);

    let shed = get(&c, &proxy.url("/v1/models")).await;
    assert_eq!(shed.status, 429);
    assert_eq!(reason(&shed), "daily_quota_exhausted");
    let m = metrics(&c, &proxy).await;
    assert_eq!(sample(&m, &outcome("daily_quota_exhausted")), 1.0);
    assert_eq!(sample(&m, "chutes_proxy_daily_quota_exhausted"), 1.0);
    assert_eq!(sample(&m, "chutes_proxy_daily_remaining"), 0.0);
    // A spent day is not a cooldown: the two alerts stay apart.
    assert_eq!(sample(&m, "chutes_proxy_cooldown_active"), 0.0);
    proxy.stop().await.unwrap();

    // The same with room in the day: an empty bucket and no queue means queue_full.
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 1\nburst = 1\n[queue]\nmax_depth = 0\n",
    )
    .start()
    .await;
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    let shed = get(&c, &proxy.url("/v1/models")).await;
    assert_eq!(shed.status, 429);
    assert_eq!(reason(&shed), "queue_full");
    let s = status(&c, &proxy).await;
    assert_eq!(s["requests"]["queue_full"], 1);
    assert_eq!(s["requests"]["forwarded"], 1);
    assert_eq!(s["daily"]["remaining"], Value::Null);
    let m = metrics(&c, &proxy).await;
    assert_eq!(sample(&m, &outcome("queue_full")), 1.0);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn upstream_429_shows_as_a_cooldown_in_status_and_metrics() {
    let mock = MockUpstream::start().await;
    mock.push(
        Reply::json(
            429,
            r#"{"detail":"Infrastructure is at maximum capacity, try again later"}"#,
        )
        .header("retry-after", "30")
        .header("x-ratelimit-remaining-requests", "0"),
    );
    let proxy = Start::new(&mock.url(), "").start().await;
    let c = client();

    let got = get(&c, &proxy.url("/v1/chat/completions")).await;
    assert_eq!(got.status, 429);
    assert_eq!(reason(&got), "upstream_rate_limited");
    // The default wait limit (20s) is shorter than the 30s cooldown: shed at once.
    let got = get(&c, &proxy.url("/v1/chat/completions")).await;
    assert_eq!(got.status, 429);
    assert_eq!(reason(&got), "upstream_cooldown");

    let s = status(&c, &proxy).await;
    assert_eq!(s["state"], "cooldown");
    let cd = &s["cooldown"];
    assert_eq!(cd["active"], true);
    assert_eq!(cd["kind"], "rate_limited");
    assert_eq!(cd["level"], 1);
    assert!(cd["until"].is_string(), "{cd}");
    let left = cd["remaining_seconds"].as_f64().unwrap();
    assert!(left > 0.0 && left <= 30.0, "cooldown left {left}s");
    let last = &cd["last_upstream_429"];
    assert_eq!(last["status"], 429);
    assert!(last["at"].is_string());
    assert!(last["ago_seconds"].as_f64().is_some_and(|a| a >= 0.0));
    let headers = last["headers"].as_array().unwrap();
    assert!(
        headers.contains(&serde_json::json!(["retry-after", "30"])),
        "{last}"
    );
    assert!(
        headers.contains(&serde_json::json!(["x-ratelimit-remaining-requests", "0"])),
        "{last}"
    );
    assert!(last["body"]
        .as_str()
        .is_some_and(|b| b.contains("maximum capacity")));
    assert_eq!(s["requests"]["upstream_rate_limited"], 1);
    assert_eq!(s["requests"]["upstream_cooldown"], 1);
    assert_eq!(s["requests"]["forwarded"], 0);
    assert_eq!(s["upstream_responses"]["429"], 1);

    let m = metrics(&c, &proxy).await;
    assert_eq!(sample(&m, "chutes_proxy_cooldown_active"), 1.0);
    assert_eq!(sample(&m, "chutes_proxy_cooldown_level"), 1.0);
    assert_eq!(sample(&m, "chutes_proxy_cooldown_seconds_count"), 1.0);
    let chosen = sample(&m, "chutes_proxy_cooldown_seconds_sum");
    assert!((1.0..=30.0).contains(&chosen), "cooldown of {chosen}s");
    assert_eq!(
        sample(&m, "chutes_proxy_cooldown_seconds_bucket{le=\"30.0\"}"),
        1.0
    );
    assert_eq!(sample(&m, &upstream_status("429")), 1.0);
    assert_eq!(sample(&m, &outcome("upstream_rate_limited")), 1.0);
    assert_eq!(sample(&m, &outcome("upstream_cooldown")), 1.0);
    assert_eq!(mock.count(), 1, "nothing is sent during the cooldown");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn queue_depth_oldest_wait_and_in_flight_are_live() {
    let gate = Gate::new();
    let mock =
        MockUpstream::start_with(Reply::json(200, r#"{"ok":true}"#).gated(gate.clone())).await;
    let proxy = Start::new(&mock.url(), "[limits]\nmax_concurrent = 1\n")
        .start()
        .await;
    let c = client();

    let first = tokio::spawn({
        let (c, url) = (c.clone(), proxy.url("/v1/models"));
        async move { get(&c, &url).await.status }
    });
    // Recorded by the mock means sent by the proxy: its concurrency slot is taken.
    mock.wait_for_requests(1).await;
    let s = status(&c, &proxy).await;
    assert_eq!(s["in_flight"], 1);
    assert_eq!(s["queue"]["depth"], 0);

    let second = tokio::spawn({
        let (c, url) = (c.clone(), proxy.url("/v1/models"));
        async move { get(&c, &url).await.status }
    });
    let s = status_when(&c, &proxy, "the second request to queue", |s| {
        s["queue"]["depth"] == 1
    })
    .await;
    assert!(s["queue"]["oldest_wait_seconds"]
        .as_f64()
        .is_some_and(|w| w >= 0.0));
    assert_eq!(s["in_flight"], 1);
    let m = metrics(&c, &proxy).await;
    assert_eq!(sample(&m, "chutes_proxy_queue_depth"), 1.0);
    assert_eq!(sample(&m, "chutes_proxy_in_flight"), 1.0);

    gate.open();
    assert_eq!(within("first", first).await.unwrap(), 200);
    assert_eq!(within("second", second).await.unwrap(), 200);
    // The slot is given back when the response body ends, which the client may see first.
    let s = status_when(&c, &proxy, "everything to finish", |s| s["in_flight"] == 0).await;
    assert_eq!(s["queue"]["depth"], 0);
    assert_eq!(s["queue"]["oldest_wait_seconds"], Value::Null);
    assert_eq!(s["requests"]["forwarded"], 2);
    let m = metrics(&c, &proxy).await;
    assert_eq!(sample(&m, "chutes_proxy_queue_depth"), 0.0);
    assert_eq!(sample(&m, "chutes_proxy_in_flight"), 0.0);
    assert_eq!(sample(&m, "chutes_proxy_queue_wait_seconds_count"), 2.0);
    proxy.stop().await.unwrap();
}

/// Families and samples as the Python parser saw them, or `None` when the parser is not
/// installed here (a skip, or a failure under CI).
async fn python_parse(format: &str, text: &str) -> Option<Value> {
    const SCRIPT: &str = r#"
import json, sys
try:
    from prometheus_client.parser import text_string_to_metric_families as classic
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
except ImportError as e:
    print(e)
    sys.exit(3)
parse = openmetrics if sys.argv[1] == "openmetrics" else classic
families = {}
for f in parse(sys.stdin.read()):
    families[f.name] = {"type": f.type, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
print(json.dumps(families))
"#;
    let skip = |why: String| {
        if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
            panic!("{why}; CI must install it: pip install {PY_PROM_CLIENT}");
        }
        println!("SKIPPED: Prometheus parse check: {why} (pip install {PY_PROM_CLIENT})");
    };
    let child = tokio::process::Command::new("python3")
        .args(["-c", SCRIPT, format])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            skip(format!("cannot run python3: {e}"));
            return None;
        }
    };
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = within("the Python parser", child.wait_with_output())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.code() == Some(3) {
        skip(format!(
            "python3 has no prometheus_client ({})",
            stdout.trim()
        ));
        return None;
    }
    assert!(
        out.status.success(),
        "the {format} scrape does not parse: {}\n---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_str(&stdout).unwrap())
}

/// Prometheus' own linter on the classic format, where it is installed (Debian's
/// `prometheus` package). Optional: the Python parser is the required check; this one adds
/// Prometheus' naming and HELP rules when a developer has it.
async fn promtool_check(text: &str) {
    let child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else {
        println!("note: promtool not installed; its lint of /metrics was not run");
        return;
    };
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = within("promtool", child.wait_with_output()).await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn metrics_parse_with_a_real_prometheus_parser() {
    let mock = MockUpstream::start().await;
    mock.push(Reply::json(503, r#"{"detail":"busy"}"#));
    mock.push(Reply::status(418));
    mock.push(Reply::json(200, r#"{"ok":true}"#));
    mock.push(Reply::json(429, r#"{"detail":"slow down"}"#));
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_day = 100\n[[clients.client]]\nname = \"chatbot\"\n",
    )
    .start()
    .await;
    let c = client();
    // Traffic for every kind of series: a client label, a 5xx, an uncommon code counted by
    // class, a 429 and the cooldown it starts, histograms with observations.
    let bot = [("x-proxy-client", "chatbot")];
    assert_eq!(get_with(&c, &proxy.url("/a"), &bot).await.status, 503);
    assert_eq!(get(&c, &proxy.url("/b")).await.status, 418);
    assert_eq!(get(&c, &proxy.url("/c")).await.status, 200);
    assert_eq!(get_with(&c, &proxy.url("/d"), &bot).await.status, 429);
    let shed = get_with(&c, &proxy.url("/e"), &[("x-proxy-max-wait", "0")]).await;
    assert_eq!(reason(&shed), "upstream_cooldown");

    let om_accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    for (format, accept) in [("openmetrics", Some(om_accept)), ("classic", None)] {
        let text = scrape(&c, &proxy, accept).await.text();
        if format == "classic" {
            promtool_check(&text).await;
        }
        let Some(families) = python_parse(format, &text).await else {
            return;
        };
        for (name, kind) in [
            ("chutes_proxy_requests", "counter"),
            ("chutes_proxy_upstream_responses", "counter"),
            ("chutes_proxy_queue_depth", "gauge"),
            ("chutes_proxy_in_flight", "gauge"),
            ("chutes_proxy_queue_wait_seconds", "histogram"),
            ("chutes_proxy_upstream_latency_seconds", "histogram"),
            ("chutes_proxy_cooldown_seconds", "histogram"),
            ("chutes_proxy_daily_used", "gauge"),
            ("chutes_proxy_daily_remaining", "gauge"),
            ("chutes_proxy_cooldown_active", "gauge"),
        ] {
            assert_eq!(
                families[name]["type"], kind,
                "{format}: family {name} in {families}"
            );
        }
        // The parser read the same numbers the proxy meant.
        let value = |family: &str, sample: &str, labels: Value| -> f64 {
            families[family]["samples"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s[0] == sample && s[1] == labels)
                .and_then(|s| s[2].as_f64())
                .unwrap_or_else(|| panic!("{format}: no {sample} {labels}"))
        };
        let requests = |outcome: &str, client: &str| {
            value(
                "chutes_proxy_requests",
                "chutes_proxy_requests_total",
                serde_json::json!({"outcome": outcome, "client": client}),
            )
        };
        assert_eq!(requests("forwarded", "chatbot"), 1.0, "{format}");
        assert_eq!(requests("forwarded", "default"), 2.0, "{format}");
        let status = |s: &str| {
            value(
                "chutes_proxy_upstream_responses",
                "chutes_proxy_upstream_responses_total",
                serde_json::json!({ "status": s }),
            )
        };
        assert_eq!(status("503"), 1.0, "{format}");
        assert_eq!(status("429"), 1.0, "{format}");
        assert_eq!(
            requests("upstream_rate_limited", "chatbot"),
            1.0,
            "{format}"
        );
        assert_eq!(requests("upstream_cooldown", "default"), 1.0, "{format}");
        assert_eq!(status("4xx"), 1.0, "{format}: 418 is counted by class");
        assert_eq!(
            value(
                "chutes_proxy_daily_used",
                "chutes_proxy_daily_used",
                serde_json::json!({})
            ),
            4.0,
            "{format}"
        );
    }
    proxy.stop().await.unwrap();
}

/// Run the built `chutes-proxy` binary with `args`; (exit code, stdout, stderr).
async fn run_cli(args: &[&str]) -> (Option<i32>, String, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_chutes-proxy"))
        .args(args)
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    // Not `std::process`: the proxy under test runs on this test's runtime and must keep
    // serving while the command waits for it.
    let out = within("the status command", child).await.unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn status_command_summarises_a_live_proxy() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "[limits]\nrequests_per_day = 100\n")
        .start()
        .await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    let admin = proxy.admin_url("");

    let (code, out, err) = run_cli(&["status", "--admin", &admin]).await;
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("state      open\n"), "{out}");
    assert!(out.contains("] 1/100 (1%), 99 left\n"), "{out}");
    assert!(out.contains("requests   forwarded 1\n"), "{out}");
    assert!(out.contains("resets     in "), "{out}");
    assert!(
        out.is_ascii() && !out.contains('\x1b'),
        "not a terminal: no colour\n{out}"
    );
    assert!(!out.contains(TEST_KEY));

    let (code, out, err) = run_cli(&["status", "--admin", &admin, "--json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["daily"]["used"], 1);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn status_command_fails_clearly_without_a_proxy() {
    let dead = closed_port_url().await;
    let (code, out, err) = run_cli(&["status", "--admin", &dead]).await;
    assert_ne!(code, Some(0), "{out}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("cannot reach") && err.contains(&dead), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");

    // Something answers, but it is not a chutes-proxy admin listener.
    let mock = MockUpstream::start().await;
    let (code, _, err) = run_cli(&["status", "--admin", &mock.url()]).await;
    assert_ne!(code, Some(0));
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("not a chutes-proxy /status document"), "{err}");

    let (code, _, err) = run_cli(&["status", "--admin", "https://127.0.0.1:1"]).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("only http://"), "{err}");
}

#[tokio::test]
async fn status_shows_the_fleet_and_whether_redis_answers() {
    if !redis_available("status_shows_the_fleet_and_whether_redis_answers") {
        return;
    }
    let mut redis = RedisServer::start();
    let mock = MockUpstream::start().await;
    let cfg = format!(
        "[shared_state]\nbackend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"obs:\"\n",
        redis.url()
    );
    let proxy = Start::new(&mock.url(), &cfg).start().await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);

    let s = status(&c, &proxy).await;
    assert_eq!(s["backend"], "redis");
    let f = &s["fleet"];
    assert_eq!(f["reachable"], true, "{f}");
    assert_eq!(f["healthy"], true, "{f}");
    assert_eq!(f["key_prefix"], "obs:");
    assert_eq!(f["on_redis_error"], "fail_closed");
    assert_eq!(f["redis_url"], redis.url());
    assert_eq!(
        f["used_today"], 1,
        "the fleet-wide count is read from Redis"
    );
    assert_eq!(f["cooldown_until"], Value::Null);

    redis.kill();
    let s = status(&c, &proxy).await;
    assert_eq!(s["fleet"]["reachable"], false, "{}", s["fleet"]);
    assert!(s["fleet"]["last_error"].is_string(), "{}", s["fleet"]);
    let (code, out, err) = run_cli(&["status", "--admin", &proxy.admin_url("")]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("UNREACHABLE") && out.contains("requests are shed with 503"),
        "{out}"
    );
    proxy.stop().await.unwrap();
}

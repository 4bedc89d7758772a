//! Upstream rate-limit signals through the real proxy and the mock upstream: an upstream 429
//! (any body, any hint header) becomes the contract's `upstream_rate_limited` answer and
//! pauses the whole account; the cooldown escalates, ends with exactly one probe, survives a
//! restart; a 402 quota message closes the daily gate; `remaining: 0` on a success closes the
//! gate before any 429; a raw `{"error": ...}` line in an SSE stream becomes a `data:` event.
//! The last test drives the Python `openai` SDK against the proxy, as a real client.
//!
//! Synchronisation is by observation (the mock's request log, `/status`, a waiter that is
//! admitted when a cooldown ends), never by sleeping. Where real time passes, assertions only
//! bound it from below (a cooldown can end late on a loaded machine, never early) or allow
//! a few seconds of slack.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use serde_json::Value;

use crate::support::*;

/// Limits loose enough that the bucket never shapes these tests: only cooldowns do.
const LOOSE_LIMITS: &str =
    "[limits]\nrequests_per_minute = 6000\nburst = 100\nmax_concurrent = 16\n";

/// Chutes' edge 429: an nginx page, no Retry-After, no X-RateLimit-*.
const NGINX_429: &str = "<html>\r\n<head><title>429 Too Many Requests</title></head>\r\n<body>\r\n<center><h1>429 Too Many Requests</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

fn nginx_429() -> Reply {
    Reply::text(429, "text/html", NGINX_429)
}

/// Config text with the given cooldown table (TOML lines) and loose limits.
fn config(cooldown: &str) -> String {
    format!("{LOOSE_LIMITS}[cooldown]\n{cooldown}\n")
}

fn unix_now() -> f64 {
    chutes_proxy::clock::unix_now()
}

/// A GET through the proxy with `x-proxy-max-wait` set.
async fn get_waiting(c: &TestClient, url: &str, wait: &str) -> Got {
    send(
        c,
        req("GET", url)
            .header("x-proxy-max-wait", wait)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

async fn status(c: &TestClient, proxy: &TestProxy) -> Value {
    let got = get(c, &proxy.admin_url("/status")).await;
    assert_eq!(got.status, 200, "/status: {}", got.text());
    got.json()
}

/// Polls `/status` until `cond` holds (bounded by `WAIT_LIMIT`): for states the proxy reaches
/// on its own, such as waiters having joined the queue.
async fn status_until(
    c: &TestClient,
    proxy: &TestProxy,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    within(what, async {
        loop {
            let s = status(c, proxy).await;
            if cond(&s) {
                return s;
            }
            // A poll interval, not a synchronisation sleep: the condition decides.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

fn retry_after(got: &Got) -> u64 {
    got.header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After on {}: {}", got.status, got.text()))
        .parse()
        .unwrap_or_else(|e| panic!("Retry-After not whole seconds ({e}): {:?}", got.headers))
}

/// `retry-after-ms`, the precise form: tells escalation levels apart even when a loaded
/// machine has spent a second between the cooldown starting and the answer.
fn retry_after_ms(got: &Got) -> u64 {
    got.header("retry-after-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no retry-after-ms on {}: {}", got.status, got.text()))
}

fn assert_between(label: &str, got: f64, low: f64, high: f64) {
    assert!(
        (low..=high).contains(&got),
        "{label}: {got} is not within [{low}, {high}]"
    );
}

/// A 429 made by the proxy: status, reason and the JSON body.
fn assert_shed(got: &Got, reason: &str) -> Value {
    assert_eq!(got.status, 429, "expected a 429 {reason}: {}", got.text());
    let v = got.json();
    assert_eq!(v["error"]["proxy"]["reason"], reason, "{v}");
    v
}

/// The RFC 3339 `cooldown_until` of a proxy 429 body, as UNIX seconds.
fn cooldown_until(v: &Value) -> f64 {
    let s = v["error"]["proxy"]["cooldown_until"]
        .as_str()
        .unwrap_or_else(|| panic!("cooldown_until not set: {v}"));
    chutes_proxy::units::parse_rfc3339(s).unwrap_or_else(|| panic!("not RFC 3339: {s}"))
}

// ---------------------------------------------------------------------------------------
// The rewritten 429

#[tokio::test]
async fn nginx_html_429_becomes_the_contract_response_and_pauses_the_account() {
    let mock = MockUpstream::start_with(nginx_429()).await;
    // An unusual initial cooldown, so Retry-After can only have come from it.
    let proxy = Start::new(&mock.url(), &config("initial = \"7s\"\nmax = \"1h\""))
        .start()
        .await;
    let c = client();
    let before = unix_now();
    let got = send(
        &c,
        req("POST", &proxy.url("/v1/chat/completions"))
            .header("x-proxy-request-id", "sig-1")
            .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
            .unwrap(),
    )
    .await;
    let v = assert_shed(&got, "upstream_rate_limited");

    // Every header the contract puts on a 429.
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("x-proxy-request-id"), Some("sig-1"));
    // 7s, less whatever real time passed since the cooldown started.
    let ra = retry_after(&got);
    assert_between("Retry-After", ra as f64, 6.0, 7.0);
    assert_between(
        "retry-after-ms",
        retry_after_ms(&got) as f64,
        5_000.0,
        7_000.0,
    );
    assert_eq!(got.header("x-should-retry"), Some("true"));
    assert_eq!(
        got.header("ratelimit-policy"),
        Some("\"minute\";q=6000;w=60")
    );
    assert_eq!(
        got.header("ratelimit"),
        Some(format!("\"minute\";r=0;t={ra}").as_str())
    );
    assert_eq!(got.header("x-ratelimit-limit-requests"), Some("6000"));
    assert_eq!(got.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(
        got.header("x-ratelimit-reset-requests"),
        Some(format!("{ra}s").as_str())
    );
    // The upstream's page is not passed through as such.
    assert!(got.header("server").is_none_or(|s| s != "nginx"));

    // The body, OpenAI-shaped, with the upstream's page as text.
    let e = &v["error"];
    assert_eq!(e["type"], "requests");
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert!(e["param"].is_null());
    assert!(e["message"].as_str().unwrap().contains("429"), "{e}");
    let p = &e["proxy"];
    assert_eq!(p["request_id"], "sig-1");
    assert_eq!(p["upstream_status"], 429);
    assert_eq!(p["upstream_body"], NGINX_429);
    assert_between(
        "retry_after_seconds",
        p["retry_after_seconds"].as_f64().unwrap(),
        5.0,
        7.0,
    );
    assert_eq!(p["limits"]["requests_per_minute"], 6000);
    let until = cooldown_until(&v);
    assert_between("cooldown_until", until - before, 5.0, 9.0);

    // The account is paused: /status says so and nothing more reaches the upstream.
    let s = status(&c, &proxy).await;
    assert_eq!(s["cooldown"]["active"], true, "{s}");
    assert_eq!(s["cooldown"]["kind"], "rate_limited");
    assert_eq!(s["cooldown"]["level"], 1);
    assert_eq!(s["state"], "cooldown");
    assert_between(
        "remaining_seconds",
        s["cooldown"]["remaining_seconds"].as_f64().unwrap(),
        4.0,
        7.0,
    );
    let last = &s["cooldown"]["last_upstream_429"];
    assert_eq!(last["status"], 429);
    assert!(last["body"].as_str().unwrap().contains("nginx"), "{last}");

    let shed = get_waiting(&c, &proxy.url("/v1/models"), "1s").await;
    let sv = assert_shed(&shed, "upstream_cooldown");
    assert_between("shed Retry-After", retry_after(&shed) as f64, 5.0, 7.0);
    assert_eq!(sv["error"]["code"], "rate_limit_exceeded");
    assert!(sv["error"]["proxy"]["upstream_status"].is_null());
    assert_between(
        "shed cooldown_until",
        cooldown_until(&sv) - until,
        -1.0,
        1.0,
    );
    assert_eq!(
        mock.count(),
        1,
        "a request reached the upstream during the cooldown"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn any_429_body_is_carried_as_text() {
    let big = "x".repeat(5000);
    let cases: Vec<(&str, Reply, String)> = vec![
        (
            "detail JSON",
            Reply::json(429, r#"{"detail":"Infrastructure is at maximum capacity"}"#),
            r#"{"detail":"Infrastructure is at maximum capacity"}"#.into(),
        ),
        (
            "invalid UTF-8",
            Reply::status(429).raw_body(Bytes::from_static(b"\xff\xfebusy\xc3")),
            "\u{fffd}\u{fffd}busy\u{fffd}".into(),
        ),
        ("empty", Reply::status(429), String::new()),
        (
            "over 2 KiB",
            Reply::text(429, "text/plain", &big),
            "x".repeat(2048),
        ),
    ];
    for (label, reply, want) in cases {
        let mock = MockUpstream::start_with(reply).await;
        let proxy = Start::new(&mock.url(), &config("initial = \"3s\""))
            .start()
            .await;
        let c = client();
        let got = get(&c, &proxy.url("/v1/models")).await;
        let v = assert_shed(&got, "upstream_rate_limited");
        assert_eq!(v["error"]["proxy"]["upstream_status"], 429, "{label}");
        assert_eq!(
            v["error"]["proxy"]["upstream_body"],
            want.as_str(),
            "{label}"
        );
        assert_between(label, retry_after(&got) as f64, 2.0, 3.0);
        assert_eq!(
            got.header("content-type"),
            Some("application/json"),
            "{label}"
        );
        proxy.stop().await.unwrap();
    }
}

/// The cooldown starts when the 429's head arrives, not once its body has been read: a slow
/// error body must not leave the gate open for everyone else meanwhile.
#[tokio::test]
async fn cooldown_starts_before_a_slow_429_body_arrives() {
    let mock = MockUpstream::start().await;
    let body_gate = Gate::new();
    mock.push(Reply::text(429, "text/plain", "slow body").hold_chunk(0, body_gate.clone()));
    let proxy = Start::new(&mock.url(), &config("initial = \"30s\""))
        .start()
        .await;
    let c = client();
    let first = tokio::spawn({
        let (c, url) = (c.clone(), proxy.url("/v1/models"));
        async move { get(&c, &url).await }
    });
    status_until(&c, &proxy, "the cooldown to start on the 429's head", |s| {
        s["cooldown"]["active"] == true
    })
    .await;
    let shed = get_waiting(&c, &proxy.url("/v1/models"), "0").await;
    assert_shed(&shed, "upstream_cooldown");
    assert_eq!(mock.count(), 1);
    body_gate.open();
    let got = first.await.unwrap();
    let v = assert_shed(&got, "upstream_rate_limited");
    assert_eq!(v["error"]["proxy"]["upstream_body"], "slow body");
    let s = status(&c, &proxy).await;
    assert_eq!(
        s["cooldown"]["last_upstream_429"]["body"], "slow body",
        "{s}"
    );
    proxy.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// How long the cooldown lasts

struct HintCase {
    label: &'static str,
    headers: Vec<(&'static str, String)>,
    /// Expected cooldown in seconds (before real time passes).
    want: f64,
}

fn hint_cases() -> Vec<HintCase> {
    let now = unix_now();
    let http_date =
        |secs: f64| httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs_f64(now + secs));
    let case = |label, headers: &[(&'static str, &str)], want| HintCase {
        label,
        headers: headers.iter().map(|(n, v)| (*n, v.to_string())).collect(),
        want,
    };
    // `initial` is 9s and `max` 1h in these cases: 9 means "computed", 3600 "clamped".
    vec![
        case("Retry-After seconds", &[("retry-after", "30")], 30.0),
        case(
            "Retry-After HTTP-date",
            &[("retry-after", &http_date(40.0))],
            40.0,
        ),
        case(
            "x-ratelimit-reset seconds",
            &[("x-ratelimit-reset", "25")],
            25.0,
        ),
        case(
            "x-ratelimit-reset 6m0s",
            &[("x-ratelimit-reset", "6m0s")],
            360.0,
        ),
        case(
            "x-ratelimit-reset-requests 1m30s",
            &[("x-ratelimit-reset-requests", "1m30s")],
            90.0,
        ),
        case(
            "x-ratelimit-reset epoch",
            &[("x-ratelimit-reset", &format!("{}", (now + 45.0).floor()))],
            45.0,
        ),
        case(
            "RateLimit t=",
            &[("ratelimit", "\"minute\";r=0;t=20")],
            20.0,
        ),
        case(
            "Retry-After preferred over a reset header",
            &[("retry-after", "12"), ("x-ratelimit-reset", "99")],
            12.0,
        ),
        case(
            "garbage Retry-After: computed",
            &[("retry-after", "soon")],
            9.0,
        ),
        case(
            "negative Retry-After: computed",
            &[("retry-after", "-5")],
            9.0,
        ),
        case(
            "garbage reset: computed",
            &[("x-ratelimit-reset", "whenever")],
            9.0,
        ),
        case(
            "garbage RateLimit: computed",
            &[("ratelimit", "\"minute\";r=0;t=later")],
            9.0,
        ),
        case(
            "garbage Retry-After, good reset: the reset",
            &[("retry-after", "soon"), ("x-ratelimit-reset", "33")],
            33.0,
        ),
        case(
            "absurd Retry-After: clamped",
            &[("retry-after", "999999999")],
            3600.0,
        ),
        case(
            "HTTP-date years ahead: clamped",
            &[("retry-after", "Fri, 01 Jan 2100 00:00:00 GMT")],
            3600.0,
        ),
        case(
            "reset epoch years ahead: clamped",
            &[("x-ratelimit-reset", "4102444800")],
            3600.0,
        ),
        case(
            "reset duration years ahead: clamped",
            &[("x-ratelimit-reset", "100000h")],
            3600.0,
        ),
        // "Retry now" still pauses for a second and then sends one probe, never a burst.
        case(
            "HTTP-date in the past: the 1s minimum",
            &[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")],
            1.0,
        ),
    ]
}

#[tokio::test]
async fn upstream_hints_set_the_cooldown_garbage_falls_back_absurd_is_clamped() {
    // Real time passes between reading the hint and each check (a proxy start, a request, on
    // a loaded machine); HTTP-dates and epochs also have one-second resolution.
    const SLACK: f64 = 4.0;
    for i in 0..hint_cases().len() {
        // Built afresh for each case: HTTP-dates and epochs are relative to "now", and a
        // loaded machine can take seconds over the earlier cases.
        let case = hint_cases().swap_remove(i);
        let (label, want) = (case.label, case.want);
        let mut reply = nginx_429();
        for (name, value) in &case.headers {
            reply = reply.header(name, value);
        }
        let mock = MockUpstream::start_with(reply).await;
        let proxy = Start::new(&mock.url(), &config("initial = \"9s\"\nmax = \"1h\""))
            .start()
            .await;
        let c = client();
        let before = unix_now();
        let got = get(&c, &proxy.url("/v1/models")).await;
        let v = assert_shed(&got, "upstream_rate_limited");
        assert_between(label, retry_after(&got) as f64, want - SLACK, want);
        assert_between(
            &format!("{label}: cooldown_until"),
            cooldown_until(&v) - before,
            want - SLACK,
            want + 2.0,
        );

        let s = status(&c, &proxy).await;
        let cd = &s["cooldown"];
        assert_eq!(cd["active"], true, "{label}: {s}");
        assert_eq!(cd["level"], 1, "{label}");
        assert_between(
            &format!("{label}: /status remaining_seconds"),
            cd["remaining_seconds"].as_f64().unwrap(),
            want - SLACK,
            want,
        );
        let until = chutes_proxy::units::parse_rfc3339(cd["until"].as_str().unwrap()).unwrap();
        assert_between(
            &format!("{label}: /status until"),
            until - before,
            want - SLACK,
            want + 2.0,
        );
        if want > SLACK {
            // A request that cannot wait that long is shed at once with the time left.
            let shed = get_waiting(&c, &proxy.url("/v1/models"), "0").await;
            assert_shed(&shed, "upstream_cooldown");
            assert_between(
                &format!("{label}: shed Retry-After"),
                retry_after(&shed) as f64,
                want - SLACK,
                want,
            );
        }
        assert_eq!(
            mock.count(),
            1,
            "{label}: sent upstream during the cooldown"
        );
        proxy.stop().await.unwrap();
    }
}

#[tokio::test]
async fn repeated_429s_escalate_the_cooldown() {
    let mock = MockUpstream::start_with(nginx_429()).await;
    let proxy = Start::new(
        &mock.url(),
        &config("initial = \"1s\"\nmax = \"1m\"\nmultiplier = 2.0"),
    )
    .start()
    .await;
    let c = client();
    let url = proxy.url("/v1/models");

    let first = get(&c, &url).await;
    assert_shed(&first, "upstream_rate_limited");
    assert!(retry_after_ms(&first) <= 1000);
    assert_eq!(status(&c, &proxy).await["cooldown"]["level"], 1);

    // A waiter whose wait outlasts the cooldown is admitted when it ends: it is the probe,
    // gets the next 429, and the next cooldown is twice as long.
    let second = get_waiting(&c, &url, "10s").await;
    assert_shed(&second, "upstream_rate_limited");
    assert_between(
        "2nd cooldown ms",
        retry_after_ms(&second) as f64,
        1001.0,
        2000.0,
    );
    let s = status(&c, &proxy).await;
    assert_eq!(s["cooldown"]["level"], 2, "{s}");
    assert_eq!(s["cooldown"]["active"], true);

    // Meanwhile, a request that cannot wait is told how long is left, and is not sent.
    let shed = get_waiting(&c, &url, "0").await;
    assert_shed(&shed, "upstream_cooldown");
    assert_between("shed Retry-After", retry_after(&shed) as f64, 1.0, 2.0);
    assert_eq!(mock.count(), 2);

    let third = get_waiting(&c, &url, "10s").await;
    assert_shed(&third, "upstream_rate_limited");
    assert_between(
        "3rd cooldown ms",
        retry_after_ms(&third) as f64,
        2001.0,
        4000.0,
    );
    assert_eq!(status(&c, &proxy).await["cooldown"]["level"], 3);

    // Nothing reached the upstream before each cooldown was over.
    let seen = mock.requests();
    assert_eq!(seen.len(), 3);
    assert!(
        seen[1].at - seen[0].at >= Duration::from_secs(1),
        "{:?}",
        seen[1].at - seen[0].at
    );
    assert!(
        seen[2].at - seen[1].at >= Duration::from_secs(2),
        "{:?}",
        seen[2].at - seen[1].at
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn exactly_one_probe_after_a_cooldown_then_the_rest_follow() {
    let mock = MockUpstream::start().await;
    let probe_gate = Gate::new();
    mock.push(nginx_429());
    mock.push(Reply::json(200, r#"{"probe":true}"#).gated(probe_gate.clone()));
    let proxy = Start::new(&mock.url(), &config("initial = \"1s\""))
        .start()
        .await;
    let c = client();
    let url = proxy.url("/v1/models");
    let first = get(&c, &url).await;
    assert_shed(&first, "upstream_rate_limited");

    // Waiters whose wait outlasts the cooldown keep their place.
    const WAITERS: usize = 4;
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { get_waiting(&c, &url, "15s").await })
        })
        .collect();

    // The cooldown ends; one request goes; everyone else stays queued while it is out.
    mock.wait_for_requests(2).await;
    let s = status_until(&c, &proxy, "the other waiters to be queued", |s| {
        s["queue"]["depth"] == WAITERS - 1
    })
    .await;
    assert_eq!(s["cooldown"]["gate"], "probe_in_flight", "{s}");
    assert_eq!(s["in_flight"], 1, "{s}");
    assert_eq!(mock.count(), 2, "more than one request after the cooldown");
    let seen = mock.requests();
    assert!(
        seen[1].at - seen[0].at >= Duration::from_secs(1),
        "the probe went during the cooldown: {:?}",
        seen[1].at - seen[0].at
    );

    // Its success reopens the gate for the rest.
    probe_gate.open();
    for w in waiters {
        let got = w.await.unwrap();
        assert_eq!(got.status, 200, "{}", got.text());
    }
    assert_eq!(mock.count(), 1 + WAITERS);
    let s = status(&c, &proxy).await;
    assert_eq!(s["cooldown"]["gate"], "open", "{s}");
    assert_eq!(s["cooldown"]["active"], false);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_probe_that_gets_429_starts_a_longer_cooldown_and_the_queue_keeps_waiting() {
    let mock = MockUpstream::start().await;
    mock.push(nginx_429());
    mock.push(nginx_429());
    let proxy = Start::new(
        &mock.url(),
        &config("initial = \"1s\"\nmultiplier = 3.0\nmax = \"1m\""),
    )
    .start()
    .await;
    let c = client();
    let url = proxy.url("/v1/models");
    assert_shed(&get(&c, &url).await, "upstream_rate_limited");

    // Two waiters: whichever goes first is the probe and gets a 429 (3s cooldown); the other
    // is not sent after it, but waits out the second cooldown too and then succeeds.
    let a = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { get_waiting(&c, &url, "15s").await }
    });
    let b = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { get_waiting(&c, &url, "15s").await }
    });
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let (probe, other) = if a.status == 429 { (a, b) } else { (b, a) };
    assert_shed(&probe, "upstream_rate_limited");
    assert_between(
        "2nd cooldown ms",
        retry_after_ms(&probe) as f64,
        1001.0,
        3000.0,
    );
    assert_eq!(other.status, 200, "{}", other.text());
    let seen = mock.requests();
    assert_eq!(seen.len(), 3);
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(1));
    assert!(seen[2].at - seen[1].at >= Duration::from_secs(3));
    assert_eq!(status(&c, &proxy).await["cooldown"]["level"], 2);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn the_escalation_level_decays_after_a_quiet_period() {
    let mock = MockUpstream::start().await;
    mock.push(nginx_429());
    // The probe's answer takes longer than `decay_after`: a quiet period without a 429.
    mock.push(Reply::json(200, "{}").head_delay(Duration::from_millis(1500)));
    mock.push(nginx_429());
    let proxy = Start::new(
        &mock.url(),
        &config("initial = \"1s\"\nmultiplier = 4.0\ndecay_after = \"1s\""),
    )
    .start()
    .await;
    let c = client();
    let url = proxy.url("/v1/models");
    assert_eq!(retry_after(&get(&c, &url).await), 1);
    assert_eq!(get_waiting(&c, &url, "10s").await.status, 200);
    // Without the decay this would be level 2 and 4s.
    let again = get(&c, &url).await;
    assert_shed(&again, "upstream_rate_limited");
    assert!(retry_after_ms(&again) <= 1000, "{}", retry_after_ms(&again));
    assert_eq!(status(&c, &proxy).await["cooldown"]["level"], 1);
    proxy.stop().await.unwrap();
}

/// A request already queued (here behind the concurrency cap) when a 429 starts a cooldown
/// it cannot outwait is told so at once, not left to time out.
#[tokio::test]
async fn queued_waiters_that_cannot_outwait_a_new_cooldown_are_shed_at_once() {
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    mock.push(nginx_429().gated(gate.clone()));
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 6000\nburst = 100\nmax_concurrent = 1\n\
         [cooldown]\ninitial = \"30s\"\n",
    )
    .start()
    .await;
    let c = client();
    let url = proxy.url("/v1/models");
    let first = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { get(&c, &url).await }
    });
    mock.wait_for_requests(1).await;
    let queued = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { get_waiting(&c, &url, "10s").await }
    });
    status_until(&c, &proxy, "the second request to queue", |s| {
        s["queue"]["depth"] == 1
    })
    .await;
    gate.open();
    assert_shed(&first.await.unwrap(), "upstream_rate_limited");
    let shed = queued.await.unwrap();
    // Not `queue_timeout` after its 10s: the cooldown's own answer, with its time left.
    assert_shed(&shed, "upstream_cooldown");
    assert_between("Retry-After", retry_after(&shed) as f64, 25.0, 30.0);
    assert_eq!(mock.count(), 1);
    proxy.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Proactive closing on `remaining: 0`

#[tokio::test]
async fn remaining_zero_on_a_success_closes_the_gate_until_the_reset() {
    let mock = MockUpstream::start().await;
    mock.push(
        Reply::json(200, r#"{"ok":true}"#)
            .header("x-ratelimit-remaining", "0")
            .header("x-ratelimit-reset", "2"),
    );
    let proxy = Start::new(&mock.url(), &config("initial = \"30s\""))
        .start()
        .await;
    let c = client();
    let url = proxy.url("/v1/models");
    let ok = get(&c, &url).await;
    assert_eq!(ok.status, 200);
    // Passed through unchanged.
    assert_eq!(ok.header("x-ratelimit-remaining"), Some("0"));

    // The next request that cannot wait is refused as a cooldown, with the reset as
    // Retry-After; it is an upstream window, not an escalation.
    let shed = get_waiting(&c, &url, "0").await;
    let v = assert_shed(&shed, "upstream_cooldown");
    assert_between("Retry-After", retry_after(&shed) as f64, 1.0, 2.0);
    assert!(v["error"]["proxy"]["cooldown_until"].is_string(), "{v}");
    let s = status(&c, &proxy).await;
    assert_eq!(s["cooldown"]["kind"], "upstream_window", "{s}");
    assert_eq!(s["state"], "upstream_window_exhausted");
    assert_eq!(s["cooldown"]["level"], 0);
    assert_eq!(mock.count(), 1);

    // A waiter goes through when the window resets.
    let later = get_waiting(&c, &url, "10s").await;
    assert_eq!(later.status, 200, "{}", later.text());
    let seen = mock.requests();
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(2));
    proxy.stop().await.unwrap();
}

/// A `remaining: 0` arriving during a 429 cooldown (from a request sent before it) may make
/// the pause longer, but it stays a 429 cooldown: it ends with a probe and survives restarts.
#[tokio::test]
async fn remaining_zero_during_a_429_cooldown_keeps_it_a_rate_limit_cooldown() {
    let mock = MockUpstream::start().await;
    let slow = Gate::new();
    mock.push(
        Reply::json(200, r#"{"ok":true}"#)
            .header("x-ratelimit-remaining-requests", "0")
            .header("x-ratelimit-reset-requests", "30s")
            .gated(slow.clone()),
    );
    mock.push(nginx_429());
    let proxy = Start::new(&mock.url(), &config("initial = \"10s\""))
        .start()
        .await;
    let c = client();
    let url = proxy.url("/v1/models");
    let long = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { get(&c, &url).await }
    });
    mock.wait_for_requests(1).await;
    assert_shed(&get(&c, &url).await, "upstream_rate_limited");
    slow.open();
    assert_eq!(long.await.unwrap().status, 200);
    let s = status(&c, &proxy).await;
    assert_eq!(s["cooldown"]["kind"], "rate_limited", "{s}");
    assert_eq!(s["state"], "cooldown");
    assert_between(
        "remaining_seconds",
        s["cooldown"]["remaining_seconds"].as_f64().unwrap(),
        25.0,
        30.0,
    );
    proxy.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 402: the upstream's daily quota

const QUOTA_402: &str = r#"{"detail":{"message":"Quota exceeded for today, add balance to continue","quota_reset_timestamp":"TS"}}"#;

#[tokio::test]
async fn quota_402_closes_the_daily_gate_until_its_reset() {
    let reset = unix_now() + 6.0 * 3600.0;
    let body = QUOTA_402.replace(
        "TS",
        &chutes_proxy::units::format_rfc3339(reset as i64).replace('Z', "+00:00"),
    );
    let mock = MockUpstream::start_with(Reply::json(402, &body)).await;
    let proxy = Start::new(&mock.url(), &config("initial = \"1s\""))
        .start()
        .await;
    let c = client();
    let got = get(&c, &proxy.url("/v1/chat/completions")).await;
    let v = assert_shed(&got, "daily_quota_exhausted");
    let want = reset - unix_now();
    assert_eq!(got.header("x-should-retry"), Some("false"));
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_between(
        "Retry-After",
        retry_after(&got) as f64,
        want - 3.0,
        want + 2.0,
    );
    assert_eq!(v["error"]["type"], "insufficient_quota");
    assert_eq!(v["error"]["code"], "insufficient_quota");
    assert_eq!(v["error"]["proxy"]["upstream_status"], 402);
    assert_eq!(v["error"]["proxy"]["upstream_body"], body.as_str());
    assert!(got.header("ratelimit").unwrap().starts_with("\"day\";r=0;"));

    // Later requests are shed at once, even those willing to wait, and never sent.
    for wait in ["0", "20s"] {
        let shed = get_waiting(&c, &proxy.url("/v1/models"), wait).await;
        assert_shed(&shed, "daily_quota_exhausted");
        assert_eq!(shed.header("x-should-retry"), Some("false"));
        assert_between(
            "shed Retry-After",
            retry_after(&shed) as f64,
            want - 5.0,
            want + 2.0,
        );
    }
    assert_eq!(mock.count(), 1);
    let s = status(&c, &proxy).await;
    assert_eq!(s["state"], "daily_quota_exhausted", "{s}");
    let gate = chutes_proxy::units::parse_rfc3339(
        s["daily"]["upstream_quota_gate_until"].as_str().unwrap(),
    )
    .unwrap();
    assert_between("gate until", gate - reset, -1.0, 1.0);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn quota_402_without_a_timestamp_waits_for_the_next_utc_day() {
    let mock =
        MockUpstream::start_with(Reply::json(402, r#"{"detail":"Daily quota exceeded"}"#)).await;
    let proxy = Start::new(&mock.url(), &config("initial = \"1s\""))
        .start()
        .await;
    let c = client();
    let got = get(&c, &proxy.url("/v1/models")).await;
    assert_shed(&got, "daily_quota_exhausted");
    let now = unix_now();
    let midnight = (now / 86_400.0).floor() * 86_400.0 + 86_400.0;
    let want = midnight - now;
    assert_between(
        "Retry-After",
        retry_after(&got) as f64,
        want - 3.0,
        want + 2.0,
    );
    assert_eq!(mock.count(), 1);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn other_402s_pass_through_unchanged() {
    let body = r#"{"detail":"Insufficient balance for this chute"}"#;
    let mock =
        MockUpstream::start_with(Reply::json(402, body).header("x-upstream-thing", "kept")).await;
    let proxy = Start::new(&mock.url(), &config("initial = \"1s\""))
        .start()
        .await;
    let c = client();
    for _ in 0..2 {
        let got = get(&c, &proxy.url("/v1/models")).await;
        assert_eq!(got.status, 402);
        assert_eq!(got.text(), body);
        assert_eq!(got.header("content-type"), Some("application/json"));
        assert_eq!(got.header("x-upstream-thing"), Some("kept"));
        assert!(got.header("x-proxy-request-id").is_some());
        assert!(got.header("x-should-retry").is_none());
    }
    // Not a gate: the second request was sent too.
    assert_eq!(mock.count(), 2);
    proxy.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Restarts

fn state_config(dir: &std::path::Path, cooldown: &str) -> String {
    format!(
        "{}[state]\npath = \"{}\"\n",
        config(cooldown),
        dir.join("state.json").display()
    )
}

#[tokio::test]
async fn a_restart_during_a_cooldown_keeps_the_gate_closed() {
    let dir = tempfile::tempdir().unwrap();
    let toml = state_config(dir.path(), "initial = \"1s\"\nmax = \"2h\"");
    let mock = MockUpstream::start().await;
    mock.push(nginx_429().header("retry-after", "3600"));
    let proxy = Start::new(&mock.url(), &toml).start().await;
    let c = client();
    let got = get(&c, &proxy.url("/v1/models")).await;
    assert_shed(&got, "upstream_rate_limited");
    assert_eq!(retry_after(&got), 3600);
    proxy.stop().await.unwrap();

    let proxy = Start::new(&mock.url(), &toml).start().await;
    // Even a request willing to wait the longest is shed at once: the cooldown outlasts it.
    let shed = get(&c, &proxy.url("/v1/models")).await;
    let v = assert_shed(&shed, "upstream_cooldown");
    assert_between("Retry-After", retry_after(&shed) as f64, 3590.0, 3600.0);
    assert_between(
        "cooldown_until",
        cooldown_until(&v) - unix_now(),
        3585.0,
        3601.0,
    );
    let s = status(&c, &proxy).await;
    assert_eq!(s["cooldown"]["active"], true, "{s}");
    assert_eq!(s["cooldown"]["level"], 1);
    assert_eq!(
        mock.count(),
        1,
        "the restarted proxy sent a request during the cooldown"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_restart_keeps_the_upstream_quota_gate_closed() {
    let dir = tempfile::tempdir().unwrap();
    let toml = state_config(dir.path(), "initial = \"1s\"");
    let reset = unix_now() + 3.0 * 3600.0;
    let body = QUOTA_402.replace("TS", &chutes_proxy::units::format_rfc3339(reset as i64));
    let mock = MockUpstream::start_with(Reply::json(402, &body)).await;
    let proxy = Start::new(&mock.url(), &toml).start().await;
    let c = client();
    assert_shed(
        &get(&c, &proxy.url("/v1/models")).await,
        "daily_quota_exhausted",
    );
    proxy.stop().await.unwrap();

    let proxy = Start::new(&mock.url(), &toml).start().await;
    let shed = get(&c, &proxy.url("/v1/models")).await;
    assert_shed(&shed, "daily_quota_exhausted");
    let want = reset - unix_now();
    assert_between(
        "Retry-After",
        retry_after(&shed) as f64,
        want - 3.0,
        want + 2.0,
    );
    assert_eq!(mock.count(), 1);
    proxy.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// SSE

#[tokio::test]
async fn a_raw_error_line_in_a_stream_becomes_a_data_event() {
    let first = sse_data(r#"{"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}"#);
    let last = sse_data("[DONE]");
    let gate = Gate::new();
    let mock = MockUpstream::start_with(
        Reply::status(200)
            .sse([
                (Duration::ZERO, first.clone()),
                (
                    Duration::ZERO,
                    Bytes::from_static(b"{\"error\": \"boom\"}\n"),
                ),
                (Duration::ZERO, last.clone()),
            ])
            .hold_chunk(1, gate.clone()),
    )
    .await;
    let proxy = Start::new(&mock.url(), &config("initial = \"1s\""))
        .start()
        .await;
    let c = client();
    let resp = within(
        "the stream's head",
        c.request(
            req("POST", &proxy.url("/v1/chat/completions"))
                .body(Full::new(Bytes::from_static(b"{\"stream\":true}")))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The first event arrives while the upstream still holds the rest: nothing is buffered.
    let mut got = Vec::new();
    while got.len() < first.len() {
        let frame = within("the first event", body.frame())
            .await
            .expect("stream ended early")
            .expect("stream failed");
        if let Ok(data) = frame.into_data() {
            got.extend_from_slice(&data);
        }
    }
    assert_eq!(got, first);
    gate.open();
    let rest = within("the rest of the stream", body.collect())
        .await
        .unwrap()
        .to_bytes();
    got.extend_from_slice(&rest);
    let want = [
        &first[..],
        b"data: {\"error\":{\"message\":\"boom\",\"type\":\"upstream_error\",\"param\":null,\"code\":null}}\n\n",
        &last[..],
    ]
    .concat();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
    proxy.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// A real client: the Python openai SDK

/// Runs tests/sdk/test_openai_sdk.py against three proxies: one whose upstream rate-limits,
/// one whose upstream says the quota is spent, one whose stream fails mid-way. Skipped (with a
/// note) where python3 or the `openai` package is missing, unless `CI` is set.
#[tokio::test]
async fn the_openai_python_sdk_sees_the_proxy_s_answers() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = tokio::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .await;
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        let why = match &probe {
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => format!("{python}: {e}"),
        };
        if std::env::var_os("CI").is_some() {
            panic!("python3 with the openai package is required in CI: {why}");
        }
        println!("SKIPPED: the openai SDK test needs python3 with `openai` installed ({why})");
        return;
    }

    // 1. Every attempt is rate-limited: the SDK must wait the proxy's Retry-After (1s) once.
    // The proxy's own retries are off here: this is about what the SDK does with its 429s.
    let limited = MockUpstream::start_with(nginx_429()).await;
    let limited_proxy = Start::new(
        &limited.url(),
        &format!(
            "{}[retry]\nmax_attempts = 0\n",
            config("initial = \"1s\"\nmultiplier = 2.0")
        ),
    )
    .start()
    .await;
    // 2. The daily quota is spent: the SDK must not retry at all. The reset is close enough
    // (under 60s, even for SDKs that cap Retry-After there) that the SDK would honour its
    // Retry-After, so only `x-should-retry: false` stops it. The short queue wait makes the
    // proxy shed the second call rather than hold it until the reset.
    let reset = unix_now() + 55.0;
    let quota = MockUpstream::start_with(Reply::json(
        402,
        &QUOTA_402.replace("TS", &chutes_proxy::units::format_rfc3339(reset as i64)),
    ))
    .await;
    let quota_proxy = Start::new(
        &quota.url(),
        &format!("{}[queue]\nmax_wait = \"2s\"\n", config("initial = \"1s\"")),
    )
    .start()
    .await;
    // 3. A stream that fails with Chutes' raw error line.
    let streaming = MockUpstream::start_with(Reply::status(200).sse([
        (
            Duration::ZERO,
            sse_data(r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}"#),
        ),
        (Duration::ZERO, Bytes::from_static(b"{\"error\": \"boom\"}\n")),
    ]))
    .await;
    let stream_proxy = Start::new(&streaming.url(), &config("initial = \"1s\""))
        .start()
        .await;

    // 4. One capacity 429 for the model, then success: with the proxy's retries (the
    // default) a client that never retries itself still gets the answer.
    let busy = MockUpstream::start_with(Reply::json(
        200,
        r#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#,
    ))
    .await;
    busy.push(Reply::json(
        429,
        r#"{"detail":"Infrastructure is at maximum capacity, try again later"}"#,
    ));
    let busy_proxy = Start::new(&busy.url(), &config("model_initial = \"1s\""))
        .start()
        .await;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/test_openai_sdk.py");
    let run = tokio::process::Command::new(&python)
        .arg(script)
        .arg(limited_proxy.url("/v1"))
        .arg(quota_proxy.url("/v1"))
        .arg(stream_proxy.url("/v1"))
        .arg(busy_proxy.url("/v1"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the SDK script did not finish within 120s")
        .expect("could not run the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "SDK script failed ({}):\n{stdout}\n{stderr}",
        out.status
    );

    // What the upstreams saw agrees: two attempts a cooldown apart, one quota request (the SDK
    // did not retry, and its second call was shed by the proxy), one stream.
    let seen = limited.requests();
    assert_eq!(
        seen.len(),
        2,
        "rate-limited upstream saw {} requests",
        seen.len()
    );
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(1));
    assert_eq!(quota.count(), 1);
    assert_eq!(streaming.count(), 1);
    for p in [limited_proxy, quota_proxy, stream_proxy] {
        p.stop().await.unwrap();
    }
}

/// A client that gives up before the upstream answers must not make the proxy miss a 429:
/// the request was sent and counted by Chutes, so its answer must still close the gate.
#[tokio::test]
async fn a_429_for_a_client_that_already_left_still_starts_the_cooldown() {
    use tokio::io::AsyncWriteExt as _;
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    mock.push(nginx_429().header("retry-after", "60").gated(gate.clone()));
    let proxy = Start::new(&mock.url(), &config("initial = \"30s\""))
        .start()
        .await;
    let c = client();
    let mut raw = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    raw.write_all(b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    mock.wait_for_requests(1).await;
    drop(raw);
    // A window for a proxy that drops the exchange with the client to do so before the
    // upstream answers; the assertion below does not depend on its length.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.open();
    let s = status_until(&c, &proxy, "the cooldown to start", |s| {
        s["cooldown"]["active"] == true
    })
    .await;
    assert_eq!(s["cooldown"]["level"], 1);
    let got = get_waiting(&c, &proxy.url("/v1/x"), "0").await;
    assert_shed(&got, "upstream_cooldown");
    assert_eq!(mock.count(), 1);
    status_until(&c, &proxy, "the slot to be free", |s| s["in_flight"] == 0).await;
    proxy.stop().await.unwrap();
}

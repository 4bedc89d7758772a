//! Revision 2 through the real proxy: a request's model, capacity 429s that cool one model,
//! the kinds of 402, Chutes' quota headers, retries on the client's behalf, the usage poll,
//! reload without restart and answered shutdowns. In-process proxy and mock upstream on
//! loopback; waits are conditions polled with generous bounds, never bare sleeps.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use crate::support::*;

const FAST: &str = "\n[limits]\nrequests_per_minute = 600000\nburst = 10000\n";
const CAPACITY: &str = r#"{"detail":"Infrastructure is at maximum capacity, try again later"}"#;

fn chat(proxy: &TestProxy, model: &str) -> http::Request<Full<Bytes>> {
    req("POST", &proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#
        ))))
        .unwrap()
}

fn with_wait(mut r: http::Request<Full<Bytes>>, wait: &str) -> http::Request<Full<Bytes>> {
    r.headers_mut()
        .insert("x-proxy-max-wait", wait.parse().unwrap());
    r
}

async fn status(c: &TestClient, proxy: &TestProxy) -> serde_json::Value {
    get(c, &proxy.admin_url("/status")).await.json()
}

/// Poll `/status` until `cond` holds (bounded; a failure names what was last seen).
async fn status_until(
    c: &TestClient,
    proxy: &TestProxy,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(c, proxy).await;
        if cond(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not seen within 20s; last /status: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_capacity_429_cools_only_its_model() {
    let mock = MockUpstream::start().await;
    mock.push(Reply::json(429, CAPACITY));
    let proxy = Start::new(&mock.url(), &format!("{FAST}\n[retry]\nmax_attempts = 0\n"))
        .start()
        .await;
    let c = client();
    let got = send(&c, chat(&proxy, "big-model")).await;
    assert_eq!(got.status, 429);
    let v = got.json();
    assert_eq!(v["error"]["proxy"]["reason"], "upstream_capacity", "{v}");
    assert_eq!(v["error"]["proxy"]["model"], "big-model");
    assert_eq!(v["error"]["proxy"]["upstream_status"], 429);
    assert!(v["error"]["proxy"]["upstream_body"]
        .as_str()
        .unwrap()
        .contains("maximum capacity"));
    assert_eq!(got.header("retry-after"), Some("5"));
    assert_eq!(got.header("x-should-retry"), Some("true"));
    // Other models, and requests without one, are served at once.
    assert_eq!(send(&c, chat(&proxy, "small-model")).await.status, 200);
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    // The cooling model: a request that cannot wait is told so without reaching upstream.
    let got = send(&c, with_wait(chat(&proxy, "big-model"), "1s")).await;
    assert_eq!(got.status, 429);
    assert_eq!(got.json()["error"]["proxy"]["reason"], "model_cooldown");
    assert_eq!(mock.count(), 3);
    let s = status(&c, &proxy).await;
    assert_eq!(s["cooldown"]["active"], false, "{s}");
    let m = &s["models"][0];
    assert_eq!(m["model"], "big-model", "{s}");
    assert_eq!(m["cooling"], true);
    assert!(m["last_body"].as_str().unwrap().contains("capacity"));
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn the_edge_page_still_pauses_the_whole_account() {
    let mock = MockUpstream::start().await;
    mock.push(Reply::text(
        429,
        "text/html",
        "<html><head><title>429 Too Many Requests</title></head><body><center><h1>429 Too Many Requests</h1></center><hr><center>nginx</center></body></html>",
    ));
    let proxy = Start::new(&mock.url(), &format!("{FAST}\n[retry]\nmax_attempts = 0\n"))
        .start()
        .await;
    let c = client();
    let got = send(&c, chat(&proxy, "m1")).await;
    assert_eq!(
        got.json()["error"]["proxy"]["reason"],
        "upstream_rate_limited"
    );
    let got = send(&c, with_wait(chat(&proxy, "m2"), "1s")).await;
    assert_eq!(got.json()["error"]["proxy"]["reason"], "upstream_cooldown");
    assert_eq!(mock.count(), 1);
    proxy.stop().await.unwrap();
}

/// The client whose wait covers the model's cooldown never sees the 429: its request is the
/// model's probe and is sent again with the same body.
#[tokio::test]
async fn a_retry_serves_the_client_through_a_capacity_429() {
    let mock = MockUpstream::start().await;
    mock.push(Reply::json(429, CAPACITY));
    let proxy = Start::new(
        &mock.url(),
        &format!("{FAST}\n[cooldown]\nmodel_initial = \"1s\"\n"),
    )
    .start()
    .await;
    let c = client();
    let got = send(&c, chat(&proxy, "big-model")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-proxy-retries"), Some("1"));
    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body_text(), seen[1].body_text());
    assert!(seen[1].body_text().contains("big-model"));
    // Its header fields were parked while the retry waited out the cooldown: all back.
    assert_eq!(seen[0].headers, seen[1].headers);
    assert!(seen[1].headers.len() >= 4, "{:?}", seen[1].headers);
    // Counted by cause.
    let metrics = get(&c, &proxy.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains("chutes_proxy_retries_total{cause=\"model\"} 1"),
        "{metrics}"
    );
    proxy.stop().await.unwrap();
}

/// A body over `retry.max_body` is not kept, so its 429 reaches the client; one of exactly
/// `max_body` bytes is retried.
#[tokio::test]
async fn bodies_over_the_retry_limit_are_not_retried() {
    let mock = MockUpstream::start().await;
    mock.push(Reply::json(429, CAPACITY));
    mock.push(Reply::json(429, CAPACITY));
    let proxy = Start::new(
        &mock.url(),
        &format!("{FAST}\n[cooldown]\nmodel_initial = \"1s\"\n[retry]\nmax_body = 100\n"),
    )
    .start()
    .await;
    let c = client();
    let body = |n: usize| {
        let head = r#"{"model":"m","pad":""#;
        let tail = r#""}"#;
        let pad = "x".repeat(n - head.len() - tail.len());
        Bytes::from(format!("{head}{pad}{tail}"))
    };
    let post = |b: Bytes| {
        req("POST", &proxy.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(b))
            .unwrap()
    };
    let got = send(&c, post(body(101))).await;
    assert_eq!(got.status, 429);
    assert_eq!(got.json()["error"]["proxy"]["reason"], "upstream_capacity");
    assert_eq!(got.header("x-proxy-retries"), None);
    // Exactly max_body: kept, and retried once the model's cooldown is over.
    let got = send(&c, post(body(100))).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("x-proxy-retries"), Some("1"));
    assert_eq!(mock.count(), 3);
    proxy.stop().await.unwrap();
}

/// A request waiting for its retry keeps its body, and that body counts against
/// `queue.max_body_bytes` with the bodies of requests waiting for their first turn: a body
/// that does not fit beside it is shed as `queue_full`, and a retry whose body does not fit
/// beside the waiting ones is not made (its client gets the 429).
#[tokio::test]
async fn a_body_kept_for_a_retry_counts_against_the_waiting_bodies_bound() {
    let mock = MockUpstream::start().await;
    mock.push(Reply::json(429, CAPACITY));
    let gate = Gate::new();
    mock.push(Reply::json(429, CAPACITY).gated(gate.clone()));
    let proxy = Start::new(
        &mock.url(),
        &format!(
            "{FAST}\n[cooldown]\nmodel_initial = \"60s\"\n[queue]\nmax_wait = \"120s\"\nmax_body_bytes = \"1000B\"\n"
        ),
    )
    .start()
    .await;
    let c = client();
    let body = |model: &str, len: usize| {
        let head = format!(r#"{{"model":"{model}","pad":""#);
        let tail = r#""}"#;
        let pad = "x".repeat(len - head.len() - tail.len());
        format!("{head}{pad}{tail}")
    };
    let raw = |b: String| async move {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            b.len()
        );
        tokio::io::AsyncWriteExt::write_all(&mut s, (head + &b).as_bytes())
            .await
            .unwrap();
        s
    };
    let post = |b: String| {
        req("POST", &proxy.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(b)))
            .unwrap()
    };
    // The first answer is a capacity 429: the request waits out its model's cooldown to be
    // sent again, its 400 bytes kept.
    let retrying = raw(body("m", 400)).await;
    let s = status_until(&c, &proxy, "the retry waiting", |s| {
        s["queue"]["depth"] == 1
    })
    .await;
    assert_eq!(s["queue"]["body_bytes"], 400, "{s}");

    // Another model's request: 700 bytes more do not fit beside the kept body.
    let shed = send(&c, post(body("n", 700))).await;
    assert_eq!(shed.status, 429, "{}", shed.text());
    assert_eq!(shed.json()["error"]["proxy"]["reason"], "queue_full");
    assert_eq!(mock.count(), 1, "the shed request was not sent");

    // 400 bytes fit (800): admitted and sent; its answer, a 429 too, is held back until a
    // third body waits for the cooling model (300 bytes: 700 held). The second request's
    // retry would need 400 beside them: not made.
    let second = tokio::spawn({
        let c = c.clone();
        let r = post(body("n", 400));
        async move { send(&c, r).await }
    });
    mock.wait_for_requests(2).await;
    let third = raw(body("m", 300)).await;
    status_until(&c, &proxy, "the third body waiting", |s| {
        s["queue"]["depth"] == 2 && s["queue"]["body_bytes"] == 700
    })
    .await;
    gate.open();
    let got = within("the second answer", second).await.unwrap();
    assert_eq!(got.status, 429, "{}", got.text());
    assert_eq!(got.json()["error"]["proxy"]["reason"], "upstream_capacity");
    assert_eq!(got.header("x-proxy-retries"), None);
    let s = status(&c, &proxy).await;
    assert_eq!(s["queue"]["body_bytes"], 700, "{s}");
    assert_eq!(s["retries"]["model"], 1, "{s}");

    // The waiting clients leave: their bodies are given back, and a body fits again (a
    // third model's: both others are cooling).
    drop((retrying, third));
    status_until(&c, &proxy, "the bodies given back", |s| {
        s["queue"]["depth"] == 0 && s["queue"]["body_bytes"] == 0
    })
    .await;
    let got = send(&c, post(body("o", 700))).await;
    assert_eq!(got.status, 200, "{}", got.text());
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_usage_cap_402_closes_the_gate_until_the_next_window() {
    let mock = MockUpstream::start().await;
    mock.push(Reply::json(
        402,
        r#"{"detail":"Subscription usage cap exceeded. Please add balance to continue."}"#,
    ));
    let proxy = Start::new(&mock.url(), FAST).start().await;
    let c = client();
    let got = send(&c, chat(&proxy, "m")).await;
    assert_eq!(got.status, 429);
    let v = got.json();
    assert_eq!(v["error"]["proxy"]["reason"], "usage_cap_exhausted", "{v}");
    assert_eq!(v["error"]["code"], "insufficient_quota");
    assert_eq!(got.header("x-should-retry"), Some("false"));
    let secs: u64 = got.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=4 * 3600).contains(&secs), "{secs}");
    // The next request does not reach the upstream.
    let got = send(&c, chat(&proxy, "other")).await;
    assert_eq!(
        got.json()["error"]["proxy"]["reason"],
        "usage_cap_exhausted"
    );
    assert_eq!(mock.count(), 1);
    let s = status(&c, &proxy).await;
    assert_eq!(s["state"], "usage_cap_exhausted", "{s}");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_model_specific_402_passes_through_and_closes_nothing() {
    let mock = MockUpstream::start().await;
    let tee = r#"{"detail":"TEE models require an active subscription or positive balance."}"#;
    mock.push(Reply::json(402, tee));
    let proxy = Start::new(&mock.url(), FAST).start().await;
    let c = client();
    let got = send(&c, chat(&proxy, "tee-model")).await;
    assert_eq!(got.status, 402);
    assert_eq!(got.text(), tee);
    assert_eq!(send(&c, chat(&proxy, "other")).await.status, 200);
    assert_eq!(mock.count(), 2);
    proxy.stop().await.unwrap();
}

/// The plan's quota as Chutes reports it on every response closes the gate before any 402,
/// so nothing is billed pay-as-you-go.
#[tokio::test]
async fn quota_headers_close_the_gate_before_the_plan_overflows() {
    let mock = MockUpstream::start().await;
    mock.push(
        Reply::json(200, r#"{"choices":[]}"#)
            .header("x-chutes-quota-total", "300")
            .header("x-chutes-quota-used", "299")
            .header("x-chutes-quota-remaining", "1")
            .header("x-chutes-rl-user", "60"),
    );
    let proxy = Start::new(&mock.url(), FAST).start().await;
    let c = client();
    assert_eq!(send(&c, chat(&proxy, "m")).await.status, 200);
    let got = send(&c, chat(&proxy, "m")).await;
    assert_eq!(got.status, 429);
    let v = got.json();
    assert_eq!(
        v["error"]["proxy"]["reason"], "daily_quota_exhausted",
        "{v}"
    );
    assert_eq!(v["error"]["proxy"]["limits"]["requests_per_day"], 300);
    assert_eq!(v["error"]["proxy"]["limits"]["used_today"], 300);
    assert_eq!(mock.count(), 1);
    let s = status(&c, &proxy).await;
    assert_eq!(s["upstream_quota"]["total"], 300, "{s}");
    assert_eq!(s["upstream_quota"]["source"], "header");
    assert_eq!(s["rate_limits"]["advertised_requests_per_minute"], 60);
    assert_eq!(s["rate_limits"]["in_force_requests_per_minute"], 60);
    proxy.stop().await.unwrap();
}

/// The usage poll: at start, with the key, the account's usage from everywhere counts.
#[tokio::test]
async fn the_usage_poll_counts_usage_from_outside_the_proxy() {
    let mock = MockUpstream::start_with(Reply::json(200, r#"{"quota": 100, "used": 100.0}"#)).await;
    let proxy = Start::new(
        &mock.url(),
        &format!(
            "quota_url = \"{}/users/me/quota_usage/me\"\n{FAST}",
            mock.url()
        ),
    )
    .start()
    .await;
    let c = client();
    let s = status_until(&c, &proxy, "the poll's figures", |s| {
        s["upstream_quota"]["source"] == "poll"
    })
    .await;
    assert_eq!(s["upstream_quota"]["total"], 100);
    assert_eq!(s["daily"]["used"], 100);
    let polls = mock.requests();
    assert_eq!(polls[0].path(), "/users/me/quota_usage/me");
    assert_eq!(
        polls[0].header("authorization"),
        Some(format!("Bearer {TEST_KEY}").as_str())
    );
    // The plan is spent: nothing more is sent.
    let got = send(&c, chat(&proxy, "m")).await;
    assert_eq!(
        got.json()["error"]["proxy"]["reason"],
        "daily_quota_exhausted"
    );
    assert_eq!(mock.count(), polls.len());
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_poll_answering_garbage_changes_nothing() {
    let mock = MockUpstream::start_with(Reply::text(200, "text/html", "<html>login</html>")).await;
    let proxy = Start::new(
        &mock.url(),
        &format!("quota_url = \"{}/q\"\n{FAST}", mock.url()),
    )
    .start()
    .await;
    let c = client();
    mock.wait_for_requests(1).await;
    let s = status(&c, &proxy).await;
    assert!(s["upstream_quota"].is_null(), "{s}");
    assert_eq!(send(&c, chat(&proxy, "m")).await.status, 200);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn post_reload_applies_live_keys_and_refuses_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let mock = MockUpstream::start().await;
    let start = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 600\nburst = 5\n",
    );
    let toml = start.toml.clone();
    let proxy = start.start_reloadable(&path).await;
    let c = client();
    let reload = || {
        req("POST", &proxy.admin_url("/reload"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    std::fs::write(
        &path,
        toml.replace("requests_per_minute = 600", "requests_per_minute = 30")
            + "\n[server]\nshutdown_grace = \"3s\"\n[state]\npath = \"\"\n",
    )
    .unwrap();
    let got = send(&c, reload()).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let v = got.json();
    assert_eq!(
        v["applied"],
        serde_json::json!(["limits.requests_per_minute"])
    );
    assert_eq!(
        v["needs_restart"],
        serde_json::json!(["server.shutdown_grace"])
    );
    let s = status(&c, &proxy).await;
    assert_eq!(s["limits"]["requests_per_minute"], 30, "{s}");
    // A broken file changes nothing and names every problem.
    std::fs::write(
        &path,
        "[limits]\nrequests_per_minute = 0\nbrust = 3\n[state]\npath = \"\"\n",
    )
    .unwrap();
    let got = send(&c, reload()).await;
    assert_eq!(got.status, 400);
    let errors = got.json()["errors"].to_string();
    assert!(errors.contains("limits.requests_per_minute"), "{errors}");
    assert!(errors.contains("limits.brust"), "{errors}");
    assert_eq!(
        status(&c, &proxy).await["limits"]["requests_per_minute"],
        30
    );
    // GET is not a reload.
    assert_eq!(get(&c, &proxy.admin_url("/reload")).await.status, 405);
    proxy.stop().await.unwrap();
}

/// SIGTERM with requests queued: the ones that cannot be admitted within the grace are
/// answered `shutting_down` at once, with Retry-After, instead of being cut.
#[tokio::test]
async fn shutdown_answers_queued_requests_it_cannot_serve() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 2\nburst = 1\n[server]\nshutdown_grace = \"2s\"\n[queue]\nmax_wait = \"120s\"\n",
    )
    .start()
    .await;
    let c = client();
    assert_eq!(send(&c, chat(&proxy, "m")).await.status, 200);
    // Two more, due in 30 s and 60 s: both wait.
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            let r = chat(&proxy, "m");
            tokio::spawn(async move { send(&c, r).await })
        })
        .collect();
    status_until(&c, &proxy, "two queued", |s| s["queue"]["depth"] == 2).await;
    let stopping = proxy.begin_stop();
    for q in queued {
        let got = q.await.unwrap();
        assert_eq!(got.status, 503, "{}", got.text());
        assert_eq!(got.json()["error"]["proxy"]["reason"], "shutting_down");
        assert!(got.header("retry-after").is_some());
    }
    stopping.await.unwrap().unwrap();
    assert_eq!(mock.count(), 1);
}

/// Bodies that name no usable model are forwarded as they are and belong to the account only:
/// not JSON, a model that is not a string, a 1 MB model name.
#[tokio::test]
async fn bodies_without_a_usable_model_are_forwarded_unchanged() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), FAST).start().await;
    let c = client();
    let huge = format!(r#"{{"model":"{}"}}"#, "m".repeat(1 << 20));
    for body in [
        "{not json".to_string(),
        r#"{"model": 42}"#.to_string(),
        r#"["model", "x"]"#.to_string(),
        huge,
    ] {
        let got = send(
            &c,
            req("POST", &proxy.url("/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200);
        let seen = mock.requests();
        assert_eq!(seen.last().unwrap().body_text(), body);
    }
    let s = status(&c, &proxy).await;
    assert_eq!(s["models"], serde_json::json!([]), "{s}");
    proxy.stop().await.unwrap();
}

/// A client that left before the upstream's capacity 429 arrived gets nothing re-sent on its
/// behalf: the 429 is still read (the model cools), but no retry spends a request.
#[tokio::test]
async fn nothing_is_retried_for_a_client_that_has_left() {
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    mock.push(Reply::json(429, CAPACITY).gated(gate.clone()));
    let proxy = Start::new(
        &mock.url(),
        &format!("{FAST}\n[cooldown]\nmodel_initial = \"1s\"\n"),
    )
    .start()
    .await;
    let c = client();
    let r = chat(&proxy, "big-model");
    let c2 = c.clone();
    let pending = tokio::spawn(async move { c2.request(r).await });
    mock.wait_for_requests(1).await;
    pending.abort();
    let _ = pending.await;
    // The connection is gone; now the upstream answers.
    gate.open();
    status_until(&c, &proxy, "the 429 read and the model cooling", |s| {
        s["models"][0]["last_body"]
            .as_str()
            .is_some_and(|b| b.contains("capacity"))
            && s["in_flight"] == 0
    })
    .await;
    // Past the model's cooldown, still nothing more went upstream.
    status_until(&c, &proxy, "the model's cooldown over", |s| {
        s["models"][0]["cooling"] == false
    })
    .await;
    assert_eq!(mock.count(), 1);
    assert_eq!(
        status(&c, &proxy).await["retries"]["model"],
        0,
        "no retry counted"
    );
    proxy.stop().await.unwrap();
}

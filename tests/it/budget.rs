//! The account-wide budget seen from outside: many concurrent clients against a small budget,
//! the upstream's arrival times, the exact shape of shed responses, and the daily count
//! surviving a restart.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use crate::support::*;

/// The upstream never sees more than `burst + rate × t` in any window, however many clients
/// hammer the proxy at once. One request of slack absorbs loopback scheduling jitter (a request
/// granted just before another can arrive just after it); a per-connection or per-client bucket
/// would overshoot by far more.
#[tokio::test]
async fn many_clients_never_exceed_the_account_rate() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 120\nburst = 3\n[queue]\nmax_wait = \"60s\"\n",
    )
    .start()
    .await;
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let c = c.clone();
        let url = proxy.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..2 {
                let r = req("POST", &url)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
                    .unwrap();
                statuses.push(send(&c, r).await.status);
            }
            statuses
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().iter().all(|&s| s == 200));
    }
    let seen = mock.wait_for_requests(20).await;
    // 500 ms spacing: scheduling jitter on a loaded 2-core machine stays far below it.
    assert_account_rate(&seen, 3, Duration::from_millis(500), &[0, 500, 1000, 3000]);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn shed_response_has_the_contract_headers_and_body() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 6\nburst = 1\nrequests_per_day = 100\n",
    )
    .start()
    .await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    let got = send(
        &c,
        req("GET", &proxy.url("/v1/models"))
            .header("x-proxy-max-wait", "0")
            .header("x-proxy-request-id", "my-id-1")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 429);
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("x-proxy-request-id"), Some("my-id-1"));
    // The next token is 10 s away (6/min).
    let retry: u64 = got.header("retry-after").unwrap().parse().unwrap();
    assert!((9..=10).contains(&retry), "retry-after {retry}");
    let ms: u64 = got.header("retry-after-ms").unwrap().parse().unwrap();
    assert!((9000..=10_000).contains(&ms), "retry-after-ms {ms}");
    assert_eq!(got.header("x-should-retry"), Some("true"));
    assert_eq!(
        got.header("ratelimit-policy"),
        Some("\"minute\";q=6;w=60, \"day\";q=100;w=86400")
    );
    assert_eq!(
        got.header("ratelimit"),
        Some(format!("\"minute\";r=0;t={retry}").as_str())
    );
    assert_eq!(got.header("x-ratelimit-limit-requests"), Some("6"));
    assert_eq!(got.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(
        got.header("x-ratelimit-reset-requests"),
        Some(format!("{retry}s").as_str())
    );
    let v = got.json();
    let e = &v["error"];
    assert_eq!(e["type"], "requests");
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert!(e["param"].is_null());
    assert!(e["message"].as_str().unwrap().contains("retry in"));
    let p = &e["proxy"];
    assert_eq!(p["reason"], "queue_timeout");
    assert_eq!(p["request_id"], "my-id-1");
    let ras = p["retry_after_seconds"].as_f64().unwrap();
    assert!(ras > 8.0 && ras <= 10.0, "{ras}");
    assert_eq!(p["limits"]["requests_per_minute"], 6);
    assert_eq!(p["limits"]["burst"], 1);
    assert_eq!(p["limits"]["requests_per_day"], 100);
    assert_eq!(p["limits"]["used_today"], 1);
    assert_eq!(p["limits"]["remaining_today"], 99);
    assert!(p["limits"]["day_resets_at"]
        .as_str()
        .unwrap()
        .ends_with("T00:00:00Z"));
    assert!(p["cooldown_until"].is_null());
    assert!(p["upstream_status"].is_null());
    assert!(p["upstream_body"].is_null());
    // The shed request never reached the upstream.
    assert_eq!(mock.count(), 1);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn bad_wait_header_is_a_400_not_ignored() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "").start().await;
    let c = client();
    let got = send(
        &c,
        req("GET", &proxy.url("/v1/models"))
            .header("x-proxy-max-wait", "soon")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 400);
    assert_eq!(got.json()["error"]["proxy"]["reason"], "bad_request");
    assert!(got.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("x-proxy-max-wait"));
    assert_eq!(mock.count(), 0);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn queue_full_is_shed_at_once() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 1\nburst = 1\n[queue]\nmax_depth = 0\n",
    )
    .start()
    .await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/v1/x")).await.status, 200);
    let got = get(&c, &proxy.url("/v1/x")).await;
    assert_eq!(got.status, 429);
    assert_eq!(got.json()["error"]["proxy"]["reason"], "queue_full");
    assert!(got.header("retry-after").is_some());
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn daily_cap_survives_a_restart_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let mock = MockUpstream::start().await;
    let cfg = format!(
        "[limits]\nrequests_per_minute = 6000\nburst = 10\nrequests_per_day = 5\n[state]\npath = {:?}\n",
        state.display().to_string()
    );
    let c = client();
    let proxy = Start::new(&mock.url(), &cfg).start().await;
    for _ in 0..3 {
        assert_eq!(get(&c, &proxy.url("/v1/x")).await.status, 200);
    }
    proxy.stop().await.unwrap();

    let proxy = Start::new(&mock.url(), &cfg).start().await;
    let status = get(&c, &proxy.admin_url("/status")).await.json();
    assert_eq!(status["daily"]["used"], 3, "{status}");
    assert_eq!(status["daily"]["remaining"], 2);
    for _ in 0..2 {
        assert_eq!(get(&c, &proxy.url("/v1/x")).await.status, 200);
    }
    let got = get(&c, &proxy.url("/v1/x")).await;
    assert_eq!(got.status, 429);
    assert_eq!(
        got.json()["error"]["proxy"]["reason"],
        "daily_quota_exhausted"
    );
    assert_eq!(got.json()["error"]["type"], "insufficient_quota");
    assert_eq!(got.header("x-should-retry"), Some("false"));
    assert_eq!(mock.count(), 5);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_corrupt_state_file_starts_conservatively() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    std::fs::write(&state, b"{\"version\": 1, \"used\": \"lots\"").unwrap();
    let mock = MockUpstream::start().await;
    let cfg = format!(
        "[limits]\nrequests_per_day = 50\n[state]\npath = {:?}\n",
        state.display().to_string()
    );
    let proxy = Start::new(&mock.url(), &cfg).start().await;
    let c = client();
    // Without a trustworthy count the day's cap is assumed spent: never under-count.
    let got = get(&c, &proxy.url("/v1/x")).await;
    assert_eq!(
        got.json()["error"]["proxy"]["reason"],
        "daily_quota_exhausted"
    );
    assert_eq!(mock.count(), 0);
    // The bad file was kept for inspection, not overwritten.
    let kept = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains(".corrupt-"));
    assert!(kept);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn concurrency_slot_is_held_until_the_stream_ends() {
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    mock.push(
        Reply::status(200)
            .sse([
                (Duration::ZERO, sse_data("{\"a\":1}")),
                (Duration::ZERO, sse_data("[DONE]")),
            ])
            .hold_chunk(1, gate.clone()),
    );
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 6000\nburst = 10\nmax_concurrent = 1\n",
    )
    .start()
    .await;
    let c = client();
    // The stream's head arrives; its body is still open.
    let resp = within(
        "stream head",
        c.request(
            req("GET", &proxy.url("/v1/stream"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let status = get(&c, &proxy.admin_url("/status")).await.json();
    assert_eq!(status["in_flight"], 1);
    // A second request cannot go while the stream holds the only slot.
    let got = send(
        &c,
        req("GET", &proxy.url("/v1/x"))
            .header("x-proxy-max-wait", "0")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 429);
    gate.open();
    use http_body_util::BodyExt;
    let body = within("stream end", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("[DONE]"));
    // The slot is free again.
    assert_eq!(get(&c, &proxy.url("/v1/x")).await.status, 200);
    let status = get(&c, &proxy.admin_url("/status")).await.json();
    assert_eq!(status["in_flight"], 0);
    assert_eq!(status["queue"]["depth"], 0);
    proxy.stop().await.unwrap();
}

//! The Chutes emulator itself (`support/chutes.rs`), checked against what CONTRACT.md and
//! NOTES.md say Chutes does, and against the proxy's own readers of those signals
//! (`chutes_proxy::signals`), so the benchmark built on it measures the real thing: the edge
//! bans with doubling and answers the nginx page; capacity 429s hit only their model and are
//! no violation; quota headers are a snapshot before the call; the quota and usage-cap 402s
//! and the usage endpoint read back as the proxy expects.
//!
//! No proxy here. Time never has to pass for real: the emulator runs at real speed
//! (`time_scale = 1`) and tests jump its clock with `advance`, far beyond the milliseconds
//! the requests themselves take, so a loaded machine cannot change an outcome.

use std::time::Duration;

use bytes::Bytes;
use chutes_proxy::signals::{
    advertised_rates, chutes_quota, classify_402, classify_429, quota_usage, AdvertisedRate,
    ChutesQuota, Kind402, Scope429,
};
use http_body_util::Full;

use crate::support::chutes::{Ban, ChutesConfig, ChutesEmulator, NGINX_429};
use crate::support::*;

/// 2025-09-12T12:00:00Z: the quota resets at the next midnight, 2025-09-13T00:00:00Z.
const NOON: f64 = 1_757_678_400.0;

fn config() -> ChutesConfig {
    ChutesConfig {
        requests_per_minute: 3,
        start_unix: NOON,
        ..ChutesConfig::default()
    }
}

async fn chat(c: &TestClient, emu: &ChutesEmulator, model: &str) -> Got {
    chat_body(c, emu, &format!(r#"{{"model":"{model}","messages":[]}}"#)).await
}

async fn chat_body(c: &TestClient, emu: &ChutesEmulator, body: &str) -> Got {
    send(
        c,
        req("POST", &format!("{}/v1/chat/completions", emu.url()))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
    .await
}

fn assert_edge_429(got: &Got, what: &str) {
    assert_eq!(got.status, 429, "{what}: {}", got.text());
    assert_eq!(got.text(), NGINX_429, "{what}");
    assert_eq!(got.header("content-type"), Some("text/html"), "{what}");
    assert_eq!(got.header("retry-after"), None, "{what}");
    for (name, _) in &got.headers {
        assert!(
            !name.as_str().starts_with("x-ratelimit") && !name.as_str().starts_with("x-chutes"),
            "{what}: edge 429 carries {name}"
        );
    }
    assert_eq!(classify_429(&got.body), Scope429::Account, "{what}");
}

#[tokio::test]
async fn edge_bans_double_with_each_violation() {
    let emu = ChutesEmulator::start(config()).await;
    let c = client();
    let mut lengths = Vec::new();
    for round in 0..3u64 {
        for i in 0..3 {
            let got = chat(&c, &emu, "m").await;
            assert_eq!(got.status, 200, "round {round} request {i}: {}", got.text());
        }
        assert_edge_429(&chat(&c, &emu, "m").await, "the violation");
        let ban = 60 << round;
        lengths.push(Duration::from_secs(ban));
        // Banned: everything gets the page, and it does not extend the ban.
        assert_edge_429(&chat(&c, &emu, "other").await, "during the ban");
        let left = emu.ban_left();
        assert!(left > ban as f64 - 5.0 && left <= ban as f64, "{left}");
        emu.advance(Duration::from_secs(ban - 5));
        assert_edge_429(&chat(&c, &emu, "m").await, "just before the end");
        emu.advance(Duration::from_secs(6));
        assert_eq!(emu.ban_left(), 0.0);
    }
    let stats = emu.stats();
    let got: Vec<Duration> = stats.bans.iter().map(|b: &Ban| b.length).collect();
    assert_eq!(got, lengths);
    assert_eq!(stats.violations, 3);
    assert_eq!(stats.banned_hits, 6);
    assert_eq!(stats.edge_429, 9);
    assert_eq!(stats.edge_passed, 9);
    assert_eq!(stats.status(200), 9);
    assert_eq!(stats.model_status("other", 429), 3);
}

#[tokio::test]
async fn ban_length_is_capped() {
    let emu = ChutesEmulator::start(ChutesConfig {
        requests_per_minute: 1,
        ban_initial: Duration::from_secs(60),
        ban_max: Duration::from_secs(150),
        ..config()
    })
    .await;
    let c = client();
    for _ in 0..4 {
        assert_eq!(chat(&c, &emu, "m").await.status, 200);
        assert_edge_429(&chat(&c, &emu, "m").await, "violation");
        emu.advance(Duration::from_secs(1_000));
    }
    let lengths: Vec<u64> = emu
        .stats()
        .bans
        .iter()
        .map(|b| b.length.as_secs())
        .collect();
    assert_eq!(lengths, [60, 120, 150, 150]);
}

#[tokio::test]
async fn the_window_slides() {
    let emu = ChutesEmulator::start(config()).await;
    let c = client();
    assert_eq!(chat(&c, &emu, "m").await.status, 200);
    emu.advance(Duration::from_secs(30));
    assert_eq!(chat(&c, &emu, "m").await.status, 200);
    assert_eq!(chat(&c, &emu, "m").await.status, 200);
    // 31 s after the first: it has left the window, the other two have not.
    emu.advance(Duration::from_secs(31));
    assert_eq!(chat(&c, &emu, "m").await.status, 200);
    assert_edge_429(&chat(&c, &emu, "m").await, "fourth in the sliding minute");
}

#[tokio::test]
async fn capacity_429s_hit_only_their_model_and_are_no_violation() {
    let emu = ChutesEmulator::start(ChutesConfig {
        requests_per_minute: 1_000,
        ..config().capacity_every("busy", 3)
    })
    .await;
    let c = client();
    let mut busy = Vec::new();
    for _ in 0..9 {
        busy.push(chat(&c, &emu, "busy").await);
        let calm = chat(&c, &emu, "calm").await;
        assert_eq!(calm.status, 200, "{}", calm.text());
    }
    let statuses: Vec<u16> = busy.iter().map(|g| g.status).collect();
    assert_eq!(statuses, [200, 200, 429, 200, 200, 429, 200, 200, 429]);
    let refused = &busy[2];
    assert_eq!(
        refused.json(),
        serde_json::json!({"detail": "Infrastructure is at maximum capacity, try again later"})
    );
    assert_eq!(refused.header("content-type"), Some("application/json"));
    assert_eq!(classify_429(&refused.body), Scope429::Model);
    // The capacity answer carries the quota snapshot too (4 successes before it), and did
    // not count as used: the next busy request sees only the one calm success in between.
    assert_eq!(refused.header("x-chutes-quota-used"), Some("4"));
    assert_eq!(busy[3].header("x-chutes-quota-used"), Some("5"));
    let stats = emu.stats();
    assert_eq!(stats.capacity_429, 3);
    assert_eq!(stats.violations, 0);
    assert!(stats.bans.is_empty());
    assert_eq!(stats.model_status("busy", 429), 3);
    assert_eq!(stats.model_status("busy", 200), 6);
    assert_eq!(stats.model_status("calm", 200), 9);
    assert_eq!(stats.model_status("calm", 429), 0);
    assert_eq!(stats.used_today, 15);
    // They passed the edge, so they used its window.
    assert_eq!(stats.edge_passed, 18);
}

#[tokio::test]
async fn quota_headers_are_a_snapshot_before_the_call() {
    let emu = ChutesEmulator::start(ChutesConfig {
        requests_per_minute: 1_000,
        daily_quota: 3,
        ..config().rl_chute("slow", 10)
    })
    .await;
    let c = client();
    for used in 0..3u64 {
        let got = chat(&c, &emu, if used == 1 { "slow" } else { "fast" }).await;
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(
            chutes_quota(&got.headers),
            Some(ChutesQuota {
                total: 3,
                used,
                remaining: Some(3 - used)
            })
        );
        let per = |n| {
            Some(AdvertisedRate::PerMinute(
                std::num::NonZeroU32::new(n).unwrap(),
            ))
        };
        let want_chute = if used == 1 { per(10) } else { None };
        assert_eq!(advertised_rates(&got.headers), (per(60), want_chute));
        assert!(got.header("x-chutes-invocationid").is_some());
    }
    // Spent: the quota 402, resetting at the next midnight UTC.
    let spent = chat(&c, &emu, "fast").await;
    assert_eq!(spent.status, 402, "{}", spent.text());
    assert_eq!(
        spent.json()["detail"]["quota_reset_timestamp"],
        "2025-09-13T00:00:00+00:00"
    );
    assert_eq!(
        classify_402(&spent.body),
        Kind402::DailyQuota {
            reset_unix: Some(NOON + 12.0 * 3_600.0)
        }
    );
    assert_eq!(spent.header("x-chutes-quota-remaining"), Some("0"));
    let usage = get(&c, &format!("{}/users/me/quota_usage/me", emu.url())).await;
    assert_eq!(usage.status, 200);
    assert_eq!(usage.text(), r#"{"quota": 3, "used": 3.0}"#);
    assert_eq!(quota_usage(&usage.body), Some((3, 3)));
    // The emulated day ends at midnight: the quota is back.
    emu.advance(Duration::from_secs(12 * 3_600));
    let next_day = chat(&c, &emu, "fast").await;
    assert_eq!(next_day.status, 200, "{}", next_day.text());
    assert_eq!(next_day.header("x-chutes-quota-used"), Some("0"));
}

#[tokio::test]
async fn no_quota_and_unlimited_rate_headers() {
    let emu = ChutesEmulator::start(ChutesConfig {
        daily_quota: 0,
        rl_user: None,
        ..config()
    })
    .await;
    let got = chat(&client(), &emu, "m").await;
    assert_eq!(got.status, 200);
    assert_eq!(
        chutes_quota(&got.headers),
        Some(ChutesQuota {
            total: 0,
            used: 0,
            remaining: Some(0)
        })
    );
    assert_eq!(
        advertised_rates(&got.headers),
        (Some(AdvertisedRate::Unlimited), None)
    );
}

#[tokio::test]
async fn usage_cap_402_per_four_hour_window() {
    let emu = ChutesEmulator::start(ChutesConfig {
        requests_per_minute: 1_000,
        usage_cap_per_window: Some(2),
        ..config()
    })
    .await;
    let c = client();
    assert_eq!(chat(&c, &emu, "m").await.status, 200);
    assert_eq!(chat(&c, &emu, "m").await.status, 200);
    let capped = chat(&c, &emu, "m").await;
    assert_eq!(capped.status, 402);
    assert_eq!(classify_402(&capped.body), Kind402::UsageCap);
    // Noon's window ends at 16:00 UTC.
    emu.advance(Duration::from_secs(4 * 3_600));
    assert_eq!(chat(&c, &emu, "m").await.status, 200);
}

#[tokio::test]
async fn completions_are_openai_shaped_json_and_sse() {
    let emu = ChutesEmulator::start(config()).await;
    let c = client();
    let got = chat(&c, &emu, "deepseek-ai/DeepSeek-V3").await;
    assert_eq!(got.header("content-type"), Some("application/json"));
    let v = got.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "deepseek-ai/DeepSeek-V3");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    let got = chat_body(&c, &emu, r#"{"model":"m","stream":true}"#).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("text/event-stream"));
    let text = got.text();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("every event is data"))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let content: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<serde_json::Value>(e).expect("chunk json"))
        .inspect(|c| assert_eq!(c["object"], "chat.completion.chunk"))
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(content, "ok");

    // No model: the application's 400, after the edge (it used the window).
    let got = chat_body(&c, &emu, "not json").await;
    assert_eq!(got.status, 400);
    assert_eq!(emu.stats().edge_passed, 3);
}

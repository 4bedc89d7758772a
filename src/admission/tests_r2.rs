//! Unit tests of revision 2's budget rules under paused tokio time: caps taken at grant,
//! gates scoped to a model, the upstream's quota and rate headers, the usage cap, costs,
//! give-backs (midnight included), reload and shutdown. No sockets, no real sleeping.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::tests::{admission, admission_at, per_day, sent, settings, settle, DEFAULT, NOON, ROW1};
use super::*;
use crate::config::BeyondQuota;
use crate::response::Reason;
use crate::signals::{AdvertisedRate, ChutesQuota, Scope429};

fn with_client(mut s: Settings, rpm: Option<u32>, per_day: Option<u64>) -> Settings {
    s.clients.push(ClientSettings {
        name: Arc::from("bot"),
        weight: 1,
        requests_per_minute: rpm,
        burst: 1,
        requests_per_day: per_day,
        max_wait: None,
    });
    s
}

fn ask(client: ClientId, model: Option<&str>, wait: Duration) -> Ask {
    Ask {
        model: model.map(Arc::from),
        ..Ask::new(client, wait)
    }
}

fn spawn_admit(
    a: &Arc<Admission>,
    ask: Ask,
) -> tokio::task::JoinHandle<(Result<Permit, Rejection>, Instant)> {
    let a = Arc::clone(a);
    tokio::spawn(async move {
        let r = a.admit(ask).await;
        (r, Instant::now())
    })
}

pub(super) fn account_429() -> Outcome {
    Outcome::RateLimited {
        scope: Scope429::Account,
        hint: None,
        status: 429,
        headers: vec![],
        body: String::new(),
    }
}

pub(super) fn capacity_429() -> Outcome {
    Outcome::RateLimited {
        scope: Scope429::Model,
        hint: None,
        status: 429,
        headers: vec![],
        body: r#"{"detail":"Infrastructure is at maximum capacity, try again later"}"#.into(),
    }
}

/// The issue's first case: ten queued requests of a client whose daily cap is 3 — exactly
/// three are granted, the rest are answered with the client's reason, none reaches beyond.
#[tokio::test(start_paused = true)]
async fn a_clients_daily_cap_holds_for_requests_that_queued() {
    // The account spaces requests 1 s apart, so all ten queue.
    let a = admission(with_client(settings(60, 1), None, Some(3)));
    let hs: Vec<_> = (0..10)
        .map(|_| spawn_admit(&a, ask(ROW1, None, Duration::from_secs(60))))
        .collect();
    let mut granted = 0;
    let mut shed = 0;
    for h in hs {
        match h.await.unwrap().0 {
            Ok(p) => {
                granted += 1;
                drop(sent(p));
            }
            Err(r) => {
                assert_eq!(r.reason, Reason::ClientDailyQuotaExhausted, "{r:?}");
                assert_eq!(r.client.as_deref(), Some("bot"));
                shed += 1;
            }
        }
    }
    assert_eq!((granted, shed), (3, 7));
    let snap = a.snapshot();
    assert_eq!(snap.clients[1].used_today, 3);
    assert_eq!(snap.used_today, 3);
}

/// The issue's second case: a client's own rate is waited for while the account cools down,
/// instead of shedding every request at once.
#[tokio::test(start_paused = true)]
async fn a_clients_own_rate_is_waited_for_not_shed() {
    let mut s = with_client(settings(60_000, 100), Some(30), None);
    s.cooldown.initial = Duration::from_secs(2);
    let a = admission(s);
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.report(account_429());
    drop(p);
    let start = Instant::now();
    let hs: Vec<_> = (0..4)
        .map(|_| spawn_admit(&a, ask(ROW1, None, Duration::from_secs(30))))
        .collect();
    settle().await;
    let mut times = Vec::new();
    for (i, h) in hs.into_iter().enumerate() {
        let (r, at) = h.await.unwrap();
        let mut p = sent(r.unwrap_or_else(|e| panic!("request {i} shed: {e:?}")));
        if p.is_probe() {
            p.report(Outcome::Success { exhausted: None });
        }
        drop(p);
        times.push((at - start).as_secs());
    }
    // The cooldown (2 s), then the client's own spacing of 2 s.
    assert_eq!(times, vec![2, 4, 6, 8]);
}

/// A client waiting for its own rate does not hold up another client's requests.
#[tokio::test(start_paused = true)]
async fn a_client_waiting_for_its_rate_holds_up_nobody_else() {
    let a = admission(with_client(settings(60_000, 100), Some(1), None));
    drop(sent(a.acquire(ROW1, Duration::ZERO).await.unwrap()));
    // bot's next request conforms in 60 s; it waits for that.
    let slow = spawn_admit(&a, ask(ROW1, None, Duration::from_secs(120)));
    settle().await;
    assert_eq!(a.snapshot().queue_depth, 1);
    let start = Instant::now();
    let other = a.acquire(DEFAULT, Duration::from_secs(5)).await.unwrap();
    assert_eq!(Instant::now(), start, "the default client went at once");
    drop(sent(other));
    let (r, at) = slow.await.unwrap();
    drop(sent(r.unwrap()));
    assert_eq!(at - start, Duration::from_secs(60));
}

/// A shed or abandoned request of a capped client consumes nothing of its caps.
#[tokio::test(start_paused = true)]
async fn abandoned_requests_cost_their_client_nothing() {
    let a = admission(with_client(settings(60, 1), Some(60), Some(2)));
    drop(sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap()));
    // Queued behind the account's spacing, then abandoned.
    let h = spawn_admit(&a, ask(ROW1, None, Duration::from_secs(30)));
    settle().await;
    h.abort();
    settle().await;
    // Shed for the account's reason (cannot wait).
    assert!(a.admit(ask(ROW1, None, Duration::ZERO)).await.is_err());
    let snap = a.snapshot();
    assert_eq!(snap.clients[1].used_today, 0);
    assert_eq!(snap.queue_depth, 0);
    tokio::time::advance(Duration::from_secs(1)).await;
    // Both of its daily units and its rate are still there.
    drop(sent(
        a.admit(ask(ROW1, None, Duration::ZERO)).await.unwrap(),
    ));
    tokio::time::advance(Duration::from_secs(1)).await;
    drop(sent(
        a.admit(ask(ROW1, None, Duration::ZERO)).await.unwrap(),
    ));
    assert_eq!(a.snapshot().clients[1].used_today, 2);
}

/// A permit given back unsent returns its client's rate too, so the next request may go at
/// once; and a permit that outlives midnight gives back to the day that counted it.
#[tokio::test(start_paused = true)]
async fn an_unsent_permit_gives_back_to_its_own_day() {
    // 23:59:59 UTC.
    let a = admission_at(
        with_client(settings(60_000, 100), Some(1), Some(10)),
        1_795_478_399.0,
    );
    let p = a.admit(ask(ROW1, None, Duration::ZERO)).await.unwrap();
    drop(p);
    // Given back: the client's rate and day are whole again.
    let p = a.admit(ask(ROW1, None, Duration::ZERO)).await.unwrap();
    assert_eq!(a.snapshot().clients[1].used_today, 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    // Midnight passed with the permit unsent: today's counts stay at zero.
    drop(p);
    let snap = a.snapshot();
    assert_eq!((snap.used_today, snap.clients[1].used_today), (0, 0));
}

/// A capacity 429 cools only its model; other models pass, the model's waiters wait for a
/// single probe, and those that cannot wait are told `model_cooldown` at once.
#[tokio::test(start_paused = true)]
async fn a_capacity_429_cools_only_its_model() {
    let a = admission(settings(60_000, 100));
    let mut p = sent(
        a.admit(ask(DEFAULT, Some("big"), Duration::ZERO))
            .await
            .unwrap(),
    );
    let d = p.report(capacity_429()).expect("a model cooldown");
    assert_eq!(d.model.as_deref(), Some("big"));
    assert_eq!(d.duration, Duration::from_secs(5));
    drop(p);
    // The account is open: another model goes at once, and so does a request without one.
    drop(sent(
        a.admit(ask(DEFAULT, Some("small"), Duration::ZERO))
            .await
            .unwrap(),
    ));
    drop(sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap()));
    let r = a
        .admit(ask(DEFAULT, Some("big"), Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::ModelCooldown);
    assert_eq!(r.model.as_deref(), Some("big"));
    assert_eq!(r.retry_after, Some(Duration::from_secs(5)));
    // Two that can wait: the first is the model's probe, the second waits for its answer,
    // and meanwhile the other model is served.
    let start = Instant::now();
    let first = spawn_admit(&a, ask(DEFAULT, Some("big"), Duration::from_secs(30)));
    settle().await;
    let second = spawn_admit(&a, ask(DEFAULT, Some("big"), Duration::from_secs(30)));
    settle().await;
    drop(sent(
        a.admit(ask(DEFAULT, Some("small"), Duration::ZERO))
            .await
            .unwrap(),
    ));
    let (r, at) = first.await.unwrap();
    let mut probe = sent(r.unwrap());
    assert!(probe.is_probe());
    assert_eq!(at - start, Duration::from_secs(5));
    tokio::time::advance(Duration::from_secs(3)).await;
    settle().await;
    assert_eq!(
        a.snapshot().queue_depth,
        1,
        "the second waits for the probe"
    );
    probe.report(Outcome::Success { exhausted: None });
    let (r, _) = second.await.unwrap();
    assert!(!r.unwrap().is_probe());
    let snap = a.snapshot();
    assert!(snap.models.iter().all(|m| m.cooling_until_unix.is_none()));
    assert!(!snap.cooldown_active, "the account never paused");
}

/// Capacity 429s in a row grow the model's cooldown up to `cooldown.model_max`.
#[tokio::test(start_paused = true)]
async fn repeated_capacity_429s_grow_the_models_cooldown() {
    let a = admission(settings(60_000, 100));
    let mut seen = Vec::new();
    for _ in 0..7 {
        let mut p = sent(
            a.admit(ask(DEFAULT, Some("big"), Duration::from_secs(600)))
                .await
                .unwrap(),
        );
        seen.push(p.report(capacity_429()).unwrap().duration.as_secs());
    }
    assert_eq!(seen, vec![5, 10, 20, 40, 80, 120, 120]);
}

/// Chutes' quota headers: Used raises the day's count, Total sets the cap in force,
/// Remaining at the request's cost closes the gate before any 402, Total 0 is no gate, and
/// a different Total is that model's own quota.
#[tokio::test(start_paused = true)]
async fn quota_headers_raise_the_count_and_close_the_gate() {
    let a = admission(settings(60_000, 100));
    let quota = |total, used| Observed {
        quota: Some(ChutesQuota {
            total,
            used,
            remaining: Some(total.saturating_sub(used)),
        }),
        ..Observed::default()
    };
    let p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.observe(&quota(300, 120));
    drop(p);
    let snap = a.snapshot();
    assert_eq!(snap.used_today, 121, "Used before the call, plus this call");
    assert_eq!(snap.requests_per_day, Some(300));
    // A lower Used never lowers the count.
    let p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.observe(&quota(300, 5));
    drop(p);
    assert_eq!(a.snapshot().used_today, 122);
    // Another Total is one model's own quota: spent, it gates that model only.
    let p = sent(
        a.admit(ask(DEFAULT, Some("tee"), Duration::ZERO))
            .await
            .unwrap(),
    );
    p.observe(&quota(50, 50));
    drop(p);
    let r = a
        .admit(ask(DEFAULT, Some("tee"), Duration::ZERO))
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::DailyQuotaExhausted);
    assert_eq!(r.model.as_deref(), Some("tee"));
    drop(sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap()));
    // The account's quota spent: the gate closes until the reset.
    let p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.observe(&quota(300, 299));
    drop(p);
    let r = a.acquire(DEFAULT, Duration::ZERO).await.unwrap_err();
    assert_eq!(r.reason, Reason::DailyQuotaExhausted);
    assert_eq!(r.retry_after, Some(Duration::from_secs(12 * 3600)));
}

#[tokio::test(start_paused = true)]
async fn a_pay_as_you_go_account_is_not_gated_and_continue_is_honoured() {
    let mut s = settings(60_000, 100);
    let a = admission(s.clone());
    let p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.observe(&Observed {
        quota: Some(ChutesQuota {
            total: 0,
            used: 0,
            remaining: Some(0),
        }),
        ..Observed::default()
    });
    drop(p);
    assert!(a.acquire(DEFAULT, Duration::ZERO).await.is_ok());
    assert_eq!(a.snapshot().requests_per_day, None);
    // beyond_quota = "continue": a spent plan does not stop the proxy.
    s.limits.beyond_quota = BeyondQuota::Continue;
    let a = admission(s);
    let p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.observe(&Observed {
        quota: Some(ChutesQuota {
            total: 10,
            used: 10,
            remaining: Some(0),
        }),
        ..Observed::default()
    });
    drop(p);
    assert!(a.acquire(DEFAULT, Duration::ZERO).await.is_ok());
}

/// X-Chutes-RL-User below the configured rate lowers the rate in force at once, without a
/// fresh burst; `inf` and higher figures never raise it above the configured one.
#[tokio::test(start_paused = true)]
async fn an_advertised_rate_lowers_the_rate_without_a_burst() {
    let a = admission(settings(60, 5));
    let p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.observe(&Observed {
        rl_user: Some(AdvertisedRate::PerMinute(NonZeroU32::new(30).unwrap())),
        ..Observed::default()
    });
    drop(p);
    let snap = a.snapshot();
    assert_eq!(snap.requests_per_minute, 30);
    assert_eq!(a.settings().limits.requests_per_minute.get(), 60);
    // Four tokens were left in the old bucket; none of them survives as a burst.
    assert!(a.acquire(DEFAULT, Duration::ZERO).await.is_err());
    let start = Instant::now();
    let mut at = Vec::new();
    for _ in 0..3 {
        drop(sent(
            a.acquire(DEFAULT, Duration::from_secs(60)).await.unwrap(),
        ));
        at.push((Instant::now() - start).as_millis());
    }
    // The new spacing of 2 s from the change on: the old bucket's four tokens are gone.
    assert_eq!(at, vec![2000, 4000, 6000]);
    let p = sent(a.acquire(DEFAULT, Duration::from_secs(60)).await.unwrap());
    p.observe(&Observed {
        rl_user: Some(AdvertisedRate::Unlimited),
        ..Observed::default()
    });
    drop(p);
    assert_eq!(a.snapshot().requests_per_minute, 60);
}

/// A model's own advertised rate caps that model only.
#[tokio::test(start_paused = true)]
async fn a_models_advertised_rate_caps_that_model() {
    let a = admission(settings(60_000, 100));
    let p = sent(
        a.admit(ask(DEFAULT, Some("m"), Duration::ZERO))
            .await
            .unwrap(),
    );
    p.observe(&Observed {
        rl_chute: Some(AdvertisedRate::PerMinute(NonZeroU32::new(6).unwrap())),
        ..Observed::default()
    });
    drop(p);
    drop(sent(
        a.admit(ask(DEFAULT, Some("m"), Duration::ZERO))
            .await
            .unwrap(),
    ));
    let r = a
        .admit(ask(DEFAULT, Some("m"), Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::ModelCooldown);
    drop(sent(
        a.admit(ask(DEFAULT, Some("other"), Duration::ZERO))
            .await
            .unwrap(),
    ));
    let start = Instant::now();
    drop(sent(
        a.admit(ask(DEFAULT, Some("m"), Duration::from_secs(20)))
            .await
            .unwrap(),
    ));
    assert_eq!(Instant::now() - start, Duration::from_secs(10));
}

/// A usage-cap 402 closes the account until the next fixed 4-hour UTC window.
#[tokio::test(start_paused = true)]
async fn a_usage_cap_gates_until_the_next_window() {
    // 13:00 UTC: the next window starts at 16:00.
    let a = admission_at(settings(60_000, 100), NOON + 3600.0);
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.report(Outcome::UsageCap);
    drop(p);
    let r = a
        .acquire(DEFAULT, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::UsageCapExhausted);
    assert_eq!(r.retry_after, Some(Duration::from_secs(3 * 3600)));
    assert!(a.snapshot().usage_cap_until_unix.is_some());
    tokio::time::advance(Duration::from_secs(3 * 3600)).await;
    assert!(a.acquire(DEFAULT, Duration::ZERO).await.is_ok());
}

/// A request's cost counts against both daily caps, and a request that does not fit today
/// is shed while a cheaper one still fits.
#[tokio::test(start_paused = true)]
async fn costs_count_in_daily_units() {
    let mut s = settings(60_000, 100);
    s.limits.requests_per_day = per_day(5);
    let a = admission(s);
    let big = |w| Ask {
        cost: 2,
        ..ask(DEFAULT, Some("turbo"), w)
    };
    drop(sent(a.admit(big(Duration::ZERO)).await.unwrap()));
    drop(sent(a.admit(big(Duration::ZERO)).await.unwrap()));
    assert_eq!(a.snapshot().used_today, 4);
    let r = a.admit(big(Duration::ZERO)).await.unwrap_err();
    assert_eq!(r.reason, Reason::DailyQuotaExhausted);
    drop(sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap()));
    assert_eq!(a.snapshot().remaining_today, Some(0));
}

/// Shutdown: a queued request whose turn comes after the grace is answered at once; one
/// still queued when the grace ends is answered then; none is left without an answer.
#[tokio::test(start_paused = true)]
async fn shutdown_answers_every_queued_request() {
    // One request every 5 s; four queued behind the first.
    let a = admission(settings(12, 1));
    drop(sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap()));
    let hs: Vec<_> = (0..4)
        .map(|_| spawn_admit(&a, ask(DEFAULT, None, Duration::from_secs(60))))
        .collect();
    settle().await;
    let start = Instant::now();
    a.shutdown(start + Duration::from_secs(8));
    let mut out = Vec::new();
    for h in hs {
        let (r, at) = h.await.unwrap();
        out.push((
            r.map(sent).map(|_| ()).map_err(|e| e.reason),
            (at - start).as_secs(),
        ));
    }
    // Due at 5 s: served. Due at 10, 15, 20 s: past the 8 s grace, answered at once.
    assert_eq!(
        out,
        vec![
            (Ok(()), 5),
            (Err(Reason::ShuttingDown), 0),
            (Err(Reason::ShuttingDown), 0),
            (Err(Reason::ShuttingDown), 0),
        ]
    );
}

/// A reload lowers the rate at once, keeping the queue and granting no fresh burst.
#[tokio::test(start_paused = true)]
async fn reconfigure_keeps_the_queue_and_grants_no_burst() {
    let s = settings(60, 3);
    let a = admission(s.clone());
    for _ in 0..3 {
        drop(sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap()));
    }
    let waiter = spawn_admit(&a, ask(DEFAULT, None, Duration::from_secs(60)));
    settle().await;
    let start = Instant::now();
    let mut lower = s.clone();
    lower.limits.requests_per_minute = NonZeroU32::new(20).unwrap();
    a.reconfigure(lower);
    assert_eq!(a.snapshot().queue_depth, 1);
    let (r, at) = waiter.await.unwrap();
    drop(sent(r.unwrap()));
    // The new spacing (3 s) applies at once; the old bucket's next token (1 s) is no
    // earlier a grant.
    assert_eq!((at - start).as_millis(), 3000);
    // And goes on: one every 3 s, no burst.
    let t = Instant::now();
    drop(sent(
        a.acquire(DEFAULT, Duration::from_secs(60)).await.unwrap(),
    ));
    assert_eq!(Instant::now() - t, Duration::from_secs(3));
    assert_eq!(a.snapshot().requests_per_minute, 20);
}

/// A retried request queues ahead of everyone and is the probe when the cooldown ends.
#[tokio::test(start_paused = true)]
async fn a_retry_is_the_probe_after_the_cooldown() {
    let mut s = settings(60_000, 100);
    s.cooldown.initial = Duration::from_secs(3);
    let a = admission(s);
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.report(account_429());
    drop(p);
    let others: Vec<_> = (0..3)
        .map(|_| spawn_admit(&a, ask(DEFAULT, None, Duration::from_secs(30))))
        .collect();
    settle().await;
    let retried = spawn_admit(
        &a,
        Ask {
            retry: true,
            ..ask(DEFAULT, None, Duration::from_secs(30))
        },
    );
    let (r, _) = retried.await.unwrap();
    let mut probe = sent(r.unwrap());
    assert!(probe.is_probe(), "the retried request is the probe");
    probe.report(Outcome::Success { exhausted: None });
    for h in others {
        assert!(!h.await.unwrap().0.unwrap().is_probe());
    }
}

/// After an upstream 402 with its own reset, every view gives that one instant: the
/// rejection's Retry-After, its `limits.day_resets_at` and `/status`'s reset (issue 18).
#[tokio::test(start_paused = true)]
async fn one_reset_instant_after_a_quota_402() {
    let a = admission(settings(60_000, 100));
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.report(Outcome::QuotaExceeded {
        reset_unix: Some(NOON + 53.0),
    });
    drop(p);
    let r = a.acquire(DEFAULT, Duration::ZERO).await.unwrap_err();
    assert_eq!(r.reason, Reason::DailyQuotaExhausted);
    assert_eq!(r.retry_after, Some(Duration::from_secs(53)));
    let at = (NOON + 53.0) as i64;
    assert_eq!(r.limits.unwrap().day_resets_at_unix, at);
    assert_eq!(a.snapshot().day_resets_at_unix, at);
    tokio::time::advance(Duration::from_secs(53)).await;
    assert!(a.acquire(DEFAULT, Duration::ZERO).await.is_ok());
    assert_ne!(
        a.snapshot().day_resets_at_unix,
        at,
        "back to the quota day's end"
    );
}

/// `/status` names what limits a new request right now and how long it would wait.
#[tokio::test(start_paused = true)]
async fn the_snapshot_says_what_limits_a_new_request() {
    let mut s = settings(60, 1);
    s.cooldown.initial = Duration::from_secs(10);
    let a = admission(s);
    assert_eq!(a.snapshot().limited_by, None);
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    let snap = a.snapshot();
    assert_eq!(snap.limited_by, Some("account_rate"));
    assert_eq!(snap.new_request_wait, Duration::from_secs(1));
    p.report(account_429());
    drop(p);
    let snap = a.snapshot();
    assert_eq!(snap.limited_by, Some("upstream_cooldown"));
    assert_eq!(snap.new_request_wait, Duration::from_secs(10));
    tokio::time::advance(Duration::from_secs(10)).await;
    // The cooldown is over: the next request is the probe, and the snapshot says so.
    let snap = a.snapshot();
    assert_eq!(snap.gate, Probe::Ready);
    assert_eq!(snap.limited_by, None);
}

/// The account's probe answered by a capacity 429 (its model at capacity) reopens the
/// account: the account did answer; only that model cools.
#[tokio::test(start_paused = true)]
async fn an_account_probe_answered_by_a_capacity_429_reopens_the_account() {
    let mut s = settings(60_000, 100);
    s.cooldown.initial = Duration::from_secs(2);
    let a = admission(s);
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.report(account_429());
    drop(p);
    let (r, _) = spawn_admit(&a, ask(DEFAULT, Some("big"), Duration::from_secs(30)))
        .await
        .unwrap();
    let mut probe = sent(r.unwrap());
    assert!(probe.is_probe());
    probe.report(capacity_429());
    drop(probe);
    assert_eq!(a.snapshot().gate, Probe::Open);
    // Another model goes at once; the busy one cools.
    assert!(a
        .admit(ask(DEFAULT, Some("small"), Duration::ZERO))
        .await
        .is_ok());
    let r = a
        .admit(ask(DEFAULT, Some("big"), Duration::ZERO))
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::ModelCooldown);
}

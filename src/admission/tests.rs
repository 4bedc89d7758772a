//! Unit tests of the budget under paused tokio time: the bucket, the queue, the daily cap, the
//! concurrency cap, the cooldown gate and the reservation scheme, with no sockets and no real
//! sleeping. `tokio::time::advance` and auto-advance drive every timer deterministically.

use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::config::{Config, Overrides};
use crate::response::Reason;
use crate::signals::Scope429;

/// The table's first row, `default`: every test's client unless it says otherwise.
pub(super) const DEFAULT: ClientId = DEFAULT_CLIENT;
/// The rows a test adds after `default` (`s.clients.push`), in order.
pub(super) const ROW1: ClientId = ClientId::test_row(1);
pub(super) const ROW2: ClientId = ClientId::test_row(2);

/// The budget's settings as the config's defaults give them, but for the rate and burst,
/// 100 concurrent requests, no daily cap, no state file and only the `default` client.
pub(super) fn settings(rpm: u32, burst: u32) -> Settings {
    let text = format!(
        "[limits]\nrequests_per_minute = {rpm}\nburst = {burst}\nmax_concurrent = 100\n\
         [state]\npath = \"\"\n"
    );
    let c = Config::from_toml(&text, &Overrides::default(), &|_: &str| None).unwrap();
    let s = Settings::from_config(&c);
    assert!(!s.durable && s.limits.requests_per_day.is_none() && s.clients.len() == 1);
    s
}

/// `limits.requests_per_day`, as a test writes it.
pub(super) fn per_day(n: u64) -> Option<NonZeroU64> {
    NonZeroU64::new(n)
}

/// 2026-11-23T12:00:00Z
pub(super) const NOON: f64 = 1_795_435_200.0;

pub(super) fn admission(s: Settings) -> Arc<Admission> {
    Arc::new(Admission::new(
        s,
        WallClock::pinned(NOON),
        Persisted::default(),
        None,
    ))
}

pub(super) fn admission_at(s: Settings, unix: f64) -> Arc<Admission> {
    Arc::new(Admission::new(
        s,
        WallClock::pinned(unix),
        Persisted::default(),
        None,
    ))
}

/// Start an acquire in the background; returns its handle. The request's arrival happens
/// when the task first runs, so callers `yield_now` to fix arrival order.
fn spawn_acquire(
    a: &Arc<Admission>,
    client: ClientId,
    wait: Duration,
) -> tokio::task::JoinHandle<(Result<Permit, Rejection>, Instant)> {
    let a = Arc::clone(a);
    tokio::spawn(async move {
        let r = a.acquire(client, wait).await;
        (r, Instant::now())
    })
}

pub(super) async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

pub(super) fn sent(mut p: Permit) -> Permit {
    p.mark_sent();
    p
}

#[tokio::test(start_paused = true)]
async fn burst_then_even_spacing() {
    // 60/min = one per second, burst 3.
    let a = admission(settings(60, 3));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..8 {
        handles.push(spawn_acquire(&a, DEFAULT, Duration::from_secs(60)));
        settle().await;
    }
    let mut times = Vec::new();
    for h in handles {
        let (r, at) = h.await.unwrap();
        drop(sent(r.expect("admitted")));
        times.push((at - start).as_millis());
    }
    // Three at once, then one per second.
    assert_eq!(times, vec![0, 0, 0, 1000, 2000, 3000, 4000, 5000]);
}

#[tokio::test(start_paused = true)]
async fn no_window_ever_exceeds_burst_plus_rate() {
    // 600/min = every 100ms, burst 5; 200 requests from 20 tasks hammering.
    let a = admission(settings(600, 5));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..20 {
        let a = Arc::clone(&a);
        handles.push(tokio::spawn(async move {
            let mut at = Vec::new();
            for _ in 0..10 {
                let p = a
                    .acquire(DEFAULT, Duration::from_secs(600))
                    .await
                    .expect("admitted");
                at.push(Instant::now());
                drop(sent(p));
            }
            at
        }));
    }
    let mut all: Vec<Instant> = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort();
    assert_eq!(all.len(), 200);
    // For every window [t, t+w], count <= burst + w/spacing.
    for w_ms in [0u64, 100, 250, 1000, 5000] {
        let w = Duration::from_millis(w_ms);
        let max_allowed = 5 + (w_ms / 100) as usize;
        for (i, &t) in all.iter().enumerate() {
            let n = all[i..].iter().take_while(|&&x| x <= t + w).count();
            assert!(
                n <= max_allowed,
                "{n} requests within {w_ms}ms (allowed {max_allowed})"
            );
        }
    }
    // And the rate is used fully: 200 requests take (200 - 5) spacings.
    let span = *all.last().unwrap() - start;
    assert_eq!(span, Duration::from_millis(195 * 100));
}

#[tokio::test(start_paused = true)]
async fn fifo_under_contention() {
    let a = admission(settings(60, 1));
    let _first = a.acquire(DEFAULT, Duration::ZERO).await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for i in 0..15 {
        let a = Arc::clone(&a);
        let order = Arc::clone(&order);
        handles.push(tokio::spawn(async move {
            let p = a.acquire(DEFAULT, Duration::from_secs(60)).await.unwrap();
            order.lock().unwrap().push(i);
            drop(sent(p));
        }));
        settle().await;
    }
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..15).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn a_newcomer_never_overtakes_a_waiter() {
    let a = admission(settings(60, 1));
    let _first = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    let waiter = spawn_acquire(&a, DEFAULT, Duration::from_secs(10));
    settle().await;
    // Just as the token arrives, a newcomer shows up: it must queue behind the waiter.
    tokio::time::advance(Duration::from_millis(999)).await;
    let newcomer = spawn_acquire(&a, DEFAULT, Duration::from_secs(10));
    let (w, w_at) = waiter.await.unwrap();
    let (n, n_at) = newcomer.await.unwrap();
    assert!(w.is_ok() && n.is_ok());
    assert!(w_at < n_at, "the waiter was served first");
}

#[tokio::test(start_paused = true)]
async fn predictive_shedding_with_a_truthful_retry_after() {
    // One per second, burst 1, wait limit 5s.
    let a = admission(settings(60, 1));
    let _first = a.acquire(DEFAULT, Duration::ZERO).await.unwrap();
    let mut waiters = Vec::new();
    for _ in 0..4 {
        waiters.push(spawn_acquire(&a, DEFAULT, Duration::from_secs(5)));
        settle().await;
    }
    // Fifth in line would get its token at 5s: within 5s is allowed...
    let ok = spawn_acquire(&a, DEFAULT, Duration::from_secs(5));
    settle().await;
    assert_eq!(a.snapshot().queue_depth, 5);
    // ...the sixth at 6s: shed now, told to come back in 6s, not after waiting 5s for nothing.
    let before = Instant::now();
    let r = a
        .acquire(DEFAULT, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(Instant::now(), before, "shed without waiting");
    assert_eq!(r.reason, Reason::QueueTimeout);
    assert_eq!(r.retry_after, Some(Duration::from_secs(6)));
    assert_eq!(r.limits.as_ref().unwrap().used_today, 1);
    for w in waiters {
        assert!(w.await.unwrap().0.is_ok());
    }
    let (r, at) = ok.await.unwrap();
    assert!(r.is_ok());
    assert_eq!(at - before, Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn zero_wait_never_queues() {
    let a = admission(settings(60, 1));
    let _p = a.acquire(DEFAULT, Duration::ZERO).await.unwrap();
    let r = a.acquire(DEFAULT, Duration::ZERO).await.unwrap_err();
    assert_eq!(r.reason, Reason::QueueTimeout);
    assert_eq!(r.retry_after, Some(Duration::from_secs(1)));
    assert_eq!(a.snapshot().queue_depth, 0);
}

#[tokio::test(start_paused = true)]
async fn waiting_past_the_deadline_is_a_queue_timeout_at_the_deadline() {
    // A concurrency wait cannot be predicted: the request queues and times out at its deadline.
    let mut s = settings(6000, 10);
    s.limits.max_concurrent = 1;
    let a = admission(s);
    let _held = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    let start = Instant::now();
    let r = a
        .acquire(DEFAULT, Duration::from_secs(3))
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::QueueTimeout);
    assert_eq!(Instant::now() - start, Duration::from_secs(3));
    assert_eq!(a.snapshot().queue_depth, 0);
    assert_eq!(
        a.snapshot().used_today,
        1,
        "the timed-out request consumed nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn abandoning_the_queue_consumes_nothing_and_frees_the_place() {
    let a = admission(settings(60, 1));
    let first = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    let leaver = spawn_acquire(&a, DEFAULT, Duration::from_secs(30));
    settle().await;
    let stayer = spawn_acquire(&a, DEFAULT, Duration::from_secs(30));
    settle().await;
    assert_eq!(a.snapshot().queue_depth, 2);
    leaver.abort();
    settle().await;
    assert_eq!(a.snapshot().queue_depth, 1);
    let start = Instant::now();
    let (r, at) = stayer.await.unwrap();
    drop(sent(r.unwrap()));
    // The stayer took the leaver's place: first token, one spacing after the first request.
    assert_eq!(at - start, Duration::from_secs(1));
    drop(first);
    let s = a.snapshot();
    assert_eq!((s.queue_depth, s.in_flight, s.used_today), (0, 0, 2));
}

#[tokio::test(start_paused = true)]
async fn queue_full_is_shed_at_once() {
    let mut s = settings(60, 1);
    s.queue.max_depth = 2;
    let a = admission(s);
    let _first = a.acquire(DEFAULT, Duration::ZERO).await.unwrap();
    let _w1 = spawn_acquire(&a, DEFAULT, Duration::from_secs(30));
    let _w2 = spawn_acquire(&a, DEFAULT, Duration::from_secs(30));
    settle().await;
    let r = a
        .acquire(DEFAULT, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::QueueFull);
    // The queue drains in 2 more spacings (its two waiters), then there is a slot.
    assert_eq!(r.retry_after, Some(Duration::from_secs(2)));
}

#[tokio::test(start_paused = true)]
async fn concurrency_slot_is_held_by_the_permit() {
    let mut s = settings(60_000, 100);
    s.limits.max_concurrent = 2;
    let a = admission(s);
    let p1 = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    let _p2 = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    let w = spawn_acquire(&a, DEFAULT, Duration::from_secs(30));
    settle().await;
    assert_eq!(a.snapshot().queue_depth, 1);
    assert_eq!(a.snapshot().in_flight, 2);
    drop(p1);
    let (r, _) = w.await.unwrap();
    assert!(r.is_ok());
    assert_eq!(a.snapshot().in_flight, 2);
}

#[tokio::test(start_paused = true)]
async fn a_permit_never_sent_gives_the_daily_count_back() {
    let mut s = settings(60_000, 100);
    s.limits.requests_per_day = per_day(10);
    let a = admission(s);
    let p = a.acquire(DEFAULT, Duration::ZERO).await.unwrap();
    assert_eq!(a.snapshot().used_today, 1);
    drop(p);
    assert_eq!(a.snapshot().used_today, 0);
    drop(sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap()));
    assert_eq!(a.snapshot().used_today, 1);
}

#[tokio::test(start_paused = true)]
async fn daily_cap_sheds_until_the_reset_instant() {
    let mut s = settings(60_000, 100);
    s.limits.requests_per_day = per_day(3);
    // 23:59:58 UTC: the quota day ends in 2 seconds.
    let a = admission_at(s, 1_795_478_398.0);
    for _ in 0..3 {
        drop(sent(
            a.acquire(DEFAULT, Duration::from_secs(1)).await.unwrap(),
        ));
    }
    let r = a
        .acquire(DEFAULT, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::DailyQuotaExhausted);
    assert_eq!(r.retry_after, Some(Duration::from_secs(2)));
    assert_eq!(r.limits.as_ref().unwrap().remaining_today, Some(0));
    // A request willing to wait past the reset queues and goes at midnight.
    let start = Instant::now();
    let p = a.acquire(DEFAULT, Duration::from_secs(5)).await.unwrap();
    assert_eq!(Instant::now() - start, Duration::from_secs(2));
    drop(sent(p));
    let snap = a.snapshot();
    assert_eq!(snap.used_today, 1);
    assert_eq!(snap.day_resets_at_unix, 1_795_478_400 + 86_400);
}

#[tokio::test(start_paused = true)]
async fn day_reset_honours_the_configured_offset() {
    let mut s = settings(60_000, 100);
    s.limits.requests_per_day = per_day(1);
    s.limits.day_reset_offset = 6 * 3600; // 06:00 UTC
    let a = admission(s);
    drop(sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap()));
    let r = a.acquire(DEFAULT, Duration::ZERO).await.unwrap_err();
    // From 12:00 the next 06:00 is 18 hours away.
    assert_eq!(r.retry_after, Some(Duration::from_secs(18 * 3600)));
}

#[tokio::test(start_paused = true)]
async fn cooldown_sheds_short_waiters_and_probes_once() {
    let mut s = settings(60_000, 100);
    s.cooldown.initial = Duration::from_secs(10);
    let a = admission(s);
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    let d = p
        .report(Outcome::RateLimited {
            scope: Scope429::Account,
            hint: None,
            status: 429,
            headers: vec![],
            body: String::new(),
        })
        .unwrap();
    assert_eq!(d.duration, Duration::from_secs(10));
    assert_eq!(d.level, 1);
    drop(p);
    // Cannot wait out the cooldown: shed at once with the time left.
    let r = a
        .acquire(DEFAULT, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::UpstreamCooldown);
    assert_eq!(r.retry_after, Some(Duration::from_secs(10)));
    assert!(r.cooldown_until_unix.is_some());
    // Three waiters that can: the first to go is the probe, the others wait for its answer.
    let start = Instant::now();
    let w: Vec<_> = (0..3)
        .map(|_| spawn_acquire(&a, DEFAULT, Duration::from_secs(30)))
        .collect();
    settle().await;
    let mut w = w.into_iter();
    let (probe, at) = w.next().unwrap().await.unwrap();
    let mut probe = sent(probe.unwrap());
    assert!(probe.is_probe());
    assert_eq!(at - start, Duration::from_secs(10));
    tokio::time::advance(Duration::from_secs(5)).await;
    settle().await;
    assert_eq!(
        a.snapshot().queue_depth,
        2,
        "nobody follows before the probe answers"
    );
    assert_eq!(a.snapshot().gate, Probe::Outstanding);
    probe.report(Outcome::Success { exhausted: None });
    for h in w {
        let (r, _) = h.await.unwrap();
        assert!(!r.unwrap().is_probe());
    }
    assert_eq!(a.snapshot().gate, Probe::Open);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_escalates_and_an_unanswered_one_lets_another_try() {
    let mut s = settings(60_000, 100);
    s.cooldown.initial = Duration::from_secs(10);
    let a = admission(s);
    let rate_limited = || Outcome::RateLimited {
        scope: Scope429::Account,
        hint: None,
        status: 429,
        headers: vec![],
        body: String::new(),
    };
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.report(rate_limited());
    drop(p);
    // The probe's client goes away before the answer: someone else probes.
    let probe = a.acquire(DEFAULT, Duration::from_secs(30)).await.unwrap();
    assert!(probe.is_probe());
    drop(probe);
    let mut probe = sent(a.acquire(DEFAULT, Duration::from_secs(30)).await.unwrap());
    assert!(probe.is_probe());
    // The probe is rate limited too: the next cooldown is twice as long.
    let d = probe.report(rate_limited()).unwrap();
    assert_eq!((d.duration, d.level), (Duration::from_secs(20), 2));
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_429s_in_flight_is_one_episode() {
    let mut s = settings(60_000, 100);
    s.cooldown.initial = Duration::from_secs(10);
    let a = admission(s);
    let mut ps: Vec<_> = Vec::new();
    for _ in 0..3 {
        ps.push(sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap()));
    }
    let levels: Vec<_> = ps
        .iter_mut()
        .map(|p| {
            p.report(Outcome::RateLimited {
                scope: Scope429::Account,
                hint: None,
                status: 429,
                headers: vec![],
                body: String::new(),
            })
            .unwrap()
            .level
        })
        .collect();
    assert_eq!(levels, vec![1, 1, 1]);
}

#[tokio::test(start_paused = true)]
async fn upstream_hints_are_trusted_up_to_the_max() {
    let mut s = settings(60_000, 100);
    s.cooldown.max = Duration::from_secs(600);
    let a = admission(s);
    let cases = [
        (
            Some(Hint::After(Duration::from_secs(42))),
            Duration::from_secs(42),
            false,
        ),
        (
            Some(Hint::After(Duration::from_secs(10 * 365 * 86_400))),
            Duration::from_secs(600),
            true,
        ),
        (
            Some(Hint::Unparseable("retry-after: soon".into())),
            Duration::from_secs(30),
            true,
        ),
    ];
    for (hint, want, noted) in cases {
        // Fresh admission per case so escalation does not interfere.
        let a2 = admission((*a.settings()).clone());
        let mut p = sent(a2.acquire(DEFAULT, Duration::ZERO).await.unwrap());
        let d = p
            .report(Outcome::RateLimited {
                scope: Scope429::Account,
                hint,
                status: 429,
                headers: vec![],
                body: String::new(),
            })
            .unwrap();
        assert_eq!(d.duration, want);
        assert_eq!(d.hint_note.is_some(), noted);
    }
}

#[tokio::test(start_paused = true)]
async fn escalation_decays_after_a_quiet_period() {
    let mut s = settings(60_000, 100);
    s.cooldown.initial = Duration::from_secs(10);
    s.cooldown.decay_after = Duration::from_secs(60);
    let a = admission(s);
    let rl = || Outcome::RateLimited {
        scope: Scope429::Account,
        hint: None,
        status: 429,
        headers: vec![],
        body: String::new(),
    };
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    assert_eq!(p.report(rl()).unwrap().level, 1);
    drop(p);
    let mut probe = sent(a.acquire(DEFAULT, Duration::from_secs(30)).await.unwrap());
    assert_eq!(probe.report(rl()).unwrap().level, 2);
    drop(probe);
    let mut probe = sent(a.acquire(DEFAULT, Duration::from_secs(30)).await.unwrap());
    probe.report(Outcome::Success { exhausted: None });
    drop(probe);
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(a.snapshot().cooldown_level, 0);
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    let d = p.report(rl()).unwrap();
    assert_eq!((d.level, d.duration), (1, Duration::from_secs(10)));
}

#[tokio::test(start_paused = true)]
async fn quota_402_closes_the_daily_gate_until_its_reset() {
    let a = admission(settings(60_000, 100));
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.report(Outcome::QuotaExceeded {
        reset_unix: Some(NOON + 3600.0),
    });
    drop(p);
    let r = a
        .acquire(DEFAULT, Duration::from_secs(20))
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::DailyQuotaExhausted);
    assert_eq!(r.retry_after, Some(Duration::from_secs(3600)));
    // An unbelievable reset falls back to the next day boundary.
    let b = admission(settings(60_000, 100));
    let mut p = sent(b.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.report(Outcome::QuotaExceeded {
        reset_unix: Some(NOON - 10.0),
    });
    drop(p);
    let r = b.acquire(DEFAULT, Duration::ZERO).await.unwrap_err();
    assert_eq!(r.retry_after, Some(Duration::from_secs(12 * 3600)));
}

#[tokio::test(start_paused = true)]
async fn remaining_zero_closes_the_gate_without_escalation() {
    let a = admission(settings(60_000, 100));
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.report(Outcome::Success {
        exhausted: Some(Duration::from_secs(5)),
    });
    drop(p);
    let r = a
        .acquire(DEFAULT, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::UpstreamCooldown);
    assert_eq!(a.snapshot().cooldown_level, 0);
    // After the advertised reset, traffic flows without a probe.
    let p = a.acquire(DEFAULT, Duration::from_secs(10)).await.unwrap();
    assert!(!p.is_probe());
}

#[tokio::test(start_paused = true)]
async fn tokens_mirror_follows_governor() {
    let a = admission(settings(60, 3));
    assert_eq!(a.snapshot().tokens_available, 3);
    let _p1 = a.acquire(DEFAULT, Duration::ZERO).await.unwrap();
    let _p2 = a.acquire(DEFAULT, Duration::ZERO).await.unwrap();
    let s = a.snapshot();
    assert_eq!(s.tokens_available, 1);
    let _p3 = a.acquire(DEFAULT, Duration::ZERO).await.unwrap();
    let s = a.snapshot();
    assert_eq!(
        (s.tokens_available, s.next_token_in),
        (0, Duration::from_secs(1))
    );
    assert!(
        a.acquire(DEFAULT, Duration::ZERO).await.is_err(),
        "governor agrees: empty"
    );
    tokio::time::advance(Duration::from_millis(2500)).await;
    let s = a.snapshot();
    assert_eq!(
        (s.tokens_available, s.next_token_in),
        (2, Duration::from_millis(500))
    );
}

#[tokio::test(start_paused = true)]
async fn weighted_clients_share_a_saturated_budget() {
    // Client 1 (weight 3) and client 2 (weight 1) both flood a 1/s budget.
    let mut s = settings(60, 1);
    s.queue.max_depth = 10_000;
    for (name, weight) in [("heavy", 3), ("light", 1)] {
        s.clients.push(ClientSettings {
            name: Arc::from(name),
            weight,
            requests_per_minute: None,
            burst: 1,
            requests_per_day: None,
            max_wait: None,
        });
    }
    let a = admission(s);
    let served = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for client in [ROW1, ROW2] {
        for _ in 0..60 {
            let a = Arc::clone(&a);
            let served = Arc::clone(&served);
            handles.push(tokio::spawn(async move {
                if let Ok(p) = a.acquire(client, Duration::from_secs(1000)).await {
                    served.lock().unwrap().push(client);
                    drop(sent(p));
                }
            }));
        }
    }
    settle().await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    let first40: Vec<ClientId> = served.lock().unwrap().iter().take(40).copied().collect();
    let heavy = first40.iter().filter(|&&c| c == ROW1).count();
    assert!((29..=31).contains(&heavy), "heavy got {heavy} of 40");
    for h in handles {
        h.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_trickling_client_is_served_promptly_during_a_flood() {
    let mut s = settings(60, 1);
    s.clients.push(ClientSettings {
        name: Arc::from("batch"),
        weight: 1,
        requests_per_minute: None,
        burst: 1,
        requests_per_day: None,
        max_wait: None,
    });
    s.clients.push(ClientSettings {
        name: Arc::from("chat"),
        weight: 1,
        requests_per_minute: None,
        burst: 1,
        requests_per_day: None,
        max_wait: None,
    });
    let a = admission(s);
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(spawn_acquire(&a, ROW1, Duration::from_secs(1000)));
    }
    settle().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let start = Instant::now();
    let (r, at) = spawn_acquire(&a, ROW2, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(r.is_ok());
    assert!(
        at - start <= Duration::from_secs(2),
        "chat waited {:?}",
        at - start
    );
    for h in flood {
        h.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn per_client_caps_are_enforced_inside_the_account_budget() {
    let mut s = settings(60_000, 100);
    s.clients.push(ClientSettings {
        name: Arc::from("bot"),
        weight: 1,
        requests_per_minute: Some(60),
        burst: 2,
        requests_per_day: Some(3),
        max_wait: None,
    });
    let a = admission(s);
    drop(sent(a.acquire(ROW1, Duration::ZERO).await.unwrap()));
    drop(sent(a.acquire(ROW1, Duration::ZERO).await.unwrap()));
    let r = a.acquire(ROW1, Duration::ZERO).await.unwrap_err();
    assert_eq!(r.reason, Reason::ClientRateLimited);
    assert_eq!(r.client.as_deref(), Some("bot"));
    assert_eq!(r.retry_after, Some(Duration::from_secs(1)));
    // The default client is unaffected.
    assert!(a.acquire(DEFAULT, Duration::ZERO).await.is_ok());
    tokio::time::advance(Duration::from_secs(1)).await;
    drop(sent(a.acquire(ROW1, Duration::ZERO).await.unwrap()));
    tokio::time::advance(Duration::from_secs(1)).await;
    let r = a.acquire(ROW1, Duration::ZERO).await.unwrap_err();
    assert_eq!(r.reason, Reason::ClientDailyQuotaExhausted);
}

/// The reservation scheme: whatever was granted is covered on disk before it is granted, so
/// a crash at any moment restarts with a count at least as large as what went upstream.
#[tokio::test(start_paused = true)]
async fn a_crash_never_under_counts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let mut s = settings(60_000, 1000);
    s.limits.requests_per_day = per_day(1000);
    s.durable = true;
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let a = Arc::new(Admission::new(
        s.clone(),
        WallClock::pinned(NOON),
        Persisted::default(),
        Some(tx),
    ));
    let writer = tokio::spawn(crate::state::run_writer(
        Arc::clone(&a),
        path.clone(),
        0,
        rx,
    ));
    let mut granted = 0u64;
    for _ in 0..137 {
        drop(sent(
            a.acquire(DEFAULT, Duration::from_secs(60)).await.unwrap(),
        ));
        granted += 1;
        // Whatever is on disk right now covers everything granted so far.
        if let crate::state::Loaded::Restored(p) = crate::state::load(&path) {
            assert!(p.used >= granted, "disk says {} after {granted}", p.used);
        } else {
            panic!("a grant happened before any reservation was written");
        }
    }
    // "kill -9": no final write. The restarted proxy counts at least what was sent, at
    // most one block more.
    writer.abort();
    let crate::state::Loaded::Restored(p) = crate::state::load(&path) else {
        panic!("state missing")
    };
    assert!(p.used >= granted && p.used <= granted + s.reserve_block());
    let b = Admission::new(s, WallClock::pinned(NOON), p.clone(), None);
    assert_eq!(b.snapshot().used_today, p.used);
}

#[tokio::test(start_paused = true)]
async fn a_restored_cooldown_keeps_the_gate_closed() {
    let restored = Persisted {
        day: Some(crate::units::day_index(NOON as i64, 0)),
        used: 7,
        cooldown_until_unix: Some(NOON + 120.0),
        cooldown_level: 2,
        ..Persisted::default()
    };
    let a = Admission::new(settings(60, 5), WallClock::pinned(NOON), restored, None);
    let r = a
        .acquire(DEFAULT, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(r.reason, Reason::UpstreamCooldown);
    assert_eq!(r.retry_after, Some(Duration::from_secs(120)));
    assert_eq!(a.snapshot().used_today, 7);
    assert_eq!(a.snapshot().cooldown_level, 2);
}

#[tokio::test(start_paused = true)]
async fn nothing_leaks_after_a_storm() {
    let mut s = settings(600, 5);
    s.limits.max_concurrent = 3;
    s.queue.max_depth = 50;
    let a = admission(s);
    let mut handles = Vec::new();
    for i in 0..300u64 {
        let a2 = Arc::clone(&a);
        handles.push(tokio::spawn(async move {
            let wait = Duration::from_millis(i % 7 * 300);
            if let Ok(p) = a2.acquire(DEFAULT, wait).await {
                let p = sent(p);
                tokio::time::sleep(Duration::from_millis(i % 5 * 50)).await;
                drop(p);
            }
        }));
        if i % 3 == 0 {
            // Some clients give up while queued.
            let h = spawn_acquire(&a, DEFAULT, Duration::from_secs(10));
            tokio::task::yield_now().await;
            h.abort();
        }
    }
    for h in handles {
        h.await.unwrap();
    }
    settle().await;
    let s = a.snapshot();
    assert_eq!((s.queue_depth, s.in_flight), (0, 0));
}

/// A state file claiming an absurd count must not overflow the reservation arithmetic: it
/// simply means the day is spent.
#[tokio::test(start_paused = true)]
async fn an_absurd_restored_count_just_closes_the_day() {
    let mut s = settings(60, 5);
    s.limits.requests_per_day = per_day(100);
    s.durable = true;
    let restored = Persisted {
        day: Some(crate::units::day_index(NOON as i64, 0)),
        used: u64::MAX,
        ..Persisted::default()
    };
    let (tx, _rx) = tokio::sync::watch::channel(0u64);
    let a = Admission::new(s, WallClock::pinned(NOON), restored, Some(tx));
    let r = a.acquire(DEFAULT, Duration::ZERO).await.unwrap_err();
    assert_eq!(r.reason, Reason::DailyQuotaExhausted);
    assert_eq!(a.snapshot().remaining_today, Some(0));
}

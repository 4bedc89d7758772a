//! The admission lock is never held while a log line is written or a fleet call is spawned:
//! a tracing layer installed for the test checks, at every event, that the lock is free,
//! while the test drives every path that logs (day roll, daily cap, cooldown and its probe,
//! a window reset, the quota gates, the usage cap, a model's probe, the advertised rate, a
//! fleet cooldown) and the Redis store's calls (against a Redis that is not there).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, Weak};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::Layer;

use super::fleet::{FleetSettings, OnError};
use super::tests::{admission_at, per_day, sent, settings, settle, DEFAULT, NOON};
use super::tests_r2::{account_429, capacity_429};
use super::*;
use crate::signals::{AdvertisedRate, ChutesQuota};

/// At each event: was the admission lock of the budget under test free?
#[derive(Clone, Default)]
struct LockChecker {
    shared: Arc<OnceLock<Weak<Shared>>>,
    /// Messages of events written while the lock was held.
    held: Arc<StdMutex<Vec<String>>>,
    /// Messages of every event seen.
    seen: Arc<StdMutex<Vec<String>>>,
    events: Arc<AtomicUsize>,
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for LockChecker {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut m = Message(String::new());
        event.record(&mut m);
        self.events.fetch_add(1, Ordering::Relaxed);
        if let Some(sh) = self.shared.get().and_then(Weak::upgrade) {
            // `try_lock` on a std mutex the current thread holds fails (WouldBlock) instead
            // of deadlocking: exactly the question.
            if let Err(std::sync::TryLockError::WouldBlock) = sh.inner.try_lock() {
                self.held.lock().unwrap().push(m.0.clone());
            }
        }
        self.seen.lock().unwrap().push(m.0);
    }
}

impl LockChecker {
    fn watch(&self, a: &Admission) {
        let _ = self.shared.set(Arc::downgrade(&a.shared));
    }

    fn saw(&self, text: &str) -> bool {
        self.seen.lock().unwrap().iter().any(|m| m.contains(text))
    }
}

/// Every line a decision writes, each driven below.
const EXPECTED: &[&str] = &[
    "daily cap reached: gate closed until the quota day resets",
    "new quota day: daily counts reset, daily gate open",
    "cooldown over: sending one probe request before reopening",
    "probe answered: gate reopened for every client",
    "upstream reports no requests left: gate closed until its reset",
    "upstream rate-limit window reset: gate reopened",
    "upstream says the daily quota is spent: gate closed until its reset",
    "upstream quota gate reopened",
    "upstream says the plan's usage cap is spent",
    "a new usage-cap window began: gate reopened",
    "model probe succeeded: model reopened",
    "limits.requests_per_minute is above the rate the upstream advertises",
    "rate in force changed to follow the upstream's advertised limit",
    "the upstream says the plan's daily quota is spent",
    "fleet cooldown: another replica was rate limited; gate closed",
];

#[tokio::test(start_paused = true)]
async fn nothing_is_logged_or_spawned_while_the_lock_is_held() {
    let checker = LockChecker::default();
    let _sub =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(checker.clone()));
    let mut s = settings(60, 100);
    s.limits.requests_per_day = per_day(3);
    s.cooldown.initial = Duration::from_secs(2);
    // 23:59:00 UTC, so the day rolls within the test.
    let a = admission_at(s, NOON + 12.0 * 3600.0 - 60.0);
    checker.watch(&a);

    // The checker itself: an event under the lock is caught (else this test proves nothing).
    {
        let _g = a.shared.inner.lock().unwrap();
        tracing::info!("written under the lock on purpose");
    }
    assert_eq!(checker.held.lock().unwrap().len(), 1);
    checker.held.lock().unwrap().clear();

    // The daily cap reached, then a new day.
    for _ in 0..3 {
        drop(sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap()));
    }
    tokio::time::advance(Duration::from_secs(61)).await;
    let mut uncapped = settings(60, 100);
    uncapped.cooldown.initial = Duration::from_secs(2);
    a.reconfigure(uncapped);
    // An account 429, its cooldown over, the probe, its answer.
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.report(account_429());
    drop(p);
    tokio::time::advance(Duration::from_secs(3)).await;
    let mut probe = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    assert!(probe.is_probe());
    probe.report(Outcome::Success { exhausted: None });
    drop(probe);
    // A window closed by headers, and its reset.
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.report(Outcome::Success {
        exhausted: Some(Duration::from_secs(5)),
    });
    drop(p);
    tokio::time::advance(Duration::from_secs(6)).await;
    let _ = a.snapshot();
    // A quota 402 and its gate's end; a usage cap and its window's end.
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    let reset = a.wall().now_unix() + 10.0;
    p.report(Outcome::QuotaExceeded {
        reset_unix: Some(reset),
    });
    drop(p);
    tokio::time::advance(Duration::from_secs(11)).await;
    let _ = a.snapshot();
    let mut p = sent(a.acquire(DEFAULT, Duration::ZERO).await.unwrap());
    p.report(Outcome::UsageCap);
    drop(p);
    tokio::time::advance(Duration::from_secs(4 * 3600)).await;
    let _ = a.snapshot();
    // A model's capacity 429, then its probe answered.
    let model = |m: &str| Ask {
        model: Some(Arc::from(m)),
        ..Ask::new(DEFAULT, Duration::from_secs(60))
    };
    let mut p = sent(a.admit(model("big")).await.unwrap());
    p.report(capacity_429());
    drop(p);
    let mut probe = sent(a.admit(model("big")).await.unwrap());
    assert!(probe.is_probe());
    probe.report(Outcome::Success { exhausted: None });
    drop(probe);
    // The upstream advertises a lower rate, and says the plan's quota is spent.
    let p = sent(a.acquire(DEFAULT, Duration::from_secs(60)).await.unwrap());
    p.observe(&Observed {
        rl_user: NonZeroU32::new(30).map(AdvertisedRate::PerMinute),
        quota: Some(ChutesQuota {
            total: 300,
            used: 300,
            remaining: Some(0),
        }),
        ..Observed::default()
    });
    drop(p);
    // Another replica's cooldown, applied as the listener does.
    {
        let until = a.wall().now_unix() + 30.0;
        a.shared.lock().apply_fleet_cooldown(&a.shared, until, 1);
    }
    settle().await;

    for text in EXPECTED {
        assert!(checker.saw(text), "never logged: {text:?}");
    }
    assert_eq!(
        *checker.held.lock().unwrap(),
        Vec::<String>::new(),
        "written while the admission lock was held"
    );
}

/// The Redis store's calls (the take, a probe's release, a cooldown's announcement) are
/// effects performed after the lock: checked against a Redis that is not there, so every
/// call fails and the local fallback grants.
#[tokio::test(start_paused = true)]
async fn the_redis_stores_calls_are_made_outside_the_lock() {
    let checker = LockChecker::default();
    let _sub =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(checker.clone()));
    let fleet = Fleet::new(FleetSettings {
        // Nothing listens on the discard port of the loopback: every call fails fast.
        redis_url: "redis://127.0.0.1:9/".into(),
        key_prefix: "fx-test".into(),
        on_error: OnError::Local,
        local_fallback_share: 1.0,
        probe_ttl: Duration::from_secs(5),
        global_concurrency: false,
        lease_ttl: Duration::from_secs(5),
    })
    .unwrap();
    let a = Arc::new(Admission::with_fleet(
        settings(60, 10),
        WallClock::pinned(NOON),
        Persisted::default(),
        None,
        Some(Arc::new(fleet)),
    ));
    checker.watch(&a);
    let mut p = sent(a.acquire(DEFAULT, Duration::from_secs(5)).await.unwrap());
    p.report(account_429());
    p.announced().await;
    drop(p);
    let p = a.acquire(DEFAULT, Duration::from_secs(60)).await.unwrap();
    drop(p);
    settle().await;
    assert!(checker.saw("fleet call"), "no fleet call was made");
    assert_eq!(
        *checker.held.lock().unwrap(),
        Vec::<String>::new(),
        "written while the admission lock was held"
    );
}

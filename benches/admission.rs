//! The cost of the admission decision and of rendering a 429, each beside a naive baseline
//! in the same run (STYLE.md habit 11).
//!
//! Why these: every request pays for one admission decision (and one `Permit` drop), so it
//! must stay far below the microsecond scale of the proxy's other per-request work; the queue
//! must not degrade as it grows (10, 1,000 and 10,000 waiters), because that is exactly when the
//! proxy is busiest shedding; and a 429 is rendered for every shed request, possibly thousands
//! a second during a flood.
//!
//! The baseline is what one would write first: a `Mutex<VecDeque>` of oneshot senders in front
//! of a governor limiter, with a linear scan to remove a waiter that leaves, and a 429 built
//! with `serde_json::json!` and `format!`.
//!
//! Waiters are parked by polling an `acquire` future once with a no-op waker (it enqueues and
//! returns `Pending`); the budget is held shut by its concurrency gate (`max_concurrent = 1`
//! with one permit held), so nothing is ever granted and the queue stays exactly as built.
//!
//! Run: `cargo bench --bench admission`.

// `iter_custom` timings are real elapsed time, which is std's clock (as criterion's own).
// clippy.toml keeps std's clock out of the crate itself.
#![allow(clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::future::Future;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chutes_proxy::admission::{Admission, Permit, Settings};
use chutes_proxy::clients::DEFAULT_CLIENT;
use chutes_proxy::clock::WallClock;
use chutes_proxy::config::{Config, Overrides};
use chutes_proxy::response::{LimitsView, Reason, Rejection};
use chutes_proxy::state::Persisted;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::header::HeaderValue;
use http::Response;
use tokio::sync::oneshot;

/// Long enough that no waiter's deadline passes during a bench.
const WAIT: Duration = Duration::from_secs(3600);
/// For waiters parked behind a one-token-a-minute budget: 10,000 of them predict a week.
const LONG_WAIT: Duration = Duration::from_secs(30 * 86_400);
/// u32::MAX per minute (one token per 14 ns, far faster than acquire + drop can loop) with a
/// million burst: a bucket that never binds, so the uncontended bench measures the decision,
/// not a refusal. Above the 60M/min the config accepts, so it is set on `Settings` directly.
const OPEN_RPM: u32 = u32::MAX;
/// The most the config file accepts.
const CONFIG_MAX_RPM: u32 = 60_000_000;
const OPEN_BURST: u32 = 1_000_000;

fn settings(rpm: u32, burst: u32, max_concurrent: usize, max_depth: usize) -> Settings {
    let toml = format!(
        "[limits]\nrequests_per_minute = {}\nburst = {burst}\nmax_concurrent = {max_concurrent}\n\
         [queue]\nmax_depth = {max_depth}\nmax_wait = \"1h\"\n[state]\npath = \"\"\n",
        rpm.min(CONFIG_MAX_RPM)
    );
    let cfg = Config::from_toml(&toml, &Overrides::default(), &|_: &str| None)
        .expect("bench config is valid");
    let mut s = Settings::from_config(&cfg);
    s.limits.requests_per_minute = NonZeroU32::new(rpm).expect("a bench rate is not zero");
    s
}

fn admission(s: Settings) -> Admission {
    Admission::new(s, WallClock::System, Persisted::default(), None)
}

// ---------------------------------------------------------------------------------------------
// The naive baseline
// ---------------------------------------------------------------------------------------------

/// `Mutex<VecDeque>` of waiters in front of a governor limiter and a concurrency counter. It
/// has no fairness between clients, no daily cap, no cooldown and no predictive shedding: it
/// is the floor the real admission's extra guarantees are paid against.
struct Naive {
    inner: Mutex<NaiveInner>,
    limiter: DefaultDirectRateLimiter,
    max_concurrent: usize,
    max_depth: usize,
    spacing: Duration,
}

struct NaiveInner {
    queue: VecDeque<(u64, oneshot::Sender<()>)>,
    in_flight: usize,
    next_id: u64,
}

struct NaivePermit<'a>(&'a Naive);

impl Drop for NaivePermit<'_> {
    fn drop(&mut self) {
        self.0.inner.lock().unwrap().in_flight -= 1;
    }
}

#[derive(Debug)]
#[allow(dead_code)] // read through Debug/black_box only
enum NaiveShed {
    Full { retry_after: Duration },
    Timeout { retry_after: Duration },
}

/// Leaves the queue when the waiting future is dropped: a linear scan, as a first version
/// would do it.
struct NaiveLeave<'a>(&'a Naive, u64);

impl Drop for NaiveLeave<'_> {
    fn drop(&mut self) {
        let mut g = self.0.inner.lock().unwrap();
        if let Some(pos) = g.queue.iter().position(|(id, _)| *id == self.1) {
            g.queue.remove(pos);
        }
    }
}

impl Naive {
    fn new(rpm: u32, burst: u32, max_concurrent: usize, max_depth: usize) -> Naive {
        let spacing = Duration::from_secs(60) / rpm;
        Naive {
            inner: Mutex::new(NaiveInner {
                queue: VecDeque::new(),
                in_flight: 0,
                next_id: 0,
            }),
            limiter: RateLimiter::direct(
                Quota::with_period(spacing)
                    .unwrap()
                    .allow_burst(NonZeroU32::new(burst).unwrap()),
            ),
            max_concurrent,
            max_depth,
            spacing,
        }
    }

    async fn acquire(&self, max_wait: Duration) -> Result<NaivePermit<'_>, NaiveShed> {
        let (id, rx) = {
            let mut g = self.inner.lock().unwrap();
            if g.queue.is_empty()
                && g.in_flight < self.max_concurrent
                && self.limiter.check().is_ok()
            {
                g.in_flight += 1;
                return Ok(NaivePermit(self));
            }
            let retry_after = self.spacing * g.queue.len() as u32;
            if g.queue.len() >= self.max_depth {
                return Err(NaiveShed::Full { retry_after });
            }
            if retry_after > max_wait {
                return Err(NaiveShed::Timeout { retry_after });
            }
            let id = g.next_id;
            g.next_id += 1;
            let (tx, rx) = oneshot::channel();
            g.queue.push_back((id, tx));
            (id, rx)
        };
        let leave = NaiveLeave(self, id);
        match tokio::time::timeout(max_wait, rx).await {
            Ok(Ok(())) => {
                std::mem::forget(leave);
                Ok(NaivePermit(self))
            }
            _ => Err(NaiveShed::Timeout {
                retry_after: self.spacing,
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

type Parked<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Poll once with a no-op waker: enqueues a waiter (Pending) or returns a decision.
fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    f.poll(&mut cx)
}

fn park<'a, T: 'a>(mut f: Parked<'a, T>) -> Parked<'a, T> {
    assert!(
        poll_once(f.as_mut()).is_pending(),
        "the bench's budget must be shut so the waiter queues"
    );
    f
}

/// A deterministic shuffle (xorshift), so runs remove waiters in the same order.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Benches
// ---------------------------------------------------------------------------------------------

fn uncontended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let adm = admission(settings(OPEN_RPM, OPEN_BURST, 1_000_000, 1000));
    let naive = Naive::new(OPEN_RPM, OPEN_BURST, 1_000_000, 1000);
    let mut g = c.benchmark_group("admit_uncontended");
    // acquire + drop of the permit: what a request that is admitted at once pays in total.
    g.bench_function("chutes_proxy", |b| {
        b.iter(|| {
            let mut f = pin!(adm.acquire(DEFAULT_CLIENT, WAIT));
            match poll_once(f.as_mut()) {
                Poll::Ready(Ok(p)) => drop(black_box(p)),
                _ => panic!("an open budget admits at once"),
            }
        })
    });
    g.bench_function("naive_mutex_vecdeque", |b| {
        b.iter(|| {
            let mut f = pin!(naive.acquire(WAIT));
            match poll_once(f.as_mut()) {
                Poll::Ready(Ok(p)) => drop(black_box(p)),
                _ => panic!("an open budget admits at once"),
            }
        })
    });
    g.finish();
}

/// `tasks` tasks on a 2-worker runtime, each doing its share of `iters` acquire+drop pairs.
fn contended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let adm =
        Arc::new(rt.block_on(async { admission(settings(OPEN_RPM, OPEN_BURST, 1_000_000, 1000)) }));
    let naive = Arc::new(Naive::new(OPEN_RPM, OPEN_BURST, 1_000_000, 1000));
    let mut g = c.benchmark_group("admit_contended");
    for tasks in [2u64, 8] {
        g.bench_with_input(
            BenchmarkId::new("chutes_proxy", tasks),
            &tasks,
            |b, &tasks| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        let hs: Vec<_> = (0..tasks)
                            .map(|t| {
                                let adm = Arc::clone(&adm);
                                let n = iters / tasks + u64::from(t < iters % tasks);
                                tokio::spawn(async move {
                                    for _ in 0..n {
                                        let p: Permit =
                                            adm.acquire(DEFAULT_CLIENT, WAIT).await.unwrap();
                                        drop(black_box(p));
                                    }
                                })
                            })
                            .collect();
                        for h in hs {
                            h.await.unwrap();
                        }
                        start.elapsed()
                    })
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("naive_mutex_vecdeque", tasks),
            &tasks,
            |b, &tasks| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        let hs: Vec<_> = (0..tasks)
                            .map(|t| {
                                let naive = Arc::clone(&naive);
                                let n = iters / tasks + u64::from(t < iters % tasks);
                                tokio::spawn(async move {
                                    for _ in 0..n {
                                        let p = naive.acquire(WAIT).await.unwrap();
                                        drop(black_box(p));
                                    }
                                })
                            })
                            .collect();
                        for h in hs {
                            h.await.unwrap();
                        }
                        start.elapsed()
                    })
                })
            },
        );
    }
    g.finish();
}

/// With N waiters parked (10, 1,000, 10,000: the cost must not grow with N): (a) one more arrives and leaves again (enqueue + abandon of the
/// newest), (b) one more is shed because the queue is full, (c) one more is shed because its
/// predicted wait is over its limit, (d) all N leave in random order (a mass client timeout),
/// per waiter.
fn with_waiters(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();
    for n in [10usize, 1_000, 10_000] {
        let mut g = c.benchmark_group(format!("waiters_{n}"));

        // (a) enqueue + abandon with N queued.
        {
            let adm = admission(settings(OPEN_RPM, OPEN_BURST, 1, n * 2));
            let holder = rt.block_on(adm.acquire(DEFAULT_CLIENT, WAIT)).unwrap();
            let parked: Vec<_> = (0..n)
                .map(|_| park(Box::pin(adm.acquire(DEFAULT_CLIENT, WAIT)) as Parked<'_, _>))
                .collect();
            g.bench_function("enqueue_abandon/chutes_proxy", |b| {
                b.iter(|| {
                    let mut f = pin!(adm.acquire(DEFAULT_CLIENT, WAIT));
                    assert!(poll_once(f.as_mut()).is_pending());
                })
            });
            drop(parked);
            drop(holder);
        }
        {
            let naive = Naive::new(OPEN_RPM, OPEN_BURST, 0, n * 2);
            let parked: Vec<_> = (0..n)
                .map(|_| park(Box::pin(naive.acquire(WAIT)) as Parked<'_, _>))
                .collect();
            g.bench_function("enqueue_abandon/naive_mutex_vecdeque", |b| {
                b.iter(|| {
                    let mut f = pin!(naive.acquire(WAIT));
                    assert!(poll_once(f.as_mut()).is_pending());
                })
            });
            drop(parked);
        }

        // (b) shed: queue full.
        {
            let adm = admission(settings(OPEN_RPM, OPEN_BURST, 1, n));
            let holder = rt.block_on(adm.acquire(DEFAULT_CLIENT, WAIT)).unwrap();
            let parked: Vec<_> = (0..n)
                .map(|_| park(Box::pin(adm.acquire(DEFAULT_CLIENT, WAIT)) as Parked<'_, _>))
                .collect();
            g.bench_function("shed_queue_full/chutes_proxy", |b| {
                b.iter(|| {
                    let mut f = pin!(adm.acquire(DEFAULT_CLIENT, WAIT));
                    match poll_once(f.as_mut()) {
                        Poll::Ready(Err(r)) => {
                            debug_assert_eq!(r.reason, Reason::QueueFull);
                            black_box(r);
                        }
                        _ => panic!("a full queue sheds at once"),
                    }
                })
            });
            drop(parked);
            drop(holder);
        }
        {
            let naive = Naive::new(OPEN_RPM, OPEN_BURST, 0, n);
            let parked: Vec<_> = (0..n)
                .map(|_| park(Box::pin(naive.acquire(WAIT)) as Parked<'_, _>))
                .collect();
            g.bench_function("shed_queue_full/naive_mutex_vecdeque", |b| {
                b.iter(|| {
                    let mut f = pin!(naive.acquire(WAIT));
                    match poll_once(f.as_mut()) {
                        Poll::Ready(Err(r)) => drop(black_box(r)),
                        _ => panic!("a full queue sheds at once"),
                    }
                })
            });
            drop(parked);
        }

        // (c) shed: predicted wait over the request's limit. One token a minute, so N waiters
        // ahead predict N minutes; they were parked with a wait long enough for that, and the
        // newcomer allows only a second.
        {
            let adm = admission(settings(1, 1, 1, n * 2));
            let holder = rt.block_on(adm.acquire(DEFAULT_CLIENT, WAIT)).unwrap();
            let parked: Vec<_> = (0..n)
                .map(|_| park(Box::pin(adm.acquire(DEFAULT_CLIENT, LONG_WAIT)) as Parked<'_, _>))
                .collect();
            g.bench_function("shed_predicted_timeout/chutes_proxy", |b| {
                b.iter(|| {
                    let mut f = pin!(adm.acquire(DEFAULT_CLIENT, Duration::from_secs(1)));
                    match poll_once(f.as_mut()) {
                        Poll::Ready(Err(r)) => {
                            debug_assert_eq!(r.reason, Reason::QueueTimeout);
                            black_box(r);
                        }
                        _ => panic!("an impossible wait sheds at once"),
                    }
                })
            });
            drop(parked);
            drop(holder);
        }
        {
            let naive = Naive::new(1, 1, 0, n * 2);
            let parked: Vec<_> = (0..n)
                .map(|_| park(Box::pin(naive.acquire(LONG_WAIT)) as Parked<'_, _>))
                .collect();
            g.bench_function("shed_predicted_timeout/naive_mutex_vecdeque", |b| {
                b.iter(|| {
                    let mut f = pin!(naive.acquire(Duration::from_secs(1)));
                    match poll_once(f.as_mut()) {
                        Poll::Ready(Err(r)) => drop(black_box(r)),
                        _ => panic!("an impossible wait sheds at once"),
                    }
                })
            });
            drop(parked);
        }

        // (d) all N leave in random order; time per waiter, setup excluded.
        let order = shuffled(n, 0x9e37_79b9_7f4a_7c15);
        {
            let adm = admission(settings(OPEN_RPM, OPEN_BURST, 1, n * 2));
            let holder = rt.block_on(adm.acquire(DEFAULT_CLIENT, WAIT)).unwrap();
            g.bench_function("mass_abandon_per_waiter/chutes_proxy", |b| {
                b.iter_custom(|iters| {
                    mass_abandon(iters, n, &order, || {
                        park(Box::pin(adm.acquire(DEFAULT_CLIENT, WAIT)) as Parked<'_, _>)
                    })
                })
            });
            drop(holder);
        }
        {
            let naive = Naive::new(OPEN_RPM, OPEN_BURST, 0, n * 2);
            g.bench_function("mass_abandon_per_waiter/naive_mutex_vecdeque", |b| {
                b.iter_custom(|iters| {
                    mass_abandon(iters, n, &order, || {
                        park(Box::pin(naive.acquire(WAIT)) as Parked<'_, _>)
                    })
                })
            });
        }
        g.finish();
    }
}

/// Rounds of: park `n` waiters (untimed), drop them in `order` (timed). Scaled to `iters`.
fn mass_abandon<'a, T: 'a>(
    iters: u64,
    n: usize,
    order: &[usize],
    mut make: impl FnMut() -> Parked<'a, T>,
) -> Duration {
    let rounds = iters.div_ceil(n as u64).max(1);
    let mut total = Duration::ZERO;
    for _ in 0..rounds {
        let mut parked: Vec<Option<Parked<'a, T>>> = (0..n).map(|_| Some(make())).collect();
        let start = Instant::now();
        for &i in order {
            drop(parked[i].take());
        }
        total += start.elapsed();
    }
    total.mul_f64(iters as f64 / (rounds * n as u64) as f64)
}

fn limits() -> LimitsView {
    LimitsView {
        requests_per_minute: 50,
        burst: 5,
        requests_per_day: Some(5000),
        used_today: 812,
        remaining_today: Some(4188),
        day_resets_at_unix: 1_795_996_800,
    }
}

/// The contract's `queue_timeout` 429: headers and body, against a `json!` + `format!` build
/// of the same response.
fn render(c: &mut Criterion) {
    let mut r = Rejection::new(Reason::QueueTimeout);
    r.retry_after = Some(Duration::from_millis(11_400));
    r.limits = Some(limits());
    r.detail = Some("estimated wait 31.0s exceeds the wait limit 20.0s".into());
    let id = HeaderValue::from_static("m3x8k2p1-1f");
    let counter = AtomicU64::new(0);
    let mut g = c.benchmark_group("render_429");
    g.bench_function("chutes_proxy", |b| {
        b.iter(|| black_box(black_box(&r).render(black_box(&id))))
    });
    g.bench_function("naive_json_macro", |b| {
        b.iter(|| black_box(naive_render(black_box(&r), black_box(&id), &counter)))
    });
    g.finish();
}

fn naive_render(r: &Rejection, id: &HeaderValue, counter: &AtomicU64) -> Response<Bytes> {
    counter.fetch_add(1, Ordering::Relaxed);
    let l = r.limits.as_ref().unwrap();
    let retry = r.retry_after.unwrap_or_default();
    let secs = (retry.as_millis().div_ceil(1000) as u64).max(1);
    let body = serde_json::json!({
        "error": {
            "message": format!("account rate limit: retry in {secs}s ({})", r.detail.as_deref().unwrap_or("")),
            "type": "requests",
            "param": null,
            "code": "rate_limit_exceeded",
            "proxy": {
                "reason": "queue_timeout",
                "retry_after_seconds": (retry.as_secs_f64() * 1000.0).round() / 1000.0,
                "request_id": id.to_str().unwrap_or(""),
                "limits": {
                    "requests_per_minute": l.requests_per_minute,
                    "burst": l.burst,
                    "requests_per_day": l.requests_per_day,
                    "used_today": l.used_today,
                    "remaining_today": l.remaining_today,
                    "day_resets_at": "2026-11-24T00:00:00Z",
                },
                "cooldown_until": null,
                "upstream_status": null,
                "upstream_body": null,
            }
        }
    });
    Response::builder()
        .status(429)
        .header("content-type", "application/json")
        .header("x-proxy-request-id", id.clone())
        .header("retry-after", secs.to_string())
        .header("retry-after-ms", retry.as_millis().to_string())
        .header("x-should-retry", "true")
        .header(
            "ratelimit-policy",
            format!(
                "\"minute\";q={};w=60, \"day\";q={};w=86400",
                l.requests_per_minute,
                l.requests_per_day.unwrap_or(0)
            ),
        )
        .header("ratelimit", format!("\"minute\";r=0;t={secs}"))
        .header(
            "x-ratelimit-limit-requests",
            l.requests_per_minute.to_string(),
        )
        .header("x-ratelimit-remaining-requests", "0")
        .header("x-ratelimit-reset-requests", format!("{secs}s"))
        .body(Bytes::from(body.to_string()))
        .unwrap()
}

criterion_group!(benches, uncontended, contended, with_waiters, render);
criterion_main!(benches);

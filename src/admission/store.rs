//! Where the account's tokens are taken and given back: one small interface (take, refund,
//! peek) with two implementations, so the decisions never ask whether there is a fleet.
//!
//! - [`Store::Local`]: this process holds the account. Its token is governor's bucket (and a
//!   mirror of governor's TAT, because governor offers no look without a take); its daily
//!   count is `Inner::day`, made durable through the state file.
//! - [`Store::Redis`]: the fleet holds the account in Redis (`fleet.rs`). A take there is a
//!   round trip, which must not happen under the admission lock, so a take under the lock
//!   answers [`Take::Remote`]: an effect the driver performs after the lock is released
//!   (`driver::take_remote`), applying the answer under the lock again. A refund is likewise
//!   an effect (`effects::Call`). The daily count of record is Redis's; `Inner::day.used`
//!   is only this replica's share.
//!
//! Both give back the same local bookkeeping (the permit's daily units, its client's and its
//! model's rate: `permit.rs`); what is the store's own is the token and, for Redis, its count.
//! Nothing here does I/O, logs or reads a clock: time is passed in, governor's included
//! ([`Given`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use super::effects::{Call, Remote};
use super::fleet::{self, Fleet, OnError};
use crate::clock::TokioClock;
use crate::response::{Reason, Rejection};

pub(super) type Bucket = RateLimiter<NotKeyed, InMemoryState, Given, NoOpMiddleware<Duration>>;

/// governor's clock for the buckets here: the reading of the decision's own `now`, given
/// just before each check (under the admission lock), so a take costs no clock read of its
/// own. Each read of the system clock is tens of nanoseconds in a VM, and the decision has
/// already paid for one.
#[derive(Debug, Default)]
pub(super) struct Given(AtomicU64);

impl Given {
    fn set(&self, reading: Duration) {
        let nanos = u64::try_from(reading.as_nanos()).unwrap_or(u64::MAX);
        self.0.store(nanos, Ordering::Relaxed);
    }
}

impl governor::clock::Clock for Given {
    type Instant = Duration;
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// Check `bucket` at the reading `at`.
fn check(bucket: &Bucket, at: Duration) -> Result<(), Duration> {
    bucket.clock().set(at);
    bucket.check().map_err(|nu| nu.wait_time_from(at))
}

/// The rate in force: one token per `spacing`, after a burst of `burst`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rate {
    pub spacing: Duration,
    pub burst: u32,
}

pub(super) enum Store {
    Local(Local),
    Redis(Redis),
}

pub(super) struct Local {
    /// The account's bucket. Swapped (never refilled) when the rate in force changes.
    bucket: Bucket,
    /// Mirror of governor's theoretical arrival time (a reading of the clock), updated
    /// exactly as governor's GCRA does on each token taken; used for estimates and `/status`,
    /// never for the decision itself.
    tat: Option<Duration>,
    /// After a rate change, no token before this (the old schedule's next token).
    hold_until: Option<Instant>,
}

pub(super) struct Redis {
    fleet: Arc<Fleet>,
    /// Redis said the next token is not before this; no need to ask earlier.
    not_before: Option<Instant>,
    /// The local budget used while Redis is unreachable (`on_redis_error = "local"`).
    fallback: Bucket,
}

/// The answer to a take under the lock.
pub(super) enum Take {
    /// Taken, now, from this process's bucket.
    Now,
    /// No token before then.
    NotBefore(Instant),
    /// Only Redis can answer: the driver asks it after the lock is released.
    Remote(Arc<Fleet>),
}

impl Store {
    pub fn local(rate: Rate) -> Store {
        Store::Local(Local {
            bucket: make_bucket(rate),
            tat: None,
            hold_until: None,
        })
    }

    /// The fleet's store; `share` of the configured `rpm` and `burst` is the local
    /// fallback's while Redis is unreachable.
    pub fn redis(fleet: Arc<Fleet>, rpm: u32, burst: u32, share: f64) -> Store {
        let share = share.clamp(0.0, 1.0);
        let scaled = |n: u32| ((f64::from(n) * share).floor() as u32).max(1);
        let fallback = Rate {
            spacing: rate_spacing(scaled(rpm)),
            burst: scaled(burst),
        };
        Store::Redis(Redis {
            fleet,
            not_before: None,
            fallback: make_bucket(fallback),
        })
    }

    /// Take the account's token for a grant now, if the store can say so under the lock.
    pub fn take(&mut self, clock: &TokioClock, rate: Rate, now: Instant) -> Take {
        match self {
            Store::Local(l) => {
                if let Some(h) = l.hold_until {
                    if h > now {
                        return Take::NotBefore(h);
                    }
                    l.hold_until = None;
                }
                let reading = clock.reading_at(now);
                match check(&l.bucket, reading) {
                    Ok(()) => {
                        let tat = l.tat.unwrap_or(reading).max(reading);
                        l.tat = Some(tat + rate.spacing);
                        Take::Now
                    }
                    Err(wait) => Take::NotBefore(now + wait),
                }
            }
            Store::Redis(r) => match r.not_before {
                Some(t) if t > now => Take::NotBefore(t),
                _ => Take::Remote(Arc::clone(&r.fleet)),
            },
        }
    }

    /// What giving back a grant that was never sent asks of the store itself (the local
    /// bookkeeping is the permit's): nothing locally, since governor cannot give a token
    /// back; for Redis, its token and count, to the Redis day `ticket` says counted them.
    pub fn refund(&self, ticket: Option<&fleet::Ticket>, spacing: Duration) -> Option<Call> {
        match (self, ticket) {
            (Store::Redis(r), Some(t)) => Some(Call {
                fleet: Arc::clone(&r.fleet),
                what: Remote::Refund {
                    spacing,
                    day: t.day,
                },
            }),
            _ => None,
        }
    }

    /// Tokens in the bucket now and how long until the next one (`/status`).
    pub fn peek(&self, clock: &TokioClock, rate: Rate, now: Instant) -> (u32, Duration) {
        match self {
            Store::Local(l) => l.tokens(clock.reading_at(now), rate),
            Store::Redis(r) => match r.not_before.filter(|&t| t > now) {
                Some(t) => (0, t - now),
                None => (rate.burst.max(1), Duration::ZERO),
            },
        }
    }

    /// Whether a take now would be held back by a rate change's schedule (`/status`).
    pub fn held(&self, now: Instant) -> bool {
        match self {
            Store::Local(l) => l.hold_until.is_some_and(|h| h > now),
            Store::Redis(_) => false,
        }
    }

    /// When the account's bucket next has a token (now if it has one).
    fn next_token_at(&self, clock: &TokioClock, rate: Rate, now: Instant) -> Instant {
        let (tokens, next) = self.peek(clock, rate, now);
        let at = if tokens > 0 { now } else { now + next };
        match self {
            Store::Local(l) => at.max(l.hold_until.unwrap_or(now)),
            Store::Redis(_) => at,
        }
    }

    /// When a request with `ahead` grants before it would get its token from the bucket
    /// alone: the next conforming time plus one spacing per grant ahead.
    pub fn estimate(&self, clock: &TokioClock, rate: Rate, ahead: u32, now: Instant) -> Instant {
        let burst = rate.burst.max(1);
        let t = rate.spacing;
        let behind = t.saturating_mul(ahead);
        let mut at = now;
        match self {
            Store::Local(l) => {
                if let Some(tat) = l.tat {
                    let tau = t * (burst - 1);
                    at = at.max(clock.to_instant(tat.saturating_sub(tau)) + behind);
                } else if ahead >= burst {
                    at = at.max(now + t * (ahead - burst + 1));
                }
                if let Some(h) = l.hold_until.filter(|&h| h > now) {
                    at = at.max(h + behind);
                }
            }
            Store::Redis(r) => {
                // The local view does not see other replicas' tokens, but Redis said when
                // the next one comes.
                if ahead >= burst {
                    at = at.max(now + t * (ahead - burst + 1));
                }
                if let Some(nb) = r.not_before.filter(|&nb| nb > now) {
                    at = at.max(nb + behind);
                }
            }
        }
        at
    }

    /// Change the rate in force, keeping the schedule: the fresh bucket's burst is taken at
    /// once and no token comes before the old bucket's next one, so a change never grants a
    /// fresh burst. Redis takes the spacing with each take, so it has nothing to swap.
    pub fn set_rate(&mut self, clock: &TokioClock, old: Rate, new: Rate, now: Instant) {
        let next_old = self.next_token_at(clock, old, now);
        let Store::Local(l) = self else {
            return;
        };
        let burst = new.burst.max(1);
        let reading = clock.reading_at(now);
        let bucket = make_bucket(new);
        bucket.clock().set(reading);
        if let Some(n) = std::num::NonZeroU32::new(burst) {
            let _ = bucket.check_n(n);
        }
        l.bucket = bucket;
        l.tat = Some(reading + new.spacing * burst);
        l.hold_until = (next_old > now).then_some(next_old);
    }

    /// A refusal for every request while the store cannot be asked at all (Redis down with
    /// `on_redis_error = "fail_closed"`).
    pub fn unavailable(&self) -> Option<Rejection> {
        match self {
            Store::Redis(r)
                if !r.fleet.is_healthy() && r.fleet.settings.on_error == OnError::FailClosed =>
            {
                let mut rej = Rejection::new(Reason::SharedStateUnavailable);
                rej.retry_after = Some(fleet::CALL_TIMEOUT * 2);
                rej.detail = r.fleet.last_error();
                Some(rej)
            }
            _ => None,
        }
    }

    /// The longest a take can take: a request that asked never to queue still allows this
    /// much, the one question to Redis (there is no grant under the lock there).
    pub fn take_time(&self) -> Duration {
        match self {
            Store::Local(_) => Duration::ZERO,
            Store::Redis(_) => fleet::CALL_TIMEOUT,
        }
    }

    /// Whether `Inner::day` is the count of record (then it must be covered on disk before
    /// a grant when a daily cap and a state file are configured), rather than a share.
    pub fn keeps_day(&self) -> bool {
        matches!(self, Store::Local(_))
    }

    /// Whether the end of a cooldown makes this process's next grant the probe (locally),
    /// or the store picks the one probe among the replicas (Redis, in its take).
    pub fn probes_here(&self) -> bool {
        matches!(self, Store::Local(_))
    }

    /// The call that tells the other replicas `what`, if there are any.
    pub fn announce(&self, what: Remote) -> Option<Call> {
        match self {
            Store::Redis(r) => Some(Call {
                fleet: Arc::clone(&r.fleet),
                what,
            }),
            Store::Local(_) => None,
        }
    }

    /// This process's share of the day's count, where the count of record is elsewhere.
    pub fn replica_share(&self, used: u64) -> Option<u64> {
        (!self.keeps_day()).then_some(used)
    }

    /// The fleet, for wiring (the listener, `/status`), never for a decision.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        match self {
            Store::Redis(r) => Some(&r.fleet),
            Store::Local(_) => None,
        }
    }

    /// Redis told this replica not to ask before `at` (`None`: ask at the next chance, e.g.
    /// after an announcement that a slot, the probe or the gate is free).
    pub fn wait_remote(&mut self, at: Option<Instant>) {
        if let Store::Redis(r) = self {
            r.not_before = at;
        }
    }

    /// Redis unreachable with the local fallback: take from the fallback's bucket, or wait.
    pub fn take_fallback(&mut self, clock: &TokioClock, now: Instant) -> bool {
        let Store::Redis(r) = self else {
            return false;
        };
        match check(&r.fallback, clock.reading_at(now)) {
            Ok(()) => true,
            Err(wait) => {
                r.not_before = Some(now + wait);
                false
            }
        }
    }
}

impl Local {
    /// Tokens in the bucket now, and how long until the next one.
    fn tokens(&self, now: Duration, rate: Rate) -> (u32, Duration) {
        let burst = rate.burst.max(1);
        let t = rate.spacing;
        let tau = t * (burst - 1);
        let Some(tat) = self.tat else {
            return (burst, Duration::ZERO);
        };
        let earliest = tat.saturating_sub(tau);
        if now < earliest {
            return (0, earliest - now);
        }
        let tokens = ((now + t - earliest).as_nanos() / t.as_nanos().max(1)) as u64;
        let tokens = tokens.min(u64::from(burst)) as u32;
        let next = if tokens >= burst {
            Duration::ZERO
        } else {
            let next_at = earliest + t * tokens;
            next_at.saturating_sub(now)
        };
        (tokens, next)
    }
}

/// The GCRA emission interval of `rpm` per minute.
pub(super) fn rate_spacing(rpm: u32) -> Duration {
    Duration::from_secs(60) / rpm.max(1)
}

fn make_bucket(rate: Rate) -> Bucket {
    // `with_period` only fails for a zero period, which a non-zero rpm cannot give; fall back
    // to one per nanosecond rather than panic.
    let quota = Quota::with_period(rate.spacing)
        .unwrap_or_else(|| Quota::per_second(std::num::NonZeroU32::MAX))
        .allow_burst(std::num::NonZeroU32::new(rate.burst).unwrap_or(std::num::NonZeroU32::MIN));
    RateLimiter::direct_with_clock(quota, Given::default())
}

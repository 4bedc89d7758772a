//! What the budget's decisions leave to be done once the admission lock is released: log
//! lines, a state write, calls to the fleet's Redis.
//!
//! A decision under the lock only records them (`Inner::fx`); [`Guard`], the lock's guard,
//! releases the mutex first and then performs them. So no log line is formatted, no task is
//! spawned and no channel is woken while the lock is held, whichever path took it
//! (`tests_r2::nothing_is_logged_or_spawned_while_the_lock_is_held` keeps this true).
//! Deliberately not here: the replies to waiters (the driver delivers them after the lock,
//! because a refused reply drops a permit, whose `Drop` takes the lock again).

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use super::fleet::Fleet;
use super::{Inner, Shared};
use crate::units::format_rfc3339;

/// One log line a decision wants written, with its fields. The text and fields are those the
/// operators' docs and greps know (docs/observability.md); the targets are the modules that
/// decide them, as when they were written in place.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Log {
    NewDay {
        day: i64,
    },
    QuotaGateReopened,
    UsageCapReopened,
    WindowReset,
    CooldownOverProbe {
        level: u32,
    },
    CooldownOverFleetProbes {
        level: u32,
    },
    DailyCapReached {
        used: u64,
        resets_at: i64,
    },
    FleetCooldown {
        seconds: f64,
        level: u32,
    },
    QuotaSpentByHeaders {
        total: u64,
        used: u64,
        until: i64,
    },
    RateAboveAdvertised {
        configured: u32,
        advertised: u32,
        following: bool,
    },
    RateFollowed {
        from: u32,
        to: u32,
    },
    ModelProbeSucceeded {
        model: Arc<str>,
    },
    ProbeAnswered,
    NoRequestsLeft {
        seconds: f64,
    },
    QuotaSpent402 {
        until: i64,
    },
    UsageCapSpent {
        until: i64,
    },
}

const BUDGET: &str = "chutes_proxy::admission::budget";
const PERMIT: &str = "chutes_proxy::admission::permit";

impl Log {
    fn write(&self) {
        match self {
            Log::NewDay { day } => tracing::info!(
                target: BUDGET,
                day,
                "new quota day: daily counts reset, daily gate open"
            ),
            Log::QuotaGateReopened => {
                tracing::info!(target: BUDGET, "upstream quota gate reopened")
            }
            Log::UsageCapReopened => {
                tracing::info!(target: BUDGET, "a new usage-cap window began: gate reopened")
            }
            Log::WindowReset => {
                tracing::info!(target: BUDGET, "upstream rate-limit window reset: gate reopened")
            }
            Log::CooldownOverProbe { level } => tracing::info!(
                target: BUDGET,
                level,
                "cooldown over: sending one probe request before reopening"
            ),
            Log::CooldownOverFleetProbes { level } => tracing::info!(
                target: BUDGET,
                level,
                "cooldown over: the fleet probes once"
            ),
            Log::DailyCapReached { used, resets_at } => tracing::info!(
                target: BUDGET,
                used,
                resets_at = %format_rfc3339(*resets_at),
                "daily cap reached: gate closed until the quota day resets"
            ),
            Log::FleetCooldown { seconds, level } => tracing::info!(
                target: BUDGET,
                seconds,
                level,
                "fleet cooldown: another replica was rate limited; gate closed"
            ),
            Log::QuotaSpentByHeaders { total, used, until } => tracing::warn!(
                target: BUDGET,
                total,
                used,
                until = %format_rfc3339(*until),
                "the upstream says the plan's daily quota is spent: gate closed until the reset, so nothing is billed beyond it (limits.beyond_quota = \"stop\")"
            ),
            Log::RateAboveAdvertised {
                configured,
                advertised,
                following,
            } => tracing::warn!(
                target: PERMIT,
                configured,
                advertised,
                following,
                "limits.requests_per_minute is above the rate the upstream advertises (X-Chutes-RL-User)"
            ),
            Log::RateFollowed { from, to } => tracing::info!(
                target: PERMIT,
                from,
                to,
                "rate in force changed to follow the upstream's advertised limit"
            ),
            Log::ModelProbeSucceeded { model } => tracing::info!(
                target: PERMIT,
                model = &**model,
                "model probe succeeded: model reopened"
            ),
            Log::ProbeAnswered => {
                tracing::info!(target: PERMIT, "probe answered: gate reopened for every client")
            }
            Log::NoRequestsLeft { seconds } => tracing::info!(
                target: PERMIT,
                seconds,
                "upstream reports no requests left: gate closed until its reset"
            ),
            Log::QuotaSpent402 { until } => tracing::warn!(
                target: PERMIT,
                until = %format_rfc3339(*until),
                "upstream says the daily quota is spent: gate closed until its reset"
            ),
            Log::UsageCapSpent { until } => tracing::warn!(
                target: PERMIT,
                until = %format_rfc3339(*until),
                "upstream says the plan's usage cap is spent: gate closed until the next 4-hour window"
            ),
        }
    }
}

/// One call to the fleet's Redis that a decision asks for (the Redis store's side of a
/// refund, a probe's end, an announcement). Carries its `Fleet`, so performing it needs
/// nothing from under the lock.
pub(super) struct Call {
    pub fleet: Arc<Fleet>,
    pub what: Remote,
}

/// What to tell Redis.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Remote {
    /// The account's probe answered (`true`: the fleet reopens) or went away.
    ProbeDone {
        ok: bool,
        what: &'static str,
    },
    /// Give back what a take counted on Redis day `day`.
    Refund {
        spacing: Duration,
        day: i64,
    },
    Cooldown {
        duration: Duration,
        level: u32,
        decay: Duration,
    },
    ModelCooldown {
        model: Arc<str>,
        until_unix: f64,
        level: u32,
    },
    DailyGate {
        until_unix: f64,
    },
}

impl Call {
    /// Run the call in the background, logging a failure: the local gate has already
    /// changed, Redis catches up. `None` outside a runtime (a permit dropped at exit).
    pub fn spawn(self) -> Option<tokio::task::JoinHandle<()>> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let Call { fleet: f, what } = self;
        // Cheap when disabled; lets a test check that no call starts under the lock.
        tracing::trace!(call = ?what, "fleet call");
        Some(handle.spawn(async move {
            let (name, r) = match what {
                Remote::ProbeDone { ok, what } => (what, f.probe_done(ok).await),
                Remote::Refund { spacing, day } => ("refund", f.refund(spacing, day).await),
                Remote::Cooldown {
                    duration,
                    level,
                    decay,
                } => (
                    "cooldown",
                    f.start_cooldown(duration, level, decay).await.map(|_| ()),
                ),
                Remote::ModelCooldown {
                    model,
                    until_unix,
                    level,
                } => (
                    "model cooldown",
                    f.announce_model(&model, until_unix, level).await,
                ),
                Remote::DailyGate { until_unix } => {
                    ("quota gate", f.close_daily_gate(until_unix).await)
                }
            };
            if let Err(e) = r {
                tracing::warn!(what = name, error = %e, "could not tell the fleet");
            }
        }))
    }
}

/// Everything a decision left to do after the lock.
#[derive(Default)]
pub(super) struct Effects {
    logs: Vec<Log>,
    persist: bool,
    calls: Vec<Call>,
}

impl Effects {
    pub fn log(&mut self, l: Log) {
        self.logs.push(l);
    }

    /// Ask the state writer for a write.
    pub fn persist(&mut self) {
        self.persist = true;
    }

    pub fn call(&mut self, c: Option<Call>) {
        self.calls.extend(c);
    }

    fn is_empty(&self) -> bool {
        !self.persist && self.logs.is_empty() && self.calls.is_empty()
    }

    /// Perform them; the lock must not be held (`Guard` calls this after releasing it).
    fn perform(self, shared: &Shared) {
        for l in &self.logs {
            l.write();
        }
        if self.persist {
            if let Some(p) = &shared.persist {
                p.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
        for c in self.calls {
            let _ = c.spawn();
        }
    }
}

/// The admission lock's guard: derefs to the budget's state and, when dropped, releases the
/// mutex and then performs what the decisions taken under it left in `Inner::fx`.
pub(super) struct Guard<'a> {
    shared: &'a Shared,
    g: Option<MutexGuard<'a, Inner>>,
}

impl<'a> Guard<'a> {
    pub fn new(shared: &'a Shared, g: MutexGuard<'a, Inner>) -> Guard<'a> {
        Guard { shared, g: Some(g) }
    }
}

impl Deref for Guard<'_> {
    type Target = Inner;
    #[inline]
    fn deref(&self) -> &Inner {
        self.g.as_deref().expect("held until drop")
    }
}

impl DerefMut for Guard<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut Inner {
        self.g.as_deref_mut().expect("held until drop")
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let Some(mut g) = self.g.take() else {
            return;
        };
        if g.fx.is_empty() {
            return;
        }
        let fx = std::mem::take(&mut g.fx);
        drop(g);
        fx.perform(self.shared);
    }
}

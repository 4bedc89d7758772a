//! The permit a granted request holds, and what the upstream's answer does to the budget:
//! cooldowns (the account's or one model's), quota gates, advertised rates, probes, and the
//! give-back of everything a request that was never sent had taken. Like the budget, it
//! decides under the lock and leaves log lines, state writes and fleet calls to `Inner::fx`,
//! performed after the lock is released.

use super::effects::{Call, Remote};
use super::*;
/// The right to have one request in flight upstream. Owned by the response body; dropping it
/// frees the concurrency slot, gives back what a request never sent had taken (the daily
/// counts, its client's and its model's rate), and lets another request probe if this was an
/// unanswered probe.
pub struct Permit {
    pub(super) shared: Arc<Shared>,
    pub(super) client: ClientId,
    pub(super) model: Option<Arc<str>>,
    pub(super) cost: u32,
    /// The quota day that counted this request: a permit that outlives midnight gives back
    /// to that day, never to the next.
    pub(super) day: i64,
    pub(super) epoch: u64,
    pub(super) probe: bool,
    pub(super) model_epoch: u64,
    pub(super) model_probe: bool,
    /// What the client's and the model's own rate recorded at the take, for a give-back.
    pub(super) client_tat: Option<Instant>,
    pub(super) model_tat: Option<Instant>,
    pub(super) sent: bool,
    pub(super) reported: bool,
    /// Fleet mode: what Redis counted for this grant (`None` for a local or fallback grant).
    pub(super) fleet: Option<fleet::Ticket>,
    /// The fleet announcement `report` started, for [`Permit::announced`].
    pub(super) announcement: Option<tokio::task::JoinHandle<()>>,
    /// How long the request waited in the queue.
    pub queue_wait: Duration,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("client", &self.client)
            .field("model", &self.model)
            .field("cost", &self.cost)
            .field("probe", &self.probe)
            .field("queue_wait", &self.queue_wait)
            .finish()
    }
}

impl Permit {
    /// The request is going upstream now: from here on it counts against the day.
    pub fn mark_sent(&mut self) {
        self.sent = true;
    }

    pub fn is_probe(&self) -> bool {
        self.probe || self.model_probe
    }

    pub fn client(&self) -> ClientId {
        self.client
    }

    pub fn model(&self) -> Option<&Arc<str>> {
        self.model.as_ref()
    }

    /// Read what a response head says about the account (quota snapshot, advertised rates),
    /// whatever its status. Cheap when it says nothing.
    pub fn observe(&self, obs: &Observed) {
        if obs.quota.is_none() && obs.rl_user.is_none() && obs.rl_chute.is_none() {
            return;
        }
        let shared = &*self.shared;
        let now = Instant::now();
        let now_unix = shared.wall.now_unix();
        let mut g = shared.lock();
        g.roll_day(now_unix);
        if let Some(q) = obs.quota {
            let remaining = q.remaining.unwrap_or(q.total.saturating_sub(q.used));
            let account_total = g.upstream.quota.map(|a| a.total);
            // Chutes keeps a quota per model where one is configured: figures whose Total is
            // not the account's describe that model's own quota and gate only that model.
            let is_account = match account_total {
                None => true,
                Some(t) => t == q.total || (!g.upstream.polled && t == 0),
            };
            if is_account {
                g.apply_account_quota(
                    q.total,
                    q.used,
                    remaining,
                    self.cost,
                    now_unix,
                    QuotaSeen::Header,
                );
            } else if let (Some(m), true) = (&self.model, q.total > 0) {
                let stop = g.s.beyond_quota_stop();
                let until = day_end(g.day.index, g.s.limits.day_reset_offset) as f64;
                let e = g.models.entry(m, now);
                e.quota_total = Some(q.total);
                e.quota_used = e
                    .quota_used
                    .max(q.used.saturating_add(u64::from(self.cost)));
                if stop && remaining <= u64::from(self.cost) {
                    e.quota_gate_until_unix = Some(until);
                }
            }
        }
        if let Some(r) = obs.rl_user {
            let changed = g.upstream.rl_user != Some(r);
            g.upstream.rl_user = Some(r);
            if changed {
                let target = g.target_rate();
                if let AdvertisedRate::PerMinute(n) = r {
                    if n.get() < g.s.limits.requests_per_minute.get() && !g.upstream.warned {
                        g.upstream.warned = true;
                        let l = Log::RateAboveAdvertised {
                            configured: g.s.limits.requests_per_minute.get(),
                            advertised: n.get(),
                            following: g.s.limits.follow_upstream_limits,
                        };
                        g.fx.log(l);
                    }
                }
                if target != g.rpm_in_force {
                    let l = Log::RateFollowed {
                        from: g.rpm_in_force,
                        to: target,
                    };
                    g.fx.log(l);
                    g.set_rate(shared, target, now, false);
                }
            }
        }
        if let (Some(r), Some(m), true) =
            (obs.rl_chute, &self.model, g.s.limits.follow_upstream_limits)
        {
            let e = g.models.entry(m, now);
            match r {
                AdvertisedRate::PerMinute(n) => match &mut e.rate {
                    Some((old, b)) if *old != n.get() => {
                        b.set_rate(n.get(), 1, now);
                        *old = n.get();
                    }
                    Some(_) => {}
                    None => e.rate = Some((n.get(), Gcra::per_minute(n.get(), 1))),
                },
                AdvertisedRate::Unlimited => e.rate = None,
            }
        }
    }

    /// Feed the upstream's answer back into the budget. Returns the cooldown it started, if
    /// any, for the log line and the rewritten 429.
    pub fn report(&mut self, outcome: Outcome) -> Option<CooldownDecision> {
        self.reported = true;
        let shared = &*self.shared;
        let now = Instant::now();
        let now_unix = shared.wall.now_unix();
        let mut g = shared.lock();
        let s = Arc::clone(&g.s);
        let model_scope = matches!(
            outcome,
            Outcome::RateLimited {
                scope: Scope429::Model,
                ..
            }
        ) && self.model.is_some();
        // What the other replicas must hear about, decided before `outcome` is consumed.
        let news = match &outcome {
            Outcome::Success { .. } if self.probe => FleetNews::ProbeDone(true),
            Outcome::Failed if self.probe => FleetNews::ProbeDone(false),
            // A capacity 429 is the model's, not the account's: as an account probe, the
            // account answered.
            Outcome::RateLimited { .. } if model_scope && self.probe => FleetNews::ProbeDone(true),
            Outcome::RateLimited { .. } if !model_scope => FleetNews::Cooldown,
            Outcome::QuotaExceeded { .. } => FleetNews::Gate,
            _ => FleetNews::Nothing,
        };
        // The model's probe, whatever the answer (a capacity 429 restarts its cooldown).
        if self.model_probe {
            if let Some(m) = self.model.as_ref() {
                let inner = &mut *g;
                if let Some(e) = inner.models.get_mut(m) {
                    if e.probe == Probe::Outstanding {
                        match &outcome {
                            Outcome::Failed => e.probe = Probe::Ready,
                            Outcome::RateLimited { .. } => e.probe = Probe::Open,
                            _ => {
                                e.probe = Probe::Open;
                                e.level = 0;
                                let model = Arc::clone(m);
                                inner.fx.log(Log::ModelProbeSucceeded { model });
                            }
                        }
                    }
                }
            }
        }
        // The account's probe: any answer but an account 429 reopens the gate (a model's
        // capacity 429, a 402, a success: the account answered); no answer lets the next
        // request probe; an account 429 starts the next cooldown below.
        if self.probe && g.cooldown.probe == Probe::Outstanding {
            match &outcome {
                Outcome::Failed => g.cooldown.probe = Probe::Ready,
                Outcome::RateLimited { .. } if !model_scope => {}
                _ => {
                    g.cooldown.probe = Probe::Open;
                    g.fx.log(Log::ProbeAnswered);
                }
            }
        }
        let decision = match outcome {
            Outcome::Success { exhausted } => {
                if let Some(d) = exhausted {
                    let d = d.min(s.cooldown.max);
                    let until = now + d;
                    if !d.is_zero() && g.cooldown.until.is_none_or(|u| u < until) {
                        // A 429 cooldown that is still on stays one when a window reset
                        // lengthens it: it must still end with a single probe and survive
                        // a restart. Only a gate closed on headers alone is proactive.
                        let rate_limited = g.cooldown.until.is_some() && !g.cooldown.proactive;
                        g.cooldown.until = Some(until);
                        g.cooldown.proactive = !rate_limited;
                        if rate_limited {
                            g.fx.persist();
                        }
                        g.fx.log(Log::NoRequestsLeft {
                            seconds: d.as_secs_f64(),
                        });
                    }
                }
                None
            }
            Outcome::RateLimited {
                scope: _,
                hint,
                body,
                ..
            } if model_scope => {
                let m = self.model.clone().unwrap_or_else(|| Arc::from(""));
                let e = g.models.entry(&m, now);
                e.last_body = body;
                e.last_at_unix = now_unix;
                let escalate = self.model_epoch == e.epoch;
                let backoff = Backoff {
                    initial: s.cooldown.model_initial,
                    max: s.cooldown.model_max,
                    multiplier: s.cooldown.multiplier,
                    max_key: "cooldown.model_max",
                };
                let (level, duration, hint_note) = backoff.next(escalate, e.level, e.level, hint);
                if escalate {
                    e.level = level;
                    e.epoch += 1;
                }
                let until = e.until.map_or(now + duration, |u| u.max(now + duration));
                e.until = Some(until);
                if e.probe == Probe::Ready {
                    e.probe = Probe::Open;
                }
                let level = e.level;
                Some(CooldownDecision {
                    duration: until - now,
                    until_unix: now_unix + (until - now).as_secs_f64(),
                    level,
                    hint_note,
                    escalated: escalate,
                    reported_at_unix: now_unix,
                    model: Some(m),
                })
            }
            Outcome::RateLimited {
                hint,
                status,
                headers,
                body,
                ..
            } => {
                g.cooldown.last_429 = Some(Last429 {
                    at_unix: now_unix,
                    status,
                    headers,
                    body,
                });
                let escalate = self.epoch == g.cooldown.epoch;
                let backoff = Backoff {
                    initial: s.cooldown.initial,
                    max: s.cooldown.max,
                    multiplier: s.cooldown.multiplier,
                    max_key: "cooldown.max",
                };
                let (level, duration, hint_note) =
                    backoff.next(escalate, g.effective_level(now), g.cooldown.level, hint);
                let until = now + duration;
                let longer = g.cooldown.until.is_none_or(|u| u < until);
                if escalate {
                    g.cooldown.level = level;
                    g.cooldown.epoch += 1;
                }
                if escalate || longer {
                    g.cooldown.until = Some(g.cooldown.until.map_or(until, |u| u.max(until)));
                    g.cooldown.proactive = false;
                    g.cooldown.probe = Probe::Open;
                }
                let until = g.cooldown.until.unwrap_or(until);
                g.fx.persist();
                Some(CooldownDecision {
                    duration: until - now,
                    until_unix: now_unix + (until - now).as_secs_f64(),
                    level: g.cooldown.level,
                    hint_note,
                    escalated: escalate,
                    reported_at_unix: now_unix,
                    model: None,
                })
            }
            Outcome::QuotaExceeded { reset_unix } => {
                let next_reset = day_end(g.day.index, s.limits.day_reset_offset) as f64;
                // A reset claimed in the past or more than two days ahead is not believable.
                let until = reset_unix
                    .filter(|&r| r > now_unix && r < now_unix + 2.0 * 86_400.0)
                    .unwrap_or(next_reset);
                g.day.gate_until_unix = Some(until);
                g.day.gate_cause = GATE_BY_402;
                g.fx.log(Log::QuotaSpent402 {
                    until: until as i64,
                });
                g.fx.persist();
                None
            }
            Outcome::UsageCap => {
                let until = crate::signals::next_usage_window_unix(now_unix);
                g.usage_cap_until_unix = Some(until);
                g.fx.log(Log::UsageCapSpent {
                    until: until as i64,
                });
                g.fx.persist();
                None
            }
            Outcome::Failed => None,
        };
        let what = match (news, &decision) {
            (FleetNews::ProbeDone(ok), _) => Some(Remote::ProbeDone {
                ok,
                what: "probe result",
            }),
            (FleetNews::Cooldown, Some(d)) => Some(Remote::Cooldown {
                duration: d.duration,
                level: g.cooldown.level,
                decay: s.cooldown.decay_after,
            }),
            (
                _,
                Some(CooldownDecision {
                    model: Some(m),
                    until_unix,
                    level,
                    ..
                }),
            ) => Some(Remote::ModelCooldown {
                model: Arc::clone(m),
                until_unix: *until_unix,
                level: *level,
            }),
            (FleetNews::Gate, _) => g
                .day
                .gate_until_unix
                .map(|until_unix| Remote::DailyGate { until_unix }),
            _ => None,
        };
        let announce = what.and_then(|w| g.store.announce(w));
        let waiting = !g.queue.is_empty();
        drop(g);
        // Told after the lock: the other replicas hear it while this request answers.
        self.announcement = announce.and_then(Call::spawn);
        // Waking the dispatcher with nobody queued costs a cross-thread wake-up per request
        // for nothing; a new waiter wakes it itself.
        if waiting {
            shared.wake.notify_one();
        }
        decision
    }

    /// Wait until the other replicas have been told what `report` found (fleet mode), so a
    /// client that got the rewritten 429 cannot reach another replica before the cooldown
    /// does. Bounded by the Redis call timeout; a no-op without a fleet.
    pub async fn announced(&mut self) {
        if let Some(h) = self.announcement.take() {
            let _ = h.await;
        }
    }

    /// Attach the body of the 429 this permit reported (read after the cooldown started, so
    /// a slow error body never delays closing the gate) to `/status`'s last-429 record,
    /// unless a later 429 has replaced that record meanwhile.
    pub fn attach_429_body(&self, decision: &CooldownDecision, body: String) {
        let mut g = self.shared.lock();
        if let Some(last) = g.cooldown.last_429.as_mut() {
            if last.at_unix == decision.reported_at_unix {
                last.body = body;
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let shared = &*self.shared;
        let waiting = {
            let mut g = shared.lock();
            g.in_flight -= 1;
            if !self.sent {
                // Never sent: give back everything it took, to the day that counted it.
                let units = u64::from(self.cost);
                let same_day = g.day.index == self.day;
                if same_day {
                    g.day.used = g.day.used.saturating_sub(units);
                }
                let c = &mut g.clients[self.client.index()];
                if same_day {
                    c.used_today = c.used_today.saturating_sub(units);
                }
                c.forwarded = c.forwarded.saturating_sub(1);
                if let (Some(b), Some(t)) = (c.bucket.as_mut(), self.client_tat) {
                    b.give_back(t);
                }
                if let (Some(m), Some(t)) = (self.model.as_deref(), self.model_tat) {
                    if let Some((_, r)) = g.models.get_mut(m).and_then(|e| e.rate.as_mut()) {
                        r.give_back(t);
                    }
                }
            }
            if self.probe && !self.reported && g.cooldown.probe == Probe::Outstanding {
                g.cooldown.probe = Probe::Ready;
                let release = g.store.announce(Remote::ProbeDone {
                    ok: false,
                    what: "probe release",
                });
                g.fx.call(release);
            }
            if self.model_probe && !self.reported {
                if let Some(e) = self.model.as_deref().and_then(|m| g.models.get_mut(m)) {
                    if e.probe == Probe::Outstanding {
                        e.probe = Probe::Ready;
                    }
                }
            }
            // What the store itself counted goes back there (for Redis, to the day that
            // counted it; performed after the lock).
            if !self.sent {
                let refund = g.store.refund(self.fleet.as_ref(), g.spacing());
                g.fx.call(refund);
            }
            !g.queue.is_empty()
        };
        // Only a waiter can use the freed slot; with none, skip the cross-thread wake-up.
        if waiting {
            shared.wake.notify_one();
        }
    }
}

/// One kind of cooldown's rules (the account's or a model's): where it starts, its bound
/// (named `max_key` in the note when an upstream hint is clamped to it), its growth.
struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    max_key: &'static str,
}

impl Backoff {
    /// The level and length of the cooldown a 429 starts: one level above `from` (the level
    /// in force) when it escalates, else `level` but at least 1; the upstream's `hint` when
    /// it gave a usable one. With a note for the log line when the hint was not used as is.
    fn next(
        &self,
        escalate: bool,
        from: u32,
        level: u32,
        hint: Option<Hint>,
    ) -> (u32, Duration, Option<String>) {
        let level = if escalate {
            from.saturating_add(1)
        } else {
            level.max(1)
        };
        let computed = ModelGates::backoff(self.initial, self.max, self.multiplier, level);
        let (duration, note) = cooldown_length(hint, computed, self.max, self.max_key);
        (level, duration, note)
    }
}

/// How long a cooldown lasts: the upstream's hint if it gave a readable one (at least 1 s,
/// trusted up to `max`, named `max_key` in the note when clamped), else `computed`; with a
/// note for the log line when the hint was not used as is.
fn cooldown_length(
    hint: Option<Hint>,
    computed: Duration,
    max: Duration,
    max_key: &str,
) -> (Duration, Option<String>) {
    match hint {
        Some(Hint::After(d)) if d <= max => (d.max(Duration::from_secs(1)), None),
        Some(Hint::After(d)) => (
            max,
            Some(format!(
                "upstream asked for {:.0}s, clamped to {max_key}",
                d.as_secs_f64()
            )),
        ),
        Some(Hint::Unparseable(h)) => (
            computed,
            Some(format!("unparseable rate-limit header ignored: {h}")),
        ),
        None => (computed, None),
    }
}

/// What a permit's outcome means for the other replicas.
pub(super) enum FleetNews {
    Nothing,
    ProbeDone(bool),
    Cooldown,
    Gate,
}

//! The budget's decisions: plain state and time in, grants and refusals out. Every gate
//! (daily caps, usage cap, cooldown and its probe, concurrency, durability), the estimate of
//! a newcomer's wait, the choice of who goes next, and what the upstream's figures do to the
//! day. Runs under the admission lock and does no I/O, logs nothing and spawns nothing: what
//! a decision leaves to do (a log line, a state write, a fleet call) goes into `Inner::fx`,
//! performed once the lock is released (`effects.rs`). The account's token comes from the
//! store (`store.rs`), whichever it is.

use super::*;
/// What the dispatcher found for the head of the queue.
pub(super) enum Pick {
    /// This waiter may go as soon as the account has a token.
    Go(ClientId, u64),
    /// Nobody may go now; look again then (or when woken).
    Wait(Option<Instant>),
}

impl Inner {
    pub(super) fn roll_day(&mut self, now_unix: f64) {
        let today = day_index(now_unix as i64, self.s.limits.day_reset_offset);
        if today != self.day.index {
            // Requests still in flight were counted yesterday; today starts at zero.
            self.day.index = today;
            self.day.used = 0;
            self.day.pending = None;
            self.day.assumed = false;
            self.day.fleet_used = 0;
            if self.day.durable != u64::MAX {
                self.day.durable = 0;
            }
            if self.day.gate_until_unix.is_some_and(|g| g <= now_unix) {
                self.day.gate_until_unix = None;
            }
            for c in &mut self.clients {
                c.used_today = 0;
            }
            self.models.new_day();
            if let Some(q) = &mut self.upstream.quota {
                // The upstream's day restarts too; its next figures will say so.
                q.used = 0;
                q.remaining = q.total;
            }
            self.fx.log(Log::NewDay { day: today });
            self.fx.persist();
        }
    }

    /// The daily cap in force: the configured one, or the upstream's plan quota when that
    /// is smaller (only with `beyond_quota = "stop"`: otherwise the plan may overflow into
    /// pay-as-you-go on purpose).
    pub(super) fn daily_cap(&self) -> Option<u64> {
        let upstream = self
            .upstream
            .quota
            .map(|q| q.total)
            .filter(|&t| t > 0 && self.s.beyond_quota_stop());
        match (self.s.limits.requests_per_day.map(|d| d.get()), upstream) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The day's count as clients and operators see it: this process's, or in a fleet the
    /// larger fleet-wide figure Redis last reported.
    pub(super) fn used_view(&self) -> u64 {
        self.day.used.max(self.day.fleet_used)
    }

    /// The GCRA emission interval of the rate in force.
    pub(super) fn spacing(&self) -> Duration {
        store::rate_spacing(self.rpm_in_force)
    }

    /// The rate in force, as the store enforces it.
    pub(super) fn rate(&self) -> Rate {
        Rate {
            spacing: self.spacing(),
            burst: self.s.limits.burst.get(),
        }
    }

    /// The rate the account should run at: the configured one, lowered to the upstream's
    /// advertised rate when that is lower and `follow_upstream_limits` is on.
    pub(super) fn target_rate(&self) -> u32 {
        let configured = self.s.limits.requests_per_minute.get();
        match self.upstream.rl_user {
            Some(AdvertisedRate::PerMinute(n)) if self.s.limits.follow_upstream_limits => {
                configured.min(n.get())
            }
            _ => configured,
        }
    }

    /// Change the rate in force to `rpm`, keeping the schedule (see `Store::set_rate`), so
    /// a change of rate never grants a fresh burst.
    pub(super) fn set_rate(&mut self, shared: &Shared, rpm: u32, now: Instant, force: bool) {
        if rpm == self.rpm_in_force && !force {
            return;
        }
        let old = self.rate();
        self.rpm_in_force = rpm;
        let new = self.rate();
        self.store.set_rate(&shared.clock, old, new, now);
    }

    /// Take the account's token now, if the store can grant it under the lock.
    pub(super) fn take_now(&mut self, shared: &Shared, now: Instant) -> bool {
        let rate = self.rate();
        matches!(self.store.take(&shared.clock, rate, now), store::Take::Now)
    }

    /// The gates other than the bucket, in the contract's order. Ends an expired cooldown.
    pub(super) fn blocked(&mut self, now: Instant, now_unix: f64) -> Option<Blocked> {
        if let Some(cap) = self.daily_cap() {
            if self.used_view() >= cap {
                return Some(Blocked::Daily {
                    open_at_unix: day_end(self.day.index, self.s.limits.day_reset_offset) as f64,
                });
            }
        }
        if let Some(g) = self.day.gate_until_unix {
            if g > now_unix {
                return Some(Blocked::Daily { open_at_unix: g });
            }
            self.day.gate_until_unix = None;
            self.fx.log(Log::QuotaGateReopened);
            self.fx.persist();
        }
        if let Some(g) = self.usage_cap_until_unix {
            if g > now_unix {
                return Some(Blocked::UsageCap { open_at_unix: g });
            }
            self.usage_cap_until_unix = None;
            self.fx.log(Log::UsageCapReopened);
            self.fx.persist();
        }
        if let Some(until) = self.cooldown.until {
            if until > now {
                return Some(Blocked::Cooldown { until });
            }
            self.cooldown.until = None;
            self.cooldown.ended_at = Some(now);
            let level = self.cooldown.level;
            if self.cooldown.proactive {
                self.cooldown.proactive = false;
                self.fx.log(Log::WindowReset);
            } else if self.store.probes_here() {
                self.cooldown.probe = Probe::Ready;
                self.fx.log(Log::CooldownOverProbe { level });
            } else {
                // The store picks the one probe among all replicas.
                self.fx.log(Log::CooldownOverFleetProbes { level });
            }
            self.fx.persist();
        }
        if self.cooldown.probe == Probe::Outstanding {
            return Some(Blocked::Probe);
        }
        if self.in_flight >= self.s.limits.max_concurrent {
            return Some(Blocked::Concurrency);
        }
        if self.day.used >= self.day.durable {
            self.reserve();
            return Some(Blocked::Durability);
        }
        None
    }

    /// Ask the state writer to reserve the next block of daily requests on disk.
    pub(super) fn reserve(&mut self) {
        if self.day.durable == u64::MAX || self.day.pending.is_some() {
            return;
        }
        let block = self.s.reserve_block();
        self.day.pending = Some(self.day.used.saturating_add(block));
        self.fx.persist();
    }

    /// When a request with `ahead` waiters before it would get its token: the bucket's next
    /// conforming time plus one spacing per waiter ahead, and no earlier than the end of a
    /// cooldown (after which the probe goes first and the rest follow at the spacing).
    pub(super) fn estimate(&self, shared: &Shared, ahead: usize, now: Instant) -> Instant {
        let ahead = u32::try_from(ahead).unwrap_or(u32::MAX);
        let at = self.store.estimate(&shared.clock, self.rate(), ahead, now);
        match self.cooldown.until.filter(|&u| u > now) {
            Some(until) => at.max(until + self.spacing().saturating_mul(ahead)),
            None => at,
        }
    }

    /// Both daily caps (the client's and the account's) can take `cost` more today.
    pub(super) fn fits_today(&self, client: ClientId, cost: u32) -> bool {
        let cost = u64::from(cost);
        let c = &self.clients[client.index()];
        self.s
            .clients
            .row(client)
            .requests_per_day
            .is_none_or(|d| c.used_today.saturating_add(cost) <= d)
            && self
                .daily_cap()
                .is_none_or(|d| self.day.used.saturating_add(cost) <= d)
    }

    /// Whether some waiter could be granted now (fairness: a newcomer never overtakes one).
    /// Waiters held by their model's gates or their client's rate do not count. Looks, never
    /// changes anything.
    pub(super) fn anyone_ready(&self, now: Instant, now_unix: f64) -> bool {
        if self.queue.is_empty() {
            return false;
        }
        let clients = &self.clients;
        let models = &self.models;
        self.queue
            .find(
                |c| {
                    clients[c.index()]
                        .bucket
                        .as_ref()
                        .is_none_or(|b| b.is_ready(now))
                },
                |w| {
                    !w.payload.reply.is_closed()
                        && w.payload
                            .model
                            .as_deref()
                            .is_none_or(|m| models.is_open(m, now, now_unix))
                },
                MODEL_SCAN,
            )
            .is_some()
    }

    pub(super) fn client_ready(&self, client: ClientId, now: Instant) -> bool {
        self.clients[client.index()]
            .bucket
            .as_ref()
            .is_none_or(|b| b.is_ready(now))
    }

    /// The client's own daily cap cannot take this request today.
    pub(super) fn client_daily_refusal(
        &self,
        client: ClientId,
        cost: u32,
        now_unix: f64,
    ) -> Option<Rejection> {
        let c = &self.clients[client.index()];
        let row = self.s.clients.row(client);
        let cap = row.requests_per_day?;
        if c.used_today.saturating_add(u64::from(cost)) <= cap {
            return None;
        }
        let reset = day_end(self.day.index, self.s.limits.day_reset_offset) as f64;
        let wait = Duration::from_secs_f64((reset - now_unix).max(0.0));
        let mut r = self.reject(Reason::ClientDailyQuotaExhausted, wait, now_unix);
        r.client = Some(row.name.clone());
        Some(r)
    }

    /// The account's daily cap cannot take a request of this cost today (a cost-1 request
    /// may still fit where a costlier one does not).
    pub(super) fn account_daily_refusal(&self, cost: u32, now_unix: f64) -> Option<Rejection> {
        let cap = self.daily_cap()?;
        if self.day.used.saturating_add(u64::from(cost)) <= cap {
            return None;
        }
        let reset = day_end(self.day.index, self.s.limits.day_reset_offset) as f64;
        let wait = Duration::from_secs_f64((reset - now_unix).max(0.0));
        Some(self.reject(Reason::DailyQuotaExhausted, wait, now_unix))
    }

    /// Hand out a permit: take the client's own rate, the daily counts (account and client)
    /// and a concurrency slot, all at this one moment; the first grant after a cooldown (of
    /// the account or of the request's model) is the probe.
    pub(super) fn grant(
        &mut self,
        shared: &Arc<Shared>,
        client: ClientId,
        model: Option<Arc<str>>,
        cost: u32,
        waited: Duration,
        now: Instant,
    ) -> Permit {
        let units = u64::from(cost);
        self.in_flight += 1;
        self.day.used = self.day.used.saturating_add(units);
        let cap = self.daily_cap();
        if cap.is_some_and(|c| self.day.used >= c && self.day.used - units < c) {
            self.fx.log(Log::DailyCapReached {
                used: self.day.used,
                resets_at: day_end(self.day.index, self.s.limits.day_reset_offset),
            });
        }
        let c = &mut self.clients[client.index()];
        c.used_today = c.used_today.saturating_add(units);
        c.forwarded += 1;
        let client_tat = c.bucket.as_mut().map(|b| b.take(now));
        let probe = self.cooldown.probe == Probe::Ready;
        if probe {
            self.cooldown.probe = Probe::Outstanding;
        }
        let (model_epoch, model_probe, model_tat) = match &model {
            Some(m) => match self.models.get_mut(m) {
                Some(g) => {
                    let p = g.probe == Probe::Ready;
                    if p {
                        g.probe = Probe::Outstanding;
                    }
                    let tat = g.rate.as_mut().map(|(_, r)| r.take(now));
                    (g.epoch, p, tat)
                }
                None => (0, false, None),
            },
            None => (0, false, None),
        };
        if self.day.durable != u64::MAX {
            // Ask for the next block as soon as any of this one is used, so the write is
            // normally done before anyone has to wait for it (a small cap has blocks of 1-3).
            let block = self.s.reserve_block();
            if self.day.used.saturating_add(block) > self.day.durable {
                self.reserve();
            }
        } else if shared.persist.is_some() {
            self.fx.persist();
        }
        Permit {
            shared: Arc::clone(shared),
            client,
            model,
            cost,
            day: self.day.index,
            epoch: self.cooldown.epoch,
            probe,
            model_epoch,
            model_probe,
            client_tat,
            model_tat,
            sent: false,
            reported: false,
            fleet: None,
            announcement: None,
            queue_wait: waited,
        }
    }

    pub(super) fn limits_view(&self, now_unix: f64) -> LimitsView {
        let cap = self.daily_cap();
        LimitsView {
            requests_per_minute: self.rpm_in_force,
            burst: self.s.limits.burst.get(),
            requests_per_day: cap,
            used_today: self.used_view(),
            remaining_today: cap.map(|d| d.saturating_sub(self.used_view())),
            day_resets_at_unix: self.resets_at_unix(now_unix),
        }
    }

    /// The one reset instant in force: an upstream quota gate's reset when one is closed (a
    /// 402's `quota_reset_timestamp`), else the end of the quota day.
    pub(super) fn resets_at_unix(&self, now_unix: f64) -> i64 {
        let day_end = day_end(self.day.index, self.s.limits.day_reset_offset);
        match self.day.gate_until_unix {
            Some(g) if g.is_finite() && g > now_unix => g.ceil() as i64,
            _ => day_end,
        }
    }

    pub(super) fn reject(&self, reason: Reason, retry_after: Duration, now_unix: f64) -> Rejection {
        let now = Instant::now();
        let tripped = match reason {
            Reason::DailyQuotaExhausted
            | Reason::ClientDailyQuotaExhausted
            | Reason::UsageCapExhausted => Policy::Day,
            _ => Policy::Minute,
        };
        Rejection {
            reason,
            retry_after: Some(retry_after),
            limits: Some(self.limits_view(now_unix)),
            cooldown_until_unix: self
                .cooldown
                .until
                .filter(|&u| u > now)
                .map(|u| now_unix + (u - now).as_secs_f64()),
            tripped,
            ..Rejection::new(reason)
        }
    }

    pub(super) fn shutting_down(&self, wait: Duration, now_unix: f64) -> Rejection {
        let mut r = self.reject(
            Reason::ShuttingDown,
            wait.max(Duration::from_secs(1)),
            now_unix,
        );
        r.detail =
            Some("the proxy is shutting down and cannot admit it before its grace ends".into());
        r
    }

    /// The escalation level after decay: a quiet period of `cooldown.decay_after` since the
    /// last cooldown ended forgets it.
    pub(super) fn effective_level(&self, now: Instant) -> u32 {
        match self.cooldown.ended_at {
            Some(end)
                if self.cooldown.until.is_none()
                    && now.saturating_duration_since(end) >= self.s.cooldown.decay_after =>
            {
                0
            }
            _ => self.cooldown.level,
        }
    }

    /// Find the first waiter, in fair order, that its client's rate, its model's gates and
    /// the daily caps let go now. Waiters that can never make it (their deadline ends before
    /// their model reopens, or their daily cap is spent) are answered on the way, in `out`.
    pub(super) fn pick(
        &mut self,
        shared: &Shared,
        now: Instant,
        now_unix: f64,
        out: &mut Out,
    ) -> Pick {
        use std::cell::{Cell, RefCell};
        let wake: Cell<Option<Instant>> = Cell::new(None);
        let soonest = |at: Instant| {
            wake.set(Some(wake.get().map_or(at, |w: Instant| w.min(at))));
        };
        // (client, waiter, reason, retry-after, model-scoped)
        type Shed = Vec<(ClientId, u64, Reason, Duration, bool)>;
        let shed: RefCell<Shed> = RefCell::new(Vec::new());
        let cap = self.daily_cap();
        let used = self.day.used;
        let day_ends = shared
            .wall
            .instant_at(day_end(self.day.index, self.s.limits.day_reset_offset) as f64);
        let found = {
            let Inner {
                queue,
                models,
                clients,
                s,
                ..
            } = self;
            queue.find(
                |c| match clients[c.index()].bucket.as_ref().map(|b| b.ready_at(now)) {
                    Some(at) if at > now => {
                        soonest(at);
                        false
                    }
                    _ => true,
                },
                |w| {
                    if w.payload.reply.is_closed() {
                        return false;
                    }
                    let cost = u64::from(w.payload.cost);
                    if let Some(m) = w.payload.model.as_deref() {
                        match models.blocked(m, now, now_unix) {
                            None => {}
                            Some(b @ (ModelBlock::Cooling(_) | ModelBlock::Quota(_))) => {
                                // Cooling, or its own quota spent: shed those that cannot
                                // wait for it to reopen, wake for the others.
                                let (open, reason) = match b {
                                    ModelBlock::Quota(u) => {
                                        (shared.wall.instant_at(u), Reason::DailyQuotaExhausted)
                                    }
                                    ModelBlock::Cooling(until) => (until, Reason::ModelCooldown),
                                    _ => (now, Reason::ModelCooldown),
                                };
                                if w.deadline < open {
                                    shed.borrow_mut().push((
                                        w.client,
                                        w.id,
                                        reason,
                                        open - now,
                                        true,
                                    ));
                                } else {
                                    soonest(open);
                                }
                                return false;
                            }
                            Some(ModelBlock::Rate(at)) => {
                                soonest(at);
                                return false;
                            }
                            Some(ModelBlock::Probe) => return false,
                        }
                    }
                    let c = &clients[w.client.index()];
                    let over_client = s
                        .clients
                        .row(w.client)
                        .requests_per_day
                        .is_some_and(|d| c.used_today.saturating_add(cost) > d);
                    let over_account = cap.is_some_and(|d| used.saturating_add(cost) > d);
                    if over_client || over_account {
                        if w.deadline < day_ends {
                            let reason = if over_client {
                                Reason::ClientDailyQuotaExhausted
                            } else {
                                Reason::DailyQuotaExhausted
                            };
                            shed.borrow_mut()
                                .push((w.client, w.id, reason, Duration::ZERO, false));
                        } else {
                            soonest(day_ends);
                        }
                        return false;
                    }
                    true
                },
                MODEL_SCAN,
            )
        };
        let shed = shed.into_inner();
        let any_shed = !shed.is_empty();
        for (client, id, reason, wait, model_scoped) in shed {
            if let Some(w) = self.queue.remove(client, id) {
                let mut r = match reason {
                    Reason::ClientDailyQuotaExhausted => {
                        match self.client_daily_refusal(client, w.payload.cost, now_unix) {
                            Some(r) => r,
                            None => continue,
                        }
                    }
                    Reason::DailyQuotaExhausted if !model_scoped => {
                        match self.account_daily_refusal(w.payload.cost, now_unix) {
                            Some(r) => r,
                            None => continue,
                        }
                    }
                    _ => self.reject(reason, wait, now_unix),
                };
                if model_scoped {
                    r.model = w.payload.model.clone();
                }
                out.push((w.payload.reply, Err(r)));
            }
        }
        match found {
            Some((c, id)) => Pick::Go(c, id),
            // Answering someone changed the queue: look again at once.
            None if any_shed => Pick::Wait(Some(now)),
            None => Pick::Wait(wake.get()),
        }
    }

    /// Grant the waiter `pick` found, if it is still there.
    pub(super) fn serve(
        &mut self,
        shared: &Arc<Shared>,
        client: ClientId,
        id: u64,
        now: Instant,
        out: &mut Out,
    ) -> bool {
        let Some(w) = self.queue.serve(client, id) else {
            return false;
        };
        let waited = now.saturating_duration_since(w.enqueued);
        let permit = self.grant(shared, client, w.payload.model, w.payload.cost, waited, now);
        out.push((w.payload.reply, Ok(permit)));
        true
    }

    /// One dispatcher pass: grant or shed as many waiters as possible, then say when to look
    /// again. Replies are collected in `out` and sent after the lock is released (a refused
    /// reply drops its permit, and the permit's `Drop` takes the lock).
    pub(super) fn step(&mut self, shared: &Arc<Shared>, out: &mut Out) -> Next {
        let now = Instant::now();
        let now_unix = shared.wall.now_unix();
        self.roll_day(now_unix);
        if let Some(end) = self.closing {
            if now >= end {
                for w in self.queue.drain_where(|_| true) {
                    let r = self.shutting_down(Duration::from_secs(1), now_unix);
                    out.push((w.payload.reply, Err(r)));
                }
                return Next::Idle;
            }
        }
        let closing = self.closing;
        let bounded = |n: Next| match (n, closing) {
            (Next::Idle, Some(end)) => Next::At(end),
            (Next::At(at), Some(end)) => Next::At(at.min(end)),
            (n, _) => n,
        };
        loop {
            if self.queue.is_empty() {
                return Next::Idle;
            }
            match self.blocked(now, now_unix) {
                Some(Blocked::Daily { open_at_unix })
                | Some(Blocked::UsageCap { open_at_unix }) => {
                    let reason = if self.usage_cap_until_unix.is_some_and(|u| u > now_unix)
                        && !self.day.gate_until_unix.is_some_and(|u| u > now_unix)
                        && self.daily_cap().is_none_or(|c| self.day.used < c)
                    {
                        Reason::UsageCapExhausted
                    } else {
                        Reason::DailyQuotaExhausted
                    };
                    let open = shared.wall.instant_at(open_at_unix);
                    for w in self.queue.drain_where(|w| w.deadline < open) {
                        let r = self.reject(reason, open - now, now_unix);
                        out.push((w.payload.reply, Err(r)));
                    }
                    return bounded(if self.queue.is_empty() {
                        Next::Idle
                    } else {
                        Next::At(open)
                    });
                }
                Some(Blocked::Cooldown { until }) => {
                    for w in self.queue.drain_where(|w| w.deadline < until) {
                        let r = self.reject(Reason::UpstreamCooldown, until - now, now_unix);
                        out.push((w.payload.reply, Err(r)));
                    }
                    return bounded(Next::At(until));
                }
                Some(Blocked::Probe | Blocked::Concurrency | Blocked::Durability) => {
                    return bounded(Next::Idle)
                }
                None => {}
            }
            let (client, id) = match self.pick(shared, now, now_unix, out) {
                Pick::Go(c, id) => (c, id),
                Pick::Wait(Some(at)) if at <= now => continue,
                Pick::Wait(Some(at)) => return bounded(Next::At(at)),
                Pick::Wait(None) => return bounded(Next::Idle),
            };
            let rate = self.rate();
            match self.store.take(&shared.clock, rate, now) {
                store::Take::Now => {
                    self.serve(shared, client, id, now, out);
                }
                store::Take::NotBefore(at) => return bounded(Next::At(at)),
                // The token comes from Redis, asked outside the lock by the dispatcher.
                store::Take::Remote(fleet) => return Next::Take(fleet),
            }
        }
    }

    /// The store granted a token outside the lock (Redis); give it to the waiter that may go
    /// now, if any.
    pub(super) fn grant_head(&mut self, shared: &Arc<Shared>, out: &mut Out, now: Instant) -> bool {
        let now_unix = shared.wall.now_unix();
        loop {
            match self.pick(shared, now, now_unix, out) {
                Pick::Go(c, id) => return self.serve(shared, c, id, now, out),
                Pick::Wait(Some(at)) if at <= now => continue,
                Pick::Wait(_) => return false,
            }
        }
    }

    /// A cooldown announced by the fleet (or found in Redis): close this replica's gate too.
    pub(super) fn apply_fleet_cooldown(&mut self, shared: &Shared, until_unix: f64, level: u32) {
        let now = Instant::now();
        let until = shared.wall.instant_at(until_unix);
        if until > now && self.cooldown.until.is_none_or(|u| u < until) {
            self.cooldown.until = Some(until);
            self.cooldown.proactive = false;
            self.cooldown.epoch += 1;
            if self.cooldown.probe == Probe::Ready {
                self.cooldown.probe = Probe::Open;
            }
            self.fx.log(Log::FleetCooldown {
                seconds: (until - now).as_secs_f64(),
                level,
            });
        }
        self.cooldown.level = self.cooldown.level.max(level);
        self.store.wait_remote(None);
    }

    /// The account's daily figures as the upstream sees them (a header snapshot taken before
    /// a call of `cost`, or the usage poll with `cost` 0). The day's count only goes up.
    pub(super) fn apply_account_quota(
        &mut self,
        total: u64,
        used: u64,
        remaining: u64,
        cost: u32,
        now_unix: f64,
        source: QuotaSeen,
    ) {
        self.upstream.quota = Some(UpstreamQuota {
            total,
            used,
            remaining,
            seen_at_unix: now_unix,
            source,
        });
        if total == 0 {
            // No daily quota: the account pays as it goes; nothing to gate on.
            return;
        }
        let floor = used.saturating_add(u64::from(cost));
        if floor > self.day.used {
            self.day.used = floor;
            self.fx.persist();
        }
        let spent = remaining <= u64::from(cost);
        if spent && self.s.beyond_quota_stop() {
            let until = day_end(self.day.index, self.s.limits.day_reset_offset) as f64;
            if self.day.gate_until_unix.is_none_or(|g| g < until) {
                self.day.gate_until_unix = Some(until);
                self.day.gate_cause = GATE_BY_HEADERS;
                self.fx.log(Log::QuotaSpentByHeaders {
                    total,
                    used,
                    until: until as i64,
                });
                self.fx.persist();
            }
        }
    }
}

/// What the dispatcher does next.
pub(super) enum Next {
    /// Nothing to do until woken.
    Idle,
    /// Look again at this instant (or when woken).
    At(Instant),
    /// Ask the store, outside the lock, for a token for the head of the queue (Redis).
    Take(Arc<Fleet>),
}

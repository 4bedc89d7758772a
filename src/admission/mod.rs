//! The account-wide budget: one governor GCRA bucket, a daily cap, a concurrency cap, the
//! upstream cooldown gate and the fair queue in front of them.
//!
//! Shape: all mutable state sits in one `Mutex<Inner>` that is only ever held for a few
//! hundred nanoseconds and never across an `.await`. A request that can be admitted at once
//! (empty queue, every gate open, a token in the bucket) is admitted inline by [`Admission::acquire`]
//! without any task switch. Everything else waits on a oneshot channel, and a single
//! dispatcher task decides who goes next: only the dispatcher sleeps on a timer, so waiters
//! never wake as a herd, and the queue decides the order, so a newcomer never overtakes.
//!
//! What is absent on purpose: no I/O (the state file is written by `crate::state`'s writer
//! task; admission only asks for a write and waits for it), no HTTP types, no response
//! rendering (a refusal is a typed [`Rejection`] that `crate::response` turns into bytes).
//!
//! Tokens and the daily count are taken only at the moment a request is granted; a waiter that
//! leaves or times out consumes nothing. The grant is a [`Permit`] that the proxy keeps inside
//! the response body, so the concurrency slot is freed exactly when the stream ends or the
//! client goes away, and a permit dropped before its request was sent gives the daily count
//! back.

pub mod fleet;
mod queue;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

use fleet::{Fleet, OnError, Take};
pub use queue::ClientId;
use queue::FairQueue;

use crate::clock::{TokioClock, WallClock};
use crate::config::Config;
use crate::response::{LimitsView, Policy, Reason, Rejection};
use crate::signals::Hint;
use crate::state::Persisted;
use crate::units::{day_end, day_index};

type Bucket = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;
type Reply = oneshot::Sender<Result<Permit, Rejection>>;

/// What the budget needs from the configuration, copied out once.
#[derive(Debug, Clone)]
pub struct Settings {
    pub requests_per_minute: u32,
    pub burst: u32,
    pub requests_per_day: Option<u64>,
    pub day_reset_offset: u32,
    pub max_concurrent: usize,
    pub max_depth: usize,
    pub max_wait: Duration,
    pub cooldown_initial: Duration,
    pub cooldown_max: Duration,
    pub cooldown_multiplier: f64,
    pub cooldown_decay: Duration,
    /// Whether granted requests must be covered by a reservation on disk first.
    pub durable: bool,
    pub clients: Vec<ClientSettings>,
    /// Share of the limits used while Redis is unreachable with `on_redis_error = "local"`.
    pub fallback_share: f64,
}

#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub name: Arc<str>,
    pub weight: u32,
    pub requests_per_minute: Option<u32>,
    pub burst: u32,
    pub requests_per_day: Option<u64>,
    pub max_wait: Option<Duration>,
}

impl Settings {
    pub fn from_config(c: &Config) -> Settings {
        let mut clients = vec![ClientSettings {
            name: Arc::from("default"),
            weight: c.clients.default_weight.get(),
            requests_per_minute: None,
            burst: 1,
            requests_per_day: None,
            max_wait: None,
        }];
        clients.extend(c.clients.clients.iter().map(|cc| ClientSettings {
            name: Arc::from(cc.name.as_str()),
            weight: cc.weight.get(),
            requests_per_minute: cc.requests_per_minute.map(|r| r.get()),
            burst: cc.burst.get(),
            requests_per_day: cc.requests_per_day.map(|d| d.get()),
            max_wait: cc.max_wait,
        }));
        Settings {
            requests_per_minute: c.limits.requests_per_minute.get(),
            burst: c.limits.burst.get(),
            requests_per_day: c.limits.requests_per_day.map(|d| d.get()),
            day_reset_offset: c.limits.day_reset_offset,
            max_concurrent: c.limits.max_concurrent,
            max_depth: c.queue.max_depth,
            max_wait: c.queue.max_wait,
            cooldown_initial: c.cooldown.initial,
            cooldown_max: c.cooldown.max,
            cooldown_multiplier: c.cooldown.multiplier,
            cooldown_decay: c.cooldown.decay_after,
            durable: c.state.path.is_some(),
            clients,
            fallback_share: c.shared_state.local_fallback_share,
        }
    }

    /// The GCRA emission interval.
    pub fn spacing(&self) -> Duration {
        Duration::from_secs(60) / self.requests_per_minute.max(1)
    }

    /// How many daily requests one state write reserves ahead. A crash over-counts by at most
    /// this much; a larger block means fewer fsyncs. 1% of the cap, between 1 and 50.
    fn reserve_block(&self) -> u64 {
        self.requests_per_day.map_or(1, |d| (d / 100).clamp(1, 50))
    }
}

/// How an upstream exchange ended, as far as the budget cares.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A response that was not a rate-limit signal. `exhausted` is set when its headers say no
    /// requests are left until the given delay (proactive closing of the gate).
    Success { exhausted: Option<Duration> },
    /// Upstream 429.
    RateLimited {
        hint: Option<Hint>,
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Upstream 402 with a quota message.
    QuotaExceeded { reset_unix: Option<f64> },
    /// No usable response: connect error, reset, timeout.
    Failed,
}

/// What a 429 did to the gate, for the log line and the rewritten response.
#[derive(Debug, Clone)]
pub struct CooldownDecision {
    pub duration: Duration,
    pub until_unix: f64,
    pub level: u32,
    /// Why the upstream's hint was not used as is (garbage, or clamped to `cooldown.max`).
    pub hint_note: Option<String>,
    /// False when this 429 belonged to a burst already being cooled down.
    pub escalated: bool,
    /// When the 429 was recorded (`Last429::at_unix`), to attach its body later.
    pub reported_at_unix: f64,
}

/// The last upstream 429, for `/status`.
#[derive(Debug, Clone)]
pub struct Last429 {
    pub at_unix: f64,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Normal operation.
    Open,
    /// A cooldown just ended: the next request granted is the probe.
    Ready,
    /// The probe is in flight; everyone else waits for its answer.
    Outstanding,
}

impl Probe {
    pub fn as_str(self) -> &'static str {
        match self {
            Probe::Open => "open",
            Probe::Ready => "probe_ready",
            Probe::Outstanding => "probe_in_flight",
        }
    }
}

struct Cooldown {
    until: Option<Instant>,
    /// Set for a gate closed by `remaining: 0` headers rather than a 429: no escalation and no
    /// probe afterwards, the upstream told us exactly when it resets.
    proactive: bool,
    level: u32,
    /// Incremented whenever a cooldown starts; a permit remembers the epoch it was granted in
    /// so that 429s from requests already in flight do not escalate the same episode again.
    epoch: u64,
    probe: Probe,
    ended_at: Option<Instant>,
    last_429: Option<Last429>,
}

struct Day {
    index: i64,
    /// Granted today, including requests in flight.
    used: u64,
    /// Reserved on disk: a crash restarts with this count, so `used` may never pass it.
    durable: u64,
    /// A reservation write in progress up to this count.
    pending: Option<u64>,
    /// Upstream 402 quota gate (UNIX seconds).
    gate_until_unix: Option<f64>,
}

struct ClientState {
    settings: ClientSettings,
    bucket: Option<Bucket>,
    used_today: u64,
    forwarded: u64,
}

struct Inner {
    queue: FairQueue<Reply>,
    in_flight: usize,
    /// Mirror of governor's theoretical arrival time (a reading of `clock`), because governor
    /// offers no way to look without taking. Updated exactly as governor's GCRA does on each
    /// token taken, and used only for estimates and `/status`, never for the decision itself.
    tat: Option<Duration>,
    day: Day,
    cooldown: Cooldown,
    clients: Vec<ClientState>,
    /// Fleet mode: Redis said the next token is not before this; no need to ask earlier.
    remote_not_before: Option<Instant>,
}

struct Shared {
    settings: Settings,
    clock: TokioClock,
    wall: WallClock,
    bucket: Bucket,
    inner: Mutex<Inner>,
    /// Wakes the dispatcher: a waiter arrived or left, a permit ended, a gate changed.
    wake: Notify,
    /// Bumped to ask the state writer for a write; `None` when memory only.
    persist: Option<watch::Sender<u64>>,
    /// The shared Redis budget, when `shared_state.backend = "redis"`.
    fleet: Option<Arc<Fleet>>,
    /// The local budget used while Redis is unreachable (`on_redis_error = "local"`).
    fallback: Bucket,
}

/// The handle the proxy holds. Dropping it stops the dispatcher.
pub struct Admission {
    shared: Arc<Shared>,
    dispatcher: tokio::task::JoinHandle<()>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

/// Why the budget cannot grant right now, other than the bucket.
enum Blocked {
    Daily { open_at_unix: f64 },
    Cooldown { until: Instant },
    Probe,
    Concurrency,
    Durability,
}

impl Admission {
    /// Build the budget from settings and the persisted state, and start its dispatcher.
    /// `persist` is the state writer's trigger (see `crate::state::spawn_writer`).
    pub fn new(
        settings: Settings,
        wall: WallClock,
        restored: Persisted,
        persist: Option<watch::Sender<u64>>,
    ) -> Admission {
        Admission::with_fleet(settings, wall, restored, persist, None)
    }

    /// As [`Admission::new`], sharing the account budget with other replicas through `fleet`.
    /// Daily counts then live in Redis; the state file only keeps this replica's figures.
    pub fn with_fleet(
        settings: Settings,
        wall: WallClock,
        restored: Persisted,
        persist: Option<watch::Sender<u64>>,
        fleet: Option<Arc<Fleet>>,
    ) -> Admission {
        let clock = TokioClock::new(Instant::now());
        let bucket = make_bucket(settings.requests_per_minute, settings.burst, clock);
        let now_unix = wall.now_unix();
        let today = day_index(now_unix as i64, settings.day_reset_offset);
        let (used, gate) = if restored.day == Some(today) {
            (restored.used, restored.daily_gate_until_unix)
        } else {
            (0, None)
        };
        let durable = if settings.durable && settings.requests_per_day.is_some() && fleet.is_none()
        {
            used
        } else {
            u64::MAX
        };
        let gate = gate.filter(|&g| g > now_unix);
        let cooldown_until = restored
            .cooldown_until_unix
            .filter(|&u| u > now_unix)
            .map(|u| wall.instant_at(u));
        let clients = settings
            .clients
            .iter()
            .map(|c| ClientState {
                bucket: c
                    .requests_per_minute
                    .map(|rpm| make_bucket(rpm, c.burst, clock)),
                used_today: if restored.day == Some(today) {
                    restored.clients.get(&*c.name).copied().unwrap_or(0)
                } else {
                    0
                },
                forwarded: 0,
                settings: c.clone(),
            })
            .collect();
        let weights: Vec<u32> = settings.clients.iter().map(|c| c.weight).collect();
        let inner = Inner {
            queue: FairQueue::new(&weights),
            in_flight: 0,
            tat: None,
            day: Day {
                index: today,
                used,
                durable,
                pending: None,
                gate_until_unix: gate,
            },
            cooldown: Cooldown {
                until: cooldown_until,
                proactive: false,
                level: restored.cooldown_level,
                epoch: 0,
                probe: Probe::Open,
                ended_at: None,
                last_429: None,
            },
            clients,
            remote_not_before: None,
        };
        let share = settings.fallback_share.clamp(0.0, 1.0);
        let fallback = make_bucket(
            ((f64::from(settings.requests_per_minute) * share).floor() as u32).max(1),
            ((f64::from(settings.burst) * share).floor() as u32).max(1),
            clock,
        );
        let shared = Arc::new(Shared {
            settings,
            clock,
            wall,
            bucket,
            inner: Mutex::new(inner),
            wake: Notify::new(),
            persist,
            fleet,
            fallback,
        });
        if let Some(f) = &shared.fleet {
            tokio::spawn(listen_fleet(Arc::clone(f), Arc::downgrade(&shared)));
        }
        let dispatcher = tokio::spawn(dispatch(Arc::clone(&shared)));
        Admission { shared, dispatcher }
    }

    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// Client index by name (`default` is 0).
    pub fn client_id(&self, name: &str) -> Option<ClientId> {
        self.shared
            .settings
            .clients
            .iter()
            .position(|c| &*c.name == name)
    }

    pub fn client_name(&self, id: ClientId) -> Arc<str> {
        self.shared.settings.clients[id].name.clone()
    }

    /// Wait for admission. `max_wait` is the caller's wait (already capped by the proxy at
    /// `queue.max_wait` and the client's own limit). Cancel-safe: dropping the future leaves
    /// the queue at once and consumes nothing.
    pub async fn acquire(&self, client: ClientId, max_wait: Duration) -> Result<Permit, Rejection> {
        let shared = &self.shared;
        let now = Instant::now();
        let mut max_wait = max_wait;
        let mut deadline = now + max_wait;
        let (id, rx) = {
            let mut g = shared.lock();
            let now_unix = shared.wall.now_unix();
            g.roll_day(shared, now_unix);
            let blocked = g.blocked(shared, now, now_unix);
            if shared.fleet.is_some()
                && max_wait.is_zero()
                && g.queue.is_empty()
                && blocked.is_none()
            {
                // "Never queue" still deserves its one question to Redis: there is no inline
                // grant in fleet mode, so allow exactly the time of that round trip.
                max_wait = fleet::CALL_TIMEOUT;
                deadline = now + max_wait;
            }
            // The client's own caps are checked only once the account could take the request
            // at all, so a request shed for an account reason costs its client nothing.
            let mut client_checked = false;
            if let Some(f) = &shared.fleet {
                if !f.is_healthy() && f.settings.on_error == OnError::FailClosed {
                    // Shed now; the dispatcher keeps checking whether Redis is back.
                    drop(g);
                    shared.wake.notify_one();
                    let mut r = Rejection::new(Reason::SharedStateUnavailable);
                    r.retry_after = Some(fleet::CALL_TIMEOUT * 2);
                    r.detail = f.last_error();
                    return Err(r);
                }
            }
            // In fleet mode every grant goes through the dispatcher's one Redis call.
            if g.queue.is_empty() && blocked.is_none() && shared.fleet.is_none() {
                g.check_client_caps(shared, client, now_unix)?;
                client_checked = true;
                if shared.bucket.check().is_ok() {
                    g.took_token(shared);
                    return Ok(g.grant(shared, client, Duration::ZERO));
                }
            }
            // Not now: shed at once if waiting cannot help, in the contract's order.
            match blocked {
                Some(Blocked::Daily { open_at_unix }) => {
                    let open = shared.wall.instant_at(open_at_unix);
                    if open > deadline {
                        return Err(g.reject(
                            shared,
                            Reason::DailyQuotaExhausted,
                            open - now,
                            now_unix,
                        ));
                    }
                }
                Some(Blocked::Cooldown { until }) if until > deadline => {
                    return Err(g.reject(shared, Reason::UpstreamCooldown, until - now, now_unix));
                }
                _ => {}
            }
            if g.queue.len() >= shared.settings.max_depth {
                // When the last request now queued is served.
                let drain = g.estimate(shared, g.queue.len().saturating_sub(1), now) - now;
                return Err(g.reject(shared, Reason::QueueFull, drain, now_unix));
            }
            let ahead = g.queue.ahead_of_new(client);
            let eta = g.estimate(shared, ahead, now);
            if eta > deadline || max_wait.is_zero() {
                let wait = (eta - now).max(shared.settings.spacing().min(Duration::from_secs(1)));
                let mut r = g.reject(shared, Reason::QueueTimeout, wait, now_unix);
                r.detail = Some(if max_wait.is_zero() {
                    "the request asked not to queue".into()
                } else {
                    format!(
                        "estimated wait {:.1}s exceeds the wait limit {:.1}s",
                        (eta - now).as_secs_f64(),
                        max_wait.as_secs_f64()
                    )
                });
                return Err(r);
            }
            if !client_checked {
                g.check_client_caps(shared, client, now_unix)?;
            }
            let (tx, rx) = oneshot::channel();
            let id = g.queue.push(client, deadline, now, tx);
            (id, rx)
        };
        shared.wake.notify_one();
        let mut guard = LeaveOnDrop {
            shared,
            client,
            id,
            armed: true,
        };
        let mut rx = rx;
        let result = tokio::select! {
            r = &mut rx => r.ok(),
            _ = tokio::time::sleep_until(deadline) => rx.try_recv().ok(),
        };
        guard.armed = false;
        match result {
            Some(r) => r,
            None => {
                // Deadline reached. A token due at this very instant may not have been handed
                // out yet (the dispatcher's timer fires at the same tick): run one dispatcher
                // step first, so a request whose estimate was exactly its deadline is served.
                let mut out = Vec::new();
                let _ = shared.lock().step(shared, &mut out);
                for (tx, r) in out {
                    let _ = tx.send(r);
                }
                if let Ok(r) = rx.try_recv() {
                    return r;
                }
                let mut g = shared.lock();
                g.queue.remove(client, id);
                let now = Instant::now();
                let now_unix = shared.wall.now_unix();
                let ahead = g.queue.len();
                let eta = g.estimate(shared, ahead, now);
                let mut r = g.reject(shared, Reason::QueueTimeout, eta - now, now_unix);
                r.detail = Some(format!(
                    "waited {:.1}s, the wait limit",
                    max_wait.as_secs_f64()
                ));
                drop(g);
                shared.wake.notify_one();
                Err(r)
            }
        }
    }

    /// A point-in-time view for `/status` and metrics.
    pub fn snapshot(&self) -> Snapshot {
        let shared = &self.shared;
        let now = Instant::now();
        let now_unix = shared.wall.now_unix();
        let mut g = shared.lock();
        g.roll_day(shared, now_unix);
        let s = &shared.settings;
        let (tokens, next_in) = g.tokens_now(shared);
        let cooldown_until = g.cooldown.until.filter(|&u| u > now);
        Snapshot {
            requests_per_minute: s.requests_per_minute,
            burst: s.burst,
            requests_per_day: s.requests_per_day,
            max_concurrent: s.max_concurrent,
            max_depth: s.max_depth,
            max_wait: s.max_wait,
            tokens_available: tokens,
            next_token_in: next_in,
            used_today: g.day.used,
            remaining_today: s.requests_per_day.map(|d| d.saturating_sub(g.day.used)),
            day_resets_at_unix: day_end(g.day.index, s.day_reset_offset),
            daily_gate_until_unix: g.day.gate_until_unix.filter(|&u| u > now_unix),
            cooldown_active: cooldown_until.is_some(),
            cooldown_proactive: cooldown_until.is_some() && g.cooldown.proactive,
            cooldown_until_unix: cooldown_until.map(|u| shared.wall.unix_at(u)),
            cooldown_level: g.effective_level(shared, now),
            gate: g.cooldown.probe,
            last_429: g.cooldown.last_429.clone(),
            queue_depth: g.queue.len(),
            oldest_wait: g.queue.oldest().map(|o| now - o),
            in_flight: g.in_flight,
            clients: g
                .clients
                .iter()
                .enumerate()
                .map(|(i, c)| ClientSnapshot {
                    name: c.settings.name.clone(),
                    weight: c.settings.weight,
                    queued: g.queue.client_len(i),
                    used_today: c.used_today,
                    forwarded: c.forwarded,
                    requests_per_minute: c.settings.requests_per_minute,
                    requests_per_day: c.settings.requests_per_day,
                })
                .collect(),
        }
    }

    /// What the state file should hold now. `exact` (clean shutdown) stores the true count;
    /// otherwise the reservation, so that a crash can only over-count.
    pub fn persisted(&self, exact: bool) -> Persisted {
        self.shared.persisted(exact)
    }

    /// Called by the state writer after a successful write of `p`.
    pub fn persisted_ok(&self, p: &Persisted) {
        let shared = &self.shared;
        {
            let mut g = shared.lock();
            if p.day == Some(g.day.index) && g.day.durable != u64::MAX {
                g.day.durable = g.day.durable.max(p.used);
            }
            if g.day.pending.is_some_and(|t| t <= p.used) {
                g.day.pending = None;
            }
        }
        shared.wake.notify_one();
    }

    /// Whether a reservation of daily requests is waiting to be written: the state writer
    /// writes those at once instead of coalescing them, since a grant may be waiting on it.
    pub fn reservation_pending(&self) -> bool {
        self.shared.lock().day.pending.is_some()
    }

    /// A rejection carrying the current limits (for responses built outside admission).
    pub fn rejection(&self, reason: Reason) -> Rejection {
        let shared = &self.shared;
        let now_unix = shared.wall.now_unix();
        let now = Instant::now();
        let mut g = shared.lock();
        let retry = match g.blocked(shared, now, now_unix) {
            Some(Blocked::Daily { open_at_unix }) => {
                Some(Duration::from_secs_f64((open_at_unix - now_unix).max(0.0)))
            }
            Some(Blocked::Cooldown { until }) => Some(until - now),
            _ => None,
        };
        let mut r = g.reject(shared, reason, Duration::ZERO, now_unix);
        r.retry_after = retry;
        r
    }

    /// Called by the state writer after a pause following a failed write: look again (the
    /// dispatcher asks for a new reservation if someone is waiting for one).
    pub fn persist_retry(&self) {
        self.shared.wake.notify_one();
    }

    /// Called by the state writer when a write failed: the reservation did not happen, so a
    /// new one will be asked for (the writer retries after a pause).
    pub fn persist_failed(&self) {
        let mut g = self.shared.lock();
        g.day.pending = None;
    }
}

/// Removes a waiter from the queue if its request future is dropped while queued (the client
/// went away): it leaves at once and its place goes to the next.
struct LeaveOnDrop<'a> {
    shared: &'a Shared,
    client: ClientId,
    id: u64,
    armed: bool,
}

impl Drop for LeaveOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let removed = self.shared.lock().queue.remove(self.client, self.id);
            drop(removed);
            self.shared.wake.notify_one();
        }
    }
}

fn make_bucket(rpm: u32, burst: u32, clock: TokioClock) -> Bucket {
    let period = Duration::from_secs(60) / rpm.max(1);
    // `with_period` only fails for a zero period, which a non-zero rpm cannot give; fall back
    // to one per nanosecond rather than panic.
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(std::num::NonZeroU32::MAX))
        .allow_burst(std::num::NonZeroU32::new(burst).unwrap_or(std::num::NonZeroU32::MIN));
    RateLimiter::direct_with_clock(quota, clock)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug; the state is still consistent
        // enough to keep serving, so recover rather than take the whole proxy down.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request_persist(&self) {
        if let Some(p) = &self.persist {
            p.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    fn persisted(&self, exact: bool) -> Persisted {
        let g = self.lock();
        let now = Instant::now();
        let used = if exact {
            g.day.used
        } else {
            g.day.pending.unwrap_or(0).max(g.day.used)
        };
        Persisted {
            day: Some(g.day.index),
            used,
            daily_gate_until_unix: g.day.gate_until_unix,
            cooldown_until_unix: g
                .cooldown
                .until
                .filter(|&u| u > now && !g.cooldown.proactive)
                .map(|u| self.wall.unix_at(u)),
            cooldown_level: g.cooldown.level,
            clients: g
                .clients
                .iter()
                .filter(|c| c.used_today > 0)
                .map(|c| (c.settings.name.to_string(), c.used_today))
                .collect(),
        }
    }
}

impl Inner {
    fn roll_day(&mut self, shared: &Shared, now_unix: f64) {
        let today = day_index(now_unix as i64, shared.settings.day_reset_offset);
        if today != self.day.index {
            // Requests still in flight were counted yesterday; today starts at zero.
            self.day.index = today;
            self.day.used = 0;
            self.day.pending = None;
            if self.day.durable != u64::MAX {
                self.day.durable = 0;
            }
            if self.day.gate_until_unix.is_some_and(|g| g <= now_unix) {
                self.day.gate_until_unix = None;
            }
            for c in &mut self.clients {
                c.used_today = 0;
            }
            tracing::info!(
                day = today,
                "new quota day: daily counts reset, daily gate open"
            );
            shared.request_persist();
        }
    }

    /// The gates other than the bucket, in the contract's order. Ends an expired cooldown.
    fn blocked(&mut self, shared: &Shared, now: Instant, now_unix: f64) -> Option<Blocked> {
        let s = &shared.settings;
        if let Some(cap) = s.requests_per_day {
            if self.day.used >= cap {
                return Some(Blocked::Daily {
                    open_at_unix: day_end(self.day.index, s.day_reset_offset) as f64,
                });
            }
        }
        if let Some(g) = self.day.gate_until_unix {
            if g > now_unix {
                return Some(Blocked::Daily { open_at_unix: g });
            }
            self.day.gate_until_unix = None;
            tracing::info!("upstream quota gate reopened");
            shared.request_persist();
        }
        if let Some(until) = self.cooldown.until {
            if until > now {
                return Some(Blocked::Cooldown { until });
            }
            self.cooldown.until = None;
            self.cooldown.ended_at = Some(now);
            if self.cooldown.proactive {
                self.cooldown.proactive = false;
                tracing::info!("upstream rate-limit window reset: gate reopened");
            } else if shared.fleet.is_none() {
                self.cooldown.probe = Probe::Ready;
                tracing::info!(
                    level = self.cooldown.level,
                    "cooldown over: sending one probe request before reopening"
                );
            } else {
                // In a fleet, Redis picks the one probe among all replicas.
                tracing::info!(
                    level = self.cooldown.level,
                    "cooldown over: the fleet probes once"
                );
            }
            shared.request_persist();
        }
        if self.cooldown.probe == Probe::Outstanding {
            return Some(Blocked::Probe);
        }
        if self.in_flight >= s.max_concurrent {
            return Some(Blocked::Concurrency);
        }
        if self.day.used >= self.day.durable {
            self.reserve(shared);
            return Some(Blocked::Durability);
        }
        None
    }

    /// Ask the state writer to reserve the next block of daily requests on disk.
    fn reserve(&mut self, shared: &Shared) {
        if self.day.durable == u64::MAX || self.day.pending.is_some() {
            return;
        }
        let block = shared.settings.reserve_block();
        self.day.pending = Some(self.day.used.saturating_add(block));
        shared.request_persist();
    }

    /// Record a token taken from governor in the mirror (same update as governor's GCRA).
    fn took_token(&mut self, shared: &Shared) {
        let now = shared.clock.now();
        let t = shared.settings.spacing();
        let tat = self.tat.unwrap_or(now).max(now);
        self.tat = Some(tat + t);
    }

    /// Tokens in the bucket now, and how long until the next one.
    fn tokens_now(&self, shared: &Shared) -> (u32, Duration) {
        let s = &shared.settings;
        let t = s.spacing();
        let tau = t * (s.burst - 1);
        let now = shared.clock.now();
        let Some(tat) = self.tat else {
            return (s.burst, Duration::ZERO);
        };
        let earliest = tat.saturating_sub(tau);
        if now < earliest {
            return (0, earliest - now);
        }
        let tokens = ((now + t - earliest).as_nanos() / t.as_nanos().max(1)) as u64;
        let tokens = tokens.min(u64::from(s.burst)) as u32;
        let next = if tokens >= s.burst {
            Duration::ZERO
        } else {
            let next_at = earliest + t * tokens;
            next_at.saturating_sub(now)
        };
        (tokens, next)
    }

    /// When a request with `ahead` waiters before it would get its token: the bucket's next
    /// conforming time plus one spacing per waiter ahead, and no earlier than the end of a
    /// cooldown (after which the probe goes first and the rest follow at the spacing).
    fn estimate(&self, shared: &Shared, ahead: usize, now: Instant) -> Instant {
        let s = &shared.settings;
        let t = s.spacing();
        let tau = t * (s.burst - 1);
        let ahead = u32::try_from(ahead).unwrap_or(u32::MAX);
        let behind = t.saturating_mul(ahead);
        let mut at = now;
        if let Some(tat) = self.tat {
            at = at.max(shared.clock.to_instant(tat.saturating_sub(tau)) + behind);
        } else if ahead >= s.burst {
            at = at.max(now + t * (ahead - s.burst + 1));
        }
        if let Some(until) = self.cooldown.until.filter(|&u| u > now) {
            at = at.max(until + behind);
        }
        // Fleet mode: the local mirror does not see other replicas' tokens, but Redis told us
        // when the next one comes.
        if let Some(t) = self.remote_not_before.filter(|&t| t > now) {
            at = at.max(t + behind);
        }
        at
    }

    // A rejection is built once per shed request and moved a couple of times; boxing it
    // would add an allocation for nothing.
    #[allow(clippy::result_large_err)]
    fn check_client_caps(
        &mut self,
        shared: &Shared,
        client: ClientId,
        now_unix: f64,
    ) -> Result<(), Rejection> {
        let c = &self.clients[client];
        if let Some(cap) = c.settings.requests_per_day {
            if c.used_today >= cap {
                let reset = day_end(self.day.index, shared.settings.day_reset_offset) as f64;
                let wait = Duration::from_secs_f64((reset - now_unix).max(0.0));
                let mut r = self.reject(shared, Reason::ClientDailyQuotaExhausted, wait, now_unix);
                r.client = Some(c.settings.name.clone());
                return Err(r);
            }
        }
        if let Some(b) = &c.bucket {
            if let Err(nu) = b.check() {
                let wait = nu.wait_time_from(shared.clock.now());
                let mut r = self.reject(shared, Reason::ClientRateLimited, wait, now_unix);
                r.client = Some(self.clients[client].settings.name.clone());
                return Err(r);
            }
        }
        Ok(())
    }

    /// Hand out a permit: take the daily count and a concurrency slot; the first grant after
    /// a cooldown is the probe.
    fn grant(&mut self, shared: &Arc<Shared>, client: ClientId, waited: Duration) -> Permit {
        self.in_flight += 1;
        self.day.used += 1;
        if shared.settings.requests_per_day == Some(self.day.used) {
            tracing::info!(
                used = self.day.used,
                resets_at = %crate::units::format_rfc3339(day_end(self.day.index, shared.settings.day_reset_offset)),
                "daily cap reached: gate closed until the quota day resets"
            );
        }
        let c = &mut self.clients[client];
        c.used_today += 1;
        c.forwarded += 1;
        let probe = self.cooldown.probe == Probe::Ready;
        if probe {
            self.cooldown.probe = Probe::Outstanding;
        }
        if self.day.durable != u64::MAX {
            // Reserve the next block as soon as any of this one is used (one write in flight
            // at a time), so the write is done before anyone has to wait for it: a grant waits
            // only if a whole block is used faster than one write lands. Waiting until half was
            // used left one request of lead with blocks of 3 (a 300-a-day plan), which every
            // other back-to-back request overtook (issue 18). The crash bound is unchanged:
            // the file never holds more than `used + block`. The price is at most one write
            // per grant, i.e. per day at most `requests_per_day` of them.
            let block = shared.settings.reserve_block();
            if self.day.used.saturating_add(block) > self.day.durable {
                self.reserve(shared);
            }
        } else if shared.persist.is_some() {
            shared.request_persist();
        }
        Permit {
            shared: Arc::clone(shared),
            client,
            epoch: self.cooldown.epoch,
            probe,
            sent: false,
            reported: false,
            announcement: None,
            queue_wait: waited,
        }
    }

    fn limits_view(&self, shared: &Shared) -> LimitsView {
        let s = &shared.settings;
        LimitsView {
            requests_per_minute: s.requests_per_minute,
            burst: s.burst,
            requests_per_day: s.requests_per_day,
            used_today: self.day.used,
            remaining_today: s.requests_per_day.map(|d| d.saturating_sub(self.day.used)),
            day_resets_at_unix: day_end(self.day.index, s.day_reset_offset),
        }
    }

    fn reject(
        &self,
        shared: &Shared,
        reason: Reason,
        retry_after: Duration,
        now_unix: f64,
    ) -> Rejection {
        let now = Instant::now();
        let tripped = match reason {
            Reason::DailyQuotaExhausted | Reason::ClientDailyQuotaExhausted => Policy::Day,
            _ => Policy::Minute,
        };
        Rejection {
            reason,
            retry_after: Some(retry_after),
            limits: Some(self.limits_view(shared)),
            cooldown_until_unix: self
                .cooldown
                .until
                .filter(|&u| u > now)
                .map(|u| now_unix + (u - now).as_secs_f64()),
            tripped,
            ..Rejection::new(reason)
        }
    }

    /// The escalation level after decay: a quiet period of `cooldown.decay_after` since the
    /// last cooldown ended forgets it.
    fn effective_level(&self, shared: &Shared, now: Instant) -> u32 {
        match self.cooldown.ended_at {
            Some(end)
                if self.cooldown.until.is_none()
                    && now.saturating_duration_since(end) >= shared.settings.cooldown_decay =>
            {
                0
            }
            _ => self.cooldown.level,
        }
    }

    /// One dispatcher pass: grant or shed as many waiters as possible, then say when to look
    /// again. Replies are collected in `out` and sent after the lock is released (a refused
    /// reply drops its permit, and the permit's `Drop` takes the lock).
    fn step(
        &mut self,
        shared: &Arc<Shared>,
        out: &mut Vec<(Reply, Result<Permit, Rejection>)>,
    ) -> Next {
        let now = Instant::now();
        let now_unix = shared.wall.now_unix();
        self.roll_day(shared, now_unix);
        loop {
            // Skip waiters whose client has already gone (their guard is about to remove them).
            while let Some(w) = self.queue.peek() {
                if w.payload.is_closed() {
                    let (client, id) = (w.client, w.id);
                    self.queue.remove(client, id);
                } else {
                    break;
                }
            }
            if self.queue.is_empty() {
                return Next::Idle;
            }
            match self.blocked(shared, now, now_unix) {
                Some(Blocked::Daily { open_at_unix }) => {
                    let open = shared.wall.instant_at(open_at_unix);
                    for w in self.queue.drain_where(|w| w.deadline < open) {
                        let r =
                            self.reject(shared, Reason::DailyQuotaExhausted, open - now, now_unix);
                        out.push((w.payload, Err(r)));
                    }
                    return if self.queue.is_empty() {
                        Next::Idle
                    } else {
                        Next::At(open)
                    };
                }
                Some(Blocked::Cooldown { until }) => {
                    for w in self.queue.drain_where(|w| w.deadline < until) {
                        let r =
                            self.reject(shared, Reason::UpstreamCooldown, until - now, now_unix);
                        out.push((w.payload, Err(r)));
                    }
                    return Next::At(until);
                }
                Some(Blocked::Probe | Blocked::Concurrency | Blocked::Durability) => {
                    return Next::Idle
                }
                None => {}
            }
            if shared.fleet.is_some() {
                // The token comes from Redis, asked outside the lock by the dispatcher.
                return match self.remote_not_before {
                    Some(t) if t > now => Next::At(t),
                    _ => Next::Take,
                };
            }
            if let Err(nu) = shared.bucket.check() {
                return Next::At(now + nu.wait_time_from(shared.clock.now()));
            }
            self.took_token(shared);
            if !self.grant_head(shared, out, now) {
                return Next::Idle;
            }
        }
    }

    /// Grant to the next waiter still there; false if nobody is left.
    fn grant_head(
        &mut self,
        shared: &Arc<Shared>,
        out: &mut Vec<(Reply, Result<Permit, Rejection>)>,
        now: Instant,
    ) -> bool {
        while let Some(w) = self.queue.pop() {
            if w.payload.is_closed() {
                continue;
            }
            let permit = self.grant(shared, w.client, now.saturating_duration_since(w.enqueued));
            out.push((w.payload, Ok(permit)));
            return true;
        }
        false
    }

    /// A cooldown announced by the fleet (or found in Redis): close this replica's gate too.
    fn apply_fleet_cooldown(&mut self, shared: &Shared, until_unix: f64, level: u32) {
        let now = Instant::now();
        let until = shared.wall.instant_at(until_unix);
        if until > now && self.cooldown.until.is_none_or(|u| u < until) {
            self.cooldown.until = Some(until);
            self.cooldown.proactive = false;
            self.cooldown.epoch += 1;
            if self.cooldown.probe == Probe::Ready {
                self.cooldown.probe = Probe::Open;
            }
            tracing::info!(
                seconds = (until - now).as_secs_f64(),
                level,
                "fleet cooldown: another replica was rate limited; gate closed"
            );
        }
        self.cooldown.level = self.cooldown.level.max(level);
        self.remote_not_before = None;
    }
}

/// What the dispatcher does next.
enum Next {
    /// Nothing to do until woken.
    Idle,
    /// Look again at this instant (or when woken).
    At(Instant),
    /// Fleet mode: ask Redis for a token for the head of the queue.
    Take,
}

/// The dispatcher: the only task that sleeps on the bucket's or a gate's timer.
async fn dispatch(shared: Arc<Shared>) {
    let mut out = Vec::new();
    loop {
        let next = shared.lock().step(&shared, &mut out);
        deliver(&mut out);
        match next {
            Next::At(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = shared.wake.notified() => {}
                }
            }
            Next::Idle => match &shared.fleet {
                // Keep finding out whether Redis is back, so that shedding or the local
                // fallback ends as soon as it is, not at the next request.
                Some(f) if !f.is_healthy() => {
                    tokio::select! {
                        _ = tokio::time::sleep(FLEET_HEALTH_RETRY) => {
                            let day = shared.lock().day.index;
                            let _ = f.status(day).await;
                        }
                        _ = shared.wake.notified() => {}
                    }
                }
                _ => shared.wake.notified().await,
            },
            Next::Take => {
                take_remote(&shared, &mut out).await;
                deliver(&mut out);
            }
        }
    }
}

/// While Redis is down and nobody is waiting, check on it this often.
const FLEET_HEALTH_RETRY: Duration = Duration::from_secs(1);

fn deliver(out: &mut Vec<(Reply, Result<Permit, Rejection>)>) {
    for (tx, r) in out.drain(..) {
        // A waiter that left in the meantime drops the permit here, which returns it.
        let _ = tx.send(r);
    }
}

/// One Redis admission attempt for the head of the queue (fleet mode).
async fn take_remote(shared: &Arc<Shared>, out: &mut Vec<(Reply, Result<Permit, Rejection>)>) {
    let Some(f) = shared.fleet.clone() else {
        return;
    };
    let s = &shared.settings;
    let result = f
        .take(s.spacing(), s.burst, s.requests_per_day, s.day_reset_offset)
        .await;
    let now = Instant::now();
    let now_unix = shared.wall.now_unix();
    let mut g = shared.lock();
    match result {
        Ok(Take::Granted { probe, .. }) => {
            if probe {
                g.cooldown.probe = Probe::Ready;
            }
            if !g.grant_head(shared, out, now) {
                // Everyone left while Redis answered: give the token and the count back.
                if probe {
                    g.cooldown.probe = Probe::Open;
                    let _ = spawn_fleet(shared, "probe release", |f| async move {
                        f.probe_done(false).await
                    });
                }
                let spacing = s.spacing();
                let offset = s.day_reset_offset;
                spawn_fleet(shared, "refund", move |f| async move {
                    f.refund(spacing, offset).await
                });
            }
        }
        Ok(Take::Wait(d)) => g.remote_not_before = Some(now + d),
        Ok(Take::ProbeBusy) => g.remote_not_before = Some(now + fleet::PROBE_POLL),
        Ok(Take::Cooldown { until_unix, level }) => {
            g.apply_fleet_cooldown(shared, until_unix, level)
        }
        Ok(Take::DailyClosed { until_unix }) => {
            g.day.gate_until_unix = Some(g.day.gate_until_unix.unwrap_or(0.0).max(until_unix));
        }
        Err(e) => match f.settings.on_error {
            OnError::FailClosed => {
                for w in g.queue.drain_where(|_| true) {
                    let mut r = Rejection::new(Reason::SharedStateUnavailable);
                    r.retry_after = Some(FLEET_HEALTH_RETRY);
                    r.detail = Some(e.clone());
                    out.push((w.payload, Err(r)));
                }
                let _ = now_unix;
            }
            OnError::Local => match shared.fallback.check() {
                Ok(()) => {
                    g.grant_head(shared, out, now);
                }
                Err(nu) => {
                    g.remote_not_before = Some(now + nu.wait_time_from(shared.clock.now()));
                }
            },
        },
    }
}

/// Run a fleet call in the background (from synchronous code such as `Permit::report` and
/// `Drop`), logging a failure: the local gate has already changed, Redis catches up.
fn spawn_fleet<F, Fut, T>(
    shared: &Shared,
    what: &'static str,
    f: F,
) -> Option<tokio::task::JoinHandle<()>>
where
    F: FnOnce(Arc<Fleet>) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>> + Send + 'static,
    T: Send + 'static,
{
    let fleet = shared.fleet.as_ref()?;
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let fut = f(Arc::clone(fleet));
    Some(handle.spawn(async move {
        if let Err(e) = fut.await {
            tracing::warn!(what, error = %e, "could not tell the fleet");
        }
    }))
}

/// Apply other replicas' announcements to this replica's gates.
async fn listen_fleet(fleet: Arc<Fleet>, shared: std::sync::Weak<Shared>) {
    let alive = {
        let shared = shared.clone();
        move || shared.strong_count() > 0
    };
    let apply = {
        let shared = shared.clone();
        move |ev: fleet::Event| {
            let Some(sh) = shared.upgrade() else {
                return;
            };
            {
                let mut g = sh.lock();
                match ev {
                    fleet::Event::Cooldown { until_unix, level } => {
                        g.apply_fleet_cooldown(&sh, until_unix, level)
                    }
                    fleet::Event::Gate { until_unix } => {
                        g.day.gate_until_unix =
                            Some(g.day.gate_until_unix.unwrap_or(0.0).max(until_unix));
                    }
                    fleet::Event::Open | fleet::Event::ProbeReleased => {
                        g.remote_not_before = None;
                    }
                }
            }
            sh.wake.notify_one();
        }
    };
    let resync = {
        let shared = shared.clone();
        let fleet = Arc::clone(&fleet);
        move || {
            let shared = shared.clone();
            let fleet = Arc::clone(&fleet);
            async move {
                let Some(day) = shared.upgrade().map(|sh| sh.lock().day.index) else {
                    return;
                };
                let st = fleet.status(day).await;
                if let Some(sh) = shared.upgrade() {
                    {
                        let mut g = sh.lock();
                        if let Some(u) = st.cooldown_until_unix {
                            g.apply_fleet_cooldown(&sh, u, st.level);
                        }
                        if let Some(u) = st.gate_until_unix {
                            g.day.gate_until_unix =
                                Some(g.day.gate_until_unix.unwrap_or(0.0).max(u));
                        }
                    }
                    sh.wake.notify_one();
                }
            }
        }
    };
    fleet.listen(alive, apply, resync).await;
}

/// The right to have one request in flight upstream. Owned by the response body; dropping it
/// frees the concurrency slot, returns the daily count if the request was never sent, and
/// lets another request probe if this was an unanswered probe.
pub struct Permit {
    shared: Arc<Shared>,
    client: ClientId,
    epoch: u64,
    probe: bool,
    sent: bool,
    reported: bool,
    /// The fleet announcement `report` started, for [`Permit::announced`].
    announcement: Option<tokio::task::JoinHandle<()>>,
    /// How long the request waited in the queue.
    pub queue_wait: Duration,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("client", &self.client)
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
        self.probe
    }

    pub fn client(&self) -> ClientId {
        self.client
    }

    /// Feed the upstream's answer back into the budget. Returns the cooldown it started, if
    /// any, for the log line and the rewritten 429.
    pub fn report(&mut self, outcome: Outcome) -> Option<CooldownDecision> {
        self.reported = true;
        let shared = &*self.shared;
        let now = Instant::now();
        let now_unix = shared.wall.now_unix();
        let s = &shared.settings;
        let mut g = shared.lock();
        // What the other replicas must hear about, decided before `outcome` is consumed.
        let news = match &outcome {
            Outcome::Success { .. } if self.probe => FleetNews::ProbeDone(true),
            Outcome::Failed if self.probe => FleetNews::ProbeDone(false),
            Outcome::RateLimited { .. } => FleetNews::Cooldown,
            Outcome::QuotaExceeded { .. } => FleetNews::Gate,
            _ => FleetNews::Nothing,
        };
        let tell_fleet = shared.fleet.is_some().then_some(news);
        let decision = match outcome {
            Outcome::Success { exhausted } => {
                if self.probe && g.cooldown.probe == Probe::Outstanding {
                    g.cooldown.probe = Probe::Open;
                    tracing::info!("probe succeeded: gate reopened for every client");
                }
                if let Some(d) = exhausted {
                    let d = d.min(s.cooldown_max);
                    let until = now + d;
                    if !d.is_zero() && g.cooldown.until.is_none_or(|u| u < until) {
                        // A 429 cooldown that is still on stays one when a window reset
                        // lengthens it: it must still end with a single probe and survive
                        // a restart. Only a gate closed on headers alone is proactive.
                        let rate_limited = g.cooldown.until.is_some() && !g.cooldown.proactive;
                        g.cooldown.until = Some(until);
                        g.cooldown.proactive = !rate_limited;
                        if rate_limited {
                            shared.request_persist();
                        }
                        tracing::info!(
                            seconds = d.as_secs_f64(),
                            "upstream reports no requests left: gate closed until its reset"
                        );
                    }
                }
                None
            }
            Outcome::RateLimited {
                hint,
                status,
                headers,
                body,
            } => {
                g.cooldown.last_429 = Some(Last429 {
                    at_unix: now_unix,
                    status,
                    headers,
                    body,
                });
                let escalate = self.epoch == g.cooldown.epoch;
                let level = if escalate {
                    g.effective_level(shared, now).saturating_add(1)
                } else {
                    g.cooldown.level.max(1)
                };
                let computed = {
                    let factor = s
                        .cooldown_multiplier
                        .powi(level.saturating_sub(1).min(64) as i32);
                    let secs = s.cooldown_initial.as_secs_f64() * factor;
                    if secs.is_finite() {
                        Duration::from_secs_f64(secs.min(s.cooldown_max.as_secs_f64()))
                    } else {
                        s.cooldown_max
                    }
                };
                let (duration, hint_note) = match hint {
                    Some(Hint::After(d)) if d <= s.cooldown_max => {
                        (d.max(Duration::from_secs(1)), None)
                    }
                    Some(Hint::After(d)) => (
                        s.cooldown_max,
                        Some(format!(
                            "upstream asked for {:.0}s, clamped to cooldown.max",
                            d.as_secs_f64()
                        )),
                    ),
                    Some(Hint::Unparseable(h)) => (
                        computed,
                        Some(format!("unparseable rate-limit header ignored: {h}")),
                    ),
                    None => (computed, None),
                };
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
                shared.request_persist();
                Some(CooldownDecision {
                    duration: until - now,
                    until_unix: now_unix + (until - now).as_secs_f64(),
                    level: g.cooldown.level,
                    hint_note,
                    escalated: escalate,
                    reported_at_unix: now_unix,
                })
            }
            Outcome::QuotaExceeded { reset_unix } => {
                let next_reset = day_end(g.day.index, s.day_reset_offset) as f64;
                // A reset claimed in the past or more than two days ahead is not believable.
                let until = reset_unix
                    .filter(|&r| r > now_unix && r < now_unix + 2.0 * 86_400.0)
                    .unwrap_or(next_reset);
                g.day.gate_until_unix = Some(until);
                if self.probe && g.cooldown.probe == Probe::Outstanding {
                    g.cooldown.probe = Probe::Open;
                }
                tracing::warn!(
                    until = %crate::units::format_rfc3339(until as i64),
                    "upstream says the daily quota is spent: gate closed until its reset"
                );
                shared.request_persist();
                None
            }
            Outcome::Failed => {
                if self.probe && g.cooldown.probe == Probe::Outstanding {
                    // No answer is not a success: let the next request probe.
                    g.cooldown.probe = Probe::Ready;
                }
                None
            }
        };
        let gate = g.day.gate_until_unix;
        let level = g.cooldown.level;
        let waiting = !g.queue.is_empty();
        drop(g);
        self.announcement = match (tell_fleet, &decision) {
            (Some(FleetNews::ProbeDone(ok)), _) => {
                spawn_fleet(shared, "probe result", move |f| async move {
                    f.probe_done(ok).await
                })
            }
            (Some(FleetNews::Cooldown), Some(d)) => {
                let (dur, decay) = (d.duration, s.cooldown_decay);
                spawn_fleet(shared, "cooldown", move |f| async move {
                    f.start_cooldown(dur, level, decay).await
                })
            }
            (Some(FleetNews::Gate), Some(_)) | (Some(FleetNews::Gate), None) => {
                gate.and_then(|until| {
                    spawn_fleet(shared, "quota gate", move |f| async move {
                        f.close_daily_gate(until).await
                    })
                })
            }
            _ => None,
        };
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
                g.day.used = g.day.used.saturating_sub(1);
                let c = &mut g.clients[self.client];
                c.used_today = c.used_today.saturating_sub(1);
                c.forwarded = c.forwarded.saturating_sub(1);
            }
            if self.probe && !self.reported && g.cooldown.probe == Probe::Outstanding {
                g.cooldown.probe = Probe::Ready;
                let _ = spawn_fleet(shared, "probe release", |f| async move {
                    f.probe_done(false).await
                });
            }
            !g.queue.is_empty()
        };
        // Only a waiter can use the freed slot; with none, skip the cross-thread wake-up.
        if waiting {
            shared.wake.notify_one();
        }
    }
}

/// What a permit's outcome means for the other replicas.
enum FleetNews {
    Nothing,
    ProbeDone(bool),
    Cooldown,
    Gate,
}

impl Admission {
    /// The fleet backend, if configured (for `/status`).
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.shared.fleet.as_ref()
    }

    /// The current quota-day index.
    pub fn day_index(&self) -> i64 {
        self.shared.lock().day.index
    }
}

/// `/status` view of the budget.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub requests_per_minute: u32,
    pub burst: u32,
    pub requests_per_day: Option<u64>,
    pub max_concurrent: usize,
    pub max_depth: usize,
    pub max_wait: Duration,
    pub tokens_available: u32,
    pub next_token_in: Duration,
    pub used_today: u64,
    pub remaining_today: Option<u64>,
    pub day_resets_at_unix: i64,
    pub daily_gate_until_unix: Option<f64>,
    pub cooldown_active: bool,
    pub cooldown_proactive: bool,
    pub cooldown_until_unix: Option<f64>,
    pub cooldown_level: u32,
    pub gate: Probe,
    pub last_429: Option<Last429>,
    pub queue_depth: usize,
    pub oldest_wait: Option<Duration>,
    pub in_flight: usize,
    pub clients: Vec<ClientSnapshot>,
}

#[derive(Debug, Clone)]
pub struct ClientSnapshot {
    pub name: Arc<str>,
    pub weight: u32,
    pub queued: usize,
    pub used_today: u64,
    pub forwarded: u64,
    pub requests_per_minute: Option<u32>,
    pub requests_per_day: Option<u64>,
}

#[cfg(test)]
mod tests;

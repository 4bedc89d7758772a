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
mod gcra;
pub mod models;
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
use gcra::Gcra;
use models::{ModelBlock, ModelGates};
pub use queue::ClientId;
use queue::FairQueue;

use crate::clock::{TokioClock, WallClock};
use crate::config::Config;
use crate::response::{LimitsView, Policy, Reason, Rejection};
use crate::signals::{AdvertisedRate, ChutesQuota, Hint, Scope429};
use crate::state::Persisted;
use crate::units::{day_end, day_index};

type Bucket = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;
type Reply = oneshot::Sender<Result<Permit, Rejection>>;

/// What a queued request carries: its reply channel and what admission must know of it.
struct Pending {
    reply: Reply,
    model: Option<Arc<str>>,
    cost: u32,
}

/// How deep into one client's FIFO the dispatcher looks for a request whose model may go,
/// when the ones in front wait for a cooling model. Bounds the work per grant.
const MODEL_SCAN: usize = 64;

/// One request asking for admission.
#[derive(Debug, Clone)]
pub struct Ask {
    pub client: ClientId,
    /// The request's `model`, when its body named one (bounded length, see `crate::model`).
    pub model: Option<Arc<str>>,
    /// Daily units this request costs (`[limits.model_cost]`), at least 1.
    pub cost: u32,
    /// The caller's wait (already capped at `queue.max_wait` and the client's own limit).
    pub max_wait: Duration,
}

impl Ask {
    pub fn new(client: ClientId, max_wait: Duration) -> Ask {
        Ask {
            client,
            model: None,
            cost: 1,
            max_wait,
        }
    }
}

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
    pub model_cooldown_initial: Duration,
    pub model_cooldown_max: Duration,
    /// `limits.beyond_quota = "stop"`: the upstream's quota headers close the daily gate.
    pub beyond_quota_stop: bool,
    /// `limits.follow_upstream_limits`: advertised rates may lower the rate in force.
    pub follow_upstream_limits: bool,
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
            model_cooldown_initial: c.cooldown.model_initial,
            model_cooldown_max: c.cooldown.model_max,
            beyond_quota_stop: c.limits.beyond_quota == crate::config::BeyondQuota::Stop,
            follow_upstream_limits: c.limits.follow_upstream_limits,
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
    /// Upstream 429: the account's (edge page, anything else) or one model's (capacity).
    RateLimited {
        scope: Scope429,
        hint: Option<Hint>,
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Upstream 402 with a quota message.
    QuotaExceeded { reset_unix: Option<f64> },
    /// Upstream 402 "Subscription usage cap exceeded": the plan's spending cap.
    UsageCap,
    /// No usable response: connect error, reset, timeout.
    Failed,
}

/// What any upstream response head says about the account, whatever its status: Chutes'
/// quota snapshot and the rates it advertises.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observed {
    pub quota: Option<ChutesQuota>,
    pub rl_user: Option<AdvertisedRate>,
    pub rl_chute: Option<AdvertisedRate>,
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
    /// Set when only this model cools (a capacity 429); `None` for the whole account.
    pub model: Option<Arc<str>>,
}

/// The last upstream 429, for `/status` (and the state file, so it survives a restart).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Last429 {
    pub at_unix: f64,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Probe {
    /// Normal operation.
    #[default]
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
    /// Granted today, including requests in flight, in daily units.
    used: u64,
    /// Reserved on disk: a crash restarts with this count, so `used` may never pass it.
    durable: u64,
    /// A reservation write in progress up to this count.
    pending: Option<u64>,
    /// Upstream 402 quota gate, or the quota headers' "spent" (UNIX seconds).
    gate_until_unix: Option<f64>,
}

struct ClientState {
    settings: ClientSettings,
    bucket: Option<Gcra>,
    used_today: u64,
    forwarded: u64,
}

/// Where the upstream's quota figures were last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaSeen {
    Header,
    Poll,
}

impl QuotaSeen {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaSeen::Header => "header",
            QuotaSeen::Poll => "poll",
        }
    }
}

/// The upstream's view of the account's daily quota, as last seen.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamQuota {
    pub total: u64,
    pub used: u64,
    pub remaining: u64,
    pub seen_at_unix: f64,
    pub source: QuotaSeen,
}

#[derive(Default)]
struct Upstream {
    /// The account's default quota (poll, or the first `Total` seen without a poll).
    quota: Option<UpstreamQuota>,
    /// Whether `quota` came from a poll (a poll names the account's quota authoritatively).
    polled: bool,
    /// `X-Chutes-RL-User`, as last seen.
    rl_user: Option<AdvertisedRate>,
    /// The configured rate was above the advertised one and this was logged.
    warned: bool,
}

struct Inner {
    s: Arc<Settings>,
    /// The account's bucket. Swapped (never refilled) when the rate in force changes.
    bucket: Bucket,
    /// The rate the bucket enforces: the configured one, or lower if the upstream says so.
    rpm_in_force: u32,
    /// After a rate change, no token before this (the old schedule's next token).
    hold_until: Option<Instant>,
    queue: FairQueue<Pending>,
    in_flight: usize,
    /// Mirror of governor's theoretical arrival time (a reading of `clock`), because governor
    /// offers no way to look without taking. Updated exactly as governor's GCRA does on each
    /// token taken, and used only for estimates and `/status`, never for the decision itself.
    tat: Option<Duration>,
    day: Day,
    cooldown: Cooldown,
    /// Upstream 402 "usage cap exceeded": closed until this UNIX time (a 4-hour boundary).
    usage_cap_until_unix: Option<f64>,
    models: ModelGates,
    upstream: Upstream,
    clients: Vec<ClientState>,
    /// Fleet mode: Redis said the next token is not before this; no need to ask earlier.
    remote_not_before: Option<Instant>,
    /// Shutting down: the grace ends then; nobody still queued at that instant is served.
    closing: Option<Instant>,
}

struct Shared {
    clock: TokioClock,
    wall: WallClock,
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

/// Why the account cannot grant right now, other than the bucket.
enum Blocked {
    Daily { open_at_unix: f64 },
    UsageCap { open_at_unix: f64 },
    Cooldown { until: Instant },
    Probe,
    Concurrency,
    Durability,
}

/// A decision about one request that its reply carries, made under the lock and sent after.
type Out = Vec<(Reply, Result<Permit, Rejection>)>;

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
        let usage_cap = restored.usage_cap_until_unix.filter(|&g| g > now_unix);
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
                    .map(|rpm| Gcra::per_minute(rpm, c.burst)),
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
        let share = settings.fallback_share.clamp(0.0, 1.0);
        let fallback = make_bucket(
            ((f64::from(settings.requests_per_minute) * share).floor() as u32).max(1),
            ((f64::from(settings.burst) * share).floor() as u32).max(1),
            clock,
        );
        let inner = Inner {
            rpm_in_force: settings.requests_per_minute,
            s: Arc::new(settings),
            bucket,
            hold_until: None,
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
                last_429: restored.last_429.clone(),
            },
            usage_cap_until_unix: usage_cap,
            models: ModelGates::default(),
            upstream: Upstream::default(),
            clients,
            remote_not_before: None,
            closing: None,
        };
        let shared = Arc::new(Shared {
            clock,
            wall,
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

    /// The settings in force (they change on a reload).
    pub fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.shared.lock().s)
    }

    /// Client index by name (`default` is 0).
    pub fn client_id(&self, name: &str) -> Option<ClientId> {
        self.shared
            .lock()
            .s
            .clients
            .iter()
            .position(|c| &*c.name == name)
    }

    pub fn client_name(&self, id: ClientId) -> Arc<str> {
        let g = self.shared.lock();
        g.s.clients.get(id).unwrap_or(&g.s.clients[0]).name.clone()
    }

    /// Wait for admission of a request of `client` with no known model, costing 1.
    pub async fn acquire(&self, client: ClientId, max_wait: Duration) -> Result<Permit, Rejection> {
        self.admit(Ask::new(client, max_wait)).await
    }

    /// Wait for admission. Cancel-safe: dropping the future leaves the queue at once and
    /// consumes nothing.
    // A rejection is built once per shed request and moved a couple of times; boxing it
    // would add an allocation for nothing.
    #[allow(clippy::result_large_err)]
    pub async fn admit(&self, ask: Ask) -> Result<Permit, Rejection> {
        let shared = &self.shared;
        let now = Instant::now();
        let cost = ask.cost.max(1);
        let mut max_wait = ask.max_wait;
        let mut deadline = now + max_wait;
        let (client, id, rx) = {
            let mut g = shared.lock();
            let client = if ask.client < g.clients.len() {
                ask.client
            } else {
                0
            };
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
            // Shed at once when waiting cannot help, in the contract's order: the account's
            // gates, the model's, the client's daily cap.
            match blocked {
                Some(Blocked::Daily { open_at_unix }) => {
                    let open = shared.wall.instant_at(open_at_unix);
                    if open > deadline {
                        return Err(g.reject(Reason::DailyQuotaExhausted, open - now, now_unix));
                    }
                }
                Some(Blocked::UsageCap { open_at_unix }) => {
                    let open = shared.wall.instant_at(open_at_unix);
                    if open > deadline {
                        return Err(g.reject(Reason::UsageCapExhausted, open - now, now_unix));
                    }
                }
                Some(Blocked::Cooldown { until }) if until > deadline => {
                    return Err(g.reject(Reason::UpstreamCooldown, until - now, now_unix));
                }
                _ => {}
            }
            let model_block = ask
                .model
                .as_deref()
                .and_then(|m| g.models.blocked(m, now, now_unix));
            let model_eta = match model_block {
                Some(ModelBlock::Cooling(until)) => {
                    if until > deadline {
                        let mut r = g.reject(Reason::ModelCooldown, until - now, now_unix);
                        r.model = ask.model.clone();
                        return Err(r);
                    }
                    Some(until)
                }
                Some(ModelBlock::Quota(open_unix)) => {
                    let open = shared.wall.instant_at(open_unix);
                    if open > deadline {
                        let mut r = g.reject(Reason::DailyQuotaExhausted, open - now, now_unix);
                        r.model = ask.model.clone();
                        r.detail = Some("this model's own daily quota is spent".into());
                        return Err(r);
                    }
                    Some(open)
                }
                Some(ModelBlock::Rate(at)) => Some(at),
                Some(ModelBlock::Probe) | None => None,
            };
            // Daily caps that cannot take this request today: shed unless the day ends
            // within the request's wait.
            let day_ends = shared
                .wall
                .instant_at(day_end(g.day.index, g.s.day_reset_offset) as f64);
            if day_ends > deadline {
                if let Some(r) = g.client_daily_refusal(client, cost, now_unix) {
                    return Err(r);
                }
                if let Some(r) = g.account_daily_refusal(cost, now_unix) {
                    return Err(r);
                }
            }
            // Everything open and nobody waiting: grant inline, no task switch.
            if g.queue.is_empty()
                && blocked.is_none()
                && model_block.is_none()
                && shared.fleet.is_none()
                && g.closing.is_none()
                && g.client_ready(client, now)
                && g.fits_today(client, cost)
                && g.bucket_take(shared, now).is_ok()
            {
                return Ok(g.grant(shared, client, ask.model, cost, Duration::ZERO, now));
            }
            if g.queue.len() >= g.s.max_depth {
                // When the last request now queued is served.
                let drain = g.estimate(shared, g.queue.len().saturating_sub(1), now) - now;
                return Err(g.reject(Reason::QueueFull, drain, now_unix));
            }
            let ahead = g.queue.ahead_of_new(client);
            let account_eta = g.estimate(shared, ahead, now);
            let client_eta = g.clients[client]
                .bucket
                .as_ref()
                .map(|b| b.ready_at_behind(now, g.queue.client_len(client)));
            let eta = account_eta
                .max(client_eta.unwrap_or(now))
                .max(model_eta.unwrap_or(now));
            if let Some(end) = g.closing {
                if eta > end {
                    return Err(g.shutting_down(eta - now, now_unix));
                }
            }
            if eta > deadline || max_wait.is_zero() {
                let wait = (eta - now).max(g.spacing().min(Duration::from_secs(1)));
                let (reason, what) = if client_eta.is_some_and(|c| c > deadline && c >= eta) {
                    (Reason::ClientRateLimited, "its client's own rate")
                } else if model_eta.is_some_and(|m| m > deadline && m >= eta) {
                    (Reason::ModelCooldown, "its model")
                } else {
                    (Reason::QueueTimeout, "the account")
                };
                let mut r = g.reject(reason, wait, now_unix);
                if reason == Reason::ClientRateLimited {
                    r.client = Some(g.clients[client].settings.name.clone());
                }
                if reason == Reason::ModelCooldown {
                    r.model = ask.model.clone();
                }
                r.detail = Some(if max_wait.is_zero() {
                    "the request asked not to queue".into()
                } else {
                    format!(
                        "estimated wait {:.1}s for {what} exceeds the wait limit {:.1}s",
                        (eta - now).as_secs_f64(),
                        max_wait.as_secs_f64()
                    )
                });
                return Err(r);
            }
            let (tx, rx) = oneshot::channel();
            let pending = Pending {
                reply: tx,
                model: ask.model,
                cost,
            };
            let id = g.queue.push(client, deadline, now, pending);
            (client, id, rx)
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
        if let Some(r) = result {
            return r;
        }
        // Deadline reached. A token due at this very instant may not have been handed out
        // yet (the dispatcher's timer fires at the same tick): run one dispatcher step first,
        // so a request whose estimate was exactly its deadline is served.
        let mut out = Vec::new();
        let _ = shared.lock().step(shared, &mut out);
        deliver(&mut out);
        if let Ok(r) = rx.try_recv() {
            return r;
        }
        let left = shared.lock().queue.remove(client, id).is_some();
        if !left {
            // Not queued any more, yet no answer: the dispatcher decided about it at this
            // very instant and its reply is on the way. A grant is served, not thrown away.
            return match rx.await {
                Ok(r) => r,
                Err(_) => Err(Rejection::new(Reason::ShuttingDown)),
            };
        }
        let g = shared.lock();
        let now = Instant::now();
        let now_unix = shared.wall.now_unix();
        let ahead = g.queue.len();
        let eta = g.estimate(shared, ahead, now);
        let mut r = g.reject(Reason::QueueTimeout, eta - now, now_unix);
        r.detail = Some(format!(
            "waited {:.1}s, the wait limit",
            max_wait.as_secs_f64()
        ));
        drop(g);
        shared.wake.notify_one();
        Err(r)
    }

    /// Stop admitting for good: the process is shutting down and `grace_end` is when the
    /// last in-flight request is cut. Queued requests whose turn would come after it are
    /// answered `shutting_down` now; those still queued at `grace_end` get it then.
    pub fn shutdown(&self, grace_end: Instant) {
        let shared = &self.shared;
        let mut out = Vec::new();
        {
            let mut g = shared.lock();
            g.closing = Some(grace_end);
            let now = Instant::now();
            let now_unix = shared.wall.now_unix();
            for (client, id, ahead) in g.queue.ranks() {
                let eta = g.estimate(shared, ahead, now);
                if eta > grace_end {
                    if let Some(w) = g.queue.remove(client, id) {
                        let r = g.shutting_down(eta - now, now_unix);
                        out.push((w.payload.reply, Err(r)));
                    }
                }
            }
        }
        deliver(&mut out);
        shared.wake.notify_one();
    }

    /// Apply a reloaded configuration's budget settings, keeping the queue, the day's counts,
    /// cooldowns and the bucket's schedule (a lower rate applies at once and grants no fresh
    /// burst). The set of client names must be the same (the caller checks; adding or
    /// removing clients needs a restart).
    pub fn reconfigure(&self, new: Settings) {
        let shared = &self.shared;
        {
            let mut g = shared.lock();
            let now = Instant::now();
            let weights: Vec<u32> = new.clients.iter().map(|c| c.weight).collect();
            g.queue.set_weights(&weights);
            for (c, cs) in g.clients.iter_mut().zip(&new.clients) {
                c.bucket = match (c.bucket.take(), cs.requests_per_minute) {
                    (Some(mut b), Some(rpm)) => {
                        b.set_rate(rpm, cs.burst, now);
                        Some(b)
                    }
                    (None, Some(rpm)) => Some(Gcra::per_minute(rpm, cs.burst)),
                    (_, None) => None,
                };
                c.settings = cs.clone();
            }
            let rate_changed =
                new.requests_per_minute != g.s.requests_per_minute || new.burst != g.s.burst;
            let durable = new.durable && new.requests_per_day.is_some() && shared.fleet.is_none();
            if !durable {
                g.day.durable = u64::MAX;
            } else if g.day.durable == u64::MAX {
                g.day.durable = g.day.used;
            }
            g.s = Arc::new(new);
            if rate_changed {
                let rpm = g.target_rate();
                g.set_rate(shared, rpm, now, true);
            }
        }
        shared.wake.notify_one();
    }

    /// The usage poll's answer (`/users/me/quota_usage/me`): the account's default quota
    /// and what it has used today, counted from every tool, not only this proxy.
    pub fn observe_usage(&self, quota: u64, used: u64) {
        let shared = &self.shared;
        {
            let mut g = shared.lock();
            let now_unix = shared.wall.now_unix();
            g.roll_day(shared, now_unix);
            g.upstream.polled = true;
            g.apply_account_quota(
                shared,
                quota,
                used,
                quota.saturating_sub(used),
                0,
                now_unix,
                QuotaSeen::Poll,
            );
        }
        shared.wake.notify_one();
    }

    /// Take one token for a request the proxy makes itself (the usage poll), only if one is
    /// free now and nobody is waiting for it: such a request is skipped, never queued.
    pub fn try_take_own(&self) -> bool {
        let shared = &self.shared;
        let now = Instant::now();
        let now_unix = shared.wall.now_unix();
        let mut g = shared.lock();
        g.queue.is_empty()
            && shared.fleet.is_none()
            && g.blocked(shared, now, now_unix).is_none()
            && g.bucket_take(shared, now).is_ok()
    }

    /// A point-in-time view for `/status` and metrics.
    pub fn snapshot(&self) -> Snapshot {
        let shared = &self.shared;
        let now = Instant::now();
        let now_unix = shared.wall.now_unix();
        let mut g = shared.lock();
        g.roll_day(shared, now_unix);
        let s = Arc::clone(&g.s);
        let (tokens, next_in) = g.tokens_now(shared);
        let cooldown_until = g.cooldown.until.filter(|&u| u > now);
        let cap = g.daily_cap();
        Snapshot {
            requests_per_minute: g.rpm_in_force,
            configured_requests_per_minute: s.requests_per_minute,
            advertised_requests_per_minute: match g.upstream.rl_user {
                Some(AdvertisedRate::PerMinute(n)) => Some(n.get()),
                _ => None,
            },
            advertised_unlimited: matches!(g.upstream.rl_user, Some(AdvertisedRate::Unlimited)),
            burst: s.burst,
            requests_per_day: cap,
            configured_requests_per_day: s.requests_per_day,
            max_concurrent: s.max_concurrent,
            max_depth: s.max_depth,
            max_wait: s.max_wait,
            tokens_available: tokens,
            next_token_in: next_in,
            used_today: g.day.used,
            remaining_today: cap.map(|d| d.saturating_sub(g.day.used)),
            day_resets_at_unix: day_end(g.day.index, s.day_reset_offset),
            daily_gate_until_unix: g.day.gate_until_unix.filter(|&u| u > now_unix),
            usage_cap_until_unix: g.usage_cap_until_unix.filter(|&u| u > now_unix),
            cooldown_active: cooldown_until.is_some(),
            cooldown_proactive: cooldown_until.is_some() && g.cooldown.proactive,
            cooldown_until_unix: cooldown_until.map(|u| shared.wall.unix_at(u)),
            cooldown_level: g.effective_level(now),
            gate: g.cooldown.probe,
            last_429: g.cooldown.last_429.clone(),
            queue_depth: g.queue.len(),
            oldest_wait: g.queue.oldest().map(|o| now - o),
            in_flight: g.in_flight,
            upstream_quota: g.upstream.quota,
            models: g
                .models
                .iter()
                .map(|(name, m)| ModelSnapshot {
                    model: Arc::clone(name),
                    cooling_until_unix: m
                        .until
                        .filter(|&u| u > now)
                        .map(|u| shared.wall.unix_at(u)),
                    level: m.level,
                    probe: m.probe,
                    last_body: m.last_body.clone(),
                    last_429_at_unix: (m.last_at_unix > 0.0).then_some(m.last_at_unix),
                    advertised_requests_per_minute: m.rate.as_ref().map(|(n, _)| *n),
                    quota_total: m.quota_total,
                    quota_used: m.quota_total.map(|_| m.quota_used),
                    quota_gate_until_unix: m.quota_gate_until_unix.filter(|&u| u > now_unix),
                })
                .collect(),
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

    /// A rejection carrying the current limits (for responses built outside admission).
    pub fn rejection(&self, reason: Reason) -> Rejection {
        let shared = &self.shared;
        let now_unix = shared.wall.now_unix();
        let now = Instant::now();
        let mut g = shared.lock();
        let retry = match g.blocked(shared, now, now_unix) {
            Some(Blocked::Daily { open_at_unix } | Blocked::UsageCap { open_at_unix }) => {
                Some(Duration::from_secs_f64((open_at_unix - now_unix).max(0.0)))
            }
            Some(Blocked::Cooldown { until }) => Some(until - now),
            _ => None,
        };
        let mut r = g.reject(reason, Duration::ZERO, now_unix);
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

    /// The fleet backend, if configured (for `/status`).
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.shared.fleet.as_ref()
    }

    /// The current quota-day index.
    pub fn day_index(&self) -> i64 {
        self.shared.lock().day.index
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
            usage_cap_until_unix: g.usage_cap_until_unix,
            cooldown_until_unix: g
                .cooldown
                .until
                .filter(|&u| u > now && !g.cooldown.proactive)
                .map(|u| self.wall.unix_at(u)),
            cooldown_level: g.cooldown.level,
            last_429: g.cooldown.last_429.clone(),
            clients: g
                .clients
                .iter()
                .filter(|c| c.used_today > 0)
                .map(|c| (c.settings.name.to_string(), c.used_today))
                .collect(),
        }
    }
}

/// What the dispatcher found for the head of the queue.
enum Pick {
    /// This waiter may go as soon as the account has a token.
    Go(ClientId, u64),
    /// Nobody may go now; look again then (or when woken).
    Wait(Option<Instant>),
}

impl Inner {
    fn roll_day(&mut self, shared: &Shared, now_unix: f64) {
        let today = day_index(now_unix as i64, self.s.day_reset_offset);
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
            self.models.new_day();
            if let Some(q) = &mut self.upstream.quota {
                // The upstream's day restarts too; its next figures will say so.
                q.used = 0;
                q.remaining = q.total;
            }
            tracing::info!(
                day = today,
                "new quota day: daily counts reset, daily gate open"
            );
            shared.request_persist();
        }
    }

    /// The daily cap in force: the configured one, or the upstream's plan quota when that
    /// is smaller (only with `beyond_quota = "stop"`: otherwise the plan may overflow into
    /// pay-as-you-go on purpose).
    fn daily_cap(&self) -> Option<u64> {
        let upstream = self
            .upstream
            .quota
            .map(|q| q.total)
            .filter(|&t| t > 0 && self.s.beyond_quota_stop);
        match (self.s.requests_per_day, upstream) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The GCRA emission interval of the rate in force.
    fn spacing(&self) -> Duration {
        Duration::from_secs(60) / self.rpm_in_force.max(1)
    }

    /// The rate the account should run at: the configured one, lowered to the upstream's
    /// advertised rate when that is lower and `follow_upstream_limits` is on.
    fn target_rate(&self) -> u32 {
        let configured = self.s.requests_per_minute;
        match self.upstream.rl_user {
            Some(AdvertisedRate::PerMinute(n)) if self.s.follow_upstream_limits => {
                configured.min(n.get())
            }
            _ => configured,
        }
    }

    /// Swap in a bucket for `rpm`, keeping the schedule: the fresh bucket's burst is taken at
    /// once and no token comes before the old bucket's next one, so a change of rate never
    /// grants a fresh burst.
    fn set_rate(&mut self, shared: &Shared, rpm: u32, now: Instant, force: bool) {
        if rpm == self.rpm_in_force && !force {
            return;
        }
        let next_old = self.next_token_at(shared, now);
        let burst = self.s.burst.max(1);
        let bucket = make_bucket(rpm, burst, shared.clock);
        if let Some(n) = std::num::NonZeroU32::new(burst) {
            let _ = bucket.check_n(n);
        }
        self.bucket = bucket;
        self.rpm_in_force = rpm;
        let t = self.spacing();
        self.tat = Some(shared.clock.now() + t * burst);
        self.hold_until = (next_old > now).then_some(next_old);
    }

    /// When the account's bucket next has a token (now if it has one).
    fn next_token_at(&self, shared: &Shared, now: Instant) -> Instant {
        let (tokens, next) = self.tokens_now(shared);
        let at = if tokens > 0 { now } else { now + next };
        at.max(self.hold_until.unwrap_or(now))
    }

    /// Take one token from the account's bucket, or say when the next one comes.
    fn bucket_take(&mut self, shared: &Shared, now: Instant) -> Result<(), Instant> {
        if let Some(h) = self.hold_until {
            if h > now {
                return Err(h);
            }
            self.hold_until = None;
        }
        match self.bucket.check() {
            Ok(()) => {
                self.took_token(shared);
                Ok(())
            }
            Err(nu) => Err(now + nu.wait_time_from(shared.clock.now())),
        }
    }

    /// The gates other than the bucket, in the contract's order. Ends an expired cooldown.
    fn blocked(&mut self, shared: &Shared, now: Instant, now_unix: f64) -> Option<Blocked> {
        if let Some(cap) = self.daily_cap() {
            if self.day.used >= cap {
                return Some(Blocked::Daily {
                    open_at_unix: day_end(self.day.index, self.s.day_reset_offset) as f64,
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
        if let Some(g) = self.usage_cap_until_unix {
            if g > now_unix {
                return Some(Blocked::UsageCap { open_at_unix: g });
            }
            self.usage_cap_until_unix = None;
            tracing::info!("a new usage-cap window began: gate reopened");
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
        if self.in_flight >= self.s.max_concurrent {
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
        let block = self.s.reserve_block();
        self.day.pending = Some(self.day.used.saturating_add(block));
        shared.request_persist();
    }

    /// Record a token taken from governor in the mirror (same update as governor's GCRA).
    fn took_token(&mut self, shared: &Shared) {
        let now = shared.clock.now();
        let t = self.spacing();
        let tat = self.tat.unwrap_or(now).max(now);
        self.tat = Some(tat + t);
    }

    /// Tokens in the bucket now, and how long until the next one.
    fn tokens_now(&self, shared: &Shared) -> (u32, Duration) {
        let burst = self.s.burst.max(1);
        let t = self.spacing();
        let tau = t * (burst - 1);
        let now = shared.clock.now();
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

    /// When a request with `ahead` waiters before it would get its token: the bucket's next
    /// conforming time plus one spacing per waiter ahead, and no earlier than the end of a
    /// cooldown (after which the probe goes first and the rest follow at the spacing).
    fn estimate(&self, shared: &Shared, ahead: usize, now: Instant) -> Instant {
        let burst = self.s.burst.max(1);
        let t = self.spacing();
        let tau = t * (burst - 1);
        let ahead = u32::try_from(ahead).unwrap_or(u32::MAX);
        let behind = t.saturating_mul(ahead);
        let mut at = now;
        if let Some(tat) = self.tat {
            at = at.max(shared.clock.to_instant(tat.saturating_sub(tau)) + behind);
        } else if ahead >= burst {
            at = at.max(now + t * (ahead - burst + 1));
        }
        if let Some(h) = self.hold_until.filter(|&h| h > now) {
            at = at.max(h + behind);
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

    /// Both daily caps (the client's and the account's) can take `cost` more today.
    fn fits_today(&self, client: ClientId, cost: u32) -> bool {
        let cost = u64::from(cost);
        let c = &self.clients[client];
        c.settings
            .requests_per_day
            .is_none_or(|d| c.used_today.saturating_add(cost) <= d)
            && self
                .daily_cap()
                .is_none_or(|d| self.day.used.saturating_add(cost) <= d)
    }

    fn client_ready(&self, client: ClientId, now: Instant) -> bool {
        self.clients[client]
            .bucket
            .as_ref()
            .is_none_or(|b| b.is_ready(now))
    }

    /// The client's own daily cap cannot take this request today.
    fn client_daily_refusal(
        &self,
        client: ClientId,
        cost: u32,
        now_unix: f64,
    ) -> Option<Rejection> {
        let c = &self.clients[client];
        let cap = c.settings.requests_per_day?;
        if c.used_today.saturating_add(u64::from(cost)) <= cap {
            return None;
        }
        let reset = day_end(self.day.index, self.s.day_reset_offset) as f64;
        let wait = Duration::from_secs_f64((reset - now_unix).max(0.0));
        let mut r = self.reject(Reason::ClientDailyQuotaExhausted, wait, now_unix);
        r.client = Some(c.settings.name.clone());
        Some(r)
    }

    /// The account's daily cap cannot take a request of this cost today (a cost-1 request
    /// may still fit where a costlier one does not).
    fn account_daily_refusal(&self, cost: u32, now_unix: f64) -> Option<Rejection> {
        let cap = self.daily_cap()?;
        if self.day.used.saturating_add(u64::from(cost)) <= cap {
            return None;
        }
        let reset = day_end(self.day.index, self.s.day_reset_offset) as f64;
        let wait = Duration::from_secs_f64((reset - now_unix).max(0.0));
        Some(self.reject(Reason::DailyQuotaExhausted, wait, now_unix))
    }

    /// Hand out a permit: take the client's own rate, the daily counts (account and client)
    /// and a concurrency slot, all at this one moment; the first grant after a cooldown (of
    /// the account or of the request's model) is the probe.
    fn grant(
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
            tracing::info!(
                used = self.day.used,
                resets_at = %crate::units::format_rfc3339(day_end(self.day.index, self.s.day_reset_offset)),
                "daily cap reached: gate closed until the quota day resets"
            );
        }
        let c = &mut self.clients[client];
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
            // Reserve the next block while half of this one is still left, so the write is
            // normally done before anyone has to wait for it.
            let block = self.s.reserve_block();
            if self.day.used.saturating_add(block / 2) >= self.day.durable {
                self.reserve(shared);
            }
        } else if shared.persist.is_some() {
            shared.request_persist();
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
            announcement: None,
            queue_wait: waited,
        }
    }

    fn limits_view(&self) -> LimitsView {
        let cap = self.daily_cap();
        LimitsView {
            requests_per_minute: self.rpm_in_force,
            burst: self.s.burst,
            requests_per_day: cap,
            used_today: self.day.used,
            remaining_today: cap.map(|d| d.saturating_sub(self.day.used)),
            day_resets_at_unix: day_end(self.day.index, self.s.day_reset_offset),
        }
    }

    fn reject(&self, reason: Reason, retry_after: Duration, now_unix: f64) -> Rejection {
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
            limits: Some(self.limits_view()),
            cooldown_until_unix: self
                .cooldown
                .until
                .filter(|&u| u > now)
                .map(|u| now_unix + (u - now).as_secs_f64()),
            tripped,
            ..Rejection::new(reason)
        }
    }

    fn shutting_down(&self, wait: Duration, now_unix: f64) -> Rejection {
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
    fn effective_level(&self, now: Instant) -> u32 {
        match self.cooldown.ended_at {
            Some(end)
                if self.cooldown.until.is_none()
                    && now.saturating_duration_since(end) >= self.s.cooldown_decay =>
            {
                0
            }
            _ => self.cooldown.level,
        }
    }

    /// Find the first waiter, in fair order, that its client's rate, its model's gates and
    /// the daily caps let go now. Waiters that can never make it (their deadline ends before
    /// their model reopens, or their daily cap is spent) are answered on the way, in `out`.
    fn pick(&mut self, shared: &Shared, now: Instant, now_unix: f64, out: &mut Out) -> Pick {
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
            .instant_at(day_end(self.day.index, self.s.day_reset_offset) as f64);
        let found = {
            let Inner {
                queue,
                models,
                clients,
                ..
            } = self;
            queue.find(
                |c| match clients[c].bucket.as_ref().map(|b| b.ready_at(now)) {
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
                            Some(ModelBlock::Cooling(until)) => {
                                if w.deadline < until {
                                    shed.borrow_mut().push((
                                        w.client,
                                        w.id,
                                        Reason::ModelCooldown,
                                        until - now,
                                        true,
                                    ));
                                } else {
                                    soonest(until);
                                }
                                return false;
                            }
                            Some(ModelBlock::Quota(open_unix)) => {
                                let open = shared.wall.instant_at(open_unix);
                                if w.deadline < open {
                                    shed.borrow_mut().push((
                                        w.client,
                                        w.id,
                                        Reason::DailyQuotaExhausted,
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
                    let c = &clients[w.client];
                    let over_client = c
                        .settings
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
    fn serve(
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
    fn step(&mut self, shared: &Arc<Shared>, out: &mut Out) -> Next {
        let now = Instant::now();
        let now_unix = shared.wall.now_unix();
        self.roll_day(shared, now_unix);
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
            match self.blocked(shared, now, now_unix) {
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
            if shared.fleet.is_some() {
                // The token comes from Redis, asked outside the lock by the dispatcher.
                return match self.remote_not_before {
                    Some(t) if t > now => bounded(Next::At(t)),
                    _ => Next::Take,
                };
            }
            if let Err(at) = self.bucket_take(shared, now) {
                return bounded(Next::At(at));
            }
            self.serve(shared, client, id, now, out);
        }
    }

    /// Fleet mode: Redis granted a token; give it to the waiter that may go now, if any.
    fn grant_head(&mut self, shared: &Arc<Shared>, out: &mut Out, now: Instant) -> bool {
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

    /// The account's daily figures as the upstream sees them (a header snapshot taken before
    /// a call of `cost`, or the usage poll with `cost` 0). The day's count only goes up.
    #[allow(clippy::too_many_arguments)]
    fn apply_account_quota(
        &mut self,
        shared: &Shared,
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
            shared.request_persist();
        }
        let spent = remaining <= u64::from(cost);
        if spent && self.s.beyond_quota_stop {
            let until = day_end(self.day.index, self.s.day_reset_offset) as f64;
            if self.day.gate_until_unix.is_none_or(|g| g < until) {
                self.day.gate_until_unix = Some(until);
                tracing::warn!(
                    total,
                    used,
                    until = %crate::units::format_rfc3339(until as i64),
                    "the upstream says the plan's daily quota is spent: gate closed until the reset, so nothing is billed beyond it (limits.beyond_quota = \"stop\")"
                );
                shared.request_persist();
            }
        }
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

fn deliver(out: &mut Out) {
    for (tx, r) in out.drain(..) {
        // A waiter that left in the meantime drops the permit here, which returns it.
        let _ = tx.send(r);
    }
}

/// One Redis admission attempt for the head of the queue (fleet mode).
async fn take_remote(shared: &Arc<Shared>, out: &mut Out) {
    let Some(f) = shared.fleet.clone() else {
        return;
    };
    let (spacing, burst, cap, offset) = {
        let g = shared.lock();
        (g.spacing(), g.s.burst, g.daily_cap(), g.s.day_reset_offset)
    };
    let result = f.take(spacing, burst, cap, offset).await;
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
                    out.push((w.payload.reply, Err(r)));
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
/// frees the concurrency slot, gives back what a request never sent had taken (the daily
/// counts, its client's and its model's rate), and lets another request probe if this was an
/// unanswered probe.
pub struct Permit {
    shared: Arc<Shared>,
    client: ClientId,
    model: Option<Arc<str>>,
    cost: u32,
    /// The quota day that counted this request: a permit that outlives midnight gives back
    /// to that day, never to the next.
    day: i64,
    epoch: u64,
    probe: bool,
    model_epoch: u64,
    model_probe: bool,
    /// What the client's and the model's own rate recorded at the take, for a give-back.
    client_tat: Option<Instant>,
    model_tat: Option<Instant>,
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
        g.roll_day(shared, now_unix);
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
                    shared,
                    q.total,
                    q.used,
                    remaining,
                    self.cost,
                    now_unix,
                    QuotaSeen::Header,
                );
            } else if let (Some(m), true) = (&self.model, q.total > 0) {
                let stop = g.s.beyond_quota_stop;
                let until = day_end(g.day.index, g.s.day_reset_offset) as f64;
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
                    if n.get() < g.s.requests_per_minute && !g.upstream.warned {
                        g.upstream.warned = true;
                        tracing::warn!(
                            configured = g.s.requests_per_minute,
                            advertised = n.get(),
                            following = g.s.follow_upstream_limits,
                            "limits.requests_per_minute is above the rate the upstream advertises (X-Chutes-RL-User)"
                        );
                    }
                }
                if target != g.rpm_in_force {
                    tracing::info!(
                        from = g.rpm_in_force,
                        to = target,
                        "rate in force changed to follow the upstream's advertised limit"
                    );
                    g.set_rate(shared, target, now, false);
                }
            }
        }
        if let (Some(r), Some(m), true) = (obs.rl_chute, &self.model, g.s.follow_upstream_limits) {
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
            Outcome::RateLimited { .. } if !model_scope => FleetNews::Cooldown,
            Outcome::QuotaExceeded { .. } => FleetNews::Gate,
            _ => FleetNews::Nothing,
        };
        let tell_fleet = shared.fleet.is_some().then_some(news);
        // The model's probe, whatever the answer (a capacity 429 restarts its cooldown).
        if self.model_probe {
            if let Some(m) = self.model.as_deref() {
                if let Some(e) = g.models.get_mut(m) {
                    if e.probe == Probe::Outstanding {
                        match &outcome {
                            Outcome::Failed => e.probe = Probe::Ready,
                            Outcome::RateLimited { .. } => e.probe = Probe::Open,
                            _ => {
                                e.probe = Probe::Open;
                                e.level = 0;
                                tracing::info!(model = m, "model probe succeeded: model reopened");
                            }
                        }
                    }
                }
            }
        }
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
                let level = if escalate {
                    e.level.saturating_add(1)
                } else {
                    e.level.max(1)
                };
                let computed = ModelGates::backoff(
                    s.model_cooldown_initial,
                    s.model_cooldown_max,
                    s.cooldown_multiplier,
                    level,
                );
                let (duration, hint_note) = match hint {
                    Some(Hint::After(d)) if d <= s.model_cooldown_max => {
                        (d.max(Duration::from_secs(1)), None)
                    }
                    Some(Hint::After(d)) => (
                        s.model_cooldown_max,
                        Some(format!(
                            "upstream asked for {:.0}s, clamped to cooldown.model_max",
                            d.as_secs_f64()
                        )),
                    ),
                    Some(Hint::Unparseable(h)) => (
                        computed,
                        Some(format!("unparseable rate-limit header ignored: {h}")),
                    ),
                    None => (computed, None),
                };
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
                let level = if escalate {
                    g.effective_level(now).saturating_add(1)
                } else {
                    g.cooldown.level.max(1)
                };
                let computed = ModelGates::backoff(
                    s.cooldown_initial,
                    s.cooldown_max,
                    s.cooldown_multiplier,
                    level,
                );
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
                    model: None,
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
            Outcome::UsageCap => {
                let until = crate::signals::next_usage_window_unix(now_unix);
                g.usage_cap_until_unix = Some(until);
                if self.probe && g.cooldown.probe == Probe::Outstanding {
                    g.cooldown.probe = Probe::Open;
                }
                tracing::warn!(
                    until = %crate::units::format_rfc3339(until as i64),
                    "upstream says the plan's usage cap is spent: gate closed until the next 4-hour window"
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
            (Some(FleetNews::Gate), _) => gate.and_then(|until| {
                spawn_fleet(shared, "quota gate", move |f| async move {
                    f.close_daily_gate(until).await
                })
            }),
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
        let refund_fleet = !self.sent && shared.fleet.is_some();
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
                let c = &mut g.clients[self.client];
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
                let _ = spawn_fleet(shared, "probe release", |f| async move {
                    f.probe_done(false).await
                });
            }
            if self.model_probe && !self.reported {
                if let Some(e) = self.model.as_deref().and_then(|m| g.models.get_mut(m)) {
                    if e.probe == Probe::Outstanding {
                        e.probe = Probe::Ready;
                    }
                }
            }
            if refund_fleet && g.day.index == self.day {
                let (spacing, offset) = (g.spacing(), g.s.day_reset_offset);
                let _ = spawn_fleet(shared, "refund", move |f| async move {
                    f.refund(spacing, offset).await
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

/// `/status` view of the budget.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The rate in force (the configured one, or lower when the upstream advertises less).
    pub requests_per_minute: u32,
    pub configured_requests_per_minute: u32,
    /// `X-Chutes-RL-User` as last seen (`None` also when it said `inf`).
    pub advertised_requests_per_minute: Option<u32>,
    pub advertised_unlimited: bool,
    pub burst: u32,
    /// The daily cap in force (configured, or the upstream's plan quota when smaller).
    pub requests_per_day: Option<u64>,
    pub configured_requests_per_day: Option<u64>,
    pub max_concurrent: usize,
    pub max_depth: usize,
    pub max_wait: Duration,
    pub tokens_available: u32,
    pub next_token_in: Duration,
    pub used_today: u64,
    pub remaining_today: Option<u64>,
    pub day_resets_at_unix: i64,
    pub daily_gate_until_unix: Option<f64>,
    pub usage_cap_until_unix: Option<f64>,
    pub cooldown_active: bool,
    pub cooldown_proactive: bool,
    pub cooldown_until_unix: Option<f64>,
    pub cooldown_level: u32,
    pub gate: Probe,
    pub last_429: Option<Last429>,
    pub queue_depth: usize,
    pub oldest_wait: Option<Duration>,
    pub in_flight: usize,
    pub upstream_quota: Option<UpstreamQuota>,
    pub models: Vec<ModelSnapshot>,
    pub clients: Vec<ClientSnapshot>,
}

/// One model the budget knows something about.
#[derive(Debug, Clone)]
pub struct ModelSnapshot {
    pub model: Arc<str>,
    pub cooling_until_unix: Option<f64>,
    pub level: u32,
    pub probe: Probe,
    pub last_body: String,
    pub last_429_at_unix: Option<f64>,
    pub advertised_requests_per_minute: Option<u32>,
    pub quota_total: Option<u64>,
    pub quota_used: Option<u64>,
    pub quota_gate_until_unix: Option<f64>,
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

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
//! The account's token comes from a store (`store.rs`): this process's governor bucket, or
//! Redis shared by a fleet, whose take is an effect the dispatcher performs after the lock.
//! Decisions never ask which. What they leave to do (log lines, a state write, Redis calls)
//! is performed by the lock's guard once the mutex is released (`effects.rs`).
//!
//! What is absent on purpose: no I/O under the lock (the state file is written by
//! `crate::state`'s writer task; admission only asks for a write and waits for it), no HTTP
//! types, no response rendering (a refusal is a typed [`Rejection`] that `crate::response`
//! turns into bytes).
//!
//! Tokens and the daily count are taken only at the moment a request is granted; a waiter that
//! leaves or times out consumes nothing. The grant is a [`Permit`] that the proxy keeps inside
//! the response body, so the concurrency slot is freed exactly when the stream ends or the
//! client goes away, and a permit dropped before its request was sent gives the daily count
//! back.

mod budget;
mod driver;
mod effects;
pub mod fleet;
mod gcra;
pub mod models;
mod permit;
mod queue;
mod snapshot;
mod store;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

pub use crate::clients::ClientId;
use effects::{Effects, Guard, Log};
use fleet::Fleet;
use gcra::Gcra;
use models::{ModelBlock, ModelGates};
use queue::FairQueue;

use budget::Next;
use driver::{deliver, dispatch, listen_fleet};
pub use permit::Permit;
pub use snapshot::{ClientSnapshot, ModelSnapshot, Snapshot};
use store::{Rate, Store};

pub use crate::clients::ClientSettings;
use crate::clients::{ClientTable, DEFAULT_CLIENT};
use crate::clock::{TokioClock, WallClock};
use crate::config::{BeyondQuota, Config, CooldownConfig, Limits, QueueConfig};
use crate::response::{LimitsView, Policy, Reason, Rejection};
use crate::signals::{AdvertisedRate, ChutesQuota, Hint, Scope429};
use crate::state::Persisted;
use crate::units::{day_end, day_index};

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
    /// A re-send after an upstream 429: it queues ahead of everyone (and so is the probe
    /// when the cooldown ends) and is never refused for a full queue.
    pub retry: bool,
}

impl Ask {
    pub fn new(client: ClientId, max_wait: Duration) -> Ask {
        Ask {
            client,
            model: None,
            cost: 1,
            max_wait,
            retry: false,
        }
    }
}

/// What the budget needs from the configuration: the `[limits]`, `[queue]` and `[cooldown]`
/// sections as `config.rs` models them (read from there, never copied field by field), and
/// the few things admission derives from the rest.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    pub queue: QueueConfig,
    pub cooldown: CooldownConfig,
    /// Whether granted requests must be covered by a reservation on disk first.
    pub durable: bool,
    /// Who may call: the one table attribution, admission and metrics share (ids are its rows).
    pub clients: ClientTable,
    /// Share of the limits used while Redis is unreachable with `on_redis_error = "local"`.
    pub fallback_share: f64,
}

impl Settings {
    pub fn from_config(c: &Config) -> Settings {
        Settings {
            limits: c.limits.clone(),
            queue: c.queue.clone(),
            cooldown: c.cooldown.clone(),
            durable: c.state.path.is_some(),
            clients: ClientTable::new(&c.clients),
            fallback_share: c.shared_state.local_fallback_share,
        }
    }

    /// `limits.beyond_quota = "stop"`: the upstream's quota headers close the daily gate.
    pub fn beyond_quota_stop(&self) -> bool {
        self.limits.beyond_quota == BeyondQuota::Stop
    }

    /// The GCRA emission interval.
    pub fn spacing(&self) -> Duration {
        store::rate_spacing(self.limits.requests_per_minute.get())
    }

    /// How many daily requests one state write reserves ahead. A crash over-counts by at most
    /// this much; a larger block means fewer fsyncs. 1% of the cap, between 1 and 50.
    fn reserve_block(&self) -> u64 {
        self.limits
            .requests_per_day
            .map_or(1, |d| (d.get() / 100).clamp(1, 50))
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
    /// `used` is an assumption (an untrustworthy state file), not a count, until the day ends.
    assumed: bool,
    /// What closed `gate_until_unix`, in words for `/status`.
    gate_cause: &'static str,
    /// Fleet mode: the largest fleet-wide count Redis reported today (`used` is this
    /// replica's share); what clients and operators are shown, and what sheds at once.
    fleet_used: u64,
}

/// What admission keeps per client; its caps and name are its row of `Settings::clients`.
struct ClientState {
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
    /// Where the account's tokens (and, in a fleet, its day's count) are taken.
    store: Store,
    /// The rate the store enforces: the configured one, or lower if the upstream says so.
    rpm_in_force: u32,
    queue: FairQueue<Pending>,
    in_flight: usize,
    day: Day,
    cooldown: Cooldown,
    /// Upstream 402 "usage cap exceeded": closed until this UNIX time (a 4-hour boundary).
    usage_cap_until_unix: Option<f64>,
    models: ModelGates,
    upstream: Upstream,
    clients: Vec<ClientState>,
    /// Shutting down: the grace ends then; nobody still queued at that instant is served.
    closing: Option<Instant>,
    /// What the decisions taken under the current lock leave to do after it (`Guard`).
    fx: Effects,
}

struct Shared {
    clock: TokioClock,
    wall: WallClock,
    inner: Mutex<Inner>,
    /// Wakes the dispatcher: a waiter arrived or left, a permit ended, a gate changed.
    wake: Notify,
    /// Bumped to ask the state writer for a write; `None` when memory only.
    persist: Option<watch::Sender<u64>>,
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

/// Why the daily gate is closed (`/status` `daily.gate_reason`).
const GATE_BY_402: &str = "the upstream answered 402 quota exceeded";
const GATE_BY_HEADERS: &str = "the upstream's quota headers say the plan's daily quota is spent";
const GATE_BY_FLEET: &str = "the fleet's daily count reached its cap (or another replica's gate)";

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
        let rate = Rate {
            spacing: store::rate_spacing(settings.limits.requests_per_minute.get()),
            burst: settings.limits.burst.get(),
        };
        let store = match &fleet {
            Some(f) => Store::redis(
                Arc::clone(f),
                settings.limits.requests_per_minute.get(),
                settings.limits.burst.get(),
                settings.fallback_share,
            ),
            None => Store::local(rate),
        };
        let now_unix = wall.now_unix();
        let today = day_index(now_unix as i64, settings.limits.day_reset_offset);
        let (used, gate) = if restored.day == Some(today) {
            (restored.used, restored.daily_gate_until_unix)
        } else {
            (0, None)
        };
        let durable = if settings.durable
            && settings.limits.requests_per_day.is_some()
            && store.keeps_day()
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
            })
            .collect();
        let inner = Inner {
            rpm_in_force: settings.limits.requests_per_minute.get(),
            queue: FairQueue::new(&settings.clients),
            s: Arc::new(settings),
            store,
            in_flight: 0,
            day: Day {
                index: today,
                used,
                durable,
                pending: None,
                gate_until_unix: gate,
                assumed: restored.assumed && restored.day == Some(today),
                fleet_used: 0,
                gate_cause: GATE_BY_402,
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
            closing: None,
            fx: Effects::default(),
        };
        let shared = Arc::new(Shared {
            clock,
            wall,
            inner: Mutex::new(inner),
            wake: Notify::new(),
            persist,
        });
        if let Some(f) = fleet {
            tokio::spawn(listen_fleet(f, Arc::downgrade(&shared)));
        }
        let dispatcher = tokio::spawn(dispatch(Arc::clone(&shared)));
        Admission { shared, dispatcher }
    }

    /// The wall clock admission converts UNIX instants with. Whoever reads an upstream's reset
    /// instants reads "now" from this one, so a pinned clock (tests) stays consistent.
    pub fn wall(&self) -> WallClock {
        self.shared.wall
    }

    /// The settings in force (they change on a reload).
    pub fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.shared.lock().s)
    }

    /// Wait for admission of a request of `client` with no known model, costing 1.
    pub async fn acquire(&self, client: ClientId, max_wait: Duration) -> Result<Permit, Rejection> {
        self.admit(Ask::new(client, max_wait)).await
    }

    /// Wait for admission. Cancel-safe: dropping the future leaves the queue at once and
    /// consumes nothing.
    // A rejection is built once per shed request and moved a couple of times; boxing it
    // would add an allocation for nothing.
    // Not an `async fn`: that would keep a copy of `ask` beside `ask` in every queued
    // request's state.
    #[allow(clippy::result_large_err, clippy::manual_async_fn)]
    pub fn admit(&self, ask: Ask) -> impl Future<Output = Result<Permit, Rejection>> + Send + '_ {
        async move {
            let shared = &self.shared;
            let now = Instant::now();
            let cost = ask.cost.max(1);
            let mut max_wait = ask.max_wait;
            let mut deadline = now + max_wait;
            let (client, id, rx) = {
                let mut g = shared.lock();
                let client = if g.s.clients.contains(ask.client) {
                    ask.client
                } else {
                    DEFAULT_CLIENT
                };
                let now_unix = shared.wall.now_unix();
                g.roll_day(now_unix);
                let blocked = g.blocked(now, now_unix);
                if max_wait.is_zero() && g.queue.is_empty() && blocked.is_none() {
                    // "Never queue" still deserves its one question to a store that cannot
                    // answer under the lock (Redis): allow exactly the time of that round trip.
                    max_wait = g.store.take_time();
                    deadline = now + max_wait;
                }
                if let Some(r) = g.store.unavailable() {
                    // Shed now; the dispatcher keeps checking whether the store is back.
                    drop(g);
                    shared.wake.notify_one();
                    return Err(r);
                }
                // Shed at once when waiting cannot help, in the contract's order: the account's
                // gates, the model's, the client's daily cap.
                match blocked {
                    Some(Blocked::Daily { open_at_unix }) => {
                        let open = shared.wall.instant_at(open_at_unix);
                        if open > deadline {
                            return Err(g.reject(
                                Reason::DailyQuotaExhausted,
                                open - now,
                                now_unix,
                            ));
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
                // In UNIX seconds: converting the day's end to an instant reads both clocks again.
                let day_left = day_end(g.day.index, g.s.limits.day_reset_offset) as f64 - now_unix;
                if day_left > max_wait.as_secs_f64() {
                    if let Some(r) = g.client_daily_refusal(client, cost, now_unix) {
                        return Err(r);
                    }
                    if let Some(r) = g.account_daily_refusal(cost, now_unix) {
                        return Err(r);
                    }
                }
                // Everything open and nobody waiting who could go now (waiters held by their
                // model or their client's rate do not count): grant inline, no task switch.
                if blocked.is_none()
                    && model_block.is_none()
                    && g.closing.is_none()
                    && g.client_ready(client, now)
                    && g.fits_today(client, cost)
                    && !g.anyone_ready(now, now_unix)
                    && g.take_now(shared, now)
                {
                    return Ok(g.grant(shared, client, ask.model, cost, Duration::ZERO, now));
                }
                if g.queue.len() >= g.s.queue.max_depth && !ask.retry {
                    // When the last request now queued is served.
                    let drain = g.estimate(shared, g.queue.len().saturating_sub(1), now) - now;
                    return Err(g.reject(Reason::QueueFull, drain, now_unix));
                }
                let ahead = g.queue.ahead_of_new(client);
                let account_eta = g.estimate(shared, ahead, now);
                let client_eta = g.clients[client.index()]
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
                        r.client = Some(g.s.clients.row(client).name.clone());
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
                let id = if ask.retry {
                    g.queue.push_urgent(client, deadline, now, pending)
                } else {
                    g.queue.push(client, deadline, now, pending)
                };
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
            // In a block of its own: the answer's place (176 bytes) is then not kept in this
            // future through the waits below, which every queued request would pay for.
            {
                let result = tokio::select! {
                    r = &mut rx => r.ok(),
                    _ = tokio::time::sleep_until(deadline) => rx.try_recv().ok(),
                };
                guard.armed = false;
                if let Some(r) = result {
                    return r;
                }
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
            g.queue.set_weights(&new.clients);
            for (c, cs) in g.clients.iter_mut().zip(&new.clients) {
                c.bucket = match (c.bucket.take(), cs.requests_per_minute) {
                    (Some(mut b), Some(rpm)) => {
                        b.set_rate(rpm, cs.burst, now);
                        Some(b)
                    }
                    (None, Some(rpm)) => Some(Gcra::per_minute(rpm, cs.burst)),
                    (_, None) => None,
                };
            }
            let rate_changed = new.limits.requests_per_minute != g.s.limits.requests_per_minute
                || new.limits.burst != g.s.limits.burst;
            let durable =
                new.durable && new.limits.requests_per_day.is_some() && g.store.keeps_day();
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
            g.roll_day(now_unix);
            g.upstream.polled = true;
            g.apply_account_quota(
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
        g.queue.is_empty() && g.blocked(now, now_unix).is_none() && g.take_now(shared, now)
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
        let retry = match g.blocked(now, now_unix) {
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
    pub fn fleet(&self) -> Option<Arc<Fleet>> {
        self.shared.lock().store.fleet().cloned()
    }

    /// The current quota-day index.
    pub fn day_index(&self) -> i64 {
        self.shared.lock().day.index
    }

    /// How many requests wait in the queue now (cheaper than a [`Snapshot`]).
    pub fn queue_depth(&self) -> usize {
        self.shared.lock().queue.len()
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

impl Shared {
    /// Take the admission lock. What the decisions under it leave to do (log lines, a
    /// state write, fleet calls) is done when the returned guard is dropped, after the
    /// mutex is released.
    fn lock(&self) -> Guard<'_> {
        // A panic while holding the lock would be a bug; the state is still consistent
        // enough to keep serving, so recover rather than take the whole proxy down.
        Guard::new(self, self.inner.lock().unwrap_or_else(|p| p.into_inner()))
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
            assumed: g.day.assumed,
            clients: g
                .s
                .clients
                .iter()
                .zip(&g.clients)
                .filter(|(_, c)| c.used_today > 0)
                .map(|(row, c)| (row.name.to_string(), c.used_today))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_fx;
#[cfg(test)]
mod tests_r2;

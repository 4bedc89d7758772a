//! What `/status`, the metrics and the history read of the budget: one [`Snapshot`] taken
//! under the lock, with what limits a new request now and how long it would wait.
//!
//! The snapshot holds state only (what is in force now, counts, gates, what the upstream
//! last said); the configured limits stay in [`Settings`](super::Settings), which readers
//! take from [`Admission::settings`]. Not here: deciding anything, rendering the document
//! (`crate::admin`, `crate::status`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{store, Admission, Blocked, Last429, Probe, UpstreamQuota};
use crate::signals::AdvertisedRate;

impl Admission {
    /// A point-in-time view for `/status` and metrics.
    pub fn snapshot(&self) -> Snapshot {
        let shared = &self.shared;
        let now = Instant::now();
        let now_unix = shared.wall.now_unix();
        let mut g = shared.lock();
        g.roll_day(now_unix);
        // What limits a new request right now, in the contract's order, and how long it
        // would wait (this also ends an expired cooldown, so the probe shows as ready).
        let blocked = g.blocked(now, now_unix);
        let (tokens, next_in) = g.store.peek(&shared.clock, g.rate(), now);
        let limited_by = if g.store.unavailable().is_some() {
            Some("shared_state_unavailable")
        } else {
            match blocked {
                Some(Blocked::Daily { .. }) => Some("daily_quota_exhausted"),
                Some(Blocked::UsageCap { .. }) => Some("usage_cap_exhausted"),
                Some(Blocked::Cooldown { .. }) if g.cooldown.proactive => Some("upstream_window"),
                Some(Blocked::Cooldown { .. }) => Some("upstream_cooldown"),
                Some(Blocked::Probe) => Some("probe_in_flight"),
                Some(Blocked::Concurrency) => Some("max_concurrent"),
                Some(Blocked::Durability) => Some("state_file_reservation"),
                None if !g.queue.is_empty() => Some("queue"),
                None if tokens == 0 || g.store.held(now) => Some("account_rate"),
                None => None,
            }
        };
        let new_request_wait = match blocked {
            Some(Blocked::Daily { open_at_unix } | Blocked::UsageCap { open_at_unix }) => {
                Duration::from_secs_f64((open_at_unix - now_unix).max(0.0))
            }
            _ => g
                .estimate(shared, g.queue.len(), now)
                .saturating_duration_since(now),
        };
        let cooldown_until = g.cooldown.until.filter(|&u| u > now);
        let cap = g.daily_cap();
        Snapshot {
            requests_per_minute: g.rpm_in_force,
            advertised_requests_per_minute: match g.upstream.rl_user {
                Some(AdvertisedRate::PerMinute(n)) => Some(n.get()),
                _ => None,
            },
            advertised_unlimited: matches!(g.upstream.rl_user, Some(AdvertisedRate::Unlimited)),
            requests_per_day: cap,
            tokens_available: tokens,
            next_token_in: next_in,
            used_today: g.used_view(),
            replica_used_today: g.store.replica_share(g.day.used),
            remaining_today: cap.map(|d| d.saturating_sub(g.used_view())),
            day_resets_at_unix: g.resets_at_unix(now_unix),
            daily_gate_until_unix: g.day.gate_until_unix.filter(|&u| u > now_unix),
            daily_assumed: g.day.assumed,
            daily_gate_reason: g
                .day
                .gate_until_unix
                .filter(|&u| u > now_unix)
                .map(|_| g.day.gate_cause),
            limited_by,
            new_request_wait,
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
                .s
                .clients
                .ids()
                .zip(&g.clients)
                .map(|((id, row), c)| ClientSnapshot {
                    name: row.name.clone(),
                    queued: g.queue.client_len(id),
                    used_today: c.used_today,
                    forwarded: c.forwarded,
                })
                .collect(),
        }
    }
}

/// `/status` view of the budget at one moment: what is in force now (rates and caps the
/// upstream may have lowered), counts, gates and what the upstream last said. The configured
/// limits are not copied here: they are read from [`Admission::settings`].
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The rate in force (the configured one, or lower when the upstream advertises less).
    pub requests_per_minute: u32,
    /// `X-Chutes-RL-User` as last seen (`None` also when it said `inf`).
    pub advertised_requests_per_minute: Option<u32>,
    pub advertised_unlimited: bool,
    /// The daily cap in force (configured, or the upstream's plan quota when smaller).
    pub requests_per_day: Option<u64>,
    pub tokens_available: u32,
    pub next_token_in: Duration,
    /// The day's count: fleet-wide in a Redis fleet (as last reported by Redis).
    pub used_today: u64,
    /// In a fleet, this replica's own share of `used_today`.
    pub replica_used_today: Option<u64>,
    pub remaining_today: Option<u64>,
    pub day_resets_at_unix: i64,
    pub daily_gate_until_unix: Option<f64>,
    /// The day's count is an assumption (the state file could not be trusted at start).
    pub daily_assumed: bool,
    /// What closed the daily gate, when one is closed.
    pub daily_gate_reason: Option<&'static str>,
    /// What limits a new request right now (`None`: it would go at once).
    pub limited_by: Option<&'static str>,
    /// How long a new request would wait for admission now (an estimate).
    pub new_request_wait: Duration,
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

impl Snapshot {
    /// The GCRA emission interval of the rate in force.
    pub fn spacing(&self) -> Duration {
        store::rate_spacing(self.requests_per_minute)
    }
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
    pub queued: usize,
    pub used_today: u64,
    pub forwarded: u64,
}

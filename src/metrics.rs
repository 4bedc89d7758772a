//! Every metric name and label in one place, exposed in the Prometheus text format by the admin
//! listener.
//!
//! Label sets are bounded by construction: `outcome` is `forwarded` or one of the fixed shed
//! reasons, `client` is the configured set plus `default`, and `status` is one of a fixed list
//! of codes or a class such as `5xx`. Counters for every (client, outcome) pair are created up
//! front, so the request path does one atomic add and no hashing or locking. Gauges that
//! describe the budget are not updated on every change; they are read from an admission
//! snapshot when scraped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::admission::Snapshot;
use crate::response::Reason;

/// Status codes that get their own label; anything else is counted by class.
const KNOWN_STATUSES: [u16; 17] = [
    200, 201, 204, 400, 401, 402, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
    client: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    client: String,
}

/// `forwarded` plus every reason, in a fixed order: the index into the counter table.
pub fn outcome_index(reason: Option<Reason>) -> usize {
    match reason {
        None => 0,
        Some(r) => 1 + Reason::ALL.iter().position(|x| *x == r).unwrap_or(0),
    }
}

fn outcome_name(i: usize) -> &'static str {
    if i == 0 {
        "forwarded"
    } else {
        Reason::ALL[i - 1].as_str()
    }
}

pub struct Metrics {
    registry: Registry,
    /// `[client][outcome]`.
    requests: Vec<Vec<Counter>>,
    upstream: Vec<Counter>,
    /// Exact status codes since start, for `/status` (bounded: 100..=999).
    status_exact: DashMap<u16, AtomicU64>,
    pub queue_wait: Histogram,
    pub upstream_latency: Histogram,
    pub cooldown_seconds: Histogram,
    pub stream_errors: Counter,
    queue_depth: Gauge,
    in_flight: Gauge,
    daily_used: Gauge,
    daily_remaining: Option<Gauge>,
    cooldown_active: Gauge,
    cooldown_level: Gauge,
    tokens_available: Gauge,
    client_queue: Family<ClientLabels, Gauge>,
    client_used: Family<ClientLabels, Gauge>,
    client_names: Vec<String>,
    started: std::time::Instant,
}

impl Metrics {
    pub fn new(client_names: &[Arc<str>], daily_cap: bool) -> Metrics {
        let mut registry = Registry::with_prefix("chutes_proxy");
        let family = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by outcome: forwarded upstream, or the reason the proxy answered itself",
            family.clone(),
        );
        let requests = client_names
            .iter()
            .map(|c| {
                (0..=Reason::ALL.len())
                    .map(|i| {
                        family.get_or_create_owned(&OutcomeLabels {
                            outcome: outcome_name(i),
                            client: c.to_string(),
                        })
                    })
                    .collect()
            })
            .collect();
        let status_family = Family::<StatusLabels, Counter>::default();
        registry.register(
            "upstream_responses",
            "Upstream responses by status code (uncommon codes by class, e.g. 5xx)",
            status_family.clone(),
        );
        let upstream = (0..KNOWN_STATUSES.len() + 5)
            .map(|i| {
                let status = match KNOWN_STATUSES.get(i) {
                    Some(s) => s.to_string(),
                    None => format!("{}xx", i - KNOWN_STATUSES.len() + 1),
                };
                status_family.get_or_create_owned(&StatusLabels { status })
            })
            .collect();
        // Queue waits range from nothing to the 20 s default limit and beyond.
        let queue_wait = Histogram::new([
            0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
        ]);
        registry.register(
            "queue_wait_seconds",
            "Time requests spent queued before admission",
            queue_wait.clone(),
        );
        // LLM responses take from milliseconds (errors) to minutes (long generations).
        let upstream_latency = Histogram::new([
            0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ]);
        registry.register(
            "upstream_latency_seconds",
            "Time from sending a request upstream to its response head",
            upstream_latency.clone(),
        );
        let cooldown_seconds = Histogram::new([
            1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0, 86400.0,
        ]);
        registry.register(
            "cooldown_seconds",
            "Length of each account-wide cooldown started by an upstream 429",
            cooldown_seconds.clone(),
        );
        let stream_errors = Counter::default();
        registry.register(
            "stream_errors",
            "Streams that carried an upstream error line or ended abnormally",
            stream_errors.clone(),
        );
        let mut gauge = |name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let queue_depth = gauge("queue_depth", "Requests waiting for admission");
        let in_flight = gauge(
            "in_flight",
            "Requests in flight upstream (streams until their last byte)",
        );
        let daily_used = gauge(
            "daily_used",
            "Requests counted against the current quota day",
        );
        let daily_remaining = daily_cap.then(|| {
            gauge(
                "daily_remaining",
                "Requests left in the current quota day (only with limits.requests_per_day)",
            )
        });
        let cooldown_active = gauge(
            "cooldown_active",
            "1 while the account is paused after an upstream rate-limit signal",
        );
        let cooldown_level = gauge("cooldown_level", "Cooldown escalation level (0 = none)");
        let tokens_available = gauge("tokens_available", "Tokens in the account bucket now");
        let client_queue = Family::<ClientLabels, Gauge>::default();
        registry.register(
            "client_queue_depth",
            "Requests waiting, by client",
            client_queue.clone(),
        );
        let client_used = Family::<ClientLabels, Gauge>::default();
        registry.register(
            "client_daily_used",
            "Requests counted today, by client",
            client_used.clone(),
        );
        Metrics {
            registry,
            requests,
            upstream,
            status_exact: DashMap::new(),
            queue_wait,
            upstream_latency,
            cooldown_seconds,
            stream_errors,
            queue_depth,
            in_flight,
            daily_used,
            daily_remaining,
            cooldown_active,
            cooldown_level,
            tokens_available,
            client_queue,
            client_used,
            client_names: client_names.iter().map(|c| c.to_string()).collect(),
            started: std::time::Instant::now(),
        }
    }

    /// Count one request's outcome (`None` = forwarded).
    pub fn request(&self, client: usize, reason: Option<Reason>) {
        if let Some(row) = self.requests.get(client) {
            row[outcome_index(reason)].inc();
        }
    }

    pub fn upstream_status(&self, status: u16) {
        let i = match KNOWN_STATUSES.iter().position(|&s| s == status) {
            Some(i) => i,
            None => KNOWN_STATUSES.len() + usize::from((status / 100).clamp(1, 5)) - 1,
        };
        self.upstream[i].inc();
        if (100..=999).contains(&status) {
            self.status_exact
                .entry(status)
                .or_default()
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn observe_queue_wait(&self, d: Duration) {
        self.queue_wait.observe(d.as_secs_f64());
    }

    /// Counters since start, by outcome, summed over clients (for `/status`).
    pub fn outcomes(&self) -> Vec<(&'static str, u64)> {
        (0..=Reason::ALL.len())
            .map(|i| {
                (
                    outcome_name(i),
                    self.requests.iter().map(|r| r[i].get()).sum(),
                )
            })
            .collect()
    }

    /// Counters since start by outcome for one client.
    pub fn client_outcomes(&self, client: usize) -> Vec<(&'static str, u64)> {
        match self.requests.get(client) {
            Some(row) => row
                .iter()
                .enumerate()
                .map(|(i, c)| (outcome_name(i), c.get()))
                .filter(|(_, n)| *n > 0)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Upstream responses since start by exact status (for `/status`).
    pub fn statuses(&self) -> Vec<(u16, u64)> {
        let mut v: Vec<_> = self
            .status_exact
            .iter()
            .map(|e| (*e.key(), e.value().load(Ordering::Relaxed)))
            .collect();
        v.sort_unstable();
        v
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Text exposition, with gauges refreshed from `snap`.
    pub fn encode(&self, snap: &Snapshot) -> String {
        self.queue_depth.set(snap.queue_depth as i64);
        self.in_flight.set(snap.in_flight as i64);
        self.daily_used.set(snap.used_today as i64);
        if let (Some(g), Some(r)) = (&self.daily_remaining, snap.remaining_today) {
            g.set(r as i64);
        }
        self.cooldown_active.set(i64::from(
            snap.cooldown_active || snap.daily_gate_until_unix.is_some(),
        ));
        self.cooldown_level.set(i64::from(snap.cooldown_level));
        self.tokens_available.set(i64::from(snap.tokens_available));
        for (c, name) in snap.clients.iter().zip(&self.client_names) {
            let l = ClientLabels {
                client: name.clone(),
            };
            self.client_queue.get_or_create(&l).set(c.queued as i64);
            self.client_used.get_or_create(&l).set(c.used_today as i64);
        }
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

//! Every metric name and label in one place, exposed by the admin listener in either of the two
//! text formats Prometheus scrapes: OpenMetrics 1.0 (what prometheus-client writes, and what
//! Prometheus asks for first) or the classic text format 0.0.4 (for `curl`, older scrapers and
//! parsers that choke on `# EOF`), chosen by the scraper's `Accept` header ([`Format`]).
//!
//! Label sets are bounded by construction: `outcome` is `forwarded` or one of the fixed shed
//! reasons, `client` is the configured set plus `default`, and `status` is one of a fixed list
//! of codes or a class such as `5xx`. Counters for every (client, outcome) pair are created up
//! front, so the request path does one atomic add and no hashing or locking. Gauges that
//! describe the budget are not updated on every change; they are read from an admission
//! snapshot when scraped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

use crate::admission::Snapshot;
use crate::clients::{ClientId, ClientTable};
use crate::held::HeldBodies;
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
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

/// Why a request was re-sent on its client's behalf (`chutes_proxy_retries_total{cause}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCause {
    /// After an account-wide upstream 429.
    Account,
    /// After a capacity 429 for the request's model.
    Model,
}

impl RetryCause {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryCause::Account => "account",
            RetryCause::Model => "model",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    client: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// The exposition format of one scrape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text; version=1.0.0`: what Prometheus asks for first.
    OpenMetrics,
    /// `text/plain; version=0.0.4`: the classic format, for anyone who does not ask for
    /// OpenMetrics (a plain `curl`, older agents).
    Text,
}

impl Format {
    /// Pick the format from a request's `Accept` header the way Prometheus' own client
    /// libraries do: OpenMetrics only when it is asked for (with a non-zero q no lower than
    /// any acceptable plain-text type), the classic format otherwise, including when there is
    /// no header or it cannot be read.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text;
        };
        let mut openmetrics = 0.0f32;
        let mut text = 0.0f32;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(0.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Rewrite prometheus-client's OpenMetrics text as the classic 0.0.4 format. The samples are
/// identical; what differs is the metadata: a 0.0.4 counter's `# HELP`/`# TYPE` lines name the
/// sample (`x_total`) where OpenMetrics names the family (`x`), `# UNIT` and `# EOF` do not
/// exist, and neither do the `info`/`unknown` types. HELP escaping differs only for `"`, which
/// none of our help texts contain.
fn to_text_004(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP comes before its TYPE, but its name can only be fixed once the TYPE is
    // known, so it waits here.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gauge" | "histogram" | "summary" => (name.to_string(), kind),
                _ => (name.to_string(), "untyped"),
            };
            if let Some(h) = help.take() {
                let text = h
                    .strip_prefix("# HELP ")
                    .and_then(|r| r.split_once(' '))
                    .map_or("", |(_, t)| t);
                out.push_str(format!("# HELP {name} {text}").trim_end());
                out.push('\n');
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        if line.starts_with("# HELP ") {
            help = Some(line);
        } else if line != "# EOF" && !line.starts_with("# UNIT ") {
            out.push_str(line);
            out.push('\n');
        }
    }
    if let Some(h) = help {
        out.push_str(h);
        out.push('\n');
    }
    out
}

/// `forwarded` plus every reason, in a fixed order: the index into the counter table.
pub fn outcome_index(reason: Option<Reason>) -> usize {
    match reason {
        None => 0,
        Some(r) => 1 + Reason::ALL.iter().position(|x| *x == r).unwrap_or(0),
    }
}

/// Number of outcomes: `forwarded` plus every reason.
pub const OUTCOMES: usize = Reason::ALL.len() + 1;

/// The `outcome` label at [`outcome_index`] `i`.
pub fn outcome_name(i: usize) -> &'static str {
    if i == 0 {
        "forwarded"
    } else {
        Reason::ALL[i - 1].as_str()
    }
}

/// Number of `status` labels on `chutes_proxy_upstream_responses_total`: the known codes,
/// then the classes `1xx`..`5xx`.
pub const STATUS_LABELS: usize = KNOWN_STATUSES.len() + 5;

/// The `status` label at index `i` of the upstream counters (`i < STATUS_LABELS`).
pub fn status_label(i: usize) -> String {
    match KNOWN_STATUSES.get(i) {
        Some(s) => s.to_string(),
        None => format!("{}xx", i - KNOWN_STATUSES.len() + 1),
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
    queue_body_bytes: Gauge,
    /// The bytes of request bodies read before admission and held while they wait: the
    /// request path holds and gives back, a scrape reads.
    pub held_bodies: HeldBodies,
    in_flight: Gauge,
    daily_used: Gauge,
    daily_remaining: Option<Gauge>,
    daily_limit: Option<Gauge>,
    daily_exhausted: Gauge,
    cooldown_active: Gauge,
    cooldown_level: Gauge,
    tokens_available: Gauge,
    rate_in_force: Gauge,
    usage_cap_active: Gauge,
    upstream_quota_remaining: Gauge,
    /// Only the models in admission's bounded table at the last scrape (≤ 64 series).
    model_cooling: Family<ModelLabels, Gauge>,
    retries: [Counter; 2],
    client_queue: Family<ClientLabels, Gauge>,
    client_used: Family<ClientLabels, Gauge>,
    started: tokio::time::Instant,
}

impl Metrics {
    /// Series for every client of `clients` (the table admission indexes, so a client id
    /// counts under that client's own name) and every outcome, created up front.
    pub fn new(clients: &ClientTable, daily_cap: bool) -> Metrics {
        let mut registry = Registry::with_prefix("chutes_proxy");
        let r = &mut registry;
        let family = registered(
            r,
            "requests",
            "Requests by outcome: forwarded upstream, or the reason the proxy answered itself",
            Family::<OutcomeLabels, Counter>::default(),
        );
        let requests = clients
            .iter()
            .map(|c| {
                (0..=Reason::ALL.len())
                    .map(|i| {
                        family.get_or_create_owned(&OutcomeLabels {
                            outcome: outcome_name(i),
                            client: c.name.to_string(),
                        })
                    })
                    .collect()
            })
            .collect();
        let status_family = registered(
            r,
            "upstream_responses",
            "Upstream responses by status code (uncommon codes by class, e.g. 5xx)",
            Family::<StatusLabels, Counter>::default(),
        );
        let upstream = (0..STATUS_LABELS)
            .map(|i| {
                status_family.get_or_create_owned(&StatusLabels {
                    status: status_label(i),
                })
            })
            .collect();
        let queue_wait = registered(
            r,
            "queue_wait_seconds",
            "Time requests spent queued before admission",
            // Queue waits range from nothing to the 20 s default limit and beyond.
            Histogram::new([
                0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
            ]),
        );
        let upstream_latency = registered(
            r,
            "upstream_latency_seconds",
            "Time from sending a request upstream to its response head",
            // LLM responses take from milliseconds (errors) to minutes (long generations).
            Histogram::new([
                0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ]),
        );
        let cooldown_seconds = registered(
            r,
            "cooldown_seconds",
            "Length of each account-wide cooldown started by an upstream 429",
            Histogram::new([
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0, 86400.0,
            ]),
        );
        let stream_errors = registered(
            r,
            "stream_errors",
            "Streams that carried an upstream error line or ended abnormally",
            Counter::default(),
        );
        let mut gauge = |name: &str, help: &str| registered(r, name, help, Gauge::default());
        let queue_depth = gauge("queue_depth", "Requests waiting for admission");
        let queue_body_bytes = gauge(
            "queue_body_bytes",
            "Bytes of request bodies read before admission and held while waiting",
        );
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
        // The cap itself, so an alert can say "90% of the cap" without hard-coding it.
        let daily_limit = daily_cap.then(|| {
            gauge(
                "daily_limit",
                "The daily request cap in force (only with limits.requests_per_day)",
            )
        });
        // Separate from cooldown_active: a spent day needs a different response (wait for the
        // reset or raise the plan) from a rate-limit pause that ends by itself in minutes.
        let daily_exhausted = gauge(
            "daily_quota_exhausted",
            "1 while the daily gate is closed: the local cap is spent or the upstream answered 402 quota exceeded",
        );
        let cooldown_active = gauge(
            "cooldown_active",
            "1 while the account is paused after an upstream 429 or a rate-limit window reported empty",
        );
        let cooldown_level = gauge("cooldown_level", "Cooldown escalation level (0 = none)");
        let tokens_available = gauge("tokens_available", "Tokens in the account bucket now");
        let rate_in_force = gauge(
            "rate_in_force_per_minute",
            "The account rate in force: the configured one, or lower when the upstream advertises less",
        );
        let usage_cap_active = gauge(
            "usage_cap_active",
            "1 while the plan's subscription usage cap keeps the gate closed until the next 4-hour window",
        );
        let upstream_quota_remaining = gauge(
            "upstream_quota_remaining",
            "The daily quota the upstream last reported left (-1 before any report)",
        );
        let model_cooling = registered(
            r,
            "model_cooling",
            "1 for each model cooling after a capacity 429 (at most 64 models)",
            Family::<ModelLabels, Gauge>::default(),
        );
        let retry_family = registered(
            r,
            "retries",
            "Requests re-sent on the client's behalf after an upstream 429, by cause",
            Family::<CauseLabels, Counter>::default(),
        );
        let retries = [RetryCause::Account, RetryCause::Model]
            .map(|c| retry_family.get_or_create_owned(&CauseLabels { cause: c.as_str() }));
        // The usual `_info` idiom: a constant 1 whose label says which version is running, so
        // dashboards can mark deploys.
        registered(
            r,
            "build_info",
            "Always 1; the label says which chutes-proxy version is running",
            Family::<VersionLabels, Gauge>::default(),
        )
        .get_or_create(&VersionLabels {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
        let client_queue = registered(
            r,
            "client_queue_depth",
            "Requests waiting, by client",
            Family::<ClientLabels, Gauge>::default(),
        );
        let client_used = registered(
            r,
            "client_daily_used",
            "Requests counted today, by client",
            Family::<ClientLabels, Gauge>::default(),
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
            queue_body_bytes,
            // Its bound is the proxy's to set (`Proxy::new`, a reload).
            held_bodies: HeldBodies::new(crate::config::DEFAULT_QUEUE_BODY_BYTES),
            in_flight,
            daily_used,
            daily_remaining,
            daily_limit,
            daily_exhausted,
            cooldown_active,
            cooldown_level,
            tokens_available,
            rate_in_force,
            usage_cap_active,
            upstream_quota_remaining,
            model_cooling,
            retries,
            client_queue,
            client_used,
            started: tokio::time::Instant::now(),
        }
    }

    /// Count one request's outcome (`None` = forwarded).
    pub fn request(&self, client: ClientId, reason: Option<Reason>) {
        if let Some(row) = self.requests.get(client.index()) {
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

    pub fn retried(&self, cause: RetryCause) {
        self.retries[cause as usize].inc();
    }

    /// Retries since start, by cause (for `/status`).
    pub fn retry_totals(&self) -> [(&'static str, u64); 2] {
        [RetryCause::Account, RetryCause::Model]
            .map(|c| (c.as_str(), self.retries[c as usize].get()))
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
    pub fn client_outcomes(&self, client: ClientId) -> Vec<(&'static str, u64)> {
        match self.requests.get(client.index()) {
            Some(row) => row
                .iter()
                .enumerate()
                .map(|(i, c)| (outcome_name(i), c.get()))
                .filter(|(_, n)| *n > 0)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Counters since start by outcome index ([`outcome_name`]), summed over clients: what the
    /// per-second history reads, without building names.
    pub fn outcome_totals(&self) -> [u64; OUTCOMES] {
        std::array::from_fn(|i| self.requests.iter().map(|r| r[i].get()).sum())
    }

    /// Upstream responses since start by `status` label index ([`status_label`]).
    pub fn upstream_totals(&self) -> [u64; STATUS_LABELS] {
        std::array::from_fn(|i| self.upstream[i].get())
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

    /// One scrape in `format`, with gauges refreshed from `snap`.
    pub fn encode(&self, snap: &Snapshot, format: Format) -> String {
        self.queue_depth.set(snap.queue_depth as i64);
        self.queue_body_bytes
            .set(i64::try_from(self.held_bodies.bytes()).unwrap_or(i64::MAX));
        self.in_flight.set(snap.in_flight as i64);
        self.daily_used.set(snap.used_today as i64);
        if let (Some(g), Some(r)) = (&self.daily_remaining, snap.remaining_today) {
            g.set(r as i64);
        }
        if let (Some(g), Some(d)) = (&self.daily_limit, snap.requests_per_day) {
            g.set(d as i64);
        }
        self.daily_exhausted.set(i64::from(
            snap.daily_gate_until_unix.is_some() || snap.remaining_today == Some(0),
        ));
        self.cooldown_active.set(i64::from(snap.cooldown_active));
        self.cooldown_level.set(i64::from(snap.cooldown_level));
        self.tokens_available.set(i64::from(snap.tokens_available));
        self.rate_in_force.set(i64::from(snap.requests_per_minute));
        self.usage_cap_active
            .set(i64::from(snap.usage_cap_until_unix.is_some()));
        self.upstream_quota_remaining
            .set(snap.upstream_quota.map_or(-1, |q| q.remaining as i64));
        self.model_cooling.clear();
        for m in snap
            .models
            .iter()
            .filter(|m| m.cooling_until_unix.is_some())
        {
            self.model_cooling
                .get_or_create(&ModelLabels {
                    model: m.model.to_string(),
                })
                .set(1);
        }
        for c in &snap.clients {
            let l = ClientLabels {
                client: c.name.to_string(),
            };
            self.client_queue.get_or_create(&l).set(c.queued as i64);
            self.client_used.get_or_create(&l).set(c.used_today as i64);
        }
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        match format {
            Format::OpenMetrics => out,
            Format::Text => to_text_004(&out),
        }
    }
}

/// Registers `metric` and hands it back: the registry keeps a clone, and prometheus-client's
/// metrics are shared handles, so both see the same values.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Probe;
    use std::sync::Arc;

    fn snapshot() -> Snapshot {
        Snapshot {
            requests_per_minute: 50,
            requests_per_day: Some(100),
            tokens_available: 3,
            next_token_in: Duration::from_millis(400),
            used_today: 7,
            remaining_today: Some(93),
            day_resets_at_unix: 1_795_996_800,
            daily_gate_until_unix: None,
            cooldown_active: false,
            cooldown_proactive: false,
            cooldown_until_unix: None,
            cooldown_level: 0,
            gate: Probe::Open,
            last_429: None,
            queue_depth: 2,
            oldest_wait: None,
            in_flight: 4,
            clients: Vec::new(),
            ..Snapshot::default()
        }
    }

    fn table(names: &[&str]) -> ClientTable {
        let row = |name: &&str| crate::clients::ClientSettings {
            name: Arc::from(*name),
            weight: 1,
            requests_per_minute: None,
            burst: 1,
            requests_per_day: None,
            max_wait: None,
        };
        ClientTable::from(names.iter().map(row).collect::<Vec<_>>())
    }

    /// The value of the sample written exactly as `series` (name and labels), if present.
    fn sample(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_owned)
    }

    #[test]
    fn negotiation_follows_the_accept_header() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let cases: &[(Option<&str>, Format)] = &[
            (None, Format::Text),
            (Some(""), Format::Text),
            (Some("*/*"), Format::Text),
            (Some("text/plain"), Format::Text),
            (Some(prometheus), Format::OpenMetrics),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (Some("application/openmetrics-text;q=0"), Format::Text),
            (
                Some("text/plain;q=0.9, application/openmetrics-text;q=0.5"),
                Format::Text,
            ),
            (
                Some("application/openmetrics-text;q=nonsense"),
                Format::Text,
            ),
            (Some(";;;,,=,q="), Format::Text),
        ];
        for (accept, want) in cases {
            assert_eq!(Format::negotiate(*accept), *want, "Accept: {accept:?}");
        }
    }

    #[test]
    fn classic_format_names_counters_by_their_sample() {
        let om = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total{a=\"b\"} 3\n# HELP x_up Up.\n# TYPE x_up gauge\n# UNIT x_up seconds\nx_up 1\n# HELP x_build Build.\n# TYPE x_build info\nx_build_info{version=\"1\"} 1\n# EOF\n";
        let want = "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total{a=\"b\"} 3\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n# HELP x_build_info Build.\n# TYPE x_build_info gauge\nx_build_info{version=\"1\"} 1\n";
        assert_eq!(to_text_004(om), want);
        // Malformed input is passed along, never a panic.
        assert_eq!(to_text_004("# HELP\n# TYPE\n"), "# HELP\n# TYPE\n");
        assert_eq!(
            to_text_004("# HELP x\n# TYPE x"),
            "# HELP x\n# TYPE x untyped\n"
        );
    }

    #[test]
    fn scrape_reflects_counters_and_the_snapshot() {
        let m = Metrics::new(&table(&["default", "bot"]), true);
        m.request(ClientId::test_row(0), None);
        m.request(ClientId::test_row(0), None);
        m.request(ClientId::test_row(1), Some(Reason::QueueTimeout));
        m.request(ClientId::test_row(9), Some(Reason::QueueFull)); // unknown client: ignored, not a panic
        m.upstream_status(200);
        m.upstream_status(418);
        m.upstream_status(7);
        m.observe_queue_wait(Duration::from_millis(30));
        let om = m.encode(&snapshot(), Format::OpenMetrics);
        assert!(om.ends_with("# EOF\n"), "{om}");
        let text = m.encode(&snapshot(), Format::Text);
        assert!(!text.contains("# EOF"));
        for t in [&om, &text] {
            let s = |series: &str| sample(t, series).unwrap_or_else(|| panic!("{series}:\n{t}"));
            assert_eq!(
                s("chutes_proxy_requests_total{outcome=\"forwarded\",client=\"default\"}"),
                "2"
            );
            assert_eq!(
                s("chutes_proxy_requests_total{outcome=\"queue_timeout\",client=\"bot\"}"),
                "1"
            );
            assert_eq!(
                s("chutes_proxy_requests_total{outcome=\"queue_full\",client=\"default\"}"),
                "0"
            );
            assert_eq!(
                s("chutes_proxy_upstream_responses_total{status=\"200\"}"),
                "1"
            );
            assert_eq!(
                s("chutes_proxy_upstream_responses_total{status=\"4xx\"}"),
                "1"
            );
            assert_eq!(
                s("chutes_proxy_upstream_responses_total{status=\"1xx\"}"),
                "1"
            );
            assert_eq!(s("chutes_proxy_queue_wait_seconds_count"), "1");
            assert_eq!(s("chutes_proxy_queue_depth"), "2");
            assert_eq!(s("chutes_proxy_in_flight"), "4");
            assert_eq!(s("chutes_proxy_daily_used"), "7");
            assert_eq!(s("chutes_proxy_daily_remaining"), "93");
            assert_eq!(s("chutes_proxy_daily_limit"), "100");
            assert_eq!(s("chutes_proxy_daily_quota_exhausted"), "0");
            assert_eq!(s("chutes_proxy_cooldown_active"), "0");
            assert_eq!(s("chutes_proxy_tokens_available"), "3");
            assert_eq!(
                s(&format!(
                    "chutes_proxy_build_info{{version=\"{}\"}}",
                    env!("CARGO_PKG_VERSION")
                )),
                "1"
            );
        }
        assert!(text.contains("# TYPE chutes_proxy_requests_total counter\n"));
        assert_eq!(
            m.statuses(),
            vec![(200, 1), (418, 1)],
            "exact codes for /status; 7 is not a status code"
        );
    }

    #[test]
    fn no_daily_cap_means_no_remaining_series() {
        let m = Metrics::new(&table(&["default"]), false);
        let mut snap = snapshot();
        snap.requests_per_day = None;
        snap.remaining_today = None;
        snap.cooldown_active = true;
        let t = m.encode(&snap, Format::Text);
        assert!(!t.contains("chutes_proxy_daily_remaining"));
        assert!(!t.contains("chutes_proxy_daily_limit"));
        assert_eq!(
            sample(&t, "chutes_proxy_cooldown_active").as_deref(),
            Some("1")
        );
        assert_eq!(
            sample(&t, "chutes_proxy_daily_quota_exhausted").as_deref(),
            Some("0")
        );
    }
}

//! The admin listener: `/healthz` for liveness, `/status` for people and scripts asking "why
//! are we rate limited, and when does it reset?", `/metrics` for Prometheus, and for people
//! watching live: `/` (the dashboard page, built into the binary) and `/history` (the last
//! hour, per second, from `history`).
//!
//! Read-only: nothing here changes the budget. It binds to loopback unless the config says
//! otherwise (checked in `config`). The API key never appears: `/status` is built from the
//! admission snapshot and counters, which do not hold it.

use std::sync::Arc;
use std::time::Duration;

use crate::http1::ClientBody;
use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE, VARY};
use http::{Method, Request, Response, StatusCode};

use crate::admission::Admission;
use crate::body::ResponseBody;
use crate::clock::WallClock;
use crate::config::{Backend, Config, OnRedisError};
use crate::history::History;
use crate::metrics::{Format, Metrics};
use crate::response::OpenAiError;
use crate::status::{self, AdvertisedRate, Status};
use crate::units::{format_hhmm, format_reset, format_rfc3339};

/// How much of the last upstream 429's body `/status` shows.
const LAST_429_BODY_CHARS: usize = 512;

/// The dashboard: one self-contained page (inline CSS and script, SVG charts drawn by hand),
/// so it works offline and behind any firewall. It reads `/status` and `/history`.
const DASHBOARD: &str = include_str!("dashboard.html");

/// What the dashboard may load: nothing but itself and this listener's JSON. The browser
/// then enforces "no external scripts, fonts or CDNs", and an injected `<script>` from a
/// header or body the page displays would not run (the page also only ever sets text).
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub struct Admin {
    pub config: Arc<Config>,
    pub admission: Arc<Admission>,
    pub metrics: Arc<Metrics>,
    pub history: Arc<History>,
    pub wall: WallClock,
    /// `POST /reload`; `None` when the proxy runs without a file to re-read.
    pub reloader: Option<Arc<crate::reload::Reloader>>,
}

impl Admin {
    pub async fn handle(self: Arc<Self>, req: Request<ClientBody>) -> Response<ResponseBody> {
        if req.uri().path() == "/reload" {
            return self.reload(&req).await;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match req.uri().path() {
            "/" => {
                let mut r = text(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    Bytes::from_static(DASHBOARD.as_bytes()),
                );
                r.headers_mut().insert(
                    http::header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(DASHBOARD_CSP),
                );
                r.headers_mut().insert(
                    http::header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                );
                r
            }
            "/history" => match crate::history::parse_query(req.uri().query()) {
                Ok(seconds) => {
                    let now = self.wall.now_unix().round() as i64;
                    let doc = crate::history::Document(self.history.since(seconds, now));
                    let body = serde_json::to_vec(&doc).unwrap_or_default();
                    text(StatusCode::OK, "application/json", body.into())
                }
                Err(message) => {
                    let body =
                        OpenAiError::new(&message, "invalid_request_error", "invalid_parameter")
                            .with_param("seconds");
                    text(
                        StatusCode::BAD_REQUEST,
                        "application/json",
                        body.to_json().into(),
                    )
                }
            },
            "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
            "/status" => {
                let doc = self.status().await;
                let body = serde_json::to_vec_pretty(&doc).unwrap_or_default();
                text(StatusCode::OK, "application/json", body.into())
            }
            "/metrics" => {
                let format =
                    Format::negotiate(req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()));
                let snap = self.admission.snapshot();
                let mut r = text(
                    StatusCode::OK,
                    format.content_type(),
                    self.metrics.encode(&snap, format).into(),
                );
                // The body depends on Accept; a cache in between must not mix the two.
                r.headers_mut()
                    .insert(VARY, HeaderValue::from_static("accept"));
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /, /history, /healthz, /status or /metrics\n".into(),
            ),
        }
    }

    /// The `/status` document (its shape: `status.rs`). Figures are read from one admission
    /// snapshot, so they agree with each other.
    pub async fn status(&self) -> Status {
        // Read Redis before taking the snapshot: the call is bounded (fleet::CALL_TIMEOUT) but
        // still I/O, and the snapshot should be as fresh as possible when the document is sent.
        let fleet = match self.admission.fleet() {
            Some(f) => Some((
                f.status(self.admission.day_index()).await,
                f.is_healthy(),
                f.round_trips.load(std::sync::atomic::Ordering::Relaxed),
            )),
            None => None,
        };
        let ss = &self.config.shared_state;
        let fleet = fleet.map(|(f, healthy, round_trips)| status::Fleet {
            redis_url: redact_url(&ss.redis_url),
            key_prefix: ss.key_prefix.clone(),
            on_redis_error: match ss.on_redis_error {
                OnRedisError::FailClosed => "fail_closed",
                OnRedisError::Local => "local",
            }
            .into(),
            // `reachable` is this read; `healthy` is what admission currently believes.
            reachable: f.reachable,
            healthy,
            last_error: f.last_error,
            used_today: f.used_today,
            cooldown_until: until(f.cooldown_until_unix),
            cooldown_level: f.level,
            quota_gate_until: until(f.gate_until_unix),
            probe_needed: f.probe_needed,
            redis_round_trips: round_trips,
        });
        let s = self.admission.snapshot();
        // The configured limits come from the settings, the figures in force (rates and caps
        // the upstream lowered, counts, gates) from the snapshot.
        let settings = self.admission.settings();
        // The clock admission's instants were made with, so `*_left` figures are consistent.
        let now = self.wall.now_unix();
        let left = |u: Option<f64>| u.map(|u| millis((u - now).max(0.0)));
        let cfg = &self.config;
        let daily_exhausted = s.daily_gate_until_unix.is_some() || s.remaining_today == Some(0);
        // The one word a person looks for first; the most binding gate wins.
        let state = if daily_exhausted {
            "daily_quota_exhausted"
        } else if s.usage_cap_until_unix.is_some() {
            "usage_cap_exhausted"
        } else if s.cooldown_active && !s.cooldown_proactive {
            "cooldown"
        } else if s.cooldown_active {
            "upstream_window_exhausted"
        } else {
            s.gate.as_str()
        };
        let reset_in = (s.day_resets_at_unix as f64 - now).max(0.0);
        let counts = |v: Vec<(&str, u64)>| v.into_iter().map(|(k, n)| (k.to_string(), n)).collect();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: secs(self.metrics.uptime()),
            now: format_rfc3339(now as i64),
            state: state.into(),
            upstream: cfg.upstream.url.to_string(),
            api_key: if cfg.upstream.api_key.is_some() {
                "configured"
            } else {
                "not configured (client auth passes through)"
            }
            .into(),
            backend: match ss.backend {
                Backend::Local => "local",
                Backend::Redis => "redis",
            }
            .into(),
            fleet,
            rate_limits: status::RateLimits {
                configured_requests_per_minute: settings.limits.requests_per_minute.get(),
                advertised_requests_per_minute: match s.advertised_requests_per_minute {
                    _ if s.advertised_unlimited => AdvertisedRate::Unlimited,
                    Some(n) => AdvertisedRate::PerMinute(n),
                    None => AdvertisedRate::Unknown,
                },
                in_force_requests_per_minute: s.requests_per_minute,
                follow_upstream_limits: settings.limits.follow_upstream_limits,
                configured_requests_per_day: settings.limits.requests_per_day.map(|d| d.get()),
                in_force_requests_per_day: s.requests_per_day,
                beyond_quota: if settings.beyond_quota_stop() {
                    "stop"
                } else {
                    "continue"
                }
                .into(),
            },
            upstream_quota: s.upstream_quota.map(|q| status::UpstreamQuota {
                total: q.total,
                used: q.used,
                remaining: q.remaining,
                seen_at: format_rfc3339(q.seen_at_unix as i64),
                seen_ago_seconds: (now - q.seen_at_unix).max(0.0).round(),
                source: q.source.as_str().into(),
            }),
            usage_cap: status::UsageCap {
                exhausted: s.usage_cap_until_unix.is_some(),
                until: until(s.usage_cap_until_unix),
                remaining_seconds: left(s.usage_cap_until_unix),
            },
            models: s
                .models
                .iter()
                .map(|m| status::Model {
                    model: m.model.to_string(),
                    cooling: m.cooling_until_unix.is_some(),
                    until: until(m.cooling_until_unix),
                    until_unix: m.cooling_until_unix,
                    remaining_seconds: left(m.cooling_until_unix),
                    level: m.level,
                    gate: m.probe.as_str().into(),
                    last_body: m.last_body.chars().take(LAST_429_BODY_CHARS).collect(),
                    last_429_at: m.last_429_at_unix.map(|u| format_rfc3339(u as i64)),
                    advertised_requests_per_minute: m.advertised_requests_per_minute,
                    quota_total: m.quota_total,
                    quota_used: m.quota_used,
                    quota_gate_until: until(m.quota_gate_until_unix),
                })
                .collect(),
            limits: status::Limits {
                requests_per_minute: s.requests_per_minute,
                burst: settings.limits.burst.get(),
                requests_per_day: s.requests_per_day,
                day_reset_utc: format_hhmm(settings.limits.day_reset_offset),
                max_concurrent: settings.limits.max_concurrent as u64,
                queue_max_depth: settings.queue.max_depth as u64,
                queue_max_wait_seconds: secs(settings.queue.max_wait),
                cooldown_initial_seconds: secs(settings.cooldown.initial),
                cooldown_max_seconds: secs(settings.cooldown.max),
                cooldown_multiplier: settings.cooldown.multiplier,
                model_cooldown_initial_seconds: secs(settings.cooldown.model_initial),
                model_cooldown_max_seconds: secs(settings.cooldown.model_max),
            },
            tokens: status::Tokens {
                available: s.tokens_available,
                capacity: settings.limits.burst.get(),
                spacing_seconds: secs(s.spacing()),
                next_in_seconds: secs(s.next_token_in),
            },
            daily: status::Daily {
                used: s.used_today,
                limit: s.requests_per_day,
                remaining: s.remaining_today,
                exhausted: daily_exhausted,
                resets_at: format_rfc3339(s.day_resets_at_unix),
                resets_in_seconds: reset_in.round(),
                resets_in: format_reset(Duration::from_secs_f64(reset_in)),
                upstream_quota_gate_until: until(s.daily_gate_until_unix),
                gate_reason: s.daily_gate_reason.map(str::to_string),
                assumed: s.daily_assumed,
                replica_used: s.replica_used_today,
            },
            cooldown: status::Cooldown {
                active: s.cooldown_active,
                kind: match (s.cooldown_active, s.cooldown_proactive) {
                    (false, _) => None,
                    (true, true) => Some("upstream_window".into()),
                    (true, false) => Some("rate_limited".into()),
                },
                until: until(s.cooldown_until_unix),
                remaining_seconds: left(s.cooldown_until_unix),
                level: s.cooldown_level,
                gate: s.gate.as_str().into(),
                last_upstream_429: s.last_429.as_ref().map(|l| status::Last429 {
                    at: format_rfc3339(l.at_unix as i64),
                    ago_seconds: (now - l.at_unix).max(0.0).round(),
                    status: l.status,
                    headers: l.headers.clone(),
                    // Enough to tell an nginx edge page from a JSON `detail`; the full 2 KiB
                    // went to the client that got the 429.
                    body: l.body.chars().take(LAST_429_BODY_CHARS).collect(),
                }),
            },
            queue: status::Queue {
                depth: s.queue_depth as u64,
                oldest_wait_seconds: s.oldest_wait.map(secs),
                body_bytes: self.metrics.held_bodies.bytes(),
                max_body_bytes: self.metrics.held_bodies.limit(),
            },
            in_flight: s.in_flight as u64,
            requests: counts(self.metrics.outcomes()),
            upstream_responses: self
                .metrics
                .statuses()
                .into_iter()
                .map(|(code, n)| (code.to_string(), n))
                .collect(),
            limited_by: s.limited_by.map(str::to_string),
            new_request_wait_seconds: secs(s.new_request_wait),
            retries: self
                .metrics
                .retry_totals()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            clients: s
                .clients
                .iter()
                .zip(settings.clients.ids())
                .map(|(c, (id, row))| status::Client {
                    name: c.name.to_string(),
                    weight: row.weight,
                    queued: c.queued as u64,
                    used_today: c.used_today,
                    forwarded: c.forwarded,
                    requests_per_minute: row.requests_per_minute,
                    requests_per_day: row.requests_per_day,
                    outcomes: counts(self.metrics.client_outcomes(id)),
                })
                .collect(),
        }
    }
}

/// Seconds to the millisecond: the finest grain anyone reading `/status` needs.
fn secs(d: Duration) -> f64 {
    millis(d.as_secs_f64())
}

fn millis(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

/// A UNIX instant as RFC 3339, rounded up to the second (a gate is not open before it).
fn until(u: Option<f64>) -> Option<String> {
    u.map(|u| format_rfc3339(u.ceil() as i64))
}

/// A URL with any userinfo (a Redis password) replaced. The last `@` ends the userinfo, so a
/// password containing `@` is hidden whole.
fn redact_url(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((before, host)) => {
            let scheme = before.split_once("://").map_or("", |(s, _)| s);
            if scheme.is_empty() {
                format!("<redacted>@{host}")
            } else {
                format!("{scheme}://<redacted>@{host}")
            }
        }
        None => url.to_string(),
    }
}

impl Admin {
    /// `POST /reload`: re-read the config file. It changes the proxy, so it is answered only
    /// for a loopback peer or a request carrying `server.admin_token_env`'s token.
    async fn reload(&self, req: &Request<ClientBody>) -> Response<ResponseBody> {
        if req.method() != Method::POST {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "POST only\n".into(),
            );
        }
        let peer = req.extensions().get::<crate::server::Peer>().copied();
        if !may_change(self.config.server.admin_token.as_ref(), req.headers(), peer) {
            return reload_errors(StatusCode::FORBIDDEN, &["POST /reload is answered only for a loopback peer or with the admin token (server.admin_token_env) as a Bearer token"]);
        }
        let Some(r) = &self.reloader else {
            return reload_errors(
                StatusCode::BAD_REQUEST,
                &["this proxy was started without a configuration file to reload"],
            );
        };
        match r.reload_blocking().await {
            Ok(report) => text(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&report).unwrap_or_default().into(),
            ),
            Err(errors) => reload_errors(StatusCode::BAD_REQUEST, &errors),
        }
    }
}

/// A refused `POST /reload`: `{"errors": [...]}`, one sentence per problem (CONTRACT.md). Not
/// the OpenAI error envelope: no SDK reads this, an operator does, and a config can be wrong
/// in several places at once.
fn reload_errors<S: serde::Serialize>(status: StatusCode, errors: &[S]) -> Response<ResponseBody> {
    #[derive(serde::Serialize)]
    struct Errors<'a, S> {
        errors: &'a [S],
    }
    let body = serde_json::to_vec(&Errors { errors }).unwrap_or_default();
    text(status, "application/json", body.into())
}

/// Whether a request may use an endpoint that changes something: a loopback peer, or the
/// admin token (compared in constant time) as a Bearer token.
fn may_change(
    token: Option<&crate::config::ApiKey>,
    headers: &http::HeaderMap,
    peer: Option<crate::server::Peer>,
) -> bool {
    if let Some(token) = token {
        let sent = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if crate::clients::constant_time_eq(sent.trim().as_bytes(), token.expose().as_bytes()) {
            return true;
        }
    }
    peer.is_some_and(|p| p.0.ip().is_loopback())
}

fn text(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn only_loopback_or_the_token_may_reload() {
        use super::may_change;
        use crate::config::ApiKey;
        use crate::server::Peer;
        let remote = Some(Peer("10.1.2.3:5555".parse().unwrap()));
        let local = Some(Peer("127.0.0.1:5555".parse().unwrap()));
        let none = http::HeaderMap::new();
        let mut with = http::HeaderMap::new();
        with.insert("authorization", "Bearer s3cret".parse().unwrap());
        let mut wrong = http::HeaderMap::new();
        wrong.insert("authorization", "Bearer s3cres".parse().unwrap());
        let token = ApiKey::new("s3cret".into());
        assert!(may_change(None, &none, local));
        assert!(!may_change(None, &none, remote));
        assert!(
            !may_change(None, &with, remote),
            "no token configured: none accepted"
        );
        assert!(may_change(Some(&token), &with, remote));
        assert!(!may_change(Some(&token), &wrong, remote));
        assert!(!may_change(Some(&token), &none, None));
    }

    #[test]
    fn redis_passwords_never_show() {
        let cases = [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            (
                "redis://:secret@host:6379/0",
                "redis://<redacted>@host:6379/0",
            ),
            ("rediss://user:p@ss@host/1", "rediss://<redacted>@host/1"),
            ("user:pw@host", "<redacted>@host"),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want);
        }
    }
}

//! The admin listener: `/healthz` for liveness, `/status` for people and scripts asking "why
//! are we rate limited, and when does it reset?", and `/metrics` for Prometheus.
//!
//! Read-only: nothing here changes the budget. It binds to loopback unless the config says
//! otherwise (checked in `config`). The API key never appears: `/status` is built from the
//! admission snapshot and counters, which do not hold it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::admission::Admission;
use crate::body::ResponseBody;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::units::{format_reset, format_rfc3339};

pub struct Admin {
    pub config: Arc<Config>,
    pub admission: Arc<Admission>,
    pub metrics: Arc<Metrics>,
}

impl Admin {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
            "/status" => {
                let body = serde_json::to_vec_pretty(&self.status()).unwrap_or_default();
                text(StatusCode::OK, "application/json", body.into())
            }
            "/metrics" => {
                let snap = self.admission.snapshot();
                text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.metrics.encode(&snap).into(),
                )
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /healthz, /status or /metrics\n".into(),
            ),
        }
    }

    /// The `/status` document (see README for every field).
    pub fn status(&self) -> Value {
        let s = self.admission.snapshot();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let secs = |d: Duration| (d.as_secs_f64() * 1000.0).round() / 1000.0;
        let until = |u: Option<f64>| u.map(|u| format_rfc3339(u.ceil() as i64));
        let left = |u: Option<f64>| u.map(|u| ((u - now).max(0.0) * 1000.0).round() / 1000.0);
        let cfg = &self.config;
        let outcomes: serde_json::Map<String, Value> = self
            .metrics
            .outcomes()
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let statuses: serde_json::Map<String, Value> = self
            .metrics
            .statuses()
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let state = if s.daily_gate_until_unix.is_some() || s.remaining_today == Some(0) {
            "daily_quota_exhausted"
        } else if s.cooldown_active && !s.cooldown_proactive {
            "cooldown"
        } else if s.cooldown_active {
            "upstream_window_exhausted"
        } else {
            s.gate.as_str()
        };
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": secs(self.metrics.uptime()),
            "now": format_rfc3339(now as i64),
            "state": state,
            "upstream": cfg.upstream.url.to_string(),
            "api_key": if cfg.upstream.api_key.is_some() { "configured" } else { "not configured (client auth passes through)" },
            "backend": "local",
            "limits": {
                "requests_per_minute": s.requests_per_minute,
                "burst": s.burst,
                "requests_per_day": s.requests_per_day,
                "max_concurrent": s.max_concurrent,
                "queue_max_depth": s.max_depth,
                "queue_max_wait_seconds": secs(s.max_wait),
            },
            "tokens": {
                "available": s.tokens_available,
                "next_in_seconds": secs(s.next_token_in),
            },
            "daily": {
                "used": s.used_today,
                "remaining": s.remaining_today,
                "resets_at": format_rfc3339(s.day_resets_at_unix),
                "resets_in_seconds": ((s.day_resets_at_unix as f64 - now).max(0.0)).round(),
                "resets_in": format_reset(Duration::from_secs_f64((s.day_resets_at_unix as f64 - now).max(0.0))),
                "upstream_quota_gate_until": until(s.daily_gate_until_unix),
            },
            "cooldown": {
                "active": s.cooldown_active,
                "kind": if !s.cooldown_active { None } else if s.cooldown_proactive { Some("upstream_window") } else { Some("rate_limited") },
                "until": until(s.cooldown_until_unix),
                "remaining_seconds": left(s.cooldown_until_unix),
                "level": s.cooldown_level,
                "gate": s.gate.as_str(),
                "last_upstream_429": s.last_429.as_ref().map(|l| json!({
                    "at": format_rfc3339(l.at_unix as i64),
                    "status": l.status,
                    "headers": l.headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
                    "body": l.body.chars().take(512).collect::<String>(),
                })),
            },
            "queue": {
                "depth": s.queue_depth,
                "oldest_wait_seconds": s.oldest_wait.map(secs),
            },
            "in_flight": s.in_flight,
            "requests": outcomes,
            "upstream_responses": statuses,
            "clients": s.clients.iter().enumerate().map(|(i, c)| json!({
                "name": &*c.name,
                "weight": c.weight,
                "queued": c.queued,
                "used_today": c.used_today,
                "forwarded": c.forwarded,
                "requests_per_minute": c.requests_per_minute,
                "requests_per_day": c.requests_per_day,
                "outcomes": self.metrics.client_outcomes(i).into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            })).collect::<Vec<_>>(),
        })
    }
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

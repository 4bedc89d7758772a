//! The only place that builds the proxy's own responses: a typed [`Rejection`] (reason,
//! retry-after, limits, upstream details) becomes status, headers and an OpenAI-compatible
//! JSON body that the SDKs parse into `RateLimitError` and friends.
//!
//! Nothing here decides *whether* to refuse; admission and the proxy pipeline do that. Nothing
//! here does I/O. Upstream text that ends up in a body (`upstream_body`) is JSON-escaped by
//! serde and never copied into a header, so an upstream cannot inject headers.
//!
//! Also the main listener's own `GET /healthz` answer ([`healthz`]): container and Kubernetes
//! probes hit the service port, and a probe must never be forwarded or charged to the budget.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use serde::Serialize;

use crate::units::{format_reset, format_rfc3339};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-proxy-request-id");
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
const SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");

/// Whether a main-listener request is a health probe the proxy answers itself: exactly `GET`
/// or `HEAD` of the path `/healthz` (any query). Everything else, `/healthz/` and `POST
/// /healthz` included, is forwarded as before: the upstream may have such paths of its own.
pub fn is_healthz(method: &http::Method, uri: &http::Uri) -> bool {
    (method == http::Method::GET || method == http::Method::HEAD) && uri.path() == "/healthz"
}

/// The probe's answer: 200 `ok`, like the admin listener's, with the request id every
/// response carries. (hyper sends no body for a HEAD.)
pub fn healthz(request_id: &HeaderValue) -> Response<Bytes> {
    let mut r = Response::new(Bytes::from_static(b"ok\n"));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(REQUEST_ID, request_id.clone());
    r
}

/// Why the proxy answered itself. The string forms are the contract's `error.proxy.reason`
/// and the `outcome` label of `chutes_proxy_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    QueueFull,
    QueueTimeout,
    UpstreamCooldown,
    UpstreamRateLimited,
    DailyQuotaExhausted,
    ClientRateLimited,
    ClientDailyQuotaExhausted,
    UnauthorizedClient,
    SharedStateUnavailable,
    UpstreamUnavailable,
    UpstreamTimeout,
    RequestTooLarge,
    /// A malformed proxy header such as `x-proxy-max-wait`.
    BadRequest,
    /// CONNECT and other methods a reverse proxy never forwards.
    MethodNotAllowed,
    /// The request's model is cooling after a capacity 429.
    ModelCooldown,
    /// An upstream capacity 429 for one model, rewritten.
    UpstreamCapacity,
    /// An upstream 402 "Subscription usage cap exceeded": gate until the next 4-hour window.
    UsageCapExhausted,
    /// SIGTERM/SIGINT: a queued request that cannot be admitted within the grace.
    ShuttingDown,
}

impl Reason {
    pub const ALL: [Reason; 18] = [
        Reason::QueueFull,
        Reason::QueueTimeout,
        Reason::UpstreamCooldown,
        Reason::UpstreamRateLimited,
        Reason::DailyQuotaExhausted,
        Reason::ClientRateLimited,
        Reason::ClientDailyQuotaExhausted,
        Reason::UnauthorizedClient,
        Reason::SharedStateUnavailable,
        Reason::UpstreamUnavailable,
        Reason::UpstreamTimeout,
        Reason::RequestTooLarge,
        Reason::BadRequest,
        Reason::MethodNotAllowed,
        Reason::ModelCooldown,
        Reason::UpstreamCapacity,
        Reason::UsageCapExhausted,
        Reason::ShuttingDown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::QueueFull => "queue_full",
            Reason::QueueTimeout => "queue_timeout",
            Reason::UpstreamCooldown => "upstream_cooldown",
            Reason::UpstreamRateLimited => "upstream_rate_limited",
            Reason::DailyQuotaExhausted => "daily_quota_exhausted",
            Reason::ClientRateLimited => "client_rate_limited",
            Reason::ClientDailyQuotaExhausted => "client_daily_quota_exhausted",
            Reason::UnauthorizedClient => "unauthorized_client",
            Reason::SharedStateUnavailable => "shared_state_unavailable",
            Reason::UpstreamUnavailable => "upstream_unavailable",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::RequestTooLarge => "request_too_large",
            Reason::BadRequest => "bad_request",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::ModelCooldown => "model_cooldown",
            Reason::UpstreamCapacity => "upstream_capacity",
            Reason::UsageCapExhausted => "usage_cap_exhausted",
            Reason::ShuttingDown => "shutting_down",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Reason::QueueFull
            | Reason::QueueTimeout
            | Reason::UpstreamCooldown
            | Reason::UpstreamRateLimited
            | Reason::DailyQuotaExhausted
            | Reason::ClientRateLimited
            | Reason::ClientDailyQuotaExhausted
            | Reason::ModelCooldown
            | Reason::UpstreamCapacity
            | Reason::UsageCapExhausted => StatusCode::TOO_MANY_REQUESTS,
            Reason::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Reason::UnauthorizedClient => StatusCode::UNAUTHORIZED,
            Reason::SharedStateUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Reason::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Reason::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::BadRequest => StatusCode::BAD_REQUEST,
            Reason::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// OpenAI `error.type` and `error.code`.
    fn type_code(self) -> (&'static str, &'static str) {
        match self {
            Reason::DailyQuotaExhausted
            | Reason::ClientDailyQuotaExhausted
            | Reason::UsageCapExhausted => ("insufficient_quota", "insufficient_quota"),
            Reason::ModelCooldown | Reason::UpstreamCapacity => ("requests", "rate_limit_exceeded"),
            Reason::ShuttingDown => ("upstream_error", "shutting_down"),
            Reason::QueueFull
            | Reason::QueueTimeout
            | Reason::UpstreamCooldown
            | Reason::UpstreamRateLimited
            | Reason::ClientRateLimited => ("requests", "rate_limit_exceeded"),
            Reason::UnauthorizedClient => ("invalid_request_error", "invalid_api_key"),
            Reason::SharedStateUnavailable => ("upstream_error", "shared_state_unavailable"),
            Reason::UpstreamUnavailable => ("upstream_error", "upstream_unavailable"),
            Reason::UpstreamTimeout => ("upstream_error", "upstream_timeout"),
            Reason::RequestTooLarge => ("invalid_request_error", "request_too_large"),
            Reason::BadRequest => ("invalid_request_error", "invalid_header"),
            Reason::MethodNotAllowed => ("invalid_request_error", "method_not_allowed"),
        }
    }

    /// Whether a retry can ever help (`x-should-retry`).
    fn should_retry(self) -> bool {
        !matches!(
            self,
            Reason::DailyQuotaExhausted
                | Reason::ClientDailyQuotaExhausted
                | Reason::UsageCapExhausted
                | Reason::UnauthorizedClient
                | Reason::RequestTooLarge
                | Reason::BadRequest
                | Reason::MethodNotAllowed
        )
    }
}

/// Which policy a 429 is about, for the `RateLimit` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Minute,
    Day,
}

/// The account's limits as a refused client should see them: `error.proxy.limits` on the wire,
/// written from this struct as it is.
#[derive(Debug, Clone, Serialize)]
pub struct LimitsView {
    pub requests_per_minute: u32,
    pub burst: u32,
    pub requests_per_day: Option<u64>,
    pub used_today: u64,
    pub remaining_today: Option<u64>,
    #[serde(rename = "day_resets_at", serialize_with = "rfc3339")]
    pub day_resets_at_unix: i64,
}

fn rfc3339<S: serde::Serializer>(unix: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_rfc3339(*unix))
}

/// A refusal or failure, with every number the response needs.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub reason: Reason,
    pub retry_after: Option<Duration>,
    pub limits: Option<LimitsView>,
    pub cooldown_until_unix: Option<f64>,
    pub client: Option<Arc<str>>,
    /// The request's model, for model-scoped refusals (`model_cooldown`, `upstream_capacity`,
    /// a model's own quota).
    pub model: Option<Arc<str>>,
    pub upstream_status: Option<u16>,
    pub upstream_body: Option<String>,
    /// Extra words for the message, e.g. "estimated wait 31.0s exceeds the wait limit 20.0s".
    pub detail: Option<String>,
    pub tripped: Policy,
}

impl Rejection {
    pub fn new(reason: Reason) -> Rejection {
        Rejection {
            reason,
            retry_after: None,
            limits: None,
            cooldown_until_unix: None,
            client: None,
            model: None,
            upstream_status: None,
            upstream_body: None,
            detail: None,
            tripped: Policy::Minute,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Rejection {
        self.detail = Some(detail.into());
        self
    }

    /// Whole seconds for `Retry-After`: rounded up, at least 1.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after.map(|d| {
            let ms = d.as_millis();
            (ms.div_ceil(1000) as u64).max(1)
        })
    }

    fn message(&self) -> String {
        let retry = self.retry_after_secs().unwrap_or(1);
        let retry_txt = format_reset(Duration::from_secs(retry));
        let base = match self.reason {
            Reason::QueueFull => format!("account rate limit: queue full, retry in {retry_txt}"),
            Reason::QueueTimeout => format!("account rate limit: retry in {retry_txt}"),
            Reason::UpstreamCooldown => format!(
                "account rate limit: the upstream rate-limited this account, cooling down; retry in {retry_txt}"
            ),
            Reason::UpstreamRateLimited => format!(
                "the upstream rate-limited this account (HTTP {}); all clients paused, retry in {retry_txt}",
                self.upstream_status.unwrap_or(429)
            ),
            Reason::DailyQuotaExhausted => {
                format!("daily request quota exhausted; it resets in {retry_txt}")
            }
            Reason::ClientRateLimited => format!(
                "client {:?} is over its own rate limit; retry in {retry_txt}",
                self.client.as_deref().unwrap_or("default")
            ),
            Reason::ClientDailyQuotaExhausted => format!(
                "client {:?} has used its daily quota; it resets in {retry_txt}",
                self.client.as_deref().unwrap_or("default")
            ),
            Reason::UnauthorizedClient => {
                "this proxy requires a known client token as the API key".to_string()
            }
            Reason::SharedStateUnavailable => format!(
                "the shared rate-limit state is unreachable; retry in {retry_txt}"
            ),
            Reason::UpstreamUnavailable => "the upstream could not be reached".to_string(),
            Reason::UpstreamTimeout => "the upstream did not answer in time".to_string(),
            Reason::RequestTooLarge => "the request body is larger than this proxy accepts".to_string(),
            Reason::BadRequest => "invalid request".to_string(),
            Reason::MethodNotAllowed => "this method is not forwarded".to_string(),
            Reason::ModelCooldown => format!(
                "model {:?} is at capacity upstream and cooling down; other models are served; retry in {retry_txt}",
                self.model.as_deref().unwrap_or("")
            ),
            Reason::UpstreamCapacity => format!(
                "the upstream has no free capacity for model {:?} (HTTP {}); other models are served; retry in {retry_txt}",
                self.model.as_deref().unwrap_or(""),
                self.upstream_status.unwrap_or(429)
            ),
            Reason::UsageCapExhausted => format!(
                "the plan's subscription usage cap is spent; the next 4-hour window opens in {retry_txt}"
            ),
            Reason::ShuttingDown => format!("the proxy is shutting down; retry in {retry_txt}"),
        };
        match &self.detail {
            Some(d) => format!("{base} ({d})"),
            None => base,
        }
    }

    /// Status, headers and JSON body. `request_id` is echoed in the header and the body.
    pub fn render(&self, request_id: &HeaderValue) -> Response<Bytes> {
        let (kind, code) = self.reason.type_code();
        let message = self.message();
        let body = OpenAiError {
            proxy: Some(ProxyObj {
                reason: self.reason.as_str(),
                retry_after_seconds: self
                    .retry_after
                    .map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0),
                request_id: request_id.to_str().unwrap_or(""),
                client: self.client.as_deref(),
                model: self.model.as_deref(),
                limits: self.limits.as_ref(),
                cooldown_until: self
                    .cooldown_until_unix
                    .map(|u| format_rfc3339(u.ceil() as i64)),
                upstream_status: self.upstream_status,
                upstream_body: self.upstream_body.as_deref(),
            }),
            ..OpenAiError::new(&message, kind, code)
        };
        let mut resp = Response::new(Bytes::from(body.to_json()));
        *resp.status_mut() = self.reason.status();
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(REQUEST_ID, request_id.clone());
        if let Some(secs) = self.retry_after_secs() {
            h.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.reason.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry_ms = self.retry_after.map_or(1000, |d| d.as_millis() as u64);
            let secs = self.retry_after_secs().unwrap_or(1);
            h.insert(RETRY_AFTER_MS, HeaderValue::from(retry_ms));
            h.insert(
                SHOULD_RETRY,
                HeaderValue::from_static(if self.reason.should_retry() {
                    "true"
                } else {
                    "false"
                }),
            );
            if let Some(l) = &self.limits {
                let mut policy = format!("\"minute\";q={};w=60", l.requests_per_minute);
                if let Some(d) = l.requests_per_day {
                    let _ = write!(policy, ", \"day\";q={d};w=86400");
                }
                let (name, limit, remaining) = match self.tripped {
                    Policy::Day => (
                        "day",
                        l.requests_per_day.unwrap_or(0),
                        l.remaining_today.unwrap_or(0),
                    ),
                    Policy::Minute => ("minute", u64::from(l.requests_per_minute), 0),
                };
                let remaining = if matches!(
                    self.reason,
                    Reason::DailyQuotaExhausted | Reason::UsageCapExhausted
                ) {
                    0
                } else {
                    remaining
                };
                insert_text(h, RATELIMIT_POLICY, &policy);
                insert_text(h, RATELIMIT, &format!("\"{name}\";r={remaining};t={secs}"));
                h.insert(LIMIT_REQUESTS, HeaderValue::from(limit));
                h.insert(REMAINING_REQUESTS, HeaderValue::from(remaining));
            }
            insert_text(h, RESET_REQUESTS, &format_reset(Duration::from_secs(secs)));
        } else if self.reason.should_retry() && self.retry_after.is_some() {
            h.insert(SHOULD_RETRY, HeaderValue::from_static("true"));
        }
        resp
    }
}

fn insert_text(h: &mut http::HeaderMap, name: HeaderName, v: &str) {
    // Every value here is built from numbers and fixed words, so it is always a valid header.
    if let Ok(v) = HeaderValue::from_str(v) {
        h.insert(name, v);
    }
}

/// The OpenAI error object, `{"error": {"message", "type", "param", "code"}}` on the wire: the
/// one shape of every error body the proxy writes (its own responses here, the SSE error
/// events of `sse.rs` and `body.rs`, the admin listener's 400s), which the SDKs parse into
/// `RateLimitError`, `APIError` and friends. A struct, not `json!`, so the keys keep the order
/// OpenAI writes them (`serde_json::Map` would sort them).
///
/// `code` is usually one of our fixed words; the SSE rewrite passes on the upstream's own
/// `code`, which may be any JSON value, hence the parameter.
#[derive(Serialize)]
pub(crate) struct OpenAiError<'a, C = &'static str> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: C,
    /// The proxy's own details, on the responses it makes itself (CONTRACT.md); absent from
    /// relayed upstream errors and the admin listener's.
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy: Option<ProxyObj<'a>>,
}

impl<'a, C: Serialize> OpenAiError<'a, C> {
    pub(crate) fn new(message: &'a str, kind: &'static str, code: C) -> Self {
        OpenAiError {
            message,
            kind,
            param: None,
            code,
            proxy: None,
        }
    }

    /// Naming the request parameter that was wrong.
    pub(crate) fn with_param(mut self, param: &'a str) -> Self {
        self.param = Some(param);
        self
    }

    /// The body: this object under `"error"`.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Envelope<'b, T> {
            error: &'b T,
        }
        // Serialising plain structs of strings and numbers (and an already-parsed `Value`)
        // cannot fail.
        serde_json::to_vec(&Envelope { error: self }).unwrap_or_default()
    }
}

#[derive(Serialize)]
struct ProxyObj<'a> {
    reason: &'static str,
    retry_after_seconds: Option<f64>,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    limits: Option<&'a LimitsView>,
    cooldown_until: Option<String>,
    upstream_status: Option<u16>,
    upstream_body: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LimitsView {
        LimitsView {
            requests_per_minute: 50,
            burst: 5,
            requests_per_day: Some(5000),
            used_today: 812,
            remaining_today: Some(4188),
            day_resets_at_unix: 1_795_478_400, // 2026-11-24T00:00:00Z
        }
    }

    fn json(r: &Response<Bytes>) -> serde_json::Value {
        serde_json::from_slice(r.body()).unwrap()
    }

    #[test]
    fn queue_timeout_has_every_contract_header_and_field() {
        let mut rej = Rejection::new(Reason::QueueTimeout);
        rej.retry_after = Some(Duration::from_millis(11_400));
        rej.limits = Some(limits());
        let r = rej.render(&HeaderValue::from_static("req-1"));
        assert_eq!(r.status(), 429);
        let h = r.headers();
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["x-proxy-request-id"], "req-1");
        assert_eq!(h["retry-after"], "12");
        assert_eq!(h["retry-after-ms"], "11400");
        assert_eq!(h["x-should-retry"], "true");
        assert_eq!(
            h["ratelimit-policy"],
            "\"minute\";q=50;w=60, \"day\";q=5000;w=86400"
        );
        assert_eq!(h["ratelimit"], "\"minute\";r=0;t=12");
        assert_eq!(h["x-ratelimit-limit-requests"], "50");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-reset-requests"], "12s");
        let v = json(&r);
        let e = &v["error"];
        assert_eq!(e["type"], "requests");
        assert_eq!(e["code"], "rate_limit_exceeded");
        assert!(e["param"].is_null());
        assert_eq!(e["proxy"]["reason"], "queue_timeout");
        assert_eq!(e["proxy"]["retry_after_seconds"], 11.4);
        assert_eq!(e["proxy"]["request_id"], "req-1");
        assert_eq!(e["proxy"]["limits"]["used_today"], 812);
        assert_eq!(e["proxy"]["limits"]["remaining_today"], 4188);
        assert_eq!(
            e["proxy"]["limits"]["day_resets_at"],
            "2026-11-24T00:00:00Z"
        );
        assert!(e["proxy"]["cooldown_until"].is_null());
        assert!(e["proxy"]["upstream_status"].is_null());
        assert!(e["proxy"].get("client").is_none());
    }

    #[test]
    fn daily_quota_says_do_not_retry() {
        let mut rej = Rejection::new(Reason::DailyQuotaExhausted);
        rej.retry_after = Some(Duration::from_secs(3600));
        rej.limits = Some(limits());
        rej.tripped = Policy::Day;
        let r = rej.render(&HeaderValue::from_static("x"));
        assert_eq!(r.headers()["x-should-retry"], "false");
        assert_eq!(r.headers()["ratelimit"], "\"day\";r=0;t=3600");
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "5000");
        assert_eq!(r.headers()["x-ratelimit-reset-requests"], "1h0m0s");
        let v = json(&r);
        assert_eq!(v["error"]["type"], "insufficient_quota");
        assert_eq!(v["error"]["code"], "insufficient_quota");
    }

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one() {
        for (ms, want) in [(0, 1), (1, 1), (999, 1), (1000, 1), (1001, 2), (59_500, 60)] {
            let mut rej = Rejection::new(Reason::QueueFull);
            rej.retry_after = Some(Duration::from_millis(ms));
            assert_eq!(rej.retry_after_secs(), Some(want), "{ms}ms");
        }
    }

    #[test]
    fn upstream_body_is_escaped_not_injected() {
        let mut rej = Rejection::new(Reason::UpstreamRateLimited);
        rej.retry_after = Some(Duration::from_secs(30));
        rej.upstream_status = Some(429);
        rej.upstream_body = Some("<html>\r\nSet-Cookie: x=1\"}</html>".into());
        let r = rej.render(&HeaderValue::from_static("x"));
        assert!(r.headers().get("set-cookie").is_none());
        let v = json(&r);
        assert_eq!(
            v["error"]["proxy"]["upstream_body"],
            "<html>\r\nSet-Cookie: x=1\"}</html>"
        );
        assert_eq!(v["error"]["proxy"]["upstream_status"], 429);
    }

    /// The envelope everyone else writes (admin's 400s, the SSE error events): OpenAI's keys
    /// in OpenAI's order, and no `proxy` object.
    #[test]
    fn the_plain_envelope_is_openai_s() {
        let plain = OpenAiError::new("bad", "invalid_request_error", "invalid_parameter");
        assert_eq!(
            String::from_utf8(plain.with_param("seconds").to_json()).unwrap(),
            r#"{"error":{"message":"bad","type":"invalid_request_error","param":"seconds","code":"invalid_parameter"}}"#
        );
        let code = serde_json::json!(502);
        assert_eq!(
            String::from_utf8(OpenAiError::new("x", "upstream_error", &code).to_json()).unwrap(),
            r#"{"error":{"message":"x","type":"upstream_error","param":null,"code":502}}"#
        );
    }

    #[test]
    fn gateway_errors_have_their_status_and_code() {
        for (reason, status, code) in [
            (Reason::UpstreamUnavailable, 502, "upstream_unavailable"),
            (Reason::UpstreamTimeout, 504, "upstream_timeout"),
            (Reason::RequestTooLarge, 413, "request_too_large"),
            (Reason::UnauthorizedClient, 401, "invalid_api_key"),
        ] {
            let r = Rejection::new(reason).render(&HeaderValue::from_static("x"));
            assert_eq!(r.status(), status);
            assert_eq!(json(&r)["error"]["code"], code);
            assert!(r.headers().get("retry-after").is_none());
        }
    }
}

//! The `/status` document as one type tree: the admin listener (`admin.rs`) fills and
//! serializes it, the `status` command (`status_cmd.rs`) deserializes and renders it. One
//! type, so the two ends cannot drift apart (STYLE.md 15).
//!
//! Owns the document's shape: every key, its JSON type, and how tolerant reading is. Does not
//! own what the figures mean or how they are computed (`admin.rs` from the admission snapshot)
//! nor how they are shown (`status_cmd.rs`, `dashboard.html`). Every field is described in
//! docs/observability.md; keys are stable (scripts read them), and a field that does not apply
//! is `null`, never missing.
//!
//! Reading is tolerant both ways, so a `status` command reads an older or a newer proxy:
//! unknown keys are ignored, missing keys take their default (`#[serde(default)]` on every
//! struct), and a top-level section of an unexpected type is read as its default instead of
//! failing the whole document (`lenient`). Strings stand where the proxy writes one of a
//! fixed set of words (`state`, `gate`, `kind`…), so a newer word still reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// The whole document. Fields in the order a person reads them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    #[serde(deserialize_with = "lenient")]
    pub version: String,
    #[serde(deserialize_with = "lenient")]
    pub uptime_seconds: f64,
    /// RFC 3339, whole seconds.
    #[serde(deserialize_with = "lenient")]
    pub now: String,
    /// The one word a person looks for first: `open`, `probe_ready`, `probe_in_flight`,
    /// `cooldown`, `upstream_window_exhausted`, `usage_cap_exhausted`, `daily_quota_exhausted`.
    #[serde(deserialize_with = "lenient")]
    pub state: String,
    #[serde(deserialize_with = "lenient")]
    pub upstream: String,
    /// Whether a key is configured, never the key (nor its length or a prefix).
    #[serde(deserialize_with = "lenient")]
    pub api_key: String,
    /// `local` or `redis`.
    #[serde(deserialize_with = "lenient")]
    pub backend: String,
    /// The fleet-wide figures from Redis (`null` with the local backend): `daily` and
    /// `cooldown` are this replica's view.
    #[serde(deserialize_with = "lenient")]
    pub fleet: Option<Fleet>,
    #[serde(deserialize_with = "lenient")]
    pub rate_limits: RateLimits,
    #[serde(deserialize_with = "lenient")]
    pub upstream_quota: Option<UpstreamQuota>,
    #[serde(deserialize_with = "lenient")]
    pub usage_cap: UsageCap,
    #[serde(deserialize_with = "lenient")]
    pub models: Vec<Model>,
    #[serde(deserialize_with = "lenient")]
    pub limits: Limits,
    #[serde(deserialize_with = "lenient")]
    pub tokens: Tokens,
    #[serde(deserialize_with = "lenient")]
    pub daily: Daily,
    #[serde(deserialize_with = "lenient")]
    pub cooldown: Cooldown,
    #[serde(deserialize_with = "lenient")]
    pub queue: Queue,
    #[serde(deserialize_with = "lenient")]
    pub in_flight: u64,
    /// Requests since start by outcome (`forwarded` or a shed reason), every outcome listed.
    #[serde(deserialize_with = "lenient")]
    pub requests: BTreeMap<String, u64>,
    /// Upstream responses since start by exact status code (only codes seen).
    #[serde(deserialize_with = "lenient")]
    pub upstream_responses: BTreeMap<String, u64>,
    #[serde(deserialize_with = "lenient")]
    pub clients: Vec<Client>,
    /// What limits a new request right now (`null`: it would go at once): a daily or usage
    /// cap, a cooldown or the upstream's window, the probe, `max_concurrent`, a state-file
    /// reservation, the queue, the account's rate, the shared state unreachable.
    #[serde(deserialize_with = "lenient")]
    pub limited_by: Option<String>,
    /// How long a new request would wait for admission now (an estimate).
    #[serde(deserialize_with = "lenient")]
    pub new_request_wait_seconds: f64,
    /// Re-sends on the clients' behalf since start, by cause (`account`, `model`).
    #[serde(deserialize_with = "lenient")]
    pub retries: BTreeMap<String, u64>,
}

/// The shared budget in Redis, as this replica reads it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Fleet {
    /// With any password replaced.
    pub redis_url: String,
    pub key_prefix: String,
    /// `fail_closed` or `local`.
    pub on_redis_error: String,
    /// Whether this read reached Redis.
    pub reachable: bool,
    /// What admission currently believes (it decides between Redis and the fallback).
    pub healthy: bool,
    pub last_error: Option<String>,
    pub used_today: Option<u64>,
    pub cooldown_until: Option<String>,
    pub cooldown_level: u32,
    pub quota_gate_until: Option<String>,
    pub probe_needed: bool,
    /// Redis calls this replica made since start (admission, announcements, and status
    /// reads), for judging the fleet backend's cost.
    pub redis_round_trips: u64,
}

/// Configured against advertised, side by side: the rate in force is the lower (with
/// `follow_upstream_limits`), the daily cap the smaller (with `beyond_quota = "stop"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RateLimits {
    pub configured_requests_per_minute: u32,
    pub advertised_requests_per_minute: AdvertisedRate,
    pub in_force_requests_per_minute: u32,
    pub follow_upstream_limits: bool,
    pub configured_requests_per_day: Option<u64>,
    pub in_force_requests_per_day: Option<u64>,
    /// `stop` or `continue`.
    pub beyond_quota: String,
}

/// `X-Chutes-RL-User` as last seen: `null` (never seen), `"inf"`, or a number per minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AdvertisedRate {
    #[default]
    Unknown,
    Unlimited,
    PerMinute(u32),
}

impl Serialize for AdvertisedRate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            AdvertisedRate::Unknown => s.serialize_none(),
            AdvertisedRate::Unlimited => s.serialize_str("inf"),
            AdvertisedRate::PerMinute(n) => s.serialize_u32(n),
        }
    }
}

impl<'de> Deserialize<'de> for AdvertisedRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) if s == "inf" => AdvertisedRate::Unlimited,
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map_or(AdvertisedRate::Unknown, AdvertisedRate::PerMinute),
            _ => AdvertisedRate::Unknown,
        })
    }
}

/// The upstream's view of the account's daily quota, as last seen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpstreamQuota {
    pub total: u64,
    pub used: u64,
    pub remaining: u64,
    pub seen_at: String,
    pub seen_ago_seconds: f64,
    /// `header` or `poll`.
    pub source: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UsageCap {
    pub exhausted: bool,
    pub until: Option<String>,
    pub remaining_seconds: Option<f64>,
}

/// One model the budget knows something about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Model {
    pub model: String,
    pub cooling: bool,
    pub until: Option<String>,
    pub until_unix: Option<f64>,
    pub remaining_seconds: Option<f64>,
    pub level: u32,
    pub gate: String,
    pub last_body: String,
    pub last_429_at: Option<String>,
    pub advertised_requests_per_minute: Option<u32>,
    pub quota_total: Option<u64>,
    pub quota_used: Option<u64>,
    pub quota_gate_until: Option<String>,
}

/// The limits in force.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    pub requests_per_minute: u32,
    pub burst: u32,
    pub requests_per_day: Option<u64>,
    /// `HH:MM` UTC.
    pub day_reset_utc: String,
    pub max_concurrent: u64,
    pub queue_max_depth: u64,
    pub queue_max_wait_seconds: f64,
    pub cooldown_initial_seconds: f64,
    pub cooldown_max_seconds: f64,
    pub cooldown_multiplier: f64,
    pub model_cooldown_initial_seconds: f64,
    pub model_cooldown_max_seconds: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Tokens {
    pub available: u32,
    pub capacity: u32,
    pub spacing_seconds: f64,
    pub next_in_seconds: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Daily {
    pub used: u64,
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub exhausted: bool,
    pub resets_at: String,
    pub resets_in_seconds: f64,
    pub resets_in: String,
    pub upstream_quota_gate_until: Option<String>,
    /// What closed that gate, in words (a 402, the quota headers, the fleet).
    pub gate_reason: Option<String>,
    /// `used` is an assumption (the state file could not be trusted), not a count.
    pub assumed: bool,
    /// In a Redis fleet, this replica's own share of `used` (which is fleet-wide there).
    pub replica_used: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Cooldown {
    pub active: bool,
    /// `rate_limited` or `upstream_window` while active, else `null`.
    pub kind: Option<String>,
    pub until: Option<String>,
    pub remaining_seconds: Option<f64>,
    pub level: u32,
    pub gate: String,
    pub last_upstream_429: Option<Last429>,
}

/// The last 429 from upstream since start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Last429 {
    pub at: String,
    pub ago_seconds: f64,
    pub status: u16,
    /// Its rate-limit headers as `[name, value]` pairs; anything else in the list is skipped.
    #[serde(deserialize_with = "pairs")]
    pub headers: Vec<(String, String)>,
    /// The first 512 characters.
    pub body: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Queue {
    pub depth: u64,
    pub oldest_wait_seconds: Option<f64>,
    /// Bytes of request bodies read before admission that waiting requests hold (a retry's
    /// kept body too), and the bound on them (`queue.max_body_bytes`).
    pub body_bytes: u64,
    pub max_body_bytes: u64,
}

/// One configured client (`default` included).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Client {
    pub name: String,
    pub weight: u32,
    pub queued: u64,
    pub used_today: u64,
    pub forwarded: u64,
    pub requests_per_minute: Option<u32>,
    pub requests_per_day: Option<u64>,
    pub outcomes: BTreeMap<String, u64>,
}

/// A field of an unexpected type reads as its default rather than failing the document: a
/// summary with one section missing is more use than no summary.
fn lenient<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned + Default,
{
    let v = Value::deserialize(d)?;
    Ok(T::deserialize(v).unwrap_or_default())
}

/// `[name, value]` pairs, skipping any entry that is not one.
fn pairs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(v.as_array()
        .map(|list| {
            list.iter()
                .filter_map(|p| <(String, String)>::deserialize(p).ok())
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A document with every section filled and every optional field set.
    fn full() -> Status {
        Status {
            version: "0.1.0".into(),
            uptime_seconds: 4000.5,
            now: "2026-11-23T20:48:00Z".into(),
            state: "cooldown".into(),
            upstream: "https://llm.chutes.ai/".into(),
            api_key: "configured".into(),
            backend: "redis".into(),
            fleet: Some(Fleet {
                redis_url: "redis://<redacted>@10.0.0.5:6379/0".into(),
                key_prefix: "chutes-proxy:".into(),
                on_redis_error: "fail_closed".into(),
                reachable: true,
                healthy: true,
                last_error: Some("timeout".into()),
                used_today: Some(2412),
                cooldown_until: Some("2026-11-23T21:00:00Z".into()),
                cooldown_level: 1,
                quota_gate_until: Some("2026-11-24T00:00:00Z".into()),
                probe_needed: true,
                redis_round_trips: 99,
            }),
            rate_limits: RateLimits {
                configured_requests_per_minute: 50,
                advertised_requests_per_minute: AdvertisedRate::PerMinute(40),
                in_force_requests_per_minute: 40,
                follow_upstream_limits: true,
                configured_requests_per_day: Some(5000),
                in_force_requests_per_day: Some(3000),
                beyond_quota: "stop".into(),
            },
            upstream_quota: Some(UpstreamQuota {
                total: 3000,
                used: 12,
                remaining: 2988,
                seen_at: "2026-11-23T20:47:00Z".into(),
                seen_ago_seconds: 60.0,
                source: "poll".into(),
            }),
            usage_cap: UsageCap {
                exhausted: true,
                until: Some("2026-11-24T00:00:00Z".into()),
                remaining_seconds: Some(11520.25),
            },
            models: vec![Model {
                model: "busy/model".into(),
                cooling: true,
                until: Some("2026-11-23T20:49:00Z".into()),
                until_unix: Some(1_763_930_940.5),
                remaining_seconds: Some(60.5),
                level: 2,
                gate: "open".into(),
                last_body: "{\"detail\":\"busy\"}".into(),
                last_429_at: Some("2026-11-23T20:47:59Z".into()),
                advertised_requests_per_minute: Some(10),
                quota_total: Some(100),
                quota_used: Some(7),
                quota_gate_until: Some("2026-11-24T00:00:00Z".into()),
            }],
            limits: Limits {
                requests_per_minute: 40,
                burst: 5,
                requests_per_day: Some(3000),
                day_reset_utc: "00:00".into(),
                max_concurrent: 16,
                queue_max_depth: 1000,
                queue_max_wait_seconds: 20.0,
                cooldown_initial_seconds: 30.0,
                cooldown_max_seconds: 600.0,
                cooldown_multiplier: 2.0,
                model_cooldown_initial_seconds: 10.0,
                model_cooldown_max_seconds: 300.0,
            },
            tokens: Tokens {
                available: 3,
                capacity: 5,
                spacing_seconds: 1.5,
                next_in_seconds: 0.4,
            },
            daily: Daily {
                used: 812,
                limit: Some(3000),
                remaining: Some(2188),
                exhausted: false,
                resets_at: "2026-11-24T00:00:00Z".into(),
                resets_in_seconds: 11520.0,
                resets_in: "3h12m0s".into(),
                upstream_quota_gate_until: Some("2026-11-24T00:00:00Z".into()),
                gate_reason: Some("the upstream answered 402 quota exceeded".into()),
                assumed: true,
                replica_used: Some(400),
            },
            cooldown: Cooldown {
                active: true,
                kind: Some("rate_limited".into()),
                until: Some("2026-11-23T21:00:00Z".into()),
                remaining_seconds: Some(723.2),
                level: 2,
                gate: "open".into(),
                last_upstream_429: Some(Last429 {
                    at: "2026-11-23T20:47:00Z".into(),
                    ago_seconds: 60.0,
                    status: 429,
                    headers: vec![("retry-after".into(), "30".into())],
                    body: "<html>".into(),
                }),
            },
            queue: Queue {
                depth: 4,
                oldest_wait_seconds: Some(2.345),
                body_bytes: 2_048,
                max_body_bytes: 64 << 20,
            },
            in_flight: 2,
            requests: [
                ("forwarded".to_string(), 812),
                ("queue_full".to_string(), 3),
            ]
            .into(),
            upstream_responses: [("200".to_string(), 811), ("429".to_string(), 1)].into(),
            clients: vec![Client {
                name: "chatbot".into(),
                weight: 3,
                queued: 2,
                used_today: 800,
                forwarded: 800,
                requests_per_minute: Some(30),
                requests_per_day: Some(2000),
                outcomes: [("forwarded".to_string(), 800)].into(),
            }],
            limited_by: Some("upstream_cooldown".into()),
            new_request_wait_seconds: 723.0,
            retries: [("account".to_string(), 2), ("model".to_string(), 5)].into(),
        }
    }

    #[test]
    fn a_document_reads_back_as_written() {
        for doc in [full(), Status::default()] {
            let text = serde_json::to_string_pretty(&doc).unwrap();
            let back: Status = serde_json::from_str(&text).unwrap();
            assert_eq!(back, doc, "{text}");
        }
        let unlimited = Status {
            rate_limits: RateLimits {
                advertised_requests_per_minute: AdvertisedRate::Unlimited,
                ..RateLimits::default()
            },
            ..Status::default()
        };
        let v = serde_json::to_value(&unlimited).unwrap();
        assert_eq!(v["rate_limits"]["advertised_requests_per_minute"], "inf");
        assert_eq!(serde_json::from_value::<Status>(v).unwrap(), unlimited);
    }

    /// What scripts rely on: a field that does not apply is `null`, not missing, and whole
    /// numbers written as seconds stay floats (`60.0`), counts stay integers.
    #[test]
    fn nulls_are_written_and_number_kinds_kept() {
        let v = serde_json::to_value(Status::default()).unwrap();
        assert!(v.get("fleet").is_some_and(Value::is_null));
        assert!(v.get("upstream_quota").is_some_and(Value::is_null));
        assert!(v["rate_limits"]
            .get("advertised_requests_per_minute")
            .is_some_and(Value::is_null));
        assert!(v["cooldown"].get("kind").is_some_and(Value::is_null));
        let v = serde_json::to_value(full()).unwrap();
        assert!(v["daily"]["resets_in_seconds"].is_f64());
        assert!(v["tokens"]["available"].is_u64());
        assert!(v["cooldown"]["last_upstream_429"]["headers"][0].is_array());
    }

    /// An older proxy (fewer keys), a newer one (more keys, new words) and a document with a
    /// section of the wrong type all still read.
    #[test]
    fn older_newer_and_odd_documents_read() {
        let older = serde_json::json!({
            "version": "0.0.9", "state": "open",
            "limits": {"requests_per_minute": 50, "burst": 5},
            "daily": {"used": 3}
        });
        let s: Status = serde_json::from_value(older).unwrap();
        assert_eq!((s.daily.used, s.limits.burst), (3, 5));
        assert_eq!(s.fleet, None);
        let newer = serde_json::json!({
            "version": "9.0.0", "state": "a_new_state", "something_new": {"x": 1},
            "daily": {"used": 3, "new_field": true},
            "rate_limits": {"advertised_requests_per_minute": "inf"}
        });
        let s: Status = serde_json::from_value(newer).unwrap();
        assert_eq!(s.state, "a_new_state");
        assert_eq!(
            s.rate_limits.advertised_requests_per_minute,
            AdvertisedRate::Unlimited
        );
        let odd = serde_json::json!({
            "version": "0.1.0", "daily": "x", "limits": 5, "in_flight": -1,
            "cooldown": {"active": true, "last_upstream_429": {"headers": [["a", "1"], "junk", [2]]}}
        });
        let s: Status = serde_json::from_value(odd).unwrap();
        assert_eq!(s.version, "0.1.0");
        assert_eq!(s.daily, Daily::default());
        assert_eq!(s.in_flight, 0);
        let last = s.cooldown.last_upstream_429.unwrap();
        assert_eq!(last.headers, vec![("a".to_string(), "1".to_string())]);
    }
}

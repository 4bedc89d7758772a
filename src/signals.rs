//! Reading the rate-limit signals an upstream response carries: headers and bytes in,
//! plain values out.
//!
//! Owns: interpreting `Retry-After`, the `x-ratelimit-*` family (OpenAI style), the IETF
//! `RateLimit` field (draft-ietf-httpapi-ratelimit-headers, new and old shapes), Chutes'
//! own signals (whether a 429 is one model's or the account's, the kinds of 402, the
//! `X-Chutes-Quota-*` and `X-Chutes-RL-*` headers, the management API's usage body, the
//! 4-hour usage-cap window), and picking out the rate-limit headers worth logging.
//!
//! Does not own: what a hint does to the account (cooldown growth, clamping to
//! `cooldown.max`, logging an unparseable hint: all the caller's), the clock (the caller
//! passes `now_unix`), which model a request is for (`model.rs`), or building responses.
//! Nothing here does I/O or panics; hostile
//! header values produce `Hint::Unparseable` or `None`, and every delay saturates at
//! `u32::MAX` seconds instead of overflowing.

use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::HeaderMap;
use serde_json::Value;
use std::time::{Duration, UNIX_EPOCH};

/// Largest delay we ever return. Far beyond any sane cooldown (136 years), so the
/// caller's clamp to `cooldown.max` still sees "huge" and can log it as such.
const MAX_HINT_SECS: u64 = u32::MAX as u64;

/// A bare reset value above this is a UNIX timestamp in seconds, not a delay (1e9 s is
/// 2001-09-09; no upstream asks for a 31-year wait).
const EPOCH_SECS_THRESHOLD: f64 = 1e9;
/// ... and above this, a UNIX timestamp in milliseconds.
const EPOCH_MS_THRESHOLD: f64 = 1e12;

/// Header value length kept in `Hint::Unparseable`: enough to diagnose, bounded for logs.
const HINT_VALUE_CHARS: usize = 100;
const LOGGED_VALUE_CHARS: usize = 200;
const MAX_LOGGED_HEADERS: usize = 16;

/// Reset headers that carry a delay or instant, most specific first. The request-count
/// reset comes before the generic and token ones because the proxy budgets requests.
///
/// Names, not `&str`s, throughout: a lookup by `&str` parses and lower-cases the name again
/// on every call, and a response is looked at for a dozen of them (4% of the proxy's
/// instructions per request, callgrind, BENCHMARKS.md fourth session).
const RESET_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-reset-requests"),
    HeaderName::from_static("x-ratelimit-reset"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];
/// The pre-structured-field draft of the IETF header set (`RateLimit-Reset: 12`).
const OLD_DRAFT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
const REMAINING_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-remaining"),
    HeaderName::from_static("ratelimit-remaining"),
];
/// The IETF `RateLimit` field.
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const CHUTES_QUOTA_TOTAL: HeaderName = HeaderName::from_static("x-chutes-quota-total");
const CHUTES_QUOTA_USED: HeaderName = HeaderName::from_static("x-chutes-quota-used");
const CHUTES_QUOTA_REMAINING: HeaderName = HeaderName::from_static("x-chutes-quota-remaining");
const CHUTES_RL_USER: HeaderName = HeaderName::from_static("x-chutes-rl-user");
const CHUTES_RL_CHUTE: HeaderName = HeaderName::from_static("x-chutes-rl-chute");

/// What an upstream asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Hint {
    /// Stay away this long (already relative to `now_unix`; 0 for an instant in the past).
    After(Duration),
    /// A hint header was present but meant nothing we could read: `"name: value"` for a
    /// log line, the value cut to 100 characters.
    Unparseable(String),
}

/// What one header (or header family) said.
enum Found {
    Absent,
    Delay(Duration),
    /// Present but unreadable: the `"name: value"` text for `Hint::Unparseable`.
    Bad(String),
}

/// The first `max` characters of `s` (not bytes: never splits a character).
fn truncate_chars(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((cut, _)) => s.get(..cut).unwrap_or(s),
        None => s,
    }
}

fn bad(name: &str, value: &str) -> Found {
    Found::Bad(format!(
        "{name}: {}",
        truncate_chars(value, HINT_VALUE_CHARS)
    ))
}

/// Seconds as a `Duration`: the past (and NaN, e.g. from a garbage `now_unix`) is zero,
/// anything huge or infinite saturates at `MAX_HINT_SECS`.
fn saturating_secs(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    if secs >= MAX_HINT_SECS as f64 {
        return Duration::from_secs(MAX_HINT_SECS);
    }
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::from_secs(MAX_HINT_SECS))
}

fn cap(d: Duration) -> Duration {
    d.min(Duration::from_secs(MAX_HINT_SECS))
}

/// A plain non-negative decimal ("12", "1.5", ".5"). Deliberately stricter than
/// `f64::from_str`, which would also take "inf", "NaN", "-3" and "1e9".
/// May return +inf for absurdly long digit strings; `saturating_secs` handles that.
fn plain_number(s: &str) -> Option<f64> {
    let mut digits = 0usize;
    let mut dots = 0usize;
    for b in s.bytes() {
        match b {
            b'0'..=b'9' => digits += 1,
            b'.' => dots += 1,
            _ => return None,
        }
    }
    if digits == 0 || dots > 1 {
        return None;
    }
    s.parse::<f64>().ok().filter(|v| !v.is_nan())
}

fn http_date_unix(s: &str) -> Option<f64> {
    let t = httpdate::parse_http_date(s).ok()?;
    Some(match t.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_secs_f64(),
        // Before 1970: certainly in the past; the exact value does not matter.
        Err(before) => -before.duration().as_secs_f64(),
    })
}

/// `Retry-After`: delay-seconds (decimals tolerated) or an HTTP-date. A Go-style duration
/// ("30s") is not standard but costs nothing to understand.
fn parse_retry_after(value: &str, now_unix: f64) -> Option<Duration> {
    let v = value.trim();
    if let Some(secs) = plain_number(v) {
        return Some(saturating_secs(secs));
    }
    if let Some(at) = http_date_unix(v) {
        return Some(saturating_secs(at - now_unix));
    }
    if v.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        return crate::units::parse_duration(v).ok().map(cap);
    }
    None
}

/// `x-ratelimit-reset*` / `RateLimit-Reset`: seconds, an epoch in seconds or
/// milliseconds, a Go duration ("6m0s"), or an absolute RFC 3339 / HTTP date.
fn parse_reset(value: &str, now_unix: f64) -> Option<Duration> {
    let v = value.trim();
    if let Some(n) = plain_number(v) {
        let delay = if n > EPOCH_MS_THRESHOLD {
            n / 1_000.0 - now_unix
        } else if n > EPOCH_SECS_THRESHOLD {
            n - now_unix
        } else {
            n
        };
        return Some(saturating_secs(delay));
    }
    if let Some(at) = crate::units::parse_rfc3339(v).or_else(|| http_date_unix(v)) {
        return Some(saturating_secs(at - now_unix));
    }
    if v.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        return crate::units::parse_duration(v).ok().map(cap);
    }
    None
}

/// One header through one parser. Only the first value of a repeated header is read:
/// a repeated Retry-After is a broken upstream, and the first is as good as any.
fn single_header(
    headers: &HeaderMap,
    name: &HeaderName,
    now_unix: f64,
    parse: fn(&str, f64) -> Option<Duration>,
) -> Found {
    let Some(raw) = headers.get(name) else {
        return Found::Absent;
    };
    let value = String::from_utf8_lossy(raw.as_bytes());
    match parse(&value, now_unix) {
        Some(d) => Found::Delay(d),
        None => bad(name.as_str(), &value),
    }
}

/// One member of an IETF `RateLimit` field: its remaining quota `r` and reset `t`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct RateLimitItem {
    r: Option<f64>,
    t: Option<f64>,
}

/// Splits at `sep` outside double-quoted strings (policy names are sf-strings and may,
/// in principle, contain ',' or ';'). A backslash escapes the next character in a string.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if in_quotes && c == '\\' {
            escaped = true;
        } else if c == '"' {
            in_quotes = !in_quotes;
        } else if c == sep && !in_quotes {
            parts.push(s.get(start..i).unwrap_or_default());
            start = i + c.len_utf8();
        }
    }
    parts.push(s.get(start..).unwrap_or_default());
    parts
}

/// Applies one `key=value` parameter to `item`; false if the value is not a number.
/// `remaining`/`reset` are the older draft's dictionary keys for the same things.
fn apply_param(item: &mut RateLimitItem, key: &str, value: &str) -> bool {
    let slot = match key.trim().to_ascii_lowercase().as_str() {
        "r" | "remaining" => &mut item.r,
        "t" | "reset" => &mut item.t,
        _ => return true,
    };
    match plain_number(value.trim().trim_matches('"')) {
        Some(n) => {
            *slot = Some(n);
            true
        }
        None => false,
    }
}

/// Every `RateLimit` member, across all `RateLimit` header lines, plus whether any
/// number in it was unreadable.
///
/// Two shapes exist. The current draft: `"minute";r=0;t=12, "day";r=40;t=3600`, one item
/// per policy. The older draft: a dictionary `limit=10, remaining=0, reset=12` whose
/// members together describe one item; those are merged.
fn ratelimit_items(headers: &HeaderMap) -> Option<(Vec<RateLimitItem>, bool, String)> {
    let mut items = Vec::new();
    let mut dictionary = RateLimitItem::default();
    let mut saw_dictionary = false;
    let mut any_bad = false;
    let mut raw_values: Vec<String> = Vec::new();
    for raw in headers.get_all(&RATELIMIT) {
        let value = String::from_utf8_lossy(raw.as_bytes()).into_owned();
        for member in split_unquoted(&value, ',') {
            let member = member.trim();
            if member.is_empty() {
                continue;
            }
            let mut parts = split_unquoted(member, ';').into_iter();
            let head = parts.next().unwrap_or_default().trim();
            // A head that is itself `key=value` (and not a quoted name) is the old
            // dictionary shape.
            let dict_pair = (!head.starts_with('"'))
                .then(|| head.split_once('='))
                .flatten();
            if let Some((key, val)) = dict_pair {
                saw_dictionary = true;
                any_bad |= !apply_param(&mut dictionary, key, val);
                continue;
            }
            let mut item = RateLimitItem::default();
            for param in parts {
                if let Some((key, val)) = param.split_once('=') {
                    any_bad |= !apply_param(&mut item, key, val);
                }
            }
            items.push(item);
        }
        raw_values.push(value);
    }
    if raw_values.is_empty() {
        return None;
    }
    if saw_dictionary {
        items.push(dictionary);
    }
    Some((items, any_bad, raw_values.join(", ")))
}

fn is_zero(n: Option<f64>) -> bool {
    n == Some(0.0)
}

fn max_t<'a>(items: impl Iterator<Item = &'a RateLimitItem>) -> Option<f64> {
    items.filter_map(|i| i.t).reduce(f64::max)
}

/// The `RateLimit` field's delay for a 429: the largest `t` among exhausted (`r=0`)
/// policies, since all of them must reset before a request can pass; else the largest
/// `t` of any policy.
fn ratelimit_cooldown(headers: &HeaderMap) -> Found {
    let Some((items, _any_bad, raw)) = ratelimit_items(headers) else {
        return Found::Absent;
    };
    let t = max_t(items.iter().filter(|i| is_zero(i.r))).or_else(|| max_t(items.iter()));
    match t {
        Some(t) => Found::Delay(saturating_secs(t)),
        // Present but with no readable t at all: say so rather than pretend it is absent.
        None => bad("ratelimit", &raw),
    }
}

/// How long the upstream asks us to stay away, from a 429's headers. Preference:
/// Retry-After (delay-seconds incl. decimals, or HTTP-date via httpdate, relative to
/// now_unix), then x-ratelimit-reset-requests, x-ratelimit-reset, x-ratelimit-reset-tokens
/// (values: plain seconds, decimal seconds, Go-style durations like "6m0s"/"1h2m3.5s"/
/// "450ms", or an epoch timestamp in seconds (> 1_000_000_000) or ms (> 1e12) turned into a
/// delay from now_unix), then the IETF RateLimit header's t= (take the largest t among
/// items with r=0, else the largest t) and the older draft `RateLimit-Reset: 12`.
/// Returns None when no such header exists. A past HTTP-date/epoch gives After(0).
/// Negative, NaN, non-numeric gives Unparseable. Large values are not clamped (the caller
/// clamps to its max and logs) but saturate at `u32::MAX` seconds.
///
/// When a preferred header is unreadable but a later one is fine, the later one wins: a
/// real upstream hint beats the computed fallback. `Unparseable` (naming the first bad
/// header) is returned only when no header could be read.
pub fn cooldown_hint(headers: &HeaderMap, now_unix: f64) -> Option<Hint> {
    let mut first_bad: Option<String> = None;
    let mut consider = |found: Found| -> Option<Duration> {
        match found {
            Found::Absent => None,
            Found::Delay(d) => Some(d),
            Found::Bad(text) => {
                first_bad.get_or_insert(text);
                None
            }
        }
    };
    let delay = consider(single_header(
        headers,
        &RETRY_AFTER,
        now_unix,
        parse_retry_after,
    ))
    .or_else(|| {
        RESET_HEADERS
            .iter()
            .find_map(|name| consider(single_header(headers, name, now_unix, parse_reset)))
    })
    .or_else(|| consider(ratelimit_cooldown(headers)))
    .or_else(|| {
        consider(single_header(
            headers,
            &OLD_DRAFT_RESET,
            now_unix,
            parse_reset,
        ))
    });
    match delay {
        Some(d) => Some(Hint::After(d)),
        None => first_bad.map(Hint::Unparseable),
    }
}

/// On a SUCCESS response: Some(reset delay) if the upstream says we have no requests left:
/// `x-ratelimit-remaining` or `x-ratelimit-remaining-requests` == 0 (with the delay from
/// the reset headers as above; None when the delay is unknown), or a RateLimit item with
/// r=0 and t=N. None otherwise (remaining > 0, absent, garbage).
///
/// The old draft's `RateLimit-Remaining: 0` with `RateLimit-Reset` counts too. If several
/// signals say "exhausted", the longest delay wins: every exhausted window must reset.
/// `Retry-After` is ignored here; on a success it is not about our budget.
pub fn exhausted_hint(headers: &HeaderMap, now_unix: f64) -> Option<Duration> {
    let exhausted = REMAINING_HEADERS.iter().any(|name| {
        headers.get_all(name).iter().any(|raw| {
            let value = String::from_utf8_lossy(raw.as_bytes());
            is_zero(plain_number(value.trim()))
        })
    });
    let from_reset_headers = if exhausted {
        RESET_HEADERS
            .iter()
            .chain(std::iter::once(&OLD_DRAFT_RESET))
            .find_map(
                |name| match single_header(headers, name, now_unix, parse_reset) {
                    Found::Delay(d) => Some(d),
                    Found::Absent | Found::Bad(_) => None,
                },
            )
    } else {
        None
    };
    let from_ratelimit = ratelimit_items(headers)
        .and_then(|(items, _, _)| max_t(items.iter().filter(|i| is_zero(i.r))))
        .map(saturating_secs);
    match (from_reset_headers, from_ratelimit) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// An upstream 402 that means "daily quota spent" (as opposed to any other 402).
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaExceeded {
    /// When the quota comes back, if the upstream said (UNIX seconds).
    pub reset_unix: Option<f64>,
}

fn mentions_quota(text: &str) -> bool {
    text.to_ascii_lowercase().contains("quota")
}

/// `quota_reset_timestamp` as UNIX seconds: an RFC 3339 string (what Chutes sends) or,
/// defensively, a non-negative epoch number in seconds or milliseconds.
fn reset_timestamp(v: &Value) -> Option<f64> {
    match v {
        Value::String(s) => crate::units::parse_rfc3339(s),
        Value::Number(n) => {
            let n = n.as_f64().filter(|n| n.is_finite() && *n >= 0.0)?;
            Some(if n > EPOCH_MS_THRESHOLD {
                n / 1_000.0
            } else {
                n
            })
        }
        _ => None,
    }
}

/// Upstream 402 body: Chutes sends {"detail":{"message":"Quota exceeded ...",
/// "quota_reset_timestamp":"2025-09-13T00:00:00+00:00"}}; also accepts "detail" as a plain
/// string mentioning quota. Returns None if the body is not a quota message
/// (case-insensitive "quota" in the message). Some(QuotaExceeded{reset_unix}) otherwise,
/// the reset from quota_reset_timestamp via `crate::units::parse_rfc3339` if present and
/// valid.
///
/// Also recognised: the same object under "error" (OpenAI's shape) or at the top level,
/// and an object with a non-null `quota_reset_timestamp` even if its message is worded
/// without "quota". A body that is not JSON is never a quota message.
///
/// A thin view of [`classify_402`]: only its `DailyQuota` kind is a quota message.
pub fn quota_exceeded(body: &[u8]) -> Option<QuotaExceeded> {
    match classify_402(body) {
        Kind402::DailyQuota { reset_unix } => Some(QuotaExceeded { reset_unix }),
        Kind402::UsageCap | Kind402::Other => None,
    }
}

/// What an upstream 429 is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope429 {
    /// One model (chute) has no free capacity: JSON `detail` (or `error`, string or
    /// {message}) naming capacity ("Infrastructure is at maximum capacity, try again
    /// later"), "no instances available", "model is under maintenance"; case-insensitive;
    /// table-driven phrases ([`CAPACITY_PHRASES`]).
    Model,
    /// Everything else: the edge's nginx HTML page, other JSON, empty, garbage.
    Account,
}

/// Lowercase phrases that make a JSON 429 a model's, not the account's. Deliberately
/// specific: a bare "capacity" or "limit" could be an account message ("rate limit
/// capacity exceeded"), and mistaking an account 429 for a model's would keep the account
/// sending into a ban that doubles. Misreading the other way only cools too much.
pub const CAPACITY_PHRASES: &[&str] = &[
    "maximum capacity",
    "at capacity",
    "no instances available",
    "no available instances",
    "under maintenance",
];

/// Lowercase phrase of Chutes' subscription spending-cap 402 ("Subscription usage cap
/// exceeded. Please add balance to continue.").
const USAGE_CAP_PHRASE: &str = "usage cap";

/// The human-readable messages a JSON error body carries, in the places the upstreams we
/// know put them: FastAPI's `detail` and OpenAI's `error`, each a string or an object with
/// a `message`; a top-level `message`; the body itself when it is a JSON string.
fn messages(root: &Value) -> impl Iterator<Item = &str> {
    let nested = ["detail", "error"]
        .into_iter()
        .filter_map(|key| match root.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            Some(Value::Object(obj)) => obj.get("message").and_then(Value::as_str),
            _ => None,
        });
    let top = root.get("message").and_then(Value::as_str);
    nested.chain(top).chain(root.as_str())
}

fn contains_ignore_case(text: &str, lowercase_phrase: &str) -> bool {
    text.to_ascii_lowercase().contains(lowercase_phrase)
}

/// What an upstream 429 is about, from its body. Only a JSON body can be a model's: the
/// edge's HTML page is the account's whatever words it contains, and so is anything that
/// does not parse (an empty body, a truncated one, garbage).
pub fn classify_429(body: &[u8]) -> Scope429 {
    let Ok(root) = serde_json::from_slice::<Value>(body) else {
        return Scope429::Account;
    };
    let names_capacity = messages(&root).any(|m| {
        let lower = m.to_ascii_lowercase();
        CAPACITY_PHRASES.iter().any(|p| lower.contains(p))
    });
    if names_capacity {
        Scope429::Model
    } else {
        Scope429::Account
    }
}

/// The kinds of upstream 402 (see CONTRACT.md, "Upstream rate-limit signals").
#[derive(Debug, Clone, PartialEq)]
pub enum Kind402 {
    /// The daily quota is spent: `{"detail":{"message":"Quota exceeded ...",
    /// "quota_reset_timestamp":"..."}}` (reset as UNIX seconds when parseable).
    DailyQuota { reset_unix: Option<f64> },
    /// "Subscription usage cap exceeded. Please add balance to continue." (the plan's
    /// 4-hourly / monthly spending cap).
    UsageCap,
    /// Anything else (e.g. "TEE models require an active subscription or positive
    /// balance.", "This model requires a higher subscription tier or positive balance."):
    /// passed through, closes nothing.
    Other,
}

/// What an upstream 402 means, from its body.
///
/// An object (under `detail`, `error`, or the body itself) with a non-null
/// `quota_reset_timestamp` is the daily quota whatever its wording: the timestamp is the
/// quota's own field. Otherwise a message naming the usage cap is `UsageCap`, one
/// mentioning "quota" is `DailyQuota` (case-insensitive both). The first candidate that
/// says anything wins. A body that is not JSON is `Other`: it passes through and closes
/// nothing, which is the harmless way to be wrong.
pub fn classify_402(body: &[u8]) -> Kind402 {
    let Ok(root) = serde_json::from_slice::<Value>(body) else {
        return Kind402::Other;
    };
    let objects = [root.get("detail"), root.get("error"), Some(&root)];
    for obj in objects.into_iter().flatten().filter_map(Value::as_object) {
        if let Some(ts) = obj.get("quota_reset_timestamp").filter(|v| !v.is_null()) {
            return Kind402::DailyQuota {
                reset_unix: reset_timestamp(ts),
            };
        }
    }
    for message in messages(&root) {
        if contains_ignore_case(message, USAGE_CAP_PHRASE) {
            return Kind402::UsageCap;
        }
        if mentions_quota(message) {
            return Kind402::DailyQuota { reset_unix: None };
        }
    }
    Kind402::Other
}

/// Largest daily-quota figure believed from the upstream. The biggest plan is 5000 a day;
/// ten million is far beyond any plan, so a larger figure is a broken header, not a quota
/// (and keeps the proxy's arithmetic far from overflow).
pub const MAX_QUOTA_FIGURE: u64 = 10_000_000;

/// Largest advertised rate believed, per minute. Above it the "limit" is no limit anyone
/// could reach through one proxy; treating it as malformed costs nothing.
pub const MAX_ADVERTISED_RPM: u64 = 1_000_000;

/// Length of the plan's spending-cap window: fixed 4-hour UTC windows from 00:00.
pub const USAGE_WINDOW_SECS: f64 = 4.0 * 3_600.0;

/// A non-negative integer as Chutes writes counts: "812", or an integral float "812.0"
/// (Python's `str(float)`); at most `max`. Stricter than `f64::from_str` on purpose:
/// "1e3", "+5", "-0", "812.5", "inf" and spaces inside are all malformed.
fn count(s: &str, max: u64) -> Option<u64> {
    let s = s.trim().as_bytes();
    // A byte loop rather than `split_once` and `parse`: every Chutes answer carries five of
    // these (BENCHMARKS.md, seventh session).
    let (int, frac) = match s.iter().position(|&b| b == b'.') {
        Some(dot) => (&s[..dot], Some(&s[dot + 1..])),
        None => (s, None),
    };
    let integral = frac.is_none_or(|f| !f.is_empty() && f.iter().all(|&b| b == b'0'));
    if int.is_empty() || !integral {
        return None;
    }
    let mut n: u64 = 0;
    for &b in int {
        if !b.is_ascii_digit() {
            return None;
        }
        // Overflow is absurd, like anything above `max`.
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    (n <= max).then_some(n)
}

/// One header's value as text; a value that is not visible ASCII is malformed.
fn header_text(value: Option<&HeaderValue>) -> Option<&str> {
    value?.to_str().ok()
}

/// Chutes' quota snapshot headers (taken before the call): X-Chutes-Quota-Total, -Used,
/// -Remaining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChutesQuota {
    pub total: u64,
    pub used: u64,
    pub remaining: Option<u64>,
}

/// None when Total or Used is absent, not a non-negative integer (Used may be sent as
/// "812.0": an integral float is accepted), or absurd (above [`MAX_QUOTA_FIGURE`]);
/// Remaining is optional and ignored (None) if malformed. `Total: 0` is returned as is:
/// whether it gates anything (it does not: the account pays as it goes) is the caller's.
pub fn chutes_quota(headers: &HeaderMap) -> Option<ChutesQuota> {
    Carried::of(headers).chutes_quota()
}

/// A rate limit the upstream says is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdvertisedRate {
    PerMinute(std::num::NonZeroU32),
    Unlimited,
}

fn advertised_rate(value: &str) -> Option<AdvertisedRate> {
    let v = value.trim();
    if v.eq_ignore_ascii_case("inf") || v.eq_ignore_ascii_case("infinity") {
        return Some(AdvertisedRate::Unlimited);
    }
    let n = count(v, MAX_ADVERTISED_RPM)?;
    let n = std::num::NonZeroU32::new(u32::try_from(n).ok()?)?;
    Some(AdvertisedRate::PerMinute(n))
}

/// X-Chutes-RL-User and X-Chutes-RL-Chute (requests per minute, or "inf"), in that order;
/// each None when absent or malformed (0, negative, text, above [`MAX_ADVERTISED_RPM`]).
/// "60.0" reads as 60, like the quota figures.
pub fn advertised_rates(headers: &HeaderMap) -> (Option<AdvertisedRate>, Option<AdvertisedRate>) {
    Carried::of(headers).advertised_rates()
}

/// What an upstream answer's headers carry for the signal readers, from one pass over them.
///
/// Every answer is read for Chutes' quota and rate headers and, on a success, for the
/// exhaustion family. Looked up by name, that would cost seven hashed lookups for an answer
/// with none of them, nine with all of Chutes'. One walk over the headers (an answer has a
/// handful) keeps the first value of each of Chutes' five, which [`Carried::chutes_quota`]
/// and [`Carried::advertised_rates`] read, and says whether [`exhausted_hint`] can find
/// anything. When [`Carried::exhaustion`] is false, none of the names that make that reader
/// read anything is present, so it returns `None` and skipping it changes no result (test
/// `a_reader_skipped_by_the_scan_would_have_found_nothing`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried<'a> {
    quota_total: Option<&'a HeaderValue>,
    quota_used: Option<&'a HeaderValue>,
    quota_remaining: Option<&'a HeaderValue>,
    rl_user: Option<&'a HeaderValue>,
    rl_chute: Option<&'a HeaderValue>,
    chutes: bool,
    exhaustion: bool,
}

impl<'a> Carried<'a> {
    /// What `headers` carry. A repeated header is read at its first value, as
    /// `HeaderMap::get` would. A reader that starts looking at a name outside `x-chutes-*`,
    /// [`REMAINING_HEADERS`] and [`RATELIMIT`] must be taught here too.
    pub fn of(headers: &'a HeaderMap) -> Carried<'a> {
        let mut carried = Carried::default();
        for (name, value) in headers {
            let name = name.as_str();
            if name.starts_with("x-chutes-") {
                carried.chutes = true;
                let slot = if name == CHUTES_QUOTA_TOTAL.as_str() {
                    &mut carried.quota_total
                } else if name == CHUTES_QUOTA_USED.as_str() {
                    &mut carried.quota_used
                } else if name == CHUTES_QUOTA_REMAINING.as_str() {
                    &mut carried.quota_remaining
                } else if name == CHUTES_RL_USER.as_str() {
                    &mut carried.rl_user
                } else if name == CHUTES_RL_CHUTE.as_str() {
                    &mut carried.rl_chute
                } else {
                    continue;
                };
                slot.get_or_insert(value);
            } else {
                carried.exhaustion |= name == RATELIMIT.as_str()
                    || REMAINING_HEADERS.iter().any(|n| n.as_str() == name);
            }
        }
        carried
    }

    /// Any `X-Chutes-*` header: [`Carried::chutes_quota`] and [`Carried::advertised_rates`]
    /// may find something.
    pub fn chutes(&self) -> bool {
        self.chutes
    }

    /// A remaining-count header or the `RateLimit` field: [`exhausted_hint`] may find
    /// something (without one, it never reads the reset headers).
    pub fn exhaustion(&self) -> bool {
        self.exhaustion
    }

    /// [`chutes_quota`], from the values this walk kept.
    pub fn chutes_quota(&self) -> Option<ChutesQuota> {
        let figure = |v| header_text(v).and_then(|v| count(v, MAX_QUOTA_FIGURE));
        Some(ChutesQuota {
            total: figure(self.quota_total)?,
            used: figure(self.quota_used)?,
            remaining: figure(self.quota_remaining),
        })
    }

    /// [`advertised_rates`], from the values this walk kept.
    pub fn advertised_rates(&self) -> (Option<AdvertisedRate>, Option<AdvertisedRate>) {
        let rate = |v| header_text(v).and_then(advertised_rate);
        (rate(self.rl_user), rate(self.rl_chute))
    }
}

/// The next fixed 4-hour UTC window boundary (00:00, 04:00, ... 20:00) strictly after
/// `now_unix` (exact for any time a clock can show; past about 2^52 s the float spacing
/// exceeds 4 hours and the result is merely not before `now_unix`). Non-finite in,
/// non-finite out (NaN stays NaN): the caller's clock is garbage then, and no boundary is
/// better than a made-up one.
pub fn next_usage_window_unix(now_unix: f64) -> f64 {
    let next = ((now_unix / USAGE_WINDOW_SECS).floor() + 1.0) * USAGE_WINDOW_SECS;
    // For absurd clocks rounding can land on or before `now_unix`; then a window from now
    // is as good as anything (and saturates at `now_unix` itself rather than going back).
    if next > now_unix {
        next
    } else {
        now_unix + USAGE_WINDOW_SECS
    }
}

/// The management API's usage answer.
#[derive(serde::Deserialize)]
struct QuotaUsage {
    quota: f64,
    used: f64,
}

/// The management API's usage answer `{"quota": 5000, "used": 812.0}` → (quota, used).
/// None when not a JSON object, a field is missing or not a number, or a figure is
/// negative, non-finite or above [`MAX_QUOTA_FIGURE`]. `used` is a float upstream; a
/// fractional one is rounded up and a fractional quota down, so the proxy never believes
/// it has more left than it has. Other fields are ignored.
pub fn quota_usage(body: &[u8]) -> Option<(u64, u64)> {
    // serde would also read a struct from a JSON array (`[5000, 812]`); that is not the
    // answer's shape.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let u: QuotaUsage = serde_json::from_slice(body).ok()?;
    let figure = |v: f64| {
        (v.is_finite() && (0.0..=MAX_QUOTA_FIGURE as f64).contains(&v)).then_some(v as u64)
    };
    Some((figure(u.quota.floor())?, figure(u.used.ceil())?))
}

fn is_rate_limit_header(name: &str) -> bool {
    name == "retry-after"
        || name == "retry-after-ms"
        || name.starts_with("x-ratelimit-")
        || name.starts_with("ratelimit")
}

/// Rate-limit related headers of an upstream response, for logs and /status: retry-after
/// (and retry-after-ms), x-ratelimit-*, ratelimit*, each as (lowercase name, value
/// lossy-utf8 truncated to 200 chars); at most 16 entries, in the header map's order.
pub fn rate_limit_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| is_rate_limit_header(name.as_str()))
        .take(MAX_LOGGED_HEADERS)
        .map(|(name, value)| {
            let text = String::from_utf8_lossy(value.as_bytes());
            (
                name.as_str().to_owned(),
                truncate_chars(&text, LOGGED_VALUE_CHARS).to_owned(),
            )
        })
        .collect()
}

/// First `max` bytes of a body as text: lossy UTF-8; a character cut at the end becomes
/// U+FFFD, which is fine for a log line or an error body excerpt.
pub fn body_snippet(body: &[u8], max: usize) -> String {
    let cut = body.get(..max).unwrap_or(body);
    String::from_utf8_lossy(cut).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderName, HeaderValue};

    const NOW: f64 = 1_757_721_600.0; // 2025-09-13T00:00:00Z

    /// Header (name, raw value) pairs, as a test case spells a response.
    type Pairs<'a> = &'a [(&'a str, &'a [u8])];
    /// (label, body, expected `reset_unix` if it is a quota message)
    type QuotaCase<'a> = (&'a str, &'a [u8], Option<Option<f64>>);

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("test header name"),
                HeaderValue::from_bytes(value).expect("test header value"),
            );
        }
        map
    }

    fn after_ms(ms: u64) -> Option<Hint> {
        Some(Hint::After(Duration::from_millis(ms)))
    }

    fn after(secs: u64) -> Option<Hint> {
        Some(Hint::After(Duration::from_secs(secs)))
    }

    fn bad_hint(text: &str) -> Option<Hint> {
        Some(Hint::Unparseable(text.to_owned()))
    }

    const MAX: u64 = u32::MAX as u64;

    #[test]
    fn cooldown_hint_table() {
        let nines = "9".repeat(400);
        let cases: &[(&str, Pairs, Option<Hint>)] = &[
            ("nothing", &[], None),
            ("unrelated", &[("content-type", b"text/html")], None),
            ("retry-after seconds", &[("retry-after", b"12")], after(12)),
            ("retry-after zero", &[("retry-after", b"0")], after(0)),
            (
                "retry-after decimal",
                &[("retry-after", b"1.5")],
                after_ms(1_500),
            ),
            ("retry-after spaces", &[("retry-after", b"  7 ")], after(7)),
            (
                "retry-after http-date",
                &[("retry-after", b"Sat, 13 Sep 2025 00:01:00 GMT")],
                after(60),
            ),
            (
                "retry-after past date",
                &[("retry-after", b"Wed, 21 Oct 2015 07:28:00 GMT")],
                after(0),
            ),
            (
                "retry-after pre-1970 date",
                &[("retry-after", b"Thu, 01 Jan 1960 00:00:00 GMT")],
                // httpdate refuses years before 1970; nothing real sends one.
                bad_hint("retry-after: Thu, 01 Jan 1960 00:00:00 GMT"),
            ),
            (
                "retry-after go duration",
                &[("retry-after", b"1m30s")],
                after(90),
            ),
            (
                "retry-after huge saturates",
                &[("retry-after", b"99999999999999999999")],
                after(MAX),
            ),
            (
                "retry-after absurdly long saturates",
                &[("retry-after", nines.as_bytes())],
                after(MAX),
            ),
            (
                "retry-after negative",
                &[("retry-after", b"-5")],
                bad_hint("retry-after: -5"),
            ),
            (
                "retry-after NaN",
                &[("retry-after", b"NaN")],
                bad_hint("retry-after: NaN"),
            ),
            (
                "retry-after inf",
                &[("retry-after", b"inf")],
                bad_hint("retry-after: inf"),
            ),
            (
                "retry-after exp",
                &[("retry-after", b"1e3")],
                bad_hint("retry-after: 1e3"),
            ),
            (
                "retry-after empty",
                &[("retry-after", b"")],
                bad_hint("retry-after: "),
            ),
            (
                "retry-after text",
                &[("retry-after", b"soon")],
                bad_hint("retry-after: soon"),
            ),
            (
                "retry-after obs-text",
                &[("retry-after", b"\xff\xfe")],
                bad_hint("retry-after: \u{fffd}\u{fffd}"),
            ),
            (
                "retry-after wins over reset",
                &[("retry-after", b"5"), ("x-ratelimit-reset-requests", b"50")],
                after(5),
            ),
            (
                "bad retry-after falls through to reset",
                &[("retry-after", b"later"), ("x-ratelimit-reset", b"9")],
                after(9),
            ),
            (
                "reset-requests go",
                &[("x-ratelimit-reset-requests", b"6m0s")],
                after(360),
            ),
            (
                "reset-requests compound",
                &[("x-ratelimit-reset-requests", b"1h2m3.5s")],
                after_ms(3_723_500),
            ),
            (
                "reset-requests ms",
                &[("x-ratelimit-reset-requests", b"450ms")],
                after_ms(450),
            ),
            ("reset plain", &[("x-ratelimit-reset", b"30")], after(30)),
            (
                "reset decimal",
                &[("x-ratelimit-reset", b"2.25")],
                after_ms(2_250),
            ),
            (
                "reset epoch secs",
                &[("x-ratelimit-reset", b"1757721645")],
                after(45),
            ),
            (
                "reset epoch ms",
                &[("x-ratelimit-reset", b"1757721645500")],
                after_ms(45_500),
            ),
            (
                "reset epoch past",
                &[("x-ratelimit-reset", b"1600000000")],
                after(0),
            ),
            (
                "reset epoch ms past",
                &[("x-ratelimit-reset", b"1600000000000")],
                after(0),
            ),
            (
                "reset rfc3339",
                &[("x-ratelimit-reset", b"2025-09-13T00:00:30Z")],
                after(30),
            ),
            (
                "reset just under epoch threshold",
                &[("x-ratelimit-reset", b"1000000000")],
                after(1_000_000_000),
            ),
            (
                "reset-requests preferred over reset",
                &[
                    ("x-ratelimit-reset", b"100"),
                    ("x-ratelimit-reset-requests", b"10s"),
                ],
                after(10),
            ),
            (
                "reset preferred over reset-tokens",
                &[
                    ("x-ratelimit-reset-tokens", b"1s"),
                    ("x-ratelimit-reset", b"20"),
                ],
                after(20),
            ),
            (
                "reset-tokens alone",
                &[("x-ratelimit-reset-tokens", b"3s")],
                after(3),
            ),
            (
                "reset negative",
                &[("x-ratelimit-reset", b"-30")],
                bad_hint("x-ratelimit-reset: -30"),
            ),
            (
                "reset garbage",
                &[("x-ratelimit-reset-requests", b"6 minutes")],
                bad_hint("x-ratelimit-reset-requests: 6 minutes"),
            ),
            (
                // Beyond u64 seconds a duration is nonsense, not a long wait.
                "reset go overflow",
                &[("x-ratelimit-reset", b"99999999999999999999999h")],
                bad_hint("x-ratelimit-reset: 99999999999999999999999h"),
            ),
            (
                "reset go huge saturates",
                &[("x-ratelimit-reset", b"9999999999h")],
                after(MAX),
            ),
            (
                "ratelimit single",
                &[("ratelimit", b"\"minute\";r=0;t=12")],
                after(12),
            ),
            (
                "ratelimit token name",
                &[("ratelimit", b"minute;r=0;t=12")],
                after(12),
            ),
            (
                "ratelimit largest exhausted t",
                &[(
                    "ratelimit",
                    b"\"minute\";r=0;t=12, \"day\";r=0;t=3600, \"hour\";r=5;t=9999",
                )],
                after(3_600),
            ),
            (
                "ratelimit none exhausted: largest t",
                &[("ratelimit", b"\"minute\";r=3;t=12, \"day\";r=9;t=300")],
                after(300),
            ),
            (
                "ratelimit across header lines",
                &[
                    ("ratelimit", b"\"minute\";r=4;t=12"),
                    ("ratelimit", b"\"day\";r=0;t=40"),
                ],
                after(40),
            ),
            (
                "ratelimit quoted comma and semicolon",
                &[("ratelimit", b"\"a,b;c\";r=0;t=7")],
                after(7),
            ),
            (
                "ratelimit spaces and case",
                &[("ratelimit", b" \"minute\" ; R=0 ; T=8 ")],
                after(8),
            ),
            (
                "ratelimit old dictionary",
                &[("ratelimit", b"limit=10, remaining=0, reset=15")],
                after(15),
            ),
            (
                "ratelimit no t",
                &[("ratelimit", b"\"minute\";r=0")],
                bad_hint("ratelimit: \"minute\";r=0"),
            ),
            (
                "ratelimit bad t",
                &[("ratelimit", b"\"minute\";r=0;t=soon")],
                bad_hint("ratelimit: \"minute\";r=0;t=soon"),
            ),
            (
                "ratelimit one bad t among good",
                &[("ratelimit", b"\"minute\";r=0;t=-1, \"day\";r=0;t=60")],
                after(60),
            ),
            (
                "ratelimit garbage",
                &[("ratelimit", b",,;;==\"")],
                bad_hint("ratelimit: ,,;;==\""),
            ),
            ("old draft reset", &[("ratelimit-reset", b"12")], after(12)),
            (
                "ratelimit preferred over old draft",
                &[("ratelimit-reset", b"99"), ("ratelimit", b"\"m\";r=0;t=3")],
                after(3),
            ),
            (
                "all bad: first bad is reported",
                &[
                    ("x-ratelimit-reset", b"x"),
                    ("retry-after", b"y"),
                    ("ratelimit-reset", b"z"),
                ],
                bad_hint("retry-after: y"),
            ),
        ];
        for (label, pairs, want) in cases {
            assert_eq!(&cooldown_hint(&headers(pairs), NOW), want, "{label}");
        }
    }

    #[test]
    fn unparseable_value_is_truncated() {
        let long = "x".repeat(500);
        let got = cooldown_hint(&headers(&[("retry-after", long.as_bytes())]), NOW);
        assert_eq!(got, bad_hint(&format!("retry-after: {}", "x".repeat(100))));
    }

    #[test]
    fn garbage_clock_never_panics() {
        let map = headers(&[
            ("retry-after", b"Sat, 13 Sep 2025 00:01:00 GMT"),
            ("x-ratelimit-reset", b"1757721645"),
        ]);
        for now in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -1e300,
            1e300,
            0.0,
        ] {
            let _ = cooldown_hint(&map, now);
            let _ = exhausted_hint(&map, now);
        }
        assert_eq!(cooldown_hint(&map, f64::NEG_INFINITY), after(MAX));
        assert_eq!(cooldown_hint(&map, f64::NAN), after(0));
    }

    #[test]
    fn exhausted_hint_table() {
        let secs = |n: u64| Some(Duration::from_secs(n));
        let cases: &[(&str, Pairs, Option<Duration>)] = &[
            ("nothing", &[], None),
            (
                "remaining-requests 0 with reset",
                &[
                    ("x-ratelimit-remaining-requests", b"0"),
                    ("x-ratelimit-reset-requests", b"12s"),
                ],
                secs(12),
            ),
            (
                "remaining 0 with epoch reset",
                &[
                    ("x-ratelimit-remaining", b"0"),
                    ("x-ratelimit-reset", b"1757721660"),
                ],
                secs(60),
            ),
            (
                "remaining 0.0 counts as zero",
                &[
                    ("x-ratelimit-remaining", b"0.0"),
                    ("x-ratelimit-reset", b"5"),
                ],
                secs(5),
            ),
            (
                "remaining 0 without any reset is unknown",
                &[("x-ratelimit-remaining-requests", b"0")],
                None,
            ),
            (
                "remaining 0 with garbage reset is unknown",
                &[
                    ("x-ratelimit-remaining", b"0"),
                    ("x-ratelimit-reset", b"eventually"),
                ],
                None,
            ),
            (
                "remaining 0 ignores retry-after",
                &[("x-ratelimit-remaining", b"0"), ("retry-after", b"5")],
                None,
            ),
            (
                "remaining 0 with garbage preferred reset falls through",
                &[
                    ("x-ratelimit-remaining-requests", b"0"),
                    ("x-ratelimit-reset-requests", b"?"),
                    ("x-ratelimit-reset", b"7"),
                ],
                secs(7),
            ),
            (
                "remaining > 0",
                &[
                    ("x-ratelimit-remaining-requests", b"3"),
                    ("x-ratelimit-reset-requests", b"12s"),
                ],
                None,
            ),
            (
                "remaining garbage",
                &[
                    ("x-ratelimit-remaining", b"zero"),
                    ("x-ratelimit-reset", b"12"),
                ],
                None,
            ),
            (
                "remaining negative",
                &[
                    ("x-ratelimit-remaining", b"-0"),
                    ("x-ratelimit-reset", b"12"),
                ],
                None,
            ),
            (
                "only tokens exhausted does not count",
                &[
                    ("x-ratelimit-remaining-tokens", b"0"),
                    ("x-ratelimit-reset-tokens", b"12s"),
                ],
                None,
            ),
            (
                "old draft remaining 0",
                &[("ratelimit-remaining", b"0"), ("ratelimit-reset", b"30")],
                secs(30),
            ),
            (
                "ratelimit r=0",
                &[("ratelimit", b"\"minute\";r=0;t=12")],
                secs(12),
            ),
            (
                "ratelimit r=0 without t",
                &[("ratelimit", b"\"minute\";r=0")],
                None,
            ),
            (
                "ratelimit r>0",
                &[("ratelimit", b"\"minute\";r=3;t=12")],
                None,
            ),
            (
                "ratelimit largest exhausted",
                &[(
                    "ratelimit",
                    b"\"minute\";r=0;t=12, \"day\";r=0;t=900, \"x\";r=1;t=5000",
                )],
                secs(900),
            ),
            (
                "ratelimit old dictionary",
                &[("ratelimit", b"limit=10, remaining=0, reset=15")],
                secs(15),
            ),
            (
                "both sources: longest wins",
                &[
                    ("x-ratelimit-remaining", b"0"),
                    ("x-ratelimit-reset", b"10"),
                    ("ratelimit", b"\"day\";r=0;t=20"),
                ],
                secs(20),
            ),
            ("ratelimit garbage", &[("ratelimit", b"r=;t=")], None),
        ];
        for (label, pairs, want) in cases {
            assert_eq!(exhausted_hint(&headers(pairs), NOW), *want, "{label}");
        }
    }

    #[test]
    fn quota_exceeded_table() {
        let cases: &[QuotaCase] = &[
            (
                "chutes shape",
                br#"{"detail":{"message":"Quota exceeded for today","quota_reset_timestamp":"2025-09-13T00:00:00+00:00"}}"#,
                Some(Some(NOW)),
            ),
            (
                "chutes shape, bad timestamp",
                br#"{"detail":{"message":"Quota exceeded","quota_reset_timestamp":"tomorrow"}}"#,
                Some(None),
            ),
            (
                "chutes shape, null timestamp",
                br#"{"detail":{"message":"QUOTA exceeded","quota_reset_timestamp":null}}"#,
                Some(None),
            ),
            (
                "epoch number timestamp",
                br#"{"detail":{"message":"quota","quota_reset_timestamp":1757721600}}"#,
                Some(Some(NOW)),
            ),
            (
                "epoch ms timestamp",
                br#"{"detail":{"message":"quota","quota_reset_timestamp":1757721600000}}"#,
                Some(Some(NOW)),
            ),
            (
                "negative timestamp",
                br#"{"detail":{"message":"quota","quota_reset_timestamp":-5}}"#,
                Some(None),
            ),
            (
                "timestamp without quota wording",
                br#"{"detail":{"message":"Limit reached","quota_reset_timestamp":"2025-09-13T00:00:00Z"}}"#,
                Some(Some(NOW)),
            ),
            (
                "detail string",
                br#"{"detail":"Daily quota exceeded, add balance"}"#,
                Some(None),
            ),
            (
                "openai shape",
                br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota"}}"#,
                Some(None),
            ),
            ("top-level message", br#"{"message":"quota exceeded"}"#, Some(None)),
            ("other 402", br#"{"detail":"Insufficient balance"}"#, None),
            ("other 402 object", br#"{"detail":{"message":"Payment required"}}"#, None),
            ("message not a string", br#"{"detail":{"message":["quota"]}}"#, None),
            ("detail array", br#"{"detail":[{"msg":"quota"}]}"#, None),
            ("not json", b"Quota exceeded", None),
            ("html", b"<html>402 quota</html>", None),
            ("empty", b"", None),
            ("json string", br#""quota""#, Some(None)),
            ("json number", b"402", None),
            ("invalid utf8", b"\xff\xfe{", None),
            ("truncated", br#"{"detail":{"message":"Quota exc"#, None),
        ];
        for (label, body, want) in cases {
            let got = quota_exceeded(body).map(|q| q.reset_unix);
            assert_eq!(got, *want, "{label}");
        }
    }

    /// nginx's stock 429 page, as Chutes' edge sends it.
    const NGINX_429: &[u8] = b"<html>\r\n<head><title>429 Too Many Requests</title></head>\r\n<body>\r\n<center><h1>429 Too Many Requests</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

    /// Bodies no parser here may read anything into, nor panic on.
    fn hostile_bodies() -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = [
            &b""[..],
            b" ",
            b"null",
            b"{}",
            b"[]",
            b"\"\"",
            b"\xff\xfe\xfd",
            b"{\"detail\":",
            b"{\"detail\":\"\\ud800\"}",
            b"{\"detail\":\"maximum capacity\"",
            b"\x00\x00\x00",
        ]
        .iter()
        .map(|b| b.to_vec())
        .collect();
        v.push(NGINX_429.to_vec());
        // Deeper than serde_json's recursion limit (128): an error, not a stack overflow.
        v.push(b"[".repeat(100_000));
        v.push(format!("{}{}", "{\"a\":".repeat(50_000), "1").into_bytes());
        // Big but well-formed, and big garbage.
        v.push(format!("{{\"x\":\"{}\"}}", "a".repeat(4 << 20)).into_bytes());
        v.push(vec![b'~'; 4 << 20]);
        v
    }

    #[test]
    fn classify_429_table() {
        use Scope429::{Account, Model};
        let huge_capacity = format!(
            "{{\"pad\":\"{}\",\"detail\":\"Infrastructure is at maximum capacity, try again later\"}}",
            "p".repeat(1 << 20)
        );
        let cases: &[(&str, &[u8], Scope429)] = &[
            (
                "chutes capacity",
                br#"{"detail":"Infrastructure is at maximum capacity, try again later"}"#,
                Model,
            ),
            (
                "upper case",
                br#"{"detail":"INFRASTRUCTURE IS AT MAXIMUM CAPACITY, TRY AGAIN LATER"}"#,
                Model,
            ),
            (
                "mixed case",
                br#"{"detail":"Maximum Capacity reached"}"#,
                Model,
            ),
            (
                "no instances",
                br#"{"detail":"No instances available (yet) for chute_id='abc'"}"#,
                Model,
            ),
            (
                "maintenance",
                br#"{"detail":"model is under maintenance"}"#,
                Model,
            ),
            (
                "at capacity",
                br#"{"detail":"Chute is at capacity"}"#,
                Model,
            ),
            (
                "detail object",
                br#"{"detail":{"message":"Infrastructure is at maximum capacity"}}"#,
                Model,
            ),
            (
                "error string",
                br#"{"error":"infrastructure is at maximum capacity"}"#,
                Model,
            ),
            (
                "error object (openai shape)",
                br#"{"error":{"message":"No instances available","type":"server_error"}}"#,
                Model,
            ),
            (
                "top-level message",
                br#"{"message":"Model is under maintenance"}"#,
                Model,
            ),
            (
                "escaped text",
                br#"{"detail":"maximum\u0020capacity"}"#,
                Model,
            ),
            (
                "whitespace around",
                b"\n  {\"detail\" : \"at maximum capacity\"}  \n",
                Model,
            ),
            ("huge body, capacity", huge_capacity.as_bytes(), Model),
            ("nginx html", NGINX_429, Account),
            (
                "html naming capacity",
                b"<html><body>Infrastructure is at maximum capacity</body></html>",
                Account,
            ),
            (
                "plain text naming capacity",
                b"Infrastructure is at maximum capacity, try again later",
                Account,
            ),
            (
                "app rate limit",
                br#"{"detail":"Too many requests, slow down"}"#,
                Account,
            ),
            (
                "openai rate limit",
                br#"{"error":{"message":"Rate limit reached","type":"requests"}}"#,
                Account,
            ),
            (
                "bare capacity word",
                br#"{"detail":"rate limit capacity exceeded"}"#,
                Account,
            ),
            (
                "phrase in another field",
                br#"{"detail":"slow down","hint":"maximum capacity"}"#,
                Account,
            ),
            (
                "detail not a string",
                br#"{"detail":["maximum capacity"]}"#,
                Account,
            ),
            (
                "message not a string",
                br#"{"detail":{"message":42}}"#,
                Account,
            ),
            (
                "truncated json",
                br#"{"detail":"Infrastructure is at maximum capac"#,
                Account,
            ),
            (
                "trailing junk",
                br#"{"detail":"maximum capacity"} <html>"#,
                Account,
            ),
        ];
        for (label, body, want) in cases {
            assert_eq!(classify_429(body), *want, "{label}");
        }
        for body in hostile_bodies() {
            assert_eq!(
                classify_429(&body),
                Account,
                "{:.60?}",
                body_snippet(&body, 60)
            );
        }
    }

    #[test]
    fn classify_402_table() {
        use Kind402::{DailyQuota, Other, UsageCap};
        let cases: &[(&str, &[u8], Kind402)] = &[
            (
                "chutes quota",
                br#"{"detail":{"message":"Quota exceeded for today","quota_reset_timestamp":"2025-09-13T00:00:00+00:00"}}"#,
                DailyQuota {
                    reset_unix: Some(NOW),
                },
            ),
            (
                "chutes quota, bad timestamp",
                br#"{"detail":{"message":"Quota exceeded","quota_reset_timestamp":"soon"}}"#,
                DailyQuota { reset_unix: None },
            ),
            (
                "usage cap",
                br#"{"detail":"Subscription usage cap exceeded. Please add balance to continue."}"#,
                UsageCap,
            ),
            (
                "usage cap, upper case",
                br#"{"detail":"SUBSCRIPTION USAGE CAP EXCEEDED. PLEASE ADD BALANCE TO CONTINUE."}"#,
                UsageCap,
            ),
            (
                "usage cap, object",
                br#"{"detail":{"message":"Subscription Usage Cap exceeded"}}"#,
                UsageCap,
            ),
            (
                "usage cap, openai shape",
                br#"{"error":{"message":"Subscription usage cap exceeded.","type":"insufficient_quota"}}"#,
                UsageCap,
            ),
            (
                "timestamp beats wording",
                br#"{"detail":{"message":"usage cap","quota_reset_timestamp":"2025-09-13T00:00:00Z"}}"#,
                DailyQuota {
                    reset_unix: Some(NOW),
                },
            ),
            (
                "tee",
                br#"{"detail":"TEE models require an active subscription or positive balance."}"#,
                Other,
            ),
            (
                "tier",
                br#"{"detail":"This model requires a higher subscription tier or positive balance."}"#,
                Other,
            ),
            ("balance", br#"{"detail":"Insufficient balance"}"#, Other),
            (
                "html",
                b"<html><body>402 Subscription usage cap exceeded</body></html>",
                Other,
            ),
            ("plain text", b"Quota exceeded", Other),
            ("nginx 429 page", NGINX_429, Other),
        ];
        for (label, body, want) in cases {
            assert_eq!(&classify_402(body), want, "{label}");
        }
        for body in hostile_bodies() {
            assert_eq!(
                classify_402(&body),
                Other,
                "{:.60?}",
                body_snippet(&body, 60)
            );
        }
    }

    #[test]
    fn chutes_quota_table() {
        let q = |total, used, remaining| {
            Some(ChutesQuota {
                total,
                used,
                remaining,
            })
        };
        let nines = "9".repeat(400);
        let cases: &[(&str, Pairs, Option<ChutesQuota>)] = &[
            (
                "all three",
                &[
                    ("x-chutes-quota-total", b"5000"),
                    ("x-chutes-quota-used", b"812"),
                    ("x-chutes-quota-remaining", b"4188"),
                ],
                q(5000, 812, Some(4188)),
            ),
            (
                "header names are case-insensitive",
                &[
                    ("X-Chutes-Quota-Total", b"300"),
                    ("X-CHUTES-QUOTA-USED", b"12"),
                ],
                q(300, 12, None),
            ),
            (
                "used as integral float",
                &[
                    ("x-chutes-quota-total", b"5000"),
                    ("x-chutes-quota-used", b"812.0"),
                    ("x-chutes-quota-remaining", b"4188.00"),
                ],
                q(5000, 812, Some(4188)),
            ),
            (
                "no daily quota",
                &[
                    ("x-chutes-quota-total", b"0"),
                    ("x-chutes-quota-used", b"0"),
                    ("x-chutes-quota-remaining", b"0"),
                ],
                q(0, 0, Some(0)),
            ),
            (
                "spaces trimmed",
                &[
                    ("x-chutes-quota-total", b" 5000 "),
                    ("x-chutes-quota-used", b"\t7"),
                ],
                q(5000, 7, None),
            ),
            (
                "malformed remaining ignored",
                &[
                    ("x-chutes-quota-total", b"5000"),
                    ("x-chutes-quota-used", b"10"),
                    ("x-chutes-quota-remaining", b"-3"),
                ],
                q(5000, 10, None),
            ),
            (
                "at the bound",
                &[
                    ("x-chutes-quota-total", b"10000000"),
                    ("x-chutes-quota-used", b"10000000"),
                ],
                q(10_000_000, 10_000_000, None),
            ),
            (
                "first of repeated",
                &[
                    ("x-chutes-quota-total", b"5000"),
                    ("x-chutes-quota-total", b"1"),
                    ("x-chutes-quota-used", b"2"),
                ],
                q(5000, 2, None),
            ),
            ("nothing", &[], None),
            ("total only", &[("x-chutes-quota-total", b"5000")], None),
            ("used only", &[("x-chutes-quota-used", b"5")], None),
            (
                "absurd total",
                &[
                    ("x-chutes-quota-total", b"10000001"),
                    ("x-chutes-quota-used", b"1"),
                ],
                None,
            ),
            (
                "overflowing used",
                &[
                    ("x-chutes-quota-total", b"5000"),
                    ("x-chutes-quota-used", nines.as_bytes()),
                ],
                None,
            ),
        ];
        for (label, pairs, want) in cases {
            assert_eq!(chutes_quota(&headers(pairs)), *want, "{label}");
        }
        let bad_values: &[&[u8]] = &[
            b"",
            b"-1",
            b"-0",
            b"812.5",
            b"1e3",
            b"+5",
            b"0x10",
            b"inf",
            b"NaN",
            b"5 000",
            b".",
            b"5.",
            b".5",
            b"five",
            b"\xff",
            b"5\xc3\xa9",
        ];
        for bad in bad_values {
            for field in ["x-chutes-quota-total", "x-chutes-quota-used"] {
                let other = if field.ends_with("total") {
                    "x-chutes-quota-used"
                } else {
                    "x-chutes-quota-total"
                };
                let map = headers(&[(field, bad), (other, b"1")]);
                assert_eq!(chutes_quota(&map), None, "{field}: {bad:?}");
            }
        }
    }

    #[test]
    fn advertised_rates_table() {
        use AdvertisedRate::{PerMinute, Unlimited};
        let per = |n: u32| Some(PerMinute(std::num::NonZeroU32::new(n).expect("non-zero")));
        type RateCase<'a> = (
            &'a str,
            Pairs<'a>,
            (Option<AdvertisedRate>, Option<AdvertisedRate>),
        );
        let cases: &[RateCase] = &[
            ("nothing", &[], (None, None)),
            (
                "user default",
                &[("x-chutes-rl-user", b"60")],
                (per(60), None),
            ),
            (
                "user and chute",
                &[("X-Chutes-RL-User", b"60"), ("X-Chutes-RL-Chute", b"10")],
                (per(60), per(10)),
            ),
            (
                "inf",
                &[("x-chutes-rl-user", b"inf")],
                (Some(Unlimited), None),
            ),
            (
                "INF and Infinity",
                &[
                    ("x-chutes-rl-user", b"INF"),
                    ("x-chutes-rl-chute", b"Infinity"),
                ],
                (Some(Unlimited), Some(Unlimited)),
            ),
            (
                "integral float",
                &[("x-chutes-rl-user", b"60.0")],
                (per(60), None),
            ),
            ("spaces", &[("x-chutes-rl-chute", b" 30 ")], (None, per(30))),
            (
                "the bound",
                &[("x-chutes-rl-user", b"1000000")],
                (per(1_000_000), None),
            ),
            ("zero", &[("x-chutes-rl-user", b"0")], (None, None)),
            ("negative", &[("x-chutes-rl-user", b"-60")], (None, None)),
            ("text", &[("x-chutes-rl-user", b"sixty")], (None, None)),
            ("-inf", &[("x-chutes-rl-user", b"-inf")], (None, None)),
            ("too big", &[("x-chutes-rl-user", b"1000001")], (None, None)),
            ("fraction", &[("x-chutes-rl-user", b"0.5")], (None, None)),
            (
                "u64 overflow",
                &[("x-chutes-rl-chute", b"99999999999999999999999")],
                (None, None),
            ),
            ("empty", &[("x-chutes-rl-user", b"")], (None, None)),
            (
                "not ascii",
                &[("x-chutes-rl-user", b"6\xff0")],
                (None, None),
            ),
            (
                "one bad, one good",
                &[("x-chutes-rl-user", b"lots"), ("x-chutes-rl-chute", b"5")],
                (None, per(5)),
            ),
        ];
        for (label, pairs, want) in cases {
            assert_eq!(advertised_rates(&headers(pairs)), *want, "{label}");
        }
    }

    #[test]
    fn next_usage_window_table() {
        const H: f64 = 3_600.0;
        let cases: &[(&str, f64, f64)] = &[
            ("midnight is not strictly after", NOW, NOW + 4.0 * H),
            ("just after midnight", NOW + 0.001, NOW + 4.0 * H),
            ("just before 04:00", NOW + 4.0 * H - 0.001, NOW + 4.0 * H),
            ("04:00 goes to 08:00", NOW + 4.0 * H, NOW + 8.0 * H),
            (
                "21:30 goes to next midnight",
                NOW + 21.5 * H,
                NOW + 24.0 * H,
            ),
            ("epoch", 0.0, 4.0 * H),
            ("before 1970", -1.0, 0.0),
        ];
        for (label, now, want) in cases {
            assert_eq!(next_usage_window_unix(*now), *want, "{label}");
        }
        assert!(next_usage_window_unix(f64::NAN).is_nan());
        assert_eq!(next_usage_window_unix(f64::INFINITY), f64::INFINITY);
        for now in [1e15, -1e15, 1e300, f64::MAX, f64::MIN_POSITIVE] {
            assert!(next_usage_window_unix(now) >= now, "{now}");
        }
    }

    #[test]
    fn quota_usage_table() {
        type UsageCase<'a> = (&'a str, &'a [u8], Option<(u64, u64)>);
        let cases: &[UsageCase] = &[
            (
                "chutes",
                br#"{"quota": 5000, "used": 812.0}"#,
                Some((5000, 812)),
            ),
            ("ints", br#"{"quota":300,"used":0}"#, Some((300, 0))),
            (
                "order and extra fields",
                br#"{"used":1,"chute_id":"*","quota":2000,"x":{"y":[1,2]}}"#,
                Some((2000, 1)),
            ),
            (
                "fractions round towards less left",
                br#"{"quota": 2000.9, "used": 812.1}"#,
                Some((2000, 813)),
            ),
            ("no quota", br#"{"quota":0,"used":0.0}"#, Some((0, 0))),
            (
                "at the bound",
                br#"{"quota":10000000,"used":10000000}"#,
                Some((10_000_000, 10_000_000)),
            ),
            ("whitespace", b" \n{\"quota\":1,\"used\":1}\n", Some((1, 1))),
            ("negative used", br#"{"quota":5000,"used":-1}"#, None),
            ("negative quota", br#"{"quota":-5,"used":1}"#, None),
            ("absurd", br#"{"quota":10000001,"used":1}"#, None),
            ("huge exponent", br#"{"quota":1e400,"used":1}"#, None),
            ("string figures", br#"{"quota":"5000","used":"812"}"#, None),
            ("null", br#"{"quota":null,"used":1}"#, None),
            ("missing used", br#"{"quota":5000}"#, None),
            ("array", b"[5000, 812.0]", None),
            ("duplicate", br#"{"quota":1,"quota":2,"used":0}"#, None),
            ("html", NGINX_429, None),
        ];
        for (label, body, want) in cases {
            assert_eq!(quota_usage(body), *want, "{label}");
        }
        for body in hostile_bodies() {
            assert_eq!(quota_usage(&body), None, "{:.60?}", body_snippet(&body, 60));
        }
    }

    #[test]
    fn rate_limit_headers_picks_and_bounds() {
        let long = "v".repeat(300);
        let map = headers(&[
            ("content-type", b"application/json"),
            ("retry-after", b"12"),
            ("retry-after-ms", b"12000"),
            ("x-ratelimit-remaining-requests", b"0"),
            ("x-ratelimit-reset", long.as_bytes()),
            ("RateLimit", b"\"minute\";r=0;t=12"),
            ("ratelimit-policy", b"\"minute\";q=60;w=60"),
            ("x-request-id", b"abc"),
            ("x-ratelimit-odd", b"\xffok"),
        ]);
        let mut got = rate_limit_headers(&map);
        got.sort();
        let want: Vec<(String, String)> = [
            ("ratelimit", "\"minute\";r=0;t=12"),
            ("ratelimit-policy", "\"minute\";q=60;w=60"),
            ("retry-after", "12"),
            ("retry-after-ms", "12000"),
            ("x-ratelimit-odd", "\u{fffd}ok"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset", &long[..200]),
        ]
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(got, want);

        let mut many = HeaderMap::new();
        for i in 0..40 {
            many.append(
                HeaderName::from_bytes(format!("x-ratelimit-h{i}").as_bytes()).expect("name"),
                HeaderValue::from_static("1"),
            );
        }
        assert_eq!(rate_limit_headers(&many).len(), 16);
        assert!(rate_limit_headers(&HeaderMap::new()).is_empty());
    }

    #[test]
    fn body_snippet_table() {
        let cases: &[(&[u8], usize, &str)] = &[
            (b"", 10, ""),
            (b"hello", 0, ""),
            (b"hello", 3, "hel"),
            (b"hello", 5, "hello"),
            (b"hello", 500, "hello"),
            (b"hello", usize::MAX, "hello"),
            ("héllo".as_bytes(), 2, "h\u{fffd}"),
            ("héllo".as_bytes(), 3, "hé"),
            (b"\xff\xfeok", 10, "\u{fffd}\u{fffd}ok"),
        ];
        for (body, max, want) in cases {
            assert_eq!(body_snippet(body, *max), *want, "{body:?} {max}");
        }
    }

    #[test]
    fn truncate_chars_respects_boundaries() {
        assert_eq!(truncate_chars("ééé", 2), "éé");
        assert_eq!(truncate_chars("ab", 5), "ab");
        assert_eq!(truncate_chars("ab", 0), "");
    }

    #[test]
    fn garbage_never_panics() {
        let values: &[&[u8]] = &[
            b"",
            b" ",
            b"-",
            b".",
            b"..",
            b"0",
            b"-0",
            b"1e999",
            b"nan",
            b"\xff",
            b"\"",
            b";",
            b",",
            b"=",
            b"r=0;t=",
            b"\"a\";t=1e400",
            b"t=99999999999999999999999999999999",
            b"1.7976931348623157e309",
            b"Sun, 06 Nov 1994 08:49:37 GMT",
            b"9999-12-31T23:59:59Z",
            b"1h1h1h1h1h1h1h1h1h1h1h1h1h",
            b"\"\\",
            b"\"minute\";r=0;t=1, \"",
        ];
        let names = [
            "retry-after",
            "x-ratelimit-reset-requests",
            "x-ratelimit-reset",
            "x-ratelimit-reset-tokens",
            "ratelimit",
            "ratelimit-reset",
            "x-ratelimit-remaining",
        ];
        for name in names {
            for value in values {
                let map = headers(&[(name, value), ("x-ratelimit-remaining-requests", b"0")]);
                if let Some(Hint::After(d)) = cooldown_hint(&map, NOW) {
                    assert!(d <= Duration::from_secs(MAX), "{name}: {value:?}");
                }
                if let Some(d) = exhausted_hint(&map, NOW) {
                    assert!(d <= Duration::from_secs(MAX), "{name}: {value:?}");
                }
                let _ = rate_limit_headers(&map);
                let _ = quota_exceeded(value);
            }
        }
    }

    #[test]
    fn count_reads_what_chutes_writes_and_nothing_else() {
        let max = MAX_QUOTA_FIGURE;
        let over = (max + 1).to_string();
        let at = max.to_string();
        let cases: &[(&str, Option<u64>)] = &[
            ("812", Some(812)),
            ("812.0", Some(812)),
            ("812.000", Some(812)),
            (" 812 ", Some(812)),
            ("007", Some(7)),
            ("0", Some(0)),
            ("0.0", Some(0)),
            (&at, Some(max)),
            (&over, None),
            ("18446744073709551615", None),
            ("18446744073709551616", None),
            ("99999999999999999999999", None),
            ("812.", None),
            (".0", None),
            ("812.01", None),
            ("8.1.0", None),
            ("+5", None),
            ("-0", None),
            ("1e3", None),
            ("", None),
            ("5 000", None),
            ("٣", None),
        ];
        for (text, want) in cases {
            assert_eq!(count(text, max), *want, "{text:?}");
        }
        assert_eq!(count("18446744073709551615", u64::MAX), Some(u64::MAX));
    }

    /// [`Carried`] never changes a reader's answer: random answers drawn from every name the
    /// readers know, near misses of them, and other headers (names repeated), with values
    /// each reader accepts or refuses. What the walk keeps for Chutes' readers is compared
    /// with what lookups by name find, and the exhaustion reader is read with and without
    /// the gate.
    #[test]
    fn a_reader_skipped_by_the_scan_would_have_found_nothing() {
        // Every name a reader knows, from its own constants, and near misses of them.
        let known = [
            CHUTES_QUOTA_TOTAL,
            CHUTES_QUOTA_USED,
            CHUTES_QUOTA_REMAINING,
            CHUTES_RL_USER,
            CHUTES_RL_CHUTE,
            RATELIMIT,
            OLD_DRAFT_RESET,
            RETRY_AFTER,
        ];
        let near = [
            "x-chutes-other",
            "x-ratelimit-remaining-tokens",
            "ratelimit-policy",
            "content-type",
            "x-chute",
        ];
        let (remaining, reset) = (REMAINING_HEADERS, RESET_HEADERS);
        let names: Vec<&str> = known
            .iter()
            .chain(&remaining)
            .chain(&reset)
            .map(HeaderName::as_str)
            .chain(near)
            .collect();
        let values: [&[u8]; 10] = [
            b"0",
            b"0.0",
            b"12",
            b"812.0",
            b"inf",
            b"1757721660",
            b"6m0s",
            b"\"minute\";r=0;t=12",
            b"garbage",
            b"1\x80",
        ];
        let mut rng = crate::test_rng::Xorshift::new();
        let mut next = |n: usize| rng.below(n);
        let (mut chutes_skipped, mut exhaustion_skipped) = (0, 0);
        for _ in 0..20_000 {
            let len = next(6);
            let pairs: Vec<(&str, &[u8])> = (0..len)
                .map(|_| (names[next(names.len())], values[next(values.len())]))
                .collect();
            let map = headers(&pairs);
            let carried = Carried::of(&map);
            // The walk keeps what a lookup by name would find: each one's first value.
            let looked_up = |name: &HeaderName| header_text(map.get(name));
            let quota = (|| {
                let figure = |n| looked_up(n).and_then(|v| count(v, MAX_QUOTA_FIGURE));
                Some(ChutesQuota {
                    total: figure(&CHUTES_QUOTA_TOTAL)?,
                    used: figure(&CHUTES_QUOTA_USED)?,
                    remaining: figure(&CHUTES_QUOTA_REMAINING),
                })
            })();
            assert_eq!(carried.chutes_quota(), quota, "{pairs:?}");
            let rate = |n| looked_up(n).and_then(advertised_rate);
            let rates = (rate(&CHUTES_RL_USER), rate(&CHUTES_RL_CHUTE));
            assert_eq!(carried.advertised_rates(), rates, "{pairs:?}");
            if !carried.chutes() {
                chutes_skipped += 1;
            }
            if !carried.exhaustion() {
                exhaustion_skipped += 1;
                assert_eq!(exhausted_hint(&map, NOW), None, "{pairs:?}");
            }
        }
        // Both gates were closed often enough to mean something, and open the rest of the
        // time (the readers' own tables check what they find then).
        assert!(
            chutes_skipped > 1_000 && chutes_skipped < 19_000,
            "{chutes_skipped}"
        );
        assert!(
            exhaustion_skipped > 1_000 && exhaustion_skipped < 19_000,
            "{exhaustion_skipped}"
        );
    }

    #[test]
    fn the_scan_sees_each_family_by_any_of_its_names() {
        for name in [
            "x-chutes-quota-total",
            "x-chutes-rl-user",
            "x-chutes-rl-chute",
        ] {
            let map = headers(&[("content-type", b"x"), (name, b"1")]);
            let c = Carried::of(&map);
            assert!(c.chutes() && !c.exhaustion(), "{name}");
        }
        let ratelimit = RATELIMIT;
        for name in REMAINING_HEADERS.iter().chain(std::iter::once(&ratelimit)) {
            let map = headers(&[(name.as_str(), b"0")]);
            let c = Carried::of(&map);
            assert!(c.exhaustion() && !c.chutes(), "{name}");
        }
        let map = headers(&[
            ("x-ratelimit-reset", b"5"),
            ("ratelimit-policy", b"x"),
            ("x-chute", b"y"),
        ]);
        assert_eq!(Carried::of(&map), Carried::default());
    }
}

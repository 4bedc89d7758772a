//! Fuzz target: every reader of upstream rate-limit headers, on arbitrary header maps.
//!
//! The input is decoded into a list of (header name, raw value) pairs, names drawn from the
//! headers the proxy reads plus a few it must ignore, values any bytes `http` accepts in a
//! header value (which is what hyper hands the proxy), and a "now" that is sometimes absurd
//! (NaN, infinite, negative). `cooldown_hint`, `exhausted_hint` and `rate_limit_headers` must
//! never panic, and their documented bounds must hold: no delay beyond `u32::MAX` seconds, at
//! most 16 logged headers, logged values cut to 200 characters. When `signals::Carried`
//! says the exhaustion family is absent (the proxy then skips the reader), the reader finds
//! nothing.
#![no_main]

use std::time::Duration;

use chutes_proxy::signals::{cooldown_hint, exhausted_hint, rate_limit_headers, Carried, Hint};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const NAMES: &[&str] = &[
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset",
    "x-ratelimit-reset-tokens",
    "ratelimit-reset",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining",
    "ratelimit-remaining",
    "ratelimit",
    "ratelimit-policy",
    "x-ratelimit-limit-requests",
    "content-type",
    "x-unrelated",
];

/// 2025-09-13T00:00:00Z: a realistic "now", used for most inputs.
const NOW: f64 = 1_757_721_600.0;
const MAX_SECS: Duration = Duration::from_secs(u32::MAX as u64);

fn now_from(data: &[u8]) -> (f64, &[u8]) {
    match data.split_first() {
        Some((&sel, rest)) if sel % 4 == 0 && rest.len() >= 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&rest[..8]);
            (f64::from_bits(u64::from_le_bytes(b)), &rest[8..])
        }
        Some((&sel, rest)) if sel % 4 == 1 => (0.0, rest),
        Some((_, rest)) => (NOW, rest),
        None => (NOW, data),
    }
}

fuzz_target!(|data: &[u8]| {
    let (now, mut rest) = now_from(data);
    let mut headers = HeaderMap::new();
    // Each entry: one byte picks the name, one byte is the value's length, then the value.
    while let [sel, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (value, tail) = tail.split_at(n);
        rest = tail;
        let name = HeaderName::from_static(NAMES[usize::from(*sel) % NAMES.len()]);
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(name, v);
        }
    }
    match cooldown_hint(&headers, now) {
        Some(Hint::After(d)) => assert!(d <= MAX_SECS, "cooldown hint {d:?} beyond u32::MAX s"),
        Some(Hint::Unparseable(text)) => {
            // "name: " plus at most 100 characters of the value.
            assert!(
                text.chars().count() <= 40 + 100,
                "unbounded hint text: {text:?}"
            )
        }
        None => {}
    }
    let exhausted = exhausted_hint(&headers, now);
    if let Some(d) = exhausted {
        assert!(d <= MAX_SECS, "exhausted hint {d:?} beyond u32::MAX s");
    }
    // The proxy skips the reader when the scan finds none of its names: it must have found
    // nothing then.
    if !Carried::of(&headers).exhaustion() {
        assert_eq!(exhausted, None, "skipped, yet the reader found something");
    }
    let logged = rate_limit_headers(&headers);
    assert!(logged.len() <= 16);
    for (_, v) in &logged {
        assert!(v.chars().count() <= 200);
    }
});

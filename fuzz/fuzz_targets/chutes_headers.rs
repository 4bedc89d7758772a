//! Fuzz target: Chutes' quota and rate headers (`signals::chutes_quota`,
//! `signals::advertised_rates`) on arbitrary header maps, and the 4-hour window arithmetic
//! (`signals::next_usage_window_unix`) on arbitrary clock readings.
//!
//! The input's first 8 bytes are a "now" (any f64 bit pattern, NaN and infinities
//! included); the rest is decoded like the `headers` target: one byte picks the name, one
//! byte is the value's length, then the value. Never panics; figures stay within their
//! documented bounds; a window boundary is on the 4-hour grid and after `now`; the readers
//! (which take each header's first value from one walk, `signals::Carried`) find in a
//! repeated header what they find in its first value alone.
#![no_main]

use chutes_proxy::signals::{
    advertised_rates, chutes_quota, next_usage_window_unix, AdvertisedRate, Carried,
    MAX_ADVERTISED_RPM, MAX_QUOTA_FIGURE, USAGE_WINDOW_SECS,
};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const NAMES: &[&str] = &[
    "x-chutes-quota-total",
    "x-chutes-quota-used",
    "x-chutes-quota-remaining",
    "x-chutes-rl-user",
    "x-chutes-rl-chute",
    "x-chutes-invocationid",
    "content-type",
];

fn check_rate(r: Option<AdvertisedRate>) {
    if let Some(AdvertisedRate::PerMinute(n)) = r {
        assert!(u64::from(n.get()) <= MAX_ADVERTISED_RPM, "{n}");
    }
}

fuzz_target!(|data: &[u8]| {
    let (now, mut rest) = match data.split_first_chunk::<8>() {
        Some((b, rest)) => (f64::from_bits(u64::from_le_bytes(*b)), rest),
        None => (0.0, data),
    };
    let next = next_usage_window_unix(now);
    if now.is_finite() {
        assert!(next >= now, "{next} before {now}");
        // Where floats still resolve seconds, the answer is exact.
        if now.abs() < 1e15 {
            assert!(
                next > now && next - now <= USAGE_WINDOW_SECS,
                "{now} -> {next}"
            );
            assert_eq!(next % USAGE_WINDOW_SECS, 0.0, "{now} -> {next}");
        }
    }

    let mut headers = HeaderMap::new();
    while let [sel, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (value, tail) = tail.split_at(n);
        rest = tail;
        let name = HeaderName::from_static(NAMES[usize::from(*sel) % NAMES.len()]);
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(name, v);
        }
    }
    if let Some(q) = chutes_quota(&headers) {
        assert!(
            q.total <= MAX_QUOTA_FIGURE && q.used <= MAX_QUOTA_FIGURE,
            "{q:?}"
        );
        assert!(q.remaining.is_none_or(|r| r <= MAX_QUOTA_FIGURE), "{q:?}");
    }
    let (user, chute) = advertised_rates(&headers);
    check_rate(user);
    check_rate(chute);
    // The readers take each header's first value from one walk (`Carried`): what they find
    // must be what they find in a map of each name's first value alone.
    let mut firsts = HeaderMap::new();
    for name in headers.keys() {
        if let Some(v) = headers.get(name) {
            firsts.insert(name.clone(), v.clone());
        }
    }
    assert_eq!(chutes_quota(&headers), chutes_quota(&firsts));
    assert_eq!((user, chute), advertised_rates(&firsts));
    // The proxy skips both when the walk finds no Chutes header.
    if !Carried::of(&headers).chutes() {
        assert!(chutes_quota(&headers).is_none() && user.is_none() && chute.is_none());
    }
});

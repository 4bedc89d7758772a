//! Fuzz target: the text parsers for durations, waits, sizes, times of day and RFC 3339
//! instants, used on config values, the client's `x-proxy-max-wait` header and upstream
//! reset headers.
//!
//! Beyond "never panics", the round trips the proxy relies on:
//! - a parsed duration printed as an OpenAI-style reset (`format_reset`) parses back to at
//!   least the same duration (it rounds up, never down: a client told less would retry early);
//! - an RFC 3339 instant's whole second, printed by `format_rfc3339`, parses back to itself;
//! - a time of day is inside the day; the day containing an instant ends after it.
#![no_main]

use chutes_proxy::units::{
    day_end, day_index, format_reset, format_rfc3339, parse_duration, parse_hhmm, parse_rfc3339,
    parse_size, parse_wait,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let s = text.as_ref();

    if let Ok(d) = parse_duration(s) {
        let shown = format_reset(d);
        match parse_duration(&shown) {
            Ok(back) => assert!(
                back >= d,
                "{s:?} -> {d:?} -> {shown:?} -> {back:?} (shorter)"
            ),
            Err(e) => panic!("{s:?} -> {d:?} -> {shown:?} does not parse back: {e}"),
        }
    }
    if let Ok(d) = parse_wait(s) {
        let _ = format_reset(d);
    }
    let _ = parse_size(s);
    if let Ok(secs) = parse_hhmm(s) {
        assert!(secs < 86_400, "{s:?} -> {secs} is not a time of day");
    }
    if let Some(t) = parse_rfc3339(s) {
        assert!(t.is_finite(), "{s:?} -> {t}");
        let whole = t.floor() as i64;
        let printed = format_rfc3339(whole);
        assert_eq!(
            parse_rfc3339(&printed),
            Some(whole as f64),
            "{s:?} -> {t} -> {printed:?}"
        );
        // Quota days around any instant an upstream can name.
        for offset in [0u32, 3_600, 86_399] {
            let day = day_index(whole, offset);
            assert!(
                day_end(day, offset) > whole,
                "{s:?}: day {day} ends before it"
            );
        }
    }
});

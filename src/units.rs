//! Human units and UTC calendar arithmetic.
//!
//! Owns: parsing the durations and sizes written in the configuration file and in the
//! `x-proxy-max-wait` request header, formatting reset durations the way OpenAI's
//! `x-ratelimit-reset-requests` does, converting between UNIX seconds and RFC 3339 instants,
//! and the "quota day" arithmetic behind `limits.day_reset_utc`.
//!
//! Does not own: which keys hold durations or sizes (the config module), what a reset
//! instant means for admission (the limiter), or reading upstream headers (`signals`), or the
//! calendar itself: months, leap years and day counts are jiff's (`jiff::civil`).
//!
//! The grammars stay here because they are the contract's, and the crates that parse the same
//! things accept other sets of strings. jiff's "friendly" durations refuse forms the proxy
//! accepts ("1d", ".5s", "30m1h", the Go units of upstream reset headers, more than nine
//! fraction digits) and accept ones it refuses ("-1s", "5 s", "5sec"); its RFC 3339 parser
//! refuses what Python upstreams send (no offset, a date alone) and takes `+24:00`, hour-only
//! times and zone annotations. The size crates (bytesize, parse-size) take a bare "4K" or "4m",
//! which is ambiguous, and bytesize saturates an overflow to `u64::MAX` instead of refusing it.
//! Everything here is pure and total: every function returns an error or `None` for bad
//! input rather than panicking, and all arithmetic is checked or saturating.

use std::time::Duration;

use jiff::civil::{Date, DateTime, Time};
use jiff::SignedDuration;

const NANOS_PER_SEC: u128 = 1_000_000_000;
const SECS_PER_DAY: i64 = 86_400;

/// Shown in every duration error so the user sees the accepted shape, not just a refusal.
const DURATION_EXAMPLES: &str =
    r#"expected a number with a unit, e.g. "500ms", "20s", "5m", "1h", "1d", "1h30m" or "1.5s""#;
const SIZE_EXAMPLES: &str =
    r#"expected a byte count, e.g. "1024", "1024B", "512KiB", "4MiB", "1GiB", "10kB" or "4MB""#;

/// Fraction digits beyond this many cannot change a result at nanosecond (or byte)
/// resolution for any unit we know, and capping them keeps `10^digits` inside `u128`.
const MAX_FRACTION_DIGITS: usize = 18;

/// An unsigned decimal literal split into its integer and fraction digits (ASCII only).
struct Decimal<'a> {
    int: &'a str,
    frac: &'a str,
}

/// Splits a leading unsigned decimal (`12`, `1.5`, `.5`, `5.`) off `s`.
/// Returns `None` when `s` does not start with one (a sign, a letter, a lone dot).
fn split_decimal(s: &str) -> Option<(Decimal<'_>, &str)> {
    // ASCII digits are one byte each, so these counts are always char boundaries;
    // `split_at_checked` still guards it rather than trusting that reasoning.
    let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
    let (int, rest) = s.split_at_checked(int_len)?;
    let (frac, rest) = match rest.strip_prefix('.') {
        Some(after) => {
            let frac_len = after.bytes().take_while(u8::is_ascii_digit).count();
            after.split_at_checked(frac_len)?
        }
        None => ("", rest),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    Some((Decimal { int, frac }, rest))
}

/// `value × unit`, truncated to an integer, or `None` on overflow.
fn scale_decimal(d: &Decimal<'_>, unit: u128) -> Option<u128> {
    let mut int: u128 = 0;
    for b in d.int.bytes() {
        let digit = u128::from(b.checked_sub(b'0')?);
        int = int.checked_mul(10)?.checked_add(digit)?;
    }
    let mut frac: u128 = 0;
    let mut denom: u128 = 1;
    for b in d.frac.bytes().take(MAX_FRACTION_DIGITS) {
        let digit = u128::from(b.checked_sub(b'0')?);
        frac = frac.checked_mul(10)?.checked_add(digit)?;
        denom = denom.checked_mul(10)?;
    }
    int.checked_mul(unit)?
        .checked_add(frac.checked_mul(unit)?.checked_div(denom)?)
}

fn duration_from_nanos(total: u128) -> Option<Duration> {
    let secs = u64::try_from(total / NANOS_PER_SEC).ok()?;
    let nanos = u32::try_from(total % NANOS_PER_SEC).ok()?;
    Some(Duration::new(secs, nanos))
}

fn duration_unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        // Go's time.ParseDuration spells microseconds all three ways; upstream reset
        // headers are Go-formatted, so accept them all.
        "us" | "µs" | "μs" => 1_000,
        "ms" => 1_000_000,
        "s" => NANOS_PER_SEC,
        "m" => 60 * NANOS_PER_SEC,
        "h" => 3_600 * NANOS_PER_SEC,
        "d" => 86_400 * NANOS_PER_SEC,
        _ => return None,
    })
}

/// Config durations: "500ms", "20s", "5m", "1h", "1d", compound "1h30m", "1m30s", decimal
/// "1.5s". Unit required. Rejects "", "-1s", "10", "5x", overflow. Error message says what
/// is wrong and shows an example.
///
/// Also accepts Go's `ns`/`us`/`µs` units and any order or repetition of parts ("30m1h"),
/// as Go's `time.ParseDuration` does, because upstream reset headers use that format.
/// Units are case-sensitive: "5M" could mean months or mega, so it is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let fail = |what: &str| {
        Err(format!(
            "invalid duration {s:?}: {what}; {DURATION_EXAMPLES}"
        ))
    };
    if t.is_empty() {
        return fail("it is empty");
    }
    if t.starts_with('-') {
        return fail("negative durations are not allowed");
    }
    let mut rest = t;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        if rest.starts_with(char::is_whitespace) {
            return fail("spaces are not allowed inside a duration");
        }
        let Some((number, after)) = split_decimal(rest) else {
            return fail(&format!("expected a number at {rest:?}"));
        };
        let unit_len = after
            .find(|c: char| !c.is_alphabetic())
            .unwrap_or(after.len());
        let Some((unit, after_unit)) = after.split_at_checked(unit_len) else {
            return fail("malformed unit");
        };
        if unit.is_empty() && after.starts_with(char::is_whitespace) {
            return fail("spaces are not allowed inside a duration");
        }
        if unit.is_empty() {
            return fail("missing unit after the number");
        }
        let Some(unit_nanos) = duration_unit_nanos(unit) else {
            return fail(&format!(
                "unknown unit {unit:?} (use ns, us, ms, s, m, h or d)"
            ));
        };
        let Some(part) = scale_decimal(&number, unit_nanos) else {
            return fail("the value is too large");
        };
        let Some(sum) = total.checked_add(part) else {
            return fail("the value is too large");
        };
        total = sum;
        rest = after_unit;
    }
    match duration_from_nanos(total) {
        Some(d) => Ok(d),
        None => fail("the value is too large"),
    }
}

/// Header x-proxy-max-wait: a duration as above OR bare non-negative seconds ("5", "0.5", "0").
pub fn parse_wait(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    // Only digits and dots: it is meant as bare seconds, so judge it as a number (and
    // say so) instead of reporting a confusing "missing unit".
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return match split_decimal(t) {
            Some((number, "")) => scale_decimal(&number, NANOS_PER_SEC)
                .and_then(duration_from_nanos)
                .ok_or_else(|| format!("invalid wait {s:?}: the value is too large")),
            _ => Err(format!(
                "invalid wait {s:?}: not a number; expected seconds like \"5\" or \"0.5\", or a duration like \"500ms\""
            )),
        };
    }
    parse_duration(t).map_err(|e| format!("{e} (bare seconds like \"5\" are also accepted)"))
}

fn size_unit_bytes(unit: &str) -> Option<u128> {
    // Case-insensitive because people write kB, KB and kb for the same thing; a bare
    // K/M/G is refused because it is ambiguous between 1000 and 1024.
    Some(match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    })
}

/// Sizes: "4MiB", "512KiB", "1GiB", "4MB", "10kB"/"10KB", "1024", "1024B". Reject
/// negative/overflow/garbage.
///
/// Units are case-insensitive, a space may separate number and unit ("4 MiB"), and a
/// decimal is allowed ("1.5KiB" = 1536); a fractional byte is truncated.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let fail = |what: &str| Err(format!("invalid size {s:?}: {what}; {SIZE_EXAMPLES}"));
    if t.is_empty() {
        return fail("it is empty");
    }
    if t.starts_with('-') {
        return fail("negative sizes are not allowed");
    }
    let Some((number, unit)) = split_decimal(t) else {
        return fail("expected a number");
    };
    let Some(unit_bytes) = size_unit_bytes(unit.trim_start()) else {
        return fail(&format!(
            "unknown unit {:?} (use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB)",
            unit.trim_start()
        ));
    };
    match scale_decimal(&number, unit_bytes).and_then(|b| u64::try_from(b).ok()) {
        Some(bytes) => Ok(bytes),
        None => fail("the value is too large"),
    }
}

/// Reset duration in the style OpenAI uses for x-ratelimit-reset-requests: "450ms" (<1s),
/// "12s", "1m30s", "1h2m3s", "0s". Whole seconds rounded UP once >= 1s.
///
/// Sub-second values are rounded up to the millisecond (a client told "0ms" would retry
/// too early); 999.5ms therefore becomes "1s". Hours are not folded into days, as in Go.
pub fn format_reset(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    if d < Duration::from_secs(1) {
        let ms = d.as_nanos().div_ceil(1_000_000);
        if ms < 1_000 {
            return format!("{ms}ms");
        }
    }
    let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    let (h, m, s) = (secs / 3_600, secs % 3_600 / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// The UNIX epoch as a civil date-time: every instant here is a signed number of seconds from it.
const EPOCH: DateTime = jiff::civil::datetime(1970, 1, 1, 0, 0, 0, 0);

/// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z: the instants [`parse_rfc3339`] reads, so that
/// every one of them prints back as a four-digit year.
const FIRST_UNIX: i64 = -62_167_219_200;
const LAST_UNIX: i64 = 253_402_300_799;

/// Seconds since UNIX epoch -> "2026-11-24T00:00:00Z". Negative allowed.
///
/// The calendar is jiff's, whose range is the years -9999..=9999 (a year before 0 is written
/// "-0001"). An instant beyond it, which only a broken clock or a hostile file could produce,
/// is shown as the range's nearest end rather than failing.
pub fn format_rfc3339(unix_secs: i64) -> String {
    let at = EPOCH
        .checked_add(SignedDuration::from_secs(unix_secs))
        .unwrap_or(if unix_secs < 0 {
            DateTime::MIN
        } else {
            DateTime::MAX
        });
    let sign = if at.year() < 0 { "-" } else { "" };
    format!(
        "{sign}{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        at.year().unsigned_abs(),
        at.month(),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// A forward-only reader over ASCII bytes for the timestamp grammar.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let (&b, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(b)
    }

    fn eat(&mut self, want: u8) -> bool {
        if self.peek() == Some(want) {
            self.rest = self.rest.get(1..).unwrap_or_default();
            true
        } else {
            false
        }
    }

    /// Exactly `n` ASCII digits as a number.
    fn digits(&mut self, n: usize) -> Option<u32> {
        let mut v: u32 = 0;
        for _ in 0..n {
            let b = self.bump()?;
            if !b.is_ascii_digit() {
                return None;
            }
            v = v.checked_mul(10)?.checked_add(u32::from(b - b'0'))?;
        }
        Some(v)
    }
}

/// RFC 3339 / ISO 8601 instant -> UNIX seconds (f64 keeps fractions): accepts "Z",
/// "+00:00", "-05:30", "+0000", fractional seconds, a space instead of 'T'. None for
/// anything invalid (month 13, day 32, hour 25, garbage, trailing junk).
///
/// Also accepted, because upstreams written in Python emit them: a missing UTC offset
/// (taken as UTC: a naive `datetime.isoformat()` from a UTC server), an hour-only offset
/// ("+05"), a missing seconds field ("T00:00"), a date alone (midnight UTC), lowercase
/// 't'/'z', and a comma as the decimal mark. A leap second (":60") is accepted and lands
/// on the following second.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let mut c = Cursor {
        rest: s.trim().as_bytes(),
    };
    let year = c.digits(4)?;
    if !c.eat(b'-') {
        return None;
    }
    let month = c.digits(2)?;
    if !c.eat(b'-') {
        return None;
    }
    let day = c.digits(2)?;
    // jiff refuses month 13, day 32, 29 February outside leap years; the digits fit its types.
    let date = Date::new(
        i16::try_from(year).ok()?,
        i8::try_from(month).ok()?,
        i8::try_from(day).ok()?,
    )
    .ok()?;
    let midnight = date
        .to_datetime(Time::midnight())
        .duration_since(EPOCH)
        .as_secs();
    if c.peek().is_none() {
        return Some(midnight as f64);
    }

    if !matches!(c.bump()?, b'T' | b't' | b' ') {
        return None;
    }
    let hour = c.digits(2)?;
    if !c.eat(b':') {
        return None;
    }
    let minute = c.digits(2)?;
    let mut second = 0;
    let mut fraction = 0.0_f64;
    if c.eat(b':') {
        second = c.digits(2)?;
        if c.eat(b'.') || c.eat(b',') {
            let mut scale = 0.1_f64;
            let mut any = false;
            while let Some(b) = c.peek().filter(u8::is_ascii_digit) {
                c.bump();
                fraction += f64::from(b - b'0') * scale;
                scale /= 10.0;
                any = true;
            }
            if !any {
                return None;
            }
        }
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }

    let offset_secs: i64 = match c.bump() {
        None => 0,
        Some(b'Z' | b'z') => 0,
        Some(sign @ (b'+' | b'-')) => {
            let oh = c.digits(2)?;
            let om = if c.peek().is_none() {
                0
            } else {
                c.eat(b':');
                c.digits(2)?
            };
            if oh > 23 || om > 59 {
                return None;
            }
            let magnitude = i64::from(oh * 3_600 + om * 60);
            if sign == b'-' {
                -magnitude
            } else {
                magnitude
            }
        }
        Some(_) => return None,
    };
    if c.peek().is_some() {
        return None;
    }

    let secs = midnight + i64::from(hour * 3_600 + minute * 60 + second) - offset_secs;
    // An offset can carry 0000-01-01 or 9999-12-31 into another year, which
    // `format_rfc3339` would not write back as the same text; no upstream means either.
    if !(FIRST_UNIX..=LAST_UNIX).contains(&secs) {
        return None;
    }
    Some(secs as f64 + fraction)
}

/// "HH:MM" (00:00..=23:59) -> seconds after midnight UTC.
///
/// A one-digit hour ("9:00") is accepted; minutes must have two digits.
pub fn parse_hhmm(s: &str) -> Result<u32, String> {
    let fail = || {
        format!("invalid time of day {s:?}: expected \"HH:MM\" in UTC between \"00:00\" and \"23:59\", e.g. \"00:00\"")
    };
    let (h, m) = s.trim().split_once(':').ok_or_else(fail)?;
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(h) || h.len() > 2 || !all_digits(m) || m.len() != 2 {
        return Err(fail());
    }
    let hour: u32 = h.parse().map_err(|_| fail())?;
    let minute: u32 = m.parse().map_err(|_| fail())?;
    if hour > 23 || minute > 59 {
        return Err(fail());
    }
    Ok(hour * 3_600 + minute * 60)
}

/// Seconds after midnight -> "HH:MM", the form [`parse_hhmm`] reads (`limits.day_reset_utc`).
pub fn format_hhmm(secs: u32) -> String {
    format!("{:02}:{:02}", secs / 3_600 % 24, secs % 3_600 / 60)
}

/// Index of the "quota day" containing `unix_secs` when days reset at `reset_offset_secs`
/// after UTC midnight: floor((unix_secs - offset) / 86400).
pub fn day_index(unix_secs: i64, reset_offset_secs: u32) -> i64 {
    unix_secs
        .saturating_sub(i64::from(reset_offset_secs))
        .div_euclid(SECS_PER_DAY)
}

/// UNIX seconds at which day `day` ends (= next reset instant).
pub fn day_end(day: i64, reset_offset_secs: u32) -> i64 {
    day.saturating_add(1)
        .saturating_mul(SECS_PER_DAY)
        .saturating_add(i64::from(reset_offset_secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn parse_duration_accepts() {
        let cases: &[(&str, Duration)] = &[
            ("500ms", ms(500)),
            ("20s", secs(20)),
            ("5m", secs(300)),
            ("1h", secs(3_600)),
            ("1d", secs(86_400)),
            ("1h30m", secs(5_400)),
            ("1m30s", secs(90)),
            ("1.5s", ms(1_500)),
            (".5s", ms(500)),
            ("5.s", secs(5)),
            ("0s", Duration::ZERO),
            ("0ms", Duration::ZERO),
            ("  20s\t", secs(20)),
            ("6m0s", secs(360)),
            ("1h2m3.5s", ms(3_723_500)),
            ("450ms", ms(450)),
            ("30m1h", secs(5_400)),
            ("1s1s", secs(2)),
            ("1ns", Duration::from_nanos(1)),
            ("1us", Duration::from_micros(1)),
            ("1µs", Duration::from_micros(1)),
            ("1μs", Duration::from_micros(1)),
            ("1.5d", secs(129_600)),
            ("0.000000001s", Duration::from_nanos(1)),
            // Fraction finer than a nanosecond is truncated, not an error.
            ("0.0000000019s", Duration::from_nanos(1)),
            ("1.00000000000000000000000000000000000001s", secs(1)),
            ("00000000000000000000000000000000000000000001s", secs(1)),
            ("18446744073709551615s", Duration::from_secs(u64::MAX)),
        ];
        for (input, want) in cases {
            assert_eq!(parse_duration(input), Ok(*want), "input {input:?}");
        }
    }

    #[test]
    fn parse_duration_rejects() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("   ", "empty"),
            ("-1s", "negative"),
            ("-0s", "negative"),
            ("10", "missing unit"),
            ("1h30", "missing unit"),
            ("5x", "unknown unit"),
            ("5S", "unknown unit"),
            ("5M", "unknown unit"),
            ("5sec", "unknown unit"),
            ("5 s", "spaces"),
            ("1h 30m", "spaces"),
            ("s", "expected a number"),
            ("+1s", "expected a number"),
            (".s", "expected a number"),
            ("1.2.3s", "missing unit"),
            ("1e3s", "unknown unit"),
            ("NaN", "expected a number"),
            ("inf", "expected a number"),
            ("1s-", "expected a number"),
            ("1s,", "expected a number"),
            ("٣s", "expected a number"),
            ("18446744073709551616s", "too large"),
            ("99999999999999999999999999999999999999999d", "too large"),
            ("213503982334602d", "too large"),
            ("1\u{0}s", "missing unit"),
        ];
        for (input, want) in cases {
            let err = parse_duration(input).expect_err(input);
            assert!(err.contains(want), "input {input:?}: {err}");
            assert!(err.contains("e.g."), "error shows an example: {err}");
        }
    }

    #[test]
    fn parse_wait_cases() {
        let ok: &[(&str, Duration)] = &[
            ("5", secs(5)),
            ("0.5", ms(500)),
            ("0", Duration::ZERO),
            (" 5 ", secs(5)),
            (".25", ms(250)),
            ("5s", secs(5)),
            ("500ms", ms(500)),
            ("1m", secs(60)),
            ("1.5s", ms(1_500)),
        ];
        for (input, want) in ok {
            assert_eq!(parse_wait(input), Ok(*want), "input {input:?}");
        }
        let bad = [
            "",
            "-1",
            "-0.5",
            "abc",
            "1e3",
            "NaN",
            "inf",
            ".",
            "1..2",
            "5x",
            "1,5",
            "0x10",
            "99999999999999999999999999999",
        ];
        for input in bad {
            assert!(parse_wait(input).is_err(), "input {input:?}");
        }
    }

    #[test]
    fn parse_size_cases() {
        let ok: &[(&str, u64)] = &[
            ("4MiB", 4 * 1024 * 1024),
            ("512KiB", 512 * 1024),
            ("1GiB", 1 << 30),
            ("1TiB", 1 << 40),
            ("4MB", 4_000_000),
            ("10kB", 10_000),
            ("10KB", 10_000),
            ("10kb", 10_000),
            ("2GB", 2_000_000_000),
            ("1024", 1_024),
            ("1024B", 1_024),
            ("1024b", 1_024),
            ("0", 0),
            ("4 MiB", 4 * 1024 * 1024),
            (" 4mib ", 4 * 1024 * 1024),
            ("1.5KiB", 1_536),
            ("0.5B", 0),
            ("18446744073709551615", u64::MAX),
        ];
        for (input, want) in ok {
            assert_eq!(parse_size(input), Ok(*want), "input {input:?}");
        }
        let bad: &[(&str, &str)] = &[
            ("", "empty"),
            ("-1", "negative"),
            ("-4MiB", "negative"),
            ("MiB", "expected a number"),
            ("4XB", "unknown unit"),
            ("4m", "unknown unit"),
            ("4K", "unknown unit"),
            ("16EiB", "unknown unit"),
            ("1e3", "unknown unit"),
            ("4MiB extra", "unknown unit"),
            ("NaN", "expected a number"),
            ("18446744073709551616", "too large"),
            ("17179869184GiB", "too large"),
            (
                "99999999999999999999999999999999999999999999TiB",
                "too large",
            ),
        ];
        for (input, want) in bad {
            let err = parse_size(input).expect_err(input);
            assert!(err.contains(want), "input {input:?}: {err}");
            assert!(err.contains("e.g."), "error shows an example: {err}");
        }
    }

    #[test]
    fn format_reset_cases() {
        let cases: &[(Duration, &str)] = &[
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(1), "1ms"),
            (ms(1), "1ms"),
            (ms(450), "450ms"),
            (Duration::from_micros(450_001), "451ms"),
            (ms(999), "999ms"),
            (Duration::from_micros(999_500), "1s"),
            (secs(1), "1s"),
            (ms(1_001), "2s"),
            (secs(12), "12s"),
            (secs(59), "59s"),
            (secs(60), "1m0s"),
            (secs(90), "1m30s"),
            (ms(89_001), "1m30s"),
            (secs(3_600), "1h0m0s"),
            (secs(3_723), "1h2m3s"),
            (secs(90_000), "25h0m0s"),
            (Duration::MAX, "5124095576030431h0m15s"),
        ];
        for (input, want) in cases {
            assert_eq!(format_reset(*input), *want, "input {input:?}");
        }
    }

    #[test]
    fn format_rfc3339_cases() {
        let cases: &[(i64, &str)] = &[
            (0, "1970-01-01T00:00:00Z"),
            (-1, "1969-12-31T23:59:59Z"),
            (1_795_478_400, "2026-11-24T00:00:00Z"),
            (1_757_721_600, "2025-09-13T00:00:00Z"),
            (951_827_696, "2000-02-29T12:34:56Z"),
            (1_709_271_000, "2024-03-01T05:30:00Z"),
            (-2_203_891_200, "1900-03-01T00:00:00Z"),
            (-62_135_596_800, "0001-01-01T00:00:00Z"),
            (253_402_300_799, "9999-12-31T23:59:59Z"),
            (-62_167_219_200, "0000-01-01T00:00:00Z"),
            (-62_167_219_201, "-0001-12-31T23:59:59Z"),
            (-377_705_116_800, "-9999-01-01T00:00:00Z"),
            // Beyond the calendar's years -9999..=9999: its nearest end, never a panic.
            (253_402_300_800, "9999-12-31T23:59:59Z"),
            (i64::MAX, "9999-12-31T23:59:59Z"),
            (-377_705_116_801, "-9999-01-01T00:00:00Z"),
            (i64::MIN, "-9999-01-01T00:00:00Z"),
        ];
        for (input, want) in cases {
            assert_eq!(format_rfc3339(*input), *want, "input {input}");
        }
    }

    #[test]
    fn rfc3339_round_trips() {
        // Every day boundary across leap and century years, plus odd seconds.
        let start = -62_167_219_200_i64; // 0000-01-01
        let end = 253_402_300_799_i64; // 9999-12-31T23:59:59
        let mut t = start;
        while t <= end {
            let text = format_rfc3339(t);
            assert_eq!(parse_rfc3339(&text), Some(t as f64), "{text}");
            t += 86_400 * 7 + 3_601;
        }
        for t in [start, end, 0, -1, 951_782_400, 951_868_799] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t as f64));
        }
    }

    #[test]
    fn parse_rfc3339_accepts() {
        let base = 1_757_721_600.0; // 2025-09-13T00:00:00Z
        let cases: &[(&str, f64)] = &[
            ("2025-09-13T00:00:00Z", base),
            ("2025-09-13T00:00:00+00:00", base),
            ("2025-09-13T00:00:00-00:00", base),
            ("2025-09-13T00:00:00+0000", base),
            ("2025-09-13 00:00:00+00:00", base),
            ("2025-09-13t00:00:00z", base),
            ("  2025-09-13T00:00:00Z  ", base),
            ("2025-09-12T18:30:00-05:30", base),
            ("2025-09-13T05:30:00+05:30", base),
            ("2025-09-13T05:30:00+0530", base),
            ("2025-09-13T05:00:00+05", base),
            ("2025-09-13T00:00:00.5Z", base + 0.5),
            ("2025-09-13T00:00:00,25Z", base + 0.25),
            (
                "2025-09-13T00:00:00.123456789123Z",
                base + 0.123_456_789_123,
            ),
            ("2025-09-13T00:00:00", base),
            ("2025-09-13T00:00", base),
            ("2025-09-13T00:00Z", base),
            ("2025-09-13", base),
            ("2025-09-12T23:59:60Z", base),
            ("2024-02-29T00:00:00Z", 1_709_164_800.0),
            ("2000-02-29T12:34:56Z", 951_827_696.0),
            ("1969-12-31T23:59:59Z", -1.0),
            ("0000-01-01T00:00:00Z", -62_167_219_200.0),
            ("9999-12-31T23:59:59+00:00", 253_402_300_799.0),
            ("2025-01-01T00:00:00-23:59", 1_735_689_600.0 + 86_340.0),
        ];
        for (input, want) in cases {
            let got = parse_rfc3339(input);
            let close = got.is_some_and(|g| (g - want).abs() < 1e-6);
            assert!(close, "input {input:?}: got {got:?}, want {want}");
        }
    }

    #[test]
    fn parse_rfc3339_rejects() {
        let cases = [
            "",
            " ",
            "garbage",
            "2025-13-01T00:00:00Z",
            "2025-00-01T00:00:00Z",
            "2025-09-32T00:00:00Z",
            "2025-09-00T00:00:00Z",
            "2025-09-31T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2025-09-13T25:00:00Z",
            "2025-09-13T24:00:00Z",
            "2025-09-13T00:60:00Z",
            "2025-09-13T00:00:61Z",
            "2025-09-13T00:00:00+24:00",
            "2025-09-13T00:00:00+00:60",
            "2025-09-13T00:00:00Zjunk",
            "2025-09-13T00:00:00+00:00x",
            "2025-09-13T00:00:00.Z",
            "2025-09-13T00:00:00+0",
            "2025-09-13T00:00:00+000",
            "2025-09-13T00:00:00+00:0",
            "2025-09-13X00:00:00Z",
            "2025-09-13T0:00:00Z",
            "2025-9-13T00:00:00Z",
            "25-09-13T00:00:00Z",
            "+2025-09-13T00:00:00Z",
            "2025/09/13T00:00:00Z",
            "2025-09-13T",
            "2025-09-13T00",
            "2025-09-13T00:00:",
            "2025-09-1",
            "1757721600",
            "2025-09-13T00:00:00ZZ",
            // In UTC these fall in the years -1 and 10000.
            "0000-01-01T00:00:00+00:01",
            "9999-12-31T23:59:59-00:01",
            "２０２５-09-13T00:00:00Z",
        ];
        for input in cases {
            assert_eq!(parse_rfc3339(input), None, "input {input:?}");
        }
    }

    #[test]
    fn parse_hhmm_cases() {
        let ok: &[(&str, u32)] = &[
            ("00:00", 0),
            ("23:59", 86_340),
            ("12:30", 45_000),
            ("9:05", 32_700),
            (" 01:00 ", 3_600),
        ];
        for (input, want) in ok {
            assert_eq!(parse_hhmm(input), Ok(*want), "input {input:?}");
        }
        let bad = [
            "",
            "24:00",
            "23:60",
            "12",
            "12:3",
            "12:300",
            "123:00",
            "-1:00",
            "+1:00",
            "ab:cd",
            "12:30:00",
            "12:30Z",
            ":30",
            "12:",
            "1 2:30",
            "٠٠:٠٠",
        ];
        for input in bad {
            let err = parse_hhmm(input).expect_err(input);
            assert!(err.contains("e.g."), "{err}");
        }
        for (text, secs) in ok {
            let shown = format_hhmm(*secs);
            assert_eq!(parse_hhmm(&shown), Ok(*secs), "{text:?} -> {shown:?}");
        }
        assert_eq!(format_hhmm(32_700), "09:05");
    }

    #[test]
    fn day_arithmetic() {
        let midnight = 1_757_721_600_i64; // 2025-09-13T00:00:00Z
        let cases: &[(i64, u32, i64, i64)] = &[
            // (now, offset, day index, day end)
            (0, 0, 0, 86_400),
            (86_399, 0, 0, 86_400),
            (86_400, 0, 1, 172_800),
            (-1, 0, -1, 0),
            (-86_400, 0, -1, 0),
            (-86_401, 0, -2, -86_400),
            (midnight, 0, 20_344, midnight + 86_400),
            (midnight - 1, 0, 20_343, midnight),
            // Reset at 06:00 UTC: 05:59 still belongs to the previous quota day.
            (
                midnight + 5 * 3_600,
                6 * 3_600,
                20_343,
                midnight + 6 * 3_600,
            ),
            (
                midnight + 6 * 3_600,
                6 * 3_600,
                20_344,
                midnight + 86_400 + 6 * 3_600,
            ),
        ];
        for &(now, offset, day, end) in cases {
            assert_eq!(day_index(now, offset), day, "day_index({now}, {offset})");
            assert_eq!(day_end(day, offset), end, "day_end({day}, {offset})");
            assert!(now < day_end(day_index(now, offset), offset));
        }
        // Extremes saturate instead of overflowing.
        for now in [i64::MIN, i64::MAX] {
            for offset in [0, 86_399, u32::MAX] {
                let day = day_index(now, offset);
                let _ = day_end(day, offset);
            }
        }
        assert_eq!(day_end(i64::MAX, 0), i64::MAX);
        assert_eq!(day_end(i64::MIN, u32::MAX), i64::MIN + i64::from(u32::MAX));
    }

    #[test]
    fn garbage_never_panics() {
        // Every string up to three characters over an alphabet of the grammar's own
        // characters plus some hostile ones: no parser may panic, and what parses is sane.
        let alphabet = [
            "0",
            "9",
            ".",
            ":",
            "-",
            "+",
            "T",
            "Z",
            " ",
            "s",
            "m",
            "h",
            "d",
            "µ",
            "B",
            "K",
            "i",
            "\u{0}",
            "é",
            "1999-12-31T23:59:",
        ];
        let mut inputs = vec![String::new()];
        for _ in 0..3 {
            let mut next = Vec::new();
            for prefix in &inputs {
                for c in alphabet {
                    next.push(format!("{prefix}{c}"));
                }
            }
            inputs.extend(next);
            inputs.sort();
            inputs.dedup();
        }
        for input in &inputs {
            let _ = parse_duration(input);
            let _ = parse_wait(input);
            let _ = parse_size(input);
            let _ = parse_hhmm(input).map(|s| assert!(s < 86_400));
            if let Some(t) = parse_rfc3339(input) {
                assert!(t.is_finite(), "{input:?}");
            }
        }
    }
}

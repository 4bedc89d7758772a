//! `chutes-proxy status`: fetch `/status` from a running proxy's admin listener and print what a
//! person needs at a glance: is the account usable, how much of today is spent and when it
//! resets, whether it is paused and why, and what is waiting.
//!
//! Owns the fetch (plain HTTP, bounded in time and size), the check that the answer really is a
//! `/status` document, and [`render`], a pure function from that document to text so the
//! wording is unit-tested without a proxy. It does not own the document's shape: that is the
//! one [`Status`] type (`status.rs`) the admin listener writes, read here with its tolerance
//! (missing keys default, unknown keys ignored, a section of the wrong type read as empty), so
//! an older or newer proxy still gets a useful summary, never a panic.
//!
//! Also owns which admin address to ask ([`admin_address`]): `--admin`, else
//! `CHUTES_PROXY_ADMIN_LISTEN` (or the top-level `--admin-listen`), else the config file's
//! `server.admin_listen`, else the default, the same precedence the proxy itself applies, so
//! `status` (and the container's HEALTHCHECK) asks where the proxy listens.

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, USER_AGENT};
use http::{Request, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::status::Status;

/// The whole exchange, connect to last byte. The admin listener answers from memory in
/// microseconds; anything slower than this is a wedged process or the wrong address, and a
/// person at a terminal (or a script in a cron job) should hear so rather than hang.
const TIMEOUT: Duration = Duration::from_secs(5);
/// A `/status` document is a few KiB even with many clients; more than this is not one.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// Width of the daily-usage bar, in characters: fits an 80-column line with the numbers.
const BAR_WIDTH: u64 = 20;
/// How much of the last upstream 429's body the summary shows (the JSON has more).
const BODY_CHARS: usize = 160;
/// Width of the label column.
const LABEL: usize = 11;

/// Run the command: exit 0 with the summary (or the raw JSON) on stdout, or exit 1 with one
/// line on stderr saying what went wrong.
pub async fn run(admin: &str, json: bool) -> ExitCode {
    let result = match status_url(admin) {
        Ok(url) => fetch(&url).await,
        Err(e) => Err(e),
    };
    let doc = match result {
        Ok(doc) => doc,
        Err(e) => {
            eprintln!("chutes-proxy status: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `--json` prints the document as the proxy sent it, keys this build does not know
    // included; the summary reads it into the one `Status` type the proxy wrote it from.
    let out = if json {
        let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
        s.push('\n');
        s
    } else {
        match serde_json::from_value::<Status>(doc) {
            Ok(status) => render(&status, use_color()),
            Err(e) => {
                eprintln!("chutes-proxy status: the /status document does not read: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    // Not `print!`: that panics when stdout is a closed pipe (`status | head -1`).
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
    ExitCode::SUCCESS
}

/// Colour only for a person at a terminal who has not opted out (https://no-color.org: set
/// and non-empty disables it) and whose terminal can show it (`TERM=dumb` cannot: Emacs'
/// shell, some CI logs).
fn use_color() -> bool {
    color_wanted(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
        std::env::var_os("TERM").as_deref(),
    )
}

fn color_wanted(
    terminal: bool,
    no_color: Option<&std::ffi::OsStr>,
    term: Option<&std::ffi::OsStr>,
) -> bool {
    let opted_out = no_color.is_some_and(|v| !v.is_empty());
    let dumb = term.is_some_and(|t| t == "dumb");
    terminal && !opted_out && !dumb
}

/// The admin address `status` asks, by precedence: `--admin`, then `listen_override`
/// (`CHUTES_PROXY_ADMIN_LISTEN` or `--admin-listen`), then `server.admin_listen` in the config
/// file (`config`: its path and whether it was named explicitly; an unnamed default file
/// that does not exist is skipped, as the proxy skips it), then the default.
///
/// Only `server.admin_listen` is read from the file, not the whole config validated: a
/// health check must not fail because, say, the API key is not in its environment. A listener
/// on the unspecified address (`0.0.0.0`, `[::]`) is asked on loopback.
pub fn admin_address(
    flag: Option<&str>,
    listen_override: Option<&str>,
    config: Option<(&std::path::Path, bool)>,
) -> Result<String, String> {
    if let Some(a) = flag {
        return Ok(a.to_string());
    }
    let (listen, from) = if let Some(a) = listen_override {
        (a.to_string(), "CHUTES_PROXY_ADMIN_LISTEN".to_string())
    } else if let Some(a) = config.map(file_admin_listen).transpose()?.flatten() {
        a
    } else {
        return Ok(crate::config::DEFAULT_ADMIN_LISTEN.to_string());
    };
    if listen.trim().is_empty() {
        return Err(format!(
            "the admin listener is disabled ({from} is \"\"); pass --admin URL"
        ));
    }
    Ok(match listen.trim().parse::<std::net::SocketAddr>() {
        Ok(mut a) if a.ip().is_unspecified() => {
            a.set_ip(match a.ip() {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
            a.to_string()
        }
        _ => listen,
    })
}

/// `server.admin_listen` of the config file at `path`, with where it came from; `None` if the
/// file does not set it (or is an unnamed default that does not exist).
fn file_admin_listen(
    (path, explicit): (&std::path::Path, bool),
) -> Result<Option<(String, String)>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read config file {}: {e}", path.display())),
    };
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        format!(
            "config file {} is not valid TOML: {}",
            path.display(),
            e.message()
        )
    })?;
    match table.get("server").and_then(|s| s.get("admin_listen")) {
        None => Ok(None),
        Some(toml::Value::String(a)) => Ok(Some((
            a.clone(),
            format!("server.admin_listen in {}", path.display()),
        ))),
        Some(_) => Err(format!(
            "server.admin_listen in {} is not a string",
            path.display()
        )),
    }
}

/// `--admin` as given (`http://host:port`, `host:port`, with or without a trailing `/status`)
/// -> the `/status` URL.
fn status_url(admin: &str) -> Result<Uri, String> {
    let admin = admin.trim();
    let with_scheme = if admin.contains("://") {
        admin.to_string()
    } else {
        format!("http://{admin}")
    };
    let uri: Uri = with_scheme
        .parse()
        .map_err(|e| format!("invalid --admin URL {admin:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "invalid --admin URL {admin:?}: only http:// is supported (the admin listener does not speak TLS)"
        ));
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("invalid --admin URL {admin:?}: no host"));
    };
    let base = uri.path().trim_end_matches('/');
    let path = if base.ends_with("/status") {
        base.to_string()
    } else {
        format!("{base}/status")
    };
    format!("http://{authority}{path}")
        .parse()
        .map_err(|e| format!("invalid --admin URL {admin:?}: {e}"))
}

async fn fetch(url: &Uri) -> Result<Value, String> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(url.clone())
        .header(ACCEPT, "application/json")
        .header(
            USER_AGENT,
            concat!("chutes-proxy-status/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::new())
        .map_err(|e| format!("invalid --admin URL {url}: {e}"))?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| {
            format!(
                "cannot reach the proxy's admin listener at {url}: {} (is the proxy running, and is --admin its server.admin_listen?)",
                causes(&e)
            )
        })?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer from {url} failed: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "{url} answered {status}, not a /status document (is --admin the proxy's admin listener, not its main one?)"
            ));
        }
        let doc: Value = serde_json::from_slice(&body).map_err(|e| {
            format!("{url} did not answer with JSON ({e}): is --admin the proxy's admin listener?")
        })?;
        check_document(&doc).map_err(|missing| {
            format!(
                "{url} answered JSON that is not a chutes-proxy /status document (no {missing})"
            )
        })?;
        Ok(doc)
    };
    match tokio::time::timeout(TIMEOUT, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer from {url} within {}s (is something else listening there?)",
            TIMEOUT.as_secs()
        )),
    }
}

/// The error and its causes on one line. hyper-util's own message ("client error (Connect)")
/// says little; the words a person needs ("Connection refused") are in its sources.
fn causes(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = e.source();
    while let Some(cause) = next {
        parts.push(cause.to_string());
        next = cause.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

/// The fields without which the summary would be meaningless; returns the first one absent.
fn check_document(doc: &Value) -> Result<(), &'static str> {
    let has = |pointer: &str, ok: fn(&Value) -> bool| doc.pointer(pointer).is_some_and(ok);
    if !has("/version", Value::is_string) {
        Err("\"version\"")
    } else if !has("/limits", Value::is_object) {
        Err("\"limits\"")
    } else if !has("/daily", Value::is_object) {
        Err("\"daily\"")
    } else if !has("/daily/used", Value::is_u64) {
        Err("\"daily.used\"")
    } else {
        Ok(())
    }
}

/// ANSI styling that is a no-op without colour, so the plain output is the same text.
struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }
    fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }
    fn red(&self, s: &str) -> String {
        self.paint("1;31", s)
    }
    fn green(&self, s: &str) -> String {
        self.paint("32", s)
    }
    fn yellow(&self, s: &str) -> String {
        self.paint("33", s)
    }
}

/// Text from the document made safe for a terminal: control characters (an upstream body
/// could carry escape sequences) are shown escaped, and long text is cut at `max` characters.
fn clean(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A duration for people: `400ms`, `2.5s`, `42s`, `12m05s`, `3h12m`, `2d4h`.
pub fn human_duration(secs: f64) -> String {
    if !secs.is_finite() || secs <= 0.0 {
        return "0s".to_string();
    }
    if secs < 1.0 {
        return format!("{}ms", (secs * 1000.0).round().max(1.0) as u64);
    }
    if secs < 10.0 {
        return format!("{:.1}s", (secs * 10.0).floor() / 10.0);
    }
    // Whole seconds from here; u64 saturates for absurd values rather than wrapping.
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3_599 => format!("{}m{:02}s", s / 60, s % 60),
        3_600..=86_399 => format!("{}h{:02}m", s / 3_600, s % 3_600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3_600),
    }
}

/// `[####----------------] 812/5000 (16%)`: used of the daily cap.
fn bar(used: u64, cap: u64, style: &Style) -> String {
    // u128: `used * 100` cannot overflow whatever the document says.
    let (u, c) = (u128::from(used), u128::from(cap.max(1)));
    let pct = (u * 100 / c).min(100) as u64;
    let filled = (u * u128::from(BAR_WIDTH) / c).min(u128::from(BAR_WIDTH)) as usize;
    let hashes = "#".repeat(filled);
    let dashes = "-".repeat(BAR_WIDTH as usize - filled);
    let hashes = if pct >= 90 {
        style.red(&hashes)
    } else if pct >= 75 {
        style.yellow(&hashes)
    } else {
        style.green(&hashes)
    };
    format!("[{hashes}{dashes}] {used}/{cap} ({pct}%)")
}

/// The summary `chutes-proxy status` prints, from a `/status` document. Pure: the same
/// document gives the same text. With `color` false the output is plain ASCII apart from any
/// non-ASCII text inside the document itself (an upstream body, a client name). A field an
/// older proxy did not send reads as its default (`status.rs`), which says nothing here: an
/// empty string or a zero capacity leaves its part of the summary out.
pub fn render(status: &Status, color: bool) -> String {
    let st = Style { color };
    let mut lines: Vec<(String, String)> = Vec::new();
    let mut line = |label: &str, value: String| lines.push((label.to_string(), value));
    let or = |s: &str, other: &'static str| if s.is_empty() { other } else { s }.to_string();

    // Header: what is answering, and for how long.
    let mut head = format!("chutes-proxy {}", clean(&or(&status.version, "?"), 40));
    let _ = write!(head, ", up {}", human_duration(status.uptime_seconds));
    if !status.upstream.is_empty() {
        let _ = write!(head, ", upstream {}", clean(&status.upstream, 200));
    }

    // State: the one word people look for.
    let state_line = match status.state.as_str() {
        "open" => st.green("open"),
        "probe_ready" => st.yellow("reopening: the next request probes the upstream"),
        "probe_in_flight" => {
            st.yellow("reopening: a probe request is in flight; others wait for its answer")
        }
        "cooldown" => st.red("COOLDOWN: the upstream answered 429; nothing is sent until it ends"),
        "upstream_window_exhausted" => {
            st.yellow("paused: the upstream reported no requests left in its window")
        }
        "daily_quota_exhausted" => st.red("DAILY QUOTA EXHAUSTED: nothing is sent until the reset"),
        "" => "unknown".to_string(),
        other => clean(other, 60),
    };
    line("state", state_line);

    // Fleet: several replicas sharing the budget through Redis.
    if let Some(fleet) = &status.fleet {
        let mut s = format!("redis {}", clean(&or(&fleet.redis_url, "?"), 120));
        if !fleet.key_prefix.is_empty() {
            let _ = write!(s, " (prefix \"{}\")", clean(&fleet.key_prefix, 60));
        }
        if !fleet.reachable {
            let mut bad = "UNREACHABLE".to_string();
            if let Some(e) = &fleet.last_error {
                let _ = write!(bad, " ({})", clean(e, 120));
            }
            let _ = match fleet.on_redis_error.as_str() {
                "fail_closed" => write!(bad, "; requests are shed with 503"),
                "local" => write!(bad, "; running on a local share of the budget"),
                _ => Ok(()),
            };
            let _ = write!(s, ": {}", st.red(&bad));
        } else {
            s.push_str(": reachable");
            if let Some(used) = fleet.used_today {
                let _ = write!(s, ", {used} used today fleet-wide");
            }
            if let Some(until) = &fleet.cooldown_until {
                let _ = write!(
                    s,
                    ", {}",
                    st.red(&format!("cooldown until {}", clean(until, 40)))
                );
            }
            if let Some(until) = &fleet.quota_gate_until {
                let _ = write!(
                    s,
                    ", {}",
                    st.red(&format!("quota gate until {}", clean(until, 40)))
                );
            }
        }
        line("fleet", s);
    }

    // Today: used of the cap, and when it resets.
    let daily = &status.daily;
    match daily.limit.or(status.limits.requests_per_day) {
        Some(cap) => {
            let mut s = bar(daily.used, cap, &st);
            if let Some(rem) = daily.remaining {
                let _ = write!(s, ", {rem} left");
            }
            line("today", s);
        }
        None => line("today", format!("{} used (no daily cap)", daily.used)),
    }
    if !daily.resets_at.is_empty() {
        line(
            "resets",
            format!(
                "in {} at {}",
                human_duration(daily.resets_in_seconds),
                clean(&daily.resets_at, 40)
            ),
        );
    }
    if let Some(gate) = &daily.upstream_quota_gate_until {
        // A proxy that does not say what closed it (older builds) closed it on a 402.
        let why = daily
            .gate_reason
            .as_deref()
            .unwrap_or("the upstream answered 402 quota exceeded");
        line(
            "quota gate",
            st.red(&format!(
                "{}; closed until {}",
                clean(why, 120),
                clean(gate, 40)
            )),
        );
    }
    if daily.assumed {
        line(
            "assumed",
            st.yellow(
                "today's count is an assumption: the state file could not be trusted at start",
            ),
        );
    }
    if let Some(mine) = daily.replica_used {
        line(
            "replica",
            format!("{mine} of today's count sent by this replica"),
        );
    }
    // Why a new request would wait, and for how long.
    if let Some(why) = status.limited_by.as_deref() {
        line(
            "limited by",
            format!(
                "{} (a new request would wait {})",
                clean(why, 60),
                human_duration(status.new_request_wait_seconds)
            ),
        );
    }

    // Tokens: what can go now, and when the next one comes. A bucket has a capacity of at
    // least 1; none means the document had no tokens to tell of.
    let tokens = &status.tokens;
    let limits = &status.limits;
    let capacity = if tokens.capacity > 0 {
        tokens.capacity
    } else {
        limits.burst
    };
    if capacity > 0 {
        let mut s = format!("{}/{capacity} available", tokens.available);
        if tokens.next_in_seconds > 0.0 {
            let _ = write!(s, ", next in {}", human_duration(tokens.next_in_seconds));
        }
        let _ = write!(
            s,
            " {}",
            st.dim(&format!(
                "({}/min, burst {})",
                limits.requests_per_minute, limits.burst
            ))
        );
        line("tokens", s);
    }

    // Cooldown: whether the account is paused, until when, and what the upstream said.
    let cooldown = &status.cooldown;
    let level = cooldown.level;
    if cooldown.active {
        let mut s = if cooldown.kind.as_deref() == Some("upstream_window") {
            "PAUSED (upstream window empty)".to_string()
        } else {
            "ACTIVE".to_string()
        };
        if let Some(until) = &cooldown.until {
            let _ = write!(s, " until {}", clean(until, 40));
        }
        if let Some(left) = cooldown.remaining_seconds {
            let _ = write!(s, " ({} left)", human_duration(left));
        }
        let _ = write!(s, ", level {level}");
        line("cooldown", st.red(&s));
    } else if level > 0 {
        line(
            "cooldown",
            format!("none (level {level}: another 429 soon would pause longer)"),
        );
    } else {
        line("cooldown", "none".to_string());
    }
    if let Some(last) = &cooldown.last_upstream_429 {
        let mut s = format!("{} ago", human_duration(last.ago_seconds));
        if !last.at.is_empty() {
            let _ = write!(s, " ({})", clean(&last.at, 40));
        }
        if last.status != 0 {
            let _ = write!(s, ", status {}", last.status);
        }
        if last.headers.is_empty() {
            s.push_str(", no rate-limit headers");
        } else {
            let headers: Vec<String> = last
                .headers
                .iter()
                .map(|(name, value)| format!("{}: {}", clean(name, 60), clean(value, 80)))
                .collect();
            let _ = write!(s, "; {}", headers.join("; "));
        }
        if !last.body.trim().is_empty() {
            let _ = write!(s, "; body \"{}\"", clean(last.body.trim(), BODY_CHARS));
        }
        line("last 429", s);
    }

    // Queue and concurrency.
    let queue = &status.queue;
    let mut s = if queue.depth == 0 {
        "empty".to_string()
    } else {
        format!("{} waiting", queue.depth)
    };
    if let Some(oldest) = queue.oldest_wait_seconds {
        let _ = write!(s, ", oldest {}", human_duration(oldest));
    }
    if limits.queue_max_depth > 0 {
        let _ = write!(
            s,
            " {}",
            st.dim(&format!(
                "(max {}, wait up to {})",
                limits.queue_max_depth,
                human_duration(limits.queue_max_wait_seconds)
            ))
        );
    }
    line("queue", s);
    line(
        "in flight",
        match limits.max_concurrent {
            0 => status.in_flight.to_string(),
            max => format!("{}/{max}", status.in_flight),
        },
    );

    // Counters since start: forwarded first, then each reason that happened.
    if !status.requests.is_empty() {
        let mut parts = Vec::new();
        if let Some(n) = status.requests.get("forwarded") {
            parts.push(format!("forwarded {n}"));
        }
        for (reason, n) in &status.requests {
            if *n > 0 && reason != "forwarded" {
                parts.push(format!("{} {n}", clean(reason, 40)));
            }
        }
        line("requests", parts.join(", "));
    }
    let parts: Vec<String> = status
        .upstream_responses
        .iter()
        .map(|(code, n)| format!("{}: {n}", clean(code, 10)))
        .collect();
    line(
        "upstream",
        if parts.is_empty() {
            "none yet".to_string()
        } else {
            parts.join(", ")
        },
    );

    let mut out = st.bold(&head);
    out.push('\n');
    for (label, value) in &lines {
        let _ = writeln!(out, "{label:<LABEL$}{value}");
    }

    // Per-client lines, only when clients are configured (the default one alone says nothing
    // the lines above have not).
    let clients = &status.clients;
    let only_default = clients.len() == 1 && clients[0].name == "default";
    if !clients.is_empty() && !only_default {
        out.push_str("clients\n");
        for c in clients {
            let name = clean(&or(&c.name, "?"), 40);
            let mut s = format!("{} today", c.used_today);
            if let Some(cap) = c.requests_per_day {
                let _ = write!(s, " of {cap}");
            }
            let _ = write!(s, ", {} queued, weight {}", c.queued, c.weight);
            if let Some(rpm) = c.requests_per_minute {
                let _ = write!(s, ", {rpm}/min");
            }
            let outcomes: Vec<String> = c
                .outcomes
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| format!("{} {n}", clean(k, 40)))
                .collect();
            if !outcomes.is_empty() {
                let _ = write!(s, "; {}", outcomes.join(", "));
            }
            let _ = writeln!(out, "  {name:<width$}{s}", width = LABEL - 2);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A document shaped like `admin.rs` writes it: open, 812 of 5000 used.
    fn open_doc() -> Value {
        json!({
            "version": "0.1.0",
            "uptime_seconds": 4000.5,
            "now": "2026-11-23T20:48:00Z",
            "state": "open",
            "upstream": "https://llm.chutes.ai",
            "api_key": "configured",
            "limits": {
                "requests_per_minute": 50, "burst": 5, "requests_per_day": 5000,
                "day_reset_utc": "00:00", "max_concurrent": 16, "queue_max_depth": 1000,
                "queue_max_wait_seconds": 20.0
            },
            "tokens": {"available": 3, "capacity": 5, "spacing_seconds": 1.2, "next_in_seconds": 0.4},
            "daily": {
                "used": 812, "limit": 5000, "remaining": 4188, "exhausted": false,
                "resets_at": "2026-11-24T00:00:00Z", "resets_in_seconds": 11520.0,
                "resets_in": "3h12m0s", "upstream_quota_gate_until": null
            },
            "cooldown": {"active": false, "kind": null, "until": null, "remaining_seconds": null,
                         "level": 0, "gate": "open", "last_upstream_429": null},
            "queue": {"depth": 0, "oldest_wait_seconds": null},
            "in_flight": 2,
            "requests": {"bad_request": 0, "forwarded": 812, "queue_full": 0, "queue_timeout": 3},
            "upstream_responses": {"200": 811, "500": 1},
            "clients": [{"name": "default", "weight": 1, "queued": 0, "used_today": 812,
                         "forwarded": 812, "requests_per_minute": null, "requests_per_day": null,
                         "outcomes": {"forwarded": 812}}]
        })
    }

    /// Read a JSON document as the command does, then render it.
    fn show(doc: &Value, color: bool) -> String {
        render(&serde_json::from_value(doc.clone()).unwrap(), color)
    }

    fn set(doc: &mut Value, pointer: &str, v: Value) {
        *doc.pointer_mut(pointer).expect(pointer) = v;
    }

    #[test]
    fn open_account_summary() {
        let out = show(&open_doc(), false);
        let want = [
            "chutes-proxy 0.1.0, up 1h06m, upstream https://llm.chutes.ai",
            "state      open",
            "today      [###-----------------] 812/5000 (16%), 4188 left",
            "resets     in 3h12m at 2026-11-24T00:00:00Z",
            "tokens     3/5 available, next in 400ms (50/min, burst 5)",
            "cooldown   none",
            "queue      empty (max 1000, wait up to 20s)",
            "in flight  2/16",
            "requests   forwarded 812, queue_timeout 3",
            "upstream   200: 811, 500: 1",
        ];
        assert_eq!(out, want.join("\n") + "\n");
        assert!(out.is_ascii());
    }

    #[test]
    fn colour_only_when_asked() {
        assert!(!show(&open_doc(), false).contains('\x1b'));
        let coloured = show(&open_doc(), true);
        assert!(coloured.contains("\x1b[32mopen\x1b[0m"), "{coloured}");
    }

    #[test]
    fn bar_and_percentages() {
        let plain = Style { color: false };
        let cases: &[(u64, u64, &str)] = &[
            (0, 300, "[--------------------] 0/300 (0%)"),
            (150, 300, "[##########----------] 150/300 (50%)"),
            (299, 300, "[###################-] 299/300 (99%)"),
            (300, 300, "[####################] 300/300 (100%)"),
            // More used than the cap (an upstream that counted differently): full, not a panic.
            (400, 300, "[####################] 400/300 (100%)"),
            (
                u64::MAX,
                1,
                "[####################] 18446744073709551615/1 (100%)",
            ),
            (5, 0, "[####################] 5/0 (100%)"),
        ];
        for (used, cap, want) in cases {
            assert_eq!(bar(*used, *cap, &plain), *want);
        }
    }

    #[test]
    fn no_daily_cap_shows_used_only() {
        let mut doc = open_doc();
        set(&mut doc, "/daily/limit", Value::Null);
        set(&mut doc, "/daily/remaining", Value::Null);
        set(&mut doc, "/limits/requests_per_day", Value::Null);
        let out = show(&doc, false);
        assert!(
            out.contains("today      812 used (no daily cap)\n"),
            "{out}"
        );
        assert!(!out.contains('['), "{out}");
    }

    #[test]
    fn cooldown_with_last_429() {
        let mut doc = open_doc();
        set(&mut doc, "/state", json!("cooldown"));
        set(
            &mut doc,
            "/cooldown",
            json!({
                "active": true, "kind": "rate_limited", "until": "2026-11-23T21:00:00Z",
                "remaining_seconds": 723.2, "level": 2, "gate": "open",
                "last_upstream_429": {
                    "at": "2026-11-23T20:47:00Z", "ago_seconds": 60.0, "status": 429,
                    "headers": [["retry-after", "30"], ["x-ratelimit-remaining", "0"], "junk"],
                    // An escape sequence from the upstream must not reach the terminal.
                    "body": "<html>\n<h1>429 Too Many\u{1b}[31m Requests</h1>"
                }
            }),
        );
        let out = show(&doc, false);
        assert!(
            out.contains("state      COOLDOWN: the upstream answered 429"),
            "{out}"
        );
        assert!(
            out.contains("cooldown   ACTIVE until 2026-11-23T21:00:00Z (12m03s left), level 2\n"),
            "{out}"
        );
        assert!(out.contains("last 429   1m00s ago (2026-11-23T20:47:00Z), status 429; retry-after: 30; x-ratelimit-remaining: 0; body \"<html>\\n<h1>429 Too Many\\u{1b}[31m Requests</h1>\"\n"), "{out}");
        assert!(!out.contains('\x1b'));
    }

    #[test]
    fn daily_quota_exhausted_and_queue() {
        let mut doc = open_doc();
        set(&mut doc, "/state", json!("daily_quota_exhausted"));
        set(&mut doc, "/daily/used", json!(5000));
        set(&mut doc, "/daily/remaining", json!(0));
        set(
            &mut doc,
            "/daily/upstream_quota_gate_until",
            json!("2026-11-24T00:00:00Z"),
        );
        set(
            &mut doc,
            "/queue",
            json!({"depth": 4, "oldest_wait_seconds": 2.345}),
        );
        set(&mut doc, "/cooldown/level", json!(1));
        let out = show(&doc, false);
        assert!(out.contains("DAILY QUOTA EXHAUSTED"), "{out}");
        assert!(
            out.contains("[####################] 5000/5000 (100%), 0 left"),
            "{out}"
        );
        assert!(
            out.contains("quota gate the upstream answered 402"),
            "{out}"
        );
        assert!(
            out.contains("queue      4 waiting, oldest 2.3s (max 1000"),
            "{out}"
        );
        assert!(out.contains("cooldown   none (level 1:"), "{out}");
        // A proxy that says what closed the gate, and what limits a new request.
        doc["daily"]["gate_reason"] =
            json!("the fleet's daily count reached its cap (or another replica's gate)");
        doc["limited_by"] = json!("daily_quota_exhausted");
        doc["new_request_wait_seconds"] = json!(3600.0);
        let out = show(&doc, false);
        assert!(
            out.contains("quota gate the fleet's daily count reached its cap"),
            "{out}"
        );
        assert!(
            out.contains("limited by daily_quota_exhausted (a new request would wait 1h"),
            "{out}"
        );
    }

    #[test]
    fn fleet_line_says_whether_redis_answers() {
        assert!(!show(&open_doc(), false).contains("fleet"));
        let mut doc = open_doc();
        doc["fleet"] = json!({
            "redis_url": "redis://<redacted>@10.0.0.5:6379/0", "key_prefix": "chutes-proxy:",
            "on_redis_error": "fail_closed", "reachable": true, "healthy": true,
            "last_error": null, "used_today": 2412, "cooldown_until": "2026-11-23T21:00:00Z",
            "cooldown_level": 1, "quota_gate_until": null, "probe_needed": false
        });
        let out = show(&doc, false);
        assert!(out.contains("fleet      redis redis://<redacted>@10.0.0.5:6379/0 (prefix \"chutes-proxy:\"): reachable, 2412 used today fleet-wide, cooldown until 2026-11-23T21:00:00Z\n"), "{out}");
        doc["fleet"]["reachable"] = json!(false);
        doc["fleet"]["last_error"] = json!("Connection refused (os error 111)");
        let out = show(&doc, false);
        assert!(
            out.contains(
                ": UNREACHABLE (Connection refused (os error 111)); requests are shed with 503\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn per_client_lines_only_with_configured_clients() {
        assert!(!show(&open_doc(), false).contains("clients"));
        let mut doc = open_doc();
        set(
            &mut doc,
            "/clients",
            json!([
                {"name": "default", "weight": 1, "queued": 0, "used_today": 12, "outcomes": {"forwarded": 12}},
                {"name": "chatbot", "weight": 3, "queued": 2, "used_today": 800,
                 "requests_per_minute": 30, "requests_per_day": 2000,
                 "outcomes": {"forwarded": 800, "client_rate_limited": 5, "queue_full": 0}}
            ]),
        );
        let out = show(&doc, false);
        assert!(out.contains("\nclients\n  default  12 today, 0 queued, weight 1; forwarded 12\n  chatbot  800 today of 2000, 2 queued, weight 3, 30/min; client_rate_limited 5, forwarded 800\n"), "{out}");
    }

    #[test]
    fn never_panics_on_odd_documents() {
        let odd = [
            json!(null),
            json!([1, 2, 3]),
            json!("status"),
            json!({}),
            json!({"daily": "x", "limits": 5, "cooldown": {"active": "yes", "last_upstream_429": []}}),
            json!({"daily": {"used": -1, "limit": 0, "resets_in_seconds": -5.0},
                   "tokens": {"available": 1e300}, "queue": {"depth": 1, "oldest_wait_seconds": 1e300},
                   "clients": [null, {"name": 5}], "requests": {"x": "y"}, "upstream_responses": []}),
        ];
        for doc in &odd {
            // Only a JSON object is a document at all (`check_document` turns the rest away);
            // any object reads, whatever its fields hold.
            match serde_json::from_value::<Status>(doc.clone()) {
                Ok(status) => {
                    for color in [false, true] {
                        let _ = render(&status, color);
                    }
                }
                Err(_) => assert!(!doc.is_object(), "{doc}"),
            }
        }
    }

    #[test]
    fn durations_for_people() {
        let cases: &[(f64, &str)] = &[
            (f64::NAN, "0s"),
            (-3.0, "0s"),
            (0.0, "0s"),
            (0.0001, "1ms"),
            (0.4, "400ms"),
            (2.55, "2.5s"),
            (42.4, "42s"),
            (725.0, "12m05s"),
            (11_520.0, "3h12m"),
            (190_000.0, "2d4h"),
            (1e300, "213503982334601d7h"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(*secs), *want, "{secs}");
        }
    }

    #[test]
    fn admin_urls() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "http://127.0.0.1:9090",
                Some("http://127.0.0.1:9090/status"),
            ),
            (
                "http://127.0.0.1:9090/",
                Some("http://127.0.0.1:9090/status"),
            ),
            ("127.0.0.1:9090", Some("http://127.0.0.1:9090/status")),
            (
                " http://localhost:9090/status ",
                Some("http://localhost:9090/status"),
            ),
            ("http://host:1/prefix/", Some("http://host:1/prefix/status")),
            ("https://host:9090", None),
            ("http://", None),
            ("not a url at all", None),
        ];
        for (input, want) in cases {
            let got = status_url(input).map(|u| u.to_string()).ok();
            assert_eq!(got.as_deref(), *want, "{input:?}");
        }
    }

    /// Issue 18, item 9: `status --config FILE` ignored the file's admin_listen, and the
    /// environment variable was ignored too.
    #[test]
    fn the_admin_address_follows_flag_then_env_then_file_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[server]\nadmin_listen = \"127.0.0.1:19191\"\n").unwrap();
        let cfg = Some((file.as_path(), true));
        let got = |flag, env, cfg| admin_address(flag, env, cfg);
        assert_eq!(
            got(Some("http://h:1"), Some("127.0.0.1:2"), cfg).unwrap(),
            "http://h:1"
        );
        assert_eq!(got(None, Some("127.0.0.1:2"), cfg).unwrap(), "127.0.0.1:2");
        assert_eq!(got(None, None, cfg).unwrap(), "127.0.0.1:19191");
        assert_eq!(got(None, None, None).unwrap(), "127.0.0.1:9090");
        // A container's 0.0.0.0 is asked on loopback.
        assert_eq!(
            got(None, Some("0.0.0.0:9091"), None).unwrap(),
            "127.0.0.1:9091"
        );
        assert_eq!(got(None, Some("[::]:9091"), None).unwrap(), "[::1]:9091");
        // A file without the key, and an unnamed default file that is absent: the default.
        std::fs::write(&file, "[limits]\nburst = 2\n").unwrap();
        assert_eq!(got(None, None, cfg).unwrap(), "127.0.0.1:9090");
        let absent = dir.path().join("absent.toml");
        assert_eq!(
            got(None, None, Some((absent.as_path(), false))).unwrap(),
            "127.0.0.1:9090"
        );
        assert!(got(None, None, Some((absent.as_path(), true))).is_err());
        std::fs::write(&file, "[server]\nadmin_listen = \"\"\n").unwrap();
        let e = got(None, None, cfg).unwrap_err();
        assert!(e.contains("disabled"), "{e}");
    }

    #[test]
    fn no_colour_for_dumb_terminals_or_no_color() {
        use std::ffi::OsStr;
        assert!(color_wanted(true, None, Some(OsStr::new("xterm-256color"))));
        assert!(!color_wanted(false, None, None));
        assert!(!color_wanted(true, None, Some(OsStr::new("dumb"))));
        assert!(!color_wanted(true, Some(OsStr::new("1")), None));
        // NO_COLOR set but empty does not opt out (no-color.org).
        assert!(color_wanted(true, Some(OsStr::new("")), None));
    }

    #[test]
    fn documents_are_checked() {
        assert!(check_document(&open_doc()).is_ok());
        assert_eq!(check_document(&json!({"ok": true})), Err("\"version\""));
        let mut doc = open_doc();
        set(&mut doc, "/daily/used", json!("many"));
        assert_eq!(check_document(&doc), Err("\"daily.used\""));
    }
}

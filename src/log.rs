//! The one log line per request: who asked, what happened, how long it waited and took, and
//! how many bytes moved. Emitted once, when the response has been fully sent (or the client
//! left), so streamed responses are logged with their real duration and size.
//!
//! Never logged: the query string (it may carry user data), any header value, the API key or a
//! client token.
//!
//! Also here: the binary's subscriber ([`dispatch`], in a [`Style`]), and writers each cheaper
//! than tracing-subscriber's own and writing the same bytes: [`RequestLines`], the request
//! line itself, without tracing's field machinery; [`PlainFields`], the field formatter of the
//! text log when it has no colours; [`JsonLine`], the JSON log's line; [`LogTime`], the
//! timestamp of every line.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::time::FormatTime;

use crate::body::UploadStats;

pub struct RequestLog {
    pub request_id: LogId,
    pub client: Arc<str>,
    /// The request body's `model`, when it named one (bounded length).
    pub model: Option<Arc<str>>,
    /// Re-sends after upstream 429s on the client's behalf.
    pub retries: u32,
    pub method: http::Method,
    pub path: LogPath,
    /// What the client got.
    pub status: u16,
    /// What the upstream answered, when it was asked and answered.
    pub upstream_status: Option<u16>,
    /// `forwarded`, a shed reason, or `client_gone` (the client left before any response).
    pub outcome: &'static str,
    pub started: Instant,
    pub queue_wait: Option<Duration>,
    /// Time from sending upstream to the response head.
    pub upstream_latency: Option<Duration>,
    pub upload: Option<Arc<UploadStats>>,
    pub bytes_out: u64,
    pub stream_error: Option<String>,
    pub stream_error_events: bool,
    logged: bool,
}

/// The request id as the log shows it: the header value the response carries, shared, not
/// copied (it is checked to be printable ASCII, or made by the proxy).
#[derive(Debug, Clone)]
pub struct LogId(pub http::HeaderValue);

impl LogId {
    fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or("")
    }
}

impl std::fmt::Display for LogId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The request's path as the log shows it: the request's own path and query (shared bytes,
/// not a copy; 40 bytes where the whole URI is 88, in every queued request), cut to
/// [`LogPath::MAX`] bytes with an ellipsis when longer, so a hostile client cannot write
/// megabyte lines.
#[derive(Debug, Clone)]
pub struct LogPath(Option<http::uri::PathAndQuery>);

impl LogPath {
    pub const MAX: usize = 256;

    /// The path of `uri`, as `Uri::path` gives it ("" for a target with none).
    pub fn of(uri: &http::Uri) -> LogPath {
        LogPath(uri.path_and_query().cloned())
    }

    /// The path as shown, and the ellipsis when it was cut.
    fn shown(&self) -> (&str, &'static str) {
        let path = self.0.as_ref().map_or("", |p| p.path());
        if path.len() <= LogPath::MAX {
            return (path, "");
        }
        let mut end = LogPath::MAX;
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        (&path[..end], "…")
    }
}

impl std::fmt::Display for LogPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (path, cut) = self.shown();
        f.write_str(path)?;
        f.write_str(cut)
    }
}

impl RequestLog {
    pub fn new(request_id: LogId, client: Arc<str>, method: http::Method, path: LogPath) -> Self {
        RequestLog {
            request_id,
            client,
            model: None,
            retries: 0,
            method,
            path,
            status: 0,
            upstream_status: None,
            // Until the pipeline says otherwise: a request whose client left before any
            // response (while queued, or before the upstream answered) is logged as such.
            outcome: "client_gone",
            started: Instant::now(),
            queue_wait: None,
            upstream_latency: None,
            upload: None,
            bytes_out: 0,
            stream_error: None,
            stream_error_events: false,
            logged: false,
        }
    }

    /// Emit the line (once).
    pub fn finish(&mut self) {
        if self.logged {
            return;
        }
        self.logged = true;
        self.emit(self.started.elapsed());
    }

    /// The line, for a request that took `total`. Under the binary's subscriber it is written
    /// straight into the log's buffer by [`RequestLines`]; anywhere else (colours, inside a
    /// span, a test's or an embedder's subscriber) it is an ordinary tracing event.
    fn emit(&self, total: Duration) {
        // Asked as the event below would be, with its field names: a `RUST_LOG` directive
        // that names fields (`chutes_proxy::request[{client}]=info`) matches only events that
        // have them. Keep the list the event's (`the_filter_is_asked_with_every_field_the_event_has`).
        if !tracing::event_enabled!(
            target: "chutes_proxy::request",
            tracing::Level::INFO,
            message,
            request_id,
            client,
            model,
            retries,
            method,
            path,
            status,
            upstream_status,
            outcome,
            queue_wait_ms,
            upstream_ms,
            total_ms,
            bytes_in,
            bytes_out,
            stream_error,
            stream_error_events
        ) {
            return;
        }
        let bytes_in = self
            .upload
            .as_ref()
            .map_or(0, |u| u.bytes.load(Ordering::Relaxed));
        // Decided inside, emitted outside: an event dispatched from within `get_default`
        // would find no subscriber.
        let written =
            tracing::dispatcher::get_default(|d| match d.downcast_ref::<RequestLines>() {
                Some(lines) if d.current_span().id().is_none() => {
                    lines.write(self, total, bytes_in)
                }
                _ => false,
            });
        if written {
            return;
        }
        let ms = |d: Option<Duration>| d.map(millis);
        tracing::info!(
            target: "chutes_proxy::request",
            request_id = %self.request_id,
            client = %self.client,
            model = self.model.as_deref(),
            retries = self.retries,
            method = %self.method,
            path = %self.path,
            status = self.status,
            upstream_status = self.upstream_status,
            outcome = self.outcome,
            queue_wait_ms = ms(self.queue_wait),
            upstream_ms = ms(self.upstream_latency),
            total_ms = millis(total),
            bytes_in,
            bytes_out = self.bytes_out,
            stream_error = self.stream_error.as_deref(),
            stream_error_events = self.stream_error_events,
            "request"
        );
    }
}

/// Milliseconds rounded to microseconds: `0.442`, not `0.44167700000000004` (a binary
/// float printed in full). Still a number, so JSON logs stay numeric; finer than a
/// microsecond means nothing for a request over the network.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        self.finish();
    }
}

/// How the log is written (`--log-format`, and whether stderr is a terminal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Text with colour codes, for a person at a terminal.
    Coloured,
    /// Text without them.
    Plain,
    /// One JSON object a line.
    Json,
}

/// The binary's subscriber: `filter`'s lines in `style`, into `out`. Each line is the bytes
/// tracing-subscriber's own formatter writes for it (text: `DefaultFields` with ANSI off, or
/// with colours; JSON: its JSON formatter with flattened fields), for less: see
/// [`PlainFields`], [`JsonLine`], [`LogTime`] and [`RequestLines`].
pub fn dispatch<W: std::io::Write + Send + 'static>(
    style: Style,
    filter: tracing_subscriber::EnvFilter,
    out: &crate::logbuf::Batched<W>,
) -> tracing::Dispatch {
    let lines = out.clone();
    dispatch_with(
        style,
        filter,
        out.clone(),
        Box::new(move |line: &[u8]| lines.write_line(line)),
        LogTime,
        true,
    )
}

/// [`dispatch`], with the writer, the request lines' output and the timer given, and the
/// request lines' direct path optional (the tests compare it with tracing's own).
fn dispatch_with<M, T>(
    style: Style,
    filter: tracing_subscriber::EnvFilter,
    writer: M,
    request_lines: LineOut,
    timer: T,
    direct: bool,
) -> tracing::Dispatch
where
    M: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
    T: FormatTime + Clone + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(style == Style::Coloured)
        .with_target(false)
        .with_timer(timer.clone());
    let lines = direct.then(|| RequestLines {
        json: style == Style::Json,
        timer: Box::new(timer.clone()),
        out: request_lines,
    });
    match style {
        Style::Json => {
            let sub = builder
                .json()
                .flatten_event(true)
                .event_format(JsonLine::with_timer(timer))
                .finish();
            tracing::Dispatch::new(sub.with(lines))
        }
        Style::Plain => {
            tracing::Dispatch::new(builder.fmt_fields(PlainFields).finish().with(lines))
        }
        // For a person at a terminal: nothing to save there.
        Style::Coloured => tracing::Dispatch::new(builder.finish()),
    }
}

/// The request line written straight into the log's buffer: the bytes the subscriber's own
/// formatter writes for that event (checked byte for byte by the tests), without tracing's
/// field machinery, which recorded the line's 17 fields one virtual call and one type check
/// at a time and was 12% of the proxy's instructions per request (callgrind, BENCHMARKS.md).
/// A layer that does nothing with events: [`RequestLog`] finds it in the current dispatcher
/// once the filter, asked as the event would ask it, has said yes.
pub struct RequestLines {
    json: bool,
    timer: Box<dyn FormatTime + Send + Sync>,
    out: LineOut,
}

/// Where a whole line goes.
type LineOut = Box<dyn Fn(&[u8]) + Send + Sync>;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RequestLines {}

impl RequestLines {
    /// Whether the line was written. One that could not be formatted (only a failing timer
    /// can make it fail) is left to the event, so the formatter reports it its own way.
    fn write(&self, log: &RequestLog, total: Duration, bytes_in: u64) -> bool {
        thread_local! {
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        let emit = |line: &mut String| {
            line.clear();
            let formatted = if self.json {
                self.json_line(line, log, total, bytes_in)
            } else {
                self.text_line(line, log, total, bytes_in)
            };
            if formatted.is_ok() {
                (self.out)(line.as_bytes());
            }
            formatted.is_ok()
        };
        LINE.with(|cell| match cell.try_borrow_mut() {
            Ok(mut line) => {
                let written = emit(&mut line);
                // A line is a few hundred bytes; one with a huge error is not kept around.
                if line.capacity() > 16 * 1024 {
                    *line = String::new();
                }
                written
            }
            Err(_) => emit(&mut String::new()),
        })
    }

    /// `<time>  INFO request request_id=… client=… …`, as `Format<Full>` with
    /// [`PlainFields`] writes it outside any span.
    fn text_line(
        &self,
        w: &mut String,
        log: &RequestLog,
        total: Duration,
        bytes_in: u64,
    ) -> std::fmt::Result {
        // As `Format<Full>` does: a timer that fails leaves a mark, not a lost line.
        if self.timer.format_time(&mut Writer::new(w)).is_err() {
            w.push_str("<unknown time>");
        }
        w.push_str("  INFO request");
        fields::<Text>(w, log, total, bytes_in)?;
        w.push('\n');
        Ok(())
    }

    /// `{"timestamp":…,"level":"INFO","message":"request","request_id":…}`, as [`JsonLine`]
    /// writes it outside any span.
    fn json_line(
        &self,
        w: &mut String,
        log: &RequestLog,
        total: Duration,
        bytes_in: u64,
    ) -> std::fmt::Result {
        w.push_str("{\"timestamp\":\"");
        let at = w.len();
        self.timer.format_time(&mut Writer::new(w))?;
        if w[at..].bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
            let time = w.split_off(at);
            JsonEscaped(w).write_str(&time)?;
        }
        w.push_str("\",\"level\":\"INFO\",\"message\":\"request\"");
        fields::<Json>(w, log, total, bytes_in)?;
        w.push_str("}\n");
        Ok(())
    }
}

/// A field's key in both syntaxes, each one literal (one push per key).
struct Key {
    text: &'static str,
    json: &'static str,
}

macro_rules! key {
    ($name:literal) => {
        &Key {
            text: concat!(" ", $name, "="),
            json: concat!(",\"", $name, "\":"),
        }
    };
}

/// The request line's fields, in the order of `RequestLog::emit`'s event, in either syntax.
fn fields<S: Syntax>(
    w: &mut String,
    log: &RequestLog,
    total: Duration,
    bytes_in: u64,
) -> std::fmt::Result {
    S::display(w, key!("request_id"), log.request_id.as_str(), "")?;
    S::display(w, key!("client"), &log.client, "")?;
    if let Some(model) = &log.model {
        S::string(w, key!("model"), model)?;
    }
    S::number(w, key!("retries"), u64::from(log.retries));
    S::display(w, key!("method"), log.method.as_str(), "")?;
    let (path, cut) = log.path.shown();
    S::display(w, key!("path"), path, cut)?;
    S::number(w, key!("status"), u64::from(log.status));
    if let Some(status) = log.upstream_status {
        S::number(w, key!("upstream_status"), u64::from(status));
    }
    S::string(w, key!("outcome"), log.outcome)?;
    if let Some(d) = log.queue_wait {
        S::millis(w, key!("queue_wait_ms"), d)?;
    }
    if let Some(d) = log.upstream_latency {
        S::millis(w, key!("upstream_ms"), d)?;
    }
    S::millis(w, key!("total_ms"), total)?;
    S::number(w, key!("bytes_in"), bytes_in);
    S::number(w, key!("bytes_out"), log.bytes_out);
    if let Some(e) = &log.stream_error {
        S::string(w, key!("stream_error"), e)?;
    }
    S::key(w, key!("stream_error_events"));
    w.push_str(if log.stream_error_events {
        "true"
    } else {
        "false"
    });
    Ok(())
}

/// How a field is written: its key, then its value by kind, as the subscriber's formatter
/// writes that kind (a `%` value, a `&str`, an integer, [`millis`]).
trait Syntax {
    fn key(w: &mut String, name: &Key);

    /// A `Display` value, shown as `value` then `cut` (the path's ellipsis).
    fn display(w: &mut String, name: &Key, value: &str, cut: &str) -> std::fmt::Result;

    fn string(w: &mut String, name: &Key, value: &str) -> std::fmt::Result;

    fn number(w: &mut String, name: &Key, n: u64) {
        Self::key(w, name);
        w.push_str(itoa::Buffer::new().format(n));
    }

    fn millis(w: &mut String, name: &Key, d: Duration) -> std::fmt::Result;
}

/// ` name=value`: `Display` values as they are, strings by their `Debug`.
struct Text;

impl Syntax for Text {
    fn key(w: &mut String, name: &Key) {
        w.push_str(name.text);
    }

    fn display(w: &mut String, name: &Key, value: &str, cut: &str) -> std::fmt::Result {
        Self::key(w, name);
        w.push_str(value);
        w.push_str(cut);
        Ok(())
    }

    fn string(w: &mut String, name: &Key, value: &str) -> std::fmt::Result {
        Self::key(w, name);
        debug_str(w, value)
    }

    fn millis(w: &mut String, name: &Key, d: Duration) -> std::fmt::Result {
        Self::key(w, name);
        match duration_parts(d) {
            Some(parts) => write_millis(w, parts),
            None => debug_f64(w, millis(d)),
        }
    }
}

/// `,"name":value`: `Display` values and strings as JSON strings.
struct Json;

impl Syntax for Json {
    fn key(w: &mut String, name: &Key) {
        w.push_str(name.json);
    }

    fn display(w: &mut String, name: &Key, value: &str, cut: &str) -> std::fmt::Result {
        Self::key(w, name);
        w.push('"');
        JsonEscaped(&mut *w).write_str(value)?;
        w.push_str(cut);
        w.push('"');
        Ok(())
    }

    fn string(w: &mut String, name: &Key, value: &str) -> std::fmt::Result {
        Self::key(w, name);
        json_str(w, value)
    }

    fn millis(w: &mut String, name: &Key, d: Duration) -> std::fmt::Result {
        Self::key(w, name);
        match duration_parts(d) {
            Some(parts) => write_millis(w, parts),
            None => json_f64(w, millis(d)),
        }
    }
}

/// A string field's value as the text log writes it: its `Debug`, quoted and escaped, with
/// printable ASCII that needs no escape written as is.
fn debug_str<W: std::fmt::Write + ?Sized>(w: &mut W, value: &str) -> std::fmt::Result {
    if value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        w.write_char('"')?;
        w.write_str(value)?;
        w.write_char('"')
    } else {
        write!(w, "{value:?}")
    }
}

/// A float field's value as the text log writes it: its `Debug`.
fn debug_f64<W: std::fmt::Write + ?Sized>(w: &mut W, value: f64) -> std::fmt::Result {
    match millis_parts(value) {
        Some(parts) => write_millis(w, parts),
        None => write!(w, "{value:?}"),
    }
}

/// A float field's value as the JSON log writes it: serde_json's, which agrees with `Debug`
/// on the durations; anything else (NaN is `null`, large and tiny numbers are written
/// otherwise) is left to it.
fn json_f64<W: std::fmt::Write + ?Sized>(w: &mut W, value: f64) -> std::fmt::Result {
    match millis_parts(value) {
        Some(parts) => write_millis(w, parts),
        None => match serde_json::to_string(&value) {
            Ok(text) => w.write_str(&text),
            Err(_) => Err(std::fmt::Error),
        },
    }
}

/// The log lines' timestamp: the bytes of tracing-subscriber's default timer
/// (`2026-12-01T12:33:11.042917Z`, UTC, microseconds) for the years 1970 to 9999, with the date
/// and time of day formatted once per second per thread instead of for every line (2.2% of the
/// proxy's instructions per request, callgrind, BENCHMARKS.md 2026-12-01). The clock is read
/// through `clock::unix_time`, like every other wall-clock reading.
#[derive(Debug, Clone, Copy)]
pub struct LogTime;

impl LogTime {
    fn write(now: Duration, w: &mut Writer<'_>) -> std::fmt::Result {
        thread_local! {
            /// The last second formatted on this thread, as `YYYY-MM-DDTHH:MM:SS.`.
            static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
        }
        let secs = now.as_secs();
        let prefix = |secs: u64| {
            let mut p = crate::units::format_rfc3339(i64::try_from(secs).unwrap_or(i64::MAX));
            p.pop(); // the 'Z'
            p.push('.');
            p
        };
        SECOND.with(|cell| match cell.try_borrow_mut() {
            Ok(mut cached) => {
                if cached.0 != secs {
                    *cached = (secs, prefix(secs));
                }
                w.write_str(&cached.1)
            }
            // Only if formatting a time logged something on the same thread: no cache then.
            Err(_) => w.write_str(&prefix(secs)),
        })?;
        let micros = now.subsec_micros();
        let mut digits = itoa::Buffer::new();
        let text = digits.format(micros);
        for _ in text.len()..6 {
            w.write_char('0')?;
        }
        w.write_str(text)?;
        w.write_char('Z')
    }
}

impl FormatTime for LogTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        LogTime::write(crate::clock::unix_time(), w)
    }
}

/// The text log's fields without colours: the bytes tracing-subscriber's `DefaultFields` writes
/// with ANSI off (`name=value` by `Debug`, separated by spaces), without going through its
/// styling, which costs even when it styles nothing: the access line was a fifth of the
/// proxy's instructions per request, most of it there (callgrind, BENCHMARKS.md 2026-12-01).
/// The rare fields it treats specially (`message`, `r#` names, errors) are handed to it.
pub struct PlainFields;

impl<'a> MakeVisitor<Writer<'a>> for PlainFields {
    type Visitor = PlainVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> PlainVisitor<'a> {
        PlainVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
        }
    }
}

pub struct PlainVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: std::fmt::Result,
}

impl PlainVisitor<'_> {
    /// Let `DefaultVisitor` write one field, as it would have; it always writes (and pads).
    fn delegate(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        let mut v = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut v);
        self.is_empty = false;
        self.result = v.finish();
    }
}

impl PlainVisitor<'_> {
    /// Whether `name` is an ordinary field (written as `name=value`), not one of those the
    /// default formatter treats specially or skips.
    fn plain(name: &str) -> bool {
        !(name == "message" || name.starts_with("r#") || name.starts_with("log."))
    }

    /// `name=` and the separator before it, for an ordinary field.
    fn start(&mut self, name: &str) -> bool {
        if self.result.is_err() {
            return false;
        }
        let sep = if self.is_empty { "" } else { " " };
        self.is_empty = false;
        self.result = (|| {
            self.writer.write_str(sep)?;
            self.writer.write_str(name)?;
            self.writer.write_char('=')
        })();
        self.result.is_ok()
    }

    fn put(&mut self, s: &str) {
        self.result = self.writer.write_str(s);
    }
}

impl Visit for PlainVisitor<'_> {
    // Numbers, flags and plain strings are written without `core::fmt` (the same digits and
    // quotes as their `Debug`); anything else goes through `record_debug`.
    fn record_u64(&mut self, field: &Field, value: u64) {
        if !Self::plain(field.name()) {
            return self.record_debug(field, &value);
        }
        if self.start(field.name()) {
            self.put(itoa::Buffer::new().format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if value >= 0 {
            return self.record_u64(field, value.unsigned_abs());
        }
        self.record_debug(field, &value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if !Self::plain(field.name()) {
            return self.record_debug(field, &value);
        }
        if self.start(field.name()) {
            self.put(if value { "true" } else { "false" });
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if !Self::plain(field.name()) {
            return self.record_debug(field, &value);
        }
        if self.start(field.name()) {
            self.result = debug_f64(&mut self.writer, value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if !Self::plain(field.name()) {
            if self.result.is_ok() && !field.name().starts_with("log.") {
                self.delegate(|v| v.record_str(field, value));
            }
            return;
        }
        if self.start(field.name()) {
            self.result = debug_str(&mut self.writer, value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_ok() {
            self.delegate(|v| v.record_error(field, value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // `log.` fields are the log crate's metadata, already written (DefaultVisitor skips
        // them too).
        if name.starts_with("log.") {
            return;
        }
        if name == "message" || name.starts_with("r#") {
            self.delegate(|v| v.record_debug(field, value));
            return;
        }
        if self.start(name) {
            self.result = write!(self.writer, "{value:?}");
        }
    }
}

/// A duration in milliseconds as [`millis`] rounds it, split at the point: whole
/// milliseconds and thousandths, for a whole number of microseconds below 10^9 ms; `None`
/// for any other value. Such a value's shortest round-trip decimal is its three-decimal one
/// with trailing zeros cut: doubles there are far closer together than 0.001, so no shorter
/// decimal reads back as the same double. [`write_millis`] writes it.
fn millis_parts(v: f64) -> Option<(u64, u32)> {
    if !(0.0..1e9).contains(&v) {
        return None;
    }
    let micros = (v * 1000.0).round();
    if micros / 1000.0 != v {
        return None;
    }
    let micros = micros as u64;
    Some((micros / 1000, (micros % 1000) as u32))
}

/// `millis_parts(millis(d))`, without the division and the second rounding: the microseconds
/// [`millis`] rounds `d` to, when below 10^12.
fn duration_parts(d: Duration) -> Option<(u64, u32)> {
    let micros = (d.as_secs_f64() * 1_000_000.0).round();
    if micros >= 1e12 {
        return None;
    }
    let micros = micros as u64;
    Some((micros / 1000, (micros % 1000) as u32))
}

/// What `{:?}` writes for the milliseconds `whole.frac` (frac in thousandths), as
/// [`millis_parts`] splits them: `0.442`, `1.0`, `12345.679`, without `core::fmt`'s float
/// printer.
fn write_millis<W: std::fmt::Write + ?Sized>(
    w: &mut W,
    (whole, frac): (u64, u32),
) -> std::fmt::Result {
    w.write_str(itoa::Buffer::new().format(whole))?;
    w.write_char('.')?;
    let digits = [frac / 100, frac / 10 % 10, frac % 10];
    let n = match frac {
        0 => return w.write_char('0'),
        _ if frac % 100 == 0 => 1,
        _ if frac % 10 == 0 => 2,
        _ => 3,
    };
    for d in &digits[..n] {
        // A digit: below 10.
        w.write_char(char::from(b'0' + *d as u8))?;
    }
    Ok(())
}

impl VisitOutput<std::fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> std::fmt::Result {
        self.result
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn std::fmt::Write {
        &mut self.writer
    }
}

/// The JSON log (`--log-format json`): the bytes of tracing-subscriber's JSON formatter as
/// [`dispatch`] sets it up (flattened fields, no target), written straight into the line's
/// buffer. Its own goes through `serde_json`'s serializer a few bytes at a time, each checked
/// as UTF-8 on the way, and was over a quarter of the proxy's instructions per request with
/// that format (callgrind, BENCHMARKS.md). An event inside a span (the proxy opens none; a
/// dependency could) is handed to that formatter, which also writes the span.
pub struct JsonLine<T = LogTime> {
    timer: T,
    spans: tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json, T>,
}

impl<T: FormatTime + Clone> JsonLine<T> {
    pub fn with_timer(timer: T) -> Self {
        JsonLine {
            spans: tracing_subscriber::fmt::format()
                .json()
                .flatten_event(true)
                .with_target(false)
                .with_timer(timer.clone()),
            timer,
        }
    }
}

impl<S, N, T> tracing_subscriber::fmt::FormatEvent<S, N> for JsonLine<T>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    T: FormatTime,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        if event.parent().is_some() || ctx.lookup_current().is_some() {
            return self.spans.format_event(ctx, writer, event);
        }
        // The timestamp first, as the default does: a formatter error leaves no half line.
        let mut timestamp = String::with_capacity(32);
        self.timer.format_time(&mut Writer::new(&mut timestamp))?;
        writer.write_str("{\"timestamp\":")?;
        json_str(&mut writer, &timestamp)?;
        writer.write_str(",\"level\":\"")?;
        writer.write_str(event.metadata().level().as_str())?;
        writer.write_char('"')?;
        let mut fields = JsonVisitor {
            writer: writer.by_ref(),
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str("}\n")
    }
}

/// Each field as `,"name":value`, as `tracing_serde::SerdeMapVisitor` serializes it: numbers
/// and flags as JSON, strings and everything else (its `Debug`) as JSON strings.
struct JsonVisitor<'a> {
    writer: Writer<'a>,
    result: std::fmt::Result,
}

impl JsonVisitor<'_> {
    fn key(&mut self, field: &Field) -> bool {
        if self.result.is_ok() {
            self.result = (|| {
                self.writer.write_char(',')?;
                json_str(&mut self.writer, field.name())?;
                self.writer.write_char(':')
            })();
        }
        self.result.is_ok()
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.key(field) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.key(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.key(field) {
            let mut buf = itoa::Buffer::new();
            let digits = buf.format(value.unsigned_abs());
            self.result = (|| {
                if value < 0 {
                    self.writer.write_char('-')?;
                }
                self.writer.write_str(digits)
            })();
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.key(field) {
            self.result = json_f64(&mut self.writer, value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if self.key(field) {
            self.result = json_str(&mut self.writer, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.key(field) {
            self.result = (|| {
                self.writer.write_char('"')?;
                write!(JsonEscaped(&mut self.writer), "{value:?}")?;
                self.writer.write_char('"')
            })();
        }
    }
}

/// `s` as a JSON string, quotes included.
fn json_str<W: std::fmt::Write + ?Sized>(w: &mut W, s: &str) -> std::fmt::Result {
    w.write_char('"')?;
    JsonEscaped(w).write_str(s)?;
    w.write_char('"')
}

/// Writes what passes through it escaped as serde_json escapes the inside of a string: `"`,
/// backslash and the control characters below U+0020 (`\n`-style where JSON has a short
/// form, else `\u00XX` in lowercase hex); everything else as is.
struct JsonEscaped<'a, W: ?Sized>(&'a mut W);

impl<W: std::fmt::Write + ?Sized> std::fmt::Write for JsonEscaped<'_, W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let bytes = s.as_bytes();
        let mut clean = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let short = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..=0x1f => "",
                _ => continue,
            };
            // Everything up to here is clean, and `i` is at an ASCII byte: a char boundary.
            self.0.write_str(&s[clean..i])?;
            clean = i + 1;
            if short.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let code = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ];
                self.0
                    .write_str(std::str::from_utf8(&code).map_err(|_| std::fmt::Error)?)?;
            } else {
                self.0.write_str(short)?;
            }
        }
        self.0.write_str(&s[clean..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn the_logged_path_has_no_query_and_is_cut_at_its_bound() {
        let short: http::Uri = "/v1/chat/completions?key=secret".parse().unwrap();
        assert_eq!(LogPath::of(&short).to_string(), "/v1/chat/completions");
        let long: http::Uri = format!("/{}?q=1", "a".repeat(400)).parse().unwrap();
        let shown = LogPath::of(&long).to_string();
        assert_eq!(shown, format!("{}…", &long.path()[..LogPath::MAX]));
        // As `Uri::path` shows them: an authority-form target (CONNECT) has no path.
        for target in ["example.com:443", "*", "http://example.com", "http://h/x?y"] {
            let uri: http::Uri = target.parse().unwrap();
            assert_eq!(LogPath::of(&uri).to_string(), uri.path(), "{target}");
        }
    }

    #[test]
    fn the_logged_request_id_is_the_header_value() {
        let id = LogId(http::HeaderValue::from_static("cp-1a2b"));
        assert_eq!(id.to_string(), "cp-1a2b");
    }

    /// What a test subscriber wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The same bytes as tracing-subscriber's own field formatter without colours, for every
    /// kind of field the request line and the other events use.
    #[test]
    fn plain_fields_write_what_the_default_formatter_writes() {
        use tracing_subscriber::fmt::format::DefaultFields;

        fn emit() {
            let err = std::io::Error::other("boom");
            let none: Option<&str> = None;
            tracing::info!(
                request_id = %"abc-1",
                client = %"default",
                model = Some("m/x \"q\""),
                path = "/v1/chat/completions?x=1",
                empty = "",
                unicode = "naïve",
                big = u64::MAX,
                skipped = none,
                retries = 2u32,
                status = 200u16,
                neg = -3i64,
                total_ms = 1.0f64,
                upstream_ms = 0.442f64,
                flag = true,
                dbg = ?vec![1, 2],
                error = &err as &(dyn std::error::Error + 'static),
                "request \u{1b}[31m"
            );
            tracing::warn!(r#type = "t", r#n = 5u64, "second");
            tracing::info!(message = "a message as a str", ok = false);
            tracing::info!("only a message");
        }
        let line = |plain: bool| {
            let buf = Buf::default();
            let out = buf.clone();
            let b = tracing_subscriber::fmt()
                .with_writer(move || out.clone())
                .with_ansi(false)
                .without_time()
                .with_target(false);
            if plain {
                tracing::subscriber::with_default(b.fmt_fields(PlainFields).finish(), emit);
            } else {
                tracing::subscriber::with_default(
                    b.fmt_fields(DefaultFields::new()).finish(),
                    emit,
                );
            }
            let bytes = buf.0.lock().unwrap().clone();
            String::from_utf8(bytes).unwrap()
        };
        let (ours, theirs) = (line(true), line(false));
        assert!(theirs.contains("request_id=abc-1"), "{theirs}");
        assert_eq!(ours, theirs);
    }

    /// The same bytes as tracing-subscriber's JSON formatter set up as `dispatch` sets it up,
    /// for the request line's kinds of field, strings that need every kind of escape, the
    /// numbers serde_json writes its own way, and events inside spans.
    #[test]
    fn json_lines_are_what_the_json_formatter_writes() {
        fn emit() {
            let err = std::io::Error::other("boom \"quoted\"");
            let none: Option<&str> = None;
            let every_byte: String = (0u8..0x80).map(char::from).collect();
            tracing::info!(
                request_id = %"abc-1",
                client = %"default",
                model = Some("m/x \"q\" \\ naïve ✓"),
                skipped = none,
                retries = 2u32,
                method = %http::Method::POST,
                path = %"/v1/chat/completions?x=1",
                status = 200u16,
                outcome = "forwarded",
                neg = -3i64,
                min = i64::MIN,
                big = u64::MAX,
                huge = 12_345_678_901_234_567_890u128,
                queue_wait_ms = 0.0f64,
                upstream_ms = 0.442f64,
                total_ms = 1.0f64,
                odd_float = 0.1 + 0.2,
                large_float = 1e21f64,
                tiny_float = 1e-7f64,
                nan = f64::NAN,
                negative_float = -2.5f64,
                flag = true,
                dbg = ?vec!["a\tb"],
                bytes = every_byte.as_str(),
                error = &err as &(dyn std::error::Error + 'static),
                "request \u{1b}[31m"
            );
            tracing::warn!(r#type = "t", "second");
            tracing::info!(message = "a message as a str", ok = false);
            tracing::error!("only a message");
            let span = tracing::info_span!("outer", id = 7u64);
            let _in = span.enter();
            tracing::info!(inside = "a span", "spanned");
        }
        let lines = |ours: bool| {
            let buf = Buf::default();
            let out = buf.clone();
            let b = tracing_subscriber::fmt()
                .with_writer(move || out.clone())
                .with_target(false)
                .with_timer(Fixed)
                .json()
                .flatten_event(true);
            if ours {
                tracing::subscriber::with_default(
                    b.event_format(JsonLine::with_timer(Fixed)).finish(),
                    emit,
                );
            } else {
                tracing::subscriber::with_default(b.finish(), emit);
            }
            let bytes = buf.0.lock().unwrap().clone();
            String::from_utf8(bytes).unwrap()
        };
        let (ours, theirs) = (lines(true), lines(false));
        assert_eq!(theirs.lines().count(), 5, "{theirs}");
        assert!(theirs.contains("\"spans\""), "{theirs}");
        for (o, t) in ours.lines().zip(theirs.lines()) {
            assert_eq!(o, t);
        }
        assert_eq!(ours, theirs);
    }

    /// The same instant for every line, so lines can be compared whole.
    #[derive(Clone)]
    struct Fixed;
    impl FormatTime for Fixed {
        fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
            LogTime::write(Duration::new(1_767_225_600, 42_000), w)
        }
    }

    /// Request lines with every field absent and present, and values that need each kind of
    /// escape in both formats.
    fn request_logs() -> Vec<(RequestLog, Duration)> {
        let log = |id: &'static str, client: &str, method: http::Method, path: &str| {
            let mut l = RequestLog::new(
                LogId(http::HeaderValue::from_static(id)),
                client.into(),
                method,
                LogPath::of(&path.parse().unwrap()),
            );
            // Emitted by hand below, not when dropped.
            l.logged = true;
            l
        };
        let bare = log("cp-1", "default", http::Method::GET, "/v1/models");
        let mut full = log(
            "req \"7\" \\ ~",
            "team-a",
            http::Method::POST,
            "/v1/chat/completions?key=secret",
        );
        full.model = Some("m/x \"q\" \\ naïve ✓\t\u{1}".into());
        full.retries = 3;
        full.status = 429;
        full.upstream_status = Some(429);
        full.outcome = "upstream_429";
        full.queue_wait = Some(Duration::from_micros(1_500));
        full.upstream_latency = Some(Duration::from_nanos(441_677));
        let stats = Arc::new(UploadStats::default());
        stats.bytes.store(u64::MAX, Ordering::Relaxed);
        full.upload = Some(stats);
        full.bytes_out = 1234;
        full.stream_error = Some("upstream cut \"mid\"\nstream".into());
        full.stream_error_events = true;
        let mut long = log(
            "cp-2",
            "naïve-client",
            http::Method::from_bytes(b"PURGE").unwrap(),
            &format!("/{}é{}", "a".repeat(254), "b".repeat(40)),
        );
        long.model = Some("plain/model".into());
        long.status = 200;
        long.upstream_status = Some(200);
        long.outcome = "forwarded";
        long.queue_wait = Some(Duration::ZERO);
        vec![
            (bare, Duration::ZERO),
            (full, Duration::from_secs(12_345)),
            // Past the milliseconds' fast path (10^9 ms): the float printers' own digits.
            (long, Duration::from_secs(2_000_000)),
        ]
    }

    /// What `style`'s subscriber writes for `logs`: (its formatter's lines, the request
    /// lines written directly).
    fn request_lines(style: Style, filter: &str, direct: bool) -> (String, String) {
        request_lines_timed(style, filter, direct, Fixed)
    }

    fn request_lines_timed<T: FormatTime + Clone + Send + Sync + 'static>(
        style: Style,
        filter: &str,
        direct: bool,
        timer: T,
    ) -> (String, String) {
        let (fmt, lines) = (Buf::default(), Buf::default());
        let (f, l) = (fmt.clone(), lines.clone());
        let dispatch = dispatch_with(
            style,
            tracing_subscriber::EnvFilter::new(filter),
            move || f.clone(),
            Box::new(move |line: &[u8]| l.0.lock().unwrap().extend_from_slice(line)),
            timer,
            direct,
        );
        tracing::dispatcher::with_default(&dispatch, || {
            for (log, total) in request_logs() {
                log.emit(total);
            }
        });
        let text = |b: Buf| String::from_utf8(b.0.lock().unwrap().clone()).unwrap();
        (text(fmt), text(lines))
    }

    /// A timer that fails: the text line is kept with a mark; the JSON line fails, and the
    /// event is left to the formatter, which reports it its own way. Either way, what comes
    /// out is what the event alone would have written.
    #[test]
    fn a_failing_timer_is_handled_as_the_formatters_handle_it() {
        #[derive(Clone)]
        struct Broken;
        impl FormatTime for Broken {
            fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
                w.write_str("half")?;
                Err(std::fmt::Error)
            }
        }
        for style in [Style::Plain, Style::Json] {
            let (theirs, _) = request_lines_timed(style, "info", false, Broken);
            assert_eq!(theirs.lines().count(), 3, "{style:?}: {theirs}");
            let (formatter, ours) = request_lines_timed(style, "info", true, Broken);
            assert_eq!(format!("{formatter}{ours}"), theirs, "{style:?}");
            // Text: written directly; JSON: left to the formatter.
            assert_eq!(ours.is_empty(), style == Style::Json, "{style:?}");
        }
        let (_, text) = request_lines_timed(Style::Plain, "info", true, Broken);
        assert!(
            text.starts_with("half<unknown time>  INFO request "),
            "{text}"
        );
    }

    #[test]
    fn request_lines_written_directly_are_what_the_formatters_write() {
        for style in [Style::Plain, Style::Json] {
            let (theirs, none) = request_lines(style, "info", false);
            assert_eq!(none, "");
            assert_eq!(theirs.lines().count(), 3, "{theirs}");
            let (nothing, ours) = request_lines(style, "info", true);
            // Every line took the direct path, and none went through the formatter.
            assert_eq!(nothing, "", "{style:?}");
            for (o, t) in ours.lines().zip(theirs.lines()) {
                assert_eq!(o, t, "{style:?}");
            }
            assert_eq!(ours, theirs, "{style:?}");
        }
        // Spot checks that the comparison is of real lines.
        let (text, _) = request_lines(Style::Plain, "info", false);
        assert!(
            text.starts_with("2026-01-01T00:00:00.000042Z  INFO request request_id=cp-1 "),
            "{text}"
        );
        assert!(text.contains(" path=/v1/chat/completions "), "{text}");
        assert!(!text.contains("secret"), "{text}");
        let (json, _) = request_lines(Style::Json, "info", false);
        for line in json.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["message"], "request");
        }
    }

    /// The filter is asked with every field name the event has (the list in `emit` is kept
    /// by hand beside the event): a directive naming any one of them enables the line.
    #[test]
    fn the_filter_is_asked_with_every_field_the_event_has() {
        let (json, _) = request_lines(Style::Json, "info", false);
        let full: serde_json::Value = serde_json::from_str(json.lines().nth(1).unwrap()).unwrap();
        let names: Vec<&str> = full
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|k| !matches!(*k, "timestamp" | "level"))
            .collect();
        assert_eq!(names.len(), 17, "{names:?}");
        for name in names {
            let filter = format!("warn,chutes_proxy::request[{{{name}}}]=info");
            let (_, ours) = request_lines(Style::Plain, &filter, true);
            assert_eq!(ours.lines().count(), 3, "{filter}");
        }
    }

    #[test]
    fn request_lines_obey_the_filter_and_leave_the_level_hint_alone() {
        for style in [Style::Plain, Style::Json] {
            // Whatever the event would have written, the direct path writes, and nothing more:
            // directives by target and level, and directives naming a field the line has
            // (`outcome`) or one it has not (`bogus`, which such a directive then ignores).
            for (filter, lines) in [
                ("chutes_proxy::request=off", 0),
                ("warn", 0),
                ("info,chutes_proxy::request[{bogus}]=off", 3),
                ("warn,chutes_proxy::request[{bogus}]=info", 0),
                ("warn,chutes_proxy::request[{outcome}]=info", 3),
                ("info,chutes_proxy::request[{outcome}]=warn", 0),
            ] {
                let (theirs, _) = request_lines(style, filter, false);
                assert_eq!(theirs.lines().count(), lines, "{filter}: {theirs}");
                let (formatter, ours) = request_lines(style, filter, true);
                assert_eq!(formatter, "", "{filter}");
                assert_eq!(ours, theirs, "{filter}");
            }
            // Other targets' lines still go through the formatter.
            let (fmt, lines) = (Buf::default(), Buf::default());
            let (f, l) = (fmt.clone(), lines.clone());
            let dispatch = dispatch_with(
                style,
                tracing_subscriber::EnvFilter::new("info"),
                move || f.clone(),
                Box::new(move |line: &[u8]| l.0.lock().unwrap().extend_from_slice(line)),
                Fixed,
                true,
            );
            tracing::dispatcher::with_default(&dispatch, || {
                tracing::info!(answered = 1u64, "another line");
                // Inside a span the line is the formatter's, which writes the span too.
                let span = tracing::info_span!("outer", id = 7u64);
                let _in = span.enter();
                let (log, total) = request_logs().swap_remove(0);
                log.emit(total);
            });
            let fmt = String::from_utf8(fmt.0.lock().unwrap().clone()).unwrap();
            assert_eq!(fmt.lines().count(), 2, "{fmt}");
            assert!(fmt.contains("another line"), "{fmt}");
            assert!(fmt.contains("outer"), "{fmt}");
            assert!(lines.0.lock().unwrap().is_empty());
        }
        // The layer adds no level of its own: `debug!` stays as cheap as without it (the
        // global level filter is the subscriber's hint).
        use tracing_subscriber::layer::SubscriberExt as _;
        let layered = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .finish()
            .with(Some(RequestLines {
                json: false,
                timer: Box::new(Fixed),
                out: Box::new(|_: &[u8]| ()),
            }));
        assert_eq!(
            tracing::Subscriber::max_level_hint(&layered),
            Some(tracing::level_filters::LevelFilter::INFO)
        );
    }

    /// Numbers, flags, strings that need escaping and the rounded milliseconds take the fast
    /// paths; each must print exactly what `Debug` prints.
    #[test]
    fn fast_paths_print_what_debug_prints() {
        let fast = |parts| {
            let mut s = String::new();
            write_millis(&mut s, parts).unwrap();
            s
        };
        // Every microsecond up to two seconds, then samples up to the fast path's bound.
        let samples = (0..2_000_000u64).chain((0..100_000u64).map(|i| i * 9_999_991 + 17));
        for micros in samples {
            let v = millis(Duration::from_micros(micros));
            let parts = millis_parts(v);
            assert_eq!(parts.map(fast), Some(format!("{v:?}")), "{micros}");
            assert_eq!(
                duration_parts(Duration::from_micros(micros)),
                parts,
                "{micros}"
            );
        }
        // Durations between microseconds, halfway ones among them, and past the bound.
        let nanos = (0..200_000u64)
            .map(|i| i * 7_919)
            .chain((0..100_000u64).map(|i| i * 9_999_991_000 + 500))
            .chain([999_999_999_999_499_999, 999_999_999_999_500_000, u64::MAX]);
        for n in nanos {
            let d = Duration::from_nanos(n);
            assert_eq!(duration_parts(d), millis_parts(millis(d)), "{n}");
        }
        for odd in [0.1 + 0.2, 1e9, 1e-7, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(millis_parts(odd), None, "{odd}");
        }
    }

    #[test]
    fn log_time_writes_what_the_default_timer_writes() {
        let at = |d: Duration| {
            let mut s = String::new();
            LogTime::write(d, &mut Writer::new(&mut s)).unwrap();
            s
        };
        for (d, want) in [
            (Duration::ZERO, "1970-01-01T00:00:00.000000Z"),
            (
                Duration::new(1_767_225_600, 42_999),
                "2026-01-01T00:00:00.000042Z",
            ),
            (
                Duration::new(1_709_164_799, 999_999_999),
                "2024-02-28T23:59:59.999999Z",
            ),
            (
                Duration::new(1_709_164_800, 123_456_000),
                "2024-02-29T00:00:00.123456Z",
            ),
            (
                Duration::new(253_402_300_799, 500_000),
                "9999-12-31T23:59:59.000500Z",
            ),
        ] {
            assert_eq!(at(d), want);
        }
        // Against tracing-subscriber's own timer, live: whenever ours reads the same second
        // before and after it, the whole line up to the fraction is the same.
        let mut compared = 0;
        for _ in 0..1000 {
            let mut ours = (String::new(), String::new());
            let mut theirs = String::new();
            LogTime.format_time(&mut Writer::new(&mut ours.0)).unwrap();
            tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .unwrap();
            LogTime.format_time(&mut Writer::new(&mut ours.1)).unwrap();
            assert_eq!(ours.0.len(), theirs.len(), "{} / {theirs}", ours.0);
            if ours.0[..20] == ours.1[..20] {
                assert_eq!(theirs[..20], ours.0[..20]);
                compared += 1;
            }
        }
        assert!(compared > 0);
    }

    /// Issue 18: `total_ms=0.44167700000000004` in the log line.
    #[test]
    fn durations_are_logged_without_float_noise() {
        for (nanos, want) in [
            (441_677, "0.442"),
            (1_000_000, "1"),
            (12_345_678_901, "12345.679"),
            (0, "0"),
            (999, "0.001"),
        ] {
            assert_eq!(millis(Duration::from_nanos(nanos)).to_string(), want);
        }
    }
}

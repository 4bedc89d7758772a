//! The one log line per request: who asked, what happened, how long it waited and took, and
//! how many bytes moved. Emitted once, when the response has been fully sent (or the client
//! left), so streamed responses are logged with their real duration and size.
//!
//! Never logged: the query string (it may carry user data), any header value, the API key or a
//! client token.
//!
//! Also here: [`PlainFields`], the field formatter of the text log when it has no colours, cheaper
//! than tracing-subscriber's default and writing the same bytes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

use crate::body::UploadStats;

pub struct RequestLog {
    pub request_id: String,
    pub client: Arc<str>,
    /// The request body's `model`, when it named one (bounded length).
    pub model: Option<Arc<str>>,
    /// Re-sends after upstream 429s on the client's behalf.
    pub retries: u32,
    pub method: http::Method,
    pub path: String,
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

impl RequestLog {
    pub fn new(request_id: String, client: Arc<str>, method: http::Method, path: &str) -> Self {
        // Paths are bounded in the log so a hostile client cannot write megabyte lines.
        let path = if path.len() > 256 {
            let mut end = 256;
            while !path.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &path[..end])
        } else {
            path.to_string()
        };
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
        let ms = |d: Option<Duration>| d.map(millis);
        let bytes_in = self
            .upload
            .as_ref()
            .map_or(0, |u| u.bytes.load(Ordering::Relaxed));
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
            total_ms = millis(self.started.elapsed()),
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

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_debug(field, &value);
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
        if self.is_empty {
            self.is_empty = false;
        } else if let Err(e) = self.writer.write_char(' ') {
            self.result = Err(e);
            return;
        }
        self.result = write!(self.writer, "{name}={value:?}");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The same bytes as tracing-subscriber's own field formatter without colours, for every
    /// kind of field the request line and the other events use.
    #[test]
    fn plain_fields_write_what_the_default_formatter_writes() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::fmt::format::DefaultFields;

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
        fn emit() {
            let err = std::io::Error::other("boom");
            let none: Option<&str> = None;
            tracing::info!(
                request_id = %"abc-1",
                client = %"default",
                model = Some("m/x \"q\""),
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
            tracing::warn!(r#type = "t", "second");
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

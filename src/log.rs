//! The one log line per request: who asked, what happened, how long it waited and took, and
//! how many bytes moved. Emitted once, when the response has been fully sent (or the client
//! left), so streamed responses are logged with their real duration and size.
//!
//! Never logged: the query string (it may carry user data), any header value, the API key or a
//! client token.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

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

#[cfg(test)]
mod tests {
    use super::*;

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

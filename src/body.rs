//! Streaming bodies in both directions. Nothing here buffers a body: each frame is passed on
//! as it arrives.
//!
//! * [`RequestBody`] carries the client's upload to the upstream, counting bytes against
//!   `server.max_request_body` and failing the upload if the client stalls longer than
//!   `upstream.idle_timeout` between chunks.
//! * [`ResponseBody`] carries the upstream's answer (or one of the proxy's own JSON bodies) to
//!   the client. A streamed answer owns the admission [`Permit`], so the concurrency slot is
//!   held exactly until the last byte is sent or the client goes away; it applies the idle
//!   timeout, rewrites Chutes' raw in-stream error lines into SSE events, and emits the
//!   request's log line when it ends.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use crate::http1::ClientBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::admission::Permit;
use crate::alarm::Alarm;
use crate::log::RequestLog;
use crate::pool::UpstreamBody;
use crate::response::OpenAiError;
use crate::sse::SseErrorRewriter;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a body stream was cut short.
#[derive(Debug)]
pub enum BodyError {
    TooLarge { limit: u64 },
    Idle(Duration),
    Client(BoxError),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge { limit } => write!(f, "request body exceeds {limit} bytes"),
            BodyError::Idle(d) => write!(f, "no body data for {:.1}s", d.as_secs_f64()),
            BodyError::Client(e) => write!(f, "client body error: {e}"),
        }
    }
}

impl std::error::Error for BodyError {}

/// Observations the proxy reads after the upload ends or fails.
#[derive(Debug, Default)]
pub struct UploadStats {
    pub bytes: AtomicU64,
    pub too_large: AtomicBool,
    pub stalled: AtomicBool,
}

/// The client's request body on its way upstream.
pub struct RequestBody {
    inner: Upload,
    limit: u64,
    timer: IdleTimer,
    stats: Arc<UploadStats>,
    done: bool,
}

/// A deadline `idle` after the first poll that found nothing ready since the last progress:
/// how long the other side has been silent while the proxy was asking it for more. Time the
/// consumer was not asking (a client slow to read a stream, an upstream slow to take an
/// upload) does not count against the side it was not asking. The clock is read and the timer
/// made only then, so a body that is ready whenever it is asked (a buffered one, a small
/// answer read with its head) never reads the clock or allocates a timer.
struct IdleTimer {
    idle: Duration,
    alarm: Alarm,
    /// A poll has found nothing ready since the last progress: the deadline is set.
    waiting: bool,
}

impl IdleTimer {
    fn new(idle: Duration) -> Self {
        IdleTimer {
            idle,
            alarm: Alarm::new(),
            waiting: false,
        }
    }

    /// Data came: the next wait is counted from the poll that finds nothing.
    fn progress(&mut self) {
        self.waiting = false;
    }

    /// Nothing was ready: ready once `idle` has passed since the first such poll.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.waiting {
            self.waiting = true;
            let now = Instant::now();
            // `Duration::MAX` (never) must not overflow: a century stands in for never.
            let deadline = now
                .checked_add(self.idle)
                .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
            self.alarm.set(deadline);
        }
        // Set just above whenever it was not already.
        Pin::new(&mut self.alarm).poll(cx)
    }
}

/// Where a request body comes from: streamed from the client, or read whole before
/// admission (to learn its model, and to send it again on a retry).
enum Upload {
    Stream(ClientBody),
    Buffered(Option<Bytes>),
}

impl RequestBody {
    pub fn new(inner: ClientBody, limit: u64, idle: Duration, stats: Arc<UploadStats>) -> Self {
        RequestBody {
            inner: Upload::Stream(inner),
            limit,
            timer: IdleTimer::new(idle),
            stats,
            done: false,
        }
    }

    /// A body already read: sent as one frame (and counted in the upload stats).
    pub fn buffered(bytes: Bytes, stats: Arc<UploadStats>) -> Self {
        stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        RequestBody {
            inner: Upload::Buffered((!bytes.is_empty()).then_some(bytes)),
            limit: u64::MAX,
            timer: IdleTimer::new(Duration::MAX),
            stats,
            done: false,
        }
    }

    /// A body read whole before admission, as it stands: the upstream's connection writes it
    /// beside the request's head, in one write, without polling (it was counted, and held to
    /// its limit, when it was read).
    pub fn whole(&self) -> Option<&Bytes> {
        match &self.inner {
            Upload::Buffered(Some(b)) if !self.done => Some(b),
            _ => None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let inner = match &mut this.inner {
            Upload::Stream(i) => i,
            Upload::Buffered(b) => {
                this.done = true;
                return Poll::Ready(b.take().map(|b| Ok(Frame::data(b))));
            }
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let total = this
                        .stats
                        .bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed)
                        + data.len() as u64;
                    if total > this.limit {
                        this.done = true;
                        this.stats.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(BodyError::TooLarge { limit: this.limit })));
                    }
                }
                this.timer.progress();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(BodyError::Client(e))))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                ready!(this.timer.poll_expired(cx));
                this.done = true;
                this.stats.stalled.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(BodyError::Idle(this.timer.idle))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
            || match &self.inner {
                Upload::Stream(i) => i.is_end_stream(),
                Upload::Buffered(b) => b.is_none(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Upload::Stream(i) => i.size_hint(),
            // An exact length lets the upstream request carry Content-Length, as the
            // client's did.
            Upload::Buffered(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// What the client receives.
pub struct ResponseBody {
    kind: Kind,
}

enum Kind {
    Full(Option<Bytes>),
    Stream(Box<Streaming>),
}

struct Streaming {
    inner: UpstreamBody,
    timer: IdleTimer,
    sse: Option<SseErrorRewriter>,
    /// Held until the stream ends; dropping it frees the concurrency slot.
    permit: Option<Permit>,
    log: RequestLog,
    /// An SSE error event to send after an upstream failure, then end cleanly.
    trailer: Option<Bytes>,
    /// An upstream failure of a non-SSE body, reported on the next poll: the one poll in
    /// between lets the connection send the head and the bytes already handed to it (hyper's
    /// HTTP/2 server drops them when a body fails in the same poll that gave them).
    broken: Option<String>,
    finished: bool,
}

impl ResponseBody {
    pub fn full(bytes: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Full(Some(bytes)),
        }
    }

    pub fn empty() -> Self {
        ResponseBody {
            kind: Kind::Full(None),
        }
    }

    /// Stream an upstream body, holding `permit` until it ends.
    pub fn stream(
        inner: UpstreamBody,
        idle: Duration,
        sse: bool,
        permit: Permit,
        log: RequestLog,
    ) -> Self {
        ResponseBody {
            kind: Kind::Stream(Box::new(Streaming {
                inner,
                timer: IdleTimer::new(idle),
                sse: sse.then(SseErrorRewriter::new),
                permit: Some(permit),
                log,
                trailer: None,
                broken: None,
                finished: false,
            })),
        }
    }
}

impl Streaming {
    /// The stream is over (normally or not): release the slot and log now, not when the
    /// connection gets round to dropping the body.
    fn finish(&mut self, error: Option<String>) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let Some(sse) = &self.sse {
            self.log.stream_error_events = sse.saw_error();
        }
        self.log.stream_error = error;
        self.log.finish();
        self.permit = None;
    }

    /// An upstream failure mid-stream. For SSE the client gets a final error event and a clean
    /// end, so SDKs raise instead of hanging or silently truncating; other bodies are aborted
    /// so the client sees an incomplete response rather than a short one that looks whole.
    fn fail(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        tracing::warn!(request_id = %self.log.request_id, error = %why, "upstream stream ended abnormally");
        if self.sse.is_some() {
            let mut event = Vec::with_capacity(160);
            let message = format!("upstream stream interrupted: {why}");
            let msg = OpenAiError::new(&message, "upstream_error", "upstream_stream_error");
            event.extend_from_slice(b"\n\ndata: ");
            event.extend_from_slice(&msg.to_json());
            event.extend_from_slice(b"\n\n");
            self.trailer = Some(Bytes::from(event));
            self.finish(Some(why));
            Poll::Ready(self.trailer.take().map(|b| Ok(Frame::data(b))))
        } else {
            self.finish(Some(why.clone()));
            Poll::Ready(Some(Err(why.into())))
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let s = match &mut self.kind {
            Kind::Full(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(s) => s,
        };
        if s.finished {
            return Poll::Ready(None);
        }
        if let Some(why) = s.broken.take() {
            return s.fail(why);
        }
        loop {
            match Pin::new(&mut s.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    s.timer.progress();
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            let data = match &mut s.sse {
                                Some(sse) => sse.push(data),
                                None => data,
                            };
                            if data.is_empty() {
                                // Held back by the rewriter (a partial raw line): keep reading.
                                continue;
                            }
                            s.log.bytes_out += data.len() as u64;
                            // The connection stops polling once a Content-Length body is
                            // complete (hyper's HTTP/2 server once the body says it has
                            // ended), so
                            // the end is recognised here rather than by a final `None`.
                            if s.inner.is_end_stream() && s.sse.is_none() {
                                s.finish(None);
                            }
                            Frame::data(data)
                        }
                        Err(frame) => frame,
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) if s.sse.is_none() => {
                    s.broken = Some(e.to_string());
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Ready(Some(Err(e))) => return s.fail(e.to_string()),
                Poll::Ready(None) => {
                    let tail = s.sse.as_mut().and_then(|sse| sse.finish());
                    s.finish(None);
                    return Poll::Ready(tail.map(|t| Ok(Frame::data(t))));
                }
                Poll::Pending => {
                    ready!(s.timer.poll_expired(cx));
                    let why = format!(
                        "no data from the upstream for {:.1}s (upstream.idle_timeout)",
                        s.timer.idle.as_secs_f64()
                    );
                    return s.fail(why);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Stream(s) => s.finished,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            // The SSE rewriter may change lengths, so never promise the upstream's.
            Kind::Stream(s) if s.sse.is_some() => SizeHint::default(),
            Kind::Stream(s) => s.inner.size_hint(),
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if !self.finished {
            let why = if let Some(broken) = self.broken.take() {
                // The upstream failed, and the connection let the body go before it
                // was told.
                Some(broken)
            } else if self.inner.is_end_stream() {
                None
            } else {
                Some("client went away before the end of the response".into())
            };
            self.finish(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The idle deadline is `idle` after the first poll that found nothing since the last
    /// progress: time nobody asked does not count, a second empty poll does not move it, and
    /// progress starts the next wait afresh. The timer is made only when a poll finds nothing.
    #[tokio::test(start_paused = true)]
    async fn the_idle_timer_counts_from_the_first_empty_poll_after_progress() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut t = IdleTimer::new(Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(4)).await;
        t.progress();
        assert!(!t.alarm.is_made(), "made without a pending poll");
        // Nobody asked for 30 s (the consumer was busy): not counted.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(t.poll_expired(&mut cx).is_pending());
        assert!(t.alarm.is_made());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            t.poll_expired(&mut cx).is_pending(),
            "a second empty poll keeps the deadline"
        );
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(t.poll_expired(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(t.poll_expired(&mut cx).is_ready());
        // Progress after it was made: the next wait starts at the next empty poll.
        t.progress();
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(t.poll_expired(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(t.poll_expired(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(t.poll_expired(&mut cx).is_ready());
        // Never: no overflow, and not ready a year on.
        let mut never = IdleTimer::new(Duration::MAX);
        never.progress();
        assert!(never.poll_expired(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(86_400 * 365)).await;
        assert!(never.poll_expired(&mut cx).is_pending());
    }
}

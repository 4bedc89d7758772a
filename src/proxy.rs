//! The one request handler, as a straight pipeline:
//!
//! 1. identify: request id, client, the client's wait limit (`x-proxy-max-wait`);
//! 2. refuse what can never be forwarded: CONNECT, a declared body over the limit;
//! 3. admit: wait for the account budget ([`Admission::acquire`]), or be shed;
//! 4. forward: rewrite target and headers, stream the body up;
//! 5. read the signals in the response head (429, 402 quota, remaining=0) and feed them back;
//! 6. answer: pass the upstream response through (streamed, holding the permit), or render
//!    the proxy's own response.
//!
//! Every exit goes through [`Pipeline::own`] or the streaming body, so every response carries
//! `x-proxy-request-id`, is counted once in the metrics and logged once.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::http1::ClientBody;
use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use tokio::time::Instant;

use crate::admission::{Admission, Ask, ClientId, Observed, Outcome, Permit};
use crate::asked::Asked;
use crate::body::{RequestBody, ResponseBody, UploadStats};
use crate::clock;
use crate::config::Config;
use crate::held::Hold;
use crate::log::RequestLog;
use crate::metrics::{Metrics, RetryCause};
use crate::pool::UpstreamBody;
use crate::response::{Reason, Rejection, REQUEST_ID};
use crate::signals;
use crate::upstream::{SendError, Upstream};

/// On a response that came after re-sends on the client's behalf: how many.
const RETRIES: http::HeaderName = http::HeaderName::from_static("x-proxy-retries");
/// How much of an upstream 429/402 body is kept (the contract's "first 2 KiB").
const UPSTREAM_BODY_SNIPPET: usize = 2048;
/// A 402 body is read whole to look for the quota message; Chutes' are ~200 bytes. Anything
/// larger is not a quota message and is passed through as read so far.
const QUOTA_BODY_LIMIT: usize = 64 * 1024;
/// Reading an error body must not hold the client (and a permit) for long.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// A JSON 429's body decides whose capacity it is about; Chutes sends it with the head.
/// Bounded so a slow body cannot keep the account's gate open for long.
const SCOPE_BODY_TIMEOUT: Duration = Duration::from_millis(500);

/// The settings of the request path that a reload changes in place.
pub struct Live {
    pub limits: crate::config::Limits,
    pub retry: crate::config::RetryConfig,
    /// `queue.max_body_bytes`: request bodies read before admission, held together.
    pub max_body_bytes: u64,
}

impl Live {
    pub fn from_config(c: &Config) -> Live {
        Live {
            limits: c.limits.clone(),
            retry: c.retry.clone(),
            max_body_bytes: c.queue.max_body_bytes,
        }
    }
}

pub struct Proxy {
    /// The configuration the proxy started with (listeners, upstream, body limits: the keys
    /// a reload cannot change).
    pub config: Arc<Config>,
    pub admission: Arc<Admission>,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    live: std::sync::RwLock<Arc<Live>>,
    next_id: AtomicU64,
    id_prefix: String,
}

impl Proxy {
    pub fn new(
        config: Arc<Config>,
        admission: Arc<Admission>,
        upstream: Upstream,
        metrics: Arc<Metrics>,
    ) -> Proxy {
        let live = Live::from_config(&config);
        metrics.held_bodies.set_limit(live.max_body_bytes);
        // Ids are unique across restarts without a random-number dependency: the start time
        // in base 36 and a counter.
        let start = (clock::unix_now() * 1e6) as u64 ^ u64::from(std::process::id());
        Proxy {
            config,
            admission,
            upstream,
            metrics,
            live: std::sync::RwLock::new(Arc::new(live)),
            next_id: AtomicU64::new(0),
            id_prefix: {
                let mut p = Vec::new();
                push_base36(&mut p, start);
                String::from_utf8(p).unwrap_or_default()
            },
        }
    }

    /// The reloadable settings in force.
    pub fn live(&self) -> Arc<Live> {
        Arc::clone(&self.live.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Swap in reloaded settings; requests already past attribution keep the old ones.
    pub fn set_live(&self, live: Live) {
        self.metrics.held_bodies.set_limit(live.max_body_bytes);
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(live);
    }

    /// `queue_full` for a body that does not fit beside those already waiting: retry when a
    /// new request would be served, at the soonest (the waiting bodies leave as they go).
    fn bodies_full(&self, hold: &Hold<'_>, needs: u64) -> Rejection {
        let limit = self.metrics.held_bodies.limit();
        let wait = self.admission.snapshot().new_request_wait;
        let held = self
            .metrics
            .held_bodies
            .bytes()
            .saturating_sub(hold.bytes());
        let mut r = self
            .admission
            .rejection(Reason::QueueFull)
            .with_detail(format!(
                "request bodies waiting for admission hold {held} bytes and this one needs \
                 {needs}; the limit is {limit} bytes together (queue.max_body_bytes)"
            ));
        r.retry_after = Some(r.retry_after.unwrap_or_default().max(wait));
        r
    }

    fn request_id(&self, asked: &Asked<'_>) -> HeaderValue {
        // Ours first, then the common `x-request-id` that tracing setups already send.
        if let Some(v) = asked.request_id.or(asked.x_request_id) {
            // A client-sent id is kept if it is a sane token (it goes into logs and bodies).
            if !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
            {
                return v.clone();
            }
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_maybe_shared(new_id(&self.id_prefix, n))
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
    }

    /// Handle one client request. Never fails: every problem becomes a response.
    ///
    /// This future is what a queued request is, so its layout is every queued request's
    /// memory (BENCHMARKS.md, "ninth session"). The request is taken apart before the future is
    /// made and put together only after admission: an `async fn` keeps its arguments beside
    /// what is moved out of them, and a request borrowed or built before an await is kept
    /// too (each copy 224–272 bytes).
    pub fn handle(
        self: Arc<Self>,
        req: Request<ClientBody>,
    ) -> impl Future<Output = Response<ResponseBody>> + Send {
        let (mut parts, body) = req.into_parts();
        async move {
            // One look at the budget's settings for the whole request (they change on a reload).
            let settings = self.admission.settings();
            // Everything the head is asked before admission, in one walk over it; the borrow
            // ends with this block, so no await keeps it.
            let (request_id, ident, max_wait, read_first) = {
                let asked = Asked::of(&parts.headers);
                let request_id = self.request_id(&asked);
                // Attribution reads the same client table admission indexes, so an id names
                // one client.
                let ident = settings.clients.identify(&asked);
                let max_wait = max_wait(&settings, asked.max_wait, ident.client);
                let read_first = reads_body(&parts.method, asked.content_type);
                (request_id, ident, max_wait, read_first)
            };
            if crate::response::is_healthz(&parts.method, &parts.uri) {
                // Probes hit the service port: answered here, never forwarded, counted or logged.
                return crate::response::healthz(&request_id).map(ResponseBody::full);
            }
            let live = self.live();
            let client = ident.client;
            let log = RequestLog::new(
                crate::log::LogId(request_id),
                settings.clients.row(client).name.clone(),
                parts.method.clone(),
                crate::log::LogPath::of(&parts.uri),
            );
            let mut p = Pipeline {
                proxy: Arc::clone(&self),
                client,
                log,
            };
            if ident.unauthorized {
                return p.own(Rejection::new(Reason::UnauthorizedClient));
            }
            if parts.method == Method::CONNECT {
                return p
                    .own(Rejection::new(Reason::MethodNotAllowed).with_detail(
                        "CONNECT is refused: this is a reverse proxy to one upstream",
                    ));
            }
            let limit = self.config.server.max_request_body;
            if let Some(len) = declared_length(&body) {
                if len > limit {
                    return p.own(Rejection::new(Reason::RequestTooLarge).with_detail(format!(
                        "{len} bytes declared, the limit is {limit} (server.max_request_body)"
                    )));
                }
            }
            // Moved into the match (`{ .. }`, which the lint would drop): matched in place, an
            // `Ok` would leave the result, a rejection's size, in the future through every
            // await below (1,336 bytes instead of 1,160; `a_request_s_future_stays_small`).
            #[allow(clippy::blocks_in_conditions)]
            let max_wait = match { max_wait } {
                Ok(w) => w,
                Err(r) => return p.own(r),
            };
            // Learn the request's model before admission: a JSON body is read whole (it is
            // bounded by server.max_request_body); anything else streams as it comes.
            // An invalid target is refused before admission, so it consumes nothing.
            parts.uri = match self.upstream.target(&parts.uri) {
                Ok(u) => u,
                Err(e) => return p.own(Rejection::new(Reason::BadRequest).with_detail(e)),
            };
            let upload = Arc::new(UploadStats::default());
            p.log.upload = Some(Arc::clone(&upload));
            // Held while the request waits, given back once it is admitted or shed.
            let mut hold = self.metrics.held_bodies.hold();
            let (body, model) = if read_first {
                let idle = self.config.upstream.idle_timeout;
                match read_body(body, limit, idle, &upload, &mut hold).await {
                    Ok(bytes) => {
                        let model = crate::model::request_model(&bytes);
                        (Upload::Buffered(bytes), model)
                    }
                    Err(Unread::Refused(r)) => return p.own(r),
                    Err(Unread::Full { needs }) => {
                        let r = self.bodies_full(&hold, needs);
                        return p.own(r);
                    }
                }
            } else {
                (Upload::Stream(body), None)
            };
            p.log.model = model.clone();
            let ask = Ask {
                client,
                cost: live.limits.cost_of(model.as_deref()),
                model,
                max_wait,
                retry: false,
            };
            let waiting = Instant::now();
            // Counted from arrival: a retry may use only what is left of it.
            let deadline = waiting + max_wait;
            // Matched in the statement that awaits it: a result bound to a name would be kept
            // through the exchange below.
            let admit = self.admission.admit(ask.clone());
            let permit = match (Parking::new(admit, &mut parts.headers)).await {
                Ok(permit) => permit,
                Err(r) => {
                    // A request shed after queueing waited too; its log line says how long.
                    p.log.queue_wait = Some(waiting.elapsed());
                    return p.own(r);
                }
            };
            drop(hold);
            let req = Request::from_parts(parts, body);
            // From here on the exchange outlives the client ([`Detachable`]): if the client
            // goes away before the upstream answers, the answer is still read and its
            // rate-limit signals (a 429, a quota 402) still reach the budget. Only then is the
            // response dropped, which frees the permit and closes the upstream stream.
            let strip = ident.strip_auth;
            // Dropped with this future when the client goes away: a retry waiting for admission
            // in the exchange's task then leaves the queue at once.
            let (_client_here, client_gone) = tokio::sync::oneshot::channel::<()>();
            let exchange = Exchange {
                permit,
                strip_auth: strip,
                upload,
                retry: Retry {
                    ask,
                    deadline,
                    client_gone,
                    policy: live.retry.clone(),
                },
            };
            match (Detachable {
                exchange: Some(Box::pin(p.forward(req, exchange))),
            })
            .await
            {
                Ok(resp) => resp,
                Err(()) => {
                    // Only a panic in the pipeline gets here; the permit was released by unwinding.
                    tracing::error!("request pipeline failed (panicked)");
                    let id = HeaderValue::from_static("unknown");
                    Rejection::new(Reason::UpstreamUnavailable)
                        .render(&id)
                        .map(ResponseBody::full)
                }
            }
        }
    }
}

/// The wait a request may spend queued: `queue.max_wait`, the client's own limit, and the
/// request's `x-proxy-max-wait`, whichever is shortest.
#[allow(clippy::result_large_err)] // see admission::Admission::admit
fn max_wait(
    settings: &crate::admission::Settings,
    asked: Option<&HeaderValue>,
    client: ClientId,
) -> Result<Duration, Rejection> {
    let mut wait = settings.queue.max_wait;
    if let Some(w) = settings.clients.row(client).max_wait {
        wait = wait.min(w);
    }
    if let Some(v) = asked {
        let asked = v
            .to_str()
            .map_err(|_| "not text".to_string())
            .and_then(|s| crate::units::parse_wait(s.trim()));
        match asked {
            Ok(d) => wait = wait.min(d),
            Err(e) => {
                return Err(Rejection::new(Reason::BadRequest).with_detail(format!(
                    "x-proxy-max-wait: {e} (use a duration like \"5s\" or \"500ms\", or seconds)"
                )))
            }
        }
    }
    Ok(wait)
}

struct Pipeline {
    proxy: Arc<Proxy>,
    client: ClientId,
    /// Also the request's id (`log.request_id`), which every response carries.
    log: RequestLog,
}

/// What the exchange's task needs besides the request.
struct Exchange {
    permit: Permit,
    strip_auth: bool,
    upload: Arc<UploadStats>,
    retry: Retry,
}

/// What a re-send after an upstream 429 needs.
struct Retry {
    /// The admission request, asked again (as a retry) for each re-send.
    ask: Ask,
    /// The end of the request's wait limit, counted from its arrival.
    deadline: Instant,
    /// Resolves when the client has gone (its request future was dropped).
    client_gone: tokio::sync::oneshot::Receiver<()>,
    policy: crate::config::RetryConfig,
}

/// How one upstream 429 was read.
struct Read429 {
    rejection: Rejection,
    decision: Option<crate::admission::CooldownDecision>,
}

impl Pipeline {
    /// Wall-clock "now" for reading an upstream's reset instants: admission's own clock, the
    /// one it turns those instants back into deadlines with.
    fn unix_now(&self) -> f64 {
        self.proxy.admission.wall().now_unix()
    }

    /// Answer with one of the proxy's own responses.
    fn own(mut self, r: Rejection) -> Response<ResponseBody> {
        let mut resp = r.render(&self.log.request_id.0);
        if self.log.retries > 0 {
            resp.headers_mut()
                .insert(RETRIES, HeaderValue::from(self.log.retries));
        }
        self.proxy.metrics.request(self.client, Some(r.reason));
        self.log.status = resp.status().as_u16();
        self.log.outcome = r.reason.as_str();
        self.log.bytes_out = resp.body().len() as u64;
        if r.reason.status() == StatusCode::TOO_MANY_REQUESTS
            || r.reason == Reason::SharedStateUnavailable
        {
            tracing::debug!(request_id = %self.log.request_id, reason = r.reason.as_str(),
                retry_after_s = r.retry_after.map(|d| d.as_secs_f64()), "shed");
        }
        self.log.finish();
        resp.map(ResponseBody::full)
    }

    /// Send the admitted request upstream, again after a 429 when its policy allows, and
    /// answer the client. Not an `async fn`, and its arguments taken apart before the future is
    /// made: that would keep each argument beside what is moved out of it (900 bytes of a
    /// future every request in flight holds, and moves into its box).
    #[allow(clippy::manual_async_fn)]
    fn forward(
        mut self,
        req: Request<Upload>,
        exchange: Exchange,
    ) -> impl Future<Output = Response<ResponseBody>> + Send {
        let Exchange {
            mut permit,
            strip_auth,
            upload,
            mut retry,
        } = exchange;
        let (mut parts, body) = req.into_parts();
        async move {
            let proxy = Arc::clone(&self.proxy);
            let queue_wait = permit.queue_wait;
            self.log.queue_wait = Some(queue_wait);
            proxy.metrics.observe_queue_wait(queue_wait);
            let uri = std::mem::take(&mut parts.uri);
            proxy
                .upstream
                .prepare_headers(&mut parts.headers, strip_auth);
            parts
                .headers
                .insert(REQUEST_ID, self.log.request_id.0.clone());
            // A body read whole and small enough is kept to be sent again after a 429; a
            // streamed one cannot be replayed.
            let replay = match &body {
                Upload::Buffered(b)
                    if retry.policy.max_attempts > 0 && b.len() as u64 <= retry.policy.max_body =>
                {
                    Some(b.clone())
                }
                _ => None,
            };
            let mut body = Some(body);
            loop {
                let body = match body.take() {
                    Some(Upload::Buffered(bytes)) => {
                        RequestBody::buffered(bytes, Arc::clone(&upload))
                    }
                    Some(Upload::Stream(body)) => RequestBody::new(
                        body,
                        proxy.config.server.max_request_body,
                        proxy.config.upstream.idle_timeout,
                        Arc::clone(&upload),
                    ),
                    None => {
                        // A re-send: the bytes count once in the log line.
                        upload.bytes.store(0, Ordering::Relaxed);
                        RequestBody::buffered(
                            replay.clone().unwrap_or_default(),
                            Arc::clone(&upload),
                        )
                    }
                };
                // The upstream connection picks its own version (ALPN); the client's is irrelevant.
                permit.mark_sent();
                let sent_at = Instant::now();
                // Built in a block of its own: a request moved into the send is then not also
                // kept in this future beside it (328 bytes).
                let send = {
                    let mut up = Request::new(body);
                    *up.method_mut() = parts.method.clone();
                    *up.uri_mut() = uri.clone();
                    // Only an attempt a retry may follow (a body kept) has the headers back
                    // for it.
                    *up.headers_mut() = std::mem::take(&mut parts.headers);
                    proxy.upstream.send(up, replay.is_some())
                };
                let result = send.await;
                let latency = sent_at.elapsed();
                self.log.upstream_latency = Some(latency);
                let resp = match result {
                    Ok((resp, kept)) => {
                        if let Some(headers) = kept {
                            parts.headers = headers;
                        }
                        resp
                    }
                    Err(e) => {
                        permit.report(Outcome::Failed);
                        let r = self.send_error(e, &upload);
                        return self.own(r);
                    }
                };
                proxy
                    .metrics
                    .upstream_latency
                    .observe(latency.as_secs_f64());
                let status = resp.status();
                // Logged apart from the client's status, which differs when a 402 or 429 is
                // rewritten.
                self.log.upstream_status = Some(status.as_u16());
                proxy.metrics.upstream_status(status.as_u16());
                // One pass over the answer's headers says which readers can find anything, and
                // keeps Chutes' values for theirs.
                let carried = signals::Carried::of(resp.headers());
                if carried.chutes() {
                    let (rl_user, rl_chute) = carried.advertised_rates();
                    permit.observe(&Observed {
                        quota: carried.chutes_quota(),
                        rl_user,
                        rl_chute,
                    });
                }
                match status.as_u16() {
                    429 => {
                        // Boxed, as the 402's: a rare answer's reading is not carried in
                        // every exchange's future (it made it 3.4 KiB, moved once a request
                        // into its box).
                        let read = Box::pin(self.upstream_429(resp, &mut permit)).await;
                        drop(permit);
                        // A client that has already left gets nothing re-sent on its behalf.
                        let gone = matches!(
                            retry.client_gone.try_recv(),
                            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
                        );
                        let cause = match self.may_retry(&read, &retry, replay.is_some()) {
                            Some(cause) if !gone => cause,
                            _ => return self.own(read.rejection),
                        };
                        // Waiting again, the kept body is held with the bodies of the requests
                        // waiting for their first admission, within `queue.max_body_bytes`. One
                        // that does not fit beside them is not retried: the client gets the 429.
                        let mut hold = proxy.metrics.held_bodies.hold();
                        let kept = replay.as_ref().map_or(0, |b| b.len() as u64);
                        if !hold.grow_to(kept) {
                            tracing::info!(
                                request_id = %self.log.request_id,
                                body_bytes = kept,
                                "upstream 429: not retried, its kept body does not fit beside the \
                                 waiting ones (queue.max_body_bytes)"
                            );
                            return self.own(read.rejection);
                        }
                        // Back to the front of the queue: the cooldown's probe when it ends.
                        proxy.metrics.retried(cause);
                        self.log.retries += 1;
                        let now = Instant::now();
                        let ask = Ask {
                            max_wait: retry.deadline.saturating_duration_since(now),
                            retry: true,
                            ..retry.ask.clone()
                        };
                        tracing::info!(
                            request_id = %self.log.request_id,
                            cause = cause.as_str(),
                            attempt = self.log.retries,
                            "upstream 429: retrying on the client's behalf when the cooldown ends"
                        );
                        permit = tokio::select! {
                            // The client's departure first: a grant for a client that has gone
                            // would spend a request nobody reads.
                            biased;
                            _ = &mut retry.client_gone => {
                                // The client left while its retry waited: nothing more to send.
                                self.log.outcome = "client_gone";
                                self.log.finish();
                                return Response::new(ResponseBody::empty());
                            }
                            // Parked while it waits, as on its first wait.
                            r = Parking::new(proxy.admission.admit(ask), &mut parts.headers) => match r {
                                Ok(p) => p,
                                Err(r) => return self.own(r),
                            },
                        };
                        drop(hold);
                        continue;
                    }
                    402 => return Box::pin(self.upstream_402(resp, permit)).await,
                    _ => {
                        let exhausted = if status.is_success() && carried.exhaustion() {
                            signals::exhausted_hint(resp.headers(), self.unix_now())
                        } else {
                            None
                        };
                        permit.report(Outcome::Success { exhausted });
                        return self.pass_through(resp, permit);
                    }
                }
            }
        }
    }

    /// Whether the request answered by this 429 is sent again: retries are on and not used
    /// up, its body was kept, and its wait limit outlasts the cooldown.
    fn may_retry(&self, read: &Read429, retry: &Retry, replayable: bool) -> Option<RetryCause> {
        let d = read.decision.as_ref()?;
        if !replayable || self.log.retries >= retry.policy.max_attempts {
            return None;
        }
        let left = retry.deadline.saturating_duration_since(Instant::now());
        if d.duration >= left {
            return None;
        }
        Some(if d.model.is_some() {
            RetryCause::Model
        } else {
            RetryCause::Account
        })
    }

    fn send_error(&self, e: SendError, upload: &UploadStats) -> Rejection {
        match e {
            SendError::Upload(_) if upload.too_large.load(Ordering::Relaxed) => {
                Rejection::new(Reason::RequestTooLarge).with_detail(format!(
                    "the body exceeded {} bytes (server.max_request_body)",
                    self.proxy.config.server.max_request_body
                ))
            }
            SendError::Upload(_) if upload.stalled.load(Ordering::Relaxed) => Rejection::new(
                Reason::UpstreamTimeout,
            )
            .with_detail("the client's request body stalled longer than upstream.idle_timeout"),
            SendError::Upload(why) | SendError::Unavailable(why) => {
                tracing::warn!(request_id = %self.log.request_id, error = %why, "upstream request failed");
                Rejection::new(Reason::UpstreamUnavailable)
            }
            SendError::Timeout(d) => {
                tracing::warn!(request_id = %self.log.request_id, timeout_s = d.as_secs_f64(),
                    "no response head from the upstream in time");
                Rejection::new(Reason::UpstreamTimeout).with_detail(format!(
                    "no response within {:.0}s (upstream.first_byte_timeout)",
                    d.as_secs_f64()
                ))
            }
        }
    }

    /// Stream the upstream response to the client, holding the permit until it ends.
    fn pass_through(self, resp: Response<UpstreamBody>, permit: Permit) -> Response<ResponseBody> {
        // The log line moves into the streaming body, which emits it when the stream ends.
        let Pipeline {
            proxy,
            client,
            mut log,
        } = self;
        let (mut parts, body) = resp.into_parts();
        crate::upstream::strip_hop_by_hop(&mut parts.headers);
        let sse = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        if sse {
            // The rewriter may lengthen the stream; the connection will chunk it.
            parts.headers.remove(CONTENT_LENGTH);
        }
        parts.headers.insert(REQUEST_ID, log.request_id.0.clone());
        if log.retries > 0 {
            parts
                .headers
                .insert(RETRIES, HeaderValue::from(log.retries));
        }
        proxy.metrics.request(client, None);
        log.status = parts.status.as_u16();
        log.outcome = "forwarded";
        let body = ResponseBody::stream(body, proxy.config.upstream.idle_timeout, sse, permit, log);
        Response::from_parts(parts, body)
    }

    async fn upstream_429(&self, resp: Response<UpstreamBody>, permit: &mut Permit) -> Read429 {
        let now = self.unix_now();
        let hint = signals::cooldown_hint(resp.headers(), now);
        let rl_headers = signals::rate_limit_headers(resp.headers());
        let reported_at = Instant::now();
        // An HTML page (the edge's) is the account's at once: the whole account stops on the
        // 429's head, since every request granted while a slow body is read would hit the
        // edge again and lengthen the ban. A JSON body says whose capacity it is about (one
        // model's, or the account's), so it is read first, briefly.
        let json = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("json"));
        let (decision, snippet) = if json && permit.model().is_some() {
            let body =
                read_prefix(resp.into_body(), UPSTREAM_BODY_SNIPPET, SCOPE_BODY_TIMEOUT).await;
            let snippet = signals::body_snippet(&body, UPSTREAM_BODY_SNIPPET);
            let decision = permit.report(Outcome::RateLimited {
                scope: signals::classify_429(&body),
                hint: hint.clone(),
                status: 429,
                headers: rl_headers.clone(),
                body: snippet.clone(),
            });
            (decision, snippet)
        } else {
            let decision = permit.report(Outcome::RateLimited {
                scope: signals::Scope429::Account,
                hint: hint.clone(),
                status: 429,
                headers: rl_headers.clone(),
                body: String::new(),
            });
            let body =
                read_prefix(resp.into_body(), UPSTREAM_BODY_SNIPPET, ERROR_BODY_TIMEOUT).await;
            let snippet = signals::body_snippet(&body, UPSTREAM_BODY_SNIPPET);
            if let Some(d) = &decision {
                permit.attach_429_body(d, snippet.clone());
            }
            (decision, snippet)
        };
        permit.announced().await;
        let model = decision.as_ref().and_then(|d| d.model.clone());
        let reason = if model.is_some() {
            Reason::UpstreamCapacity
        } else {
            Reason::UpstreamRateLimited
        };
        let mut r = self.proxy.admission.rejection(reason);
        r.upstream_status = Some(429);
        r.upstream_body = Some(snippet);
        r.model = model.clone();
        if let Some(d) = &decision {
            // What is left of the cooldown now, after the body was read.
            r.retry_after = Some(d.duration.saturating_sub(reported_at.elapsed()));
            if model.is_none() {
                r.cooldown_until_unix = Some(d.until_unix);
            }
            self.proxy
                .metrics
                .cooldown_seconds
                .observe(d.duration.as_secs_f64());
            if let Some(m) = &model {
                tracing::warn!(
                    request_id = %self.log.request_id,
                    model = %m,
                    cooldown_s = d.duration.as_secs_f64(),
                    level = d.level,
                    escalated = d.escalated,
                    hint_note = d.hint_note.as_deref(),
                    "upstream capacity 429: only this model cools; other models are served"
                );
            } else {
                tracing::warn!(
                    request_id = %self.log.request_id,
                    upstream_headers = ?rl_headers,
                    cooldown_s = d.duration.as_secs_f64(),
                    level = d.level,
                    escalated = d.escalated,
                    hint_note = d.hint_note.as_deref(),
                    "upstream 429: the whole account is paused"
                );
            }
        }
        Read429 {
            rejection: r,
            decision,
        }
    }

    async fn upstream_402(
        self,
        resp: Response<UpstreamBody>,
        mut permit: Permit,
    ) -> Response<ResponseBody> {
        let (parts, body) = resp.into_parts();
        let bytes = read_prefix(body, QUOTA_BODY_LIMIT, ERROR_BODY_TIMEOUT).await;
        let reason = match signals::classify_402(&bytes) {
            signals::Kind402::DailyQuota { reset_unix } => {
                permit.report(Outcome::QuotaExceeded { reset_unix });
                Reason::DailyQuotaExhausted
            }
            signals::Kind402::UsageCap => {
                permit.report(Outcome::UsageCap);
                Reason::UsageCapExhausted
            }
            signals::Kind402::Other => {
                // Not about the account (e.g. a model that needs a higher tier): the client
                // gets the upstream's 402 as it was, and nothing closes.
                permit.report(Outcome::Success { exhausted: None });
                drop(permit);
                let mut parts = parts;
                crate::upstream::strip_hop_by_hop(&mut parts.headers);
                parts.headers.remove(CONTENT_LENGTH);
                parts
                    .headers
                    .insert(REQUEST_ID, self.log.request_id.0.clone());
                if self.log.retries > 0 {
                    parts
                        .headers
                        .insert(RETRIES, HeaderValue::from(self.log.retries));
                }
                let mut me = self;
                me.proxy.metrics.request(me.client, None);
                me.log.status = 402;
                me.log.outcome = "forwarded";
                me.log.bytes_out = bytes.len() as u64;
                me.log.finish();
                return Response::from_parts(parts, ResponseBody::full(bytes));
            }
        };
        permit.announced().await;
        drop(permit);
        let mut r = self.proxy.admission.rejection(reason);
        r.upstream_status = Some(402);
        r.upstream_body = Some(signals::body_snippet(&bytes, UPSTREAM_BODY_SNIPPET));
        self.own(r)
    }
}

/// A request's header fields while it waits in the queue (its first wait, and a retry's):
/// in order, each value with its name, 72 bytes a field (and a custom name's buffer shared by
/// its values). Its `HeaderMap` takes 104 bytes for every field it has room for, and it has
/// room for up to twice as many as it holds (6, 12, 24, ...): 1,312 bytes for a request of 7
/// fields, 2,624 for the 17 of the Python OpenAI SDK's chat completion. Only a request that
/// waits is parked; one admitted at once keeps its map.
struct Parked {
    fields: Vec<(http::HeaderName, HeaderValue)>,
    /// Distinct names: the map's size when it is put back.
    names: usize,
}

impl Parked {
    fn park(map: http::HeaderMap) -> Parked {
        let mut fields: Vec<(http::HeaderName, HeaderValue)> = Vec::with_capacity(map.len());
        let mut names = 0;
        // A name comes with its first value only; the others of the same name follow it.
        for (first, value) in map {
            let name = match first {
                Some(n) => {
                    names += 1;
                    n
                }
                None => match fields.last() {
                    Some((n, _)) => n.clone(),
                    // The map's first item always has its name.
                    None => continue,
                },
            };
            fields.push((name, value));
        }
        Parked { fields, names }
    }

    /// The same fields, each name's values in their order.
    fn unpark(self) -> http::HeaderMap {
        // As many names as the map held: within its limits (and `try_`, so never a panic).
        let mut map = http::HeaderMap::try_with_capacity(self.names).unwrap_or_default();
        for (name, value) in self.fields {
            let appended = map.try_append(name, value);
            debug_assert!(appended.is_ok(), "the map held these fields before");
        }
        map
    }
}

pin_project_lite::pin_project! {
    /// Admission, with the request's header fields parked while it waits: taken out of
    /// `headers` the first time admission is not decided at once, put back when it is.
    struct Parking<'a, F> {
        #[pin]
        admit: F,
        headers: &'a mut http::HeaderMap,
        parked: Option<Parked>,
    }
}

impl<'a, F: std::future::Future> Parking<'a, F> {
    fn new(admit: F, headers: &'a mut http::HeaderMap) -> Self {
        Parking {
            admit,
            headers,
            parked: None,
        }
    }
}

impl<F: std::future::Future> std::future::Future for Parking<'_, F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        match this.admit.poll(cx) {
            std::task::Poll::Ready(out) => {
                if let Some(p) = this.parked.take() {
                    **this.headers = p.unpark();
                }
                std::task::Poll::Ready(out)
            }
            std::task::Poll::Pending => {
                if this.parked.is_none() {
                    *this.parked = Some(Parked::park(std::mem::take(*this.headers)));
                }
                std::task::Poll::Pending
            }
        }
    }
}

/// The exchange with the upstream, run in the client's own task while the client waits, and
/// moved to a task of its own only if the client goes away first (the future is dropped): the
/// upstream's answer is then still read and its rate-limit signals (a 429, a quota 402) still
/// reach the budget, as if it had been spawned from the start. Spawning every exchange up
/// front cost a task, a join handle and a cross-task wake-up per request, and on two workers
/// often a migration to the other core; clients that leave mid-request are the rare case.
struct Detachable<F: std::future::Future<Output = Response<ResponseBody>> + Send + 'static> {
    exchange: Option<std::pin::Pin<Box<F>>>,
}

impl<F> std::future::Future for Detachable<F>
where
    F: std::future::Future<Output = Response<ResponseBody>> + Send + 'static,
{
    /// `Err` when the exchange panicked (a spawned task would have given a `JoinError`).
    type Output = Result<Response<ResponseBody>, ()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let Some(exchange) = self.exchange.as_mut() else {
            return std::task::Poll::Ready(Err(()));
        };
        // A panic stays inside this request, as it did inside a spawned task: caught, the
        // exchange dropped (unwinding released its permit), and a 503 for the client instead
        // of a connection torn down.
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exchange.as_mut().poll(cx)));
        match polled {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(resp)) => {
                self.exchange = None;
                std::task::Poll::Ready(Ok(resp))
            }
            Err(_) => {
                self.exchange = None;
                std::task::Poll::Ready(Err(()))
            }
        }
    }
}

impl<F> Drop for Detachable<F>
where
    F: std::future::Future<Output = Response<ResponseBody>> + Send + 'static,
{
    fn drop(&mut self) {
        if let Some(exchange) = self.exchange.take() {
            // The client left mid-exchange: finish it on its own, then drop the response
            // (which frees the permit and closes the upstream stream).
            // Outside a runtime (it is being torn down) there is nothing left to run it on.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    drop(exchange.await);
                });
            }
        }
    }
}

/// Read at most `limit` bytes of a body, within `within`; the rest is discarded.
async fn read_prefix(mut body: UpstreamBody, limit: usize, within: Duration) -> Bytes {
    let mut buf = BytesMut::new();
    let read = async {
        while buf.len() < limit {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        let take = data.len().min(limit - buf.len());
                        buf.extend_from_slice(&data[..take]);
                    }
                }
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(within, read).await;
    buf.freeze()
}

/// A request body as admission leaves it: read whole (its model is known), or still to
/// stream.
pub enum Upload {
    Buffered(Bytes),
    Stream(ClientBody),
}

/// Whether a request's body is read before admission to learn its model: bodies that can
/// be JSON (declared JSON, text, or curl's default form type) of methods that carry one. Uploads of other types stream as before.
fn reads_body(method: &Method, content_type: Option<&HeaderValue>) -> bool {
    if matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE | Method::TRACE
    ) {
        return false;
    }
    match content_type {
        // No type: an upload of raw bytes, not an API call; it streams.
        None => false,
        // Compared without case and without a lower-cased copy.
        Some(v) => {
            let Ok(ct) = v.to_str() else {
                return false;
            };
            let ct = ct.trim_start().as_bytes();
            let starts = |p: &[u8]| ct.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
            starts(b"application/json")
                || ct.windows(5).any(|w| w.eq_ignore_ascii_case(b"+json"))
                || starts(b"application/x-www-form-urlencoded")
                || starts(b"text/plain")
        }
    }
}

/// Why a body read before admission was not read.
enum Unread {
    Refused(Rejection),
    /// The bodies waiting together would pass `queue.max_body_bytes` with this one's
    /// `needs` bytes.
    Full {
        needs: u64,
    },
}

/// Read a whole request body (bounded by `limit`, each chunk within `idle`), held in `hold`.
/// A body that came whole with its head is kept as it is: the HTTP/1 connection already
/// gave it an allocation of exactly the bytes that came (shared with the head, which the
/// request holds anyway), so a copy would hold it twice. One that streams is gathered into
/// one allocation of its own.
async fn read_body(
    body: ClientBody,
    limit: u64,
    idle: Duration,
    stats: &Arc<UploadStats>,
    hold: &mut Hold<'_>,
) -> Result<Bytes, Unread> {
    use http_body::Body as _;
    let body = match body {
        ClientBody::Full(whole) => {
            let bytes = whole.unwrap_or_default();
            let n = bytes.len() as u64;
            if n > limit {
                return Err(Unread::Refused(too_large(limit)));
            }
            if !hold.grow_to(n) {
                return Err(Unread::Full { needs: n });
            }
            return Ok(bytes);
        }
        streamed => streamed,
    };
    // A declared length is held before a byte is read, and sizes the buffer once.
    let declared = body.size_hint().exact().filter(|&n| n <= limit);
    if let Some(n) = declared {
        if !hold.grow_to(n) {
            return Err(Unread::Full { needs: n });
        }
    }
    let mut body = RequestBody::new(body, limit, idle, Arc::clone(stats));
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    let needs = (buf.len() + d.len()) as u64;
                    if !hold.grow_to(needs) {
                        return Err(Unread::Full { needs });
                    }
                    buf.extend_from_slice(&d);
                }
            }
            Err(crate::body::BodyError::TooLarge { limit }) => {
                return Err(Unread::Refused(too_large(limit)))
            }
            Err(crate::body::BodyError::Idle(d)) => {
                return Err(Unread::Refused(
                    Rejection::new(Reason::UpstreamTimeout).with_detail(format!(
                    "the client's request body stalled longer than {:.0}s (upstream.idle_timeout)",
                    d.as_secs_f64()
                )),
                ))
            }
            Err(e) => {
                return Err(Unread::Refused(
                    Rejection::new(Reason::BadRequest)
                        .with_detail(format!("the request body could not be read: {e}")),
                ))
            }
        }
    }
    // The bytes are counted again when the body is sent upstream.
    stats.bytes.store(0, Ordering::Relaxed);
    Ok(buf.freeze())
}

fn too_large(limit: u64) -> Rejection {
    Rejection::new(Reason::RequestTooLarge).with_detail(format!(
        "the body exceeded {limit} bytes (server.max_request_body)"
    ))
}

/// The body's declared length. Both servers read it from the head (HTTP/1 as the body's
/// own framing, hyper's HTTP/2 from its Content-Length), so the body's size hint is it.
fn declared_length(body: &ClientBody) -> Option<u64> {
    use http_body::Body as _;
    body.size_hint().exact()
}

/// Append `n` in base 36 (lowercase), for compact request ids.
fn push_base36(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(base36(n, &mut [0; 13]));
}

/// `n` in base 36, lower case, written at the end of `buf` (13 digits hold any `u64`).
fn base36(mut n: u64, buf: &mut [u8; 13]) -> &[u8] {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = DIGITS[(n % 36) as usize];
        n /= 36;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// `{prefix}-{n in base 36}`, cut from this thread's arena of ids.
fn new_id(prefix: &str, n: u64) -> Bytes {
    let mut digits = [0; 13];
    let digits = base36(n, &mut digits);
    IDS.with_borrow_mut(|ids| {
        let len = prefix.len() + 1 + digits.len();
        if ids.capacity() - ids.len() < len {
            *ids = BytesMut::with_capacity(ID_ARENA.max(len));
        }
        ids.extend_from_slice(prefix.as_bytes());
        ids.extend_from_slice(b"-");
        ids.extend_from_slice(digits);
        ids.split().freeze()
    })
}

/// How many bytes of request ids one allocation holds: about 200 ids, each a slice of it, so an
/// id and its clones (the upstream's header, the response's, the log line) cost no allocation
/// of their own; an arena is freed when the last of its ids is.
const ID_ARENA: usize = 4096;

thread_local! {
    /// This thread's arena of request ids (see [`ID_ARENA`]).
    static IDS: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

#[cfg(test)]
mod tests {
    use super::{new_id, push_base36, read_body, reads_body, Unread, ID_ARENA};
    use crate::held::HeldBodies;
    use crate::http1::ClientBody;
    use bytes::Bytes;
    use std::sync::Arc;
    use std::time::Duration;

    fn fields(map: &http::HeaderMap) -> Vec<(String, Vec<u8>, bool)> {
        map.iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec(), v.is_sensitive()))
            .collect()
    }

    fn sample_headers() -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        map.append("host", "proxy".parse().unwrap());
        map.append("x-stainless-lang", "python".parse().unwrap());
        map.append("accept", "a".parse().unwrap());
        map.append("x-stainless-lang", "second".parse().unwrap());
        map.append("accept", "b".parse().unwrap());
        let mut secret: http::HeaderValue = "Bearer k".parse().unwrap();
        secret.set_sensitive(true);
        map.append("authorization", secret);
        map
    }

    /// Parked fields come back as they were: every name, each name's values in order,
    /// sensitivity kept, and nothing else.
    #[test]
    fn parked_fields_come_back_as_they_were() {
        let map = sample_headers();
        let before = fields(&map);
        let parked = super::Parked::park(map);
        assert_eq!((parked.fields.len(), parked.names), (6, 4));
        let back = parked.unpark();
        assert_eq!(fields(&back), before);
        let accept: Vec<_> = back.get_all("accept").iter().collect();
        assert_eq!(accept, ["a", "b"]);
        assert!(super::Parked::park(http::HeaderMap::new())
            .unpark()
            .is_empty());
    }

    /// A request parks its fields only when admission is not decided at once, and has them
    /// back (the same fields) when it is; one decided at once keeps its map untouched.
    #[test]
    fn a_request_parks_its_fields_only_while_it_waits() {
        use std::future::Future;
        use std::task::{Context, Poll};
        let mut cx = Context::from_waker(std::task::Waker::noop());

        let mut headers = sample_headers();
        let before = fields(&headers);
        let mut polls = 0;
        let admit = std::future::poll_fn(|_| {
            polls += 1;
            if polls < 3 {
                Poll::Pending
            } else {
                Poll::Ready(7)
            }
        });
        let mut parking = std::pin::pin!(super::Parking::new(admit, &mut headers));
        for _ in 0..2 {
            assert!(parking.as_mut().poll(&mut cx).is_pending());
            assert!(parking.headers.is_empty());
            assert_eq!(parking.parked.as_ref().map(|p| p.fields.len()), Some(6));
        }
        assert_eq!(parking.as_mut().poll(&mut cx), Poll::Ready(7));
        assert!(parking.parked.is_none());
        assert_eq!(fields(&headers), before);

        let mut headers = sample_headers();
        let capacity = headers.capacity();
        let admit = std::future::ready(8);
        let mut parking = std::pin::pin!(super::Parking::new(admit, &mut headers));
        assert_eq!(parking.as_mut().poll(&mut cx), Poll::Ready(8));
        assert_eq!(headers.capacity(), capacity);
        assert_eq!(fields(&headers), before);
    }

    /// A queued request is mostly this future; a few layout slips (an `async fn`'s copies of
    /// its arguments, a result kept across the exchange) once made it half as large again.
    /// The same size in the test and the release build (BENCHMARKS.md, "ninth session").
    #[test]
    fn a_request_s_future_stays_small() {
        let size = crate::server::tests::future_size(super::Proxy::handle);
        // 1,152 bytes when written, 1,816 before.
        assert!(size <= 1200, "{size} bytes");
    }

    /// A body that came whole with its head is the same bytes after the read (not a second
    /// copy held while queued), and is still held against `queue.max_body_bytes` and bounded
    /// by `server.max_request_body`.
    #[tokio::test]
    async fn a_whole_body_is_kept_as_it_came_and_still_counted() {
        let held = HeldBodies::new(100);
        let stats = Arc::new(crate::body::UploadStats::default());
        let body = Bytes::from_static(br#"{"model":"m"}"#);
        let mut hold = held.hold();
        let got = read_body(
            ClientBody::Full(Some(body.clone())),
            1000,
            Duration::from_secs(1),
            &stats,
            &mut hold,
        )
        .await
        .ok()
        .unwrap();
        assert_eq!(got.as_ptr(), body.as_ptr(), "copied");
        assert_eq!(held.bytes(), body.len() as u64);
        // With that one held, a second that would pass the bound together is refused.
        let big = Bytes::from(vec![b'x'; 200]);
        let full = read_body(
            ClientBody::Full(Some(big.clone())),
            1000,
            Duration::from_secs(1),
            &stats,
            &mut held.hold(),
        )
        .await;
        assert!(matches!(full, Err(Unread::Full { needs: 200 })));
        drop(hold);
        assert_eq!(held.bytes(), 0);
        let refused = read_body(
            ClientBody::Full(Some(big)),
            199,
            Duration::from_secs(1),
            &stats,
            &mut held.hold(),
        )
        .await;
        assert!(matches!(refused, Err(Unread::Refused(_))));
    }

    /// Which requests have their body read before admission (to learn the model): API calls
    /// by their content type, in any case, never a GET or an untyped upload.
    #[test]
    fn which_bodies_are_read_first() {
        let parts = |method: &str, ct: Option<&[u8]>| {
            let mut b = http::Request::builder().method(method).uri("/v1/x");
            if let Some(ct) = ct {
                b = b.header("content-type", http::HeaderValue::from_bytes(ct).unwrap());
            }
            b.body(()).unwrap().into_parts().0
        };
        for (method, ct, want) in [
            ("POST", Some(&b"application/json"[..]), true),
            ("POST", Some(b"Application/JSON; charset=utf-8"), true),
            ("PUT", Some(b"  application/json"), true),
            ("POST", Some(b"application/vnd.api+JSON"), true),
            ("POST", Some(b"application/x-www-form-urlencoded"), true),
            ("POST", Some(b"TEXT/PLAIN"), true),
            ("POST", Some(b"multipart/form-data; boundary=x"), false),
            ("POST", Some(b"application/octet-stream"), false),
            ("POST", Some(b"json"), false),
            ("POST", Some(b"application/js"), false),
            // Not visible ASCII: not a type the proxy reads.
            ("POST", Some(b"application/json\xff"), false),
            ("POST", None, false),
            ("GET", Some(b"application/json"), false),
            ("DELETE", Some(b"application/json"), false),
        ] {
            let p = parts(method, ct);
            assert_eq!(
                reads_body(&p.method, p.headers.get(http::header::CONTENT_TYPE)),
                want,
                "{method} {ct:?}"
            );
        }
    }

    /// Ids cut from the arena stay whole and distinct across arenas, while earlier ones (and
    /// a prefix longer than an arena) are still held.
    #[test]
    fn ids_from_the_arena_are_whole_across_arenas() {
        let prefix = "m3x8k2p1";
        let ids: Vec<Bytes> = (0..3 * ID_ARENA as u64)
            .map(|n| new_id(prefix, n))
            .collect();
        for (n, id) in ids.iter().enumerate() {
            let mut want = format!("{prefix}-").into_bytes();
            push_base36(&mut want, n as u64);
            assert_eq!(&id[..], &want[..], "{n}");
        }
        let long = "p".repeat(ID_ARENA + 10);
        let id = new_id(&long, 35);
        assert_eq!(id.len(), long.len() + 2);
        assert!(id.ends_with(b"-z"));
        assert_eq!(&new_id(prefix, 36)[..], b"m3x8k2p1-10");
    }

    #[test]
    fn base36_ids() {
        for (n, want) in [
            (0u64, "0"),
            (35, "z"),
            (36, "10"),
            (u64::MAX, "3w5e11264sgsf"),
        ] {
            let mut out = b"p-".to_vec();
            push_base36(&mut out, n);
            assert_eq!(out, format!("p-{want}").into_bytes(), "{n}");
        }
    }
}

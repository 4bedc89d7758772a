//! The account usage poll (`upstream.quota_url`, every `upstream.quota_poll`): asks the
//! management API how much of the daily quota the account has used, so usage from outside
//! the proxy (the web playground, another tool) counts too.
//!
//! Owns: the loop, the one GET with the account key, reading a bounded answer and handing the
//! figures to admission. A poll is a request against the account like any other, so it takes
//! a token from the account's bucket, and is skipped (never queued) when none is free or
//! requests are waiting. A failed poll is logged once (until one succeeds) and changes
//! nothing. It runs only when the proxy holds the key: without it, it would have to borrow a
//! client's.
//!
//! Does not own: what the figures do to the budget (admission), parsing them (signals).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt as _;
use tokio::sync::watch;

use crate::body::{RequestBody, UploadStats};
use crate::proxy::Proxy;

/// An answer is `{"quota": 5000, "used": 812.0}`; anything much longer is not it.
const MAX_ANSWER: usize = 16 * 1024;
/// A poll that takes longer than this is a failed poll, not a stuck task.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why one poll did not deliver figures.
#[derive(Debug, PartialEq, Eq)]
pub enum PollError {
    /// No token free, or requests waiting: skipped, not a failure.
    Skipped,
    Failed(String),
}

/// Poll `url` now and then every `every` until `stop` turns true.
pub async fn run(
    proxy: Arc<Proxy>,
    url: http::Uri,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        match poll_once(&proxy, &url).await {
            Ok((quota, used)) => {
                if failing {
                    tracing::info!(quota, used, "quota usage poll answers again");
                }
                failing = false;
                tracing::debug!(quota, used, "quota usage polled");
            }
            Err(PollError::Skipped) => {
                tracing::debug!("quota usage poll skipped: no token free for it");
            }
            Err(PollError::Failed(why)) => {
                if !failing {
                    tracing::warn!(url = %url, error = %why, "quota usage poll failed; the figures from response headers still count");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One poll: take a token, GET the URL with the key, hand the figures to admission.
pub async fn poll_once(proxy: &Proxy, url: &http::Uri) -> Result<(u64, u64), PollError> {
    if !proxy.admission.try_take_own() {
        return Err(PollError::Skipped);
    }
    let mut req = Request::new(RequestBody::buffered(
        Bytes::new(),
        Arc::new(UploadStats::default()),
    ));
    *req.uri_mut() = url.clone();
    proxy.upstream.prepare_headers(req.headers_mut(), true);
    req.headers_mut().insert(
        http::header::ACCEPT,
        http::HeaderValue::from_static("application/json"),
    );
    let answer = tokio::time::timeout(POLL_TIMEOUT, async {
        let (resp, _) = proxy
            .upstream
            .send(req, false)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Ok(d) = frame.into_data() {
                buf.extend_from_slice(&d);
                if buf.len() > MAX_ANSWER {
                    return Err(format!("answer longer than {MAX_ANSWER} bytes"));
                }
            }
        }
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        Ok(buf)
    })
    .await
    .map_err(|_| PollError::Failed(format!("no answer within {}s", POLL_TIMEOUT.as_secs())))?
    .map_err(PollError::Failed)?;
    let (quota, used) = crate::signals::quota_usage(&answer).ok_or_else(|| {
        PollError::Failed(format!(
            "not a quota answer: {}",
            crate::signals::body_snippet(&answer, 200)
        ))
    })?;
    proxy.admission.observe_usage(quota, used);
    Ok((quota, used))
}

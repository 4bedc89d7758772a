//! Issue 2, the streaming reverse-proxy core, through the real proxy against the mock upstream:
//! streaming both ways, header rules (key injection, hop-by-hop, `Host`, request ids), the
//! fixed destination (path prefix, absolute-form targets, CONNECT), the proxy's own failure
//! responses (502, 504, 413), server protection (slow loris, pipelining, h2c), graceful
//! shutdown of a live stream, and the binary's config checking.
//!
//! Admission is deliberately not tested here beyond what the server and body layers owe it: a
//! client that disconnects while queued is noticed (the handler future is dropped), and one
//! that leaves mid-stream gives its concurrency slot back.
//! Every test that sends more than one request lifts the account limits, so the budget never
//! spaces them out and no test depends on its timing.
//!
//! Raw TCP clients ([`Raw`]) are used wherever a real HTTP client would normalise away what
//! the test is about (hop-by-hop headers, absolute-form targets, CONNECT, half-sent heads,
//! pipelining). Every wait is bounded by `within` (or the mock's own bounded waits); nothing
//! sleeps to synchronise, and no assertion depends on how fast the machine is.

use std::convert::Infallible;
use std::pin::Pin;
use std::process::Command;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::support::*;

/// Limits so high that no test here is ever spaced out or queued by admission.
const NO_LIMITS: &str = "\n[limits]\nrequests_per_minute = 600000\nburst = 10000\n";

/// Asserts the configured key appears nowhere the client can see.
fn assert_no_key(what: &str, headers: &http::HeaderMap, body: &[u8]) {
    for (name, value) in headers {
        assert!(
            !String::from_utf8_lossy(value.as_bytes()).contains(TEST_KEY),
            "{what}: the API key leaked in response header {name}"
        );
    }
    assert!(
        !String::from_utf8_lossy(body).contains(TEST_KEY),
        "{what}: the API key leaked in the response body"
    );
}

/// Checks one of the proxy's own responses: status, JSON content type, request id, the
/// OpenAI-shaped error with `code` and the same `proxy.reason`, and no key anywhere.
fn assert_own(got: &Got, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(got.status, status, "body: {}", got.text());
    assert_eq!(got.header("content-type"), Some("application/json"));
    let id = got
        .header("x-proxy-request-id")
        .expect("x-proxy-request-id on the proxy's own response");
    let v = got.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["proxy"]["reason"], code, "{v}");
    assert_eq!(v["error"]["proxy"]["request_id"], id, "{v}");
    assert_no_key(code, &got.headers, &got.body);
    v
}

// ----- raw TCP client -------------------------------------------------------------------------

/// A client that writes exact bytes and parses responses itself.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A response as read off the wire: header names lower-cased, in the order received.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn header_map(&self) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (n, v) in &self.headers {
            map.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }
}

impl Raw {
    async fn connect(addr: std::net::SocketAddr) -> Raw {
        let stream = within("connecting to the proxy", TcpStream::connect(addr))
            .await
            .expect("connect to the proxy");
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("raw write");
    }

    /// Reads more bytes into the buffer; false at EOF (or a reset, which is an end too).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match within("bytes from the proxy", self.stream.read(&mut chunk)).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn take_line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return line;
            }
            assert!(self.fill().await, "connection closed mid-line");
        }
    }

    async fn take_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "connection closed mid-body");
        }
        self.buf.drain(..n).collect()
    }

    /// Reads one whole response (content-length, chunked, or until EOF).
    async fn response(&mut self) -> RawResponse {
        let status_line = self.take_line().await;
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.take_line().await;
            if line.is_empty() {
                break;
            }
            let (n, v) = line.split_once(':').expect("header line");
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let mut resp = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().expect("content-length");
            resp.body = self.take_exact(len).await;
        } else if resp
            .header("transfer-encoding")
            .is_some_and(|te| te.contains("chunked"))
        {
            loop {
                let size = self.take_line().await;
                let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
                    .expect("chunk size");
                let data = self.take_exact(size).await;
                resp.body.extend_from_slice(&data);
                self.take_line().await;
                if size == 0 {
                    break;
                }
            }
        } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
            while self.fill().await {}
            resp.body = std::mem::take(&mut self.buf);
        }
        resp
    }

    /// Waits for the server to close the connection; whatever it sent first is ignored.
    async fn wait_closed(&mut self) {
        while self.fill().await {}
    }
}

// ----- a request body the test feeds chunk by chunk -------------------------------------------

/// A request body fed through a channel, so the test decides when each chunk is sent and
/// when the body ends (dropping the sender).
struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// Starts `POST url` with a channel-fed body; returns the sender and the pending response.
fn post_streaming(
    url: &str,
) -> (
    mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<Result<Got, String>>,
) {
    let (tx, rx) = mpsc::channel(4);
    let client = Client::builder(TokioExecutor::new()).build_http::<ChanBody>();
    let req = http::Request::post(url)
        .header("content-type", "application/octet-stream")
        .body(ChanBody(rx))
        .unwrap();
    let task = tokio::spawn(async move {
        let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("{e:?}"))?
            .to_bytes();
        Ok(Got {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    });
    (tx, task)
}

// ----- streaming ------------------------------------------------------------------------------

#[tokio::test]
async fn sse_chunks_reach_the_client_while_the_upstream_holds_the_next() {
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    mock.push(
        Reply::status(200)
            .sse([
                (Duration::ZERO, sse_data(r#"{"n":1}"#)),
                (Duration::ZERO, sse_data(r#"{"n":2}"#)),
                (Duration::ZERO, sse_data("[DONE]")),
            ])
            .hold_chunk(1, gate.clone()),
    );
    let proxy = Start::new(&mock.url(), "").start().await;
    let c = client();
    let resp = within(
        "the SSE response head",
        c.request(
            req("POST", &proxy.url("/v1/chat/completions"))
                .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))
                .unwrap(),
        ),
    )
    .await
    .expect("request");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-proxy-request-id").is_some());
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The first event must arrive while the mock still holds the second: a proxy that
    // buffered the body would make this wait forever (and `within` fail).
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(r#"{"n":1}"#) {
        let frame = within("the first SSE event", body.frame())
            .await
            .expect("body ended before the first event")
            .expect("body error");
        if let Ok(data) = frame.into_data() {
            seen.extend_from_slice(&data);
        }
    }
    assert!(!gate.is_open());
    assert!(!String::from_utf8_lossy(&seen).contains(r#"{"n":2}"#));
    gate.open();
    let rest = within("the rest of the stream", body.collect())
        .await
        .expect("body error")
        .to_bytes();
    seen.extend_from_slice(&rest);
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains(r#"{"n":2}"#), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_large_upload_streams_to_the_upstream_before_the_client_finishes() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "").start().await;
    let (tx, response) = post_streaming(&proxy.url("/v1/upload"));
    let chunk = Bytes::from(vec![b'a'; 256 * 1024]);
    tx.send(chunk.clone()).await.unwrap();
    // The mock sees the first chunk while the client still holds the rest (the sender is
    // alive): the proxy forwarded it without waiting for the end of the body.
    mock.wait_for_body_bytes(chunk.len()).await;
    for _ in 0..3 {
        tx.send(chunk.clone()).await.unwrap();
    }
    drop(tx);
    let got = within("the upload's response", response)
        .await
        .unwrap()
        .expect("upload failed");
    assert_eq!(got.status, 200);
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].body_complete);
    assert_eq!(seen[0].body.len(), 4 * chunk.len());
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_stalled_upload_is_cut_off_by_the_idle_timeout() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "idle_timeout = \"300ms\"\n")
        .start()
        .await;
    let (tx, response) = post_streaming(&proxy.url("/v1/upload"));
    tx.send(Bytes::from_static(b"partial")).await.unwrap();
    // The sender stays alive and silent: the client neither sends more nor ends the body.
    let got = within("the stalled upload's response", response)
        .await
        .unwrap()
        .expect("the client should get a response, not a broken connection");
    assert_own(&got, 504, "upstream_timeout");
    drop(tx);
    proxy.stop().await.unwrap();
}

// ----- headers --------------------------------------------------------------------------------

#[tokio::test]
async fn the_configured_key_replaces_client_credentials() {
    for (extra, header, value, absent) in [
        (
            "",
            "authorization",
            format!("Bearer {TEST_KEY}"),
            "x-api-key",
        ),
        (
            "auth_header = \"x-api-key\"\nauth_prefix = \"\"\n",
            "x-api-key",
            TEST_KEY.to_string(),
            "authorization",
        ),
    ] {
        let mock = MockUpstream::start().await;
        let proxy = Start::new(&mock.url(), extra).start().await;
        let got = send(
            &client(),
            req("GET", &proxy.url("/v1/models"))
                .header("authorization", "Bearer client-own-key")
                .header("x-api-key", "client-own-key")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200);
        assert_no_key(extra, &got.headers, &got.body);
        let seen = mock.wait_for_requests(1).await;
        assert_eq!(seen[0].header(header), Some(value.as_str()), "{extra:?}");
        assert_eq!(seen[0].headers.get_all(header).iter().count(), 1);
        assert!(seen[0].header(absent).is_none(), "{extra:?}: {absent} sent");
        proxy.stop().await.unwrap();
    }
}

#[tokio::test]
async fn without_a_key_the_clients_auth_passes_through() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "").no_key().start().await;
    let got = send(
        &client(),
        req("GET", &proxy.url("/v1/models"))
            .header("authorization", "Bearer client-own-key")
            .header("x-api-key", "client-x-key")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    let seen = mock.wait_for_requests(1).await;
    assert_eq!(
        seen[0].header("authorization"),
        Some("Bearer client-own-key")
    );
    assert_eq!(seen[0].header("x-api-key"), Some("client-x-key"));
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_both_ways_and_host_is_the_upstreams() {
    let mock = MockUpstream::start_with(
        Reply::json(200, r#"{"ok":true}"#)
            .header("connection", "x-resp-hop")
            .header("x-resp-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic realm=x")
            .header("proxy-connection", "keep-alive")
            .header("trailer", "x-checksum")
            .header("upgrade", "h2c")
            .header("x-end-to-end", "kept"),
    )
    .await;
    let proxy = Start::new(&mock.url(), "").start().await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(
        b"GET /v1/models HTTP/1.1\r\n\
          Host: foreign.example\r\n\
          Connection: keep-alive, X-Req-Hop\r\n\
          X-Req-Hop: 1\r\n\
          Keep-Alive: timeout=5\r\n\
          TE: trailers\r\n\
          Trailer: x-checksum\r\n\
          Upgrade: websocket\r\n\
          Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
          Proxy-Connection: keep-alive\r\n\
          X-End-To-End: kept\r\n\
          \r\n",
    )
    .await;
    let resp = raw.response().await;
    assert_eq!(resp.status, 200, "{resp:?}");
    for name in [
        "connection",
        "x-resp-hop",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "trailer",
        "upgrade",
    ] {
        assert!(resp.header(name).is_none(), "{name} reached the client");
    }
    assert_eq!(resp.header("x-end-to-end"), Some("kept"));
    assert!(resp.header("x-proxy-request-id").is_some());
    assert_no_key("hop-by-hop", &resp.header_map(), &resp.body);

    let seen = mock.wait_for_requests(1).await;
    let up = &seen[0];
    for name in [
        "connection",
        "x-req-hop",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "transfer-encoding",
    ] {
        assert!(up.header(name).is_none(), "{name} reached the upstream");
    }
    assert_eq!(up.header("x-end-to-end"), Some("kept"));
    assert_eq!(up.header("host"), Some(mock.addr().to_string().as_str()));
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_a_clients_own_is_kept() {
    let mock = MockUpstream::start().await;
    let limits = format!("{NO_LIMITS}[server]\nmax_request_body = \"1KiB\"\n");
    let proxy = Start::new(&mock.url(), &limits).start().await;
    let c = client();

    // Passed through, id made by the proxy.
    let got = get(&c, &proxy.url("/v1/models")).await;
    assert_eq!(got.status, 200);
    let made = got.header("x-proxy-request-id").expect("id").to_string();
    assert!(!made.is_empty());
    let seen = mock.wait_for_requests(1).await;
    assert_eq!(seen[0].header("x-proxy-request-id"), Some(made.as_str()));

    // Passed through, id sent by the client.
    let got = send(
        &c,
        req("GET", &proxy.url("/v1/models"))
            .header("x-proxy-request-id", "client-id-42")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.header("x-proxy-request-id"), Some("client-id-42"));
    let seen = mock.wait_for_requests(2).await;
    assert_eq!(seen[1].header("x-proxy-request-id"), Some("client-id-42"));

    // Made up by the proxy (413), with and without the client's id.
    // Small enough that the client finishes writing before it reads the answer.
    let big = Full::new(Bytes::from(vec![b'x'; 2048]));
    let got = send(&c, req("POST", &proxy.url("/v1/x")).body(big).unwrap()).await;
    let v = assert_own(&got, 413, "request_too_large");
    assert_ne!(v["error"]["proxy"]["request_id"], made.as_str());
    let got = send(
        &c,
        req("POST", &proxy.url("/v1/x"))
            .header("x-proxy-request-id", "client-id-43")
            .body(Full::new(Bytes::from(vec![b'x'; 2048])))
            .unwrap(),
    )
    .await;
    let v = assert_own(&got, 413, "request_too_large");
    assert_eq!(got.header("x-proxy-request-id"), Some("client-id-43"));
    assert_eq!(v["error"]["proxy"]["request_id"], "client-id-43");
    assert_eq!(mock.count(), 2);
    proxy.stop().await.unwrap();
}

// ----- the destination is fixed ---------------------------------------------------------------

#[tokio::test]
async fn the_upstream_path_prefix_is_kept_with_the_query() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&format!("{}/prefix", mock.url()), "")
        .start()
        .await;
    let got = get(&client(), &proxy.url("/v1/models?a=1&b=two%20words")).await;
    assert_eq!(got.status, 200);
    let seen = mock.wait_for_requests(1).await;
    assert_eq!(
        seen[0].uri.path_and_query().map(|pq| pq.as_str()),
        Some("/prefix/v1/models?a=1&b=two%20words")
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn an_absolute_form_target_or_foreign_host_does_not_change_the_destination() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), NO_LIMITS).start().await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(
        b"GET http://elsewhere.invalid/x?q=1 HTTP/1.1\r\n\
          Host: elsewhere.invalid\r\n\r\n",
    )
    .await;
    let resp = raw.response().await;
    assert_eq!(resp.status, 200, "{resp:?}");
    raw.send(b"GET /y HTTP/1.1\r\nHost: elsewhere.invalid:8443\r\n\r\n")
        .await;
    let resp = raw.response().await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let seen = mock.wait_for_requests(2).await;
    let mock_host = mock.addr().to_string();
    assert_eq!(
        seen[0].uri.path_and_query().map(|pq| pq.as_str()),
        Some("/x?q=1")
    );
    assert_eq!(seen[0].header("host"), Some(mock_host.as_str()));
    assert_eq!(seen[1].path(), "/y");
    assert_eq!(seen[1].header("host"), Some(mock_host.as_str()));
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn connect_is_refused() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "").start().await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"CONNECT elsewhere.invalid:443 HTTP/1.1\r\nHost: elsewhere.invalid:443\r\n\r\n")
        .await;
    let resp = raw.response().await;
    assert_eq!(resp.status, 405, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert!(resp.header("x-proxy-request-id").is_some());
    assert_eq!(resp.json()["error"]["code"], "method_not_allowed");
    assert_eq!(mock.count(), 0);
    proxy.stop().await.unwrap();
}

// ----- upstream failures ----------------------------------------------------------------------

#[tokio::test]
async fn a_refused_upstream_is_a_502_at_once() {
    // A connect timeout far beyond the test's own limit: an answer inside the limit proves
    // the refusal was reported at once, not after waiting for the timeout.
    let proxy = Start::new(&closed_port_url().await, "connect_timeout = \"30s\"\n")
        .start()
        .await;
    let c = client();
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        get(&c, &proxy.url("/v1/chat/completions")),
    )
    .await
    .expect("the 502 should not wait for the connect timeout");
    let v = assert_own(&got, 502, "upstream_unavailable");
    assert_eq!(v["error"]["proxy"]["reason"], "upstream_unavailable");
    assert_eq!(v["error"]["type"], "upstream_error");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_dropped_connection_or_failed_tls_handshake_is_a_502() {
    // Reads the request, then closes without answering: a reset mid-request.
    let dropping = MockUpstream::start_with(Reply::disconnect()).await;
    // Plain HTTP where the proxy expects TLS: the handshake fails.
    let plain = MockUpstream::start().await;
    let tls_to_plain = format!("https://{}", plain.addr());
    for url in [dropping.url(), tls_to_plain] {
        let proxy = Start::new(&url, "connect_timeout = \"30s\"\n")
            .start()
            .await;
        let got = get(&client(), &proxy.url("/v1/chat/completions")).await;
        assert_own(&got, 502, "upstream_unavailable");
        proxy.stop().await.unwrap();
    }
    assert_eq!(dropping.count(), 1);
    assert_eq!(plain.count(), 0);
}

#[tokio::test]
async fn no_response_head_within_first_byte_timeout_is_a_504() {
    let mock = MockUpstream::start().await;
    // Never opened: a proxy without a first-byte timeout would wait until `within` fails.
    mock.push(Reply::json(200, "{}").gated(Gate::new()));
    let proxy = Start::new(&mock.url(), "first_byte_timeout = \"300ms\"\n")
        .start()
        .await;
    let got = get(&client(), &proxy.url("/v1/chat/completions")).await;
    let v = assert_own(&got, 504, "upstream_timeout");
    assert_eq!(v["error"]["proxy"]["reason"], "upstream_timeout");
    assert_eq!(mock.count(), 1);
    proxy.stop().await.unwrap();
}

/// The first-byte deadline on a pooled connection is each exchange's own: the connection
/// that answered one request at once times the next one out at the next one's deadline, not
/// sooner (a deadline left from the first exchange would end it early; a lower bound, which
/// load cannot break).
#[tokio::test]
async fn a_reused_upstream_connection_still_times_out_the_next_request() {
    let mock = MockUpstream::start().await;
    // Half a second into the first exchange's two: a deadline left from it would end the next
    // one after one and a half.
    mock.push(Reply::json(200, "{}").head_delay(Duration::from_millis(500)));
    // Never opened.
    mock.push(Reply::json(200, "{}").gated(Gate::new()));
    let proxy = Start::new(&mock.url(), "first_byte_timeout = \"2s\"\n")
        .start()
        .await;
    let http = client();
    let got = get(&http, &proxy.url("/v1/models")).await;
    assert_eq!(got.status, 200, "{got:?}");
    let started = tokio::time::Instant::now();
    let got = get(&http, &proxy.url("/v1/models")).await;
    assert_own(&got, 504, "upstream_timeout");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2), "given up after {took:?}");
    assert_eq!(mock.count(), 2);
    assert_eq!(
        mock.connections(),
        1,
        "the second request went on the first's connection"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_head_delay_past_first_byte_timeout_is_a_504() {
    let mock = MockUpstream::start().await;
    mock.push(Reply::json(200, "{}").head_delay(Duration::from_secs(10)));
    let proxy = Start::new(&mock.url(), "first_byte_timeout = \"300ms\"\n")
        .start()
        .await;
    let got = get(&client(), &proxy.url("/v1/models")).await;
    assert_own(&got, 504, "upstream_timeout");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn an_sse_stream_stalled_past_idle_timeout_ends_with_an_error_event() {
    let mock = MockUpstream::start().await;
    mock.push(
        Reply::status(200)
            .sse([
                (Duration::ZERO, sse_data(r#"{"n":1}"#)),
                (Duration::ZERO, sse_data(r#"{"n":2}"#)),
            ])
            .stall_after(1),
    );
    let proxy = Start::new(&mock.url(), "idle_timeout = \"300ms\"\n")
        .start()
        .await;
    let got = get(&client(), &proxy.url("/v1/chat/completions")).await;
    assert_eq!(got.status, 200);
    let text = got.text();
    assert!(text.starts_with(r#"data: {"n":1}"#), "{text}");
    assert!(!text.contains(r#"{"n":2}"#), "{text}");
    // The last event is an OpenAI-style error the SDKs raise on.
    let last = text
        .trim_end()
        .rsplit("\n\n")
        .next()
        .and_then(|e| e.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("no final data event: {text:?}"));
    let v: serde_json::Value = serde_json::from_str(last).expect("error event is JSON");
    assert!(v["error"]["message"].is_string(), "{v}");
    assert_no_key("sse idle", &got.headers, &got.body);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_plain_body_stalled_past_idle_timeout_is_a_body_error() {
    let mock = MockUpstream::start().await;
    mock.push(
        Reply::status(200)
            .header("content-type", "application/octet-stream")
            .chunks([
                (Duration::ZERO, Bytes::from_static(b"part one;")),
                (Duration::ZERO, Bytes::from_static(b"part two")),
            ])
            .stall_after(1),
    );
    let proxy = Start::new(&mock.url(), "idle_timeout = \"300ms\"\n")
        .start()
        .await;
    let resp = within(
        "the response head",
        client().request(
            req("GET", &proxy.url("/v1/file"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .expect("request");
    assert_eq!(resp.status(), 200);
    // A truncated body must not look complete: the client sees an error, not a clean end.
    let body = within("the end of the stalled body", resp.into_body().collect()).await;
    assert!(body.is_err(), "a stalled body ended as if complete");
    proxy.stop().await.unwrap();
}

// ----- request size ---------------------------------------------------------------------------

#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_without_reading_it() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "[server]\nmax_request_body = \"1KiB\"\n")
        .start()
        .await;
    let mut raw = Raw::connect(proxy.addr).await;
    // Only the head is sent: the answer must come without the body ever arriving.
    raw.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\
          Content-Type: application/json\r\nContent-Length: 2048\r\n\r\n",
    )
    .await;
    let resp = raw.response().await;
    assert_eq!(resp.status, 413, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert!(resp.header("x-proxy-request-id").is_some());
    let v = resp.json();
    assert_eq!(v["error"]["code"], "request_too_large");
    assert_eq!(v["error"]["proxy"]["reason"], "request_too_large");
    assert_eq!(mock.count(), 0);
    assert_eq!(mock.connections(), 0);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_chunked_body_growing_over_the_limit_is_a_413() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "[server]\nmax_request_body = \"1KiB\"\n")
        .start()
        .await;
    let (tx, response) = post_streaming(&proxy.url("/v1/chat/completions"));
    // No Content-Length: the limit can only be enforced while counting the stream.
    tx.send(Bytes::from(vec![b'a'; 600])).await.unwrap();
    tx.send(Bytes::from(vec![b'b'; 600])).await.unwrap();
    let got = within("the oversized upload's response", response)
        .await
        .unwrap()
        .expect("the client should get a 413, not a broken connection");
    assert_own(&got, 413, "request_too_large");
    // Whatever reached the mock is an incomplete body, never a request it answered.
    for r in mock.requests() {
        assert!(
            !r.body_complete,
            "the upstream got a complete oversized body"
        );
    }
    drop(tx);
    proxy.stop().await.unwrap();
}

// ----- the client side ------------------------------------------------------------------------

#[tokio::test]
async fn a_slow_loris_client_is_disconnected() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(
        &mock.url(),
        &format!("{NO_LIMITS}[server]\nheader_read_timeout = \"300ms\"\n"),
    )
    .start()
    .await;
    // Half a head, and then nothing: without a header read timeout this waits forever.
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow:")
        .await;
    raw.wait_closed().await;
    assert_eq!(mock.count(), 0);
    // The same on a kept-alive connection after a complete exchange, where only the HTTP/1
    // server's own header timer applies.
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert_eq!(raw.response().await.status, 200);
    raw.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow:")
        .await;
    raw.wait_closed().await;
    assert_eq!(mock.count(), 1);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_connection_that_never_sends_a_head_is_disconnected() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "[server]\nheader_read_timeout = \"300ms\"\n")
        .start()
        .await;
    // Nothing at all, and the start of the HTTP/2 preface: both leave the server still
    // guessing the protocol, which is before HTTP/1's own header timer starts.
    for opening in [&b""[..], &b"PRI * HTTP/2.0\r\n"[..]] {
        let mut raw = Raw::connect(proxy.addr).await;
        raw.send(opening).await;
        raw.wait_closed().await;
    }
    // A full preface but never a request: an HTTP/2 client must send its first request head
    // within the same limit.
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await;
    raw.wait_closed().await;
    assert_eq!(mock.count(), 0);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "[server]\nmax_header_bytes = 8192\n")
        .start()
        .await;
    let mut raw = Raw::connect(proxy.addr).await;
    let head = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    raw.send(head.as_bytes()).await;
    let resp = raw.response().await;
    assert_eq!(resp.status, 431, "{resp:?}");
    assert_eq!(mock.count(), 0);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn h2c_prior_knowledge_clients_are_served() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "").start().await;
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let resp = within(
        "an h2c response",
        h2.request(
            req("POST", &proxy.url("/v1/chat/completions"))
                .header("authorization", "Bearer client-own-key")
                .body(Full::new(Bytes::from_static(b"{\"h2\":true}")))
                .unwrap(),
        ),
    )
    .await
    .expect("h2c request");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-proxy-request-id").is_some());
    let body = within("the h2c body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], br#"{"ok":true}"#);
    let seen = mock.wait_for_requests(1).await;
    assert_eq!(seen[0].body_text(), "{\"h2\":true}");
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {TEST_KEY}").as_str())
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn pipelined_requests_on_one_connection_are_answered_in_order() {
    let mock = MockUpstream::start().await;
    mock.push(Reply::json(200, r#"{"n":1}"#));
    mock.push(Reply::json(200, r#"{"n":2}"#));
    mock.push(Reply::json(200, r#"{"n":3}"#));
    let proxy = Start::new(&mock.url(), NO_LIMITS).start().await;
    let mut raw = Raw::connect(proxy.addr).await;
    // All three heads in one write, before any answer.
    raw.send(
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
          GET /three HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    for n in 1..=3 {
        let resp = raw.response().await;
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.json()["n"], n);
    }
    let seen = mock.wait_for_requests(3).await;
    let paths: Vec<_> = seen.iter().map(|r| r.path().to_string()).collect();
    assert_eq!(paths, ["/one", "/two", "/three"]);
    assert_eq!(seen[1].body_text(), "abc");
    proxy.stop().await.unwrap();
}

// ----- shutdown -------------------------------------------------------------------------------

#[tokio::test]
async fn graceful_shutdown_finishes_an_in_flight_stream() {
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    mock.push(
        Reply::status(200)
            .sse([
                (Duration::ZERO, sse_data(r#"{"n":1}"#)),
                (Duration::ZERO, sse_data(r#"{"n":2}"#)),
                (Duration::ZERO, sse_data("[DONE]")),
            ])
            .hold_chunk(1, gate.clone()),
    );
    let proxy = Start::new(&mock.url(), "").start().await;
    let c = client();
    let resp = within(
        "the SSE head",
        c.request(
            req("POST", &proxy.url("/v1/chat/completions"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .expect("request");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = within("the first event", body.frame())
        .await
        .expect("body ended")
        .expect("body error")
        .into_data()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains(r#"{"n":1}"#));

    // While the stream is held the proxy must keep draining.
    let stopping = proxy.begin_stop_while_held().await;
    gate.open();
    let rest = within("the rest of the stream", body.collect())
        .await
        .expect("the stream was cut during the drain")
        .to_bytes();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains(r#"{"n":2}"#), "{text}");
    assert!(text.contains("data: [DONE]"), "{text}");
    let stopped = within("the proxy to stop", stopping).await;
    assert_eq!(stopped.expect("proxy task"), Ok(()));
}

// ----- a queued client that leaves ------------------------------------------------------------

/// Polls the admin `/status` until `queue.depth` equals `want`.
async fn wait_queue_depth(c: &TestClient, proxy: &TestProxy, want: u64) {
    let url = proxy.admin_url("/status");
    within(&format!("queue.depth == {want}"), async {
        loop {
            let got = get(c, &url).await;
            if got.json()["queue"]["depth"] == want {
                return;
            }
            // Polling an observable condition; the interval only limits the request rate.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_client_that_disconnects_while_queued_leaves_the_queue() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 1\nburst = 1\n[queue]\nmax_wait = \"120s\"\n",
    )
    .start()
    .await;
    let c = client();
    // Spends the only token; the next request must wait about a minute.
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-proxy-max-wait: 120s\r\n\r\n")
        .await;
    wait_queue_depth(&c, &proxy, 1).await;
    drop(raw);
    // hyper notices the closed socket and drops the handler future, which leaves the queue.
    wait_queue_depth(&c, &proxy, 0).await;
    // The same over HTTP/2, where leaving means resetting the stream, not closing the socket.
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let url = proxy.url("/v1/models");
    let queued = tokio::spawn(async move {
        let req = req("GET", &url)
            .header("x-proxy-max-wait", "120s")
            .body(Full::new(Bytes::new()))
            .unwrap();
        h2.request(req).await
    });
    wait_queue_depth(&c, &proxy, 1).await;
    queued.abort();
    wait_queue_depth(&c, &proxy, 0).await;
    assert_eq!(mock.count(), 1);
    proxy.stop().await.unwrap();
}

/// A request that waits in the queue has its header fields parked meanwhile (compact, off its
/// header map): what reaches the upstream once it is admitted is what the client sent, each
/// name's values in order, hop-by-hop fields still dropped.
#[tokio::test]
async fn a_request_that_waited_reaches_the_upstream_with_all_its_fields() {
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    mock.push(Reply::json(200, "{}").gated(gate.clone()));
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 600000\nburst = 10000\nmax_concurrent = 1\n[queue]\nmax_wait = \"60s\"\n",
    )
    .start()
    .await;
    let c = client();
    let url = proxy.url("/v1/models");
    let c2 = c.clone();
    let first = tokio::spawn(async move { get(&c2, &url).await.status });
    wait_in_flight(&c, &proxy, 1).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(
        b"GET /v1/models HTTP/1.1\r\n\
          Host: x\r\n\
          X-Multi: a\r\n\
          Connection: keep-alive, X-Req-Hop\r\n\
          Accept: application/json\r\n\
          X-Req-Hop: 1\r\n\
          X-Multi: b\r\n\
          X-Stainless-Lang: python\r\n\
          X-Multi: c\r\n\
          \r\n",
    )
    .await;
    wait_queue_depth(&c, &proxy, 1).await;
    gate.open();
    assert_eq!(within("the first answer", first).await.unwrap(), 200);
    let resp = raw.response().await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let seen = mock.wait_for_requests(2).await;
    let up = &seen[1];
    let multi: Vec<_> = up.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b", "c"]);
    assert_eq!(up.header("accept"), Some("application/json"));
    assert_eq!(up.header("x-stainless-lang"), Some("python"));
    assert!(up.header("x-req-hop").is_none());
    assert!(up.header("connection").is_none());
    proxy.stop().await.unwrap();
}

/// Polls the admin `/status` until `in_flight` equals `want`.
async fn wait_in_flight(c: &TestClient, proxy: &TestProxy, want: u64) {
    let url = proxy.admin_url("/status");
    within(&format!("in_flight == {want}"), async {
        loop {
            if get(c, &url).await.json()["in_flight"] == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_client_leaving_mid_stream_frees_its_concurrency_slot() {
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    mock.push(
        Reply::status(200)
            .sse([
                (Duration::ZERO, sse_data(r#"{"n":1}"#)),
                (Duration::ZERO, sse_data(r#"{"n":2}"#)),
            ])
            .hold_chunk(1, gate.clone()),
    );
    let proxy = Start::new(&mock.url(), "").start().await;
    let c = client();
    let mut raw = Raw::connect(proxy.addr).await;
    raw.send(b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    // The head and the first event are through: the stream holds its slot.
    while !String::from_utf8_lossy(&raw.buf).contains(r#"{"n":1}"#) {
        assert!(raw.fill().await, "closed before the first event");
    }
    wait_in_flight(&c, &proxy, 1).await;
    drop(raw);
    // The upstream still holds the rest; the slot must come back because the client left,
    // not because the stream ended.
    wait_in_flight(&c, &proxy, 0).await;
    assert!(!gate.is_open());
    proxy.stop().await.unwrap();
}

// ----- the binary: configuration checking -----------------------------------------------------

/// Runs the built binary in `dir` with `args`, a clean proxy environment, and backtraces on
/// (so a panic would show).
fn run_binary(dir: &std::path::Path, args: &[&str], key: Option<&str>) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chutes-proxy"));
    cmd.current_dir(dir).args(args).env("RUST_BACKTRACE", "1");
    for var in [
        "CHUTES_API_KEY",
        "CHUTES_PROXY_CONFIG",
        "CHUTES_PROXY_LISTEN",
        "CHUTES_PROXY_ADMIN_LISTEN",
        "CHUTES_PROXY_UPSTREAM",
        "CHUTES_PROXY_LOG_FORMAT",
    ] {
        cmd.env_remove(var);
    }
    if let Some(k) = key {
        cmd.env("CHUTES_API_KEY", k);
    }
    let out = cmd.output().expect("run chutes-proxy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_no_panic(stderr: &str) {
    for sign in ["panicked", "stack backtrace", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(sign), "{sign:?} in stderr:\n{stderr}");
    }
}

#[test]
fn bad_configs_are_rejected_naming_every_key() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, keys) in [
        (
            "[server]\nlisten = \"not-an-address\"\nshutdown_grace = \"soon\"\n\
             max_request_body = \"lots\"\n\
             [upstream]\nurl = \"ftp://example.com\"\nfirst_byte_timeout = 5\n\
             [limits]\nrequests_per_minute = 0\nburts = 3\n\
             [bogus]\nx = 1\n",
            &[
                "server.listen",
                "server.shutdown_grace",
                "server.max_request_body",
                "upstream.url",
                "upstream.first_byte_timeout",
                "limits.requests_per_minute",
                "limits.burts",
                "bogus",
            ][..],
        ),
        (
            "[queue]\nmax_wait = \"-1s\"\nmax_depth = -5\n",
            &["queue.max_wait", "queue.max_depth"][..],
        ),
        (
            "[server]\nadmin_listen = \"0.0.0.0:9090\"\n",
            &["server.admin_listen"][..],
        ),
        ("[server\nlisten = 1\n", &["invalid TOML"][..]),
    ] {
        std::fs::write(dir.path().join("bad.toml"), toml).unwrap();
        // With --check, and when starting for real: both must refuse before binding anything.
        for args in [
            &["--config", "bad.toml", "--check"][..],
            &["--config", "bad.toml"][..],
        ] {
            let (code, _stdout, stderr) = run_binary(dir.path(), args, Some(TEST_KEY));
            assert_ne!(code, 0, "{args:?} accepted:\n{toml}");
            for key in keys {
                assert!(
                    stderr.contains(key),
                    "{key} not named for {args:?}:\n{stderr}"
                );
            }
            assert_no_panic(&stderr);
            assert!(!stderr.contains(TEST_KEY));
        }
    }
}

#[test]
fn check_prints_the_config_without_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("good.toml"),
        "[limits]\nrequests_per_minute = 30\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_binary(
        dir.path(),
        &[
            "--config",
            "good.toml",
            "--upstream",
            "http://127.0.0.1:1/prefix",
            "--check",
        ],
        Some(TEST_KEY),
    );
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("requests_per_minute = 30"), "{stdout}");
    // The flag overrides the file (which left the url at its default).
    assert!(stdout.contains("http://127.0.0.1:1/prefix"), "{stdout}");
    assert!(stdout.contains("redacted"), "{stdout}");
    assert!(!stdout.contains(TEST_KEY), "the key is in --check's stdout");
    assert!(!stderr.contains(TEST_KEY), "the key is in --check's stderr");
    assert_no_panic(&stderr);
}

#[test]
fn a_missing_explicit_config_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _stdout, stderr) =
        run_binary(dir.path(), &["--config", "nope.toml", "--check"], None);
    assert_ne!(code, 0);
    assert!(stderr.contains("nope.toml"), "{stderr}");
    assert_no_panic(&stderr);
    // Without --config, a missing ./config.toml means the built-in defaults.
    let (code, stdout, stderr) = run_binary(dir.path(), &["--check"], None);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("built-in defaults"), "{stdout}");
}

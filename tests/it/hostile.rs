//! Issue 9: hostile clients, a misbehaving upstream, and the security promises, through the
//! real proxy. `core.rs` already covers slow-loris heads, one oversized header, 413s, the
//! stalled-upload 504, first-byte and idle timeouts, absolute-form targets and `Host`, CONNECT,
//! h2c, pipelining, a refused or dropped upstream and a client leaving a token wait; this file
//! covers the rest of the issue's lists and, wherever something is released, checks that the
//! budget really is back to zero (`/status` `queue.depth` and `in_flight`).
//!
//! Raw TCP is used on both sides wherever an HTTP library would refuse to produce the bytes
//! under test (malformed heads, bogus status lines, non-UTF-8 header values). The key-leak
//! test runs the built binary with `RUST_LOG=trace` (every dependency's logging included),
//! because only a real process shows what a real log contains. Every wait is bounded by `within` or the mock's own bounded waits;
//! nothing sleeps to synchronise (the only sleeps pace a poll of an observable condition).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// Limits so high that admission never spaces or queues anything here unless a test says so.
const NO_LIMITS: &str =
    "\n[limits]\nrequests_per_minute = 600000\nburst = 10000\nmax_concurrent = 64\n";

// ----- helpers --------------------------------------------------------------------------------

async fn status(c: &TestClient, proxy: &TestProxy) -> Value {
    let got = get(c, &proxy.admin_url("/status")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    got.json()
}

/// Polls `/status` until nothing is queued or in flight: every permit and queue slot has been
/// given back. Returns that final status.
async fn wait_settled(c: &TestClient, proxy: &TestProxy) -> Value {
    let mut last = Value::Null;
    let settled = tokio::time::timeout(WAIT_LIMIT, async {
        loop {
            last = status(c, proxy).await;
            if last["queue"]["depth"] == 0 && last["in_flight"] == 0 {
                return;
            }
            // Pacing a poll of an observable condition, not synchronisation.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "queue and in-flight did not return to zero: queue={} in_flight={}",
        last["queue"],
        last["in_flight"]
    );
    last
}

/// Polls `/status` until `check` holds.
async fn wait_status(
    c: &TestClient,
    proxy: &TestProxy,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    wait_status_at(c, &proxy.admin_url(""), what, check).await
}

/// Polls `{admin}/status` until `check` holds; returns that status.
async fn wait_status_at(
    c: &TestClient,
    admin: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let url = format!("{admin}/status");
    within(what, async {
        loop {
            let got = get(c, &url).await;
            assert_eq!(got.status, 200, "{}", got.text());
            let s = got.json();
            if check(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// The end of a SIGHUP test: the process is alive, says it reloaded, and SIGTERM still ends
/// it cleanly.
async fn alive_reloaded_and_stopped(
    mut child: std::process::Child,
    stderr: std::thread::JoinHandle<String>,
) {
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the process"
    );
    let (status, log) = terminate(child, stderr).await;
    assert!(status.success(), "{status:?}");
    assert!(log.contains("configuration reloaded"), "{log}");
    // The last line logged before exit is out: batched lines are written at the end of main.
    let last = log.lines().rfind(|l| !l.trim().is_empty());
    assert!(last.is_some_and(|l| l.contains("stopped")), "{log}");
}

/// Asserts the test key appears nowhere in `text`.
fn assert_no_key(what: &str, text: &str) {
    assert!(
        !text.contains(TEST_KEY),
        "{what}: the API key leaked:\n{text}"
    );
}

fn assert_no_key_in(what: &str, got: &Got) {
    for (name, value) in &got.headers {
        assert_no_key(
            &format!("{what}: header {name}"),
            &String::from_utf8_lossy(value.as_bytes()),
        );
    }
    assert_no_key(&format!("{what}: body"), &got.text());
}

/// One of the proxy's own JSON error responses, with this `code`.
fn assert_own(got: &Got, status: u16, code: &str) -> Value {
    assert_eq!(got.status, status, "body: {}", got.text());
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert!(got.header("x-proxy-request-id").is_some());
    let v = got.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_no_key_in(code, got);
    v
}

/// Writes `bytes` on a fresh connection and reads until the proxy closes it (or, with
/// `until_head`, until a whole response head has arrived). Returns what was read as text.
async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8], until_head: bool) -> String {
    let mut s = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    // The proxy may close before reading everything (it answers a broken head at once).
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if until_head && out.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        match within("bytes from the proxy", s.read(&mut buf)).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_code(response: &str) -> Option<u16> {
    response.split(' ').nth(1).and_then(|s| s.parse().ok())
}

/// The soft limit on open files of this process, from /proc (no libc needed); `None` if
/// unknown or unlimited.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

// ----- hostile clients ------------------------------------------------------------------------

#[tokio::test]
async fn malformed_request_heads_are_refused_and_never_forwarded() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), NO_LIMITS).start().await;
    let cases: &[(&str, &[u8], u16)] = &[
        ("not HTTP at all", b"GARBAGE\r\n\r\n", 400),
        ("no version", b"GET /v1/models\r\nHost: x\r\n\r\n", 400),
        (
            "space in the target",
            b"GET /v1/mo dels HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
        ),
        (
            "control byte in the target",
            b"GET /v1/\x7fmodels HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
        ),
        (
            "header line without a colon",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
            400,
        ),
        (
            "space in a header name",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
            400,
        ),
        (
            "space before the colon",
            b"GET /v1/models HTTP/1.1\r\nHost : x\r\n\r\n",
            400,
        ),
        (
            "NUL in a header value",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
            400,
        ),
        (
            "obsolete line folding",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
            400,
        ),
        (
            "conflicting content-lengths",
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            400,
        ),
        (
            "non-numeric content-length",
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5x\r\n\r\nhello",
            400,
        ),
        (
            "a transfer-encoding that does not end in chunked",
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nhello",
            400,
        ),
        (
            "transfer-encoding in HTTP/1.0",
            b"POST /v1/x HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "an unknown HTTP version",
            b"GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n",
            400,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, bytes, want) in cases {
        let response = raw_exchange(proxy.addr, bytes, true).await;
        let got = status_code(&response);
        // The connection answers a head it cannot parse itself, with an empty 400 rather than the
        // proxy's JSON: the status, and that nothing reached the upstream, is what matters.
        if got != Some(*want) {
            wrong.push(format!("{what}: wanted {want}, got {response:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(mock.count(), 0, "a malformed request reached the upstream");
    // The proxy still serves well-formed requests afterwards.
    assert_eq!(get(&client(), &proxy.url("/v1/models")).await.status, 200);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn too_many_headers_or_a_huge_target_are_refused() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "[server]\nmax_header_bytes = 8192\n")
        .start()
        .await;
    // Many small headers (the cap is 100, as hyper's), rather than one big one as in core.rs.
    let mut many = String::from("GET /v1/models HTTP/1.1\r\nHost: x\r\n");
    for i in 0..500 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let response = raw_exchange(proxy.addr, many.as_bytes(), true).await;
    assert_eq!(status_code(&response), Some(431), "{response:?}");
    // A request line longer than the whole head buffer.
    let long = format!(
        "GET /v1/{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let response = raw_exchange(proxy.addr, long.as_bytes(), true).await;
    assert!(
        matches!(status_code(&response), Some(414 | 431)),
        "{response:?}"
    );
    assert_eq!(mock.count(), 0);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn conflicting_body_framing_reaches_the_upstream_unambiguous() {
    // Content-Length and Transfer-Encoding together is the classic request-smuggling shape:
    // if the proxy forwarded both, an upstream that trusted the length would read the rest
    // of the chunked body as a second request. Chunked wins (RFC 9112 §6.3), the length is
    // dropped, and the upstream gets one framing.
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), NO_LIMITS).start().await;
    let smuggled = "GET /v1/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let request = format!(
        "POST /v1/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{smuggled}\r\n0\r\n\r\n",
        smuggled.len()
    );
    let response = raw_exchange(proxy.addr, request.as_bytes(), false).await;
    assert_eq!(status_code(&response), Some(200), "{response:?}");
    let seen = mock.wait_for_requests(1).await;
    assert_eq!(seen.len(), 1, "the body was read as a second request");
    assert_eq!(seen[0].path(), "/v1/a");
    assert_eq!(seen[0].body_text(), smuggled);
    let framing = ["content-length", "transfer-encoding"]
        .iter()
        .filter(|h| seen[0].headers.contains_key(**h))
        .count();
    assert!(
        framing <= 1,
        "both framings forwarded: {:?}",
        seen[0].headers
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn an_upload_that_stalls_or_vanishes_releases_its_slot() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(
        &mock.url(),
        &format!("idle_timeout = \"500ms\"\n{NO_LIMITS}"),
    )
    .start()
    .await;
    let c = client();
    let head = b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n";

    // Stalls: part of the declared body, then silence with the connection open.
    let mut stalled = TcpStream::connect(proxy.addr).await.unwrap();
    stalled.write_all(head).await.unwrap();
    stalled.write_all(&[b'a'; 1000]).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = within("the stalled upload's answer", stalled.read(&mut buf))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(status_code(&answer), Some(504), "{answer}");
    wait_settled(&c, &proxy).await;

    // Vanishes: part of the body, then the socket is closed mid-upload.
    let mut gone = TcpStream::connect(proxy.addr).await.unwrap();
    gone.write_all(head).await.unwrap();
    gone.write_all(&[b'b'; 1000]).await.unwrap();
    mock.wait_for_body_bytes(2000).await;
    drop(gone);
    let seen = mock.wait_for_requests(2).await;
    assert!(seen.iter().all(|r| !r.body_complete), "{seen:?}");
    let s = wait_settled(&c, &proxy).await;
    // Both were sent (the upstream saw their heads), so both count against the day.
    assert_eq!(s["daily"]["used"], 2, "{s}");
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_frees_its_slot_at_once() {
    let mock = MockUpstream::start().await;
    let hold = Gate::new();
    mock.push(
        Reply::status(200)
            .sse([
                (Duration::ZERO, sse_data("{\"n\":1}")),
                (Duration::ZERO, sse_data("{\"n\":2}")),
            ])
            .hold_chunk(1, hold.clone()),
    );
    let proxy = Start::new(&mock.url(), NO_LIMITS).start().await;
    let c = client();
    let mut raw = TcpStream::connect(proxy.addr).await.unwrap();
    raw.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"n\":1") {
        let n = within("the first event", raw.read(&mut buf)).await.unwrap();
        assert!(n > 0, "closed before the first event");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(status(&c, &proxy).await["in_flight"], 1);
    drop(raw);
    // The upstream still holds the rest of the stream: the slot must come back anyway.
    wait_settled(&c, &proxy).await;
    hold.open();
    proxy.stop().await.unwrap();
}

/// A client that keeps its connection open but stops reading a stream: once its TCP window
/// is shut, the proxy's writes wait, and after `idle_timeout` of the client taking nothing
/// the connection is closed and the slot comes back. Without the write-side timer the
/// request held its slot for as long as the client held the connection.
#[tokio::test]
async fn a_client_that_stops_reading_a_stream_frees_its_slot_after_idle_timeout() {
    let mock = MockUpstream::start().await;
    // Far more than the loopback socket buffers on both sides hold.
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    mock.push(Reply::status(200).sse((0..600).map(|_| (Duration::ZERO, chunk.clone()))));
    let proxy = Start::new(
        &mock.url(),
        &format!("idle_timeout = \"500ms\"\n{NO_LIMITS}"),
    )
    .start()
    .await;
    let c = client();
    let mut raw = TcpStream::connect(proxy.addr).await.unwrap();
    raw.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let mut head = [0u8; 64];
    let n = within("the answer's first bytes", raw.read(&mut head))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(status(&c, &proxy).await["in_flight"], 1);
    // The client reads nothing more, and keeps the connection open.
    wait_settled(&c, &proxy).await;
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    drop(raw);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_that_leaves_while_waiting_for_a_concurrency_slot_sends_nothing() {
    // core.rs covers leaving a wait for a rate token; this is the wait for a slot, which is
    // released by another request's response rather than by time.
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    mock.push(Reply::json(200, "{}").gated(gate.clone()));
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 600000\nburst = 10000\nmax_concurrent = 1\n",
    )
    .start()
    .await;
    let c = client();
    let first = tokio::spawn({
        let c = c.clone();
        let url = proxy.url("/v1/first");
        async move { get(&c, &url).await }
    });
    mock.wait_for_requests(1).await;
    let mut queued = TcpStream::connect(proxy.addr).await.unwrap();
    queued
        .write_all(b"GET /v1/second HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    wait_status(&c, &proxy, "one request queued", |s| {
        s["queue"]["depth"] == 1
    })
    .await;
    drop(queued);
    wait_status(&c, &proxy, "the queue to empty", |s| {
        s["queue"]["depth"] == 0
    })
    .await;
    gate.open();
    assert_eq!(first.await.unwrap().status, 200);
    let s = wait_settled(&c, &proxy).await;
    assert_eq!(mock.count(), 1, "the departed request was forwarded");
    assert_eq!(s["daily"]["used"], 1, "{s}");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_thousand_idle_connections_do_not_stop_a_new_request() {
    // Each connection costs two descriptors here (the test's end and the in-process proxy's),
    // and other tests share the process: stay far below the soft limit, e.g. 1024 in CI.
    let limit = open_files_limit().unwrap_or(1024);
    let n = 1500.min(limit.saturating_sub(400) / 2);
    let mock = MockUpstream::start().await;
    let proxy = Start::new(
        &mock.url(),
        &format!("{NO_LIMITS}[server]\nheader_read_timeout = \"120s\"\n"),
    )
    .start()
    .await;
    let mut idle = Vec::with_capacity(n);
    for i in 0..n {
        let s = within("an idle connection", TcpStream::connect(proxy.addr))
            .await
            .unwrap_or_else(|e| panic!("connection {i} of {n}: {e}"));
        idle.push(s);
    }
    // The kernel hands connections to `accept` in arrival order, so an answer on a newer
    // connection means every idle one before it was accepted and is being held open.
    let got = get(&client(), &proxy.url("/v1/models")).await;
    assert_eq!(got.status, 200, "with {n} idle connections open");
    // The idle connections are still open (not shed to make room).
    let probe = &mut idle[n / 2];
    let mut byte = [0u8; 1];
    let still_open = tokio::time::timeout(Duration::from_millis(50), probe.read(&mut byte)).await;
    assert!(still_open.is_err(), "an idle connection was closed early");
    drop(idle);
    proxy.stop().await.unwrap();
    eprintln!("served a request with {n} idle connections open (open-files limit {limit})");
}

#[tokio::test]
async fn idle_connections_at_max_connections_are_reaped_so_new_ones_get_in() {
    // At `max_connections` the proxy stops accepting. Idle connections, whether they never
    // sent a head or sit idle after a keep-alive response, are closed after
    // `header_read_timeout`, so they cannot hold every slot for ever.
    let mock = MockUpstream::start().await;
    let proxy = Start::new(
        &mock.url(),
        &format!("{NO_LIMITS}[server]\nmax_connections = 4\nheader_read_timeout = \"500ms\"\n"),
    )
    .start()
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    for _ in 0..2 {
        // One keep-alive request each, then idle.
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = within("a keep-alive response", s.read(&mut buf))
            .await
            .unwrap();
        assert_eq!(status_code(&String::from_utf8_lossy(&buf[..n])), Some(200));
        held.push(s);
    }
    // Every slot is taken; this one waits in the backlog until an idle one is reaped.
    let got = get(&client(), &proxy.url("/v1/models")).await;
    assert_eq!(got.status, 200);
    for mut s in held {
        let mut buf = [0u8; 64];
        let closed = within("an idle connection to be closed", async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        closed.await;
    }
    proxy.stop().await.unwrap();
}

// ----- a misbehaving upstream -----------------------------------------------------------------

#[tokio::test]
async fn an_upstream_reset_mid_body_ends_the_response_cleanly() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), NO_LIMITS).start().await;
    let c = client();

    // SSE: the client gets what was sent, then an error event and a clean end.
    mock.push(
        Reply::status(200)
            .sse([
                (Duration::ZERO, sse_data("{\"n\":1}")),
                (Duration::ZERO, sse_data("{\"n\":2}")),
            ])
            .reset_after(1),
    );
    let got = get(&c, &proxy.url("/v1/chat/completions")).await;
    assert_eq!(got.status, 200);
    let text = got.text();
    assert!(text.contains("\"n\":1"), "{text}");
    assert!(text.contains("upstream_stream_error"), "{text}");
    wait_settled(&c, &proxy).await;

    // A plain body: the client sees a broken body, never a short one that looks whole.
    mock.push(
        Reply::status(200)
            .chunks([(Duration::ZERO, "part one,"), (Duration::ZERO, "part two")])
            .reset_after(1),
    );
    let resp = within(
        "the response head",
        c.request(
            http::Request::get(proxy.url("/v1/files/x"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .expect("the head arrives before the reset");
    assert_eq!(resp.status(), 200);
    let body = within("the body to end", resp.into_body().collect()).await;
    assert!(body.is_err(), "a truncated body must not end cleanly");
    wait_settled(&c, &proxy).await;
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    proxy.stop().await.unwrap();
}

/// A raw upstream that reads the request head and answers with exactly `response`.
async fn answering_with(response: &'static [u8]) -> RawUpstream {
    raw_upstream(move |mut conn| async move {
        read_request_head(&mut conn).await;
        let _ = conn.write_all(response).await;
        let _ = conn.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn a_bogus_status_line_or_head_is_a_502() {
    let cases: &[(&str, &[u8])] = &[
        ("non-numeric status", b"HTTP/1.1 abc OK\r\n\r\n"),
        (
            "status out of range",
            b"HTTP/1.1 99999 Big\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "two-digit status",
            b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
        ),
        ("not HTTP", b"SSH-2.0-OpenSSH_9.0\r\n\r\n"),
        ("binary junk", b"\x00\x01\x02\xff\xfe\r\n\r\n"),
        (
            "header without a colon",
            b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n",
        ),
        (
            "bare CR inside a header value",
            b"HTTP/1.1 200 OK\r\nX-A: a\rX-Injected: 1\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "conflicting content-lengths",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ),
        ("head cut short", b"HTTP/1.1 200 OK\r\nContent-Type: app"),
    ];
    let c = client();
    for (what, response) in cases {
        let up = answering_with(response).await;
        let proxy = Start::new(&up.url(), NO_LIMITS).start().await;
        let got = get(&c, &proxy.url("/v1/chat/completions")).await;
        assert_eq!(got.status, 502, "{what}: {}", got.text());
        assert_own(&got, 502, "upstream_unavailable");
        assert!(got.header("x-injected").is_none(), "{what}");
        let s = wait_settled(&c, &proxy).await;
        // A broken upstream is not a rate limit: no cooldown.
        assert_eq!(s["cooldown"]["active"], false, "{what}: {s}");
        proxy.stop().await.unwrap();
    }
}

#[tokio::test]
async fn garbage_rate_limit_headers_on_a_success_pass_through_and_close_nothing() {
    // Values no parser can read, including bytes that are not UTF-8 (legal in HTTP as
    // obs-text), on a 200: the response passes through untouched and no gate closes.
    let up = raw_upstream(|mut conn| async move {
        loop {
            let head = read_request_head(&mut conn).await;
            if head.is_empty() {
                return;
            }
            let _ = conn
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                      Retry-After: soon\xff\xfe\r\n\
                      X-RateLimit-Remaining-Requests: -0\r\n\
                      X-RateLimit-Remaining: zero\r\n\
                      X-RateLimit-Reset-Requests: 1e999s\r\n\
                      X-RateLimit-Reset: \xc3\x28\r\n\
                      RateLimit: \"minute\";r=nan;t=inf, ;;;,=,\"unterminated\r\n\
                      RateLimit-Policy: \x80\x81\r\n\
                      Content-Length: 11\r\n\r\n{\"ok\":true}",
                )
                .await;
        }
    })
    .await;
    let proxy = Start::new(&up.url(), NO_LIMITS).start().await;
    let c = client();
    for _ in 0..3 {
        let got = get(&c, &proxy.url("/v1/models")).await;
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(got.text(), "{\"ok\":true}");
        assert_eq!(
            got.headers.get("x-ratelimit-reset").map(|v| v.as_bytes()),
            Some(&b"\xc3\x28"[..]),
            "upstream headers pass through byte for byte"
        );
    }
    let s = wait_settled(&c, &proxy).await;
    assert_eq!(s["cooldown"]["active"], false, "{s}");
    assert_eq!(s["cooldown"]["gate"], "open", "{s}");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_429_storm_is_one_cooldown_and_leaves_nothing_held() {
    const N: usize = 24;
    let mock = MockUpstream::start().await;
    let release = Gate::new();
    for _ in 0..N {
        mock.push(
            Reply::text(
                429,
                "text/html",
                "<html><body>429 Too Many Requests</body></html>",
            )
            .gated(release.clone()),
        );
    }
    let proxy = Start::new(
        &mock.url(),
        &format!("{NO_LIMITS}[cooldown]\ninitial = \"60s\"\nmax = \"10m\"\n"),
    )
    .start()
    .await;
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..N {
        let c = c.clone();
        let url = proxy.url(&format!("/v1/chat/completions?i={i}"));
        tasks.push(tokio::spawn(async move { get(&c, &url).await }));
    }
    // All of them are at the upstream before the first 429 comes back.
    mock.wait_for_requests(N).await;
    assert_eq!(status(&c, &proxy).await["in_flight"], N);
    release.open();
    for t in tasks {
        let got = t.await.unwrap();
        let v = assert_own(&got, 429, "rate_limit_exceeded");
        assert_eq!(v["error"]["proxy"]["reason"], "upstream_rate_limited");
    }
    let s = wait_settled(&c, &proxy).await;
    assert_eq!(s["cooldown"]["active"], true, "{s}");
    assert_eq!(s["cooldown"]["level"], 1, "one storm is one episode: {s}");
    // And nothing more reaches the upstream during the cooldown.
    let got = get(&c, &proxy.url("/v1/models")).await;
    let v = assert_own(&got, 429, "rate_limit_exceeded");
    assert_eq!(v["error"]["proxy"]["reason"], "upstream_cooldown");
    assert_eq!(mock.count(), N);
    wait_settled(&c, &proxy).await;
    proxy.stop().await.unwrap();
}

/// A real TLS server with a self-signed certificate (tests/it/fixtures): the handshake
/// itself is well-formed, so only certificate verification can fail it. Returns its address
/// and what each handshake ended as.
async fn self_signed_tls_server() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let cert = CertificateDer::from(include_bytes!("fixtures/self_signed_cert.der").to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        include_bytes!("fixtures/self_signed_key.der").to_vec(),
    ));
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap(),
    );
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&outcomes);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let config = Arc::clone(&config);
            let seen = Arc::clone(&seen);
            let Ok(std_stream) = stream.into_std() else {
                continue;
            };
            // rustls' own blocking driver, on a blocking thread: no tokio-rustls needed.
            tokio::task::spawn_blocking(move || {
                let _ = std_stream.set_nonblocking(false);
                let _ = std_stream.set_read_timeout(Some(WAIT_LIMIT));
                let mut sock = std_stream;
                let mut conn = match rustls::ServerConnection::new(config) {
                    Ok(c) => c,
                    Err(e) => {
                        seen.lock().unwrap().push(format!("setup failed: {e}"));
                        return;
                    }
                };
                let outcome = loop {
                    if !conn.is_handshaking() {
                        break "handshake completed".to_string();
                    }
                    match conn.complete_io(&mut sock) {
                        Ok((0, 0)) => break "connection closed mid-handshake".to_string(),
                        Ok(_) => {}
                        Err(e) => break format!("handshake failed: {e}"),
                    }
                };
                seen.lock().unwrap().push(outcome);
            });
        }
    });
    (addr, outcomes)
}

#[tokio::test]
async fn a_self_signed_garbage_or_stalled_tls_upstream_is_a_502_or_its_timeout() {
    let c = client();

    let (addr, outcomes) = self_signed_tls_server().await;
    let proxy = Start::new(&format!("https://{addr}"), NO_LIMITS)
        .start()
        .await;
    let got = get(&c, &proxy.url("/v1/models")).await;
    assert_own(&got, 502, "upstream_unavailable");
    within("the TLS server to see the handshake end", async {
        while outcomes.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let outcomes = outcomes.lock().unwrap().clone();
    // The proxy aborts the handshake itself (an alert such as CertificateUnknown) once it
    // sees the certificate: it never completes, so no request byte goes to this server.
    assert!(
        outcomes.iter().all(|o| o.starts_with("handshake failed")),
        "the proxy did not refuse the self-signed certificate: {outcomes:?}"
    );
    wait_settled(&c, &proxy).await;
    proxy.stop().await.unwrap();

    // Bytes that are not TLS at all, sent before the ClientHello is even read.
    let garbage = raw_upstream(|mut conn| async move {
        let _ = conn
            .write_all(b"\x15\x03\x03\x00\x02\x02\x28garbage\r\n\r\n")
            .await;
        let _ = conn.write_all(&[0xAB; 512]).await;
    })
    .await;
    let proxy = Start::new(&format!("https://{}", garbage.addr()), NO_LIMITS)
        .start()
        .await;
    assert_own(
        &get(&c, &proxy.url("/v1/models")).await,
        502,
        "upstream_unavailable",
    );
    wait_settled(&c, &proxy).await;
    proxy.stop().await.unwrap();

    // Accepts, reads the ClientHello and never answers: the dial ends at connect_timeout
    // (a connect failure, 502), or at first_byte_timeout if that is shorter (504).
    let silent = raw_upstream(|mut conn| async move {
        let mut buf = [0u8; 1024];
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
    // With the first-byte timeout at 120 s (the default), only the dial's own bound answers in
    // time.
    for (setting, status, code) in [
        ("first_byte_timeout = \"500ms\"", 504, "upstream_timeout"),
        ("connect_timeout = \"500ms\"", 502, "upstream_unavailable"),
    ] {
        let proxy = Start::new(
            &format!("https://{}", silent.addr()),
            &format!("{setting}\n{NO_LIMITS}"),
        )
        .start()
        .await;
        assert_own(&get(&c, &proxy.url("/v1/models")).await, status, code);
        wait_settled(&c, &proxy).await;
        proxy.stop().await.unwrap();
    }
}

// ----- security: the destination --------------------------------------------------------------

#[tokio::test]
async fn no_header_or_path_trick_reaches_another_host() {
    let mock = MockUpstream::start().await;
    // A second server standing in for the place an attacker wants to reach.
    let elsewhere = MockUpstream::start().await;
    let evil = elsewhere.addr().to_string();
    let proxy = Start::new(&format!("{}/api", mock.url()), NO_LIMITS)
        .start()
        .await;
    let cases: Vec<(String, String)> = vec![
        (
            format!(
                "GET /v1/models HTTP/1.1\r\nHost: {evil}\r\nX-Forwarded-Host: {evil}\r\n\
                 X-Forwarded-Proto: http\r\nForwarded: host={evil};proto=http\r\n\r\n"
            ),
            "/api/v1/models".into(),
        ),
        (
            format!(
                "GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Original-URL: http://{evil}/\r\n\
                 X-Rewrite-URL: http://{evil}/\r\n\r\n"
            ),
            "/api/v1/models".into(),
        ),
        (
            "GET /v1/%2e%2e/x HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            "/api/v1/%2e%2e/x".into(),
        ),
        (
            "GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            "/api/../../etc/passwd".into(),
        ),
        (
            "GET /v1/..%2f..%2fadmin HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            "/api/v1/..%2f..%2fadmin".into(),
        ),
        (
            format!("GET //{evil}/x HTTP/1.1\r\nHost: x\r\n\r\n"),
            format!("/api//{evil}/x"),
        ),
        (
            format!("GET /@{evil}/x HTTP/1.1\r\nHost: x\r\n\r\n"),
            format!("/api/@{evil}/x"),
        ),
        (
            format!("GET http://{evil}@127.0.0.1/v1/x HTTP/1.1\r\nHost: {evil}\r\n\r\n"),
            "/api/v1/x".into(),
        ),
    ];
    for (i, (request, want)) in cases.iter().enumerate() {
        let response = raw_exchange(proxy.addr, request.as_bytes(), true).await;
        assert_eq!(status_code(&response), Some(200), "case {i}: {response:?}");
        let seen = mock.wait_for_requests(i + 1).await;
        let got = seen[i]
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("");
        assert_eq!(got, want, "case {i}: the path was rewritten");
    }
    // HTTP/2: the `:authority` pseudo-header names the other host.
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let resp = within(
        "an h2 response",
        h2.send_request(
            http::Request::get(format!("http://{evil}/v1/h2"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = mock.wait_for_requests(cases.len() + 1).await;
    assert_eq!(seen[cases.len()].path(), "/api/v1/h2");
    assert_eq!(elsewhere.count(), 0, "a request reached the other host");
    assert_eq!(
        elsewhere.connections(),
        0,
        "the proxy connected to the other host"
    );
    proxy.stop().await.unwrap();
}

// ----- security: the key ----------------------------------------------------------------------

#[tokio::test]
async fn upstream_429_content_cannot_inject_headers_into_the_proxys_answer() {
    let mock = MockUpstream::start().await;
    mock.push(
        Reply::text(
            429,
            "text/html",
            "busy\r\nX-Injected: 1\r\n\r\n<script>x</script>",
        )
        .header("set-cookie", "session=stolen")
        .header("location", "http://evil.example/")
        .header("x-upstream-secret", "s3cret")
        .header("retry-after", "1"),
    );
    let proxy = Start::new(&mock.url(), NO_LIMITS).start().await;
    let got = get(&client(), &proxy.url("/v1/chat/completions")).await;
    let v = assert_own(&got, 429, "rate_limit_exceeded");
    for h in ["x-injected", "set-cookie", "location", "x-upstream-secret"] {
        assert!(
            got.header(h).is_none(),
            "{h} leaked into the proxy's own 429"
        );
    }
    // The body is carried as a JSON string: its CR/LF are escaped text, not structure.
    assert_eq!(
        v["error"]["proxy"]["upstream_body"],
        "busy\r\nX-Injected: 1\r\n\r\n<script>x</script>"
    );
    assert!(!got.text().contains("\r\nX-Injected"), "{}", got.text());
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn the_key_is_never_in_responses_status_metrics_or_trace_logs() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The key comes from a file, as in a container: that path must not leak it either.
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{TEST_KEY}\n")).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{}\"\napi_key_file = \"{}\"\nfirst_byte_timeout = \"5s\"\n\
             [limits]\nrequests_per_minute = 600000\nburst = 10000\n\
             [cooldown]\ninitial = \"1s\"\n\
             [state]\npath = \"{}\"\n",
            mock.url(),
            key_file.display(),
            dir.path().join("state.json").display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chutes-proxy"))
        .arg("--config")
        .arg(&config)
        .env_remove("CHUTES_API_KEY")
        .env("RUST_LOG", "trace")
        .env("RUST_BACKTRACE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start chutes-proxy");
    let (startup, stderr) = wait_for_startup(&mut child).await;
    let base = address_after(&startup, "listening on ").expect("proxy address");
    let admin = address_after(&startup, "(admin: ").expect("admin address");

    let c = client();
    let mut answers = Vec::new();
    // A success, the client's own credentials (replaced), an upstream that hangs up, a bad
    // header, an upstream 429 and a 402 quota: every path that logs something.
    answers.push(get(&c, &format!("{base}/v1/models")).await);
    answers.push(
        send(
            &c,
            req("POST", &format!("{base}/v1/chat/completions"))
                .header("authorization", "Bearer client-secret")
                .header("x-api-key", "client-secret")
                .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
                .unwrap(),
        )
        .await,
    );
    mock.push(Reply::disconnect());
    answers.push(get(&c, &format!("{base}/v1/models")).await);
    answers.push(
        send(
            &c,
            req("GET", &format!("{base}/v1/models"))
                .header("x-proxy-max-wait", "forever")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await,
    );
    mock.push(Reply::json(429, r#"{"detail":"Too many requests"}"#).header("retry-after", "1"));
    answers.push(get(&c, &format!("{base}/v1/chat/completions")).await);
    answers.push(get(&c, &format!("{admin}/status")).await);
    answers.push(get(&c, &format!("{admin}/metrics")).await);
    answers.push(get(&c, &format!("{admin}/healthz")).await);
    let statuses: Vec<u16> = answers.iter().map(|g| g.status).collect();
    assert_eq!(statuses, [200, 200, 502, 400, 429, 200, 200, 200]);
    for (i, got) in answers.iter().enumerate() {
        assert_no_key_in(&format!("answer {i}"), got);
    }
    // The key really was in use: the upstream got it.
    let seen = mock.requests();
    assert!(seen
        .iter()
        .all(|r| r.header("authorization") == Some(&*format!("Bearer {TEST_KEY}"))));

    // SIGTERM, so the shutdown path (state save) logs too.
    let (exit, log) = terminate(child, stderr).await;
    assert!(exit.success(), "exit {exit:?}; stderr:\n{log}");
    assert!(log.contains("TRACE"), "trace logging was not on:\n{log}");
    assert!(log.contains("upstream 429"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_no_key("the proxy's log", &log);
    assert!(
        !log.contains("client-secret"),
        "a client credential was logged:\n{log}"
    );
    // Nor is the state file a place for it.
    let state = std::fs::read_to_string(dir.path().join("state.json")).unwrap();
    assert_no_key("the state file", &state);
}

// ----- upstream.api_key_file ------------------------------------------------------------------

#[tokio::test]
async fn api_key_file_supplies_the_key_trimmed_and_read_once() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("chutes-key");
    // A secret mounted by an orchestrator often ends with a newline.
    std::fs::write(&key_file, "  cpk_from_file \n").unwrap();
    let proxy = Start::new(
        &mock.url(),
        &format!("api_key_file = \"{}\"\n{NO_LIMITS}", key_file.display()),
    )
    // The file wins over the environment variable.
    .env("CHUTES_API_KEY", "cpk_from_env")
    .start()
    .await;
    let c = client();
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    // Changed on disk after startup: the proxy keeps the key it read.
    std::fs::write(&key_file, "cpk_rotated").unwrap();
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    let auth: Vec<_> = mock
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap_or("").to_string())
        .collect();
    assert_eq!(auth, ["Bearer cpk_from_file", "Bearer cpk_from_file"]);
    let s = status(&c, &proxy).await;
    assert!(!s.to_string().contains("cpk_from_file"), "{s}");
    proxy.stop().await.unwrap();
}

#[test]
fn a_missing_or_empty_key_file_is_a_config_error_naming_the_key() {
    use chutes_proxy::config::{Config, Overrides};
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, " \n\t\n").unwrap();
    let missing = dir.path().join("missing");
    for (path, says) in [(&empty, "is empty"), (&missing, "cannot read")] {
        let text = format!("[upstream]\napi_key_file = \"{}\"\n", path.display());
        let env = |_: &str| Some("cpk_env_is_not_a_fallback".to_string());
        let errors = Config::from_toml(&text, &Overrides::default(), &env)
            .expect_err("a bad key file must not silently fall back");
        let found: Vec<_> = errors
            .0
            .iter()
            .filter(|e| e.key == "upstream.api_key_file")
            .collect();
        assert_eq!(found.len(), 1, "{errors}");
        assert!(found[0].message.contains(says), "{errors}");
        assert!(
            found[0].message.contains(&*path.display().to_string()),
            "{errors}"
        );
    }
    // The binary reports it the same way and exits non-zero.
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[upstream]\napi_key_file = \"{}\"\n", missing.display()),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chutes-proxy"))
        .arg("--config")
        .arg(&config)
        .arg("--check")
        .env_remove("CHUTES_API_KEY")
        .output()
        .expect("run chutes-proxy --check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("upstream.api_key_file"), "{stderr}");
}

/// SIGHUP re-reads the config file and never ends the process; SIGTERM still stops it
/// cleanly afterwards.
#[tokio::test]
async fn sighup_reloads_and_never_ends_the_process() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let text = |rpm: u32| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{}\"\n[limits]\nrequests_per_minute = {rpm}\n[state]\npath = \"\"\n",
            mock.url()
        )
    };
    std::fs::write(&config, text(600)).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chutes-proxy"))
        .arg("--config")
        .arg(&config)
        .env("CHUTES_API_KEY", TEST_KEY)
        .env("RUST_BACKTRACE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start chutes-proxy");
    let (startup, stderr) = wait_for_startup(&mut child).await;
    let admin = address_after(&startup, "(admin: ").expect("admin address");
    let c = client();
    std::fs::write(&config, text(30)).unwrap();
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_status_at(&c, &admin, "SIGHUP to reload", |s| {
        s["limits"]["requests_per_minute"] == 30
    })
    .await;
    alive_reloaded_and_stopped(child, stderr).await;
}

/// A SIGHUP that arrives while the proxy is still reading its configuration (here a pipe that
/// has not been written yet) does not end it: the proxy starts, serves, and then re-reads the
/// file once for that signal, so a change made while it started is not missed. Before SIGHUP
/// was taken over ahead of the config read, its default action ended the process here.
#[tokio::test]
async fn a_sighup_while_the_config_is_read_reloads_once_serving() {
    let mock = MockUpstream::start().await;
    let (_dir, fifo, mut child) = proxy_on_a_config_pipe();
    let upstream = mock.url();
    let text = move |rpm: u32| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{upstream}\"\n[limits]\nrequests_per_minute = {rpm}\n[state]\npath = \"\"\n"
        )
    };
    let writer = opened_by_the_proxy(&fifo, &mut child).await;
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let feed = |mut w: std::fs::File, text: String| {
        use std::io::Write as _;
        w.write_all(text.as_bytes()).unwrap();
    };
    feed(writer, text(600));
    let (startup, stderr) = wait_for_startup(&mut child).await;
    let main = address_after(&startup, "listening on ").expect("main address");
    let admin = address_after(&startup, "(admin: ").expect("admin address");
    let c = client();
    assert_eq!(get(&c, &format!("{main}/healthz")).await.status, 200);
    // The signal's reload opens the pipe again: a blocking open for writing waits for it.
    let again = fifo.clone();
    let reread = tokio::task::spawn_blocking(move || {
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(&again)
            .unwrap();
        feed(w, text(30));
    });
    within("the reload to read the pipe", reread).await.unwrap();
    wait_status_at(&c, &admin, "the reloaded rate", |s| {
        s["limits"]["requests_per_minute"] == 30
    })
    .await;
    alive_reloaded_and_stopped(child, stderr).await;
}

/// Request bodies read before admission are held together within `queue.max_body_bytes`: a body
/// that does not fit beside those waiting is shed at once as `queue_full` (declared or chunked,
/// nothing sent upstream), and a waiting request that leaves gives its bytes back.
#[tokio::test]
async fn waiting_bodies_are_bounded_together() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 1\nburst = 1\n[queue]\nmax_wait = \"60s\"\nmax_body_bytes = \"1000B\"\n",
    )
    .start()
    .await;
    let c = client();
    // The burst's one token: everything after this waits about a minute.
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    let body = format!(r#"{{"model":"m","pad":"{}"}}"#, "x".repeat(578));
    assert_eq!(body.len(), 600);
    let post = |body: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut waiting = TcpStream::connect(proxy.addr).await.unwrap();
    waiting.write_all(post(&body).as_bytes()).await.unwrap();
    let s = wait_status(&c, &proxy, "one body waiting", |s| s["queue"]["depth"] == 1).await;
    assert_eq!(s["queue"]["body_bytes"], 600, "{s}");
    assert_eq!(s["queue"]["max_body_bytes"], 1000, "{s}");

    // A declared 600 bytes more does not fit: shed before a byte of it is read.
    let shed = send(
        &c,
        req("POST", &proxy.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap(),
    )
    .await;
    assert_eq!(shed.status, 429, "{}", shed.text());
    let e = &shed.json()["error"];
    assert_eq!(e["proxy"]["reason"], "queue_full");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("hold 600 bytes and this one needs 600; the limit is 1000"),
        "{e}"
    );
    assert!(shed.header("retry-after").is_some());

    // A chunked body is held as it arrives and refused once it passes the bound.
    let mut chunked = TcpStream::connect(proxy.addr).await.unwrap();
    chunked
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = vec![0u8; 4096];
    let n = within("the chunked request's answer", chunked.read(&mut head)).await;
    let text = String::from_utf8_lossy(&head[..n.unwrap()]).to_string();
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(text.contains("queue_full"), "{text}");
    let s = status(&c, &proxy).await;
    assert_eq!(s["queue"]["body_bytes"], 600, "refusals hold nothing: {s}");

    // The waiting client leaves: its bytes come back, and the next body fits.
    drop(waiting);
    wait_status(&c, &proxy, "the waiting body given back", |s| {
        s["queue"]["depth"] == 0 && s["queue"]["body_bytes"] == 0
    })
    .await;
    let mut next = TcpStream::connect(proxy.addr).await.unwrap();
    next.write_all(post(&body).as_bytes()).await.unwrap();
    let s = wait_status(&c, &proxy, "the next body waiting", |s| {
        s["queue"]["depth"] == 1
    })
    .await;
    assert_eq!(s["queue"]["body_bytes"], 600, "{s}");
    drop(next);
    assert_eq!(
        mock.count(),
        1,
        "nothing shed or abandoned reached the upstream"
    );
    proxy.stop().await.unwrap();
}

/// The proxy binary started on a config file that is a named pipe (in a temp dir, returned to
/// be kept alive): it blocks in its config read until the test writes the text.
fn proxy_on_a_config_pipe() -> (tempfile::TempDir, std::path::PathBuf, std::process::Child) {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("config.toml");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_chutes-proxy"))
        .arg("--config")
        .arg(&fifo)
        .env("CHUTES_API_KEY", TEST_KEY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start chutes-proxy");
    (dir, fifo, child)
}

/// The write end of `fifo`, once the proxy has opened it to read: a non-blocking open for
/// writing succeeds only when a reader has the pipe open, so the proxy is then inside its
/// config read (blocked until text arrives).
async fn opened_by_the_proxy(
    fifo: &std::path::Path,
    child: &mut std::process::Child,
) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt as _;
    within("the proxy to open its config", async {
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(fifo)
            {
                Ok(w) => return w,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                    assert!(child.try_wait().unwrap().is_none(), "the proxy ended early");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("open the config pipe: {e}"),
            }
        }
    })
    .await
}

/// A reload whose file never arrives (a config on a pipe nobody feeds, a hung mount) holds
/// neither the proxy's serving nor its shutdown: the read is on a blocking thread, and a
/// SIGTERM still drains and exits.
#[tokio::test]
async fn a_reload_that_never_reads_its_file_holds_neither_serving_nor_shutdown() {
    use std::io::Write as _;
    let mock = MockUpstream::start().await;
    let (_dir, fifo, mut child) = proxy_on_a_config_pipe();
    let mut first = opened_by_the_proxy(&fifo, &mut child).await;
    first
        .write_all(
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 [upstream]\nurl = \"{}\"\n[state]\npath = \"\"\n",
                mock.url()
            )
            .as_bytes(),
        )
        .unwrap();
    drop(first);
    let (startup, stderr) = wait_for_startup(&mut child).await;
    let main = address_after(&startup, "listening on ").expect("main address");
    let pid = child.id() as libc::pid_t;
    // Twice: a second reload must not queue behind the first on a worker either.
    for _ in 0..2 {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    }
    // The reload has the pipe open and is reading it; the text never comes.
    let stuck = opened_by_the_proxy(&fifo, &mut child).await;
    let c = client();
    for _ in 0..4 {
        assert_eq!(get(&c, &format!("{main}/healthz")).await.status, 200);
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = within(
        "the proxy to exit with a reload stuck",
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "{status:?}");
    drop(stuck);
    let log = stderr.join().unwrap();
    assert!(log.contains("stopped"), "{log}");
}

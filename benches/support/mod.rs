//! Shared pieces of the load benches (`e2e`, `fidelity`, `scale`): a fast in-process mock
//! upstream, a minimal blocking HTTP/1.1 client for the load generator, the release proxy as a
//! child process, and the statistics every report needs (percentiles, Jain's index).
//!
//! Benches cannot import `tests/it/support`, so the mock here is a smaller cousin of that one,
//! built for speed rather than scripting: one canned JSON reply, one 50-chunk SSE reply, a
//! "primer" reply that closes the proxy's gate, and an arrival log only when asked for (the
//! e2e bench must not pay for a mutex per request it does not need).
//!
//! Every wait here is bounded in time, and everything listens on 127.0.0.1 only.

// Each bench binary uses a different subset of this module.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// True when the binary was started by `cargo bench` (which passes `--bench`); `cargo test
/// --all-targets` runs bench targets without it, and then each bench does a smoke run of a
/// few seconds so CI exercises the code without spending minutes on it.
pub fn bench_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// An environment variable as a number, or `default`.
pub fn env_num(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// Process limits
// ---------------------------------------------------------------------------------------------

/// Raise the soft open-file limit to the hard limit (10,000 client sockets need it; children
/// such as the proxy inherit it). Returns the limit now in force.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

/// Make `thread::sleep` on this thread wake within a few microseconds of its target instead
/// of the default 50 µs timer slack: the open-loop generator schedules requests 1 ms apart and
/// measures from the scheduled instant, so slack would be added to every latency it reports.
pub fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and affects only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// A port that was free a moment ago (the child process binds it itself).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Wait (at most `limit`) until something accepts connections on `addr`.
pub fn wait_listening(addr: SocketAddr, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `VmRSS`/`VmHWM`-style fields of /proc/<pid>/status, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l[field.len() + 1..].split_whitespace().next()?.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// The proxy as a child process
// ---------------------------------------------------------------------------------------------

/// The chutes-proxy binary cargo built for this bench: the release build under `cargo bench`,
/// the debug build under `cargo test`.
pub const PROXY_BIN: &str = env!("CARGO_BIN_EXE_chutes-proxy");

/// The binary to run: [`PROXY_BIN`], or `BENCH_PROXY_BIN` to measure another build (an A/B
/// of a change built in another worktree, against the same generator and mock).
pub fn proxy_bin() -> String {
    std::env::var("BENCH_PROXY_BIN").unwrap_or_else(|_| PROXY_BIN.to_string())
}

/// A running chutes-proxy process with its own config in a temp dir. Its own process, so its
/// RSS is its own and it does not share a runtime with the load generator (as in production).
pub struct ProxyProcess {
    child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// `toml` must not set `server.listen`/`admin_listen`; they are passed as flags. `rust_log`
    /// is the log filter (`info` logs one line per request, as a user's proxy would).
    pub fn start(toml: &str, with_admin: bool, rust_log: &str) -> ProxyProcess {
        Self::start_with_env(toml, with_admin, rust_log, &[])
    }

    /// As [`ProxyProcess::start`], with `env` set for the process too.
    pub fn start_with_env(
        toml: &str,
        with_admin: bool,
        rust_log: &str,
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = dir.path().join("proxy.toml");
        std::fs::write(&cfg, toml).expect("write proxy config");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: Option<SocketAddr> =
            with_admin.then(|| format!("127.0.0.1:{}", free_port()).parse().unwrap());
        let log_path = dir.path().join("proxy.log");
        let log = std::fs::File::create(&log_path).expect("proxy log file");
        let bin = proxy_bin();
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&cfg)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--admin-listen")
            .arg(admin.map(|a| a.to_string()).unwrap_or_default())
            .current_dir(dir.path())
            .env_remove("CHUTES_PROXY_CONFIG")
            .env_remove("CHUTES_PROXY_UPSTREAM")
            .env("CHUTES_API_KEY", "cpk_bench_not_a_real_key")
            .env("RUST_LOG", rust_log)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let mut p = ProxyProcess {
            child,
            addr,
            admin,
            log_path,
            _dir: dir,
        };
        if !wait_listening(addr, Duration::from_secs(15)) {
            let log = std::fs::read_to_string(&p.log_path).unwrap_or_default();
            let _ = p.child.kill();
            panic!("the proxy did not start listening on {addr}; its log:\n{log}");
        }
        p
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size now and its high-water mark, KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        (
            proc_status_kib(self.pid(), "VmRSS").unwrap_or(0),
            proc_status_kib(self.pid(), "VmHWM").unwrap_or(0),
        )
    }

    /// CPU time (user + system) the proxy has used so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time_of(self.pid())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        // SIGTERM: a graceful drain, as a user would stop it.
        stop_child(&mut self.child, libc::SIGTERM);
    }
}

/// Ask a child this process spawned to stop with `signal`, wait up to 5 s, then kill it.
pub fn stop_child(child: &mut Child, signal: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child the caller spawned and still owns.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// CPU time of a process and its direct children (nginx's master and workers).
pub fn cpu_time_tree(pid: u32) -> Duration {
    let mut total = cpu_time_of(pid);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return total;
    };
    for e in dir.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let ppid = std::fs::read_to_string(format!("/proc/{child}/stat"))
            .ok()
            .and_then(|s| {
                let rest = &s[s.rfind(')')? + 2..];
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            });
        if ppid == Some(pid) {
            total += cpu_time_of(child);
        }
    }
    total
}

/// utime + stime of a process from /proc/<pid>/stat.
pub fn cpu_time_of(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the ")" that ends the command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf with a valid name has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

// ---------------------------------------------------------------------------------------------
// Mock upstream
// ---------------------------------------------------------------------------------------------

/// Number of SSE events in a streamed reply (the issue's "50-chunk SSE response").
pub const SSE_CHUNKS: usize = 50;

/// A request as the mock saw it, when recording is on.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Instant,
    /// `x-bench-seq`, if sent (the scale bench's send order).
    pub seq: Option<u32>,
    /// `x-bench-client`, if sent (which simulated client it came from).
    pub client: Option<u8>,
}

pub struct MockState {
    pub requests: AtomicU64,
    /// Of those, the ones that came over HTTP/2.
    pub h2_requests: AtomicU64,
    record: bool,
    pub arrivals: Mutex<Vec<Arrival>>,
    json: Bytes,
    sse: Vec<Bytes>,
    /// The gate the primer reply closes, in seconds (`x-ratelimit-reset-requests`).
    primer_reset: String,
}

/// The mock upstream, serving on its own tokio runtime so the bench's own threads (the
/// blocking load generator) never run on it.
pub struct Mock {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
    runtime: Option<tokio::runtime::Runtime>,
    tls: bool,
}

impl Mock {
    /// `workers` tokio worker threads; `record` keeps an arrival log; `primer_reset` is how
    /// long a primer reply closes the proxy's gate for.
    pub fn start(workers: usize, record: bool, primer_reset: Duration) -> Mock {
        Self::start_with(workers, record, primer_reset, None)
    }

    /// As [`Mock::start`], serving over TLS with `tls` (see [`tls`]) when given.
    pub fn start_with(
        workers: usize,
        record: bool,
        primer_reset: Duration,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Mock {
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        let is_tls = tls.is_some();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name("mock-upstream")
            .enable_all()
            .build()
            .expect("mock runtime");
        let state = Arc::new(MockState {
            requests: AtomicU64::new(0),
            h2_requests: AtomicU64::new(0),
            record,
            arrivals: Mutex::new(Vec::new()),
            json: Bytes::from_static(JSON_REPLY.as_bytes()),
            sse: sse_events(),
            primer_reset: format!("{}s", primer_reset.as_secs().max(1)),
        });
        // Bound with std so `start` can be called from inside another runtime (no block_on).
        let std_listener = StdListener::bind("127.0.0.1:0").expect("mock bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().unwrap();
        let st = Arc::clone(&state);
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("mock listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors or similar: back off rather than spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let st = Arc::clone(&st);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| mock_handle(Arc::clone(&st), req));
                    let mut http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        None => {
                            http.keep_alive(true)
                                .serve_connection(TokioIo::new(stream), svc)
                                .await
                        }
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                                hyper::server::conn::http2::Builder::new(
                                    hyper_util::rt::TokioExecutor::new(),
                                )
                                .serve_connection(TokioIo::new(tls), svc)
                                .await
                            }
                            Ok(tls) => {
                                http.keep_alive(true)
                                    .serve_connection(TokioIo::new(tls), svc)
                                    .await
                            }
                            Err(_) => return,
                        },
                    };
                });
            }
        });
        Mock {
            addr,
            state,
            runtime: Some(runtime),
            tls: is_tls,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.state.arrivals.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.state.arrivals.lock().unwrap().clear();
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A typical small non-streamed chat completion (about 300 bytes).
pub const JSON_REPLY: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1767225600,"model":"bench/model","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, how are you?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;

/// A typical small chat request; `stream` selects the SSE reply.
pub fn request_body(stream: bool) -> String {
    format!(
        r#"{{"model":"bench/model","messages":[{{"role":"user","content":"Say hello in five words."}}],"max_tokens":16,"stream":{stream}}}"#
    )
}

fn sse_events() -> Vec<Bytes> {
    (0..SSE_CHUNKS)
        .map(|i| {
            if i + 1 == SSE_CHUNKS {
                Bytes::from_static(b"data: [DONE]\n\n")
            } else {
                Bytes::from(format!(
                    "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}}}}]}}\n\n"
                ))
            }
        })
        .collect()
}

async fn mock_handle(
    st: Arc<MockState>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let (parts, body) = req.into_parts();
    if parts.version == http::Version::HTTP_2 {
        st.h2_requests.fetch_add(1, Ordering::Relaxed);
    }
    // Read the whole request, as a real server does before answering.
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    st.requests.fetch_add(1, Ordering::Relaxed);
    let h = &parts.headers;
    let num = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
    };
    if st.record {
        let a = Arrival {
            at: Instant::now(),
            seq: num("x-bench-seq"),
            client: num("x-bench-client").map(|c| c as u8),
        };
        st.arrivals.lock().unwrap().push(a);
    }
    let mut resp = if h.contains_key("x-bench-primer") {
        // "No requests left until the reset": the proxy closes its gate (proactively, no
        // probe), so everything sent next queues.
        let mut r = Response::new(MockBody::full(st.json.clone()));
        r.headers_mut()
            .insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
        r.headers_mut().insert(
            "x-ratelimit-reset-requests",
            st.primer_reset.parse().unwrap(),
        );
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    } else if memmem(&body, b"\"stream\":true") {
        let mut r = Response::new(MockBody::chunks(st.sse.iter().cloned().collect()));
        r.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        r.headers_mut()
            .insert("cache-control", "no-cache".parse().unwrap());
        r
    } else {
        let mut r = Response::new(MockBody::full(st.json.clone()));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    };
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

fn memmem(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A whole body, or SSE events handed to hyper one per poll with a yield in between, so that
/// each goes out in its own write as a token-by-token upstream's would (hyper flushes when the
/// body is not ready) instead of being coalesced into one segment.
pub struct MockBody {
    frames: VecDeque<Bytes>,
    exact: Option<u64>,
    yield_next: bool,
}

impl MockBody {
    fn full(b: Bytes) -> MockBody {
        MockBody {
            exact: Some(b.len() as u64),
            frames: VecDeque::from([b]),
            yield_next: false,
        }
    }

    fn chunks(frames: VecDeque<Bytes>) -> MockBody {
        MockBody {
            frames,
            exact: None,
            yield_next: false,
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.exact.is_none() && this.yield_next && !this.frames.is_empty() {
            this.yield_next = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.yield_next = true;
        Poll::Ready(this.frames.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        self.exact
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal blocking HTTP/1.1 client (the load generator's)
// ---------------------------------------------------------------------------------------------

/// A request's bytes, built once and written as is for every request of a run.
pub fn raw_request(host: SocketAddr, stream: bool, extra_headers: &str) -> Vec<u8> {
    let body = request_body(stream);
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer bench-client\r\nContent-Type: application/json\r\nAccept: {}\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        if stream { "text/event-stream" } else { "application/json" },
        body.len()
    )
    .into_bytes()
}

/// What a response was, as far as the benches care.
#[derive(Debug, Clone, Copy)]
pub struct RawResponse {
    pub status: u16,
    pub body_len: usize,
    /// `Retry-After` in seconds, if present.
    pub retry_after: Option<u64>,
}

/// One keep-alive HTTP/1.1 connection with a hand-rolled response reader. Hand-rolled so the
/// generator costs a write and a couple of reads per request and nothing else: a full client
/// library on the same two cores would be measured along with the proxy.
pub struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// A generator's connection: plain, or TLS (rustls, blocking) to the TLS mock.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> io::Result<Conn> {
        Self::connect_to(addr, None)
    }

    /// A connection to `addr`, over TLS with `tls` (the handshake done here, before the first
    /// request, so no request's latency carries it).
    pub fn connect_to(
        addr: SocketAddr,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> io::Result<Conn> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        tcp.set_nodelay(true)?;
        // A response that never comes fails the request instead of hanging the bench.
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        let stream = match tls {
            None => Stream::Plain(tcp),
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let conn = rustls::ClientConnection::new(Arc::clone(cfg), name)
                    .map_err(io::Error::other)?;
                let mut s = rustls::StreamOwned::new(conn, tcp);
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock)?;
                }
                Stream::Tls(Box::new(s))
            }
        };
        Ok(Conn {
            stream,
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
        })
    }

    /// Send `req` and read the whole response (content-length or chunked).
    pub fn roundtrip(&mut self, req: &[u8]) -> io::Result<RawResponse> {
        self.stream.write_all(req)?;
        self.read_response(None)
    }

    /// As [`Conn::roundtrip`], keeping the body (for `/status`).
    pub fn roundtrip_body(&mut self, req: &[u8]) -> io::Result<(RawResponse, Vec<u8>)> {
        self.stream.write_all(req)?;
        let mut body = Vec::new();
        let r = self.read_response(Some(&mut body))?;
        Ok((r, body))
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.start > 0 && self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            ));
        }
        self.end += n;
        Ok(())
    }

    /// Position (relative to `start`) just past the next `pat`, reading more as needed.
    fn find(&mut self, pat: &[u8]) -> io::Result<usize> {
        let mut from = 0;
        loop {
            let hay = &self.buf[self.start..self.end];
            if let Some(p) = hay[from..].windows(pat.len()).position(|w| w == pat) {
                return Ok(from + p + pat.len());
            }
            from = hay.len().saturating_sub(pat.len() - 1);
            self.fill()?;
        }
    }

    fn need(&mut self, n: usize) -> io::Result<()> {
        while self.end - self.start < n {
            self.fill()?;
        }
        Ok(())
    }

    fn read_response(&mut self, mut keep: Option<&mut Vec<u8>>) -> io::Result<RawResponse> {
        let head_len = self.find(b"\r\n\r\n")?;
        let head = std::str::from_utf8(&self.buf[self.start..self.start + head_len])
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "non-UTF-8 head"))?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
        let mut content_length = None;
        let mut chunked = false;
        let mut retry_after = None;
        for line in head.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("retry-after") {
                retry_after = value.parse().ok();
            }
        }
        self.start += head_len;
        let mut body_len = 0;
        if chunked {
            loop {
                let line_len = self.find(b"\r\n")?;
                let line = &self.buf[self.start..self.start + line_len - 2];
                let hex = line.split(|&b| b == b';').next().unwrap_or(b"");
                let size = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                self.start += line_len;
                if size == 0 {
                    // Trailers (none expected), then the empty line.
                    loop {
                        let l = self.find(b"\r\n")?;
                        self.start += l;
                        if l == 2 {
                            break;
                        }
                    }
                    break;
                }
                self.need(size + 2)?;
                if let Some(k) = keep.as_deref_mut() {
                    k.extend_from_slice(&self.buf[self.start..self.start + size]);
                }
                self.start += size + 2;
                body_len += size;
            }
        } else {
            let n = content_length.unwrap_or(0);
            self.need(n)?;
            if let Some(k) = keep {
                k.extend_from_slice(&self.buf[self.start..self.start + n]);
            }
            self.start += n;
            body_len = n;
        }
        Ok(RawResponse {
            status,
            body_len,
            retry_after,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Latency samples in nanoseconds; sorted on demand. At a few thousand to a few hundred
/// thousand samples per cell, sorting a Vec is exact and cheaper than an HDR histogram
/// dependency.
#[derive(Default, Clone)]
pub struct Samples {
    v: Vec<u64>,
    sorted: bool,
}

impl Samples {
    pub fn with_capacity(n: usize) -> Samples {
        Samples {
            v: Vec::with_capacity(n),
            sorted: true,
        }
    }

    pub fn push(&mut self, d: Duration) {
        self.v.push(d.as_nanos() as u64);
        self.sorted = false;
    }

    pub fn extend(&mut self, other: Samples) {
        self.v.extend(other.v);
        self.sorted = false;
    }

    pub fn len(&self) -> usize {
        self.v.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v.is_empty()
    }

    /// The `q` quantile (0..=1), nearest rank.
    pub fn quantile(&mut self, q: f64) -> Duration {
        if self.v.is_empty() {
            return Duration::ZERO;
        }
        if !self.sorted {
            self.v.sort_unstable();
            self.sorted = true;
        }
        let rank = ((q * self.v.len() as f64).ceil() as usize).clamp(1, self.v.len());
        Duration::from_nanos(self.v[rank - 1])
    }

    pub fn mean(&self) -> Duration {
        if self.v.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.v.iter().sum::<u64>() / self.v.len() as u64)
    }

    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.v.iter().copied().max().unwrap_or(0))
    }
}

/// Jain's fairness index of `xs`: 1 when all equal, 1/n when one gets everything.
pub fn jain(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let sum: f64 = xs.iter().sum();
    let sq: f64 = xs.iter().map(|x| x * x).sum();
    if sq == 0.0 {
        1.0
    } else {
        sum * sum / (n * sq)
    }
}

/// Weighted max-min fair allocation of `budget` among clients with `demands` and `weights`
/// (water-filling): a client that asks for less than its weighted share gets what it asks, and
/// the rest is shared among the others by weight.
pub fn max_min_fair(budget: f64, demands: &[f64], weights: &[f64]) -> Vec<f64> {
    let n = demands.len();
    let mut alloc = vec![0.0; n];
    let mut active: Vec<usize> = (0..n).collect();
    let mut left = budget;
    // At most n rounds: each round either satisfies a client or shares out everything.
    for _ in 0..n {
        if active.is_empty() || left <= 0.0 {
            break;
        }
        let wsum: f64 = active.iter().map(|&i| weights[i]).sum();
        let satisfied: Vec<usize> = active
            .iter()
            .copied()
            .filter(|&i| demands[i] - alloc[i] <= left * weights[i] / wsum)
            .collect();
        if satisfied.is_empty() {
            for &i in &active {
                alloc[i] += left * weights[i] / wsum;
            }
            break;
        }
        for &i in &satisfied {
            left -= demands[i] - alloc[i];
            alloc[i] = demands[i];
        }
        active.retain(|i| !satisfied.contains(i));
    }
    alloc
}

/// Most events in any closed window `[a, a + w]`, from sorted instants. Closed, because the
/// GCRA bound `burst + rate × w` counts both ends (a burst at `a` and a token due at `a + w`).
pub fn max_in_window(times: &[Instant], w: Duration) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi] - times[lo] > w {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// Human-friendly duration for tables: µs below 10 ms, else ms or s.
pub fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 10_000.0 {
        format!("{us:.0}µs")
    } else if us < 10_000_000.0 {
        format!("{:.1}ms", us / 1000.0)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

/// Signed difference `a - b` for "added latency" columns.
pub fn fmt_delta(a: Duration, b: Duration) -> String {
    if a >= b {
        format!("+{}", fmt_dur(a - b))
    } else {
        format!("-{}", fmt_dur(b - a))
    }
}

/// Where a path lives, for messages.
pub fn show(p: &Path) -> String {
    p.display().to_string()
}

/// A chutes-proxy running in this process (the library's `bind` + `run`), for the benches that
/// measure it in-process; [`InProcess::stop`] ends it gracefully.
pub struct InProcess {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl InProcess {
    pub async fn start(config: chutes_proxy::config::Config) -> InProcess {
        let (main, admin) = chutes_proxy::bind(&config).await.expect("bind");
        let addr = main.local_addr().expect("proxy address");
        let admin_addr = admin.as_ref().and_then(|a| a.local_addr().ok());
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(chutes_proxy::run(
            config,
            main,
            admin,
            chutes_proxy::clock::WallClock::System,
            async move {
                let _ = rx.await;
            },
        ));
        InProcess {
            addr,
            admin: admin_addr,
            stop,
            task,
        }
    }

    /// Ask it to stop and wait for it, at most `within`.
    pub async fn stop(self, within: Duration) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(within, self.task).await;
    }
}

/// The TLS of the benches' TLS upstream: a CA and a leaf it signed for 127.0.0.1, both made
/// once with openssl for these benches only (`benches/support/tls`, valid until 2126; webpki
/// refuses a self-signed CA as a server's certificate). The proxy trusts the CA through
/// `upstream.tls_roots = "native"` and `SSL_CERT_FILE`, nginx through
/// `proxy_ssl_trusted_certificate`, the generator through [`tls::client`].
pub mod tls {
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    /// The CA's certificate, PEM.
    pub const CA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/support/tls/ca.pem");
    const LEAF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/support/tls/leaf.pem");
    const KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/support/tls/leaf.key");

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// The mock's side: the leaf and its key; ALPN http/1.1 alone, or h2 first with `h2`
    /// (as Chutes' edge offers it; a client that offers no ALPN, as nginx's upstream side,
    /// gets HTTP/1.1).
    pub fn server(h2: bool) -> Arc<rustls::ServerConfig> {
        let leaf = CertificateDer::from_pem_file(LEAF).expect("bench TLS leaf");
        let key = PrivateKeyDer::from_pem_file(KEY).expect("bench TLS key");
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![leaf], key)
            .expect("bench TLS certificate");
        cfg.alpn_protocols = if h2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        Arc::new(cfg)
    }

    /// A generator's side: trusts the CA alone.
    pub fn client() -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(CA).expect("bench TLS CA"))
            .expect("bench TLS CA");
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

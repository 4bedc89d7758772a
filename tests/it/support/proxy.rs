//! An in-process chutes-proxy for integration tests: built from TOML text, bound to
//! `127.0.0.1:0` for both listeners, stopped on demand (graceful) or on drop (abort).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use chutes_proxy::clock::WallClock;
use chutes_proxy::config::{Config, Overrides};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The API key tests configure; asserting it never leaks means grepping for this.
pub const TEST_KEY: &str = "cpk_test_SECRET_key_0123456789";

pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), String>>>,
}

/// Options beyond the TOML text.
pub struct Start {
    pub toml: String,
    pub env: Vec<(String, String)>,
    pub wall: WallClock,
    /// Server shards (threads) for the proxy listener: 1, the test's own runtime, by default.
    pub shards: usize,
}

impl Start {
    /// `toml` is appended after `[upstream] url = <upstream>` and `[state] path = ""` defaults,
    /// so tests only write what they care about (later keys in the same table are fine as
    /// long as they are not repeated; use `Start::raw` for full control).
    pub fn new(upstream: &str, extra: &str) -> Start {
        Start {
            toml: format!("[upstream]\nurl = \"{upstream}\"\n{}", extra),
            env: vec![("CHUTES_API_KEY".into(), TEST_KEY.into())],
            wall: WallClock::System,
            shards: 1,
        }
    }

    pub fn raw(toml: &str) -> Start {
        Start {
            toml: toml.to_string(),
            env: vec![("CHUTES_API_KEY".into(), TEST_KEY.into())],
            wall: WallClock::System,
            shards: 1,
        }
    }

    /// Serve the proxy listener on `n` shards: the test's runtime and `n - 1` threads. The
    /// other shards run on real time: not for tests on paused time.
    pub fn shards(mut self, n: usize) -> Start {
        self.shards = n;
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Start {
        self.env.retain(|(n, _)| n != k);
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn no_key(mut self) -> Start {
        self.env.retain(|(n, _)| n != "CHUTES_API_KEY");
        self
    }

    pub fn config(&self) -> Config {
        let env = self.env.clone();
        let lookup = move |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let overrides = Overrides {
            listen: Some("127.0.0.1:0".into()),
            admin_listen: Some("127.0.0.1:0".into()),
            upstream: None,
        };
        let mut text = self.toml.clone();
        if !text.contains("[state]") {
            text.push_str("\n[state]\npath = \"\"\n");
        }
        Config::from_toml(&text, &overrides, &lookup)
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n---\n{text}"))
    }

    pub async fn start(self) -> TestProxy {
        let config = self.config();
        let (main, admin) = chutes_proxy::bind(&config).await.expect("bind");
        TestProxy::start_sharded(config, None, main, admin, self.wall, self.shards).await
    }

    /// Start from a config file at `path` (written with this TOML), able to reload it.
    pub async fn start_reloadable(self, path: &std::path::Path) -> TestProxy {
        let mut text = self.toml.clone();
        if !text.contains("[state]") {
            text.push_str("\n[state]\npath = \"\"\n");
        }
        std::fs::write(path, &text).expect("write config");
        let config = self.config();
        let (main, admin) = chutes_proxy::bind(&config).await.expect("bind");
        let env = self.env.clone();
        let source = chutes_proxy::reload::Source {
            path: Some(path.to_path_buf()),
            explicit: true,
            overrides: Overrides {
                listen: Some("127.0.0.1:0".into()),
                admin_listen: Some("127.0.0.1:0".into()),
                upstream: None,
            },
            env: Box::new(move |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())),
        };
        TestProxy::start_sharded(config, Some(source), main, admin, self.wall, self.shards).await
    }
}

impl TestProxy {
    pub async fn start_on(
        config: Config,
        main: TcpListener,
        admin: Option<TcpListener>,
        wall: WallClock,
    ) -> TestProxy {
        TestProxy::start_with(config, None, main, admin, wall).await
    }

    /// As [`TestProxy::start_on`], reloadable from `source` when given.
    pub async fn start_with(
        config: Config,
        source: Option<chutes_proxy::reload::Source>,
        main: TcpListener,
        admin: Option<TcpListener>,
        wall: WallClock,
    ) -> TestProxy {
        TestProxy::start_sharded(config, source, main, admin, wall, 1).await
    }

    /// As [`TestProxy::start_with`], the proxy listener served by `shards` shards.
    pub async fn start_sharded(
        config: Config,
        source: Option<chutes_proxy::reload::Source>,
        main: TcpListener,
        admin: Option<TcpListener>,
        wall: WallClock,
        shards: usize,
    ) -> TestProxy {
        let addr = main.local_addr().unwrap();
        let admin_addr = admin.as_ref().map(|a| a.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(chutes_proxy::run_sharded(
            config,
            source,
            main,
            admin,
            wall,
            async move {
                let _ = rx.await;
            },
            shards,
        ));
        TestProxy {
            addr,
            admin: admin_addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin.expect("admin listener"), path)
    }

    /// Graceful stop: stop accepting, drain, save state; waits for it to finish.
    pub async fn stop(mut self) -> Result<(), String> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().unwrap();
        match tokio::time::timeout(Duration::from_secs(60), task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(format!("proxy task failed: {e}")),
            Err(_) => Err("proxy did not stop within 60s".into()),
        }
    }

    /// Begin a graceful stop without waiting (for drain tests); returns the task to await.
    pub fn begin_stop(mut self) -> JoinHandle<Result<(), String>> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap()
    }

    /// Begin a graceful stop while something is held in flight, and check that it is still
    /// draining: once the listener is closed (so what follows is provably sent during the
    /// drain, not before it began), the stop has not completed within 300 ms. A bounded
    /// negative check: a correct proxy can never finish then, however slow the machine.
    pub async fn begin_stop_while_held(self) -> JoinHandle<Result<(), String>> {
        let addr = self.addr;
        let mut stopping = self.begin_stop();
        super::within("the listener to close", async {
            while tokio::net::TcpStream::connect(addr).await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        let early = tokio::time::timeout(Duration::from_millis(300), &mut stopping).await;
        assert!(
            early.is_err(),
            "stopped with something in flight: {early:?}"
        );
        stopping
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A plain HTTP/1.1 client for tests.
pub type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A buffered response, for assertions.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Send a request and read the whole response (panics after 20 s via `within`).
pub async fn send(c: &TestClient, req: http::Request<Full<Bytes>>) -> Got {
    super::within("a response from the proxy", async {
        let resp = c.request(req).await.expect("request failed");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body failed").to_bytes();
        Got {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    })
    .await
}

pub async fn get(c: &TestClient, url: &str) -> Got {
    send(
        c,
        http::Request::get(url)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

pub fn req(method: &str, url: &str) -> http::request::Builder {
    http::Request::builder().method(method).uri(url)
}

/// Assert that the upstream's arrival times (`seen`) never exceed `burst + rate × w` in any
/// window `w` of `windows_ms`, with one request of slack for loopback scheduling jitter (a
/// request granted just before another can arrive just after it; any real burst overshoots by
/// far more), and that the whole run was not faster than the spacing allows.
pub fn assert_account_rate(
    seen: &[super::Recorded],
    burst: usize,
    spacing: Duration,
    windows_ms: &[u64],
) {
    let mut at: Vec<_> = seen.iter().map(|r| r.at).collect();
    at.sort();
    for (i, &t) in at.iter().enumerate() {
        for &w_ms in windows_ms {
            let w = Duration::from_millis(w_ms);
            let n = at[i..].iter().take_while(|&&x| x <= t + w).count();
            let allowed = burst + (w.as_nanos() / spacing.as_nanos()) as usize + 1;
            assert!(
                n <= allowed,
                "{n} arrivals within {w_ms}ms (allowed {allowed})"
            );
        }
    }
    if at.len() > burst + 1 {
        let span = *at.last().unwrap() - at[0];
        let min = spacing * (at.len() - burst - 1) as u32;
        assert!(
            span >= min,
            "{} requests in {span:?} (at least {min:?} expected)",
            at.len()
        );
    }
}

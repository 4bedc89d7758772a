//! The admin listener's dashboard (`GET /`) and its data (`GET /history`): the history's shape
//! and its 400s over plain HTTP, and the page itself loaded in headless Chromium against a proxy
//! that has forwarded and shed a known number of requests.
//!
//! The browser is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: fd 3
//! carries commands in, fd 4 answers out, NUL-separated JSON), so there is no port to pick and
//! no timing to guess: the test waits on conditions the page exposes (`data-updates`, element
//! ids), with generous bounds that only turn a hang into a failure. Script exceptions, console
//! errors and failed loads arrive as protocol events and fail the test, as does anything the
//! page caught itself (`data-errors`). Screenshots land in `target/` (`dashboard.png`, light,
//! 1280 wide; `dashboard-dark.png`; `dashboard-phone.png`, 390 wide) for people to look at.
//!
//! Chromium is an optional tool: missing, the browser test prints a note and returns, except
//! under CI (`CI` set), where it fails (`.ci/run` installs Debian's `chromium`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};

use crate::support::*;

/// Bound on any one wait on the browser (launch, load, a condition on the page). Loading a
/// page takes well under a second here; this only turns a hang into a failure.
const BROWSER_WAIT: Duration = Duration::from_secs(60);

const CHATBOT_TOKEN: &str = "tok-chatbot-0123456789";

/// The proxy for both tests: room for the traffic below in one burst, two clients for the
/// shares, and a long cooldown after the upstream 429 so the requests after it are shed at
/// once and the timeline shows it cooling while the page is looked at.
fn config(upstream: &str) -> Start {
    Start::new(
        upstream,
        r#"
[limits]
requests_per_minute = 60
burst = 10
requests_per_day = 500
[cooldown]
initial = "10m"
[[clients.client]]
name = "chatbot"
token_env = "CHATBOT_TOKEN"
weight = 3
[[clients.client]]
name = "batch"
"#,
    )
    .env("CHATBOT_TOKEN", CHATBOT_TOKEN)
}

/// Drive 7 forwarded requests (5 chatbot, 2 batch) and 3 shed ones (the upstream's 429,
/// rewritten, then 2 shed during the cooldown it starts), then wait until the sampler has put
/// all of it in `/history`. Returns `/status` as it then is.
async fn drive(c: &TestClient, upstream: &MockUpstream, proxy: &TestProxy) -> Value {
    for _ in 0..7 {
        upstream.push(Reply::json(200, r#"{"object":"list","data":[]}"#));
    }
    // A 429 with nginx's HTML page; the rate-limit headers are what `/status` keeps of it.
    upstream.push(
        Reply::text(
            429,
            "text/html",
            "<html><head><title>429 Too Many Requests</title></head><body><center><h1>429 Too Many Requests</h1></center><hr><center>nginx</center></body></html>",
        )
        .header("retry-after", "600")
        .header("x-ratelimit-limit-requests", "60")
        .header("x-ratelimit-remaining-requests", "0"),
    );
    let bearer = format!("Bearer {CHATBOT_TOKEN}");
    for i in 0..7 {
        let headers: &[(&str, &str)] = if i < 5 {
            &[("authorization", &bearer)]
        } else {
            &[("x-proxy-client", "batch")]
        };
        let mut r = req("GET", &proxy.url("/v1/models"));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let got = send(c, r.body(Full::new(Bytes::new())).unwrap()).await;
        assert_eq!(got.status, 200, "{}", got.text());
    }
    let got = get(c, &proxy.url("/v1/models")).await;
    assert_eq!(got.status, 429, "{}", got.text());
    assert_eq!(
        got.json()["error"]["proxy"]["reason"],
        "upstream_rate_limited"
    );
    for _ in 0..2 {
        let got = get(c, &proxy.url("/v1/models")).await;
        assert_eq!(got.json()["error"]["proxy"]["reason"], "upstream_cooldown");
    }
    assert_eq!(upstream.count(), 8, "the shed requests never reached it");
    // The sampler reads the counters once a second; wait for the second that holds the last
    // request. Polling is the only way to see it; `within` bounds the wait.
    within("the history to hold every request", async {
        loop {
            let h = get(c, &proxy.admin_url("/history?seconds=3600"))
                .await
                .json();
            let samples = h["samples"].as_array().unwrap();
            let forwarded: u64 = samples
                .iter()
                .map(|s| s["forwarded"].as_u64().unwrap())
                .sum();
            let shed: u64 = samples
                .iter()
                .flat_map(|s| s["shed"].as_object().unwrap().values())
                .map(|n| n.as_u64().unwrap())
                .sum();
            if (forwarded, shed) == (7, 3) {
                break;
            }
            assert!(forwarded <= 7 && shed <= 3, "{h}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    get(c, &proxy.admin_url("/status")).await.json()
}

#[tokio::test]
async fn history_is_per_second_deltas_and_rejects_a_bad_n() {
    let upstream = MockUpstream::start().await;
    let proxy = config(&upstream.url()).start().await;
    let c = client();
    let status = drive(&c, &upstream, &proxy).await;
    assert_eq!(status["requests"]["forwarded"], 7);

    let got = get(&c, &proxy.admin_url("/history?seconds=3600")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("application/json"));
    let h = got.json();
    assert_eq!(h["interval_seconds"], 1);
    let samples = h["samples"].as_array().unwrap();
    let mut shed = std::collections::BTreeMap::<String, u64>::new();
    let mut upstream_statuses = std::collections::BTreeMap::<String, u64>::new();
    let mut last_t = 0;
    for s in samples {
        let keys: Vec<_> = s.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "cooldown",
                "forwarded",
                "in_flight",
                "queue_depth",
                "shed",
                "t",
                "upstream"
            ],
            "{s}"
        );
        let t = s["t"].as_i64().unwrap();
        assert!(t > last_t, "timestamps increase: {h}");
        last_t = t;
        for (k, v) in s["shed"].as_object().unwrap() {
            *shed.entry(k.clone()).or_default() += v.as_u64().unwrap();
        }
        for (k, v) in s["upstream"].as_object().unwrap() {
            *upstream_statuses.entry(k.clone()).or_default() += v.as_u64().unwrap();
        }
        assert!(s["cooldown"].is_boolean());
    }
    assert_eq!(
        shed,
        [
            ("upstream_cooldown".into(), 2),
            ("upstream_rate_limited".into(), 1)
        ]
        .into(),
    );
    assert_eq!(
        upstream_statuses,
        [("200".into(), 7), ("429".into(), 1)].into()
    );
    assert_eq!(
        samples.last().unwrap()["cooldown"],
        true,
        "the account is cooling after the 429"
    );
    let one = get(&c, &proxy.admin_url("/history?seconds=1")).await.json();
    assert!(one["samples"].as_array().unwrap().len() <= 1, "{one}");

    for bad in ["0", "3601", "-5", "ten", "", "1e3"] {
        let got = get(&c, &proxy.admin_url(&format!("/history?seconds={bad}"))).await;
        assert_eq!(got.status, 400, "seconds={bad}: {}", got.text());
        assert_eq!(got.header("content-type"), Some("application/json"));
        let e = got.json();
        assert_eq!(e["error"]["param"], "seconds", "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains("3600"),
            "{e}"
        );
    }
    let got = get(&c, &proxy.admin_url("/history?minutes=5")).await;
    assert_eq!(got.status, 400);

    // The page: self-contained (the only URL in it is the SVG namespace), and served with a
    // policy that lets the browser enforce that.
    let got = get(&c, &proxy.admin_url("/")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("text/html; charset=utf-8"));
    let csp = got.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let page = got.text();
    for (i, _) in page.match_indices("://") {
        let url = &page[i.saturating_sub(5)..(i + 30).min(page.len())];
        assert!(
            url.starts_with("\"http://www.w3.org/2000/svg\""),
            "an external reference in the page: {url}"
        );
    }
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn the_dashboard_shows_what_went_through_the_proxy() {
    let Some(chromium) = find_chromium() else {
        let why = "no chromium found (set CHROMIUM or install Debian's chromium package)";
        if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
            panic!("{why}; CI must run the dashboard test");
        }
        println!("SKIPPED: dashboard browser test: {why}");
        return;
    };
    let upstream = MockUpstream::start().await;
    let proxy = config(&upstream.url()).start().await;
    let c = client();
    let status = drive(&c, &upstream, &proxy).await;
    let url = proxy.admin_url("/");
    let day_used = status["daily"]["used"].to_string();
    let shots = screenshot_dir();

    // The browser session blocks on its pipe, so it runs on a blocking thread while this
    // runtime keeps serving the proxy it talks to.
    let report = tokio::task::spawn_blocking(move || browse(&chromium, &url, &shots))
        .await
        .expect("browser task panicked")
        .unwrap_or_else(|e| panic!("{e}"));

    let light = &report.light;
    assert_eq!(light["errors"], "0", "errors the page caught: {light}");
    assert_eq!(light["total_forwarded"], "7", "{light}");
    assert_eq!(light["total_shed"], "3", "{light}");
    assert_eq!(
        light["shed_breakdown"], "upstream_cooldown 2, upstream_rate_limited 1",
        "{light}"
    );
    // The same figures again, this time summed from /history by the page.
    assert_eq!(light["window_forwarded"], "7", "{light}");
    assert_eq!(light["window_shed"], "3", "{light}");
    assert_eq!(light["window_429"], "1", "{light}");
    assert_eq!(light["chart_forwarded"], "7", "{light}");
    assert_eq!(light["day_used"], day_used, "{light}");
    assert_eq!(light["limit_rpm"], "60/min", "{light}");
    assert_eq!(light["state"], "cooldown", "{light}");
    assert_eq!(
        light["clients"],
        // A client's `forwarded` is what admission sent upstream for it: the 429'd request
        // took its share of the budget too.
        json!({"chatbot": "5", "batch": "2", "default": "1"}),
        "{light}"
    );
    assert_eq!(light["last_429s"], "1", "{light}");
    let text = light["text"].as_str().unwrap();
    for want in [
        "x-ratelimit-remaining-requests",
        "retry-after\t600",
        "429 Too Many Requests",
        "until ",
        "limit 60/min",
    ] {
        assert!(text.contains(want), "{want:?} not on the page:\n{text}");
    }
    // Per-model cooldowns come from `/status` `models`, which not every proxy reports yet.
    assert!(
        text.contains("no model cooling") || text.contains("not reported by this proxy"),
        "the models lane:\n{text}"
    );
    assert_ne!(
        report.dark_background, report.light_background,
        "prefers-color-scheme: dark changes the page"
    );
    assert!(
        report.phone_overflow_px <= 0,
        "at a phone's width the page scrolls sideways by {} px",
        report.phone_overflow_px
    );
    assert!(
        report.browser_errors.is_empty(),
        "browser console errors:\n{}",
        report.browser_errors.join("\n")
    );
    proxy.stop().await.unwrap();
}

/// What the browser session saw.
struct Report {
    /// The figures read off the page in the light theme at 1280×800.
    light: Value,
    light_background: String,
    dark_background: String,
    /// How far the page is wider than a 390 px screen (≤ 0: it fits).
    phone_overflow_px: i64,
    /// Exceptions, console errors and failed loads, as the protocol reported them.
    browser_errors: Vec<String>,
}

/// Reads the figures off the page once it has rendered the expected totals at least twice
/// (so a second refresh with incremental history ran too), or as soon as it reports an error.
const READ_PAGE: &str = r##"
new Promise((resolve) => {
  const t = (id) => { const e = document.getElementById(id); return e ? e.textContent : null; };
  const read = () => {
    const clients = {};
    for (const e of document.querySelectorAll("#clients .client")) clients[e.dataset.client] = e.dataset.forwarded;
    const svg = document.querySelector("#chart-rate svg");
    return {
      updates: Number(document.body.dataset.updates),
      errors: document.body.dataset.errors,
      error_text: t("errors"),
      state: t("state"),
      total_forwarded: t("total-forwarded"),
      total_shed: t("total-shed"),
      shed_breakdown: t("shed-breakdown"),
      window_forwarded: t("window-forwarded"),
      window_shed: t("window-shed"),
      window_429: t("window-429"),
      chart_forwarded: svg ? svg.dataset.forwarded : null,
      day_used: t("day-used"),
      limit_rpm: t("limit-rpm"),
      last_429s: document.getElementById("last-429s").dataset.count || "0",
      clients: clients,
      text: document.body.innerText,
    };
  };
  const check = () => {
    const s = read();
    if (s.errors !== "0" || (s.updates >= 2 && s.total_forwarded === "7" && s.window_shed === "3")) resolve(s);
    else setTimeout(check, 50);
  };
  check();
})
"##;

fn browse(chromium: &Path, url: &str, shots: &Path) -> Result<Report, String> {
    let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut b = Browser::launch(chromium, profile.path())?;
    let result = (|| {
        let target = b.call(None, "Target.createTarget", json!({"url": "about:blank"}))?;
        let target_id = target["targetId"]
            .as_str()
            .ok_or("no targetId")?
            .to_string();
        let attached = b.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        )?;
        let s = attached["sessionId"]
            .as_str()
            .ok_or("no sessionId")?
            .to_string();
        let s = Some(s.as_str());
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            b.call(s, domain, json!({}))?;
        }
        b.viewport(s, 1280, 800, false)?;
        let nav = b.call(s, "Page.navigate", json!({"url": url}))?;
        if let Some(e) = nav.get("errorText") {
            return Err(format!("navigating to {url}: {e}"));
        }
        b.wait_event("Page.loadEventFired")?;

        let light = b.eval(s, READ_PAGE)?;
        let background = "getComputedStyle(document.body).backgroundColor";
        let light_background = b.eval(s, background)?.to_string();
        b.screenshot(s, &shots.join("dashboard.png"))?;

        b.call(
            s,
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": "dark"}]}),
        )?;
        let dark_background = b.eval(s, background)?.to_string();
        b.screenshot(s, &shots.join("dashboard-dark.png"))?;

        b.call(
            s,
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": "light"}]}),
        )?;
        b.viewport(s, 390, 844, true)?;
        // Charts are drawn at the container's width: wait for a refresh after the resize.
        let seen = b.eval(s, "Number(document.body.dataset.updates)")?;
        b.eval(
            s,
            &format!(
                "new Promise((r) => {{ const c = () => Number(document.body.dataset.updates) > {seen} ? r(true) : setTimeout(c, 50); c(); }})"
            ),
        )?;
        let overflow = b.eval(
            s,
            "document.documentElement.scrollWidth - document.documentElement.clientWidth",
        )?;
        b.screenshot(s, &shots.join("dashboard-phone.png"))?;
        let after = b.eval(s, "document.body.dataset.errors")?;
        if after != "0" {
            return Err(format!(
                "the page caught errors: {}",
                b.eval(s, "document.getElementById('errors').textContent")?
            ));
        }
        Ok(Report {
            light,
            light_background,
            dark_background,
            phone_overflow_px: overflow.as_i64().unwrap_or(i64::MAX),
            browser_errors: Vec::new(),
        })
    })();
    let errors = std::mem::take(&mut b.errors);
    let stderr = b.close();
    match result {
        Ok(mut r) => {
            r.browser_errors = errors;
            Ok(r)
        }
        Err(e) => Err(format!(
            "{e}\nbrowser errors: {errors:#?}\nchromium stderr (tail):\n{stderr}"
        )),
    }
}

/// `target/`, where the screenshots go (found from the test's own temp dir, so a custom
/// `CARGO_TARGET_DIR` is honoured).
fn screenshot_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).to_path_buf()
}

fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |d| d.join(name)))
        .find(|p| p.is_file())
}

/// A headless Chromium and one DevTools-protocol connection to it over a pipe.
struct Browser {
    child: Child,
    commands: File,
    messages: mpsc::Receiver<Value>,
    next_id: u64,
    /// Events received while waiting for something else, for `wait_event`.
    events: Vec<Value>,
    errors: Vec<String>,
    stderr_path: PathBuf,
}

// The browser is an external process spoken to over std pipes from plain threads; its waits are
// real time on std's clock, which clippy.toml otherwise keeps out of the crate.
#[allow(clippy::disallowed_methods)]
impl Browser {
    fn launch(chromium: &Path, profile: &Path) -> Result<Browser, String> {
        let (cmd_read, cmd_write) = pipe().map_err(|e| e.to_string())?;
        let (msg_read, msg_write) = pipe().map_err(|e| e.to_string())?;
        let stderr_path = profile.join("chromium-stderr.log");
        let stderr = std::fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
        let (r, w) = (cmd_read.as_raw_fd(), msg_write.as_raw_fd());
        let mut cmd = Command::new(chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec. The pipe
        // ends are first moved above fd 10 so that placing them at 3 and 4 cannot overwrite
        // one with the other; dup2 clears close-on-exec on the copies Chromium needs.
        unsafe {
            cmd.pre_exec(move || {
                let r2 = libc::fcntl(r, libc::F_DUPFD_CLOEXEC, 10);
                let w2 = libc::fcntl(w, libc::F_DUPFD_CLOEXEC, 10);
                if r2 < 0 || w2 < 0 || libc::dup2(r2, 3) < 0 || libc::dup2(w2, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", chromium.display()))?;
        // The child holds its own copies; with ours closed, the reader sees EOF when it exits.
        drop((cmd_read, msg_write));
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut read = msg_read;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            while let Ok(n) = read.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.iter().position(|&b| b == 0) {
                    let msg: Vec<u8> = buf.drain(..=end).collect();
                    match serde_json::from_slice::<Value>(&msg[..end]) {
                        Ok(v) => {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                        Err(e) => eprintln!("unreadable DevTools message: {e}"),
                    }
                }
            }
        });
        Ok(Browser {
            child,
            commands: cmd_write,
            messages,
            next_id: 0,
            events: Vec::new(),
            errors: Vec::new(),
            stderr_path,
        })
    }

    /// Send one command (to the page's session, or the browser's with `None`) and wait for
    /// its answer, noting the events that arrive meanwhile.
    fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .map_err(|e| format!("{method}: the browser's pipe is closed: {e}"))?;
        let deadline = Instant::now() + BROWSER_WAIT;
        loop {
            let m = self.next_message(deadline, method)?;
            if m["id"] == id {
                if let Some(e) = m.get("error") {
                    return Err(format!("{method}: {e}"));
                }
                return Ok(m["result"].clone());
            }
            self.note(m);
        }
    }

    fn next_message(&mut self, deadline: Instant, what: &str) -> Result<Value, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.messages.recv_timeout(left).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => {
                format!("no answer to {what} within {BROWSER_WAIT:?}")
            }
            mpsc::RecvTimeoutError::Disconnected => format!("the browser exited during {what}"),
        })
    }

    /// Keep an event; errors of any kind the page produces are collected for the verdict.
    fn note(&mut self, m: Value) {
        let p = &m["params"];
        match m["method"].as_str().unwrap_or("") {
            "Runtime.exceptionThrown" => {
                let d = &p["exceptionDetails"];
                self.errors.push(format!(
                    "exception: {} {}",
                    d["text"], d["exception"]["description"]
                ));
            }
            "Runtime.consoleAPICalled"
                if matches!(p["type"].as_str(), Some("error" | "assert")) =>
            {
                self.errors
                    .push(format!("console.{}: {}", p["type"], p["args"]));
            }
            "Log.entryAdded" if p["entry"]["level"] == "error" => {
                self.errors.push(format!(
                    "log ({}): {} {}",
                    p["entry"]["source"], p["entry"]["text"], p["entry"]["url"]
                ));
            }
            _ => {}
        }
        self.events.push(m);
    }

    fn wait_event(&mut self, method: &str) -> Result<(), String> {
        if let Some(i) = self.events.iter().position(|e| e["method"] == method) {
            self.events.drain(..=i);
            return Ok(());
        }
        let deadline = Instant::now() + BROWSER_WAIT;
        loop {
            let m = self.next_message(deadline, method)?;
            let hit = m["method"] == method;
            self.note(m);
            if hit {
                self.events.clear();
                return Ok(());
            }
        }
    }

    /// Evaluate `expr` in the page, awaiting it if it is a promise; its value as JSON.
    fn eval(&mut self, session: Option<&str>, expr: &str) -> Result<Value, String> {
        let r = self.call(
            session,
            "Runtime.evaluate",
            json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(format!("evaluating {expr}: {e}"));
        }
        Ok(r["result"]["value"].clone())
    }

    fn viewport(
        &mut self,
        s: Option<&str>,
        width: u32,
        height: u32,
        mobile: bool,
    ) -> Result<(), String> {
        self.call(
            s,
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .map(drop)
    }

    /// A PNG of the whole page (not just the viewport) at the current width.
    fn screenshot(&mut self, s: Option<&str>, path: &Path) -> Result<(), String> {
        let size = self.eval(
            s,
            "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]",
        )?;
        let (w, h) = (
            size[0].as_f64().unwrap_or(1280.0),
            size[1].as_f64().unwrap_or(800.0),
        );
        let shot = self.call(
            s,
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true,
                   "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}}),
        )?;
        let png = base64_decode(shot["data"].as_str().ok_or("no screenshot data")?)?;
        std::fs::write(path, png).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("screenshot: {}", path.display());
        Ok(())
    }

    /// Ask the browser to quit, then make sure it has; the tail of its stderr, for failures.
    fn close(mut self) -> String {
        let _ = self.call(None, "Browser.close", json!({}));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    // Waiting for a process to exit has no event to block on here but the
                    // pipe's EOF, which the reader thread owns; a short pause between checks.
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        let log = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<_> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // On a failure path the browser must not outlive the test.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pipe as (read end, write end), both close-on-exec. (`std::io::pipe` is newer than the
/// crate's MSRV.)
fn pipe() -> std::io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two new descriptors, which the Files then own alone.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])))
    }
}

/// Standard base64 (what `Page.captureScreenshot` returns); no crate for twenty lines.
fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("not base64: {:?}", c as char)),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[test]
fn base64_decodes_what_browsers_send() {
    assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
    assert_eq!(base64_decode("iVBORw0KGgo=").unwrap(), b"\x89PNG\r\n\x1a\n");
    assert!(base64_decode("a*b").is_err());
}

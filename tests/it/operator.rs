//! What an operator meets on a first day (issue 18): probes on the service port, request ids
//! from tracing setups, one proxy per state file, `status` finding the admin listener the
//! way the proxy does, and what the binary says at startup and under `--check`.
//!
//! Tests that need the real command line spawn the built binary (`CARGO_BIN_EXE_chutes-proxy`)
//! in a temp directory with the `CHUTES_PROXY_*` variables removed, so neither the repo's
//! `config.toml` nor the developer's environment leaks in.

use std::process::Stdio;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;

use crate::support::*;

/// A temporary directory holding `proxy.toml`: the proxy on an ephemeral port, the admin
/// listener at `admin` ("" for none), `upstream`, and `rest` (more sections) after them.
fn config_dir(admin: &str, upstream: &str, rest: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("proxy.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"{admin}\"\n[upstream]\nurl = \"{upstream}\"\n{rest}"
        ),
    )
    .unwrap();
    dir
}

/// The built binary in `dir`, with a clean environment for its own variables.
fn cli(dir: &std::path::Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_chutes-proxy"));
    c.current_dir(dir)
        .env_remove("CHUTES_PROXY_CONFIG")
        .env_remove("CHUTES_PROXY_ADMIN_LISTEN")
        .env_remove("CHUTES_PROXY_LISTEN")
        .env_remove("CHUTES_PROXY_UPSTREAM")
        .env_remove("CHUTES_PROXY_LOG_FORMAT")
        .env_remove("CHUTES_API_KEY")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Run to completion: (exit code, stdout, stderr). Async so an in-process proxy on this
/// test's runtime keeps serving meanwhile.
async fn output(mut c: tokio::process::Command) -> (Option<i32>, String, String) {
    let out = within("the chutes-proxy command", c.output())
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Contract r2: the main listener answers `GET /healthz` itself, never forwarding or charging
/// it; other methods and paths are forwarded as before.
#[tokio::test]
async fn the_main_listener_answers_healthz_without_forwarding_or_charging_it() {
    let mock = MockUpstream::start().await;
    // A daily cap of one: if a probe were charged, the real request below would be shed.
    let proxy = Start::new(&mock.url(), "[limits]\nrequests_per_day = 1\n")
        .start()
        .await;
    let c = client();
    for _ in 0..5 {
        let got = get(&c, &proxy.url("/healthz")).await;
        assert_eq!((got.status, got.text().as_str()), (200, "ok\n"));
        assert!(got.header("x-proxy-request-id").is_some());
    }
    let head = send(
        &c,
        req("HEAD", &proxy.url("/healthz"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(mock.count(), 0, "a probe reached the upstream");
    let status = get(&c, &proxy.admin_url("/status")).await.json();
    assert_eq!(status["daily"]["used"], 0, "{status}");
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    proxy.stop().await.unwrap();

    // Only exactly GET/HEAD /healthz: the rest belongs to the upstream.
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "").start().await;
    for (method, path) in [
        ("POST", "/healthz"),
        ("GET", "/healthz/"),
        ("GET", "/v1/healthz"),
        ("GET", "/healthzz"),
    ] {
        let got = send(
            &c,
            req(method, &proxy.url(path))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200, "{method} {path}");
    }
    let seen: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path()))
        .collect();
    assert_eq!(
        seen,
        [
            "POST /healthz",
            "GET /healthz/",
            "GET /v1/healthz",
            "GET /healthzz"
        ]
    );
    proxy.stop().await.unwrap();
}

/// Issue 18: a client that sends the common `x-request-id` gets it back as
/// `x-proxy-request-id` (and it goes upstream and into the log line); ours wins if both come.
#[tokio::test]
async fn x_request_id_is_honoured_like_x_proxy_request_id() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "").start().await;
    let c = client();
    let with = |pairs: &[(&str, &str)]| {
        let mut r = req("GET", &proxy.url("/v1/models"));
        for (k, v) in pairs {
            r = r.header(*k, *v);
        }
        r.body(Full::new(Bytes::new())).unwrap()
    };
    let got = send(&c, with(&[("x-request-id", "trace-abc-123")])).await;
    assert_eq!(got.header("x-proxy-request-id"), Some("trace-abc-123"));
    let got = send(
        &c,
        with(&[("x-request-id", "theirs"), ("x-proxy-request-id", "ours")]),
    )
    .await;
    assert_eq!(got.header("x-proxy-request-id"), Some("ours"));
    // The rule for sane ids stays: one with a space is replaced by a generated one.
    let got = send(&c, with(&[("x-request-id", "not sane")])).await;
    let id = got.header("x-proxy-request-id").unwrap();
    assert!(id != "not sane" && !id.is_empty());
    let ups = mock.requests();
    assert_eq!(ups[0].header("x-proxy-request-id"), Some("trace-abc-123"));
    // A shed request's own response carries it too.
    let shed = send(
        &c,
        req("GET", &proxy.url("/v1/models"))
            .header("x-request-id", "trace-shed-1")
            .header("x-proxy-max-wait", "bogus")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(shed.status, 400);
    assert_eq!(shed.header("x-proxy-request-id"), Some("trace-shed-1"));
    assert_eq!(shed.json()["error"]["proxy"]["request_id"], "trace-shed-1");
    proxy.stop().await.unwrap();
}

/// Contract r2 (issue 18, item 1): two proxies on one state file each counted only their own
/// requests and together passed the daily cap. The second now refuses to start, naming the
/// holder's pid (here this test process: the lock belongs to the open file, so a second `run`
/// in the same process is refused exactly as another process would be).
#[tokio::test]
async fn a_second_proxy_on_the_same_state_file_refuses_to_start() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let toml = format!(
        "[limits]\nrequests_per_day = 300\n[state]\npath = {:?}\n",
        path.display().to_string()
    );
    let first = Start::new(&mock.url(), &toml).start().await;
    // Serving, so past its startup and holding the lock.
    assert_eq!(get(&client(), &first.url("/v1/models")).await.status, 200);
    let second = Start::new(&mock.url(), &toml).start().await;
    let err = second.stop().await.unwrap_err();
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert!(err.contains(&path.display().to_string()), "{err}");
    // The first is untouched and still counts; once it stops, the file is free again.
    assert_eq!(get(&client(), &first.url("/v1/models")).await.status, 200);
    first.stop().await.unwrap();
    let third = Start::new(&mock.url(), &toml).start().await;
    assert_eq!(get(&client(), &third.url("/v1/models")).await.status, 200);
    third.stop().await.unwrap();
}

/// Issue 18, item 9: `status --config FILE` asked the default address whatever the file said,
/// and `CHUTES_PROXY_ADMIN_LISTEN` was ignored; so the image's HEALTHCHECK failed on a moved
/// admin port.
#[tokio::test]
async fn status_asks_the_admin_address_of_the_env_or_the_config_file() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "[limits]\nrequests_per_minute = 4321\n")
        .start()
        .await;
    let admin = proxy.admin.unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    std::fs::write(&file, format!("[server]\nadmin_listen = \"{admin}\"\n")).unwrap();
    let rpm = |out: &str| -> Value {
        serde_json::from_str::<Value>(out).unwrap_or_else(|e| panic!("{e}: {out}"))["limits"]
            ["requests_per_minute"]
            .clone()
    };

    let mut c = cli(dir.path());
    c.args(["status", "--json", "--config"]).arg(&file);
    let (code, out, err) = output(c).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(rpm(&out), 4321);

    // The file through CHUTES_PROXY_CONFIG, as the image sets it.
    let mut c = cli(dir.path());
    c.args(["status", "--json"])
        .env("CHUTES_PROXY_CONFIG", &file);
    let (code, out, err) = output(c).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(rpm(&out), 4321);

    // The environment beats the file (which now points at a closed port).
    let closed = closed_port_url().await.replace("http://", "");
    std::fs::write(&file, format!("[server]\nadmin_listen = \"{closed}\"\n")).unwrap();
    let mut c = cli(dir.path());
    c.args(["status", "--json", "--config"])
        .arg(&file)
        .env("CHUTES_PROXY_ADMIN_LISTEN", &admin);
    let (code, out, err) = output(c).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(rpm(&out), 4321);

    // And --admin beats both.
    let mut c = cli(dir.path());
    c.args(["status", "--json", "--admin"])
        .arg(format!("http://{admin}"))
        .env("CHUTES_PROXY_ADMIN_LISTEN", &closed);
    let (code, out, err) = output(c).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(rpm(&out), 4321);

    // The file alone, pointing at the closed port: the error names that address.
    let mut c = cli(dir.path());
    c.args(["status", "--config"]).arg(&file);
    let (code, _, err) = output(c).await;
    assert_eq!(code, Some(1));
    assert!(err.contains(&closed), "{err}");
    proxy.stop().await.unwrap();
}

/// Issue 18, items 2, 11, 12 and 13 as the binary shows them: `--check` refuses an unwritable
/// state path and an empty key variable, warns about a client rate above the account's as a
/// comment, and prints a config that `--check` accepts back (key redacted); a TOML error
/// keeps its caret line.
#[tokio::test]
async fn check_refuses_what_cannot_work_and_prints_a_config_that_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let bad = write(
        "bad.toml",
        "[state]\npath = \"/no/such/dir/state.json\"\n[upstream]\nrequire_key = true\n",
    );
    let mut c = cli(dir.path());
    c.arg("--check").arg("--config").arg(&bad);
    let (code, out, err) = output(c).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(err.contains("\n  state.path: "), "{err}");
    assert!(err.contains("\n  upstream.require_key: "), "{err}");

    let mut c = cli(dir.path());
    c.arg("--check")
        .arg("--config")
        .arg(&bad)
        .env("CHUTES_API_KEY", "");
    let (_, _, err) = output(c).await;
    assert!(err.contains("upstream.api_key_env: "), "{err}");

    let good = write(
        "good.toml",
        "[limits]\nrequests_per_minute = 20\n[state]\npath = \"here.json\"\n\
         [[clients.client]]\nname = \"bot\"\nrequests_per_minute = 30\n",
    );
    let mut c = cli(dir.path());
    c.arg("--check")
        .arg("--config")
        .arg(&good)
        .env("CHUTES_API_KEY", TEST_KEY);
    let (code, out, err) = output(c).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("# warning: clients.client[0].requests_per_minute: 30 is above"),
        "{out}"
    );
    assert!(!out.contains(TEST_KEY) && !err.contains(TEST_KEY));
    let again = write("again.toml", &out);
    let mut c = cli(dir.path());
    c.arg("--check")
        .arg("--config")
        .arg(&again)
        .env("CHUTES_API_KEY", TEST_KEY);
    let (code, out2, err) = output(c).await;
    assert_eq!(code, Some(0), "{err}\n---\n{out}");
    let body = |s: &str| s.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(body(&out2), body(&out));

    let syntax = write("syntax.toml", "[limits]\nburst = = 2\n");
    let mut c = cli(dir.path());
    c.arg("--check").arg("--config").arg(&syntax);
    let (code, _, err) = output(c).await;
    assert_eq!(code, Some(2));
    assert!(
        err.contains("  invalid TOML at line 2, column 9: ")
            && err.contains("\n  2 | burst = = 2\n  ")
            && err.contains("|         ^"),
        "{err}"
    );
}

/// Issue 18, items 11 and 13: the startup line carries its fields as JSON fields, with the
/// state path made absolute, and running without a key says so in a WARN line.
#[tokio::test]
async fn startup_fields_are_json_fields_and_a_missing_key_is_warned_about() {
    let mock = MockUpstream::start().await;
    let dir = config_dir(
        "",
        &mock.url(),
        "[limits]\nrequests_per_minute = 77\n[state]\npath = \"rel-state.json\"\n",
    );
    let mut c = cli(dir.path());
    c.args(["--config", "proxy.toml", "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = within("the startup lines", async {
        use tokio::io::AsyncBufReadExt as _;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut got = Vec::new();
        // The startup line, then the WARN that follows it.
        while let Some(l) = lines.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let warn = v["level"] == "WARN";
            got.push(v);
            if warn {
                break;
            }
        }
        got
    })
    .await;
    let _ = child.kill().await;
    let start = lines
        .iter()
        .find(|v| v["listen"].is_string())
        .unwrap_or_else(|| panic!("no startup line in {lines:?}"));
    assert_eq!(start["requests_per_minute"], 77, "{start}");
    assert_eq!(start["admin"], "disabled", "{start}");
    assert_eq!(start["key"], "client's own (none configured)", "{start}");
    // The file itself need not exist yet (nothing was reserved): compare its directory.
    let logged = std::path::PathBuf::from(start["state"].as_str().unwrap());
    assert!(logged.is_absolute(), "{start}");
    assert_eq!(logged.file_name().unwrap(), "rel-state.json");
    assert_eq!(
        logged.parent().unwrap().canonicalize().unwrap(),
        dir.path().canonicalize().unwrap(),
        "{start}"
    );
    let warn = lines.last().unwrap();
    assert_eq!(warn["level"], "WARN");
    assert!(
        warn["message"]
            .as_str()
            .unwrap()
            .contains("no upstream API key"),
        "{warn}"
    );
}

/// Three shards drain the proxy listener at a stop, but the stop is said once for it (by the
/// shard that accepts), and once for the admin listener.
#[tokio::test]
async fn the_stop_is_said_once_per_listener_however_many_shards() {
    let mock = MockUpstream::start().await;
    let dir = config_dir("127.0.0.1:0", &mock.url(), "[state]\npath = \"\"\n");
    let mut c = cli(dir.path());
    c.args(["--config", "proxy.toml", "--log-format", "json"])
        .env("CHUTES_API_KEY", TEST_KEY)
        .env("RUST_LOG", "info")
        .env("TOKIO_WORKER_THREADS", "3")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.as_std_mut().spawn().expect("start chutes-proxy");
    let (startup, stderr) = wait_for_startup(&mut child).await;
    // The proxy resolved TOKIO_WORKER_THREADS=3 to three shards: with one, the test below
    // would pass whatever each shard said.
    let started: serde_json::Value = serde_json::from_str(&startup).expect("a JSON startup line");
    assert_eq!(started["shards"], 3, "{startup}");
    let (exit, rest) = terminate(child, stderr).await;
    assert!(exit.success(), "exit {exit:?}; stderr:\n{rest}");
    let said: Vec<serde_json::Value> = rest
        .lines()
        .filter(|l| l.contains("stopped accepting; draining connections"))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let mut listeners: Vec<&str> = said
        .iter()
        .map(|l| l["listener"].as_str().unwrap_or("?"))
        .collect();
    listeners.sort_unstable();
    assert_eq!(listeners, ["admin", "proxy"], "{rest}");
}

/// Issue 15: the binary writes its request line itself (log::RequestLines), not through
/// tracing's formatter. Each format's line must carry the request's fields, and a filter that
/// turns the request target off must still turn it off.
#[tokio::test]
async fn the_binary_writes_one_request_line_per_request_in_either_format() {
    let mock = MockUpstream::start().await;
    let dir = config_dir("", &mock.url(), "[state]\npath = \"\"\n");
    for (format, filter) in [
        ("json", "info"),
        ("text", "info"),
        ("text", "info,chutes_proxy::request=off"),
    ] {
        let mut c = cli(dir.path());
        c.args(["--config", "proxy.toml", "--log-format", format])
            .env("CHUTES_API_KEY", TEST_KEY)
            .env("RUST_LOG", filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c.as_std_mut().spawn().expect("start chutes-proxy");
        let (startup, stderr) = wait_for_startup(&mut child).await;
        let base = address_after(&startup, "listening on ").expect("proxy address");
        for path in ["/v1/chat/completions?k=secret", "/v1/models"] {
            let req = http::Request::post(format!("{base}{path}"))
                .header("content-type", "application/json")
                .header("x-request-id", "line-check-1")
                .body(Full::new(Bytes::from_static(
                    br#"{"model":"unsloth/gemma-3-4b-it","messages":[]}"#,
                )))
                .unwrap();
            assert_eq!(send(&client(), req).await.status, 200, "{format} {path}");
        }
        // SIGTERM: the proxy writes out every buffered line before it exits.
        let (exit, rest) = terminate(child, stderr).await;
        assert!(exit.success(), "exit {exit:?}; stderr:\n{rest}");
        let lines: Vec<&str> = rest
            .lines()
            .filter(|l| l.contains("line-check-1"))
            .collect();
        if filter.contains("=off") {
            assert!(lines.is_empty(), "{lines:?}");
            assert!(rest.contains("stopped"), "{rest}");
            continue;
        }
        assert_eq!(lines.len(), 2, "{rest}");
        let line = lines[0];
        assert!(!line.contains("secret"), "{line}");
        if format == "json" {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(v["level"], "INFO", "{line}");
            assert_eq!(v["message"], "request", "{line}");
            assert_eq!(v["request_id"], "line-check-1", "{line}");
            assert_eq!(v["model"], "unsloth/gemma-3-4b-it", "{line}");
            assert_eq!(v["method"], "POST", "{line}");
            assert_eq!(v["path"], "/v1/chat/completions", "{line}");
            assert_eq!(v["status"], 200, "{line}");
            assert_eq!(v["upstream_status"], 200, "{line}");
            assert_eq!(v["outcome"], "forwarded", "{line}");
            assert!(v["total_ms"].is_number(), "{line}");
            assert!(v["bytes_in"].as_u64().unwrap() > 0, "{line}");
            assert!(v["bytes_out"].as_u64().unwrap() > 0, "{line}");
        } else {
            for field in [
                "Z  INFO request request_id=line-check-1 client=",
                " model=\"unsloth/gemma-3-4b-it\" ",
                " method=POST path=/v1/chat/completions status=200 upstream_status=200 ",
                " outcome=\"forwarded\" ",
                " total_ms=",
                " stream_error_events=false",
            ] {
                assert!(line.contains(field), "{field} not in {line}");
            }
        }
    }
}

//! Client attribution through the proxy: tokens as API keys, `x-proxy-client`, `require_token`,
//! and the guarantee that a client token never reaches the upstream.

use bytes::Bytes;
use http_body_util::Full;

use crate::support::*;

const CLIENTS: &str = r#"
[clients]
require_token = false
[[clients.client]]
name = "chatbot"
token_env = "CHATBOT_TOKEN"
weight = 3
[[clients.client]]
name = "batch"
requests_per_minute = 60
burst = 1
"#;

fn start(mock: &MockUpstream, extra: &str) -> Start {
    Start::new(&mock.url(), &format!("{CLIENTS}{extra}")).env("CHATBOT_TOKEN", "tok-chatbot-123")
}

fn client_stat<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("client {name} missing in {status}"))
}

#[tokio::test]
async fn tokens_attribute_and_never_reach_the_upstream() {
    let mock = MockUpstream::start().await;
    let proxy = start(&mock, "").start().await;
    let c = client();
    for h in [
        ("authorization", "Bearer tok-chatbot-123"),
        ("x-api-key", "tok-chatbot-123"),
    ] {
        let got = send(
            &c,
            req("GET", &proxy.url("/v1/models"))
                .header(h.0, h.1)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200);
    }
    let named = send(
        &c,
        req("GET", &proxy.url("/v1/models"))
            .header("x-proxy-client", "batch")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(named.status, 200);
    assert_eq!(get(&c, &proxy.url("/v1/models")).await.status, 200);
    for r in mock.wait_for_requests(4).await {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {TEST_KEY}").as_str())
        );
        assert!(r.header("x-api-key").is_none());
        assert!(r.header("x-proxy-client").is_none());
        for (_, v) in r.headers.iter() {
            assert!(
                !v.as_bytes().windows(9).any(|w| w == b"tok-chatb"),
                "token leaked upstream"
            );
        }
    }
    let status = get(&c, &proxy.admin_url("/status")).await.json();
    assert_eq!(client_stat(&status, "chatbot")["forwarded"], 2);
    assert_eq!(client_stat(&status, "batch")["forwarded"], 1);
    assert_eq!(client_stat(&status, "default")["forwarded"], 1);
    let metrics = get(&c, &proxy.admin_url("/metrics")).await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("chutes_proxy_requests_total")
                && l.contains("client=\"chatbot\"")
                && l.contains("outcome=\"forwarded\"")
                && l.ends_with(" 2")),
        "{metrics}"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_token_is_stripped_even_without_an_account_key() {
    let mock = MockUpstream::start().await;
    let proxy = start(&mock, "").no_key().start().await;
    let c = client();
    let got = send(
        &c,
        req("GET", &proxy.url("/v1/models"))
            .header("authorization", "Bearer tok-chatbot-123")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    let r = &mock.wait_for_requests(1).await[0];
    assert!(r.header("authorization").is_none());
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn require_token_refuses_unknown_callers() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(
        &mock.url(),
        // Every client needs a token under require_token (the config refuses one without).
        &CLIENTS
            .replace("require_token = false", "require_token = true")
            .replace(
                "name = \"batch\"\n",
                "name = \"batch\"\ntoken_env = \"BATCH_TOKEN\"\n",
            ),
    )
    .env("CHATBOT_TOKEN", "tok-chatbot-123")
    .env("BATCH_TOKEN", "tok-batch-456")
    .start()
    .await;
    let c = client();
    for h in [
        ("authorization", "Bearer wrong"),
        ("x-proxy-client", "batch"),
    ] {
        let got = send(
            &c,
            req("GET", &proxy.url("/v1/models"))
                .header(h.0, h.1)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 401);
        let v = got.json();
        assert_eq!(v["error"]["proxy"]["reason"], "unauthorized_client");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(!got.text().contains("tok-chatbot"));
    }
    let ok = send(
        &c,
        req("GET", &proxy.url("/v1/models"))
            .header("authorization", "Bearer tok-chatbot-123")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(mock.count(), 1);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_clients_own_cap_sheds_with_its_name() {
    let mock = MockUpstream::start().await;
    let proxy = start(&mock, "").start().await;
    let c = client();
    let batch = || {
        req("GET", &proxy.url("/v1/x"))
            .header("x-proxy-client", "batch")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(send(&c, batch()).await.status, 200);
    // batch's own rate (one a second) cannot be met within half a second: shed at once.
    let mut short = batch();
    short
        .headers_mut()
        .insert("x-proxy-max-wait", "500ms".parse().unwrap());
    let got = send(&c, short).await;
    assert_eq!(got.status, 429);
    let v = got.json();
    assert_eq!(v["error"]["proxy"]["reason"], "client_rate_limited");
    assert_eq!(v["error"]["proxy"]["client"], "batch");
    assert!(got.header("retry-after").is_some());
    // With the default wait limit its own rate is waited for, like the account's.
    assert_eq!(send(&c, batch()).await.status, 200);
    assert_eq!(mock.count(), 2);
    // Other clients are not affected by batch's cap.
    assert_eq!(get(&c, &proxy.url("/v1/x")).await.status, 200);
    proxy.stop().await.unwrap();
}

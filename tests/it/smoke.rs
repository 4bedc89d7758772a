//! The shortest path through the proxy: one request forwarded with the key injected.

use crate::support::*;

#[tokio::test]
async fn forwards_with_the_key_and_a_request_id() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(&mock.url(), "").start().await;
    let c = client();
    let got = get(&c, &proxy.url("/v1/models")).await;
    assert_eq!(got.status, 200);
    assert!(got.header("x-proxy-request-id").is_some());
    let seen = mock.wait_for_requests(1).await;
    assert_eq!(seen[0].path(), "/v1/models");
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {TEST_KEY}").as_str())
    );
    proxy.stop().await.unwrap();
}

//! The proxy listener served by several shards (threads with a runtime each, as the binary
//! runs it): shard 0 accepts and hands each connection to the shard with the fewest open,
//! which serves it on its own, and every shard spends the same account-wide budget.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::support::*;

const NO_LIMITS: &str = "\n[limits]\nrequests_per_minute = 600000\nburst = 10000\n";

/// One request on a kept-alive connection: its status and whether the answer was whole.
async fn exchange(conn: &mut tokio::net::TcpStream, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!("GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n");
    within("an answer", async {
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "connection closed: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            let Some(end) = text.find("\r\n\r\n") else {
                continue;
            };
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("a content-length");
            if got.len() >= end + 4 + length {
                return text[9..12].parse().unwrap();
            }
        }
    })
    .await
}

/// A connection goes to the shard with the fewest open: the first to shard 0, the second,
/// while the first is open, to shard 1, which then serves it on its own: with shard 0 (the
/// test's runtime) not running at all, it still answers.
#[test]
fn a_second_connection_is_served_by_another_shard_on_its_own() {
    // The mock on a runtime of its own thread, so it keeps answering while this one is held.
    let upstream_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mock = upstream_rt.block_on(MockUpstream::start());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (proxy, _first, second) = rt.block_on(async {
        let proxy = Start::new(&mock.url(), NO_LIMITS).shards(2).start().await;
        let mut first = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(exchange(&mut first, "/v1/models").await, 200);
        let mut second = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(exchange(&mut second, "/v1/models").await, 200);
        (proxy, first, second.into_std().unwrap())
    });
    // Outside `block_on`, nothing on shard 0 runs: no accept, no request task, no timer. The
    // client's side of the second connection moves to the other runtime.
    let second = upstream_rt.block_on(async move {
        let mut second = tokio::net::TcpStream::from_std(second).unwrap();
        second.set_nodelay(true).unwrap();
        let status =
            tokio::time::timeout(Duration::from_secs(30), exchange(&mut second, "/v1/models"))
                .await
                .expect("no answer within 30 s: the connection is not served by another shard");
        assert_eq!(status, 200);
        second
    });
    assert_eq!(mock.count(), 3);
    drop(second);
    rt.block_on(proxy.stop()).unwrap();
}

/// Requests served by different shards spend one budget: with 3 tokens and no refill, the
/// first connection (shard 0) and the second (shard 1, see above) take turns, and the fourth
/// request is shed whichever shard serves it. (A budget per shard would let it through.)
#[tokio::test]
async fn every_shard_spends_one_budget() {
    let mock = MockUpstream::start().await;
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 1\nburst = 3\n[queue]\nmax_depth = 0\n",
    )
    .shards(2)
    .start()
    .await;
    let mut on_0 = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(exchange(&mut on_0, "/v1/x").await, 200);
    let mut on_1 = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(exchange(&mut on_1, "/v1/x").await, 200);
    assert_eq!(exchange(&mut on_0, "/v1/x").await, 200);
    assert_eq!(exchange(&mut on_1, "/v1/x").await, 429);
    assert_eq!(exchange(&mut on_0, "/v1/x").await, 429);
    assert_eq!(mock.count(), 3);
    proxy.stop().await.unwrap();
}

/// A graceful stop drains the streams of every shard before it returns.
#[tokio::test]
async fn a_stop_drains_every_shards_streams() {
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    mock.set_default(
        Reply::status(200)
            .sse([
                (Duration::ZERO, sse_data(r#"{"n":1}"#)),
                (Duration::ZERO, sse_data("[DONE]")),
            ])
            .hold_chunk(1, gate.clone()),
    );
    let proxy = Start::new(&mock.url(), NO_LIMITS).shards(2).start().await;
    let mut bodies = Vec::new();
    for _ in 0..8 {
        let resp = within(
            "an SSE head",
            client().request(
                req("POST", &proxy.url("/v1/chat/completions"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            ),
        )
        .await
        .expect("request");
        assert_eq!(resp.status(), 200);
        bodies.push(resp.into_body());
    }
    let stopping = proxy.begin_stop_while_held().await;
    gate.open();
    for body in bodies {
        let rest = within("the rest of a stream", body.collect())
            .await
            .expect("a stream was cut during the drain")
            .to_bytes();
        assert!(String::from_utf8_lossy(&rest).contains("data: [DONE]"));
    }
    let stopped = within("the proxy to stop", stopping).await;
    assert_eq!(stopped.expect("proxy task"), Ok(()));
}

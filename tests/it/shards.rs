//! The proxy listener served by several shards (threads with a runtime each, as the binary
//! runs it): each shard accepts and serves on its own, and every shard spends the same
//! account-wide budget.

use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::support::*;

const NO_LIMITS: &str = "\n[limits]\nrequests_per_minute = 600000\nburst = 10000\n";

/// With shard 0 (the test's runtime) not running at all, a request is still answered: another
/// shard accepted it and served it from its own thread, upstream exchange included.
#[test]
fn a_second_shard_answers_while_the_first_is_stopped() {
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
    let proxy = rt.block_on(async {
        let proxy = Start::new(&mock.url(), NO_LIMITS).shards(2).start().await;
        // Serving, so the other shard's thread has been started.
        assert_eq!(get(&client(), &proxy.url("/v1/models")).await.status, 200);
        proxy
    });
    // Outside `block_on`, nothing on shard 0 runs: no accept, no request task, no timer.
    let mut conn = std::net::TcpStream::connect(proxy.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .expect("no answer within 30 s: only the stopped shard 0 serves");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(mock.count(), 2);
    rt.block_on(proxy.stop()).unwrap();
}

/// A burst over the budget, on connections spread over two shards, is admitted exactly as
/// far as the budget allows: the bucket is the account's, not a shard's.
#[tokio::test]
async fn every_shard_spends_one_budget() {
    let mock = MockUpstream::start().await;
    // No refill within the test (one a minute), nothing queued: 5 pass, the rest are shed.
    let proxy = Start::new(
        &mock.url(),
        "[limits]\nrequests_per_minute = 1\nburst = 5\n[queue]\nmax_depth = 0\n",
    )
    .shards(2)
    .start()
    .await;
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..24 {
        let url = proxy.url("/v1/x");
        // A client each: a connection each, accepted by whichever shard wakes first.
        all.spawn(async move { get(&client(), &url).await.status });
    }
    let mut statuses = Vec::new();
    while let Some(s) = all.join_next().await {
        statuses.push(s.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        19,
        "{statuses:?}"
    );
    assert_eq!(mock.count(), 5);
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
    let stopping = proxy.begin_stop();
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

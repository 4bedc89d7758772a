//! Shared helpers for the integration tests. `mock` is the in-process upstream (and the raw-TCP
//! misbehaving ones) that the proxy is pointed at; `chutes` is an emulator of Chutes itself
//! (also included by `benches/chutes.rs`); everything is re-exported here so tests write
//! `support::MockUpstream`.
//!
//! Not every test module uses every helper, hence the `allow`s: an unused helper is not a bug.
#![allow(dead_code)]

pub mod binary;
pub mod chutes;
pub mod mock;
pub mod proxy;
pub mod redis;

// Re-exports a given test binary does not use would otherwise warn.
#[allow(unused_imports)]
pub use self::redis::{redis_available, RedisServer};
#[allow(unused_imports)]
pub use binary::{address_after, collect_stderr, terminate, wait_for_startup};
#[allow(unused_imports)]
pub use mock::{
    closed_port_url, raw_upstream, read_request_head, sse_data, within, Gate, MockUpstream,
    RawUpstream, Recorded, Reply, WAIT_LIMIT,
};
#[allow(unused_imports)]
pub use proxy::{
    assert_account_rate, client, get, req, send, Got, Start, TestClient, TestProxy, TEST_KEY,
};

//! Several proxies, one account: three replicas sharing one budget through a real Redis. The
//! upstream must see the account's limits for the whole fleet, a 429 seen by one replica must
//! stop them all, and Redis failures must give the configured behaviour and recovery.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use chutes_proxy::clients::DEFAULT_CLIENT;

use crate::support::*;

fn fleet_cfg(redis: &RedisServer, prefix: &str, extra: &str) -> String {
    format!(
        "{extra}\n[shared_state]\nbackend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\n",
        redis.url()
    )
}

fn no_wait(url: &str) -> http::Request<Full<Bytes>> {
    req("GET", url)
        .header("x-proxy-max-wait", "0")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn three_replicas_never_exceed_the_account_rate() {
    if !redis_available("three_replicas_never_exceed_the_account_rate") {
        return;
    }
    let redis = RedisServer::start();
    let mock = MockUpstream::start().await;
    let cfg = fleet_cfg(
        &redis,
        "rate:",
        "[limits]\nrequests_per_minute = 240\nburst = 3\n[queue]\nmax_wait = \"60s\"\n",
    );
    let mut proxies = Vec::new();
    for _ in 0..3 {
        proxies.push(Start::new(&mock.url(), &cfg).start().await);
    }
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let c = c.clone();
        let url = proxies[i % 3].url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..2 {
                if get(&c, &url).await.status == 200 {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(ok, 24);
    let seen = mock.wait_for_requests(24).await;
    // 250 ms spacing keeps scheduling jitter on a loaded machine well below one interval.
    assert_account_rate(&seen, 3, Duration::from_millis(250), &[0, 250, 1000, 3000]);
    for p in proxies {
        p.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_429_seen_by_one_replica_stops_every_replica() {
    if !redis_available("a_429_seen_by_one_replica_stops_every_replica") {
        return;
    }
    let redis = RedisServer::start();
    let mock = MockUpstream::start().await;
    mock.push(
        Reply::text(429, "text/html", "<html>429 Too Many Requests</html>")
            .header("retry-after", "120"),
    );
    let cfg = fleet_cfg(
        &redis,
        "cool:",
        "[limits]\nrequests_per_minute = 6000\nburst = 10\n",
    );
    let a = Start::new(&mock.url(), &cfg).start().await;
    let b = Start::new(&mock.url(), &cfg).start().await;
    let cc = Start::new(&mock.url(), &cfg).start().await;
    let c = client();
    let got = get(&c, &a.url("/v1/x")).await;
    assert_eq!(got.status, 429);
    assert_eq!(
        got.json()["error"]["proxy"]["reason"],
        "upstream_rate_limited"
    );
    // The other replicas refuse at once, with the fleet's cooldown as Retry-After.
    for p in [&b, &cc, &a] {
        let got = send(&c, no_wait(&p.url("/v1/x"))).await;
        assert_eq!(got.status, 429, "{}", got.text());
        assert_eq!(got.json()["error"]["proxy"]["reason"], "upstream_cooldown");
        let retry: u64 = got.header("retry-after").unwrap().parse().unwrap();
        assert!((100..=121).contains(&retry), "retry-after {retry}");
    }
    assert_eq!(mock.count(), 1, "nothing went upstream during the cooldown");
    // A replica started now learns of the cooldown from Redis too.
    let d = Start::new(&mock.url(), &cfg).start().await;
    let got = send(&c, no_wait(&d.url("/v1/x"))).await;
    assert_eq!(got.json()["error"]["proxy"]["reason"], "upstream_cooldown");
    assert_eq!(mock.count(), 1);
    for p in [a, b, cc, d] {
        p.stop().await.unwrap();
    }
}

#[tokio::test]
async fn after_a_fleet_cooldown_exactly_one_replica_probes() {
    if !redis_available("after_a_fleet_cooldown_exactly_one_replica_probes") {
        return;
    }
    let redis = RedisServer::start();
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    mock.push(Reply::status(429).header("retry-after", "1"));
    mock.set_default(Reply::json(200, "{\"ok\":true}").gated(gate.clone()));
    let cfg = fleet_cfg(
        &redis,
        "probe:",
        "[limits]\nrequests_per_minute = 6000\nburst = 10\n[queue]\nmax_wait = \"30s\"\n",
    );
    let mut proxies = Vec::new();
    for _ in 0..3 {
        proxies.push(Start::new(&mock.url(), &cfg).start().await);
    }
    let c = client();
    assert_eq!(get(&c, &proxies[0].url("/v1/x")).await.status, 429);
    // Two waiters on each replica outlast the 1 s cooldown.
    let mut waiters = Vec::new();
    for p in &proxies {
        for _ in 0..2 {
            let c = c.clone();
            let url = p.url("/v1/x");
            waiters.push(tokio::spawn(async move { get(&c, &url).await.status }));
        }
    }
    // The probe arrives after the cooldown and is held by the gate.
    mock.wait_for_requests(2).await;
    // Negative check: while the probe is unanswered nobody else may go. A bounded window is
    // the only way to observe an absence.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(mock.count(), 2, "only one probe for the whole fleet");
    gate.open();
    for w in waiters {
        assert_eq!(w.await.unwrap(), 200);
    }
    assert_eq!(mock.count(), 7);
    for p in proxies {
        p.stop().await.unwrap();
    }
}

#[tokio::test]
async fn redis_down_fails_closed_and_recovers() {
    if !redis_available("redis_down_fails_closed_and_recovers") {
        return;
    }
    let mut redis = RedisServer::start();
    let mock = MockUpstream::start().await;
    let cfg = fleet_cfg(
        &redis,
        "down:",
        "[limits]\nrequests_per_minute = 6000\nburst = 10\n",
    );
    let p = Start::new(&mock.url(), &cfg).start().await;
    let c = client();
    assert_eq!(get(&c, &p.url("/v1/x")).await.status, 200);
    redis.kill();
    let got = get(&c, &p.url("/v1/x")).await;
    assert_eq!(got.status, 503, "{}", got.text());
    assert_eq!(
        got.json()["error"]["proxy"]["reason"],
        "shared_state_unavailable"
    );
    assert_eq!(got.json()["error"]["code"], "shared_state_unavailable");
    assert!(got.header("retry-after").is_some());
    assert_eq!(mock.count(), 1);
    redis.restart();
    // Recovery needs no restart of the proxy: poll (bounded) until requests flow again.
    let mut recovered = false;
    for _ in 0..100 {
        if get(&c, &p.url("/v1/x")).await.status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the proxy did not recover when Redis came back");
    p.stop().await.unwrap();
}

#[tokio::test]
async fn redis_down_falls_back_to_a_local_share() {
    if !redis_available("redis_down_falls_back_to_a_local_share") {
        return;
    }
    let mut redis = RedisServer::start();
    let mock = MockUpstream::start().await;
    let cfg = fleet_cfg(
        &redis,
        "fallback:",
        "[limits]\nrequests_per_minute = 6000\nburst = 10\n",
    ) + "on_redis_error = \"local\"\nlocal_fallback_share = 0.5\n";
    let p = Start::new(&mock.url(), &cfg).start().await;
    let c = client();
    redis.kill();
    for _ in 0..3 {
        assert_eq!(get(&c, &p.url("/v1/x")).await.status, 200);
    }
    assert_eq!(mock.count(), 3);
    p.stop().await.unwrap();
}

#[tokio::test]
async fn a_dead_replica_loses_no_daily_count() {
    if !redis_available("a_dead_replica_loses_no_daily_count") {
        return;
    }
    let redis = RedisServer::start();
    let mock = MockUpstream::start().await;
    let cfg = fleet_cfg(
        &redis,
        "daily:",
        "[limits]\nrequests_per_minute = 6000\nburst = 10\nrequests_per_day = 5\n",
    );
    let c = client();
    let a = Start::new(&mock.url(), &cfg).start().await;
    for _ in 0..3 {
        assert_eq!(get(&c, &a.url("/v1/x")).await.status, 200);
    }
    drop(a); // aborted, no graceful stop: as good as kill -9 for the fleet's count
    let b = Start::new(&mock.url(), &cfg).start().await;
    for _ in 0..2 {
        assert_eq!(get(&c, &b.url("/v1/x")).await.status, 200);
    }
    let got = get(&c, &b.url("/v1/x")).await;
    assert_eq!(
        got.json()["error"]["proxy"]["reason"],
        "daily_quota_exhausted"
    );
    assert_eq!(mock.count(), 5);
    b.stop().await.unwrap();
}

#[tokio::test]
async fn the_fleet_runs_on_a_redis_cluster_with_every_key_in_one_slot() {
    if !redis_available("the_fleet_runs_on_a_redis_cluster_with_every_key_in_one_slot") {
        return;
    }
    // A one-node cluster refuses a script that touches keys of two slots (CROSSSLOT, or
    // "Script attempted to access keys that do not hash to the same slot"), as a real one does.
    let redis = RedisServer::start_cluster();
    let mock = MockUpstream::start().await;
    let cfg = fleet_cfg(
        &redis,
        "acct:",
        "[limits]\nrequests_per_minute = 6000\nburst = 10\nrequests_per_day = 3\n",
    );
    let a = Start::new(&mock.url(), &cfg).start().await;
    let b = Start::new(&mock.url(), &cfg).start().await;
    let c = client();
    // The take script (bucket, day count, gates, probe) and the status read (MGET).
    for p in [&a, &b, &a] {
        let got = get(&c, &p.url("/v1/x")).await;
        assert_eq!(got.status, 200, "{}", got.text());
    }
    let got = send(&c, no_wait(&b.url("/v1/x"))).await;
    assert_eq!(got.status, 429, "{}", got.text());
    assert_eq!(
        got.json()["error"]["proxy"]["reason"],
        "daily_quota_exhausted"
    );
    let status = get(&c, &a.admin_url("/status")).await.json();
    assert_eq!(status["fleet"]["reachable"], true, "{status}");
    assert_eq!(status["fleet"]["used_today"], 3, "{status}");
    assert_eq!(mock.count(), 3);
    a.stop().await.unwrap();
    b.stop().await.unwrap();

    // The cooldown script and its announcement, with a fresh account on the same cluster.
    mock.push(Reply::status(429).header("retry-after", "120"));
    let cfg = fleet_cfg(
        &redis,
        "acct2:",
        "[limits]\nrequests_per_minute = 6000\nburst = 10\n",
    );
    let a = Start::new(&mock.url(), &cfg).start().await;
    let b = Start::new(&mock.url(), &cfg).start().await;
    assert_eq!(get(&c, &a.url("/v1/x")).await.status, 429);
    let got = send(&c, no_wait(&b.url("/v1/x"))).await;
    assert_eq!(got.json()["error"]["proxy"]["reason"], "upstream_cooldown");
    assert_eq!(mock.count(), 4);

    // Every key of one account sits in one slot, named by the hash tag.
    let keys: Vec<String> = redis.query(::redis::cmd("KEYS").arg("*"));
    assert!(!keys.is_empty());
    for (tag, prefix) in [("{acct:}", "acct:"), ("{acct2:}", "acct2:")] {
        let mine: Vec<&String> = keys.iter().filter(|k| k.contains(prefix)).collect();
        assert!(mine.len() >= 2, "{keys:?}");
        let slots: std::collections::BTreeSet<i64> = mine
            .iter()
            .map(|k| {
                assert!(k.starts_with(tag), "{k} is not under {tag}");
                redis.query(::redis::cmd("CLUSTER").arg("KEYSLOT").arg(k.as_str()))
            })
            .collect();
        assert_eq!(slots.len(), 1, "{mine:?} span slots {slots:?}");
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A fleet budget built through the admission API, for tests that must hold a permit
/// without sending its request (no HTTP path grants a permit and then never sends it
/// deterministically).
fn fleet_admission(
    redis: &RedisServer,
    prefix: &str,
    extra: &str,
    wall: chutes_proxy::clock::WallClock,
    tune: impl FnOnce(&mut chutes_proxy::admission::fleet::FleetSettings),
) -> (
    chutes_proxy::admission::Admission,
    std::sync::Arc<chutes_proxy::admission::fleet::Fleet>,
) {
    use chutes_proxy::admission::{fleet, Admission, Settings};
    let config = Start::new("http://127.0.0.1:9", &fleet_cfg(redis, prefix, extra)).config();
    let mut settings = fleet::FleetSettings {
        redis_url: redis.url(),
        key_prefix: prefix.to_string(),
        on_error: fleet::OnError::FailClosed,
        local_fallback_share: 0.5,
        probe_ttl: Duration::from_secs(10),
        global_concurrency: false,
        lease_ttl: Duration::from_secs(10),
    };
    tune(&mut settings);
    let f = std::sync::Arc::new(fleet::Fleet::new(settings).unwrap());
    let a = Admission::with_fleet(
        Settings::from_config(&config),
        wall,
        Default::default(),
        None,
        Some(f.clone()),
    );
    (a, f)
}

/// This account's day counts in Redis, by day index.
fn day_counts(redis: &RedisServer, prefix: &str) -> std::collections::BTreeMap<i64, i64> {
    let tag = format!("{{{prefix}}}day:");
    let keys: Vec<String> = redis.query(::redis::cmd("KEYS").arg(format!("{tag}*")));
    keys.iter()
        .map(|k| {
            let v: i64 = redis.query(::redis::cmd("GET").arg(k.as_str()));
            (k[tag.len()..].parse().unwrap(), v)
        })
        .collect()
}

/// Poll (bounded) until `cond` holds on this account's day counts.
async fn until_counts(
    redis: &RedisServer,
    prefix: &str,
    what: &str,
    cond: impl Fn(&std::collections::BTreeMap<i64, i64>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let counts = day_counts(redis, prefix);
        if cond(&counts) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: Redis holds {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_permit_never_sent_gives_its_count_back_in_redis_to_the_day_that_counted_it() {
    if !redis_available("a_permit_never_sent_gives_its_count_back_in_redis") {
        return;
    }
    use chutes_proxy::clock::WallClock;
    let redis = RedisServer::start();
    let limits = "[limits]\nrequests_per_minute = 6000\nburst = 10\nrequests_per_day = 100\n";

    // Granted and dropped unsent on the same day: Redis's count goes back to 0.
    let (a, _f) = fleet_admission(&redis, "refund:", limits, WallClock::System, |_| {});
    let p = a
        .acquire(DEFAULT_CLIENT, Duration::from_secs(5))
        .await
        .unwrap();
    let sent = a
        .acquire(DEFAULT_CLIENT, Duration::from_secs(5))
        .await
        .unwrap();
    until_counts(&redis, "refund:", "two takes", |c| {
        c.values().sum::<i64>() == 2
    })
    .await;
    drop(p);
    until_counts(&redis, "refund:", "one refund", |c| {
        c.values().sum::<i64>() == 1
    })
    .await;
    let mut sent = sent;
    sent.mark_sent();
    drop(sent);
    drop(a);

    // This replica's own day ends (its wall clock is pinned 1 s before a midnight) while it
    // holds a permit; Redis's day, which counted it, has not. The give-back must still go to
    // the day Redis counted, not be skipped or sent to another day.
    let midnight = chutes_proxy::units::day_end(20_000, 0) as f64;
    let wall = WallClock::pinned(midnight - 1.0);
    let (a, f) = fleet_admission(&redis, "midnight:", limits, wall, |_| {});
    let p = a
        .acquire(DEFAULT_CLIENT, Duration::from_secs(5))
        .await
        .unwrap();
    until_counts(&redis, "midnight:", "the take", |c| {
        c.values().sum::<i64>() == 1
    })
    .await;
    let counted_day = *day_counts(&redis, "midnight:").keys().next().unwrap();
    // Poll (bounded) until this replica's clock has passed its midnight.
    within("the pinned clock passing midnight", async {
        while wall.now_unix() <= midnight + 0.1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = a.snapshot(); // rolls this replica's day
    assert_ne!(a.day_index(), 20_000);
    drop(p);
    until_counts(&redis, "midnight:", "the refund", |c| {
        c.get(&counted_day) == Some(&0) && c.len() == 1
    })
    .await;

    // The Lua refund never takes a count below 0, nor creates a missing day.
    f.refund(Duration::from_millis(10), counted_day)
        .await
        .unwrap();
    f.refund(Duration::from_millis(10), counted_day - 1)
        .await
        .unwrap();
    let counts = day_counts(&redis, "midnight:");
    assert_eq!(counts.get(&counted_day), Some(&0), "{counts:?}");
    assert_eq!(counts.len(), 1, "{counts:?}");
}

#[tokio::test]
async fn with_redis_frozen_the_local_fallback_serves_without_a_redis_timeout_per_request() {
    if !redis_available("with_redis_frozen_the_local_fallback_serves") {
        return;
    }
    let redis = RedisServer::start();
    let mock = MockUpstream::start().await;
    let cfg = fleet_cfg(
        &redis,
        "frozen:",
        "[limits]\nrequests_per_minute = 6000\nburst = 10\n",
    ) + "on_redis_error = \"local\"\nlocal_fallback_share = 0.5\n";
    let p = Start::new(&mock.url(), &cfg).start().await;
    let c = client();
    assert_eq!(get(&c, &p.url("/v1/x")).await.status, 200);
    // Frozen, not killed: a refused connection fails at once, a silent one costs the whole
    // CALL_TIMEOUT, which is what each request used to pay.
    redis.freeze();
    const N: u32 = 20;
    let call_timeout = chutes_proxy::admission::fleet::CALL_TIMEOUT;
    let trips = |s: &serde_json::Value| s["fleet"]["redis_round_trips"].as_u64().unwrap();
    let before = trips(&get(&c, &p.admin_url("/status")).await.json());
    let started = tokio::time::Instant::now();
    for _ in 0..N {
        let got = get(&c, &p.url("/v1/x")).await;
        assert_eq!(got.status, 200, "{}", got.text());
    }
    let elapsed = started.elapsed();
    let after = trips(&get(&c, &p.admin_url("/status")).await.json());
    assert_eq!(mock.count(), 1 + N as usize);
    // By count: the first request finds Redis gone (one call), the background check asks
    // about once a second, and each /status read asks once; nowhere near one per request.
    let asked = after - before - 1;
    assert!(
        asked < u64::from(N) / 2,
        "{asked} Redis calls for {N} requests"
    );
    // By time, with a generous bound: paying the timeout per request takes N × 500 ms.
    assert!(
        elapsed < call_timeout * N / 2,
        "{N} requests took {elapsed:?} with Redis frozen"
    );
    // Redis back: the background check notices without any request paying for it.
    redis.thaw();
    within("the proxy noticing Redis is back", async {
        loop {
            let s = get(&c, &p.admin_url("/status")).await.json();
            if s["fleet"]["healthy"] == true {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(get(&c, &p.url("/v1/x")).await.status, 200);
    p.stop().await.unwrap();
}

/// Leases of this account in Redis (expired ones included until a take prunes them).
fn leases(redis: &RedisServer, prefix: &str) -> usize {
    redis.query(::redis::cmd("ZCARD").arg(format!("{{{prefix}}}leases")))
}

#[tokio::test]
async fn global_concurrency_holds_max_concurrent_across_two_replicas() {
    if !redis_available("global_concurrency_holds_max_concurrent_across_two_replicas") {
        return;
    }
    let redis = RedisServer::start();
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    mock.set_default(Reply::json(200, "{\"ok\":true}").gated(gate.clone()));
    let cfg = fleet_cfg(
        &redis,
        "conc:",
        "[limits]\nrequests_per_minute = 6000\nburst = 10\nmax_concurrent = 2\n[queue]\nmax_wait = \"60s\"\n",
    ) + "global_concurrency = true\n";
    let a = Start::new(&mock.url(), &cfg).start().await;
    let b = Start::new(&mock.url(), &cfg).start().await;
    let c = client();
    // Three requests on each replica: each replica alone would let two through.
    let mut tasks = Vec::new();
    for p in [&a, &b, &a, &b, &a, &b] {
        let c = c.clone();
        let url = p.url("/v1/x");
        tasks.push(tokio::spawn(async move { get(&c, &url).await.status }));
    }
    mock.wait_for_requests(2).await;
    // Negative check: while both are held nobody else may go. A bounded window is the only
    // way to observe an absence (replicas retry every 250 ms, so 1.5 s is several tries).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        mock.count(),
        2,
        "more than max_concurrent in flight fleet-wide"
    );
    assert_eq!(leases(&redis, "conc:"), 2);
    gate.open();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(mock.count(), 6);
    // Every permit gave its lease back.
    within("the leases being released", async {
        while leases(&redis, "conc:") != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn a_dead_replicas_lease_expires_and_frees_its_slot() {
    if !redis_available("a_dead_replicas_lease_expires_and_frees_its_slot") {
        return;
    }
    let redis = RedisServer::start();
    let mock = MockUpstream::start().await;
    let cfg = fleet_cfg(
        &redis,
        "dead:",
        "[limits]\nrequests_per_minute = 6000\nburst = 10\nmax_concurrent = 1\n[queue]\nmax_wait = \"30s\"\n",
    ) + "global_concurrency = true\n";
    let p = Start::new(&mock.url(), &cfg).start().await;
    let c = client();
    // A replica that died with a request in flight left its lease, renewed for the last time
    // just now: it holds the only slot for 2 more seconds (Redis clock), then expires.
    let (secs, micros): (String, String) = redis.query(&mut ::redis::cmd("TIME"));
    let now_us: i64 = secs.parse::<i64>().unwrap() * 1_000_000 + micros.parse::<i64>().unwrap();
    let expires_us = now_us + 2_000_000;
    let _: i64 = redis.query(
        ::redis::cmd("ZADD")
            .arg("{dead:}leases")
            .arg(expires_us)
            .arg("dead-replica-lease"),
    );
    let got = get(&c, &p.url("/v1/x")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    // Served only once the stale lease had expired (a lower bound, safe on a slow machine).
    let (secs, micros): (String, String) = redis.query(&mut ::redis::cmd("TIME"));
    let after_us = secs.parse::<i64>().unwrap() * 1_000_000 + micros.parse::<i64>().unwrap();
    assert!(
        after_us >= expires_us,
        "granted while the dead replica's lease was live"
    );
    assert_eq!(mock.count(), 1);
    within("the lease being released", async {
        while leases(&redis, "dead:") != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    p.stop().await.unwrap();
}

#[tokio::test]
async fn a_lease_held_longer_than_its_ttl_is_renewed_until_its_permit_drops() {
    if !redis_available("a_lease_held_longer_than_its_ttl_is_renewed") {
        return;
    }
    use chutes_proxy::clock::WallClock;
    let redis = RedisServer::start();
    let limits = "[limits]\nrequests_per_minute = 6000\nburst = 10\nmax_concurrent = 1\n";
    let ttl = Duration::from_millis(600);
    let (a, _f) = fleet_admission(&redis, "renew:", limits, WallClock::System, |s| {
        s.global_concurrency = true;
        s.lease_ttl = ttl;
    });
    let mut p = a
        .acquire(DEFAULT_CLIENT, Duration::from_secs(5))
        .await
        .unwrap();
    p.mark_sent();
    let score =
        || -> Option<i64> { redis.query(::redis::cmd("ZSCORE").arg("{renew:}leases").arg("1")) };
    let first = score().expect("the grant took lease 1");
    // A long stream: its lease must be pushed out past the first expiry (polled, bounded).
    within("the lease being renewed", async {
        while score().is_none_or(|s| s <= first) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(p);
    within("the lease being released", async {
        while leases(&redis, "renew:") != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_redis_that_restarts_empty_mid_day_is_reseeded_and_the_day_never_passes_its_cap() {
    if !redis_available("a_redis_that_restarts_empty_mid_day_is_reseeded") {
        return;
    }
    let mut redis = RedisServer::start();
    let mock = MockUpstream::start().await;
    let cfg = fleet_cfg(
        &redis,
        "reseed:",
        "[limits]\nrequests_per_minute = 6000\nburst = 10\nrequests_per_day = 6\n[queue]\nmax_wait = \"2s\"\n",
    );
    let a = Start::new(&mock.url(), &cfg).start().await;
    let b = Start::new(&mock.url(), &cfg).start().await;
    let c = client();
    // Each load task sends until its replica says the day is spent; Redis answers with
    // errors (503) while it restarts, which the task treats as "try again".
    let load = |urls: Vec<String>, rounds: usize| {
        let c = c.clone();
        let mut tasks = Vec::new();
        for url in urls {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..rounds {
                    let got = get(&c, &url).await;
                    match got.status {
                        200 => ok += 1,
                        503 => tokio::time::sleep(Duration::from_millis(50)).await,
                        429 if got.json()["error"]["proxy"]["reason"]
                            == "daily_quota_exhausted" =>
                        {
                            break
                        }
                        other => panic!("{other}: {}", got.text()),
                    }
                }
                ok
            }));
        }
        tasks
    };
    // Concurrent load on both replicas, one request per task: 4 of the day's 6.
    let urls = vec![
        a.url("/v1/x"),
        b.url("/v1/x"),
        a.url("/v1/x"),
        b.url("/v1/x"),
    ];
    let mut served = 0;
    for t in load(urls.clone(), 1) {
        served += t.await.unwrap();
    }
    assert_eq!(served, 4);
    assert_eq!(mock.count(), 4);
    // Redis loses everything (no persistence) and comes back on the same port.
    redis.restart();
    // Load again until both replicas refuse; bounded rounds, each answered or retried.
    let mut after = 0;
    for t in load(urls, 400) {
        after += t.await.unwrap();
    }
    assert!(
        mock.count() <= 6,
        "the upstream got {} requests in a day capped at 6",
        mock.count()
    );
    assert!(after >= 1, "nothing was served after the restart");
    let counts = day_counts(&redis, "reseed:");
    assert!(
        counts.values().all(|&n| n >= 6),
        "Redis was not re-seeded to the day's count: {counts:?}"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn the_days_count_under_the_old_key_names_is_carried_over() {
    if !redis_available("the_days_count_under_the_old_key_names_is_carried_over") {
        return;
    }
    let redis = RedisServer::start();
    let mock = MockUpstream::start().await;
    // A fleet of the previous build spent 5 of today's 6 under `legacy:day:<today>`.
    let now = chutes_proxy::clock::unix_now() as i64;
    let today = chutes_proxy::units::day_index(now, 0);
    let _: String = redis.query(
        ::redis::cmd("SET")
            .arg(format!("legacy:day:{today}"))
            .arg(5),
    );
    let cfg = fleet_cfg(
        &redis,
        "legacy:",
        "[limits]\nrequests_per_minute = 6000\nburst = 10\nrequests_per_day = 6\n",
    );
    let p = Start::new(&mock.url(), &cfg).start().await;
    let c = client();
    assert_eq!(get(&c, &p.url("/v1/x")).await.status, 200);
    let got = send(&c, no_wait(&p.url("/v1/x"))).await;
    assert_eq!(
        got.json()["error"]["proxy"]["reason"],
        "daily_quota_exhausted"
    );
    assert_eq!(mock.count(), 1);
    p.stop().await.unwrap();
}

/// A capacity 429 seen by one replica cools that model on the others too: they refuse a
/// request for it that cannot wait (`model_cooldown`) without asking the upstream, and still
/// serve other models.
#[tokio::test]
async fn a_model_cooldown_reaches_every_replica() {
    if !redis_available("a_model_cooldown_reaches_every_replica") {
        return;
    }
    let redis = RedisServer::start();
    let mock = MockUpstream::start().await;
    mock.push(Reply::json(
        429,
        r#"{"detail":"Infrastructure is at maximum capacity, try again later"}"#,
    ));
    let cfg = fleet_cfg(
        &redis,
        "modelcool:",
        "[limits]\nrequests_per_minute = 600000\nburst = 10000\n[cooldown]\nmodel_initial = \"30s\"\nmodel_max = \"1m\"\n[retry]\nmax_attempts = 0\n",
    );
    let a = Start::new(&mock.url(), &cfg).start().await;
    let b = Start::new(&mock.url(), &cfg).start().await;
    let c = client();
    let chat = |p: &TestProxy, model: &str, wait: &str| {
        req("POST", &p.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("x-proxy-max-wait", wait)
            .body(Full::new(Bytes::from(format!(r#"{{"model":"{model}"}}"#))))
            .unwrap()
    };
    let got = send(&c, chat(&a, "big", "1s")).await;
    assert_eq!(got.json()["error"]["proxy"]["reason"], "upstream_capacity");
    // Replica b hears of it (pub/sub); wait for its /status to show the model cooling.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = get(&c, &b.admin_url("/status")).await.json();
        if s["models"].as_array().is_some_and(|m| {
            m.iter()
                .any(|m| m["model"] == "big" && m["cooling"] == true)
        }) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica b never heard of the model cooldown: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = send(&c, chat(&b, "big", "1s")).await;
    assert_eq!(got.json()["error"]["proxy"]["reason"], "model_cooldown");
    assert_eq!(send(&c, chat(&b, "small", "1s")).await.status, 200);
    assert_eq!(mock.count(), 2, "the cooling model was not asked again");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

//! The fleet backend: several chutes-proxy replicas spending one account through one Redis.
//!
//! What lives in Redis (every key named `{<key_prefix>}<name>` by [`Fleet::key`], the one place
//! that builds key names; the braces are a Redis Cluster hash tag, so every key and the
//! events channel of one account hash to one slot and the multi-key scripts run on Redis
//! Cluster and Valkey as well as on a single server):
//! - `tat`: the GCRA theoretical arrival time (µs, Redis clock) of the account bucket;
//! - `day:<index>`: requests granted in that quota day;
//! - `gen`: when this Redis's data began (µs), written by the first script to find it missing:
//!   a Redis that restarted empty has a new `gen`, which is how a replica knows to re-seed
//!   the day's count from what it last saw (see "Re-seeding" below);
//! - `cooldown`: until when (µs) the account is paused after an upstream 429, with `level`;
//! - `gate`: until when (µs) an upstream 402 quota message closed the daily gate;
//! - `probe_needed` / `probe`: after a cooldown, the one fleet-wide probe and its holder;
//! - `leases` (with `shared_state.global_concurrency`): a sorted set of the requests in flight
//!   fleet-wide, member = lease id (from `lease_seq`), score = expiry (µs, Redis clock). The
//!   take prunes expired leases and grants only below `limits.max_concurrent`; the holder
//!   renews its lease every third of `lease_ttl` while in flight and removes it when its
//!   permit drops, so a replica that dies leaves leases that expire by themselves.
//!
//! The bucket, the daily count, both gates and the probe are taken in one Lua script using
//! Redis `TIME`, so replicas' clocks do not matter and a refused request consumes nothing.
//! Timestamps stay integers formatted with `%d` (Lua's `tostring` would print 1.79e+15).
//! Each script declares its account's `tat` key in `KEYS` (so a cluster-aware client or proxy
//! routes it to the slot's node) and builds the other names from the tagged base in `ARGV[1]`.
//! Changes to the gates are also published on `{<prefix>}events`, so every replica closes its
//! own gate (and sheds its own waiters) at once instead of finding out on its next attempt;
//! the script is what guarantees correctness, pub/sub only makes it prompt.
//!
//! Re-seeding: a Redis that restarts empty mid-day must not reset the day. Every grant
//! publishes the fleet-wide count (`used <day> <n>`), so each replica knows the largest count
//! it has seen ([`Fleet::saw`]). The take (and a reseed run on every pub/sub reconnect)
//! passes that figure with the `gen` it was seen under; when `gen` differs, the script raises
//! the day's count to at least that figure. Every live replica does this once per Redis
//! restart, so the largest figure wins. What can be lost is only a grant whose announcement
//! and reply were both still unsent when Redis died (its replica then never granted it).
//! A replica started under the old key names (`<prefix>day:<index>`, before the hash tag)
//! has its figure read once at the first take, so an upgrade carries the day's count over.
//!
//! Each replica keeps its own queue, deadlines and fairness (`admission/mod.rs`); it asks
//! Redis once per admission attempt and, when told to wait, sleeps for exactly the wait Redis
//! computed. Every call has a timeout; `ConnectionManager` reconnects by itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

/// Every Redis call is bounded by this; a slow Redis is treated like an absent one.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a replica waits before asking again while another replica's probe is out.
pub const PROBE_POLL: Duration = Duration::from_millis(250);
/// After losing the pub/sub connection, wait this long before reconnecting.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_secs(1);

/// What a replica does when Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Shed with `shared_state_unavailable` (503) until Redis is back.
    FailClosed,
    /// Fall back to a local budget of `local_fallback_share` × the limits.
    Local,
}

#[derive(Debug, Clone)]
pub struct FleetSettings {
    pub redis_url: String,
    pub key_prefix: String,
    pub on_error: OnError,
    pub local_fallback_share: f64,
    /// How long the fleet-wide probe may stay out before another replica may probe
    /// (the holder may have died): the upstream's first-byte timeout plus a margin.
    pub probe_ttl: Duration,
    /// `shared_state.global_concurrency`: `limits.max_concurrent` counts the whole fleet.
    pub global_concurrency: bool,
    /// How long a lease lives without renewal: what a dead replica's request holds its slot
    /// for. The upstream's first-byte timeout plus a margin, so that a Redis hiccup that
    /// delays renewals does not free the slot of a request still waiting for its answer.
    pub lease_ttl: Duration,
}

/// The answer to one admission attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Take {
    Granted {
        probe: bool,
        used_today: u64,
        /// The quota day (Redis's clock) that counted this grant: a give-back goes there.
        day: i64,
        /// With global concurrency: the lease taken for it, to renew and release.
        lease: Option<String>,
    },
    /// The bucket is empty: the next token is this far away.
    Wait(Duration),
    Cooldown {
        until_unix: f64,
        level: u32,
    },
    DailyClosed {
        until_unix: f64,
    },
    /// Another replica's probe is out.
    ProbeBusy,
    /// Global concurrency: `max_concurrent` leases are out across the fleet.
    ConcurrencyBusy,
}

/// What Redis counted for one grant, kept in the permit so that a give-back undoes exactly
/// that, and nothing for a grant Redis never counted (the local fallback's).
#[derive(Debug)]
pub struct Ticket {
    /// The quota day (Redis's clock) whose count this grant raised.
    pub day: i64,
    /// Global concurrency: the fleet-wide slot, released when the permit drops.
    pub lease: Option<Lease>,
}

/// What a replica last saw of the fleet-wide day count, and under which Redis `gen`.
#[derive(Debug, Clone, Default)]
struct Seen {
    gen: String,
    day: i64,
    used: u64,
    /// `limits.day_reset_utc` as seconds, from the last take (the reseed needs it).
    offset: u32,
}

/// One fleet-wide concurrency slot, held by a permit. Dropping it stops the renewal and
/// removes the lease from Redis (in the background: `Drop` cannot wait); if that fails, the
/// lease expires after `lease_ttl`.
pub struct Lease {
    id: String,
    fleet: Arc<Fleet>,
    renew: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("id", &self.id).finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
        self.fleet.release_lease(std::mem::take(&mut self.id));
    }
}

/// Fleet-wide figures for `/status`.
#[derive(Debug, Clone, Default)]
pub struct FleetStatus {
    pub reachable: bool,
    pub used_today: Option<u64>,
    pub cooldown_until_unix: Option<f64>,
    pub level: u32,
    pub gate_until_unix: Option<f64>,
    pub probe_needed: bool,
    pub last_error: Option<String>,
}

/// Shared by `TAKE` and `RESEED`: find (or start) this Redis's `gen`; if the caller last saw
/// the day's count under another `gen` (Redis restarted empty since), raise the count to at
/// least what the caller saw. Returns the current `gen`.
macro_rules! reseed_fn {
    () => {
        r#"
local function reseed(p, now, dkey, day, seen_gen, seen_day, seen_used)
  local gen = redis.call('GET', p .. 'gen')
  if not gen then
    gen = string.format('%d', now)
    redis.call('SET', p .. 'gen', gen)
  end
  if seen_gen ~= gen and seen_day == day and seen_used > tonumber(redis.call('GET', dkey) or '0') then
    redis.call('SET', dkey, string.format('%d', seen_used), 'EX', 2 * 86400 + 3600)
  end
  return gen
end
"#
    };
}

const TAKE: &str = concat!(
    reseed_fn!(),
    r#"
local p = ARGV[1]
local T = tonumber(ARGV[2])
local tau = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local offset = tonumber(ARGV[5])
local t = redis.call('TIME')
local secs = tonumber(t[1])
local now = secs * 1000000 + tonumber(t[2])
local cd = tonumber(redis.call('GET', p .. 'cooldown') or '0')
if cd > now then
  return {2, string.format('%d', cd), redis.call('GET', p .. 'level') or '0'}
end
local gate = tonumber(redis.call('GET', p .. 'gate') or '0')
if gate > now then
  return {3, string.format('%d', gate), '0'}
end
local day = math.floor((secs - offset) / 86400)
local dkey = p .. 'day:' .. string.format('%d', day)
local gen = reseed(p, now, dkey, day, ARGV[9], tonumber(ARGV[10]), tonumber(ARGV[11]))
local used = tonumber(redis.call('GET', dkey) or '0')
if cap > 0 and used >= cap then
  return {4, string.format('%d', ((day + 1) * 86400 + offset) * 1000000), '0'}
end
local tat = tonumber(redis.call('GET', p .. 'tat') or '0')
if tat < now then tat = now end
if now < tat - tau then
  return {1, string.format('%d', tat - tau - now), '0'}
end
local conc = tonumber(ARGV[7])
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', p .. 'leases', '-inf', string.format('%d', now))
  if redis.call('ZCARD', p .. 'leases') >= conc then
    return {6, '0', '0'}
  end
end
local probe = 0
if redis.call('EXISTS', p .. 'probe_needed') == 1 then
  if redis.call('SET', p .. 'probe', '1', 'NX', 'PX', ARGV[6]) then
    probe = 1
  else
    return {5, '0', '0'}
  end
end
local next = tat + T
redis.call('SET', p .. 'tat', string.format('%d', next), 'PX', math.floor((next - now) / 1000) + 1000)
used = redis.call('INCR', dkey)
redis.call('EXPIRE', dkey, 2 * 86400 + 3600)
redis.call('PUBLISH', p .. 'events', 'used ' .. string.format('%d', day) .. ' ' .. string.format('%d', used))
local lease = ''
if conc > 0 then
  lease = string.format('%d', redis.call('INCR', p .. 'lease_seq'))
  redis.call('ZADD', p .. 'leases', string.format('%d', now + tonumber(ARGV[8]) * 1000), lease)
end
return {0, string.format('%d', used), string.format('%d', probe), string.format('%d', day), lease, gen}
"#
);

/// The reseed alone, run when a replica (re)subscribes: after a Redis restart every live
/// replica contributes its figure within a pub/sub reconnect, busy or not.
const RESEED: &str = concat!(
    reseed_fn!(),
    r#"
local p = ARGV[1]
local t = redis.call('TIME')
local secs = tonumber(t[1])
local now = secs * 1000000 + tonumber(t[2])
local day = math.floor((secs - tonumber(ARGV[2])) / 86400)
local dkey = p .. 'day:' .. string.format('%d', day)
return reseed(p, now, dkey, day, ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
"#
);

/// Give back a token and a daily count taken for a request that was never sent. The count
/// goes back to the day that took it (`ARGV[3]`, as the take returned it), not to the day
/// it is now: a permit that outlived midnight must not lower the new day. Never below 0,
/// and a missing key (Redis restarted since) stays missing rather than becoming -1.
const REFUND: &str = r#"
local p = ARGV[1]
local T = tonumber(ARGV[2])
local dkey = p .. 'day:' .. ARGV[3]
if tonumber(redis.call('GET', dkey) or '0') > 0 then redis.call('DECR', dkey) end
local tat = tonumber(redis.call('GET', p .. 'tat') or '0')
if tat > 0 then redis.call('SET', p .. 'tat', string.format('%d', tat - T), 'KEEPTTL') end
return 1
"#;

/// Push a lease's expiry out by its TTL (re-adding it if Redis lost it: it is in flight).
const RENEW: &str = r#"
local p = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZADD', p .. 'leases', string.format('%d', now + tonumber(ARGV[3]) * 1000), ARGV[2])
return 1
"#;

/// A permit ended: its slot is free for the fleet; waiting replicas hear it at once.
const RELEASE: &str = r#"
local p = ARGV[1]
if redis.call('ZREM', p .. 'leases', ARGV[2]) == 1 then
  redis.call('PUBLISH', p .. 'events', 'lease_released')
end
return 1
"#;

const COOLDOWN: &str = r#"
local p = ARGV[1]
local dur_ms = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local untl = now + dur_ms * 1000
local cur = tonumber(redis.call('GET', p .. 'cooldown') or '0')
if untl > cur then
  redis.call('SET', p .. 'cooldown', string.format('%d', untl), 'PX', dur_ms)
else
  untl = cur
end
local level = tonumber(ARGV[3])
local old = tonumber(redis.call('GET', p .. 'level') or '0')
if old > level then level = old end
redis.call('SET', p .. 'level', string.format('%d', level), 'PX', dur_ms + tonumber(ARGV[4]))
redis.call('SET', p .. 'probe_needed', '1')
redis.call('DEL', p .. 'probe')
redis.call('PUBLISH', p .. 'events', 'cooldown ' .. string.format('%d', untl) .. ' ' .. string.format('%d', level))
return string.format('%d', untl)
"#;

const GATE: &str = r#"
local p = ARGV[1]
local untl = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if untl > now then
  redis.call('SET', p .. 'gate', string.format('%d', untl), 'PX', math.floor((untl - now) / 1000) + 1)
  redis.call('PUBLISH', p .. 'events', 'gate ' .. string.format('%d', untl))
end
return 1
"#;

const PROBE_DONE: &str = r#"
local p = ARGV[1]
if ARGV[2] == '1' then
  redis.call('DEL', p .. 'probe_needed', p .. 'probe')
  redis.call('PUBLISH', p .. 'events', 'open')
else
  redis.call('DEL', p .. 'probe')
  redis.call('PUBLISH', p .. 'events', 'probe_released')
end
return 1
"#;

/// `{<key_prefix>}`: the hash tag that puts every key of one account in one Redis Cluster
/// slot. Cluster hashes what lies between the first `{` and the next `}`; a prefix with a `}`
/// of its own would end the tag early (still one slot per account, but a prefix starting with
/// `}` would make an empty tag, which Cluster ignores), so such a prefix is refused.
pub fn key_base(prefix: &str) -> Result<String, String> {
    if prefix.is_empty() || prefix.contains('}') {
        return Err(format!(
            "shared_state.key_prefix {prefix:?}: must be non-empty and contain no '}}' \
             (it becomes the Redis Cluster hash tag {{<prefix>}})"
        ));
    }
    Ok(format!("{{{prefix}}}"))
}

/// A change another replica announced.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Cooldown {
        until_unix: f64,
        level: u32,
    },
    Gate {
        until_unix: f64,
    },
    Open,
    ProbeReleased,
    /// A fleet-wide concurrency slot was freed.
    LeaseReleased,
    /// A grant raised day `day`'s fleet-wide count to `used`.
    Used {
        day: i64,
        used: u64,
    },
    /// A replica saw a capacity 429 for `model`: it cools until then, at this level.
    Model {
        until_unix: f64,
        level: u32,
        model: String,
    },
}

pub fn parse_event(msg: &str) -> Option<Event> {
    let mut it = msg.split_ascii_whitespace();
    let us = |v: Option<&str>| {
        v.and_then(|v| v.parse::<i64>().ok())
            .map(|u| u as f64 / 1e6)
    };
    match it.next()? {
        "cooldown" => Some(Event::Cooldown {
            until_unix: us(it.next())?,
            level: it.next().and_then(|l| l.parse().ok()).unwrap_or(1),
        }),
        "gate" => Some(Event::Gate {
            until_unix: us(it.next())?,
        }),
        "open" => Some(Event::Open),
        "probe_released" => Some(Event::ProbeReleased),
        "lease_released" => Some(Event::LeaseReleased),
        "used" => Some(Event::Used {
            day: it.next()?.parse().ok()?,
            used: it.next()?.parse().ok()?,
        }),
        "model" => {
            let until_unix = us(it.next())?;
            let level = it.next()?.parse().ok()?;
            // The name is the rest (model names come from clients: bounded, may hold spaces).
            let model = it.collect::<Vec<_>>().join(" ");
            (!model.is_empty() && model.len() <= crate::model::MAX_MODEL_LEN).then_some(
                Event::Model {
                    until_unix,
                    level,
                    model,
                },
            )
        }
        _ => None,
    }
}

pub struct Fleet {
    pub settings: FleetSettings,
    /// `{<key_prefix>}`: what every key and the channel of this account start with.
    base: String,
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    take: Script,
    refund: Script,
    cooldown: Script,
    gate: Script,
    probe_done: Script,
    renew: Script,
    release: Script,
    reseed: Script,
    /// The largest fleet-wide count this replica has seen, for re-seeding a Redis that lost it.
    seen: Mutex<Seen>,
    /// The figure under the old key names has been read (once, at the first take).
    legacy_read: AtomicBool,
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Redis round trips, for `/status` and the benchmarks.
    pub round_trips: AtomicU64,
}

impl Fleet {
    pub fn new(settings: FleetSettings) -> Result<Fleet, String> {
        let client = redis::Client::open(settings.redis_url.as_str())
            .map_err(|e| format!("shared_state.redis_url: {e}"))?;
        let base = key_base(&settings.key_prefix)?;
        Ok(Fleet {
            settings,
            base,
            client,
            conn: tokio::sync::Mutex::new(None),
            take: Script::new(TAKE),
            refund: Script::new(REFUND),
            cooldown: Script::new(COOLDOWN),
            gate: Script::new(GATE),
            probe_done: Script::new(PROBE_DONE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            reseed: Script::new(RESEED),
            seen: Mutex::new(Seen::default()),
            legacy_read: AtomicBool::new(false),
            // Optimistic until the first call says otherwise.
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
            round_trips: AtomicU64::new(0),
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// The name of one of this account's keys (or its channel). The Lua scripts build the
    /// same names from `ARGV[1]`, which is always [`Fleet::base`].
    pub fn key(&self, k: &str) -> String {
        format!("{}{k}", self.base)
    }

    /// `{<key_prefix>}`, the hash-tagged start of every name of this account.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn connection(&self) -> Result<ConnectionManager, String> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(1);
        let c = tokio::time::timeout(
            CALL_TIMEOUT * 2,
            ConnectionManager::new_with_config(self.client.clone(), cfg),
        )
        .await
        .map_err(|_| "connecting to Redis timed out".to_string())?
        .map_err(|e| format!("cannot connect to Redis: {e}"))?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Run a call with the timeout, and keep the health flag and last error up to date.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, String>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = match self.connection().await {
            Ok(c) => match tokio::time::timeout(CALL_TIMEOUT, f(c)).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(format!("Redis error: {e}")),
                Err(_) => Err("Redis call timed out".to_string()),
            },
            Err(e) => Err(e),
        };
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok(_) => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("Redis reachable again: fleet budget restored");
                }
            }
            Err(e) => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, "Redis unreachable: shared budget unavailable");
                }
                if let Ok(mut l) = self.last_error.lock() {
                    *l = Some(e.clone());
                }
            }
        }
        result
    }

    /// Run one of this account's scripts: routed by its `tat` key (so a cluster-aware
    /// client sends it to the slot's node), `ARGV[1]` the tagged base, then what `args` adds.
    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> Result<T, String> {
        let route = self.key("tat");
        self.call(|mut c| {
            let mut inv = script.key(route);
            inv.arg(&self.base);
            args(&mut inv);
            async move { inv.invoke_async(&mut c).await }
        })
        .await
    }

    /// One atomic admission attempt against the fleet budget.
    pub async fn take(
        &self,
        spacing: Duration,
        burst: u32,
        daily_cap: Option<u64>,
        day_reset_offset: u32,
        max_concurrent: usize,
    ) -> Result<Take, String> {
        let conc = if self.settings.global_concurrency {
            max_concurrent.max(1)
        } else {
            0
        };
        let lease_ms = self.settings.lease_ttl.as_millis().max(1) as u64;
        if !self.legacy_read.swap(true, Ordering::Relaxed) {
            self.read_legacy_day(day_reset_offset).await;
        }
        let seen = {
            let mut g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            g.offset = day_reset_offset;
            g.clone()
        };
        let t_us = spacing.as_micros().max(1) as u64;
        let tau_us = t_us * u64::from(burst.saturating_sub(1));
        let probe_ms = self.settings.probe_ttl.as_millis().max(1) as u64;
        // Replies differ in length by code (a grant carries more), hence a list, not a tuple.
        let reply: Vec<String> = self
            .run(&self.take, |inv| {
                inv.arg(t_us)
                    .arg(tau_us)
                    .arg(daily_cap.unwrap_or(0))
                    .arg(day_reset_offset)
                    .arg(probe_ms)
                    .arg(conc)
                    .arg(lease_ms)
                    .arg(seen.gen)
                    .arg(seen.day)
                    .arg(seen.used);
            })
            .await?;
        let num = |s: &str| s.parse::<i64>().unwrap_or(0);
        let field = |i: usize| reply.get(i).map_or("0", String::as_str);
        let (code, a, b) = (num(field(0)), field(1), field(2));
        if code == 0 {
            self.saw(
                num(field(3)),
                num(a).max(0) as u64,
                reply.get(5).map(String::as_str),
            );
        }
        Ok(match code {
            0 => Take::Granted {
                used_today: num(a).max(0) as u64,
                probe: b == "1",
                day: num(field(3)),
                lease: reply.get(4).filter(|l| !l.is_empty()).cloned(),
            },
            1 => Take::Wait(Duration::from_micros(num(a).max(0) as u64)),
            2 => Take::Cooldown {
                until_unix: num(a) as f64 / 1e6,
                level: b.parse().unwrap_or(1),
            },
            3 | 4 => Take::DailyClosed {
                until_unix: num(a) as f64 / 1e6,
            },
            5 => Take::ProbeBusy,
            6 => Take::ConcurrencyBusy,
            other => return Err(format!("unexpected reply {other} from the take script")),
        })
    }

    /// Record a fleet-wide count seen for `day` (a take's reply or another replica's
    /// announcement), and the `gen` it was seen under when known. Keeps the largest figure.
    pub fn saw(&self, day: i64, used: u64, gen: Option<&str>) {
        let mut g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if day > g.day {
            g.day = day;
            g.used = used;
        } else if day == g.day {
            g.used = g.used.max(used);
        }
        if let Some(gen) = gen {
            if g.gen != gen {
                g.gen = gen.to_string();
            }
        }
    }

    /// The largest fleet-wide count seen for `day` (0 if none).
    pub fn seen_used(&self, day: i64) -> u64 {
        let g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if g.day == day {
            g.used
        } else {
            0
        }
    }

    /// Contribute this replica's figure to a Redis that may have restarted empty (see the
    /// module doc); a no-op when Redis's `gen` is the one the figure was seen under.
    pub async fn reseed(&self) -> Result<(), String> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let gen: String = self
            .run(&self.reseed, |inv| {
                inv.arg(seen.offset)
                    .arg(&seen.gen)
                    .arg(seen.day)
                    .arg(seen.used);
            })
            .await?;
        self.saw(seen.day, seen.used, Some(&gen));
        Ok(())
    }

    /// Before the hash tag, the day's count was `<prefix>day:<index>`. Read it once, so a
    /// fleet restarted on this build keeps the day's count (it re-seeds like a replica that
    /// saw it). On a multi-node cluster that key may live on another node: then it is skipped.
    async fn read_legacy_day(&self, offset: u32) {
        let now = crate::clock::unix_now() as i64;
        let day = crate::units::day_index(now, offset);
        let key = format!("{}day:{day}", self.settings.key_prefix);
        let got: Result<Option<u64>, String> = self
            .call(|mut c| async move {
                redis::cmd("GET")
                    .arg(key)
                    .query_async::<Option<u64>>(&mut c)
                    .await
            })
            .await;
        if let Ok(Some(n)) = got {
            tracing::info!(
                used = n,
                "the day's count under the old key names carried over"
            );
            self.saw(day, n, None);
        }
    }

    /// Give back what a grant took (see `REFUND`); `day` is the one its take returned.
    pub async fn refund(&self, spacing: Duration, day: i64) -> Result<(), String> {
        let t_us = spacing.as_micros().max(1) as u64;
        self.run::<i64>(&self.refund, |inv| {
            inv.arg(t_us).arg(day);
        })
        .await
        .map(|_| ())
    }

    /// Hold the lease `id` the take returned: renewed in the background until the returned
    /// [`Lease`] is dropped, then removed from Redis.
    pub fn hold_lease(self: &Arc<Self>, id: String) -> Lease {
        let fleet = Arc::clone(self);
        let lease_id = id.clone();
        let every = (self.settings.lease_ttl / 3).max(Duration::from_millis(100));
        let renew = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                if let Err(e) = fleet.lease_call(&fleet.renew, &lease_id, true).await {
                    tracing::debug!(error = %e, "could not renew a concurrency lease");
                }
            }
        });
        Lease {
            id,
            fleet: Arc::clone(self),
            renew,
        }
    }

    /// Remove lease `id` from Redis, in the background (a `Drop` cannot wait); if that
    /// fails, the lease expires by itself after `lease_ttl`.
    pub fn release_lease(self: &Arc<Self>, id: String) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let fleet = Arc::clone(self);
        handle.spawn(async move {
            if let Err(e) = fleet.lease_call(&fleet.release, &id, false).await {
                tracing::warn!(error = %e, "could not release a concurrency lease; it expires by itself");
            }
        });
    }

    async fn lease_call(&self, script: &Script, id: &str, with_ttl: bool) -> Result<(), String> {
        let ttl_ms = self.settings.lease_ttl.as_millis().max(1) as u64;
        self.run::<i64>(script, |inv| {
            inv.arg(id);
            if with_ttl {
                inv.arg(ttl_ms);
            }
        })
        .await
        .map(|_| ())
    }

    /// Start (or extend) the fleet-wide cooldown; returns its end (UNIX seconds).
    pub async fn start_cooldown(
        &self,
        duration: Duration,
        level: u32,
        decay: Duration,
    ) -> Result<f64, String> {
        let ms = duration.as_millis().max(1) as u64;
        let decay_ms = decay.as_millis() as u64;
        let until: String = self
            .run(&self.cooldown, |inv| {
                inv.arg(ms).arg(level).arg(decay_ms);
            })
            .await?;
        Ok(until.parse::<i64>().unwrap_or(0) as f64 / 1e6)
    }

    /// Tell the other replicas that `model` cools until `until_unix` (a capacity 429 here).
    /// Pub/sub only: a replica that is not subscribed at that moment learns it from its own
    /// first 429 for that model instead.
    pub async fn announce_model(
        &self,
        model: &str,
        until_unix: f64,
        level: u32,
    ) -> Result<(), String> {
        let channel = self.key("events");
        let msg = format!("model {} {level} {model}", (until_unix * 1e6) as i64);
        self.call(|mut c| async move {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(msg)
                .query_async::<i64>(&mut c)
                .await
        })
        .await
        .map(|_| ())
    }

    pub async fn close_daily_gate(&self, until_unix: f64) -> Result<(), String> {
        let us = (until_unix * 1e6) as i64;
        self.run::<i64>(&self.gate, |inv| {
            inv.arg(us);
        })
        .await
        .map(|_| ())
    }

    /// The probe answered (`ok`: the gate reopens for the fleet) or went away (another may probe).
    pub async fn probe_done(&self, ok: bool) -> Result<(), String> {
        self.run::<i64>(&self.probe_done, |inv| {
            inv.arg(if ok { "1" } else { "0" });
        })
        .await
        .map(|_| ())
    }

    /// Fleet-wide figures, read without changing anything.
    pub async fn status(&self, day_index: i64) -> FleetStatus {
        let keys = [
            self.key(&format!("day:{day_index}")),
            self.key("cooldown"),
            self.key("level"),
            self.key("gate"),
            self.key("probe_needed"),
        ];
        let r: Result<Vec<Option<String>>, String> = self
            .call(|mut c| async move {
                redis::cmd("MGET")
                    .arg(&keys[..])
                    .query_async::<Vec<Option<String>>>(&mut c)
                    .await
            })
            .await;
        match r {
            Ok(v) => {
                let get = |i: usize| v.get(i).cloned().flatten();
                let us = |i: usize| {
                    get(i)
                        .and_then(|s| s.parse::<i64>().ok())
                        .map(|u| u as f64 / 1e6)
                };
                FleetStatus {
                    reachable: true,
                    used_today: Some(get(0).and_then(|s| s.parse().ok()).unwrap_or(0)),
                    cooldown_until_unix: us(1),
                    level: get(2).and_then(|s| s.parse().ok()).unwrap_or(0),
                    gate_until_unix: us(3),
                    probe_needed: get(4).is_some(),
                    last_error: None,
                }
            }
            Err(e) => FleetStatus {
                reachable: false,
                last_error: Some(e),
                ..FleetStatus::default()
            },
        }
    }

    /// Listen for other replicas' announcements and apply them through `apply` while `alive`. Reconnects after any error; after each (re)subscription `resync` is called so a
    /// change missed while disconnected is picked up.
    pub async fn listen<L, A, R, Fut>(self: Arc<Self>, alive: L, apply: A, resync: R)
    where
        L: Fn() -> bool + Send + Sync,
        A: Fn(Event) + Send + Sync,
        R: Fn() -> Fut + Send + Sync,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let channel = self.key("events");
        while alive() {
            let sub = async {
                let mut ps = self.client.get_async_pubsub().await?;
                ps.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            match tokio::time::timeout(CALL_TIMEOUT * 2, sub).await {
                Ok(Ok(ps)) => {
                    if let Err(e) = self.reseed().await {
                        tracing::debug!(error = %e, "could not re-seed the day's count");
                    }
                    resync().await;
                    let mut stream = ps.into_on_message();
                    while let Some(msg) = stream.next().await {
                        if !alive() {
                            return;
                        }
                        if let Ok(text) = msg.get_payload::<String>() {
                            match parse_event(&text) {
                                Some(Event::Used { day, used }) => self.saw(day, used, None),
                                Some(ev) => apply(ev),
                                None => {}
                            }
                        }
                    }
                    tracing::warn!("Redis pub/sub connection lost; resubscribing");
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot subscribe to Redis events"),
                Err(_) => tracing::debug!("subscribing to Redis events timed out"),
            }
            tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse() {
        assert_eq!(
            parse_event("cooldown 1795435200000000 3"),
            Some(Event::Cooldown {
                until_unix: 1_795_435_200.0,
                level: 3
            })
        );
        assert_eq!(
            parse_event("gate 1795435200500000"),
            Some(Event::Gate {
                until_unix: 1_795_435_200.5
            })
        );
        assert_eq!(parse_event("open"), Some(Event::Open));
        assert_eq!(
            parse_event("used 20423 7"),
            Some(Event::Used {
                day: 20423,
                used: 7
            })
        );
        assert_eq!(parse_event("lease_released"), Some(Event::LeaseReleased));
        for bad in [
            "",
            "cooldown",
            "cooldown x",
            "gate",
            "reboot 1",
            "cooldown 1e9 2",
            "used",
            "used 20423",
            "used x 7",
        ] {
            assert_eq!(parse_event(bad), None, "{bad:?}");
        }
    }
}

//! The last hour, second by second, for `/history` and the dashboard: a ring buffer of
//! per-second samples filled by one sampler task.
//!
//! Owns the ring, the sampler loop and the `/history` document. Each second the sampler reads
//! the counters in [`Metrics`] once and the gauges from one [`Admission::snapshot`], and stores
//! the counters' deltas since the previous second with the gauges as they were. The request
//! path does nothing for it: no extra atomic, no lock, no allocation. Memory is fixed: at most
//! [`CAPACITY`] samples of fixed-size arrays (label sets are the bounded ones of `/metrics`),
//! allocated once.
//!
//! Deliberately not here: anything per model or per client (unbounded or already in
//! `/status`), and persistence (a restart starts a fresh hour; Prometheus is the long-term
//! store).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};
use tokio::sync::watch;

use crate::admission::{Admission, Snapshot};
use crate::clock::WallClock;
use crate::metrics::{outcome_name, status_label, Metrics, OUTCOMES, STATUS_LABELS};

/// Seconds kept, and the largest `seconds=N` `/history` accepts (the contract's figure): an
/// hour is what the dashboard charts; longer belongs in Prometheus.
pub const CAPACITY: usize = 3600;

/// One second: counter deltas (u32: a second holds far fewer than 4 billion requests, and it
/// halves the ring) and gauges sampled at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// UNIX seconds at the end of the second the sample covers.
    pub t: i64,
    /// By outcome index: 0 = forwarded, then every shed reason (`metrics::outcome_name`).
    pub outcomes: [u32; OUTCOMES],
    /// By `status` label index (`metrics::status_label`).
    pub upstream: [u32; STATUS_LABELS],
    pub queue_depth: u32,
    pub in_flight: u32,
    pub cooldown: bool,
}

/// Counter totals at one instant: what [`History::record`] turns into deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub outcomes: [u64; OUTCOMES],
    pub upstream: [u64; STATUS_LABELS],
}

impl Totals {
    pub const ZERO: Totals = Totals {
        outcomes: [0; OUTCOMES],
        upstream: [0; STATUS_LABELS],
    };

    pub fn read(metrics: &Metrics) -> Totals {
        Totals {
            outcomes: metrics.outcome_totals(),
            upstream: metrics.upstream_totals(),
        }
    }
}

/// The ring and the totals the last sample was taken against.
pub struct History {
    inner: Mutex<Ring>,
}

struct Ring {
    samples: VecDeque<Sample>,
    /// Zero at start, so the first sample holds everything counted before it.
    last: Totals,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

impl History {
    pub fn new() -> History {
        History {
            inner: Mutex::new(Ring {
                samples: VecDeque::with_capacity(CAPACITY),
                last: Totals::ZERO,
            }),
        }
    }

    /// Store one second ending at `t`: the deltas of `now` against the previous totals, and
    /// the gauges of `snap`. The oldest sample goes when the ring is full.
    pub fn record(&self, t: i64, now: Totals, snap: &Snapshot) {
        // Counters only grow; a saturating difference keeps a bug elsewhere from wrapping
        // into four billion, and the clamp to u32 only bites at 4 billion a second.
        let delta = |a: u64, b: u64| u32::try_from(a.saturating_sub(b)).unwrap_or(u32::MAX);
        let mut ring = self.lock();
        let last = ring.last;
        let sample = Sample {
            t,
            outcomes: std::array::from_fn(|i| delta(now.outcomes[i], last.outcomes[i])),
            upstream: std::array::from_fn(|i| delta(now.upstream[i], last.upstream[i])),
            queue_depth: u32::try_from(snap.queue_depth).unwrap_or(u32::MAX),
            in_flight: u32::try_from(snap.in_flight).unwrap_or(u32::MAX),
            cooldown: snap.cooldown_active,
        };
        if ring.samples.len() == CAPACITY {
            ring.samples.pop_front();
        }
        ring.samples.push_back(sample);
        ring.last = now;
    }

    /// The samples of the last `seconds` seconds before `now_unix`, oldest first.
    pub fn since(&self, seconds: usize, now_unix: i64) -> Vec<Sample> {
        let ring = self.lock();
        let from = now_unix.saturating_sub(seconds as i64);
        // Only the tail is walked: the cost is the answer's size, not the ring's.
        let n = ring.samples.iter().rev().take_while(|s| s.t > from).count();
        ring.samples
            .range(ring.samples.len() - n..)
            .copied()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A panic while holding this lock cannot leave the ring inconsistent (every update is
        // a push and an assignment), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Parse `/history`'s query: `seconds=N` with 1 ≤ N ≤ [`CAPACITY`]; absent means all of it.
/// The error is the message for the 400.
pub fn parse_query(query: Option<&str>) -> Result<usize, String> {
    let mut seconds = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != "seconds" {
            return Err(format!(
                "unknown parameter {k:?}; only seconds=N is accepted"
            ));
        }
        if seconds.is_some() {
            return Err("seconds given more than once".into());
        }
        seconds = Some(v);
    }
    let Some(v) = seconds else {
        return Ok(CAPACITY);
    };
    match v.parse::<usize>() {
        Ok(n) if (1..=CAPACITY).contains(&n) => Ok(n),
        _ => Err(format!(
            "seconds must be a whole number from 1 to {CAPACITY}, not {v:?}"
        )),
    }
}

/// The `/history` document (contract: Admin listener).
pub struct Document(pub Vec<Sample>);

impl Serialize for Document {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut doc = ser.serialize_struct("History", 2)?;
        doc.serialize_field("interval_seconds", &1)?;
        doc.serialize_field("samples", &self.0.iter().map(View).collect::<Vec<_>>())?;
        doc.end()
    }
}

/// One sample as JSON. `shed` and `upstream` list only what happened that second, so an hour
/// of an idle proxy is a few hundred kilobytes, not megabytes of zeros.
struct View<'a>(&'a Sample);

impl Serialize for View<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let s = self.0;
        let mut m = ser.serialize_struct("Sample", 7)?;
        m.serialize_field("t", &s.t)?;
        m.serialize_field("forwarded", &s.outcomes[0])?;
        m.serialize_field(
            "shed",
            &Sparse(&s.outcomes[1..], &|i| outcome_name(i + 1).to_string()),
        )?;
        m.serialize_field("upstream", &Sparse(&s.upstream, &status_label))?;
        m.serialize_field("queue_depth", &s.queue_depth)?;
        m.serialize_field("in_flight", &s.in_flight)?;
        m.serialize_field("cooldown", &s.cooldown)?;
        m.end()
    }
}

/// The non-zero entries of `values` as a map keyed by `name(index)`.
struct Sparse<'a>(&'a [u32], &'a dyn Fn(usize) -> String);

impl Serialize for Sparse<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut m = ser.serialize_map(None)?;
        for (i, &n) in self.0.iter().enumerate().filter(|(_, n)| **n > 0) {
            m.serialize_entry(&(self.1)(i), &n)?;
        }
        m.end()
    }
}

/// The sampler: once a second, on the wall clock's second boundary (so `t` is the second
/// the sample ends), record one sample, until `stop` turns true.
pub async fn run_sampler(
    history: Arc<History>,
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
    wall: WallClock,
    mut stop: watch::Receiver<bool>,
) {
    let now = wall.now_unix();
    let to_boundary = Duration::from_secs_f64(now.ceil() - now);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + to_boundary,
        Duration::from_secs(1),
    );
    // After a stall (a suspended laptop, a starved runtime) take the next sample when due and
    // let it hold the missed seconds' counts, rather than firing a burst of empty samples.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let totals = Totals::read(&metrics);
        let snap = admission.snapshot();
        history.record(wall.now_unix().round() as i64, totals, &snap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Probe;

    fn snap(queue_depth: usize, in_flight: usize, cooldown: bool) -> Snapshot {
        Snapshot {
            requests_per_minute: 50,
            requests_per_day: None,
            tokens_available: 3,
            next_token_in: Duration::ZERO,
            used_today: 0,
            remaining_today: None,
            day_resets_at_unix: 0,
            daily_gate_until_unix: None,
            cooldown_active: cooldown,
            cooldown_proactive: false,
            cooldown_until_unix: None,
            cooldown_level: 0,
            gate: Probe::Open,
            last_429: None,
            queue_depth,
            oldest_wait: None,
            in_flight,
            clients: Vec::new(),
            ..Snapshot::default()
        }
    }

    fn totals(forwarded: u64, shed1: u64, status0: u64) -> Totals {
        let mut t = Totals::ZERO;
        t.outcomes[0] = forwarded;
        t.outcomes[1] = shed1;
        t.upstream[0] = status0;
        t
    }

    #[test]
    fn samples_are_deltas_of_counters_and_gauges_as_sampled() {
        let h = History::new();
        h.record(100, totals(7, 3, 7), &snap(2, 1, false));
        h.record(101, totals(9, 3, 9), &snap(0, 0, true));
        h.record(102, totals(9, 3, 9), &snap(0, 0, false));
        let s = h.since(CAPACITY, 102);
        assert_eq!(s.len(), 3);
        assert_eq!(
            (s[0].outcomes[0], s[0].outcomes[1], s[0].upstream[0]),
            (7, 3, 7)
        );
        assert_eq!(
            (s[1].outcomes[0], s[1].outcomes[1], s[1].upstream[0]),
            (2, 0, 2)
        );
        assert_eq!(s[2].outcomes, [0; OUTCOMES]);
        assert_eq!(
            (s[0].queue_depth, s[0].in_flight, s[0].cooldown),
            (2, 1, false)
        );
        assert!(s[1].cooldown);
        // The last N seconds before `now`, by timestamp.
        assert_eq!(
            h.since(2, 102).iter().map(|s| s.t).collect::<Vec<_>>(),
            [101, 102]
        );
        assert_eq!(h.since(1, 110), []);
    }

    #[test]
    fn the_ring_is_bounded_and_drops_the_oldest() {
        let h = History::new();
        for t in 0..(CAPACITY as i64 + 10) {
            h.record(t, totals(t as u64, 0, 0), &snap(0, 0, false));
        }
        let s = h.since(CAPACITY, CAPACITY as i64 + 9);
        assert_eq!(s.len(), CAPACITY);
        assert_eq!(s[0].t, 10);
        assert_eq!(h.lock().samples.capacity(), CAPACITY, "never reallocated");
    }

    #[test]
    fn a_counter_going_backwards_is_zero_not_a_wrap() {
        let h = History::new();
        h.record(1, totals(5, 0, 0), &snap(0, 0, false));
        h.record(2, totals(4, 0, 0), &snap(0, 0, false));
        assert_eq!(h.since(10, 2)[1].outcomes[0], 0);
    }

    #[test]
    fn the_query_takes_one_bounded_seconds_parameter() {
        assert_eq!(parse_query(None), Ok(CAPACITY));
        assert_eq!(parse_query(Some("")), Ok(CAPACITY));
        assert_eq!(parse_query(Some("seconds=60")), Ok(60));
        assert_eq!(parse_query(Some("seconds=3600")), Ok(3600));
        for bad in [
            "seconds=0",
            "seconds=3601",
            "seconds=-1",
            "seconds=1.5",
            "seconds=",
            "seconds",
            "seconds=99999999999999999999999",
            "seconds=5&seconds=6",
            "secs=5",
        ] {
            assert!(parse_query(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_document_has_the_contract_shape_and_lists_only_what_happened() {
        let h = History::new();
        let mut t = totals(7, 3, 7);
        t.upstream[STATUS_LABELS - 1] = 1; // 5xx
        h.record(100, t, &snap(4, 2, true));
        let v = serde_json::to_value(Document(h.since(60, 100))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"interval_seconds": 1, "samples": [{
                "t": 100, "forwarded": 7,
                "shed": {outcome_name(1): 3},
                "upstream": {status_label(0): 7, "5xx": 1},
                "queue_depth": 4, "in_flight": 2, "cooldown": true,
            }]})
        );
    }
}

//! Time sources: the monotonic clock that drives the bucket and the queue, and the wall clock
//! that decides the UTC day. The only file that reads the system clock.
//!
//! Everything monotonic is `tokio::time::Instant`, so `#[tokio::test(start_paused = true)]`
//! drives the bucket, the queue deadlines and the cooldowns together. governor gets the same
//! time through [`TokioClock`]. The wall clock is only used for the quota day, persisted
//! instants and the timestamps users read; tests pin it to a chosen instant that then advances
//! with (paused) tokio time. `clippy.toml` disallows `std::time::SystemTime::now` and
//! `std::time::Instant::now` everywhere, so no code escapes these two; the one allowed reading
//! of the system wall clock is [`unix_time`]. Deliberately not here: what any instant means
//! (the quota day is `units.rs`, gates are admission's).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// governor clock over tokio's (pausable) monotonic time. Readings are offsets from `origin`.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: Instant,
}

impl TokioClock {
    pub fn new(origin: Instant) -> Self {
        TokioClock { origin }
    }

    /// The tokio instant of a governor reading.
    pub fn to_instant(&self, reading: Duration) -> Instant {
        self.origin + reading
    }

    /// The reading of an instant the caller already has (no clock read of its own).
    pub fn reading_at(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.origin)
    }
}

impl governor::clock::Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.origin)
    }
}

/// The system wall clock as UNIX seconds (0 for a clock set before 1970).
///
/// For what no test needs to pin: request-id seeds, the name a corrupt state file is moved
/// aside to, and [`WallClock::System`]. Anything compared with admission's instants reads the
/// [`WallClock`] admission was given instead, so a pinned clock stays consistent.
pub fn unix_now() -> f64 {
    unix_time().as_secs_f64()
}

/// The system wall clock since the UNIX epoch, to the nanosecond (zero for a clock set before
/// 1970): [`unix_now`], and the log lines' timestamps (`log::LogTime`), which print
/// microseconds an `f64` of seconds would round.
#[allow(clippy::disallowed_methods)] // the one reading of the system clock (clippy.toml)
pub fn unix_time() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

/// Wall-clock time as UNIX seconds.
#[derive(Debug, Clone, Copy)]
pub enum WallClock {
    /// The system clock.
    System,
    /// `unix` seconds at tokio instant `at`, advancing with tokio time (tests).
    Pinned { unix: f64, at: Instant },
}

impl WallClock {
    pub fn pinned(unix: f64) -> Self {
        WallClock::Pinned {
            unix,
            at: Instant::now(),
        }
    }

    pub fn now_unix(&self) -> f64 {
        match *self {
            WallClock::System => unix_now(),
            WallClock::Pinned { unix, at } => unix + at.elapsed().as_secs_f64(),
        }
    }

    /// The monotonic instant corresponding to a future (or past) wall-clock time.
    pub fn instant_at(&self, unix: f64) -> Instant {
        let now = Instant::now();
        let delta = unix - self.now_unix();
        if delta.is_finite() && delta > 0.0 {
            now + Duration::from_secs_f64(delta.min(MAX_AHEAD_SECS))
        } else {
            now
        }
    }

    /// The wall-clock time of a monotonic instant.
    pub fn unix_at(&self, at: Instant) -> f64 {
        let now = Instant::now();
        let base = self.now_unix();
        if at >= now {
            base + (at - now).as_secs_f64()
        } else {
            base - (now - at).as_secs_f64()
        }
    }
}

/// No instant the proxy deals in is more than a few days ahead; this keeps `Instant`
/// arithmetic far from overflow whatever a state file or upstream header claims.
const MAX_AHEAD_SECS: f64 = 7.0 * 86_400.0;

//! A small GCRA (the same algorithm governor runs) for the caps that need what governor lacks:
//! a look without taking, a give-back, and a rate changed in place without a fresh burst.
//!
//! Used for each client's own rate and each model's advertised rate. The account's bucket
//! stays governor's (the design requires it); these caps are checked *together* with it at
//! the moment a request is granted, so they must be able to say "not yet" without consuming,
//! which governor cannot (checking two governor limiters in a row consumes from the first
//! even when the second refuses).
//!
//! Time is a `tokio::time::Instant` passed in by the caller; nothing here reads a clock.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct Gcra {
    /// Emission interval: one request every `period`.
    period: Duration,
    /// Burst tolerance: `period × (burst − 1)`.
    tau: Duration,
    /// Theoretical arrival time of the next request; `None` = never used (full bucket).
    tat: Option<Instant>,
}

impl Gcra {
    pub fn per_minute(rpm: u32, burst: u32) -> Gcra {
        let period = Duration::from_secs(60) / rpm.max(1);
        Gcra {
            period,
            tau: period * burst.max(1).saturating_sub(1),
            tat: None,
        }
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// The earliest instant a request conforms (≤ `now` when one may go now).
    pub fn ready_at(&self, now: Instant) -> Instant {
        match self.tat {
            Some(tat) => tat.checked_sub(self.tau).unwrap_or(now).max(now),
            None => now,
        }
    }

    /// When the request `ahead` places behind the next one would conform.
    pub fn ready_at_behind(&self, now: Instant, ahead: usize) -> Instant {
        let behind = self
            .period
            .saturating_mul(u32::try_from(ahead).unwrap_or(u32::MAX));
        self.ready_at(now) + behind
    }

    pub fn is_ready(&self, now: Instant) -> bool {
        self.ready_at(now) <= now
    }

    /// Take one request at `now`; the caller has checked [`Gcra::is_ready`]. Returns the TAT
    /// after the take, which a give-back must match.
    pub fn take(&mut self, now: Instant) -> Instant {
        let tat = self.tat.unwrap_or(now).max(now) + self.period;
        self.tat = Some(tat);
        tat
    }

    /// Give back a take whose request was never sent, if nothing was taken since (otherwise
    /// the later take already spaced itself from this one and giving back would let the next
    /// request come too soon).
    pub fn give_back(&mut self, taken_tat: Instant) {
        if self.tat == Some(taken_tat) {
            self.tat = taken_tat.checked_sub(self.period);
        }
    }

    /// Change the rate in place, keeping the schedule: the next request conforms no earlier
    /// than it did, so a lower rate grants no fresh burst.
    pub fn set_rate(&mut self, rpm: u32, burst: u32, now: Instant) {
        let next = self.ready_at(now);
        let period = Duration::from_secs(60) / rpm.max(1);
        let tau = period * burst.max(1).saturating_sub(1);
        self.period = period;
        self.tau = tau;
        if self.tat.is_some() {
            // ready_at = tat − tau: keep it where it was.
            self.tat = Some(next + tau);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_spacing_and_give_back() {
        let now = Instant::now();
        let mut g = Gcra::per_minute(60, 2);
        assert!(g.is_ready(now));
        g.take(now);
        assert!(g.is_ready(now));
        let t2 = g.take(now);
        assert!(!g.is_ready(now));
        assert_eq!(g.ready_at(now), now + Duration::from_secs(1));
        g.give_back(t2);
        assert!(g.is_ready(now));
        // A stale give-back (something taken since) changes nothing.
        let t = g.take(now);
        let _later = g.take(now + Duration::from_secs(1));
        g.give_back(t);
        assert_eq!(g.ready_at(now), now + Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lower_rate_keeps_the_schedule_and_grants_no_burst() {
        let now = Instant::now();
        let mut g = Gcra::per_minute(60, 5);
        for _ in 0..5 {
            g.take(now);
        }
        assert_eq!(g.ready_at(now), now + Duration::from_secs(1));
        g.set_rate(30, 5, now);
        assert_eq!(g.ready_at(now), now + Duration::from_secs(1));
        let at = g.ready_at(now);
        g.take(at);
        // From here on, the new spacing: one every 2 s.
        assert_eq!(g.ready_at(at), at + Duration::from_secs(2));
    }
}

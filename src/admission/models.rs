//! Gates scoped to one model: a capacity cooldown with its single probe, the model's own
//! advertised rate (`X-Chutes-RL-Chute`) and the model's own daily quota (quota headers whose
//! `Total` differs from the account's).
//!
//! Model names come from clients, so the table is bounded by construction: at most
//! [`MAX_MODELS`] entries, and making room drops the entry touched longest ago. An entry
//! exists only while it holds state worth keeping; a model nobody has heard anything about has
//! no entry and is open.
//!
//! Plain state and time in, answers out: no I/O, no logging, no clock of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::gcra::Gcra;
use super::Probe;

/// The contract's bound on cooling models (the oldest is dropped to make room).
pub const MAX_MODELS: usize = 64;

#[derive(Debug)]
pub struct ModelGate {
    /// Capacity cooldown end.
    pub until: Option<Instant>,
    pub level: u32,
    /// Bumped when a cooldown starts, so 429s from requests already in flight are one episode.
    pub epoch: u64,
    pub probe: Probe,
    /// The last capacity 429's body and when it came (UNIX seconds).
    pub last_body: String,
    pub last_at_unix: f64,
    /// `X-Chutes-RL-Chute`: the model's own rate, and the figure it came from.
    pub rate: Option<(u32, Gcra)>,
    /// The model's own daily quota (headers whose Total is not the account's).
    pub quota_total: Option<u64>,
    pub quota_used: u64,
    /// Closed by the model's own quota until this UNIX time.
    pub quota_gate_until_unix: Option<f64>,
    touched: u64,
}

impl ModelGate {
    fn new(touched: u64) -> ModelGate {
        ModelGate {
            until: None,
            level: 0,
            epoch: 0,
            probe: Probe::Open,
            last_body: String::new(),
            last_at_unix: 0.0,
            rate: None,
            quota_total: None,
            quota_used: 0,
            quota_gate_until_unix: None,
            touched,
        }
    }

    /// Whether the entry still holds anything (an open gate with no rate and no quota is
    /// the same as no entry).
    fn holds_state(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| u > now)
            || self.probe != Probe::Open
            || self.rate.is_some()
            || self.quota_total.is_some()
            || self.level > 0
    }
}

/// Why a model's request cannot go now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModelBlock {
    /// Cooling after a capacity 429 until then.
    Cooling(Instant),
    /// Its probe is in flight: wait for the answer.
    Probe,
    /// Its own advertised rate: the next request conforms then.
    Rate(Instant),
    /// Its own daily quota is spent until this UNIX time.
    Quota(f64),
}

#[derive(Default)]
pub struct ModelGates {
    map: HashMap<Arc<str>, ModelGate>,
    clock: u64,
}

impl ModelGates {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, model: &str) -> Option<&ModelGate> {
        self.map.get(model)
    }

    /// The entry for `model`, made (evicting the stalest if full) when absent.
    pub fn entry(&mut self, model: &Arc<str>, now: Instant) -> &mut ModelGate {
        self.clock += 1;
        let touched = self.clock;
        if !self.map.contains_key(&**model) {
            if self.map.len() >= MAX_MODELS {
                // First drop entries that hold nothing, else the one touched longest ago.
                let victim = self
                    .map
                    .iter()
                    .min_by_key(|(_, g)| (g.holds_state(now), g.touched))
                    .map(|(k, _)| Arc::clone(k));
                if let Some(v) = victim {
                    self.map.remove(&v);
                }
            }
            self.map.insert(Arc::clone(model), ModelGate::new(touched));
        }
        let g = self
            .map
            .get_mut(&**model)
            .expect("present: inserted above if absent");
        g.touched = touched;
        g
    }

    pub fn get_mut(&mut self, model: &str) -> Option<&mut ModelGate> {
        self.map.get_mut(model)
    }

    /// What keeps a request for `model` from going at `now`; ends an expired cooldown (the
    /// next request for it becomes the probe) and an expired quota gate.
    pub fn blocked(&mut self, model: &str, now: Instant, now_unix: f64) -> Option<ModelBlock> {
        let g = self.map.get_mut(model)?;
        if let Some(u) = g.quota_gate_until_unix {
            if u > now_unix {
                return Some(ModelBlock::Quota(u));
            }
            g.quota_gate_until_unix = None;
            g.quota_used = 0;
        }
        if let Some(until) = g.until {
            if until > now {
                return Some(ModelBlock::Cooling(until));
            }
            g.until = None;
            g.probe = Probe::Ready;
        }
        if g.probe == Probe::Outstanding {
            return Some(ModelBlock::Probe);
        }
        if let Some((_, r)) = &g.rate {
            let at = r.ready_at(now);
            if at > now {
                return Some(ModelBlock::Rate(at));
            }
        }
        None
    }

    /// Whether a request for `model` may go at `now`, without changing anything (an expired
    /// cooldown counts as open: its probe may go).
    pub fn is_open(&self, model: &str, now: Instant, now_unix: f64) -> bool {
        let Some(g) = self.map.get(model) else {
            return true;
        };
        if g.quota_gate_until_unix.is_some_and(|u| u > now_unix) {
            return false;
        }
        if g.until.is_some_and(|u| u > now) {
            return false;
        }
        if g.until.is_none() && g.probe == Probe::Outstanding {
            return false;
        }
        g.rate.as_ref().is_none_or(|(_, r)| r.is_ready(now))
    }

    /// Models cooling now (name, until, level, last body), for `/status`.
    pub fn cooling(&self, now: Instant) -> Vec<(Arc<str>, Instant, u32, String)> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .filter(|(_, g)| g.until.is_some_and(|u| u > now) || g.probe != Probe::Open)
            .map(|(k, g)| {
                (
                    Arc::clone(k),
                    g.until.unwrap_or(now),
                    g.level,
                    g.last_body.clone(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Every entry, for `/status` (name and gate).
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &ModelGate)> {
        self.map.iter()
    }

    /// A new quota day: models' own daily counts start again.
    pub fn new_day(&mut self) {
        for g in self.map.values_mut() {
            g.quota_used = 0;
            g.quota_gate_until_unix = None;
        }
    }

    /// Cooldown length for the next capacity 429 at `level` (1-based).
    pub fn backoff(initial: Duration, max: Duration, multiplier: f64, level: u32) -> Duration {
        let factor = multiplier.powi(level.saturating_sub(1).min(64) as i32);
        let secs = initial.as_secs_f64() * factor;
        if secs.is_finite() {
            Duration::from_secs_f64(secs.min(max.as_secs_f64()))
        } else {
            max
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_table_never_holds_more_than_the_bound() {
        let now = Instant::now();
        let mut t = ModelGates::default();
        for i in 0..1000 {
            let m: Arc<str> = Arc::from(format!("model-{i}"));
            t.entry(&m, now).until = Some(now + Duration::from_secs(60));
            assert!(t.len() <= MAX_MODELS);
        }
        // The newest are kept, the oldest dropped.
        assert!(t.get("model-999").is_some());
        assert!(t.get("model-0").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cooldown_ends_in_a_single_probe() {
        let now = Instant::now();
        let mut t = ModelGates::default();
        let m: Arc<str> = Arc::from("m");
        t.entry(&m, now).until = Some(now + Duration::from_secs(5));
        assert_eq!(
            t.blocked("m", now, 0.0),
            Some(ModelBlock::Cooling(now + Duration::from_secs(5)))
        );
        let later = now + Duration::from_secs(5);
        assert_eq!(t.blocked("m", later, 0.0), None);
        assert_eq!(t.get("m").unwrap().probe, Probe::Ready);
        t.get_mut("m").unwrap().probe = Probe::Outstanding;
        assert_eq!(t.blocked("m", later, 0.0), Some(ModelBlock::Probe));
        assert_eq!(t.blocked("other", later, 0.0), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let s = Duration::from_secs;
        assert_eq!(ModelGates::backoff(s(5), s(120), 2.0, 1), s(5));
        assert_eq!(ModelGates::backoff(s(5), s(120), 2.0, 3), s(20));
        assert_eq!(ModelGates::backoff(s(5), s(120), 2.0, 30), s(120));
        assert_eq!(ModelGates::backoff(s(5), s(120), 100.0, u32::MAX), s(120));
    }
}

//! The async driver around the budget: the dispatcher task (the only one that sleeps on the
//! bucket's or a gate's timer), the delivery of replies after the lock is released, the
//! Redis store's take (an effect a decision asks for, performed here outside the lock), the
//! fleet's announcements applied to this replica, and the background check on an
//! unreachable Redis.

use super::effects::Remote;
use super::fleet::{OnError, Take};
use super::*;
/// The dispatcher: the only task that sleeps on the bucket's or a gate's timer.
pub(super) async fn dispatch(shared: Arc<Shared>) {
    let mut out = Vec::new();
    loop {
        let next = shared.lock().step(&shared, &mut out);
        deliver(&mut out);
        match next {
            Next::At(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = shared.wake.notified() => {}
                }
            }
            // Whether Redis is back is found out by `watch_health`, not here: the
            // dispatcher of a busy replica is never idle.
            Next::Idle => shared.wake.notified().await,
            Next::Take(fleet) => {
                take_remote(&shared, &fleet, &mut out).await;
                deliver(&mut out);
            }
        }
    }
}

/// While Redis is down, check on it this often (in the background, see `watch_health`).
pub(super) const FLEET_HEALTH_RETRY: Duration = Duration::from_secs(1);

/// While Redis is unreachable, ask it once a `FLEET_HEALTH_RETRY` whether it is back (a read
/// that changes nothing; `Fleet::call` flips the health flag on its answer), so that shedding
/// or the local fallback ends as soon as it is, and no request has to pay a Redis timeout to
/// find out. Runs as long as the budget does.
async fn watch_health(fleet: Arc<Fleet>, shared: std::sync::Weak<Shared>) {
    loop {
        tokio::time::sleep(FLEET_HEALTH_RETRY).await;
        let Some(day) = shared.upgrade().map(|sh| sh.lock().day.index) else {
            return;
        };
        if fleet.is_healthy() {
            continue;
        }
        let _ = fleet.status(day).await;
        if fleet.is_healthy() {
            if let Some(sh) = shared.upgrade() {
                sh.wake.notify_one();
            }
        }
    }
}

pub(super) fn deliver(out: &mut Out) {
    for (tx, r) in out.drain(..) {
        // A waiter that left in the meantime drops the permit here, which returns it.
        let _ = tx.send(r);
    }
}

/// One Redis admission attempt for the head of the queue (`Next::Take`): the call happens
/// with the lock released; its answer is applied under the lock; what that leaves to do with
/// Redis (a lease to hold, a token to give back) happens after it again.
pub(super) async fn take_remote(shared: &Arc<Shared>, f: &Arc<Fleet>, out: &mut Out) {
    let (spacing, burst, cap, offset, conc) = {
        let g = shared.lock();
        let s = &g.s;
        (
            g.spacing(),
            s.limits.burst.get(),
            g.daily_cap(),
            s.limits.day_reset_offset,
            s.limits.max_concurrent,
        )
    };
    // With the local fallback and Redis known to be down, grant from the fallback without
    // asking: a frozen or partitioned Redis would make every attempt wait `CALL_TIMEOUT`.
    // `watch_health` notices its return. (Fail-closed sheds in `admit` already.)
    let result = if !f.is_healthy() && f.settings.on_error == OnError::Local {
        Err(f.last_error().unwrap_or_else(|| "Redis unreachable".into()))
    } else {
        f.take(spacing, burst, cap, offset, conc).await
    };
    let now = Instant::now();
    // A grant Redis counted: `Some((permit's index in out, day, lease id))`, or the count to
    // give back when nobody was left to take it.
    let mut counted = None;
    let mut unused = None;
    {
        let mut g = shared.lock();
        match result {
            Ok(Take::Granted {
                probe,
                day,
                lease,
                used_today,
            }) => {
                g.day.fleet_used = g.day.fleet_used.max(used_today);
                if probe {
                    g.cooldown.probe = Probe::Ready;
                }
                if g.grant_head(shared, out, now) {
                    // `serve` pushed the grant last: it carries what Redis counted.
                    counted = Some((out.len() - 1, day, lease));
                } else {
                    // Everyone left while Redis answered: give the token and the count back.
                    if probe {
                        g.cooldown.probe = Probe::Open;
                        let release = g.store.announce(Remote::ProbeDone {
                            ok: false,
                            what: "probe release",
                        });
                        g.fx.call(release);
                    }
                    let ticket = fleet::Ticket { day, lease: None };
                    let refund = g.store.refund(Some(&ticket), spacing);
                    g.fx.call(refund);
                    unused = lease;
                }
            }
            Ok(Take::Wait(d)) => g.store.wait_remote(Some(now + d)),
            // A released lease or probe is announced, which ends the wait early; the poll
            // covers an announcement lost with a pub/sub connection.
            Ok(Take::ProbeBusy | Take::ConcurrencyBusy) => {
                g.store.wait_remote(Some(now + fleet::PROBE_POLL))
            }
            Ok(Take::Cooldown { until_unix, level }) => {
                g.apply_fleet_cooldown(shared, until_unix, level)
            }
            Ok(Take::DailyClosed { until_unix }) => {
                g.day.gate_until_unix = Some(g.day.gate_until_unix.unwrap_or(0.0).max(until_unix));
                g.day.gate_cause = GATE_BY_FLEET;
            }
            Err(e) => match f.settings.on_error {
                OnError::FailClosed => {
                    for w in g.queue.drain_where(|_| true) {
                        let mut r = Rejection::new(Reason::SharedStateUnavailable);
                        r.retry_after = Some(FLEET_HEALTH_RETRY);
                        r.detail = Some(e.clone());
                        out.push((w.payload.reply, Err(r)));
                    }
                }
                OnError::Local => {
                    if g.store.take_fallback(&shared.clock, now) {
                        g.grant_head(shared, out, now);
                    }
                }
            },
        }
    }
    // Holding a lease spawns its renewal; releasing one spawns its removal: both after the
    // lock.
    if let Some((i, day, lease)) = counted {
        let lease = lease.map(|id| f.hold_lease(id));
        if let Some((_, Ok(permit))) = out.get_mut(i) {
            permit.fleet = Some(fleet::Ticket { day, lease });
        }
    }
    if let Some(id) = unused {
        f.release_lease(id);
    }
}

/// Apply other replicas' announcements to this replica's gates.
pub(super) async fn listen_fleet(fleet: Arc<Fleet>, shared: std::sync::Weak<Shared>) {
    tokio::spawn(watch_health(Arc::clone(&fleet), shared.clone()));
    let alive = {
        let shared = shared.clone();
        move || shared.strong_count() > 0
    };
    let apply = {
        let shared = shared.clone();
        move |ev: fleet::Event| {
            let Some(sh) = shared.upgrade() else {
                return;
            };
            {
                let mut g = sh.lock();
                match ev {
                    fleet::Event::Cooldown { until_unix, level } => {
                        g.apply_fleet_cooldown(&sh, until_unix, level)
                    }
                    fleet::Event::Gate { until_unix } => {
                        g.day.gate_until_unix =
                            Some(g.day.gate_until_unix.unwrap_or(0.0).max(until_unix));
                        g.day.gate_cause = GATE_BY_FLEET;
                    }
                    fleet::Event::Model {
                        until_unix,
                        level,
                        model,
                    } => {
                        let now = Instant::now();
                        let until = sh.wall.instant_at(until_unix);
                        let model: Arc<str> = Arc::from(model);
                        let e = g.models.entry(&model, now);
                        if until > now && e.until.is_none_or(|u| u < until) {
                            e.until = Some(until);
                            e.epoch += 1;
                            if e.probe == Probe::Ready {
                                e.probe = Probe::Open;
                            }
                        }
                        e.level = e.level.max(level);
                    }
                    fleet::Event::Open
                    | fleet::Event::ProbeReleased
                    | fleet::Event::LeaseReleased
                    | fleet::Event::Used { .. } => g.store.wait_remote(None),
                }
            }
            sh.wake.notify_one();
        }
    };
    let resync = {
        let shared = shared.clone();
        let fleet = Arc::clone(&fleet);
        move || {
            let shared = shared.clone();
            let fleet = Arc::clone(&fleet);
            async move {
                let Some(day) = shared.upgrade().map(|sh| sh.lock().day.index) else {
                    return;
                };
                let st = fleet.status(day).await;
                if let Some(sh) = shared.upgrade() {
                    {
                        let mut g = sh.lock();
                        if let Some(u) = st.cooldown_until_unix {
                            g.apply_fleet_cooldown(&sh, u, st.level);
                        }
                        if let Some(u) = st.gate_until_unix {
                            g.day.gate_until_unix =
                                Some(g.day.gate_until_unix.unwrap_or(0.0).max(u));
                            g.day.gate_cause = GATE_BY_FLEET;
                        }
                    }
                    sh.wake.notify_one();
                }
            }
        }
    };
    fleet.listen(alive, apply, resync).await;
}

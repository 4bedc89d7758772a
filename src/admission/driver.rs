//! The async driver around the budget: the dispatcher task (the only one that sleeps on the
//! bucket's or a gate's timer), the delivery of replies after the lock is released, and the
//! fleet's Redis calls and announcements, which run outside the lock, and the background
//! check on an unreachable Redis.

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
            Next::Take => {
                take_remote(&shared, &mut out).await;
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

/// One Redis admission attempt for the head of the queue (fleet mode).
pub(super) async fn take_remote(shared: &Arc<Shared>, out: &mut Out) {
    let Some(f) = shared.fleet.clone() else {
        return;
    };
    let (spacing, burst, cap, offset, conc) = {
        let g = shared.lock();
        let s = &g.s;
        (
            g.spacing(),
            s.burst,
            g.daily_cap(),
            s.day_reset_offset,
            s.max_concurrent,
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
    let now_unix = shared.wall.now_unix();
    let mut g = shared.lock();
    match result {
        Ok(Take::Granted {
            probe,
            day,
            lease,
            used_today,
        }) => {
            g.day.fleet_used = g.day.fleet_used.max(used_today);
            let lease = lease.map(|id| f.hold_lease(id));
            if probe {
                g.cooldown.probe = Probe::Ready;
            }
            if g.grant_head(shared, out, now) {
                // `serve` pushed the grant last: it carries what Redis counted, for a give-back.
                if let Some((_, Ok(permit))) = out.last_mut() {
                    permit.fleet = Some(fleet::Ticket { day, lease });
                }
            } else {
                // Dropping the lease releases the slot it took.
                drop(lease);
                // Everyone left while Redis answered: give the token and the count back.
                if probe {
                    g.cooldown.probe = Probe::Open;
                    let _ = spawn_fleet(shared, "probe release", |f| async move {
                        f.probe_done(false).await
                    });
                }
                spawn_fleet(shared, "refund", move |f| async move {
                    f.refund(spacing, day).await
                });
            }
        }
        Ok(Take::Wait(d)) => g.remote_not_before = Some(now + d),
        // A released lease or probe is announced, which ends the wait early; the poll
        // covers an announcement lost with a pub/sub connection.
        Ok(Take::ProbeBusy | Take::ConcurrencyBusy) => {
            g.remote_not_before = Some(now + fleet::PROBE_POLL)
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
                let _ = now_unix;
            }
            OnError::Local => match shared.fallback.check() {
                Ok(()) => {
                    g.grant_head(shared, out, now);
                }
                Err(nu) => {
                    g.remote_not_before = Some(now + nu.wait_time_from(shared.clock.now()));
                }
            },
        },
    }
}

/// Run a fleet call in the background (from synchronous code such as `Permit::report` and
/// `Drop`), logging a failure: the local gate has already changed, Redis catches up.
pub(super) fn spawn_fleet<F, Fut, T>(
    shared: &Shared,
    what: &'static str,
    f: F,
) -> Option<tokio::task::JoinHandle<()>>
where
    F: FnOnce(Arc<Fleet>) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>> + Send + 'static,
    T: Send + 'static,
{
    let fleet = shared.fleet.as_ref()?;
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let fut = f(Arc::clone(fleet));
    Some(handle.spawn(async move {
        if let Err(e) = fut.await {
            tracing::warn!(what, error = %e, "could not tell the fleet");
        }
    }))
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
                    | fleet::Event::Used { .. } => {
                        g.remote_not_before = None;
                    }
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

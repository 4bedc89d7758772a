//! The waiting room: one FIFO per client, served by start-time fair queueing.
//!
//! Each client's queue has a virtual start time for its head, `head_tag`; the waiter at
//! position `k` starts at `head_tag + k × cost`, with `cost = 1/weight`. The dispatcher always
//! serves the client whose head starts first, `vtime` follows the tags it serves, and a client
//! arriving at an empty queue starts at `max(vtime, where it left off)`. With one client this
//! is plain FIFO; with several, a client that floods only pushes its own later waiters into
//! the future, so a client that sends one request a minute is served almost at once, and under
//! saturation each client gets its weighted share.
//!
//! Tags are derived from positions rather than stored, so a waiter that leaves (deadline,
//! client gone) gives its place back: everyone behind it in its client's queue moves up, and
//! the client is not charged for service it never got. Choosing the next client and counting
//! who is ahead of a newcomer are O(clients), and clients are the bounded configured set.
//!
//! A client's FIFO is a map ordered by waiter id (ids only grow, so id order is arrival
//! order): arriving, being served and leaving from anywhere in it are O(log n). A `VecDeque`
//! made leaving from the middle O(n): 10,000 waiters hanging up in random order cost 1.8–2.0 µs
//! each under the lock; with the map, 0.57–0.65 µs (115–126 ns at 10, where the deque's 76–98
//! ns was cheaper; BENCHMARKS.md, fifth session).
//!
//! The queue only orders; it knows nothing about tokens, time or responses. Depth is exact.

use std::collections::BTreeMap;

use tokio::time::Instant;

use crate::clients::ClientId;
use crate::clients::ClientTable;

/// One unit of virtual time for a weight-1 client. Weights are ≤ 1000, so `SCALE / weight`
/// stays exact to well under a part per million.
const SCALE: u64 = 1 << 40;

pub struct Waiter<T> {
    pub id: u64,
    pub client: ClientId,
    pub deadline: Instant,
    pub enqueued: Instant,
    pub payload: T,
}

struct ClientQueue<T> {
    /// Which client this is (the queues are the table's rows, in its order).
    id: ClientId,
    cost: u64,
    /// Virtual start of the head waiter; while the queue is empty, where the client left off.
    head_tag: u64,
    /// By id, which is arrival order.
    waiters: BTreeMap<u64, Waiter<T>>,
}

impl<T> ClientQueue<T> {
    /// Virtual start of the waiter at `pos`.
    fn tag_at(&self, pos: usize) -> u64 {
        self.head_tag
            .saturating_add(self.cost.saturating_mul(pos as u64))
    }

    /// How many of this client's waiters start no later than `tag`.
    fn starting_by(&self, tag: u64) -> usize {
        if self.waiters.is_empty() || tag < self.head_tag {
            return 0;
        }
        let n = (tag - self.head_tag) / self.cost.max(1) + 1;
        (n.min(self.waiters.len() as u64)) as usize
    }
}

pub struct FairQueue<T> {
    clients: Vec<ClientQueue<T>>,
    /// Requests retried after an upstream 429: served before everyone else (the first of
    /// them is the probe when the cooldown ends), FIFO among themselves (by id).
    urgent: BTreeMap<u64, Waiter<T>>,
    /// How many of `urgent` each client has, by the client's row.
    urgent_of: Vec<usize>,
    vtime: u64,
    len: usize,
    next_id: u64,
}

impl<T> FairQueue<T> {
    /// One FIFO per row of `clients`, each with its row's weight (all ≥ 1).
    pub fn new(clients: &ClientTable) -> Self {
        FairQueue {
            clients: clients
                .ids()
                .map(|(id, c)| ClientQueue {
                    id,
                    cost: SCALE / u64::from(c.weight.max(1)),
                    head_tag: 0,
                    waiters: BTreeMap::new(),
                })
                .collect(),
            urgent: BTreeMap::new(),
            urgent_of: vec![0; clients.ids().count()],
            vtime: 0,
            len: 0,
            next_id: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The virtual start a new arrival from `client` would get.
    fn arrival_tag(&self, c: &ClientQueue<T>) -> u64 {
        if c.waiters.is_empty() {
            self.vtime.max(c.head_tag)
        } else {
            c.tag_at(c.waiters.len())
        }
    }

    /// Waiters that would be served before a new arrival from `client`: exact under the
    /// current tags, assuming nobody else arrives first.
    pub fn ahead_of_new(&self, client: ClientId) -> usize {
        let Some(c) = self.clients.get(client.index()) else {
            return self.len;
        };
        let tag = self.arrival_tag(c);
        self.urgent.len()
            + self
                .clients
                .iter()
                .map(|q| q.starting_by(tag))
                .sum::<usize>()
    }

    /// Waiters of `client` queued now.
    pub fn client_len(&self, client: ClientId) -> usize {
        self.clients
            .get(client.index())
            .map_or(0, |c| c.waiters.len())
            + self.urgent_of.get(client.index()).copied().unwrap_or(0)
    }

    /// Queue a retried request ahead of everyone (see `urgent`).
    pub fn push_urgent(
        &mut self,
        client: ClientId,
        deadline: Instant,
        now: Instant,
        payload: T,
    ) -> u64 {
        let w = self.waiter(client, deadline, now, payload);
        let id = w.id;
        if let Some(n) = self.urgent_of.get_mut(client.index()) {
            *n += 1;
        }
        self.urgent.insert(id, w);
        id
    }

    pub fn push(&mut self, client: ClientId, deadline: Instant, now: Instant, payload: T) -> u64 {
        let w = self.waiter(client, deadline, now, payload);
        let id = w.id;
        let vtime = self.vtime;
        let c = &mut self.clients[client.index()];
        if c.waiters.is_empty() {
            c.head_tag = vtime.max(c.head_tag);
        }
        c.waiters.insert(id, w);
        id
    }

    /// A new waiter with the next id, counted in the depth (the caller queues it).
    fn waiter(
        &mut self,
        client: ClientId,
        deadline: Instant,
        now: Instant,
        payload: T,
    ) -> Waiter<T> {
        let id = self.next_id;
        self.next_id += 1;
        self.len += 1;
        Waiter {
            id,
            client,
            deadline,
            enqueued: now,
            payload,
        }
    }

    /// The client whose head is served next.
    #[cfg(test)]
    fn next_client(&self) -> Option<usize> {
        self.clients
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.waiters.is_empty())
            .map(|(i, c)| (c.head_tag, i))
            .min()
            .map(|(_, i)| i)
    }

    #[cfg(test)]
    pub fn pop(&mut self) -> Option<Waiter<T>> {
        let i = self.next_client()?;
        let c = &mut self.clients[i];
        let (_, w) = c.waiters.pop_first()?;
        self.vtime = self.vtime.max(c.head_tag);
        c.head_tag = c.head_tag.saturating_add(c.cost);
        self.len -= 1;
        self.after_removal();
        Some(w)
    }

    /// The first waiter, in service order, that may go now: clients are taken in the order
    /// their heads start and skipped when `client_ok` says no (a client waiting for its own
    /// rate holds up nobody else); within a client, the first of its first `scan` waiters that
    /// `ok` accepts (a waiter for a cooling model holds up none of its client's other models).
    /// Returns the client and the waiter's id, for [`FairQueue::serve`].
    pub fn find(
        &self,
        mut client_ok: impl FnMut(ClientId) -> bool,
        mut ok: impl FnMut(&Waiter<T>) -> bool,
        scan: usize,
    ) -> Option<(ClientId, u64)> {
        if let Some(w) = self.urgent.values().find(|w| client_ok(w.client) && ok(w)) {
            return Some((w.client, w.id));
        }
        let mut order: Vec<(u64, usize)> = self
            .clients
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.waiters.is_empty())
            .map(|(i, c)| (c.head_tag, i))
            .collect();
        order.sort_unstable();
        for (_, i) in order {
            let c = &self.clients[i];
            if !client_ok(c.id) {
                continue;
            }
            if let Some(w) = c.waiters.values().take(scan).find(|w| ok(w)) {
                return Some((c.id, w.id));
            }
        }
        None
    }

    /// Serve waiter `id` of `client` (found by [`FairQueue::find`]): it leaves the queue and
    /// its client is charged one service, exactly as if it had been at the head.
    pub fn serve(&mut self, client: ClientId, id: u64) -> Option<Waiter<T>> {
        self.take(client, id, true)
    }

    /// For each waiter, how many would be served before it under the current tags: its
    /// client, id and that count.
    pub fn ranks(&self) -> Vec<(ClientId, u64, usize)> {
        let mut out = Vec::with_capacity(self.len);
        let urgent = self.urgent.len();
        for (i, w) in self.urgent.values().enumerate() {
            out.push((w.client, w.id, i));
        }
        for (i, c) in self.clients.iter().enumerate() {
            for (pos, w) in c.waiters.values().enumerate() {
                let tag = c.tag_at(pos);
                let ahead: usize = self
                    .clients
                    .iter()
                    .enumerate()
                    .map(|(j, q)| {
                        if j == i {
                            pos
                        } else {
                            // Ties go to the lower index, as in `next_client`.
                            let t = if j < i { tag } else { tag.saturating_sub(1) };
                            q.starting_by(t)
                        }
                    })
                    .sum();
                out.push((c.id, w.id, urgent + ahead));
            }
        }
        out
    }

    /// Change the clients' weights in place (a reload); the queue keeps its waiters.
    pub fn set_weights(&mut self, clients: &ClientTable) {
        for (c, row) in self.clients.iter_mut().zip(clients) {
            c.cost = SCALE / u64::from(row.weight.max(1));
        }
    }

    /// Remove waiter `id` of `client` if it is still queued. Those behind it move up.
    pub fn remove(&mut self, client: ClientId, id: u64) -> Option<Waiter<T>> {
        self.take(client, id, false)
    }

    /// Take waiter `id` of `client` out of the queue; `charge`: its client is charged one
    /// service (it was served), as if it had been at the head. A retry in the urgent line is
    /// never charged: it was served out of turn once already.
    fn take(&mut self, client: ClientId, id: u64, charge: bool) -> Option<Waiter<T>> {
        if let Some(w) = self.take_urgent(id) {
            return Some(w);
        }
        let c = self.clients.get_mut(client.index())?;
        let w = c.waiters.remove(&id)?;
        if charge {
            self.vtime = self.vtime.max(c.head_tag);
            c.head_tag = c.head_tag.saturating_add(c.cost);
        }
        self.len -= 1;
        self.after_removal();
        Some(w)
    }

    /// Take retried waiter `id` out of the urgent line, if it is there.
    fn take_urgent(&mut self, id: u64) -> Option<Waiter<T>> {
        let w = self.urgent.remove(&id)?;
        if let Some(n) = self.urgent_of.get_mut(w.client.index()) {
            *n = n.saturating_sub(1);
        }
        self.len -= 1;
        self.after_removal();
        Some(w)
    }

    fn after_removal(&mut self) {
        if self.len == 0 {
            // Nothing queued: virtual time restarts so the tags never grow without bound.
            self.vtime = 0;
            for c in &mut self.clients {
                c.head_tag = 0;
            }
        }
    }

    /// Remove and return every waiter for which `pred` holds (used when a gate closes for
    /// longer than they can wait).
    pub fn drain_where(&mut self, mut pred: impl FnMut(&Waiter<T>) -> bool) -> Vec<Waiter<T>> {
        let mut out = Vec::new();
        // Rebuilt from what stays, in order: a map built from sorted entries is built in O(n).
        let mut split = |map: &mut BTreeMap<u64, Waiter<T>>, out: &mut Vec<Waiter<T>>| {
            if !map.values().any(&mut pred) {
                return;
            }
            let mut keep = Vec::with_capacity(map.len());
            for (id, w) in std::mem::take(map) {
                if pred(&w) {
                    out.push(w);
                } else {
                    keep.push((id, w));
                }
            }
            *map = keep.into_iter().collect();
        };
        split(&mut self.urgent, &mut out);
        for n in &mut self.urgent_of {
            *n = 0;
        }
        for w in self.urgent.values() {
            if let Some(n) = self.urgent_of.get_mut(w.client.index()) {
                *n += 1;
            }
        }
        for c in &mut self.clients {
            split(&mut c.waiters, &mut out);
        }
        self.len -= out.len();
        self.after_removal();
        out
    }

    /// When the oldest waiter arrived.
    pub fn oldest(&self) -> Option<Instant> {
        self.clients
            .iter()
            .filter_map(|c| c.waiters.first_key_value().map(|(_, w)| w.enqueued))
            .chain(self.urgent.values().map(|w| w.enqueued))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(weights: &[u32]) -> FairQueue<()> {
        let row = |(i, &weight): (usize, &u32)| crate::clients::ClientSettings {
            name: format!("c{i}").into(),
            weight,
            requests_per_minute: None,
            burst: 1,
            requests_per_day: None,
            max_wait: None,
        };
        let rows: Vec<_> = weights.iter().enumerate().map(row).collect();
        FairQueue::new(&ClientTable::from(rows))
    }

    /// Row `n` of the table `q` built.
    fn c(n: usize) -> ClientId {
        ClientId::test_row(n)
    }

    #[tokio::test(start_paused = true)]
    async fn one_client_is_fifo() {
        let mut q = q(&[1]);
        let now = Instant::now();
        let ids: Vec<_> = (0..5).map(|_| q.push(c(0), now, now, ())).collect();
        assert_eq!(q.ahead_of_new(c(0)), 5);
        let served: Vec<_> = std::iter::from_fn(|| q.pop().map(|w| w.id)).collect();
        assert_eq!(served, ids);
    }

    #[tokio::test(start_paused = true)]
    async fn weights_share_the_service() {
        // client 1 (weight 3) and client 2 (weight 1) both flood.
        let mut q = q(&[1, 3, 1]);
        let now = Instant::now();
        for _ in 0..400 {
            q.push(c(1), now, now, ());
            q.push(c(2), now, now, ());
        }
        let mut served = [0usize; 3];
        for _ in 0..400 {
            served[q.pop().unwrap().client.index()] += 1;
        }
        assert_eq!(served[1], 300);
        assert_eq!(served[2], 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_is_not_starved_by_a_flood() {
        let mut q = q(&[1, 1]);
        let now = Instant::now();
        for _ in 0..1000 {
            q.push(c(0), now, now, ());
        }
        for _ in 0..10 {
            q.pop();
        }
        // The trickling client arrives behind 990 queued requests of the flooder.
        assert!(q.ahead_of_new(c(1)) <= 2);
        q.push(c(1), now, now, ());
        let first_two: Vec<_> = (0..2).map(|_| q.pop().unwrap().client).collect();
        assert!(first_two.contains(&c(1)), "{first_two:?}");
    }

    /// A client whose waiters keep timing out must not be pushed ever further back: a
    /// waiter that leaves gives its place to the ones behind it.
    #[tokio::test(start_paused = true)]
    async fn leaving_waiters_do_not_cost_their_client_its_share() {
        let mut q = q(&[1, 1, 3]);
        let now = Instant::now();
        let mut served = [0usize; 3];
        for round in 0..400 {
            // Both clients keep 20 waiting; the flooder's oldest gives up every round.
            while q.client_len(c(1)) < 20 {
                q.push(c(1), now, now, ());
            }
            while q.client_len(c(2)) < 20 {
                q.push(c(2), now, now, ());
            }
            if round % 2 == 0 {
                let oldest = *q.clients[1].waiters.first_key_value().unwrap().0;
                q.remove(c(1), oldest);
            }
            served[q.pop().unwrap().client.index()] += 1;
        }
        // Weights 1:3 → 100:300, whatever the flooder's abandonment.
        assert!((95..=105).contains(&served[1]), "{served:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn ahead_of_new_counts_the_interleaving() {
        let mut q = q(&[1, 1, 1]);
        let now = Instant::now();
        for _ in 0..10 {
            q.push(c(1), now, now, ());
        }
        // A newcomer of client 2 starts with client 1's head: one of client 1 is served first
        // (ties go to the lower index), then the newcomer.
        assert_eq!(q.ahead_of_new(c(2)), 1);
        assert_eq!(q.ahead_of_new(c(1)), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn removal_keeps_order_and_depth() {
        let mut q = q(&[1]);
        let now = Instant::now();
        let ids: Vec<_> = (0..5).map(|_| q.push(c(0), now, now, ())).collect();
        assert!(q.remove(c(0), ids[2]).is_some());
        assert!(q.remove(c(0), ids[2]).is_none());
        assert_eq!(q.len(), 4);
        let served: Vec<_> = std::iter::from_fn(|| q.pop().map(|w| w.id)).collect();
        assert_eq!(served, vec![ids[0], ids[1], ids[3], ids[4]]);
        assert!(q.is_empty());
    }

    /// Random arrivals, retries, departures from anywhere, services and drains, against a
    /// plain list of who is queued: depth, each client's count (retries included) and each
    /// client's order stay exact.
    #[tokio::test(start_paused = true)]
    async fn random_leaving_keeps_every_count_and_order() {
        let mut q = q(&[1, 2, 1]);
        let now = Instant::now();
        // (id, client, urgent), in arrival order.
        let mut model: Vec<(u64, usize, bool)> = Vec::new();
        let mut rng = crate::test_rng::Xorshift::new();
        let mut rand = |n: usize| rng.below(n);
        for step in 0..20_000 {
            match rand(10) {
                0..=3 => {
                    let cl = rand(3);
                    model.push((q.push(c(cl), now, now, ()), cl, false));
                }
                4 => {
                    let cl = rand(3);
                    model.push((q.push_urgent(c(cl), now, now, ()), cl, true));
                }
                5..=7 if !model.is_empty() => {
                    let (id, cl, _) = model.remove(rand(model.len()));
                    assert_eq!(q.remove(c(cl), id).map(|w| w.id), Some(id), "{step}");
                    assert!(q.remove(c(cl), id).is_none());
                }
                8 => {
                    if let Some(w) = q.pop() {
                        let at = model.iter().position(|m| m.0 == w.id).unwrap();
                        // The head of its client's line.
                        assert!(model[..at].iter().all(|m| m.1 != w.client.index() || m.2));
                        model.remove(at);
                    }
                }
                9 if step % 50 == 0 => {
                    let cl = rand(3);
                    let gone = q.drain_where(|w| w.client == c(cl) && w.id % 2 == 0);
                    assert!(gone.iter().all(|w| w.client == c(cl) && w.id % 2 == 0));
                    let before = model.len();
                    model.retain(|m| !(m.1 == cl && m.0 % 2 == 0));
                    assert_eq!(before - model.len(), gone.len());
                }
                _ => {}
            }
            assert_eq!(q.len(), model.len(), "{step}");
            for cl in 0..3 {
                let want = model.iter().filter(|m| m.1 == cl).count();
                assert_eq!(q.client_len(c(cl)), want, "{step}");
                let ids: Vec<u64> = q.clients[cl].waiters.values().map(|w| w.id).collect();
                let want: Vec<u64> = model
                    .iter()
                    .filter(|m| m.1 == cl && !m.2)
                    .map(|m| m.0)
                    .collect();
                assert_eq!(ids, want, "{step}");
            }
            let urgent: Vec<u64> = q.urgent.values().map(|w| w.id).collect();
            let want: Vec<u64> = model.iter().filter(|m| m.2).map(|m| m.0).collect();
            assert_eq!(urgent, want, "{step}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn drain_where_takes_only_matching() {
        let mut q = q(&[1, 1]);
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(10);
        q.push(c(0), now, now, ());
        q.push(c(1), later, now, ());
        q.push(c(0), later, now, ());
        let shed = q.drain_where(|w| w.deadline < later);
        assert_eq!(shed.len(), 1);
        assert_eq!(q.len(), 2);
    }
}

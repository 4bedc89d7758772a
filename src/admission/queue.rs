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
//! The queue only orders; it knows nothing about tokens, time or responses. Depth is exact.

use std::collections::VecDeque;

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
    waiters: VecDeque<Waiter<T>>,
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
    /// them is the probe when the cooldown ends), FIFO among themselves.
    urgent: VecDeque<Waiter<T>>,
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
                    waiters: VecDeque::new(),
                })
                .collect(),
            urgent: VecDeque::new(),
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
            + self.urgent.iter().filter(|w| w.client == client).count()
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
        self.urgent.push_back(w);
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
        c.waiters.push_back(w);
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
        let w = c.waiters.pop_front()?;
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
        if let Some(w) = self.urgent.iter().find(|w| client_ok(w.client) && ok(w)) {
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
            if let Some(w) = c.waiters.iter().take(scan).find(|w| ok(w)) {
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
        for (i, w) in self.urgent.iter().enumerate() {
            out.push((w.client, w.id, i));
        }
        for (i, c) in self.clients.iter().enumerate() {
            for (pos, w) in c.waiters.iter().enumerate() {
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
        let pos = c.waiters.binary_search_by_key(&id, |w| w.id).ok()?;
        let w = c.waiters.remove(pos)?;
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
        let pos = self.urgent.iter().position(|w| w.id == id)?;
        let w = self.urgent.remove(pos)?;
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
        if self.urgent.iter().any(&mut pred) {
            for w in std::mem::take(&mut self.urgent) {
                if pred(&w) {
                    out.push(w);
                } else {
                    self.urgent.push_back(w);
                }
            }
        }
        for c in &mut self.clients {
            if !c.waiters.iter().any(&mut pred) {
                continue;
            }
            let old = std::mem::take(&mut c.waiters);
            for w in old {
                if pred(&w) {
                    out.push(w);
                } else {
                    c.waiters.push_back(w);
                }
            }
        }
        self.len -= out.len();
        self.after_removal();
        out
    }

    /// When the oldest waiter arrived.
    pub fn oldest(&self) -> Option<Instant> {
        self.clients
            .iter()
            .filter_map(|c| c.waiters.front().map(|w| w.enqueued))
            .chain(self.urgent.iter().map(|w| w.enqueued))
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
                let oldest = q.clients[1].waiters.front().map(|w| w.id).unwrap();
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

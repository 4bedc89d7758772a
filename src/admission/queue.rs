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
//! A client's FIFO is a doubly linked list threaded through one slab of waiters shared by
//! every line, and a waiter's id names its slot: arriving, being served and leaving from
//! anywhere are O(1), whatever the depth. A `VecDeque` made leaving from the middle O(n)
//! (10,000 waiters hanging up in random order cost 1.8–2.0 µs each under the lock); an ordered
//! map made it O(log n) (670 instructions a leaving at 10 queued, 920 at 10,000; the slab's
//! are 470 and 505). BENCHMARKS.md has the timings.
//!
//! The queue only orders; it knows nothing about tokens, time or responses. Depth is exact.

use tokio::time::Instant;

use crate::clients::ClientId;
use crate::clients::ClientTable;

/// One unit of virtual time for a weight-1 client. Weights are ≤ 1000, so `SCALE / weight`
/// stays exact to well under a part per million.
const SCALE: u64 = 1 << 40;

/// No slot: the end of a line, or of the free list.
const NIL: u32 = u32::MAX;

/// The slab keeps at most this many slots' room once the queue is empty again, so a burst of
/// 10,000 waiters does not hold their memory after they are gone.
const KEPT_SLOTS: usize = 256;

pub struct Waiter<T> {
    /// Unique while it is queued: the push's sequence number above, its slot below.
    pub id: u64,
    pub client: ClientId,
    pub deadline: Instant,
    pub enqueued: Instant,
    pub payload: T,
}

/// A waiter's slot when it is queued: its place in its line.
struct Node<T> {
    waiter: Waiter<T>,
    prev: u32,
    next: u32,
    /// In the urgent line rather than its client's.
    urgent: bool,
}

enum Slot<T> {
    Used(Node<T>),
    Free { next: u32 },
}

/// One FIFO: its ends in the slab and its length.
#[derive(Clone, Copy)]
struct Line {
    head: u32,
    tail: u32,
    len: usize,
}

impl Line {
    const EMPTY: Line = Line {
        head: NIL,
        tail: NIL,
        len: 0,
    };

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

struct ClientQueue {
    /// Which client this is (the queues are the table's rows, in its order).
    id: ClientId,
    cost: u64,
    /// Virtual start of the head waiter; while the queue is empty, where the client left off.
    head_tag: u64,
    /// Its waiters in arrival order.
    line: Line,
}

impl ClientQueue {
    /// Virtual start of the waiter at `pos`.
    fn tag_at(&self, pos: usize) -> u64 {
        self.head_tag
            .saturating_add(self.cost.saturating_mul(pos as u64))
    }

    /// How many of this client's waiters start no later than `tag`.
    fn starting_by(&self, tag: u64) -> usize {
        if self.line.is_empty() || tag < self.head_tag {
            return 0;
        }
        let n = (tag - self.head_tag) / self.cost.max(1) + 1;
        (n.min(self.line.len as u64)) as usize
    }
}

/// The waiters in one line, front to back.
struct Walk<'a, T> {
    slots: &'a [Slot<T>],
    at: u32,
}

impl<'a, T> Iterator for Walk<'a, T> {
    type Item = &'a Waiter<T>;

    fn next(&mut self) -> Option<&'a Waiter<T>> {
        match self.slots.get(self.at as usize)? {
            Slot::Used(n) => {
                self.at = n.next;
                Some(&n.waiter)
            }
            Slot::Free { .. } => None,
        }
    }
}

pub struct FairQueue<T> {
    /// Every queued waiter, each in one line; free slots chained from `free`.
    slots: Vec<Slot<T>>,
    free: u32,
    clients: Vec<ClientQueue>,
    /// Requests retried after an upstream 429: served before everyone else (the first of
    /// them is the probe when the cooldown ends), FIFO among themselves.
    urgent: Line,
    /// How many of `urgent` each client has, by the client's row.
    urgent_of: Vec<usize>,
    vtime: u64,
    len: usize,
    /// Pushes so far (wrapping), the upper half of each id: a stale id whose slot was taken
    /// again names another push and is refused.
    pushes: u32,
}

impl<T> FairQueue<T> {
    /// One FIFO per row of `clients`, each with its row's weight (all ≥ 1).
    pub fn new(clients: &ClientTable) -> Self {
        FairQueue {
            slots: Vec::new(),
            free: NIL,
            clients: clients
                .ids()
                .map(|(id, c)| ClientQueue {
                    id,
                    cost: SCALE / u64::from(c.weight.max(1)),
                    head_tag: 0,
                    line: Line::EMPTY,
                })
                .collect(),
            urgent: Line::EMPTY,
            urgent_of: vec![0; clients.ids().count()],
            vtime: 0,
            len: 0,
            pushes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn walk(&self, line: &Line) -> Walk<'_, T> {
        Walk {
            slots: &self.slots,
            at: line.head,
        }
    }

    /// The virtual start a new arrival from `client` would get.
    fn arrival_tag(&self, c: &ClientQueue) -> u64 {
        if c.line.is_empty() {
            self.vtime.max(c.head_tag)
        } else {
            c.tag_at(c.line.len)
        }
    }

    /// Waiters that would be served before a new arrival from `client`: exact under the
    /// current tags, assuming nobody else arrives first.
    pub fn ahead_of_new(&self, client: ClientId) -> usize {
        let Some(c) = self.clients.get(client.index()) else {
            return self.len;
        };
        let tag = self.arrival_tag(c);
        self.urgent.len
            + self
                .clients
                .iter()
                .map(|q| q.starting_by(tag))
                .sum::<usize>()
    }

    /// Waiters of `client` queued now.
    pub fn client_len(&self, client: ClientId) -> usize {
        self.clients.get(client.index()).map_or(0, |c| c.line.len)
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
        if let Some(n) = self.urgent_of.get_mut(client.index()) {
            *n += 1;
        }
        let mut line = self.urgent;
        let id = self.append(&mut line, true, client, deadline, now, payload);
        self.urgent = line;
        id
    }

    pub fn push(&mut self, client: ClientId, deadline: Instant, now: Instant, payload: T) -> u64 {
        let vtime = self.vtime;
        let c = &mut self.clients[client.index()];
        if c.line.is_empty() {
            c.head_tag = vtime.max(c.head_tag);
        }
        let mut line = c.line;
        let id = self.append(&mut line, false, client, deadline, now, payload);
        self.clients[client.index()].line = line;
        id
    }

    /// A new waiter with the next id at the back of `line`, counted in the depth.
    fn append(
        &mut self,
        line: &mut Line,
        urgent: bool,
        client: ClientId,
        deadline: Instant,
        now: Instant,
        payload: T,
    ) -> u64 {
        let slot = match self.slots.get(self.free as usize) {
            Some(&Slot::Free { next }) => std::mem::replace(&mut self.free, next),
            _ => {
                // The free list is empty: a new slot at the end. Depth is bounded by
                // `queue.max_depth` (≤ 10⁷) plus the retries in flight, far below `NIL`.
                self.slots.push(Slot::Free { next: NIL });
                (self.slots.len() - 1) as u32
            }
        };
        let id = (u64::from(self.pushes) << 32) | u64::from(slot);
        self.pushes = self.pushes.wrapping_add(1);
        self.len += 1;
        self.slots[slot as usize] = Slot::Used(Node {
            waiter: Waiter {
                id,
                client,
                deadline,
                enqueued: now,
                payload,
            },
            prev: line.tail,
            next: NIL,
            urgent,
        });
        match self.slots.get_mut(line.tail as usize) {
            Some(Slot::Used(tail)) => tail.next = slot,
            _ => line.head = slot,
        }
        line.tail = slot;
        line.len += 1;
        id
    }

    /// Queued waiter `id`'s slot and place, if it is still queued.
    fn queued(&self, id: u64) -> Option<(u32, &Node<T>)> {
        let slot = id as u32;
        match self.slots.get(slot as usize) {
            Some(Slot::Used(n)) if n.waiter.id == id => Some((slot, n)),
            _ => None,
        }
    }

    /// Unlink `slot` from `line`, which holds it, and free it; `None` if it is not queued.
    fn unlink(&mut self, line: &mut Line, slot: u32) -> Option<Waiter<T>> {
        let cell = self.slots.get_mut(slot as usize)?;
        let node = match std::mem::replace(cell, Slot::Free { next: self.free }) {
            Slot::Used(node) => node,
            free => {
                *cell = free;
                return None;
            }
        };
        self.free = slot;
        match self.slots.get_mut(node.prev as usize) {
            Some(Slot::Used(p)) => p.next = node.next,
            _ => line.head = node.next,
        }
        match self.slots.get_mut(node.next as usize) {
            Some(Slot::Used(n)) => n.prev = node.prev,
            _ => line.tail = node.prev,
        }
        line.len -= 1;
        self.len -= 1;
        Some(node.waiter)
    }

    /// The client whose head is served next.
    #[cfg(test)]
    fn next_client(&self) -> Option<usize> {
        self.clients
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.line.is_empty())
            .map(|(i, c)| (c.head_tag, i))
            .min()
            .map(|(_, i)| i)
    }

    #[cfg(test)]
    pub fn pop(&mut self) -> Option<Waiter<T>> {
        let i = self.next_client()?;
        let c = &self.clients[i];
        let (client, id) = (c.id, self.walk(&c.line).next()?.id);
        self.serve(client, id)
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
        if let Some(w) = self
            .walk(&self.urgent)
            .find(|w| client_ok(w.client) && ok(w))
        {
            return Some((w.client, w.id));
        }
        let mut order: Vec<(u64, usize)> = self
            .clients
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.line.is_empty())
            .map(|(i, c)| (c.head_tag, i))
            .collect();
        order.sort_unstable();
        for (_, i) in order {
            let c = &self.clients[i];
            if !client_ok(c.id) {
                continue;
            }
            if let Some(w) = self.walk(&c.line).take(scan).find(|w| ok(w)) {
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
        let urgent = self.urgent.len;
        for (i, w) in self.walk(&self.urgent).enumerate() {
            out.push((w.client, w.id, i));
        }
        for (i, c) in self.clients.iter().enumerate() {
            for (pos, w) in self.walk(&c.line).enumerate() {
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
        let (slot, node) = self.queued(id)?;
        let w = if node.urgent {
            let mut line = self.urgent;
            let w = self.unlink(&mut line, slot)?;
            self.urgent = line;
            if let Some(n) = self.urgent_of.get_mut(w.client.index()) {
                *n = n.saturating_sub(1);
            }
            w
        } else {
            if node.waiter.client != client {
                return None;
            }
            let mut line = self.clients.get(client.index())?.line;
            let w = self.unlink(&mut line, slot)?;
            let c = &mut self.clients[client.index()];
            c.line = line;
            if charge {
                self.vtime = self.vtime.max(c.head_tag);
                c.head_tag = c.head_tag.saturating_add(c.cost);
            }
            w
        };
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
            // Every slot is free: the slab starts over, and gives back a burst's room.
            self.slots.clear();
            self.slots.shrink_to(KEPT_SLOTS);
            self.free = NIL;
        }
    }

    /// Remove and return every waiter for which `pred` holds (used when a gate closes for
    /// longer than they can wait), in each line's order.
    pub fn drain_where(&mut self, mut pred: impl FnMut(&Waiter<T>) -> bool) -> Vec<Waiter<T>> {
        let mut out = Vec::new();
        let mut split = |q: &mut Self, line: &mut Line, out: &mut Vec<Waiter<T>>| {
            let mut at = line.head;
            while let Some(Slot::Used(n)) = q.slots.get(at as usize) {
                let (here, next) = (at, n.next);
                if pred(&n.waiter) {
                    out.extend(q.unlink(line, here));
                }
                at = next;
            }
        };
        let mut line = self.urgent;
        let before = out.len();
        split(self, &mut line, &mut out);
        self.urgent = line;
        for w in &out[before..] {
            if let Some(n) = self.urgent_of.get_mut(w.client.index()) {
                *n = n.saturating_sub(1);
            }
        }
        for i in 0..self.clients.len() {
            let mut line = self.clients[i].line;
            split(self, &mut line, &mut out);
            self.clients[i].line = line;
        }
        self.after_removal();
        out
    }

    /// When the oldest waiter arrived.
    pub fn oldest(&self) -> Option<Instant> {
        self.clients
            .iter()
            .map(|c| &c.line)
            .chain(std::iter::once(&self.urgent))
            .filter_map(|line| self.walk(line).next().map(|w| w.enqueued))
            .min()
    }

    /// The ids in `client`'s line (or the urgent line), front to back.
    #[cfg(test)]
    fn ids(&self, client: Option<usize>) -> Vec<u64> {
        let line = client.map_or(&self.urgent, |i| &self.clients[i].line);
        self.walk(line).map(|w| w.id).collect()
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
                let oldest = q.ids(Some(1))[0];
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

    /// A waiter's slot is taken again by the next arrival once it leaves, and again from the
    /// start once the queue empties: an id that left must never remove who holds its slot now.
    #[tokio::test(start_paused = true)]
    async fn an_id_that_left_never_names_its_slots_next_waiter() {
        let mut q = q(&[1, 1]);
        let now = Instant::now();
        let keep = q.push(c(0), now, now, ());
        let gone = q.push(c(0), now, now, ());
        assert!(q.remove(c(0), gone).is_some());
        let next = q.push(c(0), now, now, ());
        assert_eq!(next as u32, gone as u32, "the freed slot is reused");
        assert!(q.remove(c(0), gone).is_none());
        assert!(q.serve(c(0), gone).is_none());
        // Wrong client for a live id: refused, as before.
        assert!(q.remove(c(1), next).is_none());
        assert_eq!(q.ids(Some(0)), vec![keep, next]);
        // Emptied: the slab starts over, and the old ids stay dead.
        assert!(q.remove(c(0), keep).is_some());
        assert!(q.remove(c(0), next).is_some());
        assert!(q.is_empty());
        let fresh = q.push(c(0), now, now, ());
        assert_eq!(fresh as u32, keep as u32);
        for stale in [keep, gone, next] {
            assert!(q.remove(c(0), stale).is_none());
        }
        assert_eq!(q.len(), 1);
        assert_eq!(q.ids(Some(0)), vec![fresh]);
    }

    /// Drained waiters leave their lines linked: the rest keep their order, and the freed
    /// slots are reused without losing anyone.
    #[tokio::test(start_paused = true)]
    async fn drain_keeps_the_lines_linked() {
        let mut q = q(&[1]);
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(10);
        let ids: Vec<u64> = (0..8)
            .map(|i| q.push(c(0), if i % 3 == 0 { now } else { later }, now, ()))
            .collect();
        let r = q.push_urgent(c(0), now, now, ());
        let gone = q.drain_where(|w| w.deadline < later);
        let gone: Vec<u64> = gone.iter().map(|w| w.id).collect();
        assert_eq!(gone, vec![r, ids[0], ids[3], ids[6]]);
        assert_eq!(q.client_len(c(0)), 5);
        let more: Vec<u64> = (0..4).map(|_| q.push(c(0), later, now, ())).collect();
        let want: Vec<u64> = [1, 2, 4, 5, 7]
            .iter()
            .map(|&i| ids[i])
            .chain(more)
            .collect();
        assert_eq!(q.ids(Some(0)), want);
        let served: Vec<u64> = std::iter::from_fn(|| q.pop().map(|w| w.id)).collect();
        assert_eq!(served, want);
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
                let ids = q.ids(Some(cl));
                let want: Vec<u64> = model
                    .iter()
                    .filter(|m| m.1 == cl && !m.2)
                    .map(|m| m.0)
                    .collect();
                assert_eq!(ids, want, "{step}");
            }
            let urgent = q.ids(None);
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

//! The waiting room: one FIFO per client, served by start-time fair queueing.
//!
//! Each waiter is tagged on arrival with a virtual start time `max(vtime, client.last_finish)`
//! and its client's `last_finish` advances by `1/weight`. The dispatcher always serves the
//! client whose head has the smallest tag, and `vtime` follows the tags it serves. With one
//! client this is plain FIFO; with several, a client that floods only pushes its own tags into
//! the future, so a client that sends one request a minute is served almost at once, and under
//! saturation each client gets its weighted share. Choosing the next client is O(clients),
//! and clients are the bounded configured set.
//!
//! The queue only orders; it knows nothing about tokens, time or responses. Waiters are removed
//! eagerly when their client leaves (binary search by id, ids grow within a client), so the
//! depth is always exact.

use std::collections::VecDeque;

use tokio::time::Instant;

/// Index of a client in the configured set; 0 is `default`.
pub type ClientId = usize;

/// One unit of virtual time for a weight-1 client. Weights are ≤ 1000, so `SCALE / weight`
/// stays exact to well under a part per million.
const SCALE: u64 = 1 << 40;

pub struct Waiter<T> {
    pub id: u64,
    pub client: ClientId,
    tag: u64,
    pub deadline: Instant,
    pub enqueued: Instant,
    pub payload: T,
}

struct ClientQueue<T> {
    cost: u64,
    last_finish: u64,
    waiters: VecDeque<Waiter<T>>,
}

pub struct FairQueue<T> {
    clients: Vec<ClientQueue<T>>,
    vtime: u64,
    len: usize,
    next_id: u64,
}

impl<T> FairQueue<T> {
    /// `weights[i]` is client i's weight (all ≥ 1).
    pub fn new(weights: &[u32]) -> Self {
        FairQueue {
            clients: weights
                .iter()
                .map(|&w| ClientQueue {
                    cost: SCALE / u64::from(w.max(1)),
                    last_finish: 0,
                    waiters: VecDeque::new(),
                })
                .collect(),
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

    /// Waiters that would be served before a new arrival from `client`: exact under the
    /// current tags, assuming nobody else arrives first.
    pub fn ahead_of_new(&self, client: ClientId) -> usize {
        let Some(c) = self.clients.get(client) else {
            return self.len;
        };
        let tag = self.vtime.max(c.last_finish);
        self.clients
            .iter()
            .map(|q| q.waiters.partition_point(|w| w.tag <= tag))
            .sum()
    }

    /// Waiters of `client` queued now.
    pub fn client_len(&self, client: ClientId) -> usize {
        self.clients.get(client).map_or(0, |c| c.waiters.len())
    }

    pub fn push(&mut self, client: ClientId, deadline: Instant, now: Instant, payload: T) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let vtime = self.vtime;
        let c = &mut self.clients[client];
        let tag = vtime.max(c.last_finish);
        c.last_finish = tag.saturating_add(c.cost);
        c.waiters.push_back(Waiter {
            id,
            client,
            tag,
            deadline,
            enqueued: now,
            payload,
        });
        self.len += 1;
        id
    }

    /// The client whose head is served next.
    fn next_client(&self) -> Option<usize> {
        self.clients
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.waiters.front().map(|w| (w.tag, i)))
            .min()
            .map(|(_, i)| i)
    }

    /// The waiter that would be served next.
    pub fn peek(&self) -> Option<&Waiter<T>> {
        self.next_client()
            .and_then(|i| self.clients[i].waiters.front())
    }

    pub fn pop(&mut self) -> Option<Waiter<T>> {
        let i = self.next_client()?;
        let w = self.clients[i].waiters.pop_front()?;
        self.vtime = self.vtime.max(w.tag);
        self.len -= 1;
        self.after_removal(i);
        Some(w)
    }

    /// Remove waiter `id` of `client` if it is still queued.
    pub fn remove(&mut self, client: ClientId, id: u64) -> Option<Waiter<T>> {
        let c = self.clients.get_mut(client)?;
        let pos = c.waiters.binary_search_by_key(&id, |w| w.id).ok()?;
        let w = c.waiters.remove(pos)?;
        self.len -= 1;
        self.after_removal(client);
        Some(w)
    }

    /// A client that leaves the queue entirely must not keep a claim on future turns (its
    /// `last_finish` would otherwise hold tags from a burst long gone).
    fn after_removal(&mut self, client: ClientId) {
        let c = &mut self.clients[client];
        if c.waiters.is_empty() {
            c.last_finish = c.last_finish.min(self.vtime);
        }
        if self.len == 0 {
            // Nothing queued: virtual time restarts so the tags never grow without bound.
            self.vtime = 0;
            for c in &mut self.clients {
                c.last_finish = 0;
            }
        }
    }

    /// Remove and return every waiter for which `pred` holds (used when a gate closes for
    /// longer than they can wait).
    pub fn drain_where(&mut self, mut pred: impl FnMut(&Waiter<T>) -> bool) -> Vec<Waiter<T>> {
        let mut out = Vec::new();
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
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
        for i in 0..self.clients.len() {
            self.after_removal(i);
        }
        out
    }

    /// When the oldest waiter arrived.
    pub fn oldest(&self) -> Option<Instant> {
        self.clients
            .iter()
            .filter_map(|c| c.waiters.front().map(|w| w.enqueued))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(weights: &[u32]) -> FairQueue<()> {
        FairQueue::new(weights)
    }

    #[tokio::test(start_paused = true)]
    async fn one_client_is_fifo() {
        let mut q = q(&[1]);
        let now = Instant::now();
        let ids: Vec<_> = (0..5).map(|_| q.push(0, now, now, ())).collect();
        assert_eq!(q.ahead_of_new(0), 5);
        let served: Vec<_> = std::iter::from_fn(|| q.pop().map(|w| w.id)).collect();
        assert_eq!(served, ids);
    }

    #[tokio::test(start_paused = true)]
    async fn weights_share_the_service() {
        // client 1 (weight 3) and client 2 (weight 1) both flood.
        let mut q = q(&[1, 3, 1]);
        let now = Instant::now();
        for _ in 0..400 {
            q.push(1, now, now, ());
            q.push(2, now, now, ());
        }
        let mut served = [0usize; 3];
        for _ in 0..400 {
            served[q.pop().unwrap().client] += 1;
        }
        assert_eq!(served[1], 300);
        assert_eq!(served[2], 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_is_not_starved_by_a_flood() {
        let mut q = q(&[1, 1]);
        let now = Instant::now();
        for _ in 0..1000 {
            q.push(0, now, now, ());
        }
        for _ in 0..10 {
            q.pop();
        }
        // The trickling client arrives behind 990 queued requests of the flooder.
        assert!(q.ahead_of_new(1) <= 2);
        q.push(1, now, now, ());
        let first_two: Vec<_> = (0..2).map(|_| q.pop().unwrap().client).collect();
        assert!(first_two.contains(&1), "{first_two:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn removal_keeps_order_and_depth() {
        let mut q = q(&[1]);
        let now = Instant::now();
        let ids: Vec<_> = (0..5).map(|_| q.push(0, now, now, ())).collect();
        assert!(q.remove(0, ids[2]).is_some());
        assert!(q.remove(0, ids[2]).is_none());
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
        q.push(0, now, now, ());
        q.push(1, later, now, ());
        q.push(0, later, now, ());
        let shed = q.drain_where(|w| w.deadline < later);
        assert_eq!(shed.len(), 1);
        assert_eq!(q.len(), 2);
    }
}

//! The bytes of request bodies read before admission (to learn their model) and held while
//! their requests wait. Without a bound of their own they could reach `queue.max_depth` ×
//! `server.max_request_body` (4 GB with the defaults); `queue.max_body_bytes` bounds them
//! together. A request whose body does not fit is shed at once as `queue_full`, like one that
//! finds the queue's depth reached: nothing of it was sent or counted. A request waiting again
//! for a retry holds the body it kept in the same bound; a retry that does not fit is not made.
//!
//! One atomic, no lock: each request holds a [`Hold`] that grows as its body is read and gives
//! every byte back when it is dropped (admitted, shed, or its client gone).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct HeldBodies {
    bytes: AtomicU64,
    /// `queue.max_body_bytes`, set at start and by a reload.
    limit: AtomicU64,
}

impl HeldBodies {
    pub fn new(limit: u64) -> HeldBodies {
        HeldBodies {
            bytes: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
        }
    }

    /// The bound in force; a hold taken before a change keeps the bound it was taken with.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// The bytes held now, by every waiting request together.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// An empty hold for one request's body, within the limit in force for all of them.
    pub fn hold(&self) -> Hold<'_> {
        Hold {
            held: self,
            bytes: 0,
            limit: self.limit(),
        }
    }
}

/// One request's share of [`HeldBodies`]; given back when dropped.
#[derive(Debug)]
pub struct Hold<'a> {
    held: &'a HeldBodies,
    bytes: u64,
    limit: u64,
}

impl Hold<'_> {
    /// What this request holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Hold the body at `total` bytes (never less than held already). Refused when the bodies
    /// held together would pass the limit, unless this is the only body held: one body always
    /// fits, so a body larger than the limit (but within `server.max_request_body`) waits its
    /// turn instead of being refused for ever.
    pub fn grow_to(&mut self, total: u64) -> bool {
        let more = total.saturating_sub(self.bytes);
        if more == 0 {
            return true;
        }
        let mut now = self.held.bytes.load(Ordering::Relaxed);
        loop {
            // `now` includes this hold's own bytes (only its drop takes them out).
            let others = now.saturating_sub(self.bytes);
            let next = now.saturating_add(more);
            if next > self.limit && others > 0 {
                return false;
            }
            match self.held.bytes.compare_exchange_weak(
                now,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.bytes += more;
                    return true;
                }
                Err(seen) => now = seen,
            }
        }
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.held.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_share_the_limit_and_give_back_on_drop() {
        let held = HeldBodies::new(100);
        let mut a = held.hold();
        assert!(a.grow_to(60));
        assert!(a.grow_to(40), "a body never shrinks its hold");
        assert_eq!(a.bytes(), 60);
        let mut b = held.hold();
        assert!(b.grow_to(40));
        assert_eq!(held.bytes(), 100);
        let mut c = held.hold();
        assert!(!c.grow_to(1), "full: the third body is refused");
        assert_eq!(held.bytes(), 100, "a refusal takes nothing");
        drop(a);
        assert_eq!(held.bytes(), 40);
        assert!(c.grow_to(60));
        drop((b, c));
        assert_eq!(held.bytes(), 0);
    }

    #[test]
    fn a_lone_body_always_fits() {
        let held = HeldBodies::new(10);
        let mut big = held.hold();
        assert!(
            big.grow_to(1_000),
            "nothing else held: it may wait its turn"
        );
        let mut small = held.hold();
        assert!(!small.grow_to(1), "but nothing joins it");
        drop(big);
        assert!(small.grow_to(10));
    }

    #[test]
    fn a_body_that_grows_past_the_limit_is_refused_while_others_wait() {
        let held = HeldBodies::new(100);
        let mut first = held.hold();
        assert!(first.grow_to(50));
        let mut second = held.hold();
        assert!(second.grow_to(30));
        assert!(second.grow_to(50));
        assert!(!second.grow_to(51));
        assert_eq!(second.bytes(), 50);
        assert_eq!(held.bytes(), 100);
    }
}

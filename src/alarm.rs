//! A deadline timer kept for the life of a connection (or a body) and moved at each use.
//!
//! A fresh [`tokio::time::Sleep`] for every wait (what `tokio::time::timeout` makes) is put
//! into the runtime's timer wheel when first polled and taken out again when dropped, under
//! the driver's lock each way: about 1k instructions a wait, twice a request on a kept-alive
//! connection (the wait for the next head, the wait for the upstream's answer; BENCHMARKS.md,
//! "twelfth session"). A registered timer moved to a later deadline only records the new one
//! (tokio's `extend_expiration`, one atomic exchange); the wheel finds it moved when it
//! reaches the old one and files it again. So an [`Alarm`] is set for each wait and never
//! disarmed: set again for the next wait, nearly always later, it costs next to nothing. A
//! body's idle timer (`body.rs`) is one too, moved at each wait for a chunk.
//!
//! What that leaves: a timer that goes off between waits wakes the task that last polled it
//! once, for nothing (a task that has ended is not run again; its memory is kept until then,
//! at most the wait's length). An alarm set earlier than before (a shorter timeout after a
//! reload) is filed again, as a fresh timer is.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// A timer made on the first [`Alarm::set`] and kept; [`Default`] has none yet.
#[derive(Debug, Default)]
pub struct Alarm(Option<Pin<Box<Sleep>>>);

impl Alarm {
    /// An alarm with no timer yet: nothing is allocated until it is first set.
    pub const fn new() -> Alarm {
        Alarm(None)
    }

    /// Whether it has a timer (it has been set).
    #[cfg(test)]
    pub(crate) fn is_made(&self) -> bool {
        self.0.is_some()
    }

    /// Go off at `deadline` (instead of any deadline set before).
    pub fn set(&mut self, deadline: Instant) {
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => self.0 = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }
}

/// Ready once the deadline last set has passed; never ready before it is first set.
impl Future for Alarm {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn poll(alarm: &mut Alarm) -> Poll<()> {
        Pin::new(alarm).poll(&mut Context::from_waker(std::task::Waker::noop()))
    }

    #[tokio::test(start_paused = true)]
    async fn it_goes_off_at_the_deadline_last_set_whether_later_or_earlier() {
        let start = Instant::now();
        let mut alarm = Alarm::new();
        assert_eq!(poll(&mut alarm), Poll::Pending, "not set: never ready");

        alarm.set(start + Duration::from_secs(10));
        assert_eq!(poll(&mut alarm), Poll::Pending);
        // Moved later while registered: the old deadline passes without it going off.
        alarm.set(start + Duration::from_secs(30));
        tokio::time::sleep_until(start + Duration::from_secs(20)).await;
        assert_eq!(poll(&mut alarm), Poll::Pending);
        (&mut alarm).await;
        assert_eq!(Instant::now(), start + Duration::from_secs(30));

        // Set again after it went off, then moved earlier.
        alarm.set(start + Duration::from_secs(90));
        assert_eq!(poll(&mut alarm), Poll::Pending);
        alarm.set(start + Duration::from_secs(40));
        (&mut alarm).await;
        assert_eq!(Instant::now(), start + Duration::from_secs(40));

        // A deadline already past: ready at once.
        alarm.set(start);
        assert_eq!(poll(&mut alarm), Poll::Ready(()));
    }
}

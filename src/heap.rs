//! Giving freed heap back to the operating system after a deep queue has drained.
//!
//! Ten thousand queued requests take a couple of hundred MiB (their connections' buffers and
//! futures); when they have been served, glibc's allocator keeps the freed memory in its
//! arenas, so the process's RSS stays at its peak for good (BENCHMARKS.md, "Scale"). A
//! `malloc_trim(0)` once the queue is empty again returns it. Only after a deep queue, and at
//! most once per drain: trimming walks the whole heap, which is not free, and there is nothing
//! to give back after ordinary traffic. Other allocators (musl's) return memory themselves;
//! there this does nothing.
//!
//! Deliberately not here: choosing an allocator (glibc's is kept, no dependency for this).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::admission::Admission;

/// How often the queue depth is looked at: a drain of thousands of requests takes seconds, and
/// a look is one lock.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// A queue this deep holds megabytes worth giving back (about 10 KiB per queued request).
const DEEP_QUEUE: usize = 500;

/// Run until `stop`: after the queue has been at least [`DEEP_QUEUE`] deep, trim the heap once
/// it is empty again.
pub async fn trim_after_drain(admission: Arc<Admission>, mut stop: watch::Receiver<bool>) {
    let mut was_deep = false;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
        let depth = admission.queue_depth();
        if depth >= DEEP_QUEUE {
            was_deep = true;
        } else if was_deep && depth == 0 {
            was_deep = false;
            // Off the workers: a trim of a large heap takes milliseconds.
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only rearranges the allocator's own free lists and unmaps free
    // pages; it touches no memory the program holds and is thread-safe in glibc.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

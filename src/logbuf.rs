//! Where the log lines go: stderr, in batches. A line is appended to a buffer in memory, and
//! a thread of its own writes the buffer out GATHER after the first line that found it
//! empty, or at once when it holds FLUSH_AT bytes. Under load that is one `write` for hundreds
//! of request lines instead of one per request (BENCHMARKS.md, issue 15); a quiet proxy's
//! lines appear within GATHER, and the thread sleeps until there is a line to write.
//!
//! Nothing is lost at shutdown: [`Batched::finish`] (called when `main` ends, by the guard
//! `main` holds) writes what is left, and lines logged after it are written at once. A panic
//! writes out the buffered lines before the panic's own message. What a `SIGKILL` interrupts is
//! at most the last GATHER of lines.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long lines gather after the first one before they are written.
pub const GATHER: Duration = Duration::from_millis(20);
/// A buffer this full is written at once, by the thread that filled it.
pub const FLUSH_AT: usize = 64 * 1024;

/// A `MakeWriter` for tracing-subscriber that batches lines (see the module).
pub struct Batched<W: Write + Send + 'static> {
    shared: Arc<Shared<W>>,
}

impl<W: Write + Send + 'static> Clone for Batched<W> {
    fn clone(&self) -> Self {
        Batched {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<W> {
    state: Mutex<State>,
    wake: Condvar,
    /// Taken before the state lock is let go, so batches leave in the order they were cut.
    out: Mutex<W>,
    gather: Duration,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// The last batch's buffer, cleared, for the next one.
    spare: Vec<u8>,
    /// The writer thread waits for a line.
    parked: bool,
    /// After `finish`: every line is written at once.
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A buffer of bytes and two flags: a panic elsewhere cannot leave them half-changed, and
    // a log line must never be what brings the proxy down.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<W: Write + Send + 'static> Batched<W> {
    /// Batch lines for `out`, with the thread that writes them. If that thread cannot be
    /// started, every line is written as it comes.
    pub fn new(out: W) -> Batched<W> {
        Batched::with_gather(out, GATHER)
    }

    fn with_gather(out: W, gather: Duration) -> Batched<W> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            out: Mutex::new(out),
            gather,
        });
        let writer = Arc::clone(&shared);
        let started = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || writer.run());
        if started.is_err() {
            lock(&shared.state).closed = true;
        }
        Batched { shared }
    }

    /// Write out what is buffered now (a panic, before its message). Skipped if the buffer
    /// is being changed at this moment: a panic hook must never wait on a lock its own thread
    /// might hold.
    pub fn flush(&self) {
        if let Ok(st) = self.shared.state.try_lock() {
            self.shared.write_out(st);
        }
    }

    /// Append one whole line (the request line written without tracing: `log::RequestLines`).
    pub fn write_line(&self, line: &[u8]) {
        self.shared.append(line);
    }

    /// Write out what is left and from now on write every line at once; the writer thread
    /// ends.
    pub fn finish(&self) {
        let mut st = lock(&self.shared.state);
        st.closed = true;
        self.shared.write_out(st);
        self.shared.wake.notify_one();
    }
}

impl<W: Write + Send + 'static> Shared<W> {
    fn append(&self, line: &[u8]) {
        let mut st = lock(&self.state);
        if st.closed {
            st.buf.extend_from_slice(line);
            return self.write_out(st);
        }
        let wake = st.buf.is_empty() && st.parked;
        st.buf.extend_from_slice(line);
        if st.buf.len() >= FLUSH_AT {
            return self.write_out(st);
        }
        drop(st);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Cut the buffer and write it, with the state lock let go during the write so that
    /// other lines can gather meanwhile.
    fn write_out(&self, mut st: MutexGuard<'_, State>) {
        if st.buf.is_empty() {
            return;
        }
        let spare = std::mem::take(&mut st.spare);
        let mut batch = std::mem::replace(&mut st.buf, spare);
        let mut out = lock(&self.out);
        drop(st);
        // Nowhere to report a failed write of the log itself; the next batch tries again.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        drop(out);
        batch.clear();
        let mut st = lock(&self.state);
        if st.spare.capacity() == 0 && batch.capacity() <= 4 * FLUSH_AT {
            st.spare = batch;
        }
    }

    fn run(&self) {
        loop {
            let mut st = lock(&self.state);
            while st.buf.is_empty() && !st.closed {
                st.parked = true;
                st = self.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            st.parked = false;
            if st.closed {
                return;
            }
            drop(st);
            std::thread::sleep(self.gather);
            let st = lock(&self.state);
            self.write_out(st);
        }
    }
}

/// One event's writer: tracing-subscriber formats the whole line, then writes it with one
/// `write_all`.
pub struct Line<'a, W> {
    shared: &'a Shared<W>,
}

impl<W: Write + Send + 'static> Write for Line<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + Send + 'static> MakeWriter<'a> for Batched<W> {
    type Writer = Line<'a, W>;

    fn make_writer(&'a self) -> Line<'a, W> {
        Line {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read, counting the writes it got.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut s = lock(&self.0);
            s.0.extend_from_slice(buf);
            s.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).0.clone()).unwrap()
        }
        fn writes(&self) -> usize {
            lock(&self.0).1
        }
    }

    fn line(b: &Batched<Sink>, s: &str) {
        b.make_writer().write_all(s.as_bytes()).unwrap();
    }

    #[test]
    fn lines_leave_together_in_order_and_finish_writes_the_rest() {
        let sink = Sink::default();
        // Lines gather for an hour: only `finish` writes them, whatever the scheduler does.
        let b = Batched::with_gather(sink.clone(), Duration::from_secs(3600));
        for i in 0..100 {
            line(&b, &format!("line {i}\n"));
        }
        b.finish();
        let want: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(sink.text(), want);
        assert_eq!(sink.writes(), 1, "100 lines in one write");
        // After finish, each line is written at once.
        line(&b, "late\n");
        assert!(sink.text().ends_with("line 99\nlate\n"));
    }

    #[test]
    fn a_full_buffer_is_written_by_the_line_that_filled_it() {
        let sink = Sink::default();
        let b = Batched::with_gather(sink.clone(), Duration::from_secs(3600));
        let long = "x".repeat(FLUSH_AT);
        line(&b, &long);
        // No wait on the writer thread: the write happened in `line`.
        assert_eq!(sink.text().len(), FLUSH_AT);
        b.finish();
    }

    #[test]
    fn the_writer_thread_writes_lines_without_a_finish() {
        let sink = Sink::default();
        let b = Batched::new(sink.clone());
        line(&b, "one\n");
        // Real time on purpose: the writer thread's gathering is a real sleep. The bound is
        // generous; the line is due after GATHER.
        #[allow(clippy::disallowed_methods)]
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        #[allow(clippy::disallowed_methods)]
        while sink.text().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sink.text(), "one\n");
        b.finish();
    }

    #[test]
    fn a_failing_output_neither_panics_nor_blocks() {
        struct Broken(Arc<Mutex<u32>>);
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                *lock(&self.0) += 1;
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let tries = Arc::new(Mutex::new(0));
        let b = Batched::new(Broken(Arc::clone(&tries)));
        b.make_writer().write_all(b"a\n").unwrap();
        b.finish();
        assert!(*lock(&tries) >= 1);
    }
}

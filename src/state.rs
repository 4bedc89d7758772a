//! The state file: the quota day, the requests counted against it, any cooldown and quota
//! gate, and per-client daily counts, so that a restart neither reopens a closed gate nor
//! forgets what was spent.
//!
//! Writes are atomic (temp file in the same directory, `sync_all`, rename, fsync of the
//! directory) and happen on a blocking thread owned by the writer task, never on the request
//! path. Crash safety comes from admission reserving daily requests *ahead* in small blocks:
//! the file always holds a count at least as large as what was granted, so after `kill -9` the
//! proxy may over-count a little but never admits more than `requests_per_day` in a day. A
//! clean shutdown writes the exact count.
//!
//! Only wall-clock values (UNIX seconds, quota-day index) are stored; monotonic instants mean
//! nothing to another process.
//!
//! One process per file: [`lock`] takes an advisory lock on `<state.path>.lock` for as long as
//! the proxy runs, so a second proxy given the same path refuses to start (two of them would
//! each count only their own requests and together pass the daily cap). Not owned here: the
//! config check that the directory takes files (`config::check_state_dir`).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::admission::Admission;

/// Bumped when the file format changes incompatibly.
const FORMAT_VERSION: u32 = 1;
/// After a failed write, wait this long before trying again (a full disk rarely clears
/// within milliseconds, and hammering it helps nobody).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// Writes that are not reservations (cooldown changes, counts without a daily cap) are
/// coalesced to at most one per this interval.
const MIN_WRITE_INTERVAL: Duration = Duration::from_millis(200);

/// What survives a restart.
/// Unknown fields are ignored (serde cannot deny them through `flatten`); `version` is what
/// guards the format.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    /// Quota-day index (`units::day_index`); `None` for a fresh start.
    pub day: Option<i64>,
    /// Requests counted against that day (a reservation: at least what was sent).
    pub used: u64,
    #[serde(default)]
    pub daily_gate_until_unix: Option<f64>,
    #[serde(default)]
    pub cooldown_until_unix: Option<f64>,
    /// Upstream 402 "usage cap exceeded": closed until this 4-hour boundary.
    #[serde(default)]
    pub usage_cap_until_unix: Option<f64>,
    /// The last upstream 429 and its headers: "why was I limited" survives a restart.
    #[serde(default)]
    pub last_429: Option<crate::admission::Last429>,
    /// Not stored: set when the file could not be trusted and `used` is an assumption (the
    /// whole cap, so the proxy never under-counts), for `/status` to say so.
    #[serde(skip)]
    pub assumed: bool,
    #[serde(default)]
    pub cooldown_level: u32,
    #[serde(default)]
    pub clients: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    /// For people reading the file; ignored on load.
    #[serde(default)]
    day_started_at: String,
    #[serde(flatten)]
    state: Persisted,
}

/// The result of reading the state file at startup.
#[derive(Debug)]
pub enum Loaded {
    /// No file yet (or memory only): start fresh.
    Fresh,
    Restored(Persisted),
    /// The file exists but cannot be trusted. `message` says what was wrong and where the
    /// bad file was moved; the caller starts conservatively.
    Corrupt {
        message: String,
    },
}

/// The lock on a state file, held for as long as this value lives (the process, in the
/// binary). Advisory (`flock`), on a sidecar file rather than the state file itself because
/// the state file is replaced by rename on every write and a lock on a replaced inode guards
/// nothing. The OS drops the lock when the process ends in any way, `kill -9` included, so a
/// stale lock file never blocks a restart; it stays on disk holding the last holder's pid.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    pub path: PathBuf,
}

/// Why the state file could not be locked.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it; `pid` is what it wrote into the lock file (`None` if it has
    /// not written it yet or the file is unreadable).
    Held {
        state: PathBuf,
        lock: PathBuf,
        pid: Option<u32>,
    },
    Io {
        lock: PathBuf,
        error: std::io::Error,
    },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Held { state, lock, pid } => write!(
                f,
                "state file {} is in use by another chutes-proxy ({}; lock {}): two proxies on one \
                 state file would each count only their own requests and pass the daily cap \
                 together; give each its own state.path, or share one budget with \
                 shared_state.backend = \"redis\"",
                state.display(),
                pid.map_or("pid unknown".to_string(), |p| format!("pid {p}")),
                lock.display()
            ),
            LockError::Io { lock, error } => {
                write!(
                    f,
                    "cannot lock the state file through {}: {error}",
                    lock.display()
                )
            }
        }
    }
}

impl std::error::Error for LockError {}

/// `<state path>.lock`.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".lock");
    PathBuf::from(name)
}

/// Take the state file's lock without waiting, and write this process's pid into it.
pub fn lock(path: &Path) -> Result<StateLock, LockError> {
    let lock = lock_path(path);
    let io = |error| LockError::Io {
        lock: lock.clone(),
        error,
    };
    // Not truncated on open: the holder's pid must still be there for the refusal to name.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(LockError::Held {
                // Absolute: the operator reading this may be in another directory.
                state: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
                lock,
                pid,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(StateLock {
        _file: file,
        path: lock,
    })
}

/// Read the state file. Never panics; a bad file is moved aside (so it is not overwritten and
/// can be inspected) and reported.
pub fn load(path: &Path) -> Loaded {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Fresh,
        Err(e) => {
            return Loaded::Corrupt {
                message: format!("cannot read state file {}: {e}", path.display()),
            }
        }
    };
    match parse(&bytes) {
        Ok(p) => Loaded::Restored(p),
        Err(why) => {
            let aside = aside_name(path);
            let moved = match std::fs::rename(path, &aside) {
                Ok(()) => format!("moved to {}", aside.display()),
                Err(e) => format!("could not be moved aside: {e}"),
            };
            Loaded::Corrupt {
                message: format!("state file {} is unusable ({why}); {moved}", path.display()),
            }
        }
    }
}

/// Parse state-file bytes; rejects anything that is not exactly what this version writes.
pub fn parse(bytes: &[u8]) -> Result<Persisted, String> {
    let f: FileFormat = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if f.version != FORMAT_VERSION {
        return Err(format!("unsupported format version {}", f.version));
    }
    let p = f.state;
    for v in [p.daily_gate_until_unix, p.cooldown_until_unix]
        .into_iter()
        .flatten()
    {
        if !v.is_finite() || v < 0.0 {
            return Err(format!("invalid instant {v}"));
        }
    }
    Ok(p)
}

fn aside_name(path: &Path) -> PathBuf {
    let stamp = crate::clock::unix_now() as u64;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".corrupt-{stamp}"));
    path.with_file_name(name)
}

pub fn render(p: &Persisted, reset_offset: u32) -> Vec<u8> {
    let f = FileFormat {
        version: FORMAT_VERSION,
        day_started_at: p
            .day
            .map(|d| crate::units::format_rfc3339(crate::units::day_end(d - 1, reset_offset)))
            .unwrap_or_default(),
        state: p.clone(),
    };
    let mut out = serde_json::to_vec_pretty(&f).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Write atomically: temp file beside the target, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename is durable only once the directory entry is.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The writer: waits for admission to ask for a write, writes on a blocking thread, and tells
/// admission what is now durable. Stops when the trigger's sender is gone.
pub async fn run_writer(
    admission: Arc<Admission>,
    path: PathBuf,
    reset_offset: u32,
    trigger: watch::Receiver<u64>,
) {
    run_writer_until(
        admission,
        path,
        reset_offset,
        trigger,
        std::future::pending(),
    )
    .await
}

/// [`run_writer`] that also returns once `stop` completes, but never in the middle of a
/// write. Shutdown uses this rather than aborting the task: an abort leaves a write already
/// handed to a blocking thread running, and that older snapshot could be renamed over the
/// final one (a restart would then forget a cooldown that began just before it).
pub async fn run_writer_until(
    admission: Arc<Admission>,
    path: PathBuf,
    reset_offset: u32,
    mut trigger: watch::Receiver<u64>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut last_write = tokio::time::Instant::now() - MIN_WRITE_INTERVAL;
    loop {
        tokio::select! {
            changed = trigger.changed() => if changed.is_err() { return },
            () = &mut stop => return,
        }
        // A reservation is written at once: a grant may be waiting for it (issue 18: on a
        // 300-a-day plan every other request waited ~185 ms on this timer), and reservations
        // are already batched by their block size. Everything else (cooldown changes, counts
        // without a daily cap, which change with every request) is coalesced to one write per
        // interval; a reservation asked for while coalescing ends the wait.
        if !admission.reservation_pending() {
            let due = tokio::time::sleep_until(last_write + MIN_WRITE_INTERVAL);
            tokio::pin!(due);
            loop {
                tokio::select! {
                    () = &mut due => break,
                    changed = trigger.changed() => {
                        if changed.is_err() { return }
                        if admission.reservation_pending() { break }
                    }
                    () = &mut stop => return,
                }
            }
        }
        trigger.borrow_and_update();
        let snapshot = admission.persisted(false);
        let bytes = render(&snapshot, reset_offset);
        let p = path.clone();
        let result = tokio::task::spawn_blocking(move || write_atomic(&p, &bytes)).await;
        last_write = tokio::time::Instant::now();
        match result {
            Ok(Ok(())) => admission.persisted_ok(&snapshot),
            Ok(Err(e)) => {
                tracing::error!(path = %path.display(), error = %e,
                    "cannot write the state file; requests beyond the last reservation wait until it can be written");
                admission.persist_failed();
                tokio::select! {
                    () = tokio::time::sleep(RETRY_AFTER_FAILURE) => {}
                    () = &mut stop => return,
                }
                admission.persist_retry();
            }
            Err(e) => {
                tracing::error!(error = %e, "state writer thread failed");
                admission.persist_failed();
            }
        }
    }
}

/// The final, exact write at shutdown.
pub async fn write_final(admission: &Admission, path: &Path, reset_offset: u32) {
    let snapshot = admission.persisted(true);
    let bytes = render(&snapshot, reset_offset);
    let p = path.to_path_buf();
    match tokio::task::spawn_blocking(move || write_atomic(&p, &bytes)).await {
        Ok(Ok(())) => tracing::info!(path = %path.display(), used = snapshot.used, "state saved"),
        Ok(Err(e)) => {
            tracing::error!(path = %path.display(), error = %e, "cannot save state at shutdown")
        }
        Err(e) => tracing::error!(error = %e, "state writer thread failed at shutdown"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let p = Persisted {
            day: Some(20_415),
            used: 812,
            daily_gate_until_unix: None,
            cooldown_until_unix: Some(1_795_990_000.5),
            cooldown_level: 2,
            clients: [("bot".to_string(), 3)].into_iter().collect(),
            usage_cap_until_unix: Some(1_795_996_800.0),
            last_429: Some(crate::admission::Last429 {
                at_unix: 1_795_990_000.25,
                status: 429,
                headers: vec![("retry-after".into(), "30".into())],
                body: "<html>429</html>".into(),
            }),
            assumed: false,
        };
        let bytes = render(&p, 0);
        assert_eq!(parse(&bytes).unwrap(), p);
    }

    /// Found by `fuzz/fuzz_targets/state.rs`: serde_json's default float parser read this
    /// instant back one ULP (~0.2 µs) early; with `float_roundtrip` it is exact.
    #[test]
    fn instants_read_back_bit_for_bit() {
        for until in [1_758_346_201.000_004_5, 1_758_346_201.000_004_3, 0.1, 1e300] {
            let p = Persisted {
                day: Some(20_344),
                used: 812,
                daily_gate_until_unix: Some(until),
                cooldown_until_unix: Some(until),
                ..Persisted::default()
            };
            let back = parse(&render(&p, 0)).unwrap();
            assert_eq!(
                back.cooldown_until_unix.map(f64::to_bits),
                Some(until.to_bits()),
                "{until:?}"
            );
            assert_eq!(back, p);
        }
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"{\"version\":1}",
            b"{\"version\":9,\"day\":1,\"used\":1}",
            b"{\"version\":1,\"day\":1,\"used\":-1}",
            b"\xff\xfe",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn corrupt_file_is_moved_aside_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{not json").unwrap();
        match load(&path) {
            Loaded::Corrupt { message } => {
                assert!(message.contains("unusable"), "{message}");
                assert!(message.contains("moved to"), "{message}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(!path.exists());
        assert!(matches!(load(&path), Loaded::Fresh));
    }

    /// Issue 18: on a 300-a-day plan, 60 back-to-back requests took 5.9 s because every
    /// reservation write first waited out the batching interval. Paused time: the only thing
    /// that advances the clock is a timer, so the virtual time the grants took is the time
    /// spent waiting on timers (the fsyncs themselves run on blocking threads, which hold
    /// auto-advance back). It must be well under one interval, not one per block.
    #[tokio::test(start_paused = true)]
    async fn a_small_cap_does_not_wait_on_the_write_batching_timer() {
        use crate::admission::Settings;
        use crate::config::{Config, Overrides};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let toml = format!(
            "[limits]\nrequests_per_minute = 60000\nburst = 1000\nrequests_per_day = 300\n\
             [state]\npath = {:?}\n",
            path.display().to_string()
        );
        let config = Config::from_toml(&toml, &Overrides::default(), &|_: &str| None).unwrap();
        let (tx, rx) = watch::channel(0u64);
        let a = Arc::new(Admission::new(
            Settings::from_config(&config),
            crate::clock::WallClock::System,
            Persisted::default(),
            Some(tx),
        ));
        let writer = tokio::spawn(run_writer(Arc::clone(&a), path.clone(), 0, rx));
        let t0 = tokio::time::Instant::now();
        for _ in 0..60 {
            let mut p = a
                .acquire(crate::clients::DEFAULT_CLIENT, Duration::from_secs(60))
                .await
                .unwrap();
            p.mark_sent();
        }
        let waited = t0.elapsed();
        assert!(
            waited < MIN_WRITE_INTERVAL,
            "60 grants waited {waited:?} on timers (the batching interval is {MIN_WRITE_INTERVAL:?})"
        );
        match load(&path) {
            Loaded::Restored(p) => assert!(p.used >= 60, "disk holds {}", p.used),
            other => panic!("{other:?}"),
        }
        writer.abort();
    }

    /// Issue 18, item 1: two proxies on one state file passed the daily cap together.
    #[test]
    fn a_second_lock_on_the_same_state_file_is_refused_naming_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let held = lock(&path).unwrap();
        let pid = std::process::id();
        assert_eq!(
            std::fs::read_to_string(&held.path).unwrap().trim(),
            pid.to_string()
        );
        // flock locks belong to the open file, so a second open in this same process is
        // refused just as another process would be.
        let e = lock(&path).unwrap_err();
        assert!(
            matches!(e, LockError::Held { pid: Some(p), .. } if p == pid),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains(&format!("pid {pid}")), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        // Released with its holder; the stale file does not block the next one.
        drop(held);
        let again = lock(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&again.path).unwrap().trim(),
            pid.to_string()
        );
    }

    #[test]
    fn atomic_write_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

//! The built binary as a child process: its stderr collected while the test waits for the
//! startup line, and the addresses that line names.

use super::WAIT_LIMIT;

/// Reads the child's stderr on a thread, forwarding lines so the test can wait for the
/// startup line while keeping everything for the final grep.
pub fn collect_stderr(
    stderr: std::process::ChildStderr,
) -> (
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<String>,
) {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    (rx, handle)
}

/// Wait for the child's startup line (it names the listen addresses); everything it writes
/// to stderr is collected for the final grep. Kills the child and fails if none comes.
pub async fn wait_for_startup(
    child: &mut std::process::Child,
) -> (String, std::thread::JoinHandle<String>) {
    let (lines, stderr) = collect_stderr(child.stderr.take().expect("stderr piped"));
    // A blocking thread reading a child process's stderr with std's `recv_timeout`: real time,
    // on std's clock, is what that wait is measured in (clippy.toml).
    #[allow(clippy::disallowed_methods)]
    let startup = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + WAIT_LIMIT;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match lines.recv_timeout(left) {
                Ok(l) if l.contains("listening on") => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .unwrap();
    match startup {
        Some(l) => (l, stderr),
        None => {
            let _ = child.kill();
            panic!("no startup line; stderr:\n{}", stderr.join().unwrap());
        }
    }
}

/// The `http://127.0.0.1:PORT` after `marker` in the startup line.
pub fn address_after(line: &str, marker: &str) -> Option<String> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '/' | '.')))
        .unwrap_or(rest.len());
    Some(rest[..end].to_string())
}

/// SIGTERM the child, wait for it to exit, and return how it exited with everything it wrote
/// to stderr (the collector ends when the pipe closes).
pub async fn terminate(
    mut child: std::process::Child,
    stderr: std::thread::JoinHandle<String>,
) -> (std::process::ExitStatus, String) {
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill(SIGTERM)");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    (status, stderr.join().unwrap())
}

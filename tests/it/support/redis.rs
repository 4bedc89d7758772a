//! A real `redis-server` for the fleet tests, started on a free loopback port in a temporary
//! directory and killed on drop. Where `redis-server` is not installed the tests say so and
//! skip, except in CI (`CI` set), where a missing server is a failure: CI must run them.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// A one-node Redis Cluster (`--cluster-enabled yes`, every slot on this node): scripts
    /// that touch keys of several slots fail there with CROSSSLOT, as on a real cluster.
    cluster: bool,
}

/// `None` (after printing why) when the tests must be skipped on this machine.
pub fn redis_available(test: &str) -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: redis-server is not installed, and CI must run the fleet tests");
        }
        eprintln!("SKIPPED {test}: redis-server is not installed (apt-get install redis-server)");
    }
    found
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(false)
    }

    /// A one-node cluster: started with `--cluster-enabled yes`, all 16384 slots assigned to
    /// it, and ready once `CLUSTER INFO` says `cluster_state:ok`.
    pub fn start_cluster() -> RedisServer {
        RedisServer::start_with(true)
    }

    fn start_with(cluster: bool) -> RedisServer {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().unwrap();
        let mut s = RedisServer {
            port,
            child: None,
            dir,
            cluster,
        };
        s.spawn();
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        if self.cluster {
            // A restarted node must start empty like a fresh one, slots included.
            let _ = std::fs::remove_file(self.dir.path().join("nodes.conf"));
            cmd.args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(self.dir.path().join("nodes.conf"));
        }
        let child = cmd
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        self.wait_ready();
        if self.cluster {
            self.query::<String>(redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(0).arg(16383));
            // Blocking, on std's clock: an outside process is being waited for (clippy.toml).
            #[allow(clippy::disallowed_methods)]
            let deadline = Instant::now() + Duration::from_secs(20);
            #[allow(clippy::disallowed_methods)]
            while !self
                .query::<String>(redis::cmd("CLUSTER").arg("INFO"))
                .contains("cluster_state:ok")
            {
                assert!(
                    Instant::now() < deadline,
                    "the one-node cluster did not become ok"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Poll until the server answers PING (a readiness check of an external process, bounded).
    // Blocking, in real time on std's clock: an external process, not the proxy's time.
    #[allow(clippy::disallowed_methods)]
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = redis::Client::open(self.url()).unwrap();
        loop {
            if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill the server (connections drop, new ones are refused).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freeze the server (SIGSTOP): connections stay open and new ones are accepted by the
    /// kernel, but nothing answers, like a Redis behind a network partition. Every call then
    /// waits for its timeout, unlike a killed server whose refusals come back at once.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Undo [`RedisServer::freeze`] (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("redis-server running").id();
        let ok = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// Start again on the same port (its data is gone: `--save ""`).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Run a command against the server (for assertions on keys).
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_connection().unwrap();
        cmd.query(&mut c).unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

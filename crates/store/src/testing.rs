//! Real `redis-server` processes for tests, each on a free port of 127.0.0.1 in its own directory
//! (never the machine's shared 6379), killed when dropped.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 for a server that cannot bind port 0 and say which it took (Redis,
/// nginx, Caddy, Prometheus). Taken below the ephemeral range (32768-60999), where the client sockets
/// of this and every other process get their ports: a port bound and released there could be taken
/// by one of them before the server binds it. Each call in a process gets the next port of
/// 20000-22767 (from an offset of the process's own), free when it is handed out.
pub fn free_port() -> u16 {
    free_port_with(0)
}

/// [`free_port`] whose port `shift` higher is free too (a cluster node's bus port), or just the
/// port when `shift` is 0. Ports stay below 32768 with a shift of up to 10,000.
fn free_port_with(shift: u16) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const COUNT: u16 = 2_768;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let offset = (std::process::id() % u32::from(COUNT)) as u16;
    let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % COUNT;
        let port = FIRST + (offset + n) % COUNT;
        if free(port) && (shift == 0 || free(port + shift)) {
            return port;
        }
    }
    panic!("no free port in {FIRST}-{}", FIRST + COUNT - 1)
}

/// Every write on disk before it is acknowledged, so a killed server comes back with its data, as a
/// production Redis with persistence would.
const PERSIST: &[&str] = &["--appendonly", "yes", "--appendfsync", "always"];

/// One `redis-server`.
pub struct RedisServer {
    pub port: u16,
    /// The password it asks for, if any.
    password: Option<String>,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

fn spawn(port: u16, dir: &Path, extra: &[&str]) -> Child {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--dir", dir.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (Debian package redis-server)")
}

fn wait_for_ping(port: u16, password: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let auth = password.map_or(String::new(), |p| format!(":{p}@"));
    loop {
        let up = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}"))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok();
        if up {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on port {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl RedisServer {
    /// Starts a standalone server.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Starts a standalone server on `port`.
    pub fn start_on(port: u16) -> Self {
        Self::start_as(port, None)
    }

    /// Starts a standalone server that asks clients for `password`.
    pub fn start_with_password(password: &str) -> Self {
        Self::start_as(free_port(), Some(password.to_owned()))
    }

    fn start_as(port: u16, password: Option<String>) -> Self {
        let mut server = Self {
            port,
            password,
            child: None,
            _dir: tempfile::tempdir().unwrap(),
        };
        server.child = Some(server.spawn());
        server
    }

    /// A new process of this server, answering.
    fn spawn(&self) -> Child {
        let mut args = PERSIST.to_vec();
        if let Some(p) = &self.password {
            args.extend(["--requirepass", p]);
        }
        let child = spawn(self.port, self._dir.path(), &args);
        wait_for_ping(self.port, self.password.as_deref());
        child
    }

    /// Starts the server again (after [`kill`](Self::kill)) on the same port with the same data.
    pub fn restart(&mut self) {
        self.kill();
        let mut child = self.spawn();
        // The answer must have come from this server, not from whatever took the port meanwhile.
        assert!(
            child.try_wait().unwrap().is_none(),
            "redis-server could not take port {} back",
            self.port
        );
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of `n` masters (no replicas).
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Each node's cluster bus listens 10,000 above its port.
        let ports: Vec<u16> = (0..n).map(|_| free_port_with(10_000)).collect();
        let children: Vec<Child> = ports
            .iter()
            .map(|p| {
                let node_dir = dir.path().join(p.to_string());
                std::fs::create_dir_all(&node_dir).unwrap();
                spawn(
                    *p,
                    &node_dir,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                    ],
                )
            })
            .collect();
        for p in &ports {
            wait_for_ping(*p, None);
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed (Debian package redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in &ports {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self {
            ports,
            children,
            _dir: dir,
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

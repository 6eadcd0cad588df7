//! End-to-end test harness for callbus: a real `nats-server` per test on a free loopback
//! port (killed on drop), plus helpers shared by the end-to-end tests in `tests/`.
//!
//! `nats-server` is looked up on `PATH`, then in `/usr/sbin` and `/usr/local/bin` (Debian
//! installs it in `/usr/sbin`); `CALLBUS_NATS_SERVER` names another binary. When none is
//! found the test fails with a message saying how to install it.

pub mod cluster;
pub mod fuzz;
pub mod stack;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting nats-server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds the `nats-server` binary.
pub fn nats_server_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("CALLBUS_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/bin", "/usr/local/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| "nats-server not found on PATH or in /usr/sbin: install it with `apt-get install -y nats-server` (or set CALLBUS_NATS_SERVER)".to_owned())
}

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// This process's resident memory (`VmRSS`), in bytes.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The heap's bytes in use and taken from the system (glibc's `mallinfo2`), None elsewhere.
#[allow(unsafe_code)]
fn heap_bytes() -> Option<(u64, u64)> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 reads the allocator's counters; it takes nothing and returns a value.
        let info = unsafe { libc::mallinfo2() };
        let mapped = info.hblkhd as u64;
        Some((info.uordblks as u64 + mapped, info.arena as u64 + mapped))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// The bytes this process's heap holds for its allocations (in use in the arenas plus mapped
/// blocks), None where the allocator does not say. Beside RSS it tells a leak (both grow) from
/// fragmentation (RSS grows, this does not).
pub fn heap_in_use() -> Option<u64> {
    heap_bytes().map(|(in_use, _)| in_use)
}

/// The bytes this process's heap has taken from the system (the arenas' size plus mapped
/// blocks, used or free), None where the allocator does not say. Beside [`heap_in_use`] it
/// shows the allocator's free space; beside RSS, what of it is touched.
pub fn heap_from_system() -> Option<u64> {
    heap_bytes().map(|(_, taken)| taken)
}

/// A `nats-server` child process on a loopback port; killed when dropped.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store_dir: Option<tempfile::TempDir>,
    /// A configuration file (`-c`), with the directory holding it.
    config: Option<(tempfile::TempDir, PathBuf)>,
}

impl NatsServer {
    /// Starts a plain nats-server on a free port and waits until it accepts clients.
    pub fn start() -> NatsServer {
        let mut server = NatsServer { child: None, port: free_port(), store_dir: None, config: None };
        server.spawn();
        server
    }

    /// Starts a nats-server with this configuration file text (e.g. TLS and authorization),
    /// on a free loopback port; files the configuration names (certificates) must exist.
    pub fn start_with_config(text: &str) -> NatsServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary dir: {e}"));
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        let mut server = NatsServer { child: None, port: free_port(), store_dir: None, config: Some((dir, path)) };
        server.spawn();
        server
    }

    /// Starts a nats-server with JetStream (file storage in a temporary directory).
    pub fn start_jetstream() -> NatsServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary JetStream dir: {e}"));
        let mut server = NatsServer { child: None, port: free_port(), store_dir: Some(dir), config: None };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let binary = nats_server_binary().unwrap_or_else(|e| panic!("{e}"));
        let mut cmd = Command::new(&binary);
        if let Some((_, path)) = &self.config {
            cmd.arg("-c").arg(path);
        }
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(dir) = &self.store_dir {
            cmd.arg("-js").arg("-sd").arg(dir.path());
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                let log = self.config.as_ref().map(|(dir, _)| dir.path().join("nats.log"));
                let tail = log.and_then(|l| std::fs::read_to_string(l).ok()).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(20).collect();
                panic!(
                    "nats-server on port {} exited at start ({status}); its log ends:\n{}",
                    self.port,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if let Ok(stream) = TcpStream::connect(self.addr()) {
                let mut line = String::new();
                stream.set_read_timeout(Some(Duration::from_secs(1))).ok();
                if BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO ") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nats-server on port {} did not accept connections within {START_TIMEOUT:?}", self.port);
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (and the same JetStream store).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(120));
        }
    }
}

/// A cluster of `nats-server`s with JetStream on loopback: cluster routes between all of
/// them, each with its own store and log file; killed when dropped. A test that panics prints
/// the end of each server's log (leader elections, lost routes) as it unwinds.
pub struct NatsCluster {
    /// The servers, in order.
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` servers that route to each other (JetStream needs 3 for replicas 3).
    pub fn start(n: usize) -> NatsCluster {
        // Every port distinct (a port just freed can be handed out again).
        let mut taken = std::collections::HashSet::new();
        let mut distinct = || loop {
            let port = free_port();
            if taken.insert(port) {
                return port;
            }
        };
        let routes: Vec<u16> = (0..n).map(|_| distinct()).collect();
        let clients: Vec<u16> = (0..n).map(|_| distinct()).collect();
        let route_urls: Vec<String> = routes.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
        let servers = (0..n)
            .map(|i| {
                let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary dir: {e}"));
                let store = dir.path().join("js");
                let text = format!(
                    "server_name: n{i}\nlog_file: \"{}\"\njetstream {{ store_dir: \"{}\" }}\ncluster {{\n  name: callbus\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    dir.path().join("nats.log").display(),
                    store.display(),
                    routes[i],
                    route_urls.join(", ")
                );
                let path = dir.path().join("nats.conf");
                std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
                let mut server =
                    NatsServer { child: None, port: clients[i], store_dir: None, config: Some((dir, path)) };
                server.spawn();
                server
            })
            .collect();
        NatsCluster { servers }
    }

    /// The last `lines` lines of each server's log, without the once-a-second "Error trying to
    /// connect to route" of a server that lost a peer (they hide what matters).
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for (i, server) in self.servers.iter().enumerate() {
            let Some((dir, _)) = &server.config else { continue };
            let text = std::fs::read_to_string(dir.path().join("nats.log")).unwrap_or_default();
            let all: Vec<&str> = text.lines().filter(|l| !l.contains("Error trying to connect to route")).collect();
            out.push_str(&format!("--- nats-server n{i} (port {}), last {lines} lines:\n", server.port));
            for line in &all[all.len().saturating_sub(lines)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Every client URL, comma-separated (what `async_nats::connect` and `--nats` take).
    pub fn urls(&self) -> String {
        self.servers.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }

    /// A client that knows every server of the cluster (and so survives losing one).
    pub async fn connect(&self) -> async_nats::Client {
        let addrs: Vec<async_nats::ServerAddr> =
            self.servers.iter().map(|s| s.url().parse().unwrap_or_else(|e| panic!("server url: {e}"))).collect();
        async_nats::connect(addrs).await.unwrap_or_else(|e| panic!("connect to the cluster: {e}"))
    }

    /// Waits until JetStream answers with a cluster leader (a stream of replicas `n` can be
    /// made), or panics after 30 s.
    pub async fn wait_jetstream(&self) {
        let js = async_nats::jetstream::new(self.connect().await);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let config = async_nats::jetstream::stream::Config {
                name: "HARNESS_PROBE".into(),
                subjects: vec!["harness.probe".into()],
                num_replicas: self.servers.len(),
                ..Default::default()
            };
            match js.create_stream(config).await {
                Ok(_) => {
                    let _ = js.delete_stream("HARNESS_PROBE").await;
                    return;
                }
                Err(e) => assert!(Instant::now() < deadline, "JetStream cluster not ready within 30 s: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The OpenSIPS fixtures directory (the repository's `fixtures/opensips-3.4`, or
/// `CALLBUS_FIXTURES`).
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("CALLBUS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/opensips-3.4"));
    assert!(
        dir.is_dir(),
        "fixtures not found at {}: the repository's fixtures/opensips-3.4 is missing; set CALLBUS_FIXTURES to a copy",
        dir.display()
    );
    dir
}

//! `callbus engine --cluster` as processes on a 3-node NATS JetStream cluster (replicas 3),
//! OpenSIPS simulated in this process: kill -9 of a worker, SIGSTOP past the lease, a rolling
//! restart of every worker under traffic. After each, the replicated log holds for every call
//! exactly the events the simulator sent (no gap, no duplicate), and its writer changed only
//! at takeovers (fencing).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use callbus_engine::cluster;
use callbus_schemas::command::CallNotification;
use callbus_tests::cluster::{
    assert_fenced, assert_log_is_what_was_sent, listed, opensips, settled, wait_ended_in_log,
};
use callbus_tests::stack::NODE;
use callbus_tests::NatsCluster;
use futures::StreamExt;
use opensips_sim::CallScript;

/// These tests run one at a time: each starts three nats-servers and three workers, and two
/// at once on two cores would measure the machine, not the cluster.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PARTITIONS: u16 = 64;

/// A worker process; killed when dropped.
struct Worker {
    name: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Worker {
    fn start(nats: &NatsCluster, name: &str) -> Worker {
        let mut w = Worker { name: name.into(), child: None, dir: tempfile::tempdir().expect("tmp") };
        w.spawn(nats);
        w
    }

    fn spawn(&mut self, nats: &NatsCluster) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("worker log file");
        let child = Command::new(env!("CARGO_BIN_EXE_callbus"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .args(["engine", "--cluster", "--worker", &self.name, "--replicas", "3", "--lease-ttl", "1500ms"])
            .args(["--partitions", &PARTITIONS.to_string(), "--nodes", NODE, "--nats", &nats.urls()])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("callbus engine --cluster");
        self.child = Some(child);
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("stderr.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill").args([signal, &pid]).status().expect("kill").success());
    }

    /// SIGTERM, and waits for a clean exit.
    fn stop(&mut self) {
        self.signal("-TERM");
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(status.success(), "{} exited with {status}:\n{}", self.name, self.log());
                return;
            }
            assert!(Instant::now() < deadline, "{} did not stop within 20 s:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        self.signal("-KILL");
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.name, self.log());
        }
    }
}

async fn cluster_of_three() -> (NatsCluster, async_nats::Client, Vec<Worker>) {
    let nats = NatsCluster::start(3);
    nats.wait_jetstream().await;
    let client = nats.connect().await;
    let workers: Vec<Worker> = ["w0", "w1", "w2"].iter().map(|n| Worker::start(&nats, n)).collect();
    settled(&client, PARTITIONS, &["w0", "w1", "w2"], Duration::from_secs(60)).await;
    (nats, client, workers)
}

fn call(hangup_after: Duration) -> CallScript {
    CallScript { hangup_after: Some(hangup_after), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_moves_its_1000_calls_and_the_log_is_exactly_what_opensips_sent() {
    let _serial = SERIAL.lock().await;
    let (nats, client, mut workers) = cluster_of_three().await;
    let (sim, bridge) = opensips(&nats).await;
    let owners = settled(&client, PARTITIONS, &["w0", "w1", "w2"], Duration::from_secs(10)).await;
    let mut notes = client.subscribe("callbus.call.>").await.expect("sub");
    sim.start_trace();
    const CALLS: usize = 1000;
    let mut sips: Vec<String> = (0..CALLS).map(|_| sim.proxied_call(call(Duration::from_secs(20)))).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while listed(&client, "confirmed").await < CALLS {
        assert!(Instant::now() < deadline, "1000 calls not confirmed within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let on_w1 = |sip: &String| owners[&cluster::partition_of(sip, PARTITIONS)] == "w1";
    let moved = sips.iter().filter(|s| on_w1(s)).count();
    // kill -9, then at once new calls: those on w1's partitions wait in the input stream.
    let killed_at = Instant::now();
    workers[1].kill9();
    let fresh: Vec<String> = (0..60).map(|_| sim.proxied_call(call(Duration::from_secs(8)))).collect();
    let fresh_moved: Vec<&String> = fresh.iter().filter(|s| on_w1(s)).collect();
    assert!(!fresh_moved.is_empty());
    let failover = loop {
        let wait = Duration::from_secs(20).saturating_sub(killed_at.elapsed());
        let Ok(Some(msg)) = tokio::time::timeout(wait, notes.next()).await else {
            panic!("no event applied for a moved call within 20 s of the kill")
        };
        let note: CallNotification = serde_json::from_slice(&msg.payload).expect("notification");
        if note.sip_call_id.as_ref().is_some_and(|s| fresh_moved.contains(&s)) {
            break killed_at.elapsed();
        }
    };
    settled(&client, PARTITIONS, &["w0", "w2"], Duration::from_secs(10)).await;
    sips.extend(fresh);
    let records = wait_ended_in_log(&client, PARTITIONS, &sips, Duration::from_secs(60)).await;
    assert_log_is_what_was_sent(&sips, &sim.take_trace(), &records);
    assert_fenced(&client, PARTITIONS).await;
    // `callbus replay` reads the replicated log: a moved call's timeline, and a partition that
    // moved re-runs through today's machines without a difference.
    let moved_sip = sips.iter().find(|s| on_w1(s)).expect("a moved call");
    let replay = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_callbus"))
            .env_remove("RUST_LOG")
            .args(["replay", "--from-nats", &nats.urls(), "--partitions", &PARTITIONS.to_string()])
            .args(args)
            .output()
            .expect("callbus replay")
    };
    let out = replay(&["timeline", "--call", moved_sip]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("E_DLG_STATE_CHANGED") && text.contains("ended"), "{out:?}");
    let p = cluster::partition_of(moved_sip, PARTITIONS).to_string();
    let out = replay(&["check", "--partition", &p]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains(" 0 divergences"), "{out:?}");
    println!(
        "FIGURE|failover|kill -9 of 1 of 3 workers with {CALLS} live calls ({moved} on it): first event applied for a moved call {} ms after the kill",
        failover.as_millis()
    );
    bridge.shutdown().await;
}

/// Places a call every `every` (each up for `up`) until told to stop; returns their Call-IDs.
fn keep_calling(
    sim: &Arc<opensips_sim::Sim>,
    every: Duration,
    up: Duration,
) -> (Arc<std::sync::atomic::AtomicBool>, tokio::task::JoinHandle<Vec<String>>) {
    let sim = Arc::clone(sim);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let task = tokio::spawn(async move {
        let mut sips = Vec::new();
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            sips.push(sim.proxied_call(call(up)));
            tokio::time::sleep(every).await;
        }
        sips
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_past_its_lease_is_fenced_steps_down_and_writes_nothing_twice() {
    let _serial = SERIAL.lock().await;
    let (nats, client, workers) = cluster_of_three().await;
    let (sim, bridge) = opensips(&nats).await;
    let sim = Arc::new(sim);
    sim.start_trace();
    // Traffic all along, so the worker is in the middle of its work when it is stopped.
    let placing = keep_calling(&sim, Duration::from_millis(10), Duration::from_secs(2));
    tokio::time::sleep(Duration::from_secs(2)).await;
    workers[1].signal("-STOP");
    settled(&client, PARTITIONS, &["w0", "w2"], Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    workers[1].signal("-CONT");
    // It finds its partitions taken: its appends are refused, its leases gone; it steps down
    // and rejoins as a worker like any other.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !workers[1].log().contains("stepping down") && !workers[1].log().contains("belongs to another worker") {
        assert!(Instant::now() < deadline, "w1 did not step down:\n{}", workers[1].log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settled(&client, PARTITIONS, &["w0", "w1", "w2"], Duration::from_secs(20)).await;
    placing.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let sips = placing.1.await.expect("placing calls");
    let records = wait_ended_in_log(&client, PARTITIONS, &sips, Duration::from_secs(40)).await;
    assert_log_is_what_was_sent(&sips, &sim.take_trace(), &records);
    assert_fenced(&client, PARTITIONS).await;
    let log = workers[1].log();
    assert!(log.contains("belongs to another worker"), "w1 appended nothing after it woke: no fencing seen");
    println!(
        "FIGURE|sigstop|w1 resumed: {} appends refused (fenced), {} leases found lost; {} calls meanwhile",
        log.matches("belongs to another worker").count(),
        log.matches("stepping down").count(),
        sips.len()
    );
    drop(workers);
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_worker_under_traffic_loses_no_call() {
    let _serial = SERIAL.lock().await;
    let (nats, client, mut workers) = cluster_of_three().await;
    let (sim, bridge) = opensips(&nats).await;
    let sim = Arc::new(sim);
    sim.start_trace();
    // A call every 40 ms, each up for 3 s, for as long as the restarts take.
    let placing = keep_calling(&sim, Duration::from_millis(40), Duration::from_secs(3));
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..workers.len() {
        workers[i].stop();
        let others: Vec<&str> = workers.iter().filter(|w| w.name != workers[i].name).map(|w| w.name.as_str()).collect();
        settled(&client, PARTITIONS, &others, Duration::from_secs(10)).await;
        workers[i].spawn(&nats);
        settled(&client, PARTITIONS, &["w0", "w1", "w2"], Duration::from_secs(30)).await;
    }
    placing.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let sips = placing.1.await.expect("placing calls");
    assert!(sips.len() > 50, "traffic during the restarts: {}", sips.len());
    let records = wait_ended_in_log(&client, PARTITIONS, &sips, Duration::from_secs(40)).await;
    assert_log_is_what_was_sent(&sips, &sim.take_trace(), &records);
    let takeovers = assert_fenced(&client, PARTITIONS).await;
    assert!(takeovers.iter().sum::<usize>() >= 2 * PARTITIONS as usize, "partitions moved: {takeovers:?}");
    println!("FIGURE|rolling restart|3 workers restarted one by one; {} calls placed meanwhile, none lost", sips.len());
    drop(workers);
    bridge.shutdown().await;
}

/// The status command as a user runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_shows_workers_owners_and_lag() {
    let _serial = SERIAL.lock().await;
    let nats = NatsCluster::start(3);
    nats.wait_jetstream().await;
    let client = nats.connect().await;
    let status = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_callbus"))
            .env_remove("RUST_LOG")
            .args(["cluster", "status", "--nats", &nats.urls(), "--partitions", &PARTITIONS.to_string()])
            .args(extra)
            .output()
            .expect("callbus cluster status")
    };
    // Before any worker ran: a clear error.
    let out = status(&[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("callbus_leases"), "{out:?}");
    let workers: Vec<Worker> = ["w0", "w1"].iter().map(|n| Worker::start(&nats, n)).collect();
    settled(&client, PARTITIONS, &["w0", "w1"], Duration::from_secs(60)).await;
    // Each worker owning some is not the end of the start: the second may still be taking
    // partitions over (one without an owner for a moment). Settled is nothing moving.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = status(&["--json"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        if out.status.success() && json["moving"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the start did not settle: {json:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = status(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("workers: 2") && text.contains("w0") && text.contains("w1"), "{text}");
    let out = status(&["--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let parts = json["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), PARTITIONS as usize);
    assert!(parts.iter().all(|p| p["owner"].is_string() && p["lease_age_ms"].as_u64().is_some_and(|a| a < 1500)));
    assert!(parts.iter().all(|p| p["log_seq"].as_u64().is_some_and(|s| s > 0)), "every partition has its marker");
    // Settled: every partition is where placement puts it, nothing moves.
    assert_eq!(json["moving"], 0, "{json:#}");
    assert!(parts.iter().all(|p| p["placed_on"] == p["owner"]), "{json:#}");
    // A third worker joins: partitions move to it, and the status shows them moving until the
    // handovers are done.
    let mut workers = workers;
    workers.push(Worker::start(&nats, "w2"));
    let mut saw_moving = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = status(&["--json"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let moving = json["moving"].as_u64().unwrap_or(0);
        let on_w2 = json["partitions"].as_array().map_or(0, |ps| ps.iter().filter(|p| p["owner"] == "w2").count());
        if moving > 0 {
            saw_moving = true;
            let text = String::from_utf8_lossy(&status(&[]).stdout).into_owned();
            assert!(text.contains("→ w") || text.contains("moving"), "{text}");
        }
        if moving == 0 && on_w2 > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the join did not settle: {json:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_moving, "a join moves partitions, and the status showed them moving");
    drop(workers);
    // Leases expire: the partitions show no owner and the command says so.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = status(&[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("have no owner"));
}

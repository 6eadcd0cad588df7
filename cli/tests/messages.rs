//! What a user reads when something is wrong: errors in words (no Rust internals), hints, and
//! no library noise on client commands.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use callbus_tests::{free_port, NatsServer};

fn callbus() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_callbus"));
    cmd.env_remove("RUST_LOG").env_remove("NO_COLOR");
    cmd
}

fn run(args: &[&str]) -> Output {
    callbus().args(args).stdin(Stdio::null()).output().expect("callbus runs")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// No Rust debug formatting in what a user reads.
fn assert_in_words(said: &str) {
    for internal in ["Os {", "kind:", "CallId(", "SipCallId(", "UnknownCall", "WrongState", "\u{1b}["] {
        assert!(!said.contains(internal), "{internal:?} shown to the user:\n{said}");
    }
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `callbus up` on free ports against a simulator, answering commands; its stderr file.
fn up(nats: &str, sim_mi: &str, data: &std::path::Path) -> (Killed, std::path::PathBuf) {
    let log = data.join("up.log");
    let child = callbus()
        .args(["up", "--nats", nats, "--mi", sim_mi, "--events-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(data.join("log"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("up starts");
    let up = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !run(&["call", "--nats", nats, "--timeout", "1s", "list"]).status.success() {
        assert!(Instant::now() < deadline, "up never answered: {}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    (up, log)
}

/// A nats-server, a simulated OpenSIPS and `callbus up` on them, answering commands.
struct Running {
    nats: NatsServer,
    sim: opensips_sim::Sim,
    data: tempfile::TempDir,
    _up: Killed,
    log: std::path::PathBuf,
}

async fn running_up() -> Running {
    let nats = NatsServer::start();
    let sim = opensips_sim::Sim::start(opensips_sim::SimConfig::default()).await.expect("sim");
    let data = tempfile::tempdir().expect("tmp");
    let (up, log) = up(&nats.url(), &sim.mi_addr().to_string(), data.path());
    Running { nats, sim, data, _up: up, log }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_code_and_the_call_in_words_and_hint_at_sip_call_ids() {
    let Running { nats, .. } = &running_up().await;

    let out = run(&["call", "--nats", &nats.url(), "hold", "c019a00000000001"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("call.hold refused (unknown_call): no live call with call_id \"c019a00000000001\""),
        "{said}"
    );
    assert!(!said.contains("hint"), "shaped like a call_id: no hint\n{said}");
    assert_in_words(&said);

    let out = run(&["call", "--nats", &nats.url(), "end", "1-2345@127.0.0.1"]);
    let said = text(&out);
    assert!(said.contains("hint:") && said.contains("--sip"), "a SIP Call-ID given as a call_id: {said}");
    let out = run(&["call", "--nats", &nats.url(), "end", "--sip", "1-2345@127.0.0.1"]);
    let said = text(&out);
    assert!(said.contains("SIP Call-ID \"1-2345@127.0.0.1\"") && !said.contains("hint"), "{said}");
    assert_in_words(&said);

    // A client command prints its answer, not the NATS library's connection chatter.
    let out = run(&["call", "--nats", &nats.url(), "list"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("async_nats") && !said.contains("connected"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_in_use_stops_up_before_its_bridge_starts() {
    let Running { nats, sim, data, log: first_log, .. } = &running_up().await;
    let events = format!("127.0.0.1:{}", free_port());
    let out = callbus()
        .args(["up", "--nats", &nats.url(), "--mi", &sim.mi_addr().to_string(), "--events-listen", &events])
        .arg("--data-dir")
        .arg(data.path().join("log"))
        .output()
        .expect("runs");
    let said = text(&out);
    assert!(!out.status.success());
    assert!(said.contains("is in use by another process") && said.contains("--data-dir"), "{said}");
    assert!(!said.contains("bridge started"), "the bridge must not start:\n{said}");
    assert_in_words(&said);
    // Log files get no colour codes.
    assert_in_words(&std::fs::read_to_string(first_log).expect("log"));
}

#[test]
fn replay_of_a_mistyped_data_dir_is_an_error_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let typo = dir.path().join("callbus-dta");
    let out = run(&["replay", "--data-dir", &typo.display().to_string(), "stats"]);
    let said = text(&out);
    assert!(!out.status.success());
    assert!(said.contains("no callbus log") && said.contains("--data-dir"), "{said}");
    assert!(!typo.exists(), "replay created {}", typo.display());
}

#[test]
fn another_program_on_the_nats_port_is_named_at_once() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("nats://{}", listener.local_addr().expect("addr"));
    let data = tempfile::tempdir().expect("tmp");
    let started = Instant::now();
    let out = callbus()
        .args(["up", "--nats", &url, "--mi", "127.0.0.1:9", "--events-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .expect("runs");
    let said = text(&out);
    assert!(!out.status.success());
    assert!(said.contains("not a NATS server"), "{said}");
    assert!(started.elapsed() < Duration::from_secs(15), "said at once, not after retries");
    drop(listener);
}

#[test]
fn config_show_prints_what_up_runs_with() {
    let out = run(&["config", "show", "--node", "edge1"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("node = \"edge1\"") && said.contains("nodes = [\"edge1\"]"), "{said}");
}

#[test]
fn host_names_are_addresses_and_a_taken_port_is_said_once() {
    let out = run(&["config", "show", "--mi", "localhost:8080"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("mi = \"127.0.0.1:8080\""), "{said}");
    let out = run(&["config", "show", "--mi", "localhost"]);
    assert!(!out.status.success() && text(&out).contains("host:port"), "{}", text(&out));

    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let events = taken.local_addr().expect("addr").to_string();
    let nats = NatsServer::start();
    let data = tempfile::tempdir().expect("tmp");
    let out = callbus()
        .args(["up", "--nats", &nats.url(), "--mi", "127.0.0.1:9", "--events-listen", &events])
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .expect("runs");
    let said = text(&out);
    assert!(!out.status.success());
    assert!(said.contains(&format!("cannot bind the event listener at {events}")), "{said}");
    assert_eq!(said.matches("in use").count(), 1, "said once:\n{said}");
    assert_in_words(&said);
}

/// `callbus up` whose OpenSIPS never answers MI, with `mi_timeout`: a UDP port nobody reads
/// (every request times out), or with `closed` one where nothing listens (refused at once); its
/// stderr file. The nats-server, temp dir and socket live as long as the returns.
fn up_without_opensips(
    mi_timeout: &str,
    closed: bool,
) -> (NatsServer, tempfile::TempDir, Option<std::net::UdpSocket>, std::process::Child, std::path::PathBuf) {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().expect("tmp");
    let log = data.path().join("up.log");
    let (silent, mi) = match closed {
        true => (None, format!("127.0.0.1:{}", free_port())),
        false => {
            let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            let mi = silent.local_addr().expect("addr").to_string();
            (Some(silent), mi)
        }
    };
    let up = callbus()
        .args(["up", "--nats", &nats.url(), "--mi", &mi, "--mi-timeout", mi_timeout])
        .args(["--events-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(data.path().join("log"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("up starts");
    (nats, data, silent, up, log)
}

/// What `up` without OpenSIPS (see [`up_without_opensips`]) logs in its first 5 s, and how
/// many of its warning lines contain a text.
fn five_seconds_without_opensips(mi_timeout: &str, closed: bool) -> (String, impl Fn(&str) -> usize) {
    let (_nats, _data, _socket, up, log) = up_without_opensips(mi_timeout, closed);
    let up = Killed(up);
    std::thread::sleep(Duration::from_secs(5));
    drop(up);
    let said = std::fs::read_to_string(&log).expect("log");
    assert_in_words(&said);
    let lines = said.clone();
    (said, move |what: &str| lines.lines().filter(|l| l.contains("WARN") && l.contains(what)).count())
}

#[test]
fn an_opensips_that_does_not_answer_is_said_once_not_every_second() {
    // Five health checks time out: each thing is said once.
    let (said, warned) = five_seconds_without_opensips("300ms", false);
    assert_eq!(warned("callbus_bridge::mi: OpenSIPS at"), 1, "the MI timeouts:\n{said}");
    assert_eq!(warned("does not answer MI `uptime`"), 1, "no events until it answers:\n{said}");
    assert_eq!(warned("cannot reconcile with OpenSIPS yet"), 1, "the engine's start-up reconciliation:\n{said}");
}

#[test]
fn an_opensips_that_is_not_running_is_said_once_not_every_second() {
    // Each health check and reconciliation attempt is refused at once: said once.
    let (said, warned) = five_seconds_without_opensips("5s", true);
    assert_eq!(warned("callbus_bridge::mi: nothing answers MI at"), 1, "MI refused:\n{said}");
}

#[test]
fn a_stop_does_not_wait_for_an_opensips_that_does_not_answer() {
    let (nats, _data, _silent, mut up, log) = up_without_opensips("60s", false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !run(&["call", "--nats", &nats.url(), "--timeout", "1s", "list"]).status.success() {
        assert!(Instant::now() < deadline, "up never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its first `uptime` waits for OpenSIPS (60 s at most); SIGTERM must not wait with it.
    let stopping = Instant::now();
    Command::new("kill").args(["-TERM", &up.id().to_string()]).status().expect("kill");
    let mut stopped = None;
    while stopping.elapsed() < Duration::from_secs(30) {
        if let Some(status) = up.try_wait().expect("wait") {
            stopped = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = up.kill();
    let _ = up.wait();
    let status = stopped.expect("up stopped on SIGTERM instead of waiting for the MI timeout");
    assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
}

//! The harness of the real-OpenSIPS tier: a real OpenSIPS 3.4 started from
//! `deploy/opensips/opensips.cfg` unchanged, a nats-server, `callbus up` as a user runs it, and
//! sipp phones. Everything is started per flow and stopped when the flow ends, whatever
//! happens (every child runs in its own process group, killed on drop).
//!
//! OpenSIPS is found through `CALLBUS_OPENSIPS`, an install prefix (`scripts/build-opensips.sh`
//! makes one); without it every flow says it skipped and why. The cfg's addresses are fixed
//! (SIP on 127.0.0.1:5060, MI on 127.0.0.1:8080), so flows run one at a time.

use std::net::UdpSocket;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use callbus_schemas::command::CallNotification;
use callbus_tests::{free_port, NatsServer};
use futures::StreamExt;
use serde_json::{json, Value};

/// OpenSIPS's SIP address in the shipped cfg.
pub const SIP: &str = "127.0.0.1:5060";
/// OpenSIPS's MI address in the shipped cfg.
pub const MI: &str = "127.0.0.1:8080";
/// The node name `callbus up` runs with in the tier.
pub const NODE: &str = "real";
/// How long a flow waits for one notification.
const NOTE_TIMEOUT: Duration = Duration::from_secs(45);

/// One flow at a time: the cfg's ports are fixed.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The OpenSIPS install prefix, or why the tier does not run.
pub fn opensips_prefix() -> Result<PathBuf, String> {
    let Some(prefix) = std::env::var_os("CALLBUS_OPENSIPS") else {
        return Err("CALLBUS_OPENSIPS is not set: build OpenSIPS 3.4 with scripts/build-opensips.sh SRC PREFIX and export CALLBUS_OPENSIPS=PREFIX".into());
    };
    let prefix = PathBuf::from(prefix);
    let binary = prefix.join("sbin/opensips");
    // Set but wrong is a mistake to report, not a reason to skip.
    assert!(
        binary.is_file(),
        "CALLBUS_OPENSIPS={} has no sbin/opensips: point it at the PREFIX given to scripts/build-opensips.sh",
        prefix.display()
    );
    Ok(prefix)
}

/// The repository's root (this crate is `cli/`).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A child process in its own process group, killed (the whole group) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({:?}): {e}", cmd.get_program()));
        Proc { child, name: name.into() }
    }

    /// Sends `signal` to the whole process group.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
    }

    /// Waits up to `limit` for the process to exit; its status, or None.
    pub fn wait_for(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; the exit status of a clean stop.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.signal("KILL"); // children left behind
            return Some(status);
        }
        self.signal("TERM");
        let status = self.wait_for(grace);
        self.signal("KILL");
        let _ = self.child.wait();
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }
}

/// One MI request straight to OpenSIPS (not through callbus): the reply as JSON, or the
/// plain-text reply as a JSON string; None when nothing came back within `wait`.
pub fn mi_raw(request: &[u8], wait: Duration) -> Option<Value> {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
    socket.set_read_timeout(Some(wait)).expect("timeout");
    socket.send_to(request, MI).expect("send to OpenSIPS MI");
    let mut buf = vec![0u8; 65_536];
    let n = socket.recv(&mut buf).ok()?;
    let text = &buf[..n];
    Some(serde_json::from_slice(text).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(text).into_owned())))
}

/// An MI command straight to OpenSIPS; its whole JSON-RPC reply.
pub fn mi(method: &str, params: Value) -> Value {
    let request = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": "tier"});
    mi_raw(request.to_string().as_bytes(), Duration::from_secs(3))
        .unwrap_or_else(|| panic!("OpenSIPS did not answer MI {method}"))
}

/// A real OpenSIPS running the shipped cfg.
pub struct OpenSips {
    proc: Option<Proc>,
    prefix: PathBuf,
    log: PathBuf,
    starts: u32,
}

impl OpenSips {
    /// Starts OpenSIPS and waits until MI answers.
    pub fn start(prefix: &Path, dir: &Path) -> OpenSips {
        let mut os = OpenSips { proc: None, prefix: prefix.to_owned(), log: dir.join("opensips.log"), starts: 0 };
        os.spawn();
        os
    }

    fn spawn(&mut self) {
        for addr in [SIP, MI] {
            if let Err(e) = UdpSocket::bind(addr) {
                panic!(
                    "UDP {addr} is taken ({e}): the shipped cfg needs it; stop whatever holds it (another OpenSIPS?)"
                );
            }
        }
        self.starts += 1;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("opensips log file");
        let modules = self.prefix.join("lib64/opensips/modules");
        let modules = if modules.is_dir() { modules } else { self.prefix.join("lib/opensips/modules") };
        let proc = Proc::spawn(
            "opensips",
            Command::new(self.prefix.join("sbin/opensips"))
                .args(["-F", "-m", "64", "-M", "16", "-f"])
                .arg(repo().join("deploy/opensips/opensips.cfg"))
                // The cfg names modules without a path (a package's mpath finds them); a
                // build from source keeps them here.
                .env("LD_LIBRARY_PATH", modules)
                .stdout(log.try_clone().expect("log"))
                .stderr(log),
        );
        self.proc = Some(proc);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let request = br#"{"jsonrpc":"2.0","method":"version","id":1}"#;
            if mi_raw(request, Duration::from_millis(200)).is_some() {
                return;
            }
            if let Some(p) = self.proc.as_mut() {
                if let Ok(Some(status)) = p.child.try_wait() {
                    panic!("OpenSIPS exited at start ({status}):\n{}", self.log_tail(40));
                }
            }
            assert!(Instant::now() < deadline, "OpenSIPS MI did not answer within 15 s:\n{}", self.log_tail(40));
        }
    }

    /// Stops OpenSIPS (SIGTERM, SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
        }
    }

    /// Stops and starts it again: it forgets its dialogs, sessions and subscriptions.
    pub fn restart(&mut self) {
        self.stop();
        // Its UDP sockets go with its processes.
        let deadline = Instant::now() + Duration::from_secs(5);
        while UdpSocket::bind(MI).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.spawn();
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What a sipp phone did.
pub struct PhoneRun {
    /// sipp's exit code (0: every call went as its scenario says).
    pub code: Option<i32>,
    /// The first line of every SIP message it received, in order.
    pub received: Vec<String>,
    /// The first line of every SIP message it sent, in order.
    pub sent: Vec<String>,
    /// Every SIP message it received, whole, in order.
    pub received_messages: Vec<String>,
    /// Its whole message log.
    pub log: String,
}

impl PhoneRun {
    /// The value of the first `name:` header in the log (e.g. `Call-ID`).
    pub fn header(&self, name: &str) -> Option<String> {
        header(&self.log, name)
    }

    /// Received messages whose first line starts with `start` (e.g. `INVITE `, `SIP/2.0 200`).
    pub fn received_count(&self, start: &str) -> usize {
        self.received.iter().filter(|l| l.starts_with(start)).count()
    }

    /// The whole text of the received messages whose first line starts with `start`.
    pub fn received_texts(&self, start: &str) -> Vec<&str> {
        self.received_messages.iter().filter(|m| m.starts_with(start)).map(String::as_str).collect()
    }
}

/// The value of the first `name:` header line in `text`.
pub fn header(text: &str, name: &str) -> Option<String> {
    let prefix = format!("{}:", name.to_ascii_lowercase());
    text.lines().find(|l| l.to_ascii_lowercase().starts_with(&prefix)).map(|l| l[prefix.len()..].trim().to_owned())
}

/// A sipp phone running one scenario of `cli/tests/sipp/`.
pub struct Phone {
    proc: Proc,
    /// Its SIP port on 127.0.0.1.
    pub port: u16,
    messages: PathBuf,
    errors: PathBuf,
}

impl Phone {
    /// Its address as a SIP URI with user `user`.
    pub fn uri(&self, user: &str) -> String {
        format!("sip:{user}@127.0.0.1:{}", self.port)
    }

    /// Waits for sipp to end (up to `limit`); panics with its logs unless it exited 0.
    pub fn expect_ok(mut self, limit: Duration) -> PhoneRun {
        let status = self.proc.wait_for(limit);
        let run = self.run(status.and_then(|s| s.code()));
        let errors = std::fs::read_to_string(&self.errors).unwrap_or_default();
        assert_eq!(
            run.code,
            Some(0),
            "sipp phone {} did not end as its scenario says (exit {:?}; None: still running after {limit:?}).\nreceived: {:?}\nsent: {:?}\nerrors: {}",
            self.proc.name,
            run.code,
            run.received,
            run.sent,
            errors.lines().filter(|l| !l.contains("epoll")).collect::<Vec<_>>().join("\n")
        );
        run
    }

    /// What it did so far (it keeps running).
    pub fn so_far(&self) -> PhoneRun {
        self.run(None)
    }

    fn run(&self, code: Option<i32>) -> PhoneRun {
        let log = std::fs::read_to_string(&self.messages).unwrap_or_default();
        let (mut received, mut sent, mut received_messages) = (Vec::new(), Vec::new(), Vec::new());
        for chunk in log.split("----------------------------------------------- ").skip(1) {
            let mut lines = chunk.lines().skip(1);
            let Some(kind) = lines.next() else { continue };
            let message: Vec<&str> = lines.skip_while(|l| l.trim().is_empty()).collect();
            let Some(first) = message.first() else { continue };
            if kind.contains("received") {
                received.push(first.trim().to_owned());
                received_messages.push(message.join("\n"));
            } else if kind.contains("sent") {
                sent.push(first.trim().to_owned());
            }
        }
        PhoneRun { code, received, sent, received_messages, log }
    }
}

/// A free UDP port on 127.0.0.1 (for a sipp phone).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).expect("a free UDP port")
}

/// The tier for one flow: OpenSIPS, nats-server, `callbus up`, and a NATS client that sees every
/// notification.
pub struct Tier {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    pub dir: tempfile::TempDir,
    pub opensips: OpenSips,
    pub nats: NatsServer,
    pub up: Option<Proc>,
    pub events_addr: String,
    pub callapi_addr: String,
    pub client: async_nats::Client,
    notes: async_nats::Subscriber,
    /// Every notification received so far, in arrival order.
    pub seen: Vec<CallNotification>,
    flow: String,
    started: Instant,
}

impl Tier {
    /// Starts everything for `flow`, or says why the tier is skipped and returns None.
    pub async fn start(flow: &str) -> Option<Tier> {
        let prefix = match opensips_prefix() {
            Ok(p) => p,
            Err(why) => {
                println!("real OpenSIPS tier: skipped ({why})");
                return None;
            }
        };
        assert!(
            Command::new("sipp").arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok(),
            "sipp not found: the real tier's phones are sipp (Debian: apt-get install sip-tester)"
        );
        let serial = SERIAL.lock().await;
        let started = Instant::now();
        let dir = tempfile::tempdir().expect("a temporary dir");
        let opensips = OpenSips::start(&prefix, dir.path());
        let nats = NatsServer::start();
        let client = async_nats::connect(nats.url()).await.expect("connect to nats-server");
        let notes = client.subscribe("callbus.call.>").await.expect("subscribe");
        client.flush().await.expect("flush");
        let mut tier = Tier {
            _serial: serial,
            events_addr: format!("127.0.0.1:{}", free_udp_port()),
            callapi_addr: format!("127.0.0.1:{}", free_port()),
            dir,
            opensips,
            nats,
            up: None,
            client,
            notes,
            seen: Vec::new(),
            flow: flow.into(),
            started,
        };
        tier.start_up().await;
        Some(tier)
    }

    /// The data dir of `callbus up`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts `callbus up` (again) and waits until it has subscribed to OpenSIPS's events and
    /// its engine answers.
    pub async fn start_up(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("up.log"))
            .expect("up log file");
        let up = Proc::spawn(
            "callbus up",
            Command::new(env!("CARGO_BIN_EXE_callbus"))
                .args(["up", "--nats", &self.nats.url(), "--mi", MI, "--events-listen", &self.events_addr])
                .args(["--node", NODE, "--nodes", NODE, "--callapi-listen", &self.callapi_addr])
                .arg("--data-dir")
                .arg(self.data_dir())
                .env("NO_COLOR", "1")
                .env("RUST_LOG", "info")
                .stdout(stderr.try_clone().expect("log"))
                .stderr(stderr),
        );
        self.up = Some(up);
        self.wait_subscribed().await;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ask = self.client.request("callbus.cmd.call.list", "{}".into());
            if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(2), ask).await {
                let reply: Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
                if reply["result"]["calls"].is_array() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the engine of callbus up did not answer call.list:\n{}",
                self.up_log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until OpenSIPS lists callbus's four event subscriptions.
    pub async fn wait_subscribed(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(up) = self.up.as_mut() {
                if let Ok(Some(status)) = up.child.try_wait() {
                    panic!("callbus up exited ({status}):\n{}", self.up_log_tail(40));
                }
            }
            let listed = mi("subscribers_list", json!({}));
            let port = self.events_addr.rsplit(':').next().unwrap_or_default().to_owned();
            let subscribed = listed["result"]["Events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| {
                    e["Subscribers"].as_array().into_iter().flatten().any(|s| {
                        s["socket"].as_str().is_some_and(|s| s.ends_with(&format!(":{port}")))
                            && s["ttl"].as_str() != Some("expired")
                    })
                })
                .count();
            if subscribed >= 4 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "callbus up did not subscribe to OpenSIPS's events: {listed}\n{}",
                self.up_log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops `callbus up` with SIGTERM; asserts it exits cleanly.
    pub fn stop_up(&mut self) {
        if let Some(mut up) = self.up.take() {
            let status = up.stop(Duration::from_secs(15));
            assert!(
                status.is_some_and(|s| s.success()),
                "callbus up did not stop cleanly on SIGTERM ({status:?}):\n{}",
                self.up_log_tail(30)
            );
        }
    }

    /// Kills `callbus up` with SIGKILL, as a crash would.
    pub fn kill_up(&mut self) {
        if let Some(up) = self.up.take() {
            up.signal("KILL");
            drop(up);
        }
    }

    /// The last lines of `callbus up`'s log.
    pub fn up_log_tail(&self, lines: usize) -> String {
        tail(&self.dir.path().join("up.log"), lines)
    }

    /// Sends a command; its reply as JSON.
    pub async fn cmd(&self, verb: &str, body: Value) -> Value {
        let ask = self.client.request(format!("callbus.cmd.{verb}"), body.to_string().into());
        let reply = tokio::time::timeout(Duration::from_secs(10), ask)
            .await
            .unwrap_or_else(|_| panic!("{verb}: no answer within 10 s"))
            .unwrap_or_else(|e| panic!("{verb}: {e}"));
        serde_json::from_slice(&reply.payload).unwrap_or_else(|e| panic!("{verb} answer is not JSON ({e})"))
    }

    /// Sends a command that must be accepted; its `call_id`.
    pub async fn accepted(&self, verb: &str, body: Value) -> String {
        let reply = self.cmd(verb, body.clone()).await;
        assert_eq!(reply["accepted"], json!(true), "{verb} {body} was not accepted: {reply}");
        reply["call_id"].as_str().expect("call_id").to_owned()
    }

    /// The first notification (seen before or arriving within 45 s) that `pred` accepts.
    pub async fn note(&mut self, what: &str, pred: impl Fn(&CallNotification) -> bool) -> CallNotification {
        if let Some(n) = self.seen.iter().find(|n| pred(n)) {
            return n.clone();
        }
        let deadline = Instant::now() + NOTE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(msg)) = tokio::time::timeout(left, self.notes.next()).await else {
                panic!(
                    "{}: {what} not notified within {NOTE_TIMEOUT:?}; seen: {:?}\n--- OpenSIPS log:\n{}\n--- callbus up log:\n{}",
                    self.flow,
                    self.seen.iter().map(|n| format!("{}:{}", n.call_id, n.event)).collect::<Vec<_>>(),
                    self.opensips.log_tail(15),
                    self.up_log_tail(25)
                );
            };
            let note: CallNotification = serde_json::from_slice(&msg.payload).expect("a CallNotification");
            let hit = pred(&note);
            self.seen.push(note.clone());
            if hit {
                return note;
            }
        }
    }

    /// The notification `event` of `call_id`.
    pub async fn event(&mut self, call_id: &str, event: &str) -> CallNotification {
        self.note(&format!("{event} of {call_id}"), |n| n.call_id == call_id && n.event == event).await
    }

    /// The notification `event` of the call whose SIP Call-ID is `sip_call_id`.
    pub async fn sip_event(&mut self, sip_call_id: &str, event: &str) -> CallNotification {
        self.note(&format!("{event} of Call-ID {sip_call_id}"), |n| {
            n.sip_call_id.as_deref() == Some(sip_call_id) && n.event == event
        })
        .await
    }

    /// The events notified so far for `call_id`, in order.
    pub fn events_of(&self, call_id: &str) -> Vec<String> {
        self.seen.iter().filter(|n| n.call_id == call_id).map(|n| n.event.clone()).collect()
    }

    /// Starts a sipp phone named `name` with `scenario` (a file of `cli/tests/sipp/`) on a free
    /// port; `args` are sipp's (e.g. `-d 500`, `-key ruri …`, the remote address).
    pub fn phone(&self, name: &str, scenario: &str, args: &[&str]) -> Phone {
        let port = free_udp_port();
        let messages = self.dir.path().join(format!("{name}.msg"));
        let errors = self.dir.path().join(format!("{name}.err"));
        let proc = Proc::spawn(
            &format!("sipp {name}"),
            Command::new("sipp")
                .arg("-sf")
                .arg(repo().join("cli/tests/sipp").join(scenario))
                .args(["-i", "127.0.0.1", "-p", &port.to_string(), "-m", "1", "-s", name])
                .args(["-timeout", "100s", "-timeout_error", "-nostdin", "-trace_msg", "-trace_err"])
                .arg("-message_file")
                .arg(&messages)
                .arg("-error_file")
                .arg(&errors)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        // Ready once it holds its port.
        let deadline = Instant::now() + Duration::from_secs(5);
        while UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            assert!(Instant::now() < deadline, "sipp {name} did not open UDP {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Phone { proc, port, messages, errors }
    }

    /// A phone that answers calls (`answer.xml`), ringing `ring_ms` first.
    pub fn callee(&self, name: &str, scenario: &str, ring_ms: u64) -> Phone {
        self.phone(name, scenario, &["-d", &ring_ms.to_string()])
    }

    /// A phone that calls `ruri` through OpenSIPS (`call.xml`); it hangs up after `talk_ms` when
    /// given, otherwise it waits for the far end's BYE.
    pub fn caller(&self, name: &str, ruri: &str, talk_ms: Option<u64>) -> Phone {
        self.caller_refer(name, ruri, talk_ms, false)
    }

    /// A caller that answers a REFER with 603 Decline when `decline` is true (202 otherwise).
    pub fn caller_refer(&self, name: &str, ruri: &str, talk_ms: Option<u64>, decline: bool) -> Phone {
        let hangup = if talk_ms.is_some() { "yes" } else { "no" };
        let d = talk_ms.unwrap_or(0).to_string();
        let decline = if decline { "yes" } else { "no" };
        let keys = ["-key", "ruri", ruri, "-key", "hangup", hangup, "-key", "decline_refer", decline];
        self.phone(name, "call.xml", &[&keys[..], &["-d", &d, SIP]].concat())
    }

    /// Waits until `phone` has received a request starting with `start` (e.g. `REFER `); its text.
    pub async fn phone_received(&self, phone: &Phone, start: &str) -> String {
        let deadline = Instant::now() + NOTE_TIMEOUT;
        loop {
            if let Some(text) = phone.so_far().received_texts(start).first() {
                return (*text).to_owned();
            }
            assert!(Instant::now() < deadline, "{}: the phone got no {start} within {NOTE_TIMEOUT:?}", self.flow);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops `callbus up` cleanly and checks that its whole log replays to the same states and
    /// effects (`callbus replay check`); prints the flow's time.
    pub fn finish(mut self) {
        self.stop_up();
        let out = Command::new(env!("CARGO_BIN_EXE_callbus"))
            .args(["replay", "check", "--data-dir"])
            .arg(self.data_dir())
            .env("NO_COLOR", "1")
            .output()
            .expect("callbus replay check runs");
        assert!(
            out.status.success(),
            "{}: the log does not replay:\n{}{}",
            self.flow,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Every notification a real OpenSIPS made callbus send is one docs/subjects.md lists.
        let log = callbus_engine::log::SledLog::open(&self.data_dir()).expect("the log opens");
        let undocumented: Vec<String> = callbus_engine::log::EventLog::records_from(&log, 1)
            .filter_map(Result::ok)
            .flat_map(|r| callbus_tests::stack::undocumented_notifications(&r))
            .collect();
        assert!(
            undocumented.is_empty(),
            "{}: notifications docs/subjects.md does not list: {undocumented:#?}",
            self.flow
        );
        println!("FLOW|{}|{:.1} s|ok", self.flow, self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Tier {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {}: OpenSIPS log (last lines):\n{}\n--- callbus up log (last lines):\n{}",
                self.flow,
                self.opensips.log_tail(30),
                self.up_log_tail(40)
            );
        }
        self.up.take();
        self.opensips.stop();
        if std::thread::panicking() {
            // The phones' message logs, OpenSIPS's and callbus's logs stay for a look.
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("a temporary dir"));
            eprintln!("--- {}: logs kept in {}", self.flow, dir.keep().display());
        }
    }
}

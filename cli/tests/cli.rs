//! The `callbus` binary as a user runs it.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use callbus_tests::{free_port, NatsServer};
use opensips_sim::{Sim, SimConfig};

fn callbus() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_callbus"));
    cmd.env_remove("RUST_LOG").env("NO_COLOR", "1");
    cmd
}

fn run(args: &[&str]) -> Output {
    callbus().args(args).output().expect("callbus runs")
}

#[test]
fn help_lists_every_subcommand_with_a_line_each() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["up", "bridge", "engine", "sim", "demo", "replay", "call", "ua", "events", "mi"] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{cmd} ")))
            .unwrap_or_else(|| panic!("{cmd} missing:\n{text}"));
        assert!(line.split_whitespace().count() > 2, "{cmd} has no description");
    }
}

#[test]
fn demo_runs_a_whole_call_and_prints_its_timeline() {
    let out = run(&["demo", "--step", "20ms"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for step in ["connected", "held", "resumed", "ended", "The call's timeline", "ua_session_client_start"] {
        assert!(text.contains(step), "{step} missing:\n{text}");
    }
    let timeline_rows = text.lines().skip_while(|l| !l.contains("time (UTC)")).skip(1).take_while(|l| !l.is_empty());
    assert!(timeline_rows.count() >= 10, "the timeline shows every logged input:\n{text}");
}

#[test]
fn bad_flags_are_refused_with_the_flag_named() {
    let out = run(&["bridge", "--mi-timeout", "soon"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mi-timeout"));
    let out = run(&["mi", "--nats", "nats://127.0.0.1:1", "version"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to NATS"));
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "callbus did not exit within 10 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mi_until_ok(nats: &str, args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut all = vec!["mi", "--nats", nats, "--timeout", "2s"];
        all.extend_from_slice(args);
        let out = run(&all);
        if out.status.success() || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mi_through_a_running_bridge() {
    let nats = NatsServer::start();
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let events = format!("127.0.0.1:{}", free_port());
    let mut bridge = Running(
        callbus()
            .args(["bridge", "--nats", &nats.url(), "--mi", &sim.mi_addr().to_string(), "--events-listen", &events])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bridge starts"),
    );
    let out = mi_until_ok(&nats.url(), &["version"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OpenSIPS (3.4.18"));
    let out = run(&["mi", "--nats", &nats.url(), "dlg_end_dlg", "dialog_id=nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("404 Requested Dialog not found"));
    let out = run(&["mi", "--nats", &nats.url(), "kill"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("(bridge)"), "refused by the allow-list");
    assert!(terminate(&mut bridge.0).success(), "SIGTERM exits 0");
}

#[tokio::test(flavor = "multi_thread")]
async fn up_starts_nats_when_none_answers_and_stops_cleanly() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let events = format!("127.0.0.1:{}", free_port());
    let data = tempfile::tempdir().expect("tmp");
    let mut up = Running(
        callbus()
            .args(["up", "--nats", &url, "--mi", &sim.mi_addr().to_string(), "--events-listen", &events])
            .args(["--data-dir", &data.path().display().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("up starts"),
    );
    let out = mi_until_ok(&url, &["uptime"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The engine runs too: a call placed in OpenSIPS shows up in call.list.
    let callid = sim.proxied_call(opensips_sim::CallScript::default());
    let client = async_nats::connect(&url).await.expect("connect");
    let listed_deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply =
            client.request("callbus.cmd.call.list", bytes::Bytes::from_static(b"{}")).await.expect("engine answers");
        if String::from_utf8_lossy(&reply.payload).contains(&callid) {
            break;
        }
        assert!(Instant::now() < listed_deadline, "the call never showed in call.list");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let subscribed_deadline = Instant::now() + Duration::from_secs(5);
    while sim.live_subscriptions().len() < 4 {
        assert!(Instant::now() < subscribed_deadline, "up subscribes to the default events");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(terminate(&mut up.0).success(), "SIGTERM exits 0");
    assert!(sim.live_subscriptions().is_empty(), "a clean stop unsubscribes");
    assert!(data.path().join("db").exists(), "the log was written in --data-dir");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the child nats-server is stopped too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_commands_on_a_log_the_engine_wrote() {
    let mut stack = callbus_tests::stack::Stack::start().await;
    let (call_id, sip) = stack.confirmed_call(opensips_sim::CallScript::default()).await;
    stack.cmd("call.end", serde_json::json!({"call_id": call_id})).await;
    stack.notes_until(|n| n.event == "ended").await;
    stack.shutdown().await;
    let dir = stack.data.path().display().to_string();

    let out = run(&["replay", "--data-dir", &dir, "timeline", "--call", &sip]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().count() >= 6 && text.contains("cmd call.end") && text.contains("→ ended"), "{text}");

    let out = run(&["replay", "--data-dir", &dir, "check"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 divergences, 0 unreadable"));
    let out = run(&["replay", "--data-dir", &dir, "check", "--workers", "1", "--json"]);
    let one: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert!(out.status.success() && one["records"].as_u64() > Some(4) && one["divergences"] == serde_json::json!([]));
    for bad in ["0", "x", "-1", "65"] {
        let out = run(&["replay", "--data-dir", &dir, "check", "--workers", bad]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && (err.contains("--workers") || err.contains("'-1'")), "{bad}: {err}");
    }

    let out = run(&["replay", "--data-dir", &dir, "export", "--format", "jsonl"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));

    let out = run(&["replay", "--data-dir", &dir, "stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json stats");
    assert_eq!(stats["calls"], serde_json::json!(1));
    assert!(stats["stored_bytes"].as_u64() > Some(100), "the records' stored bytes: {stats}");
    let out = run(&["replay", "--data-dir", &dir, "stats"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("records as stored"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let out = run(&["replay", "--data-dir", &dir, "export", "--format", "xml"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("jsonl or msgpack"));
    let out = run(&["replay", "--data-dir", &dir, "timeline", "--call", "nope"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no call"));
    let out = run(&["replay", "--data-dir", &dir, "check", "--call", "nope"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no call \"nope\""));

    // Retention moves the ended call to an archive: `--archive` reads it like the log.
    let archive = tempfile::tempdir().expect("tmp");
    {
        use callbus_engine::log::EventLog;
        let log = callbus_engine::log::SledLog::open(stack.data.path()).expect("open");
        let archived = callbus_engine::log::archive::Archive::open(archive.path()).expect("archive");
        let step = log.prune(1, u64::MAX, |_| false, 100_000, Some(&archived)).expect("prune");
        log.commit().await.expect("commit");
        assert_eq!(step.calls, 1, "{step:?}");
    }
    let adir = archive.path().display().to_string();
    let out = run(&["replay", "--data-dir", &dir, "timeline", "--call", &sip]);
    assert!(!out.status.success(), "the call left the log");
    let out = run(&["replay", "--data-dir", &dir, "--archive", &adir, "timeline", "--call", &sip]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cmd call.end") && text.contains("→ ended"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("records from the archive"));
    let out = run(&["replay", "--data-dir", &dir, "--archive", &adir, "check"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 divergences, 0 unreadable"), "{out:?}");
    let out = run(&["replay", "--archive", "/nonexistent/archive", "stats"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot list the archive"), "{err}");
}

async fn run_async(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&refs)
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_and_events_drive_a_live_engine() {
    let mut stack = callbus_tests::stack::Stack::start().await;
    let url = stack.nats.url();
    // `events` sees a new call's notifications.
    let tail = tokio::task::spawn_blocking({
        let url = url.clone();
        move || run(&["events", "--nats", &url, "--count", "3", "--duration", "10s"])
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (call_id, sip) = stack.confirmed_call(opensips_sim::CallScript::default()).await;
    let tail = tail.await.expect("join");
    assert!(tail.status.success());
    let text = String::from_utf8_lossy(&tail.stdout);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.contains(&call_id) && text.contains("confirmed"), "{text}");

    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let out = run_async(s(&["call", "--nats", &url, "--wait", "--cmd-id", "cli-1", "hold", "--sip", &sip])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("accepted: call") && text.contains("held") && text.contains("command_succeeded"), "{text}");

    let out = run_async(s(&["call", "--nats", &url, "list", "--state", "confirmed"])).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains(&call_id));

    let out = run_async(s(&["call", "--nats", &url, "hold", &call_id])).await;
    assert_eq!(out.status.code(), Some(1), "already held: refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused (wrong_state)"));
    let out = run_async(s(&["call", "--nats", &url, "transfer", &call_id, "both", "sip:x@y"])).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"leg\" must be"));
    let out = run_async(s(&["call", "--nats", &url, "get", "no-such-call"])).await;
    assert_eq!(out.status.code(), Some(1));
    stack.shutdown().await;
    let out = run_async(s(&["call", "--nats", &url, "--timeout", "1s", "list"])).await;
    assert!(!out.status.success(), "no engine: a clear failure, not a hang");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_start_and_ua_commands_follow_the_call_and_fail_with_the_reason() {
    let mut stack = callbus_tests::stack::Stack::start().await;
    let url = stack.nats.url();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let out = run_async(s(&["call", "--nats", &url, "start", "sip:alice@127.0.0.1", "sip:bob@127.0.0.1"])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for step in ["dialing", "answered", "ringing", "connected", "command_succeeded"] {
        assert!(text.contains(step), "{step} missing: {text}");
    }
    let out = run_async(s(&["call", "--nats", &url, "start", "sip:alice@127.0.0.1", "sip:busy@127.0.0.1"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("busy"), "{}", String::from_utf8_lossy(&out.stderr));

    let out = run_async(s(&[
        "ua",
        "--nats",
        &url,
        "start",
        "sip:carol@127.0.0.1",
        "--from",
        "sip:me@127.0.0.1",
        "--body",
        "v=0\r\nm=audio 4000 RTP/AVP 0\r\n",
        "--header",
        "X-Case: 7",
    ]))
    .await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let call_id = text
        .lines()
        .find_map(|l| l.strip_prefix("accepted: call "))
        .and_then(|l| l.split(',').next())
        .expect("call id")
        .to_owned();
    let out = run_async(s(&[
        "ua",
        "--nats",
        &url,
        "update",
        &call_id,
        "INFO",
        "--body",
        "Signal=1",
        "--content-type",
        "application/dtmf-relay",
    ]))
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("update_answered"));
    let out = run_async(s(&["ua", "--nats", &url, "terminate", &call_id])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run_async(s(&["ua", "--nats", &url, "start", "sip:busy@127.0.0.1", "--from", "sip:me@127.0.0.1"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("busy"));
    let out = run_async(s(&["ua", "--nats", &url, "answer", "c-none", "200"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused (unknown_call)"));
    stack.shutdown().await;
}

/// GETs `http://addr/metrics` and returns the samples: `name{labels}` → value.
fn scrape(addr: &str) -> std::collections::HashMap<String, f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_owned(), v.parse().ok()?))))
        .collect()
}

fn sample(samples: &std::collections::HashMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")) || k.as_str() == name)
        .filter(|(k, _)| labels.iter().all(|l| k.contains(l)))
        .map(|(_, v)| *v)
        .sum()
}

/// `callbus up --node m1` with its events and metrics on ports free a moment ago, answering MI;
/// started again on other ports when another process took one of them meanwhile (the race of
/// picking a free port for a child). Returns it and its metrics address.
fn up_on_free_ports(nats: &str, mi: &str, data: &std::path::Path) -> (Running, String) {
    for attempt in 1..=3 {
        let events = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let stderr_path = data.join(format!("up-{attempt}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut up = Running(
            callbus()
                .args(["up", "--nats", nats, "--mi", mi, "--events-listen", &events])
                .args(["--data-dir", &data.join("log").display().to_string(), "--metrics-listen", &metrics])
                .args(["--node", "m1"])
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("up starts"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = up.0.try_wait().expect("wait") {
                let said = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                assert!(attempt < 3 && said.contains("in use"), "up exited ({status}): {said}");
                break;
            }
            let out = run(&["mi", "--nats", nats, "--timeout", "2s", "--node", "m1", "uptime"]);
            if out.status.success() {
                return (up, metrics);
            }
            assert!(Instant::now() < deadline, "up never answered MI: {}", String::from_utf8_lossy(&out.stderr));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    unreachable!("three attempts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_metrics_and_sigterm_under_traffic_loses_nothing_acknowledged() {
    let nats = NatsServer::start();
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let data = tempfile::tempdir().expect("tmp");
    let (mut up, metrics) = up_on_free_ports(&nats.url(), &sim.mi_addr().to_string(), data.path());
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.live_subscriptions().len() < 4 {
        assert!(Instant::now() < deadline, "up subscribes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let calls: Vec<String> = (0..40).map(|_| sim.proxied_call(opensips_sim::CallScript::default())).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = client
            .request("callbus.cmd.call.list", bytes::Bytes::from_static(br#"{"state":"confirmed"}"#))
            .await
            .expect("engine");
        let listed: serde_json::Value = serde_json::from_slice(&reply.payload).expect("json");
        if listed["result"]["calls"].as_array().is_some_and(|c| c.len() == calls.len()) {
            break;
        }
        assert!(Instant::now() < deadline, "the calls never all showed as confirmed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hold = serde_json::json!({"sip_call_id": calls[0], "cmd_id": "m-hold"});
    let reply = client.request("callbus.cmd.call.hold", hold.to_string().into()).await.expect("hold");
    assert!(String::from_utf8_lossy(&reply.payload).contains("\"accepted\":true"));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let samples = scrape(&metrics);
    assert!(
        sample(&samples, "callbus_bridge_events_total", &["event=\"E_DLG_STATE_CHANGED\""]) >= 120.0,
        "{samples:?}"
    );
    assert!(sample(&samples, "callbus_bridge_datagrams_total", &["node=\"m1\""]) >= 120.0);
    assert!(sample(&samples, "callbus_bridge_mi_requests_total", &["command=\"call_hold\"", "outcome=\"ok\""]) >= 1.0);
    assert!(sample(&samples, "callbus_bridge_mi_duration_seconds_count", &["command=\"call_hold\""]) >= 1.0);
    assert!(sample(&samples, "callbus_engine_commands_total", &["verb=\"call.hold\"", "outcome=\"accepted\""]) >= 1.0);
    assert!(sample(&samples, "callbus_engine_commands_total", &["verb=\"call.list\"", "outcome=\"data\""]) >= 1.0);
    assert!(sample(&samples, "callbus_engine_command_duration_seconds_bucket", &["le=\"+Inf\""]) >= 2.0);
    assert!(sample(&samples, "callbus_engine_log_appends_total", &[]) >= 120.0);
    assert!(sample(&samples, "callbus_engine_log_flush_duration_seconds_count", &[]) >= 1.0);
    // The live-calls gauge is refreshed every second.
    let deadline = Instant::now() + Duration::from_secs(3);
    while sample(&scrape(&metrics), "callbus_engine_live_calls", &["kind=\"dialog\""]) < 40.0 {
        assert!(Instant::now() < deadline, "the live-calls gauge counts the 40 calls");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sample(&samples, "callbus_engine_inputs_total", &["input=\"event\""]) >= 120.0);

    // Under traffic: end the calls one after the other, and stop `up` halfway.
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sender = {
        let (client, calls, acknowledged) = (client.clone(), calls.clone(), acknowledged.clone());
        tokio::spawn(async move {
            for (i, sip) in calls.iter().enumerate().skip(1) {
                let body = serde_json::json!({"sip_call_id": sip, "cmd_id": format!("end-{i}")});
                let ask = client.request("callbus.cmd.call.end", body.to_string().into());
                match tokio::time::timeout(Duration::from_secs(2), ask).await {
                    Ok(Ok(reply)) if String::from_utf8_lossy(&reply.payload).contains("\"accepted\":true") => {
                        acknowledged.lock().expect("lock").push(format!("end-{i}"));
                    }
                    _ => {}
                }
            }
        })
    };
    while acknowledged.lock().expect("lock").len() < 10 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(terminate(&mut up.0).success(), "SIGTERM exits 0");
    let _ = sender.await;
    let acknowledged = acknowledged.lock().expect("lock").clone();
    assert!(acknowledged.len() >= 10);
    let logged: std::collections::HashSet<String> =
        callbus_tests::stack::logged_cmd_ids(&data.path().join("log")).into_iter().collect();
    for cmd_id in &acknowledged {
        assert!(logged.contains(cmd_id), "{cmd_id} was acknowledged but is not in the log");
    }
}

#[test]
fn configuration_layers_file_environment_and_flags_and_names_bad_keys() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("edge.toml");
    std::fs::write(
        &file,
        "nats = \"nats://bus:4222\"\n[bridge]\nnode = \"edge1\"\nbuffer = 5000\n[engine]\nnodes = [\"edge1\"]\nmax_live_calls = 1234\n",
    )
    .expect("write");
    let path = file.display().to_string();
    let out = callbus()
        .args(["--config", &path, "config", "show", "--buffer", "7000"])
        .env("CALLBUS_NODE", "from-env")
        .env("CALLBUS_NATS", "nats://alice:secret@bus:4222")
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("node = \"from-env\""), "the environment beats the file: {text}");
    assert!(text.contains("buffer = 7000"), "a flag beats both: {text}");
    assert!(text.contains("max_live_calls = 1234"), "the file beats the defaults: {text}");
    assert!(text.contains("nodes = [\"from-env\"]"), "up reconciles the node it serves, and shows it: {text}");
    assert!(text.contains("nats://alice:***@bus:4222") && !text.contains("secret"), "secrets masked: {text}");

    std::fs::write(&file, "[engine]\ndata_dri = \"/x\"\n").expect("write");
    let out = callbus().args(["--config", &path, "up"]).output().expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("data_dri") && err.contains(&path), "names the key and the file: {err}");
    std::fs::write(&file, "[bridge]\nmi = \"localhost\"\n").expect("write");
    let out = callbus().args(["--config", &path, "bridge"]).output().expect("runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bridge.mi"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = callbus().args(["--config", "/no/such.toml", "engine"]).output().expect("runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_up_under_traffic_loses_nothing_acknowledged_and_the_restart_goes_on() {
    let nats = NatsServer::start();
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let events = format!("127.0.0.1:{}", free_port());
    let data = tempfile::tempdir().expect("tmp");
    let data_dir = data.path().display().to_string();
    let up_args = |events: &str| {
        let mut cmd = callbus();
        cmd.args(["up", "--nats", &nats.url(), "--mi", &sim.mi_addr().to_string(), "--events-listen", events])
            .args(["--data-dir", &data_dir, "--node", "k1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    };
    let mut up = Running(up_args(&events).spawn().expect("up starts"));
    let out = mi_until_ok(&nats.url(), &["--node", "k1", "uptime"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.live_subscriptions().len() < 4 {
        assert!(Instant::now() < deadline, "up subscribes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Click-to-dial commands as fast as they are answered; kill -9 in the middle.
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sender = {
        let (client, acknowledged) = (client.clone(), acknowledged.clone());
        tokio::spawn(async move {
            for i in 0..400 {
                let body = serde_json::json!({"caller": format!("sip:a{i}@127.0.0.1"), "callee": format!("sip:b{i}@127.0.0.1"), "cmd_id": format!("k-{i}")});
                let ask = client.request("callbus.cmd.call.start", body.to_string().into());
                match tokio::time::timeout(Duration::from_millis(500), ask).await {
                    Ok(Ok(reply)) if String::from_utf8_lossy(&reply.payload).contains("\"accepted\":true") => {
                        acknowledged.lock().expect("lock").push(format!("k-{i}"));
                    }
                    Ok(Ok(_)) | Ok(Err(_)) | Err(_) => break,
                }
            }
        })
    };
    while acknowledged.lock().expect("lock").len() < 50 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Command::new("kill").args(["-KILL", &up.0.id().to_string()]).status().expect("kill");
    let _ = up.0.wait();
    let _ = sender.await;
    let acknowledged = acknowledged.lock().expect("lock").clone();
    // Every acknowledged command is in the log, and a new `up` on the same data dir serves them.
    let mut again = Running(up_args(&format!("127.0.0.1:{}", free_port())).spawn().expect("up restarts"));
    let deadline = Instant::now() + Duration::from_secs(15);
    let listed = loop {
        let reply = client.request("callbus.cmd.call.list", bytes::Bytes::from_static(b"{}")).await;
        if let Ok(reply) = reply {
            let v: serde_json::Value = serde_json::from_slice(&reply.payload).expect("json");
            if v["result"]["calls"].is_array() {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "the restarted engine answers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(listed["result"]["calls"].as_array().is_some_and(|c| !c.is_empty()), "calls survived the kill");
    // A repeated cmd_id after the crash is answered with the first answer, not acted on again.
    let first = &acknowledged[0];
    let body = serde_json::json!({"caller": "sip:a0@127.0.0.1", "callee": "sip:b0@127.0.0.1", "cmd_id": first});
    let reply = client.request("callbus.cmd.call.start", body.to_string().into()).await.expect("reply");
    assert!(String::from_utf8_lossy(&reply.payload).contains("\"accepted\":true"));
    assert!(terminate(&mut again.0).success());
    let logged = callbus_tests::stack::logged_cmd_ids(data.path());
    for cmd_id in &acknowledged {
        assert_eq!(logged.iter().filter(|c| *c == cmd_id).count(), 1, "{cmd_id}: acknowledged, logged once");
    }
    println!(
        "FAULT|SIGKILL of callbus up under traffic|{} commands acknowledged|0|restart answers in <15 s",
        acknowledged.len()
    );
}

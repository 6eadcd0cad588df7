//! Faults injected under traffic, each checked for what was acknowledged (nothing lost) and for
//! the system recovering by itself; each prints `FAULT|<fault>|<events in flight>|<lost>|<recovery>`
//! for the table in the session notes. Bounded in time, on loopback. (NATS killed and restarted
//! under load: `tests/bridge.rs`; the engine killed mid-traffic: `tests/engine.rs`.)

use std::time::{Duration, Instant};

use callbus_tests::stack::{accepted, Stack};
use opensips_sim::{CallScript, Sim, SimConfig};
use serde_json::json;

async fn periodic_stack() -> Stack {
    let mut s = Stack::start().await;
    s.start_engine_with(|c| c.reconcile_every = Some(Duration::from_millis(300))).await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_end_event_is_closed_by_the_periodic_reconciliation() {
    let mut s = periodic_stack().await;
    let (call_id, sip) =
        s.confirmed_call(CallScript { hangup_after: Some(Duration::from_millis(400)), ..Default::default() }).await;
    let (other, _) = s.confirmed_call(CallScript::default()).await;
    // The network loses the BYE's E_DLG_STATE_CHANGED (4→5).
    s.sim.set_events_lost(true);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.sim.dialog_state(&sip).is_some() {
        assert!(Instant::now() < deadline, "the call ends in OpenSIPS");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lost_at = Instant::now();
    s.sim.set_events_lost(false);
    let notes = s.notes_until(|n| n.call_id == call_id && n.event == "ended").await;
    let recovery = lost_at.elapsed();
    assert_eq!(notes.last().map(|n| n.data["reason"].clone()), Some(json!("ended_while_engine_away")));
    assert!(notes.iter().all(|n| n.call_id != other || n.event != "ended"), "the live call is left alone");
    let listed = s.cmd("call.list", json!({})).await;
    assert!(format!("{listed:?}").contains(&other), "the other call is still listed");
    println!("FAULT|UDP loss of an end event|1|0 (closed by reconciliation)|{} ms", recovery.as_millis());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opensips_killed_and_restarted_under_load_recovers_by_itself() {
    let mut s = periodic_stack().await;
    let mut calls = Vec::new();
    for _ in 0..10 {
        calls.push(s.confirmed_call(CallScript::default()).await);
    }
    // OpenSIPS goes away: its MI socket closes; a command meanwhile fails with the reason.
    let addr = s.sim.mi_addr();
    let placeholder = Sim::start(SimConfig::default()).await.expect("sim");
    std::mem::replace(&mut s.sim, placeholder).stop().await;
    let killed_at = Instant::now();
    let reply = s.cmd("call.hold", json!({"call_id": calls[0].0, "cmd_id": "during-outage"})).await;
    accepted(&reply);
    let notes = s.notes_until(|n| n.cmd_id.as_deref() == Some("during-outage") && n.event == "command_failed").await;
    let reason = notes.last().map(|n| n.data["reason"].to_string()).unwrap_or_default();
    assert!(reason.contains("unreachable") || reason.contains("did not answer"), "{reason}");
    // It comes back on the same address a little later (its "Up since" changes), with no
    // calls: a restart forgets them.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let back = Sim::start(SimConfig { mi_listen: addr, step: Duration::from_millis(3), ..SimConfig::default() })
        .await
        .expect("the sim restarts on its address");
    std::mem::replace(&mut s.sim, back).stop().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.sim.live_subscriptions().len() < 4 {
        assert!(Instant::now() < deadline, "the bridge subscribes again by itself");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resubscribed = killed_at.elapsed();
    // The calls OpenSIPS lost are closed, with a recorded reason; new calls work.
    let mut ended = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ended.len() < calls.len() {
        assert!(Instant::now() < deadline, "the lost calls are closed ({} of {})", ended.len(), calls.len());
        let notes = s.notes_until(|n| n.event == "ended").await;
        for n in notes.iter().filter(|n| n.event == "ended") {
            assert_eq!(n.data["reason"], json!("ended_while_engine_away"));
            ended.insert(n.call_id.clone());
        }
    }
    let recovered = killed_at.elapsed();
    let (fresh, _) = s.confirmed_call(CallScript::default()).await;
    assert!(!calls.iter().any(|(c, _)| *c == fresh));
    println!(
        "FAULT|OpenSIPS killed and restarted|10 live calls, 1 command|0 acknowledged (the command failed with its reason; 10 calls closed)|resubscribed {} ms, calls reconciled {} ms",
        resubscribed.as_millis(),
        recovered.as_millis()
    );
    s.shutdown().await;
}

/// A small tmpfs, unmounted when dropped (needs root; None otherwise).
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(bytes: usize) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().expect("tmp");
        let size = format!("size={bytes}");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.path()).status();
    }
}

/// Fills the disk holding `path` with a file, leaving about nothing free.
fn fill(path: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let filler = path.join("filler");
    let mut f = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![0u8; 16 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    filler
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_commands_keeps_events_and_recovers_when_space_returns() {
    let Some(disk) = SmallDisk::mount(8 * 1024 * 1024) else {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    };
    let mut s = Stack::start().await;
    let data = disk.0.path().join("log");
    s.start_engine_with(|c| {
        c.data_dir = data.clone();
        c.cache_bytes = 4 * 1024 * 1024;
        // A reserve the size of this small disk allows (tests/tests/disk.rs tests the reserve).
        c.disk_reserve = 1024 * 1024;
    })
    .await;
    s.confirmed_call(CallScript::default()).await;
    let filler = fill(disk.0.path());
    // Commands until the log cannot be written: each accepted one is durable.
    let mut acknowledged = Vec::new();
    let refused_at = loop {
        let n = acknowledged.len();
        let body =
            json!({"to": format!("sip:u{n}@127.0.0.1"), "from": "sip:app@127.0.0.1", "cmd_id": format!("disk-{n}")});
        match s.cmd("ua.start", body).await {
            callbus_schemas::command::CommandReply::Accepted { cmd_id, .. } => acknowledged.push(cmd_id),
            callbus_schemas::command::CommandReply::Refused { error, .. } => {
                assert_eq!(error.code, callbus_schemas::command::CommandErrorCode::Unavailable, "{}", error.message);
                assert!(error.message.contains("log"), "the reason names the log: {}", error.message);
                break Instant::now();
            }
            other => panic!("{other:?}"),
        }
        assert!(acknowledged.len() < 5_000, "the disk never filled");
    };
    // While it is down, OpenSIPS's events are kept: a call placed now is not lost.
    let during = s.sim.proxied_call(CallScript::default());
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::remove_file(&filler).expect("free the space");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = s.cmd("call.list", json!({})).await;
        if format!("{reply:?}").contains(&during) {
            break;
        }
        assert!(Instant::now() < deadline, "the engine did not come back after space returned: {reply:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recovered = refused_at.elapsed();
    s.shutdown().await;
    let logged = callbus_tests::stack::logged_cmd_ids(&data);
    for cmd_id in &acknowledged {
        assert!(logged.contains(cmd_id), "{cmd_id} was acknowledged but is not in the log");
    }
    println!(
        "FAULT|disk full under commands|{} commands acknowledged, 1 call's events during the outage|0|{} ms after the first refusal (300 ms of it the disk stayed full)",
        acknowledged.len(),
        recovered.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_jump_changes_recorded_times_only() {
    let mut s = Stack::start().await;
    let clock = callbus_engine::WallClock::default();
    let engine_clock = clock.clone();
    s.start_engine_with(|c| c.clock = engine_clock).await;
    let (call_id, sip) = s.confirmed_call(CallScript { declines_refer: true, ..Default::default() }).await;
    let before = s.cmd("call.get", json!({"call_id": call_id})).await;
    // An NTP step one hour back, mid-call.
    clock.jump(-3_600_000);
    let jumped_at = Instant::now();
    let cmd = json!({"sip_call_id": sip, "leg": "callee", "destination": "sip:x@127.0.0.1", "cmd_id": "after-jump"});
    accepted(&s.cmd("call.transfer.blind", cmd).await);
    // The REFER is declined: only the engine's timer (600 ms here) can tell; it fires on time.
    let notes = s.notes_until(|n| n.cmd_id.as_deref() == Some("after-jump") && n.event == "command_failed").await;
    let waited = jumped_at.elapsed();
    assert!(waited < Duration::from_secs(5), "the timer fired after {waited:?}, not an hour later");
    let ours: Vec<_> = notes.iter().filter(|n| n.call_id == call_id).collect();
    assert!(ours.windows(2).all(|w| w[0].seq <= w[1].seq), "the call's notifications stay in log order");
    let after = notes.last().expect("note");
    let callbus_schemas::command::CommandReply::Data { result, .. } = before else { panic!("{before:?}") };
    let last_before = result["history"].as_array().and_then(|h| h.last()).map(|h| h["time_ms"].as_u64().unwrap_or(0));
    assert!(last_before.is_some_and(|t| after.time_ms + 3_000_000 < t), "the recorded times show the jump");
    s.shutdown().await;
    callbus_tests::stack::assert_log_replays(s.data.path());
    println!("FAULT|wall clock stepped 1 h back mid-call|1 call, 1 transfer|0|timer fired in {} ms; log order and replay unchanged", waited.as_millis());
}

/// Every input the log at `data` holds: events by (node, the bridge's sequence, call), and
/// commands by cmd_id; returns those held more than once.
fn inputs_logged_twice(data: &std::path::Path) -> (usize, Vec<String>) {
    use callbus_engine::machines::Input;
    let log = callbus_engine::log::SledLog::open(data).expect("the log opens");
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for record in callbus_engine::log::EventLog::records_from(&log, 1) {
        let record = record.expect("readable");
        let key = match &record.input {
            Input::Event { node, bridge_seq: Some(seq), .. } => format!("event {node}#{seq} of {}", record.call_id),
            Input::Command { cmd_id, .. } => format!("command {cmd_id}"),
            _ => continue,
        };
        *seen.entry(key).or_default() += 1;
    }
    let twice = seen.iter().filter(|(_, n)| **n > 1).map(|(k, n)| format!("{k}: {n} times")).collect();
    (seen.len(), twice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_leaves_no_trace_and_each_input_is_logged_once() {
    let mut s = Stack::start_up(SimConfig::default()).await;
    let faults = callbus_engine::CommitFaults::default();
    let armed = faults.clone();
    s.start_engine_with(move |c| c.commit_faults = armed).await;
    s.confirmed_call(CallScript::default()).await;

    // The next commit fails: its batch (events of calls being set up) was staged into sled
    // already. The engine must take those changes back, start again from the log, and handle
    // the batch again: once.
    faults.arm(1);
    let sips: Vec<String> = (0..5).map(|_| s.sim.proxied_call(CallScript::default())).collect();
    let mut waiting: std::collections::HashSet<String> = sips.into_iter().collect();
    while !waiting.is_empty() {
        let notes = s.notes_until(|n| n.event == "confirmed").await;
        if let Some(sip) = notes.last().and_then(|n| n.sip_call_id.as_ref()) {
            waiting.remove(sip);
        }
    }
    // A command whose commit fails is refused and not in the log; its retry is accepted once.
    faults.arm(1);
    let body = json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1", "cmd_id": "after-fault"});
    let first = s.cmd("call.start", body.clone()).await;
    assert_eq!(callbus_tests::stack::refused(&first), callbus_schemas::command::CommandErrorCode::Unavailable);
    let deadline = Instant::now() + Duration::from_secs(10);
    let call_id = loop {
        match s.cmd("call.start", body.clone()).await {
            callbus_schemas::command::CommandReply::Accepted { call_id, .. } => break call_id,
            other => assert!(Instant::now() < deadline, "the engine did not come back: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    s.notes_until(|n| n.call_id == call_id && n.event == "connected").await;
    s.shutdown().await;

    let data = s.data.path();
    let (inputs, twice) = inputs_logged_twice(data);
    assert!(twice.is_empty(), "inputs logged more than once after a failed commit: {twice:#?}");
    assert!(inputs >= 20, "the log holds the traffic ({inputs} inputs)");
    assert_eq!(callbus_tests::stack::logged_cmd_ids(data).iter().filter(|c| *c == "after-fault").count(), 1);
    callbus_tests::stack::assert_log_replays(data);
}

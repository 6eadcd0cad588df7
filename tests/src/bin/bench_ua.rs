//! Click-to-dial benchmark. Prints `RESULT|figure|value|unit` lines.
//!
//! - set-up overhead added by callbus, timed at the simulated OpenSIPS (so both ends of each
//!   interval are on the OpenSIPS side of the wire): `call.start` sent → the first MI request
//!   (`ua_session_client_start` of the caller) received; the callee's `ANSWERED` event raised →
//!   the caller's completion (`ua_session_update` re-INVITE with the callee's SDP) received.
//!   p50 / p99 over sequential calls;
//! - many at once: N `call.start` sent together, all connected, none failed; the time it took;
//! - the Call API door: `CallHold` / `CallUnhold` of a proxied call, one at a time, from the
//!   request frame to the `Ended` frame, against the same commands over NATS (request → the
//!   `command_succeeded` notification, already subscribed) in the same run: `door_…` and
//!   `door_nats_…` figures and their p50 ratio.
//!
//! Figures named `c2d_…` are for `callbus up` (the engine takes its node's events and MI from
//! the bridge in-process); `c2d_split_…` for a bridge and an engine apart, over NATS.
//!
//! `cargo run --release -p callbus-tests --bin bench-ua` (500 sequential, 1 000 at once);
//! `-- --quick` for CI (50 and 200).

use std::time::{Duration, Instant};

use bytes::Bytes;
use callbus_schemas::command::{CallNotification, CommandReply};
use callbus_schemas::event::{Event, UaEventType};
use callbus_tests::stack::{accepted, Stack};
use futures::{SinkExt, StreamExt};
use opensips_sim::{SimConfig, Traced};
use serde_json::json;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut us: Vec<f64>) {
    us.sort_by(|a, b| a.total_cmp(b));
    println!("RESULT|{name}_p50|{:.0}|us", percentile(&us, 0.5));
    println!("RESULT|{name}_p99|{:.0}|us", percentile(&us, 0.99));
    println!("RESULT|{name}_max|{:.0}|us", us.last().copied().unwrap_or(f64::NAN));
}

fn mi_at(
    trace: &[(Instant, Traced)],
    command: &str,
    field: &str,
    value: &str,
    method: Option<&str>,
) -> Option<Instant> {
    trace.iter().find_map(|(at, t)| match t {
        Traced::Mi { command: c, params } if c == command && params[field] == json!(value) => {
            method.is_none_or(|m| params["method"] == json!(m)).then_some(*at)
        }
        _ => None,
    })
}

fn answered_at(trace: &[(Instant, Traced)], key: &str) -> Option<Instant> {
    trace.iter().find_map(|(at, t)| match t {
        Traced::Event(Event::UaSession(u))
            if u.key == key && u.event_type == UaEventType::Answered && u.method == "INVITE" =>
        {
            Some(*at)
        }
        _ => None,
    })
}

/// `n` click-to-dials one at a time: (call.start → first MI, callee answered → caller completion), µs.
async fn one_at_a_time(s: &mut Stack, n: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut first_mi, mut completion) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (caller, callee) = (format!("sip:alice{i}@127.0.0.1"), format!("sip:bob{i}@127.0.0.1"));
        let sent = Instant::now();
        let (call_id, _) = accepted(&s.cmd("call.start", json!({"caller": caller, "callee": callee})).await);
        let notes = s.notes_until(|n| n.call_id == call_id && (n.event == "connected" || n.event == "ended")).await;
        assert!(notes.iter().any(|n| n.event == "connected"), "call {i} did not connect");
        let key = |leg: &str| {
            notes
                .iter()
                .find(|n| n.event == "calling" && n.data["leg"] == json!(leg))
                .and_then(|n| n.data["key"].as_str())
                .map(str::to_owned)
                .expect("key")
        };
        let (caller_key, callee_key) = (key("caller"), key("callee"));
        let trace = s.sim.take_trace();
        let start = mi_at(&trace, "ua_session_client_start", "ruri", &caller, None).expect("first MI");
        first_mi.push(start.duration_since(sent).as_secs_f64() * 1e6);
        let answered = answered_at(&trace, &callee_key).expect("callee answered");
        let reinvite =
            mi_at(&trace, "ua_session_update", "key", &caller_key, Some("INVITE")).expect("caller completion");
        completion.push(reinvite.duration_since(answered).as_secs_f64() * 1e6);
        // End it, so the next call runs on an idle system.
        accepted(&s.cmd("call.end", json!({"call_id": call_id})).await);
        s.notes_until(|n| n.call_id == call_id && n.event == "ended").await;
    }
    (first_mi, completion)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One Call API command through the door, from its request frame to its `Ended` frame, µs.
async fn through_door(ws: &mut Ws, method: &str, sip_call_id: &str) -> f64 {
    let started = Instant::now();
    let frame = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": {"callid": sip_call_id}});
    ws.send(tokio_tungstenite::tungstenite::Message::text(frame.to_string())).await.expect("send");
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame").expect("open");
        let Ok(tokio_tungstenite::tungstenite::Message::Text(text)) = msg else { continue };
        let v: serde_json::Value = serde_json::from_str(text.as_str()).expect("JSON frame");
        match v["params"]["event"].as_str() {
            Some("Ended") => return started.elapsed().as_secs_f64() * 1e6,
            Some("Error") => panic!("{method} failed through the door: {v}"),
            _ => {}
        }
    }
}

/// `n` hold/unhold pairs of one proxied call through the door and over NATS, interleaved.
async fn door_against_nats(s: &mut Stack, n: usize) -> (Vec<f64>, Vec<f64>) {
    let door =
        callbus_door::CallApiDoor::start("127.0.0.1:0".parse().expect("addr"), s.client.clone()).await.expect("door");
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/call-api", door.local_addr())).await.expect("connect");
    let (call_id, sip) = s.confirmed_call(opensips_sim::CallScript::default()).await;
    let mut outcomes = s.client.subscribe(format!("callbus.call.{call_id}.command_succeeded")).await.expect("sub");
    s.client.flush().await.expect("flush");
    let (mut door_us, mut nats_us) = (Vec::new(), Vec::new());
    for i in 0..n {
        for method in ["CallHold", "CallUnhold"] {
            door_us.push(through_door(&mut ws, method, &sip).await);
        }
        for verb in ["call.hold", "call.unhold"] {
            let cmd_id = format!("{verb}-{i}");
            let started = Instant::now();
            accepted(&s.cmd(verb, json!({"call_id": call_id, "cmd_id": cmd_id})).await);
            loop {
                let msg = tokio::time::timeout(Duration::from_secs(10), outcomes.next()).await.expect("outcome");
                let note: CallNotification = serde_json::from_slice(&msg.expect("open").payload).expect("note");
                if note.cmd_id.as_deref() == Some(cmd_id.as_str()) {
                    break;
                }
            }
            nats_us.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    door.shutdown().await;
    (door_us, nats_us)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (sequential, at_once) = if quick { (50, 200) } else { (500, 1000) };

    // Bridge and engine as separate processes run them: events and MI cross NATS.
    eprintln!("click-to-dial set-up overhead, bridge and engine apart: {sequential} calls, one at a time");
    let mut s = Stack::start_with(SimConfig::default()).await;
    s.sim.start_trace();
    let (first_mi, completion) = one_at_a_time(&mut s, sequential).await;
    report("c2d_split_command_to_first_mi", first_mi);
    report("c2d_split_callee_answer_to_caller_completion", completion);
    s.shutdown().await;
    drop(s);

    // As `callbus up` runs them: the engine takes events and MI from the bridge in-process.
    eprintln!("click-to-dial set-up overhead, callbus up: {sequential} calls, one at a time");
    let mut s = Stack::start_up(SimConfig::default()).await;
    s.sim.start_trace();
    let (first_mi, completion) = one_at_a_time(&mut s, sequential).await;
    report("c2d_command_to_first_mi", first_mi);
    report("c2d_callee_answer_to_caller_completion", completion);

    eprintln!("click-to-dial: {at_once} calls at once");
    let mut outcomes = s.client.subscribe("callbus.call.*.>").await.expect("sub");
    s.client.flush().await.expect("flush");
    let started = Instant::now();
    let requests = (0..at_once).map(|i| {
        let body = json!({"caller": format!("sip:a{i}@127.0.0.1"), "callee": format!("sip:b{i}@127.0.0.1"), "cmd_id": format!("many-{i}")});
        s.client.request("callbus.cmd.call.start", Bytes::from(body.to_string()))
    });
    let replies = futures::future::join_all(requests).await;
    let mut refused = 0;
    for r in replies {
        match r.ok().and_then(|m| serde_json::from_slice::<CommandReply>(&m.payload).ok()) {
            Some(CommandReply::Accepted { .. }) => {}
            _ => refused += 1,
        }
    }
    let (mut ok, mut failed) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while ok + failed + refused < at_once {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(msg)) = tokio::time::timeout(left, outcomes.next()).await else { break };
        let Ok(note) = serde_json::from_slice::<CallNotification>(&msg.payload) else { continue };
        if !note.cmd_id.as_deref().is_some_and(|c| c.starts_with("many-")) {
            continue;
        }
        if note.event == "command_succeeded" {
            ok += 1;
        } else if note.event == "command_failed" {
            failed += 1;
            eprintln!("failed: {}", note.data);
        }
    }
    let took = started.elapsed();
    println!("RESULT|c2d_at_once_calls|{at_once}|calls");
    println!("RESULT|c2d_at_once_connected|{ok}|calls");
    println!("RESULT|c2d_at_once_failed|{}|calls", failed + refused + (at_once - ok - failed - refused));
    println!("RESULT|c2d_at_once_time|{:.0}|ms", took.as_secs_f64() * 1e3);
    s.shutdown().await;
    assert_eq!(ok, at_once, "every click-to-dial connected");
    drop(s);

    let pairs = if quick { 20 } else { 200 };
    eprintln!("the Call API door against NATS: {pairs} hold/unhold pairs each, one at a time, callbus up");
    let mut s = Stack::start_up(SimConfig::default()).await;
    let (mut door_us, mut nats_us) = door_against_nats(&mut s, pairs).await;
    door_us.sort_by(|a, b| a.total_cmp(b));
    nats_us.sort_by(|a, b| a.total_cmp(b));
    let ratio = percentile(&door_us, 0.5) / percentile(&nats_us, 0.5);
    report("door_hold_to_ended", door_us);
    report("door_nats_hold_to_outcome", nats_us);
    println!("RESULT|door_over_nats_p50|{ratio:.2}|x");
    s.shutdown().await;
}

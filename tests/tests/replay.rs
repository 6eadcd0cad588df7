//! Replay on a log written by the real engine (sim → bridge → NATS → engine).

use std::time::Duration;

use callbus_engine::log::EventLog;
use callbus_engine::machines::{CallState, Effect, Input};
use callbus_replay::{CheckOptions, ExportFormat, LogReader, Speed};
use callbus_schemas::command::CommandReply;
use callbus_tests::stack::Stack;
use futures::StreamExt;
use opensips_sim::CallScript;
use serde_json::{json, Value};

/// A log with a held, unheld and hung-up call, plus a rejected one. Returns (stack, call_id, sip).
async fn a_log() -> (Stack, String, String) {
    let mut s = Stack::start().await;
    let (call_id, sip) = s.confirmed_call(CallScript::default()).await;
    for (verb, cmd) in [("call.hold", "h"), ("call.unhold", "u")] {
        let reply = s.cmd(verb, json!({"call_id": call_id, "cmd_id": cmd})).await;
        assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
        s.notes_until(|n| n.cmd_id.as_deref() == Some(cmd) && n.event.starts_with("command_")).await;
    }
    let reply = s.cmd("call.end", json!({"call_id": call_id})).await;
    assert!(matches!(reply, CommandReply::Accepted { .. }));
    s.notes_until(|n| n.call_id == call_id && n.event == "ended").await;
    s.sim.proxied_call(CallScript { outcome: opensips_sim::Outcome::Rejected, ..Default::default() });
    s.notes_until(|n| n.event == "ended" && n.call_id != call_id).await;
    (s, call_id, sip)
}

fn real_step(state: &CallState, input: &Input, ctx: &callbus_engine::machines::Ctx) -> (CallState, Vec<Effect>) {
    state.step(input, ctx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeline_shows_every_record_and_check_passes() {
    let (mut s, call_id, sip) = a_log().await;
    // While the engine runs, the dir is read through a copy.
    let live = LogReader::open(s.data.path()).expect("open live");
    assert!(live.is_copy());
    drop(live);
    s.shutdown().await;
    let reader = LogReader::open(s.data.path()).expect("open");
    assert!(!reader.is_copy());
    let by_id = reader.timeline(&call_id).expect("timeline");
    let by_sip = reader.timeline(&sip).expect("timeline by SIP Call-ID");
    assert_eq!(by_id, by_sip);
    let records = reader.log().records_of_call(&call_id).expect("records");
    assert_eq!(by_id.len(), records.len(), "every record of the call");
    let inputs: Vec<&str> = by_id.iter().map(|r| r.input.as_str()).collect();
    for expected in ["cmd call.hold", "cmd call.unhold", "cmd call.end", "E_CALL_HOLD"] {
        assert!(inputs.contains(&expected), "{expected} missing from {inputs:?}");
    }
    assert_eq!(by_id.last().map(|r| r.after.as_str()), Some("ended"));
    assert!(by_id.windows(2).all(|w| w[0].seq < w[1].seq && w[1].before.as_deref() == Some(w[0].after.as_str())));

    assert_eq!(reader.timeouts(), callbus_tests::stack::timeouts(), "the log remembers the engine's timeouts");
    let report = callbus_replay::check(
        &reader,
        &CheckOptions { timeouts: reader.timeouts(), ..CheckOptions::default() },
        &real_step,
    );
    assert!(report.divergences.is_empty(), "{:#?}", report.divergences);
    assert!(report.unreadable.is_empty());
    assert_eq!(report.records, reader.log().next_seq() - 1);
    assert_eq!(report.calls, 2);
    let with_progress = CheckOptions { timeouts: reader.timeouts(), progress: true, ..CheckOptions::default() };
    assert_eq!(callbus_replay::check(&reader, &with_progress, &real_step), report, "the progress bar changes nothing");

    let stats = reader.stats();
    assert_eq!((stats.records, stats.calls), (report.records, 2));
    assert_eq!(stats.by_kind_and_state["dialog"]["ended"], 2);

    let mut jsonl = Vec::new();
    let n = callbus_replay::export(&reader, &mut jsonl, ExportFormat::Jsonl, None, None, false).expect("export");
    let lines: Vec<Value> =
        String::from_utf8(jsonl).expect("utf-8").lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!((n, lines.len() as u64), (report.records, report.records));
    assert!(lines.windows(2).all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));
    let mut packed = Vec::new();
    let n =
        callbus_replay::export(&reader, &mut packed, ExportFormat::Msgpack, Some(&sip), None, false).expect("export");
    assert_eq!(n, records.len() as u64);

    // One call's export, read through the per-call index, is the whole export's lines of that
    // call; with --since, those from that time on.
    let of_call: Vec<&Value> = lines.iter().filter(|l| l["call_id"] == json!(call_id)).collect();
    assert!(of_call.len() > 3 && of_call.len() < lines.len(), "the log has other calls' records too");
    let export_call = |since: Option<u64>| {
        let mut out = Vec::new();
        let n = callbus_replay::export(&reader, &mut out, ExportFormat::Jsonl, Some(&call_id), since, false)
            .expect("export");
        let lines: Vec<Value> =
            String::from_utf8(out).expect("utf-8").lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
        assert_eq!(n, lines.len() as u64);
        lines
    };
    assert_eq!(export_call(None).iter().collect::<Vec<_>>(), of_call);
    let since = of_call[3]["time_ms"].as_u64().expect("time_ms");
    let later: Vec<&Value> = of_call.iter().copied().filter(|l| l["time_ms"].as_u64() >= Some(since)).collect();
    assert_eq!(export_call(Some(since)).iter().collect::<Vec<_>>(), later);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_transition_is_reported_at_its_record() {
    let (mut s, call_id, _) = a_log().await;
    s.shutdown().await;
    let reader = LogReader::open(s.data.path()).expect("open");
    let hold_seq = reader
        .log()
        .records_of_call(&call_id)
        .expect("records")
        .into_iter()
        .find(|r| r.input.label() == "cmd call.hold")
        .map(|r| r.seq)
        .expect("the hold command was logged");
    // A test-only machine that forgets to start the hold timer.
    let altered = |state: &CallState, input: &Input, ctx: &callbus_engine::machines::Ctx| {
        let (next, mut effects) = state.step(input, ctx);
        if input.label() == "cmd call.hold" {
            effects.retain(|e| !matches!(e, Effect::StartTimer { .. }));
        }
        (next, effects)
    };
    let report = callbus_replay::check(
        &reader,
        &CheckOptions { timeouts: reader.timeouts(), ..CheckOptions::default() },
        &altered,
    );
    assert_eq!(report.divergences.len(), 1);
    assert_eq!((report.divergences[0].seq, report.divergences[0].call_id.as_str()), (hold_seq, call_id.as_str()));
    let only_after = CheckOptions { from: hold_seq + 1, timeouts: reader.timeouts(), ..CheckOptions::default() };
    assert!(callbus_replay::check(&reader, &only_after, &altered).divergences.is_empty(), "--from skips it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_reported_with_its_sequence_and_the_rest_is_read() {
    let (mut s, _, _) = a_log().await;
    s.shutdown().await;
    let total = {
        let reader = LogReader::open(s.data.path()).expect("open");
        reader.log().next_seq() - 1
    };
    let damaged = total / 2;
    {
        let db = sled::open(s.data.path()).expect("raw open");
        let records = db.open_tree("records").expect("tree");
        let value = records.get(damaged.to_be_bytes()).expect("get").expect("present");
        records.insert(damaged.to_be_bytes(), &value[..value.len() / 3]).expect("truncate");
        db.flush().expect("flush");
    }
    let reader = LogReader::open(s.data.path()).expect("open");
    let report = callbus_replay::check(
        &reader,
        &CheckOptions { timeouts: reader.timeouts(), ..CheckOptions::default() },
        &real_step,
    );
    assert_eq!(report.unreadable.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![damaged]);
    assert_eq!(report.records, total - 1, "every other record is still checked");
    assert!(report.divergences.len() <= 1, "at most the damaged call's next record differs");
    let mut out = Vec::new();
    assert_eq!(
        callbus_replay::export(&reader, &mut out, ExportFormat::Jsonl, None, None, false).expect("export"),
        total - 1
    );
    assert_eq!(reader.stats().unreadable, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_at_max_speed_sends_exactly_the_recorded_events_in_order() {
    let (mut s, _, _) = a_log().await;
    s.shutdown().await;
    let reader = LogReader::open(s.data.path()).expect("open");
    let recorded: Vec<String> = reader
        .records(1, u64::MAX)
        .filter_map(Result::ok)
        .filter_map(|r| match r.input {
            Input::Event { datagram, .. } => Some(datagram),
            _ => None,
        })
        .collect();
    assert!(recorded.len() >= 8);
    let mut sub = s.client.subscribe("replay.opensips.>").await.expect("sub");
    s.client.flush().await.expect("flush");
    let n = callbus_replay::republish(&reader, &s.client, "replay", Speed::Max, None).await.expect("republish");
    assert_eq!(n as usize, recorded.len());
    for (i, datagram) in recorded.iter().enumerate() {
        let msg = tokio::time::timeout(Duration::from_secs(5), sub.next()).await.expect("event").expect("open");
        assert_eq!(std::str::from_utf8(&msg.payload).expect("utf-8"), datagram, "event {i}");
        let name = callbus_schemas::event::event_name(datagram.as_bytes()).expect("valid");
        assert!(msg.subject.ends_with(&format!(".event.{name}")) && msg.subject.starts_with("replay.opensips.n1."));
    }
    assert!(tokio::time::timeout(Duration::from_millis(200), sub.next()).await.is_err(), "nothing more");
}

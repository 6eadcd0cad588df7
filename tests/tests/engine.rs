//! The engine end to end: a real nats-server, the simulator as OpenSIPS, the bridge, the
//! engine with its sled log in a temporary directory, and an app speaking NATS.

use std::time::Duration;

use bytes::Bytes;
use callbus_engine::log::{EventLog, SledLog};
use callbus_schemas::command::{CommandErrorCode, CommandReply};
use callbus_tests::stack::{accepted, assert_log_replays, refused, Stack, NODE};
use opensips_sim::CallScript;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_call_is_notified_listed_and_logged() {
    let mut s = Stack::start().await;
    let sip = s.sim.proxied_call(CallScript { hangup_after: Some(Duration::from_millis(300)), ..Default::default() });
    let notes = s.notes_until(|n| n.event == "confirmed").await;
    let call_id = notes[0].call_id.clone();
    let listed = s.cmd("call.list", json!({})).await;
    let CommandReply::Data { result, .. } = &listed else { panic!("{listed:?}") };
    assert_eq!(result["calls"][0]["call_id"], json!(call_id));
    assert_eq!(result["calls"][0]["state"], json!("confirmed"));
    let mut all = notes;
    all.extend(s.notes_until(|n| n.event == "ended").await);
    assert_eq!(all.iter().map(|n| n.event.as_str()).collect::<Vec<_>>(), ["early", "answered", "confirmed", "ended"]);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "ordered by seq");
    assert!(all.iter().all(|n| n.call_id == call_id && n.sip_call_id.as_deref() == Some(sip.as_str())));
    assert_eq!(all[3].data["reason"], json!("hung_up"));
    let got = s.cmd("call.get", json!({"sip_call_id": sip})).await;
    let CommandReply::Data { result, .. } = &got else { panic!("{got:?}") };
    let inputs: Vec<&str> =
        result["history"].as_array().expect("history").iter().filter_map(|h| h["input"].as_str()).collect();
    assert_eq!(inputs.iter().filter(|i| **i == "E_DLG_STATE_CHANGED").count(), 4, "{inputs:?}");
    assert_eq!(result["call"]["state"], json!("ended"));
    s.shutdown().await;
    assert!(assert_log_replays(s.data.path()) >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_and_unhold_succeed_and_a_refusing_leg_fails_the_command() {
    let mut s = Stack::start().await;
    let (call_id, sip) = s.confirmed_call(CallScript::default()).await;
    let (_, cmd_id) = accepted(&s.cmd("call.hold", json!({"sip_call_id": sip, "cmd_id": "h1"})).await);
    assert_eq!(cmd_id, "h1");
    let notes = s.notes_until(|n| n.event == "command_succeeded").await;
    let held: Vec<_> = notes.iter().filter(|n| n.event == "held").map(|n| n.data["leg"].clone()).collect();
    assert_eq!(held.len(), 2);
    assert!(notes.iter().all(|n| n.cmd_id.as_deref() == Some("h1")));
    assert_eq!(refused(&s.cmd("call.hold", json!({"call_id": call_id})).await), CommandErrorCode::WrongState);
    accepted(&s.cmd("call.unhold", json!({"call_id": call_id, "cmd_id": "u1"})).await);
    let notes = s.notes_until(|n| n.event == "command_succeeded").await;
    assert_eq!(notes.iter().filter(|n| n.event == "resumed").count(), 2);

    let (_, sip2) = s.confirmed_call(CallScript { callee_rejects_reinvite: true, ..Default::default() }).await;
    accepted(&s.cmd("call.hold", json!({"sip_call_id": sip2, "cmd_id": "h2"})).await);
    let notes = s.notes_until(|n| n.event == "command_failed" || n.event == "command_succeeded").await;
    let last = notes.last().expect("note");
    assert_eq!(last.event, "command_failed");
    assert!(last.data["reason"].as_str().is_some_and(|r| r.contains("callee")), "{last:?}");
    s.shutdown().await;
    assert_log_replays(s.data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_transfer_ends_the_transferor_and_a_second_one_is_refused() {
    let mut s = Stack::start().await;
    let (call_id, sip) = s.confirmed_call(CallScript::default()).await;
    let body =
        json!({"call_id": call_id, "leg": "callee", "destination": "sip:transfer@127.0.0.1:5060", "cmd_id": "t1"});
    accepted(&s.cmd("call.transfer.blind", body.clone()).await);
    let notes = s.notes_until(|n| n.call_id == call_id && n.event == "ended").await;
    let mine: Vec<&str> = notes.iter().filter(|n| n.call_id == call_id).map(|n| n.event.as_str()).collect();
    for e in ["transfer_requested", "transfer_started", "transferred", "command_succeeded", "ended"] {
        assert!(mine.contains(&e), "{e} missing from {mine:?}");
    }
    assert_eq!(notes.last().expect("ended").data["reason"], json!("transferred"));
    // The transferee's new call is a call of its own (its notifications may come after the
    // transferor's end: they are ordered per call, not across calls).
    if !notes.iter().any(|n| n.call_id != call_id && n.event == "confirmed") {
        s.notes_until(|n| n.call_id != call_id && n.event == "confirmed").await;
    }
    let _ = sip;
    s.shutdown().await;
    assert_log_replays(s.data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_refer_is_reported_failed_and_attended_transfer_succeeds() {
    let mut s = Stack::start().await;
    let (call_id, _) = s.confirmed_call(CallScript { declines_refer: true, ..Default::default() }).await;
    let body = json!({"call_id": call_id, "leg": "callee", "destination": "sip:transfer@127.0.0.1:5060"});
    accepted(&s.cmd("call.transfer.blind", body.clone()).await);
    let notes = s.notes_until(|n| n.event == "command_failed").await;
    assert!(notes.last().expect("failed").data["reason"].as_str().is_some_and(|r| r.contains("declined or lost")));
    assert_eq!(
        refused(&s.cmd("call.transfer.blind", body).await),
        CommandErrorCode::WrongState,
        "one attempt per call"
    );

    let (a, _) = s.confirmed_call(CallScript::default()).await;
    let (b, _) = s.confirmed_call(CallScript { to_uri: "sip:carol@127.0.0.1:5060".into(), ..Default::default() }).await;
    let body = json!({"call_id": a, "leg": "caller", "transfer_call_id": b, "transfer_leg": "callee", "cmd_id": "x1"});
    accepted(&s.cmd("call.transfer.attended", body).await);
    let notes = s.notes_until(|n| n.cmd_id.as_deref() == Some("x1") && n.event.starts_with("command_")).await;
    assert_eq!(notes.last().expect("note").event, "command_succeeded");
    let body = json!({"call_id": a, "leg": "caller", "transfer_call_id": "nope", "transfer_leg": "callee"});
    assert_eq!(refused(&s.cmd("call.transfer.attended", body).await), CommandErrorCode::UnknownCall);
    s.shutdown().await;
    assert_log_replays(s.data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_once_per_cmd_id_and_bad_commands_change_nothing() {
    let mut s = Stack::start().await;
    let (call_id, _) = s.confirmed_call(CallScript::default()).await;
    let history = |r: &CommandReply| match r {
        CommandReply::Data { result, .. } => result["history"].as_array().map(Vec::len).unwrap_or(0),
        other => panic!("{other:?}"),
    };
    let before = history(&s.cmd("call.get", json!({"call_id": call_id})).await);
    for (verb, body, code) in [
        ("call.hold", json!({"call_id": "c-none"}), CommandErrorCode::UnknownCall),
        ("call.hold", json!({"call_id": 12}), CommandErrorCode::WrongType),
        ("call.hold", json!({}), CommandErrorCode::MissingField),
        (
            "call.transfer.blind",
            json!({"call_id": call_id, "leg": "nobody", "destination": "sip:a@b"}),
            CommandErrorCode::BadValue,
        ),
        ("call.start", json!({"caller": "sip:a@b"}), CommandErrorCode::MissingField),
        ("ua.terminate", json!({"call_id": call_id}), CommandErrorCode::WrongState),
    ] {
        assert_eq!(refused(&s.cmd(verb, body.clone()).await), code, "{verb} {body}");
    }
    let raw = s.client.request("callbus.cmd.call.end", Bytes::from_static(b"{not json")).await.expect("reply");
    let reply: CommandReply = serde_json::from_slice(&raw.payload).expect("typed");
    assert_eq!(refused(&reply), CommandErrorCode::BadRequest);
    assert!(
        matches!(&reply, CommandReply::Refused { cmd_id: Some(id), .. } if !id.is_empty()),
        "every answer has a cmd_id: {reply:?}"
    );
    // A body that fails its checks is answered with the client's own cmd_id.
    let reply = s.cmd("call.hold", json!({"call_id": 12, "cmd_id": "bad-1"})).await;
    assert!(matches!(&reply, CommandReply::Refused { cmd_id: Some(id), .. } if id == "bad-1"), "{reply:?}");
    assert_eq!(history(&s.cmd("call.get", json!({"call_id": call_id})).await), before, "refused commands log nothing");

    let first = s.cmd("call.end", json!({"call_id": call_id, "cmd_id": "e1"})).await;
    let again = s.cmd("call.end", json!({"call_id": call_id, "cmd_id": "e1"})).await;
    assert_eq!(first, again, "a repeated cmd_id gets the first answer");
    let notes = s.notes_until(|n| n.event == "command_succeeded").await;
    assert_eq!(notes.iter().filter(|n| n.event == "ending").count(), 1, "acted on once");
    assert!(notes.iter().any(|n| n.event == "ended" && n.data["reason"] == json!("ended_by_command")));
    let after = history(&s.cmd("call.get", json!({"call_id": call_id})).await);
    s.shutdown().await;
    let log = SledLog::open(s.data.path()).expect("log");
    let labels: Vec<String> = log.records_of_call(&call_id).expect("records").iter().map(|r| r.input.label()).collect();
    println!("{labels:?}");
    assert_eq!(labels.iter().filter(|l| *l == "cmd call.end").count(), 1, "{labels:?}");
    assert_eq!(after, before + 3, "one end command, its MI reply, the 4→5 event: {labels:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_engine_restarts_with_every_acknowledged_input_and_reconciles() {
    let mut s = Stack::start().await;
    let mut calls = Vec::new();
    for _ in 0..3 {
        calls.push(s.confirmed_call(CallScript::default()).await);
    }
    let (held_id, _) = accepted(&s.cmd("call.hold", json!({"call_id": calls[0].0, "cmd_id": "before-crash"})).await);
    s.notes_until(|n| n.event == "command_succeeded").await;
    // Crash: no clean shutdown, nothing more committed.
    s.engine.take().expect("engine").abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // While the engine is down, one call ends in OpenSIPS (its events reach nobody).
    let mi = s
        .client
        .request(format!("opensips.{NODE}.mi.dlg_end_dlg"), Bytes::from(json!({"dialog_id": calls[1].1}).to_string()));
    mi.await.expect("bridge answers");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // And one call starts that the engine never saw.
    let stranger = s.sim.proxied_call(CallScript::default());
    tokio::time::sleep(Duration::from_millis(100)).await;

    s.start_engine().await;
    assert!(s.engine.as_ref().expect("engine").recovered_live_calls() >= 3);
    let notes = s.notes_until(|n| n.call_id == calls[1].0 && n.event == "ended").await;
    assert_eq!(notes.last().expect("ended").data["reason"], json!("ended_while_engine_away"));
    let listed = s.cmd("call.list", json!({})).await;
    let CommandReply::Data { result, .. } = &listed else { panic!("{listed:?}") };
    let sips: Vec<&str> =
        result["calls"].as_array().expect("calls").iter().filter_map(|c| c["sip_call_id"].as_str()).collect();
    assert!(sips.contains(&stranger.as_str()), "a live dialog the engine never saw is adopted: {sips:?}");
    // A call from before the crash goes on.
    accepted(&s.cmd("call.unhold", json!({"call_id": held_id, "cmd_id": "after-crash"})).await);
    let notes = s.notes_until(|n| n.cmd_id.as_deref() == Some("after-crash") && n.event.starts_with("command_")).await;
    assert_eq!(notes.last().expect("note").event, "command_succeeded");
    // The repeated cmd_id from before the crash is still answered, not acted on.
    let again = s.cmd("call.hold", json!({"call_id": calls[0].0, "cmd_id": "before-crash"})).await;
    assert_eq!(accepted(&again).1, "before-crash");
    s.shutdown().await;
    let log = SledLog::open(s.data.path()).expect("log");
    let labels: Vec<String> =
        log.records_of_call(&calls[0].0).expect("records").iter().map(|r| r.input.label()).collect();
    assert!(labels.contains(&"cmd call.hold".to_owned()), "the acknowledged command is in the log: {labels:?}");
    drop(log);
    assert_log_replays(s.data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_traffic_every_acknowledged_command_is_in_the_log() {
    killed_mid_traffic(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_traffic_with_fdatasync_every_acknowledged_command_is_in_the_log() {
    killed_mid_traffic(true).await;
}

/// 30 holds at once, the engine aborted while their answers come back, then restarted (with
/// `sync_data` as given both times): every acknowledged command is in the log.
async fn killed_mid_traffic(sync_data: bool) {
    let mut s = Stack::start().await;
    if sync_data {
        s.start_engine_with(|c| c.sync_data = true).await;
    }
    let mut calls = Vec::new();
    for _ in 0..30 {
        calls.push(s.sim.proxied_call(CallScript::default()));
    }
    s.notes_until({
        let last = calls.last().cloned().unwrap_or_default();
        move |n| n.event == "confirmed" && n.sip_call_id.as_deref() == Some(last.as_str())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 30 holds at once; the engine dies while their answers are coming back.
    let (acks_tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
    for (i, sip) in calls.iter().enumerate() {
        let client = s.client.clone();
        let acks_tx = acks_tx.clone();
        let body = json!({"sip_call_id": sip, "cmd_id": format!("m{i}")}).to_string();
        tokio::spawn(async move {
            let reply = tokio::time::timeout(
                Duration::from_secs(2),
                client.request("callbus.cmd.call.hold", Bytes::from(body)),
            )
            .await;
            if let Ok(Ok(msg)) = reply {
                if let Ok(CommandReply::Accepted { cmd_id, .. }) = serde_json::from_slice::<CommandReply>(&msg.payload)
                {
                    let _ = acks_tx.send(cmd_id);
                }
            }
        });
    }
    drop(acks_tx);
    let mut acknowledged = Vec::new();
    if let Some(first) = acks.recv().await {
        acknowledged.push(first);
    }
    s.engine.take().expect("engine").abort();
    while let Some(more) = acks.recv().await {
        acknowledged.push(more);
    }
    assert!(!acknowledged.is_empty());
    println!("{} of 30 commands were acknowledged before the kill", acknowledged.len());
    // Restart: every acknowledged command is there, and the calls go on.
    s.start_engine_with(|c| c.sync_data = sync_data).await;
    let reply = s.cmd("call.list", json!({})).await;
    let CommandReply::Data { result, .. } = &reply else { panic!("{reply:?}") };
    assert!(result["calls"].as_array().is_some_and(|c| c.len() >= 30), "the calls are still live");
    s.shutdown().await;
    let logged = callbus_tests::stack::logged_cmd_ids(s.data.path());
    for cmd_id in &acknowledged {
        assert!(logged.contains(cmd_id), "{cmd_id} was acknowledged but is not in the log");
    }
    assert_log_replays(s.data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_beyond_the_input_queue_are_refused_as_overloaded_and_nothing_else_changes() {
    let mut s = Stack::start().await;
    s.start_engine_with(|c| c.input_queue = 2).await;
    let (call_id, _) = s.confirmed_call(CallScript::default()).await;
    let asks = (0..300).map(|i| {
        let body = json!({"call_id": call_id, "cmd_id": format!("burst-{i}")}).to_string();
        s.client.request("callbus.cmd.call.get", Bytes::from(body))
    });
    let replies = futures::future::join_all(asks).await;
    let (mut answered, mut overloaded) = (0, 0);
    for reply in replies {
        let reply: CommandReply = serde_json::from_slice(&reply.expect("a reply").payload).expect("typed");
        match reply {
            CommandReply::Data { .. } => answered += 1,
            CommandReply::Refused { error, .. } => {
                assert_eq!(error.code, CommandErrorCode::Unavailable);
                assert!(error.message.contains("overloaded"), "{}", error.message);
                overloaded += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(answered > 0 && overloaded > 0, "{answered} answered, {overloaded} refused");
    // The engine goes on.
    let reply = s.cmd("call.get", json!({"call_id": call_id})).await;
    assert!(matches!(reply, CommandReply::Data { .. }), "{reply:?}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_pending_at_a_crash_fire_after_the_restart() {
    let mut s = Stack::start().await;
    let (_, sip) = s.confirmed_call(CallScript { declines_refer: true, ..Default::default() }).await;
    let cmd = json!({"sip_call_id": sip, "leg": "callee", "destination": "sip:x@127.0.0.1", "cmd_id": "x-crash"});
    accepted(&s.cmd("call.transfer.blind", cmd).await);
    // The REFER went out (its timer, 600 ms here, is armed); then the engine dies.
    s.notes_until(|n| n.cmd_id.as_deref() == Some("x-crash") && n.event == "transfer_requested").await;
    s.engine.take().expect("engine").abort();
    s.start_engine().await;
    // Only the re-armed timer can end the transfer: OpenSIPS raises nothing for a declined REFER.
    let notes = s.notes_until(|n| n.cmd_id.as_deref() == Some("x-crash") && n.event == "command_failed").await;
    assert!(notes.iter().any(|n| n.event == "transfer_failed"));
    s.shutdown().await;
    assert_log_replays(s.data.path());
}

/// How a retry is answered after the engine went away: `stop` is a clean stop or a crash.
async fn retried_after(stop: &str) {
    let mut s = Stack::start().await;
    // A click-to-dial and a hold of a proxied call, each with a client cmd_id.
    let start = json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1", "cmd_id": "same-1"});
    let (first_call, _) = accepted(&s.cmd("call.start", start.clone()).await);
    let (proxied, _) = s.confirmed_call(CallScript::default()).await;
    let (held, _) = accepted(&s.cmd("call.hold", json!({"call_id": proxied, "cmd_id": "dup-1"})).await);
    s.notes_until(|n| n.cmd_id.as_deref() == Some("dup-1") && n.event.starts_with("command_")).await;
    // The proxied call ends: a retry of its hold must not be answered "unknown call".
    accepted(&s.cmd("call.end", json!({"call_id": proxied})).await);
    s.notes_until(|n| n.call_id == proxied && n.event == "ended").await;
    // Past a checkpoint (1 s): the commands are no longer in the log's tail.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    match stop {
        "crash" => {
            s.engine.take().expect("engine").abort();
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.start_engine().await;
        }
        _ => s.start_engine().await, // shuts the running one down cleanly first
    }
    let again = s.cmd("call.start", start).await;
    assert_eq!(accepted(&again), (first_call.clone(), "same-1".to_owned()), "after a {stop}: the first answer");
    let again = s.cmd("call.hold", json!({"call_id": proxied, "cmd_id": "dup-1"})).await;
    assert_eq!(accepted(&again), (held, "dup-1".to_owned()), "after a {stop}: the first answer, not unknown_call");
    // Acted on once: no second call was placed.
    let listed = s.cmd("call.list", json!({})).await;
    let CommandReply::Data { result, .. } = &listed else { panic!("{listed:?}") };
    let starts = result["calls"].as_array().expect("calls").iter().filter(|c| c["kind"] == json!("bridged")).count();
    assert_eq!(starts, 1, "one click-to-dial: {result}");
    let logged = callbus_tests::stack::logged_cmd_ids;
    s.shutdown().await;
    let ids = logged(s.data.path());
    assert_eq!(ids.iter().filter(|c| *c == "same-1").count(), 1, "{ids:?}");
    assert_eq!(ids.iter().filter(|c| *c == "dup-1").count(), 1, "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_cmd_id_gets_the_first_answer_after_a_clean_restart() {
    retried_after("clean stop").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_cmd_id_gets_the_first_answer_after_a_crash() {
    retried_after("crash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cmd_id_older_than_the_window_is_a_new_command() {
    let mut s = Stack::start().await;
    s.start_engine_with(|c| c.cmd_id_window = Duration::from_millis(300)).await;
    let start = json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1", "cmd_id": "old-1"});
    let (first, _) = accepted(&s.cmd("call.start", start.clone()).await);
    assert_eq!(accepted(&s.cmd("call.start", start.clone()).await).0, first, "within the window: the first answer");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Forgotten in memory, and in the log across a restart.
    s.start_engine_with(|c| c.cmd_id_window = Duration::from_millis(300)).await;
    let (second, _) = accepted(&s.cmd("call.start", start).await);
    assert_ne!(second, first, "past the window: acted on as a new command");
    s.shutdown().await;
    let kept = SledLog::open(s.data.path()).expect("log").commands().expect("kept cmd_ids");
    assert!(kept.iter().all(|(_, c)| c.call_id != first), "the old one is removed from the log: {kept:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_older_than_the_retention_leave_the_log_whole_and_the_others_stay() {
    let mut s = Stack::start().await;
    let archive = tempfile::tempdir().expect("tmp");
    let archive_dir = archive.path().to_owned();
    s.start_engine_with(move |c| {
        c.retention = Some(Duration::from_millis(1500));
        c.ended_retention = Duration::from_millis(200);
        c.archive_dir = Some(archive_dir);
    })
    .await;
    let script = CallScript { hangup_after: Some(Duration::from_millis(200)), ..Default::default() };
    let (gone, _) = s.confirmed_call(script).await;
    s.notes_until(|n| n.call_id == gone && n.event == "ended").await;
    let (live, _) = s.confirmed_call(CallScript::default()).await;
    // The live call's first records are as old as the ended call's: they stay.
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    let (young, _) = s.confirmed_call(CallScript::default()).await;
    accepted(&s.cmd("call.end", json!({"call_id": young})).await);
    s.notes_until(|n| n.call_id == young && n.event == "ended").await;
    s.shutdown().await;

    let log = SledLog::open(s.data.path()).expect("open");
    assert!(log.records_of_call(&gone).expect("read").is_empty(), "the old ended call is gone");
    assert!(log.seqs_of_call(&gone).expect("index").is_empty(), "its index too");
    assert!(!log.records_of_call(&live).expect("read").is_empty(), "a live call stays, however old");
    assert!(!log.records_of_call(&young).expect("read").is_empty(), "a call younger than the retention stays");
    drop(log);
    // What stays replays as it did: calls are removed whole.
    assert_log_replays(s.data.path());
    // The removed call is in the archive, whole: with the log, it reads and replays as before.
    let live_log = callbus_replay::LogReader::open(s.data.path()).expect("log");
    let merged = tempfile::tempdir().expect("tmp");
    let archived = callbus_replay::merge_archive(archive.path(), Some(&live_log), merged.path()).await.expect("merge");
    assert!(archived >= 4, "the ended call's records: {archived}");
    drop(live_log);
    let reader = callbus_replay::LogReader::open(merged.path()).expect("merged");
    let timeline = reader.timeline(&gone).expect("the archived call's timeline");
    assert!(timeline.last().is_some_and(|r| r.after == "ended"), "{timeline:?}");
    assert!(!reader.timeline(&live).expect("live").is_empty());
    drop(reader);
    assert_log_replays(merged.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_over_its_size_limit_loses_its_oldest_ended_calls_and_keeps_live_ones() {
    const LIMIT: u64 = 12_000;
    let mut s = Stack::start().await;
    s.start_engine_with(|c| {
        c.retention_bytes = LIMIT;
        c.ended_retention = Duration::from_millis(200);
    })
    .await;
    let (live, _) = s.confirmed_call(CallScript::default()).await;
    let mut ended = Vec::new();
    for _ in 0..6 {
        let script = CallScript { hangup_after: Some(Duration::from_millis(100)), ..Default::default() };
        let (call, _) = s.confirmed_call(script).await;
        s.notes_until(|n| n.call_id == call && n.event == "ended").await;
        ended.push(call);
    }
    // A checkpoint, the ended calls leave memory, a retention step: a few seconds.
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    s.shutdown().await;

    let log = SledLog::open(s.data.path()).expect("open");
    assert!(log.stored_bytes() <= LIMIT, "{} bytes of records kept, over the limit of {LIMIT}", log.stored_bytes());
    assert!(log.records_of_call(&ended[0]).expect("read").is_empty(), "the oldest ended call went first");
    assert!(!log.records_of_call(&live).expect("read").is_empty(), "a live call stays, however big the log");
    let kept: Vec<bool> = ended.iter().map(|c| !log.records_of_call(c).expect("read").is_empty()).collect();
    assert!(kept.iter().any(|k| *k), "only what was over the limit went: {kept:?}");
    assert!(kept.windows(2).all(|w| w[0] <= w[1]), "the oldest first: {kept:?}");
    drop(log);
    assert_log_replays(s.data.path());
}

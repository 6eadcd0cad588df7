//! `callbus up`'s wiring end to end: the engine takes its node's event datagrams and MI from
//! the bridge in the same process, skipping NATS; apps still see every event on NATS.

use std::time::Duration;

use bytes::Bytes;
use callbus_engine::log::{EventLog, SledLog};
use callbus_engine::machines::Input;
use callbus_tests::stack::{accepted, assert_log_replays, Stack, NODE};
use futures::StreamExt;
use opensips_sim::{CallScript, SimConfig};
use serde_json::json;

/// The E_DLG_STATE_CHANGED inputs in the log of `call_id` (a stopped engine's log).
fn logged_dialog_events(data: &std::path::Path, call_id: &str) -> Vec<String> {
    let log = SledLog::open(data).expect("log");
    log.records_of_call(call_id)
        .expect("records")
        .into_iter()
        .filter_map(|r| match r.input {
            Input::Event { datagram, .. } if datagram.contains("E_DLG_STATE_CHANGED") => Some(datagram),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_call_is_held_and_ended_without_a_nats_hop_and_apps_still_see_every_event() {
    let mut s = Stack::start_up(SimConfig::default()).await;
    let mut events_on_bus =
        s.client.subscribe(format!("opensips.{NODE}.event.E_DLG_STATE_CHANGED")).await.expect("sub");
    let mut mi_on_bus = s.client.subscribe(format!("opensips.{NODE}.mi.>")).await.expect("sub");
    s.client.flush().await.expect("flush");
    let (call_id, sip) = s.confirmed_call(CallScript::default()).await;
    accepted(&s.cmd("call.hold", json!({"call_id": call_id, "cmd_id": "h"})).await);
    let notes = s.notes_until(|n| n.cmd_id.as_deref() == Some("h") && n.event.starts_with("command_")).await;
    assert_eq!(notes.last().expect("note").event, "command_succeeded", "{notes:?}");
    accepted(&s.cmd("call.end", json!({"call_id": call_id, "cmd_id": "e"})).await);
    s.notes_until(|n| n.call_id == call_id && n.event == "ended").await;
    s.shutdown().await;

    let mut seen_by_apps = 0;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), events_on_bus.next()).await {
        seen_by_apps += usize::from(String::from_utf8_lossy(&msg.payload).contains(&sip));
    }
    let logged = logged_dialog_events(s.data.path(), &call_id);
    assert_eq!(logged.len(), 4, "early, answered, confirmed, deleted, each once (not again from NATS): {logged:#?}");
    assert_eq!(seen_by_apps, logged.len(), "apps on NATS see the events the engine logged");
    let mut mi_seen = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(100), mi_on_bus.next()).await {
        mi_seen.push(msg.subject.to_string());
    }
    assert!(mi_seen.is_empty(), "the engine's MI requests went to the bridge in-process: {mi_seen:?}");
    assert_log_replays(s.data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_arrive_while_the_engine_is_down_wait_in_the_tap_for_the_next_engine() {
    let mut s = Stack::start_up(SimConfig::default()).await;
    let (call_id, sip) = s.confirmed_call(CallScript::default()).await;
    s.engine.take().expect("engine").abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The call ends in OpenSIPS while no engine runs: its event waits in the tap.
    let end =
        s.client.request(format!("opensips.{NODE}.mi.dlg_end_dlg"), Bytes::from(json!({"dialog_id": sip}).to_string()));
    end.await.expect("the bridge answers");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // No reconciliation: only the waiting event can end the call.
    s.start_engine_with(|c| c.reconcile = false).await;
    let notes = s.notes_until(|n| n.call_id == call_id && n.event == "ended").await;
    assert_ne!(notes.last().expect("ended").data["reason"], json!("ended_while_engine_away"));
    s.shutdown().await;
    let logged = logged_dialog_events(s.data.path(), &call_id);
    assert!(logged.last().is_some_and(|d| d.contains(r#""new_state":5"#)), "the deleted event is logged: {logged:#?}");
    assert_log_replays(s.data.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn click_to_dial_connects_and_ends_through_the_in_process_bridge() {
    let mut s = Stack::start_up(SimConfig::default()).await;
    let body = json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1", "cmd_id": "c"});
    let (call_id, _) = accepted(&s.cmd("call.start", body).await);
    let notes = s.notes_until(|n| n.call_id == call_id && (n.event == "connected" || n.event == "ended")).await;
    assert_eq!(notes.last().expect("note").event, "connected", "{notes:?}");
    accepted(&s.cmd("call.end", json!({"call_id": call_id})).await);
    let notes = s.notes_until(|n| n.call_id == call_id && n.event == "ended").await;
    assert_eq!(notes.last().expect("note").state, "ended");
    s.shutdown().await;
    assert!(assert_log_replays(s.data.path()) > 10);
}

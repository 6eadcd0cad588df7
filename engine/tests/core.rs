//! The engine core, given / when / then, on a virtual clock: no NATS, no disk, no task. Inputs
//! are the real OpenSIPS 3.4.18 datagrams from `fixtures/opensips-3.4/events/`; time moves only
//! when a test moves it.

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use callbus_engine::core::{Core, CoreConfig, CoreInput, Now, Outputs, Reconciled};
use callbus_engine::log::{Record, Snapshot};
use callbus_engine::machines::Input;
use callbus_engine::placement::{partition_of, Placement};
use callbus_schemas::bus::MiBusReply;
use callbus_schemas::command::{CallNotification, CommandReply};
use callbus_schemas::subjects::Verb;
use serde_json::{json, Value};

fn fixture(name: &str) -> Bytes {
    let dir = std::env::var_os("CALLBUS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/opensips-3.4"));
    Bytes::from(std::fs::read(dir.join("events").join(format!("{name}.json"))).expect("fixture"))
}

/// The SIP Call-ID of the `proxied_call` capture.
const PROXIED: &str = "1-16765@127.0.0.1";
/// The session key of the `ua_client_start` capture.
const CLIENT_KEY: &str = "B2B.34.7688516.1795417967.294181658";
/// The session key of the `ua_server_call` capture.
const SERVER_KEY: &str = "B2B.509.162.1795417975.860926370";

/// A core on a virtual clock, and everything it said.
struct Given {
    core: Core,
    now: Now,
    /// Every output so far, and the last input's alone.
    all: Outputs,
    last: Outputs,
}

impl Given {
    fn engine() -> Given {
        Given::with(CoreConfig { nodes: vec!["n1".into()], ..CoreConfig::default() })
    }

    fn with(config: CoreConfig) -> Given {
        let now = Now { at: Instant::now(), wall_ms: 1_800_000_000_000 };
        Given { core: Core::new(config, 1), now, all: Outputs::default(), last: Outputs::default() }
    }

    fn input(&mut self, input: CoreInput) -> &Outputs {
        let mut out = Outputs::default();
        self.core.handle(input, self.now, &mut out).expect("handled");
        self.keep(out)
    }

    fn keep(&mut self, out: Outputs) -> &Outputs {
        self.all.records.extend(out.records.iter().cloned());
        self.all.replies.extend(out.replies.iter().cloned());
        self.all.notifications.extend(out.notifications.iter().cloned());
        self.all.mi.extend(out.mi.iter().cloned());
        self.last = out;
        &self.last
    }

    fn event(&mut self, name: &str) -> &Outputs {
        let payload = fixture(name);
        self.input(CoreInput::Event { node: "n1".into(), bridge_seq: None, payload })
    }

    fn command(&mut self, verb: Verb, body: Value) -> &Outputs {
        let payload = Bytes::from(body.to_string());
        self.input(CoreInput::Command { verb, payload, reply: Some("_INBOX.r".into()), received: self.now.at })
    }

    fn mi_reply(&mut self, request: &str, reply: MiBusReply) -> &Outputs {
        self.input(CoreInput::MiReply { request: request.into(), reply })
    }

    /// Moves the clock by `ms` and lets the core's timeout run.
    fn wait_ms(&mut self, ms: u64) -> &Outputs {
        self.now = self.now.after_ms(ms);
        let mut out = Outputs::default();
        self.core.handle_timeout(self.now, &mut out).expect("timeout handled");
        self.keep(out)
    }

    /// The last input's records, decoded.
    fn records(&self) -> Vec<Record> {
        self.last.records.iter().map(|s| rmp_serde::from_slice(&s.bytes).expect("a record")).collect()
    }

    /// The last input's notifications' events.
    fn notified(&self) -> Vec<String> {
        self.last
            .notifications
            .iter()
            .map(|(_, b)| serde_json::from_slice::<CallNotification>(b).expect("a notification").event)
            .collect()
    }

    /// The last input's (only) reply.
    fn reply(&self) -> CommandReply {
        assert_eq!(self.last.replies.len(), 1, "one reply: {:?}", self.last);
        serde_json::from_slice(&self.last.replies[0].1).expect("a reply")
    }

    fn accepted_call(&self) -> String {
        match self.reply() {
            CommandReply::Accepted { call_id, .. } => call_id,
            other => panic!("not accepted: {other:?}"),
        }
    }

    /// The one MI request of the last input: its id, command and params.
    fn mi(&self) -> (String, String, Value) {
        assert_eq!(self.last.mi.len(), 1, "one MI request: {:?}", self.last.mi);
        let m = &self.last.mi[0];
        (m.request.clone(), m.command.clone(), m.params.clone())
    }
}

#[test]
fn a_proxied_call_is_created_by_its_first_event_and_forgotten_after_its_retention() {
    let mut g = Given::engine();
    g.event("E_DLG_STATE_CHANGED.1.proxied_call");
    let first = g.records();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].seq, 1);
    assert_eq!(first[0].before, None, "the record that creates the call");
    let call = first[0].call_id.clone();
    for n in 2..=4 {
        g.event(&format!("E_DLG_STATE_CHANGED.{n}.proxied_call"));
        assert_eq!(g.records()[0].call_id, call, "event {n} is the same call's");
        assert_eq!(g.records()[0].seq, n);
    }
    assert!(g.core.state(&call).expect("known").is_ended());
    assert_eq!(g.core.live(), 0);
    assert!(g.core.knows(&call), "kept a while for late events");
    // A late event is absorbed by the ended call...
    g.event("E_DLG_STATE_CHANGED.4.proxied_call");
    assert_eq!(g.records()[0].call_id, call);
    // ...until `ended_retention` has passed: then the call is forgotten and the event ignored.
    g.wait_ms(61_000);
    assert!(!g.core.knows(&call));
}

#[test]
fn events_that_do_not_start_a_call_are_ignored_when_no_call_knows_them() {
    let mut g = Given::engine();
    assert!(g.event("E_CALL_HOLD.1.call_hold").records.is_empty());
    assert!(g.event("E_UA_SESSION.2.ua_server_call").records.is_empty(), "an UPDATED for no session is parked");
    assert!(g
        .input(CoreInput::Event { node: "n1".into(), bridge_seq: None, payload: Bytes::from_static(b"{not json") })
        .is_empty());
    assert_eq!(g.core.next_seq(), 1, "no record was made");
}

#[test]
fn a_ua_server_session_is_created_by_its_new_event() {
    let mut g = Given::engine();
    g.event("E_UA_SESSION.1.ua_server_call");
    let record = &g.records()[0];
    assert_eq!(record.after.kind(), "ua_server");
    assert_eq!(record.after.keys(), [SERVER_KEY]);
    let call = record.call_id.clone();
    // A command finds it by its key.
    g.command(Verb::CallGet, json!({"sip_call_id": SERVER_KEY, "history": false}));
    match g.reply() {
        CommandReply::Data { result, .. } => assert_eq!(result["call"]["call_id"], json!(call)),
        other => panic!("{other:?}"),
    }
    g.event("E_UA_SESSION.2.ua_server_call");
    g.event("E_UA_SESSION.3.ua_server_call");
    assert!(g.core.state(&call).expect("known").is_ended(), "{:?}", g.core.state(&call));
}

#[test]
fn a_ua_client_event_before_the_reply_naming_its_session_is_parked_then_handled_in_order() {
    let mut g = Given::engine();
    let body =
        json!({"cmd_id": "u1", "to": "sip:uas@127.0.0.1:5080", "from": "sip:alice@127.0.0.1", "body": "v=0\r\n"});
    g.command(Verb::UaStart, body);
    let call = g.accepted_call();
    let (request, command, _) = g.mi();
    assert_eq!(command, "ua_session_client_start");
    // OpenSIPS raises the session's first events before it answers the MI request.
    assert!(g.event("E_UA_SESSION.1.ua_client_start").records.is_empty(), "parked");
    assert!(g.event("E_UA_SESSION.2.ua_client_start").records.is_empty(), "parked");
    assert_eq!(g.core.waiting().1, 2);
    // The reply names the key: the call learns it, and the parked events follow at once.
    g.mi_reply(&request, MiBusReply::Result { result: json!(CLIENT_KEY) });
    let records = g.records();
    assert_eq!(records.len(), 3, "the reply and both parked events");
    assert!(matches!(records[0].input, Input::MiReply { .. }));
    assert!(records[1..].iter().all(|r| matches!(r.input, Input::Event { .. }) && r.call_id == call));
    assert_eq!(records[2].after.name(), "confirmed");
    assert_eq!(g.core.waiting().1, 0);
}

#[test]
fn a_parked_event_nobody_claims_is_dropped_after_three_seconds() {
    let mut g = Given::engine();
    g.command(Verb::UaStart, json!({"to": "sip:uas@127.0.0.1:5080", "from": "sip:a@127.0.0.1"}));
    let (request, ..) = g.mi();
    g.event("E_UA_SESSION.1.ua_client_start");
    g.wait_ms(3_500);
    assert_eq!(g.core.waiting().1, 0, "dropped");
    g.mi_reply(&request, MiBusReply::Result { result: json!(CLIENT_KEY) });
    assert_eq!(g.records().len(), 1, "only the reply: the dropped event is not handled");
}

#[test]
fn a_click_to_dial_leg_that_does_not_answer_fails_when_its_ring_timer_fires() {
    let mut g = Given::engine();
    g.command(Verb::CallStart, json!({"cmd_id": "b1", "caller": "sip:a@127.0.0.1", "callee": "sip:b@127.0.0.1"}));
    let call = g.accepted_call();
    let (request, command, params) = g.mi();
    assert_eq!(command, "ua_session_client_start");
    assert_eq!(params["to"], json!("sip:a@127.0.0.1"), "{params}");
    g.mi_reply(&request, MiBusReply::Result { result: json!("B2B.leg.a") });
    // Time moves a second at a time; the ring timer fires once, as the only input of its step.
    let mut waited = 0;
    while g.wait_ms(1_000).records.is_empty() {
        waited += 1;
        assert!(waited < 600, "no timer fired in 10 minutes");
    }
    assert!(waited >= 5, "the leg rang {waited} s only");
    let records = g.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].call_id, call);
    assert!(matches!(&records[0].input, Input::Timer { name } if name.contains("ring")), "{:?}", records[0].input);
    assert!(g.notified().iter().any(|e| e == "leg_failed" || e == "failed" || e == "ending"), "{:?}", g.notified());
}

#[test]
fn a_repeated_cmd_id_gets_the_first_answer_and_is_not_acted_on_again() {
    let mut g = Given::engine();
    let body = json!({"cmd_id": "same", "caller": "sip:a@127.0.0.1", "callee": "sip:b@127.0.0.1"});
    g.command(Verb::CallStart, body.clone());
    let first = g.last.replies[0].1.clone();
    assert_eq!(g.last.records.len(), 1);
    g.command(Verb::CallStart, body.clone());
    assert!(g.last.records.is_empty() && g.last.mi.is_empty(), "not acted on again");
    assert_eq!(g.last.replies[0].1, first, "the first answer, byte for byte");
    assert_eq!(g.last.answered[0].outcome, "repeated");
    // Past the window, the cmd_id is forgotten: the same body starts a second call.
    g.wait_ms(24 * 3600 * 1000 + 2_000);
    g.command(Verb::CallStart, body);
    assert_eq!(g.last.answered[0].outcome, "accepted");
    assert_eq!(g.last.records.len(), 1);
}

#[test]
fn bad_commands_are_refused_in_words_and_change_nothing() {
    let mut g = Given::engine();
    for (verb, body) in [
        (Verb::CallHold, b"{not json".to_vec()),
        (Verb::CallHold, br#"{"cmd_id":"h1"}"#.to_vec()),
        (Verb::CallHold, br#"{"cmd_id":"h2","call_id":"nope"}"#.to_vec()),
        (Verb::CallStart, br#"{"cmd_id":"s1","caller":5}"#.to_vec()),
        (Verb::CallStart, vec![b'x'; 100_000]),
    ] {
        g.input(CoreInput::Command { verb, payload: Bytes::from(body), reply: Some("r".into()), received: g.now.at });
        match g.reply() {
            CommandReply::Refused { error, cmd_id } => {
                assert!(cmd_id.is_some(), "every answer has a cmd_id");
                assert!(!error.message.contains("CallId(") && !error.message.contains("Os {"), "{}", error.message);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(g.last.answered[0].outcome, "refused");
        assert!(g.last.records.is_empty());
    }
    assert_eq!(g.core.next_seq(), 1);
}

#[test]
fn new_calls_are_refused_beyond_the_live_limit_but_events_still_create_calls() {
    let mut g = Given::with(CoreConfig { max_live_calls: 1, nodes: vec!["n1".into()], ..CoreConfig::default() });
    g.command(Verb::CallStart, json!({"caller": "sip:a@h", "callee": "sip:b@h"}));
    g.accepted_call();
    g.command(Verb::UaStart, json!({"to": "sip:a@h", "from": "sip:b@h"}));
    match g.reply() {
        CommandReply::Refused { error, .. } => assert!(error.message.contains("max_live_calls"), "{}", error.message),
        other => panic!("{other:?}"),
    }
    // OpenSIPS's calls are followed whatever the limit: refusing them would lose them.
    assert_eq!(g.event("E_DLG_STATE_CHANGED.1.proxied_call").records.len(), 1);
    assert_eq!(g.core.live(), 2);
}

#[test]
fn queries_answer_from_memory_and_history_is_left_to_the_log_reader() {
    let mut g = Given::engine();
    g.event("E_DLG_STATE_CHANGED.1.proxied_call");
    g.event("E_DLG_STATE_CHANGED.2.proxied_call");
    g.command(Verb::CallList, json!({}));
    match g.reply() {
        CommandReply::Data { result, .. } => {
            assert_eq!(result["calls"].as_array().map(Vec::len), Some(1));
            assert_eq!(result["calls"][0]["sip_call_id"], json!(PROXIED));
        }
        other => panic!("{other:?}"),
    }
    g.command(Verb::CallList, json!({"state": "ended"}));
    match g.reply() {
        CommandReply::Data { result, .. } => assert_eq!(result["calls"], json!([])),
        other => panic!("{other:?}"),
    }
    g.command(Verb::CallGet, json!({"cmd_id": "g1", "sip_call_id": PROXIED, "history": true}));
    assert!(g.last.replies.is_empty(), "answered after the log is read");
    assert_eq!(g.last.histories.len(), 1);
    assert_eq!(g.last.histories[0].cmd_id, "g1");
    assert_eq!(g.last.histories[0].summary["sip_call_id"], json!(PROXIED));
    assert!(g.last.records.is_empty(), "queries are not logged");
}

#[test]
fn reconciliation_closes_only_candidates_opensips_lost_and_adopts_unknown_dialogs() {
    let mut g = Given::engine();
    g.event("E_DLG_STATE_CHANGED.1.proxied_call");
    let known = g.records()[0].call_id.clone();
    let candidates = g.core.live_call_ids();
    // Periodic: a call OpenSIPS still has is not logged again.
    let still = Reconciled {
        node: "n1".into(),
        dialogs: vec![(PROXIED.into(), 4)],
        ua_keys: Some(vec![]),
        candidates: candidates.clone(),
        periodic: true,
    };
    assert!(g.input(CoreInput::Reconciled(still)).records.is_empty());
    // A dialog nobody knows is adopted; the known call, gone from OpenSIPS, is closed.
    let lost = Reconciled {
        node: "n1".into(),
        dialogs: vec![("other@h".into(), 4)],
        ua_keys: Some(vec![]),
        candidates,
        periodic: true,
    };
    g.input(CoreInput::Reconciled(lost));
    let records = g.records();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0].call_id, known);
    assert!(matches!(records[0].input, Input::Reconcile { opensips_state: None }));
    assert!(records[0].after.is_ended());
    assert_eq!(records[1].after.sip_call_id(), Some("other@h"));
    assert!(!records[1].after.is_ended());
    // A call that is not a candidate (seen live after the lists were taken) is never closed.
    g.event("E_DLG_STATE_CHANGED.1.rejected_call");
    let fresh = Reconciled { node: "n1".into(), dialogs: vec![], ua_keys: None, candidates: vec![], periodic: false };
    assert!(g.input(CoreInput::Reconciled(fresh)).records.is_empty());
}

#[test]
fn in_a_cluster_a_dialog_is_adopted_only_by_its_partition_and_call_ids_name_it() {
    let partitions = 8;
    let mine = partition_of("other@h", partitions);
    for partition in [mine, (mine + 1) % partitions] {
        let placement = Some(Placement { partition, partitions });
        let mut g = Given::with(CoreConfig { placement, nodes: vec!["n1".into()], ..CoreConfig::default() });
        let r = Reconciled {
            node: "n1".into(),
            dialogs: vec![("other@h".into(), 4)],
            ua_keys: None,
            candidates: vec![],
            periodic: false,
        };
        let adopted = g.input(CoreInput::Reconciled(r)).records.len();
        assert_eq!(adopted, usize::from(partition == mine), "partition {partition}");
        g.event("E_UA_SESSION.1.ua_server_call");
        let call = g.records()[0].call_id.clone();
        assert!(call.ends_with(&format!("p{partition:x}")), "{call}");
        assert_eq!(g.last.keys_learned, [SERVER_KEY], "the cluster routes the key's events here");
    }
}

#[test]
fn a_core_rebuilt_from_its_checkpoint_and_tail_is_the_core_that_wrote_them() {
    let mut g = Given::engine();
    g.command(Verb::CallStart, json!({"cmd_id": "b1", "caller": "sip:a@h", "callee": "sip:b@h"}));
    let bridged = g.accepted_call();
    let (request, ..) = g.mi();
    g.mi_reply(&request, MiBusReply::Result { result: json!("B2B.leg.a") });
    let checkpoint = g.core.checkpoint();
    assert_eq!(checkpoint.upto, 2);
    assert_eq!(checkpoint.commands.len(), 1);
    let snapshots: Vec<Snapshot> = checkpoint.snapshots;
    let tail_from = g.all.records.len();
    for n in 1..=3 {
        g.event(&format!("E_DLG_STATE_CHANGED.{n}.proxied_call"));
    }
    g.command(Verb::CallHold, json!({"cmd_id": "h1", "sip_call_id": PROXIED}));
    g.accepted_call();
    let tail: Vec<Record> =
        g.all.records[tail_from..].iter().map(|s| rmp_serde::from_slice(&s.bytes).expect("record")).collect();
    let config = CoreConfig { nodes: vec!["n1".into()], ..CoreConfig::default() };
    let later = g.now.after_ms(5_000);
    let (mut back, restored) =
        Core::restore(config, later, g.core.next_seq(), checkpoint.commands, snapshots, tail.into_iter().map(Ok));
    assert_eq!(restored.live, 2);
    assert_eq!(restored.tail, 4);
    assert_eq!(restored.timers, g.core.waiting().0, "the ring and hold timers, armed again");
    assert!(restored.timers >= 2);
    for call in g.core.live_call_ids() {
        assert_eq!(back.state(&call), g.core.state(&call), "{call}");
    }
    assert_eq!(back.next_seq(), g.core.next_seq());
    // Both cmd_ids are remembered: from the checkpoint and from the tail.
    for (cmd_id, verb, body) in [
        ("b1", Verb::CallStart, json!({"cmd_id": "b1", "caller": "sip:a@h", "callee": "sip:b@h"})),
        ("h1", Verb::CallHold, json!({"cmd_id": "h1", "sip_call_id": PROXIED})),
    ] {
        let mut out = Outputs::default();
        let payload = Bytes::from(body.to_string());
        back.handle(CoreInput::Command { verb, payload, reply: Some("r".into()), received: later.at }, later, &mut out)
            .expect("handled");
        assert_eq!(out.answered[0].outcome, "repeated", "{cmd_id}");
    }
    // The ring timer, 5 s late on the restored clock, fires at the rebuilt core's first timeout.
    let mut out = Outputs::default();
    back.handle_timeout(later.after_ms(600_000), &mut out).expect("timeout");
    let fired: Vec<Record> = out.records.iter().map(|s| rmp_serde::from_slice(&s.bytes).expect("record")).collect();
    assert!(fired.iter().any(|r| r.call_id == bridged && matches!(r.input, Input::Timer { .. })), "{fired:?}");
}

#[test]
fn the_same_inputs_at_the_same_times_give_the_same_outputs() {
    let run = || {
        let mut g = Given::engine();
        g.event("E_DLG_STATE_CHANGED.1.proxied_call");
        g.command(Verb::CallStart, json!({"cmd_id": "b1", "caller": "sip:a@h", "callee": "sip:b@h"}));
        let (request, ..) = g.mi();
        g.mi_reply(&request, MiBusReply::Result { result: json!("B2B.leg.a") });
        g.event("E_UA_SESSION.1.ua_server_call");
        g.wait_ms(70_000);
        g.event("E_DLG_STATE_CHANGED.2.proxied_call");
        let records: Vec<Vec<u8>> = g.all.records.iter().map(|s| s.bytes.clone()).collect();
        let notes: Vec<(String, Bytes)> = g.all.notifications.clone();
        (records, notes, g.all.mi.clone())
    };
    let (a, b) = (run(), run());
    assert!(a.0.len() >= 6, "{}", a.0.len());
    // Time-ordered call ids carry the wall clock, the same in both runs.
    assert_eq!(a, b);
}

#[test]
fn a_core_rebuilt_from_its_whole_state_alone_is_the_same_core() {
    // A cluster partition's snapshot: the whole state, no tail.
    let mut g = Given::engine();
    g.command(Verb::CallStart, json!({"cmd_id": "b1", "caller": "sip:a@h", "callee": "sip:b@h"}));
    let (request, ..) = g.mi();
    g.mi_reply(&request, MiBusReply::Result { result: json!("B2B.leg.a") });
    for n in 1..=3 {
        g.event(&format!("E_DLG_STATE_CHANGED.{n}.proxied_call"));
    }
    g.event("E_DLG_STATE_CHANGED.1.rejected_call");
    let whole = g.core.whole();
    assert_eq!(whole.next_seq, g.core.next_seq());
    assert_eq!(whole.calls.len(), g.core.live());
    assert_eq!(whole.commands.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["b1"]);
    // Through its encoding, as the object store keeps it.
    let bytes = rmp_serde::to_vec_named(&whole).expect("encode");
    let back: callbus_engine::core::Whole = rmp_serde::from_slice(&bytes).expect("decode");
    assert_eq!(back, whole);
    let config = CoreConfig { nodes: vec!["n1".into()], ..CoreConfig::default() };
    let (mut core, restored) =
        Core::restore(config, g.now, back.next_seq, back.commands, back.calls, std::iter::empty());
    assert_eq!((restored.live, restored.tail), (g.core.live(), 0));
    for call in g.core.live_call_ids() {
        assert_eq!(core.state(&call), g.core.state(&call), "{call}");
    }
    assert_eq!(core.waiting().0, g.core.waiting().0, "the same timers armed");
    let mut out = Outputs::default();
    let body = Bytes::from(json!({"cmd_id": "b1", "caller": "sip:a@h", "callee": "sip:b@h"}).to_string());
    core.handle(
        CoreInput::Command { verb: Verb::CallStart, payload: body, reply: Some("r".into()), received: g.now.at },
        g.now,
        &mut out,
    )
    .expect("handled");
    assert_eq!(out.answered[0].outcome, "repeated");
    // The next record continues the sequence.
    core.handle(
        CoreInput::Event {
            node: "n1".into(),
            bridge_seq: None,
            payload: fixture("E_DLG_STATE_CHANGED.4.proxied_call"),
        },
        g.now,
        &mut out,
    )
    .expect("handled");
    assert_eq!(out.records[0].seq, g.core.next_seq());
}

#[test]
fn a_checkpoint_removes_the_snapshot_of_an_ended_call_only_when_one_was_written() {
    let mut g = Given::engine();
    // Begun and ended between two checkpoints: no snapshot was written, none to remove.
    for n in 1..=4 {
        g.event(&format!("E_DLG_STATE_CHANGED.{n}.proxied_call"));
    }
    let call = g.records()[0].call_id.clone();
    let checkpoint = g.core.checkpoint();
    assert!(checkpoint.snapshots.is_empty() && checkpoint.removed.is_empty(), "{checkpoint:?}");

    // Live at a checkpoint, ended before the next: its snapshot is removed then.
    let mut g = Given::engine();
    g.event("E_DLG_STATE_CHANGED.1.proxied_call");
    let checkpoint = g.core.checkpoint();
    assert_eq!(checkpoint.snapshots.len(), 1);
    for n in 2..=4 {
        g.event(&format!("E_DLG_STATE_CHANGED.{n}.proxied_call"));
    }
    let checkpoint = g.core.checkpoint();
    assert_eq!(checkpoint.removed, vec![call], "{checkpoint:?}");
}

/// An `E_UA_SESSION` datagram for session `key` (a UAC leg callbus started), as OpenSIPS raises it.
fn ua_event(key: &str, event_type: &str, method: &str, body: &str) -> Bytes {
    let params = json!({
        "key": key, "event_type": event_type, "entity_type": "UAC", "status": 200, "reason": "OK",
        "method": method, "body": body, "headers": format!("Call-ID: {key}\r\nCSeq: 2 {method}\r\n"),
    });
    Bytes::from(json!({"jsonrpc": "2.0", "method": "E_UA_SESSION", "params": params}).to_string())
}

const SDP: &str = "v=0\r\no=uas 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 20320 RTP/AVP 0\r\na=sendrecv\r\n";

/// Sends a UA session event for `key`.
fn ua(g: &mut Given, key: &str, event_type: &str, method: &str, body: &str) {
    let payload = ua_event(key, event_type, method, body);
    g.input(CoreInput::Event { node: "n1".into(), bridge_seq: None, payload });
}

/// Answers every MI request of the last input; a session start gets `key`.
fn answer(g: &mut Given, key: &str) {
    let requests: Vec<(String, String)> = g.last.mi.iter().map(|m| (m.request.clone(), m.command.clone())).collect();
    for (request, command) in requests {
        let result = if command == "ua_session_client_start" { json!(key) } else { json!("Accepted") };
        g.mi_reply(&request, MiBusReply::Result { result });
    }
}

/// A click-to-dial between a (`K.a`) and b (`K.b`) whose callee leg a blind transfer replaced
/// with carol's (`K.c`): the core and the call.
fn transferred() -> (Given, String) {
    let mut g = Given::engine();
    g.command(Verb::CallStart, json!({"cmd_id": "t1", "caller": "sip:a@127.0.0.1", "callee": "sip:b@127.0.0.1"}));
    let call = g.accepted_call();
    answer(&mut g, "K.a");
    ua(&mut g, "K.a", "ANSWERED", "INVITE", SDP);
    answer(&mut g, "K.b");
    ua(&mut g, "K.b", "ANSWERED", "INVITE", SDP);
    answer(&mut g, "");
    ua(&mut g, "K.a", "ANSWERED", "INVITE", SDP);
    answer(&mut g, "");
    assert_eq!(g.core.state(&call).expect("known").name(), "connected");
    let mut keys = g.core.known_keys();
    keys.sort();
    assert_eq!(keys, ["K.a", "K.b"]);
    let transfer = json!({"call_id": call, "leg": "caller", "destination": "sip:carol@127.0.0.1", "cmd_id": "t2"});
    g.command(Verb::CallTransferBlind, transfer);
    answer(&mut g, "K.c");
    ua(&mut g, "K.c", "ANSWERED", "INVITE", SDP);
    answer(&mut g, "");
    ua(&mut g, "K.a", "ANSWERED", "INVITE", SDP);
    answer(&mut g, "");
    let state = g.core.state(&call).expect("known");
    assert!(!state.keys().contains(&"K.b"), "bob's leg is no longer the call's: {:?}", state.keys());
    (g, call)
}

/// Bob's late BYE, the call's end, its retention: then no key of the call is left.
fn end_and_forget(g: &mut Given, call: &str) {
    ua(g, "K.b", "TERMINATED", "BYE", "");
    assert_eq!(g.records().len(), 1, "bob's late event is the call's");
    assert_eq!(g.records()[0].call_id, call);
    g.command(Verb::CallEnd, json!({"call_id": call, "cmd_id": "t3"}));
    answer(g, "");
    ua(g, "K.a", "TERMINATED", "BYE", "");
    ua(g, "K.c", "TERMINATED", "BYE", "");
    assert!(g.core.state(call).expect("known").is_ended(), "{:?}", g.core.state(call).map(|s| s.name()));
    g.wait_ms(61_000);
    assert!(!g.core.knows(call));
    assert_eq!(g.core.known_keys(), Vec::<String>::new(), "every key the call was found by goes with it");
}

#[test]
fn a_leg_a_transfer_replaced_is_forgotten_with_its_call() {
    let (mut g, call) = transferred();
    end_and_forget(&mut g, &call);
}

#[test]
fn a_leg_a_transfer_replaced_is_forgotten_with_its_call_after_a_rebuild_from_the_log() {
    let (g, call) = transferred();
    let tail: Vec<Record> = g.all.records.iter().map(|s| rmp_serde::from_slice(&s.bytes).expect("record")).collect();
    let config = CoreConfig { nodes: vec!["n1".into()], ..CoreConfig::default() };
    let now = g.now.after_ms(1_000);
    let (core, restored) = Core::restore(config, now, g.core.next_seq(), vec![], vec![], tail.into_iter().map(Ok));
    assert_eq!(restored.live, 1);
    let mut back = Given { core, now, all: Outputs::default(), last: Outputs::default() };
    end_and_forget(&mut back, &call);
}

/// Live calls by kind and state, counted from the calls themselves.
fn recount(core: &Core) -> std::collections::HashMap<(&'static str, &'static str), u64> {
    let mut counts = std::collections::HashMap::new();
    for id in core.live_call_ids() {
        let state = core.state(&id).expect("a live call's state");
        *counts.entry((state.kind(), state.name())).or_default() += 1;
    }
    counts
}

#[test]
fn the_live_call_counts_follow_every_step_and_a_rebuilt_core_counts_the_same() {
    let (mut g, bridged) = transferred();
    assert_eq!(g.core.live_counts(), recount(&g.core));
    for n in 1..=3 {
        g.event(&format!("E_DLG_STATE_CHANGED.{n}.proxied_call"));
        assert_eq!(g.core.live_counts(), recount(&g.core), "after event {n}");
    }
    assert_eq!(g.core.live_counts().values().sum::<u64>(), 2);
    assert_eq!(g.core.live_counts().len(), 2, "a bridged call and a dialog: {:?}", g.core.live_counts());

    let tail: Vec<Record> = g.all.records.iter().map(|s| rmp_serde::from_slice(&s.bytes).expect("record")).collect();
    let config = CoreConfig { nodes: vec!["n1".into()], ..CoreConfig::default() };
    let (back, _) = Core::restore(config, g.now, g.core.next_seq(), vec![], vec![], tail.into_iter().map(Ok));
    assert_eq!(back.live_counts(), g.core.live_counts());

    g.event("E_DLG_STATE_CHANGED.4.proxied_call");
    assert_eq!(g.core.live_counts(), recount(&g.core));
    assert_eq!(g.core.live_counts().values().sum::<u64>(), 1, "the dialog ended");
    end_and_forget(&mut g, &bridged);
    assert!(g.core.live_counts().is_empty(), "{:?}", g.core.live_counts());
}

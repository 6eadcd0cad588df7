//! The `Ua` machine (a UA client session), given a state and an input, with the real
//! OpenSIPS 3.4.18 datagrams from `fixtures/opensips-3.4/events/`.

use std::path::PathBuf;

use callbus_engine::machines::{CallState, Ctx, Effect, Input, Timeouts, UaState};
use callbus_schemas::bus::MiBusReply;
use callbus_schemas::command::CommandRequest;
use callbus_schemas::subjects::Verb;
use serde_json::json;

fn fixture(name: &str) -> Input {
    let dir = std::env::var_os("CALLBUS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/opensips-3.4"));
    let datagram = std::fs::read_to_string(dir.join("events").join(format!("{name}.json"))).expect("fixture");
    Input::Event { node: "n1".into(), bridge_seq: None, datagram }
}

/// The session key of the captured `ua_client_*` scenarios.
const KEY: &str = "B2B.34.7688516.1795417967.294181658";

struct Run {
    state: CallState,
    seq: u64,
    notifications: Vec<(String, Option<String>)>,
    effects: Vec<Effect>,
}

impl Run {
    /// A UA client session, started and answered (events `ua_client_start`).
    fn answered() -> Run {
        let mut run =
            Run { state: CallState::Ua(UaState::client("n1")), seq: 0, notifications: vec![], effects: vec![] };
        let body = json!({"to": "sip:uas@127.0.0.1:5080", "from": "sip:alice@127.0.0.1", "body": "v=0\r\n"});
        let start = run.command(Verb::UaStart, "s1", body);
        run.mi_reply(&start, MiBusReply::Result { result: json!(KEY) });
        run.feed(fixture("E_UA_SESSION.1.ua_client_start"));
        run.feed(fixture("E_UA_SESSION.2.ua_client_start"));
        assert_eq!(run.events(), ["starting", "calling", "early", "answered", "command_succeeded"]);
        run.notifications.clear();
        run.effects.clear();
        run
    }

    fn feed(&mut self, input: Input) -> Vec<Effect> {
        self.seq += 1;
        let ctx = Ctx { call_id: "c1", seq: self.seq, now_ms: 1000 * self.seq, timeouts: Timeouts::default() };
        let (next, effects) = self.state.step(&input, &ctx);
        assert_eq!(self.state.step(&input, &ctx), (next.clone(), effects.clone()), "deterministic");
        // The engine hands the machine the event it parsed already: the same answer.
        if let Input::Event { datagram, .. } = &input {
            let parsed = callbus_schemas::event::Event::parse(datagram.as_bytes()).ok();
            let again = self.state.step_parsed(&input, parsed.as_ref(), &ctx);
            assert_eq!(again, (next.clone(), effects.clone()), "parsed once");
        }
        self.state = next;
        for e in &effects {
            if let Effect::Notify { event, cmd_id, data } = e {
                callbus_schemas::catalog::check_notification(self.state.kind(), event, data)
                    .unwrap_or_else(|e| panic!("{e}"));
                self.notifications.push((event.clone(), cmd_id.clone()));
            }
        }
        self.effects.extend(effects.clone());
        effects
    }

    fn command(&mut self, verb: Verb, cmd_id: &str, body: serde_json::Value) -> Vec<Effect> {
        let command = CommandRequest::parse(verb, body.to_string().as_bytes()).expect("a valid command").command;
        self.feed(Input::Command { cmd_id: cmd_id.into(), command })
    }

    /// Answers the MI request among `effects`.
    fn mi_reply(&mut self, effects: &[Effect], reply: MiBusReply) -> Vec<Effect> {
        let request = effects
            .iter()
            .find_map(|e| match e {
                Effect::Mi { request, .. } => Some(request.clone()),
                _ => None,
            })
            .expect("an MI request");
        self.feed(Input::MiReply { request, reply })
    }

    fn events(&self) -> Vec<&str> {
        self.notifications.iter().map(|(e, _)| e.as_str()).collect()
    }

    fn timers_started(&self) -> Vec<&str> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::StartTimer { name, .. } => Some(name.as_ref()),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn our_reinvite_answered_after_the_mi_reply_succeeds() {
    let mut run = Run::answered();
    let sent = run.command(Verb::UaUpdate, "u1", json!({"key": KEY, "method": "INVITE", "body": "v=0\r\n"}));
    run.mi_reply(&sent, MiBusReply::Result { result: json!("OK") });
    assert_eq!(run.timers_started(), ["txn.INVITE"]);
    run.feed(fixture("E_UA_SESSION.1.ua_client_reinvite"));
    assert_eq!(run.events(), ["update_sent", "update_answered", "command_succeeded"]);
    assert!(run.notifications.iter().all(|(_, cmd)| cmd.as_deref() == Some("u1")));
}

#[test]
fn our_reinvite_answered_before_the_mi_reply_succeeds_and_the_reply_changes_nothing() {
    // Seen on a real OpenSIPS 3.4.18: the phone answered in 0.07 ms and OpenSIPS raised the
    // 200's ANSWERED before it answered `ua_session_update`.
    let mut run = Run::answered();
    let sent = run.command(Verb::UaUpdate, "u1", json!({"key": KEY, "method": "INVITE", "body": "v=0\r\n"}));
    run.feed(fixture("E_UA_SESSION.1.ua_client_reinvite"));
    assert_eq!(run.events(), ["update_sent", "update_answered", "command_succeeded"]);
    let late = run.mi_reply(&sent, MiBusReply::Result { result: json!("OK") });
    assert!(late.is_empty(), "the late MI reply settles nothing more: {late:?}");
    assert!(run.timers_started().is_empty(), "no transaction timer left to fire");
    // Another re-INVITE may go at once.
    let again = run.command(Verb::UaUpdate, "u2", json!({"key": KEY, "method": "INVITE", "body": "v=0\r\n"}));
    assert!(
        again.iter().any(|e| matches!(e, Effect::Mi { command, .. } if command == "ua_session_update")),
        "{again:?}"
    );
}

/// The session key of the captured `ua_server_call` scenario.
const SERVER_KEY: &str = "B2B.509.162.1795417975.860926370";

impl Run {
    /// A UA server session offered by OpenSIPS (event 1 of `ua_server_call`), then answered 200
    /// by the app; returns the `ua_session_reply` request's effects.
    fn offered_and_answering() -> (Run, Vec<Effect>) {
        let mut run = Run {
            state: CallState::Ua(UaState::server("n1", SERVER_KEY)),
            seq: 0,
            notifications: vec![],
            effects: vec![],
        };
        run.feed(fixture("E_UA_SESSION.1.ua_server_call"));
        assert_eq!(run.events(), ["incoming"]);
        let sent = run.command(Verb::UaAnswer, "a1", json!({"key": SERVER_KEY, "code": 200, "body": "v=0\r\n"}));
        assert!(
            sent.iter().any(|e| matches!(e, Effect::Mi { command, .. } if command == "ua_session_reply")),
            "{sent:?}"
        );
        run.notifications.clear();
        run.effects.clear();
        (run, sent)
    }

    fn state_name(&self) -> &'static str {
        match &self.state {
            CallState::Ua(ua) => ua.state_name(),
            other => panic!("not a UA session: {other:?}"),
        }
    }
}

#[test]
fn our_answer_then_the_callers_ack_confirms() {
    let (mut run, sent) = Run::offered_and_answering();
    run.mi_reply(&sent, MiBusReply::Result { result: json!("OK") });
    run.feed(fixture("E_UA_SESSION.2.ua_server_call"));
    assert_eq!(run.events(), ["answered", "command_succeeded", "confirmed"]);
    assert_eq!(run.state_name(), "confirmed");
}

#[test]
fn the_callers_ack_before_the_mi_reply_confirms_and_the_reply_changes_nothing() {
    // Seen on a real OpenSIPS 3.4.18 (the tier's "UA server answered"): sipp acknowledged the
    // 200 at once and OpenSIPS raised the ACK's UPDATED before it answered `ua_session_reply`.
    let (mut run, sent) = Run::offered_and_answering();
    run.feed(fixture("E_UA_SESSION.2.ua_server_call"));
    assert_eq!(run.events(), ["answered", "command_succeeded", "confirmed"]);
    assert!(run.notifications[..2].iter().all(|(_, cmd)| cmd.as_deref() == Some("a1")), "{:?}", run.notifications);
    assert_eq!(run.state_name(), "confirmed");
    let late = run.mi_reply(&sent, MiBusReply::Result { result: json!("OK") });
    assert!(late.is_empty(), "the late MI reply settles nothing more: {late:?}");
    assert_eq!(run.state_name(), "confirmed");
    // The caller's BYE still ends it.
    run.feed(fixture("E_UA_SESSION.3.ua_server_call"));
    assert_eq!(run.state_name(), "ended");
}

#[test]
fn an_ack_with_no_answer_of_ours_waiting_is_only_reported() {
    // A 4xx answer waits for its MI reply: an ACK does not make it an answered call.
    let mut run =
        Run { state: CallState::Ua(UaState::server("n1", SERVER_KEY)), seq: 0, notifications: vec![], effects: vec![] };
    run.feed(fixture("E_UA_SESSION.1.ua_server_call"));
    run.command(Verb::UaAnswer, "a1", json!({"key": SERVER_KEY, "code": 486}));
    run.notifications.clear();
    run.feed(fixture("E_UA_SESSION.2.ua_server_call"));
    assert_eq!(run.events(), ["ack"]);
    assert_eq!(run.state_name(), "offered");
}

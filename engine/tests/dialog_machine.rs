//! The `Dialog` machine, given a state and an input, read like docs/opensips.md's tables. Inputs are
//! the real OpenSIPS datagrams from `fixtures/opensips-3.4/events/`.

use std::path::PathBuf;

use callbus_engine::machines::dialog::{LegHold, Phase, Transfer};
use callbus_engine::machines::{CallState, Ctx, DialogState, Effect, Input, Timeouts};
use callbus_schemas::bus::MiBusReply;
use callbus_schemas::command::{CallTarget, Command, CommandErrorCode, LegName};
use callbus_schemas::mi::MiError;
use serde_json::json;

fn fixture(name: &str) -> Input {
    let dir = std::env::var_os("CALLBUS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/opensips-3.4"));
    let datagram = std::fs::read_to_string(dir.join("events").join(format!("{name}.json"))).expect("fixture");
    Input::Event { node: "n1".into(), bridge_seq: None, datagram }
}

struct Run {
    state: CallState,
    seq: u64,
    notifications: Vec<(String, Option<String>)>,
    effects: Vec<Effect>,
}

impl Run {
    fn new() -> Run {
        Run {
            state: CallState::Dialog(DialogState::new("n1", "1-18535@127.0.0.1")),
            seq: 0,
            notifications: vec![],
            effects: vec![],
        }
    }

    fn confirmed() -> Run {
        let mut run = Run::new();
        for n in 1..=3 {
            run.feed(fixture(&format!("E_DLG_STATE_CHANGED.{n}.proxied_call")));
        }
        run.notifications.clear();
        run.effects.clear();
        run
    }

    fn feed(&mut self, input: Input) -> Vec<Effect> {
        self.seq += 1;
        let ctx = Ctx { call_id: "c1", seq: self.seq, now_ms: 1000 * self.seq, timeouts: Timeouts::default() };
        let (next, effects) = self.state.step(&input, &ctx);
        // Determinism: the same step again gives the same answer.
        assert_eq!(self.state.step(&input, &ctx), (next.clone(), effects.clone()));
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

    fn dialog(&self) -> &DialogState {
        match &self.state {
            CallState::Dialog(d) => d,
            other => panic!("not a proxied call: {other:?}"),
        }
    }

    fn events(&self) -> Vec<&str> {
        self.notifications.iter().map(|(e, _)| e.as_str()).collect()
    }

    fn command(&mut self, cmd_id: &str, command: Command) -> Vec<Effect> {
        self.feed(Input::Command { cmd_id: cmd_id.into(), command })
    }

    fn mi_request(effects: &[Effect]) -> (String, String, serde_json::Value) {
        effects
            .iter()
            .find_map(|e| match e {
                Effect::Mi { request, command, params, .. } => Some((request.clone(), command.clone(), params.clone())),
                _ => None,
            })
            .expect("an MI request")
    }
}

fn ok(result: serde_json::Value) -> MiBusReply {
    MiBusReply::Result { result }
}

fn err(code: i64, message: &str) -> MiBusReply {
    MiBusReply::Error { error: MiError { code, message: message.into(), data: None } }
}

fn target() -> CallTarget {
    CallTarget::SipCallId("1-18535@127.0.0.1".into())
}

#[test]
fn answered_then_bye() {
    let mut run = Run::new();
    for n in 1..=4 {
        run.feed(fixture(&format!("E_DLG_STATE_CHANGED.{n}.proxied_call")));
    }
    assert_eq!(run.events(), ["early", "answered", "confirmed", "ended"]);
    assert_eq!((run.dialog().phase, run.dialog().end_reason.as_deref()), (Phase::Ended, Some("hung_up")));
    assert_eq!(run.dialog().dialog_id.as_deref(), Some("ed8.f137d1f"));
}

#[test]
fn rejected_and_unanswered_calls_end_with_their_reason() {
    let mut run = Run::new();
    run.feed(fixture("E_DLG_STATE_CHANGED.1.rejected_call"));
    run.feed(fixture("E_DLG_STATE_CHANGED.2.rejected_call"));
    assert_eq!(run.dialog().end_reason.as_deref(), Some("not_answered"));
    let mut run = Run::new();
    run.feed(fixture("E_DLG_STATE_CHANGED.1.unanswered_no_uas"));
    assert_eq!(run.dialog().end_reason.as_deref(), Some("no_answer"));
}

#[test]
fn late_events_never_move_the_call_backwards() {
    let mut run = Run::new();
    run.feed(fixture("E_DLG_STATE_CHANGED.3.proxied_call"));
    run.feed(fixture("E_DLG_STATE_CHANGED.1.proxied_call"));
    run.feed(fixture("E_DLG_STATE_CHANGED.2.proxied_call"));
    assert_eq!(run.dialog().phase, Phase::Confirmed);
    assert_eq!(run.events(), ["confirmed"]);
}

#[test]
fn hold_completes_when_both_legs_report_ok() {
    let mut run = Run::confirmed();
    let effects = run.command("h1", Command::Hold { target: target() });
    let (request, command, params) = Run::mi_request(&effects);
    assert_eq!((command.as_str(), params), ("call_hold", json!({"callid": "1-18535@127.0.0.1"})));
    assert!(effects.iter().any(|e| matches!(e, Effect::StartTimer { name, .. } if name == "hold")));
    run.feed(fixture("E_CALL_HOLD.1.call_hold"));
    run.feed(fixture("E_CALL_HOLD.2.call_hold"));
    run.feed(Input::MiReply { request, reply: ok(json!("OK")) });
    run.feed(fixture("E_CALL_HOLD.3.call_hold"));
    assert!(!run.events().contains(&"command_succeeded"), "not done while a leg is still holding");
    run.feed(fixture("E_CALL_HOLD.4.call_hold"));
    assert_eq!(run.events().iter().filter(|e| **e == "command_succeeded").count(), 1);
    assert_eq!((run.dialog().caller, run.dialog().callee), (LegHold::Held, LegHold::Held));
    assert!(
        run.notifications.iter().all(|(_, cmd)| cmd.as_deref() == Some("h1")),
        "every hold notification carries the cmd_id"
    );
    let refused = run.state.check(&Command::Hold { target: target() }).expect_err("already held");
    assert_eq!((refused.code, refused.state.as_deref()), (CommandErrorCode::WrongState, Some("confirmed")));
}

#[test]
fn hold_events_before_the_mi_reply_complete_on_the_reply() {
    let mut run = Run::confirmed();
    let (request, ..) = Run::mi_request(&run.command("h1", Command::Hold { target: target() }));
    for n in 1..=4 {
        run.feed(fixture(&format!("E_CALL_HOLD.{n}.call_hold")));
    }
    assert!(!run.events().contains(&"command_succeeded"));
    run.feed(Input::MiReply { request, reply: ok(json!("OK")) });
    assert!(run.events().contains(&"command_succeeded"));
}

/// A call held on both legs, its hold completed; notifications cleared.
fn held() -> Run {
    let mut run = Run::confirmed();
    let (request, ..) = Run::mi_request(&run.command("h1", Command::Hold { target: target() }));
    for n in 1..=4 {
        run.feed(fixture(&format!("E_CALL_HOLD.{n}.call_hold")));
    }
    run.feed(Input::MiReply { request, reply: ok(json!("OK")) });
    assert!(run.events().contains(&"command_succeeded"));
    run.notifications.clear();
    run
}

#[test]
fn an_unhold_reply_that_overtakes_a_legs_start_waits_for_that_leg() {
    // Seen on a real OpenSIPS 3.4.18: the MI reply arrived after the callee's start and ok but
    // before the caller's start, which OpenSIPS had raised before replying.
    let mut run = held();
    let (request, ..) = Run::mi_request(&run.command("u1", Command::Unhold { target: target() }));
    run.feed(fixture("E_CALL_HOLD.1.call_unhold")); // callee start
    run.feed(fixture("E_CALL_HOLD.3.call_unhold")); // callee ok
    let reply = run.feed(Input::MiReply { request, reply: ok(json!("OK")) });
    assert!(reply.iter().any(|e| matches!(e, Effect::StartTimer { name, .. } if name == "hold.settle")));
    assert!(!run.events().contains(&"command_succeeded"), "the caller is still held: {:?}", run.events());
    run.feed(fixture("E_CALL_HOLD.2.call_unhold")); // caller start
    assert!(!run.events().contains(&"command_succeeded"));
    run.feed(fixture("E_CALL_HOLD.4.call_unhold")); // caller ok
    assert_eq!(run.events().iter().filter(|e| **e == "command_succeeded").count(), 1);
    assert_eq!((run.dialog().caller, run.dialog().callee), (LegHold::Resumed, LegHold::Resumed));
    // The settle timer firing afterwards changes nothing.
    let late = run.feed(Input::Timer { name: "hold.settle".into() });
    assert!(late.is_empty(), "{late:?}");
}

#[test]
fn a_leg_callops_skips_is_settled_by_the_settle_timer() {
    // callops raises nothing for a leg it does not re-INVITE: after the settle window the
    // command succeeds with what the other leg reported.
    let mut run = held();
    let (request, ..) = Run::mi_request(&run.command("u1", Command::Unhold { target: target() }));
    run.feed(Input::MiReply { request, reply: ok(json!("OK")) });
    run.feed(fixture("E_CALL_HOLD.1.call_unhold"));
    run.feed(fixture("E_CALL_HOLD.3.call_unhold"));
    assert!(!run.events().contains(&"command_succeeded"));
    run.feed(Input::Timer { name: "hold.settle".into() });
    assert_eq!(run.events().iter().filter(|e| **e == "command_succeeded").count(), 1);
    assert_eq!((run.dialog().caller, run.dialog().callee), (LegHold::Held, LegHold::Resumed));
}

#[test]
fn a_leg_that_refuses_the_reinvite_fails_the_hold_but_can_be_unheld() {
    let mut run = Run::confirmed();
    let (request, ..) = Run::mi_request(&run.command("h1", Command::Hold { target: target() }));
    run.feed(Input::MiReply { request, reply: ok(json!("OK")) });
    for n in 1..=4 {
        run.feed(fixture(&format!("E_CALL_HOLD.{n}.callops_fail_sequence")));
    }
    assert_eq!(run.dialog().callee, LegHold::HoldFailed);
    assert!(run.effects.iter().any(|e| matches!(e, Effect::Notify { event, data, .. } if event == "command_failed" && data["reason"].as_str().is_some_and(|r| r.contains("callee")))));
    let effects = run.command("u1", Command::Unhold { target: target() });
    assert_eq!(Run::mi_request(&effects).1, "call_unhold");
}

#[test]
fn hold_refused_by_opensips_fails_the_command_and_changes_nothing() {
    let mut run = Run::confirmed();
    let (request, ..) = Run::mi_request(&run.command("h1", Command::Hold { target: target() }));
    run.feed(Input::MiReply { request, reply: err(410, "Dialog not ready") });
    assert_eq!(run.events(), ["command_failed"]);
    assert_eq!((run.dialog().caller, run.dialog().hold_op.is_none()), (LegHold::Resumed, true));
}

#[test]
fn commands_are_refused_in_the_wrong_state_with_the_state_named() {
    let mut run = Run::new();
    run.feed(fixture("E_DLG_STATE_CHANGED.1.proxied_call"));
    let e = run.state.check(&Command::Hold { target: target() }).expect_err("early");
    assert_eq!(e.state.as_deref(), Some("early"));
    assert!(e.message.contains("early"));
    assert!(run.state.check(&Command::Unhold { target: target() }).is_err());
    assert!(run.state.check(&Command::End { target: target() }).is_ok(), "an early call can be cancelled");
}

#[test]
fn blind_transfer_with_the_3_4_leg_quirk() {
    let mut run = Run::confirmed();
    let cmd = Command::TransferBlind {
        target: target(),
        leg: LegName::Callee,
        destination: "sip:transfer@127.0.0.1:5060".into(),
    };
    let (request, command, params) = Run::mi_request(&run.command("t1", cmd.clone()));
    assert_eq!(command, "call_transfer");
    assert_eq!(params["leg"], json!("callee"));
    run.feed(Input::MiReply { request, reply: ok(json!("Accepted")) });
    assert!(matches!(run.dialog().transfer, Transfer::ReferSent { .. }));
    for n in 1..=3 {
        run.feed(fixture(&format!("E_CALL_TRANSFER.{n}.call_transfer_blind")));
    }
    assert!(matches!(&run.dialog().transfer, Transfer::Done { new_call } if new_call == "1-18539@127.0.0.1"));
    assert_eq!(
        run.events(),
        ["transfer_requested", "transfer_started", "transferred", "command_succeeded", "transfer_progress"]
    );
    // The transferor's side is then ended by the engine.
    let ends: Vec<_> =
        run.effects.iter().filter(|e| matches!(e, Effect::Mi { command, .. } if command == "dlg_end_dlg")).collect();
    assert_eq!(ends.len(), 1);
    run.feed(fixture("E_DLG_STATE_CHANGED.1.callops_cleanup"));
    assert_eq!(run.dialog().end_reason.as_deref(), Some("transferred"));
    // One attempt per call.
    let mut again = Run::confirmed();
    again.state = CallState::Dialog(DialogState { transfer: run.dialog().transfer.clone(), ..again.dialog().clone() });
    assert_eq!(again.state.check(&cmd).expect_err("491 for ever").code, CommandErrorCode::WrongState);
}

#[test]
fn a_declined_refer_times_out_as_failed() {
    let mut run = Run::confirmed();
    let cmd = Command::TransferBlind { target: target(), leg: LegName::Callee, destination: "sip:x@y".into() };
    let (request, ..) = Run::mi_request(&run.command("t1", cmd));
    let effects = run.feed(Input::MiReply { request, reply: ok(json!("Accepted")) });
    assert!(effects.iter().any(|e| matches!(e, Effect::StartTimer { name, after_ms: 32_000 } if name == "transfer")));
    run.feed(Input::Timer { name: "transfer".into() });
    assert!(matches!(&run.dialog().transfer, Transfer::Failed { reason } if reason.contains("declined or lost")));
    assert!(run.events().contains(&"command_failed"));
}

#[test]
fn transfer_answered_491_is_reported_failed_not_pending() {
    let mut run = Run::confirmed();
    let cmd = Command::TransferBlind { target: target(), leg: LegName::Callee, destination: "sip:x@y".into() };
    let (request, ..) = Run::mi_request(&run.command("t1", cmd));
    run.feed(Input::MiReply { request, reply: err(491, "Request Pending") });
    assert!(matches!(&run.dialog().transfer, Transfer::Failed { reason } if reason.contains("491")));
    assert_eq!(run.events(), ["transfer_failed", "command_failed"]);
}

#[test]
fn end_by_command_and_a_dialog_opensips_no_longer_has() {
    let mut run = Run::confirmed();
    let (request, command, _) = Run::mi_request(&run.command("e1", Command::End { target: target() }));
    assert_eq!(command, "dlg_end_dlg");
    assert_eq!(run.state.name(), "ending");
    run.feed(Input::MiReply { request, reply: ok(json!("OK")) });
    run.feed(fixture("E_DLG_STATE_CHANGED.4.proxied_call"));
    assert_eq!(run.dialog().end_reason.as_deref(), Some("ended_by_command"));
    assert_eq!(run.notifications.last(), Some(&("command_succeeded".to_owned(), Some("e1".to_owned()))));

    let mut run = Run::confirmed();
    let (request, ..) = Run::mi_request(&run.command("e2", Command::End { target: target() }));
    run.feed(Input::MiReply { request, reply: err(404, "Requested Dialog not found") });
    assert_eq!(run.dialog().end_reason.as_deref(), Some("gone"));
}

#[test]
fn reconciliation_closes_calls_that_ended_while_away() {
    let mut run = Run::confirmed();
    run.feed(Input::Reconcile { opensips_state: Some(4) });
    assert_eq!(run.dialog().phase, Phase::Confirmed);
    run.feed(Input::Reconcile { opensips_state: None });
    assert_eq!(run.dialog().end_reason.as_deref(), Some("ended_while_engine_away"));
}

#[test]
fn ending_a_call_fails_what_was_pending_on_it() {
    let mut run = Run::confirmed();
    run.command("h1", Command::Hold { target: target() });
    run.feed(fixture("E_DLG_STATE_CHANGED.4.proxied_call"));
    assert!(run.notifications.contains(&("command_failed".to_owned(), Some("h1".to_owned()))));
    assert!(run.dialog().hold_op.is_none());
}

//! Random interleavings of valid and invalid inputs never panic the machines, and re-running
//! every logged step through a [`Replayer`] gives the same state and effects as the live run.
//!
//! Inputs are drawn from the real fixture datagrams, malformed datagrams, every command, MI
//! replies (to requests the machine made and to made-up ones), timers and reconciliations. The
//! generator is seeded: a failure prints the seed, and `PROPERTY_SEED=<n>` replays it;
//! `PROPERTY_CASES` raises the number of cases for a long run.

use std::path::PathBuf;

use callbus_engine::log::{Record, RECORD_FORMAT};
use callbus_engine::machines::{BridgedState, CallState, Ctx, DialogState, Effect, Input, Timeouts, UaState};
use callbus_replay::Replayer;
use callbus_schemas::bus::MiBusReply;
use callbus_schemas::command::{Body, CallTarget, Command, Header, LegName, Payload};
use callbus_schemas::mi::MiError;
use serde_json::json;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The captured event datagrams whose file name does (`ua`) or does not start with E_UA_SESSION.
fn fixture_events(ua: bool) -> Vec<String> {
    let dir = std::env::var_os("CALLBUS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/opensips-3.4"))
        .join("events");
    std::fs::read_dir(&dir)
        .expect("fixtures")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("E_UA_SESSION") == ua)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect()
}

fn datagrams() -> Vec<String> {
    let mut out = fixture_events(false);
    out.sort();
    // Malformed and hostile ones.
    out.push("{not json".into());
    out.push(r#"{"jsonrpc":"2.0","method":"E_CALL_HOLD","params":{"callid":"x","leg":"both","action":"action","state":"state"}}"#.into());
    out.push(r#"{"jsonrpc":"2.0","method":"E_DLG_STATE_CHANGED","params":{"id":"1.1","db_id":"1","callid":"x","from_tag":"f","to_tag":null,"old_state":5,"new_state":3}}"#.into());
    out.push(r#"{"jsonrpc":"2.0","method":"E_DLG_STATE_CHANGED","params":{"id":"1.1","db_id":"1","callid":"x","from_tag":"f","to_tag":"t","old_state":9,"new_state":77}}"#.into());
    out.push(r#"{"jsonrpc":"2.0","method":"E_CALL_TRANSFER","params":{"callid":"x","leg":"","transfer_callid":"n","destination":"","state":"fail","status":"486 Busy Here"}}"#.into());
    out.push(String::new());
    out
}

fn command(rng: &mut Rng) -> Command {
    let target = CallTarget::SipCallId("1-18535@127.0.0.1".into());
    let leg = if rng.below(2) == 0 { LegName::Caller } else { LegName::Callee };
    match rng.below(6) {
        0 => Command::End { target },
        1 => Command::Hold { target },
        2 => Command::Unhold { target },
        3 => Command::TransferBlind { target, leg, destination: "sip:t@127.0.0.1".into() },
        4 => Command::TransferAttended {
            target,
            leg,
            transfer_target: CallTarget::SipCallId("1-22704@127.0.0.1".into()),
            transfer_leg: LegName::Callee,
        },
        _ => Command::TransferAttended {
            target,
            leg,
            transfer_target: CallTarget::CallId("not-resolved".into()),
            transfer_leg: LegName::Caller,
        },
    }
}

fn mi_reply(rng: &mut Rng) -> MiBusReply {
    let error =
        |code: i64, message: &str| MiBusReply::Error { error: MiError { code, message: message.into(), data: None } };
    match rng.below(8) {
        0 | 1 => MiBusReply::Result { result: json!("OK") },
        2 => MiBusReply::Result { result: json!("Accepted") },
        3 => error(480, "Both dialog legs are on hold"),
        4 => error(404, "Dialog not found"),
        5 => error(491, "Request Pending"),
        6 => error(-33001, "OpenSIPS did not answer in time"),
        _ => MiBusReply::Result { result: json!({"unexpected": [1, 2]}) },
    }
}

/// Runs `cases` random cases from `fresh()`, drawing each input with `draw`, and checks that
/// no step panics and that every logged step replays to the same state and effects.
fn check_cases(
    name: &str,
    cases: usize,
    fresh: impl Fn() -> CallState,
    mut draw: impl FnMut(&mut Rng, u64, &[String], &CallState) -> Input,
) {
    let seed: u64 = std::env::var("PROPERTY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_ca11);
    let mut rng = Rng(seed);
    let timeouts = Timeouts::default();
    let mut steps = 0usize;
    for case in 0..cases {
        let case_seed = rng.next();
        let mut r = Rng(case_seed | 1);
        let mut state = fresh();
        let mut first = true;
        let mut requests: Vec<String> = Vec::new();
        let mut records = Vec::new();
        for seq in 1..=(10 + r.below(60)) as u64 {
            let input = draw(&mut r, seq, &requests, &state);
            let ctx = Ctx { call_id: "c1", seq, now_ms: 1_000 * seq, timeouts };
            let outcome = std::panic::catch_unwind(|| state.step(&input, &ctx));
            let (after, effects) = outcome
                .unwrap_or_else(|_| panic!("{name}: panic in case {case} (seed {case_seed}) at step {seq}: {input:?}"));
            for e in &effects {
                match e {
                    Effect::Mi { request, .. } => requests.push(request.clone()),
                    // Whatever the interleaving, only what docs/subjects.md lists is sent.
                    Effect::Notify { event, data, .. } => {
                        callbus_schemas::catalog::check_notification(after.kind(), event, data)
                            .unwrap_or_else(|e| panic!("{name} case {case} (seed {case_seed}) step {seq}: {e}"));
                    }
                    _ => {}
                }
            }
            records.push(Record {
                format: RECORD_FORMAT,
                seq,
                time_ms: ctx.now_ms,
                call_id: "c1".into(),
                partition: 0,
                input,
                before: if first { None } else { Some(state.name().into()) },
                after: after.clone(),
                effects,
            });
            first = false;
            state = after;
            steps += 1;
        }
        let mut replayer = Replayer::new(timeouts);
        for record in &records {
            // Through the log's encoding, as a replay would read it.
            let bytes = rmp_serde::to_vec_named(record).expect("encode");
            let decoded: Record = rmp_serde::from_slice(&bytes).expect("decode");
            assert_eq!(&decoded, record, "{name} case {case}: the record does not survive its encoding");
            let (after, effects) = replayer.recheck(&decoded);
            assert_eq!(
                (&after, &effects),
                (&record.after, &record.effects),
                "{name} case {case} (seed {case_seed}) diverges at {}",
                record.seq
            );
        }
    }
    println!("{name}: {cases} cases, {steps} steps");
}

fn cases() -> usize {
    std::env::var("PROPERTY_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(1_500)
}

fn pick_request(r: &mut Rng, requests: &[String]) -> String {
    if !requests.is_empty() && r.below(4) > 0 {
        requests[r.below(requests.len())].clone()
    } else {
        format!("c1-{}-0", r.below(100))
    }
}

#[test]
fn random_interleavings_never_panic_and_replay_exactly() {
    let datagrams = datagrams();
    let fresh = || CallState::Dialog(DialogState::new("n1", "1-18535@127.0.0.1"));
    check_cases("dialog", cases(), fresh, |r, seq, requests, _| match r.below(10) {
        0..=3 => {
            Input::Event { node: "n1".into(), bridge_seq: None, datagram: datagrams[r.below(datagrams.len())].clone() }
        }
        4 | 5 => Input::Command { cmd_id: format!("k{seq}"), command: command(r) },
        6 | 7 => Input::MiReply { request: pick_request(r, requests), reply: mi_reply(r) },
        8 => Input::Timer { name: ["hold", "transfer", "end", "bogus"][r.below(4)].into() },
        _ => Input::Reconcile {
            opensips_state: [None, Some(1), Some(2), Some(3), Some(4), Some(5), Some(42)][r.below(7)],
        },
    });
}

/// The UA fixture datagrams, with their key replaced by `{KEY}`.
fn ua_datagrams() -> Vec<String> {
    let mut out: Vec<String> = fixture_events(true)
        .into_iter()
        .filter_map(|d| {
            let v: serde_json::Value = serde_json::from_str(&d).ok()?;
            let key = v["params"]["key"].as_str()?.to_owned();
            Some(d.replace(&key, "{KEY}"))
        })
        .collect();
    out.sort();
    out.push(r#"{"jsonrpc":"2.0","method":"E_UA_SESSION","params":{"key":"{KEY}","event_type":"SHINY","entity_type":"UAC","status":0,"reason":null,"method":"INVITE","body":null,"headers":null}}"#.into());
    out.push(r#"{"jsonrpc":"2.0","method":"E_UA_SESSION","params":{"key":"{KEY}","event_type":"ANSWERED","entity_type":"UAC","status":200,"reason":"OK","method":"INVITE","body":"not sdp","headers":null}}"#.into());
    out.push("{not json".into());
    out
}

fn ua_command(r: &mut Rng) -> Command {
    let target = CallTarget::CallId("c1".into());
    let payload = if r.below(2) == 0 {
        Payload::default()
    } else {
        Payload {
            body: Some(Body { content_type: "application/sdp".into(), text: "v=0\r\nm=audio 1 RTP/AVP 0\r\n".into() }),
            headers: vec![Header { name: "X-A".into(), value: "1".into() }],
        }
    };
    let method = ["INVITE", "INFO", "ACK", "UPDATE", "OPTIONS"][r.below(5)].to_owned();
    match r.below(10) {
        0 => Command::UaStart {
            to: "sip:b@h".into(),
            from: "sip:a@h".into(),
            ruri: None,
            proxy: None,
            payload,
            manual_ack: r.below(2) == 0,
            max_duration_s: Some(60),
            node: None,
        },
        1 => Command::Start {
            caller: "sip:a@h".into(),
            callee: "sip:b@h".into(),
            from: None,
            node: None,
            max_duration_s: None,
        },
        2 | 3 => Command::UaAnswer {
            target,
            code: [180, 200, 486, 100][r.below(4)],
            reason: "R".into(),
            method: (r.below(2) == 0).then_some(method),
            payload,
        },
        4 => Command::UaUpdate { target, method, payload },
        5 => Command::UaTerminate { target },
        6 => Command::End { target },
        7 => Command::Hold { target },
        8 => Command::Unhold { target },
        _ => Command::TransferBlind { target, leg: LegName::Caller, destination: "sip:c@h".into() },
    }
}

/// UA sessions and click-to-dial calls: events carry one of the call's keys (or a stranger's).
fn ua_draw(datagrams: &[String]) -> impl FnMut(&mut Rng, u64, &[String], &CallState) -> Input + '_ {
    move |r, seq, requests, state| match r.below(10) {
        0..=3 => {
            let keys = state.keys();
            let key = if keys.is_empty() || r.below(5) == 0 {
                "B2B.9.9.9.9".to_owned()
            } else {
                keys[r.below(keys.len())].to_owned()
            };
            Input::Event {
                node: "n1".into(),
                bridge_seq: None,
                datagram: datagrams[r.below(datagrams.len())].replace("{KEY}", &key),
            }
        }
        4 | 5 => Input::Command { cmd_id: format!("k{seq}"), command: ua_command(r) },
        6 | 7 => {
            let reply = if r.below(3) == 0 {
                MiBusReply::Result { result: json!(format!("B2B.1.{seq}.3.4")) }
            } else {
                mi_reply(r)
            };
            Input::MiReply { request: pick_request(r, requests), reply }
        }
        8 => Input::Timer {
            name: [
                "ring",
                "offer",
                "ack",
                "max",
                "reply.INFO",
                "txn.INVITE",
                "ring.caller",
                "ring.callee",
                "ring.transfer_target",
                "reinvite.caller",
                "reinvite.callee",
                "bogus",
            ][r.below(12)]
            .into(),
        },
        _ => Input::Reconcile { opensips_state: [None, Some(0)][r.below(2)] },
    }
}

#[test]
fn ua_and_click_to_dial_machines_never_panic_and_replay_exactly() {
    let datagrams = ua_datagrams();
    check_cases("ua client", cases() / 3, || CallState::Ua(UaState::client("n1")), ua_draw(&datagrams));
    check_cases("ua server", cases() / 3, || CallState::Ua(UaState::server("n1", "B2B.5.5.5.5")), ua_draw(&datagrams));
    check_cases("bridged", cases() / 3, || CallState::Bridged(Box::new(BridgedState::new("n1"))), ua_draw(&datagrams));
}

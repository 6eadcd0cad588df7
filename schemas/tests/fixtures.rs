//! Every real OpenSIPS 3.4.18 datagram under `fixtures/opensips-3.4/` is classified by our
//! types with zero failures, and every JSON one round-trips through them without losing a field.

use std::collections::BTreeMap;
use std::path::PathBuf;

use callbus_schemas::event::{Event, E_CALL_HOLD, E_CALL_TRANSFER, E_DLG_STATE_CHANGED, E_UA_SESSION};
use callbus_schemas::mi::{MiPlainText, MiReply, MiRequest, MiRequestError};
use serde_json::Value;

fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("CALLBUS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/opensips-3.4"));
    assert!(
        dir.is_dir(),
        "fixtures not found at {}: the repository's fixtures/opensips-3.4 is missing; set CALLBUS_FIXTURES to a copy",
        dir.display()
    );
    dir
}

fn files(sub: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixtures_dir().join(sub))
        .expect("fixture dir readable")
        .map(|e| {
            let path = e.expect("dir entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).expect("utf-8 name").to_owned();
            (name, std::fs::read(&path).expect("fixture readable"))
        })
        .collect();
    out.sort();
    out
}

fn as_value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("fixture is JSON")
}

#[test]
fn every_mi_fixture_is_classified_and_round_trips() {
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let all = files("mi");
    assert!(all.len() >= 150, "expected the full MI fixture set, found {}", all.len());
    for (name, bytes) in &all {
        if name.ends_with(".request.json") {
            match MiRequest::parse(bytes) {
                Ok(req) => {
                    *kinds.entry("request").or_default() += 1;
                    let back = serde_json::to_value(&req).expect("serializes");
                    if back != as_value(bytes) {
                        failures.push(format!("{name}: request lost data: {back}"));
                    }
                }
                Err(MiRequestError::NotJson { .. }) if name.starts_with("invalid_json") => {
                    *kinds.entry("request (not JSON)").or_default() += 1;
                }
                Err(MiRequestError::InvalidRequest { .. }) if name.contains("invalid_request") => {
                    *kinds.entry("request (invalid JSON-RPC)").or_default() += 1;
                }
                Err(MiRequestError::Oversized { .. }) if name.contains("over_limit") => {
                    // OpenSIPS drops it without a reply; so do we, before parsing.
                    *kinds.entry("request (oversized)").or_default() += 1;
                }
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        } else if name.ends_with(".reply.json") {
            match MiReply::classify(bytes) {
                MiReply::Success(s) => {
                    *kinds.entry("reply success").or_default() += 1;
                    if serde_json::to_value(&s).expect("serializes") != as_value(bytes) {
                        failures.push(format!("{name}: success reply lost data"));
                    }
                    if s.to_bytes() != *bytes {
                        failures.push(format!("{name}: success reply does not re-serialize byte for byte"));
                    }
                }
                MiReply::Error(e) => {
                    *kinds.entry("reply error").or_default() += 1;
                    if serde_json::to_value(&e).expect("serializes") != as_value(bytes) {
                        failures.push(format!("{name}: error reply lost data"));
                    }
                    if e.to_bytes() != *bytes {
                        failures.push(format!("{name}: error reply does not re-serialize byte for byte"));
                    }
                }
                MiReply::PlainText(MiPlainText::ParseError) => *kinds.entry("reply 400 Parse_error").or_default() += 1,
                MiReply::PlainText(MiPlainText::InternalError) => {
                    *kinds.entry("reply 500 Internal error").or_default() += 1
                }
                other => failures.push(format!("{name}: classified as {other:?}")),
            }
        } else {
            failures.push(format!("{name}: neither a request nor a reply"));
        }
    }
    println!("MI fixtures by kind: {kinds:?}");
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    for kind in ["request", "request (not JSON)", "request (invalid JSON-RPC)", "reply success", "reply error"] {
        assert!(kinds.contains_key(kind), "no fixture of kind {kind}");
    }
    assert!(kinds.contains_key("reply 400 Parse_error") && kinds.contains_key("reply 500 Internal error"));
}

#[test]
fn every_event_fixture_is_typed_and_round_trips_byte_for_byte() {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let all = files("events");
    assert!(all.len() >= 80, "expected the full event fixture set, found {}", all.len());
    for (name, bytes) in &all {
        let expected_name = name.split('.').next().unwrap_or_default();
        match Event::parse(bytes) {
            Ok(event) => {
                let typed = matches!(
                    (&event, expected_name),
                    (Event::DlgStateChanged(_), E_DLG_STATE_CHANGED)
                        | (Event::UaSession(_), E_UA_SESSION)
                        | (Event::CallHold(_), E_CALL_HOLD)
                        | (Event::CallTransfer(_), E_CALL_TRANSFER)
                );
                if !typed {
                    failures.push(format!("{name}: parsed as {}, not typed", event.name()));
                }
                *kinds.entry(event.name().to_owned()).or_default() += 1;
                let out = event.to_bytes();
                if as_value(&out) != as_value(bytes) {
                    failures.push(format!("{name}: lost data in the round trip"));
                }
                if out != *bytes {
                    failures.push(format!("{name}: does not re-serialize byte for byte"));
                }
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    println!("event fixtures by kind: {kinds:?}");
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(kinds.len(), 4, "all four typed events are present in the fixtures");
}

#[test]
fn known_quirks_are_kept_not_rejected() {
    use callbus_schemas::event::{DlgState, Leg, TransferState};
    let blind =
        std::fs::read(fixtures_dir().join("events/E_CALL_TRANSFER.1.call_transfer_blind.json")).expect("fixture");
    let Ok(Event::CallTransfer(t)) = Event::parse(&blind) else { panic!("blind transfer start must parse") };
    assert_eq!(t.state, TransferState::Start);
    // OpenSIPS 3.4.18 puts the new call's Call-ID in `leg` here.
    assert_eq!(t.leg, Leg::Unknown(t.transfer_callid.clone()));

    let no_uas =
        std::fs::read(fixtures_dir().join("events/E_DLG_STATE_CHANGED.1.unanswered_no_uas.json")).expect("fixture");
    let Ok(Event::DlgStateChanged(d)) = Event::parse(&no_uas) else { panic!("must parse") };
    assert_eq!((d.old_state, d.new_state, d.to_tag), (DlgState::Unconfirmed, DlgState::Deleted, None));
}

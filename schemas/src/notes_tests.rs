use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use super::*;
use crate::catalog::check_notification;

fn s(text: &str) -> String {
    text.to_owned()
}

/// One of each variant, every `Option` filled (so every field shows). The match fails to
/// compile when a variant is added and not sampled here.
fn outcomes() -> Vec<Outcome> {
    let all = vec![
        Outcome::CommandSucceeded {
            verb: s("call.start"),
            detail: Box::new(Detail {
                reason: Some(s("r")),
                caller: Some(s("c")),
                callee: Some(s("c")),
                caller_key: Some(s("k")),
                callee_key: Some(s("k")),
                new_sip_call_id: Some(s("n")),
                destination: Some(s("d")),
                note: Some(s("n")),
                method: Some(s("INFO")),
                code: Some(200),
                status: Some(200),
            }),
        },
        Outcome::CommandFailed { verb: s("call.end"), reason: s("why") },
    ];
    for n in &all {
        match n {
            Outcome::CommandSucceeded { .. } | Outcome::CommandFailed { .. } => {}
        }
    }
    all
}

fn dialog() -> Vec<DialogNote> {
    let leg = || s("caller");
    let all = vec![
        DialogNote::Early(Moved::states(1, 2)),
        DialogNote::Answered(Moved::states(2, 3)),
        DialogNote::Confirmed(Moved::reconciled()),
        DialogNote::Ended { reason: s("hung_up") },
        DialogNote::Ending {},
        DialogNote::HoldRequested {},
        DialogNote::UnholdRequested {},
        DialogNote::HoldStarted { leg: leg() },
        DialogNote::Held { leg: leg() },
        DialogNote::HoldFailed { leg: leg() },
        DialogNote::UnholdStarted { leg: leg() },
        DialogNote::Resumed { leg: leg() },
        DialogNote::UnholdFailed { leg: leg() },
        DialogNote::TransferRequested {
            kind: TransferKind::Blind { leg: crate::command::LegName::Caller, destination: s("sip:d@h") },
        },
        DialogNote::TransferStarted { new_sip_call_id: s("n"), destination: s("sip:d@h") },
        DialogNote::TransferProgress { status: s("200 OK") },
        DialogNote::Transferred { new_sip_call_id: s("n"), status: s("200 OK") },
        DialogNote::TransferFailed { reason: Some(s("why")), status: Some(s("486 Busy")) },
    ];
    for n in &all {
        match n {
            DialogNote::Early(_)
            | DialogNote::Answered(_)
            | DialogNote::Confirmed(_)
            | DialogNote::Ended { .. }
            | DialogNote::Ending {}
            | DialogNote::HoldRequested {}
            | DialogNote::UnholdRequested {}
            | DialogNote::HoldStarted { .. }
            | DialogNote::Held { .. }
            | DialogNote::HoldFailed { .. }
            | DialogNote::UnholdStarted { .. }
            | DialogNote::Resumed { .. }
            | DialogNote::UnholdFailed { .. }
            | DialogNote::TransferRequested { .. }
            | DialogNote::TransferStarted { .. }
            | DialogNote::TransferProgress { .. }
            | DialogNote::Transferred { .. }
            | DialogNote::TransferFailed { .. } => {}
        }
    }
    all
}

fn ua() -> Vec<UaNote> {
    let o = || Some(s("x"));
    let all = vec![
        UaNote::Starting { to: s("t"), from: s("f"), ruri: s("r") },
        UaNote::Calling { key: s("k") },
        UaNote::Early { status: 180, reason: o(), body: o(), headers: o() },
        UaNote::Progress { method: s("INVITE"), status: 183, reason: o(), body: o() },
        UaNote::Answered { status: 200 },
        UaNote::AnsweredClient { status: 200, reason: o(), body: o(), headers: o(), ack_due: true },
        UaNote::Confirmed { body: o() },
        UaNote::ConfirmedByUs {},
        UaNote::Ack { body: o() },
        UaNote::AckSentByEngine { after_ms: 1 },
        UaNote::Rejected { status: 486, reason: o(), cause: s("busy"), headers: o() },
        UaNote::Incoming {
            key: s("k"),
            from: o(),
            to: o(),
            caller: o(),
            callee: o(),
            body: o(),
            content_type: o(),
            headers: o(),
        },
        UaNote::OfferExpired { after_ms: 1 },
        UaNote::Request { method: s("INFO"), body: o(), headers: o(), content_type: o() },
        UaNote::RequestExpired { method: s("INFO"), answered: 500 },
        UaNote::Replied { method: s("INFO"), status: 200 },
        UaNote::UpdateSent { method: s("INFO") },
        UaNote::UpdateAnswered { method: s("INFO"), status: 200, reason: o(), body: o(), headers: o() },
        UaNote::UpdateRejected { method: s("INFO"), status: 488, reason: o(), headers: o() },
        UaNote::UpdateTimeout { method: s("INFO") },
        UaNote::Ending { by: s("local") },
        UaNote::Ended { by: s("remote"), reason: s("hung_up"), status: Some(200) },
    ];
    for n in &all {
        match n {
            UaNote::Starting { .. }
            | UaNote::Calling { .. }
            | UaNote::Early { .. }
            | UaNote::Progress { .. }
            | UaNote::Answered { .. }
            | UaNote::AnsweredClient { .. }
            | UaNote::Confirmed { .. }
            | UaNote::ConfirmedByUs {}
            | UaNote::Ack { .. }
            | UaNote::AckSentByEngine { .. }
            | UaNote::Rejected { .. }
            | UaNote::Incoming { .. }
            | UaNote::OfferExpired { .. }
            | UaNote::Request { .. }
            | UaNote::RequestExpired { .. }
            | UaNote::Replied { .. }
            | UaNote::UpdateSent { .. }
            | UaNote::UpdateAnswered { .. }
            | UaNote::UpdateRejected { .. }
            | UaNote::UpdateTimeout { .. }
            | UaNote::Ending { .. }
            | UaNote::Ended { .. } => {}
        }
    }
    all
}

fn bridged() -> Vec<BridgedNote> {
    let session = || LegSession { leg: s("caller"), key: Some(s("k")), caller: s("a"), callee: s("b") };
    let ringing = || Ringing {
        leg: s("new"),
        key: Some(s("k")),
        status: 180,
        reason: Some(s("Ringing")),
        caller: s("a"),
        callee: s("b"),
    };
    let status = || LegReply { leg: s("callee"), status: 200 };
    let all = vec![
        BridgedNote::Dialing { leg: s("caller"), uri: s("sip:a@h") },
        BridgedNote::Calling(session()),
        BridgedNote::Ringing(ringing()),
        BridgedNote::TransferRinging(ringing()),
        BridgedNote::Answered(session()),
        BridgedNote::Connected(Connected {
            caller: s("a"),
            callee: s("b"),
            caller_key: Some(s("k1")),
            callee_key: Some(s("k2")),
        }),
        BridgedNote::Failed { leg: s("callee"), cause: s("busy"), status: Some(486), detail: s("busy") },
        BridgedNote::HoldRequested {},
        BridgedNote::Held {},
        BridgedNote::UnholdRequested {},
        BridgedNote::Resumed {},
        BridgedNote::LegHeld(status()),
        BridgedNote::LegResumed(status()),
        BridgedNote::LegHoldFailed(status()),
        BridgedNote::LegUnholdFailed(status()),
        BridgedNote::LegHoldTimeout { leg: s("caller") },
        BridgedNote::Ending { by: s("local") },
        BridgedNote::Request { leg: s("caller"), method: s("INFO"), body: Some(s("b")) },
        BridgedNote::TransferRequested { staying: s("caller"), replaced: s("callee"), destination: s("sip:c@h") },
        BridgedNote::TransferAnswered { destination: s("sip:c@h"), key: Some(s("k")) },
        BridgedNote::Transferred { destination: s("sip:c@h"), staying: s("caller") },
        BridgedNote::TransferFailed { destination: s("sip:c@h"), cause: s("busy"), status: Some(486) },
        BridgedNote::Ended { by: s("caller"), reason: s("hung_up"), status: None },
    ];
    for n in &all {
        match n {
            BridgedNote::Dialing { .. }
            | BridgedNote::Calling(_)
            | BridgedNote::Ringing(_)
            | BridgedNote::TransferRinging(_)
            | BridgedNote::Answered(_)
            | BridgedNote::Connected(_)
            | BridgedNote::Failed { .. }
            | BridgedNote::HoldRequested {}
            | BridgedNote::Held {}
            | BridgedNote::UnholdRequested {}
            | BridgedNote::Resumed {}
            | BridgedNote::LegHeld(_)
            | BridgedNote::LegResumed(_)
            | BridgedNote::LegHoldFailed(_)
            | BridgedNote::LegUnholdFailed(_)
            | BridgedNote::LegHoldTimeout { .. }
            | BridgedNote::Ending { .. }
            | BridgedNote::Request { .. }
            | BridgedNote::TransferRequested { .. }
            | BridgedNote::TransferAnswered { .. }
            | BridgedNote::Transferred { .. }
            | BridgedNote::TransferFailed { .. }
            | BridgedNote::Ended { .. } => {}
        }
    }
    all
}

/// Each note's event and the fields it sends, checked against the table of `kind`.
fn sent<N: Note>(notes: &[N], kind: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for note in notes {
        let (event, data) = note.parts();
        if let Err(e) = check_notification(kind, &event, &data) {
            panic!("{e}");
        }
        let fields = data.as_object().unwrap_or_else(|| panic!("{event}: data is not an object: {data}"));
        out.entry(event).or_default().extend(fields.keys().cloned());
    }
    out
}

#[test]
fn every_note_is_in_the_doc_and_every_documented_field_is_sent() {
    let tables = [
        (Table::Every, sent(&outcomes(), "dialog")),
        (Table::Dialog, sent(&dialog(), "dialog")),
        (Table::Ua, sent(&ua(), "ua_client")),
        (Table::Bridged, sent(&bridged(), "bridged")),
    ];
    for (table, sent) in tables {
        for row in table.rows() {
            let documented: BTreeSet<String> = row.data.iter().map(|(name, _)| (*name).to_owned()).collect();
            let mut covered = BTreeSet::new();
            for event in row.events {
                let fields = sent.get(*event).unwrap_or_else(|| panic!("{table:?}: no note sends {event}"));
                covered.extend(fields.iter().cloned());
            }
            assert_eq!(covered, documented, "{table:?}: {:?} send other fields than the doc lists", row.events);
        }
    }
}

#[test]
fn a_note_is_its_event_and_its_data_as_sent() {
    assert_eq!(DialogNote::Held { leg: s("caller") }.parts(), (s("held"), json!({"leg": "caller"})));
    assert_eq!(DialogNote::Ending {}.parts(), (s("ending"), json!({})));
    assert_eq!(DialogNote::Early(Moved::states(1, 2)).parts(), (s("early"), json!({"old_state": 1, "new_state": 2})));
    assert_eq!(DialogNote::Confirmed(Moved::reconciled()).parts().1, json!({"source": "reconcile"}));
    assert_eq!(DialogNote::TransferFailed { reason: None, status: Some(s("486")) }.parts().1, json!({"status": "486"}));
    // Empty options are sent as null unless the field says it is left out.
    let (event, data) =
        UaNote::AnsweredClient { status: 200, reason: None, body: None, headers: None, ack_due: false }.parts();
    assert_eq!(event, "answered");
    assert_eq!(data, json!({"status": 200, "reason": null, "body": null, "headers": null, "ack_due": false}));
    assert_eq!(UaNote::ConfirmedByUs {}.parts(), (s("confirmed"), json!({})));
    let detail = Detail { method: Some(s("INVITE")), code: Some(200), ..Default::default() };
    assert_eq!(
        Outcome::CommandSucceeded { verb: s("ua.answer"), detail: Box::new(detail) }.parts(),
        (s("command_succeeded"), json!({"verb": "ua.answer", "detail": {"method": "INVITE", "code": 200}}))
    );
}

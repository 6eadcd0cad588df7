//! Building and parsing subjects, with token validation.

use callbus_schemas::subjects::{self, Subject, SubjectError, Verb};

#[test]
fn every_subject_round_trips() {
    let samples = [
        Subject::Event { node: "n1".into(), event: "E_DLG_STATE_CHANGED".into() },
        Subject::Invalid { node: "n1".into() },
        Subject::Mi { node: "edge-2".into(), command: "call_hold".into() },
        Subject::Status { node: "default".into() },
        Subject::CallNotification { call_id: "01JD8Z3Q".into(), event: "answered".into() },
    ];
    for s in samples.into_iter().chain(Verb::ALL.map(|verb| Subject::Cmd { verb })) {
        let text = s.to_string();
        assert_eq!(Subject::parse(&text), Ok(s), "{text}");
    }
    assert_eq!(subjects::event("n1", "E_UA_SESSION").as_deref(), Ok("opensips.n1.event.E_UA_SESSION"));
    assert_eq!(subjects::mi("n1", "dlg_list").as_deref(), Ok("opensips.n1.mi.dlg_list"));
    assert_eq!(subjects::cmd(Verb::CallTransferBlind), "callbus.cmd.call.transfer.blind");
    assert_eq!(subjects::all_events("n1").as_deref(), Ok("opensips.n1.event.>"));
    let note = Subject::CallNotification { call_id: "c01".into(), event: "answered".into() };
    assert_eq!(subjects::call_notification("c01", "answered"), Ok(note.to_string()));
}

#[test]
fn bad_tokens_are_refused_with_the_culprit_named() {
    for bad in ["a.b", "a*", "a>", "a b", "a\tb", "x\n", "a\u{0B}b", "a\u{A0}b", "a\u{2003}b", "é."] {
        match subjects::event(bad, "E_X") {
            Err(SubjectError::BadToken { what: "node", token, .. }) => assert_eq!(token, bad),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert_eq!(subjects::status(""), Err(SubjectError::EmptyToken { what: "node" }));
    // A SIP Call-ID is not a usable subject token.
    assert!(subjects::call_notification("1-16765@127.0.0.1", "ended").is_err());
    assert_eq!(subjects::call_notification("c01", ""), Err(SubjectError::EmptyToken { what: "notification event" }));
    assert!(matches!(subjects::call_notification("c01", "a.b"), Err(SubjectError::BadToken { .. })));
    // Control characters that are not whitespace, and non-ASCII letters, are fine.
    for good in ["a\u{1}b", "é", "c0193a4f2b81000001", "ringing_again", "a-b_c~d"] {
        assert!(subjects::event(good, "E_X").is_ok(), "{good:?}");
    }
}

#[test]
fn foreign_subjects_are_refused() {
    for bad in [
        "",
        "foo.bar",
        "opensips.n1",
        "opensips.n1.event",
        "opensips.n1.mi.a.b",
        "callbus.cmd.call.fly",
        "callbus.cmd",
        "callbus.call.x",
    ] {
        assert!(Subject::parse(bad).is_err(), "{bad:?} must not parse");
    }
    assert!(Subject::parse("opensips.*.event.E_X").is_err(), "wildcards are not concrete subjects");
}

#[test]
fn an_event_subject_s_node_is_read_as_the_parser_reads_it() {
    for subject in [
        "opensips.n1.event.E_DLG_STATE_CHANGED",
        "opensips.node-2.event.E_UA_SESSION",
        "opensips.n1.event",
        "opensips.n1.event.E_X.more",
        "opensips..event.E_X",
        "opensips.n1.event.",
        "opensips.n*.event.E_X",
        "opensips.n1.event.E>",
        "opensips.n1.mi.dlg_list",
        "opensips.n1.status",
        "callbus.call.c1.ended",
        "opensips.n\u{A0}1.event.E_X",
        "",
    ] {
        let parsed = match Subject::parse(subject) {
            Ok(Subject::Event { node, .. }) => Some(node),
            _ => None,
        };
        assert_eq!(subjects::event_node(subject).map(str::to_owned), parsed, "{subject:?}");
    }
}

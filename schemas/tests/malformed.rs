//! Malformed input to the wire parsers (truncated, wrong types, huge, not UTF-8, wrong shape)
//! comes back as a typed error or a classified reply, never a panic.

use callbus_schemas::event::{event_name, Event, EventError};
use callbus_schemas::mi::{MiId, MiReply, MiRequest, MiRequestError};

const GOOD_EVENT: &str = r#"{"jsonrpc":"2.0","method":"E_CALL_HOLD","params":{"callid":"c1","leg":"caller","action":"hold","state":"start"}}"#;

#[test]
fn truncated_events_are_errors_at_every_length() {
    for len in 0..GOOD_EVENT.len() {
        let err = Event::parse(&GOOD_EVENT.as_bytes()[..len]).expect_err("a truncated event must not parse");
        assert!(matches!(err, EventError::NotNotification { .. }), "len {len}: {err:?}");
    }
    assert!(Event::parse(GOOD_EVENT.as_bytes()).is_ok());
}

#[test]
fn events_with_wrong_shapes_are_named_errors() {
    let cases: &[(&[u8], &str)] = &[
        (b"\xff\xfe\x00garbage", "not-utf8"),
        (b"[1,2,3]", "array"),
        (b"\"E_CALL_HOLD\"", "string"),
        (br#"{"method":"E_CALL_HOLD","params":{}}"#, "no jsonrpc"),
        (br#"{"jsonrpc":"1.0","method":"E_X"}"#, "wrong version"),
        (br#"{"jsonrpc":"2.0","params":{}}"#, "no method"),
        (br#"{"jsonrpc":"2.0","method":7}"#, "method not a string"),
        (br#"{"jsonrpc":"2.0","method":"E_X","id":1}"#, "has an id"),
        (br#"{"jsonrpc":"2.0","method":""}"#, "empty method"),
    ];
    for (bytes, label) in cases {
        let err = Event::parse(bytes).expect_err(label);
        assert!(matches!(err, EventError::NotNotification { .. }), "{label}: {err:?}");
        assert!(event_name(bytes).is_err(), "{label}: event_name must refuse it too");
    }
}

#[test]
fn known_events_with_wrong_typed_params_say_which_event() {
    let cases = [
        r#"{"jsonrpc":"2.0","method":"E_DLG_STATE_CHANGED","params":{"id":"a","db_id":"1","callid":"c","from_tag":"f","to_tag":null,"old_state":"one","new_state":2}}"#,
        r#"{"jsonrpc":"2.0","method":"E_UA_SESSION","params":{"key":"k","event_type":"NEW"}}"#,
        r#"{"jsonrpc":"2.0","method":"E_CALL_HOLD","params":[1,2]}"#,
        r#"{"jsonrpc":"2.0","method":"E_CALL_TRANSFER"}"#,
        r#"{"jsonrpc":"2.0","method":"E_UA_SESSION","params":{"key":5,"event_type":"NEW","entity_type":"UAS","status":0,"reason":null,"method":"INVITE","body":null,"headers":null}}"#,
    ];
    for case in cases {
        match Event::parse(case.as_bytes()) {
            Err(EventError::BadParams { event, reason }) => {
                assert!(event.starts_with("E_"), "{event}");
                assert!(!reason.is_empty());
            }
            other => panic!("{case}: expected BadParams, got {other:?}"),
        }
    }
}

#[test]
fn unknown_events_and_values_are_kept() {
    let other = br#"{"jsonrpc":"2.0","method":"E_CORE_THRESHOLD","params":{"source":"x","time":7}}"#;
    let ev = Event::parse(other).expect("unknown events are kept");
    assert_eq!(ev.name(), "E_CORE_THRESHOLD");
    assert_eq!(ev.to_bytes(), other.to_vec());
    let newer = br#"{"jsonrpc":"2.0","method":"E_CALL_HOLD","params":{"callid":"c","leg":"both","action":"action","state":"paused","since":3}}"#;
    let ev = Event::parse(newer).expect("new values are kept");
    assert_eq!(ev.to_bytes(), newer.to_vec(), "unknown values and members survive the round trip");
}

#[test]
fn oversized_datagrams_are_refused_before_parsing() {
    let huge = vec![b' '; 70_000];
    assert!(matches!(Event::parse(&huge), Err(EventError::Oversized { size: 70_000, .. })));
    assert!(matches!(MiRequest::parse(&huge), Err(MiRequestError::Oversized { .. })));
    assert!(matches!(MiReply::classify(&huge), MiReply::Unrecognized { .. }));
}

#[test]
fn mi_requests_follow_opensips_validity_rules() {
    let invalid = |bytes: &[u8]| match MiRequest::parse(bytes) {
        Err(MiRequestError::InvalidRequest { id, reason }) => (id, reason),
        other => panic!("{}: expected InvalidRequest, got {other:?}", String::from_utf8_lossy(bytes)),
    };
    assert_eq!(invalid(br#"{"jsonrpc":"2.0","id":7}"#).0, MiId::from(7));
    assert_eq!(invalid(br#"{"method":"version","id":"x"}"#).0, MiId::from("x"));
    for bad_id in [&br#"{"jsonrpc":"2.0","method":"v","id":[1]}"#[..], br#"{"jsonrpc":"2.0","method":"v","id":true}"#] {
        assert!(matches!(MiRequest::parse(bad_id), Err(MiRequestError::BadId { .. })), "a bad id is its own error");
    }
    assert!(invalid(br#"{"jsonrpc":"2.0","method":"v","params":"x"}"#).1.contains("params"));
    assert!(invalid(br#"{"jsonrpc":2,"method":"v"}"#).1.contains("jsonrpc"));
    assert!(invalid(b"[]").1.contains("object"));
    for bad in [&b""[..], b"{", b"\xff", b"{\"jsonrpc\":\"2.0\",\"method\":\"which\",\"id\":"] {
        assert!(matches!(MiRequest::parse(bad), Err(MiRequestError::NotJson { .. })));
    }
    // Trailing bytes after the JSON value are ignored, as OpenSIPS does.
    assert!(MiRequest::parse(br#"{"jsonrpc":"2.0","method":"version","id":1} trailing"#).is_ok());
    // An absent id and a null id differ: only the first gets no reply.
    let absent = MiRequest::parse(br#"{"jsonrpc":"2.0","method":"version"}"#).expect("valid");
    let null = MiRequest::parse(br#"{"jsonrpc":"2.0","method":"version","id":null}"#).expect("valid");
    assert_eq!((absent.id, null.id), (None, Some(MiId::Null)));
}

#[test]
fn mi_replies_are_always_classified() {
    let unrecognized = [
        &b""[..],
        b"\xff\xfe",
        b"OK",
        b"42",
        b"[]",
        br#"{"result":"OK","id":1}"#,
        br#"{"jsonrpc":"2.0","result":"OK"}"#,
        br#"{"jsonrpc":"2.0","id":1}"#,
        br#"{"jsonrpc":"2.0","result":1,"error":{"code":1,"message":"m"},"id":1}"#,
        br#"{"jsonrpc":"2.0","error":{"code":"x","message":"m"},"id":1}"#,
        br#"{"jsonrpc":"2.0","error":"boom","id":1}"#,
        br#"{"jsonrpc":"2.0","result":"OK","id":{"a":1}}"#,
        b"1234 not a code",
    ];
    for bytes in unrecognized {
        assert!(
            matches!(MiReply::classify(bytes), MiReply::Unrecognized { .. }),
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    assert!(matches!(MiReply::classify(b"500 Internal error\n"), MiReply::PlainText(_)));
    let mut truncated = br#"{"jsonrpc":"2.0","result":{"Dialogs":[]},"id":9}"#.to_vec();
    while !truncated.is_empty() {
        truncated.pop();
        let _ = MiReply::classify(&truncated); // must not panic at any length
    }
}

#[test]
fn members_of_a_newer_opensips_are_kept_and_params_are_checked_member_by_member() {
    // OpenSIPS 3.6 adds `extra_params` to E_UA_SESSION; it must survive a parse and a write.
    let newer = r#"{"jsonrpc":"2.0","method":"E_UA_SESSION","params":{"key":"B2B.1.2.3.4","event_type":"NEW","entity_type":"UAS","status":0,"reason":null,"method":"INVITE","body":null,"headers":null,"extra_params":"x=1"}}"#;
    let Event::UaSession(u) = Event::parse(newer.as_bytes()).expect("parses") else { panic!("typed") };
    assert_eq!(u.extra.get("extra_params"), Some(&serde_json::json!("x=1")));
    assert_eq!(Event::UaSession(u).to_bytes(), newer.as_bytes(), "written back as received");
    // Optional members may be absent; required ones are named when missing or repeated.
    let absent = r#"{"jsonrpc":"2.0","method":"E_UA_SESSION","params":{"key":"k","event_type":"NEW","entity_type":"UAS","status":0,"method":"INVITE"}}"#;
    let Event::UaSession(u) = Event::parse(absent.as_bytes()).expect("parses") else { panic!("typed") };
    assert_eq!((u.reason, u.body, u.headers), (None, None, None));
    let missing = r#"{"jsonrpc":"2.0","method":"E_CALL_HOLD","params":{"callid":"c","leg":"caller","action":"hold"}}"#;
    let e = Event::parse(missing.as_bytes()).expect_err("state is required");
    assert!(
        matches!(&e, EventError::BadParams { event, reason } if event == "E_CALL_HOLD" && reason.contains("state")),
        "{e}"
    );
    let twice = r#"{"jsonrpc":"2.0","method":"E_CALL_HOLD","params":{"callid":"c","callid":"d","leg":"caller","action":"hold","state":"ok"}}"#;
    let e = Event::parse(twice.as_bytes()).expect_err("a repeated member");
    assert!(e.to_string().contains("duplicate field `callid`"), "{e}");
    let not_object = r#"{"jsonrpc":"2.0","method":"E_CALL_HOLD","params":[1,2]}"#;
    let e = Event::parse(not_object.as_bytes()).expect_err("params must be an object");
    assert!(e.to_string().contains("CallHold"), "{e}");
}

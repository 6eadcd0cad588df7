//! Tests of `command`.
use super::*;

fn err(verb: Verb, body: &str) -> CommandError {
    CommandRequest::parse(verb, body.as_bytes()).expect_err(body)
}

#[test]
fn valid_commands_parse() {
    let r = CommandRequest::parse(Verb::CallHold, br#"{"call_id":"c1","cmd_id":"x"}"#).expect("valid");
    assert_eq!(
        r,
        CommandRequest { cmd_id: Some("x".into()), command: Command::Hold { target: CallTarget::CallId("c1".into()) } }
    );
    let r = CommandRequest::parse(
        Verb::CallTransferBlind,
        br#"{"sip_call_id":"1@h","leg":"callee","destination":"sip:a@b"}"#,
    )
    .expect("valid");
    assert!(matches!(r.command, Command::TransferBlind { leg: LegName::Callee, .. }));
    assert!(CommandRequest::parse(Verb::CallList, b"{}").is_ok());
}

#[test]
fn errors_name_the_field_and_the_problem() {
    let e = err(Verb::CallHold, "{}");
    assert_eq!((e.code, e.field.as_deref()), (CommandErrorCode::MissingField, Some("call_id")));
    let e = err(Verb::CallHold, r#"{"call_id":7}"#);
    assert_eq!(e.code, CommandErrorCode::WrongType);
    assert!(e.message.contains("a number"));
    let e = err(Verb::CallHold, r#"{"call_id":"a","sip_call_id":"b"}"#);
    assert_eq!(e.code, CommandErrorCode::BadValue);
    let e = err(Verb::CallTransferBlind, r#"{"call_id":"a","leg":"both","destination":"sip:x@y"}"#);
    assert_eq!((e.code, e.field.as_deref()), (CommandErrorCode::BadValue, Some("leg")));
    let e = err(Verb::CallTransferBlind, r#"{"call_id":"a","leg":"callee","destination":"<sip:x@y>"}"#);
    assert_eq!(e.field.as_deref(), Some("destination"));
    let e = err(Verb::CallTransferAttended, r#"{"call_id":"a","leg":"caller","transfer_leg":"callee"}"#);
    assert_eq!(e.field.as_deref(), Some("transfer_call_id"));
    assert_eq!(err(Verb::CallEnd, "[1]").code, CommandErrorCode::BadRequest);
    assert_eq!(err(Verb::CallEnd, "{").code, CommandErrorCode::BadRequest);
    assert_eq!(err(Verb::CallEnd, "\u{0}").code, CommandErrorCode::BadRequest);
    assert_eq!(err(Verb::CallEnd, r#"{"call_id":""}"#).code, CommandErrorCode::BadValue);
    assert_eq!(err(Verb::CallEnd, r#"{"call_id":"a","cmd_id":{}}"#).field.as_deref(), Some("cmd_id"));
    assert_eq!(err(Verb::UaStart, "{}").code, CommandErrorCode::MissingField);
    let big = format!(r#"{{"call_id":"{}"}}"#, "x".repeat(MAX_COMMAND_BYTES));
    assert_eq!(err(Verb::CallEnd, &big).code, CommandErrorCode::BadRequest);
}

#[test]
fn ua_commands_parse_with_payloads_and_defaults() {
    let r = CommandRequest::parse(
        Verb::UaStart,
        br#"{"to":"Bob,sip:bob@h","from":"sip:a@h","body":"v=0","content_type":"application/sdp","headers":{"X-A":"1","Subject":"hi"},"manual_ack":true,"max_duration_s":60}"#,
    )
    .expect("valid");
    let Command::UaStart { to, payload, manual_ack, max_duration_s, ruri, .. } = r.command else { panic!() };
    assert_eq!((to.as_str(), manual_ack, max_duration_s, ruri), ("Bob,sip:bob@h", true, Some(60), None));
    assert_eq!(payload.body.map(|b| (b.content_type, b.text)), Some(("application/sdp".into(), "v=0".into())));
    let names: Vec<_> = payload.headers.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names.len(), 2);
    let r = CommandRequest::parse(Verb::UaAnswer, br#"{"key":"B2B.1.2.3.4","code":486}"#).expect("valid");
    assert_eq!(
        r.command,
        Command::UaAnswer {
            target: CallTarget::Key("B2B.1.2.3.4".into()),
            code: 486,
            reason: "Busy Here".into(),
            method: None,
            payload: Payload::default(),
        }
    );
    let r = CommandRequest::parse(
        Verb::UaUpdate,
        br#"{"call_id":"c","method":"info","body":"x","content_type":"application/dtmf-relay"}"#,
    )
    .expect("valid");
    assert!(matches!(r.command, Command::UaUpdate { ref method, .. } if method == "INFO"));
    assert_eq!(r.command.verb(), Verb::UaUpdate);
    let r = CommandRequest::parse(Verb::CallStart, br#"{"caller":"sip:a@h","callee":"tel:+15551234"}"#).expect("valid");
    assert!(r.command.target().is_none());
    assert_eq!(reason_phrase(699), "Global Failure");
    assert_eq!(reason_phrase(183), "Session Progress");
}

#[test]
fn ua_command_errors_name_the_field() {
    let cases: [(Verb, &str, CommandErrorCode, &str); 11] = [
        (Verb::UaStart, r#"{"to":"sip:b@h","from":"a@h"}"#, CommandErrorCode::BadValue, "from"),
        (
            Verb::UaStart,
            r#"{"to":"sip:b@h","from":"sip:a@h","manual_ack":"yes"}"#,
            CommandErrorCode::WrongType,
            "manual_ack",
        ),
        (
            Verb::UaStart,
            r#"{"to":"sip:b@h","from":"sip:a@h","headers":["X-A: 1"]}"#,
            CommandErrorCode::WrongType,
            "headers",
        ),
        (
            Verb::UaStart,
            r#"{"to":"sip:b@h","from":"sip:a@h","body":"x","content_type":"sdp"}"#,
            CommandErrorCode::BadValue,
            "content_type",
        ),
        (
            Verb::UaStart,
            r#"{"to":"sip:b@h","from":"sip:a@h","max_duration_s":1.5}"#,
            CommandErrorCode::BadValue,
            "max_duration_s",
        ),
        (
            Verb::UaStart,
            r#"{"to":"sip:b@h","from":"sip:a@h","max_duration_s":0}"#,
            CommandErrorCode::BadValue,
            "max_duration_s",
        ),
        (
            Verb::CallStart,
            r#"{"caller":"sip:a@h","callee":"sip:b@h","max_duration_s":0}"#,
            CommandErrorCode::BadValue,
            "max_duration_s",
        ),
        (Verb::UaAnswer, r#"{"call_id":"c","code":700}"#, CommandErrorCode::BadValue, "code"),
        (Verb::UaAnswer, r#"{"call_id":"c","code":200,"reason":"OK\r\nX: y"}"#, CommandErrorCode::BadValue, "reason"),
        (Verb::UaUpdate, r#"{"call_id":"c","method":"CANCEL"}"#, CommandErrorCode::BadValue, "method"),
        (Verb::UaTerminate, r#"{"key":"k","sip_call_id":"s"}"#, CommandErrorCode::BadValue, "key"),
    ];
    for (verb, body, code, field) in cases {
        let e = err(verb, body);
        assert_eq!((e.code, e.field.as_deref()), (code, Some(field)), "{body}: {}", e.message);
    }
}

#[test]
fn a_borrowed_notification_is_the_same_json_as_an_owned_one() {
    for (sip_call_id, cmd_id) in [(Some("abc@10.0.0.1"), Some("k-1")), (None, None)] {
        let data = serde_json::json!({"reason": "hung_up", "codes": [1, 2]});
        let owned = CallNotification {
            seq: 42,
            time_ms: 1_795_000_000_000,
            call_id: "c1".into(),
            sip_call_id: sip_call_id.map(str::to_owned),
            cmd_id: cmd_id.map(str::to_owned),
            event: "ended".into(),
            state: "ended".into(),
            data: data.clone(),
        };
        let borrowed = CallNotificationRef {
            seq: 42,
            time_ms: 1_795_000_000_000,
            call_id: "c1",
            sip_call_id,
            cmd_id,
            event: "ended",
            state: "ended",
            data: &data,
        };
        let text = serde_json::to_string(&borrowed).expect("encode");
        assert_eq!(text, serde_json::to_string(&owned).expect("encode"));
        assert_eq!(serde_json::from_str::<CallNotification>(&text).expect("decode"), owned);
    }
}

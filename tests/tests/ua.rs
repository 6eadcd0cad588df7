//! UA sessions and click-to-dial end to end: a real nats-server, the simulator as OpenSIPS
//! (b2b_entities UA), the bridge, the engine, and an app speaking NATS. Every test ends by
//! re-running the log through today's machines.

use callbus_schemas::command::{CallNotification, CommandErrorCode, CommandReply};
use callbus_tests::stack::{accepted, assert_log_replays, refused, Stack};
use opensips_sim::{RemoteRequest, UasScript};
use serde_json::{json, Value};

fn events(notes: &[CallNotification]) -> Vec<&str> {
    notes.iter().map(|n| n.event.as_str()).collect()
}

fn of<'a>(notes: &'a [CallNotification], event: &str) -> &'a CallNotification {
    notes.iter().find(|n| n.event == event).unwrap_or_else(|| panic!("no {event} in {:?}", events(notes)))
}

/// Stops the stack and re-runs its log; returns how many records it had.
async fn finish(mut s: Stack) -> usize {
    s.shutdown().await;
    assert_log_replays(s.data.path())
}

/// Starts a UA client call to `to` and returns (call_id, notifications up to `until`).
async fn ua_call(s: &mut Stack, to: &str, extra: Value, until: &str) -> (String, Vec<CallNotification>) {
    let mut body = json!({"to": to, "from": "Alice,sip:alice@127.0.0.1", "body": "v=0\r\nm=audio 4000 RTP/AVP 0\r\n"});
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    let (call_id, cmd_id) = accepted(&s.cmd("ua.start", body).await);
    let notes = s.notes_until(|n| n.call_id == call_id && n.event == until).await;
    assert!(notes.iter().filter(|n| n.event == "starting").all(|n| n.cmd_id.as_deref() == Some(cmd_id.as_str())));
    (call_id, notes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ua_client_answered_updates_both_ways_then_remote_bye() {
    let mut s = Stack::start().await;
    let (call_id, notes) =
        ua_call(&mut s, "sip:bob@127.0.0.1:5080", json!({"cmd_id": "start1"}), "command_succeeded").await;
    assert_eq!(events(&notes), ["starting", "calling", "early", "answered", "command_succeeded"]);
    let answered = of(&notes, "answered");
    assert_eq!(answered.state, "confirmed");
    assert!(answered.data["body"].as_str().is_some_and(|b| b.starts_with("v=0")), "SDP answer in the notification");
    let key = of(&notes, "calling").data["key"].as_str().expect("key").to_owned();
    assert_eq!(answered.sip_call_id.as_deref(), Some(key.as_str()));

    // Our re-INVITE, then an INFO with its own content type.
    accepted(&s.cmd("ua.update", json!({"key": key, "method": "INVITE", "body": "v=0\r\nm=audio 4000 RTP/AVP 0\r\na=sendonly\r\n", "cmd_id": "re1"})).await);
    let notes = s.notes_until(|n| n.event == "command_succeeded" && n.cmd_id.as_deref() == Some("re1")).await;
    assert_eq!(of(&notes, "update_answered").data["status"], json!(200));
    accepted(&s.cmd("ua.update", json!({"call_id": call_id, "method": "INFO", "body": "Signal=5\r\nDuration=160\r\n", "content_type": "application/dtmf-relay", "cmd_id": "info1"})).await);
    let notes = s.notes_until(|n| n.event == "command_succeeded" && n.cmd_id.as_deref() == Some("info1")).await;
    assert_eq!(of(&notes, "update_answered").data["method"], json!("INFO"));

    // The remote side's re-INVITE and INFO, answered by the app.
    s.sim
        .ua_remote_request(&key, RemoteRequest::ReInvite("v=0\r\nm=audio 5000 RTP/AVP 0\r\n".into()))
        .expect("reinvite");
    let notes = s.notes_until(|n| n.event == "request").await;
    assert_eq!(of(&notes, "request").data["method"], json!("INVITE"));
    assert!(of(&notes, "request").data["body"].as_str().is_some_and(|b| b.contains("5000")));
    // An answer to a request that is not pending is refused.
    assert_eq!(
        refused(&s.cmd("ua.answer", json!({"call_id": call_id, "code": 200, "method": "INFO"})).await),
        CommandErrorCode::WrongState
    );
    accepted(
        &s.cmd(
            "ua.answer",
            json!({"call_id": call_id, "code": 200, "body": "v=0\r\nm=audio 4000 RTP/AVP 0\r\n", "cmd_id": "a1"}),
        )
        .await,
    );
    let notes = s.notes_until(|n| n.event == "command_succeeded" && n.cmd_id.as_deref() == Some("a1")).await;
    assert_eq!(of(&notes, "replied").data["status"], json!(200));
    s.sim.ua_remote_request(&key, RemoteRequest::Info("Signal=1\r\n".into())).expect("info");
    s.notes_until(|n| n.event == "request" && n.data["method"] == json!("INFO")).await;
    accepted(&s.cmd("ua.answer", json!({"call_id": call_id, "code": 200, "method": "INFO"})).await);
    s.notes_until(|n| n.event == "replied").await;

    s.sim.ua_remote_request(&key, RemoteRequest::Bye).expect("bye");
    let notes = s.notes_until(|n| n.event == "ended").await;
    let ended = of(&notes, "ended");
    assert_eq!((ended.data["by"].as_str(), ended.data["reason"].as_str()), (Some("remote"), Some("hung_up")));
    assert_eq!(refused(&s.cmd("ua.terminate", json!({"call_id": call_id})).await), CommandErrorCode::WrongState);
    finish(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ua_client_busy_nobody_cancel_and_local_terminate() {
    let mut s = Stack::start().await;
    let (_, notes) = ua_call(&mut s, "sip:busy@127.0.0.1", json!({"cmd_id": "b1"}), "ended").await;
    assert_eq!(of(&notes, "rejected").data["status"], json!(486));
    assert_eq!(of(&notes, "ended").data["reason"], json!("busy"));
    let notes = s.notes_until(|n| n.event == "command_failed").await;
    assert_eq!(notes.last().map(|n| n.cmd_id.as_deref()), Some(Some("b1")));

    let (_, notes) = ua_call(&mut s, "sip:nobody@127.0.0.1", json!({}), "ended").await;
    assert_eq!(of(&notes, "rejected").data["status"], json!(408));
    assert_eq!(of(&notes, "ended").data["reason"], json!("no_answer"));

    // Cancelled before the answer: the sim's peer rings for ever (well, 200 ms here).
    let (call_id, _) = ua_call(&mut s, "sip:noanswer@127.0.0.1", json!({}), "early").await;
    accepted(&s.cmd("ua.terminate", json!({"call_id": call_id, "cmd_id": "t1"})).await);
    let notes = s.notes_until(|n| n.call_id == call_id && n.event == "ended").await;
    assert_eq!(of(&notes, "ended").data["reason"], json!("cancelled"));
    assert_eq!(of(&notes, "ended").data["by"], json!("local"));

    let (call_id, _) = ua_call(&mut s, "sip:carol@127.0.0.1", json!({}), "answered").await;
    accepted(&s.cmd("call.end", json!({"call_id": call_id, "cmd_id": "t2"})).await);
    let notes = s.notes_until(|n| n.cmd_id.as_deref() == Some("t2") && n.event == "command_succeeded").await;
    assert_eq!(of(&notes, "ended").data["reason"], json!("hung_up"));
    let got = s.cmd("call.get", json!({"call_id": call_id})).await;
    let CommandReply::Data { result, .. } = got else { panic!("{got:?}") };
    assert_eq!(result["call"]["kind"], json!("ua_client"));
    finish(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ua_client_events_before_the_key_are_parked_and_manual_ack_works() {
    let nats_config = opensips_sim::SimConfig { uac_event_before_reply: true, ..Default::default() };
    let mut s = Stack::start_with(nats_config).await;
    let (call_id, notes) = ua_call(&mut s, "sip:bob@127.0.0.1", json!({"manual_ack": true}), "answered").await;
    assert_eq!(events(&notes), ["starting", "calling", "early", "answered"], "the early event waited for the key");
    assert_eq!(of(&notes, "answered").state, "answered");
    assert_eq!(of(&notes, "answered").data["ack_due"], json!(true));
    assert_eq!(
        refused(&s.cmd("ua.update", json!({"call_id": call_id, "method": "INFO"})).await),
        CommandErrorCode::WrongState,
        "nothing before the ACK"
    );
    accepted(
        &s.cmd("ua.update", json!({"call_id": call_id, "method": "ACK", "body": "v=0\r\nm=audio 4000 RTP/AVP 0\r\n"}))
            .await,
    );
    let notes = s.notes_until(|n| n.event == "confirmed").await;
    assert_eq!(notes.last().map(|n| n.state.as_str()), Some("confirmed"));
    finish(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ua_server_answered_rejected_unanswered_cancelled_and_remote_bye() {
    let mut s = Stack::start().await;
    // Answered by the app; the caller hangs up.
    let key = s.sim.incoming_ua_call(UasScript { subject: Some("support".into()), ..Default::default() }).expect("key");
    let notes = s.notes_until(|n| n.event == "incoming").await;
    let incoming = of(&notes, "incoming");
    let call_id = incoming.call_id.clone();
    assert_eq!(incoming.data["key"], json!(key));
    assert_eq!(incoming.data["caller"], json!("sip:sipp@127.0.0.1:5072"));
    assert!(incoming.data["body"].as_str().is_some_and(|b| b.starts_with("v=0")));
    assert!(incoming.data["headers"].as_str().is_some_and(|h| h.contains("Subject: support")));
    assert_eq!(incoming.state, "offered");
    accepted(&s.cmd("ua.answer", json!({"key": key, "code": 180})).await);
    accepted(
        &s.cmd(
            "ua.answer",
            json!({"key": key, "code": 200, "body": "v=0\r\nm=audio 6000 RTP/AVP 0\r\n", "cmd_id": "ans"}),
        )
        .await,
    );
    let notes = s.notes_until(|n| n.call_id == call_id && n.event == "confirmed").await;
    assert!(events(&notes).contains(&"answered"), "{:?}", events(&notes));
    s.sim.ua_remote_request(&key, RemoteRequest::Bye).expect("bye");
    let notes = s.notes_until(|n| n.call_id == call_id && n.event == "ended").await;
    assert_eq!(of(&notes, "ended").data["by"], json!("remote"));

    // Rejected by the app: the session is then freed in OpenSIPS too.
    let key = s.sim.incoming_ua_call(UasScript::default()).expect("key");
    let call_id = s.notes_until(|n| n.event == "incoming").await.pop().expect("note").call_id;
    accepted(&s.cmd("ua.answer", json!({"call_id": call_id, "code": 486})).await);
    let notes = s.notes_until(|n| n.call_id == call_id && n.event == "ended").await;
    assert_eq!(of(&notes, "ended").data["reason"], json!("rejected"));
    wait_gone(&s, &key).await;

    // Nobody answers: declined with 480 after the offer timeout, and freed.
    let key = s.sim.incoming_ua_call(UasScript::default()).expect("key");
    let notes = s.notes_until(|n| n.event == "ended" && n.data["reason"] == json!("not_answered")).await;
    assert!(events(&notes).contains(&"offer_expired"));
    assert_eq!(of(&notes, "ended").data["by"], json!("engine"));
    wait_gone(&s, &key).await;

    // The caller gives up: 487 and freed.
    let key = s.sim.incoming_ua_call(UasScript::default()).expect("key");
    s.notes_until(|n| n.event == "incoming").await;
    s.sim.ua_remote_request(&key, RemoteRequest::Cancel).expect("cancel");
    let notes = s.notes_until(|n| n.event == "ended").await;
    assert_eq!(of(&notes, "ended").data["reason"], json!("cancelled"));
    wait_gone(&s, &key).await;
    finish(s).await;
}

async fn wait_gone(s: &Stack, key: &str) {
    for _ in 0..100 {
        if !s.sim.has_ua_session(key) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the UA session {key} stayed in OpenSIPS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ua_commands_are_validated_and_oversize_sdp_is_refused_up_front() {
    let s = Stack::start().await;
    let cases = [
        ("ua.start", json!({"from": "sip:a@h"}), CommandErrorCode::MissingField),
        ("ua.start", json!({"to": "bob", "from": "sip:a@h"}), CommandErrorCode::BadValue),
        ("ua.start", json!({"to": "sip:b@h", "from": "sip:a@h", "body": 5}), CommandErrorCode::WrongType),
        (
            "ua.start",
            json!({"to": "sip:b@h", "from": "sip:a@h", "content_type": "application/sdp"}),
            CommandErrorCode::MissingField,
        ),
        (
            "ua.start",
            json!({"to": "sip:b@h", "from": "sip:a@h", "headers": {"Via": "x"}, "body": ""}),
            CommandErrorCode::BadValue,
        ),
        (
            "ua.start",
            json!({"to": "sip:b@h", "from": "sip:a@h", "headers": {"X-A": "1\r\nX-B: 2"}, "body": ""}),
            CommandErrorCode::BadValue,
        ),
        (
            "ua.start",
            json!({"to": "sip:b@h", "from": "sip:a@h", "body": "v=0\r\n".repeat(8_000)}),
            CommandErrorCode::BadValue,
        ),
        ("ua.answer", json!({"key": "B2B.1.2.3.4"}), CommandErrorCode::MissingField),
        ("ua.answer", json!({"key": "B2B.1.2.3.4", "code": "200"}), CommandErrorCode::WrongType),
        ("ua.answer", json!({"key": "B2B.1.2.3.4", "code": 99}), CommandErrorCode::BadValue),
        ("ua.answer", json!({"key": "B2B.1.2.3.4", "code": 200}), CommandErrorCode::UnknownCall),
        ("ua.update", json!({"key": "B2B.1.2.3.4", "method": "BYE"}), CommandErrorCode::BadValue),
        ("ua.update", json!({"key": "B2B.1.2.3.4"}), CommandErrorCode::MissingField),
        ("ua.terminate", json!({"key": "x", "call_id": "y"}), CommandErrorCode::BadValue),
        ("call.start", json!({"caller": "sip:a@h"}), CommandErrorCode::MissingField),
        (
            "call.start",
            json!({"caller": "sip:a@h", "callee": "sip:b@h", "max_duration_s": -1}),
            CommandErrorCode::BadValue,
        ),
    ];
    for (verb, body, code) in cases {
        let shown: String = body.to_string().chars().take(200).collect();
        assert_eq!(refused(&s.cmd(verb, body).await), code, "{verb} {shown}");
    }
    let big = "v=0\r\n".repeat(8_000);
    let reply = s.cmd("ua.start", json!({"to": "sip:b@h", "from": "sip:a@h", "body": big})).await;
    let CommandReply::Refused { error, .. } = reply else { panic!("{reply:?}") };
    assert!(error.message.contains("datagram"), "the reason is given: {}", error.message);
    let listed = s.cmd("call.list", json!({})).await;
    assert!(
        matches!(&listed, CommandReply::Data { result, .. } if result["calls"] == json!([])),
        "no call was made: {listed:?}"
    );
    finish(s).await;
}

async fn click_to_dial(s: &mut Stack, caller: &str, callee: &str, until: &str) -> (String, Vec<CallNotification>) {
    let (call_id, cmd_id) = accepted(&s.cmd("call.start", json!({"caller": caller, "callee": callee})).await);
    let notes = s.notes_until(|n| n.call_id == call_id && n.event == until).await;
    let ours = notes.iter().filter(|n| n.call_id == call_id);
    assert!(ours.filter_map(|n| n.cmd_id.as_deref()).all(|c| c == cmd_id), "notifications carry the command's id");
    (call_id, notes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn click_to_dial_connects_holds_unholds_and_ends_from_each_side() {
    let mut s = Stack::start().await;
    let (call_id, notes) = click_to_dial(&mut s, "sip:alice@127.0.0.1", "sip:bob@127.0.0.1", "command_succeeded").await;
    assert_eq!(
        events(&notes),
        [
            "dialing",
            "calling",
            "ringing",
            "answered",
            "dialing",
            "calling",
            "ringing",
            "answered",
            "connected",
            "command_succeeded"
        ]
    );
    assert_eq!(
        notes
            .iter()
            .filter(|n| n.event == "answered")
            .map(|n| n.data["leg"].as_str().unwrap_or_default())
            .collect::<Vec<_>>(),
        ["caller", "callee"]
    );
    assert_eq!(of(&notes, "connected").state, "connected");

    accepted(&s.cmd("call.hold", json!({"call_id": call_id, "cmd_id": "h"})).await);
    let notes = s.notes_until(|n| n.cmd_id.as_deref() == Some("h") && n.event.starts_with("command_")).await;
    assert_eq!(of(&notes, "command_succeeded").state, "held");
    assert_eq!(notes.iter().filter(|n| n.event == "leg_held").count(), 2);
    assert_eq!(refused(&s.cmd("call.hold", json!({"call_id": call_id})).await), CommandErrorCode::WrongState);
    accepted(&s.cmd("call.unhold", json!({"call_id": call_id, "cmd_id": "u"})).await);
    let notes = s.notes_until(|n| n.cmd_id.as_deref() == Some("u") && n.event.starts_with("command_")).await;
    assert_eq!(of(&notes, "command_succeeded").state, "connected");

    // The callee hangs up: the caller's leg is ended by callbus.
    let got = s.cmd("call.get", json!({"call_id": call_id})).await;
    let CommandReply::Data { result, .. } = got else { panic!("{got:?}") };
    let callee_key = result["call"]["bridged"]["callee"]["key"].as_str().expect("key").to_owned();
    let caller_key = result["call"]["bridged"]["caller"]["key"].as_str().expect("key").to_owned();
    s.sim.ua_remote_request(&callee_key, RemoteRequest::Bye).expect("bye");
    let notes = s.notes_until(|n| n.call_id == call_id && n.event == "ended").await;
    assert_eq!(of(&notes, "ended").data["by"], json!("callee"));
    wait_gone(&s, &caller_key).await;

    // Again; the caller hangs up.
    let (call_id, _) = click_to_dial(&mut s, "sip:alice@127.0.0.1", "sip:bob@127.0.0.1", "connected").await;
    let got = s.cmd("call.get", json!({"call_id": call_id})).await;
    let CommandReply::Data { result, .. } = got else { panic!("{got:?}") };
    let caller_key = result["call"]["bridged"]["caller"]["key"].as_str().expect("key").to_owned();
    let callee_key = result["call"]["bridged"]["callee"]["key"].as_str().expect("key").to_owned();
    s.sim.ua_remote_request(&caller_key, RemoteRequest::Bye).expect("bye");
    let notes = s.notes_until(|n| n.call_id == call_id && n.event == "ended").await;
    assert_eq!(of(&notes, "ended").data["by"], json!("caller"));
    wait_gone(&s, &callee_key).await;

    // Again; the app ends it (by one leg's key).
    let (call_id, _) = click_to_dial(&mut s, "sip:alice@127.0.0.1", "sip:bob@127.0.0.1", "connected").await;
    let got = s.cmd("call.get", json!({"call_id": call_id})).await;
    let CommandReply::Data { result, .. } = got else { panic!("{got:?}") };
    let callee_key = result["call"]["bridged"]["callee"]["key"].as_str().expect("key").to_owned();
    accepted(&s.cmd("call.end", json!({"key": callee_key, "cmd_id": "end"})).await);
    let notes = s.notes_until(|n| n.cmd_id.as_deref() == Some("end") && n.event == "command_succeeded").await;
    assert_eq!(of(&notes, "ended").data["by"], json!("local"));
    wait_gone(&s, &callee_key).await;
    finish(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn click_to_dial_failures_end_the_other_leg_cleanly() {
    let mut s = Stack::start().await;
    let (_, notes) = click_to_dial(&mut s, "sip:busy@127.0.0.1", "sip:bob@127.0.0.1", "command_failed").await;
    assert_eq!(of(&notes, "failed").data["leg"], json!("caller"));
    assert_eq!(of(&notes, "ended").data["reason"], json!("caller_busy"));
    assert!(!events(&notes).contains(&"connected"));

    let (call_id, notes) = click_to_dial(&mut s, "sip:alice@127.0.0.1", "sip:busy@127.0.0.1", "command_failed").await;
    assert_eq!(of(&notes, "failed").data["leg"], json!("callee"));
    assert_eq!(of(&notes, "ended").data["reason"], json!("callee_busy"));
    let caller_key = notes.iter().find(|n| n.event == "calling").and_then(|n| n.data["key"].as_str()).expect("key");
    wait_gone(&s, caller_key).await;
    let _ = call_id;

    let (_, notes) = click_to_dial(&mut s, "sip:alice@127.0.0.1", "sip:noanswer@127.0.0.1", "command_failed").await;
    assert_eq!(of(&notes, "ended").data["reason"], json!("callee_no_answer"));
    let (_, notes) = click_to_dial(&mut s, "sip:nobody@127.0.0.1", "sip:bob@127.0.0.1", "command_failed").await;
    assert_eq!(of(&notes, "ended").data["reason"], json!("caller_no_answer"));
    finish(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn click_to_dial_blind_transfer_replaces_a_leg() {
    let mut s = Stack::start().await;
    let (call_id, _) = click_to_dial(&mut s, "sip:alice@127.0.0.1", "sip:bob@127.0.0.1", "connected").await;
    let got = s.cmd("call.get", json!({"call_id": call_id})).await;
    let CommandReply::Data { result, .. } = got else { panic!("{got:?}") };
    let bob = result["call"]["bridged"]["callee"]["key"].as_str().expect("key").to_owned();
    let cmd = json!({"call_id": call_id, "leg": "caller", "destination": "sip:carol@127.0.0.1", "cmd_id": "x"});
    accepted(&s.cmd("call.transfer.blind", cmd).await);
    let notes = s.notes_until(|n| n.cmd_id.as_deref() == Some("x") && n.event.starts_with("command_")).await;
    assert_eq!(of(&notes, "command_succeeded").state, "connected");
    assert!(events(&notes).contains(&"transfer_answered") && events(&notes).contains(&"transferred"));
    wait_gone(&s, &bob).await;
    let got = s.cmd("call.get", json!({"call_id": call_id})).await;
    let CommandReply::Data { result, .. } = got else { panic!("{got:?}") };
    assert_eq!(result["call"]["bridged"]["callee"]["uri"], json!("sip:carol@127.0.0.1"));

    // A transfer to a busy destination fails; the call goes on.
    let cmd = json!({"call_id": call_id, "leg": "caller", "destination": "sip:busy@127.0.0.1", "cmd_id": "y"});
    accepted(&s.cmd("call.transfer.blind", cmd).await);
    let notes = s.notes_until(|n| n.cmd_id.as_deref() == Some("y") && n.event.starts_with("command_")).await;
    assert_eq!(of(&notes, "command_failed").state, "connected");
    assert_eq!(of(&notes, "transfer_failed").data["cause"], json!("busy"));
    finish(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_calls_beyond_the_live_call_limit_are_refused_with_the_reason() {
    let mut s = Stack::start().await;
    s.start_engine_with(|c| c.max_live_calls = 2).await;
    ua_call(&mut s, "sip:bob@127.0.0.1", json!({}), "answered").await;
    click_to_dial(&mut s, "sip:alice@127.0.0.1", "sip:carol@127.0.0.1", "connected").await;
    let reply = s.cmd("ua.start", json!({"to": "sip:dave@127.0.0.1", "from": "sip:a@127.0.0.1"})).await;
    let CommandReply::Refused { error, .. } = reply else { panic!("{reply:?}") };
    assert_eq!(error.code, CommandErrorCode::Unavailable);
    assert!(error.message.contains("max_live_calls"), "{}", error.message);
    // Calls OpenSIPS reports are still followed.
    s.sim.incoming_ua_call(UasScript::default()).expect("key");
    s.notes_until(|n| n.event == "incoming").await;
    finish(s).await;
}

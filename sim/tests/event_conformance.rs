//! Each captured call flow, driven through the simulator, raises the same events with the same
//! params in the same order as the real OpenSIPS 3.4.18 did (ids, tags and keys may differ).

mod common;

use std::time::Duration;

use common::{assert_scenario, fixture, Lab};
use opensips_sim::{CallScript, Outcome, RemoteRequest, SimConfig, UasScript};
use serde_json::{json, Value};

const QUIET: Duration = Duration::from_millis(150);

fn params(case: &str) -> Value {
    serde_json::from_slice::<Value>(&fixture(&format!("mi/{case}.request.json"))).expect("json")["params"].clone()
}

fn all(_: &Value) -> bool {
    true
}

#[tokio::test]
async fn proxied_call_answered_then_bye() {
    let lab = Lab::start().await;
    lab.sim.proxied_call(CallScript { hangup_after: Some(Duration::from_millis(10)), ..Default::default() });
    assert_scenario("proxied_call", &lab.collect(QUIET).await, all);
}

#[tokio::test]
async fn proxied_call_ended_by_dlg_end_dlg() {
    let mut lab = Lab::start().await;
    let callid = lab.sim.proxied_call(CallScript::default());
    let mut events = lab.expect(3).await;
    assert_eq!(lab.mi.call("dlg_end_dlg", json!({"dialog_id": callid})).await, json!("OK"));
    events.extend(lab.collect(QUIET).await);
    assert_scenario("dlg_end_dlg_call", &events, all);
}

#[tokio::test]
async fn dlg_end_dlg_accepts_the_dialog_id() {
    let mut lab = Lab::start().await;
    lab.sim.proxied_call(CallScript::default());
    let events = lab.expect(3).await;
    let dialog_id = events[0]["params"]["id"].as_str().expect("id").to_owned();
    assert_eq!(lab.mi.call("dlg_end_dlg", json!({"dialog_id": dialog_id})).await, json!("OK"));
    let end = lab.expect(1).await;
    assert_eq!(end[0]["params"]["new_state"], json!(5));
}

#[tokio::test]
async fn rejected_cancelled_and_unanswered_calls() {
    for (outcome, scenario) in [
        (Outcome::Rejected, "rejected_call"),
        (Outcome::Cancelled, "cancelled_call"),
        (Outcome::NoAnswer, "unanswered_no_uas"),
    ] {
        let lab = Lab::start().await;
        lab.sim.proxied_call(CallScript { outcome, ..Default::default() });
        assert_scenario(scenario, &lab.collect(QUIET).await, all);
    }
}

#[tokio::test]
async fn hold_and_unhold() {
    let mut lab = Lab::start().await;
    let callid = lab.sim.proxied_call(CallScript::default());
    lab.expect(3).await;
    assert_eq!(lab.mi.call("call_hold", json!({"callid": callid})).await, json!("OK"));
    assert_scenario("call_hold", &lab.collect(QUIET).await, all);
    let err = lab.mi.try_call("call_hold", json!({"callid": callid})).await.expect_err("already held");
    assert_eq!(
        err,
        serde_json::from_slice::<Value>(&fixture("mi/call_hold.already_on_hold.reply.json")).expect("json")["error"]
    );
    assert_eq!(lab.mi.call("call_unhold", json!({"callid": callid})).await, json!("OK"));
    assert_scenario("call_unhold", &lab.collect(QUIET).await, all);
    let err = lab.mi.try_call("call_unhold", json!({"callid": callid})).await.expect_err("not held");
    assert_eq!(err["message"], json!("No dialog legs on hold"));
}

#[tokio::test]
async fn callops_on_an_unconfirmed_dialog() {
    let mut lab = Lab::with(SimConfig {
        step: Duration::from_millis(2),
        ua_timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .await;
    let callid = lab.sim.proxied_call(CallScript { outcome: Outcome::NoAnswer, ..Default::default() });
    for (method, case) in
        [("call_hold", "call_hold"), ("call_unhold", "call_unhold"), ("call_transfer", "call_transfer")]
    {
        let mut p = params(&format!("{case}.dialog_not_confirmed"));
        p["callid"] = json!(callid);
        let err = lab.mi.try_call(method, p).await.expect_err("not confirmed");
        let captured: Value =
            serde_json::from_slice(&fixture(&format!("mi/{case}.dialog_not_confirmed.reply.json"))).expect("json");
        assert_eq!(err, captured["error"], "{method}");
    }
}

#[tokio::test]
async fn blind_transfer_then_cleanup() {
    let mut lab = Lab::start().await;
    let callid = lab
        .sim
        .proxied_call(CallScript { new_call_hangup_after: Some(Duration::from_millis(10)), ..Default::default() });
    lab.expect(3).await;
    let mut p = params("call_transfer.blind_callee");
    p["callid"] = json!(callid);
    assert_eq!(lab.mi.call("call_transfer", p.clone()).await, json!("Accepted"));
    let events = lab.collect(QUIET).await;
    assert_scenario("call_transfer_blind", &events, |e| {
        e["params"]["callid"] != json!(callid) || e["method"] != "E_DLG_STATE_CHANGED"
    });
    let err = lab.mi.try_call("call_transfer", p).await.expect_err("one transfer per call");
    assert_eq!(err["code"], json!(491));
    assert_eq!(lab.mi.call("dlg_end_dlg", json!({"dialog_id": callid})).await, json!("OK"));
    assert_scenario("callops_cleanup", &lab.collect(QUIET).await, all);
}

#[tokio::test]
async fn attended_transfer() {
    let mut lab = Lab::start().await;
    let a = lab
        .sim
        .proxied_call(CallScript { new_call_hangup_after: Some(Duration::from_millis(10)), ..Default::default() });
    let b = lab.sim.proxied_call(CallScript { to_uri: "sip:carol@127.0.0.1:5060".into(), ..Default::default() });
    lab.expect(6).await;
    let mut p = params("call_transfer.attended_caller_to_callee");
    p["callid"] = json!(a);
    p["transfer_callid"] = json!(b);
    assert_eq!(lab.mi.call("call_transfer", p).await, json!("Accepted"));
    let events = lab.collect(QUIET).await;
    assert_scenario("call_transfer_attended", &events, all);
    assert_eq!(
        events.iter().find(|e| e["method"] == "E_CALL_TRANSFER").map(|e| e["params"]["destination"].clone()),
        Some(json!("sip:carol@127.0.0.1:5060"))
    );
}

#[tokio::test]
async fn a_callee_that_refuses_reinvites_and_refer() {
    let mut lab = Lab::start().await;
    let callid =
        lab.sim.proxied_call(CallScript { callee_rejects_reinvite: true, declines_refer: true, ..Default::default() });
    let mut events = lab.expect(3).await;
    assert_eq!(lab.mi.call("call_hold", json!({"callid": callid})).await, json!("OK"));
    events.extend(lab.collect(QUIET).await);
    // 3.4 marks the refusing leg held anyway: hold again is refused, unhold re-INVITEs both.
    assert_eq!(lab.mi.try_call("call_hold", json!({"callid": callid})).await.expect_err("480")["code"], json!(480));
    assert_eq!(lab.mi.call("call_unhold", json!({"callid": callid})).await, json!("OK"));
    events.extend(lab.collect(QUIET).await);
    let mut p = params("call_transfer.refer_declined");
    p["callid"] = json!(callid);
    assert_eq!(lab.mi.call("call_transfer", p.clone()).await, json!("Accepted"));
    events.extend(lab.collect(QUIET).await);
    let captured: Value =
        serde_json::from_slice(&fixture("mi/call_transfer.after_declined_refer.reply.json")).expect("json");
    assert_eq!(lab.mi.try_call("call_transfer", p).await.expect_err("491"), captured["error"]);
    lab.mi.call("dlg_end_dlg", json!({"dialog_id": callid})).await;
    events.extend(lab.collect(QUIET).await);
    assert_scenario("callops_fail_sequence", &events, all);
}

#[tokio::test]
async fn ua_client_flows() {
    let mut lab = Lab::start().await;
    let key = lab.mi.call("ua_session_client_start", params("ua_session_client_start.ok")).await;
    assert_scenario("ua_client_start", &lab.collect(QUIET).await, all);
    let mut p = params("ua_session_update.reinvite");
    p["key"] = key.clone();
    assert_eq!(lab.mi.call("ua_session_update", p).await, json!("OK"));
    assert_scenario("ua_client_reinvite", &lab.collect(QUIET).await, all);
    let mut p = params("ua_session_update.info");
    p["key"] = key.clone();
    lab.mi.call("ua_session_update", p).await;
    assert_scenario("ua_client_info", &lab.collect(QUIET).await, all);
    for case in [
        "info_content_type_bare",
        "info_content_type_raw",
        "options_extra_headers_no_body",
        "options_extra_headers_empty_body",
    ] {
        let mut p = params(&format!("ua_session_update.{case}"));
        p["key"] = key.clone();
        lab.mi.call("ua_session_update", p).await;
        assert_scenario(case, &lab.collect(QUIET).await, all);
    }
    // Our own terminate raises nothing; the key is then gone.
    assert_eq!(lab.mi.call("ua_session_terminate", json!({"key": key})).await, json!("OK"));
    assert!(lab.collect(QUIET).await.is_empty());
    let err = lab.mi.try_call("ua_session_terminate", json!({"key": key})).await.expect_err("gone");
    assert_eq!(err["message"], json!("Failed to terminate session"));

    lab.mi.call("ua_session_client_start", params("ua_session_client_start.rejected_486")).await;
    assert_scenario("ua_client_rejected", &lab.collect(QUIET).await, all);
    lab.mi.call("ua_session_client_start", params("ua_session_client_start.no_peer")).await;
    assert_scenario("ua_client_no_peer", &lab.collect(QUIET).await, all);
    lab.mi.call("ua_session_client_start", params("ua_session_client_start.flags_hb")).await;
    assert_scenario("ua_client_flags_hb", &lab.collect(QUIET).await, all);
}

#[tokio::test]
async fn ua_client_event_can_precede_the_mi_reply() {
    let lab = Lab::with(SimConfig { uac_event_before_reply: true, ..Default::default() }).await;
    let mut mi = common::Mi::new(&lab.sim).await;
    let key = mi.call("ua_session_client_start", params("ua_session_client_start.burst_event_before_reply")).await;
    let events = lab.collect(QUIET).await;
    assert_eq!(events[0]["params"]["key"], key);
    assert_scenario("burst_event_before_reply", &events[..1], all);
}

#[tokio::test]
async fn ua_server_flows() {
    let mut lab = Lab::start().await;
    let reply = |key: &str, method: &str, code: i64, reason: &str| json!({"key": key, "method": method, "code": code, "reason": reason, "body": "v=0\r\n"});

    // Answered, caller hangs up.
    let key = lab.sim.incoming_ua_call(UasScript { subject: Some("lab".into()), ..Default::default() }).expect("NEW");
    lab.mi.call("ua_session_reply", json!({"key": key, "method": "INVITE", "code": 180, "reason": "Ringing"})).await;
    lab.mi.call("ua_session_reply", reply(&key, "INVITE", 200, "OK")).await;
    let mut events = lab.collect(QUIET).await;
    lab.sim.ua_remote_request(&key, RemoteRequest::Bye).expect("bye");
    events.extend(lab.collect(QUIET).await);
    assert_scenario("ua_server_call", &events, all);
    assert!(!lab.sim.has_ua_session(&key));

    // Rejected with 486: the ACK is reported and the session stays listed.
    let key = lab.sim.incoming_ua_call(UasScript::default()).expect("NEW");
    lab.mi
        .call("ua_session_reply", json!({"key": key, "method": "INVITE", "code": "486", "reason": "Busy Here"}))
        .await;
    assert_scenario("ua_server_reject", &lab.collect(QUIET).await, all);
    assert!(lab.sim.has_ua_session(&key));

    // Our re-INVITE and OPTIONS.
    let key = lab.sim.incoming_ua_call(UasScript { subject: Some("lab".into()), ..Default::default() }).expect("NEW");
    lab.mi.call("ua_session_reply", reply(&key, "INVITE", 200, "OK")).await;
    let mut events = lab.collect(QUIET).await;
    lab.mi.call("ua_session_update", json!({"key": key, "method": "INVITE", "body": "v=0\r\n"})).await;
    events.extend(lab.collect(QUIET).await);
    lab.mi.call("ua_session_update", json!({"key": key, "method": "OPTIONS"})).await;
    events.extend(lab.collect(QUIET).await);
    lab.sim.ua_remote_request(&key, RemoteRequest::Bye).expect("bye");
    events.extend(lab.collect(QUIET).await);
    assert_scenario("ua_server_updates", &events, all);

    // The remote side's re-INVITE and INFO.
    let key = lab.sim.incoming_ua_call(UasScript::default()).expect("NEW");
    lab.mi.call("ua_session_reply", reply(&key, "INVITE", 200, "OK")).await;
    let mut events = lab.collect(QUIET).await;
    lab.sim
        .ua_remote_request(&key, RemoteRequest::ReInvite(opensips_sim::sip::sdp("uac", 20308, Some("sendonly"))))
        .expect("re-INVITE");
    events.extend(lab.collect(QUIET).await);
    lab.mi.call("ua_session_reply", reply(&key, "INVITE", 200, "OK")).await;
    events.extend(lab.collect(QUIET).await);
    lab.sim.ua_remote_request(&key, RemoteRequest::Info("Signal=1\r\n".into())).expect("INFO");
    lab.mi.call("ua_session_reply", json!({"key": key, "method": "INFO", "code": 200, "reason": "OK"})).await;
    lab.sim.ua_remote_request(&key, RemoteRequest::Bye).expect("bye");
    events.extend(lab.collect(QUIET).await);
    assert_scenario("ua_server_remote_updates", &events, all);

    // No flags: body and headers null, no ACK event.
    let key = lab.sim.incoming_ua_call(UasScript { flags: String::new(), ..Default::default() }).expect("NEW");
    lab.mi.call("ua_session_reply", reply(&key, "INVITE", 200, "OK")).await;
    let mut events = lab.collect(QUIET).await;
    lab.sim.ua_remote_request(&key, RemoteRequest::Bye).expect("bye");
    events.extend(lab.collect(QUIET).await);
    assert_scenario("ua_server_noflags", &events, all);

    // Replies to nothing pending are refused as OpenSIPS refuses them.
    let err = lab.mi.try_call("ua_session_reply", reply(&key, "INVITE", 200, "OK")).await.expect_err("gone");
    assert_eq!(err["message"], json!("Failed to send reply"));
}

#[tokio::test]
async fn big_bodies_up_to_the_datagram_limit() {
    let mut lab = Lab::start().await;
    for (size, scenario) in [(30_000, "big_body_30000"), (52_000, "big_body_52000")] {
        let captured = common::scenario_events(scenario);
        let body_len = captured["E_UA_SESSION"][0]["params"]["body"].as_str().expect("body").len();
        assert!(body_len >= size);
        let key = lab
            .sim
            .incoming_ua_call(UasScript { body: Some(opensips_sim::sip::padded_sdp(body_len)), ..Default::default() })
            .expect("NEW fits");
        lab.mi
            .call("ua_session_reply", json!({"key": key, "method": "INVITE", "code": 486, "reason": "Busy Here"}))
            .await;
        assert_scenario(scenario, &lab.collect(QUIET).await, all);
    }
    // ~58 kB of SDP no longer fits a datagram: nothing is delivered and the session is gone.
    let none =
        lab.sim.incoming_ua_call(UasScript { body: Some(opensips_sim::sip::padded_sdp(66_000)), ..Default::default() });
    assert_eq!(none, None);
    assert!(lab.collect(QUIET).await.is_empty());
}

#[tokio::test]
async fn events_come_from_several_source_ports() {
    let lab = Lab::start().await;
    for _ in 0..4 {
        lab.sim.proxied_call(CallScript::default());
    }
    let mut ports = std::collections::BTreeSet::new();
    let mut buf = vec![0u8; 4096];
    for _ in 0..12 {
        let (_, from) = tokio::time::timeout(Duration::from_secs(2), lab.events.recv_from(&mut buf))
            .await
            .expect("event")
            .expect("recv");
        ports.insert(from.port());
    }
    assert!(ports.len() > 1, "events from {ports:?}");
}

//! The simulator answers MI datagrams exactly as the captured OpenSIPS 3.4.18 did.

mod common;

use std::time::Duration;

use common::{fixture, shape_diff, Lab, Mi};
use opensips_sim::{CallScript, Sim, SimConfig};
use serde_json::{json, Value};

/// Requests whose reply does not depend on calls: the sim must answer them byte for byte.
const STATELESS: &[&str] = &[
    "version.ok",
    "string_id.ok",
    "null_id.ok",
    "which.ok",
    "events_list.ok",
    "no_such_command.unknown_command",
    "missing_method.invalid_request",
    "no_jsonrpc_field.invalid_request",
    "invalid_json.parse_error",
    "dlg_end_dlg.bad_params",
    "dlg_end_dlg.missing_params",
    "dlg_end_dlg.unknown_dialog",
    "dlg_end_dlg.with_extra_hdrs_unknown",
    "dlg_list.empty",
    "dlg_list.positional_params_rejected",
    "event_subscribe.ok",
    "event_subscribe.no_expire_default",
    "event_subscribe.expire_as_string",
    "event_subscribe.unsubscribe_expire0",
    "event_subscribe.unknown_event",
    "event_subscribe.bad_socket",
    "call_hold.unknown_callid",
    "call_hold.missing_params",
    "call_transfer.unknown_callid",
    "concurrent.1",
    "concurrent.3",
    "concurrent.4",
    "ua_session_list.bad_key",
    "ua_session_list.unknown_key",
    "ua_session_update.unknown_key",
    "ua_session_terminate.unknown_key",
    "oversize_request.under_limit_65000",
];

#[tokio::test]
async fn stateless_replies_are_byte_identical_to_the_captures() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let mi = Mi::new(&sim).await;
    let mut wrong = Vec::new();
    for case in STATELESS {
        let request = fixture(&format!("mi/{case}.request.json"));
        let expected = fixture(&format!("mi/{case}.reply.json"));
        match mi.raw(&request, Duration::from_secs(2)).await {
            Some(reply) if reply == expected => {}
            Some(reply) => wrong.push(format!(
                "{case}:\n  ours:     {}\n  captured: {}",
                String::from_utf8_lossy(&reply),
                String::from_utf8_lossy(&expected)
            )),
            None => wrong.push(format!("{case}: no reply")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn requests_opensips_does_not_answer_get_no_reply() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let mi = Mi::new(&sim).await;
    // No id: no reply at all.
    assert_eq!(mi.raw(&fixture("mi/version.notification_no_id.request.json"), Duration::from_millis(200)).await, None);
    // Larger than the 65457-byte buffer: cut there, so no longer JSON (a running OpenSIPS
    // 3.4.18 answers so; the capture's 70 000-byte request could not be sent over UDP at all).
    let mut big = br#"{"jsonrpc":"2.0","method":"version","id":1,"params":{"pad":""#.to_vec();
    big.resize(65_480, b'x');
    big.extend_from_slice(br#""}}"#);
    assert_eq!(mi.raw(&big, Duration::from_millis(300)).await.as_deref(), Some(&b"400 Parse_error"[..]));
    // Still serving afterwards.
    assert!(mi.raw(&fixture("mi/version.ok.request.json"), Duration::from_secs(1)).await.is_some());
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_with_their_ids() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket.connect(sim.mi_addr()).await.expect("connect");
    for n in 1..=4 {
        socket.send(&fixture(&format!("mi/concurrent.{n}.request.json"))).await.expect("send");
    }
    let mut buf = vec![0u8; 65_536];
    for n in 1..=4 {
        let len =
            tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await.expect("reply").expect("recv");
        let ours: Value = serde_json::from_slice(&buf[..len]).expect("json");
        let captured: Value = serde_json::from_slice(&fixture(&format!("mi/concurrent.{n}.reply.json"))).expect("json");
        assert_eq!(ours["id"], captured["id"], "reply {n} carries its request's id");
        let mut diffs = Vec::new();
        shape_diff(&captured, &ours, "", &|_| true, &mut diffs);
        assert!(diffs.is_empty(), "concurrent.{n}: {diffs:?}");
    }
}

fn assert_shape(case: &str, ours: &Value) {
    let captured: Value = serde_json::from_slice(&fixture(&format!("mi/{case}.reply.json"))).expect("json");
    let mut diffs = Vec::new();
    shape_diff(&captured["result"], ours, "result", &|_| true, &mut diffs);
    assert!(diffs.is_empty(), "{case} differs in shape:\n{}", diffs.join("\n"));
}

#[tokio::test]
async fn stateful_replies_have_the_captured_shapes() {
    let mut lab = Lab::start().await;
    assert_shape("uptime.ok", &lab.mi.call("uptime", Value::Null).await);
    assert_shape("ps.ok", &lab.mi.call("ps", Value::Null).await);
    let subs = lab.mi.call("subscribers_list", Value::Null).await;
    assert_shape("subscribers_list.ok", &subs);
    assert_eq!(subs["Events"].as_array().map(Vec::len), Some(4));

    let callid = lab.sim.proxied_call(CallScript::default());
    lab.expect(3).await;
    assert_shape("dlg_list.one_call", &lab.mi.call("dlg_list", Value::Null).await);
    assert_shape("dlg_list.by_callid", &lab.mi.call("dlg_list", json!({"callid": callid})).await);
    assert_shape("get_statistics.dialog", &lab.mi.call("get_statistics", json!({"statistics": ["dialog:"]})).await);

    let key = lab
        .mi
        .call(
            "ua_session_client_start",
            serde_json::from_slice::<Value>(&fixture("mi/ua_session_client_start.ok.request.json")).expect("json")
                ["params"]
                .clone(),
        )
        .await;
    let key = key.as_str().expect("the result is the session key").to_owned();
    assert!(key.starts_with("B2B.") && key.split('.').count() == 5, "{key}");
    lab.expect(2).await;
    assert_shape("ua_session_list.one", &lab.mi.call("ua_session_list", json!({"key": key})).await);
    assert_shape("ua_session_list.all", &lab.mi.call("ua_session_list", Value::Null).await);

    let server = lab.sim.incoming_ua_call(Default::default()).expect("NEW raised");
    lab.expect(1).await;
    lab.mi
        .call(
            "ua_session_reply",
            json!({"key": server, "method": "INVITE", "code": 200, "reason": "OK", "body": "v=0\r\n"}),
        )
        .await;
    lab.expect(1).await;
    assert_shape("ua_session_list.server", &lab.mi.call("ua_session_list", json!({"key": server})).await);
}

#[tokio::test]
async fn dlg_list_pages_and_an_unpaged_list_of_120_calls_is_too_large() {
    let mut lab = Lab::start().await;
    for _ in 0..120 {
        lab.sim.proxied_call(CallScript::default());
    }
    lab.expect(360).await;
    let page = lab.mi.call("dlg_list", json!({"index": 0, "counter": 10})).await;
    assert_shape("dlg_list.paged_index0_counter10", &page);
    assert_eq!(page["count"], json!(120));
    assert_eq!(page["Dialogs"].as_array().map(Vec::len), Some(10));
    let reply = lab.mi.raw(&fixture("mi/dlg_list.too_large_120_calls.request.json"), Duration::from_secs(2)).await;
    assert_eq!(reply, Some(fixture("mi/dlg_list.too_large_120_calls.reply.json")), "500 Internal error, as captured");
}

#[tokio::test]
async fn subscriptions_lapse_renew_and_vanish_on_restart() {
    let mut lab = Lab::start().await;
    let listener = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let socket = format!("udp:{}", listener.local_addr().expect("addr"));
    lab.mi.call("event_subscribe", json!({"event": "E_DLG_STATE_CHANGED", "socket": socket, "expire": 1})).await;
    // Renewal replaces the entry, it does not add one.
    lab.mi.call("event_subscribe", json!({"event": "E_DLG_STATE_CHANGED", "socket": socket, "expire": "1"})).await;
    assert_eq!(lab.sim.live_subscriptions().iter().filter(|s| s.1 == socket).count(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    lab.sim.proxied_call(CallScript { outcome: opensips_sim::Outcome::Rejected, ..Default::default() });
    lab.expect(2).await; // the lab's own subscription still gets them
    let mut buf = [0u8; 2048];
    let lapsed = tokio::time::timeout(Duration::from_millis(100), listener.recv(&mut buf)).await;
    assert!(lapsed.is_err(), "a lapsed subscription receives nothing");

    let uptime_before = lab.mi.call("uptime", Value::Null).await;
    lab.sim.restart();
    assert!(lab.sim.live_subscriptions().is_empty(), "a restart forgets every subscription");
    let uptime_after = lab.mi.call("uptime", Value::Null).await;
    assert_eq!(uptime_after["Up time"], json!("0 [sec]"));
    assert!(uptime_before["Up time"].is_string());
}

#[tokio::test]
async fn silent_sim_answers_nothing_until_it_speaks_again() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let mi = Mi::new(&sim).await;
    sim.set_mi_silent(true);
    assert_eq!(mi.raw(&fixture("mi/version.ok.request.json"), Duration::from_millis(150)).await, None);
    sim.set_mi_silent(false);
    assert_eq!(
        mi.raw(&fixture("mi/version.ok.request.json"), Duration::from_secs(1)).await,
        Some(fixture("mi/version.ok.reply.json"))
    );
}

#[tokio::test]
async fn ua_client_start_follows_the_recipe_table() {
    let mut lab = Lab::start().await;
    let base =
        json!({"ruri": "sip:uas@127.0.0.1:5080", "to": "sip:uas@127.0.0.1:5080", "from": "sip:engine@127.0.0.1"});
    let mut odd = base.clone();
    for (k, v) in [("proxy", "sip:127.0.0.1"), ("body", "v=0\r\n"), ("flags", "a"), ("socket", "udp:127.0.0.1:5060")] {
        odd[k] = json!(v);
    }
    let err = lab.mi.try_call("ua_session_client_start", odd).await.expect_err("the one missing recipe");
    assert_eq!(err["data"], json!("Named parameters do not match"));
    let err = lab
        .mi
        .try_call("ua_session_reply", json!({"key": "B2B.1.2.3", "method": "INVITE", "code": 200}))
        .await
        .expect_err("reason is mandatory");
    assert_eq!(err["code"], json!(-32602));
    let err = lab
        .mi
        .try_call("ua_session_reply", json!({"key": "B2B.1.2.3", "method": "INVITE", "code": [200], "reason": "OK"}))
        .await
        .expect_err("wrong type");
    assert_eq!(err["data"], json!("Bad type for parameter 'code'"));
}

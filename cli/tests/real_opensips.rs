//! The real-OpenSIPS tier: every flow callbus promises, against a real OpenSIPS 3.4 running
//! `deploy/opensips/opensips.cfg`, with sipp phones, nats-server and `callbus up` as a user runs
//! them. Each flow is asserted on callbus's notifications and on what the phones saw, and ends
//! with `callbus replay check` of the whole log.
//!
//! Runs when `CALLBUS_OPENSIPS` names an OpenSIPS 3.4 install prefix (see
//! `scripts/build-opensips.sh` and docs/opensips.md); otherwise each flow prints
//! `real OpenSIPS tier: skipped (…)`. Run it alone with
//! `CALLBUS_OPENSIPS=/opt/opensips-3.4 cargo test -p callbus --test real_opensips`.

#[path = "real/conformance.rs"]
mod conformance;
mod real;

use std::time::Duration;

use real::{mi, Tier, NODE};
use serde_json::json;

const PHONE_LIMIT: Duration = Duration::from_secs(60);

/// The proxied call `caller` placed ended for `reason`, after exactly these notifications.
async fn assert_call_ended(t: &mut Tier, caller: &real::PhoneRun, reason: &str, events: &[&str]) {
    let sip = caller.header("Call-ID").expect("the caller's Call-ID");
    let ended = t.sip_event(&sip, "ended").await;
    assert_eq!(ended.data["reason"], json!(reason), "{sip}");
    assert_eq!(t.events_of(&ended.call_id), events, "{sip}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_call_answered_then_caller_hangs_up() {
    let Some(mut t) = Tier::start("proxied call answered").await else { return };
    let bob = t.callee("bob", "answer.xml", 300);
    let alice = t.caller("alice", &bob.uri("bob"), Some(1_000));
    let alice = alice.expect_ok(PHONE_LIMIT);
    let bob = bob.expect_ok(PHONE_LIMIT);
    assert_call_ended(&mut t, &alice, "hung_up", &["early", "answered", "confirmed", "ended"]).await;
    assert_eq!(alice.received_count("SIP/2.0 200"), 2, "200 to the INVITE and to the BYE: {:?}", alice.received);
    assert_eq!(bob.received_count("BYE "), 1);
    t.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_call_rejected_busy() {
    let Some(mut t) = Tier::start("proxied call rejected").await else { return };
    let bob = t.callee("bob", "reject.xml", 200);
    let alice = t.caller("alice", &bob.uri("bob"), None).expect_ok(PHONE_LIMIT);
    bob.expect_ok(PHONE_LIMIT);
    assert_eq!(alice.received_count("SIP/2.0 486"), 1, "{:?}", alice.received);
    assert_call_ended(&mut t, &alice, "not_answered", &["early", "ended"]).await;
    t.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_call_cancelled_while_ringing() {
    let Some(mut t) = Tier::start("proxied call cancelled").await else { return };
    let bob = t.callee("bob", "ring.xml", 0);
    let ruri = bob.uri("bob");
    let alice = t.phone("alice", "cancel.xml", &["-key", "ruri", &ruri, "-d", "500", real::SIP]).expect_ok(PHONE_LIMIT);
    let bob = bob.expect_ok(PHONE_LIMIT);
    assert_eq!(bob.received_count("CANCEL "), 1);
    assert_eq!(alice.received_count("SIP/2.0 487"), 1, "{:?}", alice.received);
    assert_call_ended(&mut t, &alice, "not_answered", &["early", "ended"]).await;
    t.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_call_to_nobody_times_out() {
    let Some(mut t) = Tier::start("proxied call unanswered").await else { return };
    // Nobody listens on this port: OpenSIPS's INVITE times out (tm fr_timeout 5 s) with a 408.
    let nobody = format!("sip:nobody@127.0.0.1:{}", real::free_udp_port());
    let alice = t.caller("alice", &nobody, None).expect_ok(PHONE_LIMIT);
    assert_eq!(alice.received_count("SIP/2.0 408"), 1, "{:?}", alice.received);
    assert_call_ended(&mut t, &alice, "no_answer", &["ended"]).await;
    t.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_call_held_resumed_and_ended_by_command() {
    let Some(mut t) = Tier::start("proxied hold, unhold, end").await else { return };
    let bob = t.callee("bob", "answer.xml", 100);
    let alice = t.caller("alice", &bob.uri("bob"), None);
    let confirmed = t.note("confirmed", |n| n.event == "confirmed").await;
    let call = confirmed.call_id.clone();

    t.accepted("call.hold", json!({"call_id": call, "cmd_id": "h1"})).await;
    t.note("hold succeeded", |n| n.event == "command_succeeded" && n.cmd_id.as_deref() == Some("h1")).await;
    let held: Vec<_> =
        t.seen.iter().filter(|n| n.call_id == call && n.event == "held").map(|n| n.data["leg"].clone()).collect();
    assert_eq!(held.len(), 2, "both legs held: {:?}", t.events_of(&call));

    t.accepted("call.unhold", json!({"sip_call_id": confirmed.sip_call_id, "cmd_id": "u1"})).await;
    t.note("unhold succeeded", |n| n.event == "command_succeeded" && n.cmd_id.as_deref() == Some("u1")).await;
    assert_eq!(t.seen.iter().filter(|n| n.call_id == call && n.event == "resumed").count(), 2);

    t.accepted("call.end", json!({"call_id": call, "cmd_id": "e1"})).await;
    let ended = t.event(&call, "ended").await;
    assert_eq!(ended.data["reason"], json!("ended_by_command"));
    let alice = alice.expect_ok(PHONE_LIMIT);
    let bob = bob.expect_ok(PHONE_LIMIT);
    // Each phone got the hold and the unhold re-INVITE, then the BYE.
    for (who, run) in [("alice", &alice), ("bob", &bob)] {
        assert_eq!(run.received_count("INVITE "), if who == "bob" { 3 } else { 2 }, "{who}: {:?}", run.received);
        assert_eq!(run.received_count("BYE "), 1, "{who}: {:?}", run.received);
    }
    // Hold puts the stream inactive; unhold restores it.
    let reinvites = alice.received_texts("INVITE ");
    assert!(reinvites[0].contains("a=inactive"), "hold re-INVITE: {}", reinvites[0]);
    assert!(!reinvites[1].contains("a=inactive"), "unhold re-INVITE: {}", reinvites[1]);
    t.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mi_over_nats_keeps_to_the_allow_list() {
    let Some(t) = Tier::start("MI over NATS with the allow-list").await else { return };
    let ask = |cmd: &str, body: &str| {
        let (client, subject) = (t.client.clone(), format!("opensips.{NODE}.mi.{cmd}"));
        let body = body.to_owned();
        async move {
            let reply = client.request(subject, body.into()).await.expect("the bridge answers");
            serde_json::from_slice::<serde_json::Value>(&reply.payload).expect("JSON")
        }
    };
    let version = ask("version", "").await;
    assert!(version["result"]["Server"].as_str().is_some_and(|s| s.contains("OpenSIPS (3.4")), "{version}");
    let dialogs = ask("dlg_list", "{}").await;
    assert_eq!(dialogs["result"]["Dialogs"], json!([]), "{dialogs}");
    // OpenSIPS's own error comes back as it is.
    let missing = ask("call_hold", "{}").await;
    assert_eq!(missing["error"]["code"], json!(-32602), "{missing}");
    // Not on the allow-list: refused by the bridge, never sent (OpenSIPS still runs).
    let refused = ask("kill", "{}").await;
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("allow")), "{refused}");
    assert!(mi("version", json!({}))["result"].is_object(), "OpenSIPS still answers");
    t.finish();
}

/// The URI of a REFER's Refer-To, without its angle brackets.
fn refer_to(refer: &str) -> String {
    let value = real::header(refer, "Refer-To").expect("a Refer-To header");
    value.trim_start_matches('<').split('>').next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_blind_transfer_to_a_real_transferee_that_answers() {
    let Some(mut t) = Tier::start("proxied blind transfer").await else { return };
    let bob = t.callee("bob", "answer.xml", 100);
    let carol = t.callee("carol", "answer.xml", 200);
    let alice = t.caller("alice", &bob.uri("bob"), None);
    let call = t.note("confirmed", |n| n.event == "confirmed").await.call_id;

    // Alice stays and is sent to Carol; Bob is let go.
    let carol_uri = carol.uri("carol");
    t.accepted(
        "call.transfer.blind",
        json!({"call_id": call, "leg": "caller", "destination": carol_uri, "cmd_id": "t1"}),
    )
    .await;
    let refer = t.phone_received(&alice, "REFER ").await;
    let target = refer_to(&refer);
    assert!(target.starts_with(&carol_uri) && target.contains(";osid="), "Refer-To: {target}");
    // Alice's phone places the new call the REFER asks for (sipp: a second phone of hers).
    let alice_again = t.caller("alice2", &target, Some(800));

    let transferred = t.event(&call, "transferred").await;
    assert_eq!(transferred.data["status"], json!("200 OK"));
    let ok =
        t.note("transfer succeeded", |n| n.event == "command_succeeded" && n.cmd_id.as_deref() == Some("t1")).await;
    assert_eq!(ok.data["verb"], json!("call.transfer.blind"), "the subject's verb");
    assert_eq!(t.event(&call, "ended").await.data["reason"], json!("transferred"));
    let new_sip = transferred.data["new_sip_call_id"].as_str().expect("new call").to_owned();
    // The new call is a proxied call of its own, and ends when Alice hangs up.
    assert_eq!(t.sip_event(&new_sip, "ended").await.data["reason"], json!("hung_up"));

    let alice = alice.expect_ok(PHONE_LIMIT);
    assert_eq!(alice.received_count("BYE "), 1, "the old call is ended: {:?}", alice.received);
    assert_eq!(bob.expect_ok(PHONE_LIMIT).received_count("BYE "), 1);
    alice_again.expect_ok(PHONE_LIMIT);
    let carol = carol.expect_ok(PHONE_LIMIT);
    assert!(carol.received_texts("INVITE ")[0].contains(&format!("Call-ID: {new_sip}")));
    t.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_attended_transfer_joins_two_calls() {
    let Some(mut t) = Tier::start("proxied attended transfer").await else { return };
    // Call A: alice → bob. Call B: dave → carol. Alice is joined with Carol, replacing B.
    let bob = t.callee("bob", "answer.xml", 100);
    let carol = t.phone("carol", "answer.xml", &["-d", "100", "-m", "2"]);
    let alice = t.caller("alice", &bob.uri("bob"), None);
    let a = t.note("A confirmed", |n| n.event == "confirmed").await;
    let dave = t.caller("dave", &carol.uri("carol"), None);
    let b = t.note("B confirmed", |n| n.event == "confirmed" && n.call_id != a.call_id).await;

    let body = json!({"call_id": a.call_id, "leg": "caller", "transfer_call_id": b.call_id, "transfer_leg": "callee", "cmd_id": "at1"});
    t.accepted("call.transfer.attended", body).await;
    let refer = t.phone_received(&alice, "REFER ").await;
    let target = refer_to(&refer);
    let b_sip = b.sip_call_id.clone().expect("B's Call-ID");
    assert!(target.contains("?Replaces="), "Refer-To: {target}");
    // The Replaces goes in a header of the new INVITE, as a phone does.
    let (uri, replaces) = target.split_once("?Replaces=").expect("Replaces in the Refer-To");
    let replaces = replaces.replace("%3B", ";").replace("%3D", "=").replace("%40", "@");
    assert!(replaces.starts_with(&b_sip), "Replaces names call B: {replaces}");
    let alice_again = t.phone(
        "alice2",
        "call_replaces.xml",
        &[
            "-key",
            "ruri",
            uri,
            "-key",
            "hangup",
            "yes",
            "-key",
            "decline_refer",
            "no",
            "-d",
            "800",
            "-key",
            "replaces",
            &replaces,
            real::SIP,
        ],
    );

    let transferred = t.event(&a.call_id, "transferred").await;
    assert_eq!(transferred.data["status"], json!("200 OK"));
    let ok = t
        .note("attended transfer succeeded", |n| n.event == "command_succeeded" && n.cmd_id.as_deref() == Some("at1"))
        .await;
    assert_eq!(ok.data["verb"], json!("call.transfer.attended"), "the subject's verb");
    assert_eq!(t.event(&a.call_id, "ended").await.data["reason"], json!("transferred"));
    alice.expect_ok(PHONE_LIMIT);
    bob.expect_ok(PHONE_LIMIT);
    // Carol's phone does not hang up B by itself (sipp); the app ends B.
    t.accepted("call.end", json!({"call_id": b.call_id})).await;
    t.event(&b.call_id, "ended").await;
    dave.expect_ok(PHONE_LIMIT);
    alice_again.expect_ok(PHONE_LIMIT);
    carol.expect_ok(PHONE_LIMIT);
    t.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_transfer_declined_by_the_transferee_is_reported_failed() {
    let Some(mut t) = Tier::start("proxied transfer, REFER declined").await else { return };
    let bob = t.callee("bob", "answer.xml", 100);
    let alice = t.caller_refer("alice", &bob.uri("bob"), None, true);
    let call = t.note("confirmed", |n| n.event == "confirmed").await.call_id;
    let body = json!({"call_id": call, "leg": "caller", "destination": "sip:carol@127.0.0.1:5999", "cmd_id": "t2"});
    t.accepted("call.transfer.blind", body).await;
    t.phone_received(&alice, "REFER ").await;
    // OpenSIPS 3.4 raises nothing for a declined REFER: callbus gives up after its REFER timeout.
    let failed = t.note("transfer failed", |n| n.event == "command_failed" && n.cmd_id.as_deref() == Some("t2")).await;
    assert!(t.events_of(&call).contains(&"transfer_failed".to_owned()), "{:?}", t.events_of(&call));
    assert!(failed.data["reason"].as_str().is_some_and(|r| !r.is_empty()), "{}", failed.data);
    // OpenSIPS allows one transfer attempt per call: a second one is refused, with the reason.
    let again = t
        .cmd(
            "call.transfer.blind",
            json!({"call_id": call, "leg": "caller", "destination": "sip:carol@127.0.0.1:5999"}),
        )
        .await;
    assert_eq!(again["error"]["code"], json!("wrong_state"), "{again}");
    // The call itself is still up and can be ended.
    t.accepted("call.end", json!({"call_id": call})).await;
    t.event(&call, "ended").await;
    assert_eq!(alice.expect_ok(PHONE_LIMIT).received_count("BYE "), 1);
    bob.expect_ok(PHONE_LIMIT);
    t.finish();
}

const OFFER: &str =
    "v=0\r\no=app 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";

/// `ua.start` from Alice to `to` with an SDP offer, as command `cmd_id`; the call's id.
async fn ua_start(t: &Tier, to: &str, cmd_id: &str) -> String {
    t.accepted("ua.start", json!({"to": to, "from": "sip:alice@127.0.0.1", "body": OFFER, "cmd_id": cmd_id})).await
}

/// Waits for the outcome of `cmd_id`: true when it succeeded (a failure is printed with its
/// reason and the call's events, for when a flow expected success).
async fn outcome(t: &mut Tier, cmd_id: &str) -> bool {
    let n = t
        .note(&format!("outcome of {cmd_id}"), |n| {
            n.cmd_id.as_deref() == Some(cmd_id) && matches!(n.event.as_str(), "command_succeeded" | "command_failed")
        })
        .await;
    if n.event == "command_failed" {
        eprintln!("{cmd_id} failed: {}; the call's events: {:?}", n.data, t.events_of(&n.call_id));
    }
    n.event == "command_succeeded"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ua_client_answered_with_info_and_reinvite_both_ways() {
    let Some(mut t) = Tier::start("UA client answered, INFO and re-INVITE both ways").await else { return };
    // Bob answers, then sends his own re-INVITE and INFO; the app answers them.
    let bob = t.phone("bob", "answer_then_update.xml", &["-d", "300"]);
    let start = json!({"to": bob.uri("bob"), "from": "Alice,sip:alice@127.0.0.1", "body": OFFER, "cmd_id": "s1"});
    let call = t.accepted("ua.start", start).await;
    assert!(outcome(&mut t, "s1").await, "answered");
    let answered = t.event(&call, "answered").await;
    assert!(
        answered.data["body"].as_str().is_some_and(|b| b.contains("m=audio")),
        "Bob's SDP answer: {}",
        answered.data
    );

    let request = t.note("Bob's re-INVITE", |n| n.call_id == call && n.event == "request").await;
    assert_eq!(request.data["method"], json!("INVITE"));
    assert!(request.data["body"].as_str().is_some_and(|b| b.contains("a=sendonly")));
    t.accepted("ua.answer", json!({"call_id": call, "code": 200, "body": OFFER, "cmd_id": "a1"})).await;
    assert!(outcome(&mut t, "a1").await);
    let info =
        t.note("Bob's INFO", |n| n.call_id == call && n.event == "request" && n.data["method"] == json!("INFO")).await;
    assert_eq!(info.data["content_type"], json!("application/dtmf-relay"), "{}", info.data);
    t.accepted("ua.answer", json!({"call_id": call, "code": 200, "method": "INFO", "cmd_id": "a2"})).await;
    assert!(outcome(&mut t, "a2").await);

    // The app's own re-INVITE and INFO.
    let reinvite = json!({"call_id": call, "method": "INVITE", "body": OFFER.replace("m=audio 4000", "m=audio 4002"), "cmd_id": "u1"});
    t.accepted("ua.update", reinvite).await;
    assert!(outcome(&mut t, "u1").await);
    let info = json!({"call_id": call, "method": "INFO", "body": "Signal=1\r\nDuration=100\r\n", "content_type": "application/dtmf-relay", "cmd_id": "u2"});
    t.accepted("ua.update", info).await;
    assert!(outcome(&mut t, "u2").await);
    t.accepted("ua.terminate", json!({"call_id": call, "cmd_id": "x1"})).await;
    assert_eq!(t.event(&call, "ended").await.data["by"], json!("local"));

    let bob = bob.expect_ok(PHONE_LIMIT);
    let invites = bob.received_texts("INVITE ");
    assert_eq!(invites.len(), 2, "the call and the app's re-INVITE: {:?}", bob.received);
    assert!(invites[1].contains("m=audio 4002"));
    let infos = bob.received_texts("INFO ");
    assert_eq!(infos.len(), 1);
    assert!(infos[0].contains("Content-Type: application/dtmf-relay") && infos[0].contains("Signal=1"), "{}", infos[0]);
    assert_eq!(bob.received_count("BYE "), 1);
    t.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ua_client_rejected_busy() {
    let Some(mut t) = Tier::start("UA client rejected").await else { return };
    let bob = t.callee("bob", "reject.xml", 200);
    let call = ua_start(&t, &bob.uri("bob"), "s1").await;
    assert!(!outcome(&mut t, "s1").await, "a busy callee fails the command");
    let rejected = t.event(&call, "rejected").await;
    assert_eq!((rejected.data["status"].clone(), rejected.data["cause"].clone()), (json!(486), json!("busy")));
    t.event(&call, "ended").await;
    assert_eq!(bob.expect_ok(PHONE_LIMIT).received_count("ACK "), 1);
    t.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ua_client_early_media_then_answered() {
    let Some(mut t) = Tier::start("UA client early media").await else { return };
    let bob = t.callee("bob", "early_media.xml", 300);
    let call = ua_start(&t, &bob.uri("bob"), "s1").await;
    let early = t.event(&call, "early").await;
    assert_eq!(early.data["status"], json!(183));
    assert!(early.data["body"].as_str().is_some_and(|b| b.contains("m=audio")), "early media SDP: {}", early.data);
    assert!(outcome(&mut t, "s1").await);
    t.accepted("ua.terminate", json!({"call_id": call})).await;
    t.event(&call, "ended").await;
    bob.expect_ok(PHONE_LIMIT);
    t.finish();
}

/// A phone calls `sip:app…@` through OpenSIPS, which hands it to callbus (`ua_session_server_init`).
async fn incoming(t: &mut Tier, talk_ms: Option<u64>) -> (real::Phone, String) {
    let alice = t.caller("alice", "sip:app-sales@127.0.0.1:5060", talk_ms);
    let incoming = t.note("incoming", |n| n.event == "incoming").await;
    assert!(
        incoming.data["body"].as_str().is_some_and(|b| b.contains("m=audio")),
        "the caller's offer: {}",
        incoming.data
    );
    assert!(incoming.data["from"].as_str().is_some_and(|f| f.contains("alice")), "{}", incoming.data);
    (alice, incoming.call_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ua_server_answered_by_the_app_then_caller_hangs_up() {
    let Some(mut t) = Tier::start("UA server answered").await else { return };
    let (alice, call) = incoming(&mut t, Some(800)).await;
    t.accepted("ua.answer", json!({"call_id": call, "code": 200, "body": OFFER, "cmd_id": "a1"})).await;
    assert!(outcome(&mut t, "a1").await);
    t.event(&call, "confirmed").await;
    let ended = t.event(&call, "ended").await;
    assert_eq!((ended.data["by"].clone(), ended.data["reason"].clone()), (json!("remote"), json!("hung_up")));
    let alice = alice.expect_ok(PHONE_LIMIT);
    let answer = alice.received_texts("SIP/2.0 200")[0];
    assert!(answer.contains("m=audio 4000"), "the app's SDP reached the caller: {answer}");
    t.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ua_server_rejected_by_the_app() {
    let Some(mut t) = Tier::start("UA server rejected").await else { return };
    let (alice, call) = incoming(&mut t, None).await;
    t.accepted("ua.answer", json!({"call_id": call, "code": 486, "cmd_id": "r1"})).await;
    t.event(&call, "ended").await;
    assert_eq!(alice.expect_ok(PHONE_LIMIT).received_count("SIP/2.0 486"), 1);
    t.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ua_server_app_too_slow_is_declined() {
    let Some(mut t) = Tier::start("UA server, app too slow").await else { return };
    let (alice, call) = incoming(&mut t, None).await;
    // Nobody answers: callbus declines with 480 after its offer timeout (30 s).
    let expired = t.event(&call, "offer_expired").await;
    assert!(expired.data["after_ms"].as_u64().is_some_and(|ms| ms >= 30_000), "{}", expired.data);
    t.event(&call, "ended").await;
    assert_eq!(alice.expect_ok(PHONE_LIMIT).received_count("SIP/2.0 480"), 1);
    t.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn click_to_dial_held_resumed_transferred_and_ended() {
    let Some(mut t) = Tier::start("click-to-dial hold, unhold, blind transfer, end").await else { return };
    let alice = t.callee("alice", "answer.xml", 200);
    let bob = t.callee("bob", "answer.xml", 300);
    let carol = t.callee("carol", "answer.xml", 200);
    let call =
        t.accepted("call.start", json!({"caller": alice.uri("alice"), "callee": bob.uri("bob"), "cmd_id": "c1"})).await;
    assert!(outcome(&mut t, "c1").await, "connected");
    t.event(&call, "connected").await;

    t.accepted("call.hold", json!({"call_id": call, "cmd_id": "h1"})).await;
    assert!(outcome(&mut t, "h1").await);
    t.event(&call, "held").await;
    t.accepted("call.unhold", json!({"call_id": call, "cmd_id": "u1"})).await;
    assert!(outcome(&mut t, "u1").await);
    t.event(&call, "resumed").await;

    // Alice stays; Bob is replaced by Carol.
    let body = json!({"call_id": call, "leg": "caller", "destination": carol.uri("carol"), "cmd_id": "t1"});
    t.accepted("call.transfer.blind", body).await;
    assert!(outcome(&mut t, "t1").await);
    t.event(&call, "transferred").await;
    let bob = bob.expect_ok(PHONE_LIMIT);
    assert_eq!(bob.received_count("BYE "), 1, "Bob is let go: {:?}", bob.received);

    t.accepted("call.end", json!({"call_id": call, "cmd_id": "e1"})).await;
    t.event(&call, "ended").await;
    let alice = alice.expect_ok(PHONE_LIMIT);
    let carol = carol.expect_ok(PHONE_LIMIT);
    // Alice: the call, the callee's offer, hold, unhold, Carol's offer; then the BYE.
    let invites = alice.received_texts("INVITE ");
    assert_eq!(invites.len(), 5, "{:?}", alice.received);
    assert!(invites[2].contains("a=inactive") && !invites[3].contains("a=inactive"));
    assert_eq!(alice.received_count("BYE "), 1);
    assert_eq!(carol.received_count("BYE "), 1);
    t.finish();
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_next(ws: &mut Ws) -> serde_json::Value {
    use futures::StreamExt;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(45), ws.next()).await.expect("a frame within 45 s");
        if let tokio_tungstenite::tungstenite::Message::Text(text) = frame.expect("open").expect("a frame") {
            return serde_json::from_str(text.as_str()).expect("a JSON frame");
        }
    }
}

/// Sends a Call API request and checks that it is answered `Started`.
async fn door_send(ws: &mut Ws, method: &str, params: serde_json::Value) {
    use futures::SinkExt;
    let frame = json!({"jsonrpc": "2.0", "id": method, "method": method, "params": params});
    ws.send(tokio_tungstenite::tungstenite::Message::text(frame.to_string())).await.expect("send");
    let answer = ws_next(ws).await;
    assert_eq!(answer["result"]["event"], json!("Started"), "{method}: {answer}");
}

/// The events of the running `method` up to `Ended`, with their data.
async fn door_events(ws: &mut Ws, method: &str) -> Vec<(String, serde_json::Value)> {
    let mut events = Vec::new();
    loop {
        let note = ws_next(ws).await;
        assert_eq!(note["method"], json!(method));
        let event = note["params"]["event"].as_str().expect("event").to_owned();
        events.push((event.clone(), note["params"]["data"].clone()));
        if event == "Ended" {
            return events;
        }
    }
}

/// A whole Call API command: its events up to `Ended` and the time from sending to `Ended`.
async fn door(ws: &mut Ws, method: &str, params: serde_json::Value) -> (Vec<(String, serde_json::Value)>, Duration) {
    let started = std::time::Instant::now();
    door_send(ws, method, params).await;
    let events = door_events(ws, method).await;
    (events, started.elapsed())
}

fn names(events: &[(String, serde_json::Value)]) -> Vec<&str> {
    events.iter().map(|(e, _)| e.as_str()).collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_api_door_drives_real_calls() {
    let Some(mut t) = Tier::start("Call API door").await else { return };
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/call-api", t.callapi_addr)).await.expect("the door answers");
    let bob = t.callee("bob", "answer.xml", 100);
    let carol = t.callee("carol", "answer.xml", 100);
    let alice = t.caller("alice", &bob.uri("bob"), None);
    let sip = t.note("confirmed", |n| n.event == "confirmed").await.sip_call_id.expect("Call-ID");

    let (events, _) = door(&mut ws, "CallHold", json!({"callid": sip})).await;
    assert_eq!(names(&events).iter().filter(|e| **e == "CallHoldSuccessful").count(), 2, "{events:?}");
    assert_eq!(names(&events)[0], "CallHolding");
    let (events, _) = door(&mut ws, "CallUnhold", json!({"callid": sip})).await;
    assert_eq!(names(&events).iter().filter(|e| **e == "CallUnholdSuccessful").count(), 2, "{events:?}");

    // One command at a time: the door against the same command over NATS (the door's own cost).
    let (mut through_door, mut over_nats) = (Vec::new(), Vec::new());
    for i in 0..6 {
        for method in ["CallHold", "CallUnhold"] {
            through_door.push(door(&mut ws, method, json!({"callid": sip})).await.1);
        }
        for verb in ["call.hold", "call.unhold"] {
            let started = std::time::Instant::now();
            let cmd_id = format!("{verb}-{i}");
            t.accepted(verb, json!({"sip_call_id": sip, "cmd_id": cmd_id})).await;
            assert!(outcome(&mut t, &cmd_id).await);
            over_nats.push(started.elapsed());
        }
    }
    through_door.sort();
    over_nats.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "RESULT|door hold/unhold to Ended, real OpenSIPS|p50 {:.2} ms|max {:.2} ms|NATS path p50 {:.2} ms|max {:.2} ms|door/NATS p50 {:.2}",
        ms(percentile(&through_door, 0.5)),
        ms(*through_door.last().expect("runs")),
        ms(percentile(&over_nats, 0.5)),
        ms(*over_nats.last().expect("runs")),
        ms(percentile(&through_door, 0.5)) / ms(percentile(&over_nats, 0.5))
    );

    // Blind transfer: Alice stays and calls Carol as the REFER asks; Bob is let go.
    door_send(&mut ws, "CallBlindTransfer", json!({"callid": sip, "leg": "caller", "destination": carol.uri("carol")}))
        .await;
    let target = refer_to(&t.phone_received(&alice, "REFER ").await);
    let alice_again = t.caller("alice2", &target, None);
    let events = door_events(&mut ws, "CallBlindTransfer").await;
    assert_eq!(names(&events), ["Transferring", "TransferStart", "TransferSuccessful", "Ended"], "{events:?}");
    let new_sip = events[1].1["callid"].as_str().expect("the new call's Call-ID").to_owned();
    alice.expect_ok(PHONE_LIMIT);
    bob.expect_ok(PHONE_LIMIT);
    t.sip_event(&new_sip, "confirmed").await;
    let (events, _) = door(&mut ws, "CallEnd", json!({"callid": new_sip})).await;
    assert_eq!(names(&events), ["Ended"], "{events:?}");
    alice_again.expect_ok(PHONE_LIMIT);
    carol.expect_ok(PHONE_LIMIT);

    // CallStart: click-to-dial between two phones, then CallEnd of it by the callee leg's key.
    let dave = t.callee("dave", "answer.xml", 100);
    let erin = t.callee("erin", "answer.xml", 100);
    let (dave_uri, erin_uri) = (dave.uri("dave"), erin.uri("erin"));
    let (events, _) = door(&mut ws, "CallStart", json!({"caller": dave_uri, "callee": erin_uri})).await;
    assert_eq!(names(&events).first(), Some(&"CallerAnswered"), "{events:?}");
    let answered = events.iter().find(|(e, _)| e == "CalleeAnswered").unwrap_or_else(|| panic!("{events:?}"));
    let key = answered.1["callid"].as_str().expect("the callee leg's key").to_owned();
    let (events, _) = door(&mut ws, "CallEnd", json!({"callid": key})).await;
    assert_eq!(names(&events), ["Ended"], "{events:?}");
    assert_eq!(dave.expect_ok(PHONE_LIMIT).received_count("BYE "), 1);
    assert_eq!(erin.expect_ok(PHONE_LIMIT).received_count("BYE "), 1);
    t.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_killed_with_live_calls_comes_back_and_reconciles() {
    let Some(mut t) = Tier::start("kill -9 of callbus up with live calls").await else { return };
    // Call A ends while callbus is down (Alice hangs up after 2 s); call B lives on.
    let bob = t.callee("bob", "answer.xml", 100);
    let carol = t.callee("carol", "answer.xml", 100);
    let alice = t.caller("alice", &bob.uri("bob"), Some(2_000));
    let a = t.note("A confirmed", |n| n.event == "confirmed").await;
    let dave = t.caller("dave", &carol.uri("carol"), None);
    let b = t.note("B confirmed", |n| n.event == "confirmed" && n.call_id != a.call_id).await;

    t.kill_up();
    alice.expect_ok(PHONE_LIMIT);
    bob.expect_ok(PHONE_LIMIT);
    t.start_up().await;

    // A: closed by the start-up reconciliation with OpenSIPS, with the reason said.
    let ended = t.event(&a.call_id, "ended").await;
    assert_eq!(ended.data["reason"], json!("ended_while_engine_away"));
    // B: recovered from the log and still controllable.
    let listed = t.cmd("call.list", json!({})).await;
    let live: Vec<&str> =
        listed["result"]["calls"].as_array().expect("calls").iter().filter_map(|c| c["call_id"].as_str()).collect();
    assert_eq!(live, [b.call_id.as_str()], "{listed}");
    t.accepted("call.hold", json!({"call_id": b.call_id, "cmd_id": "h-after"})).await;
    assert!(outcome(&mut t, "h-after").await);
    t.accepted("call.end", json!({"call_id": b.call_id})).await;
    t.event(&b.call_id, "ended").await;
    dave.expect_ok(PHONE_LIMIT);
    carol.expect_ok(PHONE_LIMIT);
    t.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opensips_restarted_under_live_calls() {
    let Some(mut t) = Tier::start("OpenSIPS restarted under live calls").await else { return };
    let bob = t.callee("bob", "answer.xml", 100);
    let carol = t.callee("carol", "answer.xml", 100);
    let _alice = t.caller("alice", &bob.uri("bob"), None);
    let a = t.note("A confirmed", |n| n.event == "confirmed").await;
    let _dave = t.caller("dave", &carol.uri("carol"), None);
    let b = t.note("B confirmed", |n| n.event == "confirmed" && n.call_id != a.call_id).await;

    // OpenSIPS forgets its dialogs and subscriptions; the phones are left talking to no one.
    t.opensips.restart();
    let back = std::time::Instant::now();
    t.wait_subscribed().await;
    let subscribed = back.elapsed();
    for call in [&a.call_id, &b.call_id] {
        t.event(call, "ended").await;
    }
    let ended = back.elapsed();
    println!(
        "RESULT|OpenSIPS restart, default settings|subscribed again after {:.1} s|lost calls ended after {:.1} s (goal 15 s)",
        subscribed.as_secs_f64(),
        ended.as_secs_f64()
    );
    // Calls after the restart work as before.
    let erin = t.callee("erin", "answer.xml", 100);
    let frank = t.caller("frank", &erin.uri("erin"), Some(500));
    let sip = frank.expect_ok(PHONE_LIMIT).header("Call-ID").expect("Call-ID");
    assert_eq!(t.sip_event(&sip, "ended").await.data["reason"], json!("hung_up"));
    erin.expect_ok(PHONE_LIMIT);
    t.finish();
}

//! The real-OpenSIPS tier: every flow callbus promises, against a real OpenSIPS 3.4 running
//! `deploy/opensips/opensips.cfg`, with sipp phones, nats-server and `callbus up` as a user runs
//! them. Each flow is asserted on callbus's notifications and on what the phones saw, and ends
//! with `callbus replay check` of the whole log.
//!
//! Runs when `CALLBUS_OPENSIPS` names an OpenSIPS 3.4 install prefix (see
//! `scripts/build-opensips.sh` and docs/opensips.md); otherwise each flow prints
//! `real OpenSIPS tier: skipped (…)`. Run it alone with
//! `CALLBUS_OPENSIPS=/opt/opensips-3.4 cargo test -p callbus --test real_opensips`.

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

/// A reply reduced to what must agree between OpenSIPS and the simulator: an error's code,
/// message and data exactly; a result's keys and value types (and its exact text when it is a
/// fixed word such as "OK"); a plain-text reply exactly; the id as echoed.
fn shape(reply: &Option<serde_json::Value>) -> serde_json::Value {
    fn types(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), types(v))).collect(),
            serde_json::Value::Array(items) => json!(items.first().map(types).into_iter().collect::<Vec<_>>()),
            serde_json::Value::String(_) => json!("string"),
            serde_json::Value::Number(_) => json!("number"),
            serde_json::Value::Bool(_) => json!("bool"),
            serde_json::Value::Null => json!("null"),
        }
    }
    match reply {
        None => json!("no reply"),
        Some(serde_json::Value::String(text)) => json!({ "plain text": text }),
        Some(reply) if reply.get("error").is_some() => json!({"error": reply["error"], "id": reply["id"]}),
        Some(reply) => {
            let result = match &reply["result"] {
                serde_json::Value::String(word) if ["OK", "Accepted"].contains(&word.as_str()) => json!(word),
                other => types(other),
            };
            json!({"result": result, "id": reply["id"]})
        }
    }
}

/// Every MI command callbus sends, and the ways a request can be wrong.
fn mi_table() -> Vec<(&'static str, Vec<u8>)> {
    let mut table: Vec<(&'static str, Vec<u8>)> = [
        ("version", r#"{"jsonrpc":"2.0","method":"version","id":1}"#),
        ("uptime", r#"{"jsonrpc":"2.0","method":"uptime","id":2}"#),
        ("which", r#"{"jsonrpc":"2.0","method":"which","id":3}"#),
        ("ps", r#"{"jsonrpc":"2.0","method":"ps","id":4}"#),
        ("events_list", r#"{"jsonrpc":"2.0","method":"events_list","id":5}"#),
        ("version with revision", r#"{"jsonrpc":"2.0","method":"version","params":{"revision":"x"},"id":12}"#),
        ("which of a command", r#"{"jsonrpc":"2.0","method":"which","params":{"command":"call_hold"},"id":13}"#),
        ("which of an unknown command", r#"{"jsonrpc":"2.0","method":"which","params":{"command":"nope"},"id":14}"#),
        ("uptime with a param", r#"{"jsonrpc":"2.0","method":"uptime","params":{"x":1},"id":15}"#),
        ("id a bool", r#"{"jsonrpc":"2.0","method":"version","id":true}"#),
        ("id an array", r#"{"jsonrpc":"2.0","method":"version","id":[1]}"#),
        ("id a fraction", r#"{"jsonrpc":"2.0","method":"version","id":1.5}"#),
        ("string id", r#"{"jsonrpc":"2.0","method":"version","id":"abc-1"}"#),
        ("null id", r#"{"jsonrpc":"2.0","method":"version","id":null}"#),
        ("no id", r#"{"jsonrpc":"2.0","method":"version"}"#),
        ("unknown method", r#"{"jsonrpc":"2.0","method":"no_such_cmd","id":6}"#),
        ("no method", r#"{"jsonrpc":"2.0","id":7}"#),
        ("no jsonrpc member", r#"{"method":"version","id":8}"#),
        ("jsonrpc 1.0", r#"{"jsonrpc":"1.0","method":"version","id":9}"#),
        ("method a number", r#"{"jsonrpc":"2.0","method":5,"id":10}"#),
        ("params a string", r#"{"jsonrpc":"2.0","method":"version","params":"x","id":11}"#),
        ("id an object", r#"{"jsonrpc":"2.0","method":"version","id":{"a":1}}"#),
        ("not JSON", r#"{"jsonrpc":"2.0","method":"which","id":"#),
        ("dlg_list", r#"{"jsonrpc":"2.0","method":"dlg_list","id":20}"#),
        ("dlg_list unknown callid", r#"{"jsonrpc":"2.0","method":"dlg_list","params":{"callid":"nope@x"},"id":21}"#),
        ("dlg_list paged", r#"{"jsonrpc":"2.0","method":"dlg_list","params":{"index":0,"counter":10},"id":22}"#),
        ("dlg_list positional", r#"{"jsonrpc":"2.0","method":"dlg_list","params":["x"],"id":23}"#),
        ("dlg_list counter not a number", r#"{"jsonrpc":"2.0","method":"dlg_list","params":{"index":0,"counter":"ten"},"id":24}"#),
        ("dlg_end_dlg unknown", r#"{"jsonrpc":"2.0","method":"dlg_end_dlg","params":{"dialog_id":"nope@x"},"id":30}"#),
        ("dlg_end_dlg missing", r#"{"jsonrpc":"2.0","method":"dlg_end_dlg","id":31}"#),
        ("dlg_end_dlg extra param", r#"{"jsonrpc":"2.0","method":"dlg_end_dlg","params":{"dialog_id":"x","foo":1},"id":32}"#),
        ("dlg_end_dlg misspelt", r#"{"jsonrpc":"2.0","method":"dlg_end_dlg","params":{"dialogid":"x"},"id":33}"#),
        ("dlg_end_dlg extra_hdrs", r#"{"jsonrpc":"2.0","method":"dlg_end_dlg","params":{"dialog_id":"nope@x","extra_hdrs":"X-A: 1\r\n"},"id":34}"#),
        ("call_hold unknown", r#"{"jsonrpc":"2.0","method":"call_hold","params":{"callid":"nope@x"},"id":40}"#),
        ("call_hold missing", r#"{"jsonrpc":"2.0","method":"call_hold","params":{},"id":41}"#),
        ("call_hold callid a number", r#"{"jsonrpc":"2.0","method":"call_hold","params":{"callid":5},"id":42}"#),
        ("call_hold extra param", r#"{"jsonrpc":"2.0","method":"call_hold","params":{"callid":"x","leg":"caller"},"id":43}"#),
        ("call_unhold unknown", r#"{"jsonrpc":"2.0","method":"call_unhold","params":{"callid":"nope@x"},"id":44}"#),
        ("call_transfer unknown", r#"{"jsonrpc":"2.0","method":"call_transfer","params":{"callid":"nope@x","leg":"callee","destination":"sip:a@b"},"id":50}"#),
        ("call_transfer bad leg", r#"{"jsonrpc":"2.0","method":"call_transfer","params":{"callid":"nope@x","leg":"nobody","destination":"sip:a@b"},"id":51}"#),
        ("call_transfer missing destination", r#"{"jsonrpc":"2.0","method":"call_transfer","params":{"callid":"nope@x","leg":"callee"},"id":52}"#),
        ("call_transfer attended unknown", r#"{"jsonrpc":"2.0","method":"call_transfer","params":{"callid":"a@x","leg":"caller","transfer_callid":"b@x","transfer_leg":"callee"},"id":53}"#),
        ("ua_session_list", r#"{"jsonrpc":"2.0","method":"ua_session_list","id":60}"#),
        ("ua_session_list bad key", r#"{"jsonrpc":"2.0","method":"ua_session_list","params":{"key":"nope"},"id":61}"#),
        ("ua_session_list unknown key", r#"{"jsonrpc":"2.0","method":"ua_session_list","params":{"key":"B2B.1.2.3.4"},"id":62}"#),
        ("ua_session_update unknown key", r#"{"jsonrpc":"2.0","method":"ua_session_update","params":{"key":"B2B.1.2.3.4","method":"INFO"},"id":63}"#),
        ("ua_session_update missing method", r#"{"jsonrpc":"2.0","method":"ua_session_update","params":{"key":"B2B.1.2.3.4"},"id":64}"#),
        ("ua_session_update bad method", r#"{"jsonrpc":"2.0","method":"ua_session_update","params":{"key":"B2B.1.2.3.4","method":"FROB"},"id":65}"#),
        ("ua_session_reply unknown key", r#"{"jsonrpc":"2.0","method":"ua_session_reply","params":{"key":"B2B.1.2.3.4","method":"INVITE","code":200,"reason":"OK"},"id":66}"#),
        ("ua_session_reply no reason", r#"{"jsonrpc":"2.0","method":"ua_session_reply","params":{"key":"B2B.1.2.3.4","method":"INVITE","code":200},"id":67}"#),
        ("ua_session_reply code not a number", r#"{"jsonrpc":"2.0","method":"ua_session_reply","params":{"key":"B2B.1.2.3.4","method":"INVITE","code":"two","reason":"OK"},"id":68}"#),
        ("ua_session_terminate unknown key", r#"{"jsonrpc":"2.0","method":"ua_session_terminate","params":{"key":"B2B.1.2.3.4"},"id":69}"#),
        ("ua_session_terminate missing key", r#"{"jsonrpc":"2.0","method":"ua_session_terminate","params":{},"id":70}"#),
        ("ua_session_client_start missing to", r#"{"jsonrpc":"2.0","method":"ua_session_client_start","params":{"ruri":"sip:a@127.0.0.1:5999","from":"sip:b@127.0.0.1"},"id":71}"#),
        ("event_subscribe unknown event", r#"{"jsonrpc":"2.0","method":"event_subscribe","params":{"event":"E_NOPE","socket":"udp:127.0.0.1:9199"},"id":80}"#),
        ("event_subscribe tcp socket", r#"{"jsonrpc":"2.0","method":"event_subscribe","params":{"event":"E_CALL_HOLD","socket":"tcp:127.0.0.1:9199"},"id":81}"#),
        ("event_subscribe negative expire", r#"{"jsonrpc":"2.0","method":"event_subscribe","params":{"event":"E_CALL_HOLD","socket":"udp:127.0.0.1:9199","expire":-5},"id":82}"#),
        ("event_subscribe missing socket", r#"{"jsonrpc":"2.0","method":"event_subscribe","params":{"event":"E_CALL_HOLD"},"id":83}"#),
        ("event_subscribe then unsubscribe", r#"{"jsonrpc":"2.0","method":"event_subscribe","params":{"event":"E_CALL_HOLD","socket":"udp:127.0.0.1:9199","expire":0},"id":84}"#),
        ("subscribers_list unknown event", r#"{"jsonrpc":"2.0","method":"subscribers_list","params":{"event":"E_NOPE"},"id":85}"#),
        ("get_statistics dialog", r#"{"jsonrpc":"2.0","method":"get_statistics","params":{"statistics":["dialog:"]},"id":86}"#),
    ]
    .into_iter()
    .map(|(name, request)| (name, request.as_bytes().to_vec()))
    .collect();
    // Oversized: one that fits OpenSIPS's 65457-byte buffer and one that does not.
    for (name, size) in [("request of 65000 bytes", 65_000), ("request of 65480 bytes", 65_480)] {
        let mut big = br#"{"jsonrpc":"2.0","method":"version","id":90,"params":{"pad":""#.to_vec();
        big.resize(size - 3, b'x');
        big.extend_from_slice(br#""}}"#);
        table.push((name, big));
    }
    table
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mi_replies_of_the_simulator_have_the_real_shapes() {
    let Some(t) = Tier::start("MI differential, real OpenSIPS against the simulator").await else { return };
    let sim = opensips_sim::Sim::start(opensips_sim::SimConfig::default()).await.expect("the simulator");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a socket");
    let ask_sim = |request: &[u8]| {
        socket.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        socket.send_to(request, sim.mi_addr()).expect("send to the simulator");
        let mut buf = vec![0u8; 65_536];
        socket.recv(&mut buf).ok().map(|n| {
            serde_json::from_slice(&buf[..n])
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&buf[..n]).into_owned()))
        })
    };
    let table = mi_table();
    let mut differ = Vec::new();
    for (name, request) in &table {
        let real = real::mi_raw(request, Duration::from_millis(500));
        let ours = ask_sim(request);
        if shape(&real) != shape(&ours) {
            differ.push(format!("{name}:\n  OpenSIPS:  {}\n  simulator: {}", shape(&real), shape(&ours)));
        }
    }
    let same = table.len() - differ.len();
    println!("RESULT|MI differential|{same}/{} MI replies identical in shape", table.len());
    assert!(
        differ.is_empty(),
        "{same}/{} MI replies identical in shape; these differ:\n{}",
        table.len(),
        differ.join("\n")
    );
    t.finish();
}

/// What must agree between an event raised by the real OpenSIPS and by the simulator: its name,
/// its params' names and value types in order, and the values that say what happened.
fn event_signature(datagram: &serde_json::Value) -> String {
    let params = datagram["params"].as_object().cloned().unwrap_or_default();
    let shape: Vec<String> = params
        .iter()
        .map(|(k, v)| {
            let kind = match v {
                serde_json::Value::String(_) => "str",
                serde_json::Value::Number(_) => "int",
                serde_json::Value::Null => "null",
                _ => "other",
            };
            format!("{k}:{kind}")
        })
        .collect();
    let said = |names: &[&str]| {
        names.iter().map(|n| params.get(*n).map(|v| v.to_string()).unwrap_or_default()).collect::<Vec<_>>().join("/")
    };
    let values = match datagram["method"].as_str().unwrap_or_default() {
        "E_DLG_STATE_CHANGED" => said(&["old_state", "new_state"]),
        "E_CALL_HOLD" => said(&["leg", "action", "state"]),
        "E_UA_SESSION" => said(&["event_type", "entity_type", "status", "method"]),
        _ => String::new(),
    };
    format!("{} {values} ({})", datagram["method"].as_str().unwrap_or("?"), shape.join(","))
}

/// The simulator with a subscriber socket for every event; the events raised until `quiet`
/// passes without one.
struct SimEvents {
    sim: opensips_sim::Sim,
    socket: tokio::net::UdpSocket,
}

impl SimEvents {
    async fn start() -> SimEvents {
        let sim = opensips_sim::Sim::start(opensips_sim::SimConfig::default()).await.expect("the simulator");
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let port = socket.local_addr().expect("addr").port();
        for event in ["E_DLG_STATE_CHANGED", "E_CALL_HOLD", "E_CALL_TRANSFER", "E_UA_SESSION"] {
            let reply = SimEvents::mi(
                &sim,
                "event_subscribe",
                json!({"event": event, "socket": format!("udp:127.0.0.1:{port}")}),
            )
            .await;
            assert_eq!(reply["result"], json!("OK"), "{reply}");
        }
        SimEvents { sim, socket }
    }

    async fn mi(sim: &opensips_sim::Sim, method: &str, params: serde_json::Value) -> serde_json::Value {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let request = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1});
        socket.send_to(request.to_string().as_bytes(), sim.mi_addr()).await.expect("send");
        let mut buf = vec![0u8; 65_536];
        let n =
            tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await.expect("MI reply").expect("recv");
        serde_json::from_slice(&buf[..n]).expect("JSON")
    }

    async fn until_quiet(&self, quiet: Duration) -> Vec<serde_json::Value> {
        let mut buf = vec![0u8; 65_536];
        let mut out = Vec::new();
        while let Ok(Ok(n)) = tokio::time::timeout(quiet, self.socket.recv(&mut buf)).await {
            out.push(serde_json::from_slice(&buf[..n]).expect("an event datagram"));
        }
        out
    }
}

/// The raw events callbus republished (`opensips.<node>.event.>`) whose `param` is `value`.
async fn real_events(
    sub: &mut async_nats::Subscriber,
    param: &str,
    value: &str,
    quiet: Duration,
) -> Vec<serde_json::Value> {
    use futures::StreamExt;
    let mut out = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(quiet, sub.next()).await {
        let datagram: serde_json::Value = serde_json::from_slice(&msg.payload).expect("an event datagram");
        if datagram["params"][param] == json!(value) {
            out.push(datagram);
        }
    }
    out
}

/// Signatures sorted: events of one call come from several OpenSIPS processes, in no fixed
/// order (docs/opensips.md §2), so the two sides are compared as multisets.
fn signatures(events: &[serde_json::Value]) -> Vec<String> {
    let mut all: Vec<String> = events.iter().map(event_signature).collect();
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_sequences_of_the_simulator_match_real_flows() {
    let Some(mut t) = Tier::start("event differential, real flows against the simulator").await else { return };
    let mut raw = t.client.subscribe(format!("opensips.{NODE}.event.>")).await.expect("subscribe");
    t.client.flush().await.expect("flush");
    let quiet = Duration::from_millis(1_500);
    let mut compared = Vec::new();

    // Proxied calls: answered then hung up, rejected, cancelled, nobody there.
    let scenarios: [(&str, opensips_sim::Outcome); 4] = [
        ("answered, caller hangs up", opensips_sim::Outcome::Answered),
        ("rejected", opensips_sim::Outcome::Rejected),
        ("cancelled", opensips_sim::Outcome::Cancelled),
        ("nobody answers", opensips_sim::Outcome::NoAnswer),
    ];
    for (name, outcome) in scenarios {
        let real_run = match outcome {
            opensips_sim::Outcome::Answered => {
                let bob = t.callee("bob", "answer.xml", 100);
                let run = t.caller("alice", &bob.uri("bob"), Some(300)).expect_ok(PHONE_LIMIT);
                bob.expect_ok(PHONE_LIMIT);
                run
            }
            opensips_sim::Outcome::Rejected => {
                let bob = t.callee("bob", "reject.xml", 100);
                let run = t.caller("alice", &bob.uri("bob"), None).expect_ok(PHONE_LIMIT);
                bob.expect_ok(PHONE_LIMIT);
                run
            }
            opensips_sim::Outcome::Cancelled => {
                let bob = t.callee("bob", "ring.xml", 0);
                let ruri = bob.uri("bob");
                let run = t
                    .phone("alice", "cancel.xml", &["-key", "ruri", &ruri, "-d", "300", real::SIP])
                    .expect_ok(PHONE_LIMIT);
                bob.expect_ok(PHONE_LIMIT);
                run
            }
            opensips_sim::Outcome::NoAnswer => {
                let nobody = format!("sip:nobody@127.0.0.1:{}", real::free_udp_port());
                t.caller("alice", &nobody, None).expect_ok(PHONE_LIMIT)
            }
        };
        let sip = real_run.header("Call-ID").expect("Call-ID");
        let real = real_events(&mut raw, "callid", &sip, quiet).await;
        let sim = SimEvents::start().await;
        let script =
            opensips_sim::CallScript { outcome, hangup_after: Some(Duration::from_millis(300)), ..Default::default() };
        let sim_sip = sim.sim.proxied_call(script);
        let ours: Vec<_> =
            sim.until_quiet(quiet).await.into_iter().filter(|e| e["params"]["callid"] == json!(sim_sip)).collect();
        compared.push((format!("proxied call {name}"), signatures(&real), signatures(&ours)));
    }

    // Hold and unhold of a confirmed call, through MI.
    let bob = t.callee("bob", "answer.xml", 100);
    let alice = t.caller("alice", &bob.uri("bob"), None);
    t.phone_received(&alice, "SIP/2.0 200").await;
    let sip = alice.so_far().header("Call-ID").expect("Call-ID");
    t.sip_event(&sip, "confirmed").await;
    real_events(&mut raw, "callid", &sip, Duration::from_millis(300)).await; // the set-up's
    for method in ["call_hold", "call_unhold"] {
        let reply = t
            .client
            .request(format!("opensips.{NODE}.mi.{method}"), json!({"callid": sip}).to_string().into())
            .await
            .expect("MI");
        assert!(String::from_utf8_lossy(&reply.payload).contains("OK"), "{method}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let real: Vec<_> = real_events(&mut raw, "callid", &sip, quiet)
        .await
        .into_iter()
        .filter(|e| e["method"] == json!("E_CALL_HOLD"))
        .collect();
    let sim = SimEvents::start().await;
    let sim_sip = sim.sim.proxied_call(opensips_sim::CallScript::default());
    sim.until_quiet(Duration::from_millis(500)).await;
    for method in ["call_hold", "call_unhold"] {
        assert_eq!(SimEvents::mi(&sim.sim, method, json!({"callid": sim_sip})).await["result"], json!("OK"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let ours: Vec<_> =
        sim.until_quiet(quiet).await.into_iter().filter(|e| e["method"] == json!("E_CALL_HOLD")).collect();
    compared.push(("hold and unhold".into(), signatures(&real), signatures(&ours)));
    t.accepted("call.end", json!({"sip_call_id": sip})).await;
    alice.expect_ok(PHONE_LIMIT);
    bob.expect_ok(PHONE_LIMIT);

    // A UA client session answered, then ended by us; and one refused busy.
    for (name, scenario, peer) in
        [("answered", "answer.xml", opensips_sim::UaPeer::Answer), ("busy", "reject.xml", opensips_sim::UaPeer::Busy)]
    {
        let bob = t.callee("bob", scenario, 100);
        let call =
            t.accepted("ua.start", json!({"to": bob.uri("bob"), "from": "sip:alice@127.0.0.1", "body": OFFER})).await;
        let key = t.event(&call, "calling").await.data["key"].as_str().expect("key").to_owned();
        let real = real_events(&mut raw, "key", &key, quiet).await;
        if name == "answered" {
            t.accepted("ua.terminate", json!({"call_id": call})).await;
        }
        bob.expect_ok(PHONE_LIMIT);
        let sim = SimEvents::start().await;
        let ruri = "sip:bob@127.0.0.1:5080";
        sim.sim.set_ua_peer(ruri, peer);
        let params = json!({"ruri": ruri, "to": ruri, "from": "sip:alice@127.0.0.1", "body": OFFER, "flags": "rhba"});
        let sim_key = SimEvents::mi(&sim.sim, "ua_session_client_start", params).await["result"]
            .as_str()
            .expect("key")
            .to_owned();
        let ours: Vec<_> =
            sim.until_quiet(quiet).await.into_iter().filter(|e| e["params"]["key"] == json!(sim_key)).collect();
        compared.push((format!("UA client {name}"), signatures(&real), signatures(&ours)));
    }

    for (name, real, _) in &compared {
        assert!(!real.is_empty(), "{name}: no event seen from the real OpenSIPS");
        eprintln!("{name}: {real:?}");
    }
    let same = compared.iter().filter(|(_, real, ours)| real == ours).count();
    println!("RESULT|event differential|{same}/{} flows raise the same events on the simulator", compared.len());
    let differ: Vec<String> = compared
        .iter()
        .filter(|(_, real, ours)| real != ours)
        .map(|(name, real, ours)| format!("{name}:\n  OpenSIPS:  {real:#?}\n  simulator: {ours:#?}"))
        .collect();
    assert!(differ.is_empty(), "{same}/{} flows alike; these differ:\n{}", compared.len(), differ.join("\n"));
    t.finish();
}

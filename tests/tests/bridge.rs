//! The bridge end to end: a real nats-server (from the harness), the simulator as OpenSIPS.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use callbus_bridge::{Bridge, BridgeConfig};
use callbus_schemas::bus::{BridgeErrorKind, BridgeStatus, MiBusReply, HEADER_MSG_ID, HEADER_NODE, HEADER_SEQ};
use callbus_tests::NatsServer;
use futures::StreamExt;
use opensips_sim::{CallScript, Sim, SimConfig, UasScript};
use serde_json::{json, Value};
use tokio::net::UdpSocket;

const NODE: &str = "n1";

async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .reconnect_delay_callback(|attempt| Duration::from_millis(50 * attempt.min(10) as u64))
        .connect(url)
        .await
        .expect("connect to nats")
}

fn config(sim: &Sim) -> BridgeConfig {
    BridgeConfig {
        node: NODE.into(),
        mi: sim.mi_addr(),
        events_listen: "127.0.0.1:0".parse().expect("addr"),
        mi_timeout: Duration::from_millis(500),
        subscribe_expire: Duration::from_secs(3),
        health_interval: Duration::from_millis(200),
        status_interval: Duration::from_millis(200),
        ..BridgeConfig::default()
    }
}

async fn sim() -> Sim {
    Sim::start(SimConfig {
        step: Duration::from_millis(2),
        ua_timeout: Duration::from_millis(50),
        ..SimConfig::default()
    })
    .await
    .expect("sim")
}

/// Waits until the sim has a live subscription for each default event to the bridge.
async fn wait_subscribed(sim: &Sim, bridge: &Bridge, within: Duration) -> Duration {
    let socket = format!("udp:{}", bridge.events_addr());
    let start = Instant::now();
    loop {
        let live = sim.live_subscriptions().into_iter().filter(|(_, s, _)| *s == socket).count();
        if live == 4 {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "subscriptions not in place after {within:?} ({live}/4)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn mi(client: &async_nats::Client, command: &str, body: &[u8]) -> MiBusReply {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(format!("opensips.{NODE}.mi.{command}"), Bytes::copy_from_slice(body)),
    )
    .await
    .expect("the bridge answers, never hangs")
    .expect("request");
    serde_json::from_slice(&reply.payload).expect("the reply is an MiBusReply")
}

fn bridge_code(reply: &MiBusReply) -> Option<BridgeErrorKind> {
    match reply {
        MiBusReply::Error { error } => BridgeErrorKind::from_code(error.code),
        MiBusReply::Result { .. } => None,
    }
}

#[tokio::test]
async fn every_event_scenario_arrives_on_its_subject_byte_for_byte() {
    let nats = NatsServer::start();
    let client = connect(&nats.url()).await;
    let sim = sim().await;
    let bridge = Bridge::start(config(&sim), client.clone()).await.expect("bridge");
    let mut on_bus = client.subscribe(format!("opensips.{NODE}.event.>")).await.expect("sub");
    client.flush().await.expect("flush");
    wait_subscribed(&sim, &bridge, Duration::from_secs(3)).await;

    // A second subscriber straight on the sim sees what OpenSIPS sent.
    let direct = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let socket = format!("udp:{}", direct.local_addr().expect("addr"));
    for e in callbus_schemas::event::DEFAULT_EVENTS {
        let body = json!({"event": e, "socket": socket, "expire": 60}).to_string();
        assert!(matches!(mi(&client, "version", b"").await, MiBusReply::Result { .. }));
        let reply = sim_mi(&sim, "event_subscribe", &body).await;
        assert_eq!(reply["result"], json!("OK"));
    }

    let callid =
        sim.proxied_call(CallScript { new_call_hangup_after: Some(Duration::from_millis(5)), ..Default::default() });
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(matches!(
        mi(&client, "call_hold", json!({"callid": callid}).to_string().as_bytes()).await,
        MiBusReply::Result { .. }
    ));
    tokio::time::sleep(Duration::from_millis(30)).await;
    let transfer = json!({"callid": callid, "leg": "callee", "destination": "sip:transfer@127.0.0.1:5060"});
    assert!(matches!(mi(&client, "call_transfer", transfer.to_string().as_bytes()).await, MiBusReply::Result { .. }));
    let start = json!({"ruri": "sip:uas@127.0.0.1:5080", "to": "sip:uas@127.0.0.1:5080", "from": "sip:engine@127.0.0.1", "flags": "arhb"});
    assert!(matches!(
        mi(&client, "ua_session_client_start", start.to_string().as_bytes()).await,
        MiBusReply::Result { .. }
    ));
    sim.incoming_ua_call(UasScript::default()).expect("NEW");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut sent = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), direct.recv(&mut buf)).await {
        sent.push(buf[..n].to_vec());
    }
    assert!(sent.len() >= 15, "the scenarios raised {} events", sent.len());
    let mut last_seq = 0u64;
    for (i, bytes) in sent.iter().enumerate() {
        let msg = tokio::time::timeout(Duration::from_secs(2), on_bus.next()).await.expect("bridged").expect("open");
        assert_eq!(&msg.payload[..], &bytes[..], "event {i} differs from the datagram OpenSIPS sent");
        let name = callbus_schemas::event::event_name(bytes).expect("valid");
        assert_eq!(msg.subject.as_str(), format!("opensips.{NODE}.event.{name}"));
        let headers = msg.headers.expect("headers");
        assert_eq!(headers.get(HEADER_NODE).map(|v| v.as_str()), Some(NODE));
        let seq: u64 = headers.get(HEADER_SEQ).expect("seq").as_str().parse().expect("number");
        assert!(seq > last_seq, "sequence grows");
        last_seq = seq;
        assert!(headers.get(HEADER_MSG_ID).expect("msg id").as_str().ends_with(&format!(".{seq}")));
    }
    bridge.shutdown().await;
}

/// Talks to the sim's MI directly (outside the bridge).
async fn sim_mi(sim: &Sim, method: &str, params: &str) -> Value {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let req = format!(r#"{{"jsonrpc":"2.0","method":"{method}","id":1,"params":{params}}}"#);
    socket.send_to(req.as_bytes(), sim.mi_addr()).await.expect("send");
    let mut buf = vec![0u8; 65_536];
    let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await.expect("reply").expect("recv");
    serde_json::from_slice(&buf[..n]).expect("json")
}

#[tokio::test]
async fn mi_results_errors_and_every_bridge_failure_come_back_typed() {
    let nats = NatsServer::start();
    let client = connect(&nats.url()).await;
    let sim = sim().await;
    let bridge = Bridge::start(config(&sim), client.clone()).await.expect("bridge");

    match mi(&client, "version", b"").await {
        MiBusReply::Result { result } => assert_eq!(result, json!({"Server": opensips_sim::SERVER_VERSION})),
        other => panic!("{other:?}"),
    }
    match mi(&client, "dlg_end_dlg", br#"{"dialog_id":"nope"}"#).await {
        MiBusReply::Error { error } => {
            assert_eq!((error.code, error.message.as_str()), (404, "Requested Dialog not found"))
        }
        other => panic!("{other:?}"),
    }
    match mi(&client, "dlg_list", br#"["x"]"#).await {
        MiBusReply::Error { error } => assert_eq!(error.data, Some(json!("Command only supports named parameters"))),
        other => panic!("{other:?}"),
    }
    assert_eq!(bridge_code(&mi(&client, "kill", b"").await), Some(BridgeErrorKind::NotAllowed));
    assert_eq!(bridge_code(&mi(&client, "event_subscribe", b"{}").await), Some(BridgeErrorKind::NotAllowed));
    assert_eq!(bridge_code(&mi(&client, "version", b"\"text\"").await), Some(BridgeErrorKind::BadBody));
    assert_eq!(bridge_code(&mi(&client, "version", b"{").await), Some(BridgeErrorKind::BadBody));
    assert_eq!(bridge_code(&mi(&client, "version", b"\xff\xfe").await), Some(BridgeErrorKind::BadBody));
    let huge = json!({"callid": "x".repeat(70_000)}).to_string();
    assert_eq!(bridge_code(&mi(&client, "call_hold", huge.as_bytes()).await), Some(BridgeErrorKind::TooLarge));

    // A reply too large for a datagram: OpenSIPS answers plain text.
    for _ in 0..120 {
        sim.proxied_call(CallScript::default());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = mi(&client, "dlg_list", b"").await;
    assert_eq!(bridge_code(&reply), Some(BridgeErrorKind::PlainTextReply), "{reply:?}");
    assert!(matches!(mi(&client, "dlg_list", br#"{"index":0,"counter":10}"#).await, MiBusReply::Result { .. }));

    // OpenSIPS silent: a timeout, not a hang.
    sim.set_mi_silent(true);
    let started = Instant::now();
    assert_eq!(bridge_code(&mi(&client, "version", b"").await), Some(BridgeErrorKind::Timeout));
    assert!(started.elapsed() >= Duration::from_millis(400));
    sim.set_mi_silent(false);
    assert!(matches!(mi(&client, "version", b"").await, MiBusReply::Result { .. }));

    let status = bridge.status();
    assert!(status.counters.mi_timeouts >= 1 && status.counters.mi_refused >= 5 && status.counters.mi_errors >= 3);
    bridge.shutdown().await;
}

#[tokio::test]
async fn nothing_listening_at_the_mi_address_is_reported_as_unreachable() {
    let nats = NatsServer::start();
    let client = connect(&nats.url()).await;
    let sim = sim().await;
    let dead: SocketAddr = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr")
    };
    let bridge = Bridge::start(BridgeConfig { mi: dead, ..config(&sim) }, client.clone()).await.expect("bridge");
    let reply = mi(&client, "version", b"").await;
    assert!(matches!(bridge_code(&reply), Some(BridgeErrorKind::Unreachable | BridgeErrorKind::Timeout)), "{reply:?}");
    bridge.shutdown().await;
}

#[tokio::test]
async fn five_hundred_concurrent_requests_never_cross_ids() {
    let nats = NatsServer::start();
    let client = connect(&nats.url()).await;
    let sim = sim().await;
    let bridge = Bridge::start(BridgeConfig { mi_timeout: Duration::from_secs(5), ..config(&sim) }, client.clone())
        .await
        .expect("bridge");
    let calls: Vec<String> = (0..100).map(|_| sim.proxied_call(CallScript::default())).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let requests = (0..500).map(|i| {
        let client = client.clone();
        let callid = calls[i % calls.len()].clone();
        async move {
            let reply = mi(&client, "dlg_list", json!({"callid": callid}).to_string().as_bytes()).await;
            (callid, reply)
        }
    });
    let replies = futures::future::join_all(requests).await;
    for (callid, reply) in replies {
        match reply {
            MiBusReply::Result { result } => assert_eq!(result["Dialog"]["callid"], json!(callid), "reply crossed"),
            other => panic!("{other:?}"),
        }
    }
    bridge.shutdown().await;
}

#[tokio::test]
async fn subscriptions_are_renewed_before_expiry_and_restored_after_a_restart() {
    let nats = NatsServer::start();
    let client = connect(&nats.url()).await;
    let sim = sim().await;
    let bridge = Bridge::start(config(&sim), client.clone()).await.expect("bridge");
    wait_subscribed(&sim, &bridge, Duration::from_secs(3)).await;
    // Expiry is 3 s: without renewal every subscription would lapse within this window.
    let socket = format!("udp:{}", bridge.events_addr());
    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        let live = sim.live_subscriptions().into_iter().filter(|(_, s, _)| *s == socket).count();
        assert_eq!(live, 4, "a subscription lapsed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Restart: OpenSIPS forgets them; the bridge notices and subscribes again at once, well
    // within one renewal period (1 s).
    sim.restart();
    let took = wait_subscribed(&sim, &bridge, Duration::from_millis(1000)).await;
    println!("subscriptions back {took:?} after the restart");
    assert!(bridge.status().counters.opensips_restarts >= 1);
    // A clean shutdown unsubscribes.
    bridge.shutdown().await;
    let live = sim.live_subscriptions().into_iter().filter(|(_, s, _)| *s == socket).count();
    assert_eq!(live, 0, "shutdown unsubscribes with expire 0");
}

fn numbered_event(n: usize) -> Vec<u8> {
    format!(r#"{{"jsonrpc":"2.0","method":"E_CALL_HOLD","params":{{"callid":"c-{n}","leg":"caller","action":"hold","state":"start"}}}}"#)
        .into_bytes()
}

async fn send_numbered(to: SocketAddr, range: std::ops::Range<usize>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    for n in range {
        socket.send_to(&numbered_event(n), to).await.expect("send");
        if n % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[tokio::test]
async fn nats_killed_and_restarted_mid_stream_loses_nothing_and_keeps_order() {
    let mut nats = NatsServer::start_jetstream();
    let client = connect(&nats.url()).await;
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: "OPENSIPS_EVENTS".into(),
        subjects: vec!["opensips.*.event.>".into()],
        storage: jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("stream");
    let sim = sim().await;
    let bridge = Bridge::start(config(&sim), client.clone()).await.expect("bridge");
    let to = bridge.events_addr();
    let stored = |js: jetstream::Context| async move {
        js.get_stream("OPENSIPS_EVENTS").await.ok()?.info().await.ok().map(|i| i.state.messages)
    };

    send_numbered(to, 0..200).await;
    wait_for(|| stored(js.clone()), 200).await;
    nats.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_numbered(to, 200..500).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(bridge.status().buffered > 0, "events are held while NATS is down");
    nats.restart();
    send_numbered(to, 500..700).await;
    wait_for(|| stored(js.clone()), 700).await;

    let stream = js.get_stream("OPENSIPS_EVENTS").await.expect("stream");
    for seq in 1..=700u64 {
        let msg = stream.get_raw_message(seq).await.expect("stored message");
        assert_eq!(msg.payload.to_vec(), numbered_event(seq as usize - 1), "message {seq} out of order or missing");
    }
    let status = bridge.status();
    assert_eq!((status.counters.datagrams_in, status.counters.overflowed, status.buffered), (700, 0, 0));
    bridge.shutdown().await;
}

async fn wait_for<F, Fut>(count: F, want: u64)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<u64>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = count().await;
        if got == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "stream holds {got:?} messages, want {want}");
        assert!(got.is_none_or(|g| g <= want), "duplicates stored: {got:?} > {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_full_buffer_counts_what_it_drops() {
    let mut nats = NatsServer::start();
    let client = connect(&nats.url()).await;
    let sim = sim().await;
    let bridge =
        Bridge::start(BridgeConfig { buffer_capacity: 50, ..config(&sim) }, client.clone()).await.expect("bridge");
    nats.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_numbered(bridge.events_addr(), 0..120).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = bridge.status();
    assert_eq!((status.counters.datagrams_in, status.buffered, status.counters.overflowed), (120, 50, 70));
    drop(bridge);
}

#[tokio::test]
async fn invalid_datagrams_are_published_raw_and_valid_ones_around_them_unharmed() {
    let nats = NatsServer::start();
    let client = connect(&nats.url()).await;
    let sim = sim().await;
    let bridge = Bridge::start(config(&sim), client.clone()).await.expect("bridge");
    let mut valid = client.subscribe(format!("opensips.{NODE}.event.>")).await.expect("sub");
    let mut invalid = client.subscribe(format!("opensips.{NODE}.invalid")).await.expect("sub");
    client.flush().await.expect("flush");
    let bad: Vec<Vec<u8>> = vec![
        b"garbage".to_vec(),
        br#"{"jsonrpc":"2.0","method":"E_CALL_HOLD","params":{"callid":"#.to_vec(),
        b"\xff\xfe\xfd not utf-8".to_vec(),
        vec![b'{'; 60_000],
        br#"{"jsonrpc":"2.0","method":"E.DOTTED","params":{}}"#.to_vec(),
        br#"{"jsonrpc":"2.0","method":"E_X","id":1}"#.to_vec(),
    ];
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    for (i, b) in bad.iter().enumerate() {
        socket.send_to(&numbered_event(i), bridge.events_addr()).await.expect("send");
        socket.send_to(b, bridge.events_addr()).await.expect("send");
    }
    socket.send_to(&numbered_event(bad.len()), bridge.events_addr()).await.expect("send");
    for i in 0..=bad.len() {
        let msg = tokio::time::timeout(Duration::from_secs(2), valid.next()).await.expect("valid").expect("open");
        assert_eq!(msg.payload.to_vec(), numbered_event(i));
    }
    for b in &bad {
        let msg = tokio::time::timeout(Duration::from_secs(2), invalid.next()).await.expect("invalid").expect("open");
        assert_eq!(&msg.payload[..], &b[..], "raw bytes kept");
        let reason = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(callbus_schemas::bus::HEADER_INVALID_REASON).map(|v| v.to_string()));
        assert!(reason.is_some_and(|r| !r.is_empty()), "the reason travels with it");
    }
    assert_eq!(bridge.status().counters.invalid, bad.len() as u64);
    bridge.shutdown().await;
}

#[tokio::test]
async fn status_is_published_with_subscriptions_and_counters() {
    let nats = NatsServer::start();
    let client = connect(&nats.url()).await;
    let sim = sim().await;
    let mut statuses = client.subscribe(format!("opensips.{NODE}.status")).await.expect("sub");
    client.flush().await.expect("flush");
    let bridge = Bridge::start(config(&sim), client.clone()).await.expect("bridge");
    wait_subscribed(&sim, &bridge, Duration::from_secs(3)).await;
    send_numbered(bridge.events_addr(), 0..3).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(2), statuses.next()).await.expect("status").expect("open");
        let status: BridgeStatus = serde_json::from_slice(&msg.payload).expect("BridgeStatus");
        if status.counters.published == 3 && status.subscriptions.iter().all(|s| s.expires_in_secs.is_some()) {
            assert_eq!(status.node, NODE);
            assert_eq!(status.subscriptions.len(), 4);
            assert!(status.opensips_reachable && status.last_datagram_unix_ms.is_some());
            break;
        }
        assert!(Instant::now() < deadline, "no complete status: {status:?}");
    }
    bridge.shutdown().await;
}

#[tokio::test]
async fn bad_configuration_is_refused_with_the_reason() {
    let nats = NatsServer::start();
    let client = connect(&nats.url()).await;
    let sim = sim().await;
    for (cfg, needle) in [
        (BridgeConfig { node: "a.b".into(), ..config(&sim) }, "node"),
        (BridgeConfig { events: vec!["E X".into()], ..config(&sim) }, "event name"),
        (BridgeConfig { events_listen: "0.0.0.0:0".parse().expect("addr"), ..config(&sim) }, "--events-advertise"),
    ] {
        let err = Bridge::start(cfg, client.clone()).await.err().expect("refused").to_string();
        assert!(err.contains(needle), "{err}");
    }
}

#[tokio::test]
async fn the_tap_hands_each_valid_datagram_to_an_in_process_engine_and_local_mi_answers_as_nats_does() {
    let nats = NatsServer::start();
    let client = connect(&nats.url()).await;
    let sim = sim().await;
    let (tap, mut tapped) = tokio::sync::mpsc::channel(2);
    let bridge = Bridge::start_with_tap(config(&sim), client.clone(), Some(tap)).await.expect("bridge");
    let mut on_bus = client.subscribe(format!("opensips.{NODE}.event.>")).await.expect("sub");
    client.flush().await.expect("flush");
    wait_subscribed(&sim, &bridge, Duration::from_secs(3)).await;
    // Datagrams straight at the events socket: two valid, one invalid, then more than the tap
    // holds while nobody reads it.
    let sender = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let event = |n: u32| format!(r#"{{"jsonrpc":"2.0","method":"E_TEST","params":{{"n":{n}}}}}"#);
    sender.send_to(event(1).as_bytes(), bridge.events_addr()).await.expect("send");
    sender.send_to(b"not json", bridge.events_addr()).await.expect("send");
    sender.send_to(event(2).as_bytes(), bridge.events_addr()).await.expect("send");
    for n in 3..=5 {
        sender.send_to(event(n).as_bytes(), bridge.events_addr()).await.expect("send");
    }
    let mut bus = Vec::new();
    while bus.len() < 5 {
        let msg = tokio::time::timeout(Duration::from_secs(5), on_bus.next()).await.expect("on NATS").expect("open");
        bus.push(String::from_utf8_lossy(&msg.payload).into_owned());
    }
    assert_eq!(bus, (1..=5).map(event).collect::<Vec<_>>(), "NATS gets every valid datagram, tap full or not");
    let mut got = Vec::new();
    while let Ok((seq, payload)) = tapped.try_recv() {
        got.push((seq, String::from_utf8_lossy(&payload).into_owned()));
    }
    // The tap holds two: the invalid datagram (seq 2) is not handed over, and 3..5 found it full.
    assert_eq!(got, [(1, event(1)), (3, event(2))]);
    sender.send_to(event(6).as_bytes(), bridge.events_addr()).await.expect("send");
    let (seq, payload) = tokio::time::timeout(Duration::from_secs(5), tapped.recv()).await.expect("tap").expect("open");
    assert_eq!((seq, String::from_utf8_lossy(&payload).into_owned()), (7, event(6)), "the tap goes on once read");

    let local = bridge.local_mi();
    match local.call("uptime", Value::Null).await {
        MiBusReply::Result { result } => assert!(result.is_object(), "{result}"),
        other => panic!("uptime: {other:?}"),
    }
    let over_nats = mi(&client, "dlg_list", br#"{"index":0,"counter":5}"#).await;
    assert_eq!(local.call("dlg_list", json!({"index": 0, "counter": 5})).await, over_nats, "same answer as NATS");
    let refused = local.call("shm_check", Value::Null).await;
    assert_eq!(bridge_code(&refused), Some(BridgeErrorKind::NotAllowed), "{refused:?}");
    let bad = local.call("uptime", json!("x")).await;
    assert_eq!(bridge_code(&bad), Some(BridgeErrorKind::BadBody), "{bad:?}");
    assert!(format!("{bad:?}").contains("uptime: the params must be a JSON object"), "{bad:?}");
    bridge.shutdown().await;
}

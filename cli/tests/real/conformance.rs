//! The simulator against the real OpenSIPS: MI replies with the same shapes, event sequences
//! with the same signatures (part of the real-OpenSIPS tier).

use super::*;

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

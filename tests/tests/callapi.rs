//! The Call API door with a WebSocket client speaking exactly Call API's wire format.

use std::time::Duration;

use callbus_door::CallApiDoor;
use callbus_tests::stack::Stack;
use futures::{SinkExt, StreamExt};
use opensips_sim::CallScript;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(door: &CallApiDoor) -> Ws {
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/call-api", door.local_addr())).await.expect("connect");
    ws
}

async fn next(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame")
            .expect("open")
            .expect("ok");
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).expect("JSON frame");
        }
    }
}

/// Sends a request; returns the response and the events until `Ended`.
async fn call(ws: &mut Ws, frame: Value) -> (Value, Vec<(String, Option<Value>)>) {
    ws.send(Message::text(frame.to_string())).await.expect("send");
    let response = next(ws).await;
    let mut events = Vec::new();
    loop {
        let note = next(ws).await;
        assert_eq!(note["jsonrpc"], json!("2.0"));
        assert_eq!(note["method"], frame["method"], "notifications are named after the method");
        assert_eq!(note["params"]["cmd_id"], response["result"]["cmd_id"]);
        let event = note["params"]["event"].as_str().expect("event").to_owned();
        let data = note["params"].get("data").cloned();
        events.push((event.clone(), data));
        if event == "Ended" {
            return (response, events);
        }
    }
}

fn names(events: &[(String, Option<Value>)]) -> Vec<&str> {
    events.iter().map(|(e, _)| e.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_api_clients_work_unchanged() {
    let mut s = Stack::start().await;
    let door = CallApiDoor::start("127.0.0.1:0".parse().expect("addr"), s.client.clone()).await.expect("door");
    let mut ws = connect(&door).await;
    let (_, sip) = s.confirmed_call(CallScript::default()).await;

    let (response, events) = call(
        &mut ws,
        json!({"jsonrpc": "2.0", "id": 1, "method": "CallHold", "params": {"callid": sip, "cmd_id": "ch-1"}}),
    )
    .await;
    assert_eq!(response, json!({"jsonrpc": "2.0", "id": 1, "result": {"cmd_id": "ch-1", "event": "Started"}}));
    let got = names(&events);
    assert_eq!(got[0], "CallHolding");
    assert_eq!(got.iter().filter(|e| **e == "CallHoldSuccessful").count(), 2, "{got:?}");
    assert_eq!(got.last(), Some(&"Ended"));
    assert!(events
        .iter()
        .filter(|(e, _)| e == "CallHoldStart")
        .all(|(_, d)| d.as_ref().is_some_and(|d| d["leg"].is_string())));
    assert!(events.last().is_some_and(|(_, d)| d.is_none()), "Ended has no data");

    let (_, events) =
        call(&mut ws, json!({"jsonrpc": "2.0", "id": 2, "method": "CallUnhold", "params": {"callid": sip}})).await;
    assert_eq!(names(&events).iter().filter(|e| **e == "CallUnholdSuccessful").count(), 2);

    // A failing command says so: Error with the reason, then Ended.
    let (response, events) =
        call(&mut ws, json!({"jsonrpc": "2.0", "id": 3, "method": "CallHold", "params": {"callid": "no-such-call"}}))
            .await;
    assert_eq!(response["result"]["event"], json!("Started"));
    assert_eq!(names(&events), ["Error", "Ended"]);
    assert!(events[0]
        .1
        .as_ref()
        .is_some_and(|d| d.as_str().is_some_and(|r| r.contains("no live call with SIP Call-ID \"no-such-call\""))));

    // Blind transfer, sent as a binary frame.
    let frame = json!({"jsonrpc": "2.0", "id": "t", "method": "CallBlindTransfer", "params": {"callid": sip, "leg": "callee", "destination": "sip:transfer@127.0.0.1:5060"}});
    ws.send(Message::binary(frame.to_string().into_bytes())).await.expect("send");
    let response = next(&mut ws).await;
    assert_eq!(response["id"], json!("t"));
    let mut events = Vec::new();
    loop {
        let note = next(&mut ws).await;
        let event = note["params"]["event"].as_str().expect("event").to_owned();
        events.push((event.clone(), note["params"].get("data").cloned()));
        if event == "Ended" {
            break;
        }
    }
    let got = names(&events);
    for e in ["Transferring", "TransferStart", "TransferSuccessful", "Ended"] {
        assert!(got.contains(&e), "{e} missing: {got:?}");
    }
    let start = events.iter().find(|(e, _)| e == "TransferStart").and_then(|(_, d)| d.clone()).expect("data");
    assert_eq!(start["destination"], json!("sip:transfer@127.0.0.1:5060"));
    assert!(start["callid"].as_str().is_some_and(|c| c != sip), "the new call's Call-ID, as Call API sends: {start}");

    // Click-to-dial, in Call API's order of events.
    let (response, events) = call(
        &mut ws,
        json!({"jsonrpc": "2.0", "id": 6, "method": "CallStart", "params": {"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1"}}),
    )
    .await;
    assert_eq!(response["result"]["event"], json!("Started"));
    assert_eq!(
        names(&events),
        ["CallerAnswered", "Transferring", "TransferStart", "TransferPending", "CalleeAnswered", "Ended"]
    );
    assert_eq!(events[0].1, Some(json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1"})));
    let answered = events[4].1.clone().expect("data");
    assert_eq!(answered["callee"], json!("sip:bob@127.0.0.1"));
    assert!(answered["callid"].as_str().is_some_and(|k| k.starts_with("B2B.")), "{answered}");
    assert_eq!(events[3].1.as_ref().map(|d| d["extra"].clone()), Some(json!("180 Ringing")));
    // Every event names the parties, as Call API's do.
    for (name, data) in &events[..5] {
        assert_eq!(data.as_ref().map(|d| d["caller"].clone()), Some(json!("sip:alice@127.0.0.1")), "{name}: {data:?}");
    }
    assert_eq!(events[1].1.as_ref().map(|d| d["destination"].clone()), Some(json!("sip:bob@127.0.0.1")));
    assert_eq!(events[2].1.as_ref().map(|d| d["callee"].clone()), Some(json!("sip:bob@127.0.0.1")));

    // A second transfer on the same call fails clearly (Call API would report it pending for ever).
    let (_, events) =
        call(&mut ws, json!({"jsonrpc": "2.0", "id": 5, "method": "CallEnd", "params": {"callid": "gone@nowhere"}}))
            .await;
    assert_eq!(names(&events), ["Error", "Ended"]);
    door.shutdown().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_use_call_apis_code_and_messages_and_keep_the_connection() {
    let mut s = Stack::start().await;
    let door = CallApiDoor::start("127.0.0.1:0".parse().expect("addr"), s.client.clone()).await.expect("door");
    let mut ws = connect(&door).await;
    for (frame, message) in [
        ("{not json".to_owned(), "failed to parse JSON-RPC request"),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"CallHold","params":["x"]}"#.to_owned(),
            "non-object parameters are not accepted",
        ),
        (
            r#"{"jsonrpc":"2.0","id":2,"method":"CallHold","params":{"callid":"x","cmd_id":7}}"#.to_owned(),
            "bad cmd_id (must be a string)",
        ),
        (
            r#"{"jsonrpc":"2.0","id":3,"method":"CallHold","params":{"callid":42}}"#.to_owned(),
            "bad JSON-RPC parameters",
        ),
        (
            r#"{"jsonrpc":"2.0","id":4,"method":"CallBlindTransfer","params":{"callid":"x"}}"#.to_owned(),
            "bad JSON-RPC parameters",
        ),
        (r#"{"jsonrpc":"2.0","id":5,"method":"constructor","params":{}}"#.to_owned(), "unknown JSON-RPC method"),
        (
            r#"{"jsonrpc":"2.0","id":6,"method":"CallHold","params":{"callid":{"$gt":""}}}"#.to_owned(),
            "bad JSON-RPC parameters",
        ),
    ] {
        ws.send(Message::text(frame.clone())).await.expect("send");
        let reply = next(&mut ws).await;
        assert_eq!(reply["error"]["code"], json!(32000), "{frame}");
        assert_eq!(reply["error"]["message"], json!(message), "{frame}");
    }
    // Still open and serving.
    let (_, events) = call(
        &mut ws,
        json!({"jsonrpc": "2.0", "id": 9, "method": "CallStart", "params": {"caller": "sip:busy@127.0.0.1", "callee": "sip:c@d"}}),
    )
    .await;
    assert_eq!(names(&events), ["Error", "Ended"]);
    assert!(events[0].1.as_ref().is_some_and(|d| d.as_str().is_some_and(|r| r.contains("busy"))), "{events:?}");
    // Only /call-api is served.
    let wrong = tokio_tungstenite::connect_async(format!("ws://{}/other", door.local_addr())).await;
    assert!(wrong.is_err());
    door.shutdown().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_door_with_a_token_refuses_clients_without_it_and_open_doors_stay_on_loopback() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut s = Stack::start().await;
    let any: std::net::SocketAddr = "0.0.0.0:0".parse().expect("addr");
    let Err(refused) = CallApiDoor::start(any, s.client.clone()).await else {
        panic!("no token, not loopback: refused")
    };
    assert!(refused.to_string().contains("bearer token"), "{refused}");
    let door = CallApiDoor::start_with_token(any, s.client.clone(), Some("door-secret".into())).await.expect("door");
    let url = format!("ws://127.0.0.1:{}/call-api", door.local_addr().port());
    let Err(err) = tokio_tungstenite::connect_async(&url).await else { panic!("no token: refused") };
    assert!(err.to_string().contains("401"), "{err}");
    let mut wrong = url.as_str().into_client_request().expect("request");
    wrong.headers_mut().insert("Authorization", "Bearer door-secreT".parse().expect("header"));
    assert!(tokio_tungstenite::connect_async(wrong).await.is_err(), "a wrong token is refused");
    let mut right = url.as_str().into_client_request().expect("request");
    right.headers_mut().insert("Authorization", "Bearer door-secret".parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::connect_async(right).await.expect("the token opens the door");
    let (_, events) =
        call(&mut ws, json!({"jsonrpc": "2.0", "id": 1, "method": "CallEnd", "params": {"callid": "none"}})).await;
    assert_eq!(names(&events), ["Error", "Ended"]);
    let (_, _) = tokio_tungstenite::connect_async(format!("{url}?token=door-secret")).await.expect("query token");
    door.shutdown().await;
    s.shutdown().await;
}

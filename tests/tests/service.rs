//! callbus's parts are NATS services (the micro protocol): `$SRV.PING`, `$SRV.INFO` and
//! `$SRV.STATS` list the engine's `callbus` service, one endpoint per command verb, and the
//! bridge's `callbus-bridge` service with its MI endpoint; their stats count the requests
//! answered, the refusals as errors, and the time taken. The answers are read with async-nats's
//! own `service` types, as `nats micro` reads them.

use std::time::Duration;

use async_nats::service::{Info, PingResponse, Stats};
use callbus_schemas::subjects::Verb;
use callbus_tests::stack::{accepted, Stack, NODE};
use futures::StreamExt;
use opensips_sim::CallScript;
use serde_json::json;

/// Every answer to a request on `subject` within 500 ms (each service instance answers).
async fn gather(client: &async_nats::Client, subject: &str) -> Vec<bytes::Bytes> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.expect("sub");
    client.publish_with_reply(subject.to_owned(), inbox, "".into()).await.expect("pub");
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), answers.next()).await {
        // Not NATS's own "no responders" status, which has no body.
        if m.status.is_none() {
            out.push(m.payload);
        }
    }
    out
}

async fn one<T: serde::de::DeserializeOwned>(client: &async_nats::Client, subject: &str) -> T {
    let answers = gather(client, subject).await;
    assert_eq!(answers.len(), 1, "{subject}: one instance answers");
    serde_json::from_slice(&answers[0])
        .unwrap_or_else(|e| panic!("{subject}: {e}: {}", String::from_utf8_lossy(&answers[0])))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_and_the_bridge_are_nats_services() {
    let mut s = Stack::start().await;

    let pings: Vec<PingResponse> =
        gather(&s.client, "$SRV.PING").await.iter().map(|b| serde_json::from_slice(b).expect("ping")).collect();
    let mut names: Vec<&str> = pings.iter().map(|p| p.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["callbus", "callbus-bridge"]);
    assert!(pings.iter().all(|p| p.kind == "io.nats.micro.v1.ping_response" && p.id.len() == 22));

    let info: Info = one(&s.client, "$SRV.INFO.callbus").await;
    assert_eq!(info.kind, "io.nats.micro.v1.info_response");
    assert_eq!(info.metadata.get("mode").map(String::as_str), Some("single"));
    assert_eq!(info.endpoints.len(), Verb::ALL.len());
    for verb in Verb::ALL {
        let e = info.endpoints.iter().find(|e| e.name == verb.as_str()).unwrap_or_else(|| panic!("{verb:?}"));
        assert_eq!(e.subject, format!("callbus.cmd.{}", verb.as_str()));
        assert_eq!(e.queue_group, "callbus-engine");
        assert!(!e.metadata["request"].is_empty(), "{verb:?}");
        let schema: serde_json::Value = serde_json::from_str(&e.metadata["response_schema"]).expect("a JSON Schema");
        assert_eq!(schema["title"], "CommandReply", "{verb:?}");
    }
    let by_id: Info = one(&s.client, &format!("$SRV.INFO.callbus.{}", info.id)).await;
    assert_eq!(by_id.id, info.id);

    // Two holds answered (one refused: no such call), one end.
    let (call_id, _) = s.confirmed_call(CallScript::default()).await;
    accepted(&s.cmd("call.hold", json!({"call_id": call_id})).await);
    let refused = s.cmd("call.hold", json!({"call_id": "c-nobody"})).await;
    assert_eq!(callbus_tests::stack::refused(&refused), callbus_schemas::command::CommandErrorCode::UnknownCall);
    accepted(&s.cmd("call.end", json!({"call_id": call_id})).await);
    let stats: Stats = one(&s.client, "$SRV.STATS.callbus").await;
    assert_eq!(stats.kind, "io.nats.micro.v1.stats_response");
    let hold = stats.endpoints.iter().find(|e| e.name == "call.hold").expect("call.hold");
    assert_eq!((hold.requests, hold.errors), (2, 1));
    assert!(hold.processing_time > Duration::ZERO && hold.average_processing_time > Duration::ZERO);
    let last = hold.last_error.as_ref().expect("the refusal");
    assert_eq!((last.code, last.status.as_str()), (404, "unknown_call"));
    let end = stats.endpoints.iter().find(|e| e.name == "call.end").expect("call.end");
    assert_eq!((end.requests, end.errors), (1, 0));

    // The bridge: its MI endpoint, counted, with the bridge's status as the endpoint's data.
    let info: Info = one(&s.client, "$SRV.INFO.callbus-bridge").await;
    assert_eq!(info.endpoints.len(), 1);
    assert_eq!(info.endpoints[0].subject, format!("opensips.{NODE}.mi.*"));
    assert_eq!(info.metadata.get("node").map(String::as_str), Some(NODE));
    let ok = s.client.request(format!("opensips.{NODE}.mi.uptime"), "".into()).await.expect("uptime");
    assert!(!ok.payload.is_empty());
    let _ = s.client.request(format!("opensips.{NODE}.mi.shutdown"), "".into()).await.expect("refused");
    let stats: Stats = one(&s.client, "$SRV.STATS.callbus-bridge").await;
    let mi = &stats.endpoints[0];
    assert!(mi.requests >= 2 && mi.errors >= 1, "{} requests, {} errors", mi.requests, mi.errors);
    let status = mi.data.as_ref().expect("the bridge's status");
    assert_eq!(status["node"], NODE);

    // A stopped part leaves the list.
    s.shutdown().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let left = gather(&s.client, "$SRV.PING").await;
    assert!(left.is_empty(), "stopped services do not answer: {left:?}");
}

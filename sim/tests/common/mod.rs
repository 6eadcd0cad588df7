//! Shared helpers for the simulator's conformance tests: fixtures, a UDP MI client, an event
//! listener subscribed through MI, and a structural comparison of JSON values.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use opensips_sim::{Sim, SimConfig};
use serde_json::{json, Value};
use tokio::net::UdpSocket;

pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("CALLBUS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/opensips-3.4"));
    assert!(
        dir.is_dir(),
        "fixtures not found at {}: the repository's fixtures/opensips-3.4 is missing; set CALLBUS_FIXTURES to a copy",
        dir.display()
    );
    dir
}

pub fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(fixtures_dir().join(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

/// The captured events of a scenario, grouped by event name, in capture order.
pub fn scenario_events(scenario: &str) -> BTreeMap<String, Vec<Value>> {
    let mut found: BTreeMap<String, Vec<(u32, Value)>> = BTreeMap::new();
    for entry in std::fs::read_dir(fixtures_dir().join("events")).expect("events dir") {
        let name = entry.expect("entry").file_name().into_string().expect("utf-8");
        let parts: Vec<&str> = name.splitn(3, '.').collect();
        if parts.len() == 3 && parts[2] == format!("{scenario}.json") {
            let n: u32 = parts[1].parse().expect("numbered fixture");
            let value: Value = serde_json::from_slice(&fixture(&format!("events/{name}"))).expect("JSON");
            found.entry(parts[0].to_owned()).or_default().push((n, value));
        }
    }
    assert!(!found.is_empty(), "no fixtures for scenario {scenario}");
    found
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by_key(|(n, _)| *n);
            (k, v.into_iter().map(|(_, e)| e).collect())
        })
        .collect()
}

/// Keys whose values differ between runs (ids, tags, keys, bodies).
pub fn event_volatile(key: &str) -> bool {
    matches!(key, "id" | "db_id" | "callid" | "from_tag" | "to_tag" | "key" | "transfer_callid" | "body" | "headers")
}

/// Differences in shape between a captured value and ours: the same keys in the same order,
/// the same JSON types and nulls, and equal values except for keys `volatile` names.
pub fn shape_diff(fixture: &Value, ours: &Value, path: &str, volatile: &dyn Fn(&str) -> bool, out: &mut Vec<String>) {
    let key = path.rsplit('.').next().unwrap_or(path);
    match (fixture, ours) {
        (Value::Object(f), Value::Object(o)) => {
            let fk: Vec<&String> = f.keys().collect();
            let ok: Vec<&String> = o.keys().collect();
            if fk != ok {
                out.push(format!("{path}: keys {ok:?}, captured {fk:?}"));
                return;
            }
            for (k, fv) in f {
                shape_diff(fv, &o[k], &format!("{path}.{k}"), volatile, out);
            }
        }
        (Value::Array(f), Value::Array(o)) => {
            if let Some(first) = f.first() {
                for (i, item) in o.iter().enumerate() {
                    shape_diff(first, item, &format!("{path}[{i}]"), &|_| true, out);
                }
            }
        }
        (Value::String(f), Value::String(o)) => {
            if !volatile(key) && f != o {
                out.push(format!("{path}: {o:?}, captured {f:?}"));
            }
        }
        (Value::Number(f), Value::Number(o)) => {
            if !volatile(key) && f != o {
                out.push(format!("{path}: {o}, captured {f}"));
            }
        }
        (Value::Null, Value::Null) | (Value::Bool(_), Value::Bool(_)) => {}
        // subscribers_list: `ttl` is the seconds left, or "expired" for an unsubscribed entry.
        (_, Value::Number(_) | Value::String(_)) if key == "ttl" => {}
        (f, o) => out.push(format!("{path}: {o}, captured {f} (different JSON types)")),
    }
}

/// Compares one captured event with ours: OpenSIPS's blind-transfer `start` quirk (the new
/// call's Call-ID in `leg`) must be reproduced, other values must match.
pub fn event_diff(fixture: &Value, ours: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let quirk = fixture["params"]["leg"] == fixture["params"]["transfer_callid"] && fixture["params"]["leg"] != "";
    let volatile = move |k: &str| event_volatile(k) || (quirk && k == "leg") || k == "destination";
    shape_diff(fixture, ours, "", &volatile, &mut out);
    if quirk && ours["params"]["leg"] != ours["params"]["transfer_callid"] {
        out.push("params.leg: the blind transfer start must carry the new call's Call-ID".into());
    }
    let (fd, od) = (&fixture["params"]["destination"], &ours["params"]["destination"]);
    if (fd == "") != (od == "") {
        out.push(format!("params.destination: {od}, captured {fd}"));
    }
    out
}

/// A UDP MI client for the tests.
pub struct Mi {
    socket: UdpSocket,
    next_id: u64,
}

impl Mi {
    pub async fn new(sim: &Sim) -> Mi {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        socket.connect(sim.mi_addr()).await.expect("connect");
        Mi { socket, next_id: 1 }
    }

    /// Sends raw bytes and returns the reply datagram, or None after `wait`.
    pub async fn raw(&self, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
        if self.socket.send(bytes).await.is_err() {
            return None;
        }
        let mut buf = vec![0u8; 70_000];
        match tokio::time::timeout(wait, self.socket.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    /// Runs a command; returns `result` or panics with the error.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let reply = self.try_call(method, params).await;
        match reply {
            Ok(r) => r,
            Err(e) => panic!("MI {method} failed: {e}"),
        }
    }

    /// Runs a command; returns `result` or the `error` object.
    pub async fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let mut req = json!({"jsonrpc": "2.0", "method": method, "id": self.next_id});
        if !params.is_null() {
            req["params"] = params;
        }
        let bytes = self.raw(&serde_json::to_vec(&req).expect("json"), Duration::from_secs(2)).await.expect("MI reply");
        let reply: Value = serde_json::from_slice(&bytes).expect("JSON reply");
        assert_eq!(reply["id"], json!(self.next_id), "reply id");
        match reply.get("result") {
            Some(r) => Ok(r.clone()),
            None => Err(reply["error"].clone()),
        }
    }
}

/// A simulator with an MI client and an event listener subscribed to the four events.
pub struct Lab {
    pub sim: Sim,
    pub mi: Mi,
    pub events: UdpSocket,
}

impl Lab {
    pub async fn start() -> Lab {
        Lab::with(SimConfig {
            step: Duration::from_millis(2),
            ua_timeout: Duration::from_millis(60),
            ..SimConfig::default()
        })
        .await
    }

    pub async fn with(config: SimConfig) -> Lab {
        let sim = Sim::start(config).await.expect("sim starts");
        let mut mi = Mi::new(&sim).await;
        let events = UdpSocket::bind("127.0.0.1:0").await.expect("bind listener");
        let socket = format!("udp:{}", events.local_addr().expect("addr"));
        for e in callbus_schemas::event::DEFAULT_EVENTS {
            assert_eq!(
                mi.call("event_subscribe", json!({"event": e, "socket": socket, "expire": 60})).await,
                json!("OK")
            );
        }
        Lab { sim, mi, events }
    }

    /// Every event datagram until none has arrived for `quiet`.
    pub async fn collect(&self, quiet: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(Ok(n)) = tokio::time::timeout(quiet, self.events.recv(&mut buf)).await {
            out.push(serde_json::from_slice(&buf[..n]).expect("event datagram is JSON"));
        }
        out
    }

    /// Waits for exactly `n` events (or fails after 5 s).
    pub async fn expect(&self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while out.len() < n {
            match tokio::time::timeout(Duration::from_secs(5), self.events.recv(&mut buf)).await {
                Ok(Ok(len)) => out.push(serde_json::from_slice(&buf[..len]).expect("JSON")),
                _ => panic!("expected {n} events, got {}: {out:#?}", out.len()),
            }
        }
        out
    }
}

/// Asserts that `ours` (filtered by `keep`) matches the captured scenario, per event name, in order.
pub fn assert_scenario(scenario: &str, ours: &[Value], keep: impl Fn(&Value) -> bool) {
    let captured = scenario_events(scenario);
    let mut mine: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in ours.iter().filter(|e| keep(e)) {
        mine.entry(e["method"].as_str().unwrap_or_default().to_owned()).or_default().push(e.clone());
    }
    let mut problems = Vec::new();
    for (name, expected) in &captured {
        let got = mine.remove(name).unwrap_or_default();
        if got.len() != expected.len() {
            problems.push(format!("{name}: {} events, captured {}:\n{got:#?}", got.len(), expected.len()));
            continue;
        }
        for (i, (f, o)) in expected.iter().zip(&got).enumerate() {
            for d in event_diff(f, o) {
                problems.push(format!("{name} #{}: {d}", i + 1));
            }
        }
    }
    for (name, extra) in mine {
        problems.push(format!("{name}: {} events the capture does not have", extra.len()));
    }
    assert!(problems.is_empty(), "scenario {scenario} differs from the capture:\n{}", problems.join("\n"));
}

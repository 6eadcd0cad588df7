//! Helpers for the cluster's tests: OpenSIPS (sim and bridge) on a NATS cluster, waiting for
//! the partitions to settle, reading the replicated log back, and comparing it with what the
//! simulator sent.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use callbus_bridge::{Bridge, BridgeConfig};
use callbus_engine::cluster;
use callbus_engine::log::Record;
use callbus_engine::machines::Input;
use callbus_schemas::command::CommandReply;
use callbus_schemas::event::Event;
use opensips_sim::{Sim, SimConfig, Traced};

use crate::stack::NODE;
use crate::NatsCluster;

/// The simulated OpenSIPS and its bridge (events acknowledged by JetStream), on `nats`.
pub async fn opensips(nats: &NatsCluster) -> (Sim, Bridge) {
    opensips_with(nats, true).await
}

/// The simulated OpenSIPS and its bridge, on `nats`; `acked`: the bridge waits for JetStream
/// to store each event.
pub async fn opensips_with(nats: &NatsCluster, acked: bool) -> (Sim, Bridge) {
    let client = nats.connect().await;
    let sim = Sim::start(SimConfig { step: Duration::from_millis(3), ..SimConfig::default() }).await.expect("sim");
    let bridge_config = BridgeConfig {
        node: NODE.into(),
        mi: sim.mi_addr(),
        events_listen: "127.0.0.1:0".parse().expect("addr"),
        health_interval: Duration::from_millis(200),
        events_acked: acked,
        ..BridgeConfig::default()
    };
    let bridge = Bridge::start(bridge_config, client).await.expect("bridge");
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.live_subscriptions().len() < 4 {
        assert!(Instant::now() < deadline, "the bridge subscribes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (sim, bridge)
}

/// Waits until every partition has an owner among `workers` and each of them owns some;
/// returns the owners. Panics after `within`.
pub async fn settled(
    client: &async_nats::Client,
    partitions: u16,
    workers: &[&str],
    within: Duration,
) -> BTreeMap<u16, String> {
    let deadline = Instant::now() + within;
    loop {
        let owners: BTreeMap<u16, String> = match cluster::status(client, partitions).await {
            Ok(status) => status.partitions.iter().filter_map(|p| p.owner.clone().map(|o| (p.partition, o))).collect(),
            Err(_) => BTreeMap::new(),
        };
        let placed = owners.len() == partitions as usize
            && owners.values().all(|o| workers.contains(&o.as_str()))
            && workers.iter().all(|w| owners.values().any(|o| o == w));
        if placed {
            return owners;
        }
        assert!(Instant::now() < deadline, "partitions not placed on {workers:?} within {within:?}: {owners:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a command to the cluster and returns the answer (waits up to 15 s).
pub async fn cmd(client: &async_nats::Client, verb: &str, body: serde_json::Value) -> CommandReply {
    callbus_client::Client::new(client.clone())
        .with_timeout(Duration::from_secs(15))
        .request(verb, &body)
        .await
        .unwrap_or_else(|e| panic!("{verb}: {e}"))
}

/// How many live calls the cluster lists in `state` (every partition answering).
pub async fn listed(client: &async_nats::Client, state: &str) -> usize {
    match cmd(client, "call.list", serde_json::json!({ "state": state })).await {
        CommandReply::Data { result, .. } => result["calls"].as_array().map_or(0, Vec::len),
        other => panic!("call.list: {other:?}"),
    }
}

/// Every record of every partition, from the replicated log.
pub async fn all_records(client: &async_nats::Client, partitions: u16) -> Vec<Record> {
    let js = async_nats::jetstream::new(client.clone());
    let mut out = Vec::new();
    for p in 0..partitions {
        // JetStream may be electing a leader (a server was killed): try again for a while.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut records = Vec::new();
            let read = cluster::read_partition(&js, p, 0, |_, _, bytes| {
                records.push(rmp_serde::from_slice::<Record>(bytes).map_err(|e| e.to_string())?);
                Ok(())
            })
            .await;
            match read {
                Ok(_) => {
                    out.extend(records);
                    break;
                }
                Err(e) if Instant::now() < deadline && !e.contains("record at byte") => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("reading partition {p}'s log: {e}"),
            }
        }
    }
    out
}

/// Waits until the log says every call of `sips` has ended (notifications are at most once:
/// a subscriber whose NATS server went away misses some; the log does not). Returns the
/// records. Panics when no more call ended for `within` (progress, not a stopwatch: a JetStream
/// cluster that lost a server takes its own time to elect new leaders, and the calls come
/// late, not lost), or after five times `within` in all.
pub async fn wait_ended_in_log(
    client: &async_nats::Client,
    partitions: u16,
    sips: &[String],
    within: Duration,
) -> Vec<Record> {
    let started = Instant::now();
    let mut deadline = Instant::now() + within;
    let mut fewest_left = usize::MAX;
    loop {
        let records = all_records(client, partitions).await;
        let ended: std::collections::HashSet<&str> =
            records.iter().filter(|r| r.after.is_ended()).filter_map(|r| r.after.sip_call_id()).collect();
        let left: Vec<&String> = sips.iter().filter(|s| !ended.contains(s.as_str())).collect();
        if std::env::var_os("CALLBUS_TEST_TRACE").is_some() {
            eprintln!("TRACE {:?} records {} calls not ended {}", Instant::now(), records.len(), left.len());
        }
        if left.is_empty() {
            return records;
        }
        if left.len() < fewest_left {
            fewest_left = left.len();
            deadline = (Instant::now() + within).min(started + 5 * within);
        }
        if Instant::now() >= deadline {
            let mut by_partition: BTreeMap<u16, usize> = BTreeMap::new();
            for sip in &left {
                *by_partition.entry(cluster::partition_of(sip, partitions)).or_default() += 1;
            }
            let status = cluster::status(client, partitions).await;
            panic!(
                "{} of {} calls not ended in the log ({within:?} without progress, {:?} in all); by partition {by_partition:?}; status {status:#?}",
                left.len(),
                sips.len(),
                started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Checks fencing in every partition's log: the writer changes only at a takeover marker
/// (a message without an input position). Returns how many takeovers each partition saw.
pub async fn assert_fenced(client: &async_nats::Client, partitions: u16) -> Vec<usize> {
    let js = async_nats::jetstream::new(client.clone());
    let mut takeovers = Vec::new();
    for p in 0..partitions {
        let mut writer: Option<String> = None;
        let mut n = 0;
        cluster::read_log(&js, p, 0, |m| {
            if m.input_seq.is_none() {
                n += 1;
                writer = m.owner.clone();
            } else if m.owner != writer {
                return Err(format!(
                    "partition {p}: message {} by {:?} while {:?} owned it: fencing failed",
                    m.seq, m.owner, writer
                ));
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        takeovers.push(n);
    }
    takeovers
}

/// Per SIP Call-ID, the call events the simulator raised, in order.
pub fn sent_by_call(trace: &[(Instant, Traced)]) -> HashMap<String, Vec<Event>> {
    let mut sent: HashMap<String, Vec<Event>> = HashMap::new();
    for (_, t) in trace {
        if let Traced::Event(e) = t {
            let sip = match e {
                Event::DlgStateChanged(d) => d.callid.clone(),
                Event::CallHold(h) => h.callid.clone(),
                Event::CallTransfer(t) => t.callid.clone(),
                _ => continue,
            };
            sent.entry(sip).or_default().push(e.clone());
        }
    }
    sent
}

/// Per SIP Call-ID, the events in the log; checks that each call's records are in one
/// partition, in order, with no sequence twice.
pub fn logged_by_call(records: &[Record]) -> HashMap<String, Vec<Event>> {
    let mut by_call: HashMap<String, Vec<&Record>> = HashMap::new();
    for r in records {
        by_call.entry(r.call_id.clone()).or_default().push(r);
    }
    let mut logged: HashMap<String, Vec<Event>> = HashMap::new();
    for (call_id, rs) in by_call {
        assert!(rs.windows(2).all(|w| w[0].seq < w[1].seq), "{call_id}: records out of order or repeated");
        assert!(rs.iter().all(|r| r.partition == rs[0].partition), "{call_id}: records in two partitions");
        for r in rs {
            if let Input::Event { datagram, .. } = &r.input {
                let e = Event::parse(datagram.as_bytes()).expect("logged datagram parses");
                if let Some(sip) = r.after.sip_call_id() {
                    logged.entry(sip.to_owned()).or_default().push(e);
                }
            }
        }
    }
    logged
}

/// Asserts that for each of `sips` the log holds exactly the events the simulator sent.
pub fn assert_log_is_what_was_sent(sips: &[String], trace: &[(Instant, Traced)], records: &[Record]) {
    let sent = sent_by_call(trace);
    let logged = logged_by_call(records);
    for sip in sips {
        let (s, l) = (sent.get(sip), logged.get(sip));
        assert!(s.is_some_and(|s| !s.is_empty()), "call {sip}: the simulator sent nothing");
        assert_eq!(l, s, "call {sip}: the log differs from what OpenSIPS sent");
    }
}

//! Many engines on a 3-node NATS JetStream cluster (replicas 3), in this process: partitions
//! spread over the workers, a worker that stops at once (as a crash would) has its calls go
//! on at the others, and the replicated log holds every event the simulated OpenSIPS sent,
//! once, in order.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use callbus_bridge::{Bridge, BridgeConfig};
use callbus_engine::cluster::{self, ClusterConfig, ClusterEngine};
use callbus_engine::log::Record;
use callbus_engine::machines::Input;
use callbus_engine::EngineConfig;
use callbus_schemas::command::CommandReply;
use callbus_schemas::event::Event;
use callbus_tests::stack::{accepted, timeouts, NODE};
use callbus_tests::NatsCluster;
use futures::StreamExt;
use opensips_sim::{CallScript, Sim, SimConfig, Traced};
use serde_json::json;

const PARTITIONS: u16 = 16;

struct ClusterStack {
    nats: NatsCluster,
    sim: Sim,
    bridge: Option<Bridge>,
    client: async_nats::Client,
    engines: Vec<Option<ClusterEngine>>,
    dirs: Vec<tempfile::TempDir>,
}

impl ClusterStack {
    async fn start(workers: usize) -> ClusterStack {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let nats = NatsCluster::start(3);
        nats.wait_jetstream().await;
        let client = nats.connect().await;
        let sim = Sim::start(SimConfig { step: Duration::from_millis(3), ..SimConfig::default() }).await.expect("sim");
        let bridge_config = BridgeConfig {
            node: NODE.into(),
            mi: sim.mi_addr(),
            events_listen: "127.0.0.1:0".parse().expect("addr"),
            health_interval: Duration::from_millis(200),
            ..BridgeConfig::default()
        };
        let bridge = Bridge::start(bridge_config, client.clone()).await.expect("bridge");
        let mut s = ClusterStack { nats, sim, bridge: Some(bridge), client, engines: Vec::new(), dirs: Vec::new() };
        for i in 0..workers {
            s.dirs.push(tempfile::tempdir().expect("tmp"));
            s.engines.push(None);
            s.start_engine(i).await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.sim.live_subscriptions().len() < 4 {
            assert!(Instant::now() < deadline, "the bridge subscribes");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s
    }

    async fn start_engine(&mut self, i: usize) {
        let config = EngineConfig {
            data_dir: self.dirs[i].path().to_owned(),
            timeouts: timeouts(),
            nodes: vec![NODE.into()],
            mi_timeout: Duration::from_secs(3),
            ..EngineConfig::default()
        };
        let cluster = ClusterConfig {
            worker: format!("w{i}"),
            partitions: PARTITIONS,
            replicas: 3,
            lease_ttl: Duration::from_millis(1500),
            ..ClusterConfig::default()
        };
        // Each worker on its own connection, as separate processes would be.
        let client = self.nats.connect().await;
        self.engines[i] = Some(ClusterEngine::start(config, cluster, client).await.expect("cluster engine"));
    }

    /// Waits until every partition has an owner among `workers`; returns the owners.
    async fn settled(&self, workers: &[&str]) -> BTreeMap<u16, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = cluster::status(&self.client, PARTITIONS).await.expect("status");
            let owners: BTreeMap<u16, String> =
                status.partitions.iter().filter_map(|p| p.owner.clone().map(|o| (p.partition, o))).collect();
            let placed = owners.len() == PARTITIONS as usize
                && owners.values().all(|o| workers.contains(&o.as_str()))
                && workers.iter().all(|w| owners.values().any(|o| o == w));
            if placed {
                return owners;
            }
            assert!(Instant::now() < deadline, "partitions not placed on {workers:?}: {owners:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn cmd(&self, verb: &str, body: serde_json::Value) -> CommandReply {
        let reply = tokio::time::timeout(
            Duration::from_secs(15),
            self.client.request(format!("callbus.cmd.{verb}"), Bytes::from(body.to_string())),
        )
        .await
        .expect("the cluster answers")
        .expect("request");
        serde_json::from_slice(&reply.payload)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&reply.payload)))
    }

    /// Every record of every partition, from the replicated log.
    async fn all_records(&self) -> Vec<Record> {
        let js = async_nats::jetstream::new(self.client.clone());
        let mut out = Vec::new();
        for p in 0..PARTITIONS {
            cluster::read_partition(&js, p, 0, |_, _, bytes| {
                out.push(rmp_serde::from_slice::<Record>(bytes).map_err(|e| e.to_string())?);
                Ok(())
            })
            .await
            .expect("read the partition's log");
        }
        out
    }
}

/// Per SIP Call-ID, the events the simulator raised.
fn sent_by_call(trace: &[(Instant, Traced)]) -> HashMap<String, Vec<Event>> {
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

/// Per SIP Call-ID, the events in the log, checking each call's records are in one partition
/// and in order.
fn logged_by_call(records: &[Record]) -> HashMap<String, Vec<Event>> {
    let mut by_call: HashMap<String, Vec<&Record>> = HashMap::new();
    for r in records {
        by_call.entry(r.call_id.clone()).or_default().push(r);
    }
    let mut logged: HashMap<String, Vec<Event>> = HashMap::new();
    for (call_id, rs) in by_call {
        assert!(rs.windows(2).all(|w| w[0].seq < w[1].seq), "{call_id}: records out of order");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_worker_s_calls_continue_on_the_others_and_the_log_holds_each_event_once() {
    let mut s = ClusterStack::start(3).await;
    let owners = s.settled(&["w0", "w1", "w2"]).await;
    let mut notes = s.client.subscribe("callbus.call.*.ended").await.expect("sub");
    s.sim.start_trace();
    const CALLS: usize = 300;
    let mut sips = Vec::new();
    for _ in 0..CALLS {
        sips.push(s.sim.proxied_call(CallScript { hangup_after: Some(Duration::from_secs(6)), ..Default::default() }));
    }
    // Every call confirmed somewhere before the crash.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = s.cmd("call.list", json!({"state": "confirmed"})).await;
        let CommandReply::Data { result, .. } = &listed else { panic!("{listed:?}") };
        if result["calls"].as_array().is_some_and(|c| c.len() == CALLS) {
            break;
        }
        assert!(Instant::now() < deadline, "calls not confirmed: {}", result["calls"].as_array().map_or(0, Vec::len));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moved: Vec<&String> =
        sips.iter().filter(|sip| owners[&cluster::partition_of(sip, PARTITIONS)] == "w1").collect();
    assert!(!moved.is_empty());
    let crashed_at = Instant::now();
    s.engines[1].take().expect("w1").abort();
    s.settled(&["w0", "w2"]).await;
    let taken_after = crashed_at.elapsed();
    // A command on a moved call reaches its new owner.
    let (_, _) = accepted(&s.cmd("call.hold", json!({"sip_call_id": moved[0], "cmd_id": "after-crash"})).await);
    // Every call ends (the simulated caller hangs up), including the moved ones.
    let mut ended = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ended < CALLS {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, notes.next()).await;
        assert!(m.is_ok(), "{ended} of {CALLS} calls ended");
        ended += 1;
    }
    let trace = s.sim.take_trace();
    let sent = sent_by_call(&trace);
    let logged = logged_by_call(&s.all_records().await);
    for sip in &sips {
        assert_eq!(logged.get(sip), sent.get(sip), "call {sip}: the log differs from what OpenSIPS sent");
    }
    println!(
        "FIGURE|cluster in-process|{} calls on 3 workers, {} moved; partitions re-placed {} ms after the crash",
        CALLS,
        moved.len(),
        taken_after.as_millis()
    );
    for e in s.engines.iter_mut().filter_map(Option::take) {
        e.shutdown().await;
    }
    if let Some(b) = s.bridge.take() {
        b.shutdown().await;
    }
}

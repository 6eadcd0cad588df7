//! Cluster throughput: proxied calls through the simulated OpenSIPS, the bridge, a 3-node
//! NATS JetStream cluster (replicas 3) and 1 or 3 workers, until every call has ended in the
//! replicated log. Prints `RESULT|figure|value|unit` lines.
//!
//! - `events_per_s_<k>_workers`: OpenSIPS events (4 per call) logged per second with k workers,
//!   the bridge confirming batches by a barrier (the engines' side of the path);
//! - `ratio_3_to_1`: the two above divided. On this 2-core machine the workers, three
//!   nats-servers, the bridge and the simulator share two cores: the ratio shows the cost of
//!   the cluster's work, not the scaling more machines would give;
//! - `events_per_s_3_workers_acked_bridge`: the same with `--events-acked` (each event stored
//!   by JetStream before the next is sent), which bounds a node's event rate.
//!
//! `cargo run --release -p callbus-tests --bin bench-cluster` (3 000 calls); `-- --quick` for
//! CI (300).

use std::time::{Duration, Instant};

use callbus_engine::cluster::{ClusterConfig, ClusterEngine};
use callbus_engine::EngineConfig;
use callbus_tests::cluster::{opensips_with, settled};
use callbus_tests::stack::{timeouts, NODE};
use callbus_tests::NatsCluster;
use futures::StreamExt;
use opensips_sim::CallScript;

const PARTITIONS: u16 = 64;

async fn run(workers: usize, calls: usize, acked: bool) -> f64 {
    let nats = NatsCluster::start(3);
    nats.wait_jetstream().await;
    let client = nats.connect().await;
    let (sim, bridge) = opensips_with(&nats, acked).await;
    let dirs: Vec<tempfile::TempDir> = (0..workers).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let mut engines = Vec::new();
    let names: Vec<String> = (0..workers).map(|i| format!("w{i}")).collect();
    for (name, dir) in names.iter().zip(&dirs) {
        let config = EngineConfig {
            data_dir: dir.path().to_owned(),
            timeouts: timeouts(),
            nodes: vec![NODE.into()],
            ..EngineConfig::default()
        };
        let cluster =
            ClusterConfig { worker: name.clone(), partitions: PARTITIONS, replicas: 3, ..ClusterConfig::default() };
        engines.push(ClusterEngine::start(config, cluster, nats.connect().await).await.expect("worker"));
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    settled(&client, PARTITIONS, &names, Duration::from_secs(60)).await;
    let mut ended = client.subscribe("callbus.call.*.ended").await.expect("sub");
    client.flush().await.expect("flush");
    let started = Instant::now();
    for _ in 0..calls {
        sim.proxied_call(CallScript { hangup_after: Some(Duration::from_millis(200)), ..Default::default() });
    }
    let mut n = 0;
    while n < calls {
        match tokio::time::timeout(Duration::from_secs(60), ended.next()).await {
            Ok(Some(_)) => n += 1,
            _ => panic!("{n} of {calls} calls ended with {workers} workers"),
        }
    }
    let took = started.elapsed();
    let rate = (4 * calls) as f64 / took.as_secs_f64();
    eprintln!("{workers} workers{}: {calls} calls in {took:?}", if acked { ", acked bridge" } else { "" });
    for e in engines {
        e.shutdown().await;
    }
    bridge.shutdown().await;
    rate
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let calls = if quick { 300 } else { 3000 };
    let one = run(1, calls, false).await;
    println!("RESULT|events_per_s_1_worker|{one:.0}|events/s");
    let three = run(3, calls, false).await;
    println!("RESULT|events_per_s_3_workers|{three:.0}|events/s");
    println!("RESULT|ratio_3_to_1|{:.2}|x", three / one);
    let acked = run(3, calls / 3, true).await;
    println!("RESULT|events_per_s_3_workers_acked_bridge|{acked:.0}|events/s");
}

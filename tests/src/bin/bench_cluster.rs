//! Cluster throughput: how fast 1 and 3 workers turn a node's input into logged, notified
//! calls, on a 3-node NATS JetStream cluster (replicas 3). Prints `RESULT|figure|value|unit`.
//!
//! The workers start and take the partitions; then N proxied calls (4 `E_DLG_STATE_CHANGED`
//! each, the shape of the captured `proxied_call` fixture) are written in batches on
//! `callbus.input.n1`, as a bridge with `--events-acked` writes them, and the workers work
//! through them: route, state machine, records appended to `callbus.log.<p>` (replicas 3),
//! notifications. Timed from the first batch written to the last call's `ended`.
//!
//! - `events_per_s_<k>_workers`: input events turned into logged records per second;
//! - `ratio_3_to_1`. On this 2-core machine the workers and the three nats-servers share two
//!   cores: the ratio shows what the cluster's own work costs, not the scaling that more
//!   machines give (each worker then has its own cores; JetStream's replicated appends are
//!   the shared part).
//!
//! The simulator and the UDP hop are left out on purpose: at these rates a simulated
//! OpenSIPS on the same two cores overflows the bridge's UDP socket (kernel `RcvbufErrors`),
//! which measures the box, not callbus.
//!
//! `cargo run --release -p callbus-tests --bin bench-cluster` (20 000 calls); `-- --quick` for
//! CI (2 000).

use std::time::{Duration, Instant};

use bytes::Bytes;
use callbus_engine::cluster::{self, ClusterConfig, ClusterEngine};
use callbus_engine::EngineConfig;
use callbus_tests::cluster::settled;
use callbus_tests::stack::{timeouts, NODE};
use callbus_tests::NatsCluster;
use futures::StreamExt;

const PARTITIONS: u16 = 64;
const PER_BATCH: usize = 500;

fn datagram(call: usize, old: u8, new: u8) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","method":"E_DLG_STATE_CHANGED","params":{{"id":"b{call:x}.1","db_id":"{call}","callid":"{call}-bench@127.0.0.1","from_tag":"{call}Tag","to_tag":"{call}To","old_state":{old},"new_state":{new}}}}}"#
    )
}

/// Writes the calls' events to the node's input, in order, each batch after the previous.
async fn write_input(client: &async_nats::Client, calls: usize) {
    let js = cluster::context(client);
    cluster::ensure_streams(&js, &ClusterConfig { replicas: 3, ..ClusterConfig::default() }).await.expect("streams");
    let subject = callbus_schemas::input::subject(NODE).expect("subject");
    // Calls interleaved 100 at a time, each call's 4 events in order.
    let mut events = Vec::with_capacity(calls * 4);
    for chunk in (0..calls).collect::<Vec<_>>().chunks(100) {
        for (old, new) in [(1u8, 2u8), (2, 3), (3, 4), (4, 5)] {
            for call in chunk {
                events.push(datagram(*call, old, new));
            }
        }
    }
    let mut last = 0u64;
    let mut seq = 0u64;
    for batch in events.chunks(PER_BATCH) {
        let body = callbus_schemas::input::encode(batch.iter().map(|d| {
            seq += 1;
            (seq, d.as_bytes())
        }));
        let message = async_nats::jetstream::message::PublishMessage::build()
            .payload(Bytes::from(body))
            .expected_last_subject_sequence(last);
        last = js.send_publish(subject.clone(), message).await.expect("publish").await.expect("stored").sequence;
    }
}

async fn run(workers: usize, calls: usize) -> f64 {
    let nats = NatsCluster::start(3);
    nats.wait_jetstream().await;
    let client = nats.connect().await;
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
    let writing = tokio::spawn({
        let client = client.clone();
        async move { write_input(&client, calls).await }
    });
    let mut n = 0;
    while n < calls {
        match tokio::time::timeout(Duration::from_secs(60), ended.next()).await {
            Ok(Some(_)) => n += 1,
            _ => panic!("{n} of {calls} calls ended with {workers} workers"),
        }
    }
    let took = started.elapsed();
    writing.await.expect("writing the input");
    eprintln!("{workers} workers: {calls} calls ({} events) in {took:?}", calls * 4);
    for e in engines {
        e.shutdown().await;
    }
    (4 * calls) as f64 / took.as_secs_f64().max(1e-6)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let calls = if quick { 2_000 } else { 20_000 };
    let one = run(1, calls).await;
    println!("RESULT|events_per_s_1_worker|{one:.0}|events/s");
    let three = run(3, calls).await;
    println!("RESULT|events_per_s_3_workers|{three:.0}|events/s");
    println!("RESULT|ratio_3_to_1|{:.2}|x", three / one);
}

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
//! Takeover: one nats-server, 4 partitions, 2 workers; a history of N records is logged (N/4
//! proxied calls, each ended, plus 200 calls left live), then one worker is killed as `kill -9`
//! would (its tasks dropped, its leases left to expire) and new calls are written at once; timed
//! from the kill to the last new call of the killed worker's partitions ended. Printed as
//! `RESULT|takeover after kill -9, <N> records of history|…|s` for N = 10⁴, 10⁵, 10⁶, beside its
//! floor, the lease TTL (2 s) after which the survivor may take the partitions.
//!
//! `cargo run --release -p callbus-tests --bin bench-cluster` (20 000 calls; takeover at 10⁴,
//! 10⁵ and 10⁶ records); `-- --quick` for CI (2 000 calls; takeover at 10³ and 10⁴).

use std::time::{Duration, Instant};

use bytes::Bytes;
use callbus_engine::cluster::{self, ClusterConfig, ClusterEngine};
use callbus_engine::EngineConfig;
use callbus_tests::cluster::settled;
use callbus_tests::stack::{timeouts, NODE};
use callbus_tests::{NatsCluster, NatsServer};
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
    let mut input = Input::default();
    input.write(&js, &(0..calls).collect::<Vec<_>>(), 4).await;
}

/// The node's input stream as a bridge with `--events-acked` writes it.
#[derive(Default)]
struct Input {
    last: u64,
    seq: u64,
}

impl Input {
    /// Writes `calls`' first `events` events (4: the whole call, ended), interleaved 100 calls
    /// at a time, each call's events in order.
    async fn write(&mut self, js: &async_nats::jetstream::Context, calls: &[usize], events_per_call: usize) {
        let subject = callbus_schemas::input::subject(NODE).expect("subject");
        let mut events = Vec::with_capacity(calls.len() * events_per_call);
        for chunk in calls.chunks(100) {
            for (old, new) in [(1u8, 2u8), (2, 3), (3, 4), (4, 5)].into_iter().take(events_per_call) {
                for call in chunk {
                    events.push(datagram(*call, old, new));
                }
            }
        }
        for batch in events.chunks(PER_BATCH) {
            let body = callbus_schemas::input::encode(batch.iter().map(|d| {
                self.seq += 1;
                (self.seq, d.as_bytes())
            }));
            let message = async_nats::jetstream::message::PublishMessage::build()
                .payload(Bytes::from(body))
                .expected_last_subject_sequence(self.last);
            self.last =
                js.send_publish(subject.clone(), message).await.expect("publish").await.expect("stored").sequence;
        }
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

/// Partitions of the takeover run.
const TAKEOVER_PARTITIONS: u16 = 4;
/// Calls left live in the takeover run's history (in its snapshots).
const TAKEOVER_LIVE: usize = 200;

/// Takeover after `kill -9` of one of two workers with `records` records of history; seconds
/// from the kill to the last new call of its partitions ended.
async fn takeover(records: usize) -> f64 {
    let nats = NatsServer::start_jetstream();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = cluster::context(&client);
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let mut engines = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let config = EngineConfig {
            data_dir: dir.path().to_owned(),
            timeouts: timeouts(),
            nodes: vec![NODE.into()],
            reconcile: false,
            ..EngineConfig::default()
        };
        let cluster =
            ClusterConfig { worker: format!("w{i}"), partitions: TAKEOVER_PARTITIONS, ..ClusterConfig::default() };
        let client = async_nats::connect(nats.url()).await.expect("connect");
        engines.push(ClusterEngine::start(config, cluster, client).await.expect("worker"));
    }
    let owners = settled(&client, TAKEOVER_PARTITIONS, &["w0", "w1"], Duration::from_secs(60)).await;
    let mut ended = client.subscribe("callbus.call.*.ended").await.expect("sub");
    client.flush().await.expect("flush");
    // The history: ended calls, and some left live.
    let history_calls = records / 4;
    let mut input = Input::default();
    let started = Instant::now();
    let writing = {
        let js = js.clone();
        tokio::spawn(async move {
            let calls: Vec<usize> = (0..history_calls).collect();
            for chunk in calls.chunks(10_000) {
                input.write(&js, chunk, 4).await;
            }
            let live: Vec<usize> = (history_calls..history_calls + TAKEOVER_LIVE).collect();
            input.write(&js, &live, 2).await;
            input
        })
    };
    let mut n = 0;
    while n < history_calls {
        match tokio::time::timeout(Duration::from_secs(60), ended.next()).await {
            Ok(Some(_)) => n += 1,
            _ => panic!("{n} of {history_calls} history calls ended"),
        }
        if n % 50_000 == 0 {
            eprintln!("  history: {n} of {history_calls} calls ended after {:?}", started.elapsed());
        }
    }
    let mut input = writing.await.expect("writing the history");
    // The live calls' records are in too (their second event), then a snapshot interval at
    // most passes in a real system; here the kill comes at once: the tail is whatever the
    // owners logged since their last snapshot.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = "w1";
    let theirs: Vec<u16> = owners.iter().filter(|(_, w)| w.as_str() == victim).map(|(p, _)| *p).collect();
    let first_new = history_calls + TAKEOVER_LIVE;
    let new_calls: Vec<usize> = (first_new..first_new + 4_000)
        .filter(|c| theirs.contains(&cluster::partition_of(&format!("{c}-bench@127.0.0.1"), TAKEOVER_PARTITIONS)))
        .take(100)
        .collect();
    let wanted: std::collections::HashSet<String> = new_calls.iter().map(|c| format!("{c}-bench@127.0.0.1")).collect();
    let w1 = engines.pop().expect("w1");
    let killed = Instant::now();
    w1.abort();
    input.write(&js, &new_calls, 4).await;
    let mut left = wanted.len();
    while left > 0 {
        let msg = match tokio::time::timeout(Duration::from_secs(120), ended.next()).await {
            Ok(Some(m)) => m,
            _ => panic!("{left} of {} new calls not ended after the takeover", wanted.len()),
        };
        let note: serde_json::Value = serde_json::from_slice(&msg.payload).expect("notification");
        if note["sip_call_id"].as_str().is_some_and(|s| wanted.contains(s)) {
            left -= 1;
        }
    }
    let took = killed.elapsed().as_secs_f64();
    eprintln!(
        "  takeover with {records} records of history ({} live calls): {took:.2} s for partitions {theirs:?}",
        TAKEOVER_LIVE
    );
    for e in engines {
        e.shutdown().await;
    }
    took
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
    let sizes: &[usize] = if quick { &[1_000, 10_000] } else { &[10_000, 100_000, 1_000_000] };
    println!("RESULT|takeover floor: the lease TTL|{:.1}|s", ClusterConfig::default().lease_ttl.as_secs_f64());
    for records in sizes {
        let took = takeover(*records).await;
        println!("RESULT|takeover after kill -9, {records} records of history|{took:.2}|s");
    }
}

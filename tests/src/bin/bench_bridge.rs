//! Bridge benchmark: event datagrams bridged per second (UDP in → NATS subscriber) and MI round
//! trips through NATS, the bridge and the simulator. Prints `RESULT|figure|value|unit` lines.
//!
//! `cargo run --release -p callbus-tests --bin bench-bridge` (full: 3 runs of 500 k events,
//! 20 k sequential MI requests, 200 k with 64 in flight); `-- --quick` is the short CI run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callbus_bridge::{Bridge, BridgeConfig};
use callbus_tests::NatsServer;
use futures::StreamExt;
use opensips_sim::{Sim, SimConfig};

const NODE: &str = "bench";
/// The most datagrams the sender may be ahead of the subscriber (keeps the kernel buffers from
/// overflowing, so the figure is lossless throughput, not how fast UDP can drop).
const WINDOW: u64 = 2048;

struct Sizes {
    events: u64,
    runs: usize,
    mi_sequential: usize,
    mi_parallel: usize,
}

fn event_datagram(n: u64) -> Vec<u8> {
    let head = format!(
        r#"{{"jsonrpc":"2.0","method":"E_DLG_STATE_CHANGED","params":{{"id":"ed8.f137d1f","db_id":"9749829350175","callid":"{n}-"#
    );
    let tail = r#"@127.0.0.1","from_tag":"16765SIPpTag001","to_tag":"16764SIPpTag011","old_state":3,"new_state":4}}"#;
    let pad = 400usize.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "x".repeat(pad)).into_bytes()
}

async fn events_per_second(client: &async_nats::Client, target: SocketAddr, count: u64) -> (f64, u64) {
    let received = Arc::new(AtomicU64::new(0));
    let mut sub = client.subscribe(format!("opensips.{NODE}.event.>")).await.expect("subscribe");
    client.flush().await.expect("flush");
    let counter = Arc::clone(&received);
    let reader = tokio::spawn(async move {
        while counter.load(Ordering::Relaxed) < count {
            match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
                Ok(Some(_)) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                _ => break,
            }
        }
    });
    let progress = Arc::clone(&received);
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let datagrams: Vec<Vec<u8>> = (0..1024).map(event_datagram).collect();
        for n in 0..count {
            while n.saturating_sub(progress.load(Ordering::Relaxed)) > WINDOW {
                std::thread::sleep(Duration::from_micros(100));
            }
            let _ = socket.send_to(&datagrams[(n % 1024) as usize], target);
        }
    });
    let _ = tokio::task::spawn_blocking(move || sender.join()).await;
    let _ = reader.await;
    let elapsed = start.elapsed();
    let got = received.load(Ordering::Relaxed);
    (got as f64 / elapsed.as_secs_f64(), count - got)
}

async fn mi_round_trips(client: &async_nats::Client, sequential: usize, parallel: usize) -> (Duration, Duration, f64) {
    let subject = format!("opensips.{NODE}.mi.version");
    let mut samples = Vec::with_capacity(sequential);
    for _ in 0..sequential {
        let t = Instant::now();
        client.request(subject.clone(), Bytes::new()).await.expect("MI request");
        samples.push(t.elapsed());
    }
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let (p50, p99) = (p(0.50), p(0.99));
    let per_task = parallel / 64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let client = client.clone();
            let subject = subject.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    client.request(subject.clone(), Bytes::new()).await.expect("MI request");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    (p50, p99, (per_task * 64) as f64 / start.elapsed().as_secs_f64())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes = if quick {
        Sizes {
            events: std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000),
            runs: 1,
            mi_sequential: 500,
            mi_parallel: 6_400,
        }
    } else {
        Sizes { events: 500_000, runs: 3, mi_sequential: 20_000, mi_parallel: 200_000 }
    };
    // WORKERS=1 runs everything in-process on one thread (cross-thread wake-ups cost ~20 µs here).
    let workers: usize = std::env::var("WORKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()
    }
    .expect("runtime");
    runtime.block_on(async {
        let nats = NatsServer::start();
        let sim = Sim::start(SimConfig::default()).await.expect("sim");
        let bridge_client = async_nats::connect(nats.url()).await.expect("connect");
        let config = BridgeConfig {
            node: NODE.into(),
            mi: sim.mi_addr(),
            events_listen: "127.0.0.1:0".parse().expect("addr"),
            events: vec![],
            buffer_capacity: 1_000_000,
            ..BridgeConfig::default()
        };
        let bridge = Bridge::start(config, bridge_client).await.expect("bridge");
        let client = async_nats::connect(nats.url()).await.expect("connect");
        eprintln!("bench-bridge: {} events x {} runs, 400-byte datagrams", sizes.events, sizes.runs);
        let mut rates = Vec::new();
        for run in 1..=sizes.runs {
            let (rate, lost) = events_per_second(&client, bridge.events_addr(), sizes.events).await;
            eprintln!("  run {run}: {rate:.0} events/s, {lost} not received");
            rates.push(rate);
        }
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        println!("RESULT|events bridged UDP->NATS subscriber, 400 B|{median:.0}|events/s (median of {})", sizes.runs);
        let (p50, p99, rate) = mi_round_trips(&client, sizes.mi_sequential, sizes.mi_parallel).await;
        println!("RESULT|MI round trip sequential p50|{:.3}|ms", p50.as_secs_f64() * 1e3);
        println!("RESULT|MI round trip sequential p99|{:.3}|ms", p99.as_secs_f64() * 1e3);
        println!("RESULT|MI requests with 64 in flight|{rate:.0}|requests/s");
        let status = bridge.status();
        println!(
            "RESULT|datagrams in / published / overflowed|{}/{}/{}|datagrams",
            status.counters.datagrams_in, status.counters.published, status.counters.overflowed
        );
        println!(
            "RESULT|mean confirmed batch|{:.1}|events",
            status.counters.published as f64 / status.counters.batches.max(1) as f64
        );
        bridge.shutdown().await;
    });
}

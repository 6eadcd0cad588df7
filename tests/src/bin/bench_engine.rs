//! Engine benchmark. Prints `RESULT|figure|value|unit` lines.
//!
//! - durable ingest: E_DLG_STATE_CHANGED datagrams → bridge → NATS → engine (logged, flushed,
//!   notified) → a NATS subscriber; and a bare skeleton of the same path (receive, parse,
//!   append to sled, flush per batch, publish a notification), with the ratio;
//! - command round trip: `call.hold`/`call.unhold` request → logged → MI through the bridge →
//!   simulator reply → logged → `hold_requested` notified (p50, p99), and whole hold/unhold
//!   commands per second with 64 in flight (through the re-INVITE events to `command_succeeded`);
//!   with the bridge and the engine apart (over NATS), then wired as `callbus up` wires them
//!   (events and MI handed over in-process);
//! - the floor of that round trip with the same two commits and nothing else (request, commit,
//!   MI round trip to the simulator, commit, reply);
//! - memory per live call (growth of RSS and of the heap in use) and restart time with that many
//!   live calls (`up` wiring).
//!
//! `cargo run --release -p callbus-tests --bin bench-engine` (full: 200 k events × 5 on each side, 5 k
//! sequential commands, 20 k with 64 in flight, 100 k live calls); `-- --quick` for CI;
//! `-- --live 1000000` for the memory and restart figures at a million live calls;
//! `-- --ingest-only` stops after the ingest figures and prints each side's spans on
//! CLOCK_MONOTONIC (the two take turns, run by run), to profile them apart (`perf record -k
//! CLOCK_MONOTONIC -g -- …`, then `perf report --time <from>,<until>` for each span).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use callbus_bridge::{Bridge, BridgeConfig};
use callbus_engine::{Engine, EngineConfig};
use callbus_schemas::command::CallNotification;
use callbus_schemas::event::Event;
use callbus_tests::NatsServer;
use callbus_tests::{heap_in_use, rss_bytes};
use futures::{FutureExt, StreamExt};
use opensips_sim::{CallScript, Sim, SimConfig};
use serde_json::json;
use tokio::sync::mpsc;

const NODE: &str = "bench";
/// Sum and count of request → `accepted` reply times (the first half of the round trip).
static ACCEPTED_US: AtomicU64 = AtomicU64::new(0);
static ACCEPTED_N: AtomicU64 = AtomicU64::new(0);
/// Events the sender may be ahead of the notifications: kept well under what the bridge's
/// socket buffer holds (4 MiB here), so the figure is lossless throughput.
const WINDOW: u64 = 1024;

struct Sizes {
    events: u64,
    runs: usize,
    sequential: usize,
    parallel: usize,
    live: u64,
}

fn dlg_event(call: u64, old: i64, new: i64) -> Vec<u8> {
    format!(
        r#"{{"jsonrpc":"2.0","method":"E_DLG_STATE_CHANGED","params":{{"id":"{call:x}.ceaa9416","db_id":"{call}","callid":"{call}-16765@127.0.0.1","from_tag":"16765SIPpTag001","to_tag":"16764SIPpTag011","old_state":{old},"new_state":{new}}}}}"#
    )
    .into_bytes()
}

/// Sends the events of calls `first..first+calls` (`per_call` state changes each) with at most
/// WINDOW ahead of `done`, and returns when `done` reaches `target`.
async fn drive(to: SocketAddr, first: u64, calls: u64, per_call: usize, done: Arc<AtomicU64>, target: u64) -> Duration {
    let start = Instant::now();
    let base = done.load(Ordering::Relaxed);
    let progress = Arc::clone(&done);
    let sender = std::thread::spawn(move || {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let steps = [(1, 2), (2, 3), (3, 4), (4, 5)];
        let mut sent = 0u64;
        for call in first..first + calls {
            for (old, new) in steps.iter().take(per_call) {
                while sent.saturating_sub(progress.load(Ordering::Relaxed) - base) > WINDOW {
                    std::thread::sleep(Duration::from_micros(100));
                }
                let _ = socket.send_to(&dlg_event(call, *old, *new), to);
                sent += 1;
            }
        }
    });
    let _ = tokio::task::spawn_blocking(move || sender.join()).await;
    let (mut last, mut last_change) = (done.load(Ordering::Relaxed), Instant::now());
    while done.load(Ordering::Relaxed) < target {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let now = done.load(Ordering::Relaxed);
        if now != last {
            (last, last_change) = (now, Instant::now());
        } else if last_change.elapsed() > Duration::from_secs(5) {
            eprintln!("  {} notifications never came (UDP datagrams dropped before the bridge?): see RcvbufErrors in /proc/net/snmp", target - now);
            break;
        }
    }
    start.elapsed()
}

/// Counts every notification, and hands those with a cmd_id to whoever waits for it.
async fn sink(
    client: async_nats::Client,
    count: Arc<AtomicU64>,
    waiters: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<String>>>>,
) {
    let mut sub = client.subscribe("callbus.call.>").await.expect("sub");
    while let Some(msg) = sub.next().await {
        count.fetch_add(1, Ordering::Relaxed);
        if let Ok(note) = serde_json::from_slice::<CallNotification>(&msg.payload) {
            if let Some(cmd) = &note.cmd_id {
                if let Some(tx) = waiters.lock().expect("lock").get(cmd) {
                    let _ = tx.send(note.event.clone());
                }
            }
        }
    }
}

/// A turn of the skeleton: `ready` once it is subscribed; it stops at `stop`.
struct Turn {
    ready: tokio::sync::oneshot::Sender<()>,
    stop: tokio::sync::oneshot::Receiver<()>,
}

/// The skeleton: receive, parse, append, commit per batch (the engine's own log: sled insert,
/// write-ahead file), publish. The log is opened as the engine opens its own by default (the
/// same page cache), so the two differ only in what is done per input. It takes the events
/// only during its turns (subscribed for each), its log going on from turn to turn.
async fn skeleton(client: async_nats::Client, dir: std::path::PathBuf, mut turns: mpsc::Receiver<Turn>) {
    use callbus_engine::log::{EventLog, SledLog};
    let log = SledLog::open_with_cache(&dir, EngineConfig::default().cache_bytes).expect("log");
    let mut seq = 0u64;
    while let Some(Turn { ready, mut stop }) = turns.recv().await {
        let mut sub = client.subscribe(format!("opensips.{NODE}.event.>")).await.expect("sub");
        client.flush().await.expect("flush");
        let _ = ready.send(());
        loop {
            let first = tokio::select! {
                m = sub.next() => m,
                _ = &mut stop => break,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while batch.len() < 1024 {
                match tokio::task::unconstrained(sub.next()).now_or_never() {
                    Some(Some(m)) => batch.push(m),
                    _ => break,
                }
            }
            let mut notes = Vec::with_capacity(batch.len());
            for msg in &batch {
                seq += 1;
                let Ok(Event::DlgStateChanged(d)) = Event::parse(&msg.payload) else { continue };
                let value = rmp_serde::to_vec_named(&(seq, &d.callid, std::str::from_utf8(&msg.payload).unwrap_or("")))
                    .expect("encode");
                log.stage_raw(seq, &d.callid, &value).expect("stage");
                let body = json!({"seq": seq, "call_id": "s", "sip_call_id": d.callid, "event": d.new_state.name(), "data": {}});
                notes
                    .push((format!("callbus.call.s{}.{}", d.db_id, d.new_state.name()), Bytes::from(body.to_string())));
            }
            // Committed on this task, as the engine's log is.
            log.commit().await.expect("commit");
            for (subject, body) in notes {
                client.publish(subject, body).await.expect("publish");
            }
        }
        let _ = sub.unsubscribe().await;
        client.flush().await.expect("flush");
    }
}

/// The floor of a command's round trip with the durability the engine keeps: a NATS request;
/// the command appended to the engine's log and committed (its write-ahead file synced on the
/// committing task; one commit covers every command staged before it); an MI datagram to the
/// simulator (`version`) and its reply, matched by id; the reply appended and committed; the
/// answer published. No machine, no notification JSON, no bridge. Returns p50 and p99 (ms) over `n` requests one at a time, and
/// commands/s with 64 in flight over `parallel`.
async fn command_floor(client: &async_nats::Client, mi: SocketAddr, n: usize, parallel: usize) -> (f64, f64, f64) {
    use callbus_engine::log::{EventLog, SledLog};
    type Replies = Arc<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Vec<u8>>>>>;
    let dir = tempfile::tempdir().expect("tmp");
    let log = Arc::new(SledLog::open(dir.path()).expect("log"));
    let socket = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("udp"));
    socket.connect(mi).await.expect("connect");
    let replies: Replies = Arc::default();
    let reader = tokio::spawn({
        let (socket, replies) = (Arc::clone(&socket), Arc::clone(&replies));
        async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(len) = socket.recv(&mut buf).await {
                let Ok(reply) = serde_json::from_slice::<serde_json::Value>(&buf[..len]) else { continue };
                let id = reply["id"].as_str().and_then(|i| i.trim_start_matches('f').parse::<u64>().ok());
                if let Some(waiter) = id.and_then(|id| replies.lock().expect("lock").remove(&id)) {
                    let _ = waiter.send(buf[..len].to_vec());
                }
            }
        }
    });
    let mut sub = client.subscribe("bench.floor.cmd").await.expect("sub");
    client.flush().await.expect("flush");
    let responder = client.clone();
    let engine = tokio::spawn(async move {
        let seq = Arc::new(AtomicU64::new(0));
        while let Some(msg) = sub.next().await {
            let (log, socket, replies, seq, responder) =
                (Arc::clone(&log), Arc::clone(&socket), Arc::clone(&replies), Arc::clone(&seq), responder.clone());
            tokio::spawn(async move {
                let first = seq.fetch_add(2, Ordering::Relaxed) + 1;
                log.stage_raw(first, "floor", &msg.payload).expect("stage");
                log.commit().await.expect("commit");
                let (tx, rx) = tokio::sync::oneshot::channel();
                replies.lock().expect("lock").insert(first, tx);
                let request = format!(r#"{{"jsonrpc":"2.0","method":"version","id":"f{first}"}}"#);
                socket.send(request.as_bytes()).await.expect("mi send");
                let answer = rx.await.expect("mi reply");
                log.stage_raw(first + 1, "floor", &answer).expect("stage");
                log.commit().await.expect("commit");
                if let Some(reply) = msg.reply {
                    responder.publish(reply, Bytes::from_static(b"{\"event\":\"requested\"}")).await.expect("reply");
                }
            });
        }
    });
    let mut samples = Vec::with_capacity(n);
    for k in 0..n {
        let start = Instant::now();
        client.request("bench.floor.cmd", Bytes::from(format!(r#"{{"cmd_id":"f{k}"}}"#))).await.expect("reply");
        samples.push(start.elapsed());
    }
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e3;
    let start = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                for k in 0..parallel / 64 {
                    let body = Bytes::from(format!(r#"{{"cmd_id":"p{t}-{k}"}}"#));
                    client.request("bench.floor.cmd", body).await.expect("reply");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let rate = (parallel / 64 * 64) as f64 / start.elapsed().as_secs_f64();
    engine.abort();
    reader.abort();
    (p(0.5), p(0.99), rate)
}

type Waiters = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<String>>>>;

/// One command: request → `accepted`, then notifications until `command_…`; returns the time
/// to `…_requested` (the MI reply logged and notified).
async fn request(client: &async_nats::Client, waiters: &Waiters, verb: &str, sip: &str, cmd_id: String) -> Duration {
    let (tx, mut rx) = mpsc::unbounded_channel();
    waiters.lock().expect("lock").insert(cmd_id.clone(), tx);
    let body = json!({"sip_call_id": sip, "cmd_id": cmd_id}).to_string();
    let start = Instant::now();
    client.request(format!("callbus.cmd.{verb}"), Bytes::from(body)).await.expect("reply");
    let accepted = start.elapsed();
    ACCEPTED_US.fetch_add(accepted.as_micros() as u64, Ordering::Relaxed);
    ACCEPTED_N.fetch_add(1, Ordering::Relaxed);
    let mut requested = None;
    while let Some(event) = rx.recv().await {
        if event.ends_with("_requested") {
            requested = Some(start.elapsed());
        }
        if event.starts_with("command_") {
            break;
        }
    }
    waiters.lock().expect("lock").remove(&cmd_id);
    requested.unwrap_or(Duration::MAX)
}

/// Hold/unhold on 64 confirmed calls: one at a time (round trip p50, p99), then 64 in flight.
async fn commands(client: &async_nats::Client, waiters: &Waiters, sim: &Sim, sizes: &Sizes, wiring: &str) {
    ACCEPTED_US.store(0, Ordering::Relaxed);
    ACCEPTED_N.store(0, Ordering::Relaxed);
    let mut calls = Vec::new();
    for _ in 0..64 {
        calls.push(sim.proxied_call(CallScript::default()));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut samples = Vec::new();
    for k in 0..sizes.sequential {
        let verb = if k % 2 == 0 { "call.hold" } else { "call.unhold" };
        samples.push(request(client, waiters, verb, &calls[0], format!("{wiring}-s{k}")).await);
    }
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e3;
    println!("RESULT|command round trip to hold_requested, {wiring}, p50|{:.3}|ms", p(0.5));
    println!("RESULT|command round trip to hold_requested, {wiring}, p99|{:.3}|ms", p(0.99));
    println!(
        "RESULT|of which request → accepted reply (logged, flushed), {wiring}, mean|{:.3}|ms",
        ACCEPTED_US.load(Ordering::Relaxed) as f64 / ACCEPTED_N.load(Ordering::Relaxed).max(1) as f64 / 1e3
    );
    let per_task = sizes.parallel / 64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let (sip, client, waiters) = (calls[t].clone(), client.clone(), Arc::clone(waiters));
            // Call 0 ended the sequential run held or not: start from its state.
            let offset = if t == 0 { sizes.sequential % 2 } else { 0 };
            let wiring = wiring.to_owned();
            tokio::spawn(async move {
                for k in 0..per_task {
                    let verb = if (k + offset) % 2 == 0 { "call.hold" } else { "call.unhold" };
                    request(&client, &waiters, verb, &sip, format!("{wiring}-p{t}-{k}")).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    println!(
        "RESULT|hold/unhold commands completed with 64 in flight, {wiring}|{:.0}|commands/s",
        (per_task * 64) as f64 / start.elapsed().as_secs_f64()
    );
}

/// Seconds on CLOCK_MONOTONIC (the clock `perf record -k CLOCK_MONOTONIC` stamps samples with).
#[allow(unsafe_code)]
fn monotonic() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the time into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--ingest-only`: the ingest figures alone, with each side's time span for a profiler.
    let ingest_only = std::env::args().any(|a| a == "--ingest-only");
    let sizes = if quick {
        Sizes { events: 20_000, runs: 1, sequential: 300, parallel: 1_280, live: 5_000 }
    } else {
        Sizes { events: 200_000, runs: 5, sequential: 5_000, parallel: 20_000, live: 100_000 }
    };
    // `--live N`: the memory and restart figures with N live calls (e.g. 1000000).
    let args: Vec<String> = std::env::args().collect();
    let mut sizes = sizes;
    if let Some(n) = args.iter().position(|a| a == "--live").and_then(|i| args.get(i + 1)).and_then(|n| n.parse().ok())
    {
        sizes.live = n;
    }
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let nats = NatsServer::start();
        let sim = Sim::start(SimConfig { step: Duration::ZERO, ..SimConfig::default() }).await.expect("sim");
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let bridge_config = BridgeConfig {
            node: NODE.into(),
            mi: sim.mi_addr(),
            events_listen: "127.0.0.1:0".parse().expect("addr"),
            buffer_capacity: 1_000_000,
            ..BridgeConfig::default()
        };
        let bridge_client = async_nats::connect(nats.url()).await.expect("connect");
        let bridge = Bridge::start(bridge_config.clone(), bridge_client.clone()).await.expect("bridge");
        let to = bridge.events_addr();
        let count = Arc::new(AtomicU64::new(0));
        let waiters: Waiters = Arc::default();
        tokio::spawn(sink(
            async_nats::connect(nats.url()).await.expect("connect"),
            Arc::clone(&count),
            Arc::clone(&waiters),
        ));
        let mut next_call = 1u64;

        // The skeleton and the engine take turns, run by run (each alone on the bus, each
        // going on with its own log), so that a drift of this VM's speed over the minutes
        // weighs on both alike.
        let skeleton_dir = tempfile::tempdir().expect("tmp");
        let data = tempfile::tempdir().expect("tmp");
        let config = EngineConfig {
            data_dir: data.path().to_owned(),
            nodes: vec![NODE.into()],
            reconcile: false,
            ..EngineConfig::default()
        };
        let (turns, turns_rx) = mpsc::channel(1);
        let skel = tokio::spawn(skeleton(
            async_nats::connect(nats.url()).await.expect("connect"),
            skeleton_dir.path().to_owned(),
            turns_rx,
        ));
        let (mut skeleton_rates, mut engine_rates) = (Vec::new(), Vec::new());
        let (mut skeleton_spans, mut engine_spans) = (Vec::new(), Vec::new());
        let mut engine = None;
        for run in 0..sizes.runs {
            if let Some(engine) = engine.take() {
                Engine::shutdown(engine).await;
            }
            let (ready, ready_rx) = tokio::sync::oneshot::channel();
            let (stop, stop_rx) = tokio::sync::oneshot::channel();
            turns.send(Turn { ready, stop: stop_rx }).await.expect("skeleton");
            ready_rx.await.expect("skeleton subscribed");
            let from = monotonic();
            let calls = sizes.events / 4;
            let target = count.load(Ordering::Relaxed) + sizes.events;
            let t = drive(to, next_call, calls, 4, Arc::clone(&count), target).await;
            next_call += calls;
            skeleton_spans.push((from, monotonic()));
            let skeleton_rate = sizes.events as f64 / t.as_secs_f64();
            skeleton_rates.push(skeleton_rate);
            let _ = stop.send(());
            tokio::time::sleep(Duration::from_millis(200)).await;

            let started = Engine::start(config.clone(), client.clone()).await.expect("engine");
            client.flush().await.expect("flush");
            engine = Some(started);
            let from = monotonic();
            let target = count.load(Ordering::Relaxed) + sizes.events;
            let t = drive(to, next_call, calls, 4, Arc::clone(&count), target).await;
            next_call += calls;
            engine_spans.push((from, monotonic()));
            let rate = sizes.events as f64 / t.as_secs_f64();
            eprintln!("  ingest run {}: engine {rate:.0} events/s, skeleton {skeleton_rate:.0}", run + 1);
            engine_rates.push(rate);
        }
        let engine = engine.expect("at least one run");
        drop(turns);
        let _ = skel.await;
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (e, k) = (median(&mut engine_rates), median(&mut skeleton_rates));
        println!("RESULT|durable ingest, engine (logged, flushed, notified)|{e:.0}|events/s");
        println!("RESULT|durable ingest, bare skeleton of the same path|{k:.0}|events/s");
        println!("RESULT|engine / skeleton|{:.2}|ratio", e / k);
        if ingest_only {
            // For `perf record -k CLOCK_MONOTONIC`, then `perf report --time <from>,<until>`.
            let spans =
                |v: &[(f64, f64)]| v.iter().map(|(a, b)| format!("{a:.6},{b:.6}")).collect::<Vec<_>>().join(",");
            eprintln!("skeleton ingest: --time {}", spans(&skeleton_spans));
            eprintln!("engine ingest: --time {}", spans(&engine_spans));
            engine.shutdown().await;
            bridge.shutdown().await;
            return;
        }

        // Commands, bridge and engine apart (over NATS).
        commands(&client, &waiters, &sim, &sizes, "bridge and engine apart").await;

        // `callbus up`'s wiring: a new bridge hands its events and MI to a new engine in-process.
        engine.shutdown().await;
        bridge.shutdown().await;
        let (tap, events) = mpsc::channel(100_000);
        let bridge = Bridge::start_with_tap(bridge_config.clone(), bridge_client, Some(tap)).await.expect("bridge");
        let local = callbus_tests::stack::local_node(&bridge, events);
        let socket = format!("udp:{}", bridge.events_addr());
        while sim.live_subscriptions().iter().filter(|(_, s, _)| *s == socket).count() < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let to = bridge.events_addr();
        let data = tempfile::tempdir().expect("tmp");
        let config = EngineConfig { data_dir: data.path().to_owned(), ..config };
        let engine =
            Engine::start_with_local(config.clone(), client.clone(), Some(local.clone())).await.expect("engine");
        client.flush().await.expect("flush");
        commands(&client, &waiters, &sim, &sizes, "callbus up").await;
        let (p50, p99, rate) = command_floor(&client, sim.mi_addr(), sizes.sequential, sizes.parallel).await;
        println!("RESULT|floor of a command round trip with two commits (request, commit, MI round trip, commit, reply), p50|{p50:.3}|ms");
        println!("RESULT|floor of a command round trip with two commits, p99|{p99:.3}|ms");
        println!("RESULT|floor with two commits, 64 in flight|{rate:.0}|commands/s");

        // Memory per live call and restart time.
        let (rss_before, heap_before) = (rss_bytes(), heap_in_use().unwrap_or(0));
        let target = count.load(Ordering::Relaxed) + sizes.live * 3;
        drive(to, next_call, sizes.live, 3, Arc::clone(&count), target).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rss_after, heap_after) = (rss_bytes(), heap_in_use().unwrap_or(0));
        // RSS growth undercounts when the allocator reuses pages the earlier phases freed; the
        // heap in use counts what the calls hold.
        println!(
            "RESULT|RSS growth per live call ({} live calls)|{}|bytes",
            sizes.live,
            rss_after.saturating_sub(rss_before) / sizes.live
        );
        println!(
            "RESULT|heap in use growth per live call ({} live calls)|{}|bytes",
            sizes.live,
            heap_after.saturating_sub(heap_before) / sizes.live
        );
        engine.shutdown().await;
        let start = Instant::now();
        let engine = Engine::start_with_local(config, client.clone(), Some(local)).await.expect("restart");
        let ready = start.elapsed();
        println!(
            "RESULT|restart with {} live calls ready|{:.3}|s ({} recovered)",
            sizes.live,
            ready.as_secs_f64(),
            engine.recovered_live_calls()
        );
        engine.shutdown().await;
        bridge.shutdown().await;
    });
}

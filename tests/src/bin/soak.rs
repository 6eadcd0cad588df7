//! Soak: steady mixed traffic through the simulator, the bridge and the engine as `callbus up`
//! wires them, with retention on, for a long time; prints RSS, the data dir's size and command
//! latency at the start and the end, with their slopes. Flat slopes are the point: a year-long
//! run must not grow.
//!
//! Every second: `--rate` proxied calls (hung up after 2 s), one UA client call (`ua.start`,
//! answered, then `ua.terminate`), one click-to-dial call (`call.start`, both legs answer, then
//! `call.end`). Retention keeps 30 s of ended calls in the log; ended calls stay in memory 5 s,
//! `cmd_id`s 60 s (each at its steady state within the first minute, so what still grows is a
//! leak).
//! Each sample (every 10 s) takes RSS, the data dir's bytes and the median time from a
//! `call.start` request to its `accepted` answer (logged, flushed) over the sample.
//!
//! The allocator is set as `callbus` sets it (`callbus_engine::allocator::tune`;
//! `--malloc-as-is` leaves glibc's defaults, to compare).
//!
//! `cargo run --release -p callbus-tests --bin soak -- --minutes 60` (the documented long run);
//! `-- --minutes 2` in CI. Prints `RESULT|…` lines; the slopes are per hour, from a least-squares
//! line over the samples after the first minute (the log and the caches fill up first), and
//! again over the second half of the run alone (the allocator's own pages settle over the
//! first ten minutes or so).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callbus_tests::stack::{accepted, Stack};
use callbus_tests::{heap_from_system, heap_in_use, rss_bytes};
use opensips_sim::{CallScript, SimConfig};
use serde_json::json;

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_bytes(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// One sample: minutes since the start, RSS, data dir bytes, median accept latency (ms), heap
/// in use and heap taken from the system (bytes; 0 where the allocator does not say).
type Sample = (f64, f64, f64, f64, f64, f64);

/// The least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let cov: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    if var == 0.0 {
        0.0
    } else {
        cov / var
    }
}

fn arg(name: &str) -> Option<f64> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

fn main() {
    // As `callbus` does, before any thread (`--malloc-as-is`: glibc's defaults, to compare).
    if !std::env::args().any(|a| a == "--malloc-as-is") {
        callbus_engine::allocator::tune();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    runtime.unwrap_or_else(|e| panic!("no tokio runtime: {e}")).block_on(soak());
}

async fn soak() {
    let minutes = arg("--minutes").unwrap_or(60.0);
    let rate = arg("--rate").unwrap_or(20.0).max(1.0) as usize;
    // sled's page cache (64 MiB by default), smaller to see it full within the run.
    let cache_mib = arg("--cache-mib");
    let mut stack = Stack::start_up(SimConfig::default()).await;
    stack
        .start_engine_with(|c| {
            c.retention = Some(Duration::from_secs(30));
            c.ended_retention = Duration::from_secs(5);
            // Four cmd_ids a second against the default window (24 h, at most 100 000 kept)
            // would fill for seven hours: a minute's window reaches its steady state at once,
            // as the retentions do.
            c.cmd_id_window = Duration::from_secs(60);
            if let Some(mib) = cache_mib {
                c.cache_bytes = (mib * 1024.0 * 1024.0) as u64;
            }
        })
        .await;
    // The notifications are not read here: the subscription would only queue them.
    let _ = stack.notes.unsubscribe().await;
    let stack = Arc::new(stack);
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(minutes * 60.0);
    let mut samples: Vec<Sample> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut flows = tokio::task::JoinSet::new();
    let mut second = 0u64;
    eprintln!("soak: {minutes} min, {rate} proxied calls/s + 1 UA + 1 click-to-dial call/s");
    while Instant::now() < until {
        tick.tick().await;
        second += 1;
        for _ in 0..rate {
            stack.sim.proxied_call(CallScript { hangup_after: Some(Duration::from_secs(2)), ..Default::default() });
        }
        let s = Arc::clone(&stack);
        flows.spawn(async move {
            let (call_id, _) =
                accepted(&s.cmd("ua.start", json!({"to": "sip:uas@127.0.0.1", "from": "sip:soak@h"})).await);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = s.cmd("ua.terminate", json!({"call_id": call_id})).await;
        });
        let (s, times) = (Arc::clone(&stack), Arc::clone(&latencies));
        flows.spawn(async move {
            let asked = Instant::now();
            let reply = s.cmd("call.start", json!({"caller": "sip:a@127.0.0.1", "callee": "sip:b@127.0.0.1"})).await;
            let took = asked.elapsed().as_secs_f64() * 1e3;
            let (call_id, _) = accepted(&reply);
            times.lock().unwrap_or_else(|p| p.into_inner()).push(took);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = s.cmd("call.end", json!({"call_id": call_id})).await;
        });
        while let Some(done) = flows.try_join_next() {
            if let Err(e) = done {
                panic!("a flow failed: {e}");
            }
        }
        if second.is_multiple_of(10) {
            let mut window = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
            window.sort_by(f64::total_cmp);
            let median = window.get(window.len() / 2).copied().unwrap_or(0.0);
            let at = started.elapsed().as_secs_f64() / 60.0;
            let heap = heap_in_use().unwrap_or(0) as f64;
            let taken = heap_from_system().unwrap_or(0) as f64;
            let sample = (at, rss_bytes() as f64, dir_bytes(stack.data.path()) as f64, median, heap, taken);
            eprintln!(
                "  {at:5.1} min: RSS {:.1} MiB (heap in use {:.1} MiB of {:.1} taken), data dir {:.1} MiB, call.start accepted in {median:.2} ms (median)",
                sample.1 / 1048576.0,
                heap / 1048576.0,
                taken / 1048576.0,
                sample.2 / 1048576.0
            );
            samples.push(sample);
        }
    }
    while let Some(done) = flows.join_next().await {
        if let Err(e) = done {
            panic!("a flow failed: {e}");
        }
    }
    let steady: Vec<Sample> = samples.iter().copied().filter(|s| s.0 >= 1.0).collect();
    let steady = if steady.len() >= 2 { steady } else { samples.clone() };
    let (first, last) = (steady.first().copied().unwrap_or_default(), steady.last().copied().unwrap_or_default());
    let per_hour = |f: fn(&Sample) -> f64| slope(&steady.iter().map(|s| (s.0, f(s))).collect::<Vec<_>>()) * 60.0;
    println!("RESULT|soak duration|{:.1}|min", started.elapsed().as_secs_f64() / 60.0);
    println!("RESULT|soak RSS at start, at end|{:.1}, {:.1}|MiB", first.1 / 1048576.0, last.1 / 1048576.0);
    println!("RESULT|soak RSS slope|{:.2}|MiB/h", per_hour(|s| s.1) / 1048576.0);
    println!("RESULT|soak heap in use at start, at end|{:.1}, {:.1}|MiB", first.4 / 1048576.0, last.4 / 1048576.0);
    println!("RESULT|soak heap in use slope|{:.2}|MiB/h", per_hour(|s| s.4) / 1048576.0);
    println!(
        "RESULT|soak heap taken from the system at start, at end|{:.1}, {:.1}|MiB",
        first.5 / 1048576.0,
        last.5 / 1048576.0
    );
    println!("RESULT|soak heap taken from the system slope|{:.2}|MiB/h", per_hour(|s| s.5) / 1048576.0);
    println!("RESULT|soak data dir at start, at end|{:.1}, {:.1}|MiB", first.2 / 1048576.0, last.2 / 1048576.0);
    println!("RESULT|soak data dir slope|{:.2}|MiB/h", per_hour(|s| s.2) / 1048576.0);
    println!("RESULT|soak call.start accepted, median at start, at end|{:.2}, {:.2}|ms", first.3, last.3);
    println!("RESULT|soak call.start accepted slope|{:.3}|ms/h", per_hour(|s| s.3));
    // The second half alone: what still grows once the allocator and sled have settled.
    let half = minutes / 2.0;
    let late: Vec<Sample> = steady.iter().copied().filter(|s| s.0 >= half).collect();
    let late_per_hour = |f: fn(&Sample) -> f64| slope(&late.iter().map(|s| (s.0, f(s))).collect::<Vec<_>>()) * 60.0;
    println!("RESULT|soak RSS slope, second half|{:.2}|MiB/h", late_per_hour(|s| s.1) / 1048576.0);
    println!("RESULT|soak heap in use slope, second half|{:.2}|MiB/h", late_per_hour(|s| s.4) / 1048576.0);
    println!("RESULT|soak data dir slope, second half|{:.2}|MiB/h", late_per_hour(|s| s.2) / 1048576.0);
    println!("RESULT|soak call.start accepted slope, second half|{:.3}|ms/h", late_per_hour(|s| s.3));
    if let Ok(mut stack) = Arc::try_unwrap(stack) {
        stack.shutdown().await;
    }
}

//! Replay benchmark: writes a log of real machine steps (proxied calls: 1→2, 2→3, 3→4, 4→5),
//! then times `check` (every record through today's machine, compared) and `export` (jsonl).
//! Prints `RESULT|figure|value|unit` lines.
//!
//! `cargo run --release -p callbus-tests --bin bench-replay` (1 M records); `-- --quick`
//! (100 k) is the CI run.

use std::time::Instant;

use callbus_engine::log::{EventLog, Record, SledLog, RECORD_FORMAT};
use callbus_engine::machines::{CallState, Ctx, DialogState, Input, Timeouts};
use callbus_replay::{CheckOptions, ExportFormat, LogReader};

fn datagram(call: u64, old: i64, new: i64) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","method":"E_DLG_STATE_CHANGED","params":{{"id":"{call:x}.ceaa9416","db_id":"{call}","callid":"{call}-16765@127.0.0.1","from_tag":"16765SIPpTag001","to_tag":"16764SIPpTag011","old_state":{old},"new_state":{new}}}}}"#
    )
}

/// Bytes this process caused to be written to storage (`/proc/self/io`, `write_bytes`).
fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| io.lines().find_map(|l| l.strip_prefix("write_bytes: ").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(0)
}

/// Writes `records` of the proxied-call mix (batches of 100 calls committed together, a
/// checkpoint every 10 000 calls); with `retention`, a retention step after each checkpoint
/// removes every call older than the last 100 000 records' time, as `engine.retention` would,
/// archiving them (the archive's bytes are counted apart).
/// Returns the bytes written to disk per record (the write-ahead file, sled's segments, its
/// snapshot of the page table), the log closed, and the log's size on disk at the end.
/// With `plain`, records are stored as encoded, with no dictionary (the peer of compression).
fn write_log(
    dir: &std::path::Path,
    records: u64,
    retention: bool,
    plain: bool,
    runtime: &tokio::runtime::Runtime,
) -> (f64, u64) {
    let archive_dir = tempfile::tempdir().expect("tmp");
    let archive = callbus_engine::log::archive::Archive::open(archive_dir.path()).expect("archive");
    let (mut archived, mut removed) = (0u64, 0u64);
    let before = written_bytes();
    let size;
    {
        let log = SledLog::open(dir).expect("open");
        if plain {
            log.keep_records_plain();
        }
        let timeouts = Timeouts::default();
        let mut seq = 0u64;
        for call in 0..records / 4 {
            let call_id = format!("c{call:016x}");
            let mut state = CallState::Dialog(DialogState::new("bench", &format!("{call}-16765@127.0.0.1")));
            let mut before = None;
            for (old, new) in [(1, 2), (2, 3), (3, 4), (4, 5)] {
                seq += 1;
                let input =
                    Input::Event { node: "bench".into(), bridge_seq: Some(seq), datagram: datagram(call, old, new) };
                let ctx = Ctx { call_id: &call_id, seq, now_ms: 1_795_417_936_000 + seq, timeouts };
                let (after, effects) = state.step(&input, &ctx);
                let record = Record {
                    format: RECORD_FORMAT,
                    seq,
                    time_ms: ctx.now_ms,
                    call_id: call_id.clone(),
                    partition: 0,
                    input,
                    before: before.clone(),
                    after: after.clone(),
                    effects,
                };
                log.stage(&record).expect("stage");
                before = Some(after.name().into());
                state = after;
            }
            if call % 100 == 99 {
                runtime.block_on(log.commit()).expect("commit");
            }
            if call % 10_000 == 9_999 {
                log.stage_checkpoint(seq).expect("checkpoint");
                runtime.block_on(log.commit()).expect("commit");
                if retention && seq > 100_000 {
                    let cutoff = 1_795_417_936_000 + seq - 100_000;
                    let mut from = 1;
                    loop {
                        let step = log.prune(from, cutoff, |_| false, 20_000, Some(&archive)).expect("prune");
                        runtime.block_on(log.commit()).expect("commit");
                        archived += step.archived_bytes;
                        removed += step.records as u64;
                        match step.next {
                            Some(next) => from = next,
                            None => break,
                        }
                    }
                }
            }
        }
        log.stage_checkpoint(seq).expect("checkpoint");
        runtime.block_on(log.commit()).expect("commit");
        size = log.size_on_disk();
    }
    let written = written_bytes() - before - archived;
    if removed > 0 {
        println!(
            "RESULT|archive size per record (engine.archive_dir, zstd)|{:.0}|bytes",
            archived as f64 / removed as f64
        );
    }
    (written as f64 / records as f64, size)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let records: u64 = if quick { 100_000 } else { 1_000_000 };
    let dir = tempfile::tempdir().expect("tmp");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    // Write amplification: disk bytes written per record, without and with retention.
    let amplification = if quick { 200_000 } else { 1_000_000 };
    for (retention, plain) in [(false, true), (false, false), (true, false)] {
        let dir = tempfile::tempdir().expect("tmp");
        let (per_record, size) = write_log(dir.path(), amplification, retention, plain, &runtime);
        let with = match (retention, plain) {
            (_, true) => "records stored plain (no dictionary), without retention",
            (true, _) => "with retention keeping the last 100 000",
            _ => "without retention",
        };
        println!("RESULT|disk bytes written per record, {with} ({amplification} records)|{per_record:.0}|bytes");
        println!("RESULT|log size on disk at the end, {with}|{:.0}|bytes/record", size as f64 / amplification as f64);
    }
    let started = Instant::now();
    write_log(dir.path(), records, false, false, &runtime);
    eprintln!("bench-replay: wrote {records} records in {:.1} s", started.elapsed().as_secs_f64());
    let reader = LogReader::open(dir.path()).expect("open");
    let options = CheckOptions { timeouts: reader.timeouts(), ..CheckOptions::default() };
    let t = Instant::now();
    let report = callbus_replay::check(&reader, &options, &|s: &CallState, i, c| s.step(i, c));
    let check_rate = report.records as f64 / t.elapsed().as_secs_f64();
    assert!(
        report.divergences.is_empty() && report.records == records,
        "{} records, {} divergences",
        report.records,
        report.divergences.len()
    );
    println!("RESULT|replay check ({records} records)|{check_rate:.0}|records/s");
    let t = Instant::now();
    let one =
        callbus_replay::check(&reader, &CheckOptions { workers: 1, ..options.clone() }, &|s: &CallState, i, c| {
            s.step(i, c)
        });
    assert_eq!(one, report, "one worker finds what several do");
    let one_rate = one.records as f64 / t.elapsed().as_secs_f64();
    println!("RESULT|replay check, one worker beside the reader ({records} records)|{one_rate:.0}|records/s");
    let t = Instant::now();
    let n =
        callbus_replay::export(&reader, &mut std::io::sink(), ExportFormat::Jsonl, None, None, false).expect("export");
    println!("RESULT|replay export jsonl ({n} records)|{:.0}|records/s", n as f64 / t.elapsed().as_secs_f64());
    let t = Instant::now();
    let n = callbus_replay::export(&reader, &mut std::io::sink(), ExportFormat::Msgpack, None, None, false)
        .expect("export");
    println!("RESULT|replay export msgpack ({n} records)|{:.0}|records/s", n as f64 / t.elapsed().as_secs_f64());
    floors(&reader, &options);
    println!("RESULT|log size on disk|{:.0}|bytes/record", reader.stats().size_on_disk as f64 / records as f64);
    drop(reader);
    sled_reads(dir.path(), records);

    // Group commit's floor: one record staged, then committed (its write-ahead frame written and
    // synced with sync_file_range on the committing task), and the same with `engine.sync_data`
    // (an fdatasync of the write-ahead file instead).
    // The same durability by sled's own flush instead of the write-ahead file (no journal):
    // what the write-ahead file is kept for.
    for (mode, name) in [
        (Commit::WriteAhead, "commit of one record"),
        (Commit::WriteAheadSyncData, "commit of one record, sync_data"),
        (Commit::SledFlush, "commit of one record by sled's own flush, no write-ahead file"),
    ] {
        let (p50, p99) = commit_floor(&runtime, mode);
        println!("RESULT|{name}, p50|{p50:.3}|ms");
        println!("RESULT|{name}, p99|{p99:.3}|ms");
    }
}

/// What sled's read costs beyond one thread and the default cache: two threads each reading
/// half of the log, and a cache that holds all of it, read twice (the first read builds the
/// pages from the file as the default cache does; the second finds them built).
fn sled_reads(dir: &std::path::Path, records: u64) {
    // sled's I/O threads may hold the file lock a moment after the last handle is dropped.
    let open = |cache: u64| {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match SledLog::open_with_cache(dir, cache) {
                Err(e) if e.to_string().contains("lock") && Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                log => break log.expect("open"),
            }
        }
    };
    let log = open(callbus_engine::log::DEFAULT_CACHE_BYTES);
    let t = Instant::now();
    let half = records / 2 + 1;
    std::thread::scope(|scope| {
        for (from, to) in [(1, half), (half, u64::MAX)] {
            let log = &log;
            scope.spawn(move || {
                let mut n = 0u64;
                for item in log.raw_records_from(from) {
                    if item.expect("read").0 >= to {
                        break;
                    }
                    n += 1;
                }
                std::hint::black_box(n)
            });
        }
    });
    println!("RESULT|floor: sled read, two threads|{:.0}|records/s", records as f64 / t.elapsed().as_secs_f64());
    drop(log);
    let log = open(4 << 30);
    for pass in ["first", "second"] {
        let t = Instant::now();
        let mut n = 0u64;
        for item in log.raw_records_from(1) {
            std::hint::black_box(item.expect("read"));
            n += 1;
        }
        println!(
            "RESULT|floor: sled read, one core, cache holding the log, {pass} read|{:.0}|records/s",
            n as f64 / t.elapsed().as_secs_f64()
        );
    }
}

/// p50 and p99 (ms) of staging one record and committing it, 2 000 times.
/// How a commit makes a record durable.
#[derive(Clone, Copy, PartialEq)]
enum Commit {
    WriteAhead,
    WriteAheadSyncData,
    SledFlush,
}

fn commit_floor(runtime: &tokio::runtime::Runtime, mode: Commit) -> (f64, f64) {
    let small = tempfile::tempdir().expect("tmp");
    let cache = callbus_engine::log::DEFAULT_CACHE_BYTES;
    let log = match mode {
        Commit::WriteAhead => SledLog::open_with(small.path(), cache, false),
        Commit::WriteAheadSyncData => SledLog::open_with(small.path(), cache, true),
        Commit::SledFlush => SledLog::open_copy(small.path(), cache),
    }
    .expect("open");
    let mut samples = Vec::new();
    for seq in 1..=2_000u64 {
        let record = Record {
            format: RECORD_FORMAT,
            seq,
            time_ms: seq,
            call_id: "c".into(),
            partition: 0,
            input: Input::Timer { name: "t".into() },
            before: None,
            after: CallState::Dialog(DialogState::new("bench", "x@y")),
            effects: vec![],
        };
        let t = Instant::now();
        log.stage(&record).expect("stage");
        runtime.block_on(log.commit()).expect("commit");
        if mode == Commit::SledFlush {
            log.flush_sled().expect("flush");
        }
        samples.push(t.elapsed());
    }
    samples.sort();
    let ms = |i: usize| samples[i].as_secs_f64() * 1e3;
    (ms(samples.len() / 2), ms(samples.len() * 99 / 100))
}

/// What `check`'s work costs, each on one core over the same records: reading them from sled
/// (raw bytes), reading and decoding them whole, and reading, decoding and stepping today's
/// machine from each call's previous state (no comparison). `check` decodes less than that
/// (the input; the recorded state and effects only when the replay's bytes differ) and spreads
/// the rest over a reading thread and a worker per core.
fn floors(reader: &LogReader, options: &CheckOptions) {
    let rate = |n: u64, t: Instant| n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut n = 0u64;
    for item in reader.log().raw_records_from(1) {
        std::hint::black_box(item.expect("read"));
        n += 1;
    }
    println!("RESULT|floor: sled read alone, one core|{:.0}|records/s", rate(n, t));
    let t = Instant::now();
    let mut n = 0u64;
    for item in reader.log().raw_records_from(1) {
        let record: Record = rmp_serde::from_slice(&item.expect("read").1).expect("decode");
        std::hint::black_box(record);
        n += 1;
    }
    println!("RESULT|floor: sled read + decode, one core|{:.0}|records/s", rate(n, t));
    let t = Instant::now();
    let mut n = 0u64;
    let mut states = std::collections::HashMap::<String, CallState>::new();
    for item in reader.log().raw_records_from(1) {
        let record: Record = rmp_serde::from_slice(&item.expect("read").1).expect("decode");
        let before =
            states.remove(&record.call_id).unwrap_or_else(|| callbus_engine::machines::initial_state(&record.after));
        let ctx = Ctx { call_id: &record.call_id, seq: record.seq, now_ms: record.time_ms, timeouts: options.timeouts };
        let (after, _effects) = before.step(&record.input, &ctx);
        states.insert(record.call_id, after);
        n += 1;
    }
    println!("RESULT|floor: sled read + decode + machine step, one core|{:.0}|records/s", rate(n, t));
}

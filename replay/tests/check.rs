//! `check` over logs of real machine steps written to a real sled log: whatever the chunk size,
//! it reports what a plain one-record-at-a-time replay reports.

use std::collections::HashMap;

use callbus_engine::log::{encode, EventLog, Record, SledLog, RECORD_FORMAT};
use callbus_engine::machines::{initial_state, CallState, Ctx, DialogState, Effect, Input, Timeouts};
use callbus_replay::{CheckOptions, CheckReport, LogReader};
use callbus_schemas::command::{CallTarget, Command};

fn event(call: usize, old: i64, new: i64) -> Input {
    Input::Event {
        node: "n1".into(),
        bridge_seq: None,
        datagram: format!(
            r#"{{"jsonrpc":"2.0","method":"E_DLG_STATE_CHANGED","params":{{"id":"{call:x}.1","db_id":"{call}","callid":"sip-{call}","from_tag":"f","to_tag":"t","old_state":{old},"new_state":{new}}}}}"#
        ),
    }
}

/// What each call goes through: ringing, answered, confirmed, a hold command (an MI request
/// and a timer among its effects), its timer firing, then hung up.
fn script(call: usize) -> Vec<Input> {
    let hold = Command::Hold { target: CallTarget::CallId(format!("call-{call}")) };
    vec![
        event(call, 1, 2),
        event(call, 2, 3),
        event(call, 3, 4),
        Input::Command { cmd_id: format!("h{call}"), command: hold },
        Input::Timer { name: "hold".into() },
        event(call, 4, 5),
    ]
}

/// The record of one step: `input` at `ctx`, from the state named `before` to `after`.
fn record(
    format: u8,
    ctx: &Ctx,
    input: Input,
    before: Option<String>,
    after: &CallState,
    effects: Vec<Effect>,
) -> Record {
    Record {
        format,
        seq: ctx.seq,
        time_ms: ctx.now_ms,
        call_id: ctx.call_id.to_owned(),
        partition: 0,
        input,
        before: before.map(Into::into),
        after: after.clone(),
        effects,
    }
}

/// A log of `calls` calls whose records interleave (call k starts at its k-th record slot), so
/// most calls span several chunks of a small size. Records `older` are written in another
/// format (1), as an older engine would have: they are decoded whole instead of skimmed.
/// `damage` may replace a record's bytes (the log is written once: sled holds its file lock a
/// moment after it is closed).
fn write_log(dir: &std::path::Path, calls: usize, older: &[u64], damage: &dyn Fn(u64, Vec<u8>) -> Vec<u8>) -> u64 {
    let log = SledLog::open(dir).expect("open");
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let timeouts = Timeouts::default();
    let mut states: HashMap<usize, CallState> = HashMap::new();
    let mut next: HashMap<usize, usize> = HashMap::new();
    let mut seq = 0u64;
    for round in 0..calls + 6 {
        for call in 0..calls.min(round + 1) {
            let at = next.entry(call).or_default();
            let Some(input) = script(call).into_iter().nth(*at) else { continue };
            *at += 1;
            seq += 1;
            let call_id = format!("call-{call}");
            let before = states.remove(&call);
            let state =
                before.clone().unwrap_or_else(|| CallState::Dialog(DialogState::new("n1", &format!("sip-{call}"))));
            let ctx = Ctx { call_id: &call_id, seq, now_ms: 1_000 + seq, timeouts };
            let (after, effects) = state.step(&input, &ctx);
            let format = if older.contains(&seq) { 1 } else { RECORD_FORMAT };
            let record = record(format, &ctx, input, before.map(|b| b.name().to_owned()), &after, effects);
            log.stage_raw(seq, &call_id, &damage(seq, encode(&record).expect("encode"))).expect("stage");
            states.insert(call, after);
        }
    }
    // Late events of every fifth call, long after it ended (OpenSIPS repeats itself): checked
    // from the ended state, which check no longer keeps in memory but reads back from the log.
    for call in (0..calls).step_by(5) {
        seq += 1;
        let call_id = format!("call-{call}");
        let state = states.remove(&call).expect("ended");
        let ctx = Ctx { call_id: &call_id, seq, now_ms: 1_000 + seq, timeouts };
        let input = event(call, 4, 5);
        let (after, effects) = state.step(&input, &ctx);
        assert!(effects.is_empty() && after == state, "a late event changes nothing");
        let record = record(RECORD_FORMAT, &ctx, input, Some(state.name().to_owned()), &after, effects);
        log.stage_raw(seq, &call_id, &damage(seq, encode(&record).expect("encode"))).expect("stage");
    }
    log.stage_timeouts(&timeouts).expect("timeouts");
    runtime.block_on(log.commit()).expect("commit");
    seq
}

type StepFn = dyn Fn(&CallState, &Input, &Ctx) -> (CallState, Vec<Effect>) + Sync;

/// The plain replay: every record in log order, each call from its previous recorded state.
fn plain(reader: &LogReader, options: &CheckOptions, step: &StepFn) -> (u64, u64, Vec<(u64, String)>, Vec<u64>) {
    let mut states: HashMap<String, CallState> = HashMap::new();
    let (mut records, mut unreadable, mut diverged) = (0u64, Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    for item in reader.log().raw_records_from(1) {
        let (seq, bytes) = item.expect("read");
        if seq > options.to {
            break;
        }
        let record: Record = match rmp_serde::from_slice(&bytes) {
            Ok(r) => r,
            Err(_) => {
                unreadable.push(seq);
                continue;
            }
        };
        if options.call.as_ref().is_some_and(|c| *c != record.call_id) {
            continue;
        }
        if seq >= options.from {
            let before = states.get(&record.call_id).cloned().unwrap_or_else(|| initial_state(&record.after));
            let ctx = Ctx { call_id: &record.call_id, seq, now_ms: record.time_ms, timeouts: options.timeouts };
            let (after, effects) = step(&before, &record.input, &ctx);
            records += 1;
            if (after != record.after || effects != record.effects) && seen.insert(record.call_id.clone()) {
                diverged.push((seq, record.call_id.clone()));
            }
        }
        states.insert(record.call_id, record.after);
    }
    (records, states.len() as u64, diverged, unreadable)
}

fn summary(report: &CheckReport) -> (u64, u64, Vec<(u64, String)>, Vec<u64>) {
    (
        report.records,
        report.calls,
        report.divergences.iter().map(|d| (d.seq, d.call_id.clone())).collect(),
        report.unreadable.iter().map(|(seq, _)| *seq).collect(),
    )
}

fn real(state: &CallState, input: &Input, ctx: &Ctx) -> (CallState, Vec<Effect>) {
    state.step(input, ctx)
}

/// A machine that forgets the timer of every third call's hold (a changed transition).
fn altered(state: &CallState, input: &Input, ctx: &Ctx) -> (CallState, Vec<Effect>) {
    let (next, mut effects) = state.step(input, ctx);
    let third = ctx.call_id.trim_start_matches("call-").parse::<usize>().is_ok_and(|n| n % 3 == 0);
    if third && matches!(input, Input::Command { .. }) {
        effects.retain(|e| !matches!(e, Effect::StartTimer { .. }));
    }
    (next, effects)
}

/// A machine that differs on every record of every fourth call: each is reported once, at its
/// first record, though its records lie in many chunks.
fn altered_throughout(state: &CallState, input: &Input, ctx: &Ctx) -> (CallState, Vec<Effect>) {
    let (next, mut effects) = state.step(input, ctx);
    if ctx.call_id.trim_start_matches("call-").parse::<usize>().is_ok_and(|n| n % 4 == 1) {
        effects.push(Effect::CancelTimer { name: "extra".into() });
    }
    (next, effects)
}

const CHUNKS: [u64; 6] = [1, 2, 5, 17, 64, callbus_replay::DEFAULT_CHUNK];

#[test]
fn any_chunk_size_reports_what_a_plain_replay_does() {
    let dir = tempfile::tempdir().expect("tmp");
    let total = write_log(dir.path(), 40, &[7, 50, 51, 200], &|_, b| b);
    let reader = LogReader::open(dir.path()).expect("open");
    let base = CheckOptions { timeouts: reader.timeouts(), ..CheckOptions::default() };
    let expected = plain(&reader, &base, &real);
    assert_eq!(expected, (total, 40, vec![], vec![]), "the log replays as written");
    for chunk in CHUNKS {
        for workers in [1, 3] {
            let options = CheckOptions { chunk, workers, ..base.clone() };
            assert_eq!(summary(&callbus_replay::check(&reader, &options, &real)), expected, "chunk {chunk}");
        }
    }
}

#[test]
fn a_changed_transition_is_reported_at_its_record_whatever_the_chunk() {
    let dir = tempfile::tempdir().expect("tmp");
    write_log(dir.path(), 40, &[4, 90], &|_, b| b);
    let reader = LogReader::open(dir.path()).expect("open");
    let base = CheckOptions { timeouts: reader.timeouts(), ..CheckOptions::default() };
    let expected = plain(&reader, &base, &altered);
    assert_eq!(expected.2.len(), 14, "calls 0, 3, ..., 39 diverge once each: {:?}", expected.2);
    for chunk in CHUNKS {
        let report = callbus_replay::check(&reader, &CheckOptions { chunk, ..base.clone() }, &altered);
        assert_eq!(summary(&report), expected, "chunk {chunk}");
        let first = &report.divergences[0];
        assert_eq!(first.input, "cmd call.hold");
        assert!(
            first.recorded.1.iter().any(|e| matches!(e, Effect::StartTimer { .. }))
                && !first.replayed.1.iter().any(|e| matches!(e, Effect::StartTimer { .. })),
            "both versions are shown: {first:?}"
        );
    }
    let expected = plain(&reader, &base, &altered_throughout);
    assert_eq!(expected.2.len(), 10, "calls 1, 5, ..., 37, once each: {:?}", expected.2);
    for chunk in CHUNKS {
        let report = callbus_replay::check(&reader, &CheckOptions { chunk, ..base.clone() }, &altered_throughout);
        assert_eq!(summary(&report), expected, "chunk {chunk}");
    }
}

#[test]
fn from_to_and_one_call_select_records_whatever_the_chunk() {
    let dir = tempfile::tempdir().expect("tmp");
    let total = write_log(dir.path(), 30, &[], &|_, b| b);
    let reader = LogReader::open(dir.path()).expect("open");
    let base = CheckOptions { timeouts: reader.timeouts(), ..CheckOptions::default() };
    let cases = [
        CheckOptions { from: total / 2, ..base.clone() },
        CheckOptions { from: 10, to: total - 20, ..base.clone() },
        CheckOptions { call: Some("call-7".into()), ..base.clone() },
        CheckOptions { call: Some("call-9".into()), from: 40, ..base.clone() },
    ];
    for case in cases {
        let expected = plain(&reader, &case, &altered);
        assert!(expected.0 > 0, "{case:?} selects records");
        for chunk in CHUNKS {
            let options = CheckOptions { chunk, ..case.clone() };
            assert_eq!(summary(&callbus_replay::check(&reader, &options, &altered)), expected, "{options:?}");
        }
    }
    let one = callbus_replay::check(&reader, &CheckOptions { call: Some("call-7".into()), ..base.clone() }, &real);
    assert_eq!((one.records, one.calls), (6, 1));
    // A SIP Call-ID names the call too.
    let by_sip = callbus_replay::check(&reader, &CheckOptions { call: Some("sip-7".into()), ..base }, &real);
    assert_eq!(by_sip, one);
}

#[test]
fn corrupt_and_truncated_records_are_reported_by_sequence_and_the_rest_is_checked() {
    let dir = tempfile::tempdir().expect("tmp");
    // Records truncated in their input and in their effects, bytes that are not MessagePack,
    // MessagePack that is not a record, and an empty last record.
    let total = 20 * 6 + 4;
    let damaged = [3u64, 41, 42, 60, 20 * 6];
    let damage = |seq: u64, whole: Vec<u8>| match seq {
        3 => whole[..whole.len() / 2].to_vec(),
        60 => whole[..whole.len() - 5].to_vec(),
        41 => b"not msgpack at all".to_vec(),
        42 => rmp_serde::to_vec(&"valid MessagePack, not a record").expect("encode"),
        120 => Vec::new(),
        _ => whole,
    };
    assert_eq!(write_log(dir.path(), 20, &[], &damage), total);
    let reader = LogReader::open(dir.path()).expect("open");
    let base = CheckOptions { timeouts: reader.timeouts(), ..CheckOptions::default() };
    let expected = plain(&reader, &base, &real);
    assert_eq!(expected.3, damaged.to_vec());
    assert_eq!(expected.0, total - damaged.len() as u64, "every other record is checked");
    for chunk in CHUNKS {
        let report = callbus_replay::check(&reader, &CheckOptions { chunk, ..base.clone() }, &real);
        assert_eq!(summary(&report), expected, "chunk {chunk}");
        assert!(report.unreadable.iter().all(|(_, why)| !why.is_empty()), "{:?}", report.unreadable);
        let (_, why) = report.unreadable.iter().find(|(seq, _)| *seq == 60).expect("60 reported");
        assert!(why.contains("effects"), "the reason says what could not be read: {why}");
    }
}

#[test]
fn a_machine_that_panics_is_reported_with_the_records_it_left_unchecked() {
    let dir = tempfile::tempdir().expect("tmp");
    let total = write_log(dir.path(), 12, &[], &|_, b| b);
    let reader = LogReader::open(dir.path()).expect("open");
    let panicking = |state: &CallState, input: &Input, ctx: &Ctx| {
        if ctx.seq == 30 {
            panic!("machine bug on purpose");
        }
        state.step(input, ctx)
    };
    let options = CheckOptions { timeouts: reader.timeouts(), chunk: 8, ..CheckOptions::default() };
    let report = callbus_replay::check(&reader, &options, &panicking);
    assert_eq!(report.unreadable.len(), 1, "{:?}", report.unreadable);
    let (seq, why) = &report.unreadable[0];
    assert_eq!(*seq, 25, "the chunk 25..=32 holds record 30");
    assert!(why.contains("panicked") && why.contains("machine bug on purpose") && why.contains("25..=32"), "{why}");
    assert_eq!(report.records, total - 8, "the other chunks are checked");
}

#[test]
fn a_compressed_record_that_does_not_decompress_is_reported_and_the_rest_is_checked_and_exported() {
    let dir = tempfile::tempdir().expect("tmp");
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let timeouts = Timeouts::default();
    let mut seq = 0u64;
    {
        let log = SledLog::open(dir.path()).expect("open");
        // Enough records for the log to train its dictionary and compress the later ones.
        for call in 0..600 {
            let call_id = format!("call-{call}");
            let mut state = CallState::Dialog(DialogState::new("n1", &format!("sip-{call}")));
            let mut before = None;
            for input in script(call) {
                seq += 1;
                let ctx = Ctx { call_id: &call_id, seq, now_ms: 1_000 + seq, timeouts };
                let (after, effects) = state.step(&input, &ctx);
                let record =
                    record(RECORD_FORMAT, &ctx, input, before.replace(after.name().to_owned()), &after, effects);
                log.stage(&record).expect("stage");
                if seq == 2_000 {
                    log.settle_dictionary().expect("dictionary");
                }
                state = after;
            }
        }
        assert_eq!(log.dictionary(), Some(1), "the later records are compressed");
        log.damage_record(seq - 10).expect("damage");
        log.stage_timeouts(&timeouts).expect("timeouts");
        runtime.block_on(log.commit()).expect("commit");
    }
    let damaged = seq - 10;
    let reader = LogReader::open(dir.path()).expect("open");
    let options = CheckOptions { timeouts: reader.timeouts(), ..CheckOptions::default() };
    let report = callbus_replay::check(&reader, &options, &real);
    let unreadable: Vec<u64> = report.unreadable.iter().map(|(s, _)| *s).collect();
    assert_eq!(unreadable, vec![damaged], "{:?}", report.unreadable);
    assert!(report.unreadable[0].1.contains("compressed record"), "in words: {}", report.unreadable[0].1);
    assert_eq!(report.records, seq - 1, "every other record is checked");
    let mut out = Vec::new();
    let n = callbus_replay::export(&reader, &mut out, callbus_replay::ExportFormat::Jsonl, None, None, false)
        .expect("the export goes on past it");
    assert_eq!(n, seq - 1);
    assert_eq!(String::from_utf8_lossy(&out).lines().count() as u64, seq - 1);
}

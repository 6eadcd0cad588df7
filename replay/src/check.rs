//! `replay check`: feed every record's input through today's machines, from the state the
//! call's previous record left, and compare with what was recorded.
//!
//! A record is checked from its call's previous *recorded* state, so records need not be
//! checked in order: the log is cut into chunks of consecutive sequences, and one worker per
//! core reads and checks a chunk at a time on its own. Inside a chunk, a call's records follow
//! each other; the first record of a call that began in an earlier chunk waits for that
//! chunk's end state, which the merge (on the calling thread, chunk by chunk in order) gives
//! it. A record whose replay encodes to the very bytes recorded is never decoded beyond its
//! input; the recorded state and effects are decoded only to compare a record that differs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Condvar, Mutex};

use callbus_engine::log::{EventLog, LogError, RawRecord, Record};
use callbus_engine::machines::{initial_state, CallState, Ctx, Effect, Input, Timeouts};

use crate::skim::{skim, Skim};
use crate::LogReader;

/// Which records to check.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// First sequence.
    pub from: u64,
    /// Last sequence.
    pub to: u64,
    /// Only this call.
    pub call: Option<String>,
    /// The engine's timeouts (timer effects carry them): [`LogReader::timeouts`] reads the ones
    /// the log was written with.
    pub timeouts: Timeouts,
    /// Draw a progress bar on stderr (records read of those in the log).
    pub progress: bool,
    /// Records a worker checks at a time (the result does not depend on it).
    pub chunk: u64,
    /// Worker threads (0: one per core, at most 8); one more thread reads the log.
    pub workers: usize,
}

/// Records a worker checks at a time, by default.
pub const DEFAULT_CHUNK: u64 = 16_384;

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            from: 1,
            to: u64::MAX,
            call: None,
            timeouts: Timeouts::default(),
            progress: false,
            chunk: DEFAULT_CHUNK,
            workers: 0,
        }
    }
}

/// The first record of a call whose replay differs from the log.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Divergence {
    /// The record.
    pub seq: u64,
    /// The call.
    pub call_id: String,
    /// The input, short.
    pub input: String,
    /// What the log says.
    pub recorded: (CallState, Vec<Effect>),
    /// What today's machines make of it.
    pub replayed: (CallState, Vec<Effect>),
}

/// The outcome of a check.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct CheckReport {
    /// Records checked.
    pub records: u64,
    /// Calls seen.
    pub calls: u64,
    /// Records that could not be read: (sequence, reason).
    pub unreadable: Vec<(u64, String)>,
    /// The first divergence of each call that has one.
    pub divergences: Vec<Divergence>,
}

/// A machine's step function: the engine's is `CallState::step`.
pub type Step<'a> = dyn Fn(&CallState, &Input, &Ctx) -> (CallState, Vec<Effect>) + Sync + 'a;

/// A quick hasher for the maps keyed by call id: the ids come from the log being checked,
/// not from a peer, so a keyed (SipHash) hasher buys nothing and costs a few percent.
#[derive(Clone, Copy, Default)]
struct CallHasher(u64);

impl std::hash::Hasher for CallHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        for word in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..word.len()].copy_from_slice(word);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        (self.0 ^ (self.0 >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

type ByCall<V> = HashMap<String, V, std::hash::BuildHasherDefault<CallHasher>>;
type CallSet = HashSet<String, std::hash::BuildHasherDefault<CallHasher>>;

/// A record, skimmed (today's format) or decoded whole (any other the decoder knows).
enum Rec<'a> {
    Skimmed(Skim<'a>),
    Whole(Box<Record>),
}

fn unreadable_outcome(e: crate::skim::NotSkimmed) -> String {
    format!("its state after and effects cannot be read: {}", e.0)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| format!("its {what} cannot be decoded: {e}"))
}

impl<'a> Rec<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Rec<'a>, String> {
        match skim(bytes) {
            Ok(s) => Ok(Rec::Skimmed(s)),
            Err(_) => {
                rmp_serde::from_slice::<Record>(bytes).map(|r| Rec::Whole(Box::new(r))).map_err(|e| e.to_string())
            }
        }
    }

    fn seq(&self) -> u64 {
        match self {
            Rec::Skimmed(s) => s.seq,
            Rec::Whole(r) => r.seq,
        }
    }

    fn call_id(&self) -> &str {
        match self {
            Rec::Skimmed(s) => s.call_id,
            Rec::Whole(r) => &r.call_id,
        }
    }

    fn has_before(&self) -> bool {
        match self {
            Rec::Skimmed(s) => s.has_before,
            Rec::Whole(r) => r.before.is_some(),
        }
    }

    fn after(&self) -> Result<CallState, String> {
        match self {
            Rec::Skimmed(s) => decode(s.after_and_effects().map_err(unreadable_outcome)?.0, "state after"),
            Rec::Whole(r) => Ok(r.after.clone()),
        }
    }

    /// Today's outcome from `before`, and whether it differs from the record (the recorded
    /// state and effects, decoded, when it does).
    fn replay(
        &self,
        before: &CallState,
        timeouts: Timeouts,
        step: &Step<'_>,
        buf: &mut Vec<u8>,
    ) -> Result<Replayed, String> {
        let owned;
        let (input, time_ms) = match self {
            Rec::Skimmed(s) => {
                owned = decode::<Input>(s.input, "input")?;
                (&owned, s.time_ms)
            }
            Rec::Whole(r) => (&r.input, r.time_ms),
        };
        let ctx = Ctx { call_id: self.call_id(), seq: self.seq(), now_ms: time_ms, timeouts };
        let (after, effects) = step(before, input, &ctx);
        let recorded = match self {
            Rec::Skimmed(s) => {
                buf.clear();
                let encoded = rmp_serde::encode::write_named(buf, &after).is_ok()
                    && rmp_serde::encode::write_named(buf, &"effects").is_ok()
                    && rmp_serde::encode::write_named(buf, &effects).is_ok();
                if encoded && buf[..] == *s.outcome {
                    return Ok(Replayed { after, diverged: None });
                }
                let (a, e) = s.after_and_effects().map_err(unreadable_outcome)?;
                (decode::<CallState>(a, "state after")?, decode::<Vec<Effect>>(e, "effects")?)
            }
            Rec::Whole(r) => (r.after.clone(), r.effects.clone()),
        };
        if recorded.0 == after && recorded.1 == effects {
            return Ok(Replayed { after, diverged: None });
        }
        let divergence = Divergence {
            seq: self.seq(),
            call_id: self.call_id().to_owned(),
            input: input.label(),
            recorded: recorded.clone(),
            replayed: (after, effects),
        };
        Ok(Replayed { after: recorded.0, diverged: Some(Box::new(divergence)) })
    }
}

/// A checked record: the call's recorded state after it, and the divergence if it has one.
struct Replayed {
    after: CallState,
    diverged: Option<Box<Divergence>>,
}

/// What a worker found in one chunk.
#[derive(Default)]
struct Chunk {
    records: u64,
    unreadable: Vec<(u64, String)>,
    /// The first divergence of each call within the chunk.
    divergences: Vec<Divergence>,
    /// The first record of each call that began before the chunk, to check at the merge.
    pending: Vec<(u64, RawRecord)>,
    /// Each call's state after its last record checked in the chunk.
    finals: ByCall<Box<CallState>>,
    /// The calls of the records before `from` (their states are looked up when needed).
    before_from: HashSet<u64>,
}

/// A call id's fingerprint, to count calls without keeping their ids.
fn fingerprint(call_id: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(call_id, &mut h);
    std::hash::Hasher::finish(&h)
}

fn check_chunk(records: &[(u64, RawRecord)], options: &CheckOptions, only: Option<&str>, step: &Step<'_>) -> Chunk {
    let mut chunk = Chunk::default();
    let mut first_diverged = CallSet::default();
    let mut buf = Vec::with_capacity(1024);
    for (seq, bytes) in records {
        let seq = *seq;
        let rec = match Rec::parse(bytes) {
            Ok(r) => r,
            Err(e) => {
                if seq >= options.from {
                    chunk.unreadable.push((seq, e));
                }
                continue;
            }
        };
        let call_id = rec.call_id();
        if only.is_some_and(|c| c != call_id) {
            continue;
        }
        if seq < options.from {
            chunk.before_from.insert(fingerprint(call_id));
            continue;
        }
        let outcome = match chunk.finals.get_mut(call_id) {
            Some(state) => rec.replay(state, options.timeouts, step, &mut buf).map(|out| {
                // The call's state is the recorded one (equal to today's unless it diverged).
                **state = out.after;
                out.diverged
            }),
            None if !rec.has_before() => rec.after().and_then(|after| {
                let out = rec.replay(&initial_state(&after), options.timeouts, step, &mut buf)?;
                chunk.finals.insert(call_id.to_owned(), Box::new(out.after));
                Ok(out.diverged)
            }),
            None => {
                // Its call began in an earlier chunk: checked at the merge, from the state the
                // chunks before left; the records after it in this chunk go on from its own.
                match rec.after() {
                    Ok(after) => {
                        chunk.finals.insert(call_id.to_owned(), Box::new(after));
                        chunk.pending.push((seq, bytes.clone()));
                    }
                    Err(e) => chunk.unreadable.push((seq, e)),
                }
                continue;
            }
        };
        match outcome {
            Ok(diverged) => {
                chunk.records += 1;
                if let Some(d) = diverged {
                    if diverged_first(&mut first_diverged, call_id) {
                        chunk.divergences.push(*d);
                    }
                }
            }
            Err(e) => chunk.unreadable.push((seq, e)),
        }
    }
    chunk
}

/// A panic's message.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn diverged_first(diverged: &mut CallSet, call_id: &str) -> bool {
    !diverged.contains(call_id) && diverged.insert(call_id.to_owned())
}

/// How far the reader may run ahead: it hands out chunk `next` only while fewer than `window`
/// chunks wait to be merged (so memory stays bounded however long the log).
struct Claims {
    next: u64,
    merged: u64,
    /// The merge has stopped (no worker is left): the reader stops too.
    closed: bool,
}

/// A chunk of consecutive records, numbered in log order.
type Work = (u64, Vec<(u64, RawRecord)>);

/// Checks records with `step` (the engine's machines are `CallState::step`; tests pass an
/// altered one). After a divergence, the call goes on from its recorded state. One thread reads
/// the log (sled reads no faster from two), one worker per core checks chunks of it; the
/// report does not depend on their number or on the chunk size.
pub fn check(reader: &LogReader, options: &CheckOptions, step: &Step<'_>) -> CheckReport {
    let only = options.call.as_ref().and_then(|c| reader.find_call(c).ok());
    let only = only.as_deref();
    let workers = match options.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8),
        n => n,
    } as u64;
    let last = reader.log().next_seq().saturating_sub(1).min(options.to);
    let size = options.chunk.clamp(1, 1 << 20) as usize;
    let bar = crate::progress_bar(last, options.progress);
    let claims = Mutex::new(Claims { next: 0, merged: 0, closed: false });
    let turn = Condvar::new();
    let window = 2 * workers;
    let mut report = CheckReport::default();
    let mut states = ByCall::<Box<CallState>>::default();
    let mut calls = HashSet::<u64>::new();
    let mut diverged = CallSet::default();
    let mut buf = Vec::new();
    let (work_tx, work_rx) = std::sync::mpsc::channel::<Work>();
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<(u64, u64, Chunk)>();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let (done_tx, work_rx) = (done_tx.clone(), &work_rx);
            let worker = std::thread::Builder::new().name("check-worker".into()).spawn_scoped(scope, move || loop {
                let job = match work_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok((index, records)) = job else { return };
                let (first, end) = (records.first().map_or(0, |r| r.0), records.last().map_or(0, |r| r.0));
                let chunk = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    check_chunk(&records, options, only, step)
                }))
                .unwrap_or_else(|panic| {
                    let reason = format!(
                        "today's machine panicked on a record in {first}..={end}: {}; check them with --from/--to",
                        panic_text(panic.as_ref())
                    );
                    Chunk { unreadable: vec![(first, reason)], ..Chunk::default() }
                });
                if done_tx.send((index, end, chunk)).is_err() {
                    return;
                }
            });
            if let Err(e) = worker {
                report.unreadable.push((0, format!("cannot start a worker thread: {e}")));
            }
        }
        drop(done_tx);
        let (claims, turn) = (&claims, &turn);
        let read = std::thread::Builder::new().name("check-read".into()).spawn_scoped(scope, move || {
            let mut unreadable = Vec::new();
            let mut records = Vec::with_capacity(size);
            let hand_out = |records: Vec<(u64, RawRecord)>| {
                let Ok(mut c) = claims.lock() else { return false };
                while c.next >= c.merged + window && !c.closed {
                    c = match turn.wait(c) {
                        Ok(c) => c,
                        Err(_) => return false,
                    };
                }
                if c.closed {
                    return false;
                }
                c.next += 1;
                work_tx.send((c.next - 1, records)).is_ok()
            };
            for item in reader.log().raw_records_from(1) {
                match item {
                    Ok((seq, _)) if seq > last => break,
                    Ok(record) => records.push(record),
                    Err(e) => {
                        let seq = match &e {
                            LogError::Corrupt { seq, .. } => *seq,
                            _ => 0,
                        };
                        unreadable.push((seq, e.to_string()))
                    }
                }
                if records.len() == size && !hand_out(std::mem::replace(&mut records, Vec::with_capacity(size))) {
                    return unreadable;
                }
            }
            if !records.is_empty() {
                hand_out(records);
            }
            unreadable
        });
        let mut waiting = BTreeMap::new();
        let mut next = 0u64;
        for (index, end, chunk) in done_rx {
            waiting.insert(index, (end, chunk));
            while let Some((end, chunk)) = waiting.remove(&next) {
                let mut merged =
                    Merged { report: &mut report, states: &mut states, calls: &mut calls, diverged: &mut diverged };
                merged.add(chunk, reader, options, step, &mut buf);
                next += 1;
                bar.set_position(end);
                if let Ok(mut c) = claims.lock() {
                    c.merged = next;
                }
                turn.notify_all();
            }
        }
        if let Ok(mut c) = claims.lock() {
            c.closed = true;
        }
        turn.notify_all();
        match read.map(|r| r.join()) {
            Ok(Ok(unreadable)) => report.unreadable.extend(unreadable),
            Ok(Err(_)) => report.unreadable.push((0, "reading the log panicked".into())),
            Err(e) => report.unreadable.push((0, format!("cannot start the reading thread: {e}"))),
        }
    });
    bar.finish_and_clear();
    report.calls = calls.len() as u64;
    report.unreadable.sort_by_key(|(seq, _)| *seq);
    report.divergences.sort_by_key(|d| d.seq);
    report
}

/// What the merge has gathered: the report, the states of the calls still live after the
/// chunks merged so far (an ended call's state is dropped and looked up again, from the log's
/// per-call index, if a record of it comes later: memory holds the live calls, not every call of
/// the log), every call seen, and the calls that diverged.
struct Merged<'a> {
    report: &'a mut CheckReport,
    states: &'a mut ByCall<Box<CallState>>,
    calls: &'a mut HashSet<u64>,
    diverged: &'a mut CallSet,
}

impl Merged<'_> {
    /// Adds a chunk, in log order: its pending records are checked from the states the chunks
    /// before it left, then its own states replace theirs.
    fn add(&mut self, chunk: Chunk, reader: &LogReader, options: &CheckOptions, step: &Step<'_>, buf: &mut Vec<u8>) {
        for (seq, bytes) in &chunk.pending {
            let outcome = Rec::parse(bytes).and_then(|rec| {
                let before = match self.states.get(rec.call_id()) {
                    Some(state) => (**state).clone(),
                    None => previous_state(reader, &rec)?,
                };
                let replayed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    rec.replay(&before, options.timeouts, step, buf)
                }))
                .map_err(|panic| {
                    format!("today's machine panicked on this record: {}", panic_text(panic.as_ref()))
                })??;
                Ok((rec.call_id().to_owned(), replayed))
            });
            match outcome {
                Ok((call_id, Replayed { diverged: d, .. })) => {
                    self.report.records += 1;
                    if let Some(d) = d {
                        if diverged_first(self.diverged, &call_id) {
                            self.report.divergences.push(*d);
                        }
                    }
                }
                Err(e) => self.report.unreadable.push((*seq, e)),
            }
        }
        self.report.records += chunk.records;
        self.report.unreadable.extend(chunk.unreadable);
        for d in chunk.divergences {
            if diverged_first(self.diverged, &d.call_id) {
                self.report.divergences.push(d);
            }
        }
        self.calls.extend(chunk.before_from);
        for (call_id, state) in chunk.finals {
            self.calls.insert(fingerprint(&call_id));
            if state.is_ended() {
                self.states.remove(&call_id);
            } else {
                self.states.insert(call_id, state);
            }
        }
    }
}

/// The state a call's last readable record before `rec` left, read through the log's per-call
/// index (for a call whose state is not kept: ended, or only seen before `from`); the initial
/// state when it has none.
fn previous_state(reader: &LogReader, rec: &Rec<'_>) -> Result<CallState, String> {
    let seqs = reader.log().seqs_of_call(rec.call_id()).map_err(|e| e.to_string())?;
    for seq in seqs.into_iter().rev().filter(|s| *s < rec.seq()) {
        let Ok(Some(bytes)) = reader.log().raw_record(seq) else { continue };
        if let Ok(after) = Rec::parse(&bytes).and_then(|r| r.after()) {
            return Ok(after);
        }
    }
    Ok(initial_state(&rec.after()?))
}

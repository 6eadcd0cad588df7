//! `replay check`: feed every record's input through today's machines, from the state the
//! call's previous record left, and compare with what was recorded.

use std::collections::HashMap;

use callbus_engine::log::{EventLog, RawRecord, Record};
use callbus_engine::machines::{initial_state, CallState, Ctx, Effect, Input, Timeouts};

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
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions { from: 1, to: u64::MAX, call: None, timeouts: Timeouts::default(), progress: false }
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

/// Records handed to a worker at a time.
const BATCH: usize = 256;

/// A record's `call_id`, read without decoding the rest (the field comes fourth).
struct CallOf(String);

impl<'de> serde::Deserialize<'de> for CallOf {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = CallOf;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a log record")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<CallOf, A::Error> {
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "call_id" {
                        return Ok(CallOf(map.next_value()?));
                    }
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
                Err(serde::de::Error::missing_field("call_id"))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// One worker's share: the calls whose id hashes to it, in log order.
#[derive(Default)]
struct Share {
    records: u64,
    unreadable: Vec<(u64, String)>,
    divergences: Vec<Divergence>,
    diverged: std::collections::HashSet<String>,
    states: HashMap<String, CallState>,
}

impl Share {
    fn take(&mut self, seq: u64, bytes: &[u8], options: &CheckOptions, step: &Step<'_>) {
        let record: Record = match rmp_serde::from_slice(bytes) {
            Ok(r) => r,
            Err(e) => {
                if seq >= options.from {
                    self.unreadable.push((seq, e.to_string()));
                }
                return;
            }
        };
        if record.seq >= options.from {
            let before = self.states.remove(&record.call_id).unwrap_or_else(|| initial_state(&record.after));
            let ctx = Ctx {
                call_id: record.call_id.clone(),
                seq: record.seq,
                now_ms: record.time_ms,
                timeouts: options.timeouts,
            };
            let (after, effects) = step(&before, &record.input, &ctx);
            self.records += 1;
            let diverges = after != record.after || effects != record.effects;
            if diverges && self.diverged.insert(record.call_id.clone()) {
                self.divergences.push(Divergence {
                    seq: record.seq,
                    call_id: record.call_id.clone(),
                    input: record.input.label(),
                    recorded: (record.after.clone(), record.effects.clone()),
                    replayed: (after, effects),
                });
            }
        }
        self.states.insert(record.call_id, record.after);
    }
}

/// Checks records with `step` (the engine's machines are `CallState::step`; tests pass an
/// altered one). After a divergence, the call goes on from its recorded state. Calls are
/// spread over one worker per core by their id; each worker sees its calls' records in log
/// order.
pub fn check(reader: &LogReader, options: &CheckOptions, step: &Step<'_>) -> CheckReport {
    let only = options.call.as_ref().and_then(|c| reader.find_call(c).ok());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8);
    // States before `from` come from the records before it.
    let first = if options.from > 1 { 1 } else { options.from };
    let mut report = CheckReport::default();
    let last = reader.log().next_seq().saturating_sub(1).min(options.to);
    let bar = crate::progress_bar(last.saturating_sub(first.saturating_sub(1)), options.progress);
    let shares = std::thread::scope(|scope| {
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..workers {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(u64, RawRecord)>>(4);
            senders.push(tx);
            handles.push(scope.spawn(move || {
                let mut share = Share::default();
                for batch in rx {
                    for (seq, bytes) in batch {
                        share.take(seq, &bytes, options, step);
                    }
                }
                share
            }));
        }
        let mut batches: Vec<Vec<(u64, RawRecord)>> = (0..workers).map(|_| Vec::with_capacity(BATCH)).collect();
        for item in reader.log().raw_records_from(first) {
            let (seq, bytes) = match item {
                Ok(r) => r,
                Err(e) => {
                    report.unreadable.push((0, e.to_string()));
                    continue;
                }
            };
            if seq > options.to {
                break;
            }
            // An unreadable head goes to worker 0, which reports the record.
            let worker = match rmp_serde::from_slice::<CallOf>(&bytes) {
                Ok(CallOf(call)) => {
                    if only.as_ref().is_some_and(|c| *c != call) {
                        continue;
                    }
                    let mut h = std::hash::DefaultHasher::new();
                    std::hash::Hash::hash(&call, &mut h);
                    (std::hash::Hasher::finish(&h) % workers as u64) as usize
                }
                Err(_) => 0,
            };
            batches[worker].push((seq, bytes));
            if seq % 4096 == 0 {
                bar.set_position((seq + 1).saturating_sub(first));
            }
            if batches[worker].len() == BATCH {
                let full = std::mem::replace(&mut batches[worker], Vec::with_capacity(BATCH));
                if senders[worker].send(full).is_err() {
                    break;
                }
            }
        }
        for (tx, batch) in senders.iter().zip(batches) {
            if !batch.is_empty() {
                let _ = tx.send(batch);
            }
        }
        drop(senders);
        handles.into_iter().filter_map(|h| h.join().ok()).collect::<Vec<Share>>()
    });
    bar.finish_and_clear();
    for share in shares {
        report.records += share.records;
        report.calls += share.states.len() as u64;
        report.unreadable.extend(share.unreadable);
        report.divergences.extend(share.divergences);
    }
    report.unreadable.sort_by_key(|(seq, _)| *seq);
    report.divergences.sort_by_key(|d| d.seq);
    report
}

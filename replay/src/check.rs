//! `replay check`: feed every record's input through today's machines, from the state the
//! call's previous record left, and compare with what was recorded.

use std::collections::HashMap;

use callbus_engine::log::LogError;
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
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions { from: 1, to: u64::MAX, call: None, timeouts: Timeouts::default() }
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
pub type Step<'a> = dyn Fn(&CallState, &Input, &Ctx) -> (CallState, Vec<Effect>) + 'a;

/// Checks records with `step` (the engine's machines are `CallState::step`; tests pass an
/// altered one). After a divergence, the call goes on from its recorded state.
pub fn check(reader: &LogReader, options: &CheckOptions, step: &Step<'_>) -> CheckReport {
    let mut report = CheckReport::default();
    let mut states: HashMap<String, CallState> = HashMap::new();
    let mut diverged: HashMap<String, ()> = HashMap::new();
    let only = options.call.as_ref().and_then(|c| reader.find_call(c).ok());
    // States before `from` come from the records before it.
    let warm_up = options.from > 1;
    for record in reader.records(if warm_up { 1 } else { options.from }, options.to) {
        let record = match record {
            Ok(r) => r,
            Err(LogError::Corrupt { seq, reason }) => {
                if seq >= options.from {
                    report.unreadable.push((seq, reason));
                }
                continue;
            }
            Err(e) => {
                report.unreadable.push((0, e.to_string()));
                continue;
            }
        };
        if only.as_ref().is_some_and(|c| *c != record.call_id) {
            continue;
        }
        if record.seq >= options.from {
            let before = states.get(&record.call_id).cloned().unwrap_or_else(|| initial_state(&record.after));
            let ctx = Ctx {
                call_id: record.call_id.clone(),
                seq: record.seq,
                now_ms: record.time_ms,
                timeouts: options.timeouts,
            };
            let (after, effects) = step(&before, &record.input, &ctx);
            report.records += 1;
            if (after != record.after || effects != record.effects) && !diverged.contains_key(&record.call_id) {
                diverged.insert(record.call_id.clone(), ());
                report.divergences.push(Divergence {
                    seq: record.seq,
                    call_id: record.call_id.clone(),
                    input: record.input.label(),
                    recorded: (record.after.clone(), record.effects.clone()),
                    replayed: (after, effects),
                });
            }
        }
        states.insert(record.call_id.clone(), record.after);
    }
    report.calls = states.len() as u64;
    report
}

//! Re-running a log through today's machines, one record at a time.

use callbus_engine::machines::{initial_state, CallState, Ctx, Effect, Timeouts};

/// Re-runs logged records through today's machines, in log order, keeping each call's state
/// so the next record of the call starts from it: what a determinism check or a "what changed
/// in this build" run needs.
#[derive(Debug)]
pub struct Replayer {
    timeouts: Timeouts,
    states: std::collections::HashMap<String, CallState>,
}

impl Replayer {
    /// A replayer using these timeouts (the engine's).
    pub fn new(timeouts: Timeouts) -> Replayer {
        Replayer { timeouts, states: Default::default() }
    }

    /// What today's machines make of `record`'s input, from the state its call's previous
    /// record left (or its initial state). The logged `after` becomes the call's state for the
    /// next record, so one divergence does not cascade.
    pub fn recheck(&mut self, record: &callbus_engine::log::Record) -> (CallState, Vec<Effect>) {
        let before = self.states.get(&record.call_id).cloned().unwrap_or_else(|| initial_state(&record.after));
        let ctx = Ctx { call_id: &record.call_id, seq: record.seq, now_ms: record.time_ms, timeouts: self.timeouts };
        let out = before.step(&record.input, &ctx);
        self.states.insert(record.call_id.clone(), record.after.clone());
        out
    }

    /// Forgets a call (e.g. after a record of it could not be read).
    pub fn forget(&mut self, call_id: &str) {
        self.states.remove(call_id);
    }
}

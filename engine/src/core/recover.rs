//! Recovery: the core rebuilt from the log's snapshots, kept `cmd_id`s and the records after
//! the last checkpoint.

use std::time::Duration;

use super::{CallEntry, Core, CoreConfig, Now};
use crate::log::{LogError, Record, RememberedCommand, Snapshot};
use crate::machines::Input;

/// What recovery found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Live calls.
    pub live: usize,
    /// Records read after the checkpoint.
    pub tail: usize,
    /// Timers armed again.
    pub timers: usize,
}

impl Core {
    /// Rebuilds the core at `now` from what the log kept: `commands` (the kept `cmd_id`s),
    /// `snapshots`, and `tail`, the records after the checkpoint in order; the next record gets
    /// `next_seq`. The timers of live calls are armed again (one already due fires at the next
    /// [`Core::handle_timeout`]).
    pub fn restore(
        config: CoreConfig,
        now: Now,
        next_seq: u64,
        mut commands: Vec<(String, RememberedCommand)>,
        snapshots: Vec<Snapshot>,
        tail: impl Iterator<Item = Result<Record, LogError>>,
    ) -> (Core, Restored) {
        let mut core = Core::new(config, next_seq);
        // The cmd_ids kept at checkpoints, oldest first; those past the window are dropped.
        commands.sort_by_key(|(_, c)| c.seq);
        for (cmd_id, c) in commands {
            core.remember(cmd_id, c, true);
        }
        core.forget_old_commands(now.wall_ms);
        core.calls.reserve(snapshots.len());
        core.by_sip.reserve(snapshots.len());
        for snap in snapshots {
            core.index(&snap.call_id, &snap.state);
            let entry = Box::new(CallEntry {
                state: snap.state,
                last_seq: snap.seq,
                ended_at: None,
                timers: snap.timers,
                saved: true,
            });
            core.calls.insert(snap.call_id, entry);
        }
        let mut read = 0;
        for record in tail {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "skipping an unreadable record during recovery");
                    continue;
                }
            };
            read += 1;
            // Already in the call's snapshot (a checkpoint staged while the record was).
            if core.calls.get(&record.call_id).is_some_and(|e| e.last_seq >= record.seq) {
                continue;
            }
            if let Input::Command { cmd_id, .. } = &record.input {
                let kept =
                    RememberedCommand { seq: record.seq, time_ms: record.time_ms, call_id: record.call_id.clone() };
                core.remember(cmd_id.clone(), kept, false);
            }
            core.index(&record.call_id, &record.after);
            core.dirty.insert(record.call_id.clone());
            let before = core.calls.remove(&record.call_id);
            if let Some(before) = &before {
                super::note_dropped_keys(&mut core.dropped_keys, &record.call_id, &before.state, &record.after);
            }
            let timers = before.map(|e| e.timers).unwrap_or_default();
            let ended_at = record.after.is_ended().then_some(now.at);
            // `saved`: a call of the tail may have a snapshot from an earlier life of the log (a
            // partition's copy): its removal is kept.
            let mut entry =
                Box::new(CallEntry { state: record.after, last_seq: record.seq, ended_at, timers, saved: true });
            let fired = match &record.input {
                Input::Timer { name } => Some(name.as_str()),
                _ => None,
            };
            entry.track_timers(fired, &record.effects, record.time_ms);
            core.calls.insert(record.call_id, entry);
        }
        core.live = core.calls.values().filter(|e| !e.state.is_ended()).count();
        for entry in core.calls.values().filter(|e| !e.state.is_ended()) {
            *core.live_by_state.entry((entry.state.kind(), entry.state.name())).or_default() += 1;
        }
        let mut armed = 0;
        for (call_id, entry) in core.calls.iter().filter(|(_, e)| !e.state.is_ended()) {
            for (name, deadline) in &entry.timers {
                let wait = Duration::from_millis(deadline.saturating_sub(now.wall_ms));
                core.timers.arm(call_id, name, now.at + wait);
                armed += 1;
            }
        }
        if armed > 0 {
            tracing::info!(armed, "timers of recovered calls started again");
        }
        let live = core.live;
        (core, Restored { live, tail: read, timers: armed })
    }

    /// Finds `call_id` by its SIP Call-ID and UA keys.
    fn index(&mut self, call_id: &str, state: &crate::machines::CallState) {
        if let Some(sip) = state.sip_call_id() {
            self.by_sip.insert(sip.to_owned(), call_id.to_owned());
        }
        for key in state.keys() {
            self.by_key.insert(key.to_owned(), call_id.to_owned());
        }
    }
}

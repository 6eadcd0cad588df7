//! The engine's decisions without I/O: a state machine in the manner of quinn-proto's
//! `Connection`. [`Core::handle`] takes one input and the time, and says what to do in
//! [`Outputs`]: records to log, replies, notifications, MI requests; [`Core::poll_timeout`]
//! says when [`Core::handle_timeout`] is next due (a call's timer, or housekeeping).
//!
//! Everything the engine decides lives here: which events create calls and which call an input
//! belongs to, parking UA events that come before the reply naming their session, `cmd_id`
//! dedupe, the queries `call.get` and `call.list`, reconciliation with OpenSIPS (which calls to
//! close, which dialogs to adopt), checkpoints and recovery. The driver (the `driver` module) only
//! moves bytes: it feeds inputs in, stages and commits the records, and then carries out the
//! rest. The core is rebuilt from the log after a failed commit, so nothing it decided for an
//! uncommitted batch survives.

mod commands;
mod reconcile;
mod recover;
mod timers;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use callbus_schemas::bus::MiBusReply;
use callbus_schemas::command::{CallNotificationRef, CommandErrorCode};
use callbus_schemas::event::{Event, UaEventType};
use callbus_schemas::subjects::{self, Verb};

use crate::log::{LogError, RememberedCommand, Snapshot, RECORD_FORMAT};
use crate::machines::{call_of_request, CallState, Ctx, DialogState, Effect, Input, Timeouts, UaState};
use crate::placement::Placement;

pub use recover::Restored;

/// How long an `E_UA_SESSION` for a key nobody knows yet waits for the `ua_session_client_start`
/// reply that names it (OpenSIPS may raise a client session's first event before answering).
pub const PARK_FOR: Duration = Duration::from_secs(3);
/// How often ended calls are forgotten and parked events expire.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The most `cmd_id`s remembered for answering repeats, whatever their age (within
/// `cmd_id_window`): ~150 bytes each in memory and in the log's `meta` tree.
pub const REMEMBERED_COMMANDS: usize = 100_000;

/// What the core is told of the engine's set-up.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// The machines' timeouts.
    pub timeouts: Timeouts,
    /// The configured OpenSIPS nodes (the first is the default of `call.start`/`ua.start`).
    pub nodes: Vec<String>,
    /// New calls (`call.start`, `ua.start`) are refused beyond this many live calls.
    pub max_live_calls: usize,
    /// How long an accepted `cmd_id` is answered with its first answer.
    pub cmd_id_window: Duration,
    /// How long an ended call stays in memory.
    pub ended_retention: Duration,
    /// Cluster mode: the partition this core serves.
    pub placement: Option<Placement>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            timeouts: Timeouts::default(),
            nodes: vec!["default".into()],
            max_live_calls: 500_000,
            cmd_id_window: Duration::from_secs(24 * 3600),
            ended_retention: Duration::from_secs(60),
            placement: None,
        }
    }
}

/// The time of an input: the monotonic clock for waits, the wall clock for what is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Monotonic: timers and ages.
    pub at: Instant,
    /// Milliseconds since the Unix epoch: record times, call ids, timer deadlines in snapshots.
    pub wall_ms: u64,
}

impl Now {
    /// `ms` milliseconds later on both clocks.
    pub fn after_ms(self, ms: u64) -> Now {
        Now { at: self.at + Duration::from_millis(ms), wall_ms: self.wall_ms + ms }
    }
}

/// One input to the core.
#[derive(Clone, Debug)]
pub enum CoreInput {
    /// An OpenSIPS event datagram from `node`.
    Event {
        /// The OpenSIPS node.
        node: String,
        /// The bridge's sequence number of it.
        bridge_seq: Option<u64>,
        /// The datagram.
        payload: Bytes,
    },
    /// An app's command.
    Command {
        /// Its verb (from the subject).
        verb: Verb,
        /// Its body.
        payload: Bytes,
        /// Where the answer goes, if anywhere.
        reply: Option<String>,
        /// When it came in (handed back in [`Answered`] for the driver's metrics).
        received: Instant,
    },
    /// OpenSIPS's answer to an MI request a machine made.
    MiReply {
        /// The request's id.
        request: String,
        /// The answer.
        reply: MiBusReply,
    },
    /// What OpenSIPS lists on a node, for reconciliation.
    Reconciled(Reconciled),
}

/// OpenSIPS's dialogs and UA sessions on a node, listed for reconciliation.
#[derive(Clone, Debug)]
pub struct Reconciled {
    /// The node.
    pub node: String,
    /// Its dialogs: SIP Call-ID and dialog state.
    pub dialogs: Vec<(String, i64)>,
    /// The keys of its UA sessions (client: Call-ID, server: To-tag), if it told them.
    pub ua_keys: Option<Vec<String>>,
    /// The calls that may be closed by it: those known before the lists were taken (calls
    /// created since were seen live, after the list was taken).
    pub candidates: Vec<String>,
    /// A periodic check (not the one at start): only calls OpenSIPS no longer has are logged,
    /// so live calls do not fill the log with "still there" records.
    pub periodic: bool,
}

/// A record to log, already encoded.
#[derive(Clone, Debug)]
pub struct Staged {
    /// Its sequence.
    pub seq: u64,
    /// Its call.
    pub call_id: String,
    /// Its bytes (MessagePack, [`crate::log::encode`]).
    pub bytes: Vec<u8>,
}

/// An MI request to run through a node's bridge; its answer comes back as [`CoreInput::MiReply`].
#[derive(Clone, Debug, PartialEq)]
pub struct MiRequest {
    /// The request's id.
    pub request: String,
    /// The node.
    pub node: String,
    /// The MI command.
    pub command: String,
    /// Its params.
    pub params: serde_json::Value,
}

/// A command answered: its verb, outcome and refusal code (for metrics and the service's stats).
#[derive(Clone, Debug)]
pub struct Answered {
    /// The verb.
    pub verb: Verb,
    /// `accepted`, `refused`, `repeated` or `data`.
    pub outcome: &'static str,
    /// When it came in.
    pub received: Instant,
    /// The refusal's code.
    pub refused: Option<CommandErrorCode>,
}

/// A `call.get` with `history`: the call's records are read from the log by the driver.
#[derive(Clone, Debug)]
pub struct HistoryQuery {
    /// Where the answer goes.
    pub reply: String,
    /// The command's id.
    pub cmd_id: String,
    /// The call.
    pub call_id: String,
    /// The call's summary.
    pub summary: serde_json::Value,
}

/// What the driver is to do after an input: log `records`, commit, and only then carry out
/// the rest.
#[derive(Default, Debug)]
pub struct Outputs {
    /// Records to stage, in order.
    pub records: Vec<Staged>,
    /// Answers to commands: subject and body.
    pub replies: Vec<(String, Bytes)>,
    /// Notifications: subject and body.
    pub notifications: Vec<(String, Bytes)>,
    /// MI requests.
    pub mi: Vec<MiRequest>,
    /// Commands answered.
    pub answered: Vec<Answered>,
    /// `call.get` queries with history, to answer after reading the log.
    pub histories: Vec<HistoryQuery>,
    /// UA session keys now owned here (cluster mode routes their events here).
    pub keys_learned: Vec<String>,
    /// UA session keys no longer owned here.
    pub keys_forgotten: Vec<String>,
}

impl Outputs {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.replies.is_empty()
            && self.notifications.is_empty()
            && self.mi.is_empty()
            && self.histories.is_empty()
    }
}

/// A call in memory.
pub(crate) struct CallEntry {
    pub(crate) state: CallState,
    /// The sequence of the call's last record.
    pub(crate) last_seq: u64,
    pub(crate) ended_at: Option<Instant>,
    /// Its timers still to fire: name and when (wall clock ms), kept so a restart re-arms them.
    pub(crate) timers: Vec<(String, u64)>,
    /// Whether the log may hold a snapshot of it: a call that began and ended between two
    /// checkpoints has none to remove.
    pub(crate) saved: bool,
}

impl CallEntry {
    /// Applies one record's timer effects, after the timer that was its input (`fired`).
    pub(crate) fn track_timers(&mut self, fired: Option<&str>, effects: &[Effect], time_ms: u64) {
        if let Some(name) = fired {
            self.timers.retain(|(n, _)| n != name);
        }
        for effect in effects {
            match effect {
                Effect::StartTimer { name, after_ms } => {
                    self.timers.retain(|(n, _)| n != name);
                    self.timers.push((name.to_string(), time_ms.saturating_add(*after_ms)));
                }
                Effect::CancelTimer { name } => self.timers.retain(|(n, _)| n != name),
                _ => {}
            }
        }
    }
}

/// A UA event waiting for its key.
#[derive(Clone, Debug)]
struct Parked {
    at: Instant,
    node: String,
    bridge_seq: Option<u64>,
    payload: Bytes,
}

/// What a checkpoint writes: kept and forgotten `cmd_id`s, the snapshots of the calls changed
/// since the last one (and the ended ones to remove), and the sequence it covers.
#[derive(Debug, Default)]
pub struct Checkpoint {
    /// `cmd_id`s accepted since the last checkpoint.
    pub commands: Vec<(String, RememberedCommand)>,
    /// `cmd_id`s forgotten since.
    pub forgotten: Vec<String>,
    /// Snapshots of live calls changed since.
    pub snapshots: Vec<Snapshot>,
    /// Calls whose snapshot goes (ended, or forgotten).
    pub removed: Vec<String>,
    /// Every record up to this sequence is reflected.
    pub upto: u64,
}

/// The core's whole state as the log keeps it (see [`Core::whole`]).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Whole {
    /// The sequence the next record gets.
    pub next_seq: u64,
    /// The live calls.
    pub calls: Vec<Snapshot>,
    /// The remembered `cmd_id`s, oldest first.
    pub commands: Vec<(String, RememberedCommand)>,
}

/// The core's maps, keyed by call ids, SIP Call-IDs, session keys and `cmd_id`s. foldhash
/// (seeded at random for each map) hashes these short strings several times faster than the
/// standard library's SipHash, which was most of a restart with many live calls.
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// See [`HashMap`].
pub(crate) type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// One call fewer in `key`'s count; a count that reaches zero goes.
fn count_down(counts: &mut HashMap<(&'static str, &'static str), u64>, key: (&'static str, &'static str)) {
    if let Some(n) = counts.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

/// A datagram as the text its record keeps (OpenSIPS sends UTF-8; anything else is kept with
/// replacement characters). Checked whole first: the lossy path walks it in chunks.
fn datagram_text(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(payload).into_owned(),
    }
}

/// Keeps the keys `before` lists and `after` does not in `dropped` (per call), so the sweep
/// forgets them with the call.
fn note_dropped_keys(dropped: &mut HashMap<String, Vec<String>>, call_id: &str, before: &CallState, after: &CallState) {
    let now_listed = after.keys();
    for key in before.keys() {
        if !now_listed.contains(&key) {
            dropped.entry(call_id.to_owned()).or_default().push(key.to_owned());
        }
    }
}

/// The engine's state and decisions.
pub struct Core {
    config: CoreConfig,
    /// Calls by id. Boxed: a map's empty slots (up to half of them after it grows) then cost a
    /// pointer, not a whole call (~370 bytes).
    calls: HashMap<String, Box<CallEntry>>,
    /// How many of `calls` have not ended.
    live: usize,
    /// The same by kind and state (no zero entries): the live-calls gauge, without a walk over
    /// every call.
    live_by_state: HashMap<(&'static str, &'static str), u64>,
    by_sip: HashMap<String, String>,
    /// UA session keys → call.
    by_key: HashMap<String, String>,
    /// Per call, the keys it was found by that its state no longer lists (a leg a transfer
    /// replaced): they still route the old leg's late events, and go with the call.
    dropped_keys: HashMap<String, Vec<String>>,
    parked: HashMap<String, Vec<Parked>>,
    timers: timers::Timers,
    /// Accepted commands by `cmd_id` (a repeat gets the same `accepted` answer).
    remembered: HashMap<String, RememberedCommand>,
    /// The remembered `cmd_id`s, oldest first, with when they were accepted (ms).
    remembered_order: VecDeque<(String, u64)>,
    /// Remembered since the last checkpoint, to keep in the log with it.
    commands_unsaved: Vec<(String, RememberedCommand)>,
    /// Forgotten since the last checkpoint, to remove from the log.
    commands_forgotten: Vec<String>,
    next_call: u64,
    /// The sequence the next record gets.
    next_seq: u64,
    /// Calls changed since the last checkpoint.
    dirty: HashSet<String>,
    next_sweep: Option<Instant>,
}

impl Core {
    /// An empty core whose first record gets `next_seq`.
    pub fn new(config: CoreConfig, next_seq: u64) -> Core {
        Core {
            config,
            calls: HashMap::default(),
            live: 0,
            live_by_state: HashMap::default(),
            by_sip: HashMap::default(),
            by_key: HashMap::default(),
            dropped_keys: HashMap::default(),
            parked: HashMap::default(),
            timers: timers::Timers::default(),
            remembered: HashMap::default(),
            remembered_order: VecDeque::new(),
            commands_unsaved: Vec::new(),
            commands_forgotten: Vec::new(),
            next_call: 0,
            next_seq: next_seq.max(1),
            dirty: HashSet::default(),
            next_sweep: None,
        }
    }

    /// Handles one input at `now`; what to do goes into `out`. An error means a record could not
    /// be encoded: the batch is not to be committed.
    pub fn handle(&mut self, input: CoreInput, now: Now, out: &mut Outputs) -> Result<(), LogError> {
        self.next_sweep.get_or_insert(now.at + SWEEP_EVERY);
        let mut released = Vec::new();
        match input {
            CoreInput::Event { node, bridge_seq, payload } => {
                self.on_event(node, bridge_seq, payload, now, out, &mut released)?
            }
            CoreInput::Command { verb, payload, reply, received } => {
                self.on_command(verb, &payload, reply, received, now, out, &mut released)?
            }
            CoreInput::MiReply { request, reply } => {
                if let Some(call_id) = call_of_request(&request).map(str::to_owned) {
                    self.apply(&call_id, None, Input::MiReply { request, reply }, now, out, &mut released)?;
                }
            }
            CoreInput::Reconciled(r) => self.on_reconciled(r, now, out, &mut released)?,
        }
        self.release(released, now, out)
    }

    /// When [`Core::handle_timeout`] is next due: a call's timer, or housekeeping.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.timers.next(), self.next_sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Fires the timers due at `now` (in deadline order), and every second forgets calls ended
    /// longer than `ended_retention` ago, `cmd_id`s past their window and parked events older
    /// than [`PARK_FOR`].
    pub fn handle_timeout(&mut self, now: Now, out: &mut Outputs) -> Result<(), LogError> {
        while let Some((call_id, name)) = self.timers.pop_due(now.at) {
            let mut released = Vec::new();
            self.apply(&call_id, None, Input::Timer { name }, now, out, &mut released)?;
            self.release(released, now, out)?;
        }
        if self.next_sweep.is_none_or(|t| t <= now.at) {
            self.sweep(now, out);
            self.next_sweep = Some(now.at + SWEEP_EVERY);
        }
        Ok(())
    }

    /// Handles events parked for keys that became known, in their order of arrival.
    fn release(&mut self, mut released: Vec<Parked>, now: Now, out: &mut Outputs) -> Result<(), LogError> {
        while !released.is_empty() {
            let mut more = Vec::new();
            for p in released {
                self.on_event(p.node, p.bridge_seq, p.payload, now, out, &mut more)?;
            }
            released = more;
        }
        Ok(())
    }

    fn new_call_id(&mut self, now: Now) -> String {
        // Time-ordered and subject-safe: milliseconds and a counter, in hex.
        self.next_call += 1;
        let id = format!("c{:012x}{:06x}", now.wall_ms, self.next_call & 0xff_ffff);
        match &self.config.placement {
            // The partition is part of the id, so a command naming the call finds its owner.
            Some(p) => crate::placement::call_id_in(&id, p.partition),
            None => id,
        }
    }

    /// Steps a call with an input and stages its record; the sequence it got (0: no such call).
    fn apply(
        &mut self,
        call_id: &str,
        fresh: Option<CallState>,
        input: Input,
        now: Now,
        out: &mut Outputs,
        released: &mut Vec<Parked>,
    ) -> Result<u64, LogError> {
        self.apply_parsed(call_id, fresh, input, None, now, out, released)
    }

    /// As [`Core::apply`], with an event input's datagram already parsed (`parsed`).
    #[allow(clippy::too_many_arguments)]
    fn apply_parsed(
        &mut self,
        call_id: &str,
        fresh: Option<CallState>,
        input: Input,
        parsed: Option<&Event>,
        now: Now,
        out: &mut Outputs,
        released: &mut Vec<Parked>,
    ) -> Result<u64, LogError> {
        let seq = self.next_seq;
        let span = tracing::info_span!("call_input", call_id, seq);
        let _entered = span.enter();
        let ctx = Ctx { call_id, seq, now_ms: now.wall_ms, timeouts: self.config.timeouts };
        let (before, (after, effects)) = match (self.calls.get(call_id), fresh) {
            (Some(entry), _) => (Some(entry.state.name().into()), entry.state.step_parsed(&input, parsed, &ctx)),
            (None, Some(fresh)) => (None, fresh.step_parsed(&input, parsed, &ctx)),
            (None, None) => return Ok(0),
        };
        let fired = match &input {
            Input::Timer { name } => Some(name.clone()),
            _ => None,
        };
        let record = crate::log::Record {
            format: RECORD_FORMAT,
            seq,
            time_ms: now.wall_ms,
            call_id: call_id.to_owned(),
            partition: self.config.placement.map_or(0, |p| p.partition),
            input,
            before,
            after,
            effects,
        };
        let bytes = crate::log::encode(&record)?;
        self.next_seq += 1;
        // The record is on its way to disk; its state and effects are now this call's.
        let crate::log::Record { after, effects, call_id: record_call_id, .. } = record;
        out.records.push(Staged { seq, call_id: record_call_id, bytes });
        if !self.dirty.contains(call_id) {
            self.dirty.insert(call_id.to_owned());
        }
        let mut timer_effects = Vec::new();
        for effect in effects {
            match effect {
                Effect::Notify { event, cmd_id, data } => {
                    let note = CallNotificationRef {
                        seq,
                        time_ms: now.wall_ms,
                        call_id,
                        sip_call_id: after.sip_call_id(),
                        cmd_id: cmd_id.as_deref(),
                        event: &event,
                        state: after.name(),
                        data: &data,
                    };
                    match subjects::call_notification(call_id, &event) {
                        Ok(subject) => {
                            // Room for a typical notification at once, not grown from empty.
                            let mut body = Vec::with_capacity(512);
                            if serde_json::to_writer(&mut body, &note).is_err() {
                                body.clear();
                            }
                            out.notifications.push((subject, Bytes::from(body)))
                        }
                        Err(e) => tracing::error!(call_id, event, error = %e, "notification subject refused"),
                    }
                }
                Effect::Mi { request, node, command, params } => {
                    out.mi.push(MiRequest { request, node, command, params })
                }
                Effect::StartTimer { ref name, after_ms } => {
                    self.timers.arm(call_id, name, now.at + Duration::from_millis(after_ms));
                    timer_effects.push(effect);
                }
                Effect::CancelTimer { ref name } => {
                    self.timers.cancel(call_id, name);
                    timer_effects.push(effect);
                }
            }
        }
        if let Some(sip) = after.sip_call_id() {
            if !self.by_sip.contains_key(sip) {
                self.by_sip.insert(sip.to_owned(), call_id.to_owned());
            }
        }
        // What the call was: the keys its new state no longer lists, its place in the counts.
        let was_live = match self.calls.get(call_id) {
            Some(entry) => {
                note_dropped_keys(&mut self.dropped_keys, call_id, &entry.state, &after);
                let live = !entry.state.is_ended();
                if live {
                    count_down(&mut self.live_by_state, (entry.state.kind(), entry.state.name()));
                }
                live
            }
            None => false,
        };
        if !after.is_ended() {
            *self.live_by_state.entry((after.kind(), after.name())).or_default() += 1;
        }
        for key in after.keys() {
            if !self.by_key.contains_key(key) {
                self.by_key.insert(key.to_owned(), call_id.to_owned());
                if self.config.placement.is_some() {
                    out.keys_learned.push(key.to_owned());
                }
                if let Some(events) = self.parked.remove(key) {
                    released.extend(events);
                }
            }
        }
        let ended_now = after.is_ended().then_some(now.at);
        match (was_live, after.is_ended()) {
            (false, false) => self.live += 1,
            (true, true) => self.live = self.live.saturating_sub(1),
            _ => {}
        }
        if after.is_ended() {
            // An ended call's timers would only be ignored by its machine.
            let names: Vec<String> =
                self.calls.get(call_id).map(|e| e.timers.iter().map(|(n, _)| n.clone()).collect()).unwrap_or_default();
            for name in names.iter().map(String::as_str).chain(timer_effects.iter().filter_map(|e| match e {
                Effect::StartTimer { name, .. } => Some(name.as_ref()),
                _ => None,
            })) {
                self.timers.cancel(call_id, name);
            }
        }
        let entry = match self.calls.get_mut(call_id) {
            Some(entry) => {
                entry.state = after;
                entry.last_seq = seq;
                entry.ended_at = entry.ended_at.or(ended_now);
                entry
            }
            None => {
                let entry = Box::new(CallEntry {
                    state: after,
                    last_seq: seq,
                    ended_at: ended_now,
                    timers: Vec::new(),
                    saved: false,
                });
                self.calls.entry(call_id.to_owned()).or_insert(entry)
            }
        };
        entry.track_timers(fired.as_deref(), &timer_effects, now.wall_ms);
        Ok(seq)
    }

    fn on_event(
        &mut self,
        node: String,
        bridge_seq: Option<u64>,
        payload: Bytes,
        now: Now,
        out: &mut Outputs,
        released: &mut Vec<Parked>,
    ) -> Result<(), LogError> {
        let event = match Event::parse(&payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(%node, error = %e, "OpenSIPS event not usable: ignored (the raw datagram is on the bus)");
                return Ok(());
            }
        };
        let (sip, creates) = match &event {
            Event::DlgStateChanged(d) => (d.callid.as_str(), true),
            Event::CallHold(h) => (h.callid.as_str(), false),
            Event::CallTransfer(t) => (t.callid.as_str(), false),
            Event::UaSession(u) => {
                let datagram = datagram_text(&payload);
                let input = Input::Event { node: node.clone(), bridge_seq, datagram };
                match self.by_key.get(&u.key).cloned() {
                    Some(call_id) => {
                        self.apply_parsed(&call_id, None, input, Some(&event), now, out, released)?;
                    }
                    None if u.event_type == UaEventType::New => {
                        let call_id = self.new_call_id(now);
                        let fresh = CallState::Ua(UaState::server(&node, &u.key));
                        self.apply_parsed(&call_id, Some(fresh), input, Some(&event), now, out, released)?;
                    }
                    None => {
                        tracing::debug!(key = %u.key, event_type = %u.event_type.as_str(), "UA event for a key not known yet: parked");
                        let parked = Parked { at: now.at, node, bridge_seq, payload };
                        self.parked.entry(u.key.clone()).or_default().push(parked);
                    }
                }
                return Ok(());
            }
            Event::Other { .. } => {
                tracing::debug!(event = event.name(), "event not handled by this engine version");
                return Ok(());
            }
        };
        let datagram = datagram_text(&payload);
        match self.by_sip.get(sip).cloned() {
            Some(call_id) => {
                let input = Input::Event { node, bridge_seq, datagram };
                self.apply_parsed(&call_id, None, input, Some(&event), now, out, released)?;
            }
            None if creates => {
                let call_id = self.new_call_id(now);
                let fresh = CallState::Dialog(DialogState::new(&node, sip));
                let input = Input::Event { node, bridge_seq, datagram };
                self.apply_parsed(&call_id, Some(fresh), input, Some(&event), now, out, released)?;
            }
            None => {
                tracing::warn!(event = event.name(), sip_call_id = %sip, "event for a call the engine does not know: ignored")
            }
        }
        Ok(())
    }

    /// Forgets calls that ended a while ago (late events for them are then ignored), old
    /// `cmd_id`s and parked events nobody claimed.
    fn sweep(&mut self, now: Now, out: &mut Outputs) {
        let retention = self.config.ended_retention;
        let gone: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, e)| e.ended_at.is_some_and(|t| now.at.saturating_duration_since(t) >= retention))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(entry) = self.calls.remove(&id) {
                if let Some(sip) = entry.state.sip_call_id() {
                    if self.by_sip.get(sip) == Some(&id) {
                        self.by_sip.remove(sip);
                    }
                }
                let dropped = self.dropped_keys.remove(&id).unwrap_or_default();
                for key in entry.state.keys().into_iter().chain(dropped.iter().map(String::as_str)) {
                    if self.by_key.get(key) == Some(&id) {
                        self.by_key.remove(key);
                        if self.config.placement.is_some() {
                            out.keys_forgotten.push(key.to_owned());
                        }
                    }
                }
            }
        }
        let cluster = self.config.placement.is_some();
        self.parked.retain(|key, events| {
            let before = events.len();
            events.retain(|p| now.at.saturating_duration_since(p.at) < PARK_FOR);
            if events.len() < before && !cluster {
                tracing::warn!(%key, dropped = before - events.len(), "UA events for a session no call started or owns: dropped after 3 s (the raw datagrams are on the bus)");
            }
            !events.is_empty()
        });
        self.forget_old_commands(now.wall_ms);
    }

    /// Whether a checkpoint has anything to write.
    pub fn checkpoint_due(&self) -> bool {
        !self.dirty.is_empty() || !self.commands_unsaved.is_empty() || !self.commands_forgotten.is_empty()
    }

    /// What the next checkpoint writes (and, from now on, the calls changed since it).
    pub fn checkpoint(&mut self) -> Checkpoint {
        let mut cp = Checkpoint {
            commands: std::mem::take(&mut self.commands_unsaved),
            forgotten: std::mem::take(&mut self.commands_forgotten),
            upto: self.next_seq.saturating_sub(1),
            ..Checkpoint::default()
        };
        for call_id in std::mem::take(&mut self.dirty) {
            match self.calls.get_mut(&call_id) {
                Some(entry) if !entry.state.is_ended() => {
                    entry.saved = true;
                    cp.snapshots.push(Snapshot {
                        seq: entry.last_seq,
                        call_id,
                        state: entry.state.clone(),
                        timers: entry.timers.clone(),
                    })
                }
                // Ended before its first snapshot: nothing to remove.
                Some(entry) if !entry.saved => {}
                _ => cp.removed.push(call_id),
            }
        }
        cp
    }

    /// Everything a rebuild needs, whole: the live calls' snapshots (with their timers) and
    /// every remembered `cmd_id` (a cluster partition's snapshot; [`Core::restore`] takes it
    /// back with no tail).
    pub fn whole(&self) -> Whole {
        let calls = self
            .calls
            .iter()
            .filter(|(_, e)| !e.state.is_ended())
            .map(|(id, e)| Snapshot {
                seq: e.last_seq,
                call_id: id.clone(),
                state: e.state.clone(),
                timers: e.timers.clone(),
            })
            .collect();
        let commands = self
            .remembered_order
            .iter()
            .filter_map(|(id, _)| self.remembered.get(id).map(|c| (id.clone(), c.clone())))
            .collect();
        Whole { next_seq: self.next_seq, calls, commands }
    }

    /// The sequence the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// How many calls have not ended.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Whether memory holds `call_id` (live, or ended less than `ended_retention` ago).
    pub fn knows(&self, call_id: &str) -> bool {
        self.calls.contains_key(call_id)
    }

    /// A live call's state.
    pub fn state(&self, call_id: &str) -> Option<&CallState> {
        self.calls.get(call_id).map(|e| &e.state)
    }

    /// The UA session keys of its calls.
    pub fn known_keys(&self) -> Vec<String> {
        self.by_key.keys().cloned().collect()
    }

    /// The ids of the calls that have not ended.
    pub fn live_call_ids(&self) -> Vec<String> {
        self.calls.iter().filter(|(_, e)| !e.state.is_ended()).map(|(id, _)| id.clone()).collect()
    }

    /// The nodes to reconcile with: the configured ones and those of live calls.
    pub fn reconcile_nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> =
            self.calls.values().filter(|e| !e.state.is_ended()).map(|e| e.state.node().to_owned()).collect();
        nodes.extend(self.config.nodes.iter().cloned());
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Live calls by kind and state (states no call is in are left out).
    pub fn live_counts(&self) -> std::collections::HashMap<(&'static str, &'static str), u64> {
        self.live_by_state.iter().map(|(k, n)| (*k, *n)).collect()
    }

    /// How many timers are armed and how many UA events are parked.
    pub fn waiting(&self) -> (usize, usize) {
        (self.timers.len(), self.parked.values().map(Vec::len).sum())
    }
}

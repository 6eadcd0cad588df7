//! The engine's I/O: one owner task takes inputs from NATS (OpenSIPS events, commands), from
//! the MI requests it made and from its timers, feeds each through its call's machine, stages
//! the record, and after a whole batch commits the log once (group commit) and only then
//! carries out the effects: command replies, notifications, MI requests, timers. Nothing is
//! acknowledged before it is on disk.
//!
//! One task owns all call state, so inputs are processed in one order, the order of the log.
//! Batches take whatever is waiting, up to [`MAX_BATCH`]: one flush (~0.1–0.3 ms here) then
//! covers hundreds of inputs under load and one input when idle.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Subject;
use bytes::Bytes;
use callbus_schemas::bus::{BridgeErrorKind, MiBusReply, HEADER_SEQ};
use callbus_schemas::command::{
    CallNotification, CallTarget, Command, CommandError, CommandErrorCode, CommandReply, CommandRequest,
};
use callbus_schemas::event::{Event, UaEventType};
use callbus_schemas::mi::DlgListPage;
use callbus_schemas::subjects::{self, Subject as BusSubject, Verb};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::log::disk::DiskGuard;
use crate::log::{EventLog, LogError, Record, RememberedCommand, SledLog, Snapshot, RECORD_FORMAT};
use crate::machines::{call_of_request, BridgedState, CallState, Ctx, DialogState, Effect, Input, UaState};
use crate::EngineConfig;

/// How long a stop waits for NATS to take what was published (NATS may be gone: a stop must
/// still end).
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// The most inputs handled before one commit.
pub const MAX_BATCH: usize = 1024;
/// The most `cmd_id`s remembered for answering repeats, whatever their age (within
/// `EngineConfig::cmd_id_window`): ~150 bytes each in memory and in the log's `meta` tree.
const REMEMBERED_COMMANDS: usize = 100_000;
/// How long an `E_UA_SESSION` for a key nobody knows yet waits for the `ua_session_client_start`
/// reply that names it (OpenSIPS may raise a client session's first event before answering).
const PARK_FOR: Duration = Duration::from_secs(3);

/// Work for the owner task.
#[derive(Clone)]
pub(crate) enum Work {
    Event {
        node: String,
        bridge_seq: Option<u64>,
        payload: Bytes,
        /// Its sequence in the cluster's input stream (cluster mode).
        stream_seq: Option<u64>,
    },
    /// Cluster mode: every input-stream event up to this sequence that belongs to this
    /// partition has been handed over already (lets an idle partition's resume point advance).
    Position {
        stream_seq: u64,
    },
    Command {
        verb: Verb,
        payload: Bytes,
        reply: Option<Subject>,
        /// When the engine took it off NATS.
        received: Instant,
    },
    MiReply {
        request: String,
        reply: MiBusReply,
    },
    Timer {
        call_id: String,
        name: String,
        generation: u64,
    },
    /// OpenSIPS's dialogs on `node`; only `candidates` (calls recovered from the log at start)
    /// may be closed by it: calls created since were seen live, after the list was taken.
    Reconciled {
        node: String,
        dialogs: Vec<(String, i64)>,
        /// The keys of OpenSIPS's UA sessions (client: Call-ID, server: To-tag), if it told them.
        ua_keys: Option<Vec<String>>,
        candidates: Vec<String>,
        /// A periodic check (not the one at start): only calls OpenSIPS no longer has are
        /// logged, so live calls do not fill the log with "still there" records.
        periodic: bool,
    },
}

struct CallEntry {
    state: CallState,
    /// The sequence of the call's last record.
    last_seq: u64,
    ended_at: Option<Instant>,
    /// Whether the log holds a snapshot of it (a call that started and ended between two
    /// checkpoints never had one: nothing to remove).
    snapshotted: bool,
    /// Its timers still to fire: name and when (wall clock ms), kept so a restart re-arms them.
    timers: Vec<(String, u64)>,
}

impl CallEntry {
    /// Applies one record's timer effects, after the timer that was its input (`fired`).
    fn track_timers(&mut self, fired: Option<&str>, effects: &[Effect], time_ms: u64) {
        if let Some(name) = fired {
            self.timers.retain(|(n, _)| n != name);
        }
        for effect in effects {
            match effect {
                Effect::StartTimer { name, after_ms } => {
                    self.timers.retain(|(n, _)| n != name);
                    self.timers.push((name.clone(), time_ms.saturating_add(*after_ms)));
                }
                Effect::CancelTimer { name } => self.timers.retain(|(n, _)| n != name),
                _ => {}
            }
        }
    }
}

/// How often the snapshots of the calls touched since are written.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// A retention pass starts at most this often (or every retention, when shorter).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The engine's metric handles (looked up once; each update is an atomic operation).
pub(crate) struct EngineMetrics {
    inputs_event: metrics::Counter,
    inputs_command: metrics::Counter,
    inputs_mi_reply: metrics::Counter,
    inputs_timer: metrics::Counter,
    log_appends: metrics::Counter,
    log_failures: metrics::Counter,
    flush_seconds: metrics::Histogram,
    batch_size: metrics::Histogram,
    /// The (kind, state) pairs of the last live-calls gauge update, to zero the ones gone.
    live_labels: std::collections::HashSet<(&'static str, &'static str)>,
}

impl EngineMetrics {
    fn new() -> EngineMetrics {
        let input = |kind: &'static str| metrics::counter!("callbus_engine_inputs_total", "input" => kind);
        EngineMetrics {
            inputs_event: input("event"),
            inputs_command: input("command"),
            inputs_mi_reply: input("mi_reply"),
            inputs_timer: input("timer"),
            log_appends: metrics::counter!("callbus_engine_log_appends_total"),
            log_failures: metrics::counter!("callbus_engine_log_failures_total"),
            flush_seconds: metrics::histogram!("callbus_engine_log_flush_duration_seconds"),
            batch_size: metrics::histogram!("callbus_engine_batch_size"),
            live_labels: Default::default(),
        }
    }
}

/// An `E_UA_SESSION` waiting for its key: arrival, node, bridge seq, datagram.
type Parked = (Instant, String, Option<u64>, Bytes);

/// What a batch must do once it is durable.
#[derive(Default)]
struct Outputs {
    replies: Vec<(Subject, Bytes)>,
    notifications: Vec<(String, Bytes)>,
    mi: Vec<(String, String, String, Value)>,
    timers: Vec<(String, String, u64, u64)>,
    /// Accepted commands to remember, with their record's sequence.
    remembered: Vec<(String, CommandReply, u64)>,
    staged: usize,
    /// Each command's verb, how it was answered, and when it came in (for metrics).
    /// Each command answered: its verb, outcome, when it came, and its refusal's code.
    outcomes: Vec<(Verb, &'static str, Instant, Option<CommandErrorCode>)>,
}

pub(crate) struct Owner {
    config: EngineConfig,
    log: Arc<SledLog>,
    client: async_nats::Client,
    calls: HashMap<String, CallEntry>,
    /// How many of `calls` have not ended.
    live: usize,
    by_sip: HashMap<String, String>,
    /// UA session keys → call.
    by_key: HashMap<String, String>,
    /// UA events for keys not known yet, by key: (arrival, node, bridge seq, datagram).
    parked: HashMap<String, Vec<Parked>>,
    /// Parked events whose key got known, to handle next.
    released: Vec<(String, Option<u64>, Bytes)>,
    timers: HashMap<(String, String), u64>,
    timer_generation: u64,
    remembered: HashMap<String, CommandReply>,
    /// The remembered `cmd_id`s, oldest first, with when they were accepted (ms).
    remembered_order: VecDeque<(String, u64)>,
    /// Remembered since the last checkpoint, to keep in the log with it.
    commands_unsaved: Vec<(String, RememberedCommand)>,
    /// Forgotten (too old, or too many) since the last checkpoint, to remove from the log.
    commands_forgotten: Vec<String>,
    next_call: u64,
    tx: mpsc::Sender<Work>,
    /// Calls changed since the last checkpoint.
    dirty: std::collections::HashSet<String>,
    last_checkpoint: Instant,
    /// Retention: where its scan goes on (1: a new pass), and when the last pass ended.
    prune_from: u64,
    last_prune: Instant,
    metrics: EngineMetrics,
    /// Inputs to handle before the queue: a failed batch's, after the log works again.
    pending: VecDeque<Work>,
    /// Cluster mode: the partition this owner serves and its replicated log.
    pub(crate) part: Option<crate::cluster::PartCtx>,
    /// Single engine: the free space of the data dir against the reserve (`log::disk`).
    pub(crate) disk: Option<DiskGuard>,
    /// The `callbus` NATS service whose stats count the commands answered here.
    pub(crate) service: Option<callbus_service::Service>,
}

/// Why the owner stopped before it was told to: the log failed. The inputs of the failed
/// batch that no one was answered for (events, MI replies, timers), and the queue.
pub(crate) struct Stopped {
    pub error: LogError,
    pub pending: Vec<Work>,
    pub rx: mpsc::Receiver<Work>,
}

impl Owner {
    fn new_call_id(&mut self) -> String {
        // Time-ordered and subject-safe: milliseconds and a counter, in hex.
        self.next_call += 1;
        let id = format!("c{:012x}{:06x}", self.config.clock.now_ms(), self.next_call & 0xff_ffff);
        match &self.part {
            // The partition is part of the id, so a command naming the call finds its owner.
            Some(part) => crate::cluster::call_id_in(&id, part.partition),
            None => id,
        }
    }

    fn resolve(&self, target: &CallTarget) -> Option<String> {
        match target {
            CallTarget::CallId(id) => self.calls.contains_key(id).then(|| id.clone()),
            // A UA client session's key is the Call-ID of its INVITE, so a leg of a UA or
            // click-to-dial call is found by its SIP Call-ID too (the Call API door names calls so).
            CallTarget::SipCallId(sip) => self.by_sip.get(sip).or_else(|| self.by_key.get(sip)).cloned(),
            CallTarget::Key(key) => self.by_key.get(key).cloned(),
        }
    }

    /// Steps a call with an input and stages the record.
    fn apply(
        &mut self,
        call_id: &str,
        fresh: Option<CallState>,
        input: Input,
        out: &mut Outputs,
    ) -> Result<u64, LogError> {
        let span = tracing::info_span!("call_input", call_id, seq = self.log.next_seq());
        let _entered = span.enter();
        let existing = self.calls.get(call_id).map(|e| &e.state);
        let before = existing.map(|s| s.name().to_owned());
        let Some(current) = existing.cloned().or(fresh) else { return Ok(0) };
        let seq = self.log.next_seq();
        let time_ms = self.config.clock.now_ms();
        let ctx = Ctx { call_id: call_id.to_owned(), seq, now_ms: time_ms, timeouts: self.config.timeouts };
        let (after, effects) = current.step(&input, &ctx);
        let record = Record {
            format: RECORD_FORMAT,
            seq,
            time_ms,
            call_id: call_id.to_owned(),
            partition: self.part.as_ref().map_or(0, |p| p.partition),
            input,
            before,
            after,
            effects,
        };
        match &mut self.part {
            None => self.log.stage(&record)?,
            Some(part) => {
                let bytes = crate::log::encode(&record)?;
                self.log.stage_raw(seq, call_id, &bytes)?;
                part.add(&bytes);
            }
        }
        self.dirty.insert(call_id.to_owned());
        out.staged += 1;
        // The record is on its way to disk; its state and effects are now this call's.
        let timer_effects: Vec<Effect> = record
            .effects
            .iter()
            .filter(|e| matches!(e, Effect::StartTimer { .. } | Effect::CancelTimer { .. }))
            .cloned()
            .collect();
        let fired = match &record.input {
            Input::Timer { name } => Some(name.clone()),
            _ => None,
        };
        let Record { after, effects, .. } = record;
        for effect in effects {
            match effect {
                Effect::Notify { event, cmd_id, data } => {
                    let note = CallNotification {
                        seq,
                        time_ms,
                        call_id: call_id.to_owned(),
                        sip_call_id: after.sip_call_id().map(str::to_owned),
                        cmd_id,
                        event: event.clone(),
                        state: after.name().to_owned(),
                        data,
                    };
                    match subjects::call_notification(call_id, &event) {
                        Ok(subject) => out
                            .notifications
                            .push((subject, Bytes::from(serde_json::to_vec(&note).unwrap_or_default()))),
                        Err(e) => tracing::error!(call_id, event, error = %e, "notification subject refused"),
                    }
                }
                Effect::Mi { request, node, command, params } => out.mi.push((request, node, command, params)),
                Effect::StartTimer { name, after_ms } => {
                    self.timer_generation += 1;
                    self.timers.insert((call_id.to_owned(), name.clone()), self.timer_generation);
                    out.timers.push((call_id.to_owned(), name, after_ms, self.timer_generation));
                }
                Effect::CancelTimer { name } => {
                    self.timers.remove(&(call_id.to_owned(), name));
                }
            }
        }
        if let Some(sip) = after.sip_call_id() {
            if !self.by_sip.contains_key(sip) {
                self.by_sip.insert(sip.to_owned(), call_id.to_owned());
            }
        }
        for key in after.keys() {
            if !self.by_key.contains_key(key) {
                self.by_key.insert(key.to_owned(), call_id.to_owned());
                if let Some(part) = &self.part {
                    part.learn_key(key);
                }
                if let Some(events) = self.parked.remove(key) {
                    self.released.extend(events.into_iter().map(|(_, node, seq, payload)| (node, seq, payload)));
                }
            }
        }
        let ended_now = after.is_ended().then(Instant::now);
        let was_live = self.calls.get(call_id).is_some_and(|e| !e.state.is_ended());
        match (was_live, after.is_ended()) {
            (false, false) => self.live += 1,
            (true, true) => self.live = self.live.saturating_sub(1),
            _ => {}
        }
        let entry = match self.calls.get_mut(call_id) {
            Some(entry) => {
                entry.state = after;
                entry.last_seq = seq;
                entry.ended_at = entry.ended_at.or(ended_now);
                entry
            }
            None => {
                let entry = CallEntry {
                    state: after,
                    last_seq: seq,
                    ended_at: ended_now,
                    snapshotted: false,
                    timers: Vec::new(),
                };
                self.calls.entry(call_id.to_owned()).or_insert(entry)
            }
        };
        entry.track_timers(fired.as_deref(), &timer_effects, time_ms);
        Ok(seq)
    }

    fn on_event(
        &mut self,
        node: String,
        bridge_seq: Option<u64>,
        payload: Bytes,
        out: &mut Outputs,
    ) -> Result<(), LogError> {
        let event = match Event::parse(&payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(%node, error = %e, "OpenSIPS event not usable: ignored (the raw datagram is on the bus)");
                return Ok(());
            }
        };
        let (sip, creates) = match &event {
            Event::DlgStateChanged(d) => (d.callid.clone(), true),
            Event::CallHold(h) => (h.callid.clone(), false),
            Event::CallTransfer(t) => (t.callid.clone(), false),
            Event::UaSession(u) => {
                let input = Input::Event {
                    node: node.clone(),
                    bridge_seq,
                    datagram: String::from_utf8_lossy(&payload).into_owned(),
                };
                match self.by_key.get(&u.key).cloned() {
                    Some(call_id) => {
                        self.apply(&call_id, None, input, out)?;
                    }
                    None if u.event_type == UaEventType::New => {
                        let call_id = self.new_call_id();
                        self.apply(&call_id, Some(CallState::Ua(UaState::server(&node, &u.key))), input, out)?;
                    }
                    None => {
                        tracing::debug!(key = %u.key, event_type = %u.event_type.as_str(), "UA event for a key not known yet: parked");
                        self.parked.entry(u.key.clone()).or_default().push((Instant::now(), node, bridge_seq, payload));
                    }
                }
                return Ok(());
            }
            Event::Other { .. } => {
                tracing::debug!(event = event.name(), "event not handled by this engine version");
                return Ok(());
            }
        };
        let datagram = String::from_utf8_lossy(&payload).into_owned();
        let input = Input::Event { node: node.clone(), bridge_seq, datagram };
        match self.by_sip.get(&sip).cloned() {
            Some(call_id) => {
                self.apply(&call_id, None, input, out)?;
            }
            None if creates => {
                let call_id = self.new_call_id();
                self.apply(&call_id, Some(CallState::Dialog(DialogState::new(&node, &sip))), input, out)?;
            }
            None => {
                tracing::warn!(event = event.name(), sip_call_id = %sip, "event for a call the engine does not know: ignored")
            }
        }
        Ok(())
    }

    fn default_node(&self) -> &str {
        self.config.nodes.first().map(String::as_str).unwrap_or("default")
    }

    /// Remembers an accepted command's answer; `saved` when it comes from the log's kept ones
    /// (otherwise it is kept there with the next checkpoint).
    fn remember(&mut self, cmd_id: String, reply: CommandReply, seq: u64, time_ms: u64, saved: bool) {
        if let (CommandReply::Accepted { call_id, .. }, false) = (&reply, saved) {
            let kept = RememberedCommand { seq, time_ms, call_id: call_id.clone() };
            self.commands_unsaved.push((cmd_id.clone(), kept));
        }
        if self.remembered.insert(cmd_id.clone(), reply).is_none() {
            self.remembered_order.push_back((cmd_id, time_ms));
        }
        while self.remembered_order.len() > REMEMBERED_COMMANDS {
            if let Some((old, _)) = self.remembered_order.pop_front() {
                self.forget_command(old);
            }
        }
    }

    /// Forgets the commands accepted longer than `cmd_id_window` ago.
    fn forget_old_commands(&mut self, now_ms: u64) {
        let window_ms = u64::try_from(self.config.cmd_id_window.as_millis()).unwrap_or(u64::MAX);
        while self.remembered_order.front().is_some_and(|(_, at)| at.saturating_add(window_ms) < now_ms) {
            if let Some((old, _)) = self.remembered_order.pop_front() {
                self.forget_command(old);
            }
        }
    }

    fn forget_command(&mut self, cmd_id: String) {
        self.remembered.remove(&cmd_id);
        self.commands_forgotten.push(cmd_id);
    }

    fn summary(&self, call_id: &str, state: &CallState) -> Value {
        let mut v = json!({
            "call_id": call_id,
            "kind": state.kind(),
            "node": state.node(),
            "sip_call_id": state.sip_call_id(),
            "state": state.name(),
        });
        v["keys"] = json!(state.keys());
        match state {
            CallState::Dialog(d) => {
                v["hold"] = json!({"caller": d.caller, "callee": d.callee});
                v["transfer"] = serde_json::to_value(&d.transfer).unwrap_or(Value::Null);
                v["end_reason"] = json!(d.end_reason);
            }
            CallState::Ua(u) => v["ua"] = u.summary(),
            CallState::Bridged(b) => v["bridged"] = b.summary(),
        }
        v
    }

    fn on_command(
        &mut self,
        verb: Verb,
        payload: Bytes,
        reply: Option<Subject>,
        received: Instant,
        out: &mut Outputs,
    ) -> Result<(), LogError> {
        let refuse = |out: &mut Outputs, cmd_id: Option<String>, error: CommandError| {
            out.outcomes.push((verb, "refused", received, Some(error.code)));
            tracing::info!(verb = %verb, code = ?error.code, "command refused: {}", error.message);
            if let Some(r) = &reply {
                out.replies.push((r.clone(), Bytes::from(CommandReply::Refused { cmd_id, error }.to_bytes())));
            }
        };
        let generated = || format!("k{:x}{:x}", self.config.clock.now_ms(), self.log.next_seq());
        let request = match CommandRequest::parse(verb, &payload) {
            Ok(r) => r,
            Err(error) => {
                // Every answer carries a cmd_id: the client's when the body has one.
                refuse(out, Some(CommandRequest::cmd_id_of(&payload).unwrap_or_else(generated)), error);
                return Ok(());
            }
        };
        let cmd_id = request.cmd_id.clone().unwrap_or_else(generated);
        let span = tracing::info_span!("command", verb = %verb, cmd_id = %cmd_id);
        let _enter = span.enter();
        if let Some(previous) = self.remembered.get(&cmd_id) {
            tracing::info!("repeated cmd_id: answered with the first answer, not acted on again");
            out.outcomes.push((verb, "repeated", received, None));
            if let Some(r) = &reply {
                out.replies.push((r.clone(), Bytes::from(previous.to_bytes())));
            }
            return Ok(());
        }
        let unknown = |target: &CallTarget| {
            CommandError::new(
                CommandErrorCode::UnknownCall,
                format!("no live call with {target} is known to this engine (an ended call is kept for `ended_retention`; `callbus replay timeline` shows older ones)"),
            )
        };
        let mut command = request.command;
        match &command {
            Command::List { state, node } => {
                let calls: Vec<Value> = self
                    .calls
                    .iter()
                    .filter(|(_, e)| !e.state.is_ended())
                    .filter(|(_, e)| state.as_deref().is_none_or(|s| s == e.state.name()))
                    .filter(|(_, e)| node.as_deref().is_none_or(|n| n == e.state.node()))
                    .map(|(id, e)| self.summary(id, &e.state))
                    .collect();
                if let Some(r) = &reply {
                    out.outcomes.push((verb, "data", received, None));
                    let answer = CommandReply::Data { cmd_id, result: json!({ "calls": calls }) };
                    out.replies.push((r.clone(), Bytes::from(answer.to_bytes())));
                }
                return Ok(());
            }
            Command::Get { target, history } => {
                let Some(call_id) = self.resolve(target) else {
                    refuse(out, Some(cmd_id), unknown(target));
                    return Ok(());
                };
                let summary = self.calls.get(&call_id).map(|e| self.summary(&call_id, &e.state)).unwrap_or(Value::Null);
                let result = if *history {
                    // Every record of the call is read and decoded here, on the owner's task.
                    let history: Vec<Value> = self
                        .log
                        .records_of_call(&call_id)?
                        .iter()
                        .map(|r| json!({"seq": r.seq, "time_ms": r.time_ms, "input": r.input.label(), "state": r.after.name()}))
                        .collect();
                    json!({"call": summary, "history": history})
                } else {
                    json!({"call": summary})
                };
                if let Some(r) = &reply {
                    out.outcomes.push((verb, "data", received, None));
                    let answer = CommandReply::Data { cmd_id, result };
                    out.replies.push((r.clone(), Bytes::from(answer.to_bytes())));
                }
                return Ok(());
            }
            _ => {}
        }
        let fresh = match &command {
            Command::Start { node, .. } => {
                Some(CallState::Bridged(Box::new(BridgedState::new(node.as_deref().unwrap_or(self.default_node())))))
            }
            Command::UaStart { node, .. } => {
                Some(CallState::Ua(UaState::client(node.as_deref().unwrap_or(self.default_node()))))
            }
            _ => None,
        };
        if let Some(fresh) = fresh {
            if self.live >= self.config.max_live_calls {
                let error = CommandError::new(
                    CommandErrorCode::Unavailable,
                    format!(
                        "the engine holds {} live calls, its limit (engine.max_live_calls): new calls are refused until some end",
                        self.live
                    ),
                );
                refuse(out, Some(cmd_id), error);
                return Ok(());
            }
            if let Err(error) = fresh.check(&command) {
                refuse(out, Some(cmd_id), error);
                return Ok(());
            }
            let call_id = self.new_call_id();
            let seq = self.apply(&call_id, Some(fresh), Input::Command { cmd_id: cmd_id.clone(), command }, out)?;
            let answer = CommandReply::Accepted { call_id, cmd_id: cmd_id.clone(), accepted: true };
            if let Some(r) = &reply {
                out.replies.push((r.clone(), Bytes::from(answer.to_bytes())));
            }
            out.outcomes.push((verb, "accepted", received, None));
            out.remembered.push((cmd_id, answer, seq));
            return Ok(());
        }
        let Some(target) = command.target().cloned() else { return Ok(()) };
        let Some(call_id) = self.resolve(&target) else {
            refuse(out, Some(cmd_id), unknown(&target));
            return Ok(());
        };
        if let Command::TransferAttended { transfer_target, .. } = &mut command {
            let other =
                self.resolve(transfer_target).and_then(|id| self.calls.get(&id)).and_then(|e| e.state.sip_call_id());
            match other {
                Some(sip) => *transfer_target = CallTarget::SipCallId(sip.to_owned()),
                None => {
                    let mut e = unknown(transfer_target);
                    e.field = Some("transfer_call_id".into());
                    refuse(out, Some(cmd_id), e);
                    return Ok(());
                }
            }
        }
        let Some(entry) = self.calls.get(&call_id) else { return Ok(()) };
        if let Err(error) = entry.state.check(&command) {
            refuse(out, Some(cmd_id), error);
            return Ok(());
        }
        let seq = self.apply(&call_id, None, Input::Command { cmd_id: cmd_id.clone(), command }, out)?;
        let answer = CommandReply::Accepted { call_id, cmd_id: cmd_id.clone(), accepted: true };
        if let Some(r) = &reply {
            out.replies.push((r.clone(), Bytes::from(answer.to_bytes())));
        }
        out.outcomes.push((verb, "accepted", received, None));
        out.remembered.push((cmd_id, answer, seq));
        Ok(())
    }

    fn on_reconciled(
        &mut self,
        node: &str,
        dialogs: Vec<(String, i64)>,
        ua_keys: Option<Vec<String>>,
        candidates: &[String],
        periodic: bool,
        out: &mut Outputs,
    ) -> Result<(), LogError> {
        let candidates: std::collections::HashSet<&String> = candidates.iter().collect();
        if let Some(keys) = ua_keys {
            let keys: std::collections::HashSet<String> = keys.into_iter().collect();
            let ua_calls: Vec<(String, bool)> = self
                .calls
                .iter()
                .filter(|(id, e)| candidates.contains(id) && !e.state.is_ended() && e.state.node() == node)
                .filter(|(_, e)| !matches!(e.state, CallState::Dialog(_)))
                .map(|(id, e)| (id.clone(), e.state.keys().iter().all(|k| keys.contains(*k))))
                .collect();
            let mut closed = 0;
            for (call_id, present) in ua_calls {
                if present && periodic {
                    continue;
                }
                let opensips_state = if present { Some(0) } else { None };
                if !present {
                    closed += 1;
                }
                self.apply(&call_id, None, Input::Reconcile { opensips_state }, out)?;
            }
            tracing::info!(node, closed, "reconciled UA sessions with OpenSIPS");
        }
        let present: HashMap<String, i64> = dialogs.into_iter().collect();
        let live: Vec<(String, String)> = self
            .calls
            .iter()
            .filter(|(id, e)| candidates.contains(id) && !e.state.is_ended() && e.state.node() == node)
            .filter(|(_, e)| matches!(e.state, CallState::Dialog(_)))
            .filter_map(|(id, e)| e.state.sip_call_id().map(|s| (id.clone(), s.to_owned())))
            .collect();
        let mut closed = 0;
        for (call_id, sip) in &live {
            let state = present.get(sip).copied();
            if state.is_some() && periodic {
                continue;
            }
            if state.is_none() {
                closed += 1;
            }
            self.apply(call_id, None, Input::Reconcile { opensips_state: state }, out)?;
        }
        let mut adopted = 0;
        for (sip, state) in present {
            // In a cluster, a dialog nobody knows is adopted by the partition its events go to.
            let elsewhere =
                self.part.as_ref().is_some_and(|p| crate::cluster::partition_of(&sip, p.partitions) != p.partition);
            if !elsewhere && !self.by_sip.contains_key(&sip) {
                adopted += 1;
                let call_id = self.new_call_id();
                let fresh = CallState::Dialog(DialogState::new(node, &sip));
                self.apply(&call_id, Some(fresh), Input::Reconcile { opensips_state: Some(state) }, out)?;
            }
        }
        if !periodic || closed > 0 || adopted > 0 {
            tracing::info!(node, checked = live.len(), closed, adopted, periodic, "reconciled calls with OpenSIPS");
        }
        Ok(())
    }

    fn handle(&mut self, work: Work, out: &mut Outputs) -> Result<(), LogError> {
        match work {
            Work::Event { node, bridge_seq, payload, stream_seq } => {
                self.metrics.inputs_event.increment(1);
                if let (Some(part), Some(s)) = (&mut self.part, stream_seq) {
                    part.input_seq = part.input_seq.max(s);
                }
                self.on_event(node, bridge_seq, payload, out)
            }
            Work::Position { stream_seq } => {
                if let Some(part) = &mut self.part {
                    part.input_seq = part.input_seq.max(stream_seq);
                }
                Ok(())
            }
            Work::Command { verb, payload, reply, received } => {
                self.metrics.inputs_command.increment(1);
                self.on_command(verb, payload, reply, received, out)
            }
            Work::MiReply { request, reply } => {
                self.metrics.inputs_mi_reply.increment(1);
                match call_of_request(&request).map(str::to_owned) {
                    Some(call_id) => self.apply(&call_id, None, Input::MiReply { request, reply }, out).map(|_| ()),
                    None => Ok(()),
                }
            }
            Work::Timer { call_id, name, generation } => {
                self.metrics.inputs_timer.increment(1);
                let key = (call_id.clone(), name.clone());
                if self.timers.get(&key) != Some(&generation) {
                    Ok(()) // cancelled or restarted since
                } else {
                    self.timers.remove(&key);
                    self.apply(&call_id, None, Input::Timer { name }, out).map(|_| ())
                }
            }
            Work::Reconciled { node, dialogs, ua_keys, candidates, periodic } => {
                self.on_reconciled(&node, dialogs, ua_keys, &candidates, periodic, out)
            }
        }?;
        // Events parked for a key that this work made known, in their order of arrival.
        while !self.released.is_empty() {
            for (node, bridge_seq, payload) in std::mem::take(&mut self.released) {
                self.on_event(node, bridge_seq, payload, out)?;
            }
        }
        Ok(())
    }

    /// Carries out a committed batch.
    async fn carry_out(&mut self, out: Outputs) {
        // OpenSIPS first: its requests are on the path of every call set-up step. Yielding once
        // lets them leave (their tasks run on this thread next) before the replies and
        // notifications are published.
        let to_opensips = !out.mi.is_empty();
        for (request, node, command, params) in out.mi {
            let route = MiRoute::new(self.client.clone(), &self.config);
            let tx = self.tx.clone();
            let timeout = self.config.mi_timeout;
            tokio::spawn(async move {
                let reply = mi_request(&route, &node, &command, params, timeout).await;
                let _ = tx.send(Work::MiReply { request, reply }).await;
            });
        }
        if to_opensips {
            tokio::task::yield_now().await;
        }
        let now_ms = self.config.clock.now_ms();
        for (cmd_id, reply, seq) in out.remembered {
            self.remember(cmd_id, reply, seq, now_ms, false);
        }
        for (subject, body) in out.replies {
            if let Err(e) = self.client.publish(subject, body).await {
                tracing::warn!(error = %e, "command reply not published");
            }
        }
        for (verb, outcome, received, refused) in out.outcomes {
            metrics::counter!("callbus_engine_commands_total", "verb" => verb.as_str(), "outcome" => outcome)
                .increment(1);
            metrics::histogram!("callbus_engine_command_duration_seconds", "verb" => verb.as_str())
                .record(received.elapsed().as_secs_f64());
            record_service(self.service.as_ref(), verb, received, refused);
        }
        for (subject, body) in out.notifications {
            if let Err(e) = self.client.publish(subject, body).await {
                tracing::warn!(error = %e, "notification not published");
            }
        }
        for (call_id, name, after_ms, generation) in out.timers {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                let _ = tx.send(Work::Timer { call_id, name, generation }).await;
            });
        }
    }

    /// Makes the batch durable: the local log's flush, or in cluster mode the partition's
    /// append to its replicated log (the local copy is flushed by sled in the background).
    async fn commit_batch(&mut self) -> Result<(), LogError> {
        match &mut self.part {
            None => {
                if self.config.commit_faults.take_one() {
                    self.log.fail_next_commits(1);
                }
                self.log.commit().await
            }
            Some(part) => part.publish().await,
        }
    }

    /// Whether a checkpoint has anything to write.
    fn checkpoint_due(&self) -> bool {
        !self.dirty.is_empty() || !self.commands_unsaved.is_empty() || !self.commands_forgotten.is_empty()
    }

    /// Writes the cmd_ids remembered and forgotten since the last checkpoint, the snapshots of the
    /// calls changed since then, then the checkpoint itself (durable with the next commit).
    fn checkpoint(&mut self) -> Result<(), LogError> {
        if !self.checkpoint_due() {
            return Ok(());
        }
        // Kept before the checkpoint that covers their records moves past them (a command after
        // the checkpoint is found again in the log's tail by recovery); cleared only once all are
        // staged, so a failed checkpoint leaves them for the next one.
        for (cmd_id, kept) in &self.commands_unsaved {
            self.log.stage_command(cmd_id, kept)?;
        }
        self.commands_unsaved.clear();
        for cmd_id in &self.commands_forgotten {
            self.log.remove_command(cmd_id)?;
        }
        self.commands_forgotten.clear();
        for call_id in std::mem::take(&mut self.dirty) {
            match self.calls.get(&call_id) {
                Some(entry) if !entry.state.is_ended() => {
                    let snapshot = Snapshot {
                        seq: entry.last_seq,
                        call_id: call_id.clone(),
                        state: entry.state.clone(),
                        timers: entry.timers.clone(),
                    };
                    self.log.stage_snapshot(&snapshot)?;
                }
                _ => self.log.remove_snapshot(&call_id)?,
            }
        }
        self.log.stage_checkpoint(self.log.next_seq().saturating_sub(1))?;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Starts again the timers of the calls rebuilt from the log; one already due fires now.
    fn rearm_timers(&mut self) {
        let now = self.config.clock.now_ms();
        let mut armed = 0;
        for (call_id, entry) in self.calls.iter().filter(|(_, e)| !e.state.is_ended()) {
            for (name, deadline) in &entry.timers {
                self.timer_generation += 1;
                let generation = self.timer_generation;
                self.timers.insert((call_id.clone(), name.clone()), generation);
                let (tx, call_id, name) = (self.tx.clone(), call_id.clone(), name.clone());
                let wait = Duration::from_millis(deadline.saturating_sub(now));
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = tx.send(Work::Timer { call_id, name, generation }).await;
                });
                armed += 1;
            }
        }
        if armed > 0 {
            tracing::info!(armed, "timers of recovered calls started again");
        }
    }

    /// Asks OpenSIPS, node by node (the configured ones and those of live calls), which of the
    /// live calls it still has and which dialogs it has that no call knows (in the background).
    fn reconcile_live_calls(&self) {
        let mut nodes: Vec<String> = self.live_nodes();
        nodes.extend(self.config.nodes.iter().cloned());
        nodes.sort();
        nodes.dedup();
        if nodes.is_empty() {
            return;
        }
        let candidates = self.live_call_ids();
        tracing::debug!(nodes = nodes.len(), calls = candidates.len(), "periodic reconciliation with OpenSIPS");
        let (route, timeout, tx) =
            (MiRoute::new(self.client.clone(), &self.config), self.config.mi_timeout, self.tx.clone());
        tokio::spawn(reconcile_nodes(route, nodes, candidates, timeout, tx, true));
    }

    /// Sets the live-calls gauge: calls by kind and state (states no call is in read 0).
    fn gauge_live_calls(&mut self) {
        let mut counts: HashMap<(&'static str, &'static str), u64> = HashMap::new();
        for entry in self.calls.values().filter(|e| !e.state.is_ended()) {
            *counts.entry((entry.state.kind(), entry.state.name())).or_default() += 1;
        }
        for gone in self.metrics.live_labels.iter().filter(|l| !counts.contains_key(l)) {
            metrics::gauge!("callbus_engine_live_calls", "kind" => gone.0, "state" => gone.1).set(0.0);
        }
        for ((kind, state), n) in &counts {
            metrics::gauge!("callbus_engine_live_calls", "kind" => *kind, "state" => *state).set(*n as f64);
        }
        self.metrics.live_labels = counts.into_keys().collect();
    }

    /// Forgets calls that ended a while ago (late events for them are then ignored).
    fn forget_ended(&mut self) {
        let retention = self.config.ended_retention;
        let gone: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, e)| e.ended_at.is_some_and(|t| t.elapsed() >= retention))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(entry) = self.calls.remove(&id) {
                if let Some(sip) = entry.state.sip_call_id() {
                    if self.by_sip.get(sip) == Some(&id) {
                        self.by_sip.remove(sip);
                    }
                }
                for key in entry.state.keys() {
                    if self.by_key.get(key) == Some(&id) {
                        self.by_key.remove(key);
                        if let Some(part) = &self.part {
                            part.forget_key(key);
                        }
                    }
                }
            }
        }
        self.parked.retain(|key, events| {
            let before = events.len();
            events.retain(|(at, ..)| at.elapsed() < PARK_FOR);
            if events.len() < before && self.part.is_none() {
                tracing::warn!(%key, dropped = before - events.len(), "UA events for a session no call started or owns: dropped after 3 s (the raw datagrams are on the bus)");
            }
            !events.is_empty()
        });
    }
}

/// Where MI requests go: NATS (`opensips.<node>.mi.<command>`), or straight to the bridge when
/// it runs in this process.
#[derive(Clone)]
pub(crate) struct MiRoute {
    client: async_nats::Client,
    local: Option<crate::LocalMi>,
}

impl MiRoute {
    pub(crate) fn new(client: async_nats::Client, config: &EngineConfig) -> MiRoute {
        MiRoute { client, local: config.local.as_ref().map(|l| l.mi.clone()) }
    }
}

/// Runs an MI command through the node's bridge.
pub(crate) async fn mi_request(
    route: &MiRoute,
    node: &str,
    command: &str,
    params: Value,
    timeout: Duration,
) -> MiBusReply {
    if let Some(local) = route.local.as_ref().filter(|l| l.node == node) {
        return match tokio::time::timeout(timeout, (local.call)(command.to_owned(), params)).await {
            Ok(reply) => reply,
            Err(_) => MiBusReply::bridge_error(
                BridgeErrorKind::Timeout,
                format!("no answer from the bridge of node {node} to {command} within {timeout:?}"),
            ),
        };
    }
    let client = &route.client;
    let subject = match subjects::mi(node, command) {
        Ok(s) => s,
        Err(e) => return MiBusReply::bridge_error(BridgeErrorKind::Unavailable, e.to_string()),
    };
    let body = Bytes::from(serde_json::to_vec(&params).unwrap_or_default());
    match tokio::time::timeout(timeout, client.request(subject.clone(), body)).await {
        Ok(Ok(msg)) => serde_json::from_slice(&msg.payload).unwrap_or_else(|e| {
            MiBusReply::bridge_error(BridgeErrorKind::Unavailable, format!("unreadable reply on {subject}: {e}"))
        }),
        Ok(Err(e)) => MiBusReply::bridge_error(
            BridgeErrorKind::Unavailable,
            format!("no bridge answered on {subject} ({e}): is `callbus bridge --node {node}` running?"),
        ),
        Err(_) => {
            MiBusReply::bridge_error(BridgeErrorKind::Timeout, format!("no answer on {subject} within {timeout:?}"))
        }
    }
}

/// Reads every dialog OpenSIPS has on `node`, page by page.
pub(crate) async fn list_dialogs(
    client: &MiRoute,
    node: &str,
    timeout: Duration,
) -> Result<Vec<(String, i64)>, String> {
    const PAGE: u64 = 50;
    let mut out = Vec::new();
    let mut index = 0u64;
    loop {
        let reply = mi_request(client, node, "dlg_list", json!({"index": index, "counter": PAGE}), timeout).await;
        let page: DlgListPage = match reply {
            MiBusReply::Result { result } => {
                serde_json::from_value(result).map_err(|e| format!("unexpected dlg_list result: {e}"))?
            }
            MiBusReply::Error { error } => return Err(error.to_string()),
        };
        let n = page.dialogs.len() as u64;
        out.extend(page.dialogs.into_iter().map(|d| (d.callid, d.state)));
        index += n;
        if n == 0 || index >= page.count.unwrap_or(0) {
            return Ok(out);
        }
    }
}

/// The keys of every UA session OpenSIPS has on `node` (`ua_session_list` items carry no key:
/// a client session's key is its Call-ID, a server session's its To-tag; both are returned).
pub(crate) async fn list_ua_keys(client: &MiRoute, node: &str, timeout: Duration) -> Result<Vec<String>, String> {
    match mi_request(client, node, "ua_session_list", json!({}), timeout).await {
        MiBusReply::Result { result: Value::Array(items) } => Ok(items
            .iter()
            .flat_map(|i| [i.get("callid"), i.get("to_tag")])
            .filter_map(|v| v.and_then(Value::as_str).map(str::to_owned))
            .collect()),
        MiBusReply::Result { result } => Err(format!("unexpected ua_session_list result: {result}")),
        MiBusReply::Error { error } => Err(error.to_string()),
    }
}

/// How many times a reconciliation lists a node before it gives up until the next one.
const RECONCILE_ATTEMPTS: u32 = 5;

/// Lists each node's dialogs and UA sessions (retrying a few times) and hands them to the
/// owner, which may close only `candidates`: calls it knew before the lists were taken.
pub(crate) async fn reconcile_nodes(
    client: MiRoute,
    nodes: Vec<String>,
    candidates: Vec<String>,
    timeout: Duration,
    tx: mpsc::Sender<Work>,
    periodic: bool,
) {
    for node in nodes {
        for attempt in 1..=RECONCILE_ATTEMPTS {
            match list_dialogs(&client, &node, timeout).await {
                Ok(dialogs) => {
                    let ua_keys = match list_ua_keys(&client, &node, timeout).await {
                        Ok(keys) => Some(keys),
                        Err(e) => {
                            tracing::warn!(%node, error = %e, "cannot list UA sessions: UA calls are not reconciled");
                            None
                        }
                    };
                    let work = Work::Reconciled {
                        node: node.clone(),
                        dialogs,
                        ua_keys,
                        candidates: candidates.clone(),
                        periodic,
                    };
                    let _ = tx.send(work).await;
                    break;
                }
                // Said once as a warning, then once more if it gives up (not at every attempt).
                Err(e) if attempt == 1 => {
                    tracing::warn!(%node, error = %e, "cannot reconcile with OpenSIPS yet: retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) if attempt < RECONCILE_ATTEMPTS => {
                    tracing::debug!(%node, attempt, error = %e, "cannot reconcile with OpenSIPS yet");
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
                Err(e) => tracing::warn!(
                    %node,
                    error = %e,
                    "gave up reconciling with OpenSIPS after {RECONCILE_ATTEMPTS} attempts: the periodic reconciliation (engine.reconcile_every) or OpenSIPS coming back tries again"
                ),
            }
        }
    }
}

/// Rebuilds live calls from snapshots and the log's tail.
pub(crate) fn recover(owner: &mut Owner) -> Result<(usize, usize), LogError> {
    // The cmd_ids kept at checkpoints, oldest first; those past the window are dropped.
    let mut kept = owner.log.commands()?;
    kept.sort_by_key(|(_, c)| c.seq);
    for (cmd_id, c) in kept {
        let reply = CommandReply::Accepted { call_id: c.call_id, cmd_id: cmd_id.clone(), accepted: true };
        owner.remember(cmd_id, reply, c.seq, c.time_ms, true);
    }
    owner.forget_old_commands(owner.config.clock.now_ms());
    let snapshots = owner.log.snapshots()?;
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let from = owner.log.checkpoint()? + 1;
    for snap in snapshots {
        last_seq.insert(snap.call_id.clone(), snap.seq);
        if let Some(sip) = snap.state.sip_call_id() {
            owner.by_sip.insert(sip.to_owned(), snap.call_id.clone());
        }
        for key in snap.state.keys() {
            owner.by_key.insert(key.to_owned(), snap.call_id.clone());
        }
        owner.calls.insert(
            snap.call_id,
            CallEntry { state: snap.state, last_seq: snap.seq, ended_at: None, snapshotted: true, timers: snap.timers },
        );
    }
    let mut tail = 0;
    let log = Arc::clone(&owner.log);
    for record in log.records_from(from) {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "skipping an unreadable record during recovery");
                continue;
            }
        };
        tail += 1;
        if last_seq.get(&record.call_id).is_some_and(|s| *s >= record.seq) {
            continue;
        }
        last_seq.insert(record.call_id.clone(), record.seq);
        if let Input::Command { cmd_id, .. } = &record.input {
            let reply =
                CommandReply::Accepted { call_id: record.call_id.clone(), cmd_id: cmd_id.clone(), accepted: true };
            owner.remember(cmd_id.clone(), reply, record.seq, record.time_ms, false);
        }
        if let Some(sip) = record.after.sip_call_id() {
            owner.by_sip.insert(sip.to_owned(), record.call_id.clone());
        }
        for key in record.after.keys() {
            owner.by_key.insert(key.to_owned(), record.call_id.clone());
        }
        let ended_at = record.after.is_ended().then(Instant::now);
        owner.dirty.insert(record.call_id.clone());
        let snapshotted = owner.calls.get(&record.call_id).is_some_and(|e| e.snapshotted);
        let mut timers = owner.calls.get(&record.call_id).map(|e| e.timers.clone()).unwrap_or_default();
        let mut entry =
            CallEntry { state: record.after, last_seq: record.seq, ended_at, snapshotted, timers: Vec::new() };
        std::mem::swap(&mut entry.timers, &mut timers);
        let fired = match &record.input {
            Input::Timer { name } => Some(name.as_str()),
            _ => None,
        };
        entry.track_timers(fired, &record.effects, record.time_ms);
        owner.calls.insert(record.call_id.clone(), entry);
    }
    let live = owner.calls.values().filter(|e| !e.state.is_ended()).count();
    owner.live = live;
    owner.rearm_timers();
    Ok((live, tail))
}

/// Creates the owner and its input channel.
pub(crate) fn owner(
    config: EngineConfig,
    log: Arc<SledLog>,
    client: async_nats::Client,
) -> (Owner, mpsc::Receiver<Work>) {
    let (tx, rx) = mpsc::channel(config.input_queue.max(1));
    (owner_on(config, log, client, tx), rx)
}

/// An owner feeding on an existing queue (a restart after the log failed).
pub(crate) fn owner_on(
    config: EngineConfig,
    log: Arc<SledLog>,
    client: async_nats::Client,
    tx: mpsc::Sender<Work>,
) -> Owner {
    Owner {
        config,
        log,
        client,
        calls: HashMap::new(),
        live: 0,
        by_sip: HashMap::new(),
        by_key: HashMap::new(),
        parked: HashMap::new(),
        released: Vec::new(),
        timers: HashMap::new(),
        timer_generation: 0,
        remembered: HashMap::new(),
        remembered_order: VecDeque::new(),
        commands_unsaved: Vec::new(),
        commands_forgotten: Vec::new(),
        next_call: 0,
        tx,
        dirty: Default::default(),
        last_checkpoint: Instant::now(),
        prune_from: 1,
        last_prune: Instant::now(),
        metrics: EngineMetrics::new(),
        pending: VecDeque::new(),
        part: None,
        disk: None,
        service: None,
    }
}

impl Owner {
    pub(crate) fn sender(&self) -> mpsc::Sender<Work> {
        self.tx.clone()
    }

    pub(crate) fn live_nodes(&self) -> Vec<String> {
        self.calls.values().filter(|e| !e.state.is_ended()).map(|e| e.state.node().to_owned()).collect()
    }

    /// The UA session keys of its calls.
    pub(crate) fn known_keys(&self) -> Vec<String> {
        self.by_key.keys().cloned().collect()
    }

    pub(crate) fn live_call_ids(&self) -> Vec<String> {
        self.calls.iter().filter(|(_, e)| !e.state.is_ended()).map(|(id, _)| id.clone()).collect()
    }

    /// Processes inputs until cancelled and the queue is empty.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Work>, cancel: CancellationToken) -> Option<Stopped> {
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        let every = self.config.reconcile_every.filter(|_| self.config.reconcile);
        let mut reconcile = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
        reconcile.tick().await; // the start-up reconciliation is the first

        // A node whose OpenSIPS restarted is reconciled at once (docs/engine.md, Reconciliation).
        let mut restarts = crate::restarts::RestartWatch::default();
        let mut statuses = match self.config.reconcile {
            true => self.client.subscribe(callbus_schemas::subjects::ALL_NODES_STATUS).await.ok(),
            false => None,
        };

        // The bridge in this process hands its node's events straight to this loop (to one
        // owner at a time: a restarted owner waits for the previous one to let go).
        let mut local: Option<LocalTap> = match self.config.local.as_ref() {
            Some(l) => tokio::select! {
                events = Arc::clone(&l.events).lock_owned() => Some((l.mi.node.clone(), events)),
                _ = cancel.cancelled() => None,
            },
            None => None,
        };
        loop {
            let first = if let Some(w) = self.pending.pop_front() {
                Some(w)
            } else {
                tokio::select! {
                w = rx.recv() => w,
                w = next_local(&mut local), if local.is_some() && !cancel.is_cancelled() => match w {
                    Some(w) => Some(w),
                    None => {
                        local = None; // the bridge stopped
                        continue;
                    }
                },
                _ = reconcile.tick(), if every.is_some() => {
                    self.reconcile_live_calls();
                    continue;
                }
                status = next_status(&mut statuses), if statuses.is_some() => {
                    match status.map(|m| serde_json::from_slice::<callbus_schemas::bus::BridgeStatus>(&m.payload)) {
                        Some(Ok(status)) if restarts.restarted(&status) => {
                            tracing::warn!(node = %status.node, "OpenSIPS restarted or is back after a gap: reconciling live calls now");
                            self.reconcile_live_calls();
                        }
                        Some(_) => {}
                        None => statuses = None,
                    }
                    continue;
                }
                _ = sweep.tick() => {
                    self.forget_ended();
                    self.gauge_live_calls();
                    // An idle partition's resume point moves on too.
                    if self.part.as_ref().is_some_and(|p| p.position_due()) {
                        if let Err(e) = self.commit_batch().await {
                            tracing::warn!(error = %e, "the partition's position was not logged");
                            if matches!(e, LogError::Fenced { .. }) {
                                return Some(Stopped { error: e, pending: Vec::new(), rx });
                            }
                        }
                    }
                    // Nothing is staged under the disk reserve, a checkpoint neither.
                    if let Err(low) = self.disk_check() {
                        return Some(self.stop_for_disk(low, Vec::new(), rx).await);
                    }
                    // Retention: a step of at most PRUNE_BUDGET records, between batches.
                    if let Err(e) = self.prune_step().await {
                        return Some(self.stop_between_batches(e, "removing old calls from the log failed", rx));
                    }
                    // Checkpoints are written between batches, so no input waits for one.
                    self.forget_old_commands(self.config.clock.now_ms());
                    if self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY && self.checkpoint_due() {
                        match self.checkpoint() {
                            Ok(()) => {
                                if let Err(e) = self.commit_batch().await {
                                    return Some(self.stop_between_batches(e, "a checkpoint was not committed", rx));
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "checkpoint not written; the next one retries"),
                        }
                    }
                    continue;
                }
                _ = cancel.cancelled() => rx.try_recv().ok(),
                }
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                if let Some(w) = self.pending.pop_front() {
                    batch.push(w);
                    continue;
                }
                match rx.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(_) => match try_next_local(&mut local) {
                        Some(w) => batch.push(w),
                        None => break,
                    },
                }
            }
            // Under the disk reserve nothing is staged: sled must never meet a full disk.
            if let Err(low) = self.disk_check() {
                return Some(self.stop_for_disk(low, batch, rx).await);
            }
            let mut out = Outputs::default();
            let mut failed = None;
            let batch_len = batch.len();
            // Kept until the batch is durable: if the log fails, these are handled again once
            // it works (commands are answered "unavailable" instead: the app retries them).
            let replayable: Vec<Work> = batch.iter().filter(|w| !matches!(w, Work::Command { .. })).cloned().collect();
            let mut works = batch.into_iter();
            for work in works.by_ref() {
                if let Err(e) = self.handle(work, &mut out) {
                    failed = Some(e);
                    break;
                }
                // Cluster mode: a batch is one message of the replicated log; the rest waits.
                if self.part.as_ref().is_some_and(|p| p.full()) {
                    break;
                }
            }
            if failed.is_none() {
                for work in works.rev() {
                    self.pending.push_front(work);
                }
            }
            // Under a load that never leaves the queue empty, a checkpoint rides along a batch.
            if failed.is_none() && self.last_checkpoint.elapsed() >= 2 * CHECKPOINT_EVERY {
                if let Err(e) = self.checkpoint() {
                    failed = Some(e);
                } else {
                    out.staged += 1;
                }
            }
            self.metrics.batch_size.record(batch_len as f64);
            let flush_started = Instant::now();
            let committed = match failed {
                None if out.staged == 0 => Ok(()),
                None => {
                    let r = self.commit_batch().await;
                    self.metrics.flush_seconds.record(flush_started.elapsed().as_secs_f64());
                    self.metrics.log_appends.increment(out.staged as u64);
                    r
                }
                Some(e) => Err(e),
            };
            match committed {
                Ok(()) => self.carry_out(out).await,
                Err(e) => {
                    self.metrics.log_failures.increment(1);
                    // A full disk despite the reserve (another program filled it): releasing
                    // the reserve file gives sled room for what it flushes when the log closes.
                    let _ = self.disk_check();
                    // Nothing of this batch is acknowledged: commands get an error, effects
                    // are not carried out, and the apps can retry. The state in memory went
                    // ahead of the log: the engine stops here and starts again from the log.
                    tracing::error!(error = %e, "the event log failed: this batch is not acknowledged");
                    let error = CommandError::new(
                        CommandErrorCode::Unavailable,
                        format!("the engine could not log the command: {e}"),
                    );
                    // A fenced owner says nothing: the partition's new owner answers.
                    let fenced = matches!(e, LogError::Fenced { .. });
                    for (subject, _) in out.replies.into_iter().filter(|_| !fenced) {
                        let body = CommandReply::Refused { cmd_id: None, error: error.clone() }.to_bytes();
                        let _ = self.client.publish(subject, Bytes::from(body)).await;
                    }
                    let mut pending: Vec<Work> = self.pending.drain(..).collect();
                    pending.splice(0..0, replayable);
                    let _ = tokio::time::timeout(SHUTDOWN_FLUSH, self.client.flush()).await;
                    return Some(Stopped { error: e, pending, rx });
                }
            }
        }
        // A clean stop leaves snapshots up to date, so the next start reads no tail (not
        // under the disk reserve: the tail is read instead).
        if let Err(low) = self.disk_check() {
            tracing::warn!(%low, "no final checkpoint: the next start reads the log's tail");
            let _ = tokio::time::timeout(SHUTDOWN_FLUSH, self.client.flush()).await;
            return None;
        }
        match self.checkpoint() {
            Ok(()) => {
                if let Err(e) = self.log.commit().await {
                    tracing::warn!(error = %e, "final checkpoint not committed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "final checkpoint not written"),
        }
        let _ = tokio::time::timeout(SHUTDOWN_FLUSH, self.client.flush()).await;
        None
    }
}

/// Records a retention step looks at, at most (a few milliseconds of the owner's time).
const PRUNE_BUDGET: usize = 20_000;

impl Owner {
    /// One step of retention (`engine.retention`, single engine): removes from the log the
    /// calls whose whole history is older than the retention and that memory no longer holds,
    /// then commits. A pass starts at most every minute (or every retention, when shorter)
    /// and goes on a step per second until it reaches young records.
    async fn prune_step(&mut self) -> Result<(), LogError> {
        let Some(retention) = self.config.retention.filter(|r| !r.is_zero()) else { return Ok(()) };
        if self.part.is_some() || (self.prune_from == 1 && self.last_prune.elapsed() < retention.min(PRUNE_EVERY)) {
            return Ok(());
        }
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff = self.config.clock.now_ms().saturating_sub(retention_ms);
        let calls = &self.calls;
        let step = self.log.prune(self.prune_from, cutoff, |id| calls.contains_key(id), PRUNE_BUDGET)?;
        match step.next {
            Some(next) => self.prune_from = next,
            None => {
                self.prune_from = 1;
                self.last_prune = Instant::now();
            }
        }
        if step.records > 0 {
            self.commit_batch().await?;
            metrics::counter!("callbus_engine_retention_removed_records_total").increment(step.records as u64);
            tracing::info!(
                calls = step.calls,
                records = step.records,
                "calls older than the retention removed from the log"
            );
        }
        Ok(())
    }

    /// Stops after a write between batches (a checkpoint, retention) failed: it was rolled
    /// back, but the state in memory went ahead of the log, so the engine starts again from the
    /// log, as after a failed batch; the queue is kept.
    fn stop_between_batches(&mut self, error: LogError, what: &str, rx: mpsc::Receiver<Work>) -> Stopped {
        self.metrics.log_failures.increment(1);
        tracing::error!(%error, "{what}");
        // A full disk despite the reserve: the reserve file is released for sled's last flush.
        let _ = self.disk_check();
        Stopped { error, pending: self.pending.drain(..).collect(), rx }
    }

    /// Whether the single engine may stage writes now (see `log::disk`).
    fn disk_check(&self) -> Result<(), crate::log::disk::DiskLow> {
        match (&self.disk, &self.part) {
            (Some(disk), None) => disk.check(),
            _ => Ok(()),
        }
    }

    /// Stops before staging anything because the disk is under the reserve: the commands of
    /// `batch` are refused (the apps retry them), its other inputs are kept with the queue.
    async fn stop_for_disk(
        mut self,
        low: crate::log::disk::DiskLow,
        batch: Vec<Work>,
        rx: mpsc::Receiver<Work>,
    ) -> Stopped {
        let error = LogError::DiskLow(low);
        let refusal = log_down_refusal(&error);
        let mut pending = Vec::with_capacity(batch.len() + self.pending.len());
        for work in batch {
            match work {
                Work::Command { verb, payload, reply: Some(reply), received } => {
                    let cmd_id = CommandRequest::cmd_id_of(&payload);
                    let body = CommandReply::Refused { cmd_id, error: refusal.clone() }.to_bytes();
                    let _ = self.client.publish(reply, Bytes::from(body)).await;
                    record_service(self.service.as_ref(), verb, received, Some(refusal.code));
                }
                Work::Command { .. } => {}
                other => pending.push(other),
            }
        }
        pending.extend(self.pending.drain(..));
        let _ = tokio::time::timeout(SHUTDOWN_FLUSH, self.client.flush()).await;
        Stopped { error, pending, rx }
    }
}

/// Counts a command answered (refused when `refused` has its code) in the `callbus` service's
/// stats (`nats micro stats callbus`).
pub(crate) fn record_service(
    service: Option<&callbus_service::Service>,
    verb: Verb,
    received: Instant,
    refused: Option<CommandErrorCode>,
) {
    if let Some(service) = service {
        service.record(verb.as_str(), received.elapsed(), refused.map(|code| (service_code(code), code.as_str())));
    }
}

/// The HTTP-like code the micro protocol reports a refusal with.
fn service_code(code: CommandErrorCode) -> u16 {
    match code {
        CommandErrorCode::BadRequest
        | CommandErrorCode::MissingField
        | CommandErrorCode::WrongType
        | CommandErrorCode::BadValue => 400,
        CommandErrorCode::UnknownCall => 404,
        CommandErrorCode::WrongState => 409,
        CommandErrorCode::Unsupported => 501,
        CommandErrorCode::Unavailable => 503,
    }
}

/// The answer to a command while the log cannot be written.
fn log_down_refusal(error: &LogError) -> CommandError {
    CommandError::new(CommandErrorCode::Unavailable, format!("the engine cannot write its log ({error}): retry later"))
}

/// Most inputs kept while the log cannot be written (events, MI replies, timers).
const KEPT_WHILE_DOWN: usize = 200_000;

/// Runs the owner; when the log fails, refuses commands, keeps the other inputs, reopens the
/// log every second, and once it can be written again rebuilds the calls from it and goes on.
pub(crate) async fn supervise(
    mut owner: Owner,
    mut rx: mpsc::Receiver<Work>,
    cancel: CancellationToken,
    config: EngineConfig,
    client: async_nats::Client,
) {
    let tx = owner.sender();
    let service = owner.service.clone();
    loop {
        let Some(Stopped { error, mut pending, rx: back }) = owner.run(rx, cancel.clone()).await else { return };
        rx = back;
        let down = metrics::gauge!("callbus_engine_log_down");
        down.set(1.0);
        tracing::error!(
            %error,
            data_dir = %config.data_dir.display(),
            "the event log cannot be written: commands are refused until it can (free space or fix the disk); OpenSIPS events are kept meanwhile"
        );
        let refusal = log_down_refusal(&error);
        let disk = DiskGuard::new(&config.data_dir, config.disk_reserve);
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        let reopened = loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                w = rx.recv() => match w {
                    None => return,
                    Some(Work::Command { verb, reply, payload, received }) => {
                        record_service(service.as_ref(), verb, received, Some(refusal.code));
                        if let Some(reply) = reply {
                            let cmd_id = CommandRequest::cmd_id_of(&payload);
                            let body = CommandReply::Refused { cmd_id, error: refusal.clone() }.to_bytes();
                            let _ = client.publish(reply, Bytes::from(body)).await;
                        }
                    }
                    Some(other) if pending.len() < KEPT_WHILE_DOWN => pending.push(other),
                    Some(_) => metrics::counter!("callbus_engine_inputs_dropped_total").increment(1),
                },
                _ = retry.tick() => {
                    // Not reopened (which writes) before the disk has room again.
                    if disk.resume().is_err() {
                        continue;
                    }
                    match SledLog::open_with(&config.data_dir, config.cache_bytes, config.sync_data) {
                        Ok(log) => {
                            // Writable again? A real write and flush says so.
                            let probe = log.stage_timeouts(&config.timeouts);
                            if probe.is_ok() && log.commit().await.is_ok() {
                                break log;
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "the event log does not open yet"),
                    }
                }
            }
        };
        let mut next = owner_on(config.clone(), Arc::new(reopened), client.clone(), tx.clone());
        next.disk = Some(disk);
        next.service = service.clone();
        match recover(&mut next) {
            Ok((live, _)) => {
                tracing::info!(live, kept = pending.len(), "the event log works again: calls rebuilt from it; going on")
            }
            Err(e) => {
                tracing::error!(error = %e, "the event log reopened but cannot be read: the engine stops");
                return;
            }
        }
        down.set(0.0);
        next.pending = pending.into();
        owner = next;
    }
}

/// The node of the bridge in this process, and its tap.
type LocalTap = (String, tokio::sync::OwnedMutexGuard<mpsc::Receiver<(u64, Bytes)>>);

fn local_work(node: &str, (seq, payload): (u64, Bytes)) -> Work {
    Work::Event { node: node.to_owned(), bridge_seq: Some(seq), payload, stream_seq: None }
}

/// The next bridge status; None when the subscription ended.
async fn next_status(statuses: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    futures::StreamExt::next(statuses.as_mut()?).await
}

/// The next datagram from the tap as work; None when the bridge is gone.
async fn next_local(local: &mut Option<LocalTap>) -> Option<Work> {
    let (node, events) = local.as_mut()?;
    events.recv().await.map(|d| local_work(node, d))
}

/// A datagram already waiting in the tap, as work.
fn try_next_local(local: &mut Option<LocalTap>) -> Option<Work> {
    let (node, events) = local.as_mut()?;
    events.try_recv().ok().map(|d| local_work(node, d))
}

/// Forwards OpenSIPS events from NATS to the owner, except those of `local`, the node whose
/// bridge hands its datagrams over in this process.
pub(crate) async fn forward_events(
    mut sub: async_nats::Subscriber,
    local: Option<String>,
    tx: mpsc::Sender<Work>,
    cancel: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = cancel.cancelled() => break,
        };
        let Some(msg) = msg else { break };
        let node = match BusSubject::parse(msg.subject.as_str()) {
            Ok(BusSubject::Event { node, .. }) if local.as_deref() != Some(node.as_str()) => node,
            _ => continue,
        };
        let bridge_seq = msg.headers.as_ref().and_then(|h| h.get(HEADER_SEQ)).and_then(|v| v.as_str().parse().ok());
        if tx.send(Work::Event { node, bridge_seq, payload: msg.payload, stream_seq: None }).await.is_err() {
            break;
        }
    }
    let _ = sub.unsubscribe().await;
}

/// Forwards commands from NATS to the owner; refuses them when it is overloaded.
pub(crate) async fn forward_commands(
    sub: async_nats::Subscriber,
    tx: mpsc::Sender<Work>,
    client: async_nats::Client,
    cancel: CancellationToken,
    service: Option<callbus_service::Service>,
) {
    forward_commands_from(sub, subjects::CMD_PREFIX.into(), tx, client, cancel, service).await
}

/// Forwards commands whose subjects are `prefix` + verb to the owner; refuses them when it is
/// overloaded.
pub(crate) async fn forward_commands_from(
    mut sub: async_nats::Subscriber,
    prefix: String,
    tx: mpsc::Sender<Work>,
    client: async_nats::Client,
    cancel: CancellationToken,
    service: Option<callbus_service::Service>,
) {
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = cancel.cancelled() => break,
        };
        let Some(msg) = msg else { break };
        let verb = match msg.subject.as_str().strip_prefix(prefix.as_str()).and_then(Verb::from_name) {
            Some(verb) => verb,
            None => {
                if let Some(reply) = msg.reply {
                    let error = CommandError::new(
                        CommandErrorCode::Unsupported,
                        format!("{} is not a command subject", msg.subject),
                    );
                    let _ = client
                        .publish(reply, Bytes::from(CommandReply::Refused { cmd_id: None, error }.to_bytes()))
                        .await;
                }
                continue;
            }
        };
        let reply = msg.reply.clone();
        let received = Instant::now();
        if let Err(mpsc::error::TrySendError::Full(_)) =
            tx.try_send(Work::Command { verb, payload: msg.payload, reply, received })
        {
            record_service(service.as_ref(), verb, received, Some(CommandErrorCode::Unavailable));
            if let Some(reply) = msg.reply {
                let error = CommandError::new(CommandErrorCode::Unavailable, "the engine is overloaded: retry later");
                let _ =
                    client.publish(reply, Bytes::from(CommandReply::Refused { cmd_id: None, error }.to_bytes())).await;
            }
        }
    }
    let _ = sub.unsubscribe().await;
}
